"""Container records and the request bodies that create and change them (contract §7).

Models carry no I/O and no wire names; the converter structures request bodies into the
``*Request`` classes (strict types, first bad field named) and the validators here add
the contract's own rules and messages.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from typing import Any, Literal

import attrs

from ..converter import FieldError, field_check
from ..errors import BadRequest, ValidationError

__all__ = [
    "INSTALL_STATES",
    "PATCH_CLEARABLE",
    "RESERVED_IDS",
    "RESTART_MODES",
    "RUNTIME_STATES",
    "ContainerRecord",
    "CreateRequest",
    "ExecRequest",
    "Limits",
    "LimitsPatch",
    "PatchRequest",
    "PortBinding",
    "PortSpec",
    "RebindRequest",
    "ReinstallRequest",
    "Resources",
    "ResourcesRequest",
    "RestartPolicy",
    "StopRequest",
    "check_limits",
    "node_cpus",
    "parse_cpuset",
    "resources_view",
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


#: Ids a new container may not take: ``/ws/events`` is the node event stream, so a
#: container named ``events`` could never reach its own WebSocket (``/ws/<internal_id>``).
RESERVED_IDS = frozenset({"events"})


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


#: What ``restart_policy.mode`` may be (contract §17).
RESTART_MODES = ("never", "on-crash", "always")
MAX_RESTARTS = 1000
MAX_RESTART_WINDOW = 30 * 86400


@attrs.frozen
class RestartPolicy:
    """When the agent starts a server again after an exit nobody asked for through the API
    (contract §17): ``on-crash`` after a non-zero exit code (an error, a signal, the OOM
    killer), ``always`` after any (exit code 0 too), ``never`` not at all; either at most
    ``max_restarts`` times within ``window_s`` seconds."""

    mode: str = attrs.field(
        validator=field_check(lambda v: v in RESTART_MODES, "must be never, on-crash or always")
    )
    max_restarts: int = attrs.field(
        default=3,
        validator=field_check(lambda v: 0 <= v <= MAX_RESTARTS, f"must be 0 to {MAX_RESTARTS}"),
    )
    window_s: float = attrs.field(
        default=600.0,
        validator=field_check(
            lambda v: 0 < v <= MAX_RESTART_WINDOW,
            f"must be more than 0 and at most {MAX_RESTART_WINDOW} seconds",
        ),
    )

    def restarts_after(self, exit_code: int) -> bool:
        """Does this policy restart a server that exited with ``exit_code`` unasked?"""
        return self.mode == "always" or (self.mode == "on-crash" and exit_code != 0)


#: Docker's CFS period (µs) when the CPU limit is ``NanoCpus``: what the kernel applies.
CPU_PERIOD = 100_000
MAX_CPU_SHARES = 262_144
_CPUSET = re.compile(r"[0-9]{1,4}(?:-[0-9]{1,4})?(?:,[0-9]{1,4}(?:-[0-9]{1,4})?)*")


def parse_cpuset(text: str) -> frozenset[int] | None:
    """The CPUs of a cpuset list (``0-2,5``), or ``None`` when it is not one."""
    if len(text) > 256 or not _CPUSET.fullmatch(text):
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high:
            return None
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def _node_cpuset(text: str | None) -> bool:
    if text is None:
        return True
    cpus = parse_cpuset(text)
    return cpus is not None and max(cpus) < node_cpus()


@attrs.frozen
class Resources:
    """Engine resources beyond ``limits``, set with the [alias]
    ``POST /containers/:id/resources`` (memory, swap and CPU time are ``limits``):
    ``None`` leaves the engine's default. Applied at create and live."""

    #: Relative CPU weight (the engine's default is 1024).
    cpu_shares: int | None = None
    #: The CPUs the server may run on (``0-2,5``).
    cpuset_cpus: str | None = None
    #: Relative block I/O weight, 10 to 1000.
    blkio_weight: int | None = None


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
    #: ``None``: the node's default (config ``containers.crash_restart``).
    restart_policy: RestartPolicy | None = None

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
class LimitsPatch:
    """``limits`` of a ``PATCH``: the fields given replace the record's, the rest stay."""

    memory: int | None = None
    cpu: float | None = None
    pids: int | None = None
    swap: int | None = None

    def apply(self, limits: Limits) -> Limits:
        """``limits`` with this patch, checked as a create's (``ValidationError``)."""
        changes = {k: v for k, v in attrs.asdict(self).items() if v is not None}
        try:
            new = attrs.evolve(limits, **changes)
            check_limits(None, None, new)  # type: ignore[arg-type]
        except FieldError as exc:
            name = exc.name if exc.name.startswith("limits.") else f"limits.{exc.name}"
            raise ValidationError(f"{name}: {exc.message}") from None
        return new


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


#: Fields of a ``PATCH`` an explicit ``null`` resets: no stop command, no start pattern,
#: the node's restart policy.
PATCH_CLEARABLE = ("stop_command", "start_pattern", "restart_policy")


@attrs.frozen
class PatchRequest:
    """``PATCH /containers/:id`` (contract §17): every field optional, each checked as in
    a create. ``environment`` replaces the whole environment; ``limits`` is merged."""

    limits: LimitsPatch | None = None
    environment: dict[str, str] | None = attrs.field(
        default=None, validator=field_check(_optional(_env_ok), "keys must be shell variable names")
    )
    startup_command: str | None = attrs.field(
        default=None,
        validator=field_check(_optional(lambda v: bool(v.strip())), "must not be empty"),
    )
    stop_command: str | None = None
    start_pattern: str | None = None
    image: str | None = attrs.field(
        default=None,
        validator=[
            field_check(_optional(lambda v: bool(v.strip())), "must not be empty"),
            _check_image,
        ],
    )
    restart_policy: RestartPolicy | None = None


_MEMORY_RANGE = f"must be between {MIN_MEMORY} and {MAX_MEMORY} bytes"


@attrs.frozen
class ResourcesRequest:
    """[alias] ``POST /containers/:id/resources``: Docker's names for the same limits
    (``memory_swap`` is memory plus swap, ``-1`` unlimited; ``cpu_quota`` / ``cpu_period``
    is the CPU limit in cores), and the extra ``Resources``."""

    memory: int | None = attrs.field(
        default=None,
        validator=field_check(_optional(lambda v: MIN_MEMORY <= v <= MAX_MEMORY), _MEMORY_RANGE),
    )
    memory_swap: int | None = attrs.field(
        default=None,
        validator=field_check(
            _optional(lambda v: v == -1 or MIN_MEMORY <= v <= 2 * MAX_MEMORY),
            "must be -1 (unlimited) or at least memory",
        ),
    )
    cpu_shares: int | None = attrs.field(
        default=None,
        validator=field_check(
            _optional(lambda v: 2 <= v <= MAX_CPU_SHARES), f"must be 2 to {MAX_CPU_SHARES}"
        ),
    )
    cpu_period: int | None = attrs.field(
        default=None,
        validator=field_check(
            _optional(lambda v: 1000 <= v <= 1_000_000), "must be 1000 to 1000000 (microseconds)"
        ),
    )
    cpu_quota: int | None = attrs.field(
        default=None,
        validator=field_check(
            _optional(lambda v: 1000 <= v <= 1_000_000 * 1024),
            "must be at least 1000 (microseconds per cpu_period)",
        ),
    )
    cpuset_cpus: str | None = attrs.field(
        default=None,
        validator=field_check(_node_cpuset, "must name CPUs of this node (e.g. 0-1,3)"),
    )
    blkio_weight: int | None = attrs.field(
        default=None,
        validator=field_check(_optional(lambda v: v == 0 or 10 <= v <= 1000), "must be 10 to 1000"),
    )

    def apply(self, limits: Limits, resources: Resources) -> tuple[Limits, Resources]:
        """The record's ``limits`` and ``resources`` with this request (``ValidationError``
        naming the field when the combination is out of range)."""
        memory = self.memory if self.memory is not None else limits.memory
        swap = limits.swap
        if self.memory_swap is not None:
            if self.memory_swap == -1:
                swap = -1
            elif memory is None or self.memory_swap < memory:
                raise ValidationError("memory_swap: must be -1 (unlimited) or at least memory")
            else:
                swap = self.memory_swap - memory
        cpu = limits.cpu
        if self.cpu_quota is not None or self.cpu_period is not None:
            period = self.cpu_period or CPU_PERIOD
            if self.cpu_quota is not None:
                quota = self.cpu_quota
            elif limits.cpu is not None:
                quota = round(limits.cpu * CPU_PERIOD)  # the quota applied now
            else:
                raise ValidationError("cpu_period: needs cpu_quota (no CPU limit is set)")
            cpu = quota / period
            if not MIN_CPU <= cpu <= node_cpus():
                raise ValidationError(
                    f"cpu_quota: cpu_quota / cpu_period must be {MIN_CPU} to {node_cpus()} "
                    "(the node's CPUs)"
                )
        blkio = resources.blkio_weight
        if self.blkio_weight == 0:
            if blkio is not None:
                raise ValidationError(
                    "blkio_weight: a weight cannot be removed from a container; give 10 to 1000"
                )
        elif self.blkio_weight is not None:
            blkio = self.blkio_weight
        try:
            new_limits = attrs.evolve(limits, memory=memory, swap=swap, cpu=cpu)
            check_limits(None, None, new_limits)  # type: ignore[arg-type]
        except FieldError as exc:
            raise ValidationError(f"{exc.name}: {exc.message}") from None
        new_resources = Resources(
            cpu_shares=self.cpu_shares if self.cpu_shares is not None else resources.cpu_shares,
            cpuset_cpus=self.cpuset_cpus if self.cpuset_cpus is not None else resources.cpuset_cpus,
            blkio_weight=blkio,
        )
        return new_limits, new_resources


def resources_view(limits: Limits, resources: Resources) -> dict[str, Any]:
    """``GET /containers/:id/resources``: the values as the engine applies them (a CPU
    limit is ``NanoCpus``, which the kernel runs as a quota per 100 ms period)."""
    memory = limits.memory
    swap: int | None = None
    if memory is not None:
        swap = -1 if limits.swap == -1 else memory + limits.swap
    return {
        "memory": memory,
        "memory_swap": swap,
        "cpu_shares": resources.cpu_shares,
        "cpu_period": CPU_PERIOD if limits.cpu else None,
        "cpu_quota": round(limits.cpu * CPU_PERIOD) if limits.cpu else None,
        "cpuset_cpus": resources.cpuset_cpus,
        "blkio_weight": resources.blkio_weight,
    }


#: Most arguments (and characters in all) an exec may have.
MAX_EXEC_ARGS = 256
MAX_EXEC_CHARS = 64 * 1024
MAX_EXEC_TIMEOUT = 300.0


def _argv_ok(argv: tuple[str, ...]) -> bool:
    return (
        1 <= len(argv) <= MAX_EXEC_ARGS and bool(argv[0]) and sum(map(len, argv)) <= MAX_EXEC_CHARS
    )


@attrs.frozen
class ExecRequest:
    """``POST /containers/:id/exec`` (contract §17)."""

    argv: tuple[str, ...] = attrs.field(
        validator=field_check(
            _argv_ok,
            f"must be 1 to {MAX_EXEC_ARGS} strings, the first not empty, "
            f"at most {MAX_EXEC_CHARS} characters in all",
        )
    )
    #: Seconds; the process is killed after it.
    timeout: float = attrs.field(
        default=30.0,
        validator=field_check(
            lambda v: 0 < v <= MAX_EXEC_TIMEOUT,
            f"must be more than 0 and at most {MAX_EXEC_TIMEOUT:g} seconds",
        ),
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
    #: Desired state (§17): started through the API and not stopped or killed since, so
    #: it is started again after the agent, the engine or the host restarts.
    should_run: bool = False
    #: ``None``: the node's default (config ``containers.crash_restart``).
    restart_policy: RestartPolicy | None = None
    resources: Resources = Resources()
    #: A ``PATCH`` changed what the Docker container is made of (image, environment,
    #: startup command, memory): the next start recreates it.
    recreate_pending: bool = False
    #: Moved to another node (contract §20): kept offline until the panel deletes it.
    transferred: bool = False

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
            "should_run": self.should_run,
            "transferred": self.transferred,
        }
