"""Attack suite, containers in (contract §7.6): what a request body may carry into a
container's record, its Docker container and the engine, on a real agent and engine.

Each test was seen failing on the code before the hardening of issue 12.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import trio
from lightd.containers import CONTAINERS
from lightd.docker import DockerEngine, DockerError

from ..conftest import MADE, RunningAgent, api_client, wait_for
from ..containers.conftest import StartNode, add_port, get, new_volume, ready, wait_state

BASE = {"image": "lightd/busybox:latest", "startup_command": "sleep 3600"}


async def post_raw(api: httpx.AsyncClient, path: str, raw: str) -> httpx.Response:
    """A body as written (JSON escapes such as ``\\ud800`` reach the agent unchanged)."""
    return await api.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})


def body(internal_id: str, volume_id: str, **extra: Any) -> dict[str, Any]:
    return {"internal_id": internal_id, "volume_id": volume_id, **BASE, **extra}


# --- 1. text and numbers in the one converter --------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("startup_command", '"echo \\ud800"', "startup_command: invalid text"),
        ("install_script", '"echo \\udfff"', "install_script: invalid text"),
        ("stop_command", '"stop\\u0000"', "stop_command: invalid text"),
        ("image", '"busybox\\ud800"', "image: invalid text"),
        ("environment", '{"A": "x\\ud83d"}', "environment['A']: invalid text"),
        ("start_pattern", '"ready\\u0000"', "start_pattern: invalid text"),
    ],
)
async def test_lone_surrogates_and_nul_are_refused_as_invalid_text(
    api: httpx.AsyncClient, prefix: str, field: str, value: str, message: str
) -> None:
    with trio.fail_after(40):
        volume = await new_volume(api)
        fields = body(f"{prefix}-t", volume)
        fields.pop(field, None)
        raw = json.dumps(fields)[:-1] + f', "{field}": {value}}}'
        response = await post_raw(api, "/containers", raw)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == message
        assert (await api.get(f"/containers/{prefix}-t")).status_code == 404


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ('{"cpu": 1e300}', "limits.cpu: must be between 0.01 and"),
        ('{"cpu": Infinity}', "limits.cpu: must be a finite number"),
        ('{"cpu": 1e400}', "limits.cpu: must be a finite number"),
        ('{"cpu": 1e-9}', "limits.cpu: must be between 0.01 and"),
        ('{"cpu": 50}', "limits.cpu: must be between 0.01 and"),
        ('{"memory": 1099511627777}', "limits.memory: must be between 6291456 and"),
        ('{"pids": 32769}', "limits.pids: must be between 1 and 32768"),
        ('{"swap": -2}', "limits.swap: must be >= -1"),
        ('{"swap": 1099511627777}', "limits.swap: must be -1 (unlimited) or 0 to"),
    ],
)
async def test_limits_must_be_finite_and_in_range(
    api: httpx.AsyncClient, prefix: str, limits: str, message: str
) -> None:
    with trio.fail_after(40):
        volume = await new_volume(api)
        raw = json.dumps(body(f"{prefix}-n", volume))[:-1] + f', "limits": {limits}}}'
        response = await post_raw(api, "/containers", raw)
        assert response.status_code == 400, response.text
        assert response.json()["error"].startswith(message)


async def test_cpu_above_the_node_count_is_refused_at_the_request(
    api: httpx.AsyncClient, prefix: str
) -> None:
    cpus = os.cpu_count() or 1
    with trio.fail_after(40):
        volume = await new_volume(api)
        response = await api.post(
            "/containers", json=body(f"{prefix}-c", volume, limits={"cpu": cpus + 1})
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == (
            f"limits.cpu: must be between 0.01 and {cpus} (the node's CPUs)"
        )


async def test_a_surrogate_in_a_reinstall_is_refused_and_the_service_lives(
    api: httpx.AsyncClient, prefix: str
) -> None:
    """The issue's first reproduction: answered 200, then the containers service died."""
    with trio.fail_after(60):
        internal_id = f"{prefix}-r"
        await ready(api, internal_id)
        response = await post_raw(
            api, f"/containers/{internal_id}/reinstall", '{"install_script": "echo \\ud800"}'
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "install_script: invalid text"
        bad = await post_raw(api, f"/containers/{internal_id}/reinstall", '{"image": "A B"}')
        assert bad.status_code == 400
        assert bad.json()["error"] == "Invalid image: A B"
        assert (await get(api, internal_id))["install_state"] == "ready"


# --- 2. nesting ------------------------------------------------------------------------


async def test_json_nested_deeper_than_64_levels_is_invalid(api: httpx.AsyncClient) -> None:
    with trio.fail_after(40):
        deep = await post_raw(api, "/containers", '{"a": ' + "[" * 64 + "]" * 64 + "}")
        assert deep.status_code == 400
        assert deep.json()["error"] == "Invalid JSON body"
        fine = await post_raw(api, "/containers", '{"a": ' + "[" * 63 + "]" * 63 + "}")
        assert fine.status_code == 400
        assert fine.json()["error"] != "Invalid JSON body"  # a field error: it was parsed


# --- 3. limits: a memory limit always, the bounds reach Docker ---------------------------


async def test_a_container_without_limits_gets_the_default_memory_and_pids(
    api: httpx.AsyncClient, prefix: str, engine: docker.DockerClient
) -> None:
    with trio.fail_after(60):
        internal_id = f"{prefix}-m"
        seen = await ready(api, internal_id)
        assert seen["limits"]["memory"] == 1024**3
        assert seen["limits"]["pids"] == 512
        host = await trio.to_thread.run_sync(
            lambda: engine.containers.get(f"lightd-{internal_id}").attrs["HostConfig"]
        )
        assert host["Memory"] == 1024**3
        assert host["PidsLimit"] == 512


# --- 4. image references ---------------------------------------------------------------


@pytest.mark.parametrize("image", ["Busybox", "busybox:", "a b", "busybox::1", "-x", "x" * 300])
async def test_an_image_must_be_a_docker_reference(
    api: httpx.AsyncClient, prefix: str, image: str
) -> None:
    with trio.fail_after(40):
        volume = await new_volume(api)
        for field in ("image", "install_image"):
            response = await api.post(
                "/containers", json=body(f"{prefix}-i", volume, **{field: image})
            )
            assert response.status_code == 400, response.text
            assert response.json()["error"] == f"Invalid image: {image}"


# --- 5. ports per container ------------------------------------------------------------


async def test_more_ports_than_max_ports_are_refused(start_node: StartNode, prefix: str) -> None:
    with trio.fail_after(60):
        node = await start_node({"containers": {"max_ports": 2}})
        async with api_client(node.url) as api:
            many = [{"container_port": 1000 + n, "protocol": "tcp"} for n in range(21)]
            volume = await new_volume(api)
            response = await api.post("/containers", json=body(f"{prefix}-p", volume, ports=many))
            assert response.status_code == 400, response.text
            assert response.json()["error"] == "Too many ports (max 2)"
            internal_id = f"{prefix}-q"
            await ready(api, internal_id)
            rebind = await api.post(
                f"/containers/{internal_id}/rebind-network", json={"ports": many[:3]}
            )
            assert rebind.status_code == 400, rebind.text
            assert rebind.json()["error"] == "Too many ports (max 2)"


async def test_max_ports_defaults_to_20(api: httpx.AsyncClient, prefix: str) -> None:
    with trio.fail_after(40):
        many = [{"container_port": 1000 + n, "protocol": "tcp"} for n in range(21)]
        volume = await new_volume(api)
        response = await api.post("/containers", json=body(f"{prefix}-p", volume, ports=many))
        assert response.status_code == 400
        assert response.json()["error"] == "Too many ports (max 20)"


# --- 6. capabilities -------------------------------------------------------------------


async def logs_until(
    engine: docker.DockerClient, name: str, marker: str, within: float = 30
) -> str:
    text = ""

    async def done() -> bool:
        nonlocal text
        raw = await trio.to_thread.run_sync(lambda: engine.containers.get(name).logs())
        text = raw.decode("utf-8", "replace")
        return marker in text

    await wait_for(done, within=within, what=f"{marker} in the logs of {name}")
    return text


async def test_capabilities_are_dropped_in_server_and_install_containers(
    api: httpx.AsyncClient,
    node: RunningAgent,
    prefix: str,
    engine: docker.DockerClient,
) -> None:
    probe = (
        "mknod /tmp/dev c 1 3 && echo MKNOD-OK || echo MKNOD-DENIED; "
        "ping -c 1 -W 1 127.0.0.1 >/dev/null 2>&1 && echo PING-OK || echo PING-DENIED; "
        "chown 1000:1000 /tmp && echo CHOWN-OK; echo PROBED"
    )
    with trio.fail_after(90):
        internal_id = f"{prefix}-cap"
        await ready(api, internal_id, startup_command=f"{probe}; sleep 3600", install_script=probe)
        host = await trio.to_thread.run_sync(
            lambda: engine.containers.get(f"lightd-{internal_id}").attrs["HostConfig"]
        )
        assert host["CapDrop"] == ["ALL"]
        assert set(host["CapAdd"]) == {
            "CHOWN",
            "SETUID",
            "SETGID",
            "DAC_OVERRIDE",
            "FOWNER",
            "KILL",
            "NET_BIND_SERVICE",
        }
        install_log = node.agent.paths.containers / internal_id / "install.log"
        install = await trio.Path(install_log).read_text()
        assert "MKNOD-DENIED" in install and "PING-DENIED" in install, install
        assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        text = await logs_until(engine, f"lightd-{internal_id}", "PROBED")
        assert "MKNOD-DENIED" in text and "PING-DENIED" in text and "CHOWN-OK" in text


# --- 7. the agent's own network --------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_containers_share_the_agents_network_yet_cannot_reach_each_other(
    api: httpx.AsyncClient, prefix: str, engine: docker.DockerClient
) -> None:
    with trio.fail_after(120):
        port = free_port()
        pool = await add_port(api, port)
        server = f"{prefix}-srv"
        await ready(api, server, startup_command=f"httpd -f -p {port} -h /tmp", ports=[pool])
        assert (await api.post(f"/containers/{server}/start")).status_code == 200
        await wait_state(api, server, state="running")
        info = await trio.to_thread.run_sync(
            lambda: engine.containers.get(f"lightd-{server}").attrs
        )
        networks = info["NetworkSettings"]["Networks"]
        assert list(networks) == [MADE.network]
        address = networks[MADE.network]["IPAddress"]
        net = await trio.to_thread.run_sync(lambda: engine.networks.get(MADE.network).attrs)
        assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"

        # Published ports work from the host (any HTTP answer: httpd serves an empty dir).
        async def published() -> bool:
            try:
                async with httpx.AsyncClient(timeout=2) as http:
                    await http.get(f"http://127.0.0.1:{port}/")
            except httpx.HTTPError:
                return False
            return True

        await wait_for(published, what="the published port to answer")

        client = f"{prefix}-cli"
        probe = (
            f"nc -w 3 {address} {port} </dev/null && echo REACHED || echo UNREACHABLE; "
            "echo PROBED; sleep 3600"
        )
        await ready(api, client, startup_command=probe)
        assert (await api.post(f"/containers/{client}/start")).status_code == 200
        text = await logs_until(engine, f"lightd-{client}", "PROBED")
        assert "UNREACHABLE" in text, text


async def test_a_container_cannot_reach_the_api_port_on_the_host(
    start_node: StartNode, prefix: str, engine: docker.DockerClient, nursery: trio.Nursery
) -> None:
    with trio.fail_after(120):
        node = await start_node({"server": {"host": "0.0.0.0"}})
        api_port = int(node.url.rsplit(":", 1)[1].rstrip("/"))
        # A control: another port on the host, listening the same way, stays reachable.
        # (nc, not wget: this busybox's wget crashes.)
        control = trio.socket.socket()
        await control.bind(("0.0.0.0", 0))
        control.listen()
        control_port = control.getsockname()[1]

        async def answer() -> None:
            with control:
                while True:
                    conn, _ = await control.accept()
                    with conn:
                        await conn.send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")

        nursery.start_soon(answer)
        async with api_client(node.url.replace("0.0.0.0", "127.0.0.1")) as api:
            internal_id = f"{prefix}-gw"
            gateway = "$(ip route | awk '/default/ {print $3}')"
            probe = (
                f"GW={gateway}; "
                f"nc -w 3 $GW {control_port} </dev/null && echo CONTROL-OK; "
                f"nc -w 3 $GW {api_port} </dev/null "
                "&& echo API-REACHED || echo API-UNREACHABLE; echo PROBED; sleep 3600"
            )
            await ready(api, internal_id, startup_command=probe)
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
            text = await logs_until(engine, f"lightd-{internal_id}", "PROBED")
            assert "CONTROL-OK" in text, text
            assert "API-UNREACHABLE" in text, text
            assert "API-REACHED" not in text


async def test_the_api_guard_rule_goes_with_the_agent(start_node: StartNode) -> None:
    """One rule per bridge and API port while the agent runs, none after it stopped."""

    async def rules() -> list[str]:
        listed = await trio.run_process(
            ["iptables", "-w", "-S", "LIGHTD-API"], capture_stdout=True, check=False
        )
        return [line for line in listed.stdout.decode().splitlines() if "--dport" in line]

    with trio.fail_after(60):
        node = await start_node()
        network = node.agent.stash[CONTAINERS].network

        async def guarded() -> bool:
            return bool(network.guarded)

        await wait_for(guarded, what="the API guard rule")
        [(interface, port)] = network.guarded
        rule = f"-A LIGHTD-API -i {interface} -p tcp -m tcp --dport {port} -j DROP"
        assert (await rules()).count(rule) == 1
        await node.stop()
        assert rule not in await rules()


# --- 8. mount sources ------------------------------------------------------------------


async def test_mount_sources_are_normalized_and_never_the_agents_storage(
    start_node: StartNode,
    containers_config: Callable[..., Path],
    prefix: str,
    tmp_path: Path,
) -> None:
    with trio.fail_after(60):
        shared = tmp_path / "shared"
        (shared / "data").mkdir(parents=True)
        path = containers_config({"docker": {"allowed_mounts": [str(tmp_path)]}}, name="mountnode")
        storage = path.parent / "storage"
        node = await start_node(path=path)
        async with api_client(node.url) as api:
            for source in (str(storage), str(path.parent), f"{storage}/containers/x"):
                volume = await new_volume(api)
                response = await api.post(
                    "/containers",
                    json=body(f"{prefix}-mt", volume, mount={"/data": source}),
                )
                assert response.status_code == 400, (source, response.text)
                assert response.json()["error"] == f"Mount not allowed: {source}"
            internal_id = f"{prefix}-mn"
            seen = await ready(api, internal_id, mount={"/data": f"{shared}/./x/../data/"})
            assert seen["mount"] == {"/data": f"{shared}/data"}


# --- 9. engine replies -----------------------------------------------------------------


async def fake_engine(
    sock_path: Path, answers: dict[str, tuple[int, bytes]], *, task_status: Any
) -> None:
    """An HTTP server on a unix socket answering by path (a broken engine, for the
    client's error handling only: nothing here stands in for a working engine)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(sock_path))
    sock.listen()

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                target = head.split(b" ")[1].decode().split("?")[0]
                version = b'{"Version":"0","ApiVersion":"1.41","Os":"linux","Arch":"x"}'
                status, content = (200, version) if target == "/version" else (200, b"OK")
                for suffix, answer in answers.items():
                    if target.endswith(suffix):
                        status, content = answer
                await stream.send_all(
                    b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, len(content), content)
                )

    await trio.serve_listeners(handle, [trio.SocketListener(sock)], task_status=task_status)


async def test_an_engine_reply_that_is_not_json_or_not_2xx_is_a_docker_error(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    sock = tmp_path / "engine.sock"
    answers = {
        "/containers/json": (200, b"<html>not json</html>"),
        "/images/json": (200, b'{"not": "a list"}'),
        "/containers/abc/json": (302, b""),
        "/info": (200, b"\xff\xfe"),
    }
    with trio.fail_after(40):
        await nursery.start(lambda task_status: fake_engine(sock, answers, task_status=task_status))
        docker_engine = DockerEngine(f"unix://{sock}")
        await nursery.start(docker_engine.serve)
        await docker_engine.wait_available()
        with pytest.raises(DockerError, match="not JSON"):
            await docker_engine.containers(["x=y"])
        with pytest.raises(DockerError, match="unexpected dict"):
            await docker_engine.images()
        with pytest.raises(DockerError, match="302"):
            await docker_engine.inspect_container("abc")
        with pytest.raises(DockerError, match="not JSON"):
            await docker_engine.system_info()
