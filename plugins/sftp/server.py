"""The SSH side: asyncssh on its own asyncio loop, in a thread of its own.

Why asyncssh: in one check (minimal servers of each library on loopback, OpenSSH's
client, 128 MiB) asyncssh moved 291 MB/s up and 191 MB/s down, paramiko 99 and 147;
paramiko also needs a thread per connection. Why a thread: asyncssh is an asyncio
library, the agent runs on trio. Its loop runs in one dedicated thread (``SshThread``)
for the life of the service, so SSH work never runs on (or blocks) the trio loop;
trio-asyncio would have put both on one loop. (They still share the GIL: a transfer
costs the trio loop some latency, not stalls.) The two sides meet at a few points only:

* logins: asyncssh's ``validate_password`` hands the check to the agent's trio loop
  (``trio.from_thread.run`` from a small pool, so the SSH loop never blocks) and gets a
  ``Grant`` (which volume, which token) or ``None``;
* writes: a session asks the trio side to enter a ``lightd.disk_writing`` block
  (``budget``, a future a growing write waits for only if it has not come yet) and
  shares it among the files it opens for writing within a second (``fs.Lease``: one
  trio round trip per second of uploads, not per file), charged before each write (on
  the SSH loop or a worker thread); the block is left (``release``) when it is retired
  and its last file closed; neither waits on the SSH loop (the plugin runs them soon, in
  order: ``soon``);
* ends: the agent closes sessions by a predicate (``close_where``, thread-safe).

Failed logins are counted per address (``LoginThrottle``): after ``MAX_FAILURES`` in
``WINDOW`` seconds, the address's logins are refused unchecked until the window passes.
A failure is logged with the username and address, never the password.

Per-packet costs (``bench.sftp``, 2 000 small files: a file is three requests, each a
round trip, so the cost of a packet is what the server's throughput is made of), cut where
asyncssh spends work that changes nothing:

* asyncssh sends an empty ``SSH_MSG_IGNORE`` before every packet once encrypted (RFC
  4251 §9.3.1's countermeasure against the CBC-mode attack): one encryption and one
  ``send`` more per answer, and one more wake-up of the client. The server offers no CBC
  cipher (``ENCRYPTION_ALGS``), so the packet protects nothing here: it is not sent
  (``_skip_ignore_packets``, per connection);
* asyncssh formats its debug records (arguments, each packet's name and size) before
  the logger is asked whether DEBUG is on; with DEBUG off that work is skipped
  (``_quiet_asyncssh_debug``; with DEBUG on, logs are as before).

Together 15 to 25 % less agent CPU per small file (``bench.sftp``-style runs of 2 000
files, both versions side by side in one run).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import asyncssh
import asyncssh.logging
import asyncssh.packet
import attrs
import trio
from lightd import DiskBudget
from lightd.files import Owner, Root, VolumeNotFound

from .fs import Session, VolumeSFTP

__all__ = ["Grant", "LoginThrottle", "SshThread", "load_host_key"]

log = logging.getLogger(__name__)

#: Failed logins from one address within ``WINDOW`` seconds before it is refused.
MAX_FAILURES = 5
WINDOW = 60.0
#: Seconds a client has to log in.
LOGIN_TIMEOUT = 30
#: Keep-alive asks a silent client may leave unanswered before its session ends.
KEEPALIVE_COUNT = 3
#: The ciphers offered: asyncssh's defaults, never a CBC mode (see the module docstring).
ENCRYPTION_ALGS = [
    alg.decode("ascii")
    for alg in asyncssh.encryption.get_default_encryption_algs()
    if not alg.endswith(b"-cbc")
]
_EMPTY_STRING = b"\0\0\0\0"


def _skip_ignore_packets(conn: asyncssh.SSHServerConnection) -> None:
    """Send no empty ``SSH_MSG_IGNORE`` on ``conn`` (asyncssh's CBC countermeasure, sent
    before every packet; no CBC cipher is offered: ``ENCRYPTION_ALGS``). asyncssh sends it
    through ``self.send_packet``, which this per-connection wrapper answers first."""
    send = conn.send_packet

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        if pkttype == asyncssh.MSG_IGNORE and args == (_EMPTY_STRING,):
            return
        send(pkttype, *args, handler=handler)

    setattr(conn, "send_packet", send_packet)  # noqa: B010 (a method of this instance)


_quieted = False


def _quiet_asyncssh_debug() -> None:
    """Skip asyncssh's formatting of debug records when DEBUG is off (``SSHLogger.debug1``
    builds its arguments' text first, and every packet's name and size is formatted before
    ``packet`` checks the debug level). Once per process; the records are unchanged when
    DEBUG is on."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    logger_class = asyncssh.logging.SSHLogger
    packet_logger = asyncssh.packet.SSHPacketLogger
    debug1 = logger_class.debug1
    log_packet = packet_logger._log_packet

    def quiet_debug1(self: asyncssh.logging.SSHLogger, msg: str, *args: Any, **kw: Any) -> None:
        if self.isEnabledFor(logging.DEBUG):
            debug1(self, msg, *args, **kw)

    def quiet_log_packet(self: asyncssh.packet.SSHPacketLogger, *args: Any) -> None:
        logger = self.logger
        if logger._debug_level >= 3 and logger.isEnabledFor(logging.DEBUG):
            log_packet(self, *args)

    setattr(logger_class, "debug1", quiet_debug1)  # noqa: B010
    setattr(packet_logger, "_log_packet", quiet_log_packet)  # noqa: B010


@attrs.frozen
class Grant:
    """A login the agent accepted: the volume and what let it in (``kind``: ``master``,
    ``temporary`` (``token_id``, ``expires_at``) or ``credentials`` (``internal_id``))."""

    volume_id: str
    folder: Path
    kind: str
    token_id: str | None = None
    expires_at: float | None = None
    internal_id: str | None = None


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """The host key kept at ``path`` (mode 0600), made once (ed25519) when missing."""
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = asyncssh.generate_private_key("ssh-ed25519")
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.export_private_key())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    log.info("sftp: made a new ed25519 host key (%s)", key.get_fingerprint())
    return key


class LoginThrottle:
    """Failed logins per address (thread-confined to the SSH loop)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._clock = clock

    def _recent(self, address: str) -> deque[float]:
        now = self._clock()
        times = self._failures.get(address)
        if times is None:
            return deque()
        while times and now - times[0] > WINDOW:
            times.popleft()
        if not times:
            del self._failures[address]
        return times

    def blocked(self, address: str) -> bool:
        return len(self._recent(address)) >= MAX_FAILURES

    def failed(self, address: str) -> None:
        times = self._recent(address)
        times.append(self._clock())
        self._failures[address] = times
        if len(self._failures) > 10_000:  # bounded: forget the oldest addresses
            for key in list(self._failures)[:1000]:
                del self._failures[key]


Authenticate = Callable[[str, str, str], Awaitable[Grant | None]]


class _Connection(asyncssh.SSHServer):
    """One SSH connection: its login, then its SFTP channels."""

    def __init__(self, owner: SshThread) -> None:
        self._owner = owner
        self.conn: asyncssh.SSHServerConnection | None = None
        self.address = "?"
        self.grant: Grant | None = None
        self.root: Root | None = None
        self._expiry: asyncio.TimerHandle | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        _skip_ignore_packets(conn)
        peer = conn.get_extra_info("peername")
        self.address = str(peer[0]) if peer else "?"
        self._owner.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.sessions.discard(self)
        self._owner.connections.discard(self)
        if self._expiry is not None:
            self._expiry.cancel()
        if self.root is not None:
            self.root.close()
            self.root = None

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        owner = self._owner
        shown = username[:64]  # for the log (never the password)
        if owner.throttle.blocked(self.address):
            log.warning("sftp: login of %r from %s refused: too many failures", shown, self.address)
            return False
        grant = await owner.authenticate(username, password, self.address)
        root = None
        if grant is not None:
            try:
                root = await asyncio.get_running_loop().run_in_executor(
                    owner.pool, partial(Root.open_volume, grant.folder, owner=owner.owner())
                )
            except (VolumeNotFound, OSError):
                grant = None
        if grant is None:
            owner.throttle.failed(self.address)
            log.warning("sftp: failed login of %r from %s", shown, self.address)
            return False
        self.grant, self.root = grant, root
        owner.sessions.add(self)
        if grant.expires_at is not None:
            delay = max(0.0, grant.expires_at - owner.clock())
            self._expiry = asyncio.get_running_loop().call_later(delay, self.close)
        log.info("sftp: %r logged in from %s (%s)", shown, self.address, grant.kind)
        return True

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class SshThread:
    """The SSH server's loop, in its own thread (see the module docstring)."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        key: asyncssh.SSHKey,
        read_only: Callable[[], bool],
        owner: Callable[[], Owner | None],
        clock: Callable[[], float],
        authenticate: Callable[[str, str, str], Awaitable[Grant | None]],
        budget: Callable[[str], Awaitable[tuple[DiskBudget, object]]],
        release: Callable[[object, bool], Awaitable[None]],
        freed: Callable[[str, int], Awaitable[None]],
        stale: Callable[[str], None],
        soon: Callable[..., None],
        workers: int = 4,
        keepalive_interval: float = 0.0,
    ) -> None:
        self.host, self.port, self.key = host, port, key
        self.keepalive_interval = keepalive_interval
        self.read_only, self.owner, self.clock = read_only, owner, clock
        self._authenticate, self._budget, self._release = authenticate, budget, release
        self._freed, self._stale, self._soon = freed, stale, soon
        self.token = trio.lowlevel.current_trio_token()
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sftp-files")
        #: Threads that wait on the trio loop (logins, budgets): never the SSH loop.
        self._bridge = ThreadPoolExecutor(4, thread_name_prefix="sftp-bridge")
        self.throttle = LoginThrottle()
        #: Every open connection, and those logged in.
        self.connections: set[_Connection] = set()
        self.sessions: set[_Connection] = set()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.bound_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, name="sftp", daemon=True)

    # --- the trio side ---------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def close_where(self, predicate: Callable[[Grant], bool]) -> None:
        """Close every session whose grant ``predicate`` picks (from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def close() -> None:
            for session in list(self.sessions):
                if session.grant is not None and predicate(session.grant):
                    log.info("sftp: closing a session of %s", session.grant.volume_id)
                    session.close()

        with contextlib.suppress(RuntimeError):  # the loop just closed
            loop.call_soon_threadsafe(close)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)

    # --- bridges (called on the SSH loop) -----------------------------------------------------

    async def _on_trio(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        call = partial(trio.from_thread.run, fn, *args, trio_token=self.token)
        return await loop.run_in_executor(self._bridge, call)

    async def authenticate(self, username: str, password: str, address: str) -> Grant | None:
        try:
            grant: Grant | None = await self._on_trio(
                self._authenticate, username, password, address
            )
        except (trio.RunFinishedError, trio.Cancelled):
            return None
        return grant

    def session(self, grant: Grant, root: Root) -> Session:
        volume_id = grant.volume_id

        def budget() -> Future[tuple[DiskBudget, object]]:
            future: Future[tuple[DiskBudget, object]] = Future()
            self._soon(self._into, future, self._budget, volume_id)
            return future

        def release(token: object, ok: bool) -> None:
            self._soon(self._release, token, ok)

        def freed(n: int) -> None:
            self._soon(self._freed, volume_id, n)

        def stale() -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self._stale, volume_id)

        return Session(
            root=root,
            read_only=self.read_only(),
            pool=self.pool,
            owner=self.owner(),
            budget=budget,
            release=release,
            freed=freed,
            stale=stale,
        )

    @staticmethod
    async def _into(future: Future[Any], fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn`` on the trio side and hand its outcome to ``future`` (any thread)."""
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(await fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise

    # --- the SSH loop ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the service (before ready: start fails)
            self.error = exc
            if not self.ready.is_set():
                self.ready.set()
            else:
                log.exception("sftp: the SSH loop failed")
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._bridge.shutdown(wait=False, cancel_futures=True)

    def _sftp(self, chan: asyncssh.SSHServerChannel[bytes]) -> VolumeSFTP:
        conn = chan.get_connection()
        owner = conn.get_owner()
        assert isinstance(owner, _Connection) and owner.grant is not None
        assert owner.root is not None
        return VolumeSFTP(chan, self.session(owner.grant, owner.root))

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        _quiet_asyncssh_debug()
        server = await asyncssh.listen(
            self.host,
            self.port,
            server_factory=partial(_Connection, self),
            server_host_keys=[self.key],
            encryption_algs=ENCRYPTION_ALGS,
            sftp_factory=self._sftp,
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            line_editor=False,  # SFTP only: no terminal, one wrapper less per packet
            login_timeout=LOGIN_TIMEOUT,
            keepalive_interval=self.keepalive_interval,
            keepalive_count_max=KEEPALIVE_COUNT,
            reuse_address=True,
        )
        sockets = server.sockets
        self.bound_port = sockets[0].getsockname()[1] if sockets else self.port
        self.ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            connections = [c.conn for c in self.connections if c.conn is not None]
            for conn in connections:
                conn.close()
            await server.wait_closed()
            if connections:
                waits = [asyncio.ensure_future(conn.wait_closed()) for conn in connections]
                await asyncio.wait(waits, timeout=5)
