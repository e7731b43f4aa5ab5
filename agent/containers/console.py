"""The console pipeline of one container: bytes → lines → history, throttle, frames.

A server can print hundreds of thousands of lines a second; its clients must get them
without the agent spending Python work per line per client. So the pipeline works on
blocks: ``LineSplitter`` turns attach chunks into complete lines with one decode per
chunk; ``Console`` keeps every line in the history ring, lets through what the per-container
throttle admits (contract §8: ``console.throttle_lines`` per ``console.throttle_window_ms``,
one ``Console output throttled`` notice per window), and coalesces what arrives within
``COALESCE_SECONDS`` into frames of at most ``FRAME_MAX`` characters, each encoded to JSON
once (``Frame.text``) whatever the number of subscribers.

Ordering: a non-console frame (event, daemon message, stats) flushes the pending console
text first, so clients never see "Container stopped" before the lines printed before it.
The caller (the supervisor) matches ``start_pattern`` on the lines before they get here:
matching, like the history, sees every line, throttled or not.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any

import attrs
import trio

from ..converter import field_check

__all__ = [
    "COALESCE_SECONDS",
    "FRAME_MAX",
    "MAX_LINE",
    "THROTTLED",
    "Console",
    "ConsoleSettings",
    "Frame",
    "History",
    "LineSplitter",
    "TokenBucket",
]

#: A console line (with its newline) is at most this long; a longer one is cut there.
MAX_LINE = 64 * 1024
#: Characters of console text in one frame at most (a frame holds complete lines).
FRAME_MAX = 64 * 1024
#: Lines arriving within this many seconds of a flush are coalesced into the next frame.
COALESCE_SECONDS = 0.02
#: The notice of the per-container throttle and of a subscriber that lost frames.
THROTTLED = "Console output throttled"


@attrs.frozen
class ConsoleSettings:
    """Config section ``console`` (contract §8)."""

    #: Lines sent to clients per window and container; 0 turns the throttle off.
    throttle_lines: int = attrs.field(
        default=2000, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    throttle_window_ms: int = attrs.field(
        default=100, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    #: Console lines kept per container for ``request_logs``.
    history_lines: int = attrs.field(
        default=1000, validator=field_check(lambda v: 1 <= v <= 100_000, "must be 1 to 100000")
    )
    #: [ext] Characters the history holds at most (fewer lines are kept when they are long):
    #: 1000 lines of 64 KiB would otherwise be 64 MiB per container.
    history_bytes: int = attrs.field(
        default=1024 * 1024, validator=field_check(lambda v: v >= FRAME_MAX, "must be >= 65536")
    )
    #: [ext] The share of the time the console may be held for clients that keep up (the
    #: hub's pacing, ``hub.py``): a flood still runs at ``1 - hold_share`` of its speed at
    #: least. 0 (the default, as §8 promises that no client slows the server): never held,
    #: a client loses whatever its queue cannot hold. Holding the reader holds the game
    #: server too once Docker's attach buffer (1 MB) is full: a node whose consoles must be
    #: lossless for slow viewers may trade that, e.g. 0.5.
    hold_share: float = attrs.field(
        default=0.0, validator=field_check(lambda v: 0 <= v <= 0.9, "must be 0 to 0.9")
    )


class Frame(dict[str, Any]):
    """One server → client frame; its JSON text is built once, however many read it."""

    @cached_property
    def text(self) -> str:
        return json.dumps(self, separators=(",", ":"), ensure_ascii=False)

    @property
    def size(self) -> int:
        """What the frame costs a subscriber's queue (characters of JSON)."""
        return len(self.text)


class LineSplitter:
    """Attach output → complete lines (each ending with ``\\n``), one decode per chunk.

    A line longer than ``MAX_LINE`` is cut there; the rest continues as the next line.
    """

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[str]:
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n") + 1
        if len(data) < MAX_LINE:  # fast path: no line can be too long
            self._pending = data[end:]
            if not end:
                return []
            lines = data[:end].decode("utf-8", "replace").split("\n")
            lines.pop()  # the empty string after the last newline
            return [line + "\n" for line in lines]
        parts = data.split(b"\n")
        pending = parts.pop()
        out: list[bytes] = []
        for part in parts:
            while len(part) >= MAX_LINE:
                out.append(part[: MAX_LINE - 1])
                part = part[MAX_LINE - 1 :]
            out.append(part)
        while len(pending) >= MAX_LINE:
            out.append(pending[: MAX_LINE - 1])
            pending = pending[MAX_LINE - 1 :]
        self._pending = pending
        return [p.decode("utf-8", "replace") + "\n" for p in out]

    def close(self) -> list[str]:
        """The output ended: an unterminated last line is completed."""
        pending, self._pending = self._pending, b""
        return [pending.decode("utf-8", "replace") + "\n"] if pending else []


class TokenBucket:
    """``rate`` per second with bursts of up to ``burst``; starts full.

    Used for the console throttle (``throttle_lines`` per window, bursts of a window's
    worth) and the inbound WebSocket rate. A bucket rather than a fixed window: output that
    stays just under the rate is never cut because its bursts straddle a window edge.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._at = now

    def take(self, n: int, now: float) -> int:
        """Take up to ``n`` tokens; how many were granted."""
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        granted = min(n, int(self._tokens))
        self._tokens -= granted
        return granted


class History:
    """The last console lines, kept as the blocks they were written in.

    Blocks, not lines: writing costs O(1) per block however many lines it holds (a fast
    server writes thousands per block), and only ``tail`` ever splits one. Bounded by a
    line count and by characters.
    """

    def __init__(self, max_lines: int, max_chars: int) -> None:
        self.max_lines = max_lines
        self.max_chars = max_chars
        self._blocks: deque[tuple[str, int]] = deque()
        self._lines = 0
        self._chars = 0

    def add(self, text: str, lines: int) -> None:
        """``text``: ``lines`` complete lines."""
        self._blocks.append((text, lines))
        self._lines += lines
        self._chars += len(text)
        self._evict()

    def _evict(self) -> None:
        blocks = self._blocks
        while len(blocks) > 1 and (
            self._lines - blocks[0][1] >= self.max_lines or self._chars > self.max_chars
        ):
            old, count = blocks.popleft()
            self._lines -= count
            self._chars -= len(old)

    def __len__(self) -> int:
        return min(self._lines, self.max_lines)

    def __iter__(self) -> Iterator[str]:
        return iter(self.lines())

    def tail(self, n: int) -> str:
        """The last ``n`` lines (at most ``max_lines``) as one text."""
        need = min(n, self.max_lines)
        parts: list[str] = []
        for text, count in reversed(self._blocks):
            if need <= 0:
                break
            if count > need:
                start = len(text) - 1
                for _ in range(need):
                    start = text.rfind("\n", 0, start)
                text = text[start + 1 :]
            parts.append(text)
            need -= count
        parts.reverse()
        return "".join(parts)

    def lines(self) -> list[str]:
        """Every kept line (each ending with ``\n``)."""
        text = self.tail(self.max_lines)
        return [line + "\n" for line in text.split("\n")[:-1]]

    def resize(self, max_lines: int, max_chars: int) -> None:
        self.max_lines, self.max_chars = max_lines, max_chars
        self._evict()


class Console:
    """History, throttle and coalescing of one container's console.

    ``write`` is synchronous (the console reader and the install runner call it);
    ``run`` is the flusher task that sends what was held back for coalescing. Without a
    running flusher every write is sent at once.
    """

    def __init__(
        self,
        emit: Callable[[Frame], None],
        settings: ConsoleSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._emit = emit
        self._clock = clock
        self.history = History(settings.history_lines, settings.history_bytes)
        self._pending: list[str] = []
        self._pending_size = 0
        self._wake = trio.Event()
        self._flusher = False
        self._last_flush = -1e9
        self._bucket: TokenBucket | None = None
        self._noticed_at = -1e9
        self.settings = settings
        #: Lines not sent because of the throttle (they are in the history).
        self.throttled = 0
        self.configure(settings)

    def configure(self, settings: ConsoleSettings) -> None:
        """Apply new settings (config reload); the history keeps its newest lines."""
        self.settings = settings
        if settings.throttle_lines:
            window = settings.throttle_window_ms / 1000
            self._bucket = TokenBucket(
                settings.throttle_lines / window, settings.throttle_lines, self._clock()
            )
        else:
            self._bucket = None
        self.history.resize(settings.history_lines, settings.history_bytes)

    def write(self, lines: list[str]) -> None:
        """Take complete lines (each ending with ``\\n``)."""
        if not lines:
            return
        text = "".join(lines)
        count = len(lines)
        self.history.add(text, count)
        now = self._clock()
        notice = False
        if self._bucket is not None:
            admitted = self._bucket.take(count, now)
            if admitted < count:
                self.throttled += count - admitted
                text, count = "".join(lines[:admitted]), admitted
                window = self.settings.throttle_window_ms / 1000
                if now - self._noticed_at >= window:
                    self._noticed_at = now
                    notice = True
        if count:
            self._pending.append(text)
            self._pending_size += len(text)
        if notice:
            self.flush()
            self._emit(Frame(event="daemon_message", data=THROTTLED))
        elif not self._pending:
            return
        elif not self._flusher or now - self._last_flush >= COALESCE_SECONDS:
            self.flush()  # the first lines after a quiet spell go out at once
        else:
            if self._pending_size >= FRAME_MAX:
                self._drain(force=False)  # full frames now, the tail with the next flush
            self._wake.set()

    def flush(self) -> None:
        """Send everything pending now."""
        if self._pending:
            self._drain(force=True)

    def _drain(self, *, force: bool) -> None:
        """Send the pending text as frames of complete lines; unless ``force``, keep back a
        tail shorter than a frame for the next flush."""
        text = self._pending[0] if len(self._pending) == 1 else "".join(self._pending)
        start, size = 0, len(text)
        while size - start > FRAME_MAX or (force and start < size):
            limit = start + FRAME_MAX
            if size <= limit:
                end = size
            else:
                end = text.rfind("\n", start, limit) + 1
                if end <= start:  # a line longer than a frame (not cut by its writer)
                    self._emit(Frame(event="console", data=text[start : limit - 1] + "\n"))
                    start = limit - 1
                    continue
            self._emit(Frame(event="console", data=text[start:end]))
            start = end
        rest = text[start:]
        self._pending = [rest] if rest else []
        self._pending_size = len(rest)
        self._last_flush = self._clock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush held-back lines ``COALESCE_SECONDS`` after the previous flush."""
        self._flusher = True
        try:
            task_status.started()
            while True:
                await self._wake.wait()
                await trio.sleep(max(0.0, self._last_flush + COALESCE_SECONDS - self._clock()))
                self._wake = trio.Event()
                self.flush()
        finally:
            self._flusher = False

    def tail(self, n: int) -> str:
        """The last ``n`` lines of the history as one text."""
        return self.history.tail(n) if n > 0 else ""
