"""Contract §17: ``PATCH /containers/:id`` (limits live, the rest at the next start) and
the [alias] ``POST``/``GET /containers/:id/resources``, on the real engine."""

from __future__ import annotations

from typing import Any

import docker
import httpx
import pytest
import trio
import trio.lowlevel
from lightd.containers import CONTAINERS
from lightd.containers.models import node_cpus

from ..conftest import RunningAgent, wait_for
from .conftest import create, get, in_thread, ready, wait_state

MiB = 1024 * 1024


async def patch(api: httpx.AsyncClient, internal_id: str, **body: Any) -> httpx.Response:
    return await api.patch(f"/containers/{internal_id}", json=body)


def host_config(engine: docker.DockerClient, container_id: str) -> dict[str, Any]:
    container = engine.containers.get(container_id)
    return dict(container.attrs["HostConfig"])


def env_of(engine: docker.DockerClient, container_id: str) -> list[str]:
    return list(engine.containers.get(container_id).attrs["Config"]["Env"])


async def running_server(api: httpx.AsyncClient, internal_id: str, **body: Any) -> dict[str, Any]:
    await ready(api, internal_id, **body)
    response = await api.post(f"/containers/{internal_id}/start")
    assert response.status_code == 200, response.text
    return await wait_state(api, internal_id, state="running")


async def test_patch_limits_apply_to_the_running_server_at_once(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-lim"
    before = await running_server(api, internal_id, limits={"memory": 64 * MiB, "cpu": 1})
    response = await patch(api, internal_id, limits={"memory": 96 * MiB, "cpu": 0.5})
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Container updated", "applies": "now"}
    # Applied when the answer comes: no polling.
    config = await in_thread(lambda: host_config(engine, before["container_id"]))
    assert config["Memory"] == 96 * MiB
    assert config["NanoCpus"] == 500_000_000
    assert config["PidsLimit"] == 512  # merged: the fields not named stay
    after = await get(api, internal_id)
    assert after["limits"] == {"memory": 96 * MiB, "cpu": 0.5, "pids": 512, "swap": 0}
    # The same server, not restarted.
    assert after["state"] == "running"
    assert after["container_id"] == before["container_id"]
    assert after["started_at"] == before["started_at"]
    state = await in_thread(lambda: engine.containers.get(before["container_id"]).status)
    assert state == "running"


async def test_patch_environment_and_startup_apply_at_the_next_start(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-env"
    before = await running_server(
        api,
        internal_id,
        environment={"GREETING": "one"},
        startup_command='echo "greeting=$GREETING"; sleep 3600',
    )
    response = await patch(
        api,
        internal_id,
        environment={"GREETING": "two", "OTHER": "x"},
        startup_command='echo "now $GREETING $OTHER"; sleep 3600',
        stop_command="",
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Container updated", "applies": "next_start"}
    body = await get(api, internal_id)
    assert body["environment"] == {"GREETING": "two", "OTHER": "x"}
    assert body["startup_command"] == 'echo "now $GREETING $OTHER"; sleep 3600'
    assert body["stop_command"] is None
    # The running server is what it was until it starts again.
    assert body["state"] == "running"
    assert body["container_id"] == before["container_id"]
    env = await in_thread(lambda: env_of(engine, before["container_id"]))
    assert "GREETING=one" in env
    assert not any(e.startswith("OTHER=") for e in env)

    restart = await api.post(f"/containers/{internal_id}/restart")
    assert restart.status_code == 200

    async def restarted() -> bool:
        now = await get(api, internal_id)
        return now["state"] == "running" and now["container_id"] != before["container_id"]

    await wait_for(restarted, within=30, what="the restart onto a new Docker container")
    after = await get(api, internal_id)
    env = await in_thread(lambda: env_of(engine, after["container_id"]))
    assert "GREETING=two" in env
    assert "OTHER=x" in env

    async def printed() -> bool:
        lines = (await api.get(f"/containers/{internal_id}/logs")).json()["lines"]
        return "now two x" in lines

    await wait_for(printed, what="the new startup command's output")
    # The old Docker container is gone, not left behind.
    gone = await in_thread(
        lambda: [c.id for c in engine.containers.list(all=True) if c.id == before["container_id"]]
    )
    assert gone == []


async def test_patch_racing_a_start_is_ordered(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-race"
    await ready(api, internal_id, limits={"memory": 64 * MiB}, environment={"V": "old"})
    answers: dict[str, httpx.Response] = {}

    async def start() -> None:
        answers["start"] = await api.post(f"/containers/{internal_id}/start")

    async def change() -> None:
        await trio.lowlevel.checkpoint()  # the start is sent first
        answers["patch"] = await patch(
            api, internal_id, limits={"memory": 80 * MiB}, environment={"V": "new"}
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start)
        nursery.start_soon(change)
    assert answers["start"].status_code == 200, answers["start"].text
    assert answers["patch"].status_code == 200, answers["patch"].text
    assert answers["patch"].json()["applies"] == "next_start"
    body = await wait_state(api, internal_id, state="running")
    # Whichever the engine saw first, the server runs with the new limits once both are
    # answered: the live update ran after the start in the container's queue.
    config = await in_thread(lambda: host_config(engine, body["container_id"]))
    assert config["Memory"] == 80 * MiB
    assert body["environment"] == {"V": "new"}
    # The environment is there at the latest after the next start.
    await api.post(f"/containers/{internal_id}/restart")

    async def has_new_env() -> bool:
        now = await get(api, internal_id)
        if now["state"] != "running" or now["container_id"] is None:
            return False
        return "V=new" in await in_thread(lambda: env_of(engine, now["container_id"]))

    await wait_for(has_new_env, within=30, what="the new environment after the restart")
    now = await get(api, internal_id)
    config = await in_thread(lambda: host_config(engine, now["container_id"]))
    assert config["Memory"] == 80 * MiB


async def test_patch_while_offline_and_no_op(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-off"
    body = await ready(api, internal_id, limits={"memory": 64 * MiB})
    response = await patch(api, internal_id, limits={"pids": 100})
    assert response.json() == {"message": "Container updated", "applies": "now"}
    config = await in_thread(lambda: host_config(engine, body["container_id"]))
    assert config["PidsLimit"] == 100
    # Nothing that differs: nothing to wait for.
    same = await patch(api, internal_id, startup_command=body["startup_command"])
    assert same.json() == {"message": "Container updated", "applies": "now"}
    assert (await patch(api, internal_id)).json()["applies"] == "now"
    # A start uses the patched record (recreated for the new image reference).
    image = await patch(api, internal_id, image=body["image"].split(":")[0])
    assert image.json()["applies"] == "next_start"
    await api.post(f"/containers/{internal_id}/start")
    now = await wait_state(api, internal_id, state="running")
    assert now["container_id"] != body["container_id"]
    config = await in_thread(lambda: host_config(engine, now["container_id"]))
    assert config["PidsLimit"] == 100
    assert config["Memory"] == 64 * MiB


BAD_VALUES = [
    ({"limits": {"memory": 1000}}, "limits.memory"),
    ({"limits": {"cpu": 10_000}}, "limits.cpu"),
    ({"limits": {"pids": 0}}, "limits.pids"),
    ({"limits": {"swap": -5}}, "limits.swap"),
    ({"limits": {"memory": "lots"}}, "limits.memory"),
    ({"image": "Not A Valid/Image"}, "Invalid image"),
    ({"image": ""}, "image"),
    ({"startup_command": "  "}, "startup_command"),
    ({"environment": {"1A": "x"}}, "environment"),
    ({"environment": {"A": "x\u0000"}}, "environment"),
    ({"start_pattern": "(unclosed"}, "Invalid start_pattern"),
    ({"restart_policy": {"mode": "sometimes"}}, "restart_policy.mode"),
    ({"restart_policy": {"mode": "always", "window_s": 0}}, "restart_policy.window_s"),
]


async def test_bad_values_are_refused_with_the_create_messages(
    api: httpx.AsyncClient, prefix: str
) -> None:
    internal_id = f"{prefix}-bad"
    body = await ready(api, internal_id)
    for n, (change, starts) in enumerate(BAD_VALUES):
        response = await patch(api, internal_id, **change)
        assert response.status_code == 400, (change, response.text)
        error = response.json()["error"]
        assert error.startswith(starts), (change, error)
        # The very message a create with the same value gets.
        created = await create(api, f"{prefix}-c{n}", **change)
        assert created.status_code == 400, (change, created.text)
        assert created.json()["error"] == error, change
    assert await get(api, internal_id) == body  # nothing changed
    not_json = await api.patch(
        f"/containers/{internal_id}", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert not_json.json()["error"] == "Invalid JSON body"


async def test_installing_is_a_conflict_and_unknown_is_404(
    api: httpx.AsyncClient, prefix: str
) -> None:
    internal_id = f"{prefix}-inst"
    response = await create(api, internal_id, install_script="sleep 60\n")
    assert response.status_code == 200
    for call in (
        patch(api, internal_id, environment={"A": "1"}),
        api.post(f"/containers/{internal_id}/resources", json={"cpu_shares": 100}),
    ):
        refused = await call
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "Cannot update container while it is installing"
    unknown = await patch(api, f"{prefix}-nobody", environment={})
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "Container not found"
    for route in ("resources",):
        assert (await api.get(f"/containers/{prefix}-nobody/{route}")).status_code == 404
        assert (await api.post(f"/containers/{prefix}-nobody/{route}", json={})).status_code == 404
    await api.delete(f"/containers/{internal_id}")


async def test_clearable_fields_and_restart_policy(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-clr"
    body = await ready(api, internal_id, stop_command="stop", start_pattern="Done")
    assert body["restart_policy"] == {"mode": "never", "max_restarts": 3, "window_s": 600.0}
    response = await patch(api, internal_id, restart_policy={"mode": "always"})
    assert response.json() == {"message": "Container updated", "applies": "now"}
    body = await get(api, internal_id)
    assert body["restart_policy"] == {"mode": "always", "max_restarts": 3, "window_s": 600.0}
    response = await patch(
        api, internal_id, restart_policy=None, stop_command=None, start_pattern=None
    )
    assert response.json()["applies"] == "next_start"  # the start pattern changed
    body = await get(api, internal_id)
    assert body["restart_policy"]["mode"] == "never"  # the node's default again
    assert body["stop_command"] is None
    assert body["start_pattern"] is None


async def test_resources_alias_applies_live_and_survives_a_recreate(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-res"
    before = await running_server(api, internal_id, limits={"memory": 64 * MiB})
    response = await api.post(
        f"/containers/{internal_id}/resources",
        json={
            "memory": 96 * MiB,
            "memory_swap": 192 * MiB,
            "cpu_quota": 50_000,
            "cpu_period": 100_000,
            "cpu_shares": 512,
            "cpuset_cpus": "0",
        },
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"message": "Container updated", "applies": "now"}
    config = await in_thread(lambda: host_config(engine, before["container_id"]))
    assert config["Memory"] == 96 * MiB
    assert config["MemorySwap"] == 192 * MiB
    assert config["NanoCpus"] == 500_000_000
    assert config["CpuShares"] == 512
    assert config["CpusetCpus"] == "0"
    expected = {
        "memory": 96 * MiB,
        "memory_swap": 192 * MiB,
        "cpu_shares": 512,
        "cpu_period": 100_000,
        "cpu_quota": 50_000,
        "cpuset_cpus": "0",
        "blkio_weight": None,
    }
    assert (await api.get(f"/containers/{internal_id}/resources")).json() == expected
    body = await get(api, internal_id)
    assert body["limits"] == {"memory": 96 * MiB, "cpu": 0.5, "pids": 512, "swap": 96 * MiB}
    assert body["container_id"] == before["container_id"]
    # A change that recreates the container keeps them.
    assert (await patch(api, internal_id, environment={"X": "1"})).json()["applies"] == "next_start"
    await api.post(f"/containers/{internal_id}/restart")

    async def recreated() -> bool:
        now = await get(api, internal_id)
        return now["state"] == "running" and now["container_id"] != before["container_id"]

    await wait_for(recreated, within=30, what="the restart onto a new Docker container")
    now = await get(api, internal_id)
    config = await in_thread(lambda: host_config(engine, now["container_id"]))
    assert config["CpuShares"] == 512
    assert config["CpusetCpus"] == "0"
    assert config["Memory"] == 96 * MiB
    assert (await api.get(f"/containers/{internal_id}/resources")).json() == expected


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"cpuset_cpus": "0-512"}, "cpuset_cpus: must name CPUs of this node (e.g. 0-1,3)"),
        ({"cpuset_cpus": "a"}, "cpuset_cpus: must name CPUs of this node (e.g. 0-1,3)"),
        ({"blkio_weight": 5}, "blkio_weight: must be 10 to 1000"),
        ({"cpu_period": 10}, "cpu_period: must be 1000 to 1000000 (microseconds)"),
        ({"cpu_shares": 1}, "cpu_shares: must be 2 to 262144"),
        ({"memory": 1024}, "memory: must be between 6291456 and 1099511627776 bytes"),
        ({"memory_swap": 32 * MiB}, "memory_swap: must be -1 (unlimited) or at least memory"),
        ({"cpu_period": 100_000}, "cpu_period: needs cpu_quota (no CPU limit is set)"),
        (
            {"cpu_quota": 1_000_000 * 64, "cpu_period": 1000},
            f"cpu_quota: cpu_quota / cpu_period must be 0.01 to {node_cpus()} (the node's CPUs)",
        ),
    ],
)
async def test_bad_resources_are_refused_before_anything_changes(
    api_node: tuple[httpx.AsyncClient, RunningAgent],
    engine: docker.DockerClient,
    prefix: str,
    body: dict[str, Any],
    error: str,
) -> None:
    api, _node = api_node
    internal_id = f"{prefix}-bres"
    before = await ready(api, internal_id, limits={"memory": 64 * MiB})
    resources = (await api.get(f"/containers/{internal_id}/resources")).json()
    response = await api.post(f"/containers/{internal_id}/resources", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert (await api.get(f"/containers/{internal_id}/resources")).json() == resources
    assert await get(api, internal_id) == before


async def test_a_setting_the_engine_discards_is_a_400_not_a_silent_failure(
    api_node: tuple[httpx.AsyncClient, RunningAgent], engine: docker.DockerClient, prefix: str
) -> None:
    """The engine drops a block I/O weight the kernel cannot apply with only a warning:
    the agent reads it back. On a kernel that has it, it is applied."""
    api, node = api_node
    internal_id = f"{prefix}-blk"
    before = await running_server(api, internal_id)
    response = await api.post(
        f"/containers/{internal_id}/resources", json={"blkio_weight": 300, "cpu_shares": 300}
    )
    config = await in_thread(lambda: host_config(engine, before["container_id"]))
    resources = (await api.get(f"/containers/{internal_id}/resources")).json()
    if response.status_code == 200:
        assert config["BlkioWeight"] == 300
        assert resources["blkio_weight"] == 300
    else:
        assert response.status_code == 400
        assert response.json()["error"] == (
            "blkio_weight: not supported on this node (the engine discarded it)"
        )
        # All or none: the record is what it was (the engine's cpu shares are the only
        # trace, and the next update or create sets them from the record).
        assert resources["blkio_weight"] is None
        assert resources["cpu_shares"] is None
        supervisor = node.agent.stash[CONTAINERS].get(internal_id)
        assert not supervisor.record.recreate_pending
