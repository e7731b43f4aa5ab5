"""The state store: migrations, transactions, persistence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from lightd.store import Migration, StoreError, open_store

NOTES = [
    Migration("notes", 1, "CREATE TABLE notes_items (id INTEGER PRIMARY KEY, text TEXT NOT NULL)"),
    Migration("notes", 2, "ALTER TABLE notes_items ADD COLUMN n INTEGER NOT NULL DEFAULT 0"),
]


def versions(path: Path) -> dict[str, int]:
    with sqlite3.connect(path / "lightd.sqlite3") as conn:
        return dict(conn.execute("SELECT namespace, version FROM schema_migrations").fetchall())


async def test_migrations_apply_once_in_order(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES[:1]) as store:
        await store.execute("INSERT INTO notes_items (text) VALUES ('a')")
    assert versions(tmp_path) == {"notes": 1}
    async with open_store(tmp_path, NOTES) as store:
        rows = await store.execute("SELECT text, n FROM notes_items")
        assert [tuple(r) for r in rows] == [("a", 0)]
    assert versions(tmp_path) == {"notes": 2}
    async with open_store(tmp_path, NOTES):  # nothing left to apply; no error
        pass


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES):
        pass
    with pytest.raises(StoreError, match="version 2; this agent knows only up to 1"):
        async with open_store(tmp_path, NOTES[:1]):
            pass


async def test_bad_numbering_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"numbered 1\.\.n"):
        async with open_store(tmp_path, [NOTES[1]]):
            pass


async def test_a_failed_migration_leaves_nothing(tmp_path: Path) -> None:
    broken = [Migration("bad", 1, "CREATE TABLE bad_t (x INTEGER); INSERT INTO nowhere VALUES (1)")]
    with pytest.raises(StoreError, match="migration bad v1 failed"):
        async with open_store(tmp_path, broken):
            pass
    with sqlite3.connect(tmp_path / "lightd.sqlite3") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "bad_t" not in tables
    assert "bad" not in versions(tmp_path)


async def test_write_rolls_back_on_error(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES) as store:

        def half(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO notes_items (text) VALUES ('first')")
            raise RuntimeError("stop")

        with pytest.raises(RuntimeError):
            await store.write(half)
        assert await store.execute("SELECT * FROM notes_items") == []


async def test_concurrent_transactions_do_not_interleave(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES) as store:
        await store.execute("INSERT INTO notes_items (id, text, n) VALUES (1, 'counter', 0)")

        def increment(conn: sqlite3.Connection) -> None:
            (n,) = conn.execute("SELECT n FROM notes_items WHERE id = 1").fetchone()
            conn.execute("UPDATE notes_items SET n = ? WHERE id = 1", (n + 1,))

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(store.write, increment)
        rows = await store.read(lambda conn: conn.execute("SELECT n FROM notes_items").fetchall())
        assert rows[0][0] == 50


async def test_store_calls_run_off_the_event_loop(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES) as store:
        main = trio.lowlevel.current_trio_token()

        def where(conn: sqlite3.Connection) -> bool:
            try:
                trio.lowlevel.current_trio_token()
            except RuntimeError:
                return True  # not on the trio thread
            return False

        assert main is not None
        assert await store.read(where)


async def test_a_failed_commit_leaves_no_open_transaction(tmp_path: Path) -> None:
    deferred = [
        Migration(
            "fk",
            1,
            "CREATE TABLE fk_parent (id INTEGER PRIMARY KEY);"
            " CREATE TABLE fk_child (parent INTEGER REFERENCES fk_parent (id)"
            " DEFERRABLE INITIALLY DEFERRED)",
        )
    ]
    async with open_store(tmp_path, deferred) as store:
        # A deferred foreign key is checked at COMMIT, so the COMMIT is what fails.
        with pytest.raises(StoreError) as failed:
            await store.execute("INSERT INTO fk_child VALUES (42)")
        assert isinstance(failed.value.__cause__, sqlite3.IntegrityError)
        await store.execute("INSERT INTO fk_parent VALUES (1)")  # the connection is usable
        assert [tuple(r) for r in await store.execute("SELECT * FROM fk_parent")] == [(1,)]
        assert await store.execute("SELECT * FROM fk_child") == []


async def test_concurrent_writes_share_commits_and_fail_alone(tmp_path: Path) -> None:
    async with open_store(tmp_path, NOTES) as store:
        outcomes: dict[int, str] = {}

        async def one(i: int) -> None:
            def insert(conn: sqlite3.Connection) -> None:
                conn.execute("INSERT INTO notes_items (id, text) VALUES (?, 'x')", (i,))
                if i % 5 == 0:
                    raise ValueError(f"refused {i}")

            try:
                await store.write(insert)
                outcomes[i] = "ok"
            except ValueError as exc:
                outcomes[i] = str(exc)

        async with trio.open_nursery() as nursery:
            for i in range(1, 41):
                nursery.start_soon(one, i)
        rows = await store.execute("SELECT id FROM notes_items ORDER BY id")
        assert [r[0] for r in rows] == [i for i in range(1, 41) if i % 5]
        assert outcomes[5] == "refused 5" and outcomes[6] == "ok"


async def test_a_write_cancelled_while_queued_changes_nothing(tmp_path: Path) -> None:
    import threading

    async with open_store(tmp_path, NOTES) as store:
        entered, release = threading.Event(), threading.Event()

        def block(conn: sqlite3.Connection) -> None:
            entered.set()
            release.wait(10)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.write, block)
                await trio.to_thread.run_sync(entered.wait)
                with trio.CancelScope() as scope:
                    scope.deadline = trio.current_time() + 0.1
                    await store.execute("INSERT INTO notes_items (text) VALUES ('late')")
                assert scope.cancelled_caught
                release.set()
        assert await store.execute("SELECT * FROM notes_items") == []
