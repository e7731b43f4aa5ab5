"""Usage accounting (issue 16): ``GET /volumes/:id`` on a volume of many files vs ``du -s``.

``GET /volumes/:id`` answers from the disk plugin's cached usage (measured once by a walk,
then adjusted by the API's writes; re-measured in the background at most every
``disk.check_interval``), so it must not walk the tree per request: target ≤ 0.1 of the
time of ``du -s`` on the same folder (page cache warm for both: ``du`` runs once first).

Prints the first (cold, measuring) request, the median of the following requests, the
median of ``du -s`` runs, and the ratio.

Run::

    .venv/bin/python -m bench.disk [--files 500000] [--repeat 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .volumes import Agent

TARGET = 0.1


def make_files(folder: Path, count: int) -> float:
    """``count`` small files in folders of 1 000; seconds it took."""
    start = time.perf_counter()
    payload = b"x" * 100
    for i in range(count):
        if i % 1000 == 0:
            sub = folder / f"d{i // 1000:04d}"
            sub.mkdir()
            subfd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY)
        fd = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=subfd)
        os.write(fd, payload)
        os.close(fd)
        if i % 1000 == 999 or i == count - 1:
            os.close(subfd)
    return time.perf_counter() - start


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=500_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lightd-bench-disk-") as tmp:
        base = Path(tmp)
        agent = Agent(base)
        try:
            made = agent.call("POST", "/volumes")  # not measured until first shown
            volume_id, folder = made["volume_id"], Path(made["path"])
            created = make_files(folder, args.files)
            timed(["du", "-s", str(folder)])  # warm the cache for both sides
            du = statistics.median(
                timed(["du", "-s", str(folder)]) for _ in range(max(3, args.repeat // 4))
            )
            start = time.perf_counter()
            first = agent.call("GET", f"/volumes/{volume_id}")
            cold = time.perf_counter() - start
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                shown = agent.call("GET", f"/volumes/{volume_id}")
                times.append(time.perf_counter() - start)
            warm = statistics.median(times)
        finally:
            agent.stop()
    assert shown["usage"]["files"] == args.files, shown
    ratio = warm / du
    result = {
        "files": args.files,
        "create_s": round(created, 1),
        "du_s_median_s": round(du, 4),
        "get_first_s": round(cold, 4),
        "get_median_s": round(warm, 5),
        "ratio": round(ratio, 4),
        "target": TARGET,
        "usage": first["usage"],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"volume of {args.files} files (made in {created:.1f} s)")
    print(f"  du -s (median)              {du * 1000:9.1f} ms")
    print(f"  GET /volumes/:id, first     {cold * 1000:9.1f} ms  (measures: one walk)")
    print(f"  GET /volumes/:id (median)   {warm * 1000:9.2f} ms")
    verdict = "ok" if ratio <= TARGET else "MISSED"
    print(f"  ratio GET/du                {ratio:9.4f}  (target <= {TARGET}: {verdict})")


if __name__ == "__main__":
    main()
