"""Built-in plugin ``jobs``: the core job runner's config, schema, service and routes (§14).

The runner itself is ``lightd.jobs``; this essential plugin wires it in through the same
hooks as every feature: the ``jobs`` config section, the ``jobs`` schema, the runner on
the stash (``agent.stash[JOBS]``, set *first* of all ``lightd_configure`` implementations
so every other plugin may register its kinds there), and the ``jobs`` service in the root
nursery.

Routes: ``GET /jobs[?volume_id=&internal_id=]``, ``GET /jobs/:id``, ``DELETE /jobs/:id``.
A temporary token restricted to containers or volumes sees only the jobs of its scope (a
job of one of its containers, or of a volume in its scope); another job's id answers 401
as any route outside its scope. Cancelling needs the permission the job's kind declared
(``manage`` unless said otherwise).
"""

from __future__ import annotations

from typing import TypedDict

import attrs
import trio
from quart import Blueprint, request

from ..containers import CONTAINERS
from ..converter import field_check
from ..errors import BadRequest, Forbidden, NotFound, Unauthorized
from ..hookspecs import hookimpl
from ..jobs import JOB_ID, JOBS, MIGRATIONS, JobBody, Jobs, JobView
from ..runtime import Agent, Service
from ..store import Migration
from .views import AuthInfo, container_scoped, current_auth, describe, requires

__all__ = ["JobsConfig"]

INVALID_TOKEN = "Missing or invalid authorization token"


def _max_running(value: int) -> bool:
    return 1 <= value <= 64


@attrs.frozen
class JobsConfig:
    #: Jobs running at once on the node; more wait ``queued``.
    max_running: int = attrs.field(
        default=4, validator=field_check(_max_running, "must be 1 to 64")
    )


class JobList(TypedDict):
    """Kept jobs (the last 24 hours, at most 1 000), newest first."""

    jobs: list[JobBody]


class JobCancelled(TypedDict):
    message: str


class JobsQuery(TypedDict, total=False):
    #: Only jobs of this volume.
    volume_id: str
    #: Only jobs of this container.
    internal_id: str


@hookimpl
def lightd_add_config_sections() -> dict[str, type]:
    return {"jobs": JobsConfig}


@hookimpl
def lightd_add_migrations() -> list[Migration]:
    return list(MIGRATIONS)


@hookimpl(tryfirst=True)
def lightd_configure(agent: Agent) -> None:
    # tryfirst: before every other plugin's configure, which may register job kinds.
    settings = agent.config.section(JobsConfig)
    agent.stash[JOBS] = Jobs(agent, max_running=settings.max_running)


@hookimpl
def lightd_add_services(agent: Agent) -> list[Service]:
    jobs = agent.stash[JOBS]

    async def serve_jobs(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await jobs.serve(task_status=task_status)

    return [Service("jobs", serve_jobs)]


def _volume_in_scope(agent: Agent, auth: AuthInfo, volume_id: str) -> bool:
    """A token's volumes: those it names, and those its containers use."""
    if auth.volumes is not None and volume_id in auth.volumes:
        return True
    containers = agent.stash.get(CONTAINERS)
    if auth.containers is None or containers is None:
        return False
    for internal_id in auth.containers:
        supervisor = containers.find(internal_id)
        if supervisor is not None and supervisor.record.volume_id.lower() == volume_id:
            return True
    return False


def visible(agent: Agent, auth: AuthInfo, job: JobView) -> bool:
    """May this caller see the job? Unrestricted callers see every job; a token scoped to
    containers or volumes sees those of its containers and of the volumes in its scope."""
    if auth.containers is None and auth.volumes is None:
        return True
    if auth.containers is not None and job.internal_id in auth.containers:
        return True
    return job.volume_id is not None and _volume_in_scope(agent, auth, job.volume_id)


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    jobs = agent.stash[JOBS]
    bp = Blueprint("jobs", __name__)

    def find(job_id: str) -> JobView:
        if not JOB_ID.fullmatch(job_id):
            raise BadRequest("Invalid job id", code="invalid_job_id")
        job = jobs.get(job_id)
        if job is None:
            raise NotFound("Job not found", code="job_not_found")
        if not visible(agent, current_auth(), job):
            raise Unauthorized(INVALID_TOKEN)
        return job

    @bp.get("/jobs")
    @describe(
        "List jobs",
        description="Jobs of the last 24 hours (at most 1 000), newest first; a token "
        "scoped to containers or volumes lists only the jobs of its scope.",
        query=JobsQuery,
        tags=("jobs",),
    )
    @container_scoped
    async def list_jobs() -> JobList:
        auth = current_auth()
        found = jobs.select(
            volume_id=request.args.get("volume_id"), internal_id=request.args.get("internal_id")
        )
        return {"jobs": [job.to_json() for job in found if visible(agent, auth, job)]}

    @bp.get("/jobs/<job_id>")
    @describe("Show a job: its state, progress, error or result", errors=(400,), tags=("jobs",))
    @container_scoped
    async def get_job(job_id: str) -> JobBody:
        return find(job_id).to_json()

    @bp.delete("/jobs/<job_id>")
    @describe(
        "Cancel a job",
        description="Cancels a queued or running job; its partial output is removed. "
        "Answers once the job has ended (or after 10 s, the cancellation under way).",
        errors=(400, 409),
        tags=("jobs",),
    )
    @requires(None)
    @container_scoped
    async def cancel_job(job_id: str) -> JobCancelled:
        job = find(job_id)
        kind = jobs.kind(job.kind)
        permission = "manage" if kind is None else kind.permission
        if not current_auth().may(permission):
            raise Forbidden(f"Token lacks permission: {permission}", code="permission_denied")
        await jobs.cancel(job.id)
        return {"message": "Job cancelled"}

    return [bp]
