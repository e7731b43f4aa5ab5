"""Stats sources without Docker: cgroup v1 and v2 layouts (fake trees), Docker's stats
JSON, the contract's fields, and the reader's "only when changed" rule."""

from __future__ import annotations

from pathlib import Path

import trio
from lightd.containers.hub import EventHub
from lightd.containers.stats import (
    HOST_MEMORY,
    CgroupV1,
    CgroupV2,
    Sample,
    StatsReader,
    StatsSettings,
    frame_values,
    locate_cgroup,
    sample_of,
)

CID = "c0ffee" * 10 + "abcd"
NET_DEV = (
    "Inter-|   Receive    |  Transmit\n"
    " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets\n"
    "    lo:     500       5    0    0    0     0          0         0      500       5\n"
    "  eth0:    1234       7    0    0    0     0          0         0     4321       3\n"
)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_proc(tmp_path: Path) -> Path:
    proc = tmp_path / "proc"
    write(proc / "4242" / "net" / "dev", NET_DEV)
    return proc


def test_cgroup_v1(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    relative = f"docker/{CID}"
    write(root / "memory" / relative / "memory.usage_in_bytes", "10485760\n")
    write(root / "memory" / relative / "memory.limit_in_bytes", "67108864\n")
    write(root / "memory" / relative / "memory.stat", "cache 5\ntotal_inactive_file 4194304\n")
    write(root / "memory" / relative / "cgroup.procs", "4242\n4243\n")
    write(root / "cpuacct" / relative / "cpuacct.usage", "123456789\n")
    write(
        root / "blkio" / relative / "blkio.throttle.io_service_bytes_recursive",
        "8:0 Read 100\n8:0 Write 200\n8:16 Read 1\n8:0 Total 300\nTotal 301\n",
    )
    source = locate_cgroup(CID, root)
    assert isinstance(source, CgroupV1)
    source.network.proc = fake_proc(tmp_path)
    sample = source.read()
    assert sample is not None
    assert (sample.cpu_ns, sample.memory, sample.memory_limit) == (123456789, 6291456, 67108864)
    assert (sample.network_rx, sample.network_tx) == (1234, 4321)
    assert (sample.block_read, sample.block_write) == (101, 200)
    # Gone (the container stopped): no sample rather than an error.
    (root / "cpuacct" / relative / "cpuacct.usage").unlink()
    assert source.read() is None


def test_cgroup_v2_under_systemd(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    folder = root / "system.slice" / f"docker-{CID}.scope"
    write(folder / "memory.current", "8388608\n")
    write(folder / "memory.max", "max\n")
    write(folder / "memory.stat", "anon 1\ntotal_inactive_file 7\ninactive_file 1048576\n")
    write(folder / "cpu.stat", "usage_usec 2500\nuser_usec 2000\n")
    write(folder / "io.stat", "8:0 rbytes=10 wbytes=20 rios=1 wios=2\n8:16 rbytes=5 wbytes=0\n")
    write(folder / "cgroup.procs", "4242\n")
    source = locate_cgroup(CID, root)
    assert isinstance(source, CgroupV2)
    source.network.proc = fake_proc(tmp_path)
    sample = source.read()
    assert sample is not None
    assert (sample.cpu_ns, sample.memory) == (2_500_000, 7340032)
    assert sample.memory_limit == HOST_MEMORY  # unlimited: the host's memory, as Docker says
    assert (sample.block_read, sample.block_write) == (15, 20)
    assert locate_cgroup("f" * 64, root) is None


def test_docker_stats_json() -> None:
    item = {
        "cpu_stats": {
            "cpu_usage": {"total_usage": 3_000_000_000, "percpu_usage": [1, 2]},
            "system_cpu_usage": 40_000_000_000,
            "online_cpus": 2,
        },
        "memory_stats": {"usage": 5000, "limit": 67108864, "stats": {"total_inactive_file": 1000}},
        "networks": {"eth0": {"rx_bytes": 10, "tx_bytes": 20}, "eth1": {"rx_bytes": 1}},
        "blkio_stats": {
            "io_service_bytes_recursive": [
                {"major": 8, "op": "Read", "value": 7},
                {"major": 8, "op": "Write", "value": 9},
                {"major": 8, "op": "Total", "value": 16},
            ]
        },
    }
    sample = sample_of(item)
    assert sample == Sample(3_000_000_000, 20_000_000_000, 4000, 67108864, 11, 20, 7, 9)
    assert sample_of({"read": "x"}) is None


def test_frame_values_give_cpu_as_percent_of_one_core() -> None:
    before = Sample(0, 0, 1, 2, 3, 4, 5, 6)
    after = Sample(1_500_000_000, 1_000_000_000, 10, 20, 30, 40, 50, 60)
    assert frame_values(before, after) == {
        "cpu_usage": 150.0,
        "memory_usage": 10,
        "memory_limit": 20,
        "network_rx": 30,
        "network_tx": 40,
        "block_read": 50,
        "block_write": 60,
    }


class Owner:
    state = "running"
    started_at: float | None = None


class Scripted:
    """A source that returns prepared samples (then repeats the last)."""

    name = "scripted"

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples
        self.reads = 0

    def read(self) -> Sample | None:
        self.reads += 1
        return self.samples.pop(0) if len(self.samples) > 1 else self.samples[0]


async def test_reader_publishes_only_changes_and_only_to_listeners() -> None:
    def at(t: int, memory: int) -> Sample:
        return Sample(t * 10**8, t * 10**9, memory, 100, 0, 0, 0, 0)

    source = Scripted([at(1, 5), at(2, 5), at(3, 5), at(4, 7), at(5, 7)])
    hub = EventHub()
    owner = Owner()
    reader = StatsReader(
        None,  # type: ignore[arg-type]  # never reaches Docker: the source is given
        hub,
        owner,
        lambda: StatsSettings(interval=0.1),
        locate=lambda _cid: source,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader.run, CID)
        await trio.sleep(0.35)
        assert source.reads == 0  # nobody listens: no reads
        with hub.subscribe() as sub:
            with trio.fail_after(5):
                first = await sub.receive()
                second = await sub.receive()
            await trio.sleep(0.5)
            assert len(sub) == 0  # the values stopped changing: nothing more
        nursery.cancel_scope.cancel()
    assert first["event"] == "stats" and first["cpu_usage"] == 10.0 and first["memory_usage"] == 5
    assert second["memory_usage"] == 7
    assert first["state"] == "running" and first["uptime"] == 0
    assert hub.last_stats == second
