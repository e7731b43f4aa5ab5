"""``start_pattern`` matching that no pattern and no output can turn into a stall.

Python's ``re`` backtracks: ``.*Server started.*`` costs ~3.4 s on one 64 KiB line, and a
pattern like ``(x+x+)+y`` never ends, all of it holding the GIL, so one container could
freeze the whole agent. What was measured (one 64 KiB line, Python 3.11, this machine):

==================  ========  ==============================  =========================
pattern             ``re``    ``regex`` (timeout, GIL freed)  RE2 (``google-re2``)
==================  ========  ==============================  =========================
.*Server started.*  3.45 s    < 0.1 ms                        0.2 ms
(x+x+)+y            endless   stops at its timeout            0.2 ms
(?:x|a){50}a.{500}z 0.02 s    0.16 s                          0.46 s (DFA out of memory)
==================  ========  ==============================  =========================

(The third line is random ``a``/``x``.) No engine is cheap for every pattern: RE2 is
linear but not *small*, a crafted pattern still costs half a second per line on the
caller's thread, and it refuses syntax panels may send today (lookarounds, backrefs) and
logs to stderr. So the choice is the ``regex`` package: the syntax of ``re`` (its
``VERSION0`` default), a ``timeout`` per call, and it releases the GIL while it matches a
``str``. A batch of lines is searched on the event loop for ``INLINE`` seconds at most
(what almost every server's output needs: short lines, simple patterns, no thread hop per
chunk); what is left goes to a worker thread (a small dedicated limiter, so pattern work
of many containers never takes the threads the file layer uses) within ``BUDGET``
seconds. A line not matched within the budget counts as no match. Measured with the
``timeout``: 1 ms asked is at most ~1.2 ms of CPU on ``(x+x+)+y``.

A call with a ``timeout`` costs ~1.8 µs (3000 short lines: 5.4 ms, against 0.3 ms for
``re`` without one), so a batch is first searched as one text, the lines joined, with the
pattern compiled ``MULTILINE`` (one call, µs): a line that matches alone also matches
there, so no match there means no line matches. Only a batch that may match (the one
with the awaited line, usually) is searched line by line. Patterns whose zero-width
assertions could see past a line's end (``\\A``, ``\\Z``, lookarounds) are always searched
line by line.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import trio

__all__ = ["BUDGET", "INLINE", "StartPattern", "check_start_pattern"]

log = logging.getLogger(__name__)

#: Seconds of matching per batch of console lines on the event loop at most.
INLINE = 0.001
#: Seconds of matching per batch of console lines at most (in a worker thread).
BUDGET = 0.05
#: Worker threads matching patterns at once, for the whole agent.
THREADS = 2
#: In a pattern, what could match a line alone but not the same line among others.
_CONTEXT = ("\\A", "\\Z", "(?=", "(?!", "(?<=", "(?<!")

_limiter: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("start_pattern")


def check_start_pattern(pattern: str) -> str | None:
    """Why ``pattern`` is refused at create (``re``'s message, as before), or ``None``."""
    import regex  # here: only servers with a start pattern need it (1.4 MB at rest)

    try:
        re.compile(pattern)
        regex.compile(pattern)
    except (re.error, regex.error) as exc:
        return str(exc)
    return None


def _thread_limiter() -> trio.CapacityLimiter:
    try:
        return _limiter.get()
    except LookupError:
        limiter = trio.CapacityLimiter(THREADS)
        _limiter.set(limiter)
        return limiter


class StartPattern:
    """A compiled ``start_pattern``; ``await matches(lines)`` searches each line."""

    def __init__(self, pattern: str, *, budget: float = BUDGET) -> None:
        self.pattern = pattern
        self.budget = budget
        import regex  # (see check_start_pattern)

        self._compiled = regex.compile(pattern)
        #: The same pattern for the joined lines of a batch (None: not usable so).
        self._joined = (
            None if any(c in pattern for c in _CONTEXT) else regex.compile(pattern, regex.M)
        )
        #: Batches whose budget ran out (some lines were not searched to the end).
        self.timeouts = 0

    def _scan(self, lines: Sequence[str], seconds: float) -> tuple[bool, int | None]:
        """``(matched, None)`` once decided; ``(False, i)`` when time ran out at line i."""
        deadline = time.monotonic() + seconds
        if self._joined is not None and len(lines) > 1:
            try:
                if self._joined.search("".join(lines), timeout=seconds) is None:
                    return False, None
            except TimeoutError:
                return False, 0
        compiled = self._compiled
        for index, line in enumerate(lines):
            left = deadline - time.monotonic()
            if left <= 0:
                return False, index
            try:
                if compiled.search(line, timeout=left) is not None:
                    return True, None
            except TimeoutError:
                return False, index
        return False, None

    def search(self, lines: Sequence[str]) -> bool:
        """Does a line match? Blocking, GIL released; never longer than the budget."""
        matched, stopped = self._scan(lines, self.budget)
        if stopped is not None:
            self.timeouts += 1
            if self.timeouts == 1:
                log.warning("start_pattern %r: matching ran out of its time budget", self.pattern)
        return matched

    async def matches(self, lines: Sequence[str]) -> bool:
        """Searched on the loop for ``INLINE`` seconds, the rest in a worker thread."""
        matched, stopped = self._scan(lines, INLINE)
        if stopped is None:
            return matched
        return await trio.to_thread.run_sync(
            self.search, list(lines[stopped:]), limiter=_thread_limiter(), abandon_on_cancel=True
        )
