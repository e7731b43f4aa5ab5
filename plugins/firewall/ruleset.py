"""What the kernel gets: the agent's chains rendered as ``iptables-restore`` input.

Pure functions, no I/O. The layout, per address family::

    DOCKER-USER  -j LIGHTD-FW                        (first rule; the parent is configurable)
    LIGHTD-FW    one rule per published port of a server that has rules or DDoS settings:
                 -p tcp -m conntrack --ctstate DNAT --ctdir ORIGINAL [--ctorigdst <host ip>]
                    --ctorigdstport <host port> -j LIGHTD-FW-<10 hex of the server>
                 then, with the port pool's ``network.manage_firewall``, one rule per pool
                 entry (same match, both directions): ``-j ACCEPT`` for an entry a
                 container holds, ``-j DROP`` for a free one (one marked in use by hand
                 gets none)
    LIGHTD-FW-<server>   DDoS rules (INVALID drop, SYN meter, connlimit, new-connection
                 meter), then the server's enabled rules in creation order

``DOCKER-USER`` sees forwarded traffic *after* Docker's DNAT: the destination is already
the container's address and port, both of which change with a recreate. The original
destination (the published host address and port, what the panel knows and what the
rules name as ``dest_port``) is still in the connection's conntrack entry, so the
dispatch matches ``--ctorigdst``/``--ctorigdstport`` with ``--ctdir ORIGINAL`` (a reply
from the server carries the same original tuple and must not be judged as if it were a
client's packet). Nothing here depends on the container's address: a recreate changes
nothing, only a rebind (new host ports) does. ``--ctstate DNAT`` keeps the match to
connections Docker's DNAT sent on (a published port): a container's own connection out
to some address's port 25565 is forwarded too, with the same original port, and is not a
client of the server publishing 25565.

``accept`` is ``RETURN``: back to the dispatch, which the server's chain was called from
(``-j``), where the pool's rule for the port (if any) comes next, then back to
``DOCKER-USER``, whose end hands the packet to Docker's own rules. A rule can end its
server's list early; it never opens what Docker would not. ``reject`` of TCP answers a
reset (the client sees "connection refused"). The pool's ``ACCEPT`` ends the ``FORWARD``
chain (Docker's rules would accept a published port anyway): a host whose own
``DOCKER-USER`` rules (after the agent's jump) drop forwarded traffic still reaches the
game servers; its ``DROP`` closes a free pool port that something still publishes.

Rate limits are ``hashlimit`` meters per source address (for TCP they count new
connections, for other protocols packets); the SYN meter is one bucket per server, and
``connlimit`` counts a source's concurrent TCP connections. Meter names are derived from
the rule and its rate, so a changed rate gets a fresh meter.

Long lists stay cheap: ``iptables-nft`` evaluates rules one by one, and 1 000 rules on
a server would double its connection setup time. A list longer than ``LEAF`` becomes a
binary tree of chains split on the source address (``-s 10.0.0.0/9 -g …``), each leaf
holding, in order, exactly the rules whose source can match there (a rule without a
source is in every leaf), so a packet meets O(log n + LEAF) rules and the first-match
outcome is the one of the flat list. The dispatch of many ports is split the same way on
the port (``--ctorigdstport 0:32767``).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence

import attrs
from lightd import PoolPort, PortAccess

from .model import Ddos, FirewallConfig, RateLimit, Rule

__all__ = [
    "LEAF",
    "Rendered",
    "dispatch_chains",
    "hashlimit_name",
    "owned",
    "port_lines",
    "rate_spec",
    "render_restore",
    "server_chain",
    "server_chains",
]

#: Most rules a chain of the tree holds before it is split, and into how many parts.
LEAF = 16
FANOUT = 4
#: Most levels of a server's tree and of the dispatch's: with FORWARD → DOCKER-USER →
#: the base chain → (dispatch tree) → the server's chain → (its tree), 15 in all.
SERVER_DEPTH = 8
DISPATCH_DEPTH = 4

Args = list[str]
#: Chain name → its rules (the arguments after ``-A <chain>``), in order.
Chains = dict[str, list[Args]]


def server_chain(base: str, internal_id: str) -> str:
    """A server's chain: ``<base>-<10 upper-case hex of its id>``."""
    return f"{base}-{hashlib.sha256(internal_id.encode()).hexdigest()[:10].upper()}"


def owned(base: str, chain: str) -> bool:
    """Is ``chain`` one of the agent's (the base chain or one named after it)?"""
    return chain == base or chain.startswith(base + "-")


def hashlimit_name(*parts: object) -> str:
    """A meter name (at most 15 characters) that changes with what it is made of."""
    digest = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return "lfw" + digest[:12]


def rate_spec(rate: RateLimit) -> str:
    """``requests`` per ``per_seconds`` as hashlimit writes a rate: the shortest exact
    unit (``30/minute`` for 1 per 2 s), else per day rounded."""
    for unit, seconds in (("second", 1), ("minute", 60), ("hour", 3600), ("day", 86400)):
        total = rate.requests * seconds
        if total % rate.per_seconds == 0:
            return f"{total // rate.per_seconds}/{unit}"
    return f"{max(1, round(rate.requests * 86400 / rate.per_seconds))}/day"


def _meter(rate: RateLimit, name: str, *, per_source: bool) -> Args:
    args = [
        "-m",
        "hashlimit",
        "--hashlimit-above",
        rate_spec(rate),
        "--hashlimit-burst",
        str(rate.requests),
    ]
    if per_source:
        args += ["--hashlimit-mode", "srcip"]
    expire = max(10, rate.per_seconds) * 1000
    return [*args, "--hashlimit-name", name, "--hashlimit-htable-expire", str(expire)]


def _protocol(protocol: str, family: int) -> Args:
    if protocol == "all":
        return []
    if protocol == "icmp":
        return ["-p", "icmp" if family == 4 else "ipv6-icmp"]
    return ["-p", protocol]


def rule_lines(rule: Rule, family: int, chain: str) -> list[Args]:
    """The one or two rules (meter, then action) of ``rule`` in ``family``."""
    match = ["-s", rule.source_ip] if rule.source_ip is not None else []
    match += _protocol(rule.protocol, family)
    conntrack: Args = []
    if rule.source_port is not None:
        conntrack += ["--ctorigsrcport", str(rule.source_port)]
    if rule.dest_port is not None:
        conntrack += ["--ctorigdstport", str(rule.dest_port)]
    if conntrack:
        match += ["-m", "conntrack", *conntrack]
    if rule.action == "accept":
        target = ["-j", "RETURN"]
    elif rule.action == "drop":
        target = ["-j", "DROP"]
    elif rule.protocol == "tcp":
        target = ["-j", "REJECT", "--reject-with", "tcp-reset"]
    else:
        target = ["-j", "REJECT"]
    lines = []
    if rule.rate_limit is not None:
        new = ["-m", "conntrack", "--ctstate", "NEW"] if rule.protocol == "tcp" else []
        name = hashlimit_name(chain, rule.id, family, rule.rate_limit)
        meter = _meter(rule.rate_limit, name, per_source=True)
        lines.append([*match, *new, *meter, "-j", "DROP"])
    lines.append([*match, *target])
    return lines


def ddos_lines(ddos: Ddos, family: int, chain: str, config: FirewallConfig) -> list[Args]:
    """The DDoS settings' rules (none unless enabled)."""
    if not ddos.enabled:
        return []
    lines: list[Args] = []
    if ddos.syn_flood_protection:
        lines.append(["-p", "tcp", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
        syn = RateLimit(config.syn_burst, 1)
        name = hashlimit_name(chain, "syn", family, config.syn_rate, config.syn_burst)
        meter = _meter(syn, name, per_source=False)
        meter[3] = f"{config.syn_rate}/second"
        lines.append(["-p", "tcp", "--syn", "-m", "conntrack", "--ctstate", "NEW", *meter])
        lines[-1] += ["-j", "DROP"]
    if ddos.connection_limit is not None:
        lines.append(
            [
                "-p",
                "tcp",
                "--syn",
                "-m",
                "connlimit",
                "--connlimit-above",
                str(ddos.connection_limit),
                "--connlimit-mask",
                "32" if family == 4 else "128",
                "-j",
                "DROP",
            ]
        )
    if ddos.rate_limit is not None:
        name = hashlimit_name(chain, "rate", family, ddos.rate_limit)
        meter = _meter(ddos.rate_limit, name, per_source=True)
        lines.append(["-m", "conntrack", "--ctstate", "NEW", *meter, "-j", "DROP"])
    return lines


# --- trees ------------------------------------------------------------------------------


@attrs.frozen
class _Item:
    low: int
    high: int
    lines: list[Args]


def _block(lo: int, hi: int) -> tuple[int, int]:
    """The smallest power-of-two aligned block holding ``lo..hi``."""
    size = 1
    while (lo // size) != (hi // size):
        size *= 2
    start = lo - lo % size
    return start, start + size - 1


def _tree(
    chains: Chains,
    chain: str,
    items: Sequence[_Item],
    low: int,
    high: int,
    split: Callable[[int, int], Args],
    names: Iterable[str],
    depth: int,
) -> None:
    """Put ``items`` (in order) into ``chain``, as a tree of sub-chains when long.

    Each level narrows to the smallest aligned block holding what is left (the addresses
    outside it match none of the items: they fall off the end, as from the flat list),
    then splits it into ``FANOUT`` aligned parts, each a chain holding the items that
    reach into it. At most ``depth`` levels: nf_tables refuses chains nested deeper than
    16 jumps or gotos in all ("Too many links")."""
    it = iter(names)

    def build(name: str, part: Sequence[_Item], lo: int, hi: int, level: int) -> None:
        lines = chains.setdefault(name, [])
        if sum(len(i.lines) for i in part) <= LEAF or level >= depth:
            lines.extend(line for i in part for line in i.lines)
            return
        lo, hi = _block(min(max(i.low, lo) for i in part), max(min(i.high, hi) for i in part))
        size = (hi - lo + 1) // min(FANOUT, hi - lo + 1)
        parts = []
        for start in range(lo, hi + 1, size):
            end = start + size - 1
            parts.append((start, end, [i for i in part if i.low <= end and i.high >= start]))
        if hi == lo or all(len(sub) == len(part) for _s, _e, sub in parts):
            lines.extend(line for i in part for line in i.lines)  # nothing left to split
            return
        for start, end, sub in parts:
            if sub:
                child = next(it)
                lines.append([*split(start, end), "-g", child])
                build(child, sub, start, end, level + 1)

    build(chain, items, low, high, 0)


def _sub_names(prefix: str) -> Iterable[str]:
    n = 0
    while True:
        n += 1
        yield f"{prefix}{n}"


def _address_split(family: int) -> Callable[[int, int], Args]:
    bits = 32 if family == 4 else 128

    def split(lo: int, hi: int) -> Args:
        size = hi - lo + 1
        prefix = bits - (size.bit_length() - 1)
        address = ipaddress.ip_address(lo) if family == 4 else ipaddress.IPv6Address(lo)
        return ["-s", f"{address.compressed}/{prefix}"]

    return split


def _port_split(lo: int, hi: int) -> Args:
    # Both directions: the pool's rules in the leaves judge the servers' answers too.
    return ["-m", "conntrack", "--ctorigdstport", f"{lo}:{hi}"]


def server_chains(
    base: str,
    internal_id: str,
    rules: Sequence[Rule],
    ddos: Ddos | None,
    family: int,
    config: FirewallConfig,
) -> Chains:
    """A server's chains in ``family`` (empty when it has nothing there)."""
    chain = server_chain(base, internal_id)
    chains: Chains = {}
    head = [] if ddos is None else ddos_lines(ddos, family, chain, config)
    bits = 32 if family == 4 else 128
    items = []
    for rule in rules:
        if not rule.enabled or rule.family not in (None, family):
            continue
        lines = rule_lines(rule, family, chain)
        if rule.source_ip is None:
            low, high = 0, (1 << bits) - 1
        else:
            network = ipaddress.ip_network(rule.source_ip)
            low, high = int(network.network_address), int(network.broadcast_address)
        items.append(_Item(low, high, lines))
    if not head and not items:
        return chains
    chains[chain] = list(head)
    if items:
        split, names = _address_split(family), _sub_names(chain + "-")
        _tree(chains, chain, items, 0, (1 << bits) - 1, split, names, SERVER_DEPTH)
    return chains


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _published_match(ip: str, port: int, protocol: str, *, clients: bool = True) -> list[Args]:
    """A published host address and port's match, one per protocol (see the module
    docstring): DNATed, by original destination; the clients' direction only, or (not
    ``clients``) both directions of the connection."""
    address = ipaddress.ip_address(ip)
    where = [] if address.is_unspecified else ["--ctorigdst", address.compressed]
    direction = ["--ctdir", "ORIGINAL"] if clients else []
    lines = []
    for proto in ("tcp", "udp") if protocol == "both" else (protocol,):
        line = ["-p", proto, "-m", "conntrack", "--ctstate", "DNAT", *direction]
        lines.append([*line, *where, "--ctorigdstport", str(port)])
    return lines


def port_lines(ports: Sequence[PortAccess], family: int) -> list[Args]:
    """The pool's rules in ``family``: ``ACCEPT`` an open entry, ``DROP`` a closed one,
    both directions of the connection (an accepted client must get the server's answers
    past whatever the host's ``DOCKER-USER`` does after the agent's chain)."""
    lines = []
    for entry in sorted(ports, key=lambda p: (p.port, p.ip, p.protocol)):
        if _family(entry.ip) == family:
            target = "ACCEPT" if entry.open else "DROP"
            for match in _published_match(entry.ip, entry.port, entry.protocol, clients=False):
                lines.append([*match, "-j", target])
    return lines


def dispatch_chains(
    base: str,
    published: Mapping[str, Sequence[PoolPort]],
    family: int,
    ports: Sequence[PortAccess] = (),
) -> Chains:
    """The base chain (and its tree): each published port of the given servers sends its
    clients' packets to the server's chain, then the pool's rules (``ports``) decide.
    ``published``: the servers that have a chain in this family, with their ports.

    The server's chain is called (``-j``), not jumped to for good: when it returns the
    packet meets the pool's rule for the same port, which is in the same leaf of the tree
    (the tree splits on the port)."""
    items = []
    for internal_id in sorted(published):
        target = server_chain(base, internal_id)
        for port in sorted(published[internal_id], key=lambda p: (p.port, p.ip, p.protocol)):
            if _family(port.ip) != family:
                continue
            for line in _published_match(port.ip, port.port, port.protocol):
                items.append(_Item(port.port, port.port, [[*line, "-j", target]]))
    for line in port_lines(ports, family):
        number = int(line[line.index("--ctorigdstport") + 1])
        items.append(_Item(number, number, [line]))
    chains: Chains = {base: []}
    _tree(chains, base, items, 0, 65535, _port_split, _sub_names(base + "-d"), DISPATCH_DEPTH)
    return chains


@attrs.frozen
class Rendered:
    """One ``iptables-restore --noflush`` input and the chains it leaves in place."""

    text: str
    chains: frozenset[str]


def render_restore(
    declared: Chains,
    *,
    remove: Iterable[str] = (),
    jump: tuple[str, str] | None = None,
) -> Rendered:
    """The restore input: ``declared`` chains created or emptied then filled (atomically,
    in one commit), ``remove`` chains flushed and deleted, and, with ``jump=(parent,
    chain)``, the jump inserted first in ``parent``. Every argument is checked to be one
    word: the input is a list of argument vectors, never a script."""
    out = ["*filter"]
    for name in declared:
        out.append(f":{name} - [0:0]")
    for name, lines in declared.items():
        for args in lines:
            for arg in (name, *args):
                if not arg or any(c.isspace() or c in "\"'#\\" for c in arg):
                    raise ValueError(f"not a single word: {arg!r}")
            out.append(" ".join(["-A", name, *args]))
    if jump is not None:
        out.append(f"-I {jump[0]} 1 -j {jump[1]}")
    gone = [name for name in remove if name not in declared]
    out += [f"-F {name}" for name in gone]
    out += [f"-X {name}" for name in gone]
    out.append("COMMIT")
    return Rendered("\n".join(out) + "\n", frozenset(declared))
