"""Request authentication (contract §2, §12): vendor header → bearer token → scope →
origin → permission.

The order is the contract's: a request with neither header gets the vendor 403 first. The
master token is compared in constant time; temporary tokens are looked up by hash. A
temporary token outside its scope (containers, volumes) is a 401; inside its scope but
without the view's permission (``requires``; unmarked views need ``read`` for GET/HEAD
and ``manage`` for the rest) a 403 ``Token lacks permission: <permission>``. A single-use
token is claimed only once every other check has passed, so a request refused for its
origin or its permission does not burn it. The master token, and disabled authorization,
pass everything.

Browser links (contract §13): a view marked ``query_token`` takes a temporary token from
``?token=`` on a ``GET`` without an ``Authorization`` header, without the vendor header;
the master token is refused there (a URL lands in browser history and proxy logs). The
token is never echoed: the refusals are the usual messages, and the access log and the
metrics never see the query string.

Rate limits (``lightd.api.ratelimit``): once the token is known (master, or a live
temporary token), before its scope, origin and permission are checked, so every request
made with it counts whatever its answer; a single-use token is not burnt by a 429.

The rules live here once: the fast read path (``lightd.api.fastpath``) calls the same
``has_vendor_type``, ``bearer_token`` and ``is_master`` on the raw headers.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart.globals import request_ctx
from quart.wrappers import BaseRequestWebsocket

from ..config import AuthorizationConfig
from ..containers import CONTAINERS
from ..errors import Forbidden, Unauthorized
from ..runtime import Agent
from .ratelimit import MASTER_KEY
from .ratelimit import check as check_rate
from .tokens import TOKENS, TemporaryToken
from .views import (
    CONTAINER_SCOPED_ATTR,
    OPT_IN_PERMISSIONS,
    PERMISSION_ATTR,
    QUERY_TOKEN_ATTR,
    AuthInfo,
)

__all__ = [
    "VENDOR_MEDIA_TYPE",
    "authenticate",
    "bearer_token",
    "cors_headers",
    "has_vendor_type",
    "is_master",
    "preflight",
    "required_permission",
    "scope_header",
]

log = logging.getLogger(__name__)

VENDOR_MEDIA_TYPE = "application/vnd.pkglatv1+json"
INVALID_TOKEN = "Missing or invalid authorization token"
#: What a refused request without the vendor type is told it must send.
VENDOR_DETAIL = f"expected header Accept: {VENDOR_MEDIA_TYPE}"


def has_vendor_type(accept: str) -> bool:
    """Does an ``Accept`` header name the vendor media type (any case, any parameters)?"""
    for item in accept.split(","):
        if item.split(";", 1)[0].strip().lower() == VENDOR_MEDIA_TYPE:
            return True
    return False


def bearer_token(header: str) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or ``None``."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def scope_header(conn: BaseRequestWebsocket, name: bytes) -> str | None:
    """The first ``name`` header (lower-case) of ``conn``, as ``conn.headers.get`` gives it
    (latin-1), read from the ASGI scope: a werkzeug ``Headers`` lookup of a header that is
    not there raises and catches a ``KeyError``, a cost every request paid for ``Origin``."""
    for key, value in conn.scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def origin_allowed(agent: Agent, origin: str | None) -> bool:
    allowed = agent.config.server.allowed_origins
    return not allowed or origin is None or origin in allowed


def _check_origin(agent: Agent, conn: BaseRequestWebsocket) -> None:
    if agent.config.server.allowed_origins and not origin_allowed(
        agent, scope_header(conn, b"origin")
    ):
        raise Forbidden("Origin not allowed", code="origin_not_allowed")


def is_master(auth: AuthorizationConfig, token: str) -> bool:
    """Is ``token`` the master token? Compared in constant time."""
    return hmac.compare_digest(token.encode("utf-8", "surrogatepass"), auth.token.encode("utf-8"))


_UNMARKED = object()


def required_permission(view: Callable[..., Any] | None, method: str) -> str | None:
    """The permission a temporary token needs for ``view`` (see ``lightd.api.requires``)."""
    marked = getattr(view, PERMISSION_ATTR, _UNMARKED)
    if marked is not _UNMARKED:
        return marked if isinstance(marked, str) else None
    return "read" if method in ("GET", "HEAD") else "manage"


def _volume_in_scope(agent: Agent, record: TemporaryToken, volume_id: str) -> bool:
    """A token's volumes: those it names, and those its containers use."""
    volume_id = volume_id.lower()
    if record.volumes is not None and volume_id in record.volumes:
        return True
    if record.containers is None:
        return False
    containers = agent.stash.get(CONTAINERS)
    if containers is None:
        return False
    for internal_id in record.containers:
        supervisor = containers.find(internal_id)
        if supervisor is not None and supervisor.record.volume_id.lower() == volume_id:
            return True
    return False


def _scope_allows(
    agent: Agent,
    record: TemporaryToken,
    view: Callable[..., Any] | None,
    conn: BaseRequestWebsocket,
) -> bool:
    """May a token restricted to some containers or volumes reach this route?"""
    if record.containers is None and record.volumes is None:
        return True
    args = conn.view_args or {}
    internal_id = args.get("internal_id")
    if internal_id is not None:
        return record.containers is not None and internal_id in record.containers
    volume_id = args.get("volume_id")
    if isinstance(volume_id, str):
        return _volume_in_scope(agent, record, volume_id)
    return bool(getattr(view, CONTAINER_SCOPED_ATTR, False))


async def authenticate(
    agent: Agent,
    token: str | None,
    view: Callable[..., Any] | None,
    conn: BaseRequestWebsocket,
    *,
    temporary_only: bool = False,
) -> AuthInfo:
    """Check ``token`` and the origin of ``conn`` (request or websocket); who is it?
    ``temporary_only``: the master token is refused (a token from a browser link)."""
    if not agent.config.authorization.enabled:
        log.warning("authorization disabled: %s accepted without a token", conn.path)
        _check_origin(agent, conn)
        return AuthInfo("disabled")
    if token is None or not token.startswith("lightd_") or len(token) < 20:
        raise Unauthorized(INVALID_TOKEN)
    if is_master(agent.config.authorization, token):
        if temporary_only:
            log.warning("the master token was refused in a link's query string: %s", conn.path)
            raise Unauthorized(INVALID_TOKEN)
        check_rate(agent, MASTER_KEY, master=True)
        _check_origin(agent, conn)
        return AuthInfo("master")
    registry = agent.stash[TOKENS]
    record = registry.lookup(token)
    if record is None:
        raise Unauthorized(INVALID_TOKEN)
    check_rate(agent, record.id, master=False)
    if not _scope_allows(agent, record, view, conn):
        raise Unauthorized(INVALID_TOKEN)
    _check_origin(agent, conn)
    permission = required_permission(view, getattr(conn, "method", "GET"))
    if permission is not None and (
        permission not in record.permissions
        if record.permissions is not None
        else permission in OPT_IN_PERMISSIONS  # never had without asking (``transfer``)
    ):
        raise Forbidden(f"Token lacks permission: {permission}", code="permission_denied")
    if record.remove_on_use:
        if not registry.take(record):
            raise Unauthorized(INVALID_TOKEN)
        await registry.forget(record)
    return AuthInfo(
        "temporary",
        containers=record.containers,
        expires_at=record.expires_at,
        permissions=record.permissions,
        volumes=record.volumes,
        token_id=record.id,
    )


def link_token(view: Callable[..., Any] | None) -> str | None:
    """The ``?token=`` of a browser link, when this request is one: a ``GET`` of a view
    marked ``query_token``, without an ``Authorization`` header."""
    if (
        not getattr(view, QUERY_TOKEN_ATTR, False)
        or request.method != "GET"
        or "Authorization" in request.headers
    ):
        return None
    return request.args.get("token")


async def authenticate_http(agent: Agent, view: Callable[..., Any] | None) -> AuthInfo:
    conn = request_ctx.request
    link = link_token(view)
    if link is not None:
        return await authenticate(agent, link, view, conn, temporary_only=True)
    if not has_vendor_type(scope_header(conn, b"accept") or ""):
        raise Forbidden("Invalid vendor header", code="invalid_vendor", details=[VENDOR_DETAIL])
    token = bearer_token(scope_header(conn, b"authorization") or "")
    return await authenticate(agent, token, view, conn)


def cors_headers(agent: Agent, response: Response) -> None:
    origin = scope_header(request_ctx.request, b"origin")
    if origin is None or not origin_allowed(agent, origin):
        return
    response.headers["Access-Control-Allow-Origin"] = (
        origin if agent.config.server.allowed_origins else "*"
    )
    response.vary.add("Origin")


def preflight(agent: Agent) -> Response:
    """Answer a CORS preflight without auth (browsers send it without credentials)."""
    if not origin_allowed(agent, request.headers.get("Origin")):
        raise Forbidden("Origin not allowed", code="origin_not_allowed")
    response = Response("", status=204)
    response.headers["Access-Control-Allow-Methods"] = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    response.headers["Access-Control-Allow-Headers"] = request.headers.get(
        "Access-Control-Request-Headers", "Accept, Authorization, Content-Type"
    )
    response.headers["Access-Control-Max-Age"] = "600"
    return response
