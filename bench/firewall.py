"""The firewall plugin in a namespace network: how fast a rule takes effect, and what
1 000 rules on one server cost a client's connection setup.

The network is the tests' (``tests/plugins/netns.py``): a client, a host doing Docker's
DNAT and ``FORWARD -j DOCKER-USER``, a server listening on the published port's target.
The agent is built by ``open_agent`` with ``firewall.enabled`` and its iptables calls run
in the host namespace; the server "container" is a stand-in ``ContainerService`` that
publishes ``HOST_IP:25565`` (no Docker engine needed). For each iptables variant:

  * **add → effective**: ``Firewall.add_rule`` of a ``reject`` for the client (what
    ``POST /firewall/rules`` runs after validation: store commit, one
    ``iptables-restore``), then the client's next connection is refused; the rule is
    deleted and the connection accepted again before the next round. Median and p95 of
    add-to-refused, and of delete-to-connected.
  * **setup time**: median TCP connect time of a plain blocking client (a thread in the
    client namespace), with no rules, then with 1 000 rules on the server (sources that
    never match: drop, reject, accept with a rate limit, and a few CIDRs) as the agent
    renders them (a tree of chains), and as a flat list for comparison. Target: tree /
    none <= 1.2.

Run as root::

    .venv/bin/python -m bench.firewall [--variants iptables,iptables-legacy] [--connects 3000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import trio
from lightd import CONTAINER_SERVICE, NotFound, PoolPort
from lightd.config import new_token
from lightd.plugins.firewall import FIREWALL, Firewall, Rule
from lightd.plugins.firewall import ruleset as ruleset_module
from lightd.plugins.firewall.model import RateLimit
from lightd.plugins.firewall.state import new_rule_id
from lightd.runtime import open_agent

from tests.plugins import netns
from tests.plugins.netns import CLIENT_IP, HOST_IP, Network, connect

TARGET_RATIO = 1.2
SERVER = "bench-server"
PORT = 25565
CONTAINER_PORT = 30000


class Containers:
    """A stand-in for the containers core: one server, publishing ``HOST_IP:PORT``."""

    def published_ports(self, internal_id: str) -> list[PoolPort]:
        if internal_id != SERVER:
            raise NotFound("Container not found")
        return [PoolPort(HOST_IP, PORT, "tcp")]


def write_config(folder: Path, net: Network) -> Path:
    path = folder / "config.json"
    config = {
        "server": {"host": "127.0.0.1", "port": 0},
        "authorization": {"enabled": True, "token": new_token()},
        "storage": {
            "base_path": "./storage",
            "containers_path": "./storage/containers",
            "volumes_path": "./storage/volumes",
        },
        "firewall": {"enabled": True, "command_prefix": net.prefix},
    }
    path.write_text(json.dumps(config))
    return path


def thousand_rules() -> list[Rule]:
    """1 000 rules none of which matches the client (10.77.1.2)."""
    rules = []
    for n in range(1000):
        if n % 100 == 99:
            source = f"{(n // 100) + 100}.0.0.0/8"
        else:
            source = str(ipaddress.IPv4Address(0xC6120000 + n * 37))  # 198.18.x.y
        action = ("drop", "reject", "accept")[n % 3]
        rate = RateLimit(50, 10) if action == "accept" else None
        rules.append(
            Rule(new_rule_id(), SERVER, "tcp", action, source_ip=source, rate_limit=rate)  # type: ignore[arg-type]
        )
    return rules


def connect_times(net: Network, count: int) -> float:
    """Median microseconds of a blocking TCP connect from the client namespace."""

    def loop() -> float:
        times = []
        for _ in range(count):
            started = time.perf_counter()
            sock = socket.create_connection((HOST_IP, PORT), timeout=2)
            times.append(time.perf_counter() - started)
            sock.close()
        return statistics.median(times[count // 10 :]) * 1e6

    return netns.in_netns(net.client, loop)


def start_listener(net: Network) -> threading.Event:
    """Accept and close connections in the server namespace until the event is set."""
    stop = threading.Event()
    sock = net.listen(CONTAINER_PORT)
    raw = socket.socket(fileno=sock.detach())
    raw.settimeout(0.2)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = raw.accept()
            except TimeoutError:
                continue
            conn.close()
        raw.close()

    threading.Thread(target=accept, daemon=True).start()
    return stop


async def wait_outcome(net: Network, wanted: str) -> None:
    while await connect(net, PORT, within=1) != wanted:
        pass


async def measure(variant: str, rounds: int, connects: int) -> dict[str, Any]:
    with netns.network(variant) as net, tempfile.TemporaryDirectory() as tmp:
        net.publish(PORT, CONTAINER_PORT)
        stop = start_listener(net)
        try:
            async with open_agent(write_config(Path(tmp), net), load_entrypoints=False) as agent:
                agent.stash[CONTAINER_SERVICE] = Containers()  # type: ignore[assignment]
                firewall: Firewall = agent.stash[FIREWALL]
                async with trio.open_nursery() as nursery:
                    await nursery.start(firewall.serve)
                    assert firewall.programs is not None
                    figures: dict[str, Any] = {
                        "variant": variant,
                        "program": firewall.programs.v4,
                    }
                    await wait_outcome(net, "connected")
                    adds, deletes = [], []
                    for _ in range(rounds):
                        rule = Rule(new_rule_id(), SERVER, "tcp", "reject", source_ip=CLIENT_IP)
                        started = time.perf_counter()
                        await firewall.add_rule(rule)
                        await wait_outcome(net, "refused")
                        adds.append(time.perf_counter() - started)
                        started = time.perf_counter()
                        await firewall.delete_rule(rule.id)
                        await wait_outcome(net, "connected")
                        deletes.append(time.perf_counter() - started)
                    figures["add_effective_ms_p50"] = statistics.median(adds) * 1e3
                    figures["add_effective_ms_p95"] = sorted(adds)[int(len(adds) * 0.95)] * 1e3
                    figures["delete_effective_ms_p50"] = statistics.median(deletes) * 1e3

                    none = await trio.to_thread.run_sync(connect_times, net, connects)
                    rules = thousand_rules()
                    await firewall.add_rule(rules[0])
                    one = await trio.to_thread.run_sync(connect_times, net, connects)
                    for rule in rules[1:]:
                        firewall.rules.setdefault(SERVER, {})[rule.id] = rule
                        firewall.owner[rule.id] = SERVER
                    started = time.perf_counter()
                    await firewall.sync(SERVER)
                    figures["apply_1000_rules_ms"] = (time.perf_counter() - started) * 1e3
                    tree = await trio.to_thread.run_sync(connect_times, net, connects)
                    leaf = ruleset_module.LEAF
                    ruleset_module.LEAF = 10**6  # the same rules as one flat list
                    try:
                        await firewall.sync(SERVER)
                        flat = await trio.to_thread.run_sync(connect_times, net, connects)
                    finally:
                        ruleset_module.LEAF = leaf
                    figures.update(
                        connect_us_no_rules=none,
                        connect_us_one_rule=one,
                        ratio_vs_one=tree / one,
                        connect_us_1000_rules=tree,
                        connect_us_1000_rules_flat=flat,
                        ratio=tree / none,
                        ratio_flat=flat / none,
                    )
                    nursery.cancel_scope.cancel()
        finally:
            stop.set()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="iptables,iptables-legacy")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--connects", type=int, default=3000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    problem = netns.usable()
    if problem is not None:
        print(f"bench.firewall: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    results = []
    for variant in args.variants.split(","):
        results.append(trio.run(measure, variant, args.rounds, args.connects))
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        print(f"{r['variant']} (agent uses {r['program']})")
        print(
            f"  rule add -> client refused     p50 {r['add_effective_ms_p50']:7.1f} ms"
            f"   p95 {r['add_effective_ms_p95']:7.1f} ms"
        )
        print(f"  rule delete -> client accepted p50 {r['delete_effective_ms_p50']:7.1f} ms")
        print(f"  apply 1000 rules (one restore)     {r['apply_1000_rules_ms']:7.1f} ms")
        print(f"  connect, no rules               {r['connect_us_no_rules']:7.1f} us")
        print(f"  connect, 1 rule                 {r['connect_us_one_rule']:7.1f} us")
        print(
            f"  connect, 1000 rules (tree)      {r['connect_us_1000_rules']:7.1f} us"
            f"   ratio {r['ratio']:.2f}  (target <= {TARGET_RATIO}; vs 1 rule"
            f" {r['ratio_vs_one']:.2f})"
        )
        print(
            f"  connect, 1000 rules (flat list) {r['connect_us_1000_rules_flat']:7.1f} us"
            f"   ratio {r['ratio_flat']:.2f}"
        )
    return 0 if all(r["ratio"] <= TARGET_RATIO for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
