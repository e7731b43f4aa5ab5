"""Built-in plugin ``containers``: the routes of contract §7 and the containers service.

Config section ``containers`` (install timeout, stop timeout, console history, crash
restart policy). Answers ``lightd_volume_in_use`` for the volumes plugin. Reads
(``GET``) are served from the agent's own state, never from Docker.

Also the container WebSocket of §8 (``lightd.api.ws``) and its config sections
``websocket``, ``console`` and ``stats``; a config reload applies the console settings.
Puts the manager on the stash twice: as ``CONTAINERS`` (the core's, typed
``Containers``) and as ``interfaces.CONTAINER_SERVICE`` (what plugins may use).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint

from ..config import Config
from ..containers import CONTAINERS, ContainerSupervisor
from ..containers.console import ConsoleSettings
from ..containers.manager import MIGRATIONS, Containers
from ..containers.models import (
    CreateRequest,
    RebindRequest,
    ReinstallRequest,
    StopRequest,
    valid_internal_id,
)
from ..containers.settings import ContainersSettings
from ..containers.stats import StatsSettings
from ..converter import json_body, structure
from ..errors import ApiError, BadRequest, Conflict, DockerUnavailable
from ..hookspecs import hookimpl
from ..interfaces import CONTAINER_SERVICE
from ..runtime import Agent, Service
from ..store import Migration
from .fastpath import FAST_READS
from .views import container_scoped, current_auth, read_json, requires
from .ws import WebSocketSettings, websocket_blueprint


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


def _summary(supervisor: ContainerSupervisor) -> dict[str, Any]:
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
    async def create() -> dict[str, Any]:
        data = await read_json()
        if isinstance(data, dict) and "internal_id" in data:
            internal_id = data["internal_id"]
            if not isinstance(internal_id, str) or not valid_internal_id(internal_id):
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
    @container_scoped
    async def list_containers() -> dict[str, Any]:
        auth = current_auth()
        return {"containers": [_summary(s) for s in containers.all() if auth.allows(s.internal_id)]}

    @bp.get("/containers/<internal_id>")
    async def get_container(internal_id: str) -> dict[str, Any]:
        return containers.get(internal_id).view()

    @bp.delete("/containers/<internal_id>")
    @requires("manage")
    async def delete_container(internal_id: str) -> dict[str, Any]:
        await containers.delete(internal_id)
        return {"message": "Container deleted successfully"}

    def power(kind: str, message: str) -> Callable[[str], Awaitable[dict[str, Any]]]:
        @requires("power")
        async def view(internal_id: str) -> dict[str, Any]:
            supervisor = containers.get(internal_id)
            need_docker()
            args: dict[str, Any] = {}
            if kind == "stop":
                args["grace"] = (await read_json(StopRequest)).timeout
            supervisor.submit(kind, **args)
            return {"message": message, "internal_id": internal_id}

        view.__name__ = f"power_{kind}"
        return view

    for kind, message in (
        ("start", "Container start initiated"),
        ("kill", "Container kill initiated"),
        ("restart", "Container restart initiated"),
        ("stop", "Container stop initiated"),
    ):
        bp.add_url_rule(
            f"/containers/<internal_id>/{kind}", view_func=power(kind, message), methods=["POST"]
        )

    @bp.post("/containers/<internal_id>/reinstall")
    @requires("manage")
    async def reinstall(internal_id: str) -> dict[str, Any]:
        supervisor = containers.get(internal_id)
        body = await read_json(ReinstallRequest)
        need_docker()
        supervisor.submit("reinstall", image=body.image, install_script=body.install_script)
        return {"message": "Container reinstall started", "internal_id": internal_id}

    @bp.post("/containers/<internal_id>/rebind-network")
    @requires("manage")
    async def rebind(internal_id: str) -> dict[str, Any]:
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

    return [bp, websocket_blueprint(agent, containers)]
