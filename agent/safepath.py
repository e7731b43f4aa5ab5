"""Safe file access inside a volume: every path is resolved beneath a directory handle.

Why this module exists: a container owns its volume and may plant or swap symlinks in it
at any moment, while the agent (root, on the host) reads and writes the same folder. Most
security advisories of peer daemons were escapes through such links, and the ones fixed
with "resolve, then check the prefix" came back as races. So nothing here turns a client
path into a host path. Every operation starts from an open descriptor of the volume root
(``Root``) and resolves relative to it:

* with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` where the kernel has it: the
  kernel follows links that stay beneath the root and refuses, atomically, any that
  leaves it (``EXDEV``);
* else by a component walk: each component is opened with ``O_NOFOLLOW`` relative to the
  descriptor of its parent, and symlinks are read and spliced in by hand under the same
  rules (absolute target or ``..`` above the root: escape; 40 links: loop).

Mutations then act on one name inside an already resolved parent descriptor (``*at``
calls, never following the last link), so a link swapped in at the last moment is
replaced or refused, never followed. Writes go to a temporary name beside the target and
are renamed into place. ``USE_OPENAT2``/``USE_RENAMEAT2`` let tests force the fallbacks.

Errors are ``agent.errors`` API errors whose messages name only the client's relative
path, never a host path. Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import contextlib
import ctypes
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

from .errors import ApiError, BadRequest, Conflict, NotFound

__all__ = [
    "CHUNK",
    "MAX_DEPTH",
    "NAME_MAX",
    "ROOT",
    "TEMP_PREFIX",
    "AtomicFile",
    "DirEntry",
    "FileExists",
    "FileOperationFailed",
    "FolderExists",
    "InvalidPath",
    "NoSpace",
    "NotAFile",
    "NotAFolder",
    "PathEscapes",
    "PathNotFound",
    "RelPath",
    "Root",
    "WalkEntry",
    "copy_data",
    "merge_tree",
    "openat2_available",
    "parse",
    "rename_noreplace",
]

log = logging.getLogger(__name__)

#: Tests set these to False to exercise the fallbacks on a kernel that has both calls.
USE_OPENAT2 = True
USE_RENAMEAT2 = True

#: Names of the agent's temporary files and folders inside a volume.
TEMP_PREFIX = ".lightd-tmp-"
#: Deepest folder tree a copy, walk or archive handles (each level holds a descriptor).
MAX_DEPTH = 256
MAX_LINKS = 40
NAME_MAX = 255
PATH_MAX = 4095
CHUNK = 1 << 20

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RENAME_NOREPLACE = 1
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: Reading a file that may have been swapped for a FIFO or a device node meanwhile:
#: never block on it, never make it our terminal; callers check ``S_ISREG`` after.
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NOFOLLOW_READ = _READ | os.O_NOFOLLOW


def _noop() -> None:
    return None


# --- errors ------------------------------------------------------------------------------


class InvalidPath(BadRequest):
    """400 ``Invalid path: <reason>``."""

    code = "invalid_path"

    def __init__(self, reason: str, *, code: str | None = None) -> None:
        super().__init__(f"Invalid path: {reason}", code=code)
        self.reason = reason


class PathEscapes(InvalidPath):
    """The path resolves (through links) to somewhere outside the root."""

    code = "path_escapes_volume"

    def __init__(self) -> None:
        super().__init__("path escapes volume")


class PathNotFound(NotFound):
    code = "path_not_found"

    def __init__(self, path: str) -> None:
        super().__init__(f"Path not found: {path}")


class FileExists(Conflict):
    code = "file_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"File already exists at path: {path}")


class FolderExists(Conflict):
    code = "folder_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"A folder exists at path: {path}")


class NotAFolder(BadRequest):
    code = "not_a_folder"

    def __init__(self, path: str) -> None:
        super().__init__(f"Not a folder: {path}")


class NotAFile(BadRequest):
    code = "not_a_file"

    def __init__(self, path: str) -> None:
        super().__init__(f"Not a file: {path}")


class NoSpace(ApiError):
    """The file system (or the volume's quota) is full; nothing was left half-written."""

    code = "no_space"

    def __init__(self) -> None:
        super().__init__("No space left in the volume")


class FileOperationFailed(ApiError):
    """An unexpected OS error; the message carries the OS reason, never a path."""

    code = "file_operation_failed"

    def __init__(self, exc: OSError) -> None:
        super().__init__(f"File operation failed: {exc.strerror or type(exc).__name__}")
        self.errno = exc.errno


# --- client paths ------------------------------------------------------------------------


@attrs.frozen
class RelPath:
    """A validated path relative to a root: its components, and the client's own text
    (for messages). No component is empty, ``.`` or ``..``; ``parts == ()`` is the root."""

    parts: tuple[str, ...]
    text: str

    @property
    def name(self) -> str | None:
        return self.parts[-1] if self.parts else None

    @property
    def parent(self) -> RelPath:
        parent = self.parts[:-1]
        return RelPath(parent, "/".join(parent) or ".")

    def child(self, name: str) -> RelPath:
        parts = (*self.parts, name)
        return RelPath(parts, "/".join(parts))

    def is_within(self, other: RelPath) -> bool:
        """``self`` is ``other`` or below it (lexically)."""
        return self.parts[: len(other.parts)] == other.parts

    def __str__(self) -> str:
        return "/".join(self.parts) or "."


ROOT = RelPath((), ".")


def _is_drive(text: str) -> bool:
    return len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha()


def parse(text: str, *, empty_is_root: bool = False) -> RelPath:
    """Validate a client path (contract §5 "Paths") into a ``RelPath``.

    Refused: empty, absolute (``/x``, ``\\x``, ``C:…``), a ``..`` component, a NUL byte,
    names longer than 255 bytes or paths longer than 4095, text that cannot be a file
    name. ``a..b.txt`` is a name like any other; ``.`` and empty components are dropped.
    """
    if "\x00" in text:
        raise InvalidPath("path traversal detected", code="path_traversal")
    if not text.strip():
        if empty_is_root:
            return RelPath((), text)
        raise InvalidPath("path is empty", code="path_empty")
    if text[0] in "/\\" or _is_drive(text):
        raise InvalidPath("absolute paths are not allowed", code="absolute_path")
    parts = tuple(p for p in text.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InvalidPath("path traversal detected", code="path_traversal")
    try:
        encoded = os.fsencode(text)
    except UnicodeError:
        raise InvalidPath("path is not valid UTF-8", code="invalid_encoding") from None
    if len(encoded) > PATH_MAX:
        raise InvalidPath("path too long", code="path_too_long")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise InvalidPath("name too long", code="name_too_long")
    return RelPath(parts, text)


# --- kernel calls --------------------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_renameat2 = getattr(_libc, "renameat2", None)
_openat2_state: bool | None = None  # None: not probed yet


def _openat2(dirfd: int, path: bytes, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags, mode, resolve)
    for _ in range(64):
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        # EAGAIN: a rename raced with a ".." lookup; the kernel asks us to try again.
        if err not in (errno.EINTR, errno.EAGAIN):
            raise OSError(err, os.strerror(err))
    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))


def openat2_available() -> bool:
    """Whether the kernel (and any seccomp filter) lets us call ``openat2``."""
    global _openat2_state
    if _openat2_state is None:
        root = os.open("/", _DIR_PATH)
        try:
            os.close(_openat2(root, b".", _DIR_PATH, 0, _RESOLVE_BENEATH))
        except OSError as exc:
            _openat2_state = False
            log.info("openat2 unavailable (%s); using the O_NOFOLLOW component walk", exc)
        else:
            _openat2_state = True
        finally:
            os.close(root)
    return _openat2_state


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Rename that fails with ``EEXIST`` instead of replacing (``renameat2``), with a
    check-then-rename fallback where the call or the file system lacks the flag."""
    if USE_RENAMEAT2 and _renameat2 is not None:
        result = _renameat2(
            ctypes.c_int(src_dir),
            ctypes.c_char_p(os.fsencode(src)),
            ctypes.c_int(dst_dir),
            ctypes.c_char_p(os.fsencode(dst)),
            ctypes.c_uint(_RENAME_NOREPLACE),
        )
        if result == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err))
    if _lstat(dst_dir, dst) is not None:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_link_at(dir_fd: int, name: str) -> str | None:
    """The target of ``name`` if it is a symlink, else ``None``."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return None
        raise


def _fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _splice(pending: list[str], target: str, links: int) -> int:
    """Put a link's target in front of the components still to walk (``pending`` is a
    stack, next component last)."""
    links += 1
    if links > MAX_LINKS:
        raise _fail(errno.ELOOP)
    if target.startswith("/"):
        raise _fail(errno.EXDEV)
    pending.extend(reversed(target.split("/")))
    return links


def _walk(
    dirfd: int, parts: Sequence[str], flags: int, mode: int, follow_last: bool, no_links: bool
) -> int:
    """``openat2(RESOLVE_BENEATH)`` done by hand, one ``O_NOFOLLOW`` component at a time.

    ``stack`` holds the descriptors of the folders walked into, so ``..`` returns to the
    folder we really came from and can never climb above ``dirfd``.
    """
    pending = list(reversed(parts))
    stack: list[int] = []
    links = 0
    try:
        while True:
            cur = stack[-1] if stack else dirfd
            while pending and pending[-1] in ("", "."):
                pending.pop()
            if not pending:  # the path ends on the folder we are in
                return os.open(".", flags & ~os.O_NOFOLLOW, mode, dir_fd=cur)
            comp = pending.pop()
            if comp == "..":
                if not stack:
                    raise _fail(errno.EXDEV)
                os.close(stack.pop())
                continue
            last = all(p in ("", ".") for p in pending)
            if last:
                try:
                    fd = os.open(comp, flags | os.O_NOFOLLOW, mode, dir_fd=cur)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    target = _is_link_at(cur, comp)
                    if target is None:
                        raise
                    if no_links or not follow_last:
                        raise _fail(errno.ELOOP) from None
                    links = _splice(pending, target, links)
                    continue
                if follow_last and flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.close(fd)
                    target = _is_link_at(cur, comp)
                    if target is None:  # swapped back meanwhile: look again (bounded)
                        links += 1
                        if links > MAX_LINKS:
                            raise _fail(errno.ELOOP)
                        pending.append(comp)
                        continue
                    if no_links:
                        raise _fail(errno.ELOOP)
                    links = _splice(pending, target, links)
                    continue
                return fd
            try:
                stack.append(os.open(comp, _DIR_PATH | os.O_NOFOLLOW, dir_fd=cur))
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                target = _is_link_at(cur, comp)
                if target is None:
                    raise
                if no_links:
                    raise _fail(errno.ELOOP) from None
                links = _splice(pending, target, links)
    finally:
        for fd in stack:
            os.close(fd)


# --- results -------------------------------------------------------------------------------


@attrs.frozen
class DirEntry:
    """One entry of a folder listing; ``kind`` is ``file``, ``directory`` or ``symlink``."""

    name: str
    kind: str
    size: int
    modified: int
    mode: int


@attrs.frozen
class WalkEntry:
    """One entry of ``Root.walk``: ``path`` joins names from the root with ``/``;
    ``dir_fd`` is the folder holding it, valid until the walk moves on."""

    path: str
    kind: str
    stat: os.stat_result
    dir_fd: int
    name: str


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


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


# --- the root ------------------------------------------------------------------------------


class Root:
    """An open folder (a volume root) under which every path of this object is resolved.

    ``no_links=True`` refuses to go through any link at all (``RESOLVE_NO_SYMLINKS``):
    archives are extracted into such a root, so a link planted by one archive entry can
    never redirect a later one.
    """

    def __init__(self, fd: int, *, no_links: bool = False, owned: bool = True) -> None:
        self.fd = fd
        self.no_links = no_links
        self._owned = owned

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, no_links: bool = False) -> Root:
        """Open a trusted host folder (from config); its last component is not followed."""
        return cls(os.open(path, _DIR | os.O_NOFOLLOW), no_links=no_links)

    @classmethod
    def open_volume(cls, folder: str | os.PathLike[str]) -> Root:
        """``open`` for a registered volume's folder: a 404 if the folder vanished."""
        try:
            return cls.open(folder)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                log.warning("volume folder %s is missing or not a folder", folder)
                raise NotFound("Volume not found", code="volume_not_found") from None
            raise

    @classmethod
    def open_at(cls, dir_fd: int, name: str, *, no_links: bool = False) -> Root:
        return cls(os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=dir_fd), no_links=no_links)

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
        flags |= os.O_CLOEXEC
        if not follow_last:
            flags |= os.O_NOFOLLOW
        if USE_OPENAT2 and openat2_available():
            resolve = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
            if self.no_links:
                resolve |= _RESOLVE_NO_SYMLINKS
            path = os.fsencode("/".join(parts)) or b"."
            return _openat2(self.fd, path, flags, mode if flags & os.O_CREAT else 0, resolve)
        return _walk(self.fd, parts, flags, mode, follow_last, self.no_links)

    def _locate(self, parts: Sequence[str], *, follow_last: bool) -> tuple[int, str | None]:
        """The resolved parent folder (an ``O_PATH`` descriptor the caller closes) and the
        final name; ``None`` for the name when the path is a folder reached as a whole
        (the root, or a link ending in ``..``). With ``follow_last``, a final symlink is
        followed (beneath the root) until a name that is not a link."""
        current = list(parts)
        for _ in range(MAX_LINKS + 1):
            if not current or current[-1] == "..":
                return self.open_fd(current, _DIR_PATH), None
            parent_fd = self.open_fd(current[:-1], _DIR_PATH)
            name = current[-1]
            if not follow_last:
                return parent_fd, name
            try:
                target = _is_link_at(parent_fd, name)
            except BaseException:
                os.close(parent_fd)
                raise
            if target is None:
                return parent_fd, name
            os.close(parent_fd)
            if target.startswith("/"):
                raise _fail(errno.EXDEV)
            if self.no_links:
                raise _fail(errno.ELOOP)
            current = current[:-1] + [p for p in target.split("/") if p not in ("", ".")]
        raise _fail(errno.ELOOP)

    def _error(self, exc: OSError, rel: RelPath) -> ApiError:
        """The API error for an OS error met while resolving or acting on ``rel``."""
        code = exc.errno
        if code == errno.EXDEV:
            return PathEscapes()
        if code == errno.ELOOP:
            if self.no_links:
                return InvalidPath("path goes through a link", code="path_through_link")
            return InvalidPath("too many levels of symbolic links", code="symlink_loop")
        if code in (errno.ENOENT, errno.ENOTDIR):
            return PathNotFound(rel.text)
        if code == errno.ENAMETOOLONG:
            return InvalidPath("name too long", code="name_too_long")
        if code in (errno.ENOSPC, errno.EDQUOT):
            return NoSpace()
        log.warning("file operation on %r failed: %s", rel.text, exc)
        return FileOperationFailed(exc)

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
                return self.open_fd(rel.parts, _DIR)
            except NotADirectoryError:
                # the last component is not a folder (the walk is the same either way)
                if self._is_last_not_dir(rel):
                    raise NotAFolder(rel.text) from None
                raise

    def _is_last_not_dir(self, rel: RelPath) -> bool:
        try:
            return not stat.S_ISDIR(self.stat(rel).st_mode)
        except ApiError:
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
                    kind = _kind(st.st_mode)
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
        """Open a regular file for reading (in-volume links followed)."""
        with self._errors(rel):
            fd = self.open_fd(rel.parts, _READ)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotAFile(rel.text)
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb", buffering=CHUNK)
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, rel: RelPath) -> bytes:
        with self.open_file(rel) as fh:
            return fh.read()

    # --- writing -----------------------------------------------------------------------

    def make_dirs(self, rel: RelPath, *, report: RelPath | None = None) -> list[RelPath]:
        """``mkdir -p`` beneath the root; an in-volume link to a folder counts as one.
        A file (or dangling link) in the way is a 409 naming ``report`` (default ``rel``).
        Returns the folders it created, outermost first (for ``remove_created``)."""
        report = report or rel
        created: list[RelPath] = []
        for depth in range(1, len(rel.parts) + 1):
            prefix = rel.parts[:depth]
            with self._errors(report):
                try:
                    os.close(self.open_fd(prefix, _DIR_PATH))
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
                except FileExistsError:
                    try:  # created meanwhile (fine), or a dangling link (in the way)
                        os.close(self.open_fd(prefix, _DIR_PATH))
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
    ) -> Iterator[AtomicFile]:
        """Create the file at ``rel`` through a temporary name in the same folder; it
        appears, complete, when the block ends without error, else it never appears.

        ``replace=True`` (a write) follows an in-volume link at ``rel`` and replaces the
        file it names, keeping that file's mode when ``keep_mode``. ``replace=False``
        (a new archive) refuses anything already at ``rel``, even a dangling link (409),
        checked again atomically at the rename.
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
                existing = _lstat(parent_fd, name)
            if existing is not None:
                if stat.S_ISDIR(existing.st_mode):
                    raise FolderExists(rel.text)
                if not replace:
                    raise FileExists(rel.text)
                if keep_mode and stat.S_ISREG(existing.st_mode):
                    mode = stat.S_IMODE(existing.st_mode)
            # Never setuid/setgid/sticky from an API write; the file belongs to whoever
            # owned the one it replaces, else to its folder's owner: a server running as
            # a non-root user can still read what the panel wrote for it.
            mode &= 0o777
            owner = existing if existing is not None else os.fstat(parent_fd)
            tmp = TEMP_PREFIX + secrets.token_hex(8)
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
                        os.fchown(fd, owner.st_uid, owner.st_gid)
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
                        _fsync_dir(parent_fd)
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
        self, source: RelPath, destination: RelPath, *, checkpoint: Callable[[], None] = _noop
    ) -> None:
        """Copy a file, link or folder tree to a new path; links are copied as links.

        The copy is built under a temporary name beside the destination and renamed into
        place, so it appears whole or not at all. A destination inside the source is fine:
        the copy being built is skipped by identity, so it never copies itself.
        """
        with self._errors(source):
            src_dir, src_name = self._locate(source.parts, follow_last=False)
        try:
            src_name = src_name or "."
            with self._errors(source):
                src_st = _lstat(src_dir, src_name)
            if src_st is None:
                raise PathNotFound(source.text)
            if not destination.parts:
                raise FileExists(destination.text)
            self.make_dirs(destination.parent, report=destination)
            with self._errors(destination):
                dst_dir, dst_name = self._locate(destination.parts, follow_last=False)
            try:
                if dst_name is None or _lstat(dst_dir, dst_name) is not None:
                    raise FileExists(destination.text)
                tmp = TEMP_PREFIX + secrets.token_hex(8)
                try:
                    with self._errors(source):
                        _copy_entry(src_dir, src_name, src_st, dst_dir, tmp, set(), 0, checkpoint)
                    with self._errors(destination):
                        try:
                            rename_noreplace(dst_dir, tmp, dst_dir, dst_name)
                        except FileExistsError:
                            raise FileExists(destination.text) from None
                except BaseException:
                    _remove_at(dst_dir, tmp)
                    raise
            finally:
                os.close(dst_dir)
        finally:
            os.close(src_dir)

    def rename(self, source: RelPath, destination: RelPath, *, replace: bool = False) -> None:
        """Move ``source`` (a link is moved as a link) to ``destination`` (parents created);
        an existing destination is a 409 unless ``replace`` (never a folder)."""
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
                if src_name is None or _lstat(src_dir, src_name) is None:
                    raise PathNotFound(source.text)
                if dst_name is None:
                    raise FolderExists(destination.text)
                existing = _lstat(dst_dir, dst_name)
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
                st = _lstat(parent_fd, name)
                if st is None:
                    raise PathNotFound(rel.text)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(name, dir_fd=parent_fd)
                else:
                    os.unlink(name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def chmod(self, rel: RelPath, mode: int) -> None:
        """Change permission bits of the file or folder at ``rel``. In-volume links are
        followed; the object changed is the one opened, so a link swapped in cannot
        redirect the change (``fchmod`` on a descriptor, never ``chmod`` on a name)."""
        with self._errors(rel):
            fd = self.open_fd(rel.parts, os.O_PATH)
            try:
                # an O_PATH descriptor cannot be fchmod-ed; its /proc entry names exactly
                # the object we opened (what glibc's fchmodat fallback does)
                os.chmod(f"/proc/self/fd/{fd}", mode & 0o7777)
            finally:
                os.close(fd)

    # --- building trees (archive extraction) ---------------------------------------------

    def create_file(self, rel: RelPath, mode: int = 0o644) -> int:
        """A new, empty file at ``rel`` opened for writing; whatever non-folder was there
        (an earlier archive entry of the same name, a link) is replaced, never followed.
        The parent folder must exist."""
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        try:
            if name is None:
                raise FolderExists(rel.text)
            with self._errors(rel):
                self._clear(parent_fd, name, rel)
                return os.open(
                    name,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=parent_fd,
                )
        finally:
            os.close(parent_fd)

    def symlink(self, rel: RelPath, target: str) -> None:
        """Create a symlink at ``rel`` (replacing a non-folder). The target is not checked
        here: a link is only text until someone resolves it, and we resolve beneath."""
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        try:
            if name is None:
                raise FolderExists(rel.text)
            with self._errors(rel):
                self._clear(parent_fd, name, rel)
                os.symlink(target, name, dir_fd=parent_fd)
        finally:
            os.close(parent_fd)

    def hardlink(self, target: RelPath, rel: RelPath) -> None:
        """Hard-link the regular file at ``target`` (no link followed) to ``rel``."""
        with self._errors(target):
            tdir, tname = self._locate(target.parts, follow_last=False)
        try:
            with self._errors(target):
                st = _lstat(tdir, tname) if tname else None
            if st is None or not stat.S_ISREG(st.st_mode):
                raise PathNotFound(target.text)
            with self._errors(rel):
                pdir, name = self._locate(rel.parts, follow_last=False)
            try:
                if name is None:
                    raise FolderExists(rel.text)
                with self._errors(rel):
                    self._clear(pdir, name, rel)
                    assert tname is not None
                    os.link(tname, name, src_dir_fd=tdir, dst_dir_fd=pdir, follow_symlinks=False)
            finally:
                os.close(pdir)
        finally:
            os.close(tdir)

    def _clear(self, dir_fd: int, name: str, rel: RelPath) -> None:
        existing = _lstat(dir_fd, name)
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
        checkpoint: Callable[[], None] = _noop,
    ) -> Iterator[WalkEntry]:
        """Every entry at and below ``rel``, parents before children, names sorted.

        Links are reported, never followed; a folder swapped for a link while we walk is
        reported as found, not entered. ``skip(stat)`` drops an entry (and its subtree).
        The root itself is not reported when ``rel`` is the root.
        """
        with self._errors(rel):
            parent_fd, name = self._locate(rel.parts, follow_last=False)
        stack: list[tuple[int, str, Iterator[str]]] = []
        try:
            if name is None:
                with self._errors(rel):
                    top = os.open(".", _DIR, dir_fd=parent_fd)
                stack.append((top, "", iter(sorted(os.listdir(top)))))
            else:
                with self._errors(rel):
                    st = _lstat(parent_fd, name)
                if st is None:
                    raise PathNotFound(rel.text)
                if skip(st):
                    return
                entry = WalkEntry(str(rel), _kind(st.st_mode), st, parent_fd, name)
                yield entry
                if entry.kind == "directory":
                    self._push(stack, parent_fd, name, str(rel), rel)
            while stack:
                checkpoint()
                dir_fd, prefix, names = stack[-1]
                child = next(names, None)
                if child is None:
                    os.close(stack.pop()[0])
                    continue
                st = _lstat(dir_fd, child)
                if st is None or skip(st):
                    continue
                path = f"{prefix}/{child}" if prefix else child
                entry = WalkEntry(path, _kind(st.st_mode), st, dir_fd, child)
                yield entry
                if entry.kind == "directory":
                    self._push(stack, dir_fd, child, path, rel)
        finally:
            for fd, _, _ in stack:
                os.close(fd)
            os.close(parent_fd)

    def _push(
        self,
        stack: list[tuple[int, str, Iterator[str]]],
        dir_fd: int,
        name: str,
        path: str,
        rel: RelPath,
    ) -> None:
        if len(stack) >= MAX_DEPTH:
            raise InvalidPath("folder tree too deep", code="tree_too_deep")
        try:
            fd = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return  # replaced while we walked: nothing to enter
            raise self._error(exc, rel) from None
        stack.append((fd, path, iter(sorted(os.listdir(fd)))))

    @staticmethod
    def open_entry(entry: WalkEntry) -> BinaryIO | None:
        """Open a walked regular file for reading (``None`` if it is no longer one)."""
        try:
            fd = os.open(entry.name, _NOFOLLOW_READ, dir_fd=entry.dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)

    @staticmethod
    def read_link(entry: WalkEntry) -> str | None:
        return _is_link_at(entry.dir_fd, entry.name)


# --- helpers -------------------------------------------------------------------------------


def _fsync_dir(dir_fd: int) -> None:
    fd = os.open(".", _DIR, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_at(dir_fd: int, name: str) -> None:
    """Best-effort removal of our own temporary file or tree (no link followed)."""
    try:
        st = _lstat(dir_fd, name)
        if st is None:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
    except OSError as exc:
        log.warning("could not remove temporary %s: %s", name, exc)


def copy_data(src: int, dst: int, checkpoint: Callable[[], None] = _noop) -> int:
    """Copy a whole file between descriptors (``copy_file_range``, else read/write)."""
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


def _copy_entry(
    src_dir: int,
    name: str,
    st: os.stat_result,
    dst_dir: int,
    dst_name: str,
    skip: set[tuple[int, int]],
    depth: int,
    checkpoint: Callable[[], None],
) -> None:
    """Copy one entry (recursively for folders) between two folder descriptors."""
    checkpoint()
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        target = _is_link_at(src_dir, name)
        if target is not None:
            os.symlink(target, dst_name, dir_fd=dst_dir)
    elif stat.S_ISREG(mode):
        try:
            src = os.open(name, _NOFOLLOW_READ, dir_fd=src_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return  # gone or swapped for a link while we copied
            raise
        try:
            if not stat.S_ISREG(os.fstat(src).st_mode):
                return
            os.set_blocking(src, True)
            dst = os.open(
                dst_name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dst_dir,
            )
            try:
                copy_data(src, dst, checkpoint)
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
            src = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=src_dir)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return
            raise
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dst_dir)
            dst = os.open(dst_name, _DIR | os.O_NOFOLLOW, dir_fd=dst_dir)
            try:
                dst_st = os.fstat(dst)
                skip.add((dst_st.st_dev, dst_st.st_ino))
                src_st = os.fstat(src)
                if (src_st.st_dev, src_st.st_ino) not in skip:
                    for child in sorted(os.listdir(src)):
                        child_st = _lstat(src, child)
                        if child_st is None or (child_st.st_dev, child_st.st_ino) in skip:
                            continue
                        _copy_entry(src, child, child_st, dst, child, skip, depth + 1, checkpoint)
                os.fchmod(dst, stat.S_IMODE(mode) & 0o777)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)
    # sockets, FIFOs and device nodes are not copied: they are not data


def merge_tree(
    src_fd: int,
    dst_fd: int,
    backup_fd: int,
    *,
    prefix: str = "",
    checkpoint: Callable[[], None] = _noop,
) -> None:
    """Move everything in folder ``src_fd`` into folder ``dst_fd``, all or nothing.

    Names new to the destination are renamed in; folders on both sides are merged;
    other entries present on both sides are replaced, the old one parked in
    ``backup_fd``. A folder against a non-folder is a 409 found before anything moves.
    If a move fails midway (a race, a full disk, cancellation), every move already made
    is undone in reverse order. ``prefix`` is the destination's client path, for messages.
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
        new = _lstat(src, name)
        if new is None:
            continue
        old = _lstat(dst, name)
        if old is not None and stat.S_ISDIR(new.st_mode) != stat.S_ISDIR(old.st_mode):
            raise (FileExists if stat.S_ISDIR(new.st_mode) else FolderExists)(shown)
        if old is not None and stat.S_ISDIR(new.st_mode):
            sub_src = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=src)
            opened.append(sub_src)
            sub_dst = os.open(name, _DIR | os.O_NOFOLLOW, dir_fd=dst)
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
