"""``GET /volumes/:id/files/archive``: a folder downloaded as an archive built on the fly
(contract §13).

The archive is never held in memory nor written to disk: a generator walks the folder
through ``lightd.files`` (``Root.walk``: beneath a descriptor of the folder, links reported
and never followed, a folder swapped for a link mid-walk not entered, a file swapped for
a link or a FIFO never opened) and yields the archive a piece at a time. The response body
pulls it: each piece is one call of the generator in a worker thread, so nothing is
produced faster than the client takes it (back-pressure), the event loop never blocks,
and a client that goes away stops the walk at once (the generator is closed, its folder
descriptors with it).

Formats: ``zip`` (the default: what a browser user opens with a double click) and
``tar.gz``. Zip is written by ``zipfile`` to a stream it cannot seek, so each entry's
sizes and CRC follow its data (a data descriptor, which every unzip reads); tar is
``lightd.files.tar_pieces`` (PAX format, the same writer backups use) through one gzip
compressor. Links are
stored as links (a zip entry with the Unix link mode, a tar ``SYMTYPE``); FIFOs, sockets
and device nodes are left out; the agent's own temporary files (``TEMP_PREFIX``: an
upload in progress) are left out. A folder ``P`` is archived under its own name (entries
``<name>/...``); the volume root is archived without a top folder.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import time
import zipfile
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, TypedDict
from urllib.parse import quote

import trio
from lightd import BadRequest
from lightd.api import describe, query_token, requires
from lightd.files import CHUNK, ROOT, TEMP_PREFIX, RelPath, Root, WalkEntry, parse, tar_pieces
from quart import Blueprint, Response, request

__all__ = ["FORMATS", "ArchiveQuery", "ArchiveStream", "add_routes", "archive_chunks"]

log = logging.getLogger(__name__)

#: Format → (media type, file name extension).
FORMATS: dict[str, tuple[str, str]] = {
    "zip": ("application/zip", ".zip"),
    "tar.gz": ("application/gzip", ".tar.gz"),
}
DEFAULT_FORMAT = "zip"
#: Archive bytes gathered before they are handed to the response: big enough that the
#: thread hand-off is a small part of each piece, small enough to keep memory flat.
PIECE = 256 * 1024
GZIP_LEVEL = 6  # as gzip(1) and zip(1), and as the compress route
_ZIP_EPOCH = 315532800  # 1980-01-01: the earliest time a zip entry can hold


class ArchiveQuery(TypedDict, total=False):
    #: The folder, relative to the volume root (default: the whole volume).
    path: str
    #: ``zip`` (default) or ``tar.gz``.
    format: Literal["zip", "tar.gz"]


# --- the archive, a piece at a time (blocking: worker threads) -------------------------------


class _Sink:
    """Where the writers put archive bytes until the generator hands them on. It has no
    ``tell``/``seek``, so ``zipfile`` treats it as a stream (data descriptors)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes, /) -> int:
        if data:
            self._parts.append(bytes(data))
            self.size += len(data)
        return len(data)

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def _skipped(path: str) -> bool:
    """The agent's own temporary files and folders (an upload or copy in progress)."""
    return any(part.startswith(TEMP_PREFIX) for part in path.split("/"))


def _entries(folder: Root, checkpoint: Callable[[], None]) -> Iterator[WalkEntry]:
    for entry in folder.walk(ROOT, checkpoint=checkpoint):
        if not _skipped(entry.path):
            yield entry


def _read_exactly(fh: int, size: int) -> Iterator[bytes]:
    """``size`` bytes of an open file, ``CHUNK`` at a time: a file that grew meanwhile is
    cut there, one that shrank is padded with NULs (the header already promised ``size``)."""
    left = size
    while left > 0:
        data = os.read(fh, min(CHUNK, left))
        if not data:
            data = bytes(min(CHUNK, left))
        left -= len(data)
        yield data


def _zip_name(name: str) -> str:
    """A name ``zipfile`` can store (UTF-8): undecodable bytes become U+FFFD."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "replace")
    return name


def _zip_time(st: os.stat_result) -> tuple[int, int, int, int, int, int]:
    when = time.localtime(max(st.st_mtime, _ZIP_EPOCH))[:6]
    return (2107, 12, 31, 23, 59, 58) if when[0] > 2107 else when


def _zip_chunks(
    folder: Root, top: str, top_stat: os.stat_result, checkpoint: Callable[[], None]
) -> Iterator[bytes]:
    sink = _Sink()
    zf = zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True)

    def add_dir(name: str, st: os.stat_result) -> None:
        info = zipfile.ZipInfo(_zip_name(name) + "/", _zip_time(st))
        info.create_system = 3
        info.external_attr = ((stat.S_IFDIR | stat.S_IMODE(st.st_mode)) << 16) | 0x10
        zf.writestr(info, b"")

    if top:
        add_dir(top, top_stat)
    for entry in _entries(folder, checkpoint):
        st = entry.stat
        name = f"{top}/{entry.path}" if top else entry.path
        if entry.kind == "directory":
            add_dir(name, st)
        elif entry.kind == "symlink":
            target = Root.read_link(entry)
            if target is None:
                continue  # gone meanwhile
            info = zipfile.ZipInfo(_zip_name(name), _zip_time(st))
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, os.fsencode(target), compress_type=zipfile.ZIP_STORED)
        elif entry.kind == "file":
            fh = Root.open_entry(entry)  # None: swapped for a link, FIFO... never opened
            if fh is None:
                continue
            with fh:
                info = zipfile.ZipInfo(_zip_name(name), _zip_time(st))
                info.create_system = 3
                info.external_attr = (stat.S_IFREG | stat.S_IMODE(st.st_mode)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = os.fstat(fh.fileno()).st_size  # decides zip64 up front
                with zf.open(info, "w") as out:
                    for data in _read_exactly(fh.fileno(), info.file_size):
                        out.write(data)
                        if sink.size >= PIECE:
                            yield sink.take()
        # FIFOs, sockets, device nodes: not data, not archived
        if sink.size >= PIECE:
            yield sink.take()
    zf.close()  # the central directory
    yield sink.take()


def _tar_gz_chunks(folder: Root, top: str, checkpoint: Callable[[], None]) -> Iterator[bytes]:
    sink = _Sink()
    gzip = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    for piece in tar_pieces(folder, top=top, checkpoint=checkpoint):
        sink.write(gzip.compress(piece))
        if sink.size >= PIECE:
            yield sink.take()
    sink.write(gzip.flush())
    yield sink.take()


def archive_chunks(
    folder: Root,
    top: str,
    fmt: str,
    *,
    checkpoint: Callable[[], None] = lambda: None,
) -> Iterator[bytes]:
    """The archive (``fmt``: a key of ``FORMATS``) of everything below the open folder
    ``folder``, as pieces of about ``PIECE`` bytes; entries are named ``top/...`` (no top
    folder when ``top`` is empty). The caller keeps ``folder`` open while it iterates."""
    top_stat = os.fstat(folder.fd)
    if fmt == "zip":
        return _zip_chunks(folder, top, top_stat, checkpoint)
    return _tar_gz_chunks(folder, top, checkpoint)


def open_folder(volume: Path, rel: RelPath) -> Root:
    """The folder at ``rel`` (in-volume links to it followed, resolved beneath the volume
    root), open for the walk: ``NotAFolder`` (400), ``PathNotFound`` (404)."""
    with Root.open_volume(volume) as root:
        return Root(root.open_dir(rel))


class ArchiveStream:
    """The response body: each piece is one step of ``archive_chunks`` in a worker thread.
    The folder descriptor and the walk's are closed when the archive ends, when the client
    goes (``aclose``), or when the answer is dropped unsent."""

    def __init__(self, folder: Root, top: str, fmt: str, limiter: trio.CapacityLimiter) -> None:
        self._folder = folder
        self._limiter = limiter
        self._chunks: Iterator[bytes] | None = archive_chunks(
            folder, top, fmt, checkpoint=trio.from_thread.check_cancelled
        )

    def __aiter__(self) -> ArchiveStream:
        return self

    async def __anext__(self) -> bytes:
        chunks = self._chunks
        if chunks is None:
            raise StopAsyncIteration
        try:
            data = await trio.to_thread.run_sync(next, chunks, None, limiter=self._limiter)
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                log.warning("archive download stopped: %s", exc)
            self._close()
            raise
        if data is None:
            self._close()
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            close = getattr(chunks, "close", None)
            if close is not None:
                try:
                    close()  # runs the walk's ``finally``: its folder descriptors close
                except ValueError:  # still running in a worker: it ends with the thread
                    log.warning("archive generator closed while running")
        self._folder.close()

    def __del__(self) -> None:
        self._close()


def download_name(volume_id: str, rel: RelPath, fmt: str) -> str:
    base = rel.parts[-1] if rel.parts else f"volume-{volume_id[:8]}"
    return base + FORMATS[fmt][1]


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def content_disposition(name: str) -> str:
    """``attachment`` with an ASCII fallback name (anything else is ``_``: no quote, no
    separator, no control character can reach the header) and the exact UTF-8 name."""
    fallback = _UNSAFE.sub("_", name).strip("._") or "archive"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


# --- the route -----------------------------------------------------------------------------


def add_routes(
    bp: Blueprint,
    limiter: trio.CapacityLimiter,
    folder_of: Callable[[str], Awaitable[Path]],
) -> None:
    """Add ``GET /volumes/<volume_id>/files/archive`` to the file manager's blueprint."""

    @bp.get("/volumes/<volume_id>/files/archive")
    @describe(
        "Download a folder as an archive",
        description="The folder at `path` (default: the whole volume), streamed as a "
        "`zip` (default) or `tar.gz` built on the fly, never held in memory or written "
        "to disk. Entries are named `<folder name>/...` (the volume root: no top folder). "
        "Links are stored as links, never followed; FIFOs, sockets and device nodes are "
        "left out. 400 `Not a folder: <path>`, 400 `Unsupported format: <format>`, 404 "
        "`Path not found: <path>`. Also accepts a temporary token as `?token=` without "
        "the vendor header (a browser link; a `remove_on_use` token works once).",
        query=ArchiveQuery,
        responses={200: {"application/zip": bytes, "application/gzip": bytes}},
        tags=("files",),
    )
    @requires("files")
    @query_token
    async def download_archive(volume_id: str) -> Response:
        folder = await folder_of(volume_id)
        fmt = request.args.get("format", DEFAULT_FORMAT)
        if fmt not in FORMATS:
            raise BadRequest(f"Unsupported format: {fmt}", code="unsupported_format")
        rel = parse(request.args.get("path", ""), empty_is_root=True)
        opened = await trio.to_thread.run_sync(open_folder, folder, rel, limiter=limiter)
        top = rel.parts[-1] if rel.parts else ""
        body: ArchiveStream | bytes = b""
        if request.method == "HEAD":  # the headers only: no archive is built
            opened.close()
        else:
            body = ArchiveStream(opened, top, fmt, limiter)
        response = Response(body, status=200, content_type=FORMATS[fmt][0])
        response.headers.pop("Content-Length", None)  # unknown: the archive is built as sent
        response.timeout = None  # not Quart's RESPONSE_TIMEOUT: a big folder takes its time
        response.headers["Content-Disposition"] = content_disposition(
            download_name(volume_id, rel, fmt)
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response
