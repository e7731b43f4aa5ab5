"""Pool values and their rules: addresses, port numbers, protocols, the ``network`` section.

No I/O here. Every value that enters the pool, from a request body, a URL or the
``PortPoolService`` interface, goes through one of the ``parse_*`` functions, so the
store only ever holds normalised values and the error messages are the contract's own
(``Invalid IP address: <ip>``, ``Invalid port: <port>``, ``Invalid protocol: <p>``).

Addresses: any IPv4 or IPv6 literal the ``ipaddress`` module accepts, stored in its
compressed form (``2001:DB8:0::1`` → ``2001:db8::1``); an IPv4-mapped IPv6 address is
the IPv4 address it maps (``::ffff:10.0.0.1`` → ``10.0.0.1``: one host address, one
identity); a zone (``fe80::1%eth0``) is refused, Docker cannot bind one. The wildcards
``0.0.0.0`` and ``::`` are ordinary entries. Pool order is by address (IPv4 first, then
IPv6, numerically), then port: ``ip_key`` is the sortable form the store indexes.

Protocols: an entry is ``tcp``, ``udp`` or ``both``; a request for ``tcp`` or ``udp`` is
served by an entry of the same protocol or a ``both`` one, a request for ``both`` only by
a ``both`` entry (``covers``).
"""

from __future__ import annotations

import functools
import ipaddress
import json

import attrs
from lightd import BadRequest, ValidationError

__all__ = [
    "DEPRECATED_KEYS",
    "PROTOCOLS",
    "NetworkConfig",
    "covers",
    "display",
    "echo",
    "ip_key",
    "parse_ip",
    "parse_path_port",
    "parse_port",
    "parse_protocol",
]

PROTOCOLS = ("tcp", "udp", "both")
#: Bits a protocol takes on an entry: two requests of one reservation may share a
#: ``both`` entry only when their bits do not overlap (tcp to one container port, udp to
#: another).
PROTOCOL_BITS = {"tcp": 1, "udp": 2, "both": 3}
_ECHO_LIMIT = 100


def echo(value: object) -> str:
    """A client's value, as an error message quotes it: strings as they are, anything
    else as JSON, both cut short so a huge value cannot bloat the answer."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "…"


def parse_ip(value: object) -> str:
    """A normalised IP address, or ``BadRequest("Invalid IP address: <value>")``."""
    if isinstance(value, str) and 2 <= len(value) <= 64:
        normal = _normal_ip(value)
        if normal is not None:
            return normal
    raise BadRequest(f"Invalid IP address: {echo(value)}", code="invalid_ip")


@functools.lru_cache(maxsize=4096)
def _normal_ip(text: str) -> str | None:
    """Cached: a node has few addresses, and reservations parse them on the hot path."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            return None
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return address.compressed


#: What an ``Invalid port`` answer adds in ``details`` (contract §1 [ext]).
PORT_DETAIL = "port must be an integer from 1 to 65535"


def parse_port(value: object, field: str = "port") -> int:
    """A port 1 to 65535 from a JSON integer. Any other JSON type (``"80"``, ``80.0``,
    ``true``, ``null``, ``[1]``) is the §1 field form ``<field>: must be an integer``; an
    integer out of range is §6's ``Invalid port: <value>``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"{field}: must be an integer")
    if 1 <= value <= 65535:
        return value
    raise BadRequest(f"Invalid port: {echo(value)}", code="invalid_port", details=[PORT_DETAIL])


def parse_path_port(text: str) -> int:
    """A port from a URL segment: ASCII digits only, then as ``parse_port``."""
    if text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535:
        return int(text)
    raise BadRequest(f"Invalid port: {echo(text)}", code="invalid_port", details=[PORT_DETAIL])


def parse_protocol(value: object) -> str:
    """``tcp``, ``udp`` or ``both`` (exactly, lower case), or
    ``BadRequest("Invalid protocol: <value>")``."""
    if isinstance(value, str) and value in PROTOCOLS:
        return value
    raise BadRequest(
        f"Invalid protocol: {echo(value)}",
        code="invalid_protocol",
        details=["protocol must be tcp, udp or both"],
    )


def covers(entry: str, wanted: str) -> bool:
    """Can a pool entry of protocol ``entry`` serve a request for ``wanted``?"""
    return entry == wanted or entry == "both"


def ip_key(ip: str) -> bytes:
    """Sort key of a normalised address: version byte, then the packed address."""
    address = ipaddress.ip_address(ip)
    return bytes((address.version,)) + address.packed


def display(ip: str, port: int) -> str:
    """``ip:port`` as messages write it; an IPv6 address in brackets (``[::1]:25565``)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


#: The ``network`` keys of the INPUT-chain firewall of earlier versions, and what replaced
#: each. They are accepted and ignored, with a warning at start.
DEPRECATED_KEYS = {
    "iptables": "firewall.iptables",
    "ip6tables": "firewall.iptables and firewall.ipv6",
    "firewall_chain": "firewall.chain",
    "firewall_parent": "firewall.parent",
    "firewall_timeout": "firewall.timeout",
}


@attrs.frozen
class NetworkConfig:
    """The ``network`` section of config.json (every key optional)."""

    #: Gate Docker-published traffic to pool ports in the firewall plugin's chain (hooked
    #: into ``DOCKER-USER``): ACCEPT an entry a container holds, DROP a free one. The
    #: ``firewall`` section says how iptables is run; ``firewall.enabled`` need not be on.
    manage_firewall: bool = False
    #: Deprecated (see ``DEPRECATED_KEYS``): accepted, ignored, warned about.
    iptables: str | None = None
    ip6tables: str | None = None
    firewall_chain: str | None = None
    firewall_parent: str | None = None
    firewall_timeout: float | None = None

    def deprecated(self) -> list[str]:
        """The deprecated keys the file sets."""
        return [key for key in DEPRECATED_KEYS if getattr(self, key) is not None]
