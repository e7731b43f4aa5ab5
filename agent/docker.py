"""The only module that talks to the Docker engine (the only one importing ``docker``).

The calls on every container's path are trio-native, with no thread: control calls
(create, start, kill, inspect, remove, list, wait) on httpcore, attach and events on
httpx, over the engine's socket. Under load a thread per call costs more than the call:
twenty docker-py threads contending for the GIL delayed the event loop (and its store
writes) by tens of milliseconds. docker-py still
builds the create body (its mapping of options to the engine's JSON is pure) and serves
the rare calls (version, pull, the probe) from worker threads, on limiters of their own
rather than trio's default one. See ../shared/notes/docker-under-trio.md.

The engine may be absent at start or go away later. The agent keeps serving either way:
``serve`` (a service) probes the engine, connects when it answers and reconnects after it
comes back; while it is away every call raises ``DockerUnavailable``, which the API answers
as ``503 {"error": "Docker engine unreachable"}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import attrs
import docker
import httpcore
import httpx
import requests
import trio

from .errors import AgentError, DockerUnavailable

__all__ = [
    "AttachStream",
    "DockerConflict",
    "DockerEngine",
    "DockerError",
    "DockerNotFound",
    "EngineInfo",
    "container_states",
    "docker_url",
]


class DockerError(AgentError):
    """The engine answered, and refused (the message is the engine's explanation)."""


class DockerNotFound(DockerError):
    """The engine has no such object (container, image)."""


class DockerConflict(DockerError):
    """The engine refused because of a conflict (a container name already taken)."""


log = logging.getLogger(__name__)

T = TypeVar("T")

#: Errors that mean "the engine did not answer", as opposed to a refusal it answered with.
_UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout)

#: httpcore's "the engine did not answer (in time)" (a request we could not even write,
#: a ``LocalProtocolError``, is our fault, not the engine's).
_TRANSPORT_ERRORS = (
    httpcore.NetworkError,
    httpcore.TimeoutException,
    httpcore.RemoteProtocolError,
)

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
    #: The API version spoken with the engine (negotiated: the lower of both sides').
    api_version: str
    os: str
    arch: str


class AttachStream:
    """A container's attached stdin/stdout/stderr, trio-native (no thread per read).

    Non-TTY containers multiplex output as frames: an 8-byte header (stream id, 3 zero
    bytes, big-endian length) then the payload. ``receive`` returns the next payload
    chunk of stdout/stderr; ``send`` writes to the container's stdin.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            try:
                chunk = await self._stream.read(65536)
            except httpcore.NetworkError:
                return False  # the engine cut the stream: as good as the end of output
            if not chunk:
                return False
            self._buffer += chunk
        return True

    async def receive(self) -> bytes | None:
        """The next output frame's payload, or ``None`` when the container's output ends."""
        while True:
            if not await self._fill(8):
                return None
            length = int.from_bytes(self._buffer[4:8], "big")
            if not await self._fill(8 + length):
                return None
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            if payload:
                return payload

    async def send(self, data: bytes) -> None:
        """Write to stdin; ``trio.BrokenResourceError`` when the stream is gone."""
        try:
            await self._stream.write(data)
        except httpcore.NetworkError as exc:
            raise trio.BrokenResourceError("the container's stdin is closed") from exc

    async def aclose(self) -> None:
        await self._stream.aclose()


class _ControlConnections:
    """Keep-alive connections for control calls, reused last-in first-out.

    httpcore's own pool rescans every connection (and, for each idle one, every other) on
    each request and each response closed; with twenty creates in flight that scanning
    cost more than the requests' HTTP work. Here taking a connection is a pop, and a
    stale one (the engine restarted) is noticed the way httpcore's pool notices it.
    """

    #: Idle connections kept for the next calls.
    KEEP = 16

    def __init__(self, origin: httpcore.Origin, uds: str | None) -> None:
        self._origin = origin
        self._uds = uds
        self._idle: list[httpcore.AsyncHTTPConnection] = []

    async def request(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        content: bytes | None,
        extensions: dict[str, Any],
    ) -> httpcore.Response:
        connection = None
        while self._idle:
            candidate = self._idle.pop()
            if candidate.is_idle() and not candidate.has_expired():
                connection = candidate
                break
            await candidate.aclose()
        if connection is None:
            connection = httpcore.AsyncHTTPConnection(self._origin, uds=self._uds)
        origin = self._origin
        url = httpcore.URL(scheme=origin.scheme, host=origin.host, port=origin.port, target=target)
        try:
            response = await connection.request(
                method, url, headers=headers, content=content, extensions=extensions
            )
        except BaseException:
            with trio.CancelScope(shield=True):
                await connection.aclose()
            raise
        if connection.is_idle() and len(self._idle) < self.KEEP:
            self._idle.append(connection)
        else:
            await connection.aclose()
        return response

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await connection.aclose()


class DockerEngine:
    """Async front of one ``docker.DockerClient``; see the module docstring."""

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.probe_interval = PROBE_INTERVAL
        self.retry_max = RETRY_MAX
        #: docker-py calls in threads: short ones (version, the probe)…
        self.control_limiter = trio.CapacityLimiter(16)
        #: … and ones that hold a thread for a long time (pull).
        self.stream_limiter = trio.CapacityLimiter(512)
        #: Native control calls in flight (a bound on connections and on the engine's load;
        #: high enough that a burst of creates is not queued behind itself).
        self.request_limiter = trio.CapacityLimiter(64)
        self._client: docker.DockerClient | None = None
        self._http: httpx.AsyncClient | None = None
        self._pool: _ControlConnections | None = None
        self.info: EngineInfo | None = None
        self.last_error: str | None = None
        self._probe_now = trio.Event()
        self._connected = trio.Event()

    @property
    def available(self) -> bool:
        return self._client is not None

    async def wait_available(self) -> None:
        """Return once the engine answers (at once if it does now)."""
        while self._client is None:
            await self._connected.wait()

    async def call(self, fn: Callable[[docker.DockerClient], T]) -> T:
        """Run ``fn(client)`` in a control thread; ``DockerUnavailable`` if the engine is away."""
        return await self._run(fn, self.control_limiter)

    async def create_container(self, options: Mapping[str, Any]) -> str:
        """``containers.create(**options)`` in one engine request (docker-py adds an
        inspect after it); returns the new container's id."""
        client = self._client
        if client is None:
            raise DockerUnavailable()
        body, name = _create_body(client.api, options)
        params = {"name": name} if name else None
        created = await self.request("POST", "/containers/create", params=params, body=body)
        return str(created["Id"])

    async def inspect_container(self, container_id: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/containers/{_quote(container_id)}/json"))

    async def inspect_image(self, image: str) -> dict[str, Any]:
        return dict(await self.request("GET", f"/images/{_quote(image)}/json"))

    async def start(self, container_id: str) -> None:
        await self.request("POST", f"/containers/{_quote(container_id)}/start")

    async def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        path = f"/containers/{_quote(container_id)}/kill"
        await self.request("POST", path, params={"signal": signal})

    async def remove_container(self, container_id: str, *, volumes: bool = False) -> None:
        """Remove it, running or not."""
        params = {"force": "1", "v": "1" if volumes else "0"}
        await self.request("DELETE", f"/containers/{_quote(container_id)}", params=params)

    async def containers(self, labels: list[str]) -> list[dict[str, Any]]:
        """Every container (running or not) carrying all of ``labels``."""
        params = {"all": "1", "filters": json.dumps({"label": labels})}
        return list(await self.request("GET", "/containers/json", params=params))

    async def wait(self, container_id: str) -> dict[str, Any]:
        """Block until the container exits; its ``StatusCode``. Abandoned on cancel (it
        changes nothing), and not bounded by the engine timeout."""
        path = f"/containers/{_quote(container_id)}/wait"
        return dict(await self.request("POST", path, long=True))

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        long: bool = False,
    ) -> Any:
        """One engine request under the API version prefix; the decoded JSON answer.

        On httpcore directly (see ``_ControlConnections``): httpx's client layers (URL
        merging, auth and redirect handling, response models) cost as much again as the
        request itself.

        A control call is waited for even when cancelled (its effect must be known: a
        create or start abandoned half-way would leave Docker ahead of the agent; the
        engine timeout bounds it); the cancellation surfaces at the caller's next
        checkpoint. A ``long`` call (wait) has no timeout and is abandoned on cancel.
        """
        _, pool, prefix = self._native()
        client = self._client
        target = (prefix + path + ("?" + urlencode(params) if params else "")).encode()
        content = None if body is None else json.dumps(body).encode()
        headers = [] if content is None else [(b"Content-Type", b"application/json")]
        limit = self.timeout
        timeout = {"connect": limit, "read": None if long else limit, "write": limit, "pool": limit}
        # A caller cancelled while waiting for a slot has sent nothing: it may go.
        async with contextlib.nullcontext() if long else self.request_limiter:
            with trio.CancelScope(shield=not long):
                try:
                    response = await pool.request(
                        method.encode(), target, headers, content, {"timeout": timeout}
                    )
                except _TRANSPORT_ERRORS as exc:
                    if client is not None:
                        self._lost(client, exc)
                    raise DockerUnavailable() from None
        if response.status >= 400:
            message = _answer_message(response.status, response.content)
            if response.status == 404:
                raise DockerNotFound(message)
            if response.status == 409:
                raise DockerConflict(message)
            raise DockerError(message)
        return json.loads(response.content) if response.content else None

    async def stream(self, fn: Callable[[docker.DockerClient], T]) -> T:
        """Like ``call``, on the stream limiter, for calls that block for a long time."""
        return await self._run(fn, self.stream_limiter, abandon=True)

    async def _run(
        self,
        fn: Callable[[docker.DockerClient], T],
        limiter: trio.CapacityLimiter,
        *,
        abandon: bool = False,
    ) -> T:
        """A control call is waited for even when cancelled (its effect must be known: a
        create or start abandoned half-way would leave Docker ahead of the agent; the
        engine timeout bounds it); a stream may be abandoned (its caller closes it)."""
        client = self._client
        if client is None:
            raise DockerUnavailable()
        try:
            return await trio.to_thread.run_sync(
                fn, client, limiter=limiter, abandon_on_cancel=abandon
            )
        except _UNREACHABLE as exc:
            self._lost(client, exc)
            raise DockerUnavailable() from None
        except docker.errors.NotFound as exc:
            raise DockerNotFound(_explain(exc)) from None
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise DockerConflict(_explain(exc)) from None
            raise DockerError(_explain(exc)) from None

    def _lost(self, client: docker.DockerClient, exc: BaseException) -> None:
        if self._client is client:
            log.warning("Docker engine at %s stopped answering: %s", self.base_url, _short(exc))
            self._client = None
            self._connected = trio.Event()
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
            api_version=str(client.api._version),
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
                        if self._http is None:
                            self._http = self._native_client()
                            self._pool = self._control_pool()
                        self._connected.set()
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
            if self._http is not None:
                with trio.CancelScope(shield=True):
                    await self._http.aclose()
            if self._pool is not None:
                with trio.CancelScope(shield=True):
                    await self._pool.aclose()

    # -- trio-native streams (httpx over the same socket): no thread per stream ------------

    def _native_client(self) -> httpx.AsyncClient:
        # Every running server holds one connection (its attach), and so does the events
        # stream: httpx's default cap of 100 would stall the 100th server's start.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=4)
        url = self.base_url
        timeout = httpx.Timeout(self.timeout)
        if url.startswith("unix://"):
            transport = httpx.AsyncHTTPTransport(uds=url.removeprefix("unix://"), limits=limits)
            return httpx.AsyncClient(transport=transport, base_url="http://docker", timeout=timeout)
        return httpx.AsyncClient(
            base_url=url.replace("tcp://", "http://", 1), limits=limits, timeout=timeout
        )

    def _control_pool(self) -> _ControlConnections:
        url = self.base_url
        if url.startswith("unix://"):
            return _ControlConnections(httpcore.Origin(b"http", b"docker", 80), url[7:])
        parsed = httpx.URL(url.replace("tcp://", "http://", 1))
        origin = httpcore.Origin(b"http", parsed.host.encode("ascii"), parsed.port or 80)
        return _ControlConnections(origin, None)

    def _native(self) -> tuple[httpx.AsyncClient, _ControlConnections, str]:
        """The streams' client, the control connections and the API path prefix."""
        if self._client is None or self._http is None or self._pool is None or not self.info:
            raise DockerUnavailable()
        return self._http, self._pool, f"/v{self.info.api_version}"

    @asynccontextmanager
    async def attach(self, container_id: str) -> AsyncIterator[AttachStream]:
        """Attach to a container's stdio (before or after it starts); closed on exit.

        Attaching before ``start`` loses no output; one attach serves both the console
        reader and the stdin writer.
        """
        http, _, prefix = self._native()
        request = http.build_request(
            "POST",
            f"{prefix}/containers/{container_id}/attach",
            params={"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1"},
            headers={"Connection": "Upgrade", "Upgrade": "tcp"},
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.TransportError as exc:
            self._probe_now.set()
            raise DockerUnavailable() from exc
        try:
            if response.status_code == 404:
                raise DockerNotFound(f"No such container: {container_id}")
            if response.status_code != 101:
                body = (await response.aread()).decode("utf-8", "replace")
                raise DockerError(_short(Exception(body or f"attach: {response.status_code}")))
            stream = AttachStream(response.extensions["network_stream"])
            try:
                yield stream
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def watch_events(
        self,
        filters: Mapping[str, list[str]],
        handle: Callable[[dict[str, Any]], Awaitable[None]],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Stream engine events matching ``filters`` to ``handle`` until the stream ends.

        Reports ready once the engine has accepted the subscription, so an event caused
        by a call made after ``started()`` is never missed. Raises ``DockerUnavailable``
        when the engine is away or the stream breaks.
        """
        http, _, prefix = self._native()
        try:
            async with http.stream(
                "GET",
                f"{prefix}/events",
                params={"filters": json.dumps(filters)},
                timeout=httpx.Timeout(self.timeout, read=None),
            ) as response:
                if response.status_code != 200:
                    raise DockerError(f"events: HTTP {response.status_code}")
                task_status.started()
                async for line in response.aiter_lines():
                    if line.strip():
                        await handle(json.loads(line))
        except httpx.TransportError as exc:
            self._probe_now.set()
            raise DockerUnavailable() from exc


def container_states(base_url: str, labels: list[str], *, timeout: float = 5) -> dict[str, str]:
    """Blocking, for the CLI: Docker's status of each labelled container, by internal id.

    Empty when the engine does not answer (the caller shows the state as unknown).
    """
    try:
        client = docker.DockerClient(base_url=base_url, version="auto", timeout=timeout)
    except (docker.errors.DockerException, *_UNREACHABLE):
        return {}
    try:
        listed = client.api.containers(all=True, filters={"label": labels})
    except (docker.errors.DockerException, *_UNREACHABLE):
        return {}
    finally:
        client.close()
    return {
        (item.get("Labels") or {}).get("lightd.internal_id", ""): str(item.get("State", ""))
        for item in listed
        if (item.get("Labels") or {}).get("lightd.role") == "server"
    }


def _quote(segment: str) -> str:
    """A name in a request path, quoted as docker-py quotes it (``/`` and ``:`` kept: image
    names have them): a space or ``?`` in an image name must not break the request."""
    return quote(segment, safe="/:")


def _create_body(api: docker.APIClient, options: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """docker-py's own mapping of ``containers.create`` options to the engine's JSON body
    (no I/O), and the container name; as ``APIClient.create_container`` does it."""
    kwargs = {"command": None, **options, "version": api._version}
    args = docker.models.containers._create_container_args(kwargs)
    name = args.pop("name", None)
    environment = args.pop("environment", None)
    if isinstance(environment, dict):
        environment = docker.utils.utils.format_environment(environment)
    if args.pop("use_config_proxy", True):
        environment = api._proxy_configs.inject_proxy_environment(environment) or None
    if args.pop("platform", None):
        raise DockerError("platform is not supported")
    config = api.create_container_config(environment=environment, **args)
    return {k: v for k, v in config.items() if v is not None}, name


def _answer_message(status: int, content: bytes) -> str:
    """The engine's explanation of a refusal (its JSON ``message``), one short line."""
    text = content.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return _short(Exception(message or text or f"HTTP {status}"))


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode("utf-8", "replace")
    return _short(Exception(explanation or str(exc)))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
