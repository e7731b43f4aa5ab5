"""The agent object: what routes, services and hooks are handed.

``open_agent`` builds an ``Agent`` (config, plugins, state store, Docker adapter) and
tears it down; ``lightd.server.serve_agent`` runs it. This module knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import attrs
import trio

from ._version import __version__
from .config import Config, LoadedConfig, load_config
from .docker import DockerEngine, docker_url
from .errors import ConfigError
from .events import EventsSettings, NodeEvents
from .metrics import Metrics
from .plugin_manager import Hooks, make_plugin_manager
from .store import Store, open_store

if TYPE_CHECKING:
    from quart_trio import QuartTrio

__all__ = ["Agent", "Service", "Stash", "StashKey", "StoragePaths", "open_agent"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class StashKey(Generic[T]):
    """A typed key under which a plugin keeps its state object on the agent."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """Per-agent storage for plugins' state objects, typed by ``StashKey``."""

    def __init__(self) -> None:
        self._items: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._items[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return cast("T", self._items[key])

    def get(self, key: StashKey[T], default: T | None = None) -> T | None:
        return cast("T | None", self._items.get(key, default))

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast("T", self._items.setdefault(key, default))

    def __contains__(self, key: object) -> bool:
        return key in self._items


@attrs.frozen
class Service:
    """A long-running task a plugin declares; ``run(task_status=…)`` reports readiness."""

    name: str
    run: Callable[..., Awaitable[None]]
    restart: bool = True


@attrs.frozen
class StoragePaths:
    """Absolute storage folders; relative ones in config.json are relative to its folder."""

    base: Path
    containers: Path
    volumes: Path

    @classmethod
    def from_config(cls, config: Config, directory: Path) -> StoragePaths:
        storage = config.storage
        return cls(
            base=(directory / storage.base_path).resolve(),
            containers=(directory / storage.containers_path).resolve(),
            volumes=(directory / storage.volumes_path).resolve(),
        )

    def ensure(self) -> None:
        """Create the folders; a path that exists but is not a folder is a config error."""
        for key, path in (
            ("storage.base_path", self.base),
            ("storage.containers_path", self.containers),
            ("storage.volumes_path", self.volumes),
        ):
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o700)
            except FileExistsError:
                raise ConfigError(key, f"{path} exists and is not a folder") from None
            except OSError as exc:
                raise ConfigError(key, f"cannot create {path}: {exc.strerror}") from None


#: Settings that only a restart applies; a reload that changes them logs so.
_RESTART_ONLY = ("server.host", "server.port", "storage", "docker", "plugins")


class Agent:
    """One running node agent: what routes, services and hooks are handed.

    Attributes plugins use: ``config`` (typed, current), ``paths``, ``store``, ``docker``,
    ``hooks``, ``stash``, ``metrics`` (this agent's Prometheus registry and the way to add
    series to it), ``events`` (the node event stream: ``agent.events.publish(type, data)``,
    contract §17), ``clock`` (unix seconds; tests replace it), ``version``.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        hooks: Hooks,
        sections: Mapping[str, type],
        store: Store,
        docker: DockerEngine,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.hooks = hooks
        self.sections = dict(sections)
        self.store = store
        self.docker = docker
        self.clock = clock
        self.stash = Stash()
        self.metrics = metrics if metrics is not None else Metrics()
        #: The node event ring (``lightd.events``); its size is the ``events`` section's.
        self.events = NodeEvents.for_settings(
            loaded.config.section_or_default(EventsSettings), clock
        )
        self.paths = StoragePaths.from_config(loaded.config, loaded.directory)
        self.version = __version__
        self.started_at = clock()
        #: Bound URLs once the API listens (``http://127.0.0.1:8070``).
        self.urls: list[str] = []
        self.app: QuartTrio | None = None
        self._stop = trio.Event()

    @property
    def config_path(self) -> Path:
        return self.loaded.path

    def request_stop(self) -> None:
        """Begin a graceful shutdown (idempotent)."""
        self._stop.set()

    async def wait_stop_requested(self) -> None:
        await self._stop.wait()

    async def reload_config(self) -> Config:
        """Re-read config.json and apply what can change live; ``ConfigError`` keeps the old."""
        loaded = await trio.to_thread.run_sync(load_config, self.loaded.path, self.sections)
        old, new = self.config, loaded.config
        for name in _RESTART_ONLY:
            if _get(old, name) != _get(new, name):
                log.warning("config reload: %s changed; it takes effect at the next restart", name)
        self.loaded, self.config = loaded, new
        if self.app is not None:
            self.app.config["MAX_CONTENT_LENGTH"] = new.server.max_body_bytes
        if not new.authorization.enabled:
            log.warning("authorization is disabled: every request is accepted without a token")
        await self.hooks.config_reloaded(self, old, new)
        log.info("configuration reloaded from %s", loaded.path)
        return new


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@asynccontextmanager
async def open_agent(
    config_path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    extra_plugins: Iterable[tuple[str, object]] = (),
    load_entrypoints: bool = True,
    clock: Callable[[], float] = time.time,
    on_config: Callable[[Config], object] | None = None,
) -> AsyncIterator[Agent]:
    """Build an agent from a config file: plugins, config sections, storage, store, Docker.

    ``on_config`` is called with the core config as soon as it is read, before the plugins
    are imported: the command line starts work there that can run beside that import.

    Raises ``ConfigError`` for a bad config (including plugin sections), ``PluginError`` for
    a broken plugin and ``StoreError`` for an unusable state store.
    """
    core = await trio.to_thread.run_sync(load_config, config_path)
    if on_config is not None:
        on_config(core.config)
    pm = make_plugin_manager(
        core.config.plugins.disabled, load_entrypoints=load_entrypoints, extra=extra_plugins
    )
    hooks = Hooks(pm)
    sections = hooks.config_sections()
    loaded = await trio.to_thread.run_sync(load_config, config_path, sections)
    paths = StoragePaths.from_config(loaded.config, loaded.directory)
    await trio.to_thread.run_sync(paths.ensure)
    metrics = Metrics()
    engine = DockerEngine(
        docker_url(loaded.config.docker.socket_path, environ),
        timeout=loaded.config.docker.timeout,
        observer=metrics.docker_call,
    )
    async with open_store(paths.base, hooks.migrations()) as store:
        agent = Agent(
            loaded,
            hooks=hooks,
            sections=sections,
            store=store,
            docker=engine,
            clock=clock,
            metrics=metrics,
        )
        hooks.configure(agent)
        yield agent
