"""Contract §10: restart and recovery — adopt, fail interrupted installs, remove orphans,
recreate vanished containers, and survive a SIGKILL at any step."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import trio
from lightd.containers import CONTAINERS
from lightd.interfaces import PORT_POOL, PortRequest

from ..conftest import TEST_IMAGE, api_client, drop_guard_rules, wait_for
from .conftest import StartNode, add_port, create, docker_state, get, in_thread, ready, wait_state


async def test_running_server_is_adopted_after_a_restart(
    start_node: StartNode, engine: docker.DockerClient, prefix: str
) -> None:
    first = await start_node()
    path = first.agent.config_path
    internal_id = f"{prefix}-adopt"
    async with api_client(first.url) as api:
        await ready(api, internal_id, startup_command="while read l; do echo got $l; done")
        await api.post(f"/containers/{internal_id}/start")
        body = await wait_state(api, internal_id, state="running")
    started = await in_thread(
        lambda: engine.containers.get(body["container_id"]).attrs["State"]["StartedAt"]
    )
    await first.stop()
    assert await in_thread(lambda: docker_state(engine, internal_id)) == "running"  # kept running

    second = await start_node(path=path)
    async with api_client(second.url) as api:
        assert (await get(api, internal_id))["state"] == "running"
        supervisor = second.agent.stash[CONTAINERS].get(internal_id)
        with supervisor.hub.subscribe() as sub:
            await supervisor.send_command("hello")  # stdin re-attached
            with trio.fail_after(10):
                while (await sub.receive()).get("data") != "got hello\n":
                    pass
    now = await in_thread(
        lambda: engine.containers.get(body["container_id"]).attrs["State"]["StartedAt"]
    )
    assert now == started  # adopted, not restarted


async def test_interrupted_install_fails_after_a_restart(
    start_node: StartNode, engine: docker.DockerClient, prefix: str
) -> None:
    first = await start_node()
    internal_id = f"{prefix}-intr"
    async with api_client(first.url) as api:
        await create(api, internal_id, install_script="sleep 60\n")
        await wait_state(api, internal_id, install_state="installing")
    await first.stop()
    second = await start_node(path=first.agent.config_path)
    async with api_client(second.url) as api:
        body = await get(api, internal_id)
    assert body["install_state"] == "failed"
    assert body["error"] == "Installation interrupted"
    left = await in_thread(
        lambda: engine.containers.list(
            all=True, filters={"label": f"lightd.internal_id={internal_id}"}
        )
    )
    assert left == []


async def test_orphans_are_removed_and_vanished_containers_recreated(
    start_node: StartNode, engine: docker.DockerClient, prefix: str
) -> None:
    first = await start_node()
    node_id = first.agent.stash[CONTAINERS].node_id
    internal_id = f"{prefix}-keep"
    async with api_client(first.url) as api:
        body = await ready(api, internal_id)
    await first.stop()
    # While the agent is down: its server container vanishes, and a stray one appears.
    await in_thread(lambda: engine.containers.get(body["container_id"]).remove(force=True))
    stray = await in_thread(
        lambda: engine.containers.create(
            TEST_IMAGE,
            ["sleep", "3600"],
            labels={
                "lightd.managed": "true",
                "lightd.node": node_id,
                "lightd.internal_id": f"{prefix}-gone",
                "lightd.role": "server",
            },
        )
    )
    other_node = await in_thread(
        lambda: engine.containers.create(
            TEST_IMAGE,
            ["sleep", "3600"],
            labels={
                "lightd.managed": "true",
                "lightd.node": "someone-else",
                "lightd.internal_id": f"{prefix}-x",
            },
        )
    )
    second = await start_node(path=first.agent.config_path)
    try:
        with pytest.raises(docker.errors.NotFound):
            await in_thread(lambda: engine.containers.get(stray.id))
        # Another agent's containers on the same engine are none of our business.
        assert (await in_thread(lambda: engine.containers.get(other_node.id))).status == "created"
        async with api_client(second.url) as api:
            await api.post(f"/containers/{internal_id}/start")
            body = await wait_state(api, internal_id, state="running")
        assert await in_thread(lambda: docker_state(engine, internal_id)) == "running"
    finally:
        await in_thread(lambda: other_node.remove(force=True))


async def test_ports_of_unknown_owners_are_released(start_node: StartNode, prefix: str) -> None:
    first = await start_node()
    async with api_client(first.url) as api:
        await add_port(api, 30020)
    pool = first.agent.stash[PORT_POOL]
    await pool.reserve(f"{prefix}-ghost", [PortRequest("127.0.0.1", 30020, "tcp")])
    await first.stop()
    second = await start_node(path=first.agent.config_path)
    async with api_client(second.url) as api:
        assert (await api.get("/network/ports/127.0.0.1/30020")).json()["in_use"] is False


# --- a real SIGKILL of the agent process ---------------------------------------------


@contextmanager
def agent_process(config: Path, docker_host: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightd", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DOCKER_HOST": docker_host},
    )
    url = None
    try:
        assert proc.stderr is not None
        for _ in range(200):
            line = proc.stderr.readline()
            if found := re.search(r"listening on (http://\S+)", line):
                url = found[1]
                break
        assert url, "agent did not start"
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if url:  # a killed agent could not delete its API-port guard rule
            drop_guard_rules(int(url.rsplit(":", 1)[1]))


@pytest.mark.parametrize("step", ["install", "start", "rebind", "delete"])
async def test_sigkill_at_each_step_leaves_a_consistent_node(
    containers_config: Any,
    docker_host: str,
    engine: docker.DockerClient,
    prefix: str,
    step: str,
) -> None:
    config = containers_config()
    internal_id = f"{prefix}-{step}"
    with agent_process(config, docker_host) as (proc, url):
        async with api_client(url) as api:
            for port in (30030, 30031):
                await add_port(api, port)
            body: dict[str, Any] = {
                "ports": [{"ip": "127.0.0.1", "port": 30030, "protocol": "tcp"}]
            }
            if step == "install":
                body["install_script"] = "sleep 60\n"
                await create(api, internal_id, **body)
                await wait_state(api, internal_id, install_state="installing")
            else:
                await ready(api, internal_id, **body)
                if step == "start":
                    await api.post(f"/containers/{internal_id}/start")
                elif step == "rebind":
                    await api.post(f"/containers/{internal_id}/start")
                    await wait_state(api, internal_id, state="running")
                    await api.post(
                        f"/containers/{internal_id}/rebind-network",
                        json={"ports": [{"ip": "127.0.0.1", "port": 30031, "protocol": "tcp"}]},
                    )
                elif step == "delete":
                    await api.delete(f"/containers/{internal_id}")
        proc.send_signal(signal.SIGKILL)
    with agent_process(config, docker_host) as (_, url):
        async with api_client(url) as api:
            await check_consistent(api, engine, prefix)


async def check_consistent(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    """Every record agrees with Docker and the pool; nothing is leaked or stuck."""
    containers = (await api.get("/containers")).json()["containers"]
    known = {c["internal_id"]: c for c in containers}
    assert all(c["install_state"] != "installing" for c in containers)

    async def settled() -> bool:
        # Read again each time: a server that should run (§17) is being started meanwhile.
        now = {c["internal_id"]: c for c in (await api.get("/containers")).json()["containers"]}
        for internal_id, c in now.items():
            docker_says = await in_thread(lambda i=internal_id: docker_state(engine, i))
            if (c["state"] == "running") != (docker_says == "running"):
                return False
        return True

    await wait_for(settled, what="agent and Docker to agree")
    ours = await in_thread(
        lambda: engine.containers.list(all=True, filters={"label": "lightd.managed=true"})
    )
    for container in ours:
        internal_id = container.labels.get("lightd.internal_id", "")
        if internal_id.startswith(prefix):
            assert internal_id in known, f"orphan Docker container {container.name}"
            if container.labels.get("lightd.role") == "install":
                pytest.fail(f"install container left for {internal_id}")
    ports = (await api.get("/network/ports")).json()["ports"]
    for port in ports:
        detail = (await api.get(f"/network/ports/{port['ip']}/{port['port']}")).json()
        owner = detail.get("container")
        if owner is not None:
            assert owner in known, f"port {port['port']} held by unknown {owner}"
            record_ports = {(p["ip"], p["port"]) for p in (await get(api, owner))["ports"]}
            assert (port["ip"], port["port"]) in record_ports, f"port {port['port']} leaked"
    for internal_id in known:
        held = {(p["ip"], p["port"]) for p in (await get(api, internal_id))["ports"]}
        for ip, port in held:
            detail = (await api.get(f"/network/ports/{ip}/{port}")).json()
            assert detail["container"] == internal_id
        await api.delete(f"/containers/{internal_id}")


async def test_a_leftover_server_container_does_not_block_an_install(
    api_node: Any, engine: docker.DockerClient, prefix: str
) -> None:
    api, node = api_node
    internal_id = f"{prefix}-left"
    await create(api, internal_id, install_script="exit 1\n")
    await wait_state(api, internal_id, install_state="failed")
    # What a crash between Docker's create and the agent's record leaves behind.
    stray = await in_thread(
        lambda: engine.containers.create(
            TEST_IMAGE,
            ["sleep", "3600"],
            name=f"lightd-{internal_id}",
            labels={
                "lightd.managed": "true",
                "lightd.node": node.agent.stash[CONTAINERS].node_id,
                "lightd.internal_id": internal_id,
                "lightd.role": "server",
            },
        )
    )
    await api.post(f"/containers/{internal_id}/reinstall", json={"install_script": ""})
    body = await wait_state(api, internal_id, install_state="ready")
    assert body["container_id"] != stray.id
    with pytest.raises(docker.errors.NotFound):
        await in_thread(lambda: engine.containers.get(stray.id))
