"""Fuzzing every documented route from the agent's own ``GET /openapi.json`` (contract §18).

schemathesis turns each operation of the live document into a hypothesis strategy of
requests that fit it (path, query and body: positive data); every request goes to a real
agent on loopback with the master token and the vendor header, backed by the real Docker
engine, so container routes create, power and delete real containers. Checks on every
answer: no 5xx (``not_a_server_error``), a status the document lists for the operation
(``status_code_conformance``), a documented content type (``content_type_conformance``)
and a body that fits the documented schema for that status
(``response_schema_conformance``; errors included). Afterwards every service still runs:
ping answers, the readiness probe finds every service running, the supervisor still
lists, and the agent's log holds no error or traceback.

Path arguments are real ids (a ready container, a volume, a pool port) half of the time,
so routes go past their 404. Operations run grouped by method (reads, then writes, then
deletes), so a deletion of the real container comes last. WebSocket operations
(``x-websocket: true``: ``/ws/{internal_id}``) are skipped: schemathesis speaks HTTP only;
tests/containers cover the WebSocket. So is ``GET /events`` (Server-Sent Events: a response
that lasts until the server ends it; tests/test_events.py covers it).

Bounded for CI on a slow machine: ``EXAMPLES`` per operation, derandomized (the same
requests every run), no shrinking (a stateful server makes it slow and flaky; the failing
request is printed as sent), no example database. Containers the fuzzer created are
deleted through the API at the end (the session's leftover check would fail otherwise).

To look closer: ``LIGHTD_FUZZ_OPERATIONS=<regex>`` runs only the operations whose
``METHOD /path`` it matches (``re.search``); ``LIGHTD_FUZZ_EXAMPLES=<n>`` changes the budget.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import hypothesis
import pytest
import requests
import schemathesis
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .conftest import (
    MADE,
    MASTER,
    TEST_IMAGE,
    VENDOR,
    RunningAgent,
    StartAgent,
    Trouble,
    wait_for,
)

EXAMPLES = int(os.environ.get("LIGHTD_FUZZ_EXAMPLES", "40"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
HEADERS = {"Accept": VENDOR, "Authorization": f"Bearer {MASTER}"}
POOL_PORT = 30850
#: Order of the operations: reads first, deletions last.
METHOD_ORDER = {"get": 0, "post": 1, "put": 2, "patch": 2, "delete": 3}


@attrs.frozen
class Target:
    """Real objects of the fuzzed agent, so path arguments hit something."""

    container: str
    volume: str
    ip: str
    port: int

    #: An ``internal_id`` free for a real create (what the fuzzer creates is deleted after).
    spare: str

    def bodies(self) -> dict[str, dict[str, Any]]:
        """Valid bodies by ``METHOD /path`` for what generated data rarely gets right."""
        return {
            "POST /containers": {
                "internal_id": self.spare,
                "image": TEST_IMAGE,
                "volume_id": self.volume,
                "startup_command": "echo ready; sleep 3600",
                "start_pattern": "ready",
            },
        }

    def path_values(self) -> dict[str, str]:
        return {
            "internal_id": self.container,
            "volume_id": self.volume,
            "ip": self.ip,
            "port": str(self.port),
        }


# --- the target agent ---------------------------------------------------------------------


def _client(node: RunningAgent) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=node.url, headers=HEADERS, timeout=30)


async def _delete_all_containers(node: RunningAgent) -> list[str]:
    """Delete, through the API, every container the agent has; returns what failed."""
    problems = []
    async with _client(node) as api:
        listed = await api.get("/containers")
        if listed.status_code != 200:
            return [f"GET /containers: {listed.status_code} {listed.text}"]
        for summary in listed.json()["containers"]:
            internal_id = summary["internal_id"]
            gone = await api.delete(f"/containers/{internal_id}")
            if gone.status_code not in (200, 404):
                problems.append(f"DELETE /containers/{internal_id}: {gone.status_code} {gone.text}")

        async def none_left() -> bool:
            return (await api.get("/containers")).json()["containers"] == []

        await wait_for(none_left, within=60, what="the fuzzer's containers to be deleted")
    return problems


@pytest.fixture
async def target(
    start_agent: StartAgent, make_config: Callable[..., Path], docker_host: str
) -> AsyncIterator[tuple[RunningAgent, Target]]:
    """A node on the real engine with one ready container, a volume and a pool port."""
    prefix = MADE.new_prefix()
    # Pulls off: a generated URL would be resolved by the node's DNS (traffic off loopback);
    # the route still validates its body first, so the fuzzer exercises that part.
    config = make_config(
        {
            "containers": {"stop_timeout": 2, "install_timeout": 60},
            "files": {"pulls_enabled": False},
        }
    )
    node = await start_agent(config, environ={"DOCKER_HOST": docker_host})
    try:
        async with _client(node) as api:
            volume = (await api.post("/volumes")).json()["volume_id"]
            added = await api.post(
                "/network/ports",
                json={"ip": "127.0.0.1", "port": POOL_PORT, "protocol": "tcp"},
            )
            assert added.status_code == 200, added.text
            internal_id = f"{prefix}-fuzz"
            made = await api.post(
                "/containers",
                json={
                    "internal_id": internal_id,
                    "image": TEST_IMAGE,
                    "volume_id": volume,
                    "startup_command": "echo ready; sleep 3600",
                },
            )
            assert made.status_code == 200, made.text

            async def ready() -> bool:
                got = await api.get(f"/containers/{internal_id}")
                return got.json().get("install_state") == "ready"

            await wait_for(ready, within=60, what="the fuzz target's install")
        yield node, Target(internal_id, volume, "127.0.0.1", POOL_PORT, f"{prefix}-made")
    finally:
        try:
            problems = await _delete_all_containers(node)
        finally:
            await node.stop()
        assert not problems, "\n".join(problems)


# --- the fuzzing --------------------------------------------------------------------------


def fuzzed_operations(document: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    """``(method, path)`` of every HTTP operation in run order, and the skipped ones:
    WebSockets, and endless streams (Server-Sent Events)."""
    found, skipped = [], []
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHOD_ORDER:
                continue
            ok = operation.get("responses", {}).get("200", {}).get("content", {})
            if operation.get("x-websocket") or "text/event-stream" in ok:
                skipped.append(f"{method.upper()} {path}")
                continue
            found.append((method, path))
    found.sort(key=lambda op: (METHOD_ORDER[op[0]], op[1]))
    return found, skipped


def fuzz_operation(
    schema: schemathesis.BaseSchema, method: str, path: str, base_url: str, t: Target
) -> list[str]:
    """Run the examples of one operation (in a worker thread, blocking); return the
    failures: the first failing request hypothesis met, with the checks it failed."""
    operation = schema[path][method.upper()]
    names = {parameter.name for parameter in operation.path_parameters}
    real = {name: value for name, value in t.path_values().items() if name in names}
    # Generated requests, the same with real ids, and the document's own examples.
    strategies = [operation.as_strategy()]
    if real:
        strategies.append(operation.as_strategy(path_parameters=real))
    strategies += schema.get_strategies_from_examples(operation, path_parameters=real or None)
    body = t.bodies().get(f"{method.upper()} {path}")
    if body is not None:
        strategies.append(operation.as_strategy(body=body))
    strategy = st.one_of(strategies)
    failures: list[str] = []
    with requests.Session() as session:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
            verbosity=hypothesis.Verbosity.quiet,
        )
        @given(case=strategy)
        def example(case: schemathesis.Case) -> None:
            case.call_and_validate(
                base_url=base_url, session=session, headers=HEADERS, checks=CHECKS, timeout=30
            )

        try:
            example()
        except (Exception, BaseExceptionGroup) as exc:  # each is reported with its request
            notes = "\n".join(getattr(exc, "__notes__", []))
            failures.append(f"{method.upper()} {path}: {exc}\n{notes}")
    return failures


async def still_serving(node: RunningAgent) -> list[str]:
    """What is wrong with the agent after the run: ping, the supervisor's listing, and
    every service still running (the readiness probe's ``plugins`` check)."""
    problems = []
    async with _client(node) as api:
        ping = await api.get("/api/v1/public/ping")
        if ping.status_code != 200:
            problems.append(f"ping: {ping.status_code} {ping.text}")
        ready = await api.get("/health/ready")
        if ready.status_code != 200 or ready.json()["checks"]["plugins"] != "ok":
            problems.append(f"readiness: {ready.status_code} {ready.text}")
        listed = await api.get("/containers")
        if listed.status_code != 200:
            problems.append(f"GET /containers: {listed.status_code} {listed.text}")
    return problems


async def test_every_documented_operation_survives_fuzzing(
    target: tuple[RunningAgent, Target], trouble: Trouble
) -> None:
    node, t = target
    async with httpx.AsyncClient(base_url=node.url, timeout=30) as anon:
        got = await anon.get("/openapi.json")  # no headers: the document is public
    assert got.status_code == 200, got.text
    document = got.json()
    operations, skipped = fuzzed_operations(document)
    assert ("post", "/containers") in operations  # the document is the real one
    assert "GET /ws/{internal_id}" in skipped
    assert "GET /events" in skipped
    wanted = os.environ.get("LIGHTD_FUZZ_OPERATIONS", "")
    schema = schemathesis.openapi.from_dict(document)
    trouble.take()  # the set-up's own log is not the fuzzer's business
    failures: list[str] = []
    timings: list[tuple[float, str]] = []
    for method, path in operations:
        label = f"{method.upper()} {path}"
        if not re.search(wanted, label):
            continue
        started = time.monotonic()
        with trio.fail_after(120):
            failures += await trio.to_thread.run_sync(
                lambda m=method, p=path: fuzz_operation(schema, m, p, node.url, t),
                abandon_on_cancel=True,
            )
        timings.append((time.monotonic() - started, label))
        failures += [f"{label}: log: {text}" for text in trouble.take()]
    failures += await still_serving(node)
    slowest = ", ".join(f"{label} {took:.1f}s" for took, label in sorted(timings)[-5:])
    print(f"fuzzed {len(timings)} operations; slowest: {slowest}")
    assert not failures, "\n\n".join(failures)
