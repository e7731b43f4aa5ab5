"""Lightd node agent: the core, and the public surface for plugin authors.

Layering, bottom up: ``errors`` and ``converter`` (no I/O) → ``config``, ``store``,
``docker`` (the edges) → ``plugins`` and ``hookspecs`` (the contract with features) →
``runtime`` (the agent object, its root nursery and services) → ``api`` (the HTTP app) →
``cli``. Features live in the top-level ``plugins`` package and in third-party packages;
they import only the names below.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("lightd")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

from .errors import (
    AgentError,
    ApiError,
    BadRequest,
    ConfigError,
    Conflict,
    DockerUnavailable,
    Forbidden,
    NotFound,
    PluginError,
    Unauthorized,
    ValidationError,
)
from .hookspecs import hookimpl
from .runtime import Agent, Service, StashKey
from .store import Migration

__all__ = [
    "Agent",
    "AgentError",
    "ApiError",
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DockerUnavailable",
    "Forbidden",
    "Migration",
    "NotFound",
    "PluginError",
    "Service",
    "StashKey",
    "Unauthorized",
    "ValidationError",
    "__version__",
    "hookimpl",
]
