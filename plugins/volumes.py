"""Built-in plugin ``volumes``: the volume registry and the safe file API (contract §5).

A volume is the folder ``{storage.volumes_path}/{volume_id}`` (UUID v4), the same folder
the containers supervisor bind-mounts. Every file operation goes through
``lightd.files`` (resolved beneath a descriptor of the volume root, never following a
link out of it) and runs in a worker thread on this plugin's own limiters, so the event
loop never waits on a disk.

Hooks:
    ``lightd_add_config_sections`` (section ``volumes``), ``lightd_add_migrations``
    (namespace ``volumes``: table ``volumes_registry``), ``lightd_configure`` (publishes
    the registry as ``agent.stash[VOLUMES]``, the ``VolumeService`` the supervisor and the
    archives plugin use), ``lightd_add_services`` (``volumes-trash``: removes the folders
    of deleted volumes in the background), ``lightd_add_routes``.

Config section ``volumes``:
    ``workers`` (8) threads for quick operations (write, mkdir, list);
    ``long_workers`` (2) threads for copies of whole trees;
    ``fsync_writes`` (false) fsync each written file and its folder before answering.

Routes:
    ``POST /volumes`` (201), ``GET /volumes`` [ext], ``DELETE /volumes/:id`` [ext] (409
    while ``lightd_volume_in_use`` names a container), ``POST /volumes/:id/files``
    (``encoding: base64`` [ext]), ``POST /volumes/:id/folders``, ``POST /volumes/:id/copy``,
    ``GET /volumes/:id/files?path=``; [alias] ``POST /volumes/:id/write`` and
    ``POST /volumes/:id/create-folder``. A copy whose body has ``"async": true`` runs as
    a job (contract §14, kind ``volume.copy``, cancelled with the ``files`` permission):
    ``202 {"message","job_id"}``, progress in bytes copied, the 200 answer as its
    ``result``, the same messages as its ``error``; the copy is staged under the job's
    recorded temporary name and a failed or cancelled one leaves the volume as it was.

The registry lives in the state store and is cached in memory (loaded on first use);
folders named like a volume id found under ``volumes_path`` without a row (volumes made
by the original daemon, whose registry was memory-only) are adopted at that load.
Deletion renames the folder out of the way first, so a volume is either whole and
registered or gone; the renamed tree is removed in the background, and what an
interrupted removal left is removed at the next start.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import stat
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict, TypeVar

import attrs
import trio
from lightd import (
    DISK,
    JOBS,
    VOLUMES,
    Agent,
    BadRequest,
    Conflict,
    ContainersSettings,
    DiskBudget,
    JobContext,
    JobStarted,
    Migration,
    NotFound,
    Service,
    StashKey,
    Store,
    disk_writing,
    field_check,
    hookimpl,
)
from lightd.api import describe, read_json, requires, wants_job
from lightd.files import FileError, Owner, RelPath, Root, parse, rename_noreplace
from quart import Blueprint, request

__all__ = [
    "FILE_WORKERS",
    "REGISTRY",
    "FileWorkers",
    "Volume",
    "VolumeInfo",
    "VolumeRegistry",
    "VolumesConfig",
    "valid_volume_id",
]


log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two looks of a copy job at its worker thread's byte count.
REPORT_INTERVAL = 0.25

_VOLUME_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
_TRASH_PREFIX = ".trash-"


def _workers(value: int) -> bool:
    return 1 <= value <= 64


@attrs.frozen
class VolumesConfig:
    #: Worker threads for quick file operations (write, mkdir, list).
    workers: int = attrs.field(default=8, validator=field_check(_workers, "must be 1 to 64"))
    #: Worker threads for long ones (copies of whole trees); they never take a quick slot.
    long_workers: int = attrs.field(default=2, validator=field_check(_workers, "must be 1 to 64"))
    #: fsync each written file and its folder before answering (slower; power-loss safe).
    fsync_writes: bool = False


class DeleteVolumeQuery(TypedDict, total=False):
    #: What becomes of the volume's backups: ``keep`` (default) or ``delete``.
    backups: str


@attrs.frozen
class Volume:
    volume_id: str
    created_at: int


def valid_volume_id(value: str) -> str | None:
    """The canonical (lowercase) id, or ``None`` for anything that is not a UUID v4."""
    lowered = value.lower()
    return lowered if _VOLUME_ID.fullmatch(lowered) else None


class FileWorkers:
    """The threads file work runs on: dedicated limiters (never trio's shared default),
    one for quick operations and one for long ones, so a big copy cannot starve writes."""

    def __init__(self, quick: int, long: int) -> None:
        self.quick = trio.CapacityLimiter(quick)
        self.long = trio.CapacityLimiter(long)

    async def run(self, fn: Callable[..., T], *args: Any, long: bool = False) -> T:
        """Run ``fn(*args, checkpoint=…)`` in a worker thread. ``checkpoint`` raises
        ``trio.Cancelled`` in the thread once this task is cancelled, so long work stops
        early and cleans up after itself instead of running on unobserved."""
        return await trio.to_thread.run_sync(
            partial(fn, *args, checkpoint=trio.from_thread.check_cancelled),
            limiter=self.long if long else self.quick,
        )


FILE_WORKERS: StashKey[FileWorkers] = StashKey("volumes.file_workers")


class VolumeRegistry:
    """The volumes of this node (implements ``lightd.VolumeService``)."""

    def __init__(self, store: Store, root: Path, clock: Callable[[], float]) -> None:
        self._store = store
        self.root = root
        self._clock = clock
        self._volumes: dict[str, Volume] | None = None
        self._lock = trio.Lock()
        self._delete_lock = trio.Lock()
        #: Names of renamed-aside volume folders for ``serve_trash`` to remove.
        self._trash_send, self._trash_receive = trio.open_memory_channel[str](math.inf)

    async def _loaded(self) -> dict[str, Volume]:
        if self._volumes is None:
            async with self._lock:
                if self._volumes is None:
                    self._volumes = await self._load()
        return self._volumes

    async def _load(self) -> dict[str, Volume]:
        rows = await self._store.read(
            lambda conn: conn.execute(
                "SELECT volume_id, created_at FROM volumes_registry"
            ).fetchall()
        )
        volumes = {r["volume_id"]: Volume(r["volume_id"], r["created_at"]) for r in rows}
        found = await trio.to_thread.run_sync(_scan, self.root)
        adopted = [Volume(vid, created) for vid, created in found if vid not in volumes]
        if adopted:

            def insert(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "INSERT OR IGNORE INTO volumes_registry VALUES (?, ?)",
                    [(v.volume_id, v.created_at) for v in adopted],
                )

            await self._store.write(insert)
            volumes.update((v.volume_id, v) for v in adopted)
            log.info("adopted %d existing volume folder(s) into the registry", len(adopted))
        return volumes

    async def path(self, volume_id: str) -> Path | None:
        """The host folder of a registered volume (what Docker bind-mounts), or ``None``."""
        canonical = valid_volume_id(volume_id)
        if canonical is None or canonical not in await self._loaded():
            return None
        return self.root / canonical

    async def get(self, volume_id: str) -> Volume:
        canonical = valid_volume_id(volume_id)
        volume = (await self._loaded()).get(canonical or "")
        if volume is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return volume

    async def list(self) -> list[Volume]:
        volumes = await self._loaded()
        return sorted(volumes.values(), key=lambda v: (v.created_at, v.volume_id))

    async def create(self) -> Volume:
        volumes = await self._loaded()
        volume = Volume(str(uuid.uuid4()), int(self._clock()))
        folder = self.root / volume.volume_id
        await trio.to_thread.run_sync(_make_volume_folder, folder)
        try:
            await self._store.execute(
                "INSERT INTO volumes_registry VALUES (?, ?)", (volume.volume_id, volume.created_at)
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(folder.rmdir)
            raise
        volumes[volume.volume_id] = volume
        return volume

    async def adopt(self, volume_id: str, folder: Path) -> None:
        """Register ``folder`` (beside the volumes, same file system) as the new volume
        ``volume_id``, moved into place with one rename (``lightd.VolumeService``)."""
        canonical = valid_volume_id(volume_id)
        if canonical is None:
            raise BadRequest("Invalid volume_id", code="invalid_volume_id")
        volumes = await self._loaded()
        if canonical in volumes:
            raise Conflict("Volume already exists", code="volume_exists")
        volume = Volume(canonical, int(self._clock()))
        volumes[canonical] = volume  # taken before the first await
        try:
            moved = await trio.to_thread.run_sync(_adopt_folder, self.root, folder, canonical)
            if not moved:
                raise Conflict("Volume already exists", code="volume_exists")
            try:
                await self._store.execute(
                    "INSERT INTO volumes_registry VALUES (?, ?)", (canonical, volume.created_at)
                )
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_rename_aside, self.root, canonical, folder.name)
                raise
        except BaseException:
            volumes.pop(canonical, None)
            raise

    async def delete(
        self, volume_id: str, in_use: Callable[[str], str | None] = lambda _: None
    ) -> None:
        """Unregister a volume and have its folder removed: the folder is first renamed
        aside (atomic: the volume is whole or gone), then the row deleted; the renamed
        tree is removed by ``serve_trash``, so a big volume does not hold the answer.

        ``in_use(volume_id)`` names a container using the volume (409). It is asked in the
        same step that takes the volume out of the registry, with no await between, so a
        container being created either claimed the volume first (refused here) or finds
        it gone (404 there): never both."""
        async with self._delete_lock:  # a second DELETE of the same volume is a 404
            volume = await self.get(volume_id)
            volumes = await self._loaded()
            user = in_use(volume.volume_id)
            if user is not None:
                raise Conflict(f"Volume is in use by container {user}", code="volume_in_use")
            volumes.pop(volume.volume_id, None)
            trash = f"{_TRASH_PREFIX}{volume.volume_id}-{secrets.token_hex(4)}"
            try:
                moved = await trio.to_thread.run_sync(
                    _rename_aside, self.root, volume.volume_id, trash
                )
                try:
                    await self._store.execute(
                        "DELETE FROM volumes_registry WHERE volume_id = ?", (volume.volume_id,)
                    )
                except BaseException:
                    if moved:
                        with trio.CancelScope(shield=True):
                            await trio.to_thread.run_sync(
                                _rename_aside, self.root, trash, volume.volume_id
                            )
                    raise
            except BaseException:
                volumes[volume.volume_id] = volume
                raise
        if moved:
            self._trash_send.send_nowait(trash)

    async def serve_trash(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Remove the folders of deleted volumes: leftovers of an earlier run first (an
        interrupted removal resumes here), then each new one as it comes."""
        task_status.started()
        for name in await trio.to_thread.run_sync(_trash_names, self.root):
            await self._remove(name)
        async for name in self._trash_receive:
            await self._remove(name)

    async def _remove(self, name: str) -> None:
        # abandon_on_cancel: a shutdown need not wait for a big tree; what is left of it
        # is removed at the next start
        await trio.to_thread.run_sync(_remove_trash, self.root, name, abandon_on_cancel=True)


#: The registry itself, for this plugin's routes (others use ``agent.stash[VOLUMES]``).
REGISTRY: StashKey[VolumeRegistry] = StashKey("volumes.registry")


def _make_volume_folder(folder: Path) -> None:
    folder.mkdir()
    os.chmod(folder, 0o755)  # exact, whatever the umask: the container user must enter it


def _scan(root: Path) -> list[tuple[str, int]]:
    """Volume folders on disk: (id, mtime)."""
    found = []
    with Root.open(root) as volumes_dir, os.scandir(volumes_dir.fd) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False) and _VOLUME_ID.fullmatch(entry.name):
                found.append((entry.name, int(entry.stat(follow_symlinks=False).st_mtime)))
    return found


def _trash_names(root: Path) -> list[str]:
    with Root.open(root) as volumes_dir, os.scandir(volumes_dir.fd) as it:
        return [
            e.name
            for e in it
            if e.name.startswith(_TRASH_PREFIX) and e.is_dir(follow_symlinks=False)
        ]


def _adopt_folder(root: Path, folder: Path, name: str) -> bool:
    """Move ``folder`` (a folder in ``root``) to ``name`` there, never over anything;
    ``False`` when ``name`` exists."""
    if folder.parent != root:
        raise ValueError("a volume can only be adopted from a folder beside the volumes")
    with Root.open(root) as volumes_dir:
        try:
            rename_noreplace(volumes_dir.fd, folder.name, volumes_dir.fd, name)
        except FileExistsError:
            return False
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=volumes_dir.fd)
        try:
            os.fchmod(fd, 0o755)  # as a new volume: the container user must enter it
        finally:
            os.close(fd)
    return True


def _rename_aside(root: Path, name: str, new_name: str) -> bool:
    with Root.open(root) as volumes_dir:
        try:
            os.rename(name, new_name, src_dir_fd=volumes_dir.fd, dst_dir_fd=volumes_dir.fd)
        except FileNotFoundError:
            return False  # the folder was already gone; unregistering is all that is left
    return True


def _remove_trash(root: Path, name: str) -> None:
    with Root.open(root) as volumes_dir:
        try:
            shutil.rmtree(name, dir_fd=volumes_dir.fd)
        except OSError as exc:
            log.error("could not remove the deleted volume folder %s: %s", name, exc)


# --- request bodies ----------------------------------------------------------------------

_ENCODINGS = ("utf-8", "utf8", "base64")


def _is_str(value: object) -> bool:
    return isinstance(value, str)


#: A client path field: any JSON string, judged by ``lightd.files.parse`` with the
#: messages of contract §5, not by the converter's text rule: a NUL there is ``Invalid
#: path: path traversal detected``, and a name that is not UTF-8 (a container can make
#: one) arrives as surrogate escapes and must still address its file.
_PATH = field_check(_is_str, "must be a string")


@attrs.frozen
class WriteBody:
    path: Any = attrs.field(validator=_PATH)
    content: str
    encoding: str = attrs.field(
        default="utf-8",
        validator=field_check(lambda v: v.lower() in _ENCODINGS, "must be utf-8 or base64"),
    )


@attrs.frozen
class LegacyWriteBody:
    """[alias] ``POST /volumes/:id/write``: the original daemon's body."""

    filename: Any = attrs.field(validator=_PATH)
    content: str | None = None


@attrs.frozen
class FolderBody:
    path: Any = attrs.field(validator=_PATH)


@attrs.frozen
class LegacyFolderBody:
    """[alias] ``POST /volumes/:id/create-folder``: ``root`` ``/`` is the volume root."""

    root: Any = attrs.field(validator=_PATH)
    name: Any = attrs.field(validator=_PATH)


@attrs.frozen
class CopyBody:
    source: Any = attrs.field(validator=_PATH)
    destination: Any = attrs.field(validator=_PATH)
    is_folder: Any = None  # [alias] the original's field; the kind is read from the disk


def _size_limit(body: object) -> int:
    """``size_limit`` (bytes) or [alias] ``size`` (MiB) of a ``POST /volumes`` body; 0 =
    none."""
    if not isinstance(body, dict):
        return 0
    if body.get("size_limit") is not None:
        return _whole(body["size_limit"], "size_limit", 1)
    if body.get("size") is not None:
        return _whole(body["size"], "size", 1024 * 1024)
    return 0


def _whole(value: object, field: str, unit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(f"{field}: must be a whole number >= 0", code="invalid_field")
    if value * unit >= 2**63:
        raise BadRequest(f"{field}: too large", code="invalid_field")
    return value * unit


def decode_content(content: str, encoding: str) -> bytes:
    if encoding.lower() == "base64":
        try:
            return base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("content: invalid base64", code="invalid_field") from None
    try:
        return content.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("content: not valid UTF-8 text", code="invalid_field") from None


def legacy_join(root: str, name: str) -> str:
    """The original's ``root``/``name`` pair as one volume path. ``root`` ``/`` (or empty)
    is the volume root; any other absolute ``root`` (``/etc``) is refused like an absolute
    path, never quietly made relative; so is an absolute or ``..`` ``name``."""
    parse(name)
    if root.strip("/") == "":
        return name
    base = parse(root.rstrip("/"))  # "/etc": Invalid path: absolute paths are not allowed
    return f"{base}/{name}"


# --- answers (their types are the OpenAPI document's schemas) ----------------------------


class VolumeInfo(TypedDict):
    """A volume: its id, its folder on the host (what Docker bind-mounts) and when it was
    made (unix seconds)."""

    volume_id: str
    path: str
    created_at: int


class NewVolume(TypedDict, total=False):
    """No body (or ``{}``) for a volume without a size limit. ``size_limit`` [ext]: bytes
    (0 = none, contract §15); ``size`` [alias]: the same in MiB."""

    size_limit: int
    size: int


class NewVolumeUsage(TypedDict):
    bytes: int
    files: int


class NewVolumeInfo(TypedDict, total=False):
    """A new volume made with a limit: as ``GET /volumes/{volume_id}`` shows it, with its
    ``size_limit`` (bytes) and ``usage`` (without one: ``volume_id``, ``path`` and
    ``created_at`` only, as documented)."""

    volume_id: Required[str]
    path: Required[str]
    created_at: Required[int]
    size_limit: int
    usage: NewVolumeUsage


class VolumeList(TypedDict):
    volumes: list[VolumeInfo]


class VolumeMessage(TypedDict):
    message: str


class PathDone(TypedDict):
    """A write or a folder made: ``path`` is the normalised volume-relative path."""

    message: str
    path: str


#: The copy route's body as documented: ``CopyBody``'s fields and ``async`` (a Python
#: keyword, so read apart from the attrs body by ``lightd.api.wants_job``).
CopyRequest = TypedDict(
    "CopyRequest",
    {
        "source": Any,
        "destination": Any,
        "is_folder": NotRequired[Any],
        "async": NotRequired[bool],
    },
)


class Copied(TypedDict):
    message: str
    source: str
    destination: str


class FileEntry(TypedDict):
    """One entry of a folder: ``type`` is ``file``, ``directory`` or ``symlink``; ``size``
    in bytes (0 for folders); [ext] ``modified`` (unix seconds) and ``mode`` (octal,
    e.g. ``"644"``)."""

    name: str
    type: str
    size: int
    modified: int
    mode: str


class FileList(TypedDict):
    """The entries of a folder, folders first then by name."""

    files: list[FileEntry]


class FileListQuery(TypedDict, total=False):
    #: The folder to list, relative to the volume root (default: the root).
    path: str


# --- blocking work (worker threads) --------------------------------------------------------


def _write(
    folder: Path,
    rel: RelPath,
    data: bytes,
    fsync: bool,
    owner: Owner | None,
    budget: DiskBudget,
    *,
    checkpoint: Callable[[], None],
) -> None:
    budget.charge(len(data))  # before a byte is written (the old file is freed after)
    with Root.open_volume(folder, owner=owner) as root:
        try:
            old = root.stat(rel)
        except FileError:
            old = None
        root.write_file(rel, data, fsync=fsync)
    if old is not None and stat.S_ISREG(old.st_mode):
        budget.freed(old.st_size)


def _mkdir(
    folder: Path, rel: RelPath, owner: Owner | None, *, checkpoint: Callable[[], None]
) -> None:
    with Root.open_volume(folder, owner=owner) as root:
        root.make_dirs(rel)


def _source_bytes(root: Root, source: RelPath, checkpoint: Callable[[], None]) -> int:
    """The bytes a copy of ``source`` writes (a walk, stat only)."""
    return sum(
        entry.stat.st_size
        for entry in root.walk(source, checkpoint=checkpoint)
        if entry.kind == "file"
    )


def _copy(
    folder: Path,
    source: RelPath,
    destination: RelPath,
    owner: Owner | None,
    budget: DiskBudget,
    *,
    checkpoint: Callable[[], None],
) -> None:
    with Root.open_volume(folder, owner=owner) as root:
        if budget.limit:  # the whole copy charged before anything is written
            budget.charge(_source_bytes(root, source, checkpoint))
        root.copy(source, destination, checkpoint=checkpoint)


@attrs.define
class _Meter:
    """Bytes copied so far, written by the worker thread, read by the job."""

    done: int = 0
    total: int | None = None

    def add(self, n: int) -> None:
        self.done += n


def _copy_measured(
    folder: Path,
    source: RelPath,
    destination: RelPath,
    owner: Owner | None,
    temp_name: str | None,
    meter: _Meter,
    budget: DiskBudget,
    *,
    checkpoint: Callable[[], None],
) -> None:
    """A copy for a job: the bytes to copy measured first (a walk, stat only), those
    copied counted, the copy built under ``temp_name``; on any failure or cancellation
    the folders made for the destination go too, so the volume is as it was."""
    with Root.open_volume(folder, owner=owner) as root:
        meter.total = _source_bytes(root, source, checkpoint)
        budget.charge(meter.total)
        created = root.make_dirs(destination.parent, report=destination)
        try:
            root.copy(
                source, destination, checkpoint=checkpoint, progress=meter.add, temp_name=temp_name
            )
        except BaseException:
            root.remove_created(created)
            raise
    meter.done = meter.total


async def _report(job: JobContext, meter: _Meter) -> None:
    """Hand the worker thread's count to the job until cancelled."""
    last: tuple[int, int | None] | None = None
    while True:
        now = (meter.done, meter.total)
        if now != last:
            job.progress(*now)
            last = now
        await trio.sleep(REPORT_INTERVAL)


def _list(folder: Path, rel: RelPath, *, checkpoint: Callable[[], None]) -> list[FileEntry]:
    with Root.open_volume(folder) as root:
        return [
            {
                "name": e.name,
                "type": e.kind,
                "size": e.size,
                "modified": e.modified,
                "mode": f"{e.mode & 0o777:o}",
            }
            for e in root.list_dir(rel)
        ]


# --- hooks ---------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"volumes": VolumesConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return [
        Migration(
            "volumes",
            1,
            """
            CREATE TABLE volumes_registry (
                volume_id TEXT PRIMARY KEY,
                created_at INTEGER NOT NULL
            )
            """,
        )
    ]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    config: VolumesConfig = agent.config.section(VolumesConfig)
    registry = VolumeRegistry(agent.store, agent.paths.volumes, agent.clock)
    agent.stash[REGISTRY] = registry
    agent.stash[VOLUMES] = registry
    agent.stash[FILE_WORKERS] = FileWorkers(config.workers, config.long_workers)
    agent.stash[JOBS].register_kind("volume.copy", permission="files")


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("volumes-trash", agent.stash[REGISTRY].serve_trash)]


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    registry = agent.stash[REGISTRY]
    workers = agent.stash[FILE_WORKERS]
    bp = Blueprint("volumes", __name__)

    def view(volume: Volume) -> VolumeInfo:
        return {
            "volume_id": volume.volume_id,
            "path": str(registry.root / volume.volume_id),
            "created_at": volume.created_at,
        }

    async def folder_of(volume_id: str) -> Path:
        volume = await registry.get(volume_id)
        return registry.root / volume.volume_id

    def owner() -> Owner | None:
        """``containers.user``: who owns what these routes create (read per request)."""
        return agent.config.section_or_default(ContainersSettings).owner

    async def write(volume_id: str, text: str, data: bytes) -> PathDone:
        folder = await folder_of(volume_id)
        rel = parse(text)
        fsync = agent.config.section(VolumesConfig).fsync_writes
        async with disk_writing(agent.stash.get(DISK), folder.name) as budget:
            await workers.run(_write, folder, rel, data, fsync, owner(), budget)
        return {"message": "File written successfully", "path": str(rel)}

    async def make_folder(volume_id: str, text: str) -> PathDone:
        folder = await folder_of(volume_id)
        rel = parse(text)
        await workers.run(_mkdir, folder, rel, owner())
        return {"message": "Folder created successfully", "path": str(rel)}

    @bp.post("/volumes")
    @describe(
        "Create a volume",
        description="A new empty folder with a fresh UUID v4 id. No body (or `{}`): the "
        "answer is `volume_id`, `path` and `created_at` only. [ext] `size_limit` (bytes, "
        "0 = none) or [alias] `size` (MiB): the answer also has `size_limit` and `usage`, "
        "as `GET /volumes/{volume_id}` (contract §15).",
        body=NewVolume,
        responses={201: NewVolumeInfo},
        tags=("volumes",),
    )
    async def create_volume() -> tuple[NewVolumeInfo, int]:
        body = await read_json()  # none or {}; a body that is not JSON is still a 400/415
        limit = _size_limit(body)
        disk = agent.stash.get(DISK)
        if limit and disk is None:
            raise BadRequest("size_limit: disk limits are not available", code="invalid_field")
        volume = await registry.create()
        if limit and disk is not None:
            try:
                await disk.set_limit(volume.volume_id, limit)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await registry.delete(volume.volume_id)
                raise
        base = view(volume)
        created: NewVolumeInfo = {
            "volume_id": base["volume_id"],
            "path": base["path"],
            "created_at": base["created_at"],
        }
        if limit:  # asked for a limit: the volume as GET /volumes/:id shows it (§15)
            created["size_limit"] = limit
            created["usage"] = {"bytes": 0, "files": 0}
        agent.events.publish("volume.created", {"volume_id": created["volume_id"]})
        return created, 201

    @bp.get("/volumes")
    @describe("List volumes", tags=("volumes",))
    async def list_volumes() -> VolumeList:
        return {"volumes": [view(v) for v in await registry.list()]}

    @bp.delete("/volumes/<volume_id>")
    @describe(
        "Delete a volume",
        description="Unregisters the volume and removes its folder in the background. "
        "409 while a container uses it. `?backups=keep` (default) keeps the volume's "
        "backups (still listed and downloadable under its id); `?backups=delete` removes "
        "them too. Anything else: 400 `Invalid backups: must be keep or delete`.",
        query=DeleteVolumeQuery,
        errors=(409,),
        tags=("volumes",),
    )
    async def delete_volume(volume_id: str) -> VolumeMessage:
        backups = request.args.get("backups", "keep")
        if backups not in ("keep", "delete"):
            raise BadRequest("Invalid backups: must be keep or delete", code="invalid_field")
        await registry.delete(volume_id, lambda v: agent.hooks.volume_in_use(agent, v))
        await agent.hooks.volume_deleted(agent, volume_id.lower(), backups)
        agent.events.publish("volume.deleted", {"volume_id": volume_id.lower()})
        return {"message": "Volume deleted successfully"}

    @bp.post("/volumes/<volume_id>/files")
    @describe(
        "Write a file",
        description="Creates missing parent folders and replaces an existing file "
        "atomically. `encoding` is `utf-8` (default) or `base64` [ext]. 409 when a folder "
        "is at `path`.",
        body=WriteBody,
        errors=(409,),
        examples={"body": {"path": "server.properties", "content": "motd=Hello\n"}},
        tags=("volumes",),
    )
    @requires("files")
    async def write_file(volume_id: str) -> PathDone:
        await registry.get(volume_id)
        body = await read_json(WriteBody)
        return await write(volume_id, body.path, decode_content(body.content, body.encoding))

    @bp.post("/volumes/<volume_id>/write")
    @describe(
        "Write a file [alias]",
        description="The original daemon's form of `POST /volumes/{volume_id}/files`: "
        "`filename` is the path, `content` UTF-8 text.",
        body=LegacyWriteBody,
        errors=(409,),
        examples={"body": {"filename": "server.properties", "content": "motd=Hello\n"}},
        tags=("volumes",),
    )
    @requires("files")
    async def write_file_alias(volume_id: str) -> PathDone:
        await registry.get(volume_id)
        body = await read_json(LegacyWriteBody)
        return await write(volume_id, body.filename, decode_content(body.content or "", "utf-8"))

    @bp.post("/volumes/<volume_id>/folders")
    @describe(
        "Create a folder",
        description="Like `mkdir -p`; 409 when a file is in the way.",
        body=FolderBody,
        errors=(409,),
        examples={"body": {"path": "plugins/config"}},
        tags=("volumes",),
    )
    @requires("files")
    async def create_folder(volume_id: str) -> PathDone:
        await registry.get(volume_id)
        body = await read_json(FolderBody)
        return await make_folder(volume_id, body.path)

    @bp.post("/volumes/<volume_id>/create-folder")
    @describe(
        "Create a folder [alias]",
        description="The original daemon's form of `POST /volumes/{volume_id}/folders`: "
        "the folder `root/name` (`root` `/` is the volume root).",
        body=LegacyFolderBody,
        errors=(409,),
        examples={"body": {"root": "/", "name": "plugins"}},
        tags=("volumes",),
    )
    @requires("files")
    async def create_folder_alias(volume_id: str) -> PathDone:
        await registry.get(volume_id)
        body = await read_json(LegacyFolderBody)
        return await make_folder(volume_id, legacy_join(body.root, body.name))

    @bp.post("/volumes/<volume_id>/copy")
    @describe(
        "Copy a file or folder",
        description="Links inside a copied folder are copied as links. 404 when the "
        "source is missing, 409 when the destination exists. "
        '[ext] `"async": true`: `202 {"message","job_id"}` and the copy runs as a job '
        "(`volume.copy`, progress in bytes; its `result` is the 200 answer, its `error` "
        "the message of a 404 or 409).",
        body=CopyRequest,
        responses={200: Copied, 202: JobStarted},
        errors=(409,),
        examples={"body": {"source": "world", "destination": "world-copy"}},
        tags=("volumes",),
    )
    @requires("files")
    async def copy(volume_id: str) -> Copied | tuple[JobStarted, int]:
        folder = await folder_of(volume_id)
        body = await read_json(CopyBody)
        as_job = await wants_job()
        source, destination = parse(body.source), parse(body.destination)
        answer: Copied = {
            "message": "Copied successfully",
            "source": str(source),
            "destination": str(destination),
        }
        disk = agent.stash.get(DISK)
        if as_job:
            who = owner()

            async def copy_job(job: JobContext) -> None:
                temp = await job.temp_path(destination.parent)
                meter = _Meter()
                async with (
                    disk_writing(disk, folder.name) as budget,
                    trio.open_nursery() as nursery,
                ):
                    nursery.start_soon(_report, job, meter)
                    await workers.run(
                        _copy_measured,
                        folder,
                        source,
                        destination,
                        who,
                        temp.name,
                        meter,
                        budget,
                        long=True,
                    )
                    nursery.cancel_scope.cancel()
                job.progress(meter.done, meter.total)
                job.result = answer

            view = await agent.stash[JOBS].submit(
                "volume.copy", copy_job, volume_id=volume_id, unit="bytes"
            )
            return {"message": "Copy started", "job_id": view.id}, 202
        async with disk_writing(disk, folder.name) as budget:
            await workers.run(_copy, folder, source, destination, owner(), budget, long=True)
        return answer

    @bp.get("/volumes/<volume_id>/files")
    @describe(
        "List a folder",
        description="404 when the folder is missing, 400 when `path` is a file or invalid.",
        query=FileListQuery,
        tags=("volumes",),
    )
    @requires("files")
    async def list_files(volume_id: str) -> FileList:
        folder = await folder_of(volume_id)
        rel = parse(request.args.get("path", ""), empty_is_root=True)
        return {"files": await workers.run(_list, folder, rel)}

    return [bp]
