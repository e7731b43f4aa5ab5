"""SFTP logins by container (contract §19) on the real engine: the username
``<internal_id>``, and the credentials routes ``POST|DELETE /containers/:id/sftp/credentials``
and ``GET /containers/:id/sftp/info``."""

from __future__ import annotations

import re
from pathlib import Path

from lightd.plugins.sftp import SFTP
from lightd.testing import RunningAgent

from tests.conftest import MASTER
from tests.containers import conftest as containers_fixtures
from tests.containers.conftest import StartNode, create
from tests.plugins.test_sftp import login_fails, openssh, sftp_client

# The real-engine fixtures of tests/containers, here too.
engine = containers_fixtures.engine
prefix = containers_fixtures.prefix
containers_config = containers_fixtures.containers_config
start_node = containers_fixtures.start_node

SFTP_ON = {"sftp": {"enabled": True, "host": "127.0.0.1", "port": 0}}


async def test_container_logins_and_credentials(
    start_node: StartNode, prefix: str, tmp_path: Path
) -> None:
    node: RunningAgent = await start_node(SFTP_ON)
    port = node.agent.stash[SFTP].port()
    internal_id = f"{prefix}-sftp"
    async with node.client() as api:
        response = await create(api, internal_id)
        assert response.status_code == 200, response.text
        volume_id = (await api.get(f"/containers/{internal_id}")).json()["volume_id"]
        folder = Path((await api.get(f"/volumes/{volume_id}")).json()["path"])
        (folder / "server.properties").write_text("motd=hi\n")

        # the container's id as username, the master token as password (OpenSSH client)
        result = await openssh(port, internal_id, MASTER, "get server.properties\n", tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert (tmp_path / "server.properties").read_text() == "motd=hi\n"
        # a token scoped to the container has its volume in scope
        token = (
            await api.post(
                "/auth/tokens",
                json={"ttl": "1h", "containers": [internal_id], "permissions": ["files"]},
            )
        ).json()["token"]
        async with sftp_client(port, internal_id, token) as client:
            assert "server.properties" in await client.call(lambda s: s.listdir("/"))

        # credentials: none yet
        response = await api.get(f"/containers/{internal_id}/sftp/info")
        assert response.status_code == 404
        assert response.json()["error"] == "SFTP credentials not found for this container"
        response = await api.post("/containers/nope/sftp/credentials", json={})
        assert response.status_code == 404
        assert response.json()["error"] == "Container not found"

        # defaults: the internal_id and 24 random characters
        response = await api.post(f"/containers/{internal_id}/sftp/credentials", json={})
        assert response.status_code == 200, response.text
        created = response.json()
        assert list(created) == ["username", "password", "host", "port", "volume_path"]
        assert created["username"] == internal_id
        assert re.fullmatch(r"[A-Za-z0-9!@#$%^&*]{24}", created["password"])
        assert created["host"] == "127.0.0.1" and created["port"] == port
        assert created["volume_path"] == "/home/container"
        info = (await api.get(f"/containers/{internal_id}/sftp/info")).json()
        assert list(info) == [
            "username", "host", "port", "volume_path", "created_at", "updated_at"
        ]  # fmt: skip
        assert "password" not in str(info) and created["password"] not in str(info)
        # only a slow salted hash is stored
        rows = await node.agent.store.execute("SELECT password_hash FROM sftp_credentials")
        assert rows[0]["password_hash"].startswith("scrypt$16384$8$1$")
        assert created["password"] not in rows[0]["password_hash"]

        result = await openssh(port, internal_id, created["password"], "ls\n", tmp_path)
        assert result.returncode == 0, result.stderr.decode()
        assert b"server.properties" in result.stdout

        # replacing them: the old password stops working, its sessions end
        async with sftp_client(port, internal_id, created["password"]) as old_session:
            response = await api.post(
                f"/containers/{internal_id}/sftp/credentials",
                json={"username": "alice", "password": "correct horse battery"},
            )
            assert response.status_code == 200, response.text
            await old_session.wait_closed()
        assert await login_fails(port, internal_id, created["password"])
        async with sftp_client(port, "alice", "correct horse battery") as client:
            assert "server.properties" in await client.call(lambda s: s.listdir("/"))
        assert (await api.get(f"/containers/{internal_id}/sftp/info")).json()["username"] == (
            "alice"
        )
        # a bad body names the field
        response = await api.post(
            f"/containers/{internal_id}/sftp/credentials", json={"password": "short"}
        )
        assert response.status_code == 400 and "password" in response.json()["error"]

        # deleting them ends their sessions
        async with sftp_client(port, "alice", "correct horse battery") as session:
            response = await api.delete(f"/containers/{internal_id}/sftp/credentials")
            assert response.status_code == 200, response.text
            await session.wait_closed()
        assert await login_fails(port, "alice", "correct horse battery")
        response = await api.delete(f"/containers/{internal_id}/sftp/credentials")
        assert response.status_code == 404

        # credentials of one container never reach another's volume
        other = f"{prefix}-other"
        assert (await create(api, other)).status_code == 200
        response = await api.post(
            f"/containers/{internal_id}/sftp/credentials",
            json={"username": "bob", "password": "bob's password"},
        )
        assert response.status_code == 200
        response = await api.post(
            f"/containers/{other}/sftp/credentials",
            json={"username": "bob", "password": "another password"},
        )
        assert response.status_code == 409
        assert await login_fails(port, other, "bob's password")
        assert await login_fails(port, f"vol.{volume_id}", "bob's password")

        # a restricted token may not read credentials of a container outside its scope
        scoped = (await api.post("/auth/tokens", json={"ttl": "1h", "containers": [other]})).json()[
            "token"
        ]
        async with node.client(scoped) as restricted:
            response = await restricted.get(f"/containers/{internal_id}/sftp/info")
            assert response.status_code == 401

        # deleting the container deletes its credentials
        response = await api.delete(f"/containers/{internal_id}")
        assert response.status_code == 200, response.text
        assert internal_id not in node.agent.stash[SFTP].credentials
        assert await login_fails(port, "bob", "bob's password")
