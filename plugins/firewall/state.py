"""The firewall's state (rules and DDoS settings in the store, a copy in memory) and the
service that keeps the kernel equal to it.

Every change is committed to the store first, then the server is marked dirty and the
reconciler woken; the route returns once a pass that started after its change has ended,
so an answer means the rule is in the kernel (unless iptables failed: logged, and retried
with a back-off until it works).

A pass is one ``iptables-restore --noflush`` per address family (atomic: the kernel never
sees half a change): the base chain's dispatch is written whole, the chains of the dirty
servers are written whole (declaring a chain empties it), and the chains that are no
longer needed are flushed and deleted in the same commit. The first pass after a start (or
after a failure) lists the table and removes every chain named after the base chain that
the state does not explain, so leftovers of an older run (a server deleted while the
agent was down) go.

Ports: the containers core says which host ports each server publishes (the
``lightd_container_network_changed`` hook at every create, recreate and rebind; at start,
``ContainerService.published_ports``). Rules of a container that no longer exists are
removed from the store at start.

Pool ports (``PortFirewallService``, for the port pool's ``network.manage_firewall``):
the pool's answer is read at the first pass and again in the pass after each
``ports_changed``, and written into the dispatch (``ruleset.port_lines``). With
``firewall.enabled`` false and a pool to follow, the service runs for the pool's rules
alone: the stored rules are neither loaded nor applied (their chains, left by an earlier
run, go).
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio
from lightd import (
    CONTAINER_SERVICE,
    AgentError,
    Conflict,
    Migration,
    NotFound,
    PoolPort,
    PortAccess,
)

from .iptables import Iptables, IptablesFailed, Programs
from .model import Ddos, FirewallConfig, RateLimit, Rule
from .ruleset import Chains, dispatch_chains, owned, render_restore, server_chain, server_chains

if TYPE_CHECKING:
    from lightd import Agent

__all__ = ["MIGRATIONS", "Firewall"]

log = logging.getLogger(__name__)

MIGRATIONS = [
    Migration(
        "firewall",
        1,
        """
        CREATE TABLE firewall_rules (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT NOT NULL UNIQUE,
            container_id TEXT NOT NULL,
            source_ip TEXT,
            source_port INTEGER CHECK (source_port BETWEEN 1 AND 65535),
            dest_port INTEGER CHECK (dest_port BETWEEN 1 AND 65535),
            protocol TEXT NOT NULL CHECK (protocol IN ('tcp', 'udp', 'icmp', 'all')),
            action TEXT NOT NULL CHECK (action IN ('accept', 'drop', 'reject')),
            rate_requests INTEGER,
            rate_per_seconds INTEGER,
            description TEXT,
            enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
            created_at INTEGER NOT NULL
        );
        CREATE INDEX firewall_rules_container ON firewall_rules (container_id, seq);
        CREATE TABLE firewall_ddos (
            container_id TEXT PRIMARY KEY,
            enabled INTEGER NOT NULL CHECK (enabled IN (0, 1)),
            syn_flood_protection INTEGER NOT NULL CHECK (syn_flood_protection IN (0, 1)),
            connection_limit INTEGER,
            rate_requests INTEGER,
            rate_per_seconds INTEGER,
            updated_at INTEGER NOT NULL
        ) WITHOUT ROWID
        """,
    )
]

_RULE_COLUMNS = (
    "id, container_id, source_ip, source_port, dest_port, protocol, action,"
    " rate_requests, rate_per_seconds, description, enabled, created_at"
)

#: Seconds between retries of a failed pass: doubling up to the last.
_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)


def _rate(requests: Any, per_seconds: Any) -> RateLimit | None:
    return None if requests is None else RateLimit(int(requests), int(per_seconds))


def _rule(row: Sequence[Any]) -> Rule:
    return Rule(
        id=row[0],
        container_id=row[1],
        source_ip=row[2],
        source_port=row[3],
        dest_port=row[4],
        protocol=row[5],
        action=row[6],
        rate_limit=_rate(row[7], row[8]),
        description=row[9],
        enabled=bool(row[10]),
        created_at=row[11],
    )


def _ddos(row: Sequence[Any]) -> Ddos:
    return Ddos(
        enabled=bool(row[1]),
        syn_flood_protection=bool(row[2]),
        connection_limit=row[3],
        rate_limit=_rate(row[4], row[5]),
    )


def new_rule_id() -> str:
    return str(uuid.uuid4())


PortSource = Callable[[], Awaitable[Sequence[PortAccess]]]


class Firewall:
    """Rules and DDoS settings per server, and the service that applies them (with the
    pool's port rules: a ``PortFirewallService``)."""

    def __init__(self, agent: Agent, config: FirewallConfig) -> None:
        self.agent = agent
        self.config = config
        self.iptables = Iptables(config)
        #: container → rule id → rule, in creation order.
        self.rules: dict[str, dict[str, Rule]] = {}
        self.owner: dict[str, str] = {}
        self.ddos: dict[str, Ddos] = {}
        #: container → the host ports it publishes.
        self.ports: dict[str, list[PoolPort]] = {}
        self.programs: Programs | None = None
        self.families: list[int] = []
        #: family → server id ("" for the dispatch) → the chains applied for it.
        self.applied: dict[int, dict[str, frozenset[str]]] = {}
        self._dirty: set[str] = set()
        self._full = True
        self._wake = trio.Event()
        self._pass_done = trio.Event()
        #: Completed passes, and the last failure (``None`` after a pass that worked).
        self.passes = 0
        self.last_error: str | None = None
        #: The pool's rules: where they come from, and the last answer read.
        self.port_source: PortSource | None = None
        self.port_access: list[PortAccess] = []
        self._ports_dirty = True

    @property
    def active(self) -> bool:
        """Is there anything to apply (the rules, or a pool to follow)?"""
        return self.config.enabled or self.port_source is not None

    # -- PortFirewallService ------------------------------------------------------------

    def follow_ports(self, source: PortSource) -> None:
        self.port_source = source
        self.ports_changed()

    def ports_changed(self) -> None:
        self._ports_dirty = True
        self._wake.set()

    async def apply_ports(self) -> None:
        done = self._pass_done
        self.ports_changed()
        await done.wait()

    # -- reading ----------------------------------------------------------------------

    def container_ports(self, internal_id: str) -> list[PoolPort]:
        """The container's published ports; ``NotFound("Container not found")``."""
        containers = self.agent.stash.get(CONTAINER_SERVICE)
        if containers is None:
            raise NotFound("Container not found", code="container_not_found")
        return list(containers.published_ports(internal_id))

    def rules_of(self, internal_id: str) -> list[Rule]:
        return list(self.rules.get(internal_id, {}).values())

    def rule(self, rule_id: str) -> Rule:
        owner = self.owner.get(rule_id)
        if owner is None:
            raise NotFound("Rule not found", code="rule_not_found")
        return self.rules[owner][rule_id]

    # -- changes (each committed, then applied) -----------------------------------------

    async def add_rule(self, rule: Rule) -> Rule:
        self.ports[rule.container_id] = self.container_ports(rule.container_id)
        if len(self.rules.get(rule.container_id, {})) >= self.config.max_rules:
            raise Conflict(
                f"Too many firewall rules (max {self.config.max_rules})", code="too_many_rules"
            )
        rate = rule.rate_limit
        await self.agent.store.execute(
            f"INSERT INTO firewall_rules ({_RULE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rule.id,
                rule.container_id,
                rule.source_ip,
                rule.source_port,
                rule.dest_port,
                rule.protocol,
                rule.action,
                None if rate is None else rate.requests,
                None if rate is None else rate.per_seconds,
                rule.description,
                int(rule.enabled),
                rule.created_at,
            ),
        )
        self.rules.setdefault(rule.container_id, {})[rule.id] = rule
        self.owner[rule.id] = rule.container_id
        await self.sync(rule.container_id)
        return rule

    async def toggle(self, rule_id: str, enabled: bool) -> Rule:
        rule = self.rule(rule_id)
        await self.agent.store.execute(
            "UPDATE firewall_rules SET enabled = ? WHERE id = ?", (int(enabled), rule_id)
        )
        changed = attrs.evolve(rule, enabled=enabled)
        self.rules[rule.container_id][rule_id] = changed
        await self.sync(rule.container_id)
        return changed

    async def delete_rule(self, rule_id: str) -> None:
        rule = self.rule(rule_id)
        await self.agent.store.execute("DELETE FROM firewall_rules WHERE id = ?", (rule_id,))
        self.rules[rule.container_id].pop(rule_id, None)
        self.owner.pop(rule_id, None)
        await self.sync(rule.container_id)

    async def set_ddos(self, internal_id: str, ddos: Ddos) -> None:
        self.ports[internal_id] = self.container_ports(internal_id)
        rate = ddos.rate_limit
        await self.agent.store.execute(
            "INSERT OR REPLACE INTO firewall_ddos VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                internal_id,
                int(ddos.enabled),
                int(ddos.syn_flood_protection),
                ddos.connection_limit,
                None if rate is None else rate.requests,
                None if rate is None else rate.per_seconds,
                int(self.agent.clock()),
            ),
        )
        self.ddos[internal_id] = ddos
        await self.sync(internal_id)

    async def cleanup(self, internal_id: str, *, apply: bool = True) -> bool:
        """Forget every rule and the DDoS settings of a server; ``False`` if it had none."""
        had = bool(self.rules.get(internal_id)) or internal_id in self.ddos

        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM firewall_rules WHERE container_id = ?", (internal_id,))
            conn.execute("DELETE FROM firewall_ddos WHERE container_id = ?", (internal_id,))

        await self.agent.store.write(forget)
        for rule_id in self.rules.pop(internal_id, {}):
            self.owner.pop(rule_id, None)
        self.ddos.pop(internal_id, None)
        if apply:
            await self.sync(internal_id)
        else:
            self._mark(internal_id)
        self.ports.pop(internal_id, None)
        return had

    def network_changed(self, internal_id: str, ports: Sequence[PoolPort]) -> None:
        """The container publishes ``ports`` now (the core's hook; never blocks)."""
        self.ports[internal_id] = list(ports)
        if internal_id in self.rules or internal_id in self.ddos:
            self._mark(internal_id)

    def _mark(self, internal_id: str) -> None:
        self._dirty.add(internal_id)
        self._wake.set()

    async def sync(self, internal_id: str) -> None:
        """Apply the server's state and wait for the pass that does it."""
        done = self._pass_done
        self._mark(internal_id)
        await done.wait()

    # -- the service ------------------------------------------------------------------

    async def load(self) -> None:
        """Read the store; forget the rules of containers that no longer exist. Nothing
        while ``firewall.enabled`` is false (the service then applies the pool's rules)."""
        if not self.config.enabled:
            return

        def read(conn: sqlite3.Connection) -> tuple[list[Rule], dict[str, Ddos]]:
            rules = conn.execute(
                f"SELECT {_RULE_COLUMNS} FROM firewall_rules ORDER BY seq"
            ).fetchall()
            ddos = conn.execute("SELECT * FROM firewall_ddos").fetchall()
            return [_rule(r) for r in rules], {row[0]: _ddos(row) for row in ddos}

        rules, self.ddos = await self.agent.store.read(read)
        self.rules, self.owner = {}, {}
        for rule in rules:
            self.rules.setdefault(rule.container_id, {})[rule.id] = rule
            self.owner[rule.id] = rule.container_id
        for internal_id in sorted(set(self.rules) | set(self.ddos)):
            try:
                self.ports[internal_id] = self.container_ports(internal_id)
            except NotFound:
                log.warning(
                    "firewall: container %s no longer exists; removing its rules", internal_id
                )
                await self.cleanup(internal_id, apply=False)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, detect iptables, apply everything, report ready; then apply changes."""
        await self.load()
        self.programs = await self.iptables.detect()
        self.families = [4] if self.programs.v6 is None else [4, 6]
        self._full = True
        failures = 0
        await self._pass()
        task_status.started()
        while True:
            if self.last_error is not None:
                failures += 1
                await trio.sleep(_BACKOFF[min(failures, len(_BACKOFF)) - 1])
            else:
                failures = 0
                await self._wake.wait()
            await self._pass()

    async def _pass(self) -> None:
        self._wake = trio.Event()
        done, self._pass_done = self._pass_done, trio.Event()
        dirty, self._dirty = self._dirty, set()
        ports_dirty, self._ports_dirty = self._ports_dirty, False
        try:
            if ports_dirty and self.port_source is not None:
                self.port_access = list(await self.port_source())
            full = self._full
            for family in list(self.families):
                await self._apply(family, dirty, full=full)
            self._full = False
            if self.last_error is not None:
                log.info("firewall: rules applied again")
            self.last_error = None
        except AgentError as exc:  # IptablesFailed, or the pool could not be read
            self._dirty |= dirty
            self._ports_dirty |= ports_dirty
            self._full = True
            if self.last_error != str(exc):
                log.error("firewall: rules could not be applied (retrying): %s", exc)
            self.last_error = str(exc)
        finally:
            self.passes += 1
            done.set()

    def _server_chains(self, internal_id: str, family: int) -> Chains:
        return server_chains(
            self.config.chain,
            internal_id,
            self.rules_of(internal_id),
            self.ddos.get(internal_id),
            family,
            self.config,
        )

    async def _apply(self, family: int, dirty: set[str], *, full: bool) -> None:
        assert self.programs is not None
        program = self.programs.program(family)
        base, parent = self.config.chain, self.config.parent
        applied = self.applied.setdefault(family, {})
        jump = None
        existing: set[str] = set()
        if full:
            try:
                existing, listing = await self.iptables.chains(program)
            except IptablesFailed:
                if family == 6:
                    log.warning("firewall: %s does not work; IPv6 is left alone", program)
                    self.families.remove(6)
                    return
                raise
            if parent not in existing and family == 6:
                log.info("firewall: %s has no chain %s; IPv6 is left alone", program, parent)
                self.families.remove(6)
                return
            if parent not in existing and parent not in ("INPUT", "FORWARD", "OUTPUT"):
                log.warning(
                    "firewall: %s has no chain %s (is Docker using %s?); creating it:"
                    " the rules take effect once FORWARD jumps there",
                    program,
                    parent,
                    self.programs.variant,
                )
                await self.iptables.checked([program, "-w", "-N", parent])
            if f"-A {parent} -j {base}" not in listing.splitlines():
                jump = (parent, base)
            servers = set(self.rules) | set(self.ddos) | {k for k in applied if k}
        else:
            servers = dirty
        declared: Chains = {}
        remove: set[str] = set(applied.get("", frozenset()))
        for internal_id in sorted(servers):
            chains = self._server_chains(internal_id, family)
            declared.update(chains)
            remove |= applied.get(internal_id, frozenset())
        published = {}
        for internal_id in set(self.rules) | set(self.ddos):
            if internal_id in servers:
                has = bool(self._chain_names(internal_id, declared))
            else:
                has = bool(applied.get(internal_id))
            if has:
                published[internal_id] = self.ports.get(internal_id, [])
        dispatch = dispatch_chains(base, published, family, self.port_access)
        declared = {**dispatch, **declared}
        remove |= {name for name in existing if owned(base, name)}
        rendered = render_restore(declared, remove=sorted(remove), jump=jump)
        await self.iptables.restore(program, rendered.text)
        for internal_id in servers:
            names = frozenset(self._chain_names(internal_id, declared))
            if names:
                applied[internal_id] = names
            else:
                applied.pop(internal_id, None)
        applied[""] = frozenset(dispatch)

    def _chain_names(self, internal_id: str, declared: Chains) -> list[str]:
        head = server_chain(self.config.chain, internal_id)
        return [name for name in declared if name == head or name.startswith(head + "-")]
