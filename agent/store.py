"""The state store: one SQLite file under ``storage.base_path``.

Everything that must outlive the agent lives here (temporary tokens now; volumes, the
port pool, containers and the remote outbox later). Each owner of tables declares its
schema as numbered ``Migration``s in its own namespace (``lightd_add_migrations``); the
store applies the missing ones at open, each in its own transaction, and refuses a file
written by a newer agent.

SQLite calls block, so they run in a worker thread. One connection and a limiter of one
token serialise them: SQLite admits one writer anyway, and a single connection means a
transaction can never interleave with another caller's statements. ``write`` runs its
function inside a transaction, so a multi-statement change (reserving a set of ports,
queueing an update) is all-or-nothing and committed before the caller goes on.

**Group commit.** A trip to the worker thread costs more than a small transaction itself,
and under load much more. So concurrent writes share trips: a caller queues its function;
if no batch is being committed, it commits everything queued in one ``BEGIN IMMEDIATE …
COMMIT``, each function inside its own ``SAVEPOINT``; else it waits for that batch to end
(and commits the next one if its function missed it). A function that raises rolls back
to its savepoint alone (its caller gets the exception); the others still commit. If the
COMMIT itself fails, every caller in it gets ``StoreError`` and nothing of it stays. A
caller cancelled while its function is still queued withdraws it; once its function is in
a running transaction, its outcome is awaited (as ``trio.to_thread.run_sync`` does), so a
change is never half-known.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast

import attrs
import trio

from .errors import AgentError

__all__ = ["Migration", "Store", "StoreError", "open_store"]

T = TypeVar("T")
P = ParamSpec("P")

DB_NAME = "lightd.sqlite3"


class StoreError(AgentError):
    """The state store cannot be opened or migrated."""


@attrs.frozen
class Migration:
    """One schema step of one owner; applied once, in ``version`` order, in a transaction."""

    namespace: str
    version: int
    sql: str


#: Most writes one transaction carries (a bound on how long one commit holds the lock).
MAX_BATCH = 256


class _Job(Generic[T]):
    """One queued write: the function to run in the transaction, then its outcome."""

    __slots__ = ("done", "error", "event", "fn", "value")

    def __init__(self, fn: Callable[[sqlite3.Connection], T]) -> None:
        self.fn = fn
        self.done = False
        self.value: T | None = None
        self.error: BaseException | None = None
        self.event: trio.Event | None = None

    def finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        self.done = True
        if self.event is not None:
            self.event.set()

    async def wait(self) -> None:
        if not self.done:
            self.event = trio.Event()
            await self.event.wait()

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        # finished without an error: the worker stored fn's result (which may be None)
        return cast("T", self.value)


class Store:
    """Async access to the SQLite file; see the module docstring for the threading rules."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path
        self._limiter = trio.CapacityLimiter(1)
        self._queue: deque[_Job[Any]] = deque()
        #: Guards ``_queue``: the worker thread takes from it.
        self._queue_lock = threading.Lock()
        #: Set when the batch being committed ends; ``None`` while nobody commits.
        self._batch: trio.Event | None = None

    async def read(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(conn, *args)`` off the event loop, outside any explicit transaction."""
        return await trio.to_thread.run_sync(
            lambda: fn(self._conn, *args, **kwargs), limiter=self._limiter
        )

    async def write(
        self, fn: Callable[Concatenate[sqlite3.Connection, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(conn, *args)`` in a transaction (maybe shared, in a savepoint of its
        own); an exception rolls back its changes and is raised here."""
        job: _Job[T] = _Job(lambda conn: fn(conn, *args, **kwargs))
        with self._queue_lock:
            self._queue.append(job)
        try:
            while not job.done:
                if self._batch is not None:
                    # A batch is being committed: its end wakes every waiter at once (a
                    # lock would hand over to them one scheduler round after another).
                    await self._batch.wait()
                    continue
                # Nobody commits: this caller commits all that is queued, its job too.
                self._batch = trio.Event()
                try:
                    await self._commit_queued()
                finally:
                    batch, self._batch = self._batch, None
                    batch.set()
        except BaseException as exc:
            if self._withdraw(job):
                raise  # it never ran: nothing changed
            # It is in a transaction that has run or is running: report its outcome. A
            # cancellation stays pending and surfaces at the caller's next checkpoint.
            with trio.CancelScope(shield=True):
                await job.wait()
            if not isinstance(exc, trio.Cancelled):
                raise
        return job.result()

    async def execute(self, sql: str, params: Iterable[object] = ()) -> list[sqlite3.Row]:
        """One statement in a transaction; returns its rows."""

        def run(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute(sql, tuple(params)).fetchall()

        return await self.write(run)

    def _withdraw(self, job: _Job[Any]) -> bool:
        with self._queue_lock:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
            return True

    async def _commit_queued(self) -> None:
        """One transaction with what is queued (up to ``MAX_BATCH``); each job finishes."""
        taken: list[_Job[Any]] = []
        try:
            await trio.to_thread.run_sync(self._run_queued, taken, limiter=self._limiter)
        except BaseException as exc:
            if not taken:
                raise  # the transaction never began: the jobs stay queued
            for job in taken:
                failure = StoreError(f"the transaction failed: {exc!r}")
                failure.__cause__ = exc
                job.finish(failure)
            if not isinstance(exc, Exception):
                raise
            return
        for job in taken:
            job.finish()

    def _run_queued(self, taken: list[_Job[Any]]) -> None:
        """In the worker thread: one transaction, each job in its savepoint."""
        conn = self._conn
        with self._queue_lock:
            for _ in range(min(len(self._queue), MAX_BATCH)):
                taken.append(self._queue.popleft())
        conn.execute("BEGIN IMMEDIATE")
        try:
            for job in taken:
                conn.execute("SAVEPOINT lightd_write")
                try:
                    job.value = job.fn(conn)
                except Exception as exc:  # the caller's own failure: raised in its task
                    conn.execute("ROLLBACK TO lightd_write")
                    job.error = exc
                conn.execute("RELEASE lightd_write")
            conn.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself fails (disk full, I/O error): never leave the one
            # connection inside a transaction.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def migrate(self, migrations: Iterable[Migration]) -> dict[str, int]:
        """Apply what is missing (blocking: called from a thread); returns versions now."""
        conn = self._conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (namespace TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        current = dict(conn.execute("SELECT namespace, version FROM schema_migrations").fetchall())
        by_namespace: dict[str, list[Migration]] = {}
        for migration in migrations:
            by_namespace.setdefault(migration.namespace, []).append(migration)
        for namespace, steps in sorted(by_namespace.items()):
            steps.sort(key=lambda m: m.version)
            versions = [m.version for m in steps]
            if versions != list(range(1, len(steps) + 1)):
                raise StoreError(
                    f"migrations of {namespace!r} must be numbered 1..n, got {versions}"
                )
            have = current.get(namespace, 0)
            if have > len(steps):
                raise StoreError(
                    f"{self.path} holds schema {namespace!r} version {have}; this agent knows"
                    f" only up to {len(steps)} (was it written by a newer lightd?)"
                )
            for step in steps[have:]:
                self._apply(step)
                current[namespace] = step.version
        return current

    def _apply(self, step: Migration) -> None:
        if not step.namespace.replace("_", "").isalnum():
            raise StoreError(f"bad migration namespace {step.namespace!r}")
        conn = self._conn
        script = (
            f"BEGIN IMMEDIATE;\n{step.sql.strip().rstrip(';')};\n"
            "INSERT INTO schema_migrations (namespace, version) VALUES"
            f" ('{step.namespace}', {step.version})"
            " ON CONFLICT(namespace) DO UPDATE SET version = excluded.version;\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {step.namespace} v{step.version} failed: {exc}") from exc

    def close(self) -> None:
        self._conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    # WAL + NORMAL: a committed transaction survives an agent crash (SIGKILL); only a
    # power loss can take back the last few commits.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


@asynccontextmanager
async def open_store(base_path: Path, migrations: Iterable[Migration]) -> AsyncIterator[Store]:
    """Open (creating if needed) and migrate the store in ``base_path``; closed on exit."""
    path = base_path / DB_NAME
    steps = list(migrations)

    def open_and_migrate() -> Store:
        try:
            store = Store(_connect(path), path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from exc
        try:
            store.migrate(steps)
        except BaseException:
            store.close()
            raise
        return store

    store = await trio.to_thread.run_sync(open_and_migrate)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close, limiter=store._limiter)
