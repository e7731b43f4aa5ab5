"""A container record → the ``ContainerSpec`` of its server or install container.

Pure (no I/O): the caller resolves the host folders (the volume, through the volumes
service; the container's data folder) and passes them in. Labels, hardening and log
rotation are the core's and the same for every container; an install run may choose its
image, entrypoint, environment, mounts and limits, never those.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..docker import ContainerSpec, LogConfig, Mount, PortPublish, ResourceLimits
from .models import ContainerRecord, Limits, Resources

__all__ = [
    "CAPABILITIES",
    "LABEL_ID",
    "LABEL_MANAGED",
    "LABEL_NODE",
    "LABEL_ROLE",
    "container_spec",
    "extra_resources",
    "resource_limits",
    "server_environment",
    "standard_mounts",
    "update_fields",
]

LABEL_MANAGED = "lightd.managed"
LABEL_ID = "lightd.internal_id"
LABEL_ROLE = "lightd.role"
#: Which agent owns a container: agents sharing an engine never touch each other's.
LABEL_NODE = "lightd.node"

#: Where the volume and the agent's data folder appear inside a container.
HOME = "/home/container"
DATA = "/app/data"
SERVER_ENTRYPOINT = ("/bin/sh", f"{DATA}/entrypoint.sh")
LOGS = LogConfig("json-file", {"max-size": "10m", "max-file": "2"})
#: The only capabilities a server or install container keeps (contract §7.6): enough to
#: change owners and users and write files as root; never NET_RAW, MKNOD or SYS_*.
CAPABILITIES = (
    "CHOWN",
    "SETUID",
    "SETGID",
    "DAC_OVERRIDE",
    "FOWNER",
    "KILL",
    "NET_BIND_SERVICE",
)


def server_environment(record: ContainerRecord) -> dict[str, str]:
    """``SERVER_IP``, ``SERVER_PORT``, ``SERVER_MEMORY`` (MiB), ``STARTUP``, then the
    record's own variables (which win)."""
    first = record.ports[0] if record.ports else None
    memory = record.limits.memory
    return {
        "SERVER_IP": first.ip if first else "",
        "SERVER_PORT": str(first.port) if first else "",
        "SERVER_MEMORY": str(memory // (1024 * 1024)) if memory else "0",
        "STARTUP": record.startup_command,
        **record.environment,
    }


def standard_mounts(record: ContainerRecord, volume: Path, data: Path) -> tuple[Mount, ...]:
    """The volume (read-write) at /home/container, the data folder (read-only) at
    /app/data, and the record's extra mounts (read-write); one mount per host folder
    (a later one for the same folder wins)."""
    by_source = {
        str(volume): Mount(str(volume), HOME),
        str(data): Mount(str(data), DATA, read_only=True),
    }
    for target, source in record.mount.items():
        by_source[source] = Mount(source, target)
    return tuple(by_source.values())


def resource_limits(limits: Limits) -> ResourceLimits:
    """The API's limits (memory and swap in bytes, CPU in cores) as the engine's."""
    memory = limits.memory
    swap: int | None = None
    if memory:
        swap = -1 if limits.swap == -1 else memory + limits.swap
    return ResourceLimits(
        memory=memory or None,
        memory_swap=swap,
        nano_cpus=int(limits.cpu * 1e9) if limits.cpu else None,
        pids=limits.pids,
    )


def extra_resources(resources: Resources) -> dict[str, Any]:
    """The record's ``resources`` as Engine API fields (set with ``docker update``: right
    after a create, and live)."""
    fields = {
        "CpuShares": resources.cpu_shares,
        "CpusetCpus": resources.cpuset_cpus,
        "BlkioWeight": resources.blkio_weight,
    }
    return {key: value for key, value in fields.items() if value is not None}


def update_fields(limits: Limits, resources: Resources) -> dict[str, Any]:
    """The body of ``docker update`` for ``limits`` and ``resources``: memory and swap
    always together (the engine refuses a memory above the swap limit it has)."""
    engine = resource_limits(limits)
    fields = {
        "Memory": engine.memory,
        "MemorySwap": engine.memory_swap,
        "NanoCpus": engine.nano_cpus,
        "PidsLimit": engine.pids,
    }
    return {key: value for key, value in fields.items() if value is not None} | extra_resources(
        resources
    )


def container_spec(
    record: ContainerRecord,
    *,
    node_id: str,
    role: str,
    mounts: tuple[Mount, ...],
    image: str | None = None,
    entrypoint: tuple[str, ...] = SERVER_ENTRYPOINT,
    cmd: tuple[str, ...] = (),
    environment: Mapping[str, str] | None = None,
    limits: Limits | None = None,
    network: str | None = None,
) -> ContainerSpec:
    """The server container (``role="server"``: named ``lightd-<internal_id>``, ports
    published) or another one of the record (an install: no name, no ports); both on
    ``network`` (the agent's own, ``None``: the engine's default)."""
    ports: tuple[PortPublish, ...] = ()
    if role == "server":
        ports = tuple(
            PortPublish(p.container_port, proto, p.ip, p.port)
            for p in record.ports
            for proto in (("tcp", "udp") if p.protocol == "both" else (p.protocol,))
        )
    return ContainerSpec(
        image=image or record.image,
        name=f"lightd-{record.internal_id}" if role == "server" else None,
        entrypoint=entrypoint,
        cmd=cmd,
        working_dir=HOME,
        env=server_environment(record) if environment is None else environment,
        labels={
            LABEL_MANAGED: "true",
            LABEL_NODE: node_id,
            LABEL_ID: record.internal_id,
            LABEL_ROLE: role,
        },
        mounts=mounts,
        ports=ports,
        limits=resource_limits(record.limits if limits is None else limits),
        stdin_open=True,  # attachable stdin; StdinOnce stays false (notes, pitfall 17)
        tty=False,
        security_opt=("no-new-privileges",),
        cap_drop=("ALL",),
        cap_add=CAPABILITIES,
        network=network,
        privileged=False,
        log_config=LOGS,
    )
