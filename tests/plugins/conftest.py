"""Helpers shared by the volume and archive tests."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest


async def new_volume(client: httpx.AsyncClient) -> tuple[str, Path]:
    """A fresh volume through the API: its id and host folder."""
    response = await client.post("/volumes")
    assert response.status_code == 201, response.text
    body = response.json()
    return body["volume_id"], Path(body["path"])


@pytest.fixture
async def volume(client: httpx.AsyncClient) -> tuple[str, Path]:
    return await new_volume(client)


def error(response: httpx.Response) -> str:
    return str(response.json()["error"])
