"""Contract §17 images: ``GET /images``, ``POST /images/pull`` (a job with byte progress,
``docker.registries`` credentials) and ``DELETE /images/:ref``, on the real engine.

No registry of the internet is reachable here, so pulls that succeed come from a registry
of the test's own: a small Registry API v2 server on 127.0.0.1 (the engine treats
loopback registries as plain HTTP) serving one image built here, demanding HTTP basic
auth and recording what the engine sent.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import secrets
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import docker
import httpx
import pytest
from lightd.docker import PullProgress, registry_key, registry_of
from lightd.plugins.images import normalize

from .conftest import MADE, TEST_IMAGE, api_client, wait_for
from .containers.conftest import (  # noqa: F401 (fixtures)
    StartNode,
    containers_config,
    engine,
    prefix,
    start_node,
)
from .containers.conftest import ready as make_ready

# --- a registry of the test's own ------------------------------------------------------


def _arch() -> str:
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.define
class Registry:
    """One image, ``<host>/lightd/tiny:1``: a layer of ``LAYER_BYTES`` random bytes (so
    the engine reports download progress), behind basic auth ``username``/``password``."""

    LAYER_BYTES = 3 << 20

    username: str
    password: str
    host: str = ""
    blobs: dict[str, bytes] = attrs.Factory(dict)
    manifest: bytes = b""
    #: Every ``Authorization`` header the engine sent (decoded ``user:password``).
    logins: list[str] = attrs.Factory(list)
    layer_size: int = 0

    @property
    def image(self) -> str:
        return f"{self.host}/lightd/tiny:1"

    def build(self) -> None:
        tar = io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            data = os.urandom(self.LAYER_BYTES)
            info = tarfile.TarInfo("data.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        layer = gzip.compress(tar.getvalue(), compresslevel=1)
        config = json.dumps(
            {
                "architecture": _arch(),
                "os": "linux",
                "config": {"Cmd": ["/data.bin"]},
                "rootfs": {"type": "layers", "diff_ids": [_digest(tar.getvalue())]},
            }
        ).encode()
        self.blobs = {_digest(layer): layer, _digest(config): config}
        self.layer_size = len(layer)
        self.manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config),
                    "digest": _digest(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(layer),
                        "digest": _digest(layer),
                    }
                ],
            }
        ).encode()


def _handler(registry: Registry) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _authorized(self) -> bool:
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                login = base64.b64decode(header[6:]).decode()
                registry.logins.append(login)
                return login == f"{registry.username}:{registry.password}"
            return False

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            if not self._authorized():
                challenge = {"WWW-Authenticate": 'Basic realm="lightd-test"'}
                self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', challenge)
                return
            path = self.path.split("?")[0]
            if path == "/v2/":
                self._send(200, b"{}", {"Content-Type": "application/json"})
            elif path == "/v2/lightd/tiny/manifests/1" or path == (
                f"/v2/lightd/tiny/manifests/{_digest(registry.manifest)}"
            ):
                self._send(
                    200,
                    registry.manifest,
                    {
                        "Content-Type": "application/vnd.docker.distribution.manifest.v2+json",
                        "Docker-Content-Digest": _digest(registry.manifest),
                    },
                )
            elif path.startswith("/v2/lightd/tiny/blobs/") and (
                path.rsplit("/", 1)[1] in registry.blobs
            ):
                digest = path.rsplit("/", 1)[1]
                self._send(
                    200,
                    registry.blobs[digest],
                    {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest},
                )
            else:
                self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}', {})

    return Handler


@pytest.fixture
def registry(engine: docker.DockerClient) -> Iterator[Registry]:  # noqa: F811
    """The registry, serving in a thread; the image pulled from it is removed at the end."""
    found = Registry(username="panel", password="pw-" + secrets.token_hex(8))
    found.build()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(found))
    found.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        with contextlib.suppress(docker.errors.ImageNotFound, docker.errors.APIError):
            engine.images.remove(found.image, force=True)


# --- helpers -----------------------------------------------------------------------------


@pytest.fixture
async def api(start_node: StartNode) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    node = await start_node()
    async with api_client(node.url) as client:
        yield client


async def finished_job(api: httpx.AsyncClient, job_id: str, within: float = 60) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal seen
        response = await api.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        seen = response.json()
        return seen["state"] in ("done", "failed", "cancelled")

    await wait_for(done, within=within, what=f"job {job_id} to finish")
    return seen


async def listed(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await api.get("/images")
    assert response.status_code == 200, response.text
    return list(response.json()["images"])


def tagged(images: list[dict[str, Any]], tag: str) -> dict[str, Any] | None:
    return next((i for i in images if tag in i["tags"]), None)


@contextlib.contextmanager
def extra_tag(engine: docker.DockerClient, name: str) -> Iterator[str]:  # noqa: F811
    """The test image under one more name of the test's own (removed at the end)."""
    repository, tag = f"lightd-test-{name}", "v1"
    engine.images.get(TEST_IMAGE).tag(repository, tag)
    try:
        yield f"{repository}:{tag}"
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(f"{repository}:{tag}")


# --- unit: references and progress -----------------------------------------------------


def test_references_normalise_as_the_engine_resolves_them() -> None:
    full = "docker.io/library/busybox:latest"
    for spelling in ("busybox", "busybox:latest", "docker.io/library/busybox", full):
        assert normalize(spelling) == full
    assert normalize("index.docker.io/library/busybox:1") == "docker.io/library/busybox:1"
    assert normalize("acme/game") == "docker.io/acme/game:latest"
    assert normalize("ghcr.io/acme/game") == "ghcr.io/acme/game:latest"
    assert normalize("localhost:5000/game:2") == "localhost:5000/game:2"
    assert normalize("busybox@sha256:" + "a" * 64) == "docker.io/library/busybox@sha256:" + "a" * 64
    assert normalize("lightd/busybox") != normalize("busybox")
    assert registry_of("busybox") == registry_of("acme/game") == "docker.io"
    assert registry_of("ghcr.io/acme/game:1") == "ghcr.io"
    assert registry_of("127.0.0.1:5000/x") == "127.0.0.1:5000"
    assert registry_key("https://index.docker.io/v1/") == "docker.io"
    assert registry_key("GHCR.io") == "ghcr.io"


def test_pull_progress_adds_up_the_layers_bytes() -> None:
    """A pull stream as the engine writes it (recorded shape): three layers, one already
    present, downloads interleaved, then extraction (not counted as download)."""
    lines: list[dict[str, Any]] = [
        {"status": "Pulling from acme/game", "id": "1"},
        {"status": "Already exists", "progressDetail": {}, "id": "aaa"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "ccc"},
        {"status": "Waiting", "progressDetail": {}, "id": "ccc"},
        {"status": "Downloading", "progressDetail": {"current": 100, "total": 1000}, "id": "bbb"},
    ]
    meter = PullProgress()
    changes = [meter.feed(line) for line in lines]
    # (the first announced layer makes the total unknown; ``Already exists`` counts nothing)
    assert changes == [False, False, True, False, False, True]
    assert (meter.done, meter.total) == (100, None)  # ccc's size is not known yet
    assert meter.feed(
        {"status": "Downloading", "progressDetail": {"current": 50, "total": 500}, "id": "ccc"}
    )
    assert (meter.done, meter.total) == (150, 1500)
    assert meter.feed(
        {"status": "Downloading", "progressDetail": {"current": 700, "total": 1000}, "id": "bbb"}
    )
    assert (meter.done, meter.total) == (750, 1500)
    assert meter.feed({"status": "Verifying Checksum", "progressDetail": {}, "id": "bbb"})
    assert meter.feed({"status": "Download complete", "progressDetail": {}, "id": "ccc"})
    assert (meter.done, meter.total) == (1500, 1500)
    extracting = {
        "status": "Extracting",
        "progressDetail": {"current": 9, "total": 99},
        "id": "bbb",
    }
    assert not meter.feed(extracting)
    assert not meter.feed({"status": "Pull complete", "progressDetail": {}, "id": "bbb"})
    assert not meter.feed({"status": "Digest: sha256:" + "0" * 64})
    assert (meter.done, meter.total) == (1500, 1500)
    # A layer that completes without a size reported counts what arrived.
    small = PullProgress()
    small.feed({"status": "Pulling fs layer", "progressDetail": {}, "id": "x"})
    assert small.total is None
    small.feed({"status": "Download complete", "progressDetail": {}, "id": "x"})
    assert (small.done, small.total) == (0, 0)


# --- the real engine ---------------------------------------------------------------------


async def test_list_shows_images_and_the_containers_using_them(
    start_node: StartNode,  # noqa: F811
    engine: docker.DockerClient,  # noqa: F811
    prefix: str,  # noqa: F811
) -> None:
    node = await start_node()
    internal_id = f"{prefix}-img"
    with extra_tag(engine, prefix) as name:
        async with api_client(node.url) as api:
            before = await listed(api)
            image = tagged(before, name)
            assert image is not None
            test_image = engine.images.get(TEST_IMAGE)
            assert image["id"] == test_image.id
            assert TEST_IMAGE in image["tags"] and image["in_use_by"] == []
            assert image["size"] == test_image.attrs["Size"] > 0
            assert isinstance(image["created_at"], int) and image["created_at"] > 0
            # A container made from the image under another spelling of the same name.
            await make_ready(api, internal_id, image=f"docker.io/{name}")
            image = tagged(await listed(api), name)
            assert image is not None and image["in_use_by"] == [internal_id]
            # Deleting it, by any of its names or its id, is refused while it is used.
            for ref in (name, TEST_IMAGE, image["id"]):
                response = await api.delete(f"/images/{quote(ref, safe='')}")
                assert response.status_code == 409, response.text
                assert response.json()["error"] == f"Image in use by {internal_id}"
            assert engine.images.get(name)
            assert (await api.delete(f"/containers/{internal_id}")).status_code == 200
            image = tagged(await listed(api), name)
            assert image is not None and image["in_use_by"] == []
            # Not used any more: the name goes (the test image keeps its own).
            response = await api.delete(f"/images/{quote(name, safe='')}")
            assert response.status_code == 200, response.text
            assert response.json() == {"message": "Image deleted"}
            assert tagged(await listed(api), name) is None
            assert tagged(await listed(api), TEST_IMAGE) is not None
            with pytest.raises(docker.errors.ImageNotFound):
                engine.images.get(name)


async def test_delete_of_an_unknown_image_is_404(api: httpx.AsyncClient) -> None:
    for ref in ("lightd-absent/none:nope", "127.0.0.1:9/a/b:c", "sha256:" + "0" * 64, "x y"):
        response = await api.delete(f"/images/{quote(ref, safe='')}")
        assert response.status_code == 404, (ref, response.text)
        assert response.json()["error"] == "Image not found"
    # A slash left unencoded reaches the route as well.
    response = await api.delete("/images/lightd-absent/none:nope")
    assert response.status_code == 404


async def test_a_container_outside_the_node_keeps_its_image(
    api: httpx.AsyncClient,
    engine: docker.DockerClient,  # noqa: F811
    prefix: str,  # noqa: F811
) -> None:
    """An image whose last name a container of the engine (not the node's) uses: the
    engine refuses, and the answer names that container."""
    maker = engine.containers.create(TEST_IMAGE, ["true"], name=f"lightd-{prefix}-maker")
    try:
        image = maker.commit(f"lightd-test-{prefix}", "only")
    finally:
        maker.remove(force=True)
    name = f"lightd-test-{prefix}:only"
    try:
        other = engine.containers.create(name, ["true"], name=f"lightd-{prefix}-foreign")
        try:
            response = await api.delete(f"/images/{quote(name, safe='')}")
        finally:
            other.remove(force=True)
        assert response.status_code == 409, response.text
        assert response.json()["error"] == f"Image in use by {other.id[:12]}"
        assert engine.images.get(name).id == image.id
    finally:
        with contextlib.suppress(docker.errors.ImageNotFound):
            engine.images.remove(image.id, force=True)


async def test_pull_bad_bodies_are_400(api: httpx.AsyncClient) -> None:
    cases: list[tuple[Any, str]] = [
        ({"image": "Not Valid!"}, "Invalid image: Not Valid!"),
        ({"image": "Busybox"}, "Invalid image: Busybox"),
        ({"image": "busybox:"}, "Invalid image: busybox:"),
        ({}, "image"),
        ({"image": 5}, "image"),
        ({"image": "busybox", "auth": {"username": "u"}}, "password"),
        ({"image": "busybox", "auth": {"username": "", "password": "p"}}, "username"),
        ({"image": "busybox", "auth": "u:p"}, "auth"),
        (["busybox"], ""),
    ]
    for body, message in cases:
        response = await api.post("/images/pull", json=body)
        assert response.status_code == 400, (body, response.text)
        assert message in response.json()["error"], (body, response.text)


async def test_temporary_tokens_are_refused(api: httpx.AsyncClient) -> None:
    minted = await api.post(
        "/auth/tokens", json={"ttl": "5m", "permissions": ["read", "manage", "files"]}
    )
    assert minted.status_code in (200, 201), minted.text
    async with api_client(str(api.base_url), token=minted.json()["token"]) as temporary:
        for method, path, body in (
            ("GET", "/images", None),
            ("POST", "/images/pull", {"image": "busybox"}),
            ("DELETE", f"/images/{quote(TEST_IMAGE, safe='')}", None),
        ):
            response = await temporary.request(method, path, json=body)
            assert response.status_code == 403, (path, response.text)
    assert tagged(await listed(api), TEST_IMAGE) is not None


async def test_pull_of_an_unreachable_image_fails_cleanly(
    api: httpx.AsyncClient,
    engine: docker.DockerClient,  # noqa: F811
) -> None:
    image = "127.0.0.1:9/lightd/absent:nope"
    response = await api.post("/images/pull", json={"image": image})
    assert response.status_code == 202, response.text
    assert response.json()["message"] == "Pull started"
    job = await finished_job(api, response.json()["job_id"])
    assert job["kind"] == "image.pull" and job["state"] == "failed", job
    assert job["error"].startswith(f"Failed to pull image {image}: "), job
    assert len(job["error"]) > len(f"Failed to pull image {image}: ")
    assert all(image not in i["tags"] for i in await listed(api))
    with pytest.raises(docker.errors.ImageNotFound):
        engine.images.get(image)


async def test_pull_with_byte_progress_and_registry_credentials(
    start_node: StartNode,  # noqa: F811
    registry: Registry,
    engine: docker.DockerClient,  # noqa: F811
) -> None:
    """Config ``docker.registries`` logs in; a wrong one fails the pull with the engine's
    reason; the body's ``auth`` wins over the config's. Progress is in bytes, up to the
    layer's size."""
    wrong = {"username": "panel", "password": "not-" + registry.password}
    node = await start_node({"docker": {"registries": {registry.host: wrong}}})
    async with api_client(node.url) as api:
        response = await api.post("/images/pull", json={"image": registry.image})
        assert response.status_code == 202, response.text
        failed = await finished_job(api, response.json()["job_id"])
        assert failed["state"] == "failed", failed
        assert failed["error"].startswith(f"Failed to pull image {registry.image}: ")
        assert f"panel:{wrong['password']}" in registry.logins  # the config's login was used
        assert f"{registry.username}:{registry.password}" not in registry.logins

        auth = {"username": registry.username, "password": registry.password}
        response = await api.post("/images/pull", json={"image": registry.image, "auth": auth})
        assert response.status_code == 202, response.text
        job_id = response.json()["job_id"]
        job = await finished_job(api, job_id)
        assert job["state"] == "done", job
        assert job["progress"]["unit"] == "bytes"
        assert job["progress"]["done"] == job["progress"]["total"] == registry.layer_size
        pulled = engine.images.get(registry.image)
        assert job["result"] == {
            "message": "Image pulled",
            "image": registry.image,
            "id": pulled.id,
        }
        assert f"{registry.username}:{registry.password}" in registry.logins
        # The password is in no answer.
        for path in (f"/jobs/{job_id}", "/jobs", "/images"):
            assert registry.password not in (await api.get(path)).text
        image = tagged(await listed(api), registry.image)
        assert image is not None and image["id"] == pulled.id and image["in_use_by"] == []
        response = await api.delete(f"/images/{quote(registry.image, safe='')}")
        assert response.status_code == 200, response.text
        with pytest.raises(docker.errors.ImageNotFound):
            engine.images.get(registry.image)


async def test_install_pulls_a_missing_image_with_the_configured_login(
    start_node: StartNode,  # noqa: F811
    registry: Registry,
    prefix: str,  # noqa: F811
) -> None:
    login = {"username": registry.username, "password": registry.password}
    node = await start_node({"docker": {"registries": {f"http://{registry.host}/": login}}})
    internal_id = f"{prefix}-pulled"
    async with api_client(node.url) as api:
        # The image's only command is its data file: run nothing, the install is the point.
        await make_ready(api, internal_id, image=registry.image)
        assert f"{registry.username}:{registry.password}" in registry.logins
        image = tagged(await listed(api), registry.image)
        assert image is not None and image["in_use_by"] == [internal_id]
        assert (await api.delete(f"/containers/{internal_id}")).status_code == 200


def test_diagnostics_mask_registry_passwords(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    password = "reg-" + secrets.token_hex(12)
    path = make_config(
        {"docker": {"registries": {"ghcr.io": {"username": "acme", "password": password}}}}
    )
    result = subprocess.run(
        [sys.executable, "-m", "lightd", "--config", str(path), "--json", "diagnostics"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DOCKER_HOST": docker_host},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    effective = json.loads(result.stdout)["config"]["effective"]
    assert effective["docker"]["registries"] == {"ghcr.io": {"username": "acme", "password": "***"}}
    assert MADE.session  # the session's fixtures are in use (nothing left behind)
