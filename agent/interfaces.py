"""Services one feature offers another, through the core (plugins never import plugins).

The containers supervisor (core) needs host ports from the port pool plugin and host
folders from the volumes plugin. Each plugin puts its implementation on the agent in
``lightd_configure`` (``agent.stash[PORT_POOL] = pool``); the core looks it up with
``agent.stash.get(PORT_POOL)`` and works without it (no pool: no port can be reserved).
The other way round, the core offers plugins what they may know of containers
(``CONTAINER_SERVICE``). The Protocols below are the whole contract between them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

import attrs

from .runtime import StashKey

__all__ = [
    "CONTAINER_SERVICE",
    "DISK",
    "PORT_FIREWALL",
    "PORT_POOL",
    "TOKEN_SERVICE",
    "VOLUMES",
    "BackupDownload",
    "BackupTarget",
    "BackupUpload",
    "ContainerService",
    "DiskBudget",
    "DiskService",
    "DiskUsage",
    "PoolPort",
    "PortAccess",
    "PortFirewallService",
    "PortPoolService",
    "PortRequest",
    "TokenGrant",
    "TokenService",
    "VolumeRecord",
    "VolumeService",
    "disk_writing",
]


@attrs.frozen
class PortRequest:
    """A port a container asks for: a given pool entry, or (``ip``/``port`` None) any free
    entry of ``protocol`` (the [alias] ``{"container_port", "protocol"}`` form). Only one of
    them None narrows "any free" to that address or port number. The pool normalises
    ``ip`` (``2001:DB8::1`` names ``2001:db8::1``); a ``both`` entry serves a ``tcp`` or
    ``udp`` request, otherwise the protocols must be equal."""

    ip: str | None
    port: int | None
    protocol: str = "tcp"


@attrs.frozen
class PoolPort:
    """A pool entry as reserved: identity ``(ip, port)``; protocol ``tcp|udp|both``."""

    ip: str
    port: int
    protocol: str


class PortPoolService(Protocol):
    """The port pool, as containers use it. Every method is one store transaction.

    Errors (``agent.errors`` classes, answered to the API client as they are):
    ``BadRequest("Port not found in network pool")`` for an entry not in the pool,
    ``Conflict("Port already in use: <ip>:<port>")`` for an entry owned by another
    container or marked in use by hand, or named twice for overlapping protocols in one
    call, ``NotFound("No available ports in pool")`` when no free entry is left for an
    "any free" request, ``BadRequest("Port protocol mismatch: …")`` when the entry's
    protocol cannot serve the request, and the contract's ``Invalid IP address: …``,
    ``Invalid port: …``, ``Invalid protocol: …`` for a malformed request. ``<ip>:<port>``
    is written ``[<ip>]:<port>`` for IPv6.
    """

    async def reserve(self, owner: str, requests: Sequence[PortRequest]) -> list[PoolPort]:
        """Reserve all of ``requests`` for ``owner`` or none (entries ``owner`` already
        holds count as free for it); returns the entries in request order."""
        ...

    async def replace(self, owner: str, requests: Sequence[PortRequest]) -> list[PoolPort]:
        """Atomically make ``requests`` the whole set ``owner`` holds (rebind): the new
        entries are reserved and the others ``owner`` held are freed, or nothing changes."""
        ...

    async def release(self, owner: str) -> list[PoolPort]:
        """Free everything ``owner`` holds; returns what was freed (may be empty)."""
        ...

    async def held(self) -> dict[str, list[PoolPort]]:
        """Every owner and its entries (for reconciliation at start)."""
        ...


@attrs.frozen
class PortAccess:
    """What the agent's firewall does with traffic Docker forwards to one pool entry
    (``network.manage_firewall``): ``open`` accepts it, otherwise it is dropped. ``ip`` is
    normalised, ``0.0.0.0``/``::`` meaning every address; protocol ``tcp|udp|both``."""

    ip: str
    port: int
    protocol: str
    open: bool


class PortFirewallService(Protocol):
    """Port-level rules in the agent's firewall chain (the ``firewall`` plugin, hooked into
    Docker's ``DOCKER-USER``), for the port pool's ``network.manage_firewall``.

    One source is followed: the plugin calls it when it applies, at start and after each
    ``ports_changed``, and the chain then holds one rule per ``PortAccess`` (after the
    servers' own rules, so a server's ``drop`` still wins over an open port)."""

    def follow_ports(self, source: Callable[[], Awaitable[Sequence[PortAccess]]]) -> None:
        """Follow ``source`` from now on. Call it in ``lightd_configure`` (the firewall
        plugin's runs first): the rules are applied once services start."""
        ...

    def ports_changed(self) -> None:
        """The source's answer changed: read it again and apply it soon (never blocks;
        bursts coalesce into one pass)."""
        ...

    async def apply_ports(self) -> None:
        """Read the source and apply it now; returns once a pass that started after the
        call has ended (applied, or failed: logged and retried)."""
        ...


class VolumeRecord(Protocol):
    """A registered volume, as ``VolumeService.get`` gives it."""

    @property
    def volume_id(self) -> str: ...

    @property
    def created_at(self) -> int:
        """Unix seconds."""
        ...


class VolumeService(Protocol):
    """The volume registry, as containers (and the file manager) use it."""

    async def get(self, volume_id: str) -> VolumeRecord:
        """The registered volume; ``NotFound("Volume not found")`` for an unknown or
        malformed id."""
        ...

    async def path(self, volume_id: str) -> Path | None:
        """The host folder of volume ``volume_id`` (what Docker bind-mounts), or ``None``
        when there is no such volume (including a malformed id)."""
        ...

    async def adopt(self, volume_id: str, folder: Path) -> None:
        """Register ``folder`` (a folder beside the volumes, on the same file system, e.g.
        a staging folder a transfer filled) as the new volume ``volume_id``: moved into
        place with one rename, or nothing changes. ``BadRequest("Invalid volume_id")`` for
        an id that is not a UUID v4, ``Conflict("Volume already exists")`` when taken."""
        ...


class ContainerService(Protocol):
    """The node's containers, as plugins may use them (the core's containers plugin puts
    it on the stash)."""

    def install_log(self, internal_id: str) -> Path:
        """Where the output of the container's last install-script run is kept (the file
        may not exist). ``NotFound("Container not found")`` for an unknown container."""
        ...

    def images_in_use(self) -> dict[str, list[str]]:
        """The images the node's containers are made from: each image reference as its
        record names it (``image``, and ``install_image`` when set) → the ``internal_id``s
        naming it, sorted. References are as written (``busybox`` and
        ``docker.io/library/busybox:latest`` are two keys); the caller normalises."""
        ...

    def on_volume(self, volume_id: str) -> list[tuple[str, str]]:
        """The containers using volume ``volume_id``: ``(internal_id, state)`` pairs,
        ``state`` the runtime state (``offline``, ``starting``, ``running``...)."""
        ...

    def daemon_message(self, internal_id: str, text: str) -> None:
        """Send ``text`` to the container's clients as a ``daemon_message`` frame."""
        ...

    def request_stop(self, internal_id: str) -> None:
        """Queue a stop of the container (as ``POST /containers/:id/stop`` does); nothing
        when it is not running or is gone."""
        ...

    def volume_of(self, internal_id: str) -> str:
        """The id of the volume the container mounts; ``NotFound("Container not found")``
        for an unknown container."""
        ...

    def published_ports(self, internal_id: str) -> list[PoolPort]:
        """The host ports the container's record publishes (``ip``, ``port``, ``protocol``
        ``tcp|udp|both``); ``NotFound("Container not found")`` for an unknown container.
        Changes are told by ``lightd_container_network_changed``."""
        ...

    def export_record(self, internal_id: str) -> dict[str, Any]:
        """The container's record as JSON (its stored form), to recreate it on another
        node (contract §20); ``NotFound("Container not found")``."""
        ...

    async def check_import(self, exported: Any, ports: Sequence[Mapping[str, Any]]) -> None:
        """Would ``import_record`` take ``exported`` with ``ports`` now? The same checks
        and errors, nothing kept."""
        ...

    async def import_record(self, exported: Any, ports: Sequence[Mapping[str, Any]]) -> str:
        """Recreate a container another node exported (``export_record``), on its volume
        (already registered here), with ``ports`` (entries as a create's ``ports``:
        ``{"ip","port","protocol","container_port"}``) reserved from this node's pool:
        ``ready``, offline, no install run. Checked as a create (``BadRequest`` naming
        ``record.<field>``, ``Conflict("Container already exists")``, the pool's errors).
        Returns its ``internal_id``."""
        ...

    async def mark_transferred(self, internal_id: str) -> None:
        """Mark the container as moved to another node (``"transferred": true``,
        persisted); it no longer should run. ``NotFound`` for an unknown container."""
        ...


class BackupUpload(Protocol):
    """One archive being written to a backup target (``BackupTarget.open_upload``)."""

    async def write(self, data: bytes) -> None:
        """Append ``data`` (called with pieces of a few MiB, in order)."""
        ...

    async def commit(self) -> None:
        """Make the archive whole and visible; after this it can be downloaded."""
        ...

    async def abort(self) -> None:
        """Drop everything written (a failed or cancelled backup): leave nothing behind.
        Called at most once, instead of ``commit``; must not raise for a partial upload."""
        ...


class BackupDownload(Protocol):
    """One stored archive being read (``BackupTarget.open_download``)."""

    #: The archive's size in bytes, when the target knows it.
    size: int | None

    async def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the end."""
        ...

    async def aclose(self) -> None: ...


class BackupTarget(Protocol):
    """Where backup archives are kept (contract §16): the built-in ``local`` and ``s3``
    targets, or a plugin's (``lightd_backup_targets``). Failures are ``lightd.JobFailed``
    (or another ``AgentError``) with a message for clients."""

    async def open_upload(self, volume_id: str, backup_id: str) -> BackupUpload: ...

    async def open_download(self, volume_id: str, backup_id: str) -> BackupDownload:
        """``NotFound("Backup not found")`` when the target does not hold it."""
        ...

    async def delete(self, volume_id: str, backup_id: str) -> None:
        """Remove the archive; one already gone is not an error."""
        ...


@attrs.frozen
class DiskUsage:
    """A volume's usage as the disk service knows it: ``bytes`` and ``files`` (regular
    files' bytes and entries that are not folders, by the last walk adjusted by the API's
    own writes since; or, under a kernel project quota, the quota's space and inodes),
    ``size_limit`` (bytes, 0 = none)."""

    bytes: int
    files: int
    size_limit: int


class DiskBudget(Protocol):
    """The bytes one API write puts into a volume (``DiskService.writing``). Thread-safe:
    worker threads call it as they write."""

    #: The volume's limit in bytes when the write began (0: none, ``charge`` never refuses).
    limit: int

    def charge(self, n: int) -> None:
        """Count ``n`` bytes about to be written; ``lightd.files.QuotaExceeded`` (and
        nothing counted) when the volume's usage, the bytes of writes in flight and ``n``
        together exceed its limit. Call it before writing them."""
        ...

    def freed(self, n: int) -> None:
        """Bytes the write removes or replaces, counted when it completes."""
        ...


class _Unlimited:
    limit = 0

    def charge(self, n: int) -> None:
        pass

    def freed(self, n: int) -> None:
        pass


class DiskService(Protocol):
    """Volume usage and size limits (contract §15), ``agent.stash[DISK]`` (the built-in
    ``disk`` plugin). Usage is cached: measured by a walk in a worker thread (at most every
    ``disk.check_interval``) and adjusted by the API's own writes in between, or read from
    the kernel's project quota where the file system enforces one."""

    def limit(self, volume_id: str) -> int:
        """The volume's ``size_limit`` in bytes (0 = none); no I/O."""
        ...

    def cached_bytes(self, volume_id: str) -> int | None:
        """The volume's usage in bytes as last known, ``None`` before it was measured;
        cheap enough for every stats frame (no walk)."""
        ...

    async def usage(self, volume_id: str) -> DiskUsage:
        """The volume's usage; measured (a walk) only when never measured before."""
        ...

    async def set_limit(self, volume_id: str, size_limit: int) -> None:
        """Make ``size_limit`` (bytes, 0 = none) the volume's limit, persisted."""
        ...

    def writing(self, volume_id: str) -> AbstractAsyncContextManager[DiskBudget]:
        """The budget of one write into the volume: charges made in the block count as
        the volume's usage when it ends without error, and are dropped otherwise (the
        caller has removed its partial output). A ``NoSpace`` raised in the block while
        the volume is at its limit (a kernel quota refused the write) becomes
        ``QuotaExceeded``."""
        ...

    async def prepare(self, volume_id: str, folder: Path) -> None:
        """Make a new, empty staging ``folder`` (later moved into the volume, e.g. by a
        restore) count against the volume: under a kernel project quota it gets the
        volume's project id, so its contents are charged and the move is allowed. Call
        it before writing into the folder; a no-op without kernel quotas."""
        ...

    async def refresh(self, volume_id: str) -> None:
        """Measure the volume again now (after a restore swapped its contents)."""
        ...

    def stale(self, volume_id: str) -> None:
        """The volume lost files no budget counted (a delete): it is measured again soon,
        in the background; no I/O here."""
        ...


def disk_writing(
    disk: DiskService | None, volume_id: str
) -> AbstractAsyncContextManager[DiskBudget]:
    """``disk.writing(volume_id)``, or a budget that never refuses when there is no disk
    service (the ``disk`` plugin is disabled)."""
    if disk is None:
        return contextlib.nullcontext(_Unlimited())
    return disk.writing(volume_id)


@attrs.frozen
class TokenGrant:
    """A token ``TokenService.authorize`` accepted: ``kind`` ``master`` or ``temporary``;
    a temporary one's public ``token_id`` and ``expires_at`` (unix seconds)."""

    kind: str
    token_id: str | None = None
    expires_at: float | None = None


class TokenService(Protocol):
    """API tokens as a service that speaks another protocol checks them (the ``sftp``
    plugin: a password is a token), ``agent.stash[TOKEN_SERVICE]`` (the core's essential
    ``token_access``, same rules as ``lightd.api.auth``)."""

    async def authorize(self, token: str, permission: str, volume_id: str) -> TokenGrant | None:
        """Whether ``token`` (the master token, or a live temporary token with
        ``permission`` and ``volume_id`` in its scope) may act on the volume; ``None`` if
        not, and always while ``authorization.enabled`` is false. A single-use token is
        spent by a successful call."""
        ...

    def on_revoked(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(token_id)`` (on the event loop, synchronously: never block) for
        every temporary token revoked from now on (by id, all, by container, or a new
        master token); returns the function that stops it. Expiry is not told: a holder
        of a grant ends it at ``expires_at``."""
        ...


CONTAINER_SERVICE: StashKey[ContainerService] = StashKey("container_service")
DISK: StashKey[DiskService] = StashKey("disk")
PORT_FIREWALL: StashKey[PortFirewallService] = StashKey("port_firewall")
PORT_POOL: StashKey[PortPoolService] = StashKey("port_pool")
TOKEN_SERVICE: StashKey[TokenService] = StashKey("token_service")
VOLUMES: StashKey[VolumeService] = StashKey("volumes")
