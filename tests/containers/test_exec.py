"""Contract §17: ``POST /containers/:id/exec`` (master token only), on the real engine."""

from __future__ import annotations

from typing import Any

import docker
import httpx
import pytest

from ..conftest import api_client, wait_for
from .conftest import in_thread, ready, wait_state


async def run(api: httpx.AsyncClient, internal_id: str, **body: Any) -> httpx.Response:
    return await api.post(f"/containers/{internal_id}/exec", json=body)


async def running_server(api: httpx.AsyncClient, internal_id: str) -> dict[str, Any]:
    await ready(api, internal_id)
    await api.post(f"/containers/{internal_id}/start")
    return await wait_state(api, internal_id, state="running")


async def test_exec_output_exit_code_and_stderr(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-ex"
    await running_server(api, internal_id)
    echo = await run(api, internal_id, argv=["echo", "hello", "wörld"])
    assert echo.status_code == 200, echo.text
    assert echo.json() == {
        "exit_code": 0,
        "output": "hello wörld\n",
        "truncated": False,
        "timed_out": False,
    }
    both = await run(api, internal_id, argv=["sh", "-c", "echo out; echo err >&2; exit 3"])
    body = both.json()
    assert body["exit_code"] == 3
    assert sorted(body["output"].splitlines()) == ["err", "out"]
    # Runs in the server's container: it sees the volume at its working directory.
    pwd = await run(api, internal_id, argv=["sh", "-c", "pwd; printf '\\377'"])
    assert pwd.json()["output"] == "/home/container\n\ufffd"  # undecodable: replaced
    missing = await run(api, internal_id, argv=["no-such-program"])
    assert missing.status_code == 200
    assert missing.json()["exit_code"] not in (0, None)


async def test_exec_timeout_kills_the_process(
    api: httpx.AsyncClient, engine: docker.DockerClient, prefix: str
) -> None:
    internal_id = f"{prefix}-to"
    body = await running_server(api, internal_id)
    response = await run(api, internal_id, argv=["sh", "-c", "echo begun; sleep 41"], timeout=1)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "exit_code": None,
        "output": "begun\n",
        "truncated": False,
        "timed_out": True,
    }

    def sleeping() -> bool:
        top = engine.containers.get(body["container_id"]).top(ps_args="-eo pid,args")
        return any("sleep 41" in " ".join(p) for p in top["Processes"])

    async def killed() -> bool:
        return not await in_thread(sleeping)

    await wait_for(killed, what="the timed-out exec's process to be gone")
    assert (await wait_state(api, internal_id, state="running"))["container_id"] == (
        body["container_id"]
    )


async def test_exec_output_is_capped_at_one_mebibyte(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-big"
    await running_server(api, internal_id)
    response = await run(
        api, internal_id, argv=["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' a; exit 4"]
    )
    body = response.json()
    assert body["truncated"] is True
    assert body["timed_out"] is False
    assert body["exit_code"] == 4  # the rest was read, so the process could finish
    assert body["output"] == "a" * (1 << 20)
    exact = await run(api, internal_id, argv=["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' b"])
    assert exact.json()["truncated"] is False
    assert len(exact.json()["output"]) == 1 << 20


async def test_exec_needs_the_master_token(api: httpx.AsyncClient, node: Any, prefix: str) -> None:
    internal_id = f"{prefix}-tok"
    await running_server(api, internal_id)
    token = (await api.post("/auth/tokens", json={"ttl": "5m"})).json()["token"]
    async with api_client(node.url, token) as temporary:
        refused = await run(temporary, internal_id, argv=["echo", "hi"])
        assert refused.status_code == 403
        assert refused.json()["error"] == "Exec needs the master token"
        # The same token may do what it is allowed to.
        assert (await temporary.get(f"/containers/{internal_id}")).status_code == 200


async def test_exec_refusals(api: httpx.AsyncClient, prefix: str) -> None:
    internal_id = f"{prefix}-off"
    await ready(api, internal_id)
    offline = await run(api, internal_id, argv=["echo", "hi"])
    assert offline.status_code == 409
    assert offline.json()["error"] == "Container is not running"
    unknown = await run(api, f"{prefix}-nobody", argv=["echo"])
    assert unknown.status_code == 404
    assert unknown.json()["error"] == "Container not found"


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({}, "argv: is required"),
        ({"argv": []}, "argv: must be 1 to 256 strings"),
        ({"argv": [""]}, "argv: must be 1 to 256 strings"),
        ({"argv": "echo hi"}, "argv: must be a list"),
        ({"argv": ["echo", 1]}, "argv[1]: must be a string"),
        ({"argv": ["x"] * 257}, "argv: must be 1 to 256 strings"),
        ({"argv": ["echo", "a" * 70_000]}, "argv: must be 1 to 256 strings"),
        ({"argv": ["echo", "a\u0000"]}, "argv[1]: invalid text"),
        ({"argv": ["echo"], "timeout": 301}, "timeout: must be more than 0 and at most 300"),
        ({"argv": ["echo"], "timeout": 0}, "timeout: must be more than 0 and at most 300"),
    ],
)
async def test_exec_bad_bodies(
    api: httpx.AsyncClient, prefix: str, body: dict[str, Any], error: str
) -> None:
    internal_id = f"{prefix}-bb"
    await ready(api, internal_id)
    response = await api.post(f"/containers/{internal_id}/exec", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(error)
