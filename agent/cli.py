"""The ``lightd`` command: serve the agent, or manage its master token."""

from __future__ import annotations

import argparse
import gc
import getpass
import json
import logging
import os
import re
import resource
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ._version import __version__
from .config import (
    CONFIG_ENV,
    LOG_FORMATS,
    LOG_LEVELS,
    MIN_TOKEN_LENGTH,
    TOKEN_PREFIX,
    Config,
    LoadedConfig,
    create_config,
    is_valid_token,
    load_config,
    locate_config,
    new_token,
    write_config,
)
from .errors import ConfigError, PluginError
from .logs import setup as setup_logging
from .store import StoreError

if TYPE_CHECKING:
    from .runtime import Agent

#: Overrides config ``log.level`` (a ``--log-level`` or ``--dev`` flag overrides both).
LOG_LEVEL_ENV = "LIGHTD_LOG_LEVEL"

DESCRIPTION = """\
Lightd node agent. Runs game servers as Docker containers on this machine and serves the
Lightd v2 API (REST + WebSocket) that a hosting panel drives.

Without a command it serves the API (default 0.0.0.0:8070) until SIGINT or SIGTERM
(SIGHUP reloads the config like POST /remote/config/reload). On first run it creates the
config file with a random master token (mode 0600); only serving and --token reset/set
create a missing config, every other command fails naming the path."""

EPILOG = f"""\
commands:
  diagnostics [--json]      support report: versions, redacted config, Docker engine,
                            storage, firewall chains, remote sync, plugins, recent errors
  config check [PATH]       list every config error and unknown key (exit 1 on an error)
  plugin new NAME [--dir D] write a new plugin package (tests included) to D/lightd-NAME

config file lookup: --config PATH, else ${CONFIG_ENV}, else ./config.json
log level: --log-level, else --dev (debug), else ${LOG_LEVEL_ENV}, else config log.level

examples:
  lightd                          serve with ./config.json (created if missing)
  lightd --config /etc/lightd/config.json --log-format json
  lightd --token what             print the master token
  lightd --token reset            replace it with a new random token
  lightd --token set              prompt for a token (no echo), or read it from stdin
  lightd --servers 2              page 2 of this node's containers
  lightd --servers --json         every container, as JSON
  lightd diagnostics > report.txt
  lightd config check /etc/lightd/config.json.new

  curl -H 'Accept: Application/vnd.pkglatv1+json' \\
       -H "Authorization: Bearer $(lightd --token what | cut -d' ' -f3)" \\
       http://127.0.0.1:8070/remote/config

A running agent picks up a changed token with POST /remote/config/reload, SIGHUP, or at
restart."""


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
    parser.add_argument("--dev", action="store_true", help="debug logging (= --log-level debug)")
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        help=f"log level (default: ${LOG_LEVEL_ENV}, else config log.level, else info)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        help="text (default; no timestamps under journald) or json lines (config log.format)",
    )
    parser.add_argument(
        "--token",
        metavar="CMD",
        type=str.lower,
        choices=("what", "reset", "set"),
        help="what: print the master token; reset: write a new random one; "
        "set: prompt for one without echo (or read a line from standard input)",
    )
    parser.add_argument(
        "--servers",
        metavar="PAGE",
        nargs="?",
        const=0,
        type=int,
        help="list this node's containers, 5 per page (default page 1; with --json every "
        "container unless PAGE is given), and exit",
    )
    parser.add_argument(
        "--json", action="store_true", help="with --servers or diagnostics: print JSON"
    )
    parser.add_argument("--version", action="version", version=f"lightd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    diagnostics = commands.add_parser(
        "diagnostics", help="print a support report (no secret in it)"
    )
    diagnostics.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print JSON"
    )
    config = commands.add_parser("config", help="config file tools")
    config_commands = config.add_subparsers(dest="config_command", metavar="check", required=True)
    check = config_commands.add_parser(
        "check", help="list every error and unknown key; exit 1 on an error"
    )
    check.add_argument(
        "path", nargs="?", metavar="PATH", help="the file (default: the --config lookup)"
    )
    plugin = commands.add_parser("plugin", help="plugin author tools")
    plugin_commands = plugin.add_subparsers(dest="plugin_command", metavar="new", required=True)
    new = plugin_commands.add_parser(
        "new", help="write a plugin package whose tests pass out of the box (docs/plugins.md)"
    )
    new.add_argument("name", metavar="NAME", help="the plugin's name, e.g. motd or lightd-motd")
    new.add_argument(
        "--dir", default=".", metavar="DIR", help="where to write lightd-NAME/ (default: .)"
    )
    return parser


#: The template of ``lightd plugin new`` (package data): ``{{key}}`` in file contents and
#: ``__package__`` in paths are replaced; ``.tmpl`` is dropped from file names.
TEMPLATE = Path(__file__).resolve().parent / "templates" / "plugin"
_PLUGIN_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def plugin_new(name: str, directory: Path) -> int:
    """``lightd plugin new NAME``: the template, filled in, at ``directory/lightd-NAME``."""
    plugin = name.strip().lower().removeprefix("lightd-").removeprefix("lightd_")
    plugin = plugin.replace("-", "_")
    if not _PLUGIN_NAME.fullmatch(plugin):
        print(
            f"lightd: plugin name {name!r}: use a-z, 0-9, _ or -, starting with a letter",
            file=sys.stderr,
        )
        return 2
    dist = "lightd-" + plugin.replace("_", "-")
    major, minor = (int(part) for part in __version__.split(".")[:2])
    values = {
        "plugin": plugin,
        "dist": dist,
        "package": f"lightd_{plugin}",
        "Class": "".join(part.capitalize() for part in plugin.split("_")),
        "lightd_min": f"{major}.{minor}",
        "lightd_max": f"{major}.{minor + 2}",
    }
    target = directory / dist
    if target.exists():
        print(f"lightd: {target} exists already", file=sys.stderr)
        return 1
    for source in sorted(TEMPLATE.rglob("*.tmpl")):
        relative = source.relative_to(TEMPLATE).with_suffix("")
        out = target / str(relative).replace("__package__", values["package"])
        text = source.read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    print(f"wrote {target}: plugin {plugin!r}, package {values['package']}")
    print(f"next: pip install -e '{target}[test]' && pytest {target}")
    return 0


def log_settings(
    args: argparse.Namespace, raw: Mapping[str, Any] | None, environ: Mapping[str, str]
) -> tuple[str, str]:
    """(level, format): a flag wins, then ``--dev``, then ``$LIGHTD_LOG_LEVEL``, then the
    config's ``log`` section, then info/text. A bad environment value is a ``ConfigError``
    (a bad config value is reported by the config's own validation)."""
    section = raw.get("log") if raw is not None else None
    section = section if isinstance(section, dict) else {}
    level = args.log_level or ("debug" if args.dev else None)
    env_level = environ.get(LOG_LEVEL_ENV, "").strip().lower()
    if env_level and env_level not in LOG_LEVELS:
        raise ConfigError(LOG_LEVEL_ENV, f"must be one of {', '.join(LOG_LEVELS)}")
    configured = section.get("level")
    level = level or env_level or (configured if configured in LOG_LEVELS else None) or "info"
    configured = section.get("format")
    fmt = args.log_format or (configured if configured in LOG_FORMATS else None) or "text"
    return level, fmt


def _quiet_raw(path: Path) -> dict[str, Any] | None:
    """The file's JSON object for the log settings, or ``None`` (errors come later)."""
    try:
        return _read_raw(path)
    except ConfigError:
        return None


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


class _Missing(Exception):
    """The config file does not exist and this command must not create it."""


def _require(path: Path) -> None:
    if not path.exists():
        raise _Missing(path)


def _read_token(prompt: str) -> str:
    """A TTY gets a prompt without echo (getpass writes it to the terminal, else stderr);
    piped input is one line of stdin, the prompt still on stderr, so stdout stays clean."""
    if sys.stdin.isatty():
        return getpass.getpass(prompt, stream=sys.stderr).strip()
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline().strip()
    sys.stderr.write("\n")
    return line


def _token_problem(token: str) -> str | None:
    if not token.startswith(TOKEN_PREFIX):
        return f"Error: Token must start with '{TOKEN_PREFIX}'"
    if len(token) < MIN_TOKEN_LENGTH:
        return f"Error: Token too short (minimum {MIN_TOKEN_LENGTH} characters)"
    if not is_valid_token(token) or not token.isascii() or not token.isprintable() or " " in token:
        return "Error: Token may contain only printable ASCII characters, no spaces"
    return None


def _created(path: Path) -> None:
    print(
        f"lightd: created {path} with a new random master token (mode 0600);"
        f" show it with: lightd --config {path} --token what",
        file=sys.stderr,
    )


def token_command(command: str, path: Path) -> int:
    if command == "what":
        _require(path)
        auth = _read_raw(path).get("authorization")
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str) or not token:
            print("No token is set; create one with: lightd --token reset", file=sys.stderr)
            return 1
        print(f"Current Token: {token}")
        return 0
    if command == "reset":
        token = new_token()
        current = _read_raw(path) if path.exists() else create_config(path).raw
        write_config(path, current, {"authorization": {"token": token}})
        print("✓ Token reset successfully!")
        print(f"New Token: {token}")
        return 0
    # set: read and check the token before anything is written
    raw = _read_raw(path) if path.exists() else None
    token = _read_token(
        f"Enter the new token ({TOKEN_PREFIX}…, at least {MIN_TOKEN_LENGTH} characters): "
    )
    if (problem := _token_problem(token)) is not None:
        print(problem, file=sys.stderr)
        return 1
    if raw is None:
        raw = create_config(path).raw
        _created(path)
    write_config(path, raw, {"authorization": {"token": token}})
    print("✓ Token set successfully!")
    return 0


def config_check(path: Path, *, as_json: bool = False) -> int:
    """``lightd config check``: every error, then every warning; exit 1 on an error."""
    from .diagnostics import CheckResult, check_config

    try:
        result = check_config(path)
    except ConfigError as exc:  # unreadable as a whole: that is the one error to list
        result = CheckResult(path=path, errors=[str(exc)], warnings=[])
    if as_json:
        shown = {"path": str(path), "errors": result.errors, "warnings": result.warnings}
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    else:
        for error in result.errors:
            print(f"error: {error}")
        for warning in result.warnings:
            print(f"warning: {warning}")
        verdict = "invalid" if result.errors else "valid"
        counts = f"{len(result.errors)} error(s), {len(result.warnings)} warning(s)"
        print(f"{path}: {verdict} ({counts})")
    return 1 if result.errors else 0


def _load_with_sections(path: Path) -> LoadedConfig:
    """The config as the agent reads it: core and every loaded plugin's sections."""
    from .diagnostics import plugin_sections

    _require(path)
    core = load_config(path)
    return load_config(path, plugin_sections(core.raw))


def diagnostics(path: Path, *, as_json: bool = False) -> int:
    from .diagnostics import collect, render_text

    loaded = _load_with_sections(path)
    # The report says whether the engine answers; its reconnect warnings would only repeat it.
    logging.getLogger("lightd.docker").setLevel(logging.CRITICAL)
    report = collect(loaded)
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render_text(report))
    return 0


def servers(path: Path, page: int, *, as_json: bool = False) -> int:
    from .containers.listing import listing, render

    _require(path)
    loaded = load_config(path)
    if as_json:
        print(json.dumps(listing(loaded, page or None), indent=2, ensure_ascii=False))
    else:
        sys.stdout.write(render(loaded, page or 1))
    return 0


#: Seconds between serving and the one full collection that precedes ``gc.freeze``.
SETTLE_AFTER = 1.0


async def _settle_memory(agent: Agent) -> None:
    """Once the agent has served for a moment, free what start-up left behind and move
    what it made (modules, classes, the app, the config) out of the collector's reach.

    The collector is off until then: start-up makes some 80 000 objects that live as long
    as the process, and collecting while they are made took a tenth of the start-up. One
    full collection then frees the little garbage (classes that attrs replaced); it is a
    pause of some 50 ms, so it comes after the first requests rather than before.
    ``gc.freeze`` keeps later full collections from scanning it all again: that is what
    made them long (473 ms measured during a 100-container churn, 92 ms frozen)."""
    with trio.move_on_after(SETTLE_AFTER):
        await agent.wait_stop_requested()
        return  # stopping already: the process ends soon, with the collector back on
    gc.collect()
    gc.freeze()
    gc.enable()


class _SettleWhenServing:
    """``serve_agent``'s ``task_status``: once it serves, ``_settle_memory`` runs beside it
    (a system task: cancelled when the agent ends, and no nursery around ``serve_agent``,
    whose start-up errors must reach ``main`` as they are)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def started(self, value: object = None) -> None:
        trio.lowlevel.spawn_system_task(_settle_memory, self.agent)


def _raise_open_files_limit() -> None:
    """Every running server holds sockets (its attach) and big file jobs hold a descriptor
    per folder level; a service's usual soft limit of 1024 is far too low for a node."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "plugin":
        return plugin_new(args.name, Path(args.dir))
    if args.command == "config":
        path = locate_config(args.path or args.config)
    else:
        path = locate_config(args.config)
    try:
        level, fmt = log_settings(args, _quiet_raw(path), os.environ)
        setup_logging(level, fmt)
        if args.command == "config":
            return config_check(path, as_json=args.json)
        if args.command == "diagnostics":
            return diagnostics(path, as_json=args.json)
        if args.token:
            return token_command(args.token, path)
        if args.servers is not None:
            return servers(path, args.servers, as_json=args.json)
        if not path.exists():
            create_config(path)
            _created(path)
        gc.disable()  # until _settle_memory
        try:
            from .api.tokens import fingerprint_early
            from .runtime import open_agent
            from .server import serve_agent

            _raise_open_files_limit()

            async def run() -> None:
                def early(config: Config) -> None:
                    fingerprint_early(config.authorization.token)

                async with open_agent(path, on_config=early) as agent:
                    settle = _SettleWhenServing(agent)
                    await serve_agent(agent, handle_signals=True, task_status=settle)

            trio.run(run)
        finally:
            gc.enable()
    except _Missing:
        print(
            f"lightd: config file {path} does not exist (serving or --token reset creates it)",
            file=sys.stderr,
        )
        return 2
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
