"""The session's end check (tests/conftest.py ``nothing_left_behind``) can fail: a pytest
run in a subprocess that leaks a container, a temporary folder and a process fails with
a message naming each, and leaves none of them behind."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import trio

from ..conftest import ROOT, outside_environ

INNER_CONFTEST = "from tests.conftest import *  # noqa: F403 - the real hooks and fixtures\n"

LEAKY = """
import json, os, subprocess, tempfile

import docker

from tests.conftest import MADE, TEST_IMAGE


def test_leaks() -> None:
    prefix = MADE.new_prefix()
    client = docker.DockerClient(base_url=os.environ["DOCKER_HOST"])
    client.containers.create(
        TEST_IMAGE, ["true"], name=f"lightd-{prefix}-leak",
        labels={"lightd.managed": "true", "lightd.internal_id": f"{prefix}-leak"},
    )
    folder = tempfile.mkdtemp(prefix="leaked-")
    sleeper = subprocess.Popen(["sleep", "300"])
    with open(os.environ["LEAK_REPORT"], "w") as out:
        json.dump({"prefix": prefix, "folder": folder, "pid": sleeper.pid}, out)
"""

CLEAN = """
import subprocess, tempfile

from tests.conftest import MADE


def test_cleans_up() -> None:
    MADE.new_prefix()
    with tempfile.TemporaryDirectory():
        pass
    subprocess.run(["true"], check=True)
"""


def run_inner(folder: Path, test: str, docker_host: str) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    (folder / "conftest.py").write_text(INNER_CONFTEST)
    (folder / "test_inner.py").write_text(test)
    env = {
        **outside_environ(),  # a session of its own, not a child of this one
        "PYTHONPATH": str(ROOT),
        "DOCKER_HOST": docker_host,
        "LEAK_REPORT": str(folder / "leak.json"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


async def test_a_session_that_leaks_fails_and_names_what_it_left(
    tmp_path: Path, docker_host: str
) -> None:
    with trio.fail_after(120):
        result = await trio.to_thread.run_sync(
            lambda: run_inner(tmp_path / "leaky", LEAKY, docker_host)
        )
    leak = json.loads((tmp_path / "leaky" / "leak.json").read_text())
    out = result.stdout
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, out + result.stderr
    assert "the tests left behind (now removed):" in out, out
    assert f"Docker container lightd-{leak['prefix']}-leak (created)" in out, out
    assert f"temporary folder {leak['folder']}" in out, out
    assert f"process {leak['pid']}: sleep 300" in out, out

    # …and removed them, so a failed run does not spill into the next.
    def listed() -> list[object]:
        with contextlib.closing(docker.DockerClient(base_url=docker_host)) as engine:
            return list(
                engine.containers.list(all=True, filters={"name": f"lightd-{leak['prefix']}"})
            )

    assert await trio.to_thread.run_sync(listed) == []
    assert not Path(leak["folder"]).exists()  # noqa: ASYNC240 - a local stat
    assert not alive(leak["pid"])


async def test_a_session_that_cleans_up_passes(tmp_path: Path, docker_host: str) -> None:
    with trio.fail_after(120):
        result = await trio.to_thread.run_sync(
            lambda: run_inner(tmp_path / "clean", CLEAN, docker_host)
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "left behind" not in result.stdout
