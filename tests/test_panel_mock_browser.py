"""The mock panel's page in a real headless browser (Debian's chromium, driven over the
DevTools protocol): an agent reports a container's status change and the open page shows
it without being reloaded.

chromium is installed by ``scripts/chromium.sh`` (``scripts/test.sh`` runs it). When it is
missing or cannot start, this test fails and says so; it is never skipped.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from .conftest import StartAgent, wait_for
from .plugins.remote_sync_support import NODE, Panel, remote_config, transitions

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # we run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
]


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "chromium is not installed, so the mock panel's page cannot be checked in a"
            " browser: run `bash scripts/chromium.sh` (scripts/test.sh does it)"
        )
    return path


class DevTools:
    """A minimal DevTools protocol client: one call at a time, events ignored."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, session: str | None = None, **params: Any) -> Any:
        call_id = next(self.ids)
        message: dict[str, Any] = {"id": call_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self.ws.send_message(json.dumps(message))
        while True:
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == call_id:
                if "error" in reply:
                    raise AssertionError(f"{method} failed: {reply['error']}")
                return reply["result"]


@asynccontextmanager
async def open_chromium(profile: Path, log: Path) -> AsyncIterator[DevTools]:
    """Start headless chromium and connect to its browser-level DevTools socket."""
    binary = chromium_path()
    await trio.Path(profile).mkdir()
    with log.open("wb") as out:
        try:
            process = await trio.lowlevel.open_process(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdout=out,
                stderr=out,
                # Its temporary folders go with the test's (a killed browser leaves them).
                env={**os.environ, "TMPDIR": str(profile.parent)},
            )
        except OSError as exc:
            pytest.fail(f"chromium ({binary}) cannot be started: {exc}")
    try:
        active = trio.Path(profile / "DevToolsActivePort")
        endpoint: list[str] = []

        async def ready() -> bool:
            if process.poll() is not None:
                tail = (await trio.Path(log).read_text(errors="replace"))[-3000:]
                pytest.fail(f"chromium exited with {process.returncode} at start:\n{tail}")
            if await active.exists():  # "<port>\n<path>\n", maybe not all written yet
                endpoint[:] = (await active.read_text()).split()[:2]
            browser = "/devtools/browser/"  # + a 36-character id
            return len(endpoint) == 2 and len(endpoint[1]) == len(browser) + 36

        try:
            await wait_for(ready, within=60, what="chromium's DevTools port")
        except BaseException:
            tail = (await trio.Path(log).read_text(errors="replace"))[-3000:]
            print(f"chromium log:\n{tail}")
            raise
        port, path = endpoint
        async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{port}{path}", max_message_size=16 * 1024 * 1024
        ) as ws:
            yield DevTools(ws)
    finally:
        process.kill()
        with trio.move_on_after(10):
            await process.wait()


async def test_page_shows_a_status_change_without_reloading(
    nursery: trio.Nursery,
    start_agent: StartAgent,
    make_config: Callable[..., Path],
    tmp_path: Path,
) -> None:
    panel = Panel(nursery)
    await panel.up()
    node = await start_agent(make_config(remote_config(panel.url)))
    await transitions(node.agent, ("mc-1", "installing"))

    async with open_chromium(tmp_path / "profile", tmp_path / "chromium.log") as devtools:
        target = await devtools.call("Target.createTarget", url=f"{panel.url}/")
        attached = await devtools.call(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        session = attached["sessionId"]

        async def page(expression: str) -> Any:
            result = await devtools.call(
                "Runtime.evaluate", session, expression=expression, returnByValue=True
            )
            return result["result"].get("value")

        row = f'document.querySelector(\'[data-node="{NODE}"] [data-server="mc-1"] .status\')'
        shows = f"({row} || {{}}).textContent"

        async def showing(status: str) -> Callable[[], Any]:
            async def check() -> bool:
                return bool(await page(f"{shows} === {json.dumps(status)}"))

            return check

        await wait_for(await showing("installing"), within=20, what="the page to show installing")
        await page("window.lightdSamePage = 'yes'")  # gone if the page is ever reloaded

        await transitions(node.agent, ("mc-1", "ready"))
        await wait_for(await showing("ready"), within=20, what="the page to show ready")
        assert await page("window.lightdSamePage") == "yes"
        assert await page(f"{row}.dataset.status") == "ready"
        summary = await page("document.getElementById('summary').textContent")
        assert summary.startswith("1 node(s), 2 update(s) received")
    panel.close()
