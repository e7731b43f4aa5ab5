"""The mock panel: state, the quart-trio app, and ``serve_panel`` to run it on hypercorn.

Panel side of contract §9: ``GET {prefix}/health`` and ``POST {prefix}/update``, both
behind ``Authorization: Bearer <token>``. Each accepted token names one node (a real panel
gives every node its own token), so the page can show which node reported what. Updates
are de-duplicated by ``event_id`` (the agent delivers at least once) and kept in memory,
and optionally appended to a JSON-lines file that is read back at start.

For people (no auth; bind it to loopback): ``GET /`` the live page, ``GET /api/state``
its JSON (nodes → containers → latest status), ``GET /api/updates`` every accepted update
in arrival order, ``POST /api/control`` ``{"fail_status": 503|null, "delay": seconds}`` to
switch failure behaviour on and off while it runs.

With a :class:`~.drive.Fleet` (nodes given with their URL and master token) it also drives
them: the pages ``/servers``, ``/servers/new`` and ``/servers/<node>/<id>`` (static HTML and
a little JavaScript in ``static/``) and their JSON routes ``/panel/api/...`` (``drive.py``),
which call each node through ``client.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import hypercorn.config
import hypercorn.trio
import trio
from quart import Blueprint, Response, g, jsonify, request
from quart.json.provider import DefaultJSONProvider
from quart_trio import QuartTrio

__all__ = [
    "ContainerStatus",
    "Node",
    "PanelState",
    "create_app",
    "node_name",
    "serve_panel",
]

from .drive import Fleet, create_panel_api

log = logging.getLogger("panel_mock")

PAGE = Path(__file__).with_name("page.html")
STATIC = Path(__file__).with_name("static")
#: Pages (under ``static/``) and the assets they load: nothing else is served from there.
PAGES = {"servers": "servers.html", "new": "new.html", "server": "server.html"}
ASSETS = {"panel.css": "text/css; charset=utf-8", "panel.js": "text/javascript; charset=utf-8"}
STATUSES = frozenset({"installing", "ready", "starting", "running", "stopping", "offline"})
MAX_DELAY = 600.0


def node_name(token: str) -> str:
    """A stable, harmless label for a token that was given no name (never the token)."""
    return "node-" + hashlib.sha256(token.encode()).hexdigest()[:8]


@attrs.define
class ContainerStatus:
    """The latest word about one container of one node."""

    server: str
    status: str
    error: str | None
    #: Panel time (unix s) the update arrived, and the agent's own ``timestamp`` in it.
    updated_at: float
    timestamp: float | None
    updates: int = 0


@attrs.define
class Node:
    name: str
    address: str | None = None
    user_agent: str | None = None
    last_seen: float | None = None
    last_health: float | None = None
    containers: dict[str, ContainerStatus] = attrs.Factory(dict)


@attrs.define
class PanelState:
    """Everything the mock knows; tests read and change it directly."""

    #: Accepted tokens → node name.
    tokens: Mapping[str, str]
    #: When set, ``/health`` and ``/update`` answer this status and record nothing.
    fail_status: int | None = None
    #: Seconds every ``/health`` and ``/update`` answer is held back (after recording).
    delay: float = 0.0
    data_file: Path | None = None
    nodes: dict[str, Node] = attrs.Factory(dict)
    #: Accepted updates in arrival order, each with ``node`` and ``received_at`` added.
    received: list[dict[str, Any]] = attrs.Factory(list)
    seen: set[str] = attrs.Factory(set)
    duplicates: int = 0
    #: Requests to ``/update`` and ``/health`` (any answer), for failure tests.
    update_requests: int = 0
    health_requests: int = 0
    #: The last requests to ``/health`` and ``/update``: (monotonic time, path, status).
    recent_requests: deque[tuple[float, str, int]] = attrs.Factory(lambda: deque(maxlen=1000))
    #: Bumped on every change the page shows; the page re-renders when it moves.
    version: int = 0
    clock: Callable[[], float] = time.time
    _write_lock: trio.Lock = attrs.Factory(trio.Lock)

    def node_for(self, authorization: str | None) -> str | None:
        """The node a ``Bearer`` header belongs to, compared in constant time."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for known, name in self.tokens.items():
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                found = name
        return found

    def node(self, name: str) -> Node:
        return self.nodes.setdefault(name, Node(name))

    def accept(self, name: str, update: Mapping[str, Any]) -> bool:
        """Record an update from node ``name``; ``False`` for a duplicate ``event_id``."""
        event_id = update.get("event_id")
        if isinstance(event_id, str):
            if event_id in self.seen:
                self.duplicates += 1
                return False
            self.seen.add(event_id)
        now = self.clock()
        entry = {**update, "node": name, "received_at": now}
        self.received.append(entry)
        self._apply(entry)
        return True

    def _apply(self, entry: Mapping[str, Any]) -> None:
        node = self.node(entry["node"])
        if entry["event"] != "update":  # an hour of usage (§22): kept, no state change
            node.last_seen = entry["received_at"]
            self.version += 1
            return
        server = entry["server"]
        failed = "error" in entry
        status = "failed" if failed else entry["status"]
        current = node.containers.get(server)
        updates = current.updates + 1 if current else 1
        node.containers[server] = ContainerStatus(
            server=server,
            status=status,
            error=entry.get("data") if failed else None,
            updated_at=entry["received_at"],
            timestamp=entry.get("timestamp"),
            updates=updates,
        )
        node.last_seen = entry["received_at"]
        self.version += 1

    def forget(self, node: str, server: str) -> None:
        """A node deleted ``server``: it leaves the page (its updates stay recorded)."""
        known = self.nodes.get(node)
        if known is not None and known.containers.pop(server, None) is not None:
            self.version += 1

    def heartbeat(self, node: str) -> dict[str, Any]:
        """What remote sync heard from ``node``: its last health check and update."""
        known = self.nodes.get(node)
        if known is None:
            return {"last_health": None, "last_seen": None}
        return {"last_health": known.last_health, "last_seen": known.last_seen}

    def statuses(self, server: str, node: str | None = None) -> list[str]:
        """Statuses received about ``server`` in arrival order (``failed`` for errors)."""
        return [
            "failed" if "error" in e else e["status"]
            for e in self.received
            if e["event"] == "update"
            and e["server"] == server
            and (node is None or e["node"] == node)
        ]

    def snapshot(self) -> dict[str, Any]:
        """The page's JSON: every node, its containers and their latest status."""
        return {
            "version": self.version,
            "fail_status": self.fail_status,
            "delay": self.delay,
            "received": len(self.received),
            "duplicates": self.duplicates,
            "nodes": [
                {
                    "name": node.name,
                    "address": node.address,
                    "user_agent": node.user_agent,
                    "last_seen": node.last_seen,
                    "last_health": node.last_health,
                    "containers": [attrs.asdict(c) for _, c in sorted(node.containers.items())],
                }
                for _, node in sorted(self.nodes.items())
            ],
        }

    def load(self) -> None:
        """Replay ``data_file`` (JSON lines of accepted updates) into memory (blocking)."""
        if self.data_file is None or not self.data_file.exists():
            return
        with self.data_file.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:  # a line cut short by a crash: skip it, keep the rest
                    log.warning("%s line %d is not JSON; skipped", self.data_file, number)
                    continue
                if isinstance(entry.get("event_id"), str):
                    self.seen.add(entry["event_id"])
                self.received.append(entry)
                self._apply(entry)

    async def persist(self, entry: Mapping[str, Any]) -> None:
        """Append one accepted update to ``data_file``, if there is one."""
        if self.data_file is None:
            return
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        path = self.data_file

        def append() -> None:
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line)

        async with self._write_lock:
            await trio.to_thread.run_sync(append)


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


def _validate(body: Any) -> str | None:
    """Why ``body`` is not an update of contract §9, or ``None`` when it is one."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    if body.get("event") not in ("update", "usage", "backup"):
        return 'event: must be "update", "usage" or "backup"'
    if body["event"] == "backup":
        return _validate_backup(body)
    server = body.get("server")
    if not isinstance(server, str) or not server:
        return "server: must be a non-empty string"
    if body["event"] == "usage":
        return _validate_usage(body)
    if "error" in body:
        if body["error"] != "failed":
            return 'error: must be "failed"'
        if "data" in body and not isinstance(body["data"], str):
            return "data: must be a string"
    elif body.get("status") not in STATUSES:
        return f"status: must be one of {', '.join(sorted(STATUSES))}"
    if "event_id" in body and not isinstance(body["event_id"], str):
        return "event_id: must be a string"
    timestamp = body.get("timestamp")
    if timestamp is not None and (
        not isinstance(timestamp, int | float) or isinstance(timestamp, bool)
    ):
        return "timestamp: must be a number"
    return None


def _validate_backup(body: dict[str, Any]) -> str | None:
    """Why ``body`` is not a finished backup of contract §16 (about a volume, not a server)."""
    for name in ("volume_id", "backup_id", "event_id"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name}: must be a non-empty string"
    if body.get("status") not in ("done", "failed"):
        return "status: must be done or failed"
    return None


USAGE_FIGURES = ("memory_gb_hours", "cpu_vcpu_hours", "disk_gb_hours", "egress_gb")


def _validate_usage(body: dict[str, Any]) -> str | None:
    """Why ``body`` is not a usage event of contract §22 (one hour of one server)."""
    start = body.get("start")
    if not isinstance(start, int) or isinstance(start, bool) or start % 3600:
        return "start: must be the unix time of an hour"
    for name in USAGE_FIGURES:
        value = body.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            return f"{name}: must be a number >= 0"
    if not isinstance(body.get("event_id"), str):
        return "event_id: must be a string"
    return None


def create_app(state: PanelState, *, prefix: str = "", fleet: Fleet | None = None) -> QuartTrio:
    """The mock panel app; the panel API lives under ``prefix`` (e.g. ``/api``). With a
    ``fleet`` it also drives those nodes (pages and ``/panel/api``)."""
    app = QuartTrio("panel_mock")
    if isinstance(app.json, DefaultJSONProvider):  # it is; the check tells the type checker
        app.json.sort_keys = False
    api = Blueprint("panel_api", __name__, url_prefix=prefix.rstrip("/") or None)

    async def answer_late() -> None:
        if state.delay > 0:
            await trio.sleep(state.delay)

    def caller() -> str | None:
        name = state.node_for(request.headers.get("Authorization"))
        if name is not None:
            node = state.node(name)
            node.address = request.remote_addr
            node.user_agent = request.headers.get("User-Agent")
        return name

    @api.before_request
    async def arrived() -> None:
        g.arrived = time.monotonic()

    @api.after_request
    async def answered(response: Response) -> Response:
        state.recent_requests.append((g.arrived, request.path, response.status_code))
        return response

    @api.get("/health")
    async def health() -> Response | dict[str, Any]:
        state.health_requests += 1
        name = caller()
        if name is None:
            return _error(401, "Missing or invalid authorization token")
        if state.fail_status is not None:
            await answer_late()
            return _error(state.fail_status, "Panel is failing on purpose (mock)")
        state.node(name).last_health = state.clock()
        state.version += 1
        await answer_late()
        return {"status": 200, "endpoint": "active"}

    @api.post("/update")
    async def update() -> Response | dict[str, Any]:
        state.update_requests += 1
        name = caller()
        if name is None:
            return _error(401, "Missing or invalid authorization token")
        if state.fail_status is not None:
            await answer_late()
            return _error(state.fail_status, "Panel is failing on purpose (mock)")
        try:
            body = json.loads(await request.get_data(as_text=True))
        except ValueError:
            return _error(400, "Invalid JSON body")
        if (problem := _validate(body)) is not None:
            return _error(400, problem)
        accepted = state.accept(name, body)
        if accepted:
            await state.persist(state.received[-1])
        await answer_late()
        return {"status": "ok" if accepted else "duplicate"}

    app.register_blueprint(api)

    @app.get("/")
    async def page() -> Response:
        html = await trio.Path(PAGE).read_text(encoding="utf-8")
        return Response(html, content_type="text/html; charset=utf-8")

    async def static_file(name: str, content_type: str) -> Response:
        body = await trio.Path(STATIC / name).read_bytes()
        response = Response(body, content_type=content_type)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/static/<name>")
    async def asset(name: str) -> Response:
        if name not in ASSETS:
            return _error(404, "Not found")
        return await static_file(name, ASSETS[name])

    @app.get("/servers")
    async def servers_page() -> Response:
        return await static_file(PAGES["servers"], "text/html; charset=utf-8")

    @app.get("/servers/new")
    async def new_page() -> Response:
        return await static_file(PAGES["new"], "text/html; charset=utf-8")

    @app.get("/servers/<node>/<internal_id>")
    async def server_page(node: str, internal_id: str) -> Response:
        return await static_file(PAGES["server"], "text/html; charset=utf-8")

    if fleet is not None:
        fleet.on_deleted = state.forget
        app.register_blueprint(create_panel_api(fleet, state.heartbeat))

        @app.before_serving
        async def drive() -> None:
            app.nursery.start_soon(fleet.run)

        @app.after_serving
        async def park() -> None:
            fleet.stop()

    @app.get("/api/state")
    async def snapshot() -> dict[str, Any]:
        return state.snapshot()

    @app.get("/api/updates")
    async def updates() -> dict[str, Any]:
        return {"updates": state.received, "duplicates": state.duplicates}

    @app.post("/api/control")
    async def control() -> Response | dict[str, Any]:
        # Only JSON is accepted, so a web page elsewhere cannot post here without a CORS
        # preflight, which this app never grants.
        if request.mimetype != "application/json":
            return _error(415, "Content-Type must be application/json")
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            return _error(400, "Invalid JSON body")
        if "fail_status" in body:
            value = body["fail_status"]
            if value is not None and not (isinstance(value, int) and 400 <= value <= 599):
                return _error(400, "fail_status: must be null or a status from 400 to 599")
            state.fail_status = value
        if "delay" in body:
            value = body["delay"]
            if not isinstance(value, int | float) or isinstance(value, bool):
                return _error(400, "delay: must be a number")
            if not 0 <= value <= MAX_DELAY:
                return _error(400, f"delay: must be between 0 and {MAX_DELAY:g}")
            state.delay = float(value)
        state.version += 1
        return {"fail_status": state.fail_status, "delay": state.delay}

    return app


async def serve_panel(
    state: PanelState,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    prefix: str = "",
    fd: int | None = None,
    fleet: Fleet | None = None,
    shutdown_trigger: Callable[..., Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mock panel until cancelled (or ``shutdown_trigger`` returns).

    Reports the bound URLs with ``task_status.started``. ``fd`` serves on an already bound
    socket instead of ``host``/``port`` (tests keep a port refusing connections, then
    bring the panel up on it).
    """
    config = hypercorn.config.Config()
    config.bind = [f"fd://{fd}"] if fd is not None else [_bind(host, port)]
    config.graceful_timeout = 1.0
    config.accesslog = None
    config.errorlog = logging.getLogger("panel_mock.hypercorn")
    config.include_server_header = False
    await hypercorn.trio.serve(
        create_app(state, prefix=prefix, fleet=fleet),
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
