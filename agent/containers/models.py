"""Container records and the request bodies that create and change them (contract §7).

Models carry no I/O and no wire names; the converter structures request bodies into the
``*Request`` classes (strict types, first bad field named) and the validators here add
the contract's own rules and messages.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any, Literal

import attrs

from ..converter import FieldError, field_check
from ..errors import BadRequest

__all__ = [
    "INSTALL_STATES",
    "RUNTIME_STATES",
    "ContainerRecord",
    "CreateRequest",
    "Limits",
    "PortBinding",
    "PortSpec",
    "RebindRequest",
    "ReinstallRequest",
    "StopRequest",
    "check_limits",
    "node_cpus",
    "valid_image",
    "valid_internal_id",
]

INSTALL_STATES = ("installing", "ready", "failed")
RUNTIME_STATES = ("offline", "starting", "running", "stopping")

InstallState = Literal["installing", "ready", "failed"]
RuntimeState = Literal["offline", "starting", "running", "stopping"]

_INTERNAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less
MAX_MEMORY = 1024**4  # 1 TiB: anything above is a typo or an attack
MIN_CPU = 0.01  # less is below what the kernel's CFS quota can express usefully
MAX_PIDS = 32768
DEFAULT_PIDS = 512

# Docker's reference grammar (github.com/distribution/reference, regexp.go), ASCII only.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9A-Fa-f]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@{_DIGEST})?", re.ASCII)
#: Docker's limit on a repository name; a whole reference is kept well under 1 KiB.
_MAX_NAME = 255
_MAX_REFERENCE = 1024
FORBIDDEN_TARGETS = ("/", "/home/container", "/app/data", "/proc", "/sys", "/dev", "/etc")
PROTOCOLS = ("tcp", "udp", "both")


def valid_internal_id(value: str) -> bool:
    return bool(_INTERNAL_ID.fullmatch(value))


def valid_image(value: str) -> bool:
    """Whether ``value`` is a Docker image reference (``[host[:port]/]path[:tag][@digest]``,
    lower-case path, name at most 255 characters), as the engine's parser would accept."""
    if len(value) > _MAX_REFERENCE:
        return False
    match = _REFERENCE.fullmatch(value)
    return match is not None and len(match["name"]) <= _MAX_NAME


@attrs.frozen
class PortSpec:
    """A port as a request names it: ``{"ip","port","protocol"}``, or the [alias]
    ``{"container_port","protocol"}`` that takes any free pool port."""

    ip: str | None = None
    port: int | None = None
    protocol: str = "tcp"
    container_port: int | None = None


@attrs.frozen
class PortBinding:
    """A reserved host port and the container port it forwards to."""

    ip: str
    port: int
    protocol: str
    container_port: int


@attrs.frozen
class Limits:
    """A container's limits as stored. The bounds of §7.6 are checked on requests
    (``check_limits``), not here: a record written by an older agent (or on a node with
    more CPUs) must still load."""

    #: Bytes; ``None`` only in records of older agents (the node's default applies).
    memory: int | None = attrs.field(
        default=None,
        validator=field_check(
            lambda v: v is None or v >= MIN_MEMORY, f"must be at least {MIN_MEMORY} bytes"
        ),
    )
    cpu: float | None = attrs.field(
        default=None, validator=field_check(lambda v: v is None or v > 0, "must be > 0")
    )
    pids: int = attrs.field(
        default=DEFAULT_PIDS, validator=field_check(lambda v: v >= 1, "must be >= 1")
    )
    #: Bytes of swap beyond ``memory``; ``-1``: unlimited swap.
    swap: int = attrs.field(default=0, validator=field_check(lambda v: v >= -1, "must be >= -1"))


def node_cpus() -> int:
    """The CPUs of this node: Docker refuses a CPU limit above it at start."""
    return os.cpu_count() or 1


def check_limits(_instance: Any, _attribute: attrs.Attribute[Any], limits: Limits) -> None:
    """The bounds of contract §7.6 on a request's ``limits``; the converter names the
    failing field ``limits.<field>``."""
    if limits.memory is not None and not MIN_MEMORY <= limits.memory <= MAX_MEMORY:
        raise FieldError("limits.memory", f"must be between {MIN_MEMORY} and {MAX_MEMORY} bytes")
    cpus = node_cpus()
    if limits.cpu is not None and not MIN_CPU <= limits.cpu <= cpus:
        raise FieldError("limits.cpu", f"must be between {MIN_CPU} and {cpus} (the node's CPUs)")
    if not 1 <= limits.pids <= MAX_PIDS:
        raise FieldError("limits.pids", f"must be between 1 and {MAX_PIDS}")
    if limits.swap != -1 and not 0 <= limits.swap <= MAX_MEMORY:
        raise FieldError("limits.swap", f"must be -1 (unlimited) or 0 to {MAX_MEMORY} bytes")


def _check_image(_instance: Any, _attribute: attrs.Attribute[Any], image: str | None) -> None:
    """An image the engine could parse, else the contract's exact message (§7.6)."""
    if image is not None and not valid_image(image):
        raise BadRequest(f"Invalid image: {image}", code="invalid_image")


def _check_mount(mount: dict[str, str]) -> dict[str, str]:
    for target in mount:
        normal = posixpath.normpath(target)
        if not target.startswith("/") or (target != normal and target.rstrip("/") != normal):
            raise FieldError("mount", f"container path must be absolute and normal: {target}")
        if any(normal == f or (f != "/" and normal.startswith(f + "/")) for f in FORBIDDEN_TARGETS):
            raise FieldError("mount", f"container path not allowed: {target}")
    return mount


def _env_ok(env: dict[str, str]) -> bool:
    return all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k) for k in env)


@attrs.frozen
class CreateRequest:
    internal_id: str = attrs.field(validator=field_check(valid_internal_id, "Invalid internal_id"))
    image: str = attrs.field(
        validator=[field_check(lambda v: bool(v.strip()), "must not be empty"), _check_image]
    )
    volume_id: str
    startup_command: str = attrs.field(
        validator=field_check(lambda v: bool(v.strip()), "must not be empty")
    )
    start_pattern: str | None = None
    ports: tuple[PortSpec, ...] = ()
    limits: Limits = attrs.field(factory=Limits, validator=check_limits)
    mount: dict[str, str] = attrs.field(factory=dict)
    install_script: str | None = None
    environment: dict[str, str] = attrs.field(
        factory=dict, validator=field_check(_env_ok, "keys must be shell variable names")
    )
    stop_command: str | None = None
    install_image: str | None = attrs.field(default=None, validator=_check_image)
    start_on_completion: bool = False

    def __attrs_post_init__(self) -> None:
        _check_mount(self.mount)


@attrs.frozen
class ReinstallRequest:
    image: str | None = attrs.field(default=None, validator=_check_image)
    install_script: str | None = None


@attrs.frozen
class RebindRequest:
    ports: tuple[PortSpec, ...]


@attrs.frozen
class StopRequest:
    timeout: float | None = attrs.field(
        default=None,
        validator=field_check(lambda v: v is None or 0 <= v <= 3600, "must be 0 to 3600 seconds"),
    )


@attrs.frozen
class ContainerRecord:
    """What the agent keeps about a container (the store's row, and ``GET`` answers)."""

    internal_id: str
    image: str
    volume_id: str
    startup_command: str
    start_pattern: str | None
    ports: tuple[PortBinding, ...]
    limits: Limits
    mount: dict[str, str]
    install_script: str | None
    environment: dict[str, str]
    stop_command: str | None
    install_image: str | None
    install_state: InstallState
    container_id: str | None
    error: str | None
    created_at: int
    updated_at: int

    def describe(self) -> dict[str, Any]:
        """The contract's ``GET /containers/:id`` body, minus the runtime fields."""
        return {
            "internal_id": self.internal_id,
            "container_id": self.container_id,
            "volume_id": self.volume_id,
            "image": self.image,
            "startup_command": self.startup_command,
            "start_pattern": self.start_pattern,
            "install_state": self.install_state,
            "ports": [
                {
                    "ip": p.ip,
                    "port": p.port,
                    "protocol": p.protocol,
                    "container_port": p.container_port,
                }
                for p in self.ports
            ],
            "limits": {
                "memory": self.limits.memory,
                "cpu": self.limits.cpu,
                "pids": self.limits.pids,
                "swap": self.limits.swap,
            },
            "mount": dict(self.mount),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "error": self.error,
            "environment": dict(self.environment),
            "stop_command": self.stop_command,
            "install_image": self.install_image,
        }
