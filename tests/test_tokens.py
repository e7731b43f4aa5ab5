"""Contract §2.1: temporary tokens — minting, use, single use, expiry, purge, persistence,
the ``containers`` restriction, and the same tokens on a WebSocket."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from lightd.api.tokens import TOKENS, parse_ttl
from lightd.errors import BadRequest

from .conftest import Clock, RunningAgent, StartAgent, api_client

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


async def mint(client: httpx.AsyncClient, **body: Any) -> dict[str, str]:
    response = await client.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("15m", 900),
        ("2h", 7200),
        ("7d", 604800),
        ("30d", 2592000),
        (60, 60),
    ],
)
def test_parse_ttl_accepts(ttl: object, seconds: int) -> None:
    assert parse_ttl(ttl) == seconds


@pytest.mark.parametrize(
    "ttl",
    [
        "0",
        "0s",
        "-1",
        "1.5h",
        "1H",
        "10 m",
        "31d",
        "2592001",
        "",
        "m",
        "abc",
        "1w",
        None,
        True,
        1.5,
        [],
        "9" * 20,
        " 5m ",
        " 5m",
        "5m ",
        "5m\n",
        "\uff15m",  # full-width 5
        "\u0665m",  # Arabic-Indic 5
    ],
)
def test_parse_ttl_rejects(ttl: object) -> None:
    with pytest.raises(BadRequest, match=r"^Invalid TTL format$"):
        parse_ttl(ttl)


async def test_mint_returns_token_and_expiry(client: httpx.AsyncClient, clock: Clock) -> None:
    body = await mint(client, ttl="2h")
    assert list(body) == ["token", "expires_at", "id"]
    assert re.fullmatch(r"lightd_[0-9a-f]{32}", body["token"])
    assert RFC3339.fullmatch(body["expires_at"])
    expires = datetime.strptime(body["expires_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(expires.timestamp() - (clock() + 7200)) < 3


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"ttl": "1x"}, "Invalid TTL format"),
        ({"ttl": "45d"}, "Invalid TTL format"),
        ({}, "ttl: is required"),
        ({"ttl": "5m", "remove_on_use": "yes"}, "remove_on_use: must be true or false"),
        ({"ttl": "5m", "containers": "srv-1"}, "containers: must be a list"),
        ({"ttl": "5m", "containers": ["../x"]}, "containers: must be a list of container ids"),
    ],
)
async def test_mint_validates_its_body(
    client: httpx.AsyncClient, body: dict[str, Any], message: str
) -> None:
    response = await client.post("/auth/tokens", json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)


async def test_temporary_token_works_on_rest(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    token = (await mint(client))["token"]
    async with api_client(running.url, token=token) as c:
        assert (await c.get("/remote/config")).status_code == 200
        assert (await c.get("/remote/config")).status_code == 200


async def test_temporary_token_cannot_mint(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    token = (await mint(client))["token"]
    async with api_client(running.url, token=token) as c:
        response = await c.post("/auth/tokens", json={"ttl": "5m"})
    assert response.status_code == 401


async def test_remove_on_use_token_works_exactly_once(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    token = (await mint(client, remove_on_use=True))["token"]
    async with api_client(running.url, token=token) as c:
        assert (await c.get("/remote/config")).status_code == 200
        assert (await c.get("/remote/config")).status_code == 401


async def test_remove_on_use_token_wins_once_under_concurrency(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    token = (await mint(client, remove_on_use=True))["token"]
    statuses: list[int] = []
    async with api_client(running.url, token=token) as c:

        async def hit() -> None:
            statuses.append((await c.get("/remote/config")).status_code)

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(hit)
    assert sorted(statuses) == [200] + [401] * 19


async def test_single_use_token_not_burned_by_refused_origin(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"server": {"allowed_origins": ["https://ok.example"]}}))
    async with api_client(node.url) as master:
        token = (await mint(master, remove_on_use=True))["token"]
    async with api_client(node.url, token=token) as c:
        refused = await c.get("/remote/config", headers={"Origin": "https://evil.example"})
        assert refused.status_code == 403
        assert (
            await c.get("/remote/config", headers={"Origin": "https://ok.example"})
        ).status_code == 200


async def test_token_expires(
    running: RunningAgent, client: httpx.AsyncClient, clock: Clock
) -> None:
    token = (await mint(client, ttl="60"))["token"]
    async with api_client(running.url, token=token) as c:
        assert (await c.get("/remote/config")).status_code == 200
        clock.advance(61)
        assert (await c.get("/remote/config")).status_code == 401


def _rows(running: RunningAgent) -> int:
    with sqlite3.connect(running.agent.store.path) as conn:
        return conn.execute("SELECT COUNT(*) FROM tokens_temporary").fetchone()[0]


async def test_expired_tokens_are_purged(
    running: RunningAgent, client: httpx.AsyncClient, clock: Clock
) -> None:
    await mint(client, ttl="60")
    await mint(client, ttl="1h")
    assert _rows(running) == 2
    clock.advance(120)
    assert await running.agent.stash[TOKENS].purge() == 1
    assert _rows(running) == 1
    assert len(running.agent.stash[TOKENS]) == 1


async def test_tokens_are_stored_hashed(running: RunningAgent, client: httpx.AsyncClient) -> None:
    token = (await mint(client))["token"]
    assert token.encode() not in running.agent.store.path.read_bytes()
    wal = running.agent.store.path.with_name(running.agent.store.path.name + "-wal")
    if wal.exists():
        assert token.encode() not in wal.read_bytes()


async def test_tokens_survive_a_restart(start_agent: StartAgent, config_path: Path) -> None:
    first = await start_agent(config_path)
    async with api_client(first.url) as c:
        keep = (await mint(c))["token"]
        once = (await mint(c, remove_on_use=True))["token"]
    async with api_client(first.url, token=once) as c:
        assert (await c.get("/remote/config")).status_code == 200
    await first.stop()
    second = await start_agent(config_path)
    async with api_client(second.url, token=keep) as c:
        assert (await c.get("/remote/config")).status_code == 200
    async with api_client(second.url, token=once) as c:
        assert (await c.get("/remote/config")).status_code == 401


@pytest.fixture
async def hello(start_agent: StartAgent, config_path: Path, hello_plugin: str) -> RunningAgent:
    return await start_agent(config_path, load_entrypoints=True)


async def test_restricted_token_reaches_only_its_containers(hello: RunningAgent) -> None:
    async with api_client(hello.url) as master:
        token = (await mint(master, containers=["srv-1", "srv-2"]))["token"]
    async with api_client(hello.url, token=token) as c:
        ok = await c.get("/hello/containers/srv-1")
        assert ok.status_code == 200
        assert ok.json() == {"internal_id": "srv-1", "auth": "temporary"}
        assert (await c.get("/hello/containers/srv-3")).status_code == 401
        assert (await c.get("/remote/config")).status_code == 401  # not a container route


async def test_websocket_accepts_master_and_temporary_tokens(
    hello: RunningAgent, ws_connect: Callable[..., Any]
) -> None:
    async with api_client(hello.url) as master:
        token = (await mint(master))["token"]
    for t in (token, "lightd_" + "0123456789abcdef" * 2):
        async with ws_connect(hello.url, f"/hello/ws/srv-1?token={t}") as ws:
            await ws.send_message("ping")
            with trio.fail_after(5):
                assert await ws.get_message() == "srv-1:ping"


@pytest.mark.parametrize("query", ["", "?token=", "?token=lightd_wrongwrongwrongwrong"])
async def test_websocket_bad_token_is_401_before_upgrade(
    hello: RunningAgent, ws_connect: Callable[..., Any], query: str
) -> None:
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with ws_connect(hello.url, f"/hello/ws/srv-1{query}"):
            pass
    assert rejected.value.status_code == 401


async def test_websocket_single_use_and_restricted_tokens(
    hello: RunningAgent, ws_connect: Callable[..., Any]
) -> None:
    async with api_client(hello.url) as master:
        once = (await mint(master, remove_on_use=True, containers=["srv-1"]))["token"]
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with ws_connect(hello.url, f"/hello/ws/srv-2?token={once}"):
            pass
    assert rejected.value.status_code == 401
    async with ws_connect(hello.url, f"/hello/ws/srv-1?token={once}") as ws:
        # The connection made with the single-use token lives on normally.
        for n in range(3):
            await ws.send_message(str(n))
            with trio.fail_after(5):
                assert await ws.get_message() == f"srv-1:{n}"
    with pytest.raises(trio_websocket.ConnectionRejected):
        async with ws_connect(hello.url, f"/hello/ws/srv-1?token={once}"):
            pass
