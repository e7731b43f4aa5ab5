"""What an install-script runner is handed (the ``lightd_run_install_script`` hook)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from ..errors import AgentError
from .models import Limits

__all__ = ["InstallFailed", "InstallJob"]


class InstallFailed(AgentError):
    """An install step failed; the message is the reason the panel and the console see."""


@attrs.frozen
class InstallJob:
    """One run of a container's install script.

    The runner must run ``script`` inside a container from ``image`` (never on the host),
    with ``docker_options(...)`` (the volume at /home/container, the data folder at
    /app/data, limits, hardening, labels), stream its output through ``console`` and keep
    it in ``log_path``, and fail with ``InstallFailed`` on a non-zero exit
    (``Install script failed with exit code <n>``) or after ``timeout`` seconds
    (``Install script timed out``). Cancelled (the container is deleted), it must remove
    its container before returning.
    """

    internal_id: str
    image: str
    script: str
    data_path: Path
    log_path: Path
    timeout: float
    limits: Limits
    #: Publish complete output lines (each ending with ``\\n``) to the container's console.
    console: Callable[[list[str]], None]
    #: Publish a daemon message (install progress).
    message: Callable[[str], None]
    #: ``docker_options(entrypoint=[...])``: keyword arguments for ``containers.create``.
    docker_options: Callable[..., dict[str, Any]]
