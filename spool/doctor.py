"""`spool doctor`: check the setup, each check a one-line verdict and, when it fails, how to fix it."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from spool.config import Config
from spool.errors import redact_url
from spool.records import CLOCK_SANE_AFTER

MIN_FREE_BYTES = 50 << 20


class Verdict(NamedTuple):
    name: str
    ok: bool
    detail: str
    fix: str = ""


def checks(config: Config, *, config_file: str | None, clock: Callable[[], float] = time.time,
           probe: Callable[[str, float], str] | None = None) -> Iterator[Verdict]:
    """Yield a verdict for each part of the setup, in the order an operator would look."""
    yield Verdict("config", True, f"valid ({config_file or 'defaults and environment'})")
    yield _key(config)
    yield _endpoint(config, probe or _probe)
    yield _clock(clock())
    yield _disk(config)
    yield _integrity(config)
    for watch in config.watch:
        writable = watch.path.is_dir() and os.access(watch.path, os.R_OK | os.W_OK | os.X_OK)
        yield Verdict(f"watch {watch.path}", writable, "writable" if writable else "missing or not writable",
                      f"mkdir -p {watch.path} and give the spool user write access")
    if config.relay.enabled:
        yield _port(config.relay.listen)


def _key(config: Config) -> Verdict:
    if config.ezkey is None:
        return Verdict("ezkey", False, "no ezkey configured: only records with their own key will ship",
                       "put the key in a file (chmod 600) and set ship.ezkey_file or SPOOL_EZKEY_FILE")
    return Verdict("ezkey", True, "configured (not shown)")


def _endpoint(config: Config, probe: Callable[[str, float], str]) -> Verdict:
    shown = redact_url(config.endpoint)  # an endpoint may carry credentials by mistake: never print them
    try:
        answer = probe(config.endpoint, min(config.timeout, 10.0))
    except Exception as exc:  # any failure to reach it is the verdict
        return Verdict("endpoint", False, f"{shown} not reachable: {exc}",
                       "check the network, DNS, proxy settings and ship.endpoint")
    return Verdict("endpoint", True, f"{shown} answered {answer}")


def _probe(endpoint: str, timeout: float) -> str:
    from spool.stathat import StatHatClient

    client = StatHatClient(endpoint, timeout=timeout, allow_insecure=True)  # the same deadline as shipping
    try:
        return f"HTTP {client.ping()}"
    finally:
        client.close()


def _clock(now: float) -> Verdict:
    if now < CLOCK_SANE_AFTER:
        return Verdict("clock", False, f"the system clock says {time.strftime('%Y-%m-%d', time.gmtime(now))}, "
                       "before this spool was released", "enable NTP (timedatectl set-ntp true) or set the clock")
    return Verdict("clock", True, time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)))


def _disk(config: Config) -> Verdict:
    folder = config.db.parent if config.db.parent.exists() else config.db.parent.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return Verdict("disk", False, f"cannot see {folder}: {exc.strerror}", "create the state directory")
    ok = free >= MIN_FREE_BYTES
    return Verdict("disk", ok, f"{free >> 20} MiB free where the spool lives",
                   "free some space, or set spool.max_spool_bytes so spool bounds itself")


def _integrity(config: Config) -> Verdict:
    from spool.errors import StoreError
    from spool.store import Store

    if not config.db.exists():
        return Verdict("spool", True, f"{config.db} does not exist yet; it is created on first use")
    mode = stat.S_IMODE(config.db.stat().st_mode)
    try:
        with Store.for_config(config) as store:
            sound = store.integrity_ok()
            counts = store.counts()
    except StoreError as exc:
        return Verdict("spool", False, str(exc), "`spool run` moves a corrupt spool aside and starts a fresh one")
    if not sound:
        return Verdict("spool", False, "integrity check failed",
                       "`spool export --state all` what can be read, then let `spool run` start a fresh spool")
    if mode & 0o077:
        return Verdict("spool", False, f"{config.db} is readable by others (mode {mode:o}); it holds keys",
                       f"chmod 600 {config.db}")
    return Verdict("spool", True, f"sound; {counts['pending']} pending, {counts['dead']} dead")


def _port(listen: str) -> Verdict:
    from spool.relay import parse_address

    host, port = parse_address(listen, "relay.listen", 8080)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            return Verdict("relay port", False, f"{listen} is not free: {exc.strerror}",
                           "if `spool run` is running, that is it; else stop what uses it (ss -ltnp) "
                           "or change relay.listen")
    return Verdict("relay port", True, f"{listen} is free")
