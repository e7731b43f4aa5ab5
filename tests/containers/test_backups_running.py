"""Contract §16 with a real server using the volume: a restore needs it offline (409
``Volume in use by a running container``, the volume untouched), a backup of a running
server is consistent per file, and a restore holds the volume until it ends (a start or
restart meanwhile: 409 ``Volume is being restored from a backup``)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Any

import httpx
import trio
import zstandard
from lightd import VOLUMES, hookimpl

from ..conftest import RunningAgent, api_client, wait_for
from ..plugins.test_async_jobs import finished, job
from .conftest import StartNode, ready, wait_state

#: Rewrites eight 64 KiB files over and over, each version written aside and renamed
#: over the old one (as a server saving its world does), each made of one line repeated:
#: a copy that mixes two versions, or half of one, shows.
WRITER = (
    "echo ready; i=0; while true; do i=$((i+1)); "
    "for f in 1 2 3 4 5 6 7 8; do "
    'yes "version $i of file $f" | head -c 65536 > .w$f.tmp && mv .w$f.tmp w$f.dat; '
    "done; echo $i > .count.tmp && mv .count.tmp count; done"
)
SIZE = 65536


async def volume_folder(node: RunningAgent, volume_id: str) -> Path:
    folder = await node.agent.stash[VOLUMES].path(volume_id)
    assert folder is not None
    return folder


def one_version(data: bytes) -> bool:
    """A whole version of a ``WRITER`` file: ``SIZE`` bytes of one line repeated."""
    if len(data) != SIZE:
        return False
    line = data[: data.index(b"\n") + 1]
    whole = line * (SIZE // len(line) + 1)
    return data == whole[:SIZE]


def archived(data: bytes) -> dict[str, bytes]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for member in tf.getmembers():
            if member.isreg():
                extracted = tf.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
    return found


def count(folder: Path) -> int:
    try:
        return int((folder / "count").read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


async def restores(api: httpx.AsyncClient, vid: str) -> list[dict[str, Any]]:
    response = await api.get("/jobs", params={"volume_id": vid})
    assert response.status_code == 200, response.text
    return [j for j in response.json()["jobs"] if j["kind"] == "volume.restore"]


async def start_backup(api: httpx.AsyncClient, vid: str, **body: Any) -> dict[str, Any]:
    response = await api.post(f"/volumes/{vid}/backups", json=body)
    assert response.status_code == 202, response.text
    done = await finished(api, response.json()["job_id"])
    assert done["state"] == "done", done
    return dict((await api.get(f"/volumes/{vid}/backups/{response.json()['backup_id']}")).json())


async def test_running_server_backup_is_consistent_and_blocks_restore(
    start_node: StartNode, prefix: str
) -> None:
    node = await start_node()
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-bk"
        body = await ready(api, internal_id, startup_command=WRITER)
        vid = body["volume_id"]
        folder = await volume_folder(node, vid)
        # Something big and still beside the files the server rewrites: the backup takes
        # a while, during which the server goes on writing.
        (folder / "world").mkdir()
        for i in range(8):
            (folder / "world" / f"r.{i}.mca").write_bytes(os.urandom(4 << 20))
        (folder / "marker.txt").write_text("before")
        assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        await wait_state(api, internal_id, state="running")

        async def writing() -> bool:
            return count(folder) >= 2

        await wait_for(writing, what="the server to rewrite its files")

        # a backup of the running server: done, and every file one whole version
        began = count(folder)
        record = await start_backup(api, vid, ignore=["*.tmp"])
        assert count(folder) > began  # the server wrote on during the backup
        got = await api.get(f"/volumes/{vid}/backups/{record['backup_id']}/download")
        files = archived(got.content)
        assert {f"w{n}.dat" for n in range(1, 9)} <= set(files)
        assert not [name for name in files if name.endswith(".tmp")]
        for n in range(1, 9):
            assert one_version(files[f"w{n}.dat"]), files[f"w{n}.dat"][:80]
        assert files["marker.txt"] == b"before"
        assert files["world/r.3.mca"] == (folder / "world" / "r.3.mca").read_bytes()

        # a restore while it runs: refused, nothing started, the volume untouched
        (folder / "marker.txt").write_text("after")
        (folder / "world" / "r.0.mca").unlink()
        response = await api.post(
            f"/volumes/{vid}/backups/{record['backup_id']}/restore", json={"truncate": True}
        )
        assert response.status_code == 409
        assert response.json()["error"] == "Volume in use by a running container"
        assert (folder / "marker.txt").read_text() == "after"
        assert not (folder / "world" / "r.0.mca").exists()
        assert not [n for n in os.listdir(folder.parent) if n.startswith(".lightd-restore-")]
        assert await restores(api, vid) == []

        # stopped: the restore works
        assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
        await wait_state(api, internal_id, state="offline")
        response = await api.post(
            f"/volumes/{vid}/backups/{record['backup_id']}/restore", json={"truncate": True}
        )
        assert response.status_code == 202, response.text
        assert (await finished(api, response.json()["job_id"]))["state"] == "done"
        folder = await volume_folder(node, vid)
        assert (folder / "marker.txt").read_text() == "before"
        assert (folder / "world" / "r.0.mca").read_bytes() == files["world/r.0.mca"]
        for n in range(1, 9):
            assert (folder / f"w{n}.dat").read_bytes() == files[f"w{n}.dat"]


class _GatedTarget:
    """A backup target in memory whose downloads stop half-way until their ``gate`` is
    set: the test holds a restore in its extraction phase as long as it likes."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        #: Per download opened: (half-way reached, go on).
        self.opened, self.downloads = trio.open_memory_channel[tuple[trio.Event, trio.Event]](8)

    async def open_upload(self, volume_id: str, backup_id: str) -> Any:
        blobs, key, parts = self.blobs, f"{volume_id}/{backup_id}", []

        class Upload:
            async def write(self, data: bytes) -> None:
                parts.append(bytes(data))

            async def commit(self) -> None:
                blobs[key] = b"".join(parts)

            async def abort(self) -> None:
                parts.clear()

        return Upload()

    async def open_download(self, volume_id: str, backup_id: str) -> Any:
        stream = io.BytesIO(self.blobs[f"{volume_id}/{backup_id}"])
        reading, gate = trio.Event(), trio.Event()
        self.opened.send_nowait((reading, gate))

        class Download:
            size = len(stream.getvalue())

            async def read(self, n: int) -> bytes:
                data = stream.read(min(n, 4096))
                if stream.tell() > self.size // 2:  # half-way through: wait
                    reading.set()
                    await gate.wait()
                return data

            async def aclose(self) -> None:
                pass

        return Download()

    async def delete(self, volume_id: str, backup_id: str) -> None:
        self.blobs.pop(f"{volume_id}/{backup_id}", None)


class _GatedPlugin:
    def __init__(self) -> None:
        self.target = _GatedTarget()

    @hookimpl
    def lightd_backup_targets(self) -> dict[str, Any]:
        return {"gated": self.target}


async def test_restore_holds_the_volume_against_starts(start_node: StartNode, prefix: str) -> None:
    plugin = _GatedPlugin()
    node = await start_node(extra=(("gated", plugin),))
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-hold"
        body = await ready(api, internal_id)
        vid = body["volume_id"]
        folder = await volume_folder(node, vid)
        for i in range(4):
            (folder / f"f{i}.bin").write_bytes(os.urandom(256 << 10))
        record = await start_backup(api, vid, target="gated")
        (folder / "f0.bin").write_bytes(b"changed")

        async def held_restore() -> tuple[str, trio.Event]:
            response = await api.post(f"/volumes/{vid}/backups/{record['backup_id']}/restore")
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            with trio.fail_after(30):
                reading, gate = await plugin.target.downloads.receive()
                await reading.wait()
            assert (await job(api, job_id))["state"] == "running"
            return job_id, gate

        # cancelled half-way: the volume as it was, and the hold gone with the job
        job_id, _ = await held_restore()
        response = await api.post(f"/containers/{internal_id}/start")
        assert response.status_code == 409
        response = await api.delete(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        assert (await finished(api, job_id))["state"] == "cancelled"
        assert (folder / "f0.bin").read_bytes() == b"changed"
        assert not [n for n in os.listdir(folder.parent) if n.startswith(".lightd-restore-")]
        assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        await wait_state(api, internal_id, state="running")
        assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
        await wait_state(api, internal_id, state="offline")

        job_id, gate = await held_restore()

        # held: neither a start nor a restart gets through, the server stays offline
        for action in ("start", "restart"):
            response = await api.post(f"/containers/{internal_id}/{action}")
            assert response.status_code == 409, (action, response.text)
            assert response.json()["error"] == "Volume is being restored from a backup"
        assert (await api.get(f"/containers/{internal_id}")).json()["state"] == "offline"
        assert (folder / "f0.bin").read_bytes() == b"changed"  # not swapped in yet

        gate.set()
        assert (await finished(api, job_id))["state"] == "done"
        folder = await volume_folder(node, vid)
        assert len((folder / "f0.bin").read_bytes()) == 256 << 10

        # released: the server starts again
        response = await api.post(f"/containers/{internal_id}/start")
        assert response.status_code == 200, response.text
        await wait_state(api, internal_id, state="running")
        assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
        await wait_state(api, internal_id, state="offline")
