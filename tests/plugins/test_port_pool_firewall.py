"""``network.manage_firewall``: the pool gates the traffic Docker forwards to its ports, in
the firewall plugin's chain hooked into ``DOCKER-USER`` (never ``INPUT``).

A port a container holds is accepted (after the server's own firewall rules), a free one
dropped, one marked in use by hand left to the host. The rules are judged by real
connections in namespaces of the test's own (``tests/plugins/netns.py``: a client, a
host doing Docker's DNAT and ``FORWARD -j DOCKER-USER``, a server); the agent's iptables
calls run in the host namespace (``firewall.command_prefix``), never in the machine's
tables. "The host's own policy" is a ``DROP`` the test appends to ``DOCKER-USER``, as a
host firewall such as ufw-docker does.
"""

# The containers fixtures (start_node, prefix…) are imported, then named as arguments.
# ruff: noqa: F811

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from lightd import PORT_FIREWALL, PORT_POOL, PortAccess, PortRequest
from lightd.config import load_config
from lightd.errors import ConfigError
from lightd.plugins.firewall import ENGINE
from lightd.plugins.port_pool import POOL, NetworkConfig

from ..conftest import RunningAgent, StartAgent, api_client, wait_for
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
from .netns import CLIENT_IP, HOST_IP, Network, connect, serve

SKIP = netns.usable()
needs_netns = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

HOST_DROP = ("DOCKER-USER", "-j", "DROP")


# --- config --------------------------------------------------------------------------


def test_the_network_section_is_validated(make_config: Callable[..., Path]) -> None:
    path = make_config({"network": {"manage_firewall": "yes"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, {"network": NetworkConfig})
    assert info.value.key == "network.manage_firewall"
    assert "must be true or false" in info.value.message


async def test_the_keys_of_the_input_chain_version_are_accepted_and_ignored(
    start_agent: StartAgent, make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    old = {
        "iptables": "/usr/sbin/iptables",
        "ip6tables": "ip6tables",
        "firewall_chain": "LIGHTD-PORTS",
        "firewall_parent": "INPUT",
        "firewall_timeout": 5,
    }
    running = await start_agent(make_config({"network": old}))
    for key in old:
        assert f"config: network.{key} is deprecated and ignored" in caplog.text, key
    assert "(see firewall.parent)" in caplog.text
    # Ignored: without manage_firewall nothing follows the pool and iptables never runs.
    firewall = running.agent.stash[ENGINE]
    assert firewall.port_source is None and not firewall.active and firewall.passes == 0


async def test_without_the_firewall_plugin_it_is_a_warning(
    start_agent: StartAgent, make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    overrides = {"network": {"manage_firewall": True}, "plugins": {"disabled": ["firewall"]}}
    path = make_config(overrides)
    running = await start_agent(path)
    assert "the firewall plugin is not loaded: pool ports get no firewall rules" in caplog.text
    assert running.agent.stash.get(PORT_FIREWALL) is None
    async with api_client(running.url) as c:
        assert (await c.post("/network/ports", json={"ip": "::1", "port": 80})).status_code == 200


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
    assert running.agent.stash[ENGINE].port_source is None


async def test_what_the_pool_asks_of_the_firewall(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    """Held: open; free: closed; marked in use by hand: no rule. Every change that moves
    an entry between those tells the firewall (which, with no iptables here, only counts)."""
    running = await start_agent(make_config())
    pool = running.agent.stash[POOL]
    changes: list[int] = []
    pool.on_change = lambda: changes.append(1)
    async with api_client(running.url) as c:
        response = await c.post(
            "/network/ports/bulk", json={"ip": "10.0.0.1", "start": 1, "end": 3, "protocol": "both"}
        )
        assert response.status_code == 200, response.text
        await c.post("/network/ports", json={"ip": "::", "port": 9, "protocol": "udp"})
        await pool.reserve("srv-a", [PortRequest("10.0.0.1", 1), PortRequest("::", 9, "udp")])
        await c.put("/network/ports/10.0.0.1/2/use", json={"in_use": True})
        assert sorted(await pool.port_access(), key=lambda a: a.port) == [
            PortAccess("10.0.0.1", 1, "both", True),
            PortAccess("10.0.0.1", 3, "both", False),
            PortAccess("::", 9, "udp", True),
        ]
        await pool.replace("srv-a", [PortRequest("10.0.0.1", 3)])
        await pool.release("srv-a")
        await pool.release("srv-a")  # nothing held: nothing changed
        await c.delete("/network/ports/10.0.0.1/1")
    assert len(changes) == 7
    assert sorted(await pool.port_access(), key=lambda a: a.port) == [
        PortAccess("10.0.0.1", 3, "both", False),
        PortAccess("::", 9, "udp", False),
    ]


# --- in the namespaces ---------------------------------------------------------------


@pytest.fixture
def net() -> Iterator[Network]:
    if SKIP is not None:
        pytest.skip(SKIP)
    with netns.network() as created:
        yield created


@pytest.fixture
async def listening(net: Network) -> AsyncIterator[list[trio.socket.SocketType]]:
    """The server namespace listens on 30000 (what every published port leads to)."""
    held: list[trio.socket.SocketType] = []
    listener = net.listen(30000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, listener, held)
        yield held
        nursery.cancel_scope.cancel()
    for sock in held:
        sock.close()


def pool_config(net: Network, **firewall: Any) -> dict[str, Any]:
    return {
        "network": {"manage_firewall": True},
        "firewall": {"command_prefix": net.prefix, **firewall},
    }


async def reaches(net: Network, port: int, outcome: str) -> None:
    """Wait until a client's connection to ``HOST_IP:port`` ends as ``outcome``."""

    async def check() -> bool:
        return await connect(net, port, within=0.3) == outcome

    await wait_for(check, what=f"port {port} to be {outcome}")


async def outbound(net: Network, port: int) -> str:
    """The server connects out to the client's ``port`` (forwarded by the host, not
    DNATed): ``connected`` or ``timeout``."""

    def make_listener() -> socket.socket:
        sock = socket.socket()
        sock.bind((CLIENT_IP, port))
        sock.listen(4)
        return sock

    listener = netns.in_netns(net.client, make_listener)
    sock = trio.socket.from_stdlib_socket(netns.in_netns(net.server, socket.socket))
    try:
        with trio.move_on_after(0.5):
            await sock.connect((CLIENT_IP, port))
            return "connected"
        return "timeout"
    finally:
        sock.close()
        listener.close()


def listing(net: Network, chain: str) -> list[str]:
    return net.iptables("-S", chain).stdout.splitlines()


@needs_netns
async def test_pool_ports_gate_forwarded_traffic(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    net: Network,
    listening: list[Any],
) -> None:
    for port in (25565, 25566, 25567, 25568, 25569):
        net.publish(port, 30000)
    assert await connect(net, 25565) == "connected"
    path = make_config(pool_config(net), name="poolfw")
    running = await start_agent(path)
    pool = running.agent.stash[PORT_POOL]
    async with api_client(running.url) as c:
        body = {"ip": HOST_IP, "start": 25565, "end": 25567}
        added = await c.post("/network/ports/bulk", json=body)
        assert added.status_code == 200, added.text
        await c.post("/network/ports", json={"ip": "0.0.0.0", "port": 25569})
        # Free pool ports are closed, whatever publishes them; others are not ours.
        await reaches(net, 25565, "timeout")
        assert await connect(net, 25569, within=0.3) == "timeout"  # the wildcard entry
        assert await connect(net, 25568) == "connected"
        # A connection out of a container to someone's 25569 is not a client of ours.
        assert await outbound(net, 25569) == "connected"

        await pool.reserve("srv-a", [PortRequest(HOST_IP, 25565)])
        await reaches(net, 25565, "connected")
        marked = await c.put(f"/network/ports/{HOST_IP}/25566/use", json={"in_use": True})
        assert marked.status_code == 200
        await reaches(net, 25566, "connected")

        # The host drops forwarded traffic after the agent's chain: the held port still
        # gets through, the port marked by hand and the one outside the pool do not.
        net.iptables("-A", *HOST_DROP)
        assert await connect(net, 25565) == "connected"
        assert await connect(net, 25566, within=0.3) == "timeout"
        assert await connect(net, 25568, within=0.3) == "timeout"
        net.iptables("-D", *HOST_DROP)

        await pool.release("srv-a")
        await reaches(net, 25565, "timeout")
        await c.delete(f"/network/ports/{HOST_IP}/25567")
        await reaches(net, 25567, "connected")

        # The firewall's own routes stay off: only the pool's rules are applied.
        response = await c.post("/firewall/rules", json={"container_id": "x"})
        assert response.json()["error"] == "Firewall management is disabled"
    # Never the host's INPUT chain.
    assert listing(net, "INPUT") == ["-P INPUT ACCEPT"]
    assert "-A DOCKER-USER -j LIGHTD-FW" in listing(net, "DOCKER-USER")

    # Restarted on a host that lost its rules meanwhile: applied again before the agent
    # reports ready.
    await running.stop()
    net.iptables("-D", "DOCKER-USER", "-j", "LIGHTD-FW")
    net.iptables("-F", "LIGHTD-FW")
    assert await connect(net, 25565) == "connected"
    again = await start_agent(path)
    assert await connect(net, 25565, within=0.3) == "timeout"
    await again.agent.stash[PORT_POOL].reserve("srv-b", [PortRequest(HOST_IP, 25565)])
    await again.agent.stash[PORT_FIREWALL].apply_ports()
    assert await connect(net, 25565) == "connected"


@needs_netns
async def test_a_servers_rules_come_before_the_pools_accept(
    start_node: StartNode, net: Network, listening: list[Any], prefix: str
) -> None:
    node = await start_node(pool_config(net, enabled=True))
    sid = f"{prefix}-g"
    async with api_client(node.url) as api:
        assert (await api.post("/network/ports", json={"ip": HOST_IP, "port": 25580})).is_success
        ports = [{"ip": HOST_IP, "port": 25580, "protocol": "tcp", "container_port": 30000}]
        response = await create(api, sid, ports=ports)
        assert response.status_code == 200, response.text
        await wait_state(api, sid, install_state="ready")
        net.publish(25580, 30000)
        net.iptables("-A", *HOST_DROP)
        await reaches(net, 25580, "connected")  # held: accepted before the host's drop

        async def rule(**body: Any) -> str:
            made = await api.post("/firewall/rules", json={"container_id": sid, **body})
            assert made.status_code == 201, made.text
            return str(made.json()["rule"]["id"])

        # The server's reject decides before the pool's accept...
        reject = await rule(source_ip=CLIENT_IP, protocol="tcp", action="reject")
        assert await connect(net, 25580) == "refused"
        # ...and its accept (a return from the server's chain) leads on to it.
        await api.delete(f"/firewall/rules/{reject}")
        await rule(source_ip=CLIENT_IP, protocol="tcp", action="accept")
        assert await connect(net, 25580) == "connected"
        await rule(protocol="tcp", action="drop")
        assert await connect(net, 25580) == "connected"  # the accept came first

        # Deleting the server frees its port: closed from then on.
        net.iptables("-D", *HOST_DROP)
        assert (await api.delete(f"/containers/{sid}")).status_code == 200
        await node.agent.stash[PORT_FIREWALL].apply_ports()
        assert await connect(net, 25580, within=0.3) == "timeout"
    assert not [line for line in listing(net, "LIGHTD-FW") if "-j LIGHTD-FW-" in line]


@needs_netns
async def test_a_failing_iptables_is_logged_and_retried(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    net: Network,
    listening: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A leftover chain of the agent's that something still jumps to cannot be deleted:
    the whole restore is refused (nothing half applied), logged, and retried."""
    net.publish(25590, 30000)
    net.iptables("-N", "LIGHTD-FW-STRAY")
    net.iptables("-A", "FORWARD", "-j", "LIGHTD-FW-STRAY")
    path = make_config(pool_config(net))
    first = await start_agent(path)
    async with api_client(first.url) as c:
        await c.post("/network/ports", json={"ip": HOST_IP, "port": 25590})
    await first.stop()
    running = await start_agent(path)
    firewall = running.agent.stash[ENGINE]
    assert "LIGHTD-FW-STRAY" in (firewall.last_error or "")  # iptables' own words
    assert "firewall: rules could not be applied (retrying)" in caplog.text
    assert await connect(net, 25590) == "connected"  # the free port is not closed yet
    net.iptables("-D", "FORWARD", "-j", "LIGHTD-FW-STRAY")
    await reaches(net, 25590, "timeout")  # retried after a back-off, and applied
    assert firewall.last_error is None
    assert "-N LIGHTD-FW-STRAY" not in net.iptables("-S").stdout.splitlines()
