"""Console and stats over the agent's WebSocket, next to raw Docker attach, in one run.

Prints, each beside its baseline or target:

1. raw Docker attach read rate of a container printing ``--lines`` (200 000) lines as fast
   as it can (``busybox yes | busybox head``): the baseline, lines/s;
2. with the throttle off, console lines/s delivered to 1 client (target ≥ 50 % of raw) and to
   each of ``--clients`` (20) clients reading as fast as they can (targets: each receives
   ≥ 99 % of the lines, at ≥ 50 % of raw per client), then the same with ``--stalled`` (5)
   more clients connected that never read (target: the readers lose nothing and keep their
   rate, the agent's memory stays bounded), with the agent's CPU seconds per 100k lines
   delivered and its peak RSS over its RSS before;
3. with the default throttle (2000 lines / 100 ms), the share of lines each of 20 clients
   receives from a container printing just under that rate (target 100 %);
4. ``--containers`` (100) running containers, one client each, stats flowing: the agent's
   CPU % (target ≤ 25 % of one core) and RSS (target ≤ 200 MB);
5. the stats sources on this host: one sample from the cgroup files vs one Docker stats
   stream per container (agent and dockerd CPU per sample), the measurement behind the
   agent's choice.

The agent runs as its own process (``python -m lightd``), as in production, so its CPU and
memory are its own; the clients run in this process. The raw baseline attaches from this
process with the agent's own attach code (``agent.docker``) to an identical container:
the same image, the same command loop, the same producer, started the same way.

Run: ``.venv/bin/python -m bench.websocket [--lines 200000] [--clients 20] [--stalled 5]
[--containers 100] [--runs 3] [--window 20]``. Needs the engine of
``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image. Every container it makes
is removed at the end, whatever happens. On a 2-core machine the agent, dockerd, the
producer and the clients share the cores: figures are noisy when other work runs at the
same time; ``--runs`` gives the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import docker
import httpx
import trio
import trio_websocket
from lightd.containers.stats import ApiStats, locate_cgroup
from lightd.docker import DockerEngine, docker_url

IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
VENDOR = "Application/vnd.pkglatv1+json"
TOKEN = "lightd_" + "c" * 32
PREFIX = "wsbench"
SHELL = 'while read cmd; do eval "$cmd"; done'
MARKER = "bench-done"
CONSOLE_PREFIX = '{"event":"console","data":"'
TICKS = os.sysconf("SC_CLK_TCK")


# -- the agent process --------------------------------------------------------------------


class AgentProcess:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, config: Path) -> None:
        self.proc = proc
        self.url = url
        self.config = config

    def cpu(self) -> float:
        """CPU seconds used so far (all threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def ws(self, internal_id: str, *, stalled: bool = False) -> Any:
        """A client; ``stalled``: one whose application never reads (its library stops
        reading the socket once one message waits)."""
        url = "ws" + self.url.removeprefix("http") + f"/ws/{internal_id}?token={TOKEN}"
        return trio_websocket.open_websocket_url(
            url,
            message_queue_size=1 if stalled else 64,
            max_message_size=8 << 20,
            receive_buffer_size=4096 if stalled else 256 * 1024,
            disconnect_timeout=5,
        )


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lightd", "--config", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@asynccontextmanager
async def agent_process(
    folder: Path,
    console: dict[str, Any],
    *,
    extra: dict[str, Any] | None = None,
    log_name: str = "agent.log",
) -> AsyncIterator[AgentProcess]:
    """The agent as its own process on ``folder``'s storage (``extra``: more config
    sections), its output in ``folder/log_name``."""
    config = folder / "config.json"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "authorization": {"token": TOKEN},
                "storage": {"base_path": str(folder / "storage")},
                "containers": {"stop_timeout": 2},
                "console": console,
                **(extra or {}),
            }
        )
    )
    log = folder / log_name
    log.unlink(missing_ok=True)
    proc = await trio.to_thread.run_sync(_spawn, config, log)
    ok = False
    try:
        url = ""
        with trio.fail_after(60):
            while not url:
                if proc.poll() is not None:
                    raise SystemExit(f"the agent exited:\n{log.read_text()[-3000:]}")
                found = re.search(r"listening on (\S+)", log.read_text())
                url = found[1] if found else ""
                await trio.sleep(0.05)
        yield AgentProcess(proc, url, config)
        ok = True
    finally:
        if not ok:
            print(f"agent log (tail):\n{log.read_text()[-4000:]}", file=sys.stderr)
        proc.send_signal(signal.SIGINT)
        try:
            await trio.to_thread.run_sync(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()


def api(agent: AgentProcess) -> httpx.AsyncClient:
    headers = {"Accept": VENDOR, "Authorization": f"Bearer {TOKEN}"}
    return httpx.AsyncClient(base_url=agent.url, headers=headers, timeout=60)


async def wait_until(client: httpx.AsyncClient, internal_id: str, **expected: Any) -> None:
    body: dict[str, Any] = {}
    with trio.move_on_after(120):
        while True:
            body = (await client.get(f"/containers/{internal_id}")).json()
            if all(body.get(k) == v for k, v in expected.items()):
                return
            if body.get("install_state") == "failed":
                raise SystemExit(f"{internal_id} failed: {body.get('error')}")
            await trio.sleep(0.05)
    raise SystemExit(f"{internal_id} did not reach {expected} in 120 s; last seen {body}")


async def running_container(
    client: httpx.AsyncClient, internal_id: str, volume: str, command: str = SHELL
) -> None:
    body = {
        "internal_id": internal_id,
        "image": IMAGE,
        "volume_id": volume,
        "startup_command": command,
    }
    (await client.post("/containers", json=body)).raise_for_status()
    await wait_until(client, internal_id, install_state="ready")
    (await client.post(f"/containers/{internal_id}/start")).raise_for_status()
    await wait_until(client, internal_id, state="running")


# -- clients ------------------------------------------------------------------------------


class Reader:
    """A client counting console lines until the marker; it notes when the marker came."""

    def __init__(self, marker: str, first: trio.Event) -> None:
        self.marker = marker + "\\n"  # as it appears in the JSON text
        self.first = first  # set by the first client that sees the marker
        self.lines = 0
        self.notices = 0
        self.done_at: float | None = None
        self.stats = 0

    async def read_until_marker(self, ws: Any) -> None:
        # The clients share this process and its core with nobody's help: count the lines
        # in the JSON text itself (each is an escaped newline; the producers print no
        # backslashes) rather than decoding every frame. Other frames are decoded.
        while True:
            text = await ws.get_message()
            if text.startswith(CONSOLE_PREFIX):
                # Markers (this run's, or a late one of the run before) are not output.
                self.lines += text.count("\\n") - text.count(MARKER)
                if self.marker in text:
                    self.done_at = time.perf_counter()
                    self.first.set()
                    return
                continue
            frame = json.loads(text)
            if frame["event"] == "daemon_message" and frame["data"] == "Console output throttled":
                self.notices += 1


async def skip_greeting(ws: Any) -> None:
    """The status frame (and a stats frame, if any) that a new client gets."""
    frame = json.loads(await ws.get_message())
    assert frame["event"] == "status", frame


class Delivery(NamedTuple):
    readers: list[Reader]
    #: Seconds from the command to the last client's marker.
    elapsed: float
    #: CPU seconds of the agent, and of this process (the clients), meanwhile.
    agent_cpu: float
    client_cpu: float
    #: The agent's RSS before the command, and the most it reached until the last marker.
    rss_before: int
    rss_peak: int


async def deliver(
    agent: AgentProcess, internal_id: str, clients: int, producer: str, *, stalled: int = 0
) -> Delivery:
    """Run ``producer`` in the container with ``clients`` connected (and ``stalled`` more
    that never read); per-client readers, the elapsed seconds from the command to the last
    marker, the agent's CPU seconds and its RSS."""
    marker = f"{MARKER}-{time.monotonic_ns()}"  # leftovers of an earlier run never match
    first = trio.Event()
    readers = [Reader(marker, first) for _ in range(clients)]
    async with trio.open_nursery() as nursery:
        sockets: list[Any] = []
        for _ in range(clients):
            sockets.append(await nursery.start(_hold, agent, internal_id))
        for _ in range(stalled):
            await nursery.start(_hold, agent, internal_id, True)
        for ws in sockets:
            await skip_greeting(ws)
        rss = [agent.rss()]
        nursery.start_soon(_sample_rss, agent, rss)
        cpu, mine = agent.cpu(), own_cpu()
        started = time.perf_counter()
        await sockets[0].send_message(
            json.dumps({"event": "send_command", "command": f"{producer}; echo {marker}"})
        )
        with trio.fail_after(120):
            async with trio.open_nursery() as readers_nursery:
                for reader, ws in zip(readers, sockets, strict=True):
                    readers_nursery.start_soon(reader.read_until_marker, ws)
                readers_nursery.start_soon(_remark, sockets[0], readers, marker, first)
        cpu, mine = agent.cpu() - cpu, own_cpu() - mine
        elapsed = max(r.done_at or 0 for r in readers) - started
        rss.append(agent.rss())
        nursery.cancel_scope.cancel()
    for reader in readers:
        reader.done_at = (reader.done_at or started) - started
    return Delivery(readers, elapsed, cpu, mine, rss[0], max(rss))


async def _sample_rss(agent: AgentProcess, into: list[int]) -> None:
    while True:
        await trio.sleep(0.02)
        into.append(agent.rss())


async def _remark(ws: Any, readers: list[Reader], marker: str, first: trio.Event) -> None:
    """A client that lagged may have lost the frame with the marker (that is the policy):
    the marker is printed again (after the producer, by the server's command loop) until
    every client saw one."""
    with trio.move_on_after(1):
        await first.wait()
    while not all(r.done_at for r in readers):
        await ws.send_message(json.dumps({"event": "send_command", "command": f"echo {marker}"}))
        await trio.sleep(0.5)


async def _hold(
    agent: AgentProcess,
    internal_id: str,
    stalled: bool = False,
    *,
    task_status: trio.TaskStatus[Any],
) -> None:
    async with agent.ws(internal_id, stalled=stalled) as ws:
        task_status.started(ws)
        await trio.sleep_forever()


# -- the raw baseline ---------------------------------------------------------------------


async def raw_attach_rate(engine: DockerEngine, raw: docker.DockerClient, producer: str) -> float:
    """Lines/s read by a bare attach from an identical container (same command loop)."""
    container = await trio.to_thread.run_sync(
        lambda: raw.containers.create(
            IMAGE,
            ["/bin/sh", "-c", SHELL],
            labels={"lightd.bench": PREFIX},
            stdin_open=True,
            detach=True,
            # What the agent gives its servers (agent/containers/manager.py): dockerd's log
            # copier competes with the attach stream, so the logging must match too.
            log_config={"type": "json-file", "config": {"max-size": "10m", "max-file": "2"}},
            pids_limit=512,
            security_opt=["no-new-privileges"],
        )
    )
    try:
        async with engine.attach(container.id) as stream:
            await trio.to_thread.run_sync(container.start)
            needle = (MARKER + "\n").encode()
            lines, tail = 0, b""
            started = time.perf_counter()
            await stream.send(f"{producer}; echo {MARKER}\n".encode())
            with trio.fail_after(300):
                while (chunk := await stream.receive()) is not None:
                    lines += chunk.count(b"\n")
                    if needle in tail + chunk:
                        break
                    tail = chunk[-len(needle) :]
            elapsed = time.perf_counter() - started
            return (lines - 1) / elapsed
    finally:
        await trio.to_thread.run_sync(lambda: container.remove(force=True))


# -- the stats sources ----------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _dockerd_pid() -> int | None:
    """The private engine of scripts/docker-engine.sh, whose CPU the stats streams cost."""
    pidfile = Path("/run/lightd-docker/dockerd.pid")
    return int(pidfile.read_text().strip()) if pidfile.exists() else None


def own_cpu() -> float:
    usage = os.times()
    return usage.user + usage.system


async def compare_stats_sources(
    engine: DockerEngine, container_ids: list[str], seconds: float
) -> dict[str, float]:
    """Per-sample cost of the cgroup files vs Docker stats streams, on running containers."""
    sources = [locate_cgroup(cid) for cid in container_ids]
    if any(s is None for s in sources):
        return {}
    reads = 0
    start = time.perf_counter()
    for _ in range(200):
        for source in sources:
            assert source is not None
            source.read()
            reads += 1
    cgroup_ms = (time.perf_counter() - start) / reads * 1000
    dockerd_pid = _dockerd_pid()
    streams = [ApiStats(engine, cid) for cid in container_ids]
    samples = 0
    engine_cpu = proc_cpu(dockerd_pid) if dockerd_pid else 0.0
    mine = own_cpu()
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for stream in streams:
            await nursery.start(stream.serve)
        with trio.move_on_after(seconds):
            last = [None] * len(streams)
            while True:
                await trio.sleep(0.05)
                for n, stream in enumerate(streams):
                    sample = stream.read()
                    if sample is not None and sample is not last[n]:
                        last[n] = sample
                        samples += 1
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - started
    mine = own_cpu() - mine
    engine_cpu = (proc_cpu(dockerd_pid) - engine_cpu) if dockerd_pid else float("nan")
    return {
        "containers": len(container_ids),
        "cgroup_ms_per_sample": cgroup_ms,
        "api_samples_per_container_s": samples / wall / len(container_ids),
        "api_agent_ms_per_sample": mine / max(samples, 1) * 1000,
        "api_dockerd_ms_per_sample": engine_cpu / max(samples, 1) * 1000,
    }


# -- the phases ---------------------------------------------------------------------------


def pct(value: float, base: float) -> str:
    return f"{value / base * 100:5.1f} %" if base else "  n/a"


async def throughput(
    args: argparse.Namespace,
    agent: AgentProcess,
    engine: DockerEngine,
    raw: docker.DockerClient,
    internal_id: str,
) -> dict[str, Any]:
    producer = f"busybox yes line-0123456789 | busybox head -n {args.lines}"
    raws, ones, cpu_one = [], [], []
    many = Phase(args.clients, args.lines)
    stalled = Phase(args.clients, args.lines)
    for run in range(args.runs):
        raws.append(await raw_attach_rate(engine, raw, producer))
        one = await deliver(agent, internal_id, 1, producer)
        readers = one.readers
        ones.append(readers[0].lines / readers[0].done_at)
        cpu_one.append(one.agent_cpu / (readers[0].lines / 100_000))
        many.add(await deliver(agent, internal_id, args.clients, producer), raws[-1])
        line = (
            f"  run {run + 1}: raw {raws[-1]:,.0f}/s · 1 client {ones[-1]:,.0f}/s · "
            f"{args.clients} clients {many.describe()}"
        )
        if args.stalled:
            stalled.add(
                await deliver(agent, internal_id, args.clients, producer, stalled=args.stalled),
                raws[-1],
            )
            line += f" · with {args.stalled} stalled: {stalled.describe()}"
        print(line, flush=True)
    base = statistics.median(raws)
    one = statistics.median(ones)
    print(f"\nconsole, throttle off, {args.lines:,} lines (medians of {args.runs} runs)")
    print(f"  raw Docker attach (baseline)        {base:12,.0f} lines/s")
    print(f"  1 client                            {one:12,.0f} lines/s  {pct(one, base)} (≥ 50 %)")
    print(
        f"  agent CPU per 100k lines delivered: 1 client {statistics.median(cpu_one):.3f} s, "
        f"{args.clients} clients {statistics.median(many.cpu):.3f} s"
    )
    results: dict[str, Any] = {
        "raw_lines_per_s": base,
        "one_client_lines_per_s": one,
        "one_client_ratio": one / base,
        "cpu_s_per_100k_one": statistics.median(cpu_one),
    }
    results["many"] = many.report(f"{args.clients} clients", base)
    if args.stalled:
        label = f"{args.clients} clients + {args.stalled} stalled"
        results["stalled"] = stalled.report(label, base)
        cost = stalled.median_rate() / many.median_rate()
        print(f"  readers' rate with the stalled clients vs without: {cost:.2f} (target ≈ 1)")
        results["stalled_vs_without"] = cost
    return results


class Phase:
    """The deliveries of one phase (N clients, with or without stalled ones) over the runs."""

    def __init__(self, clients: int, lines: int) -> None:
        self.clients = clients
        self.lines = lines
        self.rates: list[list[float]] = []  # per run, per client lines/s
        self.shares: list[list[float]] = []  # per run, per client share of lines
        self.cpu: list[float] = []  # agent CPU s per 100k lines delivered
        self.rss_growth: list[int] = []  # agent peak RSS over its RSS before, bytes
        self.paired: list[float] = []  # per run, slowest client's rate / that run's raw rate
        self.last: Delivery | None = None

    def add(self, delivery: Delivery, raw: float) -> None:
        readers = delivery.readers
        self.rates.append([r.lines / r.done_at for r in readers])
        self.paired.append(min(self.rates[-1]) / raw)
        self.shares.append([r.lines / self.lines for r in readers])
        self.cpu.append(delivery.agent_cpu / (sum(r.lines for r in readers) / 100_000))
        self.rss_growth.append(delivery.rss_peak - delivery.rss_before)
        self.last = delivery

    def describe(self) -> str:
        assert self.last is not None
        return (
            f"min {min(self.rates[-1]):,.0f}/s each, min share {min(self.shares[-1]) * 100:.1f} %"
            f" (in {self.last.elapsed:.2f} s: agent {self.last.agent_cpu:.2f} CPU s, clients "
            f"{self.last.client_cpu:.2f}; RSS +{self.rss_growth[-1] / 2**20:.1f} MB)"
        )

    def median_rate(self) -> float:
        return statistics.median(statistics.median(p) for p in self.rates)

    def report(self, label: str, base: float) -> dict[str, Any]:
        worst = statistics.median(min(p) for p in self.rates)
        middle = self.median_rate()
        share = statistics.median(min(p) for p in self.shares)
        growth = max(self.rss_growth) / 2**20
        print(f"  {label}:")
        print(
            f"    slowest client                    {worst:12,.0f} lines/s  {pct(worst, base)} "
            "(≥ 50 %)"
        )
        print(f"    median client                     {middle:12,.0f} lines/s  {pct(middle, base)}")
        paired = statistics.median(self.paired)
        print(
            f"    slowest client / raw of the same run, median   {paired * 100:5.1f} %  "
            f"(runs: {', '.join(f'{p * 100:.0f}' for p in self.paired)})"
        )
        print(f"    lines received, least of any client        {share * 100:6.2f} %  (≥ 99 %)")
        print(f"    agent RSS growth, most of any run          {growth:6.1f} MB")
        return {
            "slowest_lines_per_s": worst,
            "median_lines_per_s": middle,
            "slowest_ratio": worst / base,
            "median_ratio": middle / base,
            "paired_slowest_ratio": paired,
            "min_share": share,
            "rss_growth_mb": growth,
            "cpu_s_per_100k": statistics.median(self.cpu),
        }


async def under_throttle(
    args: argparse.Namespace, agent: AgentProcess, internal_id: str
) -> dict[str, Any]:
    bursts, per_burst = 40, 1800  # 1800 lines every ≥ 100 ms: just under 2000 / 100 ms
    producer = (
        f"i=0; while [ $i -lt {bursts} ]; do busybox seq 1 {per_burst}; "
        "busybox usleep 100000; i=$((i+1)); done"
    )
    delivery = await deliver(agent, internal_id, args.clients, producer)
    readers, elapsed = delivery.readers, delivery.elapsed
    expected = bursts * per_burst
    shares = [r.lines / expected for r in readers]
    rate = expected / elapsed
    print(f"\ndefault throttle (2000 lines / 100 ms), producer at {rate:,.0f} lines/s")
    print(
        f"  share of lines each of {args.clients} clients received: min {min(shares) * 100:.1f} %, "
        f"max {max(shares) * 100:.1f} % (target 100 %); throttle notices "
        f"{sum(r.notices for r in readers)}"
    )
    return {"producer_lines_per_s": expected / elapsed, "min_share": min(shares)}


async def many_containers(
    args: argparse.Namespace,
    agent: AgentProcess,
    engine: DockerEngine,
    client: httpx.AsyncClient,
    volume: str,
) -> dict[str, Any]:
    ids = [f"{PREFIX}-n{n}" for n in range(args.containers)]
    idle_rss = agent.rss()
    command = "while :; do echo tick; sleep 1; done"
    limiter = trio.CapacityLimiter(10)

    async def make(internal_id: str) -> None:
        async with limiter:
            await running_container(client, internal_id, volume, command)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for internal_id in ids:
            nursery.start_soon(make, internal_id)
    print(
        f"\n{len(ids)} containers running after {time.perf_counter() - started:.1f} s", flush=True
    )
    counts = {"stats": 0, "console": 0}

    async def watch(internal_id: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with agent.ws(internal_id) as ws:
            task_status.started()
            while True:
                event = json.loads(await ws.get_message())["event"]
                if event in counts:
                    counts[event] += 1

    result: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        for internal_id in ids:
            await nursery.start(watch, internal_id)
        await trio.sleep(3)  # the first stats need two samples
        counts.update(stats=0, console=0)
        cpu, wall = agent.cpu(), time.perf_counter()
        await trio.sleep(args.window)
        cpu, wall = agent.cpu() - cpu, time.perf_counter() - wall
        rss = agent.rss()
        nursery.cancel_scope.cancel()
    print(
        f"  agent CPU {cpu / wall * 100:.1f} % of one core (≤ 25 %), RSS {rss / 2**20:.0f} MB "
        f"(≤ 200 MB; {idle_rss / 2**20:.0f} MB idle); clients got "
        f"{counts['stats'] / wall:.0f} stats and {counts['console'] / wall:.0f} console frames/s"
    )
    result.update(
        containers=len(ids),
        cpu_percent=cpu / wall * 100,
        rss_mb=rss / 2**20,
        idle_rss_mb=idle_rss / 2**20,
        stats_frames_per_s=counts["stats"] / wall,
    )
    if args.stats_sample:
        info = await trio.to_thread.run_sync(
            lambda: [
                (c.labels.get("lightd.internal_id", ""), c.id)
                for c in docker.from_env().containers.list(filters={"label": "lightd.role=server"})
            ]
        )
        chosen = [cid for iid, cid in info if iid in set(ids)][: args.stats_sample]
        figures = await compare_stats_sources(engine, chosen, args.stats_seconds)
        if figures:
            print(f"\nstats sources, {figures['containers']} running containers")
            print(
                f"  cgroup files: {figures['cgroup_ms_per_sample']:.3f} ms per sample, in the agent"
            )
            print(
                f"  Docker stats stream: {figures['api_agent_ms_per_sample']:.3f} ms (agent) + "
                f"{figures['api_dockerd_ms_per_sample']:.3f} ms (dockerd) per sample, "
                f"{figures['api_samples_per_container_s']:.2f} samples/s per container, "
                "one thread each"
            )
        result["stats_sources"] = figures
    async with trio.open_nursery() as nursery:
        for internal_id in ids:
            nursery.start_soon(client.delete, f"/containers/{internal_id}")
    return result


def sweep(raw: docker.DockerClient) -> None:
    """Remove every container this bench made, whatever state it was left in (others'
    containers come and go meanwhile: the list is read sparse, a vanished one is skipped)."""
    mine = raw.containers.list(all=True, sparse=True, filters={"label": f"lightd.bench={PREFIX}"})
    managed = raw.containers.list(all=True, sparse=True, filters={"label": "lightd.managed=true"})
    for c in mine + managed:
        if c in mine or (c.attrs.get("Labels") or {}).get("lightd.internal_id", "").startswith(
            PREFIX
        ):
            with suppress(docker.errors.NotFound):
                c.remove(force=True)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raw = docker.from_env()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="wsbench-") as tmp:
            folder = Path(tmp)
            async with trio.open_nursery() as nursery:
                engine = DockerEngine(docker_url("/var/run/docker.sock"))
                await nursery.start(engine.serve)
                await engine.wait_available()
                console: dict[str, Any] = {"throttle_lines": 0}
                if args.hold_share is not None:
                    console["hold_share"] = args.hold_share
                extra = {}
                if args.queue_bytes is not None:
                    extra["websocket"] = {"queue_bytes": args.queue_bytes}
                async with (
                    agent_process(folder, console, extra=extra) as agent,
                    api(agent) as client,
                ):
                    volume = (await client.post("/volumes")).json()["volume_id"]
                    internal_id = f"{PREFIX}-console"
                    await running_container(client, internal_id, volume)
                    print(f"agent at {agent.url}, pid {agent.proc.pid}", flush=True)
                    if args.lines:
                        results["throughput"] = await throughput(
                            args, agent, engine, raw, internal_id
                        )
                    # The default throttle, applied live by a config reload.
                    raw_config = json.loads(agent.config.read_text())
                    raw_config["console"] = {}
                    agent.config.write_text(json.dumps(raw_config))
                    (await client.post("/remote/config/reload")).raise_for_status()
                    if args.lines:
                        results["throttle"] = await under_throttle(args, agent, internal_id)
                    await client.delete(f"/containers/{internal_id}")
                    if args.containers:
                        results["many"] = await many_containers(args, agent, engine, client, volume)
                nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(sweep, raw)
        raw.close()
    return results


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000, help="0 skips phases 1 to 3")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument(
        "--stalled", type=int, default=5, help="clients that never read, beside --clients"
    )
    parser.add_argument("--containers", type=int, default=100, help="0 skips that phase")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hold-share", type=float, help="console.hold_share (agent default)")
    parser.add_argument("--queue-bytes", type=int, help="websocket.queue_bytes (agent default)")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--stats-sample", type=int, default=20, help="containers; 0 skips")
    parser.add_argument("--stats-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    figures = trio.run(main, arguments)
    if arguments.json:
        print(json.dumps(figures, indent=2))
