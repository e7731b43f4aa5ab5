"""Our own description of a container, and the Engine API body it becomes.

``ContainerSpec`` says what the agent wants of a container in its own words (image,
entrypoint and command, environment, labels, bind mounts, published ports, resource
limits, hardening); ``create_body`` maps it to the JSON of ``POST /containers/create``
(Engine API 1.41 field names, accepted by every later version). Pure: no I/O, no
docker-py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["ContainerSpec", "LogConfig", "Mount", "PortPublish", "ResourceLimits", "create_body"]


def _frozen_map(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(value)


@attrs.frozen
class Mount:
    """A host folder bind-mounted into the container (``HostConfig.Binds``)."""

    source: str
    target: str
    read_only: bool = False


@attrs.frozen
class PortPublish:
    """One host address:port published to a container port (``HostConfig.PortBindings``)."""

    container_port: int
    #: ``tcp`` or ``udp``.
    protocol: str
    host_ip: str
    host_port: int


@attrs.frozen
class ResourceLimits:
    """``None`` leaves the engine's default (no limit)."""

    #: Bytes of memory.
    memory: int | None = None
    #: Bytes of memory plus swap (``-1``: unlimited swap).
    memory_swap: int | None = None
    #: CPU in billionths of a core.
    nano_cpus: int | None = None
    #: Processes (and threads) at once.
    pids: int | None = None


@attrs.frozen
class LogConfig:
    """The engine's log driver for the container and its options."""

    type: str
    config: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)


@attrs.frozen
class ContainerSpec:
    """A container to create. Sequences are tuples; mappings keep their order."""

    image: str
    #: The container's name (``None``: the engine picks one).
    name: str | None = None
    #: ``None``: the image's own; ``()`` clears it.
    entrypoint: tuple[str, ...] | None = None
    #: ``None``: the image's own; ``()`` clears it.
    cmd: tuple[str, ...] | None = None
    working_dir: str | None = None
    env: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    mounts: tuple[Mount, ...] = ()
    ports: tuple[PortPublish, ...] = ()
    limits: ResourceLimits = ResourceLimits()
    #: Keep stdin open (attachable) while nothing is attached.
    stdin_open: bool = False
    tty: bool = False
    #: Hardening: e.g. ``("no-new-privileges",)``.
    security_opt: tuple[str, ...] = ()
    #: Capabilities removed (``("ALL",)``: every one) and then given back.
    cap_drop: tuple[str, ...] = ()
    cap_add: tuple[str, ...] = ()
    #: The network the container joins (``None``: the engine's default bridge).
    network: str | None = None
    privileged: bool = False
    log_config: LogConfig | None = None


def create_body(spec: ContainerSpec) -> dict[str, Any]:
    """The JSON body of ``POST /containers/create`` for ``spec`` (its name goes in the query).

    Nothing is attached at create (``Attach*`` false, ``StdinOnce`` false): the agent
    attaches with its own request before ``start``, and a ``StdinOnce`` container would
    close stdin when that first attach ends.
    """
    body: dict[str, Any] = {
        "Image": spec.image,
        "Tty": spec.tty,
        "OpenStdin": spec.stdin_open,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "NetworkDisabled": False,
    }
    if spec.entrypoint is not None:
        body["Entrypoint"] = list(spec.entrypoint)
    if spec.cmd is not None:
        body["Cmd"] = list(spec.cmd)
    if spec.working_dir is not None:
        body["WorkingDir"] = spec.working_dir
    if spec.env:
        body["Env"] = [f"{key}={value}" for key, value in spec.env.items()]
    if spec.labels:
        body["Labels"] = dict(spec.labels)
    host: dict[str, Any] = {"NetworkMode": spec.network or "default"}
    if spec.mounts:
        body["Volumes"] = {m.target: {} for m in spec.mounts}
        host["Binds"] = [
            f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in spec.mounts
        ]
    if spec.ports:
        bindings: dict[str, list[dict[str, str]]] = {}
        for port in spec.ports:
            bindings.setdefault(f"{port.container_port}/{port.protocol}", []).append(
                {"HostIp": port.host_ip, "HostPort": str(port.host_port)}
            )
        body["ExposedPorts"] = {key: {} for key in bindings}
        host["PortBindings"] = bindings
    limits = spec.limits
    for key, value in (
        ("Memory", limits.memory),
        ("MemorySwap", limits.memory_swap),
        ("NanoCpus", limits.nano_cpus),
        ("PidsLimit", limits.pids),
    ):
        if value is not None:
            host[key] = value
    if spec.security_opt:
        host["SecurityOpt"] = list(spec.security_opt)
    if spec.cap_drop:
        host["CapDrop"] = list(spec.cap_drop)
    if spec.cap_add:
        host["CapAdd"] = list(spec.cap_add)
    if spec.privileged:
        host["Privileged"] = True
    if spec.log_config is not None:
        host["LogConfig"] = {"Type": spec.log_config.type, "Config": dict(spec.log_config.config)}
    body["HostConfig"] = host
    return body
