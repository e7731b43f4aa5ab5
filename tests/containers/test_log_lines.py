"""Every log line about a container carries its ``internal_id`` (issue 13), and its
lifecycle (install, power actions, exit) is logged at INFO."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest
from lightd.logs import JsonFormatter

from ..conftest import RunningAgent, wait_for
from .conftest import ready, wait_state


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every record at INFO and above, as the JSON format writes it."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_a_container_s_lines_carry_its_internal_id(
    api: httpx.AsyncClient,
    node: RunningAgent,
    prefix: str,
    captured: io.StringIO,
) -> None:
    out = captured
    internal_id = f"{prefix}-log"
    await ready(api, internal_id)
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")
    assert (await api.post(f"/containers/{internal_id}/kill")).status_code == 200
    await wait_state(api, internal_id, state="offline")

    async def kill_finished() -> bool:  # the state is told before the action ends
        return '"kill done' in out.getvalue()

    await wait_for(kill_finished, what="the kill's done line")
    entries = [json.loads(line) for line in out.getvalue().splitlines()]
    ours = [e for e in entries if e.get("internal_id") == internal_id]
    messages = [e["message"] for e in ours]
    for expected in (
        "created (image",
        "install started",
        "install finished: ready",
        "start requested",
        "start done",
        "kill requested",
        "kill done",
        "stopped (exit code",
    ):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert all(e["level"] == "info" for e in ours)
    # Every line of the supervisor and the install is about one container: it says which.
    per_container = [
        e
        for e in entries
        if e["logger"] in ("lightd.containers.supervisor", "lightd.containers.install")
    ]
    assert per_container and all("internal_id" in e for e in per_container)
