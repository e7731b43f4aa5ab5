"""The containers of this node: registry, Docker mapping, reconciliation, events.

``Containers`` owns one ``ContainerSupervisor`` per container, started in its own
nursery (a service of the agent's root nursery), the agent's single Docker events
stream, and the reconciliation of records, Docker objects and pool ports at start and
after the engine comes back (contract §10): running servers are adopted, interrupted
installs fail, Docker containers and port reservations whose record is gone are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import posixpath
import shutil
import sqlite3
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from .. import files
from ..converter import converter, structure
from ..docker import ContainerSpec, DockerError, DockerNotFound
from ..errors import AgentError, BadRequest, Conflict, DockerUnavailable, NotFound
from ..interfaces import DISK, PORT_POOL, VOLUMES, PoolPort, PortRequest
from ..logs import container_logger
from ..store import Migration, Store
from .hub import CLOSE_SERVICE_RESTART, EventHub
from .install import InstallFailed, InstallJob, InstallRun, run_install, write_executable
from .models import (
    RESERVED_IDS,
    ContainerRecord,
    CreateRequest,
    PortBinding,
    PortSpec,
    Resources,
)
from .network import AgentNetwork
from .settings import ContainersSettings
from .specs import (
    LABEL_ID,
    LABEL_MANAGED,
    LABEL_NODE,
    LABEL_ROLE,
    container_spec,
    server_environment,
    standard_mounts,
)
from .startpattern import check_start_pattern
from .stats import StatsSettings
from .supervisor import ContainerSupervisor

if TYPE_CHECKING:
    from ..runtime import Agent

__all__ = [
    "MIGRATIONS",
    "Containers",
    "check_port_specs",
]

log = logging.getLogger(__name__)


MIGRATIONS = [
    Migration(
        "containers",
        1,
        """
        CREATE TABLE containers_records (
            internal_id TEXT PRIMARY KEY,
            data TEXT NOT NULL
        );
        CREATE TABLE containers_node (id TEXT NOT NULL);
        INSERT INTO containers_node VALUES (lower(hex(randomblob(8))))
        """,
    )
]


def check_port_specs(specs: Sequence[PortSpec]) -> None:
    """Each entry names a pool port (``ip`` + ``port``) or asks for any (``container_port``)."""
    for spec in specs:
        if spec.container_port is None and (spec.ip is None or spec.port is None):
            raise BadRequest("ports: each entry needs ip and port, or container_port")
        if spec.protocol not in ("tcp", "udp", "both"):
            raise BadRequest(
                f"Invalid protocol: {spec.protocol}",
                code="invalid_protocol",
                details=["protocol must be tcp, udp or both"],
            )
        if spec.container_port is not None and not 1 <= spec.container_port <= 65535:
            raise BadRequest(
                f"Invalid port: {spec.container_port}",
                code="invalid_port",
                details=["container_port must be an integer from 1 to 65535"],
            )


def normal_mounts(mount: dict[str, str]) -> dict[str, str]:
    """Host paths normalized (``/srv/a/../b`` → ``/srv/b``), as ``check_mounts`` judged
    them: Docker must get the path that was checked."""
    return {target: posixpath.normpath(source) for target, source in mount.items()}


class Repository:
    """Container records in the state store, one JSON document per container."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def node_id(self) -> str:
        rows = await self._store.read(
            lambda conn: conn.execute("SELECT id FROM containers_node").fetchall()
        )
        return str(rows[0]["id"])

    async def load(self) -> list[ContainerRecord]:
        rows = await self._store.read(
            lambda conn: conn.execute("SELECT data FROM containers_records").fetchall()
        )
        return [converter.structure(json.loads(row["data"]), ContainerRecord) for row in rows]

    async def insert(self, record: ContainerRecord) -> bool:
        """Add a record; ``False`` if the id is taken."""

        def insert(conn: sqlite3.Connection) -> bool:
            try:
                conn.execute(
                    "INSERT INTO containers_records VALUES (?, ?)",
                    (record.internal_id, _dump(record)),
                )
            except sqlite3.IntegrityError:
                return False
            return True

        return await self._store.write(insert)

    async def save(self, record: ContainerRecord) -> None:
        await self._store.execute(
            "UPDATE containers_records SET data = ? WHERE internal_id = ?",
            (_dump(record), record.internal_id),
        )

    async def delete(self, internal_id: str) -> None:
        await self._store.execute(
            "DELETE FROM containers_records WHERE internal_id = ?", (internal_id,)
        )


def _dump(record: ContainerRecord) -> str:
    return json.dumps(converter.unstructure(record), separators=(",", ":"))


def _pool_ports(ports: Sequence[PortBinding]) -> list[PoolPort]:
    return [PoolPort(p.ip, p.port, p.protocol) for p in ports]


def _stats_settings(agent: Agent) -> StatsSettings:
    return agent.config.section_or_default(StatsSettings)


class Containers:
    """Every container of the node; the ``SupervisorHost`` of each supervisor."""

    def __init__(self, agent: Agent, settings: ContainersSettings) -> None:
        self.agent = agent
        self.docker = agent.docker
        self.settings = settings
        self.repo = Repository(agent.store)
        self._supervisors: dict[str, ContainerSupervisor] = {}
        self._finished: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        #: Creates in progress: internal_id → the volume they claim. Taken before the
        #: first await of a create, so a volume delete or a reconcile sees them.
        self._claims: dict[str, str] = {}
        #: Deletes in progress: a create of the same id waits for them to finish (409).
        self._deleting: set[str] = set()
        self.reconciled = trio.Event()
        #: The boot of servers that should run (after a reconcile), while it runs.
        self._boot_scope: trio.CancelScope | None = None
        #: This agent's id on the engine (label ``lightd.node``), read from the store.
        self.node_id = ""
        #: The network every container joins (``docker.network``), and the API guard.
        self.network = AgentNetwork(
            agent.docker, agent.config.docker.network, {LABEL_MANAGED: "true"}
        )

    # -- lookups ------------------------------------------------------------------------

    def get(self, internal_id: str) -> ContainerSupervisor:
        supervisor = self._supervisors.get(internal_id)
        if supervisor is None:
            raise NotFound("Container not found", code="container_not_found")
        return supervisor

    def find(self, internal_id: str) -> ContainerSupervisor | None:
        return self._supervisors.get(internal_id)

    def all(self) -> list[ContainerSupervisor]:
        return [self._supervisors[k] for k in sorted(self._supervisors)]

    def using_volume(self, volume_id: str) -> str | None:
        for supervisor in self.all():
            if supervisor.record.volume_id == volume_id:
                return supervisor.internal_id
        for internal_id, claimed in self._claims.items():
            if claimed == volume_id:
                return internal_id
        return None

    def data_path(self, internal_id: str) -> Path:
        return self.agent.paths.containers / internal_id

    def images_in_use(self) -> dict[str, list[str]]:
        """Image reference → the containers whose record names it (``ContainerService``)."""
        used: dict[str, set[str]] = {}
        for supervisor in self.all():
            record = supervisor.record
            for image in (record.image, record.install_image):
                if image:
                    used.setdefault(image, set()).add(record.internal_id)
        return {image: sorted(ids) for image, ids in used.items()}

    def install_log(self, internal_id: str) -> Path:
        """Where the last install run's output is kept (``ContainerService``); ``NotFound``
        for an unknown container."""
        self.get(internal_id)
        return self.data_path(internal_id) / "install.log"

    def on_volume(self, volume_id: str) -> list[tuple[str, str]]:
        """The containers using ``volume_id`` and their states (``ContainerService``)."""
        return [
            (sup.internal_id, sup.state) for sup in self.all() if sup.record.volume_id == volume_id
        ]

    def daemon_message(self, internal_id: str, text: str) -> None:
        """A ``daemon_message`` to the container's clients (``ContainerService``)."""
        supervisor = self.find(internal_id)
        if supervisor is not None:
            supervisor.hub.message(text)

    def request_stop(self, internal_id: str) -> None:
        """Queue a stop (``ContainerService``); nothing when it is not running or gone."""
        supervisor = self.find(internal_id)
        if supervisor is not None:
            with contextlib.suppress(Conflict):
                supervisor.submit("stop")

    def volume_of(self, internal_id: str) -> str:
        """The volume the container mounts (``ContainerService``); ``NotFound``."""
        return self.get(internal_id).record.volume_id

    def published_ports(self, internal_id: str) -> list[PoolPort]:
        """The host ports the record publishes (``ContainerService``); ``NotFound``."""
        return _pool_ports(self.get(internal_id).record.ports)

    async def network_changed(self, internal_id: str, ports: Sequence[PortBinding]) -> None:
        """Tell plugins what a (re)created server publishes; a failing plugin is logged."""
        try:
            await self.agent.hooks.container_network_changed(
                self.agent, internal_id, _pool_ports(ports)
            )
        except Exception:
            container_logger(internal_id, log).exception("lightd_container_network_changed failed")

    def check_start(self, internal_id: str, volume_id: str) -> None:
        """Ask plugins whether the container may start (``lightd_container_starting``: a
        plugin raises an ``ApiError``, e.g. the disk plugin's 409 while the volume is over
        its limit); called by the supervisor before it queues a start or restart."""
        self.agent.hooks.container_starting(self.agent, internal_id, volume_id)

    def disk_bytes(self, volume_id: str) -> int | None:
        """The volume's usage as the disk service last knew it (stats frames)."""
        disk = self.agent.stash.get(DISK)
        return None if disk is None else disk.cached_bytes(volume_id)

    async def save_record(self, record: ContainerRecord) -> None:
        await self.repo.save(record)

    async def notify(self, internal_id: str, state: str, error: str | None = None) -> None:
        """Tell plugins; a plugin that fails is logged, and the container's action goes on."""
        try:
            await self.agent.hooks.container_state_changed(self.agent, internal_id, state, error)
        except Exception:
            container_logger(internal_id, log).exception(
                "lightd_container_state_changed failed (%s)", state
            )

    # -- the service --------------------------------------------------------------------

    def _labels(self, *extra: str) -> list[str]:
        return [f"{LABEL_MANAGED}=true", f"{LABEL_NODE}={self.node_id}", *extra]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._forget_previous_run()
        try:
            await self._serve(task_status)
        except Exception:
            # Crashed (a bug): no request of the restart window may queue work on a
            # supervisor that is gone, nor a client stay subscribed to its hub.
            self._forget_previous_run()
            raise

    async def _serve(self, task_status: trio.TaskStatus[None]) -> None:
        self.node_id = await self.repo.node_id()
        records = await self.repo.load()
        log.info("%d container records loaded (node %s)", len(records), self.node_id)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for record in records:
                if record.limits.memory is None:
                    # Written by an agent that allowed no memory limit: §7.6 wants one.
                    limits = attrs.evolve(record.limits, memory=self.settings.default_memory)
                    record = attrs.evolve(record, limits=limits)
                    await self.repo.save(record)
                if record.install_state == "installing":
                    container_logger(record.internal_id, log).warning(
                        "install interrupted by the agent's restart: marked failed"
                    )
                    record = attrs.evolve(
                        record,
                        install_state="failed",
                        error="Installation interrupted",
                        updated_at=int(time.time()),
                    )
                    await self.repo.save(record)
                    await self.notify(record.internal_id, "failed", "Installation interrupted")
                await self._start_supervisor(record)
            nursery.start_soon(self._watch)
            if self.docker.available:
                with trio.move_on_after(30):
                    await self.reconciled.wait()
            task_status.started()

    def _forget_previous_run(self) -> None:
        """The service crashed (and runs again): the supervisors of that run are gone
        with its nursery, so their hubs would keep clients subscribed to nothing. Each
        hub's clients are closed with 1012 (service restart) and reconnect to the new
        supervisor; nothing of the old run stays registered."""
        if not self._supervisors:
            return
        log.warning("containers service ended: closing %d hubs", len(self._supervisors))
        for supervisor in self._supervisors.values():
            supervisor.cancel()
            supervisor.hub.close(code=CLOSE_SERVICE_RESTART)
        self._supervisors.clear()
        self._finished.clear()
        self.reconciled = trio.Event()

    async def _start_supervisor(
        self, record: ContainerRecord, *, wait: bool = True
    ) -> ContainerSupervisor:
        """Run a supervisor for ``record``; ``wait=False`` returns before it has started
        (its queue takes actions already; a create answers sooner under load)."""
        assert self._nursery is not None
        agent = self.agent
        supervisor = ContainerSupervisor(
            self,
            record,
            EventHub.for_config(agent.config, agent.metrics.console),
            lambda: _stats_settings(agent),
        )
        supervisor.stats.disk_bytes = lambda: self.disk_bytes(supervisor.record.volume_id)
        if agent.hooks.takes_stats_samples():  # usage metering: lightd_stats_sample
            supervisor.stats.sampled = lambda container_id, sample: agent.hooks.stats_sample(
                agent,
                record.internal_id,
                container_id,
                supervisor.record.volume_id,
                supervisor.started_at,
                sample,
            )
        finished = trio.Event()
        self._supervisors[record.internal_id] = supervisor
        self._finished[record.internal_id] = finished

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await supervisor.run(task_status=task_status)
            finally:
                finished.set()

        if wait:
            await self._nursery.start(run)
        else:
            self._nursery.start_soon(run)
        return supervisor

    async def _watch(self) -> None:
        """Follow the engine (``_follow``); when the service ends, however it ends (a
        graceful stop, a crash, a cancelled test agent), the API guard rules go with it."""
        try:
            await self._follow()
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await self.network.unguard()

    async def _follow(self) -> None:
        """Follow Docker events for our containers; reconcile whenever the stream (re)starts."""
        # Only the events acted on: creates, attaches and starts would cost a parse each.
        filters = {"label": self._labels(), "type": ["container"], "event": ["die", "oom"]}
        while True:
            await self.docker.wait_available()
            try:
                await self.network.ensure()
            except (DockerUnavailable, DockerError) as exc:
                log.warning("Docker network %s not ready: %s", self.network.name, exc)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.docker.watch_events, filters, self._on_event)
                    await self.reconcile()
                    self.reconciled.set()
            except* (DockerUnavailable, DockerError) as group:
                # The engine went away (restarted, the host rebooting): wait for it, then
                # reconcile again; the service and its supervisors carry on meanwhile.
                log.warning("Docker events stream ended: %s", group.exceptions[0])
            await trio.sleep(0.5)

    async def _on_event(self, event: dict[str, Any]) -> None:
        attributes = event.get("Actor", {}).get("Attributes", {})
        if attributes.get(LABEL_ROLE, "server") != "server":
            return
        supervisor = self._supervisors.get(attributes.get(LABEL_ID, ""))
        if supervisor is None or event.get("id") != supervisor.record.container_id:
            return
        action = event.get("Action") or event.get("status")
        try:
            if action == "oom":
                supervisor.on_oom()
            elif action == "die":
                await supervisor.on_exit(int(attributes.get("exitCode", 0) or 0), oom=False)
        except Exception:  # one container's bug must not end the events stream of all
            supervisor.log.exception("handling the %s event failed", action)

    async def reconcile(self) -> None:
        """Make the agent's records, Docker and the port pool agree (contract §10)."""
        listed = await self.docker.containers(self._labels())
        running_now = sum(item.get("State") == "running" for item in listed)
        log.info(
            "reconciling %d records with %d Docker containers (%d running)",
            len(self._supervisors),
            len(listed),
            running_now,
        )
        for item in listed:
            labels = item.get("Labels") or {}
            internal_id = labels.get(LABEL_ID, "")
            role = labels.get(LABEL_ROLE, "server")
            supervisor = self._supervisors.get(internal_id)
            running = item.get("State") == "running"
            if supervisor is None or role != "server":
                if supervisor is None or supervisor.record.install_state != "installing":
                    container_logger(internal_id, log).info(
                        "reconcile: removing orphaned Docker container %s (role %s)",
                        item["Id"][:12],
                        role,
                    )
                    await self._remove(item["Id"])
                continue
            if not supervisor.idle:
                continue  # an action is under way: its own outcome settles the state
            try:
                await self._reconcile_one(supervisor, item, running=running)
            except (DockerUnavailable, DockerError):
                raise  # the engine is gone: the events loop waits for it and comes back
            except Exception:  # one container's bug: the others are still reconciled
                container_logger(internal_id, log).exception("reconciling failed")
        await self._reconcile_ports()
        log.info("reconcile done")
        self._start_boot()

    def _start_boot(self) -> None:
        """Start, in the background, every server that should run and does not (§17):
        a boot already under way (the engine went away during it) gives way to this one."""
        if self._boot_scope is not None:
            self._boot_scope.cancel()
        due = [
            s
            for s in self.all()
            if s.record.should_run and s.record.install_state == "ready" and s.offline and s.idle
        ]
        if not due or self._nursery is None:
            return
        scope = self._boot_scope = trio.CancelScope()
        self._nursery.start_soon(self._boot, due, scope)

    async def _boot(self, due: list[ContainerSupervisor], scope: trio.CancelScope) -> None:
        """Start ``due``, ``boot_concurrency`` at a time, launches ``boot_stagger`` apart;
        a slot is held until its start has run (the server is up or the start failed)."""
        settings = self.settings
        log.info(
            "boot: starting %d servers that should run (%d at a time)",
            len(due),
            settings.boot_concurrency,
        )
        limiter = trio.CapacityLimiter(settings.boot_concurrency)

        async def start(supervisor: ContainerSupervisor) -> None:
            try:
                try:
                    action = supervisor.submit("start")
                except AgentError as exc:  # started, deleted or being changed meanwhile
                    supervisor.log.info("boot: not started: %s", exc)
                    return
                await action.done.wait()
            finally:
                limiter.release_on_behalf_of(supervisor)

        with scope:
            async with trio.open_nursery() as nursery:
                for supervisor in due:
                    await limiter.acquire_on_behalf_of(supervisor)
                    if self._supervisors.get(supervisor.internal_id) is not supervisor:
                        limiter.release_on_behalf_of(supervisor)
                        continue  # deleted while waiting for a slot
                    nursery.start_soon(start, supervisor)
                    await trio.sleep(settings.boot_stagger)
        if self._boot_scope is scope:
            self._boot_scope = None

    async def _reconcile_one(
        self, supervisor: ContainerSupervisor, item: dict[str, Any], *, running: bool
    ) -> None:
        """Adopt a server that runs, or tell the supervisor its server ended."""
        if running and supervisor.state == "offline" and supervisor.record.install_state == "ready":
            supervisor.log.info("reconcile: adopting the running server")
            await supervisor.adopt(item["Id"])
        elif (
            not running
            and supervisor.state != "offline"
            and item["Id"] == supervisor.record.container_id
        ):
            info = await self.docker.inspect_container(item["Id"])
            supervisor.log.info("reconcile: the server ended while nobody watched")
            await supervisor.on_exit(int(info["State"].get("ExitCode", 0)), oom=False)

    async def _reconcile_ports(self) -> None:
        """Ports held for unknown containers go; a record's ports are what it holds."""
        pool = self.agent.stash.get(PORT_POOL)
        if pool is not None:
            for owner, entries in (await pool.held()).items():
                supervisor = self._supervisors.get(owner)
                if owner in self._claims:
                    continue  # being created: its record is not written yet
                if supervisor is None:
                    container_logger(owner, log).info(
                        "reconcile: releasing ports held by an unknown container"
                    )
                    await pool.release(owner)
                elif not supervisor.busy_with("rebind") and {(e.ip, e.port) for e in entries} != {
                    (p.ip, p.port) for p in supervisor.record.ports
                }:
                    # A rebind cut short by a crash: the record says which ports it uses.
                    supervisor.log.info("reconcile: realigning held ports with its record")
                    await self.set_ports(owner, supervisor.record.ports)

    # -- Docker mapping -----------------------------------------------------------------

    async def volume_path(self, volume_id: str) -> Path:
        """The volume's host folder, from the volumes service."""
        volumes = self.agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        return folder

    async def server_spec(self, record: ContainerRecord) -> ContainerSpec:
        """The server container of ``record``."""
        volume = await self.volume_path(record.volume_id)
        mounts = standard_mounts(record, volume, self.data_path(record.internal_id))
        return container_spec(
            record, node_id=self.node_id, role="server", mounts=mounts, network=self.network.name
        )

    async def ensure_image(self, image: str, message: Callable[[str], None]) -> None:
        """Use the local image, else pull it with progress messages."""
        try:
            await self.docker.inspect_image(image)
            return
        except DockerNotFound:
            pass
        message(f"Pulling image: {image}")
        last = time.monotonic()

        def progress(status: str) -> None:
            nonlocal last
            if time.monotonic() - last > 1:
                last = time.monotonic()
                message(f"Pulling image: {image}: {status}")

        try:
            # Credentials of docker.registries first, then the Docker client's config file.
            registries = self.agent.config.docker.registries
            await self.docker.pull(image, progress, registries=registries)
        except DockerError as exc:
            raise InstallFailed(f"Failed to pull image {image}: {exc}") from None
        message(f"Image pulled: {image}")

    async def remove_docker_container(self, internal_id: str, *, role: str | None) -> None:
        """Remove this container's Docker containers (of one role, or all)."""
        label = self._labels(f"{LABEL_ID}={internal_id}")
        if role:
            label.append(f"{LABEL_ROLE}={role}")
        listed = await self.docker.containers(label)
        for item in listed:
            await self._remove(item["Id"])

    async def _remove(self, container_id: str) -> None:
        with contextlib.suppress(DockerNotFound):
            await self.docker.remove_container(container_id, volumes=True)

    async def run_install_script(
        self, record: ContainerRecord, image: str, console: Callable[[list[str]], None]
    ) -> None:
        """Ask the ``lightd_run_install_script`` hook how to run the record's script, and
        run it (see ``install.run_install``)."""
        assert record.install_script is not None
        volume = await self.volume_path(record.volume_id)
        data = self.data_path(record.internal_id)
        mounts = standard_mounts(record, volume, data)
        job = InstallJob(
            internal_id=record.internal_id,
            image=image,
            script=record.install_script,
            limits=record.limits,
            timeout=self.settings.install_timeout,
            environment=server_environment(record),
            mounts=mounts,
        )
        run: object = self.agent.hooks.run_install_script(self.agent, job)
        if not isinstance(run, InstallRun):
            raise InstallFailed("Install scripts are not available (plugin disabled)")
        script = run.script if run.script.endswith("\n") else run.script + "\n"
        name = posixpath.basename(job.script_path)
        await trio.to_thread.run_sync(write_executable, data / name, script)
        spec = container_spec(
            record,
            node_id=self.node_id,
            role="install",
            image=run.image,
            mounts=job.mounts if run.mounts is None else run.mounts,
            entrypoint=run.entrypoint,
            cmd=run.command,
            environment=job.environment if run.environment is None else run.environment,
            limits=run.limits,
            network=self.network.name,
        )
        await run_install(
            self.docker,
            spec,
            internal_id=record.internal_id,
            log_path=data / "install.log",
            time_limit=job.timeout if run.timeout is None else run.timeout,
            console=console,
        )

    # -- ports --------------------------------------------------------------------------

    async def reserve_ports(
        self, internal_id: str, specs: Sequence[PortSpec]
    ) -> tuple[PortBinding, ...]:
        """Reserve ``specs`` for ``internal_id`` (all or none) and map them to bindings."""
        if not specs:
            return ()
        pool = self.agent.stash.get(PORT_POOL)
        if pool is None:
            raise BadRequest("Port not found in network pool", code="port_not_in_pool")
        requests = [PortRequest(s.ip, s.port, s.protocol) for s in specs]
        reserved = await pool.reserve(internal_id, requests)
        return tuple(
            PortBinding(
                ip=entry.ip,
                port=entry.port,
                protocol=spec.protocol,
                container_port=spec.container_port or entry.port,
            )
            for spec, entry in zip(specs, reserved, strict=True)
        )

    async def set_ports(self, internal_id: str, ports: Sequence[PortBinding]) -> None:
        """Make ``ports`` exactly what ``internal_id`` holds (frees the others)."""
        pool = self.agent.stash.get(PORT_POOL)
        if pool is not None:
            await pool.replace(internal_id, [PortRequest(p.ip, p.port, p.protocol) for p in ports])

    # -- create / delete ----------------------------------------------------------------

    def check_create(self, request: CreateRequest) -> None:
        """The contract's checks that need no I/O, with its exact messages."""
        if request.start_pattern is not None:
            problem = check_start_pattern(request.start_pattern)
            if problem is not None:
                raise BadRequest(f"Invalid start_pattern: {problem}", code="invalid_start_pattern")
        self.check_ports(request.ports)

    def check_ports(self, specs: Sequence[PortSpec]) -> None:
        """A create's or rebind's ports: well-formed, and no more than ``max_ports``."""
        limit = self.settings.max_ports
        if len(specs) > limit:
            raise BadRequest(f"Too many ports (max {limit})", code="too_many_ports")
        check_port_specs(specs)

    async def check_mounts(self, mount: dict[str, str]) -> None:
        """Each host path must lie inside a ``docker.allowed_mounts`` folder and be reached
        without a symlink on the way: a container that can write in an allowed folder
        must not steer another container's mount out of it with a planted link. Nor may
        it overlap the agent's own storage (``storage.base_path``: the state store,
        tokens, other containers' data). What is checked is the normalized path, which is
        what the record keeps and Docker gets (``normal_mounts``)."""
        allowed = [posixpath.normpath(p) for p in self.agent.config.docker.allowed_mounts]
        base = posixpath.normpath(str(self.agent.paths.base))

        def inside(path: str, root: str) -> bool:
            return path == root or path.startswith(root.rstrip("/") + "/")

        def check(source: str) -> None:
            norm = posixpath.normpath(source) if source.startswith("/") else None
            if norm is not None and (inside(norm, base) or inside(base, norm)):
                norm = None  # the agent's own state is never mounted into a container
            for root in allowed:
                if norm is None or not (norm == root or norm.startswith(root.rstrip("/") + "/")):
                    continue
                rel = norm[len(root) :].lstrip("/")
                try:
                    with files.Root.open(root, no_links=True) as handle:
                        found = handle.stat(files.parse(rel), follow=False) if rel else None
                    if found is None or not stat.S_ISLNK(found.st_mode):
                        return
                except (files.FileError, OSError):
                    break
            raise BadRequest(f"Mount not allowed: {source}", code="mount_not_allowed")

        for source in mount.values():
            await trio.to_thread.run_sync(check, source)

    async def create(self, request: CreateRequest) -> ContainerSupervisor:
        self.check_create(request)
        internal_id = request.internal_id
        if internal_id in self._supervisors or internal_id in self._claims:
            raise Conflict("Container already exists", code="container_exists")
        if internal_id in self._deleting:
            raise Conflict("Container already exists", code="container_exists")
        # The claim comes before any await: see ``using_volume`` and the volumes plugin.
        self._claims[internal_id] = request.volume_id.lower()
        try:
            return await self._create(request)
        finally:
            del self._claims[internal_id]

    async def _create(self, request: CreateRequest) -> ContainerSupervisor:
        await self.check_mounts(request.mount)
        mount = normal_mounts(request.mount)
        volumes = self.agent.stash.get(VOLUMES)
        folder = None if volumes is None else await volumes.path(request.volume_id)
        if folder is None:
            raise NotFound("Volume not found", code="volume_not_found")
        ports = await self.reserve_ports(request.internal_id, request.ports)
        limits = request.limits
        if limits.memory is None:
            limits = attrs.evolve(limits, memory=self.settings.default_memory)
        now = int(time.time())
        record = ContainerRecord(
            internal_id=request.internal_id,
            image=request.image,
            volume_id=folder.name,  # the registry's spelling: what Docker mounts
            startup_command=request.startup_command,
            start_pattern=request.start_pattern,
            ports=ports,
            limits=limits,
            mount=mount,
            install_script=request.install_script,
            environment=dict(request.environment),
            stop_command=request.stop_command,
            install_image=request.install_image,
            restart_policy=request.restart_policy,
            install_state="installing",
            container_id=None,
            error=None,
            created_at=now,
            updated_at=now,
        )
        try:
            inserted = await self.repo.insert(record)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release(request.internal_id)
            raise
        if not inserted:
            raise Conflict("Container already exists", code="container_exists")
        self.agent.events.publish(
            "container.created",
            {
                "internal_id": record.internal_id,
                "image": record.image,
                "volume_id": record.volume_id,
            },
        )
        supervisor = await self._start_supervisor(record, wait=False)
        supervisor.log.info("created (image %s, volume %s)", record.image, record.volume_id)
        supervisor.submit("install", start_after=request.start_on_completion)
        return supervisor

    async def _release(self, internal_id: str) -> None:
        pool = self.agent.stash.get(PORT_POOL)
        if pool is not None:
            await pool.release(internal_id)

    async def delete(self, internal_id: str) -> None:
        """Forget the container, cancel whatever it was doing, remove its Docker objects,
        free its ports and its data folder. The volume stays."""
        supervisor = self.get(internal_id)
        if not self.docker.available:
            raise DockerUnavailable()
        del self._supervisors[internal_id]
        self._deleting.add(internal_id)
        supervisor.cancel()
        # Shielded whole: a client hanging up must not leave a half-deleted container.
        with trio.CancelScope(shield=True):
            try:
                await self._delete(internal_id, supervisor)
            finally:
                self._deleting.discard(internal_id)

    async def _delete(self, internal_id: str, supervisor: ContainerSupervisor) -> None:
        # Forget it first: a crash from here on leaves only orphans that reconcile removes.
        await self.repo.delete(internal_id)
        with trio.move_on_after(30):
            await self._finished.pop(internal_id).wait()
        try:
            await self.remove_docker_container(internal_id, role=None)
        except (DockerError, DockerUnavailable) as exc:
            supervisor.log.warning("Docker cleanup left for reconciliation: %s", exc)
        await self._release(internal_id)
        await trio.to_thread.run_sync(
            lambda: shutil.rmtree(self.data_path(internal_id), ignore_errors=True)
        )
        supervisor.hub.message("Container deleted")
        supervisor.log.info("deleted")
        supervisor.hub.close()
        await self.agent.hooks.container_deleted(self.agent, internal_id)

    # -- transfers (contract §20) -------------------------------------------------------

    def export_record(self, internal_id: str) -> dict[str, Any]:
        """The container's record as JSON, to recreate it on another node
        (``ContainerService``); ``NotFound`` for an unknown container."""
        return dict(converter.unstructure(self.get(internal_id).record))

    def _imported(
        self, exported: Any, ports: Sequence[Mapping[str, Any]]
    ) -> tuple[CreateRequest, Resources]:
        """An exported record as a create of this node would take it (every check of a
        create, with its messages), and its resources: a record from another node is not
        trusted."""
        if not isinstance(exported, dict):
            raise BadRequest("record: must be an object", code="invalid_field")
        fields = (
            "internal_id", "image", "volume_id", "startup_command", "start_pattern", "limits",
            "mount", "install_script", "environment", "stop_command", "install_image",
            "restart_policy",
        )  # fmt: skip
        body = {k: exported[k] for k in fields if k in exported and exported[k] is not None}
        body["ports"] = [dict(p) for p in ports]
        request = structure(body, CreateRequest, root="record")
        if request.internal_id in RESERVED_IDS:
            raise BadRequest("record.internal_id: Invalid internal_id", code="invalid_field")
        self.check_create(request)
        resources = structure(exported.get("resources") or {}, Resources, root="record.resources")
        return request, resources

    async def check_import(self, exported: Any, ports: Sequence[Mapping[str, Any]]) -> None:
        """Would ``import_record`` take this record and these ports now? The same checks,
        nothing kept (the ports are reserved and released again)."""
        request, _ = self._imported(exported, ports)
        internal_id = request.internal_id
        if internal_id in self._supervisors or internal_id in self._claims:
            raise Conflict("Container already exists", code="container_exists")
        await self.check_mounts(request.mount)
        self._claims[internal_id] = request.volume_id.lower()
        try:
            await self.reserve_ports(internal_id, request.ports)
        finally:
            try:
                with trio.CancelScope(shield=True):
                    await self._release(internal_id)
            finally:
                del self._claims[internal_id]

    async def import_record(self, exported: Any, ports: Sequence[Mapping[str, Any]]) -> str:
        """Recreate a container exported by another node (``ContainerService``): checked as
        a create, on its volume (registered already), ``ports`` reserved from this node's
        pool; ``ready`` and offline, no install run. Its ``internal_id``."""
        request, resources = self._imported(exported, ports)
        internal_id = request.internal_id
        if internal_id in self._supervisors or internal_id in self._claims:
            raise Conflict("Container already exists", code="container_exists")
        self._claims[internal_id] = request.volume_id.lower()
        try:
            await self.check_mounts(request.mount)
            folder = await self.volume_path(request.volume_id)
            bindings = await self.reserve_ports(internal_id, request.ports)
            limits = request.limits
            if limits.memory is None:
                limits = attrs.evolve(limits, memory=self.settings.default_memory)
            now = int(time.time())
            created = exported.get("created_at")
            record = ContainerRecord(
                internal_id=internal_id,
                image=request.image,
                volume_id=folder.name,
                startup_command=request.startup_command,
                start_pattern=request.start_pattern,
                ports=bindings,
                limits=limits,
                mount=normal_mounts(request.mount),
                install_script=request.install_script,
                environment=dict(request.environment),
                stop_command=request.stop_command,
                install_image=request.install_image,
                restart_policy=request.restart_policy,
                resources=resources,
                install_state="ready",
                container_id=None,
                error=None,
                created_at=created if isinstance(created, int) else now,
                updated_at=now,
            )
            try:
                inserted = await self.repo.insert(record)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self._release(internal_id)
                raise
            if not inserted:
                raise Conflict("Container already exists", code="container_exists")
            self.agent.events.publish(
                "container.created",
                {
                    "internal_id": record.internal_id,
                    "image": record.image,
                    "volume_id": record.volume_id,
                },
            )
            supervisor = await self._start_supervisor(record)
        finally:
            del self._claims[internal_id]
        supervisor.log.info("imported from another node (volume %s)", record.volume_id)
        await self.network_changed(internal_id, record.ports)
        await self.notify(internal_id, "ready")
        return internal_id

    async def mark_transferred(self, internal_id: str) -> None:
        """Record that the container now lives on another node (``ContainerService``)."""
        supervisor = self.get(internal_id)
        if not supervisor.record.transferred:
            supervisor.record = attrs.evolve(
                supervisor.record, transferred=True, should_run=False, updated_at=int(time.time())
            )
            await self.repo.save(supervisor.record)
