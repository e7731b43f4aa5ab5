"""Contract §2.2 and §3: the ``lightd`` command, run as a real subprocess."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from lightd.cli import log_settings

from .conftest import MASTER, ROOT


def lightd(
    *args: str, stdin: str = "", cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightd", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_help_explains_the_command() -> None:
    result = lightd("--help")
    assert result.returncode == 0
    for words in (
        *("--config", "--token", "what", "reset", "set", "--dev", "LIGHTD_CONFIG", "8070"),
        *("--log-level", "--log-format", "LIGHTD_LOG_LEVEL", "diagnostics", "config check"),
        *("--json", "SIGHUP"),
    ):
        assert words in result.stdout


def test_token_what(config_path: Path) -> None:
    result = lightd("--config", str(config_path), "--token", "what")
    assert result.returncode == 0
    assert result.stdout == f"Current Token: {MASTER}\n"


def test_token_reset_writes_a_new_token_and_keeps_other_keys(config_path: Path) -> None:
    raw = json.loads(config_path.read_text())
    raw["_note"] = "mine"
    raw["server"]["x"] = 1
    config_path.write_text(json.dumps(raw))
    result = lightd("--config", str(config_path), "--token", "reset")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "✓ Token reset successfully!"
    token = re.fullmatch(r"New Token: (lightd_[0-9a-f]{32})", lines[1])
    assert token
    written = json.loads(config_path.read_text())
    assert written["authorization"]["token"] == token[1]
    assert written["_note"] == "mine" and written["server"]["x"] == 1
    assert stat.S_IMODE(config_path.stat().st_mode) == 0o600


def test_token_set_reads_one_line(config_path: Path) -> None:
    new = "lightd_my-own-token-0001"
    result = lightd("--config", str(config_path), "--token", "set", stdin=new + "\nignored\n")
    assert result.returncode == 0, result.stderr
    assert "✓ Token set successfully!" in result.stdout
    assert json.loads(config_path.read_text())["authorization"]["token"] == new


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("token_without_prefix_123", "Error: Token must start with 'lightd_'"),
        ("lightd_short", "Error: Token too short (minimum 20 characters)"),
        ("", "Error: Token must start with 'lightd_'"),
        ("lightd_has a space inside", "Error: Token may contain only printable ASCII"),
    ],
)
def test_token_set_rejects_bad_tokens(config_path: Path, line: str, message: str) -> None:
    before = config_path.read_text()
    result = lightd("--config", str(config_path), "--token", "set", stdin=line + "\n")
    assert result.returncode == 1
    assert message in result.stderr
    assert config_path.read_text() == before


def test_first_run_creates_the_config_with_token_reset(tmp_path: Path) -> None:
    result = lightd("--token", "reset", cwd=tmp_path)
    created = tmp_path / "config.json"
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(created.stat().st_mode) == 0o600
    token = json.loads(created.read_text())["authorization"]["token"]
    assert result.stdout.splitlines()[1] == f"New Token: {token}"


def test_token_set_creates_a_missing_config_with_that_token(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.json"
    new = "lightd_my-own-token-0002"
    result = lightd("--config", str(path), "--token", "set", stdin=new + "\n")
    assert result.returncode == 0, result.stderr
    assert f"created {path}" in result.stderr
    assert json.loads(path.read_text())["authorization"]["token"] == new


def test_token_set_refuses_a_bad_token_without_creating_the_config(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    result = lightd("--config", str(path), "--token", "set", stdin="nope\n")
    assert result.returncode == 1
    assert not path.exists()


@pytest.mark.parametrize(
    "command",
    [
        ("--token", "what"),
        ("--servers",),
        ("--servers", "--json"),
        ("diagnostics",),
        ("diagnostics", "--json"),
    ],
)
def test_other_commands_never_create_a_missing_config(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """A typo in --config must not print a fresh token the agent does not use."""
    typo = tmp_path / "confg.json"
    result = lightd("--config", str(typo), *command, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"lightd: config file {typo} does not exist (serving or --token reset creates it)"
    ]
    assert not typo.exists() and not (tmp_path / "config.json").exists()
    assert "lightd_" not in result.stderr


def test_token_set_prompts_on_the_terminal_without_echo(config_path: Path) -> None:
    """On a TTY the token is read with getpass: the prompt goes to stderr, what is typed
    is not echoed back, and stdout carries only the result."""
    master, slave = pty.openpty()

    def take_terminal() -> None:  # after setsid: the pty becomes the controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "lightd", "--config", str(config_path), "--token", "set"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=take_terminal,
        cwd=ROOT,
    )
    os.close(slave)
    new = "lightd_typed-on-a-terminal-01"
    echoed = b""
    try:
        # Type only once getpass has turned the terminal's echo off (as a person would,
        # after the prompt); the master side reads the terminal's settings.
        deadline = time.monotonic() + 30
        while termios.tcgetattr(master)[3] & termios.ECHO:
            assert time.monotonic() < deadline, "getpass never turned echo off"
            time.sleep(0.01)
        os.write(master, new.encode() + b"\n")
        stdout, stderr = proc.communicate(timeout=30)
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while select.select([master], [], [], 0.2)[0]:
                chunk = os.read(master, 1024)
                if not chunk:
                    break
                echoed += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert proc.returncode == 0, stderr
    assert new.encode() not in echoed  # no echo on the terminal
    assert b"Enter the new token" in stderr and new.encode() not in stderr
    assert stdout.decode().strip() == "✓ Token set successfully!"
    assert json.loads(config_path.read_text())["authorization"]["token"] == new


def test_token_set_from_a_pipe_prompts_on_stderr(config_path: Path) -> None:
    new = "lightd_my-own-token-0003"
    result = lightd("--config", str(config_path), "--token", "set", stdin=new + "\n")
    assert result.returncode == 0
    assert "Enter the new token" in result.stderr
    assert "Enter the new token" not in result.stdout
    assert new not in result.stdout + result.stderr


def test_servers_json_on_an_empty_node(config_path: Path) -> None:
    result = lightd("--config", str(config_path), "--servers", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"total": 0, "page": None, "pages": 1, "servers": []}
    text = lightd("--config", str(config_path), "--servers")
    assert text.stdout == "No containers on this node.\n"


class _Args(argparse.Namespace):
    log_level: str | None = None
    log_format: str | None = None
    dev: bool = False


@pytest.mark.parametrize(
    ("flags", "env", "section", "wanted"),
    [
        ({}, {}, {}, ("info", "text")),
        ({}, {}, {"level": "warning", "format": "json"}, ("warning", "json")),
        ({}, {"LIGHTD_LOG_LEVEL": "ERROR"}, {"level": "warning"}, ("error", "text")),
        ({"dev": True}, {"LIGHTD_LOG_LEVEL": "error"}, {"level": "warning"}, ("debug", "text")),
        (
            {"log_level": "warning", "dev": True, "log_format": "json"},
            {"LIGHTD_LOG_LEVEL": "error"},
            {"level": "info", "format": "text"},
            ("warning", "json"),
        ),
        ({}, {}, {"level": "loud"}, ("info", "text")),  # the config check reports it
    ],
)
def test_log_settings_precedence(
    flags: dict[str, object],
    env: dict[str, str],
    section: dict[str, str],
    wanted: tuple[str, str],
) -> None:
    """A flag wins, then --dev, then $LIGHTD_LOG_LEVEL, then config log, then the default."""
    args = _Args(**flags)
    assert log_settings(args, {"log": section}, env) == wanted


def test_a_bad_log_level_in_the_environment_is_one_line(config_path: Path) -> None:
    result = lightd(
        "--config", str(config_path), "--token", "what", env={"LIGHTD_LOG_LEVEL": "loud"}
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lightd: invalid config {config_path}: LIGHTD_LOG_LEVEL: must be one of debug, info,"
        " warning, error"
    ]


def test_log_flags_are_validated() -> None:
    result = lightd("--log-level", "loud")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_serves_with_json_logs_at_the_configured_level(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    """--log-format json: every stderr line is one JSON object; config log.level applies
    (debug lines appear only because the config asks for them)."""
    path = make_config({"log": {"level": "debug"}})
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightd", "--config", str(path), "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DOCKER_HOST": docker_host, "LIGHTD_LOG_LEVEL": ""},
    )
    lines: list[dict[str, object]] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(json.loads(line))
            if "listening on" in str(lines[-1].get("message")):
                break
        assert any("listening on" in str(entry.get("message")) for entry in lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        lines += [json.loads(line) for line in proc.stderr.read().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(entry["level"] in ("debug", "DEBUG") for entry in lines)
    assert MASTER not in json.dumps(lines)


def test_config_from_environment(config_path: Path, tmp_path: Path) -> None:
    result = lightd("--token", "what", cwd=tmp_path, env={"LIGHTD_CONFIG": str(config_path)})
    assert result.stdout == f"Current Token: {MASTER}\n"
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"authorization": {"token": "' + MASTER + '"}, "server": {"port": -1}}',
            "server.port: must be 0 to 65535",
        ),
        ("{not json", "not valid JSON"),
        ('{"server": {}}', "authorization: is required"),
    ],
)
def test_invalid_config_is_one_line_and_exit_2(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(content)
    result = lightd("--config", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0] == f"lightd: invalid config {path}: {message}" or message in lines[0]


def test_serves_and_stops_gracefully_on_sigterm(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    path = make_config()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightd", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DOCKER_HOST": docker_host},
    )
    try:
        url = None
        deadline = time.monotonic() + 30
        assert proc.stderr is not None
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if found := re.search(r"listening on (http://\S+)", line):
                url = found[1]
        assert url, "the agent never said where it listens"
        ping = httpx.get(f"{url}/api/v1/public/ping", timeout=10)
        assert ping.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        rest = proc.stderr.read()
        assert "stopping gracefully" in rest and "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
