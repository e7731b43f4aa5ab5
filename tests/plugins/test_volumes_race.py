"""The race test (issue 3; CVE-2024-27102 in peers.md §2): while a thread keeps swapping
a folder of the volume with a symlink to outside (atomically, ``renameat2(EXCHANGE)``),
writes, folders, copies, listings, archives and extractions run in a loop for a few
seconds, with ``openat2`` and with the component walk. Zero escapes: the sentinel folder
outside is unchanged, none of its bytes reach the volume, nothing reads it.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from lightd.files import FileError, RelPath, Root, api_status, parse
from lightd.files import resolve as resolution

from ..conftest import StartAgent, api_client
from .volumes_corpus import SECRET, leaked, snapshot, zip_bytes

API_SECONDS = 3.0
THREAD_SECONDS = 2.0

_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextmanager
def swapping(pairs: list[tuple[Path, Path]]) -> Iterator[Counter[str]]:
    """A thread that exchanges each pair (a folder and a link to outside) until the block
    ends; yields a counter of swaps done."""
    stop = threading.Event()
    count: Counter[str] = Counter()

    def run() -> None:
        while not stop.is_set():
            for a, b in pairs:
                exchange(a, b)
                count["swaps"] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "walk":
        monkeypatch.setattr(resolution, "USE_OPENAT2", False)
        monkeypatch.setattr(resolution, "USE_RENAMEAT2", False)
    return str(request.param)


def make_outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "victim").write_bytes(SECRET)
    (outside / "inner.zip").write_bytes(zip_bytes([("stolen.txt", SECRET)]))
    os.chmod(outside / "secret.txt", 0o600)
    return outside


def plant_swaps(volume: Path, outside: Path) -> list[tuple[Path, Path]]:
    """``swap`` (absolute link when swapped) and ``swap2`` (relative link when swapped)."""
    pairs = []
    for name, target in (("swap", str(outside)), ("swap2", os.path.relpath(outside, volume))):
        real = volume / name
        real.mkdir()
        (real / "inner.zip").write_bytes(zip_bytes([("fine.txt", b"fine")]))
        (real / "victim").write_bytes(b"inside")
        (volume / f"{name}_alt").symlink_to(target)
        pairs.append((real, volume / f"{name}_alt"))
    return pairs


async def test_race_through_the_api(
    start_agent: StartAgent, config_path: Path, tmp_path: Path, resolver: str
) -> None:
    node = await start_agent(config_path)
    outside = make_outside(tmp_path)
    before = snapshot(outside)
    statuses: Counter[tuple[str, int]] = Counter()
    async with api_client(node.url) as c:
        created = (await c.post("/volumes")).json()
        volume_id, volume = created["volume_id"], Path(created["path"])
        (volume / "seed.txt").write_bytes(b"seed")
        (volume / "small.zip").write_bytes(zip_bytes([("x/unpacked.txt", b"ok")]))
        pairs = plant_swaps(volume, outside)
        url = f"/volumes/{volume_id}"

        def operations(i: int, name: str) -> list[tuple[str, str, str, Any]]:
            return [
                ("write", "post", "/files", {"path": f"{name}/w{i}.txt", "content": "w"}),
                ("write-deep", "post", "/files", {"path": f"{name}/d/e/f{i}", "content": "w"}),
                ("mkdir", "post", "/folders", {"path": f"{name}/m{i}/n"}),
                ("copy-in", "post", "/copy", {"source": "seed.txt", "destination": f"{name}/c{i}"}),
                ("copy-out", "post", "/copy", {"source": name, "destination": f"copies/{i}"}),
                ("copy-file-out", "post", "/copy",
                 {"source": f"{name}/victim", "destination": f"stolen/{i}"}),
                ("list", "get", f"/files?path={name}", None),
                ("compress", "post", "/compress",
                 {"format": "zip", "output_name": f"arch/{name}{i}", "sources": [name]}),
                ("compress-to", "post", "/compress",
                 {"format": "tar", "output_name": f"{name}/a{i}", "sources": ["seed.txt"]}),
                ("extract-to", "post", "/decompress",
                 {"archive_path": "small.zip", "destination": f"{name}/x{i}"}),
                ("extract-from", "post", "/decompress",
                 {"archive_path": f"{name}/inner.zip", "destination": f"ex/{i}"}),
            ]  # fmt: skip

        async def worker(index: int, deadline: float) -> None:
            i = index * 100_000
            while time.monotonic() < deadline:
                i += 1
                for what, method, route, body in operations(i, ("swap", "swap2")[i % 2]):
                    response = await c.request(method, url + route, json=body)
                    statuses[(what, response.status_code)] += 1
                    assert response.status_code in (200, 400, 404, 409), response.text
                    if response.status_code == 200 and what == "list":
                        names = {f["name"] for f in response.json()["files"]}
                        assert "secret.txt" not in names, "listed the outside folder"

        with swapping(pairs) as swaps:
            deadline = time.monotonic() + API_SECONDS
            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(worker, index, deadline)
    assert swaps["swaps"] > 1000
    assert snapshot(outside) == before, "something escaped into the outside folder"
    assert leaked(volume) == [], "the outside folder's bytes reached the volume"
    for what in ("write", "copy-in", "list", "extract-to", "extract-from", "compress"):
        assert statuses[(what, 200)] > 0, (what, statuses)  # the real folder was reached...
    refused = sum(n for (what, status), n in statuses.items() if status == 400)
    assert refused > 0, statuses  # ...and the link was met, and refused


async def test_race_on_the_safe_path_layer(tmp_path: Path, resolver: str) -> None:
    """The same, many times faster: threads call the primitives directly, including the
    ones no route exposes yet (chmod, remove, rename)."""
    outside = make_outside(tmp_path)
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "seed.txt").write_bytes(b"seed")
    pairs = plant_swaps(volume, outside)
    before = snapshot(outside)
    results: Counter[str] = Counter()
    lock = threading.Lock()

    def attempt(what: str, fn: Callable[..., object], *args: Any) -> None:
        try:
            value = fn(*args)
        except FileError as exc:
            status = api_status(exc)
            if status not in (400, 404, 409):
                raise AssertionError(f"{what}: {status} {exc.message}") from exc
            outcome = str(status)
        else:
            if isinstance(value, bytes):
                assert SECRET not in value, f"{what} read the outside folder"
            outcome = "ok"
        with lock:
            results[f"{what}:{outcome}"] += 1

    def worker(seed: int, deadline: float) -> None:
        with Root.open(volume) as root:

            def names(rel: RelPath) -> list[str]:
                return [e.name for e in root.list_dir(rel)]

            def walked(rel: RelPath) -> list[str]:
                return [e.path for e in root.walk(rel)]

            i = seed
            while time.monotonic() < deadline:
                i += 1
                name = ("swap", "swap2")[i % 2]
                victim = parse(f"{name}/victim")
                attempt("write", root.write_file, parse(f"{name}/w{i}"), b"w")
                attempt("mkdir", root.make_dirs, parse(f"{name}/m{i}/n"))
                attempt("read", root.read_bytes, victim)
                attempt("list", names, parse(name))
                attempt("walk", walked, parse(name))
                attempt("chmod", root.chmod, victim, 0o666)
                attempt("copy", root.copy, victim, parse(f"cp/{i}"))
                attempt("rename", root.rename, victim, parse(f"mv/{i}"))
                attempt("put-back", root.write_file, victim, b"inside")
                attempt("remove", root.remove, parse(f"{name}/w{i}"))

    deadline = time.monotonic() + THREAD_SECONDS
    with swapping(pairs) as swaps:
        await trio.to_thread.run_sync(
            lambda: _run_threads([lambda s=s: worker(s * 1_000_000, deadline) for s in range(3)])
        )
    assert swaps["swaps"] > 1000
    assert snapshot(outside) == before, "something escaped into the outside folder"
    assert leaked(volume) == []
    assert results["write:ok"] > 0 and results["write:400"] > 0, results
    assert results["read:ok"] > 0 and results["rename:ok"] > 0, results


def _run_threads(targets: list[Callable[[], None]]) -> None:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
