"""Lightd node agent: the core, and the public surface for plugin authors.

A plugin (a built-in one under ``lightd.plugins`` or a third-party package) imports only
``lightd`` (this module), ``lightd.api`` (what views use) and ``lightd.files`` (the safe
file layer), never another plugin and never any other core module; a test checks this for
every built-in. What a plugin needs from another feature it asks the core for, through a
hook or one of the service interfaces below (``agent.stash[VOLUMES]``).

Layering of the core, bottom up (docs/architecture.md): ``errors``, ``converter`` →
``files``, ``config``, ``logs``, ``store``, ``docker``, ``outbound`` → ``hookspecs``,
``plugin_manager``, ``runtime``, ``metrics``, ``interfaces``, ``jobs``, ``events`` →
``containers`` → ``api`` → ``server`` → ``cli``.
"""

import gc as _gc

# Importing the agent makes some 80 000 objects that live as long as the process (modules,
# classes, functions); the collections their allocations trigger find nothing to free
# (measured: 10 objects) and took a tenth of the start-up. So none runs during the import.
_collecting = _gc.isenabled()
_gc.disable()
try:
    from ._version import __version__
    from .config import Config
    from .containers.install import InstallJob, InstallRun
    from .containers.models import valid_image
    from .containers.settings import ContainersSettings
    from .containers.stats import Sample as StatsSample
    from .converter import FieldError, field_check
    from .docker.errors import DockerConflict, DockerError, DockerNotFound
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
    from .events import EVENT_TYPES, EventsSettings, NodeEvent, NodeEvents
    from .hookspecs import hookimpl
    from .interfaces import (
        CONTAINER_SERVICE,
        DISK,
        PORT_FIREWALL,
        PORT_POOL,
        TOKEN_SERVICE,
        VOLUMES,
        BackupDownload,
        BackupTarget,
        BackupUpload,
        ContainerService,
        DiskBudget,
        DiskService,
        DiskUsage,
        PoolPort,
        PortAccess,
        PortFirewallService,
        PortPoolService,
        PortRequest,
        TokenGrant,
        TokenService,
        VolumeService,
        disk_writing,
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
    from .outbound import (
        DESTINATION_NOT_ALLOWED,
        DestinationNotAllowed,
        GuardedBackend,
        IPAddress,
        IPNetwork,
        address_permitted,
        is_public_address,
        literal_address,
        parse_networks,
        valid_cidrs,
    )
    from .runtime import Agent, Service, StashKey
    from .store import Migration, Store, StoreError
finally:
    if _collecting:
        _gc.enable()

__all__ = [
    "CONTAINER_SERVICE",
    "DESTINATION_NOT_ALLOWED",
    "DISK",
    "EVENT_TYPES",
    "JOBS",
    "PORT_FIREWALL",
    "PORT_POOL",
    "TOKEN_SERVICE",
    "VOLUMES",
    "Agent",
    "AgentError",
    "ApiError",
    "BackupDownload",
    "BackupTarget",
    "BackupUpload",
    "BadRequest",
    "Config",
    "ConfigError",
    "Conflict",
    "ContainerService",
    "ContainersSettings",
    "DestinationNotAllowed",
    "DiskBudget",
    "DiskService",
    "DiskUsage",
    "DockerConflict",
    "DockerError",
    "DockerNotFound",
    "DockerUnavailable",
    "EventsSettings",
    "FieldError",
    "Forbidden",
    "GuardedBackend",
    "IPAddress",
    "IPNetwork",
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
    "NodeEvent",
    "NodeEvents",
    "NotFound",
    "PluginError",
    "PoolPort",
    "PortAccess",
    "PortFirewallService",
    "PortPoolService",
    "PortRequest",
    "Service",
    "StashKey",
    "StatsSample",
    "Store",
    "StoreError",
    "TokenGrant",
    "TokenService",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMedia",
    "ValidationError",
    "VolumeService",
    "__version__",
    "address_permitted",
    "disk_writing",
    "field_check",
    "hookimpl",
    "is_public_address",
    "literal_address",
    "parse_networks",
    "valid_cidrs",
    "valid_image",
]
