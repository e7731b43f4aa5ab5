"""Contract §17 desired state: a server started through the API and not stopped or killed
through it runs again after the agent or the engine restarts, ``boot_concurrency`` at a
time; one stopped through the API stays offline."""

from __future__ import annotations

import subprocess
from typing import Any

import docker
import pytest
import trio
from lightd.containers import CONTAINERS

from ..conftest import ROOT, api_client, outside_environ, wait_for
from .conftest import StartNode, docker_state, get, in_thread, ready, wait_state

PRIVATE_SOCKET = "unix:///run/lightd-docker/docker.sock"


async def test_servers_that_should_run_come_back_after_the_agent_restarts(
    start_node: StartNode, engine: docker.DockerClient, prefix: str
) -> None:
    first = await start_node()
    path = first.agent.config_path
    up, stopped, never = f"{prefix}-up", f"{prefix}-stopped", f"{prefix}-never"
    async with api_client(first.url) as api:
        for internal_id in (up, stopped, never):
            body = await ready(api, internal_id)
            assert body["should_run"] is False
        for internal_id in (up, stopped):
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
            await wait_state(api, internal_id, state="running", should_run=True)
        stop = await api.post(f"/containers/{stopped}/stop", json={"timeout": 1})
        assert stop.status_code == 200
        await wait_state(api, stopped, state="offline", should_run=False)
    await first.stop()
    # Behind the agent's back, while it is down: the server that should run is stopped.
    container = await in_thread(lambda: engine.containers.get(f"lightd-{up}"))
    await in_thread(lambda: container.stop(timeout=1))
    assert await in_thread(lambda: docker_state(engine, up)) == "exited"

    second = await start_node(path=path)
    async with api_client(second.url) as api:
        await wait_state(api, up, state="running", should_run=True)
        assert (await get(api, stopped))["state"] == "offline"
        assert (await get(api, never))["state"] == "offline"
    assert await in_thread(lambda: docker_state(engine, up)) == "running"
    assert await in_thread(lambda: docker_state(engine, stopped)) == "exited"


class _Starts:
    """Records when each server enters ``starting`` and ``running``."""

    def __init__(self) -> None:
        self.spans: dict[str, list[float]] = {}

    @__import__("lightd").hookimpl
    def lightd_container_state_changed(
        self, agent: Any, internal_id: str, state: str, error: str | None
    ) -> None:
        if state in ("starting", "running"):
            self.spans.setdefault(internal_id, []).append(trio.current_time())

    def most_at_once(self) -> int:
        edges = sorted(
            (t, +1 if i == 0 else -1)
            for span in self.spans.values()
            for i, t in enumerate(span[:2])
        )
        now = most = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most


async def test_boot_starts_at_most_boot_concurrency_at_once(
    start_node: StartNode, engine: docker.DockerClient, prefix: str
) -> None:
    overrides = {"containers": {"boot_concurrency": 2, "boot_stagger": 0}}
    first = await start_node(overrides)
    path = first.agent.config_path
    ids = [f"{prefix}-boot{n}" for n in range(6)]
    async with api_client(first.url) as api:
        for internal_id in ids:
            await ready(api, internal_id)
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        for internal_id in ids:
            await wait_state(api, internal_id, state="running")
    await first.stop()
    for internal_id in ids:
        container = await in_thread(lambda i=internal_id: engine.containers.get(f"lightd-{i}"))
        await in_thread(lambda c=container: c.kill())

    starts = _Starts()
    second = await start_node(path=path, extra=(("starts", starts),))
    async with api_client(second.url) as api:
        for internal_id in ids:
            await wait_state(api, internal_id, state="running")
    assert sorted(starts.spans) == sorted(ids)
    assert all(len(span) == 2 for span in starts.spans.values()), starts.spans
    assert starts.most_at_once() <= 2


def _restart_private_engine() -> None:
    """Restart the project's private dockerd; the new one outlives the session, as the
    one ``docker_host`` started does (not a process the session leaves behind)."""
    script = str(ROOT / "scripts" / "docker-engine.sh")
    env = outside_environ()
    for args in (["--stop"], []):
        subprocess.run(
            ["bash", script, *args], check=True, capture_output=True, env=env, timeout=300
        )


async def test_servers_that_should_run_come_back_after_the_engine_restarts(
    start_node: StartNode, engine: docker.DockerClient, prefix: str, docker_host: str
) -> None:
    pidfile = trio.Path("/run/lightd-docker/dockerd.pid")
    if docker_host != PRIVATE_SOCKET or not await pidfile.exists():
        pytest.skip("the engine is not the project's private dockerd: not ours to restart")
    node = await start_node()
    up, stopped = f"{prefix}-eup", f"{prefix}-estopped"
    async with api_client(node.url) as api:
        for internal_id in (up, stopped):
            await ready(api, internal_id)
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
            await wait_state(api, internal_id, state="running")
        assert (await api.post(f"/containers/{stopped}/kill")).status_code == 200
        await wait_state(api, stopped, state="offline", should_run=False)

        before = node.agent.stash[CONTAINERS].get(up)
        await trio.to_thread.run_sync(_restart_private_engine)

        await wait_state(api, up, state="running", within=60)
        assert (await get(api, stopped))["state"] == "offline"

        async def engine_runs_it() -> bool:
            return await in_thread(lambda: docker_state(engine, up)) == "running"

        await wait_for(engine_runs_it, within=30, what="the engine to run the server again")
        assert await in_thread(lambda: docker_state(engine, stopped)) == "exited"
    # The containers service rode the engine's absence out (a crash of it would have made
    # new supervisors and closed every console with 1012).
    assert node.agent.stash[CONTAINERS].get(up) is before
