"""The metering tables: hourly usage per server, the servers' cursors, and the generation
of the last stored flush.

``metering_hours`` holds one row per server and hour with usage in raw units (CPU ns,
bytes, byte-seconds) and ``reported`` (1 once the hour was queued for the panel).
``metering_cursors`` holds the last counted sample of each server (``meter.Cursor``).
``metering_state`` holds one number, the generation of the last flush stored, written in
the flush's own transaction, so a query knows which flushes its rows already hold.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from lightd import Migration, Store

from .meter import Cursor, Usage

__all__ = ["MIGRATIONS", "MeteringStore", "Row"]

MIGRATIONS = (
    Migration(
        "metering",
        1,
        """
        CREATE TABLE metering_hours (
            internal_id TEXT NOT NULL,
            hour INTEGER NOT NULL,
            cpu_ns REAL NOT NULL,
            egress_bytes REAL NOT NULL,
            memory_byte_seconds REAL NOT NULL,
            disk_byte_seconds REAL NOT NULL,
            seconds REAL NOT NULL,
            reported INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (internal_id, hour)
        );
        CREATE INDEX metering_hours_hour ON metering_hours (hour);
        CREATE TABLE metering_cursors (
            internal_id TEXT PRIMARY KEY,
            container_id TEXT NOT NULL,
            at REAL NOT NULL,
            cpu_ns INTEGER NOT NULL,
            tx INTEGER NOT NULL
        );
        CREATE TABLE metering_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            generation INTEGER NOT NULL
        );
        INSERT INTO metering_state (id, generation) VALUES (1, 0);
        """,
    ),
)

#: ``(internal_id, hour, usage)``.
Row = tuple[str, int, Usage]

_COLUMNS = "cpu_ns, egress_bytes, memory_byte_seconds, disk_byte_seconds, seconds"


def _usage(row: tuple[float, float, float, float, float]) -> Usage:
    return Usage(*(float(v) for v in row))


class MeteringStore:
    """The metering tables, through the agent's store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def load(self) -> tuple[dict[str, Cursor], int]:
        """Every cursor, and the generation stored."""

        def load(conn: sqlite3.Connection) -> tuple[dict[str, Cursor], int]:
            rows = conn.execute(
                "SELECT internal_id, container_id, at, cpu_ns, tx FROM metering_cursors"
            ).fetchall()
            generation = conn.execute("SELECT generation FROM metering_state").fetchone()[0]
            return {r[0]: Cursor(r[1], float(r[2]), int(r[3]), int(r[4])) for r in rows}, int(
                generation
            )

        return await self._store.read(load)

    async def flush(
        self,
        generation: int,
        usage: Mapping[tuple[str, int], Usage],
        cursors: Mapping[str, Cursor],
    ) -> None:
        """Add ``usage`` to the hours and replace ``cursors``, in one transaction."""

        def flush(conn: sqlite3.Connection) -> None:
            conn.executemany(
                f"INSERT INTO metering_hours (internal_id, hour, {_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (internal_id, hour) DO UPDATE SET"
                " cpu_ns = cpu_ns + excluded.cpu_ns,"
                " egress_bytes = egress_bytes + excluded.egress_bytes,"
                " memory_byte_seconds = memory_byte_seconds + excluded.memory_byte_seconds,"
                " disk_byte_seconds = disk_byte_seconds + excluded.disk_byte_seconds,"
                " seconds = seconds + excluded.seconds",
                [
                    (i, h, u.cpu_ns, u.egress, u.memory, u.disk, u.seconds)
                    for (i, h), u in usage.items()
                ],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO metering_cursors (internal_id, container_id, at,"
                " cpu_ns, tx) VALUES (?, ?, ?, ?, ?)",
                [(i, c.container_id, c.at, c.cpu_ns, c.tx) for i, c in cursors.items()],
            )
            conn.execute("UPDATE metering_state SET generation = ?", (generation,))

        await self._store.write(flush)

    async def hours(self, internal_id: str, lo: int, hi: int) -> tuple[list[Row], int]:
        """The stored hours of ``internal_id`` in ``[lo, hi)``, and the generation stored."""

        def hours(conn: sqlite3.Connection) -> tuple[list[Row], int]:
            rows = conn.execute(
                f"SELECT internal_id, hour, {_COLUMNS} FROM metering_hours"
                " WHERE internal_id = ? AND hour >= ? AND hour < ? ORDER BY hour",
                (internal_id, lo, hi),
            ).fetchall()
            generation = conn.execute("SELECT generation FROM metering_state").fetchone()[0]
            return [(r[0], int(r[1]), _usage(r[2:])) for r in rows], int(generation)

        return await self._store.read(hours)

    async def known(self, internal_id: str) -> bool:
        """Has ``internal_id`` any usage or a cursor stored?"""

        def known(conn: sqlite3.Connection) -> bool:
            return bool(
                conn.execute(
                    "SELECT 1 FROM metering_hours WHERE internal_id = ? UNION ALL"
                    " SELECT 1 FROM metering_cursors WHERE internal_id = ? LIMIT 1",
                    (internal_id, internal_id),
                ).fetchone()
            )

        return await self._store.read(known)

    async def servers(self) -> list[str]:
        """Every server with usage stored."""

        def servers(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT DISTINCT internal_id FROM metering_hours ORDER BY internal_id"
            )
            return [r[0] for r in rows]

        return await self._store.read(servers)

    async def unreported(self, before: int, limit: int) -> list[Row]:
        """Hours that end at or before ``before`` and were not reported, oldest first."""

        def unreported(conn: sqlite3.Connection) -> list[Row]:
            rows = conn.execute(
                f"SELECT internal_id, hour, {_COLUMNS} FROM metering_hours"
                " WHERE reported = 0 AND hour + 3600 <= ? ORDER BY hour, internal_id LIMIT ?",
                (before, limit),
            ).fetchall()
            return [(r[0], int(r[1]), _usage(r[2:])) for r in rows]

        return await self._store.read(unreported)

    async def mark_reported(self, keys: list[tuple[str, int]]) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE metering_hours SET reported = 1 WHERE internal_id = ? AND hour = ?",
                keys,
            )

        await self._store.write(mark)

    async def purge(self, before: int) -> int:
        """Forget the hours that began before ``before``; returns how many."""

        def purge(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM metering_hours WHERE hour < ?", (before,)).rowcount

        return await self._store.write(purge)

    async def forget(self, internal_id: str) -> None:
        """A deleted server's cursor goes (its hours stay until the retention ends)."""

        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM metering_cursors WHERE internal_id = ?", (internal_id,))

        await self._store.write(forget)
