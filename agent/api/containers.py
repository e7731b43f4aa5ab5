"""Built-in plugin ``containers``: the routes of contract §7 and the containers service.

Config section ``containers`` (install timeout, stop timeout, console history, crash
restart policy). Answers ``lightd_volume_in_use`` for the volumes plugin. Reads
(``GET``) are served from the agent's own state, never from Docker.

Also the container WebSocket of §8 (``lightd.api.ws``) and its config sections
``websocket``, ``console`` and ``stats``; a config reload applies the console settings.
Puts the manager on the stash twice: as ``CONTAINERS`` (the core's, typed
``Containers``) and as ``interfaces.CONTAINER_SERVICE`` (what plugins may use).

Job frames (contract §14): ``lightd_job_changed`` and ``lightd_job_done`` publish
``{"event":"job","data":<job>}`` on the hub of the job's container (``internal_id``), or,
for a job of a volume only, of every container using that volume. The hub queues it per
socket without waiting (a slow client never holds the runner), and only sockets whose
token may ``read`` are subscribed to the hub's frames. The runner already sends changes
at most twice a second per job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypedDict, cast
from urllib.parse import urlsplit

import attrs
import trio
from quart import Blueprint, request

from ..config import Config
from ..containers import CONTAINERS, ContainerSupervisor
from ..containers.console import ConsoleSettings, Frame
from ..containers.manager import MIGRATIONS, Containers
from ..containers.models import (
    PATCH_CLEARABLE,
    RESERVED_IDS,
    CreateRequest,
    ExecRequest,
    InstallState,
    PatchRequest,
    RebindRequest,
    ReinstallRequest,
    ResourcesRequest,
    RuntimeState,
    StopRequest,
    resources_view,
    valid_internal_id,
)
from ..containers.settings import ContainersSettings
from ..containers.startpattern import check_start_pattern
from ..containers.stats import StatsSettings
from ..converter import field_check, json_body, structure
from ..docker import DockerConflict, DockerNotFound
from ..errors import (
    ApiError,
    BadRequest,
    Conflict,
    DockerUnavailable,
    Forbidden,
    PayloadTooLarge,
)
from ..hookspecs import hookimpl
from ..interfaces import CONTAINER_SERVICE
from ..jobs import JobView
from ..runtime import Agent, Service
from ..store import Migration
from .fastpath import FAST_READS
from .views import Message, container_scoped, current_auth, describe, read_json, requires
from .ws import DEFAULT_LOG_LINES, WebSocketSettings, is_command_text, websocket_blueprint


class Port(TypedDict):
    ip: str
    port: int
    protocol: str
    container_port: int


class LimitsView(TypedDict):
    #: Bytes.
    memory: int | None
    cpu: float | None
    pids: int
    #: Bytes of swap beyond ``memory``; ``-1``: unlimited.
    swap: int


class RestartPolicyView(TypedDict):
    mode: Literal["never", "on-crash", "always"]
    max_restarts: int
    #: Seconds.
    window_s: float


class ContainerSummary(TypedDict):
    internal_id: str
    container_id: str | None
    install_state: InstallState
    image: str
    ports: list[Port]
    state: RuntimeState


class ContainerList(TypedDict):
    containers: list[ContainerSummary]


class ContainerView(TypedDict):
    """``GET /containers/:id`` (contract §7)."""

    internal_id: str
    container_id: str | None
    volume_id: str
    image: str
    startup_command: str
    start_pattern: str | None
    install_state: InstallState
    ports: list[Port]
    limits: LimitsView
    mount: dict[str, str]
    #: Unix seconds.
    created_at: int
    updated_at: int
    #: Why the last install failed.
    error: str | None
    environment: dict[str, str]
    stop_command: str | None
    install_image: str | None
    #: Desired state (§17): started through the API and not stopped or killed since; such
    #: a container is started again when the agent or the engine comes back.
    should_run: bool
    #: Moved to another node (contract §20): kept offline until deleted; a start is a 409.
    transferred: bool
    state: RuntimeState
    exit_code: int | None
    #: Unix seconds; ``None`` while offline.
    started_at: int | None
    #: The container's own, else the node's default (``containers.crash_restart``).
    restart_policy: RestartPolicyView


class CreateAnswer(TypedDict):
    message: str
    internal_id: str
    state: Literal["installing"]


class ActionAnswer(TypedDict):
    message: str
    internal_id: str


class PatchAnswer(TypedDict):
    message: str
    #: ``now``: in effect already; ``next_start``: at the server's next start.
    applies: Literal["now", "next_start"]


class ResourcesView(TypedDict):
    """``GET /containers/:id/resources``: as the engine applies them (``None``: not set)."""

    #: Bytes.
    memory: int | None
    #: Bytes of memory plus swap; ``-1``: unlimited swap.
    memory_swap: int | None
    cpu_shares: int | None
    #: Microseconds: the CPU limit is ``cpu_quota`` per ``cpu_period`` (100 ms).
    cpu_period: int | None
    cpu_quota: int | None
    cpuset_cpus: str | None
    blkio_weight: int | None


class ExecAnswer(TypedDict):
    #: ``None`` when it was killed on timeout.
    exit_code: int | None
    #: Stdout and stderr together, as UTF-8 (undecodable bytes replaced), at most 1 MiB.
    output: str
    truncated: bool
    timed_out: bool


class LogsQuery(TypedDict, total=False):
    #: How many of the last console lines (default 100, at most the history's size).
    lines: int


class LogsAnswer(TypedDict):
    #: Oldest first, without trailing newlines.
    lines: list[str]


class StatsView(TypedDict):
    """The WebSocket's ``stats`` frame without ``event`` (contract §8)."""

    #: Percent; 100 = one core.
    cpu_usage: float
    #: Bytes.
    memory_usage: int
    memory_limit: int
    network_rx: int
    network_tx: int
    block_read: int
    block_write: int
    state: RuntimeState
    #: Seconds since the server started.
    uptime: int
    #: Bytes used by the container's volume (the disk service's cached usage, contract §15).
    disk_bytes: int


@attrs.frozen
class CommandRequest:
    #: Written to the server's stdin (a newline is added if missing).
    command: str = attrs.field(
        validator=field_check(is_command_text, "must be text without NUL characters")
    )


class StatsUnavailable(ApiError):
    """Running, but no sample came in time (the engine is slow to report)."""

    status = 503
    code = "stats_unavailable"


def _line_count(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LOG_LINES
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise BadRequest("lines must be a positive integer", code="invalid_query")
    return int(text)


CREATE_EXAMPLE = {
    "internal_id": "server-1",
    "image": "ghcr.io/example/game:1.2",
    "volume_id": "0b3c6f1e-9d2a-4c55-8e7f-1a2b3c4d5e6f",
    "startup_command": "./start.sh",
    "start_pattern": "Server started",
    "ports": [{"ip": "0.0.0.0", "port": 25565, "protocol": "tcp"}],
    "limits": {"memory": 1073741824, "cpu": 1.5, "pids": 512},
    "environment": {"EULA": "true"},
}


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {
        "containers": ContainersSettings,
        "console": ConsoleSettings,
        "websocket": WebSocketSettings,
        "stats": StatsSettings,
    }


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return MIGRATIONS


@hookimpl
def lightd_configure(agent: Agent) -> None:
    containers = Containers(agent, agent.config.section(ContainersSettings))
    agent.stash[CONTAINERS] = containers
    agent.stash[CONTAINER_SERVICE] = containers

    def read(internal_id: str) -> bytes | None:
        supervisor = containers.find(internal_id)
        return None if supervisor is None else supervisor.view_body()

    def read_all(_: str) -> bytes:
        return json_body({"containers": [_summary(s) for s in containers.all()]})

    readers = agent.stash.setdefault(FAST_READS, {})
    readers["/containers/"] = read
    readers["/containers"] = read_all  # the master token sees every container


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("containers", agent.stash[CONTAINERS].serve)]


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    for supervisor in agent.stash[CONTAINERS].all():
        supervisor.hub.configure(new.section(ConsoleSettings))


@hookimpl
async def lightd_startup(agent: Agent) -> None:
    """The API listens: keep containers off its port (``Containers.network``)."""
    ports = tuple(sorted({p for p in (urlsplit(u).port for u in agent.urls) if p}))
    await agent.stash[CONTAINERS].network.listening(ports)


@hookimpl
async def lightd_shutdown(agent: Agent) -> None:
    await agent.stash[CONTAINERS].network.unguard()


@hookimpl
def lightd_volume_in_use(agent: Agent, volume_id: str) -> str | None:
    return agent.stash[CONTAINERS].using_volume(volume_id)


@hookimpl
def lightd_volume_running(agent: Agent, volume_id: str) -> str | None:
    for supervisor in agent.stash[CONTAINERS].all():
        if supervisor.record.volume_id.lower() == volume_id.lower() and (
            supervisor.state != "offline"
            or supervisor.installing()
            or supervisor.busy_with("start")  # accepted, not begun yet
            or supervisor.busy_with("restart")
        ):
            return supervisor.internal_id
    return None


def _job_audience(containers: Containers, job: JobView) -> list[ContainerSupervisor]:
    """The containers a job concerns: its own, else those using its volume."""
    if job.internal_id is not None:
        supervisor = containers.find(job.internal_id)
        return [] if supervisor is None else [supervisor]
    if job.volume_id is None:
        return []
    volume_id = job.volume_id.lower()
    return [s for s in containers.all() if s.record.volume_id.lower() == volume_id]


def _publish_job(agent: Agent, job: JobView) -> None:
    containers = agent.stash.get(CONTAINERS)
    if containers is None:
        return
    audience = _job_audience(containers, job)
    if audience:
        frame = Frame(event="job", data=job.to_json())
        for supervisor in audience:
            supervisor.hub.publish(frame)


@hookimpl
def lightd_job_changed(agent: Agent, job: JobView) -> None:
    _publish_job(agent, job)


@hookimpl
def lightd_job_done(agent: Agent, job: JobView) -> None:
    _publish_job(agent, job)


def _summary(supervisor: ContainerSupervisor) -> ContainerSummary:
    record = supervisor.record
    return {
        "internal_id": record.internal_id,
        "container_id": record.container_id,
        "install_state": record.install_state,
        "image": record.image,
        "ports": [
            {"ip": p.ip, "port": p.port, "protocol": p.protocol, "container_port": p.container_port}
            for p in record.ports
        ],
        "state": supervisor.state,
    }


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    containers = agent.stash[CONTAINERS]
    bp = Blueprint("containers", __name__)

    def need_docker() -> None:
        if not agent.docker.available:
            raise DockerUnavailable()

    @bp.post("/containers")
    @describe(
        "Create a container and start installing it",
        description="Answers at once; the install runs in the background (contract §7.1).",
        body=CreateRequest,
        errors=(404, 409, 503),
        examples={
            "body": CREATE_EXAMPLE,
            200: {
                "message": "Container creation started",
                "internal_id": "server-1",
                "state": "installing",
            },
        },
        tags=("containers",),
    )
    async def create() -> CreateAnswer:
        data = await read_json()
        if isinstance(data, dict) and "internal_id" in data:
            internal_id = data["internal_id"]
            if (
                not isinstance(internal_id, str)
                or not valid_internal_id(internal_id)
                or internal_id in RESERVED_IDS
            ):
                raise BadRequest("Invalid internal_id", code="invalid_internal_id")
        request = structure(data, CreateRequest)
        need_docker()
        supervisor = await containers.create(request)
        return {
            "message": "Container creation started",
            "internal_id": supervisor.internal_id,
            "state": "installing",
        }

    @bp.get("/containers")
    @describe(
        "List containers",
        description="A token restricted to some containers sees only those.",
        tags=("containers",),
    )
    @container_scoped
    async def list_containers() -> ContainerList:
        auth = current_auth()
        return {"containers": [_summary(s) for s in containers.all() if auth.allows(s.internal_id)]}

    @bp.get("/containers/<internal_id>")
    @describe("A container: its record and runtime state", tags=("containers",))
    async def get_container(internal_id: str) -> ContainerView:
        return cast(ContainerView, containers.get(internal_id).view())

    @bp.delete("/containers/<internal_id>")
    @describe(
        "Delete a container (its volume is kept)",
        errors=(409, 503),
        examples={200: {"message": "Container deleted successfully"}},
        tags=("containers",),
    )
    @requires("manage")
    async def delete_container(internal_id: str) -> Message:
        await containers.delete(internal_id)
        return {"message": "Container deleted successfully"}

    def power(kind: str, message: str) -> Callable[[str], Awaitable[ActionAnswer]]:
        @describe(
            f"{kind.capitalize()} the container",
            description="Queued: the answer comes before the action is done.",
            errors=(409, 429, 503),
            examples={200: {"message": message, "internal_id": "server-1"}},
            tags=("containers",),
        )
        @requires("power")
        async def view(internal_id: str) -> ActionAnswer:
            supervisor = containers.get(internal_id)
            need_docker()
            supervisor.submit(kind)
            return {"message": message, "internal_id": internal_id}

        view.__name__ = f"power_{kind}"
        return view

    for kind, message in (
        ("start", "Container start initiated"),
        ("kill", "Container kill initiated"),
        ("restart", "Container restart initiated"),
    ):
        bp.add_url_rule(
            f"/containers/<internal_id>/{kind}", view_func=power(kind, message), methods=["POST"]
        )

    @bp.post("/containers/<internal_id>/stop")
    @describe(
        "Stop the container",
        description=(
            "Its stop command, then SIGKILL after ``timeout`` seconds (the config's stop "
            "timeout without one). Queued: the answer comes before the action is done. "
            "The body is optional."
        ),
        body=StopRequest,
        errors=(409, 429, 503),
        examples={
            "body": {"timeout": 30},
            200: {"message": "Container stop initiated", "internal_id": "server-1"},
        },
        tags=("containers",),
    )
    @requires("power")
    async def power_stop(internal_id: str) -> ActionAnswer:
        supervisor = containers.get(internal_id)
        need_docker()
        grace = (await read_json(StopRequest)).timeout
        supervisor.submit("stop", grace=grace)
        return {"message": "Container stop initiated", "internal_id": internal_id}

    @bp.post("/containers/<internal_id>/reinstall")
    @describe(
        "Reinstall the container, optionally with another image or install script",
        errors=(409, 429, 503),
        body=ReinstallRequest,
        examples={
            "body": {"image": "ghcr.io/example/game:1.3"},
            200: {"message": "Container reinstall started", "internal_id": "server-1"},
        },
        tags=("containers",),
    )
    @requires("manage")
    async def reinstall(internal_id: str) -> ActionAnswer:
        supervisor = containers.get(internal_id)
        body = await read_json(ReinstallRequest)
        need_docker()
        supervisor.submit("reinstall", image=body.image, install_script=body.install_script)
        return {"message": "Container reinstall started", "internal_id": internal_id}

    @bp.post("/containers/<internal_id>/rebind-network")
    @describe(
        "Move the container to other host ports",
        body=RebindRequest,
        errors=(409, 429, 503),
        examples={
            "body": {"ports": [{"ip": "0.0.0.0", "port": 25566, "protocol": "tcp"}]},
            200: {"message": "Network rebinding started", "internal_id": "server-1"},
        },
        tags=("containers",),
    )
    @requires("manage")
    async def rebind(internal_id: str) -> ActionAnswer:
        supervisor = containers.get(internal_id)
        body = await read_json(RebindRequest)
        need_docker()
        if supervisor.installing():
            raise Conflict("Cannot rebind network while container is installing", code="installing")
        containers.check_ports(body.ports)
        old = supervisor.record.ports
        ports = await containers.reserve_ports(internal_id, body.ports)
        try:
            supervisor.submit("rebind", ports=ports)
        except ApiError:  # refused (409, or 429 when its queue is full): ports given back
            await containers.set_ports(internal_id, old)
            raise
        return {"message": "Network rebinding started", "internal_id": internal_id}

    def running(supervisor: ContainerSupervisor) -> None:
        if supervisor.state == "offline":
            raise Conflict("Container is not running", code="not_running")

    @bp.get("/containers/<internal_id>/logs")
    @describe(
        "The last lines of the console history",
        query=LogsQuery,
        examples={200: {"lines": ["Server started", "Player joined"]}},
        tags=("containers",),
    )
    async def logs(internal_id: str) -> LogsAnswer:
        supervisor = containers.get(internal_id)
        count = _line_count(request.args.get("lines"))
        return {"lines": supervisor.hub.history.tail(count).split("\n")[:-1]}

    @bp.get("/containers/<internal_id>/stats")
    @describe(
        "The last stats sample of a running container",
        description=(
            "Samples are taken only while someone listens: without a recent one, the "
            "answer waits for the next (a few ``stats.interval``s at most)."
        ),
        errors=(409, 503),
        tags=("containers",),
    )
    async def stats(internal_id: str) -> StatsView:
        supervisor = containers.get(internal_id)
        running(supervisor)
        hub = supervisor.hub
        frame = hub.last_stats
        if frame is None:
            interval = agent.config.section_or_default(StatsSettings).interval
            # Subscribing makes the reader sample; its first frame needs two samples.
            with hub.subscribe(4) as sub, trio.move_on_after(max(5.0, 4 * interval)):
                while frame is None:
                    try:
                        got = await sub.receive()
                    except trio.EndOfChannel:  # the container went away
                        break
                    if got["event"] == "stats":
                        frame = got
            running(supervisor)
            if frame is None:
                raise StatsUnavailable("No stats sample yet; try again")
        return cast(StatsView, {k: v for k, v in frame.items() if k != "event"})

    @bp.post("/containers/<internal_id>/command")
    @describe(
        "Send a command to the server's console (stdin)",
        body=CommandRequest,
        errors=(409,),
        examples={"body": {"command": "say hello"}, 200: {"message": "Command sent"}},
        tags=("containers",),
    )
    @requires("console")
    async def command(internal_id: str) -> Message:
        supervisor = containers.get(internal_id)
        text = (await read_json(CommandRequest)).command
        limit = agent.config.section_or_default(WebSocketSettings).max_frame_bytes
        if len(text) > limit:  # what the WebSocket accepts in one frame
            raise PayloadTooLarge(f"command is too long (at most {limit} characters)")
        await supervisor.send_command(text)
        return {"message": "Command sent"}

    @bp.patch("/containers/<internal_id>")
    @describe(
        "Change a container in place",
        description=(
            "Any of ``limits`` (merged into the container's), ``environment`` (replaces "
            "it), ``startup_command``, ``stop_command``, ``start_pattern``, ``image``, "
            "``restart_policy``, checked as in a create; ``null`` resets ``stop_command``, "
            "``start_pattern`` and ``restart_policy`` (the node's default). Limits, the "
            "stop command and the restart policy apply at once (limits on the running "
            "server through ``docker update``, done when this answers); the image, "
            "environment, startup command and start pattern at the next start, which "
            "recreates the Docker container. ``GET`` shows the new values at once."
        ),
        body=PatchRequest,
        errors=(409, 429, 503),
        examples={
            "body": {"limits": {"memory": 2147483648, "cpu": 2}, "environment": {"EULA": "true"}},
            200: {"message": "Container updated", "applies": "next_start"},
        },
        tags=("containers",),
    )
    @requires("manage")
    async def patch_container(internal_id: str) -> PatchAnswer:
        supervisor = containers.get(internal_id)
        data = await read_json()
        body = structure(data, PatchRequest)
        changes: dict[str, object] = {
            name: getattr(body, name)
            for name in ("environment", "startup_command", "image")
            if getattr(body, name) is not None
        }
        for name in PATCH_CLEARABLE:
            if name in data:
                changes[name] = getattr(body, name) or None  # "" or null: none
        pattern = changes.get("start_pattern")
        if isinstance(pattern, str) and (problem := check_start_pattern(pattern)) is not None:
            raise BadRequest(f"Invalid start_pattern: {problem}", code="invalid_start_pattern")
        need_docker()
        applies = await supervisor.patch(changes, limits=body.limits)
        return {"message": "Container updated", "applies": cast(Any, applies)}

    @bp.post("/containers/<internal_id>/resources")
    @describe(
        "Change a container's resources live (Docker's names)",
        description=(
            "[alias] of ``PATCH`` for resources: ``memory`` and ``memory_swap`` (bytes; "
            "memory plus swap, ``-1`` unlimited), ``cpu_quota`` / ``cpu_period`` (the CPU "
            "limit in cores), ``cpu_shares``, ``cpuset_cpus``, ``blkio_weight``. Applied "
            "to the Docker container before the answer; a value out of range, or one the "
            "engine refuses or discards, is a 400 and changes nothing."
        ),
        body=ResourcesRequest,
        errors=(409, 429, 503),
        examples={
            "body": {"memory": 2147483648, "cpu_quota": 150000, "cpu_period": 100000},
            200: {"message": "Container updated", "applies": "now"},
        },
        tags=("containers",),
    )
    @requires("manage")
    async def set_resources(internal_id: str) -> PatchAnswer:
        supervisor = containers.get(internal_id)
        body = await read_json(ResourcesRequest)
        need_docker()
        await supervisor.patch({}, resources=body)
        return {"message": "Container updated", "applies": "now"}

    @bp.get("/containers/<internal_id>/resources")
    @describe(
        "A container's resources as applied",
        description=(
            "A CPU limit is shown as the kernel runs it: ``cpu_quota`` microseconds per "
            "``cpu_period`` of 100 000."
        ),
        tags=("containers",),
    )
    async def get_resources(internal_id: str) -> ResourcesView:
        record = containers.get(internal_id).record
        return cast(ResourcesView, resources_view(record.limits, record.resources))

    @bp.post("/containers/<internal_id>/exec")
    @describe(
        "Run a command inside the running server (master token only)",
        description=(
            "``argv`` runs without a shell, TTY or stdin, for at most ``timeout`` seconds "
            "(default 30, at most 300); then it is killed and ``exit_code`` is null. "
            "``output`` is stdout and stderr together, at most 1 MiB (``truncated``)."
        ),
        body=ExecRequest,
        errors=(403, 409, 503),
        examples={
            "body": {"argv": ["ls", "-la", "/home/container"], "timeout": 10},
            200: {"exit_code": 0, "output": "total 8\n", "truncated": False, "timed_out": False},
        },
        tags=("containers",),
    )
    async def exec_command(internal_id: str) -> ExecAnswer:
        if current_auth().kind == "temporary":
            raise Forbidden("Exec needs the master token", code="master_token_required")
        supervisor = containers.get(internal_id)
        body = await read_json(ExecRequest)
        need_docker()
        running(supervisor)
        container_id = supervisor.record.container_id
        if container_id is None:
            raise Conflict("Container is not running", code="not_running")
        supervisor.log.info("exec %s (%d arguments)", body.argv[0][:100], len(body.argv) - 1)
        try:
            result = await agent.docker.exec_run(container_id, body.argv, timeout=body.timeout)
        except (DockerConflict, DockerNotFound):
            raise Conflict("Container is not running", code="not_running") from None
        return {
            "exit_code": result.exit_code,
            "output": result.output.decode("utf-8", errors="replace"),
            "truncated": result.truncated,
            "timed_out": result.timed_out,
        }

    return [bp, websocket_blueprint(agent, containers)]
