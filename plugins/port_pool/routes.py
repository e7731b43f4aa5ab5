"""The routes of contract §6: bodies in, values validated with the contract's messages.

Bodies are read with ``read_json`` (its shape errors: ``ip: is required``,
``ports: must be a list``, ``in_use: must be true or false``); the values the contract
names a message for (address, port, protocol) are typed ``Any`` there and judged by
``model.parse_*``. Every value is validated before anything changes, so a bad bulk
request changes nothing.
"""

from __future__ import annotations

from typing import Any

import attrs
from lightd import BadRequest, ValidationError
from lightd.api import read_json
from quart import Blueprint, request

from .model import echo, parse_ip, parse_path_port, parse_port, parse_protocol
from .pool import PortPool

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
    async def add_port() -> dict[str, Any]:
        body = await read_json(AddBody)
        ip, port, protocol = parse_ip(body.ip), parse_port(body.port), _protocol(body.protocol)
        await pool.add(ip, port, protocol)
        return {"message": "Port added to pool", "ip": ip, "port": port, "protocol": protocol}

    @bp.get("/network/ports")
    async def list_ports() -> dict[str, Any]:
        entries = await pool.entries(in_use=_flag("in_use"))
        return {"ports": [entry.to_json() for entry in entries]}

    @bp.get("/network/ports/random")
    async def random_port() -> dict[str, Any]:
        wanted = request.args.get("protocol")
        entry = await pool.random_free(None if wanted is None else parse_protocol(wanted))
        return {"ip": entry.ip, "port": entry.port, "protocol": entry.protocol, "in_use": False}

    @bp.get("/network/ports/<ip>/<port>")
    async def get_port(ip: str, port: str) -> dict[str, Any]:
        entry = await pool.get(parse_ip(ip), parse_path_port(port))
        return entry.to_json()

    @bp.put("/network/ports/<ip>/<port>/use")
    async def use_port(ip: str, port: str) -> dict[str, Any]:
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
    async def delete_port(ip: str, port: str) -> dict[str, Any]:
        await pool.delete(parse_ip(ip), parse_path_port(port))
        return {"message": "Port deleted from pool"}

    @bp.post("/network/ports/bulk-delete")
    async def bulk_delete() -> dict[str, Any]:
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
    async def bulk_add() -> dict[str, Any]:
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
