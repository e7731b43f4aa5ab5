"""Backups (contract §16) against ``tar`` + ``zstd``, measured in the same run, same disk.

Prints, each next to its baseline and the ratio (baseline time / ours: 1.0 = as fast):
  1. backup of a mixed volume (a Minecraft-like world: many small region files, a few
     large ones, some text; part random, part compressible) by the plugin's pipeline
     (``plugins/backups/archive.write_backup``: walk → tar → zstd -3, all cores → a file
     through the local target's sink, sha256 on the way) vs
     ``tar -I 'zstd -3 -T0' -cf`` of the same folder (target >= 0.8), and the archive
     size vs tar's (target: within 5 %);
  2. restore (``restore_stage`` + ``restore_swap``: read → sha256 → unzstd → checked
     extraction into a staging folder → swapped in) vs ``tar -I zstd -xf`` into an
     empty folder (target >= 0.8).

The issue asks for a 2 GiB volume; the default here is 512 MiB so that a run takes about
a minute on this 2-core machine (``--size-mb 2048`` for the full size). Each figure is the
best of ``--repeat`` runs, the two sides taking turns (a load that comes and goes hits
both); page cache is warm for both sides alike (each side reads the same tree right
after the other). Only the work is timed: removing the previous run's output (an archive,
an extracted tree) and flushing it to disk (``sync``) happen before the clock starts, for
both sides alike.

Run::

    .venv/bin/python -m bench.backups [--size-mb 512] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trio
from lightd.plugins.backups.archive import Meter, restore_stage, restore_swap, write_backup

MiB = 1 << 20


def make_volume(folder: Path, size_mb: int) -> None:
    """~``size_mb`` MiB: 70 % in region files of 1-4 MiB, 20 % in 4 large files, 10 % in
    small text/JSON files; each file half random, half repetitive (zstd gets ~1.6x)."""
    rng = random.Random(7)
    total = size_mb * MiB

    def blob(size: int) -> bytes:
        half = size // 2
        text = (b'{"block":"minecraft:stone","x":%d}\n' % rng.randrange(1000)) * (
            (size - half) // 30 + 1
        )
        return rng.randbytes(half) + text[: size - half]

    region = folder / "world" / "region"
    region.mkdir(parents=True)
    left = int(total * 0.7)
    i = 0
    while left > 0:
        size = min(left, rng.randrange(1 * MiB, 4 * MiB))
        (region / f"r.{i % 40}.{i // 40}.mca").write_bytes(blob(size))
        left -= size
        i += 1
    for j in range(4):
        (folder / f"world/large-{j}.dat").write_bytes(blob(int(total * 0.05)))
    small = folder / "world" / "data"
    small.mkdir()
    left = int(total * 0.1)
    k = 0
    while left > 0:
        size = rng.randrange(1024, 64 * 1024)
        (small / f"stats-{k}.json").write_bytes(blob(size))
        left -= size
        k += 1


def timed_pairs(
    theirs: Callable[[], None],
    ours: Callable[[], None],
    setup: Callable[[int], None],
    repeat: int,
) -> tuple[float, float]:
    """Best times of ``theirs`` and ``ours``, run in turns, ``setup(0)`` or ``setup(1)``
    (untimed) before each."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((theirs, ours)):
            setup(i)
            os.sync()
            began = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - began)
    return best[0], best[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if shutil.which("zstd") is None:
        raise SystemExit("needs the zstd binary (Debian: apt-get install zstd)")
    work = Path(tempfile.mkdtemp(prefix="bench-backups-", dir=args.dir))
    try:
        volumes = work / "volumes"
        volume = volumes / "vol"
        volume.mkdir(parents=True)
        make_volume(volume, args.size_mb)
        data = sum(p.stat().st_size for p in volume.rglob("*") if p.is_file())
        files = sum(1 for p in volume.rglob("*") if p.is_file())
        print(f"volume: {data / MiB:.0f} MiB in {files} files (cores: {os.cpu_count()})")
        theirs_archive = work / "tar.tar.zst"
        ours_archive = work / "ours.tar.zst"

        def no_archive(side: int) -> None:
            (theirs_archive, ours_archive)[side].unlink(missing_ok=True)

        def tar_backup() -> None:
            subprocess.run(
                ["tar", "-I", "zstd -3 -T0", "-cf", str(theirs_archive), "-C", str(volume), "."],
                check=True,
            )

        def our_backup() -> None:
            with open(ours_archive, "wb") as out:

                def sink(data: bytes) -> None:
                    out.write(data)

                write_backup(
                    volume,
                    [],
                    sink,
                    level=3,
                    threads=-1,
                    checkpoint=lambda: None,
                    meter=Meter(),
                )

        t_tar, t_ours = timed_pairs(tar_backup, our_backup, no_archive, args.repeat)
        s_tar, s_ours = theirs_archive.stat().st_size, ours_archive.stat().st_size
        print(
            f"backup:  ours {t_ours:6.2f} s ({data / MiB / t_ours:6.1f} MiB/s)  "
            f"tar+zstd {t_tar:6.2f} s  ratio {t_tar / t_ours:.2f} (target >= 0.8)"
        )
        print(
            f"size:    ours {s_ours / MiB:7.1f} MiB  tar+zstd {s_tar / MiB:7.1f} MiB  "
            f"diff {100 * (s_ours - s_tar) / s_tar:+.2f} % (target within 5 %)"
        )

        target = volumes / "dest"

        def empty_target(_side: int) -> None:
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()

        def tar_restore() -> None:
            subprocess.run(
                ["tar", "-I", "zstd", "-xf", str(theirs_archive), "-C", str(target)], check=True
            )

        def our_restore() -> None:
            with open(ours_archive, "rb") as source:
                staging = restore_stage(
                    volumes,
                    "dest",
                    source.read,
                    None,
                    max_total=1 << 40,
                    max_entries=10_000_000,
                    owner=None,
                    checkpoint=lambda: None,
                    meter=Meter(),
                )
            restore_swap(volumes, "dest", staging, truncate=True, checkpoint=lambda: None)

        r_tar, r_ours = timed_pairs(tar_restore, our_restore, empty_target, args.repeat)
        print(
            f"restore: ours {r_ours:6.2f} s ({data / MiB / r_ours:6.1f} MiB/s)  "
            f"tar -xf   {r_tar:6.2f} s  ratio {r_tar / r_ours:.2f} (target >= 0.8)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    trio.run(trio.sleep, 0)  # trio imports cleanly (the plugin's module needs it)
    main()
