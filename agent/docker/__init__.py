"""The only way to the Docker engine (no other module talks to it).

``DockerEngine`` (``engine``) is the agent's client: every call is a named async method,
trio-native over the engine's socket. ``ContainerSpec`` (``spec``) is the agent's own
description of a container, mapped to the Engine API's create body by ``create_body``.
``AttachStream`` (``streams``) is a container's attached stdio.
"""

from . import _no_httpx_cli  # noqa: F401  (first: before anything imports httpx)
from .engine import (
    Credentials,
    DockerConflict,
    DockerEngine,
    DockerError,
    DockerNotFound,
    EngineInfo,
    ExecResult,
    PullProgress,
    RegistryAuth,
    container_states,
    docker_url,
    registry_key,
    registry_of,
    split_image,
)
from .spec import ContainerSpec, LogConfig, Mount, PortPublish, ResourceLimits, create_body
from .streams import AttachStream, JsonLines, demux

__all__ = [
    "AttachStream",
    "ContainerSpec",
    "Credentials",
    "DockerConflict",
    "DockerEngine",
    "DockerError",
    "DockerNotFound",
    "EngineInfo",
    "ExecResult",
    "JsonLines",
    "LogConfig",
    "Mount",
    "PortPublish",
    "PullProgress",
    "RegistryAuth",
    "ResourceLimits",
    "container_states",
    "create_body",
    "demux",
    "docker_url",
    "registry_key",
    "registry_of",
    "split_image",
]
