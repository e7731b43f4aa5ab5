"""Built-in plugin ``install_scripts``: runs a container's install script in a container.

Implements ``lightd_run_install_script``: the script is written to the container's data
folder as ``install.sh`` and run from ``job.image`` with the volume at /home/container,
the same limits, labels and hardening as the server (never privileged, no new
privileges), never on the host. A script starting with ``#!`` runs with that interpreter,
any other with ``/bin/sh``. Output goes to the console as it comes and to
``install.log``; a non-zero exit or the install timeout fails the install; a delete
cancels the run and removes the install container.

Route [ext]: ``GET /containers/<internal_id>/install-log`` → ``{"internal_id","log"}``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio
from lightd import Agent, AgentError, NotFound, hookimpl
from lightd.containers import CONTAINERS, InstallFailed, InstallJob, LineSplitter
from quart import Blueprint

log = logging.getLogger(__name__)

#: Bytes of install.log served by the install-log route (the tail).
LOG_TAIL = 256 * 1024
#: Bytes of output kept in install.log (a runaway script must not fill the disk).
LOG_MAX = 16 * 1024 * 1024


def _entrypoint(script: str) -> list[str]:
    if script.startswith("#!"):
        return ["/app/data/install.sh"]  # the kernel honours the shebang
    return ["/bin/sh", "/app/data/install.sh"]


def _write_script(path: Path, script: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(script if script.endswith("\n") else script + "\n")
    tmp.chmod(0o755)
    tmp.replace(path)


async def run_install(agent: Agent, job: InstallJob) -> None:
    docker = agent.docker
    await trio.to_thread.run_sync(_write_script, job.data_path / "install.sh", job.script)
    options = job.docker_options(entrypoint=_entrypoint(job.script))
    options["image"] = job.image
    container_id = await docker.create_container(options)
    log_file = await trio.open_file(job.log_path, "wb")
    try:
        async with log_file, docker.attach(container_id) as stream:
            await docker.start(container_id)
            lines = LineSplitter()  # cuts lines at 64 KiB: no unbounded re-splitting
            logged = 0
            with trio.move_on_after(job.timeout) as deadline:
                while (chunk := await stream.receive()) is not None:
                    if logged < LOG_MAX:
                        await log_file.write(chunk[: LOG_MAX - logged])
                        logged += len(chunk)
                        if logged >= LOG_MAX:
                            await log_file.write(b"\n[install.log cut: output too long]\n")
                    if complete := lines.feed(chunk):
                        job.console(complete)
                if rest := lines.close():
                    job.console(rest)
                result = await docker.wait(container_id)
            if deadline.cancelled_caught:
                raise InstallFailed("Install script timed out")
        code = int(result.get("StatusCode", -1))
        if code != 0:
            raise InstallFailed(f"Install script failed with exit code {code}")
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            try:
                await docker.remove_container(container_id)
            except AgentError as exc:  # reconciliation removes what is left
                log.warning("%s: install container not removed: %s", job.internal_id, exc)


@hookimpl
def lightd_run_install_script(agent: Agent, job: InstallJob) -> Any:
    return run_install(agent, job)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("install_scripts", __name__)

    @bp.get("/containers/<internal_id>/install-log")
    async def install_log(internal_id: str) -> dict[str, Any]:
        containers = agent.stash[CONTAINERS]
        containers.get(internal_id)  # 404 for an unknown container
        path = containers.data_path(internal_id) / "install.log"

        def tail() -> str:
            try:
                with path.open("rb") as fh:
                    size = fh.seek(0, 2)
                    fh.seek(max(0, size - LOG_TAIL))
                    return fh.read().decode("utf-8", "replace")
            except FileNotFoundError:
                raise NotFound("No install log", code="no_install_log") from None

        return {"internal_id": internal_id, "log": await trio.to_thread.run_sync(tail)}

    return [bp]
