"""The motd plugin in a real agent: fixtures from ``lightd.testing`` (no conftest needed).

The first tests need no Docker engine; the last ones start a real server (they are
skipped when no engine answers, or fail with ``--lightd-require-docker``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd.testing import (
    DockerTarget,
    RunningAgent,
    StartAgent,
    create_server,
    wait_state,
)

from lightd_motd.plugin import MOTD, MotdConfig


async def test_set_read_and_remove_a_message(lightd_client: httpx.AsyncClient) -> None:
    assert (await lightd_client.get("/motd/srv-1")).status_code == 404
    put = await lightd_client.put("/motd/srv-1", json={"message": "Double XP this weekend"})
    assert put.status_code == 200, put.text
    assert put.json()["message"] == "Double XP this weekend"
    got = await lightd_client.get("/motd/srv-1")
    assert got.json() == put.json()
    assert (await lightd_client.delete("/motd/srv-1")).json() == {
        "message": "Message of the day removed"
    }
    assert (await lightd_client.delete("/motd/srv-1")).status_code == 404


async def test_routes_need_a_token(lightd_agent: RunningAgent) -> None:
    async with lightd_agent.client(token=None) as anonymous:
        assert (await anonymous.get("/motd/srv-1")).status_code == 401


async def test_bad_bodies_are_400(lightd_client: httpx.AsyncClient) -> None:
    response = await lightd_client.put("/motd/srv-1", json={"message": 5})
    assert response.status_code == 400
    assert response.json()["error"].startswith("message:")


@pytest.mark.lightd(config={"motd": {"max_length": 5, "file": "info/motd.txt"}})
async def test_config_section_is_typed_and_applied(
    lightd_agent: RunningAgent, lightd_client: httpx.AsyncClient
) -> None:
    section = lightd_agent.agent.config.section(MotdConfig)
    assert section == MotdConfig(file="info/motd.txt", max_length=5)
    response = await lightd_client.put("/motd/srv-1", json={"message": "too long"})
    assert response.status_code == 400
    assert response.json()["error"] == "message: must be at most 5 characters"
    assert (await lightd_client.put("/motd/srv-1", json={"message": "hi"})).status_code == 200


async def test_a_bad_config_value_stops_the_agent(lightd_start: StartAgent) -> None:
    from lightd import ConfigError

    with pytest.raises(ConfigError, match=r"^motd.file: must be a relative path$"):
        await lightd_start(config={"motd": {"file": "/etc/motd"}})


async def test_messages_survive_a_restart(
    lightd_start: StartAgent, lightd_config: Callable[..., Path]
) -> None:
    path = lightd_config()
    first = await lightd_start(config=path)
    async with first.client() as client:
        assert (await client.put("/motd/srv-1", json={"message": "kept"})).status_code == 200
    await first.stop()
    second = await lightd_start(config=path)
    async with second.client() as client:
        assert (await client.get("/motd/srv-1")).json()["message"] == "kept"
        metrics = (await client.get("/metrics")).text
    assert "lightd_motd_messages 1.0" in metrics


# -- with a Docker engine -----------------------------------------------------------------


@pytest.mark.lightd(docker=True, config={"motd": {"announce_interval": 0.2}})
async def test_the_message_is_in_the_volume_at_start_and_announced(
    lightd_agent: RunningAgent,
    lightd_client: httpx.AsyncClient,
    lightd_docker: DockerTarget,
    lightd_server_id: str,
    lightd_ws: Callable[..., Any],
) -> None:
    server = lightd_server_id
    volume = await lightd_agent.new_volume()
    await create_server(
        lightd_client,
        server,
        image=lightd_docker.image,
        volume_id=volume.id,
        startup_command="cat motd.txt; sleep 3600",
    )
    put = await lightd_client.put(f"/motd/{server}", json={"message": "Welcome, builders!"})
    assert put.status_code == 200
    assert not (volume.path / "motd.txt").exists()  # written at each start, not before

    async with lightd_ws(f"/ws/{server}") as ws:
        response = await lightd_client.post(f"/containers/{server}/start")
        assert response.is_success, response.text
        await wait_state(lightd_client, server, state="running")
        assert (volume.path / "motd.txt").read_text() == "Welcome, builders!\n"
        # The server printed the file (written before Docker started it), and the
        # service announced the message on the console.
        printed = announced = False
        with trio.fail_after(10):
            while not (printed and announced):
                frame = json.loads(await ws.get_message())
                text = str(frame.get("data"))
                printed |= frame["event"] == "console" and "Welcome, builders!" in text
                announced |= frame["event"] == "daemon_message" and text.startswith("[MOTD]")
    assert lightd_agent.agent.stash[MOTD].written == 1


@pytest.mark.lightd(docker=True)
async def test_deleting_the_server_forgets_its_message(
    lightd_agent: RunningAgent,
    lightd_client: httpx.AsyncClient,
    lightd_docker: DockerTarget,
    lightd_server_id: str,
) -> None:
    await create_server(lightd_client, lightd_server_id, image=lightd_docker.image)
    assert (await lightd_client.put(f"/motd/{lightd_server_id}", json={"message": "x"})).is_success
    assert (await lightd_client.delete(f"/containers/{lightd_server_id}")).is_success
    assert (await lightd_client.get(f"/motd/{lightd_server_id}")).status_code == 404
    info = (await lightd_client.get("/system/info")).json()
    motd = next(p for p in info["plugins"] if p["name"] == "motd")
    assert motd["origin"] == "lightd-motd"
    assert motd["version"] == "1.0.0"
