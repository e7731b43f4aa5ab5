"""Install scripts: what a plugin is asked (``InstallJob``), what it answers
(``InstallRun``), and the core's runner of that answer.

The ``lightd_run_install_script`` hook *describes* an install run; the core runs it, in a
container of the record (labels, hardening and log rotation are the core's), never on the
host: the script is written to the container's data folder (``InstallJob.script_path``
inside the container), the output goes to the console as it comes and to ``install.log``
(bounded), a non-zero exit or the timeout fails the install with ``InstallFailed``, and a
cancellation (the container is deleted) removes the install container.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
import trio

from ..docker import ContainerSpec, DockerEngine, Mount
from ..errors import AgentError
from ..logs import container_logger
from .console import LineSplitter
from .models import Limits

__all__ = ["InstallFailed", "InstallJob", "InstallRun", "run_install"]

log = logging.getLogger(__name__)

#: Bytes of output kept in install.log (a runaway script must not fill the disk).
LOG_MAX = 16 * 1024 * 1024


class InstallFailed(AgentError):
    """An install step failed; the message is the reason the panel and the console see."""


def _mapping(value: Mapping[str, str] | None) -> Mapping[str, str] | None:
    return None if value is None else dict(value)


def _env(value: Mapping[str, str]) -> Mapping[str, str]:
    return dict(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class InstallJob:
    """One install of a container that has an install script: what the hook is told."""

    internal_id: str
    #: The image to install from (the request's ``install_image``, else the server's).
    image: str
    #: The script as the API was given it.
    script: str
    #: The container's limits (memory and swap in bytes, CPU in cores, pids).
    limits: Limits
    #: Seconds the run may take (config ``containers.install_timeout``).
    timeout: float
    #: The server's environment (``SERVER_IP``, ``SERVER_PORT``, ``SERVER_MEMORY``,
    #: ``STARTUP`` and the container's own variables).
    environment: Mapping[str, str] = attrs.field(converter=_env)
    #: The server's mounts: the volume at /home/container (read-write), the agent's data
    #: folder at /app/data (read-only), and the container's extra mounts.
    mounts: tuple[Mount, ...]
    #: Where ``InstallRun.script`` is inside the container (executable).
    script_path: str = "/app/data/install.sh"


@attrs.frozen
class InstallRun:
    """How to run an install: the answer of ``lightd_run_install_script``.

    ``None`` fields take the job's value. The core writes ``script`` to the job's
    ``script_path`` (mode 0755) and runs ``entrypoint`` + ``command`` from ``image``.
    """

    image: str
    script: str
    entrypoint: tuple[str, ...] = attrs.field(converter=_strings)
    command: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    environment: Mapping[str, str] | None = attrs.field(default=None, converter=_mapping)
    mounts: tuple[Mount, ...] | None = None
    limits: Limits | None = None
    timeout: float | None = None


async def run_install(
    docker: DockerEngine,
    spec: ContainerSpec,
    *,
    internal_id: str,
    log_path: Path,
    time_limit: float,
    console: Callable[[list[str]], None],
) -> None:
    """Create the install container from ``spec``, attach, start, stream its output to
    ``console`` and ``log_path``, and judge its exit (or ``time_limit`` seconds passing:
    ``Install script timed out``); the container is removed however this ends."""
    logger = container_logger(internal_id, log)
    container_id = await docker.create_container(spec)
    try:
        log_file = await trio.open_file(log_path, "wb")
        async with log_file, docker.attach(container_id) as stream:
            await docker.start(container_id)
            logger.info("install script running (image %s)", spec.image)
            lines = LineSplitter()  # cuts lines at 64 KiB: no unbounded re-splitting
            logged = 0
            with trio.move_on_after(time_limit) as deadline:
                while (chunk := await stream.receive()) is not None:
                    if logged < LOG_MAX:
                        await log_file.write(chunk[: LOG_MAX - logged])
                        logged += len(chunk)
                        if logged >= LOG_MAX:
                            await log_file.write(b"\n[install.log cut: output too long]\n")
                    if complete := lines.feed(chunk):
                        console(complete)
                if rest := lines.close():
                    console(rest)
                result = await docker.wait(container_id)
            if deadline.cancelled_caught:
                raise InstallFailed("Install script timed out")
        code = int(result.get("StatusCode", -1))
        logger.info("install script exited with code %d", code)
        if code != 0:
            raise InstallFailed(f"Install script failed with exit code {code}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await docker.remove_container(container_id)
            except AgentError as exc:  # reconciliation removes what is left
                logger.warning("install container not removed: %s", exc)


def write_executable(path: Path, text: str) -> None:
    """Write a script the container runs (entrypoint.sh, install.sh): whole or not at all,
    mode 0755. Blocking: run it in a worker thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
