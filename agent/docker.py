"""The only module that talks to the Docker engine (the only one importing ``docker``).

docker-py blocks, so every call runs in a worker thread, on limiters of its own rather
than trio's default one (40 threads, shared with file I/O and DNS): a small one for control
calls and a large one for long-lived streams (events, logs, attach, stats), which hold
their thread for as long as they run. See ../shared/notes/docker-under-trio.md.

The engine may be absent at start or go away later. The agent keeps serving either way:
``serve`` (a service) probes the engine, connects when it answers and reconnects after it
comes back; while it is away every call raises ``DockerUnavailable``, which the API answers
as ``503 {"error": "Docker engine unreachable"}``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
import docker
import requests
import trio

from .errors import DockerUnavailable

__all__ = ["DockerEngine", "EngineInfo", "docker_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean "the engine did not answer", as opposed to a refusal it answered with.
_UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)

#: Seconds between health probes while connected, and the back-off cap while away.
PROBE_INTERVAL = 10.0
RETRY_MAX = 5.0


def docker_url(socket_path: str, environ: Mapping[str, str] | None = None) -> str:
    """``DOCKER_HOST`` when set, else the configured unix socket."""
    environ = os.environ if environ is None else environ
    host = environ.get("DOCKER_HOST")
    if host:
        return host
    return socket_path if "://" in socket_path else f"unix://{socket_path}"


@attrs.frozen
class EngineInfo:
    version: str
    api_version: str
    os: str
    arch: str


class DockerEngine:
    """Async front of one ``docker.DockerClient``; see the module docstring."""

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.probe_interval = PROBE_INTERVAL
        self.retry_max = RETRY_MAX
        #: Short request/response calls (create, start, inspect, kill…).
        self.control_limiter = trio.CapacityLimiter(16)
        #: Calls that hold a thread for a long time (events, logs, attach, stats).
        self.stream_limiter = trio.CapacityLimiter(512)
        self._client: docker.DockerClient | None = None
        self.info: EngineInfo | None = None
        self.last_error: str | None = None
        self._probe_now = trio.Event()

    @property
    def available(self) -> bool:
        return self._client is not None

    async def call(self, fn: Callable[[docker.DockerClient], T]) -> T:
        """Run ``fn(client)`` in a control thread; ``DockerUnavailable`` if the engine is away."""
        return await self._run(fn, self.control_limiter)

    async def stream(self, fn: Callable[[docker.DockerClient], T]) -> T:
        """Like ``call``, on the stream limiter, for calls that block for a long time."""
        return await self._run(fn, self.stream_limiter)

    async def _run(
        self, fn: Callable[[docker.DockerClient], T], limiter: trio.CapacityLimiter
    ) -> T:
        client = self._client
        if client is None:
            raise DockerUnavailable()
        try:
            return await trio.to_thread.run_sync(
                fn, client, limiter=limiter, abandon_on_cancel=True
            )
        except _UNREACHABLE as exc:
            self._lost(client, exc)
            raise DockerUnavailable() from None

    def _lost(self, client: docker.DockerClient, exc: BaseException) -> None:
        if self._client is client:
            log.warning("Docker engine at %s stopped answering: %s", self.base_url, _short(exc))
            self._client = None
            self.last_error = _short(exc)
            self._probe_now.set()
            client.close()

    def _connect(self) -> tuple[docker.DockerClient, EngineInfo]:
        client = docker.DockerClient(
            base_url=self.base_url, version="auto", timeout=self.timeout, max_pool_size=64
        )
        try:
            raw: dict[str, Any] = client.version()
        except BaseException:
            client.close()
            raise
        return client, EngineInfo(
            version=str(raw.get("Version", "")),
            api_version=str(raw.get("ApiVersion", "")),
            os=str(raw.get("Os", "")),
            arch=str(raw.get("Arch", "")),
        )

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to the engine: probe, connect, notice loss, reconnect.

        Reports ready after the first attempt whatever its outcome: the agent must come up
        without an engine.
        """
        delay = 0.5
        started = False
        try:
            while True:
                client = self._client
                if client is None:
                    try:
                        client, info = await trio.to_thread.run_sync(
                            self._connect, limiter=self.control_limiter, abandon_on_cancel=True
                        )
                    except (docker.errors.DockerException, *_UNREACHABLE) as exc:
                        if self.last_error != _short(exc) or not started:
                            log.warning(
                                "Docker engine at %s unreachable: %s (retrying)",
                                self.base_url,
                                _short(exc),
                            )
                        self.last_error = _short(exc)
                    else:
                        self._client, self.info, self.last_error = client, info, None
                        delay = 0.5
                        log.info(
                            "Docker engine %s (API %s) at %s",
                            info.version,
                            info.api_version,
                            self.base_url,
                        )
                else:
                    try:
                        await trio.to_thread.run_sync(
                            client.ping, limiter=self.control_limiter, abandon_on_cancel=True
                        )
                    except (docker.errors.DockerException, *_UNREACHABLE) as exc:
                        self._lost(client, exc)
                        continue
                if not started:
                    started = True
                    task_status.started()
                self._probe_now = trio.Event()
                with trio.move_on_after(self.probe_interval if self._client else delay):
                    await self._probe_now.wait()
                if self._client is None:
                    delay = min(delay * 2, self.retry_max)
        finally:
            if self._client is not None:
                self._client.close()
                self._client = None


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
