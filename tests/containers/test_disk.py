"""Disk limits (contract §15): size_limit on volumes, every API write path checked before it
writes and all-or-nothing, a server over its limit warned and stopped after the grace,
a start refused while over, ``disk_bytes`` in stats; both modes.

The accounting mode runs on the test's ordinary file system. The kernel mode needs an XFS
image with project quotas on a loop device (root, ``mkfs.xfs``, a kernel with XFS quota
support): the ``xfs_volumes`` fixture makes one and the kernel tests are skipped, saying
why, where the machine cannot.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd import DISK
from lightd.containers import CONTAINERS

from ..conftest import RunningAgent, api_client, wait_for
from .conftest import StartNode, ready, wait_state

KIB = 1024
MIB = 1024 * 1024

FAST = {"disk": {"check_interval": 0.2, "grace": 1}}


def folder_of(node: RunningAgent, volume_id: str) -> Path:
    return Path(node.agent.paths.volumes) / volume_id


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


async def limited_volume(api: httpx.AsyncClient, size_limit: int) -> str:
    response = await api.post("/volumes", json={"size_limit": size_limit})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["size_limit"] == size_limit and body["usage"] == {"bytes": 0, "files": 0}
    return str(body["volume_id"])


def messages_of(node: RunningAgent, internal_id: str) -> Any:
    return node.agent.stash[CONTAINERS].get(internal_id).hub.subscribe(size=10_000)


async def wait_message(subscription: Any, text: str, within: float = 20) -> None:
    with trio.fail_after(within):
        while True:
            frame = await subscription.receive()
            if frame.get("event") == "daemon_message" and frame.get("data") == text:
                return


# --- limits on volumes -------------------------------------------------------------------


async def test_size_limit_is_set_shown_and_changed(
    start_node: StartNode, containers_config: Any
) -> None:
    config = containers_config(FAST)
    node = await start_node(path=config)
    async with api_client(node.url) as api:
        volume_id = await limited_volume(api, 5 * MIB)
        shown = (await api.get(f"/volumes/{volume_id}")).json()
        assert shown["size_limit"] == 5 * MIB and shown["usage"] == {"bytes": 0, "files": 0}

        response = await api.patch(f"/volumes/{volume_id}", json={"size_limit": 7 * MIB})
        assert response.status_code == 200, response.text
        assert response.json()["size_limit"] == 7 * MIB
        assert list(response.json()) == list(shown)

        # [alias] the original daemon's forms, in MiB
        response = await api.post(f"/volumes/{volume_id}/resize", json={"size": 2})
        assert response.status_code == 200 and response.json()["size_limit"] == 2 * MIB
        response = await api.post("/volumes", json={"size": 3})
        assert response.status_code == 201 and response.json()["size_limit"] == 3 * MIB

        await api.post(f"/volumes/{volume_id}/files", json={"path": "a", "content": "x" * KIB})
        quota = (await api.get(f"/volumes/{volume_id}/quota")).json()
        assert quota == {
            "size_mb": 2,
            "used_mb": round(KIB / MIB, 2),
            "available_mb": round((2 * MIB - KIB) / MIB, 2),
            "percentage_used": round(KIB / (2 * MIB) * 100, 2),
        }

        for bad in (-1, "10", 1.5, True):
            response = await api.patch(f"/volumes/{volume_id}", json={"size_limit": bad})
            assert response.status_code == 400, bad
            assert response.json()["error"].startswith("size_limit:")
        response = await api.post("/volumes", json={"size_limit": -5})
        assert response.status_code == 400
        assert (await api.patch(f"/volumes/{'0' * 8}", json={"size_limit": 1})).status_code == 404

        # persisted: a restarted agent still knows the limit
        await node.stop()
    node = await start_node(path=config)
    async with api_client(node.url) as api:
        assert (await api.get(f"/volumes/{volume_id}")).json()["size_limit"] == 2 * MIB


async def test_usage_is_cached_and_follows_api_writes(start_node: StartNode) -> None:
    node = await start_node({"disk": {"check_interval": 3600}})
    async with api_client(node.url) as api:
        volume_id = (await api.post("/volumes")).json()["volume_id"]
        folder = folder_of(node, volume_id)
        (folder / "seed").write_bytes(b"s" * 1000)
        assert (await api.get(f"/volumes/{volume_id}")).json()["usage"]["bytes"] == 1000
        # written behind the agent's back: the cache does not walk again (interval 1 h)
        (folder / "hidden").write_bytes(b"h" * 500)
        assert (await api.get(f"/volumes/{volume_id}")).json()["usage"]["bytes"] == 1000
        # the API's own writes are counted at once
        await api.post(f"/volumes/{volume_id}/files", json={"path": "a", "content": "x" * 300})
        await api.put(f"/volumes/{volume_id}/files/content?path=b", content=b"y" * 200)
        assert (await api.get(f"/volumes/{volume_id}")).json()["usage"]["bytes"] == 1500
        # replacing a file counts the difference
        await api.post(f"/volumes/{volume_id}/files", json={"path": "a", "content": "x" * 100})
        assert (await api.get(f"/volumes/{volume_id}")).json()["usage"]["bytes"] == 1300
        # a delete has it measured again (in the background)
        await api.post(f"/volumes/{volume_id}/files/delete", json={"paths": ["seed"]})

        async def measured() -> bool:
            got = (await api.get(f"/volumes/{volume_id}")).json()["usage"]["bytes"]
            return bool(got == 500 + 100 + 200)

        await wait_for(measured, what="the volume measured again after a delete")


# --- API writes: refused before writing, nothing partial ------------------------------------


async def test_api_writes_over_the_limit_are_refused_whole(start_node: StartNode) -> None:
    node = await start_node(FAST)
    async with api_client(node.url) as api:
        volume_id = await limited_volume(api, 64 * KIB)
        folder = folder_of(node, volume_id)
        base = f"/volumes/{volume_id}"
        ok = await api.post(f"{base}/files", json={"path": "keep.txt", "content": "k" * 40 * KIB})
        assert ok.status_code == 200, ok.text
        before = listing(folder)

        def refused(response: httpx.Response) -> None:
            assert response.status_code == 409, response.text
            assert response.json()["error"] == "Disk quota exceeded"
            assert listing(folder) == before  # nothing partial, no temporary file

        # write (and its alias)
        refused(await api.post(f"{base}/files", json={"path": "w", "content": "w" * 30 * KIB}))
        refused(await api.post(f"{base}/write", json={"filename": "w", "content": "w" * 30 * KIB}))
        # upload with a length (refused before the body is read) and streamed without one
        refused(await api.put(f"{base}/files/content?path=u", content=b"u" * 30 * KIB))

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(40):
                yield b"c" * KIB

        refused(await api.put(f"{base}/files/content?path=sub/u", content=chunks()))
        # copy of a file (sync and as a job)
        refused(await api.post(f"{base}/copy", json={"source": "keep.txt", "destination": "c"}))
        job = await api.post(
            f"{base}/copy", json={"source": "keep.txt", "destination": "c", "async": True}
        )
        assert job.status_code == 202
        job_id = job.json()["job_id"]

        async def failed() -> bool:
            view = (await api.get(f"/jobs/{job_id}")).json()
            return bool(view["state"] == "failed")

        await wait_for(failed, what="the copy job to fail")
        assert (await api.get(f"/jobs/{job_id}")).json()["error"] == "Disk quota exceeded"
        assert listing(folder) == before
        # extraction of an archive that would exceed: made outside, written under the limit
        data = io.BytesIO()
        with tarfile.open(fileobj=data, mode="w:gz") as tf:
            for i in range(3):
                info = tarfile.TarInfo(f"world/r{i}.bin")
                info.size = 10 * KIB
                tf.addfile(info, io.BytesIO(bytes([i]) * 10 * KIB))
        small = data.getvalue()
        assert len(small) < 20 * KIB
        up = await api.put(f"{base}/files/content?path=w.tar.gz", content=small)
        assert up.status_code == 200, up.text
        before = listing(folder)
        refused(await api.post(f"{base}/decompress", json={"archive_path": "w.tar.gz"}))
        # an archive of the volume would not fit either
        refused(await api.post(f"{base}/compress", json={"format": "tar", "output_name": "all"}))

        # under the limit everything works, and the figures add up
        fine = await api.post(f"{base}/files", json={"path": "small", "content": "s" * KIB})
        assert fine.status_code == 200
        usage = (await api.get(base)).json()["usage"]["bytes"]
        assert usage == 40 * KIB + len(small) + KIB
        # a higher limit lets the extraction through
        await api.patch(base, json={"size_limit": 1 * MIB})
        done = await api.post(f"{base}/decompress", json={"archive_path": "w.tar.gz"})
        assert done.status_code == 200, done.text
        assert (folder / "world" / "r2.bin").stat().st_size == 10 * KIB


# --- the container's own writes (accounting mode) --------------------------------------------


async def test_server_over_the_limit_is_warned_stopped_and_cannot_start(
    start_node: StartNode, prefix: str
) -> None:
    node = await start_node(FAST)
    disk = node.agent.stash[DISK]
    async with api_client(node.url) as api:
        volume_id = await limited_volume(api, 256 * KIB)
        internal_id = f"{prefix}-disk"
        await ready(
            api,
            internal_id,
            volume_id=volume_id,
            startup_command="echo up; read go; dd if=/dev/zero of=big bs=1024 count=512; "
            "echo written; sleep 3600",
        )
        with messages_of(node, internal_id) as sub:
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
            await wait_state(api, internal_id, state="running")
            # stats carry the volume's usage
            response = await api.post(f"/containers/{internal_id}/command", json={"command": "go"})
            assert response.status_code == 200
            await wait_message(sub, "Disk quota exceeded: stopping in 1s")
            await wait_state(api, internal_id, state="offline")
        assert (folder_of(node, volume_id) / "big").stat().st_size == 512 * KIB
        assert disk.cached_bytes(volume_id) == 512 * KIB

        # a start while over: refused
        response = await api.post(f"/containers/{internal_id}/start")
        assert response.status_code == 409
        assert response.json()["error"] == "Disk quota exceeded"
        response = await api.post(f"/containers/{internal_id}/restart")
        assert response.status_code == 409

        # files deleted through the API: measured again, and the start is allowed
        await api.post(f"/volumes/{volume_id}/files/delete", json={"paths": ["big"]})

        async def under() -> bool:
            return disk.cached_bytes(volume_id) == 0

        await wait_for(under, what="the volume measured again after the delete")
        response = await api.post(f"/containers/{internal_id}/start")
        assert response.status_code == 200, response.text
        await wait_state(api, internal_id, state="running")
        await api.post(f"/containers/{internal_id}/kill")
        await wait_state(api, internal_id, state="offline")


async def test_hook_lightd_container_starting(start_node: StartNode, prefix: str) -> None:
    """The disk plugin's implementation refuses a start (409) while the volume's usage as
    last measured is over its limit; the WebSocket and boot starts go the same way (the
    supervisor asks before it queues)."""
    node = await start_node(FAST)
    async with api_client(node.url) as api:
        volume_id = await limited_volume(api, 4 * KIB)
        internal_id = f"{prefix}-hook"
        await ready(api, internal_id, volume_id=volume_id)
        (folder_of(node, volume_id) / "over").write_bytes(b"o" * 8 * KIB)
        await node.agent.stash[DISK].refresh(volume_id)
        with pytest.raises(Exception, match="Disk quota exceeded"):
            node.agent.hooks.container_starting(node.agent, internal_id, volume_id)
        response = await api.post(f"/containers/{internal_id}/start")
        assert response.status_code == 409
        os.unlink(folder_of(node, volume_id) / "over")
        await node.agent.stash[DISK].refresh(volume_id)
        node.agent.hooks.container_starting(node.agent, internal_id, volume_id)  # allowed


async def test_stats_carry_disk_bytes(start_node: StartNode, prefix: str) -> None:
    node = await start_node({"stats": {"interval": 0.2}})
    async with api_client(node.url) as api:
        volume_id = (await api.post("/volumes")).json()["volume_id"]
        await api.post(f"/volumes/{volume_id}/files", json={"path": "a", "content": "x" * 4321})
        await api.get(f"/volumes/{volume_id}")  # measured
        internal_id = f"{prefix}-stats"
        await ready(api, internal_id, volume_id=volume_id)
        with messages_of(node, internal_id):  # someone listens: the reader samples
            await api.post(f"/containers/{internal_id}/start")
            await wait_state(api, internal_id, state="running")

            async def sampled() -> bool:
                response = await api.get(f"/containers/{internal_id}/stats")
                return response.status_code == 200 and response.json()["disk_bytes"] == 4321

            await wait_for(sampled, within=20, what="a stats sample with disk_bytes")
        await api.post(f"/containers/{internal_id}/kill")
        await wait_state(api, internal_id, state="offline")


# --- kernel mode: XFS project quotas on a loop device -----------------------------------------


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False)


@pytest.fixture
def xfs_volumes(tmp_path: Path) -> Iterator[Path]:
    """A 300 MiB XFS image mounted with ``prjquota`` under the test's folder; loop device
    and mount removed at the end, whatever happened. Skips when the machine cannot."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("kernel quota mode needs root and mkfs.xfs (xfsprogs)")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    mount.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(300 * MIB)
    made = _run("mkfs.xfs", "-q", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.xfs failed: {made.stderr.strip()}")
    loop = _run("losetup", "--find", "--show", str(image))
    if loop.returncode != 0:
        pytest.skip(f"no loop device: {loop.stderr.strip()}")
    device = loop.stdout.strip()
    mounted = False
    try:
        result = _run("mount", "-t", "xfs", "-o", "prjquota", device, str(mount))
        if result.returncode != 0:
            pytest.skip(
                "cannot mount XFS with prjquota (a kernel without XFS quota support?): "
                + result.stderr.strip()
            )
        mounted = True
        (mount / "volumes").mkdir()
        yield mount / "volumes"
    finally:
        if mounted:
            _run("umount", "-l", str(mount))
        _run("losetup", "-d", device)


async def test_kernel_quota_refuses_the_containers_own_writes(
    start_node: StartNode, xfs_volumes: Path, prefix: str
) -> None:
    node = await start_node({**FAST, "storage": {"volumes_path": str(xfs_volumes)}})
    disk = node.agent.stash[DISK]
    assert getattr(disk, "mode", None) == "kernel"
    async with api_client(node.url) as api:
        volume_id = await limited_volume(api, 1 * MIB)
        internal_id = f"{prefix}-xfs"
        await ready(
            api,
            internal_id,
            volume_id=volume_id,
            startup_command="dd if=/dev/zero of=big bs=1024 count=4096; echo dd=$?; sleep 3600",
        )
        with messages_of(node, internal_id) as sub:
            await api.post(f"/containers/{internal_id}/start")
            with trio.fail_after(30):
                while True:
                    frame = await sub.receive()
                    if frame.get("event") == "console" and "dd=" in str(frame.get("data")):
                        assert "dd=1" in str(frame.get("data"))  # refused by the kernel
                        break
        size = (folder_of(node, volume_id) / "big").stat().st_size
        assert size <= 1 * MIB
        usage = (await api.get(f"/volumes/{volume_id}")).json()["usage"]
        assert 0 < usage["bytes"] <= 1 * MIB + 64 * KIB
        response = await api.post(
            f"/volumes/{volume_id}/files", json={"path": "w", "content": "w" * 512 * KIB}
        )
        assert response.status_code == 409
        assert response.json()["error"] == "Disk quota exceeded"
        await api.post(f"/containers/{internal_id}/kill")
        await wait_state(api, internal_id, state="offline")
        with contextlib.suppress(Exception):
            await api.delete(f"/containers/{internal_id}")
