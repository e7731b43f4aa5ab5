"""The durable outbox: panel updates waiting in the state store until the panel takes them.

One table, ``remote_sync_outbox``, ordered by ``seq`` (AUTOINCREMENT, so a number is never
reused, even after the newest rows were deleted). The sender works through it strictly in
``seq`` order, so delivered (or rejected) rows are always a prefix of the table: the
sender's progress is one number (its cursor) and acknowledging is one range delete,
``DELETE … WHERE seq <= cursor``, done in batches. Rows stay byte-for-byte what is sent
(the JSON body is built once, at the transition), so a retry or a send after a restart is
the same update with the same ``event_id``.

Every call goes through ``Store`` (one SQLite connection in a worker thread); ``put`` runs
in one immediate transaction, so when it returns the update is committed and survives a
crash of the agent.

Metrics (``register_metrics``): the outbox's depth and the updates' outcomes, read from
the sync state when scraped, so sending costs nothing more.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import attrs
from lightd import Metrics, Migration, Store

if TYPE_CHECKING:
    from .sync import RemoteSync

__all__ = ["MIGRATIONS", "Outbox", "QueuedUpdate", "register_metrics"]

TABLE = "remote_sync_outbox"

MIGRATIONS = (
    Migration(
        "remote_sync",
        1,
        f"""
        CREATE TABLE {TABLE} (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            server TEXT NOT NULL,
            event_id TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )
        """,
    ),
)


@attrs.frozen
class QueuedUpdate:
    """One stored update: its place in the queue, whom it is about, and the body to send."""

    seq: int
    server: str
    event_id: str
    body: str
    created_at: int


@attrs.frozen
class PutResult:
    """What ``put`` did: the new row's ``seq`` and how many undelivered rows it pushed out."""

    seq: int
    dropped: int


class Outbox:
    """The outbox table, through the agent's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def put(
        self,
        server: str,
        event_id: str,
        body: str,
        created_at: int,
        *,
        limit: int,
        delivered_upto: int = 0,
    ) -> PutResult:
        """Append one update and commit; beyond ``limit`` rows the oldest ones are dropped.

        ``delivered_upto`` is the sender's cursor: rows up to it were delivered already, so
        they are deleted first (not counted as dropped) when room is needed.
        """
        return await self._store.write(
            _put, [(server, event_id, body, created_at)], limit, delivered_upto
        )

    async def put_many(
        self,
        updates: Iterable[tuple[str, str, str, int]],
        *,
        limit: int,
        delivered_upto: int = 0,
    ) -> PutResult:
        """``put`` for many ``(server, event_id, body, created_at)`` rows in one transaction."""
        return await self._store.write(_put, list(updates), limit, delivered_upto)

    async def fetch(self, after: int, limit: int) -> list[QueuedUpdate]:
        """The next ``limit`` updates with ``seq > after``, oldest first."""

        def fetch(conn: sqlite3.Connection) -> list[QueuedUpdate]:
            rows = conn.execute(
                f"SELECT seq, server, event_id, body, created_at FROM {TABLE}"
                " WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
            return [QueuedUpdate(*row) for row in rows]

        return await self._store.read(fetch)

    async def delete_upto(self, seq: int) -> int:
        """Forget every update up to ``seq`` (acknowledged or rejected); returns how many."""

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(f"DELETE FROM {TABLE} WHERE seq <= ?", (seq,)).rowcount

        return await self._store.write(delete)

    async def count(self, after: int = 0) -> int:
        """How many updates with ``seq > after`` are stored (the pending ones)."""

        def count(conn: sqlite3.Connection) -> int:
            row = conn.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE seq > ?", (after,)).fetchone()
            return int(row[0])

        return await self._store.read(count)


def _put(
    conn: sqlite3.Connection,
    rows: Sequence[tuple[str, str, str, int]],
    limit: int,
    delivered_upto: int,
) -> PutResult:
    conn.executemany(
        f"INSERT INTO {TABLE} (server, event_id, body, created_at) VALUES (?, ?, ?, ?)", rows
    )
    low, high = conn.execute(f"SELECT MIN(seq), MAX(seq) FROM {TABLE}").fetchone()
    seq = int(high)
    # Fast path: the rows lie in [low, high], so there are at most that many of them.
    if high - low + 1 <= limit:
        return PutResult(seq, 0)
    conn.execute(f"DELETE FROM {TABLE} WHERE seq <= ?", (delivered_upto,))
    total = conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
    excess = total - limit
    if excess <= 0:
        return PutResult(seq, 0)
    conn.execute(
        f"DELETE FROM {TABLE} WHERE seq IN (SELECT seq FROM {TABLE} ORDER BY seq LIMIT ?)",
        (excess,),
    )
    return PutResult(seq, excess)


def register_metrics(metrics: Metrics, sync: RemoteSync) -> None:
    """The outbox's series on the agent's registry, read from ``sync`` at scrape time."""
    metrics.gauge_from(
        "lightd_remote_outbox_depth",
        "Updates waiting in the outbox for the panel (absent until the sender has counted).",
        lambda: sync.pending if sync.pending is None else max(0, sync.pending),
    )

    def outcomes() -> dict[tuple[str, ...], float]:
        status = sync.status
        return {
            ("delivered",): status.delivered,
            ("rejected",): status.rejected,
            ("dropped",): status.dropped,
        }

    metrics.counter_from(
        "lightd_remote_updates",
        "Updates by outcome: delivered to the panel, rejected by it (4xx), or dropped"
        " because the outbox was full.",
        outcomes,
        ("outcome",),
    )
