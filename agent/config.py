"""config.json: typed model, lookup, first-run creation and atomic rewriting.

The file is the operator's: the agent reads it into frozen attrs classes (via the one
converter) but keeps the raw JSON beside them, so a rewrite (``--token reset``) changes only
what it means to change and every unknown key survives. Plugins add sections of their own
through ``lightd_add_config_sections``; each is structured from the same file with its
defaults filling what is absent.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
from cattrs.gen import make_dict_unstructure_fn, override

from .converter import (
    STRUCTURE_ERRORS,
    converter,
    describe_error,
    field_check,
    object_structure_fn,
)
from .errors import ConfigError

__all__ = [
    "CONFIG_ENV",
    "TOKEN_PREFIX",
    "AuthorizationConfig",
    "Config",
    "DockerConfig",
    "LoadedConfig",
    "LogConfig",
    "PluginsConfig",
    "RateLimitConfig",
    "RegistryCredentials",
    "ServerConfig",
    "StorageConfig",
    "TlsConfig",
    "create_config",
    "deep_merge",
    "is_secret_key",
    "is_valid_token",
    "load_config",
    "locate_config",
    "new_token",
    "parse_config",
    "redact",
    "redact_text",
    "write_config",
]

T = TypeVar("T")

CONFIG_ENV = "LIGHTD_CONFIG"
TOKEN_PREFIX = "lightd_"
MIN_TOKEN_LENGTH = 20
CONFIG_FORMAT_VERSION = "0.2.1"


def new_token() -> str:
    """A fresh random token: ``lightd_`` + 32 hex digits (128 bits)."""
    return TOKEN_PREFIX + secrets.token_hex(16)


def is_valid_token(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX) and len(token) >= MIN_TOKEN_LENGTH


def _port(value: int) -> bool:
    return 0 <= value <= 65535


_positive = field_check(lambda v: v > 0, "must be > 0")


def _non_empty(value: str) -> bool:
    return bool(value.strip())


@attrs.frozen(kw_only=True)
class TlsConfig:
    """``server.tls``: serve HTTPS and WSS with this PEM certificate (chain) and private
    key; relative paths are relative to config.json's folder. Loaded at start: a file that
    is missing or does not hold a matching pair is a config error naming ``server.tls``."""

    cert: str = attrs.field(validator=field_check(_non_empty, "must be a file path"))
    key: str = attrs.field(validator=field_check(_non_empty, "must be a file path"))


@attrs.frozen
class RateLimitConfig:
    """``server.rate_limit`` (contract §17): a token bucket per token on the REST API,
    refilled at ``requests_per_minute`` / 60 per second, holding at most ``burst``.
    ``requests_per_minute`` 0 turns it off. Temporary tokens are limited; the master token
    only with ``master: true``. A reload applies a change at once (``lightd.api.ratelimit``)."""

    requests_per_minute: int = attrs.field(
        default=600, validator=field_check(lambda v: v >= 0, "must be >= 0 (0 = off)")
    )
    burst: int = attrs.field(default=100, validator=field_check(lambda v: v >= 1, "must be >= 1"))
    master: bool = False


@attrs.frozen
class ServerConfig:
    host: str = "0.0.0.0"
    #: 0 binds any free port (tests); the bound address is logged.
    port: int = attrs.field(default=8070, validator=field_check(_port, "must be 0 to 65535"))
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = attrs.field(
        default=8 * 1024 * 1024, validator=field_check(lambda v: v >= 1024, "must be >= 1024")
    )
    #: Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cut.
    graceful_timeout: float = attrs.field(
        default=5.0, validator=field_check(lambda v: v >= 0, "must be >= 0")
    )
    #: HTTPS and WSS instead of plain HTTP (none: plain, e.g. behind a TLS proxy).
    tls: TlsConfig | None = None
    #: Requests per token on the REST API (``RateLimitConfig``).
    rate_limit: RateLimitConfig = attrs.Factory(RateLimitConfig)


@attrs.frozen(kw_only=True)
class AuthorizationConfig:
    enabled: bool = True
    #: The master token; required, there is no usable default.
    token: str = attrs.field(
        validator=field_check(
            is_valid_token, f"must start with {TOKEN_PREFIX} and be at least 20 characters"
        ),
    )


@attrs.frozen
class RegistryCredentials:
    """One entry of ``docker.registries``: the login for a private registry's pulls. The
    password never leaves the agent but in the pull's ``X-Registry-Auth`` header (masked
    in every shown config, kept out of ``repr``)."""

    username: str = attrs.field(validator=field_check(_non_empty, "must not be empty"))
    password: str = attrs.field(repr=False, validator=field_check(_non_empty, "must not be empty"))


#: A registry as ``docker.registries`` names it: ``host[:port]``, optionally as a URL
#: (``https://index.docker.io/v1/``); Docker Hub is ``docker.io``.
_REGISTRY_KEY = re.compile(
    r"(?:https?://)?[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?(?:/[^\s]*)?"
)


def _registry_keys(value: dict[str, RegistryCredentials]) -> bool:
    return all(_REGISTRY_KEY.fullmatch(key) is not None for key in value)


@attrs.frozen
class DockerConfig:
    socket_path: str = "/var/run/docker.sock"
    #: Seconds a single Docker control call may take before it is treated as a failure.
    timeout: float = attrs.field(default=60.0, validator=_positive)
    #: Host folders under which a container's ``mount`` may bind host paths (none: no
    #: extra mounts at all).
    allowed_mounts: tuple[str, ...] = ()
    #: The agent's own bridge network: every container joins it, created at start when
    #: missing, containers on it cannot reach each other nor the API port.
    network: str = attrs.field(
        default="lightd0",
        validator=field_check(
            lambda v: re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v) is not None,
            "must be 1-64 characters of A-Z a-z 0-9 _ . - starting alphanumeric",
        ),
    )
    #: Logins for private registries, by registry host (``"ghcr.io"``, ``"docker.io"``,
    #: ``"registry.local:5000"``): used by image pulls (installs, ``POST /images/pull``)
    #: before the Docker client's own config file.
    registries: dict[str, RegistryCredentials] = attrs.field(
        factory=dict,
        validator=field_check(_registry_keys, "keys must be registry hosts (host[:port])"),
    )


@attrs.frozen
class StorageConfig:
    base_path: str = "./storage"
    containers_path: str = "./storage/containers"
    volumes_path: str = "./storage/volumes"
    #: Where the ``local`` backup target keeps archives; empty: ``<base_path>/backups``.
    backups_path: str = ""


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@attrs.frozen
class LogConfig:
    """``log``: how the agent logs (``--log-level``/``--log-format`` and the environment's
    ``LIGHTD_LOG_LEVEL`` win over these)."""

    level: str = attrs.field(
        default="info",
        validator=field_check(lambda v: v in LOG_LEVELS, f"must be one of {', '.join(LOG_LEVELS)}"),
    )
    format: str = attrs.field(
        default="text",
        validator=field_check(lambda v: v in LOG_FORMATS, "must be text or json"),
    )
    #: One line per HTTP request and WebSocket (method, route, status, time); never a token.
    access: bool = False


@attrs.frozen
class PluginsConfig:
    #: Plugin names (built-in short names or entry-point names) not to load.
    disabled: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Config:
    version: str = CONFIG_FORMAT_VERSION
    server: ServerConfig = attrs.Factory(ServerConfig)
    authorization: AuthorizationConfig
    docker: DockerConfig = attrs.Factory(DockerConfig)
    storage: StorageConfig = attrs.Factory(StorageConfig)
    plugins: PluginsConfig = attrs.Factory(PluginsConfig)
    log: LogConfig = attrs.Factory(LogConfig)
    #: Plugin sections by name, structured from their declared classes.
    sections: Mapping[str, object] = attrs.field(factory=dict, eq=False, repr=False)

    def section(self, cls: type[T]) -> T:
        """The section a plugin declared with ``cls`` (its defaults when the file has none).

        Sections are looked up by their class, so the value comes back typed; a class no
        plugin declared raises ``KeyError``.
        """
        for value in self.sections.values():
            if type(value) is cls:
                return value
        raise KeyError(f"no config section is declared with {cls.__qualname__}")

    def section_or_default(self, cls: type[T]) -> T:
        """``section(cls)``, or ``cls()`` (its defaults) when no plugin declared it (a
        config built by hand, or the declaring plugin disabled)."""
        try:
            return self.section(cls)
        except KeyError:
            return cls()


converter.register_structure_hook(Config, object_structure_fn(Config, sections=override(omit=True)))
converter.register_unstructure_hook(
    Config, make_dict_unstructure_fn(Config, converter, sections=override(omit=True))
)

_CORE_KEYS = frozenset(a.name for a in attrs.fields(Config)) - {"sections"}


@attrs.frozen
class LoadedConfig:
    """A parsed config file: where it lives, its raw JSON, and the typed view of it."""

    path: Path
    raw: dict[str, Any]
    config: Config

    @property
    def directory(self) -> Path:
        """Relative storage paths in the file are relative to the file's own folder."""
        return self.path.parent


def locate_config(cli_path: str | None, environ: Mapping[str, str] | None = None) -> Path:
    """``--config``, else ``$LIGHTD_CONFIG``, else ``./config.json``."""
    environ = os.environ if environ is None else environ
    chosen = cli_path or environ.get(CONFIG_ENV) or "config.json"
    return Path(chosen).expanduser().absolute()


def parse_config(raw: Any, sections: Mapping[str, type] | None = None) -> Config:
    """Structure raw JSON into a ``Config``; the first bad key raises ``ConfigError``."""
    if not isinstance(raw, dict):
        raise ConfigError("", "the file must hold a JSON object")
    try:
        config = converter.structure(raw, Config)
    except STRUCTURE_ERRORS as exc:
        raise ConfigError(*describe_error(exc)) from None
    parsed: dict[str, Any] = {}
    for name, cls in (sections or {}).items():
        if not attrs.has(cls):
            raise ConfigError(name, f"the section's class {cls.__qualname__} is not an attrs class")
        if name in _CORE_KEYS:
            raise ConfigError(name, "a plugin may not redefine a core section")
        value = raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(name, "must be an object")
        try:
            parsed[name] = converter.structure(value, cls)
        except STRUCTURE_ERRORS as exc:
            raise ConfigError(*describe_error(exc, name)) from None
    return attrs.evolve(config, sections=parsed)


def load_config(path: Path, sections: Mapping[str, type] | None = None) -> LoadedConfig:
    """Read and validate ``path``; any problem raises ``ConfigError`` naming the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "the file does not exist") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read the file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("", "the file is not UTF-8 text") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno}, column {exc.colno}"
        raise ConfigError("", f"not valid JSON ({where}: {exc.msg})") from None
    return LoadedConfig(path=path, raw=raw, config=parse_config(raw, sections))


def create_config(path: Path) -> LoadedConfig:
    """Write a default config with a fresh master token (mode 0600) and return it."""
    config = Config(authorization=AuthorizationConfig(token=new_token()))
    raw: dict[str, Any] = converter.unstructure(config)
    write_config(path, raw)
    return LoadedConfig(path=path, raw=raw, config=config)


def deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` laid over it, objects merged key by key; neither is modified."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_config(
    path: Path, raw: Mapping[str, Any], update: Mapping[str, Any] = {}
) -> dict[str, Any]:
    """Atomically write ``raw`` with ``update`` deep-merged over it; returns what was written.

    The file is written beside its final place with mode 0600, synced, then renamed over
    the old one, so a crash leaves either the old file or the new one, never half of each.
    """
    data = deep_merge(dict(raw), update)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return data


#: Key names holding secrets, matched on the key lower-cased with ``_``, ``-``, ``.`` and
#: spaces removed (``api_key``, ``apiKey``, ``API-Key`` are all ``apikey``).
_SECRET_PARTS = (
    "token",
    "secret",
    "passw",  # password, passwd
    "passphrase",
    "credential",
    "apikey",
    "private",
)
#: Whole words (split on ``_ - .``, spaces and camelCase) that mark a secret on their own.
_SECRET_WORDS = frozenset({"key", "keys", "pass", "pwd", "auth", "signature", "cookie"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
#: ``scheme://userinfo@``: the authority runs to the first ``/ ? #``, so a password holding
#: a raw ``@`` is still masked whole (the last ``@`` ends the userinfo).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")
_QUERY_PARAM = re.compile(r"(?P<lead>[?&;](?P<name>[^=&#;\s]+)=)(?P<value>[^&#;\s]*)")
_BARE_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"[0-9A-Za-z]{16,}")


def is_secret_key(key: str) -> bool:
    """Whether a config key names a secret (by a pattern list, not only a suffix)."""
    flat = re.sub(r"[\s_.\-]", "", key).lower()
    if any(part in flat for part in _SECRET_PARTS):
        return True
    return any(word.lower() in _SECRET_WORDS for word in _WORD.findall(key))


def _mask(text: str) -> str:
    return "lightd_***" if text.startswith(TOKEN_PREFIX) else "***"


def _mask_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    shown = f"{user}:***" if colon else "***"  # no password: the user part is the secret
    return f"{match['scheme']}{shown}@"


def _mask_param(match: re.Match[str]) -> str:
    if match["value"] and is_secret_key(match["name"]):
        return f"{match['lead']}***"
    return match.group(0)


def redact_text(text: str) -> str:
    """A string with the secrets it carries by value masked: credentials in URLs
    (``https://user:pass@host`` → ``https://user:***@host``), secret query parameters
    (``?token=…``), and agent tokens (``lightd_…``)."""
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _QUERY_PARAM.sub(_mask_param, text)
    return _BARE_TOKEN.sub("lightd_***", text)


def redact(value: Any) -> Any:
    """A copy of config data with every secret replaced, for showing to API clients.

    By key: a string (or list of strings) under a key that ``is_secret_key`` matches is
    masked whole. By value: every other string goes through ``redact_text``. An empty
    secret stays empty: that it is unset is worth seeing, and reveals nothing.
    """
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and is_secret_key(key):
                out[key] = _redact_secret(item)
            else:
                out[key] = redact(item)
        return out
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return copy.copy(value)


def _redact_secret(item: Any) -> Any:
    if isinstance(item, str):
        return _mask(item) if item else item
    if isinstance(item, list | tuple) and all(isinstance(i, str) for i in item):
        return [_mask(i) if i else i for i in item]
    return redact(item)  # a mapping (a section named like a secret) or a number
