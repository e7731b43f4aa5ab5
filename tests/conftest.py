"""Shared fixtures: a real Docker engine, agents on port 0, HTTP and WebSocket clients.

Rules for tests here: servers bind 127.0.0.1 port 0 and are started with
``nursery.start``; every I/O step has a deadline (client timeouts, ``trio.fail_after``);
waiting is polling with a deadline (``wait_for``), never a bare sleep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket
from lightd.config import deep_merge, new_token
from lightd.runtime import Agent, open_agent
from lightd.server import serve_agent

ROOT = Path(__file__).resolve().parent.parent
VENDOR = "Application/vnd.pkglatv1+json"
MASTER = "lightd_" + "0123456789abcdef" * 2
TEST_IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")


# --- readable failures ---------------------------------------------------------------
# pytest-trio reports every failure wrapped in an ExceptionGroup from trio's nursery,
# which hides pytest's assertion diff. Unwrap groups that hold a single exception.


def _single_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[None]:
    try:
        return (yield)
    except BaseExceptionGroup as group:
        leaf = _single_leaf(group)
        if isinstance(leaf, BaseExceptionGroup):
            raise
        raise leaf.with_traceback(leaf.__traceback__) from None


# --- Docker engine -------------------------------------------------------------------


def _engine_answers(host: str) -> bool:
    result = subprocess.run(
        ["docker", "-H", host, "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        timeout=20,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def docker_host() -> str:
    """The URL of a reachable engine (the project's script starts one when none answers)."""
    host = os.environ.get("DOCKER_HOST")
    if not host or not _engine_answers(host):
        result = subprocess.run(
            ["bash", str(ROOT / "scripts" / "docker-engine.sh")],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if result.returncode != 0:
            pytest.fail(f"no Docker engine could be started:\n{result.stderr[-3000:]}")
        host = result.stdout.strip().removeprefix("export DOCKER_HOST=")
        os.environ["DOCKER_HOST"] = host
    return host


# --- config and agents ---------------------------------------------------------------


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    """Write a config for a test agent; keyword ``overrides`` are deep-merged into it."""
    counter = iter(range(1000))

    def make(overrides: dict[str, Any] | None = None, *, name: str | None = None) -> Path:
        folder = tmp_path / (name or f"node{next(counter)}")
        folder.mkdir(exist_ok=True)
        raw = {
            "version": "0.2.1",
            "server": {"host": "127.0.0.1", "port": 0, "graceful_timeout": 0.5},
            "authorization": {"enabled": True, "token": MASTER},
            "storage": {
                "base_path": "./storage",
                "containers_path": "./storage/containers",
                "volumes_path": "./storage/volumes",
            },
            "remote": {"enabled": False, "url": "http://127.0.0.1:9", "token": new_token()},
        }
        path = folder / "config.json"
        path.write_text(json.dumps(deep_merge(raw, overrides or {}), indent=2))
        return path

    return make


@pytest.fixture
def config_path(make_config: Callable[..., Path]) -> Path:
    return make_config()


@attrs.define
class RunningAgent:
    agent: Agent
    url: str
    stopped: trio.Event

    async def stop(self) -> None:
        self.agent.request_stop()
        with trio.fail_after(10):
            await self.stopped.wait()


class Clock:
    """A wall clock tests can move forward (token expiry, purges)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


StartAgent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
def start_agent(nursery: trio.Nursery, clock: Clock) -> StartAgent:
    """Start an agent from a config file in the test's nursery; returns when it listens."""

    async def start(
        path: Path,
        *,
        environ: dict[str, str] | None = None,
        load_entrypoints: bool = False,
        extra_plugins: tuple[tuple[str, object], ...] = (),
    ) -> RunningAgent:
        async def run(*, task_status: trio.TaskStatus[RunningAgent]) -> None:
            stopped = trio.Event()
            try:
                async with (
                    open_agent(
                        path,
                        environ=environ,
                        load_entrypoints=load_entrypoints,
                        extra_plugins=extra_plugins,
                        clock=clock,
                    ) as agent,
                    trio.open_nursery() as inner,
                ):
                    urls = await inner.start(serve_agent, agent)
                    task_status.started(RunningAgent(agent, urls[0], stopped))
            finally:
                stopped.set()

        with trio.fail_after(30):
            return await nursery.start(run)

    return start


@pytest.fixture
async def running(start_agent: StartAgent, config_path: Path) -> RunningAgent:
    return await start_agent(config_path)


def api_client(url: str, token: str | None = MASTER, **headers: str) -> httpx.AsyncClient:
    base = {"Accept": VENDOR}
    if token is not None:
        base["Authorization"] = f"Bearer {token}"
    base.update(headers)
    return httpx.AsyncClient(base_url=url, headers=base, timeout=10)


@pytest.fixture
async def client(running: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client (vendor header + master token) of the default agent."""
    async with api_client(running.url) as c:
        yield c


@pytest.fixture
async def anon(running: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the default agent that sends no headers of its own."""
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as c:
        yield c


def ws_url(http_url: str, path: str) -> str:
    return "ws" + http_url.removeprefix("http") + path


@pytest.fixture
def ws_connect() -> Callable[..., Any]:
    """``async with ws_connect(agent_url, "/ws/…?token=…") as ws`` (trio-websocket)."""

    def connect(http_url: str, path: str, **kwargs: Any) -> Any:
        return trio_websocket.open_websocket_url(ws_url(http_url, path), **kwargs)

    return connect


# --- the external plugin ---------------------------------------------------------------


@pytest.fixture
def hello_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Install ``tests/external_plugin`` as a distribution with a ``lightd.plugins`` entry
    point, the way pip would: a ``.dist-info`` folder on ``sys.path``."""
    site = tmp_path / "site"
    dist = site / "lightd_hello-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lightd-hello\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lightd.plugins]\nhello = lightd_hello.plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "external_plugin"))
    for name in [m for m in sys.modules if m.startswith("lightd_hello")]:
        monkeypatch.delitem(sys.modules, name)
    return "hello"


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 10, what: str = ""
) -> None:
    """Poll ``predicate`` (something outside this process: no event to wait on) until it
    holds; fail after ``within`` seconds."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110 - polling an external condition
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out after {within}s waiting for {what or predicate}")
