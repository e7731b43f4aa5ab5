"""What operating features cost: metrics on the request path, and scraping ``/metrics``.

1. ``bench.http``'s request mix (the authenticated ``GET /remote/config`` and the public
   ping) on two agents run side by side, one with metrics (the default) and one with
   ``"metrics": {"enabled": false}`` (no middleware at all): wrk alternates between them,
   round after round, so a change in the machine's speed hits both alike; the figure is
   the ratio of their total request rates per route.  Target: ≥ 0.95.  Beside it, each
   agent's CPU time per request (from /proc, median of the rounds): on a machine other
   work shares, the rates swing from round to round while the CPU cost stays put, and
   the off/on ratio of the costs is what the rates' ratio is on an idle machine.
2. ``GET /metrics`` with 100 containers: 100 real container records (busybox, created
   through the API, as a panel would), then the p50 of repeated scrapes, client-side
   (request to last byte).  Target: < 50 ms.  The containers are deleted at the end.

Run::

    .venv/bin/python -m bench.operating [--rounds 3] [--duration 5] [--containers 100]

Needs ``wrk`` (part 1) and the Docker engine of ``scripts/docker-engine.sh``
(``DOCKER_HOST``, part 2; ``--skip-scrape`` leaves it out).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, cast

import docker
import httpx

from bench.containers import IMAGE
from bench.containers import agent as container_agent
from bench.http import ACCEPT, CONNECTIONS, free_port, run_wrk, running

TARGET_RATIO = 0.95
TARGET_SCRAPE_MS = 50.0
#: bench.http's mix: the authenticated route and the public one.
ROUTES = ("/remote/config", "/api/v1/public/ping")


def request_mix(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: the same routes on an agent with metrics and one without, alternating."""
    rates: dict[tuple[str, str], list[float]] = {}
    #: The agent's CPU seconds per request: what the ratio of rates is on an idle machine,
    #: and far steadier than the rates when other work shares the CPUs.
    costs: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp, ExitStack() as stack:
        servers = {}
        for name, metrics in (("on", True), ("off", False)):
            node = Path(tmp) / name
            node.mkdir()
            config, token, port = write_config(node, {"metrics": {"enabled": metrics}})
            argv = [sys.executable, "-m", "lightd", "--config", str(config)]
            server = stack.enter_context(
                running(
                    f"agent (metrics {name})",
                    argv,
                    port=port,
                    cwd=node,
                    log=Path(tmp) / f"{name}.log",
                    ready_path="/api/v1/public/ping",
                )
            )
            servers[name] = (server, token)
        on_server, on_token = servers["on"]
        if httpx.get(on_server.url("/metrics"), headers=auth(on_token)).status_code != 200:
            raise SystemExit("the metrics agent does not serve /metrics")
        off_server, off_token = servers["off"]
        if httpx.get(off_server.url("/metrics"), headers=auth(off_token)).status_code != 404:
            raise SystemExit("the agent without metrics serves /metrics")
        for server, token in servers.values():  # warm both up
            for path in ROUTES:
                run_wrk(server.url(path), headers(path, token), args.warmup, CONNECTIONS)
        for round_ in range(args.rounds):
            order = ("on", "off") if round_ % 2 == 0 else ("off", "on")
            for path in ROUTES:
                for name in order:
                    server, token = servers[name]
                    print(f"round {round_ + 1}: {path} metrics {name}", file=sys.stderr)
                    cpu = cpu_seconds(server.proc.pid)
                    figures = run_wrk(
                        server.url(path), headers(path, token), args.duration, CONNECTIONS
                    )
                    cpu = cpu_seconds(server.proc.pid) - cpu
                    if figures["non_2xx"] or figures["socket_errors"]:
                        raise SystemExit(f"void run: {figures}")
                    rates.setdefault((path, name), []).append(figures["requests_per_s"])
                    costs.setdefault((path, name), []).append(cpu / figures["requests"])
    report: dict[str, Any] = {"routes": {}}
    for path in ROUTES:
        on, off = sum(rates[(path, "on")]), sum(rates[(path, "off")])
        report["routes"][path] = {
            "on_req_s": on / args.rounds,
            "off_req_s": off / args.rounds,
            "ratio": on / off,
            "round_ratios": [
                a / b for a, b in zip(rates[(path, "on")], rates[(path, "off")], strict=True)
            ],
            "cpu_us_on": statistics.median(costs[(path, "on")]) * 1e6,
            "cpu_us_off": statistics.median(costs[(path, "off")]) * 1e6,
        }
        figures = report["routes"][path]
        figures["cpu_ratio"] = figures["cpu_us_off"] / figures["cpu_us_on"]
    return report


def write_config(folder: Path, extra: dict[str, Any]) -> tuple[Path, str, int]:
    """A config for an agent on a free local port (as ``bench.http``'s, plus ``extra``);
    the storage folders are relative to ``folder``."""
    config = folder / "config.json"
    token = "lightd_" + secrets.token_hex(16)
    port = free_port()
    raw = {"server": {"host": "127.0.0.1", "port": port}, "authorization": {"token": token}}
    config.write_text(json.dumps({**raw, **extra}, indent=2) + "\n")
    return config, token, port


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def auth(token: str) -> dict[str, str]:
    return {"Accept": ACCEPT, "Authorization": f"Bearer {token}"}


def headers(path: str, token: str) -> list[str]:
    if path.startswith("/api/v1/public/"):
        return []
    return [f"{key}: {value}" for key, value in auth(token).items()]


def middleware_cost(requests: int = 100_000) -> dict[str, float]:
    """The measuring middleware's own cost per request, in process: an ASGI app that only
    answers, called directly with and without ``observe`` around it (best of 3 blocks
    each, alternating), so no server, client or other process is in the figure."""
    from types import SimpleNamespace

    import trio
    from lightd.api.metrics import ROUTE_KEY, MetricsConfig, observe
    from lightd.config import LogConfig
    from lightd.metrics import Metrics
    from lightd.runtime import Stash

    config = SimpleNamespace(sections={"metrics": MetricsConfig()}, log=LogConfig())
    agent: Any = SimpleNamespace(metrics=Metrics(), config=config, stash=Stash())
    body = b'{"status":"ok"}'

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope[ROUTE_KEY] = "/api/v1/public/ping"  # what the Quart hook does
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def send(message: Any) -> None:
        pass

    async def receive() -> Any:
        return {}

    wrapped = observe(agent, cast(Any, None), app)
    best = {"bare": float("inf"), "observed": float("inf")}

    async def run() -> None:
        for _ in range(3):
            for name, target in (("bare", app), ("observed", wrapped)):
                start = time.perf_counter()
                for _ in range(requests):
                    scope = {"type": "http", "method": "GET", "path": "/api/v1/public/ping"}
                    await target(scope, receive, send)
                best[name] = min(best[name], (time.perf_counter() - start) / requests)

    trio.run(run)
    return {
        "bare_us": best["bare"] * 1e6,
        "observed_us": best["observed"] * 1e6,
        "cost_us": (best["observed"] - best["bare"]) * 1e6,
    }


def scrape_time(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: p50 of ``GET /metrics`` on an agent holding ``--containers`` containers."""
    ids = [f"scrape-{n}" for n in range(args.containers)]
    raw = docker.from_env()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp,
            container_agent(Path(tmp)) as (client, _),
        ):
            try:
                volume = client.post("/volumes").json()["volume_id"]
                for internal_id in ids:
                    body = {
                        "internal_id": internal_id,
                        "image": IMAGE,
                        "volume_id": volume,
                        "startup_command": "sleep 3600",
                    }
                    client.post("/containers", json=body).raise_for_status()
                deadline = time.monotonic() + 300
                while True:
                    listed = client.get("/containers").json()["containers"]
                    if sum(c["install_state"] == "ready" for c in listed) >= len(ids):
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit("the containers did not all become ready")
                    time.sleep(0.1)
                for _ in range(20):  # warm up
                    client.get("/metrics").raise_for_status()
                times = []
                size = 0
                for _ in range(args.scrapes):
                    start = time.perf_counter()
                    response = client.get("/metrics")
                    times.append((time.perf_counter() - start) * 1000)
                    response.raise_for_status()
                    size = len(response.content)
                counted = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in response.text.splitlines()
                    if line.startswith("lightd_containers{")
                )
            finally:
                for internal_id in ids:
                    client.delete(f"/containers/{internal_id}")
    finally:
        # Whatever the agent left if the run broke off.
        for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith("scrape-"):
                c.remove(force=True)
        raw.close()
    return {
        "containers": len(ids),
        "containers_counted": counted,
        "scrapes": args.scrapes,
        "p50_ms": statistics.median(times),
        "p90_ms": statistics.quantiles(times, n=10)[-1],
        "bytes": size,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per route")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per route")
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--skip-mix", action="store_true", help="leave part 1 out")
    parser.add_argument("--skip-scrape", action="store_true", help="leave part 2 out")
    args = parser.parse_args()
    ok = True
    cost = middleware_cost()
    print(
        f"measuring middleware, in process: {cost['cost_us']:.2f} µs per request"
        f" (a bare ASGI answer {cost['bare_us']:.2f} µs, observed {cost['observed_us']:.2f} µs)"
    )
    if not args.skip_mix:
        if shutil.which("wrk") is None:
            print("part 1 needs wrk on PATH: apt-get install wrk", file=sys.stderr)
            return 2
        mix = request_mix(args)
        print(
            f"metrics on vs off: bench.http's routes, {args.rounds} alternating rounds of"
            f" {args.duration}s each, wrk -t1 -c{CONNECTIONS}"
        )
        for path, figures in mix["routes"].items():
            verdict = "ok" if figures["ratio"] >= TARGET_RATIO else "BELOW TARGET"
            ok &= figures["ratio"] >= TARGET_RATIO
            print(
                f"  GET {path:22} on {figures['on_req_s']:8.0f} req/s  off"
                f" {figures['off_req_s']:8.0f} req/s  ratio {figures['ratio']:.3f}"
                f"  (target >= {TARGET_RATIO})  {verdict}"
            )
            rounds = ", ".join(f"{r:.3f}" for r in figures["round_ratios"])
            print(f"    req/s ratio per round: {rounds}")
            print(
                f"    agent CPU per request (median of rounds): on {figures['cpu_us_on']:.0f} µs,"
                f" off {figures['cpu_us_off']:.0f} µs, ratio off/on {figures['cpu_ratio']:.3f}"
            )
    if not args.skip_scrape:
        scrape = scrape_time(args)
        verdict = "ok" if scrape["p50_ms"] < TARGET_SCRAPE_MS else "ABOVE TARGET"
        ok &= scrape["p50_ms"] < TARGET_SCRAPE_MS
        print(
            f"GET /metrics with {scrape['containers']} containers"
            f" ({scrape['containers_counted']:.0f} in lightd_containers): p50"
            f" {scrape['p50_ms']:.2f} ms, p90 {scrape['p90_ms']:.2f} ms over"
            f" {scrape['scrapes']} scrapes, {scrape['bytes']} bytes"
            f"  (target < {TARGET_SCRAPE_MS:.0f} ms)  {verdict}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
