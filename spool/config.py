"""One frozen configuration object, from defaults < TOML file < environment < command-line flags."""

from __future__ import annotations

import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from spool.errors import ConfigError
from spool.records import T_FLOOR

DEFAULT_ENDPOINT = "https://api.stathat.com"
MAX_BATCH = 1000


def default_db_path(env: Mapping[str, str] = os.environ) -> Path:
    """Return $XDG_STATE_HOME/spool/spool.db (~/.local/state/spool/spool.db when unset)."""
    state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state_home) / "spool" / "spool.db"


DEFAULT_MAX_FILE = 256 << 20


class WatchConfig(NamedTuple):
    """One watched drop directory (a [[watch]] table)."""

    path: Path
    poll: bool = False  # poll instead of inotify (NFS, some FUSE mounts)
    poll_interval: float = 1.0
    settle: float = 1.0  # a file found by a scan or a poll must be this old (unchanged) before it is read
    rescan: float = 30.0  # seconds between rescans of the directory (events can be lost)
    after: str = "move"  # "move" ingested files to DIR/.done/, or "delete" them
    skip_invalid: bool = False  # take a file's good records and report the bad ones, instead of rejecting it
    max_bytes: int = DEFAULT_MAX_FILE


class Limits(NamedTuple):
    """Bounds on the spool ([spool] max_pending, max_spool_bytes, max_age, when_full). None: unbounded."""

    max_pending: int | None = None  # records waiting to be shipped
    max_spool_bytes: int | None = None  # bytes of the spool file in use
    max_age: float | None = None  # seconds: records whose t is older are not shipped, and are dropped
    when_full: str = "drop_oldest"  # or "reject_new"

    @property
    def active(self) -> bool:
        return self.max_pending is not None or self.max_spool_bytes is not None


class RelayConfig(NamedTuple):
    """The [relay] table: a local StatHat-compatible endpoint (and StatsD listener)."""

    enabled: bool = False  # run the relay as part of `spool run`
    listen: str = "127.0.0.1:8080"
    allow_remote: bool = False  # binding a non-loopback address must be asked for
    statsd: str | None = None  # "HOST:PORT" to take StatsD over UDP (127.0.0.1:8125 is the custom)
    statsd_prefix: str = ""
    statsd_buffer: int = 1 << 20  # the UDP socket's receive buffer (SO_RCVBUF), bytes
    max_body: int = 1 << 20
    request_timeout: float = 10.0  # a request must arrive whole within this
    max_connections: int = 64


class Config(NamedTuple):
    """Everything spool can be told; every field has a TOML key (see packaging/spool.toml).

    A NamedTuple rather than a dataclass: immutable, and cheap to import on the `spool add` path.
    """

    db: Path
    synchronous: str = "full"
    retention: float = 7 * 86400.0
    t_floor: int = T_FLOOR
    limits: Limits = Limits()
    compact_counts: int = 0  # seconds of a compaction bucket; 0: off
    endpoint: str = DEFAULT_ENDPOINT
    ezkey: str | None = None  # a secret: never in repr, logs or status
    allow_insecure: bool = False
    batch_size: int = 500
    timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 60.0
    retry_after_max: float = 600.0
    lease_timeout: float = 300.0
    idle_poll: float = 2.0
    max_requests_per_second: float = 20.0  # 0: unpaced
    max_in_flight: int = 8  # requests under way at once at most (the shipper adapts below this)
    unhealthy_after: float = 900.0  # /healthz: degraded when records wait and nothing was delivered this long
    reconnect_jitter: float = 10.0  # `spool run` waits a random part of this before its first drain
    log_level: str = "info"
    summary_interval: float = 60.0
    watch: tuple[WatchConfig, ...] = ()
    relay: RelayConfig = RelayConfig()

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={'<hidden>' if name == 'ezkey' and value else repr(value)}"
                          for name, value in zip(self._fields, self, strict=True))
        return f"Config({shown})"

    def replace(self, **changes: Any) -> Config:
        return self._replace(**changes)


_DURATION = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$"
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def parse_duration(value: object, name: str) -> float:
    """Parse seconds given as a number or as text like '500ms', '30s', '5m', '2h', '7d'."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := re.match(_DURATION, value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ConfigError(f"{name} must be a duration like 30, '30s', '5m' or '7d', not {value!r}")
    if seconds < 0:
        raise ConfigError(f"{name} must not be negative")
    return seconds


def _positive_int(limit: int | None = None) -> Callable[[object, str], int]:
    def parse(value: object, name: str) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive whole number, not {value!r}")
        if limit is not None and value > limit:
            raise ConfigError(f"{name} must be at most {limit}, not {value}")
        return value
    return parse


def _non_negative_number(value: object, name: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ConfigError(f"{name} must be a number >= 0, not {value!r}")
    return float(value)


def _choice(*choices: str) -> Callable[[object, str], str]:
    def parse(value: object, name: str) -> str:
        text = str(value).lower()
        if text not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
        return text
    return parse


def _boolean(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{name} must be true or false, not {value!r}")


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string")
    return value.strip()


def _path(value: object, name: str) -> Path:
    return Path(_text(value, name)).expanduser()


def _t_floor(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be unix seconds (a whole number >= 0), not {value!r}")
    return value


# TOML section -> key -> (Config field, parser). "ezkey_file" is read into the ezkey field.
_SCHEMA: dict[str, dict[str, tuple[str, Callable[[object, str], Any]]]] = {
    "spool": {
        "path": ("db", _path),
        "synchronous": ("synchronous", _choice("full", "normal")),
        "retention": ("retention", parse_duration),
        "t_floor": ("t_floor", _t_floor),
        "max_pending": ("limits.max_pending", lambda value, name: _positive_int()(value, name)),
        "max_spool_bytes": ("limits.max_spool_bytes", lambda value, name: _byte_size(value, name)),
        "max_age": ("limits.max_age", parse_duration),
        "when_full": ("limits.when_full", _choice("drop_oldest", "reject_new")),
        "compact_counts": ("compact_counts", lambda value, name: int(parse_duration(value, name))),
    },
    "ship": {
        "endpoint": ("endpoint", _text),
        "ezkey": ("ezkey", _text),
        "ezkey_file": ("ezkey", lambda value, name: read_key_file(_path(value, name))),
        "allow_insecure": ("allow_insecure", _boolean),
        "batch_size": ("batch_size", _positive_int(MAX_BATCH)),
        "timeout": ("timeout", parse_duration),
        "backoff_initial": ("backoff_initial", parse_duration),
        "backoff_max": ("backoff_max", parse_duration),
        "retry_after_max": ("retry_after_max", parse_duration),
        "lease_timeout": ("lease_timeout", parse_duration),
        "idle_poll": ("idle_poll", parse_duration),
        "max_requests_per_second": ("max_requests_per_second", _non_negative_number),
        "max_in_flight": ("max_in_flight", _positive_int(64)),
        "unhealthy_after": ("unhealthy_after", parse_duration),
        "reconnect_jitter": ("reconnect_jitter", parse_duration),
    },
    "log": {
        "level": ("log_level", _choice("debug", "info", "warning", "error")),
        "summary_interval": ("summary_interval", parse_duration),
    },
}
def _byte_size(value: object, name: str) -> int:
    """Parse a size given as a number of bytes or as text like '512KiB', '256MiB', '1GiB'."""
    units = {"": 1, "b": 1, "kib": 1 << 10, "kb": 1000, "mib": 1 << 20, "mb": 10**6, "gib": 1 << 30, "gb": 10**9}
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.match(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$", value) if isinstance(value, str) else None
    if match and match.group(2).lower() in units and int(match.group(1)) > 0:
        return int(match.group(1)) * units[match.group(2).lower()]
    raise ConfigError(f"{name} must be a size like 1048576, '512KiB' or '256MiB', not {value!r}")


_WATCH_SCHEMA: dict[str, Callable[[object, str], Any]] = {
    "path": _path,
    "poll": _boolean,
    "poll_interval": parse_duration,
    "settle": parse_duration,
    "rescan": parse_duration,
    "after": _choice("move", "delete"),
    "skip_invalid": _boolean,
    "max_bytes": _byte_size,
}


def _statsd_address(value: object, name: str) -> str | None:
    if value is True:
        return "127.0.0.1:8125"
    if value is False or value == "":
        return None
    return _text(value, name)


_RELAY_SCHEMA: dict[str, Callable[[object, str], Any]] = {
    "enabled": _boolean,
    "listen": _text,
    "allow_remote": _boolean,
    "statsd": _statsd_address,
    "statsd_prefix": lambda value, name: str(value),
    "statsd_buffer": _byte_size,
    "max_body": _byte_size,
    "request_timeout": parse_duration,
    "max_connections": _positive_int(10_000),
}


def relay_table(table: Mapping[str, object], where: str, base: RelayConfig | None = None) -> RelayConfig:
    """Check a [relay] table (or the equivalent flags) into a RelayConfig."""
    values = {}
    for key, value in table.items():
        if key not in _RELAY_SCHEMA:
            raise ConfigError(f"{where}: unknown key '{key}' in [relay]{_did_you_mean(key, list(_RELAY_SCHEMA))}")
        values[key] = _RELAY_SCHEMA[key](value, f"relay.{key}")
    return (base or RelayConfig())._replace(**values)


def watch_entry(table: Mapping[str, object], where: str) -> WatchConfig:
    """Check one [[watch]] table (or the equivalent flags) into a WatchConfig."""
    values = {}
    for key, value in table.items():
        if key not in _WATCH_SCHEMA:
            raise ConfigError(f"{where}: unknown key '{key}' in [[watch]]{_did_you_mean(key, list(_WATCH_SCHEMA))}")
        values[key] = _WATCH_SCHEMA[key](value, f"watch.{key}")
    if "path" not in values:
        raise ConfigError(f"{where}: a [[watch]] table needs a path")
    return WatchConfig(**values)


_FIELD_PARSERS = {attr: parse for keys in _SCHEMA.values()
                  for key, (attr, parse) in keys.items() if key != "ezkey_file"}
_ENV = {  # variable -> (Config field, parser); later entries win
    "SPOOL_DB": ("db", _path),
    "SPOOL_ENDPOINT": ("endpoint", _text),
    "SPOOL_EZKEY_FILE": _SCHEMA["ship"]["ezkey_file"],
    "SPOOL_EZKEY": ("ezkey", _text),
}


def read_key_file(path: Path) -> str:
    """Read a key from a file readable only by the service user (warn if others can read it)."""
    try:
        mode = path.stat().st_mode
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read ezkey_file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"ezkey_file {path} is not text") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        import logging

        logging.getLogger("spool").warning("ezkey_file %s is readable by every user; chmod 600 it", path)
    if not key:
        raise ConfigError(f"ezkey_file {path} is empty")
    return key


def _did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(choices))}"


def read_file(path: Path) -> dict[str, Any]:
    """Parse and check a TOML config file into Config field values."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Ubuntu 22.04's Python 3.10 has no tomllib; tomli is the same parser
        import tomli as tomllib

    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for section, table in document.items():
        if section == "relay":
            if not isinstance(table, dict):
                raise ConfigError(f"config {path}: 'relay' must be a [relay] table")
            values["relay"] = relay_table(table, f"config {path}")
            continue
        if section == "watch":
            if not isinstance(table, list):
                raise ConfigError(f"config {path}: watched directories are [[watch]] tables (note the double brackets)")
            values["watch"] = tuple(watch_entry(entry, f"config {path}") for entry in table)
            continue
        if section not in _SCHEMA:
            raise ConfigError(f"config {path}: unknown section [{section}]"
                              f"{_did_you_mean(section, [*_SCHEMA, 'watch', 'relay'])}")
        if not isinstance(table, dict):
            raise ConfigError(f"config {path}: '{section}' must be a [{section}] table")
        for key, value in table.items():
            if key not in _SCHEMA[section]:
                raise ConfigError(f"config {path}: unknown key '{key}' in [{section}]"
                                  f"{_did_you_mean(key, list(_SCHEMA[section]))}")
            attr, parse = _SCHEMA[section][key]
            values[attr] = parse(value, f"{section}.{key}")
    return values


def load(config_file: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
         **flags: Any) -> Config:
    """Build the Config: defaults, then the file, then SPOOL_* environment variables, then flags (None = unset)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = config_file or env.get("SPOOL_CONFIG")
    if file:
        values.update(read_file(Path(file).expanduser()))
    for variable, (attr, parse) in _ENV.items():
        if env.get(variable):
            values[attr] = parse(env[variable], variable)
    for attr, value in flags.items():
        if value is None:
            continue
        if attr not in _FIELD_PARSERS:
            raise ConfigError(f"unknown setting '{attr}'")
        values[attr] = _FIELD_PARSERS[attr](value, f"--{attr.replace('_', '-')}")
    if "db" not in values:
        values["db"] = default_db_path(env)
    limits = {name.split(".", 1)[1]: values.pop(name) for name in list(values) if name.startswith("limits.")}
    config = Config(**values, limits=Limits(**limits))
    if config.backoff_initial > config.backoff_max:
        raise ConfigError("ship.backoff_initial must not be larger than ship.backoff_max")
    if config.timeout <= 0:
        raise ConfigError("ship.timeout must be more than 0 seconds")
    return config
