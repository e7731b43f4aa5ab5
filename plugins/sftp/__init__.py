"""Built-in plugin ``sftp``: SFTP into a volume, as safe as the file API (contract §19).

An SSH server (asyncssh, on an asyncio loop in a thread of its own: ``server``) serves
SFTP v3 only (no shell, exec, forwarding or scp), rooted at one volume per login; every
operation goes through the safe file layer (``fs``). The ed25519 host key is made once and
kept at ``<storage.base_path>/sftp/host_ed25519_key`` (mode 0600).

Logins (password only):

* username ``<internal_id>`` (that container's volume) or ``vol.<volume_id>``, password
  the master token or a live temporary token with permission ``files`` whose scope holds
  the volume (``lightd.TokenService``; a single-use token is spent by the login). A
  session ends when its token is revoked (``TokenService.on_revoked``), when it expires,
  and, for the master token, when a config reload changes it;
* or the credentials of ``POST /containers/:id/sftp/credentials`` (that container's volume
  only). Only a scrypt hash (salted, n=2^14) of the password is stored; replacing or
  deleting the credentials, or deleting the container, ends their sessions.

Failed logins are throttled per address and logged without the password (``server``).
Writes are charged to the volume's size limit; ``sftp.read_only`` refuses every change.
A deleted volume's sessions end.

Hooks: ``lightd_add_config_sections`` (``sftp``), ``lightd_add_migrations`` (namespace
``sftp``: ``sftp_credentials``), ``lightd_configure``, ``lightd_add_services`` (``sftp``:
the credentials are loaded, then, when enabled, the server runs until the agent stops),
``lightd_add_routes``, ``lightd_config_reloaded``, ``lightd_container_deleted``,
``lightd_volume_deleted``.

Config section ``sftp``: ``enabled`` (false), ``host`` (``0.0.0.0``), ``port`` (2022),
``read_only`` (false); ``workers`` (4) threads for file work. ``enabled``, ``host`` and
``port`` take effect at the next start; ``read_only`` for sessions opened after a reload.

Routes: ``POST /containers/:id/sftp/credentials`` and ``DELETE …/credentials``
(permission ``manage``), ``GET /containers/:id/sftp/info`` (``read``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypedDict

import attrs
import trio
from lightd import (
    CONTAINER_SERVICE,
    DISK,
    TOKEN_SERVICE,
    VOLUMES,
    Agent,
    Config,
    Conflict,
    ContainersSettings,
    DiskBudget,
    FieldError,
    Migration,
    NotFound,
    Service,
    StashKey,
    disk_writing,
    field_check,
    hookimpl,
)
from lightd.api import Message, describe, read_json, requires
from quart import Blueprint, request

if TYPE_CHECKING:  # the SSH server (asyncssh, cryptography: 15 MB) loads only when enabled
    from .server import Grant, SshThread

__all__ = ["SFTP", "Credentials", "Sftp", "SftpConfig", "hash_password", "verify_password"]

log = logging.getLogger(__name__)

VOLUME_PATH = "/home/container"
NO_CREDENTIALS = "SFTP credentials not found for this container"
_PASSWORD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!@#$%^&*"
_USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", re.ASCII)
#: scrypt cost: ~50 ms and 16 MiB a check, on purpose.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def _valid_port(value: int) -> bool:
    return 0 <= value <= 65535


@attrs.frozen
class SftpConfig:
    enabled: bool = False
    #: Address to listen on (also the ``host`` answered when it is not a wildcard).
    host: str = "0.0.0.0"
    #: 0: any free port (tests).
    port: int = attrs.field(default=2022, validator=field_check(_valid_port, "must be 0 to 65535"))
    #: Refuse every change (writes, deletes, renames, links, attributes).
    read_only: bool = False
    #: Threads for the sessions' file work.
    workers: int = attrs.field(
        default=4, validator=field_check(lambda v: 1 <= v <= 64, "must be 1 to 64")
    )
    #: [ext] Seconds of silence from a client before it is asked whether it is still there;
    #: after ``KEEPALIVE_COUNT`` unanswered asks its session ends (a client gone without a
    #: word, behind a NAT that dropped it, holds nothing for long). 0: never asked.
    keepalive_interval: float = attrs.field(
        default=30.0, validator=field_check(lambda v: 0 <= v <= 3600, "must be 0 to 3600")
    )


def hash_password(password: str) -> str:
    """``scrypt$n$r$p$salt$hash`` (hex) of ``password``: slow on purpose (run it off the
    event loop)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=32,
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(stored: str, password: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode("utf-8", "surrogatepass"),
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(digest) // 2,
        )
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), digest)


#: A hash checked when the username has no credentials, so both take as long.
_DUMMY = f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${'00' * 16}${'00' * 32}"


def _rfc3339(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class Credentials:
    internal_id: str
    username: str
    password_hash: str
    created_at: int
    updated_at: int


def _check_username(_i: object, _a: object, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not _USERNAME.fullmatch(value)):
        raise FieldError("username", "must be 1-64 letters, digits or _ . @ -")


def _check_password(_i: object, _a: object, value: object) -> None:
    if value is not None and (
        not isinstance(value, str)
        or not 8 <= len(value) <= 256
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise FieldError("password", "must be 8 to 256 printable characters")


@attrs.frozen
class CredentialsBody:
    username: Any = attrs.field(default=None, validator=_check_username)
    password: Any = attrs.field(default=None, validator=_check_password)


class CredentialsRequest(TypedDict, total=False):
    #: Default: the container's ``internal_id``.
    username: str
    #: Default: 24 random characters.
    password: str


class CredentialsAnswer(TypedDict):
    username: str
    #: Shown this once; only a hash is kept.
    password: str
    host: str
    port: int
    volume_path: str


class CredentialsInfo(TypedDict):
    username: str
    host: str
    port: int
    volume_path: str
    #: RFC 3339 UTC.
    created_at: str
    updated_at: str


class Sftp:
    """The plugin's state: config, stored credentials, and the running server."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.credentials: dict[str, Credentials] = {}
        self.server: SshThread | None = None
        self._checks = trio.CapacityLimiter(2)
        #: One credentials change at a time (the username check, then the write).
        self._changing = trio.Lock()
        self._stop_listening: Any = None

    @property
    def config(self) -> SftpConfig:
        return self.agent.config.section_or_default(SftpConfig)

    def port(self) -> int:
        server = self.server
        return server.bound_port if server is not None and server.bound_port else self.config.port

    # --- credentials -------------------------------------------------------------------

    async def load(self) -> None:
        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute("SELECT * FROM sftp_credentials").fetchall()

        rows = await self.agent.store.read(read)
        self.credentials = {
            row["internal_id"]: Credentials(
                row["internal_id"],
                row["username"],
                row["password_hash"],
                row["created_at"],
                row["updated_at"],
            )
            for row in rows
        }

    def by_username(self, username: str) -> Credentials | None:
        for cred in self.credentials.values():
            if cred.username == username:
                return cred
        return None

    async def set_credentials(self, internal_id: str, username: str, password: str) -> Credentials:
        async with self._changing:
            return await self._set_credentials(internal_id, username, password)

    async def _set_credentials(self, internal_id: str, username: str, password: str) -> Credentials:
        other = self.by_username(username)
        if other is not None and other.internal_id != internal_id:
            raise Conflict("SFTP username already in use", code="sftp_username_taken")
        password_hash = await trio.to_thread.run_sync(hash_password, password, limiter=self._checks)
        now = int(self.agent.clock())
        old = self.credentials.get(internal_id)
        cred = Credentials(
            internal_id, username, password_hash, old.created_at if old else now, now
        )
        await self.agent.store.execute(
            "INSERT OR REPLACE INTO sftp_credentials (internal_id, username, password_hash,"
            " created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (internal_id, username, password_hash, cred.created_at, cred.updated_at),
        )
        self.credentials[internal_id] = cred
        self.close_where(lambda g: g.kind == "credentials" and g.internal_id == internal_id)
        return cred

    async def delete_credentials(self, internal_id: str) -> bool:
        if self.credentials.pop(internal_id, None) is None:
            return False
        await self.agent.store.execute(
            "DELETE FROM sftp_credentials WHERE internal_id = ?", (internal_id,)
        )
        self.close_where(lambda g: g.kind == "credentials" and g.internal_id == internal_id)
        return True

    # --- sessions ----------------------------------------------------------------------

    def close_where(self, predicate: Any) -> None:
        if self.server is not None:
            self.server.close_where(predicate)

    def token_revoked(self, token_id: str) -> None:
        self.close_where(lambda g: g.kind == "temporary" and g.token_id == token_id)

    async def authenticate(self, username: str, password: str, address: str) -> Grant | None:
        """Who may log in as ``username`` with ``password`` (runs on the trio loop)."""
        from .server import Grant

        agent = self.agent
        volume_id: str | None = None
        if username.startswith("vol."):
            volume_id = username[4:]
        else:
            containers = agent.stash.get(CONTAINER_SERVICE)
            if containers is not None:
                with contextlib.suppress(NotFound):
                    volume_id = containers.volume_of(username)
        if volume_id and password.startswith("lightd_"):
            tokens = agent.stash.get(TOKEN_SERVICE)
            grant = None if tokens is None else await tokens.authorize(password, "files", volume_id)
            if grant is not None:
                folder = await self._folder(volume_id)
                if folder is None:
                    return None
                return Grant(volume_id, folder, grant.kind, grant.token_id, grant.expires_at)
        cred = self.by_username(username)
        ok = await trio.to_thread.run_sync(
            verify_password, cred.password_hash if cred else _DUMMY, password, limiter=self._checks
        )
        if cred is None or not ok or self.credentials.get(cred.internal_id) is not cred:
            return None
        containers = agent.stash.get(CONTAINER_SERVICE)
        if containers is None:
            return None
        try:
            volume_id = containers.volume_of(cred.internal_id)
        except NotFound:
            return None
        folder = await self._folder(volume_id)
        if folder is None:
            return None
        return Grant(volume_id, folder, "credentials", internal_id=cred.internal_id)

    async def _folder(self, volume_id: str) -> Any:
        volumes = self.agent.stash.get(VOLUMES)
        return None if volumes is None else await volumes.path(volume_id)

    async def budget(self, volume_id: str) -> tuple[DiskBudget, object]:
        stack = AsyncExitStack()
        budget = await stack.enter_async_context(
            disk_writing(self.agent.stash.get(DISK), volume_id)
        )
        return budget, stack

    @staticmethod
    async def release(token: object, ok: bool) -> None:
        assert isinstance(token, AsyncExitStack)
        if ok:
            await token.aclose()
        else:
            failed = _Aborted()
            await token.__aexit__(_Aborted, failed, None)

    async def freed(self, volume_id: str, n: int) -> None:
        """Count ``n`` bytes removed from the volume (a truncation) at once."""
        budget, token = await self.budget(volume_id)
        budget.freed(n)
        await self.release(token, True)

    def stale(self, volume_id: str) -> None:
        disk = self.agent.stash.get(DISK)
        if disk is not None:
            disk.stale(volume_id)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.load()
        config = self.config
        if not config.enabled:
            task_status.started()
            await trio.sleep_forever()
        from .server import SshThread, load_host_key

        key_path = self.agent.paths.base / "sftp" / "host_ed25519_key"
        key = await trio.to_thread.run_sync(load_host_key, key_path)
        send, jobs = trio.open_memory_channel[_Job](math.inf)
        token = trio.lowlevel.current_trio_token()

        def put(job: _Job) -> None:
            try:
                send.send_nowait(job)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                _dropped(job)

        def soon(fn: Callable[..., Awaitable[None]], *args: Any) -> None:  # from any thread
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(put, (fn, args))

        server = SshThread(
            host=config.host,
            port=config.port,
            key=key,
            read_only=lambda: self.config.read_only,
            owner=lambda: self.agent.config.section_or_default(ContainersSettings).owner,
            clock=self.agent.clock,
            authenticate=self.authenticate,
            budget=self.budget,
            release=self.release,
            freed=self.freed,
            stale=self.stale,
            soon=soon,
            workers=config.workers,
            keepalive_interval=config.keepalive_interval,
        )
        tokens = self.agent.stash.get(TOKEN_SERVICE)
        stop_listening = None if tokens is None else tokens.on_revoked(self.token_revoked)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_jobs, jobs)
                await self._run_server(server, task_status)
        finally:
            self.server = None
            if stop_listening is not None:
                stop_listening()
            send.close()
            while True:  # what never ran: budgets waited for are refused
                try:
                    _dropped(jobs.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    async def _run_jobs(self, jobs: trio.MemoryReceiveChannel[_Job]) -> None:
        """What the SSH side asked for without waiting (budgets given back), in order."""
        async for fn, args in jobs:
            await fn(*args)

    async def _run_server(self, server: SshThread, task_status: trio.TaskStatus[None]) -> None:
        config = self.config
        try:
            server.start()
            await trio.to_thread.run_sync(server.ready.wait, abandon_on_cancel=True)
            if server.error is not None:
                raise server.error
            self.server = server
            log.info("sftp: serving SFTP at %s, port %d", config.host, server.bound_port)
            task_status.started()
            await trio.sleep_forever()
        finally:
            self.server = None
            server.stop()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await trio.to_thread.run_sync(server.thread.join, abandon_on_cancel=True)


_Job = tuple[Callable[..., Awaitable[None]], tuple[Any, ...]]


def _dropped(job: _Job) -> None:
    """A job that will never run: a future waiting for it is cancelled."""
    for arg in job[1][:1]:
        if isinstance(arg, Future):
            arg.cancel()


class _Aborted(Exception):
    """A budget given back without committing (the open failed)."""


SFTP: StashKey[Sftp] = StashKey("sftp")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"sftp": SftpConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return [
        Migration(
            "sftp",
            1,
            """
            CREATE TABLE sftp_credentials (
                internal_id TEXT PRIMARY KEY,
                username TEXT NOT NULL UNIQUE,
                password_hash TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            )
            """,
        )
    ]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[SFTP] = Sftp(agent)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("sftp", agent.stash[SFTP].serve)]


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    sftp = agent.stash[SFTP]
    if old.authorization.token != new.authorization.token or not new.authorization.enabled:
        sftp.close_where(lambda g: g.kind == "master")
    before, after = old.section_or_default(SftpConfig), new.section_or_default(SftpConfig)
    if (before.enabled, before.host, before.port) != (after.enabled, after.host, after.port):
        log.warning("config reload: sftp changed; it takes effect at the next restart")


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[bool]:
    return agent.stash[SFTP].delete_credentials(internal_id)


@hookimpl
def lightd_volume_deleted(agent: Agent, volume_id: str) -> None:
    agent.stash[SFTP].close_where(lambda g: g.volume_id == volume_id)


def _host(sftp: Sftp) -> str:
    host = sftp.config.host
    if host in ("0.0.0.0", "::", ""):
        return request.host.rsplit(":", 1)[0].strip("[]") if request.host else host
    return host


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    sftp = agent.stash[SFTP]
    bp = Blueprint("sftp", __name__)

    def container_volume(internal_id: str) -> str:
        containers = agent.stash.get(CONTAINER_SERVICE)
        if containers is None:
            raise NotFound("Container not found", code="container_not_found")
        return containers.volume_of(internal_id)

    @bp.post("/containers/<internal_id>/sftp/credentials")
    @describe(
        "Create or replace a server's SFTP login",
        description=(
            "Defaults: the ``internal_id`` as username and 24 random characters as password "
            "(shown this once; only a scrypt hash is kept). Replaces earlier credentials and "
            "ends their sessions. The login reaches this server's volume only."
        ),
        body=CredentialsBody,
        errors=(404, 409),
        examples={
            "body": {},
            200: {
                "username": "server-1",
                "password": "q8Z!x2mP@w7Lr#4Tn9Ks$1Vb",
                "host": "node1.example.com",
                "port": 2022,
                "volume_path": VOLUME_PATH,
            },
        },
        tags=("sftp",),
    )
    @requires("manage")
    async def create_credentials(internal_id: str) -> CredentialsAnswer:
        container_volume(internal_id)
        body = await read_json(CredentialsBody)
        username = body.username or internal_id
        password = body.password or "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(24))
        await sftp.set_credentials(internal_id, username, password)
        return {
            "username": username,
            "password": password,
            "host": _host(sftp),
            "port": sftp.port(),
            "volume_path": VOLUME_PATH,
        }

    @bp.get("/containers/<internal_id>/sftp/info")
    @describe(
        "A server's SFTP login (never the password)",
        errors=(404,),
        tags=("sftp",),
    )
    @requires("read")
    async def credentials_info(internal_id: str) -> CredentialsInfo:
        container_volume(internal_id)
        cred = sftp.credentials.get(internal_id)
        if cred is None:
            raise NotFound(NO_CREDENTIALS, code="sftp_credentials_not_found")
        return {
            "username": cred.username,
            "host": _host(sftp),
            "port": sftp.port(),
            "volume_path": VOLUME_PATH,
            "created_at": _rfc3339(cred.created_at),
            "updated_at": _rfc3339(cred.updated_at),
        }

    @bp.delete("/containers/<internal_id>/sftp/credentials")
    @describe(
        "Delete a server's SFTP login and end its sessions",
        errors=(404,),
        examples={200: {"message": "SFTP credentials deleted"}},
        tags=("sftp",),
    )
    @requires("manage")
    async def delete_credentials(internal_id: str) -> Message:
        container_volume(internal_id)
        if not await sftp.delete_credentials(internal_id):
            raise NotFound(NO_CREDENTIALS, code="sftp_credentials_not_found")
        return {"message": "SFTP credentials deleted"}

    return [bp]
