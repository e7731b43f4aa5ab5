"""Container life-cycle costs of the agent next to raw docker-py, measured in one run.

Prints, each beside its baseline:

* create → ready (no install script) vs a raw ``containers.create``  (target: ≤ raw + 50 ms)
* start → running (no start pattern) vs a raw ``container.start``     (target: ≤ raw + 50 ms)
* ``GET /containers/:id`` p50 vs a raw inspect p50                     (target: ≤ raw),
  and beside them the floor of the stack: a bare ASGI app on hypercorn sending the same bytes
* 20 concurrent creates until all ready vs 20 raw concurrent creates   (target: ≤ 1.5 x),
  the median of rounds that alternate agent and raw
* reconciling 100 running containers after an agent restart            (target: ≤ 5 s)

Run: ``.venv/bin/python -m bench.containers [--runs 15] [--reconcile 100]``. Needs the
Docker engine of ``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image.
Every container it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.http import agent_like_config, free_port

IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
VENDOR = "Application/vnd.pkglatv1+json"
POLL = 0.002


@contextmanager
def agent(folder: Path) -> Iterator[tuple[httpx.Client, Path]]:
    """Run the agent as its own process (as in production) and give a client of it."""
    config = folder / "config.json"
    token = "lightd_" + "b" * 32
    if not config.exists():
        config.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": 0},
                    "authorization": {"token": token},
                    "containers": {"stop_timeout": 2},
                }
            )
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightd", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        url = ""
        while not url:
            line = proc.stderr.readline()
            if not line:
                raise SystemExit("the agent exited before listening")
            if "listening on " in line:
                url = line.rsplit("listening on ", 1)[1].strip()
        headers = {"Accept": VENDOR, "Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            yield client, config
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def serve_floor(port: int) -> None:
    """Serve the bytes read from stdin to every request: a bare ASGI app on hypercorn's
    trio worker, set up as the agent's (``python -m bench.containers --serve-floor PORT``)."""
    import hypercorn.trio
    import trio

    body = sys.stdin.buffer.read()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    trio.run(hypercorn.trio.serve, app, agent_like_config(port))


@contextmanager
def floor_server(body: bytes) -> Iterator[httpx.Client]:
    """A bare ASGI app on hypercorn's trio worker answering ``body`` to every request."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.containers", "--serve-floor", str(port)],
        stdin=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(body)
        proc.stdin.close()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.get("/")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield client
    finally:
        proc.kill()
        proc.wait()


def wait_until(client: httpx.Client, internal_id: str, **expected: Any) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        body = client.get(f"/containers/{internal_id}").json()
        if all(body.get(k) == v for k, v in expected.items()):
            return
        if body.get("install_state") == "failed":
            raise SystemExit(f"{internal_id} failed: {body.get('error')}")
        time.sleep(POLL)
    raise SystemExit(f"{internal_id} never reached {expected}")


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def median(values: list[float]) -> float:
    return statistics.median(values)


def measure(
    client: httpx.Client, raw: docker.DockerClient, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """The single-call and concurrent figures, agent next to raw docker-py."""
    label = {"lightd.bench": "1"}
    volume = client.post("/volumes").json()["volume_id"]

    def body(internal_id: str) -> dict[str, Any]:
        return {
            "internal_id": internal_id,
            "image": IMAGE,
            "volume_id": volume,
            "startup_command": "sleep 3600",
        }

    def agent_create(internal_id: str) -> None:
        client.post("/containers", json=body(internal_id)).raise_for_status()
        wait_until(client, internal_id, install_state="ready")

    def agent_start(internal_id: str) -> None:
        client.post(f"/containers/{internal_id}/start").raise_for_status()
        wait_until(client, internal_id, state="running")

    creates, raw_creates, starts, raw_starts = [], [], [], []
    made: list[Any] = []
    for n in range(args.runs):
        creates.append(timed(lambda n=n: agent_create(f"bench-{n}")))
        starts.append(timed(lambda n=n: agent_start(f"bench-{n}")))
        raw_creates.append(
            timed(
                lambda: made.append(
                    raw.containers.create(
                        IMAGE, ["sleep", "3600"], labels=label, stdin_open=True, detach=True
                    )
                )
            )
        )
        raw_starts.append(timed(made[-1].start))
    results = {
        "create → ready": (median(creates), median(raw_creates)),
        "start → running": (median(starts), median(raw_starts)),
    }
    # Alternating blocks, so a change in the machine's speed hits both sides alike.
    # Both decode the JSON (docker-py's inspect does). The floor: a bare ASGI app on the
    # same hypercorn sending the same bytes, what no app on this stack can go below.
    gets: list[float] = []
    inspects: list[float] = []
    floors: list[float] = []
    sample = client.get("/containers/bench-0").content
    with floor_server(sample) as floor:
        for _ in range(5):
            gets += [timed(lambda: client.get("/containers/bench-0").json()) for _ in range(100)]
            inspects += [timed(lambda: raw.api.inspect_container(made[0].id)) for _ in range(100)]
            floors += [timed(lambda: floor.get("/").json()) for _ in range(100)]
    results["GET /containers/:id p50"] = (median(gets), median(inspects))
    results["  (hypercorn floor, same bytes)"] = (median(floors), median(inspects))

    def agent_batch(ids: list[str]) -> None:
        with ThreadPoolExecutor(len(ids)) as pool:
            list(pool.map(lambda i: client.post("/containers", json=body(i)), ids))
        # One list request sees all of them (as a panel's overview page would).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listed = client.get("/containers").json()["containers"]
            ready = {c["internal_id"] for c in listed if c["install_state"] == "ready"}
            if ready >= set(ids):
                return
            time.sleep(POLL)
        raise SystemExit(f"not all of {ids[0]}… became ready")

    batch_made: list[Any] = []

    def raw_batch() -> None:
        with ThreadPoolExecutor(args.concurrent) as pool:
            batch_made.extend(
                pool.map(
                    lambda _: raw.containers.create(IMAGE, ["sleep", "3600"], labels=label),
                    range(args.concurrent),
                )
            )

    # Rounds alternate agent and raw (each cleaned up before the next): this figure swings
    # with the engine's speed from one second to the next, so one sample of each misleads.
    batches: list[float] = []
    raw_batches: list[float] = []
    for r in range(args.rounds):
        ids = [f"batch-{r}-{n}" for n in range(args.concurrent)]
        batches.append(timed(lambda ids=ids: agent_batch(ids)))
        for internal_id in ids:
            client.delete(f"/containers/{internal_id}").raise_for_status()
        raw_batches.append(timed(raw_batch))
        for container in batch_made:
            container.remove(force=True)
        batch_made.clear()
    results[f"{args.concurrent} concurrent creates"] = (median(batches), median(raw_batches))
    for n in range(args.reconcile):
        client.post("/containers", json=body(f"rec-{n}")).raise_for_status()
    for n in range(args.reconcile):
        wait_until(client, f"rec-{n}", install_state="ready")
        client.post(f"/containers/rec-{n}/start").raise_for_status()
    for n in range(args.reconcile):
        wait_until(client, f"rec-{n}", state="running")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="samples per single-call figure")
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=9, help="rounds of concurrent creates")
    parser.add_argument("--reconcile", type=int, default=100, help="containers to reconcile")
    parser.add_argument("--serve-floor", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor(args.serve_floor)
        return
    raw = docker.from_env(max_pool_size=64)
    try:
        with tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp:
            with agent(Path(tmp)) as (client, config):
                results = measure(client, raw, args)
            # The agent is down now; its containers keep running. Restart it.
            start = time.perf_counter()
            with agent(config.parent) as (client, _):
                listed = client.get("/containers").json()["containers"]
                reconcile = time.perf_counter() - start
                running = sum(
                    1
                    for c in listed
                    if c["internal_id"].startswith("rec-") and c["state"] == "running"
                )
                for c in listed:
                    client.delete(f"/containers/{c['internal_id']}")
    finally:
        # The raw ones, and whatever the agent's were left if the run broke off.
        for c in raw.containers.list(all=True, filters={"label": "lightd.bench=1"}):
            c.remove(force=True)
        for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith(("bench-", "batch-", "rec-")):
                c.remove(force=True)
        raw.close()

    print(
        f"lightd container bench: {args.runs} samples per single-call figure, 500 per GET,"
        f" {args.rounds} alternating rounds of concurrent creates; image {IMAGE}\n"
    )
    print(f"{'figure':34} {'agent':>10} {'raw docker':>11} {'diff':>10} {'ratio':>7}")
    for name, (ours, base) in results.items():
        d = 3 if base < 10 else 1  # sub-millisecond figures need their digits
        print(
            f"{name:34} {ours:8.{d}f}ms {base:9.{d}f}ms {ours - base:+8.{d}f}ms {ours / base:6.2f}×"
        )
    print(
        f"\nreconcile {args.reconcile} running containers after restart: {reconcile:.2f} s"
        f" (process start → API answers; {running}/{args.reconcile} adopted as running;"
        " target ≤ 5 s)"
    )
    print("targets: create/start ≤ raw + 50 ms; GET ≤ raw inspect; concurrent ≤ 1.5×")


if __name__ == "__main__":
    main()
