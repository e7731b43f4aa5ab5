"""The agent under systemd: sd_notify (READY, RELOADING, STOPPING) and SIGHUP reloads."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from lightd.server import sd_notify

from .conftest import ROOT, api_client, drop_guard_rules, wait_for

LISTENING = re.compile(r"listening on (http://\S+?)(?:,|\s|$)")


def test_sd_notify_speaks_to_path_and_abstract_sockets() -> None:
    name = f"lightd-test-{secrets.token_hex(6)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": f"@{name}"})
        assert listener.recv(4096) == b"READY=1"
    assert not sd_notify("READY=1", {})  # not under systemd: nothing to do
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    # Nobody listening: logged, not raised (a notification must never stop the agent).
    assert not sd_notify("READY=1", {"NOTIFY_SOCKET": f"@{name}-gone"})


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A folder with a short path: a unix socket's path is limited to 107 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ld", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


class Notifications:
    """The service manager's end of ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.path = path

    async def next(self, within: float = 30) -> str:
        with trio.fail_after(within):
            return (await self.sock.recv(4096)).decode()


@asynccontextmanager
async def agent_process(
    config: Path, env: dict[str, str], log: Path
) -> AsyncIterator[tuple[trio.Process, Notifications]]:
    """``python -m lightd`` with a ``NOTIFY_SOCKET``; killed on exit if still running."""
    notes = Notifications(log.parent / "notify.sock")
    await notes.sock.bind(str(notes.path))
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "lightd", "--config", str(config)],
            stdin=None,
            stdout=out,
            stderr=out,
            cwd=ROOT,
            env={**env, "NOTIFY_SOCKET": str(notes.path)},
        )
    try:
        yield process, notes
    finally:
        if process.returncode is None:
            process.kill()
            with trio.fail_after(10):
                await process.wait()
        text = log.read_text(errors="replace")  # noqa: ASYNC240 - cleanup must not checkpoint
        if match := LISTENING.search(text):
            drop_guard_rules(int(match[1].rsplit(":", 1)[1]))
        notes.sock.close()


async def test_ready_reload_and_stop_are_told_to_systemd(
    make_config: Callable[..., Path], docker_host: str, short_dir: Path
) -> None:
    config = make_config()
    log = short_dir / "agent.log"
    env = {**os.environ, "DOCKER_HOST": docker_host}
    async with agent_process(config, env, log) as (process, notes):
        try:
            first = await notes.next()
        except trio.TooSlowError:
            pytest.fail(f"no READY=1; the agent's log:\n{log.read_text()[-3000:]}")
        assert first.startswith("READY=1\nSTATUS=serving on http://")
        # READY comes once the agent can work: the readiness probe agrees at once.
        match = LISTENING.search(await trio.Path(log).read_text())
        assert match is not None
        url = match[1]
        async with httpx.AsyncClient(base_url=url, timeout=10) as anon:
            ready = await anon.get("/health/ready")
        assert ready.status_code == 200, ready.text

        async with api_client(url, Origin="https://elsewhere.example") as browser:
            assert (await browser.get("/remote/config")).status_code == 200  # any origin

            # SIGHUP applies a changed live setting, as POST /remote/config/reload does.
            raw = json.loads(config.read_text())
            raw["server"]["allowed_origins"] = ["https://panel.example"]
            config.write_text(json.dumps(raw))
            process.send_signal(signal.SIGHUP)
            reloading = await notes.next()
            assert re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=\d+", reloading), reloading
            assert await notes.next() == "READY=1"
            refused = await browser.get("/remote/config")
            assert refused.status_code == 403
            assert refused.json()["error"] == "Origin not allowed"

            # A broken file: logged, and the running config stays.
            config.write_text("{ not json")
            process.send_signal(signal.SIGHUP)
            assert (await notes.next()).startswith("RELOADING=1\n")
            assert await notes.next() == "READY=1"
            assert (await browser.get("/remote/config")).status_code == 403
            assert process.returncode is None

        async def logged() -> bool:
            return "configuration not reloaded" in await trio.Path(log).read_text()

        await wait_for(logged, what="the refused reload in the log")

        process.send_signal(signal.SIGTERM)
        assert await notes.next() == "STOPPING=1"
        with trio.fail_after(15):
            assert await process.wait() == 0
