"""The job runner (contract §14) through a real agent and a test-only plugin.

The plugin below registers two job kinds and a route that submits them, the way the
volumes, backups and images features will: ``test.write`` writes partial output to a
recorded temporary path of a real volume, reports progress, then waits until the test
releases it (``JobsPlugin.release``) and ends done, failed or crashed as asked;
``test.instant`` ends at once. Everything is observed through the HTTP API, the files
on disk and the store; waiting is polling with a deadline.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from lightd import (
    JOBS,
    VOLUMES,
    Agent,
    JobContext,
    JobFailed,
    JobLimitReached,
    JobView,
    TooManyRequests,
    hookimpl,
)
from lightd.api import read_json
from lightd.files import TEMP_PREFIX, Root, parse
from quart import Blueprint

from .conftest import Clock, RunningAgent, StartAgent, api_client, wait_for

HEX24 = "0123456789abcdef01234567"


@attrs.frozen
class SubmitBody:
    volume_id: str | None = None
    internal_id: str | None = None
    #: "done", "fail" (JobFailed), "crash" (a bug: RuntimeError).
    outcome: str = "done"
    limit: int | None = None


class JobsPlugin:
    """Registers the test kinds, submits them over HTTP, records the notifications."""

    def __init__(self) -> None:
        self.gates: defaultdict[str, trio.Event] = defaultdict(trio.Event)
        self.changed: list[JobView] = []
        self.done: list[JobView] = []
        self.cleaned: list[str] = []
        self.started: list[str] = []

    def release(self, job_id: str) -> None:
        self.gates[job_id].set()

    @hookimpl
    def lightd_configure(self, agent: Agent) -> None:
        jobs = agent.stash[JOBS]
        jobs.register_kind("test.write", permission="files")
        jobs.register_kind("test.instant")

    @hookimpl
    def lightd_add_routes(self, agent: Agent) -> list[Blueprint]:
        bp = Blueprint("jobtest", __name__)
        plugin = self

        async def write(job: JobContext, outcome: str) -> None:
            plugin.started.append(job.id)
            job.on_cleanup(lambda: plugin.cleaned.append(job.id))
            if job.volume_id is not None:
                rel = await job.temp_path(parse("sub"))
                folder = await agent.stash[VOLUMES].path(job.volume_id)
                assert folder is not None

                def partial() -> None:
                    with Root.open_volume(folder) as root:
                        root.write_file(rel, b"partial output")

                await trio.to_thread.run_sync(partial)
            job.progress(1, 3)
            await plugin.gates[job.id].wait()
            job.progress(2)
            if outcome == "fail":
                raise JobFailed("Boom at step 2")
            if outcome == "crash":
                raise RuntimeError("secret /etc/shadow detail")
            job.progress(3)
            job.result = {"steps": 3}

        @bp.post("/test/jobs")
        async def submit() -> tuple[dict[str, str], int]:
            body = await read_json(SubmitBody)
            try:
                view = await agent.stash[JOBS].submit(
                    "test.write",
                    lambda job: write(job, body.outcome),
                    volume_id=body.volume_id,
                    internal_id=body.internal_id,
                    unit="steps",
                    limit_key=None if body.limit is None else f"test:{body.volume_id}",
                    limit=body.limit,
                )
            except JobLimitReached:
                raise TooManyRequests("Too many test jobs in progress") from None
            return {"message": "Test started", "job_id": view.id}, 202

        return [bp]

    @hookimpl
    def lightd_job_changed(self, agent: Agent, job: JobView) -> None:
        self.changed.append(job)

    @hookimpl
    async def lightd_job_done(self, agent: Agent, job: JobView) -> None:
        await trio.lowlevel.checkpoint()
        self.done.append(job)


@attrs.define
class Node:
    running: RunningAgent
    plugin: JobsPlugin
    client: httpx.AsyncClient

    @property
    def agent(self) -> Agent:
        return self.running.agent

    async def volume(self) -> tuple[str, Path]:
        response = await self.client.post("/volumes")
        assert response.status_code == 201
        volume_id = response.json()["volume_id"]
        return volume_id, self.agent.paths.volumes / volume_id

    async def submit(self, **body: Any) -> str:
        response = await self.client.post("/test/jobs", json=body)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    async def job(self, job_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def until(self, job_id: str, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def holds() -> bool:
            seen.update(await self.job(job_id))
            return check(seen)

        await wait_for(holds, what=f"job {job_id}: {seen}")
        return seen

    async def until_state(self, job_id: str, state: str) -> dict[str, Any]:
        return await self.until(job_id, lambda j: j["state"] == state)


def temps_in(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


@pytest.fixture
async def node(start_agent: StartAgent, config_path: Path) -> Any:
    plugin = JobsPlugin()
    running = await start_agent(config_path, extra_plugins=(("jobtest", plugin),))
    async with api_client(running.url) as client:
        yield Node(running, plugin, client)


# --- progress, result, failure ---------------------------------------------------------


async def test_job_runs_with_progress_and_ends_done_with_its_result(node: Node) -> None:
    volume_id, folder = await node.volume()
    job_id = await node.submit(volume_id=volume_id, internal_id="srv-1")
    body = await node.until(job_id, lambda j: j["progress"]["done"] == 1)
    assert body["state"] == "running"
    assert body["progress"] == {"done": 1, "total": 3, "unit": "steps"}
    assert body["kind"] == "test.write"
    assert body["volume_id"] == volume_id and body["internal_id"] == "srv-1"
    assert body["finished_at"] is None and body["error"] is None and body["result"] is None
    assert abs(body["created_at"] - node.agent.clock()) < 5
    assert list(body) == [
        "id",
        "kind",
        "state",
        "progress",
        "volume_id",
        "internal_id",
        "created_at",
        "finished_at",
        "error",
        "result",
    ]
    assert [p.parent.name for p in temps_in(folder)] == ["sub"]  # partial output exists
    node.plugin.release(job_id)
    body = await node.until_state(job_id, "done")
    assert body["result"] == {"steps": 3}
    assert body["progress"] == {"done": 3, "total": 3, "unit": "steps"}
    assert body["finished_at"] is not None and body["error"] is None
    assert temps_in(folder) == []  # a temporary left at the end goes too
    assert node.plugin.cleaned == []  # cleanup callbacks are for failures only


async def test_failed_job_has_its_error_and_leaves_nothing(node: Node) -> None:
    volume_id, folder = await node.volume()
    job_id = await node.submit(volume_id=volume_id, outcome="fail")
    await node.until(job_id, lambda j: j["progress"]["done"] == 1)
    assert temps_in(folder) != []
    node.plugin.release(job_id)
    body = await node.until_state(job_id, "failed")
    assert body["error"] == "Boom at step 2"
    assert body["result"] is None
    assert temps_in(folder) == []
    assert node.plugin.cleaned == [job_id]


async def test_a_crashing_job_says_only_internal_error(node: Node) -> None:
    job_id = await node.submit(outcome="crash")
    await node.until(job_id, lambda j: j["progress"]["done"] == 1)
    node.plugin.release(job_id)
    body = await node.until_state(job_id, "failed")
    assert body["error"] == "Internal error"
    assert "shadow" not in json.dumps(body)


# --- notifications ---------------------------------------------------------------------


async def test_hook_lightd_job_changed(node: Node) -> None:
    job_id = await node.submit()
    await node.until(job_id, lambda j: j["progress"]["done"] == 1)

    async def announced() -> bool:
        return any(j.id == job_id and j.done == 1 for j in node.plugin.changed)

    await wait_for(announced, what="a job_changed with the progress")
    assert {j.state for j in node.plugin.changed if j.id == job_id} <= {"queued", "running"}
    node.plugin.release(job_id)
    await node.until_state(job_id, "done")
    assert all(not j.finished for j in node.plugin.changed)


async def test_job_changed_is_throttled(node: Node) -> None:
    """A job reporting progress thousands of times a second is announced at most twice
    a second (plus its start)."""
    jobs = node.agent.stash[JOBS]

    async def chatty(job: JobContext) -> None:
        began = trio.current_time()
        count = 0
        while trio.current_time() - began < 1.6:
            count += 1
            job.progress(count)
            await trio.lowlevel.checkpoint()

    view = await jobs.submit("test.instant", chatty)
    done = await jobs.wait(view.id)
    assert done.state == "done" and done.done > 100
    announced = [j for j in node.plugin.changed if j.id == view.id]
    assert 1 <= len(announced) <= 6


async def test_hook_lightd_job_done(node: Node) -> None:
    job_id = await node.submit(outcome="fail")
    node.plugin.release(job_id)
    await node.until_state(job_id, "failed")

    async def told() -> bool:
        return [j.id for j in node.plugin.done] == [job_id]

    await wait_for(told, what="one job_done")
    (done,) = node.plugin.done
    assert done.state == "failed" and done.error == "Boom at step 2"
    assert done.to_json() == await node.job(job_id)


# --- listing and ids -------------------------------------------------------------------


async def test_list_filters_by_volume_and_container(node: Node) -> None:
    a, _ = await node.volume()
    b, _ = await node.volume()
    first = await node.submit(volume_id=a)
    second = await node.submit(volume_id=b, internal_id="srv-b")
    listed = (await node.client.get("/jobs")).json()["jobs"]
    assert [j["id"] for j in listed] == [second, first]  # newest first
    only_a = (await node.client.get("/jobs", params={"volume_id": a.upper()})).json()["jobs"]
    assert [j["id"] for j in only_a] == [first]
    only_b = (await node.client.get("/jobs", params={"internal_id": "srv-b"})).json()["jobs"]
    assert [j["id"] for j in only_b] == [second]
    for job_id in (first, second):
        node.plugin.release(job_id)
        await node.until_state(job_id, "done")


async def test_unknown_and_malformed_ids(node: Node) -> None:
    for method in ("GET", "DELETE"):
        response = await node.client.request(method, f"/jobs/{HEX24}")
        assert response.status_code == 404
        assert response.json()["error"] == "Job not found"
        for bad in ("nope", HEX24.upper(), HEX24 + "0", "..%2f..%2fetc"):
            response = await node.client.request(method, f"/jobs/{bad}")
            assert response.status_code in (400, 404), bad
            if response.status_code == 400:
                assert response.json()["error"] == "Invalid job id"


async def test_job_routes_need_auth(node: Node) -> None:
    async with api_client(node.running.url, token=None) as anon:
        assert (await anon.get("/jobs")).status_code == 401
        assert (await anon.get(f"/jobs/{HEX24}")).status_code == 401
        assert (await anon.delete(f"/jobs/{HEX24}")).status_code == 401


# --- cancellation ----------------------------------------------------------------------


async def test_cancel_runs_cleanup_and_leaves_nothing(node: Node) -> None:
    volume_id, folder = await node.volume()
    job_id = await node.submit(volume_id=volume_id)
    await node.until(job_id, lambda j: j["progress"]["done"] == 1)
    assert len(temps_in(folder)) == 1
    response = await node.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200
    assert response.json() == {"message": "Job cancelled"}
    body = await node.job(job_id)
    assert body["state"] == "cancelled" and body["finished_at"] is not None
    assert temps_in(folder) == []
    assert node.plugin.cleaned == [job_id]
    again = await node.client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409
    assert again.json()["error"] == "Job already finished"


async def test_a_finished_job_cannot_be_cancelled(node: Node) -> None:
    job_id = await node.submit()
    node.plugin.release(job_id)
    await node.until_state(job_id, "done")
    response = await node.client.delete(f"/jobs/{job_id}")
    assert response.status_code == 409
    assert response.json()["error"] == "Job already finished"


# --- limits ----------------------------------------------------------------------------


async def test_global_concurrency_queues_jobs(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    plugin = JobsPlugin()
    running = await start_agent(
        make_config({"jobs": {"max_running": 1}}), extra_plugins=(("jobtest", plugin),)
    )
    async with api_client(running.url) as client:
        node = Node(running, plugin, client)
        first = await node.submit()
        second = await node.submit()
        third = await node.submit()
        await node.until(first, lambda j: j["progress"]["done"] == 1)
        assert (await node.job(second))["state"] == "queued"
        # a queued job is cancelled without ever starting
        assert (await client.delete(f"/jobs/{third}")).status_code == 200
        assert (await node.job(third))["state"] == "cancelled"
        plugin.release(first)
        await node.until_state(first, "done")
        await node.until(second, lambda j: j["progress"]["done"] == 1)
        plugin.release(second)
        await node.until_state(second, "done")
        assert third not in plugin.started


async def test_per_key_limit_refuses_with_429(node: Node) -> None:
    volume_id, _ = await node.volume()
    other, _ = await node.volume()
    first = await node.submit(volume_id=volume_id, limit=2)
    second = await node.submit(volume_id=volume_id, limit=2)
    refused = await node.client.post("/test/jobs", json={"volume_id": volume_id, "limit": 2})
    assert refused.status_code == 429
    assert refused.json()["error"] == "Too many test jobs in progress"
    elsewhere = await node.submit(volume_id=other, limit=2)  # another key
    node.plugin.release(first)
    await node.until_state(first, "done")
    third = await node.submit(volume_id=volume_id, limit=2)  # a place is free again
    for job_id in (second, elsewhere, third):
        node.plugin.release(job_id)
        await node.until_state(job_id, "done")


# --- token scope -----------------------------------------------------------------------


async def test_scoped_token_sees_only_jobs_of_its_volumes(node: Node) -> None:
    mine, _ = await node.volume()
    theirs, _ = await node.volume()
    my_job = await node.submit(volume_id=mine)
    their_job = await node.submit(volume_id=theirs)
    plain = await node.submit()
    minted = await node.client.post(
        "/auth/tokens", json={"ttl": "5m", "volumes": [mine], "permissions": ["read"]}
    )
    token = minted.json()["token"]
    async with api_client(node.running.url, token=token) as scoped:
        listed = (await scoped.get("/jobs")).json()["jobs"]
        assert [j["id"] for j in listed] == [my_job]
        assert (await scoped.get(f"/jobs/{my_job}")).status_code == 200
        assert (await scoped.get(f"/jobs/{their_job}")).status_code == 401
        assert (await scoped.get(f"/jobs/{plain}")).status_code == 401
        refused = await scoped.delete(f"/jobs/{my_job}")
        assert refused.status_code == 403
        assert refused.json()["error"] == "Token lacks permission: files"
    minted = await node.client.post(
        "/auth/tokens", json={"ttl": "5m", "volumes": [mine], "permissions": ["files"]}
    )
    async with api_client(node.running.url, token=minted.json()["token"]) as files:
        assert (await files.delete(f"/jobs/{their_job}")).status_code == 401
        assert (await files.delete(f"/jobs/{my_job}")).status_code == 200
    for job_id in (their_job, plain):
        node.plugin.release(job_id)
        await node.until_state(job_id, "done")


# --- restarts --------------------------------------------------------------------------


async def test_stopping_the_agent_fails_running_jobs_and_removes_partial_output(
    start_agent: StartAgent, config_path: Path
) -> None:
    plugin = JobsPlugin()
    running = await start_agent(config_path, extra_plugins=(("jobtest", plugin),))
    async with api_client(running.url) as client:
        node = Node(running, plugin, client)
        volume_id, folder = await node.volume()
        job_id = await node.submit(volume_id=volume_id)
        await node.until(job_id, lambda j: j["progress"]["done"] == 1)
        assert len(temps_in(folder)) == 1
    await running.stop()
    assert temps_in(folder) == []
    assert plugin.cleaned == [job_id]
    again = await start_agent(config_path, extra_plugins=(("jobtest", JobsPlugin()),))
    async with api_client(again.url) as client:
        body = (await client.get(f"/jobs/{job_id}")).json()
    assert body["state"] == "failed"
    assert body["error"] == "Interrupted by restart"
    assert body["volume_id"] == volume_id


async def test_jobs_a_crash_left_running_end_failed_with_their_temporaries_removed(
    start_agent: StartAgent, config_path: Path, tmp_path: Path
) -> None:
    """What a SIGKILL leaves: rows still ``queued``/``running`` with recorded temporary
    paths. Only names of the temporary form are removed, never through a link."""
    plugin = JobsPlugin()
    running = await start_agent(config_path, extra_plugins=(("jobtest", plugin),))
    async with api_client(running.url) as client:
        node = Node(running, plugin, client)
        volume_id, folder = await node.volume()
        job_id = await node.submit(volume_id=volume_id)
        queued_id = await node.submit(volume_id=volume_id)
        plugin.release(job_id)
        plugin.release(queued_id)
        await node.until_state(job_id, "done")
        await node.until_state(queued_id, "done")
    db = running.agent.store.path
    await running.stop()
    # As the crash left it: partial output under recorded temporary names, one of them a
    # link planted by the container pointing out of the volume.
    outside = tmp_path / "precious"
    outside.write_text("keep me")
    (folder / "sub").mkdir(exist_ok=True)
    partial = folder / "sub" / f"{TEMP_PREFIX}job-partial"
    partial.write_bytes(b"half")
    planted = folder / f"{TEMP_PREFIX}job-link"
    os.symlink(outside, planted)
    user_file = folder / "world.dat"
    user_file.write_text("the user's")
    recorded = [f"sub/{partial.name}", planted.name, "world.dat", "../escape"]
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE jobs_records SET state = 'running', finished_at = NULL, result = NULL,"
            " temps = ? WHERE id = ?",
            (json.dumps(recorded), job_id),
        )
        conn.execute(
            "UPDATE jobs_records SET state = 'queued', finished_at = NULL, result = NULL"
            " WHERE id = ?",
            (queued_id,),
        )
    conn.close()
    again = await start_agent(config_path, extra_plugins=(("jobtest", JobsPlugin()),))
    async with api_client(again.url) as client:
        for jid in (job_id, queued_id):
            body = (await client.get(f"/jobs/{jid}")).json()
            assert body["state"] == "failed", body
            assert body["error"] == "Interrupted by restart"
            assert body["finished_at"] is not None
    assert not partial.exists()
    assert not planted.is_symlink()
    assert outside.read_text() == "keep me"
    assert user_file.read_text() == "the user's"  # not a temporary name: never removed
    conn = sqlite3.connect(db)
    try:
        (temps,) = conn.execute("SELECT temps FROM jobs_records WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    assert json.loads(temps) == []


# --- retention -------------------------------------------------------------------------


async def instant(job: JobContext) -> None:
    job.result = {"ok": True}


async def test_finished_jobs_older_than_a_day_are_pruned(node: Node, clock: Clock) -> None:
    jobs = node.agent.stash[JOBS]
    old = await jobs.submit("test.instant", instant)
    await jobs.wait(old.id)
    clock.advance(25 * 3600)
    new = await jobs.submit("test.instant", instant)
    await jobs.wait(new.id)
    assert (await node.client.get(f"/jobs/{old.id}")).status_code == 404
    listed = (await node.client.get("/jobs")).json()["jobs"]
    assert [j["id"] for j in listed] == [new.id]
    ids = await node.agent.store.read(
        lambda conn: [r[0] for r in conn.execute("SELECT id FROM jobs_records")]
    )
    assert ids == [new.id]


async def test_at_most_1000_jobs_are_kept(node: Node) -> None:
    jobs = node.agent.stash[JOBS]
    blocked = await node.submit()  # running: never pruned, whatever its age
    views = [await jobs.submit("test.instant", instant) for _ in range(1005)]

    async def all_ended() -> bool:
        return all((j := jobs.get(v.id)) is None or j.finished for v in views)

    await wait_for(all_ended, within=30, what="1005 instant jobs to end")
    listed = (await node.client.get("/jobs")).json()["jobs"]
    assert len(listed) == 1000
    kept = {j["id"] for j in listed}
    assert blocked in kept
    assert {v.id for v in views[:6]}.isdisjoint(kept)  # the oldest finished went
    count = await node.agent.store.read(
        lambda conn: conn.execute("SELECT count(*) FROM jobs_records").fetchone()[0]
    )
    assert count == 1000
    node.plugin.release(blocked)
    await node.until_state(blocked, "done")


async def test_submit_refuses_unknown_kinds(node: Node) -> None:
    with pytest.raises(ValueError, match="not registered"):
        await node.agent.stash[JOBS].submit("nope", instant)
