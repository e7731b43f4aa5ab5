"""``POST /volumes/:id/files/pull``: download a URL into a volume, as a job (contract §13, §14).

Why this needs care: the agent runs on the host, often next to a cloud metadata service,
a Docker engine, a panel and databases on private addresses. A pull of a URL chosen by a
client must never reach any of them (peers' advisories GHSA-6rg3-8h8x-5xfv and
GHSA-qq22-jj8x-4wwv: a filter that checked the host name, then let the HTTP client
resolve it again and follow redirects itself, was bypassed by DNS rebinding and by a
redirect to an internal address).

So the check lives where the connection is made. The job drives ``httpcore`` directly,
with a connection pool whose network backend is ``lightd.GuardedBackend`` (the public
``network_backend=`` hook of ``httpcore.AsyncConnectionPool``; httpx's transport does
not take one): for every new connection it resolves the host once, refuses if any
resolved address is not public (``lightd.is_public_address``) unless it lies in
``files.pull_allowed_cidrs``, and connects to the checked address itself, so nothing
resolves the name a second time. The TLS handshake still names the original host
(httpcore passes ``server_hostname`` from the request's origin, and the ``Host`` header
comes from the URL). Redirects are followed here, at most ``MAX_REDIRECTS``, each one a
new request through the same guarded pool. httpcore reads no environment (no proxies,
no ``.netrc``), keeps no cookies and adds no credentials; credentials in the URL itself
are sent only to that URL's own origin, never to a redirect's.

The body streams into a temporary file recorded by the job (``job.temp_path``) in the
target's folder, through ``lightd.files.Root`` (never a host path), and is renamed over
the target when complete (§5 write semantics: an existing file is replaced atomically, a
folder there is a 409, or fails the job if it appears meanwhile; a link at the target is
replaced itself, never followed). Failure or cancellation removes the temporary file and
the folders made for it. Bytes are stored as sent (``Accept-Encoding: identity``, no
decoding), and counted against ``files.max_pull_bytes``, from ``Content-Length`` up front
and while streaming.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote

import attrs
import httpcore
import httpx
import trio
from lightd import (
    DESTINATION_NOT_ALLOWED,
    DISK,
    JOBS,
    Agent,
    BadRequest,
    ContainersSettings,
    DiskBudget,
    DiskService,
    Forbidden,
    GuardedBackend,
    IPNetwork,
    JobContext,
    JobFailed,
    JobLimitReached,
    JobStarted,
    TooManyRequests,
    __version__,
    address_permitted,
    disk_writing,
    literal_address,
    parse_networks,
)
from lightd.api import describe, read_json, requires
from lightd.files import (
    NAME_MAX,
    FileError,
    FileExists,
    FolderExists,
    InvalidPath,
    Owner,
    PathNotFound,
    RelPath,
    Root,
    parse,
)
from quart import Blueprint

__all__ = [
    "KIND",
    "MAX_REDIRECTS",
    "PullBody",
    "PullSettings",
    "add_routes",
    "file_name",
    "register",
]

#: The job kind; a temporary token needs permission ``files`` to cancel one.
KIND = "volume.pull"
#: Redirects followed at most (the 6th redirect fails the job ``Too many redirects``).
MAX_REDIRECTS = 5
#: Pulls of one volume at once; the next one is a 429.
MAX_PER_VOLUME = 3
#: Seconds: to resolve and connect (each connection), and the longest silence while
#: reading an answer or writing the request.
CONNECT_TIMEOUT = 15.0
IDLE_TIMEOUT = 60.0
#: Bytes gathered before each write to the file (one worker-thread call).
WRITE_SIZE = 1 << 20
#: Longest URL accepted.
MAX_URL = 8192
#: The name used when neither ``name`` nor the URL gives one.
DEFAULT_NAME = "download"

USER_AGENT = f"lightd/{__version__} (volume pull)".encode()
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class PullSettings(Protocol):
    """What the pull reads of config section ``files`` (``FilesConfig``)."""

    @property
    def pull_allowed_cidrs(self) -> tuple[str, ...]: ...

    @property
    def max_pull_bytes(self) -> int: ...

    @property
    def pulls_enabled(self) -> bool: ...


_ssl_context: Any = None


def _tls() -> Any:
    """The TLS context of pulls: certifi's CAs, no ``SSL_CERT_FILE`` from the environment."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = httpx.create_ssl_context(trust_env=False)
    return _ssl_context


# --- URLs and names ------------------------------------------------------------------------

_HOST = re.compile(r"[a-z0-9._-]+", re.ASCII)


def _url(text: str, base: httpx.URL | None = None) -> httpx.URL:
    """An ``http``/``https`` URL with a host (``base`` resolves a relative redirect);
    ``ValueError`` for anything else."""
    if not text or len(text) > MAX_URL or any(c in text for c in "\r\n\x00"):
        raise ValueError(text)
    try:
        url = httpx.URL(text) if base is None else base.join(text)
    except (httpx.InvalidURL, TypeError, UnicodeError):
        raise ValueError(text) from None
    if url.scheme not in ("http", "https"):
        raise ValueError(text)
    try:
        host = url.raw_host.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(text) from None
    if not host or not (_HOST.fullmatch(host) or (":" in host and literal_address(host))):
        raise ValueError(text)
    return url


def _literal_blocked(url: httpx.URL, allowed: Sequence[IPNetwork]) -> bool:
    literal = literal_address(url.raw_host.decode("ascii"))
    return literal is not None and not address_permitted(literal, allowed)


def _clean(name: str) -> str:
    """A name made safe to be one file name: no separator, NUL or control character,
    not ``.``/``..``, at most 255 bytes of UTF-8."""
    name = "".join("_" if c in "/\\" or ord(c) < 32 or ord(c) == 127 else c for c in name)
    name = name.encode("utf-8", "replace").decode("utf-8").strip()
    encoded = name.encode()
    if len(encoded) > NAME_MAX:
        name = encoded[:NAME_MAX].decode("utf-8", "ignore").strip()
    if name in ("", ".", ".."):
        return DEFAULT_NAME
    return name


def file_name(url: httpx.URL, name: str | None) -> str:
    """The name of the pulled file: ``name`` as given (it must be one file name: 400
    otherwise), else the URL path's last segment (percent-decoded, then sanitized), else
    ``download``."""
    if name is not None:
        bad = (
            name in ("", ".", "..")
            or "/" in name
            or "\x00" in name
            or len(name.encode("utf-8", "surrogatepass")) > NAME_MAX
        )
        if bad:
            raise InvalidPath("name must be a single file name", code="invalid_name")
        return name
    raw = url.raw_path.split(b"?", 1)[0].decode("ascii", "replace")
    segment = raw.rsplit("/", 1)[-1]
    return _clean(unquote(segment, errors="replace"))


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    value = _header(headers, b"content-length")
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def _origin(url: httpx.URL) -> tuple[str, bytes, int | None]:
    return url.scheme, url.raw_host, url.port


def _core_url(url: httpx.URL) -> httpcore.URL:
    return httpcore.URL(
        scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
    )


def _reason(exc: BaseException) -> str:
    """Why a connection failed, for the job's error: the first message down the chain
    of causes (httpcore's trio backend wraps a TLS error in two message-less ones)."""
    if isinstance(exc, httpcore.TimeoutException):
        return "timed out"
    cause: BaseException | None = exc
    for _ in range(5):
        if cause is None:
            break
        text = str(cause).strip()
        if text:
            return text[:200]
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__


# --- the file (blocking, in worker threads) ------------------------------------------------


class _Sink:
    """The temporary file ``tmp`` beside ``dest`` in a volume, renamed over ``dest`` by
    ``commit``; ``abort`` removes it and the folders made for it."""

    def __init__(self, folder: Path, dest: RelPath, tmp: RelPath, owner: Owner | None) -> None:
        self._dest = dest
        self._tmp = tmp
        self._root = Root.open_volume(folder, owner=owner)
        self._fd = -1
        self._created: list[RelPath] = []
        self.size = 0
        try:
            self._created = self._root.make_dirs(dest.parent, report=dest)
            _refuse_folder(self._root, dest)
            self._fd = self._root.create_file(tmp, 0o644)
        except BaseException:
            self.abort()
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.size += len(data)

    def commit(self) -> int:
        """Take the replaced file's mode and owner (else the folder's owner, unless
        ``containers.user`` owns it already), then rename into place."""
        root, dest = self._root, self._dest
        try:
            existing = _lstat(root, dest)
            mode = 0o644
            owner: tuple[int, int] | None = None
            if existing is not None and stat.S_ISREG(existing.st_mode):
                mode = stat.S_IMODE(existing.st_mode) & 0o777
                owner = (existing.st_uid, existing.st_gid)
            elif root.owner is None:
                parent = root.stat(dest.parent)
                owner = (parent.st_uid, parent.st_gid)
            if owner is not None:
                with contextlib.suppress(PermissionError):
                    os.fchown(self._fd, *owner)
            os.fchmod(self._fd, mode)
            os.close(self._fd)
            self._fd = -1
            root.rename(self._tmp, dest, replace=True)
        except BaseException:
            self.abort()
            raise
        root.close()
        return self.size

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._root.fd < 0:
            return
        with contextlib.suppress(FileError, OSError):
            self._root.remove(self._tmp)
        with contextlib.suppress(FileError, OSError):
            self._root.remove_created(self._created)
        self._root.close()


def _lstat(root: Root, rel: RelPath) -> os.stat_result | None:
    try:
        return root.stat(rel, follow=False)
    except PathNotFound:
        return None


def _refuse_folder(root: Root, dest: RelPath) -> None:
    """§5 write: a folder at the target is a 409 (a link to one counts as a file: it is
    replaced, never followed)."""
    existing = _lstat(root, dest)
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        raise FolderExists(dest.text)


def _check_target(folder: Path, dest: RelPath) -> None:
    """Before the job: a folder at the target, or a file where a parent folder must be,
    is refused at once (409) rather than after the download."""
    with Root.open_volume(folder) as root:
        _refuse_folder(root, dest)
        parent = dest.parent
        for depth in range(1, len(parent.parts) + 1):
            prefix = RelPath(parent.parts[:depth], "/".join(parent.parts[:depth]))
            try:
                st = root.stat(prefix)
            except PathNotFound:
                return
            if not stat.S_ISDIR(st.st_mode):
                raise FileExists(dest.text)


# --- the job ---------------------------------------------------------------------------------


@attrs.frozen
class _Pull:
    url: httpx.URL
    folder: Path
    dest: RelPath
    allowed: tuple[IPNetwork, ...]
    max_bytes: int
    owner: Owner | None
    #: The volume's disk budget (contract §15): the file counts against its limit.
    disk: DiskService | None = None

    async def run(self, job: JobContext) -> None:
        async with disk_writing(self.disk, self.folder.name) as budget:
            await self._run(job, budget)

    async def _run(self, job: JobContext, budget: DiskBudget) -> None:
        tmp = await job.temp_path(self.dest.parent)
        sink = await trio.to_thread.run_sync(_Sink, self.folder, self.dest, tmp, self.owner)
        committed = False
        try:
            backend = GuardedBackend(
                self.allowed, refuse=lambda host: JobFailed(DESTINATION_NOT_ALLOWED)
            )
            async with httpcore.AsyncConnectionPool(
                ssl_context=_tls(),
                max_connections=1,
                max_keepalive_connections=1,
                retries=0,
                network_backend=backend,
            ) as pool:
                try:
                    await self._fetch(job, pool, sink, budget)
                except httpcore.TimeoutException as exc:
                    raise JobFailed(f"Download failed: {_reason(exc)}") from None
                except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
                    raise JobFailed(f"Download failed: {_reason(exc)}") from None
            size = await trio.to_thread.run_sync(sink.commit)
            committed = True
        finally:
            if not committed:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(sink.abort)
        job.progress(size)
        job.result = {"path": self.dest.text, "size": size}

    async def _fetch(
        self,
        job: JobContext,
        pool: httpcore.AsyncConnectionPool,
        sink: _Sink,
        budget: DiskBudget,
    ) -> None:
        url = self.url
        credentials = url.userinfo
        for _hop in range(MAX_REDIRECTS + 1):
            headers = [
                (b"User-Agent", USER_AGENT),
                (b"Accept", b"*/*"),
                (b"Accept-Encoding", b"identity"),
            ]
            if credentials and _origin(url) == _origin(self.url):
                token = base64.b64encode(unquote(credentials.decode()).encode())
                headers.append((b"Authorization", b"Basic " + token))
            timeouts = {
                "connect": CONNECT_TIMEOUT,
                "read": IDLE_TIMEOUT,
                "write": IDLE_TIMEOUT,
                "pool": CONNECT_TIMEOUT,
            }
            async with pool.stream(
                "GET", _core_url(url), headers=headers, extensions={"timeout": timeouts}
            ) as response:
                if response.status in _REDIRECTS:
                    url = self._next(url, _header(response.headers, b"location"))
                    continue
                if not 200 <= response.status < 300:
                    raise JobFailed(f"Download failed: HTTP {response.status}")
                await self._receive(job, response, sink, budget)
                return
        raise JobFailed("Too many redirects")

    def _next(self, current: httpx.URL, location: bytes | None) -> httpx.URL:
        if location is None:
            raise JobFailed("Download failed: a redirect without a Location")
        try:
            target = _url(location.decode("latin-1").strip(), current)
        except ValueError:
            raise JobFailed("Invalid URL") from None
        if _literal_blocked(target, self.allowed):
            raise JobFailed(DESTINATION_NOT_ALLOWED)
        # credentials in a Location are never used: only the first URL's, to its origin
        return target.copy_with(username=None, password=None)

    async def _receive(
        self, job: JobContext, response: httpcore.Response, sink: _Sink, budget: DiskBudget
    ) -> None:
        total = _content_length(response.headers)
        if total is not None and total > self.max_bytes:
            raise JobFailed("File too large")
        budget.charge(total or 0)  # a known size is refused before a byte is written
        charged = total or 0
        job.progress(0, total)
        done = 0
        pending = bytearray()
        stream: Any = response.aiter_stream()
        async for chunk in stream:
            done += len(chunk)
            if done > self.max_bytes:
                raise JobFailed("File too large")
            pending += chunk
            if done > charged:  # more than announced (or no length): charged as it comes
                budget.charge(done - charged)
                charged = done
            if len(pending) >= WRITE_SIZE:
                data, pending = bytes(pending), bytearray()
                await trio.to_thread.run_sync(sink.write, data)
            job.progress(done)  # bytes received; the runner publishes at most twice a second
        if pending:
            await trio.to_thread.run_sync(sink.write, bytes(pending))


# --- the route -------------------------------------------------------------------------------


@attrs.frozen
class PullBody:
    #: An ``http`` or ``https`` URL.
    url: str
    #: The folder to put the file in, relative to the volume root (``.`` for the root);
    #: missing folders are created.
    path: str
    #: The file's name (one name, no ``/``); default: the URL path's last segment.
    name: str | None = None


def register(agent: Agent) -> None:
    """Declare the job kind (from the plugin's ``lightd_configure``)."""
    agent.stash[JOBS].register_kind(KIND, permission="files")


def add_routes(
    bp: Blueprint,
    agent: Agent,
    folder_of: Callable[[str], Awaitable[Path]],
    settings: Callable[[], PullSettings],
) -> None:
    """Add ``POST /volumes/<id>/files/pull`` to the file manager's blueprint."""

    @bp.post("/volumes/<volume_id>/files/pull")
    @describe(
        "Pull a URL into the volume",
        description="Starts a job (`GET /jobs/:id`) that downloads `url` into folder `path` "
        "as `name` (default: the URL path's last segment), replacing a file of that name "
        "atomically when complete. `http`/`https` only (400 `Invalid URL`). Every "
        "connection, the first and each redirect (at most 5), goes only to public "
        "addresses or those in `files.pull_allowed_cidrs`: a URL naming a blocked IP is "
        "400 `Destination not allowed` at once, a name resolving to one fails the job "
        "with that message. At most `files.max_pull_bytes`; at most 3 pulls per volume "
        "at once (429 `Too many pulls in progress`). 409 when a folder is at the target. "
        "403 `Pulls are disabled on this node` with `files.pulls_enabled: false`.",
        body=PullBody,
        responses={202: JobStarted},
        errors=(409, 429),
        # A documentation address (RFC 5737): the API fuzz test runs the examples, and
        # this one is refused before any traffic (400 Destination not allowed).
        examples={
            "body": {"url": "https://203.0.113.7/server.jar", "path": ".", "name": "server.jar"}
        },
        tags=("files",),
    )
    @requires("files")
    async def pull(volume_id: str) -> tuple[JobStarted, int]:
        folder = await folder_of(volume_id)
        body = await read_json(PullBody)
        config = settings()
        allowed = tuple(parse_networks(config.pull_allowed_cidrs))
        try:
            url = _url(body.url)
        except ValueError:
            raise BadRequest("Invalid URL", code="invalid_url") from None
        if _literal_blocked(url, allowed):
            raise BadRequest(DESTINATION_NOT_ALLOWED, code="destination_not_allowed")
        dest = parse(body.path).child(file_name(url, body.name))
        await trio.to_thread.run_sync(_check_target, folder, dest)
        if not config.pulls_enabled:  # after the checks: a bad request is still told so
            raise Forbidden("Pulls are disabled on this node", code="pulls_disabled")
        owner = agent.config.section_or_default(ContainersSettings).owner
        job = _Pull(url, folder, dest, allowed, config.max_pull_bytes, owner, agent.stash.get(DISK))
        key = volume_id.lower()
        try:
            view = await agent.stash[JOBS].submit(
                KIND,
                job.run,
                volume_id=key,
                unit="bytes",
                limit_key=f"{KIND}:{key}",
                limit=MAX_PER_VOLUME,
            )
        except JobLimitReached:
            raise TooManyRequests("Too many pulls in progress", code="too_many_pulls") from None
        return {"message": "Pull started", "job_id": view.id}, 202
