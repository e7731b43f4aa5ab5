"""Moving a server between two agents on loopback (contract §20) against a tar pipe.

Two agents, each its own process (``bench.websocket.agent_process``) with its own storage
in one work folder (same disk), on the Docker engine of ``DOCKER_HOST``. The source's
volume is the mixed volume of ``bench.backups`` (many region files, a few large ones,
small JSON; half random, half repetitive). Prints, for each round, the time of

* ours: ``POST /containers/:id/transfer`` on the source until its job is ``done`` (the
  target has extracted, checked the sha256, adopted the volume and created the container);
* the baseline: ``tar -I 'zstd -3' -cf - -C src . | tar -I zstd -xf - -C dst`` through a
  pipe, the same tree, into the target agent's storage folder,

and the ratio (baseline time / ours: 1.0 = as fast; target >= 0.7). The two take turns;
page cache is warm for both alike. The machine is shared with other work: read the
ratios, not the absolute times.

Run::

    DOCKER_HOST=unix:///run/lightd-docker/docker.sock \\
        .venv/bin/python -m bench.transfer [--size-mb 512] [--repeat 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import trio

from .backups import make_volume
from .websocket import TOKEN, agent_process, api

MiB = 1 << 20
IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")
NETWORK = "lightd-bench-transfer"
EXTRA: dict[str, Any] = {
    "transfer": {"allowed_cidrs": ["127.0.0.0/8"]},
    "docker": {"network": NETWORK},
}


async def wait_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = (await client.get(f"/jobs/{job_id}")).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        await trio.sleep(0.02)


async def wait_ready(client: httpx.AsyncClient, internal_id: str) -> None:
    with trio.fail_after(120):
        while True:
            body = (await client.get(f"/containers/{internal_id}")).json()
            if body.get("install_state") == "ready":
                return
            await trio.sleep(0.05)


def measure(folder: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    return sum(sizes), len(sizes)


async def run(args: argparse.Namespace, work: Path) -> None:
    (work / "a").mkdir()
    (work / "b").mkdir()
    async with (
        agent_process(work / "a", {}, extra=EXTRA) as source,
        agent_process(work / "b", {}, extra=EXTRA) as target,
        api(source) as src,
        api(target) as dst,
    ):
        created = (await src.post("/volumes")).json()
        volume_id, folder = created["volume_id"], Path(created["path"])
        await trio.to_thread.run_sync(make_volume, folder, args.size_mb)
        data, files = await trio.to_thread.run_sync(measure, folder)
        print(f"volume: {data / MiB:.0f} MiB in {files} files (cores: {os.cpu_count()})")
        baseline_dir = work / "b" / "storage" / "volumes" / "baseline"
        best = [float("inf"), float("inf")]
        for n in range(args.repeat):
            # the baseline
            shutil.rmtree(baseline_dir, ignore_errors=True)
            baseline_dir.mkdir()
            os.sync()
            began = time.perf_counter()
            await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    f"tar -I 'zstd -3' -cf - -C {folder} . | tar -I zstd -xf - -C {baseline_dir}",
                    shell=True,
                    check=True,
                )
            )
            t_pipe = time.perf_counter() - began
            # ours: a new server on the same volume each round
            internal_id = f"bench-xfer-{n}"
            body = {
                "internal_id": internal_id,
                "image": IMAGE,
                "volume_id": volume_id,
                "startup_command": "sleep 3600",
            }
            response = await src.post("/containers", json=body)
            response.raise_for_status()
            await wait_ready(src, internal_id)
            os.sync()
            began = time.perf_counter()
            response = await src.post(
                f"/containers/{internal_id}/transfer",
                json={"target_url": target.url, "target_token": TOKEN},
            )
            response.raise_for_status()
            job = await wait_job(src, response.json()["job_id"])
            t_ours = time.perf_counter() - began
            if job["state"] != "done":
                raise SystemExit(f"transfer failed: {job}")
            print(
                f"round {n + 1}: ours {t_ours:6.2f} s ({data / MiB / t_ours:6.1f} MiB/s)  "
                f"tar|tar {t_pipe:6.2f} s  ratio {t_pipe / t_ours:.2f}"
            )
            best = [min(best[0], t_pipe), min(best[1], t_ours)]
            # The target gives the volume back for the next round.
            (await dst.delete(f"/containers/{internal_id}")).raise_for_status()
            (await dst.delete(f"/volumes/{volume_id}")).raise_for_status()
            (await src.delete(f"/containers/{internal_id}")).raise_for_status()
        print(
            f"transfer: ours {best[1]:6.2f} s ({data / MiB / best[1]:6.1f} MiB/s)  "
            f"tar|tar {best[0]:6.2f} s  ratio {best[0] / best[1]:.2f} (target >= 0.7; "
            f"best of {args.repeat}; shared machine: read the ratio)"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    if shutil.which("zstd") is None:
        raise SystemExit("needs the zstd binary (Debian: apt-get install zstd)")
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.dir))
    try:
        trio.run(run, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        client = docker.from_env()
        try:
            for c in client.containers.list(
                all=True, filters={"label": "lightd.managed=true"}, ignore_removed=True
            ):
                if c.labels.get("lightd.internal_id", "").startswith("bench-xfer-"):
                    c.remove(force=True)
            for net in client.networks.list(names=[NETWORK]):
                net.remove()
        finally:
            client.close()


if __name__ == "__main__":
    main()
