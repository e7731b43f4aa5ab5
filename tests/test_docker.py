"""The Docker adapter against the real engine, including an engine that goes away."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from lightd.docker import (
    DockerConflict,
    DockerEngine,
    DockerError,
    DockerNotFound,
    _create_body,
    docker_url,
)
from lightd.errors import DockerUnavailable

from .conftest import ROOT, TEST_IMAGE, RunningAgent, StartAgent, api_client, wait_for


def test_docker_host_wins_over_the_configured_socket() -> None:
    assert docker_url("/var/run/docker.sock", {}) == "unix:///var/run/docker.sock"
    assert docker_url("/var/run/docker.sock", {"DOCKER_HOST": "tcp://10.0.0.1:2375"}) == (
        "tcp://10.0.0.1:2375"
    )
    assert docker_url("unix:///run/d.sock", {}) == "unix:///run/d.sock"


def test_only_the_adapter_imports_docker() -> None:
    offenders = []
    for path in [*ROOT.joinpath("agent").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n == "docker" or n.startswith("docker.") for n in names):
                offenders.append(path.relative_to(ROOT))
    assert offenders == [Path("agent/docker.py")]


async def test_streams_and_control_calls_have_their_own_limiters() -> None:
    engine = DockerEngine("unix:///nonexistent.sock")
    default = trio.to_thread.current_default_thread_limiter()
    assert engine.stream_limiter is not default and engine.control_limiter is not default
    assert engine.stream_limiter is not engine.control_limiter
    assert engine.request_limiter not in (default, engine.control_limiter, engine.stream_limiter)
    assert engine.stream_limiter.total_tokens > default.total_tokens


async def test_engine_info_from_the_real_engine(
    start_agent: StartAgent, config_path: Path, docker_host: str
) -> None:
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    async with api_client(node.url) as c:
        response = await c.get("/system/info")
        ping = await c.get("/api/v1/public/ping")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["docker"]["api_version"]
    assert {p["name"] for p in info["plugins"]} >= {"system", "tokens"}
    assert ping.json()["docker"] == "connected"
    assert node.agent.docker.info is not None
    limiter = node.agent.docker.control_limiter
    client = node.agent.docker._client
    assert client is not None
    # docker-py's connection pool is raised above its default of 10.
    assert client.api.adapters["http+docker://"].max_pool_size == 64
    assert limiter.borrowed_tokens == 0


async def _relay(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
    try:
        while data := await a.receive_some(65536):
            await b.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        with trio.move_on_after(1, shield=True):
            await b.aclose()


async def serve_forwarder(
    listen: Path, target: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A unix-socket relay standing in for an engine that comes and goes."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await trio.Path(listen).unlink(missing_ok=True)
    await sock.bind(str(listen))
    sock.listen()
    listener = trio.SocketListener(sock)

    async def handle(client: trio.SocketStream) -> None:
        upstream = await trio.open_unix_socket(target)
        async with trio.open_nursery() as n:
            n.start_soon(_relay, client, upstream)
            n.start_soon(_relay, upstream, client)

    try:
        await trio.serve_listeners(handle, [listener], task_status=task_status)
    finally:
        listen.unlink(missing_ok=True)  # noqa: ASYNC240 - cleanup must not checkpoint


async def test_unreachable_engine_then_reconnect(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    docker_host: str,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    if not docker_host.startswith("unix://"):
        pytest.fail("this test relays to a unix-socket engine")
    sock = tmp_path / "engine.sock"
    node = await start_agent(make_config(), environ={"DOCKER_HOST": f"unix://{sock}"})
    node.agent.docker.retry_max = 0.3
    async with api_client(node.url) as c:

        async def docker_status() -> str:
            return (await c.get("/api/v1/public/ping")).json()["docker"]

        # No engine: the agent serves anyway; Docker-backed routes say 503.
        assert await docker_status() == "unreachable"
        down = await c.get("/system/info")
        assert down.status_code == 503
        assert down.json()["error"] == "Docker engine unreachable"
        assert (await c.get("/remote/config")).status_code == 200

        # The engine appears: the agent connects by itself.
        relay = trio.CancelScope()

        async def run_relay(*, task_status: trio.TaskStatus[None]) -> None:
            with relay:
                await serve_forwarder(
                    sock, docker_host.removeprefix("unix://"), task_status=task_status
                )

        await nursery.start(run_relay)

        async def connected() -> bool:
            return await docker_status() == "connected"

        await wait_for(connected, what="the agent to connect")
        assert (await c.get("/system/info")).status_code == 200
        engine = node.agent.docker
        assert await engine.containers(["lightd.test=none"]) == []  # leaves a kept connection

        # It goes away: the next call fails cleanly as 503, and the agent notices.
        relay.cancel()

        async def gone() -> bool:
            return (await c.get("/system/info")).status_code == 503

        await wait_for(gone, what="503 after the engine left")
        with pytest.raises(DockerUnavailable):
            await engine.containers(["lightd.test=none"])
        await wait_for(lambda: _is(docker_status, "unreachable"), what="ping to say unreachable")

        # And back again.
        relay2 = trio.CancelScope()

        async def run_relay2(*, task_status: trio.TaskStatus[None]) -> None:
            with relay2:
                await serve_forwarder(
                    sock, docker_host.removeprefix("unix://"), task_status=task_status
                )

        await nursery.start(run_relay2)
        await wait_for(connected, what="the agent to reconnect")
        assert (await c.get("/system/info")).status_code == 200
        assert await engine.containers(["lightd.test=none"]) == []  # no stale connection used
        relay2.cancel()


async def _is(fn: Callable[[], object], value: str) -> bool:
    return await fn() == value  # type: ignore[misc]


async def test_docker_call_outside_the_engine_lifecycle_is_503() -> None:
    engine = DockerEngine("unix:///nonexistent/docker.sock")
    with pytest.raises(DockerUnavailable, match="Docker engine unreachable"):
        await engine.inspect_container("abc")
    with pytest.raises(DockerUnavailable, match="Docker engine unreachable"):
        await engine.call(lambda client: client.ping())


async def test_agent_with_engine_serves_http(running: RunningAgent) -> None:
    async with httpx.AsyncClient(base_url=running.url) as c:
        assert (await c.get("/api/v1/public/ping")).status_code == 200


def test_create_body_is_docker_pys_own() -> None:
    """The native create sends exactly what docker-py's ``containers.create`` would."""
    import docker

    client = docker.DockerClient(base_url="unix:///nonexistent.sock", version="1.41")
    api = client.api
    options = {
        "image": TEST_IMAGE,
        "name": "lightd-x",
        "entrypoint": ["/bin/sh", "/app/data/entrypoint.sh"],
        "command": [],
        "working_dir": "/home/container",
        "environment": {"STARTUP": "run it", "SERVER_PORT": "25565"},
        "labels": {"lightd.managed": "true"},
        "volumes": {"/srv/v": {"bind": "/home/container", "mode": "rw"}},
        "stdin_open": True,
        "tty": False,
        "detach": True,
        "pids_limit": 64,
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "ports": {"25565/tcp": ("127.0.0.1", 25565), "25565/udp": [("127.0.0.1", 25565)]},
        "mem_limit": 1 << 28,
        "memswap_limit": 1 << 29,
        "nano_cpus": 500_000_000,
    }
    sent: dict[str, object] = {}

    def capture(url: str, data: dict[str, object], **kwargs: object) -> None:
        sent.update(data=data, params=kwargs.get("params"))
        raise StopIteration

    api._post_json = capture  # type: ignore[method-assign]
    with pytest.raises(StopIteration):
        client.containers.create(**options)
    body, name = _create_body(api, options)
    expected = {k: v for k, v in sent["data"].items() if v is not None}  # type: ignore[union-attr]
    assert body == expected
    assert sent["params"] == {"name": name} == {"name": "lightd-x"}
    assert body["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]
    assert not body["HostConfig"].get("Privileged", False)


async def test_native_control_calls_on_the_real_engine(
    start_agent: StartAgent, config_path: Path, docker_host: str
) -> None:
    """create/start/inspect/kill/wait/remove without a thread, and the engine's refusals
    mapped to the agent's errors with the engine's own explanation."""
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    engine = node.agent.docker
    name = f"lightd-native-{id(node) % 100000}"
    options = {
        "image": TEST_IMAGE,
        "name": name,
        "command": ["sh", "-c", "exit 3"],
        "labels": {"lightd.test": "native"},
    }
    container_id = await engine.create_container(options)
    try:
        assert (await engine.inspect_container(container_id))["Name"] == f"/{name}"
        assert await engine.containers(["lightd.test=native"]) != []
        with pytest.raises(DockerConflict, match="already in use"):
            await engine.create_container(options)
        await engine.start(container_id)
        assert (await engine.wait(container_id))["StatusCode"] == 3
        with pytest.raises(DockerError, match="is not running"):
            await engine.kill(container_id)
        # A control call cancelled in flight is still carried out, and its outcome known.
        finished = in_flight = False
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def cancel_in_flight() -> None:
                    nonlocal in_flight
                    await trio.testing.wait_all_tasks_blocked()
                    in_flight = engine.request_limiter.borrowed_tokens == 1
                    scope.cancel()

                nursery.start_soon(cancel_in_flight)
                await engine.remove_container(container_id)
                finished = True
                await trio.lowlevel.checkpoint()  # where the cancellation surfaces
        assert in_flight and finished and scope.cancelled_caught
        # One cancelled before it is sent is not sent.
        with trio.CancelScope() as scope:
            scope.cancel()
            await engine.kill(container_id)
        assert scope.cancelled_caught
        with pytest.raises(DockerNotFound, match="No such container"):
            await engine.inspect_container(container_id)
    finally:
        with contextlib.suppress(DockerNotFound):
            await engine.remove_container(container_id)
    with pytest.raises(DockerNotFound):
        await engine.create_container({**options, "image": "lightd/absent:nope"})
    with pytest.raises(DockerNotFound):
        await engine.inspect_image("lightd/absent:nope")
    # Names are quoted into the path: odd ones are refused by the engine, and the engine
    # is not taken for gone.
    for odd in ("no such image", "what?x=1", "a#b", "50%"):
        with pytest.raises(DockerError):
            await engine.inspect_image(odd)
        assert engine.available


async def test_a_kept_connection_the_engine_closed_is_not_used(
    docker_host: str, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The engine restarted between two calls: the kept connection is dead, the call is not."""
    if not docker_host.startswith("unix://"):
        pytest.fail("this test relays to a unix-socket engine")
    sock = tmp_path / "engine.sock"
    target = docker_host.removeprefix("unix://")

    async def relay(scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await serve_forwarder(sock, target, task_status=task_status)

    first = trio.CancelScope()
    await nursery.start(relay, first)
    engine = DockerEngine(f"unix://{sock}")
    engine.probe_interval = 3600  # no probe between the calls: only the call can notice
    await nursery.start(engine.serve)
    assert engine.available
    assert await engine.containers(["lightd.test=none"]) == []
    first.cancel()  # closes the kept connection, as an engine restart does
    await trio.testing.wait_all_tasks_blocked()
    await nursery.start(relay, trio.CancelScope())
    assert await engine.containers(["lightd.test=none"]) == []
    assert engine.available
