"""The panel side that drives nodes: what the panel knows of each node it manages, and the
JSON routes its pages call (``/panel/api/...``).

Each node is a :class:`NodeLink`: a name (the one its remote-sync token reports under, so
the heartbeat and the node's own answers meet on one row), the node's URL and its master
token, held in a :class:`~.client.LightdClient`. While the panel runs, :class:`Fleet`
keeps, per node:

* the node event stream (``GET /events``, contract §17) open: a ``container.*`` event has
  the server list read again at once, so a state change or a deleted server shows within
  a moment; the list is also read every ``poll_interval`` seconds, so a node without the
  stream, or one that was away, is still shown as it is;
* the machine's utilization (``GET /system/utilization``).

The browser never sees a master token. Where the browser talks to the node itself (the
console's WebSocket, an upload, a download link) the panel mints a temporary token for
exactly that (contract §2.1, §12): one container or volume, the fewest permissions,
a short life, and single use for links.

Every route here that changes something needs the header ``X-Panel: 1`` (a page on
another site cannot send it without a CORS preflight, which is never granted): no auth
otherwise, like the rest of the mock panel, so keep it on loopback.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio
from quart import Blueprint, Response, jsonify, request

from .client import (
    ContainerSummary,
    CreateContainer,
    LightdClient,
    LightdError,
    NodeEvent,
    Port,
    Utilization,
)

__all__ = ["Fleet", "NodeLink", "create_panel_api"]

log = logging.getLogger("panel_mock.drive")

MIB = 1024 * 1024
#: The largest file the editor opens.
EDIT_LIMIT = MIB
#: Lifetimes of the tokens handed to the browser (contract §2.1 TTL syntax).
CONSOLE_TTL = "15m"
LINK_TTL = "60s"
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
POWER = ("start", "stop", "restart", "kill")

T = TypeVar("T")


@attrs.define
class NodeLink:
    """One node the panel drives, and what it last heard from it."""

    name: str
    client: LightdClient
    containers: list[ContainerSummary] = attrs.Factory(list)
    utilization: Utilization | None = None
    agent_version: str | None = None
    reachable: bool = False
    error: str | None = None
    #: The event stream is open (else the list is only polled).
    events_live: bool = False
    last_event_seq: int | None = None
    checked_at: float | None = None


@attrs.define
class Fleet:
    """Every node the panel drives; ``run`` keeps their view fresh while serving."""

    nodes: dict[str, NodeLink]
    poll_interval: float = 2.0
    #: Called with (node, internal_id) when a node says a server was deleted.
    on_deleted: Callable[[str, str], None] | None = None
    #: Bumped whenever something the pages show changed.
    version: int = 0
    clock: Callable[[], float] = trio.current_time
    _scope: trio.CancelScope | None = None

    @classmethod
    def of(cls, nodes: dict[str, tuple[str, str]], **kwargs: Any) -> Fleet:
        """``{name: (url, master token)}`` → a fleet."""
        links = {
            name: NodeLink(name, LightdClient(url, token)) for name, (url, token) in nodes.items()
        }
        return cls(links, **kwargs)

    def get(self, name: str) -> NodeLink:
        node = self.nodes.get(name)
        if node is None:
            raise LightdError(404, "Node not found")
        return node

    async def run(self) -> None:
        """Watch every node until cancelled (or :meth:`stop`)."""
        try:
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    for node in self.nodes.values():
                        nursery.start_soon(self._poll, node)
                        nursery.start_soon(self._watch, node)
        finally:
            with trio.CancelScope(shield=True):
                for node in self.nodes.values():
                    await node.client.aclose()

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def refresh(self, node: NodeLink) -> None:
        """Read the node's server list again (``GET /containers``)."""
        try:
            containers = await node.client.list_containers()
        except LightdError as exc:
            self._lost(node, exc)
            return
        if containers != node.containers or not node.reachable:
            node.containers = containers
            self.version += 1
        node.reachable, node.error = True, None

    def _lost(self, node: NodeLink, exc: LightdError) -> None:
        if node.reachable or node.error != exc.message:
            self.version += 1
        node.reachable, node.error = False, exc.message

    async def _poll(self, node: NodeLink) -> None:
        while True:
            await self.refresh(node)
            if node.reachable:
                try:
                    if node.agent_version is None:
                        node.agent_version = (await node.client.system_info())["version"]
                    node.utilization = await node.client.utilization()
                    self.version += 1
                except LightdError as exc:
                    self._lost(node, exc)
            node.checked_at = self.clock()
            await trio.sleep(self.poll_interval)

    async def _watch(self, node: NodeLink) -> None:
        def on_open() -> None:
            node.events_live = True
            self.version += 1

        async def on_event(event: NodeEvent) -> None:
            node.last_event_seq = event.get("seq")
            kind = event.get("type", "")
            if kind == "container.deleted" and self.on_deleted is not None:
                data = event.get("data") or {}
                if isinstance(data, dict) and isinstance(data.get("internal_id"), str):
                    self.on_deleted(node.name, data["internal_id"])
            if kind.startswith("container.") or kind == "resync":
                await self.refresh(node)

        while True:
            try:
                await node.client.watch_events(on_event, node.last_event_seq, on_open)
            except LightdError as exc:
                log.debug("events of %s: %s", node.name, exc)
            if node.events_live:
                node.events_live = False
                self.version += 1
            await trio.sleep(self.poll_interval)


def _error(status: int, message: str) -> Response:
    response = jsonify({"error": message})
    response.status_code = status
    return response


async def _body() -> dict[str, Any]:
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise LightdError(400, "Invalid JSON body")
    return body


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = body.get(name)
    if value is None or value == "":
        if required:
            raise LightdError(400, f"{name}: is required")
        return ""
    if not isinstance(value, str):
        raise LightdError(400, f"{name}: must be a string")
    return value


def _number(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LightdError(400, f"{name}: must be a number") from None
    if not math.isfinite(number) or number < 0:
        raise LightdError(400, f"{name}: must be a number >= 0")
    return number


def create_panel_api(fleet: Fleet, heartbeat: Callable[[str], dict[str, Any]]) -> Blueprint:
    """The pages' JSON routes. ``heartbeat(node)`` is what remote sync heard from it."""
    bp = Blueprint("panel_drive", __name__, url_prefix="/panel/api")

    @bp.before_request
    async def same_site_only() -> Response | None:
        if request.method not in ("GET", "HEAD") and request.headers.get("X-Panel") != "1":
            return _error(403, "Missing X-Panel header")
        return None

    @bp.errorhandler(LightdError)
    async def node_said_no(exc: LightdError) -> Response:
        return _error(exc.status, exc.message)

    async def detail(node: NodeLink, internal_id: str) -> dict[str, Any]:
        return dict(await node.client.get_container(internal_id))

    async def volume_of(node: NodeLink, internal_id: str) -> str:
        return str((await detail(node, internal_id))["volume_id"])

    async def settle(node: NodeLink, action: Awaitable[T]) -> T:
        """Run a change, then read the server list at once (the page shows it)."""
        result = await action
        await fleet.refresh(node)
        return result

    # --- nodes and servers --------------------------------------------------------------

    @bp.get("/nodes")
    async def nodes() -> dict[str, Any]:
        return {
            "version": fleet.version,
            "nodes": [
                {
                    "name": n.name,
                    "url": n.client.url,
                    "reachable": n.reachable,
                    "error": n.error,
                    "events_live": n.events_live,
                    "agent_version": n.agent_version,
                    "utilization": n.utilization,
                    "servers": len(n.containers),
                    **heartbeat(n.name),
                }
                for n in sorted(fleet.nodes.values(), key=lambda n: n.name)
            ],
        }

    @bp.get("/servers")
    async def servers() -> dict[str, Any]:
        return {
            "version": fleet.version,
            "nodes": [
                {"name": n.name, "reachable": n.reachable, "error": n.error}
                for n in sorted(fleet.nodes.values(), key=lambda n: n.name)
            ],
            "servers": [
                {"node": n.name, **c}
                for n in sorted(fleet.nodes.values(), key=lambda n: n.name)
                for c in n.containers
            ],
        }

    @bp.get("/nodes/<name>/options")
    async def options(name: str) -> dict[str, Any]:
        """What the create form offers: images, volumes and free ports of the node."""
        node = fleet.get(name)
        images = await node.client.list_images()
        return {
            "images": sorted({tag for image in images for tag in image["tags"]}),
            "volumes": await node.client.list_volumes(),
            "ports": await node.client.list_ports(in_use=False),
        }

    @bp.post("/nodes/<name>/servers")
    async def create(name: str) -> dict[str, Any]:
        node = fleet.get(name)
        body = await _body()
        internal_id = _text(body, "internal_id")
        if not ID_RE.match(internal_id):
            raise LightdError(400, "Invalid internal_id")
        spec: CreateContainer = {
            "internal_id": internal_id,
            "image": _text(body, "image"),
            "startup_command": _text(body, "startup_command"),
        }
        for field in ("start_pattern", "install_script", "stop_command"):
            if value := _text(body, field, required=False):
                spec[field] = value
        limits: dict[str, int | float] = {}
        if (memory := _number(body, "memory_mib")) is not None:
            limits["memory"] = int(memory * MIB)
        if (cpu := _number(body, "cpu")) is not None:
            limits["cpu"] = cpu
        if limits:
            spec["limits"] = limits
        ports = body.get("ports") or []
        if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
            raise LightdError(400, "ports: must be a list of pool entries")
        spec["ports"] = [
            Port(
                ip=str(p.get("ip")),
                port=int(p.get("port", 0)),
                protocol=str(p.get("protocol", "tcp")),
            )
            for p in ports
        ]
        spec["start_on_completion"] = bool(body.get("start_on_completion"))
        made_volume = None
        volume_id = _text(body, "volume_id", required=False)
        if not volume_id:
            disk = _number(body, "disk_mib")
            volume = await node.client.create_volume(int(disk * MIB) if disk else None)
            volume_id = made_volume = volume["volume_id"]
        spec["volume_id"] = volume_id
        try:
            await settle(node, node.client.create_container(spec))
        except LightdError:
            if made_volume is not None:  # a refused create leaves no volume behind
                try:
                    await node.client.delete_volume(made_volume)
                except LightdError as exc:
                    log.warning("volume %s of a refused create: %s", made_volume, exc)
            raise
        return {"node": name, "internal_id": internal_id, "volume_id": volume_id}

    @bp.get("/nodes/<name>/servers/<internal_id>")
    async def server(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        found = await detail(node, internal_id)
        try:
            volume: Any = await node.client.get_volume(found["volume_id"])
        except LightdError:
            volume = None
        return {"node": name, "server": found, "volume": volume}

    @bp.delete("/nodes/<name>/servers/<internal_id>")
    async def delete(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        volume_id = await volume_of(node, internal_id)
        answer = await settle(node, node.client.delete_container(internal_id))
        if request.args.get("volume") == "delete":
            await node.client.delete_volume(volume_id)
        return dict(answer)

    @bp.post("/nodes/<name>/servers/<internal_id>/power")
    async def power(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        action = _text(await _body(), "action")
        if action not in POWER:
            raise LightdError(400, f"action: must be one of {', '.join(POWER)}")
        return dict(await settle(node, node.client.power(internal_id, action)))  # type: ignore[arg-type]

    @bp.post("/nodes/<name>/servers/<internal_id>/console")
    async def console(name: str, internal_id: str) -> dict[str, Any]:
        """A WebSocket URL for the browser: a single-use token for this server only,
        allowed to read, send commands and use the power buttons, for 15 minutes (the
        socket is closed with 4001 then; the page asks for a new one)."""
        node = fleet.get(name)
        minted = await node.client.mint_token(
            ttl=CONSOLE_TTL,
            permissions=["read", "console", "power"],
            containers=[internal_id],
            remove_on_use=True,
        )
        return {
            "url": node.client.websocket_url(internal_id, minted["token"]),
            "expires_at": minted["expires_at"],
        }

    @bp.get("/nodes/<name>/servers/<internal_id>/install-log")
    async def install_log(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        try:
            return {"log": await node.client.install_log(internal_id)}
        except LightdError as exc:
            if exc.status == 404 and exc.message == "No install log":
                return {"log": None}
            raise

    # --- files --------------------------------------------------------------------------

    @bp.get("/nodes/<name>/servers/<internal_id>/files")
    async def files(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        volume_id = await volume_of(node, internal_id)
        path = request.args.get("path", "")
        return {"path": path, "files": await node.client.list_files(volume_id, path)}

    @bp.get("/nodes/<name>/servers/<internal_id>/files/text")
    async def read_text(name: str, internal_id: str) -> Response | dict[str, Any]:
        node = fleet.get(name)
        volume_id = await volume_of(node, internal_id)
        path = request.args.get("path", "")
        data = await node.client.read_file(volume_id, path)
        if len(data) > EDIT_LIMIT:
            return _error(413, "File too large to edit here (over 1 MiB): download it")
        try:
            return {"path": path, "content": data.decode("utf-8")}
        except UnicodeDecodeError:
            return _error(415, "Not a text file: download it")

    @bp.post("/nodes/<name>/servers/<internal_id>/files/text")
    async def write_text(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        body = await _body()
        volume_id = await volume_of(node, internal_id)
        content = body.get("content")
        if not isinstance(content, str):
            raise LightdError(400, "content: must be a string")
        return dict(await node.client.write_file(volume_id, _text(body, "path"), content))

    @bp.post("/nodes/<name>/servers/<internal_id>/files/upload")
    async def upload_ticket(name: str, internal_id: str) -> dict[str, Any]:
        """Where the browser PUTs a file itself (straight to the node, any size), with a
        single-use token good for this volume's files for a minute."""
        node = fleet.get(name)
        path = _text(await _body(), "path")
        volume_id = await volume_of(node, internal_id)
        minted = await node.client.mint_token(
            ttl=LINK_TTL, permissions=["files"], volumes=[volume_id], remove_on_use=True
        )
        return {"url": node.client.upload_url(volume_id, path), "token": minted["token"]}

    @bp.post("/nodes/<name>/servers/<internal_id>/files/link")
    async def download_link(name: str, internal_id: str) -> dict[str, Any]:
        """A one-click download link: a single-use token for this volume's files."""
        node = fleet.get(name)
        path = _text(await _body(), "path")
        volume_id = await volume_of(node, internal_id)
        minted = await node.client.mint_token(
            ttl=LINK_TTL, permissions=["files"], volumes=[volume_id], remove_on_use=True
        )
        return {"url": node.client.file_link(volume_id, path, minted["token"])}

    @bp.post("/nodes/<name>/servers/<internal_id>/files/delete")
    async def delete_files(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        paths = (await _body()).get("paths")
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise LightdError(400, "paths: must be a list of paths")
        return dict(await node.client.delete_files(await volume_of(node, internal_id), paths))

    @bp.post("/nodes/<name>/servers/<internal_id>/files/rename")
    async def rename(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        body = await _body()
        volume_id = await volume_of(node, internal_id)
        return dict(
            await node.client.rename_file(volume_id, _text(body, "from"), _text(body, "to"))
        )

    @bp.post("/nodes/<name>/servers/<internal_id>/files/unzip")
    async def unzip(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        body = await _body()
        archive = _text(body, "path")
        destination = (
            _text(body, "destination", required=False) or archive.rpartition("/")[0] or "."
        )
        volume_id = await volume_of(node, internal_id)
        return dict(await node.client.decompress(volume_id, archive, destination))

    @bp.post("/nodes/<name>/servers/<internal_id>/files/folder")
    async def folder(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        path = _text(await _body(), "path")
        return dict(await node.client.make_folder(await volume_of(node, internal_id), path))

    # --- backups ------------------------------------------------------------------------

    @bp.get("/nodes/<name>/servers/<internal_id>/backups")
    async def backups(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        volume_id = await volume_of(node, internal_id)
        jobs = [
            j
            for j in await node.client.list_jobs(volume_id=volume_id)
            if j["kind"].startswith("volume.")
        ]
        return {"backups": await node.client.list_backups(volume_id), "jobs": jobs[:10]}

    @bp.post("/nodes/<name>/servers/<internal_id>/backups")
    async def backup(name: str, internal_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        body = await _body()
        volume_id = await volume_of(node, internal_id)
        return dict(
            await node.client.create_backup(volume_id, _text(body, "name", required=False) or None)
        )

    @bp.post("/nodes/<name>/servers/<internal_id>/backups/<backup_id>/restore")
    async def restore(name: str, internal_id: str, backup_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        return dict(await node.client.restore_backup(await volume_of(node, internal_id), backup_id))

    @bp.post("/nodes/<name>/servers/<internal_id>/backups/<backup_id>/link")
    async def backup_link(name: str, internal_id: str, backup_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        volume_id = await volume_of(node, internal_id)
        minted = await node.client.mint_token(
            ttl=LINK_TTL, permissions=["manage"], volumes=[volume_id], remove_on_use=True
        )
        return {"url": node.client.backup_link(volume_id, backup_id, minted["token"])}

    @bp.delete("/nodes/<name>/servers/<internal_id>/backups/<backup_id>")
    async def delete_backup(name: str, internal_id: str, backup_id: str) -> dict[str, Any]:
        node = fleet.get(name)
        return dict(await node.client.delete_backup(await volume_of(node, internal_id), backup_id))

    return bp
