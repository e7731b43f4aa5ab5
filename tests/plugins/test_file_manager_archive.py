"""Contract §13 ``GET /volumes/:id/files/archive``: a folder streamed as a zip or tar.gz
built on the fly, against a real agent: the entries (nested folders, an empty folder,
unicode names, links stored as links and never followed, a FIFO left out), the archives
checked by ``zipfile``/``tarfile`` and by ``unzip -t``/``tar tzf``, the errors, the
bad-input corpus of planted links, a link swapped mid-walk, and a cut client whose walk
stops (the agent's descriptors back to what they were)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from ..conftest import RunningAgent, api_client, wait_for
from .conftest import error
from .test_volumes_corpus import (
    ABSOLUTE,
    ESCAPES,
    LOOP,
    TRAVERSAL,
    World,
    matches,
    resolver,
    snapshot,
    world,
)
from .test_volumes_race import make_outside, swapping
from .volumes_corpus import SECRET

__all__ = ["resolver", "world"]

Volume = tuple[str, Path]
UNICODE = "ünïcødé ☃ файл.txt"


def build_tree(folder: Path, outside: Path) -> dict[str, bytes]:
    """``world/`` with nested folders, an empty one, unicode names, links in and out, a
    FIFO; returns the regular files' contents by archive name."""
    world = folder / "world"
    (world / "region" / "deep").mkdir(parents=True)
    (world / "empty").mkdir()
    files = {
        "world/level.dat": b"level" * 1000,
        "world/region/r.0.0.mca": os.urandom(3 * 1024 * 1024 + 5),  # several pieces
        "world/region/deep/notes.txt": b"deep\n",
        f"world/{UNICODE}": "ünïcødé".encode(),
        "world/zero.bin": b"",
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (world / "link_in").symlink_to("level.dat")
    (world / "link_out").symlink_to(outside / "secret.txt")
    (world / "dir_out").symlink_to(outside)
    os.mkfifo(world / "fifo")
    return files


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return make_outside(tmp_path)


async def get_archive(client: httpx.AsyncClient, volume_id: str, **params: str) -> httpx.Response:
    return await client.get(f"/volumes/{volume_id}/files/archive", params=params)


def zip_members(data: bytes) -> dict[str, tuple[str, bytes]]:
    """name → (kind, content or link target) of a zip, after ``testzip``."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        result = {}
        for info in zf.infolist():
            mode = info.external_attr >> 16
            kind = "link" if stat.S_ISLNK(mode) else "dir" if info.is_dir() else "file"
            result[info.filename.rstrip("/")] = (kind, zf.read(info))
        return result


def tar_members(data: bytes) -> dict[str, tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tf:
        result = {}
        for info in tf.getmembers():
            if info.issym():
                result[info.name] = ("link", info.linkname.encode())
            elif info.isdir():
                result[info.name] = ("dir", b"")
            else:
                assert info.isfile(), info
                fh = tf.extractfile(info)
                assert fh is not None
                result[info.name] = ("file", fh.read())
        return result


def members(fmt: str, data: bytes) -> dict[str, tuple[str, bytes]]:
    return zip_members(data) if fmt == "zip" else tar_members(data)


def external_check(fmt: str, data: bytes, tmp_path: Path) -> list[str]:
    """``unzip -t`` / ``tar tzf`` on the archive: the names they list."""
    path = tmp_path / f"download.{fmt}"
    path.write_bytes(data)
    if fmt == "zip":
        done = subprocess.run(["unzip", "-t", str(path)], capture_output=True, check=False)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        assert b"No errors detected" in done.stdout
        listed = subprocess.run(["unzip", "-Z1", str(path)], capture_output=True, check=True)
        return listed.stdout.decode().splitlines()
    done = subprocess.run(["tar", "tzf", str(path)], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
async def test_archive_of_a_folder(
    client: httpx.AsyncClient, volume: Volume, outside: Path, tmp_path: Path, fmt: str
) -> None:
    volume_id, folder = volume
    files = build_tree(folder, outside)
    response = await get_archive(client, volume_id, path="world", format=fmt)
    assert response.status_code == 200, response.text
    media = {"zip": "application/zip", "tar.gz": "application/gzip"}[fmt]
    assert response.headers["content-type"] == media
    assert response.headers["content-disposition"] == (
        f"attachment; filename=\"world.{fmt}\"; filename*=UTF-8''world.{fmt}"
    )
    assert response.headers["cache-control"] == "no-store"
    assert "content-length" not in response.headers  # built on the fly: chunked
    got = members(fmt, response.content)
    expected: dict[str, tuple[str, bytes]] = {name: ("file", data) for name, data in files.items()}
    expected |= {
        "world": ("dir", b""),
        "world/region": ("dir", b""),
        "world/region/deep": ("dir", b""),
        "world/empty": ("dir", b""),
        "world/link_in": ("link", b"level.dat"),
        "world/link_out": ("link", str(outside / "secret.txt").encode()),
        "world/dir_out": ("link", str(outside).encode()),
    }
    assert got == expected  # the FIFO left out, links stored as links
    assert SECRET not in b"".join(content for _, content in got.values())
    listed = external_check(fmt, response.content, tmp_path)
    assert {name.rstrip("/") for name in listed} == set(expected)
    assert snapshot(folder / "world")  # the tree is still there, untouched by the walk


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
async def test_archive_of_the_volume_root_and_of_an_empty_folder(
    client: httpx.AsyncClient, volume: Volume, tmp_path: Path, fmt: str
) -> None:
    volume_id, folder = volume
    (folder / "a.txt").write_bytes(b"a")
    (folder / "nothing").mkdir()
    (folder / ".lightd-tmp-0123456789abcdef").write_bytes(b"upload in progress")
    response = await get_archive(client, volume_id, format=fmt)
    assert response.status_code == 200, response.text
    name = f"volume-{volume_id[:8]}.{fmt}"
    assert f'filename="{name}"' in response.headers["content-disposition"]
    assert members(fmt, response.content) == {
        "a.txt": ("file", b"a"),
        "nothing": ("dir", b""),
    }  # no top folder; the agent's temporary file left out
    external_check(fmt, response.content, tmp_path)
    response = await get_archive(client, volume_id, path="nothing", format=fmt)
    assert response.status_code == 200
    assert members(fmt, response.content) == {"nothing": ("dir", b"")}
    external_check(fmt, response.content, tmp_path)


async def test_archive_default_format_is_zip_and_unicode_names(
    client: httpx.AsyncClient, volume: Volume
) -> None:
    volume_id, folder = volume
    (folder / "Мир ☃").mkdir()
    (folder / "Мир ☃" / "x").write_bytes(b"x")
    response = await get_archive(client, volume_id, path="Мир ☃")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    disposition = response.headers["content-disposition"]
    assert disposition.isascii()
    assert "filename*=UTF-8''%D0%9C%D0%B8%D1%80%20%E2%98%83.zip" in disposition
    assert members("zip", response.content)["Мир ☃/x"] == ("file", b"x")


async def test_archive_errors(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, folder = volume
    (folder / "f.txt").write_bytes(b"f")
    (folder / "d").mkdir()
    os.mkfifo(folder / "pipe")
    cases = [
        ({"path": "f.txt"}, 400, "Not a folder: f.txt"),
        ({"path": "pipe"}, 400, "Not a folder: pipe"),
        ({"path": "nope"}, 404, "Path not found: nope"),
        ({"path": "d/deeper/nope"}, 404, "Path not found: d/deeper/nope"),
        ({"path": "d", "format": "rar"}, 400, "Unsupported format: rar"),
        ({"path": "d", "format": "tar"}, 400, "Unsupported format: tar"),
        ({"path": "d", "format": ""}, 400, "Unsupported format: "),
        ({"path": "../x"}, 400, TRAVERSAL),
        ({"path": "/etc"}, 400, ABSOLUTE),
    ]
    for params, status, message in cases:
        response = await get_archive(client, volume_id, **params)
        assert response.status_code == status, (params, response.text)
        assert error(response) == message
    for volume_id in ("0b7f5e4c-6c2a-4d4e-9a53-2f1b9d3c0e11", "nope"):
        response = await get_archive(client, volume_id, path="d")
        assert response.status_code == 404
        assert error(response) == "Volume not found"


# --- the planted-link corpus -----------------------------------------------------------------

CORPUS = [
    ("out_abs", ESCAPES),
    ("out_rel", ESCAPES),
    ("out_rel/sub", ESCAPES),
    ("secret_link", ESCAPES),
    ("chain1", ESCAPES),
    ("etc", ESCAPES),
    ("sib_abs", ESCAPES),
    ("sib_rel", ESCAPES),
    ("data/out", ESCAPES),
    ("sub/upup", ESCAPES),
    ("loop_a", LOOP),
    ("/etc", ABSOLUTE),
    ("../outside", TRAVERSAL),
    ("data/../../outside", TRAVERSAL),
    ("data\x00", TRAVERSAL),
    ("", None),
    ("data", None),
    ("sub/up", None),  # an in-volume link to a folder: followed, beneath the root
]


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize(("path", "refusal"), CORPUS, ids=[repr(c[0]) for c in CORPUS])
async def test_archive_bad_input(world: World, path: str, refusal: str | None, fmt: str) -> None:
    before = snapshot(world.volume), snapshot(world.outside), snapshot(world.sibling)
    async with api_client(world.url) as c:
        response = await get_archive(c, world.volume_id, path=path, format=fmt)
    after = snapshot(world.volume), snapshot(world.outside), snapshot(world.sibling)
    assert after == before
    if refusal is not None:
        assert response.status_code == 400, response.text
        assert matches(error(response), refusal), response.text
        assert str(world.outside) not in response.text
        return
    assert response.status_code == 200, response.text
    got = members(fmt, response.content)
    for kind, content in got.values():
        assert SECRET not in content
        assert b"sibling" not in content or kind == "link"


# --- a link swapped in mid-walk ----------------------------------------------------------------


async def test_archive_while_a_folder_is_swapped_for_a_link(
    client: httpx.AsyncClient, volume: Volume, outside: Path
) -> None:
    """A thread keeps exchanging ``tree/swap`` (a real folder) with a link to outside;
    archives of ``tree`` taken meanwhile hold the folder or the link, never the outside."""
    volume_id, folder = volume
    tree = folder / "tree"
    (tree / "swap").mkdir(parents=True)
    (tree / "swap" / "victim").write_bytes(b"inside")
    (tree / "swap_alt").symlink_to(outside)
    archives = 0
    with swapping([(tree / "swap", tree / "swap_alt")]) as swaps:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            for fmt in ("zip", "tar.gz"):
                response = await get_archive(client, volume_id, path="tree", format=fmt)
                assert response.status_code == 200, response.text
                for kind, content in members(fmt, response.content).values():
                    assert SECRET not in content, "the outside folder leaked"
                    assert kind != "file" or content == b"inside"
                archives += 1
    assert swaps["swaps"] > 100 and archives > 4


# --- a cut client ----------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
async def test_a_cut_client_stops_the_walk(running: RunningAgent, volume: Volume, fmt: str) -> None:
    """The agent runs in this process: its descriptors are ours. A client that reads one
    piece of a big archive and goes leaves no descriptor open for long (the walk's folders
    and the file being read are closed when the body is closed)."""
    volume_id, folder = volume
    for i in range(6):
        sub = folder / "big" / f"d{i}" / "e"
        sub.mkdir(parents=True)
        (sub / "data.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    async with api_client(running.url) as c:
        # warm up the connection pool and the worker threads
        await get_archive(c, volume_id, path="big/d0", format=fmt)
        baseline = open_fds()

        async def back_to_baseline() -> bool:
            return open_fds() <= baseline

        url = f"/volumes/{volume_id}/files/archive"
        async with c.stream("GET", url, params={"path": "big", "format": fmt}) as response:
            assert response.status_code == 200
            async for _piece in response.aiter_raw():
                break
            assert open_fds() > baseline  # the walk holds folders and a file open
        # the response was closed unread: the connection is dropped, the walk stops
        await wait_for(back_to_baseline, what="the walk's descriptors to close")
        # and the agent still answers
        response = await get_archive(c, volume_id, path="big/d1", format=fmt)
        assert response.status_code == 200


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
async def test_a_name_that_is_not_utf8(
    client: httpx.AsyncClient, volume: Volume, tmp_path: Path, fmt: str
) -> None:
    """A container may write any bytes as a name: zip (UTF-8 names) gets U+FFFD in their
    place, tar keeps the bytes (PAX ``hdrcharset=BINARY``); the archive stays valid."""
    volume_id, folder = volume
    (folder / "d").mkdir()
    fd = os.open(os.fsencode(folder / "d") + b"/bad\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"odd")
    os.close(fd)
    response = await get_archive(client, volume_id, path="d", format=fmt)
    assert response.status_code == 200, response.text
    got = members(fmt, response.content)
    name = "d/bad\ufffd.txt" if fmt == "zip" else os.fsdecode(b"d/bad\xff.txt")
    assert got == {"d": ("dir", b""), name: ("file", b"odd")}
    external_check(fmt, response.content, tmp_path)


async def test_head_answers_without_building_the_archive(
    client: httpx.AsyncClient, volume: Volume
) -> None:
    volume_id, folder = volume
    (folder / "d").mkdir()
    (folder / "d" / "f").write_bytes(b"f")
    response = await client.head(f"/volumes/{volume_id}/files/archive", params={"path": "d"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert response.content == b""
    assert "content-length" not in response.headers
    response = await client.head(f"/volumes/{volume_id}/files/archive", params={"path": "x"})
    assert response.status_code == 404
