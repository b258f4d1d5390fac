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
from typing import Any, ClassVar

from spool.config import Config
from spool.store import Store

log = logging.getLogger("spool")

STOP_GRACE = 5.0  # seconds beyond the HTTP timeout that components get to finish at shutdown
COMPONENTS = ("ship", "watch", "relay", "metrics")


class _JsonLines(logging.Formatter):
    """One JSON object per line: time, level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


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


def _drop_inotify_stop_race(record: logging.LogRecord) -> bool:
    """Drop watchdog's ERROR for an emitter read after stop (by design upstream, harmless at shutdown)."""
    return "called when the thread is inactive" not in record.getMessage()


class Agent:
    """Run named components until SIGTERM/SIGINT (or a component's failure), each in its own thread."""

    def __init__(self, config: Config, *, only: Collection[str] | None = None,
                 monotonic: Callable[[], float] = time.monotonic):
        """`only`: the components to run (all the configuration asks for when None); a relay named is run."""
        unknown = set(only or ()) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components: {', '.join(sorted(unknown))}")
        self.config = config
        self.shutdown = threading.Event()
        self.wake = threading.Event()
        self.monotonic = monotonic
        self.stack = contextlib.ExitStack()
        self._threads: list[threading.Thread] = []
        self._failed: list[str] = []
        wanted = set(only) if only is not None else {
            "ship", *(["watch"] if config.watch else []), *(["relay"] if config.relay.enabled else []),
            *(["metrics"] if config.metrics.listen else [])}
        try:
            # The first open moves a corrupt spool aside rather than crash-looping on it; it serves the summary.
            self._store = self.stack.enter_context(Store.for_config(config, quarantine=True))
            self.shipper = self._shipper() if "ship" in wanted else None
            self.watchers = [self._watcher(entry) for entry in config.watch] if "watch" in wanted else []
            self.metrics = self._metrics() if {"relay", "metrics"} & wanted else None
            self.relay = self._relay() if "relay" in wanted else None
            self.metrics_server = self._metrics_server() if "metrics" in wanted and config.metrics.listen else None
        except BaseException:
            self.stack.close()
            raise

    def _open(self) -> Store:
        return self.stack.enter_context(Store.for_config(self.config))

    def _shipper(self) -> Any:
        from spool.ship import Shipper

        return Shipper(self._open(), self.config, shutdown=self.shutdown, wake=self.wake)

    def _watcher(self, entry: Any) -> Any:
        from spool.watch import DirectoryWatcher

        watcher = DirectoryWatcher(entry, self._open(), shutdown=self.shutdown, t_floor=self.config.spool.t_floor,
                                   on_ingested=lambda result: self.wake.set())
        watcher.check_directory()  # a missing directory is a configuration error, before anything starts
        return watcher

    def _metrics(self) -> Any:
        from spool.metrics import Metrics

        return Metrics(self._open(), shipper=self.shipper.snapshot if self.shipper else None,
                       watchers=lambda: [watcher.snapshot() for watcher in self.watchers],
                       unhealthy_after=self.config.metrics.unhealthy_after)

    def _relay(self) -> Any:
        from spool.relay import Relay

        assert self.metrics is not None  # made first, for the relay's /metrics and /healthz
        relay = Relay(self.config.relay, self._open(), t_floor=self.config.spool.t_floor,
                      on_commit=lambda n: self.wake.set(), health=self.metrics.health, metrics=self.metrics.render)
        self.metrics.relay = relay.snapshot
        self.stack.callback(relay.stop)
        return relay

    def _metrics_server(self) -> Any:
        from spool.metrics import MetricsServer

        assert self.metrics is not None
        server = MetricsServer(self.config.metrics, self.metrics)
        self.stack.callback(server.stop)
        return server

    def _start(self, name: str, target: Callable[[], Any]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # a component died: stop the agent, loudly, so systemd restarts it
                log.exception("%s failed: %s", name, exc)
                self._failed.append(name)
                self.shutdown.set()

        thread = threading.Thread(target=guarded, name=f"spool-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.shutdown.set()  # nothing else is safe in a signal handler

    def run(self) -> int:
        """Run until a signal or a component failure; return the process exit status."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        stuck: list[str] = []
        with self.stack:
            self._introduce()
            if self.shipper is not None:
                self.stack.enter_context(self.shipper)  # takes the shipper lock first: a second agent stops here
                self._start("shipper", self.shipper.run)
            for watcher in self.watchers:
                watcher.start()
                log.info("watching %s%s", watcher.directory, " (polling)" if watcher.watch.poll else "")
                self._start(f"watch {watcher.directory.name}", watcher.run)
            if self.relay is not None:
                self.relay.start()
                statsd = self.relay.statsd_address
                log.info("relay listening on %s%s", self.relay.url,
                         f", StatsD on udp {statsd[0]}:{statsd[1]}" if statsd else "")
            if self.metrics_server is not None:
                self.metrics_server.start()
                log.info("metrics and health on %s/metrics and /healthz", self.metrics_server.url)
            next_summary = self.monotonic() + self.config.log.summary_interval
            while not self.shutdown.wait(timeout=max(0.0, min(next_summary - self.monotonic(), 60.0))):
                if self.monotonic() >= next_summary:
                    self.log_summary()
                    next_summary = self.monotonic() + self.config.log.summary_interval
            log.info("shutting down")
            self.wake.set()
            if self.relay is not None:
                self.relay.stop()  # answers what it took; nothing is taken after this
            for watcher in self.watchers:
                watcher.stop()
            deadline = self.monotonic() + self.config.ship.timeout + STOP_GRACE
            for thread in self._threads:
                thread.join(timeout=max(0.0, deadline - self.monotonic()))
            stuck = [thread.name for thread in self._threads if thread.is_alive()]
            if stuck:
                log.error("did not stop in time: %s", ", ".join(stuck))
                self.stack.pop_all()  # threads still use their spool connections: leave them to the exit
            else:
                self.log_summary()
        return 1 if self._failed or stuck else 0

    def _introduce(self) -> None:
        """Say in the first lines what runs, on which spool and config, and what is missing."""
        parts = [name for name, on in (("shipping", self.shipper), ("watching", self.watchers),
                                       ("relay", self.relay), ("metrics", self.metrics_server)) if on]
        log.info("spool agent: %s; spool %s (%s); config: %s", ", ".join(parts) or "nothing to do",
                 self.config.db, self.config.db_source, self.config.source)
        if self.shipper is not None:
            log.info("shipping to %s", self.shipper.endpoint)
            if self.config.ship.ezkey is None and self.config.ship.ezkey_file is None:
                log.warning("no ezkey configured: only records carrying their own key will be shipped "
                            "(set ship.ezkey_file in the config, or SPOOL_EZKEY_FILE)")

    def log_summary(self) -> None:
        try:
            pending, inflight = self._store.backlog()
            oldest = self._store.oldest_pending_t()
        except Exception as exc:
            log.warning("cannot read the spool for the summary: %s", exc)
            return
        age = "" if oldest is None else f" (oldest {max(0, int(time.time()) - oldest)} s)"
        ingested = sum(watcher.snapshot()["records"] for watcher in self.watchers)
        files = f"; ingested {ingested:,} records from files" if self.watchers else ""
        if self.relay is not None:
            files += f"; relayed {sum(self.relay.snapshot()['appended'].values()):,} records"
        if self.shipper is None:
            log.info("backlog %s pending%s%s", f"{pending:,}", age, files)
            return
        stats = self.shipper.snapshot()
        log.info("backlog %s pending%s, %s in flight; shipped %s, dead %s this run%s; last error: %s",
                 f"{pending:,}", age, f"{inflight:,}", f"{stats['sent']:,}", f"{stats['dead']:,}", files,
                 stats["last_error"] or "none")
