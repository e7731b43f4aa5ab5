"""Built-in plugin ``health``: liveness and readiness probes (contract §17).

``GET /health/live`` answers as long as the API serves. ``GET /health/ready`` says whether
the node can do its work: the state store answers a query, the Docker engine answers, and
every declared service (the plugins' long-running tasks) has started and is not backing
off after a crash. Neither needs headers: a load balancer or systemd probes them. A failing
check says why in a few words, never with a path or a secret (the routes are public).

``lightd.server`` keeps the services' states in ``SERVICES`` while it supervises them.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
from typing import Literal, TypedDict

import attrs
import trio
from quart import Blueprint

from ..errors import AgentError
from ..hookspecs import hookimpl
from ..runtime import Agent, StashKey
from .views import describe, public

__all__ = ["SERVICES", "Checks", "Live", "Ready", "ServiceState", "ServiceStates"]

log = logging.getLogger(__name__)

#: How long one check may take before it counts as failed.
CHECK_TIMEOUT = 2.0
#: How long a Docker check's answer is reused: probes every second must not each cost
#: the engine a request.
DOCKER_CACHE_SECONDS = 1.0


class ServiceState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    #: Crashed; waiting before it runs again.
    BACKOFF = "restarting after a crash"
    #: Crashed and not restarted (a service declared ``restart=False``).
    FAILED = "failed"
    #: Returned by itself: its work is done.
    FINISHED = "finished"


@attrs.define
class ServiceStates:
    """Each supervised service's state, and whether the agent finished starting."""

    states: dict[str, ServiceState] = attrs.Factory(dict)
    #: The API serves and every plugin's ``lightd_startup`` ran.
    started: bool = False

    def problem(self) -> str | None:
        if not self.started:
            return "starting"
        for name, state in self.states.items():
            if state not in (ServiceState.RUNNING, ServiceState.FINISHED):
                return f"service {name}: {state.value}"
        return None


SERVICES: StashKey[ServiceStates] = StashKey("health.services")


class Live(TypedDict):
    status: Literal["alive"]


class Checks(TypedDict):
    """``"ok"``, or a short reason."""

    store: str
    docker: str
    plugins: str


class Ready(TypedDict):
    status: Literal["ready", "not_ready"]
    checks: Checks


@attrs.define
class _DockerCheck:
    at: float = -1e9
    result: str = "ok"
    lock: trio.Lock = attrs.Factory(trio.Lock)


_DOCKER: StashKey[_DockerCheck] = StashKey("health.docker")


async def _check_store(agent: Agent) -> str:
    with trio.move_on_after(CHECK_TIMEOUT):
        try:
            # a read: no transaction, so a probe never waits for the write lock's queue
            await agent.store.read(lambda conn: conn.execute("SELECT 1").fetchone())
        except (AgentError, OSError, sqlite3.Error) as exc:  # closed, locked, broken
            log.warning("readiness: the state store failed a query: %s", exc)
            return f"query failed ({type(exc).__name__})"
        return "ok"
    return f"no answer within {CHECK_TIMEOUT:g}s"


async def _check_docker(agent: Agent) -> str:
    """The engine answers a ping (reused for ``DOCKER_CACHE_SECONDS``)."""
    cache = agent.stash.setdefault(_DOCKER, _DockerCheck())
    async with cache.lock:  # concurrent probes share one ping
        now = trio.current_time()
        if now - cache.at < DOCKER_CACHE_SECONDS:
            return cache.result
        result = "unreachable"
        if agent.docker.available:
            with trio.move_on_after(CHECK_TIMEOUT):
                try:
                    await agent.docker.ping()
                    result = "ok"
                except (AgentError, OSError):
                    result = "unreachable"
        cache.at, cache.result = trio.current_time(), result
        return result


def _check_plugins(agent: Agent) -> str:
    states = agent.stash.get(SERVICES)
    if states is None:
        return "starting"
    return states.problem() or "ok"


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("health", __name__)

    @bp.get("/health/live")
    @describe(
        "Liveness probe",
        description="Answers while the agent's API serves. No headers needed.",
        tags=("health",),
    )
    @public
    async def live() -> Live:
        return {"status": "alive"}

    @bp.get("/health/ready")
    @describe(
        "Readiness probe",
        description="200 when the state store and the Docker engine answer and every "
        "service has started and is not restarting after a crash; else 503 naming the "
        "failing check. No headers needed.",
        responses={200: Ready, 503: Ready},
        examples={
            200: {"status": "ready", "checks": {"store": "ok", "docker": "ok", "plugins": "ok"}},
            503: {
                "status": "not_ready",
                "checks": {"store": "ok", "docker": "unreachable", "plugins": "ok"},
            },
        },
        tags=("health",),
    )
    @public
    async def ready() -> Ready | tuple[Ready, int]:
        checks: Checks = {
            "store": await _check_store(agent),
            "docker": await _check_docker(agent),
            "plugins": _check_plugins(agent),
        }
        if all(value == "ok" for value in checks.values()):
            return {"status": "ready", "checks": checks}
        return {"status": "not_ready", "checks": checks}, 503

    return [bp]
