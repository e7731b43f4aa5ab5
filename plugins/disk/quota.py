"""Kernel project quotas: the file system enforces a volume's limit on every writer.

Where ``storage.volumes_path`` lies on XFS mounted with ``prjquota`` (or ext4 with the
``project`` and ``quota`` features, mounted with ``prjquota``), each volume folder with a
limit gets a project id of its own and the inherit flag (``FS_IOC_FSSETXATTR``: what
``xfs_quota -x -c 'project -s'`` does), and the project a hard block limit
(``quotactl(Q_SETQUOTA)``: ``limit -p bhard=``). Everything created below the folder, by
the container or by the agent, is then charged to the project, and a write beyond the
limit fails in the kernel (``ENOSPC`` on XFS, ``EDQUOT`` on ext4). Usage is one
``quotactl(Q_GETQUOTA)``: no walk.

Why syscalls rather than ``xfs_quota`` commands: reading usage must be cheap enough for
every ``GET /volumes/:id`` and every stats frame (a syscall is microseconds, a process
milliseconds), the same calls work on XFS and ext4, and nothing depends on xfsprogs
being installed on the node. ``quotactl_fd`` (Linux 5.14) names the file system by a
descriptor of the folder; older kernels get the block device from ``/proc/self/mountinfo``.

Blocking (ioctl and quotactl on a disk file system): call from a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = ["ProjectQuota"]

log = logging.getLogger(__name__)

_FS_IOC_FSGETXATTR = 0x801C581F  # _IOR('X', 31, struct fsxattr)
_FS_IOC_FSSETXATTR = 0x401C5820  # _IOW('X', 32, struct fsxattr)
_FS_XFLAG_PROJINHERIT = 0x00000200
#: struct fsxattr: xflags, extsize, nextents, projid, cowextsize, 8 bytes of padding.
_FSXATTR = struct.Struct("=IIIII8x")

_PRJQUOTA = 2
_Q_GETQUOTA = 0x800007
_Q_SETQUOTA = 0x800008
_Q_XGETQSTAT = (ord("X") << 8) + 5
_FS_QUOTA_PDQ_ENFD = 1 << 5
_QIF_BLIMITS = 1
#: struct if_dqblk: bhardlimit, bsoftlimit, curspace, ihardlimit, isoftlimit, curinodes,
#: btime, itime (u64), valid (u32).
_DQBLK = struct.Struct("=QQQQQQQQI4x")
_QIF_DQBLKSIZE = 1024
_SYS_QUOTACTL_FD = 443  # the same number on every architecture (a new syscall)

_libc = ctypes.CDLL(None, use_errno=True)


def _qcmd(cmd: int) -> int:
    return (cmd << 8) | _PRJQUOTA


def _mount_device(path: Path) -> str | None:
    """The source device of the mount holding ``path`` (longest mount point prefix)."""
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open("/proc/self/mountinfo") as fh:
            for line in fh:
                fields = line.split()
                point = fields[4].replace("\\040", " ")
                source = fields[fields.index("-") + 2]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and (best is None or len(point) > best[0]):
                    best = (len(point), source)
    except (OSError, ValueError, IndexError):
        return None
    return None if best is None or not best[1].startswith("/") else best[1]


class ProjectQuota:
    """Project quotas of the file system holding ``root`` (the volumes folder)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._device: bytes | None = None
        self._use_fd = True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @classmethod
    def probe(cls, root: Path) -> ProjectQuota | None:
        """Project quotas for ``root`` when the file system enforces them, else ``None``."""
        try:
            quota = cls(root)
        except OSError:
            return None
        try:
            buffer = ctypes.create_string_buffer(256)
            quota._call(_Q_XGETQSTAT, 0, buffer)
            (flags,) = struct.unpack_from("=H", buffer.raw, 2)
            if not flags & _FS_QUOTA_PDQ_ENFD:
                raise OSError(errno.ESRCH, "project quotas are not enforced")
        except OSError as exc:
            log.info("no kernel project quotas under %s (%s): usage is accounted", root, exc)
            quota.close()
            return None
        return quota

    def _call(self, cmd: int, ident: int, buffer: ctypes.Array[ctypes.c_char]) -> None:
        if self._use_fd:
            result = _libc.syscall(
                ctypes.c_long(_SYS_QUOTACTL_FD),
                ctypes.c_int(self._fd),
                ctypes.c_uint(_qcmd(cmd)),
                ctypes.c_int(ident),
                buffer,
            )
            if result == 0:
                return
            err = ctypes.get_errno()
            if err not in (errno.ENOSYS, errno.EPERM) or self._device is not None:
                raise OSError(err, os.strerror(err))
            device = _mount_device(self.root)  # no quotactl_fd (or it is filtered)
            if device is None:
                raise OSError(err, os.strerror(err))
            self._device = os.fsencode(device)
            self._use_fd = False
        result = _libc.quotactl(
            ctypes.c_int(_qcmd(cmd)), ctypes.c_char_p(self._device), ctypes.c_int(ident), buffer
        )
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    def usage(self, project: int) -> tuple[int, int]:
        """Bytes and inodes charged to ``project``."""
        buffer = ctypes.create_string_buffer(_DQBLK.size)
        self._call(_Q_GETQUOTA, project, buffer)
        values = _DQBLK.unpack(buffer.raw)
        return values[2], values[5]

    def set_limit(self, project: int, size_limit: int) -> None:
        """A hard block limit of ``size_limit`` bytes (0: none) for ``project``."""
        blocks = -(-size_limit // _QIF_DQBLKSIZE)
        buffer = ctypes.create_string_buffer(
            _DQBLK.pack(blocks, 0, 0, 0, 0, 0, 0, 0, _QIF_BLIMITS), _DQBLK.size
        )
        self._call(_Q_SETQUOTA, project, buffer)

    @staticmethod
    def _tag(fd: int, project: int) -> None:
        buffer = bytearray(_FSXATTR.size)
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, buffer)
        xflags, extsize, nextents, _, cow = _FSXATTR.unpack(buffer)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            xflags |= _FS_XFLAG_PROJINHERIT
        fcntl.ioctl(fd, _FS_IOC_FSSETXATTR, _FSXATTR.pack(xflags, extsize, nextents, project, cow))

    @classmethod
    def _tag_file(cls, dir_fd: int, name: str, project: int) -> None:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=dir_fd)
        except OSError:
            return  # a link (ELOOP), gone, or not openable: holds no blocks of its own
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                cls._tag(fd, project)
        finally:
            os.close(fd)

    def assign(
        self, folder: Path, project: int, *, checkpoint: Callable[[], None] = lambda: None
    ) -> None:
        """Give ``folder`` and everything in it ``project`` (folders also the inherit flag,
        so what is created later belongs to it too). Links are never followed; entries
        that are neither folders nor regular files are left (they hold no blocks)."""
        top = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self._tag(top, project)
            for _, _, names, dir_fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                checkpoint()
                self._tag(dir_fd, project)
                for name in names:
                    self._tag_file(dir_fd, name, project)
        finally:
            os.close(top)
