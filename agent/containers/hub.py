"""The per-container event hub: one producer side, many bounded subscribers.

Everything a container says (console lines, state events, daemon messages, stats) is
published here once; each subscriber (a WebSocket client, a test) owns a bounded queue,
measured in frames and in characters. A subscriber that cannot keep up loses console and
stats frames, and is told so once per episode (``Console output throttled``); it never
blocks the producer or the other subscribers. Events and messages get a second allowance
of the same size before they too are dropped, so a lagging client still learns about
state changes. The hub also owns the container's console pipeline (history, throttle,
coalescing: see ``console.py``) and the last stats frame, for clients that connect later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from ..config import Config
from ..metrics import ConsoleCounts
from .console import THROTTLED, Console, ConsoleSettings, Frame, History

__all__ = ["CLOSE_SERVICE_RESTART", "EventHub", "Frame", "Subscription"]

#: WebSocket close code of subscriptions ended because the containers service restarted
#: (RFC 6455's "Service Restart"): the client reconnects to the new supervisor.
CLOSE_SERVICE_RESTART = 1012

#: Frames a slow subscriber may lose (the next ones replace them).
DROPPABLE = frozenset({"console", "stats"})
QUEUE_FRAMES = 256
QUEUE_BYTES = 1024 * 1024


class Subscription:
    """One subscriber's queue; ``receive`` returns frames in order.

    Bounded by ``max_frames`` and ``max_bytes`` (characters of JSON): a full queue drops
    console and stats frames (with one ``Console output throttled`` notice until the
    subscriber has caught up), other frames past twice the bounds.
    """

    def __init__(
        self,
        max_frames: int = QUEUE_FRAMES,
        max_bytes: int = QUEUE_BYTES,
        counts: ConsoleCounts | None = None,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: The agent's console totals (metrics), told of every frame dropped here.
        self._counts = counts
        self._queue: deque[Frame] = deque()
        self._bytes = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._noticed = False
        #: Frames dropped because the subscriber was too slow.
        self.dropped = 0
        #: The most characters this queue ever held (tests check the bound).
        self.peak_bytes = 0
        #: Why the subscription ended, for the WebSocket's close frame (None: normally).
        self.close_code: int | None = None

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._queue)

    def _push(self, frame: Frame) -> None:
        self._queue.append(frame)
        self._bytes += frame.size
        self.peak_bytes = max(self.peak_bytes, self._bytes)
        self._lot.unpark_all()

    def offer(self, frame: Frame) -> None:
        """A published frame: queued, or dropped when the subscriber lags."""
        if self._closed:
            return
        size = frame.size
        if self._queue:
            frames, total = len(self._queue), self._bytes + size
            if frame["event"] in DROPPABLE:
                full = frames >= self.max_frames or total > self.max_bytes
            else:
                full = frames >= 2 * self.max_frames or total > 2 * self.max_bytes
            if full:
                self.dropped += 1
                if self._counts is not None:
                    self._counts.dropped_frames += 1
                if not self._noticed:
                    self._noticed = True
                    self._push(Frame(event="daemon_message", data=THROTTLED))
                return
        self._push(frame)

    def put(self, frame: dict[str, Any] | Frame) -> None:
        """A frame for this subscriber only (a reply): queued like an event."""
        if not isinstance(frame, Frame):
            frame = Frame(frame)
        if self._closed:
            return
        if self._queue and (
            len(self._queue) >= 2 * self.max_frames or self._bytes > 2 * self.max_bytes
        ):
            self.dropped += 1
            return
        self._push(frame)

    def finish(self, code: int | None, *last: dict[str, Any]) -> None:
        """End now: what is queued is dropped, ``last`` frames are still delivered."""
        self._queue.clear()
        self._bytes = 0
        self._closed = False
        for frame in last:
            self.put(frame)
        self.close_code = code
        self.close()

    async def receive(self) -> Frame:
        """The next frame; ``trio.EndOfChannel`` once closed and drained."""
        await trio.lowlevel.checkpoint()
        while not self._queue:
            if self._closed:
                raise trio.EndOfChannel
            await self._lot.park()
        return self._pop()

    def receive_nowait(self) -> Frame:
        if not self._queue:
            raise trio.EndOfChannel if self._closed else trio.WouldBlock
        return self._pop()

    def _pop(self) -> Frame:
        frame = self._queue.popleft()
        self._bytes -= frame.size
        if not self._queue:
            self._noticed = False  # caught up: a later loss is a new episode
        return frame

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()


class EventHub:
    def __init__(
        self,
        *,
        console: ConsoleSettings | None = None,
        queue_frames: int = QUEUE_FRAMES,
        queue_bytes: int = QUEUE_BYTES,
        counts: ConsoleCounts | None = None,
    ) -> None:
        self._subscribers: set[Subscription] = set()
        #: The agent's console totals (metrics), shared by every hub; a hub of its own
        #: (tests) counts into a private one.
        self.counts = counts if counts is not None else ConsoleCounts()
        self._console = Console(self._broadcast, console or ConsoleSettings())
        self.queue_frames = queue_frames
        self.queue_bytes = queue_bytes
        #: The last stats frame published (sent to clients that connect later).
        self.last_stats: Frame | None = None
        #: The container is gone; a late subscriber gets an ended subscription.
        self.closed = False

    @property
    def history(self) -> History:
        """The last console lines (each ending with ``\\n``), throttled ones included."""
        return self._console.history

    @property
    def throttled(self) -> int:
        """Console lines the throttle kept from clients so far."""
        return self._console.throttled

    @classmethod
    def for_config(cls, config: Config, counts: ConsoleCounts | None = None) -> EventHub:
        """A hub set up from the ``console`` section, counting into ``counts``."""
        return cls(console=config.section_or_default(ConsoleSettings), counts=counts)

    def configure(self, console: ConsoleSettings) -> None:
        """Apply reloaded settings."""
        self._console.configure(console)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The console flusher (coalescing); runs in the supervisor's nursery."""
        await self._console.run(task_status=task_status)

    def _broadcast(self, frame: Frame) -> None:
        for subscription in self._subscribers:
            subscription.offer(frame)

    def publish(self, frame: dict[str, Any]) -> None:
        """Send a frame to every subscriber, after the console lines written before it."""
        self._console.flush()
        self._broadcast(frame if isinstance(frame, Frame) else Frame(frame))

    def console(self, lines: list[str]) -> None:
        """Record complete lines (each ending with ``\\n``); they go out as console frames."""
        console, counts = self._console, self.counts
        throttled = console.throttled
        console.write(lines)
        counts.lines += len(lines)
        counts.throttled += console.throttled - throttled

    def event(self, name: str) -> None:
        self.publish(Frame(event="event", data=name))

    def message(self, text: str) -> None:
        self.publish(Frame(event="daemon_message", data=text))

    def stats(self, values: dict[str, Any]) -> None:
        frame = Frame(event="stats", **values)
        self.last_stats = frame
        self.publish(frame)

    def logs(self, lines: int) -> Frame:
        """The reply to ``request_logs``: the last ``lines`` lines as one frame."""
        return Frame(event="logs", data=self._console.tail(lines))

    @contextmanager
    def subscribe(
        self, size: int | None = None, *, max_bytes: int | None = None
    ) -> Iterator[Subscription]:
        subscription = Subscription(
            size or self.queue_frames, max_bytes or self.queue_bytes, self.counts
        )
        if self.closed:
            subscription.close()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
            subscription.close()

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        return tuple(self._subscribers)

    def close(self, *, code: int | None = None) -> None:
        """The container is gone (or its supervisor is): end every subscription, with
        ``code`` as the WebSocket's close code (queued frames still arrive)."""
        self._console.flush()
        self.closed = True
        for subscription in list(self._subscribers):
            if code is not None:
                subscription.close_code = code
            subscription.close()
        self._subscribers.clear()

    def __len__(self) -> int:
        return len(self._subscribers)
