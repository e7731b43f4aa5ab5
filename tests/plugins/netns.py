"""A small network in namespaces of its own, shaped like a Docker host, for the firewall.

Three named namespaces (``ip netns``): a *client*, a *host* that routes between the two
others, and a *server*. The host does what Docker does for a published port: ``DNAT``
from ``HOST_IP:<published>`` to ``SERVER_IP:<container port>`` in ``nat PREROUTING``,
and ``FORWARD -j DOCKER-USER``. The agent's firewall runs its iptables calls in the host
namespace (``firewall.command_prefix = ip netns exec <host>``), never in the machine's own.

Sockets are made inside a namespace by a short-lived thread that enters it (``setns``
affects only the calling thread) and are then used from trio as usual: a socket stays in
the namespace it was made in.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")

CLIENT_IP = "10.77.1.2"
HOST_IP = "10.77.1.1"
HOST_INNER_IP = "10.77.2.1"
SERVER_IP = "10.77.2.2"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def usable() -> str | None:
    """Why the namespace tests cannot run here (``None``: they can)."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iptables", "iptables-restore"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` run by a thread inside namespace ``name``."""
    result: list[Any] = []

    def enter() -> None:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            result.append(fn())
        except BaseException as exc:  # handed to the caller
            result.append(exc)
        finally:
            os.close(fd)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]  # type: ignore[no-any-return]


class Network:
    """The three namespaces; ``publish`` adds a published port."""

    def __init__(self, variant: str = "iptables") -> None:
        tag = secrets.token_hex(3)
        self.client, self.host, self.server = (f"lfw{tag}{x}" for x in "chs")
        #: The program the "Docker" of this host uses (``iptables`` or ``iptables-legacy``).
        self.variant = variant
        self.listeners: list[socket.socket] = []

    def create(self) -> None:
        for name in (self.client, self.host, self.server):
            run("ip", "netns", "add", name)
        tag = self.client[3:9]
        a, b, c, d = f"vc{tag}", f"vh{tag}", f"vs{tag}", f"vi{tag}"
        run(
            "ip",
            "link",
            "add",
            a,
            "netns",
            self.client,
            "type",
            "veth",
            "peer",
            b,
            "netns",
            self.host,
        )
        run(
            "ip",
            "link",
            "add",
            c,
            "netns",
            self.server,
            "type",
            "veth",
            "peer",
            d,
            "netns",
            self.host,
        )
        for ns, dev, address in (
            (self.client, a, f"{CLIENT_IP}/24"),
            (self.host, b, f"{HOST_IP}/24"),
            (self.host, d, f"{HOST_INNER_IP}/24"),
            (self.server, c, f"{SERVER_IP}/24"),
        ):
            run("ip", "-n", ns, "addr", "add", address, "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", self.client, "route", "add", "default", "via", HOST_IP)
        run("ip", "-n", self.server, "route", "add", "default", "via", HOST_INNER_IP)
        self.exec("sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.iptables("-N", "DOCKER-USER")
        self.iptables("-A", "FORWARD", "-j", "DOCKER-USER")

    def delete(self) -> None:
        for listener in self.listeners:
            listener.close()
        for name in (self.client, self.host, self.server):
            run("ip", "netns", "del", name, check=False)

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a program in the host namespace."""
        return run("ip", "netns", "exec", self.host, *argv, check=check)

    def iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.exec(self.variant, "-w", *args, check=check)

    @property
    def prefix(self) -> list[str]:
        """``firewall.command_prefix`` for an agent whose iptables run in the host."""
        return ["ip", "netns", "exec", self.host]

    def publish(self, port: int, container_port: int, protocol: str = "tcp") -> None:
        """What Docker does for ``-p HOST_IP:port:container_port``."""
        self.iptables(
            "-t", "nat", "-A", "PREROUTING", "-d", HOST_IP, "-p", protocol,
            "--dport", str(port), "-j", "DNAT", "--to-destination", f"{SERVER_IP}:{container_port}",
        )  # fmt: skip

    def listen(self, port: int) -> trio.socket.SocketType:
        """A TCP listener of the server namespace."""

        def make() -> socket.socket:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen(1024)
            return sock

        sock = in_netns(self.server, make)
        self.listeners.append(sock)
        return trio.socket.from_stdlib_socket(sock)

    def client_socket(self, kind: int = socket.SOCK_STREAM) -> trio.socket.SocketType:
        return trio.socket.from_stdlib_socket(
            in_netns(self.client, lambda: socket.socket(type=kind))
        )


async def serve(listener: trio.socket.SocketType, held: list[trio.socket.SocketType]) -> None:
    """Accept connections and keep them open (``held``) until cancelled."""
    while True:
        conn, _ = await listener.accept()
        held.append(conn)


async def connect(network: Network, port: int, *, within: float = 0.5) -> str:
    """One TCP connection attempt from the client: ``connected``, ``refused`` or
    ``timeout`` (a dropped SYN); the connection is closed at once."""
    sock = network.client_socket()
    try:
        with trio.move_on_after(within):
            try:
                await sock.connect((HOST_IP, port))
            except OSError as exc:
                if exc.errno == errno.ECONNREFUSED:
                    return "refused"
                raise
            return "connected"
        return "timeout"
    finally:
        sock.close()


@contextmanager
def network(variant: str = "iptables") -> Iterator[Network]:
    net = Network(variant)
    try:
        net.create()
        yield net
    finally:
        net.delete()
