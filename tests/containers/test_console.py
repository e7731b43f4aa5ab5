"""The console pipeline and the hub's queues, without Docker: line splitting, coalescing,
the throttle, slow subscribers, and the parsing of inbound WebSocket frames."""

from __future__ import annotations

import contextlib
import json

import pytest
import trio
import trio.testing
from lightd.api.ws import parse_request
from lightd.containers.console import (
    FRAME_MAX,
    MAX_LINE,
    THROTTLED,
    Console,
    ConsoleSettings,
    Frame,
    History,
    LineSplitter,
    TokenBucket,
)
from lightd.containers.hub import (
    HOLD_BURST,
    STALL_MAX_SECONDS,
    STALL_SECONDS,
    EventHub,
    Subscription,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_splitter_keeps_partial_lines_and_utf8_across_chunks() -> None:
    splitter = LineSplitter()
    snow = "☃".encode()
    assert splitter.feed(b"one\ntw") == ["one\n"]
    assert splitter.feed(b"o\n" + snow[:1]) == ["two\n"]
    assert splitter.feed(snow[1:] + b"\n\n") == ["☃\n", "\n"]
    assert splitter.feed(b"tail") == []
    assert splitter.close() == ["tail\n"]
    assert splitter.close() == []


def test_splitter_cuts_long_lines_at_64_kib() -> None:
    splitter = LineSplitter()
    lines = splitter.feed(b"a" * 100_000 + b"\nb\n")
    assert [len(line) for line in lines] == [MAX_LINE, 100_000 - (MAX_LINE - 1) + 1, 2]
    assert all(line.endswith("\n") for line in lines)
    # An unterminated line is cut as soon as it is too long, in any number of chunks.
    assert splitter.feed(b"c" * 40_000) == []
    assert splitter.feed(b"c" * 40_000) == ["c" * (MAX_LINE - 1) + "\n"]


def console(settings: ConsoleSettings | None = None) -> tuple[Console, list[Frame], FakeClock]:
    frames: list[Frame] = []
    clock = FakeClock()
    return Console(frames.append, settings or ConsoleSettings(), clock=clock), frames, clock


def test_without_a_flusher_every_write_is_one_frame() -> None:
    con, frames, _ = console()
    con.write(["a\n", "b\n"])
    con.write(["c\n"])
    assert frames == [{"event": "console", "data": "a\nb\n"}, {"event": "console", "data": "c\n"}]
    assert list(con.history) == ["a\n", "b\n", "c\n"]


def test_big_writes_become_frames_of_at_most_64_kib_of_complete_lines() -> None:
    con, frames, _ = console(ConsoleSettings(throttle_lines=0))
    lines = [f"{n:07d}\n" for n in range(40_000)]
    con.write(lines)
    assert all(len(f["data"]) <= FRAME_MAX and f["data"].endswith("\n") for f in frames)
    assert "".join(f["data"] for f in frames) == "".join(lines)
    assert len(frames) == -(-len(lines) * 8 // FRAME_MAX)
    assert list(con.history) == lines[-1000:]


def test_the_throttle_drops_excess_lines_with_one_notice_per_window() -> None:
    con, frames, clock = console(ConsoleSettings(throttle_lines=10, throttle_window_ms=100))
    con.write([f"{n}\n" for n in range(25)])
    con.write(["more\n"])
    assert frames == [
        {"event": "console", "data": "".join(f"{n}\n" for n in range(10))},
        {"event": "daemon_message", "data": THROTTLED},
    ]
    assert con.throttled == 16
    assert len(con.history) == 26  # the history sees every line
    clock.now += 0.05  # half a window: 5 lines come back; no second notice yet
    con.write([f"x{n}\n" for n in range(8)])
    assert frames[2:] == [{"event": "console", "data": "".join(f"x{n}\n" for n in range(5))}]
    clock.now += 0.05  # the next window: 5 more lines, and one more notice
    con.write([f"y{n}\n" for n in range(8)])
    assert frames[3:] == [
        {"event": "console", "data": "".join(f"y{n}\n" for n in range(5))},
        {"event": "daemon_message", "data": THROTTLED},
    ]


def test_history_is_bounded_in_lines_and_characters() -> None:
    history = History(max_lines=10, max_chars=100)
    history.add("a\nb\nc\n", 3)
    history.add("".join(f"{n}\n" for n in range(8)), 8)
    assert len(history) == 10
    assert history.tail(4) == "4\n5\n6\n7\n"
    assert history.tail(10) == "b\nc\n" + "".join(f"{n}\n" for n in range(8))
    assert history.tail(50) == history.tail(10)  # at most max_lines
    assert list(history)[:2] == ["b\n", "c\n"]
    history.add("x" * 60 + "\n", 1)
    history.add("y" * 60 + "\n", 1)  # 122 characters: the oldest blocks go
    assert history.tail(10) == "y" * 60 + "\n"
    history.resize(max_lines=1, max_chars=1000)
    history.add("z\n", 1)
    assert history.tail(5) == "z\n"


def test_tail_returns_the_last_lines() -> None:
    con, _, _ = console()
    con.write([f"{n}\n" for n in range(1500)])
    assert con.tail(3) == "1497\n1498\n1499\n"
    assert con.tail(5000) == "".join(f"{n}\n" for n in range(500, 1500))
    assert con.tail(0) == ""


async def test_lines_arriving_together_are_coalesced_and_ordered_before_messages() -> None:
    hub = EventHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        with hub.subscribe() as sub:
            hub.console(["first\n"])  # after a quiet spell: at once
            for n in range(50):
                hub.console([f"{n}\n"])
            hub.message("Container stopped")  # flushes what is pending first
            hub.console(["later\n"])
            await trio.sleep(0.1)
            frames = [sub.receive_nowait() for _ in range(len(sub))]
        nursery.cancel_scope.cancel()
    assert frames == [
        {"event": "console", "data": "first\n"},
        {"event": "console", "data": "".join(f"{n}\n" for n in range(50))},
        {"event": "daemon_message", "data": "Container stopped"},
        {"event": "console", "data": "later\n"},
    ]


async def test_the_flusher_sends_held_lines_within_the_coalescing_delay() -> None:
    hub = EventHub()
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.run)
        with hub.subscribe() as sub:
            hub.console(["a\n"])
            hub.console(["b\n"])
            hub.console(["c\n"])
            assert [await sub.receive()] == [{"event": "console", "data": "a\n"}]
            with trio.fail_after(0.5):
                assert await sub.receive() == {"event": "console", "data": "b\nc\n"}
        nursery.cancel_scope.cancel()


def test_a_slow_subscriber_loses_console_frames_with_one_notice() -> None:
    sub = Subscription(max_frames=3, max_bytes=10_000)
    for n in range(10):
        sub.offer(Frame(event="console", data=f"{n}\n"))
    sub.offer(Frame(event="event", data="running"))  # events have a second allowance
    received = [sub.receive_nowait() for _ in range(len(sub))]
    assert received == [
        {"event": "console", "data": "0\n"},
        {"event": "console", "data": "1\n"},
        {"event": "console", "data": "2\n"},
        {"event": "daemon_message", "data": THROTTLED},
        {"event": "event", "data": "running"},
    ]
    assert sub.dropped == 7
    # Caught up: a new loss is a new episode, with a new notice.
    for n in range(5):
        sub.offer(Frame(event="console", data=f"{n}\n"))
    assert [sub.receive_nowait() for _ in range(len(sub))][-1]["data"] == THROTTLED


def test_a_subscriber_queue_is_bounded_in_bytes() -> None:
    sub = Subscription(max_frames=1000, max_bytes=100_000)
    frame = Frame(event="console", data="x" * 30_000 + "\n")
    for _ in range(100):
        sub.offer(frame)
    assert sub.queued_bytes <= 100_000 + 100
    assert sub.peak_bytes <= 100_000 + 100
    assert sub.dropped == 100 - 3
    # A reply is never refused to an empty queue, however big.
    empty = Subscription(max_frames=4, max_bytes=1000)
    empty.put(Frame(event="logs", data="y" * 5000))
    assert empty.receive_nowait()["event"] == "logs"


async def test_finish_drops_the_backlog_and_delivers_the_last_words() -> None:
    sub = Subscription()
    for n in range(5):
        sub.offer(Frame(event="console", data=f"{n}\n"))
    sub.finish(4001, {"event": "daemon_message", "data": "Token expired"})
    assert await sub.receive() == {"event": "daemon_message", "data": "Token expired"}
    with pytest.raises(trio.EndOfChannel):
        await sub.receive()
    assert sub.close_code == 4001


async def test_a_waiting_subscriber_wakes_on_publish_and_on_close() -> None:
    hub = EventHub()
    with hub.subscribe() as sub:
        async with trio.open_nursery() as nursery:
            got: list[Frame] = []

            async def wait() -> None:
                got.append(await sub.receive())
                with pytest.raises(trio.EndOfChannel):
                    await sub.receive()

            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            hub.event("running")
            await trio.testing.wait_all_tasks_blocked()
            hub.close()
    assert got == [{"event": "event", "data": "running"}]


def test_subscribing_to_a_closed_hub_ends_at_once() -> None:
    hub = EventHub()
    hub.close()
    with hub.subscribe() as sub:
        sub.put({"event": "status", "data": "offline"})
        with pytest.raises(trio.EndOfChannel):
            sub.receive_nowait()


# -- pacing: every line to the subscribers that keep up, bounded memory ------------------

#: A chunk of console output as the console reader hands it over: 300 lines, ~30 KB.
CHUNK = [f"{n:06d} " + "x" * 93 + "\n" for n in range(300)]
BUDGET = 256 * 1024
#: Pacing on, as a node that asks for lossless consoles configures it (the default is off).
HOLD_SHARE = 0.5
UNTHROTTLED = ConsoleSettings(throttle_lines=0, hold_share=HOLD_SHARE)


async def produce(hub: EventHub, megabytes: int) -> int:
    """Write chunks as fast as the hub lets the console reader go; the lines written."""
    chunks = megabytes * 1024 * 1024 // len("".join(CHUNK))
    for _ in range(chunks):
        hub.console(CHUNK)
        await hub.pace()
    return chunks * len(CHUNK)


async def read(sub: Subscription, into: list[str], per_frame: float) -> None:
    """A client that keeps reading, ``per_frame`` seconds a frame."""
    while True:
        try:
            frame = await sub.receive()
        except trio.EndOfChannel:
            return
        if frame["event"] == "console":
            into.append(frame["data"])
        await trio.sleep(per_frame)


async def test_a_reader_that_keeps_up_gets_every_line_and_stalled_ones_cost_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = EventHub(console=UNTHROTTLED, queue_bytes=BUDGET)
    got: list[list[str]] = [[], []]
    with (
        hub.subscribe(paced=True) as fast,
        hub.subscribe(paced=True) as slower,
        hub.subscribe(paced=True) as stalled,  # connected, never reads
        hub.subscribe(paced=True) as another_stalled,
    ):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, fast, got[0], 0.0005)
            nursery.start_soon(read, slower, got[1], 0.002)  # ~15 MB/s: slower than the server
            started = trio.current_time()
            written = await produce(hub, 8)
            elapsed = trio.current_time() - started
            hub.close()
    # Both readers got every line, in order, and never more than their budget queued.
    for lines, sub in zip(got, (fast, slower), strict=True):
        assert "".join(lines) == "".join(CHUNK) * (written // len(CHUNK))
        assert sub.dropped == 0
        assert sub.peak_bytes <= BUDGET
    # The stalled ones lost frames (told once) within their budget, and cost the readers
    # one stall detection: the run took what the slower reader needs, plus at most that.
    for sub in (stalled, another_stalled):
        assert sub.dropped > 0
        assert sub.peak_bytes <= BUDGET
    assert hub.fell_behind == 2
    needed = len(got[1]) * 0.002
    assert needed <= elapsed <= needed + STALL_SECONDS + 0.05
    assert hub.held <= elapsed


async def test_without_peers_a_stalled_reader_is_given_up_after_the_longer_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = EventHub(console=UNTHROTTLED, queue_bytes=BUDGET)
    with hub.subscribe(paced=True) as stalled:
        started = trio.current_time()
        await produce(hub, 4)
        elapsed = trio.current_time() - started
        assert stalled.behind and stalled.dropped > 0
    assert STALL_MAX_SECONDS <= elapsed <= STALL_MAX_SECONDS + 0.05


async def test_a_reader_slower_than_half_the_server_cannot_hold_it_longer(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = EventHub(console=UNTHROTTLED, queue_bytes=BUDGET)
    got: list[str] = []
    with hub.subscribe(paced=True) as slow:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, slow, got, 0.05)  # ~0.6 MB/s, yet never stalled
            started = trio.current_time()
            await produce(hub, 16)
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
        assert not slow.behind  # it kept reading: waited for whenever the budget allowed
    # Held for the burst, then half the time at most: this server (infinitely fast) is
    # done once the hold allowance is spent; the slow reader lost the rest.
    assert hub.held <= HOLD_BURST + HOLD_SHARE * elapsed + 0.05
    assert elapsed <= HOLD_BURST / (1 - HOLD_SHARE) + 0.05
    assert slow.dropped > 0
    assert slow.peak_bytes <= BUDGET


async def test_after_the_server_exits_its_last_lines_are_read_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = EventHub(console=UNTHROTTLED, queue_bytes=BUDGET)
    with hub.subscribe(paced=True) as stalled:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce, hub, 4)  # held: nobody else to tell a stall by
            await trio.sleep(STALL_SECONDS)
            started = trio.current_time()
            hub.release()  # the exit: what is held goes through now
        assert trio.current_time() == started
        assert not stalled.behind and stalled.dropped > 0
        hub.event("starting")  # the next run is paced again: held until given up on
        hub.console(CHUNK)
        await hub.pace()
        assert stalled.behind
        assert trio.current_time() == pytest.approx(STALL_MAX_SECONDS)  # none taken since 0


async def test_pacing_is_off_by_default(autojump_clock: trio.abc.Clock) -> None:
    """§8: no client slows the server unless config asks for lossless consoles."""
    settings = ConsoleSettings(throttle_lines=0)
    hub = EventHub(console=settings, queue_bytes=BUDGET)
    with hub.subscribe(paced=True) as stalled:
        started = trio.current_time()
        await produce(hub, 4)
        assert trio.current_time() == started
        assert stalled.dropped > 0 and stalled.peak_bytes <= BUDGET
    assert hub.held == 0


async def test_memory_is_bounded_by_the_per_socket_budget_and_frames_are_shared(
    autojump_clock: trio.abc.Clock,
) -> None:
    hub = EventHub(console=UNTHROTTLED, queue_bytes=BUDGET)
    with contextlib.ExitStack() as stack:
        subs = [stack.enter_context(hub.subscribe(paced=True)) for _ in range(20)]
        subs.append(stack.enter_context(hub.subscribe()))  # an unpaced one too
        await produce(hub, 32)
        for sub in subs:
            assert sub.peak_bytes <= BUDGET
            assert 0 < sub.queued_bytes <= BUDGET
        # 21 full queues hold the same frames: the agent keeps one budget, not 21.
        assert sum(sub.queued_bytes for sub in subs) > 20 * BUDGET // 2
        assert hub.retained_bytes <= BUDGET
    assert hub.fell_behind == 20


def test_frames_encode_their_json_once() -> None:
    frame = Frame(event="console", data="é\n")
    assert frame.text == '{"event":"console","data":"é\\n"}'
    assert frame.text is frame.text
    assert json.loads(frame.text) == frame


def test_token_bucket() -> None:
    bucket = TokenBucket(rate=10, burst=20, now=0)
    assert bucket.take(25, now=0) == 20
    assert bucket.take(1, now=0.05) == 0
    assert bucket.take(5, now=0.5) == 5
    assert bucket.take(100, now=100) == 20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"event":"send_command","command":"say hi\\n"}', ("send_command", "say hi\n")),
        ('{"send_command":["say hi"]}', ("send_command", "say hi")),
        ('{"event":"power","action":"restart"}', ("power", "restart")),
        ('{"event":"power","action":"stop"}', ("power", "stop")),
        ('{"power":["kill"]}', ("power", "kill")),
        ('{"event":"request_logs"}', ("request_logs", 100)),
        ('{"event":"request_logs","lines":7}', ("request_logs", 7)),
        ('{"logs":["50"]}', ("request_logs", 50)),
        ('{"logs":[]}', ("request_logs", 100)),
        ('{"event":"power","action":"dance"}', None),
        ('{"event":"request_logs","lines":-1}', None),
        ('{"event":"request_logs","lines":"many"}', None),
        ('{"event":"send_command","command":["x"]}', None),
        ('{"event":"console duplicate"}', None),
        ('{"send_command":[]}', None),
        ("[]", None),
        ("{", None),
        ("", None),
    ],
)
def test_parse_request(text: str, expected: tuple[str, object] | None) -> None:
    assert parse_request(text) == expected
