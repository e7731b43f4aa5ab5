"""Fixtures for container tests: a node on the real engine, volumes, pool ports, and
helpers that poll the agent (never sleep) until a container reaches a state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import trio

from ..conftest import MADE, TEST_IMAGE, RunningAgent, StartAgent, api_client, wait_for


@pytest.fixture(scope="session")
def engine(docker_host: str) -> docker.DockerClient:
    """A docker-py client for checking what the agent did (tests only read and clean)."""
    client = docker.DockerClient(base_url=docker_host)
    yield client
    client.close()


@pytest.fixture
def prefix() -> str:
    """A unique internal-id prefix per test (containers of a test are easy to find)."""
    return MADE.new_prefix()


@pytest.fixture
def containers_config(make_config: Callable[..., Path]) -> Callable[..., Path]:
    def make(overrides: dict[str, Any] | None = None, **kwargs: Any) -> Path:
        base = {"containers": {"stop_timeout": 5, "install_timeout": 60}}
        from lightd.config import deep_merge

        return make_config(deep_merge(base, overrides or {}), **kwargs)

    return make


StartNode = Callable[..., Any]


@pytest.fixture
async def start_node(
    start_agent: StartAgent,
    containers_config: Callable[..., Path],
    docker_host: str,
    engine: docker.DockerClient,
    prefix: str,
) -> AsyncIterator[StartNode]:
    """Start an agent on the real engine (config ``overrides`` deep-merged); at the end
    remove every Docker container the test's ids left behind."""
    started: list[RunningAgent] = []

    async def start(
        overrides: dict[str, Any] | None = None,
        *,
        path: Path | None = None,
        extra: tuple[tuple[str, object], ...] = (),
    ) -> RunningAgent:
        running = await start_agent(
            path or containers_config(overrides),
            environ={"DOCKER_HOST": docker_host},
            extra_plugins=extra,
        )
        started.append(running)
        return running

    try:
        yield start
    finally:
        # The agents stop first: one still running would go on creating what a test's
        # create started (an install in flight) after the sweep below.
        try:
            for running in started:
                await running.stop()
        finally:
            # Whatever a test left behind goes, so the engine stays clean for the next one.
            # ignore_removed: a container removed while docker-py inspects the listing
            # (the agent's own removal, at the same moment) is skipped, not a NotFound.
            listed = engine.containers.list(
                all=True, filters={"label": "lightd.managed=true"}, ignore_removed=True
            )
            for c in listed:
                if c.labels.get("lightd.internal_id", "").startswith(prefix):
                    with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                        c.remove(force=True)  # the agent may be removing it at the same moment


@pytest.fixture
async def node(start_node: StartNode) -> RunningAgent:
    return await start_node()


@pytest.fixture
async def api(node: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(node.url) as client:
        yield client


@pytest.fixture
def api_node(api: httpx.AsyncClient, node: RunningAgent) -> tuple[httpx.AsyncClient, RunningAgent]:
    return api, node


async def new_volume(api: httpx.AsyncClient) -> str:
    response = await api.post("/volumes")
    assert response.status_code == 201, response.text
    return str(response.json()["volume_id"])


async def add_port(api: httpx.AsyncClient, port: int, protocol: str = "tcp") -> dict[str, Any]:
    response = await api.post(
        "/network/ports", json={"ip": "127.0.0.1", "port": port, "protocol": protocol}
    )
    assert response.status_code == 200, response.text
    return {"ip": "127.0.0.1", "port": port, "protocol": protocol}


async def create(api: httpx.AsyncClient, internal_id: str, **body: Any) -> httpx.Response:
    payload = {
        "internal_id": internal_id,
        "image": TEST_IMAGE,
        "startup_command": "echo ready; sleep 3600",
        **body,
    }
    if "volume_id" not in payload:
        payload["volume_id"] = await new_volume(api)
    return await api.post("/containers", json=payload)


async def get(api: httpx.AsyncClient, internal_id: str) -> dict[str, Any]:
    response = await api.get(f"/containers/{internal_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_state(
    api: httpx.AsyncClient, internal_id: str, *, within: float = 30, **expected: Any
) -> dict[str, Any]:
    """Poll ``GET /containers/:id`` until every ``expected`` field matches."""
    seen: dict[str, Any] = {}

    async def matches() -> bool:
        nonlocal seen
        seen = await get(api, internal_id)
        return all(seen.get(k) == v for k, v in expected.items())

    try:
        await wait_for(matches, within=within, what=f"{internal_id} to reach {expected}")
    except BaseException:
        print("last seen:", seen)
        raise
    return seen


async def ready(api: httpx.AsyncClient, internal_id: str, **body: Any) -> dict[str, Any]:
    response = await create(api, internal_id, **body)
    assert response.status_code == 200, response.text
    return await wait_state(api, internal_id, install_state="ready")


def docker_state(engine: docker.DockerClient, internal_id: str) -> str | None:
    found = engine.containers.list(
        all=True, filters={"label": [f"lightd.internal_id={internal_id}", "lightd.role=server"]}
    )
    return found[0].status if found else None


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)
