"""Attack suite, tokens (contract §8, §12) with real containers and real WebSockets:
permissions per frame, revocation and rotation closing live sockets, the per-token socket
cap, protocol keep-alive, and a malformed frame on an offline container.

Each test fails on the agent before issue 12 (a scoped token could delete or reinstall
its container; nothing closed a socket but expiry; no keep-alive, no per-token cap).
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
from lightd.containers import CONTAINERS

from ..conftest import MASTER, RunningAgent, api_client, wait_for
from ..containers import conftest as fixtures
from ..containers.conftest import StartNode, get, ready, wait_state
from ..containers.test_websocket import SHELL, Client, Frame

# The container fixtures (tests/containers/conftest.py), for this folder's tests.
engine = fixtures.engine
prefix = fixtures.prefix
containers_config = fixtures.containers_config
start_node = fixtures.start_node
node = fixtures.node
api = fixtures.api

OTHER_MASTER = "lightd_" + "fedcba9876543210" * 2


def message(text: str) -> Frame:
    return {"event": "daemon_message", "data": text}


@pytest.fixture
def connect(ws_connect: Callable[..., Any]) -> Callable[..., Any]:
    @asynccontextmanager
    async def open_client(
        node: RunningAgent, internal_id: str, token: str = MASTER
    ) -> AsyncIterator[Client]:
        path = f"/ws/{internal_id}?token={token}"
        async with ws_connect(node.url, path, disconnect_timeout=5) as ws:
            yield Client(ws)

    return open_client


async def mint(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_read_only_token_cannot_delete_reinstall_or_power_its_container(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-ro"
    await ready(api, internal_id)
    token = (await mint(api, containers=[internal_id], permissions=["read"]))["token"]
    async with api_client(node.url, token=token) as c:
        assert (await c.get(f"/containers/{internal_id}")).status_code == 200
        listed = (await c.get("/containers")).json()["containers"]
        assert [x["internal_id"] for x in listed] == [internal_id]
        for response in (
            await c.delete(f"/containers/{internal_id}"),
            await c.post(f"/containers/{internal_id}/reinstall", json={"image": "alpine:latest"}),
            await c.post(f"/containers/{internal_id}/rebind-network", json={"ports": []}),
        ):
            assert response.status_code == 403, response.text
            assert response.json()["error"] == "Token lacks permission: manage"
        response = await c.post(f"/containers/{internal_id}/start")
        assert response.json()["error"] == "Token lacks permission: power"
    seen = await get(api, internal_id)
    assert seen["install_state"] == "ready" and seen["state"] == "offline"


async def test_a_container_token_reaches_its_containers_volume_only(
    api: httpx.AsyncClient, node: RunningAgent, prefix: str
) -> None:
    internal_id = f"{prefix}-vol"
    await ready(api, internal_id)
    volume = (await get(api, internal_id))["volume_id"]
    other = (await api.post("/volumes")).json()["volume_id"]
    files = (await mint(api, containers=[internal_id], permissions=["files"]))["token"]
    read = (await mint(api, containers=[internal_id], permissions=["read"]))["token"]
    async with api_client(node.url, token=files) as c:
        assert (await c.get(f"/volumes/{volume}/files")).status_code == 200
        assert (await c.get(f"/volumes/{other}/files")).status_code == 401
        assert (await c.get(f"/containers/{internal_id}")).status_code == 403  # no read
    async with api_client(node.url, token=read) as c:
        response = await c.get(f"/volumes/{volume}/files")
        assert response.status_code == 403
        assert response.json()["error"] == "Token lacks permission: files"


async def test_frames_outside_the_permissions_are_refused_and_the_socket_stays_open(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-perm"
    await ready(api, internal_id, startup_command=SHELL)
    token = (await mint(api, containers=[internal_id], permissions=["read"]))["token"]
    async with connect(node, internal_id, token) as client:
        assert (await client.next())["event"] == "status"
        await client.send(event="send_command", command="echo hi")
        await client.until(lambda f: f == message("Error: Token lacks permission: console"))
        await client.send(event="power", action="start")
        await client.until(lambda f: f == message("Error: Token lacks permission: power"))
        await client.send(power=["start"])  # the [alias] form too
        await client.until(lambda f: f == message("Error: Token lacks permission: power"))
        await client.send(event="request_logs")
        await client.until(lambda f: f["event"] == "logs")
    assert (await get(api, internal_id))["state"] == "offline"


async def test_a_token_without_read_gets_only_replies_to_its_own_frames(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-noread"
    await ready(api, internal_id, startup_command=SHELL)
    token = (await mint(api, containers=[internal_id], permissions=["power", "console"]))["token"]
    async with connect(node, internal_id, token) as client:
        await client.send(event="request_logs")
        # no status frame on connect: the first frame is the reply
        assert await client.next() == message("Error: Token lacks permission: read")
        await client.send(event="power", action="start")
        await wait_state(api, internal_id, state="running")
        await client.send(event="send_command", command="echo secret-output")
        await client.send(event="request_logs")
        # the running/started events and the console output never arrive; only the reply
        assert await client.next() == message("Error: Token lacks permission: read")
    await api.post(f"/containers/{internal_id}/kill")


async def test_revocation_closes_a_live_socket_with_4001_within_a_second(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-rev"
    await ready(api, internal_id)
    body = await mint(api, containers=[internal_id])
    other = await mint(api, containers=[internal_id])
    async with (
        connect(node, internal_id, body["token"]) as client,
        connect(node, internal_id, other["token"]) as bystander,
    ):
        await client.next()
        await bystander.next()
        response = await api.delete(f"/auth/tokens/{body['id']}")
        assert response.status_code == 200, response.text
        with trio.fail_after(1):
            assert await client.next() == message("Token revoked")
            assert await client.closed() == 4001
        await bystander.send(event="request_logs")
        assert (await bystander.next())["event"] == "logs"


async def test_a_single_use_token_on_a_socket_can_still_be_revoked(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-once"
    await ready(api, internal_id)
    once = await mint(api, remove_on_use=True, containers=[internal_id])
    async with connect(node, internal_id, once["token"]) as client:
        await client.next()
        response = await api.post("/auth/tokens/revoke", json={"containers": [internal_id]})
        assert response.status_code == 200, response.text
        with trio.fail_after(1):
            assert await client.next() == message("Token revoked")
            assert await client.closed() == 4001


async def test_a_new_master_token_closes_sockets_of_the_old_ones_tokens(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-rot"
    await ready(api, internal_id)
    token = (await mint(api))["token"]
    path = trio.Path(node.agent.config_path)
    async with connect(node, internal_id, token) as client:
        await client.next()
        raw = json.loads(await path.read_text())
        raw["authorization"]["token"] = OTHER_MASTER
        await path.write_text(json.dumps(raw))
        assert (await api.post("/remote/config/reload")).status_code == 200
        with trio.fail_after(2):
            assert await client.next() == message("Token revoked")
            assert await client.closed() == 4001


async def test_sockets_per_token_are_capped(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    node = await start_node({"websocket": {"max_sockets_per_token": 2}})
    internal_id = f"{prefix}-cap"
    async with api_client(node.url) as api:
        await ready(api, internal_id)
        token = (await mint(api))["token"]
        other = (await mint(api))["token"]
    async with connect(node, internal_id, token) as a, connect(node, internal_id, token) as b:
        await a.next()
        await b.next()
        async with connect(node, internal_id, token) as third:
            assert await third.closed() == 4429
        async with connect(node, internal_id, other) as fine:  # another token is not capped
            assert (await fine.next())["event"] == "status"
        async with connect(node, internal_id) as master:
            assert (await master.next())["event"] == "status"


async def test_a_malformed_frame_on_an_offline_container_is_an_invalid_message(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-bad"
    await ready(api, internal_id)
    async with connect(node, internal_id) as client:
        assert await client.next() == {"event": "status", "data": "offline"}
        for raw in (
            '{"event":"send_command","command":"say \\ud800"}',
            '{"send_command":["a\\u0000b"]}',
        ):
            await client.ws.send_message(raw)
            assert await client.next() == message("Error: Invalid message")
        await client.send(event="send_command", command="say hi")
        assert await client.next() == message("Error: Container is not running")


def _handshake(port: int, path: str) -> socket.socket:
    """A raw WebSocket client that upgrades and then never answers anything (a dead peer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    return sock


def _wait_closed(sock: socket.socket, within: float) -> bytes:
    """Read (never answering the pings) until the server closes; what it sent."""
    sock.settimeout(within)
    seen = b""
    while chunk := sock.recv(4096):
        seen += chunk
    return seen


async def test_a_dead_client_is_dropped_by_the_keep_alive(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    node = await start_node({"websocket": {"ping_interval": 0.2, "ping_timeout": 0.5}})
    internal_id = f"{prefix}-ka"
    async with api_client(node.url) as api:
        await ready(api, internal_id)
    hub = node.agent.stash[CONTAINERS].get(internal_id).hub
    port = int(node.url.rsplit(":", 1)[1])
    async with connect(node, internal_id) as alive:  # answers pings (trio-websocket)
        await alive.next()
        sock = await trio.to_thread.run_sync(_handshake, port, f"/ws/{internal_id}?token={MASTER}")
        try:

            async def two() -> bool:
                return len(hub) == 2

            await wait_for(two, within=5, what="both sockets to subscribe")
            seen = await trio.to_thread.run_sync(_wait_closed, sock, 10)
        finally:
            sock.close()
        assert b"\x89" in seen  # the server pinged the dead client before dropping it

        async def one() -> bool:
            return len(hub) == 1

        await wait_for(one, within=5, what="the dead client's subscription to end")
        # The live client, connected before the dead one, has outlived the timeout.
        await alive.send(event="request_logs")
        assert (await alive.until(lambda f: f["event"] == "logs"))[-1]["event"] == "logs"
