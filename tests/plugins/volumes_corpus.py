"""Helpers for the volume tests: hostile archives built in memory, and snapshots of
folders that prove nothing outside a volume changed and nothing from outside leaked in."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

#: Bytes only the sentinel folder (outside every volume) holds.
SECRET = b"TOP-SECRET-7f3a9c-do-not-leak"


# --- snapshots -------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple[str, object, int]]:
    """Every entry under ``root`` (links not followed): kind, content or target, mode."""
    result: dict[str, tuple[str, object, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", os.readlink(path), 0)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", None, stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                result[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
            else:
                result[rel] = ("other", None, stat.S_IMODE(st.st_mode))
    return result


def leaked(root: Path) -> list[str]:
    """Files under ``root`` whose bytes (or archive members' bytes) hold ``SECRET``."""
    found = []
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            if SECRET in data or SECRET in _archive_payload(data):
                found.append(str(path.relative_to(root)))
    return found


def _archive_payload(data: bytes) -> bytes:
    """All member bytes of a zip or tar held in ``data`` (empty if it is neither)."""
    out = io.BytesIO()
    try:
        if data.startswith(b"PK"):
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                for info in zf.infolist():
                    out.write(zf.read(info))
        else:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
                for member in tf:
                    fh = tf.extractfile(member) if member.isreg() else None
                    if fh is not None:
                        out.write(fh.read())
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError):
        return b""
    return out.getvalue()


# --- archives --------------------------------------------------------------------------------


def zip_bytes(
    entries: Iterable[tuple[str, bytes] | zipfile.ZipInfo | tuple[zipfile.ZipInfo, bytes]],
) -> bytes:
    """A zip of ``(name, data)`` pairs or prepared ``ZipInfo`` (with data)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                zf.writestr(entry, b"")
            else:
                zf.writestr(entry[0], entry[1])
    return buf.getvalue()


def zip_symlink(name: str, target: str) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target.encode()


def zip_special(name: str, kind: int) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (kind | 0o644) << 16
    return info, b""


def tar_entry(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    mode: int = 0o644,
    size: int | None = None,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if size is not None:
        info.size = size
    info.mtime = 1_700_000_000
    return info, data


def tar_bytes(entries: Iterable[tuple[tarfile.TarInfo, bytes]], compression: str = "") -> bytes:
    """A tar (``compression`` ``""``, ``gz``, ``bz2``, ``xz``) of prepared members."""
    buf = io.BytesIO()
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.PAX_FORMAT) as tf:  # type: ignore[call-overload]
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def tar_with_zero_member(name: str, size: int, compression: str = "gz") -> bytes:
    """A compressed tar holding one member of ``size`` zero bytes (a bomb in small)."""

    class Zeros(io.RawIOBase):
        def __init__(self, left: int) -> None:
            self.left = left

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:  # type: ignore[override]
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n

    buf = io.BytesIO()
    info = tarfile.TarInfo(name)
    info.size = size
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tf:  # type: ignore[call-overload]
        tf.addfile(info, io.BufferedReader(Zeros(size)))
    return buf.getvalue()


def zip_with_zero_member(name: str, size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open(name, "w") as w:
        block = bytes(1 << 20)
        left = size
        while left:
            n = min(left, len(block))
            w.write(block[:n])
            left -= n
    return buf.getvalue()


def tar_with_huge_pax_header(size: int = 1 << 30) -> bytes:
    """A tar whose first header announces a pax header of ``size`` bytes (tarfile would
    read it whole into memory)."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = size
    return info.tobuf(format=tarfile.USTAR_FORMAT) + bytes(10240)
