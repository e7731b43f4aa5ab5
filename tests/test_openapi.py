"""``GET /openapi.json`` and ``GET /docs`` (contract §18): the document is valid OpenAPI 3.1,
names every route of the URL map (plugins' included) with its request and answer schemas,
and the docs page is served from the agent's own files."""

from __future__ import annotations

import inspect
import json
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import httpx
import jsonschema_rs
import pytest
from lightd import Agent, hookimpl
from lightd.api import describe
from lightd.api.openapi import DOCS_ASSETS
from quart import Blueprint, Quart
from schemathesis.specs.openapi.definitions import OPENAPI_31

from .conftest import MASTER, RunningAgent, StartAgent, api_client, wait_for
from .test_panel_mock_browser import open_chromium

#: What reads a request body in a view's code (lightd's readers, or Quart's own).
BODY_READERS = frozenset({"read_json", "body_chunks", "body_batches", "get_json", "get_data"})
#: The return annotation of a view that always raises: it has no success answer.
NEVER = (typing.NoReturn, typing.Never)


def reads_body(view: Any) -> bool:
    code = getattr(inspect.unwrap(view), "__code__", None)
    return code is not None and not BODY_READERS.isdisjoint(code.co_names)


def problems(app: Quart, document: dict[str, Any]) -> list[str]:
    """What the document misses of ``app``'s URL map: routes, answer and body schemas."""
    found: list[str] = []
    paths = document["paths"]
    for rule in app.url_map.iter_rules():
        view = app.view_functions.get(rule.endpoint)
        if view is None:
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted(set(rule.methods or ()) - {"HEAD", "OPTIONS"}):
            where = f"{method} {rule.rule}"
            operation = paths.get(path, {}).get(method.lower())
            if operation is None:
                found.append(f"{where}: missing")
                continue
            if operation.get("x-undocumented"):
                found.append(f"{where}: undocumented {operation.get('x-problems', '')}")
                continue
            success = sorted(s for s in operation["responses"] if s[0] == "2" or s == "101")
            never_returns = typing.get_type_hints(view).get("return") in NEVER
            if not success and not never_returns:
                found.append(f"{where}: no success answer")
            for status in success:
                for media, entry in operation["responses"][status].get("content", {}).items():
                    if "schema" not in entry:
                        found.append(f"{where}: {status} {media} has no schema")
            if reads_body(view):
                content = operation.get("requestBody", {}).get("content", {})
                if not content or any("schema" not in entry for entry in content.values()):
                    found.append(f"{where}: reads a body that has no schema")
    return found


async def fetch_document(node: RunningAgent) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as anon:
        response = await anon.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def schemas_in(node: Any) -> list[dict[str, Any]]:
    """Every Schema Object of a document (components, parameters, bodies, answers)."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "schema" and isinstance(value, dict):
                found.append(value)
            elif key == "schemas" and isinstance(value, dict):
                found.extend(v for v in value.values() if isinstance(v, dict))
            else:
                found.extend(schemas_in(value))
    elif isinstance(node, list):
        for item in node:
            found.extend(schemas_in(item))
    return found


def assert_valid_openapi(document: dict[str, Any]) -> None:
    """OpenAPI 3.1's own JSON Schema (as schemathesis ships it), then every Schema Object
    against JSON Schema 2020-12's metaschema, then every ``$ref`` resolves."""
    jsonschema_rs.validator_for(OPENAPI_31).validate(document)
    for schema in schemas_in(document):
        jsonschema_rs.meta.validate(
            schema | {"$schema": "https://json-schema.org/draft/2020-12/schema"}
        )
    text = json.dumps(document)
    for ref in set(re.findall(r'"\$ref": "#/([^"]+)"', text)):
        node: Any = document
        for part in ref.split("/"):
            assert isinstance(node, dict) and part in node, f"unresolved $ref #/{ref}"
            node = node[part]


async def test_document_is_public_valid_openapi_3_1(running: RunningAgent) -> None:
    document = await fetch_document(running)
    assert document["openapi"].startswith("3.1.")
    assert document["info"]["version"] == running.agent.version
    assert_valid_openapi(document)
    ping = document["paths"]["/api/v1/public/ping"]["get"]
    assert ping["security"] == []
    assert document["paths"]["/containers"]["get"].get("security") is None  # the default
    assert document["security"] == [{"bearer": [], "vendor": []}]
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["vendor"]["in"] == "header"
    assert schemes["vendor"]["name"] == "Accept"


async def test_every_route_is_documented_with_its_schemas(
    start_agent: StartAgent, config_path: Path, hello_plugin: str
) -> None:
    node = await start_agent(config_path, load_entrypoints=True)
    document = await fetch_document(node)
    assert node.agent.app is not None
    assert "/hello" in document["paths"]  # the third-party plugin's routes are in it
    found = problems(node.agent.app, document)
    assert found == [], "\n".join(found)


async def test_document_details(running: RunningAgent) -> None:
    document = await fetch_document(running)
    paths = document["paths"]
    schemas = document["components"]["schemas"]
    # a path argument: {name}, a parameter, and a 404
    get = paths["/containers/{internal_id}"]["get"]
    assert get["parameters"][0] == {
        "name": "internal_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
    }
    assert get["responses"]["404"] == {"$ref": "#/components/responses/NotFound"}
    assert get["responses"]["401"] == {"$ref": "#/components/responses/Unauthorized"}
    # a body: its schema, and the body errors
    create = paths["/containers"]["post"]
    body = create["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/CreateRequest"}
    assert "internal_id" in schemas["CreateRequest"]["required"]
    assert {"400", "413", "415", "503"} <= set(create["responses"])
    assert "example" in body
    # a TypedDict answer
    token = paths["/auth/tokens"]["post"]["responses"]["200"]["content"]["application/json"]
    name = token["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(schemas[name]["required"]) >= {"token", "expires_at"}
    # the error shape
    assert schemas["Error"]["required"] == ["error"]
    assert set(schemas["Error"]["properties"]) == {"error", "code", "details"}
    # the WebSocket
    ws = paths["/ws/{internal_id}"]["get"]
    assert ws["x-websocket"] is True
    assert "101" in ws["responses"]
    assert {"name": "token", "in": "query"}.items() <= ws["parameters"][-1].items()


PLUGIN_PATHS = {"/undocumented", "/vague", "/unread"}


class _Undocumented:
    """A plugin whose route has no ``describe``, and one whose answer is no schema."""

    @hookimpl
    def lightd_add_routes(self, agent: Agent) -> list[Blueprint]:
        bp = Blueprint("undocumented", __name__)

        @bp.get("/undocumented")
        async def bare() -> dict[str, str]:
            return {"what": "no describe"}

        @bp.get("/vague")
        @describe("Answers something")
        async def vague() -> dict[str, Any]:
            return {"what": "a dict of anything"}

        @bp.post("/unread")
        @describe("Reads a body it does not describe", responses={200: dict[str, int]})
        async def unread() -> dict[str, int]:
            from lightd.api import read_json

            return {"size": len(await read_json())}

        @bp.put("/typed/<int:n>")
        @describe(
            "Documented in full",
            body=Greeting,
            query=Page,
            responses={201: Greeting},
            errors=(416,),
            examples={"body": {"text": "hi"}, 201: {"text": "hi", "times": 2}},
        )
        async def typed(n: int) -> tuple[Greeting, int]:
            from lightd.api import read_json

            body: Greeting = await read_json()
            return body, 201

        return [bp]


class Greeting(TypedDict):
    text: str
    times: NotRequired[int]


class Page(TypedDict):
    limit: int
    after: NotRequired[str]


async def test_coverage_check_fails_for_an_undocumented_route(
    start_agent: StartAgent, config_path: Path
) -> None:
    node = await start_agent(config_path, extra_plugins=(("undocumented", _Undocumented()),))
    document = await fetch_document(node)
    assert_valid_openapi(document)  # still a valid document
    assert node.agent.app is not None
    found = problems(node.agent.app, document)
    assert any(p.startswith("GET /undocumented: undocumented") for p in found), found
    assert any(p.startswith("GET /vague: undocumented") for p in found), found
    assert any(p.startswith("POST /unread: reads a body") for p in found), found
    ours = [p for p in found if p.split(":")[0].split()[1] in PLUGIN_PATHS]
    assert len(ours) == 3, found
    # the route is listed all the same
    assert document["paths"]["/undocumented"]["get"]["x-undocumented"] is True
    # a converter, a query, a body with a required field, another status, examples
    typed = document["paths"]["/typed/{n}"]["put"]
    assert sorted(typed["parameters"], key=lambda p: p["name"]) == [
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "required": True, "schema": {"type": "integer"}},
        {"name": "n", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 0}},
    ]
    assert typed["requestBody"]["required"] is True
    assert typed["requestBody"]["content"]["application/json"]["example"] == {"text": "hi"}
    created = typed["responses"]["201"]["content"]["application/json"]
    assert created["schema"] == {"$ref": "#/components/schemas/Greeting"}
    assert created["example"] == {"text": "hi", "times": 2}
    assert "200" not in typed["responses"]
    assert typed["responses"]["416"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert {"400", "401", "403", "404", "413", "415", "500"} <= set(typed["responses"])


async def test_document_is_built_once(running: RunningAgent) -> None:
    async with httpx.AsyncClient(base_url=running.url, timeout=10) as anon:
        first = await anon.get("/openapi.json")
        second = await anon.get("/openapi.json")
    assert first.content == second.content


async def test_docs_page_loads_its_assets_from_the_agent(anon: httpx.AsyncClient) -> None:
    page = await anon.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "http" not in csp  # no other origin
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources
    assert "<script>" not in page.text  # no inline script
    for source in sources:
        assert source.startswith("/docs/assets/"), source
        asset = await anon.get(source)
        assert asset.status_code == 200, source
        assert asset.content
        assert "max-age" in asset.headers["cache-control"]
    assert {s.split("?")[0].rsplit("/", 1)[-1] for s in sources} >= {
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "docs.js",
    }
    js = await anon.get("/docs/assets/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    css = await anon.get("/docs/assets/swagger-ui.css")
    assert css.headers["content-type"].startswith("text/css")
    licence = await anon.get("/docs/assets/LICENSE")
    assert "Apache License" in licence.text


@pytest.mark.parametrize(
    "name", ["../openapi.py", "..%2Fopenapi.py", "%2e%2e%2fviews.py", "views.py", "swagger-ui"]
)
async def test_docs_assets_are_a_fixed_list(anon: httpx.AsyncClient, name: str) -> None:
    assert name not in DOCS_ASSETS
    response = await anon.get(f"/docs/assets/{name}")
    assert response.status_code == 404
    assert response.json()["error"]


async def test_docs_need_no_headers_but_other_routes_still_do(running: RunningAgent) -> None:
    async with api_client(running.url, token=None) as c:
        assert (await c.get("/openapi.json")).status_code == 200
        assert (await c.get("/system/info")).status_code == 401


async def test_openapi_can_be_switched_off(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    node = await start_agent(make_config({"plugins": {"disabled": ["openapi"]}}))
    async with httpx.AsyncClient(base_url=node.url, timeout=10) as anon:
        assert (await anon.get("/openapi.json")).status_code == 404
        assert (await anon.get("/docs")).status_code == 404


async def test_docs_page_renders_every_operation_in_a_browser(
    running: RunningAgent, tmp_path: Path
) -> None:
    document = await fetch_document(running)
    operations = sum(len(methods) for methods in document["paths"].values())
    async with open_chromium(tmp_path / "profile", tmp_path / "chromium.log") as devtools:
        target = await devtools.call("Target.createTarget", url=f"{running.url}/docs")
        attached = await devtools.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session = attached["sessionId"]

        async def page(expression: str, *, awaited: bool = False) -> Any:
            result = await devtools.call(
                "Runtime.evaluate",
                session,
                expression=expression,
                returnByValue=True,
                awaitPromise=awaited,
            )
            return result["result"].get("value")

        async def rendered() -> bool:
            return bool(
                await page(f"document.querySelectorAll('.opblock').length === {operations}")
            )

        await wait_for(rendered, within=30, what="Swagger UI to render every operation")
        title = await page("document.querySelector('.info .title').textContent")
        assert title.startswith("lightd")
        summaries = await page(
            "[...document.querySelectorAll('.opblock-summary-path')].map(e => e.textContent)"
        )
        assert "/containers/{internal_id}" in "".join(summaries)
        # nothing came from another origin
        origins = await page(
            "[...performance.getEntriesByType('resource')].map(e => new URL(e.name).origin)"
        )
        assert origins
        assert set(origins) == {running.url}
        # "Try it out" requests carry the vendor header: with the token, the agent answers
        answer = await page(
            "(async () => {"
            " const req = ui.getConfigs().requestInterceptor({url: '/system/info', headers: {}});"
            f" req.headers.Authorization = 'Bearer {MASTER}';"
            " const r = await fetch(req.url, {headers: req.headers});"
            " return r.status; })()",
            awaited=True,
        )
        assert answer == 200
