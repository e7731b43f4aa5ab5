"""Helpers of the remote sync tests: the mock panel on a loopback port that refuses
connections until the test brings the panel up (and can take it down again), and small
waiting helpers."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from lightd.config import write_config
from lightd.runtime import Agent

from examples.panel_mock import PanelState, serve_panel

from ..conftest import wait_for

PANEL_TOKEN = "lightd_" + "feedface" * 4
NODE = "node-under-test"


def _reserve(port: int = 0) -> socket.socket:
    """A socket bound to a loopback port and not listening: connections are refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


class Panel:
    """The mock panel on a fixed loopback port of its own, down or up at the test's will.

    Down means nothing listens (connection refused), not a closed port some other test
    could take: the port stays bound. ``url`` is stable across ``up``/``down``.
    """

    def __init__(
        self, nursery: trio.Nursery, *, prefix: str = "", token: str = PANEL_TOKEN
    ) -> None:
        self.nursery = nursery
        self.prefix = prefix
        self.token = token
        self.state = PanelState(tokens={token: NODE})
        self._reserved: socket.socket | None = _reserve()
        self.port: int = self._reserved.getsockname()[1]
        self._scope: trio.CancelScope | None = None
        self._stopped: trio.Event | None = None

    @property
    def url(self) -> str:
        """What ``remote.url`` should say for this panel."""
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def is_up(self) -> bool:
        return self._scope is not None

    async def up(self) -> None:
        assert self._reserved is not None, "the panel is up already"
        fd = self._reserved.detach()
        self._reserved = None
        stopped = trio.Event()

        async def run(*, task_status: trio.TaskStatus[list[str]]) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    await serve_panel(
                        self.state, fd=fd, prefix=self.prefix, task_status=task_status
                    )
            finally:
                stopped.set()

        self._stopped = stopped
        with trio.fail_after(10):
            await self.nursery.start(run)

    async def down(self) -> None:
        assert self._scope is not None and self._stopped is not None, "the panel is down"
        self._scope.cancel()
        with trio.fail_after(10):
            await self._stopped.wait()
        self._scope = None
        self._reserved = _reserve(self.port)

    def close(self) -> None:
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def statuses(self, server: str) -> list[str]:
        return self.state.statuses(server)

    def bodies(self, server: str | None = None) -> list[dict[str, Any]]:
        """Accepted updates as the agent sent them (the panel's own keys removed)."""
        return [
            {k: v for k, v in entry.items() if k not in ("node", "received_at")}
            for entry in self.state.received
            if server is None or entry["server"] == server
        ]


def remote_config(panel_url: str, **overrides: Any) -> dict[str, Any]:
    """Config overrides for an agent that reports to ``panel_url``."""
    remote = {
        "enabled": True,
        "url": panel_url,
        "token": PANEL_TOKEN,
        "heartbeat_interval": 30.0,
        "timeout": 5.0,
        **overrides,
    }
    return {"remote": remote}


async def until(condition: Callable[[], bool], *, within: float = 10, what: str = "") -> None:
    """``wait_for`` for a condition on in-process state (the panel's, the agent's)."""

    async def check() -> bool:
        return condition()

    await wait_for(check, within=within, what=what or getattr(condition, "__name__", ""))


async def transitions(agent: Agent, *items: tuple[str, str] | tuple[str, str, str]) -> None:
    """Announce transitions through the core's hook, as the containers feature does."""
    for item in items:
        server, state = item[0], item[1]
        error = item[2] if len(item) > 2 else None
        await agent.hooks.container_state_changed(agent, server, state, error)


def write_remote(path: Path, **remote: Any) -> None:
    """Change the ``remote`` section of a config file the way an operator would."""
    raw = json.loads(path.read_text())
    write_config(path, raw, {"remote": remote})


__all__ = [
    "NODE",
    "PANEL_TOKEN",
    "Panel",
    "remote_config",
    "transitions",
    "until",
    "write_remote",
]
