"""Contract §1: every failure is a JSON ``{"error": …}`` with the right status."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from .conftest import MASTER, StartAgent, api_client


def assert_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == message


async def test_invalid_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/tokens", content=b'{"ttl": ', headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "Invalid JSON body")


async def test_json_nested_too_deep_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/tokens", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "Invalid JSON body")


async def test_json_that_is_not_an_object_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/tokens", json=["ttl", "5m"])
    assert_error(response, 400, "Body must be a JSON object")


async def test_wrong_field_type_names_the_field(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/tokens", json={"ttl": "5m", "remove_on_use": 1})
    assert_error(response, 400, "remove_on_use: must be true or false")


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/tokens", json={"ttl": "5m", "colour": "blue"})
    assert response.status_code == 200


async def test_body_not_declared_json_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/tokens", content=b'{"ttl": "5m"}', headers={"Content-Type": "text/plain"}
    )
    assert_error(response, 415, "Content-Type must be application/json")


async def test_json_suffix_media_types_are_json(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/auth/tokens",
        content=b'{"ttl": "5m"}',
        headers={"Content-Type": "application/merge-patch+json; charset=utf-8"},
    )
    assert response.status_code == 200


async def test_unknown_route_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/volumes-typo"), 404, "Not found")


async def test_wrong_method_is_405_with_allow(client: httpx.AsyncClient) -> None:
    response = await client.delete("/auth/tokens")
    assert_error(response, 405, "Method not allowed")
    assert "POST" in response.headers["allow"]


async def test_body_over_the_limit_is_413(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"server": {"max_body_bytes": 2048}}))
    async with api_client(node.url) as c:
        big = await c.post("/auth/tokens", json={"ttl": "5m", "pad": "x" * 4096})
        assert_error(big, 413, "Request body too large")

        async def parts() -> AsyncIterator[bytes]:
            for part in (b'{"ttl": "5m", "pad": "', b"x" * 4096, b'"}'):
                yield part

        chunked = await c.post(
            "/auth/tokens", content=parts(), headers={"Content-Type": "application/json"}
        )
        assert_error(chunked, 413, "Request body too large")
        assert (await c.post("/auth/tokens", json={"ttl": "5m"})).status_code == 200


async def test_unexpected_error_is_500_without_details(
    start_agent: StartAgent,
    config_path: Path,
    hello_plugin: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = await start_agent(config_path, load_entrypoints=True)
    with caplog.at_level(logging.ERROR):
        async with api_client(node.url) as c:
            response = await c.get("/hello/boom")
    assert_error(response, 500, "Internal server error")
    assert "Traceback" not in response.text
    assert "shadow" not in response.text
    assert "lightd_leaked" not in response.text
    assert MASTER not in response.text
    # ...but the operator gets the traceback in the log.
    assert any(r.exc_info and "secret detail" in str(r.exc_info[1]) for r in caplog.records)


async def test_errors_carry_a_machine_code(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/tokens", json={"ttl": "nope"})
    assert response.json() == {"error": "Invalid TTL format", "code": "invalid_ttl"}


async def test_refusals_say_what_was_expected(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    """[ext] ``details`` (contract §1): what the message alone does not say."""
    vendor = await anon.get("/remote/config", headers={"Accept": "application/json"})
    assert_error(vendor, 403, "Invalid vendor header")
    assert vendor.json()["details"] == ["expected header Accept: application/vnd.pkglatv1+json"]
    # A body with several bad fields: the message names the first, details every one.
    bad = await client.post(
        "/containers",
        json={"internal_id": "x-1", "image": 7, "volume_id": [], "startup_command": 3},
    )
    assert bad.status_code == 400, bad.text
    body = bad.json()
    assert body["error"] == body["details"][0]
    assert len(body["details"]) >= 3 and all(": must be a string" in d for d in body["details"])
    port = await client.post("/network/ports", json={"ip": "127.0.0.1", "port": 70000})
    assert_error(port, 400, "Invalid port: 70000")
    assert port.json()["details"] == ["port must be an integer from 1 to 65535"]
    # Refusals whose message says it all carry no details.
    assert "details" not in (await client.get("/containers/nope")).json()
