"""Contract §7.4 to §7.5: power actions, the runtime state machine, crashes, reinstall, rebind."""

from __future__ import annotations

from typing import Any

import docker
import httpx
import trio
from lightd.containers import CONTAINERS

from ..conftest import RunningAgent, wait_for
from .conftest import add_port, docker_state, get, in_thread, ready, wait_state


async def post(
    api: httpx.AsyncClient, internal_id: str, action: str, **body: Any
) -> httpx.Response:
    return await api.post(f"/containers/{internal_id}/{action}", json=body or None)


def messages_of(node: RunningAgent, internal_id: str) -> Any:
    """Subscribe to a container's hub (what WebSocket clients will see)."""
    return node.agent.stash[CONTAINERS].get(internal_id).hub.subscribe(size=10_000)


def drain(subscription: Any) -> list[dict[str, Any]]:
    frames = []
    while True:
        try:
            frames.append(subscription.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return frames


async def wait_frame(
    subscription: Any, frame: dict[str, Any], within: float = 20
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    with trio.fail_after(within):
        while True:
            got = await subscription.receive()
            seen.append(got)
            if all(got.get(k) == v for k, v in frame.items()):
                return seen


async def test_start_runs_the_server_and_kill_stops_it(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-p"
    await ready(api, internal_id)
    with messages_of(node, internal_id) as sub:
        response = await post(api, internal_id, "start")
        assert response.status_code == 200
        assert response.json() == {
            "message": "Container start initiated",
            "internal_id": internal_id,
        }
        body = await wait_state(api, internal_id, state="running")
        assert body["started_at"]
        await wait_frame(sub, {"event": "console", "data": "ready\n"})
        assert await in_thread(lambda: docker_state(engine, internal_id)) == "running"
        again = await post(api, internal_id, "start")
        assert again.status_code == 409
        assert again.json()["error"] == "Container is already running"
        kill = await post(api, internal_id, "kill")
        assert kill.json() == {"message": "Container kill initiated", "internal_id": internal_id}
        await wait_state(api, internal_id, state="offline")
        frames = await wait_frame(sub, {"event": "daemon_message", "data": "Container stopped"})
        assert not any("crashed" in str(f.get("data")) for f in frames)
    assert await in_thread(lambda: docker_state(engine, internal_id)) == "exited"
    not_running = await post(api, internal_id, "kill")
    assert not_running.status_code == 409
    assert not_running.json()["error"] == "Container is not running"


async def test_start_pattern_decides_running(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-pat"
    await ready(
        api,
        internal_id,
        startup_command="echo booting; read go; echo Done in 1s; sleep 3600",
        start_pattern=r"Done in \d+s",
    )
    with messages_of(node, internal_id) as sub:
        await post(api, internal_id, "start")
        await wait_frame(sub, {"event": "console", "data": "booting\n"})
        assert (await get(api, internal_id))["state"] == "starting"
        await node.agent.stash[CONTAINERS].get(internal_id).send_command("go")
        await wait_frame(sub, {"event": "daemon_message", "data": "Server started"})
    assert (await get(api, internal_id))["state"] == "running"


async def test_crash_is_told_apart_from_a_stop(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-crash"
    await ready(api, internal_id, startup_command="read x; exit 3")
    with messages_of(node, internal_id) as sub:
        await post(api, internal_id, "start")
        await wait_state(api, internal_id, state="running")
        await node.agent.stash[CONTAINERS].get(internal_id).send_command("bye")
        await wait_frame(
            sub, {"event": "daemon_message", "data": "Container crashed (exit code 3)"}
        )
    body = await wait_state(api, internal_id, state="offline")
    assert body["exit_code"] == 3


async def test_stop_uses_the_stop_command(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-stop"
    await ready(
        api,
        internal_id,
        startup_command='while read line; do [ "$line" = stop ] && exit 0; done',
        stop_command="stop",
    )
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    with messages_of(node, internal_id) as sub:
        response = await post(api, internal_id, "stop")
        assert response.json() == {
            "message": "Container stop initiated",
            "internal_id": internal_id,
        }
        frames = await wait_frame(sub, {"event": "daemon_message", "data": "Container stopped"})
    assert {"event": "event", "data": "stopping"} in frames
    body = await wait_state(api, internal_id, state="offline")
    assert body["exit_code"] == 0


async def test_stop_escalates_to_sigkill(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-stubborn"
    # Ignores SIGTERM (sh as PID 1 ignores it anyway) and never reads stdin.
    await ready(api, internal_id, startup_command="trap '' TERM; sleep 3600 & wait")
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    await post(api, internal_id, "stop", timeout=0.5)
    body = await wait_state(api, internal_id, state="offline")
    assert body["exit_code"] == 137


async def test_restart(api: httpx.AsyncClient, node: RunningAgent, prefix: str) -> None:
    internal_id = f"{prefix}-rs"
    await ready(api, internal_id)
    await post(api, internal_id, "start")
    first = await wait_state(api, internal_id, state="running")
    with messages_of(node, internal_id) as sub:
        response = await post(api, internal_id, "restart")
        assert response.json() == {
            "message": "Container restart initiated",
            "internal_id": internal_id,
        }
        await wait_frame(sub, {"event": "daemon_message", "data": "Container restarted"})
    second = await wait_state(api, internal_id, state="running")
    assert second["started_at"] >= first["started_at"]


async def until_idle(node: RunningAgent, internal_id: str) -> None:
    """Every accepted request has been carried out (the outcome can be judged now)."""
    supervisor = node.agent.stash[CONTAINERS].get(internal_id)

    async def idle() -> bool:
        return supervisor.idle

    await wait_for(idle, within=30, what=f"{internal_id}'s queue to drain")


async def test_kill_during_start_ends_offline(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-ks"
    await ready(api, internal_id)
    assert (await post(api, internal_id, "start")).status_code == 200
    assert (await post(api, internal_id, "kill")).status_code == 200
    await until_idle(node, internal_id)
    await wait_state(api, internal_id, state="offline")

    async def settled() -> bool:
        return await in_thread(lambda: docker_state(engine, internal_id)) in ("exited", "created")

    await wait_for(settled, what="Docker to agree the server is down")
    # And nothing restarts it behind our back.
    assert (await get(api, internal_id))["state"] == "offline"


async def test_rapid_alternating_start_kill(
    api: httpx.AsyncClient, node: RunningAgent, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-rapid"
    await ready(api, internal_id)
    statuses = []
    for n in range(10):
        response = await post(api, internal_id, "start" if n % 2 == 0 else "kill")
        statuses.append(response.status_code)
    assert statuses == [200] * 10  # each accepted against the projected state
    await until_idle(node, internal_id)
    body = await wait_state(api, internal_id, state="offline")

    async def docker_agrees() -> bool:
        return await in_thread(lambda: docker_state(engine, internal_id)) in ("exited", "created")

    await wait_for(docker_agrees, what="Docker to match the final state")
    assert body["state"] == "offline"


async def test_crash_restart_policy(start_node: Any, prefix: str) -> None:
    from ..conftest import api_client

    node = await start_node({"containers": {"crash_restart": {"enabled": True, "max_restarts": 2}}})
    async with api_client(node.url) as api:
        internal_id = f"{prefix}-cr"
        await ready(api, internal_id, startup_command="echo up; exit 1")
        with messages_of(node, internal_id) as sub:
            await post(api, internal_id, "start")
            await wait_frame(sub, {"data": "Crash restart limit reached; not restarting"})
            frames = drain(sub)
        crashes = [f for f in frames if "crashed" in str(f.get("data"))]
        assert len(crashes) <= 1  # the rest were seen before the limit message
        await wait_state(api, internal_id, state="offline")
        await api.delete(f"/containers/{internal_id}")


async def test_reinstall_keeps_the_volume_and_changes_the_image(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-re"
    body = await ready(api, internal_id, install_script="echo one > /home/container/a\n")
    (node.agent.paths.volumes / body["volume_id"] / "keep.txt").write_text("mine")
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    response = await post(
        api, internal_id, "reinstall", install_script="echo two > /home/container/b\n"
    )
    assert response.json() == {"message": "Container reinstall started", "internal_id": internal_id}
    again = await post(api, internal_id, "reinstall")
    assert again.status_code == 409
    assert again.json()["error"] == "Container is already being installed"

    async def reinstalled() -> bool:
        now = await get(api, internal_id)
        return now["install_state"] == "ready" and now["container_id"] != body["container_id"]

    await wait_for(reinstalled, within=30, what="the reinstall to finish")
    after = await get(api, internal_id)
    assert after["state"] == "offline"
    volume = node.agent.paths.volumes / body["volume_id"]
    assert (volume / "keep.txt").read_text() == "mine"
    assert (volume / "b").read_text() == "two\n"


async def test_rebind_while_running(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-rb"
    old = await add_port(api, 30010)
    new = await add_port(api, 30011)
    await ready(api, internal_id, ports=[old])
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    response = await post(api, internal_id, "rebind-network", ports=[new])
    assert response.json() == {"message": "Network rebinding started", "internal_id": internal_id}

    async def rebound() -> bool:
        body = await get(api, internal_id)
        return body["state"] == "running" and body["ports"][0]["port"] == 30011

    await wait_for(rebound, within=30, what="the rebind to finish")
    assert (await api.get("/network/ports/127.0.0.1/30010")).json()["in_use"] is False
    held = (await api.get("/network/ports/127.0.0.1/30011")).json()
    assert held["container"] == internal_id
    container = await in_thread(
        lambda: engine.containers.list(filters={"label": [f"lightd.internal_id={internal_id}"]})[0]
    )
    assert "30011/tcp" in container.attrs["HostConfig"]["PortBindings"]


async def test_rebind_to_a_taken_port_changes_nothing(api: httpx.AsyncClient, prefix: str) -> None:
    mine = await add_port(api, 30012)
    theirs = await add_port(api, 30013)
    await ready(api, f"{prefix}-x", ports=[theirs])
    await ready(api, f"{prefix}-y", ports=[mine])
    response = await post(api, f"{prefix}-y", "rebind-network", ports=[theirs])
    assert response.status_code == 409
    assert response.json()["error"] == "Port already in use: 127.0.0.1:30013"
    assert (await get(api, f"{prefix}-y"))["ports"][0]["port"] == 30012


async def test_conflicts_while_installing(api: httpx.AsyncClient, prefix: str) -> None:
    from .conftest import create

    internal_id = f"{prefix}-busy"
    await create(api, internal_id, install_script="sleep 3\n")
    start = await post(api, internal_id, "start")
    assert (start.status_code, start.json()["error"]) == (409, "Container is not ready")
    rebind = await post(api, internal_id, "rebind-network", ports=[])
    assert rebind.status_code == 409
    assert rebind.json()["error"] == "Cannot rebind network while container is installing"
    reinstall = await post(api, internal_id, "reinstall")
    assert reinstall.json()["error"] == "Container is already being installed"
    await wait_state(api, internal_id, install_state="ready")


async def test_a_kill_cuts_a_stop_short(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-kstop"
    await ready(api, internal_id, startup_command="trap '' TERM; sleep 3600 & wait")
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    await post(api, internal_id, "stop", timeout=60)
    await wait_state(api, internal_id, state="stopping")
    kill = await post(api, internal_id, "kill")
    assert kill.status_code == 200, kill.text  # stopping is not offline: a kill is taken
    body = await wait_state(api, internal_id, state="offline", within=15)
    assert body["exit_code"] == 137


async def test_a_stop_is_not_held_by_a_server_that_never_reads_stdin(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    from lightd.errors import Conflict

    internal_id = f"{prefix}-deaf"
    await ready(api, internal_id, startup_command="sleep 3600", stop_command="stop")
    await post(api, internal_id, "start")
    await wait_state(api, internal_id, state="running")
    supervisor = node.agent.stash[CONTAINERS].get(internal_id)

    async def flood() -> None:
        try:
            for _ in range(200):  # far more than the pipe and socket buffers hold
                await supervisor.send_command("x" * 30_000)
        except Conflict:
            pass  # the container went away under the writes

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked(0.2)
        await post(api, internal_id, "stop", timeout=1)
        body = await wait_state(api, internal_id, state="offline", within=20)
        nursery.cancel_scope.cancel()
    assert body["exit_code"] == 137


async def test_a_second_rebind_waits_for_the_first(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-rb2"
    first, second, third = [await add_port(api, p) for p in (30040, 30041, 30042)]
    await ready(api, internal_id, ports=[first])
    one = await post(api, internal_id, "rebind-network", ports=[second])
    two = await post(api, internal_id, "rebind-network", ports=[third])
    assert one.status_code == 200
    if two.status_code == 200:  # the first had already finished: fine, they ran in turn
        await wait_for(
            lambda: _port_is(api, internal_id, 30042), within=30, what="the second rebind"
        )
    else:
        assert two.status_code == 409
        assert two.json()["error"] == "Network rebinding already in progress"
        await wait_for(
            lambda: _port_is(api, internal_id, 30041), within=30, what="the first rebind"
        )
    assert (await api.get("/network/ports/127.0.0.1/30040")).json()["in_use"] is False
    await until_idle(node, internal_id)


async def _port_is(api: httpx.AsyncClient, internal_id: str, port: int) -> bool:
    return (await get(api, internal_id))["ports"][0]["port"] == port
