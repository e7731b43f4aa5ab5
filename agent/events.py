"""The node event stream (contract §17): one in-memory ring of the node's last events.

Why: a panel driving hundreds of servers wants **one** stream per node, and after its own
outage it wants what it missed, not a full re-read. Whoever changes something the panel
shows calls ``agent.events.publish(type, data)``: the containers manager (created), the
``events`` plugin from the core's notifications (deleted, install and runtime states,
jobs), the ``volumes`` plugin, a backups plugin (``backup.done``). The ``events`` plugin
serves the ring as Server-Sent Events (``GET /events``) and over a WebSocket
(``/ws/events``).

**Events.** Every event is ``{"seq","type","data","timestamp"}``: ``type`` one of
``EVENT_TYPES``, ``data`` a JSON object, ``timestamp`` unix seconds (milliseconds
precision). It is encoded to JSON **once**, at ``publish``; every reader sends those bytes
(the SSE frame and the WebSocket text are derived once too, on first use).

**seq.** Increases by one per event. A run's first event is numbered from the wall clock
at the agent's start, in microseconds since the epoch (about 1.7e15: still an exact
integer for JavaScript's ``Number`` until the year 2255), so a panel's ``since`` from an
earlier run is always *older* than anything this run holds and gets ``resync``, without
the store being written per event or the seq being read back at start. This holds as
long as a run publishes fewer events than the microseconds between its start and the
next run's (one million a second, sustained); a ``since`` *ahead* of the head (a
wall clock set back between runs) is answered ``resync`` as well.

**Readers.** A subscription is a cursor into the shared ring: the seq of the last event
it was given. Nothing is copied per reader, so its "queue" is bounded by the ring itself,
and a slow reader neither makes the publisher wait (``publish`` is sync: it stores the
event and wakes the waiting readers) nor costs memory: it takes the events after its
cursor in batches (at most ``BATCH_EVENTS`` events and ``BATCH_BYTES`` bytes) whenever it
is ready. A reader that falls behind replays from the ring and loses nothing still in it.
One the ring has moved past (its cursor is older than the oldest event held, or is not
of this run) gets **one** event ``{"seq": <head>, "type": "resync", "data": {"since":
<its cursor>, "first": <the oldest seq held>}, "timestamp"}`` and continues with the
event after the head: ``resync``'s ``seq`` is where it stands now, the ``since`` to
reconnect with. A panel that gets ``resync`` re-reads its state (``GET /containers``,
``/jobs``, ``/volumes``), then applies the events that follow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from .converter import field_check

__all__ = [
    "BATCH_BYTES",
    "BATCH_EVENTS",
    "EVENT_TYPES",
    "RESYNC",
    "EventSubscription",
    "EventsSettings",
    "NodeEvent",
    "NodeEvents",
    "seq_origin",
]

#: The types of contract §17; ``publish`` refuses any other.
EVENT_TYPES = frozenset(
    {
        "container.created",
        "container.deleted",
        "container.install",
        "container.state",
        "job.progress",
        "job.done",
        "volume.created",
        "volume.deleted",
        "backup.done",
    }
)
#: The type of the event a reader gets when the ring has moved past it.
RESYNC = "resync"
DEFAULT_BUFFER = 10_000
MAX_BUFFER = 1_000_000
#: Most events, and bytes of JSON, one ``receive`` hands a reader at once.
BATCH_EVENTS = 256
BATCH_BYTES = 1 << 20


@attrs.frozen
class EventsSettings:
    """Config section ``events`` (contract §17)."""

    #: Events kept for replay (``since``); a reader further behind gets ``resync``.
    buffer: int = attrs.field(
        default=DEFAULT_BUFFER,
        validator=field_check(lambda v: 1 <= v <= MAX_BUFFER, f"must be 1 to {MAX_BUFFER}"),
    )
    #: Seconds without an event after which an SSE stream sends a ``: keep-alive`` comment.
    keepalive: float = attrs.field(
        default=15.0, validator=field_check(lambda v: 1 <= v <= 300, "must be 1 to 300")
    )


def seq_origin(clock: Callable[[], float] = time.time) -> int:
    """The seq before a run's first event: the wall clock in microseconds (see above)."""
    return int(clock() * 1_000_000)


class NodeEvent:
    """One published event, encoded once: ``json`` (bytes), and on first use ``text``
    (for WebSocket frames) and ``sse`` (the Server-Sent Events frame). ``published`` is
    the clock at ``publish`` unrounded (the delivery-lag metric measures from it)."""

    __slots__ = ("_sse", "_text", "json", "published", "seq", "type")

    def __init__(self, seq: int, type: str, encoded: bytes, published: float = 0.0) -> None:
        self.seq = seq
        self.type = type
        self.json = encoded
        self.published = published
        self._text: str | None = None
        self._sse: bytes | None = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.json.decode()
        return self._text

    @property
    def sse(self) -> bytes:
        """``id: <seq>``, ``event: <type>``, ``data: <the whole event>`` (JSON has no
        newline: one ``data`` line), then the blank line that ends an SSE event."""
        if self._sse is None:
            self._sse = b"id: %d\nevent: %s\ndata: %s\n\n" % (
                self.seq,
                self.type.encode(),
                self.json,
            )
        return self._sse

    def to_dict(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.json)
        return value

    def __repr__(self) -> str:
        return f"NodeEvent({self.seq}, {self.type!r})"


def _encode(seq: int, type: str, data: Mapping[str, Any], timestamp: float) -> bytes:
    event = {"seq": seq, "type": type, "data": data, "timestamp": timestamp}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()


class EventSubscription:
    """One reader: a cursor into the ring (``cursor``: the seq of the last event it got)."""

    def __init__(self, events: NodeEvents, cursor: int) -> None:
        self._events = events
        self.cursor = cursor
        #: ``resync`` events this reader got (tests, metrics).
        self.resyncs = 0
        #: Most bytes of JSON one batch held: the reader's whole backlog in memory at once.
        self.peak_batch_bytes = 0
        self.closed = False

    def close(self) -> None:
        self.closed = True

    @property
    def behind(self) -> int:
        """Events published that this reader has not taken yet."""
        return max(0, self._events.head - self.cursor)

    def receive_nowait(self) -> list[NodeEvent]:
        """The events after the cursor (or one ``resync``); ``trio.WouldBlock`` when there
        are none, ``trio.EndOfChannel`` once the subscription or the stream is closed."""
        if self.closed or self._events.closed:
            raise trio.EndOfChannel
        events = self._events
        head, first = events.head, events.first
        cursor = self.cursor
        if cursor == head:
            raise trio.WouldBlock
        if cursor > head or cursor < first - 1:
            self.resyncs += 1
            self.cursor = head
            return [events.resync_event(cursor)]
        batch: list[NodeEvent] = []
        size = 0
        for seq in range(cursor + 1, min(head, cursor + BATCH_EVENTS) + 1):
            event = events.get(seq)
            assert event is not None  # first <= seq <= head
            if batch and size + len(event.json) > BATCH_BYTES:
                break
            batch.append(event)
            size += len(event.json)
        self.cursor = batch[-1].seq
        self.peak_batch_bytes = max(self.peak_batch_bytes, size)
        return batch

    async def receive(self) -> list[NodeEvent]:
        """The next batch; waits while the reader is caught up."""
        await trio.lowlevel.checkpoint()
        while True:
            try:
                return self.receive_nowait()
            except trio.WouldBlock:
                await self._events._lot.park()

    def __aiter__(self) -> EventSubscription:
        return self

    async def __anext__(self) -> list[NodeEvent]:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class NodeEvents:
    """The ring of the node's last ``buffer`` events and its readers (``agent.events``).

    ``publish`` is synchronous and cheap: call it from the trio thread (any task), never
    from a worker thread.
    """

    def __init__(
        self,
        buffer: int = DEFAULT_BUFFER,
        *,
        clock: Callable[[], float] = time.time,
        origin: int | None = None,
    ) -> None:
        if not 1 <= buffer <= MAX_BUFFER:
            raise ValueError(f"buffer must be 1 to {MAX_BUFFER}")
        self._clock = clock
        self._slots: list[NodeEvent | None] = [None] * buffer
        #: The seq before this run's first event (see the module's docstring).
        self.origin = seq_origin(clock) if origin is None else origin
        #: The seq of the last event published (``origin`` before the first).
        self.head = self.origin
        #: The seq before the oldest event a shrunk or grown ring may still hold.
        self._floor = self.origin
        self._lot = trio.lowlevel.ParkingLot()
        self._readers: set[EventSubscription] = set()
        self.closed = False

    @classmethod
    def for_settings(
        cls, settings: EventsSettings, clock: Callable[[], float] = time.time
    ) -> NodeEvents:
        return cls(settings.buffer, clock=clock)

    @property
    def buffer(self) -> int:
        return len(self._slots)

    @property
    def first(self) -> int:
        """The seq of the oldest event held (``head + 1`` while none is)."""
        return max(self._floor + 1, self.head - len(self._slots) + 1)

    def __len__(self) -> int:
        return self.head - self.first + 1

    @property
    def readers(self) -> int:
        return len(self._readers)

    @property
    def subscriptions(self) -> tuple[EventSubscription, ...]:
        return tuple(self._readers)

    def publish(self, type: str, data: Mapping[str, Any]) -> NodeEvent:
        """Add an event to the ring and wake the readers; never blocks. ``ValueError`` for
        a type outside ``EVENT_TYPES`` or data that is not JSON."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown node event type {type!r}")
        seq = self.head + 1
        now = self._clock()
        event = NodeEvent(seq, type, _encode(seq, type, data, round(now, 3)), now)
        self._slots[seq % len(self._slots)] = event
        self.head = seq
        if self._lot:
            self._lot.unpark_all()
        return event

    def get(self, seq: int) -> NodeEvent | None:
        """The event numbered ``seq``, if the ring still holds it."""
        if not self.first <= seq <= self.head:
            return None
        return self._slots[seq % len(self._slots)]

    def since(self, seq: int) -> list[NodeEvent]:
        """Every event held after ``seq`` (all of them when ``seq`` is older)."""
        return [e for s in range(max(seq + 1, self.first), self.head + 1) if (e := self.get(s))]

    def resync_event(self, since: int) -> NodeEvent:
        """The event a reader at ``since`` gets when the ring no longer covers it."""
        data = {"since": since, "first": self.first}
        now = self._clock()
        encoded = json.dumps(
            {"seq": self.head, "type": RESYNC, "data": data, "timestamp": round(now, 3)},
            separators=(",", ":"),
        ).encode()
        return NodeEvent(self.head, RESYNC, encoded, now)

    def resize(self, buffer: int) -> None:
        """Keep the last ``buffer`` events from now on (a config reload)."""
        if not 1 <= buffer <= MAX_BUFFER:
            raise ValueError(f"buffer must be 1 to {MAX_BUFFER}")
        if buffer == len(self._slots):
            return
        kept = self.since(self.head - buffer)
        self._slots = [None] * buffer
        # A grown ring holds only what the old one did: ``first`` stays where it was.
        self._floor = self.head - len(kept)
        for event in kept:
            self._slots[event.seq % buffer] = event

    @contextmanager
    def subscribe(self, since: int | None = None) -> Iterator[EventSubscription]:
        """A reader from ``since`` (the seq of the last event it has; ``None``: only what
        is published from now on)."""
        reader = EventSubscription(self, self.head if since is None else since)
        self._readers.add(reader)
        try:
            yield reader
        finally:
            self._readers.discard(reader)
            reader.close()

    def close(self) -> None:
        """The agent is stopping: every reader's ``receive`` ends (``EndOfChannel``)."""
        self.closed = True
        self._lot.unpark_all()
