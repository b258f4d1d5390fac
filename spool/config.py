"""Configuration: every setting is declared once, here, and everything else is derived from that declaration.

A setting is a field of one section (a frozen dataclass: `[spool]`, `[ship]`, `[log]`, `[relay]`, `[metrics]`,
`[[watch]]`) made with `setting(...)`: its name and type are the field's, its default, parser, help, CLI flag
and extra environment names are the setting's. From those declarations come the TOML parsing, the
environment variables (`SPOOL_<SECTION>_<KEY>` for every setting), the click options, the reference table in
README.md and packaging/spool.toml (`python -m spool.config markdown|toml` prints them; tests compare).

Values are checked when the configuration is loaded, all of them, with the setting's name in the message.
Precedence: command-line flags > environment > the file > defaults. The file is `--config`, else
`$SPOOL_CONFIG`, else /etc/spool/spool.toml if it exists, else none.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import reprlib
import sys
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from spool.errors import ConfigError, redact_url
from spool.records import T_FLOOR

DEFAULT_ENDPOINT = "https://api.stathat.com"
DEFAULT_CONFIG = Path("/etc/spool/spool.toml")
MAX_BATCH = 1000


def default_db_path(env: Mapping[str, str] = os.environ) -> Path:
    """Return $XDG_STATE_HOME/spool/spool.db (~/.local/state/spool/spool.db when unset)."""
    state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local" / "state")
    return Path(state_home) / "spool" / "spool.db"


# -- setting types: each parses what a TOML file gives (typed) or what the environment or a flag gives (text) --


class SettingType:
    """The type of a setting: `parse(value, name, text)` checks and converts; `describe` says what it takes."""

    describe = "a value"

    def parse(self, value: object, name: str, text: bool) -> Any:
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """Render a value as TOML (for the example config)."""
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float) and not isinstance(value, bool):
            return repr(value)
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def refuse(self, value: object, name: str) -> ConfigError:
        shown = f'"{value}"' if isinstance(value, str) else repr(value)
        return ConfigError(f"{name} must be {self.describe}, not {shown}")


class Integer(SettingType):
    def __init__(self, least: int, most: int | None = None):
        self.least, self.most = least, most
        bounds = f" from {least} to {most}" if most is not None else f" >= {least}"
        self.describe = f"a whole number{bounds}"

    def parse(self, value: object, name: str, text: bool) -> int:
        if text and isinstance(value, str) and re.fullmatch(r"\s*-?\d[\d_]*\s*", value):
            value = int(value.replace("_", ""))
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.refuse(value, name)  # "500" in a TOML file is a string: refused, it says why
        if value < self.least or (self.most is not None and value > self.most):
            raise self.refuse(value, name)
        return value


class Number(SettingType):
    describe = "a number >= 0"

    def parse(self, value: object, name: str, text: bool) -> float:
        if text and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.refuse(value, name) from None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise self.refuse(value, name)
        return float(value)


class Boolean(SettingType):
    describe = "true or false"
    WORDS: ClassVar[dict[str, bool]] = {"1": True, "true": True, "yes": True, "on": True,
                                        "0": False, "false": False, "no": False, "off": False}

    def parse(self, value: object, name: str, text: bool) -> bool:
        if isinstance(value, bool):
            return value
        if text and isinstance(value, str) and value.strip().lower() in self.WORDS:
            return self.WORDS[value.strip().lower()]
        raise self.refuse(value, name)


class Choice(SettingType):
    def __init__(self, *choices: str):
        self.choices = choices
        self.describe = "one of " + ", ".join(f'"{c}"' for c in choices)

    def parse(self, value: object, name: str, text: bool) -> str:
        if not isinstance(value, str) or value.strip().lower() not in self.choices:
            raise self.refuse(value, name)
        return value.strip().lower()


class Text(SettingType):
    describe = "a non-empty string"

    def parse(self, value: object, name: str, text: bool) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.refuse(value, name)
        return value.strip()


class AnyText(SettingType):
    describe = "a string"

    def parse(self, value: object, name: str, text: bool) -> str:
        if not isinstance(value, str):
            raise self.refuse(value, name)
        return value


class Key(SettingType):
    """A key, as every key is checked (spool.records.check_key); the error says what is wrong, never the key."""

    describe = "a key"

    def parse(self, value: object, name: str, text: bool) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string")  # not shown: it may still be the key
        return check_key_text(value, name)


def check_key_text(key: str, where: str) -> str:
    """Return `key` if it obeys the rule every key obeys, else raise ConfigError naming `where`."""
    from spool.errors import InvalidRecord
    from spool.records import check_key

    try:
        return check_key(key, where)
    except InvalidRecord as exc:
        raise ConfigError(exc.reason) from None


class Globs(SettingType):
    """A list of shell-style globs (`["debug.*", "*.tmp"]`; in the environment or a flag, comma-separated)."""

    describe = 'a list of globs like ["debug.*", "*.tmp"]'

    def parse(self, value: object, name: str, text: bool) -> tuple[str, ...]:
        if text and isinstance(value, str):
            value = [part for part in (piece.strip() for piece in value.split(",")) if part]
        if not isinstance(value, list | tuple) or not all(isinstance(glob, str) and glob.strip() for glob in value):
            raise self.refuse(value, name)
        return tuple(glob.strip() for glob in value)

    def show(self, value: Any) -> str:
        return "[" + ", ".join(SettingType.show(self, glob) for glob in value) + "]"


class PathKind(Text):
    describe = "a path"

    def parse(self, value: object, name: str, text: bool) -> Path:  # type: ignore[override]
        return Path(super().parse(value, name, text)).expanduser()


_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)")


class Duration(SettingType):
    describe = 'a duration like 30, "90s", "5m", "1h30m", "7d" or "1w"'

    def parse(self, value: object, name: str, text: bool) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
            return float(value)
        if isinstance(value, str):
            spaced = value.strip().lower()
            if re.fullmatch(r"\d+(?:\.\d+)?", spaced):
                return float(spaced)  # bare seconds, as text
            parts = _DURATION.findall(spaced)
            if parts and re.fullmatch(r"(?:\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h|d|w))+\s*", spaced):
                return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
        raise self.refuse(value, name)

    def show(self, value: Any) -> str:
        for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if value >= size and value % size == 0:
                return f'"{int(value // size)}{unit}"'
        return f'"{value:g}s"'


_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
               "g": 1 << 30, "gib": 1 << 30, "gb": 10**9, "t": 1 << 40, "tib": 1 << 40, "tb": 10**12}


class Size(SettingType):
    describe = 'a size like 1048576, "512K", "5M", "1G" (K/M/G and KiB/MiB/GiB: 1024-based; KB/MB/GB: 1000)'

    def parse(self, value: object, name: str, text: bool) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
        if match and match.group(2).lower() in _SIZE_UNITS and int(match.group(1)) > 0:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        raise self.refuse(value, name)

    def show(self, value: Any) -> str:
        for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value >= size and value % size == 0:
                return f'"{value // size}{unit}"'
        return str(value)


class Endpoint(Text):
    describe = f"an http(s) URL like {DEFAULT_ENDPOINT}"

    def parse(self, value: object, name: str, text: bool) -> str:
        # Whether plain http to a remote host is allowed depends on ship.allow_insecure: checked in _checked().
        return check_endpoint(super().parse(value, name, text), allow_insecure=True, name=name)


class Address(Text):
    """HOST:PORT (or :PORT, or [v6]:PORT)."""

    describe = 'an address like "127.0.0.1:8080"'

    def __init__(self, default_port: int):
        self.default_port = default_port

    def parse(self, value: object, name: str, text: bool) -> str:
        address = super().parse(value, name, text)
        parse_address(address, name, self.default_port)
        return address


class OptionalAddress(Address):
    """An address, or true for the custom one, or false / "" for none."""

    def __init__(self, default_port: int, default: str):
        super().__init__(default_port)
        self.default = default

    def parse(self, value: object, name: str, text: bool) -> str | None:  # type: ignore[override]
        if text and isinstance(value, str) and value.strip().lower() in Boolean.WORDS:
            value = Boolean.WORDS[value.strip().lower()]
        if value is True:
            return self.default
        if value is False or value == "":
            return None
        return super().parse(value, name, text)


class UnixSeconds(Integer):
    def __init__(self) -> None:
        super().__init__(0)
        self.describe = "unix seconds (a whole number >= 0)"


# -- validation shared by kinds and by the components (pure: no sockets, no HTTP) -----------------------------


def check_endpoint(url: str, *, allow_insecure: bool = False, name: str = "endpoint") -> str:
    """Return the endpoint without a trailing slash, or raise saying what is wrong with it.

    Plain http to a remote host is refused unless `allow_insecure` (checked once the whole config is known).
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unbalanced [ in the host
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise ConfigError(f"{name} must be an http(s) URL like {DEFAULT_ENDPOINT}, not '{redact_url(url)}'")
    if parts.username or parts.password or parts.query or "@" in parts.netloc:
        raise ConfigError(f"{name} must not carry credentials or a query string ({redact_url(url)})")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(host):
        raise ConfigError(f"{name} {redact_url(url)} is plain http to a remote host; use https, "
                          "or allow it explicitly with --allow-insecure (ship.allow_insecure = true)")
    if parts.path.rstrip("/").endswith(("/ez", "/c", "/v")):
        root = url.rstrip("/").rsplit("/", 1)[0]
        raise ConfigError(f"{name} {redact_url(url)} names an API call; give the API root "
                          f"({redact_url(root)}): spool adds /ez, /c and /v itself")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str, name: str, default_port: int) -> tuple[str, int]:
    """Parse HOST:PORT (or :PORT, or [v6]:PORT, or an address alone) into (host, port).

    The host is an IP address, `localhost`, or (with a port) a host name; a word alone ("nonsense") is no
    address, and is said to be unreadable, not taken for a remote host.
    """
    def unreadable() -> ConfigError:
        return ConfigError(f"{name} must be HOST:PORT like 127.0.0.1:{default_port}, not '{text}'")

    stripped = text.strip()
    host, sep, port = stripped.rpartition(":")
    if not sep and stripped.isdigit():  # a port alone: on loopback
        host, port = "", stripped
    elif not sep or (host.count(":") and not host.startswith("[")):  # a bare v6 address, or no port at all
        host, port = stripped, str(default_port)
        if host != "localhost" and not _is_ip(host):
            raise unreadable()
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]") and ":" in host and _is_ip(host[1:-1])):
            raise unreadable()
        host = host[1:-1]
    host = host or "127.0.0.1"
    if not (_is_ip(host) or re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?", host)):
        raise unreadable()
    if not port.isascii() or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise unreadable()
    return host, int(port)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_bind(address: str, name: str, default_port: int, allow_remote: bool) -> tuple[str, int]:
    """Parse a listening address; a non-loopback one must be allowed (listeners bind loopback by default)."""
    host, port = parse_address(address, name, default_port)
    if not is_loopback(host) and not allow_remote:
        section = name.split(".")[0]
        raise ConfigError(f"{name} {host} is not a loopback address, so other machines could reach it; to allow "
                          f"that, set {section}.allow_remote = true" + (" (or --allow-remote)" if section == "relay"
                                                                        else ""))
    return host, port


# -- declaring settings ------------------------------------------------------------------------------------


def setting(default: Any, kind: SettingType, help: str, *, flag: str | None = None, env: tuple[str, ...] = (),
            secret: bool = False, example: Any = None, packaged: Any = None) -> Any:
    """Declare one setting as a dataclass field: its default, kind, help, CLI flag and extra env names.

    In the example config (packaging/spool.toml, installed as /etc/spool/spool.toml) a setting shows its
    default; `example` is shown commented out instead (for settings unset by default), and `packaged` is set
    there (what a system-wide install uses, e.g. the spool under /var/lib/spool).
    """
    return dataclasses.field(default=default, metadata={
        "kind": kind, "help": help, "flag": flag, "env": env, "secret": secret, "example": example,
        "packaged": packaged})


class _Settings:
    """What @dataclass(frozen=True) generates for a class, written once for every settings class.

    dataclass makes each method it generates from source and compiles it, class by class: for the seven
    settings classes that was 42 compilations, most of the time importing this module took, and every
    `spool` command imports it (`spool add` is a process per stat). Here the same methods are written once:
    keyword or positional arguments in field order, defaults, the same errors; equality (same class, field
    values), hash and repr as dataclass makes them; assigning or deleting a field raises FrozenInstanceError.
    Type checkers see the classes as the frozen dataclasses they behave as (`settings_class` below).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        fields = self.__dataclass_fields__  # type: ignore[attr-defined]
        name = f"{self.__class__.__qualname__}.__init__()"
        if len(args) > len(fields):
            raise TypeError(f"{name} takes from 1 to {len(fields) + 1} positional arguments but {len(args) + 1} "
                            "were given")
        values = dict(zip(fields, args, strict=False))  # fewer arguments than fields: the rest by keyword or default
        for key, value in kwargs.items():
            if key not in fields:
                raise TypeError(f"{name} got an unexpected keyword argument '{key}'")
            if key in values:
                raise TypeError(f"{name} got multiple values for argument '{key}'")
            values[key] = value
        for key, field in fields.items():
            if key in values:
                value = values[key]
            elif field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                raise TypeError(f"{name} missing 1 required argument: '{key}'")
            object.__setattr__(self, key, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__dataclass_fields__)  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    @reprlib.recursive_repr()
    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__dataclass_fields__)  # type: ignore[attr-defined]
        return f"{self.__class__.__qualname__}({shown})"


if TYPE_CHECKING:
    from dataclasses import dataclass as settings_class  # checked as the frozen dataclasses they behave as
else:
    def settings_class(**_: Any) -> Any:
        """A dataclass whose methods are _Settings' own: dataclass declares the fields and generates nothing."""
        return dataclasses.dataclass(init=False, repr=False, eq=False)


@settings_class(frozen=True)
class SpoolSettings(_Settings):
    """[spool]: the spool file, its durability and bounds."""

    path: Path | None = setting(
        None, PathKind(), "the spool file (SQLite; created 0600 in a 0700 directory, or 0660 in a setgid directory "
        "its group may write: a spool every user of that group may add to). Default: "
        "$XDG_STATE_HOME/spool/spool.db (~/.local/state/spool/spool.db)", flag="--db", env=("SPOOL_DB",),
        packaged="/var/lib/spool/spool.db")
    synchronous: str = setting(
        "full", Choice("full", "normal"), '"full": a commit survives power loss. "normal": survives a crash of '
        "spool, but a power cut may lose the last commits (never corrupts); faster on SD cards")
    retention: float = setting(7 * 86400.0, Duration(), "how long delivered records are kept (for replay)")
    t_floor: int = setting(T_FLOOR, UnixSeconds(), "records whose explicit t is before this are refused "
                           "(catches a box that booted in 1970)")
    max_pending: int | None = setting(None, Integer(1), "at most this many records waiting (unset: unbounded)",
                                      example=1_000_000)
    max_spool_bytes: int | None = setting(None, Size(), "at most this many bytes of the spool file in use; "
                                          "delivered records give way first", example=512 << 20)
    max_age: float | None = setting(None, Duration(), "records whose t is older are not shipped, and are dropped",
                                    example=30 * 86400.0)
    when_full: str = setting("drop_oldest", Choice("drop_oldest", "reject_new"),
                             "at a bound: drop the oldest pending records, or refuse new appends")
    compact_counts: float = setting(0.0, Duration(), "merge waiting counts of one stat and key within buckets of "
                                    "this size (0: off)", example=60.0)
    integrity_pause: float = setting(0.0, Duration(), "after an unclean stop, `spool run` checks the whole file in "
                                     "the background once shipping is idle; it pauses this long before each step "
                                     "of that check (a million SQLite operations), to leave the disk to producers")

    @property
    def bounded(self) -> bool:
        return self.max_pending is not None or self.max_spool_bytes is not None


@settings_class(frozen=True)
class ShipSettings(_Settings):
    """[ship]: where and how records are delivered."""

    endpoint: str = setting(DEFAULT_ENDPOINT, Endpoint(), "StatHat's API root; plain http only to loopback "
                            "unless allow_insecure", flag="--endpoint", env=("SPOOL_ENDPOINT",))
    ezkey_file: Path | None = setting(None, PathKind(), "a file holding the EZ key for records that carry none "
                                      "(chmod 600), on one line; read when shipping starts and at a reload, and "
                                      "looked at every 5 s while its key cannot be used", env=("SPOOL_EZKEY_FILE",),
                                      packaged="/etc/spool/ezkey")
    ezkey: str | None = setting(None, Key(), "the EZ key inline (prefer ezkey_file: argv and config files leak)",
                                flag="--ezkey", env=("SPOOL_EZKEY",), secret=True, example="...")
    allow_insecure: bool = setting(False, Boolean(), "allow a plain http:// endpoint on a remote host",
                                   flag="--allow-insecure")
    batch_size: int = setting(500, Integer(1, MAX_BATCH), "records per EZ JSON batch", flag="--batch-size")
    timeout: float = setting(10.0, Duration(), "deadline for a whole request, answer included", flag="--timeout")
    stop_wait: float = setting(5.0, Duration(), "at SIGTERM/SIGINT, how long the answers to requests in flight are "
                               "awaited before those requests are cut short (their records stay pending); a reload "
                               "never cuts them")
    max_in_flight: int = setting(8, Integer(1, 64), "requests under way at once, at most (the shipper adapts "
                                 "below it; 1: one at a time)", flag="--max-in-flight")
    one_cpu: bool = setting(True, Boolean(), "keep a drain's threads (the shipper's and its senders') on one CPU, "
                            "the one it starts on (Linux): they run one at a time under Python's GIL, and handing it "
                            "from core to core cost about a fifth of the shipping CPU in wake-ups; false: the kernel "
                            "places them")
    max_requests_per_second: float = setting(20.0, Number(), "the most requests a second the drain makes (0: no pacing "
                                             "at all); adaptive pacing finds its rate below it",
                                             flag="--max-requests-per-second")
    pacing: str = setting("adaptive", Choice("adaptive", "fixed"), '"adaptive": the request rate starts gently, grows '
                          "with every clean answer, is cut on 503, 429 and timeouts and grows back while answers are "
                          "clean; a backlog's first requests are spread over a time scaled to the backlog, at start-up "
                          'and when the link comes back (see "Running a fleet"). "fixed": max_requests_per_second '
                          "always, and a random part of reconnect_jitter waited at start-up only")
    backoff_initial: float = setting(0.5, Duration(), "first retry back-off (exponential with full jitter)")
    backoff_max: float = setting(60.0, Duration(), "longest retry back-off")
    retry_after_max: float = setting(600.0, Duration(), "a receiver's Retry-After is honoured up to this")
    reconnect_jitter: float = setting(10.0, Duration(), "the longest random wait before a backlog's first requests, so "
                                      "a fleet does not arrive together (adaptive pacing waits less for a small "
                                      "backlog)")
    idle_poll: float = setting(2.0, Duration(), "how often an idle shipper looks for records other processes "
                               "appended")
    lease_timeout: float = setting(300.0, Duration(), "a lease left by an earlier release (no owner, or one named "
                                   "by pid) is freed after this (newer leases only when their owner is proven dead)")

    @property
    def keyed(self) -> bool:
        """Whether a key is configured (directly or by a file), usable or not."""
        return self.ezkey is not None or self.ezkey_file is not None


@settings_class(frozen=True)
class LogSettings(_Settings):
    """[log]: what spool says, and how."""

    level: str = setting("info", Choice("debug", "info", "warning", "error"), "the least severe level logged",
                         flag="--log-level")
    format: str = setting("text", Choice("text", "json"), "one line per event: text, or one JSON object",
                          flag="--log-format")
    summary_interval: float = setting(60.0, Duration(), "how often `spool run` logs a one-line summary")


@settings_class(frozen=True)
class RelaySettings(_Settings):
    """[relay]: a local StatHat-compatible endpoint (and StatsD listener)."""

    enabled: bool = setting(False, Boolean(), "run the relay in `spool run`")
    listen: str = setting("127.0.0.1:8080", Address(8080), "where the relay listens", flag="--listen")
    allow_remote: bool = setting(False, Boolean(), "allow listening on a non-loopback address",
                                 flag="--allow-remote")
    statsd: str | None = setting(None, OptionalAddress(8125, "localhost:8125"), "take StatsD over UDP here "
                                 "(true: localhost:8125); `localhost` is both loopbacks, 127.0.0.1 and ::1 (clients "
                                 "may resolve it to either), or 127.0.0.1 alone where the box has no ::1",
                                 flag="--statsd", example="localhost:8125")
    statsd_prefix: str = setting("", AnyText(), "put before every StatsD name to make the stat name")
    statsd_buffer: int = setting(1 << 20, Size(), "the UDP socket's receive buffer")
    statsd_tags: str = setting("append", Choice("append", "drop"), "DogStatsD tags (`#env:prod`) and Telegraf's "
                               "(`name,env=prod`): append them to the stat name (`name env=prod`), or drop them "
                               "(counted)")
    statsd_sets: float = setting(60.0, Duration(), "StatsD sets (type `s`) become a value stat: the distinct "
                                 "members seen in each window of this length (0: refuse sets, counted)")
    statsd_drop: tuple[str, ...] = setting(("datadog.dogstatsd.client.*",), Globs(), "StatsD metrics whose name "
                                           "(as sent: before statsd_prefix and tags) matches one of these globs are "
                                           "dropped, counted (default: DogStatsD clients' own telemetry)")
    max_body: int = setting(1 << 20, Size(), "requests larger than this are refused")
    request_timeout: float = setting(10.0, Duration(), "a request must arrive whole within this")
    max_connections: int = setting(64, Integer(1, 10_000), "connections served at once; more get 503")


@settings_class(frozen=True)
class MetricsSettings(_Settings):
    """[metrics]: /metrics (Prometheus) and /healthz, on a port of their own (the relay's port serves them too)."""

    listen: str | None = setting(None, OptionalAddress(9464, "127.0.0.1:9464"), "serve /metrics and /healthz "
                                 "here (true: 127.0.0.1:9464)", example="127.0.0.1:9464")
    allow_remote: bool = setting(False, Boolean(), "allow listening on a non-loopback address")
    unhealthy_after: float = setting(900.0, Duration(), "/healthz answers 503 degraded when records wait and "
                                     "nothing was delivered for this long")


@settings_class(frozen=True)
class WatchSettings(_Settings):
    """[[watch]]: one drop directory (repeat the table for more)."""

    path: Path = setting(Path(), PathKind(), "the directory; it must exist and be writable by spool",
                         example="/var/spool/stathat-drop")
    poll: bool = setting(False, Boolean(), "poll instead of inotify (NFS, some FUSE mounts)")
    poll_interval: float = setting(1.0, Duration(), "with poll: how often")
    settle: float = setting(1.0, Duration(), "a file found by a scan or a poll must be unchanged this long")
    linger: float = setting(5.0, Duration(), "a file moved to .done/ is still read for what is written to it "
                            "until it has been unchanged this long (a producer that opened it before the move)")
    partial_wait: float = setting(30.0, Duration(), "a last line without its newline waits for it until the file "
                                  "has been unchanged this long, then is taken as it is (or rejected)")
    rescan: float = setting(30.0, Duration(), "how often the directory is listed again (events can be lost)")
    after: str = setting("move", Choice("move", "delete"), "ingested files go to DIR/.done/, or are deleted")
    skip_invalid: bool = setting(False, Boolean(), "take a file's good records and report the bad ones")
    max_bytes: int = setting(256 << 20, Size(), "larger files are rejected unread")


SECTIONS: dict[str, type] = {"spool": SpoolSettings, "ship": ShipSettings, "log": LogSettings,
                             "relay": RelaySettings, "metrics": MetricsSettings}


@settings_class(frozen=True)
class Config(_Settings):
    """Everything spool can be told, checked; one section per TOML table. Never holds a secret in its repr."""

    spool: SpoolSettings = SpoolSettings()
    ship: ShipSettings = ShipSettings()
    log: LogSettings = LogSettings()
    relay: RelaySettings = RelaySettings()
    metrics: MetricsSettings = MetricsSettings()
    watch: tuple[WatchSettings, ...] = ()
    file: Path | None = None  # the config file read, if any
    source: str = "built-in defaults"  # how that file was chosen, for `spool status` and `doctor`
    db_source: str = "the default location"  # how the spool path was chosen
    warnings: tuple[str, ...] = ()  # mistakes in sections the loading command does not use (see load's `uses`)

    def __repr__(self) -> str:
        def shown(section: object) -> str:
            values = []
            for field in dataclasses.fields(section):  # type: ignore[arg-type]
                value = getattr(section, field.name)
                values.append(f"{field.name}={'<hidden>' if field.metadata.get('secret') and value else value!r}")
            return f"{type(section).__name__}({', '.join(values)})"
        sections = ", ".join(f"{name}={shown(getattr(self, name))}" for name in SECTIONS)
        return f"Config({sections}, watch={self.watch!r}, file={self.file!r})"

    @property
    def db(self) -> Path:
        """The spool file (load() always sets one)."""
        return self.spool.path if self.spool.path is not None else default_db_path()

    def replace(self, **changes: Any) -> Config:
        """Return a copy with settings changed, named "section.key" or by a key no two sections share."""
        sections: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in changes.items():
            if name in ("watch", "file", "source", "db_source", "warnings", *SECTIONS):
                top[name] = value
                continue
            section, key = name.split(".", 1) if "." in name else (_section_of(name), name)
            sections.setdefault(section, {})[key] = value
        for section, values in sections.items():
            top[section] = dataclasses.replace(getattr(self, section), **values)
        return dataclasses.replace(self, **top)

    def ezkey(self, *, warn: bool = True) -> str | None:
        """The configured EZ key: inline, or read from ezkey_file now (ConfigError if that cannot be read)."""
        if self.ship.ezkey is not None:
            return self.ship.ezkey
        if self.ship.ezkey_file is not None:
            return read_key_file(self.ship.ezkey_file, warn=warn)
        return None

    def ezkey_identity(self) -> str | None:
        """What a reload compares of the configured key: a digest of it (never the key), or why it cannot be read."""
        import hashlib

        try:
            key = self.ezkey(warn=False)
        except ConfigError as exc:
            return f"unusable: {exc}"
        return None if key is None else hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _section_of(key: str) -> str:
    owners = [name for name, section in SECTIONS.items() if key in section.__dataclass_fields__]  # type: ignore[attr-defined]
    if len(owners) != 1:
        raise ConfigError(f"unknown setting '{key}'" if not owners else
                          f"'{key}' is in several sections ({', '.join(owners)}); say which, as section.{key}")
    return owners[0]


def settings(section: type) -> Iterator[dataclasses.Field[Any]]:
    return iter(dataclasses.fields(section))


def env_names(section: str, field: dataclasses.Field[Any]) -> tuple[str, ...]:
    """Every environment variable a setting is read from: SPOOL_<SECTION>_<KEY>, then its short aliases."""
    return (f"SPOOL_{section.upper()}_{field.name.upper()}", *field.metadata["env"])


MAX_KEY_FILE = 4096  # bytes read of a key file at most: a key is 255 characters


def read_key_file(path: Path, *, warn: bool = True) -> str:
    """Read a key from a file readable only by the service user (warn if others can read it).

    The file holds the key on one line: one line end after it is taken off (files end with one), and the rest
    must be a key as every key is (spool.records.check_key). Errors say what is wrong, never the key.
    """
    import stat

    try:
        mode = path.stat().st_mode
        with open(path, "rb") as handle:
            raw = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read ship.ezkey_file {path}: {exc.strerror}; shipping needs the key") from None
    try:
        key = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"ship.ezkey_file {path} is not UTF-8 text; put the EZ key in it") from None
    if warn and mode & (stat.S_IROTH | stat.S_IWOTH):
        import logging

        logging.getLogger("spool").warning("ezkey_file %s is readable by every user; chmod 600 it", path)
    if len(raw) > MAX_KEY_FILE:
        raise ConfigError(f"ship.ezkey_file {path} is larger than {MAX_KEY_FILE} bytes; put the EZ key alone in it")
    key = key[:-2] if key.endswith("\r\n") else key[:-1] if key.endswith("\n") else key
    if not key.strip():
        raise ConfigError(f"ship.ezkey_file {path} is empty; put the EZ key in it")
    if "\n" in key:
        raise ConfigError(f"ship.ezkey_file {path} holds {key.count(chr(10)) + 1} lines; put the EZ key alone on "
                          "one line")
    return check_key_text(key, f"the key in ship.ezkey_file {path}")


def _did_you_mean(name: str, choices: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, choices, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known: {', '.join(sorted(choices))}"


def _table(section_type: type, table: Mapping[str, object], where: str, label: str, *, text: bool = False,
           base: Any = None, on_error: Callable[[str, ConfigError], None] | None = None) -> Any:
    """Check one table of values (TOML, or flags given as text) into a section.

    With `on_error`, a bad key is handed to it (with its error, unprefixed) and left at its default; without,
    the first one raises.
    """
    fields = {field.name: field for field in dataclasses.fields(section_type)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        try:
            if key not in fields:
                raise ConfigError(f"unknown key '{key}' in {label}{_did_you_mean(key, list(fields))}")
            values[key] = fields[key].metadata["kind"].parse(value, f"{label.strip('[]')}.{key}", text)
        except ConfigError as exc:
            if on_error is None:
                raise ConfigError(f"{where}: {exc}" if key not in fields else str(exc)) from None
            on_error(key, exc)
    return dataclasses.replace(base if base is not None else section_type(), **values)


def watch_entry(table: Mapping[str, object], where: str, *, text: bool = False,
                on_error: Callable[[str, ConfigError], None] | None = None) -> WatchSettings:
    """Check one [[watch]] table (or the equivalent flags) into a WatchSettings."""
    if "path" not in table:
        raise ConfigError(f"{where}: a [[watch]] table needs a path")
    entry: WatchSettings = _table(WatchSettings, table, where, "[[watch]]", text=text, on_error=on_error)
    return entry


def distinct_watches(entries: tuple[WatchSettings, ...], where: str) -> tuple[WatchSettings, ...]:
    """Refuse two [[watch]] entries naming one directory (by its real path): both would take every file."""
    seen: dict[object, Path] = {}
    for entry in entries:
        real = os.path.realpath(entry.path)
        try:
            info = os.stat(entry.path)
            same: object = (info.st_dev, info.st_ino)  # a bind mount is the same directory under another path
        except OSError:
            same = real
        if same in seen:
            raise ConfigError(f"{where}: [[watch]] paths {seen[same]} and {entry.path} are the same directory "
                              f"({real}); watch it once")
        seen[same] = entry.path
    return entries


class _Findings:
    """What is wrong in a configuration, where (the file and line), and what the command loading it does with it.

    A command names the sections it `uses` (None: all of them). A mistake in one it uses is an error; one in a
    section it does not use (a producer such as `spool add` uses only [spool]) is a warning, and that setting
    keeps its default: a shipping setting must not stop stats from being spooled.
    """

    def __init__(self, uses: Collection[str] | None):
        self.uses = None if uses is None else frozenset(uses)
        self.warnings: list[str] = []
        self.path: Path | None = None
        self.lines: list[str] = []
        self.from_file: set[tuple[str, str]] = set()  # (section, key) whose value is the file's

    def used(self, section: str) -> bool:
        return self.uses is None or section in self.uses

    def problem(self, section: str, message: str) -> None:
        """A mistake in `section`: raise it if the command uses that section, else keep it as a warning."""
        if self.used(section):
            raise ConfigError(message)
        self.warnings.append(message)

    def where(self, section: str | None, key: str | None = None, index: int = 0) -> str:
        """"config PATH, line N" for a key of a table (the index-th [[section]]), or a table's header."""
        line = self.line_of(section, key, index)
        return f"config {self.path}" + (f", line {line}" if line is not None else "")

    def line_of(self, section: str | None, key: str | None = None, index: int = 0) -> int | None:
        """The line of `key` in [section] (None: the top of the file), or of the table's header; None if unseen."""
        inside, seen, header = section is None, -1, None
        for number, line in enumerate(self.lines, 1):
            table = re.match(r"\s*\[\[?\s*([\w.-]+)\s*\]", line)
            if table is not None:
                if inside and section is None:
                    return None  # the top of the file ends at the first table
                seen += table.group(1) == section
                inside = table.group(1) == section and seen == index
                if inside:
                    header = number
                continue
            name = re.escape(key or "")
            if inside and key is not None and re.match(rf"""\s*(?:{name}|"{name}"|'{name}')\s*=""", line):
                return number
        return header if key is None else None


def read_file(path: Path) -> dict[str, Any]:
    """Parse a TOML config file into {section: {key: value}} and a watch list, each value checked."""
    return _read_file(path, _Findings(None))


def _read_file(path: Path, findings: _Findings) -> dict[str, Any]:
    import difflib

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Ubuntu 22.04's Python 3.10 has no tomllib; tomli is the same parser
        import tomli as tomllib

    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        document = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not valid TOML: it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    findings.path, findings.lines = path, raw.decode("utf-8").splitlines()
    out: dict[str, Any] = {}
    for section, table in document.items():
        if section == "watch":
            if not isinstance(table, list):
                findings.problem("watch", f"{findings.where('watch')}: watched directories are [[watch]] tables "
                                          "(note the double brackets)")
                continue
            entries = []
            for index, entry in enumerate(table):
                def bad(key: str, exc: ConfigError, index: int = index) -> None:
                    findings.problem("watch", f"{findings.where('watch', key, index)}: {exc}")
                try:
                    entries.append(watch_entry(entry, findings.where("watch", None, index), on_error=bad))
                except ConfigError as exc:
                    findings.problem("watch", str(exc))
            try:
                out["watch"] = distinct_watches(tuple(entries), f"config {path}")
            except ConfigError as exc:
                findings.problem("watch", str(exc))
            continue
        if section not in SECTIONS:
            message = f"{findings.where(section)}: unknown section [{section}]" \
                      f"{_did_you_mean(section, [*SECTIONS, 'watch'])}"
            # An unknown section may be a misspelt one: an error if it looks like one the command uses.
            close = difflib.get_close_matches(section, [*SECTIONS, "watch"], n=1)
            findings.problem(close[0] if close else section, message)
            continue
        if not isinstance(table, dict):
            findings.problem(section, f"{findings.where(None, section)}: '{section}' must be a [{section}] table")
            continue

        def bad_key(key: str, exc: ConfigError, section: str = section) -> None:
            findings.problem(section, f"{findings.where(section, key)}: {exc}")

        out[section] = _table(SECTIONS[section], table, findings.where(section), f"[{section}]", on_error=bad_key)
        findings.from_file.update((section, key) for key in table)
    return out


def find_file(config_file: str | os.PathLike[str] | None, env: Mapping[str, str]) -> tuple[Path | None, str]:
    """Choose the config file: --config, else $SPOOL_CONFIG, else /etc/spool/spool.toml if it exists."""
    if config_file:
        return Path(config_file).expanduser(), "--config"
    if env.get("SPOOL_CONFIG"):
        return Path(env["SPOOL_CONFIG"]).expanduser(), "SPOOL_CONFIG"
    if DEFAULT_CONFIG.is_file():
        return DEFAULT_CONFIG, "the default location"
    return None, ""


def load(config_file: str | os.PathLike[str] | None = None, *, env: Mapping[str, str] | None = None,
         uses: Collection[str] | None = None, **flags: Any) -> Config:
    """Build the Config: defaults, then the file, then environment variables, then flags (None = not given).

    Flags are named "section.key" (or by a key no two sections share) and given as click passes them: text,
    or True for a flag that is set. `uses`: the sections the caller uses (None: all); a mistake in any other
    (in the file or the environment) is a warning in `Config.warnings`, and that setting keeps its default.
    Every error and warning about the file names it, and the line.
    """
    env = os.environ if env is None else env
    findings = _Findings(uses)
    path, how = find_file(config_file, env)
    config = Config()
    db_source = "the default location"
    if path is not None:
        values = _read_file(path, findings)
        watch = values.pop("watch", ())
        config = dataclasses.replace(config, **values, watch=watch, file=path, source=f"{path} (from {how})")
        if config.spool.path is not None:
            db_source = f"spool.path in {path}"
    changes: dict[str, dict[str, Any]] = {}
    for name, section in SECTIONS.items():
        for field in dataclasses.fields(section):
            for variable in reversed(env_names(name, field)):  # the long name wins over an alias
                if env.get(variable):
                    try:
                        value = field.metadata["kind"].parse(env[variable], variable, True)
                    except ConfigError as exc:
                        findings.problem(name, str(exc))
                        continue
                    changes.setdefault(name, {})[field.name] = value
                    findings.from_file.discard((name, field.name))
                    if name == "spool" and field.name == "path":
                        db_source = variable
    for flag, value in flags.items():
        if value is None:
            continue
        table, key = flag.split(".", 1) if "." in flag else (_section_of(flag), flag)
        declared = {field.name: field for field in dataclasses.fields(SECTIONS[table])}[key]
        changes.setdefault(table, {})[key] = declared.metadata["kind"].parse(
            value, declared.metadata["flag"] or key, True)
        findings.from_file.discard((table, key))
        if (table, key) == ("spool", "path"):
            db_source = "--db"
    for table, values in changes.items():
        config = dataclasses.replace(config, **{table: dataclasses.replace(getattr(config, table), **values)})
    if config.spool.path is None:
        config = config.replace(**{"spool.path": default_db_path(env)})
    _checked(config, findings)
    return dataclasses.replace(config, db_source=db_source, warnings=tuple(findings.warnings))


def _checked(config: Config, findings: _Findings | None = None) -> Config:
    """Checks that involve more than one setting (each a problem of the section of the setting it names)."""
    findings = findings or _Findings(None)
    ship, relay = config.ship, config.relay

    def check(section: str, key: str, test: Callable[[], object]) -> None:
        try:
            test()
        except ConfigError as exc:
            located = (section, key) in findings.from_file
            findings.problem(section, f"{findings.where(section, key)}: {exc}" if located else str(exc))

    def positive_timeout() -> None:
        if ship.timeout <= 0:
            raise ConfigError("ship.timeout must be more than 0 seconds")

    def ordered_backoff() -> None:
        if ship.backoff_initial > ship.backoff_max:
            raise ConfigError("ship.backoff_initial must not be larger than ship.backoff_max")

    check("ship", "endpoint", lambda: check_endpoint(ship.endpoint, allow_insecure=ship.allow_insecure,
                                                     name="ship.endpoint"))
    check("ship", "backoff_initial", ordered_backoff)
    check("ship", "timeout", positive_timeout)
    check("relay", "listen", lambda: check_bind(relay.listen, "relay.listen", 8080, relay.allow_remote))
    if relay.statsd:
        check("relay", "statsd", lambda: check_bind(relay.statsd or "", "relay.statsd", 8125, relay.allow_remote))
    if config.metrics.listen:
        check("metrics", "listen", lambda: check_bind(config.metrics.listen or "", "metrics.listen", 9464,
                                                      config.metrics.allow_remote))
    return config


# -- what is derived for people: the reference table, the example config ---------------------------------------


def _default_text(kind: SettingType, value: Any) -> str:
    return "unset" if value is None else kind.show(value)


def reference_markdown() -> str:
    """The README's configuration reference: one row per setting, from the declarations."""
    rows = ["| setting | default | environment | flag | meaning |", "|---|---|---|---|---|"]
    for name, section in [*SECTIONS.items(), ("watch", WatchSettings)]:
        for field in dataclasses.fields(section):
            meta = field.metadata
            key = f"`[[watch]] {field.name}`" if name == "watch" else f"`{name}.{field.name}`"
            env = "" if name == "watch" else " ".join(f"`{v}`" for v in env_names(name, field))
            flag = f"`{meta['flag']}`" if meta["flag"] else ""
            default = _default_text(meta["kind"], field.default)
            if (name, field.name) == ("spool", "path"):
                default = "see meaning"
            rows.append(f"| {key} | `{default}` | {env} | {flag} | {meta['help']} |")
    return "\n".join(rows) + "\n"


def example_toml() -> str:
    """packaging/spool.toml: every setting with its default and help, from the declarations."""
    import textwrap

    lines = ["# spool configuration: /etc/spool/spool.toml (the default location), or --config FILE, or",
             "# $SPOOL_CONFIG. Every setting, with its default. Precedence: command-line flags > environment",
             "# (SPOOL_<SECTION>_<KEY>) > this file > defaults. Durations: 30, \"90s\", \"5m\", \"1h30m\", \"7d\",",
             "# \"1w\". Sizes: 1048576, \"512K\", \"5M\", \"1G\". Unknown sections or keys are errors, with a",
             "# suggestion, so typos cannot hide. Generated from spool/config.py: python -m spool.config toml"]
    for name, section in [*SECTIONS.items(), ("watch", WatchSettings)]:
        lines += ["", f"# {section.__doc__}", "# [[watch]]" if name == "watch" else f"[{name}]"]
        for field in dataclasses.fields(section):
            meta = field.metadata
            text = f"{meta['help'][0].upper()}{meta['help'][1:]}."
            lines += textwrap.wrap(text, 110, initial_indent="# ", subsequent_indent="# ")
            if meta["packaged"] is not None:
                lines.append(f"{field.name} = {meta['kind'].show(meta['packaged'])}")
            elif name == "watch" or field.default is None or meta["secret"]:
                shown = meta["example"] if meta["example"] is not None else field.default
                lines.append(f"# {field.name} = {meta['kind'].show(shown)}")
            else:
                lines.append(f"{field.name} = {meta['kind'].show(field.default)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    choice = sys.argv[1] if len(sys.argv) > 1 else ""
    if choice not in ("markdown", "toml"):
        sys.exit("usage: python -m spool.config markdown|toml")
    sys.stdout.write(reference_markdown() if choice == "markdown" else example_toml())
