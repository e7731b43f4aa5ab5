"""Contract §3 and §9: config lookup, first run, rewriting, validation, reload, redaction."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from lightd.config import (
    AuthorizationConfig,
    Config,
    create_config,
    is_valid_token,
    load_config,
    locate_config,
    new_token,
    parse_config,
    write_config,
)
from lightd.errors import ConfigError
from lightd.plugins.remote_sync import RemoteConfig

from .conftest import MASTER, RunningAgent, StartAgent, api_client


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"LIGHTD_CONFIG": "/etc/lightd/from-env.json"}
    assert locate_config("/srv/cli.json", env) == Path("/srv/cli.json")
    assert locate_config(None, env) == Path("/etc/lightd/from-env.json")
    assert locate_config(None, {}) == tmp_path / "config.json"


def test_first_run_creates_a_private_file_with_a_random_token(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "config.json"
    created = create_config(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = created.config.authorization.token
    assert is_valid_token(token) and len(token) == len("lightd_") + 32
    assert load_config(path).config == created.config
    assert create_config(tmp_path / "other.json").config.authorization.token != token


def test_defaults_match_the_contract(tmp_path: Path) -> None:
    config = create_config(tmp_path / "c.json").config
    assert (config.server.host, config.server.port) == ("0.0.0.0", 8070)
    assert config.server.allowed_origins == ()
    assert config.server.max_body_bytes == 8 * 1024 * 1024
    assert config.authorization.enabled is True
    assert config.plugins.disabled == ()


def test_minimal_documented_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"authorization": {"enabled": True, "token": MASTER}}))
    assert load_config(path).config == Config(authorization=AuthorizationConfig(token=MASTER))


def test_rewrite_keeps_unknown_keys_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    raw = {
        "_note": "hand-written",
        "server": {"port": 9000, "x-extra": [1, 2]},
        "authorization": {"enabled": True, "token": MASTER, "comment": "keep"},
        "billing": {"rate": 0.5},
    }
    path.write_text(json.dumps(raw))
    os.chmod(path, 0o644)
    token = new_token()
    write_config(path, raw, {"authorization": {"token": token}})
    written = json.loads(path.read_text())
    assert written == {**raw, "authorization": {"enabled": True, "token": token, "comment": "keep"}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_failed_rewrite_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"keep": true}')
    with pytest.raises(TypeError):
        write_config(path, {"keep": True}, {"bad": object()})
    assert path.read_text() == '{"keep": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"port": "8070"}}, "server.port: must be an integer"),
        ({"server": {"port": 70000}}, "server.port: must be 0 to 65535"),
        ({"server": {"port": True}}, "server.port: must be an integer"),
        ({"server": {"allowed_origins": "*"}}, "server.allowed_origins"),
        ({"server": {"max_body_bytes": 10}}, "server.max_body_bytes: must be >= 1024"),
        ({"authorization": {"token": "secret"}}, "authorization.token: must start with lightd_"),
        (
            {"authorization": {"enabled": "yes", "token": MASTER}},
            "authorization.enabled: must be true or false",
        ),
        ({"docker": {"timeout": 0}}, "docker.timeout: must be > 0"),
        ({"storage": {"base_path": 7}}, "storage.base_path: must be a string"),
        ({"plugins": {"disabled": "volumes"}}, "plugins.disabled"),
        ({"remote": []}, "remote"),
        ({"remote": {"timeout": 0}}, "remote.timeout: must be > 0"),
        ([], "the file must hold a JSON object"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, raw: object, message: str) -> None:
    if isinstance(raw, dict):
        raw = {"authorization": {"token": MASTER}, **raw}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as error:
        load_config(path, {"remote": RemoteConfig})  # a plugin's section is checked as well
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_master_token_is_required(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"server": {"port": 8070}}')
    with pytest.raises(ConfigError, match=r"^authorization: is required$"):
        load_config(path)


def test_invalid_json_names_the_position(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"server": {"port": 8070,}}')
    with pytest.raises(ConfigError, match=r"not valid JSON \(line 1, column"):
        load_config(path)


async def test_remote_config_is_redacted(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    remote_token = new_token()
    path = make_config(
        {
            "remote": {"token": remote_token},
            "_note": "kept",
            "custom": {"api_secret": "s3", "password": ""},
        }
    )
    node = await start_agent(path)
    async with api_client(node.url) as c:
        response = await c.get("/remote/config")
    assert response.status_code == 200
    body = response.json()
    assert body["authorization"]["token"] == "lightd_***"
    assert body["remote"]["token"] == "lightd_***"
    assert body["custom"]["api_secret"] == "***"
    assert body["custom"]["password"] == ""  # unset stays visibly unset
    assert body["_note"] == "kept"
    assert body["server"]["max_body_bytes"] == 8 * 1024 * 1024  # defaults are shown
    assert MASTER not in response.text and remote_token not in response.text


async def test_reload_applies_a_new_master_token(running: RunningAgent) -> None:
    path = running.agent.config_path
    raw = json.loads(path.read_text())
    token = new_token()
    write_config(path, raw, {"authorization": {"token": token}})
    async with api_client(running.url) as old:
        response = await old.post("/remote/config/reload")
        assert response.status_code == 200
        assert response.json() == {"message": "Configuration reloaded successfully"}
        assert (await old.get("/remote/config")).status_code == 401
    async with api_client(running.url, token=token) as new:
        assert (await new.get("/remote/config")).status_code == 200


async def test_reload_of_an_invalid_file_keeps_the_old_config(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    path = running.agent.config_path
    raw = json.loads(path.read_text())
    write_config(path, raw, {"server": {"max_body_bytes": "big"}})
    response = await client.post("/remote/config/reload")
    assert response.status_code == 400
    assert (
        response.json()["error"]
        == "Invalid configuration: server.max_body_bytes: must be an integer"
    )
    assert str(path) not in response.text
    assert (await client.get("/remote/config")).status_code == 200


async def test_reload_applies_origins_and_body_limit(
    running: RunningAgent, client: httpx.AsyncClient
) -> None:
    path = running.agent.config_path
    raw = json.loads(path.read_text())
    write_config(
        path, raw, {"server": {"allowed_origins": ["https://ok.example"], "max_body_bytes": 1024}}
    )
    assert (await client.post("/remote/config/reload")).status_code == 200
    refused = await client.get("/remote/config", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403
    big = await client.post("/auth/tokens", json={"ttl": "5m", "pad": "x" * 2048})
    assert big.status_code == 413


def test_a_plugin_section_reads_back_typed_by_its_class(tmp_path: Path) -> None:
    raw = {"authorization": {"token": MASTER}, "remote": {"enabled": True}}
    config = parse_config(raw, {"remote": RemoteConfig})
    remote = config.section(RemoteConfig)
    assert isinstance(remote, RemoteConfig)
    assert (remote.enabled, remote.timeout) == (True, 10.0)
    assert (
        parse_config({"authorization": {"token": MASTER}}, {"remote": RemoteConfig}).section(
            RemoteConfig
        )
        == RemoteConfig()
    )
    with pytest.raises(KeyError, match="no config section"):
        parse_config(raw).section(RemoteConfig)


def test_a_section_class_must_be_attrs() -> None:
    class Plain:
        pass

    with pytest.raises(ConfigError, match="not an attrs class"):
        parse_config({"authorization": {"token": MASTER}}, {"plain": Plain})
