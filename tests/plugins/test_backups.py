"""Contract §16 through a real agent: backups of volumes as ``tar.zst`` on the ``local``
target (the ``s3`` target: ``test_backups_s3.py``). Archives are checked with the
``zstandard`` package and ``tarfile`` independently of the agent's code."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from lightd import hookimpl

from ..conftest import MASTER, RunningAgent, StartAgent
from .conftest import error
from .test_async_jobs import finished, listing


async def backup(client: httpx.AsyncClient, vid: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/volumes/{vid}/backups", json=body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["message"] == "Backup started"
    job = await finished(client, answer["job_id"])
    assert job["state"] == "done", job
    got = await client.get(f"/volumes/{vid}/backups/{answer['backup_id']}")
    assert got.status_code == 200
    record: dict[str, Any] = got.json()
    assert record["state"] == "done"
    return record


async def restore(client: httpx.AsyncClient, vid: str, bid: str, **body: Any) -> dict[str, Any]:
    response = await client.post(f"/volumes/{vid}/backups/{bid}/restore", json=body)
    assert response.status_code == 202, response.text
    assert response.json()["message"] == "Restore started"
    return await finished(client, response.json()["job_id"])


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return {m.name: m for m in tf.getmembers()}


def fill(folder: Path) -> None:
    (folder / "world" / "region").mkdir(parents=True)
    for i in range(20):
        (folder / "world" / "region" / f"r.{i}.mca").write_bytes(os.urandom(3000) * 3)
    (folder / "server.properties").write_text("motd=hello\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "latest.log").write_text("log\n" * 100)
    (folder / "debug.log").write_text("x")


def backups_dir(node: RunningAgent) -> Path:
    return node.agent.paths.base / "backups"


async def test_backup_list_download_restore_delete(
    client: httpx.AsyncClient, volume: tuple[str, Path], running: RunningAgent
) -> None:
    vid, folder = volume
    fill(folder)
    record = await backup(client, vid, name="first", ignore=["*.log", "logs"])
    assert record["name"] == "first" and record["target"] == "local"
    listed = (await client.get(f"/volumes/{vid}/backups")).json()["backups"]
    assert [b["backup_id"] for b in listed] == [record["backup_id"]]
    # download: the archive, its sha256 as recorded, the ignore globs applied
    got = await client.get(f"/volumes/{vid}/backups/{record['backup_id']}/download")
    assert got.status_code == 200
    assert got.headers["content-type"] == "application/zstd"
    assert hashlib.sha256(got.content).hexdigest() == record["sha256"]
    assert len(got.content) == record["size"]
    names = set(members(got.content))
    assert "world/region/r.3.mca" in names and "server.properties" in names
    assert not any(n.endswith(".log") or n.startswith("logs") for n in names)
    # the archive sits under the local target, no temporary file beside it
    stored = backups_dir(running) / vid
    assert os.listdir(stored) == [f"{record['backup_id']}.tar.zst"]
    # restore (merge): a changed file comes back, a new one stays
    before = listing(folder)
    (folder / "server.properties").write_text("motd=griefed\n")
    (folder / "world" / "region" / "r.0.mca").unlink()
    (folder / "extra.txt").write_text("new")
    job = await restore(client, vid, record["backup_id"])
    assert job["state"] == "done", job
    assert (folder / "server.properties").read_text() == "motd=hello\n"
    assert (folder / "world" / "region" / "r.0.mca").exists()
    assert (folder / "extra.txt").exists()
    # truncate: exactly the backup (the ignored files are gone too)
    job = await restore(client, vid, record["backup_id"], truncate=True)
    assert job["state"] == "done", job
    after = listing(folder)
    assert not (folder / "extra.txt").exists()
    assert {k for k in after} == {k for k in before if not k.endswith(".log") and k != "logs"}
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".lightd-restore-")]
    # delete
    response = await client.delete(f"/volumes/{vid}/backups/{record['backup_id']}")
    assert response.json() == {"message": "Backup deleted"}
    assert not (stored / f"{record['backup_id']}.tar.zst").exists()
    response = await client.get(f"/volumes/{vid}/backups/{record['backup_id']}")
    assert response.status_code == 404 and error(response) == "Backup not found"


async def test_unknown_volume_target_and_backup(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    vid, _ = volume
    response = await client.post("/volumes/7d9b5a4c-1111-4222-8333-444455556666/backups", json={})
    assert response.status_code == 404 and error(response) == "Volume not found"
    response = await client.post(f"/volumes/{vid}/backups", json={"target": "tape"})
    assert response.status_code == 400 and error(response) == "Unknown backup target: tape"
    response = await client.post(f"/volumes/{vid}/backups", json={"ignore": "x"})
    assert response.status_code == 400
    for path in ("", "/download"):
        response = await client.get(f"/volumes/{vid}/backups/nope{path}")
        assert response.status_code == 404 and error(response) == "Backup not found"


async def test_links_are_archived_as_links_never_followed(
    client: httpx.AsyncClient, volume: tuple[str, Path], tmp_path: Path
) -> None:
    vid, folder = volume
    secret = tmp_path / "host-secret"
    secret.write_text("TOP SECRET")
    (folder / "escape").symlink_to(secret)
    (folder / "escape-dir").symlink_to(tmp_path)
    record = await backup(client, vid)
    data = (await client.get(f"/volumes/{vid}/backups/{record['backup_id']}/download")).content
    found = members(data)
    assert found["escape"].issym() and found["escape"].linkname == str(secret)
    assert found["escape-dir"].issym()
    assert b"TOP SECRET" not in zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()


def tar_zst(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            tf.addfile(info, None if data is None else io.BytesIO(data))
    return zstandard.ZstdCompressor().compress(raw.getvalue())


def file_entry(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def link_entry(
    name: str, target: str, kind: bytes = tarfile.SYMTYPE
) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def plant(running: RunningAgent, vid: str, bid: str, data: bytes) -> None:
    """Replace a stored archive (as a tampered target would hold it)."""
    (backups_dir(running) / vid / f"{bid}.tar.zst").write_bytes(data)


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([file_entry("../outside.txt", b"x")], "entry name with '..'"),
        ([file_entry("/abs.txt", b"x")], "absolute entry name"),
        ([link_entry("up", "../../outside")], "link points outside the destination"),
        (
            [link_entry("d", "."), link_entry("d/x", "../../../x")],
            "link points outside the destination",
        ),
        ([link_entry("h", "/etc/passwd", tarfile.LNKTYPE)], "hard link points outside"),
        ([link_entry("ok", "world"), file_entry("ok/../../evil", b"x")], "'..'"),
    ],
)
async def test_restore_refuses_escaping_archives(
    client: httpx.AsyncClient,
    volume: tuple[str, Path],
    running: RunningAgent,
    tmp_path: Path,
    entries: list[tuple[tarfile.TarInfo, bytes | None]],
    reason: str,
) -> None:
    vid, folder = volume
    fill(folder)
    record = await backup(client, vid)
    data = tar_zst([file_entry("server.properties", b"evil"), *entries])
    plant(running, vid, record["backup_id"], data)
    # the recorded sha256 no longer matches, but the entries are refused first
    before = listing(folder)
    outside = set(os.listdir(folder.parent)), set(os.listdir(tmp_path))
    job = await restore(client, vid, record["backup_id"], truncate=True)
    assert job["state"] == "failed"
    assert job["error"].startswith("Invalid archive:") and reason in job["error"], job
    assert listing(folder) == before
    assert (folder / "server.properties").read_text() == "motd=hello\n"
    assert (set(os.listdir(folder.parent)), set(os.listdir(tmp_path))) == outside


async def test_failed_restore_leaves_the_volume_as_it_was(
    client: httpx.AsyncClient, volume: tuple[str, Path], running: RunningAgent
) -> None:
    vid, folder = volume
    fill(folder)
    record = await backup(client, vid)
    stored = backups_dir(running) / vid / f"{record['backup_id']}.tar.zst"
    good = stored.read_bytes()
    (folder / "server.properties").write_text("changed\n")
    before = listing(folder)
    # truncated archive (corrupt)
    stored.write_bytes(good[: len(good) // 2])
    job = await restore(client, vid, record["backup_id"], truncate=True)
    assert job["state"] == "failed" and job["error"].startswith("Invalid archive"), job
    assert listing(folder) == before
    # a well-formed archive whose sha256 is not the recorded one (tampered)
    stored.write_bytes(tar_zst([file_entry("server.properties", b"tampered")]))
    job = await restore(client, vid, record["backup_id"])
    assert job == {**job, "state": "failed", "error": "Invalid archive: checksum mismatch"}
    assert listing(folder) == before
    assert (folder / "server.properties").read_text() == "changed\n"
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".lightd-restore-")]
    # the good archive restores
    stored.write_bytes(good)
    assert (await restore(client, vid, record["backup_id"]))["state"] == "done"
    assert (folder / "server.properties").read_text() == "motd=hello\n"


async def test_delete_volume_keeps_or_deletes_backups(
    client: httpx.AsyncClient, running: RunningAgent
) -> None:
    from .conftest import new_volume

    kept, folder = await new_volume(client)
    fill(folder)
    first = await backup(client, kept)
    response = await client.delete(f"/volumes/{kept}?backups=sometimes")
    assert response.status_code == 400
    assert error(response) == "Invalid backups: must be keep or delete"
    assert (await client.delete(f"/volumes/{kept}")).status_code == 200
    listed = (await client.get(f"/volumes/{kept}/backups")).json()["backups"]
    assert [b["backup_id"] for b in listed] == [first["backup_id"]]
    got = await client.get(f"/volumes/{kept}/backups/{first['backup_id']}/download")
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == first["sha256"]

    gone, folder = await new_volume(client)
    fill(folder)
    second = await backup(client, gone)
    assert (await client.delete(f"/volumes/{gone}?backups=delete")).status_code == 200
    assert not (backups_dir(running) / gone / f"{second['backup_id']}.tar.zst").exists()
    assert (await client.get(f"/volumes/{gone}/backups")).status_code == 404


async def test_finished_backup_reaches_the_outbox_and_events(
    start_agent: StartAgent, make_config: Any
) -> None:
    from ..conftest import api_client

    node = await start_agent(
        make_config({"remote": {"enabled": True, "url": "http://127.0.0.1:9/api", "token": MASTER}})
    )
    async with api_client(node.url) as c:
        response = await c.post("/volumes")
        vid, folder = response.json()["volume_id"], Path(response.json()["path"])
        (folder / "a.txt").write_text("a")
        record = await backup(c, vid)
    rows = await node.agent.store.read(
        lambda conn: conn.execute("SELECT server, body FROM remote_sync_outbox").fetchall()
    )
    import json

    bodies = [json.loads(r["body"]) for r in rows if r["server"] == f"volume:{vid}"]
    assert len(bodies) == 1
    body = bodies[0]
    assert {
        k: body[k] for k in ("event", "volume_id", "backup_id", "status", "size", "sha256")
    } == {
        "event": "backup",
        "volume_id": vid,
        "backup_id": record["backup_id"],
        "status": "done",
        "size": record["size"],
        "sha256": record["sha256"],
    }
    assert "event_id" in body and "timestamp" in body


# --- the hooks this plugin added (tests/test_contracts.py wants one test each) -------------


class _MemoryTarget:
    """A third-party target kept in memory, declared through ``lightd_backup_targets``."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    async def open_upload(self, volume_id: str, backup_id: str) -> Any:
        blobs, key, parts = self.blobs, f"{volume_id}/{backup_id}", []

        class Upload:
            async def write(self, data: bytes) -> None:
                parts.append(data)

            async def commit(self) -> None:
                blobs[key] = b"".join(parts)

            async def abort(self) -> None:
                parts.clear()

        return Upload()

    async def open_download(self, volume_id: str, backup_id: str) -> Any:
        stream = io.BytesIO(self.blobs[f"{volume_id}/{backup_id}"])

        class Download:
            size = len(stream.getvalue())

            async def read(self, n: int) -> bytes:
                return stream.read(n)

            async def aclose(self) -> None:
                pass

        return Download()

    async def delete(self, volume_id: str, backup_id: str) -> None:
        self.blobs.pop(f"{volume_id}/{backup_id}", None)


class _TargetPlugin:
    def __init__(self) -> None:
        self.target = _MemoryTarget()
        self.updates: list[tuple[str, dict[str, Any]]] = []
        self.deleted: list[tuple[str, str]] = []

    @hookimpl
    def lightd_backup_targets(self) -> dict[str, Any]:
        return {"memory": self.target}

    @hookimpl
    def lightd_panel_update(self, key: str, update: dict[str, Any]) -> None:
        self.updates.append((key, dict(update)))

    @hookimpl
    def lightd_volume_deleted(self, volume_id: str, backups: str) -> None:
        self.deleted.append((volume_id, backups))


async def test_hook_lightd_backup_targets(start_agent: StartAgent, config_path: Path) -> None:
    from ..conftest import api_client

    plugin = _TargetPlugin()
    node = await start_agent(config_path, extra_plugins=(("memtarget", plugin),))
    async with api_client(node.url) as c:
        vid = (await c.post("/volumes")).json()["volume_id"]
        folder = await node.agent.stash[__import__("lightd").VOLUMES].path(vid)
        (folder / "a.txt").write_text("in memory")
        record = await backup(c, vid, target="memory")
        assert list(plugin.target.blobs) == [f"{vid}/{record['backup_id']}"]
        (folder / "a.txt").write_text("changed")
        assert (await restore(c, vid, record["backup_id"]))["state"] == "done"
        assert (folder / "a.txt").read_text() == "in memory"


async def test_hook_lightd_panel_update(start_agent: StartAgent, config_path: Path) -> None:
    from ..conftest import api_client

    plugin = _TargetPlugin()
    node = await start_agent(config_path, extra_plugins=(("memtarget", plugin),))
    async with api_client(node.url) as c:
        vid = (await c.post("/volumes")).json()["volume_id"]
        record = await backup(c, vid)
    assert plugin.updates == [
        (
            f"volume:{vid}",
            {
                "event": "backup",
                "volume_id": vid,
                "backup_id": record["backup_id"],
                "status": "done",
                "size": record["size"],
                "sha256": record["sha256"],
            },
        )
    ]


async def test_hook_lightd_volume_deleted(start_agent: StartAgent, config_path: Path) -> None:
    from ..conftest import api_client

    plugin = _TargetPlugin()
    node = await start_agent(config_path, extra_plugins=(("memtarget", plugin),))
    async with api_client(node.url) as c:
        a = (await c.post("/volumes")).json()["volume_id"]
        b = (await c.post("/volumes")).json()["volume_id"]
        assert (await c.delete(f"/volumes/{a}")).status_code == 200
        assert (await c.delete(f"/volumes/{b}?backups=delete")).status_code == 200
    assert plugin.deleted == [(a, "keep"), (b, "delete")]


async def test_hook_lightd_volume_running(running: RunningAgent) -> None:
    # No container uses the volume: nobody answers. (A running container's refusal of a
    # restore is tested in tests/containers/test_backups_running.py.)
    agent = running.agent
    assert agent.hooks.volume_running(agent, "7d9b5a4c-1111-4222-8333-444455556666") is None
