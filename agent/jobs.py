"""The job runner (contract §14): long work that outlives the request that started it.

Why: a 10 GB decompress or a pull run inside an HTTP request dies with a proxy's timeout
or a closed browser tab, half-way and with no progress to show. A job runs instead in the
``Jobs`` service's nursery, itself in the root nursery (no detached task): the request
answers ``202 {"job_id"}`` at once, and the job reports progress, is cancelled on demand,
and cleans up after itself.

Whoever owns a kind of work (pulls, backups, image pulls…) registers its kind with
``register_kind`` and calls ``submit`` with an ``async def run(job: JobContext)``. The
runner owns everything around it:

* **state** ``queued → running → done | failed | cancelled``, kept in memory for reads and
  written through to the store (table ``jobs_records``), so a job answered to a client
  survives a crash;
* **progress** ``job.progress(done, total)`` is free to call often: readers of
  ``GET /jobs/:id`` see it at once, while the store and the ``lightd_job_changed``
  notification get it at most twice a second per job;
* **limits**: at most ``jobs.max_running`` jobs run at once (the rest wait ``queued``), and
  ``submit(limit_key=…, limit=n)`` refuses an (n+1)th active job of a key with
  ``JobLimitReached`` (a 429; routes answer their own message);
* **cleanup**: ``job.on_cleanup(fn)`` callbacks run when the job fails or is cancelled;
  ``job.temp_path(folder)`` names partial output in the job's volume and records it in the
  job's row *before* it exists, so it is removed on failure, on cancellation, and after a
  crash too. Removal goes through ``lightd.files.Root`` on the volume (never a host path),
  and only ever touches names of the file layer's temporary form (``TEMP_PREFIX``), so a
  recorded row can never delete a user's file;
* **restarts**: stopping the agent ends running and queued jobs ``failed`` with
  ``Interrupted by restart`` after their cleanup; jobs a crash left ``running`` or
  ``queued`` in the store end the same way at the next start, with their recorded
  temporary paths removed and the kind's ``interrupted`` callback called;
* **retention**: finished jobs are kept 24 hours, at most 1 000 jobs in all; older ones
  are pruned from memory and store.

A job fails with the message of a ``lightd.AgentError`` it raises (``JobFailed``, an
``ApiError``, a file-layer error: messages meant for clients); anything else is a bug,
logged with its traceback, and the job says only ``Internal error``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import attrs
import trio

from .errors import AgentError, ApiError, Conflict, NotFound, TooManyRequests
from .files import TEMP_PREFIX, FileError, PathNotFound, RelPath, Root, parse
from .interfaces import VOLUMES
from .runtime import Agent, StashKey
from .store import Migration

__all__ = [
    "FINISHED",
    "INTERRUPTED",
    "JOBS",
    "JOB_ID",
    "MIGRATIONS",
    "UNITS",
    "JobBody",
    "JobContext",
    "JobFailed",
    "JobKind",
    "JobLimitReached",
    "JobProgress",
    "JobStarted",
    "JobView",
    "Jobs",
]

log = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed", "cancelled"]
Unit = Literal["bytes", "files", "steps"]

UNITS: tuple[Unit, ...] = ("bytes", "files", "steps")
FINISHED: frozenset[str] = frozenset({"done", "failed", "cancelled"})
INTERRUPTED = "Interrupted by restart"
INTERNAL = "Internal error"
#: A job id: 24 lowercase hex digits (96 random bits).
JOB_ID = re.compile(r"[0-9a-f]{24}", re.ASCII)
#: Finished jobs are kept this long (seconds), and at most ``KEEP_COUNT`` jobs in all.
KEEP_SECONDS = 24 * 3600
KEEP_COUNT = 1000
#: Least time between two progress writes/notifications of one job (twice a second).
NOTIFY_INTERVAL = 0.5
#: Bound on a failed or cancelled job's cleanup, and on a ``cancel`` waiting for it.
CLEANUP_TIMEOUT = 60.0
CANCEL_WAIT = 10.0
#: How often retention runs besides at each submit and finish.
PRUNE_INTERVAL = 600.0


class JobFailed(AgentError):
    """Raised by a job's ``run``: the job fails with this message (shown to clients)."""


class JobLimitReached(TooManyRequests):
    """``submit`` refused: ``limit_key`` already has ``limit`` queued or running jobs.

    A 429; a route usually answers its own message (``Too many pulls in progress``).
    """

    code = "too_many_jobs"

    def __init__(self, key: str, limit: int) -> None:
        super().__init__("Too many jobs in progress")
        self.key = key
        self.limit = limit


class JobProgress(TypedDict):
    done: int
    #: ``None`` while the size of the work is unknown.
    total: int | None
    unit: Unit


class JobStarted(TypedDict):
    """What a route answers (202) when it started a job: its ``result`` is what the
    synchronous form of the route would have answered, if it has one."""

    message: str
    job_id: str


class JobBody(TypedDict):
    """A job as the API shows it (``GET /jobs/:id``, the WebSocket's ``job`` frame)."""

    id: str
    kind: str
    state: State
    progress: JobProgress
    volume_id: str | None
    internal_id: str | None
    created_at: int
    finished_at: int | None
    error: str | None
    #: What the job produced (JSON), once ``done``; its kind says what it holds.
    result: Any


@attrs.frozen
class JobView:
    """A snapshot of one job (what hooks and routes are handed)."""

    id: str
    kind: str
    state: State
    done: int
    total: int | None
    unit: Unit
    volume_id: str | None
    internal_id: str | None
    created_at: int
    started_at: int | None
    finished_at: int | None
    error: str | None
    result: Any

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def to_json(self) -> JobBody:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": {"done": self.done, "total": self.total, "unit": self.unit},
            "volume_id": self.volume_id,
            "internal_id": self.internal_id,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            "error": self.error,
            "result": self.result,
        }


@attrs.frozen
class JobKind:
    """What the runner knows of a kind of job, from its owner's ``register_kind``."""

    name: str
    #: The token permission (contract §12) a temporary token needs to cancel such a job.
    permission: str = "manage"
    #: Called at start for each job of this kind a crash interrupted, after its recorded
    #: temporary paths were removed: for partial output outside any volume.
    interrupted: Callable[[JobView], Awaitable[None]] | None = None


Cleanup = Callable[[], Awaitable[None] | None]
Run = Callable[["JobContext"], Awaitable[None]]


@attrs.define(eq=False)
class _Job:
    """The runner's own mutable record of a job."""

    id: str
    kind: str
    state: State
    unit: Unit
    created_at: int
    done: int = 0
    total: int | None = None
    volume_id: str | None = None
    internal_id: str | None = None
    limit_key: str | None = None
    started_at: int | None = None
    finished_at: int | None = None
    error: str | None = None
    result: Any = None
    #: Recorded temporary paths in the volume (texts of ``RelPath``s).
    temps: list[str] = attrs.Factory(list)
    cleanups: list[Cleanup] = attrs.Factory(list)
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Set once ``run`` has ended: a cancel then comes too late.
    closing: bool = False
    ended: trio.Event = attrs.Factory(trio.Event)
    #: Set when something changed that the flusher should publish.
    wake: trio.Event = attrs.Factory(trio.Event)
    #: Orders the flusher's writes and notifications before the final ones.
    lock: trio.Lock = attrs.Factory(trio.Lock)

    def view(self) -> JobView:
        return JobView(
            id=self.id,
            kind=self.kind,
            state=self.state,
            done=self.done,
            total=self.total,
            unit=self.unit,
            volume_id=self.volume_id,
            internal_id=self.internal_id,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            error=self.error,
            result=self.result,
        )


class JobContext:
    """What a job's ``run`` is handed: report progress, set the result, declare cleanup."""

    def __init__(self, jobs: Jobs, job: _Job) -> None:
        self._jobs = jobs
        self._job = job
        #: What the job produced (JSON-able); shown once the job is ``done``.
        self.result: Any = None

    @property
    def id(self) -> str:
        return self._job.id

    @property
    def kind(self) -> str:
        return self._job.kind

    @property
    def volume_id(self) -> str | None:
        return self._job.volume_id

    @property
    def internal_id(self) -> str | None:
        return self._job.internal_id

    def progress(self, done: int, total: int | None = None) -> None:
        """Report progress (cheap: call it as often as you like). ``total`` ``None`` keeps
        the one known so far."""
        job = self._job
        job.done = int(done)
        if total is not None:
            job.total = int(total)
        job.wake.set()

    def on_cleanup(self, fn: Cleanup) -> None:
        """Run ``fn()`` (sync, or returning an awaitable) if the job fails or is cancelled;
        callbacks run last-registered first. Lost in a crash: for partial output in a
        volume use ``temp_path``, which is recorded."""
        self._job.cleanups.append(fn)

    async def temp_path(self, folder: RelPath | None = None) -> RelPath:
        """A new temporary name in ``folder`` (default the root) of the job's volume, for
        partial output; rename it into place when complete.

        It is recorded in the job's row before this returns, so whatever is at that name
        is removed when the job fails, is cancelled, is interrupted by a stop or a crash,
        or ends with it still there. Needs a job with a ``volume_id``.
        """
        job = self._job
        if job.volume_id is None:
            raise ValueError("temp_path needs a job with a volume_id")
        base = folder if folder is not None else RelPath((), ".")
        rel = base.child(f"{TEMP_PREFIX}job-{job.id[:8]}-{secrets.token_hex(6)}")
        job.temps.append(rel.text)
        await self._jobs._save_temps(job)
        return rel


def _new_id() -> str:
    return secrets.token_hex(12)


def _only_cancelled(exc: BaseException) -> tuple[BaseException | None, BaseException | None]:
    """Split an exception into (its cancellations, the rest)."""
    if isinstance(exc, trio.Cancelled):
        return exc, None
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)
    return None, exc


def _single(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _remove_temps(folder: Path, temps: list[str]) -> None:
    """In a worker thread: remove recorded temporary paths beneath the volume root.

    Only names of the temporary form are touched, through ``Root`` (never following a link
    out; a link planted at the name is removed itself, not what it points to)."""
    try:
        root = Root.open_volume(folder)
    except FileError:
        return
    with root:
        for text in temps:
            try:
                rel = parse(text)
            except FileError:
                log.warning("job cleanup: skipping an invalid recorded path %r", text)
                continue
            if rel.name is None or not rel.name.startswith(TEMP_PREFIX):
                log.warning("job cleanup: skipping %r, not a temporary name", text)
                continue
            try:
                root.remove(rel)
            except PathNotFound:
                pass
            except (FileError, OSError) as exc:
                log.warning("job cleanup: cannot remove %s: %s", text, exc)


class Jobs:
    """The node's jobs: submit, read, cancel; ``serve`` is the service that runs them.

    Plugins reach it as ``agent.stash[lightd.JOBS]`` (set before any other plugin's
    ``lightd_configure``).
    """

    def __init__(self, agent: Agent, *, max_running: int = 4) -> None:
        self._agent = agent
        self._store = agent.store
        self._clock = agent.clock
        self._jobs: dict[str, _Job] = {}
        self._kinds: dict[str, JobKind] = {}
        self._limiter = trio.CapacityLimiter(max_running)
        self._nursery: trio.Nursery | None = None
        self._recovered = False

    # --- kinds -------------------------------------------------------------------------

    def register_kind(
        self,
        kind: str,
        *,
        permission: str = "manage",
        interrupted: Callable[[JobView], Awaitable[None]] | None = None,
    ) -> None:
        """Declare a kind of job (``"volume.pull"``): ``permission`` is what a temporary
        token needs to cancel one; ``interrupted`` see ``JobKind``."""
        if kind in self._kinds:
            raise ValueError(f"job kind {kind!r} is already registered")
        self._kinds[kind] = JobKind(kind, permission, interrupted)

    def kind(self, kind: str) -> JobKind | None:
        return self._kinds.get(kind)

    # --- reading -----------------------------------------------------------------------

    def get(self, job_id: str) -> JobView | None:
        job = self._jobs.get(job_id)
        return None if job is None else job.view()

    def select(
        self, *, volume_id: str | None = None, internal_id: str | None = None
    ) -> list[JobView]:
        """Kept jobs, newest first, optionally of one volume and/or one container."""
        wanted_volume = None if volume_id is None else volume_id.lower()
        jobs = [
            job.view()
            for job in reversed(self._jobs.values())
            if (wanted_volume is None or job.volume_id == wanted_volume)
            and (internal_id is None or job.internal_id == internal_id)
        ]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs

    def active(self, limit_key: str) -> int:
        """Queued or running jobs submitted with ``limit_key``."""
        return sum(
            1 for job in self._jobs.values() if job.limit_key == limit_key and not job.closing
        )

    async def wait(self, job_id: str) -> JobView:
        """Wait until the job has finished (cleanup included); ``KeyError`` if unknown."""
        job = self._jobs[job_id]
        await job.ended.wait()
        return job.view()

    # --- submitting and cancelling -----------------------------------------------------

    async def submit(
        self,
        kind: str,
        run: Run,
        *,
        volume_id: str | None = None,
        internal_id: str | None = None,
        total: int | None = None,
        unit: Unit = "bytes",
        limit_key: str | None = None,
        limit: int | None = None,
    ) -> JobView:
        """Queue ``run`` as a job of ``kind``; returns it once it is recorded in the store.

        ``limit_key``/``limit``: refuse with ``JobLimitReached`` when ``limit`` jobs of
        that key are already queued or running (``"pull:<volume_id>"``, 3).
        """
        if kind not in self._kinds:
            raise ValueError(f"job kind {kind!r} is not registered")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}")
        nursery = self._nursery
        if nursery is None:
            raise RuntimeError("the jobs service is not running")
        # Counted and reserved without an await in between: two concurrent submits can
        # never both take the last place.
        if limit_key is not None and limit is not None and self.active(limit_key) >= limit:
            raise JobLimitReached(limit_key, limit)
        job = _Job(
            id=_new_id(),
            kind=kind,
            state="queued",
            unit=unit,
            created_at=int(self._clock()),
            total=total,
            volume_id=None if volume_id is None else volume_id.lower(),
            internal_id=internal_id,
            limit_key=limit_key,
        )
        self._jobs[job.id] = job
        try:
            await self._store.write(_insert, job)
        except BaseException:
            del self._jobs[job.id]
            raise
        nursery.start_soon(self._run, job, run, name=f"job {kind} {job.id}")
        nursery.start_soon(self._flusher, job, name=f"job {job.id} progress")
        job.wake.set()  # the flusher announces it queued
        await self._prune()
        return job.view()

    async def cancel(self, job_id: str) -> JobView:
        """Cancel a queued or running job and wait (a bounded time) for its cleanup.

        ``NotFound("Job not found")`` for an unknown id, ``Conflict("Job already
        finished")`` once it has ended (or ends on its own meanwhile)."""
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound("Job not found", code="job_not_found")
        if job.closing:
            raise Conflict("Job already finished", code="job_finished")
        job.scope.cancel()
        with trio.move_on_after(CANCEL_WAIT):
            await job.ended.wait()
        if job.state in ("done", "failed"):
            raise Conflict("Job already finished", code="job_finished")
        return job.view()

    # --- the service -------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service: end what a crash interrupted, then run jobs until cancelled.

        Cancelling it (agent stop) ends every queued and running job ``failed`` with
        ``Interrupted by restart``, after its cleanup."""
        if not self._recovered:
            await self._recover()
            self._recovered = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    await trio.sleep(PRUNE_INTERVAL)
                    await self._prune()
            finally:
                self._nursery = None

    async def _run(self, job: _Job, run: Run) -> None:
        ctx = JobContext(self, job)
        state: State
        error: str | None = None
        pending: BaseException | None = None
        try:
            with job.scope:
                async with self._limiter:
                    job.state = "running"
                    job.started_at = int(self._clock())
                    job.wake.set()
                    await run(ctx)
            state = "cancelled" if job.scope.cancelled_caught else "done"
        except BaseException as exc:
            cancelled, rest = _only_cancelled(exc)
            if rest is None:  # cancelled from outside the job: the agent is stopping
                state, error, pending = "failed", INTERRUPTED, exc
            elif isinstance(rest, Exception):
                state, error, pending = "failed", self._message(job, rest), cancelled
            else:  # KeyboardInterrupt, SystemExit: record the failure, then let it go
                state, error, pending = "failed", INTERNAL, exc
        job.closing = True
        result: Any = None
        if state == "done":
            try:
                result = json.loads(json.dumps(ctx.result))
            except (TypeError, ValueError):
                log.exception("job %s (%s) set a result that is not JSON", job.id, job.kind)
                state, error = "failed", INTERNAL
        await self._finish(job, state, error, result)
        if pending is not None:
            raise pending

    def _message(self, job: _Job, exc: BaseException) -> str:
        exc = _single(exc)
        if isinstance(exc, ApiError):
            message = exc.message
        elif isinstance(exc, AgentError):
            message = str(exc)
        else:
            log.error("job %s (%s) crashed", job.id, job.kind, exc_info=exc)
            return INTERNAL
        log.warning("job %s (%s) failed: %s", job.id, job.kind, message)
        return message

    async def _finish(self, job: _Job, state: State, error: str | None, result: Any) -> None:
        """Clean up, record the outcome, notify: shielded, so a stopping agent does too."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(CLEANUP_TIMEOUT) as bound:
                if state != "done":
                    await self._run_cleanups(job)
                await self._clear_temps(job)
            if bound.cancelled_caught:
                log.warning("job %s (%s): cleanup did not finish in time", job.id, job.kind)
            async with job.lock:
                job.state, job.error, job.result = state, error, result
                job.finished_at = int(self._clock())
                job.wake.set()  # the flusher ends
                try:
                    await self._store.write(_update_final, job)
                except AgentError:
                    log.exception("job %s: cannot record its end", job.id)
                job.ended.set()
                view = job.view()
                with trio.move_on_after(CLEANUP_TIMEOUT):
                    await self._notify("job_done", view)
        with trio.CancelScope(shield=True):
            await self._prune()

    async def _run_cleanups(self, job: _Job) -> None:
        for fn in reversed(job.cleanups):
            try:
                outcome = fn()
                if outcome is not None:
                    await outcome
            except Exception:
                log.exception("job %s (%s): a cleanup failed", job.id, job.kind)

    async def _clear_temps(self, job: _Job) -> None:
        if job.temps and job.volume_id is not None:
            await self._remove_in_volume(job.volume_id, list(job.temps))
        job.temps.clear()

    async def _remove_in_volume(self, volume_id: str, temps: list[str]) -> None:
        volumes = self._agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:  # the volume (or the volumes plugin) is gone: nothing to remove
            return
        await trio.to_thread.run_sync(_remove_temps, folder, temps)

    async def _flusher(self, job: _Job) -> None:
        """Publish a job's changes (store + ``lightd_job_changed``) at most every
        ``NOTIFY_INTERVAL``; the final state is published by ``_finish``."""
        while True:
            await job.wake.wait()
            job.wake = trio.Event()
            async with job.lock:
                if job.closing:
                    return
                try:
                    await self._store.write(_update_progress, job)
                except AgentError:
                    log.exception("job %s: cannot record its progress", job.id)
                await self._notify("job_changed", job.view())
            await trio.sleep(NOTIFY_INTERVAL)

    async def _notify(self, hook: Literal["job_changed", "job_done"], view: JobView) -> None:
        """Tell subscribers; a failing subscriber is logged and never fails the job."""
        try:
            if hook == "job_changed":
                await self._agent.hooks.job_changed(self._agent, view)
            else:
                await self._agent.hooks.job_done(self._agent, view)
        except Exception:
            log.exception("a lightd_%s implementation failed", hook)

    async def _save_temps(self, job: _Job) -> None:
        temps = json.dumps(job.temps)
        await self._store.execute("UPDATE jobs_records SET temps = ? WHERE id = ?", (temps, job.id))

    # --- start and retention -----------------------------------------------------------

    async def _recover(self) -> None:
        """Load kept jobs; end those a crash left queued or running (cleanup included)."""
        rows = await self._store.read(
            lambda conn: conn.execute(
                "SELECT * FROM jobs_records ORDER BY created_at, rowid"
            ).fetchall()
        )
        jobs = [_from_row(row) for row in rows]
        now = int(self._clock())
        interrupted = [job for job in jobs if job.state not in FINISHED]
        for job in interrupted:
            try:
                if job.temps and job.volume_id is not None:
                    await self._remove_in_volume(job.volume_id, job.temps)
                kind = self._kinds.get(job.kind)
                if kind is not None and kind.interrupted is not None:
                    await kind.interrupted(job.view())
            except Exception:
                log.exception("job %s (%s): cleanup after the restart failed", job.id, job.kind)
            job.temps = []
            job.state, job.error, job.finished_at = "failed", INTERRUPTED, now
        if interrupted:

            def record(conn: sqlite3.Connection) -> None:
                for job in interrupted:
                    _update_final(conn, job)

            await self._store.write(record)
            log.warning("%d job(s) interrupted by the restart marked failed", len(interrupted))
        for job in jobs:  # every kept job has ended now
            job.closing = True
            job.ended.set()
        self._jobs = {job.id: job for job in jobs}
        await self._prune()

    async def _prune(self) -> None:
        """Drop finished jobs older than ``KEEP_SECONDS``, then the oldest finished ones
        beyond ``KEEP_COUNT`` jobs in all (active jobs are never dropped)."""
        horizon = self._clock() - KEEP_SECONDS
        finished = [job for job in self._jobs.values() if job.state in FINISHED]
        doomed = {job.id for job in finished if (job.finished_at or job.created_at) < horizon}
        excess = len(self._jobs) - len(doomed) - KEEP_COUNT
        if excess > 0:
            survivors = sorted(
                (job for job in finished if job.id not in doomed),
                key=lambda j: (j.created_at, j.finished_at or 0),
            )
            doomed.update(job.id for job in survivors[:excess])
        if not doomed:
            return
        for job_id in doomed:
            del self._jobs[job_id]
        ids = [(job_id,) for job_id in doomed]
        try:
            await self._store.write(
                lambda conn: conn.executemany("DELETE FROM jobs_records WHERE id = ?", ids)
            )
        except AgentError:
            log.exception("cannot prune old jobs")


def _insert(conn: sqlite3.Connection, job: _Job) -> None:
    conn.execute(
        "INSERT INTO jobs_records (id, kind, state, done, total, unit, volume_id, internal_id,"
        " limit_key, created_at, temps) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            job.id,
            job.kind,
            job.state,
            job.done,
            job.total,
            job.unit,
            job.volume_id,
            job.internal_id,
            job.limit_key,
            job.created_at,
            json.dumps(job.temps),
        ),
    )


def _update_progress(conn: sqlite3.Connection, job: _Job) -> None:
    conn.execute(
        "UPDATE jobs_records SET state = ?, started_at = ?, done = ?, total = ?"
        " WHERE id = ? AND finished_at IS NULL",
        (job.state, job.started_at, job.done, job.total, job.id),
    )


def _update_final(conn: sqlite3.Connection, job: _Job) -> None:
    conn.execute(
        "UPDATE jobs_records SET state = ?, started_at = ?, done = ?, total = ?,"
        " finished_at = ?, error = ?, result = ?, temps = ? WHERE id = ?",
        (
            job.state,
            job.started_at,
            job.done,
            job.total,
            job.finished_at,
            job.error,
            None if job.result is None else json.dumps(job.result),
            json.dumps(job.temps),
            job.id,
        ),
    )


def _from_row(row: sqlite3.Row) -> _Job:
    return _Job(
        id=row["id"],
        kind=row["kind"],
        state=cast("State", row["state"]),
        unit=cast("Unit", row["unit"]),
        created_at=row["created_at"],
        done=row["done"],
        total=row["total"],
        volume_id=row["volume_id"],
        internal_id=row["internal_id"],
        limit_key=row["limit_key"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        error=row["error"],
        result=None if row["result"] is None else json.loads(row["result"]),
        temps=list(json.loads(row["temps"] or "[]")),
    )


#: The runner on the agent's stash, set by the core's ``jobs`` plugin before any other
#: plugin's ``lightd_configure`` runs.
JOBS: StashKey[Jobs] = StashKey("jobs")

#: The store schema of the runner (namespace ``jobs``), declared by the ``jobs`` plugin.
MIGRATIONS = (
    Migration(
        "jobs",
        1,
        """
        CREATE TABLE jobs_records (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            state TEXT NOT NULL,
            done INTEGER NOT NULL DEFAULT 0,
            total INTEGER,
            unit TEXT NOT NULL,
            volume_id TEXT,
            internal_id TEXT,
            limit_key TEXT,
            created_at INTEGER NOT NULL,
            started_at INTEGER,
            finished_at INTEGER,
            error TEXT,
            result TEXT,
            temps TEXT NOT NULL DEFAULT '[]'
        );
        CREATE INDEX jobs_records_created ON jobs_records (created_at)
        """,
    ),
)
