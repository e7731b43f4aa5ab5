"""Contract §17 (rate limit): a token bucket per token on REST, with ``X-RateLimit-*``
headers on every limited answer and ``429`` + ``Retry-After`` beyond it; over real HTTP.

Rates here are tiny (``requests_per_minute: 1``: one request back a minute) so that no
refill happens by itself during a test, however slow the machine; refills are made by
moving the agent's clock (the ``clock`` fixture) forward.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd.api import FAST_READS
from lightd.api.ratelimit import MASTER_KEY, RATE_LIMITER, RateLimiter
from lightd.config import RateLimitConfig, parse_config
from lightd.errors import ConfigError

from .conftest import MASTER, Clock, RunningAgent, StartAgent, api_client
from .containers import conftest as on_engine
from .containers.conftest import ready

# The container fixtures, for the fast path by id (a real container on the real engine).
containers_config = on_engine.containers_config
engine = on_engine.engine
prefix = on_engine.prefix
start_node = on_engine.start_node

HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
StartLimited = Callable[..., Any]


@pytest.fixture
def start_limited(start_agent: StartAgent, make_config: Callable[..., Path]) -> Callable[..., Any]:
    async def start(**rate_limit: Any) -> RunningAgent:
        path = make_config({"server": {"rate_limit": rate_limit}} if rate_limit else None)
        return await start_agent(path)

    return start


@pytest.fixture
async def master() -> AsyncIterator[Callable[[RunningAgent], httpx.AsyncClient]]:
    """``master(agent)``: a master-token client of that agent (closed at the end)."""
    opened: list[httpx.AsyncClient] = []

    def make(agent: RunningAgent) -> httpx.AsyncClient:
        opened.append(api_client(agent.url))
        return opened[-1]

    yield make
    for client in opened:
        await client.aclose()


async def mint(client: httpx.AsyncClient, **body: Any) -> tuple[str, str]:
    response = await client.post("/auth/tokens", json={"ttl": "1h", **body})
    assert response.status_code == 200, response.text
    return response.json()["token"], response.json()["id"]


def limits(response: httpx.Response) -> tuple[int, int, int]:
    """(limit, remaining, reset) from an answer's headers."""
    return tuple(int(response.headers[h]) for h in HEADERS)  # type: ignore[return-value]


def unlimited(response: httpx.Response) -> bool:
    return not any(h in response.headers for h in (*HEADERS, "retry-after"))


async def test_burst_then_429_with_retry_after_then_refill(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient], clock: Clock
) -> None:
    agent = await start_limited(requests_per_minute=1, burst=3)
    token, _ = await mint(master(agent))
    async with api_client(agent.url, token=token) as limited:
        for remaining in (2, 1, 0):
            response = await limited.get("/containers")
            assert response.status_code == 200, response.text
            limit, left, reset = limits(response)
            assert (limit, left) == (3, remaining)
            # Unix time at which the bucket is full again: one request back a minute.
            expected = clock() + 60 * (3 - remaining)
            assert expected - 2 <= reset <= expected + 2
        refused = await limited.get("/containers")
        assert refused.status_code == 429
        assert refused.json()["error"] == "Rate limit exceeded"
        assert limits(refused)[:2] == (3, 0)
        retry_after = int(refused.headers["retry-after"])
        assert 58 <= retry_after <= 60
        # A refusal takes nothing: still refused, still one wait away.
        again = await limited.get("/containers")
        assert again.status_code == 429
        assert int(again.headers["retry-after"]) <= retry_after

        clock.advance(retry_after)
        back = await limited.get("/containers")
        assert back.status_code == 200
        assert limits(back)[1] == 0
        assert (await limited.get("/containers")).status_code == 429

        clock.advance(3 * 60)  # full again, never more than the burst
        assert limits(await limited.get("/containers"))[:2] == (3, 2)


async def test_every_answer_to_a_limited_request_has_the_headers(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    """Errors too: a 404, a 401 of a master-only route, a 403 for a missing permission all
    count and carry them (an unknown route is answered before any token is read: not)."""
    agent = await start_limited(requests_per_minute=1, burst=10)
    admin = master(agent)
    token, _ = await mint(admin)
    reader, _ = await mint(admin, permissions=["read"])
    async with (
        api_client(agent.url, token=token) as limited,
        api_client(agent.url, token=reader) as read_only,
    ):
        ok = await limited.get("/system/utilization")
        missing = await limited.get("/containers/no-such-container")
        bad_body = await limited.post("/auth/tokens", content=b"{")
        assert ok.status_code == 200
        assert missing.status_code == 404
        assert bad_body.status_code in (400, 401)
        assert [limits(r)[1] for r in (ok, missing, bad_body)] == [9, 8, 7]
        refused = await read_only.post("/containers/x/start")
        assert refused.status_code in (401, 403)
        assert limits(refused)[:2] == (10, 9)  # its own bucket
    # Public routes are never limited, nor answered with the headers.
    async with httpx.AsyncClient(base_url=agent.url) as anon:
        for path in ("/health/live", "/api/v1/public/ping", "/openapi.json"):
            response = await anon.get(path)
            assert response.status_code == 200, path
            assert unlimited(response), path


async def test_master_token_is_exempt_unless_configured(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    exempt = master(await start_limited(requests_per_minute=1, burst=2))
    for _ in range(5):
        response = await exempt.get("/system/utilization")
        assert response.status_code == 200
        assert unlimited(response)

    agent = await start_limited(requests_per_minute=1, burst=2, master=True)
    limited = master(agent)
    assert limits(await limited.get("/system/utilization"))[:2] == (2, 1)
    assert limits(await limited.get("/system/utilization"))[:2] == (2, 0)
    refused = await limited.get("/system/utilization")
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert MASTER_KEY in agent.agent.stash[RATE_LIMITER]


async def test_zero_turns_it_off(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    agent = await start_limited(requests_per_minute=0, burst=1, master=True)
    token, _ = await mint(master(agent))
    async with api_client(agent.url, token=token) as client:
        for _ in range(5):
            response = await client.get("/containers")
            assert response.status_code == 200
            assert unlimited(response)
    for _ in range(3):
        assert unlimited(await master(agent).get("/containers"))
    assert len(agent.agent.stash.get(RATE_LIMITER) or ()) == 0


async def test_one_tokens_flood_does_not_limit_another(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    agent = await start_limited(requests_per_minute=1, burst=2)
    admin = master(agent)
    first, first_id = await mint(admin)
    second, second_id = await mint(admin)
    async with (
        api_client(agent.url, token=first) as flooding,
        api_client(agent.url, token=second) as other,
    ):
        statuses = [(await flooding.get("/containers")).status_code for _ in range(6)]
        assert statuses == [200, 200, 429, 429, 429, 429]
        response = await other.get("/containers")
        assert response.status_code == 200
        assert limits(response)[:2] == (2, 1)
        assert (await admin.get("/containers")).status_code == 200  # the master: exempt
    # Keyed by the public ids, never by a token or its hash.
    keys = set(agent.agent.stash[RATE_LIMITER]._buckets)
    assert keys == {first_id, second_id}


async def test_the_fast_read_path_is_limited_too(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    """The master token's plain ``GET /containers`` is answered in front of Quart; with
    ``master: true`` it counts in the same bucket and carries the same headers."""
    agent = await start_limited(requests_per_minute=1, burst=3, master=True)
    readers = agent.agent.stash[FAST_READS]
    reader = readers["/containers"]
    answered: list[str] = []

    def counting(rest: str) -> bytes | None:
        answered.append(rest)
        return reader(rest)

    readers["/containers"] = counting
    client = master(agent)
    fast = await client.get("/containers")
    assert answered == [""]  # answered by the fast path
    assert fast.status_code == 200
    assert limits(fast)[:2] == (3, 2)
    slow = await client.get("/system/utilization")  # through Quart: the same bucket
    assert limits(slow)[:2] == (3, 1)
    assert limits(await client.get("/containers"))[:2] == (3, 0)
    refused = await client.get("/containers")
    assert refused.status_code == 429
    assert refused.json()["error"] == "Rate limit exceeded"
    assert int(refused.headers["retry-after"]) >= 1
    assert limits(refused)[:2] == (3, 0)


async def test_the_fast_path_by_id_is_limited(
    start_node: Callable[..., Any], prefix: str, clock: Clock
) -> None:
    """``GET /containers/:id`` of a real container, on the fast path, with ``master: true``."""
    node = await start_node({"server": {"rate_limit": {"requests_per_minute": 1, "burst": 50}}})
    async with api_client(node.url) as api:
        await ready(api, f"{prefix}-a")  # the master token: not limited yet
        assert unlimited(await api.get(f"/containers/{prefix}-a"))
        config = json.loads(node.agent.config_path.read_text())
        config["server"]["rate_limit"].update(master=True, burst=2)
        node.agent.config_path.write_text(json.dumps(config))
        assert (await api.post("/remote/config/reload")).status_code == 200

        readers = node.agent.stash[FAST_READS]
        reader = readers["/containers/"]
        answered: list[str] = []

        def counting(internal_id: str) -> bytes | None:
            answered.append(internal_id)
            return reader(internal_id)

        readers["/containers/"] = counting
        one = await api.get(f"/containers/{prefix}-a")
        two = await api.get(f"/containers/{prefix}-a")
        three = await api.get(f"/containers/{prefix}-a")
        assert [r.status_code for r in (one, two, three)] == [200, 200, 429]
        assert [limits(r)[:2] for r in (one, two, three)] == [(2, 1), (2, 0), (2, 0)]
        assert three.json()["error"] == "Rate limit exceeded"
        assert one.json()["internal_id"] == f"{prefix}-a"
        assert len(answered) >= 2  # the 200s came from the fast path
        clock.advance(60)
        assert (await api.get(f"/containers/{prefix}-a")).status_code == 200


@pytest.mark.parametrize(
    ("rate_limit", "message"),
    [
        ({"requests_per_minute": -1}, "server.rate_limit.requests_per_minute: must be >= 0"),
        ({"requests_per_minute": "600"}, "server.rate_limit.requests_per_minute: must be an"),
        ({"requests_per_minute": 1.5}, "server.rate_limit.requests_per_minute: must be an"),
        ({"burst": 0}, "server.rate_limit.burst: must be >= 1"),
        ({"burst": True}, "server.rate_limit.burst: must be an integer"),
        ({"master": "yes"}, "server.rate_limit.master: must be true or false"),
        ([600], "server.rate_limit: must be an object"),
    ],
)
def test_config_validation(rate_limit: Any, message: str) -> None:
    raw = {"authorization": {"token": MASTER}, "server": {"rate_limit": rate_limit}}
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert str(caught.value).startswith(message)


def test_config_defaults() -> None:
    config = parse_config({"authorization": {"token": MASTER}})
    assert config.server.rate_limit == RateLimitConfig(
        requests_per_minute=600, burst=100, master=False
    )


async def test_reload_changes_the_limits_live(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient]
) -> None:
    agent = await start_limited(requests_per_minute=1, burst=2)
    admin = master(agent)
    token, _ = await mint(admin)
    path = agent.agent.config_path

    async def reload(**rate_limit: Any) -> httpx.Response:
        raw = json.loads(path.read_text())
        raw["server"]["rate_limit"] = rate_limit
        path.write_text(json.dumps(raw))
        return await admin.post("/remote/config/reload")

    async with api_client(agent.url, token=token) as client:
        assert [(await client.get("/containers")).status_code for _ in range(3)] == [200, 200, 429]
        assert (await reload(requests_per_minute=0, burst=2)).status_code == 200
        response = await client.get("/containers")
        assert response.status_code == 200
        assert unlimited(response)
        # On again with a bigger bucket: the old level stays (empty), capacity shown is new.
        assert (await reload(requests_per_minute=1, burst=5)).status_code == 200
        refused = await client.get("/containers")
        assert refused.status_code == 429
        assert limits(refused)[0] == 5
        # A high rate refills at once.
        assert (await reload(requests_per_minute=600_000, burst=5)).status_code == 200
        response = await client.get("/containers")
        assert response.status_code == 200
        assert limits(response)[0] == 5
        # An invalid value is refused and the running limits stay.
        bad = await reload(requests_per_minute=-5, burst=5)
        assert bad.status_code == 400
        assert "server.rate_limit.requests_per_minute" in bad.json()["error"]
        assert limits(await client.get("/containers"))[0] == 5
        # The master token becomes limited by a reload too.
        assert (await reload(requests_per_minute=1, burst=1, master=True)).status_code == 200
        assert [(await admin.get("/containers")).status_code for _ in range(2)] == [200, 429]


async def test_websocket_counts_once_at_connect(
    start_limited: StartLimited,
    master: Callable[..., httpx.AsyncClient],
    ws_connect: Callable[..., Any],
) -> None:
    """An upgrade counts like one request (the socket's frames do not); over the limit the
    upgrade is refused with 429 and the headers."""
    import trio_websocket

    agent = await start_limited(requests_per_minute=1, burst=2)
    token, _ = await mint(master(agent))
    with pytest.raises(trio_websocket.HandshakeError):  # unknown container: refused, counted
        async with ws_connect(agent.url, f"/ws/no-such-container?token={token}"):
            pass
    async with api_client(agent.url, token=token) as client:
        assert limits(await client.get("/containers"))[1] == 0
    with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
        async with ws_connect(agent.url, f"/ws/no-such-container?token={token}"):
            pass
    assert rejected.value.status_code == 429
    headers = {k.decode().lower(): v.decode() for k, v in rejected.value.headers or ()}
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining"] == "0"


async def test_buckets_of_idle_and_revoked_tokens_go(
    start_limited: StartLimited, master: Callable[..., httpx.AsyncClient], clock: Clock
) -> None:
    agent = await start_limited(requests_per_minute=1, burst=5)
    admin = master(agent)
    kept, kept_id = await mint(admin)
    revoked, revoked_id = await mint(admin)
    idle, idle_id = await mint(admin)
    limiter = agent.agent.stash[RATE_LIMITER]
    async with (
        api_client(agent.url, token=kept) as one,
        api_client(agent.url, token=revoked) as two,
        api_client(agent.url, token=idle) as three,
    ):
        for client in (one, two, two, three):
            assert (await client.get("/containers")).status_code == 200
        assert {kept_id, revoked_id, idle_id} <= set(limiter._buckets)
        assert (await admin.delete(f"/auth/tokens/{revoked_id}")).status_code == 200
        assert (await two.get("/containers")).status_code == 401
        # A sweep is due; the idle bucket is full again by now (the same as none), the
        # revoked one is not (two taken, one back) but its token is gone.
        clock.advance(61)
        for _ in range(5):
            assert (await one.get("/containers")).status_code == 200
    assert set(limiter._buckets) == {kept_id}


def test_limiter_is_bounded_and_survives_a_clock_step_back() -> None:
    now = [1000.0]
    limiter = RateLimiter(lambda: now[0], max_buckets=10)
    settings = RateLimitConfig(requests_per_minute=60, burst=2)
    for n in range(25):
        assert limiter.take(f"t{n}", settings).allowed
        assert len(limiter) <= 10
    assert "t24" in limiter
    assert limiter.take("t24", settings).remaining == 0
    now[0] -= 3600  # the wall clock stepped back: no refill, no debt
    assert not limiter.take("t24", settings).allowed
    now[0] += 1
    verdict = limiter.take("t24", settings)
    assert verdict.allowed
    assert verdict.remaining == 0
    assert verdict.reset == 1000 - 3600 + 1 + 2


async def test_limit_check_costs_little() -> None:
    """A guard against an accidental slow path (the bench measures the real cost)."""
    limiter = RateLimiter(trio.current_time)
    settings = RateLimitConfig(requests_per_minute=10**9, burst=10**6)
    started = trio.current_time()
    for _ in range(20_000):
        limiter.take_raw("one", settings)
        limiter.take("one", settings).headers()
    assert (trio.current_time() - started) / 20_000 < 50e-6
