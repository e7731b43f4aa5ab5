"""The container WebSocket of contract §8: ``/ws/<internal_id>?token=<token>``.

Auth, origin and single-use tokens are checked before the upgrade by the app's
``before_websocket`` (a refused token is an HTTP 401, a foreign origin a 403); an unknown
container is an HTTP 404 from the view, also before the upgrade.

A connection is a subscriber of the container's event hub plus three tasks in one
nursery: the sender (the socket's only writer, draining the subscription's bounded queue,
so a slow client only ever delays itself), the receiver (inbound frames, rate-limited,
handled one at a time) and, for temporary tokens, the expiry watch. Every close goes
through the sender: the subscription is ``finish``-ed with a close code and the last
frames to send (``Token expired`` before 4001), so no frame is ever written after a close.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import attrs
import trio
from quart import Blueprint
from quart.globals import websocket_ctx
from wsproto.utilities import LocalProtocolError

from ..containers.console import TokenBucket
from ..converter import field_check
from ..errors import AgentError, ApiError, DockerUnavailable
from .views import AuthInfo, current_auth

if TYPE_CHECKING:
    from quart.wrappers import Websocket

    from ..containers import Containers, ContainerSupervisor, Subscription
    from ..runtime import Agent

__all__ = ["WebSocketSettings", "parse_request", "websocket_blueprint"]

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_TOO_BIG = 1009
CLOSE_TOKEN_EXPIRED = 4001
CLOSE_TOO_MANY = 4429
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
        default=1024 * 1024, validator=field_check(lambda v: v >= 65536, "must be >= 65536")
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
    if event == "send_command" and isinstance(command, str):
        return "send_command", command
    if event == "power" and isinstance(action, str) and action in POWER_ACTIONS:
        return "power", action
    if event == "request_logs" and (count := _line_count(lines)) is not None:
        return "request_logs", count
    return None


def websocket_settings(agent: Agent) -> WebSocketSettings:
    return agent.config.section_or_default(WebSocketSettings)


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
    ) -> None:
        self.agent = agent
        self.supervisor = supervisor
        self.ws = ws
        self.auth = auth
        self.settings = settings
        self.bucket = TokenBucket(settings.rate, settings.burst, trio.current_time())

    async def serve(self) -> None:
        hub = self.supervisor.hub
        settings = self.settings
        with hub.subscribe(settings.queue_frames, max_bytes=settings.queue_bytes) as sub:
            sub.put({"event": "status", "data": status_of(self.supervisor)})
            if hub.last_stats is not None and self.supervisor.state != "offline":
                sub.put(hub.last_stats)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send, sub, nursery.cancel_scope)
                if self.auth.expires_at is not None:
                    nursery.start_soon(self._expire, sub, self.auth.expires_at)
                await self._receive(sub)

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

    async def _expire(self, sub: Subscription, expires_at: float) -> None:
        while (left := expires_at - self.agent.clock()) > 0:  # noqa: ASYNC110 - a clock, no event
            await trio.sleep(min(left, EXPIRY_POLL))
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

    @bp.websocket("/ws/<internal_id>")
    async def container_socket(internal_id: str) -> None:
        supervisor = containers.get(internal_id)  # 404 before the upgrade
        settings = websocket_settings(agent)
        auth = current_auth()
        ws: Websocket = websocket_ctx.websocket
        await ws.accept()
        if sockets.get(internal_id, 0) >= settings.max_sockets_per_container:
            await ws.close(CLOSE_TOO_MANY, "Too many connections")
            return
        sockets[internal_id] = sockets.get(internal_id, 0) + 1
        try:
            await Session(agent, supervisor, ws, auth, settings).serve()
        finally:
            sockets[internal_id] -= 1
            if not sockets[internal_id]:
                del sockets[internal_id]

    return bp
