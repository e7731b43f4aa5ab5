"""Temporary tokens (contract §2.1, §12): mint, check, consume, list, revoke, persist, purge.

Part of the core, like the rest of authentication: it is the essential built-in ``tokens``
only so that it declares its routes (``/auth/tokens``), its ``tokens`` schema and its
service (load live tokens at start, purge expired ones every five minutes) through the same
hooks as every feature. It cannot be disabled; ``lightd.api.auth`` checks tokens with it.

Only a SHA-256 of each token is stored, in the store and in memory: a copy of the state
file gives nobody a usable token. Checks run against the in-memory table, so they cost no
I/O; minting, consuming and revoking write through to the store before the request goes
on, so a token answered to a client survives a crash and a revoked one stays revoked.

Each token remembers which master token minted it, as a slow (scrypt) fingerprint so the
state file does not make a weak master token easy to guess. A token whose fingerprint is
not the current master's is dead: a new master token (``lightd --token reset`` then a
reload or a restart) revokes every token minted under the old one.

Revocation also ends live WebSockets: a session ``watch``-es its token's id and is told
at once. Single-use tokens spent on a WebSocket are kept in memory (not listed) until
they expire, so revoking them still closes that socket.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypedDict

import attrs
import trio
from quart import Blueprint

from ..config import TOKEN_PREFIX, Config
from ..converter import field_check
from ..errors import BadRequest, NotFound, Unauthorized
from ..hookspecs import hookimpl
from ..runtime import Agent, Service, StashKey
from ..store import Migration, Store
from .views import OPT_IN_PERMISSIONS, PERMISSIONS, Message, current_auth, describe, read_json

__all__ = [
    "TOKENS",
    "TemporaryToken",
    "TokenRegistry",
    "fingerprint_early",
    "master_fingerprint",
    "parse_ttl",
]

PURGE_INTERVAL = 300.0
MAX_TTL = 30 * 24 * 3600
#: ASCII digits only: ``\d`` would take full-width and Arabic-Indic digits; no spaces.
_TTL_RE = re.compile(r"([0-9]{1,10})([smhd]?)", re.ASCII)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERNAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)
_VOLUME_ID = re.compile(r"[0-9A-Fa-f-]{1,64}", re.ASCII)
INVALID_TOKEN = "Missing or invalid authorization token"
#: The registry's master fingerprint while a new one is computed (matches no token).
ROTATING = "rotating"


def parse_ttl(value: object) -> int:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` (or a JSON integer) → seconds.

    Whole positive ASCII numbers only, nothing around them, at most 30 days; anything
    else raises ``BadRequest``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _TTL_RE.fullmatch(value)):
        seconds = int(match[1]) * _UNITS[match[2]]
    else:
        raise BadRequest("Invalid TTL format", code="invalid_ttl")
    if not 1 <= seconds <= MAX_TTL:
        raise BadRequest("Invalid TTL format", code="invalid_ttl")
    return seconds


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def master_fingerprint(master: str) -> str:
    """A slow, non-reversible tag of the master token (which one minted a token)."""
    digest = hashlib.scrypt(
        master.encode("utf-8", "surrogatepass"),
        salt=b"lightd master token",
        n=2**14,
        r=8,
        p=1,
        dklen=16,
    )
    return digest.hex()


#: Fingerprints being computed ahead of the tokens service, by master token.
_early: dict[str, Future[str]] = {}
_early_lock = threading.Lock()


def fingerprint_early(master: str) -> None:
    """Start ``master_fingerprint`` in a thread of its own now, while the agent is still
    importing its plugins (scrypt runs without the GIL), so that the tokens service finds
    it done instead of making the start-up wait for it: 70 ms of one start measured."""
    future: Future[str] = Future()
    with _early_lock:
        if master in _early:
            return
        _early[master] = future

    def work() -> None:
        try:
            future.set_result(master_fingerprint(master))
        except BaseException as exc:  # handed to whoever waits for it
            future.set_exception(exc)

    threading.Thread(target=work, name="lightd-master-fingerprint", daemon=True).start()


async def _fingerprint(master: str) -> str:
    """``master_fingerprint`` off the event loop, from ``fingerprint_early`` if it ran."""
    with _early_lock:
        future = _early.pop(master, None)
    if future is None:
        return await trio.to_thread.run_sync(master_fingerprint, master)
    return await trio.to_thread.run_sync(future.result)


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(int(unix), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenListing(TypedDict):
    """A token as ``GET /auth/tokens`` lists it: never the secret nor its hash."""

    id: str
    expires_at: str
    remove_on_use: bool
    containers: list[str] | None
    volumes: list[str] | None
    permissions: list[str]
    created_at: int


class TokenList(TypedDict):
    tokens: list[TokenListing]


class TokenCreated(TypedDict):
    #: The token itself, shown this once.
    token: str
    #: RFC 3339 UTC.
    expires_at: str
    #: [ext] Its public id (listing, revocation).
    id: str


class TokensRevoked(TypedDict):
    message: str
    revoked_count: int


@attrs.frozen
class TemporaryToken:
    token_hash: str
    created_at: int
    expires_at: int
    remove_on_use: bool
    containers: frozenset[str] | None
    #: Public, stable, non-secret id (listing and revocation).
    id: str = ""
    #: ``None`` = every permission.
    permissions: frozenset[str] | None = None
    volumes: frozenset[str] | None = None
    #: ``master_fingerprint`` of the master token that minted it.
    master: str = ""

    def names_any(self, containers: frozenset[str]) -> bool:
        return self.containers is not None and not self.containers.isdisjoint(containers)

    def listing(self) -> TokenListing:
        """The ``GET /auth/tokens`` entry: never the secret nor its hash."""
        permissions = self.permissions
        return {
            "id": self.id,
            "expires_at": rfc3339(self.expires_at),
            "remove_on_use": self.remove_on_use,
            "containers": None if self.containers is None else sorted(self.containers),
            "volumes": None if self.volumes is None else sorted(self.volumes),
            "permissions": [
                p
                for p in PERMISSIONS
                if (p not in OPT_IN_PERMISSIONS if permissions is None else p in permissions)
            ],
            "created_at": self.created_at,
        }


def _json_set(value: frozenset[str] | None) -> str | None:
    return None if value is None else json.dumps(sorted(value))


class TokenRegistry:
    """Live temporary tokens, in memory and in the store."""

    def __init__(self, store: Store, clock: Callable[[], float], master: str = "") -> None:
        self._store = store
        self._clock = clock
        self._tokens: dict[str, TemporaryToken] = {}
        #: Single-use tokens spent by a WebSocket (by id), until they expire.
        self._spent: dict[str, TemporaryToken] = {}
        #: Token id → events of the WebSockets open with it (set on revocation).
        self._watchers: dict[str, set[trio.Event]] = {}
        #: The current master token's fingerprint.
        self.master = master
        #: Told the id of every revoked token (``on_revoked``: SFTP sessions end).
        self._revoked: list[Callable[[str], None]] = []

    def _now(self) -> float:
        return self._clock()

    async def load(self) -> None:
        """Drop expired tokens and those of another master; read the live ones into memory.

        Rows from before tokens remembered their master are adopted by the current one.
        """
        now = int(self._now())
        master = self.master

        def load(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            conn.execute("DELETE FROM tokens_temporary WHERE expires_at < ?", (now,))
            conn.execute("UPDATE tokens_temporary SET master = ? WHERE master IS NULL", (master,))
            conn.execute("DELETE FROM tokens_temporary WHERE master != ?", (master,))
            return conn.execute("SELECT * FROM tokens_temporary").fetchall()

        rows = await self._store.write(load)
        self._tokens = {row["token_hash"]: _from_row(row) for row in rows}

    async def mint(
        self,
        ttl: int,
        *,
        remove_on_use: bool = False,
        containers: Iterable[str] | None = None,
        volumes: Iterable[str] | None = None,
        permissions: Iterable[str] | None = None,
    ) -> tuple[str, TemporaryToken]:
        token = TOKEN_PREFIX + secrets.token_hex(16)
        now = int(self._now())
        record = TemporaryToken(
            token_hash=_hash(token),
            created_at=now,
            expires_at=now + ttl,
            remove_on_use=remove_on_use,
            containers=None if containers is None else frozenset(containers),
            id=secrets.token_hex(8),
            permissions=None if permissions is None else frozenset(permissions),
            volumes=None if volumes is None else frozenset(v.lower() for v in volumes),
            master=self.master,
        )
        await self._store.execute(
            "INSERT INTO tokens_temporary (token_hash, created_at, expires_at, remove_on_use,"
            " containers, id, permissions, volumes, master) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.token_hash,
                record.created_at,
                record.expires_at,
                int(record.remove_on_use),
                _json_set(record.containers),
                record.id,
                _json_set(record.permissions),
                _json_set(record.volumes),
                record.master,
            ),
        )
        self._tokens[record.token_hash] = record
        return token, record

    def lookup(self, token: str) -> TemporaryToken | None:
        """The live record of ``token``, or ``None`` (unknown, consumed, revoked, expired,
        or minted under another master token)."""
        record = self._tokens.get(_hash(token))
        if record is None or record.master != self.master:
            return None
        if self._now() >= record.expires_at:
            return None
        return record

    def take(self, record: TemporaryToken) -> bool:
        """Claim a ``remove_on_use`` token for this request; ``False`` if another got it.

        Synchronous on purpose: between ``lookup`` and ``take`` nothing awaits, so two
        concurrent requests can never both use a single-use token.
        """
        if self._tokens.pop(record.token_hash, None) is None:
            return False
        self._spent[record.id] = record
        return True

    async def forget(self, record: TemporaryToken) -> None:
        """Delete a consumed token from the store (call after ``take``)."""
        await self._store.execute(
            "DELETE FROM tokens_temporary WHERE token_hash = ?", (record.token_hash,)
        )

    def tokens(self) -> list[TemporaryToken]:
        """Live tokens (not spent, not expired), oldest first."""
        now = self._now()
        live = [r for r in self._tokens.values() if now < r.expires_at and r.master == self.master]
        return sorted(live, key=lambda r: (r.created_at, r.id))

    def find(self, token_id: str) -> TemporaryToken | None:
        """A live or spent-but-unexpired token by id."""
        for record in self._tokens.values():
            if record.id == token_id:
                return record
        return self._spent.get(token_id)

    async def revoke(self, predicate: Callable[[TemporaryToken], bool]) -> int:
        """Revoke every token ``predicate`` picks; returns how many live ones it ended.

        Memory first (requests fail at once), then the store; WebSockets open with them
        are told through their watch.
        """
        doomed = [r for r in self._tokens.values() if predicate(r)]
        spent = [r for r in self._spent.values() if predicate(r)]
        for record in doomed:
            del self._tokens[record.token_hash]
        for record in spent:
            del self._spent[record.id]
        for record in (*doomed, *spent):
            for event in self._watchers.get(record.id, ()):
                event.set()
            for listener in list(self._revoked):
                listener(record.id)
        if doomed:
            hashes = [(r.token_hash,) for r in doomed]
            await self._store.write(
                lambda conn: conn.executemany(
                    "DELETE FROM tokens_temporary WHERE token_hash = ?", hashes
                )
            )
        live = sum(1 for r in doomed if self._now() < r.expires_at)
        return live + sum(1 for r in spent if self._now() < r.expires_at)

    async def set_master(self, master: str) -> int:
        """A (maybe) new master token fingerprint: revoke every token minted under another."""
        self.master = master
        return await self.revoke(lambda r: r.master != master)

    def on_revoked(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(token_id)`` for every token revoked from now on (synchronously,
        inside ``revoke``: never block); returns the function that stops it."""
        self._revoked.append(listener)
        return lambda: self._revoked.remove(listener) if listener in self._revoked else None

    @contextmanager
    def watch(self, token_id: str) -> Iterator[trio.Event]:
        """An event set when ``token_id`` is revoked (for a WebSocket's lifetime)."""
        event = trio.Event()
        watchers = self._watchers.setdefault(token_id, set())
        watchers.add(event)
        try:
            yield event
        finally:
            watchers.discard(event)
            if not watchers:
                self._watchers.pop(token_id, None)

    def sockets(self, token_id: str) -> int:
        """WebSockets open with ``token_id`` now."""
        return len(self._watchers.get(token_id, ()))

    async def purge(self) -> int:
        """Delete expired tokens from memory and store; returns how many."""
        now = self._now()
        expired = [h for h, r in self._tokens.items() if now >= r.expires_at]
        for token_hash in expired:
            del self._tokens[token_hash]
        for token_id in [i for i, r in self._spent.items() if now >= r.expires_at]:
            del self._spent[token_id]
        await self._store.execute("DELETE FROM tokens_temporary WHERE expires_at <= ?", (int(now),))
        return len(expired)

    def __len__(self) -> int:
        return len(self._tokens)


def _from_row(row: sqlite3.Row) -> TemporaryToken:
    def as_set(value: str | None) -> frozenset[str] | None:
        return None if value is None else frozenset(json.loads(value))

    return TemporaryToken(
        token_hash=row["token_hash"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        remove_on_use=bool(row["remove_on_use"]),
        containers=as_set(row["containers"]),
        id=row["id"],
        permissions=as_set(row["permissions"]),
        volumes=as_set(row["volumes"]),
        master=row["master"] or "",
    )


TOKENS: StashKey[TokenRegistry] = StashKey("tokens")


def _valid_ids(value: tuple[str, ...] | None) -> bool:
    return value is None or all(_INTERNAL_ID.fullmatch(item) for item in value)


def _valid_volume_ids(value: tuple[str, ...] | None) -> bool:
    return value is None or all(_VOLUME_ID.fullmatch(item) for item in value)


@attrs.frozen
class TokenRequest:
    ttl: Any  # a string ("15m") or, leniently, a JSON integer; parse_ttl judges it
    remove_on_use: bool = False
    containers: tuple[str, ...] | None = attrs.field(
        default=None, validator=field_check(_valid_ids, "must be a list of container ids")
    )
    volumes: tuple[str, ...] | None = attrs.field(
        default=None, validator=field_check(_valid_volume_ids, "must be a list of volume ids")
    )
    permissions: tuple[str, ...] | None = None


@attrs.frozen
class RevokeRequest:
    containers: tuple[str, ...] | None = attrs.field(
        default=None, validator=field_check(_valid_ids, "must be a list of container ids")
    )
    all: bool = False


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return [
        Migration(
            "tokens",
            1,
            """
            CREATE TABLE tokens_temporary (
                token_hash TEXT PRIMARY KEY,
                created_at INTEGER NOT NULL,
                expires_at INTEGER NOT NULL,
                remove_on_use INTEGER NOT NULL,
                containers TEXT
            );
            CREATE INDEX tokens_temporary_expiry ON tokens_temporary (expires_at)
            """,
        ),
        # §12: a public id, permissions, volume scope, and the minting master token.
        Migration(
            "tokens",
            2,
            """
            ALTER TABLE tokens_temporary ADD COLUMN id TEXT;
            ALTER TABLE tokens_temporary ADD COLUMN permissions TEXT;
            ALTER TABLE tokens_temporary ADD COLUMN volumes TEXT;
            ALTER TABLE tokens_temporary ADD COLUMN master TEXT;
            UPDATE tokens_temporary SET id = lower(hex(randomblob(8)));
            CREATE UNIQUE INDEX tokens_temporary_id ON tokens_temporary (id)
            """,
        ),
    ]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[TOKENS] = TokenRegistry(agent.store, agent.clock, ROTATING)


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> Any:
    if old.authorization.token == new.authorization.token:
        return None
    registry = agent.stash[TOKENS]
    # Fail closed at once: no fingerprint matches while the new one is computed.
    registry.master = ROTATING

    async def rotate() -> None:
        master = await trio.to_thread.run_sync(master_fingerprint, new.authorization.token)
        await registry.set_master(master)

    return rotate()


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    registry = agent.stash[TOKENS]

    async def serve_tokens(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Off the event loop: scrypt is slow on purpose.
        registry.master = await _fingerprint(agent.config.authorization.token)
        await registry.load()
        task_status.started()
        while True:
            await trio.sleep(PURGE_INTERVAL)
            await registry.purge()

    return [Service("tokens", serve_tokens)]


def _master_only() -> None:
    """Token administration is for the master token (and auth disabled) only."""
    if current_auth().kind == "temporary":
        raise Unauthorized(INVALID_TOKEN)


def _permissions(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    for name in value:
        if name not in PERMISSIONS:
            raise BadRequest(f"Invalid permission: {name}", code="invalid_permission")
    return value


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    registry = agent.stash[TOKENS]
    bp = Blueprint("tokens", __name__)

    @bp.post("/auth/tokens")
    @describe(
        "Mint a temporary token (master token only)",
        description=(
            "``ttl``: ``<n>s``, ``<n>m``, ``<n>h``, ``<n>d`` or a bare number of seconds, at "
            "most 30 days. [ext] ``containers``, ``volumes`` and ``permissions`` restrict it "
            "(contract §2.1, §12)."
        ),
        body=TokenRequest,
        examples={
            "body": {"ttl": "15m", "remove_on_use": False, "permissions": ["read", "console"]},
            200: {
                "token": "lightd_0123456789abcdef0123456789abcdef",
                "expires_at": "2026-01-28T15:30:00Z",
                "id": "9f2c4e1a7b3d5c6e",
            },
        },
        tags=("tokens",),
    )
    async def create_token() -> TokenCreated:
        _master_only()
        body = await read_json(TokenRequest)
        ttl = parse_ttl(body.ttl)
        permissions = _permissions(body.permissions)
        token, record = await registry.mint(
            ttl,
            remove_on_use=body.remove_on_use,
            containers=body.containers,
            volumes=body.volumes,
            permissions=permissions,
        )
        return {"token": token, "expires_at": rfc3339(record.expires_at), "id": record.id}

    @bp.get("/auth/tokens")
    @describe("List live temporary tokens (master token only)", tags=("tokens",))
    async def list_tokens() -> TokenList:
        _master_only()
        return {"tokens": [record.listing() for record in registry.tokens()]}

    @bp.delete("/auth/tokens/<token_id>")
    @describe(
        "Revoke one token by its id (master token only)",
        description="Its WebSockets are closed at once.",
        examples={200: {"message": "Token revoked"}},
        tags=("tokens",),
    )
    async def delete_token(token_id: str) -> Message:
        _master_only()
        if registry.find(token_id) is None:
            raise NotFound("Token not found", code="token_not_found")
        await registry.revoke(lambda r: r.id == token_id)
        return {"message": "Token revoked"}

    @bp.post("/auth/tokens/revoke")
    @describe(
        "Revoke every token, or those naming some containers (master token only)",
        body=RevokeRequest,
        examples={
            "body": {"containers": ["server-1"]},
            200: {"message": "Revoked 2 tokens", "revoked_count": 2},
        },
        tags=("tokens",),
    )
    async def revoke_tokens() -> TokensRevoked:
        _master_only()
        body = await read_json(RevokeRequest)
        if body.all:
            count = await registry.revoke(lambda r: True)
        elif body.containers is not None:
            wanted = frozenset(body.containers)
            count = await registry.revoke(lambda r: r.names_any(wanted))
        else:
            raise BadRequest('containers: required (or "all": true)', code="invalid_request")
        return {"message": f"Revoked {count} tokens", "revoked_count": count}

    return [bp]
