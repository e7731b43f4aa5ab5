"""Remote sync (contract §9): pure parts first (URL joining, bodies, status classes,
back-off, the heartbeat schedule under trio's mock clock, the outbox on a real SQLite
file), then a running agent reporting to the mock panel over loopback HTTP."""

from __future__ import annotations

import itertools
import json
import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from lightd.plugins.remote_sync.outbox import MIGRATIONS, Outbox
from lightd.plugins.remote_sync.sync import (
    BACKOFF_CAP,
    REMOTE_SYNC,
    Backoff,
    Outcome,
    RemoteSync,
    Wakeup,
    classify_status,
    join_url,
    run_periodically,
    update_body,
)
from lightd.runtime import Agent
from lightd.store import open_store

from ..conftest import MASTER, RunningAgent, StartAgent, api_client, wait_for
from .remote_sync_support import (
    NODE,
    PANEL_TOKEN,
    Panel,
    remote_config,
    transitions,
    until,
    write_remote,
)

# --- pure parts --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "path", "joined"),
    [
        ("https://panel.example/api", "update", "https://panel.example/api/update"),
        ("https://panel.example/api/", "update", "https://panel.example/api/update"),
        ("https://panel.example/api//", "/health", "https://panel.example/api/health"),
        ("http://127.0.0.1:8080", "/update", "http://127.0.0.1:8080/update"),
        ("http://127.0.0.1:8080/", "health", "http://127.0.0.1:8080/health"),
    ],
)
def test_join_url_never_doubles_the_slash(base: str, path: str, joined: str) -> None:
    assert join_url(base, path) == joined


def test_update_body_status_shape() -> None:
    body = update_body("srv-1", "ready", None, event_id="e-1", timestamp=1700000000)
    assert body == {
        "event": "update",
        "server": "srv-1",
        "status": "ready",
        "event_id": "e-1",
        "timestamp": 1700000000,
    }


def test_update_body_error_shape() -> None:
    body = update_body("srv-1", "failed", "Pull failed", event_id="e-2", timestamp=5)
    assert body == {
        "event": "update",
        "server": "srv-1",
        "error": "failed",
        "data": "Pull failed",
        "event_id": "e-2",
        "timestamp": 5,
    }
    assert "status" not in body


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.DELIVERED),
        (201, Outcome.DELIVERED),
        (204, Outcome.DELIVERED),
        (400, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (409, Outcome.REJECTED),
        (413, Outcome.REJECTED),
        (422, Outcome.REJECTED),
        (401, Outcome.REJECTED),
        (403, Outcome.REJECTED),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (302, Outcome.RETRY),
    ],
)
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_backoff_doubles_up_to_the_cap() -> None:
    top = Backoff(random=lambda: 1.0)  # the top of each jitter range
    assert [top.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    bottom = Backoff(random=lambda: 0.0)  # the bottom: half of it
    assert [bottom.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert BACKOFF_CAP == 60.0


def test_backoff_jitter_stays_in_range_and_reset_starts_over() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0 < d <= 60.0 for d in delays)
    assert all(30.0 <= d <= 60.0 for d in delays[10:])
    assert len(set(delays[10:])) > 100  # jittered, not in lockstep
    backoff.reset()
    assert 0.5 <= backoff.next_delay() <= 1.0


async def test_heartbeat_schedule_is_fixed_rate(autojump_clock: trio.abc.Clock) -> None:
    calls: list[float] = []
    start = trio.current_time()

    async def probe() -> None:
        calls.append(trio.current_time() - start)
        await trio.sleep(12)  # a slow answer does not push the schedule back

    with trio.move_on_after(95):
        await run_periodically(probe, lambda: 30.0, Wakeup())
    assert calls == [0, 30, 60, 90]


async def test_heartbeat_schedule_skips_missed_ticks(autojump_clock: trio.abc.Clock) -> None:
    calls: list[float] = []
    start = trio.current_time()

    async def probe() -> None:
        calls.append(trio.current_time() - start)
        if len(calls) == 1:
            await trio.sleep(70)  # longer than two periods: ticks 30 and 60 are skipped

    with trio.move_on_after(125):
        await run_periodically(probe, lambda: 30.0, Wakeup())
    assert calls == [0, 90, 120]


async def test_heartbeat_wake_probes_at_once_and_restarts_the_schedule(
    autojump_clock: trio.abc.Clock,
) -> None:
    calls: list[float] = []
    wake = Wakeup()
    interval = [30.0]
    start = trio.current_time()

    async def probe() -> None:
        calls.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_periodically, probe, lambda: interval[0], wake)
        await trio.sleep(40)
        interval[0] = 10.0  # a reload changed heartbeat_interval
        wake.set()
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert calls == [0, 30, 40, 50, 60]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with open_store(tmp_path, MIGRATIONS) as store:
        yield Outbox(store)


def _rows(n: int, start: int = 0, server: str = "srv") -> list[tuple[str, str, str, int]]:
    return [(server, f"e{i}", json.dumps({"n": i}), i) for i in range(start, start + n)]


async def test_outbox_keeps_order_and_deletes_in_ranges(outbox: Outbox) -> None:
    await outbox.put_many(_rows(5), limit=100)
    first = await outbox.fetch(0, 3)
    assert [u.event_id for u in first] == ["e0", "e1", "e2"]
    rest = await outbox.fetch(first[-1].seq, 10)
    assert [u.event_id for u in rest] == ["e3", "e4"]
    assert await outbox.count() == 5
    assert await outbox.count(first[-1].seq) == 2
    assert await outbox.delete_upto(first[-1].seq) == 3
    assert [u.event_id for u in await outbox.fetch(0, 10)] == ["e3", "e4"]


async def test_outbox_seq_is_never_reused(outbox: Outbox) -> None:
    result = await outbox.put_many(_rows(3), limit=100)
    await outbox.delete_upto(result.seq)
    again = await outbox.put("srv", "later", "{}", 0, limit=100)
    assert again.seq == result.seq + 1  # AUTOINCREMENT: a late row sorts after every old one


async def test_outbox_drops_the_oldest_beyond_its_bound(outbox: Outbox) -> None:
    result = await outbox.put_many(_rows(8), limit=5)
    assert result.dropped == 3
    assert [u.event_id for u in await outbox.fetch(0, 10)] == ["e3", "e4", "e5", "e6", "e7"]
    one_more = await outbox.put("srv", "e8", "{}", 8, limit=5)
    assert one_more.dropped == 1
    assert [u.event_id for u in await outbox.fetch(0, 10)] == ["e4", "e5", "e6", "e7", "e8"]


async def test_outbox_delivered_rows_make_room_without_counting_as_dropped(
    outbox: Outbox,
) -> None:
    await outbox.put_many(_rows(5), limit=5)
    delivered = (await outbox.fetch(0, 2))[-1].seq  # e0, e1 went out, not yet deleted
    result = await outbox.put_many(_rows(2, start=5), limit=5, delivered_upto=delivered)
    assert result.dropped == 0
    assert [u.event_id for u in await outbox.fetch(0, 10)] == ["e2", "e3", "e4", "e5", "e6"]


async def test_outbox_survives_reopening(tmp_path: Path) -> None:
    async with open_store(tmp_path, MIGRATIONS) as store:
        await Outbox(store).put_many(_rows(3), limit=10)
    async with open_store(tmp_path, MIGRATIONS) as store:
        assert [u.event_id for u in await Outbox(store).fetch(0, 10)] == ["e0", "e1", "e2"]


# --- a running agent and the mock panel ---------------------------------------------------


@pytest.fixture
async def panel(nursery: trio.Nursery) -> AsyncIterator[Panel]:
    """The mock panel, up, on its own loopback port."""
    panel = Panel(nursery)
    await panel.up()
    yield panel
    panel.close()


@pytest.fixture
async def down_panel(nursery: trio.Nursery) -> AsyncIterator[Panel]:
    """The mock panel's port, refusing connections until the test calls ``up()``."""
    panel = Panel(nursery)
    yield panel
    panel.close()


StartNode = Callable[..., Any]


@pytest.fixture
def start_node(start_agent: StartAgent, make_config: Callable[..., Path]) -> StartNode:
    """Start an agent reporting to a panel; back-off shortened so outages take ms, not s."""

    async def start(panel: Panel, *, fast_backoff: bool = True, **remote: Any) -> RunningAgent:
        node = await start_agent(make_config(remote_config(panel.url, **remote)))
        if fast_backoff:
            sync(node.agent).backoff = Backoff(base=0.05, cap=0.4)
        return node

    return start


def sync(agent: Agent) -> RemoteSync:
    return agent.stash[REMOTE_SYNC]


async def remote_status(node: RunningAgent) -> dict[str, Any]:
    async with api_client(node.url) as client:
        response = await client.get("/remote/status")
    assert response.status_code == 200, response.text
    return response.json()


async def drained(node: RunningAgent) -> None:
    async def empty() -> bool:
        return (await remote_status(node))["pending_updates"] == 0

    await wait_for(empty, what="the outbox to drain")


async def test_normal_install_reports_installing_then_ready(
    panel: Panel, start_node: StartNode, clock: Callable[[], float]
) -> None:
    node = await start_node(panel)
    await transitions(node.agent, ("srv-1", "installing"), ("srv-1", "ready"))
    await until(lambda: len(panel.state.received) == 2, what="two updates")
    bodies = panel.bodies()
    assert [b["status"] for b in bodies] == ["installing", "ready"]
    for body in bodies:
        assert list(body) == ["event", "server", "status", "event_id", "timestamp"]
        assert body["event"] == "update" and body["server"] == "srv-1"
        assert uuid.UUID(body["event_id"]).version == 4
        assert isinstance(body["timestamp"], int) and abs(body["timestamp"] - clock()) < 5
    assert bodies[0]["event_id"] != bodies[1]["event_id"]
    assert panel.state.received[0]["node"] == NODE  # the panel took our Bearer token
    assert panel.state.nodes[NODE].user_agent.startswith("lightd/")
    await drained(node)


async def test_failed_install_reports_the_error_shape(panel: Panel, start_node: StartNode) -> None:
    node = await start_node(panel)
    await transitions(
        node.agent,
        ("srv-2", "installing"),
        ("srv-2", "failed", "Install script failed with exit code 3"),
    )
    await until(lambda: len(panel.state.received) == 2)
    failed = panel.bodies()[1]
    assert {k: failed[k] for k in ("event", "server", "error", "data")} == {
        "event": "update",
        "server": "srv-2",
        "error": "failed",
        "data": "Install script failed with exit code 3",
    }
    assert "status" not in failed
    assert panel.state.nodes[NODE].containers["srv-2"].status == "failed"


async def test_runtime_states_are_reported_only_with_report_power_state(
    panel: Panel, start_node: StartNode
) -> None:
    quiet = await start_node(panel)
    await transitions(
        quiet.agent,
        ("srv-3", "installing"),
        ("srv-3", "ready"),
        *[("srv-3", s) for s in ("starting", "running", "stopping", "offline")],
        ("srv-3", "installing"),  # a reinstall: delivered after anything queued before it
    )
    await until(lambda: len(panel.statuses("srv-3")) == 3)
    assert panel.statuses("srv-3") == ["installing", "ready", "installing"]

    loud = await start_node(panel, report_power_state=True)
    states = ("installing", "ready", "starting", "running", "stopping", "offline")
    await transitions(loud.agent, *[("srv-4", s) for s in states])
    await until(lambda: len(panel.statuses("srv-4")) == 6)
    assert panel.statuses("srv-4") == list(states)


async def test_a_repeated_state_is_reported_once(panel: Panel, start_node: StartNode) -> None:
    # The original daemon sent installing, installing, ready, installing (its bug 16).
    node = await start_node(panel)
    await transitions(
        node.agent,
        ("srv-5", "installing"),
        ("srv-5", "installing"),
        ("srv-5", "ready"),
        ("srv-5", "ready"),
        ("srv-6", "installing"),
    )
    await until(lambda: len(panel.state.received) == 3)
    assert panel.statuses("srv-5") == ["installing", "ready"]


async def test_update_is_committed_before_the_hook_returns(
    down_panel: Panel, start_node: StartNode
) -> None:
    node = await start_node(down_panel)
    agent = node.agent
    await transitions(agent, ("srv-7", "installing"))
    # No checkpoint between the hook and this read: the row is in the SQLite file itself.
    conn = sqlite3.connect(agent.store.path)
    try:
        rows = conn.execute("SELECT server, body FROM remote_sync_outbox").fetchall()
    finally:
        conn.close()
    assert [(server, json.loads(body)["status"]) for server, body in rows] == [
        ("srv-7", "installing")
    ]


async def test_a_slow_panel_never_delays_the_hook_or_the_api(
    panel: Panel, start_node: StartNode
) -> None:
    panel.state.delay = 3.0
    node = await start_node(panel, timeout=10.0)
    for state in ("installing", "ready", "starting"):
        with trio.fail_after(1.5):  # well under the panel's 3 s
            await transitions(node.agent, ("srv-8", state))
    await until(lambda: panel.state.update_requests >= 1)  # the sender is stuck in a POST
    async with api_client(node.url) as client:
        with trio.fail_after(1.5):
            status = (await client.get("/remote/status")).json()
            assert (await client.get("/api/v1/public/ping")).status_code == 200
    assert status["pending_updates"] >= 1
    panel.state.delay = 0
    await until(lambda: len(panel.state.received) == 2, within=15)


SERVERS = [f"srv-{i}" for i in range(5)]
LIFE = [
    ("installing",),
    ("ready",),
    ("starting",),
    ("running",),
    ("stopping",),
    ("offline",),
    ("installing",),
    ("failed", "Install script failed with exit code 1"),
    ("installing",),
    ("ready",),
]


async def test_panel_down_then_failing_then_back_loses_nothing(
    down_panel: Panel, start_node: StartNode
) -> None:
    """50 transitions while the panel refuses connections, then answers 503, then
    recovers: each is delivered once (after de-duplication), in order per server."""
    panel = down_panel
    node = await start_node(panel, report_power_state=True, heartbeat_interval=0.2)
    agent = node.agent
    steps = [(server, *LIFE[i]) for i in range(len(LIFE)) for server in SERVERS]
    assert len(steps) == 50
    for step in steps[:25]:  # connection refused
        with trio.fail_after(1.5):
            await transitions(agent, step)
    await until(lambda: sync(agent).backoff.failures >= 2, what="retries while refused")
    assert sync(agent).status.healthy is False
    assert "cannot connect" in (sync(agent).status.last_error or "")

    panel.state.fail_status = 503
    await panel.up()
    for step in steps[25:]:  # 503
        with trio.fail_after(1.5):
            await transitions(agent, step)
    await until(lambda: panel.state.update_requests >= 3, what="retries answered 503")
    assert panel.state.received == []
    assert (await remote_status(node))["pending_updates"] == 50

    panel.state.fail_status = None
    await until(lambda: len(panel.state.received) == 50, within=15, what="all 50 delivered")
    ids = [b["event_id"] for b in panel.bodies()]
    assert len(set(ids)) == 50
    for server in SERVERS:
        assert panel.statuses(server) == [life[0] for life in LIFE]
    await drained(node)
    status = await remote_status(node)
    assert status["healthy"] is True
    assert status["delivered"] == 50


async def test_retries_follow_a_growing_capped_backoff(panel: Panel, start_node: StartNode) -> None:
    node = await start_node(panel, fast_backoff=False)
    sync(node.agent).backoff = Backoff(base=0.2, cap=0.8, random=lambda: 1.0)
    panel.state.fail_status = 503
    await transitions(node.agent, ("srv-9", "installing"))
    await until(lambda: panel.state.update_requests >= 6, what="six attempts")
    panel.state.fail_status = None
    await until(lambda: panel.statuses("srv-9") == ["installing"])
    times = [t for t, path, _ in panel.state.recent_requests if path.endswith("/update")]
    gaps = [b - a for a, b in itertools.pairwise(times)][:5]
    # Delays 0.2, 0.4, 0.8, 0.8, 0.8 (jitter pinned to the top of its range), as the panel
    # saw them arrive.
    assert 0.18 <= gaps[0] < 0.5 and gaps[0] < gaps[2] and gaps[1] < gaps[2], gaps
    assert all(0.75 <= g <= 1.4 for g in gaps[2:]), gaps


@pytest.mark.parametrize("code", [408, 429, 500, 502])
async def test_transient_answers_are_retried_until_delivered(
    panel: Panel, start_node: StartNode, code: int
) -> None:
    panel.state.fail_status = code
    node = await start_node(panel)
    await transitions(node.agent, ("srv-10", "installing"))
    await until(lambda: panel.state.update_requests >= 3, what=f"retries after {code}")
    panel.state.fail_status = None
    await until(lambda: panel.statuses("srv-10") == ["installing"])
    await drained(node)


async def test_a_4xx_answer_is_logged_and_not_retried(
    panel: Panel, start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node(panel)
    panel.state.fail_status = 422
    with caplog.at_level(logging.ERROR, logger="lightd.plugins.remote_sync"):
        await transitions(node.agent, ("srv-11", "installing"), ("srv-11", "ready"))
        await until(lambda: panel.state.update_requests == 2)
        await drained(node)
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 2 and "HTTP 422" in rejected[0]
    panel.state.fail_status = None
    await transitions(node.agent, ("srv-11", "starting"), ("srv-11", "offline"))
    await transitions(node.agent, ("srv-11", "installing"))
    await until(lambda: panel.statuses("srv-11") == ["installing"])
    # Delivered in order, so anything still being retried would have gone out before it.
    assert panel.state.update_requests == 3
    status = await remote_status(node)
    assert status["rejected"] == 2 and status["delivered"] == 1
    assert "HTTP 422" in status["last_error"]


async def test_a_timed_out_update_is_retried_and_deduplicated(
    panel: Panel, start_node: StartNode
) -> None:
    panel.state.delay = 1.0  # the mock records an update, then answers late
    node = await start_node(panel, timeout=0.3)
    await transitions(node.agent, ("srv-12", "installing"))
    await until(lambda: panel.state.update_requests >= 2, what="a retry after the timeout")
    assert "no answer within 0.3s" in (sync(node.agent).status.last_error or "")
    panel.state.delay = 0
    await drained(node)
    assert panel.statuses("srv-12") == ["installing"]
    assert panel.state.duplicates >= 1


async def test_reload_switches_the_url_without_losing_queued_updates(
    down_panel: Panel,
    nursery: trio.Nursery,
    start_agent: StartAgent,
    make_config: Callable[..., Path],
) -> None:
    old = down_panel
    new = Panel(nursery, prefix="/api")
    await new.up()
    path = make_config(remote_config(old.url))
    node = await start_agent(path)
    sync(node.agent).backoff = Backoff(base=0.05, cap=0.4)
    await transitions(node.agent, ("srv-13", "installing"), ("srv-13", "ready"))
    await until(lambda: sync(node.agent).backoff.failures >= 1)
    assert (await remote_status(node))["pending_updates"] == 2

    write_remote(path, url=new.url + "/")  # a trailing slash: still no // in the path
    async with api_client(node.url) as client:
        assert (await client.post("/remote/config/reload")).status_code == 200
    await transitions(node.agent, ("srv-13", "starting"), ("srv-14", "installing"))
    await until(lambda: len(new.state.received) == 3)
    assert new.statuses("srv-13") == ["installing", "ready"]
    assert new.statuses("srv-14") == ["installing"]
    assert (await remote_status(node))["url"] == new.url + "/"
    new.close()


async def test_a_refused_token_drops_updates_and_a_reload_fixes_it(
    panel: Panel,
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    wrong = "lightd_" + "0badc0de" * 4
    path = make_config(remote_config(panel.url, token=wrong))
    with caplog.at_level(logging.DEBUG):
        node = await start_agent(path)
        sync(node.agent).backoff = Backoff(base=0.05, cap=0.4)
        await transitions(node.agent, ("srv-15", "installing"))
        await until(lambda: panel.state.update_requests >= 1, what="the 401")
        await drained(node)  # dropped, as the contract says of 4xx: not retried forever
        assert panel.state.update_requests == 1
        assert panel.state.received == []
        write_remote(path, token=PANEL_TOKEN)
        async with api_client(node.url) as client:
            assert (await client.post("/remote/config/reload")).status_code == 200
        await transitions(node.agent, ("srv-15", "ready"))
        await until(lambda: panel.statuses("srv-15") == ["ready"])
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "HTTP 401" in messages
    assert wrong not in messages and PANEL_TOKEN not in messages
    assert wrong not in json.dumps(await remote_status(node))


async def test_reload_disables_and_enables_without_losing_queued_updates(
    down_panel: Panel, start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    panel = down_panel
    path = make_config(remote_config(panel.url))
    node = await start_agent(path)
    agent = node.agent
    await transitions(agent, ("srv-16", "installing"))

    async def reload() -> None:
        async with api_client(node.url) as client:
            assert (await client.post("/remote/config/reload")).status_code == 200

    write_remote(path, enabled=False)
    await reload()
    await transitions(agent, ("srv-16", "ready"))  # disabled: not recorded
    await panel.up()
    with trio.move_on_after(0.5):  # nothing may be sent while disabled
        await until(lambda: panel.state.update_requests > 0)
    assert panel.state.update_requests == 0 and panel.state.health_requests == 0
    status = await remote_status(node)
    assert status["enabled"] is False and status["pending_updates"] == 1

    write_remote(path, enabled=True)
    await reload()
    await transitions(agent, ("srv-16", "starting"), ("srv-16", "installing"))
    await until(lambda: len(panel.state.received) == 2)
    assert panel.statuses("srv-16") == ["installing", "installing"]


async def test_nothing_is_recorded_while_disabled(
    panel: Panel, start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config(remote_config(panel.url, enabled=False)))
    await transitions(node.agent, ("srv-17", "installing"))
    status = await remote_status(node)
    assert status["enabled"] is False and status["pending_updates"] == 0
    assert status["healthy"] is False and status["last_ok"] is None


async def test_the_outbox_is_bounded(
    down_panel: Panel, start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node(down_panel, outbox_max=5, report_power_state=True)
    states = ["installing", "ready", "starting", "running", "stopping", "offline", "starting"]
    with caplog.at_level(logging.ERROR, logger="lightd.plugins.remote_sync"):
        await transitions(node.agent, *[("srv-18", s) for s in states], ("srv-19", "installing"))
    dropped = [r for r in caplog.records if "outbox full" in r.getMessage()]
    assert len(dropped) == 3 and all(r.levelno == logging.ERROR for r in dropped)
    status = await remote_status(node)
    assert status["pending_updates"] == 5 and status["dropped"] == 3
    await down_panel.up()
    await until(lambda: len(down_panel.state.received) == 5)
    assert down_panel.statuses("srv-18") == ["running", "stopping", "offline", "starting"]


async def test_heartbeat_at_start_and_every_interval(panel: Panel, start_node: StartNode) -> None:
    started = trio.current_time()
    node = await start_node(panel, heartbeat_interval=0.3)
    await until(lambda: panel.state.health_requests >= 1, within=2, what="the first heartbeat")
    assert trio.current_time() - started < 2
    await until(lambda: panel.state.health_requests >= 5, within=5)
    times = [t for t, path, _ in panel.state.recent_requests if path.endswith("/health")]
    # Every 0.3 s as the panel saw them arrive; the first one is left out, its connection
    # set-up (slow on a loaded machine) delays its arrival, not the schedule.
    gaps = [b - a for a, b in itertools.pairwise(times[1:5])]
    assert all(0.1 <= g <= 0.6 for g in gaps) and 0.25 <= sum(gaps) / 3 <= 0.45, gaps
    status = await remote_status(node)
    assert status["healthy"] is True and status["last_heartbeat"] is not None

    panel.state.fail_status = 503
    await until(lambda: sync(node.agent).status.healthy is False, within=3)
    assert sync(node.agent).status.last_error == "health check answered HTTP 503"
    panel.state.fail_status = None
    await until(lambda: sync(node.agent).status.healthy is True, within=3)


async def test_a_healthy_heartbeat_cuts_a_long_backoff_short(
    down_panel: Panel, start_node: StartNode
) -> None:
    node = await start_node(down_panel, fast_backoff=False, heartbeat_interval=0.2)
    sync(node.agent).backoff = Backoff(base=30.0, cap=60.0)  # would wait 15-30 s
    await transitions(node.agent, ("srv-20", "installing"))
    await until(lambda: sync(node.agent).status.retry_at is not None)
    await down_panel.up()
    await until(lambda: down_panel.statuses("srv-20") == ["installing"], within=3)


async def test_remote_status_needs_auth_and_shows_no_token(
    panel: Panel, start_node: StartNode
) -> None:
    node = await start_node(panel)
    await until(lambda: sync(node.agent).status.healthy)
    async with api_client(node.url, token=None) as anon:
        assert (await anon.get("/remote/status")).status_code == 401
    status = await remote_status(node)
    assert {"healthy", "last_ok", "last_error", "pending_updates"} <= set(status)
    assert status["healthy"] is True and isinstance(status["last_ok"], int)
    assert status["pending_updates"] == 0
    assert PANEL_TOKEN not in json.dumps(status) and MASTER not in json.dumps(status)


async def test_undelivered_updates_survive_a_graceful_restart(
    down_panel: Panel, start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    path = make_config(remote_config(down_panel.url))
    first = await start_agent(path)
    await transitions(first.agent, ("srv-21", "installing"), ("srv-21", "ready"))
    await first.stop()
    await down_panel.up()
    second = await start_agent(path)
    await until(lambda: down_panel.statuses("srv-21") == ["installing", "ready"])
    await drained(second)


async def test_reload_applies_heartbeat_interval_and_report_power_state_live(
    panel: Panel, start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    path = make_config(remote_config(panel.url))
    node = await start_agent(path)
    await until(lambda: panel.state.health_requests == 1, what="the heartbeat at start")
    await transitions(node.agent, ("srv-22", "installing"), ("srv-22", "ready"))
    await transitions(node.agent, ("srv-22", "starting"))  # not reported yet
    write_remote(path, heartbeat_interval=0.2, report_power_state=True)
    async with api_client(node.url) as client:
        assert (await client.post("/remote/config/reload")).status_code == 200
    await until(lambda: panel.state.health_requests >= 4, within=3, what="faster heartbeats")
    await transitions(node.agent, ("srv-22", "running"))
    await until(lambda: len(panel.statuses("srv-22")) == 3)
    assert panel.statuses("srv-22") == ["installing", "ready", "running"]
