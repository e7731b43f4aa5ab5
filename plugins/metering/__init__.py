"""Built-in plugin ``metering``: what each server really consumed, hour by hour (contract §22).

Fed by the container's one stats reader (hook ``lightd_stats_sample``: no Docker call of
its own): every sample while a client follows the stats, one every
``stats.idle_interval`` (30 s) otherwise, every second while a server stops. ``meter.Meter``
turns samples into usage — CPU time and bytes sent as deltas of the cgroup's cumulative
counters (a restart of the container starts a new run counted from 0, so nothing is lost
or counted twice), memory and the volume's disk usage (the disk service's cached figure)
as gauges integrated over time — spread over hourly buckets.

A service (``metering``) stores the buckets and each server's last counters (its cursor)
in one transaction every ``metering.flush_interval`` (60 s) and at shutdown; after a
restart, or a crash, counters are taken from the stored cursor, so the agent's downtime
loses at most the gauges of that time and counts nothing twice. Buckets older than
``metering.retention_days`` (35) are purged hourly. With ``metering.report``, each closed
hour of each server goes to the panel once through the outbox (hook
``lightd_panel_update``) as ``{"event":"usage","server","start","memory_gb_hours",
"cpu_vcpu_hours","disk_gb_hours","egress_gb"}`` with an ``event_id`` derived from the
server and the hour, ``metering.report_delay`` (300 s) after the hour ends. A second
service (``metering-disk``) keeps the disk figures of metered volumes fresh.

Hooks: ``lightd_add_config_sections`` (``metering``), ``lightd_add_migrations``
(namespace ``metering``), ``lightd_configure``, ``lightd_add_services``,
``lightd_add_routes``, ``lightd_stats_sample``, ``lightd_container_deleted`` (the cursor
goes; the usage stays until the retention ends), ``lightd_shutdown`` (a last flush).

Routes: ``GET /containers/:id/usage?from=&to=&step=hour|day``, ``GET /billing/rates``,
``POST /billing/estimate``, ``GET /billing/usage/:internal_id/hourly|daily|monthly``;
[alias] the original daemon's ``POST /billing/estimate/volume`` and
``GET /billing/containers``.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import uuid
from collections.abc import Awaitable
from typing import Any, Literal, TypedDict

import attrs
import trio
from lightd import (
    CONTAINER_SERVICE,
    DISK,
    Agent,
    AgentError,
    BadRequest,
    Migration,
    NotFound,
    Service,
    StashKey,
    StatsSample,
    StoreError,
    field_check,
    hookimpl,
)
from lightd.api import describe, read_json, requires
from quart import Blueprint, request

from .meter import HOUR, Meter, Usage
from .store import MIGRATIONS, MeteringStore

__all__ = ["METERING", "Metering", "MeteringConfig", "Rates", "estimate", "usage_event"]

log = logging.getLogger(__name__)

DAY = 24 * HOUR
#: ``event_id``s of usage events: uuid5 of ``<internal_id>:<hour>`` in this namespace.
EVENT_NAMESPACE = uuid.UUID("6b1f4a52-8c0e-4d3a-9a57-2f7d1c9e0b31")
#: Hours of ``GET /billing/usage/:id/<period>``.
PERIODS = {"hourly": 1, "daily": 24, "monthly": 720}
#: Hours reported per store read.
REPORT_BATCH = 200

_non_negative = field_check(lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0")


@attrs.frozen
class Rates:
    """Prices (any currency) of ``metering.rates``; the original daemon's defaults."""

    memory_per_gb_hour: float = attrs.field(default=0.01, validator=_non_negative)
    cpu_per_vcpu_hour: float = attrs.field(default=0.02, validator=_non_negative)
    storage_per_gb_hour: float = attrs.field(default=0.0001, validator=_non_negative)
    egress_per_gb: float = attrs.field(default=0.05, validator=_non_negative)


@attrs.frozen
class MeteringConfig:
    """Config section ``metering``."""

    #: Days hourly buckets are kept.
    retention_days: int = attrs.field(
        default=35, validator=field_check(lambda v: 1 <= v <= 3650, "must be 1 to 3650")
    )
    #: Send each closed hour of each server to the panel (outbox, ``usage`` events).
    report: bool = False
    #: Seconds after an hour ends before it is reported (late samples come in).
    report_delay: float = attrs.field(
        default=300.0, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    #: Seconds between two stores of the usage (what a crash can lose of the gauges).
    flush_interval: float = attrs.field(
        default=60.0, validator=field_check(lambda v: v >= 0.1, "must be >= 0.1")
    )
    #: Seconds between two refreshes of the disk figures of metered volumes.
    disk_interval: float = attrs.field(
        default=300.0, validator=field_check(lambda v: v >= 1, "must be >= 1")
    )
    rates: Rates = attrs.field(factory=Rates)


# --- the wire ------------------------------------------------------------------------------


class Figures(TypedDict):
    memory_gb_hours: float
    cpu_vcpu_hours: float
    disk_gb_hours: float
    egress_gb: float


class Bucket(TypedDict):
    start: int
    memory_gb_hours: float
    cpu_vcpu_hours: float
    disk_gb_hours: float
    egress_gb: float


#: ``GET /containers/:id/usage``: buckets with usage (hours or UTC days), oldest first,
#: starting in ``[from, to)`` (the range asked, aligned to the step). A functional
#: TypedDict: ``from`` is a Python keyword.
UsageAnswer = TypedDict(
    "UsageAnswer",
    {"internal_id": str, "from": int, "to": int, "buckets": list[Bucket], "total": Figures},
)

#: The query of ``GET /containers/:id/usage``: unix seconds (default: the last 24 hours).
UsageQuery = TypedDict(
    "UsageQuery", {"from": int, "to": int, "step": Literal["hour", "day"]}, total=False
)


class RatesView(TypedDict):
    memory_per_gb_hour: float
    cpu_per_vcpu_hour: float
    storage_per_gb_hour: float
    egress_per_gb: float


class Cost(TypedDict):
    hourly: float
    daily: float
    monthly: float


class Breakdown(TypedDict):
    memory: Cost
    cpu: Cost
    storage: Cost
    egress: Cost


class Estimate(TypedDict):
    """The original daemon's estimate: totals and per resource."""

    hourly: float
    daily: float
    monthly: float
    breakdown: Breakdown


class BillingUsage(TypedDict):
    """Usage over the last 1/24/720 hours: averages over the window (``duration_hours``),
    egress the total; ``estimated_cost`` at ``metering.rates``."""

    internal_id: str
    memory_gb: float
    cpu_vcpus: float
    storage_gb: float
    egress_gb: float
    duration_hours: float
    estimated_cost: float


@attrs.frozen
class EstimateBody:
    memory_gb: float = attrs.field(validator=_non_negative)
    cpu_vcpus: float = attrs.field(validator=_non_negative)
    storage_gb: float = attrs.field(validator=_non_negative)
    egress_gb_per_month: float = attrs.field(validator=_non_negative)


@attrs.frozen
class VolumeEstimateBody:
    size_gb: float = attrs.field(validator=_non_negative)


def _resource(quantity: float, rate: float) -> Cost:
    hourly = quantity * rate
    return {"hourly": hourly, "daily": hourly * 24, "monthly": hourly * 24 * 30}


def estimate(rates: Rates, body: EstimateBody) -> Estimate:
    """The original daemon's arithmetic: a resource costs ``quantity * rate`` an hour, 24
    hours a day, 30 days a month; egress ``GB a month * rate`` a month."""
    monthly_egress = body.egress_gb_per_month * rates.egress_per_gb
    breakdown: Breakdown = {
        "memory": _resource(body.memory_gb, rates.memory_per_gb_hour),
        "cpu": _resource(body.cpu_vcpus, rates.cpu_per_vcpu_hour),
        "storage": _resource(body.storage_gb, rates.storage_per_gb_hour),
        "egress": {
            "hourly": monthly_egress / 30 / 24,
            "daily": monthly_egress / 30,
            "monthly": monthly_egress,
        },
    }
    parts = (breakdown["memory"], breakdown["cpu"], breakdown["storage"], breakdown["egress"])
    return {
        "hourly": sum(p["hourly"] for p in parts),
        "daily": sum(p["daily"] for p in parts),
        "monthly": sum(p["monthly"] for p in parts),
        "breakdown": breakdown,
    }


def usage_event(internal_id: str, hour: int, usage: Usage) -> dict[str, Any]:
    """The panel update of one closed hour of one server, with its deterministic id."""
    return {
        "event": "usage",
        "server": internal_id,
        "start": hour,
        **usage.figures,
        "event_id": str(uuid.uuid5(EVENT_NAMESPACE, f"{internal_id}:{hour}")),
    }


def _figures(usage: Usage) -> Figures:
    f = usage.figures
    return {
        "memory_gb_hours": f["memory_gb_hours"],
        "cpu_vcpu_hours": f["cpu_vcpu_hours"],
        "disk_gb_hours": f["disk_gb_hours"],
        "egress_gb": f["egress_gb"],
    }


def _bucket(start: int, usage: Usage) -> Bucket:
    return {"start": start, **_figures(usage)}


def cost(rates: Rates, usage: Usage) -> float:
    figures = usage.figures
    return (
        figures["memory_gb_hours"] * rates.memory_per_gb_hour
        + figures["cpu_vcpu_hours"] * rates.cpu_per_vcpu_hour
        + figures["disk_gb_hours"] * rates.storage_per_gb_hour
        + figures["egress_gb"] * rates.egress_per_gb
    )


# --- the service ---------------------------------------------------------------------------


class Metering:
    """The meter, its store, and the loops that flush, purge and report."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.meter = Meter(since=agent.clock())
        self.db = MeteringStore(agent.store)
        #: internal_id → volume_id of the servers sampled (disk figures to keep fresh).
        self.volumes: dict[str, str] = {}
        #: Samples count once the stored cursors are loaded.
        self.loaded = False
        #: Hours sent to the panel since start, and rounds of the service (tests).
        self.reported = 0
        self.rounds = 0

    @property
    def config(self) -> MeteringConfig:
        return self.agent.config.section(MeteringConfig)

    def sample(
        self,
        internal_id: str,
        container_id: str,
        volume_id: str,
        started_at: float | None,
        sample: StatsSample,
    ) -> None:
        if not self.loaded:
            return  # the next sample counts from the stored cursor
        disk = self.agent.stash.get(DISK)
        self.volumes[internal_id] = volume_id
        self.meter.sample(
            internal_id,
            container_id,
            started_at,
            sample.cpu_ns,
            sample.network_tx,
            sample.memory,
            None if disk is None else disk.cached_bytes(volume_id),
            self.agent.clock(),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cursors, generation = await self.db.load()
        self.meter.load(cursors, generation)
        self.meter.since = self.agent.clock()
        self.loaded = True
        task_status.started()
        purged_at = -math.inf
        while True:
            await trio.sleep(self.config.flush_interval)
            await self.flush()
            now = self.agent.clock()
            if now - purged_at >= HOUR:
                purged_at = now
                await self.purge(now)
            if self.config.report:
                await self.report(now)
            self.rounds += 1

    async def flush(self) -> None:
        """Store the pending usage and the changed cursors, in one transaction."""
        meter = self.meter
        if not meter.pending and not meter.dirty:
            return
        generation, usage, cursors = meter.take()
        try:
            await self.db.flush(generation, usage, cursors)
        except (sqlite3.Error, StoreError) as exc:
            meter.failed(generation, cursors)
            log.error("metering: could not store usage (kept for the next try): %s", exc)
            return
        meter.stored(generation)

    async def purge(self, now: float) -> None:
        before = int(now // HOUR) * HOUR - self.config.retention_days * DAY
        try:
            if purged := await self.db.purge(before):
                log.info("metering: purged %d hours older than the retention", purged)
        except (sqlite3.Error, StoreError) as exc:
            log.error("metering: could not purge old usage: %s", exc)

    async def report(self, now: float) -> None:
        """Queue every closed, unreported hour for the panel, once."""
        delay = self.config.report_delay
        if now < self.meter.since + delay:
            return  # after a restart, let the first samples come in first
        before = int(now - delay)
        while True:
            rows = await self.db.unreported(before, REPORT_BATCH)
            for internal_id, hour, usage in rows:
                update = usage_event(internal_id, hour, usage)
                await self.agent.hooks.panel_update(self.agent, internal_id, update)
            if rows:
                await self.db.mark_reported([(i, h) for i, h, _ in rows])
                self.reported += len(rows)
            if len(rows) < REPORT_BATCH:
                return

    async def serve_disk(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Ask the disk service for the usage of metered volumes now and then: it
        measures a volume never measured, and measures a stale figure again."""
        task_status.started()
        while True:
            disk = self.agent.stash.get(DISK)
            for volume_id in sorted(set(self.volumes.values())):
                if disk is None:
                    break
                try:
                    await disk.usage(volume_id)
                except AgentError as exc:  # the volume went meanwhile
                    log.debug("metering: no disk usage of %s: %s", volume_id, exc)
            self.volumes.clear()  # the servers still running sample again meanwhile
            await trio.sleep(self.config.disk_interval)

    async def usage(self, internal_id: str, lo: int, hi: int) -> dict[int, Usage]:
        """Hour → usage of ``internal_id`` for the hours in ``[lo, hi)``, stored or not."""
        rows, generation = await self.db.hours(internal_id, lo, hi)
        found = {hour: usage for _, hour, usage in rows}
        for hour, usage in self.meter.live(internal_id, generation).items():
            if lo <= hour < hi:
                found.setdefault(hour, Usage()).add(usage)
        return dict(sorted(found.items()))

    async def forget(self, internal_id: str) -> None:
        self.meter.forget(internal_id)
        self.volumes.pop(internal_id, None)
        try:
            await self.db.forget(internal_id)
        except (sqlite3.Error, StoreError) as exc:
            log.error("metering: could not forget the cursor of %s: %s", internal_id, exc)


METERING: StashKey[Metering] = StashKey("metering")


# --- hooks ---------------------------------------------------------------------------------


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"metering": MeteringConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[METERING] = Metering(agent)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    metering = agent.stash[METERING]
    return [Service("metering", metering.serve), Service("metering-disk", metering.serve_disk)]


@hookimpl
def lightd_stats_sample(
    agent: Agent,
    internal_id: str,
    container_id: str,
    volume_id: str,
    started_at: float | None,
    sample: StatsSample,
) -> None:
    metering = agent.stash.get(METERING)
    if metering is not None:
        metering.sample(internal_id, container_id, volume_id, started_at, sample)


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[None] | None:
    metering = agent.stash.get(METERING)
    return None if metering is None else metering.forget(internal_id)


@hookimpl
def lightd_shutdown(agent: Agent) -> Awaitable[None] | None:
    metering = agent.stash.get(METERING)
    return None if metering is None or not metering.loaded else metering.flush()


def _unix(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 12:
        raise BadRequest(f"{name}: must be a unix time in seconds", code="invalid_field")
    return int(raw)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    metering = agent.stash[METERING]
    bp = Blueprint("metering", __name__)

    def container_exists(internal_id: str) -> bool:
        containers = agent.stash.get(CONTAINER_SERVICE)
        if containers is None:
            return False
        try:
            containers.install_log(internal_id)  # NotFound for an unknown container
        except NotFound:
            return False
        return True

    async def known(internal_id: str) -> bool:
        return container_exists(internal_id) or await metering.db.known(internal_id)

    def rates() -> Rates:
        return metering.config.rates

    @bp.get("/containers/<internal_id>/usage")
    @describe(
        "Show a container's metered usage",
        description="Hourly (`step=hour`, the default) or daily (`step=day`, UTC days) "
        "buckets of what the server consumed (contract §22): memory in GB-hours, CPU in "
        "vCPU-hours, its volume's disk in GB-hours, network egress in GB (GB = 2^30 "
        "bytes). `from` and `to` are unix seconds (default: the last 24 hours), aligned "
        "to the step; only buckets with usage are listed, the current one included. "
        "Usage of a deleted server stays until `metering.retention_days`.",
        query=UsageQuery,
        examples={
            200: {
                "internal_id": "srv-1",
                "from": 1767222000,
                "to": 1767229200,
                "buckets": [
                    {
                        "start": 1767222000,
                        "memory_gb_hours": 0.5,
                        "cpu_vcpu_hours": 0.12,
                        "disk_gb_hours": 2.0,
                        "egress_gb": 0.01,
                    }
                ],
                "total": {
                    "memory_gb_hours": 0.5,
                    "cpu_vcpu_hours": 0.12,
                    "disk_gb_hours": 2.0,
                    "egress_gb": 0.01,
                },
            }
        },
        tags=("metering",),
    )
    async def container_usage(internal_id: str) -> UsageAnswer:
        now = int(agent.clock())
        to = _unix("to", now)
        start = _unix("from", max(to - DAY, 0))
        step_name = request.args.get("step", "hour")
        if step_name not in ("hour", "day"):
            raise BadRequest("step: must be hour or day", code="invalid_field")
        if start > to:
            raise BadRequest("from: must not be after to", code="invalid_field")
        step = HOUR if step_name == "hour" else DAY
        lo = start // step * step
        hi = -(-to // step) * step
        if hi == lo:
            hi += step
        if not await known(internal_id):
            raise NotFound("Container not found", code="container_not_found")
        buckets: dict[int, Usage] = {}
        total = Usage()
        for hour, usage in (await metering.usage(internal_id, lo, hi)).items():
            buckets.setdefault(hour // step * step, Usage()).add(usage)
            total.add(usage)
        return {
            "internal_id": internal_id,
            "from": lo,
            "to": hi,
            "buckets": [_bucket(s, u) for s, u in buckets.items()],
            "total": _figures(total),
        }

    @bp.get("/billing/rates")
    @describe(
        "Show the billing rates",
        description="`metering.rates`: prices per GB-hour of memory, vCPU-hour, GB-hour "
        "of storage and GB of egress.",
        tags=("metering",),
    )
    async def billing_rates() -> RatesView:
        r = rates()
        return {
            "memory_per_gb_hour": r.memory_per_gb_hour,
            "cpu_per_vcpu_hour": r.cpu_per_vcpu_hour,
            "storage_per_gb_hour": r.storage_per_gb_hour,
            "egress_per_gb": r.egress_per_gb,
        }

    @bp.post("/billing/estimate")
    @requires("read")
    @describe(
        "Estimate a price",
        description="What a server of this size costs at `metering.rates` (the original "
        "daemon's arithmetic): a resource `quantity × rate` an hour, × 24 a day, × 30 a "
        "month; egress `egress_gb_per_month × rate` a month. Computes only: a token with "
        "`read` may ask.",
        body=EstimateBody,
        examples={
            "body": {"memory_gb": 4, "cpu_vcpus": 2, "storage_gb": 20, "egress_gb_per_month": 100}
        },
        tags=("metering",),
    )
    async def billing_estimate() -> Estimate:
        return estimate(rates(), await read_json(EstimateBody))

    @bp.post("/billing/estimate/volume")
    @requires("read")
    @describe(
        "Estimate a volume's price [alias]",
        description="The original daemon's storage-only estimate: `POST /billing/estimate` "
        "with only `storage_gb` = `size_gb`.",
        body=VolumeEstimateBody,
        examples={"body": {"size_gb": 20}},
        tags=("metering",),
    )
    async def billing_estimate_volume() -> Estimate:
        body = await read_json(VolumeEstimateBody)
        return estimate(rates(), EstimateBody(0.0, 0.0, body.size_gb, 0.0))

    @bp.get("/billing/containers")
    @describe(
        "List the metered servers [alias]",
        description="The `internal_id`s with usage kept (the original daemon listed Docker ids).",
        tags=("metering",),
    )
    async def billing_containers() -> list[str]:
        return await metering.db.servers()

    async def period_usage(internal_id: str, period: str) -> BillingUsage:
        hours = PERIODS[period]
        if not await known(internal_id):
            raise NotFound("No usage data for container", code="no_usage_data")
        current = int(agent.clock()) // HOUR * HOUR
        total = Usage()
        for usage in (
            await metering.usage(internal_id, current - (hours - 1) * HOUR, current + HOUR)
        ).values():
            total.add(usage)
        figures = total.figures
        return {
            "internal_id": internal_id,
            "memory_gb": figures["memory_gb_hours"] / hours,
            "cpu_vcpus": figures["cpu_vcpu_hours"] / hours,
            "storage_gb": figures["disk_gb_hours"] / hours,
            "egress_gb": figures["egress_gb"],
            "duration_hours": float(hours),
            "estimated_cost": cost(rates(), total),
        }

    def period_route(period: str) -> None:
        hours = PERIODS[period]

        async def view(internal_id: str) -> BillingUsage:
            return await period_usage(internal_id, period)

        view.__name__ = f"billing_usage_{period}"
        described = describe(
            f"Show a server's usage over the last {hours} hour{'s' if hours > 1 else ''}",
            description=f"Over the {hours} hour bucket{'s' if hours > 1 else ''} up to "
            "the current one: memory, CPU and storage as averages over the window "
            "(`duration_hours`), egress as the total, and `estimated_cost` at "
            "`metering.rates` (contract §22; the original daemon's shape, keyed by "
            "`internal_id`). A server never metered and unknown: `404 No usage data for "
            "container`.",
            tags=("metering",),
        )(view)
        bp.get(f"/billing/usage/<internal_id>/{period}")(described)

    for period in PERIODS:
        period_route(period)

    return [bp]
