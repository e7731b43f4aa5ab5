"""Contract §13 "Pull" (and §14 jobs): ``POST /volumes/:id/files/pull`` against real HTTP
servers this test starts on loopback (127.0.0.1 and 127.0.0.2), through a real agent.

No traffic ever leaves loopback: addresses outside it appear only in URLs the agent must
refuse before connecting (400 at once), or in the unit tests of the address classifier.
The servers speak raw HTTP/1.1 over trio sockets, so a test can lie about
``Content-Length``, stream chunked, stall mid-body or redirect anywhere.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpcore
import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from lightd import outbound
from lightd.files import TEMP_PREFIX
from lightd.plugins.file_manager import pull

from ..conftest import RunningAgent, StartAgent, api_client, wait_for
from .conftest import error, new_volume

Volume = tuple[str, Path]
Handler = Callable[[trio.abc.Stream, "Request"], Awaitable[None]]


# --- a raw HTTP server on loopback -----------------------------------------------------------


@attrs.frozen
class Request:
    method: str
    target: str
    headers: dict[str, str]


@attrs.define
class Origin:
    """An HTTP/1.1 server on ``host`` (one request per connection); ``routes`` maps a path
    to a handler writing the raw answer; ``seen`` keeps every request."""

    host: str
    port: int = 0
    routes: dict[str, Handler] = attrs.Factory(dict)
    seen: list[Request] = attrs.Factory(list)

    def url(self, path: str, host: str | None = None) -> str:
        return f"http://{host or self.host}:{self.port}{path}"

    async def handle(self, stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # e.g. a refused TLS handshake
            await self._handle(stream)

    async def _handle(self, stream: trio.abc.Stream) -> None:
        data = b""
        async with stream:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                data += chunk
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, target, _ = head[0].split(" ", 2)
            headers = {}
            for line in head[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            request = Request(method, target, headers)
            self.seen.append(request)
            handler = self.routes.get(target.split("?", 1)[0])
            try:
                if handler is None:
                    await stream.send_all(answer(404, b"no"))
                else:
                    await handler(stream, request)
            except trio.BrokenResourceError:
                pass


async def serve(nursery: trio.Nursery, host: str) -> Origin:
    origin = Origin(host)
    listeners = await nursery.start(partial(trio.serve_tcp, origin.handle, 0, host=host))
    origin.port = listeners[0].socket.getsockname()[1]
    return origin


def answer(status: int, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status} X"]
    if "Content_Length" not in headers and "Transfer_Encoding" not in headers:
        headers["Content_Length"] = str(len(body))
    headers.setdefault("Connection", "close")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def static(body: bytes, status: int = 200, **headers: str) -> Handler:
    async def handler(stream: trio.abc.Stream, request: Request) -> None:
        await stream.send_all(answer(status, body, **headers))

    return handler


def redirect(location: str, status: int = 302) -> Handler:
    return static(b"", status, Location=location)


def chunked(total: int, piece: int = 65536) -> Handler:
    """A chunked body of ``total`` bytes and no ``Content-Length``."""

    async def handler(stream: trio.abc.Stream, request: Request) -> None:
        await stream.send_all(answer(200, Transfer_Encoding="chunked"))
        left = total
        while left:
            n = min(piece, left)
            await stream.send_all(f"{n:x}\r\n".encode() + b"c" * n + b"\r\n")
            left -= n
        await stream.send_all(b"0\r\n\r\n")

    return handler


def close_delimited(total: int) -> Handler:
    """An HTTP/1.0-style body: no length, ends when the server closes."""

    async def handler(stream: trio.abc.Stream, request: Request) -> None:
        await stream.send_all(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n")
        for _ in range(0, total, 65536):
            await stream.send_all(b"d" * 65536)

    return handler


@attrs.define
class Stall:
    """Sends ``first`` bytes of a ``size``-byte body, then waits for ``release``."""

    first: int
    size: int
    release: trio.Event = attrs.Factory(trio.Event)
    started: int = 0

    async def __call__(self, stream: trio.abc.Stream, request: Request) -> None:
        self.started += 1
        await stream.send_all(answer(200, Content_Length=str(self.size)))
        await stream.send_all(b"s" * self.first)
        await self.release.wait()
        await stream.send_all(b"s" * (self.size - self.first))


@pytest.fixture
async def origin(nursery: trio.Nursery) -> Origin:
    return await serve(nursery, "127.0.0.1")


@pytest.fixture
async def other(nursery: trio.Nursery) -> Origin:
    """A second server, on 127.0.0.2 (also loopback on Linux)."""
    return await serve(nursery, "127.0.0.2")


# --- agents ----------------------------------------------------------------------------------


Agent = Callable[..., Awaitable[RunningAgent]]


@pytest.fixture
def agent_with(start_agent: StartAgent, make_config: Callable[..., Path]) -> Agent:
    async def start(**files: Any) -> RunningAgent:
        return await start_agent(make_config({"files": files}))

    return start


@pytest.fixture
async def loop_client(agent_with: Agent) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an agent that may pull from all of 127.0.0.0/8."""
    running = await agent_with(pull_allowed_cidrs=["127.0.0.0/8"])
    async with api_client(running.url) as c:
        yield c


async def start_pull(client: httpx.AsyncClient, volume_id: str, **body: Any) -> str:
    body.setdefault("path", ".")
    response = await client.post(f"/volumes/{volume_id}/files/pull", json=body)
    assert response.status_code == 202, response.text
    answer_ = response.json()
    assert answer_["message"] == "Pull started"
    assert set(answer_) == {"message", "job_id"}
    return str(answer_["job_id"])


async def job_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


async def finished(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async def ended() -> bool:
        return (await job_of(client, job_id))["state"] in ("done", "failed", "cancelled")

    await wait_for(ended, within=20, what=f"job {job_id} to end")
    return await job_of(client, job_id)


def entries(folder: Path) -> list[str]:
    """Everything in the volume, relative (temporary files included)."""
    return sorted(
        str((Path(d) / n).relative_to(folder))
        for d, dirs, files in os.walk(folder)
        for n in dirs + files
    )


def temps(folder: Path) -> list[str]:
    return [e for e in entries(folder) if Path(e).name.startswith(TEMP_PREFIX)]


# --- pulls that work -------------------------------------------------------------------------


async def test_pull_writes_the_file(loop_client: httpx.AsyncClient, origin: Origin) -> None:
    volume_id, folder = await new_volume(loop_client)
    data = os.urandom(3 * 1024 * 1024 + 5)
    origin.routes["/files/world.bin"] = static(data)
    job_id = await start_pull(
        loop_client, volume_id, url=origin.url("/files/world.bin?x=1"), path="dl/sub"
    )
    job = await finished(loop_client, job_id)
    assert job["state"] == "done", job
    assert job["kind"] == "volume.pull" and job["volume_id"] == volume_id
    assert job["progress"] == {"done": len(data), "total": len(data), "unit": "bytes"}
    assert job["result"] == {"path": "dl/sub/world.bin", "size": len(data)}
    assert (folder / "dl" / "sub" / "world.bin").read_bytes() == data
    assert oct((folder / "dl/sub/world.bin").stat().st_mode & 0o777) == oct(0o644)
    assert temps(folder) == []
    request = origin.seen[-1]
    assert request.method == "GET" and request.target == "/files/world.bin?x=1"
    assert request.headers["host"] == f"127.0.0.1:{origin.port}"
    assert request.headers["user-agent"].startswith("lightd/")
    assert request.headers["accept-encoding"] == "identity"
    assert "cookie" not in request.headers and "authorization" not in request.headers


async def test_pull_replaces_a_file_atomically_keeping_its_mode(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    (folder / "server.jar").write_bytes(b"old")
    (folder / "server.jar").chmod(0o600)
    origin.routes["/v2"] = static(b"new contents")
    job = await finished(
        loop_client,
        await start_pull(loop_client, volume_id, url=origin.url("/v2"), name="server.jar"),
    )
    assert job["state"] == "done", job
    assert (folder / "server.jar").read_bytes() == b"new contents"
    assert (folder / "server.jar").stat().st_mode & 0o777 == 0o600
    assert entries(folder) == ["server.jar"]


async def test_pull_body_as_sent_chunked_and_close_delimited(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    origin.routes["/chunked"] = chunked(300_000, piece=7000)
    origin.routes["/plain"] = close_delimited(65536 * 3)
    origin.routes["/gz"] = static(b"\x1f\x8b raw", Content_Encoding="gzip")
    for path in ("/chunked", "/plain", "/gz"):
        job = await finished(
            loop_client, await start_pull(loop_client, volume_id, url=origin.url(path))
        )
        assert job["state"] == "done", job
    assert (folder / "chunked").read_bytes() == b"c" * 300_000
    assert (folder / "plain").read_bytes() == b"d" * 65536 * 3
    assert (folder / "gz").read_bytes() == b"\x1f\x8b raw"  # stored as sent, not decoded


async def test_pull_by_name_keeps_the_host_header(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    origin.routes["/f"] = static(b"by name")
    url = origin.url("/f", host="localhost")
    job = await finished(loop_client, await start_pull(loop_client, volume_id, url=url))
    assert job["state"] == "done", job
    assert origin.seen[-1].headers["host"] == f"localhost:{origin.port}"
    assert (folder / "f").read_bytes() == b"by name"


async def test_redirects_are_followed_up_to_five(
    loop_client: httpx.AsyncClient, origin: Origin, other: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    for n in range(4):  # /r0 -> /r1 -> ... -> /r4 -> the file: 5 redirects
        origin.routes[f"/r{n}"] = redirect(f"/r{n + 1}" if n % 2 else origin.url(f"/r{n + 1}"))
    origin.routes["/r4"] = redirect(other.url("/file.txt"), 307)
    other.routes["/file.txt"] = static(b"after 5 redirects")
    job = await finished(
        loop_client, await start_pull(loop_client, volume_id, url=origin.url("/r0"))
    )
    assert job["state"] == "done", job
    # the name comes from the URL asked for, not from where it was redirected
    assert (folder / "r0").read_bytes() == b"after 5 redirects"

    origin.routes["/s0"] = redirect("/r0")  # one more: 6 redirects
    job = await finished(
        loop_client, await start_pull(loop_client, volume_id, url=origin.url("/s0"))
    )
    assert job["state"] == "failed" and job["error"] == "Too many redirects"
    assert not (folder / "s0").exists() and temps(folder) == []


async def test_credentials_go_only_to_the_urls_own_origin(
    loop_client: httpx.AsyncClient, origin: Origin, other: Origin
) -> None:
    volume_id, _ = await new_volume(loop_client)
    origin.routes["/start"] = redirect("/again")
    origin.routes["/again"] = redirect(other.url("/data"))
    other.routes["/data"] = static(b"ok")
    url = origin.url("/start").replace("http://", "http://user:p%40ss@")
    job = await finished(loop_client, await start_pull(loop_client, volume_id, url=url))
    assert job["state"] == "done", job
    expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert [r.headers.get("authorization") for r in origin.seen] == [expected, expected]
    assert "authorization" not in other.seen[-1].headers


async def test_progress_is_visible_and_cancel_leaves_nothing(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    stall = Stall(first=3 * 1024 * 1024, size=10 * 1024 * 1024)
    origin.routes["/big"] = stall
    job_id = await start_pull(loop_client, volume_id, url=origin.url("/big"), path="new/dir")

    async def progressed() -> bool:
        job = await job_of(loop_client, job_id)
        return job["state"] == "running" and job["progress"]["done"] >= 2 * 1024 * 1024

    await wait_for(progressed, what="progress of the pull")
    job = await job_of(loop_client, job_id)
    assert job["progress"]["total"] == stall.size and job["progress"]["unit"] == "bytes"
    assert len(temps(folder)) == 1 and temps(folder)[0].startswith("new/dir/")
    response = await loop_client.delete(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    job = await finished(loop_client, job_id)
    assert job["state"] == "cancelled"
    assert entries(folder) == []  # no temporary file, and the folders made for it are gone
    stall.release.set()


async def test_a_cut_download_fails_and_leaves_nothing(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    (folder / "keep").write_bytes(b"old")

    async def cut(stream: trio.abc.Stream, request: Request) -> None:
        await stream.send_all(answer(200, Content_Length="5000000") + b"x" * 2_000_000)

    origin.routes["/cut"] = cut
    origin.routes["/missing"] = static(b"gone", 404)
    job = await finished(
        loop_client, await start_pull(loop_client, volume_id, url=origin.url("/cut"), name="keep")
    )
    assert job["state"] == "failed" and job["error"].startswith("Download failed: "), job
    job = await finished(
        loop_client, await start_pull(loop_client, volume_id, url=origin.url("/missing"))
    )
    assert job["state"] == "failed" and job["error"] == "Download failed: HTTP 404"
    assert entries(folder) == ["keep"] and (folder / "keep").read_bytes() == b"old"


async def test_https_verifies_and_names_the_host(
    loop_client: httpx.AsyncClient,
    nursery: trio.Nursery,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """https: the agent connects to the checked address, yet the TLS handshake names the
    URL's host (SNI, and the certificate is verified for it), as does ``Host``."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with trio.fail_after(30):
        await trio.run_process(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(key), "-out", str(cert), "-days", "1",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            ],
            capture_stdout=True,
            capture_stderr=True,
        )  # fmt: skip
    server_names: list[str | None] = []
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    server_tls.sni_callback = lambda sock, name, ctx: server_names.append(name)
    origin = Origin("127.0.0.1")
    origin.routes["/secure.bin"] = static(b"over tls")
    listeners = await nursery.start(
        partial(trio.serve_ssl_over_tcp, origin.handle, 0, server_tls, host="127.0.0.1")
    )
    origin.port = listeners[0].transport_listener.socket.getsockname()[1]
    url = f"https://localhost:{origin.port}/secure.bin"
    volume_id, folder = await new_volume(loop_client)

    job = await finished(loop_client, await start_pull(loop_client, volume_id, url=url))
    assert job["state"] == "failed", job  # not signed by a CA the agent trusts
    assert job["error"].startswith("Download failed: ") and "certificate" in job["error"]
    assert origin.seen == [] and entries(folder) == []

    monkeypatch.setattr(pull, "_ssl_context", ssl.create_default_context(cafile=str(cert)))
    job = await finished(loop_client, await start_pull(loop_client, volume_id, url=url))
    assert job["state"] == "done", job
    assert (folder / "secure.bin").read_bytes() == b"over tls"
    assert server_names == ["localhost", "localhost"]
    assert origin.seen[-1].headers["host"] == f"localhost:{origin.port}"


# --- size ------------------------------------------------------------------------------------


async def test_size_limit_by_header_and_while_streaming(agent_with: Agent, origin: Origin) -> None:
    running = await agent_with(pull_allowed_cidrs=["127.0.0.1/32"], max_pull_bytes=100_000)
    async with api_client(running.url) as client:
        volume_id, folder = await new_volume(client)
        stall = Stall(first=10, size=10_000_000)  # says 10 MB up front: refused at once
        origin.routes["/says-big"] = stall
        origin.routes["/chunked"] = chunked(100_001, piece=1000)
        origin.routes["/plain"] = close_delimited(200_000)
        origin.routes["/exact"] = chunked(100_000)
        for path in ("/says-big", "/chunked", "/plain"):
            job = await finished(client, await start_pull(client, volume_id, url=origin.url(path)))
            assert job["state"] == "failed" and job["error"] == "File too large", (path, job)
        stall.release.set()
        job = await finished(client, await start_pull(client, volume_id, url=origin.url("/exact")))
        assert job["state"] == "done", job
        assert entries(folder) == ["exact"] and (folder / "exact").stat().st_size == 100_000


# --- where a pull may go ---------------------------------------------------------------------


BLOCKED_LITERALS = [
    "http://127.0.0.1:{port}/x",
    "http://127.1:{port}/x",
    "http://2130706433:{port}/x",
    "http://0x7f000001:{port}/x",
    "http://[::1]:{port}/x",
    "http://[::ffff:127.0.0.1]:{port}/x",
    "http://[::ffff:7f00:1]:{port}/x",
    "http://0.0.0.0:{port}/x",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://10.0.0.1/",
    "http://192.168.1.1/",
    "http://172.16.0.1/",
    "http://100.64.0.1/",
    "http://198.18.0.1/",
    "http://224.0.0.1/",
    "http://255.255.255.255/",
    "https://[fd00::1]/",
    "http://[2002:a00:1::]/",
    "http://[64:ff9b::a00:1]/",
]


async def test_literal_blocked_addresses_are_refused_at_once(
    client: httpx.AsyncClient, volume: Volume, origin: Origin
) -> None:
    volume_id, folder = volume
    origin.routes["/x"] = static(b"secret")
    for template in BLOCKED_LITERALS:
        url = template.format(port=origin.port)
        response = await client.post(
            f"/volumes/{volume_id}/files/pull", json={"url": url, "path": "."}
        )
        assert response.status_code == 400, (url, response.text)
        assert error(response) == "Destination not allowed", url
    assert origin.seen == [] and entries(folder) == []
    jobs = (await client.get("/jobs", params={"volume_id": volume_id})).json()["jobs"]
    assert jobs == []


async def test_a_name_resolving_to_loopback_fails_the_job(
    client: httpx.AsyncClient, volume: Volume, origin: Origin
) -> None:
    volume_id, folder = volume
    origin.routes["/x"] = static(b"secret")
    job_id = await start_pull(client, volume_id, url=origin.url("/x", host="localhost"))
    job = await finished(client, job_id)
    assert job["state"] == "failed" and job["error"] == "Destination not allowed"
    assert origin.seen == [] and entries(folder) == []


async def test_a_redirect_to_a_blocked_address_fails(
    agent_with: Agent, origin: Origin, other: Origin
) -> None:
    running = await agent_with(pull_allowed_cidrs=["127.0.0.1/32"])
    async with api_client(running.url) as client:
        volume_id, folder = await new_volume(client)
        other.routes["/secret"] = static(b"internal")
        origin.routes["/to-ip"] = redirect(other.url("/secret"))
        origin.routes["/to-mapped"] = redirect(f"http://[::ffff:127.0.0.2]:{other.port}/secret")
        origin.routes["/to-file"] = redirect("file:///etc/passwd")
        for path, message in [
            ("/to-ip", "Destination not allowed"),
            ("/to-mapped", "Destination not allowed"),
            ("/to-file", "Invalid URL"),
        ]:
            job = await finished(
                client, await start_pull(client, volume_id, url=origin.url(path), name="out")
            )
            assert job["state"] == "failed" and job["error"] == message, (path, job)
        assert other.seen == [] and entries(folder) == []


async def test_connection_checks_every_resolved_address_and_connects_to_it(
    origin: Origin,
) -> None:
    """DNS rebinding: the backend resolves once and connects to what it checked; the
    name itself (``rebind.invalid``) never resolves, so any second lookup would fail."""
    origin.routes["/f"] = static(b"pinned")

    class Fixed(outbound.GuardedBackend):
        def __init__(self, answers: list[str], allowed: list[str]) -> None:
            super().__init__(outbound.parse_networks(allowed))
            self.answers = answers

        async def resolve(self, host: str, port: int) -> list[str]:
            assert host == "rebind.invalid"
            return self.answers

    url = f"http://rebind.invalid:{origin.port}/f"
    backend = Fixed(["127.0.0.1"], ["127.0.0.0/8"])
    async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
        response = await pool.request("GET", url)
    assert response.status == 200 and response.content == b"pinned"
    assert origin.seen[-1].headers["host"] == f"rebind.invalid:{origin.port}"
    assert backend.connected == ["127.0.0.1"]

    for answers in (["127.0.0.1", "10.0.0.1"], ["::ffff:10.0.0.1"], ["fe80::1%1"]):
        backend = Fixed(answers, ["127.0.0.0/8"])
        async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
            with pytest.raises(outbound.DestinationNotAllowed):
                await pool.request("GET", url)
        assert backend.connected == []
    assert len(origin.seen) == 1


# --- bad requests ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "not a url",
        "http://",
        "http:///x",
        "http://a b/",
        "//example.com/x",
        "javascript:alert(1)",
        "http://exa\nmple.com/",
        "",
    ],
)
async def test_invalid_urls(client: httpx.AsyncClient, volume: Volume, url: str) -> None:
    volume_id, _ = volume
    response = await client.post(f"/volumes/{volume_id}/files/pull", json={"url": url, "path": "."})
    assert response.status_code == 400, response.text
    assert error(response) == "Invalid URL"


async def test_bad_bodies_and_unknown_volume(client: httpx.AsyncClient, volume: Volume) -> None:
    volume_id, _ = volume
    for body in ({"path": "."}, {"url": 5, "path": "."}, {"url": "http://example.com/"}):
        response = await client.post(f"/volumes/{volume_id}/files/pull", json=body)
        assert response.status_code == 400, (body, response.text)
    response = await client.post(
        "/volumes/0b7f5e4c-6c2a-4d4e-9a53-2f1b9d3c0e11/files/pull",
        json={"url": "http://example.com/", "path": "."},
    )
    assert response.status_code == 404 and error(response) == "Volume not found"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"path": "../up"}, "Invalid path: path traversal detected"),
        ({"path": "/etc"}, "Invalid path: absolute paths are not allowed"),
        ({"path": ""}, "Invalid path: path is empty"),
        ({"path": "a\x00b"}, "path: invalid text"),
        (
            {"path": ".", "name": "../../etc/passwd"},
            "Invalid path: name must be a single file name",
        ),
        ({"path": ".", "name": "a/b"}, "Invalid path: name must be a single file name"),
        ({"path": ".", "name": ".."}, "Invalid path: name must be a single file name"),
        ({"path": ".", "name": ""}, "Invalid path: name must be a single file name"),
        ({"path": ".", "name": "x" * 256}, "Invalid path: name must be a single file name"),
        ({"path": "out"}, "Invalid path: path escapes volume"),
    ],
)
async def test_path_and_name_attacks(
    loop_client: httpx.AsyncClient,
    origin: Origin,
    tmp_path: Path,
    body: dict[str, str],
    message: str,
) -> None:
    volume_id, folder = await new_volume(loop_client)
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (folder / "out").symlink_to(outside)
    origin.routes["/f"] = static(b"payload")
    response = await loop_client.post(
        f"/volumes/{volume_id}/files/pull", json={"url": origin.url("/f"), **body}
    )
    assert response.status_code == 400, response.text
    assert error(response) == message
    assert origin.seen == [] and list(outside.iterdir()) == []


async def test_links_planted_at_the_target_are_replaced_not_followed(
    loop_client: httpx.AsyncClient, origin: Origin, tmp_path: Path
) -> None:
    volume_id, folder = await new_volume(loop_client)
    victim = tmp_path / "victim"
    victim.write_bytes(b"host file")
    (folder / "evil").symlink_to(victim)
    (folder / "dangling").symlink_to(tmp_path / "nothing-here")
    origin.routes["/f"] = static(b"payload")
    for name in ("evil", "dangling"):
        job = await finished(
            loop_client,
            await start_pull(loop_client, volume_id, url=origin.url("/f"), name=name),
        )
        assert job["state"] == "done", job
        assert not (folder / name).is_symlink() and (folder / name).read_bytes() == b"payload"
    assert victim.read_bytes() == b"host file"
    assert not (tmp_path / "nothing-here").exists()


async def test_url_names_are_sanitized(loop_client: httpx.AsyncClient, origin: Origin) -> None:
    volume_id, folder = await new_volume(loop_client)
    cases = {
        "/a/..%2F..%2Fetc%2Fpasswd": ".._.._etc_passwd",
        "/dir/": "download",
        "/%2e%2e": "download",
        "/x%00y%0A": "x_y_",
        "/caf%C3%A9.txt": "café.txt",
    }
    for path, name in cases.items():
        origin.routes[path] = static(b"n")
        job = await finished(
            loop_client, await start_pull(loop_client, volume_id, url=origin.url(path))
        )
        assert job["state"] == "done", (path, job)
        assert job["result"]["path"] == name
        assert (folder / name).read_bytes() == b"n"
        (folder / name).unlink()


async def test_a_folder_at_the_target_is_a_conflict(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    (folder / "world").mkdir()
    (folder / "file").write_bytes(b"")
    origin.routes["/f"] = static(b"x")
    for body, message in [
        ({"path": ".", "name": "world"}, "A folder exists at path: world"),
        ({"path": "file/sub"}, "File already exists at path: file/sub/f"),
    ]:
        response = await loop_client.post(
            f"/volumes/{volume_id}/files/pull", json={"url": origin.url("/f"), **body}
        )
        assert response.status_code == 409, response.text
        assert error(response) == message
    assert origin.seen == []


async def test_at_most_three_pulls_per_volume(
    loop_client: httpx.AsyncClient, origin: Origin
) -> None:
    volume_id, folder = await new_volume(loop_client)
    other_id, _ = await new_volume(loop_client)
    stall = Stall(first=10, size=20)
    origin.routes["/slow"] = stall
    origin.routes["/fast"] = static(b"fast")
    ids = [
        await start_pull(loop_client, volume_id, url=origin.url("/slow"), name=f"s{i}")
        for i in range(3)
    ]
    response = await loop_client.post(
        f"/volumes/{volume_id}/files/pull", json={"url": origin.url("/fast"), "path": "."}
    )
    assert response.status_code == 429, response.text
    assert error(response) == "Too many pulls in progress"
    other_job = await start_pull(loop_client, other_id, url=origin.url("/fast"))
    assert (await finished(loop_client, other_job))["state"] == "done"
    stall.release.set()
    for job_id in ids:
        assert (await finished(loop_client, job_id))["state"] == "done"
    job = await finished(
        loop_client, await start_pull(loop_client, volume_id, url=origin.url("/fast"))
    )
    assert job["state"] == "done"
    assert sorted(os.listdir(folder)) == ["fast", "s0", "s1", "s2"]


async def test_pulls_can_be_switched_off(agent_with: Agent, origin: Origin) -> None:
    """``files.pulls_enabled: false``: 403 and no job, no traffic; a bad body is still 400."""
    running = await agent_with(pulls_enabled=False, pull_allowed_cidrs=["127.0.0.0/8"])
    async with api_client(running.url) as c:
        volume_id, folder = await new_volume(c)
        origin.routes["/fast"] = static(b"fast")
        url = f"/volumes/{volume_id}/files/pull"
        response = await c.post(url, json={"url": origin.url("/fast"), "path": "."})
        assert response.status_code == 403, response.text
        assert error(response) == "Pulls are disabled on this node"
        bad = await c.post(url, json={"url": "ftp://x/y", "path": "."})
        assert bad.status_code == 400, bad.text
        assert (await c.get("/jobs")).json()["jobs"] == []
    assert os.listdir(folder) == []
    assert origin.seen == []


async def test_bad_config_is_refused(agent_with: Agent) -> None:
    from lightd import ConfigError

    with pytest.raises(ConfigError, match="pull_allowed_cidrs"):
        await agent_with(pull_allowed_cidrs=["10.0.0.0/33"])


# --- the address classifier ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "0.0.0.0", "0.1.2.3", "10.1.2.3", "100.64.0.1", "100.127.255.255", "127.0.0.1",
        "127.255.0.9", "169.254.169.254", "172.16.0.1", "172.31.255.255", "192.0.0.9",
        "192.0.2.1", "192.88.99.1", "192.168.0.1", "198.18.0.1", "198.19.255.255",
        "198.51.100.1", "203.0.113.1", "224.0.0.1", "239.255.255.250", "240.0.0.1",
        "255.255.255.255",
        "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:8.8.8.8", "::127.0.0.1",
        "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "100::1", "2001::1",
        "2001:2::1", "2001:db8::1", "2002:7f00:1::", "2002:808:808::", "3fff::1",
        "fc00::1", "fd12:3456::1", "fe80::1", "fec0::1", "ff02::1", "ff0e::1",
    ],
)  # fmt: skip
def test_not_public(text: str) -> None:
    ip = ipaddress.ip_address(text)
    assert not outbound.is_public_address(ip)
    assert not outbound.address_permitted(ip, [])


@pytest.mark.parametrize(
    "text", ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::808:808"]
)
def test_public(text: str) -> None:
    assert outbound.is_public_address(ipaddress.ip_address(text))


def test_allowed_networks() -> None:
    allowed = outbound.parse_networks(["127.0.0.1", "10.1.0.0/16", "fd00::/8"])
    assert outbound.address_permitted(ipaddress.ip_address("127.0.0.1"), allowed)
    assert outbound.address_permitted(ipaddress.ip_address("::ffff:127.0.0.1"), allowed)
    assert not outbound.address_permitted(ipaddress.ip_address("127.0.0.2"), allowed)
    assert outbound.address_permitted(ipaddress.ip_address("10.1.200.3"), allowed)
    assert not outbound.address_permitted(ipaddress.ip_address("10.2.0.1"), allowed)
    assert outbound.address_permitted(ipaddress.ip_address("fd00::5"), allowed)
    assert not outbound.address_permitted(ipaddress.ip_address("fe80::1"), allowed)
    assert outbound.valid_cidrs(["10.0.0.0/8", "::1"]) and outbound.valid_cidrs(())
    assert not outbound.valid_cidrs(["nope"]) and not outbound.valid_cidrs("10.0.0.0/8")
    assert not outbound.valid_cidrs([5])


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("example.com", None),
        ("deadbeef", None),
        ("1.2.3.4.", None),
    ],
)
def test_literal_address(host: str, address: str | None) -> None:
    found = outbound.literal_address(host)
    assert (None if found is None else str(found)) == address


_PRIVATE_V4 = [
    ipaddress.IPv4Network(n)
    for n in ("10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.168.0.0/16",
              "100.64.0.0/10", "0.0.0.0/8", "224.0.0.0/4")
]  # fmt: skip


@st.composite
def private_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = draw(st.sampled_from(_PRIVATE_V4))
    offset = draw(st.integers(0, net.num_addresses - 1))
    return net.network_address + offset


@given(private_v4())
def test_every_ipv6_form_of_a_private_ipv4_is_blocked(v4: ipaddress.IPv4Address) -> None:
    n = int(v4)
    forms = [
        ipaddress.IPv6Address((0xFFFF << 32) | n),  # mapped
        ipaddress.IPv6Address((0x2002 << 112) | (n << 80)),  # 6to4
        ipaddress.IPv6Address((0x64FF9B << 96) | n),  # NAT64
        ipaddress.IPv6Address(n),  # IPv4-compatible
        ipaddress.IPv6Address((0x20010000 << 96) | (0xFFFFFFFF ^ n)),  # Teredo client
    ]
    assert not outbound.is_public_address(v4)
    for form in forms:
        assert not outbound.address_permitted(form, []), form


@given(st.integers(0, 2**32 - 1))
def test_ipv4_public_only_if_global_and_a_form_keeps_the_verdict(n: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    if outbound.is_public_address(v4):
        assert v4.is_global and not v4.is_multicast
        assert outbound.is_public_address(ipaddress.IPv6Address((0x64FF9B << 96) | n))
    assert not outbound.is_public_address(ipaddress.IPv6Address((0xFFFF << 32) | n))


@given(st.integers(0, 2**128 - 1))
def test_ipv6_public_implies_global(n: int) -> None:
    ip = ipaddress.IPv6Address(n)
    if outbound.is_public_address(ip):
        assert ip.is_global and not ip.is_multicast and not ip.is_link_local
        inner = outbound.embedded_ipv4(ip)
        assert inner is None or outbound.is_public_address(inner)


@given(st.ip_addresses())
def test_a_network_of_its_own_always_permits(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert outbound.address_permitted(ip, outbound.parse_networks([str(ip)]))
