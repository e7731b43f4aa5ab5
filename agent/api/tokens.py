"""Temporary tokens (contract §2.1): mint, check, consume, persist, purge.

Part of the core, like the rest of authentication: it is the essential built-in ``tokens``
only so that it declares its route (``POST /auth/tokens``), its ``tokens`` schema and its
service (load live tokens at start, purge expired ones every five minutes) through the same
hooks as every feature. It cannot be disabled; ``lightd.api.auth`` checks tokens with it.

Only a SHA-256 of each token is stored, in the store and in memory: a copy of the state
file gives nobody a usable token. Checks run against the in-memory table, so they cost no
I/O; minting and consuming write through to the store before the request goes on, so a
token answered to a client survives a crash and a consumed one stays consumed.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import attrs
import trio
from quart import Blueprint

from ..config import TOKEN_PREFIX
from ..converter import field_check
from ..errors import BadRequest, Unauthorized
from ..hookspecs import hookimpl
from ..runtime import Agent, Service, StashKey
from ..store import Migration, Store
from .views import current_auth, read_json

__all__ = ["TOKENS", "TemporaryToken", "TokenRegistry", "parse_ttl"]

PURGE_INTERVAL = 300.0
MAX_TTL = 30 * 24 * 3600
_TTL_RE = re.compile(r"(\d{1,10})([smhd]?)")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_INTERNAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def parse_ttl(value: object) -> int:
    """``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` (or a JSON integer) → seconds.

    Whole positive numbers only, at most 30 days; anything else raises ``BadRequest``.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    elif isinstance(value, str) and (match := _TTL_RE.fullmatch(value.strip())):
        seconds = int(match[1]) * _UNITS[match[2]]
    else:
        raise BadRequest("Invalid TTL format", code="invalid_ttl")
    if not 1 <= seconds <= MAX_TTL:
        raise BadRequest("Invalid TTL format", code="invalid_ttl")
    return seconds


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(int(unix), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.frozen
class TemporaryToken:
    token_hash: str
    created_at: int
    expires_at: int
    remove_on_use: bool
    containers: frozenset[str] | None


class TokenRegistry:
    """Live temporary tokens, in memory and in the store."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        self._tokens: dict[str, TemporaryToken] = {}

    def _now(self) -> float:
        return self._clock()

    async def load(self) -> None:
        """Drop expired tokens from the store and read the live ones into memory."""
        now = int(self._now())

        def load(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            conn.execute("DELETE FROM tokens_temporary WHERE expires_at < ?", (now,))
            return conn.execute("SELECT * FROM tokens_temporary").fetchall()

        rows = await self._store.write(load)
        self._tokens = {row["token_hash"]: _from_row(row) for row in rows}

    async def mint(
        self, ttl: int, *, remove_on_use: bool = False, containers: Iterable[str] | None = None
    ) -> tuple[str, TemporaryToken]:
        token = TOKEN_PREFIX + secrets.token_hex(16)
        now = int(self._now())
        record = TemporaryToken(
            token_hash=_hash(token),
            created_at=now,
            expires_at=now + ttl,
            remove_on_use=remove_on_use,
            containers=None if containers is None else frozenset(containers),
        )
        await self._store.execute(
            "INSERT INTO tokens_temporary VALUES (?, ?, ?, ?, ?)",
            (
                record.token_hash,
                record.created_at,
                record.expires_at,
                int(record.remove_on_use),
                None if record.containers is None else json.dumps(sorted(record.containers)),
            ),
        )
        self._tokens[record.token_hash] = record
        return token, record

    def lookup(self, token: str) -> TemporaryToken | None:
        """The live record of ``token``, or ``None`` (unknown, consumed or expired)."""
        record = self._tokens.get(_hash(token))
        if record is None:
            return None
        if self._now() >= record.expires_at:
            return None
        return record

    def take(self, record: TemporaryToken) -> bool:
        """Claim a ``remove_on_use`` token for this request; ``False`` if another got it.

        Synchronous on purpose: between ``lookup`` and ``take`` nothing awaits, so two
        concurrent requests can never both use a single-use token.
        """
        return self._tokens.pop(record.token_hash, None) is not None

    async def forget(self, record: TemporaryToken) -> None:
        """Delete a consumed token from the store (call after ``take``)."""
        await self._store.execute(
            "DELETE FROM tokens_temporary WHERE token_hash = ?", (record.token_hash,)
        )

    async def purge(self) -> int:
        """Delete expired tokens from memory and store; returns how many."""
        now = self._now()
        expired = [h for h, r in self._tokens.items() if now >= r.expires_at]
        for token_hash in expired:
            del self._tokens[token_hash]
        await self._store.execute("DELETE FROM tokens_temporary WHERE expires_at <= ?", (int(now),))
        return len(expired)

    def __len__(self) -> int:
        return len(self._tokens)


def _from_row(row: sqlite3.Row) -> TemporaryToken:
    containers = row["containers"]
    return TemporaryToken(
        token_hash=row["token_hash"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        remove_on_use=bool(row["remove_on_use"]),
        containers=None if containers is None else frozenset(json.loads(containers)),
    )


TOKENS: StashKey[TokenRegistry] = StashKey("tokens")


def _valid_ids(value: tuple[str, ...] | None) -> bool:
    return value is None or all(_INTERNAL_ID.fullmatch(item) for item in value)


@attrs.frozen
class TokenRequest:
    ttl: Any  # a string ("15m") or, leniently, a JSON integer; parse_ttl judges it
    remove_on_use: bool = False
    containers: tuple[str, ...] | None = attrs.field(
        default=None, validator=field_check(_valid_ids, "must be a list of container ids")
    )


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
        )
    ]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[TOKENS] = TokenRegistry(agent.store, agent.clock)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    registry = agent.stash[TOKENS]

    async def serve_tokens(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await registry.load()
        task_status.started()
        while True:
            await trio.sleep(PURGE_INTERVAL)
            await registry.purge()

    return [Service("tokens", serve_tokens)]


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    registry = agent.stash[TOKENS]
    bp = Blueprint("tokens", __name__)

    @bp.post("/auth/tokens")
    async def create_token() -> dict[str, str]:
        if current_auth().kind == "temporary":
            raise Unauthorized("Missing or invalid authorization token")
        body = await read_json(TokenRequest)
        ttl = parse_ttl(body.ttl)
        token, record = await registry.mint(
            ttl, remove_on_use=body.remove_on_use, containers=body.containers
        )
        return {"token": token, "expires_at": rfc3339(record.expires_at)}

    return [bp]
