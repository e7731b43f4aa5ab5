"""Streaming both ways (contract §13): a download and an upload of a file several times
larger than the agent's resident memory, against an agent subprocess whose RSS
(``/proc/<pid>/status`` ``VmRSS``) is sampled throughout: it must not grow with the file."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import trio

from ..conftest import ROOT, api_client, drop_guard_rules
from .conftest import new_volume

LISTENING = re.compile(r"listening on (http://\S+?)(?:,|\s|$)")
#: How much the agent's RSS may grow while it streams a big file.
GROWTH_LIMIT = 30 << 20
CHUNK = 1 << 20


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Sampler:
    """The highest RSS of a process seen while the block runs (sampled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.peak = rss(self.pid)
        task_status.started()
        while True:
            self.peak = max(self.peak, rss(self.pid))
            await trio.sleep(0.02)


async def test_big_download_and_upload_do_not_grow_memory(
    make_config: Callable[..., Path], docker_host: str, tmp_path: Path
) -> None:
    config = make_config({"server": {"max_body_bytes": 1 << 20}})
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "lightd", "--config", str(config)],
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env={**os.environ, "DOCKER_HOST": docker_host},
        )
    try:
        with trio.fail_after(30):
            while not (match := LISTENING.search(log.read_text(errors="replace"))):
                assert process.returncode is None, log.read_text()[-3000:]
                await trio.sleep(0.05)
        url = match[1]
        async with api_client(url) as c:
            volume_id, folder = await new_volume(c)
            # warm up both routes, so one-time imports and buffers are in the baseline
            (folder / "warm").write_bytes(os.urandom(4 << 20))
            await c.get(f"/volumes/{volume_id}/files/content", params={"path": "warm"})
            await c.put(
                f"/volumes/{volume_id}/files/content", params={"path": "warm2"}, content=b"w" * 4096
            )
            baseline = rss(process.pid)
            size = max(256 << 20, 3 * baseline)  # larger than the agent's whole RSS
            block = os.urandom(CHUNK)
            with (folder / "big.bin").open("wb") as fh:
                for _ in range(size // CHUNK):
                    fh.write(block)
            sampler = Sampler(process.pid)
            async with trio.open_nursery() as nursery:
                await nursery.start(sampler.run)
                received = 0
                async with c.stream(
                    "GET",
                    f"/volumes/{volume_id}/files/content",
                    params={"path": "big.bin"},
                    timeout=120,
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["content-length"] == str(size)
                    async for data in response.aiter_raw(CHUNK):
                        received += len(data)
                assert received == size
                download_peak = sampler.peak
                sampler.peak = rss(process.pid)

                async def body() -> AsyncIterator[bytes]:
                    for _ in range(size // CHUNK):
                        yield block

                response = await c.put(
                    f"/volumes/{volume_id}/files/content",
                    params={"path": "up.bin"},
                    content=body(),
                    headers={"Content-Length": str(size)},
                    timeout=120,
                )
                assert response.status_code == 200, response.text
                assert response.json()["size"] == size
                upload_peak = sampler.peak
                nursery.cancel_scope.cancel()
            assert (folder / "up.bin").stat().st_size == size
            with (folder / "up.bin").open("rb") as fh:
                assert fh.read(CHUNK) == block
        growth = {"download": download_peak - baseline, "upload": upload_peak - baseline}
        assert all(g < GROWTH_LIMIT for g in growth.values()), (baseline, size, growth)
    finally:
        if process.returncode is None:
            process.kill()
            with trio.fail_after(10):
                await process.wait()
        if match := LISTENING.search(log.read_text(errors="replace")):
            drop_guard_rules(int(match[1].rsplit(":", 1)[1]))
