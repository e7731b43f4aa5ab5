"""The pool in the state store, and every change to it as one transaction.

Table ``port_pool_ports``: one row per entry, identity ``(ip, port)``. ``in_use`` is set
by hand (``PUT …/use``) or by a reservation; ``owner`` is the container holding the
entry (a ``CHECK`` keeps ``owner`` only on entries in use). A reservation is a
conditional ``UPDATE`` per entry inside the caller's transaction, so two reservations can
never both win an entry, and a reservation that fails part-way rolls back whole.

Changes share commits with every other writer of the store (``agent.store``'s group
commit): each runs in a savepoint of its own, so a refused reservation rolls back alone
and the others still commit; every caller returns only after the commit that holds its
change.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from lightd import (
    AgentError,
    BadRequest,
    Conflict,
    Migration,
    NotFound,
    PoolPort,
    PortAccess,
    PortRequest,
    StoreError,
)

from .model import PROTOCOL_BITS, covers, display, ip_key, parse_ip, parse_port, parse_protocol

if TYPE_CHECKING:
    from lightd import Store

__all__ = ["MIGRATIONS", "TAKE_SQL", "Entry", "PortPool", "PortPoolError"]

T = TypeVar("T")


MIGRATIONS = [
    Migration(
        "port_pool",
        1,
        """
        CREATE TABLE port_pool_ports (
            ip TEXT NOT NULL,
            port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
            protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp', 'both')),
            ip_key BLOB NOT NULL,
            in_use INTEGER NOT NULL DEFAULT 0 CHECK (in_use IN (0, 1)),
            owner TEXT CHECK (owner IS NULL OR in_use = 1),
            created_at INTEGER NOT NULL,
            PRIMARY KEY (ip, port)
        ) WITHOUT ROWID;
        CREATE UNIQUE INDEX port_pool_ports_order ON port_pool_ports (ip_key, port);
        CREATE INDEX port_pool_ports_owner ON port_pool_ports (owner) WHERE owner IS NOT NULL
        """,
    )
]

_COLUMNS = "ip, port, protocol, in_use, owner"
#: Take one named entry for an owner (none if it is another's, marked, or of another
#: protocol). ``bench/ports.py`` runs the same statement raw, as the ceiling.
TAKE_SQL = (
    "UPDATE port_pool_ports SET in_use = 1, owner = ?1 WHERE ip = ?2 AND port = ?3"
    " AND (owner = ?1 OR in_use = 0) AND (protocol = ?4 OR protocol = 'both')"
    " RETURNING protocol"
)
_TAKE_FREE = "UPDATE port_pool_ports SET in_use = 1, owner = ? WHERE ip = ? AND port = ?"
_FREE_OWNER = (
    "UPDATE port_pool_ports SET in_use = 0, owner = NULL WHERE owner = ?"
    " RETURNING ip, port, protocol"
)
_INSERT = (
    "INSERT INTO port_pool_ports (ip, port, protocol, ip_key, created_at)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)


class PortPoolError(AgentError):
    """A pool transaction failed as a whole (the store could not commit it)."""


@attrs.frozen
class Entry:
    """A pool entry as the routes show it."""

    ip: str
    port: int
    protocol: str
    in_use: bool
    owner: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "port": self.port,
            "protocol": self.protocol,
            "in_use": self.in_use,
            "container": self.owner,
        }


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(row[0], row[1], row[2], bool(row[3]), row[4])


@attrs.frozen
class _Want:
    """A validated ``PortRequest``: ``ip``/``port`` ``None`` means any."""

    ip: str | None
    port: int | None
    protocol: str

    @property
    def specific(self) -> bool:
        return self.ip is not None and self.port is not None


def _want(request: PortRequest) -> _Want:
    return _Want(
        None if request.ip is None else parse_ip(request.ip),
        None if request.port is None else parse_port(request.port),
        parse_protocol(request.protocol),
    )


def _refusal(conn: sqlite3.Connection, want: _Want) -> Exception:
    """Why a specific entry could not be taken (called only once ``TAKE_SQL`` missed)."""
    assert want.ip is not None and want.port is not None
    row = conn.execute(
        "SELECT protocol, in_use, owner FROM port_pool_ports WHERE ip = ? AND port = ?",
        (want.ip, want.port),
    ).fetchone()
    where = display(want.ip, want.port)
    if row is None:
        return BadRequest("Port not found in network pool", code="port_not_in_pool")
    if not covers(row[0], want.protocol):
        return BadRequest(
            f"Port protocol mismatch: {where} is {row[0]} in the pool, not {want.protocol}",
            code="port_protocol_mismatch",
        )
    if row[2] is not None:
        return Conflict(f"Port already in use: {where}", code="port_in_use")
    return Conflict(f"Port already in use: {where}", code="port_marked_in_use")


def _take(
    conn: sqlite3.Connection, owner: str, wants: Sequence[_Want], *, replace: bool
) -> list[PoolPort]:
    """Reserve ``wants`` for ``owner`` (after freeing what it holds, for ``replace``).

    Named entries first, then the "any" requests, so an "any" never takes an entry a later
    request of the same call names. Raises (and the savepoint rolls back) on any refusal.
    """
    if replace:
        conn.execute(_FREE_OWNER, (owner,)).fetchall()
    taken: list[PoolPort | None] = [None] * len(wants)
    bits: dict[tuple[str, int], int] = {}
    for index, want in enumerate(wants):
        if not want.specific:
            continue
        assert want.ip is not None and want.port is not None
        key = (want.ip, want.port)
        mask = PROTOCOL_BITS[want.protocol]
        if bits.get(key, 0) & mask:
            raise Conflict(f"Port already in use: {display(*key)}", code="port_requested_twice")
        bits[key] = bits.get(key, 0) | mask
        rows = conn.execute(TAKE_SQL, (owner, want.ip, want.port, want.protocol)).fetchall()
        if not rows:
            raise _refusal(conn, want)
        taken[index] = PoolPort(want.ip, want.port, rows[0][0])
    for index, want in enumerate(wants):
        if want.specific:
            continue
        sql = (
            "SELECT ip, port, protocol FROM port_pool_ports"
            " WHERE in_use = 0 AND (protocol = ? OR protocol = 'both')"
        )
        params: list[Any] = [want.protocol]
        if want.ip is not None:
            sql += " AND ip = ?"
            params.append(want.ip)
        if want.port is not None:
            sql += " AND port = ?"
            params.append(want.port)
        # An exact protocol match first: a tcp request should not use up a "both" entry.
        sql += " ORDER BY protocol = 'both', random() LIMIT 1"
        row = conn.execute(sql, params).fetchone()
        if row is None:
            raise NotFound("No available ports in pool", code="no_free_port")
        conn.execute(_TAKE_FREE, (owner, row[0], row[1]))
        taken[index] = PoolPort(row[0], row[1], row[2])
    return [port for port in taken if port is not None]


def _sorted_ports(rows: Iterable[Sequence[Any]]) -> list[PoolPort]:
    ports = [PoolPort(row[0], row[1], row[2]) for row in rows]
    ports.sort(key=lambda p: (ip_key(p.ip), p.port))
    return ports


def _check_owner(owner: object) -> None:
    """Callers are typed, but a plugin may still hand anything over at run time."""
    if not isinstance(owner, str) or not owner:
        raise ValueError(f"a pool owner is a container's internal_id, not {owner!r}")


class PortPool:
    """The node's port pool: ``PortPoolService`` for containers, and what the routes do.

    Every change is one transaction (shared with concurrent changes, see the module
    docstring); reads go straight to the store.
    """

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self._store = store
        self._clock = clock
        #: Called after a commit that may have changed what ``port_access`` answers:
        #: entries added or removed, reserved, freed, marked (never blocks).
        self.on_change: Callable[[], None] = lambda: None

    # --- running changes ----------------------------------------------------------------

    async def _submit(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` in a store transaction (shared, in its own savepoint)."""
        try:
            return await self._store.write(fn)
        except (StoreError, sqlite3.Error) as exc:
            raise PortPoolError(f"the port pool transaction failed: {exc!r}") from exc

    # --- PortPoolService ----------------------------------------------------------------

    async def reserve(self, owner: str, requests: Sequence[PortRequest]) -> list[PoolPort]:
        """Reserve all of ``requests`` for ``owner`` or none; see ``PortPoolService``.

        Entries ``owner`` holds already count as free for it (a retried create succeeds);
        an "any" request takes an entry nobody holds, preferring an exact protocol match.
        The returned ``PoolPort.protocol`` is the entry's (``both`` for a ``both`` entry
        that serves a tcp request): what to bind is the request's protocol.
        """
        _check_owner(owner)
        wants = [_want(r) for r in requests]
        if not wants:
            return []
        taken = await self._submit(lambda conn: _take(conn, owner, wants, replace=False))
        self.on_change()
        return taken

    async def replace(self, owner: str, requests: Sequence[PortRequest]) -> list[PoolPort]:
        """Make ``requests`` the whole set ``owner`` holds, atomically (rebind).

        Within the transaction ``owner``'s entries are freed first, so it may keep any of
        them and an "any" request may land on one of them again.
        """
        _check_owner(owner)
        wants = [_want(r) for r in requests]
        taken = await self._submit(lambda conn: _take(conn, owner, wants, replace=True))
        self.on_change()
        return taken

    async def release(self, owner: str) -> list[PoolPort]:
        """Free everything ``owner`` holds; returns what was freed, in pool order."""
        _check_owner(owner)
        rows = await self._submit(lambda conn: conn.execute(_FREE_OWNER, (owner,)).fetchall())
        if rows:
            self.on_change()
        return _sorted_ports(rows)

    async def held(self) -> dict[str, list[PoolPort]]:
        """Every owner and its entries, in pool order."""

        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(
                "SELECT owner, ip, port, protocol FROM port_pool_ports"
                " WHERE owner IS NOT NULL ORDER BY owner, ip_key, port"
            ).fetchall()

        held: dict[str, list[PoolPort]] = {}
        for row in await self._store.read(read):
            held.setdefault(row[0], []).append(PoolPort(row[1], row[2], row[3]))
        return held

    # --- what the routes do (arguments already validated) -------------------------------

    async def add(self, ip: str, port: int, protocol: str) -> None:
        """Add one entry; ``409 Port already exists in pool`` if ``(ip, port)`` is in it."""
        row = (ip, port, protocol, ip_key(ip), int(self._clock()))

        def insert(conn: sqlite3.Connection) -> int:
            return conn.execute(_INSERT, row).rowcount

        if not await self._submit(insert):
            raise Conflict("Port already exists in pool", code="port_exists")
        self.on_change()

    async def add_many(self, entries: Iterable[tuple[str, int, str]]) -> int:
        """Add entries, skipping those already in the pool; returns how many were added."""
        now = int(self._clock())
        rows = [(ip, port, protocol, ip_key(ip), now) for ip, port, protocol in entries]

        def insert(conn: sqlite3.Connection) -> int:
            return conn.executemany(_INSERT, rows).rowcount

        added = await self._submit(insert) if rows else 0
        if added:
            self.on_change()
        return added

    async def entries(self, in_use: bool | None = None) -> list[Entry]:
        """The pool in order (address, then port), optionally only used or free entries."""
        sql = f"SELECT {_COLUMNS} FROM port_pool_ports"
        params: tuple[Any, ...] = ()
        if in_use is not None:
            sql += " WHERE in_use = ?"
            params = (int(in_use),)
        sql += " ORDER BY ip_key, port"
        rows = await self._store.read(lambda conn: conn.execute(sql, params).fetchall())
        return [_entry(row) for row in rows]

    async def get(self, ip: str, port: int) -> Entry:
        """One entry, or ``404 Port not found in pool``."""
        row = await self._store.read(
            lambda conn: conn.execute(
                f"SELECT {_COLUMNS} FROM port_pool_ports WHERE ip = ? AND port = ?", (ip, port)
            ).fetchone()
        )
        if row is None:
            raise NotFound("Port not found in pool", code="port_not_found")
        return _entry(row)

    async def random_free(self, protocol: str | None = None) -> Entry:
        """A free entry chosen at random (not reserved), optionally one serving
        ``protocol``; ``404 No available ports in pool`` when there is none."""
        sql = f"SELECT {_COLUMNS} FROM port_pool_ports WHERE in_use = 0"
        params: tuple[Any, ...] = ()
        if protocol is not None:
            sql += " AND (protocol = ? OR protocol = 'both')"
            params = (protocol,)
        sql += " ORDER BY random() LIMIT 1"
        row = await self._store.read(lambda conn: conn.execute(sql, params).fetchone())
        if row is None:
            raise NotFound("No available ports in pool", code="no_free_port")
        return _entry(row)

    async def set_in_use(self, ip: str, port: int, in_use: bool) -> Entry:
        """Mark an entry used or free by hand. Freeing one a container holds is a 409;
        marking it used again changes nothing."""

        def update(conn: sqlite3.Connection) -> Entry:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM port_pool_ports WHERE ip = ? AND port = ?", (ip, port)
            ).fetchone()
            if row is None:
                raise NotFound("Port not found in pool", code="port_not_found")
            entry = _entry(row)
            if entry.owner is not None:
                if not in_use:
                    raise Conflict(f"Port is bound to container {entry.owner}", code="port_bound")
                return entry
            conn.execute(
                "UPDATE port_pool_ports SET in_use = ? WHERE ip = ? AND port = ?",
                (int(in_use), ip, port),
            )
            return attrs.evolve(entry, in_use=in_use)

        entry = await self._submit(update)
        self.on_change()
        return entry

    async def delete(self, ip: str, port: int) -> None:
        """Delete an entry: ``404`` if unknown, ``409`` if a container holds it."""

        def delete(conn: sqlite3.Connection) -> None:
            owner = _owner_of(conn, ip, port)
            if owner is _ABSENT:
                raise NotFound("Port not found in pool", code="port_not_found")
            if owner is not None:
                raise Conflict(f"Port is bound to container {owner}", code="port_bound")
            conn.execute("DELETE FROM port_pool_ports WHERE ip = ? AND port = ?", (ip, port))

        await self._submit(delete)
        self.on_change()

    async def delete_many(self, keys: Iterable[tuple[str, int]]) -> tuple[int, list[Entry]]:
        """Delete entries; unknown ones are ignored and those a container holds are
        skipped. Returns how many were deleted and the skipped entries."""
        unique = list(dict.fromkeys(keys))

        def delete(conn: sqlite3.Connection) -> tuple[int, list[Entry]]:
            deleted, skipped = 0, []
            for ip, port in unique:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM port_pool_ports WHERE ip = ? AND port = ?",
                    (ip, port),
                ).fetchone()
                if row is None:
                    continue
                if row[4] is not None:
                    skipped.append(_entry(row))
                    continue
                conn.execute("DELETE FROM port_pool_ports WHERE ip = ? AND port = ?", (ip, port))
                deleted += 1
            return deleted, skipped

        deleted, skipped = await self._submit(delete) if unique else (0, [])
        if deleted:
            self.on_change()
        return deleted, skipped

    async def port_access(self) -> list[PortAccess]:
        """What ``network.manage_firewall`` asks of the firewall: an entry a container
        holds is open, a free one closed; one marked in use by hand is left to the host
        (no rule: the agent does not know what uses it)."""
        sql = "SELECT ip, port, protocol, owner FROM port_pool_ports WHERE owner IS NOT NULL"
        sql += " OR in_use = 0"
        try:
            rows = await self._store.read(lambda conn: conn.execute(sql).fetchall())
        except (StoreError, sqlite3.Error) as exc:
            raise PortPoolError(f"the port pool could not be read: {exc!r}") from exc
        return [PortAccess(row[0], row[1], row[2], row[3] is not None) for row in rows]


_ABSENT = object()


def _owner_of(conn: sqlite3.Connection, ip: str, port: int) -> object:
    row = conn.execute(
        "SELECT owner FROM port_pool_ports WHERE ip = ? AND port = ?", (ip, port)
    ).fetchone()
    return _ABSENT if row is None else row[0]
