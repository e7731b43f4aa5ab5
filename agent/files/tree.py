"""Tree operations on folder descriptors: walk, copy, merge (all or nothing), remove.

Everything here starts from descriptors a ``Root`` has already resolved beneath the
volume root and acts on names inside them with ``*at`` calls, never following a link: a
link is walked as a link, copied as a link, moved as a link. Entries that vanish or are
swapped for something else while we work are skipped, not followed. Raw ``OSError``\\ s
pass through unless said otherwise; ``checkpoint()`` is called between entries (it
raises to stop early; what was half-built is cleaned up).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from functools import partial
from operator import attrgetter
from typing import NamedTuple

import attrs

from .errors import FileError, FileExists, FolderExists, InvalidPath
from .resolve import DIR, link_target_at, lstat_at, open_regular_at, rename_noreplace

__all__ = [
    "CHUNK",
    "MAX_DEPTH",
    "TEMP_PREFIX",
    "Owner",
    "ScanEntry",
    "WalkEntry",
    "chown_at",
    "chown_fd",
    "copy_data",
    "copy_entry",
    "enter_dir",
    "fsync_dir",
    "kind_of",
    "merge_tree",
    "noop",
    "open_entry",
    "remove_at",
    "scan_below",
    "walk_below",
]

log = logging.getLogger(__name__)

#: Names of the agent's temporary files and folders inside a volume.
TEMP_PREFIX = ".lightd-tmp-"
#: Deepest folder tree a copy, walk or archive handles (each level holds a descriptor).
MAX_DEPTH = 256
#: Buffer size of file reads and writes.
CHUNK = 1 << 20


#: ``(uid, gid)`` that files the API creates belong to (config ``containers.user``).
Owner = tuple[int, int]


def chown_fd(fd: int, owner: Owner) -> None:
    """Give an open file or folder to ``owner``. An agent not run as root cannot give
    files away: it keeps them (logged once), as it did before ``containers.user``."""
    try:
        os.fchown(fd, *owner)
    except PermissionError:
        _cannot_chown()


def chown_at(dir_fd: int, name: str, owner: Owner) -> None:
    """``chown_fd`` for a name in a folder; a link is changed itself, never followed."""
    try:
        os.chown(name, *owner, dir_fd=dir_fd, follow_symlinks=False)
    except PermissionError:
        _cannot_chown()


_warned: list[bool] = []


def _cannot_chown() -> None:
    if not _warned:
        _warned.append(True)
        log.warning("cannot change owners (the agent is not root): containers.user is ignored")


def noop() -> None:
    """The default ``checkpoint``: never stops."""
    return None


def kind_of(mode: int) -> str:
    """``directory``, ``symlink``, ``file`` or ``other`` for an ``st_mode``."""
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


# --- walking -----------------------------------------------------------------------------


@attrs.frozen
class WalkEntry:
    """One entry of ``Root.walk``: ``path`` joins names from the root with ``/``;
    ``dir_fd`` is the folder holding it, valid until the walk moves on."""

    path: str
    kind: str
    stat: os.stat_result
    dir_fd: int
    name: str


def enter_dir(dir_fd: int, name: str) -> int | None:
    """Open the folder ``name`` to walk it; ``None`` if it was replaced meanwhile (gone,
    no longer a folder, or a link now: nothing to enter)."""
    try:
        return os.open(name, DIR | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _names_or_close(dir_fd: int) -> Iterator[str]:
    """The sorted names in an open folder; the descriptor is closed if listing fails."""
    try:
        return iter(sorted(os.listdir(dir_fd)))
    except BaseException:
        os.close(dir_fd)
        raise


def walk_below(
    top_fd: int,
    prefix: str,
    *,
    skip: Callable[[os.stat_result], bool],
    checkpoint: Callable[[], None],
    error: Callable[[OSError], FileError],
    prune: Callable[[str], bool] | None = None,
) -> Iterator[WalkEntry]:
    """Every entry below the open folder ``top_fd`` (closed when the walk ends), parents
    before children, names sorted; ``prefix`` is the folder's path (``""``: the root).

    Links are reported, never followed; a folder swapped for a link while we walk is
    reported as found, not entered. ``skip(stat)`` drops an entry and its subtree, and so
    does ``prune(path)`` (a backup's ``ignore`` globs). An
    ``OSError`` entering a folder becomes ``error(exc)``; a tree deeper than ``MAX_DEPTH``
    is ``InvalidPath("folder tree too deep")``.
    """
    stack: list[tuple[int, str, Iterator[str]]] = [(top_fd, prefix, _names_or_close(top_fd))]
    try:
        while stack:
            checkpoint()
            dir_fd, prefix, names = stack[-1]
            child = next(names, None)
            if child is None:
                os.close(stack.pop()[0])
                continue
            st = lstat_at(dir_fd, child)
            if st is None or skip(st):
                continue
            path = f"{prefix}/{child}" if prefix else child
            if prune is not None and prune(path):
                continue
            entry = WalkEntry(path, kind_of(st.st_mode), st, dir_fd, child)
            yield entry
            if entry.kind != "directory":
                continue
            if len(stack) >= MAX_DEPTH:
                raise InvalidPath("folder tree too deep", code="tree_too_deep")
            try:
                fd = enter_dir(dir_fd, child)
            except OSError as exc:
                raise error(exc) from None
            if fd is not None:
                stack.append((fd, path, _names_or_close(fd)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


class ScanEntry(NamedTuple):
    """One entry of ``Root.scan``: like ``WalkEntry`` but without a ``stat``, and cheap to
    make (a scan of a big tree makes one system call per folder, not one per entry): the
    kind comes from the folder listing itself (``d_type``), ``path`` and ``stat()`` are
    worked out when asked. ``dir_fd`` is valid until the scan moves on."""

    prefix: str
    dir_fd: int
    dirent: os.DirEntry[str]

    @property
    def name(self) -> str:
        return self.dirent.name

    @property
    def path(self) -> str:
        return f"{self.prefix}/{self.dirent.name}" if self.prefix else self.dirent.name

    @property
    def kind(self) -> str:
        """``directory``, ``symlink``, ``file`` or ``other`` (``other`` too if it is gone)."""
        try:
            if self.dirent.is_symlink():
                return "symlink"
            if self.dirent.is_dir(follow_symlinks=False):
                return "directory"
            if self.dirent.is_file(follow_symlinks=False):
                return "file"
        except FileNotFoundError:
            pass
        return "other"

    def stat(self) -> os.stat_result | None:
        """``lstat`` of the entry now (``None`` if it is gone)."""
        return lstat_at(self.dir_fd, self.dirent.name)


_by_name = attrgetter("name")


def _dirents_or_close(dir_fd: int) -> Iterator[os.DirEntry[str]]:
    """The entries of an open folder, sorted by name; the descriptor is closed if
    listing fails."""
    try:
        with os.scandir(dir_fd) as it:
            found = sorted(it, key=_by_name)
        return iter(found)
    except BaseException:
        os.close(dir_fd)
        raise


def _is_dir(dirent: os.DirEntry[str]) -> bool:
    try:
        return dirent.is_dir(follow_symlinks=False)
    except FileNotFoundError:
        return False


def scan_below(
    top_fd: int,
    prefix: str,
    *,
    checkpoint: Callable[[], None],
    error: Callable[[OSError], FileError],
) -> Iterator[ScanEntry]:
    """``walk_below`` without a ``stat`` per entry (for searches and usage over big
    trees): every entry below the open folder ``top_fd`` (closed when the scan ends),
    parents before children, names sorted. Links are reported, never followed; a folder
    swapped for a link meanwhile is reported, not entered (``enter_dir`` refuses links)."""
    stack: list[tuple[int, str, Iterator[os.DirEntry[str]]]] = [
        (top_fd, prefix, _dirents_or_close(top_fd))
    ]
    try:
        while stack:
            dir_fd, prefix, entries = stack[-1]
            for dirent in entries:
                yield ScanEntry(prefix, dir_fd, dirent)
                if _is_dir(dirent):
                    break
            else:
                os.close(stack.pop()[0])
                checkpoint()
                continue
            if len(stack) >= MAX_DEPTH:
                raise InvalidPath("folder tree too deep", code="tree_too_deep")
            try:
                fd = enter_dir(dir_fd, dirent.name)
            except OSError as exc:
                raise error(exc) from None
            if fd is not None:
                path = f"{prefix}/{dirent.name}" if prefix else dirent.name
                stack.append((fd, path, _dirents_or_close(fd)))
    finally:
        for fd, _, _ in stack:
            os.close(fd)


def open_entry(entry: WalkEntry) -> int | None:
    """A blocking read descriptor of a walked regular file (``None`` if it is no longer
    one: gone, swapped for a link, a FIFO or a device node; those are never opened)."""
    return open_regular_at(entry.dir_fd, entry.name)


# --- copying -----------------------------------------------------------------------------


def copy_data(
    src: int,
    dst: int,
    checkpoint: Callable[[], None] = noop,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy a whole file between descriptors (``copy_file_range``, else read/write);
    ``progress(n)`` is told of each piece copied (a job's byte count)."""
    total = 0
    use_range = True
    while True:
        checkpoint()
        if use_range:
            try:
                n = os.copy_file_range(src, dst, 8 * CHUNK)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                use_range = False
                continue
        else:
            data = os.read(src, CHUNK)
            n = len(data)
            view = memoryview(data)
            while view:
                view = view[os.write(dst, view) :]
        if n == 0:
            return total
        total += n
        if progress is not None:
            progress(n)


def copy_entry(
    src_dir: int,
    name: str,
    st: os.stat_result,
    dst_dir: int,
    dst_name: str,
    skip: set[tuple[int, int]],
    depth: int,
    checkpoint: Callable[[], None],
    *,
    owner: Owner | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Copy one entry (recursively for folders) between two folder descriptors; folders
    whose ``(st_dev, st_ino)`` is in ``skip`` are not entered (the copy being built is
    added to it, so a copy into the source never copies itself). Every entry made
    belongs to ``owner`` (``None``: the agent)."""
    checkpoint()
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        target = link_target_at(src_dir, name)
        if target is not None:
            os.symlink(target, dst_name, dir_fd=dst_dir)
            if owner is not None:
                chown_at(dst_dir, dst_name, owner)
    elif stat.S_ISREG(mode):
        src_fd = open_regular_at(src_dir, name)
        if src_fd is None:
            return  # gone, or swapped for a link, FIFO or device node while we copied
        src = src_fd
        try:
            dst = os.open(
                dst_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_dir,
            )
            try:
                if owner is not None:
                    chown_fd(dst, owner)
                copy_data(src, dst, checkpoint, progress)
                os.fchmod(dst, stat.S_IMODE(mode) & 0o777)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    elif stat.S_ISDIR(mode):
        if depth >= MAX_DEPTH:
            raise InvalidPath("folder tree too deep", code="tree_too_deep")
        try:
            src = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=src_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return
            raise
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            dst = os.open(dst_name, DIR | os.O_NOFOLLOW, dir_fd=dst_dir)
            try:
                if owner is not None:
                    chown_fd(dst, owner)
                dst_st = os.fstat(dst)
                skip.add((dst_st.st_dev, dst_st.st_ino))
                src_st = os.fstat(src)
                if (src_st.st_dev, src_st.st_ino) not in skip:
                    for child in sorted(os.listdir(src)):
                        child_st = lstat_at(src, child)
                        if child_st is None or (child_st.st_dev, child_st.st_ino) in skip:
                            continue
                        copy_entry(
                            src,
                            child,
                            child_st,
                            dst,
                            child,
                            skip,
                            depth + 1,
                            checkpoint,
                            owner=owner,
                            progress=progress,
                        )
                os.fchmod(dst, stat.S_IMODE(mode) & 0o777)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    # sockets, FIFOs and device nodes are not copied: they are not data


# --- merging (archive extraction) --------------------------------------------------------


def merge_tree(
    src_fd: int,
    dst_fd: int,
    backup_fd: int,
    *,
    prefix: str = "",
    checkpoint: Callable[[], None] = noop,
) -> None:
    """Move everything in folder ``src_fd`` into folder ``dst_fd``, all or nothing.

    Names new to the destination are renamed in; folders on both sides are merged;
    other entries present on both sides are replaced, the old one parked in
    ``backup_fd``. A folder against a non-folder is a ``FileExists``/``FolderExists``
    found before anything moves. If a move fails midway (a race, a full disk,
    cancellation), every move already made is undone in reverse order. ``prefix`` is the
    destination's client path, for messages.
    """
    opened: list[int] = []
    try:
        _merge(src_fd, dst_fd, backup_fd, prefix, None, opened, checkpoint)  # check only
    finally:
        for fd in opened:
            os.close(fd)
    journal: list[Callable[[], None]] = []
    opened = []
    try:
        _merge(src_fd, dst_fd, backup_fd, prefix, journal, opened, checkpoint)
    except BaseException:
        for undo in reversed(journal):
            try:
                undo()
            except OSError as exc:
                log.error("could not undo a move while rolling back an extraction: %s", exc)
        raise
    finally:
        for fd in opened:
            os.close(fd)


def _merge(
    src: int,
    dst: int,
    backup: int,
    prefix: str,
    journal: list[Callable[[], None]] | None,
    opened: list[int],
    checkpoint: Callable[[], None],
) -> None:
    for name in sorted(os.listdir(src)):
        checkpoint()
        shown = f"{prefix}/{name}" if prefix not in ("", ".") else name
        new = lstat_at(src, name)
        if new is None:
            continue
        old = lstat_at(dst, name)
        if old is not None and stat.S_ISDIR(new.st_mode) != stat.S_ISDIR(old.st_mode):
            raise (FileExists if stat.S_ISDIR(new.st_mode) else FolderExists)(shown)
        if old is not None and stat.S_ISDIR(new.st_mode):
            sub_src = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=src)
            opened.append(sub_src)
            sub_dst = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=dst)
            opened.append(sub_dst)
            _merge(sub_src, sub_dst, backup, shown, journal, opened, checkpoint)
            if journal is None:
                os.close(opened.pop())
                os.close(opened.pop())
            continue
        if journal is None:
            continue
        if old is not None:
            parked = f"{len(journal)}-{secrets.token_hex(4)}"
            rename_noreplace(dst, name, backup, parked)
            journal.append(partial(rename_noreplace, backup, parked, dst, name))
        try:
            rename_noreplace(src, name, dst, name)
        except FileExistsError:
            raise FileExists(shown) from None
        journal.append(partial(rename_noreplace, dst, name, src, name))


# --- small helpers -----------------------------------------------------------------------


def fsync_dir(dir_fd: int) -> None:
    """fsync a folder (given by any descriptor of it, ``O_PATH`` included)."""
    fd = os.open(".", DIR, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_at(dir_fd: int, name: str) -> None:
    """Best-effort removal of our own temporary file or tree (no link followed)."""
    try:
        st = lstat_at(dir_fd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        log.warning("could not remove temporary %s: %s", name, exc)
