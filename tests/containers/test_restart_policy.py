"""Contract §17: ``restart_policy`` per container (``never|on-crash|always``, at most
``max_restarts`` in ``window_s``), the node's ``containers.crash_restart`` as default."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from lightd.containers import CONTAINERS

from ..conftest import RunningAgent, api_client, wait_for
from .conftest import create, get, ready, wait_state
from .test_power import drain, messages_of, wait_frame

LIMIT = "Crash restart limit reached; not restarting"
RESTART = "Restarting after crash"


def restarts(frames: list[dict[str, Any]]) -> int:
    return sum(f.get("data") == RESTART for f in frames)


async def test_on_crash_restarts_up_to_max_restarts(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-oc"
    policy = {"mode": "on-crash", "max_restarts": 2, "window_s": 600}
    body = await ready(api, internal_id, startup_command="echo up; exit 1", restart_policy=policy)
    assert body["restart_policy"] == {"mode": "on-crash", "max_restarts": 2, "window_s": 600.0}
    with messages_of(node, internal_id) as sub:
        await api.post(f"/containers/{internal_id}/start")
        seen = await wait_frame(sub, {"data": LIMIT}, within=60)
        seen += drain(sub)
    assert restarts(seen) == 2
    assert sum(f.get("data") == "Container crashed (exit code 1)" for f in seen) == 3
    await wait_state(api, internal_id, state="offline")


async def until_settled(node: RunningAgent, api: httpx.AsyncClient, internal_id: str) -> None:
    supervisor = node.agent.stash[CONTAINERS].get(internal_id)

    async def settled() -> bool:
        return supervisor.offline and supervisor.idle and supervisor.exit_code is not None

    await wait_for(settled, within=30, what=f"{internal_id} to exit and settle")


@pytest.mark.parametrize(
    ("policy", "exit_code"),
    [({"mode": "never"}, 1), ({"mode": "on-crash"}, 0)],
)
async def test_no_restart(
    start_node: Any, prefix: str, policy: dict[str, Any], exit_code: int
) -> None:
    """``never`` (on a node whose default restarts), and ``on-crash`` after exit code 0,
    leave the server offline. Two runs, each started by the test: a restart queued after
    the first would either refuse the second start or show as a third run."""
    node = await start_node({"containers": {"crash_restart": {"enabled": True}}})
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-no"
        body = await ready(
            api,
            internal_id,
            startup_command=f"echo run >> /home/container/runs; exit {exit_code}",
            restart_policy=policy,
        )
        runs = node.agent.paths.volumes / body["volume_id"] / "runs"
        with messages_of(node, internal_id) as sub:
            for _ in range(2):
                response = await api.post(f"/containers/{internal_id}/start")
                assert response.status_code == 200, response.text
                await wait_frame(sub, {"data": f"Container crashed (exit code {exit_code})"})
                await until_settled(node, api, internal_id)
            frames = drain(sub)
        assert restarts(frames) == 0
        assert runs.read_text().splitlines() == ["run", "run"]
        assert (await get(api, internal_id))["state"] == "offline"


async def test_always_restarts_a_clean_exit_but_not_a_stop(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-al"
    await ready(
        api,
        internal_id,
        startup_command="echo up; exit 0",
        restart_policy={"mode": "always", "max_restarts": 1},
    )
    with messages_of(node, internal_id) as sub:
        await api.post(f"/containers/{internal_id}/start")
        seen = await wait_frame(sub, {"data": LIMIT}, within=60)
    assert restarts(seen) == 1
    await until_settled(node, api, internal_id)
    # Stopped through the API: not restarted, even by "always".
    stopper = f"{prefix}-als"
    await ready(
        api,
        stopper,
        startup_command="sleep 3600",
        restart_policy={"mode": "always", "max_restarts": 5},
    )
    with messages_of(node, stopper) as sub:
        await api.post(f"/containers/{stopper}/start")
        await wait_state(api, stopper, state="running")
        await api.post(f"/containers/{stopper}/stop", json={"timeout": 1})
        await wait_frame(sub, {"data": "Container stopped"})
        await until_settled(node, api, stopper)
        assert restarts(drain(sub)) == 0


async def test_default_comes_from_the_node_config(start_node: Any, prefix: str) -> None:
    node = await start_node(
        {"containers": {"crash_restart": {"enabled": True, "max_restarts": 1, "window": 60}}}
    )
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-def"
        body = await ready(api, internal_id, startup_command="echo up; exit 2")
        assert body["restart_policy"] == {"mode": "on-crash", "max_restarts": 1, "window_s": 60.0}
        with messages_of(node, internal_id) as sub:
            await api.post(f"/containers/{internal_id}/start")
            seen = await wait_frame(sub, {"data": LIMIT}, within=60)
        assert restarts(seen) == 1
        # A container's own policy wins over the node's; null goes back to the node's.
        response = await api.patch(
            f"/containers/{internal_id}", json={"restart_policy": {"mode": "never"}}
        )
        assert response.json() == {"message": "Container updated", "applies": "now"}
        assert (await get(api, internal_id))["restart_policy"]["mode"] == "never"
        await api.patch(f"/containers/{internal_id}", json={"restart_policy": None})
        assert (await get(api, internal_id))["restart_policy"]["mode"] == "on-crash"


async def test_bad_restart_policies(api: httpx.AsyncClient, prefix: str) -> None:
    for n, (policy, error) in enumerate(
        [
            ({"mode": "later"}, "restart_policy.mode: must be never, on-crash or always"),
            ({"max_restarts": 1}, "restart_policy.mode: is required"),
            ({"mode": "always", "max_restarts": -1}, "restart_policy.max_restarts: must be 0 to"),
            ({"mode": "always", "window_s": "x"}, "restart_policy.window_s: must be a number"),
            ("always", "restart_policy: must be an object"),
        ]
    ):
        response = await create(api, f"{prefix}-b{n}", restart_policy=policy)
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith(error), response.text
