"""One supervisor per container: its state machine, power queue and console.

Everything that changes a container goes through its supervisor's queue and runs one at
a time, in order (contract §7.4). Requests are validated against the state the container
will be in once the queued actions have run, then queued; an answered request is never
dropped. A kill goes to the head of the queue and removes pending starts: a kill always
wins. The Docker ``die`` event (from the agent's single events stream) ends a run; a die
that no stop or kill asked for is a crash, and the restart policy decides whether the
server starts again.

A ``PATCH`` (``patch``) changes the record at once (what the next start reads; a change to
what the Docker container is made of marks it for recreation at that start) and queues a
``patch`` action for the live part, the limits (``docker update``), so it is ordered with
the power actions around it.

The console is one attach per run, opened before ``start`` so no output is lost: it
feeds the hub (history, subscribers), matches ``start_pattern`` on every line, and
carries stdin (commands, the ``stop_command``).

Failures stay inside the container they concern (contract §7.6): any exception while an
action, the console reader or the stats reader runs ends that piece of work only; the
container says so (``Error: …`` on its hub, ``error`` in its record, a failed install),
and nothing reaches the ``containers`` service, whose crash would cut every other
container. An exception that is not an ``AgentError`` or ``OSError`` is a bug: it is logged
once with its traceback, and still contained.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from ..converter import json_body
from ..docker import (
    AttachStream,
    ContainerSpec,
    DockerConflict,
    DockerEngine,
    DockerError,
    DockerNotFound,
)
from ..errors import AgentError, BadRequest, Conflict, DockerUnavailable, TooManyRequests
from ..logs import container_logger
from .console import LineSplitter
from .hub import EventHub
from .install import write_executable
from .models import (
    ContainerRecord,
    LimitsPatch,
    PortBinding,
    ResourcesRequest,
    RestartPolicy,
    RuntimeState,
)
from .settings import ContainersSettings
from .specs import extra_resources, update_fields
from .startpattern import StartPattern
from .stats import StatsReader, StatsSettings

__all__ = ["MAX_PENDING", "ContainerSupervisor", "SupervisorHost"]

log = logging.getLogger(__name__)

#: Actions queued behind the running one, per container, at most: beyond, a request is
#: refused (429) rather than queued, so a client cannot grow the queue without bound.
MAX_PENDING = 16
#: Actions logged when requested and when done (the operator's lifecycle lines).
_LOGGED = frozenset({"start", "stop", "restart", "kill", "reinstall", "rebind"})


@attrs.define(eq=False)
class Action:
    kind: str
    args: dict[str, Any] = attrs.Factory(dict)
    #: Set when the action has run (however it ended): the boot waits on it.
    done: trio.Event = attrs.Factory(trio.Event)


#: What each power action makes of the desired state (§17): stored when the action runs.
_DESIRED = {"start": True, "restart": True, "stop": False, "kill": False, "reinstall": False}


#: Record fields a ``PATCH`` changes that the next start reads (``applies: next_start``);
#: every other (limits, resources, stop command, restart policy) applies at once.
_NEXT_START = frozenset({"image", "environment", "startup_command", "start_pattern"})
#: The 409 of a ``PATCH`` (and the resources alias) while the container installs: the
#: contract names no message; this one follows rebind's.
PATCH_INSTALLING = "Cannot update container while it is installing"
#: Engine fields a live update is checked for (read back), with their API names: the
#: engine discards some with only a warning (a block I/O weight the kernel lacks).
_VERIFIED = {
    "Memory": "memory",
    "NanoCpus": "cpu",
    "PidsLimit": "pids",
    "CpuShares": "cpu_shares",
    "CpusetCpus": "cpuset_cpus",
    "BlkioWeight": "blkio_weight",
}


def _build_key(record: ContainerRecord) -> tuple[Any, ...]:
    """What the server container is made of that a ``PATCH`` may change (its image,
    environment, entrypoint script; ``SERVER_MEMORY``): equal keys, same container."""
    return (record.image, record.environment, record.startup_command, record.limits.memory)


def entrypoint_script(startup_command: str) -> str:
    return (
        "#!/bin/sh\n"
        "# Written by lightd at every install; edit the startup command instead.\n"
        "cd /home/container || exit 1\n"
        f"exec /bin/sh -c {shlex.quote(startup_command)}\n"
    )


class SupervisorHost(Protocol):
    """What a supervisor needs of the rest of the node: Docker, the record store,
    notifications, ports, settings, and the container mapping. The ``Containers``
    manager provides it; the supervisor knows nothing else of it."""

    @property
    def docker(self) -> DockerEngine: ...

    @property
    def settings(self) -> ContainersSettings: ...

    def check_start(self, internal_id: str, volume_id: str) -> None:
        """Raise an ``ApiError`` when plugins refuse a start (``lightd_container_starting``:
        e.g. ``409 Disk quota exceeded``)."""
        ...

    async def save_record(self, record: ContainerRecord) -> None:
        """Persist ``record`` (committed when this returns)."""
        ...

    async def notify(self, internal_id: str, state: str, error: str | None = None) -> None:
        """Tell plugins the container's state changed (``lightd_container_state_changed``)."""
        ...

    def data_path(self, internal_id: str) -> Path:
        """The agent's own folder for the container (entrypoint.sh, install.log)."""
        ...

    async def check_mounts(self, mount: dict[str, str]) -> None:
        """``BadRequest`` unless every extra mount is still allowed."""
        ...

    async def server_spec(self, record: ContainerRecord) -> ContainerSpec:
        """The server container of ``record``."""
        ...

    async def remove_docker_container(self, internal_id: str, *, role: str | None) -> None:
        """Remove the container's Docker containers (of one role, or all)."""
        ...

    async def ensure_image(self, image: str, message: Callable[[str], None]) -> None:
        """Pull ``image`` unless the engine has it (``InstallFailed`` when it cannot)."""
        ...

    async def run_install_script(
        self, record: ContainerRecord, image: str, console: Callable[[list[str]], None]
    ) -> None:
        """Run the record's install script from ``image`` (``InstallFailed`` on failure)."""
        ...

    async def set_ports(self, internal_id: str, ports: Sequence[PortBinding]) -> None:
        """Make ``ports`` exactly what the container holds in the port pool."""
        ...

    async def network_changed(self, internal_id: str, ports: Sequence[PortBinding]) -> None:
        """Tell plugins the (re)created server publishes ``ports``."""
        ...


class ContainerSupervisor:
    def __init__(
        self,
        host: SupervisorHost,
        record: ContainerRecord,
        hub: EventHub,
        stats_settings: Callable[[], StatsSettings],
    ) -> None:
        self.host = host
        self.record = record
        #: Lines about this container carry its ``internal_id``.
        self.log = container_logger(record.internal_id, log)
        self.state: RuntimeState = "offline"
        self._view_body: tuple[tuple[Any, ...], bytes] | None = None
        self.hub = hub
        self.stats = StatsReader(host.docker, hub, self, stats_settings)
        self._stdin = trio.Lock()
        self.exit_code: int | None = None
        self.started_at: float | None = None
        self._queue: deque[Action] = deque()
        self._wake = trio.Event()
        self._current: Action | None = None
        self._current_scope: trio.CancelScope | None = None
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._stream: AttachStream | None = None
        self._console_scope: trio.CancelScope | None = None
        #: Set when the current run's console reader has read everything (or was cut).
        self._console_done = trio.Event()
        self._stop_asked = False
        #: An install or reinstall was accepted and has not reached ready/failed yet.
        self._install_pending = False
        self._exited = trio.Event()
        self._exit_seen = False
        self._oom = False
        self._crashes: deque[float] = deque()
        self._pattern = _start_pattern(record)
        #: The ``start_pattern`` that ``_pattern`` was made from (a PATCH changes it for
        #: the next start).
        self._pattern_source = record.start_pattern

    @property
    def internal_id(self) -> str:
        return self.record.internal_id

    # -- the supervisor's life ----------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled. Each action, the console and the stats contain their own
        failures; should anything still escape (a bug), the supervisor logs it, says so on
        the hub and runs again, rather than let it reach the service."""
        started = False
        with self._scope:
            while True:
                try:
                    async with trio.open_nursery() as nursery:
                        self._nursery = nursery
                        await nursery.start(self.hub.run)
                        if not started:
                            started = True
                            task_status.started()
                        if self.state != "offline" and self.record.container_id:
                            await self._reattach(self.record.container_id)
                        await self._work()
                except Exception as exc:
                    self.log.exception("supervisor failed (a bug); running it again")
                    self._close_console()
                    self._current = None
                    self._current_scope = None
                    self.hub.message(f"Error: {_reason(exc)}")
                    await trio.sleep(1)

    def cancel(self) -> None:
        """Stop everything this supervisor does (the container is being deleted)."""
        for action in self._queue:
            action.done.set()  # dropped: nobody waits for it forever
        self._queue.clear()
        self._scope.cancel()

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._wake = trio.Event()
                await self._wake.wait()
            action = self._queue.popleft()
            self._current = action
            try:
                with trio.CancelScope() as scope:
                    self._current_scope = scope
                    await self._desire(action)
                    await getattr(self, f"_do_{action.kind}")(**action.args)
                if action.kind in _LOGGED:
                    done = "cut short by a kill" if scope.cancelled_caught else "done"
                    self.log.info("%s %s (state %s)", action.kind, done, self.state)
            except Exception as exc:  # the action ends here; the container says why
                await self._action_failed(action, exc)
            finally:
                action.done.set()
                self._current = None
                self._current_scope = None
                if action.kind in ("install", "reinstall"):
                    # However it ended, only installs still queued keep it pending.
                    self._install_pending = any(
                        a.kind in ("install", "reinstall") for a in self._queue
                    )

    async def _desire(self, action: Action) -> None:
        """Store the desired state a power action stands for, before it runs: a crash of
        the agent half-way still leaves what the panel asked for."""
        should_run = _DESIRED.get(action.kind)
        if should_run is not None and should_run != self.record.should_run:
            await self._set_record(should_run=should_run)

    async def _action_failed(self, action: Action, exc: Exception) -> None:
        """Tell the container's clients (and its record) that ``action`` failed; settle a
        state the action left half-way. Never raises: this is where failures stop."""
        reason = _reason(exc)
        try:
            if _expected(exc):
                self.log.warning("%s failed: %s", action.kind, reason)
            else:
                self.log.error("%s failed unexpectedly (a bug)", action.kind, exc_info=exc)
            self.hub.message(f"Error: {reason}")
            install = action.kind in ("install", "reinstall")
            if install and (not _expected(exc) or self.record.install_state == "installing"):
                self._install_pending = False
                await self._set_record(install_state="failed", error=reason)
                await self.host.notify(self.internal_id, "failed", reason)
            elif not _expected(exc):
                await self._set_record(error=reason)
                if self.state in ("starting", "stopping"):
                    await self._settle()
        except (AgentError, OSError) as again:
            self.log.warning("after %s failed: %s", action.kind, again)
        except Exception:
            self.log.exception("could not record the failure of %s", action.kind)

    async def _settle(self) -> None:
        """After a failed action: make the state what Docker says."""
        container_id = self.record.container_id
        running = False
        if container_id:
            try:
                info = await self.host.docker.inspect_container(container_id)
                running = bool(info["State"]["Running"])
            except DockerNotFound:
                running = False
        if running and container_id:
            if self._stream is None:
                await self._reattach(container_id)
            await self._set_state("running")
        else:
            self._close_console()
            self._exited.set()
            await self._set_state("offline")

    async def _reattach(self, container_id: str) -> None:
        """Open the console of a server that runs on without one (after a failure)."""
        self._exited = trio.Event()
        self._exit_seen = False
        try:
            await self._attach(container_id)
        except (AgentError, OSError) as exc:
            self.log.warning("re-attach failed: %s", exc)

    # -- requests (validated now, run later, in order) ------------------------------------

    def _projected_running(self) -> bool:
        """Will the server be up once the queued actions have run?"""
        running = self.state != "offline"
        actions = [self._current] if self._current else []
        for action in [*actions, *self._queue]:
            if action.kind in ("start", "restart"):
                running = True
            elif action.kind in ("kill", "stop", "reinstall"):
                running = False
        return running

    def busy_with(self, kind: str) -> bool:
        """Is an action of ``kind`` running or queued?"""
        return any(
            a.kind == kind for a in [*([self._current] if self._current else []), *self._queue]
        )

    def installing(self) -> bool:
        """Installing now, or an install is asked for and has not finished."""
        return self.record.install_state == "installing" or self._install_pending

    def submit(self, kind: str, **args: Any) -> Action:
        """Validate a power or change request against the projected state and queue it.

        Raises ``Conflict`` with the contract's message when it cannot be done.
        """
        ready = self.record.install_state == "ready" and not self.installing()
        if kind == "start":
            if not ready:
                raise Conflict("Container is not ready", code="not_ready")
            if self._projected_running():
                raise Conflict("Container is already running", code="already_running")
            self.host.check_start(self.internal_id, self.record.volume_id)
        elif kind == "kill":
            if self.state == "offline" and not self._projected_running():
                raise Conflict("Container is not running", code="not_running")
        elif kind == "stop":
            if not self._projected_running():
                raise Conflict("Container is not running", code="not_running")
        elif kind == "restart":
            if not ready:
                raise Conflict("Container is not ready", code="not_ready")
            self.host.check_start(self.internal_id, self.record.volume_id)
        elif kind == "reinstall":
            if self.installing():
                raise Conflict("Container is already being installed", code="installing")
            # The install script runs on the volume as a start would: what holds the volume
            # (a restore, a transfer reading it) or refuses to let it grow refuses this too.
            self.host.check_start(self.internal_id, self.record.volume_id)
        elif kind == "patch":
            if self.installing():
                raise Conflict(PATCH_INSTALLING, code="installing")
        elif kind == "rebind":
            if self.installing():
                raise Conflict(
                    "Cannot rebind network while container is installing", code="installing"
                )
            if self.busy_with("rebind"):
                # Each rebind reserves on top of the ports held now; two in a row would
                # free each other's.
                raise Conflict("Network rebinding already in progress", code="rebinding")
        # A restart right behind another pending one would do nothing the first does not:
        # it is absorbed (and answered as accepted), as is a second pending kill below.
        if kind == "restart" and self._queue and self._queue[-1].kind == "restart":
            return self._queue[-1]
        if kind != "kill" and len(self._queue) >= MAX_PENDING:  # a kill always gets in
            raise TooManyRequests(
                f"Too many pending actions (max {MAX_PENDING})", code="too_many_actions"
            )
        action = Action(kind, args)
        if kind in ("install", "reinstall"):
            self._install_pending = True
        if kind == "kill":
            # A kill always wins: pending starts are dropped, a running start, restart or
            # stop is cut short (each cleans up after itself), and the kill runs next.
            for dropped in [a for a in self._queue if a.kind in ("start", "restart")]:
                self._queue.remove(dropped)
                dropped.done.set()
            current = self._current
            if current and current.kind in ("start", "restart", "stop") and self._current_scope:
                self._current_scope.cancel()
            pending = next((a for a in self._queue if a.kind == "kill"), None)
            if pending is not None:
                return pending
            self._queue.appendleft(action)
        else:
            self._queue.append(action)
        self._wake.set()
        if kind in _LOGGED:
            self.log.info("%s requested", kind)
        return action

    async def patch(
        self,
        changes: dict[str, Any],
        *,
        limits: LimitsPatch | None = None,
        resources: ResourcesRequest | None = None,
    ) -> str:
        """Change the record in place (``PATCH``, and the resources alias): ``changes``
        are record fields; ``limits`` and ``resources`` are merged into the record's.
        Returns ``"now"`` or ``"next_start"`` (contract §17).

        The record is changed and stored before the answer: ``GET`` shows the new values
        at once, and a start that runs after this reads them (a change to what the Docker
        container is made of marks it ``recreate_pending``, so that start recreates it).
        Limits go live through the queue (a ``patch`` action, ordered with the power
        actions around it: a start under way finishes first, then the running server is
        updated), and this waits for it: when it answers, the engine has them, or it
        refused them and nothing of the request stays (``BadRequest``).
        """
        if self.installing():
            raise Conflict(PATCH_INSTALLING, code="installing")
        record = self.record
        if limits is not None:
            changes["limits"] = limits.apply(record.limits)
        if resources is not None:
            changes["limits"], changes["resources"] = resources.apply(
                changes.get("limits", record.limits), record.resources
            )
        changed = {k: v for k, v in changes.items() if getattr(record, k) != v}
        applies = "next_start" if _NEXT_START.intersection(changed) else "now"
        if not changed:
            return applies
        live = "limits" in changed or "resources" in changed
        outcome: list[Exception] = []
        action = self.submit("patch", outcome=outcome) if live else None
        if _build_key(attrs.evolve(record, **changed)) != _build_key(record):
            changed["recreate_pending"] = True
        self.log.info("changing %s (applies %s)", ", ".join(sorted(changed)), applies)
        await self._set_record(**changed)
        if action is None:
            return applies
        await action.done.wait()
        if outcome:
            # All or none: what this request set goes back (unless changed again since).
            now = self.record
            back = {k: getattr(record, k) for k, v in changed.items() if getattr(now, k) == v}
            if back:
                await self._set_record(**back)
            raise outcome[0]
        return applies

    async def _do_patch(self, outcome: list[Exception]) -> None:
        """Apply the record's limits and resources to its Docker container (``docker
        update``: live when it runs); read them back, since the engine drops some
        settings the kernel cannot apply with only a warning. A refusal goes to
        ``outcome`` (the ``PATCH`` answers it), not to the container's clients."""
        container_id = self.record.container_id
        if not container_id:
            return  # created at the next start, with the new values
        fields = update_fields(self.record.limits, self.record.resources)
        try:
            await self.host.docker.update_container(container_id, fields)
            info = await self.host.docker.inspect_container(container_id)
        except DockerNotFound:
            return  # vanished: the next start recreates it from the record
        except DockerError as exc:
            outcome.append(BadRequest(f"Docker refused the change: {exc}", code="docker_refused"))
            return
        except DockerUnavailable as exc:
            outcome.append(exc)
            return
        applied = info.get("HostConfig") or {}
        for key, name in _VERIFIED.items():
            if key in fields and applied.get(key) != fields[key]:
                outcome.append(
                    BadRequest(
                        f"{name}: not supported on this node (the engine discarded it)",
                        code="docker_refused",
                    )
                )
                return

    def restart_policy(self) -> RestartPolicy:
        """The container's own restart policy, else the node's (``crash_restart``)."""
        return self.record.restart_policy or self.host.settings.crash_restart.policy

    async def send_command(self, text: str) -> None:
        """Write a console command to the server's stdin (a newline is added if missing)."""
        stream = self._stream
        if stream is None or self.state == "offline":
            raise Conflict("Container is not running", code="not_running")
        if not text.endswith("\n"):
            text += "\n"
        try:
            async with self._stdin:  # one writer: concurrent sends would interleave
                await stream.send(text.encode("utf-8"))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise Conflict("Container is not running", code="not_running") from None

    # -- state --------------------------------------------------------------------------

    async def _set_state(self, state: RuntimeState) -> None:
        if state == self.state:
            return
        self.state = state
        if state != "offline":
            self.hub.event(state)
        await self.host.notify(self.internal_id, state)

    async def _set_record(self, **changes: Any) -> None:
        old = self.record
        new = self.record = attrs.evolve(old, updated_at=int(time.time()), **changes)
        try:
            await self.host.save_record(new)
        except Exception:
            # Not stored (a value the store refuses): the record stays what is stored.
            if self.record is new:
                self.record = old
            raise

    # -- install ------------------------------------------------------------------------

    async def _do_install(self, start_after: bool = False) -> None:
        record = self.record
        if record.install_state != "installing":
            await self._set_record(install_state="installing", error=None)
        self.hub.event("installing")
        await self.host.notify(self.internal_id, "installing")
        self.log.info("install started (image %s)", self.record.image)
        try:
            container_id = await self._install_steps()
        except Exception as exc:  # whatever failed, the install ends failed
            reason = _reason(exc)
            if not _expected(exc):
                self.log.error("install failed unexpectedly (a bug)", exc_info=exc)
            self.log.warning("install failed: %s", reason)
            self._install_pending = False
            await self._set_record(install_state="failed", error=reason)
            self.hub.message(f"Error: {reason}")
            await self.host.notify(self.internal_id, "failed", reason)
            return
        self._install_pending = False
        await self._set_record(
            install_state="ready", error=None, container_id=container_id, recreate_pending=False
        )
        self.hub.event("installed")
        await self.host.notify(self.internal_id, "ready")
        self.log.info("install finished: ready")
        if start_after:
            self._queue.appendleft(Action("start"))

    async def _install_steps(self) -> str:
        """Everything an install does; returns the new server container's id."""
        record = self.record
        host = self.host
        if record.install_script:
            image = record.install_image or record.image
            await host.ensure_image(image, self.hub.message)
            self.hub.message("Running install script")
            await host.run_install_script(record, image, self.hub.console)
            self.hub.message("Install script finished")
        return await self._recreate(persist=False)

    async def _recreate(self, *, persist: bool = True) -> str:
        """Write entrypoint.sh and (re)create the server container, not started.

        The fast path is one engine request: an old container is removed first only when
        the record knows one; a leftover it does not know (a crash between create and
        record) shows as a name conflict, and a missing image as not found; each is
        mended once and the create retried. ``persist=False`` leaves recording the new
        id to the caller (the install records it with ``ready``, in one write).
        """
        host = self.host
        record = self.record
        data = host.data_path(record.internal_id)
        script = entrypoint_script(record.startup_command)
        await trio.to_thread.run_sync(write_executable, data / "entrypoint.sh", script)
        await host.check_mounts(record.mount)  # again: links may have appeared since
        if record.container_id:
            await host.remove_docker_container(record.internal_id, role="server")
        spec = await host.server_spec(record)
        try:
            container_id = await host.docker.create_container(spec)
        except DockerConflict:
            await host.remove_docker_container(record.internal_id, role="server")
            container_id = await host.docker.create_container(spec)
        except DockerNotFound:
            await host.ensure_image(record.image, self.hub.message)
            container_id = await host.docker.create_container(spec)
        if extras := extra_resources(record.resources):
            await host.docker.update_container(container_id, extras)
        await host.network_changed(record.internal_id, record.ports)
        if persist:
            # A PATCH that came while this was under way leaves the next start its work.
            pending = self.record.recreate_pending and _build_key(self.record) != _build_key(record)
            await self._set_record(container_id=container_id, recreate_pending=pending)
        return container_id

    # -- power --------------------------------------------------------------------------

    async def _ensure_container(self) -> str:
        """The server container a start runs, (re)created when it must be: a PATCH changed
        what it is made of, or there is none. The start pattern is the record's too.
        Whether the engine still has it is not asked here (an engine call per start):
        the attach that follows says so, and ``_vanished`` makes it anew."""
        if self._pattern_source != self.record.start_pattern:
            self._pattern_source = self.record.start_pattern
            self._pattern = _start_pattern(self.record)
        container_id = self.record.container_id
        if container_id and self.record.recreate_pending:
            self.log.info("recreating the Docker container (changed by a PATCH)")
            return await self._recreate()
        if container_id:
            return container_id
        return await self._recreate()

    async def _vanished(self) -> str:
        """The record's Docker container is gone (removed behind the agent's back)."""
        self.log.info("Docker container vanished; recreating it")
        await self._set_record(container_id=None)
        return await self._recreate()

    async def _do_start(self) -> None:
        if self.record.install_state != "ready":
            raise Conflict("Container is not ready")
        if self.state != "offline":
            return
        container_id = await self._ensure_container()
        self._stop_asked = False
        self._oom = False
        self._exited = trio.Event()
        self._exit_seen = False
        # Attached first: no output is lost, and stdin works from the first "starting".
        try:
            await self._attach(container_id)
        except DockerNotFound:
            container_id = await self._vanished()
            await self._attach(container_id)
        try:
            await self._set_state("starting")
            await self.host.check_mounts(self.record.mount)  # Docker resolves them now
            await self.host.docker.start(container_id)
        except BaseException:
            self._close_console()
            with trio.CancelScope(shield=True):
                await self._set_state("offline")
            raise
        if self._exit_seen:
            return  # it exited (and was told) before the start call even returned
        self.started_at = time.time()
        self.exit_code = None
        if self.record.error and self.record.install_state == "ready":
            await self._set_record(error=None)  # an earlier action's failure is over
        self.hub.message("Container started")
        if self._pattern is None:
            await self._set_state("running")

    async def _do_kill(self) -> None:
        # Signalled even when the state says offline: a start cut short by this kill may
        # have reached Docker just before it was cancelled.
        self._stop_asked = True
        container_id = self.record.container_id
        if self.state != "offline":
            await self._set_state("stopping")
        if container_id:
            try:
                await self.host.docker.kill(container_id, "SIGKILL")
            except DockerError as exc:
                self.log.info("kill: %s", exc)  # not running
        if self.state != "offline":
            await self._wait_exit(10)

    async def _do_stop(self, grace: float | None = None) -> None:
        if self.state == "offline":
            return
        if grace is None:
            grace = self.host.settings.stop_timeout
        self._stop_asked = True
        await self._set_state("stopping")
        container_id = self.record.container_id
        command = self.record.stop_command
        with trio.move_on_after(grace):
            # The stdin write counts against the grace too: a server that never reads
            # stdin must not hold the stop (and the queue) forever.
            try:
                if command and self._stream is not None:
                    await self.send_command(command)
                elif container_id:
                    await self.host.docker.kill(container_id, "SIGTERM")
            except (DockerError, Conflict) as exc:
                self.log.info("stop: %s", exc)
            await self._exited.wait()
        if not self.offline:
            try:
                if container_id:
                    await self.host.docker.kill(container_id, "SIGKILL")
            except DockerError as exc:
                self.log.info("kill after stop: %s", exc)
            await self._wait_exit(10)

    async def _do_restart(self) -> None:
        await self._do_stop()
        await self._do_start()
        self.hub.message("Container restarted")

    async def _do_reinstall(self, image: str | None, install_script: str | None) -> None:
        await self._do_stop()
        changes: dict[str, Any] = {"install_state": "installing", "error": None}
        if image is not None:
            changes["image"] = image
        if install_script is not None:
            changes["install_script"] = install_script or None
        await self._set_record(**changes)
        await self._do_install()

    async def _do_rebind(self, ports: tuple[PortBinding, ...]) -> None:
        """Recreate the server with ``ports`` (already reserved next to the old ones)."""
        was_running = self.state != "offline"
        old = self.record.ports
        try:
            await self._do_stop()
            await self._set_record(ports=ports)
            await self._recreate()
        except BaseException:
            with trio.CancelScope(shield=True):
                # All or none: back to the old bindings, the new ports given back.
                await self._set_record(ports=old)
                await self.host.set_ports(self.internal_id, old)
            raise
        await self.host.set_ports(self.internal_id, ports)
        self.hub.message("Network rebound")
        if was_running:
            await self._do_start()

    async def _wait_exit(self, seconds: float) -> None:
        """Wait for the die event; if it never comes, ask Docker and settle the state."""
        with trio.move_on_after(seconds):
            await self._exited.wait()
        if self._exited.is_set():
            if self.state != "offline":  # the exit was seen while a start still ran
                self.state = "offline"
                await self.host.notify(self.internal_id, "offline")
            return
        container_id = self.record.container_id
        try:
            if not container_id:
                raise DockerNotFound("no container")
            info = await self.host.docker.inspect_container(container_id)
            running = bool(info["State"]["Running"])
            code = int(info["State"].get("ExitCode", 0))
        except DockerNotFound:
            running, code = False, 0
        if not running:
            await self.on_exit(code, oom=False)

    # -- console ------------------------------------------------------------------------

    async def _attach(self, container_id: str) -> None:
        self._close_console()
        assert self._nursery is not None
        await self._nursery.start(self._serve_console, container_id)

    def _close_console(self) -> None:
        if self._console_scope is not None:
            self._console_scope.cancel()
            self._console_scope = None
        self._stream = None

    async def _serve_console(
        self, container_id: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        done = self._console_done = trio.Event()
        started = False
        with trio.CancelScope() as scope:
            self._console_scope = scope
            try:
                async with self.host.docker.attach(container_id) as stream:
                    self._stream = stream
                    started = True
                    task_status.started()
                    async with trio.open_nursery() as run:
                        run.start_soon(self.stats.run, container_id)
                        await self._read_console(stream)
                        run.cancel_scope.cancel()
            except Exception as exc:
                if not started:
                    raise  # the start that opens it fails, and says why
                # The console of this run ends; the server and everything else go on.
                if _expected(exc):
                    self.log.warning("console reading failed: %s", exc)
                else:
                    self.log.error("console reading failed (a bug)", exc_info=exc)
                self.hub.message(f"Error: {_reason(exc)}")
        done.set()
        if self._console_scope is scope:
            self._console_scope = None
            self._stream = None

    async def _read_console(self, stream: AttachStream) -> None:
        splitter = LineSplitter()
        while (chunk := await stream.receive()) is not None:
            if lines := splitter.feed(chunk):
                await self._lines(lines)
                await self.hub.pace()  # clients that keep up get every line (hub.py)
        if lines := splitter.close():
            await self._lines(lines)

    async def _lines(self, lines: list[str]) -> None:
        self.hub.console(lines)
        pattern = self._pattern
        # Matched within a time budget, mostly off the event loop (see startpattern): the
        # console of this container may wait for it, nothing else does.
        matched = self.state == "starting" and pattern is not None and await pattern.matches(lines)
        if matched and self.state == "starting":  # (a stop may have come meanwhile)
            self.hub.message("Server started")
            await self._set_state("running")

    # -- Docker events ------------------------------------------------------------------

    def on_oom(self) -> None:
        self._oom = True

    async def on_exit(self, exit_code: int, *, oom: bool) -> None:
        """The server process ended (die event, or found ended)."""
        if self.state == "offline" or self._exit_seen:
            return
        self._exit_seen = True  # the die event and a reconcile may both report it
        self.exit_code = exit_code
        crashed = not self._stop_asked
        # The attach ends by itself right after the process; let it deliver the last
        # lines (what a crash printed) before the exit is told, but never wait long.
        self.hub.release()  # read at once, not paced for slow clients (hub.py)
        with trio.move_on_after(0.5):
            await self._console_done.wait()
        self._close_console()
        self.hub.event("exit")
        if crashed:
            why = " (out of memory)" if (oom or self._oom) else ""
            self.hub.message(f"Container crashed (exit code {exit_code}){why}")
            self.log.warning("crashed (exit code %d)%s", exit_code, why)
        else:
            self.hub.message("Container stopped")
            self.log.info("stopped (exit code %d)", exit_code)
        self.state = "offline"
        self._exited.set()
        await self.host.notify(self.internal_id, "offline")
        if crashed:
            self._maybe_restart(exit_code)

    def _maybe_restart(self, exit_code: int) -> None:
        """Queue a start after an exit nobody asked for, as the restart policy says."""
        policy = self.restart_policy()
        if not policy.restarts_after(exit_code):
            return
        try:  # plugins may refuse it as any start (a restore holds the volume…)
            self.host.check_start(self.internal_id, self.record.volume_id)
        except AgentError as exc:
            self.hub.message(f"Not restarting: {exc}")
            return
        now = time.monotonic()
        while self._crashes and now - self._crashes[0] > policy.window_s:
            self._crashes.popleft()
        if len(self._crashes) >= policy.max_restarts:
            self.hub.message("Crash restart limit reached; not restarting")
            self.log.warning(
                "crash restart limit reached (%d in %.0fs); not restarting",
                policy.max_restarts,
                policy.window_s,
            )
            return
        self._crashes.append(now)
        self.hub.message("Restarting after crash")
        self.log.info(
            "restarting after crash (%d of %d in %.0fs)",
            len(self._crashes),
            policy.max_restarts,
            policy.window_s,
        )
        self._queue.append(Action("start"))
        self._wake.set()

    async def adopt(self, container_id: str) -> None:
        """A server already running when the agent started: re-attach, mark running."""
        if self.record.container_id != container_id:
            await self._set_record(container_id=container_id)
        self._stop_asked = False
        self._exited = trio.Event()
        self._exit_seen = False
        await self._attach(container_id)
        info = await self.host.docker.inspect_container(container_id)
        self.started_at = _docker_time(info["State"].get("StartedAt", "")) or time.time()
        await self._set_state("running")

    @property
    def offline(self) -> bool:
        """The server process is not running (the state may change across an await)."""
        return self.state == "offline"

    @property
    def idle(self) -> bool:
        """Nothing running or queued (tests wait for this before judging an outcome)."""
        return self._current is None and not self._queue

    def view(self) -> dict[str, Any]:
        body = self.record.describe()
        body["state"] = self.state
        body["exit_code"] = self.exit_code
        body["started_at"] = int(self.started_at) if self.started_at else None
        body["restart_policy"] = attrs.asdict(self.restart_policy())  # the effective one
        return body

    def view_body(self) -> bytes:
        """``view()`` as sent, kept until something in it changes: panels poll it, and
        building and encoding it is most of what the fast read path costs."""
        # The record is frozen and replaced on every change: identity says "unchanged".
        key = (self.record, self.state, self.exit_code, self.started_at)
        cached = self._view_body
        if cached is None or cached[0] != key:
            cached = self._view_body = (key, json_body(self.view()))
        return cached[1]


def _docker_time(text: str) -> float | None:
    """Docker's RFC 3339 time with nanoseconds (``2026-11-21T22:40:01.123456789Z``)."""
    try:
        moment = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return None
    return moment.timestamp()


def _start_pattern(record: ContainerRecord) -> StartPattern | None:
    if not record.start_pattern:
        return None
    try:
        return StartPattern(record.start_pattern)
    except Exception as exc:  # a record stored before the pattern was checked this way
        container_logger(record.internal_id, log).warning("start_pattern ignored: %s", exc)
        return None


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _expected(exc: BaseException) -> bool:
    """An error the agent raises on purpose, or the system's: not a bug."""
    return isinstance(_leaf(exc), AgentError | OSError)


def _reason(exc: BaseException) -> str:
    exc = _leaf(exc)
    if not isinstance(exc, AgentError | OSError):
        # A bug: its text may hold anything (a path, a request's bytes); the log has it.
        return f"Internal error ({type(exc).__name__})"
    if isinstance(exc, DockerUnavailable):
        return "Docker engine unreachable"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__  # never the agent's own paths
    return str(exc) or type(exc).__name__
