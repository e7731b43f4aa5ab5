"""Attack suite, config redaction: ``GET /remote/config`` never shows a secret, whether it
sits under a key named like one (not only ``…token``/``…secret``/``…password``) or inside
a value (credentials in a URL, a secret query parameter, an agent token)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from lightd.config import redact

from ..conftest import StartAgent, api_client

SECRETS = {
    "api_key": "ak-1111",
    "apiKey": "ak-2222",
    "key": "k-3333",
    "private_key": "pk-4444",
    "credentials": "cr-5555",
    "passphrase": "pp-6666",
    "db_passwd": "pw-7777",
    "clientSecret": "cs-8888",
    "signing_key": "sk-9999",
}


async def test_remote_config_hides_secrets_by_key_pattern_and_by_value(
    start_agent: StartAgent, make_config: Callable[..., Path]
) -> None:
    path = make_config(
        {
            "remote": {"url": "https://panel-user:hunter2-pass@panel.example:8443/api"},
            "custom": {
                **SECRETS,
                "mirror": "https://ghp-tok-aaaa@git.example/repo.git",
                "hook": "https://hooks.example/x?a=1&token=qs-bbbb&z=2",
                "plain": "https://example.com/x?page=2",
                "note": "token for later: lightd_0123456789abcdef0123456789abcdef",
                "list": ["s3://AKIA-cccc:wJal-dddd@bucket/x"],
                "workers": 3,
            },
        }
    )
    node = await start_agent(path)
    async with api_client(node.url) as client:
        with trio.fail_after(10):
            response = await client.get("/remote/config")
    assert response.status_code == 200, response.text
    text = response.text
    for leaked in [
        *SECRETS.values(),
        "hunter2-pass",
        "ghp-tok-aaaa",
        "qs-bbbb",
        "0123456789abcdef0123456789abcdef",
        "wJal-dddd",
    ]:
        assert leaked not in text, f"{leaked} is shown"
    body = response.json()
    assert body["remote"]["url"] == "https://panel-user:***@panel.example:8443/api"
    custom = body["custom"]
    assert all(custom[k] == "***" for k in SECRETS)
    assert custom["mirror"] == "https://***@git.example/repo.git"
    assert custom["hook"] == "https://hooks.example/x?a=1&token=***&z=2"
    assert custom["plain"] == "https://example.com/x?page=2"  # nothing secret: unchanged
    assert custom["list"] == ["s3://AKIA-cccc:***@bucket/x"]
    assert custom["workers"] == 3
    assert body["server"]["allowed_origins"] == []


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ({"password": ""}, {"password": ""}),  # unset stays visibly unset
        ({"tokens": {"max_sockets": 5, "ttl": "5m"}}, {"tokens": {"max_sockets": 5, "ttl": "5m"}}),
        ({"u": "http://a:b@c@host/p"}, {"u": "http://a:***@host/p"}),  # raw @ in the password
        ({"Api-Key": ["x", ""]}, {"Api-Key": ["***", ""]}),
    ],
)
def test_redact_edge_cases(value: dict[str, object], shown: dict[str, object]) -> None:
    assert redact(value) == shown
