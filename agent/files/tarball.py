"""Tar streams of a tree, and their safe extraction: the file layer's archive primitives.

``tar_pieces`` writes a PAX tar of everything below a ``Root`` as a stream of pieces,
never holding the archive: the tree is walked beneath the root's descriptor
(``Root.walk``: links reported and never followed, a folder swapped for a link mid-walk
not entered, a file swapped for a link or a FIFO never opened), links are stored as links,
repeated hard links as hard links, FIFOs/sockets/devices and the agent's own temporary
files (``TEMP_PREFIX``) are left out. A file is read once, through the descriptor opened
for it: it is consistent per file (a file that shrinks while read is padded with zeros to
the size in its header, growth is cut), not across files.

``extract_tar`` reads a tar stream (no seeking: a pipe or a decompressor will do) into a
``Root`` opened with ``no_links=True`` (nothing it creates can redirect a later entry) and
refuses, with ``BadArchive``, absolute names, ``..``, device files and FIFOs, links and hard
links leaving the tree (every link is finally resolved by the kernel beneath the tree),
oversized headers, and archives over the entry or byte limits. The caller extracts into
a private folder and moves the result into place only when this returns, so a refused
archive leaves nothing behind. ``tarfile`` parses the headers (through ``_Forward``, a
reader that only moves forward: tarfile's own stream mode would copy every byte through
512-byte blocks); file data is written as read (views of the pieces, no copy), in up
to ``CHUNK`` writes, by a second thread, so that creating the next files and writing
the data of the last ones run at once, with no ``fsync`` (the caller decides what to
sync). ``extract_tar`` returns or raises only once every write has ended and every
descriptor is closed.

``write_tar_zst`` and ``zst_reader`` are the same through zstd (the ``tar.zst`` of backups
and transfers): ``zstandard`` is imported only when one is used.

Everything here blocks: call it from a worker thread; ``checkpoint`` is called often
(``trio.from_thread.check_cancelled`` stops the work on cancellation).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import tarfile
import threading
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

import attrs

from .errors import BadArchive, FileExists, FolderExists, InvalidPath, PathNotFound
from .paths import NAME_MAX, ROOT, RelPath
from .root import Root
from .tree import CHUNK, TEMP_PREFIX, WalkEntry, noop

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_LINK_TARGET",
    "BoundedTarInfo",
    "entry_path",
    "extract_tar",
    "link_stays_inside",
    "tar_pieces",
    "write_tar_zst",
    "zst_reader",
]

#: Largest GNU long-name or pax header we parse (tarfile reads them whole into memory).
MAX_HEADER_BYTES = 1 << 20
#: File data writes (of up to ``CHUNK`` each) waiting for the writing thread.
WRITES_WAITING = 8
MAX_LINK_TARGET = 4095


def _show(name: str) -> str:
    """An archive entry name as quoted in an error (it is the archive's text, not ours)."""
    return name if len(name) <= 120 else name[:117] + "..."


# --- writing -------------------------------------------------------------------------------


def _is_temp(path: str) -> bool:
    return any(part.startswith(TEMP_PREFIX) for part in path.split("/"))


def _info(name: str, st: os.stat_result) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = int(st.st_mtime)
    info.uid, info.gid = st.st_uid, st.st_gid
    return info


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_pieces(
    root: Root,
    *,
    top: str = "",
    prune: Callable[[str], bool] | None = None,
    checkpoint: Callable[[], None] = noop,
    progress: Callable[[int], None] = lambda n: None,
) -> Iterator[bytes | memoryview]:
    """The PAX tar of everything below ``root`` (entry names relative to it; with ``top``,
    a folder entry ``top`` first and every name under it), as pieces: a header, or up to
    ``CHUNK`` bytes of file data. File data comes as a view of one buffer, read into again
    for the next piece: use (or copy) a piece before asking for the next. ``prune(path)``
    (``path`` relative to ``root``) leaves an entry (and its subtree) out; ``progress(n)``
    is told of file bytes read. The caller keeps ``root`` open while it iterates."""
    written = 0
    hardlinks: dict[tuple[int, int], str] = {}
    buffer = memoryview(bytearray(CHUNK))

    def entries() -> Iterator[WalkEntry]:
        for entry in root.walk(ROOT, checkpoint=checkpoint, prune=prune):
            if not _is_temp(entry.path):
                yield entry

    if top:
        info = _info(top, os.fstat(root.fd))
        info.type = tarfile.DIRTYPE
        head = _header(info)
        written += len(head)
        yield head
    for entry in entries():
        st = entry.stat
        name = f"{top}/{entry.path}" if top else entry.path
        info = _info(name, st)
        if entry.kind == "directory":
            info.type = tarfile.DIRTYPE
        elif entry.kind == "symlink":
            target = Root.read_link(entry)
            if target is None:
                continue  # gone meanwhile
            info.type, info.linkname = tarfile.SYMTYPE, target
        elif entry.kind == "file":
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in hardlinks:
                info.type, info.linkname = tarfile.LNKTYPE, hardlinks[key]
            else:
                fh = Root.open_entry(entry)  # None: swapped for a link, a FIFO…: never opened
                if fh is None:
                    continue
                with fh:
                    fd = fh.fileno()
                    size = info.size = os.fstat(fd).st_size
                    head = _header(info)
                    written += len(head)
                    yield head
                    left = size
                    while left > 0:
                        checkpoint()
                        want = min(CHUNK, left)
                        got = os.readv(fd, [buffer[:want]])
                        if not got:  # shrank meanwhile: the header promised ``size``
                            buffer[:want] = bytes(want)
                            got = want
                        left -= got
                        written += got
                        progress(got)
                        yield buffer[:got]
                    pad = -size % tarfile.BLOCKSIZE
                    if pad:
                        written += pad
                        yield bytes(pad)
                if st.st_nlink > 1:
                    hardlinks[key] = name
                continue
        else:
            continue  # FIFOs, sockets, device nodes: not data, not archived
        head = _header(info)
        written += len(head)
        yield head
    end = bytes(2 * tarfile.BLOCKSIZE)  # end of archive
    written += len(end)
    yield end + bytes(-written % tarfile.RECORDSIZE)  # a whole record, as tar(1) writes


# --- reading -------------------------------------------------------------------------------


def entry_path(name: str, *, what: str = "entry") -> RelPath:
    """An archive entry name as a path inside the destination, or ``BadArchive``."""
    if "\x00" in name:
        raise BadArchive(f"NUL byte in {what} name")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise BadArchive(f"absolute {what} name: {_show(name)}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise BadArchive(f"{what} name with '..': {_show(name)}")
    if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
        raise BadArchive(f"{what} name too long: {_show(name)}")
    return RelPath(parts, name)


def link_stays_inside(link: RelPath, target: str) -> bool:
    """Whether a relative link target, read from the link's folder, never climbs above
    the destination (every prefix checked, not only the end)."""
    if not target or target.startswith("/") or "\x00" in target:
        return False
    depth = len(link.parts) - 1
    for part in target.split("/"):
        if part in ("", "."):
            continue
        depth += -1 if part == ".." else 1
        if depth < 0:
            return False
    return True


class BoundedTarInfo(tarfile.TarInfo):
    """Refuses the headers tarfile would read whole into memory when they are huge."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if (
            self.type
            in (
                tarfile.GNUTYPE_LONGNAME,
                tarfile.GNUTYPE_LONGLINK,
                tarfile.XHDTYPE,
                tarfile.XGLTYPE,
                tarfile.SOLARIS_XHDTYPE,
            )
            and self.size > MAX_HEADER_BYTES
        ):
            raise BadArchive("oversized header")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class _Forward:
    """A sequential stream as the forward-only "file" tarfile's non-stream mode reads
    (``read``, ``readinto``, ``tell``, and ``seek`` forward by skipping: tarfile never
    seeks back when it only calls ``next``). ``read_chunk(CHUNK)`` hands the data in
    pieces of any size (``b""`` at the end)."""

    def __init__(self, read_chunk: Callable[[int], bytes]) -> None:
        self._read_chunk = read_chunk
        self._chunk = memoryview(b"")
        self._pos = 0

    def _fill(self) -> bool:
        if not self._chunk:
            data = self._read_chunk(CHUNK)
            if not data:
                return False
            self._chunk = memoryview(data)
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = 1 << 62
        parts: list[bytes] = []
        while size > 0 and self._fill():
            take = self._chunk[:size]
            parts.append(bytes(take))
            self._chunk = self._chunk[len(take) :]
            self._pos += len(take)
            size -= len(take)
        return b"".join(parts)

    def take(self, size: int) -> memoryview:
        """Up to ``size`` bytes (fewer at a piece's end; empty at the end), as a view of
        the piece read: no copy (pieces are ``bytes``, never changed)."""
        if not self._fill():
            return memoryview(b"")
        view = self._chunk[:size]
        self._chunk = self._chunk[len(view) :]
        self._pos += len(view)
        return view

    def readinto(self, buffer: memoryview) -> int:
        done = 0
        while done < len(buffer) and self._fill():
            n = min(len(buffer) - done, len(self._chunk))
            buffer[done : done + n] = self._chunk[:n]
            self._chunk = self._chunk[n:]
            done += n
        self._pos += done
        return done

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR:
            pos += self._pos
        elif whence != os.SEEK_SET or pos < self._pos:
            raise OSError(errno.ESPIPE, "a tar stream is only read forward")
        while self._pos < pos and self._fill():
            n = min(pos - self._pos, len(self._chunk))
            self._chunk = self._chunk[n:]
            self._pos += n
        return self._pos


class _FileData:
    """Writes the files' data in a thread of its own, in order, while the extracting
    thread parses and creates the next entries: creating files and writing their data
    then run at once (both are mostly the kernel's work). Each file's descriptor is
    handed over with its data and closed here (after its mode and time are set). At
    most ``WRITES_WAITING`` writes wait; an error stops the writing and is raised to the
    extracting thread at its next call."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[int, memoryview | None, int, float] | None] = queue.Queue(
            WRITES_WAITING
        )
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lightd-extract-data", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            fd, data, mode, mtime = item
            try:
                if self.error is None:
                    if data is not None:
                        while data:
                            data = data[os.write(fd, data) :]
                    elif mode >= 0:
                        os.fchmod(fd, mode)
                        os.utime(fd, (mtime, mtime))
            except BaseException as exc:
                self.error = exc
            finally:
                if data is None:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def write(self, fd: int, data: memoryview) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((fd, data, 0, 0.0))

    def close_file(self, fd: int, mode: int = -1, mtime: float = 0.0) -> None:
        """Close ``fd`` once its data is written, its mode and time set first (``mode``
        -1: only close it, the file is not complete)."""
        self._queue.put((fd, None, mode, mtime))

    def join(self) -> None:
        """Wait for every write; raise the first error."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error


@attrs.define
class _Writer:
    tree: Root
    max_total: int
    max_entries: int
    checkpoint: Callable[[], None]
    tick: Callable[[int], None]
    count: int = 0
    total: int = 0
    dirs: dict[tuple[str, ...], tuple[int, float]] = attrs.Factory(dict)
    links: list[RelPath] = attrs.Factory(list)
    #: Folders known to exist beneath the tree: nothing an extraction does removes or
    #: replaces a folder (a later entry of the same name is refused), so one look will do.
    made: set[tuple[str, ...]] = attrs.Factory(set)
    data: _FileData = attrs.Factory(_FileData)

    def make_parent(self, rel: RelPath) -> None:
        parent = rel.parent
        if parent.parts not in self.made:
            with self.writing(rel):
                self.tree.make_dirs(parent)
            self.made.add(parent.parts)

    @contextlib.contextmanager
    def writing(self, rel: RelPath) -> Iterator[None]:
        """Safe-path refusals while building the tree are the archive's fault."""
        try:
            yield
        except (FileExists, FolderExists):
            raise BadArchive(f"conflicting entries: {_show(rel.text)}") from None
        except InvalidPath as exc:
            if exc.code == "path_escapes_volume":
                raise BadArchive(f"entry escapes the destination: {_show(rel.text)}") from None
            raise BadArchive(f"entry goes through a link: {_show(rel.text)}") from None
        except PathNotFound:
            raise BadArchive(f"unusable entry: {_show(rel.text)}") from None

    def file(
        self, rel: RelPath, member: tarfile.TarInfo, take: Callable[[int], memoryview]
    ) -> None:
        """``take(n)``: up to ``n`` bytes of the entry's data, as a view of immutable bytes
        (it is written later, by ``_FileData``)."""
        self.total += member.size
        if self.total > self.max_total:
            raise BadArchive("too large")
        if not rel.parts:
            raise BadArchive(f"file entry without a name: {_show(rel.text)}")
        self.make_parent(rel)
        with self.writing(rel):
            fd = self.tree.create_file(rel, 0o600)
        complete = False
        try:
            left = member.size
            while left > 0:
                self.checkpoint()
                view = take(min(CHUNK, left))
                if not view:
                    raise BadArchive("unexpected end of data")
                left -= len(view)
                self.data.write(fd, view)
                self.tick(len(view))
            complete = True
        finally:
            if complete:
                self.data.close_file(fd, member.mode & 0o777, member.mtime)
            else:
                self.data.close_file(fd)

    def finish(self) -> None:
        """Folder modes last (a read-only folder must not block its own entries), then
        every link resolved by the kernel beneath the tree: one that leaves it (through
        other links of the archive) fails the archive."""
        self.data.join()
        for parts, (mode, mtime) in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
            self.checkpoint()
            try:
                fd = self.tree.open_fd(parts, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                os.fchmod(fd, mode | 0o700)
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
                    raise BadArchive(
                        f"link points outside the destination: {_show(rel.text)}"
                    ) from None
                # dangling or a loop: inside the destination, harmless


def extract_tar(
    tree: Root,
    stream: IO[bytes] | Callable[[int], bytes],
    *,
    max_total: int,
    max_entries: int,
    checkpoint: Callable[[], None] = noop,
    tick: Callable[[int], None] = lambda n: None,
) -> int:
    """Extract the tar read from ``stream`` (sequentially; a file object, or a function
    ``read(n)`` handing ``bytes`` pieces of any size, ``b""`` at the end) into ``tree`` (a root
    opened with ``no_links=True``); ``BadArchive`` for anything refused (see the module).
    Returns the number of entries. ``tick(n)`` is told of file bytes written. What
    follows the archive's end marker is left unread."""
    if not tree.no_links:
        raise ValueError("extract_tar needs a root opened with no_links=True")
    source = _Forward(stream if callable(stream) else stream.read)
    out = _Writer(tree, max_total, max_entries, checkpoint, tick)
    try:
        opener: Callable[..., tarfile.TarFile] = tarfile.TarFile
        try:
            with opener(fileobj=source, mode="r", tarinfo=BoundedTarInfo, copybufsize=CHUNK) as tf:
                _extract_members(tf, tree, out, source)
        except (tarfile.TarError, EOFError):
            raise BadArchive("corrupt or unreadable data") from None
        out.finish()
    except BaseException:
        with contextlib.suppress(BaseException):  # its error, if any, is a consequence
            out.data.join()
        raise
    return out.count


def _extract_members(tf: tarfile.TarFile, tree: Root, out: _Writer, source: _Forward) -> None:
    checkpoint, max_entries = out.checkpoint, out.max_entries
    while True:
        checkpoint()
        member = tf.next()
        if member is None:
            break
        members: list[tarfile.TarInfo] = tf.members  # type: ignore[attr-defined]
        members.clear()  # stream through: keep no list of every entry
        out.count += 1
        if out.count > max_entries:
            raise BadArchive("too large")
        rel = entry_path(member.name)
        if member.isdir():
            if rel.parts:
                if rel.parts not in out.made:
                    with out.writing(rel):
                        tree.make_dirs(rel)
                    out.made.add(rel.parts)
                out.dirs[rel.parts] = (member.mode & 0o777, member.mtime)
        elif member.issym():
            target = member.linkname
            if len(target) > MAX_LINK_TARGET or not link_stays_inside(rel, target):
                raise BadArchive(f"link points outside the destination: {_show(rel.text)}")
            out.make_parent(rel)
            with out.writing(rel):
                tree.symlink(rel, target)
            out.links.append(rel)
        elif member.islnk():
            try:
                target_rel = entry_path(member.linkname, what="hard link target")
            except BadArchive:
                raise BadArchive(
                    f"hard link points outside the destination: {_show(rel.text)}"
                ) from None
            out.make_parent(rel)
            try:
                tree.hardlink(target_rel, rel)
            except (PathNotFound, InvalidPath):
                raise BadArchive(
                    f"hard link target is not a file of the archive: {_show(rel.text)}"
                ) from None
            except (FileExists, FolderExists):
                raise BadArchive(f"conflicting entries: {_show(rel.text)}") from None
        elif member.isreg():
            if member.issparse() or source.tell() != member.offset_data:
                data = tf.extractfile(member)  # sparse: tarfile expands its map
                assert data is not None

                def expanded(n: int, data: IO[bytes] = data) -> memoryview:
                    return memoryview(data.read(n))

                out.file(rel, member, expanded)
            else:  # the data follows the header: the pieces read, as they are
                out.file(rel, member, source.take)
        else:
            raise BadArchive(f"device or special file: {_show(rel.text)}")


class _Writable(Protocol):
    """What ``write_tar_zst`` writes to: anything with ``write(bytes)``."""

    def write(self, data: bytes, /) -> object: ...


def write_tar_zst(
    root: Root,
    out: _Writable,
    *,
    level: int,
    threads: int,
    prune: Callable[[str], bool] | None = None,
    checkpoint: Callable[[], None] = noop,
    progress: Callable[[int], None] = lambda n: None,
) -> None:
    """Write ``tar_pieces(root, …)`` through one zstd compressor (``threads`` workers, as
    ``zstd -T``: its output does not depend on their number) to ``out``, in writes of
    about ``CHUNK`` bytes; the frame is finished when this returns. The frame carries its
    content checksum, as the ``zstd`` command's do: ``zst_reader`` checks it at the end."""
    import zstandard

    compressor = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
    with compressor.stream_writer(
        out,  # type: ignore[arg-type]  # anything with write() will do
        closefd=False,
        write_size=CHUNK,
    ) as writer:
        for piece in tar_pieces(root, prune=prune, checkpoint=checkpoint, progress=progress):
            writer.write(piece)


class _Readable:
    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read

    def read(self, n: int = -1) -> bytes:
        return self._read(CHUNK if n < 0 else n)


def zst_reader(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read(n)`` of the data decompressed from the zstd frame read by ``read`` (pieces,
    ``b""`` at the end), for ``extract_tar``; corrupt data is ``BadArchive``. What follows
    the frame is left to ``read``."""
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(
        _Readable(read),  # type: ignore[arg-type]  # anything with read() will do
        read_size=CHUNK,
        closefd=False,
    )

    def decompressed(n: int) -> bytes:
        try:
            return reader.read(n)
        except zstandard.ZstdError:
            raise BadArchive("corrupt or unreadable data") from None

    return decompressed
