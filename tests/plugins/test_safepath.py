"""The file layer (``lightd.files``) on real folders: path rules, and every primitive
against links that point out of the root, run with ``openat2`` and with the ``O_NOFOLLOW``
component walk."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from lightd.files import (
    CHUNK,
    MAX_DEPTH,
    TEMP_PREFIX,
    BadArchive,
    FileExists,
    FolderExists,
    InvalidPath,
    NotAFile,
    NotAFolder,
    PathEscapes,
    PathNotFound,
    RelPath,
    Root,
    api_status,
    extract_tar,
    merge_tree,
    openat2_available,
    parse,
    remove_private_folder,
    sweep_private_folders,
    write_tar_zst,
    zst_reader,
)
from lightd.files import resolve as resolution
from lightd.files.resolve import rename_noreplace

from .volumes_corpus import SECRET, snapshot


@pytest.fixture(params=["openat2", "walk"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "walk":
        monkeypatch.setattr(resolution, "USE_OPENAT2", False)
        monkeypatch.setattr(resolution, "USE_RENAMEAT2", False)
    return str(request.param)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    (folder / "deep").mkdir(parents=True)
    (folder / "secret.txt").write_bytes(SECRET)
    (folder / "deep" / "secret.txt").write_bytes(SECRET)
    return folder


@pytest.fixture
def vol(tmp_path: Path, outside: Path, mode: str) -> Iterator[tuple[Path, Root]]:
    folder = tmp_path / "vol"
    folder.mkdir()
    (folder / "out").symlink_to(outside)
    (folder / "out_rel").symlink_to("../outside")
    (folder / "secret").symlink_to(outside / "secret.txt")
    (folder / "dangling_out").symlink_to(outside / "nothing")
    (folder / "real" / "inner").mkdir(parents=True)
    (folder / "real" / "file.txt").write_text("inside")
    (folder / "inner_link").symlink_to("real/inner")
    (folder / "file_link").symlink_to("real/file.txt")
    (folder / "real" / "up").symlink_to("..")  # the root: inside
    (folder / "real" / "upup").symlink_to("../..")  # above the root
    (folder / "loop1").symlink_to("loop2")
    (folder / "loop2").symlink_to("loop1")
    root = Root.open(folder)
    before = snapshot(outside)
    yield folder, root
    root.close()
    assert snapshot(outside) == before, "something outside the root changed"


def p(text: str) -> RelPath:
    return parse(text)


# --- path rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a", ("a",)),
        ("a/b/c.txt", ("a", "b", "c.txt")),
        ("./a//b/", ("a", "b")),
        ("a..b.txt", ("a..b.txt",)),
        ("...", ("...",)),
        (".hidden", (".hidden",)),
        ("ab:c", ("ab:c",)),
        ("1:x", ("1:x",)),
        ("dir\\..\\x", ("dir\\..\\x",)),  # a backslash is a plain character here
        (".", ()),
        ("é/日本", ("é", "日本")),
    ],
)
def test_parse_accepts(text: str, parts: tuple[str, ...]) -> None:
    assert parse(text).parts == parts
    assert parse(text).text == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "path is empty"),
        ("  ", "path is empty"),
        ("/etc", "absolute paths are not allowed"),
        ("//x", "absolute paths are not allowed"),
        ("\\x", "absolute paths are not allowed"),
        ("C:x", "absolute paths are not allowed"),
        ("c:\\x", "absolute paths are not allowed"),
        ("..", "path traversal detected"),
        ("a/..", "path traversal detected"),
        ("a/../b", "path traversal detected"),
        ("a/b/../../..", "path traversal detected"),
        ("a\x00b", "path traversal detected"),
        ("x" * 256, "name too long"),
        ("é" * 128, "name too long"),  # 256 bytes in UTF-8
        ("a/" * 2048, "path too long"),
        ("\ud800", "path is not valid UTF-8"),
    ],
)
def test_parse_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidPath) as caught:
        parse(text)
    assert caught.value.message == f"Invalid path: {reason}"
    assert api_status(caught.value) == 400


def test_parse_empty_as_root() -> None:
    assert parse("", empty_is_root=True).parts == ()
    assert parse("x" * 255).parts == ("x" * 255,)


def test_openat2_is_probed_once_and_available_here() -> None:
    assert openat2_available() is True


# --- reading ---------------------------------------------------------------------------------


def test_reads_follow_links_that_stay_inside(vol: tuple[Path, Root]) -> None:
    _, root = vol
    assert root.read_bytes(p("file_link")) == b"inside"
    assert root.read_bytes(p("real/up/real/file.txt")) == b"inside"
    assert [e.name for e in root.list_dir(p("inner_link"))] == []
    assert stat.S_ISDIR(root.stat(p("inner_link")).st_mode)
    assert stat.S_ISLNK(root.stat(p("inner_link"), follow=False).st_mode)


@pytest.mark.parametrize(
    "path", ["out/secret.txt", "out_rel/secret.txt", "secret", "real/upup/outside/secret.txt"]
)
def test_reads_never_leave_the_root(vol: tuple[Path, Root], path: str) -> None:
    _, root = vol
    with pytest.raises(PathEscapes):
        root.read_bytes(p(path))
    with pytest.raises(PathEscapes):
        root.stat(p(path))


@pytest.mark.parametrize("path", ["out", "out_rel", "real/upup"])
def test_listing_never_leaves_the_root(vol: tuple[Path, Root], path: str) -> None:
    _, root = vol
    with pytest.raises(PathEscapes):
        root.list_dir(p(path))


def test_read_errors(vol: tuple[Path, Root]) -> None:
    _, root = vol
    with pytest.raises(PathNotFound, match=r"^Path not found: nope$"):
        root.read_bytes(p("nope"))
    with pytest.raises(NotAFile):
        root.read_bytes(p("real"))
    with pytest.raises(NotAFolder):
        root.list_dir(p("real/file.txt"))
    with pytest.raises(PathNotFound):
        root.list_dir(p("real/file.txt/x"))
    with pytest.raises(InvalidPath, match="too many levels"):
        root.read_bytes(p("loop1"))


def test_list_does_not_follow_links(vol: tuple[Path, Root]) -> None:
    _, root = vol
    kinds = {e.name: e.kind for e in root.list_dir(parse("", empty_is_root=True))}
    assert kinds["out"] == "symlink"
    assert kinds["real"] == "directory"
    assert kinds["secret"] == "symlink"


def test_a_fifo_is_not_opened_as_a_file(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    os.mkfifo(folder / "pipe")
    with pytest.raises(NotAFile):  # and never blocks waiting for a writer
        root.read_bytes(p("pipe"))


# --- writing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "out/new.txt",
        "out_rel/new.txt",
        "secret",
        "dangling_out",
        "out/deep/secret.txt",
        "real/upup/x",
        "real/up/out/x",
    ],
)
def test_writes_never_leave_the_root(vol: tuple[Path, Root], path: str) -> None:
    _, root = vol
    with pytest.raises(PathEscapes):
        root.write_file(p(path), b"pwned")
    with pytest.raises(PathEscapes):
        root.make_dirs(p(path + "/sub"))


def test_write_creates_parents_and_replaces_atomically(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    root.write_file(p("a/b/c.txt"), b"1")
    assert (folder / "a" / "b" / "c.txt").read_bytes() == b"1"
    inode = (folder / "a" / "b" / "c.txt").stat().st_ino
    root.write_file(p("a/b/c.txt"), b"2")
    assert (folder / "a" / "b" / "c.txt").read_bytes() == b"2"
    assert (folder / "a" / "b" / "c.txt").stat().st_ino != inode  # a new file renamed in
    assert os.listdir(folder / "a" / "b") == ["c.txt"]


def test_write_through_inside_links(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    root.write_file(p("file_link"), b"new")
    assert (folder / "real" / "file.txt").read_bytes() == b"new"
    assert (folder / "file_link").is_symlink()
    (folder / "to_new").symlink_to("real/brand_new.txt")
    root.write_file(p("to_new"), b"created through a dangling inside link")
    assert (folder / "real" / "brand_new.txt").exists()


def test_write_conflicts(vol: tuple[Path, Root]) -> None:
    _, root = vol
    with pytest.raises(FolderExists, match=r"^A folder exists at path: real$"):
        root.write_file(p("real"), b"x")
    with pytest.raises(FolderExists):
        root.write_file(parse(".", empty_is_root=True), b"x")
    with pytest.raises(FileExists, match=r"^File already exists at path: real/file\.txt/x$"):
        root.write_file(p("real/file.txt/x"), b"x")
    with pytest.raises(FileExists):
        root.make_dirs(p("real/file.txt"))


def test_failed_atomic_write_leaves_nothing(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    before = snapshot(folder)

    def write_then_fail() -> None:
        with root.atomic(p("new/deeper/f"), replace=True) as out:
            out.file.write(b"partial")
            raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        write_then_fail()
    assert snapshot(folder) == before  # no temp file, and the parents it made are gone


def test_atomic_without_replace_refuses_anything_there(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    for name in ("real/file.txt", "dangling_out", "file_link"):
        with pytest.raises(FileExists), root.atomic(p(name), replace=False):
            pass
    assert (folder / "real" / "file.txt").read_text() == "inside"


def test_make_dirs_reports_and_undoes(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    created = root.make_dirs(p("real/x/y/z"))
    assert [str(c) for c in created] == ["real/x", "real/x/y", "real/x/y/z"]
    (folder / "real" / "x" / "keep").write_text("k")
    root.remove_created(created)
    assert sorted(os.listdir(folder / "real" / "x")) == ["keep"]  # non-empty: kept
    assert root.make_dirs(p("inner_link/new")) == [p("inner_link/new")]
    assert (folder / "real" / "inner" / "new").is_dir()


def test_dangling_link_in_the_way_of_mkdir(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    (folder / "dangle_in").symlink_to("missing")
    with pytest.raises(FileExists):
        root.make_dirs(p("dangle_in"))
    assert not (folder / "missing").exists()


# --- copy, rename, remove, chmod ---------------------------------------------------------------


def test_copy_refuses_outside_sources_and_destinations(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    with pytest.raises(PathEscapes):
        root.copy(p("out/secret.txt"), p("stolen"))
    with pytest.raises(PathEscapes):
        root.copy(p("real/file.txt"), p("out/planted"))
    root.copy(p("secret"), p("copied_link"))
    assert os.readlink(folder / "copied_link") == os.readlink(folder / "secret")


def test_copy_whole_root_into_a_subfolder(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    root.copy(parse(".", empty_is_root=True), p("backup"))
    assert (folder / "backup" / "real" / "file.txt").read_text() == "inside"
    assert (folder / "backup" / "out").is_symlink()
    assert not (folder / "backup" / "backup").exists()


def test_copy_refuses_too_deep_trees_and_leaves_nothing(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    deep = folder / "deep"
    path = deep
    for _ in range(MAX_DEPTH + 1):
        path = path / "d"
    path.mkdir(parents=True)
    with pytest.raises(InvalidPath, match="folder tree too deep"):
        root.copy(p("deep"), p("deep_copy"))
    assert not [n for n in os.listdir(folder) if n.startswith(TEMP_PREFIX)]
    with pytest.raises(InvalidPath, match="folder tree too deep"):
        list(root.walk(p("deep")))


def test_rename(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    root.rename(p("secret"), p("moved/link"))
    assert os.readlink(folder / "moved" / "link") == os.readlink(folder / "moved" / "link")
    assert (folder / "moved" / "link").is_symlink()
    with pytest.raises(PathEscapes):
        root.rename(p("real/file.txt"), p("out/x"))
    with pytest.raises(PathEscapes):
        root.rename(p("out/secret.txt"), p("x"))
    with pytest.raises(FileExists):
        root.rename(p("file_link"), p("real/file.txt"))
    with pytest.raises(InvalidPath, match="into itself"):
        root.rename(p("real"), p("real/inner/x"))
    root.rename(p("file_link"), p("inner_link/fl"), replace=True)
    assert (folder / "real" / "inner" / "fl").is_symlink()


def test_remove_never_follows(vol: tuple[Path, Root], outside: Path) -> None:
    folder, root = vol
    root.remove(p("out"))  # the link goes, what it points to stays
    assert not (folder / "out").exists() and (outside / "secret.txt").exists()
    with pytest.raises(PathEscapes):
        root.remove(p("out_rel/secret.txt"))
    with pytest.raises(PathEscapes):
        root.remove(p("out_rel/deep"))
    (folder / "real" / "inner" / "escape").symlink_to(outside)
    root.remove(p("real"))  # a tree holding a link to outside: the link is unlinked
    assert not (folder / "real").exists()
    with pytest.raises(PathNotFound):
        root.remove(p("real"))
    with pytest.raises(InvalidPath):
        root.remove(parse(".", empty_is_root=True))


def test_chmod_never_reaches_outside(vol: tuple[Path, Root], outside: Path) -> None:
    folder, root = vol
    mode = stat.S_IMODE((outside / "secret.txt").stat().st_mode)
    for path in ("secret", "out/secret.txt", "dangling_out"):
        with pytest.raises(PathEscapes):
            root.chmod(p(path), 0o777)
    assert stat.S_IMODE((outside / "secret.txt").stat().st_mode) == mode
    root.chmod(p("file_link"), 0o600)  # a link inside: its target changes
    assert stat.S_IMODE((folder / "real" / "file.txt").stat().st_mode) == 0o600


# --- no-links roots (archive extraction) ---------------------------------------------------------


def test_no_links_root_refuses_every_link(vol: tuple[Path, Root]) -> None:
    folder, _ = vol
    with Root.open(folder, no_links=True) as strict:
        with pytest.raises(InvalidPath, match="goes through a link"):
            strict.make_dirs(p("inner_link/x"))
        with pytest.raises(InvalidPath, match="goes through a link"):
            strict.create_file(p("inner_link/x"))
        fd = strict.create_file(p("file_link"))  # replaces the link itself
        os.close(fd)
        assert not (folder / "file_link").is_symlink()
        assert (folder / "real" / "file.txt").read_text() == "inside"
        strict.symlink(p("real/l"), "/anything")  # text until someone resolves it
        assert os.readlink(folder / "real" / "l") == "/anything"
        strict.hardlink(p("real/file.txt"), p("real/h"))
        assert (folder / "real" / "h").stat().st_ino == (folder / "real" / "file.txt").stat().st_ino
        with pytest.raises(PathNotFound):
            strict.hardlink(p("secret"), p("real/h2"))


# --- walk ------------------------------------------------------------------------------------


def test_walk_reports_links_and_skips(vol: tuple[Path, Root]) -> None:
    folder, root = vol
    seen = {e.path: e.kind for e in root.walk(parse("", empty_is_root=True))}
    assert seen["out"] == "symlink"
    assert "out/secret.txt" not in seen
    assert seen["real/inner"] == "directory"
    assert seen["real/upup"] == "symlink"
    skip = (folder / "real").stat()
    seen = {e.path for e in root.walk(p("."), skip=lambda st: st.st_ino == skip.st_ino)}
    assert not any(path.startswith("real") for path in seen)
    with pytest.raises(PathEscapes):
        list(root.walk(p("out/deep")))


# --- rename_noreplace and merge_tree -----------------------------------------------------------


def test_rename_noreplace(tmp_path: Path, mode: str) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(FileExistsError):
            rename_noreplace(fd, "a", fd, "b")
        rename_noreplace(fd, "a", fd, "c")
    finally:
        os.close(fd)
    assert (tmp_path / "b").read_text() == "b" and (tmp_path / "c").read_text() == "a"


def _dirfd(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def test_merge_tree(tmp_path: Path, mode: str) -> None:
    src, dst, backup = tmp_path / "src", tmp_path / "dst", tmp_path / "backup"
    for folder in (src / "d", dst / "d", backup):
        folder.mkdir(parents=True)
    (src / "new").write_text("new")
    (src / "d" / "f").write_text("src f")
    (dst / "d" / "f").write_text("dst f")
    (dst / "d" / "keep").write_text("keep")
    (src / "l").symlink_to("d")
    (dst / "l").write_text("a file replaced by a link")
    fds = [_dirfd(x) for x in (src, dst, backup)]
    try:
        merge_tree(*fds, prefix="dest")
    finally:
        for fd in fds:
            os.close(fd)
    assert (dst / "new").read_text() == "new"
    assert (dst / "d" / "f").read_text() == "src f"
    assert (dst / "d" / "keep").read_text() == "keep"
    assert os.readlink(dst / "l") == "d"


@pytest.mark.parametrize(
    ("src_kind", "dst_kind", "error", "message"),
    [
        ("dir", "file", FileExists, "File already exists at path: dest/x"),
        ("file", "dir", FolderExists, "A folder exists at path: dest/x"),
        ("dir", "link", FileExists, "File already exists at path: dest/x"),
    ],
)
def test_merge_tree_conflicts_move_nothing(
    tmp_path: Path, mode: str, src_kind: str, dst_kind: str, error: type, message: str
) -> None:
    src, dst, backup = tmp_path / "src", tmp_path / "dst", tmp_path / "backup"
    for folder in (src, dst, backup):
        folder.mkdir()
    (src / "a").write_text("a")  # sorted before x: would move first without the check
    for where, kind in ((src, src_kind), (dst, dst_kind)):
        if kind == "dir":
            (where / "x").mkdir()
            (where / "x" / "in").write_text("in")
        elif kind == "file":
            (where / "x").write_text("file")
        else:
            (where / "x").symlink_to(tmp_path)
    before = snapshot(tmp_path)
    fds = [_dirfd(x) for x in (src, dst, backup)]
    try:
        with pytest.raises(error, match=f"^{message}$"):
            merge_tree(*fds, prefix="dest")
    finally:
        for fd in fds:
            os.close(fd)
    assert snapshot(tmp_path) == before


def test_private_folders_are_removed_without_following_links(tmp_path: Path) -> None:
    """Staging folders beside the volumes (backups' restore, transfers) go with their
    contents; a link among them is removed as a link, and only ``prefix…`` names go."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    parent = tmp_path / "volumes"
    parent.mkdir()
    (parent / "volume-a").mkdir()
    staging = parent / ".lightd-x-1"
    (staging / "sub").mkdir(parents=True)
    (staging / "sub" / "f").write_text("data")
    (staging / "sub" / "out").symlink_to(outside)
    (parent / ".lightd-x-2").symlink_to(outside)

    assert not remove_private_folder(parent, "volume-a", ".lightd-x-")
    assert remove_private_folder(parent, ".lightd-x-missing", ".lightd-x-")
    assert sweep_private_folders(parent, ".lightd-x-") == 2
    assert sorted(p.name for p in parent.iterdir()) == ["volume-a"]
    assert (outside / "keep.txt").read_text() == "keep"
    assert sweep_private_folders(tmp_path / "nothing-here", ".lightd-x-") == 0


def _pieces_of(data: bytes, size: int) -> Callable[[int], bytes]:
    """``read(n)`` over ``data`` in pieces of at most ``size`` bytes, ``b""`` at the end."""
    view = memoryview(data)
    offset = 0

    def read(n: int) -> bytes:
        nonlocal offset
        piece = bytes(view[offset : offset + min(n, size)])
        offset += len(piece)
        return piece

    return read


def test_tar_zst_round_trip_and_corrupt_data(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "world" / "region").mkdir(parents=True)
    (source / "world" / "region" / "r.0.0.mca").write_bytes(os.urandom(300_000))
    (source / "server.properties").write_text("motd=hi\n")
    os.symlink("server.properties", source / "link")
    out = bytearray()

    class Sink:
        def write(self, data: bytes) -> int:
            out.extend(data)
            return len(data)

    with Root.open(source) as root:
        write_tar_zst(root, Sink(), level=3, threads=2)
    assert bytes(out[:4]) == b"\x28\xb5\x2f\xfd"  # a zstd frame

    dest = tmp_path / "dest"
    dest.mkdir()
    with Root.open(dest, no_links=True) as tree:
        extract_tar(
            tree, zst_reader(_pieces_of(bytes(out), 7000)), max_total=1 << 30, max_entries=100
        )
    assert (dest / "world" / "region" / "r.0.0.mca").read_bytes() == (
        source / "world" / "region" / "r.0.0.mca"
    ).read_bytes()
    assert os.readlink(dest / "link") == "server.properties"

    # A flipped byte in stored (incompressible) data only the frame's checksum can tell.
    corrupt = bytearray(out)
    corrupt[len(corrupt) // 2] ^= 0xFF
    (tmp_path / "again").mkdir()
    read = zst_reader(_pieces_of(bytes(corrupt), 7000))

    def extract_and_drain() -> None:
        with Root.open(tmp_path / "again", no_links=True) as tree:
            extract_tar(tree, read, max_total=1 << 30, max_entries=100)
        while read(CHUNK):  # past the tar's end: the frame's end and its checksum
            pass

    with pytest.raises(BadArchive) as caught:
        extract_and_drain()
    assert str(caught.value) == "Invalid archive: corrupt or unreadable data"
