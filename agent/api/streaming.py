"""Request bodies streamed to a view in chunks, with back-pressure (uploads of any size).

Quart reads a request body on its own task and appends every chunk to a buffer the view
drains; it never waits for the view, so a client faster than the disk would fill the
agent's memory, and Quart's only guard is ``MAX_CONTENT_LENGTH`` on that buffer. For the
views marked ``streams_body``, an ASGI wrapper (``body_flow``) makes Quart's reading task
wait instead: it receives nothing until the view starts reading (``body_chunks``), then at
most ``HIGH_WATER`` bytes ahead of what the view has taken. The server then stops reading
the socket and TCP slows the client down. When the view returns without reading the body
(an error answered first, or a request refused before its view ran), the gate opens
when the answer is ready and Quart handles the rest as for any request.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestTimeout

__all__ = ["HIGH_WATER", "body_chunks", "body_flow", "streams_body"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]

#: Bytes received ahead of the view, at most (plus one network read, 64 KiB).
HIGH_WATER = 2 << 20
#: Bytes a streaming view gets at once (unless the body ends first).
BATCH = 1 << 20
#: Seconds a streaming view waits for the next bytes of a body before answering 408.
IDLE_TIMEOUT = 60.0

STREAMS_ATTR = "_lightd_streams_body"
_GATE = "lightd.body_gate"


class BodyGate:
    """Holds Quart's body reader: ``wait`` (nothing read yet), ``stream`` (at most
    ``HIGH_WATER`` ahead of the view), ``free`` (Quart's own behaviour). While streaming it
    also wakes the view only once ``BATCH`` bytes (or the end) are there, not for every
    network read: fewer task switches and bigger writes."""

    def __init__(self) -> None:
        self.state = "wait"
        self.buffered = 0
        self.finished = False
        self._changed = trio.Event()
        self._ready = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def receive(self, receive: ASGIReceiveCallable) -> ASGIReceiveEvent:
        while self.state == "wait" or (self.state == "stream" and self.buffered >= HIGH_WATER):
            await self._changed.wait()
        message = await receive()
        if message["type"] == "http.request":
            self.buffered += len(message.get("body", b""))
            self.finished = not message.get("more_body", False)
        else:
            self.finished = True  # the client went
        if self.finished or self.buffered >= BATCH:
            self._ready.set()
        return message

    async def ready(self) -> None:
        """Wait until ``BATCH`` bytes are buffered or the body is over."""
        while not (self.finished or self.buffered >= BATCH):
            self._ready = trio.Event()
            await self._ready.wait()

    def start(self) -> None:
        self.state = "stream"
        self._wake()

    def consumed(self, n: int) -> None:
        self.buffered -= n
        if self.buffered < HIGH_WATER:
            self._wake()

    def release(self) -> None:
        self.state = "free"
        self._wake()


def streams_body(view: F) -> F:
    """Mark a view that reads its body with ``body_chunks`` (put it right above the
    function, below ``describe``/``requires``)."""
    setattr(view, STREAMS_ATTR, True)
    return view


def _gate() -> BodyGate | None:
    gate = request.scope.get(_GATE)
    return gate if isinstance(gate, BodyGate) else None


async def body_chunks() -> AsyncIterator[bytes]:
    """The request body in chunks as they arrive, not bound by ``server.max_body_bytes``
    (the view enforces its own limit); 408 when the client stalls for ``IDLE_TIMEOUT``.
    Use it once, in a view marked ``streams_body``."""
    body = request.body
    # Quart's cap on its buffer (and the 413 it decided from Content-Length before the
    # view ran) is replaced by the gate's bound: nothing was buffered while it waited.
    body._max_content_length = None
    body._must_raise = None
    gate = _gate()
    if gate is not None:
        gate.start()
    iterator = body.__aiter__()
    while True:
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            if gate is not None:
                await gate.ready()
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
        if idle.cancelled_caught:
            raise RequestTimeout()
        if gate is not None:
            gate.consumed(len(chunk))
        yield chunk


def body_flow(app: QuartTrio, asgi: ASGIApp) -> ASGIApp:
    """Wrap ``asgi`` (Quart's ``asgi_app``): requests routed to a ``streams_body`` view
    get a ``BodyGate`` in front of their ``receive``."""
    marked: set[str] | None = None

    def streaming(scope: HTTPScope) -> bool:
        nonlocal marked
        if marked is None:
            marked = {
                name for name, fn in app.view_functions.items() if getattr(fn, STREAMS_ATTR, 0)
            }
        if not marked:
            return False
        try:
            endpoint, _ = app.url_map.bind("lightd").match(scope["path"], method=scope["method"])
        except HTTPException:
            return False
        return endpoint in marked

    @app.after_request
    async def open_gate(response: Response) -> Response:
        # Registered after the app's own hooks, so it runs before them (Quart runs them in
        # reverse): the gate opens before anything drains an unread body (a request
        # refused before its view read it), which would otherwise wait forever.
        gate = _gate()
        if gate is not None:
            gate.release()
        return response

    async def front(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["method"] in ("PUT", "POST") and streaming(scope):
            gate = BodyGate()
            scope[_GATE] = gate  # type: ignore[literal-required]
            await asgi(scope, functools.partial(gate.receive, receive), send)
            return
        await asgi(scope, receive, send)

    return front
