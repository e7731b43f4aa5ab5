"""Built-in plugin ``transfer``: move a server to another node (contract §20).

**Source.** ``POST /containers/:id/transfer {"target_url","target_token","ports"?,
"size_limit"?}`` (container offline, else 409) starts a job (kind ``container.transfer``,
progress in bytes sent) that offers the container to the target, then streams its volume
as a ``tar.zst`` made on the fly (``stream.produce``: ``lightd.files.tar_pieces`` →
zstd, the sha256 computed on the way) in chunk requests of ``transfer.chunk_bytes``, each
with its offset. A cut connection (the target restarting its listener, a network blip)
is retried for ``transfer.retry_for`` seconds: the source asks the target how much it
holds and resumes from there, after checking that the bytes it would skip hash as the
target's do. The source agent itself stopping is a cut too: the transfer is kept
(``transfer_outgoing``), and the agent's next start resumes it as a new job. When the
target has committed, the source marks the container ``"transferred": true`` (its record
and volume stay, offline, until the panel deletes it: a start is ``409 Container was
transferred``, hook ``lightd_container_starting``); a failed transfer leaves the source
as it was. While a transfer runs, a start is ``409 Container is being transferred``.

**Target.** ``POST /transfers`` (master token, or a temporary token minted with the
``transfer`` permission: a single-use one makes a one-shot transfer link, because this
first request exchanges it for a session secret that authenticates the rest) checks the
offer as a create of this node would (record, mounts, ports from its pool, the volume's
``size_limit`` against the data announced, free disk) and opens a session with a job
(kind ``transfer.receive``) that extracts what arrives into a private staging folder
beside the volumes. ``PUT /transfers/:tid/data?offset=`` appends a chunk,
``GET /transfers/:tid`` tells the offset received (and its sha256), ``POST
/transfers/:tid/commit {"size","sha256"}`` ends the stream: only a complete archive whose
sha256 matches becomes the volume (one rename) and the container (same ``internal_id``,
``ready``, the ports reserved, no install run); until then nothing of it is visible, and
any failure removes the staging folder. ``DELETE /transfers/:tid`` (or cancelling either
job) cancels: both sides clean up.

Both sides send ``{"event":"transfer","server","status":"done|failed"}`` through the
outbox (``lightd_panel_update``); the jobs' progress and ends are node events.

Hooks: ``lightd_add_config_sections`` (``transfer``), ``lightd_add_migrations`` (namespace
``transfer``), ``lightd_configure``, ``lightd_add_services`` (``transfer-recover``),
``lightd_startup`` (resumes outgoing transfers), ``lightd_add_routes``,
``lightd_container_starting``, ``lightd_container_deleted``, ``lightd_job_done``.

Config section ``transfer``: ``allowed_cidrs`` ([]: targets on private or loopback
addresses are refused unless listed, as pulls), ``chunk_bytes`` (64 MiB), ``level`` (3)
and ``threads`` (0: every core) of zstd, ``max_rate`` (bytes/s sent, 0 = no limit),
``retry_for`` (300 s), ``idle_timeout`` (600 s: a target session that hears nothing that
long fails), ``max_total_bytes`` (1 TiB) and ``max_entries`` (10 000 000) one transfer may
expand to on the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator, Awaitable
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

import attrs
import httpcore
import trio
from lightd import (
    CONTAINER_SERVICE,
    DESTINATION_NOT_ALLOWED,
    DISK,
    JOBS,
    VOLUMES,
    Agent,
    AgentError,
    ApiError,
    BadRequest,
    Conflict,
    ContainerService,
    ContainersSettings,
    DestinationNotAllowed,
    GuardedBackend,
    JobContext,
    JobFailed,
    JobStarted,
    JobView,
    Migration,
    NotFound,
    Service,
    StashKey,
    Store,
    Unauthorized,
    address_permitted,
    field_check,
    hookimpl,
    literal_address,
    parse_networks,
    valid_cidrs,
)
from lightd.api import body_batches, describe, public, read_json, requires, streams_body
from lightd.files import BadArchive, FileError
from quart import Blueprint, request

from .stream import produce, remove_staging, stage, sweep_staging

__all__ = ["TRANSFERS", "TransferConfig", "Transfers"]

log = logging.getLogger(__name__)

SEND_KIND = "container.transfer"
RECEIVE_KIND = "transfer.receive"
VENDOR = b"application/vnd.pkglatv1+json"
TRANSFERRED = "Container was transferred"
TRANSFERRING = "Container is being transferred"
INTERRUPTED = "Interrupted by restart"
REPORT_INTERVAL = 0.25
#: Seconds an ended session is kept (a repeated commit or status is still answered).
KEEP_ENDED = 3600.0
REQUEST_TIMEOUT = 60.0
MAX_URL = 2048
_TID = re.compile(r"[0-9a-f]{24}", re.ASCII)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
#: Pieces (about 1 MiB) waiting between the archiving thread and the sender.
SEND_PIECES = 8
#: Batches (about 1 MiB) waiting between a chunk request and the extracting thread.
RECEIVE_PIECES = 8


@attrs.frozen
class TransferConfig:
    #: Networks a target may be on besides public addresses (``"10.0.0.0/8"``).
    allowed_cidrs: tuple[str, ...] = attrs.field(
        default=(), validator=field_check(valid_cidrs, "must be a list of CIDRs")
    )
    #: Bytes of one chunk request.
    chunk_bytes: int = attrs.field(
        default=64 << 20, validator=field_check(lambda v: v >= 1 << 16, "must be >= 65536")
    )
    level: int = attrs.field(
        default=3, validator=field_check(lambda v: 1 <= v <= 19, "must be 1 to 19")
    )
    threads: int = attrs.field(
        default=0, validator=field_check(lambda v: 0 <= v <= 64, "must be 0 to 64")
    )
    #: Bytes per second sent at most (0: no limit).
    max_rate: int = attrs.field(default=0, validator=field_check(lambda v: v >= 0, "must be >= 0"))
    #: Seconds the source keeps trying to reach the target after a cut.
    retry_for: float = attrs.field(
        default=300.0, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    #: Seconds a target session may hear nothing before it fails.
    idle_timeout: float = attrs.field(
        default=600.0, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    max_total_bytes: int = attrs.field(
        default=1 << 40, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    max_entries: int = attrs.field(
        default=10_000_000, validator=field_check(lambda v: v > 0, "must be > 0")
    )


# --- wire types ---------------------------------------------------------------------------


@attrs.frozen
class PortEntry:
    ip: str
    port: int
    protocol: str = "tcp"
    container_port: int | None = None


def _url_ok(value: str) -> bool:
    if len(value) > MAX_URL:
        return False
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a bad port
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.username


@attrs.frozen
class TransferBody:
    target_url: str = attrs.field(validator=field_check(_url_ok, "must be an http(s) URL"))
    target_token: str = attrs.field(
        validator=field_check(lambda v: 0 < len(v) <= 512, "must not be empty")
    )
    ports: tuple[PortEntry, ...] | None = None
    #: [ext] The volume's size limit on the target (bytes, 0 = none); default: the source's.
    size_limit: int | None = attrs.field(
        default=None,
        validator=field_check(lambda v: v is None or 0 <= v < 2**63, "must be >= 0"),
    )


class TransferRequest(TypedDict, total=False):
    #: The target agent's base URL (``https://node2.example:8070``).
    target_url: str
    #: A token of the target: its master token, or a temporary one with ``transfer``.
    target_token: str
    #: Entries of the target's pool (``{"ip","port","protocol"?,"container_port"?}``), in
    #: the order of the container's ports; default: the same addresses as here.
    ports: list[dict[str, Any]]
    #: [ext] The volume's ``size_limit`` on the target (bytes, 0 = none); default: its own.
    size_limit: int


@attrs.frozen
class VolumeOffer:
    volume_id: str
    #: Bytes of the volume's files (as the source measured them).
    bytes: int = attrs.field(validator=field_check(lambda v: v >= 0, "must be >= 0"))
    size_limit: int = attrs.field(
        default=0, validator=field_check(lambda v: 0 <= v < 2**63, "must be >= 0")
    )


@attrs.frozen
class Offer:
    record: dict[str, Any]
    volume: VolumeOffer
    ports: tuple[PortEntry, ...] = ()
    #: The source node's id (logs).
    source: str = ""


class OfferRequest(TypedDict, total=False):
    #: The container's record, as the source exports it.
    record: dict[str, Any]
    volume: dict[str, Any]
    ports: list[dict[str, Any]]
    source: str


class OfferAnswer(TypedDict):
    transfer_id: str
    #: The session's secret: ``Authorization: Bearer <secret>`` on the session's routes.
    secret: str
    received: int
    job_id: str


SessionState = Literal["receiving", "committing", "done", "failed", "cancelled"]


class SessionView(TypedDict):
    transfer_id: str
    internal_id: str
    volume_id: str
    state: SessionState
    #: Bytes of the archive received so far.
    received: int
    #: sha256 (hex) of those bytes.
    sha256: str
    job_id: str
    error: str | None


class ChunkAnswer(TypedDict):
    received: int


@attrs.frozen
class CommitBody:
    size: int = attrs.field(validator=field_check(lambda v: v >= 0, "must be >= 0"))
    sha256: str = attrs.field(
        validator=field_check(lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None, "hex")
    )


class CommitRequest(TypedDict):
    #: Bytes of the whole archive.
    size: int
    #: Its sha256 (hex).
    sha256: str


class CommitAnswer(TypedDict):
    message: str
    internal_id: str
    volume_id: str


class TransferMessage(TypedDict):
    message: str


class ChunkQuery(TypedDict):
    #: Where this chunk starts in the archive: the bytes received so far.
    offset: int


MIGRATIONS = (
    Migration(
        "transfer",
        1,
        """
        CREATE TABLE transfer_outgoing (internal_id TEXT PRIMARY KEY, data TEXT NOT NULL);
        CREATE TABLE transfer_incoming (transfer_id TEXT PRIMARY KEY, data TEXT NOT NULL)
        """,
    ),
)


# --- the source ---------------------------------------------------------------------------


@attrs.define
class Outgoing:
    internal_id: str
    volume_id: str
    target_url: str
    ports: list[dict[str, Any]] | None
    size_limit: int | None
    state: Literal["sending", "done"] = "sending"
    transfer_id: str | None = None
    secret: str | None = None
    job_id: str | None = None


class _Retry(Exception):
    """The connection to the target was cut, or it answered out of step: ask it again."""


class _Committed(Exception):
    """The target holds the transfer committed already (the source restarted meanwhile)."""


@attrs.define(eq=False)
class Incoming:
    transfer_id: str
    secret_hash: str
    internal_id: str
    volume_id: str
    size_limit: int
    record: dict[str, Any]
    ports: list[dict[str, Any]]
    state: SessionState = "receiving"
    error: str | None = None
    received: int = 0
    sha: Any = attrs.Factory(hashlib.sha256)
    job_id: str = ""
    expected: tuple[int, str] | None = None
    send: trio.MemorySendChannel[bytes] | None = None
    receive: trio.MemoryReceiveChannel[bytes] | None = None
    heard: float = 0.0
    lock: trio.Lock = attrs.Factory(trio.Lock)
    writer: trio.CancelScope | None = None
    #: When it ended (trio clock): kept a while, so that a repeated commit is answered.
    ended: float | None = None

    @property
    def staging(self) -> str:
        return f".lightd-transfer-{self.transfer_id}"

    def view(self) -> SessionView:
        return {
            "transfer_id": self.transfer_id,
            "internal_id": self.internal_id,
            "volume_id": self.volume_id,
            "state": self.state,
            "received": self.received,
            "sha256": self.sha.hexdigest(),
            "job_id": self.job_id,
            "error": self.error,
        }


def _reason(exc: BaseException) -> str:
    if _only_cancelled(exc):
        return "Cancelled"
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, AgentError | FileError):
        return str(exc)
    return "Internal error"


def _single(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


class Transfers:
    """The plugin's state: outgoing transfers (source) and incoming sessions (target)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store: Store = agent.store
        self.config: TransferConfig = agent.config.section(TransferConfig)
        self.limiter = trio.CapacityLimiter(2)
        #: internal_id → the outgoing transfer (sending, or done: the container moved).
        self.outgoing: dict[str, Outgoing] = {}
        #: Tokens of offers not made yet (never stored): internal_id → target token.
        self._tokens: dict[str, str] = {}
        self.incoming: dict[str, Incoming] = {}
        #: Offers being checked: (internal_id, volume_id).
        self._opening: list[tuple[str, str]] = []
        self.volumes_root = agent.paths.volumes

    @property
    def containers(self) -> ContainerService:
        return self.agent.stash[CONTAINER_SERVICE]

    # --- store ---------------------------------------------------------------------------

    async def _save_out(self, out: Outgoing) -> None:
        data = json.dumps(attrs.asdict(out))
        await self.store.execute(
            "INSERT OR REPLACE INTO transfer_outgoing VALUES (?, ?)", (out.internal_id, data)
        )

    async def _drop_out(self, internal_id: str) -> None:
        self.outgoing.pop(internal_id, None)
        await self.store.execute(
            "DELETE FROM transfer_outgoing WHERE internal_id = ?", (internal_id,)
        )

    async def _save_in(self, inc: Incoming) -> None:
        data = json.dumps(
            {"internal_id": inc.internal_id, "volume_id": inc.volume_id, "state": inc.state}
        )
        await self.store.execute(
            "INSERT OR REPLACE INTO transfer_incoming VALUES (?, ?)", (inc.transfer_id, data)
        )

    async def _drop_in(self, transfer_id: str) -> None:
        await self.store.execute(
            "DELETE FROM transfer_incoming WHERE transfer_id = ?", (transfer_id,)
        )

    # --- announcements -------------------------------------------------------------------

    async def announce(self, internal_id: str, status: str) -> None:
        update = {"event": "transfer", "server": internal_id, "status": status}
        try:
            await self.agent.hooks.panel_update(self.agent, internal_id, update)
        except Exception:
            log.exception("could not queue the transfer update for the panel")

    # --- source --------------------------------------------------------------------------

    def check_start(self, internal_id: str) -> None:
        out = self.outgoing.get(internal_id)
        if out is not None:
            if out.state == "done":
                raise Conflict(TRANSFERRED, code="container_transferred")
            raise Conflict(TRANSFERRING, code="container_transferring")

    async def start(self, internal_id: str, body: TransferBody) -> str:
        exported = self.containers.export_record(internal_id)  # 404 for an unknown one
        if exported.get("transferred"):
            raise Conflict(TRANSFERRED, code="container_transferred")
        if internal_id in self.outgoing:
            raise Conflict(TRANSFERRING, code="container_transferring")
        volume_id = str(exported["volume_id"])
        if self.agent.hooks.volume_running(self.agent, volume_id) is not None:
            raise Conflict("Container is running", code="container_running")
        host = urlsplit(body.target_url).hostname or ""
        literal = literal_address(host)
        if literal is not None and not address_permitted(
            literal, parse_networks(self.config.allowed_cidrs)
        ):
            raise BadRequest(DESTINATION_NOT_ALLOWED, code="destination_not_allowed")
        ports = None if body.ports is None else [attrs.asdict(p) for p in body.ports]
        out = Outgoing(
            internal_id=internal_id,
            volume_id=volume_id,
            target_url=body.target_url.rstrip("/"),
            ports=ports,
            size_limit=body.size_limit,
        )
        # Taken before the first await: a start, a second transfer wait for the outcome.
        self.outgoing[internal_id] = out
        self._tokens[internal_id] = body.target_token
        try:
            await self._save_out(out)
            view = await self._submit_send(out)
        except BaseException:
            self.outgoing.pop(internal_id, None)
            self._tokens.pop(internal_id, None)
            with trio.CancelScope(shield=True):
                await self._drop_out(internal_id)
            raise
        return view

    async def _submit_send(self, out: Outgoing) -> str:
        async def run(job: JobContext) -> None:
            try:
                await self._send(job, out)
            except Exception as exc:
                with trio.CancelScope(shield=True):
                    await self._abandon(out, _reason(exc))
                raise

        view = await self.agent.stash[JOBS].submit(
            SEND_KIND, run, internal_id=out.internal_id, volume_id=out.volume_id, unit="bytes"
        )
        out.job_id = view.id
        return view.id

    async def _abandon(self, out: Outgoing, reason: str) -> None:
        """The transfer failed or was cancelled: the target drops what it has, the
        source stays as it was."""
        log.warning("transfer of %s failed: %s", out.internal_id, reason)
        self._tokens.pop(out.internal_id, None)
        if out.transfer_id is not None and out.secret is not None:
            try:
                with trio.move_on_after(15):
                    async with self._pool() as pool:
                        await self._call(
                            pool, "DELETE", out, f"/transfers/{out.transfer_id}", out.secret
                        )
            except Exception as exc:  # the target ends it itself (idle timeout)
                log.info("could not cancel the transfer on the target: %s", exc)
        if self.outgoing.get(out.internal_id) is out:
            await self._drop_out(out.internal_id)
        await self.announce(out.internal_id, "failed")

    def _pool(self) -> httpcore.AsyncConnectionPool:
        return httpcore.AsyncConnectionPool(
            max_connections=2,
            retries=0,
            network_backend=GuardedBackend(parse_networks(self.config.allowed_cidrs)),
        )

    async def _call(
        self,
        pool: httpcore.AsyncConnectionPool,
        method: str,
        out: Outgoing,
        path: str,
        token: str,
        body: Any = None,
    ) -> tuple[int, Any]:
        """One JSON request to the target: ``(status, answer)``; ``_Retry`` when the
        connection failed, ``JobFailed`` when the target may not be reached."""
        headers = [(b"Accept", VENDOR), (b"Authorization", f"Bearer {token}".encode())]
        content = b""
        if body is not None:
            content = json.dumps(body).encode()
            headers.append((b"Content-Type", b"application/json"))
        timeouts = {"connect": 15.0, "read": REQUEST_TIMEOUT, "write": REQUEST_TIMEOUT, "pool": 15}
        try:
            response = await pool.request(
                method,
                out.target_url + path,
                headers=headers,
                content=content,
                extensions={"timeout": timeouts},
            )
        except DestinationNotAllowed:
            raise JobFailed(DESTINATION_NOT_ALLOWED) from None
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise _Retry(str(exc) or type(exc).__name__) from None
        try:
            answer = json.loads(response.content or b"{}")
        except ValueError:
            answer = {}
        return response.status, answer

    @staticmethod
    def _refused(status: int, answer: Any) -> JobFailed:
        message = answer.get("error") if isinstance(answer, dict) else None
        return JobFailed(f"Target refused the transfer: {message or f'HTTP {status}'}")

    async def _offer(self, pool: httpcore.AsyncConnectionPool, out: Outgoing) -> None:
        token = self._tokens.get(out.internal_id)
        if token is None:
            raise JobFailed(INTERRUPTED)  # the agent restarted before the offer was made
        exported = self.containers.export_record(out.internal_id)
        disk = self.agent.stash.get(DISK)
        usage = await disk.usage(out.volume_id) if disk is not None else None
        limit = usage.size_limit if usage is not None else 0
        if out.size_limit is not None:
            limit = out.size_limit
        ports = out.ports
        if ports is None:  # the same entries as here
            ports = [
                {"ip": p["ip"], "port": p["port"], "protocol": p["protocol"]}
                for p in exported.get("ports") or []
            ]
        mapped = []
        for i, entry in enumerate(ports):
            source_ports = exported.get("ports") or []
            item = dict(entry)
            if item.get("container_port") is None:
                item["container_port"] = (
                    source_ports[i]["container_port"] if i < len(source_ports) else item["port"]
                )
            mapped.append(item)
        offer = {
            "record": exported,
            "volume": {
                "volume_id": out.volume_id,
                "bytes": usage.bytes if usage is not None else 0,
                "size_limit": limit,
            },
            "ports": mapped,
            "source": getattr(self.agent, "node_id", "") or "",
        }
        status, answer = await self._call(pool, "POST", out, "/transfers", token, offer)
        if status != 200:
            raise self._refused(status, answer)
        out.transfer_id, out.secret = str(answer["transfer_id"]), str(answer["secret"])
        self._tokens.pop(out.internal_id, None)  # spent (a single-use one is gone now)
        await self._save_out(out)

    async def _send(self, job: JobContext, out: Outgoing) -> None:
        folder = await self._folder(out.volume_id)
        patience = self.config.retry_for
        failing_since: float | None = None
        result: tuple[int, str] | None = None
        async with self._pool() as pool:
            while True:
                try:
                    if out.transfer_id is None:
                        await self._offer(pool, out)
                    if result is None:
                        result = await self._stream(job, pool, out, folder)
                    await self._commit(pool, out, result)
                    break
                except _Committed:
                    break
                except _Retry as exc:
                    now = trio.current_time()
                    failing_since = failing_since if failing_since is not None else now
                    if now - failing_since > patience:
                        raise JobFailed(f"Target unreachable: {exc}") from None
                    log.info("transfer of %s: connection cut (%s), resuming", out.internal_id, exc)
                    await trio.sleep(min(5.0, 0.2 + (now - failing_since) / 4))
        await self.containers.mark_transferred(out.internal_id)
        out.state = "done"
        await self._save_out(out)
        self._tokens.pop(out.internal_id, None)
        job.result = {"internal_id": out.internal_id, "target_url": out.target_url}
        log.info("transfer of %s done", out.internal_id)
        await self.announce(out.internal_id, "done")

    async def _folder(self, volume_id: str) -> Path:
        volumes = self.agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    async def _status(self, pool: httpcore.AsyncConnectionPool, out: Outgoing) -> dict[str, Any]:
        assert out.secret is not None
        status, answer = await self._call(
            pool, "GET", out, f"/transfers/{out.transfer_id}", out.secret
        )
        if status != 200 or not isinstance(answer, dict):
            raise self._refused(status, answer)
        return answer

    async def _stream(
        self, job: JobContext, pool: httpcore.AsyncConnectionPool, out: Outgoing, folder: Path
    ) -> tuple[int, str]:
        """Send the archive from the offset the target holds; ``(size, sha256)``."""
        session = await self._status(pool, out)
        while session.get("state") == "committing":  # a commit of an earlier run ends
            await trio.sleep(0.5)
            session = await self._status(pool, out)
        if session.get("state") == "done":  # committed before this source learnt of it
            raise _Committed()
        if session.get("state") != "receiving":
            raise JobFailed(f"Target ended the transfer: {session.get('error') or 'cancelled'}")
        received = int(session["received"])
        sent = received
        job.progress(sent)
        send, receive = trio.open_memory_channel[tuple[str, Any]](SEND_PIECES)
        result: tuple[int, str] | None = None

        def emit(item: tuple[str, Any]) -> None:
            trio.from_thread.run(send.send, item)

        async def producer() -> None:
            async with send:
                made = await trio.to_thread.run_sync(
                    partial(
                        produce,
                        folder,
                        emit,
                        skip=received,
                        level=self.config.level,
                        threads=-1 if self.config.threads == 0 else self.config.threads,
                        checkpoint=trio.from_thread.check_cancelled,
                        progress=lambda n: None,
                    ),
                    limiter=self.limiter,
                )
                await send.send(("end", made))

        rate = self.config.max_rate
        began = trio.current_time()

        async def chunk() -> AsyncIterator[bytes]:
            nonlocal sent, result
            size = 0
            while size < self.config.chunk_bytes:
                kind, value = await receive.receive()
                if kind == "end":
                    result = value
                    return
                yield value
                size += len(value)
                sent += len(value)
                job.progress(sent)
                if rate:
                    ahead = (sent - received) / rate - (trio.current_time() - began)
                    if ahead > 0:
                        await trio.sleep(ahead)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(producer)
                if received:
                    kind, prefix = await receive.receive()
                    if kind == "end" or prefix != session.get("sha256"):
                        raise JobFailed("The volume changed during the transfer")
                while result is None:
                    offset = sent
                    status, answer = await self._chunk(pool, out, offset, chunk())
                    if status == 409:  # out of step, or ended there: its state says which
                        raise _Retry(str(answer.get("error", "out of step with the target")))
                    if status != 200:
                        raise self._refused(status, answer)
                    if int(answer.get("received", -1)) != sent:
                        raise _Retry("the target holds less than was sent")
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = _single(group)
            if isinstance(leaf, _Retry | JobFailed):
                raise leaf from None  # the reason, not the nursery's wrapping of it
            raise
        assert result is not None
        return result

    async def _chunk(
        self,
        pool: httpcore.AsyncConnectionPool,
        out: Outgoing,
        offset: int,
        content: AsyncIterator[bytes],
    ) -> tuple[int, Any]:
        assert out.secret is not None
        headers = [
            (b"Accept", VENDOR),
            (b"Authorization", f"Bearer {out.secret}".encode()),
            (b"Content-Type", b"application/octet-stream"),
            (b"Transfer-Encoding", b"chunked"),
            # A chunk the target refuses early leaves its body half sent: never reuse that
            # connection (one connection per chunk of many MiB costs nothing).
            (b"Connection", b"close"),
        ]
        timeouts = {"connect": 15.0, "read": REQUEST_TIMEOUT, "write": REQUEST_TIMEOUT, "pool": 15}
        url = f"{out.target_url}/transfers/{out.transfer_id}/data?offset={offset}"
        try:
            response = await pool.request(
                "PUT", url, headers=headers, content=content, extensions={"timeout": timeouts}
            )
        except DestinationNotAllowed:
            raise JobFailed(DESTINATION_NOT_ALLOWED) from None
        except (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError) as exc:
            raise _Retry(str(exc) or type(exc).__name__) from None
        try:
            answer = json.loads(response.content or b"{}")
        except ValueError:
            answer = {}
        return response.status, answer

    async def _commit(
        self, pool: httpcore.AsyncConnectionPool, out: Outgoing, result: tuple[int, str]
    ) -> None:
        assert out.secret is not None
        size, sha = result
        path = f"/transfers/{out.transfer_id}/commit"
        status, answer = await self._call(
            pool, "POST", out, path, out.secret, {"size": size, "sha256": sha}
        )
        if status != 200:
            raise self._refused(status, answer)

    async def cancelled(self, view: JobView) -> None:
        """A send job ended ``cancelled`` (``DELETE /jobs/:id``): clean both sides."""
        internal_id = view.internal_id or ""
        out = self.outgoing.get(internal_id)
        if out is not None and out.job_id == view.id and out.state == "sending":
            await self._abandon(out, "Cancelled")

    async def resume_all(self) -> None:
        """At start: transfers the last run left sending go on, each as a new job."""
        for out in list(self.outgoing.values()):
            if out.state != "sending":
                continue
            if out.transfer_id is None:
                await self._abandon(out, INTERRUPTED)
                continue
            try:
                await self._submit_send(out)
                log.info("transfer of %s resumes", out.internal_id)
            except Exception:
                log.exception("could not resume the transfer of %s", out.internal_id)

    async def forget(self, internal_id: str) -> None:
        if internal_id in self.outgoing and self.outgoing[internal_id].state == "done":
            await self._drop_out(internal_id)

    # --- target --------------------------------------------------------------------------

    async def open_session(self, offer: Offer) -> tuple[Incoming, str]:
        record = offer.record
        internal_id = record.get("internal_id")
        volume_id = offer.volume.volume_id.lower()
        if not isinstance(internal_id, str):
            raise BadRequest("record.internal_id: required", code="invalid_field")
        if not _UUID.fullmatch(volume_id) or str(record.get("volume_id", "")).lower() != volume_id:
            raise BadRequest("volume.volume_id: Invalid volume_id", code="invalid_field")
        busy = [(s.internal_id, s.volume_id) for s in self.incoming.values() if not s.ended]
        busy += self._opening
        if any(internal_id == i for i, _ in busy):
            raise Conflict("Container already exists", code="container_exists")
        if any(volume_id == v for _, v in busy):
            raise Conflict("Volume already exists", code="volume_exists")
        claim = (internal_id, volume_id)
        self._opening.append(claim)  # before the first await: one offer of an id at a time
        try:
            return await self._open(offer, internal_id, volume_id)
        finally:
            self._opening.remove(claim)

    async def _open(self, offer: Offer, internal_id: str, volume_id: str) -> tuple[Incoming, str]:
        record = offer.record
        volumes = self.agent.stash.get(VOLUMES)
        if volumes is None or await volumes.path(volume_id) is not None:
            raise Conflict("Volume already exists", code="volume_exists")
        ports = [attrs.asdict(p) for p in offer.ports]
        await self.containers.check_import(record, ports)
        limit = offer.volume.size_limit
        if limit and offer.volume.bytes > limit:
            raise Conflict("Disk quota exceeded", code="quota_exceeded")
        free = await trio.to_thread.run_sync(_free_bytes, self.volumes_root)
        if offer.volume.bytes > free:
            raise Conflict("Not enough disk space", code="no_space")
        horizon = trio.current_time() - KEEP_ENDED
        for old in [s for s in self.incoming.values() if s.ended and s.ended < horizon]:
            del self.incoming[old.transfer_id]
        secret = "lightd_transfer_" + secrets.token_hex(24)
        inc = Incoming(
            transfer_id=secrets.token_hex(12),
            secret_hash=hashlib.sha256(secret.encode()).hexdigest(),
            internal_id=internal_id,
            volume_id=volume_id,
            size_limit=limit,
            record=record,
            ports=ports,
        )
        inc.send, inc.receive = trio.open_memory_channel[bytes](RECEIVE_PIECES)
        inc.heard = trio.current_time()
        self.incoming[inc.transfer_id] = inc
        try:
            await self._save_in(inc)
            view = await self.agent.stash[JOBS].submit(
                RECEIVE_KIND, partial(self._receive, inc), internal_id=internal_id, unit="bytes"
            )
        except BaseException:
            self.incoming.pop(inc.transfer_id, None)
            raise
        inc.job_id = view.id
        log.info(
            "transfer %s: receiving %s (volume %s) from %s",
            inc.transfer_id,
            internal_id,
            volume_id,
            offer.source or "a node",
        )
        return inc, secret

    def session(self, transfer_id: str) -> Incoming:
        """The session named in the URL, for the request's ``Authorization`` (its secret,
        or the master token); 401 otherwise, 404 for none."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        inc = self.incoming.get(transfer_id) if _TID.fullmatch(transfer_id) else None
        master = self.agent.config.authorization
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Missing or invalid authorization token")
        if not master.enabled or hmac.compare_digest(token.encode(), master.token.encode()):
            ok = True
        else:
            digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()
            ok = inc is not None and hmac.compare_digest(digest, inc.secret_hash)
        if not ok:
            raise Unauthorized("Missing or invalid authorization token")
        if inc is None:
            raise NotFound("Transfer not found", code="transfer_not_found")
        return inc

    async def _next_piece(self, inc: Incoming) -> bytes:
        assert inc.receive is not None
        while True:
            with trio.move_on_at(inc.heard + self.config.idle_timeout):
                try:
                    return await inc.receive.receive()
                except trio.EndOfChannel:
                    return b""
            if trio.current_time() >= inc.heard + self.config.idle_timeout:
                raise JobFailed("Transfer timed out")

    async def _receive(self, inc: Incoming, job: JobContext) -> None:
        """The target's job: extract what arrives, then (on commit) verify and adopt."""
        parent = self.volumes_root
        owner = self.agent.config.section_or_default(ContainersSettings).owner
        max_total = inc.size_limit or self.config.max_total_bytes
        adopted = False
        try:

            def read(_n: int) -> bytes:
                return trio.from_thread.run(self._next_piece, inc)

            async def report() -> None:
                while True:
                    job.progress(inc.received)
                    await trio.sleep(REPORT_INTERVAL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(report)
                try:
                    await trio.to_thread.run_sync(
                        partial(
                            stage,
                            parent,
                            inc.staging,
                            read,
                            max_total=max_total,
                            max_entries=self.config.max_entries,
                            owner=owner,
                            checkpoint=trio.from_thread.check_cancelled,
                            tick=lambda n: None,
                        ),
                        limiter=self.limiter,
                    )
                except BadArchive as exc:
                    if "too large" in str(exc) and inc.size_limit:
                        raise Conflict("Disk quota exceeded", code="quota_exceeded") from None
                    raise
                nursery.cancel_scope.cancel()
            job.progress(inc.received, inc.received)
            if inc.expected is None or inc.expected != (inc.received, inc.sha.hexdigest()):
                raise JobFailed("Transfer verification failed: checksum mismatch")
            volumes = self.agent.stash[VOLUMES]
            with trio.CancelScope(shield=True):  # quick, and undone as a whole on failure
                await volumes.adopt(inc.volume_id, parent / inc.staging)
                adopted = True
                disk = self.agent.stash.get(DISK)
                if disk is not None:
                    if inc.size_limit:
                        await disk.set_limit(inc.volume_id, inc.size_limit)
                    await disk.refresh(inc.volume_id)
                await self.containers.import_record(inc.record, inc.ports)
            inc.state = "done"
            await self._save_in(inc)
            job.result = {"internal_id": inc.internal_id, "volume_id": inc.volume_id}
            log.info("transfer %s: %s is here", inc.transfer_id, inc.internal_id)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                cancelled = _only_cancelled(exc)
                inc.state = "cancelled" if cancelled else "failed"
                inc.error = _reason(exc)
                if adopted:
                    await self._unadopt(inc)
                await trio.to_thread.run_sync(remove_staging, parent, inc.staging)
                await self._drop_in(inc.transfer_id)
            raise
        finally:
            inc.ended = trio.current_time()
            if inc.receive is not None:  # a chunk still arriving is refused now
                inc.receive.close()
            if inc.writer is not None:
                inc.writer.cancel()
            with trio.CancelScope(shield=True):
                await self.announce(inc.internal_id, "done" if inc.state == "done" else "failed")

    async def _unadopt(self, inc: Incoming) -> None:
        """Commit failed after the volume was adopted (the record refused): remove it."""
        try:
            registry: Any = self.agent.stash[VOLUMES]
            await registry.delete(inc.volume_id)
        except Exception:
            log.exception("transfer %s: could not remove the adopted volume", inc.transfer_id)

    async def write_chunk(self, inc: Incoming, offset: int) -> int:
        """Append the request's body at ``offset`` (the bytes received so far)."""
        if inc.writer is not None:  # a cut connection the server has not noticed yet
            inc.writer.cancel()
        async with inc.lock:
            if inc.state != "receiving":
                raise Conflict(f"Transfer is {inc.state}", code="transfer_not_receiving")
            if offset != inc.received:
                raise OffsetMismatch(inc.received)
            assert inc.send is not None
            with trio.CancelScope() as scope:
                inc.writer = scope
                try:
                    async for batch in body_batches():
                        # One piece of about 1 MiB per batch: one hop to the extracting
                        # thread for it, not one per network read.
                        data = batch[0] if len(batch) == 1 else b"".join(batch)
                        await inc.send.send(bytes(data))  # all or nothing, even if cancelled
                        inc.sha.update(data)
                        inc.received += len(data)
                        inc.heard = trio.current_time()
                except trio.BrokenResourceError:
                    pass  # the session ended meanwhile: said below
                finally:
                    if inc.writer is scope:
                        inc.writer = None
            if inc.state != "receiving":
                raise Conflict(f"Transfer is {inc.state}", code="transfer_not_receiving")
        return inc.received

    async def commit(self, inc: Incoming, body: CommitBody) -> Incoming:
        async with inc.lock:
            if inc.state == "receiving":
                if body.size != inc.received:
                    raise OffsetMismatch(inc.received)
                inc.expected = (body.size, body.sha256)
                inc.state = "committing"
                assert inc.send is not None
                await inc.send.aclose()
        await self.agent.stash[JOBS].wait(inc.job_id)
        if inc.state != "done":
            raise Conflict(f"Transfer failed: {inc.error}", code="transfer_failed")
        return inc

    async def cancel_session(self, inc: Incoming) -> None:
        if inc.state in ("done",):
            raise Conflict("Transfer already finished", code="transfer_finished")
        with contextlib.suppress(NotFound, Conflict):  # ended meanwhile
            await self.agent.stash[JOBS].cancel(inc.job_id)

    # --- start ---------------------------------------------------------------------------

    async def serve_recover(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Load outgoing transfers; sessions a crash left on this (target) side failed:
        their staging folders go, the panel is told."""
        rows = await self.store.read(
            lambda conn: conn.execute("SELECT data FROM transfer_outgoing").fetchall()
        )
        for row in rows:
            out = Outgoing(**json.loads(row["data"]))
            self.outgoing[out.internal_id] = out
        rows = await self.store.read(
            lambda conn: conn.execute("SELECT transfer_id, data FROM transfer_incoming").fetchall()
        )
        await trio.to_thread.run_sync(sweep_staging, self.volumes_root)
        for row in rows:
            data = json.loads(row["data"])
            if data.get("state") != "done":
                await self.announce(str(data.get("internal_id")), "failed")
        await self.store.execute("DELETE FROM transfer_incoming")
        task_status.started()
        await trio.sleep_forever()


class OffsetMismatch(Conflict):
    """A chunk (or a commit) that does not start where the received bytes end."""

    code = "transfer_offset"

    def __init__(self, received: int) -> None:
        super().__init__(f"Transfer offset mismatch: {received} bytes received")
        self.received = received


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


TRANSFERS: StashKey[Transfers] = StashKey("transfers")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"transfer": TransferConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[TRANSFERS] = Transfers(agent)
    jobs = agent.stash[JOBS]
    jobs.register_kind(SEND_KIND, permission="manage")
    jobs.register_kind(RECEIVE_KIND, permission="transfer")


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("transfer-recover", agent.stash[TRANSFERS].serve_recover)]


@hookimpl
def lightd_startup(agent: Agent) -> Awaitable[None]:
    return agent.stash[TRANSFERS].resume_all()


@hookimpl
def lightd_container_starting(agent: Agent, internal_id: str, volume_id: str) -> None:
    """A container being transferred, or moved away, does not start here."""
    transfers = agent.stash.get(TRANSFERS)
    if transfers is not None:
        transfers.check_start(internal_id)


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[None] | None:
    transfers = agent.stash.get(TRANSFERS)
    return None if transfers is None else transfers.forget(internal_id)


@hookimpl
def lightd_job_done(agent: Agent, job: JobView) -> Awaitable[None] | None:
    if job.kind != SEND_KIND or job.state != "cancelled":
        return None
    return agent.stash[TRANSFERS].cancelled(job)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    transfers = agent.stash[TRANSFERS]
    bp = Blueprint("transfer", __name__)

    @bp.post("/containers/<internal_id>/transfer")
    @describe(
        "Move a server to another node",
        description="Starts a job (`container.transfer`, progress in bytes of the archive "
        "sent) that streams the volume (`tar.zst`, sha256-checked) and the container's record "
        "to the target agent (`POST {target_url}/transfers`), resuming after a cut. The "
        "container must be offline: 409 `Container is running`. On success it is kept here "
        'offline, `"transferred": true` (a start is 409 `Container was transferred`) until '
        "deleted; on failure it is as it was. 400 `Destination not allowed` for a target on "
        "a private address not in `transfer.allowed_cidrs`.",
        body=TransferRequest,
        responses={202: JobStarted},
        errors=(409,),
        examples={
            "body": {
                "target_url": "https://node2.example:8070",
                "target_token": "lightd_0123456789abcdef0123456789abcdef",
                "ports": [{"ip": "203.0.113.7", "port": 25565, "protocol": "tcp"}],
            }
        },
        tags=("transfers",),
    )
    @requires("manage")
    async def start_transfer(internal_id: str) -> tuple[JobStarted, int]:
        transfers.containers.export_record(internal_id)  # 404 first
        body = await read_json(TransferBody)
        job_id = await transfers.start(internal_id, body)
        return {"message": "Transfer started", "job_id": job_id}, 202

    @bp.post("/transfers")
    @describe(
        "Receive a server from another node (target side)",
        description="Called by the source agent. Checks the offer as a create of this node "
        "would (the record, its mounts, the ports against this pool, the volume's "
        "`size_limit` against its data: 409 `Disk quota exceeded`, free disk: 409 `Not enough "
        "disk space`) and opens a session (a job, `transfer.receive`). The answer's `secret` "
        "authenticates the session's other routes, so a single-use token works as a one-shot "
        "transfer link. Needs the master token or a temporary token with `transfer`.",
        body=OfferRequest,
        errors=(409,),
        tags=("transfers",),
    )
    @requires("transfer")
    async def open_transfer() -> OfferAnswer:
        offer = await read_json(Offer)
        inc, secret = await transfers.open_session(offer)
        return {
            "transfer_id": inc.transfer_id,
            "secret": secret,
            "received": inc.received,
            "job_id": inc.job_id,
        }

    @bp.get("/transfers/<transfer_id>")
    @describe(
        "A transfer session (target side)",
        description="`Authorization: Bearer <secret>` (or the master token). The bytes "
        "received and their sha256: where a resumed stream starts. 404 `Transfer not found`.",
        tags=("transfers",),
    )
    @public
    async def get_transfer(transfer_id: str) -> SessionView:
        return transfers.session(transfer_id).view()

    @bp.put("/transfers/<transfer_id>/data")
    @describe(
        "Append a chunk of the archive (target side)",
        description="The raw bytes of the archive from `offset`, which must be the bytes "
        "received so far (else 409 `Transfer offset mismatch: <n> bytes received`). A cut "
        "request keeps what arrived.",
        body={"application/octet-stream": bytes},
        query=ChunkQuery,
        errors=(409,),
        tags=("transfers",),
    )
    @public
    @streams_body
    async def put_chunk(transfer_id: str) -> ChunkAnswer:
        inc = transfers.session(transfer_id)
        try:
            offset = int(request.args.get("offset", ""))
        except ValueError:
            raise BadRequest("offset: must be a whole number", code="invalid_field") from None
        return {"received": await transfers.write_chunk(inc, offset)}

    @bp.post("/transfers/<transfer_id>/commit")
    @describe(
        "Finish a transfer (target side)",
        description="The archive is complete: `size` bytes with this `sha256`. Waits until "
        "it is extracted and checked, then the volume and the container appear (`ready`, "
        "the ports reserved). 409 `Transfer failed: <reason>` (nothing is left); repeating "
        "a commit that succeeded answers 200 again.",
        body=CommitRequest,
        errors=(409,),
        tags=("transfers",),
    )
    @public
    async def commit_transfer(transfer_id: str) -> CommitAnswer:
        inc = transfers.session(transfer_id)
        body = await read_json(CommitBody)
        await transfers.commit(inc, body)
        return {
            "message": "Transfer complete",
            "internal_id": inc.internal_id,
            "volume_id": inc.volume_id,
        }

    @bp.delete("/transfers/<transfer_id>")
    @describe(
        "Cancel a transfer (target side)",
        description="Drops everything received. 409 `Transfer already finished`.",
        errors=(409,),
        tags=("transfers",),
    )
    @public
    async def cancel_transfer(transfer_id: str) -> TransferMessage:
        inc = transfers.session(transfer_id)
        await transfers.cancel_session(inc)
        return {"message": "Transfer cancelled"}

    return [bp]
