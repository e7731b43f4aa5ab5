"""The per-container event hub: one producer side, many bounded subscribers.

Everything a container says (console lines, state events, daemon messages, stats) is
published here once; each subscriber (a WebSocket client, a test) owns a bounded queue,
measured in frames and in characters: its budget. Frames are shared, not copied: the JSON
text of a frame is built once (``Frame.text``) and every queue holds the same object, so
subscribers that are close to each other cost the agent one budget between them, not one
each. A subscriber that cannot keep up loses console and stats frames, and is told so once
per episode (``Console output throttled``); it never blocks the producer or the other
subscribers. Events and messages get a second allowance of the same size before they too
are dropped, so a lagging client still learns about state changes. The hub also owns the
container's console pipeline (history, throttle, coalescing: see ``console.py``) and the
last stats frame, for clients that connect later.

Pacing (``pace``): the console reader calls it after each chunk of output. When a paced
subscriber (a WebSocket client) that keeps up has more than half its budget queued, the
reader waits for it to drain to a quarter before it reads on, rather than racing ahead and
making it lose lines because it was a few milliseconds behind: Docker holds the server's
output meanwhile, as it does for any attach reader. Two bounds keep a client from slowing
the server:

- a waited-for subscriber that takes no frame for ``STALL_SECONDS`` while the others take
  some (or for ``STALL_MAX_SECONDS`` whatever the others do) is *behind*: nobody waits for
  it any more (it loses frames past its budget) until it has caught up (a quarter of its
  budget queued or less). Clients that stop reading cost the others one such wait per
  episode, all of them together; a pause of the whole machine marks nobody;
- the reader is held at most ``console.hold_share`` of the time (0, pacing off, unless
  config asks for it: holding the reader holds the server once Docker's 1 MB attach buffer
  is full, and §8 promises no client slows the server),
  with bursts of up to ``HOLD_BURST`` seconds: a client that reads slower than that loses
  frames rather than slowing the server further.
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
#: Characters of JSON one subscriber's queue holds (config ``websocket.queue_bytes``): the
#: queues share their frames, so clients near each other cost about one budget in all.
QUEUE_BYTES = 4 * 1024 * 1024
#: A waited-for subscriber that takes no frame for this long while the others took at
#: least ``STALL_PEER_FRAMES`` between them is behind, and so is one that takes none for
#: ``STALL_MAX_SECONDS`` whatever the others do (see ``pace``).
STALL_SECONDS = 0.05
STALL_PEER_FRAMES = 4
STALL_MAX_SECONDS = 0.5
#: The longest hold of the console reader in one go (a token bucket of seconds, filled at
#: ``console.hold_share``).
HOLD_BURST = 2.0


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
        *,
        hub: EventHub | None = None,
    ) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        #: The hub whose console reader waits for this subscriber (None: nobody waits).
        self._hub = hub
        #: Over half the budget queued, and waited for (in the hub's ``_full``).
        self._full = False
        #: Behind: not waited for until it has caught up (see ``EventHub.pace``).
        self.behind = False
        #: Frames taken so far, and what ``pace`` last saw of it: (frames taken, since
        #: when that count has not moved, the frames all paced subscribers had taken then).
        self.taken = 0
        self._watch: tuple[int, float, int] | None = None
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
        if self._bytes > self.peak_bytes:
            self.peak_bytes = self._bytes
        if (
            self._hub is not None
            and not self._full
            and not self.behind
            and (2 * self._bytes > self.max_bytes or 2 * len(self._queue) > self.max_frames)
        ):
            self._full = True
            self._watch = None
            self._hub._full.add(self)
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
        self.fall_behind()
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
        self.taken += 1
        if not self._queue:
            self._noticed = False  # caught up: a later loss is a new episode
        hub = self._hub
        if hub is not None:
            hub._taken += 1
            # Drained to a quarter (not just under half: the reader then goes on for a
            # while rather than one chunk at a time): the producer need not wait for it.
            if (self._full or self.behind) and (
                4 * self._bytes <= self.max_bytes and 4 * len(self._queue) <= self.max_frames
            ):
                self.behind = False  # caught up: waited for again
                if self._full:
                    self._full = False
                    hub._full.discard(self)
                    if hub._progress is not None:
                        hub._progress.set()
        return frame

    def fall_behind(self) -> None:
        """Stop holding the producer for this subscriber until it has caught up."""
        self.behind = True
        if self._full:
            self._full = False
            hub = self._hub
            if hub is not None:
                hub._full.discard(self)
                if hub._progress is not None:
                    hub._progress.set()

    def close(self) -> None:
        self._closed = True
        self.fall_behind()
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
        #: Paced subscribers with over half their budget queued (see ``pace``).
        self._full: set[Subscription] = set()
        #: Set while ``pace`` waits, when a subscriber it waits for drains or falls behind.
        self._progress: trio.Event | None = None
        #: Frames taken by all paced subscribers so far.
        self._taken = 0
        #: Seconds the console reader may still be held (a token bucket, see ``pace``).
        self._hold = HOLD_BURST
        self._hold_at: float | None = None
        #: The server has exited: no pacing until it starts again (see ``release``).
        self._released = False
        #: Seconds the console reader was held so far, and subscribers found behind.
        self.held = 0.0
        self.fell_behind = 0

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

    async def pace(self) -> None:
        """Wait while a paced subscriber that keeps up has over half its budget queued
        (see the module docstring); returns at once otherwise."""
        if not self._full or self._released:
            return
        share = self._console.settings.hold_share
        start = trio.current_time()
        if self._hold_at is not None:
            self._hold = min(HOLD_BURST, self._hold + (start - self._hold_at) * share)
        self._hold_at = start
        if self._hold <= 0 or not share:
            return
        deadline = start + self._hold
        now = start
        try:
            while self._full and now < deadline and not self._released:
                wake = deadline
                # Some reader has drained and waits for output: the others are not held
                # up by a pause of the whole machine.
                drained = any(
                    sub._hub is not None and not sub._full and not sub.behind
                    for sub in self._subscribers
                )
                for sub in list(self._full):
                    taken, since, everyone = sub._watch or (sub.taken, now, self._taken)
                    if sub.taken != taken:
                        taken, since, everyone = sub.taken, now, self._taken
                    peers = drained or self._taken - everyone >= STALL_PEER_FRAMES
                    stall = STALL_SECONDS if peers else STALL_MAX_SECONDS
                    if sub.taken == taken and now - since >= stall:
                        # Stuck while the others read on (or for long): a client that
                        # stopped reading, not a hiccup of the whole machine.
                        sub.fall_behind()
                        self.fell_behind += 1
                        continue
                    sub._watch = (taken, since, everyone)
                    wake = min(wake, since + stall)
                if not self._full:
                    break
                self._progress = trio.Event()
                with trio.move_on_at(wake):
                    await self._progress.wait()
                now = trio.current_time()
        finally:
            self._progress = None
            held = trio.current_time() - start
            self._hold -= held
            self.held += held

    def release(self) -> None:
        """The server has exited: its last lines are read at once, not paced (the
        supervisor waits for them only briefly, and the history must have them), until
        the next ``starting`` event."""
        self._released = True
        if self._progress is not None:
            self._progress.set()

    @property
    def retained_bytes(self) -> int:
        """Characters of the frames the subscribers' queues hold, each frame once (they
        share the frames): what the queues cost the agent."""
        frames = {id(f): f.size for sub in self._subscribers for f in sub._queue}
        return sum(frames.values())

    def event(self, name: str) -> None:
        if name == "starting":
            self._released = False
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
        self, size: int | None = None, *, max_bytes: int | None = None, paced: bool = False
    ) -> Iterator[Subscription]:
        """A subscription; ``paced``: the console reader waits for it while it keeps up
        (a client reading the console), rather than only dropping what it cannot hold."""
        subscription = Subscription(
            size or self.queue_frames,
            max_bytes or self.queue_bytes,
            self.counts,
            hub=self if paced else None,
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
