"""Config section ``containers``: install and stop timeouts, the crash restart policy."""

from __future__ import annotations

import attrs

from ..converter import field_check

__all__ = ["ContainersSettings", "CrashRestart"]


@attrs.frozen
class CrashRestart:
    """Restart a crashed server, at most ``max_restarts`` times in ``window`` seconds."""

    enabled: bool = False
    max_restarts: int = attrs.field(
        default=3, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    window: float = attrs.field(
        default=600.0, validator=field_check(lambda v: v > 0, "must be > 0")
    )


@attrs.frozen
class ContainersSettings:
    """Config section ``containers``."""

    #: Seconds an install script may run.
    install_timeout: float = attrs.field(
        default=3600.0, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    #: Seconds a stop (or restart, reinstall, rebind) waits before SIGKILL.
    stop_timeout: float = attrs.field(
        default=30.0, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    crash_restart: CrashRestart = attrs.Factory(CrashRestart)
