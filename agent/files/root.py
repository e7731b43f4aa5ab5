"""The volume root object: an open folder under which every path is resolved.

A ``Root`` holds a descriptor of a trusted host folder (a volume's, from the registry)
and does every file operation of the API relative to it: resolution goes through
``resolve`` (``openat2`` beneath the root, or the ``O_NOFOLLOW`` walk), then mutations act
on one name inside an already resolved parent descriptor (``*at`` calls, never following
the last link), so a link swapped in at the last moment is replaced or refused, never
followed. Writes go to a temporary name beside the target and are renamed into place.
Raw ``OSError``\\ s become file errors (``errors.from_os_error``) whose messages name only
the client's relative path. Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import BinaryIO

import attrs

from .errors import (
    FileError,
    FileExists,
    FolderExists,
    InvalidPath,
    NotAFile,
    NotAFolder,
    PathNotFound,
    VolumeNotFound,
    from_os_error,
)
from .paths import ROOT, RelPath
from .resolve import (
    DIR,
    DIR_PATH,
    link_target_at,
    locate,
    lstat_at,
    open_beneath,
    open_regular,
    open_regular_at,
    rename_noreplace,
)
from .tree import (
    CHUNK,
    TEMP_PREFIX,
    Owner,
    ScanEntry,
    WalkEntry,
    chown_at,
    chown_fd,
    copy_entry,
    enter_dir,
    fsync_dir,
    kind_of,
    noop,
    open_entry,
    remove_at,
    scan_below,
    walk_below,
)

__all__ = [
    "AtomicFile",
    "DirEntry",
    "Root",
    "Usage",
    "remove_private_folder",
    "sweep_private_folders",
]

log = logging.getLogger(__name__)


@attrs.frozen
class DirEntry:
    """One entry of a folder listing; ``kind`` is ``file``, ``directory`` or ``symlink``."""

    name: str
    kind: str
    size: int
    modified: int
    mode: int


@attrs.frozen
class Usage:
    """What a tree holds: ``bytes`` of its regular files and how many ``files`` (every
    entry that is not a folder: files, links, others)."""

    bytes: int
    files: int


class AtomicFile:
    """A new file written under a temporary name beside its target (see ``Root.atomic``)."""

    def __init__(self, dir_fd: int, tmp: str, fd: int) -> None:
        self.dir_fd = dir_fd
        self.tmp = tmp
        self.file: BinaryIO = os.fdopen(fd, "wb", buffering=CHUNK)
        st = os.fstat(fd)
        #: ``(st_dev, st_ino)``: walks skip it, so an archive never contains itself.
        self.identity = (st.st_dev, st.st_ino)
        self.size = 0


class Root:
    """An open folder (a volume root) under which every path of this object is resolved.

    ``no_links=True`` refuses to go through any link at all (``RESOLVE_NO_SYMLINKS``):
    archives are extracted into such a root, so a link planted by one archive entry can
    never redirect a later one.

    ``owner`` (``(uid, gid)``, config ``containers.user``) owns every file, folder and link
    this object creates, so a game server running as that user can change them; ``None``
    keeps the agent's own (a replaced file always keeps its owner).
    """

    def __init__(
        self,
        fd: int,
        *,
        no_links: bool = False,
        owned: bool = True,
        owner: Owner | None = None,
    ) -> None:
        self.fd = fd
        self.no_links = no_links
        self.owner = owner
        self._owned = owned

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, no_links: bool = False, owner: Owner | None = None
    ) -> Root:
        """Open a trusted host folder (from config); its last component is not followed."""
        return cls(os.open(path, DIR | os.O_NOFOLLOW), no_links=no_links, owner=owner)

    @classmethod
    def open_volume(cls, folder: str | os.PathLike[str], *, owner: Owner | None = None) -> Root:
        """``open`` for a registered volume's folder: ``VolumeNotFound`` if it vanished."""
        try:
            return cls.open(folder, owner=owner)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                log.warning("volume folder %s is missing or not a folder", folder)
                raise VolumeNotFound() from None
            raise

    @classmethod
    def open_at(
        cls, dir_fd: int, name: str, *, no_links: bool = False, owner: Owner | None = None
    ) -> Root:
        fd = os.open(name, DIR | os.O_NOFOLLOW, dir_fd=dir_fd)
        return cls(fd, no_links=no_links, owner=owner)

    def _own_at(self, dir_fd: int, name: str) -> None:
        """Give a name this object just created to ``owner`` (the name itself: a link
        swapped in meanwhile is changed, never what it points to)."""
        if self.owner is not None:
            chown_at(dir_fd, name, self.owner)

    def close(self) -> None:
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- resolution --------------------------------------------------------------------

    def open_fd(
        self, parts: Sequence[str], flags: int, mode: int = 0, *, follow_last: bool = True
    ) -> int:
        """Open ``parts`` beneath the root (raw ``OSError``; ``EXDEV`` means escape)."""
        return open_beneath(
            self.fd, parts, flags, mode, follow_last=follow_last, no_links=self.no_links
        )

    def _locate(self, parts: Sequence[str], *, follow_last: bool) -> tuple[int, str | None]:
        """The resolved parent folder and the final name (see ``resolve.locate``)."""
        return locate(self.fd, parts, follow_last=follow_last, no_links=self.no_links)

    def _error(self, exc: OSError, rel: RelPath) -> FileError:
        """The file error for an OS error met while resolving or acting on ``rel``."""
        return from_os_error(exc, rel.text, no_links=self.no_links)

    @contextlib.contextmanager
    def _errors(self, rel: RelPath) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise self._error(exc, rel) from None

    # --- reading -----------------------------------------------------------------------

    def stat(self, rel: RelPath, *, follow: bool = True) -> os.stat_result:
        with self._errors(rel):
            fd = self.open_fd(rel.parts, os.O_PATH, follow_last=follow)
            try:
                return os.fstat(fd)
            finally:
                os.close(fd)

    def exists(self, rel: RelPath) -> bool:
        """Whether something (even a dangling link) is at ``rel``; no link is followed."""
        try:
            self.stat(rel, follow=False)
        except PathNotFound:
            return False
        return True

    def open_dir(self, rel: RelPath) -> int:
        """A readable descriptor of the folder at ``rel`` (in-volume links followed)."""
        with self._errors(rel):
            try:
                return self.open_fd(rel.parts, DIR)
            except NotADirectoryError:
                # the last component is not a folder (the walk is the same either way)
                if self._is_last_not_dir(rel):
                    raise NotAFolder(rel.text) from None
                raise

    def _is_last_not_dir(self, rel: RelPath) -> bool:
        try:
            return not stat.S_ISDIR(self.stat(rel).st_mode)
        except FileError:
            return False

    def list_dir(self, rel: RelPath) -> list[DirEntry]:
        """The folder's entries, folders first then by name; links are not followed."""
        fd = self.open_dir(rel)
        entries: list[DirEntry] = []
        try:
            with self._errors(rel), os.scandir(fd) as it:
                for item in it:
                    try:
                        st = item.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    kind = kind_of(st.st_mode)
                    entries.append(
                        DirEntry(
                            name=item.name,
                            kind="file" if kind == "other" else kind,
                            size=0 if kind == "directory" else st.st_size,
                            modified=int(st.st_mtime),
                            mode=stat.S_IMODE(st.st_mode),
                        )
                    )
        finally:
            os.close(fd)
        entries.sort(key=lambda e: (e.kind != "directory", e.name))
        return entries

    def open_file(self, rel: RelPath) -> BinaryIO:
        """Open a regular file for reading (in-volume links followed). Anything else is
        ``NotAFile`` and is never opened (a FIFO would block, a device might act)."""
        with self._errors(rel):
            fd = open_regular(self.fd, rel.parts, no_links=self.no_links)
        if fd is None:
            raise NotAFile(rel.text)
        try:
            return os.fdopen(fd, "rb", buffering=CHUNK)
        except BaseException:
            os.close(fd)
            raise

    def open_read_fd(self, rel: RelPath) -> int:
        """``open_file`` as a raw blocking descriptor (for streaming with ``os.pread``):
        a regular file only, in-volume links followed, ``NotAFile`` for anything else."""
        with self._errors(rel):
            fd = open_regular(self.fd, rel.parts, no_links=self.no_links)
        if fd is None:
            raise NotAFile(rel.text)
        return fd

    def read_bytes(self, rel: RelPath) -> bytes:
        with self.open_file(rel) as fh:
            return fh.read()

    # --- writing -----------------------------------------------------------------------

    def make_dirs(self, rel: RelPath, *, report: RelPath | None = None) -> list[RelPath]:
        """``mkdir -p`` beneath the root; an in-volume link to a folder counts as one.
        A file (or dangling link) in the way is ``FileExists`` naming ``report`` (default
        ``rel``). Returns the folders it created, outermost first (for ``remove_created``)."""
        report = report or rel
        created: list[RelPath] = []
        for depth in range(1, len(rel.parts) + 1):
            prefix = rel.parts[:depth]
            with self._errors(report):
                try:
                    os.close(self.open_fd(prefix, DIR_PATH))
                    continue
                except NotADirectoryError:
                    raise FileExists(report.text) from None
                except FileNotFoundError:
                    pass
                parent_fd, name = self._locate(prefix, follow_last=False)
                assert name is not None
                try:
                    os.mkdir(name, 0o755, dir_fd=parent_fd)
                    created.append(RelPath(prefix, "/".join(prefix)))
                    self._own_at(parent_fd, name)
                except FileExistsError:
                    try:  # created meanwhile (fine), or a dangling link (in the way)
                        os.close(self.open_fd(prefix, DIR_PATH))
                    except OSError:
                        raise FileExists(report.text) from None
                finally:
                    os.close(parent_fd)
        return created

    def remove_created(self, created: list[RelPath]) -> None:
        """Undo ``make_dirs`` after a failed operation: remove the folders it created,
        innermost first, each only if still empty (someone may have used it since)."""
        for rel in reversed(created):
            try:
                parent_fd, name = self._locate(rel.parts, follow_last=False)
            except OSError:
                return
            try:
                if name is not None:
                    os.rmdir(name, dir_fd=parent_fd)
            except OSError:
                return
            finally:
                os.close(parent_fd)

    @contextlib.contextmanager
    def atomic(
        self,
        rel: RelPath,
        *,
        replace: bool,
        mode: int = 0o644,
        keep_mode: bool = True,
        fsync: bool = False,
        temp_name: str | None = None,
    ) -> Iterator[AtomicFile]:
        """Create the file at ``rel`` through a temporary name in the same folder; it
        appears, complete, when the block ends without error, else it never appears.

        ``replace=True`` (a write) follows an in-volume link at ``rel`` and replaces the
        file it names, keeping that file's mode when ``keep_mode``. ``replace=False``
        (a new archive) refuses anything already at ``rel``, even a dangling link
        (``FileExists``), checked again atomically at the rename. ``temp_name`` (a
        ``TEMP_PREFIX`` name) is the temporary name to use (a job records it beforehand).
        """
        if not rel.parts:
            raise FolderExists(rel.text)
        created = self.make_dirs(rel.parent, report=rel)
        committed = False
        try:
            with self._errors(rel):
                parent_fd, name = self._locate(rel.parts, follow_last=replace)
        except BaseException:
            self.remove_created(created)
            raise
        try:
            if name is None:
                raise FolderExists(rel.text)
            with self._errors(rel):
                existing = lstat_at(parent_fd, name)
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode):
                    raise FolderExists(rel.text)
                if not replace:
                    raise FileExists(rel.text)
                if keep_mode and stat.S_ISREG(existing.st_mode):
                    mode = stat.S_IMODE(existing.st_mode)
            # Never setuid/setgid/sticky from an API write; the file belongs to whoever
            # owned the one it replaces, else to ``owner`` (containers.user), else to its
            # folder's owner: a server running as a non-root user can still use it.
            mode &= 0o777
            if existing is not None:
                uid, gid = existing.st_uid, existing.st_gid
            elif self.owner is not None:
                uid, gid = self.owner
            else:
                parent = os.fstat(parent_fd)
                uid, gid = parent.st_uid, parent.st_gid
            tmp = temp_name or TEMP_PREFIX + secrets.token_hex(8)
            with self._errors(rel):
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=parent_fd,
                )
            out = AtomicFile(parent_fd, tmp, fd)
            try:
                yield out
                with self._errors(rel):
                    out.file.flush()
                    with contextlib.suppress(PermissionError):  # an agent not run as root
                        os.fchown(fd, uid, gid)
                    os.fchmod(fd, mode)
                    if fsync:
                        os.fsync(fd)
                    out.size = os.fstat(fd).st_size
                    out.file.close()
                    try:
                        if replace:
                            os.rename(tmp, name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
                        else:
                            rename_noreplace(parent_fd, tmp, parent_fd, name)
                    except FileExistsError:
                        raise FileExists(rel.text) from None
                    except (IsADirectoryError, OSError) as exc:
                        if exc.errno in (errno.EISDIR, errno.ENOTEMPTY):
                            raise FolderExists(rel.text) from None
                        raise
                    committed = True
                    if fsync:
                        fsync_dir(parent_fd)
            finally:
                if not out.file.closed:
                    out.file.close()
                if not committed:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)
            if not committed:
                self.remove_created(created)

    def write_file(self, rel: RelPath, data: bytes, *, fsync: bool = False) -> None:
        """Create or atomically replace the file at ``rel`` (parents created)."""
        with self.atomic(rel, replace=True, fsync=fsync) as out, self._errors(rel):
            out.file.write(data)

    def copy(
        self,
        source: RelPath,
        destination: RelPath,
        *,
        checkpoint: Callable[[], None] = noop,
        progress: Callable[[int], None] | None = None,
        temp_name: str | None = None,
    ) -> None:
        """Copy a file, link or folder tree to a new path; links are copied as links.

        The copy is built under a temporary name beside the destination and renamed into
        place, so it appears whole or not at all. A destination inside the source is fine:
        the copy being built is skipped by identity, so it never copies itself.
        ``progress(n)`` is told of the bytes copied; ``temp_name`` (a ``TEMP_PREFIX`` name)
        is the temporary name to use, for a job that recorded it to remove after a crash.
        """
        with self._errors(source):
            src_dir, src_name = self._locate(source.parts, follow_last=False)
        try:
            src_name = src_name or "."
            with self._errors(source):
                src_st = lstat_at(src_dir, src_name)
            if src_st is None:
                raise PathNotFound(source.text)
            if kind_of(src_st.st_mode) == "other":  # FIFO, device node, socket: not data
                raise NotAFile(source.text)
            if not destination.parts:
                raise FileExists(destination.text)
            self.make_dirs(destination.parent, report=destination)
            with self._errors(destination):
                dst_dir, dst_name = self._locate(destination.parts, follow_last=False)
            try:
                if dst_name is None or lstat_at(dst_dir, dst_name) is not None:
                    raise FileExists(destination.text)
                tmp = temp_name or TEMP_PREFIX + secrets.token_hex(8)
                try:
                    with self._errors(source):
                        copy_entry(
                            src_dir,
                            src_name,
                            src_st,
                            dst_dir,
                            tmp,
                            set(),
                            0,
                            checkpoint,
                            owner=self.owner,
                            progress=progress,
                        )
                    with self._errors(destination):
                        try:
                            rename_noreplace(dst_dir, tmp, dst_dir, dst_name)
                        except FileExistsError:
                            raise FileExists(destination.text) from None
                except BaseException:
                    remove_at(dst_dir, tmp)
                    raise
            finally:
                os.close(dst_dir)
        finally:
            os.close(src_dir)

    def rename(self, source: RelPath, destination: RelPath, *, replace: bool = False) -> None:
        """Move ``source`` (a link is moved as a link) to ``destination`` (parents created);
        an existing destination is ``FileExists``/``FolderExists`` unless ``replace`` (a
        folder is never replaced)."""
        if not source.parts:
            raise InvalidPath("cannot move the volume root", code="root_path")
        if destination.is_within(source):
            raise InvalidPath("cannot move a folder into itself", code="into_itself")
        self.make_dirs(destination.parent, report=destination)
        with self._errors(source):
            src_dir, src_name = self._locate(source.parts, follow_last=False)
        try:
            with self._errors(destination):
                dst_dir, dst_name = self._locate(destination.parts, follow_last=False)
            try:
                if src_name is None or lstat_at(src_dir, src_name) is None:
                    raise PathNotFound(source.text)
                if dst_name is None:
                    raise FolderExists(destination.text)
                existing = lstat_at(dst_dir, dst_name)
                if existing is not None and (stat.S_ISDIR(existing.st_mode) or not replace):
                    raise (FolderExists if stat.S_ISDIR(existing.st_mode) else FileExists)(
                        destination.text
                    )
                with self._errors(destination):
                    if replace:
                        os.rename(src_name, dst_name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
                    else:
                        try:
                            rename_noreplace(src_dir, src_name, dst_dir, dst_name)
                        except FileExistsError:
                            raise FileExists(destination.text) from None
            finally:
                os.close(dst_dir)
        finally:
            os.close(src_dir)

    def remove(self, rel: RelPath) -> None:
        """Delete a file, a link (never its target) or a whole folder tree."""
        if not rel.parts:
            raise InvalidPath("cannot remove the volume root", code="root_path")
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        try:
            if name is None:
                raise InvalidPath("cannot remove a folder through '..'", code="root_path")
            with self._errors(rel):
                st = lstat_at(parent_fd, name)
                if st is None:
                    raise PathNotFound(rel.text)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=parent_fd)
                else:
                    os.unlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def chmod(self, rel: RelPath, mode: int, *, follow: bool = True) -> None:
        """Change permission bits of the file or folder at ``rel``. In-volume links are
        followed (``follow=False``: a link at ``rel``, or a FIFO, device or socket, is
        ``NotAFile``); the object changed is the one opened, so a link swapped in cannot
        redirect the change (``fchmod`` on a descriptor, never ``chmod`` on a name)."""
        with self._errors(rel):
            fd = self.open_fd(rel.parts, os.O_PATH, follow_last=follow)
            try:
                if not follow and kind_of(os.fstat(fd).st_mode) not in ("file", "directory"):
                    raise NotAFile(rel.text)
                # an O_PATH descriptor cannot be fchmod-ed; its /proc entry names exactly
                # the object we opened (what glibc's fchmodat fallback does)
                os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
            finally:
                os.close(fd)

    # --- building trees (archive extraction) ---------------------------------------------

    @contextlib.contextmanager
    def _cleared(self, rel: RelPath) -> Iterator[tuple[int, str]]:
        """The open parent folder of ``rel`` and its last name, with whatever non-folder
        stood there removed (never followed); inside, ``OSError`` maps as for ``rel``."""
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        try:
            if name is None:
                raise FolderExists(rel.text)
            with self._errors(rel):
                self._clear(parent_fd, name, rel)
                yield parent_fd, name
        finally:
            os.close(parent_fd)

    def create_file(self, rel: RelPath, mode: int = 0o644) -> int:
        """A new, empty file at ``rel`` opened for writing; whatever non-folder was there
        (an earlier archive entry of the same name, a link) is replaced, never followed.
        The parent folder must exist."""
        with self._cleared(rel) as (parent_fd, name):
            fd = os.open(
                name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=parent_fd,
            )
            if self.owner is not None:
                try:
                    chown_fd(fd, self.owner)
                except BaseException:
                    os.close(fd)
                    raise
            return fd

    def symlink(self, rel: RelPath, target: str) -> None:
        """Create a symlink at ``rel`` (replacing a non-folder). The target is not checked
        here: a link is only text until someone resolves it, and we resolve beneath."""
        with self._cleared(rel) as (parent_fd, name):
            os.symlink(target, name, dir_fd=parent_fd)
            self._own_at(parent_fd, name)

    def hardlink(self, target: RelPath, rel: RelPath) -> None:
        """Hard-link the regular file at ``target`` (no link followed) to ``rel``."""
        with self._errors(target):
            tdir, tname = self._locate(target.parts, follow_last=False)
        try:
            with self._errors(target):
                st = lstat_at(tdir, tname) if tname else None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise PathNotFound(target.text)
            with self._cleared(rel) as (pdir, name):
                assert tname is not None
                os.link(tname, name, src_dir_fd=tdir, dst_dir_fd=pdir, follow_symlinks=False)
        finally:
            os.close(tdir)

    def _clear(self, dir_fd: int, name: str, rel: RelPath) -> None:
        existing = lstat_at(dir_fd, name)
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode):
            raise FolderExists(rel.text)
        os.unlink(name, dir_fd=dir_fd)

    # --- walking -------------------------------------------------------------------------

    def walk(
        self,
        rel: RelPath,
        *,
        skip: Callable[[os.stat_result], bool] = lambda st: False,
        checkpoint: Callable[[], None] = noop,
        prune: Callable[[str], bool] | None = None,
    ) -> Iterator[WalkEntry]:
        """Every entry at and below ``rel``, parents before children, names sorted.

        Links are reported, never followed; a folder swapped for a link while we walk is
        reported as found, not entered. ``skip(stat)`` drops an entry (and its subtree),
        and so does ``prune(path)`` for an entry below ``rel`` (``path`` as reported).
        The root itself is not reported when ``rel`` is the root.
        """
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        below = partial(
            walk_below,
            skip=skip,
            checkpoint=checkpoint,
            error=self._error_for(rel),
            prune=prune,
        )
        try:
            if name is None:
                with self._errors(rel):
                    top = os.open(".", DIR, dir_fd=parent_fd)
                yield from below(top, "")
                return
            with self._errors(rel):
                st = lstat_at(parent_fd, name)
            if st is None:
                raise PathNotFound(rel.text)
            if skip(st):
                return
            entry = WalkEntry(str(rel), kind_of(st.st_mode), st, parent_fd, name)
            yield entry
            if entry.kind != "directory":
                return
            with self._errors(rel):
                fd = enter_dir(parent_fd, name)
            if fd is not None:  # else replaced while we walked: nothing to enter
                yield from below(fd, str(rel))
        finally:
            os.close(parent_fd)

    def scan(self, rel: RelPath, *, checkpoint: Callable[[], None] = noop) -> Iterator[ScanEntry]:
        """Every entry below the folder at ``rel`` (in-volume links to it followed, as
        ``list_dir`` does), parents before children, names sorted, with no ``stat`` per
        entry (see ``tree.scan_below``). Links inside are reported, never followed.
        ``NotAFolder`` when ``rel`` is not a folder."""
        fd = self.open_dir(rel)
        yield from scan_below(
            fd, "/".join(rel.parts), checkpoint=checkpoint, error=self._error_for(rel)
        )

    def usage(self, *, checkpoint: Callable[[], None] = noop) -> Usage:
        """What the whole root holds (``Usage``), counted by a scan that follows no link:
        a link counts as one file of no bytes, whatever it points to."""
        total = files = 0
        for entry in self.scan(ROOT, checkpoint=checkpoint):
            kind = entry.kind
            if kind == "directory":
                continue
            files += 1
            if kind == "file":
                st = entry.stat()
                if st is not None and stat.S_ISREG(st.st_mode):
                    total += st.st_size
        return Usage(total, files)

    def _error_for(self, rel: RelPath) -> Callable[[OSError], FileError]:
        return partial(self._error, rel=rel)

    @staticmethod
    def open_entry(entry: WalkEntry) -> BinaryIO | None:
        """Open a walked regular file for reading (``None`` if it is no longer one)."""
        fd = open_entry(entry)
        return None if fd is None else os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def open_regular_in(dir_fd: int, name: str) -> BinaryIO | None:
        """Open the regular file ``name`` of a walked or scanned folder for reading, no
        link followed (``None`` if it is gone or is anything else: never opened)."""
        fd = open_regular_at(dir_fd, name)
        return None if fd is None else os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def read_link(entry: WalkEntry) -> str | None:
        return link_target_at(entry.dir_fd, entry.name)


def remove_private_folder(parent: str | os.PathLike[str], name: str, prefix: str) -> bool:
    """Remove the agent's own folder ``name`` (it must start with ``prefix``: a staging
    folder beside the volumes, never a volume) below the trusted folder ``parent``, with
    everything in it, never following a link. Missing is fine. A failure is logged, not
    raised: clean-up must not hide the error that led to it; ``False`` then."""
    if not name.startswith(prefix) or "/" in name:
        return False
    try:
        with Root.open(parent) as top:
            if stat.S_ISDIR(os.lstat(name, dir_fd=top.fd).st_mode):
                shutil.rmtree(name, dir_fd=top.fd)
            else:  # not ours after all (a link, a file): removed itself, never followed
                os.unlink(name, dir_fd=top.fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove the private folder %s in %s: %s", name, parent, exc)
        return False
    return True


def sweep_private_folders(parent: str | os.PathLike[str], prefix: str) -> int:
    """Remove every folder of ``parent`` named ``prefix…`` (what a crash left behind, at
    start); how many were removed."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(prefix)]
    except FileNotFoundError:
        return 0
    return sum(remove_private_folder(parent, name, prefix) for name in names)
