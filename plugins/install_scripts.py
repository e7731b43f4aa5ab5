"""Built-in plugin ``install_scripts``: says how a container's install script runs.

Implements ``lightd_run_install_script``: the answer (``InstallRun``) asks the core to
write the script to the container's data folder as ``install.sh`` and run it from
``job.image`` with the server's volume, mounts, environment and limits; the core adds the
labels and hardening (never privileged, no new privileges), streams the output to the
console and ``install.log``, fails the install on a non-zero exit or the install timeout,
and removes the install container however it ends (a delete cancels the run). A script
starting with ``#!`` runs with that interpreter, any other with ``/bin/sh``.

Route [ext]: ``GET /containers/<internal_id>/install-log`` → ``{"internal_id","log"}``.
"""

from __future__ import annotations

from typing import TypedDict

import trio
from lightd import CONTAINER_SERVICE, Agent, InstallJob, InstallRun, NotFound, hookimpl
from lightd.api import describe
from quart import Blueprint

#: Bytes of install.log served by the install-log route (the tail).
LOG_TAIL = 256 * 1024


class InstallLog(TypedDict):
    """The tail (last 256 KiB) of the container's ``install.log``, as text."""

    internal_id: str
    log: str


def _entrypoint(job: InstallJob) -> tuple[str, ...]:
    if job.script.startswith("#!"):
        return (job.script_path,)  # the kernel honours the shebang
    return ("/bin/sh", job.script_path)


@hookimpl
def lightd_run_install_script(job: InstallJob) -> InstallRun:
    return InstallRun(image=job.image, script=job.script, entrypoint=_entrypoint(job))


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("install_scripts", __name__)

    @bp.get("/containers/<internal_id>/install-log")
    @describe(
        "Read the install log [ext]",
        description="The output of the container's last install script (its tail). 404 "
        "when the container is unknown or has no install log yet.",
        tags=("containers",),
    )
    async def install_log(internal_id: str) -> InstallLog:
        path = agent.stash[CONTAINER_SERVICE].install_log(internal_id)  # 404 if unknown

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
