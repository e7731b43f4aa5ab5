"""The ``remote`` config section: where the panel is and how to talk to it."""

from __future__ import annotations

import attrs
from lightd import field_check

__all__ = ["RemoteConfig"]

_positive = field_check(lambda v: v > 0, "must be > 0")


@attrs.frozen
class RemoteConfig:
    enabled: bool = False
    url: str = "https://panel.example/api"
    token: str = ""
    #: Seconds between ``GET {url}/health`` heartbeats.
    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    #: Also report runtime states (starting, running, stopping, offline).
    report_power_state: bool = False
    #: Seconds one request to the panel may take.
    timeout: float = attrs.field(default=10.0, validator=_positive)
    #: Updates kept while the panel is unreachable; the oldest are dropped beyond this.
    outbox_max: int = attrs.field(
        default=100_000, validator=field_check(lambda v: v >= 1, "must be >= 1")
    )
