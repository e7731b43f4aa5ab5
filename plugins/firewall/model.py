"""Firewall rules and DDoS settings as values: the config section, the models, and the
checks that turn a request's fields into them (each failure a 400 naming the field).

Models are free of I/O and of iptables: ``ruleset.py`` renders them, ``state.py`` keeps
them. An address is stored normalised (``2001:DB8::1`` → ``2001:db8::1``, ``10.0.0.7/24``
→ ``10.0.0.0/24``; a single address without its ``/32``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

import attrs
from lightd import BadRequest, field_check

__all__ = [
    "ACTIONS",
    "PROTOCOLS",
    "Ddos",
    "FirewallConfig",
    "RateLimit",
    "Rule",
    "parse_ddos",
    "parse_rule_fields",
]

PROTOCOLS = ("tcp", "udp", "icmp", "all")
ACTIONS = ("accept", "drop", "reject")

#: Highest ``requests`` of a rate limit (hashlimit's burst) and longest ``per_seconds``.
MAX_REQUESTS = 100_000
MAX_PER_SECONDS = 86_400
#: Highest ``connection_limit`` of the DDoS settings.
MAX_CONNECTIONS = 1_000_000

_CHAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,11}")
_PARENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,27}")

Protocol = Literal["tcp", "udp", "icmp", "all"]
Action = Literal["accept", "drop", "reject"]


def _program(value: object) -> bool:
    return isinstance(value, str) and bool(value) and "\x00" not in value


@attrs.frozen
class FirewallConfig:
    """The ``firewall`` section of config.json (every key optional)."""

    #: Serve the routes and keep the rules in the kernel. While false every route
    #: answers 409 and the agent does not touch iptables, unless the port pool's
    #: ``network.manage_firewall`` asks for its rules (then only those are applied).
    enabled: bool = False
    #: ``auto`` (the variant whose tables hold Docker's ``DOCKER-USER``, else the one
    #: ``iptables --version`` names), ``nft``, ``legacy``, or a program name or path.
    iptables: str = attrs.field(default="auto", validator=field_check(_program, "must be a name"))
    #: Also manage IPv6 (``ip6tables`` of the same variant): rules with an IPv6 source and
    #: servers published on IPv6 addresses.
    ipv6: bool = True
    #: An argument vector every iptables call is run behind, e.g. ``["ip", "netns",
    #: "exec", "test-ns"]`` (the tests run the firewall in a namespace of their own).
    command_prefix: list[str] = attrs.field(
        factory=list,
        validator=field_check(lambda v: all(_program(a) for a in v), "must be strings"),
    )
    #: The agent's chain (server chains are ``<chain>-<10 hex>``, their parts
    #: ``<chain>-<10 hex>-<n>``): 1-12 characters of ``A-Z a-z 0-9 _ . -``.
    chain: str = attrs.field(
        default="LIGHTD-FW",
        validator=field_check(
            lambda v: bool(_CHAIN.fullmatch(v)), "must be 1-12 characters of A-Z a-z 0-9 _ . -"
        ),
    )
    #: The chain that jumps to ``chain`` first thing: Docker's ``DOCKER-USER``, which
    #: ``FORWARD`` runs before Docker's own rules for published ports.
    parent: str = attrs.field(
        default="DOCKER-USER",
        validator=field_check(
            lambda v: bool(_PARENT.fullmatch(v)), "must be 1-28 characters of A-Z a-z 0-9 _ . -"
        ),
    )
    #: Seconds one iptables call may take (it waits for the xtables lock meanwhile).
    timeout: float = attrs.field(
        default=10.0, validator=field_check(lambda v: v > 0, "must be > 0")
    )
    #: SYN flood protection: new TCP connections per second a server accepts from all
    #: sources together, and the burst above that rate.
    syn_rate: int = attrs.field(
        default=200, validator=field_check(lambda v: 1 <= v <= 1_000_000, "must be 1-1000000")
    )
    syn_burst: int = attrs.field(
        default=400, validator=field_check(lambda v: 1 <= v <= MAX_REQUESTS, "must be 1-100000")
    )
    #: Most rules one server may have (``409 Too many firewall rules``).
    max_rules: int = attrs.field(
        default=10_000, validator=field_check(lambda v: v >= 1, "must be at least 1")
    )


@attrs.frozen
class RateLimit:
    """``requests`` per ``per_seconds``, per source address."""

    requests: int
    per_seconds: int

    def to_json(self) -> dict[str, int]:
        return {"requests": self.requests, "per_seconds": self.per_seconds}


@attrs.frozen
class Rule:
    """One rule of a server. ``source_ip`` normalised; ``None`` fields match anything."""

    id: str
    container_id: str
    protocol: Protocol
    action: Action
    source_ip: str | None = None
    source_port: int | None = None
    dest_port: int | None = None
    rate_limit: RateLimit | None = None
    description: str | None = None
    enabled: bool = True
    created_at: int = 0

    @property
    def family(self) -> int | None:
        """4 or 6 when the source says so; ``None``: both."""
        if self.source_ip is None:
            return None
        return ipaddress.ip_network(self.source_ip).version

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "container_id": self.container_id,
            "source_ip": self.source_ip,
            "source_port": self.source_port,
            "dest_port": self.dest_port,
            "protocol": self.protocol,
            "action": self.action,
            "rate_limit": None if self.rate_limit is None else self.rate_limit.to_json(),
            "description": self.description,
            "enabled": self.enabled,
            "created_at": self.created_at,
        }


@attrs.frozen
class Ddos:
    """A server's DDoS settings (``POST /firewall/ddos/:internal_id``)."""

    enabled: bool
    syn_flood_protection: bool = True
    #: Concurrent TCP connections per source address.
    connection_limit: int | None = None
    #: New connections per source address.
    rate_limit: RateLimit | None = None

    @property
    def active(self) -> bool:
        return self.enabled and (
            self.syn_flood_protection
            or self.connection_limit is not None
            or self.rate_limit is not None
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "syn_flood_protection": self.syn_flood_protection,
            "connection_limit": self.connection_limit,
            "rate_limit": None if self.rate_limit is None else self.rate_limit.to_json(),
        }


def _bad(field: str, what: str) -> BadRequest:
    return BadRequest(f"{field}: {what}", code="invalid_field")


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(field, f"must be an integer from {low} to {high}")
    return value


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if value is None:
        raise _bad(field, "is required")
    if not isinstance(value, str) or value.lower() not in choices:
        raise _bad(field, f"must be {', '.join(choices[:-1])} or {choices[-1]}")
    return value.lower()


def parse_source(value: object) -> str | None:
    """An address or CIDR, normalised; ``None`` for absent."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 64:
        raise _bad("source_ip", "must be an IPv4 or IPv6 address or CIDR")
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _bad("source_ip", "must be an IPv4 or IPv6 address or CIDR") from None
    if network.num_addresses == 1:
        return network.network_address.compressed
    return network.compressed


def parse_rate(value: object, field: str = "rate_limit") -> RateLimit | None:
    """``{"requests", "per_seconds"}`` of positive integers; ``None`` for absent."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad(field, "must be an object with requests and per_seconds")
    for key in ("requests", "per_seconds"):
        if key not in value:
            raise _bad(f"{field}.{key}", "is required")
    return RateLimit(
        _int(value["requests"], f"{field}.requests", 1, MAX_REQUESTS),
        _int(value["per_seconds"], f"{field}.per_seconds", 1, MAX_PER_SECONDS),
    )


def _description(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 1000:
        raise _bad("description", "must be a string of at most 1000 characters")
    return value


def parse_rule_fields(body: Any, *, rule_id: str, created_at: int) -> Rule:
    """A rule from ``POST /firewall/rules``'s body (already a ``RuleBody``)."""
    container_id = body.container_id
    if container_id is None:
        raise _bad("container_id", "is required")
    if not isinstance(container_id, str) or not container_id:
        raise _bad("container_id", "must be a non-empty string")
    protocol = _choice(body.protocol, "protocol", PROTOCOLS)
    action = _choice(body.action, "action", ACTIONS)
    source_ip = parse_source(body.source_ip)
    ports: dict[str, int | None] = {}
    for name in ("source_port", "dest_port"):
        raw = getattr(body, name)
        ports[name] = None if raw is None else _int(raw, name, 1, 65535)
        if ports[name] is not None and protocol == "icmp":
            raise _bad(name, "cannot be used with protocol icmp")
    return Rule(
        id=rule_id,
        container_id=container_id,
        protocol=protocol,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        source_ip=source_ip,
        source_port=ports["source_port"],
        dest_port=ports["dest_port"],
        rate_limit=parse_rate(body.rate_limit),
        description=_description(body.description),
        enabled=True,
        created_at=created_at,
    )


def parse_ddos(body: Any) -> Ddos:
    """The DDoS settings from ``POST /firewall/ddos/:internal_id``'s body (a ``DdosBody``).

    ``rate_limit`` is ``{"requests","per_seconds"}`` or [alias] a bare integer: new
    connections per second."""
    if body.enabled is None:
        raise _bad("enabled", "is required")
    if not isinstance(body.enabled, bool):
        raise _bad("enabled", "must be true or false")
    syn = body.syn_flood_protection
    if syn is not None and not isinstance(syn, bool):
        raise _bad("syn_flood_protection", "must be true or false")
    limit = body.connection_limit
    if limit is not None:
        limit = _int(limit, "connection_limit", 1, MAX_CONNECTIONS)
    rate = body.rate_limit
    if isinstance(rate, int) and not isinstance(rate, bool):
        rate = RateLimit(_int(rate, "rate_limit", 1, MAX_REQUESTS), 1)
    else:
        rate = parse_rate(rate)
    return Ddos(
        enabled=body.enabled,
        syn_flood_protection=True if syn is None else syn,
        connection_limit=limit,
        rate_limit=rate,
    )
