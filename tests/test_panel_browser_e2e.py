"""The mock panel driving a real node, in a real browser (headless chromium over the
DevTools protocol), on the real Docker engine: create a server → watch its install →
start it → see a console line → send a command and see its output → see the stats charts
move → upload a file and see it in the list → download it by a one-click link → back it up
→ kill → delete, and the server is gone from the node and from every page.

All along, every request the browser makes, every answer it gets and every WebSocket frame
is recorded: the node's master token never reaches the browser; the console's WebSocket is
opened with a single-use temporary token scoped to that one server.

Screenshots of the main pages are taken on the way (into the test's folder; with
``LIGHTD_PANEL_SCREENSHOTS=docs/img`` into the docs: ``scripts/panel-screenshots.sh``).
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import docker
import httpx
import trio

from examples.panel_mock import PanelState, serve_panel
from examples.panel_mock.drive import Fleet

from .conftest import MASTER, ROOT, RunningAgent, api_client, wait_for
from .containers.conftest import (  # noqa: F401 - fixtures used by this module's test
    StartNode,
    containers_config,
    engine,
    prefix,
    start_node,
)
from .plugins.remote_sync_support import PANEL_TOKEN, remote_config
from .test_panel_mock_browser import DevTools, open_chromium

NODE = "edge-1"
SCREENSHOTS_ENV = "LIGHTD_PANEL_SCREENSHOTS"


class Browser:
    """One page of chromium, with every DevTools event kept (network traffic above all)."""

    def __init__(self, devtools: DevTools, session: str, shots: Path) -> None:
        self.devtools = devtools
        self.session = session
        self.shots = shots
        self.events: list[dict[str, Any]] = []
        #: Bodies of the answers the page got, read before each navigation drops them.
        self.bodies: list[str] = []
        self._harvested = 0

    async def call(self, method: str, **params: Any) -> Any:
        ws = self.devtools.ws
        call_id = next(self.devtools.ids)
        message = {"id": call_id, "method": method, "params": params, "sessionId": self.session}
        await ws.send_message(json.dumps(message))
        while True:
            reply = json.loads(await ws.get_message())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise AssertionError(f"{method} failed: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, *, within: float = 30, what: str = "") -> None:
        async def holds() -> bool:
            return bool(await self.js(expression))

        try:
            await wait_for(holds, within=within, what=what or expression)
        except BaseException:
            await self.shot("failure")
            print("console:", await self.js("(document.getElementById('console')||{}).textContent"))
            print("notice:", await self.js("(document.getElementById('notice')||{}).textContent"))
            raise

    async def harvest(self) -> None:
        """Keep the bodies of the answers received so far (a navigation drops them)."""
        while self._harvested < len(self.events):
            event = self.events[self._harvested]
            self._harvested += 1
            if event["method"] == "Network.responseReceived":
                request_id = event["params"]["requestId"]
                try:
                    body = await self.call("Network.getResponseBody", requestId=request_id)
                except AssertionError:  # a download, a redirect, one still loading
                    continue
                self.bodies.append(body["body"])

    async def goto(self, url: str) -> None:
        await self.harvest()
        await self.call("Page.navigate", url=url)
        await self.until("document.readyState === 'complete'", what=f"{url} to load")

    async def click(self, selector: str) -> None:
        found = await self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " if (!e || e.disabled) return false; e.click(); return true; })()"
        )
        assert found, f"nothing enabled to click at {selector}"

    async def fill(self, selector: str, value: str) -> None:
        await self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" e.value = {json.dumps(value)}; e.dispatchEvent(new Event('input')); }})()"
        )

    async def text(self, selector: str) -> str:
        return str(
            await self.js(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent")
        )

    async def shot(self, name: str) -> None:
        image = await self.call("Page.captureScreenshot", format="png")
        (self.shots / f"panel-{name}.png").write_bytes(base64.b64decode(image["data"]))


@asynccontextmanager
async def browser_page(url: str, tmp_path: Path, shots: Path) -> AsyncIterator[Browser]:
    async with open_chromium(tmp_path / "profile", tmp_path / "chromium.log") as devtools:
        target = await devtools.call("Target.createTarget", url="about:blank")
        attached = await devtools.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        page = Browser(devtools, attached["sessionId"], shots)
        await page.call("Network.enable")
        await page.call("Page.enable")
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.goto(url)
        yield page


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_server_from_create_to_delete_in_a_browser(
    nursery: trio.Nursery,
    start_node: StartNode,  # noqa: F811
    engine: docker.DockerClient,  # noqa: F811
    prefix: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    # The panel's port first (bound, not listening yet): the node reports there.
    reserved = socket.socket()
    reserved.bind(("127.0.0.1", 0))
    panel_url = f"http://127.0.0.1:{reserved.getsockname()[1]}"
    node: RunningAgent = await start_node(
        remote_config(panel_url, report_power_state=True, heartbeat_interval=1.0)
    )
    state = PanelState(tokens={PANEL_TOKEN: NODE})
    fleet = Fleet.of({NODE: (node.url, MASTER)}, poll_interval=1.0)
    await nursery.start(
        lambda task_status: serve_panel(
            state, fd=reserved.detach(), fleet=fleet, task_status=task_status
        )
    )
    game_port = _free_port()
    internal_id = f"{prefix}game"
    shots = Path(os.environ.get(SCREENSHOTS_ENV) or tmp_path)
    if not shots.is_absolute():
        shots = ROOT / shots
    shots.mkdir(parents=True, exist_ok=True)

    async with api_client(node.url) as api, httpx.AsyncClient(base_url=panel_url) as panel:
        response = await api.post(
            "/network/ports", json={"ip": "127.0.0.1", "port": game_port, "protocol": "tcp"}
        )
        assert response.status_code == 200, response.text
        # A change needs the X-Panel header: a form on another site cannot post here.
        refused = await panel.post(f"/panel/api/nodes/{NODE}/servers", json={})
        assert refused.status_code == 403

        async with browser_page(f"{panel_url}/servers/new", tmp_path, shots) as page:
            # --- create ---
            await page.until(
                "document.querySelectorAll('input[name=port]').length > 0"
                " && document.getElementById('image').value !== ''",
                what="the form to offer the node's images and free ports",
            )
            assert (
                await page.js("document.getElementById('image').value") == "lightd/busybox:latest"
            )
            assert (
                await page.js(
                    "JSON.parse(document.querySelector('input[name=port]:checked').value).port"
                )
                == game_port
            )
            await page.fill("#internal_id", internal_id)
            await page.shot("create")
            await page.click("#create-button")
            await page.until(
                f"location.pathname === '/servers/{NODE}/{internal_id}'",
                what="the server's page after create",
            )
            created = (await api.get(f"/containers/{internal_id}")).json()
            assert created["ports"][0]["port"] == game_port
            assert created["limits"]["memory"] == 256 * 1024 * 1024
            volume = (await api.get(f"/volumes/{created['volume_id']}")).json()
            assert volume["size_limit"] == 512 * 1024 * 1024

            # --- the install, watched ---
            await page.until(
                "document.getElementById('state').dataset.state === 'offline'",
                what="the install to end (state offline)",
            )
            await page.click("#tabs [data-tab=install]")
            await page.until(
                "document.getElementById('install-log').textContent.includes('Install done')",
                what="the install log",
            )
            await page.shot("install-log")
            await page.click("#tabs [data-tab=console]")

            # --- start, a console line, a command and its answer, live stats ---
            await page.until("document.getElementById('ws-status').textContent === 'connected'")
            await page.click("#power-start")
            await page.until(
                "document.getElementById('state').dataset.state === 'running'",
                what="the server to run",
            )
            await page.until(
                "document.getElementById('console').textContent.includes('Server is ready')",
                what="the server's first console line",
            )
            await page.fill("#command", "hello panel")
            await page.click("#send")
            await page.until(
                "document.getElementById('console').textContent.includes('you said: hello panel')",
                what="the command's output on the console",
            )
            await page.until(
                "window.lightdPanel.lastStats !== undefined"
                " && document.getElementById('mem-now').textContent.includes('of')",
                what="a stats frame on the charts",
            )
            await page.shot("server")

            # --- files: the list, an upload straight to the node, a one-click download ---
            await page.click("#tabs [data-tab=files]")
            await page.until(
                "!!document.querySelector('#files tr[data-name=\"server.properties\"]')",
                what="the install's file in the list",
            )
            upload = tmp_path / "notes.txt"
            upload.write_text("uploaded from the browser\n")
            document = await page.call("DOM.getDocument")
            found = await page.call(
                "DOM.querySelector", nodeId=document["root"]["nodeId"], selector="#upload-input"
            )
            await page.call("DOM.setFileInputFiles", files=[str(upload)], nodeId=found["nodeId"])
            await page.until(
                "!!document.querySelector('#files tr[data-name=\"notes.txt\"]')",
                what="the uploaded file in the list",
            )
            stored = await api.get(
                f"/volumes/{created['volume_id']}/files/content", params={"path": "notes.txt"}
            )
            assert stored.content == b"uploaded from the browser\n"
            await page.click('#files tr[data-name="server.properties"] a.name')
            await page.until(
                "document.getElementById('editor').value.includes('motd=Hello')",
                what="the editor to open a text file",
            )
            await page.shot("files")
            link = await page.js(
                f"api('POST', '{'/nodes/' + NODE + '/servers/' + internal_id}/files/link',"
                " {path: 'notes.txt'}).then((a) => a.url)"
            )
            assert link.startswith(node.url) and MASTER not in link
            async with httpx.AsyncClient() as outsider:  # no headers: a plain browser link
                first = await outsider.get(link)
                assert first.status_code == 200 and first.content == stored.content
                assert (await outsider.get(link)).status_code == 401  # single use

            # --- edit and save, rename, unzip, delete ---
            files_of = f"/volumes/{created['volume_id']}/files"
            await page.fill("#editor", "motd=Edited in the browser\n")
            await page.click("#edit-save")

            async def saved() -> bool:
                answer = await api.get(f"{files_of}/content", params={"path": "server.properties"})
                return answer.content == b"motd=Edited in the browser\n"

            await wait_for(saved, within=15, what="the edited file on the node")
            await page.click('#files tr[data-name="notes.txt"] button.rename')
            await page.until("document.getElementById('ask').open", what="the rename box")
            await page.fill("#ask-input", "docs/renamed.txt")
            await page.click("#ask-ok")
            await page.until(
                "!!document.querySelector('#files tr[data-name=\"docs\"]')"
                " && !document.querySelector('#files tr[data-name=\"notes.txt\"]')",
                what="the renamed file",
            )
            packed = await api.post(
                f"/volumes/{created['volume_id']}/compress",
                json={"format": "zip", "output_name": "pack", "sources": ["docs"]},
            )
            assert packed.status_code == 200, packed.text
            await page.click("#files-refresh")
            await page.until("!!document.querySelector('#files tr[data-name=\"pack.zip\"]')")
            await page.click('#files tr[data-name="pack.zip"] button.unzip')
            await page.until("document.getElementById('ask').open", what="the unzip box")
            await page.fill("#ask-input", "unpacked")
            await page.click("#ask-ok")
            await page.until(
                "!!document.querySelector('#files tr[data-name=\"unpacked\"]')",
                what="the unpacked folder",
            )
            unpacked = await api.get(
                f"{files_of}/content", params={"path": "unpacked/docs/renamed.txt"}
            )
            assert unpacked.content == b"uploaded from the browser\n"
            await page.click('#files tr[data-name="pack.zip"] button.delete')
            await page.click('#files tr[data-name="pack.zip"] button.delete')  # "Sure?"
            await page.until(
                "!document.querySelector('#files tr[data-name=\"pack.zip\"]')",
                what="the deleted archive to leave the list",
            )

            # --- a backup ---
            await page.click("#tabs [data-tab=backups]")
            await page.fill("#backup-name", "before kill")
            await page.click("#backup-create")
            await page.until(
                "[...document.querySelectorAll('#backups tr[data-backup] .state')]"
                ".some((e) => e.textContent === 'done')",
                what="the backup to be listed done",
            )
            await page.shot("backups")
            gone = await api.post(f"{files_of}/delete", json={"paths": ["unpacked"]})
            assert gone.status_code == 200, gone.text

            # --- the servers list and the nodes page show the truth ---
            await page.goto(f"{panel_url}/servers")
            await page.until(
                f"(document.querySelector('#servers tr[data-server=\"{internal_id}\"] .state')"
                " || {}).textContent === 'running'",
                what="the servers page to show it running",
            )
            await page.shot("servers")
            await page.goto(f"{panel_url}/")
            await page.until(
                f"!!document.querySelector('#fleet tr[data-fleet-node=\"{NODE}\"]')"
                " && document.querySelector('#fleet td.num').textContent.includes('%')",
                what="the nodes page with utilization",
            )
            await page.until(
                f'(document.querySelector(\'[data-node="{NODE}"] [data-server="{internal_id}"]'
                " .status') || {}).textContent === 'running'",
                what="remote sync's runtime state (report_power_state)",
            )
            await page.shot("nodes")

            # --- kill, then delete ---
            await page.goto(f"{panel_url}/servers/{NODE}/{internal_id}")
            await page.until("document.getElementById('state').dataset.state === 'running'")
            await page.click("#power-kill")
            await page.until(
                "document.getElementById('state').dataset.state === 'offline'",
                what="the server to be killed",
            )
            # Restore the backup (the server is offline now), and the folder is back.
            await page.click("#tabs [data-tab=backups]")
            await page.until("!!document.querySelector('#backups button.restore')")
            await page.click("#backups button.restore")
            await page.until(
                "document.getElementById('jobs').textContent.includes('volume.restore done')",
                what="the restore job to finish",
            )
            back = await api.get(
                f"{files_of}/content", params={"path": "unpacked/docs/renamed.txt"}
            )
            assert back.status_code == 200, back.text
            await page.click("#delete")
            await page.click("#delete")
            await page.until("!document.getElementById('gone').hidden", what="the delete")
            assert (await api.get(f"/containers/{internal_id}")).status_code == 404
            await page.goto(f"{panel_url}/servers")
            await page.until(
                "document.getElementById('summary').textContent.startsWith('0 server(s)')",
                what="the server to leave the list",
            )
            await page.goto(f"{panel_url}/")
            await page.until(
                f"!document.querySelector('[data-server=\"{internal_id}\"]')"
                " && document.getElementById('summary').textContent !== 'loading…'",
                what="the deleted server to leave the nodes page",
            )

            # --- what the browser saw: never the master token ---
            await check_traffic(page, node.url, internal_id)

    reserved.close()


async def check_traffic(page: Browser, node_url: str, internal_id: str) -> None:
    """Every request, answer and WebSocket frame of the browser, with no master token;
    the console socket opened with a temporary token scoped to the server."""
    seen: list[str] = []
    sockets: list[str] = []
    await page.harvest()
    for event in list(page.events):
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            request = params["request"]
            seen.append(request["url"])
            seen.append(json.dumps(request.get("headers", {})))
            seen.append(request.get("postData", ""))
        elif method == "Network.responseReceived":
            seen.append(json.dumps(params["response"].get("headers", {})))
        elif method == "Network.webSocketCreated":
            sockets.append(params["url"])
        elif method.startswith("Network.webSocketFrame"):
            seen.append(params["response"]["payloadData"])
    seen.extend(sockets)
    await page.harvest()
    seen.extend(page.bodies)
    # The recording holds the answers' bodies (the check below would find a leak there).
    assert any('"servers"' in s and internal_id in s for s in seen), "no answer bodies recorded"
    assert not [s for s in seen if MASTER in s], "the master token reached the browser"

    console = [u for u in sockets if f"/ws/{internal_id}?token=" in u]
    assert console, sockets
    token = console[0].rpartition("token=")[2]
    assert token.startswith("lightd_") and token != MASTER
    # The token was for one connection only (remove_on_use) and one server.
    async with api_client(node_url, token=token) as as_browser:
        assert (await as_browser.get("/containers")).status_code == 401
