"""The container WebSocket of contract §8: ``/ws/<internal_id>?token=<token>``.

Auth, origin and single-use tokens are checked before the upgrade by the app's
``before_websocket`` (a refused token is an HTTP 401, a foreign origin a 403); an unknown
container is an HTTP 404 from the view, also before the upgrade.

A connection is a subscriber of the container's event hub plus three tasks in one
nursery: the sender (the socket's only writer, draining the subscription's bounded queue,
so a slow client only ever delays itself; a socket that can read is a *paced* subscriber:
while it keeps up, the console reader waits for it rather than make it lose lines, within
the bounds of ``containers/hub.py``), the receiver (inbound frames, rate-limited,
handled one at a time) and, for temporary tokens, the token watch (expiry, revocation).
Every close goes through the sender: the subscription is ``finish``-ed with a close code
and the last frames to send (``Token expired`` or ``Token revoked`` before 4001), so no
frame is ever written after a close.

Permissions (contract §12) are checked per frame: ``send_command`` needs ``console``,
``power`` needs ``power``, ``request_logs`` and every outbound frame of the container need
``read``. A socket without ``read`` gets only the replies to its own frames: it reads a
private queue, and its hub subscription only tells it when the container goes away.

Keep-alive: hypercorn sends a protocol ping every ``websocket.ping_interval`` seconds; a
connection that sends nothing (not even the pong) for ``ping_interval + ping_timeout``
seconds is dropped (hypercorn's ``read_timeout``, set by the server).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio
from quart import Blueprint
from quart.globals import websocket_ctx
from wsproto.utilities import LocalProtocolError

from ..containers.console import TokenBucket
from ..containers.hub import QUEUE_BYTES, Subscription
from ..converter import field_check
from ..errors import AgentError, ApiError, DockerUnavailable
from .tokens import TOKENS
from .views import AuthInfo, current_auth, describe, requires

if TYPE_CHECKING:
    from quart.wrappers import Websocket

    from ..containers import Containers, ContainerSupervisor
    from ..runtime import Agent

__all__ = [
    "DEFAULT_LOG_LINES",
    "WebSocketSettings",
    "is_command_text",
    "parse_request",
    "websocket_blueprint",
]

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_MANY = 4429
#: The permission each inbound frame kind needs (contract §12).
FRAME_PERMISSIONS = {"send_command": "console", "power": "power", "request_logs": "read"}
#: Seconds between two looks at the clock for a temporary token's expiry (the agent's
#: clock can be moved by tests, so the watch polls rather than sleeping until then).
EXPIRY_POLL = 1.0
POWER_ACTIONS = frozenset({"start", "kill", "restart", "stop"})
DEFAULT_LOG_LINES = 100


@attrs.frozen
class WebSocketSettings:
    """Config section ``websocket`` (contract §8)."""

    max_sockets_per_container: int = attrs.field(
        default=30, validator=field_check(lambda v: v >= 1, "must be >= 1")
    )
    #: Inbound frames above this size (characters) close the socket with 1009.
    max_frame_bytes: int = attrs.field(
        default=32768, validator=field_check(lambda v: v >= 256, "must be >= 256")
    )
    #: Inbound frames per second, with bursts of ``burst``.
    rate: float = attrs.field(default=10.0, validator=field_check(lambda v: v > 0, "must be > 0"))
    burst: int = attrs.field(default=20, validator=field_check(lambda v: v >= 1, "must be >= 1"))
    #: The outbound queue of one socket, in frames and in characters of JSON.
    queue_frames: int = attrs.field(
        default=256, validator=field_check(lambda v: v >= 4, "must be >= 4")
    )
    queue_bytes: int = attrs.field(
        default=QUEUE_BYTES, validator=field_check(lambda v: v >= 65536, "must be >= 65536")
    )
    #: Open sockets one temporary token may hold at once, all containers together (the
    #: master token is not capped: the panel holds one per server it shows).
    max_sockets_per_token: int = attrs.field(
        default=10, validator=field_check(lambda v: v >= 1, "must be >= 1")
    )
    #: Seconds between protocol pings; a client silent for ``ping_interval +
    #: ping_timeout`` seconds is dropped. Applied at start (hypercorn's settings).
    ping_interval: float = attrs.field(
        default=25.0, validator=field_check(lambda v: 0 < v <= 3600, "must be in (0, 3600]")
    )
    ping_timeout: float = attrs.field(
        default=35.0, validator=field_check(lambda v: 0 < v <= 3600, "must be in (0, 3600]")
    )


def _message(text: str) -> dict[str, str]:
    return {"event": "daemon_message", "data": text}


def _line_count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return value if isinstance(value, int) and value > 0 else None


def _first(args: Any) -> Any:
    """The argument of an [alias] frame: ``["x"]`` or a bare ``"x"``."""
    if isinstance(args, list):
        return args[0] if args else None
    return args


def is_command_text(value: str) -> bool:
    """Encodable text without NUL (a lone surrogate cannot reach the server's stdin)."""
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_request(message: str | bytes) -> tuple[str, Any] | None:
    """An inbound frame → ``(kind, argument)``; ``None`` when malformed or unknown.

    Kinds: ``send_command`` (text), ``power`` (action), ``request_logs`` (line count).
    Accepts the contract's frames and the [alias] forms ``{"send_command": ["cmd"]}``,
    ``{"power": ["start"]}`` and ``{"logs": ["50"]}``.
    """
    if not isinstance(message, str):
        return None
    try:
        data = json.loads(message)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if "event" in data:
        event, command, action = data["event"], data.get("command"), data.get("action")
        lines: Any = data.get("lines", DEFAULT_LOG_LINES)
    elif len(data) == 1:
        ((event, args),) = data.items()
        command = action = _first(args)
        lines = DEFAULT_LOG_LINES if args in ([], None) else _first(args)
        event = "request_logs" if event == "logs" else event
    else:
        return None
    if not isinstance(event, str):
        return None
    if event == "send_command" and isinstance(command, str) and is_command_text(command):
        return "send_command", command
    if event == "power" and isinstance(action, str) and action in POWER_ACTIONS:
        return "power", action
    if event == "request_logs" and (count := _line_count(lines)) is not None:
        return "request_logs", count
    return None


def websocket_settings(agent: Agent) -> WebSocketSettings:
    return agent.config.section_or_default(WebSocketSettings)


def read_timeout(agent: Agent) -> int:
    """Seconds the server lets a connection go without receiving anything before it drops
    it (a WebSocket client that stopped answering pings). It holds for every connection,
    streamed responses included: a stream whose client sends nothing (Server-Sent Events)
    must end before it, and the client reconnects."""
    settings = websocket_settings(agent)
    return int(settings.ping_interval + settings.ping_timeout + 0.999)


def status_of(supervisor: ContainerSupervisor) -> str:
    """The [ext] ``status`` on connect: the install state until installed, then the run state."""
    install = supervisor.record.install_state
    return install if install in ("installing", "failed") else supervisor.state


class Session:
    """One client connection to one container."""

    def __init__(
        self,
        agent: Agent,
        supervisor: ContainerSupervisor,
        ws: Websocket,
        auth: AuthInfo,
        settings: WebSocketSettings,
        revoked: trio.Event | None = None,
    ) -> None:
        self.agent = agent
        self.supervisor = supervisor
        self.ws = ws
        self.auth = auth
        self.settings = settings
        #: Set when the temporary token is revoked (``None``: master / auth disabled).
        self.revoked = revoked
        self.bucket = TokenBucket(settings.rate, settings.burst, trio.current_time())

    async def serve(self) -> None:
        hub = self.supervisor.hub
        settings = self.settings
        reads = self.auth.may("read")
        # Without ``read`` the hub subscription is only a sign of the container's end.
        size = settings.queue_frames if reads else 4
        with hub.subscribe(
            size, max_bytes=settings.queue_bytes if reads else None, paced=reads
        ) as hub_sub:
            sub = hub_sub if reads else Subscription(settings.queue_frames, settings.queue_bytes)
            if reads:
                sub.put({"event": "status", "data": status_of(self.supervisor)})
                if hub.last_stats is not None and self.supervisor.state != "offline":
                    sub.put(hub.last_stats)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send, sub, nursery.cancel_scope)
                if not reads:
                    nursery.start_soon(self._follow_end, hub_sub, sub)
                if self.revoked is not None:
                    nursery.start_soon(self._watch_token, sub, self.revoked)
                await self._receive(sub)

    async def _follow_end(self, hub_sub: Subscription, sub: Subscription) -> None:
        """Drop the hub's frames (no ``read``); end the socket when the container goes."""
        while True:
            try:
                await hub_sub.receive()
            except trio.EndOfChannel:
                break
        if sub.close_code is None:
            sub.close()

    async def _send(self, sub: Subscription, done: trio.CancelScope) -> None:
        """The socket's only writer: queued frames, then the close."""
        try:
            while True:
                try:
                    frame = await sub.receive()
                except trio.EndOfChannel:
                    break
                await self.ws.send(frame.text)
            await self.ws.close(sub.close_code or CLOSE_NORMAL)
        except LocalProtocolError:
            pass  # the server closed already (an oversized frame) or the client did
        done.cancel()

    async def _watch_token(self, sub: Subscription, revoked: trio.Event) -> None:
        """End the socket with 4001 when its temporary token is revoked or expires (the
        agent's clock can be moved by tests, so expiry is polled; revocation is an event)."""
        expires_at = self.auth.expires_at if self.auth.expires_at is not None else float("inf")
        while (left := expires_at - self.agent.clock()) > 0:
            with trio.move_on_after(min(left, EXPIRY_POLL)):
                await revoked.wait()
            if revoked.is_set():
                sub.finish(CLOSE_TOKEN_EXPIRED, _message("Token revoked"))
                return
        sub.finish(CLOSE_TOKEN_EXPIRED, _message("Token expired"))

    async def _receive(self, sub: Subscription) -> None:
        while True:
            message = await self.ws.receive()
            if len(message) > self.settings.max_frame_bytes:
                # Hypercorn refuses these before buffering them (runtime.py); this catches
                # a limit lowered by a config reload.
                sub.finish(CLOSE_TOO_BIG)
                await trio.sleep_forever()  # the sender closes, then cancels us
            if not self.bucket.take(1, trio.current_time()):
                sub.put(_message("Error: Rate limit exceeded"))
                continue
            request = parse_request(message)
            if request is None:
                sub.put(_message("Error: Invalid message"))
                continue
            kind, argument = request
            permission = FRAME_PERMISSIONS[kind]
            if not self.auth.may(permission):
                sub.put(_message(f"Error: Token lacks permission: {permission}"))
                continue
            if kind == "send_command":
                await self._command(sub, argument)
            elif kind == "power":
                self._power(sub, argument)
            else:
                sub.put(self.supervisor.hub.logs(argument))

    async def _command(self, sub: Subscription, text: str) -> None:
        try:
            await self.supervisor.send_command(text)
        except ApiError as exc:
            sub.put(_message(f"Error: {exc.message}"))
        except AgentError:
            sub.put(_message("Error: Container is not running"))

    def _power(self, sub: Subscription, action: str) -> None:
        try:
            if not self.agent.docker.available:
                raise DockerUnavailable()
            self.supervisor.submit(action)
        except ApiError as exc:
            sub.put(_message(f"Error: {exc.message}"))


def websocket_blueprint(agent: Agent, containers: Containers) -> Blueprint:
    """The ``/ws/<internal_id>`` route, for the containers plugin to declare."""
    bp = Blueprint("websocket", __name__)
    #: Open sockets per container (the ``max_sockets_per_container`` cap).
    sockets: dict[str, int] = {}
    registry = agent.stash[TOKENS]

    @bp.websocket("/ws/<internal_id>")
    @describe(
        "The container's console, stats and events (WebSocket)",
        description=(
            "Upgrade with the token as ``?token=`` (no headers needed). Frames in: "
            '``{"event":"send_command","command":"..."}`` (console), '
            '``{"event":"power","action":"start|stop|restart|kill"}`` (power), '
            '``{"event":"request_logs","lines":100}`` (read). Frames out: ``status``, '
            "``console``, ``stats``, ``event``, ``daemon_message``, ``logs`` (contract §8), "
            "[ext] ``job`` (a job of the container or of its volume, contract §14). "
            "Close 4001: token expired or revoked; 4429: too many connections; 1009: frame "
            "too big."
        ),
        responses={101: None},
        tags=("containers",),
    )
    @requires(None)  # checked frame by frame
    async def container_socket(internal_id: str) -> None:
        supervisor = containers.get(internal_id)  # 404 before the upgrade
        settings = websocket_settings(agent)
        auth = current_auth()
        ws: Websocket = websocket_ctx.websocket
        await ws.accept()
        if sockets.get(internal_id, 0) >= settings.max_sockets_per_container:
            await ws.close(CLOSE_TOO_MANY, "Too many connections")
            return
        watch: contextlib.AbstractContextManager[trio.Event | None] = contextlib.nullcontext()
        if auth.token_id is not None:
            if registry.sockets(auth.token_id) >= settings.max_sockets_per_token:
                await ws.close(CLOSE_TOO_MANY, "Too many connections for this token")
                return
            if registry.find(auth.token_id) is None:  # revoked while connecting
                await ws.close(CLOSE_TOKEN_EXPIRED, "Token revoked")
                return
            # no await since the checks: the count and the revocation check hold
            watch = registry.watch(auth.token_id)
        sockets[internal_id] = sockets.get(internal_id, 0) + 1
        try:
            with watch as revoked:
                await Session(agent, supervisor, ws, auth, settings, revoked).serve()
        finally:
            sockets[internal_id] -= 1
            if not sockets[internal_id]:
                del sockets[internal_id]

    return bp
