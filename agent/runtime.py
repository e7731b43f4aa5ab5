"""The agent object and its runtime: one root nursery that owns every long-lived task.

``open_agent`` builds an ``Agent`` (config, plugins, state store, Docker adapter) and
tears it down; ``serve_agent`` runs it: services first (each reports readiness), then the
HTTP API on hypercorn, until ``Agent.request_stop`` (SIGINT/SIGTERM when the CLI runs it).
Shutdown: the API stops accepting and drains for ``server.graceful_timeout``, plugins get
``lightd_shutdown`` within the same bound, then the services are cancelled.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import attrs
import hypercorn.config
import hypercorn.trio
import trio

from . import __version__
from .config import Config, LoadedConfig, load_config
from .docker import DockerEngine, docker_url
from .errors import ConfigError
from .plugin_manager import Hooks, make_plugin_manager
from .store import Store, open_store

if TYPE_CHECKING:
    from quart_trio import QuartTrio

__all__ = ["Agent", "Service", "Stash", "StashKey", "StoragePaths", "open_agent", "serve_agent"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Restart back-off of a crashed service, in seconds.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)


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
    ``hooks``, ``stash``, ``clock`` (unix seconds; tests replace it), ``version``.
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
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.hooks = hooks
        self.pm = hooks.pm
        self.sections = dict(sections)
        self.store = store
        self.docker = docker
        self.clock = clock
        self.stash = Stash()
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
) -> AsyncIterator[Agent]:
    """Build an agent from a config file: plugins, config sections, storage, store, Docker.

    Raises ``ConfigError`` for a bad config (including plugin sections), ``PluginError`` for
    a broken plugin and ``StoreError`` for an unusable state store.
    """
    core = await trio.to_thread.run_sync(load_config, config_path)
    pm = make_plugin_manager(
        core.config.plugins.disabled, load_entrypoints=load_entrypoints, extra=extra_plugins
    )
    hooks = Hooks(pm)
    sections = hooks.config_sections()
    loaded = await trio.to_thread.run_sync(load_config, config_path, sections)
    paths = StoragePaths.from_config(loaded.config, loaded.directory)
    await trio.to_thread.run_sync(paths.ensure)
    engine = DockerEngine(
        docker_url(loaded.config.docker.socket_path, environ), timeout=loaded.config.docker.timeout
    )
    async with open_store(paths.base, hooks.migrations()) as store:
        agent = Agent(
            loaded, hooks=hooks, sections=sections, store=store, docker=engine, clock=clock
        )
        hooks.configure(agent)
        yield agent


class _Readiness:
    """The ``task_status`` handed to a service: remembers that it reported ready."""

    def __init__(self, forward: trio.TaskStatus[None]) -> None:
        self.forward = forward
        self.ready = False

    def started(self, value: object = None) -> None:
        self.ready = True
        self.forward.started()


async def _supervise(
    service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a service; once it has reported ready, log and restart it when it crashes."""
    readiness = _Readiness(task_status)
    failures = 0
    while True:
        try:
            if readiness.ready:
                await service.run(task_status=trio.TASK_STATUS_IGNORED)
            else:
                await service.run(task_status=readiness)
        except Exception:  # the one place that supervises services: log, back off, restart
            if not readiness.ready:
                raise
            log.exception("service %r crashed", service.name)
            if not service.restart:
                return
            await trio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])
            failures += 1
        else:
            log.info("service %r finished", service.name)
            return


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_agent(
    agent: Agent,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until ``request_stop`` (or SIGINT/SIGTERM with ``handle_signals``).

    Reports the bound URLs with ``task_status.started`` once the API listens.
    """
    from .api.app import create_app  # the API imports the runtime's types

    config = agent.config
    if not config.authorization.enabled:
        log.warning("authorization is disabled: every request is accepted without a token")
    async with trio.open_nursery() as root:
        if handle_signals:
            await root.start(_watch_signals, agent)
        await root.start(_supervise, Service("docker", agent.docker.serve))
        for service in agent.hooks.services(agent):
            await root.start(_supervise, service)
        app = create_app(agent, agent.hooks.routes(agent))
        agent.app = app
        hcfg = hypercorn.config.Config()
        hcfg.bind = [_bind(config.server.host, config.server.port)]
        hcfg.graceful_timeout = config.server.graceful_timeout
        hcfg.accesslog = None
        hcfg.errorlog = logging.getLogger("hypercorn.error")
        hcfg.include_server_header = False
        websocket = config.sections.get("websocket")
        if websocket is not None:  # refuse oversized inbound frames (1009) before buffering them
            hcfg.websocket_max_message_size = websocket.max_frame_bytes
        async with trio.open_nursery() as http:
            urls = await http.start(
                partial(hypercorn.trio.serve, app, hcfg, shutdown_trigger=agent.wait_stop_requested)
            )
            agent.urls = list(urls)
            log.info("Lightd %s listening on %s", agent.version, ", ".join(agent.urls))
            await agent.hooks.startup(agent)
            task_status.started(agent.urls)
        log.info("API stopped; shutting down")
        with trio.move_on_after(config.server.graceful_timeout) as scope:
            scope.shield = True
            await agent.hooks.shutdown(agent)
        if scope.cancelled_caught:
            log.warning(
                "plugins did not finish shutting down within %.1fs", config.server.graceful_timeout
            )
        root.cancel_scope.cancel()
    log.info("stopped")


async def _watch_signals(
    agent: Agent, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if agent._stop.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            agent.request_stop()
