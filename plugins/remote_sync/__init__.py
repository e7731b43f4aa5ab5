"""Built-in plugin ``remote_sync``: the node reports to its panel, losing nothing (contract §9).

Feature: every container transition the panel should hear about becomes an update
(``POST {remote.url}/update``, Bearer ``remote.token``): install states always
(``installing``, ``ready``, and ``failed`` as the error shape with the reason in ``data``),
runtime states (``starting``, ``running``, ``stopping``, ``offline``) only with
``remote.report_power_state``. Each update carries an ``event_id`` (UUID) and a
``timestamp`` [ext], is committed to a durable outbox in the state store before the
transition's hook returns, and is delivered in order, retried with capped back-off while
the panel is away, and deleted once the panel took it (see ``sync`` and ``outbox``).
A heartbeat asks ``GET {remote.url}/health`` at start and every
``remote.heartbeat_interval`` seconds.

Hooks: ``lightd_add_migrations`` (the ``remote_sync_outbox`` table), ``lightd_configure``
(the ``RemoteSync`` object in ``agent.stash[REMOTE_SYNC]``), ``lightd_add_services``,
``lightd_add_routes``, ``lightd_container_state_changed`` (records),
``lightd_container_deleted`` (forgets the container's last state),
``lightd_panel_update`` (queues another plugin's update, e.g. a finished backup),
``lightd_config_reloaded`` (applies a changed ``remote`` section live).

Config (``remote``): ``enabled``, ``url``, ``token``, ``heartbeat_interval`` (30 s),
``report_power_state`` (false), ``timeout`` (10 s per request), ``outbox_max`` (100 000;
beyond it the oldest updates are dropped with an error log). While ``enabled`` is false
nothing new is recorded and nothing is sent; queued updates wait for it to be true again.

Routes: ``GET /remote/status`` [ext] → ``{"healthy", "last_ok", "last_error",
"pending_updates", …}``.

Services: ``remote-heartbeat`` and ``remote-sender``; both report ready at once, so a
dead panel never holds up the agent's start.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any

from lightd import Agent, Config, Migration, Service, hookimpl
from lightd.api import describe
from quart import Blueprint

from .config import RemoteConfig
from .outbox import MIGRATIONS, register_metrics
from .sync import REMOTE_SYNC, RemoteStatus, RemoteSync

__all__ = ["REMOTE_SYNC", "RemoteConfig", "RemoteStatus", "RemoteSync"]


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"remote": RemoteConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    sync = agent.stash[REMOTE_SYNC] = RemoteSync(agent)
    register_metrics(agent.metrics, sync)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    sync = agent.stash[REMOTE_SYNC]
    return [
        Service("remote-heartbeat", sync.serve_heartbeat),
        Service("remote-sender", sync.serve_sender),
    ]


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    sync = agent.stash[REMOTE_SYNC]
    bp = Blueprint("remote_sync", __name__)

    @bp.get("/remote/status")
    @describe(
        "The link to the panel [ext]",
        description="Heartbeat health, the last success and error, and the updates "
        "waiting in the durable outbox.",
        tags=("remote",),
    )
    async def remote_status() -> RemoteStatus:
        return await sync.describe()

    return [bp]


@hookimpl
def lightd_container_state_changed(
    agent: Agent, internal_id: str, state: str, error: str | None
) -> Awaitable[None] | None:
    return agent.stash[REMOTE_SYNC].record(internal_id, state, error)


@hookimpl
def lightd_panel_update(
    agent: Agent, key: str, update: Mapping[str, Any]
) -> Awaitable[None] | None:
    return agent.stash[REMOTE_SYNC].record_update(key, update)


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> None:
    agent.stash[REMOTE_SYNC].forget(internal_id)


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    agent.stash[REMOTE_SYNC].config_changed(old.section(RemoteConfig), new.section(RemoteConfig))
