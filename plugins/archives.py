"""Built-in plugin ``archives``: compress and decompress inside a volume (contract §5).

Formats: ``zip``, ``tar``, ``tar.gz``, ``tar.bz2`` and [ext] ``tar.xz``, with the standard
library only. Every file touched goes through ``lightd.files``; volumes are reached only
through ``agent.stash[VOLUMES]`` (the ``VolumeService`` of the volumes plugin).

Compression walks the sources beneath the volume root without following any link, stores
links as links (and repeated hard links as hard links), skips the archive being written
(by identity, not by name) and renames the finished archive into place, refusing to
replace anything there.

Extraction is all-or-nothing. Entries are validated one by one as they stream in and
written into a private folder inside the destination, resolved with no link followed at
all (so "link, then write through it" cannot work); absolute names, ``..``, device files,
links or hard links leaving the destination, and the size and entry-count limits fail the
whole request with ``400 Invalid archive: <reason>``. Only a complete, valid tree is then
moved into place (``lightd.files.merge_tree``: existing files replaced, folders merged, every
move undone if one fails); the private folder is removed in every case.

Hooks: ``lightd_add_config_sections`` (section ``archives``), ``lightd_configure``
(the worker limiter), ``lightd_add_routes``.

Config section ``archives``: ``max_total_bytes`` (10 GiB) uncompressed bytes one archive
may hold, ``max_entries`` (100 000) entries one archive may hold, ``workers`` (2)
archives processed at once (others wait their turn).

Routes: ``POST /volumes/:id/compress``, ``POST /volumes/:id/decompress`` (and its [alias]
body ``{"root","file"}``). With ``"async": true`` in the body either runs as a job (contract
§14; kinds ``volume.compress`` and ``volume.decompress``, cancelled with the ``files``
permission): the answer is ``202 {"message","job_id"}`` once the request is checked, the
job reports bytes (of the sources read, of the archive read), its ``result`` is the body
the synchronous 200 would have had, and it fails with the same messages. Its staging name
(the archive's temporary file, the extraction's private folder) comes from
``job.temp_path``, so even a crash leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import lzma
import os
import secrets
import shutil
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NotRequired, TypedDict, TypeVar

import attrs
import trio
from lightd import (
    DISK,
    JOBS,
    VOLUMES,
    Agent,
    BadRequest,
    ContainersSettings,
    FieldError,
    JobContext,
    JobStarted,
    NotFound,
    StashKey,
    disk_writing,
    field_check,
    hookimpl,
)
from lightd.api import describe, read_json, requires, wants_job
from lightd.files import (
    CHUNK,
    TEMP_PREFIX,
    BadArchive,
    BoundedTarInfo,
    FileExists,
    FileOperationFailed,
    FolderExists,
    InvalidPath,
    NoSpace,
    NotAFile,
    Owner,
    PathNotFound,
    RelPath,
    Root,
    WalkEntry,
    link_stays_inside,
    merge_tree,
    parse,
)
from lightd.files import entry_path as files_entry_path
from quart import Blueprint

__all__ = [
    "FORMATS",
    "ArchivesConfig",
    "InvalidArchive",
    "Meter",
    "compress",
    "decompress",
    "detect",
]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Format name → the extension ``output_name`` gets unless it already ends with it.
FORMATS = {
    "zip": ".zip",
    "tar": ".tar",
    "tar.gz": ".tar.gz",
    "tar.bz2": ".tar.bz2",
    "tar.xz": ".tar.xz",
}
_SUFFIXES = (
    (".tar.gz", "tar.gz"),
    (".tgz", "tar.gz"),
    (".tar.bz2", "tar.bz2"),
    (".tbz2", "tar.bz2"),
    (".tbz", "tar.bz2"),
    (".tar.xz", "tar.xz"),
    (".txz", "tar.xz"),
    (".zip", "zip"),
    (".tar", "tar"),
)
#: Largest zip central directory we let ``zipfile`` read (it reads it whole into memory,
#: then keeps a ~400-byte object per entry); 100 000 ordinary entries take ~15 MB.
MAX_ZIP_DIRECTORY = 64 << 20
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # zip64 end of central directory locator (20)
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory record (56)
_CD_ENTRY = struct.Struct("<4s4B4HL2L5H2L")  # central directory file header (46)
_UTF8_FLAG = 0x800
MAX_LINK_TARGET = 4095
GZIP_LEVEL = 6  # what gzip(1) and zip(1) use by default; tarfile's own default is 9
#: Seconds between two looks of a job at its worker thread's progress.
REPORT_INTERVAL = 0.25


def _positive(value: int) -> bool:
    return value > 0


@attrs.define
class Meter:
    """Progress of work in a worker thread, in bytes: the thread writes, the job reads
    (plain attribute stores, so no lock and no call back into trio per chunk)."""

    done: int = 0
    total: int | None = None

    def add(self, n: int) -> None:
        self.done += n


def _noop() -> None:
    pass


@attrs.frozen
class ArchivesConfig:
    #: Uncompressed bytes one archive may expand to.
    max_total_bytes: int = attrs.field(
        default=10 * 1024**3, validator=field_check(_positive, "must be > 0")
    )
    #: Entries (files, folders, links) one archive may hold.
    max_entries: int = attrs.field(default=100_000, validator=field_check(_positive, "must be > 0"))
    #: Archives compressed or extracted at the same time; more wait for a free worker.
    workers: int = attrs.field(
        default=2, validator=field_check(lambda v: 1 <= v <= 16, "must be 1 to 16")
    )


class InvalidArchive(BadRequest):
    """400 ``Invalid archive: <reason>``; nothing of the archive is left in the volume."""

    code = "invalid_archive"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid archive: {reason}")


def _show(name: str) -> str:
    """An archive entry name as quoted in an error (it is the archive's text, not ours)."""
    return name if len(name) <= 120 else name[:117] + "..."


def detect(name: str, head: bytes) -> str | None:
    """The archive format from its name, else [ext] from its first bytes."""
    lower = name.lower()
    for suffix, fmt in _SUFFIXES:
        if lower.endswith(suffix):
            return fmt
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if head.startswith(b"BZh"):
        return "tar.bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "tar.xz"
    if head[257:262] == b"ustar":
        return "tar"
    return None


def entry_path(name: str, *, what: str = "entry") -> RelPath:
    """An archive entry name as a path inside the destination (the file layer's rules),
    or ``InvalidArchive``."""
    try:
        return files_entry_path(name, what=what)
    except BadArchive as exc:
        raise InvalidArchive(exc.reason) from None


_CORRUPT = (
    UnicodeDecodeError,  # zipfile: a name flagged UTF-8 that is not (before ValueError)
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    EOFError,
    NotImplementedError,  # a zip compression method the standard library lacks
    RuntimeError,  # zipfile: "File … is encrypted, password required"
    OSError,  # gzip.BadGzipFile, bz2 "Invalid data stream", reading the archive itself
)


def _corrupt(exc: BaseException) -> InvalidArchive:
    if isinstance(exc, UnicodeDecodeError):
        return InvalidArchive("entry name is not valid UTF-8")
    if isinstance(exc, RuntimeError) and "encrypted" in str(exc):
        return InvalidArchive("encrypted entries are not supported")
    if isinstance(exc, NotImplementedError):
        return InvalidArchive("unsupported compression method")
    if isinstance(exc, EOFError) or "unexpected end" in str(exc):
        return InvalidArchive("unexpected end of data")
    return InvalidArchive("corrupt or unreadable data")


def _reading(fn: Callable[[], T]) -> T:
    """Call into zipfile/tarfile; whatever they raise means the archive is bad."""
    try:
        return fn()
    except BadArchive as exc:  # the file layer's own refusals (an oversized tar header)
        raise InvalidArchive(exc.reason) from None
    except _CORRUPT as exc:
        raise _corrupt(exc) from None


# --- extraction ------------------------------------------------------------------------------


@attrs.define
class _Extractor:
    """Writes validated entries into ``tree`` (a no-links root) and keeps the budgets."""

    tree: Root
    max_total: int
    max_entries: int
    checkpoint: Callable[[], None]
    #: Called after each piece of file data written (a job's progress).
    tick: Callable[[], None] = _noop
    #: The volume's disk budget: told each file's size before it is written (§15).
    charge: Callable[[int], None] = lambda n: None
    count: int = 0
    total: int = 0
    dirs: dict[tuple[str, ...], tuple[int, float]] = attrs.Factory(dict)
    links: list[RelPath] = attrs.Factory(list)

    def entry(self, name: str) -> RelPath:
        self.count += 1
        if self.count > self.max_entries:
            raise InvalidArchive("too large")
        return entry_path(name)

    def budget(self, size: int) -> None:
        self.total += max(size, 0)
        if self.total > self.max_total:
            raise InvalidArchive("too large")

    @contextlib.contextmanager
    def writing(self, rel: RelPath) -> Iterator[None]:
        """Safe-path refusals while building the tree are the archive's fault."""
        try:
            yield
        except (FileExists, FolderExists):
            raise InvalidArchive(f"conflicting entries: {_show(rel.text)}") from None
        except InvalidPath as exc:
            if exc.code == "path_through_link":
                raise InvalidArchive(f"entry goes through a link: {_show(rel.text)}") from None
            if exc.code == "path_escapes_volume":
                raise InvalidArchive(f"entry escapes the destination: {_show(rel.text)}") from None
            raise InvalidArchive(f"unusable entry ({exc.reason}): {_show(rel.text)}") from None
        except PathNotFound:
            raise InvalidArchive(f"unusable entry: {_show(rel.text)}") from None

    def add_dir(self, rel: RelPath, mode: int, mtime: float) -> None:
        if not rel.parts:
            return  # the archive's "./": the destination itself
        with self.writing(rel):
            self.tree.make_dirs(rel)
        self.dirs[rel.parts] = (mode & 0o777, mtime)

    def add_file(
        self, rel: RelPath, mode: int, mtime: float, read: Callable[[int], bytes], size: int
    ) -> None:
        self.budget(size)
        self.charge(max(size, 0))
        if not rel.parts:
            raise InvalidArchive(f"file entry without a name: {_show(rel.text)}")
        with self.writing(rel):
            self.tree.make_dirs(rel.parent)
            fd = self.tree.create_file(rel, 0o600)
        try:
            written = 0
            while True:
                self.checkpoint()
                chunk = _reading(lambda: read(CHUNK))
                if not chunk:
                    break
                written += len(chunk)
                if written > size:  # more data than the header declared: a lie
                    raise InvalidArchive("too large")
                _write_all(fd, chunk)
                self.tick()
            os.fchmod(fd, mode & 0o777)
            os.utime(fd, (mtime, mtime))
        except OSError as exc:
            raise _disk_error(exc) from None
        finally:
            os.close(fd)

    def add_symlink(self, rel: RelPath, target: str) -> None:
        if len(target) > MAX_LINK_TARGET or not link_stays_inside(rel, target):
            raise InvalidArchive(f"link points outside the destination: {_show(rel.text)}")
        with self.writing(rel):
            self.tree.make_dirs(rel.parent)
            self.tree.symlink(rel, target)
        self.links.append(rel)

    def add_hardlink(self, rel: RelPath, target_name: str) -> None:
        try:
            target = entry_path(target_name, what="hard link target")
        except InvalidArchive:
            raise InvalidArchive(
                f"hard link points outside the destination: {_show(rel.text)}"
            ) from None
        with self.writing(rel):
            self.tree.make_dirs(rel.parent)
        try:
            self.tree.hardlink(target, rel)
        except (PathNotFound, InvalidPath):
            raise InvalidArchive(
                f"hard link target is not a file of the archive: {_show(rel.text)}"
            ) from None
        except (FileExists, FolderExists):
            raise InvalidArchive(f"conflicting entries: {_show(rel.text)}") from None

    def finish(self) -> None:
        """Folder modes last (a read-only folder must not block its own entries), then
        every link resolved by the kernel beneath the tree: one that leaves it (through
        other links of the archive) fails the archive."""
        for parts, (mode, mtime) in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
            self.checkpoint()
            try:
                fd = self.tree.open_fd(parts, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue  # replaced by a later entry of the same name: nothing to set
            try:
                os.fchmod(fd, mode | 0o700)  # we must still be able to move and clean it
                os.utime(fd, (mtime, mtime))
            finally:
                os.close(fd)
        follow = Root(self.tree.fd, owned=False)
        for rel in self.links:
            self.checkpoint()
            try:
                os.close(follow.open_fd(rel.parts, os.O_PATH))
            except OSError as exc:
                if exc.errno == errno.EXDEV:
                    raise InvalidArchive(
                        f"link points outside the destination: {_show(rel.text)}"
                    ) from None
                # dangling or a loop: inside the destination, harmless

    def from_zip(self, fh: BinaryIO) -> None:
        pinned = _reading(lambda: zip_precheck(fh, self.max_entries, self.checkpoint))
        zf = _reading(lambda: zipfile.ZipFile(pinned))
        with zf:
            infos = zf.infolist()
            if len(infos) > self.max_entries:
                raise InvalidArchive("too large")
            if sum(i.file_size for i in infos) > self.max_total:
                raise InvalidArchive("too large")
            for info in infos:
                self.checkpoint()
                rel = self.entry(info.filename)
                unix = info.external_attr >> 16
                mtime = _zip_time(info.date_time)
                kind = stat.S_IFMT(unix)
                if kind == stat.S_IFLNK:
                    if info.file_size > MAX_LINK_TARGET:
                        raise InvalidArchive(f"link target too long: {_show(rel.text)}")
                    data = _reading(partial(zf.read, info))
                    self.add_symlink(rel, os.fsdecode(data))
                elif info.is_dir() or kind == stat.S_IFDIR:
                    self.add_dir(rel, stat.S_IMODE(unix) or 0o755, mtime)
                elif kind not in (0, stat.S_IFREG):
                    raise InvalidArchive(f"device or special file: {_show(rel.text)}")
                else:
                    stream = _reading(partial(zf.open, info))
                    with stream:
                        self.add_file(
                            rel, stat.S_IMODE(unix) or 0o644, mtime, stream.read, info.file_size
                        )

    def precheck_tar(self, fh: BinaryIO) -> None:
        """For an uncompressed tar, count entries and sizes from the headers alone (the
        data is skipped by seeking) so an archive over the limits is refused before one
        file is written. Compressed tars are checked as they stream: a header pass would
        cost a whole second decompression."""

        def open_tar() -> tarfile.TarFile:
            return _open_tar(fh, "r:", tarinfo=BoundedTarInfo)

        count = total = 0
        with _reading(open_tar) as tf:
            while (member := _reading(tf.next)) is not None:
                self.checkpoint()
                _forget_members(tf)
                count += 1
                total += member.size if member.isreg() else 0
                if count > self.max_entries or total > self.max_total:
                    raise InvalidArchive("too large")
        fh.seek(0)

    def from_tar(self, fh: BinaryIO, fmt: str) -> None:
        if fmt == "tar":
            self.precheck_tar(fh)
        mode = {"tar": "r:", "tar.gz": "r:gz", "tar.bz2": "r:bz2", "tar.xz": "r:xz"}[fmt]

        def open_tar() -> tarfile.TarFile:
            return _open_tar(fh, mode, tarinfo=BoundedTarInfo, copybufsize=CHUNK)

        with _reading(open_tar) as tf:
            while True:
                self.checkpoint()
                member = _reading(tf.next)
                if member is None:
                    return
                _forget_members(tf)  # stream through: tarfile keeps no list of 100 000 entries
                rel = self.entry(member.name)
                if member.isdir():
                    self.add_dir(rel, member.mode, member.mtime)
                elif member.issym():
                    self.add_symlink(rel, member.linkname)
                elif member.islnk():
                    self.add_hardlink(rel, member.linkname)
                elif member.ischr() or member.isblk() or member.isfifo():
                    raise InvalidArchive(f"device or special file: {_show(rel.text)}")
                elif member.isreg():
                    stream = _reading(partial(tf.extractfile, member))
                    assert stream is not None
                    self.add_file(rel, member.mode, member.mtime, stream.read, member.size)
                else:
                    raise InvalidArchive(f"unsupported entry type: {_show(rel.text)}")


def _zip_directory(fh: BinaryIO) -> tuple[int, int, int, int]:
    """``(entries, start, size, file size)`` of a zip's central directory, from its end
    records (zip64 too), found the way ``zipfile`` finds them so both read the same
    directory."""
    size = fh.seek(0, os.SEEK_END)
    tail_len = min(size, _EOCD.size + 0xFFFF)  # the record, then a comment of <= 64 KiB
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    pos = len(tail) - _EOCD.size  # no comment: the record ends the file (zipfile's first try)
    if pos < 0 or tail[pos : pos + 4] != b"PK\x05\x06" or tail[-2:] != b"\0\0":
        pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or pos + _EOCD.size > len(tail):
        raise InvalidArchive("corrupt or unreadable data")
    end = size - tail_len + pos  # where the directory ends (the record follows it)
    _, _, _, _, entries, cd_size, _, _ = _EOCD.unpack_from(tail, pos)
    locator_at = end - _ZIP64_LOCATOR.size
    if locator_at >= _ZIP64_EOCD.size:
        fh.seek(locator_at)
        locator = fh.read(_ZIP64_LOCATOR.size)
        if locator[:4] == b"PK\x06\x07":  # zipfile takes the record right before it
            record_at = locator_at - _ZIP64_EOCD.size
            fh.seek(record_at)
            record = fh.read(_ZIP64_EOCD.size)
            if len(record) == _ZIP64_EOCD.size and record[:4] == b"PK\x06\x06":
                _, _, _, _, _, _, _, entries, cd_size, _ = _ZIP64_EOCD.unpack(record)
                end = record_at
            # else: like zipfile, keep the plain record's values
    if cd_size > end:
        raise InvalidArchive("corrupt or unreadable data")
    return entries, end - cd_size, cd_size, size


class _PinnedZip:
    """The archive as ``zipfile`` sees it: bytes before the central directory come from
    the file, the central directory and the end records from the copy ``zip_precheck``
    checked, and the size is the checked one. The container owns the volume and can
    rewrite the archive in place at any moment: without this, a directory swapped in
    after the checks would be parsed whole. (Entry data read from the file afterwards is
    bounded by the checked sizes and CRCs.)"""

    def __init__(self, fh: BinaryIO, start: int, tail: bytes) -> None:
        self.fh = fh
        self.start = start
        self.tail = tail
        self.size = start + len(tail)
        self.pos = 0

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos >= end:
            return b""
        out = b""
        if self.pos < self.start:
            self.fh.seek(self.pos)
            out = self.fh.read(min(end, self.start) - self.pos)
            if self.pos + len(out) < min(end, self.start):  # the file shrank meanwhile
                self.pos += len(out)
                return out
        if end > self.start:
            out += self.tail[max(self.pos, self.start) - self.start : end - self.start]
        self.pos += len(out)
        return out


def zip_precheck(
    fh: BinaryIO, max_entries: int, checkpoint: Callable[[], None] = lambda: None
) -> _PinnedZip:
    """Refuse a zip over ``max_entries`` before ``zipfile`` parses anything; the view of
    the archive to give ``zipfile`` (``_PinnedZip``).

    ``zipfile.ZipFile()`` reads the whole central directory into memory and builds an
    object per entry (~400 B and ~6.5 us each, holding the GIL) before we could count
    them: 10 M empty entries cost ~4 GB. So the count declared in the end record (zip64
    too) is checked first, then the directory is walked header by header, streaming
    (``zipfile`` walks it by size, not by the declared count, so a record that lies is
    caught here), stopping at ``max_entries + 1``; names flagged UTF-8 must be UTF-8.
    Memory stays bounded whatever the archive holds. What was walked is hashed, and only
    a copy with the same hash is handed on, so a rewrite after the walk is refused.
    """
    entries, start, size, file_size = _zip_directory(fh)
    if entries > max_entries or size > MAX_ZIP_DIRECTORY:
        raise InvalidArchive("too large")
    digest = hashlib.blake2b()
    fh.seek(start)
    count = consumed = 0
    while consumed < size:
        header = fh.read(_CD_ENTRY.size)
        if len(header) < _CD_ENTRY.size or header[:4] != b"PK\x01\x02":
            raise InvalidArchive("corrupt or unreadable data")
        fields = _CD_ENTRY.unpack(header)
        flags, name_len, extra_len, comment_len = fields[5], fields[12], fields[13], fields[14]
        count += 1
        if count > max_entries:
            raise InvalidArchive("too large")
        if count % 4096 == 0:
            checkpoint()
        name = fh.read(name_len)
        if flags & _UTF8_FLAG:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidArchive("entry name is not valid UTF-8") from None
        digest.update(header)
        digest.update(name)
        digest.update(fh.read(extra_len + comment_len))
        consumed += _CD_ENTRY.size + name_len + extra_len + comment_len
    if consumed != size:  # the last entry runs past the directory's end
        raise InvalidArchive("corrupt or unreadable data")
    # the end records and the archive comment (<= 64 KiB + 98 bytes), as measured
    digest.update(fh.read(file_size - start - consumed))
    fh.seek(start)
    tail = fh.read(file_size - start)
    if hashlib.blake2b(tail).digest() != digest.digest():
        raise InvalidArchive("the archive changed while it was read")
    return _PinnedZip(fh, start, tail)


def _open_tar(fh: BinaryIO, mode: str, **options: Any) -> tarfile.TarFile:
    """``tarfile.open(fileobj=fh, mode=mode, **options)``. Through a plain callable: the
    typed overloads of ``open`` want a literal mode and lack ``copybufsize`` (an argument
    ``TarFile`` takes)."""
    opener: Callable[..., tarfile.TarFile] = tarfile.open
    return opener(fileobj=fh, mode=mode, **options)


def _forget_members(tf: tarfile.TarFile) -> None:
    """Drop the members ``tf`` has read so far: ``TarFile`` keeps each one in its
    ``members`` list (not in its typed API), which would grow with the archive."""
    members: list[tarfile.TarInfo] = tf.members  # type: ignore[attr-defined]
    members.clear()


def _zip_time(date_time: tuple[int, int, int, int, int, int]) -> float:
    try:
        return datetime(*date_time).timestamp()
    except (ValueError, OverflowError):
        return time.time()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _disk_error(exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace()
    log.warning("archive operation failed: %s", exc)
    return FileOperationFailed(exc)


def decompress(
    folder: Path,
    archive: RelPath,
    destination: RelPath,
    max_total: int,
    max_entries: int,
    *,
    checkpoint: Callable[[], None],
    owner: Owner | None = None,
    meter: Meter | None = None,
    work_name: str | None = None,
    charge: Callable[[int], None] = lambda n: None,
) -> None:
    """Extract ``archive`` into ``destination`` (both in the volume at ``folder``); what
    it creates belongs to ``owner`` (config ``containers.user``). ``meter`` counts the
    bytes of the archive read; ``work_name`` names the private folder (a job's recorded
    temporary name); ``charge(n)`` (the disk budget) is told each file's size before it
    is written, and may refuse it (the whole extraction then leaves nothing)."""
    with Root.open_volume(folder, owner=owner) as root, root.open_file(archive) as fh:
        head = _reading(lambda: fh.read(512))
        fh.seek(0)
        fmt = detect(archive.name or "", head)
        if fmt is None:
            raise InvalidArchive("unsupported or unrecognised format")
        tick: Callable[[], None] = _noop
        if meter is not None:
            size = meter.total = os.fstat(fh.fileno()).st_size
            gauge = meter

            def read_so_far() -> None:
                # where the archive is being read (not moved by the headers-only checks,
                # which do not tick); never backwards
                gauge.done = max(gauge.done, min(fh.tell(), size))

            tick = read_so_far

        created = root.make_dirs(destination)
        try:
            _extract(
                root,
                fh,
                fmt,
                destination,
                max_total,
                max_entries,
                checkpoint,
                tick,
                work_name,
                charge,
            )
            if meter is not None:
                meter.done = meter.total or meter.done
        except BaseException:
            root.remove_created(created)  # a refused archive leaves not even its folder
            raise


def _extract(
    root: Root,
    fh: BinaryIO,
    fmt: str,
    destination: RelPath,
    max_total: int,
    max_entries: int,
    checkpoint: Callable[[], None],
    tick: Callable[[], None] = _noop,
    work_name: str | None = None,
    charge: Callable[[int], None] = lambda n: None,
) -> None:
    """Extract into a private folder inside the destination, then move into place."""
    dest_fd = root.open_dir(destination)
    work = work_name or f"{TEMP_PREFIX}extract-{secrets.token_hex(6)}"
    try:
        os.mkdir(work, 0o700, dir_fd=dest_fd)
        with Root.open_at(dest_fd, work) as scratch:
            os.mkdir("tree", 0o700, dir_fd=scratch.fd)
            os.mkdir("backup", 0o700, dir_fd=scratch.fd)
            with (
                Root.open_at(scratch.fd, "tree", no_links=True, owner=root.owner) as tree,
                Root.open_at(scratch.fd, "backup") as backup,
            ):
                extractor = _Extractor(tree, max_total, max_entries, checkpoint, tick, charge)
                if fmt == "zip":
                    extractor.from_zip(fh)
                else:
                    extractor.from_tar(fh, fmt)
                extractor.finish()
                merge_tree(
                    tree.fd, dest_fd, backup.fd, prefix=str(destination), checkpoint=checkpoint
                )
    except OSError as exc:
        raise _disk_error(exc) from exc
    finally:
        try:
            _remove_tree(dest_fd, work)
        finally:
            os.close(dest_fd)


def _remove_tree(dir_fd: int, name: str) -> None:
    try:
        shutil.rmtree(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("could not remove the extraction folder %s: %s", name, exc)


# --- compression -----------------------------------------------------------------------------


class _ExactReader:
    """Reads exactly ``size`` bytes of a file that may change while we archive it: a
    file that shrank is padded with zeros (tar needs the declared size), growth ignored."""

    def __init__(
        self, fh: BinaryIO, size: int, checkpoint: Callable[[], None], meter: Meter
    ) -> None:
        self.fh = fh
        self.left = size
        self.checkpoint = checkpoint
        self.meter = meter

    def read(self, n: int = -1) -> bytes:
        self.checkpoint()
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n) if n else b""
        if len(data) < n:
            data += bytes(n - len(data))
        self.left -= len(data)
        self.meter.add(len(data))
        return data


def _sources(root: Root, sources: list[RelPath] | None) -> list[RelPath]:
    """The sources to archive: as given, minus duplicates and those inside another."""
    if sources is None:
        return [RelPath((), ".")]
    chosen: list[RelPath] = []
    for source in sorted(sources, key=lambda s: len(s.parts)):
        if any(source.is_within(other) for other in chosen):
            continue
        st = root.stat(source, follow=False)  # a 404 naming the source, before any work
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode)):
            raise NotAFile(source.text)  # a FIFO, device node or socket: not data
        chosen.append(source)
    return sorted(chosen, key=lambda s: s.parts)


def _entries(
    root: Root, sources: list[RelPath], skip: tuple[int, int], checkpoint: Callable[[], None]
) -> Iterator[WalkEntry]:
    for source in sources:
        yield from root.walk(
            source, skip=lambda st: (st.st_dev, st.st_ino) == skip, checkpoint=checkpoint
        )


def compress(
    folder: Path,
    sources: list[RelPath] | None,
    output: RelPath,
    fmt: str,
    *,
    checkpoint: Callable[[], None],
    owner: Owner | None = None,
    meter: Meter | None = None,
    temp_name: str | None = None,
    charge: Callable[[int], None] = lambda n: None,
) -> int:
    """Write the archive ``output`` of ``sources`` (default: the whole volume); its size.
    The archive (and folders made for it) belong to ``owner``. ``meter`` gets the bytes
    of the sources (a first walk, stat only) and counts those read; ``temp_name`` is the
    archive's name while written (a job's recorded temporary name)."""
    with Root.open_volume(folder, owner=owner) as root:
        chosen = _sources(root, sources)
        if meter is not None:
            meter.total = sum(
                entry.stat.st_size
                for entry in _entries(root, chosen, (-1, -1), checkpoint)
                if entry.kind == "file"
            )
        gauge = meter if meter is not None else Meter()
        with root.atomic(output, replace=False, keep_mode=False, temp_name=temp_name) as out:
            entries = _entries(root, chosen, out.identity, checkpoint)
            sink: Any = _Charged(out.file, charge)
            try:
                if fmt == "zip":
                    _write_zip(sink, entries, checkpoint, gauge)
                else:
                    _write_tar(sink, fmt, entries, checkpoint, gauge)
                # all read (a repeated hard link is stored, not read, in a tar)
                gauge.done = gauge.total or gauge.done
            except OSError as exc:
                raise _disk_error(exc) from exc
        return out.size


class _Charged:
    """The archive being written, each write told to the disk budget first (§15)."""

    def __init__(self, raw: BinaryIO, charge: Callable[[int], None]) -> None:
        self._raw = raw
        self._charge = charge

    def write(self, data: Any) -> int:
        self._charge(len(data))
        return self._raw.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _write_tar(
    out: BinaryIO,
    fmt: str,
    entries: Iterator[WalkEntry],
    checkpoint: Callable[[], None],
    meter: Meter,
) -> None:
    options: dict[str, Any] = {}
    if fmt == "tar.gz":
        options["compresslevel"] = GZIP_LEVEL
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[fmt]
    hardlinks: dict[tuple[int, int], str] = {}
    with _open_tar(out, mode, format=tarfile.PAX_FORMAT, copybufsize=CHUNK, **options) as tf:
        for entry in entries:
            st = entry.stat
            info = tarfile.TarInfo(entry.path)
            info.mode = stat.S_IMODE(st.st_mode)
            info.mtime = int(st.st_mtime)
            info.uid, info.gid = st.st_uid, st.st_gid
            if entry.kind == "directory":
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif entry.kind == "symlink":
                target = Root.read_link(entry)
                if target is None:
                    continue
                info.type, info.linkname = tarfile.SYMTYPE, target
                tf.addfile(info)
            elif entry.kind == "file":
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in hardlinks:
                    info.type, info.linkname = tarfile.LNKTYPE, hardlinks[key]
                    tf.addfile(info)
                    continue
                fh = Root.open_entry(entry)
                if fh is None:
                    continue
                with fh:
                    info.size = os.fstat(fh.fileno()).st_size
                    tf.addfile(info, _ExactReader(fh, info.size, checkpoint, meter))
                if st.st_nlink > 1:
                    hardlinks[key] = entry.path
            # sockets, FIFOs, device nodes: not data, not archived


def _write_zip(
    out: BinaryIO, entries: Iterator[WalkEntry], checkpoint: Callable[[], None], meter: Meter
) -> None:
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for entry in entries:
            st = entry.stat
            try:
                entry.path.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(
                    f"A zip archive cannot store this file name: {_show(entry.path)!r}",
                    code="unsupported_file_name",
                ) from None
            when = time.localtime(max(st.st_mtime, 315532800))[:6]
            if when[0] > 2107:
                when = (2107, 12, 31, 23, 59, 58)
            perm = stat.S_IMODE(st.st_mode)
            if entry.kind == "directory":
                info = zipfile.ZipInfo(entry.path + "/", when)
                info.external_attr = ((stat.S_IFDIR | perm) << 16) | 0x10
                zf.writestr(info, b"")
            elif entry.kind == "symlink":
                target = Root.read_link(entry)
                if target is None:
                    continue
                info = zipfile.ZipInfo(entry.path, when)
                info.create_system = 3
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
                zf.writestr(info, os.fsencode(target), compress_type=zipfile.ZIP_STORED)
            elif entry.kind == "file":
                fh = Root.open_entry(entry)
                if fh is None:
                    continue
                with fh:
                    info = zipfile.ZipInfo(entry.path, when)
                    info.create_system = 3
                    info.external_attr = (stat.S_IFREG | perm) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.file_size = os.fstat(fh.fileno()).st_size
                    with zf.open(info, "w") as sink:
                        while chunk := fh.read(CHUNK):
                            checkpoint()
                            sink.write(chunk)
                            meter.add(len(chunk))


# --- plugin ----------------------------------------------------------------------------------


def _optional_path(value: object) -> bool:
    return value is None or isinstance(value, str)


def _check_sources(_instance: object, _attribute: object, value: object) -> None:
    """``sources``: ``null`` or a list of path strings (each judged later by ``parse``)."""
    if value is None:
        return
    if not isinstance(value, list):
        raise FieldError("sources", "must be a list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise FieldError(f"sources[{i}]", "must be a string")


#: An optional client path: any JSON string, judged by ``lightd.files.parse`` with the
#: messages of contract §5 (a NUL is path traversal; a name that is not UTF-8 comes as
#: surrogate escapes), not by the converter's text rule.
_PATH = field_check(_optional_path, "must be a string")


@attrs.frozen
class CompressBody:
    format: str
    output_name: Any = attrs.field(default=None, validator=_PATH)
    #: the original daemon's name for output_name
    output: Any = attrs.field(default=None, validator=_PATH)
    sources: Any = attrs.field(default=None, validator=_check_sources)


@attrs.frozen
class DecompressBody:
    archive_path: Any = attrs.field(default=None, validator=_PATH)
    destination: Any = attrs.field(default=None, validator=_PATH)
    #: [alias] {"root","file"}: archive root/file, extracted into root
    root: Any = attrs.field(default=None, validator=_PATH)
    file: Any = attrs.field(default=None, validator=_PATH)


def _legacy_join(root: str, name: str) -> str:
    base = root.strip("/")
    return f"{base}/{name}" if base else name


def output_path(name: str, fmt: str) -> RelPath:
    """``output_name`` with the format's extension appended unless already there."""
    parse(name)
    extension = FORMATS[fmt]
    return parse(name if name.lower().endswith(extension) else name + extension)


#: What the compress route's body may hold (the OpenAPI document's schema): the fields of
#: ``CompressBody`` and ``async``, a Python keyword, read apart by ``lightd.api.wants_job``.
CompressRequest = TypedDict(
    "CompressRequest",
    {
        "format": str,
        "output_name": NotRequired[Any],
        "output": NotRequired[Any],
        "sources": NotRequired[Any],
        "async": NotRequired[bool],
    },
)
#: What the decompress route's body may hold: ``DecompressBody`` and ``async``.
DecompressRequest = TypedDict(
    "DecompressRequest",
    {
        "archive_path": NotRequired[Any],
        "destination": NotRequired[Any],
        "root": NotRequired[Any],
        "file": NotRequired[Any],
        "async": NotRequired[bool],
    },
)


async def _report(job: JobContext, meter: Meter) -> None:
    """Hand the worker thread's counts to the job until cancelled (the runner throttles
    what it publishes)."""
    last: tuple[int, int | None] | None = None
    while True:
        now = (meter.done, meter.total)
        if now != last:
            job.progress(*now)
            last = now
        await trio.sleep(REPORT_INTERVAL)


class Compressed(TypedDict):
    """``archive_path``: the archive's volume-relative path; ``size``: its bytes."""

    message: str
    archive_path: str
    size: int


class Decompressed(TypedDict):
    message: str
    destination: str


ARCHIVE_WORKERS: StashKey[trio.CapacityLimiter] = StashKey("archives.workers")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"archives": ArchivesConfig}


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[ARCHIVE_WORKERS] = trio.CapacityLimiter(
        agent.config.section(ArchivesConfig).workers
    )
    jobs = agent.stash[JOBS]
    jobs.register_kind("volume.compress", permission="files")
    jobs.register_kind("volume.decompress", permission="files")


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    limiter = agent.stash[ARCHIVE_WORKERS]
    bp = Blueprint("archives", __name__)

    async def folder_of(volume_id: str) -> Path:
        volumes = agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    async def run(fn: Callable[..., T], *args: Any) -> T:
        """Off the event loop, on this plugin's limiter; cancellation (client gone, agent
        stopping) reaches the worker at its next checkpoint and it cleans up. What the
        work creates belongs to ``containers.user``."""
        owner = agent.config.section_or_default(ContainersSettings).owner
        return await trio.to_thread.run_sync(
            lambda: fn(*args, checkpoint=trio.from_thread.check_cancelled, owner=owner),
            limiter=limiter,
        )

    async def in_job(job: JobContext, work: Callable[..., T]) -> T:
        """``work(checkpoint=…, owner=…, meter=…)`` in a worker thread for ``job``: its
        meter is reported as the job's progress, and cancelling the job stops the thread
        at its next checkpoint, which undoes what it did."""
        owner = agent.config.section_or_default(ContainersSettings).owner
        meter = Meter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report, job, meter)
            result = await trio.to_thread.run_sync(
                partial(
                    work, checkpoint=trio.from_thread.check_cancelled, owner=owner, meter=meter
                ),
                limiter=limiter,
            )
            nursery.cancel_scope.cancel()
        job.progress(meter.done, meter.total)
        return result

    async def start(kind: str, volume_id: str, run: Callable[[JobContext], Any]) -> str:
        view = await agent.stash[JOBS].submit(kind, run, volume_id=volume_id, unit="bytes")
        return view.id

    @bp.post("/volumes/<volume_id>/compress")
    @describe(
        "Compress into an archive",
        description="`format`: `zip`, `tar`, `tar.gz`, `tar.bz2` or [ext] `tar.xz`. "
        "`output_name` is a path inside the volume; the format's extension is appended "
        "unless already there. `sources` [ext] defaults to everything in the volume root. "
        "404 when a source is missing, 409 when something exists at the archive's path. "
        '[ext] `"async": true`: `202 {"message","job_id"}` and the work runs as a job '
        "(`volume.compress`, progress in bytes of the sources; its `result` is the 200 "
        "answer, its `error` the message of a 404 or 409).",
        body=CompressRequest,
        responses={200: Compressed, 202: JobStarted},
        errors=(409,),
        examples={
            "body": {"format": "tar.gz", "output_name": "backups/world", "sources": ["world"]}
        },
        tags=("volumes",),
    )
    @requires("files")
    async def compress_view(volume_id: str) -> Compressed | tuple[JobStarted, int]:
        folder = await folder_of(volume_id)
        body = await read_json(CompressBody)
        as_job = await wants_job()
        if body.format not in FORMATS:
            raise BadRequest(f"Unsupported format: {body.format}", code="unsupported_format")
        name = body.output_name if body.output_name is not None else body.output
        if name is None:
            raise BadRequest("output_name: is required", code="invalid_field")
        output = output_path(name, body.format)
        sources = None if body.sources is None else [parse(s) for s in body.sources]
        if sources == []:
            raise BadRequest("sources: must not be empty", code="invalid_field")
        fmt = body.format
        if as_job:

            async def compress_job(job: JobContext) -> None:
                temp = await job.temp_path(output.parent)
                async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
                    work = partial(
                        compress,
                        folder,
                        sources,
                        output,
                        fmt,
                        temp_name=temp.name,
                        charge=budget.charge,
                    )
                    size = await in_job(job, work)
                job.result = compressed(output, size)

            job_id = await start("volume.compress", volume_id, compress_job)
            return {"message": "Compression started", "job_id": job_id}, 202
        async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
            size = await run(partial(compress, charge=budget.charge), folder, sources, output, fmt)
        return compressed(output, size)

    def compressed(output: RelPath, size: int) -> Compressed:
        return {"message": "Compression successful", "archive_path": str(output), "size": size}

    @bp.post("/volumes/<volume_id>/decompress")
    @describe(
        "Extract an archive",
        description="All or nothing: an entry that is absolute, has `..`, is a device or "
        "a link leaving the destination, or an archive over the size or entry limits is "
        "`400 Invalid archive: <reason>` and nothing is left. `destination` defaults to "
        'the archive\'s folder. [alias] body `{"root", "file"}`. 404 when the archive '
        "is missing, 409 when a file and a folder collide. "
        '[ext] `"async": true`: `202 {"message","job_id"}` and the extraction runs as a job '
        "(`volume.decompress`, progress in bytes of the archive read; its `result` is the "
        "200 answer, its `error` the message of a 400, 404 or 409).",
        body=DecompressRequest,
        responses={200: Decompressed, 202: JobStarted},
        errors=(409,),
        examples={"body": {"archive_path": "backups/world.tar.gz", "destination": "restore"}},
        tags=("volumes",),
    )
    @requires("files")
    async def decompress_view(volume_id: str) -> Decompressed | tuple[JobStarted, int]:
        folder = await folder_of(volume_id)
        body = await read_json(DecompressBody)
        as_job = await wants_job()
        if body.archive_path is not None:
            archive = parse(body.archive_path)
            destination = archive.parent if body.destination is None else parse(body.destination)
        elif body.root is not None and body.file is not None:
            parse(body.file)  # an absolute or ".." file is refused on its own
            archive = parse(_legacy_join(body.root, body.file))
            destination = parse(body.root.strip("/"), empty_is_root=True)
        else:
            raise BadRequest("archive_path: is required", code="invalid_field")
        if not archive.parts:
            raise InvalidArchive("not a file")
        config: ArchivesConfig = agent.config.section(ArchivesConfig)
        answer: Decompressed = {
            "message": "Decompression successful",
            "destination": str(destination),
        }
        args = (folder, archive, destination, config.max_total_bytes, config.max_entries)
        if as_job:

            async def decompress_job(job: JobContext) -> None:
                temp = await job.temp_path(destination)
                async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
                    work = partial(decompress, *args, work_name=temp.name, charge=budget.charge)
                    await in_job(job, work)
                job.result = answer

            job_id = await start("volume.decompress", volume_id, decompress_job)
            return {"message": "Decompression started", "job_id": job_id}, 202
        async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
            await run(partial(decompress, charge=budget.charge), *args)
        return answer

    return [bp]
