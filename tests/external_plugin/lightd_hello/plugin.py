"""The ``hello`` plugin: every hook, recorded in the agent's stash."""

from __future__ import annotations

from typing import NoReturn, TypedDict

import attrs
import trio
from lightd import Agent, Migration, Service, StashKey, hookimpl
from lightd.api import current_auth, describe
from quart import Blueprint, websocket


@attrs.frozen
class HelloConfig:
    greeting: str = "world"


@attrs.define
class HelloState:
    calls: list[str] = attrs.Factory(list)
    events: list[tuple[str, str, str | None]] = attrs.Factory(list)
    deleted: list[str] = attrs.Factory(list)
    ticks: int = 0


class Hello(TypedDict):
    hello: str
    calls: list[str]
    ticks: int


class Events(TypedDict):
    """``events``: ``[internal_id, state, error]`` triples, in order."""

    events: list[list[str | None]]
    deleted: list[str]


class HelloContainer(TypedDict):
    internal_id: str
    auth: str


STATE: StashKey[HelloState] = StashKey("hello")
#: Calls made before the agent (and its stash) exists.
EARLY: list[str] = []


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    EARLY.append("lightd_add_config_sections")
    return {"hello": HelloConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    EARLY.append("lightd_add_migrations")
    return [Migration("hello", 1, "CREATE TABLE hello_notes (note TEXT NOT NULL)")]


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[STATE] = HelloState(calls=[*EARLY, "lightd_configure"])
    EARLY.clear()


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    state = agent.stash[STATE]
    state.calls.append("lightd_add_services")

    async def tick(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        state.ticks += 1
        task_status.started()
        await trio.sleep_forever()

    return [Service("hello-ticker", tick)]


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    state = agent.stash[STATE]
    state.calls.append("lightd_add_routes")
    bp = Blueprint("hello", __name__)

    @bp.get("/hello")
    @describe("Greet, with the hooks called so far", tags=("hello",))
    async def hello() -> Hello:
        section: HelloConfig = agent.config.section(HelloConfig)
        return {"hello": section.greeting, "calls": state.calls, "ticks": state.ticks}

    @bp.get("/hello/events")
    @describe("The container notifications received", tags=("hello",))
    async def events() -> Events:
        return {"events": [list(e) for e in state.events], "deleted": state.deleted}

    @bp.get("/hello/boom")
    @describe(
        "Always fail",
        description="Raises, to show that an internal error answers a bare 500.",
        errors=(500,),
        tags=("hello",),
    )
    async def boom() -> NoReturn:
        raise RuntimeError("secret detail /etc/shadow lightd_leaked_token_value")

    @bp.get("/hello/containers/<internal_id>")
    @describe("Echo a container id and the caller's kind of auth", tags=("hello",))
    async def container(internal_id: str) -> HelloContainer:
        return {"internal_id": internal_id, "auth": current_auth().kind}

    @bp.websocket("/hello/ws/<internal_id>")
    @describe("Echo text frames, prefixed with the container id", tags=("hello",))
    async def echo(internal_id: str) -> None:
        await websocket.accept()
        while True:
            message = await websocket.receive()
            await websocket.send(f"{internal_id}:{message}")

    return [bp]


@hookimpl
def lightd_startup(agent: Agent) -> None:
    agent.stash[STATE].calls.append("lightd_startup")


@hookimpl
def lightd_config_reloaded(agent: Agent, old: object, new: object) -> None:
    agent.stash[STATE].calls.append("lightd_config_reloaded")


@hookimpl
async def lightd_shutdown(agent: Agent) -> None:
    # An async implementation: the core awaits the coroutine it returns.
    await trio.lowlevel.checkpoint()
    agent.stash[STATE].calls.append("lightd_shutdown")


@hookimpl
def lightd_container_state_changed(
    agent: Agent, internal_id: str, state: str, error: str | None
) -> None:
    agent.stash[STATE].events.append((internal_id, state, error))


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> None:
    agent.stash[STATE].deleted.append(internal_id)


@hookimpl
def lightd_volume_in_use(agent: Agent, volume_id: str) -> str | None:
    return "hello-server" if volume_id == "busy-volume" else None
