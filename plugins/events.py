"""Built-in plugin ``events``: the node event stream over HTTP and WebSocket (contract §17).

The ring is the core's (``agent.events``, ``lightd.NodeEvents``: why ``seq`` starts where it
does and what ``resync`` means are told there). This plugin fills it from the core's
notifications and serves it:

* ``lightd_container_state_changed`` → ``container.install`` (``installing``, ``ready``,
  ``failed`` with its ``error``) or ``container.state`` (``offline``, ``starting``,
  ``running``, ``stopping``); ``lightd_container_deleted`` → ``container.deleted``;
  ``lightd_job_changed`` → ``job.progress``; ``lightd_job_done`` → ``job.done`` (the job's
  body, as ``GET /jobs/:id``). Progress comes already throttled by the job runner (at most
  twice a second per job, the latest value), so a fast job adds at most two events a
  second to the ring and a slow one no more than it changes. ``container.created`` is
  published by the containers manager, ``volume.*`` by the volumes plugin, ``backup.done``
  by a backups plugin: each where the change is made.
* ``GET /events?since=<seq>`` as Server-Sent Events (``Last-Event-ID`` wins over
  ``since``, so a browser's ``EventSource`` resumes where it was) and the WebSocket
  ``/ws/events?token=<token>&since=<seq>`` (one JSON text frame per event). The master
  token only: an unrestricted temporary token is refused with 403 (one restricted to
  containers or volumes with 401, as outside its scope). Without ``since`` a reader gets
  what happens from now on.

Each reader is a cursor into the ring (no queue of its own): a slow one is sent what it
missed from the ring, in batches, and never holds the publishers up; one the ring moved
past gets ``resync``. Every ``events.keepalive`` seconds without an event the SSE stream
sends a comment line (``: keep-alive``) so proxies keep it open. When the agent stops,
every stream ends (SSE: the response ends; WebSocket: close 1001).

Metric: ``lightd_events_delivery_seconds{transport="sse"|"ws"}``, a histogram of the
seconds from an event's ``publish`` to its frame written to a live reader's connection:
the agent's own share of the lag a panel sees (``bench.events`` reads it).

Hooks: ``lightd_add_config_sections`` (section ``events``), ``lightd_configure`` (the
metric), ``lightd_add_services`` (ends the streams at stop), ``lightd_add_routes``,
``lightd_config_reloaded`` (``buffer`` applies live), the notifications above.

Config section ``events``: ``buffer`` (10 000) events kept for ``since``, ``keepalive``
(15) seconds between SSE keep-alive comments.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypedDict

import trio
from lightd import (
    EVENT_TYPES,
    Agent,
    BadRequest,
    Config,
    EventsSettings,
    Forbidden,
    JobView,
    Metrics,
    NodeEvent,
    NodeEvents,
    Service,
    StashKey,
    hookimpl,
)
from lightd.api import current_auth, describe, read_timeout, requires
from quart import Blueprint, Response, request, websocket

__all__ = ["EventsQuery", "parse_since"]

#: Install states (``container.install``); the others are runtime states.
INSTALL_STATES = frozenset({"installing", "ready", "failed"})
#: WebSocket close code when the agent stops ("Going Away").
CLOSE_GOING_AWAY = 1001
#: A seq is at most this many digits (the origin is ~1.7e15: 16 digits).
MAX_SEQ_DIGITS = 19
SINCE_INVALID = "since must be a non-negative integer"
MASTER_ONLY = "Events need the master token"
IGNORED = trio.TASK_STATUS_IGNORED


class EventsQuery(TypedDict, total=False):
    #: Replay the events after this seq (the ``seq`` of the last event you have).
    since: int


def parse_since(value: str | None) -> int | None:
    """``since`` or ``Last-Event-ID``: a non-negative decimal integer, or absent."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or not text.isascii() or len(text) > MAX_SEQ_DIGITS:
        raise BadRequest(SINCE_INVALID, code="invalid_query")
    return int(text)


def _master_only() -> None:
    if current_auth().kind == "temporary":
        raise Forbidden(MASTER_ONLY, code="master_token_required")


def settings(agent: Agent) -> EventsSettings:
    return agent.config.section_or_default(EventsSettings)


# -- the delivery lag ---------------------------------------------------------------------

#: Upper bounds (seconds) of the delivery-lag histogram's buckets (the target is 50 ms).
DELIVERY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Delivery:
    """``lightd_events_delivery_seconds{transport="sse"|"ws"}``: seconds from an event's
    ``publish`` to its frame written to a reader's connection (the agent's own share of
    the lag a panel sees: its event loop's delay, never the network's or the client's).
    Live events only: a replay's age is not a delay."""

    def __init__(self, metrics: Metrics) -> None:
        histogram = metrics.histogram(
            "lightd_events_delivery_seconds",
            "Seconds from a node event's publish to its frame written to a reader's "
            "connection, by transport (live events, not replays).",
            ("transport",),
            buckets=DELIVERY_BUCKETS,
        )
        self.sse: Callable[[float], None] = histogram.labels("sse").observe
        self.ws: Callable[[float], None] = histogram.labels("ws").observe


DELIVERY: StashKey[Delivery] = StashKey("events.delivery")


def _sent(observe: Callable[[float], None], batch: Sequence[NodeEvent], live_after: int) -> None:
    """Record the lag of the events of ``batch`` published after ``live_after`` (a seq)."""
    now = time.time()
    for event in batch:
        if event.seq > live_after and event.type in EVENT_TYPES:
            observe(now - event.published)


# -- publishing ---------------------------------------------------------------------------


@hookimpl
def lightd_container_state_changed(
    agent: Agent, internal_id: str, state: str, error: str | None
) -> None:
    if state in INSTALL_STATES:
        data = {"internal_id": internal_id, "state": state, "error": error}
        agent.events.publish("container.install", data)
    else:
        agent.events.publish("container.state", {"internal_id": internal_id, "state": state})


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> None:
    agent.events.publish("container.deleted", {"internal_id": internal_id})


@hookimpl
def lightd_job_changed(agent: Agent, job: JobView) -> None:
    agent.events.publish("job.progress", job.to_json())


@hookimpl
def lightd_job_done(agent: Agent, job: JobView) -> None:
    agent.events.publish("job.done", job.to_json())


# -- wiring -------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"events": EventsSettings}


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[DELIVERY] = Delivery(agent.metrics)


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    agent.events.resize(new.section_or_default(EventsSettings).buffer)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    async def serve_events(
        *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ends every stream once a stop is requested (they would hold the drain up)."""
        task_status.started()
        await agent.wait_stop_requested()
        agent.events.close()
        await trio.sleep_forever()

    return [Service("events", serve_events)]


#: Seconds an SSE response ends before the server's read timeout would cut it.
_END_BEFORE = 5.0


async def _sse(
    events: NodeEvents,
    cursor: int,
    keepalive: float,
    lasts: float,
    observe: Callable[[float], None],
) -> AsyncIterator[bytes]:
    """The stream of one SSE response. It ends by itself after ``lasts`` seconds: the
    server drops a connection that sends nothing for its read timeout, and an SSE client
    never sends; a clean end (``retry`` says in 1 s) has the client reconnect with
    ``Last-Event-ID`` and lose nothing, where a cut would look like a failure.

    Each batch is one chunk; the server asks for the next one once it has written this
    one to the connection, which is when its lag is recorded (``observe``)."""
    end = trio.current_time() + lasts
    live_after = events.head
    with events.subscribe(cursor) as reader:
        # The headers go out now, not with the first event.
        yield b": lightd node events\nretry: 1000\n\n"
        while trio.current_time() < end:
            batch = None
            with trio.move_on_at(min(end, trio.current_time() + keepalive)):
                try:
                    batch = await reader.receive()
                except trio.EndOfChannel:
                    return
            if batch is not None:
                yield b"".join(event.sse for event in batch)
                _sent(observe, batch, live_after)
            elif trio.current_time() < end:
                yield b": keep-alive\n\n"


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("events", __name__)

    @bp.get("/events")
    @describe(
        "The node event stream (Server-Sent Events)",
        description=(
            "Every change on the node as it happens, one SSE event each: `id: <seq>`, "
            "`event: <type>`, `data: <the event as JSON>`; the event is "
            '`{"seq","type","data","timestamp"}` with `seq` increasing by one and `type` one '
            "of `container.created`, `container.deleted`, `container.install`, "
            "`container.state`, `job.progress`, `job.done`, `volume.created`, "
            "`volume.deleted`, `backup.done`. `since=<seq>` (or the `Last-Event-ID` header, "
            "which wins) first replays what came after that event from the ring of the last "
            "`events.buffer` events; a `since` the ring no longer covers (or of an earlier "
            'run of the agent) is answered first with `{"type":"resync","seq":<head>}`: '
            "re-read the state, then go on from there. A comment line every "
            "`events.keepalive` seconds without events. A response ends by itself shortly "
            "before the server's read timeout (`websocket.ping_interval` + `ping_timeout`, "
            "60 s by default; `retry: 1000`): reconnect with `Last-Event-ID` (EventSource "
            "does) and nothing is lost. The master token only (403 for a "
            "temporary token). 400 `since must be a non-negative integer`."
        ),
        query=EventsQuery,
        responses={200: {"text/event-stream": str}},
        errors=(403,),
        tags=("events",),
    )
    @requires(None)
    async def event_stream() -> Response:
        _master_only()
        events = agent.events
        since = parse_since(request.headers.get("Last-Event-ID"))
        if since is None:
            since = parse_since(request.args.get("since"))
        cursor = events.head if since is None else since
        response = Response(
            _sse(
                events,
                cursor,
                settings(agent).keepalive,
                max(1.0, read_timeout(agent) - _END_BEFORE),
                agent.stash[DELIVERY].sse,
            ),
            content_type="text/event-stream",
        )
        response.timeout = None  # not Quart's RESPONSE_TIMEOUT: the stream lasts
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return response

    @bp.websocket("/ws/events")
    @describe(
        "The node event stream (WebSocket)",
        description=(
            "The events of `GET /events`, one JSON text frame each "
            '(`{"seq","type","data","timestamp"}`), with `?since=<seq>` replaying from the '
            "ring the same way (`resync` first when it no longer covers it). Frames sent "
            "to the agent are ignored. The master token only: a temporary token is refused "
            "with 403 before the upgrade; 400 for a bad `since`. Closed with 1001 when the "
            "agent stops."
        ),
        query=EventsQuery,
        responses={101: None},
        errors=(400, 403),
        tags=("events",),
    )
    @requires(None)
    async def event_socket() -> None:
        _master_only()
        events = agent.events
        since = parse_since(websocket.args.get("since"))
        cursor = events.head if since is None else since
        await websocket.accept()
        observe, live_after = agent.stash[DELIVERY].ws, events.head
        with events.subscribe(cursor) as reader:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ignore_incoming)
                async for batch in reader:
                    for event in batch:
                        await websocket.send(event.text)
                    _sent(observe, batch, live_after)
                await websocket.close(CLOSE_GOING_AWAY)
                nursery.cancel_scope.cancel()

    return [bp]


async def _ignore_incoming() -> None:
    """Read and drop what the client sends (Quart would queue it unread)."""
    while True:
        await websocket.receive()
