"""What the start-up work of issue 22 changed keeps the behaviour it replaced: the garbage
collector is on again afterwards, routes still build their URLs, and the master token's
fingerprint computed ahead is the one the tokens service would have computed."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from lightd.api import tokens
from lightd.api.app import _Rule
from lightd.cli import _SettleWhenServing, main
from quart import url_for
from quart.routing import QuartRule
from quart_trio import QuartTrio


def test_importing_lightd_leaves_the_collector_on() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import gc, lightd; print(gc.isenabled(), gc.get_freeze_count())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["True", "0"]


def test_importing_lightd_keeps_a_collector_that_was_off_off() -> None:
    code = "import gc; gc.disable(); import lightd; print(gc.isenabled())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"]


def test_a_start_that_fails_turns_the_collector_back_on(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"version": "0.2.1", "server": {"port": "eighty"}}', encoding="utf-8")
    assert gc.isenabled()
    assert main(["--config", str(path)]) == 2
    assert gc.isenabled()


class _Serving:
    async def wait_stop_requested(self) -> None:
        await trio.sleep_forever()


def test_once_serving_the_collector_freezes_start_up_and_turns_on() -> None:
    gc.disable()  # as ``main`` leaves it until then

    async def serve() -> tuple[bool, int]:
        _SettleWhenServing(_Serving()).started()  # type: ignore[arg-type]
        await trio.sleep(0.5)
        before = (gc.isenabled(), gc.get_freeze_count())
        await trio.sleep(1)
        return before

    try:
        before = trio.run(serve, clock=trio.testing.MockClock(autojump_threshold=0))
        assert before == (False, 0)  # not during the first second
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


@pytest.mark.parametrize("rule_class", [QuartRule, _Rule])
def test_lazily_compiled_rules_build_the_same_urls(rule_class: type[QuartRule]) -> None:
    app = QuartTrio("t", static_folder=None)
    app.url_rule_class = rule_class

    @app.route("/containers/<int:n>/files/<path:rest>")
    async def view(n: int, rest: str) -> str:
        return ""

    async def build() -> list[str]:
        async with app.test_request_context("/"):
            return [
                url_for("view", n=3, rest="a/b c"),
                url_for("view", n=4, rest="x", page=2),
                url_for("view", n=5, rest="y", _external=True),
            ]

    assert type(next(iter(app.url_map.iter_rules()))) is rule_class
    assert trio.run(build) == [
        "/containers/3/files/a/b%20c",
        "/containers/4/files/x?page=2",
        "http://localhost/containers/5/files/y",
    ]


def test_the_fingerprint_computed_ahead_is_the_one_used_once() -> None:
    master = "lightd_" + "ab" * 16
    expected = tokens.master_fingerprint(master)
    tokens.fingerprint_early(master)
    tokens.fingerprint_early(master)  # a second start before the first is used: one thread
    assert list(tokens._early) == [master]
    assert trio.run(tokens._fingerprint, master) == expected
    assert master not in tokens._early  # used once, then forgotten with the token
    assert trio.run(tokens._fingerprint, master) == expected  # computed again, as before
