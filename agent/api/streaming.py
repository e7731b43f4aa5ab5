"""Request bodies streamed to a view in chunks, with back-pressure (uploads of any size).

Quart reads a request body on its own task and appends every chunk to a buffer the view
drains; it never waits for the view, so a client faster than the disk would fill the
agent's memory, and Quart's only guard is ``MAX_CONTENT_LENGTH`` on that buffer. For the
views marked ``streams_body``, an ASGI wrapper (``body_flow``) puts a ``BodyGate`` in front
of Quart's reading task: it receives nothing until the view starts reading
(``body_chunks``), then keeps the server's chunks itself, at most ``HIGH_WATER`` bytes
ahead of what the view has taken, and hands them to the view in batches of about
``BATCH`` bytes (the server then stops reading the socket and TCP slows the client down).
The chunks never pass through Quart's buffer: no copy into it and out of it, and the view
can write a batch with one ``writev``. Quart only sees the end of the body (empty) or the
client going. When the view returns without reading the body (an error answered first,
or a request refused before its view ran), the gate opens when the answer is ready and
Quart handles the rest as for any request.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    HTTPRequestEvent,
    HTTPScope,
    Scope,
)
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestTimeout

__all__ = ["BATCH", "HIGH_WATER", "body_batches", "body_chunks", "body_flow", "streams_body"]

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
    """Holds Quart's body reader: ``wait`` (nothing read yet), ``stream`` (the server's
    chunks kept here for the view, at most ``HIGH_WATER`` ahead of it), ``free`` (Quart's
    own behaviour). While streaming it wakes the view only once ``BATCH`` bytes (or the
    end) are there, not for every network read: fewer task switches and bigger writes."""

    def __init__(self) -> None:
        self.state = "wait"
        self.buffered = 0
        self.finished = False  # the whole body is here
        self.gone = False  # the client went before the end of the body
        self._chunks: deque[bytes] = deque()
        self._heard = 0.0  # when the last bytes came (trio clock)
        self._changed = trio.Event()
        self._ready = trio.Event()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def receive(self, receive: ASGIReceiveCallable) -> ASGIReceiveEvent:
        """Quart's ``receive``: while streaming, the body's chunks stay here and Quart gets
        only the end of the body (empty) or the client's going."""
        while True:
            while self.state == "wait" or (self.state == "stream" and self.buffered >= HIGH_WATER):
                await self._changed.wait()
            message = await receive()
            if self.state != "stream":
                return message  # free: Quart's own behaviour (the view is not reading)
            if message["type"] != "http.request":
                self.gone = not self.finished  # http.disconnect before the end of the body
                self._ready.set()
                return message
            body = message.get("body", b"")
            if body:
                self._chunks.append(body)
                self.buffered += len(body)
                self._heard = trio.current_time()
            if not message.get("more_body", False):
                self.finished = True
                self._ready.set()
                end: HTTPRequestEvent = {"type": "http.request", "body": b"", "more_body": False}
                return end  # Quart's body: complete, and empty
            if self.buffered >= BATCH:
                self._ready.set()

    async def take(self) -> list[bytes]:
        """The chunks received so far, once there are ``BATCH`` bytes or the body is over
        (``[]`` at its end); ``ClientDisconnected`` when the client went first,
        ``RequestTimeout`` when no byte came for ``IDLE_TIMEOUT`` (a slow client that
        keeps sending is not idle, however long a batch takes it)."""
        while not (self.finished or self.gone or self.buffered >= BATCH):
            self._ready = trio.Event()
            with trio.move_on_at(self._heard + IDLE_TIMEOUT):
                await self._ready.wait()
            if trio.current_time() >= self._heard + IDLE_TIMEOUT:
                raise RequestTimeout()
        if self.gone:
            raise ClientDisconnected()
        batch = list(self._chunks)
        self._chunks.clear()
        was_full = self.buffered >= HIGH_WATER
        self.buffered = 0
        if was_full:
            self._wake()
        return batch

    def start(self) -> None:
        self.state = "stream"
        self._heard = trio.current_time()
        self._wake()

    def release(self) -> None:
        self.state = "free"
        self._chunks.clear()  # what the view did not take is not wanted any more
        self.buffered = 0
        self._wake()


def streams_body(view: F) -> F:
    """Mark a view that reads its body with ``body_chunks`` or ``body_batches`` (put it
    right above the function, below ``describe``/``requires``)."""
    setattr(view, STREAMS_ATTR, True)
    return view


def _gate() -> BodyGate | None:
    gate = request.scope.get(_GATE)
    return gate if isinstance(gate, BodyGate) else None


async def body_batches() -> AsyncIterator[list[bytes]]:
    """The request body as lists of the server's chunks, about ``BATCH`` bytes a list (the
    last may be shorter), uncopied: write one with ``os.writev``. Not bound by
    ``server.max_body_bytes`` (the view enforces its own limit); 408 when the client stalls
    for ``IDLE_TIMEOUT``; ``ClientDisconnected`` (400) when it goes before the end of the
    body. Use it once, in a view marked ``streams_body``."""
    gate = _gate()
    if gate is None:  # not behind body_flow (an app without it): Quart's buffer
        async for chunk in _quart_chunks():
            yield [chunk]
        return
    gate.start()
    while batch := await gate.take():
        yield batch


async def body_chunks() -> AsyncIterator[bytes]:
    """The request body in chunks of about ``BATCH`` bytes as they arrive, not bound by
    ``server.max_body_bytes`` (the view enforces its own limit); 408 when the client stalls
    for ``IDLE_TIMEOUT``. Use it once, in a view marked ``streams_body``."""
    async for batch in body_batches():
        yield batch[0] if len(batch) == 1 else b"".join(batch)


async def _quart_chunks() -> AsyncIterator[bytes]:
    body = request.body
    # Quart's cap on its buffer (and the 413 it decided from Content-Length before the
    # view ran) is not the view's limit.
    body._max_content_length = None
    body._must_raise = None
    iterator = body.__aiter__()
    while True:
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
        if idle.cancelled_caught:
            raise RequestTimeout()
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
