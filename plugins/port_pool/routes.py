"""The routes of contract §6: bodies in, values validated with the contract's messages.

Bodies are read with ``read_json`` (its shape errors: ``ip: is required``,
``ports: must be a list``, ``in_use: must be true or false``); the values the contract
names a message for (address, port, protocol) are typed ``Any`` there and judged by
``model.parse_*``. Every value is validated before anything changes, so a bad bulk
request changes nothing.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

import attrs
from lightd import BadRequest, ValidationError
from lightd.api import describe, read_json
from quart import Blueprint, request

from .model import echo, parse_ip, parse_path_port, parse_port, parse_protocol
from .pool import Entry, PortPool

__all__ = ["make_blueprint"]


@attrs.frozen
class AddBody:
    ip: Any
    port: Any
    protocol: Any = None


@attrs.frozen
class UseBody:
    in_use: bool


@attrs.frozen
class PortRef:
    ip: Any
    port: Any


@attrs.frozen
class BulkDeleteBody:
    ports: list[PortRef]


@attrs.frozen
class BulkAddBody:
    """``{"ports": [...]}``, or a range ``{"ip", "start", "end"}``; ``protocol`` is the
    range's, and the default of list items that name none."""

    ports: list[AddBody] | None = None
    ip: Any = None
    start: Any = None
    end: Any = None
    protocol: Any = None


# --- answers (their types are the OpenAPI document's schemas) ----------------------------

Protocol = Literal["tcp", "udp", "both"]


class PortAdded(TypedDict):
    message: str
    ip: str
    port: int
    protocol: str


class PortEntry(TypedDict):
    """A pool entry; ``container`` [ext] is the ``internal_id`` holding it, or ``null``."""

    ip: str
    port: int
    protocol: str
    in_use: bool
    container: str | None


class PortList(TypedDict):
    """The pool, sorted by address then port."""

    ports: list[PortEntry]


class FreePort(TypedDict):
    """A free entry chosen at random; it is not reserved."""

    ip: str
    port: int
    protocol: str
    in_use: bool


class PortUsage(TypedDict):
    message: str
    ip: str
    port: int
    in_use: bool


class PortMessage(TypedDict):
    message: str


class SkippedPort(TypedDict):
    ip: str
    port: int
    container: str | None


class BulkDeleted(TypedDict):
    """``skipped`` [ext]: the ports a container holds, left in the pool."""

    message: str
    deleted_count: int
    skipped: list[SkippedPort]


class BulkAdded(TypedDict):
    """``skipped_count`` [ext]: ports already in the pool (left as they were)."""

    message: str
    added_count: int
    skipped_count: int


class PortListQuery(TypedDict, total=False):
    #: Only used (``true``) or only free (``false``) entries [ext].
    in_use: bool


class RandomQuery(TypedDict, total=False):
    #: Only entries serving this protocol (``both`` serves either).
    protocol: Protocol


def _entry_json(entry: Entry) -> PortEntry:
    return {
        "ip": entry.ip,
        "port": entry.port,
        "protocol": entry.protocol,
        "in_use": entry.in_use,
        "container": entry.owner,
    }


def _protocol(value: object, default: str = "tcp") -> str:
    """A protocol field: absent or ``null`` means ``default``."""
    return default if value is None else parse_protocol(value)


def _flag(name: str) -> bool | None:
    """A ``true``/``false`` query parameter (also ``1``/``0``); absent is ``None``."""
    raw = request.args.get(name)
    if raw is None:
        return None
    lowered = raw.lower()
    if lowered in ("true", "1"):
        return True
    if lowered in ("false", "0"):
        return False
    raise BadRequest(f"{name}: must be true or false, not {echo(raw)}", code="invalid_query")


def _bulk_entries(body: BulkAddBody) -> list[tuple[str, int, str]]:
    default = _protocol(body.protocol)
    if body.ports is not None:
        return [
            (
                parse_ip(item.ip),
                parse_port(item.port, f"ports[{i}].port"),
                _protocol(item.protocol, default),
            )
            for i, item in enumerate(body.ports)
        ]
    if body.ip is None:
        raise ValidationError("ports: is required (or a range: ip, start, end)")
    ip = parse_ip(body.ip)
    for name in ("start", "end"):
        if getattr(body, name) is None:
            raise ValidationError(f"{name}: is required")
    start, end = parse_port(body.start, "start"), parse_port(body.end, "end")
    if start > end:
        raise BadRequest(f"Invalid port range: {start}-{end}", code="invalid_port_range")
    return [(ip, port, default) for port in range(start, end + 1)]


def make_blueprint(pool: PortPool) -> Blueprint:
    bp = Blueprint("port_pool", __name__)

    @bp.post("/network/ports")
    @describe(
        "Add a port to the pool",
        description="`protocol`: `tcp` (default), `udp` or [ext] `both`. 409 when "
        "`(ip, port)` is in the pool already.",
        body=AddBody,
        errors=(409,),
        examples={"body": {"ip": "0.0.0.0", "port": 25565, "protocol": "tcp"}},
        tags=("network",),
    )
    async def add_port() -> PortAdded:
        body = await read_json(AddBody)
        ip, port, protocol = parse_ip(body.ip), parse_port(body.port), _protocol(body.protocol)
        await pool.add(ip, port, protocol)
        return {"message": "Port added to pool", "ip": ip, "port": port, "protocol": protocol}

    @bp.get("/network/ports")
    @describe("List the pool", query=PortListQuery, tags=("network",))
    async def list_ports() -> PortList:
        entries = await pool.entries(in_use=_flag("in_use"))
        return {"ports": [_entry_json(entry) for entry in entries]}

    @bp.get("/network/ports/random")
    @describe(
        "Pick a free port",
        description="A free entry at random, not reserved. 404 when none is free.",
        query=RandomQuery,
        errors=(404,),
        tags=("network",),
    )
    async def random_port() -> FreePort:
        wanted = request.args.get("protocol")
        entry = await pool.random_free(None if wanted is None else parse_protocol(wanted))
        return {"ip": entry.ip, "port": entry.port, "protocol": entry.protocol, "in_use": False}

    @bp.get("/network/ports/<ip>/<port>")
    @describe(
        "Read a pool entry",
        description="400 when `ip` is not an IP address or `port` not 1-65535.",
        errors=(400,),
        tags=("network",),
    )
    async def get_port(ip: str, port: str) -> PortEntry:
        entry = await pool.get(parse_ip(ip), parse_path_port(port))
        return _entry_json(entry)

    @bp.put("/network/ports/<ip>/<port>/use")
    @describe(
        "Mark a port used or free",
        description="409 when freeing a port a container holds.",
        body=UseBody,
        errors=(400, 409),
        examples={"body": {"in_use": True}},
        tags=("network",),
    )
    async def use_port(ip: str, port: str) -> PortUsage:
        address, number = parse_ip(ip), parse_path_port(port)
        body = await read_json(UseBody)
        entry = await pool.set_in_use(address, number, body.in_use)
        return {
            "message": "Port usage updated",
            "ip": entry.ip,
            "port": entry.port,
            "in_use": entry.in_use,
        }

    @bp.delete("/network/ports/<ip>/<port>")
    @describe(
        "Delete a port from the pool",
        description="400 when `ip` is not an IP address or `port` not 1-65535; 409 when a "
        "container holds it.",
        errors=(400, 409),
        tags=("network",),
    )
    async def delete_port(ip: str, port: str) -> PortMessage:
        await pool.delete(parse_ip(ip), parse_path_port(port))
        return {"message": "Port deleted from pool"}

    @bp.post("/network/ports/bulk-delete")
    @describe(
        "Delete many ports",
        description="Ports a container holds are skipped and listed in `skipped` [ext].",
        body=BulkDeleteBody,
        examples={"body": {"ports": [{"ip": "0.0.0.0", "port": 25565}]}},
        tags=("network",),
    )
    async def bulk_delete() -> BulkDeleted:
        body = await read_json(BulkDeleteBody)
        keys = [
            (parse_ip(ref.ip), parse_port(ref.port, f"ports[{i}].port"))
            for i, ref in enumerate(body.ports)
        ]
        deleted, skipped = await pool.delete_many(keys)
        return {
            "message": f"Deleted {deleted} ports from pool",
            "deleted_count": deleted,
            "skipped": [
                {"ip": entry.ip, "port": entry.port, "container": entry.owner} for entry in skipped
            ],
        }

    @bp.post("/network/ports/bulk")
    @describe(
        "Add many ports [ext]",
        description='A list `{"ports": [{"ip", "port", "protocol"?}]}` or a range '
        '`{"ip", "start", "end", "protocol"?}`; ports already in the pool are '
        "skipped.",
        body=BulkAddBody,
        examples={"body": {"ip": "0.0.0.0", "start": 25565, "end": 25575, "protocol": "tcp"}},
        tags=("network",),
    )
    async def bulk_add() -> BulkAdded:
        body = await read_json(BulkAddBody)
        entries = _bulk_entries(body)
        unique = len({(ip, port) for ip, port, _ in entries})
        added = await pool.add_many(entries)
        return {
            "message": f"Added {added} ports to pool",
            "added_count": added,
            "skipped_count": unique - added,
        }

    return bp
