"""The plugin system: specs, built-ins, entry points, disabling, and every hook exercised.

Each hook spec has a ``test_hook_<name>`` here (checked by ``test_contracts.py``); the
external ``hello`` plugin (``tests/external_plugin``) implements all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
from lightd import hookimpl
from lightd.errors import PluginError
from lightd.plugin_manager import BUILTIN_PLUGINS, make_plugin_manager
from lightd.runtime import Agent

from .conftest import MASTER, RunningAgent, StartAgent, api_client


@pytest.fixture
async def hello(start_agent: StartAgent, config_path: Path, hello_plugin: str) -> RunningAgent:
    return await start_agent(config_path, load_entrypoints=True)


def hello_state(node: RunningAgent):  # type: ignore[no-untyped-def]
    from lightd_hello.plugin import STATE

    return node.agent.stash[STATE]


async def test_external_plugin_is_found_through_its_entry_point(hello: RunningAgent) -> None:
    async with api_client(hello.url) as c:
        response = await c.get("/hello")
        info = await c.get("/system/info")
    assert response.status_code == 200
    assert response.json()["hello"] == "world"
    if info.status_code == 200:
        names = {p["name"]: p for p in info.json()["plugins"]}
        assert names["hello"]["version"] == "1.0"
        assert names["hello"]["builtin"] is False


async def test_external_plugin_routes_need_auth(hello: RunningAgent) -> None:
    async with api_client(hello.url, token=None) as c:
        assert (await c.get("/hello")).status_code == 401


async def test_start_up_hooks_run_in_lifecycle_order(hello: RunningAgent) -> None:
    assert hello_state(hello).calls == [
        "lightd_add_config_sections",
        "lightd_add_migrations",
        "lightd_configure",
        "lightd_add_services",
        "lightd_add_routes",
        "lightd_startup",
    ]


async def test_hook_lightd_add_config_sections(
    start_agent: StartAgent, make_config: Callable[..., Path], hello_plugin: str
) -> None:
    from lightd_hello.plugin import HelloConfig

    node = await start_agent(make_config({"hello": {"greeting": "panel"}}), load_entrypoints=True)
    assert node.agent.config.section(HelloConfig).greeting == "panel"
    async with api_client(node.url) as c:
        assert (await c.get("/hello")).json()["hello"] == "panel"
        shown = (await c.get("/remote/config")).json()
    assert shown["hello"] == {"greeting": "panel"}


async def test_plugin_config_section_is_validated(
    start_agent: StartAgent, make_config: Callable[..., Path], hello_plugin: str
) -> None:
    from lightd.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^hello.greeting: must be a string$"):
        await start_agent(make_config({"hello": {"greeting": 5}}), load_entrypoints=True)


async def test_hook_lightd_add_migrations(hello: RunningAgent) -> None:
    await hello.agent.store.execute("INSERT INTO hello_notes VALUES ('hi')")
    rows = await hello.agent.store.execute("SELECT note FROM hello_notes")
    assert [r["note"] for r in rows] == ["hi"]


async def test_hook_lightd_configure(hello: RunningAgent) -> None:
    assert "lightd_configure" in hello_state(hello).calls


async def test_hook_lightd_add_services(hello: RunningAgent) -> None:
    assert hello_state(hello).ticks == 1  # started, and ready before the API listened


async def test_hook_lightd_add_routes(hello: RunningAgent) -> None:
    async with api_client(hello.url) as c:
        assert (await c.get("/hello/containers/abc")).json() == {
            "internal_id": "abc",
            "auth": "master",
        }


async def test_hook_lightd_startup(hello: RunningAgent) -> None:
    assert hello_state(hello).calls[-1] == "lightd_startup"


async def test_hook_lightd_config_reloaded(hello: RunningAgent) -> None:
    async with api_client(hello.url) as c:
        assert (await c.post("/remote/config/reload")).status_code == 200
    assert hello_state(hello).calls[-1] == "lightd_config_reloaded"


async def test_hook_lightd_shutdown(hello: RunningAgent) -> None:
    state = hello_state(hello)
    await hello.stop()
    assert state.calls[-1] == "lightd_shutdown"


async def test_hook_lightd_container_state_changed(hello: RunningAgent) -> None:
    agent: Agent = hello.agent
    await agent.hooks.container_state_changed(agent, "srv-1", "installing")
    await agent.hooks.container_state_changed(agent, "srv-1", "failed", "Install script failed")
    async with api_client(hello.url) as c:
        events = (await c.get("/hello/events")).json()["events"]
    assert events == [["srv-1", "installing", None], ["srv-1", "failed", "Install script failed"]]


async def test_hook_lightd_container_deleted(hello: RunningAgent) -> None:
    await hello.agent.hooks.container_deleted(hello.agent, "srv-9")
    assert hello_state(hello).deleted == ["srv-9"]


async def test_hook_lightd_volume_in_use(hello: RunningAgent) -> None:
    agent = hello.agent
    assert agent.hooks.volume_in_use(agent, "busy-volume") == "hello-server"
    assert agent.hooks.volume_in_use(agent, "free-volume") is None


async def test_disabled_external_plugin_is_not_loaded(
    start_agent: StartAgent, make_config: Callable[..., Path], hello_plugin: str
) -> None:
    node = await start_agent(
        make_config({"plugins": {"disabled": ["hello"]}}), load_entrypoints=True
    )
    assert not node.agent.hooks.loaded("hello")
    async with api_client(node.url) as c:
        assert (await c.get("/hello")).status_code == 404


async def test_essential_plugins_cannot_be_disabled(
    start_agent: StartAgent, make_config: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        node = await start_agent(make_config({"plugins": {"disabled": ["tokens", "nonesuch"]}}))
    assert node.agent.hooks.loaded("tokens")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "'tokens' is essential" in messages
    assert "'nonesuch', which is not an installed plugin" in messages


def test_every_builtin_plugin_is_registered() -> None:
    pm = make_plugin_manager(load_entrypoints=False)
    assert [name for name in BUILTIN_PLUGINS if pm.get_plugin(name) is not None] == list(
        BUILTIN_PLUGINS
    )


def test_every_module_of_plugins_package_is_a_builtin() -> None:
    root = Path(__file__).resolve().parent.parent / "plugins"
    modules = {f"lightd.plugins.{p.stem}" for p in root.glob("*.py") if p.stem != "__init__"} | {
        f"lightd.plugins.{p.name}" for p in root.iterdir() if (p / "__init__.py").exists()
    }
    assert modules <= set(BUILTIN_PLUGINS.values())


class _Misspelled:
    @hookimpl
    def lightd_add_rotues(self) -> None:  # a typo: no such hook
        pass


def test_an_implementation_matching_no_spec_is_an_error() -> None:
    with pytest.raises(PluginError, match="lightd_add_rotues"):
        make_plugin_manager(load_entrypoints=False, extra=[("typo", _Misspelled())])


def test_broken_plugin_stops_the_cli_with_exit_2(config_path: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    site = tmp_path / "broken-site"
    dist = site / "lightd_broken-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lightd-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[lightd.plugins]\nbroken = lightd_no_such_module\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-m", "lightd", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "plugin error" in result.stderr and "Traceback" not in result.stderr
    assert MASTER not in result.stderr
