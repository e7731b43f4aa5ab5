"""The link to the panel: recording updates, the heartbeat, the sender, and their status.

``RemoteSync`` is the plugin's one state object (``agent.stash[REMOTE_SYNC]``). Its parts:

* ``record`` turns a container transition into an update body and commits it to the
  outbox; it never talks to the panel, so a slow or dead panel cannot delay its caller.
* ``serve_sender`` (a service) works through the outbox in order, one POST at a time.
  2xx: delivered. 4xx other than 408/429 (401 and 403 included): rejected, logged as an
  error and dropped, as contract §9 says (the panel will never take that update).
  Anything else (connection error, timeout, 5xx, 408, 429, a redirect): the same update
  is retried after an exponential back-off with jitter, capped at 60 s, and nothing
  behind it moves, so per-server order holds.
* ``serve_heartbeat`` (a service) asks ``GET {url}/health`` at start and every
  ``remote.heartbeat_interval`` seconds. A healthy answer also cuts a running back-off
  short, so queued updates flow as soon as the panel is back.
* ``config_changed`` (on ``POST /remote/config/reload``) cancels requests in flight, resets
  the back-off and wakes both services, which read the ``remote`` section afresh for
  every request: a new URL or token applies to the very next request, and nothing queued
  is lost by enabling, disabling or re-pointing the link.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import random
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, NoReturn, TypedDict

import attrs
import httpx
import trio
from lightd import Agent, StashKey, StoreError

from .config import RemoteConfig
from .outbox import Outbox, QueuedUpdate

if TYPE_CHECKING:
    import ssl
    from collections.abc import AsyncIterator

__all__ = [
    "BACKOFF_CAP",
    "INSTALL_STATES",
    "REMOTE_SYNC",
    "RUNTIME_STATES",
    "Attempt",
    "Backoff",
    "Outcome",
    "RemoteSync",
    "Wakeup",
    "classify_status",
    "join_url",
    "run_periodically",
    "update_body",
]

log = logging.getLogger("lightd.plugins.remote_sync")

INSTALL_STATES = frozenset({"installing", "ready", "failed"})
RUNTIME_STATES = frozenset({"starting", "running", "stopping", "offline"})

#: Seconds before the first retry (before jitter); doubled per failure up to the cap.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
#: Updates read from the store per query, and acknowledged per range delete.
FETCH_BATCH = 200
FLUSH_EVERY = 200
#: While the panel stays unreachable, repeat the warning at most this often (seconds).
WARN_EVERY = 300.0
#: Response text kept for logs and the status route.
DETAIL_CHARS = 200

_HEALTHY = {"status": 200, "endpoint": "active"}


_tls_lock = threading.Lock()
_tls: list[ssl.SSLContext] = []


def _tls_context() -> ssl.SSLContext:
    """The TLS settings of both services' clients, as httpx's default (the CA bundle,
    ``SSL_CERT_FILE``/``SSL_CERT_DIR``), made once: each costs 40 ms and 1 MB. Made in a
    worker thread (reading the bundle releases the GIL), after the services said they are
    ready, so the agent's start does not wait for it; the lock keeps it to one."""
    with _tls_lock:
        if not _tls:
            _tls.append(httpx.create_ssl_context())
        return _tls[0]


def join_url(base: str, path: str) -> str:
    """``base`` + ``/`` + ``path`` with exactly one slash between them (never ``//``)."""
    return base.rstrip("/") + "/" + path.lstrip("/")


def update_body(
    internal_id: str, state: str, error: str | None, *, event_id: str, timestamp: int
) -> dict[str, Any]:
    """The JSON of one update (contract §9): the status shape, or for ``failed`` the error
    shape with the reason in ``data``; plus ``event_id`` and ``timestamp`` [ext]."""
    body: dict[str, Any] = {"event": "update", "server": internal_id}
    if state == "failed":
        body["error"] = "failed"
        body["data"] = error if error is not None else "Unknown error"
    else:
        body["status"] = state
    body["event_id"] = event_id
    body["timestamp"] = timestamp
    return body


class Outcome(enum.Enum):
    DELIVERED = "delivered"
    #: The panel refused this update for good (a 4xx): drop it and go on.
    REJECTED = "rejected"
    #: The panel did not take it (unreachable, 5xx, 408, 429, a redirect): try again later.
    RETRY = "retry"


#: 4xx answers that mean "later", not "never": keep the update, retry (contract §9).
#: Every other 4xx, 401 and 403 included, drops the update with an error log: the
#: contract says so, and a panel refusing our token must not hold the queue forever.
_RETRY_4XX = frozenset({408, 429})


def _healthy(body: object) -> bool:
    """The panel's ``{"status":200,"endpoint":"active"}``; other fields are its business."""
    return isinstance(body, dict) and all(body.get(k) == v for k, v in _HEALTHY.items())


def classify_status(status: int) -> Outcome:
    """What an HTTP status from ``POST /update`` means for the update that was sent."""
    if 200 <= status < 300:
        return Outcome.DELIVERED
    if 400 <= status < 500 and status not in _RETRY_4XX:
        return Outcome.REJECTED
    return Outcome.RETRY


@attrs.frozen
class Attempt:
    """The result of one request to the panel."""

    outcome: Outcome
    #: Short human text for logs and ``GET /remote/status`` (never holds the token).
    detail: str
    status: int | None = None
    #: Seconds the panel asked us to wait (``Retry-After``), if it did.
    retry_after: float | None = None
    #: The request was cut short by a config reload: retry at once, no back-off.
    superseded: bool = False


@attrs.define
class Backoff:
    """Exponential back-off with jitter: the n-th delay lies in ``[d/2, d]`` with
    ``d = min(cap, base * 2**n)``, so a fleet of nodes does not retry in lockstep."""

    base: float = BACKOFF_BASE
    cap: float = BACKOFF_CAP
    random: Callable[[], float] = random.random
    failures: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.failures, 62))
        self.failures += 1
        return float(ceiling * (0.5 + 0.5 * self.random()))

    def reset(self) -> None:
        self.failures = 0


class Wakeup:
    """A level-triggered wake-up for one waiter: ``set`` before ``wait`` is not lost, and
    ``wait`` re-arms it as it returns."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


async def run_periodically(
    probe: Callable[[], Awaitable[object]], interval: Callable[[], float], wake: Wakeup
) -> NoReturn:
    """Call ``probe`` now and then every ``interval()`` seconds, at a fixed rate: a slow
    probe does not push the schedule back (missed ticks are skipped, not bunched), and
    ``wake.set()`` probes at once and restarts the schedule from there."""
    while True:
        started = trio.current_time()
        await probe()
        period = interval()
        elapsed = trio.current_time() - started
        next_at = started + period * max(1, math.ceil(elapsed / period))
        with trio.move_on_at(next_at):
            await wake.wait()


@attrs.define
class LinkStatus:
    """What ``GET /remote/status`` shows; updated by both services."""

    healthy: bool = False
    #: Unix seconds of the last request the panel answered acceptably.
    last_ok: int | None = None
    last_error: str | None = None
    last_error_at: int | None = None
    last_heartbeat: int | None = None
    delivered: int = 0
    rejected: int = 0
    dropped: int = 0
    #: trio time of the next retry while backing off, else None.
    retry_at: float | None = None


class RemoteStatus(TypedDict):
    """``GET /remote/status`` [ext]: the link to the panel. Times are unix seconds;
    ``retry_in`` is the seconds until the next delivery attempt while backing off."""

    healthy: bool
    last_ok: int | None
    last_error: str | None
    pending_updates: int
    enabled: bool
    url: str
    report_power_state: bool
    last_error_at: int | None
    last_heartbeat: int | None
    delivered: int
    rejected: int
    dropped: int
    retry_in: float | None


REMOTE_SYNC: StashKey[RemoteSync] = StashKey("remote_sync")


class RemoteSync:
    """The remote sync state of one agent; see the module docstring."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.outbox = Outbox(agent.store)
        self.backoff = Backoff()
        self.status = LinkStatus()
        #: Every update with ``seq <= cursor`` is done (delivered or rejected).
        self.cursor = 0
        #: Updates after the cursor, kept in memory so that the status route costs no
        #: query; counted at start, re-synced whenever the sender finds the outbox empty.
        self.pending: int | None = None
        self._flushed = 0
        self._work = Wakeup()  # new updates, or the link changed: the sender looks again
        self._kick = Wakeup()  # the link changed or the panel is back: cut a back-off short
        self._beat = Wakeup()  # the link changed: heartbeat now
        self._in_flight: set[trio.CancelScope] = set()
        self._generation = 0  # bumped by every reload that changes the remote section
        self._last_state: dict[str, tuple[str, str | None]] = {}
        self._outage_warned_at: float | None = None
        #: The link state last logged (``None``: none yet): up/down is logged once per
        #: transition, not per retry.
        self._link_logged: bool | None = None

    @property
    def config(self) -> RemoteConfig:
        return self.agent.config.section(RemoteConfig)

    def enabled(self) -> bool:
        """Is remote sync switched on now (the config may have been reloaded)?"""
        return self.config.enabled

    # --- recording -----------------------------------------------------------------

    def record(self, internal_id: str, state: str, error: str | None) -> Awaitable[None] | None:
        """Queue the update for a transition, if it is one the panel gets.

        Returns an awaitable that commits it (the hook's caller awaits it), or ``None``
        when nothing is sent: remote sync disabled, a runtime state without
        ``report_power_state``, an unknown state, or a repeat of the last state.
        """
        previous = self._last_state.get(internal_id)
        self._last_state[internal_id] = (state, error)
        config = self.config
        if not config.enabled:
            return None
        if state in RUNTIME_STATES:
            if not config.report_power_state:
                return None
        elif state not in INSTALL_STATES:
            log.debug(
                "not reporting unknown state %r of %s",
                state,
                internal_id,
                extra={"internal_id": internal_id},
            )
            return None
        if previous == (state, error):
            log.debug(
                "not reporting %s of %s twice in a row",
                state,
                internal_id,
                extra={"internal_id": internal_id},
            )
            return None
        return self._enqueue(internal_id, state, error)

    def record_update(self, key: str, update: Mapping[str, Any]) -> Awaitable[None] | None:
        """Queue another plugin's update (``lightd_panel_update``), with ``event_id`` (kept
        when the update has one: a deterministic id) and ``timestamp`` added; ``None``
        while remote sync is disabled."""
        if not self.config.enabled:
            return None
        event_id = str(update.get("event_id") or uuid.uuid4())
        timestamp = int(self.agent.clock())
        body = {**update, "event_id": event_id, "timestamp": timestamp}
        return self._put(key, str(update.get("event", "update")), body, event_id, timestamp)

    async def _enqueue(self, internal_id: str, state: str, error: str | None) -> None:
        event_id = str(uuid.uuid4())
        timestamp = int(self.agent.clock())
        body = update_body(internal_id, state, error, event_id=event_id, timestamp=timestamp)
        await self._put(internal_id, state, body, event_id, timestamp)

    async def _put(
        self, internal_id: str, state: str, body: Mapping[str, Any], event_id: str, timestamp: int
    ) -> None:
        try:
            result = await self.outbox.put(
                internal_id,
                event_id,
                json.dumps(body, separators=(",", ":"), ensure_ascii=False),
                timestamp,
                limit=self.config.outbox_max,
                delivered_upto=self.cursor,
            )
        except (sqlite3.Error, StoreError) as exc:
            # Failing the caller (a container's state change) would not save the update.
            log.error(
                "could not queue the %s update about %s: %s",
                state,
                internal_id,
                exc,
                extra={"internal_id": internal_id},
            )
            return
        if self.pending is not None:
            self.pending += 1 - result.dropped
        if result.dropped:
            self.status.dropped += result.dropped
            log.error(
                "remote outbox full (remote.outbox_max=%d): dropped the %d oldest undelivered"
                " update(s)",
                self.config.outbox_max,
                result.dropped,
            )
        self._work.set()

    def forget(self, internal_id: str) -> None:
        """A container was deleted: stop remembering its last state."""
        self._last_state.pop(internal_id, None)

    # --- reload ----------------------------------------------------------------------

    def config_changed(self, old: RemoteConfig, new: RemoteConfig) -> None:
        """Apply a reloaded ``remote`` section: when the link changed (enabled, url, token,
        timeout) requests in flight are cut and retried under the new settings at once;
        queued updates stay where they are."""
        changes = {
            field.name
            for field in attrs.fields(RemoteConfig)
            if getattr(old, field.name) != getattr(new, field.name)
        }
        if not changes:
            return
        log.info(
            "remote sync reconfigured (%s): %s",
            ", ".join(sorted(changes)),
            f"reporting to {new.url}" if new.enabled else "disabled",
        )
        if changes & {"enabled", "url", "token", "timeout"}:
            self._generation += 1
            for scope in list(self._in_flight):
                scope.cancel()
            if changes & {"enabled", "url", "token"}:
                self.status.healthy = False
                self._outage_warned_at = None
                self._link_logged = None  # another panel, or none: its link is news
            self.backoff.reset()
            self._kick.set()
            self._beat.set()
        elif "heartbeat_interval" in changes:
            self._beat.set()
        self._work.set()

    # --- talking to the panel --------------------------------------------------------

    @asynccontextmanager
    async def open_client(self) -> AsyncIterator[httpx.AsyncClient]:
        """The HTTP client of one service: no base URL and no auth of its own, since both
        are taken from the current config for every request."""
        headers = {"User-Agent": f"lightd/{self.agent.version}", "Accept": "application/json"}
        tls = await trio.to_thread.run_sync(_tls_context)
        async with httpx.AsyncClient(headers=headers, follow_redirects=False, verify=tls) as client:
            yield client

    async def _request(
        self,
        client: httpx.AsyncClient,
        method: str,
        path: str,
        body: str | None = None,
    ) -> httpx.Response | Attempt:
        """One request under the current config: the response, or an ``Attempt`` saying
        why there is none. Bounded by ``remote.timeout`` as a whole, not per phase."""
        config = self.config
        generation = self._generation
        headers = {"Authorization": f"Bearer {config.token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        url = join_url(config.url, path)
        scope = trio.CancelScope(deadline=trio.current_time() + config.timeout)
        self._in_flight.add(scope)
        try:
            with scope:
                return await client.request(
                    method,
                    url,
                    content=None if body is None else body.encode(),
                    headers=headers,
                    timeout=config.timeout,
                )
        except httpx.TimeoutException:
            return Attempt(Outcome.RETRY, f"no answer within {config.timeout:g}s")
        except httpx.RequestError as exc:
            return Attempt(Outcome.RETRY, _describe(exc))
        except httpx.InvalidURL as exc:
            return Attempt(Outcome.RETRY, f"remote.url is not usable: {exc}")
        except ValueError as exc:  # e.g. a token that cannot go into a header; never show it
            return Attempt(Outcome.RETRY, f"remote settings not usable ({type(exc).__name__})")
        finally:
            self._in_flight.discard(scope)
        # Only a cancelled scope gets here: a reload cut the request, or the deadline passed.
        if generation != self._generation:
            return Attempt(Outcome.RETRY, "configuration reloaded", superseded=True)
        return Attempt(Outcome.RETRY, f"no answer within {config.timeout:g}s")

    def _ok(self) -> None:
        self.status.last_ok = int(self.agent.clock())
        if not self.status.healthy:
            self.status.healthy = True
        if self._link_logged is not True:
            again = " again" if self._link_logged is False else ""
            log.info("remote link up: panel at %s is reachable%s", self.config.url, again)
            self._link_logged = True
        self._outage_warned_at = None

    def _failed(self, detail: str, *, link_down: bool = True, during: str = "delivery") -> None:
        self.status.last_error = detail
        self.status.last_error_at = int(self.agent.clock())
        if link_down:
            self.status.healthy = False
            if self._link_logged is not False:
                log.warning(
                    "remote link down: %s: panel at %s: %s", during, self.config.url, detail
                )
                self._link_logged = False
                # the next reminder comes after WARN_EVERY, not on the next retry
                self._outage_warned_at = trio.current_time()

    def _should_warn(self) -> bool:
        """Warn once when the panel becomes unreachable, then every ``WARN_EVERY`` s."""
        now = trio.current_time()
        if self._outage_warned_at is None or now - self._outage_warned_at >= WARN_EVERY:
            self._outage_warned_at = now
            return True
        return False

    async def check_health(self, client: httpx.AsyncClient) -> bool:
        """``GET {url}/health`` once; records the result in ``status``."""
        if not self.config.enabled:
            self.status.healthy = False
            return False
        self.status.last_heartbeat = int(self.agent.clock())
        result = await self._request(client, "GET", "health")
        if isinstance(result, Attempt):
            if result.superseded:
                return False  # a reload cut it short; it probes again at once
            detail = result.detail
        elif result.status_code != 200:
            detail = f"health check answered HTTP {result.status_code}"
        elif not _healthy(_json_or_none(result)):
            detail = f"health check answered {_snippet(result.text)!r}, not {_HEALTHY}"
        else:
            log.debug("heartbeat: panel at %s is healthy", self.config.url)
            self._ok()
            self._kick.set()
            return True
        self._failed(detail, during="heartbeat")
        level = logging.WARNING if self._should_warn() else logging.DEBUG
        log.log(level, "heartbeat: panel at %s: %s", self.config.url, detail)
        return False

    async def send(self, client: httpx.AsyncClient, update: QueuedUpdate) -> Attempt:
        """``POST {url}/update`` with one stored update; says what became of it."""
        result = await self._request(client, "POST", "update", update.body)
        if isinstance(result, Attempt):
            return result
        status = result.status_code
        outcome = classify_status(status)
        if outcome is Outcome.DELIVERED:
            return Attempt(outcome, f"HTTP {status}", status)
        detail = f"HTTP {status}"
        if text := _snippet(result.text):
            detail += f": {text}"
        if status in (301, 302, 303, 307, 308):
            detail += " (a redirect: does remote.url point at the panel's API?)"
        return Attempt(outcome, detail, status, _retry_after(result))

    # --- services ----------------------------------------------------------------------

    async def serve_heartbeat(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The heartbeat service: ready at once (a dead panel must not hold up the
        agent's start), then a health check now and every ``heartbeat_interval``."""
        task_status.started()
        async with self.open_client() as client:
            await run_periodically(
                lambda: self.check_health(client),
                lambda: self.config.heartbeat_interval,
                self._beat,
            )

    async def serve_sender(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The outbox sender service: delivers stored updates in order, for ever."""
        self.pending = await self.outbox.count(self.cursor)
        task_status.started()
        async with self.open_client() as client:
            try:
                await self._deliver_forever(client)
            finally:
                with trio.CancelScope(shield=True):
                    await self.flush()

    async def _deliver_forever(self, client: httpx.AsyncClient) -> NoReturn:
        while True:
            if not self.config.enabled:
                await self.flush()
                await self._work.wait()
                continue
            batch = await self.outbox.fetch(self.cursor, FETCH_BATCH)
            if not batch:
                self.pending = 0
                await self.flush()
                await self._work.wait()
                continue
            for update in batch:
                if not self.enabled():  # a reload may switch it off between two sends
                    break
                attempt = await self.send(client, update)
                if attempt.outcome is Outcome.RETRY:
                    await self.flush()
                    await self._back_off(update, attempt)
                    break
                self._done(update, attempt)
                if self.cursor - self._flushed >= FLUSH_EVERY:
                    await self.flush()

    def _done(self, update: QueuedUpdate, attempt: Attempt) -> None:
        self.cursor = update.seq
        if self.pending:
            self.pending -= 1
        self.backoff.reset()
        self.status.retry_at = None
        self._ok()
        if attempt.outcome is Outcome.DELIVERED:
            self.status.delivered += 1
            log.debug(
                "delivered update %s about %s",
                update.event_id,
                update.server,
                extra={"internal_id": update.server},
            )
            return
        self.status.rejected += 1
        hint = "; check remote.token" if attempt.status in (401, 403) else ""
        detail = f"update {update.event_id} about {update.server} rejected ({attempt.detail}{hint})"
        self._failed(detail, link_down=False)
        log.error(
            "panel at %s %s; dropped it: %s",
            self.config.url,
            detail,
            update.body,
            extra={"internal_id": update.server},
        )

    async def _back_off(self, update: QueuedUpdate, attempt: Attempt) -> None:
        if attempt.superseded:
            return  # the config changed under the request: retry now, with the new one
        delay = self.backoff.next_delay()
        if attempt.retry_after is not None:
            delay = min(BACKOFF_CAP, max(delay, attempt.retry_after))
        self._failed(attempt.detail, during=f"update about {update.server}")
        self.status.retry_at = trio.current_time() + delay
        level = logging.DEBUG
        if attempt.status is not None and 300 <= attempt.status < 400:
            level = logging.ERROR  # remote.url points at the wrong place: say so every time
        elif self._should_warn():
            level = logging.WARNING
        if level > logging.DEBUG:
            pending = await self.pending_updates()
            log.log(
                level,
                "panel at %s did not take update about %s (%s); %d update(s) queued,"
                " retrying in %.1fs",
                self.config.url,
                update.server,
                attempt.detail,
                pending,
                delay,
                extra={"internal_id": update.server},
            )
        else:
            log.debug(
                "retrying update about %s in %.1fs: %s",
                update.server,
                delay,
                attempt.detail,
                extra={"internal_id": update.server},
            )
        self._kick.clear()
        with trio.move_on_after(delay):
            await self._kick.wait()
        self.status.retry_at = None

    async def flush(self) -> None:
        """Delete what was delivered or rejected since the last flush (one range delete)."""
        upto = self.cursor
        if upto > self._flushed:
            await self.outbox.delete_upto(upto)
            self._flushed = max(self._flushed, upto)

    async def pending_updates(self) -> int:
        """Queued updates not yet delivered (or rejected)."""
        if self.pending is None:
            return await self.outbox.count(self.cursor)
        return max(0, self.pending)

    async def describe(self) -> RemoteStatus:
        """The body of ``GET /remote/status``."""
        config = self.config
        status = self.status
        retry_in = None
        if status.retry_at is not None:
            retry_in = round(max(0.0, status.retry_at - trio.current_time()), 3)
        return {
            "healthy": status.healthy,
            "last_ok": status.last_ok,
            "last_error": status.last_error,
            "pending_updates": await self.pending_updates(),
            "enabled": config.enabled,
            "url": config.url,
            "report_power_state": config.report_power_state,
            "last_error_at": status.last_error_at,
            "last_heartbeat": status.last_heartbeat,
            "delivered": status.delivered,
            "rejected": status.rejected,
            "dropped": status.dropped,
            "retry_in": retry_in,
        }


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 1] + "…"


def _describe(exc: httpx.RequestError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({str(exc) or 'connection failed'})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None  # the HTTP-date form: fall back to our own back-off
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
