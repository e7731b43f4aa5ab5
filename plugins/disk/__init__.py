"""Built-in plugin ``disk``: volume usage and size limits (contract §15).

One place keeps the accounting: ``DiskAccounting``, published as ``agent.stash[DISK]``
(the ``lightd.DiskService`` interface), which every API write path asks before it writes
(``writing(volume_id)`` → a budget its worker thread ``charge``\\ s before each write: the
volumes, file manager and archives plugins, and backups restore), which
``GET /volumes/:id`` reads, and which the stats frames read (``disk_bytes``).

Two modes, chosen at start for ``storage.volumes_path``:

* **kernel**: the file system enforces project quotas (XFS ``prjquota``; ext4 with the
  ``project,quota`` features mounted ``prjquota``) and ``disk.kernel_quotas`` is on. A
  volume with a limit gets a project id of its own (persisted) set on its folder with the
  inherit flag, and a hard block limit (``quota.ProjectQuota``): the kernel refuses the
  container's own writes beyond it, and the usage of a limited volume is read from the
  quota (one syscall). API writes are still checked before they write.
* **accounting** (anywhere else): each volume's usage is measured by a walk in a worker
  thread (when first asked, then for limited volumes every ``disk.check_interval``, for
  others when asked and older than that, in the background) and adjusted in between by the
  bytes the API's own writes commit; a write that would take the volume over its limit is
  refused with ``409 Disk quota exceeded`` and leaves nothing. A running container whose
  volume is over its limit gets ``daemon_message`` ``Disk quota exceeded: stopping in
  <n>s`` and, still over after ``disk.grace`` seconds (measured again then), is stopped.

In both modes a start (or restart) while the volume is over its limit is refused with
``409 Disk quota exceeded`` (hook ``lightd_container_starting``).

Hooks: ``lightd_add_config_sections`` (section ``disk``), ``lightd_add_migrations``
(namespace ``disk``: table ``disk_limits``), ``lightd_configure``, ``lightd_add_services``
(``disk``: loads the limits, measures, enforces), ``lightd_add_routes``,
``lightd_container_starting``, ``lightd_volume_deleted``.

Config section ``disk``: ``check_interval`` (60 s), ``grace`` (30 s),
``kernel_quotas`` (true: use project quotas where the file system enforces them),
``first_project_id`` (1 000 000: project ids given to volumes count up from it; keep it
clear of ids used by other tools on the same file system).

Routes: ``PATCH /volumes/:id {"size_limit"}`` → the volume as ``GET /volumes/:id``;
[alias] ``GET /volumes/:id/quota`` and ``POST /volumes/:id/resize {"size": MiB}``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

import attrs
import trio
from lightd import (
    CONTAINER_SERVICE,
    DISK,
    VOLUMES,
    Agent,
    BadRequest,
    Conflict,
    DiskUsage,
    Migration,
    NotFound,
    Service,
    StashKey,
    field_check,
    hookimpl,
)
from lightd.api import describe, read_json, requires
from lightd.files import NoSpace, QuotaExceeded, Root
from quart import Blueprint

from .quota import ProjectQuota

__all__ = ["DiskAccounting", "DiskConfig", "QuotaView", "VolumeDetail", "parse_limit"]

log = logging.getLogger(__name__)

MIB = 1024 * 1024
QUOTA_MESSAGE = "Disk quota exceeded"


@attrs.frozen
class DiskConfig:
    #: Seconds between two measures of a limited volume's usage (accounting mode).
    check_interval: float = attrs.field(
        default=60.0, validator=field_check(lambda v: v >= 0.1, "must be >= 0.1")
    )
    #: Seconds a running server over its limit is given before it is stopped.
    grace: float = attrs.field(
        default=30.0, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    #: Use the file system's project quotas when it enforces them.
    kernel_quotas: bool = True
    #: The first project id given to a volume (kernel mode).
    first_project_id: int = attrs.field(
        default=1_000_000,
        validator=field_check(lambda v: 1 <= v < 2**31, "must be 1 to 2147483647"),
    )


def parse_limit(value: object, field: str, unit: int = 1) -> int:
    """A limit from a body: a whole number >= 0 (``unit`` bytes each), else a 400."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field}: must be a whole number >= 0", code="invalid_field")
    if value * unit >= 2**63:
        raise BadRequest(f"{field}: too large", code="invalid_field")
    return value * unit


# --- the accounting -------------------------------------------------------------------------


class _Account:
    """What is known of one volume's usage. ``bytes``/``files`` come from the last measure
    (a walk, or the quota); ``adjust`` is the net bytes API writes committed since it
    began; ``pending`` the bytes charged by writes still in flight. Guarded by ``lock``
    (worker threads charge)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes = 0
        self.files = 0
        self.adjust = 0
        self.pending = 0
        self.measured_at: float | None = None
        self.measuring: trio.Event | None = None
        self.dirty = False

    @property
    def used(self) -> int:
        return self.bytes + self.adjust


class _Budget:
    """One write's charges (``lightd.DiskBudget``)."""

    def __init__(self, account: _Account, limit: int) -> None:
        self.account = account
        self.limit = limit
        self.charged = 0
        self.released = 0

    def charge(self, n: int) -> None:
        if n <= 0:
            return
        account = self.account
        with account.lock:
            if self.limit and account.used + account.pending + n > self.limit:
                raise QuotaExceeded()
            account.pending += n
            self.charged += n

    def freed(self, n: int) -> None:
        with self.account.lock:
            self.released += max(n, 0)

    def end(self, committed: bool) -> None:
        with self.account.lock:
            self.account.pending -= self.charged
            if committed:
                self.account.adjust += self.charged - self.released


def _walk(folder: Path, *, checkpoint: Any) -> tuple[int, int]:
    with Root.open_volume(folder) as root:
        used = root.usage(checkpoint=checkpoint)
    return used.bytes, used.files


class DiskAccounting:
    """Usage and limits of every volume (implements ``lightd.DiskService``)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.root = agent.paths.volumes
        #: volume_id → (size_limit, project id); loaded by ``serve`` before the API listens.
        self.limits: dict[str, tuple[int, int]] = {}
        self._accounts: dict[str, _Account] = {}
        self._loaded = trio.Event()
        self._walkers = trio.CapacityLimiter(2)
        self._kick = trio.Event()
        #: Kernel project quotas, when the volumes' file system enforces them.
        self.quota: ProjectQuota | None = None
        #: volume_id → when its running servers are stopped (accounting mode).
        self.deadlines: dict[str, float] = {}
        self._requests_send, self._requests = trio.open_memory_channel[str](math.inf)

    @property
    def config(self) -> DiskConfig:
        return self.agent.config.section(DiskConfig)

    @property
    def mode(self) -> str:
        return "kernel" if self.quota is not None else "accounting"

    def _account(self, volume_id: str) -> _Account:
        account = self._accounts.get(volume_id)
        if account is None:
            account = self._accounts[volume_id] = _Account()
        return account

    def _project(self, volume_id: str) -> int | None:
        entry = self.limits.get(volume_id)
        return entry[1] if entry is not None and self.quota is not None else None

    async def _folder(self, volume_id: str) -> Path:
        volumes = self.agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    # -- the interface ----------------------------------------------------------------------

    def limit(self, volume_id: str) -> int:
        entry = self.limits.get(volume_id.lower())
        return 0 if entry is None else entry[0]

    def cached_bytes(self, volume_id: str) -> int | None:
        account = self._accounts.get(volume_id.lower())
        if account is None or account.measured_at is None:
            return None
        return account.used

    async def usage(self, volume_id: str) -> DiskUsage:
        volume_id = volume_id.lower()
        account = await self._measured(volume_id)
        if self._project(volume_id) is None and self._stale(account):
            self.stale(volume_id)
        with account.lock:
            return DiskUsage(account.used, account.files, self.limit(volume_id))

    def over(self, volume_id: str) -> bool:
        """Whether the volume's usage, as last known, exceeds its limit."""
        limit = self.limit(volume_id)
        used = self.cached_bytes(volume_id)
        return bool(limit) and used is not None and used > limit

    def stale(self, volume_id: str) -> None:
        """The volume changed in a way no budget counted (files deleted): measure it
        again soon, in the background."""
        account = self._accounts.get(volume_id.lower())
        if account is not None and not account.dirty:
            account.dirty = True
            self._requests_send.send_nowait(volume_id.lower())

    async def set_limit(self, volume_id: str, size_limit: int) -> None:
        volume_id = volume_id.lower()
        folder = await self._folder(volume_id)
        entry = self.limits.get(volume_id)
        if entry is None:
            project = max(
                (p for _, p in self.limits.values()), default=self.config.first_project_id - 1
            )
            project = max(project + 1, self.config.first_project_id)
        else:
            project = entry[1]
        if self.quota is not None:
            quota = self.quota
            if entry is None:
                await trio.to_thread.run_sync(
                    lambda: quota.assign(folder, project), limiter=self._walkers
                )
            await trio.to_thread.run_sync(quota.set_limit, project, size_limit)
        await self.agent.store.execute(
            "INSERT INTO disk_limits (volume_id, size_limit, project_id) VALUES (?, ?, ?) "
            "ON CONFLICT(volume_id) DO UPDATE SET size_limit = excluded.size_limit",
            (volume_id, size_limit, project),
        )
        self.limits[volume_id] = (size_limit, project)
        self._kick.set()  # the service looks at it now (a lowered limit may be exceeded)

    @contextlib.asynccontextmanager
    async def writing(self, volume_id: str) -> AsyncIterator[_Budget]:
        volume_id = volume_id.lower()
        limit = self.limit(volume_id)
        account = await self._measured(volume_id) if limit else self._account(volume_id)
        budget = _Budget(account, limit)
        try:
            yield budget
        except BaseException as exc:
            budget.end(committed=False)
            if isinstance(exc, NoSpace) and limit:
                raise QuotaExceeded() from None
            raise
        budget.end(committed=True)

    async def prepare(self, volume_id: str, folder: Path) -> None:
        project = self._project(volume_id.lower())
        if project is not None and self.quota is not None:
            quota = self.quota
            await trio.to_thread.run_sync(
                lambda: quota.assign(folder, project), limiter=self._walkers
            )

    async def refresh(self, volume_id: str) -> None:
        await self._measure(volume_id.lower())

    async def forget(self, volume_id: str) -> None:
        """The volume was deleted: its limit, project and account go."""
        volume_id = volume_id.lower()
        entry = self.limits.pop(volume_id, None)
        self._accounts.pop(volume_id, None)
        self.deadlines.pop(volume_id, None)
        if entry is None:
            return
        if self.quota is not None:
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(self.quota.set_limit, entry[1], 0)
        await self.agent.store.execute("DELETE FROM disk_limits WHERE volume_id = ?", (volume_id,))

    # -- measuring --------------------------------------------------------------------------

    def _stale(self, account: _Account) -> bool:
        return (
            account.measured_at is None
            or trio.current_time() - account.measured_at > self.config.check_interval
        )

    async def _measured(self, volume_id: str) -> _Account:
        """The account, measured at least once (kernel mode: read just now)."""
        account = self._account(volume_id)
        if self._project(volume_id) is not None or account.measured_at is None:
            await self._measure(volume_id)
        return account

    async def _measure(self, volume_id: str) -> None:
        account = self._account(volume_id)
        if account.measuring is not None:  # one walk at a time per volume: share it
            await account.measuring.wait()
            return
        account.measuring = done = trio.Event()
        try:
            project = self._project(volume_id)
            with account.lock:
                account.dirty = False
                before = account.adjust
            if project is not None and self.quota is not None:
                used, files = await trio.to_thread.run_sync(self.quota.usage, project)
            else:
                folder = await self._folder(volume_id)
                used, files = await trio.to_thread.run_sync(
                    lambda: _walk(folder, checkpoint=trio.from_thread.check_cancelled),
                    limiter=self._walkers,
                )
            with account.lock:
                account.bytes, account.files = used, files
                account.adjust -= before  # writes committed while it walked stay counted
                account.measured_at = trio.current_time()
        finally:
            account.measuring = None
            done.set()

    # -- the service ------------------------------------------------------------------------

    async def load(self) -> None:
        rows = await self.agent.store.read(
            lambda conn: conn.execute(
                "SELECT volume_id, size_limit, project_id FROM disk_limits"
            ).fetchall()
        )
        self.limits = {r["volume_id"]: (r["size_limit"], r["project_id"]) for r in rows}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.load()
        if self.config.kernel_quotas:
            self.quota = await trio.to_thread.run_sync(ProjectQuota.probe, self.root)
            if self.quota is not None:
                for size_limit, project in self.limits.values():
                    with contextlib.suppress(OSError):
                        await trio.to_thread.run_sync(self.quota.set_limit, project, size_limit)
        log.info("disk limits: %s mode", self.mode)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._serve_requests)
                await self._watch()
        finally:
            if self.quota is not None:
                self.quota.close()

    async def _serve_requests(self) -> None:
        async for volume_id in self._requests:
            try:
                await self._measure(volume_id)
            except (NotFound, OSError) as exc:
                log.info("could not measure volume %s: %s", volume_id, exc)

    async def _watch(self) -> None:
        """Measure limited volumes every ``check_interval``; warn and stop the servers of
        a volume over its limit (accounting mode)."""
        next_check = trio.current_time()
        while True:
            now = trio.current_time()
            if now >= next_check or self._kick.is_set():
                self._kick = trio.Event()
                for volume_id in [v for v, (limit, _) in self.limits.items() if limit]:
                    try:
                        await self._measure(volume_id)
                    except (NotFound, OSError) as exc:
                        log.info("could not measure volume %s: %s", volume_id, exc)
                next_check = trio.current_time() + self.config.check_interval
            await self._enforce()
            wake = min([next_check, *self.deadlines.values()])
            with trio.move_on_at(wake):
                await self._kick.wait()

    async def _enforce(self) -> None:
        containers = self.agent.stash.get(CONTAINER_SERVICE)
        if containers is None:
            return
        grace = self.config.grace
        for volume_id in list(self.limits):
            running = [iid for iid, state in containers.on_volume(volume_id) if state in _RUNNING]
            if self._project(volume_id) is not None or not running or not self.over(volume_id):
                self.deadlines.pop(volume_id, None)
                continue
            deadline = self.deadlines.get(volume_id)
            now = trio.current_time()
            if deadline is None:
                self.deadlines[volume_id] = now + grace
                for iid in running:
                    log.warning("%s: volume over its limit; stopping in %gs", iid, grace)
                    containers.daemon_message(
                        iid, f"{QUOTA_MESSAGE}: stopping in {math.ceil(grace)}s"
                    )
            elif now >= deadline:
                await self._measure(volume_id)  # files may have been deleted meanwhile
                del self.deadlines[volume_id]
                if self.over(volume_id):
                    for iid in running:
                        log.warning("%s: volume still over its limit: stopping", iid)
                        containers.daemon_message(iid, f"{QUOTA_MESSAGE}: stopping")
                        containers.request_stop(iid)


_RUNNING = frozenset({"starting", "running"})

DISK_ACCOUNTING: StashKey[DiskAccounting] = StashKey("disk.accounting")


# --- answers -------------------------------------------------------------------------------


class VolumeUsage(TypedDict):
    bytes: int
    files: int


class VolumeDetail(TypedDict):
    """A volume as ``GET /volumes/:id`` shows it: ``size_limit`` in bytes (0 = none)."""

    volume_id: str
    path: str
    created_at: int
    size_limit: int
    usage: VolumeUsage


@attrs.frozen
class LimitBody:
    #: Bytes; 0 = no limit.
    size_limit: Any


@attrs.frozen
class ResizeBody:
    #: MiB; 0 = no limit.
    size: Any


class QuotaView(TypedDict):
    """[alias] The original daemon's quota figures, in MiB (``size_mb`` 0: no limit)."""

    size_mb: int
    used_mb: float
    available_mb: float
    percentage_used: float


# --- hooks ---------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"disk": DiskConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return [
        Migration(
            "disk",
            1,
            """
            CREATE TABLE disk_limits (
                volume_id TEXT PRIMARY KEY,
                size_limit INTEGER NOT NULL,
                project_id INTEGER NOT NULL UNIQUE
            )
            """,
        )
    ]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    accounting = DiskAccounting(agent)
    agent.stash[DISK_ACCOUNTING] = accounting
    agent.stash[DISK] = accounting


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("disk", agent.stash[DISK_ACCOUNTING].serve)]


@hookimpl
def lightd_container_starting(agent: Agent, internal_id: str, volume_id: str) -> None:
    accounting = agent.stash.get(DISK_ACCOUNTING)
    if accounting is None:
        return
    used = accounting.cached_bytes(volume_id)
    project = accounting._project(volume_id.lower())
    if project is not None and accounting.quota is not None:
        with contextlib.suppress(OSError):
            used = accounting.quota.usage(project)[0]  # one syscall: the kernel's figure
    limit = accounting.limit(volume_id)
    if limit and used is not None and used > limit:
        raise Conflict(QUOTA_MESSAGE, code="disk_quota_exceeded")


@hookimpl
def lightd_volume_deleted(agent: Agent, volume_id: str) -> Any:
    accounting = agent.stash.get(DISK_ACCOUNTING)
    return None if accounting is None else accounting.forget(volume_id)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    accounting = agent.stash[DISK_ACCOUNTING]
    bp = Blueprint("disk", __name__)

    async def detail(volume_id: str) -> VolumeDetail:
        volumes = agent.stash.get(VOLUMES)
        if volumes is None:
            raise NotFound("Volume not found", code="volume_not_found")
        volume = await volumes.get(volume_id)
        folder = await volumes.path(volume.volume_id)
        used = await accounting.usage(volume.volume_id)
        return {
            "volume_id": volume.volume_id,
            "path": str(folder),
            "created_at": volume.created_at,
            "size_limit": used.size_limit,
            "usage": {"bytes": used.bytes, "files": used.files},
        }

    @bp.patch("/volumes/<volume_id>")
    @describe(
        "Change a volume's size limit",
        description="`size_limit` in bytes, 0 = none (contract §15). Answers the volume as "
        "`GET /volumes/{volume_id}` does. A limit below the current usage is accepted: "
        "writes through the API are refused and a running server is warned and stopped "
        "after `disk.grace` (or, under kernel quotas, the kernel refuses its writes).",
        body=LimitBody,
        examples={"body": {"size_limit": 10737418240}},
        tags=("volumes",),
    )
    async def patch_volume(volume_id: str) -> VolumeDetail:
        body = await read_json(LimitBody)
        volume = await agent.stash[VOLUMES].get(volume_id)
        await accounting.set_limit(volume.volume_id, parse_limit(body.size_limit, "size_limit"))
        return await detail(volume.volume_id)

    @bp.post("/volumes/<volume_id>/resize")
    @describe(
        "Change a volume's size limit [alias]",
        description="The original daemon's form of `PATCH /volumes/{volume_id}`: `size` in "
        "MiB (0 = none).",
        body=ResizeBody,
        examples={"body": {"size": 10240}},
        tags=("volumes",),
    )
    async def resize_volume(volume_id: str) -> VolumeDetail:
        body = await read_json(ResizeBody)
        volume = await agent.stash[VOLUMES].get(volume_id)
        await accounting.set_limit(volume.volume_id, parse_limit(body.size, "size", MIB))
        return await detail(volume.volume_id)

    @bp.get("/volumes/<volume_id>/quota")
    @describe(
        "Show a volume's quota [alias]",
        description="The original daemon's figures in MiB: `size_mb` the limit (0: none), "
        "`used_mb`, `available_mb` (what is left under the limit; 0 without one) and "
        "`percentage_used` (of the limit; 0 without one).",
        tags=("volumes",),
    )
    @requires("read")
    async def quota(volume_id: str) -> QuotaView:
        volume = await agent.stash[VOLUMES].get(volume_id)
        used = await accounting.usage(volume.volume_id)
        limit = used.size_limit
        return {
            "size_mb": limit // MIB,
            "used_mb": round(used.bytes / MIB, 2),
            "available_mb": round(max(limit - used.bytes, 0) / MIB, 2) if limit else 0.0,
            "percentage_used": round(used.bytes / limit * 100, 2) if limit else 0.0,
        }

    return [bp]
