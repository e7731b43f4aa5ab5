"""Contract §14 for the volume routes: compress, decompress and copy with ``"async": true``.

Each runs as a job through a real agent: ``202 {"message","job_id"}``, progress in bytes,
the synchronous answer as the job's ``result``, the synchronous error message as its
``error``, and a cancelled job stopped mid-way leaves the volume exactly as it was (tree
listings compared, the folders made for the output included). Inputs that take seconds
make "mid-way" real: a sparse 1 GiB file to compress (no disk used), tens of thousands
of small entries to extract or copy. Waiting is polling with a deadline.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ..conftest import wait_for
from .conftest import error
from .test_archives import archive_names, make_tree

JOB_TEMP = ".lightd-tmp-job-"
FINISHED = ("done", "failed", "cancelled")


def listing(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``root`` (links not followed): kind, size (files), mode. Sizes,
    not contents: the big inputs here must not be read into memory."""
    found: dict[str, tuple[str, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                kind, size = "link", 0
            elif stat.S_ISDIR(st.st_mode):
                kind, size = "dir", 0
            else:
                kind, size = "file", st.st_size
            found[str(path.relative_to(root))] = (kind, size, stat.S_IMODE(st.st_mode))
    return found


async def start(client: httpx.AsyncClient, url: str, body: dict[str, Any], message: str) -> str:
    response = await client.post(url, json={**body, "async": True})
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["message"] == message
    assert set(answer) == {"message", "job_id"}
    return str(answer["job_id"])


async def job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def finished(client: httpx.AsyncClient, job_id: str, within: float = 60) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def ended() -> bool:
        seen.update(await job(client, job_id))
        return seen["state"] in FINISHED

    await wait_for(ended, within=within, what=f"job {job_id} to end")
    return seen


async def under_way(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """The job once it runs and has reported some progress (and is not done yet)."""
    seen: dict[str, Any] = {}

    async def progressing() -> bool:
        seen.update(await job(client, job_id))
        assert seen["state"] in ("queued", "running"), seen
        return seen["state"] == "running" and seen["progress"]["done"] > 0

    await wait_for(progressing, within=30, what=f"job {job_id} to make progress")
    return seen


async def cancel_mid_way(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Cancel a running job: the answer comes promptly and the job ends cancelled."""
    began = time.monotonic()
    response = await client.delete(f"/jobs/{job_id}", timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Job cancelled"}
    assert time.monotonic() - began < 8, "the worker did not stop promptly"
    ended = await finished(client, job_id)
    assert ended["state"] == "cancelled", ended
    assert ended["result"] is None
    return ended


def temp_names(folder: Path, job_id: str) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(JOB_TEMP + job_id[:8])]


def many_small_files_tar_gz(count: int) -> bytes:
    buf = io.BytesIO()
    data = b"x" * 64
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tf:
        for i in range(count):
            info = tarfile.TarInfo(f"d{i // 1000}/f{i}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def many_small_files(folder: Path, count: int) -> None:
    for i in range(count):
        sub = folder / f"d{i // 1000}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"f{i}").write_bytes(b"y" * 64)


# --- compress ----------------------------------------------------------------------------


async def test_compress_as_a_job_gives_the_synchronous_answer(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    make_tree(folder)
    url = f"/volumes/{volume_id}/compress"
    sources = ["world", "latest", "hard", "server.properties", "start.sh"]
    body = {"format": "tar.gz", "sources": sources}
    sync = await client.post(url, json={**body, "output_name": "sync"})
    assert sync.status_code == 200, sync.text
    job_id = await start(
        client, url, {**body, "output_name": "backups/async"}, "Compression started"
    )
    ended = await finished(client, job_id)
    assert ended["state"] == "done", ended
    assert ended["kind"] == "volume.compress"
    assert ended["volume_id"] == volume_id
    assert ended["error"] is None
    archive = folder / "backups" / "async.tar.gz"
    assert ended["result"] == {
        "message": "Compression successful",
        "archive_path": "backups/async.tar.gz",
        "size": archive.stat().st_size,
    }
    assert ended["result"] == {**sync.json(), "archive_path": "backups/async.tar.gz"} | {
        "size": archive.stat().st_size
    }
    # the same archive as the synchronous call made
    assert archive_names(archive.read_bytes()) == archive_names(
        (folder / "sync.tar.gz").read_bytes()
    )
    total = sum(size for kind, size, _ in listing(folder).values() if kind == "file")
    total -= archive.stat().st_size + (folder / "sync.tar.gz").stat().st_size
    assert ended["progress"] == {"done": total, "total": total, "unit": "bytes"}
    assert temp_names(folder, job_id) == temp_names(folder / "backups", job_id) == []


async def test_compress_job_fails_with_the_synchronous_message(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "f").write_text("f")
    (folder / "taken.zip").write_text("keep")
    url = f"/volumes/{volume_id}/compress"
    before = listing(folder)
    for body in (
        {"format": "zip", "output_name": "x/y", "sources": ["missing"]},
        {"format": "zip", "output_name": "taken"},
    ):
        sync = await client.post(url, json=body)
        assert sync.status_code in (404, 409), sync.text
        job_id = await start(client, url, body, "Compression started")
        ended = await finished(client, job_id)
        assert (ended["state"], ended["error"]) == ("failed", error(sync)), body
        assert listing(folder) == before
    # what is wrong with the body itself is still answered at once
    bad = await client.post(url, json={"format": "rar", "output_name": "x", "async": True})
    assert (bad.status_code, error(bad)) == (400, "Unsupported format: rar")
    bad = await client.post(url, json={"format": "zip", "output_name": "x", "async": "yes"})
    assert (bad.status_code, error(bad)) == (400, "async: must be a boolean")
    assert listing(folder) == before


async def test_compress_job_reports_progress_and_cancels_clean(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    big = folder / "big.bin"
    big.touch()
    os.truncate(big, 1 << 30)  # sparse: a gigabyte to compress, no disk used
    (folder / "keep.txt").write_text("keep")
    before = listing(folder)
    job_id = await start(
        client,
        f"/volumes/{volume_id}/compress",
        {"format": "tar.gz", "output_name": "out/big", "sources": ["big.bin"]},
        "Compression started",
    )
    seen = await under_way(client, job_id)
    progress = seen["progress"]
    assert progress["unit"] == "bytes"
    assert progress["total"] == 1 << 30
    assert 0 < progress["done"] < progress["total"]
    # the partial archive is staged under the job's recorded temporary name
    assert len(temp_names(folder / "out", job_id)) == 1
    await cancel_mid_way(client, job_id)
    assert listing(folder) == before  # no partial archive, not even the "out" folder


# --- decompress --------------------------------------------------------------------------


async def test_decompress_as_a_job_gives_the_synchronous_answer(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    make_tree(folder)
    made = await client.post(
        f"/volumes/{volume_id}/compress",
        json={"format": "tar.gz", "output_name": "all", "sources": ["world", "latest", "hard"]},
    )
    assert made.status_code == 200, made.text
    url = f"/volumes/{volume_id}/decompress"
    sync = await client.post(url, json={"archive_path": "all.tar.gz", "destination": "sync"})
    assert sync.status_code == 200, sync.text
    job_id = await start(
        client,
        url,
        {"archive_path": "all.tar.gz", "destination": "restored"},
        "Decompression started",
    )
    ended = await finished(client, job_id)
    assert ended["state"] == "done", ended
    assert ended["kind"] == "volume.decompress"
    assert ended["result"] == {"message": "Decompression successful", "destination": "restored"}
    assert ended["result"] == {**sync.json(), "destination": "restored"}
    assert listing(folder / "restored") == listing(folder / "sync")
    size = (folder / "all.tar.gz").stat().st_size
    assert ended["progress"] == {"done": size, "total": size, "unit": "bytes"}
    assert temp_names(folder / "restored", job_id) == []


async def test_decompress_job_fails_with_the_synchronous_message(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    (folder / "bad.zip").write_bytes(b"PK\x03\x04 this is no zip")
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tf:
        ok = tarfile.TarInfo("fine.txt")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"ok"))
        escape = tarfile.TarInfo("../escape.txt")
        escape.size = 2
        tf.addfile(escape, io.BytesIO(b"no"))
    (folder / "evil.tar").write_bytes(evil.getvalue())
    url = f"/volumes/{volume_id}/decompress"
    before = listing(folder)
    for body in (
        {"archive_path": "bad.zip", "destination": "out"},
        {"archive_path": "evil.tar", "destination": "out/deeper"},
        {"archive_path": "missing.tar"},
    ):
        sync = await client.post(url, json=body)
        assert sync.status_code in (400, 404), sync.text
        job_id = await start(client, url, body, "Decompression started")
        ended = await finished(client, job_id)
        assert (ended["state"], ended["error"]) == ("failed", error(sync)), body
        assert listing(folder) == before
    bad = await client.post(url, json={"async": True})
    assert (bad.status_code, error(bad)) == (400, "archive_path: is required")


async def test_decompress_job_reports_progress_and_cancels_clean(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    data = await trio.to_thread.run_sync(many_small_files_tar_gz, 20_000)
    (folder / "many.tar.gz").write_bytes(data)
    (folder / "keep.txt").write_text("keep")
    before = listing(folder)
    job_id = await start(
        client,
        f"/volumes/{volume_id}/decompress",
        {"archive_path": "many.tar.gz", "destination": "restore/deep"},
        "Decompression started",
    )
    seen = await under_way(client, job_id)
    progress = seen["progress"]
    assert progress["total"] == len(data)
    assert 0 < progress["done"] < progress["total"]
    # the extraction is staged in the job's recorded temporary folder
    assert len(temp_names(folder / "restore" / "deep", job_id)) == 1
    await cancel_mid_way(client, job_id)
    assert listing(folder) == before  # nothing extracted, the destination folders gone


# --- copy --------------------------------------------------------------------------------


async def test_copy_as_a_job_gives_the_synchronous_answer(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    make_tree(folder)
    url = f"/volumes/{volume_id}/copy"
    sync = await client.post(url, json={"source": "world", "destination": "sync"})
    assert sync.status_code == 200, sync.text
    job_id = await start(
        client, url, {"source": "world", "destination": "copies/world"}, "Copy started"
    )
    ended = await finished(client, job_id)
    assert ended["state"] == "done", ended
    assert ended["kind"] == "volume.copy"
    assert ended["result"] == {
        "message": "Copied successfully",
        "source": "world",
        "destination": "copies/world",
    }
    assert ended["result"] == {**sync.json(), "destination": "copies/world"}
    assert listing(folder / "copies" / "world") == listing(folder / "world")
    size = sum((folder / "world" / n).stat().st_size for n in ("region/r.0.0.mca", "level.dat"))
    assert ended["progress"] == {"done": size, "total": size, "unit": "bytes"}
    assert temp_names(folder / "copies", job_id) == []


async def test_copy_job_fails_with_the_synchronous_message(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    make_tree(folder)
    url = f"/volumes/{volume_id}/copy"
    before = listing(folder)
    for body in (
        {"source": "missing", "destination": "new/place"},
        {"source": "world", "destination": "server.properties"},
        {"source": "world", "destination": "start.sh/inside"},
    ):
        sync = await client.post(url, json=body)
        assert sync.status_code in (404, 409), sync.text
        job_id = await start(client, url, body, "Copy started")
        ended = await finished(client, job_id)
        assert (ended["state"], ended["error"]) == ("failed", error(sync)), body
        assert listing(folder) == before
    bad = await client.post(url, json={"source": "../x", "destination": "y", "async": True})
    assert (bad.status_code, error(bad)) == (400, "Invalid path: path traversal detected")


async def test_copy_job_reports_progress_and_cancels_clean(
    client: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    await trio.to_thread.run_sync(many_small_files, folder / "src", 20_000)
    before = listing(folder)
    job_id = await start(
        client,
        f"/volumes/{volume_id}/copy",
        {"source": "src", "destination": "a/b/dst"},
        "Copy started",
    )
    seen = await under_way(client, job_id)
    progress = seen["progress"]
    assert progress["total"] == 20_000 * 64
    assert 0 < progress["done"] < progress["total"]
    assert len(temp_names(folder / "a" / "b", job_id)) == 1
    await cancel_mid_way(client, job_id)
    assert listing(folder) == before  # no partial copy, not even "a/b"


@pytest.mark.parametrize("route", ["compress", "decompress", "copy"])
async def test_without_async_the_route_answers_200_as_before(
    client: httpx.AsyncClient, volume: tuple[str, Path], route: str
) -> None:
    volume_id, folder = volume
    make_tree(folder)
    made = await client.post(
        f"/volumes/{volume_id}/compress",
        json={"format": "tar", "output_name": "w", "sources": ["world"]},
    )
    assert made.status_code == 200, made.text
    for n, flag in enumerate(({}, {"async": False})):
        body: dict[str, Any] = {
            "compress": {"format": "zip", "output_name": f"z{n}"},
            "decompress": {"archive_path": "w.tar", "destination": f"x{n}"},
            "copy": {"source": "world", "destination": f"c{n}"},
        }[route]
        response = await client.post(f"/volumes/{volume_id}/{route}", json={**body, **flag})
        assert response.status_code == 200, response.text
        assert "job_id" not in response.json()
    jobs = (await client.get("/jobs", params={"volume_id": volume_id})).json()["jobs"]
    assert jobs == []
