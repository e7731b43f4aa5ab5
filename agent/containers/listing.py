"""``lightd --servers [PAGE]``: the node's containers as a table, 5 per page.

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


def render(loaded: LoadedConfig, page: int) -> str:
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
        return "No containers on this node.\n"
    records.sort(key=lambda r: r["internal_id"])
    pages = (len(records) + PAGE_SIZE - 1) // PAGE_SIZE
    page = min(max(page, 1), pages)
    states = container_states(
        docker_url(loaded.config.docker.socket_path),
        ["lightd.managed=true", f"lightd.node={node}"],
    )
    rows = [("ID", "STATE", "IMAGE", "PORTS", "LIMITS")]
    for record in records[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
        install = record["install_state"]
        if install == "ready":
            state = states.get(record["internal_id"], "unknown") if states else "unknown"
        else:
            state = install
        rows.append(
            (record["internal_id"], state, record["image"], _ports(record), _limits(record))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.append(f"\nPage {page} of {pages} ({len(records)} containers)")
    return "\n".join(lines) + "\n"
