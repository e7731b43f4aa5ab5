"""Live resource usage of a running container: one reader per run, shared by all clients.

Why cgroup files first: the engine's stats API costs 1 to 2 s per call (one shared
collector with a 1 s tick; ``one_shot`` is 1 s when called back to back or for a batch),
and a long-lived stream per container costs a thread in the agent plus the engine's own
sampling work. The cgroup files give the same numbers (``memory.usage_in_bytes``,
``cpuacct.usage``…) with no thread per container and no engine work. Measured here with
``bench/websocket.py`` (20 running containers): one sample of all the fields costs
0.05 ms from the files, against 0.8 ms in the agent plus 1.5 ms in dockerd from a stream
(see also ../shared/notes/docker-under-trio.md §12).

The files are read in a worker thread (at most ``READ_THREADS`` at once), never on the
event loop: kernel pseudo-files never wait for a disk, but they do wait for the kernel's
cgroup locks, which the engine holds while it creates and removes containers' cgroups.
Measured with ``bench.events`` (100 containers started and killed, 10 at a time): single
reads of ``cpuacct.usage`` or ``memory.usage_in_bytes``, and ``locate_cgroup``'s stat
calls, blocked for 10 to 190 ms, and each such read held every task of the agent up (the
node events' delivery among them). A thread hop costs more than the read itself (about
0.4 ms round trip on the loaded 2-core test machine, of which the loop spends tens of
microseconds): one per sample, a sample a second per watched container. The cgroup is
looked for once the engine has started the container, not from the attach that comes
before the start (polling it there cost a hop every half second of a slow start).

A host where the files are elsewhere (systemd cgroup driver) or shaped differently
(cgroup v2) is handled by ``locate_cgroup``; where none is found, the reader falls back to
one long-lived Docker stats stream for the container (trio-native, no thread).

The reader samples while the container's hub has subscribers, about every
``stats.interval`` seconds, and publishes a ``stats`` frame only when a value changed.
Every sample it reads also goes to ``sampled`` (the ``lightd_stats_sample`` hook, set by
the manager when a plugin implements it: metering); while nobody listens it then still
reads one sample every ``stats.idle_interval`` seconds (every tick while the server
stops, to catch its last counters), and none at all when no plugin takes them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import attrs
import trio

from ..converter import field_check
from ..errors import AgentError

if TYPE_CHECKING:
    from ..docker import DockerEngine
    from .hub import EventHub

__all__ = [
    "ApiStats",
    "CgroupV1",
    "CgroupV2",
    "Sample",
    "StatsReader",
    "StatsSettings",
    "StatsSource",
    "locate_cgroup",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Seconds a running container may go without its cgroup being found before the reader
#: falls back to the Docker API.
LOCATE_GRACE = 3.0
#: Runtime states in which the engine has started the container.
_UP = frozenset({"running", "stopping"})
#: Worker threads reading cgroup files at once, for all the containers of the agent.
READ_THREADS = 2
_READ_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("stats_reads")


async def off_loop(read: Callable[..., T], *args: Any) -> T:
    """``read(*args)`` in a worker thread (one of ``READ_THREADS``); a cancel does not wait
    for it (the read's result is dropped)."""
    try:
        limiter = _READ_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(READ_THREADS)
        _READ_LIMITER.set(limiter)
    return await trio.to_thread.run_sync(read, *args, limiter=limiter, abandon_on_cancel=True)


@attrs.frozen
class StatsSettings:
    """Config section ``stats`` [ext]."""

    #: Seconds between samples while someone listens.
    interval: float = attrs.field(
        default=1.0, validator=field_check(lambda v: v >= 0.1, "must be >= 0.1")
    )
    #: Seconds between samples while nobody listens, for a plugin that takes every
    #: sample (``lightd_stats_sample``: metering); unused when none does.
    idle_interval: float = attrs.field(
        default=30.0, validator=field_check(lambda v: v >= 0.1, "must be >= 0.1")
    )
    #: ``auto`` (cgroup files, else the Docker API), ``cgroup`` (never the API), ``api``.
    source: Literal["auto", "cgroup", "api"] = attrs.field(
        default="auto",
        validator=field_check(
            lambda v: v in ("auto", "cgroup", "api"), "must be auto, cgroup or api"
        ),
    )


@attrs.frozen
class Sample:
    """Cumulative counters of a container at one moment."""

    #: CPU time used so far, and the clock it is compared with, in nanoseconds.
    cpu_ns: int
    at_ns: int
    memory: int
    memory_limit: int
    network_rx: int
    network_tx: int
    block_read: int
    block_write: int


class StatsSource(Protocol):
    """Where samples come from; ``read`` is cheap but may wait for the kernel (the reader
    calls it in a worker thread, the Docker API's source excepted)."""

    name: str

    def read(self) -> Sample | None:
        """The current counters, or ``None`` when they cannot be read (not running)."""
        ...


def _host_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


HOST_MEMORY = _host_memory()


def _read(path: str) -> str:
    # os.open/os.read: a third of the cost of open() with its text wrapper, per file.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536).decode("ascii", "replace")
    finally:
        os.close(fd)


def _value(text: str, key: str) -> int:
    """The value of ``key`` in ``key value`` lines (memory.stat, cpu.stat); 0 if absent."""
    at = text.find(key + " ")
    while at > 0 and text[at - 1] != "\n":
        at = text.find(key + " ", at + 1)
    if at < 0:
        return 0
    end = text.find("\n", at)
    return int(text[at + len(key) + 1 : end if end >= 0 else None])


def _limit(value: int) -> int:
    """An unlimited cgroup reports a huge number: report the host's memory, as Docker does."""
    return HOST_MEMORY if HOST_MEMORY and (value <= 0 or value > HOST_MEMORY) else value


class _Network:
    """Bytes received and sent by a cgroup's network namespace (loopback excluded), read
    from ``/proc/<pid>/net/dev`` of one of its processes (the pid is kept until it goes)."""

    def __init__(self, procs: Path, proc: Path) -> None:
        self.procs = str(procs)
        self.proc = proc
        self._dev: str | None = None

    def read(self) -> tuple[int, int]:
        for attempt in (0, 1):
            if self._dev is None or attempt:
                pids = _read(self.procs).split()
                if not pids:
                    return 0, 0
                self._dev = str(self.proc / pids[0] / "net" / "dev")
            try:
                text = _read(self._dev)
            except OSError:
                if attempt:
                    raise
                continue
            rx = tx = 0
            for line in text.splitlines()[2:]:
                name, _, counters = line.partition(":")
                if name.strip() != "lo":
                    fields = counters.split()
                    rx += int(fields[0])
                    tx += int(fields[8])
            return rx, tx
        return 0, 0


class CgroupV1:
    """cgroup v1: one folder per controller (``memory``, ``cpuacct``, ``blkio``)."""

    name = "cgroup-v1"

    def __init__(self, root: Path, relative: str, proc: Path = Path("/proc")) -> None:
        memory = root / "memory" / relative
        self._cpu = str(root / "cpuacct" / relative / "cpuacct.usage")
        self._usage = str(memory / "memory.usage_in_bytes")
        self._stat = str(memory / "memory.stat")
        self._limit = str(memory / "memory.limit_in_bytes")
        self._blkio = str(root / "blkio" / relative / "blkio.throttle.io_service_bytes_recursive")
        self.network = _Network(memory / "cgroup.procs", proc)

    def read(self) -> Sample | None:
        try:
            now = time.monotonic_ns()
            cpu = int(_read(self._cpu))
            usage = int(_read(self._usage))
            cache = _value(_read(self._stat), "total_inactive_file")
            limit = int(_read(self._limit))
            rx, tx = self.network.read()
        except (OSError, ValueError, IndexError):
            return None
        read = write = 0
        try:
            blkio = _read(self._blkio)
        except OSError:
            blkio = ""
        for line in blkio.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == "Read":
                read += int(parts[2])
            elif len(parts) == 3 and parts[1] == "Write":
                write += int(parts[2])
        return Sample(
            cpu_ns=cpu,
            at_ns=now,
            memory=usage - cache if cache < usage else usage,
            memory_limit=_limit(limit),
            network_rx=rx,
            network_tx=tx,
            block_read=read,
            block_write=write,
        )


class CgroupV2:
    """cgroup v2: one folder with every controller's files."""

    name = "cgroup-v2"

    def __init__(self, folder: Path, proc: Path = Path("/proc")) -> None:
        self._cpu = str(folder / "cpu.stat")
        self._usage = str(folder / "memory.current")
        self._stat = str(folder / "memory.stat")
        self._limit = str(folder / "memory.max")
        self._io = str(folder / "io.stat")
        self.network = _Network(folder / "cgroup.procs", proc)

    def read(self) -> Sample | None:
        try:
            now = time.monotonic_ns()
            cpu_stat = _read(self._cpu)
            if "usage_usec " not in cpu_stat:
                return None
            cpu = _value(cpu_stat, "usage_usec") * 1000
            usage = int(_read(self._usage))
            cache = _value(_read(self._stat), "inactive_file")
            raw_limit = _read(self._limit).strip()
            rx, tx = self.network.read()
        except (OSError, ValueError, IndexError):
            return None
        read = write = 0
        try:
            io = _read(self._io)
        except OSError:
            io = ""
        for line in io.splitlines():
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                if key == "rbytes":
                    read += int(value)
                elif key == "wbytes":
                    write += int(value)
        return Sample(
            cpu_ns=cpu,
            at_ns=now,
            memory=usage - cache if cache < usage else usage,
            memory_limit=_limit(0 if raw_limit == "max" else int(raw_limit)),
            network_rx=rx,
            network_tx=tx,
            block_read=read,
            block_write=write,
        )


def locate_cgroup(container_id: str, root: Path = CGROUP_ROOT) -> StatsSource | None:
    """The cgroup of a running container under the cgroupfs or systemd driver, v1 or v2;
    ``None`` when it is not there (not running yet, or another layout)."""
    for relative in (f"docker/{container_id}", f"system.slice/docker-{container_id}.scope"):
        if (root / "memory" / relative / "memory.usage_in_bytes").is_file():
            return CgroupV1(root, relative)
        if (root / relative / "memory.current").is_file():
            return CgroupV2(root / relative)
    return None


class ApiStats:
    """The fallback: one long-lived Docker stats stream, keeping the latest item (about
    one a second)."""

    name = "docker-api"

    def __init__(self, engine: DockerEngine, container_id: str) -> None:
        self.engine = engine
        self.container_id = container_id
        self._latest: Sample | None = None

    def read(self) -> Sample | None:
        return self._latest

    async def _follow(self) -> None:
        try:
            async with self.engine.stats(self.container_id) as items:
                async for item in items:
                    self._latest = sample_of(item)
        except ValueError as exc:  # bad JSON
            log.info("%s: stats stream ended: %s", self.container_id[:12], exc)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self._follow()
            except AgentError as exc:
                log.info("%s: stats stream: %s", self.container_id[:12], exc)
            await trio.sleep(5)  # the stream ended (the container stopped?): retry


def _returning(read: Callable[[], Sample | None]) -> Callable[[], Awaitable[Sample | None]]:
    async def call() -> Sample | None:
        return read()

    return call


def sample_of(item: dict[str, Any]) -> Sample | None:
    """A Docker stats item → ``Sample`` (CPU compared against the host's CPU clock)."""
    try:
        cpu = item["cpu_stats"]
        cpus = cpu.get("online_cpus") or len(cpu["cpu_usage"].get("percpu_usage") or [1])
        memory = item.get("memory_stats") or {}
        stats = memory.get("stats") or {}
        cache = stats.get("total_inactive_file", stats.get("inactive_file", 0))
        usage = int(memory.get("usage", 0))
        networks = (item.get("networks") or {}).values()
        blkio = (item.get("blkio_stats") or {}).get("io_service_bytes_recursive") or []
        return Sample(
            cpu_ns=int(cpu["cpu_usage"]["total_usage"]),
            at_ns=int(cpu["system_cpu_usage"]) // int(cpus),
            memory=usage - cache if cache < usage else usage,
            memory_limit=_limit(int(memory.get("limit", 0))),
            network_rx=sum(int(n.get("rx_bytes", 0)) for n in networks),
            network_tx=sum(int(n.get("tx_bytes", 0)) for n in networks),
            block_read=sum(int(b["value"]) for b in blkio if b.get("op", "").lower() == "read"),
            block_write=sum(int(b["value"]) for b in blkio if b.get("op", "").lower() == "write"),
        )
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


class _Owner(Protocol):
    @property
    def state(self) -> str: ...

    @property
    def started_at(self) -> float | None: ...


def frame_values(previous: Sample, sample: Sample) -> dict[str, Any]:
    """The contract's stats fields from two samples (``cpu_usage``: 100 = one core)."""
    elapsed = sample.at_ns - previous.at_ns
    cpu = (sample.cpu_ns - previous.cpu_ns) / elapsed * 100 if elapsed > 0 else 0.0
    return {
        "cpu_usage": round(max(cpu, 0.0), 2),
        "memory_usage": sample.memory,
        "memory_limit": sample.memory_limit,
        "network_rx": sample.network_rx,
        "network_tx": sample.network_tx,
        "block_read": sample.block_read,
        "block_write": sample.block_write,
    }


class StatsReader:
    """The stats reader of one container, run once per run of the server."""

    def __init__(
        self,
        engine: DockerEngine,
        hub: EventHub,
        owner: _Owner,
        settings: Callable[[], StatsSettings],
        *,
        locate: Callable[[str], StatsSource | None] = locate_cgroup,
    ) -> None:
        self.engine = engine
        self.hub = hub
        self.owner = owner
        self.settings = settings
        self.locate = locate
        #: The source of the current run (tests and the bench look).
        self.source: StatsSource | None = None
        #: The usage of the container's volume in bytes (the disk service's cached figure,
        #: no walk), for the frames' ``disk_bytes``; the manager sets it.
        self.disk_bytes: Callable[[], int | None] = lambda: None
        #: Takes every sample read, with the Docker id of the run (the manager sets it
        #: when a plugin implements ``lightd_stats_sample``); cheap, never raises.
        self.sampled: Callable[[str, Sample], None] | None = None
        self.container_id = ""

    async def run(self, container_id: str) -> None:
        """Publish stats for this run of ``container_id`` until cancelled. A failure (a
        bug: sources return ``None`` for what they cannot read) is logged and the reader
        starts again; it never ends the console or the supervisor it runs under."""
        while True:
            try:
                await self._run(container_id)
                return
            except Exception:
                log.exception("%s: stats reader failed (a bug); again in 5 s", container_id[:12])
            await trio.sleep(5)

    async def _run(self, container_id: str) -> None:
        began = time.time()
        self.source = None
        self.container_id = container_id
        while True:
            settings = self.settings()
            started = self.owner.started_at
            running = started is not None and started >= began
            # The console (and this reader) opens before the start: the cgroup is there
            # once the engine has started the container (or it ran before: adopted).
            if settings.source != "api" and (running or self.owner.state in _UP):
                self.source = await off_loop(self.locate, container_id)
            if self.source is not None:
                await self._publish(self.source, began)
                return
            if settings.source == "api" or (
                settings.source == "auto"
                and started is not None
                and running
                and time.time() - started > LOCATE_GRACE
            ):
                break
            await trio.sleep(min(settings.interval, 0.5))
        api = ApiStats(self.engine, container_id)
        self.source = api
        log.info("%s: no cgroup files found; stats from the Docker API", container_id[:12])
        async with trio.open_nursery() as nursery:
            await nursery.start(api.serve)
            await self._publish(api, began)

    async def _publish(self, source: StatsSource, began: float) -> None:
        if isinstance(source, ApiStats):  # the latest item of its stream: no I/O
            read: Callable[[], Awaitable[Sample | None]] = _returning(source.read)
        else:
            read = partial(off_loop, source.read)
        previous: Sample | None = None
        last: dict[str, Any] | None = None
        next_tick = next_idle = trio.current_time()
        while True:
            settings = self.settings()
            next_tick = max(next_tick + settings.interval, trio.current_time())
            await trio.sleep_until(next_tick)
            sampled = self.sampled
            if not len(self.hub):
                previous = None  # nobody listens: no frames; start afresh when someone does
                if sampled is not None and (
                    next_tick >= next_idle or self.owner.state == "stopping"
                ):
                    next_idle = next_tick + settings.idle_interval
                    if (idle := await read()) is not None:
                        sampled(self.container_id, idle)
                continue
            sample = await read()
            if sample is not None and sampled is not None:
                sampled(self.container_id, sample)
            if sample is None or sample == previous:
                continue
            if previous is None:
                previous = sample
                continue
            values = frame_values(previous, sample)
            values["state"] = self.owner.state
            values["disk_bytes"] = self.disk_bytes() or 0
            previous = sample
            if values == last:
                continue
            last = dict(values)
            started = self.owner.started_at
            values["uptime"] = (
                int(time.time() - started) if started is not None and started >= began else 0
            )
            self.hub.stats(values)
