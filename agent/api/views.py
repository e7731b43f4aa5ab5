"""Helpers for views: access markers, the request's auth, and JSON bodies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypedDict, TypeVar, overload

import attrs
from quart import g, request

from ..converter import structure
from ..errors import BadRequest, UnsupportedMedia

__all__ = [
    "DOC_ATTR",
    "OPT_IN_PERMISSIONS",
    "PERMISSIONS",
    "AuthInfo",
    "Message",
    "RouteDoc",
    "container_scoped",
    "current_auth",
    "describe",
    "public",
    "query_token",
    "read_json",
    "requires",
    "wants_job",
]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PUBLIC_ATTR = "_lightd_public"
CONTAINER_SCOPED_ATTR = "_lightd_container_scoped"
PERMISSION_ATTR = "_lightd_permission"
QUERY_TOKEN_ATTR = "_lightd_query_token"
DOC_ATTR = "_lightd_doc"

#: What a temporary token may be allowed to do (contract §12, §20), in canonical order.
PERMISSIONS = ("read", "console", "power", "files", "manage", "transfer")
#: Permissions a token has only when minted with them (a token minted without
#: ``permissions`` has the others): ``transfer`` lets a node receive a server (§20).
OPT_IN_PERMISSIONS = frozenset({"transfer"})


def public(view: F) -> F:
    """Serve this view without the vendor header and token (only ping is public)."""
    setattr(view, PUBLIC_ATTR, True)
    return view


def container_scoped(view: F) -> F:
    """Let tokens restricted to some containers reach this view (it filters by itself).

    Views with an ``internal_id`` URL argument are container-scoped already; this is for
    views such as ``GET /containers`` that must list only what ``current_auth()`` allows.
    """
    setattr(view, CONTAINER_SCOPED_ATTR, True)
    return view


def query_token(view: F) -> F:
    """Let a browser link reach this ``GET`` view (contract §13 "Browser links"): a
    temporary token in ``?token=`` stands for the vendor header and the bearer token,
    which a browser following a link cannot send (as for the WebSocket, §8).

    Only when the request has no ``Authorization`` header (the header form keeps working
    as everywhere) and only for ``GET`` (a ``HEAD`` does not spend a single-use token).
    The token needs the view's permission and scope like any temporary token; a
    ``remove_on_use`` token makes a one-click link. The master token is refused there:
    a URL ends up in browser history, proxy logs and ``Referer`` headers.
    """
    setattr(view, QUERY_TOKEN_ATTR, True)
    return view


def requires(permission: str | None) -> Callable[[F], F]:
    """Mark the permission (contract §12) a temporary token needs for this view.

    Unmarked views need ``read`` for ``GET``/``HEAD`` and ``manage`` for anything else, so
    a third-party route is safe by default. ``None`` means the view checks by itself (the
    WebSocket, frame by frame); scope and the token itself are still checked.
    """
    if permission is not None and permission not in PERMISSIONS:
        raise ValueError(f"unknown permission {permission!r}")

    def mark(view: F) -> F:
        setattr(view, PERMISSION_ATTR, permission)
        return view

    return mark


class Message(TypedDict):
    """The answer of an action that has nothing else to say: ``{"message": "..."}``."""

    message: str


@attrs.frozen
class RouteDoc:
    """What ``describe`` recorded about a view; ``/openapi.json`` is generated from it."""

    summary: str
    description: str | None = None
    #: The JSON request body's type (an attrs class or a TypedDict), if it takes one; or
    #: a mapping of media type to type-or-schema for other content
    #: (``{"application/octet-stream": {}}``). A JSON Schema (a mapping) may stand for a
    #: type anywhere.
    body: Any = None
    #: The query string's parameters, as an attrs class or TypedDict of their types.
    query: Any = None
    #: Success answers by status: a type (JSON), ``None`` (no body), or a mapping of
    #: media type to schema-or-type for other content (``{"text/plain": str}``).
    #: Without a ``200`` entry the view's return annotation is the ``200`` answer.
    responses: Mapping[int, Any] = attrs.field(factory=dict)
    #: Error statuses this view answers beyond those every route of its kind has
    #: (auth, body, path arguments): e.g. ``(409, 503)``.
    errors: tuple[int, ...] = ()
    #: Examples: ``"body"`` for the request, a status for an answer.
    examples: Mapping[str | int, Any] = attrs.field(factory=dict)
    tags: tuple[str, ...] = ()


def describe(
    summary: str,
    *,
    description: str | None = None,
    body: Any = None,
    query: Any = None,
    responses: Mapping[int, Any] | None = None,
    errors: Iterable[int] = (),
    examples: Mapping[str | int, Any] | None = None,
    tags: Iterable[str] = (),
) -> Callable[[F], F]:
    """Document a route for ``GET /openapi.json`` (contract §18).

    Every route must be described: a test fails on any route of the URL map the document
    misses. The request and answer schemas are generated from the types given here and
    from the view's return annotation (a TypedDict or attrs class), so what the document
    promises is what the type checker holds the view to. ``description`` defaults to the
    view's docstring.
    """
    doc = RouteDoc(
        summary=summary,
        description=description,
        body=body,
        query=query,
        responses=dict(responses or {}),
        errors=tuple(errors),
        examples=dict(examples or {}),
        tags=tuple(tags),
    )

    def mark(view: F) -> F:
        setattr(view, DOC_ATTR, doc)
        return view

    return mark


@attrs.frozen
class AuthInfo:
    """Who is calling: the master token, a temporary token, or anyone (auth disabled)."""

    kind: Literal["master", "temporary", "disabled", "public"]
    #: Container ids a restricted temporary token may reach; ``None`` = all (when
    #: ``volumes`` is ``None`` too; a token scoped to volumes only reaches no container).
    containers: frozenset[str] | None = None
    #: Unix time a temporary token expires at (WebSocket connections end then).
    expires_at: float | None = None
    #: What a temporary token may do; ``None`` = everything.
    permissions: frozenset[str] | None = None
    #: Volume ids a temporary token names (its containers' volumes are in scope too).
    volumes: frozenset[str] | None = None
    #: The temporary token's public id (revocation closes its WebSockets).
    token_id: str | None = None

    def allows(self, internal_id: str) -> bool:
        if self.containers is None:
            return self.volumes is None
        return internal_id in self.containers

    def may(self, permission: str) -> bool:
        """Does this caller hold ``permission``? (Master and disabled auth hold all; a
        temporary token minted without ``permissions`` all but ``OPT_IN_PERMISSIONS``.)"""
        if self.permissions is None:
            return self.kind != "temporary" or permission not in OPT_IN_PERMISSIONS
        return permission in self.permissions


def current_auth() -> AuthInfo:
    """The auth of the request or WebSocket being served."""
    info: AuthInfo = g.lightd_auth
    return info


#: Deepest nesting of arrays and objects a JSON body may have (contract §7.6).
MAX_JSON_DEPTH = 64


def too_deep(raw: str | bytes, data: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether parsed JSON nests arrays/objects deeper than ``limit``.

    Cheap: a body with at most ``limit`` brackets cannot be too deep (one C-speed count);
    otherwise the parsed value is walked iteratively, stopping at the first level past
    the limit (each container is visited once).
    """
    if isinstance(raw, str):
        opened = raw.count("[") + raw.count("{")
    else:
        opened = raw.count(b"[") + raw.count(b"{")
    if opened <= limit:
        return False
    level: list[Any] = [data]
    for _depth in range(limit):
        nested: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                nested.extend(v for v in item.values() if isinstance(v, dict | list))
            elif isinstance(item, list):
                nested.extend(v for v in item if isinstance(v, dict | list))
        if not nested:
            return False
        level = nested
    return True


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    )


@overload
async def read_json(cls: None = None) -> Any: ...
@overload
async def read_json(cls: type[T]) -> T: ...


async def read_json(cls: type[T] | None = None) -> T | Any:
    """The request's JSON body, structured into ``cls`` when given.

    An empty body counts as ``{}`` (so a missing field is named); a body that is not
    declared as JSON is a 415; unparseable JSON a 400 ``Invalid JSON body``; a body that
    does not fit ``cls`` a 400 naming the first bad field.
    """
    body = await request.get_data(cache=True)
    if not body.strip():
        data: Any = {}
    else:
        if not _is_json(request.mimetype):
            raise UnsupportedMedia("Content-Type must be application/json")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):  # nesting too deep too
            raise BadRequest("Invalid JSON body", code="invalid_json") from None
        if too_deep(body, data):
            raise BadRequest("Invalid JSON body", code="invalid_json")
    if cls is None:
        return data
    return structure(data, cls)


async def wants_job() -> bool:
    """The body's ``"async"`` flag (contract §14): whether to answer ``202`` with a job
    instead of doing the work in the request. Read after the body class accepted the
    body; anything but a boolean is a 400."""
    data = await read_json()
    value = data.get("async", False) if isinstance(data, dict) else False
    if not isinstance(value, bool):
        raise BadRequest("async: must be a boolean", code="invalid_field")
    return value
