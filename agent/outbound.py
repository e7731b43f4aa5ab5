"""Outbound connections to addresses a client chose, guarded against request forgery.

The agent runs on the host, often next to a cloud metadata service, a Docker engine, a
panel and databases on private addresses. A URL chosen by a client (a file manager pull,
§13; a transfer's ``target_url``, §20) must never reach any of them: peers' advisories
(GHSA-6rg3-8h8x-5xfv, GHSA-qq22-jj8x-4wwv) show that a filter which checks the host name
and then lets the HTTP client resolve it again is bypassed by DNS rebinding and redirects.

So the check lives where the connection is made: ``GuardedBackend`` is an httpcore
network backend (``httpcore.AsyncConnectionPool(network_backend=...)``) that resolves the
host once, refuses unless every address is public (``is_public_address``) or inside the
networks config allows, and connects to the checked address itself, so nothing resolves
the name a second time. Callers follow redirects themselves, each through the same pool.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Sequence
from typing import Any

import httpcore
import trio

__all__ = [
    "DESTINATION_NOT_ALLOWED",
    "DestinationNotAllowed",
    "GuardedBackend",
    "IPAddress",
    "IPNetwork",
    "address_permitted",
    "embedded_ipv4",
    "is_public_address",
    "literal_address",
    "parse_networks",
    "valid_cidrs",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Resolving a host, when httpcore gives no timeout of its own.
CONNECT_TIMEOUT = 15.0
DESTINATION_NOT_ALLOWED = "Destination not allowed"


class DestinationNotAllowed(Exception):
    """A connection refused by ``GuardedBackend``: the host resolves to an address that is
    neither public nor allowed by config (its argument is the host)."""

    def __str__(self) -> str:
        return DESTINATION_NOT_ALLOWED


# --- addresses -----------------------------------------------------------------------------

#: Never a public destination, whatever ``ipaddress`` of this Python thinks of them
#: (its ``is_global`` tables changed between releases): IANA special-purpose registries.
_SPECIAL_V4 = tuple(
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",  # "this network"
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (CGNAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local: cloud metadata lives here
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.31.196.0/24",  # AS112
        "192.52.193.0/24",  # AMT
        "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
        "192.168.0.0/16",
        "192.175.48.0/24",  # AS112 direct delegation
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the broadcast address
    )
)
_SPECIAL_V6 = tuple(
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",  # unspecified, loopback, IPv4-compatible (deprecated)
        "::ffff:0:0/96",  # IPv4-mapped
        "::ffff:0:0:0/96",  # IPv4-translated
        "64:ff9b:1::/48",  # local-use IPv4/IPv6 translation
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments: Teredo, benchmarking, ORCHID...
        "2001:db8::/32",  # documentation
        "2002::/16",  # 6to4 (its embedded IPv4 is judged too, see embedded_ipv4)
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated)
        "ff00::/8",  # multicast
    )
)
#: NAT64's well-known prefix: a public IPv6 address whose last 32 bits are an IPv4 one.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and reaches (mapped, 6to4, Teredo client,
    NAT64, IPv4-compatible), if any: ``::ffff:127.0.0.1`` is loopback, and a NAT64
    gateway turns ``64:ff9b::a00:1`` into ``10.0.0.1``."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    packed = ip.packed
    if ip in _NAT64 or (packed[:12] == bytes(12) and int(ip) > 1):
        return ipaddress.IPv4Address(packed[12:])
    return None


def is_public_address(ip: IPAddress) -> bool:
    """Whether an outbound fetch may connect to ``ip`` without config allowing it: a global
    unicast address, nothing private, loopback, link-local, multicast, reserved,
    unspecified, shared (CGNAT), documentation or benchmarking, and no IPv6 form of
    such an IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            return False
        inner = embedded_ipv4(ip)
        if inner is not None and not is_public_address(inner):
            return False
        if ip in _NAT64:  # in the reserved ::/8, yet how IPv6-only nodes reach IPv4
            return inner is not None
        special: Sequence[IPNetwork] = _SPECIAL_V6
    else:
        special = _SPECIAL_V4
    if any(ip in net for net in special):
        return False
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def address_permitted(ip: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    """Public, or inside one of the networks config allows (an IPv4-mapped IPv6 address
    counts as its IPv4 address for that)."""
    candidates: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        candidates.append(ip.ipv4_mapped)
    for candidate in candidates:
        if any(candidate.version == net.version and candidate in net for net in allowed):
            return True
    return is_public_address(ip)


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    """A config list of CIDRs (``files.pull_allowed_cidrs``, ``transfer.allowed_cidrs``) as
    networks (host bits are dropped)."""
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def valid_cidrs(value: object) -> bool:
    """Config check: a list of CIDRs (``"10.1.2.0/24"``, ``"::1/128"``, a bare address)."""
    if not isinstance(value, list | tuple):
        return False
    try:
        parse_networks([str(v) for v in value if isinstance(v, str)])
    except ValueError:
        return False
    return all(isinstance(v, str) for v in value)


_INET_ATON = re.compile(r"[0-9a-fx.]+", re.ASCII | re.IGNORECASE)


def literal_address(host: str) -> IPAddress | None:
    """The address a URL's host names without any lookup: an IP literal, including the
    forms the C resolver also takes (``127.1``, ``0x7f000001``, ``2130706433``)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _INET_ATON.fullmatch(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _address(text: str) -> IPAddress:
    """A resolved address (``fe80::1%eth0`` keeps its scope: never public)."""
    return ipaddress.ip_address(text)


# --- the guarded network backend -----------------------------------------------------------


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's trio backend behind a check: every TCP connection resolves its host
    once, refuses unless every address is ``permitted``, and connects to a checked
    address (DNS rebinding gets no second lookup to change)."""

    def __init__(
        self,
        allowed: Sequence[IPNetwork],
        *,
        refuse: Callable[[str], BaseException] = DestinationNotAllowed,
    ) -> None:
        self._allowed = list(allowed)
        #: Makes the exception a refused connection raises, from the host it named (a
        #: job raises its own failure; the default is ``DestinationNotAllowed``).
        self._refuse = refuse
        self._inner = httpcore.TrioBackend()
        #: The addresses connected to, in order (for logs and tests).
        self.connected: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:
        literal = literal_address(host)
        if literal is not None:
            return [str(literal)]
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        found: list[str] = []
        for info in infos:
            text = str(info[4][0])
            if text not in found:
                found.append(text)
        return found

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        with trio.move_on_after(CONNECT_TIMEOUT if timeout is None else timeout) as bound:
            found = await self.resolve(host, port)
        if bound.cancelled_caught:
            raise httpcore.ConnectTimeout(f"cannot resolve {host}: timed out")
        if not found:
            raise httpcore.ConnectError(f"cannot resolve {host}")
        addresses = [_address(text) for text in found]
        if not all(address_permitted(ip, self._allowed) for ip in addresses):
            raise self._refuse(host)
        error: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for ip in addresses:
            try:
                stream = await self._inner.connect_tcp(
                    str(ip), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
                continue
            self.connected.append(str(ip))
            return stream
        assert error is not None
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        raise self._refuse(path)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)
