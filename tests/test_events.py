"""The node event stream (contract §17): the ring itself, then a real agent over SSE and
WebSocket (container-driven events: ``tests/containers/test_events.py``)."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import trio
import trio_websocket
from lightd import JOBS, Agent, JobContext, NodeEvents, hookimpl
from lightd.events import BATCH_BYTES, BATCH_EVENTS, seq_origin

from .conftest import MASTER, VENDOR, RunningAgent, StartAgent, api_client, wait_for

# --- the ring, without an agent ---------------------------------------------------------


def test_publish_numbers_by_one_and_encodes_once() -> None:
    events = NodeEvents(10, origin=1000, clock=lambda: 1700000000.1234)
    first = events.publish("volume.created", {"volume_id": "v"})
    second = events.publish("volume.deleted", {"volume_id": "v"})
    assert (first.seq, second.seq, events.head, events.first) == (1001, 1002, 1002, 1001)
    assert first.to_dict() == {
        "seq": 1001,
        "type": "volume.created",
        "data": {"volume_id": "v"},
        "timestamp": 1700000000.123,
    }
    assert first.sse == b"id: 1001\nevent: volume.created\ndata: " + first.json + b"\n\n"
    assert first.text is first.text and first.sse is first.sse  # derived once
    with events.subscribe(1000) as a, events.subscribe(1000) as b:
        assert a.receive_nowait()[0] is b.receive_nowait()[0] is first  # one encoding for all
    with pytest.raises(ValueError, match="unknown node event type"):
        events.publish("container.exploded", {})
    assert events.head == 1002


def test_the_ring_keeps_the_last_buffer_events() -> None:
    events = NodeEvents(5, origin=0)
    for n in range(12):
        events.publish("container.state", {"n": n})
    assert (events.first, events.head, len(events)) == (8, 12, 5)
    assert [e.seq for e in events.since(0)] == [8, 9, 10, 11, 12]
    assert [e.seq for e in events.since(10)] == [11, 12]
    assert events.get(7) is None and events.get(13) is None
    assert events.get(8) is not None and events.get(8).to_dict()["data"] == {"n": 7}  # type: ignore[union-attr]


def test_since_replays_then_resyncs_when_the_ring_moved_past() -> None:
    events = NodeEvents(5, origin=0, clock=lambda: 5.0)
    for _ in range(8):
        events.publish("container.state", {})
    with events.subscribe(5) as reader:  # 6..8 still held
        assert [e.seq for e in reader.receive_nowait()] == [6, 7, 8]
        with pytest.raises(trio.WouldBlock):
            reader.receive_nowait()
    with events.subscribe(2) as reader:  # 3 is gone (first is 4): resync
        (resync,) = reader.receive_nowait()
        assert resync.to_dict() == {
            "seq": 8,
            "type": "resync",
            "data": {"since": 2, "first": 4},
            "timestamp": 5.0,
        }
        assert reader.cursor == 8 and reader.resyncs == 1
        events.publish("job.done", {})
        assert [e.seq for e in reader.receive_nowait()] == [9]
    with events.subscribe(4) as reader:  # exactly one before the oldest: nothing missed
        assert [e.seq for e in reader.receive_nowait()] == [5, 6, 7, 8, 9]
    with events.subscribe(50) as reader:  # ahead of the head: another run's seq
        assert [e.type for e in reader.receive_nowait()] == ["resync"]
    with events.subscribe() as reader, pytest.raises(trio.WouldBlock):  # only what comes next
        reader.receive_nowait()


def test_a_slow_reader_takes_its_backlog_in_bounded_batches_and_misses_nothing() -> None:
    events = NodeEvents(10_000, origin=0)
    with events.subscribe(0) as reader:
        for n in range(9_000):  # the publisher never waits for the reader
            events.publish("job.progress", {"n": n, "pad": "x" * 100})
        assert reader.behind == 9_000
        seen: list[int] = []
        while reader.behind:
            batch = reader.receive_nowait()
            assert len(batch) <= BATCH_EVENTS
            seen += [e.seq for e in batch]
        assert seen == list(range(1, 9_001))
        assert 0 < reader.peak_batch_bytes <= BATCH_BYTES
        assert reader.resyncs == 0


def test_batches_are_bounded_in_bytes_too() -> None:
    events = NodeEvents(100, origin=0)
    for _ in range(10):
        events.publish("backup.done", {"blob": "y" * (BATCH_BYTES // 4)})
    with events.subscribe(0) as reader:
        sizes = []
        while reader.behind:
            sizes.append(len(reader.receive_nowait()))
    assert sum(sizes) == 10 and max(sizes) <= 4


def test_seq_of_a_new_run_is_past_every_seq_of_the_previous_run() -> None:
    now = [1_700_000_000.0]
    before = NodeEvents(10, clock=lambda: now[0])
    for _ in range(1000):
        before.publish("container.state", {})
    now[0] += 0.01  # restarted 10 ms later
    after = NodeEvents(10, clock=lambda: now[0])
    assert after.origin == seq_origin(lambda: now[0]) > before.head
    assert after.first == after.origin + 1
    with after.subscribe(before.head) as reader:  # the panel's since from the old run
        assert [e.type for e in reader.receive_nowait()] == ["resync"]


def test_resize_keeps_the_newest_events() -> None:
    events = NodeEvents(5, origin=0)
    for _ in range(7):
        events.publish("container.state", {})  # holds 3..7
    events.resize(10)
    assert (events.first, [e.seq for e in events.since(0)]) == (3, [3, 4, 5, 6, 7])
    for _ in range(4):
        events.publish("container.state", {})
    assert [e.seq for e in events.since(0)] == list(range(3, 12))
    events.resize(2)
    assert [e.seq for e in events.since(0)] == [10, 11]
    with pytest.raises(ValueError, match="buffer must be"):
        events.resize(0)


async def test_receive_waits_for_the_next_event_and_ends_at_close() -> None:
    events = NodeEvents(10, origin=0)
    got: list[int] = []

    async def read() -> None:
        with events.subscribe() as reader:
            async for batch in reader:
                got.extend(e.seq for e in batch)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await wait_for(lambda: _true(events.readers == 1), what="the reader")
        events.publish("volume.created", {})
        await wait_for(lambda: _true(got == [1]), what="the event")
        events.close()
    assert got == [1] and events.readers == 0


async def _true(value: bool) -> bool:
    return value


# --- over HTTP --------------------------------------------------------------------------


class SSE:
    """A Server-Sent Events reader over an httpx streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.comments: list[str] = []
        self.retry: int | None = None

    async def next(self) -> dict[str, Any]:
        fields: dict[str, str] = {}
        while True:
            line = await anext(self.lines)
            if line == "":
                if fields:
                    event = json.loads(fields["data"])
                    assert fields["id"] == str(event["seq"])
                    assert fields["event"] == event["type"]
                    return dict(event)
                continue
            if line.startswith(":"):
                self.comments.append(line)
                continue
            name, _, value = line.partition(": ")
            if name == "retry":
                self.retry = int(value)
                continue
            fields[name] = value

    async def take(self, count: int) -> list[dict[str, Any]]:
        return [await self.next() for _ in range(count)]


@asynccontextmanager
async def sse(node: RunningAgent, since: int | None = None, **headers: str) -> AsyncIterator[SSE]:
    params = {} if since is None else {"since": str(since)}
    async with (
        api_client(node.url, **headers) as client,
        client.stream("GET", "/events", params=params) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        reader = SSE(response)
        # the first line is sent once the agent subscribed the reader
        assert (await anext(reader.lines)).startswith(":")
        yield reader


def seqs(events: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in events]


def contiguous(events: list[dict[str, Any]]) -> bool:
    return seqs(events) == list(range(events[0]["seq"], events[0]["seq"] + len(events)))


@pytest.fixture
async def node(start_agent: StartAgent, make_config: Callable[..., Path]) -> RunningAgent:
    return await start_agent(make_config({"events": {"keepalive": 1}}))


async def test_volume_events_arrive_live_with_seq_plus_one(node: RunningAgent) -> None:
    async with api_client(node.url) as api, sse(node) as stream:
        volume = (await api.post("/volumes")).json()["volume_id"]
        assert (await api.delete(f"/volumes/{volume}")).status_code == 200
        created, deleted = await stream.take(2)
    assert (created["type"], created["data"]) == ("volume.created", {"volume_id": volume})
    assert (deleted["type"], deleted["data"]) == ("volume.deleted", {"volume_id": volume})
    assert deleted["seq"] == created["seq"] + 1
    assert created["seq"] > node.agent.events.origin
    assert isinstance(created["timestamp"], float)


async def test_since_and_last_event_id_replay_from_the_ring(node: RunningAgent) -> None:
    events = node.agent.events
    start = events.head
    async with api_client(node.url) as api:
        volumes = [(await api.post("/volumes")).json()["volume_id"] for _ in range(3)]
    async with sse(node, since=start + 1) as stream:
        replay = await stream.take(2)
    assert [e["data"]["volume_id"] for e in replay] == volumes[1:]
    assert seqs(replay) == [start + 2, start + 3]
    # Last-Event-ID (an EventSource reconnecting) wins over the URL's since
    async with sse(node, since=start, **{"Last-Event-ID": str(start + 2)}) as stream:
        (replay,) = await stream.take(1)
        events.publish("backup.done", {"backup_id": "b"})
        (live,) = await stream.take(1)
    assert (replay["seq"], live["seq"], live["type"]) == (start + 3, start + 4, "backup.done")


async def test_since_older_than_the_ring_gets_resync_first(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"events": {"buffer": 5}}))
    events = node.agent.events
    start = events.head
    async with api_client(node.url) as api:
        for _ in range(8):
            assert (await api.post("/volumes")).status_code == 201
    async with sse(node, since=start + 1) as stream:  # start+2 fell out of the ring
        (resync,) = await stream.take(1)
        events.publish("container.state", {"internal_id": "x", "state": "running"})
        (after,) = await stream.take(1)
    assert resync["type"] == "resync" and resync["seq"] == start + 8
    assert resync["data"] == {"since": start + 1, "first": start + 4}
    assert after["seq"] == start + 9
    # a since of an earlier run of the agent (before this run's origin): resync too
    async with sse(node, since=events.origin - 5) as stream:
        assert (await stream.next())["type"] == "resync"
    async with sse(node, since=0) as stream:
        assert (await stream.next())["type"] == "resync"


async def test_a_slow_sse_reader_loses_nothing_still_in_the_ring(node: RunningAgent) -> None:
    events = node.agent.events
    async with sse(node) as stream:
        start = events.head
        for n in range(5000):  # at once: the reader is 5000 behind before it reads one
            events.publish("job.progress", {"n": n})
        got = await stream.take(5000)
    assert seqs(got) == list(range(start + 1, start + 5001))
    assert [e["data"]["n"] for e in got] == list(range(5000))


async def test_a_stalled_reader_blocks_no_one_and_holds_at_most_a_batch(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    with trio.fail_after(60):
        await _stalled(start_agent, make_config)


async def _stalled(start_agent: StartAgent, make_config: Callable[..., Path]) -> None:
    node = await start_agent(make_config({"events": {"buffer": 2000}}))
    events = node.agent.events
    url = urlsplit(node.url)
    # A client that sends the request and then reads nothing (a small receive window).
    raw = trio.socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await raw.connect((url.hostname, url.port))
    stalled = trio.SocketStream(raw)
    try:
        await stalled.send_all(
            (
                f"GET /events HTTP/1.0\r\nHost: {url.netloc}\r\nAccept: {VENDOR}\r\n"
                f"Authorization: Bearer {MASTER}\r\n\r\n"
            ).encode()
        )
        await wait_for(lambda: _true(events.readers == 1), what="the stalled reader")
        (stuck,) = events.subscriptions
        start = events.head
        fast: list[dict[str, Any]] = []
        async with trio.open_nursery() as nursery, sse(node) as stream:

            async def follow() -> None:
                while True:
                    fast.append(await stream.next())

            nursery.start_soon(follow)
            pad = "z" * 1000
            with trio.fail_after(30):
                for chunk in range(60):  # 6000 events of ~1 KB, 3x the ring
                    for n in range(100):
                        events.publish("job.progress", {"n": chunk * 100 + n, "pad": pad})
                    await wait_for(lambda: _true(bool(fast) and fast[-1]["seq"] == events.head))
            nursery.cancel_scope.cancel()
        assert seqs(fast) == list(range(start + 1, start + 6001))  # the other reader got all
        assert stuck.cursor < events.first - 1  # the stalled one is far behind ...
        assert 0 < stuck.peak_batch_bytes <= BATCH_BYTES  # ... holding one batch at most
        # Reading again: what it had been given, then resync, then the stream goes on.
        received = b""
        head = events.head

        def parsed() -> list[dict[str, Any]]:
            body = received.partition(b"\r\n\r\n")[2]
            found = []
            for block in body.split(b"\n\n")[:-1]:  # the last one may be cut
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        found.append(json.loads(line[6:]))
            return found

        with trio.fail_after(20):
            while not any(e["type"] == "resync" for e in parsed()):
                received += await stalled.receive_some(65536)
            events.publish("container.deleted", {"internal_id": "after"})
            while parsed()[-1]["type"] != "container.deleted":
                received += await stalled.receive_some(65536)
        got = parsed()
        cut = next(i for i, e in enumerate(got) if e["type"] == "resync")
        before, resync, after = got[:cut], got[cut], got[cut + 1 :]
        assert received.startswith(b"HTTP/1.1 200") or received.startswith(b"HTTP/1.0 200")
        assert seqs(before) == list(range(start + 1, start + 1 + len(before)))  # nothing skipped
        assert resync["seq"] == head and resync["data"]["since"] == before[-1]["seq"]
        assert seqs(after) == [head + 1]
    finally:
        await stalled.aclose()


async def test_keepalive_comments_while_nothing_happens(node: RunningAgent) -> None:
    async with sse(node) as stream:
        with trio.fail_after(5):
            line = ""
            while not line or line.startswith("retry:"):  # after the first comment
                line = await anext(stream.lines)  # keepalive is 1 s here
    assert line == ": keep-alive"


async def test_a_response_ends_before_the_read_timeout_and_a_reconnect_loses_nothing(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    # read timeout 1 + 5 = 6 s: each response ends by itself after about 1 s
    node = await start_agent(
        make_config(
            {"events": {"keepalive": 1}, "websocket": {"ping_interval": 1, "ping_timeout": 5}}
        )
    )
    events = node.agent.events
    events.publish("backup.done", {"backup_id": "a"})
    async with sse(node, since=events.head - 1) as stream:
        (first,) = await stream.take(1)
        with trio.fail_after(10):
            async for line in stream.lines:  # a clean end (not a cut, which would raise)
                assert not line.startswith("data"), line
        assert stream.retry == 1000
    events.publish("backup.done", {"backup_id": "b"})  # between two responses
    async with sse(node, **{"Last-Event-ID": str(first["seq"])}) as stream:
        (missed,) = await stream.take(1)
    assert (missed["seq"], missed["data"]) == (first["seq"] + 1, {"backup_id": "b"})


async def test_the_stream_ends_when_the_agent_stops(node: RunningAgent) -> None:
    async with sse(node) as stream:
        with trio.fail_after(5):
            await node.stop()
            with pytest.raises(StopAsyncIteration):
                await stream.next()


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "", "9" * 20, "１２"])
async def test_invalid_since_is_a_400(node: RunningAgent, value: str) -> None:
    async with api_client(node.url) as api:
        response = await api.get("/events", params={"since": value})
        assert response.status_code == 400
        assert response.json()["error"] == "since must be a non-negative integer"
        if value.isascii():  # a header is ASCII
            response = await api.get("/events", headers={"Last-Event-ID": value})
            assert response.status_code == 400
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with trio_websocket.open_websocket_url(
            _ws(node, f"?token={MASTER}&since={quote(value)}")
        ):
            pass
    assert refused.value.status_code == 400


async def test_the_master_token_only(node: RunningAgent) -> None:
    async with api_client(node.url) as api:
        minted = await api.post("/auth/tokens", json={"ttl": "15m"})
        temporary = minted.json()["token"]
        scoped = (await api.post("/auth/tokens", json={"ttl": "15m", "containers": ["a"]})).json()
    async with api_client(node.url, token=None) as anonymous:
        assert (await anonymous.get("/events")).status_code == 401
    async with api_client(node.url, token=temporary) as other:
        response = await other.get("/events")
        assert response.status_code == 403
        assert response.json()["error"] == "Events need the master token"
    async with api_client(node.url, token=scoped["token"]) as other:
        assert (await other.get("/events")).status_code == 401
    for query, status in (("", 401), (f"?token={temporary}", 403), ("?token=lightd_x", 401)):
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with trio_websocket.open_websocket_url(_ws(node, query)):
                pass
        assert refused.value.status_code == status, query
    assert node.agent.events.readers == 0


def _ws(node: RunningAgent, query: str) -> str:
    return "ws" + node.url.removeprefix("http") + "/ws/events" + query


async def test_websocket_replays_and_follows(node: RunningAgent) -> None:
    events = node.agent.events
    start = events.head
    events.publish("volume.created", {"volume_id": "a"})
    async with trio_websocket.open_websocket_url(_ws(node, f"?token={MASTER}&since={start}")) as ws:
        replayed = json.loads(await ws.get_message())
        await wait_for(lambda: _true(events.readers == 1))
        events.publish("volume.deleted", {"volume_id": "a"})
        live = json.loads(await ws.get_message())
        await ws.send_message("ignored")  # frames from the client are dropped
        events.publish("backup.done", {"backup_id": "b"})
        assert json.loads(await ws.get_message())["seq"] == start + 3
    assert (replayed["seq"], replayed["type"]) == (start + 1, "volume.created")
    assert (live["seq"], live["data"]) == (start + 2, {"volume_id": "a"})
    async with trio_websocket.open_websocket_url(_ws(node, f"?token={MASTER}&since=1")) as ws:
        assert json.loads(await ws.get_message())["type"] == "resync"
        with trio.fail_after(5):
            await node.stop()
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await ws.get_message()
    assert closed.value.reason.code == 1001


def _delivered(node: RunningAgent, transport: str) -> tuple[float, float]:
    """(count, sum) of the delivery-lag histogram for ``transport``, from the registry."""
    registry = node.agent.metrics.registry
    labels = {"transport": transport}
    count = registry.get_sample_value("lightd_events_delivery_seconds_count", labels)
    total = registry.get_sample_value("lightd_events_delivery_seconds_sum", labels)
    return count or 0.0, total or 0.0


async def test_the_delivery_lag_of_live_events_is_measured_not_of_replays(
    node: RunningAgent,
) -> None:
    events = node.agent.events
    start = events.head
    events.publish("volume.created", {"volume_id": "old"})  # replayed: not a lag
    async with sse(node, since=start) as stream:
        await stream.take(1)
        assert _delivered(node, "sse") == (0.0, 0.0)
        events.publish("volume.deleted", {"volume_id": "old"})
        events.publish("backup.done", {"backup_id": "b"})
        await stream.take(2)
        # recorded once the chunk is written, right after the client could read it
        await wait_for(lambda: _true(_delivered(node, "sse")[0] == 2))
    count, total = _delivered(node, "sse")
    assert count == 2 and 0 <= total < 5
    async with trio_websocket.open_websocket_url(_ws(node, f"?token={MASTER}")) as ws:
        await wait_for(lambda: _true(events.readers == 1))
        events.publish("volume.created", {"volume_id": "w"})
        await ws.get_message()
        await wait_for(lambda: _true(_delivered(node, "ws")[0] == 1))
    text = (await _scrape(node)).splitlines()
    assert 'lightd_events_delivery_seconds_count{transport="sse"} 2.0' in text
    assert 'lightd_events_delivery_seconds_count{transport="ws"} 1.0' in text


async def _scrape(node: RunningAgent) -> str:
    async with api_client(node.url) as api:
        response = await api.get("/metrics")
    assert response.status_code == 200
    return response.text


# --- jobs --------------------------------------------------------------------------------


class FastJob:
    """A job kind that reports progress as fast as it can for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.calls = 0

    @hookimpl
    def lightd_configure(self, agent: Agent) -> None:
        agent.stash[JOBS].register_kind("test.fast")

    async def run(self, job: JobContext) -> None:
        deadline = trio.current_time() + self.seconds
        while trio.current_time() < deadline:
            self.calls += 1
            job.progress(self.calls, None)
            await trio.lowlevel.checkpoint()
        job.result = {"calls": self.calls}


async def test_job_progress_is_throttled_and_done_comes_last(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    plugin = FastJob(1.6)
    node = await start_agent(make_config(), extra_plugins=(("fastjob", plugin),))
    async with sse(node) as stream:
        view = await node.agent.stash[JOBS].submit("test.fast", plugin.run, unit="steps")
        got: list[dict[str, Any]] = []
        with trio.fail_after(10):
            while not got or got[-1]["type"] != "job.done":
                got.append(await stream.next())
    assert contiguous(got)
    assert all(e["data"]["id"] == view.id for e in got)
    progress, done = got[:-1], got[-1]
    assert [e["type"] for e in progress] == ["job.progress"] * len(progress)
    # thousands of progress calls, at most two events a second (plus queued/running)
    assert plugin.calls > 1000 and 1 <= len(progress) <= 1.6 * 2 + 3
    assert done["data"]["state"] == "done" and done["data"]["result"] == {"calls": plugin.calls}
    assert [e["data"]["progress"]["done"] for e in progress] == sorted(
        e["data"]["progress"]["done"] for e in progress
    )


async def test_a_config_reload_resizes_the_ring(node: RunningAgent) -> None:
    events = node.agent.events
    raw = json.loads(node.agent.config_path.read_text())
    raw["events"] = {"buffer": 3}
    node.agent.config_path.write_text(json.dumps(raw))
    await node.agent.reload_config()
    assert events.buffer == 3
