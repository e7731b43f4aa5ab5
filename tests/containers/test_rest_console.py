"""Contract §17's console routes with a real container: ``GET /containers/:id/logs``,
``GET /containers/:id/stats`` and ``POST /containers/:id/command``."""

from __future__ import annotations

from typing import Any

import httpx

from ..conftest import RunningAgent, api_client, wait_for
from .conftest import ready, wait_state

#: Prints two lines, then answers every line of stdin.
ECHO = 'echo one; echo two; while read l; do echo "got $l"; done'
NOT_RUNNING = "Container is not running"
STATS_FIELDS = {
    "cpu_usage",
    "memory_usage",
    "memory_limit",
    "network_rx",
    "network_tx",
    "block_read",
    "block_write",
    "disk_bytes",  # §15: the volume's usage
    "state",
    "uptime",
}


async def logs(api: httpx.AsyncClient, internal_id: str, **params: Any) -> list[str]:
    response = await api.get(f"/containers/{internal_id}/logs", params=params)
    assert response.status_code == 200, response.text
    lines = response.json()["lines"]
    assert isinstance(lines, list)
    return lines


async def until_logged(api: httpx.AsyncClient, internal_id: str, line: str) -> list[str]:
    """Poll the logs route until ``line`` is the last line; the lines then."""
    seen: list[str] = []

    async def logged() -> bool:
        nonlocal seen
        seen = await logs(api, internal_id)
        return bool(seen) and seen[-1] == line

    await wait_for(logged, within=20, what=f"{line!r} in the logs (last seen {seen[-3:]})")
    return seen


async def test_logs_commands_and_stats_of_a_running_container(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-rest"
    await ready(api, internal_id, startup_command=ECHO)

    # Offline: no stats, no commands.
    for response in (
        await api.get(f"/containers/{internal_id}/stats"),
        await api.post(f"/containers/{internal_id}/command", json={"command": "early"}),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["error"] == NOT_RUNNING

    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")
    lines = await until_logged(api, internal_id, "two")
    assert lines[-2:] == ["one", "two"]
    assert not any(line.endswith("\n") for line in lines)

    response = await api.post(f"/containers/{internal_id}/command", json={"command": "hello"})
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Command sent"}
    lines = await until_logged(api, internal_id, "got hello")
    assert lines[-3:] == ["one", "two", "got hello"]
    assert await logs(api, internal_id, lines=2) == ["two", "got hello"]
    assert await logs(api, internal_id, lines=1) == ["got hello"]
    assert await logs(api, internal_id, lines=10**9) == lines  # capped by the history

    # A newline already there is not doubled.
    response = await api.post(f"/containers/{internal_id}/command", json={"command": "again\n"})
    assert response.status_code == 200, response.text
    assert (await until_logged(api, internal_id, "got again"))[-2:] == ["got hello", "got again"]

    # The route samples on demand: nobody else listens to this container.
    response = await api.get(f"/containers/{internal_id}/stats")
    assert response.status_code == 200, response.text
    stats = response.json()
    assert set(stats) == STATS_FIELDS
    assert stats["state"] == "running"
    assert stats["memory_usage"] > 0
    assert stats["memory_limit"] >= stats["memory_usage"]

    assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
    await wait_state(api, internal_id, state="offline")
    for response in (
        await api.get(f"/containers/{internal_id}/stats"),
        await api.post(f"/containers/{internal_id}/command", json={"command": "late"}),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["error"] == NOT_RUNNING
    # The history outlives the run.
    assert (await logs(api, internal_id))[-1] == "got again"


async def test_refusals(api: httpx.AsyncClient, node: RunningAgent, prefix: str) -> None:
    internal_id = f"{prefix}-refuse"
    await ready(api, internal_id, startup_command=ECHO)
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")
    await until_logged(api, internal_id, "two")

    for bad in ("0", "-1", "abc", "1.5", "", "²", "true"):
        response = await api.get(f"/containers/{internal_id}/logs", params={"lines": bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"] == "lines must be a positive integer"

    path = f"/containers/{internal_id}/command"
    for body in ({}, {"command": 7}, {"command": None}, {"command": "a\x00b"}):
        response = await api.post(path, json=body)
        assert response.status_code == 400, (body, response.text)
        assert "command" in response.json()["error"]
    response = await api.post(path, json={"command": "x" * 40000})  # websocket.max_frame_bytes
    assert response.status_code == 413, response.text

    for missing in ("logs", "stats"):
        assert (await api.get(f"/containers/{prefix}-none/{missing}")).status_code == 404
    assert (
        await api.post(f"/containers/{prefix}-none/command", json={"command": "x"})
    ).status_code == 404

    # A temporary token without ``console`` may read the logs but not send commands.
    response = await api.post(
        "/auth/tokens",
        json={"ttl": "15m", "permissions": ["read"], "containers": [internal_id]},
    )
    assert response.status_code == 200, response.text
    async with api_client(node.url, response.json()["token"]) as reader:
        assert (await reader.get(f"/containers/{internal_id}/logs")).status_code == 200
        response = await reader.post(path, json={"command": "sneaky"})
        assert response.status_code == 403, response.text
    # Nothing reached the server: a later command's answer follows "two" directly.
    assert (await api.post(path, json={"command": "marker"})).status_code == 200
    assert (await until_logged(api, internal_id, "got marker"))[-2:] == ["two", "got marker"]
