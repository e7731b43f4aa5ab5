"""Config section ``containers``: install and stop timeouts, the crash restart policy,
the port count bound and the default memory limit."""

from __future__ import annotations

from typing import Any

import attrs

from ..converter import field_check
from ..files import parse_owner
from .models import MAX_MEMORY, MAX_RESTART_WINDOW, MAX_RESTARTS, MIN_MEMORY, RestartPolicy

__all__ = ["ContainersSettings", "CrashRestart"]


@attrs.frozen
class CrashRestart:
    """Restart a crashed server, at most ``max_restarts`` times in ``window`` seconds: the
    default restart policy of containers (``policy``), each may name its own."""

    enabled: bool = False
    max_restarts: int = attrs.field(
        default=3, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    window: float = attrs.field(
        default=600.0, validator=field_check(lambda v: v > 0, "must be > 0")
    )

    @property
    def policy(self) -> RestartPolicy:
        """The restart policy of a container that names none (contract §17): ``on-crash``
        when enabled, else ``never``."""
        return RestartPolicy(
            mode="on-crash" if self.enabled else "never",
            max_restarts=min(self.max_restarts, MAX_RESTARTS),
            window_s=min(self.window, MAX_RESTART_WINDOW),
        )


def _valid_user(value: object) -> bool:
    try:
        parse_owner(value)
    except ValueError:
        return False
    return True


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
    #: Ports one container may hold (create and rebind refuse more).
    max_ports: int = attrs.field(
        default=20, validator=field_check(lambda v: 1 <= v <= 65535, "must be 1 to 65535")
    )
    #: Bytes of memory a container gets when its request names no ``limits.memory``:
    #: every container has a memory limit (contract §7.6).
    default_memory: int = attrs.field(
        default=1024**3,
        validator=field_check(
            lambda v: MIN_MEMORY <= v <= MAX_MEMORY, f"must be {MIN_MEMORY} to {MAX_MEMORY} bytes"
        ),
    )
    #: Servers that should run (§17 desired state) started at once when the agent or the
    #: engine comes back, so a node of a hundred servers does not start them all together.
    boot_concurrency: int = attrs.field(
        default=4, validator=field_check(lambda v: 1 <= v <= 64, "must be 1 to 64")
    )
    #: Seconds between two such starts (staggered: disks and CPUs warm up one at a time).
    boot_stagger: float = attrs.field(
        default=0.05, validator=field_check(lambda v: 0 <= v <= 60, "must be 0 to 60 seconds")
    )
    #: Owner of what the file API creates in volumes (writes, folders, copies, extracted
    #: and new archives): ``"root"`` (as before), a uid, or ``"uid:gid"``, so a game server
    #: running as a non-root user can change them.
    user: Any = attrs.field(
        default="root", validator=field_check(_valid_user, 'must be "root", a uid or "uid:gid"')
    )

    @property
    def owner(self) -> tuple[int, int] | None:
        """``user`` as ``(uid, gid)``; ``None`` for ``"root"``."""
        return parse_owner(self.user)
