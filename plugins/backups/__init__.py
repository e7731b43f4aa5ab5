"""Built-in plugin ``backups``: volume backups as ``tar.zst`` archives (contract §16).

A backup is a job (kind ``volume.backup``, contract §14) that streams the volume → tar →
zstd → a target, computing the archive's sha256 on the way (see ``archive``); a restore
is a job (``volume.restore``) that streams it back into a staging folder and swaps it in
all-or-nothing, and needs every container using the volume offline: from the moment it is
accepted until it ends, the volume is held (a start or restart of a container using it is
refused with ``409 Volume is being restored from a backup``, hook
``lightd_container_starting``). A running server can
be backed up: each file is read once through one descriptor, so the archive is
consistent per file (a file rewritten during the backup is either before or after, or
cut/padded to the size seen when it was reached), not across files.

Targets come from ``lightd_backup_targets``; this plugin declares ``local``
(``storage.backups_path``, default ``<base_path>/backups``) and, when ``backups.s3.bucket``
is set, ``s3``. A finished backup (``done`` or ``failed``) is sent to the panel through
``lightd_panel_update`` (the remote sync outbox) as ``{"event":"backup","volume_id",
"backup_id","status","size","sha256"}`` and published as node event ``backup.done``.
Deleting a volume keeps its backups unless ``?backups=delete`` (``lightd_volume_deleted``).

Hooks: ``lightd_add_config_sections`` (``backups``), ``lightd_add_migrations`` (namespace
``backups``: table ``backups_records``), ``lightd_configure``, ``lightd_backup_targets``,
``lightd_add_services`` (``backups-recover``: marks backups a crash interrupted failed and
removes their partial files and restore staging folders), ``lightd_add_routes``,
``lightd_volume_deleted``, ``lightd_container_starting`` (the restore hold).

Config section ``backups``: ``level`` (3) zstd level, ``threads`` (0: every core, as
``zstd -T0``), ``max_total_bytes`` (1 TiB) and ``max_entries`` (10 000 000) that one
restore may expand to, ``s3`` (``endpoint``, ``bucket``, ``region``, ``access_key``,
``secret_key``, ``prefix``, ``part_size`` 16 MiB, ``timeout`` 120 s).

Routes (permission ``manage``; the two reads ``read``): ``POST /volumes/:id/backups``,
``GET /volumes/:id/backups``, ``GET /volumes/:id/backups/:bid``,
``GET /volumes/:id/backups/:bid/download`` (also ``?token=``), ``POST
/volumes/:id/backups/:bid/restore``, ``DELETE /volumes/:id/backups/:bid``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypedDict

import attrs
import trio
from lightd import (
    JOBS,
    VOLUMES,
    Agent,
    AgentError,
    ApiError,
    BackupTarget,
    BadRequest,
    Conflict,
    ContainersSettings,
    FieldError,
    JobContext,
    Migration,
    NotFound,
    Service,
    StashKey,
    Store,
    field_check,
    hookimpl,
)
from lightd.api import describe, query_token, read_json, requires
from quart import Blueprint, Response

from .archive import (
    Meter,
    remove_staging,
    restore_stage,
    restore_swap,
    sweep_staging,
    write_backup,
)
from .targets import LocalTarget, S3Config, S3Target

__all__ = ["BACKUPS", "Backups", "BackupsConfig", "S3Config"]

log = logging.getLogger(__name__)

#: Seconds between two looks of a job at its worker thread's byte count.
REPORT_INTERVAL = 0.25
MAX_IGNORE = 256
#: A start refused while a restore holds the volume.
RESTORING = "Volume is being restored from a backup"


@attrs.frozen
class BackupsConfig:
    #: zstd level (1-19); 3 is zstd's default.
    level: int = attrs.field(
        default=3, validator=field_check(lambda v: 1 <= v <= 19, "must be 1 to 19")
    )
    #: Compression threads: 0 = one per core (``zstd -T0``).
    threads: int = attrs.field(
        default=0, validator=field_check(lambda v: 0 <= v <= 64, "must be 0 to 64")
    )
    #: Uncompressed bytes and entries one restore may expand to.
    max_total_bytes: int = attrs.field(
        default=1 << 40, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    max_entries: int = attrs.field(
        default=10_000_000, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    s3: S3Config = attrs.Factory(S3Config)


State = Literal["running", "done", "failed"]


class BackupView(TypedDict):
    backup_id: str
    name: str
    target: str
    state: State
    #: Bytes of the archive (0 while running).
    size: int
    #: sha256 (hex) of the archive; null until done.
    sha256: str | None
    created_at: int
    #: Why it failed (``state`` ``failed``), else null. [ext]
    error: str | None
    ignore: list[str]


class BackupList(TypedDict):
    backups: list[BackupView]


class BackupStarted(TypedDict):
    message: str
    backup_id: str
    job_id: str


class RestoreStarted(TypedDict):
    message: str
    job_id: str


class BackupMessage(TypedDict):
    message: str


def _check_ignore(_i: object, _a: object, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, list):
        raise FieldError("ignore", "must be a list of globs")
    if len(value) > MAX_IGNORE:
        raise FieldError("ignore", f"must hold at most {MAX_IGNORE} globs")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or "\x00" in item or len(item) > 1024:
            raise FieldError(f"ignore[{i}]", "must be a non-empty string")


def _check_name(_i: object, _a: object, value: object) -> None:
    if value is not None and (not isinstance(value, str) or len(value) > 200):
        raise FieldError("name", "must be a string of at most 200 characters")


@attrs.frozen
class BackupCreateBody:
    name: Any = attrs.field(default=None, validator=_check_name)
    ignore: Any = attrs.field(default=None, validator=_check_ignore)
    target: str = "local"


@attrs.frozen
class BackupRestoreBody:
    truncate: bool = False


class BackupCreateRequest(TypedDict, total=False):
    name: str
    #: Globs left out: ``*.log`` (a name at any depth), ``logs/*.gz`` (a path).
    ignore: list[str]
    #: ``local`` (default) or another declared target (``s3``).
    target: str


class BackupRestoreRequest(TypedDict, total=False):
    #: Also remove what the backup does not hold (default false: merge over).
    truncate: bool


@attrs.define
class Record:
    backup_id: str
    volume_id: str
    name: str
    target: str
    state: State
    size: int
    sha256: str | None
    created_at: int
    error: str | None
    ignore: list[str]

    def view(self) -> BackupView:
        return {
            "backup_id": self.backup_id,
            "name": self.name,
            "target": self.target,
            "state": self.state,
            "size": self.size,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "error": self.error,
            "ignore": list(self.ignore),
        }


MIGRATIONS = (
    Migration(
        "backups",
        1,
        """
        CREATE TABLE backups_records (
            backup_id TEXT PRIMARY KEY,
            volume_id TEXT NOT NULL,
            name TEXT NOT NULL,
            target TEXT NOT NULL,
            state TEXT NOT NULL,
            size INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT,
            created_at INTEGER NOT NULL,
            error TEXT,
            ignore TEXT NOT NULL DEFAULT '[]'
        );
        CREATE INDEX backups_records_volume ON backups_records (volume_id, created_at)
        """,
    ),
)


def _from_row(row: sqlite3.Row) -> Record:
    return Record(
        backup_id=row["backup_id"],
        volume_id=row["volume_id"],
        name=row["name"],
        target=row["target"],
        state=row["state"],
        size=row["size"],
        sha256=row["sha256"],
        created_at=row["created_at"],
        error=row["error"],
        ignore=list(json.loads(row["ignore"])),
    )


async def _report(job: JobContext, meter: Meter) -> None:
    last: tuple[int, int | None] | None = None
    while True:
        now = (meter.done, meter.total)
        if now != last:
            job.progress(*now)
            last = now
        await trio.sleep(REPORT_INTERVAL)


class Backups:
    """The plugin's state: records, targets, and the backup and restore jobs."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.store: Store = agent.store
        self.config: BackupsConfig = agent.config.section(BackupsConfig)
        self.limiter = trio.CapacityLimiter(2)
        storage = agent.config.storage
        directory = agent.loaded.directory
        self.local_root = (
            (directory / storage.backups_path).resolve()
            if storage.backups_path
            else agent.paths.base / "backups"
        )
        self.local = LocalTarget(self.local_root, self.limiter)
        self.s3 = S3Target(self.config.s3) if self.config.s3.bucket else None
        self.targets: dict[str, BackupTarget] = {}

    # --- records -----------------------------------------------------------------------

    async def records(self, volume_id: str) -> list[Record]:
        rows = await self.store.read(
            lambda conn: conn.execute(
                "SELECT * FROM backups_records WHERE volume_id = ? ORDER BY created_at, rowid",
                (volume_id,),
            ).fetchall()
        )
        return [_from_row(r) for r in rows]

    async def get(self, volume_id: str, backup_id: str) -> Record:
        row = await self.store.read(
            lambda conn: conn.execute(
                "SELECT * FROM backups_records WHERE backup_id = ? AND volume_id = ?",
                (backup_id.lower(), volume_id),
            ).fetchone()
        )
        if row is None:
            raise NotFound("Backup not found", code="backup_not_found")
        return _from_row(row)

    async def _save(self, record: Record) -> None:
        await self.store.execute(
            "INSERT OR REPLACE INTO backups_records (backup_id, volume_id, name, target, state,"
            " size, sha256, created_at, error, ignore) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.backup_id,
                record.volume_id,
                record.name,
                record.target,
                record.state,
                record.size,
                record.sha256,
                record.created_at,
                record.error,
                json.dumps(record.ignore),
            ),
        )

    async def volume_id(self, volume_id: str) -> str:
        """The canonical id of a volume that exists now, or of one that has backups
        (kept after the volume was deleted); else 404 ``Volume not found``."""
        volumes = self.agent.stash.get(VOLUMES)
        if volumes is not None and await volumes.path(volume_id) is not None:
            return volume_id.lower()
        canonical = volume_id.lower()
        row = await self.store.read(
            lambda conn: conn.execute(
                "SELECT 1 FROM backups_records WHERE volume_id = ? LIMIT 1", (canonical,)
            ).fetchone()
        )
        if row is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return canonical

    async def folder(self, volume_id: str) -> Path:
        volumes = self.agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    def target(self, name: str) -> BackupTarget:
        target = self.targets.get(name)
        if target is None:
            raise BadRequest(f"Unknown backup target: {name}", code="unknown_target")
        return target

    # --- backup ------------------------------------------------------------------------

    async def start_backup(
        self, volume_id: str, name: str | None, ignore: list[str], target_name: str
    ) -> tuple[Record, str]:
        folder = await self.folder(volume_id)
        target = self.target(target_name)
        backup_id = str(uuid.uuid4())
        record = Record(
            backup_id=backup_id,
            volume_id=volume_id,
            name=name or backup_id,
            target=target_name,
            state="running",
            size=0,
            sha256=None,
            created_at=int(self.agent.clock()),
            error=None,
            ignore=ignore,
        )
        await self._save(record)

        async def run(job: JobContext) -> None:
            try:
                await self._backup(job, record, folder, target)
            except BaseException as exc:
                with trio.CancelScope(shield=True):
                    record.state = "failed"
                    record.error = _reason(exc)
                    await self._save(record)
                    await self._announce(record)
                raise

        view = await self.agent.stash[JOBS].submit(
            "volume.backup", run, volume_id=volume_id, unit="bytes"
        )
        return record, view.id

    async def _backup(
        self, job: JobContext, record: Record, folder: Path, target: BackupTarget
    ) -> None:
        upload = await target.open_upload(record.volume_id, record.backup_id)
        try:
            write_sync = getattr(upload, "write_sync", None)
            if callable(write_sync):
                sink: Callable[[bytes], None] = write_sync
            else:

                def sink(data: bytes) -> None:
                    trio.from_thread.run(upload.write, data)

            meter = Meter()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_report, job, meter)
                size, sha = await trio.to_thread.run_sync(
                    partial(
                        write_backup,
                        folder,
                        record.ignore,
                        sink,
                        level=self.config.level,
                        threads=-1 if self.config.threads == 0 else self.config.threads,
                        checkpoint=trio.from_thread.check_cancelled,
                        meter=meter,
                    ),
                    limiter=self.limiter,
                )
                nursery.cancel_scope.cancel()
            job.progress(meter.done, meter.done)
            await upload.commit()
        except BaseException:
            with trio.CancelScope(shield=True):
                await upload.abort()
            raise
        record.state, record.size, record.sha256 = "done", size, sha
        await self._save(record)
        job.result = record.view()
        await self._announce(record)

    async def _announce(self, record: Record) -> None:
        """Tell the panel (outbox) and the node event stream that a backup ended."""
        update = {
            "event": "backup",
            "volume_id": record.volume_id,
            "backup_id": record.backup_id,
            "status": record.state,
            "size": record.size,
            "sha256": record.sha256,
        }
        try:
            await self.agent.hooks.panel_update(self.agent, f"volume:{record.volume_id}", update)
        except Exception:
            log.exception("could not queue the backup update for the panel")
        events = getattr(self.agent, "events", None)
        if events is not None:
            events.publish("backup.done", {k: v for k, v in update.items() if k != "event"})

    # --- restore -----------------------------------------------------------------------

    def _check_offline(self, volume_id: str) -> None:
        if self.agent.hooks.volume_running(self.agent, volume_id) is not None:
            raise Conflict("Volume in use by a running container", code="volume_running")

    def restoring(self, volume_id: str) -> bool:
        """Does a restore (queued or running) hold the volume? Its job is submitted with
        this key, so the hold lasts exactly as long as the job, however it ends."""
        return self.agent.stash[JOBS].active(_hold_key(volume_id)) > 0

    async def start_restore(self, volume_id: str, backup_id: str, truncate: bool) -> str:
        folder = await self.folder(volume_id)
        record = await self.get(volume_id, backup_id)
        if record.state != "done":
            raise Conflict("Backup is not complete", code="backup_not_done")
        target = self.target(record.target)
        self._check_offline(volume_id)
        owner = self.agent.config.section_or_default(ContainersSettings).owner

        async def run(job: JobContext) -> None:
            download = await target.open_download(record.volume_id, record.backup_id)
            try:
                meter = Meter(total=download.size)
                read_sync = getattr(download, "read_sync", None)
                if callable(read_sync):
                    read: Callable[[int], bytes] = read_sync
                else:

                    def read(n: int) -> bytes:
                        return trio.from_thread.run(download.read, n)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_report, job, meter)
                    staging = await trio.to_thread.run_sync(
                        partial(
                            restore_stage,
                            folder.parent,
                            folder.name,
                            read,
                            record.sha256,
                            max_total=self.config.max_total_bytes,
                            max_entries=self.config.max_entries,
                            owner=owner,
                            checkpoint=trio.from_thread.check_cancelled,
                            meter=meter,
                        ),
                        limiter=self.limiter,
                    )
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await download.aclose()
            try:
                self._check_offline(volume_id)  # started meanwhile: leave the volume be
            except Conflict:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(remove_staging, folder.parent, staging)
                raise
            with trio.CancelScope(shield=True):  # the swap is quick and all-or-nothing
                await trio.to_thread.run_sync(
                    partial(
                        restore_swap,
                        folder.parent,
                        folder.name,
                        staging,
                        truncate=truncate,
                        checkpoint=lambda: None,
                    ),
                    limiter=self.limiter,
                )
            job.progress(meter.done, meter.done)
            job.result = {"message": "Restore complete", "backup_id": record.backup_id}

        # The job is registered (and so holds the volume) before ``submit`` first awaits:
        # no start can slip in between the check above and the hold.
        view = await self.agent.stash[JOBS].submit(
            "volume.restore",
            run,
            volume_id=volume_id,
            unit="bytes",
            limit_key=_hold_key(volume_id),
        )
        return view.id

    # --- delete ------------------------------------------------------------------------

    async def delete(self, volume_id: str, backup_id: str) -> None:
        record = await self.get(volume_id, backup_id)
        if record.state == "running":
            raise Conflict("Backup in progress", code="backup_running")
        target = self.targets.get(record.target)
        if target is not None:
            await target.delete(record.volume_id, record.backup_id)
        await self.store.execute(
            "DELETE FROM backups_records WHERE backup_id = ?", (record.backup_id,)
        )

    async def delete_all(self, volume_id: str) -> None:
        for record in await self.records(volume_id):
            if record.state == "running":
                continue  # its job fails once the volume is gone, and cleans up
            try:
                await self.delete(volume_id, record.backup_id)
            except Exception:
                log.exception("could not delete backup %s", record.backup_id)

    # --- start -------------------------------------------------------------------------

    async def serve_recover(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Collect the targets (every plugin is configured now), end backups a crash
        left running (``failed``) and remove partial files."""
        self.targets = self.agent.hooks.backup_targets(self.agent)
        await self.store.execute(
            "UPDATE backups_records SET state = 'failed', error = 'Interrupted by restart'"
            " WHERE state = 'running'"
        )
        await trio.to_thread.run_sync(self.local.sweep)
        await trio.to_thread.run_sync(sweep_staging, self.agent.paths.volumes)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            if self.s3 is not None:
                with trio.CancelScope(shield=True):
                    await self.s3.aclose()


def _hold_key(volume_id: str) -> str:
    return f"volume.restore:{volume_id.lower()}"


def _reason(exc: BaseException) -> str:
    """The message the job will fail with (as the runner words it)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.Cancelled):
        return "Cancelled"
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, AgentError):
        return str(exc)
    return "Internal error"


BACKUPS: StashKey[Backups] = StashKey("backups")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"backups": BackupsConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[BACKUPS] = Backups(agent)
    jobs = agent.stash[JOBS]
    jobs.register_kind("volume.backup", permission="manage")
    jobs.register_kind("volume.restore", permission="manage")


@hookimpl
def lightd_container_starting(agent: Agent, internal_id: str, volume_id: str) -> None:
    """A restore holds its volume: no container using it starts until it ends."""
    backups = agent.stash.get(BACKUPS)
    if backups is not None and backups.restoring(volume_id):
        raise Conflict(RESTORING, code="volume_restoring")


@hookimpl
def lightd_backup_targets(agent: Agent) -> Mapping[str, BackupTarget]:
    backups = agent.stash[BACKUPS]
    targets: dict[str, BackupTarget] = {"local": backups.local}
    if backups.s3 is not None:
        targets["s3"] = backups.s3
    return targets


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("backups-recover", agent.stash[BACKUPS].serve_recover)]


@hookimpl
def lightd_volume_deleted(agent: Agent, volume_id: str, backups: str) -> Awaitable[None] | None:
    if backups != "delete":
        return None
    return agent.stash[BACKUPS].delete_all(volume_id.lower())


class _Download:
    """The response body: the archive read from its target, a piece at a time."""

    def __init__(self, download: Any) -> None:
        self._download = download

    def __aiter__(self) -> _Download:
        return self

    async def __anext__(self) -> bytes:
        data = await self._download.read(1 << 20)
        if not data:
            await self._download.aclose()
            raise StopAsyncIteration
        return bytes(data)

    async def aclose(self) -> None:
        await self._download.aclose()


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    backups = agent.stash[BACKUPS]
    bp = Blueprint("backups", __name__)

    @bp.post("/volumes/<volume_id>/backups")
    @describe(
        "Back up a volume",
        description="Starts a job (`volume.backup`, progress in bytes of files read) that "
        "streams the volume as a `tar.zst` to the target (`local` by default; `s3` when "
        "configured), its sha256 computed on the way. Links are stored as links, `ignore` "
        "globs are left out (`*.log`: a name at any depth; `logs/*.gz`: a path). A running "
        "server can be backed up: the archive is consistent per file, not across files. "
        "400 `Unknown backup target: <name>`.",
        body=BackupCreateRequest,
        responses={202: BackupStarted},
        examples={"body": {"name": "before-update", "ignore": ["*.log", "cache"]}},
        tags=("backups",),
    )
    @requires("manage")
    async def create_backup(volume_id: str) -> tuple[BackupStarted, int]:
        await backups.folder(volume_id)
        body = await read_json(BackupCreateBody)
        record, job_id = await backups.start_backup(
            volume_id.lower(), body.name, list(body.ignore or []), body.target
        )
        return {"message": "Backup started", "backup_id": record.backup_id, "job_id": job_id}, 202

    @bp.get("/volumes/<volume_id>/backups")
    @describe(
        "List a volume's backups",
        description="Oldest first. Backups of a deleted volume whose backups were kept "
        "are still listed under its id.",
        tags=("backups",),
    )
    @requires("read")
    async def list_backups(volume_id: str) -> BackupList:
        canonical = await backups.volume_id(volume_id)
        return {"backups": [r.view() for r in await backups.records(canonical)]}

    @bp.get("/volumes/<volume_id>/backups/<backup_id>")
    @describe("One backup", description="404 `Backup not found`.", tags=("backups",))
    @requires("read")
    async def get_backup(volume_id: str, backup_id: str) -> BackupView:
        canonical = await backups.volume_id(volume_id)
        return (await backups.get(canonical, backup_id)).view()

    @bp.get("/volumes/<volume_id>/backups/<backup_id>/download")
    @describe(
        "Download a backup",
        description="The `tar.zst` archive, streamed from its target. 404 `Backup not "
        "found`; 409 `Backup is not complete`. Also accepts a temporary token as "
        "`?token=` without the vendor header (a browser link).",
        responses={200: {"application/zstd": bytes}},
        errors=(409,),
        tags=("backups",),
    )
    @requires("manage")
    @query_token
    async def download_backup(volume_id: str, backup_id: str) -> Response:
        canonical = await backups.volume_id(volume_id)
        record = await backups.get(canonical, backup_id)
        if record.state != "done":
            raise Conflict("Backup is not complete", code="backup_not_done")
        download = await backups.target(record.target).open_download(
            record.volume_id, record.backup_id
        )
        response = Response(_Download(download), status=200, content_type="application/zstd")
        if download.size is not None:
            response.headers["Content-Length"] = str(download.size)
        else:
            response.headers.pop("Content-Length", None)
        response.timeout = None
        response.headers["Content-Disposition"] = (
            f'attachment; filename="backup-{record.backup_id}.tar.zst"'
        )
        response.headers["X-Checksum-Sha256"] = record.sha256 or ""
        response.headers["Cache-Control"] = "no-store"
        return response

    @bp.post("/volumes/<volume_id>/backups/<backup_id>/restore")
    @describe(
        "Restore a backup",
        description="Starts a job (`volume.restore`, progress in bytes of the archive) "
        "that extracts the archive into a staging folder beside the volume, checks its "
        "sha256 and every entry (absolute, `..`, links leaving the volume, devices: "
        "`Invalid archive: <reason>`), then swaps it in: all or nothing, a failed or "
        "cancelled restore leaves the volume as it was. `truncate: true` also removes "
        "what the backup does not hold. 409 `Volume in use by a running container` (and "
        "the job fails so if one starts meanwhile); 409 `Backup is not complete`. Until the "
        "job ends, a start or restart of a container using the volume is refused with 409 "
        "`Volume is being restored from a backup`.",
        body=BackupRestoreRequest,
        responses={202: RestoreStarted},
        errors=(409,),
        tags=("backups",),
    )
    @requires("manage")
    async def restore_backup(volume_id: str, backup_id: str) -> tuple[RestoreStarted, int]:
        await backups.folder(volume_id)
        body = await read_json(BackupRestoreBody)
        job_id = await backups.start_restore(volume_id.lower(), backup_id, body.truncate)
        return {"message": "Restore started", "job_id": job_id}, 202

    @bp.delete("/volumes/<volume_id>/backups/<backup_id>")
    @describe(
        "Delete a backup",
        description="Removes the archive from its target. 404 `Backup not found`; 409 "
        "`Backup in progress`.",
        errors=(409,),
        tags=("backups",),
    )
    @requires("manage")
    async def delete_backup(volume_id: str, backup_id: str) -> BackupMessage:
        canonical = await backups.volume_id(volume_id)
        await backups.delete(canonical, backup_id)
        return {"message": "Backup deleted"}

    return [bp]
