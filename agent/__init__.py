"""Lightd node agent: the core, and the public surface for plugin authors.

A plugin (a built-in one under ``lightd.plugins`` or a third-party package) imports only
``lightd`` (this module), ``lightd.api`` (what views use) and ``lightd.files`` (the safe
file layer), never another plugin and never any other core module; a test checks this for
every built-in. What a plugin needs from another feature it asks the core for, through a
hook or one of the service interfaces below (``agent.stash[VOLUMES]``).

Layering of the core, bottom up (docs/architecture.md): ``errors``, ``converter`` →
``files``, ``config``, ``logs``, ``store``, ``docker`` → ``hookspecs``, ``plugin_manager``,
``runtime``, ``metrics``, ``interfaces``, ``jobs`` →
``containers`` → ``api`` → ``server`` → ``cli``.
"""

from ._version import __version__
from .config import Config
from .containers.install import InstallJob, InstallRun
from .containers.settings import ContainersSettings
from .converter import FieldError, field_check
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
    TooManyRequests,
    Unauthorized,
    UnsupportedMedia,
    ValidationError,
)
from .hookspecs import hookimpl
from .interfaces import (
    CONTAINER_SERVICE,
    PORT_POOL,
    VOLUMES,
    ContainerService,
    PoolPort,
    PortPoolService,
    PortRequest,
    VolumeService,
)
from .jobs import (
    JOBS,
    JobBody,
    JobContext,
    JobFailed,
    JobKind,
    JobLimitReached,
    Jobs,
    JobStarted,
    JobView,
)
from .metrics import Metrics
from .runtime import Agent, Service, StashKey
from .store import Migration, Store, StoreError

__all__ = [
    "CONTAINER_SERVICE",
    "JOBS",
    "PORT_POOL",
    "VOLUMES",
    "Agent",
    "AgentError",
    "ApiError",
    "BadRequest",
    "Config",
    "ConfigError",
    "Conflict",
    "ContainerService",
    "ContainersSettings",
    "DockerUnavailable",
    "FieldError",
    "Forbidden",
    "InstallJob",
    "InstallRun",
    "JobBody",
    "JobContext",
    "JobFailed",
    "JobKind",
    "JobLimitReached",
    "JobStarted",
    "JobView",
    "Jobs",
    "Metrics",
    "Migration",
    "NotFound",
    "PluginError",
    "PoolPort",
    "PortPoolService",
    "PortRequest",
    "Service",
    "StashKey",
    "Store",
    "StoreError",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMedia",
    "ValidationError",
    "VolumeService",
    "__version__",
    "field_check",
    "hookimpl",
]
