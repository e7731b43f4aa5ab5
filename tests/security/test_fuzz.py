"""Property-based fuzzing of every JSON route of a real agent (contract §7.6).

Every POST/PUT/PATCH route of the running agent's URL map gets hostile JSON bodies — lone
surrogates and NUL in strings, huge and non-finite numbers (``1e300``, raw ``1e999``,
``NaN``, ``-0``, 5000-digit integers), nesting deeper than 64, wrong types, unknown fields
— both as whole bodies and as single fields of a valid body, with odd path arguments.
The agent runs on the real engine with a container, a volume and pool ports, so ids hit
real objects. No answer may be a 5xx, the agent's log must stay free of tracebacks and
errors, and afterwards ping and the container listing still answer.

Bounded for CI: a fixed number of examples per route, derandomized (the same examples
every run), no shrinking (a stateful server makes it slow; the failing request is
printed as it was sent), no example database on disk. Each request goes on a connection
of its own (a reused one has a bug of its own, tested apart below). The agent's event loop
must never be held past half a second meanwhile.

To look closer: ``LIGHTD_FUZZ_ROUTES=<part of a rule>`` fuzzes only the matching routes,
``LIGHTD_FUZZ_TRACE=<file>`` appends every request, its status and its time to a file.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import docker
import httpx
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from ..conftest import (
    MADE,
    MASTER,
    TEST_IMAGE,
    VENDOR,
    RunningAgent,
    StartAgent,
    Trouble,
    wait_for,
)

JSON_METHODS = {"POST", "PUT", "PATCH"}
EXAMPLES_PER_ROUTE = 14
POOL_PORT = 30650

# --- JSON text with what ``json.dumps`` cannot say --------------------------------------


@attrs.frozen
class Raw:
    """JSON text inserted as is: ``1e999``, ``-0``, ``NaN``, nesting past any limit."""

    text: str


def to_json(value: Any) -> str:
    """Serialize with ``Raw`` pieces; strings are ASCII-escaped, so lone surrogates and NUL
    travel as ``\\ud800`` and ``\\u0000`` escapes, which the server must decode and judge."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return json.dumps(value)


ODD_TEXT = [
    "\ud800",
    "\udfff",
    "a\ud800b",
    "\x00",
    "a\x00b",
    "",
    " ",
    "..",
    "../../../../etc/passwd",
    "/etc",
    "\\..\\x",
    "%00",
    "\u202e",
    "\ufeff",
    "\uff15m",  # full-width digit
    "\u0665m",  # Arabic-Indic digit
    " 5m",
    "a" * 5000,
    "😀",
]


def texts() -> st.SearchStrategy[str]:
    surrogate_or_nul = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\x00"])
    return st.one_of(
        st.sampled_from(ODD_TEXT),
        st.lists(st.one_of(st.characters(), surrogate_or_nul), max_size=12).map("".join),
    )


def numbers() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(
            [
                1e300,
                -1e300,
                5e-324,
                1e-9,
                2**63,
                2**64 + 1,
                -(2**63) - 1,
                -1,
                0,
                Raw("-0"),
                Raw("1e999"),
                Raw("-1e999"),
                Raw("NaN"),
                Raw("Infinity"),
                Raw("-Infinity"),
                Raw("1" * 5000),  # past Python's int-from-text digit limit
            ]
        ),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
    )


def deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    return Raw('{"a":' * depth + "1" + "}" * depth)


def nested() -> st.SearchStrategy[Raw]:
    return st.builds(
        deep, st.sampled_from([65, 100, 1000, 3000, 50000]), st.sampled_from(["list", "dict"])
    )


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(texts(), numbers(), st.sampled_from([None, True, False]))


def hostile() -> st.SearchStrategy[Any]:
    """Any value a field may receive: scalars, wrong containers, deep nesting."""
    return st.one_of(
        scalars(),
        nested(),
        st.recursive(
            scalars(),
            lambda inner: st.one_of(
                st.lists(inner, max_size=4),
                st.dictionaries(texts(), inner, max_size=4),
            ),
            max_leaves=8,
        ),
    )


# --- what a valid request looks like, per route -----------------------------------------


@attrs.frozen
class Target:
    """The real objects of the fuzzed agent, so path ids and body ids hit something."""

    container: str
    spare_ids: tuple[str, ...]  # ids a create may take (at most these get made)
    volume: str
    port: int


def templates(t: Target) -> dict[str, dict[str, Any]]:
    """Valid bodies by rule: mutating one field at a time reaches each field's checks."""
    port = {"ip": "127.0.0.1", "port": t.port, "protocol": "tcp"}
    return {
        "/containers": {
            "internal_id": t.container,
            "image": TEST_IMAGE,
            "volume_id": t.volume,
            "startup_command": "echo ready; sleep 3600",
            "start_pattern": "ready",
            "ports": [{**port, "container_port": 25565}],
            "limits": {"memory": 64 * 1024 * 1024, "cpu": 0.5, "pids": 64, "swap": 0},
            "environment": {"A": "b"},
            "install_script": "echo hi",
            "stop_command": "stop",
            "install_image": TEST_IMAGE,
            "start_on_completion": False,
            "mount": {},
        },
        "/containers/<internal_id>/reinstall": {"image": TEST_IMAGE, "install_script": "echo"},
        "/containers/<internal_id>/rebind-network": {"ports": [{**port, "container_port": 1}]},
        "/containers/<internal_id>/stop": {"timeout": 5},
        "/auth/tokens": {
            "ttl": "5m",
            "containers": [t.container],
            "volumes": [t.volume],
            "permissions": ["read"],
            "remove_on_use": False,
        },
        "/auth/tokens/revoke": {"containers": [t.container], "all": False},
        "/volumes/<volume_id>/files": {"path": "a.txt", "content": "x", "encoding": "utf-8"},
        "/volumes/<volume_id>/write": {"filename": "a.txt", "content": "x"},
        "/volumes/<volume_id>/folders": {"path": "d"},
        "/volumes/<volume_id>/create-folder": {"root": "/", "name": "d"},
        "/volumes/<volume_id>/copy": {"source": "a.txt", "destination": "b.txt"},
        "/volumes/<volume_id>/compress": {
            "format": "zip",
            "sources": ["a.txt"],
            "output_name": "o",
        },
        "/volumes/<volume_id>/decompress": {"file": "o.zip", "destination": "out"},
        "/network/ports": port,
        "/network/ports/<ip>/<port>/use": {"in_use": True},
        "/network/ports/bulk-delete": {"ports": [{"ip": "127.0.0.1", "port": t.port + 1}]},
        "/network/ports/bulk": {"ip": "127.0.0.1", "start": t.port + 1, "end": t.port + 3},
    }


def path_args(t: Target) -> dict[str, st.SearchStrategy[str]]:
    """Real ids most of the time, odd text otherwise."""
    odd = texts()
    return {
        "internal_id": st.one_of(st.just(t.container), st.just(t.container), odd),
        "volume_id": st.one_of(st.just(t.volume), st.just(t.volume), odd),
        "ip": st.one_of(st.just("127.0.0.1"), odd),
        "port": st.one_of(st.just(str(t.port)), odd, numbers().map(to_json)),
    }


@st.composite
def bodies(draw: st.DrawFn, template: dict[str, Any], t: Target) -> str:
    """A whole hostile body, or the template with fields replaced and unknown ones added."""
    shape = draw(st.sampled_from(["whole", "fields", "fields", "fields", "unknown"]))
    if shape == "whole" or not template:
        return to_json(draw(hostile()))
    body = dict(template)
    if shape == "unknown":
        body[draw(texts())] = draw(hostile())
        return to_json(body)
    for key in draw(st.lists(st.sampled_from(sorted(body)), min_size=1, max_size=2, unique=True)):
        value = body[key]
        if isinstance(value, list) and value and isinstance(value[0], dict) and draw(st.booleans()):
            item = dict(value[0])  # one level down: ports[0].port, …
            item[draw(st.sampled_from(sorted(item)))] = draw(hostile())
            body[key] = [item]
        elif isinstance(value, dict) and value and draw(st.booleans()):
            inner = dict(value)
            inner[draw(st.sampled_from(sorted(inner)))] = draw(hostile())
            body[key] = inner
        else:
            body[key] = draw(hostile())
    if "internal_id" in body and body["internal_id"] == t.container and draw(st.booleans()):
        body["internal_id"] = draw(st.sampled_from(t.spare_ids))  # a create may happen
    return to_json(body)


def fill(rule: str, args: dict[str, str]) -> str:
    path = rule
    for name, value in args.items():
        encoded = quote(value.encode("utf-8", "surrogatepass"), safe="")
        path = path.replace(f"<{name}>", encoded).replace(f"<int:{name}>", encoded)
    return path


# --- the target agent -----------------------------------------------------------------


@pytest.fixture
async def target(
    start_agent: StartAgent, make_config: Callable[..., Path], docker_host: str
) -> Any:
    """A node with one ready container, a volume and pool ports; stopped and swept after."""
    prefix = MADE.new_prefix()
    config = make_config({"containers": {"stop_timeout": 2, "install_timeout": 60}})
    node = await start_agent(config, environ={"DOCKER_HOST": docker_host})
    try:
        async with _client(node) as api:
            volume = (await api.post("/volumes")).json()["volume_id"]
            for port in range(POOL_PORT, POOL_PORT + 4):
                added = await api.post(
                    "/network/ports", json={"ip": "127.0.0.1", "port": port, "protocol": "tcp"}
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
        spare = tuple(f"{prefix}-n{n}" for n in range(3))
        yield node, Target(internal_id, spare, volume, POOL_PORT)
    finally:
        await node.stop()
        await trio.to_thread.run_sync(lambda: _sweep(docker_host, prefix))


def _sweep(docker_host: str, prefix: str) -> None:
    client = docker.DockerClient(base_url=docker_host)
    try:
        for c in client.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith(prefix):
                c.remove(force=True)
    finally:
        client.close()


def _client(node: RunningAgent) -> httpx.AsyncClient:
    headers = {"Accept": VENDOR, "Authorization": f"Bearer {MASTER}"}
    return httpx.AsyncClient(base_url=node.url, headers=headers, timeout=30)


def json_routes(node: RunningAgent) -> list[tuple[str, str]]:
    """(method, rule) of every HTTP route of the running app that takes a JSON body."""
    app = node.agent.app
    assert app is not None
    found = set()
    for rule in app.url_map.iter_rules():
        if getattr(rule, "websocket", False):
            continue
        for method in sorted((rule.methods or set()) & JSON_METHODS):
            found.add((method, rule.rule))
    return sorted(found)


# --- the fuzzing ----------------------------------------------------------------------


def fuzz_route(url: str, method: str, rule: str, t: Target, trouble: Trouble) -> list[str]:
    """Run the examples of one route (in a worker thread, with a blocking client); return
    the failures: the first 5xx hypothesis met, and what the log gained meanwhile."""
    template = templates(t).get(rule, {})
    args = {name: strategy for name, strategy in path_args(t).items() if f"<{name}>" in rule}
    headers = {
        "Accept": VENDOR,
        "Authorization": f"Bearer {MASTER}",
        "Content-Type": "application/json",
        # A connection per request: a reused one may hang after an early answer (see
        # ``test_a_body_left_unread_does_not_stall_the_connection``), which would hide
        # what each body does.
        "Connection": "close",
    }
    failures: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=10) as http:

        @settings(
            max_examples=EXAMPLES_PER_ROUTE,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False,
        )
        @given(body=bodies(template, t), values=st.fixed_dictionaries(args))
        def example(body: str, values: dict[str, str]) -> None:
            path = fill(rule, values)
            raw = body.encode("utf-8", "surrogatepass")
            if os.environ.get("LIGHTD_FUZZ_TRACE"):
                with open(os.environ["LIGHTD_FUZZ_TRACE"], "a") as out:
                    out.write(f"   ...  {method} {path} {raw[:200]!r}\n")
            started = time.monotonic()
            response = http.request(method, path, content=raw)
            took = time.monotonic() - started
            if os.environ.get("LIGHTD_FUZZ_TRACE"):
                with open(os.environ["LIGHTD_FUZZ_TRACE"], "a") as out:
                    out.write(f"{took:7.3f} {response.status_code} {method} {path} {raw[:200]!r}\n")
            shown = raw if len(raw) < 600 else raw[:300] + b"..." + raw[-100:]
            note(f"{method} {path} body={shown!r} -> {response.status_code} {response.text[:500]}")
            assert response.status_code < 500, f"{method} {rule}: {response.status_code}"

        try:
            example()
        except Exception as exc:  # every failure is reported with its example
            notes = "\n".join(getattr(exc, "__notes__", []))
            failures.append(f"{exc}\n{notes}")
    failures += [f"{method} {rule}: log: {text}" for text in trouble.take()]
    return failures


async def still_serving(node: RunningAgent, t: Target) -> None:
    async with _client(node) as api:
        ping = await api.get("/api/v1/public/ping")
        assert ping.status_code == 200, ping.text
        listed = await api.get("/containers")
        assert listed.status_code == 200, listed.text
        ids = {c["internal_id"] for c in listed.json()["containers"]}
        assert t.container in ids


async def test_every_json_route_answers_hostile_bodies_without_5xx(
    target: tuple[RunningAgent, Target], trouble: Trouble
) -> None:
    node, t = target
    routes = json_routes(node)
    assert ("POST", "/containers") in routes  # the map is the real one
    trouble.take()  # the set-up's own log is not the fuzzer's business
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        lag = LoopLag()
        nursery.start_soon(lag.watch)
        for method, rule in routes:
            if os.environ.get("LIGHTD_FUZZ_ROUTES", "") not in rule:
                continue
            with trio.fail_after(120):
                failures += await trio.to_thread.run_sync(
                    lambda m=method, r=rule: fuzz_route(node.url, m, r, t, trouble)
                )
            await still_serving(node, t)
        nursery.cancel_scope.cancel()
    failures += [f"the event loop was held {s:.2f} s" for s in lag.stalls]
    assert not failures, "\n\n".join(failures)


class LoopLag:
    """Notes every time the agent's event loop (this test's: the agent runs in-process)
    was held past ``LIMIT`` seconds: a stall hurts every tenant, whatever the answers."""

    LIMIT = 0.5

    def __init__(self) -> None:
        self.stalls: list[float] = []

    async def watch(self) -> None:
        while True:
            before = trio.current_time()
            await trio.sleep(0.01)
            held = trio.current_time() - before - 0.01
            if held > self.LIMIT:
                self.stalls.append(held)


async def test_a_body_left_unread_does_not_stall_the_connection(
    target: tuple[RunningAgent, Target],
) -> None:
    """Found by the fuzzing: every request on a reused connection must be answered, also
    after one the agent answered without reading its body."""
    node, _ = target
    headers = {
        "Accept": VENDOR,
        "Authorization": f"Bearer {MASTER}",
        "Content-Type": "application/json",
    }

    def send() -> list[str]:
        stalled = []
        with httpx.Client(base_url=node.url, headers=headers, timeout=1) as http:
            for n in range(40):
                try:
                    http.post("/containers/nope/kill", content=b"{}")
                except httpx.TimeoutException:
                    stalled.append(f"request {n}")
        return stalled

    with trio.fail_after(90):
        stalled = await trio.to_thread.run_sync(send)
    assert stalled == [], f"no answer within 1 s to {stalled}"
