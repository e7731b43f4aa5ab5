"""Attack suite, TLS: with ``server.tls`` the agent serves HTTPS and WSS only, so the
master token never crosses the network in clear text; a bad certificate or key is a
config error at start."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio_websocket
from lightd import hookimpl
from lightd.errors import ConfigError
from lightd.runtime import open_agent
from lightd.server import serve_agent
from quart import Blueprint, websocket

from ..conftest import MASTER, ROOT, VENDOR, StartAgent


async def self_signed(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 and its key (openssl CLI)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    with trio.fail_after(30):
        await trio.run_process(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )  # fmt: skip
    return cert, key


class _Echo:
    """A plugin with a WebSocket echo route: WSS end to end through the agent's server."""

    @hookimpl
    def lightd_add_routes(self, agent: object) -> list[Blueprint]:
        bp = Blueprint("tls_echo", __name__)

        @bp.websocket("/tls-echo")
        async def echo() -> None:
            await websocket.accept()
            while True:
                await websocket.send(await websocket.receive())

        return [bp]


async def test_https_and_wss(
    start_agent: StartAgent, make_config: Callable[..., Path], tmp_path: Path
) -> None:
    cert, key = await self_signed(tmp_path)
    node = await start_agent(
        make_config({"server": {"tls": {"cert": str(cert), "key": str(key)}}}),
        extra_plugins=(("tls_echo", _Echo()),),
    )
    assert node.url.startswith("https://"), node.url
    port = node.url.rsplit(":", 1)[1]
    headers = {"Accept": VENDOR, "Authorization": f"Bearer {MASTER}"}
    context = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(verify=context, timeout=10) as client:
        with trio.fail_after(15):
            ping = await client.get(f"https://127.0.0.1:{port}/api/v1/public/ping")
            volumes = await client.get(f"https://127.0.0.1:{port}/volumes", headers=headers)
    assert ping.status_code == 200 and ping.json()["status"] == "ok"
    assert volumes.status_code == 200, volumes.text
    # plain HTTP on the same port carries nothing: no answer, no token read
    async with httpx.AsyncClient(timeout=5) as plain:
        with trio.fail_after(15), pytest.raises(httpx.HTTPError):
            await plain.get(f"http://127.0.0.1:{port}/volumes", headers=headers)
    with trio.fail_after(15):
        async with trio_websocket.open_websocket_url(
            f"wss://127.0.0.1:{port}/tls-echo?token={MASTER}", ssl_context=context
        ) as ws:
            await ws.send_message("over tls")
            assert await ws.get_message() == "over tls"
        # the container route is served over WSS too (unknown id: refused before upgrade)
        with pytest.raises(trio_websocket.ConnectionRejected) as rejected:
            async with trio_websocket.open_websocket_url(
                f"wss://127.0.0.1:{port}/ws/nope?token={MASTER}", ssl_context=context
            ):
                pass
    assert rejected.value.status_code == 404
    # a client that does not trust the certificate gets nothing
    async with httpx.AsyncClient(timeout=5) as untrusting:
        with trio.fail_after(15), pytest.raises(httpx.ConnectError):
            await untrusting.get(f"https://127.0.0.1:{port}/api/v1/public/ping")


async def test_bad_key_is_a_config_error(make_config: Callable[..., Path], tmp_path: Path) -> None:
    cert, _ = await self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, wrong_key = await self_signed(other)
    path = make_config({"server": {"tls": {"cert": str(cert), "key": str(wrong_key)}}})
    with trio.fail_after(30):
        async with open_agent(path) as agent:
            with pytest.raises(ConfigError, match=r"^server\.tls: cannot load the certificate"):
                await serve_agent(agent)  # refused before anything listens


def test_cli_exits_2_on_a_missing_certificate(make_config: Callable[..., Path]) -> None:
    path = make_config({"server": {"tls": {"cert": "missing.pem", "key": "missing.key"}}})
    result = subprocess.run(
        [sys.executable, "-m", "lightd", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "server.tls" in result.stderr and "Traceback" not in result.stderr
