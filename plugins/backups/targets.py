"""The built-in backup targets: ``local`` (a folder on this node) and ``s3`` (any
S3-compatible store: AWS S3, MinIO, Backblaze B2, Wasabi…).

``local`` keeps ``{backups_path}/{volume_id}/{backup_id}.tar.zst``. An upload is written to
a hidden temporary name in that folder and renamed into place by ``commit``; ``abort``
removes it, and ``sweep`` (at start) removes what a crash left.

``s3`` keeps ``{prefix}{volume_id}/{backup_id}.tar.zst`` in ``bucket`` and uploads with a
multipart upload: pieces are gathered into parts of ``part_size`` bytes (at least the 5 MiB
S3 requires, 16 MiB by default), each sent as soon as it is full, so at most one part is
held in memory; ``abort`` aborts the multipart upload (S3 then drops its parts). Requests
go through ``httpx`` (trio-native, already the agent's HTTP client), signed with AWS
Signature V4 by ``httpx_auth.AWS4Auth``; path-style URLs (``{endpoint}/{bucket}/{key}``),
which every S3-compatible service accepts.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import quote

import attrs
import httpx
import trio
from lightd import JobFailed, NotFound, field_check

__all__ = ["LocalTarget", "S3Config", "S3Target"]

log = logging.getLogger(__name__)

TEMP_PREFIX = ".partial-"
SUFFIX = ".tar.zst"
MiB = 1 << 20


def archive_name(backup_id: str) -> str:
    return backup_id + SUFFIX


# --- local ---------------------------------------------------------------------------------


class _LocalUpload:
    def __init__(self, folder: Path, name: str, limiter: trio.CapacityLimiter) -> None:
        self._folder = folder
        self._name = name
        self._tmp = folder / f"{TEMP_PREFIX}{name}-{secrets.token_hex(6)}"
        self._limiter = limiter
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write_sync(self, data: bytes) -> None:
        """From a worker thread (the backup's own): no hop through the event loop."""
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    async def write(self, data: bytes) -> None:
        await trio.to_thread.run_sync(self.write_sync, data, limiter=self._limiter)

    async def commit(self) -> None:
        def finish() -> None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.rename(self._tmp, self._folder / self._name)

        await trio.to_thread.run_sync(finish, limiter=self._limiter)

    async def abort(self) -> None:
        def drop() -> None:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)

        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(drop, limiter=self._limiter)


class _LocalDownload:
    def __init__(self, fd: int, limiter: trio.CapacityLimiter) -> None:
        self._fd = fd
        self._limiter = limiter
        self.size: int | None = os.fstat(fd).st_size

    def read_sync(self, n: int) -> bytes:
        return os.read(self._fd, n)

    async def read(self, n: int) -> bytes:
        return await trio.to_thread.run_sync(os.read, self._fd, n, limiter=self._limiter)

    async def aclose(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalTarget:
    """Archives in a folder of this node (``storage.backups_path``)."""

    def __init__(self, root: Path, limiter: trio.CapacityLimiter) -> None:
        self.root = root
        self._limiter = limiter

    def folder(self, volume_id: str) -> Path:
        return self.root / volume_id

    async def open_upload(self, volume_id: str, backup_id: str) -> _LocalUpload:
        folder = self.folder(volume_id)

        def open_() -> _LocalUpload:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            return _LocalUpload(folder, archive_name(backup_id), self._limiter)

        return await trio.to_thread.run_sync(open_, limiter=self._limiter)

    async def open_download(self, volume_id: str, backup_id: str) -> _LocalDownload:
        path = self.folder(volume_id) / archive_name(backup_id)
        try:
            fd = await trio.to_thread.run_sync(
                os.open, path, os.O_RDONLY | os.O_CLOEXEC, limiter=self._limiter
            )
        except FileNotFoundError:
            raise NotFound("Backup not found", code="backup_not_found") from None
        return _LocalDownload(fd, self._limiter)

    async def delete(self, volume_id: str, backup_id: str) -> None:
        folder = self.folder(volume_id)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / archive_name(backup_id))
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty

        await trio.to_thread.run_sync(remove, limiter=self._limiter)

    def sweep(self) -> int:
        """Remove the temporary files of uploads a crash interrupted; how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for folder in self.root.iterdir():
            if not folder.is_dir() or folder.is_symlink():
                continue
            for item in folder.iterdir():
                if item.name.startswith(TEMP_PREFIX):
                    try:
                        item.unlink()
                        removed += 1
                    except OSError as exc:
                        if exc.errno != errno.ENOENT:
                            log.warning("cannot remove %s: %s", item, exc)
        return removed


# --- s3 ------------------------------------------------------------------------------------


@attrs.frozen
class S3Config:
    """``backups.s3``: the ``s3`` target is offered when ``bucket`` is set."""

    #: e.g. ``https://s3.eu-central-1.amazonaws.com``, ``https://s3.us-west-004.backblazeb2.com``.
    endpoint: str = ""
    bucket: str = ""
    region: str = "us-east-1"
    access_key: str = ""
    secret_key: str = ""
    #: Prepended to every key (``"node-7/"``).
    prefix: str = ""
    #: Bytes per multipart part (5 MiB to 512 MiB): the memory one upload holds.
    part_size: int = attrs.field(
        default=16 * MiB,
        validator=field_check(lambda v: 5 * MiB <= v <= 512 * MiB, "must be 5 MiB to 512 MiB"),
    )
    #: Seconds one request may take.
    timeout: float = 120.0


_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _xml_text(body: bytes, tag: str) -> str | None:
    import xml.etree.ElementTree as ET  # here: only an s3 target needs it

    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return None
    for element in root.iter():
        if element.tag in (tag, _NS + tag):
            return element.text
    return None


def _failure(what: str, response: httpx.Response) -> JobFailed:
    code = _xml_text(response.content, "Code") or ""
    detail = f" ({code})" if code else ""
    return JobFailed(f"S3 {what} failed: HTTP {response.status_code}{detail}")


class _S3Upload:
    def __init__(self, target: S3Target, key: str, upload_id: str) -> None:
        self._target = target
        self._key = key
        self._upload_id = upload_id
        self._buffer = bytearray()
        self._parts: list[tuple[int, str]] = []

    async def write(self, data: bytes) -> None:
        self._buffer += data
        size = self._target.config.part_size
        while len(self._buffer) >= size:
            part = bytes(self._buffer[:size])
            del self._buffer[:size]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        number = len(self._parts) + 1
        response = await self._target.request(
            "PUT",
            self._key,
            params={"partNumber": str(number), "uploadId": self._upload_id},
            content=part,
        )
        if response.status_code != 200:
            raise _failure("upload", response)
        self._parts.append((number, response.headers.get("ETag", "")))

    async def commit(self) -> None:
        if self._buffer or not self._parts:  # the last part may be short (or the only one)
            part, self._buffer = bytes(self._buffer), bytearray()
            await self._send(part)
        body = (
            "<CompleteMultipartUpload>"
            + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
                for n, etag in self._parts
            )
            + "</CompleteMultipartUpload>"
        )
        response = await self._target.request(
            "POST", self._key, params={"uploadId": self._upload_id}, content=body.encode()
        )
        # S3 may answer 200 with an <Error> body when completion fails late
        if response.status_code != 200 or b"<Error>" in response.content[:512]:
            raise _failure("upload", response)

    async def abort(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await self._target.request(
                    "DELETE", self._key, params={"uploadId": self._upload_id}
                )
            except httpx.HTTPError as exc:
                log.warning("could not abort the S3 upload of %s: %s", self._key, exc)


class _S3Download:
    def __init__(self, response: httpx.Response, stream: contextlib.AsyncExitStack) -> None:
        self._response = response
        self._stack = stream
        self._chunks = response.aiter_raw()
        self._pending = b""
        length = response.headers.get("Content-Length")
        self.size: int | None = int(length) if length and length.isdigit() else None

    async def read(self, n: int) -> bytes:
        while not self._pending:
            try:
                self._pending = await self._chunks.__anext__()
            except StopAsyncIteration:
                return b""
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    async def aclose(self) -> None:
        await self._stack.aclose()


class S3Target:
    """Archives in an S3-compatible bucket."""

    def __init__(self, config: S3Config) -> None:
        from httpx_auth import AWS4Auth  # here: only an s3 target needs it

        self.config = config
        self._auth = AWS4Auth(
            access_id=config.access_key,
            secret_key=config.secret_key or "-",
            region=config.region,
            service="s3",
        )
        self._client: httpx.AsyncClient | None = None

    def key(self, volume_id: str, backup_id: str) -> str:
        return f"{self.config.prefix}{volume_id}/{archive_name(backup_id)}"

    def _url(self, key: str) -> str:
        base = self.config.endpoint.rstrip("/")
        return f"{base}/{quote(self.config.bucket)}/{quote(key)}"

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.config.timeout, auth=self._auth)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def request(
        self,
        method: str,
        key: str,
        *,
        params: dict[str, str] | None = None,
        content: bytes = b"",
    ) -> httpx.Response:
        try:
            return await self.client().request(
                method, self._url(key), params=params, content=content
            )
        except httpx.HTTPError as exc:
            raise JobFailed(f"S3 request failed: {type(exc).__name__}") from exc

    async def open_upload(self, volume_id: str, backup_id: str) -> _S3Upload:
        key = self.key(volume_id, backup_id)
        response = await self.request("POST", key, params={"uploads": ""})
        upload_id = _xml_text(response.content, "UploadId") if response.status_code == 200 else None
        if not upload_id:
            raise _failure("upload", response)
        return _S3Upload(self, key, upload_id)

    async def open_download(self, volume_id: str, backup_id: str) -> _S3Download:
        key = self.key(volume_id, backup_id)
        stack = contextlib.AsyncExitStack()
        request = self.client().build_request("GET", self._url(key))
        try:
            response = await self.client().send(request, stream=True)
        except httpx.HTTPError as exc:
            raise JobFailed(f"S3 request failed: {type(exc).__name__}") from exc
        stack.push_async_callback(response.aclose)
        if response.status_code == 404:
            await stack.aclose()
            raise NotFound("Backup not found", code="backup_not_found")
        if response.status_code != 200:
            await response.aread()
            await stack.aclose()
            raise _failure("download", response)
        return _S3Download(response, stack)

    async def delete(self, volume_id: str, backup_id: str) -> None:
        response = await self.request("DELETE", self.key(volume_id, backup_id))
        if response.status_code not in (200, 204, 404):
            raise _failure("delete", response)
