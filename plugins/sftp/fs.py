"""One SFTP session's file operations, each through the safe file layer (``lightd.files``).

Client paths are the session's own: ``/`` is the volume root. A path is normalised
lexically first (``..`` stops at ``/``, as in a chroot) and then parsed by
``lightd.files.parse`` into a ``RelPath``; from there every operation starts from the
descriptor of the volume root (``Root``) and resolves beneath it, never following a link
out of the volume (``openat2(RESOLVE_BENEATH)`` or the ``O_NOFOLLOW`` walk). Operations on
a name (``mkdir``, ``rmdir``, ``remove``, ``symlink``, ``readlink``) act with ``*at`` calls
on that one name inside its resolved parent folder, so a link swapped in at the last
moment is acted on as a link, never followed. A file is opened as ``O_PATH`` first and
reopened through ``/proc/self/fd`` only when it is a regular file (a FIFO or device is
never opened), or created with ``O_CREAT|O_EXCL`` (never through a link).

Rules on top of the file API's (contract §19): a new link's target must stay inside the
volume (absolute targets are read as session paths and stored relative); ``setstat``
changes permission bits only (``mode & 0o777``: never setuid, setgid or sticky), sizes and
times, never owners; writes are charged to the volume's size limit before they are made
(a ``lightd.disk_writing`` budget shared by the files a session opens within a second,
``Lease``: only growth counts); with ``read_only`` every change is refused. A new file is
created with ``O_CREAT|O_EXCL`` first (one call for an upload); an existing one (or a
link) is then opened as above.

Threads: the agent's trio loop never runs any of this (the SSH server has its own loop
in its own thread). On that loop, quick metadata work (resolve one path, one syscall) is
done at once, like OpenSSH's own ``sftp-server``, and so are writes of up to 64 KiB whose
budget is at hand; listings, bigger writes, fsync and reads of what the page cache does
not hold go to the session thread pool (``Session.pool``), an uncached read taking 512 KiB
at once for the next requests; cached reads are done at once (``preadv`` with
``RWF_NOWAIT``, never waiting for the disk), like the file manager's downloads. A read is
never answered short before the end of the file (OpenSSH's client would shrink its
requests to that size for the rest of the transfer).

Attributes are made by ``attrs_of``, not ``SFTPAttrs.from_local``, which looks up the host's
user and group names of every entry of a listing (owners are shown as numbers).

Every method not overridden here would use asyncssh's host-path default: ``map_path``
refuses, so none can reach the host's files.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import posixpath
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import asyncssh
import attrs
from asyncssh import (
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPError,
    SFTPName,
    SFTPVFSAttrs,
)
from lightd import DiskBudget
from lightd.files import (
    FileError,
    FileExists,
    FolderExists,
    InvalidPath,
    NoSpace,
    NotAFile,
    NotAFolder,
    Owner,
    PathEscapes,
    PathNotFound,
    QuotaExceeded,
    RelPath,
    Root,
    VolumeNotFound,
    link_stays_inside,
    parse,
)

__all__ = ["Handle", "Session", "VolumeSFTP", "attrs_of", "client_path"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)
#: The most one read answers (OpenSSH asks 32 KiB, some clients 256 KiB).
MAX_READ = 256 * 1024
#: Bytes one uncached read takes from the disk, in a worker thread, and keeps for the
#: next requests (sequential downloads need one thread hand-off per this many bytes).
READ_AHEAD = 512 * 1024
#: Writes up to this size are done on the SSH loop when their budget is at hand.
INLINE_WRITE = 64 * 1024
#: Seconds a write waits for its budget from the agent.
BUDGET_WAIT = 60
#: Seconds a session's write budget (``Lease``) serves files opened for writing before
#: the next open asks for a fresh one (which serves from when it arrives).
LEASE_AGE = 1.0
_WRITE_FLAGS = FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC


_FILE_TYPES = {
    stat.S_IFREG: asyncssh.FILEXFER_TYPE_REGULAR,
    stat.S_IFDIR: asyncssh.FILEXFER_TYPE_DIRECTORY,
    stat.S_IFLNK: asyncssh.FILEXFER_TYPE_SYMLINK,
    stat.S_IFIFO: asyncssh.FILEXFER_TYPE_FIFO,
    stat.S_IFSOCK: asyncssh.FILEXFER_TYPE_SOCKET,
    stat.S_IFCHR: asyncssh.FILEXFER_TYPE_CHAR_DEVICE,
    stat.S_IFBLK: asyncssh.FILEXFER_TYPE_BLOCK_DEVICE,
}


def attrs_of(st: os.stat_result) -> SFTPAttrs:
    """``SFTPAttrs.from_local`` without its look-ups of the host's user and group names
    (``getpwuid`` and ``getgrgid`` for every entry of a listing): owners are numbers here,
    as ``format_user`` shows them."""
    atime, atime_ns = divmod(st.st_atime_ns, 1_000_000_000)
    mtime, mtime_ns = divmod(st.st_mtime_ns, 1_000_000_000)
    ctime, ctime_ns = divmod(st.st_ctime_ns, 1_000_000_000)
    return SFTPAttrs(
        type=_FILE_TYPES.get(stat.S_IFMT(st.st_mode), asyncssh.FILEXFER_TYPE_UNKNOWN),
        size=st.st_size,
        uid=st.st_uid,
        gid=st.st_gid,
        owner=str(st.st_uid),
        group=str(st.st_gid),
        permissions=st.st_mode,
        atime=atime,
        atime_ns=atime_ns,
        crtime=mtime,
        crtime_ns=mtime_ns,
        mtime=mtime,
        mtime_ns=mtime_ns,
        ctime=ctime,
        ctime_ns=ctime_ns,
        nlink=st.st_nlink,
    )


def client_path(path: bytes) -> RelPath:
    """A session path (``/`` is the volume root; relative ones start there too) as a
    ``RelPath``: ``..`` never climbs above ``/``; then the file layer's rules."""
    text = os.fsdecode(path)
    if "\x00" in text:
        raise SFTPError(asyncssh.FX_NO_SUCH_FILE, "Invalid path")
    norm = posixpath.normpath("/" + text).lstrip("/")
    try:
        return parse(norm, empty_is_root=True)
    except InvalidPath as exc:
        raise SFTPError(asyncssh.FX_NO_SUCH_FILE, exc.message) from None


def _sftp_error(exc: BaseException) -> SFTPError:
    """The SFTP status for a file error or a raw ``OSError`` (never a host path)."""
    if isinstance(exc, SFTPError):
        return exc
    if isinstance(exc, FileError):
        message = exc.message
        if isinstance(exc, PathNotFound | VolumeNotFound):
            return asyncssh.SFTPNoSuchFile(message)
        if isinstance(exc, PathEscapes):
            return asyncssh.SFTPPermissionDenied(message)
        if isinstance(exc, FileExists | FolderExists):
            return asyncssh.SFTPFileAlreadyExists(message)
        if isinstance(exc, QuotaExceeded):
            return asyncssh.SFTPQuotaExceeded(message)
        if isinstance(exc, NoSpace):
            return asyncssh.SFTPNoSpaceOnFilesystem(message)
        if isinstance(exc, InvalidPath):
            return asyncssh.SFTPPermissionDenied(message)
        if isinstance(exc, NotAFile | NotAFolder):
            return asyncssh.SFTPFailure(message)
        return asyncssh.SFTPFailure(message)
    if isinstance(exc, OSError):
        code = exc.errno
        if code in (errno.EXDEV, errno.ELOOP):
            return asyncssh.SFTPPermissionDenied("Invalid path: path escapes volume")
        if code == errno.ENOENT:
            return asyncssh.SFTPNoSuchFile("No such file")
        if code == errno.EEXIST:
            return asyncssh.SFTPFileAlreadyExists("File already exists")
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return asyncssh.SFTPPermissionDenied("Permission denied")
        if code == errno.ENOTEMPTY:
            return asyncssh.SFTPDirNotEmpty("Folder not empty")
        if code == errno.ENOTDIR:
            return asyncssh.SFTPNotADirectory("Not a folder")
        if code == errno.EISDIR:
            return asyncssh.SFTPFileIsADirectory("Is a folder")
        if code in (errno.ENOSPC, errno.EDQUOT):
            return asyncssh.SFTPNoSpaceOnFilesystem("No space left in the volume")
        return asyncssh.SFTPFailure(os.strerror(code or errno.EIO))
    raise exc


def _wait(pending: Future[T]) -> T:
    """A budget the agent gives (in a worker thread); refused if the agent is stopping."""
    try:
        return pending.result(timeout=BUDGET_WAIT)
    except (CancelledError, TimeoutError):
        raise asyncssh.SFTPFailure("The agent is busy or stopping") from None


def _denied() -> SFTPError:
    return asyncssh.SFTPPermissionDenied("Read-only session")


@attrs.define(eq=False)
class Lease:
    """A write budget (a ``lightd.disk_writing`` block) shared by the files a session
    opens for writing within ``LEASE_AGE`` seconds; given back (committed) once it is
    retired and its last file is closed. Only the SSH loop touches it (worker threads
    charge the budget, which is thread-safe)."""

    future: Future[tuple[DiskBudget, object]]
    at: float
    #: Open files charging it.
    users: int = 0
    retired: bool = False

    def failed(self) -> bool:
        f = self.future
        return f.done() and (f.cancelled() or f.exception() is not None)


@attrs.define(eq=False)
class Handle:
    """An open file of a session: its descriptor and, when writable, its budget."""

    fd: int
    rel: RelPath
    writable: bool
    append: bool
    #: The size the session knows of (growth past it is charged).
    size: int
    #: Bytes an ``O_TRUNC`` open removed.
    truncated: int = 0
    #: The session's write budget the file charges (when writable), and that budget
    #: once the first growing write had it.
    lease: Lease | None = None
    budget: DiskBudget | None = None
    #: Read-ahead of uncached reads: ``(offset, data)``.
    ahead: tuple[int, bytes] | None = None


@attrs.define(eq=False)
class Session:
    """What an SFTP session works with. ``budget()`` asks the agent to enter a
    ``lightd.disk_writing`` block (without waiting: the future is waited for by the worker
    thread of the first write); ``release(token, ok)`` leaves it and ``freed(n)`` counts
    bytes a truncation removed, both without waiting (the agent does it soon, in order);
    ``stale`` tells the disk service files were removed."""

    root: Root
    read_only: bool
    pool: ThreadPoolExecutor
    owner: Owner | None
    budget: Callable[[], Future[tuple[DiskBudget, object]]]
    release: Callable[[object, bool], None]
    freed: Callable[[int], None]
    stale: Callable[[], None]


class VolumeSFTP(asyncssh.SFTPServer):
    """An SFTP v3 server rooted at one volume (see the module docstring)."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], session: Session) -> None:
        super().__init__(chan)
        self._s = session
        self._root = session.root
        self._handles: dict[int, Handle] = {}
        #: The write budget files opened now charge, and the one asked for to follow it.
        self._lease: Lease | None = None
        self._next: Lease | None = None

    # --- plumbing ------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._s.pool, partial(fn, *args))
        except (FileError, OSError) as exc:
            raise _sftp_error(exc) from None

    def _now(self, fn: Callable[..., T], *args: Any) -> T:
        """Run quick metadata work (one resolution and one syscall on a name) at once, on
        the SSH loop: a thread hand-off costs more than the work (``bench.sftp``: small
        files twice as fast). Listings, writes, uncached reads and fsync go to threads."""
        try:
            return fn(*args)
        except (FileError, OSError) as exc:
            raise _sftp_error(exc) from None

    def _writable(self) -> None:
        if self._s.read_only:
            raise _denied()

    def map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPOpUnsupported("Not supported")

    def reverse_map_path(self, path: bytes) -> bytes:
        raise asyncssh.SFTPOpUnsupported("Not supported")

    def format_user(self, uid: int | None) -> str:
        return "" if uid is None else str(uid)

    def format_group(self, gid: int | None) -> str:
        return "" if gid is None else str(gid)

    def _parent(self, rel: RelPath) -> tuple[int, str]:
        """The resolved parent folder of ``rel`` (beneath the root) and its last name."""
        name = rel.name
        if name is None:
            raise asyncssh.SFTPPermissionDenied("Not allowed on the volume root")
        return self._root.open_fd(rel.parent.parts, _DIR_PATH), name

    def _chown_at(self, dir_fd: int, name: str) -> None:
        owner = self._s.owner
        if owner is not None:
            os.chown(name, owner[0], owner[1], dir_fd=dir_fd, follow_symlinks=False)

    # --- paths ---------------------------------------------------------------------------

    def realpath(self, path: bytes) -> bytes:
        rel = client_path(path)
        return b"/" + os.fsencode("/".join(rel.parts))

    def stat(self, path: bytes) -> SFTPAttrs:
        return attrs_of(self._now(self._root.stat, client_path(path)))

    def lstat(self, path: bytes) -> SFTPAttrs:
        return attrs_of(self._now(partial(self._root.stat, follow=False), client_path(path)))

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        entries = await self._run(self._list, client_path(path))
        for name, st in entries:
            yield SFTPName(name, attrs=attrs_of(st))

    def _list(self, rel: RelPath) -> list[tuple[bytes, os.stat_result]]:
        fd = self._root.open_dir(rel)
        try:
            entries = [(b".", os.fstat(fd))]
            with os.scandir(fd) as it:
                for item in it:
                    try:
                        entries.append((os.fsencode(item.name), item.stat(follow_symlinks=False)))
                    except FileNotFoundError:
                        continue
            return entries
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        return self._now(self._readlink, client_path(path))

    def _readlink(self, rel: RelPath) -> bytes:
        parent, name = self._parent(rel)
        try:
            try:
                return os.fsencode(os.readlink(name, dir_fd=parent))
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise asyncssh.SFTPFailure("Not a link") from None
                raise
        finally:
            os.close(parent)

    def statvfs(self, path: bytes) -> SFTPVFSAttrs:
        return SFTPVFSAttrs.from_local(os.fstatvfs(self._root.fd))

    def fstatvfs(self, file_obj: object) -> SFTPVFSAttrs:
        return SFTPVFSAttrs.from_local(os.fstatvfs(self._root.fd))

    # --- changing names ------------------------------------------------------------------

    def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._writable()
        mode = 0o755 if attrs.permissions is None else attrs.permissions & 0o777
        self._now(self._mkdir, client_path(path), mode)

    def _mkdir(self, rel: RelPath, mode: int) -> None:
        parent, name = self._parent(rel)
        try:
            os.mkdir(name, mode, dir_fd=parent)
            self._chown_at(parent, name)
        finally:
            os.close(parent)

    def rmdir(self, path: bytes) -> None:
        self._writable()
        self._now(self._rmdir, client_path(path))
        self._settle()
        self._s.stale()

    def _rmdir(self, rel: RelPath) -> None:
        parent, name = self._parent(rel)
        try:
            os.rmdir(name, dir_fd=parent)
        finally:
            os.close(parent)

    def remove(self, path: bytes) -> None:
        self._writable()
        self._now(self._remove, client_path(path))
        self._settle()
        self._s.stale()

    def _remove(self, rel: RelPath) -> None:
        parent, name = self._parent(rel)
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise asyncssh.SFTPFileIsADirectory("Is a folder")
            os.unlink(name, dir_fd=parent)
        finally:
            os.close(parent)

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._writable()
        self._now(self._rename, client_path(oldpath), client_path(newpath), False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        self._writable()
        self._now(self._rename, client_path(oldpath), client_path(newpath), True)

    def _rename(self, source: RelPath, destination: RelPath, replace: bool) -> None:
        # Root.rename makes missing parents (the file API's move); SFTP's does not.
        if not stat.S_ISDIR(self._root.stat(destination.parent).st_mode):
            raise asyncssh.SFTPNoSuchFile("No such folder")
        self._root.rename(source, destination, replace=replace)

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """``oldpath`` is the target, ``newpath`` the new link (OpenSSH's order)."""
        self._writable()
        rel = client_path(newpath)
        target = os.fsdecode(oldpath)
        if target.startswith("/"):  # a session path: stored relative to the link's folder
            norm = posixpath.normpath(target)
            target = posixpath.relpath(norm, "/" + "/".join(rel.parent.parts))
        if "\x00" in target or not link_stays_inside(rel, target):
            raise asyncssh.SFTPPermissionDenied("Link target outside the volume")
        self._now(self._symlink, rel, target)

    def _symlink(self, rel: RelPath, target: str) -> None:
        parent, name = self._parent(rel)
        try:
            os.symlink(target, name, dir_fd=parent)
            self._chown_at(parent, name)
        finally:
            os.close(parent)

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        self._writable()
        self._now(self._link, client_path(oldpath), client_path(newpath))

    def _link(self, target: RelPath, rel: RelPath) -> None:
        if self._root.exists(rel):
            raise FileExists(rel.text)
        self._root.hardlink(target, rel)

    # --- attributes ----------------------------------------------------------------------

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        self._writable()
        rel = client_path(path)
        fd = self._now(self._root.open_fd, rel.parts, os.O_PATH)
        try:
            await self._apply(fd, attrs, rel, None)
        finally:
            os.close(fd)

    async def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        self._writable()
        handle = self._handle(file_obj)
        await self._apply(handle.fd, attrs, handle.rel, handle)

    async def _apply(self, fd: int, attrs: SFTPAttrs, rel: RelPath, handle: Handle | None) -> None:
        """Apply ``attrs`` to the object ``fd`` names (an ``O_PATH`` descriptor for a
        path: changes go through its ``/proc/self/fd`` entry, that very inode)."""
        if attrs.uid is not None or attrs.gid is not None:
            raise asyncssh.SFTPPermissionDenied("Changing owners is not allowed")
        if attrs.size is not None:
            await self._truncate(fd, attrs.size, rel, handle)
        self._now(self._modes, fd, attrs, handle is not None)

    def _modes(self, fd: int, attrs: SFTPAttrs, real_fd: bool) -> None:
        target: int | str = fd if real_fd else f"/proc/self/fd/{fd}"
        if attrs.permissions is not None:
            mode = attrs.permissions & 0o777  # never setuid, setgid or sticky
            if real_fd:
                os.fchmod(fd, mode)
            else:
                os.chmod(target, mode)
        if attrs.atime is not None or attrs.mtime is not None:
            st = os.fstat(fd)
            atime = st.st_atime if attrs.atime is None else attrs.atime
            mtime = st.st_mtime if attrs.mtime is None else attrs.mtime
            os.utime(target, (atime, mtime))

    async def _truncate(self, fd: int, size: int, rel: RelPath, handle: Handle | None) -> None:
        self._settle()  # (it may free bytes)
        await self._run(self._truncate_blocking, fd, size, handle)

    def _truncate_blocking(self, fd: int, size: int, handle: Handle | None) -> None:
        current = os.fstat(fd).st_size
        if handle is not None:
            if size > current:
                self._charge(handle, size - current)
            os.ftruncate(fd, size)
            handle.size, handle.ahead = size, None
        else:
            if size > current:
                budget, token = _wait(self._s.budget())
                try:
                    budget.charge(size - current)
                    self._truncate_path(fd, size)
                except BaseException:
                    self._s.release(token, False)
                    raise
                self._s.release(token, True)
            else:
                self._truncate_path(fd, size)
        if size < current:
            self._s.freed(current - size)

    def _charge(self, handle: Handle, n: int) -> None:
        """Charge ``n`` bytes of growth to the handle's budget (taken now if need be)."""
        if handle.budget is None:
            assert handle.lease is not None
            handle.budget = _wait(handle.lease.future)[0]
        handle.budget.charge(n)

    @staticmethod
    def _truncate_path(fd: int, size: int) -> None:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise asyncssh.SFTPFailure("Not a file")
        wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            os.ftruncate(wfd, size)
        finally:
            os.close(wfd)

    # --- files ---------------------------------------------------------------------------

    def _handle(self, file_obj: object) -> Handle:
        if not isinstance(file_obj, Handle) or self._handles.get(id(file_obj)) is not file_obj:
            raise asyncssh.SFTPInvalidHandle("Invalid handle")
        return file_obj

    def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> Handle:
        rel = client_path(path)
        writes = bool(pflags & _WRITE_FLAGS)
        if writes:
            self._writable()
        mode = 0o644 if attrs.permissions is None else attrs.permissions & 0o777
        handle = self._now(self._open, rel, pflags, mode)
        if handle.truncated:  # the bytes are gone now: counted as freed at once
            self._settle()
            self._s.freed(handle.truncated)
        if handle.writable:
            handle.lease = self._take_lease()
        self._handles[id(handle)] = handle
        return handle

    def _take_lease(self) -> Lease:
        """The write budget for a file opened for writing. One budget serves the files a
        session opens within ``LEASE_AGE`` seconds: asking the agent for one per file
        (a trio round trip to enter it, another to leave it) cost more than a small file's
        upload itself (``bench.sftp``). Every growth is still charged before it is
        written; the charges count as the volume's usage when the budget is given back,
        once retired and its last file closed (bytes in flight meanwhile, counted against
        the limit as before). The next budget is asked for ahead, and serves from when it
        arrives, so no write waits for it."""
        now = time.monotonic()
        lease = self._lease
        if lease is None or lease.failed():
            if lease is not None:
                self._retire(lease)
            lease = self._lease = Lease(self._s.budget(), now)
        elif now - lease.at > LEASE_AGE:
            following = self._next
            if following is None:
                self._next = Lease(self._s.budget(), now)
            elif following.future.done():
                self._next = None
                self._retire(lease)
                lease = self._lease = following
        lease.users += 1
        return lease

    def _settle(self) -> None:
        """Bytes are being freed: the session's write budgets are given back first (as
        soon as their open files close), so that what they charged is usage, not bytes in
        flight, when the freed bytes are counted (else a file replaced within the lease
        would count twice against the limit). The next budget is asked for after the
        agent has done both (its jobs run in order)."""
        for lease in (self._lease, self._next):
            if lease is not None:
                self._retire(lease)
        self._lease = self._next = None

    def _retire(self, lease: Lease) -> None:
        lease.retired = True
        if lease.users == 0:
            self._drop(lease.future)

    def _unuse(self, lease: Lease) -> None:
        lease.users -= 1
        if lease.retired and lease.users == 0:
            self._drop(lease.future)

    def _drop(self, pending: Future[tuple[DiskBudget, object]]) -> None:
        """Give a budget back (committed: what was written is in the volume), once it
        comes."""
        release = self._s.release
        pending.add_done_callback(
            lambda f: None if f.cancelled() or f.exception() else release(f.result()[1], True)
        )

    def _open(self, rel: RelPath, pflags: int, mode: int) -> Handle:
        read = bool(pflags & FXF_READ) or not pflags & (FXF_WRITE | FXF_APPEND)
        write = bool(pflags & (FXF_WRITE | FXF_APPEND))
        access = os.O_RDWR if read and write else os.O_WRONLY if write else os.O_RDONLY
        if pflags & FXF_APPEND:
            access |= os.O_APPEND
        for _ in range(4):  # created or removed meanwhile: look again (bounded)
            if pflags & FXF_CREAT:  # a new file first (uploads): one call, no link followed
                flags = access | os.O_CREAT | os.O_EXCL | os.O_NOCTTY
                try:
                    fd = self._root.open_fd(rel.parts, flags, mode, follow_last=False)
                except FileExistsError:  # there already, or a link: open what it is
                    if pflags & FXF_EXCL:
                        raise asyncssh.SFTPFileAlreadyExists("File already exists") from None
                else:
                    try:
                        if self._s.owner is not None:
                            os.fchown(fd, *self._s.owner)
                    except BaseException:
                        os.close(fd)
                        raise
                    return Handle(fd, rel, write, bool(pflags & FXF_APPEND), 0)
            try:
                path_fd = self._root.open_fd(rel.parts, os.O_PATH)
            except FileNotFoundError:
                if not pflags & FXF_CREAT:
                    raise
                continue  # removed meanwhile, or a dangling link: create again
            try:
                st = os.fstat(path_fd)
                if stat.S_ISDIR(st.st_mode):
                    raise asyncssh.SFTPFileIsADirectory("Is a folder")
                if not stat.S_ISREG(st.st_mode):
                    raise asyncssh.SFTPFailure("Not a file")
                flags = access | os.O_NOCTTY | os.O_CLOEXEC
                if write and pflags & FXF_TRUNC:
                    flags |= os.O_TRUNC
                fd = os.open(f"/proc/self/fd/{path_fd}", flags)
            finally:
                os.close(path_fd)
            if flags & os.O_TRUNC:
                return Handle(fd, rel, write, bool(pflags & FXF_APPEND), 0, st.st_size)
            return Handle(fd, rel, write, bool(pflags & FXF_APPEND), st.st_size)
        raise asyncssh.SFTPFailure("File changed while opening it")

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        handle = self._handle(file_obj)
        size = min(size, MAX_READ)
        # Never answer short before the end of the file: OpenSSH's client takes a short
        # read as the server's limit and asks that little from then on.
        ahead = handle.ahead
        if ahead is not None and ahead[0] <= offset and offset + size <= ahead[0] + len(ahead[1]):
            start = offset - ahead[0]
            return ahead[1][start : start + size]
        if _NOWAIT:
            buffer = bytearray(size)
            try:
                got = os.preadv(handle.fd, [buffer], offset, _NOWAIT)
            except (BlockingIOError, InterruptedError):
                got = -1
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise _sftp_error(exc) from None
                got = -1
            if got == size:
                return bytes(buffer)
            if got >= 0 and offset + got >= os.fstat(handle.fd).st_size:
                return bytes(memoryview(buffer)[:got])  # the end of the file
        # Not cached: one thread hand-off reads ahead for the next requests too.
        data = await self._run(os.pread, handle.fd, max(size, READ_AHEAD), offset)
        handle.ahead = (offset, data) if len(data) > size else None
        return data[:size]

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        handle = self._handle(file_obj)
        if not handle.writable:
            raise asyncssh.SFTPPermissionDenied("File not open for writing")
        handle.ahead = None
        if handle.append:
            offset = handle.size
        end = offset + len(data)
        lease = handle.lease
        if len(data) <= INLINE_WRITE and (
            handle.budget is not None or end <= handle.size or (lease and lease.future.done())
        ):
            # Budget at hand: a small write to the page cache costs less than a thread
            # hand-off (bench.sftp, small files); big ones and waits go to a thread.
            return self._now(self._write, handle, offset, end, data)
        return await self._run(self._write, handle, offset, end, data)

    def _write(self, handle: Handle, offset: int, end: int, data: bytes) -> int:
        if end > handle.size:
            self._charge(handle, end - handle.size)
            handle.size = end
        if handle.append:
            return os.write(handle.fd, data)
        return os.pwrite(handle.fd, data, offset)

    def fstat(self, file_obj: object) -> SFTPAttrs:
        return attrs_of(self._now(os.fstat, self._handle(file_obj).fd))

    async def fsync(self, file_obj: object) -> None:
        await self._run(os.fsync, self._handle(file_obj).fd)

    async def close(self, file_obj: object) -> None:
        handle = self._handle(file_obj)
        self._handles.pop(id(handle), None)
        try:
            os.close(handle.fd)
        finally:
            self._give_back(handle)

    def _give_back(self, handle: Handle) -> None:
        """Leave the handle's budget (committed: what was written is in the volume)."""
        lease, handle.lease = handle.lease, None
        if lease is not None:
            self._unuse(lease)

    def exit(self) -> None:
        """The session ended (asyncssh closed its open files first): close what is left
        (budgets committed: the bytes are in the volume)."""
        handles = list(self._handles.values())
        self._handles.clear()
        for handle in handles:
            os.close(handle.fd)
            self._give_back(handle)
        self._settle()

    def lock(self, file_obj: object, offset: int, length: int, flags: int) -> None:
        raise asyncssh.SFTPOpUnsupported("Not supported")

    def unlock(self, file_obj: object, offset: int, length: int) -> None:
        raise asyncssh.SFTPOpUnsupported("Not supported")

    def open56(self, *args: object) -> object:
        raise asyncssh.SFTPOpUnsupported("Not supported")
