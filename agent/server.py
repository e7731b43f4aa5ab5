"""Running an agent: one root nursery that owns every long-lived task.

``serve_agent`` runs what ``lightd.runtime.open_agent`` built: services first (each reports
readiness), then the HTTP API on hypercorn, until ``Agent.request_stop`` (SIGINT/SIGTERM
when the CLI runs it). Shutdown: the API stops accepting and drains for
``server.graceful_timeout``, plugins get ``lightd_shutdown`` within the same bound, then the
services are cancelled. It sits above both the runtime and the API, so neither imports
the other's way up.
"""

from __future__ import annotations

import logging
import signal
import ssl
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from .api.app import create_app
from .api.ws import websocket_settings
from .errors import ConfigError
from .runtime import Agent, Service

__all__ = ["HEALTHY_SECONDS", "RESTART_DELAYS", "serve_agent"]

log = logging.getLogger(__name__)

#: Restart back-off of a crashed service, in seconds.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: A service that ran this long since its last (re)start was healthy: its next crash is
#: a new episode, restarted after the first delay again.
HEALTHY_SECONDS = 60.0


class _Readiness:
    """The ``task_status`` handed to a service: remembers that it reported ready."""

    def __init__(self, forward: trio.TaskStatus[None]) -> None:
        self.forward = forward
        self.ready = False

    def started(self, value: object = None) -> None:
        self.ready = True
        self.forward.started()


async def _supervise(
    service: Service, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a service; once it has reported ready, log and restart it when it crashes,
    backing off while it keeps crashing (``RESTART_DELAYS``, reset once it has run
    ``HEALTHY_SECONDS``)."""
    readiness = _Readiness(task_status)
    failures = 0
    while True:
        began = trio.current_time()
        try:
            if readiness.ready:
                await service.run(task_status=trio.TASK_STATUS_IGNORED)
            else:
                await service.run(task_status=readiness)
        except Exception:  # the one place that supervises services: log, back off, restart
            if not readiness.ready:
                raise
            log.exception("service %r crashed", service.name)
            if not service.restart:
                return
            if trio.current_time() - began >= HEALTHY_SECONDS:
                failures = 0
            await trio.sleep(RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)])
            failures += 1
        else:
            log.info("service %r finished", service.name)
            return


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_files(agent: Agent) -> tuple[str, str] | None:
    """``server.tls`` as absolute (certfile, keyfile), checked by loading them once: a bad
    pair is a config error at start, not a traceback on the first connection."""
    tls = agent.config.server.tls
    if tls is None:
        return None
    directory = agent.config_path.parent
    cert, key = str(directory / tls.cert), str(directory / tls.key)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except OSError as exc:
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ConfigError("server.tls", f"cannot load the certificate and key: {reason}") from None
    return cert, key


async def serve_agent(
    agent: Agent,
    *,
    handle_signals: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the agent until ``request_stop`` (or SIGINT/SIGTERM with ``handle_signals``).

    Reports the bound URLs with ``task_status.started`` once the API listens.
    """
    config = agent.config
    tls = _tls_files(agent)
    if not config.authorization.enabled:
        log.warning("authorization is disabled: every request is accepted without a token")
    async with trio.open_nursery() as root:
        if handle_signals:
            await root.start(_watch_signals, agent)
        await root.start(_supervise, Service("docker", agent.docker.serve))
        for service in agent.hooks.services(agent):
            await root.start(_supervise, service)
        app = create_app(agent, agent.hooks.routes(agent))
        agent.app = app
        hcfg = hypercorn.config.Config()
        hcfg.bind = [_bind(config.server.host, config.server.port)]
        hcfg.graceful_timeout = config.server.graceful_timeout
        hcfg.accesslog = None
        hcfg.errorlog = logging.getLogger("hypercorn.error")
        hcfg.include_server_header = False
        if tls is not None:  # HTTPS and WSS on the same bind
            hcfg.certfile, hcfg.keyfile = tls
        # refuse oversized inbound frames (1009) before buffering them
        hcfg.websocket_max_message_size = websocket_settings(agent).max_frame_bytes
        # WebSocket keep-alive (contract §8): hypercorn pings; a client silent past the
        # timeout (not even a pong) is dropped. The read timeout holds for HTTP as well.
        hcfg.websocket_ping_interval = websocket_settings(agent).ping_interval
        hcfg.read_timeout = int(
            websocket_settings(agent).ping_interval + websocket_settings(agent).ping_timeout + 0.999
        )
        async with trio.open_nursery() as http:
            urls = await http.start(
                partial(hypercorn.trio.serve, app, hcfg, shutdown_trigger=agent.wait_stop_requested)
            )
            agent.urls = list(urls)
            log.info("Lightd %s listening on %s", agent.version, ", ".join(agent.urls))
            await agent.hooks.startup(agent)
            task_status.started(agent.urls)
        log.info("API stopped; shutting down")
        with trio.move_on_after(config.server.graceful_timeout) as scope:
            scope.shield = True
            await agent.hooks.shutdown(agent)
        if scope.cancelled_caught:
            log.warning(
                "plugins did not finish shutting down within %.1fs", config.server.graceful_timeout
            )
        root.cancel_scope.cancel()
    log.info("stopped")


async def _watch_signals(
    agent: Agent, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if agent._stop.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            agent.request_stop()
