"""The bad-input corpus of ``test_volumes_corpus`` extended to the file manager's routes
(contract §13): the same planted links (to outside, to ``/etc``, to a sibling volume,
chains, loops, ``..`` links), the same checks after every case (the sentinel outside, the
sibling and ``/etc`` unchanged, no secret byte in the volume or in the answer, a refused
request changed nothing), with ``openat2`` and with the component walk."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
from lightd.files import TEMP_PREFIX

from ..conftest import api_client
from .test_volumes_corpus import (
    ABSOLUTE,
    CANARY,
    ESCAPES,
    LOOP,
    TRAVERSAL,
    World,
    _names,
    canary_exists,
    leaked,
    matches,
    resolver,
    snapshot,
    world,
)
from .volumes_corpus import SECRET

__all__ = ["resolver", "world"]  # the fixtures, shared with the volumes corpus

NOT_A_FILE = "Not a file: "


@attrs.frozen
class Case:
    id: str
    method: str
    route: str  # after /volumes/<id>
    status: int
    error: str | None = None
    params: dict[str, str] | None = None
    body: dict[str, Any] | None = None
    content: bytes | None = None
    check: Callable[[World, Any], None] = lambda w, answer: None


def read(path: str, status: int = 400, error: str | None = ESCAPES, **kw: Any) -> Case:
    return Case(f"read-{path}", "get", "/files/content", status, error, {"path": path}, **kw)


def upload(path: str, status: int = 400, error: str | None = ESCAPES) -> Case:
    return Case(
        f"upload-{path}", "put", "/files/content", status, error, {"path": path}, content=b"pwned"
    )


def delete(path: str, status: int = 400, error: str | None = ESCAPES, **kw: Any) -> Case:
    return Case(
        f"delete-{path}", "post", "/files/delete", status, error, body={"paths": [path]}, **kw
    )


def rename(src: str, dst: str, status: int = 400, error: str | None = ESCAPES, **kw: Any) -> Case:
    body = {"from": src, "to": dst}
    return Case(f"rename-{src}-to-{dst}", "post", "/files/rename", status, error, body=body, **kw)


def chmod(path: str, status: int = 400, error: str | None = ESCAPES) -> Case:
    body = {"files": [{"path": path, "mode": "777"}]}
    return Case(f"chmod-{path}", "post", "/files/chmod", status, error, body=body)


def search(path: str, status: int = 400, error: str | None = ESCAPES, **kw: Any) -> Case:
    params = {"q": "e", "path": path, "content": "true"}
    return Case(f"search-{path}", "get", "/files/search", status, error, params, **kw)


def is_link(rel: str) -> Callable[[World, Any], None]:
    def check(w: World, answer: Any) -> None:
        assert (w.volume / rel).is_symlink(), rel

    return check


def gone(rel: str) -> Callable[[World, Any], None]:
    def check(w: World, answer: Any) -> None:
        assert not (w.volume / rel).is_symlink() and not (w.volume / rel).exists(), rel

    return check


def no_secret_found(w: World, answer: Any) -> None:
    paths = [r["path"] for r in answer["results"]]
    assert not any("secret" in p.lower() and not p.endswith("secret_link") for p in paths), paths
    through_links = ("out_abs/", "out_rel/", "etc/", "sib_abs/", "sib_rel/", "chain1/", "data/out/")
    assert not any(p.startswith(through_links) for p in paths), paths


def usage_is_the_volume_only(w: World, answer: Any) -> None:
    files = [p for p in w.volume.rglob("*") if p.is_file() and not p.is_symlink()]
    assert answer["usage"]["bytes"] == sum(p.stat().st_size for p in files)


CASES = [
    # --- read --------------------------------------------------------------------------------
    read("out_abs/secret.txt"),
    read("out_rel/secret.txt"),
    read("secret_link"),
    read("chain1/secret.txt"),
    read("etc/passwd"),
    read("sib_abs/sibling.txt"),
    read("sib_rel/sibling.txt"),
    read("data/out/secret.txt"),
    read("sub/upup/x"),
    read("dangling_abs"),
    read("loop_a", error=LOOP),
    read("/etc/passwd", error=ABSOLUTE),
    read("../outside/secret.txt", error=TRAVERSAL),
    read("sub/up/data/file.txt", 200, None),
    # --- upload ------------------------------------------------------------------------------
    upload("out_abs/pwn.txt"),
    upload("out_rel/pwn.txt"),
    upload("secret_link"),
    upload("dangling_abs"),
    upload("dangling_rel"),
    upload("chain1/pwn.txt"),
    upload(f"etc/{CANARY.name}"),
    upload("sib_rel/pwn.txt"),
    upload("sub/upup/pwn.txt"),
    upload("data/out/pwn.txt"),
    upload("loop_a/x", error=LOOP),
    upload("../pwn.txt", error=TRAVERSAL),
    # --- delete ------------------------------------------------------------------------------
    delete("out_abs/secret.txt"),
    delete("data/out/secret.txt"),
    delete("etc/passwd"),
    delete("sib_abs/sibling.txt"),
    delete("chain1/sub"),
    delete("secret_link", 200, None, check=gone("secret_link")),
    delete("out_abs", 200, None, check=gone("out_abs")),
    delete("sub/upup", 200, None, check=gone("sub/upup")),
    delete("data", 200, None, check=gone("data")),
    # --- rename ------------------------------------------------------------------------------
    rename("out_abs/secret.txt", "stolen"),
    rename("etc/passwd", "stolen"),
    rename("sib_abs/sibling.txt", "stolen"),
    rename("data/file.txt", "out_abs/pwn.txt"),
    rename("data/file.txt", "sib_rel/pwn.txt"),
    rename("data/file.txt", "chain1/pwn.txt"),
    rename("data/file.txt", "sub/upup/pwn.txt"),
    rename("secret_link", "moved", 200, None, check=is_link("moved")),
    rename("out_abs", "data/moved", 200, None, check=is_link("data/moved")),
    # --- chmod -------------------------------------------------------------------------------
    chmod("out_abs/secret.txt"),
    chmod("out_rel/sub"),
    chmod("etc/passwd"),
    chmod("sib_rel/sibling.txt"),
    chmod("chain1/secret.txt"),
    chmod("sub/upup/x"),
    chmod("secret_link", error=NOT_A_FILE + "secret_link"),
    chmod("out_abs", error=NOT_A_FILE + "out_abs"),
    chmod("data/out", error=NOT_A_FILE + "data/out"),
    chmod("sub/up", error=NOT_A_FILE + "sub/up"),
    # --- search ------------------------------------------------------------------------------
    search("out_abs"),
    search("out_rel"),
    search("etc"),
    search("sib_abs"),
    search("chain1"),
    search("sub/upup"),
    search("loop_a", error=LOOP),
    search("", 200, None, check=no_secret_found),
    search("data", 200, None, check=no_secret_found),
    Case(
        "search-content-for-the-secret",
        "get",
        "/files/search",
        200,
        params={"q": SECRET.decode(), "content": "true"},
        check=lambda w, answer: answer["results"] == [] or pytest.fail(str(answer)),
    ),
    Case("usage", "get", "", 200, check=usage_is_the_volume_only),
]

assert len(CASES) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_file_manager_bad_input(world: World, case: Case) -> None:
    assert not canary_exists()
    outside, sibling, volume = (
        snapshot(world.outside),
        snapshot(world.sibling),
        snapshot(world.volume),
    )
    async with api_client(world.url) as c:
        response = await c.request(
            case.method,
            f"/volumes/{world.volume_id}{case.route}",
            params=case.params,
            json=case.body,
            content=case.content,
        )
    assert response.status_code == case.status, response.text
    if case.error is not None:
        assert matches(response.json()["error"], case.error), response.json()
    assert snapshot(world.outside) == outside, "the sentinel outside the volume changed"
    assert snapshot(world.sibling) == sibling, "the sibling volume changed"
    assert not canary_exists()
    assert leaked(world.volume) == [], "the secret leaked into the volume"
    assert SECRET not in response.content
    assert str(world.outside) not in response.text or case.status == 200
    if case.status >= 400:
        assert snapshot(world.volume) == volume, "a refused request changed the volume"
    else:
        is_json = response.headers["content-type"] == "application/json"
        case.check(world, response.json() if is_json else response.content)
    assert not [n for n in _names(world.volume) if n.startswith(TEMP_PREFIX)]
