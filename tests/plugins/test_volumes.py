"""Contract §5, volumes plugin: every route, status and message, against real folders of
a real agent on loopback (the registry, files, folders, copy, listing, the aliases)."""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightd import hookimpl
from lightd.interfaces import VOLUMES

from ..conftest import RunningAgent, StartAgent, api_client, wait_for
from .conftest import error, new_volume

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# --- registry --------------------------------------------------------------------------------


async def test_create_volume(running: RunningAgent, client: httpx.AsyncClient) -> None:
    response = await client.post("/volumes")
    assert response.status_code == 201
    body = response.json()
    assert list(body) == ["volume_id", "path", "created_at"]
    assert UUID4.fullmatch(body["volume_id"])
    folder = running.agent.paths.volumes / body["volume_id"]
    assert body["path"] == str(folder)
    assert folder.is_dir() and not folder.is_symlink()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert abs(body["created_at"] - running.agent.clock()) < 5


@pytest.mark.parametrize("body", [b"{}", b'{"size": 2048}'])
async def test_create_volume_accepts_empty_object_and_ignores_fields(
    client: httpx.AsyncClient, body: bytes
) -> None:
    response = await client.post(
        "/volumes", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 201


async def test_create_volume_rejects_bad_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/volumes", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert error(response) == "Invalid JSON body"


async def test_list_volumes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/volumes")).json() == {"volumes": []}
    first, _ = await new_volume(client)
    second, _ = await new_volume(client)
    listed = (await client.get("/volumes")).json()["volumes"]
    assert {v["volume_id"] for v in listed} == {first, second}
    assert all(list(v) == ["volume_id", "path", "created_at"] for v in listed)


async def test_registry_survives_restart(start_agent: StartAgent, config_path: Path) -> None:
    node = await start_agent(config_path)
    async with api_client(node.url) as c:
        volume_id, _ = await new_volume(c)
        await c.post(f"/volumes/{volume_id}/files", json={"path": "a.txt", "content": "x"})
    await node.stop()
    node = await start_agent(config_path)
    async with api_client(node.url) as c:
        listed = (await c.get("/volumes")).json()["volumes"]
        assert [v["volume_id"] for v in listed] == [volume_id]
        files = (await c.get(f"/volumes/{volume_id}/files")).json()["files"]
    assert [f["name"] for f in files] == ["a.txt"]
    rows = await node.agent.store.execute("SELECT volume_id FROM volumes_registry")
    assert [r["volume_id"] for r in rows] == [volume_id]


async def test_folders_of_the_original_daemon_are_adopted(
    start_agent: StartAgent, config_path: Path
) -> None:
    volumes = config_path.parent / "storage" / "volumes"
    legacy = str(uuid.uuid4())
    (volumes / legacy).mkdir(parents=True)
    (volumes / legacy / "server.jar").write_bytes(b"jar")
    (volumes / "not-a-volume").mkdir()
    node = await start_agent(config_path)
    async with api_client(node.url) as c:
        listed = (await c.get("/volumes")).json()["volumes"]
        assert [v["volume_id"] for v in listed] == [legacy]
        files = (await c.get(f"/volumes/{legacy}/files")).json()["files"]
    assert [f["name"] for f in files] == ["server.jar"]


async def test_delete_volume(running: RunningAgent, client: httpx.AsyncClient) -> None:
    volume_id, folder = await new_volume(client)
    (folder / "world").mkdir()
    (folder / "world" / "level.dat").write_bytes(b"x" * 1000)
    response = await client.delete(f"/volumes/{volume_id}")
    assert response.status_code == 200
    assert response.json() == {"message": "Volume deleted successfully"}
    assert not folder.exists()  # renamed aside before the answer, removed just after
    volumes = running.agent.paths.volumes

    async def emptied() -> bool:
        return os.listdir(volumes) == []

    await wait_for(emptied, what="the deleted volume's folder to be removed")
    assert (await client.get("/volumes")).json() == {"volumes": []}
    again = await client.delete(f"/volumes/{volume_id}")
    assert again.status_code == 404
    assert error(again) == "Volume not found"


async def test_delete_volume_does_not_follow_links_inside(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    volume_id, folder = await new_volume(client)
    (folder / "link").symlink_to(outside)
    assert (await client.delete(f"/volumes/{volume_id}")).status_code == 200
    assert (outside / "keep.txt").read_text() == "keep"


class _Busy:
    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    @hookimpl
    def lightd_volume_in_use(self, volume_id: str) -> str | None:
        return self.users.get(volume_id)


async def test_delete_refused_while_a_container_uses_the_volume(
    start_agent: StartAgent, config_path: Path
) -> None:
    users: dict[str, str] = {}
    node = await start_agent(config_path, extra_plugins=(("busy", _Busy(users)),))
    async with api_client(node.url) as c:
        volume_id, folder = await new_volume(c)
        users[volume_id] = "srv-7"
        response = await c.delete(f"/volumes/{volume_id}")
        assert response.status_code == 409
        assert response.json() == {
            "error": "Volume is in use by container srv-7",
            "code": "volume_in_use",
        }
        assert folder.is_dir()
        assert len((await c.get("/volumes")).json()["volumes"]) == 1
        users.clear()
        assert (await c.delete(f"/volumes/{volume_id}")).status_code == 200


async def test_leftovers_of_an_interrupted_delete_are_swept(
    start_agent: StartAgent, config_path: Path
) -> None:
    volumes = config_path.parent / "storage" / "volumes"
    trash = volumes / f".trash-{uuid.uuid4()}-abcd"
    (trash / "deep").mkdir(parents=True)
    node = await start_agent(config_path)
    async with api_client(node.url) as c:
        assert (await c.get("/volumes")).json() == {"volumes": []}

    async def swept() -> bool:
        return not trash.exists()

    await wait_for(swept, what="the leftover of a deletion to be removed")
    assert node.agent.paths.volumes == volumes.resolve()


async def test_concurrent_deletes_of_one_volume(client: httpx.AsyncClient) -> None:
    import trio

    volume_id, _ = await new_volume(client)
    statuses: list[int] = []

    async def delete() -> None:
        statuses.append((await client.delete(f"/volumes/{volume_id}")).status_code)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(delete)
    assert sorted(statuses) == [200, 404, 404, 404, 404]


async def test_volume_service_for_other_plugins(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    service = running.agent.stash[VOLUMES]
    volume_id, folder = await new_volume(client)
    assert await service.path(volume_id) == running.agent.paths.volumes / volume_id == folder
    assert await service.path(volume_id.upper()) == folder
    assert await service.path(str(uuid.uuid4())) is None
    assert await service.path("../../etc") is None
    assert await service.path("") is None


@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("delete", ""),
        ("post", "/files"),
        ("post", "/write"),
        ("post", "/folders"),
        ("post", "/create-folder"),
        ("post", "/copy"),
        ("get", "/files"),
        ("post", "/compress"),
        ("post", "/decompress"),
    ],
)
@pytest.mark.parametrize("volume_id", ["not-a-uuid", str(uuid.uuid4()), "..", "%2e%2e"])
async def test_unknown_or_malformed_volume_is_404(
    client: httpx.AsyncClient, method: str, suffix: str, volume_id: str
) -> None:
    kwargs: dict[str, Any] = {} if method in ("get", "delete") else {"json": {}}
    response = await client.request(method, f"/volumes/{volume_id}{suffix}", **kwargs)
    assert response.status_code == 404
    if volume_id != "..":  # "/volumes/.." is normalised away by the client: no such route
        assert error(response) == "Volume not found"


async def test_volume_routes_need_auth(running: RunningAgent, volume: tuple[str, Path]) -> None:
    volume_id, _ = volume
    async with api_client(running.url, token=None) as c:
        assert (await c.get("/volumes")).status_code == 401
        assert (await c.get(f"/volumes/{volume_id}/files")).status_code == 401
        response = await c.post(f"/volumes/{volume_id}/files", json={"path": "a", "content": ""})
        assert response.status_code == 401


# --- write -----------------------------------------------------------------------------------


async def test_write_file(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "config/server.properties", "content": "a=1\n"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "File written successfully",
        "path": "config/server.properties",
    }
    assert (folder / "config" / "server.properties").read_text() == "a=1\n"
    assert stat.S_IMODE((folder / "config" / "server.properties").stat().st_mode) == 0o644


async def test_write_replaces_atomically_and_keeps_mode(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    target = folder / "start.sh"
    target.write_text("old")
    target.chmod(0o750)
    reader = target.open("rb")  # a reader of the old file keeps seeing a whole old file
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "start.sh", "content": "new!"}
    )
    assert response.status_code == 200
    assert reader.read() == b"old"
    reader.close()
    assert target.read_text() == "new!"
    assert stat.S_IMODE(target.stat().st_mode) == 0o750
    assert sorted(os.listdir(folder)) == ["start.sh"]  # no temporary left behind


async def test_write_normalises_the_path(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "./a//b/./c..d.txt", "content": "x"}
    )
    assert response.status_code == 200
    assert response.json()["path"] == "a/b/c..d.txt"
    assert (folder / "a" / "b" / "c..d.txt").read_text() == "x"


async def test_write_base64(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    payload = bytes(range(256)) * 4
    response = await client.post(
        f"/volumes/{volume_id}/files",
        json={
            "path": "bin/blob",
            "content": base64.b64encode(payload).decode(),
            "encoding": "base64",
        },
    )
    assert response.status_code == 200
    assert (folder / "bin" / "blob").read_bytes() == payload


async def test_write_utf8_is_the_default_encoding(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    response = await client.post(
        f"/volumes/{volume_id}/files",
        json={"path": "motd.txt", "content": "héllo ✓", "encoding": "utf-8"},
    )
    assert response.status_code == 200
    assert (folder / "motd.txt").read_bytes() == "héllo ✓".encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"content": "x"}, "path: is required"),
        ({"path": "a.txt"}, "content: is required"),
        ({"path": 5, "content": "x"}, "path: must be a string"),
        ({"path": "a.txt", "content": ["x"]}, "content: must be a string"),
        (
            {"path": "a.txt", "content": "x", "encoding": "latin-1"},
            "encoding: must be utf-8 or base64",
        ),
        ({"path": "a.txt", "content": "%%%", "encoding": "base64"}, "content: invalid base64"),
        ({"path": "", "content": "x"}, "Invalid path: path is empty"),
        ({"path": "   ", "content": "x"}, "Invalid path: path is empty"),
        ({"path": "/etc/passwd", "content": "x"}, "Invalid path: absolute paths are not allowed"),
        (
            {"path": "\\\\server\\share", "content": "x"},
            "Invalid path: absolute paths are not allowed",
        ),
        ({"path": "C:\\x.txt", "content": "x"}, "Invalid path: absolute paths are not allowed"),
        ({"path": "../x.txt", "content": "x"}, "Invalid path: path traversal detected"),
        ({"path": "a/../../x.txt", "content": "x"}, "Invalid path: path traversal detected"),
        ({"path": "a\u0000.txt", "content": "x"}, "Invalid path: path traversal detected"),
        ({"path": "n" * 256, "content": "x"}, "Invalid path: name too long"),
        ({"path": "d/" * 2100, "content": "x"}, "Invalid path: path too long"),
    ],
)
async def test_write_rejects_bad_bodies(
    client: httpx.AsyncClient, volume: tuple[str, Path], body: dict[str, Any], message: str
) -> None:
    volume_id, folder = volume
    response = await client.post(f"/volumes/{volume_id}/files", json=body)
    assert response.status_code == 400
    assert error(response) == message
    assert os.listdir(folder) == []


async def test_write_rejects_non_json(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, _ = volume
    response = await client.post(f"/volumes/{volume_id}/files", content=b"path=a")
    assert response.status_code == 415
    response = await client.post(
        f"/volumes/{volume_id}/files", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert error(response) == "Invalid JSON body"


async def test_write_onto_a_folder_is_409(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "world").mkdir()
    (folder / "world" / "keep").write_text("k")
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "world", "content": "x"}
    )
    assert response.status_code == 409
    assert error(response) == "A folder exists at path: world"
    assert (folder / "world" / "keep").read_text() == "k"


async def test_write_under_a_file_is_409(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "file").write_text("k")
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "file/x.txt", "content": "x"}
    )
    assert response.status_code == 409
    assert error(response) == "File already exists at path: file/x.txt"
    assert (folder / "file").read_text() == "k"


async def test_write_through_an_inside_link_reaches_its_target(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "real").mkdir()
    (folder / "current").symlink_to("real")
    (folder / "real" / "cfg").write_text("old")
    (folder / "cfg-link").symlink_to("real/cfg")
    await client.post(f"/volumes/{volume_id}/files", json={"path": "current/a.txt", "content": "1"})
    await client.post(f"/volumes/{volume_id}/files", json={"path": "cfg-link", "content": "new"})
    assert (folder / "real" / "a.txt").read_text() == "1"
    assert (folder / "real" / "cfg").read_text() == "new"
    assert (folder / "cfg-link").is_symlink()


async def test_write_alias(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    response = await client.post(
        f"/volumes/{volume_id}/write", json={"filename": "logs/latest.log", "content": "hi"}
    )
    assert response.status_code == 200
    assert response.json() == {"message": "File written successfully", "path": "logs/latest.log"}
    assert (folder / "logs" / "latest.log").read_text() == "hi"
    response = await client.post(f"/volumes/{volume_id}/write", json={"filename": "empty"})
    assert response.status_code == 200
    assert (folder / "empty").read_bytes() == b""
    response = await client.post(f"/volumes/{volume_id}/write", json={"content": "x"})
    assert error(response) == "filename: is required"


async def test_a_failed_write_leaves_the_old_file(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"server": {"max_body_bytes": 4096}}))
    async with api_client(node.url) as c:
        volume_id, folder = await new_volume(c)
        (folder / "keep.txt").write_text("old")
        response = await c.post(
            f"/volumes/{volume_id}/files", json={"path": "keep.txt", "content": "x" * 10_000}
        )
        assert response.status_code == 413
        response = await c.post(
            f"/volumes/{volume_id}/files",
            json={"path": "keep.txt", "content": "!!", "encoding": "base64"},
        )
        assert response.status_code == 400
    assert (folder / "keep.txt").read_text() == "old"
    assert os.listdir(folder) == ["keep.txt"]


# --- folders ---------------------------------------------------------------------------------


async def test_create_folder(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    response = await client.post(f"/volumes/{volume_id}/folders", json={"path": "plugins/x/y"})
    assert response.status_code == 200
    assert response.json() == {"message": "Folder created successfully", "path": "plugins/x/y"}
    assert (folder / "plugins" / "x" / "y").is_dir()
    again = await client.post(f"/volumes/{volume_id}/folders", json={"path": "plugins/x/y"})
    assert again.status_code == 200  # mkdir -p


async def test_create_folder_with_a_file_in_the_way_is_409(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "plugins").write_text("I am a file")
    for path in ("plugins", "plugins/x"):
        response = await client.post(f"/volumes/{volume_id}/folders", json={"path": path})
        assert response.status_code == 409
        assert error(response) == f"File already exists at path: {path}"
    assert (folder / "plugins").read_text() == "I am a file"


async def test_create_folder_validates_the_path(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume
    cases = {
        "": "Invalid path: path is empty",
        "/srv": "Invalid path: absolute paths are not allowed",
        "a/../..": "Invalid path: path traversal detected",
    }
    for path, message in cases.items():
        response = await client.post(f"/volumes/{volume_id}/folders", json={"path": path})
        assert (response.status_code, error(response)) == (400, message)
    response = await client.post(f"/volumes/{volume_id}/folders", json={})
    assert error(response) == "path: is required"


@pytest.mark.parametrize(
    ("root", "name", "path"),
    [("/", "plugins", "plugins"), ("world", "region", "world/region"), ("a/b/", "c", "a/b/c")],
)
async def test_create_folder_alias(
    client: httpx.AsyncClient, volume: tuple[str, Path], root: str, name: str, path: str
) -> None:
    volume_id, folder = volume
    response = await client.post(
        f"/volumes/{volume_id}/create-folder", json={"root": root, "name": name}
    )
    assert response.status_code == 200
    assert response.json() == {"message": "Folder created successfully", "path": path}
    assert (folder / path).is_dir()


async def test_create_folder_alias_validates(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume
    response = await client.post(
        f"/volumes/{volume_id}/create-folder", json={"root": "/", "name": "../x"}
    )
    assert (response.status_code, error(response)) == (400, "Invalid path: path traversal detected")
    response = await client.post(f"/volumes/{volume_id}/create-folder", json={"root": "/"})
    assert error(response) == "name: is required"


# --- copy ------------------------------------------------------------------------------------


async def test_copy_file(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    (folder / "a.txt").write_bytes(b"data")
    (folder / "a.txt").chmod(0o600)
    response = await client.post(
        f"/volumes/{volume_id}/copy", json={"source": "a.txt", "destination": "backup/b.txt"}
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Copied successfully",
        "source": "a.txt",
        "destination": "backup/b.txt",
    }
    assert (folder / "backup" / "b.txt").read_bytes() == b"data"
    assert stat.S_IMODE((folder / "backup" / "b.txt").stat().st_mode) == 0o600
    assert (folder / "a.txt").read_bytes() == b"data"


async def test_copy_folder_keeps_links_as_links(
    client: httpx.AsyncClient, volume: tuple[str, Path], tmp_path: Path
) -> None:
    volume_id, folder = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    world = folder / "world"
    (world / "region").mkdir(parents=True)
    (world / "region" / "r.0.0.mca").write_bytes(b"\x00" * 5000)
    (world / "level.dat").write_bytes(b"level")
    (world / "rel-link").symlink_to("level.dat")
    (world / "out-link").symlink_to(outside / "secret")
    (world / "dir-link").symlink_to(outside)
    (world / "empty").mkdir()
    response = await client.post(
        f"/volumes/{volume_id}/copy",
        json={"source": "world", "destination": "world-copy", "is_folder": True},
    )
    assert response.status_code == 200
    copy = folder / "world-copy"
    assert (copy / "region" / "r.0.0.mca").read_bytes() == b"\x00" * 5000
    assert (copy / "level.dat").read_bytes() == b"level"
    assert (copy / "empty").is_dir()
    assert os.readlink(copy / "rel-link") == "level.dat"
    assert os.readlink(copy / "out-link") == str(outside / "secret")
    assert os.readlink(copy / "dir-link") == str(outside)
    assert sorted(os.listdir(outside)) == ["secret"]


async def test_copy_a_link_copies_the_link(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "real").mkdir()
    (folder / "link").symlink_to("real")
    response = await client.post(
        f"/volumes/{volume_id}/copy", json={"source": "link", "destination": "link2"}
    )
    assert response.status_code == 200
    assert os.readlink(folder / "link2") == "real"


async def test_copy_into_itself_terminates(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "a" / "b").mkdir(parents=True)
    (folder / "a" / "f").write_text("f")
    response = await client.post(
        f"/volumes/{volume_id}/copy", json={"source": "a", "destination": "a/b/copy"}
    )
    assert response.status_code == 200
    assert (folder / "a" / "b" / "copy" / "f").read_text() == "f"
    assert not (folder / "a" / "b" / "copy" / "b" / "copy").exists()
    assert [n for n in os.listdir(folder / "a" / "b") if n.startswith(".lightd")] == []


async def test_copy_errors(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    (folder / "a.txt").write_text("a")
    (folder / "b.txt").write_text("b")
    (folder / "dangling").symlink_to("nowhere")
    url = f"/volumes/{volume_id}/copy"
    response = await client.post(url, json={"source": "missing", "destination": "x"})
    assert (response.status_code, error(response)) == (404, "Path not found: missing")
    response = await client.post(url, json={"source": "a.txt", "destination": "b.txt"})
    assert (response.status_code, error(response)) == (409, "File already exists at path: b.txt")
    response = await client.post(url, json={"source": "a.txt", "destination": "dangling"})
    assert (response.status_code, error(response)) == (409, "File already exists at path: dangling")
    response = await client.post(url, json={"source": "a.txt", "destination": "/x"})
    assert (response.status_code, error(response)) == (
        400,
        "Invalid path: absolute paths are not allowed",
    )
    response = await client.post(url, json={"source": "", "destination": "x"})
    assert (response.status_code, error(response)) == (400, "Invalid path: path is empty")
    response = await client.post(url, json={"source": "a.txt"})
    assert error(response) == "destination: is required"
    assert (folder / "b.txt").read_text() == "b"
    assert sorted(os.listdir(folder)) == ["a.txt", "b.txt", "dangling"]


# --- list ------------------------------------------------------------------------------------


async def test_list_files(client: httpx.AsyncClient, volume: tuple[str, Path]) -> None:
    volume_id, folder = volume
    (folder / "b.txt").write_bytes(b"12345")
    (folder / "b.txt").chmod(0o640)
    (folder / "A.txt").write_bytes(b"")
    (folder / "zdir").mkdir()
    (folder / "adir").mkdir()
    (folder / "link").symlink_to("b.txt")
    response = await client.get(f"/volumes/{volume_id}/files")
    assert response.status_code == 200
    files = response.json()["files"]
    assert [(f["name"], f["type"]) for f in files] == [
        ("adir", "directory"),
        ("zdir", "directory"),
        ("A.txt", "file"),
        ("b.txt", "file"),
        ("link", "symlink"),
    ]
    by_name = {f["name"]: f for f in files}
    assert by_name["b.txt"]["size"] == 5
    assert by_name["b.txt"]["mode"] == "640"
    assert by_name["adir"]["size"] == 0
    assert by_name["link"]["size"] == len("b.txt")
    assert abs(by_name["b.txt"]["modified"] - (folder / "b.txt").stat().st_mtime) < 2
    assert list(by_name["b.txt"])[:3] == ["name", "type", "size"]


async def test_list_subfolder_and_errors(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "world" / "region").mkdir(parents=True)
    (folder / "file").write_text("x")
    url = f"/volumes/{volume_id}/files"
    listed = (await client.get(url, params={"path": "world"})).json()["files"]
    assert listed == [
        {
            "name": "region",
            "type": "directory",
            "size": 0,
            "modified": listed[0]["modified"],
            "mode": listed[0]["mode"],
        }
    ]
    assert (await client.get(url, params={"path": ""})).status_code == 200
    response = await client.get(url, params={"path": "nope"})
    assert (response.status_code, error(response)) == (404, "Path not found: nope")
    response = await client.get(url, params={"path": "file"})
    assert (response.status_code, error(response)) == (400, "Not a folder: file")
    response = await client.get(url, params={"path": "../"})
    assert (response.status_code, error(response)) == (400, "Invalid path: path traversal detected")
    response = await client.get(url, params={"path": "/etc"})
    assert response.status_code == 400


async def test_errors_never_show_host_paths(
    running: RunningAgent, client: httpx.AsyncClient, volume: tuple[str, Path], tmp_path: Path
) -> None:
    volume_id, folder = volume
    (folder / "out").symlink_to(tmp_path)
    bodies = [
        ("post", "/files", {"path": "out/x", "content": "x"}),
        ("post", "/folders", {"path": "out/x"}),
        ("post", "/copy", {"source": "out", "destination": "out/x"}),
        ("get", "/files?path=out", None),
        ("get", "/files?path=missing", None),
    ]
    host = str(running.agent.paths.volumes)
    for method, suffix, body in bodies:
        response = await client.request(method, f"/volumes/{volume_id}{suffix}", json=body)
        assert response.status_code >= 400
        text = json.dumps(response.json())
        assert host not in text and str(tmp_path) not in text


async def test_names_that_are_not_utf8_round_trip(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    """A container can create any bytes as a name; they list (as JSON surrogate escapes)
    and can be addressed back, instead of breaking the listing."""
    volume_id, folder = volume
    odd = folder / os.fsdecode(b"caf\xe9")
    odd.write_bytes(b"old")
    response = await client.get(f"/volumes/{volume_id}/files")
    assert response.status_code == 200
    [entry] = response.json()["files"]
    assert entry["name"] == "caf\udce9"
    body = json.dumps({"path": entry["name"], "content": "new"})  # ASCII, "\udce9" escaped
    response = await client.post(
        f"/volumes/{volume_id}/files", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200
    assert odd.read_bytes() == b"new"


async def test_a_write_keeps_the_owner_and_never_sets_setuid(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    target = folder / "server.properties"
    target.write_text("old")
    os.chown(target, 1000, 1000)
    os.chmod(target, 0o4755)
    response = await client.post(
        f"/volumes/{volume_id}/files", json={"path": "server.properties", "content": "new"}
    )
    assert response.status_code == 200
    info = target.stat()
    assert (info.st_uid, info.st_gid) == (1000, 1000)
    assert stat.S_IMODE(info.st_mode) == 0o755
    sub = folder / "home"
    sub.mkdir()
    os.chown(sub, 1001, 1001)
    await client.post(f"/volumes/{volume_id}/files", json={"path": "home/new.txt", "content": "x"})
    assert (sub / "new.txt").stat().st_uid == 1001  # a new file belongs to its folder's owner
