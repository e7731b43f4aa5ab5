"""Attack suite, tokens (contract §12) over REST: permissions, volume scope, listing,
revocation, rotation of the master token, single use, strict TTLs.

Every test here fails on the agent before issue 12: a temporary token could do anything
inside its scope, could not be listed or revoked, outlived a new master token, was spent
by a request it was refused, and ``ttl`` accepted spaces and non-ASCII digits.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd.api.tokens import parse_ttl
from lightd.errors import BadRequest
from lightd.runtime import open_agent
from lightd.store import open_store

from ..conftest import MASTER, RunningAgent, StartAgent, api_client

OTHER_MASTER = "lightd_" + "fedcba9876543210" * 2


async def mint(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return dict(response.json())


def error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return str(response.json()["error"])


async def new_volume(client: httpx.AsyncClient) -> str:
    response = await client.post("/volumes")
    assert response.status_code == 201, response.text
    return str(response.json()["volume_id"])


@pytest.mark.parametrize(
    "ttl", [" 5m", "5m ", " 5m ", "5m\n", "\t5m", "\uff15m", "\u0665m", "\u0665"]
)
async def test_ttl_is_strict(client: httpx.AsyncClient, ttl: str) -> None:
    with pytest.raises(BadRequest, match=r"^Invalid TTL format$"):
        parse_ttl(ttl)
    response = await client.post("/auth/tokens", json={"ttl": ttl})
    assert error(response, 400) == "Invalid TTL format"


async def test_unknown_permission_is_refused(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/tokens", json={"ttl": "5m", "permissions": ["read", "root"]}
    )
    assert error(response, 400) == "Invalid permission: root"


async def test_mint_answers_an_id_and_the_listing_never_shows_secrets(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    body = await mint(client, permissions=["read", "power"], containers=["srv-1"])
    other = await mint(client, remove_on_use=True, volumes=["0f0e0d0c-0000-4000-8000-000000000000"])
    assert body["id"] and body["id"] != other["id"]
    assert body["id"] not in body["token"]
    response = await client.get("/auth/tokens")
    assert response.status_code == 200, response.text
    text = response.text
    for secret in (body["token"], other["token"]):
        assert secret not in text
        assert hashlib.sha256(secret.encode()).hexdigest() not in text
    tokens = {t["id"]: t for t in response.json()["tokens"]}
    first = tokens[body["id"]]
    assert set(first) == {
        "id",
        "expires_at",
        "remove_on_use",
        "containers",
        "volumes",
        "permissions",
        "created_at",
    }
    assert first["permissions"] == ["read", "power"]
    assert first["containers"] == ["srv-1"] and first["volumes"] is None
    assert first["expires_at"] == body["expires_at"] and isinstance(first["created_at"], int)
    second = tokens[other["id"]]
    assert second["permissions"] == ["read", "console", "power", "files", "manage"]
    assert second["remove_on_use"] is True and second["containers"] is None


async def test_a_read_only_token_cannot_change_anything(running: RunningAgent) -> None:
    async with api_client(running.url) as master:
        token = (await mint(master, permissions=["read"]))["token"]
        volume = await new_volume(master)
    async with api_client(running.url, token=token) as c:
        assert (await c.get("/volumes")).status_code == 200
        assert error(await c.post("/volumes"), 403) == "Token lacks permission: manage"
        assert error(await c.delete(f"/volumes/{volume}"), 403) == "Token lacks permission: manage"
        files = await c.get(f"/volumes/{volume}/files")
        assert error(files, 403) == "Token lacks permission: files"
        write = await c.post(f"/volumes/{volume}/files", json={"path": "a.txt", "content": "x"})
        assert error(write, 403) == "Token lacks permission: files"
        assert error(await c.post("/remote/config/reload"), 403) == (
            "Token lacks permission: manage"
        )
    async with api_client(running.url) as master:
        assert (await master.get(f"/volumes/{volume}/files")).json()["files"] == []


async def test_a_token_scoped_to_a_container_cannot_delete_or_reinstall_it(
    running: RunningAgent,
) -> None:
    async with api_client(running.url) as master:
        token = (await mint(master, containers=["srv-1"], permissions=["read", "console"]))["token"]
    async with api_client(running.url, token=token) as c:
        for method, path in (
            ("DELETE", "/containers/srv-1"),
            ("POST", "/containers/srv-1/reinstall"),
            ("POST", "/containers/srv-1/rebind-network"),
        ):
            response = await c.request(method, path, json={})
            assert error(response, 403) == "Token lacks permission: manage"
        for action in ("start", "stop", "kill", "restart"):
            response = await c.post(f"/containers/srv-1/{action}", json={})
            assert error(response, 403) == "Token lacks permission: power"
        # outside its scope it is still a 401, whatever the permission
        assert (await c.delete("/containers/srv-2")).status_code == 401


async def test_volume_scope(running: RunningAgent) -> None:
    async with api_client(running.url) as master:
        mine, other = await new_volume(master), await new_volume(master)
        files = (await mint(master, volumes=[mine], permissions=["files"]))["token"]
        everything = (await mint(master, volumes=[mine.upper()]))["token"]
    async with api_client(running.url, token=files) as c:
        assert (await c.get(f"/volumes/{mine}/files")).status_code == 200
        write = await c.post(f"/volumes/{mine}/folders", json={"path": "world"})
        assert write.status_code == 200, write.text
        assert (await c.get(f"/volumes/{other}/files")).status_code == 401
        assert (await c.get("/volumes")).status_code == 401  # not a route of its volumes
    async with api_client(running.url, token=everything) as c:
        assert (await c.get(f"/volumes/{mine}/files")).status_code == 200
        # a token scoped to volumes only reaches no container
        assert (await c.get("/containers")).json() == {"containers": []}
        assert (await c.get("/containers/srv-1")).status_code == 401


async def test_a_single_use_token_is_not_spent_by_a_refused_request(
    running: RunningAgent,
) -> None:
    async with api_client(running.url) as master:
        token = (await mint(master, remove_on_use=True, permissions=["read"]))["token"]
    async with api_client(running.url, token=token) as c:
        assert (await c.post("/volumes")).status_code == 403
        assert (await c.post("/volumes")).status_code == 403
        assert (await c.get("/volumes")).status_code == 200  # spent here
        assert (await c.get("/volumes")).status_code == 401


async def test_token_administration_is_for_the_master_token_only(running: RunningAgent) -> None:
    async with api_client(running.url) as master:
        body = await mint(master)
    async with api_client(running.url, token=body["token"]) as c:
        assert (await c.get("/auth/tokens")).status_code == 401
        assert (await c.delete(f"/auth/tokens/{body['id']}")).status_code == 401
        assert (await c.post("/auth/tokens/revoke", json={"all": True})).status_code == 401
        assert (await c.get("/volumes")).status_code == 200  # and it still works


async def test_delete_revokes_at_once(running: RunningAgent) -> None:
    async with api_client(running.url) as master:
        body = await mint(master)
        keep = await mint(master)
        async with api_client(running.url, token=body["token"]) as c:
            assert (await c.get("/volumes")).status_code == 200
            response = await master.delete(f"/auth/tokens/{body['id']}")
            assert response.status_code == 200, response.text
            assert response.json() == {"message": "Token revoked"}
            assert (await c.get("/volumes")).status_code == 401
        again = await master.delete(f"/auth/tokens/{body['id']}")
        assert error(again, 404) == "Token not found"
        assert error(await master.delete("/auth/tokens/nope"), 404) == "Token not found"
        listed = [t["id"] for t in (await master.get("/auth/tokens")).json()["tokens"]]
        assert listed == [keep["id"]]


async def test_bulk_revoke(running: RunningAgent) -> None:
    async with api_client(running.url) as master:
        a = await mint(master, containers=["srv-1"])
        ab = await mint(master, containers=["srv-2", "srv-3"])
        c = await mint(master, containers=["srv-4"])
        unscoped = await mint(master)
        bad = await master.post("/auth/tokens/revoke", json={})
        assert bad.status_code == 400, bad.text
        response = await master.post("/auth/tokens/revoke", json={"containers": ["srv-1", "srv-3"]})
        assert response.status_code == 200, response.text
        assert response.json() == {"message": "Revoked 2 tokens", "revoked_count": 2}
        listed = {t["id"] for t in (await master.get("/auth/tokens")).json()["tokens"]}
        assert listed == {c["id"], unscoped["id"]}
        for gone in (a, ab):
            async with api_client(running.url, token=gone["token"]) as client:
                assert (await client.get("/containers")).status_code == 401
        response = await master.post("/auth/tokens/revoke", json={"all": True})
        assert response.json() == {"message": "Revoked 2 tokens", "revoked_count": 2}
        assert (await master.get("/auth/tokens")).json() == {"tokens": []}
    async with api_client(running.url, token=unscoped["token"]) as client:
        assert (await client.get("/volumes")).status_code == 401


def _set_master(config_path: Path, token: str) -> None:
    raw = json.loads(config_path.read_text())
    raw["authorization"]["token"] = token
    config_path.write_text(json.dumps(raw))


async def test_a_new_master_token_on_reload_revokes_tokens_of_the_old_one(
    running: RunningAgent, config_path: Path
) -> None:
    async with api_client(running.url) as master:
        old = (await mint(master))["token"]
    _set_master(config_path, OTHER_MASTER)
    async with api_client(running.url) as master:
        assert (await master.post("/remote/config/reload")).status_code == 200
    async with api_client(running.url, token=old) as c:
        assert (await c.get("/volumes")).status_code == 401
    async with api_client(running.url, token=OTHER_MASTER) as master:
        assert (await master.get("/auth/tokens")).json() == {"tokens": []}
        new = (await mint(master))["token"]
        # a reload that keeps the master token keeps the tokens
        assert (await master.post("/remote/config/reload")).status_code == 200
    async with api_client(running.url, token=new) as c:
        assert (await c.get("/volumes")).status_code == 200


async def test_a_new_master_token_at_restart_revokes_tokens_of_the_old_one(
    start_agent: StartAgent, config_path: Path
) -> None:
    first = await start_agent(config_path)
    async with api_client(first.url) as master:
        old = (await mint(master))["token"]
    await first.stop()
    _set_master(config_path, OTHER_MASTER)
    second = await start_agent(config_path)
    async with api_client(second.url, token=old) as c:
        assert (await c.get("/volumes")).status_code == 401
    async with api_client(second.url, token=OTHER_MASTER) as master:
        new = (await mint(master))["token"]
    await second.stop()
    third = await start_agent(config_path)  # same master: tokens survive
    async with api_client(third.url, token=new) as c:
        assert (await c.get("/volumes")).status_code == 200


async def test_tokens_minted_before_the_upgrade_are_kept_and_listed(
    start_agent: StartAgent, config_path: Path
) -> None:
    """The v2 migration gives old rows an id; the current master adopts them."""
    # Find the store's folder the way the agent does, then write a v1-era row into it.
    with trio.fail_after(30):
        async with open_agent(config_path) as agent:
            base = agent.store.path.parent
    from lightd.api.tokens import lightd_add_migrations

    v1 = [m for m in lightd_add_migrations() if m.version == 1]
    old_token = "lightd_" + "a1" * 16
    (base / "lightd.sqlite3").unlink()
    for extra in base.glob("lightd.sqlite3-*"):
        extra.unlink()
    now = int(time.time())
    async with open_store(base, v1) as store:
        await store.execute(
            "INSERT INTO tokens_temporary VALUES (?, ?, ?, ?, ?)",
            (hashlib.sha256(old_token.encode()).hexdigest(), now, now + 3600, 0, '["srv-1"]'),
        )
    running = await start_agent(config_path)
    async with api_client(running.url) as master:
        tokens = (await master.get("/auth/tokens")).json()["tokens"]
        assert len(tokens) == 1 and tokens[0]["containers"] == ["srv-1"] and tokens[0]["id"]
    async with api_client(running.url, token=old_token) as c:
        assert (await c.get("/containers")).status_code == 200
    assert MASTER  # the fixture's master token adopted it
