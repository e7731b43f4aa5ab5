"""``GET /system/utilization`` (contract §17): the machine's load, read from ``/proc``."""

from __future__ import annotations

from pathlib import Path

import httpx
from lightd.api.system import CpuMeter, CpuTimes, read_cpu_times, read_memory

from .conftest import RunningAgent, api_client


async def test_utilization_shape_and_ranges(client: httpx.AsyncClient) -> None:
    for _ in range(2):  # the first call measures since boot, the second since the first
        response = await client.get("/system/utilization")
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {
            "cpu_percent",
            "cpu_count",
            "memory",
            "disk",
            "load_average",
            "containers",
        }
        # cpu_percent is the whole machine's busy share: 0-100, not 100 per CPU.
        assert isinstance(body["cpu_percent"], int | float)
        assert 0 <= body["cpu_percent"] <= 100
        assert isinstance(body["cpu_count"], int) and body["cpu_count"] >= 1
        memory = body["memory"]
        assert set(memory) == {"total", "used"}
        assert all(isinstance(v, int) for v in memory.values())
        assert 0 < memory["used"] <= memory["total"]
        disk = body["disk"]
        assert set(disk) == {"total", "used", "free"}
        assert all(isinstance(v, int) for v in disk.values())
        assert disk["total"] > 0 and disk["used"] >= 0 and disk["free"] >= 0
        assert disk["used"] + disk["free"] <= disk["total"]
        load = body["load_average"]
        assert len(load) == 3 and all(isinstance(v, int | float) and v >= 0 for v in load)
        assert body["containers"] == {"running": 0, "total": 0}


async def test_utilization_needs_read_and_the_vendor_header(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    minted = await client.post("/auth/tokens", json={"ttl": "5m", "permissions": ["read"]})
    assert minted.status_code == 200, minted.text
    token = minted.json()["token"]
    async with api_client(running.url, token=token) as reader:
        assert (await reader.get("/system/utilization")).status_code == 200
    async with api_client(running.url, token=token, Accept="application/json") as plain:
        assert (await plain.get("/system/utilization")).status_code == 403
    minted = await client.post("/auth/tokens", json={"ttl": "5m", "permissions": ["console"]})
    async with api_client(running.url, token=minted.json()["token"]) as console_only:
        assert (await console_only.get("/system/utilization")).status_code == 403
    async with api_client(running.url, token=None) as nobody:
        assert (await nobody.get("/system/utilization")).status_code == 401


def test_cpu_meter_measures_between_readings() -> None:
    meter = CpuMeter()
    assert meter.read(CpuTimes(busy=100, total=400)) == 25.0  # since boot
    assert meter.read(CpuTimes(busy=190, total=500)) == 90.0  # 90 of the last 100 jiffies
    assert meter.read(CpuTimes(busy=190, total=500)) == 90.0  # no jiffy: same answer
    assert meter.read(CpuTimes(busy=190, total=600)) == 0.0


def test_proc_parsers(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  10 2 8 70 5 1 1 3 4 0\ncpu0 10 2 8 70 5 1 1 3 4 0\nintr 1\n", encoding="ascii"
    )
    # idle + iowait = 75 of 100 (guest time is already inside user and not counted twice)
    assert read_cpu_times(stat) == CpuTimes(busy=25, total=100)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    600 kB\n",
        encoding="ascii",
    )
    assert read_memory(meminfo) == {"total": 1_024_000, "used": 409_600}
    real = read_cpu_times()
    assert 0 <= real.busy <= real.total
