"""The node event stream (contract §17) under real container churn, next to Docker's own
event stream, in one run.

``--containers`` (100) real containers are created and installed, then ``--clients`` (10)
SSE readers of ``GET /events`` and one reader of Docker's ``/events`` (the baseline: the
engine's own stream of the same changes, read with docker-py) connect, and every container
is started, then killed, through the agent's API (``--concurrency`` at a time): each
container passes ``starting → running → stopping → offline``, four ``container.state``
events, while Docker sees ``start`` and ``die``. Prints:

* events delivered per SSE client and in all, and the delivery rate (events/s) over the
  churn;
* lag of each delivery: the client's receive time minus the event's ``timestamp`` (set at
  ``publish``), p50 / p99 / max (target p99 < 50 ms); the baseline is Docker's lag for
  ``start``/``die`` (receive time minus Docker's ``timeNano``), and the ratio of the p99s;
* that no client missed an event (seq contiguous per client, no ``resync``).

The agent runs as its own process (``python -m lightd``), as in production; the readers
and the driver run in this process. Same host, same clock: timestamps are comparable
(the agent's have millisecond precision).

Run: ``.venv/bin/python -m bench.events [--containers 100] [--clients 10]``. Needs the
engine of ``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image. Every
container it makes is removed at the end, whatever happens. On a 2-core machine the
agent, dockerd and the clients share the cores: the lags include that contention.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
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

    async def run(self, url: str, ready: trio.Event) -> None:
        async with (
            httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=None) as client,
            client.stream("GET", "/events") as response,
        ):
            lines = response.aiter_lines()
            await anext(lines)  # the opening comment: subscribed
            ready.set()
            async for line in lines:
                if not line.startswith("data: "):
                    continue
                now = time.time()
                event = json.loads(line[6:])
                self.seqs.append(event["seq"])
                self.types.append(event["type"])
                if event["type"] == "container.state":
                    self.lags.append(now - event["timestamp"])
                    self.first = self.first or now
                    self.last = now
                    if len(self.lags) >= self.expected:
                        self.done.set()


class DockerEvents:
    """Docker's own stream of the same changes, read in a thread (docker-py blocks)."""

    def __init__(self, raw: docker.DockerClient) -> None:
        self.lags: list[float] = []
        self.stream = raw.events(
            decode=True,
            filters={
                "type": "container",
                "label": "lightd.managed=true",
                "event": ["start", "die"],
            },
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.stream:
                self.lags.append(time.time() - event["timeNano"] / 1e9)
        except Exception:  # closed from the other side at the end
            pass

    def close(self) -> None:
        self.stream.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def ms(value: float) -> str:
    return f"{value * 1000:.1f} ms"


def sweep(raw: docker.DockerClient) -> None:
    for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
        if c.labels.get("lightd.internal_id", "").startswith(PREFIX):
            c.remove(force=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raw = docker.from_env()
    try:
        with tempfile.TemporaryDirectory(prefix="evbench-") as tmp:
            async with (
                agent_process(Path(tmp), {}) as agent,
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
                expected = 4 * len(ids)
                readers = [SSEClient(expected) for _ in range(args.clients)]
                baseline = await trio.to_thread.run_sync(DockerEvents, raw)
                async with trio.open_nursery() as nursery:
                    for reader in readers:
                        ready = trio.Event()
                        nursery.start_soon(reader.run, agent.url, ready)
                        await ready.wait()
                    t0 = time.perf_counter()
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
                    with trio.fail_after(30):
                        for reader in readers:
                            await reader.done.wait()
                    nursery.cancel_scope.cancel()
                await trio.to_thread.run_sync(baseline.close)
                await in_parallel(
                    args.concurrency, [lambda i=i: client.delete(f"/containers/{i}") for i in ids]
                )
    finally:
        await trio.to_thread.run_sync(sweep, raw)
        raw.close()
    lags = [lag for r in readers for lag in r.lags]
    delivered = sum(len(r.lags) for r in readers)
    span = max(r.last for r in readers) - min(r.first or 0 for r in readers)
    gaps = sum(
        1 for r in readers if r.seqs != list(range(r.seqs[0], r.seqs[0] + len(r.seqs)))
    ) + sum(r.types.count("resync") for r in readers)
    return {
        "containers": len(ids),
        "clients": len(readers),
        "churn_s": churn,
        "state_events": expected,
        "per_client": [len(r.lags) for r in readers],
        "delivered": delivered,
        "events_per_s": delivered / span if span > 0 else float("nan"),
        "published_per_s": expected / span if span > 0 else float("nan"),
        "lag_p50": pct(lags, 0.50),
        "lag_p99": pct(lags, 0.99),
        "lag_max": max(lags),
        "docker_events": len(baseline.lags),
        "docker_lag_p50": pct(baseline.lags, 0.50),
        "docker_lag_p99": pct(baseline.lags, 0.99),
        "gaps": gaps,
    }


def report(f: dict[str, Any]) -> None:
    print(
        f"{f['containers']} containers started then killed through the agent in "
        f"{f['churn_s']:.1f} s: {f['state_events']} container.state events"
    )
    print(
        f"delivered to {f['clients']} SSE clients: {f['delivered']} "
        f"(per client {min(f['per_client'])}..{max(f['per_client'])}), "
        f"{f['events_per_s']:.0f} events/s delivered ({f['published_per_s']:.0f}/s published); "
        f"gaps or resyncs: {f['gaps']}"
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


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    figures = trio.run(run, arguments)
    report(figures)
    if arguments.json:
        print(json.dumps(figures, indent=2))
