"""Contract §7.6, isolation of failures: whatever goes wrong while the agent handles one
container (an exception of any type in an action, the console reader, a plugin's hook; a
value that passed the converter but breaks later) ends that piece of work for that
container only. Another container, running, watched over a real WebSocket, keeps its
console flowing without a gap, its power actions keep working, and the ``containers``
service never restarts. Real engine, real HTTP and WebSocket clients."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket
from lightd import hookimpl
from lightd.containers import CONTAINERS
from lightd.containers.hub import CLOSE_SERVICE_RESTART
from lightd.containers.manager import Containers
from lightd.containers.supervisor import ContainerSupervisor

from ..conftest import MASTER, RunningAgent, api_client, wait_for
from ..containers.conftest import (
    StartNode,
    get,
    ready,
    wait_state,
)

#: The bystander: one numbered line every 0.1 s, so a gap or a lost line shows.
TICKER = 'i=0; while true; do i=$((i+1)); echo "tick $i"; sleep 0.1; done'
#: Longest pause allowed in the bystander's console while the victim fails.
MAX_GAP = 1.0


class Watch:
    """The bystander's WebSocket, read in the background: arrival time of every tick."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.ticks: list[tuple[float, int]] = []
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.closed = trio.Event()
        #: Set (and replaced) whenever a frame arrives.
        self.changed = trio.Event()

    async def run(self) -> None:
        try:
            while True:
                frame = json.loads(await self.ws.get_message())
                self.frames.append(frame)
                if frame["event"] == "console":
                    now = trio.current_time()
                    for n in re.findall(r"tick (\d+)", frame["data"]):
                        self.ticks.append((now, int(n)))
                self.changed.set()
                self.changed = trio.Event()
        except trio_websocket.ConnectionClosed as closed:
            self.close_code = closed.reason.code
        finally:
            self.closed.set()

    async def ticked(self, count: int = 5, within: float = 10) -> None:
        """Wait for ``count`` more ticks."""
        target = len(self.ticks) + count
        with trio.fail_after(within):
            while len(self.ticks) < target:
                await self.changed.wait()

    async def message(self, text: str, within: float = 30) -> None:
        """Wait for the daemon message ``text``."""
        frame = {"event": "daemon_message", "data": text}
        with trio.fail_after(within):
            while frame not in self.frames:
                await self.changed.wait()

    def check_flow(self, since: float) -> None:
        """Ticks after ``since`` came with no gap over ``MAX_GAP`` and none lost."""
        ticks = [(t, n) for t, n in self.ticks if t >= since]
        assert len(ticks) >= 5, f"the bystander's console stalled: {self.ticks[-3:]}"
        times = [since] + [t for t, _ in ticks] + [trio.current_time()]
        gap = max(b - a for a, b in itertools.pairwise(times))
        assert gap < MAX_GAP, f"the bystander's console paused {gap:.2f}s"
        numbers = [n for _, n in ticks]
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), "lines lost"


@pytest.fixture
def watch(ws_connect: Callable[..., Any], nursery: trio.Nursery) -> Callable[..., Any]:
    @asynccontextmanager
    async def open_watch(node: RunningAgent, internal_id: str) -> AsyncIterator[Watch]:
        async with ws_connect(
            node.url, f"/ws/{internal_id}?token={MASTER}", disconnect_timeout=5
        ) as ws:
            watcher = Watch(ws)
            nursery.start_soon(watcher.run)
            yield watcher

    return open_watch


async def running(api: httpx.AsyncClient, internal_id: str, startup: str = TICKER) -> None:
    await ready(api, internal_id, startup_command=startup)
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")


def containers_of(node: RunningAgent) -> Containers:
    found: Containers = node.agent.stash[CONTAINERS]
    return found


def no_service_crash(caplog: pytest.LogCaptureFixture) -> None:
    crashes = [r for r in caplog.records if "crashed" in r.getMessage() and "service" in r.msg]
    assert not crashes, crashes


async def bystander_still_serves(
    api: httpx.AsyncClient, watcher: Watch, internal_id: str, since: float
) -> None:
    """Its console flowed the whole time, and a power action on it still works."""
    await watcher.ticked()
    watcher.check_flow(since)
    assert not watcher.closed.is_set()
    response = await api.post(f"/containers/{internal_id}/restart")
    assert response.status_code == 200, response.text

    await watcher.message("Container restarted")
    await watcher.ticked()
    await wait_state(api, internal_id, state="running")


async def test_an_unexpected_exception_in_one_action_ends_that_action_only(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node()
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await running(api, victim, "echo up; sleep 3600")
        await running(api, bystander)
        before = containers.get(bystander)
        target = containers.get(victim)

        async def boom() -> None:
            raise RuntimeError("injected")

        target._do_restart = boom  # type: ignore[method-assign]
        async with watch(node, victim) as victim_ws, watch(node, bystander) as by_ws:
            await by_ws.ticked()
            since = trio.current_time()
            assert (await api.post(f"/containers/{victim}/restart")).status_code == 200
            body = await wait_state(api, victim, error="Internal error (RuntimeError)")
            assert body["state"] == "running"  # the failed action changed nothing else
            await victim_ws.message("Error: Internal error (RuntimeError)")
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before  # the service never restarted
            # The victim's next actions work again (and a start clears the old error).
            del target._do_restart
            assert (await api.post(f"/containers/{victim}/restart")).status_code == 200
            await wait_state(api, victim, state="running", error=None, within=40)
    no_service_crash(caplog)
    assert any("a bug" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_a_failing_console_reader_ends_that_console_only(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node()
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await running(api, victim)
        await running(api, bystander)
        before = containers.get(bystander)
        target = containers.get(victim)

        async def lines(lines: list[str]) -> None:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

        async with watch(node, victim) as victim_ws, watch(node, bystander) as by_ws:
            await by_ws.ticked()
            since = trio.current_time()
            target._lines = lines  # type: ignore[method-assign]
            await victim_ws.message("Error: Internal error (UnicodeEncodeError)")
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before
            # The victim itself is still there and can be stopped.
            assert (await api.post(f"/containers/{victim}/kill")).status_code == 200
            await wait_state(api, victim, state="offline")
    no_service_crash(caplog)


class _FailingHook:
    """A plugin whose ``lightd_container_state_changed`` raises for one container."""

    def __init__(self, internal_id: str) -> None:
        self.internal_id = internal_id
        self.armed = False

    @hookimpl
    def lightd_container_state_changed(
        self, agent: Any, internal_id: str, state: str, error: str | None
    ) -> None:
        if self.armed and internal_id == self.internal_id:
            raise OverflowError("plugin bug")


async def test_a_plugin_hook_that_raises_does_not_reach_the_service(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    hook = _FailingHook(victim)
    node = await start_node(extra=(("failing_hook", hook),))
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await ready(api, victim, startup_command="echo up; sleep 3600")
        await running(api, bystander)
        before = containers.get(bystander)
        async with watch(node, bystander) as by_ws:
            await by_ws.ticked()
            since = trio.current_time()
            hook.armed = True
            assert (await api.post(f"/containers/{victim}/start")).status_code == 200
            await wait_state(api, victim, state="running")  # the hook's failure is logged
            assert (await api.post(f"/containers/{victim}/kill")).status_code == 200
            await wait_state(api, victim, state="offline")
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before
    no_service_crash(caplog)


async def test_reinstall_with_a_lone_surrogate_affects_that_container_only(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's case end to end: the converter may refuse it (400); if such a value
    gets through anyway (put straight into the queue here), only that container fails."""
    node = await start_node()
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await ready(api, victim, startup_command="echo up; sleep 3600")
        await running(api, bystander)
        before = containers.get(bystander)
        async with watch(node, bystander) as by_ws:
            await by_ws.ticked()
            since = trio.current_time()
            response = await api.post(  # as JSON text: the escape \ud800, not its bytes
                f"/containers/{victim}/reinstall",
                content=json.dumps({"install_script": "echo \ud800"}).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code in (200, 400), response.text
            if response.status_code == 200:
                await wait_state(api, victim, install_state="failed", within=40)
            else:
                assert response.json()["error"] == "install_script: invalid text"
                await wait_state(api, victim, install_state="ready")
                containers.get(victim).submit("reinstall", image=None, install_script="echo \ud800")
                await wait_state(api, victim, install_state="failed", within=40)
            body = await get(api, victim)
            assert body["error"] == "Internal error (UnicodeEncodeError)"
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before
            # A good reinstall mends it.
            response = await api.post(
                f"/containers/{victim}/reinstall", json={"install_script": "echo fine"}
            )
            assert response.status_code == 200, response.text
            await wait_state(api, victim, install_state="ready", error=None, within=40)
    no_service_crash(caplog)


async def test_a_restarted_containers_service_leaves_no_orphan_hubs(
    start_node: StartNode, watch: Any, prefix: str, ws_connect: Callable[..., Any]
) -> None:
    """Should the service crash anyway (a bug beyond every guard), its clients are told
    (1012) instead of staying subscribed to hubs nothing feeds, and the new run adopts the
    running servers."""
    node = await start_node()
    bystander = f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await running(api, bystander)
        old: ContainerSupervisor = containers.get(bystander)
        async with watch(node, bystander) as by_ws:
            await by_ws.ticked()

            async def crash() -> None:
                raise RuntimeError("injected service crash")

            assert containers._nursery is not None
            containers._nursery.start_soon(crash)
            with trio.fail_after(15):
                await by_ws.closed.wait()
            assert by_ws.close_code == CLOSE_SERVICE_RESTART
        assert len(old.hub) == 0 and old.hub.closed

        async def replaced() -> bool:
            new = containers.find(bystander)
            return new is not None and new is not old and new.state == "running"

        await wait_for(replaced, within=20, what="the new supervisor to adopt the server")
        async with watch(node, bystander) as again:
            await again.ticked()
        assert (await api.post(f"/containers/{bystander}/kill")).status_code == 200
        await wait_state(api, bystander, state="offline")


async def test_a_bad_value_in_a_record_fails_that_start_only(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's other cases (a lone surrogate in ``startup_command``; the converter
    refuses it now) put straight into a record: its start fails, nothing else does."""
    node = await start_node()
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await ready(api, victim, startup_command="echo up; sleep 3600")
        await running(api, bystander)
        before = containers.get(bystander)
        target = containers.get(victim)
        target.record = attrs.evolve(target.record, startup_command="echo \ud800")
        # The entrypoint is written at install and at every re-creation: force one.
        target.record = attrs.evolve(target.record, container_id=None)
        async with watch(node, victim) as victim_ws, watch(node, bystander) as by_ws:
            await by_ws.ticked()
            since = trio.current_time()
            assert (await api.post(f"/containers/{victim}/start")).status_code == 200
            await victim_ws.message("Error: Internal error (UnicodeEncodeError)")
            body = await wait_state(api, victim, error="Internal error (UnicodeEncodeError)")
            assert body["state"] == "offline"
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before
    no_service_crash(caplog)


async def test_a_supervisor_that_fails_runs_again_and_reattaches(
    start_node: StartNode, watch: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The last guard: something escaping a supervisor's own tasks (a bug past every
    other guard) restarts that supervisor, which re-attaches to its running server."""
    node = await start_node()
    victim, bystander = f"{prefix}-victim", f"{prefix}-by"
    containers = containers_of(node)
    async with api_client(node.url) as api:
        await running(api, victim)
        await running(api, bystander)
        before = containers.get(bystander)
        target = containers.get(victim)
        async with watch(node, victim) as victim_ws, watch(node, bystander) as by_ws:
            await by_ws.ticked()
            await victim_ws.ticked()
            since = trio.current_time()

            async def crash() -> None:
                raise RuntimeError("injected supervisor crash")

            assert target._nursery is not None
            target._nursery.start_soon(crash)
            await victim_ws.message("Error: Internal error (RuntimeError)")
            await victim_ws.ticked(within=15)  # its console is attached again
            assert containers.get(victim) is target
            assert (await get(api, victim))["state"] == "running"
            await bystander_still_serves(api, by_ws, bystander, since)
            assert containers.get(bystander) is before
            assert (await api.post(f"/containers/{victim}/kill")).status_code == 200
            await wait_state(api, victim, state="offline")
    no_service_crash(caplog)
