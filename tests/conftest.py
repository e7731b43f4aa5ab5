"""Shared fixtures: a real Docker engine, agents on port 0, HTTP and WebSocket clients.

Rules for tests here: servers bind 127.0.0.1 port 0 and are started with
``nursery.start``; every I/O step has a deadline (client timeouts, ``trio.fail_after``);
waiting is polling with a deadline (``wait_for``), never a bare sleep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio_websocket
from lightd import testing
from lightd.config import deep_merge, new_token

# The agent, client and polling helpers are lightd.testing's (the pytest plugin for plugin
# authors); these fixtures add what the project's own tests need (the session's network and
# leftover check, a movable clock, agents without entry points by default).
from lightd.testing import RunningAgent, api_client, ws_url
from lightd.testing import wait_for as wait_for  # other test modules import it from here

ROOT = Path(__file__).resolve().parent.parent
VENDOR = testing.VENDOR
MASTER = testing.MASTER_TOKEN
TEST_IMAGE = os.environ.get("LIGHTD_TEST_IMAGE", "lightd/busybox:latest")


# --- what the session made, checked at its end ------------------------------------------
# Tests share one machine (and one Docker engine) with other runs, so the end-of-session
# check looks only at what this session made: containers of its agents' node ids or of its
# internal-id prefixes, its Docker network, folders in its own TMPDIR, processes that carry
# its marker in their environment. Anything found fails the session, then is removed.

MARKER = "LIGHTD_TEST_SESSION"


@attrs.define
class Made:
    """What this pytest process made that must be gone when it ends."""

    session: str = attrs.field(factory=lambda: uuid.uuid4().hex[:12])
    #: Internal-id prefixes handed to tests (``lightd-<prefix>…`` containers).
    prefixes: set[str] = attrs.field(factory=set)
    #: ``lightd.node`` labels of the agents this session ran.
    node_ids: set[str] = attrs.field(factory=set)
    #: The session's own folder for temporary files (TMPDIR of the tests and their children).
    tmpdir: Path | None = None

    @property
    def network(self) -> str:
        """The Docker network every test agent uses (``docker.network``), one per session."""
        return f"lightd-test-{self.session}"

    def new_prefix(self) -> str:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        self.prefixes.add(prefix)
        return prefix

    def ours(self, labels: dict[str, str], name: str) -> bool:
        internal_id = labels.get("lightd.internal_id", "")
        return (
            labels.get("lightd.node", "") in self.node_ids
            or internal_id.startswith(tuple(self.prefixes))
            or any(name.startswith(f"lightd-{p}") for p in self.prefixes)
        )


MADE = Made()
ORIGINAL_TMPDIR = os.environ.get("TMPDIR")


def pytest_configure(config: pytest.Config) -> None:
    """Give the session its own TMPDIR and environment marker (children inherit both)."""
    if MADE.tmpdir is not None:
        return
    # pytest's own tmp_path tree stays where it was (it keeps the last runs by design).
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    MADE.tmpdir = Path(tempfile.mkdtemp(prefix=f"lightd-tests-{MADE.session}-"))
    os.environ["TMPDIR"] = str(MADE.tmpdir)
    tempfile.tempdir = None  # re-read TMPDIR
    os.environ[MARKER] = MADE.session


def pytest_unconfigure(config: pytest.Config) -> None:
    if MADE.tmpdir is not None:
        shutil.rmtree(MADE.tmpdir, ignore_errors=True)


def outside_environ() -> dict[str, str]:
    """The environment without the session's marker and TMPDIR: for what outlives the
    session by design (the Docker engine the session may start)."""
    env = {k: v for k, v in os.environ.items() if k not in (MARKER, "TMPDIR")}
    if ORIGINAL_TMPDIR is not None:
        env["TMPDIR"] = ORIGINAL_TMPDIR
    return env


def _marked_processes(session: str) -> list[tuple[int, str]]:
    """Live processes (other than this one) whose environment carries the session marker."""
    found = []
    needle = f"{MARKER}={session}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, a zombie, or not ours to read
            continue
        found.append((int(entry.name), cmdline.strip()))
    return found


def _stored_node_ids(root: Path) -> set[str]:
    """Node ids from the stores of agents run as subprocesses (their configs live under
    the session's tmp_path tree: ``<test>/<node>/storage/lightd.sqlite3``)."""
    ids = set()
    for db in root.glob("*/*/storage/lightd.sqlite3"):
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
            try:
                ids.update(str(r[0]) for r in conn.execute("SELECT id FROM containers_node"))
            finally:
                conn.close()
    return ids


def _guard_rules(network: dict[str, Any]) -> list[str]:
    """The agents' API-port guard rules (iptables chain ``LIGHTD-API``) on the session
    network's bridge: each agent deletes its own at shutdown, so any left is a leak."""
    iptables = shutil.which("iptables")
    options = network.get("Options") or {}
    bridge = options.get("com.docker.network.bridge.name") or f"br-{network['Id'][:12]}"
    if iptables is None:
        return []
    listed = subprocess.run(
        [iptables, "-S", "LIGHTD-API"], capture_output=True, text=True, timeout=30, check=False
    )
    found = []
    for line in listed.stdout.splitlines():
        args = line.split()
        if args[:2] == ["-A", "LIGHTD-API"] and f"-i {bridge} " in f"{line} ":
            found.append(f"iptables rule {line}")
            delete = [iptables, "-D", *args[1:]]
            subprocess.run(delete, capture_output=True, timeout=30, check=False)
    return found


def drop_guard_rules(port: int) -> None:
    """Delete the API-port guard rules of an agent on ``port`` (for tests that SIGKILL an
    agent: it cannot delete its own, and the session's bridge outlives it)."""
    iptables = shutil.which("iptables")
    if iptables is None:
        return
    listed = subprocess.run(
        [iptables, "-S", "LIGHTD-API"], capture_output=True, text=True, timeout=30, check=False
    )
    for line in listed.stdout.splitlines():
        args = line.split()
        if args[:2] == ["-A", "LIGHTD-API"] and f"--dport {port} " in f"{line} ":
            delete = [iptables, "-D", *args[1:]]
            subprocess.run(delete, capture_output=True, timeout=30, check=False)


def leftovers(made: Made, basetemp: Path | None) -> list[str]:
    """Everything the session made that is still there, removing each after noting it.

    The session's Docker network is removed first (agents create it, none deletes it); the
    check then lists containers, networks, temporary files and processes that remain."""
    found: list[str] = []
    if basetemp is not None:
        made.node_ids |= _stored_node_ids(basetemp)
    host = os.environ.get("DOCKER_HOST")
    if host and (made.node_ids or made.prefixes):
        import docker

        client = docker.DockerClient(base_url=host, timeout=30)
        try:
            for c in client.containers.list(all=True, filters={"label": "lightd.managed"}):
                if made.ours(c.labels, c.name):
                    found.append(f"Docker container {c.name} ({c.status})")
                    with contextlib.suppress(docker.errors.APIError):
                        c.remove(force=True)
            for net in client.networks.list(names=[made.network]):
                if net.name != made.network:
                    continue
                found += _guard_rules(net.attrs)
                with contextlib.suppress(docker.errors.APIError):
                    net.remove()
            for net in client.networks.list():
                labels = net.attrs.get("Labels") or {}
                if net.name == made.network or labels.get("lightd.node") in made.node_ids:
                    found.append(f"Docker network {net.name}")
                    with contextlib.suppress(docker.errors.APIError):
                        net.remove()
        finally:
            client.close()
    if made.tmpdir is not None:
        for item in sorted(made.tmpdir.iterdir()):
            found.append(f"temporary {'folder' if item.is_dir() else 'file'} {item}")
    for pid, cmdline in _marked_processes(made.session):
        found.append(f"process {pid}: {cmdline}")
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the session if anything its tests made outlives them (see ``leftovers``)."""
    yield
    found = leftovers(MADE, tmp_path_factory.getbasetemp())
    if found:
        pytest.fail("the tests left behind (now removed):\n  " + "\n  ".join(found))


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
            env=outside_environ(),  # the engine outlives the session by design
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
            # The session's own network: removed at its end (see ``leftovers``).
            "docker": {"network": MADE.network},
        }
        path = folder / "config.json"
        path.write_text(json.dumps(deep_merge(raw, overrides or {}), indent=2))
        return path

    return make


@pytest.fixture
def config_path(make_config: Callable[..., Path]) -> Path:
    return make_config()


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
        running = await testing.start_agent(
            nursery,
            path,
            environ=environ,
            load_entrypoints=load_entrypoints,
            extra_plugins=extra_plugins,
            clock=clock,
        )
        if running.node_id:
            MADE.node_ids.add(running.node_id)
        return running

    return start


@pytest.fixture
async def running(start_agent: StartAgent, config_path: Path) -> RunningAgent:
    return await start_agent(config_path)


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


class Trouble(logging.Handler):
    """Keeps every record at ERROR or above, or with a traceback, from any logger: a crashed
    service or an unhandled exception in a view logs one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or record.levelno >= logging.ERROR:
            text = f"{record.name} {record.levelname}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.records.append(text)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return taken


@pytest.fixture
def trouble() -> Iterator[Trouble]:
    handler = Trouble()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
