"""The link-swap race of ``test_volumes_race`` run against the file manager's routes
(contract §13): while a thread keeps exchanging a folder of the volume with a link to
outside (``renameat2(EXCHANGE)``), downloads, uploads, deletes, renames, chmods, searches
and usage walks run in a loop, with ``openat2`` and with the component walk. Zero escapes:
the sentinel outside is unchanged (modes included), none of its bytes reach the volume or
any answer, no search lists it."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio
from lightd.files import FileError, Root, api_status, parse

from ..conftest import StartAgent, api_client
from .test_volumes_race import (
    API_SECONDS,
    THREAD_SECONDS,
    _run_threads,
    make_outside,
    plant_swaps,
    resolver,
    swapping,
)
from .volumes_corpus import SECRET, leaked, snapshot

__all__ = ["resolver"]  # the fixture, shared with the volumes race tests


async def test_file_manager_race_through_the_api(
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
        pairs = plant_swaps(volume, outside)
        url = f"/volumes/{volume_id}"

        def operations(i: int, name: str) -> list[tuple[str, str, str, dict[str, Any]]]:
            victim = f"{name}/victim"
            return [
                ("read", "get", "/files/content", {"params": {"path": victim}}),
                ("read-range", "get", "/files/content",
                 {"params": {"path": victim}, "headers": {"Range": "bytes=0-3"}}),
                ("upload", "put", "/files/content",
                 {"params": {"path": f"{name}/u{i}"}, "content": b"u" * 1000}),
                ("upload-deep", "put", "/files/content",
                 {"params": {"path": f"{name}/d/e{i}"}, "content": b"u"}),
                ("chmod", "post", "/files/chmod",
                 {"json": {"files": [{"path": victim, "mode": "777"}]}}),
                ("chmod-folder", "post", "/files/chmod",
                 {"json": {"files": [{"path": name, "mode": "700"}]}}),
                ("search", "get", "/files/search",
                 {"params": {"q": "e", "path": name, "content": "true"}}),
                ("search-root", "get", "/files/search", {"params": {"q": "secret"}}),
                ("usage", "get", "", {}),
                ("rename-out", "post", "/files/rename",
                 {"json": {"from": victim, "to": f"mv/{i}"}}),
                ("rename-in", "post", "/files/rename",
                 {"json": {"from": "seed.txt", "to": f"{name}/s{i}"}}),
                ("rename-back", "post", "/files/rename",
                 {"json": {"from": f"{name}/s{i}", "to": "seed.txt"}}),
                ("delete", "post", "/files/delete", {"json": {"paths": [f"{name}/u{i}"]}}),
                ("put-back", "put", "/files/content",
                 {"params": {"path": victim}, "content": b"inside"}),
            ]  # fmt: skip

        async def worker(index: int, deadline: float) -> None:
            i = index * 100_000
            while time.monotonic() < deadline:
                i += 1
                for what, method, route, kwargs in operations(i, ("swap", "swap2")[i % 2]):
                    response = await c.request(method, url + route, **kwargs)
                    statuses[(what, response.status_code)] += 1
                    assert response.status_code in (200, 206, 400, 404, 409), response.text
                    assert SECRET not in response.content, f"{what} read the outside folder"
                    if response.status_code == 200 and what.startswith("search"):
                        paths = [r["path"] for r in response.json()["results"]]
                        assert not any(p.endswith("secret.txt") for p in paths), paths
                    if what == "usage":
                        assert response.status_code == 200, response.text

        with swapping(pairs) as swaps:
            deadline = time.monotonic() + API_SECONDS
            async with trio.open_nursery() as nursery:
                for index in range(3):
                    nursery.start_soon(worker, index, deadline)
    assert swaps["swaps"] > 1000
    assert snapshot(outside) == before, "something escaped into the outside folder"
    assert leaked(volume) == [], "the outside folder's bytes reached the volume"
    for what in ("read", "upload", "chmod", "search", "rename-in", "delete"):
        assert statuses[(what, 200)] > 0, (what, statuses)  # the real folder was reached...
    refused = sum(n for (what, status), n in statuses.items() if status == 400)
    assert refused > 0, statuses  # ...and the link was met, and refused


async def test_file_manager_race_on_the_file_layer(tmp_path: Path, resolver: str) -> None:
    """The new primitives, called from threads many times faster than the API can:
    ``scan``, ``usage``, ``open_read_fd``, ``chmod(follow=False)``."""
    outside = make_outside(tmp_path)
    volume = tmp_path / "vol"
    volume.mkdir()
    (volume / "seed.txt").write_bytes(b"seed")
    pairs = plant_swaps(volume, outside)
    before = snapshot(outside)
    results: Counter[str] = Counter()
    lock = threading.Lock()

    def attempt(what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            value = fn(*args, **kwargs)
        except FileError as exc:
            status = api_status(exc)
            if status not in (400, 404, 409):
                raise AssertionError(f"{what}: {status} {exc.message}") from exc
            outcome = str(status)
        else:
            if isinstance(value, bytes):
                assert SECRET not in value, f"{what} read the outside folder"
            if isinstance(value, list):
                assert not any(str(p).endswith("secret.txt") for p in value), value
            outcome = "ok"
        with lock:
            results[f"{what}:{outcome}"] += 1

    def worker(deadline: float) -> None:
        with Root.open(volume) as root:

            def scanned(name: str) -> list[str]:
                return [e.path for e in root.scan(parse(name))]

            def read(name: str) -> bytes:
                fd = root.open_read_fd(parse(f"{name}/victim"))
                try:
                    return os.pread(fd, 1 << 16, 0)
                finally:
                    os.close(fd)

            i = 0
            while time.monotonic() < deadline:
                i += 1
                name = ("swap", "swap2")[i % 2]
                attempt("scan", scanned, name)
                attempt("usage", lambda: [root.usage()])
                attempt("read", read, name)
                attempt("chmod", root.chmod, parse(f"{name}/victim"), 0o666, follow=False)

    deadline = time.monotonic() + THREAD_SECONDS
    with swapping(pairs) as swaps:
        await trio.to_thread.run_sync(
            lambda: _run_threads([lambda: worker(deadline) for _ in range(3)])
        )
    assert swaps["swaps"] > 1000
    assert snapshot(outside) == before, "something escaped into the outside folder"
    assert leaked(volume) == []
    assert results["read:ok"] > 0 and results["scan:ok"] > 0, results
    assert results["chmod:ok"] > 0, results
