"""The mock panel (contract §11, examples/panel_mock): the panel side of §9 over real
loopback HTTP, its failure switches, its JSON views, its data file and its command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from examples.panel_mock import PanelState, node_name, serve_panel
from examples.panel_mock.__main__ import parse_agents, parse_tokens

from .conftest import ROOT, wait_for

TOKEN = "lightd_" + "a1" * 16
OTHER = "lightd_" + "b2" * 16

ServePanel = Callable[..., Any]


@pytest.fixture
def serve(nursery: trio.Nursery) -> ServePanel:
    """Serve a ``PanelState`` on loopback port 0; returns its base URL."""

    async def start(state: PanelState, *, prefix: str = "") -> str:
        urls = await nursery.start(
            lambda task_status: serve_panel(
                state, host="127.0.0.1", port=0, prefix=prefix, task_status=task_status
            )
        )
        return str(urls[0])

    return start


@pytest.fixture
async def panel(serve: ServePanel) -> AsyncIterator[tuple[PanelState, httpx.AsyncClient]]:
    state = PanelState(tokens={TOKEN: "edge-1", OTHER: "edge-2"})
    url = await serve(state)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield state, client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def update(server: str = "srv-1", status: str = "installing", **extra: Any) -> dict[str, Any]:
    return {"event": "update", "server": server, "status": status, **extra}


async def test_health_answers_the_documented_body(panel: Any) -> None:
    state, client = panel
    response = await client.get("/health", headers=auth())
    assert response.status_code == 200
    assert response.json() == {"status": 200, "endpoint": "active"}
    assert state.nodes["edge-1"].last_health is not None


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer lightd_wrong_token_value_xx"}, {"Authorization": TOKEN}],
)
async def test_bearer_token_is_required(panel: Any, headers: dict[str, str]) -> None:
    state, client = panel
    assert (await client.get("/health", headers=headers)).status_code == 401
    response = await client.post("/update", json=update(), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "Missing or invalid authorization token"}
    assert state.received == []


async def test_bearer_scheme_is_case_insensitive(panel: Any) -> None:
    _, client = panel
    response = await client.get("/health", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status_code == 200


async def test_updates_are_recorded_per_node_and_deduplicated(panel: Any) -> None:
    state, client = panel
    first = update(event_id="e-1", timestamp=1700000000)
    assert (await client.post("/update", json=first, headers=auth())).json() == {"status": "ok"}
    again = await client.post("/update", json=first, headers=auth())
    assert again.status_code == 200 and again.json() == {"status": "duplicate"}
    failed = {"event": "update", "server": "srv-1", "error": "failed", "data": "boom"}
    await client.post("/update", json={**failed, "event_id": "e-2"}, headers=auth())
    await client.post("/update", json=update("srv-9", "ready"), headers=auth(OTHER))
    await client.post("/update", json=update("srv-9", "ready"), headers=auth(OTHER))  # no id
    assert state.duplicates == 1
    assert state.statuses("srv-1") == ["installing", "failed"]
    assert state.statuses("srv-9", node="edge-2") == ["ready", "ready"]
    srv1 = state.nodes["edge-1"].containers["srv-1"]
    assert (srv1.status, srv1.error, srv1.updates) == ("failed", "boom", 2)
    snapshot = (await client.get("/api/state")).json()
    assert [n["name"] for n in snapshot["nodes"]] == ["edge-1", "edge-2"]
    containers = snapshot["nodes"][0]["containers"]
    assert containers[0]["server"] == "srv-1" and containers[0]["status"] == "failed"
    assert snapshot["received"] == 4 and snapshot["duplicates"] == 1
    updates = (await client.get("/api/updates")).json()["updates"]
    assert [u["node"] for u in updates] == ["edge-1", "edge-1", "edge-2", "edge-2"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "Invalid JSON body"),
        ([], "body must be a JSON object"),
        ({"event": "billing", "server": "s"}, 'event: must be "update"'),
        ({"event": "update", "status": "ready"}, "server: must be a non-empty string"),
        ({"event": "usage", "server": "s", "start": 5}, "start: must be the unix time of an"),
        ({"event": "usage", "server": "s", "start": 3600}, "memory_gb_hours: must be a number"),
        ({"event": "update", "server": "s", "status": "dancing"}, "status: must be one of"),
        ({"event": "update", "server": "s", "error": "oops"}, 'error: must be "failed"'),
        ({"event": "update", "server": "s", "error": "failed", "data": 5}, "data: must be"),
        ({**update(), "event_id": 5}, "event_id: must be a string"),
        ({**update(), "timestamp": "now"}, "timestamp: must be a number"),
        ({"event": "backup", "volume_id": "v", "backup_id": "b"}, "event_id: must be a non-empty"),
        (
            {"event": "backup", "volume_id": "v", "backup_id": "b", "event_id": "e"},
            "status: must be done or failed",
        ),
    ],
)
async def test_malformed_updates_get_400(panel: Any, body: Any, message: str) -> None:
    state, client = panel
    content = body if isinstance(body, str) else json.dumps(body)
    response = await client.post("/update", content=content, headers=auth())
    assert response.status_code == 400
    assert response.json()["error"].startswith(message)
    assert state.received == []


async def test_fail_status_answers_and_records_nothing(panel: Any) -> None:
    state, client = panel
    state.fail_status = 503
    assert (await client.get("/health", headers=auth())).status_code == 503
    response = await client.post("/update", json=update(event_id="e-1"), headers=auth())
    assert response.status_code == 503
    assert state.received == [] and state.update_requests == 1
    state.fail_status = None
    response = await client.post("/update", json=update(event_id="e-1"), headers=auth())
    assert response.json() == {"status": "ok"}  # a retry of the refused one is not a duplicate


async def test_delay_records_first_and_answers_late(panel: Any) -> None:
    state, client = panel
    state.delay = 0.5
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def post() -> None:
            await client.post("/update", json=update(event_id="slow"), headers=auth())
            done.set()

        nursery.start_soon(post)
        await wait_for(_async(lambda: len(state.received) == 1), what="the update recorded")
        assert not done.is_set()
        with trio.fail_after(5):
            await done.wait()


def _async(condition: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return condition()

    return check


async def test_prefix_moves_the_panel_api(serve: ServePanel) -> None:
    state = PanelState(tokens={TOKEN: "n"})
    url = await serve(state, prefix="/api")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        assert (await client.get("/api/health", headers=auth())).status_code == 200
        assert (await client.get("/health", headers=auth())).status_code == 404
        assert (await client.get("/")).status_code == 200  # the page stays at the root


async def test_control_switches_failure_behaviour(panel: Any) -> None:
    state, client = panel
    version = state.version
    response = await client.post("/api/control", json={"fail_status": 503, "delay": 1.5})
    assert response.json() == {"fail_status": 503, "delay": 1.5}
    assert (state.fail_status, state.delay) == (503, 1.5) and state.version > version
    response = await client.post("/api/control", json={"fail_status": None, "delay": 0})
    assert (state.fail_status, state.delay) == (None, 0.0)


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": '{"fail_status": 503}'}, 415),  # not declared as JSON: a form could
        ({"json": {"fail_status": 200}}, 400),
        ({"json": {"delay": -1}}, 400),
        ({"json": {"delay": "1"}}, 400),
        ({"json": [1]}, 400),
    ],
)
async def test_control_refuses_bad_requests(
    panel: Any, kwargs: dict[str, Any], status: int
) -> None:
    state, client = panel
    assert (await client.post("/api/control", **kwargs)).status_code == status
    assert (state.fail_status, state.delay) == (None, 0.0)


async def test_page_is_plain_html_with_its_script(panel: Any) -> None:
    _, client = panel
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/api/state" in response.text and "textContent" in response.text
    assert "innerHTML" not in response.text  # agents' strings never become markup


async def test_data_file_keeps_updates_across_restarts(serve: ServePanel, tmp_path: Path) -> None:
    data = tmp_path / "panel.jsonl"
    first = PanelState(tokens={TOKEN: "n"}, data_file=data)
    url = await serve(first)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await client.post("/update", json=update(event_id="e-1"), headers=auth())
        await client.post("/update", json=update(status="ready", event_id="e-2"), headers=auth())
    with data.open("a") as fh:
        fh.write('{"event": "update", "server": "srv-1", "sta')  # the panel died mid-write
    second = PanelState(tokens={TOKEN: "n"}, data_file=data)
    await trio.to_thread.run_sync(second.load)
    assert second.statuses("srv-1") == ["installing", "ready"]
    assert second.nodes["n"].containers["srv-1"].status == "ready"
    assert second.accept("n", update(event_id="e-2")) is False  # still de-duplicated


def test_tokens_may_be_named() -> None:
    assert parse_tokens([f"edge-1={TOKEN}", OTHER]) == {TOKEN: "edge-1", OTHER: node_name(OTHER)}
    assert node_name(OTHER).startswith("node-") and OTHER not in node_name(OTHER)


def test_cli_needs_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PANEL_MOCK_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.panel_mock", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "give at least one --token" in result.stderr


async def test_cli_serves_until_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "panel.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "examples.panel_mock", "--port", "0", "--fail-503"],
            cwd=ROOT,
            env={**os.environ, "PANEL_MOCK_TOKEN": f"edge={TOKEN}"},
            stdout=out,
            stderr=out,
        )
    try:
        found: list[str] = []

        async def listening() -> bool:
            text = await trio.Path(log).read_text()
            found[:] = re.findall(r"agents report to (http://\S+)", text)
            return bool(found) or process.poll() is not None

        await wait_for(listening, within=20, what="the panel to listen")
        assert found, await trio.Path(log).read_text()
        async with httpx.AsyncClient(base_url=found[0], timeout=10) as client:
            assert (await client.get("/health", headers=auth())).status_code == 503
            assert (await client.get("/api/state")).json()["fail_status"] == 503
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert TOKEN not in await trio.Path(log).read_text()


async def test_a_finished_backup_is_accepted_and_changes_no_status(panel: Any) -> None:
    """Contract §16: the node reports a finished backup through the outbox; it is about a
    volume, not a server, so it is recorded and shows no container."""
    state, client = panel
    body = {
        "event": "backup",
        "volume_id": "v-1",
        "backup_id": "b-1",
        "status": "done",
        "size": 10,
        "sha256": "ab" * 32,
        "event_id": "e-1",
    }
    response = await client.post("/update", json=body, headers=auth())
    assert response.json() == {"status": "ok"}
    assert state.received[0]["backup_id"] == "b-1"
    assert state.nodes["edge-1"].containers == {}


async def test_a_deleted_server_leaves_the_page(panel: Any) -> None:
    state, client = panel
    await client.post("/update", json=update("srv-1", "ready"), headers=auth())
    version = state.version
    state.forget("edge-1", "srv-1")
    assert state.version == version + 1
    snapshot = (await client.get("/api/state")).json()
    assert snapshot["nodes"][0]["containers"] == []
    assert state.statuses("srv-1") == ["ready"]  # what was received stays recorded


async def test_without_nodes_to_drive_the_panel_api_is_absent(panel: Any) -> None:
    _, client = panel
    assert (await client.get("/panel/api/nodes")).status_code == 404
    page = await client.get("/servers")
    assert page.status_code == 200 and 'data-page="servers"' in page.text
    assert (await client.get("/static/panel.js")).status_code == 200
    assert (await client.get("/static/..%2Fapp.py")).status_code == 404
    assert (await client.get("/static/page.html")).status_code == 404


def test_agents_and_their_master_tokens_from_the_environment() -> None:
    assert parse_agents(["edge-1=http://10.0.0.5:8070/"], TOKEN) == {
        "edge-1": ("http://10.0.0.5:8070", TOKEN)
    }
    both = parse_agents(["edge-1=http://a:8070", "http://b:8070"], f"edge-1={TOKEN},b:8070={OTHER}")
    assert both == {"edge-1": ("http://a:8070", TOKEN), "b:8070": ("http://b:8070", OTHER)}
    with pytest.raises(ValueError, match="no master token for edge-2"):
        parse_agents(["edge-2=http://c:8070"], f"edge-1={TOKEN}")
    with pytest.raises(ValueError, match="not an http"):
        parse_agents(["edge-1=ftp://c"], TOKEN)
