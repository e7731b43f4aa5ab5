"""The ``motd`` plugin: a message of the day per server, in its volume at every start.

What it shows, one piece of the plugin API each:

* a typed config section (``lightd_add_config_sections``): ``motd.file``,
  ``motd.max_length``, ``motd.announce_interval``;
* its own table in the state store (``lightd_add_migrations``, namespace ``motd``) and
  its state on the stash (``lightd_configure``, ``MOTD``);
* routes (``lightd_add_routes``): ``GET|PUT|DELETE /motd/<internal_id>``, reachable by
  tokens restricted to that server (the URL names ``internal_id``);
* container hooks: ``lightd_container_starting`` (synchronous, no I/O: note the volume
  the server mounts), ``lightd_container_state_changed`` (on ``starting``, return an
  awaitable that writes the message into the volume; the core awaits it before Docker
  starts the server), ``lightd_container_deleted`` (forget the message);
* a service (``lightd_add_services``): loads the messages before it reports ready, then
  announces each running server's message to its console every
  ``motd.announce_interval`` seconds (0: never);
* a metric on the agent's registry: ``lightd_motd_messages``.

It imports only ``lightd``, ``lightd.api`` and ``lightd.files`` (the public surface).
"""

from __future__ import annotations

import logging
import math
import sqlite3
from collections.abc import Awaitable
from typing import TypedDict

import attrs
import trio
from lightd import (
    CONTAINER_SERVICE,
    VOLUMES,
    Agent,
    BadRequest,
    ContainersSettings,
    Migration,
    NotFound,
    Service,
    StashKey,
    field_check,
    hookimpl,
)
from lightd.api import Message, describe, read_json
from lightd.files import FileError, Root, parse
from quart import Blueprint

log = logging.getLogger(__name__)


# -- config -------------------------------------------------------------------------------


def _relative_file(value: object) -> bool:
    try:
        parse(str(value))
    except FileError:
        return False
    return isinstance(value, str)


@attrs.frozen
class MotdConfig:
    """Config section ``motd`` (every field has a default: a file without it works)."""

    #: Where the message is written, relative to the server's volume root.
    file: str = attrs.field(
        default="motd.txt", validator=field_check(_relative_file, "must be a relative path")
    )
    #: The longest message accepted, in characters.
    max_length: int = attrs.field(
        default=2000, validator=field_check(lambda v: 1 <= v <= 65536, "must be 1 to 65536")
    )
    #: Seconds between two announcements on a running server's console; 0: never.
    announce_interval: float = attrs.field(
        default=0.0, validator=field_check(lambda v: v >= 0, "must be 0 or more")
    )


# -- state --------------------------------------------------------------------------------

MIGRATIONS = (
    Migration(
        "motd",
        1,
        """
        CREATE TABLE motd_messages (
            internal_id TEXT PRIMARY KEY,
            message TEXT NOT NULL,
            updated_at INTEGER NOT NULL
        )
        """,
    ),
)


class MotdBody(TypedDict):
    """``GET``/``PUT /motd/:internal_id``: the message and when it was set (unix s)."""

    internal_id: str
    message: str
    updated_at: int


@attrs.frozen
class SetMotd:
    """The body of ``PUT /motd/:internal_id``."""

    message: str


@attrs.define
class Motd:
    """The plugin's state, ``agent.stash[MOTD]``: the messages (loaded by the service
    before it reports ready) and what the container hooks told it."""

    agent: Agent
    messages: dict[str, MotdBody] = attrs.Factory(dict)
    #: internal_id → the volume it mounts (``lightd_container_starting``).
    volumes: dict[str, str] = attrs.Factory(dict)
    #: Servers whose last state was ``running``.
    running: set[str] = attrs.Factory(set)
    #: Messages written into volumes since the start (tests and curious operators).
    written: int = 0
    #: Set by ``lightd_config_reloaded``: the service reads its interval again.
    reconfigured: trio.Event = attrs.Factory(trio.Event)

    @property
    def config(self) -> MotdConfig:
        return self.agent.config.section(MotdConfig)

    async def load(self) -> None:
        def read(conn: sqlite3.Connection) -> list[sqlite3.Row]:
            return conn.execute("SELECT * FROM motd_messages").fetchall()

        for row in await self.agent.store.read(read):
            self.messages[row["internal_id"]] = {
                "internal_id": row["internal_id"],
                "message": row["message"],
                "updated_at": row["updated_at"],
            }

    async def set(self, internal_id: str, message: str) -> MotdBody:
        body: MotdBody = {
            "internal_id": internal_id,
            "message": message,
            "updated_at": int(self.agent.clock()),
        }

        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO motd_messages VALUES (?, ?, ?)",
                (internal_id, message, body["updated_at"]),
            )

        await self.agent.store.write(save)  # committed before the API answers
        self.messages[internal_id] = body
        return body

    async def forget(self, internal_id: str) -> bool:
        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM motd_messages WHERE internal_id = ?", (internal_id,)
            ).rowcount

        deleted = await self.agent.store.write(delete)
        self.messages.pop(internal_id, None)
        return deleted > 0

    async def write_into_volume(self, internal_id: str) -> None:
        """Write the server's message into its volume (in a worker thread: file I/O
        blocks), through ``lightd.files``: never through a link planted in the volume."""
        body = self.messages.get(internal_id)
        volume_id = self.volumes.get(internal_id)
        if body is None or volume_id is None:
            return
        folder = await self.agent.stash[VOLUMES].path(volume_id)
        if folder is None:
            return
        where = parse(self.config.file)
        owner = self.agent.config.section_or_default(ContainersSettings).owner
        data = (body["message"].rstrip("\n") + "\n").encode()

        def write() -> None:
            with Root.open_volume(folder, owner=owner) as root:
                root.write_file(where, data)

        try:
            await trio.to_thread.run_sync(write)
        except (FileError, OSError) as exc:  # never keep a server from starting
            log.warning("motd: cannot write %s for %s: %s", where, internal_id, exc)
            return
        self.written += 1

    def announce(self) -> None:
        """Send each running server's message to its console clients."""
        containers = self.agent.stash.get(CONTAINER_SERVICE)
        if containers is None:  # the containers plugin is disabled
            return
        for internal_id in sorted(self.running):
            body = self.messages.get(internal_id)
            if body is not None:
                containers.daemon_message(internal_id, f"[MOTD] {body['message']}")

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, report ready, then announce every ``announce_interval`` seconds (a
        config reload wakes it up to read the interval again)."""
        await self.load()
        task_status.started()
        while True:
            interval = self.config.announce_interval
            with trio.move_on_after(interval if interval > 0 else math.inf):
                await self.reconfigured.wait()
                self.reconfigured = trio.Event()
                continue
            self.announce()


MOTD: StashKey[Motd] = StashKey("motd")


# -- hooks --------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"motd": MotdConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    motd = agent.stash[MOTD] = Motd(agent)
    agent.metrics.gauge_from(
        "lightd_motd_messages", "Servers with a message of the day", lambda: len(motd.messages)
    )


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    return [Service("motd", agent.stash[MOTD].serve)]


@hookimpl
def lightd_config_reloaded(agent: Agent) -> None:
    agent.stash[MOTD].reconfigured.set()


@hookimpl
def lightd_container_starting(agent: Agent, internal_id: str, volume_id: str) -> None:
    # Synchronous and before the start is queued: remember, do no I/O.
    agent.stash[MOTD].volumes[internal_id] = volume_id


@hookimpl
def lightd_container_state_changed(
    agent: Agent, internal_id: str, state: str
) -> Awaitable[None] | None:
    motd = agent.stash[MOTD]
    if state == "running":
        motd.running.add(internal_id)
    else:
        motd.running.discard(internal_id)
    if state == "starting":
        return motd.write_into_volume(internal_id)  # awaited before Docker starts it
    return None


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[bool]:
    motd = agent.stash[MOTD]
    motd.volumes.pop(internal_id, None)
    return motd.forget(internal_id)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    motd = agent.stash[MOTD]
    bp = Blueprint("motd", __name__)

    @bp.get("/motd/<internal_id>")
    @describe("A server's message of the day", errors=(404,), tags=("motd",))
    async def get_motd(internal_id: str) -> MotdBody:
        body = motd.messages.get(internal_id)
        if body is None:
            raise NotFound("No message of the day")
        return body

    @bp.put("/motd/<internal_id>")
    @describe(
        "Set a server's message of the day",
        description="Written into the server's volume (`motd.file`) before each start.",
        body=SetMotd,
        errors=(400,),
        examples={"body": {"message": "Welcome! Double XP all weekend."}},
        tags=("motd",),
    )
    async def put_motd(internal_id: str) -> MotdBody:
        wanted = await read_json(SetMotd)
        limit = motd.config.max_length
        if len(wanted.message) > limit:
            raise BadRequest(f"message: must be at most {limit} characters")
        return await motd.set(internal_id, wanted.message)

    @bp.delete("/motd/<internal_id>")
    @describe("Remove a server's message of the day", errors=(404,), tags=("motd",))
    async def delete_motd(internal_id: str) -> Message:
        if not await motd.forget(internal_id):
            raise NotFound("No message of the day")
        return {"message": "Message of the day removed"}

    return [bp]
