"""Test an agent with your plugin in it: a pytest plugin, and the helpers under it.

Installing ``lightd`` registers this module with pytest (entry point ``pytest11``, name
``lightd``; ``-p no:lightd`` switches it off), so a plugin's tests only ask for fixtures::

    async def test_my_route(lightd_client):
        response = await lightd_client.get("/motd/srv-1")
        assert response.status_code == 200

Every fixture is named ``lightd_…``; async tests need pytest-trio (``trio_mode = true``
in your pytest config; ``pip install "lightd[testing]"`` brings pytest-trio and the
WebSocket client). The agent runs in the test's own process and trio run (pytest-trio's
``nursery``), bound to 127.0.0.1 on a free port, with a config of its own under
``tmp_path`` and the master token ``MASTER_TOKEN``. Installed plugins (entry points of
``lightd.plugins``, yours included once it is ``pip install -e``'d) are loaded as in
production; pass ``plugins=[module]`` to register one that is not installed.

Fixtures:

* ``lightd_agent``: a running agent (a ``RunningAgent``), configured by the test's
  ``@pytest.mark.lightd(config={...}, docker=False)`` marker when it has one;
* ``lightd_client``: an ``httpx.AsyncClient`` of it with the vendor header and the master
  token; ``lightd_ws``: ``async with lightd_ws("/ws/srv-1") as ws`` (trio-websocket;
  the token goes in ``?token=``);
* ``lightd_volume``: a new volume of it (``Volume``: ``id`` and host ``path``);
* ``lightd_start``: start more agents, ``await lightd_start(config={...}, docker=True)``;
  ``lightd_config``: write a config file, ``lightd_config({...}) -> Path``;
* ``lightd_docker``: the Docker engine (session-scoped ``DockerTarget``). Without
  ``docker=True`` an agent gets no engine at all (its container routes answer 503); with
  it, a test is skipped when no engine answers at ``DOCKER_HOST`` (or fails, with
  ``--lightd-require-docker`` or the ini option ``lightd_require_docker = true``). The
  agents use a network of the session's own, and the containers they made are removed
  when the test ends; ``lightd_server_id`` is a fresh ``internal_id`` for each test.

Options: ``--lightd-docker-host URL`` (else ``$DOCKER_HOST``), ``--lightd-image REF``
(else ``$LIGHTD_TEST_IMAGE``, else the ini option ``lightd_image``, else
``busybox:latest``: an image the engine has; the agent pulls one it lacks).

The helpers work without the fixtures too: ``start_agent(nursery, config_path)``,
``write_config``, ``api_client``, ``ws_url``, ``wait_for``, ``create_server``,
``wait_state``. Only the fixtures need pytest; nothing here is imported by the agent.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import httpx
import pytest
import trio

from .config import deep_merge
from .containers import CONTAINERS
from .runtime import Agent, open_agent
from .server import serve_agent

if TYPE_CHECKING:
    from trio_websocket import WebSocketConnection

__all__ = [
    "MASTER_TOKEN",
    "VENDOR",
    "DockerTarget",
    "RunningAgent",
    "StartAgent",
    "Volume",
    "api_client",
    "create_server",
    "docker_answers",
    "lightd_agent",
    "lightd_client",
    "lightd_config",
    "lightd_docker",
    "lightd_options",
    "lightd_server_id",
    "lightd_start",
    "lightd_volume",
    "lightd_ws",
    "remove_node_containers",
    "start_agent",
    "wait_for",
    "wait_state",
    "write_config",
    "ws_url",
]

#: The ``Accept`` header every request needs (contract §4).
VENDOR = "Application/vnd.pkglatv1+json"
#: The master token of every agent these helpers configure.
MASTER_TOKEN = "lightd_" + "0123456789abcdef" * 2
#: The image of servers when no option names one.
DEFAULT_IMAGE = "busybox:latest"
#: Label of the containers an agent made (``lightd.node=<node id>``).
NODE_LABEL = "lightd.node"
#: The Docker network of the agents of this test process (``lightd_config`` writes it
#: into every config; ``lightd_docker`` removes it at the end of the session).
SESSION_NETWORK = f"lightd-test-{uuid.uuid4().hex[:12]}"


# -- clients ------------------------------------------------------------------------------


def api_client(url: str, token: str | None = MASTER_TOKEN, **headers: str) -> httpx.AsyncClient:
    """An HTTP client of the agent at ``url``: the vendor header and ``token`` (none when
    ``None``), a 10 s timeout. Use it as ``async with api_client(url) as client``."""
    base = {"Accept": VENDOR}
    if token is not None:
        base["Authorization"] = f"Bearer {token}"
    base.update(headers)
    return httpx.AsyncClient(base_url=url, headers=base, timeout=10)


def ws_url(http_url: str, path: str) -> str:
    """``http://h:p`` + ``/ws/x`` → ``ws://h:p/ws/x`` (``https`` → ``wss``)."""
    return "ws" + http_url.removeprefix("http") + path


def _with_token(path: str, token: str | None) -> str:
    if token is None or "token=" in path:
        return path
    return f"{path}{'&' if '?' in path else '?'}token={token}"


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, within: float = 10, what: str = ""
) -> None:
    """Poll ``predicate`` every 50 ms until it holds (for what has no event to wait on:
    a file, a container); fail the test after ``within`` seconds."""
    with trio.move_on_after(within):
        while not await predicate():  # noqa: ASYNC110 - polling an outside condition
            await trio.sleep(0.05)
        return
    pytest.fail(f"timed out after {within}s waiting for {what or predicate}")


# -- agents -------------------------------------------------------------------------------


@attrs.frozen
class Volume:
    """A volume made through the API: its id and its folder on the host."""

    id: str
    path: Path


@attrs.define
class RunningAgent:
    """An agent serving in the test's nursery: ``agent`` (the ``lightd.Agent`` your hooks
    are handed, e.g. ``running.agent.stash[MY_KEY]``) and its base ``url``."""

    agent: Agent
    url: str
    stopped: trio.Event

    async def stop(self) -> None:
        """Stop it as SIGTERM would (``lightd_shutdown`` runs) and wait until it has."""
        self.agent.request_stop()
        with trio.fail_after(10):
            await self.stopped.wait()

    def client(self, token: str | None = MASTER_TOKEN, **headers: str) -> httpx.AsyncClient:
        """``api_client`` of this agent."""
        return api_client(self.url, token, **headers)

    def websocket(
        self, path: str, *, token: str | None = MASTER_TOKEN, **kwargs: Any
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        """``async with running.websocket("/ws/srv-1") as ws``: a trio-websocket
        connection, ``token`` added as ``?token=`` (contract §8)."""
        import trio_websocket

        url = ws_url(self.url, _with_token(path, token))
        return trio_websocket.open_websocket_url(url, **kwargs)

    async def new_volume(self) -> Volume:
        """``POST /volumes``: a new empty volume."""
        async with self.client() as client:
            response = await client.post("/volumes")
        assert response.status_code == 201, response.text
        body = response.json()
        return Volume(str(body["volume_id"]), Path(body["path"]))

    @property
    def node_id(self) -> str | None:
        """The id the agent labels its Docker objects with (``None`` before it knows)."""
        containers = self.agent.stash.get(CONTAINERS)
        return containers.node_id or None if containers is not None else None


def write_config(folder: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/config.json`` for a test agent (127.0.0.1 port 0, the master token
    ``MASTER_TOKEN``, storage in ``folder``, remote sync off) with ``overrides``
    deep-merged into it; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "graceful_timeout": 0.5},
        "authorization": {"enabled": True, "token": MASTER_TOKEN},
        "storage": {
            "base_path": "./storage",
            "containers_path": "./storage/containers",
            "volumes_path": "./storage/volumes",
        },
        "remote": {"enabled": False, "url": "http://127.0.0.1:9", "token": MASTER_TOKEN},
    }
    path = folder / "config.json"
    path.write_text(json.dumps(deep_merge(raw, dict(overrides or {})), indent=2))
    return path


async def start_agent(
    nursery: trio.Nursery,
    config_path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    load_entrypoints: bool = True,
    extra_plugins: Iterable[tuple[str, object]] = (),
    clock: Callable[[], float] = time.time,
) -> RunningAgent:
    """Build the agent of ``config_path`` and serve it in ``nursery``; returns once it
    listens (within 30 s). It stops with ``RunningAgent.stop`` or when the nursery is
    cancelled. ``environ`` is where ``DOCKER_HOST`` is read (default: ``os.environ``);
    ``extra_plugins`` are ``(name, plugin)`` pairs registered after the built-ins."""
    plugins = tuple(extra_plugins)

    async def run(*, task_status: trio.TaskStatus[RunningAgent]) -> None:
        stopped = trio.Event()
        try:
            async with (
                open_agent(
                    config_path,
                    environ=environ,
                    load_entrypoints=load_entrypoints,
                    extra_plugins=plugins,
                    clock=clock,
                ) as agent,
                trio.open_nursery() as inner,
            ):
                urls = await inner.start(serve_agent, agent)
                task_status.started(RunningAgent(agent, urls[0], stopped))
        finally:
            stopped.set()

    with trio.fail_after(30):
        running: RunningAgent = await nursery.start(run)
    return running


# -- Docker -------------------------------------------------------------------------------


@attrs.frozen
class DockerTarget:
    """The engine the tests' agents use: its URL, the session's network, the test image."""

    host: str
    network: str
    image: str


def _engine(host: str, timeout: float = 30) -> httpx.Client:
    """A plain client of the Engine API at ``host`` (``unix://…`` or ``tcp://…``)."""
    parts = urlsplit(host)
    if parts.scheme == "unix":
        transport = httpx.HTTPTransport(uds=parts.path)
        return httpx.Client(transport=transport, base_url="http://docker", timeout=timeout)
    scheme = "https" if parts.scheme == "https" else "http"
    return httpx.Client(base_url=f"{scheme}://{parts.netloc}", timeout=timeout)


def docker_answers(host: str) -> bool:
    """Does an engine answer ``GET /_ping`` at ``host``?"""
    try:
        with _engine(host, timeout=5) as engine:
            return engine.get("/_ping").status_code == 200
    except (httpx.HTTPError, OSError, ValueError):
        return False


def remove_node_containers(host: str, node_id: str) -> list[str]:
    """Remove (forced) every container an agent of ``node_id`` made; their names."""
    removed: list[str] = []
    with _engine(host) as engine:
        filters = json.dumps({"label": [f"{NODE_LABEL}={node_id}"]})
        listed = engine.get("/containers/json", params={"all": "1", "filters": filters})
        listed.raise_for_status()
        for item in listed.json():
            engine.delete(f"/containers/{item['Id']}", params={"force": "1"})
            removed.extend(name.lstrip("/") for name in item.get("Names") or ())
    return removed


def _remove_network(host: str, name: str) -> None:
    """Remove the network (a 404, never made, is fine; so is an engine gone meanwhile)."""
    with contextlib.suppress(httpx.HTTPError, OSError), _engine(host) as engine:
        engine.delete(f"/networks/{name}")


# -- servers ------------------------------------------------------------------------------


async def wait_state(
    client: httpx.AsyncClient, internal_id: str, *, within: float = 30, **expected: Any
) -> dict[str, Any]:
    """Poll ``GET /containers/:id`` until each ``expected`` field has its value
    (``install_state="ready"``, ``state="running"``); the last answer."""
    seen: dict[str, Any] = {}

    async def matches() -> bool:
        nonlocal seen
        response = await client.get(f"/containers/{internal_id}")
        seen = dict(response.json()) if response.status_code == 200 else {}
        return bool(seen) and all(seen.get(k) == v for k, v in expected.items())

    await wait_for(matches, within=within, what=f"{internal_id} to reach {expected} ({seen})")
    return seen


async def create_server(
    client: httpx.AsyncClient,
    internal_id: str,
    *,
    image: str,
    volume_id: str | None = None,
    startup_command: str = "echo ready; sleep 3600",
    **body: Any,
) -> dict[str, Any]:
    """``POST /containers`` (a new volume unless ``volume_id``), then wait until the
    install is ``ready``; the container as ``GET /containers/:id`` shows it."""
    if volume_id is None:
        made = await client.post("/volumes")
        assert made.status_code == 201, made.text
        volume_id = str(made.json()["volume_id"])
    payload = {
        "internal_id": internal_id,
        "image": image,
        "volume_id": volume_id,
        "startup_command": startup_command,
        **body,
    }
    response = await client.post("/containers", json=payload)
    assert response.status_code == 200, response.text
    return await wait_state(client, internal_id, install_state="ready")


# -- the pytest plugin --------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lightd", "lightd agents (lightd.testing)")
    group.addoption(
        "--lightd-docker-host",
        metavar="URL",
        help="Docker engine of agents started with docker=True (default: $DOCKER_HOST)",
    )
    group.addoption(
        "--lightd-image",
        metavar="REF",
        help="image of test servers (default: $LIGHTD_TEST_IMAGE, ini lightd_image, "
        f"else {DEFAULT_IMAGE})",
    )
    group.addoption(
        "--lightd-require-docker",
        action="store_true",
        default=None,
        help="fail, not skip, tests that need a Docker engine when none answers",
    )
    parser.addini("lightd_image", "image of test servers", default="")
    parser.addini(
        "lightd_require_docker", "fail, not skip, without an engine", type="bool", default=False
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lightd(config=None, docker=False): how the lightd_agent fixture starts its agent",
    )


StartAgent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture(scope="session")
def lightd_docker(pytestconfig: pytest.Config) -> Iterator[DockerTarget]:
    """The engine (skips the test, or fails it when Docker is required, if none answers)
    and the session's network, removed at the end of the session."""
    host = pytestconfig.getoption("lightd_docker_host") or os.environ.get("DOCKER_HOST", "")
    image = (
        pytestconfig.getoption("lightd_image")
        or os.environ.get("LIGHTD_TEST_IMAGE")
        or pytestconfig.getini("lightd_image")
        or DEFAULT_IMAGE
    )
    if not host or not docker_answers(host):
        why = f"no Docker engine answers at {host!r}" if host else "DOCKER_HOST is not set"
        required = pytestconfig.getoption("lightd_require_docker")
        if required is None:
            required = pytestconfig.getini("lightd_require_docker")
        if required:
            pytest.fail(f"{why} (a Docker engine is required)")
        pytest.skip(why)
    target = DockerTarget(host=host, network=SESSION_NETWORK, image=image)
    yield target
    _remove_network(host, target.network)


@pytest.fixture
def lightd_config(tmp_path: Path) -> Callable[..., Path]:
    """``lightd_config(overrides=None, *, name=None) -> Path``: a config file of its own
    folder under ``tmp_path`` (see ``write_config``), on the session's Docker network."""
    counter = iter(range(1_000_000))

    def make(overrides: Mapping[str, Any] | None = None, *, name: str | None = None) -> Path:
        network = {"docker": {"network": SESSION_NETWORK}}
        folder = tmp_path / (name or f"lightd{next(counter)}")
        return write_config(folder, deep_merge(network, dict(overrides or {})))

    return make


@pytest.fixture
async def lightd_start(
    nursery: trio.Nursery, request: pytest.FixtureRequest, lightd_config: Callable[..., Path]
) -> AsyncIterator[StartAgent]:
    """``await lightd_start(config=None, *, docker=False, plugins=(), load_entrypoints=True)``:
    start an agent in the test's nursery. ``config`` is a dict of overrides or a config
    file's path; ``plugins`` are plugin modules (or ``(name, module)`` pairs) to register
    besides the installed ones. At the end of the test its agents stop and, with Docker,
    the containers they made are removed."""
    started: list[tuple[RunningAgent, DockerTarget | None]] = []

    async def start(
        config: Mapping[str, Any] | Path | None = None,
        *,
        docker: bool = False,
        plugins: Iterable[object] = (),
        load_entrypoints: bool = True,
    ) -> RunningAgent:
        target: DockerTarget | None = None
        if docker:
            target = request.getfixturevalue("lightd_docker")
            assert target is not None
        path = config if isinstance(config, Path) else lightd_config(config)
        if target is not None:
            environ = {**os.environ, "DOCKER_HOST": target.host}
        else:  # no engine at all: a socket path where nothing listens
            environ = {**os.environ, "DOCKER_HOST": f"unix://{path.parent / 'no-docker.sock'}"}
        pairs = [p if isinstance(p, tuple) else (_plugin_name(p), p) for p in plugins]
        running = await start_agent(
            nursery, path, environ=environ, load_entrypoints=load_entrypoints, extra_plugins=pairs
        )
        started.append((running, target))
        return running

    try:
        yield start
    finally:
        for running, _ in started:
            with trio.CancelScope(shield=True):
                await running.stop()
        for running, target in started:
            node = running.node_id
            if target is not None and node:
                await trio.to_thread.run_sync(remove_node_containers, target.host, node)


def _plugin_name(plugin: object) -> str:
    """A module's dotted name (``my_plugin.hooks``), else the object's class name."""
    return str(getattr(plugin, "__name__", None) or type(plugin).__name__)


@pytest.fixture
def lightd_options(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The test's ``@pytest.mark.lightd(...)`` arguments, for ``lightd_agent``.

    With ``docker=True`` the engine is asked for here, before the trio run: a skip from
    inside a trio test loses its reason (pytest-trio), so a test that calls
    ``lightd_start(docker=True)`` itself should ask for ``lightd_docker`` too."""
    marker = request.node.get_closest_marker("lightd")
    options = dict(marker.kwargs) if marker is not None else {}
    if options.get("docker"):
        request.getfixturevalue("lightd_docker")
    return options


@pytest.fixture
async def lightd_agent(lightd_start: StartAgent, lightd_options: dict[str, Any]) -> RunningAgent:
    """A running agent with the installed plugins; ``@pytest.mark.lightd(config={...},
    docker=True)`` configures it."""
    return await lightd_start(**lightd_options)


@pytest.fixture
async def lightd_client(lightd_agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client (vendor header, master token) of ``lightd_agent``."""
    async with lightd_agent.client() as client:
        yield client


@pytest.fixture
def lightd_ws(
    lightd_agent: RunningAgent,
) -> Callable[..., AbstractAsyncContextManager[WebSocketConnection]]:
    """``async with lightd_ws(path, token=MASTER_TOKEN) as ws``: a WebSocket of
    ``lightd_agent`` (``RunningAgent.websocket``)."""
    return lightd_agent.websocket


@pytest.fixture
async def lightd_volume(lightd_agent: RunningAgent) -> Volume:
    """A new volume of ``lightd_agent``: ``.id`` and ``.path`` (its host folder)."""
    return await lightd_agent.new_volume()


@pytest.fixture
def lightd_server_id() -> str:
    """A fresh ``internal_id`` for a server (unique on a shared engine)."""
    return f"t{uuid.uuid4().hex[:12]}"
