"""``lightd config check`` and ``lightd diagnostics``: what an operator runs before a restart
and attaches to a support ticket.

Both work without a running agent and never write anything. ``check_config`` walks the file
section by section and field by field, so it lists every error (the loader stops at the
first) and every key no model declares. ``collect`` gathers the support report; every
string that leaves it went through ``redact`` (config), ``redact_text`` (anything read from
outside: iptables, the error log, engine messages) and, last, a scrub of the secret values
the config file holds, so a token never reaches a ticket whatever the path.
"""

from __future__ import annotations

import grp
import importlib.metadata
import json
import os
import platform
import pwd
import shutil
import sqlite3
import ssl
import stat
import subprocess
import sys
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ._version import __version__
from .config import (
    Config,
    LoadedConfig,
    deep_merge,
    is_secret_key,
    redact,
    redact_text,
)
from .containers.network import API_CHAIN
from .converter import STRUCTURE_ERRORS, FieldError, converter, describe_errors, unstructure
from .docker import DockerEngine, docker_url
from .errors import ConfigError, PluginError
from .logs import errors_path
from .logs import recent_errors as read_recent_errors
from .plugin_manager import Hooks, describe_plugins, make_plugin_manager
from .runtime import StoragePaths
from .store import DB_NAME

__all__ = ["CheckResult", "check_config", "collect", "render_text", "scrub"]

#: The libraries a support answer usually hinges on (absent ones are shown as such).
LIBRARIES = (
    "trio",
    "quart",
    "quart-trio",
    "hypercorn",
    "httpx",
    "httpcore",
    "attrs",
    "cattrs",
    "pluggy",
    "prometheus-client",
    "msgspec",
)
#: Seconds the report waits for the engine and for each iptables call.
ENGINE_TIMEOUT = 5.0
IPTABLES_TIMEOUT = 5.0
RECENT_ERRORS = 20
OUTBOX_TABLE = "remote_sync_outbox"
#: The top-level keys the core's own model reads (plugins may not take them).
CORE_KEYS = frozenset(a.name for a in attrs.fields(Config)) - {"sections"}


# -- config check ------------------------------------------------------------------------


@attrs.frozen
class CheckResult:
    path: Path
    errors: list[str]
    warnings: list[str]


def _is_attrs_class(tp: Any) -> bool:
    return isinstance(tp, type) and attrs.has(tp)


def _optional_attrs(tp: Any) -> type | None:
    """``X`` for a field typed ``X | None`` with ``X`` an attrs class."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(inner) == 1 and _is_attrs_class(inner[0]):
            return typing.cast("type", inner[0])
    return None


def _check_object(
    value: Any, cls: type, path: str, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, str, str]]:
    """``(kind, key, message)`` for every problem of ``value`` read as ``cls``: each field
    structured and validated on its own (so one bad field does not hide the next), each
    unknown key a warning, then the whole object once for checks that span fields."""
    if not isinstance(value, dict):
        yield "error", path, "must be an object"
        return
    attrs.resolve_types(cls)
    fields = {f.name: f for f in attrs.fields(cls) if f.name not in skip and f.init}
    for key in value:
        if key not in fields and key not in skip:
            yield "warning", f"{path}.{key}" if path else key, "unknown key (ignored)"
    found = False
    for name, field in fields.items():
        where = f"{path}.{name}" if path else name
        if name not in value:
            if field.default is attrs.NOTHING:
                found = True
                yield "error", where, "is required"
            continue
        item = value[name]
        nested = field.type if _is_attrs_class(field.type) else _optional_attrs(field.type)
        if nested is not None and (item is not None or _is_attrs_class(field.type)):
            for problem in _check_object(item, nested, where):
                found = found or problem[0] == "error"
                yield problem
            continue
        try:
            structured: Any = converter.structure(item, typing.cast("type", field.type))
            if field.validator is not None:
                field.validator(None, field, structured)
        except FieldError as exc:
            found = True
            yield "error", where, exc.message
        except STRUCTURE_ERRORS as exc:
            found = True
            for sub, message in describe_errors(exc, where):
                yield "error", sub, message
    if not found:  # __attrs_post_init__ and other checks that see the whole object
        try:
            converter.structure({k: v for k, v in value.items() if k not in skip}, cls)
        except STRUCTURE_ERRORS as exc:
            for sub, message in describe_errors(exc, path):
                yield "error", sub, message


def _tls_problem(raw: Mapping[str, Any], directory: Path) -> str | None:
    """What the agent would say at start about ``server.tls`` (it loads the pair)."""
    server = raw.get("server")
    tls = server.get("tls") if isinstance(server, dict) else None
    if not isinstance(tls, dict) or not all(isinstance(tls.get(k), str) for k in ("cert", "key")):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(directory / tls["cert"]), str(directory / tls["key"]))
    except (OSError, ssl.SSLError) as exc:
        return f"cannot load the certificate and key: {getattr(exc, 'strerror', None) or exc}"
    return None


def plugin_sections(raw: Mapping[str, Any]) -> dict[str, type]:
    """The config sections of the plugins this file would load (its ``plugins.disabled``
    honoured when it is readable)."""
    plugins = raw.get("plugins")
    disabled = plugins.get("disabled") if isinstance(plugins, dict) else None
    names = [d for d in disabled if isinstance(d, str)] if isinstance(disabled, list) else []
    return Hooks(make_plugin_manager(names)).config_sections()


def check_config(path: Path) -> CheckResult:
    """Every error and unknown key of the config file at ``path``; ``ConfigError`` when it
    cannot be read as a JSON object at all, ``PluginError`` when a plugin cannot load."""
    if not path.exists():
        raise ConfigError("", "the file does not exist")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", "the file is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ConfigError("", f"not valid JSON ({where}: {exc.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError("", "the file must hold a JSON object")
    sections = plugin_sections(raw)
    problems = list(_check_object(raw, Config, "", skip=frozenset({"sections", *sections})))
    for name, cls in sections.items():
        if name in CORE_KEYS:
            problems.append(("error", name, "a plugin may not redefine a core section"))
        elif name in raw:
            problems.extend(_check_object(raw[name], cls, name))
    errors = [
        f"{key}: {message}" if key else message
        for kind, key, message in problems
        if kind == "error"
    ]
    warnings = [f"{key}: {message}" for kind, key, message in problems if kind == "warning"]
    if not errors and (tls := _tls_problem(raw, path.parent)) is not None:
        errors.append(f"server.tls: {tls}")
    if not errors:  # the loader itself is the last word: nothing it refuses may pass
        from .config import parse_config

        try:
            parse_config(raw, sections)
        except ConfigError as exc:
            errors.append(str(exc))
    return CheckResult(path=path, errors=list(dict.fromkeys(errors)), warnings=warnings)


# -- diagnostics -------------------------------------------------------------------------


def effective_config(loaded: LoadedConfig) -> dict[str, Any]:
    """The file's raw JSON with every typed value (defaults included) laid over it, as
    ``GET /remote/config`` shows it (lightd.api.system does the same from an agent)."""
    typed: dict[str, Any] = unstructure(loaded.config)
    for name, section in loaded.config.sections.items():
        typed[name] = unstructure(section)
    return deep_merge(loaded.raw, typed)


def secret_values(value: Any, secret: bool = False) -> set[str]:
    """Every string the config holds under a secret key (tokens, passwords…)."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        for key, item in value.items():
            found |= secret_values(item, secret or (isinstance(key, str) and is_secret_key(key)))
    elif isinstance(value, list | tuple):
        for item in value:
            found |= secret_values(item, secret)
    elif secret and isinstance(value, str) and len(value) >= 4:
        found.add(value)
    return found


def scrub(value: Any, secrets: set[str]) -> Any:
    """``value`` with every known secret string, and anything ``redact_text`` recognises,
    masked: the report's last line of defence."""
    if isinstance(value, Mapping):
        return {key: scrub(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(item, secrets) for item in value]
    if isinstance(value, str):
        for secret in sorted(secrets, key=len, reverse=True):
            value = value.replace(secret, "***")
        return redact_text(value)
    return value


def _versions() -> dict[str, Any]:
    libraries: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = None
    return {
        "lightd": __version__,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "libraries": libraries,
    }


async def _engine_report(url: str) -> dict[str, Any]:
    engine = DockerEngine(url, timeout=ENGINE_TIMEOUT)
    engine.retry_max = engine.probe_interval = ENGINE_TIMEOUT
    report: dict[str, Any] = {"url": url, "reachable": False}
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.serve)
        if engine.available:
            try:
                version = await engine.version()
                info = await engine.system_info()
            except Exception as exc:  # an engine that answers oddly is still a report
                report["error"] = str(exc) or type(exc).__name__
            else:
                report.update(
                    reachable=True,
                    version=version.version,
                    api_version=version.api_version,
                    os=version.os,
                    arch=version.arch,
                    storage_driver=info.get("Driver"),
                    cgroup_version=info.get("CgroupVersion"),
                    cgroup_driver=info.get("CgroupDriver"),
                    docker_root_dir=info.get("DockerRootDir"),
                    containers=info.get("Containers"),
                    containers_running=info.get("ContainersRunning"),
                    images=info.get("Images"),
                )
        else:
            report["error"] = engine.last_error or "no answer"
        nursery.cancel_scope.cancel()
    return report


def engine_report(loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The engine the agent would use (``DOCKER_HOST``, else ``docker.socket_path``)."""
    environ = os.environ if environ is None else environ
    url = docker_url(loaded.config.docker.socket_path, environ)
    report = trio.run(_engine_report, url)
    report["source"] = "DOCKER_HOST" if environ.get("DOCKER_HOST") else "docker.socket_path"
    return report


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


def path_report(path: Path) -> dict[str, Any]:
    """Existence, owner, mode and the free space of the file system holding ``path``."""
    report: dict[str, Any] = {"path": str(path), "exists": path.exists()}
    try:
        st = path.stat()
    except OSError:
        pass
    else:
        report.update(owner=_owner(st), mode=oct(stat.S_IMODE(st.st_mode)))
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        usage = shutil.disk_usage(existing)
    except OSError:
        pass
    else:
        report.update(free_bytes=usage.free, total_bytes=usage.total)
    return report


def storage_report(loaded: LoadedConfig) -> dict[str, Any]:
    paths = StoragePaths.from_config(loaded.config, loaded.directory)
    return {
        "config_file": path_report(loaded.path),
        "base_path": path_report(paths.base),
        "containers_path": path_report(paths.containers),
        "volumes_path": path_report(paths.volumes),
        "state_file": path_report(paths.base / DB_NAME),
    }


def _chain_listed(program: str, chain: str) -> bool:
    """Whether ``<program> -S`` (every chain of the filter table) declares ``chain``."""
    try:
        result = subprocess.run(
            [program, "-w", "-S"],
            capture_output=True,
            text=True,
            timeout=IPTABLES_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: report the error as it came
    return result.returncode != 0 or f"-N {chain}" in result.stdout.splitlines()


def chain_report(program: str, chain: str) -> dict[str, Any]:
    """``<program> -S <chain>``, or why it could not be read."""
    found = shutil.which(program)
    if found is None:
        return {"chain": chain, "state": "not available", "reason": f"{program} not found"}
    try:
        result = subprocess.run(
            [found, "-w", "-S", chain],
            capture_output=True,
            text=True,
            timeout=IPTABLES_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"chain": chain, "state": "not available", "reason": str(exc)}
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
        if not _chain_listed(found, chain):  # iptables-nft words a missing chain oddly
            return {"chain": chain, "state": "missing"}
        return {
            "chain": chain,
            "state": "not available",
            "reason": reason[0],
        }
    return {"chain": chain, "state": "present", "rules": result.stdout.splitlines()}


def firewall_report(effective: Mapping[str, Any]) -> dict[str, Any]:
    network = effective.get("network") if isinstance(effective.get("network"), dict) else None
    report: dict[str, Any] = {"api_guard": chain_report("iptables", API_CHAIN)}
    if network is None:
        report["port_pool"] = {
            "state": "not available",
            "reason": "the port_pool plugin is not loaded",
        }
    else:
        # The pool's rules are in the firewall plugin's chain (network.manage_firewall).
        section = effective.get("firewall")
        firewall = section if isinstance(section, dict) else {}
        program = str(firewall.get("iptables", "auto"))
        if program in ("auto", "nft", "legacy"):
            program = "iptables" if program == "auto" else f"iptables-{program}"
        pool = chain_report(program, str(firewall.get("chain", "LIGHTD-FW")))
        pool["managed"] = bool(network.get("manage_firewall"))
        report["port_pool"] = pool
    return report


def _table_count(db: Path, table: str) -> int | None:
    if not db.exists():
        return None
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return None
    try:
        return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return None
    finally:
        conn.close()


def remote_report(loaded: LoadedConfig, effective: Mapping[str, Any]) -> dict[str, Any]:
    """Remote sync as the files show it: on or off, the panel's host (never the URL's
    path, user or query), and the updates waiting in the outbox."""
    remote = effective.get("remote")
    if not isinstance(remote, dict):
        return {"enabled": False, "reason": "the remote_sync plugin is not loaded"}
    try:
        parts = urlsplit(str(remote.get("url", "")))
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
    except ValueError:
        host = ""
    base = StoragePaths.from_config(loaded.config, loaded.directory).base
    return {
        "enabled": bool(remote.get("enabled")),
        "panel_host": host,
        "token_set": bool(remote.get("token")),
        "outbox_depth": _table_count(base / DB_NAME, OUTBOX_TABLE),
    }


def recent_errors(loaded: LoadedConfig, count: int = RECENT_ERRORS) -> dict[str, Any]:
    path = errors_path(StoragePaths.from_config(loaded.config, loaded.directory).base)
    try:
        entries = read_recent_errors(path, count)
    except OSError as exc:
        return {"path": str(path), "entries": [], "error": exc.strerror or str(exc)}
    return {"path": str(path), "entries": entries}


def plugins_report(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    plugins = raw.get("plugins")
    disabled = plugins.get("disabled") if isinstance(plugins, dict) else None
    names = [d for d in disabled if isinstance(d, str)] if isinstance(disabled, list) else []
    return [
        {k: p[k] for k in ("name", "builtin", "origin", "version")}
        for p in describe_plugins(make_plugin_manager(names))
    ]


def collect(loaded: LoadedConfig, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The whole report, secrets masked (``loaded`` is read with every plugin's sections)."""
    effective = effective_config(loaded)
    try:
        plugins: Any = plugins_report(loaded.raw)
    except PluginError as exc:
        plugins = {"error": str(exc)}
    report = {
        "versions": _versions(),
        "config": {"path": str(loaded.path), "effective": redact(effective)},
        "docker": engine_report(loaded, environ),
        "storage": storage_report(loaded),
        "firewall": firewall_report(effective),
        "remote": remote_report(loaded, effective),
        "plugins": plugins,
        "recent_errors": recent_errors(loaded),
    }
    return typing.cast("dict[str, Any]", scrub(report, secret_values(loaded.raw)))


# -- text --------------------------------------------------------------------------------


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def _line(label: str, value: Any) -> str:
    shown = "-" if value is None or value == "" else value
    return f"  {label + ':':<18} {shown}"


def render_text(report: Mapping[str, Any]) -> str:
    """The report for a human (and a ticket): one titled block per part."""
    out: list[str] = []
    v = report["versions"]
    out += ["lightd diagnostics", ""]
    out += ["Versions", _line("lightd", v["lightd"]), _line("python", v["python"])]
    out += [_line("platform", v["platform"])]
    out += [_line(name, version or "not installed") for name, version in v["libraries"].items()]
    d = report["docker"]
    out += ["", "Docker engine", _line("url", f"{d['url']} (from {d['source']})")]
    if d["reachable"]:
        out += [
            _line("reachable", "yes"),
            _line("version", d["version"]),
            _line("API version", d["api_version"]),
            _line("OS/arch", f"{d['os']}/{d['arch']}"),
            _line("storage driver", d["storage_driver"]),
            _line("cgroup", f"v{d['cgroup_version']} ({d['cgroup_driver']})"),
            _line("root dir", d["docker_root_dir"]),
            _line("containers", f"{d['containers']} ({d['containers_running']} running)"),
        ]
    else:
        out += [_line("reachable", f"no ({d.get('error', 'no answer')})")]
    out += ["", "Storage"]
    for name, item in report["storage"].items():
        if item["exists"]:
            detail = f"{item['path']}  {item.get('owner', '?')} {item.get('mode', '?')}"
        else:
            detail = f"{item['path']}  (missing)"
        out.append(_line(name, f"{detail}, {_size(item.get('free_bytes'))} free"))
    out += ["", "Firewall"]
    for name, chain in report["firewall"].items():
        label = f"{name} ({chain.get('chain', '-')})"
        state = chain["state"]
        if "managed" in chain:
            state += ", managed" if chain["managed"] else ", not managed (network.manage_firewall)"
        if chain.get("reason"):
            state += f": {chain['reason']}"
        out.append(_line(label, state))
        out += [f"      {rule}" for rule in chain.get("rules", [])]
    r = report["remote"]
    out += ["", "Remote sync", _line("enabled", "yes" if r["enabled"] else "no")]
    if "panel_host" in r:
        out += [
            _line("panel host", r["panel_host"]),
            _line("token set", "yes" if r["token_set"] else "no"),
        ]
        depth = r["outbox_depth"]
        out.append(_line("outbox depth", "no state file yet" if depth is None else depth))
    elif r.get("reason"):
        out.append(_line("note", r["reason"]))
    out += ["", "Plugins"]
    plugins = report["plugins"]
    if isinstance(plugins, dict):
        out.append(_line("error", plugins["error"]))
    else:
        for p in plugins:
            origin = "built-in" if p["builtin"] else p.get("origin", "external")
            out.append(_line(p["name"], f"{origin} {p['version'] or ''}".strip()))
    errors = report["recent_errors"]
    out += ["", f"Recent warnings and errors ({errors['path']})"]
    if errors.get("error"):
        out.append(f"  cannot read: {errors['error']}")
    elif not errors["entries"]:
        out.append("  none")
    for entry in errors["entries"]:
        out.append(
            "  " + (json.dumps(entry, ensure_ascii=False) if not isinstance(entry, str) else entry)
        )
    out += ["", f"Config ({report['config']['path']}, secrets masked)"]
    shown = json.dumps(report["config"]["effective"], indent=2, ensure_ascii=False)
    out += ["  " + line for line in shown.splitlines()]
    return "\n".join(out) + "\n"
