"""``network.manage_firewall``: one iptables ACCEPT rule per pool port and protocol.

The rules live in a chain of the agent's own (``network.firewall_chain``, jumped to
first thing from ``network.firewall_parent``), so the agent never touches a rule it did
not make and can make the chain match the pool exactly:

* at start, the chain (and the jump) is created if missing and its rules are read back
  (``iptables -S``): rules no pool entry explains are deleted, missing ones added, rules
  that are right stay (restarting the agent never closes a port, even for a moment);
* after that, every change of the pool wakes the reconciler, which compares the pool
  with what it applied and runs ``-A``/``-D`` for the difference. Bursts coalesce: a bulk
  add of 500 ports is one pass.

``iptables`` runs with an argument vector through ``trio.run_process``, never a shell,
and only ever sees values the pool validated (a normalised address, a port number, tcp
or udp). IPv4 entries go to ``network.iptables``, IPv6 ones to ``network.ip6tables``; a
wildcard entry (``0.0.0.0``, ``::``) gets a rule without ``-d``. A missing program is a
warning and its family gets no rules; a failing call is a warning and is retried with the
next change. Rules stay when the agent stops: the game servers keep running.

What the rules match is the contract's "ACCEPT per pool port" on the host's own input
(``firewall_parent`` ``INPUT``). Traffic Docker forwards to a published port is DNATed
and crosses ``FORWARD``/``DOCKER-USER`` with the container's port instead; opening that
path per pool port would need ``-m conntrack --ctorigdstport``, which this does not do.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from collections.abc import Awaitable, Callable, Sequence

import trio

from .model import NetworkConfig

__all__ = ["Firewall", "Rule", "rule_args"]

log = logging.getLogger(__name__)

#: ``(family, ip or None for any, protocol "tcp"|"udp", port)``
Rule = tuple[int, str | None, str, int]

_STDERR_LIMIT = 300


def rules_for(entries: Sequence[tuple[str, int, str]]) -> set[Rule]:
    """The rules a pool needs: one per entry and protocol (two for ``both``)."""
    rules: set[Rule] = set()
    for ip, port, protocol in entries:
        address = ipaddress.ip_address(ip)
        target = None if address.is_unspecified else ip
        for proto in ("tcp", "udp") if protocol == "both" else (protocol,):
            rules.add((address.version, target, proto, port))
    return rules


def rule_args(rule: Rule) -> list[str]:
    """A rule's match and target, in the form ``iptables -S`` prints it back."""
    _family, ip, proto, port = rule
    args = [] if ip is None else ["-d", f"{ip}/{32 if _family == 4 else 128}"]
    return [*args, "-p", proto, "-m", proto, "--dport", str(port), "-j", "ACCEPT"]


def parse_rule(family: int, args: Sequence[str]) -> Rule | None:
    """A rule of ours from the arguments after ``-A CHAIN`` of ``iptables -S``; ``None``
    for anything else (which then does not belong in the chain)."""
    options: dict[str, str] = {}
    items = list(args)
    if len(items) % 2:
        return None
    for flag, value in zip(items[::2], items[1::2], strict=True):
        if flag in options:
            return None
        options[flag] = value
    if set(options) - {"-d", "-p", "-m", "--dport", "-j"} or options.get("-j") != "ACCEPT":
        return None
    proto, port = options.get("-p"), options.get("--dport", "")
    if proto not in ("tcp", "udp") or options.get("-m", proto) != proto:
        return None
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return None
    ip: str | None = None
    if "-d" in options:
        try:
            network = ipaddress.ip_network(options["-d"])
        except ValueError:
            return None
        if network.version != family or network.num_addresses != 1:
            return None
        ip = network.network_address.compressed
    return (family, ip, proto, int(port))


class Firewall:
    """Keeps ``network.firewall_chain`` equal to the pool; ``serve`` is its service."""

    def __init__(
        self,
        config: NetworkConfig,
        targets: Callable[[], Awaitable[list[tuple[str, int, str]]]],
    ) -> None:
        self._config = config
        self._targets = targets
        self._wake = trio.Event()
        self._programs: dict[int, str] = {}
        #: Rules known to be in the chain.
        self.applied: set[Rule] = set()
        #: Completed reconciliation passes (tests wait on it).
        self.passes = 0

    def kick(self) -> None:
        """The pool changed: reconcile soon (never blocks)."""
        self._wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prepare the chain of each available family, report ready, then reconcile on
        every change until cancelled."""
        self._programs = {}
        for family, program in ((4, self._config.iptables), (6, self._config.ip6tables)):
            path = shutil.which(program)
            if path is None:
                log.warning(
                    "network.manage_firewall is on but %r was not found: IPv%d pool ports"
                    " get no firewall rules",
                    program,
                    family,
                )
                continue
            self._programs[family] = path
        self.applied = set()
        for family in list(self._programs):
            if not await self._prepare(family):
                del self._programs[family]
        self._wake.set()
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await self._reconcile()
            self.passes += 1

    async def _run(self, family: int, *args: str) -> tuple[int, str] | None:
        """Run the family's program; ``(returncode, stdout)``, or ``None`` when it could
        not run at all (logged)."""
        argv = [self._programs[family], "-w", *args]
        result = None
        with trio.move_on_after(self._config.firewall_timeout):
            try:
                result = await trio.run_process(
                    argv, capture_stdout=True, capture_stderr=True, check=False
                )
            except OSError as exc:
                log.warning("cannot run %s: %s", argv[0], exc)
                return None
        if result is None:
            log.warning(
                "%s took longer than %.1fs (network.firewall_timeout)",
                " ".join(argv),
                self._config.firewall_timeout,
            )
            return None
        return result.returncode, result.stdout.decode("utf-8", "replace")

    async def _checked(self, family: int, *args: str) -> bool:
        """Run and log a failure (with iptables' own words); ``True`` on success."""
        outcome = await self._run(family, *args)
        if outcome is None:
            return False
        if outcome[0] != 0:
            log.warning(
                "%s %s failed with exit status %d",
                self._programs[family],
                " ".join(args),
                outcome[0],
            )
            return False
        return True

    async def _prepare(self, family: int) -> bool:
        """Make sure the chain exists and is jumped to; read back its rules."""
        chain, parent = self._config.firewall_chain, self._config.firewall_parent
        listing = await self._run(family, "-S", chain)
        if listing is None:
            return False
        if listing[0] != 0 and not await self._checked(family, "-N", chain):
            return False
        jump = await self._run(family, "-C", parent, "-j", chain)
        if jump is None:
            return False
        if jump[0] != 0 and not await self._checked(family, "-I", parent, "1", "-j", chain):
            return False
        for line in listing[1].splitlines() if listing[0] == 0 else ():
            words = line.split()
            if words[:2] != ["-A", chain]:
                continue
            rule = parse_rule(family, words[2:])
            if rule is None or rule in self.applied:
                # Not ours, or a duplicate: the chain holds the pool's rules only.
                await self._checked(family, "-D", chain, *words[2:])
            else:
                self.applied.add(rule)
        return True

    async def wanted(self) -> set[Rule]:
        """The rules the pool needs, in the families that have a program."""
        return {r for r in rules_for(await self._targets()) if r[0] in self._programs}

    async def in_sync(self) -> bool:
        """No pass is due and the chain holds exactly what the pool needs."""
        return not self._wake.is_set() and self.applied == await self.wanted()

    async def _reconcile(self) -> None:
        wanted = await self.wanted()
        chain = self._config.firewall_chain
        for rule in sorted(self.applied - wanted, key=_order):
            args = rule_args(rule)
            if await self._checked(rule[0], "-D", chain, *args):
                self.applied.discard(rule)
            elif (check := await self._run(rule[0], "-C", chain, *args)) and check[0] != 0:
                self.applied.discard(rule)  # someone else removed it already
        for rule in sorted(wanted - self.applied, key=_order):
            if await self._checked(rule[0], "-A", chain, *rule_args(rule)):
                self.applied.add(rule)


def _order(rule: Rule) -> tuple[int, str, str, int]:
    return (rule[0], rule[1] or "", rule[2], rule[3])
