"""Contract §9/§10: queued updates survive a hard crash. The agent runs as a real process
(``python -m lightd``), queues 20 updates while the panel is down, is SIGKILLed, and once
restarted delivers all 20, each once, in order per server."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from ..conftest import ROOT, api_client, drop_guard_rules, wait_for
from .remote_sync_support import Panel, remote_config, until

LISTENING = re.compile(r"listening on (http://\S+?)(?:,|\s|$)")


@pytest.fixture
def driver_env(tmp_path: Path) -> dict[str, str]:
    """The environment of an agent process that loads ``remote_sync_driver`` through a
    ``lightd.plugins`` entry point (a ``.dist-info`` folder on its ``PYTHONPATH``)."""
    site = tmp_path / "driver-site"
    dist = site / "lightd_remote_sync_driver-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: lightd-remote-sync-driver\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[lightd.plugins]\nremote_sync_driver = tests.plugins.remote_sync_driver\n"
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


@asynccontextmanager
async def agent_process(
    config: Path, env: dict[str, str], log: Path
) -> AsyncIterator[tuple[trio.Process, str]]:
    """``python -m lightd --config …`` until it listens; killed on exit if still running."""
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "lightd", "--config", str(config)],
            stdin=None,
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env=env,
        )
    url = ""
    try:

        async def listening() -> bool:
            nonlocal url
            text = await trio.Path(log).read_text(errors="replace")
            if process.poll() is not None:
                pytest.fail(f"the agent exited early:\n{text[-3000:]}")
            match = LISTENING.search(text)
            url = match[1] if match else ""
            return bool(url)

        await wait_for(listening, within=30, what="the agent process to listen")
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            with trio.fail_after(10):
                await process.wait()
        if url:  # a killed agent could not delete its API-port guard rule
            drop_guard_rules(int(url.rsplit(":", 1)[1]))


@pytest.fixture
async def down_panel(nursery: trio.Nursery) -> AsyncIterator[Panel]:
    panel = Panel(nursery)
    yield panel
    panel.close()


STATES = ["installing", "ready", "starting", "running", "stopping"]


async def test_sigkilled_agent_delivers_its_queued_updates_after_restart(
    down_panel: Panel,
    make_config: Callable[..., Path],
    driver_env: dict[str, str],
    tmp_path: Path,
) -> None:
    panel = down_panel
    config = make_config(remote_config(panel.url, report_power_state=True))
    servers = [f"srv-{i}" for i in range(4)]
    steps = [{"server": s, "state": state} for state in STATES for s in servers]
    assert len(steps) == 20

    async with agent_process(config, driver_env, tmp_path / "first.log") as (process, url):
        async with api_client(url) as client:
            response = await client.post("/test/transitions", json={"transitions": steps})
            assert response.status_code == 200, response.text
            status = (await client.get("/remote/status")).json()
        assert status["pending_updates"] == 20
        assert status["healthy"] is False
        process.send_signal(signal.SIGKILL)  # no shutdown hook, no flush, nothing
        with trio.fail_after(10):
            assert await process.wait() == -signal.SIGKILL
    assert panel.state.update_requests == 0

    await panel.up()
    async with agent_process(config, driver_env, tmp_path / "second.log") as (process, url):
        await until(lambda: len(panel.state.received) == 20, within=20, what="20 updates")
        for server in servers:
            assert panel.statuses(server) == STATES
        assert len({b["event_id"] for b in panel.bodies()}) == 20

        async def drained() -> bool:
            async with api_client(url) as client:
                status = (await client.get("/remote/status")).json()
            return status["pending_updates"] == 0 and status["delivered"] == 20

        await wait_for(drained, what="the restarted agent's outbox to drain")
        # Stopped gracefully this time: acknowledged rows are gone from the store, so a
        # third start has nothing to send again.
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            assert await process.wait() == 0

    received = len(panel.state.received)
    requests = panel.state.update_requests
    async with (
        agent_process(config, driver_env, tmp_path / "third.log") as (process, url),
        api_client(url) as client,
    ):
        assert (await client.get("/remote/status")).json()["pending_updates"] == 0
    assert panel.state.update_requests == requests and len(panel.state.received) == received


async def test_the_agent_process_starts_while_the_panel_is_down(
    down_panel: Panel, make_config: Callable[..., Path], driver_env: dict[str, str], tmp_path: Path
) -> None:
    """A dead panel delays nothing: the API answers while the heartbeat is refused."""
    config = make_config(remote_config(down_panel.url))
    async with (
        agent_process(config, driver_env, tmp_path / "agent.log") as (_, url),
        httpx.AsyncClient(base_url=url, timeout=5) as client,
    ):
        with trio.fail_after(2):
            assert (await client.get("/api/v1/public/ping")).status_code == 200
    log = (tmp_path / "agent.log").read_text()
    assert "heartbeat: panel at" in log and "cannot connect" in log
    assert "feedface" not in log  # the panel token never reaches the log
