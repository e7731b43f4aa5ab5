"""The volume file API against its baselines, each measured in the same run on the same disk.

Prints, each next to its baseline and the ratio:
  1. small files: write+read of 1 000 small files per second through ``lightd.files``
     (what every route uses: fd-relative resolution, temp file + rename) vs plain Python
     ``open().write()`` / ``open().read()`` on the same disk (target: >= 30 %); and, for
     information, writes per second through ``POST /volumes/:id/files`` of a live agent;
  2. archives: compress and decompress MB/s (uncompressed bytes / wall time) of a 200 MB
     mixed tree (text-like and random data, big and small files, links) for tar.gz and zip
     through the agent's API vs ``tar czf``/``tar xzf`` and ``zip -r -y``/``unzip`` on the
     same tree (target: >= 50 %);
  3. latency of ``GET /api/v1/public/ping`` while the agent compresses 1 GB (tar.gz) vs the
     same ping loop on the idle agent (target: p99 < 20 ms).

The agent runs as a subprocess (``python -m lightd``) with a fresh config in a temporary
folder; the bench process is only its client. Other work on the machine makes figures
noisy: the load average before and after is printed, and each archive figure is the best
of ``--repeat`` runs (for both sides alike).

Run::

    .venv/bin/python -m bench.volumes [--tree-mb 200] [--big-mb 1024] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightd.files import Root, parse

HERE = Path(__file__).resolve()

ACCEPT = "Application/vnd.pkglatv1+json"
SMALL_FILES = 1000
SMALL_ROUNDS = 5
SMALL_TARGET = 0.30
ARCHIVE_TARGET = 0.50
PING_P99_TARGET_MS = 20.0
READY_TIMEOUT = 30.0


# --- data ----------------------------------------------------------------------------------


def text_block(size: int, seed: int = 7) -> bytes:
    """Text-like bytes (words and lines), compressing about like logs and configs do."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4000)]
    out = bytearray()
    while len(out) < size:
        out += (" ".join(rng.choices(words, k=12)) + "\n").encode()
    return bytes(out[:size])


def make_tree(root: Path, total_mb: int) -> int:
    """A mixed tree of about ``total_mb`` MB; returns its exact size in bytes."""
    total = total_mb << 20
    text = text_block(4 << 20)
    written = 0

    def put(path: Path, size: int, random_data: bool) -> None:
        nonlocal written
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as fh:
            left = size
            offset = 0
            while left:
                n = min(left, 1 << 20)
                if random_data:
                    fh.write(os.urandom(n))
                else:
                    start = offset % (len(text) - n)
                    fh.write(text[start : start + n])
                offset += 7919 * n
                left -= n
        written += size

    big = int(total * 0.8)
    for i in range(max(2, big // (10 << 20))):  # 10 MB files, alternately text and random
        put(root / "big" / f"file{i}.bin", 10 << 20, random_data=i % 2 == 1)
    rng = random.Random(11)
    i = 0
    while written < total or i < 100:
        size = rng.randint(1 << 10, 40 << 10)
        put(root / "small" / f"d{i % 50}" / f"f{i}.dat", size, random_data=i % 3 == 0)
        i += 1
    (root / "small" / "latest").symlink_to("d0")
    (root / "big" / "current").symlink_to("file0.bin")
    return written


# --- the agent -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Agent:
    """An agent subprocess and a keep-alive client of it."""

    def __init__(self, folder: Path) -> None:
        config = folder / "config.json"
        done = subprocess.run(
            [sys.executable, "-m", "lightd", "--config", str(config), "--token", "reset"],
            cwd=folder,
            capture_output=True,
            text=True,
            check=True,
        )
        found = re.search(r"New Token: (\S+)", done.stdout)
        assert found, done.stdout
        self.token = found[1]
        raw = json.loads(config.read_text())
        self.port = free_port()
        raw["server"].update(host="127.0.0.1", port=self.port)
        config.write_text(json.dumps(raw, indent=2))
        self.log = folder / "agent.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lightd", "--config", str(config)],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/api/v1/public/ping")[0] == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("agent not ready")
            time.sleep(0.05)

    def request(
        self, method: str, path: str, body: Any = None, *, timeout: float = 600
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Accept": ACCEPT, "Authorization": f"Bearer {self.token}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
            return response.status, json.loads(payload) if payload else None
        finally:
            conn.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, payload = self.request(method, path, body)
        if status >= 300:
            raise RuntimeError(f"{method} {path} → {status} {payload}")
        return payload

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- measurements --------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def small_files(base: Path, agent: Agent, volume_id: str) -> dict[str, float]:
    """Files per second (a write and a read each), median of rounds, fresh folder each."""
    payloads = [os.urandom(random.Random(i).randint(200, 4000)) for i in range(SMALL_FILES)]
    plain_rates, safe_rates = [], []
    for round_ in range(SMALL_ROUNDS):
        folder = base / f"plain{round_}"
        folder.mkdir()

        def plain(folder: Path = folder) -> None:
            for i, data in enumerate(payloads):
                with open(folder / f"f{i}", "wb") as fh:
                    fh.write(data)
            for i, data in enumerate(payloads):
                with open(folder / f"f{i}", "rb") as fh:
                    assert fh.read() == data

        plain_rates.append(SMALL_FILES / timed(plain))
        (base / f"safe{round_}").mkdir()

        def safe(round_: int = round_) -> None:
            with Root.open(base) as root:
                for i, data in enumerate(payloads):
                    root.write_file(parse(f"safe{round_}/f{i}"), data)
                for i, data in enumerate(payloads):
                    assert root.read_bytes(parse(f"safe{round_}/f{i}")) == data

        safe_rates.append(SMALL_FILES / timed(safe))
    texts = [data.hex()[:2000] for data in payloads[:200]]

    def api() -> None:
        for i, text in enumerate(texts):
            agent.call(
                "POST", f"/volumes/{volume_id}/files", {"path": f"api/f{i}", "content": text}
            )

    api_rate = len(texts) / timed(api)
    return {
        "plain_files_per_s": statistics.median(plain_rates),
        "safe_files_per_s": statistics.median(safe_rates),
        "api_writes_per_s": api_rate,
    }


def best(repeat: int, fn: Callable[[], float], reset: Callable[[], None]) -> float:
    times = []
    for _ in range(repeat):
        reset()
        times.append(fn())
    return min(times)


def archives(
    agent: Agent, volume_id: str, volume: Path, scratch: Path, tree_bytes: int, repeat: int
) -> dict[str, dict[str, float]]:
    """MB/s of the agent and of the CLI tools, compress and decompress, tar.gz and zip."""
    mb = tree_bytes / (1 << 20)
    url = f"/volumes/{volume_id}"
    out: dict[str, dict[str, float]] = {}

    def clear(*paths: Path) -> Callable[[], None]:
        def reset() -> None:
            for path in paths:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            subprocess.run(["sync"], check=False)

        return reset

    def run(argv: list[str], cwd: Path) -> Callable[[], float]:
        return lambda: timed(lambda: subprocess.run(argv, cwd=cwd, check=True))

    for fmt, ext in (("tar.gz", ".tar.gz"), ("zip", ".zip")):
        ours = volume / f"ours{ext}"
        cli = scratch / f"cli{ext}"
        body = {"format": fmt, "output_name": "ours", "sources": ["tree"]}
        agent_compress = best(
            repeat,
            lambda b=body: timed(lambda: agent.call("POST", url + "/compress", b)),
            clear(ours),
        )
        if fmt == "tar.gz":
            cli_argv = ["tar", "czf", str(cli), "tree"]
        else:
            cli_argv = ["zip", "-q", "-r", "-y", "-6", str(cli), "tree"]
        cli_compress = best(repeat, run(cli_argv, volume), clear(cli))
        restore_ours = volume / "restore"
        restore_cli = scratch / "restore"
        agent_extract = best(
            repeat,
            lambda e=ext: timed(
                lambda: agent.call(
                    "POST",
                    url + "/decompress",
                    {"archive_path": f"ours{e}", "destination": "restore"},
                )
            ),
            clear(restore_ours),
        )
        if fmt == "tar.gz":
            x_argv = ["tar", "xzf", str(cli), "-C", str(restore_cli)]
        else:
            x_argv = ["unzip", "-q", str(cli), "-d", str(restore_cli)]

        def cli_extract_reset(path: Path = restore_cli) -> None:
            clear(path)()
            path.mkdir()

        cli_extract = best(repeat, run(x_argv, scratch), cli_extract_reset)
        clear(ours, cli, restore_ours, restore_cli)()
        out[fmt] = {
            "agent_compress_mb_s": mb / agent_compress,
            "cli_compress_mb_s": mb / cli_compress,
            "agent_decompress_mb_s": mb / agent_extract,
            "cli_decompress_mb_s": mb / cli_extract,
        }
    return out


def ping_loop(agent: Agent, until: Callable[[], bool], interval: float = 0.01) -> list[float]:
    """Sequential pings on one keep-alive connection; latencies in ms."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    latencies = []
    try:
        while not until():
            start = time.perf_counter()
            conn.request("GET", "/api/v1/public/ping")
            response = conn.getresponse()
            response.read()
            latencies.append((time.perf_counter() - start) * 1000)
            assert response.status == 200
            time.sleep(interval)
    finally:
        conn.close()
    return latencies


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def ping_during_compression(
    agent: Agent, volume_id: str, volume: Path, big_mb: int
) -> dict[str, Any]:
    big = volume / "big"
    big.mkdir()
    text = text_block(4 << 20, seed=3)
    for i in range(big_mb // 64):
        with (big / f"part{i}.bin").open("wb") as fh:
            for j in range(64):
                if i % 2:
                    fh.write(os.urandom(1 << 20))
                else:
                    start = (j * 7919 * 4096) % (len(text) - (1 << 20))
                    fh.write(text[start : start + (1 << 20)])
    subprocess.run(["sync"], check=False)
    deadline = time.monotonic() + 5
    idle = ping_loop(agent, lambda: time.monotonic() > deadline)
    done = threading.Event()
    result: dict[str, Any] = {}

    def compress() -> None:
        start = time.perf_counter()
        try:
            result["response"] = agent.call(
                "POST",
                f"/volumes/{volume_id}/compress",
                {"format": "tar.gz", "output_name": "big", "sources": ["big"]},
            )
        finally:
            result["seconds"] = time.perf_counter() - start
            done.set()

    worker = threading.Thread(target=compress)
    worker.start()
    busy = ping_loop(agent, done.is_set)
    worker.join()
    if "response" not in result:
        raise RuntimeError("the 1 GB compression failed")

    def figures(values: list[float]) -> dict[str, float]:
        return {
            "count": len(values),
            "p50_ms": percentile(values, 0.50),
            "p99_ms": percentile(values, 0.99),
            "max_ms": max(values),
        }

    return {
        "compressed_mb": big_mb,
        "compression_s": result["seconds"],
        "idle": figures(idle),
        "busy": figures(busy),
    }


# --- report --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lightd-bench-volumes-", dir=args.dir) as tmp:
        base = Path(tmp)
        node = base / "node"
        node.mkdir()
        agent = Agent(node)
        try:
            created = agent.call("POST", "/volumes")
            volume_id, volume = created["volume_id"], Path(created["path"])
            small: dict[str, float] = {}
            arch: dict[str, dict[str, float]] = {}
            ping: dict[str, Any] = {}
            tree_bytes = 0
            if "small" in args.parts:
                small_dir = base / "small"
                small_dir.mkdir()
                print("small files …", file=sys.stderr)
                small = small_files(small_dir, agent, volume_id)
                shutil.rmtree(small_dir)
            if "archives" in args.parts:
                print(f"building a {args.tree_mb} MB tree …", file=sys.stderr)
                tree_bytes = make_tree(volume / "tree", args.tree_mb)
                scratch = base / "scratch"
                scratch.mkdir()
                print("archives …", file=sys.stderr)
                arch = archives(agent, volume_id, volume, scratch, tree_bytes, args.repeat)
                shutil.rmtree(volume / "tree")
            if "ping" in args.parts:
                print(f"ping while compressing {args.big_mb} MB …", file=sys.stderr)
                ping = ping_during_compression(agent, volume_id, volume, args.big_mb)
        finally:
            agent.stop()
            problems = [
                line
                for line in agent.log.read_text(errors="replace").splitlines()
                if "ERROR" in line or "Traceback" in line
            ]
    return {
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
        "tree_mb": round(tree_bytes / (1 << 20), 1),
        "parts": args.parts,
        "small_files": small,
        "archives": arch,
        "ping": ping,
        "agent_log_problems": problems[:20],
    }


def verdict(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def print_report(r: dict[str, Any]) -> None:
    print(
        f"lightd volumes bench — {r['cpus']} CPUs, load average before "
        f"{r['load_average_before'][0]:.2f}, after {r['load_average_after'][0]:.2f}\n"
    )
    if r["small_files"]:
        print_small(r["small_files"])
    if r["archives"]:
        print_archives(r)
    if r["ping"]:
        print_ping(r["ping"])
    if r["agent_log_problems"]:
        print("\nagent log problems:")
        for line in r["agent_log_problems"]:
            print(f"  {line}")


def print_small(s: dict[str, float]) -> None:
    ratio = s["safe_files_per_s"] / s["plain_files_per_s"]
    print(f"small files (write+read of {SMALL_FILES}, files/s, median of {SMALL_ROUNDS}):")
    print(f"  lightd.files         {s['safe_files_per_s']:10.0f}")
    print(f"  plain Python         {s['plain_files_per_s']:10.0f}")
    ok = verdict(ratio >= SMALL_TARGET)
    print(f"  ratio                {ratio:10.1%}   (target >= {SMALL_TARGET:.0%})  {ok}")
    print(f"  (info: POST /files through the API: {s['api_writes_per_s']:.0f} writes/s)\n")


def print_archives(r: dict[str, Any]) -> None:
    print(f"archives of a {r['tree_mb']} MB mixed tree (MB/s of uncompressed data, best of runs):")
    for fmt, f in r["archives"].items():
        tool = "tar czf / tar xzf" if fmt == "tar.gz" else "zip -r -y / unzip"
        for what in ("compress", "decompress"):
            ours, theirs = f[f"agent_{what}_mb_s"], f[f"cli_{what}_mb_s"]
            ratio = ours / theirs
            ok = verdict(ratio >= ARCHIVE_TARGET)
            print(
                f"  {fmt:<6} {what:<10}  agent {ours:7.1f}   {tool:<17} {theirs:7.1f}"
                f"   ratio {ratio:6.1%}  (target >= {ARCHIVE_TARGET:.0%})  {ok}"
            )
    print()


def print_ping(p: dict[str, Any]) -> None:
    idle, busy = p["idle"], p["busy"]
    print(
        f"GET /api/v1/public/ping while compressing {p['compressed_mb']} MB to tar.gz"
        f" ({p['compression_s']:.1f} s):"
    )
    print(f"  {'':8}{'pings':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, f in (("idle", idle), ("busy", busy)):
        print(
            f"  {name:<8}{f['count']:>7}{f['p50_ms']:>9.2f}{f['p99_ms']:>9.2f}{f['max_ms']:>9.2f}"
        )
    ok = busy["p99_ms"] < PING_P99_TARGET_MS
    print(
        f"  busy/idle p99 ratio {busy['p99_ms'] / idle['p99_ms']:.2f}x;"
        f" busy p99 {busy['p99_ms']:.2f} ms (target < {PING_P99_TARGET_MS:.0f} ms)  {verdict(ok)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree-mb", type=int, default=200)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to put the data (default: $TMPDIR)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["small", "archives", "ping"],
        default=["small", "archives", "ping"],
        help="which measurements to run (default: all)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
