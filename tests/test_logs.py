"""Logs (issue 13): JSON lines, the journal, redaction, recent errors (a container's own
lines: tests/containers/test_log_lines.py)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lightd.logs import (
    JsonFormatter,
    TextFormatter,
    container_logger,
    keep_errors,
    recent_errors,
    setup,
    under_journald,
)

from .conftest import ROOT

TOKEN = "lightd_" + "s3cr3t0123456789abcdef"
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def _record(message: str, *args: object, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("lightd.test").makeRecord(
        "lightd.test", logging.WARNING, __file__, 1, message, args, None, extra=extra or None
    )
    return record


def test_json_lines_carry_every_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    record = _record("install failed: %s", "no space", internal_id="srv-1", attempt=2)
    record.exc_info = exc_info
    line = JsonFormatter().format(record)
    assert "\n" not in line  # one object per line, the traceback included
    entry = json.loads(line)
    assert TIME.match(entry["time"]), entry["time"]
    assert entry["level"] == "warning"
    assert entry["logger"] == "lightd.test"
    assert entry["message"] == "install failed: no space"
    assert entry["internal_id"] == "srv-1"
    assert entry["attempt"] == 2
    assert "ValueError: boom" in entry["exception"]


def test_text_lines_show_the_internal_id() -> None:
    out = io.StringIO()
    logger = logging.getLogger("lightd.test.text")
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger.addHandler(handler)
    logger.propagate = False
    try:
        container_logger("srv-9", logger).warning("crashed (exit code %d)", 137, extra={"x": 1})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    line = out.getvalue().strip()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING lightd\.test\.text: ", line)
    assert line.endswith("[srv-9] crashed (exit code 137)")


def test_no_secret_in_any_line() -> None:
    message = "panel at https://admin:hunter2@panel.example/api?token=%s said %s"
    for formatter in (JsonFormatter(), TextFormatter(), TextFormatter(journald=True)):
        record = _record(message, TOKEN, f"Bearer {TOKEN}", panel=f"https://x:{TOKEN}@h/")
        line = formatter.format(record)
        assert TOKEN not in line and "hunter2" not in line, line
        assert "lightd_***" in line or "***" in line


def _log_in_child(env: dict[str, str], stderr: Path, fmt: str = "text") -> str:
    code = (
        "import logging; from lightd.logs import setup;"
        f"setup('info', {fmt!r}); logging.getLogger('lightd.child').info('hello')"
    )
    with stderr.open("wb") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, env=env, check=True, cwd=ROOT)
    return stderr.read_text()


def test_no_timestamp_under_journald(tmp_path: Path) -> None:
    """journald stamps every line itself: stderr connected to it (``JOURNAL_STREAM`` names
    the stream's device and inode) gets the level as a syslog priority, no time."""
    stream = tmp_path / "journal-stream"
    stream.touch()
    st = os.stat(stream)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert _log_in_child(env, stream) == "<6>INFO    lightd.child: hello\n"
    # Redirected elsewhere (a child of the unit writing to a file): timestamps again.
    other = tmp_path / "elsewhere.log"
    line = _log_in_child(env, other)
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO    lightd\.child: hello$", line)
    # JSON lines keep their time field either way.
    assert TIME.match(json.loads(_log_in_child(env, stream, "json"))["time"])


def test_under_journald_needs_the_matching_stream(tmp_path: Path) -> None:
    with (tmp_path / "s").open("w") as f:
        st = os.fstat(f.fileno())
        assert under_journald(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not under_journald(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not under_journald(f, {"JOURNAL_STREAM": "garbage"})
        assert not under_journald(f, {})
    assert not under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_setup_is_idempotent_and_quiets_libraries(restore_root: None) -> None:
    out = io.StringIO()
    setup("info", "json", stream=out)
    setup("info", "json", stream=out)  # again (the CLI may): still one line per record
    logging.getLogger("lightd.test.setup").info("once")
    logging.getLogger("httpx").info("GET http://noise")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["once"]
    setup("debug", "json", stream=out)
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.DEBUG


def test_recent_errors_round_trip(tmp_path: Path, restore_root: None) -> None:
    path = tmp_path / "logs" / "errors.jsonl"
    logger = logging.getLogger("lightd.test.errors")
    with keep_errors(path):
        logger.info("not kept")
        container_logger("srv-1", logger).warning("install failed: %s", "no space")
        logger.error("token %s refused", TOKEN)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    entries = recent_errors(path, 10)
    assert [(e["level"], e["message"]) for e in entries] == [
        ("warning", "install failed: no space"),
        ("error", "token lightd_*** refused"),
    ]
    assert entries[0]["internal_id"] == "srv-1"
    assert recent_errors(path, 1) == entries[1:]
    assert recent_errors(tmp_path / "missing.jsonl", 5) == []
    logger.error("after the handler is gone")
    assert len(recent_errors(path, 10)) == 2


def test_recent_errors_survive_rotation(tmp_path: Path, restore_root: None) -> None:
    path = tmp_path / "logs" / "errors.jsonl"
    logger = logging.getLogger("lightd.test.rotate")
    with keep_errors(path):
        for i in range(3000):  # ~ 1.2 MiB of lines
            logger.warning("line %05d %s", i, "x" * 300)
    backup = path.with_name("errors.jsonl.1")
    assert backup.exists() and stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert path.stat().st_size <= 1024 * 1024
    last = recent_errors(path, 5)
    assert [e["message"][:10] for e in last] == [f"line {i:05d}" for i in range(2995, 3000)]
    across = recent_errors(path, 3000)
    assert across[-1]["message"].startswith("line 02999") and len(across) > 100
