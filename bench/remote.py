"""Remote sync throughput: how fast the agent drains a backlog of queued updates into a panel.

In one run, against one mock panel process (``python -m examples.panel_mock``):
  1. a bare httpx loop POSTs N updates to ``/update`` one after the other (keep-alive): the
     ceiling for one ordered stream of POSTs to that panel (half of them before step 2 and
     half after, so that other load on the machine weighs on both alike);
  2. the agent (``python -m lightd``, its own process) starts with N updates already queued
     in its outbox (written through the plugin's ``Outbox`` into the agent's state store,
     as a panel outage would leave them) and delivers them; meanwhile this script times the
     agent's API (``GET /remote/status`` and ``GET /api/v1/public/ping``, one request every
     ~20 ms), then times it again once the backlog is gone (idle).
Rates are taken from the panel's own arrival times (first to last update of each sender),
so process start-up is not counted. Prints updates/s of both, their ratio (target >= 50 %)
and the API's p50/p99 latency while draining (target p99 < 20 ms).

Run (no Docker engine needed)::

    .venv/bin/python -m bench.remote [--updates 10000] [--json]

Exits 1 when the agent did not deliver every update exactly once in order per server:
such figures are void.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
ACCEPT = "Application/vnd.pkglatv1+json"
AGENT_TOKEN = "lightd_" + "ab" * 16  # the node's token at the panel (node "agent")
BARE_TOKEN = "lightd_" + "cd" * 16  # the bare loop's token (node "bare")
SERVERS = 50
STATES = ("installing", "ready", "starting", "running", "stopping", "offline")
TARGET_RATIO = 0.50
TARGET_P99_MS = 20.0
PROBE_EVERY = 0.020
READY_TIMEOUT = 60.0


def bodies(count: int, prefix: str) -> list[tuple[str, str, str, int]]:
    """``count`` updates as the plugin builds them: ``(server, event_id, json, timestamp)``."""
    from lightd.plugins.remote_sync.sync import update_body

    now = int(time.time())
    rows = []
    for i in range(count):
        server = f"{prefix}-{i % SERVERS}"
        state = STATES[(i // SERVERS) % len(STATES)]
        event_id = str(uuid.uuid4())
        body = update_body(server, state, None, event_id=event_id, timestamp=now)
        rows.append((server, event_id, json.dumps(body, separators=(",", ":")), now))
    return rows


@contextmanager
def process(argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Any]:
    """A subprocess in its own session, stopped (SIGTERM, then SIGKILL) on the way out."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_log(proc: Any, log: Path, pattern: str) -> str:
    """The first group of ``pattern`` once the process logged it."""
    deadline = trio.current_time() + READY_TIMEOUT
    while trio.current_time() < deadline:
        text = await trio.Path(log).read_text(errors="replace")
        if found := re.search(pattern, text):
            return found[1]
        if proc.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {proc.returncode}:\n{text[-3000:]}")
        await trio.sleep(0.05)
    raise RuntimeError(f"{log.stem} did not start within {READY_TIMEOUT:.0f}s")


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def latency(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        path: {
            "n": len(values),
            "p50_ms": percentile(values, 50) * 1000,
            "p99_ms": percentile(values, 99) * 1000,
            "max_ms": max(values) * 1000 if values else math.nan,
        }
        for path, values in samples.items()
    }


async def probe(url: str, token: str, samples: dict[str, list[float]], stop: trio.Event) -> None:
    """Time the agent's API, one request at a time, until ``stop``."""
    headers = {"Accept": ACCEPT, "Authorization": f"Bearer {token}"}
    paths = list(samples)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:
        i = 0
        while not stop.is_set():
            path = paths[i % len(paths)]
            started = time.perf_counter()
            response = await client.get(path)
            samples[path].append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"GET {path} answered {response.status_code}")
            i += 1
            await trio.sleep(PROBE_EVERY)


async def bare_loop(panel: str, count: int, prefix: str) -> None:
    """POST ``count`` updates to the panel one after the other, as fast as it takes them."""
    headers = {"Authorization": f"Bearer {BARE_TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=10) as bare:
        for _, _, body, _ in bodies(count, prefix):
            response = await bare.post(f"{panel}/update", content=body, headers=headers)
            response.raise_for_status()


def rate(entries: list[dict[str, Any]]) -> tuple[float, float]:
    """(updates/s, seconds) from the panel's arrival times of one sender's updates."""
    times = [e["received_at"] for e in entries]
    span = max(times) - min(times)
    return ((len(times) - 1) / span if span > 0 else math.inf), span


async def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from lightd.plugins.remote_sync.outbox import MIGRATIONS, Outbox
    from lightd.store import open_store

    n = args.updates
    env = {**os.environ, "PANEL_MOCK_TOKEN": f"agent={AGENT_TOKEN},bare={BARE_TOKEN}"}
    panel_log = root / "panel.log"
    with process(
        [sys.executable, "-m", "examples.panel_mock", "--port", "0"], panel_log, env
    ) as panel_proc:
        panel = await wait_log(panel_proc, panel_log, r"agents report to (http://\S+)")
        async with httpx.AsyncClient(base_url=panel, timeout=30) as client:
            # 1. the bare loop, half before the agent's drain and half after it, so that a
            # change of load on the machine during the run weighs on both sides alike
            print(f"bare httpx loop: {n // 2} POSTs to {panel}/update", file=sys.stderr)
            await bare_loop(panel, 200, "warmup")
            await bare_loop(panel, n // 2, "bare1")

            # 2. the agent, with n updates queued before it starts
            node = root / "node"
            node.mkdir()
            config = node / "config.json"
            await trio.run_process(
                [sys.executable, "-m", "lightd", "--config", str(config), "--token", "reset"],
                cwd=ROOT,
                capture_stdout=True,
                capture_stderr=True,
            )
            raw = json.loads(config.read_text())
            raw["server"].update(host="127.0.0.1", port=0)
            raw["remote"].update(enabled=True, url=panel, token=AGENT_TOKEN)
            config.write_text(json.dumps(raw, indent=2))
            queued = bodies(n, "srv")
            async with open_store(node / "storage", MIGRATIONS) as store:
                await Outbox(store).put_many(queued, limit=raw["remote"]["outbox_max"])
            print(f"agent: {n} updates queued in its outbox; starting it", file=sys.stderr)
            agent_log = root / "agent.log"
            with process(
                [sys.executable, "-m", "lightd", "--config", str(config)], agent_log
            ) as agent_proc:
                url = await wait_log(agent_proc, agent_log, r"listening on (http://\S+)")
                token = raw["authorization"]["token"]
                draining: dict[str, list[float]] = {"/remote/status": [], "/api/v1/public/ping": []}
                idle: dict[str, list[float]] = {"/remote/status": [], "/api/v1/public/ping": []}
                async with trio.open_nursery() as nursery:
                    drained = trio.Event()
                    nursery.start_soon(probe, url, token, draining, drained)
                    with trio.fail_after(max(120.0, n / 20)):
                        while True:
                            state = (await client.get("/api/state")).json()
                            node_state = [x for x in state["nodes"] if x["name"] == "agent"]
                            done = (
                                sum(c["updates"] for c in node_state[0]["containers"])
                                if (node_state)
                                else 0
                            )
                            if done >= n:
                                break
                            await trio.sleep(0.1)
                    drained.set()
                idle_stop = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(probe, url, token, idle, idle_stop)
                    await trio.sleep(args.idle)
                    idle_stop.set()
            print(f"bare httpx loop: {n - n // 2} POSTs again", file=sys.stderr)
            await bare_loop(panel, n - n // 2, "bare2")
            updates = (await client.get("/api/updates")).json()
    received = updates["updates"]
    mine = [e for e in received if e["node"] == "agent"]
    agent_rate, agent_span = rate(mine)
    halves = [
        rate([e for e in received if e["node"] == "bare" and e["server"].startswith(f"{p}-")])
        for p in ("bare1", "bare2")
    ]
    bare_span = sum(span for _, span in halves)
    bare_rate = (n - 2) / bare_span if bare_span else math.inf
    problems = []
    if len(mine) != n:
        problems.append(f"the panel got {len(mine)} distinct updates from the agent, not {n}")
    expected: dict[str, list[str]] = {}
    for _, event_id, body, _ in queued:
        expected.setdefault(json.loads(body)["server"], []).append(event_id)
    got: dict[str, list[str]] = {}
    for entry in mine:
        got.setdefault(entry["server"], []).append(entry["event_id"])
    if got != expected:
        problems.append("the agent's updates did not arrive in order per server")
    ratio = agent_rate / bare_rate if bare_rate else 0.0
    lat = latency(draining)
    return {
        "updates": n,
        "bare": {
            "updates_per_s": bare_rate,
            "seconds": bare_span,
            "halves_updates_per_s": [r for r, _ in halves],
        },
        "agent": {"updates_per_s": agent_rate, "seconds": agent_span},
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "api_while_draining": lat,
        "api_idle": latency(idle),
        "target_p99_ms": TARGET_P99_MS,
        "panel_duplicates": updates["duplicates"],
        "meets_targets": ratio >= TARGET_RATIO
        and all(v["p99_ms"] < TARGET_P99_MS for v in lat.values()),
        "valid": not problems,
        "problems": problems,
        "load_average": os.getloadavg(),
    }


def print_report(report: dict[str, Any]) -> None:
    n = report["updates"]
    print(f"lightd remote sync bench: {n} updates, one mock panel process, 2 cores shared\n")
    for name in ("bare", "agent"):
        figures = report[name]
        label = "bare httpx loop" if name == "bare" else "agent outbox drain"
        print(
            f"{label:<20} {figures['updates_per_s']:>8.0f} updates/s"
            f"  ({n} in {figures['seconds']:.2f}s)"
        )
    ok = "ok" if report["ratio"] >= report["target_ratio"] else "BELOW TARGET"
    print(f"ratio agent / bare   {report['ratio']:>8.1%}  (target >= {TARGET_RATIO:.0%})  {ok}\n")
    for title, key in (("while draining", "api_while_draining"), ("idle", "api_idle")):
        for path, figures in report[key].items():
            verdict = ""
            if key == "api_while_draining":
                verdict = "ok" if figures["p99_ms"] < TARGET_P99_MS else "ABOVE TARGET"
                verdict = f"  (target p99 < {TARGET_P99_MS:.0f} ms)  {verdict}"
            print(
                f"API {title:<15} GET {path:<22} p50 {figures['p50_ms']:6.2f} ms"
                f"  p99 {figures['p99_ms']:6.2f} ms  max {figures['max_ms']:6.2f} ms"
                f"  (n={figures['n']}){verdict}"
            )
    print(f"\nload average (1/5/15 min): {', '.join(f'{v:.2f}' for v in report['load_average'])}")
    if not report["valid"]:
        print("\n!!! INVALID RUN: " + "; ".join(report["problems"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=10_000, help="backlog size (10000)")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds of idle API timing")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if args.updates < 2:
        parser.error("--updates must be >= 2")
    with tempfile.TemporaryDirectory(prefix="lightd-bench-remote-") as tmp:
        try:
            report = trio.run(run, args, Path(tmp))
        except RuntimeError as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
