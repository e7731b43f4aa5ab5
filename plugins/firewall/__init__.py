"""Built-in plugin ``firewall``: per-server firewall rules and DDoS protection (contract §21).

Hosts block abusive addresses and rate-limit floods per game server. Rules live in the
state store (``firewall`` migrations: ``firewall_rules``, ``firewall_ddos``) and act on
traffic **to the server's published ports**: the agent keeps one chain of its own
(``firewall.chain``, default ``LIGHTD-FW``) jumped to first thing from Docker's
``DOCKER-USER``, which dispatches each published port's clients to the server's chain
(``ruleset.py`` draws the layout and says why it matches conntrack's original
destination rather than the container's address). Every change is one atomic
``iptables-restore --noflush`` of the agent's chains (``state.py``), with argument
vectors only; ``iptables-nft`` or ``iptables-legacy``, whichever holds Docker's chains
(``iptables.py``).

Rules survive restarts (re-applied when the service starts, leftovers of older runs
removed), follow the server through a rebind or recreate (the core's
``lightd_container_network_changed``), and go with it (``lightd_container_deleted``).

The port pool's ``network.manage_firewall`` lands in the same chain: the plugin offers
``PortFirewallService`` (``agent.stash[PORT_FIREWALL]``), the pool hands it a source of
``PortAccess`` entries (a held entry open, a free one closed) and says when they change;
the dispatch then ends each pool port's path with ``ACCEPT`` or ``DROP`` (``ruleset.py``).

Hooks: ``lightd_add_config_sections`` (``firewall``), ``lightd_add_migrations``,
``lightd_configure`` (first of all plugins: builds the firewall and offers
``PORT_FIREWALL``; ``FIREWALL``, which the routes use, only when enabled),
``lightd_add_services`` (``firewall``: applies the rules, when enabled or following the
pool), ``lightd_add_routes``, ``lightd_container_network_changed``,
``lightd_container_deleted``, ``lightd_config_reloaded`` (warns: changes apply at the
next start).

Config section ``firewall``: ``enabled`` (false: every route answers ``409 Firewall
management is disabled`` and iptables is never run, unless ``network.manage_firewall``
asks for the pool's rules), ``iptables`` (``auto``), ``ipv6``, ``command_prefix``,
``chain``, ``parent``, ``timeout``, ``syn_rate``, ``syn_burst``, ``max_rules`` (see
``model.FirewallConfig``).

Routes::

    POST   /firewall/rules                       201 {"rule": {...}}
    GET    /firewall/rules/container/:internal_id
    PUT    /firewall/rules/:rule_id/toggle       {"enabled": bool}
    DELETE /firewall/rules/:rule_id
    POST   /firewall/ddos/:internal_id           {"enabled", "syn_flood_protection"?,
                                                  "connection_limit"?, "rate_limit"?}
    DELETE /firewall/cleanup/:internal_id
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Awaitable, Sequence

from lightd import PORT_FIREWALL, Agent, Config, Migration, PoolPort, Service, StashKey, hookimpl
from quart import Blueprint

from .model import Ddos, FirewallConfig, RateLimit, Rule
from .routes import FIREWALL, make_blueprint
from .state import MIGRATIONS, Firewall

__all__ = ["ENGINE", "FIREWALL", "Ddos", "Firewall", "FirewallConfig", "RateLimit", "Rule"]

log = logging.getLogger(__name__)

#: The firewall whether or not ``firewall.enabled`` (the pool's rules need it either way).
ENGINE: StashKey[Firewall] = StashKey("firewall.engine")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"firewall": FirewallConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl(tryfirst=True)
def lightd_configure(agent: Agent) -> None:
    # tryfirst: PORT_FIREWALL is on the stash before the port pool's configure looks.
    config: FirewallConfig = agent.config.section(FirewallConfig)
    firewall = Firewall(agent, config)
    agent.stash[ENGINE] = firewall
    agent.stash[PORT_FIREWALL] = firewall
    if config.enabled:
        agent.stash[FIREWALL] = firewall


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    firewall = agent.stash[ENGINE]
    return [Service("firewall", firewall.serve)] if firewall.active else []


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    return [make_blueprint(agent)]


@hookimpl
def lightd_container_network_changed(
    agent: Agent, internal_id: str, ports: Sequence[PoolPort]
) -> None:
    firewall = agent.stash.get(FIREWALL)
    if firewall is not None:
        firewall.network_changed(internal_id, ports)


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[None]:
    firewall = agent.stash.get(FIREWALL)
    if firewall is not None:
        return _cleanup(firewall, internal_id)

    async def forget_rows() -> None:
        # Disabled: the kernel is not touched, but the rules do not outlive the server.
        def forget(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM firewall_rules WHERE container_id = ?", (internal_id,))
            conn.execute("DELETE FROM firewall_ddos WHERE container_id = ?", (internal_id,))

        await agent.store.write(forget)

    return forget_rows()


async def _cleanup(firewall: Firewall, internal_id: str) -> None:
    await firewall.cleanup(internal_id)


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    if old.section(FirewallConfig) != new.section(FirewallConfig):
        log.warning("config reload: firewall changed; it takes effect at the next restart")
