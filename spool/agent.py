"""The long-running agent: named components (ship, watch, relay, metrics) in threads on one shutdown event.

`spool run` runs every component the configuration asks for; `spool ship`, `spool watch` and `spool relay` run
exactly the one their name says. The agent owns everything it opens (one ExitStack): spool connections,
sockets, threads. Signal handlers only set an event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, ClassVar, cast

from spool.config import Config, WatchSettings
from spool.store import Store

log = logging.getLogger("spool")

STOP_GRACE = 5.0  # seconds beyond the HTTP timeout that components get to finish at shutdown
COMPONENTS = ("ship", "watch", "relay", "metrics")
_START_ORDER = {"ship": 1, "metrics": 2}  # after the producers' doors (0): see Agent._apply


_PLAIN_RECORD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class _JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, component, message, and the event's own fields.

    The component is the part of spool that speaks (ship, relay, statsd, watch, metrics, checkup; agent for
    the agent itself), from the logger's name unless the line names it; the fields are what a line passed as
    `extra` (counts, an error's kind, a sender), so a log processor need not parse the message.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"time": round(record.created, 3), "level": record.levelname.lower(),
                                 "logger": record.name, "component": _component(record.name),
                                 "message": record.getMessage()}
        for name, value in vars(record).items():
            if name not in _PLAIN_RECORD and not name.startswith("_"):
                entry[name] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _component(logger: str) -> str:
    if logger == "spool":
        return "agent"
    return logger.removeprefix("spool.") if logger.startswith("spool.") else logger


class _JournalPriority(logging.Formatter):
    """Prefix each line with its syslog priority (<3> error ... <7> debug) so `journalctl -p err` works."""

    PRIORITIES: ClassVar[dict[int, int]] = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                                            logging.INFO: 6, logging.DEBUG: 7}

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = self.PRIORITIES.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in self.inner.format(record).splitlines() or [""])


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log one line per event to stderr; under journald without our own timestamps, with priorities."""
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    if fmt == "json":
        formatter: logging.Formatter = _JsonLines()
    else:
        formatter = logging.Formatter("%(levelname)s %(message)s" if journald else
                                      "%(asctime)s %(levelname)s %(message)s")
    if journald:
        formatter = _JournalPriority(formatter)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("watchdog.observers.inotify").addFilter(_drop_inotify_stop_race)
    # urllib3 warns of an odd answer (a malformed header) with its traceback; spool's own line says what
    # happened to the request. Its warnings show with --log-level debug.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if level.lower() == "debug" else logging.ERROR)


def _drop_inotify_stop_race(record: logging.LogRecord) -> bool:
    """Drop watchdog's ERROR for an emitter read after stop (by design upstream, harmless at shutdown)."""
    return "called when the thread is inactive" not in record.getMessage()


def _refuse_own_listener(config: Config, only: Collection[str]) -> None:
    """Refuse an endpoint that is one of this agent's own listeners: what it ships would come back, for ever.

    Known here when the address says it (a loopback name for a loopback listener); a name that resolves to
    one, or a relay of this spool in another process, is found when it answers (see spool.lock.spool_identity).
    """
    from urllib.parse import urlsplit

    from spool.config import parse_address
    from spool.errors import ConfigError, redact_url

    parts = urlsplit(config.ship.endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    listeners = [("relay", "relay.listen", config.relay.listen, 8080)] if "relay" in only else []
    if "metrics" in only and config.metrics.listen:
        listeners.append(("metrics server", "metrics.listen", config.metrics.listen, 9464))
    loopback = ("localhost", "127.0.0.1", "::1")
    for what, name, listen, default_port in listeners:
        bound, bound_port = parse_address(listen, name, default_port)
        same_host = (host == bound or bound in ("0.0.0.0", "::", "")  # noqa: S104  # a wildcard listener
                     or (host in loopback and bound in loopback))
        if same_host and port == bound_port:
            raise ConfigError(f"ship.endpoint {redact_url(config.ship.endpoint)} is this agent's own {what} ({name} "
                              f"= {listen}): what it ships would come back to it, for ever; set ship.endpoint to "
                              "StatHat's API root, https://api.stathat.com")


class Component:
    """One running part of the agent: it owns what it opens (an ExitStack) and stops on its own event.

    `key` is the slice of the configuration it was built from: on a reload, a component whose key did not
    change keeps running, so nothing it holds (a listening socket, a lease) is disturbed.
    """

    def __init__(self, name: str, key: object):
        self.name = name
        self.key = key
        self.stop_event = threading.Event()
        self.stack = contextlib.ExitStack()
        self.thread: threading.Thread | None = None
        self.snapshot: Callable[[], dict[str, Any]] | None = None  # what it has done, for /metrics
        self.watcher: Any = None  # the DirectoryWatcher of a watch component
        self.relay: Any = None  # the Relay of the relay component
        self.shipper: Any = None  # the Shipper of the ship component

    def open_store(self, config: Config) -> Store:
        return self.stack.enter_context(Store.for_config(config))

    def start(self, target: Callable[[], Any], failed: Callable[[str, BaseException], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # a component died: the agent stops, loudly, so systemd restarts it
                failed(self.name, exc)

        self.thread = threading.Thread(target=guarded, name=f"spool-{self.name}", daemon=True)
        self.thread.start()

    def halt(self) -> None:
        """Ask it to stop (it finishes or hands back what it holds)."""
        self.stop_event.set()

    def join(self, deadline: float, monotonic: Callable[[], float]) -> bool:
        """Wait for its thread until `deadline`; close what it owns if it ended. Return whether it ended."""
        if self.thread is not None:
            self.thread.join(timeout=max(0.0, deadline - monotonic()))
            if self.thread.is_alive():
                self.stack.pop_all()  # it still uses its spool connections: leave them to the process's exit
                return False
        self.stack.close()
        return True


class Agent:
    """Run named components until SIGTERM/SIGINT (or a component's failure); SIGHUP reloads the configuration.

    `only`: the components to run ("ship", "watch", "relay", "metrics"); all the configuration asks for when
    None (a relay named in `only` is run even if not enabled). `reload`: how to read the configuration again
    on SIGHUP (the CLI passes the same file and flags); an invalid new one is refused and the running one kept.
    """

    def __init__(self, config: Config, *, only: Collection[str] | None = None,
                 reload: Callable[[], Config] | None = None, monotonic: Callable[[], float] = time.monotonic):
        unknown = set(only or ()) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
        self.config = config
        self.only = set(only) if only is not None else None
        self.reload = reload
        self.shutdown = threading.Event()
        self.reload_asked = threading.Event()
        self._signalled = threading.Event()  # wakes the main loop for a signal (or a component's failure)
        self.wake = threading.Event()
        self.monotonic = monotonic
        self.started_at = time.time()  # "nothing delivered for" counts from here at most (spool.health)
        self.components: dict[str, Component] = {}
        self._failed: list[str] = []
        self._stuck: list[str] = []
        self._final = False  # the components are being stopped for good (not for a reload)
        # The first open moves a corrupt spool aside rather than crash-looping on it; it serves the summary. It
        # reads a few pages whatever the backlog; the whole file is checked later, if at all (spool.checkup).
        self._store = Store.for_config(config, quarantine=True)
        self._metrics: Any = None
        self._handover: Any = None  # what the last shipper replaced by a reload left to the next (ship.Handover)
        from spool.checkup import Checkup

        self._idle = threading.Event()  # set by the shipper when it first has nothing to move
        self.checkup = Checkup(config, idle=self._idle)

    # -- what runs ------------------------------------------------------------------------------------

    def wanted(self, config: Config) -> dict[str, object]:
        """The components a configuration asks for, each with the slice of it that it is built from.

        Raises ConfigError for what can be known wrong before anything starts (a missing drop directory).
        """
        only = self.only if self.only is not None else {
            "ship", *(["watch"] if config.watch else []), *(["relay"] if config.relay.enabled else []),
            *(["metrics"] if config.metrics.listen else [])}
        spool = (config.db, config.spool)
        wanted: dict[str, object] = {}
        if "ship" in only:
            _refuse_own_listener(config, only)
        if "ship" in only:  # the key file's content is part of it (a digest: compared, never shown)
            wanted["ship"] = (spool, config.ship, config.ezkey_identity())
        if "watch" in only:
            from spool.watch import check_directory

            for entry in config.watch:
                check_directory(entry.path)
                wanted[f"watch {entry.path}"] = (spool, entry)
        if "relay" in only:
            wanted["relay"] = (spool, config.relay)
        if "metrics" in only and config.metrics.listen:
            wanted["metrics"] = (spool, config.metrics)
        return wanted

    @property
    def metrics(self) -> Any:
        """The /metrics and /healthz collector (made on first use: only the relay and the metrics server need it).

        It reads whichever components run now, so a reload that restarts one is seen at once.
        """
        if self._metrics is None:
            from spool.metrics import Metrics

            def snapshot(name: str) -> dict[str, Any] | None:
                component = self.components.get(name)
                return component.snapshot() if component is not None and component.snapshot else None

            self._metrics = Metrics(
                Store.for_config(self.config), shipper=lambda: snapshot("ship"), relay=lambda: snapshot("relay"),
                watchers=lambda: [c.watcher.snapshot() for c in self.components.values() if c.watcher is not None],
                config=self.config, clock=time.time)
        return self._metrics

    def _build(self, name: str, key: object, config: Config) -> Component:
        component = Component(name, key)
        try:
            if name == "ship":
                from spool.ship import Shipper

                # Its own stop (a reload) awaits the answers in flight; the agent's (SIGTERM) cuts them short.
                shipper = Shipper(component.open_store(config), config, shutdown=component.stop_event,
                                  wake=self.wake, hurry=self.shutdown, idle=self._idle, handover=self._handover)
                component.shipper = shipper
                component.stack.enter_context(shipper)  # takes the shipper lock: a second agent stops here
                # With the lock held: the clean-stop mark is taken now, and set again (before the lock is
                # released: callbacks run last in, first out) only if this agent stops cleanly.
                self.checkup.begin(shipper.store)
                component.stack.callback(self._shipper_stopped, shipper.store)
                component.snapshot = shipper.snapshot
                component.start(shipper.run, self._component_failed)
                log.info("shipping %s to %s", config.db, shipper.endpoint, extra={"component": "ship"})
            elif name.startswith("watch "):
                from spool.watch import DirectoryWatcher

                _, entry = cast(tuple[object, WatchSettings], key)
                watcher = DirectoryWatcher(entry, component.open_store(config), shutdown=component.stop_event,
                                           t_floor=config.spool.t_floor, on_ingested=lambda result: self.wake.set())
                watcher.check_directory()  # a missing directory is a configuration error, before anything starts
                watcher.start()
                component.stack.callback(watcher.stop)
                component.watcher = watcher
                component.start(watcher.run, self._component_failed)
                log.info("watching %s%s", watcher.directory, " (polling)" if entry.poll else "",
                         extra={"component": "watch"})
            elif name == "relay":
                from spool.relay import Relay

                relay = Relay(config.relay, component.open_store(config), t_floor=config.spool.t_floor,
                              on_commit=lambda n: self.wake.set(), health=self.metrics.health,
                              metrics=self.metrics.render)
                component.stack.callback(relay.stop)
                relay.start()
                component.snapshot = relay.snapshot
                component.relay = relay
                statsd = " and ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                                      for host, port in relay.statsd_addresses)
                log.info("relay listening on %s%s", relay.url, f", StatsD on udp {statsd}" if statsd else "",
                         extra={"component": "relay"})
            elif name == "metrics":
                from spool.metrics import MetricsServer

                server = MetricsServer(config.metrics, self.metrics).start()
                component.stack.callback(server.stop)
                log.info("metrics and health on %s/metrics and /healthz", server.url, extra={"component": "metrics"})
        except BaseException:
            component.stack.close()
            raise
        return component

    def _shipper_stopped(self, store: Store) -> None:
        """Record a clean stop, if this is one: the agent stops for good, nothing failed, nothing is stuck."""
        from spool.errors import StoreError

        if not self._final:
            return  # a reload replaces the shipper; the agent goes on
        try:
            self.checkup.end(store, clean=not self._failed and not self._stuck)
        except StoreError as exc:  # the next start then checks the spool: harmless
            log.warning("cannot record the clean stop: %s", exc)

    def _component_failed(self, name: str, exc: BaseException) -> None:
        log.error("%s failed: %s", name, exc, exc_info=exc)
        self._failed.append(name)
        self.shutdown.set()
        self._signalled.set()

    def _apply(self, config: Config) -> None:
        """Bring the running components in line with `config`: stop what changed or went, start what is new."""
        wanted = self.wanted(config)
        going = [c for name, c in self.components.items() if wanted.get(name) != c.key]
        self._stop(going)
        for component in going:
            del self.components[component.name]
            if component.shipper is not None:  # the next shipper keeps its back-off and skips the start-up jitter
                self._handover = component.shipper.handover()
        if self.shutdown.is_set():  # stopped while the old parts finished (SIGTERM during a reload): start nothing
            return
        # Producers' doors (relay, watchers) open first, as soon as the spool is open; the shipper starts after
        # them (its lock, the dead owners' stages and leases it sweeps, the clean-stop mark), then the metrics.
        for name, key in sorted(wanted.items(), key=lambda item: _START_ORDER.get(item[0], 0)):
            if name not in self.components:
                self.components[name] = self._build(name, key, config)
        self.config = config
        if self._metrics is not None:  # /healthz judges by the running configuration (a key configured since)
            self._metrics.config = config

    def _stop(self, components: list[Component]) -> list[str]:
        """Stop components (relays first: they answer what they took; then the rest); return the stuck."""
        for component in sorted(components, key=lambda c: c.name != "relay"):
            component.halt()
            if component.relay is not None:
                component.relay.stop()
            if component.watcher is not None:
                component.watcher.stop()
        self.wake.set()
        deadline = self.monotonic() + self.config.ship.timeout + STOP_GRACE
        self._stuck = []
        # The shipper is joined last: stopping it records whether the agent stopped cleanly, others included.
        for component in sorted(components, key=lambda c: c.name == "ship"):
            if not component.join(deadline, self.monotonic):
                self._stuck.append(component.name)
        return list(self._stuck)

    # -- running ----------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        # Nothing but setting flags is safe in a signal handler.
        (self.reload_asked if signum == signal.SIGHUP else self.shutdown).set()
        self._signalled.set()

    def run(self) -> int:
        """Run until a signal or a component failure; return the process exit status."""
        from spool import systemd

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, self._on_signal)
        stuck: list[str] = []
        try:
            self.wanted(self.config)  # what is wrong in the configuration is said before anything starts
            self._introduce()
            self._apply(self.config)
            systemd.notify("READY=1", f"STATUS=running: {', '.join(self.components) or 'nothing'}")
            watchdog = systemd.watchdog_interval()
            next_summary = self.monotonic() + self.config.log.summary_interval
            next_ping = self.monotonic()
            while not self.shutdown.is_set():
                now = self.monotonic()
                if watchdog is not None and now >= next_ping and not self._failed:
                    systemd.notify("WATCHDOG=1")
                    next_ping = now + watchdog
                if now >= next_summary:
                    self.log_summary()
                    next_summary = now + self.config.log.summary_interval
                if self.reload_asked.is_set():
                    self.reload_asked.clear()
                    self._reload()
                    continue
                # At most a second: a signal taken by another thread (watchdog's, the pool's) wakes no wait here,
                # it only sets the flags; the loop then sees them within a second.
                waits = [next_summary - now, 1.0] + ([next_ping - now] if watchdog is not None else [])
                self._signalled.wait(timeout=max(0.0, min(waits)))
                self._signalled.clear()
            systemd.notify("STOPPING=1")
            log.info("shutting down")
            self.checkup.stop(STOP_GRACE)  # a check cut short is owed again at the next start
            self._final = True
            stuck = self._stop(list(self.components.values()))
            self.components.clear()
            if stuck:
                log.error("did not stop in time: %s", ", ".join(stuck))
            else:
                self.log_summary()
        finally:
            self.checkup.stop(STOP_GRACE)
            if not stuck:
                if self._metrics is not None:
                    self._metrics.store.close()
                self._store.close()
        return 1 if self._failed or stuck else 0

    def _reload(self) -> None:
        from spool import systemd
        from spool.errors import SpoolError

        if self.reload is None:
            log.warning("SIGHUP: this command has no configuration to read again; nothing changed")
            return
        log.info("SIGHUP: reloading the configuration")
        systemd.reloading()
        try:
            config = self.reload()
            self.wanted(config)  # a new component set that cannot even be described is refused here too
        except SpoolError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            systemd.notify("READY=1")
            return
        before = dict(self.components)
        try:
            self._apply(config)
        except SpoolError as exc:  # a new part could not start (a port taken, a directory missing)
            log.error("reload: %s; going back to the configuration that ran", exc)
            self._apply(self.config)  # _apply sets self.config only once everything started
        if self.shutdown.is_set():
            log.info("stopping before the reload finished")
            return
        names = sorted({name for name, _ in set(before.items()) ^ set(self.components.items())})
        log.info("reloaded the configuration: %s", f"restarted {', '.join(names)}" if names else "nothing changed")
        systemd.notify("READY=1")

    def _introduce(self) -> None:
        """Say in the first lines what runs, on which spool and config, and what is missing."""
        parts = sorted(self.wanted(self.config))
        log.info("spool agent: %s; spool %s (%s); config: %s", ", ".join(parts) or "nothing to do",
                 self.config.db, self.config.db_source, self.config.source)
        if "ship" in parts and not self.config.ship.keyed:
            log.warning("no ezkey configured: only records carrying their own key will be shipped "
                        "(set ship.ezkey_file in the config, or SPOOL_EZKEY_FILE)")

    def log_summary(self) -> None:
        """One line: the backlog, what this run did, and the health verdict (spool.health), also systemd's STATUS=."""
        from spool import systemd
        from spool.health import assess, read_facts

        relay = self.components.get("relay")
        commit_error = relay.relay.writer.last_error if relay is not None and relay.relay is not None else None
        try:
            facts = read_facts(self._store, self.config, started_at=self.started_at, commit_error=commit_error)
        except Exception as exc:
            log.warning("cannot read the spool for the summary: %s", exc)
            return
        verdict = assess(facts)
        health = verdict.summary()
        age = "" if facts.oldest_pending_age is None else f" (oldest {facts.oldest_pending_age:.0f} s)"
        watchers = [c.watcher for c in self.components.values() if c.watcher is not None]
        files = f"; ingested {sum(w.snapshot()['records'] for w in watchers):,} records from files" if watchers else ""
        if relay is not None and relay.snapshot is not None:
            files += f"; relayed {sum(relay.snapshot()['appended'].values()):,} records"
        ship = self.components.get("ship")
        if ship is None or ship.snapshot is None:
            log.info("backlog %s pending%s%s; health: %s", f"{facts.pending:,}", age, files, health,
                     extra={"pending": facts.pending, "inflight": facts.inflight, "health": verdict.verdict})
        else:
            stats = ship.snapshot()
            log.info("backlog %s pending%s, %s in flight; shipped %s, dead %s this run%s; health: %s",
                     f"{facts.pending:,}", age, f"{facts.inflight:,}", f"{stats['sent']:,}", f"{stats['dead']:,}",
                     files, health, extra={"pending": facts.pending, "inflight": facts.inflight,
                                           "shipped": stats["sent"], "dead": stats["dead"], "health": verdict.verdict})
        systemd.notify(f"STATUS={health}; {facts.pending:,} pending")
