"""Contract §2.2 and §3: the ``lightd`` command, run as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

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
    for words in ("--config", "--token", "what", "reset", "set", "--dev", "LIGHTD_CONFIG", "8070"):
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


def test_first_run_creates_the_config(tmp_path: Path) -> None:
    result = lightd("--token", "what", cwd=tmp_path)
    created = tmp_path / "config.json"
    assert result.returncode == 0
    assert f"created {created}" in result.stderr
    assert stat.S_IMODE(created.stat().st_mode) == 0o600
    token = json.loads(created.read_text())["authorization"]["token"]
    assert result.stdout == f"Current Token: {token}\n"


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
