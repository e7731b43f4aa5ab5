"""How the agent logs: text or JSON lines on stderr, and a file of recent errors.

``setup`` (the CLI calls it) installs one stderr handler on the root logger. Text lines
carry no timestamp when stderr is the journal's stream (journald stamps each line itself;
``JOURNAL_STREAM`` names that stream, see systemd.exec(5)); they start with a syslog
priority (``<3>``) instead, so ``journalctl -p`` filters by level. JSON lines are one object
each: ``time`` (RFC 3339 UTC), ``level``, ``logger``, ``message``, every ``extra=`` field
and ``exception``. Lines about a container carry its ``internal_id`` (``container_logger``).
Every line passes ``redact_text``: a token or URL password that slips into a message (an
exception's text, a panel URL) is masked on the way out.

While the agent serves, ``keep_errors`` also writes WARNING and above as JSON lines to
``<storage base>/logs/errors.jsonl`` (rotated at 1 MiB, one backup, mode 0600);
``recent_errors`` reads them back for ``lightd diagnostics``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections import deque
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from .config import redact_text

__all__ = [
    "ERRORS_FILE",
    "ContainerLogger",
    "JsonFormatter",
    "TextFormatter",
    "container_logger",
    "errors_path",
    "keep_errors",
    "recent_errors",
    "setup",
    "under_journald",
]

#: The recent-errors file, relative to ``storage.base_path``.
ERRORS_FILE = Path("logs") / "errors.jsonl"
ERRORS_MAX_BYTES = 1024 * 1024
#: Libraries that log every request at INFO: kept at WARNING unless the level is debug.
NOISY = ("httpx", "httpcore", "hypercorn.error", "hypercorn.access")

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: logging level → syslog priority, for the journal's ``<N>`` line prefix.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}

#: A LogRecord's own attributes; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _RECORD_FIELDS and not key.startswith("_")
    }


def _clean(value: Any) -> Any:
    """A JSON-ready ``extra`` value with secrets masked."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_clean(v) for v in value]
    return redact_text(str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, every ``extra=`` field included."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_text(record.getMessage()),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, _clean(value))
        if record.exc_info:
            entry["exception"] = redact_text(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact_text(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact_text(self.formatStack(record.stack_info))
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``<time> LEVEL logger: [internal_id] message``; under journald no time but a
    syslog priority prefix."""

    def __init__(self, *, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        internal_id = getattr(record, "internal_id", None)
        if internal_id:
            message = f"[{internal_id}] {message}"
        if self.journald:
            head = f"<{_PRIORITY.get(record.levelno, 3 if record.levelno > 40 else 6)}>"
        else:
            head = f"{self.formatTime(record)} "
        line = f"{head}{record.levelname:<7} {record.name}: {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return redact_text(line)


def under_journald(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    """Is ``stream`` connected to the journal? (``JOURNAL_STREAM`` is ``<dev>:<inode>`` of
    the stream systemd connected; a child whose stderr was redirected does not match.)"""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (ValueError, OSError, AttributeError):  # no such stream, no fileno, bad value
        return False


class _StderrHandler(logging.StreamHandler[TextIO]):
    """The handler ``setup`` installs (found again by its type: ``setup`` is idempotent)."""


def setup(level: str | int = "info", format: str = "text", *, stream: TextIO | None = None) -> None:
    """Log to ``stream`` (stderr) at ``level`` in ``format`` (``text`` or ``json``).

    Calling it again replaces what it installed (the CLI may call it before and after
    reading the config); other handlers are left alone.
    """
    stream = sys.stderr if stream is None else stream
    numeric = LEVELS[level.lower()] if isinstance(level, str) else level
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _StderrHandler(stream)
    if format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(journald=under_journald(stream)))
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in NOISY:
        logging.getLogger(name).setLevel(
            logging.NOTSET if numeric <= logging.DEBUG else logging.WARNING
        )


class ContainerLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records carry ``internal_id`` (merged with a call's own ``extra``)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


def container_logger(
    internal_id: str, logger: logging.Logger | str | None = None
) -> ContainerLogger:
    """``logger`` (default ``lightd.containers``) for lines about one container: each
    carries its ``internal_id`` (a JSON field; ``[<internal_id>]`` in text)."""
    if not isinstance(logger, logging.Logger):
        logger = logging.getLogger(logger or "lightd.containers")
    return ContainerLogger(logger, {"internal_id": internal_id})


# -- recent errors --------------------------------------------------------------------------


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """A rotating file created mode 0600 (its lines may name paths and hosts)."""

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, self.mode.replace("w", "a"), encoding=self.encoding)


def errors_path(base: Path) -> Path:
    """The recent-errors file of an agent whose storage base is ``base``."""
    return base / ERRORS_FILE


@contextmanager
def keep_errors(path: Path) -> Iterator[logging.Handler]:
    """While inside, write WARNING+ records to ``path`` as JSON lines (rotated)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    handler = _PrivateRotatingHandler(
        path, maxBytes=ERRORS_MAX_BYTES, backupCount=1, encoding="utf-8"
    )
    handler.setLevel(logging.WARNING)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        handler.close()


def recent_errors(path: Path, n: int = 50) -> list[dict[str, Any]]:
    """The last ``n`` records of a recent-errors file (its backup first), oldest first;
    a missing file is no error, an unreadable line is skipped."""
    lines: deque[str] = deque(maxlen=max(n, 0))
    for source in (path.with_name(path.name + ".1"), path):
        try:
            with source.open(encoding="utf-8", errors="replace") as f:
                lines.extend(f)
        except FileNotFoundError:
            continue
    found: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append(entry)
    return found
