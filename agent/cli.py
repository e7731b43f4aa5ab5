"""The ``lightd`` command: serve the agent, or manage its master token."""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from ._version import __version__
from .config import (
    CONFIG_ENV,
    create_config,
    is_valid_token,
    load_config,
    locate_config,
    new_token,
    write_config,
)
from .errors import ConfigError, PluginError
from .store import StoreError

DESCRIPTION = """\
Lightd node agent. Runs game servers as Docker containers on this machine and serves the
Lightd v2 API (REST + WebSocket) that a hosting panel drives.

Without options it serves the API (default 0.0.0.0:8070) until SIGINT or SIGTERM.
On first run it creates the config file with a random master token (mode 0600)."""

EPILOG = f"""\
config file lookup: --config PATH, else ${CONFIG_ENV}, else ./config.json

examples:
  lightd                          serve with ./config.json (created if missing)
  lightd --config /etc/lightd/config.json --dev
  lightd --token what             print the master token
  lightd --token reset            replace it with a new random token
  lightd --servers 2              page 2 of this node's containers
  echo lightd_mysecret0123456789 | lightd --token set

  curl -H 'Accept: Application/vnd.pkglatv1+json' \\
       -H "Authorization: Bearer $(lightd --token what | cut -d' ' -f3)" \\
       http://127.0.0.1:8070/remote/config

A running agent picks up a changed token with POST /remote/config/reload, or at restart."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightd",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="PATH", help=f"config file (default: ${CONFIG_ENV} or ./config.json)"
    )
    parser.add_argument("--dev", action="store_true", help="debug logging")
    parser.add_argument(
        "--token",
        metavar="CMD",
        type=str.lower,
        choices=("what", "reset", "set"),
        help="what: print the master token; reset: write a new random one; "
        "set: read one from standard input",
    )
    parser.add_argument(
        "--servers",
        metavar="PAGE",
        nargs="?",
        const=1,
        type=int,
        help="list this node's containers, 5 per page (default page 1), and exit",
    )
    parser.add_argument("--version", action="version", version=f"lightd {__version__}")
    return parser


def _setup_logging(dev: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if dev else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not dev:
        # httpx logs every request (remote sync, Docker streams) at INFO; keep INFO readable.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _fail(path: Path, error: ConfigError) -> int:
    print(f"lightd: invalid config {path}: {error}", file=sys.stderr)
    return 2


def _read_raw(path: Path) -> dict[str, Any]:
    """The file's JSON object, for token commands that must work even on a bad token."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError("", f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError("", "the file must hold a JSON object")
    return raw


def token_command(command: str, path: Path) -> int:
    raw = _read_raw(path)
    if command == "what":
        auth = raw.get("authorization")
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            print("No token is set; create one with: lightd --token reset", file=sys.stderr)
            return 1
        print(f"Current Token: {token}")
        return 0
    if command == "reset":
        token = new_token()
        write_config(path, raw, {"authorization": {"token": token}})
        print("✓ Token reset successfully!")
        print(f"New Token: {token}")
        return 0
    # set
    sys.stdout.write("Enter the new token (lightd_…, at least 20 characters): ")
    sys.stdout.flush()
    token = sys.stdin.readline().strip()
    if not token.startswith("lightd_"):
        print("Error: Token must start with 'lightd_'", file=sys.stderr)
        return 1
    if len(token) < 20:
        print("Error: Token too short (minimum 20 characters)", file=sys.stderr)
        return 1
    if not is_valid_token(token) or not token.isascii() or not token.isprintable() or " " in token:
        print(
            "Error: Token may contain only printable ASCII characters, no spaces", file=sys.stderr
        )
        return 1
    write_config(path, raw, {"authorization": {"token": token}})
    print()
    print("✓ Token set successfully!")
    return 0


def _raise_open_files_limit() -> None:
    """Every running server holds sockets (its attach) and big file jobs hold a descriptor
    per folder level; a service's usual soft limit of 1024 is far too low for a node."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.dev)
    path = locate_config(args.config)
    try:
        if not path.exists():
            create_config(path)
            print(
                f"lightd: created {path} with a new random master token (mode 0600);"
                f" show it with: lightd --config {path} --token what",
                file=sys.stderr,
            )
        if args.token:
            return token_command(args.token, path)
        if args.servers is not None:
            from .containers.listing import render

            sys.stdout.write(render(load_config(path), args.servers))
            return 0
        from .runtime import open_agent
        from .server import serve_agent

        _raise_open_files_limit()

        async def run() -> None:
            async with open_agent(path) as agent:
                await serve_agent(agent, handle_signals=True)

        trio.run(run)
    except ConfigError as error:
        return _fail(path, error)
    except PluginError as error:
        print(f"lightd: plugin error: {error}", file=sys.stderr)
        return 2
    except StoreError as error:
        print(f"lightd: state store error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"lightd: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
