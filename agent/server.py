"""Running an agent: one root nursery that owns every long-lived task.

``serve_agent`` runs what ``lightd.runtime.open_agent`` built: services first (each reports
readiness), then the HTTP API on hypercorn, until ``Agent.request_stop`` (SIGINT/SIGTERM
when the CLI runs it). Shutdown: the API stops accepting and drains for
``server.graceful_timeout``, plugins get ``lightd_shutdown`` within the same bound, then the
services are cancelled. It sits above both the runtime and the API, so neither imports
the other's way up.

Under systemd (``Type=notify``: ``NOTIFY_SOCKET`` set) it tells the service manager
``READY=1`` once the API serves and every service has started, ``STOPPING=1`` when a
shutdown begins, and ``RELOADING=1`` … ``READY=1`` around a SIGHUP reload (the same as
``POST /remote/config/reload``; a bad config is logged and the old one kept).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Mapping
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from .api.app import create_app
from .api.health import SERVICES, ServiceState, ServiceStates
from .api.ws import read_timeout, websocket_settings
from .errors import ConfigError
from .logs import errors_path, keep_errors
from .runtime import Agent, Service

__all__ = ["HEALTHY_SECONDS", "RESTART_DELAYS", "reload_on_signal", "sd_notify", "serve_agent"]

log = logging.getLogger(__name__)

#: Restart back-off of a crashed service, in seconds.
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
#: A service that ran this long since its last (re)start was healthy: its next crash is
#: a new episode, restarted after the first delay again.
HEALTHY_SECONDS = 60.0


class _Readiness:
    """The ``task_status`` handed to a service: remembers that it reported ready."""

    def __init__(self, forward: trio.TaskStatus[None], on_ready: Callable[[], None]) -> None:
        self.forward = forward
        self.on_ready = on_ready
        self.ready = False

    def started(self, value: object = None) -> None:
        self.ready = True
        self.on_ready()
        self.forward.started()


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to the service manager (sd_notify(3)) when ``NOTIFY_SOCKET`` names
    a unix socket (a path, or ``@name`` in the abstract namespace); whether it was sent.
    A datagram to a local socket does not block in practice: no thread needed."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        return False  # unset, or a transport this agent does not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc.strerror or exc)
        return False
    return True


async def reload_on_signal(agent: Agent) -> None:
    """SIGHUP: reload config.json like ``POST /remote/config/reload``, telling systemd."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")
    try:
        await agent.reload_config()
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, the running one stays: %s", exc)
    finally:
        sd_notify("READY=1")


async def _announce_stop(agent: Agent) -> None:
    await agent.wait_stop_requested()
    sd_notify("STOPPING=1")


async def _supervise(
    service: Service,
    states: ServiceStates | None = None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a service; once it has reported ready, log and restart it when it crashes,
    backing off while it keeps crashing (``RESTART_DELAYS``, reset once it has run
    ``HEALTHY_SECONDS``). ``states`` follows it for the readiness probe."""
    states = ServiceStates() if states is None else states
    states.states[service.name] = ServiceState.STARTING

    def running() -> None:
        states.states[service.name] = ServiceState.RUNNING

    readiness = _Readiness(task_status, running)
    failures = 0
    while True:
        began = trio.current_time()
        try:
            if readiness.ready:
                running()  # restarted: counted as running (it reports no readiness again)
                await service.run(task_status=trio.TASK_STATUS_IGNORED)
            else:
                await service.run(task_status=readiness)
        except Exception:  # the one place that supervises services: log, back off, restart
            if not readiness.ready:
                raise
            log.exception("service %r crashed", service.name)
            if not service.restart:
                states.states[service.name] = ServiceState.FAILED
                return
            states.states[service.name] = ServiceState.BACKOFF
            if trio.current_time() - began >= HEALTHY_SECONDS:
                failures = 0
            delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
            log.info("service %r restarts in %gs", service.name, delay)
            await trio.sleep(delay)
            failures += 1
        else:
            log.info("service %r finished", service.name)
            states.states[service.name] = ServiceState.FINISHED
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
    """Run the agent until ``request_stop`` (or SIGINT/SIGTERM with ``handle_signals``,
    which also makes SIGHUP reload the config).

    Reports the bound URLs with ``task_status.started`` once the API listens.
    """
    config = agent.config
    tls = _tls_files(agent)
    if not config.authorization.enabled:
        log.warning("authorization is disabled: every request is accepted without a token")
    states = agent.stash[SERVICES] = ServiceStates()
    with contextlib.ExitStack() as keeping:
        try:  # recent warnings and errors, for ``lightd diagnostics``
            keeping.enter_context(keep_errors(errors_path(agent.paths.base)))
        except OSError as exc:
            log.warning("recent errors will not be kept on disk: %s", exc.strerror or exc)
        await _serve(agent, states, tls, handle_signals, task_status)
    log.info("stopped")


async def _serve(
    agent: Agent,
    states: ServiceStates,
    tls: tuple[str, str] | None,
    handle_signals: bool,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    config = agent.config
    async with trio.open_nursery() as root:
        if handle_signals:
            await root.start(_watch_signals, agent)
        root.start_soon(_announce_stop, agent)
        await root.start(_supervise, Service("docker", agent.docker.serve), states)
        for service in agent.hooks.services(agent):
            await root.start(_supervise, service, states)
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
        hcfg.read_timeout = read_timeout(agent)
        async with trio.open_nursery() as http:
            urls = await http.start(
                partial(hypercorn.trio.serve, app, hcfg, shutdown_trigger=agent.wait_stop_requested)
            )
            agent.urls = list(urls)
            log.info("Lightd %s listening on %s", agent.version, ", ".join(agent.urls))
            await agent.hooks.startup(agent)
            states.started = True
            sd_notify(f"READY=1\nSTATUS=serving on {', '.join(agent.urls)}")
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


async def _watch_signals(
    agent: Agent, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP received: reloading the configuration")
                await reload_on_signal(agent)
                continue
            if agent._stop.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                raise KeyboardInterrupt
            log.info("%s received: stopping gracefully", signal.Signals(signum).name)
            agent.request_stop()
