"""Built-in plugin ``system``: ping, node info, and the config routes of contract §9.

Routes: ``GET /api/v1/public/ping`` (public), ``GET /system/info`` [ext],
``GET /remote/config`` (secrets redacted), ``POST /remote/config/reload``.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, cast

from quart import Blueprint

from ..config import deep_merge, redact
from ..converter import unstructure
from ..errors import BadRequest, ConfigError
from ..hookspecs import hookimpl
from ..runtime import Agent
from .views import Message, describe, public


class Ping(TypedDict):
    status: Literal["ok"]
    message: str
    #: The agent's version.
    version: str
    #: [ext] Whether the Docker engine answers.
    docker: Literal["connected", "unreachable"]


class EngineVersion(TypedDict):
    version: str
    api_version: str
    os: str
    arch: str


class PluginInfo(TypedDict):
    name: str
    builtin: bool
    #: The distribution's version (third-party plugins); ``None`` for built-ins.
    version: str | None
    hooks: list[str]


class SystemInfo(TypedDict):
    version: str
    #: Seconds since the agent started.
    uptime: int
    docker: EngineVersion
    plugins: list[PluginInfo]


#: ``GET /remote/config``: the effective config.json, secrets redacted (an object per
#: section, plugin sections and unknown keys included).
CONFIG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The effective config.json: every default filled in, every secret redacted.",
    "properties": {
        name: {"type": "object"}
        for name in ("server", "authorization", "docker", "storage", "remote", "plugins")
    },
    "additionalProperties": True,
}


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
    @describe(
        "Is the agent up?",
        description="No headers needed (contract §4).",
        examples={
            200: {
                "status": "ok",
                "message": "Lightd is running",
                "version": "0.2.1",
                "docker": "connected",
            }
        },
        tags=("system",),
    )
    @public
    async def ping() -> Ping:
        return {
            "status": "ok",
            "message": "Lightd is running",
            "version": agent.version,
            "docker": "connected" if agent.docker.available else "unreachable",
        }

    @bp.get("/system/info")
    @describe(
        "The agent, its Docker engine and its plugins",
        errors=(503,),
        tags=("system",),
    )
    async def system_info() -> SystemInfo:
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
            "plugins": cast("list[PluginInfo]", agent.hooks.describe()),
        }

    @bp.get("/remote/config")
    @describe(
        "The effective configuration, secrets redacted",
        responses={200: CONFIG_SCHEMA},
        tags=("system",),
    )
    async def get_config() -> dict[str, Any]:
        shown: dict[str, Any] = redact(effective_config(agent))
        return shown

    @bp.post("/remote/config/reload")
    @describe(
        "Re-read config.json and apply what can change live",
        description="An invalid file is a 400 and the running configuration is kept.",
        errors=(400,),
        examples={200: {"message": "Configuration reloaded successfully"}},
        tags=("system",),
    )
    async def reload_config() -> Message:
        try:
            await agent.reload_config()
        except ConfigError as exc:
            raise BadRequest(f"Invalid configuration: {exc}", code="invalid_config") from None
        return {"message": "Configuration reloaded successfully"}

    return [bp]
