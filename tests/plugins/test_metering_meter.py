"""The metering arithmetic (``lightd.plugins.metering.meter``) with an injected clock: hourly
buckets, deltas of cumulative counters across container restarts, gauges never integrated
over the agent's downtime, and the store/crash hand-over of pending usage."""

from __future__ import annotations

import pytest
from lightd.plugins.metering import EstimateBody, Rates, estimate, usage_event
from lightd.plugins.metering.meter import GIB, HOUR, Cursor, Meter, Usage, hours_of

T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, an hour boundary
SEC = 1_000_000_000


def totals(meter: Meter, internal_id: str = "srv") -> Usage:
    total = Usage()
    for usage in meter.live(internal_id, meter.generation).values():
        total.add(usage)
    return total


def by_hour(meter: Meter, internal_id: str = "srv") -> dict[int, Usage]:
    return dict(sorted(meter.live(internal_id, -1).items()))


def test_hours_of_spreads_an_interval_in_proportion() -> None:
    assert list(hours_of(T0 + 1800, T0 + 5400)) == [(T0, 0.5), (T0 + HOUR, 0.5)]
    assert list(hours_of(T0 + 10, T0 + 20)) == [(T0, 1.0)]
    assert list(hours_of(T0 + 20, T0 + 20)) == [(T0, 1.0)]
    spread = list(hours_of(T0, T0 + 3 * HOUR))
    assert [h for h, _ in spread] == [T0, T0 + HOUR, T0 + 2 * HOUR]
    assert sum(s for _, s in spread) == pytest.approx(1.0)


def test_counters_are_deltas_and_gauges_integrate_over_time() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0, 1 * SEC, 1000, GIB, 2 * GIB, T0 + 10)
    meter.sample("srv", "c1", T0, 4 * SEC, 3000, GIB, 2 * GIB, T0 + 40)
    total = totals(meter)
    assert total.cpu_ns == 4 * SEC  # the run's whole counter: it started at T0
    assert total.egress == 3000
    assert total.memory == GIB * 40  # 1 GiB over the 40 s since the run began
    assert total.disk == 2 * GIB * 40
    assert total.seconds == 40
    assert total.figures["memory_gb_hours"] == round(40 / HOUR, 9)
    assert total.figures["cpu_vcpu_hours"] == round(4 / HOUR, 9)


def test_a_delta_is_spread_over_the_hours_it_covers() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0 + HOUR - 60, 0, 0, 0, None, T0 + HOUR - 60)
    meter.sample("srv", "c1", None, 120 * SEC, 1200, 0, None, T0 + HOUR + 60)
    hours = by_hour(meter)
    assert list(hours) == [T0, T0 + HOUR]
    assert hours[T0].cpu_ns == pytest.approx(60 * SEC)
    assert hours[T0 + HOUR].egress == pytest.approx(600)


def test_a_container_restart_neither_loses_nor_double_counts() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0, 5 * SEC, 500, 0, None, T0 + 30)
    meter.sample("srv", "c1", T0, 9 * SEC, 900, 0, None, T0 + 60)
    # Restarted at T0 + 70: counters from 0 again, here already above the old run's.
    meter.sample("srv", "c1", T0 + 70, 12 * SEC, 1200, 0, None, T0 + 90)
    assert totals(meter).cpu_ns == 9 * SEC + 12 * SEC
    assert totals(meter).egress == 900 + 1200
    # A counter that went down is a new run too (no start time known).
    meter.sample("srv", "c1", None, 2 * SEC, 50, 0, None, T0 + 120)
    assert totals(meter).cpu_ns == 9 * SEC + 12 * SEC + 2 * SEC
    # A new run sampled before its start time is known: spread from the last sample.
    assert set(by_hour(meter)) == {T0}
    meter.sample("srv", "c1", T0 + 70, SEC, 0, 0, None, T0 + 2 * HOUR)
    assert set(by_hour(meter)) == {T0, T0 + HOUR}  # T0 + 120 → T0 + 2 h, not from T0 + 70
    assert totals(meter).cpu_ns == 9 * SEC + 12 * SEC + 2 * SEC + SEC
    meter.forget("srv")
    # A recreated container (another Docker id) also counts from 0.
    meter.sample("srv", "c2", None, 30 * SEC, 2000, 0, None, T0 + 2 * HOUR + 10)
    assert totals(meter).cpu_ns == 9 * SEC + 12 * SEC + 2 * SEC + SEC + 30 * SEC


def test_an_agent_restart_counts_the_downtime_once_and_no_gauge_over_it() -> None:
    first = Meter(since=T0)
    first.sample("srv", "c1", T0, 10 * SEC, 100, GIB, None, T0 + 60)
    generation, usage, cursors = first.take()
    first.stored(generation)
    stored = Usage()
    for value in usage.values():
        stored.add(value)
    # The agent is down from T0 + 60 to T0 + 2 h; the container kept running.
    second = Meter(since=T0 + 2 * HOUR)
    second.load(cursors, generation)
    second.sample("srv", "c1", T0, 70 * SEC, 700, GIB, None, T0 + 2 * HOUR + 30)
    after = totals(second)
    assert stored.cpu_ns + after.cpu_ns == 70 * SEC  # nothing lost, nothing twice
    assert stored.egress + after.egress == 700
    assert after.memory == GIB * 30  # only since the agent is back
    assert after.seconds == 30
    # The counters' delta covers the downtime, spread over its hours.
    assert set(by_hour(second)) == {T0, T0 + HOUR, T0 + 2 * HOUR}


def test_a_crash_before_a_flush_recounts_counters_from_the_stored_cursor() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0, 10 * SEC, 100, 0, None, T0 + 60)
    generation, usage, cursors = meter.take()
    meter.stored(generation)
    meter.sample("srv", "c1", T0, 20 * SEC, 200, 0, None, T0 + 120)  # never stored: crash
    restarted = Meter(since=T0 + 300)
    restarted.load(cursors, generation)
    restarted.sample("srv", "c1", T0, 25 * SEC, 250, 0, None, T0 + 330)
    stored_cpu = sum(u.cpu_ns for u in usage.values())
    assert stored_cpu + totals(restarted).cpu_ns == 25 * SEC


def test_take_failed_and_stored_keep_queries_exact() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0, 10 * SEC, 0, 0, None, T0 + 60)
    generation, _usage, cursors = meter.take()
    assert meter.pending == {} and meter.dirty == set()
    # While it is being stored, a query that read the store before sees it in memory...
    assert totals(meter).cpu_ns == 0  # (totals asks as of the newest generation)
    assert sum(u.cpu_ns for u in meter.live("srv", generation - 1).values()) == 10 * SEC
    meter.failed(generation, cursors)
    assert meter.dirty == {"srv"}
    assert sum(u.cpu_ns for u in meter.pending.values()) == 10 * SEC
    generation, _usage, cursors = meter.take()
    meter.stored(generation)
    assert meter.taken == [] and meter.live("srv", generation) == {}
    assert cursors == {"srv": Cursor("c1", T0 + 60, 10 * SEC, 0)}


def test_forget_drops_the_cursor() -> None:
    meter = Meter(since=T0)
    meter.sample("srv", "c1", T0, SEC, 0, 0, None, T0 + 1)
    meter.forget("srv")
    assert meter.cursors == {} and meter.dirty == set()


def test_estimate_is_the_original_daemons_arithmetic() -> None:
    rates = Rates()
    answer = estimate(rates, EstimateBody(4, 2, 20, 100))
    memory = answer["breakdown"]["memory"]
    assert memory["hourly"] == pytest.approx(0.04)
    assert memory["daily"] == pytest.approx(0.96)
    assert memory["monthly"] == pytest.approx(28.8)
    egress = answer["breakdown"]["egress"]
    assert egress["monthly"] == pytest.approx(5.0)
    assert egress["daily"] == pytest.approx(5.0 / 30)
    assert egress["hourly"] == pytest.approx(5.0 / 30 / 24)
    assert answer["monthly"] == pytest.approx(28.8 + 0.04 * 720 + 20 * 0.0001 * 720 + 5.0)


def test_usage_events_have_a_deterministic_id_per_server_and_hour() -> None:
    usage = Usage(cpu_ns=3600 * SEC, egress=GIB, memory=GIB * HOUR, disk=0, seconds=HOUR)
    event = usage_event("srv", T0, usage)
    assert event == {
        "event": "usage",
        "server": "srv",
        "start": T0,
        "memory_gb_hours": 1.0,
        "cpu_vcpu_hours": 1.0,
        "disk_gb_hours": 0.0,
        "egress_gb": 1.0,
        "event_id": event["event_id"],
    }
    assert usage_event("srv", T0, Usage())["event_id"] == event["event_id"]
    assert usage_event("srv", T0 + HOUR, usage)["event_id"] != event["event_id"]
    assert usage_event("other", T0, usage)["event_id"] != event["event_id"]
