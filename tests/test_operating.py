"""Contract §18 and the install path: ``lightd diagnostics``, ``lightd config check``, the
systemd unit, scripts/run.sh's engine socket, and the operator docs' JSON examples."""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from lightd.config import new_token

from .conftest import MADE, MASTER, ROOT, StartAgent, api_client, wait_for
from .test_cli import lightd

UNIT = ROOT / "contrib" / "lightd.service"
TEST_IMAGE = "lightd/busybox:latest"
#: Anything shaped like an agent token (the redacted form ``lightd_***`` is not).
TOKEN_SHAPE = re.compile(r"lightd_[0-9A-Za-z_-]{8,}")


def secretive_config(make_config: Callable[..., Path]) -> tuple[Path, list[str]]:
    """A config holding every kind of secret the report must never show."""
    remote_token = new_token()
    password = "hunter2-s3cret-pw"
    path = make_config(
        {
            "remote": {
                "enabled": True,
                "url": f"https://node7:{password}@panel.example.com:8443/api?key=abc123def",
                "token": remote_token,
            },
            "custom": {"api_key": "plain-api-key-value", "nested": {"password": password}},
        }
    )
    return path, [MASTER, remote_token, password, "plain-api-key-value", "abc123def"]


def assert_no_secret(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text
    assert TOKEN_SHAPE.findall(text) == []


# --- diagnostics -----------------------------------------------------------------------


def test_diagnostics_against_the_real_engine(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    path, secrets = secretive_config(make_config)
    storage = path.parent / "storage"
    (storage / "logs").mkdir(parents=True)
    # A recent-errors file as the agent writes it, with a token that slipped into a line.
    (storage / "logs" / "errors.jsonl").write_text(
        json.dumps({"level": "ERROR", "message": f"panel refused {secrets[1]}"})
        + "\n"
        + json.dumps({"level": "WARNING", "message": "disk almost full"})
        + "\n"
    )
    env = {"DOCKER_HOST": docker_host}
    result = lightd("--config", str(path), "diagnostics", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result.stdout + result.stderr, secrets)
    report = json.loads(result.stdout)

    assert report["versions"]["lightd"]
    assert report["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert report["versions"]["libraries"]["trio"]
    docker = report["docker"]
    assert docker["reachable"] is True, docker
    assert docker["source"] == "DOCKER_HOST" and docker["url"] == docker_host
    assert docker["version"] and re.fullmatch(r"\d+\.\d+", docker["api_version"])
    assert docker["storage_driver"] and docker["cgroup_version"] in ("1", "2")
    config = report["config"]["effective"]
    assert config["authorization"]["token"] == "lightd_***"
    assert config["remote"]["token"] == "lightd_***"
    assert config["server"]["graceful_timeout"] == 0.5  # the file's values, typed
    assert config["volumes"]["workers"] >= 1  # plugin sections with their defaults
    storage_report = report["storage"]
    assert storage_report["config_file"]["mode"] == oct(path.stat().st_mode & 0o777)
    assert storage_report["base_path"]["exists"] is True
    assert storage_report["volumes_path"]["exists"] is False
    assert storage_report["base_path"]["free_bytes"] > 0
    assert storage_report["base_path"]["owner"]
    assert report["remote"] == {
        "enabled": True,
        "panel_host": "panel.example.com:8443",
        "token_set": True,
        "outbox_depth": None,
    }
    assert {"system", "tokens", "containers", "remote_sync"} <= {
        p["name"] for p in report["plugins"]
    }
    firewall = report["firewall"]
    assert firewall["api_guard"]["chain"] == "LIGHTD-API"
    assert firewall["port_pool"]["chain"] == "LIGHTD-FW"  # the firewall plugin's chain
    assert firewall["port_pool"]["managed"] is False
    for chain in firewall.values():
        assert chain["state"] in ("present", "missing", "not available")
    messages = [e["message"] for e in report["recent_errors"]["entries"]]
    assert messages[1] == "disk almost full" and messages[0].startswith("panel refused ")

    text = lightd("--config", str(path), "diagnostics", env=env)
    assert text.returncode == 0, text.stderr
    assert_no_secret(text.stdout + text.stderr, secrets)
    for words in (
        "Versions",
        "Docker engine",
        "reachable:         yes",
        f"API version:       {docker['api_version']}",
        "storage driver",
        "Storage",
        "Firewall",
        "LIGHTD-API",
        "Remote sync",
        "panel.example.com:8443",
        "Plugins",
        "disk almost full",
        '"token": "lightd_***"',
    ):
        assert words in text.stdout


def test_diagnostics_with_the_engine_unreachable(
    make_config: Callable[..., Path], tmp_path: Path
) -> None:
    path, secrets = secretive_config(make_config)
    gone = f"unix://{tmp_path}/no-engine.sock"
    result = lightd("--config", str(path), "--json", "diagnostics", env={"DOCKER_HOST": gone})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["docker"]["reachable"] is False
    assert report["docker"]["url"] == gone and report["docker"]["error"]
    assert report["recent_errors"]["entries"] == []
    assert_no_secret(result.stdout + result.stderr, secrets)
    text = lightd("--config", str(path), "diagnostics", env={"DOCKER_HOST": gone})
    assert "reachable:         no (" in text.stdout
    assert "Traceback" not in text.stderr


def test_diagnostics_uses_the_config_socket_without_docker_host(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    if not docker_host.startswith("unix://"):
        pytest.skip("the engine is not on a unix socket")
    path = make_config({"docker": {"socket_path": docker_host.removeprefix("unix://")}})
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    result = subprocess.run(
        [sys.executable, "-m", "lightd", "--config", str(path), "--json", "diagnostics"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    docker = json.loads(result.stdout)["docker"]
    assert docker["reachable"] is True and docker["source"] == "docker.socket_path"


def test_diagnostics_on_an_invalid_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"authorization": {"token": "' + MASTER + '"}, "server": {"port": "x"}}')
    result = lightd("--config", str(path), "diagnostics")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lightd: invalid config {path}: server.port: must be an integer"
    ]
    assert MASTER not in result.stdout + result.stderr


# --- config check ----------------------------------------------------------------------


def test_config_check_lists_every_error_and_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    raw: dict[str, Any] = {
        "authorization": {"token": "short"},
        "server": {"port": "8070", "max_body_bytes": 5, "colour": "blue"},
        "docker": {"timeout": -1, "network": "no spaces allowed"},
        "log": {"level": "loud", "format": "xml"},
        "remote": {"enabled": "yes", "url": 3, "extra": 1},
        "network": {"manage_firewall": "yes"},
        "_note": "mine",
    }
    path.write_text(json.dumps(raw))
    before = path.read_text()
    result = lightd("config", "check", str(path))
    assert result.returncode == 1
    errors = [line for line in result.stdout.splitlines() if line.startswith("error: ")]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert errors == [
        "error: server.port: must be an integer",
        "error: server.max_body_bytes: must be >= 1024",
        "error: authorization.token: must start with lightd_ and be at least 20 characters",
        "error: docker.timeout: must be > 0",
        "error: docker.network: must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric",
        "error: log.level: must be one of debug, info, warning, error",
        "error: log.format: must be text or json",
        "error: remote.enabled: must be true or false",
        "error: remote.url: must be a string",
        "error: network.manage_firewall: must be true or false",
    ]
    assert sorted(warnings) == [
        "warning: _note: unknown key (ignored)",
        "warning: remote.extra: unknown key (ignored)",
        "warning: server.colour: unknown key (ignored)",
    ]
    assert result.stdout.splitlines()[-1] == f"{path}: invalid (10 error(s), 3 warning(s))"
    assert path.read_text() == before  # never rewritten

    as_json = lightd("--json", "config", "check", str(path))
    assert as_json.returncode == 1
    shown = json.loads(as_json.stdout)
    assert len(shown["errors"]) == 10 and len(shown["warnings"]) == 3


def test_config_check_warnings_alone_pass(config_path: Path) -> None:
    raw = json.loads(config_path.read_text())
    raw["sever"] = {"port": 1}  # a typo: the agent would ignore it
    config_path.write_text(json.dumps(raw))
    result = lightd("--config", str(config_path), "config", "check")
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines() == [
        "warning: sever: unknown key (ignored)",
        f"{config_path}: valid (0 error(s), 1 warning(s))",
    ]


def test_config_check_of_a_valid_file(config_path: Path) -> None:
    result = lightd("config", "check", env={"LIGHTD_CONFIG": str(config_path)})
    assert result.returncode == 0
    assert result.stdout == f"{config_path}: valid (0 error(s), 0 warning(s))\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "error: the file does not exist"),
        ("{not json", "error: not valid JSON (line 1, column 2"),
        ("[1]", "error: the file must hold a JSON object"),
        ('{"server": {}}', "error: authorization: is required"),
    ],
)
def test_config_check_of_an_unusable_file(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    result = lightd("config", "check", str(path), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout.startswith(message)
    assert "Traceback" not in result.stderr
    assert path.exists() == (content is not None)  # never creates the file


def test_config_check_loads_the_tls_pair(config_path: Path) -> None:
    raw = json.loads(config_path.read_text())
    raw["server"]["tls"] = {"cert": "missing.pem", "key": "missing-key.pem"}
    config_path.write_text(json.dumps(raw))
    result = lightd("config", "check", str(config_path))
    assert result.returncode == 1
    assert result.stdout.startswith("error: server.tls: cannot load the certificate and key")


def test_config_check_honours_disabled_plugins(config_path: Path) -> None:
    raw = json.loads(config_path.read_text())
    raw["plugins"] = {"disabled": ["remote_sync"]}
    raw["remote"] = {"enabled": "not a bool"}
    config_path.write_text(json.dumps(raw))
    result = lightd("config", "check", str(config_path))
    # The remote_sync plugin is off: its section is read by nobody.
    assert result.returncode == 0, result.stdout
    assert "warning: remote: unknown key (ignored)" in result.stdout


# --- --servers from another shell ------------------------------------------------------


async def test_servers_in_another_shell_finds_the_agents_engine(
    start_agent: StartAgent, make_config: Callable[..., Path], docker_host: str
) -> None:
    """The agent runs with the engine in its config (as scripts/run.sh writes it); a shell
    without DOCKER_HOST sees each server's real state."""
    if not docker_host.startswith("unix://"):
        pytest.skip("the engine is not on a unix socket")
    path = make_config(
        {
            "docker": {"socket_path": docker_host.removeprefix("unix://")},
            "containers": {"stop_timeout": 5, "install_timeout": 60},
        }
    )
    running = await start_agent(path, environ={})
    internal_id = f"{MADE.new_prefix()}cli"
    async with api_client(running.url) as api:
        volume = (await api.post("/volumes")).json()["volume_id"]
        created = await api.post(
            "/containers",
            json={
                "internal_id": internal_id,
                "image": TEST_IMAGE,
                "volume_id": volume,
                "startup_command": "echo ready; sleep 3600",
            },
        )
        assert created.status_code == 200, created.text

        async def state_is(wanted: str, field: str) -> bool:
            response = await api.get(f"/containers/{internal_id}")
            return bool(response.json().get(field) == wanted)

        try:
            await wait_for(lambda: state_is("ready", "install_state"), within=60, what="install")
            assert (await api.post(f"/containers/{internal_id}/start")).status_code == 200
            await wait_for(lambda: state_is("running", "state"), within=30, what="running")
            env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
            result = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "lightd", "--config", str(path), "--servers", "--json"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=env,
                    check=False,
                )
            )
            assert result.returncode == 0, result.stderr
            listed = json.loads(result.stdout)
            assert listed["total"] == 1 and listed["page"] is None
            (server,) = listed["servers"]
            assert server["internal_id"] == internal_id
            assert server["state"] == "running" and server["install_state"] == "ready"
            assert server["image"] == TEST_IMAGE
            table = await trio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "lightd", "--config", str(path), "--servers"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env=env,
                    check=False,
                )
            )
            assert re.search(rf"^{internal_id}\s+running\s", table.stdout, re.M), table.stdout
        finally:
            await api.post(f"/containers/{internal_id}/kill")
            await api.delete(f"/containers/{internal_id}")


def test_run_sh_records_the_private_engine_in_the_config(
    make_config: Callable[..., Path], docker_host: str
) -> None:
    """scripts/run.sh writes the engine it found into docker.socket_path (while it is still
    the default), so `lightd --servers` in a shell without DOCKER_HOST asks the same one."""
    if not docker_host.startswith("unix://") or docker_host == "unix:///var/run/docker.sock":
        pytest.skip("the engine is the system one: nothing to record")
    declared = (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    stamp = ROOT / ".venv" / ".lightd-deps"
    if not stamp.exists() or stamp.read_text().strip() != hashlib.sha256(declared).hexdigest():
        pytest.skip("run.sh would reinstall .venv first (its stamp is stale): run bootstrap.sh")
    path = make_config({"docker": {"socket_path": "/var/run/docker.sock"}})
    proc = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run.sh")],
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LIGHTD_CONFIG": str(path), "LIGHTD_NO_PANEL": "1"},
        start_new_session=True,
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 300
        seen = ""
        while "listening on" not in seen and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            seen += line
        assert "listening on" in seen, seen
        assert "docker.socket_path" in seen
        written = json.loads(path.read_text())
        assert written["docker"]["socket_path"] == docker_host.removeprefix("unix://")
        assert written["docker"]["network"]  # every other key kept
        assert written["authorization"]["token"] == MASTER
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- the systemd unit ------------------------------------------------------------------


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_has_what_a_node_needs() -> None:
    unit = _unit()
    assert unit["Unit"]["Requires"] == "docker.service"
    assert set(unit["Unit"]["After"].split()) == {"docker.service", "network-online.target"}
    assert unit["Unit"]["Wants"] == "network-online.target"
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"] == "/usr/local/bin/lightd --config /etc/lightd/config.json"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "full"  # not strict: /var/lib/lightd stays writable
    assert {"-/var/lib/lightd", "-/etc/lightd"} <= set(service["ReadWritePaths"].split())
    assert "AF_NETLINK" in service["RestrictAddressFamilies"]  # iptables-nft speaks netlink
    assert "AF_UNIX" in service["RestrictAddressFamilies"]  # the Docker socket
    # Directives that would break the agent: no user switch, no capability bound.
    for breaking in ("User", "DynamicUser", "CapabilityBoundingSet", "ProtectHome"):
        assert breaking not in service
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (the configparser test still ran)")
    # verify checks ExecStart's program exists: point it at this checkout's lightd.
    here = Path(sys.executable).with_name("lightd")
    unit = tmp_path / "lightd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/lightd", str(here)))
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    ours = [line for line in result.stderr.splitlines() if "lightd.service" in line]
    assert result.returncode == 0, result.stderr
    assert ours == []  # no unknown key, no bad value


# --- docs ------------------------------------------------------------------------------


@pytest.mark.parametrize("page", ["README.md", "docs/operating.md"])
def test_every_json_block_parses_as_copied(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = re.findall(r"^```json\n(.*?)^```", text, re.S | re.M)
    assert blocks, f"{page} has no ```json block"
    for block in blocks:
        try:
            json.loads(block)
        except ValueError as exc:
            pytest.fail(f"{page}: a ```json block does not parse ({exc}):\n{block}")


def test_operating_guide_covers_the_operator_topics() -> None:
    text = (ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    for words in (
        "pipx install",
        "/etc/lightd/config.json",
        "/var/lib/lightd",
        "contrib/lightd.service",
        "systemctl reload lightd",
        "server.tls",
        "sqlite3",
        ".backup",
        "LIGHTD-API",
        "manage_firewall",
        "journalctl",
        "--log-format json",
        "log.access",
        "/health/live",
        "/health/ready",
        "/metrics",
        "metrics.public",
        "lightd diagnostics",
        "lightd config check",
        "SIGHUP",
        "LIGHTD_LOG_LEVEL",
    ):
        assert words in text, words
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/operating.md" in readme
    assert "pipx install" in readme
    assert "docker-engine.sh --stop" in readme and "/var/lib/lightd-docker" in readme
