"""The plugin authors' kit: ``lightd.testing`` (the pytest plugin), the template of
``lightd plugin new``, and where ``/system/info`` and diagnostics say a plugin came from.

The template test is the whole path an author takes: generate, ``pip install`` (into a
folder of the test's own, put on ``PYTHONPATH``: the shared venv is never changed), run
the package's own tests with pytest in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import lightd
import pytest
import trio
from lightd import testing
from lightd.cli import main as cli_main
from lightd.diagnostics import plugins_report, render_text
from lightd.plugin_manager import describe_plugins, make_plugin_manager
from lightd.testing import MASTER_TOKEN, RunningAgent, StartAgent, Volume

from .conftest import ROOT, api_client

PYTHON = str(Path(sys.executable))


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    result = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}"
    return result.stdout


# -- the template ------------------------------------------------------------------------


def test_plugin_new_makes_a_package_whose_tests_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["plugin", "new", "Kit-Probe", "--dir", str(tmp_path)]) == 0
    package = tmp_path / "lightd-kit-probe"
    assert "lightd-kit-probe" in capsys.readouterr().out
    assert sorted(str(p.relative_to(package)) for p in package.rglob("*") if p.is_file()) == [
        "README.md",
        "pyproject.toml",
        "src/lightd_kit_probe/__init__.py",
        "src/lightd_kit_probe/plugin.py",
        "tests/test_plugin.py",
    ]
    for path in package.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), path
    pyproject = (package / "pyproject.toml").read_text()
    major, minor = (int(x) for x in lightd.__version__.split(".")[:2])
    assert f'"lightd>={major}.{minor},<{major}.{minor + 2}"' in pyproject
    assert 'kit_probe = "lightd_kit_probe.plugin"' in pyproject
    # the generated code passes the repository's own lint rules
    run([str(ROOT / ".venv" / "bin" / "ruff"), "check", "--no-cache", str(package)], cwd=ROOT)

    site = tmp_path / "site"
    run(
        [PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(package)],
        cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package, env=env)
    assert "4 passed" in out, out


def test_plugin_new_refuses_bad_names_and_existing_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["plugin", "new", "9lives", "--dir", str(tmp_path)]) == 2
    assert "plugin name '9lives'" in capsys.readouterr().err
    assert cli_main(["plugin", "new", "motd", "--dir", str(tmp_path)]) == 0
    assert cli_main(["plugin", "new", "lightd-motd", "--dir", str(tmp_path)]) == 1
    assert "exists already" in capsys.readouterr().err


# -- lightd.testing, in this session -----------------------------------------------------


@pytest.fixture
def hello_module(hello_plugin: str) -> object:
    import lightd_hello.plugin

    return lightd_hello.plugin


@pytest.mark.lightd(config={"hello": {"greeting": "kit"}})
async def test_fixtures_start_an_agent_with_the_installed_plugins(
    hello_plugin: str,
    lightd_agent: RunningAgent,
    lightd_client: httpx.AsyncClient,
    lightd_volume: Volume,
) -> None:
    # the hello plugin is found through its entry point, configured by the marker
    assert (await lightd_client.get("/hello")).json()["hello"] == "kit"
    assert lightd_client.headers["Authorization"] == f"Bearer {MASTER_TOKEN}"
    # the volume exists, and the agent has no engine (no docker=True)
    assert lightd_volume.path.is_dir()
    assert (await lightd_client.get(f"/volumes/{lightd_volume.id}")).status_code == 200
    assert (await lightd_client.get("/system/info")).status_code == 503
    assert lightd_agent.agent.config.authorization.token == MASTER_TOKEN


async def test_the_websocket_fixture_speaks_to_the_agent(
    hello_plugin: str, lightd_ws: Callable[..., Any]
) -> None:
    async with lightd_ws("/hello/ws/srv-1") as ws:
        await ws.send_message("ping")
        with trio.fail_after(5):
            assert await ws.get_message() == "srv-1:ping"


async def test_start_registers_a_plugin_that_is_not_installed(
    lightd_start: StartAgent, hello_module: object
) -> None:
    node = await lightd_start(plugins=[hello_module], load_entrypoints=False)
    async with node.client() as client:
        assert (await client.get("/hello")).status_code == 200
    described = {p["name"]: p for p in node.agent.hooks.describe()}
    assert described["lightd_hello.plugin"]["origin"] == "registered"  # by module name
    await node.stop()
    assert node.stopped.is_set()


async def test_an_agent_with_docker_knows_the_engine(
    lightd_start: StartAgent,
    lightd_config: Callable[..., Path],
    lightd_docker: testing.DockerTarget,
) -> None:
    node = await lightd_start(config=lightd_config(), docker=True)  # a path works too
    async with node.client() as client:
        info = await client.get("/system/info")
    assert info.status_code == 200, info.text
    assert node.node_id
    assert node.agent.config.docker.network == lightd_docker.network == testing.SESSION_NETWORK


def _inner_session(
    tmp_path: Path, *args: str, docker_host: str
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "@pytest.mark.lightd(docker=True)\n"
        "async def test_needs_docker(lightd_agent):\n"
        "    assert False, 'never reached without an engine'\n"
    )
    env = {**os.environ, "DOCKER_HOST": docker_host}
    return subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "trio_mode=true", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_without_an_engine_docker_tests_skip_or_fail_when_required(tmp_path: Path) -> None:
    nowhere = f"unix://{tmp_path}/nothing.sock"
    skipped = _inner_session(tmp_path, "-rs", docker_host=nowhere)
    assert skipped.returncode == 0, skipped.stdout
    assert "1 skipped" in skipped.stdout and "no Docker engine answers" in skipped.stdout
    required = _inner_session(tmp_path, "--lightd-require-docker", docker_host=nowhere)
    assert required.returncode == 1, required.stdout
    assert "a Docker engine is required" in required.stdout


# -- where a plugin came from --------------------------------------------------------------


def test_describe_names_the_origin_and_version_of_each_plugin(hello_plugin: str) -> None:
    extra = ("extra", object())
    described = {p["name"]: p for p in describe_plugins(make_plugin_manager(extra=[extra]))}
    assert described["system"] | {"hooks": []} == {
        "name": "system",
        "builtin": True,
        "origin": "builtin",
        "version": lightd.__version__,
        "hooks": [],
    }
    assert {k: described["hello"][k] for k in ("builtin", "origin", "version")} == {
        "builtin": False,
        "origin": "lightd-hello",
        "version": "1.0",
    }
    assert "lightd_add_routes" in described["hello"]["hooks"]
    assert described["extra"]["origin"] == "registered"


async def test_system_info_and_diagnostics_list_plugins_with_their_origin(
    start_agent: StartAgent, make_config: Callable[..., Path], hello_plugin: str, docker_host: str
) -> None:
    path = make_config()
    node = await start_agent(path, environ={"DOCKER_HOST": docker_host}, load_entrypoints=True)
    async with api_client(node.url) as client:
        info = (await client.get("/system/info")).json()
    plugins = {p["name"]: p for p in info["plugins"]}
    assert plugins["hello"]["origin"] == "lightd-hello"
    assert plugins["hello"]["version"] == "1.0"
    assert plugins["volumes"]["origin"] == "builtin"

    raw = json.loads(path.read_text())
    report = {p["name"]: p for p in plugins_report(raw)}
    assert report["hello"] == {
        "name": "hello",
        "builtin": False,
        "origin": "lightd-hello",
        "version": "1.0",
    }
    shown = [line.split() for line in render_text(_report_with(report)).splitlines()]
    assert ["hello:", "lightd-hello", "1.0"] in shown
    assert ["volumes:", "built-in", lightd.__version__] in shown


def _report_with(plugins: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A minimal report for ``render_text``: only the plugins part matters here."""
    return {
        "versions": {"lightd": "x", "python": "x", "platform": "x", "libraries": {}},
        "docker": {"url": "x", "source": "x", "reachable": False},
        "storage": {},
        "firewall": {},
        "remote": {"enabled": False},
        "plugins": list(plugins.values()),
        "recent_errors": {"path": "x", "entries": []},
        "config": {"path": "x", "effective": {}},
    }


# -- the reference's stability marks --------------------------------------------------------


def _generator() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts/gen_plugin_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_marks_deprecated_and_provisional_hooks() -> None:
    import types

    import pluggy

    hookspec = pluggy.HookspecMarker("lightd")
    hookimpl = pluggy.HookimplMarker("lightd")
    specs = types.ModuleType("specs")

    @hookspec(warn_on_impl=DeprecationWarning("lightd_old is deprecated: use lightd_new"))
    def lightd_old() -> None: ...

    @hookspec
    def lightd_new() -> None: ...

    @hookspec
    def lightd_kept() -> None: ...

    for fn in (lightd_old, lightd_new, lightd_kept):
        setattr(specs, fn.__name__, fn)
    specs.PROVISIONAL = frozenset({"lightd_new"})  # type: ignore[attr-defined]
    gen = _generator()
    assert gen.stability_of(lightd_kept, specs) == "stable"
    assert gen.stability_of(lightd_new, specs) == "provisional"
    assert gen.stability_of(lightd_old, specs) == (
        "deprecated: lightd_old is deprecated: use lightd_new"
    )
    # what the policy promises: implementing a deprecated hook warns at registration
    pm = pluggy.PluginManager("lightd")
    pm.add_hookspecs(specs)

    class Old:
        @hookimpl
        def lightd_old(self) -> None: ...

    with pytest.warns(DeprecationWarning, match="use lightd_new"):
        pm.register(Old())
    import lightd.hookspecs

    text = gen.TARGET.read_text()
    for fn in gen.hook_specs(lightd.hookspecs):
        assert f"| {gen.stability_of(fn, lightd.hookspecs)} |" in text
