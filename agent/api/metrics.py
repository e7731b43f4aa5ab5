"""Built-in plugin ``metrics``: ``GET /metrics`` (Prometheus text format) and the ASGI
middleware that measures every request and writes the access log (contract §18).

Config section ``metrics``: ``enabled`` (true; false: no ``/metrics`` route and no HTTP
measuring at all, so the request path is exactly as without metrics) and ``public``
(false: the master token is required, a temporary token is refused with 403 whatever its
permissions, since the figures describe the whole node; true: served like ping, with no
vendor header and no token, for a scraper on a trusted network). Both are read at start:
a reload that changes them says that a restart applies them.

The middleware (``observe``) wraps the whole app, the fast read path included: each HTTP
request is counted by route template (the URL rule, never the raw path: ids would make
a series per container; an unrouted path counts as ``unmatched``), method and status,
with its latency; each WebSocket by route while open, and by outcome. The route is named
in the ASGI scope by a ``before_request`` hook (``label_routes``) registered before the
access check, so refused requests count under their route too; a fast read, which never
reaches Quart, is named from the URL map once per fast reader. With ``log.access`` it
writes one line per request and per WebSocket on the ``lightd.access`` logger: method,
route, path (the query string never: a WebSocket's ``?token=`` must not be written
down), status, milliseconds, bytes sent and the client's address, as ``extra`` fields
too (the JSON log format prints them). No header is ever logged.

Also registers the scrape-time series that need the core's domain: containers by
install and runtime state, jobs by kind and state, and whether the Docker engine answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from time import perf_counter
from typing import Any, cast

import attrs
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..config import Config
from ..containers import CONTAINERS
from ..errors import Forbidden
from ..hookspecs import hookimpl
from ..jobs import JOBS
from ..metrics import UNKNOWN
from ..runtime import Agent
from .fastpath import FAST_READS
from .views import current_auth, describe, public, requires

__all__ = ["ROUTE_KEY", "MetricsConfig", "label_routes", "observe"]

log = logging.getLogger(__name__)
access_log = logging.getLogger("lightd.access")

#: Where ``label_routes`` puts a request's route template in its ASGI scope.
ROUTE_KEY = "lightd.route"

#: Methods counted under their name; any other is ``other`` (a client picks the method,
#: and must not create series at will).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Status codes as label values, made once.
_STATUS = {code: str(code) for code in range(100, 600)}

INSTALL_STATES = ("installing", "ready", "failed")
RUNTIME_STATES = ("offline", "starting", "running", "stopping")

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]


@attrs.frozen
class MetricsConfig:
    """``metrics``: ``GET /metrics`` and the measuring of requests (read at start)."""

    #: Measure requests and serve ``GET /metrics``; false leaves the request path bare.
    enabled: bool = True
    #: Serve ``GET /metrics`` without the vendor header and token (a trusted network).
    public: bool = False


def settings(agent: Agent) -> MetricsConfig | None:
    """The ``metrics`` section, or ``None`` when the plugin is disabled."""
    section = agent.config.sections.get("metrics")
    return section if isinstance(section, MetricsConfig) else None


def measuring(agent: Agent) -> bool:
    found = settings(agent)
    return found is not None and found.enabled


# -- the plugin -------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"metrics": MetricsConfig}


@hookimpl
def lightd_configure(agent: Agent) -> None:
    if not measuring(agent):
        return
    metrics = agent.metrics

    def containers() -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {
            (i, r): 0 for i in INSTALL_STATES for r in RUNTIME_STATES
        }
        manager = agent.stash.get(CONTAINERS)
        if manager is not None:
            for supervisor in manager.all():
                key = (supervisor.record.install_state, supervisor.state)
                counts[key] = counts.get(key, 0) + 1
        return counts

    metrics.gauge_from(
        "lightd_containers",
        "Containers by install state and runtime state.",
        containers,
        ("install_state", "state"),
    )
    metrics.gauge_from(
        "lightd_docker_engine_available",
        "1 while the Docker engine answers, else 0.",
        lambda: float(agent.docker.available),
    )

    def jobs() -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {}
        runner = agent.stash.get(JOBS)
        if runner is not None:
            for job in runner.select():
                key = (job.kind, job.state)
                counts[key] = counts.get(key, 0) + 1
        return counts

    metrics.gauge_from(
        "lightd_jobs",
        "Jobs the agent holds by kind and state (finished ones are kept 24 hours).",
        jobs,
        ("kind", "state"),
    )


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    config = settings(agent)
    if config is None or not config.enabled:
        return []
    bp = Blueprint("metrics", __name__)

    @bp.get("/metrics")
    @describe(
        "Prometheus metrics",
        description=(
            "The node's metrics in Prometheus text format: HTTP requests by route, method"
            " and status with latency histograms, WebSockets, containers by state, console"
            " lines, the remote outbox, Docker call latency, the process. The master token"
            " only (a temporary token is refused with 403 whatever its permissions), or no"
            " headers at all with `metrics.public: true`."
        ),
        responses={200: {"text/plain": str}},
        errors=(403,),
        tags=("operating",),
    )
    @requires(None)
    async def scrape() -> Response:
        """The text format 0.0.4 (names and labels are all plain ASCII here)."""
        if current_auth().kind == "temporary":
            raise Forbidden("Metrics need the master token", code="master_token_required")
        return Response(agent.metrics.exposition(), content_type=CONTENT_TYPE_PLAIN_0_0_4)

    if config.public:
        public(scrape)
    return [bp]


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    before, after = old.sections.get("metrics"), new.sections.get("metrics")
    if before != after:
        log.warning("config reload: metrics changed; it takes effect at the next restart")


# -- measuring requests ----------------------------------------------------------------


def label_routes(agent: Agent, app: QuartTrio) -> bool:
    """Name each request's route template in its ASGI scope (``ROUTE_KEY``), for
    ``observe``; call it before the access check is registered. Returns whether anything
    observes requests (metrics or the access log); when nothing does, no hook is added."""
    if not (measuring(agent) or agent.config.log.access):
        return False

    @app.before_request
    async def name_request_route() -> None:
        rule = request.url_rule
        cast("dict[str, Any]", request.scope)[ROUTE_KEY] = rule.rule if rule else UNKNOWN

    @app.before_websocket
    async def name_websocket_route() -> None:
        rule = websocket.url_rule
        cast("dict[str, Any]", websocket.scope)[ROUTE_KEY] = rule.rule if rule else UNKNOWN

    return True


def observe(agent: Agent, app: QuartTrio, inner: ASGIApp) -> ASGIApp:
    """Wrap ``inner`` (the fast reads and Quart) with the measuring and the access log."""
    metrics = agent.metrics
    record = measuring(agent)
    observe_http = metrics.http.observe
    open_sockets = metrics.websockets_open
    connections = metrics.websocket_connections
    readers = agent.stash.setdefault(FAST_READS, {})
    fast_routes: dict[str, str] = {}

    def fast_route(path: str) -> str:
        """The route template of a fast read (never seen by Quart's routing)."""
        key = path if path in readers else path.rpartition("/")[0] + "/"
        route = fast_routes.get(key)
        if route is None:
            try:
                rule, _ = app.url_map.bind("localhost").match(path, "GET", return_rule=True)
                route = str(rule.rule)
            except HTTPException:
                route = UNKNOWN
            if key in readers:  # bounded by the readers
                fast_routes[key] = route
        return route

    async def front(scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await (ws if scope["type"] == "websocket" else inner)(scope, receive, send)
            return
        # The hot path: kept to one closure, no extra coroutine per message, plain numbers.
        started = perf_counter()
        status = 0
        size = 0

        def sending(message: ASGISendEvent) -> Awaitable[None]:
            nonlocal status, size
            event: Any = message
            if status:
                size += len(event.get("body", b""))
            elif event["type"] == "http.response.start":
                status = event["status"]
            return send(message)

        try:
            await inner(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            if status:  # (cancelled before answering: nothing was served)
                seconds = perf_counter() - started
                method = scope["method"]
                if method not in METHODS:
                    method = "other"
                route = scope.get(ROUTE_KEY)
                if route is None:
                    route = fast_route(scope["path"]) if status == 200 else UNKNOWN
                if record:
                    observe_http((route, method, _STATUS.get(status) or str(status)), seconds)
                if agent.config.log.access:
                    log_access(scope, method, route, status, seconds, size)

    async def ws(scope: Any, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        started = perf_counter()
        status = 0
        size = 0
        route = ""

        async def sending(message: ASGISendEvent) -> None:
            nonlocal status, size, route
            event: Any = message
            kind = event["type"]
            if kind == "websocket.send":
                size += len(event.get("bytes") or event.get("text") or "")
            elif not status:
                if kind == "websocket.accept":
                    route = scope.get(ROUTE_KEY, UNKNOWN)
                    status = 101
                    if record:
                        open_sockets[route] = open_sockets.get(route, 0) + 1
                elif kind == "websocket.http.response.start":
                    status = event["status"]
                elif kind == "websocket.close":
                    status = 403  # closed before accepting: the server refuses the handshake
            await send(message)

        try:
            await inner(scope, receive, sending)
        finally:
            if route and record:
                open_sockets[route] -= 1
            route = route or scope.get(ROUTE_KEY, UNKNOWN)
            if record:
                key = (route, str(status or 500))
                connections[key] = connections.get(key, 0) + 1
            if agent.config.log.access:
                seconds = perf_counter() - started
                log_access(scope, "GET", route, status or 500, seconds, size)

    return front


def request_path(scope: Mapping[str, Any]) -> str:
    """The request's path as sent (percent-encoded), without the query string; printable."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else str(scope.get("path", ""))
    path = path.partition("?")[0]
    if not path.isprintable():
        path = path.encode("unicode_escape").decode("ascii")
    return path


def log_access(
    scope: Mapping[str, Any], method: str, route: str, status: int, seconds: float, size: int
) -> None:
    """One access log line (never the query string, never a header)."""
    path = request_path(scope)
    client = scope.get("client")
    address = str(client[0]) if client else "-"
    duration_ms = round(seconds * 1000, 2)
    access_log.info(
        "%s %s %s %d %.2fms %dB",
        address,
        method,
        path,
        status,
        duration_ms,
        size,
        extra={
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "duration_ms": duration_ms,
            "bytes": size,
            "client": address,
        },
    )
