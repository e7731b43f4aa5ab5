"""Contract §13 "Browser links": ``GET …/files/content`` and ``GET …/files/archive`` take a
temporary token as ``?token=`` without the vendor header or ``Authorization`` (a browser
following a link sends neither), against a real agent: single-use links, permissions and
scope as for any temporary token, the master token refused in a URL, every other route
deaf to ``?token=``, and no token ever written to a log or echoed in an answer."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..conftest import MASTER, VENDOR, Clock, RunningAgent, StartAgent, api_client, wait_for
from ..test_panel_mock_browser import open_chromium
from .conftest import error, new_volume

Volume = tuple[str, Path]
INVALID = "Missing or invalid authorization token"


async def mint(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/auth/tokens", json={"ttl": "15m", **body})
    assert response.status_code == 200, response.text
    token: str = response.json()["token"]
    return token


def content_url(volume_id: str) -> str:
    return f"/volumes/{volume_id}/files/content"


def archive_url(volume_id: str) -> str:
    return f"/volumes/{volume_id}/files/archive"


@pytest.fixture
async def seeded(client: httpx.AsyncClient) -> Volume:
    volume_id, folder = await new_volume(client)
    (folder / "world").mkdir()
    (folder / "world" / "level.dat").write_bytes(b"level data")
    return volume_id, folder


def zip_names(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        return zf.namelist()


async def test_a_link_downloads_without_headers(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume
) -> None:
    volume_id, _ = seeded
    token = await mint(client)
    response = await anon.get(
        content_url(volume_id), params={"path": "world/level.dat", "token": token}
    )
    assert response.status_code == 200, response.text
    assert response.content == b"level data"
    response = await anon.get(archive_url(volume_id), params={"path": "world", "token": token})
    assert response.status_code == 200, response.text
    assert zip_names(response.content) == ["world/", "world/level.dat"]
    # a range request from a browser's download manager, too
    response = await anon.get(
        content_url(volume_id),
        params={"path": "world/level.dat", "token": token},
        headers={"Range": "bytes=0-4"},
    )
    assert response.status_code == 206 and response.content == b"level"


async def test_the_header_form_keeps_working(client: httpx.AsyncClient, seeded: Volume) -> None:
    """With ``Authorization``, the query's token is not looked at (a junk one is fine)."""
    volume_id, _ = seeded
    for params in ({"path": "world/level.dat"}, {"path": "world/level.dat", "token": "junk"}):
        response = await client.get(content_url(volume_id), params=params)
        assert response.status_code == 200, response.text
    temporary = await mint(client)
    async with api_client(str(client.base_url), temporary) as c:
        response = await c.get(archive_url(volume_id), params={"path": "world", "token": MASTER})
        assert response.status_code == 200


async def test_a_single_use_link_works_once(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume
) -> None:
    volume_id, _ = seeded
    for url, path in ((content_url, "world/level.dat"), (archive_url, "world")):
        token = await mint(client, remove_on_use=True)
        params = {"path": path, "token": token}
        first = await anon.get(url(volume_id), params=params)
        assert first.status_code == 200, first.text
        again = await anon.get(url(volume_id), params=params)
        assert again.status_code == 401
        assert error(again) == INVALID
        assert token not in again.text
    # a single-use token refused for its permission is not spent by the refusal
    token = await mint(client, remove_on_use=True, permissions=["read"])
    refused = await anon.get(archive_url(volume_id), params={"path": "world", "token": token})
    assert refused.status_code == 403
    # a HEAD (link preview) does not spend it either: HEAD is not a link
    token = await mint(client, remove_on_use=True)
    head = await anon.head(
        content_url(volume_id), params={"path": "world/level.dat", "token": token}
    )
    assert head.status_code == 403
    response = await anon.get(
        content_url(volume_id), params={"path": "world/level.dat", "token": token}
    )
    assert response.status_code == 200


async def test_permission_and_scope(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume
) -> None:
    volume_id, _ = seeded
    other_id, _ = await new_volume(client)
    cases: list[tuple[dict[str, Any], int, str | None]] = [
        ({"permissions": ["read"]}, 403, "Token lacks permission: files"),
        ({"permissions": ["read", "console", "power", "manage"]}, 403, None),
        ({"permissions": ["files"]}, 200, None),
        ({"volumes": [other_id]}, 401, INVALID),
        ({"volumes": [other_id], "permissions": ["files"]}, 401, INVALID),
        ({"containers": ["0123456789ab"]}, 401, INVALID),
        ({"volumes": [volume_id], "permissions": ["files"]}, 200, None),
        ({"volumes": [volume_id.upper()]}, 200, None),
    ]
    for body, status, message in cases:
        token = await mint(client, **body)
        for url, path in ((content_url, "world/level.dat"), (archive_url, "world")):
            response = await anon.get(url(volume_id), params={"path": path, "token": token})
            assert response.status_code == status, (body, url, response.text)
            if message is not None:
                assert error(response) == message
            if status == 403:
                assert error(response) == "Token lacks permission: files"


async def test_bad_link_tokens(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume, clock: Clock
) -> None:
    volume_id, _ = seeded
    params = {"path": "world/level.dat"}
    expiring = await mint(client, ttl="60s")
    revoked = await client.post("/auth/tokens", json={"ttl": "15m"})
    revoked_id, revoked_token = revoked.json()["id"], revoked.json()["token"]
    assert (await client.delete(f"/auth/tokens/{revoked_id}")).status_code == 200
    for token in ("", "junk", "lightd_" + "0" * 32, MASTER[:-1] + "x", revoked_token):
        response = await anon.get(content_url(volume_id), params={**params, "token": token})
        assert response.status_code == 401, token
        assert error(response) == INVALID
    clock.advance(120)
    response = await anon.get(content_url(volume_id), params={**params, "token": expiring})
    assert response.status_code == 401
    # no token at all: the usual vendor refusal
    response = await anon.get(content_url(volume_id), params=params)
    assert response.status_code == 403
    assert error(response) == "Invalid vendor header"


async def test_the_master_token_is_refused_in_a_link(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume
) -> None:
    """A URL lands in browser history, proxy logs and ``Referer``: the master token, which
    cannot expire or be revoked, is never accepted there (mint a temporary one)."""
    volume_id, _ = seeded
    for url, path in ((content_url, "world/level.dat"), (archive_url, "world")):
        response = await anon.get(url(volume_id), params={"path": path, "token": MASTER})
        assert response.status_code == 401
        assert error(response) == INVALID
        assert MASTER not in response.text
        # not even with the vendor header: only Authorization carries the master token
        response = await anon.get(
            url(volume_id), params={"path": path, "token": MASTER}, headers={"Accept": VENDOR}
        )
        assert response.status_code == 401


async def test_other_routes_ignore_the_query_token(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume
) -> None:
    volume_id, folder = seeded
    token = await mint(client)
    base = f"/volumes/{volume_id}"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("PUT", "/files/content", {"params": {"path": "x.txt"}, "content": b"pwned"}),
        ("POST", "/files/delete", {"json": {"paths": ["world"]}}),
        ("POST", "/files/rename", {"json": {"from": "world", "to": "w2"}}),
        ("POST", "/files/chmod", {"json": {"files": [{"path": "world", "mode": "777"}]}}),
        ("POST", "/files", {"json": {"path": "y.txt", "content": "pwned"}}),
        ("GET", "/files/search", {"params": {"q": "level"}}),
        ("GET", "", {}),
        ("GET", "/files", {"params": {"path": "world"}}),
        ("DELETE", "", {}),
    ]
    for method, route, options in calls:
        params = {**options.pop("params", {}), "token": token}
        response = await anon.request(method, base + route, params=params, **options)
        assert response.status_code == 403, (method, route, response.text)
        assert error(response) == "Invalid vendor header"
    # token routes and the rest of the API too
    for method, path in (("GET", "/auth/tokens"), ("POST", "/auth/tokens"), ("GET", "/jobs")):
        response = await anon.request(method, path, params={"token": token})
        assert response.status_code == 403, (method, path)
    assert sorted(p.name for p in folder.iterdir()) == ["world"]
    assert (folder / "world" / "level.dat").read_bytes() == b"level data"


async def test_no_token_is_written_to_a_log(
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Links put a token in the URL: the access log (on here), the agent's other log lines
    and the answers must never show it, whatever the outcome."""
    caplog.set_level(logging.DEBUG)
    node: RunningAgent = await start_agent(make_config({"log": {"access": True}}))
    secrets: list[str] = [MASTER]
    async with api_client(node.url) as client, httpx.AsyncClient(base_url=node.url) as anon:
        volume_id, folder = await new_volume(client)
        (folder / "d").mkdir()
        (folder / "d" / "f").write_bytes(b"f")
        good = await mint(client)
        once = await mint(client, remove_on_use=True)
        weak = await mint(client, permissions=["read"])
        secrets += [good, once, weak]
        answers = []
        for token in (good, once, once, weak, MASTER, good + "x"):
            for url, path in ((content_url, "d/f"), (archive_url, "d"), (archive_url, "nope")):
                answers.append(
                    await anon.get(url(volume_id), params={"path": path, "token": token})
                )
            answers.append(
                await anon.get(archive_url(volume_id), params={"format": "rar", "token": token})
            )
            answers.append(await anon.put(content_url(volume_id), params={"token": token}))
    statuses = {a.status_code for a in answers}
    assert {200, 400, 401, 403, 404} <= statuses
    access = [r for r in caplog.records if r.name == "lightd.access"]
    assert len(access) >= len(answers)
    for record in caplog.records:
        if record.name.startswith(("httpx", "httpcore")):
            continue  # the test's own client logging its request URLs
        text = record.getMessage() + repr(record.__dict__)
        for secret in secrets:
            assert secret not in text, (record.name, text)
    for answer in answers:
        for secret in secrets:
            assert secret not in answer.text
            assert secret not in repr(answer.headers)


async def test_a_browser_click_downloads_once(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, seeded: Volume, tmp_path: Path
) -> None:
    """Headless chromium clicks a plain ``<a href>`` holding a single-use token: the
    archive lands in its download folder under the name the agent gave it, whole; the
    link is spent afterwards."""
    volume_id, _ = seeded
    token = await mint(client, remove_on_use=True, permissions=["files"], ttl="5m")
    link = str(anon.base_url.join(archive_url(volume_id))) + f"?path=world&token={token}"
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    async with open_chromium(tmp_path / "profile", tmp_path / "chromium.log") as devtools:
        await devtools.call(
            "Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads)
        )
        target = await devtools.call("Target.createTarget", url="about:blank")
        attached = await devtools.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        click = (
            "const a = document.createElement('a');"
            f"a.href = {json.dumps(link)}; a.textContent = 'download';"
            "document.body.appendChild(a); a.click(); 'clicked'"
        )
        result = await devtools.call(
            "Runtime.evaluate", attached["sessionId"], expression=click, returnByValue=True
        )
        assert result["result"]["value"] == "clicked"

        async def downloaded() -> bool:
            names = [p.name for p in downloads.iterdir()]
            return names == ["world.zip"]

        await wait_for(downloaded, within=30, what="chromium to save world.zip")
    assert zip_names((downloads / "world.zip").read_bytes()) == ["world/", "world/level.dat"]
    again = await anon.get(archive_url(volume_id), params={"path": "world", "token": token})
    assert again.status_code == 401
