"""Usage metering's overhead: ``bench.websocket``'s scale figure with metering on vs off.

``--containers`` (100) running containers (``bench.websocket``'s ticking command), made
once; then the agent runs on the same storage alternately with the ``metering`` plugin
disabled (the baseline) and enabled, ``--runs`` (2) times each, adopting the running
containers at each start. In each run, after the adoption settles:

1. one WebSocket client per container, stats flowing (``bench.websocket``'s figure): the
   agent's CPU % of one core over ``--window`` seconds (target: on/off ≤ 1.1);
2. no client at all: the agent's CPU % over ``--idle-window`` seconds. With metering off
   no stats reader reads then; with it on, each reads one sample every
   ``stats.idle_interval`` (30 s) and the service stores the usage every
   ``metering.flush_interval`` (60 s): the cost of metering servers nobody watches.

Prints the medians and the ratios. Run: ``.venv/bin/python -m bench.metering
[--containers 100] [--runs 2] [--window 20] [--idle-window 20]``. Needs the engine of
``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image; every container it
makes is removed at the end. On a 2-core machine shared with other work the figures are
noisy: the runs alternate off/on so drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import docker
import trio

from bench.websocket import (
    PREFIX,
    AgentProcess,
    api,
    running_container,
    sweep,
    wait_until,
)
from bench.websocket import (
    agent_process as websocket_agent,
)

COMMAND = "while :; do echo tick; sleep 1; done"


def agent_process(folder: Path, *, metering: bool) -> AbstractAsyncContextManager[AgentProcess]:
    """The agent as its own process on ``folder``'s storage, metering on or off."""
    return websocket_agent(
        folder,
        {},
        extra={"plugins": {"disabled": [] if metering else ["metering"]}},
        log_name=f"agent-{'on' if metering else 'off'}.log",
    )


async def measure(
    args: argparse.Namespace, agent: AgentProcess, ids: list[str]
) -> tuple[float, float]:
    """(CPU % with one client per container, CPU % with none)."""
    async with api(agent) as client:
        for internal_id in ids:  # adopted: running again
            await wait_until(client, internal_id, state="running")
    await trio.sleep(args.settle)

    async def watch(internal_id: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with agent.ws(internal_id) as ws:
            task_status.started()
            while True:
                await ws.get_message()

    async with trio.open_nursery() as nursery:
        for internal_id in ids:
            await nursery.start(watch, internal_id)
        await trio.sleep(3)
        cpu, wall = agent.cpu(), time.perf_counter()
        await trio.sleep(args.window)
        watched = (agent.cpu() - cpu) / (time.perf_counter() - wall) * 100
        nursery.cancel_scope.cancel()
    await trio.sleep(2)
    cpu, wall = agent.cpu(), time.perf_counter()
    await trio.sleep(args.idle_window)
    idle = (agent.cpu() - cpu) / (time.perf_counter() - wall) * 100
    return watched, idle


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raw = docker.from_env()
    figures: dict[str, dict[str, list[float]]] = {
        "off": {"watched": [], "idle": []},
        "on": {"watched": [], "idle": []},
    }
    ids = [f"{PREFIX}-m{n}" for n in range(args.containers)]
    try:
        with tempfile.TemporaryDirectory(prefix="meterbench-") as tmp:
            folder = Path(tmp)
            async with agent_process(folder, metering=False) as agent, api(agent) as client:
                volume = (await client.post("/volumes")).json()["volume_id"]
                limiter = trio.CapacityLimiter(10)
                started = time.perf_counter()

                async def make(internal_id: str) -> None:
                    async with limiter:
                        await running_container(client, internal_id, volume, COMMAND)

                async with trio.open_nursery() as nursery:
                    for internal_id in ids:
                        nursery.start_soon(make, internal_id)
                print(
                    f"{len(ids)} containers running after {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
            for run in range(args.runs):
                for mode in ("off", "on"):
                    async with agent_process(folder, metering=mode == "on") as agent:
                        watched, idle = await measure(args, agent, ids)
                        if mode == "on":
                            async with api(agent) as client:
                                usage = (await client.get(f"/containers/{ids[0]}/usage")).json()
                            assert usage["buckets"], f"metering saw nothing: {usage}"
                    figures[mode]["watched"].append(watched)
                    figures[mode]["idle"].append(idle)
                    print(
                        f"  run {run + 1} metering {mode:3}: agent CPU {watched:5.1f} % of one "
                        f"core with {len(ids)} clients, {idle:5.2f} % with none",
                        flush=True,
                    )
            async with (
                agent_process(folder, metering=False) as agent,
                api(agent) as client,
                trio.open_nursery() as nursery,
            ):
                for internal_id in ids:
                    nursery.start_soon(client.delete, f"/containers/{internal_id}")
    finally:
        await trio.to_thread.run_sync(sweep, raw)
        raw.close()
    off_w, on_w = (statistics.median(figures[m]["watched"]) for m in ("off", "on"))
    off_i, on_i = (statistics.median(figures[m]["idle"]) for m in ("off", "on"))
    print(f"\n{len(ids)} containers, medians of {args.runs} runs each")
    print(
        f"  clients following stats: agent CPU {on_w:.1f} % on vs {off_w:.1f} % off: "
        f"ratio {on_w / off_w:.3f} (target ≤ 1.1)"
    )
    print(
        f"  nobody following: agent CPU {on_i:.2f} % on vs {off_i:.2f} % off "
        f"(+{on_i - off_i:.2f} % of one core for metering idle servers)"
    )
    return {"containers": len(ids), "figures": figures, "ratio_watched": on_w / off_w}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--containers", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--window", type=float, default=20.0, help="seconds, with clients")
    parser.add_argument("--idle-window", type=float, default=20.0, help="seconds, no client")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after adoption")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    result = trio.run(main, arguments)
    if arguments.json:
        print(json.dumps(result, indent=2))
    sys.exit(0)
