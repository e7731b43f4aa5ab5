"""A test-only plugin for agents run as a subprocess: ``POST /test/transitions`` makes the
core announce container transitions exactly as the containers feature will, through
``agent.hooks.container_state_changed``, and answers once every hook call returned.

Loaded through a ``lightd.plugins`` entry point written by the remote sync restart tests.
"""

from __future__ import annotations

from typing import Any

from lightd import Agent, hookimpl
from lightd.api import read_json
from quart import Blueprint


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("remote_sync_driver", __name__)

    @bp.post("/test/transitions")
    async def transitions() -> dict[str, Any]:
        body = await read_json()
        for item in body["transitions"]:
            await agent.hooks.container_state_changed(
                agent, item["server"], item["state"], item.get("error")
            )
        return {"count": len(body["transitions"])}

    return [bp]
