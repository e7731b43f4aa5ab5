"""Boot after an engine restart: the agent's desired-state boot next to raw docker-py.

Prints, in one run, the time from the engine answering again after a restart until all N
servers run:

* the agent (up all along; its reconcile starts what should run, ``boot_concurrency`` at a
  time, ``boot_stagger`` apart) — until ``GET /containers`` shows every one ``running``;
* raw docker-py starting the same N stopped containers from a thread pool of the same
  concurrency — until each ``start`` call returned (target: agent ≤ 1.2 x raw).

The engine restart is real (``scripts/docker-engine.sh --stop`` then start), so this needs
the project's private dockerd (``DOCKER_HOST=unix:///run/lightd-docker/docker.sock``);
with ``--kill-only`` the containers are killed while the agent is down instead (any
engine), and the agent's time runs from its API answering after its restart. Every container it
makes is removed at the end.

Run: ``.venv/bin/python -m bench.boot [--servers 50] [--concurrency 4]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import httpx

from bench.containers import IMAGE, agent, wait_until

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "docker-engine.sh")


def take_servers_down(raw: docker.DockerClient, ids: list[str], *, kill_only: bool) -> float:
    """Restart the engine (or kill the containers); the monotonic time it answers again."""
    if kill_only:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: raw.containers.get(f"lightd-{i}").kill(), ids))
        return time.monotonic()
    subprocess.run(["bash", SCRIPT, "--stop"], check=True, capture_output=True, timeout=120)
    subprocess.run(["bash", SCRIPT], check=True, capture_output=True, timeout=300)
    deadline = time.monotonic() + 60
    while True:
        try:
            raw.ping()
            return time.monotonic()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def all_running(client: httpx.Client, ids: set[str]) -> bool:
    try:
        listed = client.get("/containers").json()["containers"]
    except httpx.TransportError:
        return False
    return {c["internal_id"] for c in listed if c.get("state") == "running"} >= ids


def wait_all_running(client: httpx.Client, ids: list[str], since: float) -> float:
    """Seconds from ``since`` until the agent shows every one of ``ids`` running."""
    while not all_running(client, set(ids)):
        if time.monotonic() > since + 300:
            raise SystemExit("the agent did not start every server within 300 s")
        time.sleep(0.01)
    return time.monotonic() - since


def measure(args: argparse.Namespace, raw: docker.DockerClient) -> tuple[float, float]:
    ids = [f"boot-{n}" for n in range(args.servers)]
    with tempfile.TemporaryDirectory(prefix="lightd-bench-") as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(
            json.dumps(
                {
                    "server": {"host": "127.0.0.1", "port": 0},
                    "authorization": {"token": "lightd_" + "b" * 32},
                    "containers": {"stop_timeout": 2, "boot_concurrency": args.concurrency},
                }
            )
        )
        with agent(Path(tmp)) as (client, _):
            for internal_id in ids:
                volume = client.post("/volumes").json()["volume_id"]
                body: dict[str, Any] = {
                    "internal_id": internal_id,
                    "image": IMAGE,
                    "volume_id": volume,
                    "startup_command": "sleep 3600",
                }
                client.post("/containers", json=body).raise_for_status()
            for internal_id in ids:
                wait_until(client, internal_id, install_state="ready")
                client.post(f"/containers/{internal_id}/start").raise_for_status()
            for internal_id in ids:
                wait_until(client, internal_id, state="running")
            if not args.kill_only:  # the agent stays up through the engine's restart
                up = take_servers_down(raw, ids, kill_only=False)
                agent_s = wait_all_running(client, ids, up)
        if args.kill_only:  # killed while the agent is down: it boots them when it starts
            take_servers_down(raw, ids, kill_only=True)
            with agent(Path(tmp)) as (client, _):
                agent_s = wait_all_running(client, ids, time.monotonic())

        # The agent is down now (its servers run on): the same boot with docker-py.
        up = take_servers_down(raw, ids, kill_only=args.kill_only)
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda i: raw.containers.get(f"lightd-{i}").start(), ids))
        raw_s = time.monotonic() - up

        with agent(Path(tmp)) as (client, _):
            for internal_id in ids:
                client.delete(f"/containers/{internal_id}")
    return agent_s, raw_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--kill-only", action="store_true", help="kill the containers, do not restart the engine"
    )
    args = parser.parse_args()
    raw = docker.from_env(max_pool_size=64, timeout=120)
    try:
        agent_s, raw_s = measure(args, raw)
    finally:
        for c in raw.containers.list(all=True, filters={"label": "lightd.managed=true"}):
            if c.labels.get("lightd.internal_id", "").startswith("boot-"):
                c.remove(force=True)
        raw.close()
    how = "killed" if args.kill_only else "engine restarted"
    print(f"lightd boot bench: {args.servers} servers, concurrency {args.concurrency}, {how}\n")
    print(f"{'figure':40} {'agent':>8} {'raw':>8} {'ratio':>7}")
    since = "API answers" if args.kill_only else "engine answers"
    print(
        f"{since + ' → all running':40} {agent_s:7.2f}s {raw_s:7.2f}s"
        f" {agent_s / raw_s:6.2f}×   (target ≤ 1.2×)"
    )


if __name__ == "__main__":
    main()
