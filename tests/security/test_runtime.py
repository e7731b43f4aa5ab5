"""Contract §7.6 for the runtime: ``start_pattern`` matching cannot stall the agent, the
power queue is bounded (duplicate restarts merged), and a crashing service's restart
back-off starts afresh after a healthy period."""

from __future__ import annotations

import itertools
import re
import time
from typing import Any

import httpx
import pytest
import trio
from lightd.containers import CONTAINERS
from lightd.containers.startpattern import BUDGET, StartPattern, check_start_pattern
from lightd.containers.supervisor import MAX_PENDING
from lightd.runtime import Service
from lightd.server import HEALTHY_SECONDS, RESTART_DELAYS, _supervise

from ..conftest import api_client
from ..containers.conftest import (
    StartNode,
    ready,
    wait_state,
)

LONG = "x" * (64 * 1024 - 1) + "\n"


# -- start_pattern ---------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r".*Server started.*", r"(x+x+)+y", r"(.*)*Done"])
async def test_a_pathological_pattern_never_holds_the_event_loop(pattern: str) -> None:
    matcher = StartPattern(pattern)
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await trio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.sleep(0.01)
            began = time.perf_counter()
            for _ in range(5):
                assert not await matcher.matches([LONG] * 4)
            spent = time.perf_counter() - began
            done = True
    # 1 ms of matching at most at a time (a backtracking match held it for seconds); the
    # bound leaves room for the scheduling of a loaded machine.
    assert worst < 0.1, f"the event loop was held {worst * 1000:.1f} ms"
    assert spent < 5 * BUDGET + 2  # each batch within its budget, give or take the load


def test_patterns_keep_pythons_syntax_and_invalid_ones_are_refused() -> None:
    assert StartPattern(r"Done \(\d+\.\d+s\)! For help").search(['Done (1.5s)! For help, "?"\n'])
    assert StartPattern(r"(?i)^server STARTED$").search(["x\n", "Server started\n"])
    assert StartPattern(r"(?P<w>\w+) (?P=w)").search(["hey hey\n"])
    assert StartPattern(r"(?<=port )\d+").search(["on port 25565\n"])
    assert not StartPattern(r"^ready$").search(["not ready\n"])
    assert check_start_pattern(r"Listening on \d+") is None
    assert check_start_pattern("(unclosed") == "missing ), unterminated subpattern at position 0"


@pytest.mark.parametrize(
    "pattern",
    [
        *(r"^Done booting", r"booting$", r"\bDone\b", r"^\d+$", r"(?i)done", r"o\n", r"^$"),
        *(r"[^x]+", r"\ADone", r"Done\Z", r"(?<=\n)Done", r"Done(?!\n)", r"(?<!a\n)Done"),
    ],
)
def test_a_batch_matches_exactly_when_one_of_its_lines_does(pattern: str) -> None:
    """Searching the joined batch first (one call) never changes what matches."""
    batches = [
        ["1\n", "2\n", "Done booting\n"],
        ["a\n", "Done\n", "b\n"],
        ["x\n", "\n", "xx\n"],
        ["Done booting now\n", "42\n"],
        ["no\n", "match\n", "here\n"],
    ]
    matcher = StartPattern(pattern)
    python = re.compile(pattern)
    for lines in batches:
        assert matcher.search(lines) == any(python.search(line) for line in lines), lines


async def test_long_lines_against_a_pathological_pattern_leave_other_requests_answered(
    start_node: StartNode, prefix: str
) -> None:
    """§7.6: a container printing 64 KiB lines against ``.*Server started.*`` (seconds a
    line for a backtracking engine) while another request is timed: each answered within
    a second."""
    node = await start_node()
    noisy, other = f"{prefix}-noisy", f"{prefix}-other"
    printer = (
        "for i in $(seq 12); do head -c 65535 /dev/zero | tr '\\000' x; echo; done;"
        " echo printed; sleep 3600"
    )
    async with api_client(node.url) as api:
        await ready(api, noisy, startup_command=printer, start_pattern=r".*Server started.*")
        await ready(api, other)
        hub = node.agent.stash[CONTAINERS].get(noisy).hub
        assert (await api.post(f"/containers/{noisy}/start")).status_code == 200
        slowest = 0.0
        with trio.fail_after(60):
            while "printed\n" not in hub.history.tail(1):
                began = time.perf_counter()
                response = await api.get(f"/containers/{other}")
                slowest = max(slowest, time.perf_counter() - began)
                assert response.status_code == 200
                await trio.sleep(0.05)
        assert slowest < 1.0, f"a request waited {slowest:.2f}s"
        assert sum(len(line) for line in hub.history.tail(20).splitlines()) >= 12 * 65535
        assert (await api.get(f"/containers/{noisy}")).json()["state"] == "starting"
        assert (await api.post(f"/containers/{noisy}/kill")).status_code == 200
        await wait_state(api, noisy, state="offline")


# -- the power queue -----------------------------------------------------------------------


async def post(api: httpx.AsyncClient, internal_id: str, action: str) -> httpx.Response:
    return await api.post(f"/containers/{internal_id}/{action}")


async def test_duplicate_restarts_merge_and_the_queue_is_bounded(
    start_node: StartNode, prefix: str
) -> None:
    node = await start_node({"containers": {"stop_timeout": 30}})
    internal_id = f"{prefix}-queue"
    # sh as PID 1 ignores SIGTERM: each stop takes its whole grace, so the queue holds.
    async with api_client(node.url) as api:
        await ready(api, internal_id, startup_command="echo up; sleep 3600")
        supervisor = node.agent.stash[CONTAINERS].get(internal_id)
        assert (await post(api, internal_id, "start")).status_code == 200
        await wait_state(api, internal_id, state="running")
        assert (await post(api, internal_id, "stop")).status_code == 200  # runs for 30 s
        for _ in range(200):
            response = await post(api, internal_id, "restart")
            assert response.status_code == 200, response.text
            assert response.json()["message"] == "Container restart initiated"
        assert [a.kind for a in supervisor._queue] == ["restart"]
        # Distinct actions queue up to the bound, then are refused.
        kinds = ["stop", "start"] * MAX_PENDING
        answers = [await post(api, internal_id, kind) for kind in kinds]
        accepted = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        assert len(accepted) == MAX_PENDING - 1
        assert len(supervisor._queue) == MAX_PENDING
        full = [r for r in refused if r.status_code == 429]
        assert full and {r.status_code for r in refused} <= {409, 429}  # 409: a stop of a
        # server that will be offline is refused as before, whatever the queue's length
        assert {r.json()["error"] for r in full} == {
            f"Too many pending actions (max {MAX_PENDING})"
        }
        # A kill still wins (it merges into nothing: one kill pending at most).
        assert (await post(api, internal_id, "kill")).status_code == 200
        assert (await post(api, internal_id, "kill")).status_code == 200
        assert [a.kind for a in supervisor._queue].count("kill") == 1
        assert (await api.delete(f"/containers/{internal_id}")).status_code == 200


# -- service restarts ----------------------------------------------------------------------


async def test_the_restart_back_off_resets_after_a_healthy_period(autojump_clock: Any) -> None:
    starts: list[float] = []

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        starts.append(trio.current_time())
        task_status.started()
        if len(starts) == 4:
            await trio.sleep(HEALTHY_SECONDS + 1)  # healthy for a while, then crashes
        if len(starts) == 6:
            return
        raise RuntimeError("crash")

    async with trio.open_nursery() as nursery:
        await nursery.start(_supervise, Service("flaky", run))
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(starts)]
    first, second, third = RESTART_DELAYS[:3]
    assert gaps == [first, second, third, HEALTHY_SECONDS + 1 + first, second]
