"""The per-container event hub: one producer side, many bounded subscribers.

Everything a container says (console lines, state events, daemon messages, stats) is
published here once; each subscriber (a WebSocket client, a test) owns a bounded queue.
A subscriber that cannot keep up loses frames and is told so once; it never blocks the
producer or the other subscribers. The hub also keeps the recent console history.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

__all__ = ["EventHub", "Subscription"]

Frame = dict[str, Any]


class Subscription:
    """One subscriber's queue; iterate ``receive`` to get frames in order."""

    def __init__(self, size: int) -> None:
        self._send, self._receive = trio.open_memory_channel[Frame](size)
        #: Frames dropped because the subscriber was too slow.
        self.dropped = 0
        self._lagging = False

    def _offer(self, frame: Frame) -> None:
        try:
            self._send.send_nowait(frame)
        except trio.WouldBlock:
            self.dropped += 1
            self._lagging = True
        else:
            self._lagging = False

    async def receive(self) -> Frame:
        return await self._receive.receive()

    def receive_nowait(self) -> Frame:
        return self._receive.receive_nowait()

    def close(self) -> None:
        self._send.close()


class EventHub:
    def __init__(self, *, history_lines: int = 1000, queue_size: int = 256) -> None:
        self._subscribers: set[Subscription] = set()
        self.history: collections.deque[str] = collections.deque(maxlen=history_lines)
        self.queue_size = queue_size

    def publish(self, frame: Frame) -> None:
        for subscription in self._subscribers:
            subscription._offer(frame)

    def console(self, lines: list[str]) -> None:
        """Record complete lines (each ending with ``\\n``) and publish them as one frame."""
        if not lines:
            return
        self.history.extend(lines)
        self.publish({"event": "console", "data": "".join(lines)})

    def event(self, name: str) -> None:
        self.publish({"event": "event", "data": name})

    def message(self, text: str) -> None:
        self.publish({"event": "daemon_message", "data": text})

    @contextmanager
    def subscribe(self, size: int | None = None) -> Iterator[Subscription]:
        subscription = Subscription(size or self.queue_size)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            subscription.close()

    def close(self) -> None:
        """The container is gone: end every subscription."""
        for subscription in list(self._subscribers):
            subscription.close()
        self._subscribers.clear()

    def __len__(self) -> int:
        return len(self._subscribers)
