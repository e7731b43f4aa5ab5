"""Built-in plugin ``file_manager``: what a panel's file manager needs (contract §13).

Open, download (ranges included), upload, delete, rename, chmod and search files in a
volume, and read a volume's usage. Every path goes through ``lightd.files`` (resolved
beneath a descriptor of the volume root, never following a link out of it; see ``ops``);
volumes are reached only through ``agent.stash[VOLUMES]``.

Streaming both ways, with memory that does not grow with the file: a download is read
``READ_SIZE`` bytes at a time and sent as it is read (the server's send waits for the
socket); what the page cache holds is read in the event loop with ``RWF_NOWAIT`` (never
waiting for the disk), the rest in a worker thread (``FileStream``). An upload is read
with ``lightd.api.body_batches`` (back-pressure: the server stops reading the socket while
the disk is behind), each ~1 MiB batch written with one ``writev`` in a worker thread while
the next one arrives, into a temporary file beside the target, renamed over it when the
body is complete. A cut connection, a refusal or a failure removes the temporary file and
leaves the old one.

Hooks: ``lightd_add_config_sections`` (section ``files``), ``lightd_configure`` (the
worker limiter), ``lightd_add_routes``.

Config section ``files``: ``max_upload_bytes`` (10 GiB) the largest upload (413
``Upload too large``; uploads are not bound by ``server.max_body_bytes``), ``workers``
(4) threads for file-manager work, ``pull_allowed_cidrs`` (none) and ``max_pull_bytes``
(10 GiB) for ``POST /volumes/:id/files/pull`` (module ``pull``).

Routes: ``GET /volumes/:id`` (token permission ``read``), and with permission ``files``:
``GET|PUT /volumes/:id/files/content?path=``, ``POST /volumes/:id/files/delete``,
``/files/rename``, ``/files/chmod``, ``GET /volumes/:id/files/search``,
``GET /volumes/:id/files/archive`` (``archive``: a folder streamed as a zip or tar.gz).
The two downloads also take a temporary token as ``?token=`` (``query_token``: browser
links).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import attrs
import trio
from lightd import (
    DISK,
    VOLUMES,
    Agent,
    BadRequest,
    ContainersSettings,
    NotFound,
    StashKey,
    disk_writing,
    field_check,
    hookimpl,
    valid_cidrs,
)
from lightd.api import body_batches, describe, query_token, read_json, requires, streams_body
from lightd.files import CHUNK, RelPath, parse
from quart import Blueprint, Response, jsonify, request

from . import archive, ops, pull

__all__ = ["FilesConfig", "parse_range"]

T = TypeVar("T")

_GIB = 1024**3


@attrs.frozen
class FilesConfig:
    #: The largest upload, in bytes (``413 Upload too large`` beyond it).
    max_upload_bytes: int = attrs.field(
        default=10 * _GIB, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    #: Worker threads for file-manager work (reads, searches, deletes...).
    workers: int = attrs.field(
        default=4, validator=field_check(lambda v: 1 <= v <= 64, "must be 1 to 64")
    )
    #: fsync each uploaded file and its folder before answering (slower; power-loss safe).
    fsync_uploads: bool = False
    #: Networks a pull may reach besides public addresses (``["10.1.0.0/16"]``; see pull).
    pull_allowed_cidrs: tuple[str, ...] = attrs.field(
        default=(), validator=field_check(valid_cidrs, "must be a list of CIDRs")
    )
    #: The largest pulled file, in bytes.
    max_pull_bytes: int = attrs.field(
        default=10 * _GIB, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    #: Whether ``POST …/files/pull`` may fetch URLs at all (false: 403; a node that must
    #: never reach out, or a test run that must stay on loopback).
    pulls_enabled: bool = True


WORKERS: StashKey[trio.CapacityLimiter] = StashKey("file_manager.workers")

#: Bytes of a download read and sent at once: big enough that the per-chunk work (server,
#: Quart, a thread hand-off when the disk is read) is a small part of each, small enough
#: to stay in the CPU cache between the read and the send (bench/files.py: 512 KiB costs
#: more CPU per byte, 4 MiB saves none); the bare app of the bench reads as much.
READ_SIZE = CHUNK


# --- ranges --------------------------------------------------------------------------------

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks of a ``size``-byte file: ``None``
    for the whole file (no header, another unit, or several ranges: answered whole, as
    RFC 9110 allows); ``ValueError`` when it is malformed or not satisfiable (416)."""
    if header is None:
        return None
    header = header.strip()
    if not header.startswith("bytes=") or "," in header:
        return None
    match = _RANGE.fullmatch(header.replace(" ", ""))
    if match is None or match.group(1) == match.group(2) == "":
        raise ValueError(header)
    first, last = match.group(1), match.group(2)
    if first == "":  # the last N bytes
        length = int(last)
        if length == 0 or size == 0:
            raise ValueError(header)
        return max(0, size - length), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        raise ValueError(header)
    return start, end


class FileStream:
    """The body of a download: ``length`` bytes of ``fd`` from ``offset``, a chunk at a
    time. What the page cache holds is read right in the event loop without ever waiting
    for the disk (``ops.read_cached``: no thread hand-off, and the bytes are still in the
    CPU cache when they are sent); anything else is read in a worker thread. The
    descriptor is closed when the body ends, when the client goes (``aclose``), or when the
    answer is dropped unsent; never while a thread reads it (a worker-thread call cannot be
    abandoned)."""

    def __init__(self, fd: int, offset: int, length: int, limiter: trio.CapacityLimiter) -> None:
        self._fd = fd
        self._offset = offset
        self._left = length
        self._limiter = limiter
        self._buffer = memoryview(bytearray(min(READ_SIZE, length)))

    def __aiter__(self) -> FileStream:
        return self

    async def __anext__(self) -> bytes:
        if self._left <= 0 or self._fd < 0:
            self._close()
            raise StopAsyncIteration
        size = min(READ_SIZE, self._left)
        got = ops.read_cached(self._fd, self._buffer[:size], self._offset)
        if got is not None:
            data = bytes(self._buffer[:got])
        else:
            data = await trio.to_thread.run_sync(
                ops.read_chunk, self._fd, self._offset, size, limiter=self._limiter
            )
        if not data:  # the file shrank meanwhile: the promised length cannot be sent
            self._close()
            raise OSError("file truncated while it was being sent")
        self._offset += len(data)
        self._left -= len(data)
        return data

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self._close()


# --- request bodies and answers (their types are the OpenAPI document's schemas) ------------


def _is_str(value: object) -> bool:
    return isinstance(value, str)


#: A client path field: judged by ``lightd.files.parse`` (contract §5 messages).
_PATH = field_check(_is_str, "must be a string")


@attrs.frozen
class DeleteBody:
    paths: list[Any] = attrs.field(
        validator=field_check(
            lambda v: len(v) > 0 and all(map(_is_str, v)), "must be a non-empty list of paths"
        )
    )


RenamePair = TypedDict("RenamePair", {"from": str, "to": str})

#: ``{"from", "to"}`` for one move, or ``{"renames": [{"from", "to"}, ...]}``.
RenameBody = TypedDict(
    "RenameBody", {"from": str, "to": str, "renames": list[RenamePair]}, total=False
)


@attrs.frozen
class ModeChange:
    path: Any = attrs.field(validator=_PATH)
    #: Octal permission bits, ``"0"`` to ``"777"`` (a leading ``0`` allowed).
    mode: Any = None


@attrs.frozen
class ChmodBody:
    files: list[ModeChange] = attrs.field(
        validator=field_check(lambda v: len(v) > 0, "must not be empty")
    )


class VolumeUsage(TypedDict):
    """``bytes`` of the volume's regular files and how many entries that are not folders
    (``files``), counted by a walk that follows no link (cached by the disk service and
    adjusted by the API's writes; under a kernel project quota, the quota's bytes and
    inodes)."""

    bytes: int
    files: int


class VolumeDetail(TypedDict):
    """A volume with its usage; ``size_limit`` in bytes, 0 = none (contract §15)."""

    volume_id: str
    path: str
    created_at: int
    size_limit: int
    usage: VolumeUsage


class Uploaded(TypedDict):
    message: str
    path: str
    size: int


class Deleted(TypedDict):
    message: str
    deleted_count: int


class Renamed(TypedDict):
    message: str
    renamed_count: int


class ModesChanged(TypedDict):
    message: str
    changed_count: int


class SearchAnswer(TypedDict):
    results: list[ops.Found]
    truncated: bool


class ContentQuery(TypedDict):
    #: The file, relative to the volume root.
    path: str


class SearchQuery(TypedDict, total=False):
    #: Text the names (and with ``content=true``, the text) must hold, case-insensitive.
    q: str
    #: The folder to search (default: the volume root).
    path: str
    #: Also search text files up to 1 MiB by content (``true``/``false``).
    content: str
    #: Results at most: 1 to 1000 (default 100).
    limit: int


def _error(status: int, message: str, code: str, **headers: str) -> Response:
    response = jsonify({"error": message, "code": code})
    response.status_code = status
    response.headers.update(headers)
    return response


def _pair(value: object, where: str) -> tuple[RelPath, RelPath]:
    if not isinstance(value, dict):
        raise BadRequest(f"{where.rstrip('.')}: must be an object", code="invalid_field")
    for key in ("from", "to"):
        if key not in value:
            raise BadRequest(f"{where}{key}: is required", code="invalid_field")
        if not isinstance(value[key], str):
            raise BadRequest(f"{where}{key}: must be a string", code="invalid_field")
    return parse(value["from"]), parse(value["to"])


def _renames(body: object) -> list[tuple[RelPath, RelPath]]:
    """The moves a rename body asks for, one or a batch."""
    if not isinstance(body, dict):
        raise BadRequest("Invalid JSON body: must be an object", code="invalid_json")
    if "renames" not in body:
        return [_pair(body, "")]
    pairs = body["renames"]
    if not isinstance(pairs, list) or not pairs:
        raise BadRequest("renames: must be a non-empty list", code="invalid_field")
    return [_pair(pair, f"renames[{i}].") for i, pair in enumerate(pairs)]


def _flag(name: str, value: str | None) -> bool:
    if value is None or value.lower() in ("", "false", "0"):
        return False
    if value.lower() in ("true", "1"):
        return True
    raise BadRequest(f"{name}: must be true or false", code="invalid_query")


def _limit(value: str | None) -> int:
    if value is None:
        return 100
    try:
        limit = int(value)
    except ValueError:
        raise BadRequest("limit: must be an integer", code="invalid_query") from None
    if limit < 1:
        raise BadRequest("limit: must be at least 1", code="invalid_query")
    return min(limit, 1000)


# --- hooks ---------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"files": FilesConfig}


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[WORKERS] = trio.CapacityLimiter(agent.config.section(FilesConfig).workers)
    pull.register(agent)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    limiter = agent.stash[WORKERS]
    bp = Blueprint("file_manager", __name__)

    async def folder_of(volume_id: str) -> Path:
        volumes = agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    async def run(fn: Callable[..., T], *args: Any) -> T:
        """Off the event loop, on this plugin's threads; cancellation (client gone, agent
        stopping) reaches the worker at its next checkpoint."""
        return await trio.to_thread.run_sync(
            partial(fn, *args, checkpoint=trio.from_thread.check_cancelled), limiter=limiter
        )

    async def blocking(fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(partial(fn, *args), limiter=limiter)

    def owner() -> Any:
        return agent.config.section_or_default(ContainersSettings).owner

    def _stale(volume_id: str) -> None:
        """Files went: the disk service measures the volume again (in the background)."""
        disk = agent.stash.get(DISK)
        if disk is not None:
            disk.stale(volume_id)

    @bp.get("/volumes/<volume_id>")
    @describe(
        "Show a volume and its usage",
        description="`usage` counts the bytes of the volume's regular files and its "
        "entries that are not folders, by a walk that follows no link, cached (measured "
        "again at most every `disk.check_interval`, adjusted by the API's own writes in "
        "between; under a kernel project quota, read from the quota). `size_limit` in "
        "bytes, 0 = none.",
        tags=("files",),
    )
    @requires("read")
    async def show_volume(volume_id: str) -> VolumeDetail:
        volumes = agent.stash.get(VOLUMES)
        if volumes is None:
            raise NotFound("Volume not found", code="volume_not_found")
        volume = await volumes.get(volume_id)
        folder = await folder_of(volume.volume_id)
        disk = agent.stash.get(DISK)
        if disk is None:  # the disk plugin is disabled: a walk
            walked = await run(ops.usage, folder)
            size_limit, used, files = 0, walked.bytes, walked.files
        else:
            usage = await disk.usage(volume.volume_id)
            size_limit, used, files = usage.size_limit, usage.bytes, usage.files
        return {
            "volume_id": volume.volume_id,
            "path": str(folder),
            "created_at": volume.created_at,
            "size_limit": size_limit,
            "usage": {"bytes": used, "files": files},
        }

    @bp.get("/volumes/<volume_id>/files/content")
    @describe(
        "Download a file",
        description="The raw bytes, streamed. `Range: bytes=a-b` (or `a-`, `-n`) answers "
        "206 with `Content-Range`; a malformed or unsatisfiable range is 416. 400 `Not a "
        "file: <path>` for a folder, 404 `Path not found: <path>`.",
        query=ContentQuery,
        responses={
            200: {"application/octet-stream": bytes},
            206: {"application/octet-stream": bytes},
        },
        errors=(416,),
        tags=("files",),
    )
    @requires("files")
    @query_token
    async def download(volume_id: str) -> Response:
        folder = await folder_of(volume_id)
        rel = parse(request.args.get("path", ""))
        fd, size = await run(ops.open_read, folder, rel)
        try:
            wanted = parse_range(request.headers.get("Range"), size)
        except ValueError:
            os.close(fd)
            return _error(
                416, "Range not satisfiable", "range_not_satisfiable",
                **{"Content-Range": f"bytes */{size}"},
            )  # fmt: skip
        start, end = (0, size - 1) if wanted is None else wanted
        length = end - start + 1
        response = Response(
            FileStream(fd, start, length, limiter),
            status=200 if wanted is None else 206,
            content_type="application/octet-stream",
        )
        response.timeout = None  # not Quart's RESPONSE_TIMEOUT: a big file takes its time
        response.headers["Content-Length"] = str(length)
        response.headers["Accept-Ranges"] = "bytes"
        if wanted is not None:
            response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return response

    @bp.put("/volumes/<volume_id>/files/content")
    @describe(
        "Upload a file",
        description="The raw request body becomes the file at `path`: streamed to a "
        "temporary file beside it, which replaces the old one atomically when the body is "
        "complete; missing parent folders are created. Not bound by "
        "`server.max_body_bytes` but by `files.max_upload_bytes` (413 `Upload too "
        "large`). A cut or refused upload leaves the old file and no temporary file. 409 "
        "when a folder is at `path`.",
        body={"application/octet-stream": bytes},
        query=ContentQuery,
        responses={200: Uploaded},
        errors=(409, 413),
        tags=("files",),
    )
    @requires("files")
    @streams_body
    async def upload(volume_id: str) -> Uploaded | Response:  # Response: a 413
        folder = await folder_of(volume_id)
        rel = parse(request.args.get("path", ""))
        config: FilesConfig = agent.config.section(FilesConfig)
        limit = config.max_upload_bytes
        expected = request.content_length
        if expected is not None and expected > limit:
            return _error(413, "Upload too large", "upload_too_large")
        async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
            budget.charge(expected or 0)  # a known size: refused before a byte is written
            charged = expected or 0
            upload = await blocking(ops.Upload, folder, rel, owner(), config.fsync_uploads)
            finished = False  # committed (or its commit failed and cleaned up after itself)
            try:
                received = 0
                async for batch in body_batches():  # ~1 MiB at a time, the next one arriving
                    received += sum(map(len, batch))  # meanwhile, up to HIGH_WATER ahead
                    if received > limit:
                        return _error(413, "Upload too large", "upload_too_large")
                    if received > charged:  # no (or a wrong) length: charged as it comes
                        budget.charge(received - charged)
                        charged = received
                    await blocking(upload.write, batch)
                if expected is not None and received != expected:
                    raise BadRequest("Upload incomplete", code="upload_incomplete")
                finished = True
                size = await blocking(upload.commit)
                budget.freed(upload.replaced)
            finally:
                if not finished:  # refused, failed, or the client went: no temp file left
                    with trio.CancelScope(shield=True):
                        await blocking(upload.abort)
        return {"message": "File uploaded successfully", "path": str(rel), "size": size}

    @bp.post("/volumes/<volume_id>/files/delete")
    @describe(
        "Delete files and folders",
        description="A folder goes with everything in it; a link is removed, never "
        "followed. Every path is checked first: one missing is a 404 and nothing is "
        "deleted. 400 for the volume root.",
        body=DeleteBody,
        examples={"body": {"paths": ["logs/crash.log", "old-world"]}},
        tags=("files",),
    )
    @requires("files")
    async def delete(volume_id: str) -> Deleted:
        folder = await folder_of(volume_id)
        body = await read_json(DeleteBody)
        paths = [parse(p) for p in body.paths]
        if any(not p.parts for p in paths):
            raise BadRequest("Invalid path: cannot delete the volume root", code="root_path")
        try:
            count = await run(ops.delete, folder, paths)
        finally:
            _stale(folder.name)
        return {"message": f"Deleted {count} paths", "deleted_count": count}

    @bp.post("/volumes/<volume_id>/files/rename")
    @describe(
        "Rename or move files and folders",
        description='`{"from", "to"}` for one move or `{"renames": [{"from", "to"}, '
        "...]}` for a batch, checked whole before any move (the moves are checked in "
        "order, as if the earlier ones were done). 404 for a missing source, 409 `File "
        "already exists at path: <to>`, 400 for a folder moved into itself.",
        body=RenameBody,
        errors=(409,),
        examples={"body": {"from": "world", "to": "backups/world-old"}},
        tags=("files",),
    )
    @requires("files")
    async def rename(volume_id: str) -> Renamed:
        folder = await folder_of(volume_id)
        pairs = _renames(await read_json())
        count = await run(ops.rename, folder, pairs, owner())
        return {"message": f"Renamed {count} paths", "renamed_count": count}

    @bp.post("/volumes/<volume_id>/files/chmod")
    @describe(
        "Change permission bits",
        description="`mode` is octal `0` to `777` (a leading `0` allowed); setuid, "
        "setgid, sticky or anything else is 400 `Invalid mode: <mode>`. A link is 400 "
        "`Not a file: <path>` (never followed). Every path is checked first.",
        body=ChmodBody,
        examples={"body": {"files": [{"path": "start.sh", "mode": "755"}]}},
        tags=("files",),
    )
    @requires("files")
    async def chmod(volume_id: str) -> ModesChanged:
        folder = await folder_of(volume_id)
        body = await read_json(ChmodBody)
        changes = []
        for change in body.files:
            mode = ops.parse_mode(change.mode)
            if mode is None:
                raise BadRequest(f"Invalid mode: {change.mode}", code="invalid_mode")
            changes.append((parse(change.path), mode))
        count = await run(ops.chmod, folder, changes)
        return {"message": f"Changed {count} modes", "changed_count": count}

    @bp.get("/volumes/<volume_id>/files/search")
    @describe(
        "Search files",
        description="Names holding `q` (case-insensitive); with `content=true` also text "
        "files up to 1 MiB holding it, with the first matching `line`. `path` narrows to "
        "a folder; `limit` 1 to 1000 (default 100; more is capped), `truncated` when "
        "results were left out. Links are listed, never followed.",
        query=SearchQuery,
        tags=("files",),
    )
    @requires("files")
    async def search(volume_id: str) -> SearchAnswer:
        folder = await folder_of(volume_id)
        query = request.args.get("q", "")
        if not query:
            raise BadRequest("q: is required", code="invalid_query")
        base = parse(request.args.get("path", ""), empty_is_root=True)
        content = _flag("content", request.args.get("content"))
        limit = _limit(request.args.get("limit"))
        results, truncated = await run(ops.search, folder, base, query, content, limit)
        return {"results": results, "truncated": truncated}

    archive.add_routes(bp, limiter, folder_of)
    pull.add_routes(bp, agent, folder_of, lambda: agent.config.section(FilesConfig))
    return [bp]
