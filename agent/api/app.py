"""The Quart app: routes from plugins, auth in front, JSON errors for every failure."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from quart import (
    Blueprint,
    Response,
    current_app,
    g,
    has_request_context,
    jsonify,
    request,
    websocket,
)
from quart.globals import request_ctx, websocket_ctx
from quart.json.provider import DefaultJSONProvider
from quart.routing import QuartRule
from quart.typing import ResponseTypes
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from ..errors import ApiError
from ..files import FileError, api_status
from ..runtime import Agent
from .auth import authenticate, authenticate_http, cors_headers, preflight, scope_header
from .fastpath import fast_reads
from .metrics import label_routes, observe
from .ratelimit import add_headers as add_rate_limit_headers
from .streaming import body_flow
from .views import PUBLIC_ATTR, AuthInfo

__all__ = ["create_app"]

log = logging.getLogger(__name__)

#: Messages for errors raised by Quart itself (routing, body size).
_HTTP_MESSAGES = {
    400: ("Bad request", "bad_request"),
    404: ("Not found", "not_found"),
    405: ("Method not allowed", "method_not_allowed"),
    413: ("Request body too large", "payload_too_large"),
    415: ("Content-Type must be application/json", "unsupported_media_type"),
}


def _error(status: int, message: str, code: str) -> Response:
    response = jsonify({"error": message, "code": code})
    response.status_code = status
    return response


async def _drain_body() -> None:
    """Read what is left of a request body the view answered without reading (a 404 before
    the body mattered), so the kept-alive connection is ready for the client's next
    request; a body over the size limit is left alone (its connection is closed)."""
    conn = request_ctx.request
    if scope_header(conn, b"content-length") is None:
        return  # the usual GET: werkzeug's content_length would look up two missing headers
    length = conn.content_length
    if not length or length > (current_app.config["MAX_CONTENT_LENGTH"] or 0):
        return
    with contextlib.suppress(HTTPException):
        await conn.get_data(cache=True)


class _Rule(QuartRule):
    """A route whose URL builders (for ``url_for``, which the agent never calls) are
    compiled when first used rather than at start: werkzeug compiles two per route, half
    of the cost of registering the agent's 106 routes."""

    def _compile_builder(self, append_unknown: bool = True) -> Callable[..., tuple[str, str]]:
        compiled: Callable[..., tuple[str, str]] | None = None

        def build(rule: QuartRule, *args: Any, **kwargs: Any) -> tuple[str, str]:
            nonlocal compiled
            if compiled is None:
                compiled = QuartRule._compile_builder(rule, append_unknown).__get__(rule, None)
            return compiled(*args, **kwargs)

        return build


def create_app(agent: Agent, blueprints: Iterable[Blueprint]) -> QuartTrio:
    app = QuartTrio("lightd", static_folder=None)  # no /static route: /docs serves its own
    app.url_rule_class = _Rule
    app.config.update(
        MAX_CONTENT_LENGTH=agent.config.server.max_body_bytes,
        PROPAGATE_EXCEPTIONS=False,
    )
    if isinstance(app.json, DefaultJSONProvider):  # it is; the check tells the type checker
        app.json.sort_keys = False  # keep the documented key order
        app.json.compact = True
    for blueprint in blueprints:
        app.register_blueprint(blueprint)

    # Before the access check, so that a refused request is measured under its route.
    observing = label_routes(agent, app)

    @app.before_request
    async def check_access() -> Response | None:
        conn = request_ctx.request  # (once: every ``request.x`` goes through a proxy)
        if conn.method == "OPTIONS":
            return preflight(agent)
        if conn.routing_exception is not None:
            return None  # unknown route or method: answered as JSON 404/405 without auth
        view = app.view_functions.get(conn.endpoint or "")
        if getattr(view, PUBLIC_ATTR, False):
            g.lightd_auth = AuthInfo("public")
            return None
        g.lightd_auth = await authenticate_http(agent, view)
        return None

    @app.before_websocket
    async def check_websocket() -> None:
        if websocket.routing_exception is not None:
            return
        view = app.view_functions.get(websocket.endpoint or "")
        token = websocket.args.get("token")
        g.lightd_auth = await authenticate(agent, token, view, websocket_ctx.websocket)

    @app.after_request
    async def add_cors(response: Response) -> Response:
        cors_headers(agent, response)
        add_rate_limit_headers(response)
        await _drain_body()
        return response

    @app.after_websocket
    async def add_websocket_headers(response: ResponseTypes | None) -> ResponseTypes | None:
        add_rate_limit_headers(response)  # on a refused upgrade's answer
        return response

    @app.errorhandler(ApiError)
    async def api_error(error: ApiError) -> Response:
        response = jsonify(error.to_body())  # with its "details" when it has some
        response.status_code = error.status
        return response

    @app.errorhandler(FileError)
    async def file_error(error: FileError) -> Response:
        # the file layer's plain exceptions: message and code as raised, status from its table
        return _error(api_status(error), error.message, error.code)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        message, code = _HTTP_MESSAGES.get(status, (error.name, "http_error"))
        response = _error(status, message, code)
        if isinstance(error, MethodNotAllowed) and error.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(error.valid_methods))
        return response

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        where = f"{request.method} {request.path}" if has_request_context() else "websocket"
        log.error("unhandled error in %s", where, exc_info=error)
        return _error(500, "Internal server error", "internal_error")

    # Quart's documented way to add ASGI middleware; the wrapper has the same call shape.
    app.asgi_app = body_flow(app, app.asgi_app)  # type: ignore[method-assign,assignment]
    app.asgi_app = fast_reads(agent, app.asgi_app)  # type: ignore[method-assign,assignment]
    if observing:  # metrics and the access log, around everything (fast reads too)
        app.asgi_app = observe(agent, app, app.asgi_app)  # type: ignore[method-assign,assignment]
    return app
