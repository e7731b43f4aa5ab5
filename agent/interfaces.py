"""Services one feature offers another, through the core (plugins never import plugins).

The containers supervisor (core) needs host ports from the port pool plugin and host
folders from the volumes plugin. Each plugin puts its implementation on the agent in
``lightd_configure`` (``agent.stash[PORT_POOL] = pool``); the core looks it up with
``agent.stash.get(PORT_POOL)`` and works without it (no pool: no port can be reserved).
The other way round, the core offers plugins what they may know of containers
(``CONTAINER_SERVICE``). The Protocols below are the whole contract between them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import attrs

from .runtime import StashKey

__all__ = [
    "CONTAINER_SERVICE",
    "PORT_POOL",
    "VOLUMES",
    "ContainerService",
    "PoolPort",
    "PortPoolService",
    "PortRequest",
    "VolumeRecord",
    "VolumeService",
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


class ContainerService(Protocol):
    """The node's containers, as plugins may use them (the core's containers plugin puts
    it on the stash)."""

    def install_log(self, internal_id: str) -> Path:
        """Where the output of the container's last install-script run is kept (the file
        may not exist). ``NotFound("Container not found")`` for an unknown container."""
        ...


CONTAINER_SERVICE: StashKey[ContainerService] = StashKey("container_service")
PORT_POOL: StashKey[PortPoolService] = StashKey("port_pool")
VOLUMES: StashKey[VolumeService] = StashKey("volumes")
