"""Re-run every bench of the second wave in one pass, one after the other, for a side-by-side
report (issue 22: "none regressed beyond noise").

Each bench is its own module and prints its own ratios against a baseline measured in the
same run; this runner only starts them in turn (as ``python -m bench.NAME``), keeps each
one's full output in ``--out`` (one ``NAME.txt`` per bench) and prints each one's output as
it finishes. Sizes default to what fits a 2-core machine in about half an hour; pass
``--full`` for the sizes the issues name (1 GiB file transfer, 2 GiB volume transfer,
512 MiB SFTP file, 100 containers).

Run: ``.venv/bin/python -m bench.wave [--only files sftp …] [--full] [--out DIR]``. Needs the
engine of ``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image, as the benches
themselves do. A bench that fails is reported with its exit status; the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (module, quick arguments, full arguments)
BENCHES: list[tuple[str, list[str], list[str]]] = [
    ("files", ["--parts", "transfer", "--size-mb", "512", "--repeat", "2"], []),
    ("backups", ["--size-mb", "256", "--repeat", "3"], ["--size-mb", "512", "--repeat", "5"]),
    ("events", [], []),
    ("sftp", ["--size-mb", "128", "--repeat", "3"], []),  # a median needs 3 rounds
    ("transfer", ["--size-mb", "512", "--repeat", "2"], ["--size-mb", "2048"]),
    ("metering", ["--runs", "1"], []),
    ("websocket", ["--containers", "0", "--stats-sample", "0", "--runs", "2"], []),
    ("footprint", ["--rounds", "3"], []),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in BENCHES])
    parser.add_argument("--full", action="store_true", help="the sizes the issues name")
    parser.add_argument("--out", default=None, help="folder for each bench's output")
    args = parser.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="lightd-wave-"))
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for name, quick, full in BENCHES:
        if args.only and name not in args.only:
            continue
        command = [sys.executable, "-m", f"bench.{name}", *(full if args.full else quick)]
        print(f"== bench.{name}: {' '.join(command[1:])}", flush=True)
        began = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        took = time.monotonic() - began
        (out / f"{name}.txt").write_text(done.stdout + done.stderr)
        print(done.stdout, end="", flush=True)
        status = "ok" if done.returncode == 0 else f"exit {done.returncode}"
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-2000:], end="")
        print(f"-- bench.{name}: {status} in {took:.0f} s\n", flush=True)
    print(f"outputs: {out}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
