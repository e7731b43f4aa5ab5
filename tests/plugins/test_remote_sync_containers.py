"""Remote sync end to end: real containers on the real Docker engine report to the mock
panel over loopback HTTP. A normal install sends exactly ``installing``, ``ready``; a
failed one the error shape; power states only with ``report_power_state``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import trio

from ..conftest import TEST_IMAGE, RunningAgent, StartAgent, api_client
from ..containers.conftest import new_volume, wait_state
from .remote_sync_support import Panel, remote_config, until


@pytest.fixture
async def panel(nursery: trio.Nursery) -> AsyncIterator[Panel]:
    panel = Panel(nursery)
    await panel.up()
    yield panel
    panel.close()


@pytest.fixture
def prefix() -> str:
    return f"rs{uuid.uuid4().hex[:8]}"


StartNode = Callable[..., Any]


@pytest.fixture
async def start_node(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    docker_host: str,
    prefix: str,
) -> AsyncIterator[StartNode]:
    """An agent on the real engine reporting to ``panel``; the test's containers go at
    the end, whatever happened."""

    async def start(panel: Panel, **remote: Any) -> RunningAgent:
        overrides = remote_config(panel.url, **remote)
        overrides["containers"] = {"stop_timeout": 5, "install_timeout": 60}
        return await start_agent(
            make_config(overrides),
            environ={"DOCKER_HOST": docker_host},
        )

    try:
        yield start
    finally:

        def clean() -> None:
            client = docker.DockerClient(base_url=docker_host)
            try:
                for c in client.containers.list(all=True, filters={"label": "lightd.managed=true"}):
                    if c.labels.get("lightd.internal_id", "").startswith(prefix):
                        # the agent may be removing it at the same moment
                        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                            c.remove(force=True)
            finally:
                client.close()

        await trio.to_thread.run_sync(clean)


async def create(api: httpx.AsyncClient, internal_id: str, **body: Any) -> None:
    payload = {
        "internal_id": internal_id,
        "image": TEST_IMAGE,
        "startup_command": "echo ready; sleep 3600",
        "volume_id": await new_volume(api),
        **body,
    }
    response = await api.post("/containers", json=payload)
    assert response.status_code == 200, response.text


async def test_a_real_install_reports_exactly_installing_then_ready(
    panel: Panel, start_node: StartNode, prefix: str
) -> None:
    node = await start_node(panel)
    server = f"{prefix}-ok"
    async with api_client(node.url) as api:
        await create(api, server)
        await wait_state(api, server, install_state="ready")
        response = await api.post(f"/containers/{server}/start")
        assert response.status_code == 200, response.text
        await wait_state(api, server, state="running")
        # Reinstall: the marker that everything before it went out (it is sent after).
        response = await api.post(f"/containers/{server}/reinstall", json={})
        assert response.status_code == 200, response.text
        await wait_state(api, server, install_state="ready")
    await until(lambda: len(panel.statuses(server)) == 4, within=15)
    assert panel.statuses(server) == ["installing", "ready", "installing", "ready"]


async def test_a_failed_real_install_reports_the_error_shape(
    panel: Panel, start_node: StartNode, prefix: str
) -> None:
    node = await start_node(panel)
    server = f"{prefix}-bad"
    async with api_client(node.url) as api:
        await create(api, server, install_script="echo preparing; exit 3")
        seen = await wait_state(api, server, install_state="failed")
    await until(lambda: len(panel.statuses(server)) == 2, within=15)
    installing, failed = panel.bodies(server)
    assert installing["status"] == "installing"
    assert failed["error"] == "failed" and "status" not in failed
    assert failed["data"] == seen["error"]
    assert "exit code 3" in failed["data"]


async def test_real_power_states_are_reported_with_report_power_state(
    panel: Panel, start_node: StartNode, prefix: str
) -> None:
    node = await start_node(panel, report_power_state=True)
    server = f"{prefix}-pwr"
    async with api_client(node.url) as api:
        await create(api, server)
        await wait_state(api, server, install_state="ready")
        assert (await api.post(f"/containers/{server}/start")).status_code == 200
        await wait_state(api, server, state="running")
        assert (
            await api.post(f"/containers/{server}/stop", json={"timeout": 1})
        ).status_code == 200
        await wait_state(api, server, state="offline")
    expected = ["installing", "ready", "starting", "running", "stopping", "offline"]
    await until(lambda: len(panel.statuses(server)) >= len(expected), within=15)
    assert panel.statuses(server) == expected
