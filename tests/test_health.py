"""Health probes (contract §17): ``/health/live`` and ``/health/ready``, without headers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from lightd import Agent, Service, hookimpl

from .conftest import RunningAgent, StartAgent, wait_for

ALL_OK = {"store": "ok", "docker": "ok", "plugins": "ok"}


async def _get(url: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as anon:  # no headers at all
        return await anon.get(path)


async def test_live_and_ready_answer_without_headers(running: RunningAgent) -> None:
    live = await _get(running.url, "/health/live")
    assert live.status_code == 200
    assert live.json() == {"status": "alive"}
    ready = await _get(running.url, "/health/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": ALL_OK}


async def test_not_ready_while_docker_is_unreachable(
    start_agent: StartAgent, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    dead = tmp_path / "no-engine.sock"  # nothing listens here
    node = await start_agent(make_config(), environ={"DOCKER_HOST": f"unix://{dead}"})
    ready = await _get(node.url, "/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert body == {
        "status": "not_ready",
        "checks": {"store": "ok", "docker": "unreachable", "plugins": "ok"},
    }
    assert str(tmp_path) not in ready.text  # a public answer: no host path
    live = await _get(node.url, "/health/live")
    assert live.status_code == 200  # alive all the same


class _Flaky:
    """A plugin whose service crashes after it started, until told to behave."""

    def __init__(self) -> None:
        self.crash = True
        self.runs = 0

    @hookimpl
    def lightd_add_services(self, agent: Agent) -> list[Service]:
        async def run(*, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            self.runs += 1
            task_status.started()
            await trio.sleep(0 if self.runs == 1 else 0.01)
            if self.crash:
                raise RuntimeError("flaky service crashed (on purpose)")
            await trio.sleep_forever()

        return [Service("flaky.worker", run)]


async def test_not_ready_while_a_service_backs_off(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    flaky = _Flaky()
    node = await start_agent(make_config(), extra_plugins=(("flaky", flaky),))

    async def backing_off() -> bool:
        answer = await _get(node.url, "/health/ready")
        return answer.status_code == 503 and answer.json()["checks"]["plugins"] == (
            "service flaky.worker: restarting after a crash"
        )

    await wait_for(backing_off, what="readiness to report the crashed service")
    flaky.crash = False

    async def ready_again() -> bool:
        answer = await _get(node.url, "/health/ready")
        return answer.status_code == 200 and answer.json()["checks"] == ALL_OK

    await wait_for(ready_again, within=20, what="readiness once the service runs")


async def test_not_ready_when_the_store_fails(running: RunningAgent) -> None:
    agent = running.agent
    conn = agent.store._conn
    agent.store._conn = _Broken()  # type: ignore[assignment]
    try:
        ready = await _get(running.url, "/health/ready")
    finally:
        agent.store._conn = conn
    assert ready.status_code == 503
    assert ready.json()["checks"]["store"] == "query failed (OperationalError)"
    assert "disk I/O" not in ready.text  # the reason stays short: the log has the rest

    async def ready_again() -> bool:
        return (await _get(running.url, "/health/ready")).status_code == 200

    await wait_for(ready_again, what="readiness once the store answers")


class _Broken:
    """A database connection that refuses every statement (disk gone, file corrupt)."""

    def execute(self, *_args: object) -> Any:
        import sqlite3

        raise sqlite3.OperationalError("disk I/O error")
