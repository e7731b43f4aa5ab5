"""Attack suite, small input holes of the volume and pool routes: an absolute ``root`` in
the ``create-folder`` alias is refused (not quietly made relative), and a wrong JSON type
for a pool port answers the field form of contract §1."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from ..plugins.conftest import error, new_volume


@pytest.mark.parametrize(
    ("root", "name", "message"),
    [
        ("/etc", "x", "Invalid path: absolute paths are not allowed"),
        ("/etc/", "cron.d", "Invalid path: absolute paths are not allowed"),
        ("//srv", "x", "Invalid path: absolute paths are not allowed"),
        ("world", "/etc", "Invalid path: absolute paths are not allowed"),
        ("../up", "x", "Invalid path: path traversal detected"),
    ],
)
async def test_create_folder_alias_refuses_an_absolute_root(
    client: httpx.AsyncClient, root: str, name: str, message: str
) -> None:
    volume_id, folder = await new_volume(client)
    with trio.fail_after(10):
        response = await client.post(
            f"/volumes/{volume_id}/create-folder", json={"root": root, "name": name}
        )
    assert (response.status_code, error(response)) == (400, message)
    assert list(folder.iterdir()) == []


async def test_create_folder_alias_root_slash_is_the_volume(client: httpx.AsyncClient) -> None:
    volume_id, folder = await new_volume(client)
    with trio.fail_after(10):
        response = await client.post(
            f"/volumes/{volume_id}/create-folder", json={"root": "/", "name": "plugins"}
        )
    assert response.json() == {"message": "Folder created successfully", "path": "plugins"}
    assert (folder / "plugins").is_dir()


@pytest.mark.parametrize(
    ("route", "body", "message"),
    [
        ("/network/ports", {"ip": "10.9.0.1", "port": [1]}, "port: must be an integer"),
        ("/network/ports", {"ip": "10.9.0.1", "port": "80"}, "port: must be an integer"),
        ("/network/ports", {"ip": "10.9.0.1", "port": None}, "port: must be an integer"),
        (
            "/network/ports/bulk",
            {"ports": [{"ip": "10.9.0.1", "port": {"a": 1}}]},
            "ports[0].port: must be an integer",
        ),
        (
            "/network/ports/bulk",
            {"ip": "10.9.0.1", "start": 1, "end": [2]},
            "end: must be an integer",
        ),
        (
            "/network/ports/bulk-delete",
            {"ports": [{"ip": "10.9.0.1", "port": 1.5}]},
            "ports[0].port: must be an integer",
        ),
    ],
)
async def test_pool_port_of_a_wrong_type_names_the_field(
    client: httpx.AsyncClient, tmp_path: Path, route: str, body: object, message: str
) -> None:
    with trio.fail_after(10):
        response = await client.post(route, json=body)
    assert (response.status_code, error(response)) == (400, message)
    with trio.fail_after(10):
        listed = await client.get("/network/ports")
    assert listed.json() == {"ports": []}
