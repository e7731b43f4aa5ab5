"""What a server consumed, hour by hour, from its stats samples: pure arithmetic, no I/O.

Counters (CPU time, bytes sent) are cumulative in the container's cgroup and start again
from 0 when the container restarts, so usage is the *delta* between two samples of one run
of the container: a sample whose counters belong to a new run (another Docker container,
a start after the last sample, or a counter that went down) counts its whole value, from
the run's start. Gauges (memory, the volume's disk usage) are integrated over time: the
value of a sample times the seconds since the previous one, but never across the agent's
own downtime (``Meter.since``: a cursor loaded from the store integrates from the agent's
start only). A delta is spread over the hours its interval covers, in proportion.

``Meter`` keeps the not yet stored usage (``pending``) and the last sample of each server
(its ``cursors``) in memory; the service stores both in one transaction
(``take`` → write → ``stored``), so after a crash the counters' deltas are taken again
from the stored cursor: nothing is lost (but the gauges' last minute) and nothing is
counted twice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import attrs

__all__ = ["GIB", "HOUR", "Cursor", "Meter", "Usage", "hours_of"]

HOUR = 3600
#: The original daemon's "GB": 2**30 bytes.
GIB = 1024**3


@attrs.define
class Usage:
    """Usage in one hour of one server, in the units the store keeps."""

    #: CPU time, nanoseconds.
    cpu_ns: float = 0.0
    #: Bytes sent.
    egress: float = 0.0
    #: Memory, byte-seconds.
    memory: float = 0.0
    #: The volume's disk usage, byte-seconds.
    disk: float = 0.0
    #: Seconds metered (the server ran).
    seconds: float = 0.0

    def add(self, other: Usage) -> None:
        self.cpu_ns += other.cpu_ns
        self.egress += other.egress
        self.memory += other.memory
        self.disk += other.disk
        self.seconds += other.seconds

    @property
    def figures(self) -> dict[str, float]:
        """The contract's figures: GB-hours, vCPU-hours and GB (``GIB``)."""
        return {
            "memory_gb_hours": round(self.memory / GIB / HOUR, 9),
            "cpu_vcpu_hours": round(self.cpu_ns / 1e9 / HOUR, 9),
            "disk_gb_hours": round(self.disk / GIB / HOUR, 9),
            "egress_gb": round(self.egress / GIB, 9),
        }


@attrs.frozen
class Cursor:
    """The last sample counted for a server: its run's counters and when it was taken."""

    container_id: str
    at: float
    cpu_ns: int
    tx: int


def hour_of(t: float) -> int:
    return int(t // HOUR) * HOUR


def hours_of(start: float, end: float) -> Iterator[tuple[int, float]]:
    """The hours ``[start, end]`` covers: ``(hour start, share of the interval)``; an
    empty interval is all in the hour of ``end``."""
    if end <= start:
        yield hour_of(end), 1.0
        return
    span = end - start
    hour = hour_of(start)
    while hour < end:
        lo, hi = max(start, hour), min(end, hour + HOUR)
        if hi > lo:
            yield hour, (hi - lo) / span
        hour += HOUR


class Meter:
    """The usage not yet stored, and the cursors, of every server metered."""

    def __init__(self, since: float) -> None:
        #: Gauges are never integrated from before this (the agent's start).
        self.since = since
        self.cursors: dict[str, Cursor] = {}
        #: (internal_id, hour) → usage not stored yet.
        self.pending: dict[tuple[str, int], Usage] = {}
        #: Servers whose cursor changed since the last ``take``.
        self.dirty: set[str] = set()
        #: Taken but not yet known to be stored: ``(generation, usage)``, newest last
        #: (queries add those the store had not yet when they read it).
        self.taken: list[tuple[int, dict[tuple[str, int], Usage]]] = []
        self.generation = 0

    def load(self, cursors: Mapping[str, Cursor], generation: int) -> None:
        self.cursors.update(cursors)
        self.generation = generation

    def sample(
        self,
        internal_id: str,
        container_id: str,
        started_at: float | None,
        cpu_ns: int,
        tx: int,
        memory: int,
        disk: int | None,
        now: float,
    ) -> None:
        """Count one sample taken at ``now`` (unix seconds)."""
        cursor = self.cursors.get(internal_id)
        if (
            cursor is None
            or cursor.container_id != container_id
            or cpu_ns < cursor.cpu_ns
            or tx < cursor.tx
            or (started_at is not None and started_at > cursor.at)
        ):
            # A new run: its counters count from 0, since it started (after the last
            # sample of the previous run, whatever a not yet updated start time says).
            base_cpu = base_tx = 0
            if started_at is not None and (cursor is None or started_at > cursor.at):
                begin = min(started_at, now)
            else:
                begin = now if cursor is None else min(cursor.at, now)
        else:
            base_cpu, base_tx, begin = cursor.cpu_ns, cursor.tx, min(cursor.at, now)
        gauges_from = min(max(begin, self.since), now)
        self.cursors[internal_id] = Cursor(container_id, now, cpu_ns, tx)
        self.dirty.add(internal_id)
        self._spread(internal_id, begin, now, cpu_ns=cpu_ns - base_cpu, egress=tx - base_tx)
        seconds = now - gauges_from
        if seconds > 0:
            self._spread(
                internal_id,
                gauges_from,
                now,
                memory=memory * seconds,
                disk=(disk or 0) * seconds,
                seconds=seconds,
            )

    def _spread(self, internal_id: str, start: float, end: float, **amounts: float) -> None:
        if not any(amounts.values()):
            return
        for hour, share in hours_of(start, end):
            usage = self.pending.get((internal_id, hour))
            if usage is None:
                usage = self.pending[(internal_id, hour)] = Usage()
            usage.add(Usage(**{k: v * share for k, v in amounts.items()}))

    def forget(self, internal_id: str) -> None:
        """The server was deleted: its cursor goes (its usage stays, for billing)."""
        self.cursors.pop(internal_id, None)
        self.dirty.discard(internal_id)

    # -- storing ------------------------------------------------------------------------

    def take(self) -> tuple[int, dict[tuple[str, int], Usage], dict[str, Cursor]]:
        """What to store now: a generation number, the pending usage and the changed
        cursors. Until ``stored(generation)`` the usage still counts in ``live``."""
        self.generation += 1
        pending, self.pending = self.pending, {}
        cursors = {i: self.cursors[i] for i in self.dirty if i in self.cursors}
        self.dirty = set()
        self.taken.append((self.generation, pending))
        return self.generation, pending, cursors

    def stored(self, generation: int) -> None:
        """The store has generation ``generation`` (and every one before)."""
        self.taken = [(g, usage) for g, usage in self.taken if g > generation]

    def failed(self, generation: int, cursors: Mapping[str, Cursor]) -> None:
        """Storing ``generation`` failed: its usage and cursors are pending again."""
        for g, usage in self.taken:
            if g == generation:
                for key, value in usage.items():
                    self.pending.setdefault(key, Usage()).add(value)
        self.taken = [(g, usage) for g, usage in self.taken if g != generation]
        self.dirty.update(i for i in cursors if i in self.cursors)

    def live(self, internal_id: str, stored_generation: int) -> dict[int, Usage]:
        """Usage of ``internal_id`` the store did not have at ``stored_generation``:
        hour → usage (add it to what the store answered)."""
        found: dict[int, Usage] = {}
        sources = [u for g, u in self.taken if g > stored_generation] + [self.pending]
        for usage in sources:
            for (owner, hour), value in usage.items():
                if owner == internal_id:
                    found.setdefault(hour, Usage()).add(value)
        return found
