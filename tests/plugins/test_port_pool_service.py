"""The pool as containers use it (``agent.interfaces.PortPoolService``): all-or-nothing
reservations, protocol matching, rebind, release, cancellation, and the issue's
concurrency test against a real agent and its SQLite file."""

from __future__ import annotations

import random
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
import trio
import trio.lowlevel
import trio.testing
from lightd.errors import ApiError, BadRequest, Conflict, NotFound
from lightd.interfaces import PORT_POOL, PoolPort, PortPoolService, PortRequest
from lightd.plugins.port_pool import POOL, PortPool, PortPoolError

from ..conftest import RunningAgent

Key = tuple[str, int]


@pytest.fixture
def service(running: RunningAgent) -> PortPoolService:
    return running.agent.stash[PORT_POOL]


async def fill(client: httpx.AsyncClient, *entries: tuple[str, int, str]) -> None:
    response = await client.post(
        "/network/ports/bulk",
        json={
            "ports": [{"ip": ip, "port": port, "protocol": proto} for ip, port, proto in entries]
        },
    )
    assert response.json()["added_count"] == len(entries), response.text


async def owners(client: httpx.AsyncClient) -> dict[Key, str | None]:
    ports = (await client.get("/network/ports")).json()["ports"]
    return {(p["ip"], p["port"]): p["container"] for p in ports}


def req(ip: str | None, port: int | None, protocol: str = "tcp") -> PortRequest:
    return PortRequest(ip, port, protocol)


async def refused(call: Any, kind: type[ApiError], message: str) -> ApiError:
    with pytest.raises(kind) as info:
        await call
    assert info.value.message == message
    return info.value


async def test_the_pool_implements_the_interface(running: RunningAgent) -> None:
    pool = running.agent.stash[PORT_POOL]
    assert isinstance(pool, PortPool)
    assert pool is running.agent.stash[POOL]
    for name in ("reserve", "replace", "release", "held"):
        assert callable(getattr(pool, name))


# --- reserve ------------------------------------------------------------------------


async def test_reserve_returns_the_entries_in_request_order(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "both"), ("::1", 3, "udp"))
    got = await service.reserve(
        "srv-1", [req("::1", 3, "udp"), req("10.0.0.1", 1), req("10.0.0.1", 2, "udp")]
    )
    assert got == [
        PoolPort("::1", 3, "udp"),
        PoolPort("10.0.0.1", 1, "tcp"),
        PoolPort("10.0.0.1", 2, "both"),
    ]
    assert await owners(client) == {
        ("10.0.0.1", 1): "srv-1",
        ("10.0.0.1", 2): "srv-1",
        ("::1", 3): "srv-1",
    }
    assert (await client.get("/network/ports?in_use=false")).json()["ports"] == []


async def test_reserve_normalises_request_addresses(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("2001:db8::1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    got = await service.reserve("srv-1", [req("2001:DB8:0::1", 1), req("::ffff:10.0.0.1", 2)])
    assert got == [PoolPort("2001:db8::1", 1, "tcp"), PoolPort("10.0.0.1", 2, "tcp")]


async def test_reserve_of_nothing(service: PortPoolService) -> None:
    assert await service.reserve("srv-1", []) == []


async def test_reserve_is_all_or_nothing(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(
        client,
        *[("10.0.0.1", port, "tcp") for port in range(1, 7)],
        ("::1", 5, "tcp"),
    )
    await service.reserve("other", [req("10.0.0.1", 3), req("::1", 5)])
    await client.put("/network/ports/10.0.0.1/4/use", json={"in_use": True})
    before = await owners(client)
    cases: list[tuple[PortRequest, type[ApiError], str]] = [
        (req("10.0.0.1", 99), BadRequest, "Port not found in network pool"),
        (req("10.0.0.9", 1), BadRequest, "Port not found in network pool"),
        (req("10.0.0.1", 3), Conflict, "Port already in use: 10.0.0.1:3"),
        (req("10.0.0.1", 4), Conflict, "Port already in use: 10.0.0.1:4"),
        (req("::1", 5), Conflict, "Port already in use: [::1]:5"),
        (
            req("10.0.0.1", 6, "udp"),
            BadRequest,
            "Port protocol mismatch: 10.0.0.1:6 is tcp in the pool, not udp",
        ),
        (req(None, None, "udp"), NotFound, "No available ports in pool"),
        (req("nope", 1), BadRequest, "Invalid IP address: nope"),
        (req("10.0.0.1", 0), BadRequest, "Invalid port: 0"),
        (req("10.0.0.1", 1, "icmp"), BadRequest, "Invalid protocol: icmp"),
        (req("10.0.0.1", 1), Conflict, "Port already in use: 10.0.0.1:1"),
    ]
    for bad, kind, message in cases:
        # Everything free is taken before the bad request: a half-made reservation would
        # show.
        await refused(
            service.reserve(
                "srv-1", [req("10.0.0.1", 1), req("10.0.0.1", 2), req(None, None), bad]
            ),
            kind,
            message,
        )
        assert await owners(client) == before, message
        assert "srv-1" not in await service.held()
    free = (await client.get("/network/ports?in_use=false")).json()["ports"]
    assert [(p["ip"], p["port"]) for p in free] == [("10.0.0.1", p) for p in (1, 2, 5, 6)]


async def test_reserving_what_the_owner_holds_is_idempotent(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    await service.reserve("srv-1", [req("10.0.0.1", 1)])
    assert await service.reserve("srv-1", [req("10.0.0.1", 1), req("10.0.0.1", 2)]) == [
        PoolPort("10.0.0.1", 1, "tcp"),
        PoolPort("10.0.0.1", 2, "tcp"),
    ]
    await refused(
        service.reserve("srv-2", [req("10.0.0.1", 2)]), Conflict, "Port already in use: 10.0.0.1:2"
    )


async def test_protocol_matching(client: httpx.AsyncClient, service: PortPoolService) -> None:
    for entry, wanted, ok in [
        ("tcp", "tcp", True),
        ("udp", "udp", True),
        ("both", "both", True),
        ("both", "tcp", True),
        ("both", "udp", True),
        ("tcp", "udp", False),
        ("udp", "tcp", False),
        ("tcp", "both", False),
        ("udp", "both", False),
    ]:
        await fill(client, ("10.0.0.1", 1, entry))
        call = service.reserve("srv-1", [req("10.0.0.1", 1, wanted)])
        any_call = service.reserve("srv-2", [req(None, None, wanted)])
        if ok:
            assert await call == [PoolPort("10.0.0.1", 1, entry)]
            await service.release("srv-1")
            assert await any_call == [PoolPort("10.0.0.1", 1, entry)]
            await service.release("srv-2")
        else:
            error = await refused(
                call,
                BadRequest,
                f"Port protocol mismatch: 10.0.0.1:1 is {entry} in the pool, not {wanted}",
            )
            assert error.code == "port_protocol_mismatch"
            await refused(any_call, NotFound, "No available ports in pool")
            assert await service.held() == {}
        assert (await client.delete("/network/ports/10.0.0.1/1")).status_code == 200


async def test_a_both_entry_serves_tcp_and_udp_of_one_container(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 27015, "both"))
    got = await service.reserve(
        "srv-1", [req("10.0.0.1", 27015, "tcp"), req("10.0.0.1", 27015, "udp")]
    )
    assert got == [PoolPort("10.0.0.1", 27015, "both")] * 2


async def test_one_entry_requested_twice_is_refused(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "both"), ("10.0.0.1", 2, "both"))
    for first, second in [("tcp", "tcp"), ("tcp", "both"), ("both", "udp")]:
        error = await refused(
            service.reserve(
                "srv-1",
                [req("10.0.0.1", 2), req("10.0.0.1", 1, first), req("10.0.0.1", 1, second)],
            ),
            Conflict,
            "Port already in use: 10.0.0.1:1",
        )
        assert error.code == "port_requested_twice"
        assert await service.held() == {}


async def test_any_request_takes_a_free_entry_of_its_protocol(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "udp"), ("10.0.0.1", 2, "both"), ("10.0.0.1", 3, "tcp"))
    await client.put("/network/ports/10.0.0.1/3/use", json={"in_use": True})
    # An exact match is preferred over a "both" entry; a marked entry is never taken.
    assert await service.reserve("srv-1", [req(None, None, "udp")]) == [
        PoolPort("10.0.0.1", 1, "udp")
    ]
    assert await service.reserve("srv-2", [req(None, None, "tcp")]) == [
        PoolPort("10.0.0.1", 2, "both")
    ]
    await refused(
        service.reserve("srv-3", [req(None, None)]), NotFound, "No available ports in pool"
    )


async def test_any_request_never_takes_an_entry_named_later(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    for _ in range(10):
        got = await service.reserve("srv-1", [req(None, None), req("10.0.0.1", 2)])
        assert got == [PoolPort("10.0.0.1", 1, "tcp"), PoolPort("10.0.0.1", 2, "tcp")]
        await service.release("srv-1")


async def test_any_request_can_be_narrowed_to_an_address(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.2", 1, "tcp"), ("10.0.0.2", 2, "tcp"))
    got = await service.reserve("srv-1", [req("10.0.0.2", None), req("10.0.0.2", None)])
    assert sorted(got, key=lambda p: p.port) == [
        PoolPort("10.0.0.2", 1, "tcp"),
        PoolPort("10.0.0.2", 2, "tcp"),
    ]
    assert await service.reserve("srv-2", [req(None, 1)]) == [PoolPort("10.0.0.1", 1, "tcp")]


async def test_a_pool_without_free_entries_refuses_whole(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    await refused(
        service.reserve("srv-1", [req(None, None)] * 3), NotFound, "No available ports in pool"
    )
    assert await service.held() == {}
    assert len(await service.reserve("srv-1", [req(None, None)] * 2)) == 2


# --- replace, release, held ---------------------------------------------------------


async def test_replace_swaps_the_whole_set(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, *[("10.0.0.1", port, "tcp") for port in range(1, 5)])
    await service.reserve("srv-1", [req("10.0.0.1", 1), req("10.0.0.1", 2)])
    got = await service.replace("srv-1", [req("10.0.0.1", 2), req("10.0.0.1", 3)])
    assert got == [PoolPort("10.0.0.1", 2, "tcp"), PoolPort("10.0.0.1", 3, "tcp")]
    assert await owners(client) == {
        ("10.0.0.1", 1): None,
        ("10.0.0.1", 2): "srv-1",
        ("10.0.0.1", 3): "srv-1",
        ("10.0.0.1", 4): None,
    }


async def test_replace_changes_nothing_when_refused(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, *[("10.0.0.1", port, "tcp") for port in range(1, 5)])
    await service.reserve("srv-1", [req("10.0.0.1", 1), req("10.0.0.1", 2)])
    await service.reserve("srv-2", [req("10.0.0.1", 4)])
    for bad in [req("10.0.0.1", 4), req("10.0.0.1", 9), req("10.0.0.1", 3, "udp"), req(None, None)]:
        with pytest.raises(ApiError):
            await service.replace(
                "srv-1", [req("10.0.0.1", 3), req(None, None), req(None, None), bad]
            )
        held = await service.held()
        assert [(p.ip, p.port) for p in held["srv-1"]] == [("10.0.0.1", 1), ("10.0.0.1", 2)]
        assert [(p.ip, p.port) for p in held["srv-2"]] == [("10.0.0.1", 4)]
        assert (await owners(client))[("10.0.0.1", 3)] is None


async def test_replace_may_reuse_what_it_frees(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"))
    await service.reserve("srv-1", [req("10.0.0.1", 1)])
    assert await service.replace("srv-1", [req(None, None)]) == [PoolPort("10.0.0.1", 1, "tcp")]
    assert await service.replace("srv-1", []) == []
    assert await service.held() == {}


async def test_release_frees_what_the_owner_holds(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("::1", 9, "tcp"), ("10.0.0.1", 2, "both"), ("10.0.0.1", 1, "tcp"))
    await service.reserve("srv-1", [req("::1", 9), req("10.0.0.1", 2, "udp")])
    await service.reserve("srv-2", [req("10.0.0.1", 1)])
    assert await service.release("srv-1") == [
        PoolPort("10.0.0.1", 2, "both"),
        PoolPort("::1", 9, "tcp"),
    ]
    assert await service.release("srv-1") == []
    assert await service.release("never-seen") == []
    assert await service.held() == {"srv-2": [PoolPort("10.0.0.1", 1, "tcp")]}
    assert (await client.delete("/network/ports/::1/9")).status_code == 200


async def test_held_lists_every_owner(client: httpx.AsyncClient, service: PortPoolService) -> None:
    await fill(client, *[("10.0.0.1", port, "tcp") for port in range(1, 6)])
    assert await service.held() == {}
    await service.reserve("b", [req("10.0.0.1", 5), req("10.0.0.1", 1)])
    await service.reserve("a", [req("10.0.0.1", 3)])
    await client.put("/network/ports/10.0.0.1/2/use", json={"in_use": True})
    assert await service.held() == {
        "a": [PoolPort("10.0.0.1", 3, "tcp")],
        "b": [PoolPort("10.0.0.1", 1, "tcp"), PoolPort("10.0.0.1", 5, "tcp")],
    }


async def test_an_owner_is_required(service: PortPoolService) -> None:
    owner: Any
    for owner in ["", None, 7]:
        with pytest.raises(ValueError, match="internal_id"):
            await service.reserve(owner, [req(None, None)])


async def test_hook_lightd_container_deleted_frees_leftover_ports(
    running: RunningAgent,
    client: httpx.AsyncClient,
    service: PortPoolService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    await service.reserve("srv-1", [req("10.0.0.1", 1)])
    await service.reserve("srv-2", [req("10.0.0.1", 2)])
    await running.agent.hooks.container_deleted(running.agent, "srv-1")
    assert await service.held() == {"srv-2": [PoolPort("10.0.0.1", 2, "tcp")]}
    assert "container srv-1 was deleted still holding 1 pool ports" in caplog.text


# --- cancellation and the shared transaction ----------------------------------------


class StoreBlocker:
    """Occupies the store's single worker thread until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, conn: sqlite3.Connection) -> None:
        self.entered.set()
        self.release.wait(10)


async def test_a_cancelled_queued_reservation_changes_nothing(
    running: RunningAgent, client: httpx.AsyncClient, service: PortPoolService
) -> None:
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))
    blocker = StoreBlocker()
    results: dict[str, list[PoolPort]] = {}
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.agent.store.write, blocker)
            await trio.to_thread.run_sync(blocker.entered.wait)
            scopes = {}
            for owner, port in (("leader", 1), ("follower", 2)):
                scopes[owner] = trio.CancelScope()

                async def reserve(owner: str = owner, port: int = port) -> None:
                    with scopes[owner]:
                        results[owner] = await service.reserve(owner, [req("10.0.0.1", port)])

                nursery.start_soon(reserve)
                await trio.testing.wait_all_tasks_blocked()
            # The leader waits for the store, the follower for the leader: both queued.
            scopes["follower"].cancel()
            scopes["leader"].cancel()
            await trio.testing.wait_all_tasks_blocked()
            blocker.release.set()
    assert results == {}
    assert await service.held() == {}
    assert await service.reserve("x", [req("10.0.0.1", 1), req("10.0.0.1", 2)])


async def test_a_cancelled_caller_whose_change_is_committing_gets_its_outcome(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    """White-box: the follower's reservation is taken into the leader's transaction, then
    the follower is cancelled; its reservation commits and the caller learns of it."""
    pool = running.agent.stash[POOL]
    await fill(client, ("10.0.0.1", 1, "tcp"))
    outer, inner = StoreBlocker(), StoreBlocker()
    results: list[list[PoolPort]] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(running.agent.store.write, outer)
            await trio.to_thread.run_sync(outer.entered.wait)
            nursery.start_soon(pool._submit, inner)  # the leader; its change blocks
            await trio.testing.wait_all_tasks_blocked()
            scope = trio.CancelScope()

            async def follower() -> None:
                with scope:
                    results.append(await pool.reserve("srv-1", [req("10.0.0.1", 1)]))
                    await trio.lowlevel.checkpoint()  # the pending cancellation surfaces here

            nursery.start_soon(follower)
            await trio.testing.wait_all_tasks_blocked()
            outer.release.set()
            await trio.to_thread.run_sync(inner.entered.wait)  # both changes are taken
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert results == []
            inner.release.set()
    assert results == [[PoolPort("10.0.0.1", 1, "tcp")]]
    assert scope.cancelled_caught
    assert await pool.held() == {"srv-1": [PoolPort("10.0.0.1", 1, "tcp")]}


async def test_concurrent_changes_share_commits_and_stay_separate(
    client: httpx.AsyncClient, service: PortPoolService
) -> None:
    """Many at once: refusals roll back alone, successes all commit."""
    await fill(client, *[("10.0.0.1", port, "tcp") for port in range(1, 21)])
    outcomes: dict[int, object] = {}

    async def one(i: int) -> None:
        port = i % 20 + 1
        try:
            outcomes[i] = await service.reserve(f"c{i}", [req("10.0.0.1", port)])
        except Conflict as exc:
            outcomes[i] = exc.message

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for i in range(60):
                nursery.start_soon(one, i)
    winners = {i for i, outcome in outcomes.items() if isinstance(outcome, list)}
    assert len(winners) == 20
    held = await service.held()
    assert set(held) == {f"c{i}" for i in winners}
    assert sorted(p.port for ports in held.values() for p in ports) == list(range(1, 21))


async def test_a_failed_commit_fails_every_change_in_it(
    running: RunningAgent,
    client: httpx.AsyncClient,
    service: PortPoolService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the shared transaction cannot commit, each caller in it gets the error and
    nothing of it stays; the next transaction works."""
    store = running.agent.store
    await fill(client, ("10.0.0.1", 1, "tcp"), ("10.0.0.1", 2, "tcp"))

    async def failing_write(fn: Any, *args: Any) -> Any:
        def run(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fn(conn, *args)
            finally:
                conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")

        return await store.read(run)

    monkeypatch.setattr(store, "write", failing_write)
    errors: list[BaseException] = []

    async def one(owner: str, port: int) -> None:
        with pytest.raises(PortPoolError) as info:
            await service.reserve(owner, [req("10.0.0.1", port)])
        errors.append(info.value)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "srv-1", 1)
            nursery.start_soon(one, "srv-2", 2)
    assert len(errors) == 2
    assert all(isinstance(e.__cause__, sqlite3.OperationalError) for e in errors)
    monkeypatch.undo()
    assert await service.held() == {}
    assert await service.reserve("srv-1", [req("10.0.0.1", 1)])


# --- the concurrency test ---------------------------------------------------


async def test_concurrent_reservations_adds_and_deletes_keep_the_pool_consistent(
    running: RunningAgent, client: httpx.AsyncClient, service: PortPoolService
) -> None:
    """50 tasks reserve overlapping sets from a pool of 10 while others add and delete
    ports: no entry is ever believed held by two owners, no reservation is half-made, and
    the counts add up afterwards."""
    base = [("10.0.0.1", port) for port in range(1, 11)]
    extra = [("::1", port) for port in range(1, 6)]
    await fill(client, *[(ip, port, "tcp") for ip, port in base])
    rng = random.Random(4)
    believed: dict[Key, str] = {}  # entry → owner, from a reserve's return to its release
    holding: dict[str, set[Key]] = {}  # owner → the entries its reserve returned
    failed: set[str] = set()
    stats = {"reserved": 0, "refused": 0, "released": 0, "added": 0, "deleted": 0, "bound": 0}

    def claim(owner: str, ports: Sequence[PoolPort]) -> None:
        got = {(p.ip, p.port) for p in ports}
        for key in got:
            assert key not in believed, f"{key} held by {believed[key]} and {owner}"
            believed[key] = owner
        holding[owner] = got

    async def reserver(task: int) -> None:
        for attempt in range(12):
            owner = f"c{task}-{attempt}"
            picks = rng.sample(base + extra, rng.randint(1, 3))
            requests = [req(ip, port) for ip, port in picks]
            if rng.random() < 0.3:
                requests.append(req(None, None))
            try:
                ports = await service.reserve(owner, requests)
            except (Conflict, NotFound, BadRequest):
                failed.add(owner)
                stats["refused"] += 1
            else:
                assert len(ports) == len(requests)
                assert all(
                    (p.ip, p.port) == (r.ip, r.port)
                    for p, r in zip(ports, requests, strict=True)
                    if r.ip is not None
                )
                claim(owner, ports)
                stats["reserved"] += 1
            await trio.lowlevel.checkpoint()
            # Hold for a moment, then release; a few owners keep theirs to the end.
            if owner in holding and (attempt < 11 or rng.random() < 0.5):
                for key in holding.pop(owner):
                    del believed[key]
                freed = await service.release(owner)
                assert freed, owner
                stats["released"] += 1

    async def churner() -> None:
        for _ in range(40):
            ip, port = rng.choice(base[5:] + extra)
            if rng.random() < 0.5:
                response = await client.post("/network/ports", json={"ip": ip, "port": port})
                assert response.status_code in (200, 409), response.text
                stats["added"] += response.status_code == 200
            else:
                response = await client.delete(f"/network/ports/{ip}/{port}")
                assert response.status_code in (200, 404, 409), response.text
                stats["deleted"] += response.status_code == 200
                if response.status_code == 409:
                    assert response.json()["error"].startswith("Port is bound to container c")
                    stats["bound"] += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for task in range(50):
                nursery.start_soon(reserver, task)
            for _ in range(4):
                nursery.start_soon(churner)

    assert stats["reserved"] > 20 and stats["refused"] > 20, stats
    assert stats["added"] > 0 and stats["deleted"] > 0, stats
    ports = (await client.get("/network/ports")).json()["ports"]
    keys = {(p["ip"], p["port"]) for p in ports}
    # Counts add up: the pool is what was put in minus what was taken out.
    assert len(ports) == len(base) + stats["added"] - stats["deleted"]
    # Every surviving reservation is whole and exactly what its reserve returned.
    held = await service.held()
    assert {owner: {(p.ip, p.port) for p in ps} for owner, ps in held.items()} == holding
    assert not failed & set(held)
    # in_use and container agree with the holdings, entry by entry.
    assert {(p["ip"], p["port"]): p["container"] for p in ports if p["container"]} == believed
    assert all(p["in_use"] == (p["container"] is not None) for p in ports)
    assert set(believed) <= keys
    in_use = (await client.get("/network/ports?in_use=true")).json()["ports"]
    assert len(in_use) == sum(len(v) for v in holding.values())
    # The file agrees with the API.
    with sqlite3.connect(running.agent.store.path) as conn:
        rows = conn.execute("SELECT COUNT(*), COUNT(owner), SUM(in_use) FROM port_pool_ports")
        assert rows.fetchone() == (len(ports), len(believed), len(believed))
