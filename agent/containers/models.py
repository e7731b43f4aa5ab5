"""Container records and the request bodies that create and change them (contract §7).

Models carry no I/O and no wire names; the converter structures request bodies into the
``*Request`` classes (strict types, first bad field named) and the validators here add
the contract's own rules and messages.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Literal

import attrs

from ..converter import FieldError, field_check

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
    "valid_internal_id",
]

INSTALL_STATES = ("installing", "ready", "failed")
RUNTIME_STATES = ("offline", "starting", "running", "stopping")

InstallState = Literal["installing", "ready", "failed"]
RuntimeState = Literal["offline", "starting", "running", "stopping"]

_INTERNAL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MIN_MEMORY = 6 * 1024 * 1024  # Docker refuses less
FORBIDDEN_TARGETS = ("/", "/home/container", "/app/data", "/proc", "/sys", "/dev", "/etc")
PROTOCOLS = ("tcp", "udp", "both")


def valid_internal_id(value: str) -> bool:
    return bool(_INTERNAL_ID.fullmatch(value))


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
    memory: int | None = attrs.field(
        default=None,
        validator=field_check(
            lambda v: v is None or v >= MIN_MEMORY, f"must be at least {MIN_MEMORY} bytes"
        ),
    )
    cpu: float | None = attrs.field(
        default=None, validator=field_check(lambda v: v is None or v > 0, "must be > 0")
    )
    pids: int = attrs.field(default=512, validator=field_check(lambda v: v >= 1, "must be >= 1"))
    swap: int = attrs.field(default=0, validator=field_check(lambda v: v >= 0, "must be >= 0"))


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
    image: str = attrs.field(validator=field_check(lambda v: bool(v.strip()), "must not be empty"))
    volume_id: str
    startup_command: str = attrs.field(
        validator=field_check(lambda v: bool(v.strip()), "must not be empty")
    )
    start_pattern: str | None = None
    ports: tuple[PortSpec, ...] = ()
    limits: Limits = attrs.Factory(Limits)
    mount: dict[str, str] = attrs.field(factory=dict)
    install_script: str | None = None
    environment: dict[str, str] = attrs.field(
        factory=dict, validator=field_check(_env_ok, "keys must be shell variable names")
    )
    stop_command: str | None = None
    install_image: str | None = None
    start_on_completion: bool = False

    def __attrs_post_init__(self) -> None:
        _check_mount(self.mount)


@attrs.frozen
class ReinstallRequest:
    image: str | None = None
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
