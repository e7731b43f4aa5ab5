"""Attack suite, file layer: a FIFO or a device node planted in a volume is never
``open()``-ed by the API (opening a FIFO blocks or wakes its writer, a device's open may
act on the device). Its type is read first (``O_PATH`` + ``fstat``); every route answers
a clear 400 (or lists it), and nothing hangs.

Opens are observed with inotify ``IN_OPEN`` on the planted node: an ``O_PATH`` descriptor
or a ``stat`` raises no event, a real ``open()`` does.
"""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from ..plugins.conftest import error, new_volume

_IN_OPEN = 0x20
_libc = ctypes.CDLL(None, use_errno=True)


class OpenWatch:
    """Counts ``open()`` calls on some files (inotify ``IN_OPEN``)."""

    def __init__(self) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())

    def watch(self, path: Path) -> None:
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_OPEN | 0x2000)  # DONT_FOLLOW
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def opened(self) -> bool:
        try:
            return bool(os.read(self.fd, 65536))
        except BlockingIOError:
            return False

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def opens() -> Iterator[OpenWatch]:
    watch = OpenWatch()
    yield watch
    watch.close()


def plant(folder: Path, name: str, kind: str) -> Path:
    path = folder / name
    if kind == "fifo":
        os.mkfifo(path, 0o644)
    else:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.stat("/dev/null").st_rdev)
    return path


KINDS = [
    "fifo",
    pytest.param(
        "device",
        marks=pytest.mark.skipif(os.geteuid() != 0, reason="mknod of a device needs root"),
    ),
]


@pytest.mark.parametrize("kind", KINDS)
async def test_special_files_are_never_opened(
    client: httpx.AsyncClient, opens: OpenWatch, kind: str
) -> None:
    volume_id, folder = await new_volume(client)
    (folder / "dir").mkdir()
    (folder / "data.txt").write_text("hello")
    nodes = [plant(folder, "node.zip", kind), plant(folder / "dir", "inner", kind)]
    (folder / "link.tar").symlink_to("node.zip")
    for node in nodes:
        opens.watch(node)
    base = f"/volumes/{volume_id}"

    async def post(route: str, body: dict[str, object]) -> httpx.Response:
        with trio.fail_after(15):
            return await client.post(base + route, json=body)

    for archive in ("node.zip", "link.tar"):  # read: the archive to extract
        response = await post("/decompress", {"archive_path": archive})
        assert response.status_code == 400, response.text
        assert error(response) == f"Not a file: {archive}"
    assert not opens.opened(), f"reading the archive opened the planted {kind}"
    response = await post("/copy", {"source": "node.zip", "destination": "copy.zip"})
    assert response.status_code == 400, response.text
    assert error(response) == "Not a file: node.zip"
    for fmt in ("zip", "tar"):
        body = {"format": fmt, "output_name": "one", "sources": ["node.zip"]}
        response = await post("/compress", body)
        assert response.status_code == 400, response.text
        assert error(response) == "Not a file: node.zip"
    # trees holding the node: copied and archived without it
    response = await post("/copy", {"source": "dir", "destination": "dir2"})
    assert response.status_code == 200, response.text
    assert list((folder / "dir2").iterdir()) == []
    for fmt in ("zip", "tar.gz"):
        response = await post("/compress", {"format": fmt, "output_name": f"all-{fmt}"})
        assert response.status_code == 200, response.text
    with trio.fail_after(15):
        response = await client.get(f"{base}/files", params={"path": "dir"})
    assert response.status_code == 200, response.text
    assert [e["name"] for e in response.json()["files"]] == ["inner"]
    with trio.fail_after(15):
        response = await client.get(f"{base}/files", params={"path": "node.zip"})
    assert response.status_code == 400, response.text
    assert error(response) == "Not a folder: node.zip"
    assert not opens.opened(), f"the API opened the planted {kind}"
