"""``python -m examples.panel_mock``: run the mock panel until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from .app import PanelState, node_name, serve_panel
from .drive import Fleet

TOKEN_ENV = "PANEL_MOCK_TOKEN"
AGENT_TOKEN_ENV = "PANEL_AGENT_TOKEN"

EPILOG = f"""\
tokens: give one --token per node, optionally named: --token edge-1=lightd_…;
without --token the tokens come from ${TOKEN_ENV} (comma-separated, same forms).
Point an agent at it with remote.url = http://HOST:PORT{{prefix}} and remote.token = one of
the tokens, then open http://HOST:PORT/ in a browser.

driving nodes: give one --agent per node the panel manages, named like its --token so
the heartbeat and the node's own answers share a row: --agent edge-1=http://10.0.0.5:8070
(the URL must work from the browser too: the console and file transfers go there). The
nodes' master tokens come from ${AGENT_TOKEN_ENV} (one token for all, or NAME=TOKEN,…);
they stay in the panel: the browser only ever gets scoped temporary tokens.

failure behaviour (also switchable on the page): --fail-503 answers 503 to /health and
/update and records nothing; --delay S answers S seconds late (the update is recorded
first, so a request the agent timed out and retried shows up as a duplicate)."""


def parse_tokens(values: Sequence[str]) -> dict[str, str]:
    """``[NAME=]TOKEN`` items → ``{token: node name}``."""
    tokens: dict[str, str] = {}
    for value in values:
        name, sep, token = value.strip().rpartition("=")
        token = token.strip()
        if not token:
            raise ValueError("an empty token")
        tokens[token] = name.strip() if sep and name.strip() else node_name(token)
    return tokens


def parse_agents(values: Sequence[str], tokens: str) -> dict[str, tuple[str, str]]:
    """``[NAME=]URL`` items and ``TOKEN`` or ``NAME=TOKEN,…`` → ``{name: (url, token)}``."""
    by_name: dict[str, str] = {}
    shared = None
    for item in (t.strip() for t in tokens.split(",")):
        if not item:
            continue
        name, sep, token = item.rpartition("=")
        if sep:
            by_name[name.strip()] = token.strip()
        else:
            shared = item
    agents: dict[str, tuple[str, str]] = {}
    for value in values:
        name, sep, url = value.strip().partition("=")
        if not sep:
            name, url = "", value.strip()
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http(s) URL: {url!r}")
        name = name.strip() or url.split("//", 1)[1].rstrip("/")
        master = by_name.get(name) or shared
        if master is None:
            raise ValueError(f"no master token for {name} in ${AGENT_TOKEN_ENV}")
        agents[name] = (url.rstrip("/"), master)
    return agents


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.panel_mock",
        description="A mock hosting panel: receives lightd's /health and /update calls and"
        " shows every node and container with its latest status on a live page.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="listen port (8080)")
    parser.add_argument(
        "--token", action="append", default=[], metavar="[NAME=]TOKEN", help="accepted token"
    )
    parser.add_argument(
        "--prefix", default="", help="path before /health and /update, e.g. /api (none)"
    )
    parser.add_argument("--fail-503", action="store_true", help="answer 503 to /health and /update")
    parser.add_argument(
        "--fail-status", type=int, metavar="CODE", help="answer CODE instead (e.g. 429, 500)"
    )
    parser.add_argument("--delay", type=float, default=0.0, metavar="S", help="answer S s late")
    parser.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help=f"a node to drive (its master token in ${AGENT_TOKEN_ENV})",
    )
    parser.add_argument(
        "--data", type=Path, metavar="FILE", help="keep accepted updates in this JSON-lines file"
    )
    return parser


async def _run(state: PanelState, host: str, port: int, prefix: str, fleet: Fleet | None) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def watch_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        nursery.start_soon(watch_signals)
        urls = await nursery.start(
            lambda task_status: serve_panel(
                state,
                host=host,
                port=port,
                prefix=prefix,
                fleet=fleet,
                shutdown_trigger=stop.wait,
                task_status=task_status,
            )
        )
        print(f"panel mock: page at {urls[0]}/ ; agents report to {urls[0]}{prefix}", flush=True)
        if fleet is not None:
            print(f"panel mock: driving {', '.join(fleet.nodes)}", flush=True)
        await stop.wait()
        nursery.cancel_scope.deadline = trio.current_time() + 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(message)s")
    items = args.token or [t for t in os.environ.get(TOKEN_ENV, "").split(",") if t.strip()]
    if not items:
        parser.error(f"give at least one --token (or set ${TOKEN_ENV})")
    try:
        tokens = parse_tokens(items)
    except ValueError as exc:
        parser.error(f"--token: {exc}")
    if args.delay < 0:
        parser.error("--delay must be >= 0")
    fail = args.fail_status if args.fail_status is not None else (503 if args.fail_503 else None)
    try:
        agents = parse_agents(args.agent, os.environ.get(AGENT_TOKEN_ENV, ""))
    except ValueError as exc:
        parser.error(f"--agent: {exc}")
    state = PanelState(tokens=tokens, fail_status=fail, delay=args.delay, data_file=args.data)
    state.load()
    fleet = Fleet.of(agents) if agents else None
    try:
        trio.run(_run, state, args.host, args.port, args.prefix, fleet)
    except OSError as exc:
        print(f"panel mock: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
