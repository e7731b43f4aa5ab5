"""Every hook of the agent, grouped by the phase in which the core calls it.

Hooks are synchronous (pluggy does not await). They come in three kinds:

* **declarations** return things for the core to own: config sections, schema
  migrations, routes, services. Called once, at start.
* **notifications** tell plugins something happened. An implementation may return an
  awaitable; the core awaits each one in turn, in the caller's task, so keep them short
  (queue the work for a service of yours if it is long).
* **decisions** are ``firstresult``: the first implementation that returns something
  other than ``None`` decides.

A hook never starts a task: long-running work is declared with ``lightd_add_services`` and
the core runs it in its own nursery. Implementations may accept fewer arguments than a
spec lists (pluggy passes only those named), so specs can grow without breaking plugins.

Order of the start-up calls::

    lightd_add_config_sections → lightd_add_migrations → lightd_configure
    → lightd_add_services → lightd_add_routes → (services start, API listens)
    → lightd_startup … lightd_config_reloaded … → lightd_shutdown
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from quart import Blueprint

    from .config import Config
    from .containers.install import InstallJob, InstallRun
    from .containers.stats import Sample
    from .interfaces import BackupTarget, PoolPort
    from .jobs import JobView
    from .runtime import Agent, Service
    from .store import Migration

PROJECT = "lightd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks added in this release: their arguments may still change in the next minor
#: version without a deprecation (docs/plugins.md, "Stability").
PROVISIONAL = frozenset(
    {
        "lightd_backup_targets",
        "lightd_container_network_changed",
        "lightd_container_starting",
        "lightd_panel_update",
        "lightd_stats_sample",
        "lightd_volume_deleted",
        "lightd_volume_running",
    }
)


# ---------------------------------------------------------------------------------------
# Declarations: called once while the agent is being built.
# ---------------------------------------------------------------------------------------


@hookspec
def lightd_add_config_sections() -> Mapping[str, type] | None:
    """Declare config sections of your own: ``{"section_name": AttrsClass}``.

    The class must be an attrs class whose every field has a default, so that a config
    file without the section keeps working. The core structures the section from
    config.json with the agent's converter (a bad value stops the agent with a one-line
    error naming the key) and reads it back typed by its class:
    ``agent.config.section(AttrsClass)``. A section may not reuse the name of a core
    section, and a class serves one section only.
    """


@hookspec
def lightd_add_migrations() -> Iterable[Migration] | None:
    """Declare the state store schema your plugin owns, as ``Migration`` steps.

    Use one ``namespace`` of your own (your plugin's name) and number its steps 1, 2, 3…;
    never edit a released step, add a new one. Steps missing from the store are applied at
    start, each in its own transaction. Tables should be prefixed with the namespace.
    """


@hookspec
def lightd_configure(agent: Agent) -> None:
    """The config is loaded and the store is open: build your plugin's state objects.

    Put them where routes and services find them: ``agent.stash[MY_KEY] = MyThing(...)``
    (see ``lightd.StashKey``). No I/O that can block here; do slow loading in a
    service before it reports ``started()``.

    :param agent: the agent being built.
    """


@hookspec
def lightd_add_services(agent: Agent) -> Iterable[Service] | None:
    """Declare long-running tasks for the core to run in its root nursery.

    Each ``Service`` wraps ``async def run(*, task_status)``; it must call
    ``task_status.started()`` once it is ready and then run until cancelled. Services are
    started, in declaration order, before the API listens; an error before ``started()``
    stops the agent from starting, a later crash is logged and the service restarted with
    a back-off (unless ``restart=False``).

    :param agent: the agent being built.
    """


@hookspec
def lightd_add_routes(agent: Agent) -> Iterable[Blueprint] | None:
    """Declare HTTP and WebSocket routes, as Quart blueprints.

    Every route requires the vendor header and a token unless its view is decorated with
    ``lightd.api.public``. Views must be ``async def``. Raise ``lightd.ApiError``
    subclasses for failures; read JSON bodies with ``lightd.api.read_json``. A view whose
    URL has an ``internal_id`` argument, or that is decorated with
    ``lightd.api.container_scoped``, is reachable by tokens restricted to containers.

    :param agent: the agent being built; capture it in your views' closure.
    """


# ---------------------------------------------------------------------------------------
# Agent lifecycle notifications.
# ---------------------------------------------------------------------------------------


@hookspec
def lightd_startup(agent: Agent) -> Awaitable[None] | None:
    """The services run and the API listens: the agent is up.

    :param agent: the running agent.
    """


@hookspec
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> Awaitable[None] | None:
    """``POST /remote/config/reload`` applied a new config; react to what changed.

    Called after the core applied its own live settings (master token, origins, body
    limit). ``agent.config`` is already ``new``.

    :param agent: the running agent.
    :param old: the config before the reload.
    :param new: the config now in force.
    """


@hookspec
def lightd_shutdown(agent: Agent) -> Awaitable[None] | None:
    """The API has stopped taking requests; services still run until this returns.

    Flush what must not be lost. The core bounds the whole shutdown with
    ``server.graceful_timeout``.

    :param agent: the stopping agent.
    """


# ---------------------------------------------------------------------------------------
# Containers: notifications and decisions.
# ---------------------------------------------------------------------------------------


@hookspec
def lightd_container_state_changed(
    agent: Agent, internal_id: str, state: str, error: str | None
) -> Awaitable[None] | None:
    """A container moved to a new state; called once per transition, in order.

    :param agent: the running agent.
    :param internal_id: the panel's id of the container.
    :param state: an install state (``installing``, ``ready``, ``failed``) or a runtime
        state (``offline``, ``starting``, ``running``, ``stopping``).
    :param error: why, when ``state`` is ``failed`` (otherwise ``None``).
    """


@hookspec
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[None] | None:
    """A container and its Docker objects were deleted; its ports are already free.

    :param agent: the running agent.
    :param internal_id: the panel's id of the deleted container.
    """


@hookspec
def lightd_container_network_changed(
    agent: Agent, internal_id: str, ports: Sequence[PoolPort]
) -> Awaitable[None] | None:
    """A container's server was (re)created publishing ``ports``: at the end of every
    create of its Docker container (install, recreate after a ``PATCH`` or when it
    vanished, rebind), before it is started. The container's action waits for it: note
    the ports and queue work for a service of yours (the ``firewall`` plugin re-renders
    the server's chains, which match the published host ports). A failing
    implementation is logged and does not fail the action.

    :param agent: the running agent.
    :param internal_id: the container.
    :param ports: the host ports it publishes (``ip``, ``port``, ``protocol``
        ``tcp|udp|both``), possibly none.
    """


@hookspec
def lightd_container_starting(agent: Agent, internal_id: str, volume_id: str) -> None:
    """Called before a start, restart or reinstall of a container is queued (by the API,
    the WebSocket or the boot of servers that should run), synchronously: an implementation
    refuses the start by raising an ``ApiError`` (the disk plugin: ``409 Disk quota
    exceeded`` while the volume is over its limit), which the caller answers as it is.
    Keep it cheap: no I/O (read what your plugin keeps in memory).

    :param agent: the running agent.
    :param internal_id: the container about to start.
    :param volume_id: the volume it mounts.
    """


@hookspec
def lightd_stats_sample(
    agent: Agent,
    internal_id: str,
    container_id: str,
    volume_id: str,
    started_at: float | None,
    sample: Sample,
) -> None:
    """A sample of a running container's counters, from its one stats reader (usage
    metering). Called for every sample the reader takes: about every ``stats.interval``
    while a client follows the container's stats, every ``stats.idle_interval`` (30 s)
    while none does, every tick while the server stops; the reader takes no sample when
    nobody listens and no plugin implements this hook. Called synchronously on the event
    loop inside the reader: keep it to arithmetic on memory (no I/O, never block); an
    implementation that raises is logged and ignored.

    :param agent: the running agent.
    :param internal_id: the container sampled.
    :param container_id: the Docker id of the run (counters are those of this Docker
        container; a recreate gives a new id).
    :param volume_id: the volume the container mounts.
    :param started_at: unix time the current run started (the counters count from
        there), ``None`` when unknown.
    :param sample: ``lightd.StatsSample``: cumulative counters (``cpu_ns`` CPU time,
        ``network_tx``/``network_rx`` bytes, ``block_*``) and gauges (``memory`` bytes);
        the counters restart from 0 when the container restarts.
    """


@hookspec(firstresult=True)
def lightd_volume_in_use(agent: Agent, volume_id: str) -> str | None:
    """Which container uses this volume? Return its ``internal_id``, or ``None``.

    Asked before a volume is deleted; a non-``None`` answer refuses the deletion with
    ``409 Volume is in use by container <internal_id>``.

    :param agent: the running agent.
    :param volume_id: the volume about to be deleted.
    """


@hookspec(firstresult=True)
def lightd_volume_running(agent: Agent, volume_id: str) -> str | None:
    """Which container using this volume is not offline (running, starting, stopping or
    installing)? Return its ``internal_id``, or ``None`` when all are offline.

    Asked before work that needs the volume to itself (a backup restore refuses with
    ``409 Volume in use by a running container``).

    :param agent: the running agent.
    :param volume_id: the volume concerned.
    """


@hookspec
def lightd_volume_deleted(agent: Agent, volume_id: str, backups: str) -> Awaitable[None] | None:
    """A volume was deleted (``DELETE /volumes/:id``); its folder is already gone.

    :param agent: the running agent.
    :param volume_id: the deleted volume.
    :param backups: what the client asked for the volume's backups, from
        ``?backups=``: ``"keep"`` (the default: they stay listed under the volume id and
        can still be downloaded) or ``"delete"`` (remove them from their targets).
    """


@hookspec(firstresult=True)
def lightd_run_install_script(agent: Agent, job: InstallJob) -> InstallRun | None:
    """Say how a container's install script runs: return an ``InstallRun``.

    Called during an install when the container has an ``install_script``. The core runs
    the answer in a container of the record, never on the host: it writes
    ``InstallRun.script`` to ``job.script_path``, creates the container from the run's
    image, entrypoint, environment, mounts and limits (``None`` fields take the job's)
    with the core's labels and hardening, streams its output to the console and
    ``install.log``, and fails the install on a non-zero exit
    (``Install script failed with exit code <n>``) or after the timeout
    (``Install script timed out``). The built-in ``install_scripts`` plugin implements
    it; with no implementation an install with a script fails.

    :param agent: the running agent.
    :param job: the script, image, limits, timeout, environment and mounts of this run.
    """


# ---------------------------------------------------------------------------------------
# Backups and the panel: declarations and notifications.
# ---------------------------------------------------------------------------------------


@hookspec
def lightd_backup_targets(agent: Agent) -> Mapping[str, BackupTarget] | None:
    """Declare backup targets (contract §16): ``{"name": target}``, called once when the
    ``backups`` plugin is configured.

    A target implements ``lightd.BackupTarget``: ``open_upload`` (an archive written in
    pieces of a few MiB, then ``commit`` or ``abort``; an aborted one leaves nothing),
    ``open_download`` (read back in order) and ``delete``. The built-in plugin declares
    ``local`` (under ``storage.backups_path``) and ``s3`` (when ``backups.s3`` has a
    bucket); a client names the target in ``POST /volumes/:id/backups {"target"}``. Two
    targets of one name stop the agent.

    :param agent: the agent being built.
    """


@hookspec
def lightd_panel_update(
    agent: Agent, key: str, update: Mapping[str, Any]
) -> Awaitable[None] | None:
    """Send ``update`` to the panel (contract §9): the ``remote_sync`` plugin commits it to
    its durable outbox (adding ``event_id`` and ``timestamp``) and delivers it in order
    per ``key``, retrying while the panel is away. Without remote sync (or with it
    switched off) the update is dropped.

    :param agent: the running agent.
    :param key: what orders updates (updates of one key are delivered in order): a
        container's ``internal_id``, or ``volume:<volume_id>``.
    :param update: the JSON body, e.g. ``{"event":"backup","volume_id",…}``; an
        ``event_id`` in it is kept (a deterministic id the panel can de-duplicate on, as
        metering's ``usage`` events have), else a UUID is added.
    """


# ---------------------------------------------------------------------------------------
# Jobs: notifications.
# ---------------------------------------------------------------------------------------


@hookspec
def lightd_job_changed(agent: Agent, job: JobView) -> Awaitable[None] | None:
    """A job was queued, started or made progress (contract §14).

    Called at most twice a second per job, with the job as it is then; not for its end
    (``lightd_job_done`` is). The container WebSocket turns it into
    ``{"event":"job","data":job.to_json()}`` for a job of its container, the node event
    stream into ``job.progress``. Progress is throttled by the runner, so forward it as it
    comes; a failing implementation is logged and never fails the job.

    :param agent: the running agent.
    :param job: a snapshot of the job (``lightd.JobView``; ``job.to_json()`` is the body
        of ``GET /jobs/:id``).
    """


@hookspec
def lightd_job_done(agent: Agent, job: JobView) -> Awaitable[None] | None:
    """A job ended: ``done``, ``failed`` or ``cancelled``, its cleanup already run.

    Called once per job, after its outcome is in the store (a job that a crash
    interrupted is marked ``failed`` at the next start without this call). The node event
    stream sends it as ``job.done``, the container WebSocket as a last ``job`` frame.

    :param agent: the running agent.
    :param job: the finished job (``lightd.JobView``), with ``error`` or ``result``.
    """
