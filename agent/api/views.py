"""Helpers for views: access markers, the request's auth, and JSON bodies."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

import attrs
from quart import g, request

from ..converter import structure
from ..errors import BadRequest, UnsupportedMedia

__all__ = ["AuthInfo", "container_scoped", "current_auth", "public", "read_json"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

PUBLIC_ATTR = "_lightd_public"
CONTAINER_SCOPED_ATTR = "_lightd_container_scoped"


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


@attrs.frozen
class AuthInfo:
    """Who is calling: the master token, a temporary token, or anyone (auth disabled)."""

    kind: Literal["master", "temporary", "disabled", "public"]
    #: Container ids a restricted temporary token may reach; ``None`` = all.
    containers: frozenset[str] | None = None
    #: Unix time a temporary token expires at (WebSocket connections end then).
    expires_at: float | None = None

    def allows(self, internal_id: str) -> bool:
        return self.containers is None or internal_id in self.containers


def current_auth() -> AuthInfo:
    """The auth of the request or WebSocket being served."""
    info: AuthInfo = g.lightd_auth
    return info


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
    if cls is None:
        return data
    return structure(data, cls)
