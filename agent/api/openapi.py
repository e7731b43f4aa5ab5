"""Built-in plugin ``openapi``: ``GET /openapi.json`` and the ``GET /docs`` page (contract §18).

The document is generated from the app's URL map, so every route (plugins' included) is
in it; what each route takes and answers comes from its ``describe`` (``RouteDoc``) and
its view's return annotation, turned into JSON Schema by msgspec (attrs classes and
TypedDicts). A route without ``describe``, or whose answer type is no schema
(``dict[str, Any]``, ``Response``), is still listed, marked ``x-undocumented``, so the
coverage test names it rather than the document hiding it.

Both routes are public and need no header, like ping. The document is built once, on the
first request (the URL map is complete by then), and its bytes are kept. ``/docs`` is
Swagger UI served from the package (``static/swagger-ui``, vendored by
``scripts/vendor-swagger-ui.sh``): nodes are often offline, so the page loads nothing
from another origin, and its CSP says so.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import re
import typing
from collections.abc import Callable, Iterator, Mapping
from http import HTTPStatus
from importlib import resources
from typing import Any

import attrs
from quart import Blueprint, Quart, Response, current_app

from ..errors import NotFound
from ..hookspecs import hookimpl
from ..runtime import Agent
from .streaming import STREAMS_ATTR
from .views import DOC_ATTR, PUBLIC_ATTR, QUERY_TOKEN_ATTR, RouteDoc, describe, public

__all__ = ["DOCS_ASSETS", "VENDOR_MEDIA_TYPE", "build_document", "operations"]

VENDOR_MEDIA_TYPE = "application/vnd.pkglatv1+json"
REF = "#/components/schemas/{name}"
JSON = "application/json"

#: Statuses of the shared error answers (``components/responses``): name, and an example.
ERRORS: Mapping[int, tuple[str, str, dict[str, str]]] = {
    400: ("BadRequest", "Invalid input", {"error": "Invalid JSON body", "code": "invalid_json"}),
    401: (
        "Unauthorized",
        "Missing or invalid token",
        {"error": "Missing or invalid authorization token", "code": "unauthorized"},
    ),
    403: (
        "Forbidden",
        "Vendor header missing, or origin not allowed",
        {"error": "Invalid vendor header", "code": "forbidden"},
    ),
    404: ("NotFound", "Unknown resource", {"error": "Container not found", "code": "not_found"}),
    409: ("Conflict", "State conflict", {"error": "Container is installing", "code": "conflict"}),
    413: (
        "PayloadTooLarge",
        "Body over server.max_body_bytes",
        {"error": "Request body too large", "code": "payload_too_large"},
    ),
    415: (
        "UnsupportedMediaType",
        "Body not declared as JSON",
        {"error": "Content-Type must be application/json", "code": "unsupported_media_type"},
    ),
    429: ("TooManyRequests", "Too many requests", {"error": "Rate limit exceeded"}),
    500: (
        "InternalError",
        "Unexpected failure (never a stack trace)",
        {"error": "Internal server error", "code": "internal_error"},
    ),
    503: (
        "DockerUnavailable",
        "Docker engine unreachable",
        {"error": "Docker engine unreachable", "code": "docker_unavailable"},
    ),
}

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "description": "Every error body (contract §1).",
    "type": "object",
    "properties": {
        "error": {"type": "string", "description": "A human message."},
        "code": {"type": "string", "description": "A snake_case machine code."},
        "details": {
            "description": "More on what was wrong or expected.",
            "anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "object"}],
        },
    },
    "required": ["error"],
}

SECURITY_SCHEMES: dict[str, Any] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "lightd_<token>",
        "description": "The master token or a temporary token (contract §2).",
    },
    "vendor": {
        "type": "apiKey",
        "in": "header",
        "name": "Accept",
        "description": f"The vendor media type: `Accept: {VENDOR_MEDIA_TYPE}` (contract §2).",
    },
    "wsToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "WebSocket upgrades carry the token in the query string (contract §8).",
    },
    "linkToken": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "Browser links (contract §13): a temporary token (never the master "
        "token) in the query string, instead of the vendor header and the bearer token, "
        "on the download routes that say so; a `remove_on_use` token works once.",
    },
}

#: Werkzeug converters → the path parameter's schema.
_CONVERTERS: Mapping[str, dict[str, Any]] = {
    "default": {"type": "string"},
    "string": {"type": "string"},
    "path": {"type": "string"},
    "int": {"type": "integer", "minimum": 0},
    "float": {"type": "number", "minimum": 0},
    "uuid": {"type": "string", "format": "uuid"},
}
_ARGUMENT = re.compile(r"<(?:(?P<converter>[a-zA-Z_][a-zA-Z0-9_]*)(?:\([^)]*\))?:)?(?P<name>\w+)>")
_SKIPPED_METHODS = frozenset({"HEAD", "OPTIONS"})


def _path(rule: str) -> tuple[str, list[tuple[str, str]]]:
    """A Werkzeug rule → the OpenAPI path and its ``(name, converter)`` arguments."""
    arguments: list[tuple[str, str]] = []

    def replace(match: re.Match[str]) -> str:
        arguments.append((match["name"], match["converter"] or "default"))
        return "{" + match["name"] + "}"

    return _ARGUMENT.sub(replace, rule), arguments


def opaque(tp: Any) -> bool:
    """Whether a type says nothing about the JSON's shape (``Any``, ``dict[str, Any]``…)."""
    if tp is Any or tp is object or tp is dict or tp is list:
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (dict, Mapping):
        return not args or args[1] in (Any, object)
    return False


def _is_raw_schema(value: Any) -> bool:
    """A literal JSON Schema (a mapping) given in place of a type."""
    return isinstance(value, Mapping) and not any("/" in str(k) for k in value)


def _is_media_map(value: Any) -> bool:
    """``{"text/plain": str}``: answers that are not (only) JSON."""
    return isinstance(value, Mapping) and bool(value) and all("/" in str(k) for k in value)


def _schema_ok(tp: Any) -> bool:
    """Whether msgspec can describe ``tp`` and the description says something."""
    if tp is None or opaque(tp):
        return False
    import msgspec  # here and below: only the first /openapi.json needs it

    try:
        msgspec.json.schema(tp)
    except (TypeError, ValueError, NameError):
        return False
    return True


def _return_type(view: Callable[..., Any]) -> Any:
    """The view's resolved return annotation, or ``Any`` when missing or unresolvable.

    A ``(body, status)`` tuple says nothing of which status: such a view lists its
    answers in ``describe(responses=...)``.
    """
    try:
        hints = typing.get_type_hints(view)
    except (NameError, TypeError, AttributeError):  # a name only the view's scope knew
        return Any
    returned = hints.get("return", Any)
    return Any if typing.get_origin(returned) is tuple else returned


@attrs.frozen
class Operation:
    """One method of one rule: what the document says about it."""

    path: str
    method: str
    rule: str
    endpoint: str
    websocket: bool
    public: bool
    arguments: tuple[tuple[str, str], ...]
    doc: RouteDoc | None
    view: Callable[..., Any]


def operations(app: Quart) -> Iterator[Operation]:
    """Every documented method of every rule of ``app`` (HEAD and OPTIONS are implied)."""
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: (r.rule, r.endpoint)):
        view = app.view_functions.get(rule.endpoint)
        if view is None:
            continue
        path, arguments = _path(rule.rule)
        websocket = bool(getattr(rule, "websocket", False))
        doc = getattr(view, DOC_ATTR, None)
        for method in sorted(set(rule.methods or ()) - _SKIPPED_METHODS):
            yield Operation(
                path=path,
                method=method.lower(),
                rule=rule.rule,
                endpoint=rule.endpoint,
                websocket=websocket,
                public=bool(getattr(view, PUBLIC_ATTR, False)),
                arguments=tuple(arguments),
                doc=doc if isinstance(doc, RouteDoc) else None,
                view=view,
            )


class _Schemas:
    """Collects every type first, then has msgspec describe them all at once (one set of
    components, names made unique by msgspec when two modules use the same class name)."""

    def __init__(self) -> None:
        self._types: list[Any] = []
        self._refs: dict[int, dict[str, Any]] = {}
        self.components: dict[str, Any] = {}

    def want(self, tp: Any) -> Callable[[], dict[str, Any]]:
        """Register ``tp``; the returned call gives its schema once ``resolve`` ran."""
        if _is_raw_schema(tp):
            raw = dict(tp)
            return lambda: raw
        self._types.append(tp)
        return lambda: self._refs[id(tp)]

    def resolve(self) -> None:
        unique = list({id(tp): tp for tp in self._types}.values())
        import msgspec

        schemas, self.components = msgspec.json.schema_components(unique, ref_template=REF)
        self._refs = {id(tp): schema for tp, schema in zip(unique, schemas, strict=True)}

    def properties(self, schema: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """An object schema's properties and required names (following a ``$ref``)."""
        ref = schema.get("$ref")
        if isinstance(ref, str):
            schema = self.components.get(ref.rsplit("/", 1)[-1], {})
        return dict(schema.get("properties", {})), list(schema.get("required", []))


def _error_refs(op: Operation, body: bool, query: bool) -> set[int]:
    statuses = set(op.doc.errors if op.doc else ())
    if not op.public:
        statuses |= {401, 403, 429}
    if body:
        statuses |= {400, 413, 415}
    if getattr(op.view, STREAMS_ATTR, False):
        statuses.add(408)  # a body that stalls
    if query:
        statuses.add(400)
    if op.arguments:
        statuses.add(404)
    statuses.add(500)
    return statuses


def _operation(op: Operation, schemas: _Schemas) -> Callable[[], dict[str, Any]]:
    """Plan one operation object; the call builds it once ``schemas`` is resolved."""
    doc = op.doc
    tag = op.endpoint.split(".", 1)[0] if "." in op.endpoint else "default"
    operation_id = re.sub(r"\W", "_", f"{op.endpoint}_{op.method}")
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": dict(_CONVERTERS.get(conv, {}))}
        for name, conv in op.arguments
    ]
    if doc is None:
        # Listed (the URL map has it) but nothing is known: the coverage test names it.
        undocumented = {
            "operationId": operation_id,
            "tags": [tag],
            "summary": f"{op.method.upper()} {op.path} (undocumented)",
            "x-undocumented": True,
            "parameters": parameters,
            "responses": {"default": {"description": "Not documented"}},
        }
        if op.public:
            undocumented["security"] = []
        return lambda: undocumented
    examples = doc.examples
    body = doc.body
    # A JSON body (a type or a literal schema), or a media type map for other content.
    bodies: dict[str, Callable[[], dict[str, Any]] | None] = {}
    if body is not None:
        for media_type, tp in (body if _is_media_map(body) else {JSON: body}).items():
            bodies[media_type] = _media_schema(schemas, media_type, tp)
    query_schema = schemas.want(doc.query) if _describable(doc.query) else None
    answers: dict[int, Any] = dict(doc.responses)
    problems: list[str] = []
    if not any(200 <= s < 300 or s == 101 for s in answers):
        if op.websocket:
            answers[101] = None
        elif (returned := _return_type(op.view)) not in (typing.NoReturn, typing.Never):
            answers[200] = returned  # a view that never returns has only its errors
    planned: dict[int, Any] = {}
    for status, answer in sorted(answers.items()):
        if answer is None:
            planned[status] = None
        elif _is_media_map(answer):
            planned[status] = {
                media: _media_schema(schemas, media, tp) for media, tp in answer.items()
            }
            if None in planned[status].values():
                problems.append(f"{status} answer has no schema ({answer!r})")
        elif _describable(answer):
            planned[status] = {JSON: schemas.want(answer)}
        else:
            planned[status] = {JSON: None}
            problems.append(f"{status} answer has no schema ({answer!r})")
    if any(schema is None for schema in bodies.values()):
        problems.append(f"request body has no schema ({body!r})")
    if doc.query is not None and query_schema is None:
        problems.append(f"query has no schema ({doc.query!r})")

    def build() -> dict[str, Any]:
        result: dict[str, Any] = {
            "operationId": operation_id,
            "tags": list(doc.tags) or [tag],
            "summary": doc.summary,
        }
        description = doc.description or inspect.getdoc(op.view)
        if description:
            result["description"] = description
        params = list(parameters)
        if query_schema is not None:
            properties, required = schemas.properties(query_schema())
            params += [
                {"name": name, "in": "query", "required": name in required, "schema": schema}
                for name, schema in properties.items()
            ]
        if op.websocket:
            params.append(
                {
                    "name": "token",
                    "in": "query",
                    "required": False,
                    "description": "The master or a temporary token (required unless auth "
                    "is disabled); the upgrade is refused with 401 without it.",
                    "schema": {"type": "string"},
                }
            )
            result["x-websocket"] = True
        if params:
            result["parameters"] = params
        if bodies:
            sent: dict[str, Any] = {}
            for media_type, body_schema in bodies.items():
                media: dict[str, Any] = {} if body_schema is None else {"schema": body_schema()}
                if "body" in examples:
                    media["example"] = examples["body"]
                sent[media_type] = media
            # read_json takes an empty body as ``{}``: required only when a field is
            json_schema = sent.get(JSON, {}).get("schema")
            needed = json_schema is None or bool(schemas.properties(json_schema)[1])
            result["requestBody"] = {"required": needed, "content": sent}
        responses: dict[str, Any] = {}
        for status, content in planned.items():
            answer: dict[str, Any] = {"description": _reason(status)}
            if content is not None:
                answer["content"] = {}
                for media_type, schema in content.items():
                    entry: dict[str, Any] = {}
                    if schema is not None:
                        entry["schema"] = schema()
                    if status in examples:
                        entry["example"] = examples[status]
                    answer["content"][media_type] = entry
            responses[str(status)] = answer
        for status in sorted(_error_refs(op, bool(bodies), doc.query is not None)):
            if str(status) in responses:
                continue
            if status in ERRORS:
                responses[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
            else:  # a status without a shared answer (416…): the error shape all the same
                responses[str(status)] = {
                    "description": _phrase(status),
                    "content": {JSON: {"schema": {"$ref": REF.format(name="Error")}}},
                }
        result["responses"] = responses
        if op.websocket:
            result["security"] = [{"wsToken": []}]
        elif op.public:
            result["security"] = []
        elif getattr(op.view, QUERY_TOKEN_ATTR, False) and op.method == "get":
            result["security"] = [{"bearer": [], "vendor": []}, {"linkToken": []}]
        if problems:
            result["x-undocumented"] = True
            result["x-problems"] = problems
        return result

    return build


def _media_schema(
    schemas: _Schemas, media_type: str, tp: Any
) -> Callable[[], dict[str, Any]] | None:
    """The schema of one media type of a body or answer; raw ``bytes`` outside JSON are a
    string of that media type (not msgspec's base64)."""
    if tp is bytes and media_type != JSON:
        return schemas.want({"type": "string", "contentMediaType": media_type})
    return schemas.want(tp) if _describable(tp) else None


def _describable(value: Any) -> bool:
    """A literal schema, or a type msgspec can describe usefully."""
    return _is_raw_schema(value) or _schema_ok(value)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"Status {status}"


def _reason(status: int) -> str:
    return "Switching to the WebSocket protocol" if status == 101 else _phrase(status)


def build_document(app: Quart, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app``."""
    schemas = _Schemas()
    planned: list[tuple[Operation, Callable[[], dict[str, Any]]]] = [
        (op, _operation(op, schemas)) for op in operations(app)
    ]
    schemas.resolve()
    paths: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    for op, build in planned:
        operation = build()
        # one view may serve several rules (an alias): its ids must still differ
        base = operation_id = operation["operationId"]
        for n in itertools.count(2):
            if operation_id not in seen:
                break
            operation_id = f"{base}_{n}"
        seen.add(operation_id)
        paths.setdefault(op.path, {})[op.method] = {**operation, "operationId": operation_id}
    components_schemas = {"Error": ERROR_SCHEMA, **schemas.components}
    responses = {
        name: {
            "description": description,
            "content": {
                "application/json": {
                    "schema": {"$ref": REF.format(name="Error")},
                    "example": example,
                }
            },
        }
        for _status, (name, description, example) in sorted(ERRORS.items())
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lightd",
            "version": version,
            "description": (
                "The Lightd v2 node agent's API. Every route but the public ones needs "
                f"`Accept: {VENDOR_MEDIA_TYPE}` and `Authorization: Bearer lightd_<token>`; "
                "WebSocket routes (`x-websocket: true`) take the token as `?token=`."
            ),
        },
        "security": [{"bearer": [], "vendor": []}],
        "paths": paths,
        "components": {
            "schemas": components_schemas,
            "responses": responses,
            "securitySchemes": SECURITY_SCHEMES,
        },
    }


# --- /docs -----------------------------------------------------------------------------

#: What ``/docs/assets/<name>`` serves: a fixed list (no path from the URL reaches the
#: file system), name → (file under ``static/``, content type).
DOCS_ASSETS: Mapping[str, tuple[str, str]] = {
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css; charset=utf-8"),
    "favicon-32x32.png": ("swagger-ui/favicon-32x32.png", "image/png"),
    "LICENSE": ("swagger-ui/LICENSE", "text/plain; charset=utf-8"),
    "NOTICE": ("swagger-ui/NOTICE", "text/plain; charset=utf-8"),
    "swagger-ui-bundle.js.LICENSE.txt": (
        "swagger-ui/swagger-ui-bundle.js.LICENSE.txt",
        "text/plain; charset=utf-8",
    ),
    "VERSION": ("swagger-ui/VERSION", "text/plain; charset=utf-8"),
    "docs.js": ("docs.js", "text/javascript; charset=utf-8"),
}
ASSET_TYPES = sorted({content_type.split(";")[0] for _, content_type in DOCS_ASSETS.values()})

#: The page: ours, no inline script, nothing from another origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>lightd {version} API</title>
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png?v={tag}">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css?v={tag}">
</head>
<body>
<div id="swagger-ui" data-spec="/openapi.json" data-vendor="{vendor}"></div>
<script src="/docs/assets/swagger-ui-bundle.js?v={tag}"></script>
<script src="/docs/assets/docs.js?v={tag}"></script>
</body>
</html>
"""


def _asset(name: str) -> bytes:
    path = DOCS_ASSETS[name][0]
    return resources.files(__package__ or "lightd.api").joinpath("static", path).read_bytes()


@hookimpl
def lightd_add_routes(agent: Agent) -> list[Blueprint]:
    bp = Blueprint("openapi", __name__)
    cache: dict[str, bytes] = {}

    def document() -> bytes:
        if "document" not in cache:
            built = build_document(current_app, agent.version)
            cache["document"] = json.dumps(built, separators=(",", ":")).encode()
        return cache["document"]

    def tag() -> str:
        if "tag" not in cache:
            digest = hashlib.sha256()
            for name in sorted(DOCS_ASSETS):
                digest.update(_asset(name))
            cache["tag"] = digest.hexdigest()[:16].encode()
        return cache["tag"].decode()

    @bp.get("/openapi.json")
    @describe(
        "This API as an OpenAPI 3.1 document",
        description="Generated from the routes themselves, plugins' included. No headers.",
        responses={200: {"application/json": {"type": "object", "required": ["openapi"]}}},
        tags=("docs",),
    )
    @public
    async def openapi_document() -> Response:
        return Response(document(), content_type="application/json")

    @bp.get("/docs")
    @describe(
        "The interactive API reference (Swagger UI)",
        description="Served from the agent's own files: nothing is loaded from another origin.",
        responses={200: {"text/html": str}},
        tags=("docs",),
    )
    @public
    async def docs_page() -> Response:
        page = _PAGE.format(version=agent.version, tag=tag(), vendor=VENDOR_MEDIA_TYPE)
        response = Response(page, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = DOCS_CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @bp.get("/docs/assets/<name>")
    @describe(
        "A file of the docs page",
        description="Swagger UI's files (a fixed list) and the page's script.",
        responses={200: {media: {} for media in ASSET_TYPES}},
        errors=(404,),
        tags=("docs",),
    )
    @public
    async def docs_asset(name: str) -> Response:
        if name not in DOCS_ASSETS:
            raise NotFound("Not found", code="not_found")
        key = f"asset:{name}"
        if key not in cache:
            cache[key] = _asset(name)
        data = cache[key]
        response = Response(data, content_type=DOCS_ASSETS[name][1])
        # The page links assets with ``?v=<digest of them all>``: an upgrade changes the URL.
        response.headers["Cache-Control"] = "public, max-age=31536000, immutable"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return [bp]
