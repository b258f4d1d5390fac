"""`spool doctor`: check the setup, each check a one-line verdict and, when it fails, how to fix it."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from spool.clock import utc_text
from spool.config import DEFAULT_ENDPOINT, Config, parse_address
from spool.errors import ConfigError, redact_url
from spool.lock import IDENTITY_HEADER, spool_identity
from spool.records import CLOCK_SANE_AFTER

MIN_FREE_BYTES = 50 << 20


class Verdict(NamedTuple):
    name: str
    ok: bool
    detail: str
    fix: str = ""


def checks(load: Callable[[], Config], *, fallback: Callable[[], Config], clock: Callable[[], float] = time.time,
           probe: Callable[[str, float], str] | None = None, deep: bool = False,
           recount: bool = False) -> Iterator[Verdict]:
    """Yield a verdict for each part of the setup, in the order an operator would look.

    A configuration that does not load is the first failed verdict; every other check still runs, on
    `fallback` (the defaults, with the spool path given on the command line or in the environment). The spool
    is checked as opening it checks it (a few pages, whatever the backlog), and the verdict of the last full
    check is reported; `deep` runs the full check now (it reads the whole file) and records its verdict, and
    counts the records to compare with the kept counts (`recount`: those that differ are set).
    """
    try:
        config = load()
        yield Verdict("config", True, f"{config.source}; spool {config.db} ({config.db_source})")
    except ConfigError as exc:
        yield Verdict("config", False, str(exc), "fix the configuration (`python -m spool.config toml` prints "
                      "every setting with its default)")
        config = fallback()
    yield _key(config)
    yield _endpoint(config, probe or (lambda url, timeout: _probe(url, timeout, _configured_key(config),
                                                                  spool_identity(config.db))))
    yield _clock(clock())
    yield _disk(config)
    yield _integrity(config, deep, clock)
    yield _producers(config)
    if deep:
        yield _counts(config, recount=recount)
    for watch in config.watch:
        yield from _watched(watch.path)
    identity = spool_identity(config.db)  # a listener of this spool's agent answers with it
    if config.relay.enabled:
        relay = _port(config.relay.listen, "relay", 8080, identity, "relay")
        yield relay.verdict
        if config.relay.statsd:
            yield _statsd_port(config.relay.statsd, relay)
    if config.metrics.listen:
        yield _port(config.metrics.listen, "metrics", 9464, identity, "metrics server").verdict


def _watched(path: Path) -> Iterator[Verdict]:
    """A drop directory, and the .done/ and .rejected/ folders spool moves its files into."""
    from spool.watch import DONE, REJECTED, folder_problem

    writable = path.is_dir() and os.access(path, os.R_OK | os.W_OK | os.X_OK)
    yield Verdict(f"watch {path}", writable, "writable" if writable else "missing or not writable",
                  f"mkdir -p {path} and give the spool user write access")
    for name in (DONE, REJECTED):
        problem = folder_problem(path, name) if writable else None
        if problem is not None:
            yield Verdict(f"watch {path / name}", False, problem,
                          f"remove {path / name} (spool makes it) or make the spool user its owner")


def _key(config: Config) -> Verdict:
    try:
        key = config.ezkey()
    except ConfigError as exc:
        return Verdict("ezkey", False, str(exc), "put the key in that file (chmod 600, owned by the spool user)")
    if key is None:
        return Verdict("ezkey", False, "no ezkey configured: only records with their own key will ship",
                       "put the key in a file (chmod 600) and set ship.ezkey_file or SPOOL_EZKEY_FILE")
    return Verdict("ezkey", True, "configured (not shown)")


def _configured_key(config: Config) -> str | None:
    try:
        return config.ezkey(warn=False)
    except ConfigError:  # said by the ezkey check
        return None


def _endpoint(config: Config, probe: Callable[[str, float], str]) -> Verdict:
    """A real, harmless StatHat request (an EZ batch with no data), whose answer must be StatHat's."""
    from spool.errors import EndpointError, Refused

    shown = redact_url(config.ship.endpoint)  # an endpoint may carry credentials by mistake: never print them
    try:
        answer = probe(config.ship.endpoint, min(config.ship.timeout, 10.0))
    except EndpointError as exc:
        return Verdict("endpoint", False, f"{shown} is not StatHat: {exc}", f"set ship.endpoint to StatHat's API "
                       f"root, {DEFAULT_ENDPOINT} (or the root of a spool relay)")
    except Refused as exc:
        return Verdict("endpoint", False, f"{shown} is StatHat, and it refused the configured ezkey: {exc}",
                       "put the account's EZ key in ship.ezkey_file")
    except Exception as exc:  # any failure to reach it is the verdict
        return Verdict("endpoint", False, f"{shown} not reachable: {exc}",
                       "check the network, DNS, proxy settings and ship.endpoint")
    return Verdict("endpoint", True, f"{shown} answered as StatHat does (an EZ batch with no data: {answer})")


def _probe(endpoint: str, timeout: float, key: str | None, identity: str | None) -> str:
    from spool.stathat import StatHatClient

    # The same deadline as shipping; as the shipper, it names its spool (a relay of the same spool is a loop).
    client = StatHatClient(endpoint, timeout=timeout, allow_insecure=True, identity=identity)
    try:
        return client.probe(key)
    finally:
        client.close()


def _clock(now: float) -> Verdict:
    if now < CLOCK_SANE_AFTER:
        return Verdict("clock", False, f"the system clock says {utc_text(now, '%Y-%m-%d')}, "
                       "before this spool was released", "enable NTP (timedatectl set-ntp true) or set the clock")
    return Verdict("clock", True, utc_text(now))


def _disk(config: Config) -> Verdict:
    """Free space where the spool lives, or, on a fresh box, at the nearest folder that exists on its way there."""
    folder = config.db.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError as exc:
        return Verdict("disk", False, f"cannot see {folder}: {exc.strerror}", f"make {config.db.parent} readable "
                       "by this user")
    ok = free >= MIN_FREE_BYTES
    where = "" if folder == config.db.parent else f" (the spool's folder {config.db.parent} is made on first use)"
    return Verdict("disk", ok, f"{free >> 20} MiB free at {folder}{where}",
                   "free some space, or set spool.max_spool_bytes so spool bounds itself")


def _integrity(config: Config, deep: bool, clock: Callable[[], float]) -> Verdict:
    from spool.errors import StoreError
    from spool.sharing import shared
    from spool.store import Store, sqlite_library

    try:
        if not config.db.exists():
            return Verdict("spool", True, f"{config.db} does not exist yet; it is created on first use")
        mode = stat.S_IMODE(config.db.stat().st_mode)
    except PermissionError:  # another user's private spool: the producers check says what this user can do
        return Verdict("spool", False, f"cannot look at {config.db}: permission denied",
                       "run doctor as the spool's owner (sudo -u spool spool doctor); see the producers check")
    try:
        with Store.for_config(config, create=False) as store:  # opening checks the bookkeeping tables
            verdict = _deep_check(store, clock) if deep else store.integrity()
    except StoreError as exc:
        return Verdict("spool", False, str(exc), "`spool run` moves a corrupt spool aside and starts a fresh one")
    state, at = verdict.get("state"), utc_text(verdict.get("at", 0))
    if state == "damaged":
        return Verdict("spool", False, f"the full integrity check ({at}) found damage: {verdict.get('detail')}",
                       f"`spool export --state pending FILE` saves what can still be read; then restart `spool "
                       f"run`: it moves {config.db.name} aside and starts a fresh spool")
    if mode & (0o007 if shared(config.db.parent) else 0o077):  # a shared spool is its group's by design
        return Verdict("spool", False, f"{config.db} is readable by others (mode {mode:o}); it holds keys",
                       f"chmod {'660' if shared(config.db.parent) else '600'} {config.db}")
    full = {"sound": f"full check sound ({at}, {verdict.get('seconds', 0):g} s)",
            "checking": f"full check running in the agent (since {at})",
            "owed": "full check owed (the last agent did not stop cleanly): `spool run` runs it when idle"}.get(
        state or "", "no full check recorded (`spool doctor --deep` runs one)")
    return Verdict("spool", True, f"bookkeeping sound; {full}; {sqlite_library()}")


def _producers(config: Config) -> Verdict:
    """Who may add stats to the spool, and what applies to this user: write it, join its group, or another way."""
    from spool.sharing import access_problem, group_name, shared, who

    ways = [f"the relay (http://{config.relay.listen}/ez)"] if config.relay.enabled else []
    ways += [f"a drop directory ({entry.path})" for entry in config.watch]
    others = " or ".join(ways) if ways else "the relay or a drop directory (neither is configured here)"
    folder = config.db.parent
    if shared(folder):
        scope = f"shared with group {group_name(folder.stat().st_gid)}: its members add stats; others use {others}"
    else:
        scope = f"private to its owner: other users add stats through {others}"
    problem = access_problem(config.db, others)
    if problem is not None:
        return Verdict("producers", False, problem[0], problem[1])
    return Verdict("producers", True, f"{who()} can add stats; the spool is {scope}")


def _deep_check(store: Any, clock: Callable[[], float]) -> dict[str, Any]:
    """Run the full check now and record its verdict (as the agent's background check does), if the spool lets us."""
    from spool.checkup import full_check
    from spool.errors import StoreError

    verdict = full_check(store, clock=clock) or {}
    try:
        store.record_integrity(**verdict)
    except StoreError:  # a read-only spool: the verdict is still told
        pass
    return verdict


def _counts(config: Config, *, recount: bool) -> Verdict:
    """The kept counts (what status, the bounds and /metrics read) against a real count of the records."""
    from spool.errors import StoreError
    from spool.store import Store

    if not config.db.exists():
        return Verdict("counts", True, "no spool yet")
    try:
        with Store.for_config(config, create=False) as store:
            kept, real = store.recount() if recount else store.count_records()
    except StoreError as exc:
        return Verdict("counts", False, str(exc), "see the spool check above")
    differ = "; ".join(f"{name} {kept[name]:,} kept, {real[name]:,} counted"
                       for name in kept if kept[name] != real[name])
    if not differ:
        return Verdict("counts", True, "kept counts match the records ("
                       + ", ".join(f"{n:,} {name}" for name, n in real.items()) + ")")
    if recount:
        return Verdict("counts", True, f"set to the records' counts: {differ}")
    return Verdict("counts", False, f"kept counts differ from the records: {differ}", "spool doctor --deep --recount")


class _Listener(NamedTuple):
    verdict: Verdict
    statsd: tuple[str, ...]  # the StatsD addresses this spool's running relay said it listens on


def _port(listen: str, section: str, default_port: int, identity: str | None, what: str) -> _Listener:
    """A listening address: free, or held by this spool's running agent (it says so on its answers), or not free."""
    host, port = parse_address(listen, f"{section}.listen", default_port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as exc:
            error = exc.strerror
        else:
            return _Listener(Verdict(f"{section} port", True, f"{listen} is free"), ())
    headers = _spool_answer(host, port)
    holder = headers.get(IDENTITY_HEADER.lower())
    if holder is not None and holder == identity:
        return _Listener(Verdict(f"{section} port", True, f"{listen} is this spool's {what}, running"),
                         tuple(headers.get("spool-statsd", "").split()))
    if holder is not None:
        return _Listener(Verdict(f"{section} port", False, f"{listen} is held by the {what} of another spool file",
                                 f"stop that spool's agent, or change {section}.listen"), ())
    return _Listener(Verdict(f"{section} port", False, f"{listen} is not free: {error}",
                             f"stop what uses it (ss -ltnp) or change {section}.listen"), ())


def _spool_answer(host: str, port: int) -> dict[str, str]:
    """The headers of what listens at host:port when asked GET / (lower-case names), or {} if it does not answer."""
    import http.client

    if host in ("0.0.0.0", "::", ""):  # noqa: S104  # a wildcard listener: asked on loopback
        host = "127.0.0.1" if host != "::" else "::1"
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read(1 << 16)
        return {name.lower(): value for name, value in response.getheaders()}
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        connection.close()


def _statsd_port(address: str, relay: _Listener) -> Verdict:
    """StatsD's UDP address(es): free, or this spool's running relay's (it names them on its answers)."""
    host, port = parse_address(address, "relay.statsd", 8125)
    hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]
    taken = []
    for each in hosts:
        with socket.socket(socket.AF_INET6 if ":" in each else socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((each, port))
            except OSError as exc:
                shown = f"[{each}]:{port}" if ":" in each else f"{each}:{port}"
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and host == "localhost":
                    continue  # no ::1 on this box: the relay listens on 127.0.0.1 alone
                taken.append((shown, exc.strerror))
    if not taken:
        return Verdict("statsd port", True, f"{address} is free")
    if all(shown in relay.statsd for shown, _ in taken):
        return Verdict("statsd port", True, f"{address} is this spool's relay's StatsD listener, running")
    shown, error = next((shown, error) for shown, error in taken if shown not in relay.statsd)
    return Verdict("statsd port", False, f"{shown} is not free: {error}",
                   "stop what uses it (ss -lunp) or change relay.statsd")
