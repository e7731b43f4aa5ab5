"""Node operations (contract §17) next to raw docker-py, measured in one run.

Parts (each a function taking the agent's client, a docker-py client and the arguments,
returning its printed lines; ``main`` runs every part, or those named with ``--part``):

* ``patch``: ``PATCH /containers/:id`` of ``limits`` on a running server (answered once
  the engine has them) vs a raw ``docker update`` of the same memory on a container of the
  same image; p50 of each and the difference (target: ≤ raw + 20 ms).

Run: ``.venv/bin/python -m bench.node_ops [--part patch] [--runs 200]``. Needs the Docker
engine of ``scripts/docker-engine.sh`` (``DOCKER_HOST``) and its test image. Every
container it makes is removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import docker
import httpx

from bench.containers import IMAGE, agent, timed, wait_until

MiB = 1024 * 1024
LABEL = {"lightd.bench": "node_ops"}
PREFIX = "nodeops-"


def p50(values: list[float]) -> float:
    return statistics.median(values)


def part_patch(
    client: httpx.Client, raw: docker.DockerClient, args: argparse.Namespace
) -> list[str]:
    """PATCH of limits on a running server vs raw ``docker update`` (same memory values)."""
    internal_id = f"{PREFIX}patch"
    volume = client.post("/volumes").json()["volume_id"]
    client.post(
        "/containers",
        json={
            "internal_id": internal_id,
            "image": IMAGE,
            "volume_id": volume,
            "startup_command": "sleep 3600",
            "limits": {"memory": 64 * MiB},
        },
    ).raise_for_status()
    wait_until(client, internal_id, install_state="ready")
    client.post(f"/containers/{internal_id}/start").raise_for_status()
    wait_until(client, internal_id, state="running")
    ours_id = client.get(f"/containers/{internal_id}").json()["container_id"]
    theirs = raw.containers.run(
        IMAGE, ["sleep", "3600"], labels=LABEL, detach=True, mem_limit=64 * MiB
    )
    sizes = [96 * MiB, 112 * MiB]

    def agent_patch(n: int) -> None:
        response = client.patch(
            f"/containers/{internal_id}", json={"limits": {"memory": sizes[n % 2]}}
        )
        response.raise_for_status()
        assert response.json()["applies"] == "now", response.text

    def raw_update(n: int) -> None:
        # What ``docker update --memory`` sends (memory and swap together, as ours does).
        raw.api.update_container(theirs.id, mem_limit=sizes[n % 2], memswap_limit=sizes[n % 2])

    ours: list[float] = []
    base: list[float] = []
    # Alternating blocks: a change in the machine's speed hits both sides alike.
    for block in range(max(1, args.runs // 20)):
        for fn, into in ((agent_patch, ours), (raw_update, base)):
            for n in range(20):
                into.append(timed(lambda fn=fn, i=block * 20 + n: fn(i)))
    applied = raw.api.inspect_container(ours_id)["HostConfig"]["Memory"]
    assert applied == sizes[(len(ours) - 1) % 2], applied
    theirs.remove(force=True)
    client.delete(f"/containers/{internal_id}").raise_for_status()
    ours_p50, base_p50 = p50(ours), p50(base)
    diff = ours_p50 - base_p50
    verdict = "ok" if diff <= 20 else "OVER TARGET"
    return [
        f"PATCH limits on a running server, {len(ours)} samples each (alternating blocks of 20)",
        f"  {'agent PATCH p50':28} {ours_p50:8.2f} ms",
        f"  {'raw docker update p50':28} {base_p50:8.2f} ms",
        f"  {'difference':28} {diff:+8.2f} ms   (target ≤ +20 ms: {verdict})",
        f"  {'agent p90 / raw p90':28} {quantile(ours, 0.9):8.2f} / {quantile(base, 0.9):.2f} ms",
    ]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Part = Callable[[httpx.Client, docker.DockerClient, argparse.Namespace], list[str]]
#: Every part, in the order ``main`` runs them.
PARTS: dict[str, Part] = {"patch": part_patch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="(repeatable)")
    parser.add_argument("--runs", type=int, default=200, help="samples per PATCH figure")
    args = parser.parse_args()
    raw = docker.from_env(max_pool_size=16)
    output: list[str] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp,
            agent(Path(tmp)) as (client, _config),
        ):
            for name in args.part or list(PARTS):
                output += PARTS[name](client, raw, args)
                output.append("")
    finally:
        for c in raw.containers.list(all=True, filters={"label": "lightd.bench=node_ops"}):
            c.remove(force=True)
        for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith(PREFIX):
                c.remove(force=True)
        raw.close()
    print(f"lightd node operations bench; image {IMAGE}\n")
    print("\n".join(output).rstrip())


if __name__ == "__main__":
    main()
