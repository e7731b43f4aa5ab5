"""``lightd --servers [PAGE] [--json]``: the node's containers as a table, 5 per page
(or as JSON).

Reads the state store directly (read-only; the agent need not run) and asks Docker for
each server's state when the engine answers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from ..config import LoadedConfig
from ..docker import container_states, docker_url
from ..runtime import StoragePaths
from ..store import DB_NAME

PAGE_SIZE = 5


def _ports(record: dict[str, Any]) -> str:
    ports = [
        f"{p['ip']}:{p['port']}->{p['container_port']}/{p['protocol']}" for p in record["ports"]
    ]
    return ", ".join(ports[:3]) + (f" (+{len(ports) - 3})" if len(ports) > 3 else "") or "-"


def _limits(record: dict[str, Any]) -> str:
    limits = record["limits"]
    memory = f"{limits['memory'] // (1024 * 1024)} MiB" if limits.get("memory") else "no mem limit"
    cpu = f"{limits['cpu']:g} CPU" if limits.get("cpu") else "no cpu limit"
    return f"{memory}, {cpu}"


def _records(loaded: LoadedConfig) -> tuple[list[dict[str, Any]], dict[str, str] | None]:
    """Every container record (by internal id) and Docker's state of each (``None`` when
    the engine does not answer)."""
    paths = StoragePaths.from_config(loaded.config, loaded.directory)
    db = paths.base / DB_NAME
    records: list[dict[str, Any]] = []
    node = ""
    if db.exists():
        conn = sqlite3.connect(f"{Path(db).as_uri()}?mode=ro", uri=True)
        try:
            records = [
                json.loads(r[0]) for r in conn.execute("SELECT data FROM containers_records")
            ]
            node = conn.execute("SELECT id FROM containers_node").fetchone()[0]
        except sqlite3.OperationalError:
            records = []
        finally:
            conn.close()
    if not records:
        return [], None
    records.sort(key=lambda r: r["internal_id"])
    states = container_states(
        docker_url(loaded.config.docker.socket_path),
        ["lightd.managed=true", f"lightd.node={node}"],
    )
    return records, states or None


def _state(record: dict[str, Any], states: dict[str, str] | None) -> str:
    install = str(record["install_state"])
    if install != "ready":
        return install
    return (states or {}).get(record["internal_id"], "unknown")


def listing(loaded: LoadedConfig, page: int | None = None) -> dict[str, Any]:
    """``--servers --json``: every container (or one page of ``PAGE_SIZE``) with its state,
    the same facts the table shows, as data."""
    records, states = _records(loaded)
    pages = max((len(records) + PAGE_SIZE - 1) // PAGE_SIZE, 1)
    if page is not None:
        page = min(max(page, 1), pages)
        records_shown = records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]
    else:
        records_shown = records
    return {
        "total": len(records),
        "page": page,
        "pages": pages,
        "servers": [
            {
                "internal_id": r["internal_id"],
                "state": _state(r, states),
                "install_state": r["install_state"],
                "image": r["image"],
                "ports": r["ports"],
                "limits": r["limits"],
            }
            for r in records_shown
        ],
    }


def render(loaded: LoadedConfig, page: int) -> str:
    records, states = _records(loaded)
    if not records:
        return "No containers on this node.\n"
    pages = (len(records) + PAGE_SIZE - 1) // PAGE_SIZE
    page = min(max(page, 1), pages)
    rows = [("ID", "STATE", "IMAGE", "PORTS", "LIMITS")]
    for record in records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
        rows.append(
            (
                record["internal_id"],
                _state(record, states),
                record["image"],
                _ports(record),
                _limits(record),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.append(f"\nPage {page} of {pages} ({len(records)} containers)")
    return "\n".join(lines) + "\n"
