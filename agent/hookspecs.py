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

from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from quart import Blueprint

    from .config import Config
    from .containers.install import InstallJob, InstallRun
    from .jobs import JobView
    from .runtime import Agent, Service
    from .store import Migration

PROJECT = "lightd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


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


@hookspec(firstresult=True)
def lightd_volume_in_use(agent: Agent, volume_id: str) -> str | None:
    """Which container uses this volume? Return its ``internal_id``, or ``None``.

    Asked before a volume is deleted; a non-``None`` answer refuses the deletion with
    ``409 Volume is in use by container <internal_id>``.

    :param agent: the running agent.
    :param volume_id: the volume about to be deleted.
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
