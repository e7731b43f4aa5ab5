"""Built-in plugin ``system``: ping, node info, and the config routes of contract §9.

Routes: ``GET /api/v1/public/ping`` (public), ``GET /system/info`` [ext],
``GET /remote/config`` (secrets redacted), ``POST /remote/config/reload``.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from ..config import deep_merge, redact
from ..converter import unstructure
from ..errors import BadRequest, ConfigError
from ..hookspecs import hookimpl
from ..runtime import Agent
from .views import public


def effective_config(agent: Agent) -> dict[str, Any]:
    """The file's raw JSON with every typed value (defaults included) laid over it."""
    config = agent.config
    typed: dict[str, Any] = unstructure(config)
    for name, section in config.sections.items():
        typed[name] = unstructure(section)
    return deep_merge(agent.loaded.raw, typed)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("system", __name__)

    @bp.get("/api/v1/public/ping")
    @public
    async def ping() -> dict[str, Any]:
        return {
            "status": "ok",
            "message": "Lightd is running",
            "version": agent.version,
            "docker": "connected" if agent.docker.available else "unreachable",
        }

    @bp.get("/system/info")
    async def system_info() -> dict[str, Any]:
        engine = await agent.docker.version()
        return {
            "version": agent.version,
            "uptime": int(agent.clock() - agent.started_at),
            "docker": {
                "version": engine.version,
                "api_version": engine.api_version,
                "os": engine.os,
                "arch": engine.arch,
            },
            "plugins": agent.hooks.describe(),
        }

    @bp.get("/remote/config")
    async def get_config() -> dict[str, Any]:
        shown: dict[str, Any] = redact(effective_config(agent))
        return shown

    @bp.post("/remote/config/reload")
    async def reload_config() -> dict[str, str]:
        try:
            await agent.reload_config()
        except ConfigError as exc:
            raise BadRequest(f"Invalid configuration: {exc}", code="invalid_config") from None
        return {"message": "Configuration reloaded successfully"}

    return [bp]
