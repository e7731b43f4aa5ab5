"""The file manager's blocking work, run in worker threads; everything through ``Root``.

Each function opens the volume root itself (``Root.open_volume``) and resolves every
client path beneath it, so a link planted or swapped in the volume can never lead a read,
write, delete, rename, chmod or listing outside it (``lightd.files``). ``checkpoint()``
raises once the request is cancelled (client gone, agent stopping).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypedDict

from lightd.files import (
    ROOT,
    AtomicFile,
    FileError,
    FileExists,
    InvalidPath,
    NotAFile,
    Owner,
    PathNotFound,
    RelPath,
    Root,
    Usage,
)

__all__ = [
    "MAX_CONTENT_SEARCH_BYTES",
    "Found",
    "Upload",
    "chmod",
    "delete",
    "open_read",
    "parse_mode",
    "rename",
    "search",
    "usage",
]

#: Files larger than this are not searched by content (contract §13).
MAX_CONTENT_SEARCH_BYTES = 1 << 20

_MODE = re.compile(r"0?[0-7]{1,3}")


def parse_mode(value: object) -> int | None:
    """Octal permission bits ``0`` to ``777`` (a leading ``0`` allowed), else ``None``."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _MODE.fullmatch(text):
        return None
    return int(text, 8)


# --- reading -------------------------------------------------------------------------------


def open_read(folder: Path, rel: RelPath, *, checkpoint: Callable[[], None]) -> tuple[int, int]:
    """A read descriptor of the regular file at ``rel`` and its size (``NotAFile`` for a
    folder or anything else, ``PathNotFound``); the caller closes it."""
    with Root.open_volume(folder) as root:
        fd = root.open_read_fd(rel)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


def read_chunk(fd: int, offset: int, size: int) -> bytes:
    return os.pread(fd, size, offset)


#: ``preadv2`` flag: copy only what the page cache holds, never wait for the disk.
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


def read_cached(fd: int, buffer: memoryview, offset: int) -> int | None:
    """Read into ``buffer`` what the page cache already holds from ``offset`` (``preadv2``
    with ``RWF_NOWAIT``: it never waits for the disk or a lock, so the event loop may call
    it), the count read; ``None`` when nothing is cached there (or the file system cannot
    tell): read in a worker thread instead."""
    if not _NOWAIT:
        return None
    try:
        got = os.preadv(fd, [buffer], offset, _NOWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as error:
        if error.errno in (errno.EOPNOTSUPP, errno.EINVAL):
            return None  # no RWF_NOWAIT for this file system
        raise
    return got or None  # 0: the end of the file (truncated), or nothing: the thread tells


def usage(folder: Path, *, checkpoint: Callable[[], None]) -> Usage:
    with Root.open_volume(folder) as root:
        return root.usage(checkpoint=checkpoint)


# --- uploading -----------------------------------------------------------------------------


#: Buffers one ``writev`` takes at most.
_IOV_MAX = os.sysconf("SC_IOV_MAX")


class Upload:
    """A file being uploaded: a temporary file beside ``rel`` (``Root.atomic``), renamed
    over it by ``commit``; ``abort`` (or any failure) removes it and the folders made for
    it. The steps run in separate worker-thread calls, one per chunk."""

    def __init__(self, folder: Path, rel: RelPath, owner: Owner | None, fsync: bool) -> None:
        self._root = Root.open_volume(folder, owner=owner)
        try:
            self._cm = self._root.atomic(rel, replace=True, fsync=fsync)
            self._out: AtomicFile = self._cm.__enter__()
        except BaseException:
            self._root.close()
            raise
        self._fd = self._out.file.fileno()
        self._rel = rel
        self.size = 0
        #: Bytes of the file the upload replaced (known after ``commit``).
        self.replaced = 0

    def write(self, chunks: Sequence[bytes]) -> None:
        """Append ``chunks``: one ``writev`` for a batch (more if the disk takes less)."""
        pending: list[bytes | memoryview] = list(chunks)
        first = 0
        while first < len(pending):
            written = os.writev(self._fd, pending[first : first + _IOV_MAX])
            self.size += written
            while first < len(pending) and written >= len(pending[first]):
                written -= len(pending[first])
                first += 1
            if written:  # a chunk written in part: the rest of it next
                pending[first] = memoryview(pending[first])[written:]

    def commit(self) -> int:
        try:
            with contextlib.suppress(FileError):  # what the new file replaces (disk budget)
                st = self._root.stat(self._rel)
                if stat.S_ISREG(st.st_mode):
                    self.replaced = st.st_size
            self._cm.__exit__(None, None, None)
        finally:
            self._root.close()
        return self._out.size

    def abort(self) -> None:
        exc = InvalidPath("upload aborted")
        try:
            with contextlib.suppress(InvalidPath):
                self._cm.__exit__(type(exc), exc, None)
        finally:
            self._root.close()


# --- delete, rename, chmod -----------------------------------------------------------------


def _require(root: Root, rel: RelPath) -> None:
    if not root.exists(rel):
        raise PathNotFound(rel.text)


def delete(folder: Path, paths: Sequence[RelPath], *, checkpoint: Callable[[], None]) -> int:
    """Remove every path (folders with their contents, links as links), after checking
    that each one exists; a missing one fails the request before anything goes."""
    with Root.open_volume(folder) as root:
        for rel in paths:
            _require(root, rel)
        removed: set[tuple[str, ...]] = set()
        for rel in paths:
            checkpoint()
            if any(rel.parts[: len(p)] == p for p in removed):
                continue  # inside a folder already removed, or named twice
            root.remove(rel)
            removed.add(rel.parts)
        return len(paths)


def _moved(pairs: Sequence[tuple[RelPath, RelPath]], path: RelPath) -> RelPath | None:
    """Where ``path`` was before the renames ``pairs`` (applied in order), or ``None``
    when they leave nothing there (it was moved away); lexical, no I/O."""
    for src, dst in reversed(pairs):
        if path.is_within(dst):
            parts = src.parts + path.parts[len(dst.parts) :]
            path = RelPath(parts, "/".join(parts))
        elif path.is_within(src):
            return None
    return path


def rename(
    folder: Path,
    renames: Sequence[tuple[RelPath, RelPath]],
    owner: Owner | None,
    *,
    checkpoint: Callable[[], None],
) -> int:
    """Move each ``(from, to)`` in order, after checking the whole batch as if the earlier
    moves were done: a missing source (404), an existing target (409) or a folder moved
    into itself (400) fails the request before anything moves."""
    with Root.open_volume(folder, owner=owner) as root:

        def present(rel: RelPath, done: Sequence[tuple[RelPath, RelPath]]) -> bool:
            before = _moved(done, rel)
            return before is not None and root.exists(before)

        for index, (src, dst) in enumerate(renames):
            done = renames[:index]
            if not src.parts:
                raise InvalidPath("cannot move the volume root", code="root_path")
            if not present(src, done):
                raise PathNotFound(src.text)
            if not dst.parts or present(dst, done):
                raise FileExists(dst.text)
            if dst.is_within(src):
                raise InvalidPath("cannot move a folder into itself", code="into_itself")
        for src, dst in renames:
            checkpoint()
            root.rename(src, dst)
        return len(renames)


def chmod(
    folder: Path, changes: Sequence[tuple[RelPath, int]], *, checkpoint: Callable[[], None]
) -> int:
    """Set the permission bits of each file or folder (a link, or a FIFO, device or
    socket, is ``NotAFile``: never followed); every path is checked before any change."""
    with Root.open_volume(folder) as root:
        for rel, _ in changes:
            kind = stat.S_IFMT(root.stat(rel, follow=False).st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise NotAFile(rel.text)
        for rel, mode in changes:
            checkpoint()
            root.chmod(rel, mode, follow=False)
        return len(changes)


# --- search --------------------------------------------------------------------------------


class Found(TypedDict, total=False):
    """One search result: ``type`` is ``file``, ``directory`` or ``symlink``; ``size`` in
    bytes (0 for folders); ``line`` (1-based) is the first line holding ``q`` when the
    search is by content."""

    path: str
    type: str
    size: int
    line: int


def _first_line(data: bytes, needle: bytes, folded: str) -> int | None:
    """The 1-based line of the first case-insensitive match in text ``data``, else
    ``None``; binary data (a NUL byte) never matches."""
    if b"\0" in data:
        return None
    if needle:  # an ASCII query: bytes.lower() folds exactly what it needs
        index = data.lower().find(needle)
        return None if index < 0 else data.count(b"\n", 0, index) + 1
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if folded in line.casefold():
            return number
    return None


def _content_line(dir_fd: int, name: str, needle: bytes, folded: str) -> int | None:
    fh = Root.open_regular_in(dir_fd, name)
    if fh is None:
        return None  # gone, or no longer a regular file: never opened
    with fh:
        if os.fstat(fh.fileno()).st_size > MAX_CONTENT_SEARCH_BYTES:
            return None
        data = fh.read(MAX_CONTENT_SEARCH_BYTES + 1)
    if len(data) > MAX_CONTENT_SEARCH_BYTES:
        return None
    return _first_line(data, needle, folded)


def search(
    folder: Path,
    base: RelPath,
    query: str,
    content: bool,
    limit: int,
    *,
    checkpoint: Callable[[], None],
) -> tuple[list[Found], bool]:
    """Entries below ``base`` whose name holds ``query`` (case-insensitive), and with
    ``content`` regular text files up to 1 MiB holding it; at most ``limit`` (and whether
    more were left out). Links are listed, never followed or read."""
    folded = query.casefold()
    needle = query.lower().encode() if query.isascii() else b""
    results: list[Found] = []
    with Root.open_volume(folder) as root:
        for entry in root.scan(base if base.parts else ROOT, checkpoint=checkpoint):
            name = entry.dirent.name
            by_name = folded in name.casefold()
            line = None
            if content and entry.dirent.is_file(follow_symlinks=False):
                line = _content_line(entry.dir_fd, name, needle, folded)
            if not by_name and line is None:
                continue
            if len(results) >= limit:
                return results, True
            st = entry.stat()
            if st is None:
                continue  # gone meanwhile
            kind = "file" if entry.kind == "other" else entry.kind
            found: Found = {
                "path": entry.path,
                "type": kind,
                "size": 0 if kind == "directory" else st.st_size,
            }
            if line is not None:
                found["line"] = line
            results.append(found)
    return results, False
