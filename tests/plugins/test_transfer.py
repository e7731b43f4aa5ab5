"""Contract §20 with two agents on loopback: two configs, two storage roots, one engine
(each agent's node label keeps its Docker objects apart). A server moves from the source
to the target; the target's volume is compared file by file with the source's."""

# The containers fixtures (start_node, prefix…) are imported, then named as arguments.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from lightd import hookimpl

from ..conftest import MASTER, RunningAgent, wait_for
from ..containers.conftest import (  # noqa: F401
    StartNode,
    add_port,
    containers_config,
    engine,
    get,
    prefix,
    ready,
    start_node,
    wait_state,
)
from .test_async_jobs import finished

LOOPBACK = {"transfer": {"allowed_cidrs": ["127.0.0.0/8"], "chunk_bytes": 4 << 20}}


def fill(folder: Path, random_mb: int) -> None:
    (folder / "world" / "region").mkdir(parents=True)
    for i in range(30):
        (folder / "world" / "region" / f"r.{i}.mca").write_bytes(os.urandom(2000) * 5)
    (folder / "server.properties").write_text("motd=moved\n")
    (folder / "logs").mkdir()
    (folder / "logs" / "latest.log").write_text("line\n" * 10000)
    os.symlink("server.properties", folder / "link.properties")
    with open(folder / "big.bin", "wb") as f:
        for _ in range(random_mb):
            f.write(os.urandom(1 << 20))


def tree(folder: Path) -> dict[str, str]:
    """Every entry below ``folder``: a file's sha256, a link's target, a folder."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


class Outbox:
    """What a node sends the panel (``lightd_panel_update``, the remote sync outbox)."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    @hookimpl
    def lightd_panel_update(self, key: str, update: dict[str, Any]) -> None:
        if update.get("event") == "transfer":
            self.updates.append(dict(update))


async def two_nodes(
    start_node: StartNode,
    source: dict[str, Any] | None = None,
    outboxes: tuple[Outbox, Outbox] | None = None,
) -> tuple[RunningAgent, RunningAgent]:
    a, b = outboxes or (Outbox(), Outbox())
    return (
        await start_node(source or LOOPBACK, extra=(("outbox", a),)),
        await start_node(LOOPBACK, extra=(("outbox", b),)),
    )


async def server(
    api: httpx.AsyncClient, internal_id: str, port: int, random_mb: int = 2
) -> tuple[dict[str, Any], Path]:
    response = await api.post("/volumes")
    volume_id, folder = response.json()["volume_id"], Path(response.json()["path"])
    fill(folder, random_mb)
    pool_port = await add_port(api, port)
    await ready(api, internal_id, volume_id=volume_id, ports=[pool_port])
    return await get(api, internal_id), folder


async def transfer(api: httpx.AsyncClient, internal_id: str, **body: Any) -> httpx.Response:
    return await api.post(f"/containers/{internal_id}/transfer", json=body)


async def nothing_on(target: httpx.AsyncClient, node: RunningAgent, internal_id: str) -> None:
    """The target shows nothing of a failed transfer: no container, no volume, no
    staging folder, no reserved port."""
    assert (await target.get(f"/containers/{internal_id}")).status_code == 404
    assert (await target.get("/volumes")).json()["volumes"] == []
    assert [p.name for p in node.agent.paths.volumes.iterdir()] == []
    pool = (await target.get("/network/ports")).json()
    assert all(not p.get("in_use") for p in pool.get("ports", [])), pool


async def test_a_running_then_stopped_server_moves_with_its_volume(
    start_node: StartNode, prefix: str
) -> None:
    sent, received = Outbox(), Outbox()
    source, target = await two_nodes(start_node, outboxes=(sent, received))
    sid = f"{prefix}-move"
    async with source.client() as src, target.client() as dst:
        record, folder = await server(src, sid, 31701, random_mb=128)
        assert (await src.post(f"/containers/{sid}/start")).status_code == 200
        await wait_state(src, sid, state="running")
        assert (await src.post(f"/containers/{sid}/stop")).status_code == 200
        await wait_state(src, sid, state="offline")
        before = await trio.to_thread.run_sync(tree, folder)
        target_port = await add_port(dst, 31702)
        # A token minted without permissions has the five of §12, not ``transfer``.
        plain = (await dst.post("/auth/tokens", json={"ttl": "5m"})).json()
        listed = (await dst.get("/auth/tokens")).json()["tokens"]
        assert listed[0]["permissions"] == ["read", "console", "power", "files", "manage"]
        async with target.client(plain["token"]) as limited:
            refused = await limited.post("/transfers", json={})
        assert refused.status_code == 403
        assert refused.json()["error"] == "Token lacks permission: transfer"
        # A single-use token with ``transfer``: a one-shot transfer link.
        minted = await dst.post(
            "/auth/tokens", json={"ttl": "5m", "remove_on_use": True, "permissions": ["transfer"]}
        )
        assert minted.status_code == 200, minted.text
        response = await transfer(
            src,
            sid,
            target_url=target.url,
            target_token=minted.json()["token"],
            ports=[target_port],
        )
        assert response.status_code == 202, response.text
        assert response.json()["message"] == "Transfer started"
        job = await finished(src, response.json()["job_id"], within=120)
        assert job["state"] == "done", job
        assert job["kind"] == "container.transfer"
        # The session's routes take its secret (or the master token), nothing else.
        assert (await dst.get("/transfers/" + "0" * 24)).status_code == 404
        async with target.client("lightd_" + "f" * 32) as stranger:
            assert (await stranger.get("/transfers/" + "0" * 24)).status_code == 401

        # Both nodes tell the panel.
        assert sent.updates == [{"event": "transfer", "server": sid, "status": "done"}]
        assert received.updates == [{"event": "transfer", "server": sid, "status": "done"}]
        moved = await get(dst, sid)
        assert moved["install_state"] == "ready"
        assert moved["state"] == "offline"
        assert moved["volume_id"] == record["volume_id"]
        assert moved["image"] == record["image"]
        assert moved["startup_command"] == record["startup_command"]
        assert moved["transferred"] is False
        assert [(p["ip"], p["port"]) for p in moved["ports"]] == [
            (target_port["ip"], target_port["port"])
        ]
        assert moved["ports"][0]["container_port"] == record["ports"][0]["container_port"]
        target_folder = target.agent.paths.volumes / record["volume_id"]
        assert await trio.to_thread.run_sync(tree, target_folder) == before
        assert [p.name for p in target.agent.paths.volumes.iterdir()] == [record["volume_id"]]
        received = [j for j in (await dst.get("/jobs")).json()["jobs"]]
        assert [(j["kind"], j["state"]) for j in received] == [("transfer.receive", "done")]

        # The source keeps its copy, offline and marked, until the panel deletes it.
        kept = await get(src, sid)
        assert kept["transferred"] is True
        assert await trio.to_thread.run_sync(tree, folder) == before
        start = await src.post(f"/containers/{sid}/start")
        assert start.status_code == 409
        assert start.json()["error"] == "Container was transferred"
        again = await transfer(src, sid, target_url=target.url, target_token=MASTER)
        assert again.status_code == 409

        # The panel deletes the source's copy (one engine here: Docker names are global),
        # and the moved server runs on the target.
        assert (await src.delete(f"/containers/{sid}")).status_code == 200
        assert (await dst.post(f"/containers/{sid}/start")).status_code == 200
        await wait_state(dst, sid, state="running")
        assert (await dst.post(f"/containers/{sid}/kill")).status_code == 200


async def test_a_running_server_is_not_transferred(start_node: StartNode, prefix: str) -> None:
    source, target = await two_nodes(start_node)
    sid = f"{prefix}-running"
    async with source.client() as src, target.client() as dst:
        await server(src, sid, 31703)
        assert (await src.post(f"/containers/{sid}/start")).status_code == 200
        await wait_state(src, sid, state="running")
        response = await transfer(src, sid, target_url=target.url, target_token=MASTER)
        assert response.status_code == 409
        assert response.json()["error"] == "Container is running"
        # A target on an address no transfer may reach (cloud metadata), refused at once.
        assert (await src.post(f"/containers/{sid}/kill")).status_code == 200
        await wait_state(src, sid, state="offline")
        metadata = await transfer(
            src, sid, target_url="http://169.254.169.254/", target_token=MASTER
        )
        assert metadata.status_code == 400
        assert metadata.json()["error"] == "Destination not allowed"
        await nothing_on(dst, target, sid)


@pytest.mark.parametrize("problem", ["ports", "size_limit"])
async def test_a_refused_transfer_leaves_both_sides_as_they_were(
    start_node: StartNode, prefix: str, problem: str
) -> None:
    sent = Outbox()
    source, target = await two_nodes(start_node, outboxes=(sent, Outbox()))
    sid = f"{prefix}-refused"
    async with source.client() as src, target.client() as dst:
        record, folder = await server(src, sid, 31704, random_mb=4)
        before = tree(folder)
        body: dict[str, Any] = {"target_url": target.url, "target_token": MASTER}
        if problem == "ports":  # the target's pool has no such entry
            body["ports"] = [{"ip": "127.0.0.1", "port": 31705}]
            expected = "Target refused the transfer: Port not found in network pool"
        else:  # the volume holds more than its limit on the target allows
            await add_port(dst, record["ports"][0]["port"])
            body["size_limit"] = 1 << 20
            expected = "Target refused the transfer: Disk quota exceeded"
        response = await transfer(src, sid, **body)
        assert response.status_code == 202, response.text
        job = await finished(src, response.json()["job_id"])
        assert job["state"] == "failed"
        assert job["error"] == expected
        assert sent.updates == [{"event": "transfer", "server": sid, "status": "failed"}]
        await nothing_on(dst, target, sid)
        kept = await get(src, sid)
        assert kept["transferred"] is False
        assert tree(folder) == before
        assert (await src.post(f"/containers/{sid}/start")).status_code == 200
        await wait_state(src, sid, state="running")
        assert (await src.post(f"/containers/{sid}/kill")).status_code == 200


async def test_a_transfer_cut_half_way_resumes_after_the_source_restarts(
    start_node: StartNode,
    containers_config: Any,
    prefix: str,
) -> None:
    # 40 MB of random data at most 16 MB/s: the source is stopped while it sends.
    slow = {"transfer": {**LOOPBACK["transfer"], "max_rate": 16 << 20}}
    path = containers_config(slow)
    source = await start_node(path=path)
    target = await start_node(LOOPBACK)
    sid = f"{prefix}-resume"
    async with source.client() as src, target.client() as dst:
        record, folder = await server(src, sid, 31706, random_mb=40)
        before = tree(folder)
        await add_port(dst, record["ports"][0]["port"])
        response = await transfer(src, sid, target_url=target.url, target_token=MASTER)
        assert response.status_code == 202, response.text
        first_job = response.json()["job_id"]

        async def half_way() -> bool:
            jobs = (await dst.get("/jobs")).json()["jobs"]
            return bool(jobs) and 8 << 20 < jobs[0]["progress"]["done"] < 30 << 20

        await wait_for(half_way, within=30, what="the target to hold part of the archive")
        start = await src.post(f"/containers/{sid}/start")
        assert start.status_code == 409
        assert start.json()["error"] == "Container is being transferred"
        reinstall = await src.post(f"/containers/{sid}/reinstall", json={})
        assert reinstall.status_code == 409  # the install script would change what is read
        assert reinstall.json()["error"] == "Container is being transferred"
    await source.stop()
    cut_at = (await _receive_job(target))["progress"]["done"]
    assert 0 < cut_at < 41 << 20
    assert (await _get(target, f"/containers/{sid}")).status_code == 404

    source = await start_node(path=path)  # the same config and storage
    async with source.client() as src, target.client() as dst:
        jobs = (await src.get("/jobs")).json()["jobs"]
        by_id = {j["id"]: j for j in jobs}
        assert by_id[first_job]["state"] == "failed"
        assert by_id[first_job]["error"] == "Interrupted by restart"
        resumed = [j for j in jobs if j["id"] != first_job and j["kind"] == "container.transfer"]
        assert len(resumed) == 1
        job = await finished(src, resumed[0]["id"], within=120)
        assert job["state"] == "done", job
        receive = await _receive_job(target)
        assert receive["state"] == "done"
        # Resumed, not sent again: the target's one session got the archive once.
        assert receive["progress"]["done"] == receive["progress"]["total"]
        moved = await get(dst, sid)
        assert moved["install_state"] == "ready"
        assert tree(target.agent.paths.volumes / record["volume_id"]) == before
        assert (await get(src, sid))["transferred"] is True


async def _get(node: RunningAgent, path: str) -> httpx.Response:
    async with node.client() as client:
        return await client.get(path)


async def _receive_job(node: RunningAgent) -> dict[str, Any]:
    jobs = (await _get(node, "/jobs")).json()["jobs"]
    assert len(jobs) == 1, jobs
    return dict(jobs[0])


@pytest.mark.parametrize("side", ["source", "target"])
async def test_cancelling_on_either_side_cleans_both(
    start_node: StartNode, prefix: str, side: str
) -> None:
    slow = {"transfer": {**LOOPBACK["transfer"], "max_rate": 8 << 20}}
    source, target = await two_nodes(start_node, slow)
    sid = f"{prefix}-cancel"
    async with source.client() as src, target.client() as dst:
        record, folder = await server(src, sid, 31707, random_mb=40)
        before = tree(folder)
        await add_port(dst, record["ports"][0]["port"])
        response = await transfer(src, sid, target_url=target.url, target_token=MASTER)
        assert response.status_code == 202, response.text
        sending = response.json()["job_id"]

        async def under_way() -> bool:
            jobs = (await dst.get("/jobs")).json()["jobs"]
            return bool(jobs) and jobs[0]["progress"]["done"] > 4 << 20

        await wait_for(under_way, within=30, what="the target to hold part of the archive")
        receiving = (await dst.get("/jobs")).json()["jobs"][0]["id"]
        if side == "source":
            cancelled = await src.delete(f"/jobs/{sending}")
        else:
            cancelled = await dst.delete(f"/jobs/{receiving}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["message"] == "Job cancelled"

        sent = await finished(src, sending)
        got = await finished(dst, receiving)
        assert got["state"] == "cancelled"
        if side == "source":
            assert sent["state"] == "cancelled"
        else:
            assert sent["state"] == "failed"
            assert sent["error"] == "Target ended the transfer: Cancelled"

        async def target_clean() -> bool:
            return [p.name for p in target.agent.paths.volumes.iterdir()] == []

        await wait_for(target_clean, what="the target's staging folder to go")
        await nothing_on(dst, target, sid)
        kept = await get(src, sid)
        assert kept["transferred"] is False
        assert tree(folder) == before
        assert (await src.post(f"/containers/{sid}/start")).status_code == 200
        await wait_state(src, sid, state="running")
        assert (await src.post(f"/containers/{sid}/kill")).status_code == 200
