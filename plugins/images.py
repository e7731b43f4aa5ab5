"""Built-in plugin ``images``: the engine's images, listed, pulled and removed (contract §17).

Routes (master token only: images are shared by every server of the node, and a pull
reaches out to registries with the node's credentials):

* ``GET /images`` → ``{"images":[{"id","tags","size","created_at","in_use_by"}]}``, every
  image of the engine; ``in_use_by`` are the containers of this node whose record names
  the image (``image`` or ``install_image``), matched by what the reference points at:
  ``busybox``, ``busybox:latest`` and ``docker.io/library/busybox:latest`` are one image,
  and so are its id (or an id prefix) and its ``repo@sha256:…`` digests.
* ``POST /images/pull {"image","auth"?:{"username","password"}}`` → ``202 {"message":
  "Pull started","job_id"}``: a job of kind ``image.pull`` reporting the bytes downloaded
  over all layers (``unit`` ``bytes``; ``total`` known once every layer announced its
  size); it fails with ``Failed to pull image <image>: <engine's reason>``. Credentials:
  ``auth``, else config ``docker.registries`` for the image's registry, else the Docker
  client's config file. ``auth`` lives only in the job's closure: never stored, logged
  or answered. At most ``MAX_PULLS`` pulls run at once (more: 429).
* ``DELETE /images/<ref>`` (``ref`` URL-encoded: ``busybox%3Alatest``,
  ``ghcr.io%2Fo%2Fx%3A1``) → ``{"message":"Image deleted"}``; used by a container of
  the node → ``409 Image in use by <ids>`` (comma-separated), by a container that is not
  the node's → ``409 Image in use by <docker id>``; unknown → ``404 Image not found``.
  The removal is never forced: a tag is untagged, the image goes with its last tag.

Hooks: ``lightd_configure`` (the job kind), ``lightd_add_routes``.
"""

from __future__ import annotations

import re
from typing import Any, NotRequired, TypedDict

import attrs
from lightd import (
    CONTAINER_SERVICE,
    JOBS,
    Agent,
    BadRequest,
    Conflict,
    DockerConflict,
    DockerError,
    DockerNotFound,
    Forbidden,
    JobContext,
    JobFailed,
    JobLimitReached,
    JobStarted,
    NotFound,
    TooManyRequests,
    field_check,
    hookimpl,
    valid_image,
)
from lightd.api import Message, current_auth, describe, read_json, requires
from quart import Blueprint

__all__ = ["KIND", "MAX_PULLS", "ImageRef", "normalize", "parse_ref"]

KIND = "image.pull"
#: Pulls running (or queued) at once; one more is a 429.
MAX_PULLS = 4
_HUB = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
_ID = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")
_ENGINE_USER = re.compile(r"container ([0-9a-f]{12,64})")


@attrs.frozen
class ImageRef:
    """A reference as the engine resolves it: ``docker.io/library/busybox`` with its tag
    (``latest`` when none) or its digest."""

    name: str
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag}"


def parse_ref(reference: str) -> ImageRef:
    """``reference`` fully spelled: registry (``docker.io`` for Docker Hub), the
    ``library/`` of official images, ``:latest`` when neither tag nor digest is named."""
    name, at, digest = reference.partition("@")
    repository, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        repository, tag = name, ""
    first, slash, rest = repository.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain = "docker.io" if first.lower() in _HUB else first.lower()
        path = rest
    else:
        domain, path = "docker.io", repository
    if domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    full = f"{domain}/{path}"
    if at:
        return ImageRef(full, None, digest)
    return ImageRef(full, tag or "latest", None)


def normalize(reference: str) -> str:
    """One spelling per reference (``busybox`` → ``docker.io/library/busybox:latest``)."""
    return str(parse_ref(reference))


def _id_of(reference: str) -> str | None:
    """The hex id ``reference`` names, when it is an image id or id prefix."""
    match = _ID.fullmatch(reference)
    return match[1] if match else None


def _names(image: dict[str, Any]) -> set[str]:
    """Every normalised reference the engine's image answers to (tags and digests)."""
    names = set()
    for tag in image.get("RepoTags") or ():
        if isinstance(tag, str) and tag != "<none>:<none>":
            names.add(normalize(tag))
    for digest in image.get("RepoDigests") or ():
        if isinstance(digest, str) and digest != "<none>@<none>":
            names.add(normalize(digest))
    return names


def _resolve(reference: str, images: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The listed image ``reference`` points at, or ``None``."""
    wanted = normalize(reference) if valid_image(reference) else None
    hex_id = _id_of(reference)
    for image in images:
        if wanted is not None and wanted in _names(image):
            return image
    if hex_id is not None:
        found = [
            i for i in images if str(i.get("Id", "")).removeprefix("sha256:").startswith(hex_id)
        ]
        if len(found) == 1:
            return found[0]
    return None


class ImageSummary(TypedDict):
    #: The engine's image id (``sha256:…``).
    id: str
    #: ``repo:tag`` names (none for an untagged image).
    tags: list[str]
    #: Bytes on disk (layers shared with other images counted in each).
    size: int
    #: Unix time the image was built.
    created_at: int
    #: ``internal_id``s of this node's containers made from it (image or install image).
    in_use_by: list[str]


class ImageList(TypedDict):
    images: list[ImageSummary]


@attrs.frozen
class ImagePullCredentials:
    """A registry login for this pull only (never stored; the password kept out of
    ``repr``)."""

    username: str = attrs.field(validator=field_check(lambda v: bool(v), "must not be empty"))
    password: str = attrs.field(
        repr=False, validator=field_check(lambda v: bool(v), "must not be empty")
    )


@attrs.frozen
class ImagePullBody:
    image: str
    auth: ImagePullCredentials | None = None


class ImagePullAuth(TypedDict):
    username: str
    password: str


class ImagePullRequest(TypedDict):
    image: str
    auth: NotRequired[ImagePullAuth]


class ImagePullResult(TypedDict):
    """A finished pull job's ``result``."""

    message: str
    image: str
    id: str


def _master_only() -> None:
    """Images are the node's, not a server's: the master token (or auth disabled) only."""
    if current_auth().kind == "temporary":
        raise Forbidden("Images need the master token", code="master_token_required")


@hookimpl
def lightd_configure(agent: Agent) -> None:
    agent.stash[JOBS].register_kind(KIND, permission="manage")


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("images", __name__)

    def in_use(images: list[dict[str, Any]]) -> dict[str, list[str]]:
        """Image id → the node's containers made from it."""
        service = agent.stash.get(CONTAINER_SERVICE)
        used: dict[str, set[str]] = {}
        if service is None:
            return {}
        for reference, ids in service.images_in_use().items():
            image = _resolve(reference, images)
            if image is not None:
                used.setdefault(str(image.get("Id", "")), set()).update(ids)
        return {image_id: sorted(ids) for image_id, ids in used.items()}

    @bp.get("/images")
    @describe(
        "List the engine's images",
        description="Every image of the node's Docker engine. `in_use_by`: the containers "
        "of this node whose `image` or `install_image` is that image (by reference, "
        "normalised: `busybox` is `docker.io/library/busybox:latest`, or by id or digest). "
        "Master token only.",
        tags=("images",),
    )
    @requires("manage")
    async def list_images() -> ImageList:
        _master_only()
        images = await agent.docker.images()
        used = in_use(images)
        answer: list[ImageSummary] = []
        for image in images:
            image_id = str(image.get("Id", ""))
            tags = [
                str(t)
                for t in image.get("RepoTags") or ()
                if isinstance(t, str) and t != "<none>:<none>"
            ]
            answer.append(
                {
                    "id": image_id,
                    "tags": sorted(tags),
                    "size": int(image.get("Size") or 0),
                    "created_at": int(image.get("Created") or 0),
                    "in_use_by": used.get(image_id, []),
                }
            )
        answer.sort(key=lambda i: (i["tags"][:1] or ["~"], i["id"]))
        return {"images": answer}

    @bp.post("/images/pull")
    @describe(
        "Pull an image",
        description="Starts a job (`image.pull`) that pulls `image` (`latest` when no tag "
        "is named) and answers at once. Its progress is the bytes downloaded over all "
        "layers (`total` known once every layer has announced its size); it fails with "
        "`Failed to pull image <image>: <reason>`, its `result` is `{message, image, id}`. "
        "Credentials: `auth`, else config `docker.registries` for the image's registry, "
        "else the Docker client's config file; `auth` is never stored nor shown. "
        f"At most {MAX_PULLS} pulls at once (429). Master token only.",
        body=ImagePullRequest,
        responses={202: JobStarted},
        errors=(400, 429),
        examples={"body": {"image": "ghcr.io/acme/game:1.2"}},
        tags=("images",),
    )
    @requires("manage")
    async def pull_image() -> tuple[JobStarted, int]:
        _master_only()
        body = await read_json(ImagePullBody)
        image = body.image
        if not valid_image(image):
            raise BadRequest(f"Invalid image: {image}", code="invalid_image")
        auth = body.auth

        async def pull_job(job: JobContext) -> None:
            try:
                await agent.docker.pull(
                    image,
                    auth=auth,
                    registries=agent.config.docker.registries,
                    on_bytes=job.progress,
                )
                pulled = await agent.docker.inspect_image(image)
            except DockerError as exc:
                raise JobFailed(f"Failed to pull image {image}: {exc}") from None
            result: ImagePullResult = {
                "message": "Image pulled",
                "image": image,
                "id": str(pulled.get("Id", "")),
            }
            job.result = result

        try:
            view = await agent.stash[JOBS].submit(
                KIND, pull_job, unit="bytes", limit_key=KIND, limit=MAX_PULLS
            )
        except JobLimitReached:
            raise TooManyRequests(
                "Too many image pulls in progress", code="too_many_pulls"
            ) from None
        return {"message": "Pull started", "job_id": view.id}, 202

    @bp.delete("/images/<path:ref>")
    @describe(
        "Remove an image",
        description="`ref` is a name (`busybox:latest`), an id or an id prefix, "
        "URL-encoded (`busybox%3Alatest`, `ghcr.io%2Facme%2Fgame%3A1.2`). Never forced: a "
        "name is untagged and the image goes with its last name. Refused with 409 "
        "`Image in use by <ids>` while a container of this node is made from it (or a "
        "container of the engine that is not this node's uses it); 404 `Image not "
        "found`. Master token only.",
        responses={200: Message},
        errors=(404, 409),
        tags=("images",),
    )
    @requires("manage")
    async def delete_image(ref: str) -> Message:
        _master_only()
        images = await agent.docker.images()
        image = _resolve(ref, images)
        if image is None:
            raise NotFound("Image not found", code="image_not_found")
        users = in_use(images).get(str(image.get("Id", "")))
        if users:
            raise Conflict(f"Image in use by {','.join(users)}", code="image_in_use")
        try:
            await agent.docker.remove_image(ref)
        except DockerNotFound:
            raise NotFound("Image not found", code="image_not_found") from None
        except DockerConflict as exc:
            user = _ENGINE_USER.search(str(exc))
            if user is not None:
                raise Conflict(f"Image in use by {user[1][:12]}", code="image_in_use") from None
            raise Conflict(str(exc), code="image_conflict") from None
        return {"message": "Image deleted"}

    return [bp]
