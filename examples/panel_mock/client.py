"""A small typed client of the lightd API: one method per route the panel uses.

This is the model of how a panel calls a node, and the only place the mock panel talks to
one. Every request carries the two headers of contract §2 (the vendor ``Accept`` and the
node's master token as ``Bearer``); every answer is the bare JSON object of the contract
(§1), typed here with a ``TypedDict`` that names the fields the panel reads (the agent may
send more). An error answer raises :class:`LightdError` with the status and the agent's
``{"error"}`` message; a node that cannot be reached raises :class:`NodeUnreachable`.

The master token stays here, on the panel's side. What a browser gets is a temporary token
(:meth:`LightdClient.mint_token`, contract §2.1 and §12): scoped to one container or volume,
with only the permissions it needs, short-lived, and for links single-use.

It needs nothing but ``httpx``; copy it into your panel and extend it route by route.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict, cast
from urllib.parse import quote, urlencode

import httpx

__all__ = [
    "VENDOR",
    "Backup",
    "BackupStarted",
    "ContainerDetail",
    "ContainerSummary",
    "CreateContainer",
    "FileEntry",
    "Image",
    "Job",
    "LightdClient",
    "LightdError",
    "NodeEvent",
    "NodeUnreachable",
    "PoolPort",
    "Port",
    "SystemInfo",
    "TokenMinted",
    "Utilization",
    "Volume",
    "VolumeDetail",
]

#: The vendor media type every REST request must accept (contract §2).
VENDOR = "Application/vnd.pkglatv1+json"

Permission = Literal["read", "console", "power", "files", "manage"]
PowerAction = Literal["start", "stop", "restart", "kill"]


class LightdError(Exception):
    """The agent answered an error: ``status`` and its ``{"error"}`` message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


class NodeUnreachable(LightdError):
    """No answer from the node at all (refused, timed out, cut)."""

    def __init__(self, message: str) -> None:
        super().__init__(502, f"Node unreachable: {message}")


# --- answers (contract §§5-17; only the fields the panel reads are named) ---------------


class Port(TypedDict):
    ip: str
    port: int
    protocol: str
    container_port: NotRequired[int]


class PoolPort(TypedDict):
    ip: str
    port: int
    protocol: str
    in_use: bool


class ContainerSummary(TypedDict):
    internal_id: str
    container_id: str | None
    install_state: Literal["installing", "ready", "failed"]
    image: str
    ports: list[Port]
    state: Literal["offline", "starting", "running", "stopping"]


class Limits(TypedDict):
    memory: int | None
    cpu: float | None
    pids: int
    swap: int


class ContainerDetail(ContainerSummary):
    volume_id: str
    startup_command: str
    start_pattern: str | None
    limits: Limits
    error: str | None
    stop_command: str | None
    exit_code: int | None
    started_at: int | None
    created_at: int


class CreateContainer(TypedDict, total=False):
    """The body of ``POST /containers`` (§7.1); the first four are required."""

    internal_id: str
    image: str
    volume_id: str
    startup_command: str
    start_pattern: str
    ports: list[Port]
    limits: dict[str, int | float]
    install_script: str
    stop_command: str
    environment: dict[str, str]
    start_on_completion: bool


class Volume(TypedDict):
    volume_id: str
    path: str
    created_at: int


class VolumeUsage(TypedDict):
    bytes: int
    files: int


class VolumeDetail(Volume):
    size_limit: int | None
    usage: VolumeUsage


class FileEntry(TypedDict):
    name: str
    type: Literal["file", "directory", "symlink"]
    size: int
    modified: NotRequired[int]
    mode: NotRequired[str]


class Image(TypedDict):
    id: str
    tags: list[str]
    size: int
    created_at: int
    in_use_by: list[str]


class Backup(TypedDict):
    backup_id: str
    name: str
    target: str
    state: Literal["running", "done", "failed"]
    size: int
    sha256: str | None
    created_at: int
    error: NotRequired[str | None]


class BackupStarted(TypedDict):
    message: str
    backup_id: str
    job_id: str


class JobProgress(TypedDict):
    done: int
    total: int | None
    unit: str


class Job(TypedDict):
    id: str
    kind: str
    state: Literal["queued", "running", "done", "failed", "cancelled"]
    progress: JobProgress
    volume_id: str | None
    internal_id: str | None
    error: str | None


class TokenMinted(TypedDict):
    token: str
    expires_at: str
    id: str


class MemoryUsage(TypedDict):
    total: int
    used: int


class DiskUsage(TypedDict):
    total: int
    used: int
    free: int


class ContainerCounts(TypedDict):
    running: int
    total: int


class Utilization(TypedDict):
    cpu_percent: float
    cpu_count: int
    memory: MemoryUsage
    disk: DiskUsage
    load_average: list[float]
    containers: ContainerCounts


class SystemInfo(TypedDict):
    version: str
    uptime: int


class NodeEvent(TypedDict):
    """One event of the node event stream (§17)."""

    seq: int
    type: str
    data: Any
    timestamp: float


class Message(TypedDict):
    message: str


# --- the client -------------------------------------------------------------------------


class LightdClient:
    """One node: its base URL (``http://host:8070``) and its master token.

    Use it as an async context manager (it owns an ``httpx.AsyncClient``), or call
    :meth:`aclose`.
    """

    def __init__(self, url: str, token: str, *, timeout: float = 15.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Accept": VENDOR, "Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    async def __aenter__(self) -> LightdClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # The one place a request is made: every error answer becomes a LightdError.
    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> Any:
        try:
            response = await self._http.request(
                method,
                path,
                json=body,
                params=params,
                content=content,
            )
        except httpx.HTTPError as exc:
            raise NodeUnreachable(str(exc) or type(exc).__name__) from None
        if response.is_success:
            if response.headers.get("content-type", "").startswith("application/json"):
                return response.json()
            return response.content
        raise LightdError(response.status_code, _message(response))

    # -- the node (§4, §17) --
    async def system_info(self) -> SystemInfo:
        """``GET /system/info``."""
        return cast(SystemInfo, await self._call("GET", "/system/info"))

    async def utilization(self) -> Utilization:
        """``GET /system/utilization``: the machine's CPU, memory and disk."""
        return cast(Utilization, await self._call("GET", "/system/utilization"))

    async def watch_events(
        self,
        on_event: Callable[[NodeEvent], Awaitable[None]],
        since: int | None = None,
        on_open: Callable[[], None] | None = None,
    ) -> None:
        """``GET /events`` (Server-Sent Events, master token): calls ``on_open`` once the
        stream is open, then ``on_event`` with every change on the node as it happens;
        returns when the stream ends."""
        headers = {"Accept": f"text/event-stream, {VENDOR}"}
        if since is not None:
            headers["Last-Event-ID"] = str(since)
        try:
            async with self._http.stream(
                "GET", "/events", headers=headers, timeout=httpx.Timeout(15.0, read=None)
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise LightdError(response.status_code, _message(response))
                if on_open is not None:
                    on_open()
                async for line in response.aiter_lines():
                    if line.startswith("data:"):
                        await on_event(cast(NodeEvent, json.loads(line[5:])))
        except httpx.HTTPError as exc:
            raise NodeUnreachable(str(exc) or type(exc).__name__) from None

    # -- temporary tokens (§2.1, §12) --
    async def mint_token(
        self,
        *,
        ttl: str,
        permissions: list[Permission],
        containers: list[str] | None = None,
        volumes: list[str] | None = None,
        remove_on_use: bool = False,
    ) -> TokenMinted:
        """``POST /auth/tokens`` (master token only): a token for a browser."""
        body: dict[str, Any] = {
            "ttl": ttl,
            "permissions": permissions,
            "remove_on_use": remove_on_use,
        }
        if containers is not None:
            body["containers"] = containers
        if volumes is not None:
            body["volumes"] = volumes
        return cast(TokenMinted, await self._call("POST", "/auth/tokens", body=body))

    # -- containers (§7, §17) --
    async def list_containers(self) -> list[ContainerSummary]:
        """``GET /containers``."""
        answer = await self._call("GET", "/containers")
        return cast(list[ContainerSummary], answer["containers"])

    async def get_container(self, internal_id: str) -> ContainerDetail:
        """``GET /containers/:id``."""
        return cast(ContainerDetail, await self._call("GET", f"/containers/{_seg(internal_id)}"))

    async def create_container(self, body: CreateContainer) -> Message:
        """``POST /containers``: validated at once, installed in the background."""
        return cast(Message, await self._call("POST", "/containers", body=body))

    async def delete_container(self, internal_id: str) -> Message:
        """``DELETE /containers/:id`` (the volume stays)."""
        return cast(Message, await self._call("DELETE", f"/containers/{_seg(internal_id)}"))

    async def power(self, internal_id: str, action: PowerAction) -> Message:
        """``POST /containers/:id/{start,stop,restart,kill}``."""
        return cast(Message, await self._call("POST", f"/containers/{_seg(internal_id)}/{action}"))

    async def send_command(self, internal_id: str, command: str) -> Message:
        """``POST /containers/:id/command``: a line to the server's standard input."""
        path = f"/containers/{_seg(internal_id)}/command"
        return cast(Message, await self._call("POST", path, body={"command": command}))

    async def logs(self, internal_id: str, lines: int = 100) -> list[str]:
        """``GET /containers/:id/logs?lines=N``: the end of the console history."""
        path = f"/containers/{_seg(internal_id)}/logs"
        answer = await self._call("GET", path, params={"lines": str(lines)})
        return cast(list[str], answer["lines"])

    async def install_log(self, internal_id: str) -> str:
        """``GET /containers/:id/install-log`` (404 before an install script ran)."""
        answer = await self._call("GET", f"/containers/{_seg(internal_id)}/install-log")
        return str(answer["log"])

    # -- images and the port pool (§17, §6) --
    async def list_images(self) -> list[Image]:
        """``GET /images`` (master token only)."""
        return cast(list[Image], (await self._call("GET", "/images"))["images"])

    async def list_ports(self, *, in_use: bool | None = None) -> list[PoolPort]:
        """``GET /network/ports[?in_use=]``."""
        params = None if in_use is None else {"in_use": "true" if in_use else "false"}
        return cast(
            list[PoolPort], (await self._call("GET", "/network/ports", params=params))["ports"]
        )

    # -- volumes and files (§5, §13, §15) --
    async def list_volumes(self) -> list[Volume]:
        """``GET /volumes``."""
        return cast(list[Volume], (await self._call("GET", "/volumes"))["volumes"])

    async def create_volume(self, size_limit: int | None = None) -> Volume:
        """``POST /volumes`` (``size_limit`` in bytes, 0 or absent = none)."""
        body = {} if not size_limit else {"size_limit": size_limit}
        return cast(Volume, await self._call("POST", "/volumes", body=body))

    async def get_volume(self, volume_id: str) -> VolumeDetail:
        """``GET /volumes/:id``: with its limit and usage."""
        return cast(VolumeDetail, await self._call("GET", f"/volumes/{_seg(volume_id)}"))

    async def delete_volume(self, volume_id: str) -> Message:
        """``DELETE /volumes/:id``."""
        return cast(Message, await self._call("DELETE", f"/volumes/{_seg(volume_id)}"))

    async def list_files(self, volume_id: str, path: str = "") -> list[FileEntry]:
        """``GET /volumes/:id/files?path=``: folders first, then by name."""
        params = {"path": path} if path else None
        answer = await self._call("GET", f"/volumes/{_seg(volume_id)}/files", params=params)
        return cast(list[FileEntry], answer["files"])

    async def read_file(self, volume_id: str, path: str) -> bytes:
        """``GET /volumes/:id/files/content?path=``: the raw bytes."""
        answer = await self._call(
            "GET", f"/volumes/{_seg(volume_id)}/files/content", params={"path": path}
        )
        return answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    async def write_file(self, volume_id: str, path: str, content: str) -> Message:
        """``POST /volumes/:id/files``: replace a text file atomically."""
        body = {"path": path, "content": content}
        return cast(
            Message, await self._call("POST", f"/volumes/{_seg(volume_id)}/files", body=body)
        )

    async def upload(self, volume_id: str, path: str, data: bytes) -> Message:
        """``PUT /volumes/:id/files/content?path=``: the raw bytes (streamed by the agent)."""
        path_ = f"/volumes/{_seg(volume_id)}/files/content"
        return cast(Message, await self._call("PUT", path_, params={"path": path}, content=data))

    async def make_folder(self, volume_id: str, path: str) -> Message:
        """``POST /volumes/:id/folders`` (``mkdir -p``)."""
        body = {"path": path}
        return cast(
            Message, await self._call("POST", f"/volumes/{_seg(volume_id)}/folders", body=body)
        )

    async def delete_files(self, volume_id: str, paths: list[str]) -> Message:
        """``POST /volumes/:id/files/delete``."""
        body = {"paths": paths}
        path = f"/volumes/{_seg(volume_id)}/files/delete"
        return cast(Message, await self._call("POST", path, body=body))

    async def rename_file(self, volume_id: str, source: str, target: str) -> Message:
        """``POST /volumes/:id/files/rename``."""
        body = {"from": source, "to": target}
        path = f"/volumes/{_seg(volume_id)}/files/rename"
        return cast(Message, await self._call("POST", path, body=body))

    async def decompress(self, volume_id: str, archive: str, destination: str) -> Message:
        """``POST /volumes/:id/decompress``: unpack an archive inside the volume."""
        body = {"archive_path": archive, "destination": destination}
        path = f"/volumes/{_seg(volume_id)}/decompress"
        return cast(Message, await self._call("POST", path, body=body))

    def file_link(self, volume_id: str, path: str, token: str) -> str:
        """A browser link to ``GET /volumes/:id/files/content`` with a temporary token in
        the query (never the master token: the agent refuses it there)."""
        query = urlencode({"path": path, "token": token})
        return f"{self.url}/volumes/{_seg(volume_id)}/files/content?{query}"

    # -- backups (§16) and jobs (§14) --
    async def list_backups(self, volume_id: str) -> list[Backup]:
        """``GET /volumes/:id/backups`` (oldest first)."""
        answer = await self._call("GET", f"/volumes/{_seg(volume_id)}/backups")
        return cast(list[Backup], answer["backups"])

    async def create_backup(self, volume_id: str, name: str | None = None) -> BackupStarted:
        """``POST /volumes/:id/backups``: a job; the backup is listed at once."""
        body = {"name": name} if name else {}
        path = f"/volumes/{_seg(volume_id)}/backups"
        return cast(BackupStarted, await self._call("POST", path, body=body))

    async def restore_backup(self, volume_id: str, backup_id: str) -> Message:
        """``POST /volumes/:id/backups/:bid/restore`` (every server on it offline)."""
        path = f"/volumes/{_seg(volume_id)}/backups/{_seg(backup_id)}/restore"
        return cast(Message, await self._call("POST", path, body={}))

    async def delete_backup(self, volume_id: str, backup_id: str) -> Message:
        """``DELETE /volumes/:id/backups/:bid``."""
        path = f"/volumes/{_seg(volume_id)}/backups/{_seg(backup_id)}"
        return cast(Message, await self._call("DELETE", path))

    def backup_link(self, volume_id: str, backup_id: str, token: str) -> str:
        """A browser link to ``GET /volumes/:id/backups/:bid/download?token=``."""
        path = f"/volumes/{_seg(volume_id)}/backups/{_seg(backup_id)}/download"
        return f"{self.url}{path}?{urlencode({'token': token})}"

    async def list_jobs(self, *, volume_id: str | None = None) -> list[Job]:
        """``GET /jobs[?volume_id=]``: the last day's jobs, newest first."""
        params = {"volume_id": volume_id} if volume_id else None
        return cast(list[Job], (await self._call("GET", "/jobs", params=params))["jobs"])

    # -- links for the browser --
    def websocket_url(self, internal_id: str, token: str) -> str:
        """``ws(s)://node/ws/:id?token=`` (§8) for a browser, with a temporary token."""
        base = "ws" + self.url.removeprefix("http")
        return f"{base}/ws/{_seg(internal_id)}?{urlencode({'token': token})}"

    def upload_url(self, volume_id: str, path: str) -> str:
        """Where a browser ``PUT``s a file (with the vendor header and a temporary token)."""
        query = urlencode({"path": path})
        return f"{self.url}/volumes/{_seg(volume_id)}/files/content?{query}"


def _seg(value: str) -> str:
    """One URL path segment."""
    return quote(value, safe="")


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase or "error"
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else (response.reason_phrase or "error")
