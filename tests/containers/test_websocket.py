"""Contract §8 with real containers and real WebSocket clients: auth before the upgrade,
every frame in both directions, the [alias] forms, and the limits."""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio_websocket
from lightd.containers import CONTAINERS
from lightd.containers.hub import EventHub

from ..conftest import MASTER, Clock, RunningAgent, api_client, wait_for
from .conftest import StartNode, create, ready, wait_state

#: A server that runs what it is sent: tests drive its output through its stdin.
SHELL = 'echo ready; while read cmd; do eval "$cmd"; done'
Frame = dict[str, Any]


class Client:
    """A WebSocket client with deadlines on every read."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, **frame: Any) -> None:
        await self.ws.send_message(json.dumps(frame))

    async def next(self, within: float = 10) -> Frame:
        with trio.fail_after(within):
            frame: Frame = json.loads(await self.ws.get_message())
        return frame

    async def until(self, match: Callable[[Frame], bool], within: float = 20) -> list[Frame]:
        """Frames up to and including the first that matches."""
        seen: list[Frame] = []
        with trio.fail_after(within):
            while True:
                seen.append(json.loads(await self.ws.get_message()))
                if match(seen[-1]):
                    return seen

    async def console_until(self, needle: str, within: float = 20) -> str:
        """Console text received until a frame holds ``needle``."""
        frames = await self.until(
            lambda f: f["event"] == "console" and needle in f["data"], within=within
        )
        return "".join(f["data"] for f in frames if f["event"] == "console")

    async def closed(self, within: float = 10) -> int | None:
        """Read until the server closes; its close code."""
        with trio.fail_after(within):
            try:
                while True:
                    await self.ws.get_message()
            except trio_websocket.ConnectionClosed as closed:
                return closed.reason.code


INVALID = {"event": "daemon_message", "data": "Error: Invalid message"}


def message(text: str) -> Callable[[Frame], bool]:
    return lambda f: f == {"event": "daemon_message", "data": text}


async def printed(hub: EventHub, line: str, *, within: float) -> None:
    """Wait until the agent has read ``line`` from the server (it is in the history)."""

    async def seen() -> bool:
        return line in hub.history.tail(3)

    await wait_for(seen, within=within, what=f"the server to print {line!r}")


@pytest.fixture
def connect(ws_connect: Callable[..., Any]) -> Callable[..., Any]:
    @asynccontextmanager
    async def open_client(
        node: RunningAgent, internal_id: str, token: str = MASTER, **kwargs: Any
    ) -> AsyncIterator[Client]:
        kwargs.setdefault("disconnect_timeout", 5)
        async with ws_connect(node.url, f"/ws/{internal_id}?token={token}", **kwargs) as ws:
            yield Client(ws)

    return open_client


async def mint(api: httpx.AsyncClient, **body: Any) -> str:
    response = await api.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


async def rejected(
    ws_connect: Callable[..., Any], node: RunningAgent, path: str, **kwargs: Any
) -> int:
    with pytest.raises(trio_websocket.ConnectionRejected) as refused:
        async with ws_connect(node.url, path, **kwargs):
            pass
    return int(refused.value.status_code)


async def running_shell(api: httpx.AsyncClient, internal_id: str, **body: Any) -> None:
    await ready(api, internal_id, startup_command=SHELL, **body)
    assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
    await wait_state(api, internal_id, state="running")


# -- connecting ---------------------------------------------------------------------------


async def test_auth_and_unknown_container_are_refused_before_the_upgrade(
    start_node: StartNode, ws_connect: Callable[..., Any], connect: Any, prefix: str
) -> None:
    node = await start_node({"server": {"allowed_origins": ["https://panel.example"]}})
    internal_id = f"{prefix}-auth"
    async with api_client(node.url) as api:
        await ready(api, internal_id)
        other = await mint(api, containers=[f"{prefix}-other"])
        once = await mint(api, remove_on_use=True, containers=[internal_id])
    path = f"/ws/{internal_id}"
    assert await rejected(ws_connect, node, path) == 401
    assert await rejected(ws_connect, node, f"{path}?token=lightd_wrongwrongwrongwrong") == 401
    assert await rejected(ws_connect, node, f"{path}?token={other}") == 401  # restricted
    assert await rejected(ws_connect, node, f"/ws/{prefix}-nope?token={MASTER}") == 404
    evil = [(b"Origin", b"https://evil.example")]
    assert await rejected(ws_connect, node, f"{path}?token={MASTER}", extra_headers=evil) == 403
    # A single-use token opens exactly one connection, which then lives normally.
    async with connect(node, internal_id, once) as client:
        assert await client.next() == {"event": "status", "data": "offline"}
        assert await rejected(ws_connect, node, f"{path}?token={once}") == 401
        await client.send(event="request_logs")
        assert (await client.next())["event"] == "logs"
    ok = [(b"Origin", b"https://panel.example")]
    async with connect(node, internal_id, extra_headers=ok) as client:
        assert await client.next() == {"event": "status", "data": "offline"}


async def test_the_31st_socket_is_refused_with_4429(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-many"
    await ready(api, internal_id)
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connect(node, internal_id)) for _ in range(30)]
        for client in clients:
            assert (await client.next())["event"] == "status"
        async with connect(node, internal_id) as extra:
            assert await extra.closed() == 4429
        # The first thirty are untouched.
        await clients[0].send(event="request_logs")
        assert (await clients[0].until(lambda f: f["event"] == "logs"))[-1]["data"] == ""
        await clients[-1].ws.aclose()
        async with connect(node, internal_id) as replacement:
            assert (await replacement.next())["event"] == "status"


async def test_status_on_connect_and_install_output(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-inst"
    response = await create(
        api, internal_id, install_script="echo install-one; sleep 1; echo install-two\n"
    )
    assert response.status_code == 200
    async with connect(node, internal_id) as client:
        assert await client.next() == {"event": "status", "data": "installing"}
        frames = await client.until(lambda f: f == {"event": "event", "data": "installed"})
        console = "".join(f["data"] for f in frames if f["event"] == "console")
        assert "install-two\n" in console
        await client.send(event="request_logs")
        logs = (await client.until(lambda f: f["event"] == "logs"))[-1]["data"]
        assert "install-one\ninstall-two\n" in logs
    async with connect(node, internal_id) as client:
        assert await client.next() == {"event": "status", "data": "offline"}


# -- console --------------------------------------------------------------------------


async def test_two_clients_see_the_same_lines_once_each(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-two"
    await running_shell(api, internal_id)
    async with connect(node, internal_id) as one, connect(node, internal_id) as two:
        await one.next()
        await two.next()
        await one.send(event="send_command", command="busybox seq 1 1900; echo end-of-burst")
        texts = []
        for client in (one, two):
            frames = await client.until(
                lambda f: f["event"] == "console" and "end-of-burst" in f["data"]
            )
            console = [f["data"] for f in frames if f["event"] == "console"]
            assert all(0 < len(d) <= 64 * 1024 and d.endswith("\n") for d in console)
            texts.append("".join(console))
        expected = "".join(f"{n}\n" for n in range(1, 1901)) + "end-of-burst\n"
        assert texts == [expected, expected]


async def test_lines_arriving_together_are_coalesced(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-coal"
    await running_shell(api, internal_id)
    async with connect(node, internal_id) as client:
        await client.next()
        # 60 lines, one write each, 2 ms apart: about 120 ms of output.
        await client.send(
            event="send_command",
            command="for i in $(busybox seq 1 60); do echo $i; busybox usleep 2000; done; echo end",
        )
        frames = await client.until(lambda f: f["event"] == "console" and "end\n" in f["data"])
    console = [f["data"] for f in frames if f["event"] == "console"]
    assert "".join(console) == "".join(f"{n}\n" for n in range(1, 61)) + "end\n"
    assert len(console) <= 20  # about one frame per 20 ms, not one per line


async def test_long_lines_are_cut_at_64_kib(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-long"
    await running_shell(api, internal_id)
    async with connect(node, internal_id) as client:
        await client.next()
        await client.send(
            event="send_command",
            command="busybox yes aaaaaaaaaa | busybox head -n 10000 | busybox tr -d '[:space:]'"
            "; echo; echo after",
        )
        text = await client.console_until("after\n")
    assert text == "a" * 65535 + "\n" + "a" * (100000 - 65535) + "\n" + "after\n"


async def test_request_logs_mid_run_goes_to_the_asker_only(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-logs"
    await ready(api, internal_id, startup_command="busybox seq 1 1500; sleep 3600")
    await api.post(f"/containers/{internal_id}/start")
    await wait_state(api, internal_id, state="running")
    hub = node.agent.stash[CONTAINERS].get(internal_id).hub
    await printed(hub, "1500\n", within=10)
    lines = [f"{n}\n" for n in range(1, 1501)]
    async with connect(node, internal_id) as asker, connect(node, internal_id) as other:
        assert await asker.next() == {"event": "status", "data": "running"}
        await other.next()
        await asker.send(event="request_logs")
        assert await asker.until(lambda f: f["event"] == "logs") == [
            {"event": "logs", "data": "".join(lines[-100:])}
        ]
        await asker.send(event="request_logs", lines=5000)  # capped at the history size
        assert (await asker.next())["data"] == "".join(lines[-1000:])
        await asker.send(logs=["50"])  # [alias]
        assert (await asker.next())["data"] == "".join(lines[-50:])
        await other.send(event="request_logs", lines=3)
        # The other client's first logs frame is its own reply, not one of the asker's.
        reply = (await other.until(lambda f: f["event"] == "logs"))[-1]
        assert reply["data"] == "1498\n1499\n1500\n"


async def test_commands_reach_stdin_and_the_reply_comes_back(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-cmd"
    await ready(api, internal_id, startup_command='while read l; do echo "got $l"; done')
    async with connect(node, internal_id) as client:
        assert await client.next() == {"event": "status", "data": "offline"}
        await client.send(event="send_command", command="early")
        assert await client.next() == {
            "event": "daemon_message",
            "data": "Error: Container is not running",
        }
        await client.send(event="power", action="start")
        await client.until(lambda f: f == {"event": "event", "data": "running"})
        await client.send(event="send_command", command="hello there\n")
        assert "got hello there\n" in await client.console_until("got hello")
        await client.send(send_command=["again"])  # [alias]
        assert "got again\n" in await client.console_until("got again")


async def test_power_frames_and_refusals(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-pow"
    await ready(api, internal_id, startup_command="echo up; sleep 3600")
    async with connect(node, internal_id) as client:
        await client.next()
        await client.send(event="power", action="kill")
        assert await client.next() == {
            "event": "daemon_message",
            "data": "Error: Container is not running",
        }
        await client.send(event="power", action="start")
        frames = await client.until(lambda f: f == {"event": "event", "data": "running"})
        assert {"event": "event", "data": "starting"} in frames
        assert {"event": "daemon_message", "data": "Container started"} in frames
        await client.send(event="power", action="start")
        await client.until(message("Error: Container is already running"))
        await client.send(power=["stop"])  # [alias], and the [ext] stop
        frames = await client.until(message("Container stopped"))
        assert {"event": "event", "data": "stopping"} in frames
        assert {"event": "event", "data": "exit"} in frames
        await client.send(event="power", action="explode")
        await client.until(message("Error: Invalid message"))
    await wait_state(api, internal_id, state="offline")


async def test_malformed_frames_get_an_error_and_the_socket_stays_open(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-bad"
    await ready(api, internal_id)
    async with connect(node, internal_id) as client:
        await client.next()
        for bad in (
            "not json",
            "[1, 2]",
            '{"event": "dance"}',
            '{"event": "send_command"}',
            '{"event": "send_command", "command": 7}',
            '{"event": "request_logs", "lines": 0}',
            '{"event": "request_logs", "lines": true}',
            '{"logs": ["x"], "power": ["start"]}',
            '{"event": "power", "action": ["start"]}',
            '{"event": "power", "action": {"a": 1}}',
            '{"power": [["start"]]}',
            '{"event": ["power"], "action": "start"}',
        ):
            await client.ws.send_message(bad)
            assert await client.next() == INVALID
        await client.ws.send_message(b'{"event": "request_logs"}')  # a binary frame
        assert await client.next() == INVALID
        await client.send(event="request_logs")
        assert (await client.next())["event"] == "logs"


async def test_a_slow_client_loses_frames_alone_and_memory_stays_bounded(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    queue_bytes = 256 * 1024
    node = await start_node(
        {"console": {"throttle_lines": 0}, "websocket": {"queue_bytes": queue_bytes}}
    )
    internal_id = f"{prefix}-slow"
    async with api_client(node.url) as api:
        await running_shell(api, internal_id)
    hub = node.agent.stash[CONTAINERS].get(internal_id).hub
    rss_before = _rss()
    async with (
        connect(node, internal_id) as slow,  # connected, never reads
        connect(node, internal_id, receive_buffer_size=65536) as one,
        connect(node, internal_id, receive_buffer_size=65536) as two,
    ):
        await one.next()
        await two.next()
        # 20 MB of output: far more than the slow client's socket buffers and queue hold.
        await one.send(
            event="send_command",
            command="busybox yes $(busybox seq -s - 1 290) | busybox head -n 20000; echo big-done",
        )
        await printed(hub, "big-done\n", within=60)
        for n, client in enumerate((one, two)):
            # Catch up: a fast client may have lost frames of the 20 MB too; a marker sent
            # once its queue has drained gets through.
            with trio.fail_after(30):
                while True:
                    await one.send(event="send_command", command=f"echo sync-{n}")
                    with trio.move_on_after(1):
                        await client.console_until(f"sync-{n}")
                        break
        started = trio.current_time()
        await one.send(event="send_command", command="busybox seq 1 5000; echo burst-done")
        expected = "".join(f"{n}\n" for n in range(1, 5001)) + "burst-done\n"
        for client in (one, two):
            text = await client.console_until("burst-done", within=10)
            assert text.endswith(expected)
        assert trio.current_time() - started < 10
        subs = sorted(hub.subscriptions, key=lambda s: s.peak_bytes)
        assert len(subs) == 3
        slowest = subs[-1]
        assert slowest.dropped > 0
        assert slowest.peak_bytes <= 2 * queue_bytes + 64 * 1024
        assert _rss() - rss_before < 150 * 1024 * 1024
        # The slow client, reading at last, is told it lost output.
        await slow.until(message("Console output throttled"), within=30)


async def test_twenty_clients_reading_get_every_line_and_stalled_ones_cost_nothing(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    """Throttle off, a flood far bigger than a socket's budget: each of 20 clients that
    keeps reading gets every line in order, while 3 clients that never read lose frames
    within their budget and are given up on (the console no longer waits for them). The
    hold allowance is raised from its default so that a heavily loaded test machine, where
    the flood may need more than its 2 s burst, does not turn this into a test of the bound
    (test_console.py checks that)."""
    queue_bytes = 256 * 1024
    node = await start_node(
        {
            "console": {"throttle_lines": 0, "hold_share": 0.9},
            "websocket": {"queue_bytes": queue_bytes},
        }
    )
    internal_id = f"{prefix}-flood"
    async with api_client(node.url) as api:
        await running_shell(api, internal_id)
    hub = node.agent.stash[CONTAINERS].get(internal_id).hub
    lines = 100_000  # ~590 KB: more than 2 budgets
    expected = "".join(f"{n}\n" for n in range(1, lines + 1)) + "flood-done\n"
    async with AsyncExitStack() as stack:
        readers = [await stack.enter_async_context(connect(node, internal_id)) for _ in range(20)]
        for _ in range(3):  # connected, never read
            await stack.enter_async_context(
                connect(node, internal_id, message_queue_size=1, receive_buffer_size=4096)
            )
        for client in readers:
            await client.next()  # the status frame
        texts: list[str] = []

        async def read_all(client: Client) -> None:
            texts.append(await client.console_until("flood-done", within=60))

        await readers[0].send(
            event="send_command", command=f"busybox seq 1 {lines}; echo flood-done"
        )
        async with trio.open_nursery() as nursery:
            for client in readers:
                nursery.start_soon(read_all, client)
        subs = hub.subscriptions
        why = f"held {hub.held:.2f} s, {hub.fell_behind} behind, lost {[s.dropped for s in subs]}"
        assert len(texts) == 20
        assert all(text == expected for text in texts), why
        assert len(subs) == 23
        assert sum(sub.dropped > 0 for sub in subs) == 3  # the stalled ones, and only them
        assert all(sub.peak_bytes <= queue_bytes for sub in subs)
        assert hub.fell_behind >= 3


def _rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def test_console_throttle_keeps_history_and_matching(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    node = await start_node({"console": {"throttle_lines": 500, "throttle_window_ms": 5000}})
    internal_id = f"{prefix}-thr"
    async with api_client(node.url) as api:
        await ready(
            api,
            internal_id,
            startup_command="read go; busybox seq 1 3000; echo Done booting; sleep 3600",
            start_pattern="^Done booting",
        )
        async with connect(node, internal_id) as client:
            await client.next()
            await client.send(event="power", action="start")
            await client.until(message("Container started"))  # stdin is attached
            await client.send(event="send_command", command="go")
            frames = await client.until(message("Server started"))
            assert (await api.get(f"/containers/{internal_id}")).json()["state"] == "running"
            await client.send(event="request_logs", lines=1000)
            frames += await client.until(lambda f: f["event"] == "logs")
    console = "".join(f["data"] for f in frames if f["event"] == "console")
    sent = console.splitlines()
    assert 500 <= len(sent) < 600  # a bucket of 500, refilled at 100 lines/s
    assert sent[:500] == [str(n) for n in range(1, 501)]
    # A token refilled while the output was still coming lets a later line through.
    later = [int(n) for n in sent[500:]]
    assert later == sorted(later) and all(500 < n <= 3000 for n in later)
    assert frames.count({"event": "daemon_message", "data": "Console output throttled"}) == 1
    history = frames[-1]["data"].splitlines()
    assert history[-1] == "Done booting" and history[-2] == "3000" and len(history) == 1000


async def test_a_config_reload_applies_the_console_settings(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-reload"
    await running_shell(api, internal_id)
    path = node.agent.config_path
    raw = json.loads(path.read_text())
    raw["console"] = {"throttle_lines": 10, "throttle_window_ms": 60000}
    path.write_text(json.dumps(raw))
    assert (await api.post("/remote/config/reload")).status_code == 200
    async with connect(node, internal_id) as client:
        await client.next()
        await client.send(event="send_command", command="busybox seq 1 100")
        frames = await client.until(message("Console output throttled"))
    console = "".join(f["data"] for f in frames if f["event"] == "console")
    assert console == "".join(f"{n}\n" for n in range(1, 11))


async def test_token_expiry_closes_with_4001(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, clock: Clock, prefix: str
) -> None:
    internal_id = f"{prefix}-exp"
    await ready(api, internal_id)
    token = await mint(api, ttl="60")
    async with connect(node, internal_id, token) as client, connect(node, internal_id) as master:
        await client.next()
        await master.next()
        clock.advance(61)
        assert await client.next(within=5) == {"event": "daemon_message", "data": "Token expired"}
        assert await client.closed(within=5) == 4001
        # The master token's connection is unaffected.
        await master.send(event="request_logs")
        assert (await master.next())["event"] == "logs"


async def test_an_oversized_frame_closes_only_that_socket(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-big"
    await ready(api, internal_id)
    async with connect(node, internal_id) as big, connect(node, internal_id) as fine:
        await big.next()
        await fine.next()
        await big.send(event="send_command", command="x" * 40000)
        assert await big.closed() == 1009
        await fine.send(event="send_command", command="y" * 30000)  # under the limit
        assert await fine.next() == {
            "event": "daemon_message",
            "data": "Error: Container is not running",
        }


async def test_inbound_rate_limit(start_node: StartNode, connect: Any, prefix: str) -> None:
    node = await start_node({"websocket": {"rate": 0.5, "burst": 3}})
    internal_id = f"{prefix}-rate"
    async with api_client(node.url) as api:
        await ready(api, internal_id)
    async with connect(node, internal_id) as client:
        await client.next()
        for _ in range(6):
            await client.send(event="request_logs")
        frames = [await client.next() for _ in range(6)]
    assert [f["event"] for f in frames[:3]] == ["logs"] * 3
    assert frames[3:] == [{"event": "daemon_message", "data": "Error: Rate limit exceeded"}] * 3


async def test_deleting_the_container_closes_its_sockets(
    api: httpx.AsyncClient, node: RunningAgent, connect: Any, prefix: str
) -> None:
    internal_id = f"{prefix}-del"
    await ready(api, internal_id)
    async with connect(node, internal_id) as client:
        await client.next()
        assert (await api.delete(f"/containers/{internal_id}")).status_code == 200
        await client.until(message("Container deleted"))
        assert await client.closed() == 1000


# -- stats ----------------------------------------------------------------------------

STATS_FIELDS = {
    "event",
    "cpu_usage",
    "memory_usage",
    "memory_limit",
    "network_rx",
    "network_tx",
    "block_read",
    "block_write",
    "disk_bytes",  # §15: the volume's usage
    "state",
    "uptime",
}


def _values(frame: Frame) -> Frame:
    return {k: v for k, v in frame.items() if k != "uptime"}


async def test_stats_frames_from_the_cgroup_files(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    node = await start_node({"stats": {"interval": 0.25}})
    busy, idle = f"{prefix}-busy", f"{prefix}-idle"
    async with api_client(node.url) as api:
        await ready(api, busy, startup_command="while :; do :; done", limits={"memory": 64 << 20})
        await ready(api, idle, startup_command="sleep 3600")
        for internal_id in (busy, idle):
            await api.post(f"/containers/{internal_id}/start")
            await wait_state(api, internal_id, state="running")
    async with connect(node, busy) as client:
        await client.next()
        frames = await client.until(lambda f: f["event"] == "stats" and f["cpu_usage"] > 20)
        stats = frames[-1]
        assert set(stats) == STATS_FIELDS
        assert stats["memory_limit"] == 64 << 20
        assert 0 < stats["memory_usage"] < 64 << 20
        assert stats["state"] == "running" and isinstance(stats["uptime"], int)
        counters = STATS_FIELDS - {"event", "cpu_usage", "state"}
        assert all(isinstance(stats[k], int) for k in counters)
        source = node.agent.stash[CONTAINERS].get(busy).stats.source
        assert source is not None and source.name == "cgroup-v1"
        # The reader stops with the run: no stats after the exit.
        await client.send(event="power", action="kill")
        await client.until(lambda f: f == {"event": "event", "data": "exit"})
        with trio.move_on_after(1):  # four sampling intervals
            while True:
                assert (await client.next())["event"] != "stats"
    async with connect(node, idle) as client:
        await client.next()
        first = await client.until(lambda f: f["event"] == "stats")
        seen = [first[-1]]
        with trio.move_on_after(2.5):  # ten samples: an idle server changes little
            while True:
                frame = await client.next()
                if frame["event"] == "stats":
                    seen.append(frame)
        assert len(seen) <= 4
        assert all(
            _values(a) != _values(b) for a, b in itertools.pairwise(seen)
        )  # only when values changed
        # A client connecting later gets the last stats at once, after its status.
        async with connect(node, idle) as late:
            assert (await late.next())["event"] == "status"
            assert _values(await late.next()) == _values(seen[-1])


async def test_stats_from_the_docker_api_fallback(
    start_node: StartNode, connect: Any, prefix: str
) -> None:
    node = await start_node({"stats": {"source": "api"}})
    internal_id = f"{prefix}-api"
    async with api_client(node.url) as api:
        await ready(api, internal_id, startup_command="while :; do :; done")
        await api.post(f"/containers/{internal_id}/start")
        await wait_state(api, internal_id, state="running")
    async with connect(node, internal_id) as client:
        await client.next()
        frames = await client.until(
            lambda f: f["event"] == "stats" and f["cpu_usage"] > 20, within=15
        )
        assert set(frames[-1]) == STATS_FIELDS
        assert frames[-1]["memory_usage"] > 0
    source = node.agent.stash[CONTAINERS].get(internal_id).stats.source
    assert source is not None and source.name == "docker-api"
