"""``GET /metrics`` (contract §18) and the access log, on real agents over real HTTP: who
may scrape, what is counted under which labels (route templates, never raw paths), the
containers, console and Docker series on the real engine, the remote outbox against the
mock panel, and an access log that never holds a token."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd.api.metrics import request_path
from lightd.containers.console import ConsoleSettings
from lightd.containers.hub import EventHub
from lightd.docker.engine import call_name
from lightd.jobs import JOBS, JobContext
from lightd.logs import JsonFormatter
from lightd.metrics import ConsoleCounts, Metrics, Timings
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import MASTER, RunningAgent, StartAgent, api_client, wait_for
from .containers import conftest as nodes
from .containers.conftest import StartNode, ready, wait_state
from .plugins.remote_sync_support import Panel, remote_config, transitions, until

# The fixtures of a node on the real engine (tests/containers), for the container test.
engine, prefix, containers_config, start_node = (
    nodes.engine,
    nodes.prefix,
    nodes.containers_config,
    nodes.start_node,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) → value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def label_values(samples: Samples, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in samples if label in dict(labels)}


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


async def mint(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


# --- pure parts ------------------------------------------------------------------------


def test_timings_bucket_by_upper_bound_and_count() -> None:
    timings = Timings("t_seconds", "doc", ("route",), counter=("t", "doc"))
    for seconds in (0.0005, 0.0006, 0.2, 99.0):
        timings.observe(("/a",), seconds)
    metrics = Metrics(process=False)
    metrics.register(timings)
    samples = parse(metrics.exposition().decode())
    assert value(samples, "t_seconds_bucket", route="/a", le="0.0005") == 1  # le: inclusive
    assert value(samples, "t_seconds_bucket", route="/a", le="0.001") == 2
    assert value(samples, "t_seconds_bucket", route="/a", le="0.25") == 3
    assert value(samples, "t_seconds_bucket", route="/a", le="+Inf") == 4
    assert value(samples, "t_seconds_count", route="/a") == 4
    assert value(samples, "t_total", route="/a") == 4
    assert value(samples, "t_seconds_sum", route="/a") == pytest.approx(99.2011)


def test_exposition_says_what_prometheus_clients_own_writer_says() -> None:
    metrics = Metrics(process=False)
    for route, status in (("/a", "200"), ("/a", "404"), ('/q"\\x\n', "500")):
        for seconds in (0.0001, 0.003, 0.7, 12.0):
            metrics.http.observe((route, "GET", status), seconds)
    metrics.docker_call("POST /containers/{id}/start", 0.02)
    metrics.counter("lightd_hello_total_things", "Things,\nand more.", ["kind"]).labels("a").inc()
    metrics.gauge("lightd_hello_level", "Level.").set(float("inf"))
    ours = metrics.exposition().decode()
    reference = CollectorRegistry()
    for collector in (metrics.http, metrics.docker, metrics.registry):
        reference.register(collector)
    assert parse(ours) == parse(generate_latest(reference).decode())
    comments = [line for line in ours.splitlines() if line.startswith("#")]
    assert "# TYPE lightd_http_request_duration_seconds histogram" in comments
    assert "# HELP lightd_hello_total_things_total Things,\\nand more." in comments
    with pytest.raises(ValueError, match="Duplicated"):
        metrics.counter("lightd_http_requests", "A plugin taking a core name.")


def test_metrics_are_per_agent_and_plugins_add_theirs() -> None:
    first, second = Metrics(process=False), Metrics(process=False)
    first.counter("lightd_hello_greetings", "Greetings.").inc(3)
    second.counter("lightd_hello_greetings", "Greetings.")  # no clash: registries apart
    depth = {"value": 7.0}
    first.gauge_from("lightd_hello_depth", "Depth.", lambda: depth["value"])
    first.counter_from("lightd_hello_by_kind", "By kind.", lambda: {("a",): 2}, ("kind",))
    first.gauge_from("lightd_hello_absent", "No sample yet.", lambda: None)
    with pytest.raises(ValueError, match="Duplicated"):
        first.gauge("lightd_hello_depth", "Same name twice.")
    samples = parse(first.exposition().decode())
    assert value(samples, "lightd_hello_greetings_total") == 3
    assert value(samples, "lightd_hello_depth") == 7
    assert value(samples, "lightd_hello_by_kind_total", kind="a") == 2
    assert not [name for name, _ in samples if name == "lightd_hello_absent"]
    assert value(parse(second.exposition().decode()), "lightd_hello_greetings_total") == 0


def test_hubs_count_console_lines_into_the_agents_totals() -> None:
    counts = ConsoleCounts()
    throttled = EventHub(console=ConsoleSettings(throttle_lines=3), counts=counts)
    other = EventHub(counts=counts)
    with throttled.subscribe(2) as slow:
        throttled.console([f"{n}\n" for n in range(10)])  # 3 admitted, 7 throttled
        other.console(["x\n", "y\n"])
        for _ in range(5):
            throttled.stats({"cpu": 1})
        assert slow.dropped > 0
    assert counts.lines == 12
    assert counts.throttled == 7 == throttled.throttled
    assert counts.dropped_frames == slow.dropped


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("POST", "/containers/create", "POST /containers/create"),
        ("GET", "/containers/json", "GET /containers/json"),
        ("POST", "/containers/abc123/start", "POST /containers/{id}/start"),
        ("DELETE", "/containers/abc123", "DELETE /containers/{id}"),
        ("GET", "/images/lightd/busybox:latest/json", "GET /images/{id}/json"),
        ("GET", "/networks/lightd0", "GET /networks/{id}"),
        ("POST", "/networks/create", "POST /networks/create"),
        ("GET", "/version", "GET /version"),
    ],
)
def test_docker_call_names_have_no_ids(method: str, path: str, name: str) -> None:
    assert call_name(method, path) == name


def test_request_path_drops_the_query_and_escapes() -> None:
    assert request_path({"raw_path": b"/ws/a?token=x", "path": "/ws/a"}) == "/ws/a"
    assert request_path({"path": "/a\nb"}) == "/a\\nb"


# --- who may scrape -------------------------------------------------------------------


async def test_metrics_need_the_master_token(
    running: RunningAgent, client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    assert (await anon.get("/metrics")).status_code == 403  # no vendor header
    async with api_client(running.url, token=None) as no_token:
        assert (await no_token.get("/metrics")).status_code == 401
    token = await mint(client, permissions=["read"])
    async with api_client(running.url, token=token) as temporary:
        refused = await temporary.get("/metrics")
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "master_token_required"
        # the same token reads other routes: it is the route that wants the master
        assert (await temporary.get("/containers")).status_code == 200
    samples = await scrape(client)
    assert value(samples, "lightd_build_info", version=running.agent.version) == 1
    assert value(samples, "process_open_fds") is not None
    assert value(samples, "lightd_containers", install_state="ready", state="running") == 0


async def test_public_metrics_need_no_headers(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"metrics": {"public": True}}))
    async with httpx.AsyncClient(base_url=node.url) as anon:
        response = await anon.get("/metrics")
    assert response.status_code == 200, response.text
    assert "lightd_http_requests_total" in response.text


async def test_disabled_metrics_leave_the_request_path_bare(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"metrics": {"enabled": False}}))
    async with api_client(node.url) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/api/v1/public/ping")).status_code == 200
    assert node.agent.metrics.http.count(("/api/v1/public/ping", "GET", "200")) == 0


# --- what HTTP requests count under ---------------------------------------------------


async def test_requests_count_by_route_template_never_by_path(
    running: RunningAgent, client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    for _ in range(3):
        assert (await anon.get("/api/v1/public/ping")).status_code == 200
    for internal_id in ("gone-one", "gone-two"):
        assert (await client.get(f"/containers/{internal_id}")).status_code == 404
    assert (await client.get("/no/such/route/x1")).status_code == 404
    assert (await anon.get("/containers/gone-three")).status_code == 403  # refused: counted
    assert (await client.request("BREW", "/api/v1/public/ping")).status_code == 405
    samples = await scrape(client)
    requests = "lightd_http_requests_total"
    ping = {"route": "/api/v1/public/ping", "method": "GET", "status": "200"}
    assert value(samples, requests, **ping) == 3
    assert value(samples, "lightd_http_request_duration_seconds_count", **ping) == 3
    assert value(samples, "lightd_http_request_duration_seconds_bucket", le="+Inf", **ping) == 3
    one = {"route": "/containers/<internal_id>", "method": "GET"}
    assert value(samples, requests, status="404", **one) == 2
    assert value(samples, requests, status="403", **one) == 1
    assert value(samples, requests, route="unmatched", method="GET", status="404") == 1
    # a method the client made up is "other"; a 405 is unrouted (werkzeug names no rule)
    assert value(samples, requests, route="unmatched", method="other", status="405") == 1
    routes = label_values(samples, "route")
    assert not [r for r in routes if "gone" in r or "x1" in r], routes


async def test_jobs_count_by_kind_and_state(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    jobs = running.agent.stash[JOBS]
    jobs.register_kind("test.metrics")
    release = trio.Event()

    async def held(job: JobContext) -> None:
        await release.wait()

    async def quick(job: JobContext) -> None:
        pass

    await jobs.submit("test.metrics", held)
    done = await jobs.submit("test.metrics", quick)

    async def settled() -> bool:
        samples = await scrape(client)
        return (
            value(samples, "lightd_jobs", kind="test.metrics", state="running") == 1
            and value(samples, "lightd_jobs", kind="test.metrics", state="done") == 1
        )

    await wait_for(settled, what=f"one job running and {done.id} done")
    release.set()


# --- the access log -------------------------------------------------------------------


def access_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lightd.access"]


def assert_no_secret(records: list[logging.LogRecord], *secrets: str) -> None:
    for record in records:
        text = record.getMessage() + " " + repr(vars(record))
        for secret in (*secrets, "?token=", "token=", "Authorization", "Bearer", "lightd_"):
            assert secret not in text, (secret, text)


async def test_access_log_lines_hold_no_token(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    ws_connect: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lightd.access")
    node = await start_agent(make_config({"log": {"access": True}}))
    async with api_client(node.url) as client:
        token = await mint(client, permissions=["read"])
        assert (await client.get(f"/api/v1/public/ping?token={token}")).status_code == 200
        assert (await client.get(f"/containers?token={token}&x=1")).status_code == 200
        async with api_client(node.url, token=token) as temporary:
            assert (await temporary.get("/containers")).status_code == 200
        # A WebSocket with the token in its query string (refused: no such container).
        with pytest.raises(Exception, match=r"404|rejected|Rejected"):
            async with ws_connect(node.url, f"/ws/nobody?token={token}"):
                pass

    async def logged() -> bool:
        return any(r.__dict__.get("route") == "/ws/<internal_id>" for r in access_lines(caplog))

    await wait_for(logged, what="the WebSocket's access line")
    records = access_lines(caplog)
    assert_no_secret(records, token, MASTER)
    by_path = {(r.__dict__["method"], r.__dict__["path"]): r for r in records}
    ping = by_path[("GET", "/api/v1/public/ping")]
    assert ping.__dict__["status"] == 200
    assert ping.__dict__["route"] == "/api/v1/public/ping"
    assert ping.__dict__["bytes"] > 0
    assert ping.__dict__["client"] == "127.0.0.1"
    assert isinstance(ping.__dict__["duration_ms"], float)
    # the JSON log format prints the fields as fields
    entry = json.loads(JsonFormatter().format(ping))
    assert entry["logger"] == "lightd.access"
    assert {"method", "route", "path", "status", "duration_ms", "bytes", "client"} <= set(entry)
    ws = by_path[("GET", "/ws/nobody")]
    assert ws.__dict__["status"] in (403, 404)


async def test_no_access_log_by_default(
    running: RunningAgent, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lightd.access")
    assert (await client.get("/api/v1/public/ping")).status_code == 200
    assert access_lines(caplog) == []


# --- containers, console, WebSockets, Docker (real engine) ----------------------------


@pytest.fixture
async def metered(
    start_node: StartNode, prefix: str
) -> AsyncIterator[tuple[RunningAgent, httpx.AsyncClient, str]]:
    node = await start_node({"log": {"access": True}})
    async with api_client(node.url) as api:
        yield node, api, f"{prefix}-m"


async def test_container_console_websocket_and_docker_series(
    metered: tuple[RunningAgent, httpx.AsyncClient, str],
    ws_connect: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    node, api, internal_id = metered
    caplog.set_level(logging.INFO, logger="lightd.access")
    await ready(api, internal_id, startup_command="echo one; echo two; echo ready; sleep 3600")
    samples = await scrape(api)
    assert value(samples, "lightd_containers", install_state="ready", state="offline") == 1
    assert (await api.post(f"/containers/{internal_id}/start")).status_code in (200, 202, 204)
    await wait_state(api, internal_id, state="running")

    async def three_lines() -> bool:
        return node.agent.metrics.console.lines >= 3

    await wait_for(three_lines, what="the console lines to be counted")
    # The fast read path (master token, no query) is counted under the route template.
    before = node.agent.metrics.http.count(("/containers/<internal_id>", "GET", "200"))
    assert (await api.get(f"/containers/{internal_id}")).status_code == 200
    after = node.agent.metrics.http.count(("/containers/<internal_id>", "GET", "200"))
    assert after == before + 1
    token = await mint(api, permissions=["read", "console"])
    route = "/ws/<internal_id>"
    async with ws_connect(node.url, f"/ws/{internal_id}?token={token}"):
        samples = await scrape(api)
        assert value(samples, "lightd_websockets_open", route=route) == 1
    samples = await scrape(api)
    assert value(samples, "lightd_containers", install_state="ready", state="running") == 1
    assert (value(samples, "lightd_console_lines_total") or 0) >= 3
    assert value(samples, "lightd_console_dropped_frames_total") is not None
    assert value(samples, "lightd_docker_engine_available") == 1
    for call in ("POST /containers/create", "POST /containers/{id}/start"):
        assert (value(samples, "lightd_docker_call_duration_seconds_count", call=call) or 0) >= 1
    assert not [c for c in label_values(samples, "call") if internal_id in c]
    assert not [r for r in label_values(samples, "route") if internal_id in r]

    async def closed() -> bool:
        found = value(await scrape(api), "lightd_websockets_open", route=route)
        return found == 0

    await wait_for(closed, what="the WebSocket gauge to drop")
    accepted = value(
        await scrape(api), "lightd_websocket_connections_total", route=route, status="101"
    )
    assert accepted == 1
    ws_lines = [r for r in access_lines(caplog) if r.__dict__.get("route") == route]
    assert [r.__dict__["status"] for r in ws_lines] == [101]
    assert_no_secret(access_lines(caplog), token, MASTER)


# --- the remote outbox ----------------------------------------------------------------


async def test_outbox_depth_and_deliveries(
    nursery: trio.Nursery, start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    panel = Panel(nursery)  # down: updates wait in the outbox
    try:
        node = await start_agent(make_config(remote_config(panel.url)))
        agent = node.agent
        async with api_client(node.url) as client:
            await transitions(agent, ("srv-a", "installing"), ("srv-a", "ready"))

            async def depth_two() -> bool:
                return value(await scrape(client), "lightd_remote_outbox_depth") == 2

            await wait_for(depth_two, what="two updates in the outbox")
            await panel.up()
            await until(lambda: len(panel.statuses("srv-a")) == 2, what="both delivered")

            async def delivered() -> bool:
                samples = await scrape(client)
                return (
                    value(samples, "lightd_remote_updates_total", outcome="delivered") == 2
                    and value(samples, "lightd_remote_outbox_depth") == 0
                )

            await wait_for(delivered, what="the delivered counter and an empty outbox")
            samples = await scrape(client)
            assert value(samples, "lightd_remote_updates_total", outcome="rejected") == 0
            assert value(samples, "lightd_remote_updates_total", outcome="dropped") == 0
    finally:
        if panel.is_up:
            await panel.down()
        panel.close()


def test_plugins_meet_the_type_on_the_public_surface() -> None:
    import lightd

    assert lightd.Metrics is Metrics
