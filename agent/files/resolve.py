"""Resolution beneath a directory descriptor: the kernel calls, and the fallback walk.

Every path is opened relative to a descriptor of its root:

* with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`` where the kernel has it: the
  kernel follows links that stay beneath the root and refuses, atomically, any that
  leaves it (``EXDEV``);
* else by a component walk: each component is opened with ``O_NOFOLLOW`` relative to the
  descriptor of its parent, and symlinks are read and spliced in by hand under the same
  rules (absolute target or ``..`` above the root: escape; 40 links: loop).

Everything here raises raw ``OSError`` (``EXDEV``: escape, ``ELOOP``: a loop, or a link
where none is allowed); ``errors.from_os_error`` turns them into file errors.
``USE_OPENAT2``/``USE_RENAMEAT2`` let tests force the fallbacks on a kernel that has both.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
from collections.abc import Sequence

__all__ = [
    "DIR",
    "DIR_PATH",
    "MAX_LINKS",
    "NOFOLLOW_READ",
    "READ",
    "USE_OPENAT2",
    "USE_RENAMEAT2",
    "link_target_at",
    "locate",
    "lstat_at",
    "open_beneath",
    "open_regular",
    "open_regular_at",
    "openat2_available",
    "rename_noreplace",
]

log = logging.getLogger(__name__)

#: Tests set these to False to exercise the fallbacks on a kernel that has both calls.
USE_OPENAT2 = True
USE_RENAMEAT2 = True

#: Links followed in one resolution before it is a loop (the kernel's own limit).
MAX_LINKS = 40

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2

#: A folder opened for reading (listing, fchmod, fsync).
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: A folder opened only to resolve names beneath it.
DIR_PATH = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
#: Reading a file that may have been swapped for a FIFO or a device node meanwhile:
#: never block on it, never make it our terminal; callers check ``S_ISREG`` after.
READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
NOFOLLOW_READ = READ | os.O_NOFOLLOW


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
        root = os.open("/", DIR_PATH)
        try:
            os.close(_openat2(root, b".", DIR_PATH, 0, _RESOLVE_BENEATH))
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
    if lstat_at(dst_dir, dst) is not None:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)


def rename_exchange(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Swap two names atomically (``renameat2(RENAME_EXCHANGE)``): at no moment is either
    missing. ``OSError`` (``EINVAL``/``ENOSYS`` where the kernel or file system lacks it:
    there is no safe fallback, the caller decides)."""
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    result = _renameat2(
        ctypes.c_int(src_dir),
        ctypes.c_char_p(os.fsencode(src)),
        ctypes.c_int(dst_dir),
        ctypes.c_char_p(os.fsencode(dst)),
        ctypes.c_uint(_RENAME_EXCHANGE),
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in a folder, ``None`` if nothing is there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def link_target_at(dir_fd: int, name: str) -> str | None:
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
                    target = link_target_at(cur, comp)
                    if target is None:
                        raise
                    if no_links or not follow_last:
                        raise _fail(errno.ELOOP) from None
                    links = _splice(pending, target, links)
                    continue
                if follow_last and flags & os.O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):
                    os.close(fd)
                    target = link_target_at(cur, comp)
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
                stack.append(os.open(comp, DIR_PATH | os.O_NOFOLLOW, dir_fd=cur))
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                target = link_target_at(cur, comp)
                if target is None:
                    raise
                if no_links:
                    raise _fail(errno.ELOOP) from None
                links = _splice(pending, target, links)
    finally:
        for fd in stack:
            os.close(fd)


def open_beneath(
    dirfd: int,
    parts: Sequence[str],
    flags: int,
    mode: int = 0,
    *,
    follow_last: bool = True,
    no_links: bool = False,
) -> int:
    """Open ``parts`` beneath ``dirfd`` (raw ``OSError``; ``EXDEV`` means escape).
    ``no_links`` refuses to go through any link at all (``ELOOP``)."""
    flags |= os.O_CLOEXEC
    if not follow_last:
        flags |= os.O_NOFOLLOW
    if USE_OPENAT2 and openat2_available():
        resolve = _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS
        if no_links:
            resolve |= _RESOLVE_NO_SYMLINKS
        path = os.fsencode("/".join(parts)) or b"."
        return _openat2(dirfd, path, flags, mode if flags & os.O_CREAT else 0, resolve)
    return _walk(dirfd, parts, flags, mode, follow_last, no_links)


def _reopen_regular(path_fd: int) -> int | None:
    """A blocking read descriptor of the object an ``O_PATH`` descriptor names, if it is a
    regular file, else ``None`` (``path_fd`` is closed either way).

    Nothing is ``open()``-ed before its type is known: opening a FIFO blocks (or, with
    ``O_NONBLOCK``, still wakes its writer) and a device's open may act on the device. The
    type comes from ``fstat`` of the ``O_PATH`` descriptor, which opens nothing; the file
    is then reopened through ``/proc/self/fd``, which names that very inode, so it cannot
    have been swapped meanwhile.
    """
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None
        # (the agent needs /proc mounted, as ``Root.chmod`` does)
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def open_regular(
    dirfd: int, parts: Sequence[str], *, follow_last: bool = True, no_links: bool = False
) -> int | None:
    """``open_beneath`` for reading a regular file: ``None`` if ``parts`` is anything
    else (folder, FIFO, device node, socket, or a link when ``follow_last`` is false)."""
    path_fd = open_beneath(dirfd, parts, os.O_PATH, follow_last=follow_last, no_links=no_links)
    return _reopen_regular(path_fd)


def open_regular_at(dir_fd: int, name: str) -> int | None:
    """The regular file ``name`` in a folder opened for reading, no link followed;
    ``None`` if it is gone or is anything else (a link, a FIFO, a device node...)."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return _reopen_regular(path_fd)


def locate(
    dirfd: int, parts: Sequence[str], *, follow_last: bool, no_links: bool = False
) -> tuple[int, str | None]:
    """The resolved parent folder of ``parts`` (an ``O_PATH`` descriptor the caller
    closes) and the final name; ``None`` for the name when the path is a folder reached
    as a whole (the root, or a link ending in ``..``). With ``follow_last``, a final
    symlink is followed (beneath ``dirfd``) until a name that is not a link."""
    current = list(parts)
    for _ in range(MAX_LINKS + 1):
        if not current or current[-1] == "..":
            return open_beneath(dirfd, current, DIR_PATH, no_links=no_links), None
        parent_fd = open_beneath(dirfd, current[:-1], DIR_PATH, no_links=no_links)
        name = current[-1]
        if not follow_last:
            return parent_fd, name
        try:
            target = link_target_at(parent_fd, name)
        except BaseException:
            os.close(parent_fd)
            raise
        if target is None:
            return parent_fd, name
        os.close(parent_fd)
        if target.startswith("/"):
            raise _fail(errno.EXDEV)
        if no_links:
            raise _fail(errno.ELOOP)
        current = current[:-1] + [p for p in target.split("/") if p not in ("", ".")]
    raise _fail(errno.ELOOP)
