"""Hot reads answered in front of Quart, for the plain case only.

Panels poll ``GET /containers/<id>`` for every server they show. Through Quart's request
machinery one poll costs more than Docker's whole inspect exchange, so a reader that a
plugin registers here answers a request directly at the ASGI level when, and only when,
nothing but the answer is in question: ``GET``, the vendor header, the master token, no
``Origin`` (so no CORS), authorization enabled, and the reader finding the object.
Everything else (errors, temporary tokens, browsers, unknown ids) goes on to Quart, which
stays the one place deciding errors; a test checks both paths give the same answer.

Rate limits (``lightd.api.ratelimit``) hold here too: with ``server.rate_limit.master``
the master token's request is counted in the same bucket as through Quart and its answer
carries the same headers; a request over the limit goes on to Quart, which answers the 429.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from ..config import AuthorizationConfig
from ..converter import json_body
from ..runtime import Agent, StashKey
from .auth import bearer_token, has_vendor_type, is_master
from .ratelimit import MASTER_KEY, limiter

__all__ = ["FAST_READS", "Reader", "answer", "fast_reads", "json_body"]

#: What Quart's ``asgi_app`` is.
ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Coroutine[Any, Any, None]]

#: Path → reader: the body (``json_body`` of the view's answer), or ``None`` (not found:
#: Quart answers). A path ending in ``/`` stands for that path plus one segment, which
#: the reader gets (``"/containers/"``: ``/containers/<id>``); any other path is exact
#: and its reader gets ``""``. Registered in ``lightd_configure``.
Reader = Callable[[str], bytes | None]
FAST_READS: StashKey[dict[str, Reader]] = StashKey("fast_reads")


def fast_reads(agent: Agent, app: ASGIApp) -> ASGIApp:
    """Wrap ``app`` (Quart's ``asgi_app``) with the registered readers."""
    readers = agent.stash.setdefault(FAST_READS, {})
    limits = limiter(agent)

    async def front(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            config = agent.config
            body = answer(config.authorization, readers, scope)
            if body is not None:
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ]
                rate = config.server.rate_limit
                if rate.master and rate.requests_per_minute:
                    counted = limits.take_raw(MASTER_KEY, rate)
                    if counted is not None:
                        headers += counted
                    else:  # Quart answers the 429 (a refusal takes nothing: not counted twice)
                        body = None
                if body is not None:
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": body, "more_body": False})
                    return
        await app(scope, receive, send)

    return front


def answer(
    auth: AuthorizationConfig, readers: Mapping[str, Reader], scope: HTTPScope
) -> bytes | None:
    """The body to send for ``scope``, or ``None`` when Quart must answer it."""
    path: str = scope["path"]
    if path.endswith("/"):
        return None  # Quart's routing decides about trailing slashes
    reader = readers.get(path)
    rest = ""
    if reader is None:
        head, _, rest = path.rpartition("/")
        reader = readers.get(head + "/")
        if reader is None:
            return None
    accept = authorization = None
    for name, value in scope["headers"]:
        if name == b"accept" and accept is None:
            accept = value
        elif name == b"authorization" and authorization is None:
            authorization = value
        elif name in (b"accept", b"authorization", b"origin"):
            return None  # repeated, or a browser (CORS): Quart decides
    if accept is None or authorization is None or not auth.enabled:
        return None
    # The same checks as every other request (lightd.api.auth), on the headers as Quart
    # decodes them (latin-1); anything they refuse goes on to Quart, which answers it.
    if not has_vendor_type(accept.decode("latin-1")):
        return None
    token = bearer_token(authorization.decode("latin-1"))
    if token is None or not is_master(auth, token):
        return None
    return reader(rest)
