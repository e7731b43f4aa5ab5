"""Contract §2: vendor header → bearer token → origin; CORS preflight; auth disabled."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import MASTER, VENDOR, RunningAgent, StartAgent, api_client

PROTECTED = "/remote/config"


async def test_ping_needs_no_headers(anon: httpx.AsyncClient) -> None:
    response = await anon.get("/api/v1/public/ping")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["message"] == "Lightd is running"
    assert body["version"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Accept": "application/json"},
        {"Accept": "Application/vnd.pkglatv2+json"},
        {"Accept": "Application/vnd.pkglatv1+xml"},
        {"Accept": "text/html, application/vnd.pkglatv1+jsonx"},
    ],
)
async def test_vendor_header_missing_or_wrong_is_403(
    running: RunningAgent, headers: dict[str, str]
) -> None:
    async with httpx.AsyncClient(base_url=running.url) as c:
        response = await c.get(PROTECTED, headers={**headers, "Authorization": f"Bearer {MASTER}"})
    assert response.status_code == 403
    assert response.json()["error"] == "Invalid vendor header"


@pytest.mark.parametrize(
    "accept",
    [
        "Application/vnd.pkglatv1+json",
        "application/vnd.pkglatv1+json",
        "APPLICATION/VND.PKGLATV1+JSON",
        "text/html, application/vnd.pkglatv1+json;q=0.9",
    ],
)
async def test_vendor_media_type_is_case_insensitive(running: RunningAgent, accept: str) -> None:
    async with api_client(running.url, Accept=accept) as c:
        assert (await c.get(PROTECTED)).status_code == 200


async def test_vendor_is_checked_before_the_token(anon: httpx.AsyncClient) -> None:
    response = await anon.get(PROTECTED, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 403
    assert response.json()["error"] == "Invalid vendor header"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        f"Token {MASTER}",
        f"Basic {MASTER}",
        "Bearer lightd_short",
        "Bearer " + "x" * 40,
        "Bearer lightd_" + "f" * 32,
        f"Bearer {MASTER}x",
        f"Bearer {MASTER[:-1]}",
        f"{MASTER}",
    ],
)
async def test_bad_bearer_is_401(running: RunningAgent, authorization: str | None) -> None:
    headers = {"Accept": VENDOR}
    if authorization is not None:
        headers["Authorization"] = authorization
    async with httpx.AsyncClient(base_url=running.url) as c:
        response = await c.get(PROTECTED, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "Missing or invalid authorization token"


async def test_bearer_scheme_is_case_insensitive(running: RunningAgent) -> None:
    async with httpx.AsyncClient(base_url=running.url) as c:
        response = await c.get(
            PROTECTED, headers={"Accept": VENDOR, "Authorization": f"bearer {MASTER}"}
        )
    assert response.status_code == 200


@pytest.fixture
async def strict_origin(start_agent: StartAgent, make_config: Callable[..., Path]) -> RunningAgent:
    path = make_config({"server": {"allowed_origins": ["https://panel.example"]}})
    return await start_agent(path)


async def test_origin_outside_allow_list_is_403(strict_origin: RunningAgent) -> None:
    async with api_client(strict_origin.url, Origin="https://evil.example") as c:
        response = await c.get(PROTECTED)
    assert response.status_code == 403
    assert response.json()["error"] == "Origin not allowed"


async def test_allowed_origin_gets_cors_header(strict_origin: RunningAgent) -> None:
    async with api_client(strict_origin.url, Origin="https://panel.example") as c:
        response = await c.get(PROTECTED)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://panel.example"
    assert "Origin" in response.headers["vary"]


async def test_no_origin_header_passes_the_allow_list(strict_origin: RunningAgent) -> None:
    async with api_client(strict_origin.url) as c:
        response = await c.get(PROTECTED)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_token_is_checked_before_origin(strict_origin: RunningAgent) -> None:
    async with api_client(strict_origin.url, token="lightd_wrongwrongwrongwrong") as c:
        response = await c.get(PROTECTED, headers={"Origin": "https://evil.example"})
    assert response.status_code == 401


async def test_any_origin_allowed_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get(PROTECTED, headers={"Origin": "https://anything.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"


async def test_preflight_is_answered_without_auth(anon: httpx.AsyncClient) -> None:
    response = await anon.options(
        "/auth/tokens",
        headers={
            "Origin": "https://panel.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 204
    assert response.headers["access-control-allow-origin"] == "*"
    assert "POST" in response.headers["access-control-allow-methods"]
    assert response.headers["access-control-allow-headers"] == "authorization, content-type"


async def test_preflight_from_disallowed_origin_is_403(strict_origin: RunningAgent) -> None:
    async with httpx.AsyncClient(base_url=strict_origin.url) as c:
        response = await c.options(
            PROTECTED,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        )
    assert response.status_code == 403
    assert response.json()["error"] == "Origin not allowed"


async def test_unknown_route_is_404_json_without_auth(anon: httpx.AsyncClient) -> None:
    response = await anon.get("/no/such/route")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == "Not found"


async def test_auth_disabled_accepts_requests_and_warns(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = make_config({"authorization": {"enabled": False}})
    with caplog.at_level(logging.WARNING):
        node = await start_agent(path)
        assert any("authorization is disabled" in r.getMessage() for r in caplog.records)
        caplog.clear()
        async with api_client(node.url, token=None) as c:
            response = await c.get(PROTECTED)
    assert response.status_code == 200
    assert any("accepted without a token" in r.getMessage() for r in caplog.records)
