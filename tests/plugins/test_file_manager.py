"""Contract §13, file manager plugin: every route, status and message, against real
folders of a real agent on loopback (usage, download with ranges, streamed upload,
delete, rename, chmod, search, token permissions)."""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from lightd.files import TEMP_PREFIX

from ..conftest import MASTER, VENDOR, RunningAgent, StartAgent, api_client
from .conftest import error, new_volume

Volume = tuple[str, Path]
INVALID = "Invalid path: "


def temp_files(root: Path) -> list[str]:
    return [
        str(Path(d) / n)
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(TEMP_PREFIX)
    ]


# --- GET /volumes/:id --------------------------------------------------------------------------


async def test_volume_detail_counts_usage_without_following_links(
    client: httpx.AsyncClient, volume: Volume, tmp_path: Path
) -> None:
    volume_id, folder = volume
    (folder / "a.txt").write_bytes(b"x" * 1000)
    (folder / "sub").mkdir()
    (folder / "sub" / "b.bin").write_bytes(b"y" * 24)
    big_outside = tmp_path / "big"
    big_outside.mkdir()
    (big_outside / "huge").write_bytes(b"z" * 100_000)
    (folder / "out").symlink_to(big_outside)
    (folder / "sub" / "f").symlink_to(big_outside / "huge")
    response = await client.get(f"/volumes/{volume_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert list(body) == ["volume_id", "path", "created_at", "size_limit", "usage"]
    assert body["volume_id"] == volume_id and body["path"] == str(folder)
    assert body["size_limit"] == 0  # no limit (contract §15: 0 = none)
    assert body["usage"] == {"bytes": 1024, "files": 4}


async def test_volume_detail_unknown_volume(client: httpx.AsyncClient) -> None:
    for volume_id in ("0b7f5e4c-6c2a-4d4e-9a53-2f1b9d3c0e11", "nope"):
        response = await client.get(f"/volumes/{volume_id}")
        assert response.status_code == 404
        assert error(response) == "Volume not found"


# --- GET .../files/content ---------------------------------------------------------------------


async def test_download_whole_file(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    data = os.urandom(3 * 1024 * 1024 + 17)
    (folder / "dir").mkdir()
    (folder / "dir" / "world.bin").write_bytes(data)
    response = await client.get(
        f"/volumes/{volume_id}/files/content", params={"path": "dir/world.bin"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["accept-ranges"] == "bytes"
    assert response.content == data


async def test_download_empty_file(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "empty").write_bytes(b"")
    response = await client.get(f"/volumes/{volume_id}/files/content", params={"path": "empty"})
    assert response.status_code == 200 and response.content == b""
    assert response.headers["content-length"] == "0"


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [
        ("bytes=0-9", 0, 9),
        ("bytes=10-", 10, 99),
        ("bytes=-5", 95, 99),
        ("bytes=90-500", 90, 99),
        ("bytes=-500", 0, 99),
        ("bytes=42-42", 42, 42),
    ],
)
async def test_download_range(
    client: httpx.AsyncClient, volume: Volume, header: str, start: int, end: int
) -> None:
    volume_id, folder = volume
    data = bytes(range(100))
    (folder / "f").write_bytes(data)
    response = await client.get(
        f"/volumes/{volume_id}/files/content", params={"path": "f"}, headers={"Range": header}
    )
    assert response.status_code == 206, response.text
    assert response.content == data[start : end + 1]
    assert response.headers["content-range"] == f"bytes {start}-{end}/100"
    assert response.headers["content-length"] == str(end - start + 1)


@pytest.mark.parametrize(
    "header", ["bytes=100-", "bytes=50-10", "bytes=-0", "bytes=x-y", "bytes=-", "bytes=1-2-3"]
)
async def test_download_bad_range_is_416(
    client: httpx.AsyncClient, volume: Volume, header: str
) -> None:
    volume_id, folder = volume
    (folder / "f").write_bytes(bytes(100))
    response = await client.get(
        f"/volumes/{volume_id}/files/content", params={"path": "f"}, headers={"Range": header}
    )
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */100"
    assert error(response) == "Range not satisfiable"


@pytest.mark.parametrize("header", ["items=0-5", "bytes=0-1,5-6"])
async def test_download_range_ignored_answers_whole(
    client: httpx.AsyncClient, volume: Volume, header: str
) -> None:
    volume_id, folder = volume
    (folder / "f").write_bytes(b"0123456789")
    response = await client.get(
        f"/volumes/{volume_id}/files/content", params={"path": "f"}, headers={"Range": header}
    )
    assert response.status_code == 200 and response.content == b"0123456789"


async def test_download_errors(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "dir").mkdir()
    os.mkfifo(folder / "pipe")
    url = f"/volumes/{volume_id}/files/content"
    cases = [
        ("dir", 400, "Not a file: dir"),
        ("pipe", 400, "Not a file: pipe"),
        ("missing.txt", 404, "Path not found: missing.txt"),
        ("dir/missing", 404, "Path not found: dir/missing"),
        ("", 400, "Invalid path: path is empty"),
        ("/etc/passwd", 400, "Invalid path: absolute paths are not allowed"),
        ("../x", 400, "Invalid path: path traversal detected"),
    ]
    for path, status, message in cases:
        response = await client.get(url, params={"path": path})
        assert response.status_code == status, (path, response.text)
        assert error(response) == message
    response = await client.get(url)
    assert error(response) == "Invalid path: path is empty"
    response = await client.get(
        "/volumes/0b7f5e4c-6c2a-4d4e-9a53-2f1b9d3c0e11/files/content", params={"path": "a"}
    )
    assert response.status_code == 404 and error(response) == "Volume not found"


async def test_slow_download_is_not_cut_by_the_response_timeout(
    running: RunningAgent, client: httpx.AsyncClient, volume: Volume
) -> None:
    """Quart cuts an answer still sending after ``RESPONSE_TIMEOUT`` (60 s): a download
    to a slow client must not be (here the timeout is made 0.5 s)."""
    assert running.agent.app is not None
    running.agent.app.config["RESPONSE_TIMEOUT"] = 0.5
    volume_id, folder = volume
    data = os.urandom(32 << 20)
    (folder / "big").write_bytes(data)
    received = bytearray()
    async with client.stream(
        "GET", f"/volumes/{volume_id}/files/content", params={"path": "big"}
    ) as response:
        started = time.monotonic()
        async for chunk in response.aiter_raw(1 << 20):
            received += chunk
            await trio.sleep(0.05)  # a slow reader: the whole file takes over a second
    assert time.monotonic() - started > 1
    assert bytes(received) == data


async def test_download_follows_in_volume_links(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "real.txt").write_bytes(b"real")
    (folder / "alias").symlink_to("real.txt")
    response = await client.get(f"/volumes/{volume_id}/files/content", params={"path": "alias"})
    assert response.status_code == 200 and response.content == b"real"


# --- PUT .../files/content ---------------------------------------------------------------------


async def test_upload_creates_parents_and_replaces_atomically(
    client: httpx.AsyncClient, volume: Volume
) -> None:
    volume_id, folder = volume
    url = f"/volumes/{volume_id}/files/content"
    data = os.urandom(5 * 1024 * 1024 + 3)  # over server.max_body_bytes (8 MiB)? no: 5 MiB
    response = await client.put(url, params={"path": "mods/pack.zip"}, content=data)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "message": "File uploaded successfully",
        "path": "mods/pack.zip",
        "size": len(data),
    }
    assert (folder / "mods" / "pack.zip").read_bytes() == data
    os.chmod(folder / "mods" / "pack.zip", 0o640)
    response = await client.put(url, params={"path": "mods/pack.zip"}, content=b"v2")
    assert response.status_code == 200
    assert (folder / "mods" / "pack.zip").read_bytes() == b"v2"
    assert stat.S_IMODE((folder / "mods" / "pack.zip").stat().st_mode) == 0o640
    assert temp_files(folder) == []


async def test_upload_larger_than_max_body_bytes(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"server": {"max_body_bytes": 1024}}))
    data = os.urandom(20 * 1024 * 1024)
    async with api_client(node.url) as c:
        volume_id, folder = await new_volume(c)
        response = await c.put(
            f"/volumes/{volume_id}/files/content", params={"path": "big"}, content=data
        )
        assert response.status_code == 200, response.text
        assert (folder / "big").read_bytes() == data
        # an ordinary JSON route still has the small limit
        response = await c.post(
            f"/volumes/{volume_id}/files", json={"path": "x", "content": "x" * 4096}
        )
        assert response.status_code == 413


async def test_upload_chunked_body(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume

    async def parts() -> object:
        for i in range(10):
            yield bytes([i]) * 100_000

    response = await client.put(
        f"/volumes/{volume_id}/files/content",
        params={"path": "chunked"},
        content=parts(),  # type: ignore[arg-type]
    )
    assert response.status_code == 200, response.text
    assert (folder / "chunked").read_bytes() == b"".join(bytes([i]) * 100_000 for i in range(10))


async def test_upload_too_large(start_agent: StartAgent, make_config: Callable[..., Path]) -> None:
    node = await start_agent(make_config({"files": {"max_upload_bytes": 1000}}))
    async with api_client(node.url) as c:
        volume_id, folder = await new_volume(c)
        (folder / "keep").write_bytes(b"old")
        url = f"/volumes/{volume_id}/files/content"
        response = await c.put(url, params={"path": "keep"}, content=b"x" * 1001)
        assert response.status_code == 413
        assert error(response) == "Upload too large"

        async def parts() -> object:  # no Content-Length: refused once over the limit
            for _ in range(5):
                yield b"y" * 400

        response = await c.put(url, params={"path": "keep"}, content=parts())  # type: ignore[arg-type]
        assert response.status_code == 413
        assert error(response) == "Upload too large"
        response = await c.put(url, params={"path": "keep"}, content=b"z" * 1000)
        assert response.status_code == 200
        assert (folder / "keep").read_bytes() == b"z" * 1000
        response = await c.put(url, params={"path": "fresh"}, content=b"z" * 2000)
        assert response.status_code == 413
    assert sorted(p.name for p in folder.iterdir()) == ["keep"]


async def test_upload_errors(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "dir").mkdir()
    (folder / "file").write_bytes(b"f")
    url = f"/volumes/{volume_id}/files/content"
    cases = [
        ("dir", 409, "A folder exists at path: dir"),
        ("file/child", 409, "File already exists at path: file/child"),
        ("", 400, "Invalid path: path is empty"),
        ("../x", 400, "Invalid path: path traversal detected"),
    ]
    for path, status, message in cases:
        response = await client.put(url, params={"path": path}, content=b"data")
        assert response.status_code == status, (path, response.text)
        assert error(response) == message
    assert temp_files(folder) == []
    assert sorted(p.name for p in folder.iterdir()) == ["dir", "file"]


async def test_upload_cut_mid_body_leaves_nothing(
    running: RunningAgent, client: httpx.AsyncClient, volume: Volume
) -> None:
    """A client that announces 50 MiB, sends 3 MiB and closes: the old file stays, no
    temporary file is left, and the agent still answers."""
    volume_id, folder = volume
    (folder / "world.dat").write_bytes(b"old")
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"PUT /volumes/{volume_id}/files/content?path=world.dat HTTP/1.1\r\n"
        f"Host: {host}\r\nAccept: {VENDOR}\r\nAuthorization: Bearer {MASTER}\r\n"
        f"Content-Length: {50 * 1024 * 1024}\r\n\r\n"
    ).encode()
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    await sock.send(head)
    chunk = b"n" * 65536
    for _ in range(48):
        await sock.send(chunk)
    # the temporary file exists while the body streams in
    deadline = time.monotonic() + 10
    while not temp_files(folder):
        assert time.monotonic() < deadline, "no temporary file appeared"
        await trio.sleep(0.01)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    deadline = time.monotonic() + 10
    while temp_files(folder):
        assert time.monotonic() < deadline, temp_files(folder)
        await trio.sleep(0.01)
    assert (folder / "world.dat").read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == ["world.dat"]
    response = await client.get(f"/volumes/{volume_id}/files/content", params={"path": "world.dat"})
    assert response.content == b"old"


async def test_upload_chunked_body_cut_leaves_nothing(
    running: RunningAgent, client: httpx.AsyncClient, volume: Volume
) -> None:
    """A chunked body (no length to check against) cut after 3 MiB: the agent sees the
    client go before the end of the body, so the old file stays and no temporary file is
    left."""
    volume_id, folder = volume
    (folder / "world.dat").write_bytes(b"old")
    host, port = running.url.removeprefix("http://").rsplit(":", 1)
    head = (
        f"PUT /volumes/{volume_id}/files/content?path=world.dat HTTP/1.1\r\n"
        f"Host: {host}\r\nAccept: {VENDOR}\r\nAuthorization: Bearer {MASTER}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    sock = trio.socket.socket()
    await sock.connect((host, int(port)))
    await sock.send(head)
    chunk = b"10000\r\n" + b"n" * 65536 + b"\r\n"
    for _ in range(48):
        await sock.send(chunk)
    deadline = time.monotonic() + 10
    while not temp_files(folder):
        assert time.monotonic() < deadline, "no temporary file appeared"
        await trio.sleep(0.01)
    sock.close()  # an orderly close, not the body's last chunk
    deadline = time.monotonic() + 10
    while temp_files(folder):
        assert time.monotonic() < deadline, temp_files(folder)
        await trio.sleep(0.01)
    assert (folder / "world.dat").read_bytes() == b"old"
    assert sorted(p.name for p in folder.iterdir()) == ["world.dat"]


async def test_download_of_a_file_not_in_the_page_cache(
    client: httpx.AsyncClient, volume: Volume
) -> None:
    """Bytes the page cache does not hold are read in a worker thread (the event loop
    reads only cached ones): a file dropped from the cache, whole and in a range, still
    comes back exact."""
    volume_id, folder = volume
    data = os.urandom(3 << 20) + b"tail"
    path = folder / "cold.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    url = f"/volumes/{volume_id}/files/content"
    response = await client.get(url, params={"path": "cold.bin"})
    assert response.status_code == 200
    assert response.content == data
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    response = await client.get(
        url, params={"path": "cold.bin"}, headers={"Range": f"bytes={(1 << 20) + 5}-"}
    )
    assert response.status_code == 206
    assert response.content == data[(1 << 20) + 5 :]


async def test_upload_refused_before_reading_still_answers(
    client: httpx.AsyncClient,
) -> None:
    """An unknown volume with a body bigger than the gate's window: 404 at once."""
    response = await client.put(
        "/volumes/0b7f5e4c-6c2a-4d4e-9a53-2f1b9d3c0e11/files/content",
        params={"path": "a"},
        content=b"x" * (6 * 1024 * 1024),
    )
    assert response.status_code == 404 and error(response) == "Volume not found"
    assert (await client.get("/volumes")).status_code == 200


# --- delete ------------------------------------------------------------------------------------


async def test_delete(client: httpx.AsyncClient, volume: Volume, tmp_path: Path) -> None:
    volume_id, folder = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"k")
    (folder / "world" / "region").mkdir(parents=True)
    (folder / "world" / "region" / "r.0.0.mca").write_bytes(b"r")
    (folder / "crash.log").write_bytes(b"c")
    (folder / "link").symlink_to(outside)
    url = f"/volumes/{volume_id}/files/delete"
    response = await client.post(url, json={"paths": ["world", "crash.log", "link"]})
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Deleted 3 paths", "deleted_count": 3}
    assert list(folder.iterdir()) == []
    assert (outside / "keep").read_bytes() == b"k"


async def test_delete_checks_every_path_first(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "a").write_bytes(b"a")
    url = f"/volumes/{volume_id}/files/delete"
    response = await client.post(url, json={"paths": ["a", "missing"]})
    assert response.status_code == 404
    assert error(response) == "Path not found: missing"
    assert (folder / "a").exists()
    for paths, message in [
        (["a", "."], "Invalid path: cannot delete the volume root"),
        (["a", ""], "Invalid path: path is empty"),
        (["../a"], "Invalid path: path traversal detected"),
    ]:
        response = await client.post(url, json={"paths": paths})
        assert response.status_code == 400
        assert error(response) == message
    assert (folder / "a").exists()
    for body in ({"paths": []}, {}, {"paths": "a"}, {"paths": [1]}):
        response = await client.post(url, json=body)
        assert response.status_code == 400, body
        assert error(response).startswith("paths: "), error(response)


async def test_delete_nested_and_repeated(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "d" / "e").mkdir(parents=True)
    response = await client.post(
        f"/volumes/{volume_id}/files/delete", json={"paths": ["d", "d/e", "d"]}
    )
    assert response.status_code == 200
    assert response.json()["deleted_count"] == 3
    assert not (folder / "d").exists()


# --- rename ------------------------------------------------------------------------------------


async def test_rename_single(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "world").mkdir()
    (folder / "world" / "level.dat").write_bytes(b"L")
    url = f"/volumes/{volume_id}/files/rename"
    response = await client.post(url, json={"from": "world", "to": "backups/world-old"})
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Renamed 1 paths", "renamed_count": 1}
    assert (folder / "backups" / "world-old" / "level.dat").read_bytes() == b"L"
    assert not (folder / "world").exists()


async def test_rename_moves_links_as_links(
    client: httpx.AsyncClient, volume: Volume, tmp_path: Path
) -> None:
    volume_id, folder = volume
    (folder / "l").symlink_to(tmp_path)
    response = await client.post(
        f"/volumes/{volume_id}/files/rename", json={"from": "l", "to": "m"}
    )
    assert response.status_code == 200
    assert os.readlink(folder / "m") == str(tmp_path)


async def test_rename_batch_is_checked_whole(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    for name in ("a", "b", "c"):
        (folder / name).write_bytes(name.encode())
    url = f"/volumes/{volume_id}/files/rename"
    bad = [
        ([{"from": "a", "to": "x"}, {"from": "zz", "to": "y"}], 404, "Path not found: zz"),
        (
            [{"from": "a", "to": "x"}, {"from": "b", "to": "c"}],
            409,
            "File already exists at path: c",
        ),
        (
            [{"from": "a", "to": "x"}, {"from": "b", "to": "x"}],
            409,
            "File already exists at path: x",
        ),
        ([{"from": "a", "to": "x"}, {"from": "a", "to": "y"}], 404, "Path not found: a"),
    ]
    for renames, status, message in bad:
        response = await client.post(url, json={"renames": renames})
        assert response.status_code == status, (renames, response.text)
        assert error(response) == message
        assert sorted(p.name for p in folder.iterdir()) == ["a", "b", "c"]
    # a chain and a swap through a free name, checked as if done in order
    renames = [
        {"from": "a", "to": "tmp"},
        {"from": "b", "to": "a"},
        {"from": "tmp", "to": "b"},
        {"from": "c", "to": "d/c"},
    ]
    response = await client.post(url, json={"renames": renames})
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Renamed 4 paths", "renamed_count": 4}
    assert (folder / "a").read_bytes() == b"b" and (folder / "b").read_bytes() == b"a"
    assert (folder / "d" / "c").read_bytes() == b"c"


async def test_rename_errors(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "dir" / "sub").mkdir(parents=True)
    (folder / "f").write_bytes(b"f")
    url = f"/volumes/{volume_id}/files/rename"
    cases = [
        ({"from": "nope", "to": "x"}, 404, "Path not found: nope"),
        ({"from": "f", "to": "dir"}, 409, "File already exists at path: dir"),
        ({"from": "dir", "to": "f"}, 409, "File already exists at path: f"),
        ({"from": "dir", "to": "dir/sub/in"}, 400, f"{INVALID}cannot move a folder into itself"),
        ({"from": "f", "to": "../f"}, 400, "Invalid path: path traversal detected"),
        ({"from": "f"}, 400, "to: is required"),
        ({"to": "f"}, 400, "from: is required"),
        ({"from": 1, "to": "f"}, 400, "from: must be a string"),
        ({"renames": []}, 400, "renames: must be a non-empty list"),
        ({"renames": [{"from": "f"}]}, 400, "renames[0].to: is required"),
        ({"renames": ["f"]}, 400, "renames[0]: must be an object"),
    ]  # fmt: skip
    for body, status, message in cases:
        response = await client.post(url, json=body)
        assert response.status_code == status, (body, response.text)
        assert error(response) == message
    assert (folder / "f").exists() and (folder / "dir" / "sub").is_dir()


# --- chmod -------------------------------------------------------------------------------------


async def test_chmod(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "start.sh").write_bytes(b"#!/bin/sh\n")
    (folder / "dir").mkdir()
    response = await client.post(
        f"/volumes/{volume_id}/files/chmod",
        json={"files": [{"path": "start.sh", "mode": "755"}, {"path": "dir", "mode": "0700"}]},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Changed 2 modes", "changed_count": 2}
    assert stat.S_IMODE((folder / "start.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "dir").stat().st_mode) == 0o700
    response = await client.post(
        f"/volumes/{volume_id}/files/chmod", json={"files": [{"path": "start.sh", "mode": "0"}]}
    )
    assert response.status_code == 200
    assert stat.S_IMODE((folder / "start.sh").stat().st_mode) == 0


@pytest.mark.parametrize("mode", ["4755", "1777", "2755", "888", "rwx", "", "-1", "07777", "0o644"])
async def test_chmod_invalid_mode(client: httpx.AsyncClient, volume: Volume, mode: str) -> None:
    volume_id, folder = volume
    (folder / "f").write_bytes(b"f")
    before = (folder / "f").stat().st_mode
    response = await client.post(
        f"/volumes/{volume_id}/files/chmod",
        json={"files": [{"path": "f", "mode": "644"}, {"path": "f", "mode": mode}]},
    )
    assert response.status_code == 400
    assert error(response) == f"Invalid mode: {mode}"
    assert (folder / "f").stat().st_mode == before


async def test_chmod_refuses_links_and_checks_first(
    client: httpx.AsyncClient, volume: Volume, tmp_path: Path
) -> None:
    volume_id, folder = volume
    (folder / "f").write_bytes(b"f")
    os.chmod(folder / "f", 0o644)
    (folder / "inside").symlink_to("f")
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    os.chmod(victim, 0o600)
    (folder / "outside").symlink_to(victim)
    url = f"/volumes/{volume_id}/files/chmod"
    for path in ("inside", "outside"):
        response = await client.post(
            url, json={"files": [{"path": "f", "mode": "777"}, {"path": path, "mode": "777"}]}
        )
        assert response.status_code == 400
        assert error(response) == f"Not a file: {path}"
    response = await client.post(
        url, json={"files": [{"path": "f", "mode": "777"}, {"path": "no", "mode": "777"}]}
    )
    assert response.status_code == 404 and error(response) == "Path not found: no"
    assert stat.S_IMODE((folder / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    response = await client.post(url, json={"files": []})
    assert response.status_code == 400 and error(response) == "files: must not be empty"


# --- search ------------------------------------------------------------------------------------


@pytest.fixture
async def searchable(volume: Volume, tmp_path: Path) -> Volume:
    _, folder = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "Secret-Config.yml").write_bytes(b"motd=secret\n")
    (folder / "config").mkdir()
    (folder / "config" / "server.properties").write_bytes(b"a=1\nmotd=Hello World\nb=2\n")
    (folder / "config" / "CONFIG.yml").write_bytes(b"x: y\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "latest.log").write_bytes(b"line\n" * 10 + b"MOTD changed\n")
    (folder / "logs" / "big.log").write_bytes(b"motd\n" + b"x" * (1 << 20))
    (folder / "logs" / "binary.dat").write_bytes(b"\0motd")
    (folder / "config-link").symlink_to(outside)
    (folder / "deep").symlink_to("config")
    return volume


async def test_search_by_name(
    client: httpx.AsyncClient, searchable: Volume, tmp_path: Path
) -> None:
    volume_id, _ = searchable
    response = await client.get(f"/volumes/{volume_id}/files/search", params={"q": "config"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is False
    assert body["results"] == [
        {"path": "config", "type": "directory", "size": 0},
        {"path": "config/CONFIG.yml", "type": "file", "size": 5},
        {"path": "config-link", "type": "symlink", "size": len(str(tmp_path / "outside"))},
    ]
    assert "Secret" not in response.text


async def test_search_by_content(client: httpx.AsyncClient, searchable: Volume) -> None:
    volume_id, _ = searchable
    response = await client.get(
        f"/volumes/{volume_id}/files/search", params={"q": "motd", "content": "true"}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert results == [
        {"path": "config/server.properties", "type": "file", "size": 25, "line": 2},
        {"path": "logs/latest.log", "type": "file", "size": 63, "line": 11},
    ]
    assert "secret" not in response.text


async def test_search_path_limit_and_errors(client: httpx.AsyncClient, searchable: Volume) -> None:
    volume_id, folder = searchable
    url = f"/volumes/{volume_id}/files/search"
    response = await client.get(url, params={"q": "o", "path": "logs"})
    assert [r["path"] for r in response.json()["results"]] == ["logs/big.log", "logs/latest.log"]
    response = await client.get(url, params={"q": "o", "path": "deep"})  # in-volume link
    assert [r["path"] for r in response.json()["results"]] == [
        "deep/CONFIG.yml",
        "deep/server.properties",
    ]
    for i in range(30):
        (folder / f"many{i:02}").write_bytes(b"")
    response = await client.get(url, params={"q": "many", "limit": "10"})
    body = response.json()
    assert len(body["results"]) == 10 and body["truncated"] is True
    response = await client.get(url, params={"q": "many", "limit": "30"})
    assert response.json()["truncated"] is False
    response = await client.get(url, params={"q": "many"})
    assert len(response.json()["results"]) == 30
    for i in range(1100):
        (folder / f"lots{i}").write_bytes(b"")
    response = await client.get(url, params={"q": "lots", "limit": "5000"})
    assert len(response.json()["results"]) == 1000 and response.json()["truncated"]
    response = await client.get(url, params={"q": "lots"})
    assert len(response.json()["results"]) == 100 and response.json()["truncated"]
    cases = [
        ({}, 400, "q: is required"),
        ({"q": "a", "limit": "x"}, 400, "limit: must be an integer"),
        ({"q": "a", "limit": "0"}, 400, "limit: must be at least 1"),
        ({"q": "a", "content": "maybe"}, 400, "content: must be true or false"),
        ({"q": "a", "path": "missing"}, 404, "Path not found: missing"),
        ({"q": "a", "path": "logs/latest.log"}, 400, "Not a folder: logs/latest.log"),
        ({"q": "a", "path": "config-link"}, 400, "Invalid path: path escapes volume"),
        ({"q": "a", "path": "../"}, 400, "Invalid path: path traversal detected"),
    ]
    for params, status, message in cases:
        response = await client.get(url, params=params)
        assert response.status_code == status, (params, response.text)
        assert error(response) == message


# --- permissions -------------------------------------------------------------------------------


async def test_permissions(running: RunningAgent, client: httpx.AsyncClient) -> None:
    volume_id, folder = await new_volume(client)
    other_id, _ = await new_volume(client)
    (folder / "f").write_bytes(b"f")

    async def token(**body: object) -> str:
        response = await client.post("/auth/tokens", json={"ttl": 600, **body})
        assert response.status_code in (200, 201), response.text
        return str(response.json()["token"])

    reader = await token(permissions=["read"], volumes=[volume_id])
    files = await token(permissions=["files"], volumes=[volume_id])
    async with api_client(running.url, reader) as c:
        assert (await c.get(f"/volumes/{volume_id}")).status_code == 200
        response = await c.get(f"/volumes/{volume_id}/files/content", params={"path": "f"})
        assert response.status_code == 403
        response = await c.put(
            f"/volumes/{volume_id}/files/content", params={"path": "g"}, content=b"g"
        )
        assert response.status_code == 403
        assert (await c.get(f"/volumes/{other_id}")).status_code == 401
    async with api_client(running.url, files) as c:
        response = await c.get(f"/volumes/{volume_id}/files/content", params={"path": "f"})
        assert response.status_code == 200
        response = await c.put(
            f"/volumes/{volume_id}/files/content", params={"path": "g"}, content=b"g"
        )
        assert response.status_code == 200
        for route, body in [
            ("delete", {"paths": ["g"]}),
            ("rename", {"from": "f", "to": "h"}),
            ("chmod", {"files": [{"path": "h", "mode": "600"}]}),
        ]:
            response = await c.post(f"/volumes/{volume_id}/files/{route}", json=body)
            assert response.status_code == 200, (route, response.text)
        response = await c.get(f"/volumes/{volume_id}/files/search", params={"q": "h"})
        assert response.status_code == 200
        response = await c.put(
            f"/volumes/{other_id}/files/content", params={"path": "g"}, content=b"g"
        )
        assert response.status_code == 401
