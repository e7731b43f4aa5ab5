"""The ``firewall`` plugin (contract §21): routes, validation, persistence, and what the
rules do to real connections.

Rule semantics run in namespaces of the test's own (``tests/plugins/netns.py``: a client,
a host doing Docker's DNAT and ``FORWARD -j DOCKER-USER``, a server); the agent runs its
iptables calls in the host namespace (``firewall.command_prefix``), never in the
machine's tables. The containers are real (created on the test engine, not started: the
published address exists only in the namespaces), so the ports the firewall follows are
the ones the containers core publishes.
"""

# The containers fixtures (start_node, prefix…) are imported, then named as arguments.
# ruff: noqa: F811

from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import httpx
import pytest
import trio
from lightd import PoolPort, PortAccess, hookimpl
from lightd.plugins.firewall import FIREWALL, Firewall, RateLimit, Rule
from lightd.plugins.firewall.model import FirewallConfig
from lightd.plugins.firewall.ruleset import (
    FANOUT,
    LEAF,
    SERVER_DEPTH,
    dispatch_chains,
    rate_spec,
    server_chain,
    server_chains,
)

from ..conftest import RunningAgent, api_client, wait_for
from ..containers.conftest import (  # noqa: F401
    StartNode,
    containers_config,
    create,
    engine,
    prefix,
    start_node,
    wait_state,
)
from . import netns
from .netns import HOST_IP, Network, connect, serve

SKIP = netns.usable()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

BASE = "LIGHTD-FW"


# --- pure: rendering -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "per_seconds", "spec"),
    [(10, 1, "10/second"), (1, 2, "30/minute"), (5, 60, "5/minute"), (7, 86400, "7/day"),
     (1, 7, "12343/day"), (100, 3600, "100/hour")],
)  # fmt: skip
def test_rate_spec(requests: int, per_seconds: int, spec: str) -> None:
    assert rate_spec(RateLimit(requests, per_seconds)) == spec


def _first_match(chains: dict[str, list[list[str]]], chain: str, source: int) -> list[str] | None:
    """Walk rendered chains for a packet from ``source`` (only ``-s`` and ``-g`` matter)."""
    for line in chains[chain]:
        network = ipaddress.ip_network(line[line.index("-s") + 1]) if "-s" in line else None
        if network is not None and ipaddress.ip_address(source) not in network:
            continue
        if "-g" in line:
            return _first_match(chains, line[line.index("-g") + 1], source)
        return line
    return None


def test_a_long_list_becomes_a_tree_with_the_same_first_match() -> None:
    rng = random.Random(7)
    rules = []
    for n in range(1000):
        kind = rng.random()
        if kind < 0.02:
            source = None
        elif kind < 0.1:
            source = f"{rng.randrange(1, 224)}.0.0.0/8"
        else:
            source = str(ipaddress.IPv4Address(rng.randrange(1 << 32)))
        action = rng.choice(["accept", "drop", "reject"])
        rules.append(Rule(str(n), "s", "tcp", action, source_ip=source))  # type: ignore[arg-type]
    config = FirewallConfig()
    chains = server_chains(BASE, "s", rules, None, 4, config)
    flat = [line for r in rules for line in _rule_lines(r, config)]
    # Every leaf holds the 20-odd rules without a source, and a few /8s: far from 1 000.
    assert len(chains) > 50 and max(len(lines) for lines in chains.values()) <= 3 * LEAF
    assert _depth(chains, server_chain(BASE, "s")) <= SERVER_DEPTH
    probes = [int(ipaddress.IPv4Address(r.source_ip.split("/")[0])) for r in rules if r.source_ip]
    probes += [rng.randrange(1 << 32) for _ in range(2000)]
    for source in probes:
        expected = next(
            (
                line
                for line in flat
                if "-s" not in line
                or ipaddress.ip_address(source) in ipaddress.ip_network(line[line.index("-s") + 1])
            ),
            None,
        )
        assert _first_match(chains, server_chain(BASE, "s"), source) == expected


def _depth(chains: dict[str, list[list[str]]], chain: str) -> int:
    """The deepest chain nesting below ``chain`` (nf_tables allows 16 in all)."""
    below = [_depth(chains, line[-1]) + 1 for line in chains[chain] if line[-2] == "-g"]
    return max(below, default=0)


def _rule_lines(rule: Rule, config: FirewallConfig) -> list[list[str]]:
    return server_chains(BASE, "x", [rule], None, 4, config)[server_chain(BASE, "x")]


def test_dispatch_matches_the_published_host_address_and_port() -> None:
    published = {
        "a": [PoolPort("0.0.0.0", 25565, "both"), PoolPort("2001:db8::1", 80, "tcp")],
        "b": [PoolPort("192.0.2.1", 27015, "udp")],
    }
    dnat = ["-m", "conntrack", "--ctstate", "DNAT", "--ctdir", "ORIGINAL"]
    v4 = dispatch_chains(BASE, published, 4)
    assert v4 == {
        BASE: [
            ["-p", "tcp", *dnat, "--ctorigdstport", "25565", "-j", server_chain(BASE, "a")],
            ["-p", "udp", *dnat, "--ctorigdstport", "25565", "-j", server_chain(BASE, "a")],
            ["-p", "udp", *dnat, "--ctorigdst", "192.0.2.1", "--ctorigdstport", "27015",
             "-j", server_chain(BASE, "b")],
        ]
    }  # fmt: skip
    v6 = dispatch_chains(BASE, published, 6)
    assert v6[BASE] == [
        ["-p", "tcp", *dnat, "--ctorigdst", "2001:db8::1", "--ctorigdstport", "80",
         "-j", server_chain(BASE, "a")]
    ]  # fmt: skip
    many = {f"s{n}": [PoolPort("0.0.0.0", 20000 + n, "tcp")] for n in range(200)}
    tree = dispatch_chains(BASE, many, 4)
    assert len(tree[BASE]) <= FANOUT and all(len(lines) <= LEAF for lines in tree.values())


def test_the_pool_rules_follow_the_servers_of_their_port() -> None:
    """A pool port's ACCEPT/DROP comes after the server's chain is called for it, in the
    same leaf of the tree, however many ports there are."""
    published = {f"s{n}": [PoolPort("0.0.0.0", 20000 + n, "tcp")] for n in range(200)}
    ports = [PortAccess("0.0.0.0", 20000 + n, "tcp", n % 2 == 0) for n in range(400)]
    ports.append(PortAccess("2001:db8::1", 20001, "both", True))
    for servers in (published, {}):
        tree = dispatch_chains(BASE, servers, 4, ports)
        assert all(len(lines) <= LEAF for lines in tree.values())
        for n in (0, 1, 150, 399):
            path = _port_path(tree, BASE, 20000 + n)
            called = [server_chain(BASE, f"s{n}")] if f"s{n}" in servers else []
            assert path == [*called, "ACCEPT" if n % 2 == 0 else "DROP"], (n, path)
    v6 = dispatch_chains(BASE, published, 6, ports)[BASE]
    assert [line[-1] for line in v6] == ["ACCEPT", "ACCEPT"]
    assert v6[0][:2] == ["-p", "tcp"] and "--ctorigdst" in v6[0]


def _port_path(chains: dict[str, list[list[str]]], chain: str, port: int) -> list[str]:
    """The targets a packet to ``port`` meets walking the dispatch: the server chains it
    is called into (``-j``, then back), and the verdict that ends it."""
    met: list[str] = []
    for line in chains[chain]:
        value = line[line.index("--ctorigdstport") + 1]
        low, _, high = value.partition(":")
        if not int(low) <= port <= int(high or low):
            continue
        target = line[-1]
        if line[-2] == "-g":
            return met + _port_path(chains, target, port)
        met.append(target)
        if target in ("ACCEPT", "DROP"):
            return met
    return met


def test_rules_go_to_the_family_of_their_source() -> None:
    config = FirewallConfig()
    rules = [
        Rule("1", "s", "tcp", "drop", source_ip="2001:db8::/32"),
        Rule("2", "s", "icmp", "reject", source_ip="192.0.2.0/24"),
        Rule("3", "s", "udp", "accept", dest_port=9, source_port=1000),
        Rule("4", "s", "tcp", "drop", enabled=False),
    ]
    chain = server_chain(BASE, "s")
    assert server_chains(BASE, "s", rules, None, 4, config)[chain] == [
        ["-s", "192.0.2.0/24", "-p", "icmp", "-j", "REJECT"],
        ["-p", "udp", "-m", "conntrack", "--ctorigsrcport", "1000", "--ctorigdstport", "9",
         "-j", "RETURN"],
    ]  # fmt: skip
    assert server_chains(BASE, "s", rules, None, 6, config)[chain] == [
        ["-s", "2001:db8::/32", "-p", "tcp", "-j", "DROP"],
        ["-p", "udp", "-m", "conntrack", "--ctorigsrcport", "1000", "--ctorigdstport", "9",
         "-j", "RETURN"],
    ]  # fmt: skip


# --- the API without iptables ----------------------------------------------------------


async def test_every_route_answers_409_while_disabled(client: httpx.AsyncClient) -> None:
    calls = [
        client.post("/firewall/rules", json={"container_id": "x"}),
        client.get("/firewall/rules/container/x"),
        client.put("/firewall/rules/r/toggle", json={"enabled": True}),
        client.delete("/firewall/rules/r"),
        client.post("/firewall/ddos/x", json={"enabled": True}),
        client.delete("/firewall/cleanup/x"),
    ]
    for call in calls:
        response = await call
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "Firewall management is disabled"


# --- with a node and a namespace -------------------------------------------------------


@pytest.fixture
def net() -> Iterator[Network]:
    if SKIP is not None:
        pytest.skip(SKIP)
    with netns.network() as created:
        yield created


class Recorder:
    """A plugin that records ``lightd_container_network_changed``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[PoolPort]]] = []

    @hookimpl
    def lightd_container_network_changed(self, internal_id: str, ports: Sequence[PoolPort]) -> None:
        self.calls.append((internal_id, list(ports)))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def firewall_config(net: Network, **extra: Any) -> dict[str, Any]:
    return {"firewall": {"enabled": True, "command_prefix": net.prefix, **extra}}


@pytest.fixture
async def fw_node(start_node: StartNode, net: Network, recorder: Recorder) -> RunningAgent:
    return await start_node(firewall_config(net), extra=(("recorder", recorder),))


@pytest.fixture
async def fw(fw_node: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(fw_node.url) as client:
        yield client


async def server(api: httpx.AsyncClient, internal_id: str, port: int) -> dict[str, Any]:
    """A container (not started) publishing ``HOST_IP:port`` → its port 30000."""
    added = await api.post("/network/ports", json={"ip": HOST_IP, "port": port})
    assert added.status_code == 200, added.text
    ports = [{"ip": HOST_IP, "port": port, "protocol": "tcp", "container_port": 30000}]
    response = await create(api, internal_id, ports=ports)
    assert response.status_code == 200, response.text
    return await wait_state(api, internal_id, install_state="ready")


async def add_rule(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/firewall/rules", json=body)
    assert response.status_code == 201, response.text
    rule: dict[str, Any] = response.json()["rule"]
    return rule


@pytest.fixture
async def listening(net: Network) -> AsyncIterator[list[trio.socket.SocketType]]:
    """The server namespace listens on 30000 (what the containers publish) and keeps
    every connection open."""
    held: list[trio.socket.SocketType] = []
    listener = net.listen(30000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener, held)
        yield held
        nursery.cancel_scope.cancel()
    for sock in held:
        sock.close()


def chain_listing(net: Network) -> list[str]:
    return [
        line
        for line in net.iptables("-S").stdout.splitlines()
        if BASE in line or "DOCKER-USER" in line
    ]


@needs_netns
async def test_rules_gate_the_published_port(
    fw: httpx.AsyncClient, net: Network, listening: list[Any], prefix: str
) -> None:
    sid = f"{prefix}-a"
    await server(fw, sid, 25565)
    net.publish(25565, 30000)
    net.publish(25566, 30000)  # published for nobody of ours: never gated
    assert await connect(net, 25565) == "connected"

    rule = await add_rule(
        fw, container_id=sid, source_ip=netns.CLIENT_IP, protocol="tcp", action="reject",
        description="abusive",
    )  # fmt: skip
    assert rule == {
        "id": rule["id"], "container_id": sid, "source_ip": netns.CLIENT_IP, "source_port": None,
        "dest_port": None, "protocol": "tcp", "action": "reject", "rate_limit": None,
        "description": "abusive", "enabled": True, "created_at": rule["created_at"],
    }  # fmt: skip
    # The answer came once the rule was in the kernel: refused at once.
    assert await connect(net, 25565) == "refused"
    assert await connect(net, 25566) == "connected"
    assert f"-A DOCKER-USER -j {BASE}" in chain_listing(net)

    toggled = await fw.put(f"/firewall/rules/{rule['id']}/toggle", json={"enabled": False})
    assert toggled.json() == {"message": "Rule disabled successfully"}
    assert await connect(net, 25565) == "connected"
    toggled = await fw.put(f"/firewall/rules/{rule['id']}/toggle", json={"enabled": True})
    assert toggled.json() == {"message": "Rule enabled successfully"}
    assert await connect(net, 25565) == "refused"

    # A drop rule placed later does not change the first match; an accept placed earlier
    # would. Delete the reject: the drop now decides (the SYN is lost: a timeout).
    await add_rule(fw, container_id=sid, source_ip="10.77.0.0/16", protocol="all", action="drop")
    deleted = await fw.delete(f"/firewall/rules/{rule['id']}")
    assert deleted.json() == {"message": "Rule deleted successfully"}
    assert await connect(net, 25565) == "timeout"

    # dest_port names the published host port: a rule for another port does nothing.
    listed = (await fw.get(f"/firewall/rules/container/{sid}")).json()["rules"]
    assert [r["action"] for r in listed] == ["drop"]
    await fw.delete(f"/firewall/rules/{listed[0]['id']}")
    await add_rule(fw, container_id=sid, dest_port=25599, protocol="tcp", action="reject")
    assert await connect(net, 25565) == "connected"
    await add_rule(fw, container_id=sid, dest_port=25565, protocol="tcp", action="reject")
    assert await connect(net, 25565) == "refused"

    cleaned = await fw.delete(f"/firewall/cleanup/{sid}")
    assert cleaned.json() == {"message": "Container firewall rules cleaned up successfully"}
    assert await connect(net, 25565) == "connected"
    assert (await fw.get(f"/firewall/rules/container/{sid}")).json() == {"rules": []}
    assert chain_listing(net) == [
        "-N DOCKER-USER", f"-N {BASE}", "-A FORWARD -j DOCKER-USER", f"-A DOCKER-USER -j {BASE}"
    ]  # fmt: skip


@needs_netns
async def test_a_rate_limit_drops_the_excess(
    fw: httpx.AsyncClient, net: Network, listening: list[Any], prefix: str
) -> None:
    sid = f"{prefix}-r"
    await server(fw, sid, 25570)
    net.publish(25570, 30000)
    await add_rule(
        fw, container_id=sid, protocol="tcp", action="accept",
        rate_limit={"requests": 3, "per_seconds": 3600},
    )  # fmt: skip
    outcomes = [await connect(net, 25570) for _ in range(5)]
    assert outcomes == ["connected"] * 3 + ["timeout"] * 2


@needs_netns
async def test_ddos_connection_limit_and_syn_meter(
    start_node: StartNode, net: Network, listening: list[Any], prefix: str
) -> None:
    node = await start_node(firewall_config(net, syn_rate=1, syn_burst=4))
    async with api_client(node.url) as api:
        sid = f"{prefix}-d"
        await server(api, sid, 25580)
        net.publish(25580, 30000)
        body = {"enabled": True, "syn_flood_protection": False, "connection_limit": 2}
        response = await api.post(f"/firewall/ddos/{sid}", json=body)
        assert response.json() == {"message": "DDoS protection configured successfully"}
        # Two connections held open from one address; a third is dropped.
        held = []
        for _ in range(2):
            sock = net.client_socket()
            await sock.connect((HOST_IP, 25580))
            held.append(sock)
        assert await connect(net, 25580) == "timeout"
        for sock in held:
            sock.close()
        # The SYN meter: one bucket for the server, burst 4 then 1 per second.
        body = {"enabled": True, "syn_flood_protection": True}
        await api.post(f"/firewall/ddos/{sid}", json=body)
        outcomes = [await connect(net, 25580, within=0.3) for _ in range(6)]
        assert outcomes.count("connected") <= 5 and outcomes[-1] == "timeout", outcomes
        assert outcomes[:4] == ["connected"] * 4
        # Off again: nothing left of it.
        await api.post(f"/firewall/ddos/{sid}", json={"enabled": False})
        assert f"-N {server_chain(BASE, sid)}" not in chain_listing(net)


@needs_netns
async def test_rules_survive_a_restart_and_leftovers_go(
    start_node: StartNode, containers_config: Any, net: Network, listening: list[Any], prefix: str
) -> None:
    path = containers_config(firewall_config(net), name="fwnode")
    first = await start_node(path=path)
    sid = f"{prefix}-p"
    async with api_client(first.url) as api:
        await server(api, sid, 25590)
        net.publish(25590, 30000)
        rule = await add_rule(api, container_id=sid, protocol="tcp", action="reject")
        assert await connect(net, 25590) == "refused"
    await first.stop()
    # The host lost its rules meanwhile (a reboot), and something left a chain of ours.
    net.iptables("-D", "DOCKER-USER", "-j", BASE)
    for line in chain_listing(net):
        if line.startswith("-N " + BASE):
            net.iptables("-F", line.split()[1])
    net.iptables("-N", f"{BASE}-STRAY")
    assert await connect(net, 25590) == "connected"
    again = await start_node(path=path)
    assert await connect(net, 25590) == "refused"
    listing = chain_listing(net)
    assert f"-N {BASE}-STRAY" not in listing
    async with api_client(again.url) as api:
        rules = (await api.get(f"/firewall/rules/container/{sid}")).json()["rules"]
        assert [r["id"] for r in rules] == [rule["id"]]
        # Deleting the server removes its rules, from the store and the kernel.
        assert (await api.delete(f"/containers/{sid}")).status_code == 200
        assert await connect(net, 25590) == "connected"
        missing = await api.get(f"/firewall/rules/container/{sid}")
        assert missing.status_code == 404
        assert missing.json()["error"] == "Container not found"
    assert not [line for line in chain_listing(net) if server_chain(BASE, sid) in line]


@needs_netns
async def test_hook_lightd_container_network_changed(
    fw: httpx.AsyncClient,
    fw_node: RunningAgent,
    net: Network,
    listening: list[Any],
    prefix: str,
    recorder: Recorder,
) -> None:
    """Called when the server container is created and after a rebind; the firewall
    follows the new host port."""
    sid = f"{prefix}-n"
    await server(fw, sid, 25600)
    assert (sid, [PoolPort(HOST_IP, 25600, "tcp")]) in recorder.calls
    net.publish(25600, 30000)
    net.publish(25601, 30000)
    await add_rule(fw, container_id=sid, protocol="tcp", action="reject")
    assert await connect(net, 25600) == "refused"
    assert await connect(net, 25601) == "connected"
    await fw.post("/network/ports", json={"ip": HOST_IP, "port": 25601})
    rebind = await fw.post(
        f"/containers/{sid}/rebind-network",
        json={
            "ports": [{"ip": HOST_IP, "port": 25601, "protocol": "tcp", "container_port": 30000}]
        },
    )
    assert rebind.status_code == 200, rebind.text
    firewall: Firewall = fw_node.agent.stash[FIREWALL]

    async def followed() -> bool:
        return (sid, [PoolPort(HOST_IP, 25601, "tcp")]) in recorder.calls and (
            firewall.ports.get(sid) == [PoolPort(HOST_IP, 25601, "tcp")]
            and not firewall._dirty
            and "--ctorigdstport 25601" in "\n".join(chain_listing(net))
        )

    await wait_for(followed, what="the firewall to follow the rebind")
    assert await connect(net, 25601) == "refused"
    assert await connect(net, 25600) == "connected"


@needs_netns
async def test_validation_and_lookups(fw: httpx.AsyncClient, prefix: str) -> None:
    sid = f"{prefix}-v"
    await server(fw, sid, 25610)
    good = {"container_id": sid, "protocol": "tcp", "action": "drop"}
    address = "source_ip: must be an IPv4 or IPv6 address or CIDR"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"protocol": "tcp", "action": "drop"}, "container_id: is required"),
        ({**good, "container_id": 5}, "container_id: must be a non-empty string"),
        ({**good, "protocol": None}, "protocol: is required"),
        ({**good, "protocol": "sctp"}, "protocol: must be tcp, udp, icmp or all"),
        ({**good, "action": "allow"}, "action: must be accept, drop or reject"),
        ({**good, "source_ip": "10.0.0.300"}, address),
        ({**good, "source_ip": "1.2.3.4; rm"}, address),
        ({**good, "source_port": 0}, "source_port: must be an integer from 1 to 65535"),
        ({**good, "dest_port": "80"}, "dest_port: must be an integer from 1 to 65535"),
        ({**good, "protocol": "icmp", "dest_port": 80},
         "dest_port: cannot be used with protocol icmp"),
        ({**good, "rate_limit": 5}, "rate_limit: must be an object with requests and per_seconds"),
        ({**good, "rate_limit": {"requests": 5}}, "rate_limit.per_seconds: is required"),
        ({**good, "rate_limit": {"requests": 0, "per_seconds": 1}},
         "rate_limit.requests: must be an integer from 1 to 100000"),
        ({**good, "description": 7}, "description: must be a string of at most 1000 characters"),
    ]  # fmt: skip
    for body, message in cases:
        response = await fw.post("/firewall/rules", json=body)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"] == message
    unknown = await fw.post("/firewall/rules", json={**good, "container_id": f"{prefix}-none"})
    assert (unknown.status_code, unknown.json()["error"]) == (404, "Container not found")
    for method, url, body in [
        ("PUT", "/firewall/rules/nope/toggle", {"enabled": True}),
        ("DELETE", "/firewall/rules/nope", None),
    ]:
        response = await fw.request(method, url, json=body)
        assert (response.status_code, response.json()["error"]) == (404, "Rule not found")
    toggle = await fw.put("/firewall/rules/nope/toggle", json={"enabled": "yes"})
    assert toggle.status_code == 400 and toggle.json()["error"].startswith("enabled:")
    for url in (f"/firewall/ddos/{prefix}-none", f"/firewall/cleanup/{prefix}-none"):
        body = {"enabled": True} if "ddos" in url else None
        response = await fw.request("POST" if "ddos" in url else "DELETE", url, json=body)
        assert (response.status_code, response.json()["error"]) == (404, "Container not found")
    ddos_cases: list[tuple[dict[str, Any], str]] = [
        ({}, "enabled: is required"),
        ({"enabled": "yes"}, "enabled: must be true or false"),
        ({"enabled": True, "connection_limit": 0},
         "connection_limit: must be an integer from 1 to 1000000"),
        ({"enabled": True, "syn_flood_protection": 1},
         "syn_flood_protection: must be true or false"),
        ({"enabled": True, "rate_limit": {"requests": 1, "per_seconds": 0}},
         "rate_limit.per_seconds: must be an integer from 1 to 86400"),
    ]  # fmt: skip
    for body, message in ddos_cases:
        response = await fw.post(f"/firewall/ddos/{sid}", json=body)
        assert (response.status_code, response.json()["error"]) == (400, message), body
    # [alias] a bare number per second
    ok = await fw.post(f"/firewall/ddos/{sid}", json={"enabled": True, "rate_limit": 20})
    assert ok.status_code == 200, ok.text
    # An IPv6 CIDR is normalised.
    rule = await add_rule(fw, **good, source_ip="2001:DB8::1/32")
    assert rule["source_ip"] == "2001:db8::/32"


@needs_netns
async def test_tokens_need_manage_and_the_container_in_scope(
    fw: httpx.AsyncClient, fw_node: RunningAgent, prefix: str
) -> None:
    sid, other = f"{prefix}-t", f"{prefix}-u"
    await server(fw, sid, 25620)
    await server(fw, other, 25621)

    async def token(**body: Any) -> str:
        response = await fw.post("/auth/tokens", json={"ttl": "1h", **body})
        assert response.status_code == 200, response.text
        return str(response.json()["token"])

    rule = {"container_id": sid, "protocol": "tcp", "action": "drop"}
    async with api_client(fw_node.url, await token(permissions=["read"])) as reader:
        response = await reader.post("/firewall/rules", json=rule)
        assert (response.status_code, response.json()["error"]) == (
            403,
            "Token lacks permission: manage",
        )
        assert (await reader.get(f"/firewall/rules/container/{sid}")).status_code == 200
    async with api_client(fw_node.url, await token(containers=[other])) as scoped:
        assert (await scoped.post("/firewall/rules", json=rule)).status_code == 401
        assert (await scoped.get(f"/firewall/rules/container/{sid}")).status_code == 401
        made = await add_rule(fw, **rule)
        assert (await scoped.delete(f"/firewall/rules/{made['id']}")).status_code == 401
        mine = await scoped.post("/firewall/rules", json={**rule, "container_id": other})
        assert mine.status_code == 201, mine.text
