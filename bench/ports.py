"""Reservation throughput of the port pool against the raw SQLite ceiling, in one run.

For single-port and 5-port reservations of named entries (``PortRequest(ip, port)``):

  * **pool**: ``PortPool.reserve`` as the containers core calls it, from 20 concurrent
    trio tasks, in an agent built by ``open_agent`` (its real store file, migrations,
    plugins; no HTTP): validation, the store's worker thread, group commit, savepoints;
  * **raw**: the same ``UPDATE … RETURNING`` statements (``TAKE_SQL``) in
    ``BEGIN IMMEDIATE … COMMIT``, one reservation per transaction, in a plain loop on one
    ``sqlite3`` connection with the store's pragmas, against a copy of the same table:
    what the operation costs with nothing around it.

Each scenario runs ``--rounds`` times on fresh entries (the pool and raw alternate, so
noise from other processes hits both); the median round is reported, as reservations/s
and the pool/raw ratio. Target: ratio >= 0.50.

Run (no Docker engine needed)::

    .venv/bin/python -m bench.ports [--reservations 20000] [--callers 20] [--rounds 3] [--json]

Exits 1 when a reservation failed (the figures would be void).
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import trio
from lightd.config import new_token
from lightd.interfaces import PortRequest
from lightd.plugins.port_pool import POOL, PortPool
from lightd.plugins.port_pool.model import ip_key
from lightd.plugins.port_pool.pool import TAKE_SQL
from lightd.runtime import open_agent
from lightd.store import _connect  # the store's own pragmas, not a copy

TARGET_RATIO = 0.50
Key = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Figures:
    scenario: str
    ports_per_reservation: int
    pool_per_s: float
    raw_per_s: float
    ratio: float
    pool_p50_ms: float
    pool_p99_ms: float
    rounds: int


def entries(count: int, start: int = 0) -> list[Key]:
    """``count`` distinct entries: ports 1..65535 on 10.0.0.1, then 10.0.0.2, …"""
    keys = []
    for n in range(start, start + count):
        address, port = divmod(n, 65535)
        keys.append((f"10.{address // 256}.{address % 256}.1", port + 1))
    return keys


def chunks(keys: list[Key], size: int) -> list[list[Key]]:
    return [keys[i : i + size] for i in range(0, len(keys), size)]


async def run_pool(
    pool: PortPool, work: list[list[Key]], callers: int, prefix: str
) -> tuple[float, list[float]]:
    """``work`` reserved by ``callers`` tasks; returns (seconds, latency of each call)."""
    latencies: list[float] = []
    items: Iterator[tuple[int, list[Key]]] = iter(enumerate(work))
    failures: list[str] = []

    async def caller() -> None:
        for index, keys in items:
            requests = [PortRequest(ip, port) for ip, port in keys]
            began = time.perf_counter()
            got = await pool.reserve(f"{prefix}-{index}", requests)
            latencies.append(time.perf_counter() - began)
            if len(got) != len(keys):
                failures.append(f"reservation {index} got {len(got)} of {len(keys)}")

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    elapsed = time.perf_counter() - began
    if failures:
        raise RuntimeError(failures[0])
    return elapsed, latencies


def run_raw(conn: sqlite3.Connection, work: list[list[Key]], prefix: str) -> float:
    """The same statements, one reservation per transaction, nothing else."""
    began = time.perf_counter()
    for index, keys in enumerate(work):
        owner = f"{prefix}-{index}"
        conn.execute("BEGIN IMMEDIATE")
        for ip, port in keys:
            if not conn.execute(TAKE_SQL, (owner, ip, port, "tcp")).fetchall():
                conn.execute("ROLLBACK")
                raise RuntimeError(f"raw reservation {index} missed {ip}:{port}")
        conn.execute("COMMIT")
    return time.perf_counter() - began


def fill_raw(conn: sqlite3.Connection, keys: list[Key]) -> None:
    rows = [(ip, port, "tcp", ip_key(ip), 0) for ip, port in keys]
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany(
        "INSERT INTO port_pool_ports (ip, port, protocol, ip_key, created_at)"
        " VALUES (?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("COMMIT")


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True)
    config = folder / "config.json"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "authorization": {"enabled": True, "token": new_token()},
                "docker": {"socket_path": str(folder / "no-docker.sock")},
            }
        )
    )
    return config


async def bench(args: argparse.Namespace, workdir: Path) -> list[Figures]:
    scenarios = [("single-port", 1), ("5-port", 5)]
    per_round = sum(args.reservations * size for _, size in scenarios)
    all_keys = entries(per_round * args.rounds)

    # The raw copy: the same schema (the plugin's migrations, applied by the store).
    raw_config = write_config(workdir / "raw")
    async with open_agent(raw_config, load_entrypoints=False):
        pass
    raw = _connect(raw_config.parent / "storage" / "lightd.sqlite3")
    fill_raw(raw, all_keys)

    results: list[Figures] = []
    async with open_agent(write_config(workdir / "pool"), load_entrypoints=False) as agent:
        pool = agent.stash[POOL]
        await pool.add_many((ip, port, "tcp") for ip, port in all_keys)
        rates: dict[str, tuple[list[float], list[float], list[float]]] = {
            name: ([], [], []) for name, _ in scenarios
        }
        offset = 0
        for round_ in range(args.rounds):
            for name, size in scenarios:
                keys = all_keys[offset : offset + args.reservations * size]
                offset += len(keys)
                work = chunks(keys, size)
                prefix = f"{name}-{round_}"
                raw_seconds = await trio.to_thread.run_sync(run_raw, raw, work, prefix)
                pool_seconds, latencies = await run_pool(pool, work, args.callers, prefix)
                pool_rates, raw_rates, lat = rates[name]
                pool_rates.append(len(work) / pool_seconds)
                raw_rates.append(len(work) / raw_seconds)
                lat.extend(latencies)
        held = await pool.held()
        expected = args.rounds * len(scenarios) * args.reservations
        if len(held) != expected:
            raise RuntimeError(f"{len(held)} owners hold ports, expected {expected}")
        for name, size in scenarios:
            pool_rates, raw_rates, lat = rates[name]
            pool_rate, raw_rate = statistics.median(pool_rates), statistics.median(raw_rates)
            cuts = statistics.quantiles(lat, n=100)
            results.append(
                Figures(
                    scenario=name,
                    ports_per_reservation=size,
                    pool_per_s=round(pool_rate),
                    raw_per_s=round(raw_rate),
                    ratio=round(pool_rate / raw_rate, 3),
                    pool_p50_ms=round(cuts[49] * 1000, 3),
                    pool_p99_ms=round(cuts[98] * 1000, 3),
                    rounds=args.rounds,
                )
            )
    raw.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reservations", type=int, default=20000, help="per scenario and round")
    parser.add_argument("--callers", type=int, default=20, help="concurrent pool callers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the agent has no Docker engine here: quiet
    with tempfile.TemporaryDirectory(prefix="lightd-bench-ports-") as tmp:
        try:
            results = trio.run(bench, args, Path(tmp))
        except RuntimeError as exc:
            print(f"bench/ports.py: void run: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    print(
        f"port pool reservations, {args.callers} concurrent callers, "
        f"{args.reservations} per scenario, median of {args.rounds} rounds"
    )
    print(
        f"{'scenario':<12} {'pool/s':>10} {'raw SQLite/s':>13} {'ratio':>7}"
        f" {'p50 ms':>8} {'p99 ms':>8}"
    )
    for r in results:
        verdict = "ok" if r.ratio >= TARGET_RATIO else f"below {TARGET_RATIO:.0%}"
        print(
            f"{r.scenario:<12} {r.pool_per_s:>10,.0f} {r.raw_per_s:>13,.0f} {r.ratio:>7.2f}"
            f" {r.pool_p50_ms:>8.2f} {r.pool_p99_ms:>8.2f}  {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
