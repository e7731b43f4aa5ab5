"""Node events (contract §17) of a real container's life: create, install, start, kill,
delete, read from ``GET /events`` while the engine does the work."""

from __future__ import annotations

import httpx
import trio

from ..conftest import RunningAgent
from ..test_events import sse
from .conftest import create, wait_state


async def test_a_containers_life_arrives_in_order_with_seq_plus_one(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-life"
    async with sse(node) as stream:
        volume = (await api.post("/volumes")).json()["volume_id"]
        response = await create(api, internal_id, volume_id=volume)
        assert response.status_code == 200, response.text
        await wait_state(api, internal_id, install_state="ready")
        assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        await wait_state(api, internal_id, state="running")
        assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
        await wait_state(api, internal_id, state="offline")
        assert (await api.delete(f"/containers/{internal_id}")).status_code == 200
        got = []
        with trio.fail_after(20):
            while not got or got[-1]["type"] != "container.deleted":
                got.append(await stream.next())
    assert [e["seq"] for e in got] == list(range(got[0]["seq"], got[0]["seq"] + len(got)))
    assert got[0] == {**got[0], "type": "volume.created", "data": {"volume_id": volume}}
    mine = [(e["type"], e["data"]) for e in got[1:]]
    assert mine == [
        ("container.created", {"internal_id": internal_id, "image": mine[0][1]["image"],
                               "volume_id": volume}),
        ("container.install", {"internal_id": internal_id, "state": "installing", "error": None}),
        ("container.install", {"internal_id": internal_id, "state": "ready", "error": None}),
        ("container.state", {"internal_id": internal_id, "state": "starting"}),
        ("container.state", {"internal_id": internal_id, "state": "running"}),
        ("container.state", {"internal_id": internal_id, "state": "stopping"}),  # the kill
        ("container.state", {"internal_id": internal_id, "state": "offline"}),
        ("container.deleted", {"internal_id": internal_id}),
    ]  # fmt: skip


async def test_a_failed_install_says_why(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-bad"
    async with sse(node) as stream:
        response = await create(api, internal_id, image="lightd-test/missing:none")
        assert response.status_code == 200, response.text
        with trio.fail_after(30):
            while (event := await stream.next())["type"] != "container.install" or event["data"][
                "state"
            ] != "failed":
                pass
    assert event["data"]["internal_id"] == internal_id
    assert isinstance(event["data"]["error"], str) and event["data"]["error"]
    assert (await api.delete(f"/containers/{internal_id}")).status_code == 200
