"""Rate limiting per token on the REST API (contract §17, config ``server.rate_limit``).

A token bucket per token: it holds at most ``burst`` requests and refills at
``requests_per_minute / 60`` per second; a request takes one, and a request finding less
than one is refused with ``429 {"error":"Rate limit exceeded"}`` and ``Retry-After``.
Temporary tokens are limited; the master token only with ``master: true`` (a panel
driving hundreds of servers uses it); ``requests_per_minute: 0`` turns it off. Disabled
authorization, public routes, CORS preflights and unknown routes (answered before any
token is read) are never limited.

What counts: every request carrying a live token, whatever its answer (a 403 for a
missing permission counts like a 200, so a flood of refusals is limited too), once it is
known whose token it is. A WebSocket counts once, at its upgrade. The check lives in
``lightd.api.auth.authenticate`` (every REST request, browser links and WebSocket
upgrades go through it) and in the fast read path (``lightd.api.fastpath``) for the
master token; both share this module's one ``RateLimiter``.

Every answer to a limited request carries (``headers``):

- ``X-RateLimit-Limit``: ``burst``, the bucket's capacity: the most requests that can be
  made in a row, and what ``Remaining`` counts down from (so ``Limit - Remaining`` is how
  many the client spent lately; the sustained rate is ``requests_per_minute``).
- ``X-RateLimit-Remaining``: requests that can be made now (whole, after this one).
- ``X-RateLimit-Reset``: unix time (seconds, rounded up) at which the bucket is full
  again, as the seed systems and GitHub send it. The wait as a delta is in
  ``Retry-After`` (whole seconds, at least 1) on a 429, the standard header every HTTP
  client knows; a client whose clock is off can rely on that one.

Buckets live in memory, keyed by the token's public id (``"master"`` for the master
token): never the token nor its hash. A bucket that has refilled to full is the same as
none, so a sweep (at most once a minute, on a request) drops those, and those of tokens
no longer live (revoked, expired, spent); a hard cap bounds the table whatever happens.
Settings are read from ``agent.config`` on every request, so a config reload changes
them at once; a bucket keeps its level, clamped to a lower ``burst``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

from quart import g
from quart.typing import ResponseTypes

from ..config import RateLimitConfig
from ..errors import TooManyRequests
from ..runtime import Agent, StashKey
from .tokens import TOKENS

__all__ = [
    "MASTER_KEY",
    "RATE_LIMITER",
    "RateLimiter",
    "Verdict",
    "add_headers",
    "check",
    "limiter",
]

#: The master token's bucket (its key never holds the token).
MASTER_KEY = "master"
RATE_LIMITED = "Rate limit exceeded"
#: Seconds (of the agent's clock) between two sweeps of idle buckets.
SWEEP_INTERVAL = 60.0
#: Buckets at most; past it, a sweep runs at once, then the oldest buckets go.
MAX_BUCKETS = 100_000


class Verdict(NamedTuple):
    """One request's outcome, and the headers its answer carries (a tuple: cheap to make
    on the fast read path)."""

    allowed: bool
    limit: int
    remaining: int
    #: Unix time (whole seconds) at which the bucket is full again.
    reset: int
    #: Whole seconds until one more request would be allowed (>= 1); 0 when allowed.
    retry_after: int

    def headers(self) -> list[tuple[str, str]]:
        pairs = [
            ("X-RateLimit-Limit", str(self.limit)),
            ("X-RateLimit-Remaining", str(self.remaining)),
            ("X-RateLimit-Reset", str(self.reset)),
        ]
        if not self.allowed:
            pairs.append(("Retry-After", str(self.retry_after)))
        return pairs


class RateLimiter:
    """Token buckets by key; ``take`` one request's worth."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        sweep_interval: float = SWEEP_INTERVAL,
        max_buckets: int = MAX_BUCKETS,
    ) -> None:
        self._clock = clock
        #: key → [tokens, when they were counted]; plain lists: the hot path stays cheap.
        self._buckets: dict[str, list[float]] = {}
        self._sweep_interval = sweep_interval
        self._max_buckets = max_buckets
        self._next_sweep = clock() + sweep_interval
        #: Keys still worth a bucket at a sweep (live token ids); ``None``: every key.
        self.live_keys: Callable[[], Iterable[str]] | None = None

    def __len__(self) -> int:
        return len(self._buckets)

    def __contains__(self, key: str) -> bool:
        return key in self._buckets

    def take(self, key: str, settings: RateLimitConfig) -> Verdict:
        """Count one request for ``key`` under ``settings`` (``requests_per_minute`` > 0)."""
        level, now, rate = self._take(key, settings)
        burst = settings.burst
        if level >= 0.0:
            return Verdict(True, burst, int(level), math.ceil(now + (burst - level) / rate), 0)
        level += 1.0  # what the bucket holds: less than one
        retry_after = max(1, math.ceil((1.0 - level) / rate))
        return Verdict(
            False, burst, int(level), math.ceil(now + (burst - level) / rate), retry_after
        )

    def take_raw(self, key: str, settings: RateLimitConfig) -> list[tuple[bytes, bytes]] | None:
        """``take``, for the fast read path: an allowed request's headers as ASGI wants
        them, or ``None`` (refused; nothing taken)."""
        level, now, rate = self._take(key, settings)
        if level < 0.0:
            return None
        return [
            (b"x-ratelimit-limit", b"%d" % settings.burst),
            (b"x-ratelimit-remaining", b"%d" % level),
            (b"x-ratelimit-reset", b"%d" % math.ceil(now + (settings.burst - level) / rate)),
        ]

    def _take(self, key: str, settings: RateLimitConfig) -> tuple[float, float, float]:
        """Take one request from ``key``'s bucket: (what it holds after, now, refill per
        second); refused (nothing taken): what it holds minus one, below 0."""
        now = self._clock()
        rate = settings.requests_per_minute / 60.0
        buckets = self._buckets
        if now >= self._next_sweep or len(buckets) >= self._max_buckets:
            self.sweep(settings, now)
            buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            level = settings.burst - 1.0
            buckets[key] = [level, now]
            return level, now, rate
        # A clock stepped back refills nothing (and takes nothing back).
        level = bucket[0] + (now - bucket[1]) * rate if now > bucket[1] else bucket[0]
        if level > settings.burst:
            level = settings.burst
        level -= 1.0
        bucket[1] = now
        if level >= 0.0:
            bucket[0] = level
        else:
            bucket[0] = level + 1.0
        return level, now, rate

    def sweep(self, settings: RateLimitConfig, now: float | None = None) -> int:
        """Drop the buckets that are full by now (the same as none) and those of keys no
        longer live; past ``max_buckets``, the oldest too. Returns how many went."""
        now = self._clock() if now is None else now
        self._next_sweep = now + self._sweep_interval
        rate = settings.requests_per_minute / 60.0
        live = None if self.live_keys is None else set(self.live_keys())
        before = len(self._buckets)
        self._buckets = {
            key: bucket
            for key, bucket in self._buckets.items()
            if (live is None or key in live or key == MASTER_KEY)
            and bucket[0] + max(0.0, now - bucket[1]) * rate < settings.burst
        }
        excess = len(self._buckets) - self._max_buckets + 1
        if excess > 0:  # insertion order: the oldest buckets first
            for key in list(self._buckets)[:excess]:
                del self._buckets[key]
        return before - len(self._buckets)

    def clear(self) -> None:
        self._buckets.clear()


RATE_LIMITER: StashKey[RateLimiter] = StashKey("rate_limiter")


def limiter(agent: Agent) -> RateLimiter:
    """The agent's one limiter (made on first use, with the agent's clock)."""
    found = agent.stash.get(RATE_LIMITER)
    if found is None:
        found = agent.stash[RATE_LIMITER] = RateLimiter(agent.clock)

        def live_ids() -> Iterable[str]:
            registry = agent.stash.get(TOKENS)
            return () if registry is None else (record.id for record in registry.tokens())

        found.live_keys = live_ids
    return found


def check(agent: Agent, key: str, master: bool) -> None:
    """Count this request (REST or WebSocket upgrade) for token ``key`` when a limit
    applies to it; its answer gets the headers (``add_headers``); over the limit raises
    ``TooManyRequests``."""
    settings = agent.config.server.rate_limit
    if not settings.requests_per_minute or (master and not settings.master):
        return
    verdict = limiter(agent).take(key, settings)
    g.lightd_rate_limit = verdict
    if not verdict.allowed:
        raise TooManyRequests(RATE_LIMITED)


def add_headers(response: ResponseTypes | None) -> None:
    """Put the rate-limit headers of this request (if it was limited) on its answer."""
    verdict: Verdict | None = g.get("lightd_rate_limit")
    if verdict is None or response is None:
        return
    for name, value in verdict.headers():
        response.headers[name] = value
