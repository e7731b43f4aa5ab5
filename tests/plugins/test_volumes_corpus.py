"""The bad-input corpus (issue 3; peers.md §2): hostile paths, planted links and hostile
archives sent to a real agent. Every case runs with the kernel's ``openat2`` and again
with the ``O_NOFOLLOW`` component walk, and every case checks, besides its answer, that

* the sentinel folder outside the volume, a sibling volume and ``/etc`` are untouched,
* no byte of the sentinel's secret appears in the volume (in files or inside archives),
* a refused request changed nothing in the volume (no partial file, no extraction left).
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from lightd.files import TEMP_PREFIX, openat2_available
from lightd.files import resolve as resolution

from ..conftest import StartAgent, api_client
from .volumes_corpus import (
    SECRET,
    leaked,
    snapshot,
    tar_bytes,
    tar_entry,
    tar_with_huge_pax_header,
    tar_with_zero_member,
    zip_bytes,
    zip_special,
    zip_symlink,
    zip_with_zero_member,
)

CANARY = Path("/etc/lightd-corpus-canary")


def canary_exists() -> bool:
    return CANARY.exists()


LIMIT_BYTES = 4 << 20
LIMIT_ENTRIES = 1000

ESCAPES = "Invalid path: path escapes volume"
TRAVERSAL = "Invalid path: path traversal detected"
ABSOLUTE = "Invalid path: absolute paths are not allowed"
LOOP = "Invalid path: too many levels of symbolic links"


@attrs.frozen
class World:
    url: str
    volume_id: str
    volume: Path
    sibling: Path
    outside: Path


@attrs.frozen
class Case:
    id: str
    method: str
    route: str  # after /volumes/<id>
    body: dict[str, Any] | None
    status: int
    error: str | None = None  # exact message, or a prefix ending in "…"
    files: Callable[[World], dict[str, bytes]] = lambda w: {}
    check: Callable[[World], None] = lambda w: None


def write(path: str, route: str = "/files", **extra: Any) -> dict[str, Any]:
    key = "filename" if route == "/write" else "path"
    return {key: path, "content": "pwned", **extra}


def is_link(rel: str) -> Callable[[World], None]:
    def check(w: World) -> None:
        assert (w.volume / rel).is_symlink(), rel

    return check


def archive_members_are_links_only(rel: str) -> Callable[[World], None]:
    def check(w: World) -> None:
        with tarfile.open(w.volume / rel) as tf:
            members = tf.getmembers()
        assert members and all(m.issym() for m in members), [m.name for m in members]

    return check


def valid_zip(w: World) -> dict[str, bytes]:
    return {"good.zip": zip_bytes([("unpacked/ok.txt", b"ok")])}


def one(name: str, data: bytes) -> Callable[[World], dict[str, bytes]]:
    return lambda w: {name: data}


CASES = [
    # --- writes ---------------------------------------------------------------------------
    Case("write-through-abs-dir-link", "post", "/files", write("out_abs/pwn.txt"), 400, ESCAPES),
    Case("write-through-rel-dir-link", "post", "/files", write("out_rel/pwn.txt"), 400, ESCAPES),
    Case("write-onto-link-to-outside-file", "post", "/files", write("secret_link"), 400, ESCAPES),
    Case("write-through-link-chain", "post", "/files", write("chain1/pwn.txt"), 400, ESCAPES),
    Case("write-onto-dangling-abs-link", "post", "/files", write("dangling_abs"), 400, ESCAPES),
    Case("write-onto-dangling-rel-link", "post", "/files", write("dangling_rel"), 400, ESCAPES),
    Case("write-through-link-to-etc", "post", "/files", write(f"etc/{CANARY.name}"), 400, ESCAPES),
    Case("write-into-sibling-abs", "post", "/files", write("sib_abs/pwn.txt"), 400, ESCAPES),
    Case("write-into-sibling-rel", "post", "/files", write("sib_rel/pwn.txt"), 400, ESCAPES),
    Case("write-through-dotdot-link", "post", "/files", write("sub/upup/pwn.txt"), 400, ESCAPES),
    Case("write-absolute", "post", "/files", write("/tmp/pwn.txt"), 400, ABSOLUTE),
    Case("write-dotdot", "post", "/files", write("../outside/pwn.txt"), 400, TRAVERSAL),
    Case("write-dotdot-deep", "post", "/files", write("data/../../pwn.txt"), 400, TRAVERSAL),
    Case("write-nul-byte", "post", "/files", write("data/\x00pwn"), 400, TRAVERSAL),
    Case(
        "write-over-long-name",
        "post",
        "/files",
        write("a" * 256),
        400,
        "Invalid path: name too long",
    ),
    Case("write-drive-path", "post", "/files", write("C:/pwn"), 400, ABSOLUTE),
    Case("write-backslash-root", "post", "/files", write("\\pwn"), 400, ABSOLUTE),
    Case("write-through-link-loop", "post", "/files", write("loop_a/pwn.txt"), 400, LOOP),
    Case(
        "write-alias-through-link",
        "post",
        "/write",
        write("out_abs/pwn.txt", "/write"),
        400,
        ESCAPES,
    ),
    Case(
        "write-base64-through-chain",
        "post",
        "/files",
        write("chain1/x", encoding="base64", content="cHduZWQ="),
        400,
        ESCAPES,
    ),
    Case(
        "write-through-inside-dotdot-link-stays-inside",
        "post",
        "/files",
        write("sub/up/ok.txt"),
        200,
        check=lambda w: (w.volume / "ok.txt").read_bytes() == b"pwned" or pytest.fail("no ok.txt"),
    ),
    # --- folders --------------------------------------------------------------------------
    Case("mkdir-through-abs-link", "post", "/folders", {"path": "out_abs/newdir"}, 400, ESCAPES),
    Case("mkdir-deep-through-chain", "post", "/folders", {"path": "chain1/a/b/c"}, 400, ESCAPES),
    Case(
        "mkdir-through-dangling-link", "post", "/folders", {"path": "dangling_rel/x"}, 400, ESCAPES
    ),
    Case("mkdir-in-etc", "post", "/folders", {"path": f"etc/{CANARY.name}"}, 400, ESCAPES),
    Case(
        "mkdir-alias-through-link",
        "post",
        "/create-folder",
        {"root": "out_rel", "name": "x"},
        400,
        ESCAPES,
    ),
    # --- copy -----------------------------------------------------------------------------
    Case(
        "copy-source-through-link",
        "post",
        "/copy",
        {"source": "out_abs/secret.txt", "destination": "stolen"},
        400,
        ESCAPES,
    ),
    Case(
        "copy-source-in-etc",
        "post",
        "/copy",
        {"source": "etc/passwd", "destination": "stolen"},
        400,
        ESCAPES,
    ),
    Case(
        "copy-source-in-sibling",
        "post",
        "/copy",
        {"source": "sib_abs/sibling.txt", "destination": "stolen"},
        400,
        ESCAPES,
    ),
    Case(
        "copy-link-to-outside-copies-the-link",
        "post",
        "/copy",
        {"source": "secret_link", "destination": "stolen"},
        200,
        check=is_link("stolen"),
    ),
    Case(
        "copy-tree-holding-outside-links",
        "post",
        "/copy",
        {"source": "data", "destination": "data2", "is_folder": True},
        200,
        check=is_link("data2/out"),
    ),
    Case(
        "copy-destination-through-link",
        "post",
        "/copy",
        {"source": "data/file.txt", "destination": "out_abs/x"},
        400,
        ESCAPES,
    ),
    Case(
        "copy-destination-in-sibling",
        "post",
        "/copy",
        {"source": "data/file.txt", "destination": "sib_rel/x"},
        400,
        ESCAPES,
    ),
    Case(
        "copy-destination-is-dangling-link",
        "post",
        "/copy",
        {"source": "data/file.txt", "destination": "dangling_abs"},
        409,
        "File already exists at path: dangling_abs",
    ),
    # --- list -----------------------------------------------------------------------------
    Case("list-abs-link", "get", "/files?path=out_abs", None, 400, ESCAPES),
    Case("list-etc", "get", "/files?path=etc", None, 400, ESCAPES),
    Case("list-sibling", "get", "/files?path=sib_rel", None, 400, ESCAPES),
    Case("list-chain", "get", "/files?path=chain1", None, 400, ESCAPES),
    Case("list-dotdot-link", "get", "/files?path=sub/upup", None, 400, ESCAPES),
    Case("list-dotdot", "get", "/files?path=..", None, 400, TRAVERSAL),
    # --- compress -------------------------------------------------------------------------
    Case(
        "compress-link-to-outside-stores-the-link",
        "post",
        "/compress",
        {"format": "tar", "output_name": "a1", "sources": ["secret_link"]},
        200,
        check=archive_members_are_links_only("a1.tar"),
    ),
    Case(
        "compress-dir-link-stores-the-link",
        "post",
        "/compress",
        {"format": "tar", "output_name": "a2", "sources": ["out_abs"]},
        200,
        check=archive_members_are_links_only("a2.tar"),
    ),
    Case(
        "compress-whole-volume-follows-no-link",
        "post",
        "/compress",
        {"format": "zip", "output_name": "all"},
        200,
    ),
    Case(
        "compress-source-through-link",
        "post",
        "/compress",
        {"format": "zip", "output_name": "x", "sources": ["out_abs/secret.txt"]},
        400,
        ESCAPES,
    ),
    Case(
        "compress-source-in-etc",
        "post",
        "/compress",
        {"format": "zip", "output_name": "x", "sources": ["etc/passwd"]},
        400,
        ESCAPES,
    ),
    Case(
        "compress-output-through-link",
        "post",
        "/compress",
        {"format": "zip", "output_name": "out_abs/pwn"},
        400,
        ESCAPES,
    ),
    Case(
        "compress-output-in-sibling",
        "post",
        "/compress",
        {"format": "zip", "output_name": "sib_rel/pwn"},
        400,
        ESCAPES,
    ),
    Case(
        "compress-output-is-dangling-link",
        "post",
        "/compress",
        {"format": "tar", "output_name": "dangling.tar"},
        409,
        "File already exists at path: dangling.tar",
    ),
    Case(
        "compress-output-dotdot",
        "post",
        "/compress",
        {"format": "zip", "output_name": "../pwn"},
        400,
        TRAVERSAL,
    ),
    # --- decompress: where it reads and writes ---------------------------------------------
    Case(
        "decompress-valid-control",
        "post",
        "/decompress",
        {"archive_path": "good.zip"},
        200,
        files=valid_zip,
        check=lambda w: (
            (w.volume / "unpacked" / "ok.txt").read_bytes() == b"ok" or pytest.fail("no ok.txt")
        ),
    ),
    Case(
        "decompress-archive-through-link",
        "post",
        "/decompress",
        {"archive_path": "out_abs/evil.zip"},
        400,
        ESCAPES,
    ),
    Case(
        "decompress-archive-is-link-to-outside",
        "post",
        "/decompress",
        {"archive_path": "evil_link.zip"},
        400,
        ESCAPES,
    ),
    Case(
        "decompress-destination-through-link",
        "post",
        "/decompress",
        {"archive_path": "good.zip", "destination": "out_abs"},
        400,
        ESCAPES,
        files=valid_zip,
    ),
    Case(
        "decompress-destination-in-sibling",
        "post",
        "/decompress",
        {"archive_path": "good.zip", "destination": "sib_rel/x"},
        400,
        ESCAPES,
        files=valid_zip,
    ),
    Case(
        "decompress-alias-root-through-link",
        "post",
        "/decompress",
        {"root": "out_abs", "file": "evil.zip"},
        400,
        ESCAPES,
    ),
    Case(
        "decompress-never-writes-through-existing-links",
        "post",
        "/decompress",
        {"archive_path": "m.zip"},
        409,
        "File already exists at path: data/out",
        files=one("m.zip", zip_bytes([("data/out/pwn.txt", b"pwned")])),
    ),
    # --- decompress: hostile archives ------------------------------------------------------
    Case(
        "zip-slip",
        "post",
        "/decompress",
        {"archive_path": "e.zip"},
        400,
        "Invalid archive: entry name with '..': ../../outside/pwn.txt",
        files=one("e.zip", zip_bytes([("ok.txt", b"ok"), ("../../outside/pwn.txt", b"pwned")])),
    ),
    Case(
        "zip-absolute-member",
        "post",
        "/decompress",
        {"archive_path": "e.zip"},
        400,
        f"Invalid archive: absolute entry name: {CANARY}",
        files=one("e.zip", zip_bytes([(str(CANARY), b"pwned")])),
    ),
    Case(
        "zip-symlink-to-outside",
        "post",
        "/decompress",
        {"archive_path": "e.zip"},
        400,
        "Invalid archive: link points outside the destination: l",
        files=lambda w: {"e.zip": zip_bytes([zip_symlink("l", str(w.outside))])},
    ),
    Case(
        "zip-symlink-then-write-through-it",
        "post",
        "/decompress",
        {"archive_path": "e.zip"},
        400,
        "Invalid archive: entry goes through a link: l/pwn.txt",
        files=one("e.zip", zip_bytes([zip_symlink("l", "data"), ("l/pwn.txt", b"pwned")])),
    ),
    Case(
        "zip-device-node",
        "post",
        "/decompress",
        {"archive_path": "e.zip"},
        400,
        "Invalid archive: device or special file: dev",
        files=one("e.zip", zip_bytes([zip_special("dev", stat.S_IFCHR)])),
    ),
    Case(
        "zip-bomb",
        "post",
        "/decompress",
        {"archive_path": "bomb.zip"},
        400,
        "Invalid archive: too large",
        files=one("bomb.zip", zip_with_zero_member("zeros", 2 * LIMIT_BYTES)),
    ),
    Case(
        "zip-truncated",
        "post",
        "/decompress",
        {"archive_path": "t.zip"},
        400,
        "Invalid archive: …",
        files=lambda w: {"t.zip": zip_bytes([("a", os.urandom(5000))])[:3000]},
    ),
    Case(
        "tar-absolute-member",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        f"Invalid archive: absolute entry name: {CANARY}",
        files=one("e.tar", tar_bytes([tar_entry(str(CANARY), b"pwned")])),
    ),
    Case(
        "tar-dotdot-member",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: entry name with '..': a/../../pwn.txt",
        files=one("e.tar", tar_bytes([tar_entry("a/../../pwn.txt", b"pwned")])),
    ),
    Case(
        "tar-symlink-then-write",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: link points outside the destination: l",
        files=lambda w: {
            "e.tar": tar_bytes(
                [
                    tar_entry("l", kind=tarfile.SYMTYPE, linkname=str(w.outside)),
                    tar_entry("l/pwn.txt", b"pwned"),
                ]
            )
        },
    ),
    Case(
        "tar-inside-symlink-then-write",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: entry goes through a link: l/pwn.txt",
        files=one(
            "e.tar",
            tar_bytes(
                [
                    tar_entry("sub", kind=tarfile.DIRTYPE),
                    tar_entry("l", kind=tarfile.SYMTYPE, linkname="sub"),
                    tar_entry("l/pwn.txt", b"pwned"),
                ]
            ),
        ),
    ),
    Case(
        "tar-link-escaping-through-another-link",
        "post",
        "/decompress",
        {"archive_path": "e.tar", "destination": "x"},
        400,
        "Invalid archive: link points outside the destination: e",
        files=one(
            "e.tar",
            tar_bytes(
                [
                    tar_entry("d", kind=tarfile.SYMTYPE, linkname="."),
                    tar_entry("e", kind=tarfile.SYMTYPE, linkname="d/.."),
                ]
            ),
        ),
    ),
    Case(
        "tar-hard-link-out",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: hard link points outside the destination: h",
        files=one(
            "e.tar",
            tar_bytes([tar_entry("h", kind=tarfile.LNKTYPE, linkname="../outside/secret.txt")]),
        ),
    ),
    Case(
        "tar-hard-link-absolute",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: hard link points outside the destination: h",
        files=one(
            "e.tar", tar_bytes([tar_entry("h", kind=tarfile.LNKTYPE, linkname="/etc/passwd")])
        ),
    ),
    Case(
        "tar-hard-link-to-a-volume-file",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: hard link target is not a file of the archive: h",
        files=one(
            "e.tar", tar_bytes([tar_entry("h", kind=tarfile.LNKTYPE, linkname="data/file.txt")])
        ),
    ),
    Case(
        "tar-char-device",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: device or special file: null",
        files=one("e.tar", tar_bytes([tar_entry("null", kind=tarfile.CHRTYPE)])),
    ),
    Case(
        "tar-fifo",
        "post",
        "/decompress",
        {"archive_path": "e.tar"},
        400,
        "Invalid archive: device or special file: pipe",
        files=one(
            "e.tar", tar_bytes([tar_entry("ok", b"ok"), tar_entry("pipe", kind=tarfile.FIFOTYPE)])
        ),
    ),
    Case(
        "tar-gz-bomb",
        "post",
        "/decompress",
        {"archive_path": "bomb.tar.gz"},
        400,
        "Invalid archive: too large",
        files=one("bomb.tar.gz", tar_with_zero_member("zeros", 2 * LIMIT_BYTES)),
    ),
    Case(
        "tar-too-many-entries",
        "post",
        "/decompress",
        {"archive_path": "many.tar"},
        400,
        "Invalid archive: too large",
        files=one("many.tar", tar_bytes([tar_entry(f"f{i}") for i in range(LIMIT_ENTRIES + 1)])),
    ),
    Case(
        "tar-gz-garbage",
        "post",
        "/decompress",
        {"archive_path": "g.tar.gz"},
        400,
        "Invalid archive: corrupt or unreadable data",
        files=lambda w: {"g.tar.gz": os.urandom(4096)},
    ),
    Case(
        "tar-gz-truncated",
        "post",
        "/decompress",
        {"archive_path": "t.tar.gz"},
        400,
        "Invalid archive: …",
        files=lambda w: {
            "t.tar.gz": tar_bytes([tar_entry("a", os.urandom(20000)), tar_entry("b", b"b")], "gz")[
                :12000
            ]
        },
    ),
    Case(
        "tar-oversized-pax-header",
        "post",
        "/decompress",
        {"archive_path": "p.tar"},
        400,
        "Invalid archive: oversized header",
        files=one("p.tar", tar_with_huge_pax_header()),
    ),
]

assert len(CASES) >= 40


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "walk":
        monkeypatch.setattr(resolution, "USE_OPENAT2", False)
        monkeypatch.setattr(resolution, "USE_RENAMEAT2", False)
    else:
        assert openat2_available(), "this kernel should have openat2"
    return str(request.param)


@pytest.fixture
async def world(
    start_agent: StartAgent, make_config: Callable[..., Path], tmp_path: Path, resolver: str
) -> World:
    node = await start_agent(
        make_config({"archives": {"max_total_bytes": LIMIT_BYTES, "max_entries": LIMIT_ENTRIES}})
    )
    async with api_client(node.url) as c:
        ids = [(await c.post("/volumes")).json() for _ in range(2)]
    volume, sibling = Path(ids[0]["path"]), Path(ids[1]["path"])
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(SECRET)
    (outside / "sub" / "secret2.txt").write_bytes(SECRET)
    (outside / "evil.zip").write_bytes(zip_bytes([("stolen.txt", SECRET)]))
    (sibling / "sibling.txt").write_bytes(SECRET)
    plant(volume, sibling, outside)
    return World(node.url, ids[0]["volume_id"], volume, sibling, outside)


def plant(volume: Path, sibling: Path, outside: Path) -> None:
    """What a hostile container would leave in its volume."""
    links = {
        "out_abs": str(outside),
        "out_rel": os.path.relpath(outside, volume),
        "etc": "/etc",
        "sib_abs": str(sibling),
        "sib_rel": f"../{sibling.name}",
        "secret_link": str(outside / "secret.txt"),
        "chain1": "chain2",
        "chain2": "chain3",
        "chain3": "out_abs",
        "dangling_abs": str(outside / "new.txt"),
        "dangling_rel": os.path.relpath(outside / "new.txt", volume),
        "dangling.tar": str(outside / "new.tar"),
        "evil_link.zip": str(outside / "evil.zip"),
        "loop_a": "loop_b",
        "loop_b": "loop_a",
    }
    for name, target in links.items():
        (volume / name).symlink_to(target)
    (volume / "sub").mkdir()
    (volume / "sub" / "up").symlink_to("..")
    (volume / "sub" / "upup").symlink_to("../..")
    (volume / "data").mkdir()
    (volume / "data" / "file.txt").write_bytes(b"data")
    (volume / "data" / "out").symlink_to(outside)


def matches(actual: str, expected: str) -> bool:
    if expected.endswith("…"):
        return actual.startswith(expected[:-1])
    return actual == expected


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_input(world: World, case: Case) -> None:
    assert not canary_exists()
    for name, data in case.files(world).items():
        (world.volume / name).write_bytes(data)
    outside, sibling, volume = (
        snapshot(world.outside),
        snapshot(world.sibling),
        snapshot(world.volume),
    )
    async with api_client(world.url) as c:
        response = await c.request(
            case.method, f"/volumes/{world.volume_id}{case.route}", json=case.body
        )
    assert response.status_code == case.status, response.text
    if case.error is not None:
        assert matches(response.json()["error"], case.error), response.json()
    assert snapshot(world.outside) == outside, "the sentinel outside the volume changed"
    assert snapshot(world.sibling) == sibling, "the sibling volume changed"
    assert not canary_exists()
    assert leaked(world.volume) == [], "the secret leaked into the volume"
    assert str(world.outside) not in response.text or case.status == 200
    if case.status >= 400:
        assert snapshot(world.volume) == volume, "a refused request changed the volume"
    else:
        case.check(world)
    assert not [n for n in _names(world.volume) if n.startswith(TEMP_PREFIX)]


def _names(root: Path) -> Iterator[str]:
    for _, dirs, files in os.walk(root, followlinks=False):
        yield from dirs
        yield from files
