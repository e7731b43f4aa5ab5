"""The plugin manager: built-in plugins, third-party entry points, and a typed facade.

Built-in features are plugins like any other, listed in ``BUILTIN_PLUGINS`` under a short
name. ``ESSENTIAL_PLUGINS`` cannot be disabled (without them there is no API to speak of);
every other one, and every third-party plugin, can be switched off by name in config
(``plugins.disabled``). Third-party plugins are found through the entry-point group
``lightd.plugins``::

    [project.entry-points."lightd.plugins"]
    hello = "lightd_hello.plugin"

Built-ins are registered first and entry points after, so third-party implementations of
a hook run before the built-in ones (pluggy calls the last registered first).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from . import hookspecs
from ._version import __version__
from .errors import PluginError

if TYPE_CHECKING:
    from quart import Blueprint

    from .config import Config
    from .containers.install import InstallJob, InstallRun
    from .containers.stats import Sample
    from .interfaces import BackupTarget, PoolPort
    from .jobs import JobView
    from .runtime import Agent, Service
    from .store import Migration

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "ESSENTIAL_PLUGINS",
    "Hooks",
    "describe_plugins",
    "make_plugin_manager",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lightd.plugins"

#: Short name → module, in registration order.
BUILTIN_PLUGINS: Mapping[str, str] = {
    "system": "lightd.api.system",
    "file_manager": "lightd.plugins.file_manager",
    "jobs": "lightd.api.jobs",
    "events": "lightd.plugins.events",
    "metrics": "lightd.api.metrics",
    "health": "lightd.api.health",
    "openapi": "lightd.api.openapi",
    "tokens": "lightd.api.tokens",
    "token_access": "lightd.api.access",
    "volumes": "lightd.plugins.volumes",
    "disk": "lightd.plugins.disk",
    "archives": "lightd.plugins.archives",
    "port_pool": "lightd.plugins.port_pool",
    "remote_sync": "lightd.plugins.remote_sync",
    "containers": "lightd.api.containers",
    "install_scripts": "lightd.plugins.install_scripts",
    "backups": "lightd.plugins.backups",
    "images": "lightd.plugins.images",
    "metering": "lightd.plugins.metering",
    "firewall": "lightd.plugins.firewall",
    "sftp": "lightd.plugins.sftp",
    "transfer": "lightd.plugins.transfer",
}

ESSENTIAL_PLUGINS = frozenset({"system", "health", "tokens", "token_access", "jobs", "containers"})


def make_plugin_manager(
    disabled: Iterable[str] = (),
    *,
    load_entrypoints: bool = True,
    extra: Iterable[tuple[str, object]] = (),
) -> pluggy.PluginManager:
    """Build the manager: specs, built-ins, ``extra`` (tests), then entry points.

    Raises ``PluginError`` when a plugin cannot be imported or implements a hook that no
    spec declares (``check_pending``), so a typo in a plugin fails at start, loudly.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(disabled)
    for name in sorted(disabled & ESSENTIAL_PLUGINS):
        log.warning("plugin %r is essential and cannot be disabled", name)
    disabled -= ESSENTIAL_PLUGINS
    for name in disabled:
        pm.set_blocked(name)
    for name, module_name in BUILTIN_PLUGINS.items():
        if name in disabled:
            log.info("built-in plugin %r disabled by config", name)
            continue
        _register(pm, name, lambda module_name=module_name: importlib.import_module(module_name))
    for name, plugin in extra:
        if name not in disabled:
            _register(pm, name, lambda plugin=plugin: plugin)
    if load_entrypoints:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except (ImportError, AttributeError, ValueError) as exc:
            raise PluginError(f"cannot load a plugin of {ENTRY_POINT_GROUP!r}: {exc}") from exc
    installed = {ep.name for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    known = {name for name, p in pm.list_name_plugin() if p is not None}
    known |= set(BUILTIN_PLUGINS) | installed
    for name in sorted(disabled - known):
        log.warning("plugins.disabled names %r, which is not an installed plugin", name)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(str(exc)) from exc
    return pm


def _register(pm: pluggy.PluginManager, name: str, load: Any) -> None:
    try:
        pm.register(load(), name=name)
    except ImportError as exc:
        raise PluginError(f"cannot import plugin {name!r}: {exc}") from exc
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"plugin {name!r} is invalid: {exc}") from exc


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, origin, version and hooks of each registered plugin (``/system/info``,
    ``lightd diagnostics``). ``origin`` is ``"builtin"`` (``version``: lightd's), the
    name of the distribution whose entry point loaded it (``version``: that
    distribution's), or ``"registered"`` for one handed to ``make_plugin_manager``
    (tests; ``version`` ``None``)."""
    dists = dict(pm.list_plugin_distinfo())
    described = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: item[0]):
        if plugin is None:
            continue
        hooks = sorted(caller.name for caller in pm.get_hookcallers(plugin) or ())
        dist = dists.get(plugin)
        builtin = name in BUILTIN_PLUGINS and dist is None
        if builtin:
            origin, version = "builtin", __version__
        elif dist is not None:
            origin, version = dist.project_name, dist.version
        else:
            origin, version = "registered", None
        described.append(
            {
                "name": name,
                "builtin": builtin,
                "origin": origin,
                "version": version,
                "hooks": hooks,
            }
        )
    return described


class Hooks:
    """Typed calls into the plugins; the core calls hooks only through this, and plugins
    get this, never the plugin manager.

    Declarations flatten their results; notifications await each awaitable an
    implementation returned, in order.
    """

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self._pm = pm
        self._relay = pm.hook

    def describe(self) -> list[dict[str, Any]]:
        """The registered plugins, as ``describe_plugins`` tells them."""
        return describe_plugins(self._pm)

    def loaded(self, name: str) -> bool:
        """Is a plugin of this name registered (not disabled, not blocked)?"""
        return self._pm.get_plugin(name) is not None

    def config_sections(self) -> dict[str, type]:
        sections: dict[str, type] = {}
        for result in self._relay.lightd_add_config_sections():
            for name, cls in result.items():
                if name in sections:
                    raise PluginError(f"two plugins declare the config section {name!r}")
                if cls in sections.values():  # sections are read back by their class
                    raise PluginError(f"two config sections are declared with {cls.__qualname__}")
                sections[name] = cls
        return sections

    def migrations(self) -> list[Migration]:
        return [m for result in self._relay.lightd_add_migrations() for m in result]

    def configure(self, agent: Agent) -> None:
        self._relay.lightd_configure(agent=agent)

    def services(self, agent: Agent) -> list[Service]:
        # pluggy returns the last registered first; services start in registration order.
        results = self._relay.lightd_add_services(agent=agent)
        return [s for result in reversed(results) for s in result]

    def routes(self, agent: Agent) -> list[Blueprint]:
        results = self._relay.lightd_add_routes(agent=agent)
        return [bp for result in reversed(results) for bp in result]

    async def startup(self, agent: Agent) -> None:
        await _await_all(self._relay.lightd_startup(agent=agent))

    async def config_reloaded(self, agent: Agent, old: Config, new: Config) -> None:
        await _await_all(self._relay.lightd_config_reloaded(agent=agent, old=old, new=new))

    async def shutdown(self, agent: Agent) -> None:
        await _await_all(self._relay.lightd_shutdown(agent=agent))

    async def container_state_changed(
        self, agent: Agent, internal_id: str, state: str, error: str | None = None
    ) -> None:
        await _await_all(
            self._relay.lightd_container_state_changed(
                agent=agent, internal_id=internal_id, state=state, error=error
            )
        )

    async def container_deleted(self, agent: Agent, internal_id: str) -> None:
        await _await_all(self._relay.lightd_container_deleted(agent=agent, internal_id=internal_id))

    def run_install_script(self, agent: Agent, job: InstallJob) -> InstallRun | None:
        result: InstallRun | None = self._relay.lightd_run_install_script(agent=agent, job=job)
        return result

    async def job_changed(self, agent: Agent, job: JobView) -> None:
        await _await_all(self._relay.lightd_job_changed(agent=agent, job=job))

    async def job_done(self, agent: Agent, job: JobView) -> None:
        await _await_all(self._relay.lightd_job_done(agent=agent, job=job))

    async def container_network_changed(
        self, agent: Agent, internal_id: str, ports: Sequence[PoolPort]
    ) -> None:
        await _await_all(
            self._relay.lightd_container_network_changed(
                agent=agent, internal_id=internal_id, ports=ports
            )
        )

    def container_starting(self, agent: Agent, internal_id: str, volume_id: str) -> None:
        self._relay.lightd_container_starting(
            agent=agent, internal_id=internal_id, volume_id=volume_id
        )

    def takes_stats_samples(self) -> bool:
        """Does a plugin implement ``lightd_stats_sample``? (Else readers take none while
        nobody listens.)"""
        return bool(self._relay.lightd_stats_sample.get_hookimpls())

    def stats_sample(
        self,
        agent: Agent,
        internal_id: str,
        container_id: str,
        volume_id: str,
        started_at: float | None,
        sample: Sample,
    ) -> None:
        """Each implementation on its own: one that raises is logged, the others still
        get the sample, and the stats reader goes on."""
        args = {
            "agent": agent,
            "internal_id": internal_id,
            "container_id": container_id,
            "volume_id": volume_id,
            "started_at": started_at,
            "sample": sample,
        }
        for impl in reversed(self._relay.lightd_stats_sample.get_hookimpls()):
            try:
                impl.function(*[args[name] for name in impl.argnames])
            except Exception:  # a plugin's bug must not stop the stats reader
                log.exception("plugin %r failed in lightd_stats_sample (ignored)", impl.plugin_name)

    def volume_in_use(self, agent: Agent, volume_id: str) -> str | None:
        result: str | None = self._relay.lightd_volume_in_use(agent=agent, volume_id=volume_id)
        return result

    def volume_running(self, agent: Agent, volume_id: str) -> str | None:
        result: str | None = self._relay.lightd_volume_running(agent=agent, volume_id=volume_id)
        return result

    async def volume_deleted(self, agent: Agent, volume_id: str, backups: str = "keep") -> None:
        await _await_all(
            self._relay.lightd_volume_deleted(agent=agent, volume_id=volume_id, backups=backups)
        )

    def backup_targets(self, agent: Agent) -> dict[str, BackupTarget]:
        targets: dict[str, BackupTarget] = {}
        for result in reversed(self._relay.lightd_backup_targets(agent=agent)):
            for name, target in result.items():
                if name in targets:
                    raise PluginError(f"two plugins declare the backup target {name!r}")
                targets[name] = target
        return targets

    async def panel_update(self, agent: Agent, key: str, update: Mapping[str, Any]) -> None:
        await _await_all(self._relay.lightd_panel_update(agent=agent, key=key, update=update))


async def _await_all(results: Iterable[Awaitable[None] | None]) -> None:
    for result in results:
        if inspect.isawaitable(result):
            await result
