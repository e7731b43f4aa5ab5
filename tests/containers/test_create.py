"""Contract §7.1 to §7.3: create, validate, install, read, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from lightd.api import FAST_READS
from lightd.containers import CONTAINERS

from ..conftest import TEST_IMAGE, RunningAgent, api_client, wait_for
from .conftest import add_port, create, docker_state, get, in_thread, new_volume, ready, wait_state


@pytest.mark.parametrize(
    ("change", "status", "message"),
    [
        ({"internal_id": "-bad"}, 400, "Invalid internal_id"),
        ({"internal_id": "a" * 65}, 400, "Invalid internal_id"),
        ({"internal_id": "has/slash"}, 400, "Invalid internal_id"),
        ({"internal_id": 7}, 400, "Invalid internal_id"),
        ({"internal_id": "events"}, 400, "Invalid internal_id"),  # /ws/events is taken
        ({"image": ""}, 400, "image: must not be empty"),
        ({"startup_command": " "}, 400, "startup_command: must not be empty"),
        ({"volume_id": "00000000-0000-4000-8000-000000000000"}, 404, "Volume not found"),
        ({"volume_id": "../etc"}, 404, "Volume not found"),
        ({"start_pattern": "(unclosed"}, 400, "Invalid start_pattern: "),
        ({"limits": {"memory": 1024}}, 400, "limits.memory: must be at least 6291456 bytes"),
        ({"limits": {"cpu": 0}}, 400, "limits.cpu: must be > 0"),
        ({"limits": {"cpu": "1"}}, 400, "limits.cpu: must be a number"),
        ({"mount": {"/data": "/etc"}}, 400, "Mount not allowed: /etc"),
        ({"mount": {"/etc/x": "/srv"}}, 400, "mount: container path not allowed: /etc/x"),
        ({"mount": {"relative": "/srv"}}, 400, "mount: container path must be absolute"),
        ({"ports": [{"ip": "127.0.0.1", "port": 1}]}, 400, "Port not found in network pool"),
        ({"ports": [{"ip": "127.0.0.1"}]}, 400, "ports: each entry needs ip and port"),
        ({"ports": [{"container_port": 25565, "protocol": "sctp"}]}, 400, "Invalid protocol: sctp"),
        ({"environment": {"BAD KEY": "x"}}, 400, "environment: keys must be shell variable names"),
    ],
)
async def test_create_validates_every_field(
    api: httpx.AsyncClient, prefix: str, change: dict[str, Any], status: int, message: str
) -> None:
    body = {"internal_id": f"{prefix}-v", **change}
    response = await create(api, **body)
    assert response.status_code == status, response.text
    assert response.json()["error"].startswith(message)
    assert (await api.get("/containers")).json()["containers"] == []


async def test_missing_required_fields_are_named(api: httpx.AsyncClient) -> None:
    response = await api.post("/containers", json={"internal_id": "x1", "image": TEST_IMAGE})
    assert response.status_code == 400
    assert response.json()["error"] == "volume_id: is required"


async def test_create_installs_and_maps_to_docker(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-srv"
    volume = await new_volume(api)
    port = await add_port(api, 30001)
    response = await create(
        api,
        internal_id,
        volume_id=volume,
        ports=[port],
        limits={"memory": 64 * 1024 * 1024, "cpu": 0.5, "pids": 64},
        environment={"EULA": "true"},
    )
    assert response.status_code == 200
    assert response.json() == {
        "message": "Container creation started",
        "internal_id": internal_id,
        "state": "installing",
    }
    body = await wait_state(api, internal_id, install_state="ready")
    assert body["state"] == "offline"
    assert body["volume_id"] == volume
    assert body["image"] == TEST_IMAGE
    assert body["ports"][0] | {"container_port": 30001} == {**port, "container_port": 30001}
    container = await in_thread(lambda: engine.containers.get(body["container_id"]))
    attrs = container.attrs
    assert container.name == f"lightd-{internal_id}"
    assert container.status == "created"  # installed, not started
    assert attrs["Config"]["Labels"]["lightd.managed"] == "true"
    assert attrs["Config"]["Labels"]["lightd.internal_id"] == internal_id
    assert attrs["Config"]["WorkingDir"] == "/home/container"
    assert attrs["Config"]["OpenStdin"] is True and attrs["Config"]["StdinOnce"] is False
    host = attrs["HostConfig"]
    assert host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == 64 * 1024 * 1024 and host["NanoCpus"] == 500_000_000
    assert host["PidsLimit"] == 64
    assert host["PortBindings"]["30001/tcp"] == [{"HostIp": "127.0.0.1", "HostPort": "30001"}]
    binds = {m["Destination"]: m for m in attrs["Mounts"]}
    assert binds["/home/container"]["Source"] == str(node.agent.paths.volumes / volume)
    assert binds["/app/data"]["RW"] is False
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert env["SERVER_IP"] == "127.0.0.1" and env["SERVER_PORT"] == "30001"
    assert env["SERVER_MEMORY"] == "64" and env["EULA"] == "true"
    assert env["STARTUP"] == "echo ready; sleep 3600"


async def test_duplicate_internal_id_is_409(api: httpx.AsyncClient, prefix: str) -> None:
    await ready(api, f"{prefix}-dup")
    response = await create(api, f"{prefix}-dup")
    assert response.status_code == 409
    assert response.json()["error"] == "Container already exists"


async def test_port_held_by_another_container_is_409(api: httpx.AsyncClient, prefix: str) -> None:
    port = await add_port(api, 30002)
    await ready(api, f"{prefix}-a", ports=[port])
    response = await create(api, f"{prefix}-b", ports=[port])
    assert response.status_code == 409
    assert response.json()["error"] == "Port already in use: 127.0.0.1:30002"


async def test_alias_port_form_takes_a_free_pool_port(api: httpx.AsyncClient, prefix: str) -> None:
    await add_port(api, 30003)
    body = await ready(api, f"{prefix}-alias", ports=[{"container_port": 25565, "protocol": "tcp"}])
    assert body["ports"] == [
        {"ip": "127.0.0.1", "port": 30003, "protocol": "tcp", "container_port": 25565}
    ]
    pool = (await api.get("/network/ports/127.0.0.1/30003")).json()
    assert pool["in_use"] is True and pool["container"] == f"{prefix}-alias"


async def test_install_script_runs_in_a_container_with_its_output_kept(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-inst"
    script = "echo installing as $(id -u) in $(pwd)\necho data > /home/container/made-by-install\n"
    await ready(api, internal_id, install_script=script)
    log = (await api.get(f"/containers/{internal_id}/install-log")).json()["log"]
    assert "installing as 0 in /home/container" in log
    volume = (await get(api, internal_id))["volume_id"]
    assert (node.agent.paths.volumes / volume / "made-by-install").read_text() == "data\n"


async def test_install_script_shebang_is_honoured(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-bang"
    # /bin/cat as the interpreter prints the script itself: proof it was not run by sh.
    await ready(api, internal_id, install_script="#!/bin/cat\nnot a shell command\n")
    log = (await api.get(f"/containers/{internal_id}/install-log")).json()["log"]
    assert "#!/bin/cat\nnot a shell command\n" in log


async def test_failing_install_script_fails_the_install(
    api: httpx.AsyncClient, prefix: str
) -> None:
    internal_id = f"{prefix}-fail"
    response = await create(api, internal_id, install_script="echo oops\nexit 3\n")
    assert response.status_code == 200
    body = await wait_state(api, internal_id, install_state="failed")
    assert body["error"] == "Install script failed with exit code 3"
    start = await api.post(f"/containers/{internal_id}/start")
    assert start.status_code == 409
    assert start.json()["error"] == "Container is not ready"


async def test_install_timeout(start_node: Any, prefix: str) -> None:
    from ..conftest import api_client

    node = await start_node({"containers": {"install_timeout": 1}})
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-slow"
        await create(api, internal_id, install_script="sleep 60\n")
        body = await wait_state(api, internal_id, install_state="failed")
        assert body["error"] == "Install script timed out"
        await api.delete(f"/containers/{internal_id}")


async def test_missing_image_fails_the_install(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-noimg"
    response = await create(api, internal_id, image="lightd/does-not-exist:1")
    assert response.status_code == 200
    body = await wait_state(api, internal_id, install_state="failed")
    assert body["error"].startswith("Failed to pull image lightd/does-not-exist:1: ")


async def test_delete_removes_everything_but_the_volume(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-del"
    port = await add_port(api, 30004)
    body = await ready(api, internal_id, ports=[port])
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")
    response = await api.delete(f"/containers/{internal_id}")
    assert response.status_code == 200
    assert response.json() == {"message": "Container deleted successfully"}
    assert (await api.get(f"/containers/{internal_id}")).status_code == 404
    assert await in_thread(lambda: docker_state(engine, internal_id)) is None
    assert (await api.get("/network/ports/127.0.0.1/30004")).json()["in_use"] is False
    assert not (node.agent.paths.containers / internal_id).exists()
    assert (node.agent.paths.volumes / body["volume_id"]).is_dir()
    assert (await api.delete(f"/containers/{internal_id}")).status_code == 404


async def test_delete_during_install_cancels_it(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-delinst"
    await create(api, internal_id, install_script="echo started; sleep 60\n")

    def install_container_running() -> bool:
        found = engine.containers.list(filters={"label": [f"lightd.internal_id={internal_id}"]})
        return bool(found)

    from ..conftest import wait_for

    async def running() -> bool:
        return await in_thread(install_container_running)

    await wait_for(running, what="the install container to run")
    assert (await api.delete(f"/containers/{internal_id}")).status_code == 200
    left = await in_thread(
        lambda: engine.containers.list(
            all=True, filters={"label": [f"lightd.internal_id={internal_id}"]}
        )
    )
    assert left == []


async def test_list_and_restricted_tokens(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    from ..conftest import api_client

    await ready(api, f"{prefix}-one")
    await ready(api, f"{prefix}-two")
    listed = (await api.get("/containers")).json()["containers"]
    assert [c["internal_id"] for c in listed] == [f"{prefix}-one", f"{prefix}-two"]
    assert set(listed[0]) >= {
        "internal_id",
        "container_id",
        "install_state",
        "image",
        "ports",
        "state",
    }
    token = (
        await api.post("/auth/tokens", json={"ttl": "5m", "containers": [f"{prefix}-two"]})
    ).json()["token"]
    async with api_client(node.url, token=token) as restricted:
        mine = (await restricted.get("/containers")).json()["containers"]
        assert [c["internal_id"] for c in mine] == [f"{prefix}-two"]
        assert (await restricted.get(f"/containers/{prefix}-one")).status_code == 401
        assert (await restricted.get(f"/containers/{prefix}-two")).status_code == 200


async def test_get_answers_alike_on_the_fast_path_and_through_quart(
    api_node: tuple[httpx.AsyncClient, RunningAgent], prefix: str
) -> None:
    """The master token's plain GET is answered in front of Quart (``agent.api.fastpath``);
    a temporary token's goes through Quart. Both must send the same bytes and headers."""
    api, node = api_node
    await ready(api, f"{prefix}-a")
    readers = node.agent.stash[FAST_READS]
    reader = readers["/containers/"]
    answered: list[str] = []

    def counting(internal_id: str) -> dict[str, Any] | None:
        found = reader(internal_id)
        if found is not None:
            answered.append(internal_id)
        return found

    readers["/containers/"] = counting
    token = (await api.post("/auth/tokens", json={"ttl": "5m"})).json()["token"]
    fast = await api.get(f"/containers/{prefix}-a")
    fast_list = await api.get("/containers")
    assert answered == [f"{prefix}-a"]
    async with api_client(node.url, token=token) as other:
        slow = await other.get(f"/containers/{prefix}-a")
        slow_list = await other.get("/containers")
    assert answered == [f"{prefix}-a"]  # the temporary token went through Quart
    assert fast.status_code == slow.status_code == fast_list.status_code == 200
    assert fast.content == slow.content
    assert fast_list.content == slow_list.content
    assert fast.json()["install_state"] == "ready"
    assert [c["internal_id"] for c in fast_list.json()["containers"]] == [f"{prefix}-a"]

    def headers(response: httpx.Response) -> dict[str, str]:
        # The temporary token is rate limited (§17), the master token is not by default.
        return {
            k: v
            for k, v in response.headers.items()
            if k != "date" and not k.startswith("x-ratelimit-")
        }

    assert headers(fast) == headers(slow)
    assert headers(fast_list) == headers(slow_list)
    # The fast path keeps the encoded body until something in it changes.
    assert (await api.post(f"/containers/{prefix}-a/start")).status_code == 200
    running = await wait_state(api, f"{prefix}-a", state="running")
    assert running["started_at"] is not None
    async with api_client(node.url, token=token) as other:
        assert (await other.get(f"/containers/{prefix}-a")).json() == running


async def test_unknown_container_is_404(api: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/containers/nope"),
        ("DELETE", "/containers/nope"),
        ("POST", "/containers/nope/start"),
        ("POST", "/containers/nope/kill"),
        ("POST", "/containers/nope/reinstall"),
    ]:
        response = await api.request(method, path)
        assert response.status_code == 404, path
        assert response.json()["error"] == "Container not found"


class _WatchInstalls:
    """A plugin that sees every install-script run and lets the built-in runner do it."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []

    @__import__("lightd").hookimpl(tryfirst=True)
    def lightd_run_install_script(self, agent: Any, job: Any) -> None:
        self.jobs.append(job)


async def test_hook_lightd_run_install_script(start_node: Any, prefix: str) -> None:
    from ..conftest import api_client

    watcher = _WatchInstalls()
    node = await start_node(extra=(("watch", watcher),))
    async with api_client(node.url) as api:
        await ready(api, f"{prefix}-hook", install_script="echo hooked\n")
    (job,) = watcher.jobs
    assert job.internal_id == f"{prefix}-hook"
    assert job.script == "echo hooked\n"
    assert job.image == TEST_IMAGE
    assert job.script_path == "/app/data/install.sh"
    assert {m.target for m in job.mounts} >= {"/home/container", "/app/data"}
    log = node.agent.stash[CONTAINERS].install_log(f"{prefix}-hook")
    assert log.read_text() == "hooked\n"


async def test_servers_cli_lists_containers_five_per_page(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str, docker_host: str
) -> None:
    import os
    import subprocess
    import sys

    for n in range(6):
        await ready(api, f"{prefix}-{n}", limits={"memory": 64 * 1024 * 1024, "cpu": 1})
    await api.post(f"/containers/{prefix}-5/start")
    await wait_state(api, f"{prefix}-5", state="running")

    def servers(*page: str) -> str:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lightd",
                "--config",
                str(node.agent.config_path),
                "--servers",
                *page,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "DOCKER_HOST": docker_host},
            check=True,
        )
        return result.stdout

    first = await in_thread(servers)
    assert first.splitlines()[0].split() == ["ID", "STATE", "IMAGE", "PORTS", "LIMITS"]
    assert f"{prefix}-0 " in first and f"{prefix}-5" not in first
    assert "Page 1 of 2 (6 containers)" in first
    second = await in_thread(lambda: servers("2"))
    row = next(line for line in second.splitlines() if line.startswith(f"{prefix}-5"))
    assert "running" in row and "64 MiB, 1 CPU" in row
    assert "Page 2 of 2" in await in_thread(lambda: servers("9"))  # clamped to the last


async def test_mounts_only_inside_allowed_folders_and_never_through_links(
    start_node: Any, engine: docker.DockerClient, prefix: str, tmp_path: Path
) -> None:
    from ..conftest import api_client

    shared = tmp_path / "shared"
    (shared / "maps").mkdir(parents=True)
    (shared / "maps" / "world.txt").write_text("map")
    (shared / "escape").symlink_to("/etc")
    (shared / "inner").symlink_to(shared / "maps")
    node = await start_node({"docker": {"allowed_mounts": [str(shared)]}})
    async with api_client(node.url) as api:
        for source in (
            "/etc",
            str(shared / "escape"),
            str(shared / "escape" / "passwd"),
            str(shared / "inner"),  # a link, even one that stays inside
            str(shared / "missing"),
            str(shared / ".." / "shared-other"),
            "relative/path",
        ):
            response = await create(api, f"{prefix}-m", mount={"/data": source})
            assert response.status_code == 400, source
            assert response.json()["error"] == f"Mount not allowed: {source}"
        body = await ready(api, f"{prefix}-m", mount={"/maps": str(shared / "maps")})
        assert body["mount"] == {"/maps": str(shared / "maps")}
        binds = await in_thread(
            lambda: {
                m["Destination"]: m["Source"]
                for m in engine.containers.get(body["container_id"]).attrs["Mounts"]
            }
        )
        assert binds["/maps"] == str(shared / "maps")


async def test_volume_id_is_stored_as_the_registry_spells_it(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    volume = await new_volume(api)
    body = await ready(api, f"{prefix}-case", volume_id=volume.upper())
    assert body["volume_id"] == volume
    binds = await in_thread(
        lambda: {
            m["Destination"]: m["Source"]
            for m in engine.containers.get(body["container_id"]).attrs["Mounts"]
        }
    )
    assert binds["/home/container"] == str(node.agent.paths.volumes / volume)
    refused = await api.delete(f"/volumes/{volume}")
    assert refused.status_code == 409
    assert refused.json()["error"] == f"Volume is in use by container {prefix}-case"


async def test_a_volume_is_never_deleted_under_a_container_being_created(
    api: httpx.AsyncClient, prefix: str
) -> None:
    import trio

    async def make(volume: str, internal_id: str, results: dict[str, int]) -> None:
        results["create"] = (await create(api, internal_id, volume_id=volume)).status_code

    async def drop(volume: str, results: dict[str, int]) -> None:
        results["delete"] = (await api.delete(f"/volumes/{volume}")).status_code

    for n in range(15):
        volume = await new_volume(api)
        results: dict[str, int] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(make, volume, f"{prefix}-r{n}", results)
            nursery.start_soon(drop, volume, results)
        # Either the create claimed the volume first (the delete is refused), or the
        # delete won (the create finds no volume): never both answered 200.
        assert sorted(results.values()) in ([200, 409], [200, 404]), results
        if results["create"] == 200:
            # Its install goes on after the answer: let it end before the test does, or
            # its Docker container is made after the fixture's clean-up.
            await wait_state(api, f"{prefix}-r{n}", install_state="ready")


async def test_a_mount_swapped_for_a_link_after_install_is_refused_at_start(
    start_node: Any, engine: docker.DockerClient, prefix: str, tmp_path: Path
) -> None:
    from ..conftest import api_client

    shared = tmp_path / "shared"
    (shared / "maps").mkdir(parents=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    node = await start_node({"docker": {"allowed_mounts": [str(shared)]}})
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-swap"
        await ready(api, internal_id, mount={"/maps": str(shared / "maps")})
        (shared / "maps").rmdir()
        (shared / "maps").symlink_to(secret)  # what a container with the root mounted could do
        assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
        supervisor = node.agent.stash[CONTAINERS].get(internal_id)

        async def settled() -> bool:
            return supervisor.idle

        await wait_for(settled, what="the start to be refused")
        assert (await get(api, internal_id))["state"] == "offline"
        assert await in_thread(lambda: docker_state(engine, internal_id)) == "created"
