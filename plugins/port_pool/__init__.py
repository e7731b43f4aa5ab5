"""Built-in plugin ``port_pool``: the node's host ports (contract §6), allocated atomically.

The pool is the set of host ``ip:port`` entries containers may bind, identity
``(ip, port)``, protocol ``tcp``, ``udp`` or ``both``. It lives in the state store
(``port_pool`` migrations) and survives restarts. Containers get their ports through
``agent.interfaces.PortPoolService``, published as ``agent.stash[PORT_POOL]``: reserve a
set all-or-nothing, replace a container's set atomically (rebind), release it. Each of
those is one store transaction, so an entry is never held by two containers whatever the
concurrency (``pool.py`` says how, and how concurrent changes share a commit).

Rules (``model.py``): addresses are IPv4 or IPv6 literals, stored normalised (an IPv6
address works in a URL path: ``/network/ports/::1/25565``); a ``both`` entry serves a
``tcp`` or ``udp`` request, otherwise protocols must be equal; the pool is listed by
address (IPv4, then IPv6, numerically), then port.

Hooks: ``lightd_add_config_sections`` (``network``), ``lightd_add_migrations``,
``lightd_configure`` (publishes the pool; hands it to the firewall with
``manage_firewall``), ``lightd_add_routes``, ``lightd_container_deleted`` (frees what a
deleted container still held: a safety net, the containers core releases first),
``lightd_config_reloaded``.

Config section ``network``: ``manage_firewall`` (default false) gates the traffic Docker
forwards to pool ports, in the ``firewall`` plugin's chain (hooked into ``DOCKER-USER``,
where published ports are filtered; never ``INPUT``): ACCEPT for an entry a container
holds, DROP for a free one, nothing for one marked in use by hand (``PortPool.port_access``
says which; every change of the pool tells the firewall, ``PortFirewallService``). How
iptables is run is the ``firewall`` section's (``iptables``, ``ipv6``, ``chain``,
``parent``, ``timeout``, ``command_prefix``); ``firewall.enabled`` need not be on. The
keys of the INPUT-chain version (``iptables``, ``ip6tables``, ``firewall_chain``,
``firewall_parent``, ``firewall_timeout``) are accepted and ignored with a warning
(``model.DEPRECATED_KEYS``). Changes take effect at the next start.

Routes (§6; [ext] = additive to the docs)::

    POST   /network/ports                {"ip","port","protocol"?}
    GET    /network/ports                ?in_use=true|false [ext]; each entry has
                                         "container" [ext]
    GET    /network/ports/random         a free entry, not reserved; ?protocol= [ext]
    GET    /network/ports/:ip/:port      + "container": internal_id | null [ext]
    PUT    /network/ports/:ip/:port/use  {"in_use": bool}
    DELETE /network/ports/:ip/:port
    POST   /network/ports/bulk-delete    {"ports":[{"ip","port"}]}; + "skipped" [ext]
    POST   /network/ports/bulk [ext]     {"ports":[…]} or {"ip","start","end","protocol"?};
                                         existing entries are skipped ("skipped_count")

An entry a container holds cannot be freed or deleted by hand (409 ``Port is bound to
container <internal_id>``); bulk-delete skips it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from lightd import PORT_FIREWALL, PORT_POOL, Agent, Config, Migration, StashKey, hookimpl
from quart import Blueprint

from .model import DEPRECATED_KEYS, NetworkConfig
from .pool import MIGRATIONS, Entry, PortPool, PortPoolError
from .routes import make_blueprint

__all__ = [
    "POOL",
    "Entry",
    "NetworkConfig",
    "PortPool",
    "PortPoolError",
]

log = logging.getLogger(__name__)

#: The concrete pool (``PORT_POOL`` is the same object, typed as the interface).
POOL: StashKey[PortPool] = StashKey("port_pool.pool")


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"network": NetworkConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl
def lightd_configure(agent: Agent) -> None:
    pool = PortPool(agent.store, agent.clock)
    section: NetworkConfig = agent.config.section(NetworkConfig)
    for key in section.deprecated():
        log.warning(
            "config: network.%s is deprecated and ignored: the pool's firewall rules are"
            " applied by the firewall plugin in DOCKER-USER (see %s)",
            key,
            DEPRECATED_KEYS[key],
        )
    if section.manage_firewall:
        # The firewall plugin's configure runs first (tryfirst) and offers the service.
        firewall = agent.stash.get(PORT_FIREWALL)
        if firewall is None:
            log.warning(
                "network.manage_firewall is on but the firewall plugin is not loaded:"
                " pool ports get no firewall rules"
            )
        else:
            firewall.follow_ports(pool.port_access)
            pool.on_change = firewall.ports_changed
    agent.stash[POOL] = pool
    agent.stash[PORT_POOL] = pool


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    return [make_blueprint(agent.stash[POOL])]


@hookimpl
def lightd_container_deleted(agent: Agent, internal_id: str) -> Awaitable[None]:
    pool = agent.stash[POOL]

    async def release() -> None:
        freed = await pool.release(internal_id)
        if freed:
            log.warning(
                "container %s was deleted still holding %d pool ports; freed them",
                internal_id,
                len(freed),
            )

    return release()


@hookimpl
def lightd_config_reloaded(agent: Agent, old: Config, new: Config) -> None:
    if old.section(NetworkConfig) != new.section(NetworkConfig):
        log.warning("config reload: network changed; it takes effect at the next restart")
