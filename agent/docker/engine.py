"""The agent's Docker client: every call trio-native over the engine's socket, no thread.

Control calls (create, start, stop, kill, inspect, remove, list, wait, version, info…) go
on httpcore with connections of our own (``_ControlConnections``); streams (attach,
events, pull, stats) on httpx over the same socket. Under load a thread per call costs
more than the call: twenty docker-py threads contending for the GIL delayed the event
loop (and its store writes) by tens of milliseconds. See
../shared/notes/docker-under-trio.md.

The engine may be absent at start or go away later. The agent keeps serving either way:
``serve`` (a service) probes the engine, connects when it answers and reconnects after it
comes back; while it is away every call raises ``DockerUnavailable``, which the API answers
as ``503 {"error": "Docker engine unreachable"}``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlencode

import attrs
import httpcore
import httpx
import trio

from ..errors import DockerUnavailable
from .errors import DockerConflict, DockerError, DockerNotFound
from .spec import ContainerSpec, create_body
from .streams import AttachStream, JsonLines, demux

__all__ = [
    "Credentials",
    "DockerConflict",
    "DockerEngine",
    "DockerError",
    "DockerNotFound",
    "EngineInfo",
    "ExecResult",
    "PullProgress",
    "RegistryAuth",
    "call_name",
    "container_states",
    "docker_url",
    "registry_key",
    "registry_of",
    "split_image",
]


class _NoEngine(Exception):
    """Something answered on the socket, but not a Docker engine we can speak with."""


log = logging.getLogger(__name__)

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


class Credentials(Protocol):
    """A registry login (config ``docker.registries`` entries, a pull route's ``auth``)."""

    @property
    def username(self) -> str: ...

    @property
    def password(self) -> str: ...


@attrs.frozen
class RegistryAuth:
    """A registry login given with one pull (the password is kept out of ``repr``)."""

    username: str
    password: str = attrs.field(repr=False)


#: Names of Docker Hub's registry, as config keys may spell it.
_HUB = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)


def registry_of(image: str) -> str:
    """The registry host an image is pulled from (``docker.io`` for Docker Hub's), as
    the engine reads the name: a first component with a ``.`` or ``:``, or
    ``localhost``, is a registry."""
    first, slash, _ = image.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        return "docker.io" if first.lower() in _HUB else first.lower()
    return "docker.io"


def registry_key(key: str) -> str:
    """A ``docker.registries`` key as a registry host: scheme and path dropped, lower
    case, Docker Hub's names as ``docker.io`` (``https://index.docker.io/v1/``)."""
    host = key.strip().lower()
    host = host.split("://", 1)[1] if "://" in host else host
    host = host.split("/", 1)[0]
    return "docker.io" if host in _HUB else host


def _configured(registries: Mapping[str, Credentials], registry: str) -> Credentials | None:
    for key, credentials in registries.items():
        if registry_key(key) == registry:
            return credentials
    return None


def _auth_header(username: str, password: str, registry: str) -> str:
    document = {"username": username, "password": password, "serveraddress": registry}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode()


class PullProgress:
    """Bytes downloaded over all layers of a pull, from the engine's status lines.

    Each layer (``id``) reports ``Downloading`` with ``progressDetail {current,
    total}``; ``Verifying Checksum``, ``Download complete`` and ``Pull complete`` mean
    all of it arrived; ``Already exists`` layers are not downloaded and do not count;
    ``Extracting`` counts bytes written to disk, not downloaded, and is ignored.
    ``total`` is ``None`` until every layer still to download has announced its size
    (the engine downloads three at a time; the others wait without a size).
    """

    _COMPLETE = frozenset({"Verifying Checksum", "Download complete", "Pull complete"})
    _ANNOUNCED = frozenset({"Pulling fs layer", "Waiting"})

    def __init__(self) -> None:
        #: Layer id → [bytes downloaded, its size or None]
        self._layers: dict[str, list[int | None]] = {}

    @property
    def done(self) -> int:
        return sum(int(layer[0] or 0) for layer in self._layers.values())

    @property
    def total(self) -> int | None:
        sizes = [layer[1] for layer in self._layers.values()]
        if any(size is None for size in sizes):
            return None
        return sum(int(size or 0) for size in sizes)

    def feed(self, item: Mapping[str, Any]) -> bool:
        """Take one status line; whether ``done`` or ``total`` changed."""
        layer_id, status = item.get("id"), item.get("status")
        if not isinstance(layer_id, str) or not isinstance(status, str):
            return False
        before = (self.done, self.total)
        layer = self._layers.get(layer_id)
        if status in self._ANNOUNCED:
            if layer is None:
                self._layers[layer_id] = [0, None]
        elif status == "Already exists":
            self._layers.pop(layer_id, None)
        elif status == "Downloading":
            detail = item.get("progressDetail") or {}
            current, total = detail.get("current"), detail.get("total")
            layer = self._layers.setdefault(layer_id, [0, None])
            if isinstance(total, int) and total > 0:
                layer[1] = total
            if isinstance(current, int) and current >= 0:
                layer[0] = current if layer[1] is None else min(current, int(layer[1]))
        elif status in self._COMPLETE and layer is not None:
            if layer[1] is None:
                layer[1] = layer[0]
            layer[0] = layer[1]
        return (self.done, self.total) != before


@attrs.frozen
class ExecResult:
    """A finished (or timed-out) exec: ``exit_code`` is ``None`` when it was killed on
    timeout; ``output`` is stdout and stderr together, cut at the cap (``truncated``)."""

    exit_code: int | None
    output: bytes
    truncated: bool
    timed_out: bool


@attrs.frozen
class EngineInfo:
    version: str
    #: The API version spoken with the engine (the engine's own, as ``/version`` says).
    api_version: str
    os: str
    arch: str


def split_image(image: str) -> tuple[str, str]:
    """``repo[:tag|@digest]`` → ``(repo, tag or digest)``; the tag is ``latest`` when none
    is named (a ``:`` inside a registry's ``host:port`` is not a tag)."""
    repository, at, digest = image.rpartition("@")
    if at:
        return repository, digest
    repository, colon, tag = image.rpartition(":")
    if colon and "/" not in tag:
        return repository, tag
    return image, "latest"


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
    """The engine, as the agent uses it: one named async method per thing asked of it."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = 60.0,
        observer: Callable[[str, float], None] | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        #: Told of every control call the engine answered, ``long`` ones (wait, stop) left
        #: out: ``observer(call, seconds)``, the call as ``"POST /containers/{id}/start"``
        #: (the agent's metrics; this package knows nothing of them).
        self.observer = observer
        self.probe_interval = PROBE_INTERVAL
        self.retry_max = RETRY_MAX
        #: Control calls in flight (a bound on connections and on the engine's load; high
        #: enough that a burst of creates is not queued behind itself).
        self.request_limiter = trio.CapacityLimiter(64)
        self._http: httpx.AsyncClient | None = None
        self._pool: _ControlConnections | None = None
        #: Connected (the handshake answered, no call failed since).
        self._up = False
        #: Counts connections: a failure of a call made on an older one changes nothing.
        self._generation = 0
        self.info: EngineInfo | None = None
        self.last_error: str | None = None
        self._probe_now = trio.Event()
        self._connected = trio.Event()

    @property
    def available(self) -> bool:
        return self._up

    async def wait_available(self) -> None:
        """Return once the engine answers (at once if it does now)."""
        while not self._up:
            await self._connected.wait()

    # -- the engine ------------------------------------------------------------------------

    async def version(self) -> EngineInfo:
        """The engine's version, API version, OS and architecture, asked now."""
        return _engine_info(_expect(await self.request("GET", "/version"), dict))

    async def system_info(self) -> dict[str, Any]:
        """The engine's ``/info`` document (counts, storage driver, cgroup version…)."""
        return dict(_expect(await self.request("GET", "/info"), dict))

    async def ping(self) -> None:
        await self.request("GET", "/_ping", raw=True)

    # -- containers ------------------------------------------------------------------------

    async def create_container(self, spec: ContainerSpec) -> str:
        """Create a container from ``spec`` (one engine request); its id."""
        params = {"name": spec.name} if spec.name else None
        created = await self.request(
            "POST", "/containers/create", params=params, body=create_body(spec)
        )
        created = _expect(created, dict)
        if not isinstance(created.get("Id"), str):
            raise DockerError("Docker engine answered a create without a container id")
        return str(created["Id"])

    async def inspect_container(self, container_id: str) -> dict[str, Any]:
        return dict(
            _expect(await self.request("GET", f"/containers/{_quote(container_id)}/json"), dict)
        )

    async def start(self, container_id: str) -> None:
        await self.request("POST", f"/containers/{_quote(container_id)}/start")

    async def stop(self, container_id: str, *, grace: int | None = None) -> None:
        """SIGTERM (or the image's stop signal), then SIGKILL after ``grace`` seconds (the
        engine's default when ``None``). Returns once it is stopped; a stopped container is
        no error. Not bounded by the engine timeout, abandoned on cancel."""
        params = None if grace is None else {"t": str(grace)}
        await self.request(
            "POST", f"/containers/{_quote(container_id)}/stop", params=params, long=True
        )

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
        return list(_expect(await self.request("GET", "/containers/json", params=params), list))

    async def wait(self, container_id: str) -> dict[str, Any]:
        """Block until the container exits; its ``StatusCode``. Abandoned on cancel (it
        changes nothing), and not bounded by the engine timeout."""
        path = f"/containers/{_quote(container_id)}/wait"
        return dict(_expect(await self.request("POST", path, long=True), dict))

    async def update_container(self, container_id: str, resources: Mapping[str, Any]) -> None:
        """Change a container's resources, live when it runs (``docker update``): Engine API
        field names (``Memory``, ``MemorySwap``, ``NanoCpus``, ``CpuShares``, ``CpuPeriod``,
        ``CpuQuota``, ``CpusetCpus``, ``BlkioWeight``, ``PidsLimit``…). A refusal raises
        the engine's message (``DockerNotFound`` for an unknown container)."""
        path = f"/containers/{_quote(container_id)}/update"
        await self.request("POST", path, body=dict(resources))

    async def exec_run(
        self,
        container_id: str,
        argv: Sequence[str],
        *,
        timeout: float,  # noqa: ASYNC109 (not a caller's deadline: the process is killed)
        max_output: int = 1 << 20,
    ) -> ExecResult:
        """Run ``argv`` in the running container (no TTY, no stdin) and wait for it, at most
        ``timeout`` seconds; its stdout and stderr together, at most ``max_output`` bytes.

        Output past the cap is read and dropped, not left unread: a process blocked on a
        full pipe would otherwise sit until the timeout and be reported as timed out.
        On timeout the process is killed (see ``_kill_exec``) and ``exit_code`` is
        ``None``. A container that does not run raises ``DockerConflict``.
        """
        if not argv:
            raise ValueError("argv must not be empty")
        body = {
            "AttachStdin": False,
            "AttachStdout": True,
            "AttachStderr": True,
            "Tty": False,
            "Cmd": [str(arg) for arg in argv],
        }
        created = _expect(
            await self.request("POST", f"/containers/{_quote(container_id)}/exec", body=body),
            dict,
        )
        exec_id = created.get("Id")
        if not isinstance(exec_id, str):
            raise DockerError("Docker engine answered an exec create without an exec id")
        output = bytearray()
        truncated = False
        timed_out = False
        with trio.move_on_after(timeout) as scope:
            async with self._exec_start(exec_id) as stream:
                while (chunk := await stream.receive()) is not None:
                    room = max_output - len(output)
                    if len(chunk) > room:
                        truncated = True
                        chunk = chunk[:room]
                    output += chunk
        exit_code: int | None = None
        if scope.cancelled_caught:
            timed_out = True
            await self._kill_exec(exec_id, container_id)
        else:
            exit_code = await self._exec_exit_code(exec_id)
        return ExecResult(
            exit_code=exit_code, output=bytes(output), truncated=truncated, timed_out=timed_out
        )

    @asynccontextmanager
    async def _exec_start(self, exec_id: str) -> AsyncIterator[AttachStream]:
        """Start an exec attached: its multiplexed output, framed as an attach stream's."""
        path = f"/exec/{_quote(exec_id)}/start"
        async with self._upgraded(path, json={"Detach": False, "Tty": False}) as stream:
            yield stream

    async def _exec_exit_code(self, exec_id: str) -> int | None:
        """The finished exec's exit code. The engine records it a moment after the output
        stream closes: inspect until it is no longer running (bounded)."""
        deadline = trio.current_time() + self.timeout
        delay = 0.005
        while True:
            inspected = _expect(await self.request("GET", f"/exec/{_quote(exec_id)}/json"), dict)
            code = inspected.get("ExitCode")
            if not inspected.get("Running") and isinstance(code, int):
                return code
            if trio.current_time() >= deadline:
                return None
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)

    async def _kill_exec(self, exec_id: str, container_id: str) -> None:
        """Kill a timed-out exec's process and its process group.

        The Engine API cannot kill an exec. Its inspect gives the process's host pid, and
        the agent runs as root on the engine's host, so it signals it itself; a second
        exec running ``kill`` would need a ``kill`` in the image and the pid as the
        container's namespace sees it. runc makes each exec a session (and group) leader,
        so the group's kill takes the children it started too (``sh -c "a | b"``).

        The pid is checked before it is signalled: a pidfd pins the process, and its
        cgroup must name the container (a pid of another namespace, or one reused after
        the exec ended, is never signalled); ``pidfd_send_signal`` on the pinned process
        then cannot hit another. When it cannot be checked (an engine on another host, a
        kernel without pidfd), nothing is signalled and a warning is logged.
        """
        with trio.CancelScope(shield=True):
            try:
                full_id = str((await self.inspect_container(container_id)).get("Id", ""))
                inspected = _expect(
                    await self.request("GET", f"/exec/{_quote(exec_id)}/json"), dict
                )
            except (DockerError, DockerUnavailable) as exc:
                log.warning("Could not kill timed-out exec %s: %s", exec_id[:12], _short(exc))
                return
            pid = inspected.get("Pid")
            if not inspected.get("Running") or not isinstance(pid, int) or pid <= 0:
                return
            if not _signal_exec(pid, full_id):
                log.warning(
                    "Could not kill timed-out exec %s (pid %s) in container %s: "
                    "its process is not visible from the agent",
                    exec_id[:12],
                    pid,
                    container_id[:12],
                )

    async def logs(self, container_id: str, *, tail: int | None = None, tty: bool = False) -> bytes:
        """What the container wrote so far (stdout and stderr; the last ``tail`` lines)."""
        params = {"stdout": "1", "stderr": "1", "tail": "all" if tail is None else str(tail)}
        path = f"/containers/{_quote(container_id)}/logs"
        data: bytes = await self.request("GET", path, params=params, raw=True)
        return data if tty else demux(data)

    # -- images and networks ---------------------------------------------------------------

    async def inspect_image(self, image: str) -> dict[str, Any]:
        return dict(_expect(await self.request("GET", f"/images/{_quote(image)}/json"), dict))

    async def images(self) -> list[dict[str, Any]]:
        """The engine's images (``Id``, ``RepoTags``, ``Size``…)."""
        return list(_expect(await self.request("GET", "/images/json"), list))

    async def networks(self) -> list[dict[str, Any]]:
        """The engine's networks (``Name``, ``Id``, ``Driver``…)."""
        return list(_expect(await self.request("GET", "/networks"), list))

    async def inspect_network(self, name: str) -> dict[str, Any]:
        """One network by name or id (``DockerNotFound`` when there is none)."""
        return dict(_expect(await self.request("GET", f"/networks/{_quote(name)}"), dict))

    async def create_network(
        self,
        name: str,
        *,
        driver: str = "bridge",
        options: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Create a network (``DockerConflict`` when the name is taken); its id."""
        body = {
            "Name": name,
            "Driver": driver,
            "CheckDuplicate": True,
            "Options": dict(options or {}),
            "Labels": dict(labels or {}),
        }
        created = _expect(await self.request("POST", "/networks/create", body=body), dict)
        return str(created.get("Id", ""))

    async def remove_image(self, ref: str) -> None:
        """Remove an image by name or id (untag it; its layers go with its last tag).
        Unknown → ``DockerNotFound``; used by a container (even a stopped one) or tagged in
        several repositories when named by id → ``DockerConflict``. Never forced."""
        await self.request("DELETE", f"/images/{_quote(ref)}")

    async def pull(
        self,
        image: str,
        progress: Callable[[str], None] | None = None,
        *,
        auth: Credentials | None = None,
        registries: Mapping[str, Credentials] | None = None,
        on_bytes: Callable[[int, int | None], None] | None = None,
    ) -> None:
        """Pull ``image`` (``latest`` when no tag is named), calling ``progress`` with each
        status line the engine sends and ``on_bytes(done, total)`` with the bytes
        downloaded over all layers (``PullProgress``) whenever they change.

        Credentials, first found: ``auth``; the entry of ``registries`` (config
        ``docker.registries``, keyed by registry host) for the image's registry; the
        Docker client's config file (``auths`` of ``$DOCKER_CONFIG/config.json``), as the
        docker CLI's would. They travel only in the ``X-Registry-Auth`` header.
        """
        repository, tag = split_image(image)
        headers = {}
        registry = registry_of(repository)
        credentials = auth or _configured(registries or {}, registry)
        if credentials is not None:
            headers["X-Registry-Auth"] = _auth_header(
                credentials.username, credentials.password, registry
            )
        else:
            found = await trio.to_thread.run_sync(_registry_auth, repository)
            if found:
                headers["X-Registry-Auth"] = found
        params = {"fromImage": repository, "tag": tag}
        meter = PullProgress()
        async with self._open_stream(
            "POST", "/images/create", params=params, headers=headers, read=self.timeout
        ) as response:
            async for item in JsonLines(response):
                if "error" in item:
                    raise DockerError(_short(Exception(str(item["error"]))))
                status = item.get("status")
                if status and progress is not None:
                    progress(str(status))
                if meter.feed(item) and on_bytes is not None:
                    on_bytes(meter.done, meter.total)

    # -- streams ---------------------------------------------------------------------------

    @asynccontextmanager
    async def attach(self, container_id: str) -> AsyncIterator[AttachStream]:
        """Attach to a container's stdio (before or after it starts); closed on exit.

        Attaching before ``start`` loses no output; one attach serves both the console
        reader and the stdin writer.
        """
        path = f"/containers/{_quote(container_id)}/attach"
        params = {"stream": "1", "stdin": "1", "stdout": "1", "stderr": "1"}
        async with self._upgraded(path, params=params) as stream:
            yield stream

    @asynccontextmanager
    async def _upgraded(
        self,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[AttachStream]:
        """``POST path`` upgraded to a raw stream (attach, exec start): the engine's
        multiplexed stdio, closed on exit. A refusal is the engine's error (404:
        ``DockerNotFound``); an answer without the upgrade is a ``DockerError``."""
        http, prefix = self._streams()
        request = http.build_request(
            "POST",
            f"{prefix}{path}",
            params=params,
            json=json,
            headers={"Connection": "Upgrade", "Upgrade": "tcp"},
            timeout=httpx.Timeout(self.timeout, read=None),
        )
        try:
            response = await http.send(request, stream=True)
        except httpx.TransportError as exc:
            self._probe_now.set()
            raise DockerUnavailable() from exc
        try:
            if response.status_code >= 400:
                raise _refusal(response.status_code, await response.aread())
            if response.status_code != 101:
                raise DockerError(f"{path}: HTTP {response.status_code} (no upgrade)")
            stream = AttachStream(response.extensions["network_stream"])
            try:
                yield stream
            finally:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    @asynccontextmanager
    async def stats(self, container_id: str) -> AsyncIterator[JsonLines]:
        """The container's stats stream: one document about every second while it runs
        (``async for item in items``); it ends when the container stops."""
        path = f"/containers/{_quote(container_id)}/stats"
        async with self._open_stream("GET", path, params={"stream": "1"}) as response:
            yield JsonLines(response)

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
        params = {"filters": json.dumps(filters)}
        async with self._open_stream("GET", "/events", params=params) as response:
            task_status.started()
            async for item in JsonLines(response):
                await handle(item)

    @asynccontextmanager
    async def _open_stream(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        read: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed answer (the engine's refusals raised as for control calls); ``read``
        bounds the wait for each chunk (``None``: no bound)."""
        http, prefix = self._streams()
        try:
            async with http.stream(
                method,
                prefix + path,
                params=params,
                headers=headers,
                timeout=httpx.Timeout(self.timeout, read=read),
            ) as response:
                if response.status_code >= 400:
                    raise _refusal(response.status_code, await response.aread())
                yield response
        except httpx.TransportError as exc:
            self._probe_now.set()
            raise DockerUnavailable() from exc

    # -- the wire --------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        long: bool = False,
        raw: bool = False,
    ) -> Any:
        """One engine request under the API version prefix; the decoded JSON answer (the
        bytes when ``raw``).

        On httpcore directly (see ``_ControlConnections``): httpx's client layers (URL
        merging, auth and redirect handling, response models) cost as much again as the
        request itself.

        A control call is waited for even when cancelled (its effect must be known: a
        create or start abandoned half-way would leave Docker ahead of the agent; the
        engine timeout bounds it); the cancellation surfaces at the caller's next
        checkpoint. A ``long`` call (wait, stop) has no timeout and is abandoned on cancel.
        """
        pool, prefix, generation = self._control()
        target = (prefix + path + ("?" + urlencode(params) if params else "")).encode()
        content = None if body is None else json.dumps(body).encode()
        headers = [] if content is None else [(b"Content-Type", b"application/json")]
        limit = self.timeout
        timeout = {"connect": limit, "read": None if long else limit, "write": limit, "pool": limit}
        # A caller cancelled while waiting for a slot has sent nothing: it may go.
        async with contextlib.nullcontext() if long else self.request_limiter:
            with trio.CancelScope(shield=not long):
                started = time.perf_counter()
                try:
                    response = await pool.request(
                        method.encode(), target, headers, content, {"timeout": timeout}
                    )
                except _TRANSPORT_ERRORS as exc:
                    self._lost(generation, exc)
                    raise DockerUnavailable() from None
        if self.observer is not None and not long:  # (wait, stop: the container's time)
            self.observer(call_name(method, path), time.perf_counter() - started)
        # 304: the engine's "already so" (start a running container, stop a stopped one).
        if not (200 <= response.status < 300 or response.status == 304):
            raise _refusal(response.status, response.content)
        if raw:
            return response.content
        if not response.content:
            return None
        try:
            return json.loads(response.content)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise DockerError(
                f"Docker engine answered {method} {path} with a body that is not JSON"
            ) from None

    def _control(self) -> tuple[_ControlConnections, str, int]:
        if not self._up or self._pool is None or self.info is None:
            raise DockerUnavailable()
        return self._pool, f"/v{self.info.api_version}", self._generation

    def _streams(self) -> tuple[httpx.AsyncClient, str]:
        if not self._up or self._http is None or self.info is None:
            raise DockerUnavailable()
        return self._http, f"/v{self.info.api_version}"

    def _lost(self, generation: int, exc: BaseException) -> None:
        if self._up and generation == self._generation:
            log.warning("Docker engine at %s stopped answering: %s", self.base_url, _short(exc))
            self._up = False
            self._connected = trio.Event()
            self.last_error = _short(exc)
            self._probe_now.set()

    async def _handshake(self, pool: _ControlConnections, target: bytes) -> bytes:
        """One unversioned request on a connection of its own (the probe), bounded."""
        limit = self.timeout
        timeout = {"connect": limit, "read": limit, "write": limit, "pool": limit}
        response = await pool.request(b"GET", target, [], None, {"timeout": timeout})
        if response.status != 200:
            raise _NoEngine(f"{target.decode()} answered HTTP {response.status}")
        return response.content

    async def _connect(self, pool: _ControlConnections) -> EngineInfo:
        content = await self._handshake(pool, b"/version")
        try:
            return _engine_info(json.loads(content))
        except (ValueError, AttributeError, KeyError) as exc:
            raise _NoEngine(f"not a Docker engine: {_short(exc)}") from None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to the engine: probe, connect, notice loss, reconnect.

        Reports ready after the first attempt whatever its outcome: the agent must come up
        without an engine.
        """
        delay = 0.5
        started = False
        pool = self._pool = self._control_pool()
        http = self._http = self._native_client()
        try:
            while True:
                if not self._up:
                    try:
                        info = await self._connect(pool)
                    except (*_TRANSPORT_ERRORS, _NoEngine) as exc:
                        if self.last_error != _short(exc) or not started:
                            log.warning(
                                "Docker engine at %s unreachable: %s (retrying)",
                                self.base_url,
                                _short(exc),
                            )
                        self.last_error = _short(exc)
                    else:
                        self.info, self.last_error = info, None
                        self._generation += 1
                        self._up = True
                        self._connected.set()
                        delay = 0.5
                        log.info(
                            "Docker engine %s (API %s) at %s",
                            info.version,
                            info.api_version,
                            self.base_url,
                        )
                else:
                    generation = self._generation
                    try:
                        await self._handshake(pool, b"/_ping")
                    except (*_TRANSPORT_ERRORS, _NoEngine) as exc:
                        self._lost(generation, exc)
                        continue
                if not started:
                    started = True
                    task_status.started()
                self._probe_now = trio.Event()
                with trio.move_on_after(self.probe_interval if self._up else delay):
                    await self._probe_now.wait()
                if not self._up:
                    delay = min(delay * 2, self.retry_max)
        finally:
            self._up = False
            with trio.CancelScope(shield=True):
                await http.aclose()
                await pool.aclose()

    def _native_client(self) -> httpx.AsyncClient:
        # Every running server holds one connection (its attach), and so does the events
        # stream: httpx's default cap of 100 would stall the 100th server's start.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=4)
        url = self.base_url
        timeout = httpx.Timeout(self.timeout)
        if url.startswith("unix://"):
            # A unix socket: no TLS, so no CA bundle to load (40 ms and 1 MB at start).
            transport = httpx.AsyncHTTPTransport(
                uds=url.removeprefix("unix://"), limits=limits, verify=False
            )
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


def container_states(base_url: str, labels: list[str], *, timeout: float = 5) -> dict[str, str]:
    """Blocking, for the CLI: Docker's status of each labelled container, by internal id.

    Empty when the engine does not answer (the caller shows the state as unknown).
    """
    if base_url.startswith("unix://"):
        transport = httpx.HTTPTransport(uds=base_url.removeprefix("unix://"))
        client = httpx.Client(transport=transport, base_url="http://docker", timeout=timeout)
    else:
        client = httpx.Client(base_url=base_url.replace("tcp://", "http://", 1), timeout=timeout)
    params = {"all": "1", "filters": json.dumps({"label": labels})}
    try:
        with client:
            response = client.get("/containers/json", params=params)
        listed = response.json() if response.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        return {}
    if not isinstance(listed, list):
        return {}
    return {
        (item.get("Labels") or {}).get("lightd.internal_id", ""): str(item.get("State", ""))
        for item in listed
        if (item.get("Labels") or {}).get("lightd.role") == "server"
    }


#: Collections whose ``/<kind>/<name>…`` paths name one object (its id or name there).
_OBJECTS = frozenset({"containers", "images", "networks", "volumes", "exec"})
#: ``/<kind>/<word>`` paths that are collection calls, not an object's.
_COLLECTION_CALLS = frozenset({"json", "create", "prune"})


def call_name(method: str, path: str) -> str:
    """A control call's name for metrics: ``method`` and ``path`` with the object's id or
    name replaced (``POST /containers/{id}/start``), so the names are a small, fixed set.
    An image name may hold slashes: everything between the kind and the last segment is
    the name."""
    parts = path.strip("/").split("/")
    if parts[0] in _OBJECTS and len(parts) >= 2:
        if len(parts) >= 3:
            path = f"/{parts[0]}/{{id}}/{parts[-1]}"
        elif parts[1] not in _COLLECTION_CALLS:
            path = f"/{parts[0]}/{{id}}"
    return f"{method} {path}"


def _signal_exec(pid: int, container_id: str) -> bool:
    """SIGKILL host process ``pid`` and its process group, once it is known to be a
    process of container ``container_id`` (its cgroup names it). True when killed or
    already gone; False when it could not be checked."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True  # ended meanwhile
    except (OSError, AttributeError):
        return False
    try:
        try:
            cgroups = Path(f"/proc/{pid}/cgroup").read_text()
            # Still the process the pidfd pins (else /proc/<pid> was another's).
            signal.pidfd_send_signal(pidfd, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        if not container_id or container_id not in cgroups:
            return False
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    finally:
        os.close(pidfd)


def _engine_info(raw: Mapping[str, Any]) -> EngineInfo:
    return EngineInfo(
        version=str(raw.get("Version", "")),
        api_version=str(raw["ApiVersion"]),
        os=str(raw.get("Os", "")),
        arch=str(raw.get("Arch", "")),
    )


def _registry_auth(repository: str) -> str | None:
    """``X-Registry-Auth`` for ``repository``'s registry from the Docker client's config
    file (static ``auths`` entries only), or ``None``."""
    folder = os.environ.get("DOCKER_CONFIG") or str(Path.home() / ".docker")
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
        auths = config.get("auths") or {}
    except (OSError, ValueError, AttributeError):
        return None
    first, slash, _ = repository.partition("/")
    own = slash and ("." in first or ":" in first or first == "localhost")
    registry = first if own else "docker.io"
    names = (
        [registry, f"https://{registry}", f"http://{registry}", f"https://{registry}/v1/"]
        if own
        else ["https://index.docker.io/v1/", "index.docker.io", "docker.io"]
    )
    for name in names:
        entry = auths.get(name)
        if not isinstance(entry, dict) or not entry.get("auth"):
            continue
        try:
            user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return _auth_header(user, password, name)
    return None


def _expect(value: Any, kind: type) -> Any:
    """An engine answer of the JSON type the call needs, else a ``DockerError``."""
    if not isinstance(value, kind):
        raise DockerError(f"Docker engine answered with an unexpected {type(value).__name__}")
    return value


def _quote(segment: str) -> str:
    """A name in a request path, quoted as docker-py quotes it (``/`` and ``:`` kept: image
    names have them): a space or ``?`` in an image name must not break the request."""
    return quote(segment, safe="/:")


def _refusal(status: int, content: bytes) -> DockerError:
    message = _answer_message(status, content)
    if status == 404:
        return DockerNotFound(message)
    if status == 409:
        return DockerConflict(message)
    return DockerError(message)


def _answer_message(status: int, content: bytes) -> str:
    """The engine's explanation of a refusal (its JSON ``message``), one short line."""
    text = content.decode("utf-8", "replace")
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return _short(Exception(message or text or f"HTTP {status}"))


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
