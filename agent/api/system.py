"""Built-in plugin ``system``: ping, node info, and the config routes of contract §9.

Routes: ``GET /api/v1/public/ping`` (public), ``GET /system/info`` [ext],
``GET /system/utilization`` (contract §17), ``GET /remote/config`` (secrets redacted),
``POST /remote/config/reload``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

import attrs
import trio
from quart import Blueprint

from ..config import deep_merge, redact
from ..containers import CONTAINERS
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
    #: Where it came from: ``builtin``, or the name of the distribution (``pip``
    #: package) whose ``lightd.plugins`` entry point loaded it.
    origin: str
    #: That distribution's version (a built-in's: the agent's).
    version: str | None
    #: The hooks it implements.
    hooks: list[str]


class SystemInfo(TypedDict):
    version: str
    #: Seconds since the agent started.
    uptime: int
    docker: EngineVersion
    plugins: list[PluginInfo]


class MemoryUsage(TypedDict):
    #: Bytes (``MemTotal``).
    total: int
    #: Bytes in use: ``MemTotal - MemAvailable`` (page cache that can be dropped is free).
    used: int


class DiskUsage(TypedDict):
    #: Bytes of the filesystem holding ``storage.volumes_path``.
    total: int
    used: int
    #: Bytes an unprivileged writer can still use (``total`` also counts root's reserve).
    free: int


class ContainerCounts(TypedDict):
    #: Containers whose runtime state is not ``offline`` (starting and stopping count).
    running: int
    total: int


class Utilization(TypedDict):
    #: Busy share of the whole machine, 0-100 (not 100 per CPU), since the previous call
    #: (the first call: since boot).
    cpu_percent: float
    cpu_count: int
    memory: MemoryUsage
    disk: DiskUsage
    #: 1, 5 and 15 minute load averages.
    load_average: list[float]
    containers: ContainerCounts


@attrs.frozen
class CpuTimes:
    """The ``cpu`` line of ``/proc/stat``: jiffies since boot, busy and in all."""

    busy: int
    total: int


def read_cpu_times(stat: Path = Path("/proc/stat")) -> CpuTimes:
    """Idle is ``idle + iowait``; guest time is already counted in ``user``/``nice``."""
    for line in stat.read_text(encoding="ascii").splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            values = [int(v) for v in fields[1:9]]  # user..steal, not guest/guest_nice
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values)
            return CpuTimes(busy=total - idle, total=total)
    raise OSError(f"no cpu line in {stat}")


def read_memory(meminfo: Path = Path("/proc/meminfo")) -> MemoryUsage:
    kib: dict[str, int] = {}
    for line in meminfo.read_text(encoding="ascii").splitlines():
        name, _, rest = line.partition(":")
        if name in ("MemTotal", "MemAvailable"):
            kib[name] = int(rest.split()[0])
    total = kib["MemTotal"] * 1024
    return {"total": total, "used": total - kib["MemAvailable"] * 1024}


class CpuMeter:
    """The busy share since the previous reading: no background sampler to run or stop,
    and each caller (a panel polling every few seconds) gets the window it polls at."""

    def __init__(self) -> None:
        self._last: CpuTimes | None = None
        self._percent = 0.0

    def read(self, now: CpuTimes) -> float:
        """0-100; since boot at first; the last answer again if no jiffy went by."""
        before = self._last
        if before is not None and now.total <= before.total:
            return self._percent
        busy, total = now.busy, now.total
        if before is not None:
            busy, total = now.busy - before.busy, now.total - before.total
        self._last = now
        if total > 0:
            self._percent = round(min(100.0, max(0.0, 100.0 * busy / total)), 1)
        return self._percent


@attrs.frozen
class MachineSample:
    cpu: CpuTimes
    memory: MemoryUsage
    disk: DiskUsage
    load_average: list[float]


def sample_machine(volumes: Path) -> MachineSample:
    """Blocking reads, run in a worker thread: ``/proc`` is cheap, but ``statvfs`` on a
    network filesystem can hang, and the event loop must never wait on it."""
    disk = shutil.disk_usage(volumes)
    return MachineSample(
        cpu=read_cpu_times(),
        memory=read_memory(),
        disk={"total": disk.total, "used": disk.used, "free": disk.free},
        load_average=[round(v, 2) for v in os.getloadavg()],
    )


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

    cpu_meter = CpuMeter()

    @bp.get("/system/utilization")
    @describe(
        "How busy the machine is: CPU, memory, disk, load, containers",
        description=(
            "`cpu_percent` is the busy share of the whole machine (0-100) since the previous"
            " call to this route (since boot on the first one); `disk` is the filesystem"
            " holding the volumes; `containers.running` counts those not `offline`."
        ),
        examples={
            200: {
                "cpu_percent": 12.5,
                "cpu_count": 8,
                "memory": {"total": 16_648_470_528, "used": 5_368_709_120},
                "disk": {
                    "total": 502_468_108_288,
                    "used": 120_259_084_288,
                    "free": 356_636_545_024,
                },
                "load_average": [0.52, 0.61, 0.58],
                "containers": {"running": 2, "total": 3},
            }
        },
        tags=("system",),
    )
    async def utilization() -> Utilization:
        sample = await trio.to_thread.run_sync(sample_machine, agent.paths.volumes)
        manager = agent.stash.get(CONTAINERS)
        supervisors = [] if manager is None else manager.all()
        return {
            "cpu_percent": cpu_meter.read(sample.cpu),
            "cpu_count": os.cpu_count() or 1,
            "memory": sample.memory,
            "disk": sample.disk,
            "load_average": sample.load_average,
            "containers": {
                "running": sum(1 for s in supervisors if s.state != "offline"),
                "total": len(supervisors),
            },
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
