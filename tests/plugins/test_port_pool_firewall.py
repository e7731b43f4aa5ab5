"""``network.manage_firewall``: the chain follows the pool, is reconciled at start, and a
missing or failing iptables is a warning. Most tests run a fake iptables (a script that
keeps its chains in a JSON file and records every argv); one runs the real one on chains
of its own when it can."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from lightd.config import load_config
from lightd.errors import ConfigError
from lightd.interfaces import PORT_POOL, PortRequest
from lightd.plugins.port_pool import FIREWALL, NetworkConfig
from lightd.plugins.port_pool.firewall import parse_rule, rule_args, rules_for

from ..conftest import RunningAgent, StartAgent, api_client, wait_for

FAKE = r'''#!{python}
"""A fake iptables: chains in a JSON file, every argv logged; FAIL_FILE lists argv
fragments that make a call fail."""
import json, sys
from pathlib import Path

here = Path(__file__).parent
state_path = here / "{name}.state.json"
log_path = here / "{name}.log"
fail_path = here / "{name}.fail"
argv = sys.argv
with log_path.open("a") as log:
    log.write(json.dumps(argv) + "\n")
args = argv[1:]
if args[:1] == ["-w"]:
    args = args[1:]
if fail_path.exists() and any(f in " ".join(args) for f in fail_path.read_text().split("\n") if f):
    sys.exit(4)
chains = json.loads(state_path.read_text()) if state_path.exists() else {{}}
op, chain, rest = args[0], args[1], args[2:]
code = 0
if op == "-S":
    if chain not in chains:
        sys.stderr.write("No chain/target/match by that name.\n")
        sys.exit(1)
    print("-N " + chain)
    for rule in chains[chain]:
        print(" ".join(["-A", chain, *rule]))
elif op == "-N":
    if chain in chains:
        sys.stderr.write("Chain already exists.\n")
        code = 1
    chains.setdefault(chain, [])
elif op == "-C":
    code = 0 if rest in chains.get(chain, []) else 1
elif op == "-A":
    chains.setdefault(chain, []).append(rest)
elif op == "-I":
    position = int(rest[0]) - 1 if rest and rest[0].isdigit() else 0
    rule = rest[1:] if rest and rest[0].isdigit() else rest
    chains.setdefault(chain, []).insert(position, rule)
elif op == "-D":
    if rest in chains.get(chain, []):
        chains[chain].remove(rest)
    else:
        code = 1
else:
    code = 2
state_path.write_text(json.dumps(chains))
sys.exit(code)
'''


class FakeIptables:
    """One fake program (iptables or ip6tables) and what it saw."""

    def __init__(self, folder: Path, name: str) -> None:
        self.path = folder / name
        self.path.write_text(FAKE.format(python=sys.executable, name=name))
        self.path.chmod(0o755)
        self.state_path = folder / f"{name}.state.json"
        self.log_path = folder / f"{name}.log"
        self.fail_path = folder / f"{name}.fail"

    @property
    def chains(self) -> dict[str, list[list[str]]]:
        if not self.state_path.exists():
            return {}
        chains: dict[str, list[list[str]]] = json.loads(self.state_path.read_text())
        return chains

    @chains.setter
    def chains(self, value: dict[str, list[list[str]]]) -> None:
        self.state_path.write_text(json.dumps(value))

    def rules(self, chain: str = "LIGHTD-PORTS") -> list[list[str]]:
        return self.chains.get(chain, [])

    @property
    def calls(self) -> list[list[str]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]

    def fail(self, *fragments: str) -> None:
        self.fail_path.write_text("\n".join(fragments))


def accept(ip: str | None, proto: str, port: int) -> list[str]:
    dest = [] if ip is None else ["-d", f"{ip}/{128 if ':' in ip else 32}"]
    return [*dest, "-p", proto, "-m", proto, "--dport", str(port), "-j", "ACCEPT"]


@pytest.fixture
def fakes(tmp_path: Path) -> tuple[FakeIptables, FakeIptables]:
    folder = tmp_path / "bin"
    folder.mkdir()
    return FakeIptables(folder, "iptables"), FakeIptables(folder, "ip6tables")


@pytest.fixture
def firewall_config(
    make_config: Callable[..., Path], fakes: tuple[FakeIptables, FakeIptables]
) -> Path:
    v4, v6 = fakes
    return make_config(
        {
            "network": {
                "manage_firewall": True,
                "iptables": str(v4.path),
                "ip6tables": str(v6.path),
            }
        }
    )


async def fill(client: httpx.AsyncClient, *entries: tuple[str, int, str]) -> None:
    response = await client.post(
        "/network/ports/bulk",
        json={"ports": [{"ip": ip, "port": port, "protocol": p} for ip, port, p in entries]},
    )
    assert response.status_code == 200, response.text


async def settle(running: RunningAgent) -> None:
    """Wait until the reconciler has nothing left to do."""
    await wait_for(running.agent.stash[FIREWALL].in_sync, what="the firewall to follow the pool")


# --- rules --------------------------------------------------------------------------


def test_rules_for_a_pool() -> None:
    rules = rules_for(
        [("10.0.0.1", 80, "tcp"), ("0.0.0.0", 27015, "both"), ("::", 9, "udp"), ("::1", 9, "udp")]
    )
    assert rules == {
        (4, "10.0.0.1", "tcp", 80),
        (4, None, "tcp", 27015),
        (4, None, "udp", 27015),
        (6, None, "udp", 9),
        (6, "::1", "udp", 9),
    }


@pytest.mark.parametrize(
    "rule",
    [(4, "10.0.0.1", "tcp", 80), (4, None, "udp", 1), (6, "2001:db8::1", "tcp", 65535)],
)
def test_a_rule_reads_back_as_itself(rule: Any) -> None:
    assert parse_rule(rule[0], rule_args(rule)) == rule


@pytest.mark.parametrize(
    "args",
    [
        ["-s", "1.2.3.4/32", "-j", "DROP"],
        ["-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "DROP"],
        ["-p", "icmp", "-j", "ACCEPT"],
        ["-p", "tcp", "-m", "udp", "--dport", "80", "-j", "ACCEPT"],
        ["-p", "tcp", "-m", "tcp", "--dport", "80:90", "-j", "ACCEPT"],
        ["-d", "10.0.0.0/24", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "ACCEPT"],
        ["-d", "::1/128", "-p", "tcp", "-m", "tcp", "--dport", "80", "-j", "ACCEPT"],
        ["-p", "tcp", "-p", "tcp", "--dport", "80", "-j", "ACCEPT"],
        ["-p", "tcp", "-m", "comment", "--comment", "x", "--dport", "80", "-j", "ACCEPT"],
        ["-j"],
    ],
)
def test_foreign_rules_are_not_ours(args: list[str]) -> None:
    assert parse_rule(4, args) is None


def test_the_network_section_is_validated(make_config: Callable[..., Path]) -> None:
    sections = {"network": NetworkConfig}
    for key, value, message in [
        ("firewall_chain", "bad chain; rm -rf /", "must be 1-28 characters"),
        ("firewall_chain", "X" * 29, "must be 1-28 characters"),
        ("firewall_parent", "", "must be 1-28 characters"),
        ("firewall_timeout", 0, "must be > 0"),
        ("manage_firewall", "yes", "must be true or false"),
    ]:
        path = make_config({"network": {key: value}})
        with pytest.raises(ConfigError) as info:
            load_config(path, sections)
        assert info.value.key == f"network.{key}"
        assert message in info.value.message


# --- the fake iptables --------------------------------------------------------------


async def test_the_chain_is_reconciled_at_start(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    fakes: tuple[FakeIptables, FakeIptables],
) -> None:
    v4, v6 = fakes
    # A pool made while the firewall was off...
    plain = make_config(name="node")
    first = await start_agent(plain)
    async with api_client(first.url) as c:
        await fill(c, ("10.0.0.1", 80, "tcp"), ("0.0.0.0", 27015, "both"), ("::1", 9, "udp"))
    await first.stop()
    assert v4.calls == [] and v6.calls == []
    # ...and a chain left with a right rule, a stale one, a foreign one and a duplicate.
    right = accept("10.0.0.1", "tcp", 80)
    v4.chains = {
        "INPUT": [["-s", "192.0.2.1/32", "-j", "DROP"]],
        "LIGHTD-PORTS": [right, accept("10.0.0.1", "tcp", 81), ["-j", "DROP"], right],
    }
    firewall_config = make_config(
        {"network": {"manage_firewall": True, "iptables": str(v4.path), "ip6tables": str(v6.path)}},
        name="node",
    )
    running = await start_agent(firewall_config)
    await settle(running)
    assert v4.chains["INPUT"] == [["-j", "LIGHTD-PORTS"], ["-s", "192.0.2.1/32", "-j", "DROP"]]
    assert sorted(v4.rules()) == sorted(
        [right, accept(None, "tcp", 27015), accept(None, "udp", 27015)]
    )
    assert v6.rules() == [accept("::1", "udp", 9)]
    assert v6.chains["INPUT"] == [["-j", "LIGHTD-PORTS"]]
    # The right rule was never touched: restarting does not close an open port.
    assert [c[2] for c in v4.calls if c[4:] == right] == ["-D"]  # the duplicate
    assert [c[2:] for c in v4.calls if c[2] == "-A"] == [
        ["-A", "LIGHTD-PORTS", *accept(None, "tcp", 27015)],
        ["-A", "LIGHTD-PORTS", *accept(None, "udp", 27015)],
    ]
    # Every call is an argument vector: the program, -w, then one option per element.
    assert all(c[0] == str(v4.path) and c[1] == "-w" for c in v4.calls)
    await running.stop()
    # A second start finds everything right and changes nothing.
    before = len(v4.calls)
    again = await start_agent(firewall_config)
    await settle(again)
    assert [c[2] for c in v4.calls[before:]] == ["-S", "-C"]


async def test_rules_follow_the_pool(
    start_agent: StartAgent, firewall_config: Path, fakes: tuple[FakeIptables, FakeIptables]
) -> None:
    v4, v6 = fakes
    running = await start_agent(firewall_config)
    await settle(running)
    assert v4.rules() == [] and v4.chains["INPUT"] == [["-j", "LIGHTD-PORTS"]]
    async with api_client(running.url) as c:
        await c.post("/network/ports", json={"ip": "10.0.0.1", "port": 25565, "protocol": "both"})
        await settle(running)
        assert sorted(v4.rules()) == [
            accept("10.0.0.1", "tcp", 25565),
            accept("10.0.0.1", "udp", 25565),
        ]
        await c.post("/network/ports/bulk", json={"ip": "2001:db8::1", "start": 1, "end": 8})
        await settle(running)
        assert len(v6.rules()) == 8
        # Reserving and marking ports does not touch the firewall.
        calls = len(v4.calls) + len(v6.calls)
        await running.agent.stash[PORT_POOL].reserve("srv-1", [PortRequest("2001:db8::1", 7)])
        await c.put("/network/ports/10.0.0.1/25565/use", json={"in_use": True})
        await running.agent.stash[PORT_POOL].release("srv-1")
        assert len(v4.calls) + len(v6.calls) == calls
        await c.delete("/network/ports/10.0.0.1/25565")
        await c.post(
            "/network/ports/bulk-delete",
            json={"ports": [{"ip": "2001:db8::1", "port": p} for p in range(2, 9)]},
        )
        await settle(running)
        assert v4.rules() == []
        assert v6.rules() == [accept("2001:db8::1", "tcp", 1)]


async def test_a_failing_call_is_logged_and_retried_with_the_next_change(
    start_agent: StartAgent,
    firewall_config: Path,
    fakes: tuple[FakeIptables, FakeIptables],
    caplog: pytest.LogCaptureFixture,
) -> None:
    v4, _ = fakes
    running = await start_agent(firewall_config)
    await settle(running)
    v4.fail("--dport 81 ")
    async with api_client(running.url) as c:
        await c.post("/network/ports", json={"ip": "10.0.0.1", "port": 81})

        async def second_pass() -> bool:
            return running.agent.stash[FIREWALL].passes >= 2

        await wait_for(second_pass, what="a second pass")
        assert "failed with exit status 4" in caplog.text
        assert v4.rules() == []
        v4.fail()
        await c.post("/network/ports", json={"ip": "10.0.0.1", "port": 82})
        await settle(running)
        assert sorted(v4.rules()) == [accept("10.0.0.1", "tcp", 81), accept("10.0.0.1", "tcp", 82)]


async def test_a_missing_iptables_is_a_warning(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    fakes: tuple[FakeIptables, FakeIptables],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, v6 = fakes
    path = make_config(
        {
            "network": {
                "manage_firewall": True,
                "iptables": "/nonexistent/iptables",
                "ip6tables": str(v6.path),
            }
        }
    )
    running = await start_agent(path)
    assert "'/nonexistent/iptables' was not found: IPv4 pool ports get no firewall rules" in (
        caplog.text
    )
    async with api_client(running.url) as c:
        response = await c.post("/network/ports", json={"ip": "10.0.0.1", "port": 80})
        assert response.status_code == 200
        await c.post("/network/ports", json={"ip": "::1", "port": 80})
        await settle(running)
        assert v6.rules() == [accept("::1", "tcp", 80)]
        assert len((await c.get("/network/ports")).json()["ports"]) == 2


async def test_no_iptables_at_all(
    start_agent: StartAgent, make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = make_config(
        {
            "network": {
                "manage_firewall": True,
                "iptables": "no-such-iptables-x",
                "ip6tables": "no-such-ip6tables-x",
            }
        }
    )
    running = await start_agent(path)
    assert caplog.text.count("get no firewall rules") == 2
    async with api_client(running.url) as c:
        assert (await c.post("/network/ports", json={"ip": "::1", "port": 80})).status_code == 200
        assert (await c.delete("/network/ports/::1/80")).status_code == 200


async def test_firewall_off_means_no_service(running: RunningAgent) -> None:
    assert running.agent.stash.get(FIREWALL) is None


async def test_hook_lightd_config_reloaded_warns_about_network_changes(
    running: RunningAgent,
    config_path: Path,
    make_config: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    make_config({"network": {"manage_firewall": True}}, name=config_path.parent.name)
    async with api_client(running.url) as c:
        response = await c.post("/remote/config/reload")
    assert response.status_code == 200, response.text
    assert "network changed; it takes effect at the next restart" in caplog.text
    assert running.agent.stash.get(FIREWALL) is None


# --- the real iptables --------------------------------------------------------------


def _real_iptables_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("iptables") is None:
        return False
    result = subprocess.run(
        ["iptables", "-w", "-S", "INPUT"], capture_output=True, timeout=20, check=False
    )
    return result.returncode == 0


@pytest.mark.skipif(not _real_iptables_usable(), reason="needs root and a working iptables")
async def test_real_iptables_on_chains_of_our_own(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    """The real program, on a chain and a parent chain made for this test (nothing jumps
    to the parent, so no traffic is affected); both are removed afterwards."""
    tag = secrets.token_hex(3).upper()
    chain, parent = f"LT-{tag}", f"LT-{tag}-P"

    def iptables(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["iptables", "-w", *args], capture_output=True, text=True, timeout=20, check=False
        )

    assert iptables("-N", parent).returncode == 0
    try:
        path = make_config(
            {
                "network": {
                    "manage_firewall": True,
                    "firewall_chain": chain,
                    "firewall_parent": parent,
                    "ip6tables": "no-such-ip6tables-x",
                }
            }
        )
        running = await start_agent(path)
        async with api_client(running.url) as c:
            await fill(c, ("192.0.2.10", 25565, "both"), ("0.0.0.0", 27015, "tcp"))
            await settle(running)
            listed = iptables("-S", chain).stdout.splitlines()
            assert sorted(listed[1:]) == sorted(
                [
                    f"-A {chain} -d 192.0.2.10/32 -p tcp -m tcp --dport 25565 -j ACCEPT",
                    f"-A {chain} -d 192.0.2.10/32 -p udp -m udp --dport 25565 -j ACCEPT",
                    f"-A {chain} -p tcp -m tcp --dport 27015 -j ACCEPT",
                ]
            )
            assert iptables("-S", parent).stdout.splitlines()[1:] == [f"-A {parent} -j {chain}"]
            await c.delete("/network/ports/192.0.2.10/25565")
            await settle(running)
            assert iptables("-S", chain).stdout.splitlines()[1:] == [
                f"-A {chain} -p tcp -m tcp --dport 27015 -j ACCEPT"
            ]
        await running.stop()
        # A rule someone added by hand to our chain is removed at the next start.
        iptables("-A", chain, "-p", "udp", "--dport", "1", "-j", "DROP")
        again = await start_agent(path)
        await settle(again)
        assert iptables("-S", chain).stdout.splitlines()[1:] == [
            f"-A {chain} -p tcp -m tcp --dport 27015 -j ACCEPT"
        ]
        await again.stop()
    finally:
        iptables("-F", parent)
        iptables("-X", parent)
        iptables("-F", chain)
        iptables("-X", chain)
    assert iptables("-S", chain).returncode != 0
