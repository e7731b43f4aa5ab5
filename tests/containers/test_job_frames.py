"""Contract §14 on the container WebSocket: ``{"event":"job","data":<job>}`` frames.

Real containers, real WebSocket clients, real jobs: an async copy or compress on a
container's volume (a job of the volume alone reaches every container using it), and a
job of one container (``internal_id``, through the test plugin of ``tests/test_jobs.py``)
reaching that container only. A socket whose token lacks ``read``, and the socket of
another container, get no job frame; progress frames come at most twice a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import trio
import trio_websocket

from ..conftest import MASTER, RunningAgent, api_client
from ..test_jobs import JobsPlugin
from .conftest import StartNode, get, ready

Frame = dict[str, Any]


class Socket:
    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def next(self, within: float = 20) -> Frame:
        with trio.fail_after(within):
            frame: Frame = json.loads(await self.ws.get_message())
        return frame

    async def until(self, match: Callable[[Frame], bool], within: float = 30) -> list[Frame]:
        """Frames up to and including the first that matches."""
        seen: list[Frame] = []
        with trio.fail_after(within):
            while not seen or not match(seen[-1]):
                seen.append(await self.next(within))
        return seen

    async def frames_before_reply(self) -> list[Frame]:
        """Every frame queued for this socket before a reply to a frame sent now (the
        socket's frames come in order, so a job frame already sent would come first)."""
        await self.ws.send_message(json.dumps({"event": "request_logs", "lines": 1}))
        frames = await self.until(
            lambda f: (
                f["event"] == "logs"
                or (f["event"] == "daemon_message" and f["data"].startswith("Error: Token lacks"))
            )
        )
        return frames[:-1]


def job_frames(frames: list[Frame], job_id: str | None = None) -> list[Frame]:
    return [f for f in frames if f["event"] == "job" and job_id in (None, f["data"]["id"])]


def ended(job_id: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f["event"] == "job"
        and f["data"]["id"] == job_id
        and f["data"]["state"] in ("done", "failed", "cancelled")
    )


@asynccontextmanager
async def socket(
    ws_connect: Callable[..., Any], node: RunningAgent, internal_id: str, token: str = MASTER
) -> AsyncIterator[Socket]:
    path = f"/ws/{internal_id}?token={token}"
    async with ws_connect(node.url, path, disconnect_timeout=5) as ws:
        client = Socket(ws)
        if token == MASTER:
            assert (await client.next())["event"] == "status"  # connected and subscribed
        yield client


async def mint(api: httpx.AsyncClient, **body: Any) -> str:
    response = await api.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


async def test_a_job_on_the_volume_reaches_its_containers_readers_only(
    start_node: StartNode, prefix: str, ws_connect: Callable[..., Any]
) -> None:
    node = await start_node()
    async with api_client(node.url) as api:
        first, other = f"{prefix}-a", f"{prefix}-b"
        await ready(api, first)
        await ready(api, other)
        volume_id = (await get(api, first))["volume_id"]
        folder = node.agent.paths.volumes / volume_id
        (folder / "world").mkdir(exist_ok=True)
        (folder / "world" / "level.dat").write_bytes(b"level" * 1000)
        no_read = await mint(api, containers=[first], permissions=["console"])
        scoped = await mint(api, containers=[first], permissions=["read"])
        async with (
            socket(ws_connect, node, first) as reader,
            socket(ws_connect, node, first, scoped) as scoped_reader,
            socket(ws_connect, node, first, no_read) as blind,
            socket(ws_connect, node, other) as bystander,
        ):
            assert (await scoped_reader.next())["event"] == "status"
            response = await api.post(
                f"/volumes/{volume_id}/copy",
                json={"source": "world", "destination": "world-copy", "async": True},
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            frames = job_frames(await reader.until(ended(job_id)), job_id)
            final = frames[-1]["data"]
            assert final == (await api.get(f"/jobs/{job_id}")).json()
            assert final["state"] == "done"
            assert final["kind"] == "volume.copy"
            assert final["volume_id"] == volume_id
            assert final["result"]["destination"] == "world-copy"
            assert frames[0]["data"]["state"] in ("queued", "running")
            assert set(frames[-1]) == {"event", "data"}
            # a token scoped to the container, with read, sees its volume's jobs too
            scoped_frames = job_frames(await scoped_reader.until(ended(job_id)), job_id)
            assert scoped_frames[-1]["data"] == final
            # no read, or another container: no job frame
            assert job_frames(await blind.frames_before_reply()) == []
            assert job_frames(await bystander.frames_before_reply()) == []


async def test_progress_frames_come_at_most_twice_a_second(
    start_node: StartNode, prefix: str, ws_connect: Callable[..., Any]
) -> None:
    node = await start_node()
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-a"
        await ready(api, internal_id)
        volume_id = (await get(api, internal_id))["volume_id"]
        big = node.agent.paths.volumes / volume_id / "big.bin"
        big.touch()
        os.truncate(big, 1 << 30)  # sparse: seconds of compression, no disk used
        async with socket(ws_connect, node, internal_id) as reader:
            response = await api.post(
                f"/volumes/{volume_id}/compress",
                json={"format": "tar.gz", "output_name": "big", "async": True},
            )
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            began = trio.current_time()
            progress: list[Frame] = []
            with trio.move_on_after(2.5):
                while True:
                    frame = await reader.next()
                    if frame["event"] == "job" and frame["data"]["state"] == "running":
                        progress.append(frame)
            elapsed = trio.current_time() - began
            assert len(progress) >= 2, progress  # the bytes read so far, as they grow
            dones = [f["data"]["progress"]["done"] for f in progress]
            assert dones == sorted(dones) and dones[-1] > 0
            assert progress[-1]["data"]["progress"]["total"] == 1 << 30
            assert len(progress) <= 2 * elapsed + 2, (len(progress), elapsed)
            cancelled = await api.delete(f"/jobs/{job_id}")
            assert cancelled.status_code == 200, cancelled.text
            last = job_frames(await reader.until(ended(job_id)), job_id)[-1]
            assert last["data"]["state"] == "cancelled"
            assert last["data"]["result"] is None


async def test_a_job_of_a_container_reaches_that_container_only(
    start_node: StartNode, prefix: str, ws_connect: Callable[..., Any]
) -> None:
    plugin = JobsPlugin()
    node = await start_node(extra=(("jobtest", plugin),))
    async with api_client(node.url) as api:
        mine, other = f"{prefix}-a", f"{prefix}-b"
        await ready(api, mine)
        await ready(api, other)
        async with (
            socket(ws_connect, node, mine) as reader,
            socket(ws_connect, node, other) as bystander,
        ):
            response = await api.post("/test/jobs", json={"internal_id": mine})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            first = job_frames(
                await reader.until(lambda f: f["event"] == "job" and f["data"]["id"] == job_id),
                job_id,
            )[0]
            assert first["data"]["internal_id"] == mine
            plugin.release(job_id)
            final = job_frames(await reader.until(ended(job_id)), job_id)[-1]["data"]
            assert final["state"] == "done"
            assert final["result"] == {"steps": 3}
            assert job_frames(await bystander.frames_before_reply()) == []
