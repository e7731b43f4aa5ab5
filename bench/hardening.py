"""Hardening costs an attacker can impose on the agent, each beside a baseline of the same run.

Prints:

* ``GET /api/v1/public/ping`` p99 while a container streams 64 KiB lines against a
  pathological ``start_pattern`` (``.*Server started.*``, and ``(x+x+)+y``), next to the
  p99 of the same agent with no such container                          (target: < 20 ms)
* the agent process's RSS peak (``VmHWM``) while it is asked to decompress a zip whose
  central directory holds 10 M entries, next to its idle peak        (target: < +50 MB)

The zip is crafted cheaply: one local header that every central-directory record points
at (a 1-byte name, stored, empty), zip64 end records; ~470 MB for 10 M entries, written
into the volume's folder directly. An agent that parses it entry by entry grows by GBs:
the run stops it past ``--rss-cap`` MB and prints that instead of taking the machine.

Run: ``.venv/bin/python -m bench.hardening [--pings 2000] [--entries 10000000]``. Needs the
Docker engine of ``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image. The
agent runs as its own process on a network of its own; everything it makes is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import docker
import httpx

IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
VENDOR = "Application/vnd.pkglatv1+json"
TOKEN = "lightd_" + "c" * 32
NETWORK = "lightd-bench-hardening"
PATTERNS = {
    # pattern: the byte every 64 KiB line is made of (the worst case for that pattern)
    ".*Server started.*": "a",
    "(x+x+)+y": "x",
}


@contextmanager
def agent(folder: Path) -> Iterator[tuple[httpx.Client, subprocess.Popen[str]]]:
    """Run the agent as its own process (as in production); give a client and the process."""
    config = folder / "config.json"
    config.write_text(
        json.dumps(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "authorization": {"token": TOKEN},
                "storage": {
                    "base_path": str(folder / "storage"),
                    "containers_path": str(folder / "storage" / "containers"),
                    "volumes_path": str(folder / "storage" / "volumes"),
                },
                "docker": {"network": NETWORK},
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
        # The rest of its log is read (and kept) so a full pipe never blocks it.
        log: list[str] = []
        threading.Thread(target=lambda: log.extend(proc.stderr or ()), daemon=True).start()
        headers = {"Accept": VENDOR, "Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            yield client, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


PING_TIMEOUT = 5.0
PING_BUDGET = 60.0


def ping_latencies(client: httpx.Client, count: int) -> list[float]:
    """Sequential pings, 2 ms apart (a client polling, not a flood), in milliseconds. A
    frozen agent answers none: a ping past ``PING_TIMEOUT`` counts as that long, and the
    figure stops after ``PING_BUDGET`` seconds with what it has."""
    out: list[float] = []
    began = time.monotonic()
    while len(out) < count and time.monotonic() - began < PING_BUDGET:
        start = time.perf_counter()
        with suppress(httpx.TimeoutException):
            client.get("/api/v1/public/ping", timeout=PING_TIMEOUT).raise_for_status()
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.002)
    return out


def wait_until(client: httpx.Client, internal_id: str, field: str, values: set[str]) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        body = client.get(f"/containers/{internal_id}").json()
        if body.get(field) in values:
            return str(body[field])
        if body.get("install_state") == "failed":
            raise SystemExit(f"{internal_id} failed: {body.get('error')}")
        time.sleep(0.05)
    raise SystemExit(f"{internal_id} never reached {field} in {values}")


def pattern_figures(client: httpx.Client, pings: int) -> dict[str, tuple[float, float]]:
    """Ping p99 with a container flooding its pattern, beside p99 with none (same agent)."""
    volume = client.post("/volumes").json()["volume_id"]
    results: dict[str, tuple[float, float]] = {}
    for n, (pattern, char) in enumerate(PATTERNS.items()):
        baseline = ping_latencies(client, pings)
        internal_id = f"bench-pattern-{n}"
        # 20 lines a second of 65 535 bytes each: every one a worst case for the pattern.
        script = (
            f"while true; do head -c 65535 /dev/zero | tr '\\0' '{char}'; echo; sleep 0.05; done"
        )
        made = client.post(
            "/containers",
            json={
                "internal_id": internal_id,
                "image": IMAGE,
                "volume_id": volume,
                "startup_command": script,
                "start_pattern": pattern,
            },
        )
        if made.status_code != 200:
            results[f"ping p99, pattern {pattern}"] = (float("nan"), p99(baseline))
            print(f"pattern {pattern!r} refused at create: {made.status_code} {made.text}")
            continue
        wait_until(client, internal_id, "install_state", {"ready"})
        client.post(f"/containers/{internal_id}/start").raise_for_status()
        wait_until(client, internal_id, "state", {"starting", "running"})
        loaded = ping_latencies(client, pings)
        state = client.get(f"/containers/{internal_id}").json()["state"]
        client.delete(f"/containers/{internal_id}").raise_for_status()
        name = f"ping p99, {pattern} ({state}, {len(loaded)} pings)"
        results[name] = (p99(loaded), p99(baseline))
        print(f"{name}: {results[name][0]:.2f} ms under attack, {results[name][1]:.2f} ms before")
    return results


# --- the 10 M-entry zip ---------------------------------------------------------------------

_LOCAL = struct.Struct("<4s5H3L2H")  # local file header (30 bytes)
_CENTRAL = struct.Struct("<4s6H3L5H2L")  # central directory record (46 bytes)
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # 20 bytes
_EOCD = struct.Struct("<4s4H2LH")  # 22 bytes


def write_zip_bomb(path: Path, entries: int) -> int:
    """A valid zip64 archive of ``entries`` empty stored files named ``a``, all pointing at
    one local header: the central directory is ``entries`` x 47 bytes. Returns its size."""
    name = b"a"
    local = _LOCAL.pack(b"PK\x03\x04", 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0) + name
    record = (
        _CENTRAL.pack(b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, 0, 0, 0, len(name), 0, 0, 0, 0, 0, 0)
        + name
    )
    chunk_records = 100_000
    with path.open("wb") as out:
        out.write(local)
        cd_offset = out.tell()
        chunk = record * chunk_records
        left = entries
        while left >= chunk_records:
            out.write(chunk)
            left -= chunk_records
        out.write(record * left)
        cd_size = out.tell() - cd_offset
        zip64_offset = out.tell()
        out.write(
            _ZIP64_EOCD.pack(b"PK\x06\x06", 44, 45, 45, 0, 0, entries, entries, cd_size, cd_offset)
        )
        out.write(_ZIP64_LOCATOR.pack(b"PK\x06\x07", 0, zip64_offset, 1))
        out.write(_EOCD.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0))
        return out.tell()


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} for process {pid}")


def zip_figures(
    client: httpx.Client, proc: subprocess.Popen[str], folder: Path, args: argparse.Namespace
) -> tuple[float, float, str, float]:
    """(idle peak MB, peak while decompressing MB, the answer, seconds) for the crafted zip."""
    volume = client.post("/volumes").json()["volume_id"]
    bomb = folder / "storage" / "volumes" / volume / "bomb.zip"
    size = write_zip_bomb(bomb, args.entries)
    print(f"crafted {bomb.name}: {args.entries:,} entries, {size / 1e6:.0f} MB")
    for _ in range(50):  # the idle figure includes ordinary work
        client.get(f"/volumes/{volume}/files").raise_for_status()
    idle = vm_kib(proc.pid, "VmHWM") / 1024
    capped = threading.Event()

    def guard() -> None:
        # Stops an agent that grows past the cap (the unfixed one reaches GBs).
        while proc.poll() is None and not capped.is_set():
            if vm_kib(proc.pid, "VmRSS") / 1024 > idle + args.rss_cap:
                capped.set()
                proc.kill()
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=guard, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        response = client.post(
            f"/volumes/{volume}/decompress", json={"archive_path": "bomb.zip", "destination": "x"}
        )
        answer = f"{response.status_code} {response.text.strip()[:120]}"
    except httpx.TransportError as exc:
        answer = f"no answer ({type(exc).__name__})"
    seconds = time.perf_counter() - start
    if capped.is_set():
        return idle, float("inf"), f"{answer}; agent killed past +{args.rss_cap} MB", seconds
    peak = vm_kib(proc.pid, "VmHWM") / 1024
    capped.set()
    watcher.join()
    bomb.unlink()
    return idle, peak, answer, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pings", type=int, default=2000, help="pings per p99 figure")
    parser.add_argument("--entries", type=int, default=10_000_000, help="entries of the zip")
    parser.add_argument("--rss-cap", type=int, default=3000, help="MB over idle: stop there")
    parser.add_argument("--only", choices=["patterns", "zip"], help="measure one part only")
    args = parser.parse_args()
    raw = docker.from_env()
    try:
        with tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp:
            folder = Path(tmp)
            with agent(folder) as (client, proc):
                patterns = {} if args.only == "zip" else pattern_figures(client, args.pings)
                if args.only != "patterns":
                    idle, peak, answer, seconds = zip_figures(client, proc, folder, args)
    finally:
        for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith("bench-pattern-"):
                c.remove(force=True)
        for net in raw.networks.list(names=[NETWORK]):
            if net.name == NETWORK:
                net.remove()
        raw.close()

    print(f"\nlightd hardening bench: {args.pings} pings per figure; image {IMAGE}\n")
    print(f"{'figure':56} {'attacked':>10} {'baseline':>10} {'target':>12}")
    for name, (ours, base) in patterns.items():
        print(f"{name:56} {ours:8.2f}ms {base:8.2f}ms {'< 20 ms':>12}")
    if args.only == "patterns":
        return
    growth = f"+{peak - idle:.1f} MB" if peak != float("inf") else f"> +{args.rss_cap} MB"
    capped = f"{'>' + str(int(idle + args.rss_cap)):>8}MB"
    shown = f"{peak:8.1f}MB" if peak != float("inf") else capped
    print(
        f"{'agent RSS peak, ' + format(args.entries, ',') + '-entry zip':56}"
        f" {shown} {idle:8.1f}MB {'< +50 MB':>12}   ({growth})"
    )
    print(f"  decompress answered in {seconds:.2f} s: {answer}")


if __name__ == "__main__":
    main()
