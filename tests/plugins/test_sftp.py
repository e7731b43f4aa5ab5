"""SFTP (contract §19) with real clients: OpenSSH's ``sftp -b`` and asyncssh's client.

The agent runs with ``sftp.enabled`` on a free port; logins here use ``vol.<volume_id>``
(the container usernames and the credentials routes are in ``test_sftp_containers``).
The attack corpus plants links in the volume (as a container would) that point outside
it, and checks that nothing outside was read, listed, written, renamed into or changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
import trio
from lightd.plugins.sftp import SFTP
from lightd.testing import RunningAgent

from tests.conftest import MASTER, StartAgent, wait_for

SFTP_ON = {"sftp": {"enabled": True, "host": "127.0.0.1", "port": 0}}


def sftp_port(running: RunningAgent) -> int:
    return running.agent.stash[SFTP].port()


# --- OpenSSH's sftp in batch mode ---------------------------------------------------------


def _askpass(folder: Path) -> Path:
    script = folder / "askpass.sh"
    if not script.exists():
        script.write_text('#!/bin/sh\nprintf "%s\\n" "$LIGHTD_SFTP_PASSWORD"\n')
        script.chmod(0o700)
    return script


async def openssh(
    port: int, username: str, password: str, commands: str, folder: Path
) -> subprocess.CompletedProcess[bytes]:
    """Run ``sftp -b`` (OpenSSH) with ``commands``; the password goes through
    ``SSH_ASKPASS`` (batch mode otherwise allows no password)."""
    assert shutil.which("sftp"), "OpenSSH's sftp client is needed (apt-get install openssh-client)"
    batch = folder / "batch.txt"
    batch.write_text(commands)
    env = {
        **os.environ,
        "SSH_ASKPASS": str(_askpass(folder)),
        "SSH_ASKPASS_REQUIRE": "force",
        "DISPLAY": ":0",
        "LIGHTD_SFTP_PASSWORD": password,
    }
    argv = [
        "sftp",
        "-o", "BatchMode=no",  # before -b: the first value wins; a password is asked
        "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null",
        "-o", "PubkeyAuthentication=no",
        "-o", "NumberOfPasswordPrompts=1",
        "-o", "LogLevel=ERROR",
        "-P", str(port),
        "-b", str(batch),
        f"{username}@127.0.0.1",
    ]  # fmt: skip
    with trio.fail_after(60):
        return await trio.run_process(
            argv, env=env, cwd=folder, capture_stdout=True, capture_stderr=True, check=False,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


# --- asyncssh's client, in a thread with its own asyncio loop --------------------------------


class Client:
    """An asyncssh SFTP client on its own asyncio loop in a worker thread; ``call(fn)``
    runs ``await fn(sftp)`` there."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.port, self.username, self.password = port, username, password
        self._loop = asyncio.new_event_loop()
        self.conn: asyncssh.SSHClientConnection | None = None
        self.sftp: asyncssh.SFTPClient | None = None

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    async def connect(self) -> None:
        async def go() -> None:
            self.conn = await asyncssh.connect(
                "127.0.0.1",
                self.port,
                username=self.username,
                password=self.password,
                known_hosts=None,
                client_keys=None,
                agent_path=None,
                preferred_auth="password",
            )
            self.sftp = await self.conn.start_sftp_client()

        await trio.to_thread.run_sync(self._run, go())

    async def call(self, fn: Callable[[asyncssh.SFTPClient], Awaitable[Any]]) -> Any:
        assert self.sftp is not None
        sftp = self.sftp
        return await trio.to_thread.run_sync(self._run, fn(sftp))

    async def closed(self) -> bool:
        """Whether the server ended the connection."""
        assert self.conn is not None
        conn = self.conn

        async def probe() -> bool:
            await asyncio.sleep(0)
            return conn.is_closed()

        return bool(await trio.to_thread.run_sync(self._run, probe()))

    async def wait_closed(self, within: float = 10) -> None:
        assert self.conn is not None
        conn = self.conn

        async def wait() -> None:
            await asyncio.wait_for(conn.wait_closed(), within)

        await trio.to_thread.run_sync(self._run, wait())

    async def close(self) -> None:
        async def go() -> None:
            if self.conn is not None:
                self.conn.close()
                await self.conn.wait_closed()

        with contextlib.suppress(Exception):
            await trio.to_thread.run_sync(self._run, go())
        self._loop.close()


@contextlib.asynccontextmanager
async def sftp_client(port: int, username: str, password: str) -> AsyncIterator[Client]:
    client = Client(port, username, password)
    try:
        await client.connect()
        yield client
    finally:
        await client.close()


async def login_fails(port: int, username: str, password: str) -> bool:
    client = Client(port, username, password)
    try:
        await client.connect()
    except asyncssh.PermissionDenied:
        return True
    finally:
        await client.close()
    return False


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture
async def sftp_agent(start_agent: StartAgent, make_config: Callable[..., Path]) -> RunningAgent:
    return await start_agent(make_config(SFTP_ON))


@pytest.fixture
async def api(sftp_agent: RunningAgent) -> AsyncIterator[httpx.AsyncClient]:
    async with sftp_agent.client() as client:
        yield client


async def new_volume(api: httpx.AsyncClient) -> tuple[str, Path]:
    response = await api.post("/volumes")
    assert response.status_code == 201, response.text
    return response.json()["volume_id"], Path(response.json()["path"])


@pytest.fixture
async def volume(api: httpx.AsyncClient) -> tuple[str, Path]:
    return await new_volume(api)


# --- tests ----------------------------------------------------------------------------------


async def test_host_key_made_once_and_kept(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    path = make_config(SFTP_ON)
    served = []
    for _ in range(2):
        running = await start_agent(path)
        key_file = running.agent.paths.base / "sftp" / "host_ed25519_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        port = sftp_port(running)
        scan = await trio.run_process(
            ["ssh-keyscan", "-t", "ed25519", "-p", str(port), "127.0.0.1"],
            capture_stdout=True,
            capture_stderr=True,
        )
        served.append(scan.stdout.split()[-1])
        public = asyncssh.read_private_key(str(key_file)).export_public_key().split()[1]
        assert served[-1] == public
        await running.stop()
    assert served[0] == served[1]  # the same key after a restart


async def test_openssh_batch_session(
    sftp_agent: RunningAgent, volume: tuple[str, Path], tmp_path: Path
) -> None:
    volume_id, folder = volume
    (tmp_path / "up.bin").write_bytes(os.urandom(300_000))
    (folder / "existing.txt").write_text("hello from the volume\n")
    commands = "\n".join(
        [
            "put up.bin",
            "mkdir sub",
            "put up.bin sub/copy.bin",
            "rename sub/copy.bin sub/moved.bin",
            "get existing.txt got.txt",
            "chmod 640 up.bin",
            "symlink up.bin link.bin",
            "ls -l",
            "mkdir gone",
            "rmdir gone",
            "rm sub/moved.bin",
            "cd ..",
            "pwd",
        ]
    )
    result = await openssh(sftp_port(sftp_agent), f"vol.{volume_id}", MASTER, commands, tmp_path)
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
    assert (folder / "up.bin").read_bytes() == (tmp_path / "up.bin").read_bytes()
    assert stat.S_IMODE((folder / "up.bin").stat().st_mode) == 0o640
    assert (tmp_path / "got.txt").read_text() == "hello from the volume\n"
    assert (folder / "sub").is_dir() and not (folder / "sub" / "moved.bin").exists()
    assert os.readlink(folder / "link.bin") == "up.bin"
    assert not (folder / "gone").exists()
    assert b"Remote working directory: /" in result.stdout


async def test_logins(
    sftp_agent: RunningAgent,
    api: httpx.AsyncClient,
    volume: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    volume_id, folder = volume
    other_id, _ = await new_volume(api)
    port = sftp_port(sftp_agent)
    (folder / "a.txt").write_text("a")

    async def mint(**body: Any) -> dict[str, Any]:
        response = await api.post("/auth/tokens", json={"ttl": "1h", **body})
        assert response.status_code == 200, response.text
        return dict(response.json())

    files = await mint(volumes=[volume_id], permissions=["files"])
    async with sftp_client(port, f"vol.{volume_id}", files["token"]) as client:
        assert await client.call(lambda s: s.listdir("/")) == [".", "a.txt"]
    no_files = await mint(volumes=[volume_id], permissions=["read", "manage"])
    elsewhere = await mint(volumes=[other_id], permissions=["files"])
    single = await mint(volumes=[volume_id], permissions=["files"], remove_on_use=True)
    async with sftp_client(port, f"vol.{volume_id}", single["token"]):
        pass
    caplog.set_level(logging.WARNING, logger="lightd.plugins.sftp")
    for username, password in [
        (f"vol.{volume_id}", no_files["token"]),
        (f"vol.{volume_id}", elsewhere["token"]),
        (f"vol.{volume_id}", single["token"]),  # spent
        (f"vol.{volume_id}", "lightd_" + "f" * 32),
    ]:
        assert await login_fails(port, username, password)
    assert "failed login of 'vol." in caplog.text
    for secret in (no_files["token"], elsewhere["token"], "f" * 32):
        assert secret not in caplog.text
    # Five failures from this address in a minute: even the right password is refused now.
    assert await login_fails(port, f"vol.{volume_id}", "wrong-password")
    assert await login_fails(port, f"vol.{volume_id}", MASTER)
    assert "too many failures" in caplog.text
    assert MASTER not in caplog.text


async def test_no_shell_exec_or_forwarding(
    sftp_agent: RunningAgent, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume

    def go(port: int) -> list[str]:
        async def inner() -> list[str]:
            refused = []
            async with asyncssh.connect(
                "127.0.0.1", port, username=f"vol.{volume_id}", password=MASTER,
                known_hosts=None, client_keys=None, agent_path=None,
            ) as conn:  # fmt: skip
                try:
                    result = await conn.run("id", check=False)
                    refused.append(f"exec ran: {result.exit_status}")
                except asyncssh.ChannelOpenError as exc:
                    refused.append(type(exc).__name__)
                try:
                    await conn.forward_local_port("127.0.0.1", 0, "127.0.0.1", 22)
                    listener = await conn.create_connection(asyncssh.SSHTCPSession, "127.0.0.1", 9)
                    refused.append(f"forward opened: {listener}")
                except (asyncssh.ChannelOpenError, OSError) as exc:
                    refused.append(type(exc).__name__)
            return refused

        return asyncio.run(inner())

    refused = await trio.to_thread.run_sync(go, sftp_port(sftp_agent))
    assert all("ran" not in r and "opened" not in r for r in refused), refused


async def test_attack_corpus(
    sftp_agent: RunningAgent, volume: tuple[str, Path], tmp_path: Path
) -> None:
    """Links planted by the container, ``..``, absolute paths, a rename across a swapped
    link, setstat with setuid, FIFOs: nothing outside the volume is touched."""
    volume_id, folder = volume
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("host secret")
    os.chmod(outside / "secret.txt", 0o600)
    before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in outside.iterdir()}
    # What a container plants in its volume:
    (folder / "dir").mkdir()
    (folder / "inside.txt").write_text("inside")
    os.symlink(str(outside), folder / "abs_dir")  # absolute link to a host folder
    os.symlink(str(outside / "secret.txt"), folder / "abs_file")
    os.symlink("../" * 8 + str(outside).lstrip("/"), folder / "rel_dir")
    os.symlink("../../../../../../../../etc/passwd", folder / "dir" / "passwd")
    os.symlink("inside.txt", folder / "ok_link")  # stays inside: followed
    os.mkfifo(folder / "fifo")
    port = sftp_port(sftp_agent)

    async def refused(fn: Callable[[asyncssh.SFTPClient], Awaitable[Any]]) -> str:
        try:
            result = await client.call(fn)
        except asyncssh.SFTPError as exc:
            return exc.reason
        raise AssertionError(f"not refused: {result!r}")

    async with sftp_client(port, f"vol.{volume_id}", MASTER) as client:
        # reads through planted links
        for path in ("abs_file", "abs_dir/secret.txt", "rel_dir/secret.txt", "dir/passwd"):
            await refused(lambda s, p=path: s.open(p).__aenter__())
            await refused(lambda s, p=path: s.stat(p))
        for path in ("abs_dir", "rel_dir"):
            await refused(lambda s, p=path: s.listdir(p))
        # ``..`` and absolute paths stay in the volume (the session's / is the volume)
        assert await client.call(lambda s: s.realpath("../../..")) == "/"
        for path in ("../../../../etc/passwd", "/etc/passwd", "/../../etc/passwd"):
            await refused(lambda s, p=path: s.stat(p))
        async with contextlib.AsyncExitStack():
            data = await client.call(lambda s: _read(s, "/../../inside.txt"))
        assert data == b"inside"
        assert await client.call(lambda s: _read(s, "ok_link")) == b"inside"
        # writes through planted links
        for path in ("abs_dir/new.txt", "rel_dir/new.txt", "abs_file"):
            await refused(lambda s, p=path: _write(s, p, b"pwned"))
        await refused(lambda s: s.mkdir("abs_dir/made"))
        await refused(lambda s: s.remove("abs_dir/secret.txt"))
        await refused(lambda s: s.rename("inside.txt", "abs_dir/moved.txt"))
        # an absolute target is a session path: the volume's etc/passwd, stored relative
        await client.call(lambda s: s.symlink("/etc/passwd", "link_out"))
        assert os.readlink(folder / "link_out") == "etc/passwd"
        await refused(lambda s: s.symlink("../../../etc", "dir/link_out"))
        await refused(lambda s: s.chmod("abs_file", 0o777))
        await refused(lambda s: s.setstat("abs_dir", asyncssh.SFTPAttrs(permissions=0o777)))
        await refused(lambda s: s.chown("inside.txt", 0, 0))
        await refused(lambda s: s.link("abs_file", "hard"))
        # FIFOs are never opened (no hang)
        with trio.fail_after(10):
            await refused(lambda s: _read(s, "fifo"))
        # rename across a swapped link: a folder is swapped for a link to outside
        (folder / "swap").mkdir()
        await client.call(lambda s: _write(s, "swap/first.txt", b"1"))
        shutil.rmtree(folder / "swap")
        os.symlink(str(outside), folder / "swap")
        await refused(lambda s: s.rename("inside.txt", "swap/stolen.txt"))
        await refused(lambda s: _write(s, "swap/first.txt", b"2"))
        # setstat never sets setuid/setgid/sticky
        await client.call(lambda s: s.chmod("inside.txt", 0o6777))
        assert stat.S_IMODE((folder / "inside.txt").stat().st_mode) == 0o777
        await client.call(lambda s: s.chmod("dir", 0o3755))
        assert stat.S_IMODE((folder / "dir").stat().st_mode) == 0o755
        # a link with an absolute target inside the session is stored relative
        await client.call(lambda s: s.symlink("/inside.txt", "dir/abs_in"))
        assert os.readlink(folder / "dir" / "abs_in") == "../inside.txt"
        assert await client.call(lambda s: _read(s, "dir/abs_in")) == b"inside"
        # readlink shows the planted target as text only; listing shows links as links
        assert await client.call(lambda s: s.readlink("abs_file")) == str(outside / "secret.txt")
        names = await client.call(lambda s: s.listdir("/"))
        assert "abs_dir" in names and "secret.txt" not in names
        # the volume root itself cannot be removed or renamed
        await refused(lambda s: s.rmdir("/"))
        await refused(lambda s: s.rename("/", "x"))
    after = {p.name: (p.read_bytes(), p.stat().st_mode) for p in outside.iterdir()}
    assert after == before  # 0 escapes


async def _read(s: asyncssh.SFTPClient, path: str) -> bytes:
    async with s.open(path, "rb") as fh:
        return bytes(await fh.read())


async def _write(s: asyncssh.SFTPClient, path: str, data: bytes) -> None:
    async with s.open(path, "wb") as fh:
        await fh.write(data)


async def test_read_only(start_agent: StartAgent, make_config: Callable[..., Path]) -> None:
    running = await start_agent(make_config({"sftp": {**SFTP_ON["sftp"], "read_only": True}}))
    volume = await running.new_volume()
    folder = Path(volume.path)
    (folder / "a.txt").write_text("a")
    async with sftp_client(sftp_port(running), f"vol.{volume.id}", MASTER) as client:
        assert await client.call(lambda s: _read(s, "a.txt")) == b"a"
        for fn in (
            lambda s: _write(s, "b.txt", b"b"),
            lambda s: s.open("a.txt", "ab").__aenter__(),
            lambda s: s.mkdir("d"),
            lambda s: s.remove("a.txt"),
            lambda s: s.rename("a.txt", "c.txt"),
            lambda s: s.symlink("a.txt", "l"),
            lambda s: s.chmod("a.txt", 0o600),
        ):
            with pytest.raises(asyncssh.SFTPPermissionDenied):
                await client.call(fn)
    assert sorted(os.listdir(folder)) == ["a.txt"]
    assert (folder / "a.txt").read_text() == "a"


async def test_size_limit(
    sftp_agent: RunningAgent, api: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume
    response = await api.patch(f"/volumes/{volume_id}", json={"size_limit": 1 << 20})
    assert response.status_code == 200, response.text
    port = sftp_port(sftp_agent)
    async with sftp_client(port, f"vol.{volume_id}", MASTER) as client:
        await client.call(lambda s: _write(s, "small.bin", b"x" * 600_000))
        with pytest.raises(asyncssh.SFTPError) as info:
            await client.call(lambda s: _write(s, "big.bin", b"y" * 600_000))
        assert "quota" in info.value.reason.lower()
        with pytest.raises(asyncssh.SFTPError):
            await client.call(lambda s: s.truncate("small.bin", 5 << 20))
        # what was written stays (SFTP writes in place); once removed, the space is back,
        # and replacing a file counts its old bytes as freed at once
        await client.call(lambda s: s.remove("big.bin"))
        for _ in range(3):
            await client.call(lambda s: _write(s, "small.bin", b"z" * 600_000))
        await client.call(lambda s: _write(s, "other.bin", b"o" * 400_000))
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total <= 1 << 20


async def test_size_limit_across_files_of_a_session(
    sftp_agent: RunningAgent, api: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    """Files a session writes in quick succession share one budget (``fs.Lease``): each
    write is still charged before it is made, the limit holds across them, and their
    bytes count as the volume's usage once given back."""
    volume_id, folder = volume
    response = await api.patch(f"/volumes/{volume_id}", json={"size_limit": 1 << 20})
    assert response.status_code == 200, response.text
    port = sftp_port(sftp_agent)
    async with sftp_client(port, f"vol.{volume_id}", MASTER) as client:
        for i in range(3):
            await client.call(lambda s, i=i: _write(s, f"f{i}.bin", b"x" * 300_000))
        with pytest.raises(asyncssh.SFTPError) as info:
            await client.call(lambda s: _write(s, "f3.bin", b"y" * 300_000))
        assert "quota" in info.value.reason.lower()
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 1 << 20

    async def committed() -> bool:
        usage = (await api.get(f"/volumes/{volume_id}")).json()["usage"]
        return bool(usage["bytes"] >= 900_000)

    await wait_for(committed, what="the session's writes counted as usage")


async def test_revoked_and_expired_tokens_end_sessions(
    sftp_agent: RunningAgent, api: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume
    port = sftp_port(sftp_agent)
    response = await api.post("/auth/tokens", json={"ttl": "1h", "permissions": ["files"]})
    token = response.json()
    async with sftp_client(port, f"vol.{volume_id}", token["token"]) as client:
        await client.call(lambda s: s.listdir("/"))
        assert not await client.closed()
        response = await api.delete(f"/auth/tokens/{token['id']}")
        assert response.status_code == 200
        await client.wait_closed()
    assert await login_fails(port, f"vol.{volume_id}", token["token"])
    # by "revoke all" too
    response = await api.post("/auth/tokens", json={"ttl": "1h"})
    async with sftp_client(port, f"vol.{volume_id}", response.json()["token"]) as client:
        assert (await api.post("/auth/tokens/revoke", json={"all": True})).status_code == 200
        await client.wait_closed()
    # and at expiry
    response = await api.post("/auth/tokens", json={"ttl": "2s"})
    async with sftp_client(port, f"vol.{volume_id}", response.json()["token"]) as client:
        await client.wait_closed(within=15)
    # a master-token session ends when the master token changes
    async with sftp_client(port, f"vol.{volume_id}", MASTER) as client:
        import json

        path = sftp_agent.agent.config_path
        raw = json.loads(path.read_text())
        raw["authorization"]["token"] = "lightd_" + "1" * 32
        path.write_text(json.dumps(raw))
        await sftp_agent.agent.reload_config()
        await client.wait_closed()


async def test_volume_deleted_ends_sessions(
    sftp_agent: RunningAgent, api: httpx.AsyncClient, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume
    async with sftp_client(sftp_port(sftp_agent), f"vol.{volume_id}", MASTER) as client:
        assert (await api.delete(f"/volumes/{volume_id}")).status_code == 200
        await client.wait_closed()


async def test_a_silent_client_is_let_go(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    """A client that stops answering (gone behind a NAT, frozen) loses its session after
    3 unanswered asks, ``keepalive_interval`` apart; one that keeps talking keeps it."""
    running = await start_agent(
        make_config({"sftp": {**SFTP_ON["sftp"], "keepalive_interval": 0.5}})
    )
    async with running.client() as api:
        volume_id, _ = await new_volume(api)
    port, user = sftp_port(running), f"vol.{volume_id}"
    async with (
        sftp_client(port, user, MASTER) as talking,
        sftp_client(port, user, MASTER) as silent,
    ):
        # ``silent``'s loop runs only when called: until then it answers nothing.
        until = trio.current_time() + 4  # 0.5 s of silence, then 3 asks: about 2 s
        while trio.current_time() < until:
            assert await talking.call(lambda s: s.listdir("/")) is not None
            await trio.sleep(0.2)
        await silent.wait_closed(within=5)
        assert not await talking.closed()


async def test_shutdown_with_open_session(
    sftp_agent: RunningAgent, volume: tuple[str, Path]
) -> None:
    volume_id, _ = volume
    async with sftp_client(sftp_port(sftp_agent), f"vol.{volume_id}", MASTER) as client:
        with trio.fail_after(8):
            await sftp_agent.stop()
        await client.wait_closed()


async def test_append_and_writes_at_offsets(
    sftp_agent: RunningAgent, volume: tuple[str, Path]
) -> None:
    volume_id, folder = volume

    async def append(s: asyncssh.SFTPClient, data: bytes) -> None:
        async with s.open("log.txt", "ab") as fh:
            await fh.write(data)

    async def patch(s: asyncssh.SFTPClient) -> None:
        async with s.open("log.txt", "r+b") as fh:
            await fh.write(b"X", 1)

    async with sftp_client(sftp_port(sftp_agent), f"vol.{volume_id}", MASTER) as client:
        await client.call(lambda s: append(s, b"12"))
        await client.call(lambda s: append(s, b"34"))
        assert (folder / "log.txt").read_bytes() == b"1234"
        await client.call(patch)
        assert (folder / "log.txt").read_bytes() == b"1X34"
        attrs = await client.call(lambda s: s.stat("log.txt"))
        assert attrs.size == 4


def test_no_ignore_packets_and_no_cbc_cipher() -> None:
    """The server offers no CBC cipher, so asyncssh's empty ``SSH_MSG_IGNORE`` before
    every packet (a CBC countermeasure) is not sent; any other packet is."""
    from lightd.plugins.sftp.server import ENCRYPTION_ALGS, _skip_ignore_packets

    assert ENCRYPTION_ALGS
    assert not [alg for alg in ENCRYPTION_ALGS if "cbc" in alg]
    sent: list[tuple[int, tuple[bytes, ...]]] = []

    class Conn:
        def send_packet(self, pkttype: int, *args: bytes, handler: Any = None) -> None:
            sent.append((pkttype, args))

    conn: Any = Conn()
    _skip_ignore_packets(conn)
    conn.send_packet(asyncssh.MSG_IGNORE, b"\0\0\0\0")
    conn.send_packet(asyncssh.MSG_IGNORE, b"\0\0\0\1x")
    conn.send_packet(asyncssh.MSG_CHANNEL_DATA, b"data")
    assert sent == [
        (asyncssh.MSG_IGNORE, (b"\0\0\0\1x",)),
        (asyncssh.MSG_CHANNEL_DATA, (b"data",)),
    ]


async def test_asyncssh_debug_records_kept_when_debug_is_on(
    sftp_agent: RunningAgent, volume: tuple[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The debug formatting asyncssh skips with DEBUG off is still done with it on."""
    volume_id, folder = volume
    (folder / "a.txt").write_bytes(b"a")
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    async with sftp_client(sftp_port(sftp_agent), f"vol.{volume_id}", MASTER) as client:
        assert await client.call(lambda s: s.getsize("a.txt")) == 1
    messages = [record.getMessage() for record in caplog.records]
    assert [m for m in messages if "Received stat for a.txt" in m], messages[-20:]
