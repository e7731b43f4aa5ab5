"""The Docker adapter against the real engine, including an engine that goes away."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from lightd.docker import (
    ContainerSpec,
    DockerConflict,
    DockerEngine,
    DockerError,
    DockerNotFound,
    LogConfig,
    Mount,
    PortPublish,
    ResourceLimits,
    create_body,
    demux,
    docker_url,
    split_image,
)
from lightd.errors import DockerUnavailable

from .conftest import ROOT, TEST_IMAGE, RunningAgent, StartAgent, api_client, wait_for


def test_docker_host_wins_over_the_configured_socket() -> None:
    assert docker_url("/var/run/docker.sock", {}) == "unix:///var/run/docker.sock"
    assert docker_url("/var/run/docker.sock", {"DOCKER_HOST": "tcp://10.0.0.1:2375"}) == (
        "tcp://10.0.0.1:2375"
    )
    assert docker_url("unix:///run/d.sock", {}) == "unix:///run/d.sock"


def test_nothing_imports_docker_py() -> None:
    """The adapter speaks the Engine API itself: no module uses docker-py (or requests),
    and only the adapter's own package reaches the engine's socket."""
    offenders = []
    for path in [*ROOT.joinpath("agent").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            if any(n.split(".")[0] in ("docker", "requests") for n in names):
                offenders.append(path.relative_to(ROOT))
    assert offenders == []


async def test_control_calls_have_their_own_limiter() -> None:
    engine = DockerEngine("unix:///nonexistent.sock")
    assert engine.request_limiter is not trio.to_thread.current_default_thread_limiter()


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
    engine = node.agent.docker
    assert engine.info is not None
    assert info["docker"]["api_version"] == engine.info.api_version
    version = await engine.version()
    assert version.version and version.os == "linux" and version.arch
    assert info["docker"] == {
        "version": version.version,
        "api_version": version.api_version,
        "os": version.os,
        "arch": version.arch,
    }
    await engine.ping()
    assert "Containers" in await engine.system_info()
    assert any(TEST_IMAGE in (i.get("RepoTags") or []) for i in await engine.images())
    assert {"bridge", "host", "none"} <= {n["Name"] for n in await engine.networks()}
    assert engine.request_limiter.borrowed_tokens == 0


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
        await engine.version()
    with pytest.raises(DockerUnavailable):
        async with engine.attach("abc"):
            pass


async def test_agent_with_engine_serves_http(running: RunningAgent) -> None:
    async with httpx.AsyncClient(base_url=running.url) as c:
        assert (await c.get("/api/v1/public/ping")).status_code == 200


SPEC = ContainerSpec(
    image=TEST_IMAGE,
    name="lightd-x",
    entrypoint=("/bin/sh", "/app/data/entrypoint.sh"),
    cmd=(),
    working_dir="/home/container",
    env={"STARTUP": "run it", "SERVER_PORT": "25565"},
    labels={"lightd.managed": "true"},
    mounts=(Mount("/srv/v", "/home/container"), Mount("/srv/d", "/app/data", read_only=True)),
    ports=(
        PortPublish(25565, "tcp", "127.0.0.1", 25565),
        PortPublish(25565, "udp", "127.0.0.1", 25565),
        PortPublish(25565, "udp", "127.0.0.2", 25566),
    ),
    limits=ResourceLimits(memory=1 << 28, memory_swap=1 << 29, nano_cpus=500_000_000, pids=64),
    stdin_open=True,
    security_opt=("no-new-privileges",),
    log_config=LogConfig("json-file", {"max-size": "10m", "max-file": "2"}),
)


def test_create_body_field_by_field() -> None:
    """Our spec in the Engine API's own names (``POST /containers/create``, API 1.41)."""
    assert create_body(SPEC) == {
        "Image": TEST_IMAGE,
        "Entrypoint": ["/bin/sh", "/app/data/entrypoint.sh"],
        "Cmd": [],
        "WorkingDir": "/home/container",
        "Env": ["STARTUP=run it", "SERVER_PORT=25565"],
        "Labels": {"lightd.managed": "true"},
        "Tty": False,
        "OpenStdin": True,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "NetworkDisabled": False,
        "Volumes": {"/home/container": {}, "/app/data": {}},
        "ExposedPorts": {"25565/tcp": {}, "25565/udp": {}},
        "HostConfig": {
            "NetworkMode": "default",
            "Binds": ["/srv/v:/home/container:rw", "/srv/d:/app/data:ro"],
            "PortBindings": {
                "25565/tcp": [{"HostIp": "127.0.0.1", "HostPort": "25565"}],
                "25565/udp": [
                    {"HostIp": "127.0.0.1", "HostPort": "25565"},
                    {"HostIp": "127.0.0.2", "HostPort": "25566"},
                ],
            },
            "Memory": 1 << 28,
            "MemorySwap": 1 << 29,
            "NanoCpus": 500_000_000,
            "PidsLimit": 64,
            "SecurityOpt": ["no-new-privileges"],
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        },
    }
    # What is not asked for is left to the image and the engine; never privileged.
    bare = create_body(ContainerSpec(image="img"))
    assert bare == {
        "Image": "img",
        "Tty": False,
        "OpenStdin": False,
        "StdinOnce": False,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "NetworkDisabled": False,
        "HostConfig": {"NetworkMode": "default"},
    }
    assert create_body(ContainerSpec(image="img", privileged=True))["HostConfig"]["Privileged"]


def test_image_names_split_as_the_engine_pulls_them() -> None:
    assert split_image("busybox") == ("busybox", "latest")
    assert split_image("lightd/busybox:1.36") == ("lightd/busybox", "1.36")
    assert split_image("registry:5000/team/app") == ("registry:5000/team/app", "latest")
    assert split_image("registry:5000/app:v2") == ("registry:5000/app", "v2")
    assert split_image("app@sha256:abc") == ("app", "sha256:abc")


def test_demux_joins_the_frames_payloads() -> None:
    frames = b"\x01\0\0\0\0\0\0\x03out" + b"\x02\0\0\0\0\0\0\x04err\n"
    assert demux(frames) == b"outerr\n"


async def test_create_inspect_round_trip(
    start_agent: StartAgent, config_path: Path, docker_host: str, tmp_path: Path
) -> None:
    """The engine reads back what the spec says."""
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    engine = node.agent.docker
    (tmp_path / "v").mkdir()
    (tmp_path / "d").mkdir()
    spec = attrs.evolve(
        SPEC,
        name=f"lightd-spec-{id(node) % 100000}",
        labels={"lightd.test": "spec"},
        mounts=(
            Mount(str(tmp_path / "v"), "/home/container"),
            Mount(str(tmp_path / "d"), "/app/data", read_only=True),
        ),
    )
    container_id = await engine.create_container(spec)
    try:
        seen: dict[str, Any] = await engine.inspect_container(container_id)
    finally:
        await engine.remove_container(container_id)
    config, host = seen["Config"], seen["HostConfig"]
    assert seen["Name"] == f"/{spec.name}"
    assert config["Image"] == TEST_IMAGE
    assert config["Entrypoint"] == ["/bin/sh", "/app/data/entrypoint.sh"]
    assert config["WorkingDir"] == "/home/container"
    assert {"STARTUP=run it", "SERVER_PORT=25565"} <= set(config["Env"])
    assert config["Labels"] == {"lightd.test": "spec"}
    assert config["OpenStdin"] and not config["StdinOnce"] and not config["Tty"]
    assert set(config["ExposedPorts"]) == {"25565/tcp", "25565/udp"}
    assert host["Binds"] == [
        f"{tmp_path / 'v'}:/home/container:rw",
        f"{tmp_path / 'd'}:/app/data:ro",
    ]
    assert host["PortBindings"]["25565/udp"] == [
        {"HostIp": "127.0.0.1", "HostPort": "25565"},
        {"HostIp": "127.0.0.2", "HostPort": "25566"},
    ]
    assert (host["Memory"], host["MemorySwap"]) == (1 << 28, 1 << 29)
    assert (host["NanoCpus"], host["PidsLimit"]) == (500_000_000, 64)
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert not host["Privileged"]
    assert host["LogConfig"] == {
        "Type": "json-file",
        "Config": {"max-size": "10m", "max-file": "2"},
    }


async def test_stop_logs_stats_and_events_on_the_real_engine(
    start_agent: StartAgent, config_path: Path, docker_host: str
) -> None:
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    engine = node.agent.docker
    spec = ContainerSpec(
        image=TEST_IMAGE,
        cmd=("sh", "-c", "echo one; echo two >&2; trap 'exit 7' TERM; sleep 60 & wait"),
        labels={"lightd.test": "streams"},
    )
    container_id = await engine.create_container(spec)
    events: list[dict[str, Any]] = []
    died = trio.Event()

    async def seen(event: dict[str, Any]) -> None:
        events.append(event)
        if event.get("Action") == "die":
            died.set()

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                filters = {"label": ["lightd.test=streams"], "event": ["start", "die"]}
                await nursery.start(engine.watch_events, filters, seen)
                await engine.start(container_id)
                async with engine.stats(container_id) as items:
                    async for item in items:
                        assert "cpu_stats" in item and "memory_stats" in item
                        break

                async def both_lines() -> bool:
                    return b"two" in await engine.logs(container_id)

                await wait_for(both_lines, what="both lines in the logs")
                logs = await engine.logs(container_id)  # stdout and stderr, demultiplexed
                assert sorted(logs.splitlines()) == [b"one", b"two"]
                assert await engine.logs(container_id, tail=1) in (b"one\n", b"two\n")
                await engine.stop(container_id, grace=10)
                assert (await engine.inspect_container(container_id))["State"]["ExitCode"] == 7
                await engine.stop(container_id)  # stopped already: no error
                await died.wait()
                nursery.cancel_scope.cancel()
    finally:
        await engine.remove_container(container_id)
    assert [e["Action"] for e in events] == ["start", "die"]
    assert events[1]["Actor"]["Attributes"]["exitCode"] == "7"
    with pytest.raises(DockerNotFound):
        await engine.logs(container_id)
    with pytest.raises(DockerNotFound):
        async with engine.stats(container_id):
            pass


async def test_pull_failure_is_the_engines_refusal(
    start_agent: StartAgent, config_path: Path, docker_host: str
) -> None:
    """No registry is reachable here: a pull fails with the engine's reason, and the
    engine is not taken for gone."""
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    engine = node.agent.docker
    progress: list[str] = []
    with trio.fail_after(60), pytest.raises(DockerError) as caught:
        await engine.pull("127.0.0.1:9/lightd/absent:nope", progress.append)
    assert str(caught.value)
    assert engine.available


async def test_native_control_calls_on_the_real_engine(
    start_agent: StartAgent, config_path: Path, docker_host: str
) -> None:
    """create/start/inspect/kill/wait/remove without a thread, and the engine's refusals
    mapped to the agent's errors with the engine's own explanation."""
    node = await start_agent(config_path, environ={"DOCKER_HOST": docker_host})
    engine = node.agent.docker
    name = f"lightd-native-{id(node) % 100000}"
    options = ContainerSpec(
        image=TEST_IMAGE, name=name, cmd=("sh", "-c", "exit 3"), labels={"lightd.test": "native"}
    )
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
        await engine.create_container(attrs.evolve(options, image="lightd/absent:nope"))
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


@pytest.fixture
async def live_engine(docker_host: str, nursery: trio.Nursery) -> DockerEngine:
    """A connected adapter of the test's own (no agent around it)."""
    engine = DockerEngine(docker_host)
    await nursery.start(engine.serve)
    assert engine.available
    return engine


@contextlib.asynccontextmanager
async def running_container(engine: DockerEngine, label: str) -> AsyncIterator[str]:
    spec = ContainerSpec(image=TEST_IMAGE, cmd=("sleep", "600"), labels={"lightd.test": label})
    container_id = await engine.create_container(spec)
    try:
        await engine.start(container_id)
        yield container_id
    finally:
        with trio.CancelScope(shield=True):
            await engine.remove_container(container_id)


async def test_exec_run_output_exit_code_and_cap(live_engine: DockerEngine) -> None:
    engine = live_engine
    async with running_container(engine, "exec") as container_id:
        with trio.fail_after(30):
            done = await engine.exec_run(
                container_id, ["sh", "-c", "echo out; echo err >&2; exit 4"], timeout=20
            )
        assert done.exit_code == 4
        assert sorted(done.output.splitlines()) == [b"err", b"out"]
        assert not done.truncated and not done.timed_out
        # Past the cap the output is dropped but the process runs to its end (it is not
        # left blocked on a full pipe): 2 MB written, 1 KiB kept.
        with trio.fail_after(30):
            big = await engine.exec_run(
                container_id,
                ["sh", "-c", "head -c 2000000 /dev/zero | tr '\\0' x; echo done >&2"],
                timeout=20,
                max_output=1024,
            )
        assert big.exit_code == 0 and big.truncated and not big.timed_out
        assert big.output == b"x" * 1024
        # No such command: the engine's own exit code for it.
        with trio.fail_after(30):
            missing = await engine.exec_run(container_id, ["/no/such"], timeout=20)
        assert missing.exit_code not in (None, 0) and not missing.timed_out


async def test_exec_run_timeout_kills_the_process_and_its_children(
    live_engine: DockerEngine,
) -> None:
    engine = live_engine
    async with running_container(engine, "exec-timeout") as container_id:
        started = trio.current_time()
        with trio.fail_after(30):
            late = await engine.exec_run(
                container_id,
                ["sh", "-c", "echo begun; sleep 300 & sleep 301; echo never"],
                timeout=1,
            )
        assert trio.current_time() - started < 10
        assert late.timed_out and late.exit_code is None
        assert late.output == b"begun\n"

        async def sleepers_gone() -> bool:
            ps = await engine.exec_run(container_id, ["ps", "-o", "pid,args"], timeout=20)
            return b"sleep 30" not in ps.output

        await wait_for(sleepers_gone, what="the timed-out exec's processes killed")
        # The container itself is untouched.
        assert (await engine.inspect_container(container_id))["State"]["Running"]


async def test_exec_run_needs_a_running_container(live_engine: DockerEngine) -> None:
    engine = live_engine
    spec = ContainerSpec(image=TEST_IMAGE, cmd=("true",), labels={"lightd.test": "exec-stopped"})
    container_id = await engine.create_container(spec)
    try:
        with pytest.raises(DockerConflict, match="is not running"):
            await engine.exec_run(container_id, ["true"], timeout=5)
    finally:
        await engine.remove_container(container_id)
    with pytest.raises(DockerNotFound):
        await engine.exec_run("lightd-absent-container", ["true"], timeout=5)


async def test_update_container_applies_limits_live(live_engine: DockerEngine) -> None:
    engine = live_engine
    async with running_container(engine, "update") as container_id:
        await engine.update_container(
            container_id,
            {
                "Memory": 64 << 20,
                "MemorySwap": 128 << 20,
                "CpuShares": 512,
                "CpuPeriod": 100_000,
                "CpuQuota": 50_000,
                "PidsLimit": 32,
            },
        )
        host = (await engine.inspect_container(container_id))["HostConfig"]
        assert (host["Memory"], host["MemorySwap"]) == (64 << 20, 128 << 20)
        assert (host["CpuShares"], host["CpuQuota"], host["PidsLimit"]) == (512, 50_000, 32)
        assert (await engine.inspect_container(container_id))["State"]["Running"]
        # The engine's refusal, with its reason (a limit below its minimum).
        with pytest.raises(DockerError, match=r"(?i)memory"):
            await engine.update_container(container_id, {"Memory": 1024, "MemorySwap": 2048})
    with pytest.raises(DockerNotFound):
        await engine.update_container(container_id, {"Memory": 64 << 20})
