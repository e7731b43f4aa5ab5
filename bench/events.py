"""The node event stream (contract §17) under real container churn, next to Docker's own
event stream, in one run.

``--containers`` (100) real containers are created and installed, then ``--clients`` (10)
SSE readers of ``GET /events`` and one reader of Docker's ``/events`` (the baseline: the
engine's own stream of the same changes) connect, and every container is started, then
killed, through the agent's API (``--concurrency`` at a time): each container passes
``starting → running → stopping → offline``, four ``container.state`` events, while
Docker sees ``start`` and ``die``. Prints:

* events delivered per SSE client and in all, and the delivery rate (events/s) over the
  churn;
* **lag seen by the clients**: each delivery's receive time minus the event's
  ``timestamp`` (set at ``publish``, millisecond precision), p50 / p99 / max (target p99
  < 50 ms); the baseline is Docker's lag for ``start``/``die`` (receive time minus
  Docker's ``timeNano``), read by the same reader process, and the ratio of the p99s;
* **the agent's own share** of that lag, from its metric
  ``lightd_events_delivery_seconds{transport="sse"}`` (publish → the SSE chunk written to
  the client's connection; scraped before and after the churn, so only this run's
  deliveries): the bucket holding p50 / p99 and the share within 50 ms. What the clients
  see beyond it is the kernel's loopback plus the reader's own delay;
* that no client missed an event (seq contiguous per client, no ``resync``; a stream the
  agent ends at its read timeout is resumed with ``Last-Event-ID``);
* the agent's CPU during the churn (% of one core), the load average and the share of
  the churn in which some task waited for a CPU (``/proc/pressure/cpu``), so a reader
  can tell a quiet run from a loaded one.

**Who timestamps.** The readers run in ``--reader-procs`` (1) processes of their own, which
only read and timestamp (httpx, one trio loop per process); the driver (the API calls and
the polling of ``GET /containers``) runs in this process. With ``--reader-procs 0`` the
readers run in this process next to the driver, as the first version of this bench did:
then a delivery's receive time also holds whatever this process was busy with (the
driver's JSON, its polling), which is the bench's lag, not the agent's. The agent runs as
its own process (``python -m lightd``), as in production. Same host, same clock:
timestamps are comparable.

**What it showed** (December 2026, 2 cores shared with other work, some task waiting for
a CPU 94-97 % of the time): the agent's share is nearly all of the clients' lag (its p50
bucket holds the clients' p50), and readers in their own process or in the driver's
gave no consistent difference, so the lag is the agent's, not the bench's. Of the time
between a publish and the last client's chunk written, the agent's own CPU was a small
part (p50 about 6 ms, measured with a trio instrument): the rest was waiting for a CPU,
and the tail also held garbage collections (a full one took up to 0.47 s of wall time
there). ``--nice -10`` (root) runs the agent and the readers ahead of other work; on
that machine it did not bring the tail down.

Run: ``.venv/bin/python -m bench.events [--containers 100] [--clients 10] [--reader-procs
1] [--nice N] [--disable PLUGIN]``. Needs the engine of ``scripts/docker-engine.sh``
(``DOCKER_HOST``) and its test image. Every container it makes is removed at the end,
whatever happens. On a 2-core machine the agent, dockerd, the driver and the readers
share the cores: every lag here includes that contention, and a loaded machine (other
work running) raises them all: compare with Docker's in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import trio

from bench.websocket import TOKEN, VENDOR, agent_process

IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
PREFIX = "evbench"
HEADERS = {"Accept": VENDOR, "Authorization": f"Bearer {TOKEN}"}
DELIVERY = "lightd_events_delivery_seconds"


async def wait_all(client: httpx.AsyncClient, ids: list[str], **expected: Any) -> None:
    with trio.fail_after(300):
        while True:
            listed = (await client.get("/containers")).json()
            rows = listed["containers"] if isinstance(listed, dict) else listed
            mine = [r for r in rows if r.get("internal_id") in ids]
            if len(mine) == len(ids) and all(
                all(r.get(k) == v for k, v in expected.items()) for r in mine
            ):
                return
            failed = [r for r in mine if r.get("install_state") == "failed"]
            if failed:
                raise SystemExit(f"install failed: {failed[0].get('error')}")
            await trio.sleep(0.2)


async def in_parallel(limit: int, calls: list[Any]) -> None:
    gate = trio.CapacityLimiter(limit)

    async def one(call: Any) -> None:
        async with gate:
            response = await call()
            if response.status_code >= 300:
                raise SystemExit(f"{response.request.url}: {response.status_code} {response.text}")

    async with trio.open_nursery() as nursery:
        for call in calls:
            nursery.start_soon(one, call)


# -- the readers (in a process of their own, or in this one) ------------------------------


class SSEClient:
    def __init__(self, expected: int) -> None:
        #: ``container.state`` events to wait for; ``done`` is set once they came.
        self.expected = expected
        self.done = trio.Event()
        self.seqs: list[int] = []
        self.lags: list[float] = []
        self.types: list[str] = []
        self.first: float | None = None
        self.last = 0.0
        self.reconnects = 0

    async def run(self, url: str, ready: trio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=None) as client:
            while True:  # the agent ends a stream before its read timeout: resume it
                headers = {"Last-Event-ID": str(self.seqs[-1])} if self.seqs else {}
                async with client.stream("GET", "/events", headers=headers) as response:
                    lines = response.aiter_lines()
                    await anext(lines)  # the opening comment: subscribed
                    ready.set()
                    async for line in lines:
                        if line.startswith("data: "):
                            self.received(time.time(), line)
                self.reconnects += 1

    def received(self, now: float, line: str) -> None:
        event = json.loads(line[6:])
        self.seqs.append(event["seq"])
        self.types.append(event["type"])
        if event["type"] == "container.state":
            self.lags.append(now - event["timestamp"])
            self.first = self.first or now
            self.last = now
            if len(self.lags) >= self.expected:
                self.done.set()

    def figures(self) -> dict[str, Any]:
        return {
            "seqs": self.seqs,
            "types": self.types,
            "lags": self.lags,
            "first": self.first,
            "last": self.last,
            "reconnects": self.reconnects,
        }


async def docker_events(lags: list[float], ready: trio.Event) -> None:
    """Docker's own stream of the same changes (``start``/``die`` of managed containers),
    read over the engine's socket in the same trio loop as the SSE readers."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        raise SystemExit("the Docker baseline needs a unix:// DOCKER_HOST")
    transport = httpx.AsyncHTTPTransport(uds=host.removeprefix("unix://"))
    filters = {
        "type": ["container"],
        "label": ["lightd.managed=true"],
        "event": ["start", "die"],
    }
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://docker", timeout=None) as client,
        client.stream("GET", "/events", params={"filters": json.dumps(filters)}) as response,
    ):
        response.raise_for_status()
        ready.set()
        async for line in response.aiter_lines():
            if line.strip():
                now = time.time()
                lags.append(now - json.loads(line)["timeNano"] / 1e9)


async def read_events(
    url: str, clients: int, expected: int, baseline: bool, started: trio.Event, stop: trio.Event
) -> dict[str, Any]:
    """Run ``clients`` SSE readers (and Docker's stream when ``baseline``); ``started`` is
    set once all are subscribed. After ``stop``, wait (30 s at most) for every reader to
    have its ``expected`` events; return what they got."""
    readers = [SSEClient(expected) for _ in range(clients)]
    docker_lags: list[float] = []
    async with trio.open_nursery() as nursery:
        for reader in readers:
            ready = trio.Event()
            nursery.start_soon(reader.run, url, ready)
            await ready.wait()
        if baseline:
            ready = trio.Event()
            nursery.start_soon(docker_events, docker_lags, ready)
            await ready.wait()
        started.set()
        await stop.wait()
        with trio.move_on_after(30):
            for reader in readers:
                await reader.done.wait()
        nursery.cancel_scope.cancel()
    return {"clients": [r.figures() for r in readers], "docker_lags": docker_lags}


async def reader_main(args: argparse.Namespace) -> None:
    """``--reader-of URL``: the readers as a process of their own. Prints ``ready`` once
    subscribed, reads ``stop`` from stdin, then prints its figures as one JSON line."""
    started, stop = trio.Event(), trio.Event()
    stdin = trio.lowlevel.FdStream(os.dup(0))

    async def wait_stop() -> None:
        await started.wait()
        print("ready", flush=True)
        await stdin.receive_some()  # "stop" or EOF
        stop.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_stop)
        found = await read_events(
            args.reader_of, args.clients, args.expected, args.baseline, started, stop
        )
    print(json.dumps(found), flush=True)


class ReaderProcess:
    """One process running ``clients`` readers (``--reader-of``)."""

    def __init__(self, url: str, clients: int, expected: int, baseline: bool, nice: int) -> None:
        command = ["nice", "-n", str(nice)] if nice else []
        command += [sys.executable, "-m", "bench.events", "--reader-of", url]
        command += ["--clients", str(clients), "--expected", str(expected)]
        self.command = command + (["--baseline"] if baseline else [])
        self.output = b""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        proc = await trio.lowlevel.open_process(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        try:
            with trio.fail_after(60):
                while b"\n" not in self.output:
                    chunk = await proc.stdout.receive_some()
                    if not chunk:
                        raise SystemExit("a reader process ended before it was ready")
                    self.output += chunk
            self.output = self.output.partition(b"\n")[2]
            task_status.started()
            while chunk := await proc.stdout.receive_some():
                self.output += chunk
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                with trio.CancelScope(shield=True):
                    await proc.wait()

    async def stop(self) -> None:
        await self.stdin.send_all(b"stop\n")

    def figures(self) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(self.output)
        return found


# -- the agent's own share ------------------------------------------------------------------


async def delivery_buckets(client: httpx.AsyncClient) -> dict[float, int]:
    """The agent's SSE delivery histogram: upper bound → cumulative count."""
    text = (await client.get("/metrics")).text
    found: dict[float, int] = {}
    for match in re.finditer(DELIVERY + r"_bucket\{([^}]*)\} ([0-9.e+]+)", text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        if labels.get("transport") == "sse":
            found[float(labels["le"])] = int(float(match[2]))
    return found


def bucket_share(before: dict[float, int], after: dict[float, int]) -> dict[str, Any]:
    counts = {le: after.get(le, 0) - before.get(le, 0) for le in sorted(after)}
    total = counts.get(float("inf"), 0)

    def bound(q: float) -> float:
        return next((le for le, n in counts.items() if n >= q * total), float("nan"))

    return {
        "agent_sent": total,
        "agent_p50_le": bound(0.50),
        "agent_p99_le": bound(0.99),
        "agent_within_50ms": counts.get(0.05, 0) / total if total else float("nan"),
    }


# -- the run ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def sweep(raw: docker.DockerClient) -> None:
    for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
        if c.labels.get("lightd.internal_id", "").startswith(PREFIX):
            c.remove(force=True)


def cpu_waited() -> float:
    """Seconds so far in which some runnable task waited for a CPU (the kernel's pressure
    stall information; NaN where the kernel has none)."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return float("nan")
    return int(some.rpartition("total=")[2]) / 1e6


def renice(pid: int, nice: int) -> None:
    """Every thread of ``pid`` at ``nice`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)


def split(clients: int, procs: int) -> list[int]:
    return [n for n in (clients // procs + (i < clients % procs) for i in range(procs)) if n]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raw = docker.from_env()
    extra = {"plugins": {"disabled": args.disable}} if args.disable else None
    try:
        with tempfile.TemporaryDirectory(prefix="evbench-") as tmp:
            async with (
                agent_process(Path(tmp), {}, extra=extra) as agent,
                httpx.AsyncClient(base_url=agent.url, headers=HEADERS, timeout=120) as client,
            ):
                ids = [f"{PREFIX}-{n:03d}" for n in range(args.containers)]
                volumes = []
                for _ in ids:
                    volumes.append((await client.post("/volumes")).json()["volume_id"])
                t0 = time.perf_counter()
                await in_parallel(
                    args.concurrency,
                    [
                        lambda i=i, v=v: client.post(
                            "/containers",
                            json={
                                "internal_id": i,
                                "volume_id": v,
                                "image": IMAGE,
                                "startup_command": "sleep 3600",
                            },
                        )
                        for i, v in zip(ids, volumes, strict=True)
                    ],
                )
                await wait_all(client, ids, install_state="ready")
                print(
                    f"{len(ids)} containers ready in {time.perf_counter() - t0:.1f} s", flush=True
                )
                if args.nice:
                    renice(agent.proc.pid, args.nice)
                expected = 4 * len(ids)
                inline: dict[str, Any] = {}
                procs = [
                    ReaderProcess(agent.url, n, expected, not i, args.nice)
                    for i, n in enumerate(split(args.clients, max(1, args.reader_procs)))
                ]
                async with trio.open_nursery() as nursery:
                    stop = trio.Event()
                    if args.reader_procs:
                        for proc in procs:
                            await nursery.start(proc.run)
                    else:
                        started = trio.Event()

                        async def inline_readers() -> None:
                            inline.update(
                                await read_events(
                                    agent.url, args.clients, expected, True, started, stop
                                )
                            )

                        nursery.start_soon(inline_readers)
                        await started.wait()
                    before = await delivery_buckets(client)
                    cpu0, waited0, t0 = agent.cpu(), cpu_waited(), time.perf_counter()
                    await in_parallel(
                        args.concurrency,
                        [lambda i=i: client.post(f"/containers/{i}/start") for i in ids],
                    )
                    await wait_all(client, ids, state="running")
                    await in_parallel(
                        args.concurrency,
                        [lambda i=i: client.post(f"/containers/{i}/kill") for i in ids],
                    )
                    await wait_all(client, ids, state="offline")
                    churn = time.perf_counter() - t0
                    cpu = (agent.cpu() - cpu0) / churn
                    pressure = (cpu_waited() - waited0) / churn
                    load = os.getloadavg()[0]
                    stop.set()
                    for proc in procs if args.reader_procs else []:
                        await proc.stop()
                after = await delivery_buckets(client)
                await in_parallel(
                    args.concurrency, [lambda i=i: client.delete(f"/containers/{i}") for i in ids]
                )
    finally:
        await trio.to_thread.run_sync(sweep, raw)
        raw.close()
    found = [p.figures() for p in procs] if args.reader_procs else [inline]
    readers = [c for f in found for c in f["clients"]]
    docker_lags = [lag for f in found for lag in f["docker_lags"]]
    lags = [lag for r in readers for lag in r["lags"]]
    delivered = sum(len(r["lags"]) for r in readers)
    span = max(r["last"] for r in readers) - min(r["first"] or 0 for r in readers)
    gaps = sum(
        1 for r in readers if r["seqs"] != list(range(r["seqs"][0], r["seqs"][0] + len(r["seqs"])))
    ) + sum(r["types"].count("resync") for r in readers)
    return {
        "containers": len(ids),
        "clients": len(readers),
        "reader_procs": args.reader_procs,
        "nice": args.nice,
        "churn_s": churn,
        "agent_cpu": cpu,
        "load": load,
        "cpu_pressure": pressure,
        "state_events": expected,
        "per_client": [len(r["lags"]) for r in readers],
        "delivered": delivered,
        "reconnects": sum(r["reconnects"] for r in readers),
        "events_per_s": delivered / span if span > 0 else float("nan"),
        "published_per_s": expected / span if span > 0 else float("nan"),
        "lag_p50": pct(lags, 0.50),
        "lag_p99": pct(lags, 0.99),
        "lag_max": max(lags),
        "docker_events": len(docker_lags),
        "docker_lag_p50": pct(docker_lags, 0.50),
        "docker_lag_p99": pct(docker_lags, 0.99),
        "gaps": gaps,
        **bucket_share(before, after),
    }


def report(f: dict[str, Any]) -> None:
    where = (
        f"in {f['reader_procs']} reader process(es)"
        if f["reader_procs"]
        else "in the driver's process"
    )
    niced = f"; agent and readers at nice {f['nice']}" if f["nice"] else ""
    print(
        f"{f['containers']} containers started then killed through the agent in "
        f"{f['churn_s']:.1f} s: {f['state_events']} container.state events; agent CPU "
        f"{f['agent_cpu'] * 100:.0f} % of one core; machine: load average {f['load']:.1f} "
        f"on {os.cpu_count()} cores, some task waiting for a CPU "
        f"{f['cpu_pressure'] * 100:.0f} % of the time{niced}"
    )
    print(
        f"delivered to {f['clients']} SSE clients {where}: {f['delivered']} "
        f"(per client {min(f['per_client'])}..{max(f['per_client'])}), "
        f"{f['events_per_s']:.0f} events/s delivered ({f['published_per_s']:.0f}/s published); "
        f"gaps or resyncs: {f['gaps']}; streams resumed: {f['reconnects']}"
    )
    ratio = f["lag_p99"] / f["docker_lag_p99"] if f["docker_lag_p99"] > 0 else float("nan")
    print(
        f"lag publish → SSE client: p50 {ms(f['lag_p50'])}, p99 {ms(f['lag_p99'])}, "
        f"max {ms(f['lag_max'])} (target p99 < 50 ms: "
        f"{'met' if f['lag_p99'] < 0.05 else 'NOT met'})"
    )
    print(
        f"baseline, Docker's own /events ({f['docker_events']} start/die events): "
        f"p50 {ms(f['docker_lag_p50'])}, p99 {ms(f['docker_lag_p99'])}; "
        f"agent p99 / Docker p99 = {ratio:.2f}x"
    )
    print(
        f"agent's share (publish → written to the connection, its metric, "
        f"{f['agent_sent']} deliveries): p50 ≤ {ms(f['agent_p50_le'])}, "
        f"p99 ≤ {ms(f['agent_p99_le'])}, {f['agent_within_50ms'] * 100:.1f} % within 50 ms"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument(
        "--reader-procs",
        type=int,
        default=1,
        help="processes the SSE readers run in (0: in this process, next to the driver)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="run the agent and the reader processes at this nice value (negative: ahead "
        "of other work on a shared machine; needs root); dockerd and the driver keep theirs",
    )
    parser.add_argument(
        "--disable", action="append", default=[], help="a plugin not to load (repeatable)"
    )
    # The reader process (``ReaderProcess``) runs this module with these.
    parser.add_argument("--reader-of", help=argparse.SUPPRESS)
    parser.add_argument("--expected", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.reader_of:
        trio.run(reader_main, arguments)
    else:
        figures = trio.run(run, arguments)
        report(figures)
        if arguments.json:
            print(json.dumps(figures, indent=2))
