"""Usage metering (contract §22) on the real engine: samples from the one stats reader
(``lightd_stats_sample``) while nobody listens, usage equal to the containers' own
counters across a container restart and an agent restart, the routes and their 400s, and
hourly ``usage`` events through the outbox, once."""

from __future__ import annotations

import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd import StatsSample, hookimpl
from lightd.plugins.metering import EVENT_NAMESPACE, METERING, Metering
from lightd.plugins.metering.meter import HOUR, Usage

from ..conftest import Clock, RunningAgent, api_client, wait_for
from ..plugins.remote_sync_support import Panel, remote_config, until
from .conftest import StartNode, create, get, ready, wait_state

#: A server that keeps 100 kB in its volume and burns a fifth of a CPU.
BUSY = "head -c 100000 /dev/zero > data.bin; yes > /dev/null"
FAST = {
    "stats": {"idle_interval": 0.2},
    "metering": {"flush_interval": 0.2, "report_delay": 0, "disk_interval": 1},
}


class Recorder:
    """Every sample the stats readers hand to plugins, per server."""

    def __init__(self) -> None:
        self.samples: dict[str, list[tuple[str, float | None, StatsSample]]] = defaultdict(list)

    @hookimpl
    def lightd_stats_sample(
        self, internal_id: str, container_id: str, started_at: float | None, sample: StatsSample
    ) -> None:
        self.samples[internal_id].append((container_id, started_at, sample))

    def runs(self, internal_id: str) -> dict[float | None, StatsSample]:
        """The last sample of each run (by start time)."""
        last: dict[float | None, StatsSample] = {}
        for _cid, started, sample in self.samples[internal_id]:
            last[started] = sample
        return last


class Broken:
    @hookimpl
    def lightd_stats_sample(self) -> None:
        raise RuntimeError("broken on purpose")


def metering(node: RunningAgent) -> Metering:
    return node.agent.stash[METERING]


async def metered(node: RunningAgent, internal_id: str) -> Usage:
    total = Usage()
    for usage in (await metering(node).usage(internal_id, 0, 2**40)).values():
        total.add(usage)
    return total


async def samples_of(recorder: Recorder, internal_id: str, n: int, **where: Any) -> None:
    async def enough() -> bool:
        return len(recorder.samples[internal_id]) >= n

    await wait_for(enough, within=20, what=f"{n} samples of {internal_id}")


async def busy_server(api: httpx.AsyncClient, internal_id: str) -> None:
    await ready(api, internal_id, startup_command=BUSY, limits={"cpu": 0.2})
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")


async def test_hook_lightd_stats_sample(start_node: StartNode, prefix: str) -> None:
    recorder = Recorder()
    node = await start_node(FAST, extra=(("recorder", recorder), ("broken", Broken())))
    async with api_client(node.url) as api:
        await busy_server(api, f"{prefix}a")
        # Nobody follows its stats: the reader samples every idle_interval all the same,
        # and the broken plugin (called first) stops neither the reader nor the others.
        await samples_of(recorder, f"{prefix}a", 4)
        seen = recorder.samples[f"{prefix}a"]
        view = await get(api, f"{prefix}a")
        assert {cid for cid, _, _ in seen} == {view["container_id"]}
        assert all(started is not None for _, started, _ in seen)
        cpu = [s.cpu_ns for _, _, s in seen]
        assert cpu == sorted(cpu) and cpu[-1] > cpu[0]


async def test_usage_equals_the_containers_own_counters(start_node: StartNode, prefix: str) -> None:
    recorder = Recorder()
    node = await start_node(FAST, extra=(("recorder", recorder),))
    server = f"{prefix}u"
    async with api_client(node.url) as api:
        await busy_server(api, server)
        await samples_of(recorder, server, 6)
        response = await api.get(f"/containers/{server}/usage")
        last = recorder.samples[server][-1][2]
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"internal_id", "from", "to", "buckets", "total"}
        assert body["internal_id"] == server and body["from"] % HOUR == 0
        total = body["total"]
        assert set(total) == {"memory_gb_hours", "cpu_vcpu_hours", "disk_gb_hours", "egress_gb"}
        assert total["memory_gb_hours"] > 0
        # Every CPU nanosecond of the run so far is metered, once (cgroup counter).
        usage = await metered(node, server)
        assert usage.cpu_ns == pytest.approx(recorder.samples[server][-1][2].cpu_ns, rel=1e-9)
        assert total["cpu_vcpu_hours"] == pytest.approx(last.cpu_ns / 1e9 / HOUR, abs=2e-4)
        assert all(b["start"] % HOUR == 0 for b in body["buckets"])
        daily = (await api.get(f"/containers/{server}/usage", params={"step": "day"})).json()
        assert daily["from"] % 86400 == 0 and len(daily["buckets"]) in (1, 2)

        # The volume's disk figure is measured for metering and integrated too.
        async def disk_metered() -> bool:
            return (await metered(node, server)).disk > 0

        await wait_for(disk_metered, within=20, what="disk usage metered")
        billing = await api.get(f"/billing/usage/{server}/hourly")
        assert billing.status_code == 200, billing.text
        bill = billing.json()
        assert list(bill) == [
            "internal_id",
            "memory_gb",
            "cpu_vcpus",
            "storage_gb",
            "egress_gb",
            "duration_hours",
            "estimated_cost",
        ]
        assert bill["duration_hours"] == 1.0 and bill["estimated_cost"] > 0
        assert (await api.get(f"/billing/usage/{server}/monthly")).json()["duration_hours"] == 720
        assert server in (await api.get("/billing/containers")).json()


async def test_a_container_restart_neither_loses_nor_double_counts(
    start_node: StartNode, prefix: str
) -> None:
    recorder = Recorder()
    node = await start_node(FAST, extra=(("recorder", recorder),))
    server = f"{prefix}r"
    async with api_client(node.url) as api:
        await busy_server(api, server)
        await samples_of(recorder, server, 4)
        first = (await get(api, server))["started_at"]
        assert (await api.post(f"/containers/{server}/restart")).status_code == 200

        async def second_run() -> bool:
            return len(recorder.runs(server)) >= 2 and len(recorder.samples[server]) > 8

        await wait_for(second_run, within=30, what="samples of the second run")
        assert (await get(api, server))["started_at"] != first
        usage = await metered(node, server)
        runs = recorder.runs(server)
        # Each run's counters count from 0: the metered CPU is the sum of each run's
        # last counter: nothing of the first run is lost, nothing counted twice.
        assert usage.cpu_ns == pytest.approx(sum(s.cpu_ns for s in runs.values()), rel=1e-9)
        assert usage.egress == pytest.approx(sum(s.network_tx for s in runs.values()), rel=1e-9)


async def test_metering_survives_an_agent_restart(
    start_node: StartNode, containers_config: Any, prefix: str
) -> None:
    path: Path = containers_config(FAST)
    first_recorder = Recorder()
    server = f"{prefix}s"
    node = await start_node(path=path, extra=(("recorder", first_recorder),))
    began = trio.current_time()
    async with api_client(node.url) as api:
        await busy_server(api, server)
        await samples_of(first_recorder, server, 4)
    await node.stop()  # a graceful stop stores what is pending; the server runs on
    stopped = trio.current_time()
    before = first_recorder.samples[server][-1][2].cpu_ns

    second_recorder = Recorder()
    node = await start_node(path=path, extra=(("recorder", second_recorder),))
    downtime = trio.current_time() - stopped
    await samples_of(second_recorder, server, 3)
    usage = await metered(node, server)
    now = second_recorder.samples[server][-1][2].cpu_ns
    assert now > before
    # The CPU the server used while the agent was away is counted, and only once.
    assert usage.cpu_ns == pytest.approx(now, rel=1e-9)
    # Gauges (memory) are not integrated over the agent's downtime.
    assert usage.seconds <= trio.current_time() - began - downtime + 1
    async with api_client(node.url) as api:
        assert (await api.post(f"/containers/{server}/kill")).status_code == 200


@pytest.fixture
async def panel(nursery: trio.Nursery) -> Any:
    panel = Panel(nursery)
    await panel.up()
    yield panel
    panel.close()


async def test_closed_hours_go_to_the_panel_once(
    start_node: StartNode,
    containers_config: Any,
    panel: Panel,
    clock: Clock,
    prefix: str,
) -> None:
    overrides = {**remote_config(panel.url), **FAST}
    overrides["metering"] = {**FAST["metering"], "report": True}
    path: Path = containers_config(overrides)
    recorder = Recorder()
    server = f"{prefix}p"
    node = await start_node(path=path, extra=(("recorder", recorder),))
    async with api_client(node.url) as api:
        await busy_server(api, server)
        await samples_of(recorder, server, 3)
        hour = int(clock()) // HOUR * HOUR
        clock.advance(HOUR)  # the hour closes

        def usage_events() -> list[dict[str, Any]]:
            return [b for b in panel.bodies(server) if b.get("event") == "usage"]

        await until(lambda: any(e["start"] == hour for e in usage_events()), within=20)
        event = next(e for e in usage_events() if e["start"] == hour)
        assert event["event_id"] == str(uuid.uuid5(EVENT_NAMESPACE, f"{server}:{hour}"))
        assert set(event) == {
            "event",
            "server",
            "start",
            "memory_gb_hours",
            "cpu_vcpu_hours",
            "disk_gb_hours",
            "egress_gb",
            "event_id",
            "timestamp",
        }
        assert event["cpu_vcpu_hours"] > 0
        await node.stop()
    node = await start_node(path=path, extra=(("recorder", recorder),))
    rounds = metering(node).rounds
    await until(lambda: metering(node).rounds >= rounds + 5, within=20)
    assert [e["start"] for e in usage_events()].count(hour) == 1
    assert panel.state.duplicates == 0
    async with api_client(node.url) as api:
        assert (await api.post(f"/containers/{server}/kill")).status_code == 200


async def test_billing_routes_and_their_errors(api: httpx.AsyncClient, prefix: str) -> None:
    rates = (await api.get("/billing/rates")).json()
    assert rates == {
        "memory_per_gb_hour": 0.01,
        "cpu_per_vcpu_hour": 0.02,
        "storage_per_gb_hour": 0.0001,
        "egress_per_gb": 0.05,
    }
    body = {"memory_gb": 4, "cpu_vcpus": 2, "storage_gb": 20, "egress_gb_per_month": 100}
    answer = (await api.post("/billing/estimate", json=body)).json()
    assert list(answer) == ["hourly", "daily", "monthly", "breakdown"]
    assert list(answer["breakdown"]) == ["memory", "cpu", "storage", "egress"]
    assert answer["breakdown"]["egress"]["monthly"] == pytest.approx(5.0)
    volume = (await api.post("/billing/estimate/volume", json={"size_gb": 20})).json()
    assert volume["hourly"] == pytest.approx(20 * 0.0001)
    for bad, message in (
        ({**body, "memory_gb": -1}, "memory_gb: must be a number >= 0"),
        ({**body, "cpu_vcpus": "2"}, "cpu_vcpus: must be a number"),
        ({k: v for k, v in body.items() if k != "storage_gb"}, "storage_gb"),
    ):
        response = await api.post("/billing/estimate", json=bad)
        assert response.status_code == 400
        assert response.json()["error"].startswith(message)
    unknown = f"{prefix}none"
    response = await api.get(f"/containers/{unknown}/usage")
    assert response.status_code == 404
    assert response.json()["error"] == "Container not found"
    response = await api.get(f"/billing/usage/{unknown}/daily")
    assert response.status_code == 404
    assert response.json()["error"] == "No usage data for container"
    await create(api, f"{prefix}q")
    for params, message in (
        ({"step": "week"}, "step: must be hour or day"),
        ({"from": "yesterday"}, "from: must be a unix time in seconds"),
        ({"to": "-5"}, "to: must be a unix time in seconds"),
        ({"from": "200", "to": "100"}, "from: must not be after to"),
    ):
        response = await api.get(f"/containers/{prefix}q/usage", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"] == message
    # A known server never run: 200 with nothing metered.
    empty = (await api.get(f"/containers/{prefix}q/usage")).json()
    assert empty["buckets"] == [] and empty["total"]["cpu_vcpu_hours"] == 0
    # Least privilege: a read-only token reads usage and asks for estimates.
    token = (await api.post("/auth/tokens", json={"ttl": "5m", "permissions": ["read"]})).json()[
        "token"
    ]
    async with api_client(str(api.base_url), token=token) as reader:
        assert (await reader.get(f"/containers/{prefix}q/usage")).status_code == 200
        assert (await reader.get("/billing/rates")).status_code == 200
        assert (await reader.post("/billing/estimate", json=body)).status_code == 200
    token = (await api.post("/auth/tokens", json={"ttl": "5m", "permissions": ["console"]})).json()[
        "token"
    ]
    async with api_client(str(api.base_url), token=token) as console:
        assert (await console.get(f"/containers/{prefix}q/usage")).status_code == 403


async def test_old_hours_are_purged(node: RunningAgent, clock: Clock) -> None:
    meter = metering(node)
    now = clock()
    current = int(now) // HOUR * HOUR
    old = current - 36 * 86400
    await meter.db.flush(
        meter.meter.generation,
        {("old", old): Usage(cpu_ns=1.0), ("new", current): Usage(cpu_ns=1.0)},
        {},
    )
    await meter.purge(now)
    assert (await meter.db.hours("old", 0, 2**40))[0] == []
    assert len((await meter.db.hours("new", 0, 2**40))[0]) == 1
