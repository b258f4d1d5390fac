"""`spool run`: the long-running agent. Components run in threads on one shared shutdown event."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from spool.config import Config
from spool.ship import Shipper
from spool.store import Store

log = logging.getLogger("spool")

STOP_GRACE = 5.0  # seconds beyond the HTTP timeout that components get to finish at shutdown


def setup_logging(level: str) -> None:
    """Log one line per event to stderr; no timestamps under journald, which adds its own."""
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt, force=True)
    logging.getLogger("watchdog.observers.inotify").addFilter(_drop_inotify_stop_race)


def _drop_inotify_stop_race(record: logging.LogRecord) -> bool:
    """Drop watchdog's ERROR for an emitter read after stop (by design upstream, harmless at shutdown)."""
    return "called when the thread is inactive" not in record.getMessage()


class Agent:
    """Run the shipper and the configured watchers until SIGTERM/SIGINT, each in its own thread."""

    def __init__(self, config: Config, *, ship: bool = True, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.shutdown = threading.Event()
        self.wake = threading.Event()
        self.monotonic = monotonic
        self._threads: list[threading.Thread] = []
        self._failed: list[str] = []
        # The first open moves a corrupt spool aside rather than crash-looping on it; this one serves summaries.
        self._store = Store.for_config(config, quarantine=True)
        self.shipper = Shipper(self._open(), config, shutdown=self.shutdown, wake=self.wake) if ship else None
        self.watchers = [self._watcher(watch) for watch in config.watch]
        self.relay = self._relay() if config.relay.enabled else None

    def _relay(self) -> Any:
        from spool.metrics import Metrics
        from spool.relay import Relay

        metrics = self._metrics = Metrics(self._open(), shipper=self.shipper, watchers=lambda: self.watchers,
                                          unhealthy_after=self.config.unhealthy_after)
        relay = Relay(self.config.relay, self._open(), t_floor=self.config.t_floor,
                      on_commit=lambda n: self.wake.set(), health=metrics.health, metrics=metrics.render)
        metrics.relay = relay
        return relay

    def _open(self) -> Store:
        return Store.for_config(self.config)

    def _watcher(self, watch: Any) -> Any:
        from spool.watch import DirectoryWatcher

        watcher = DirectoryWatcher(watch, self._open(), shutdown=self.shutdown,
                                   on_ingested=lambda result: self.wake.set(), t_floor=self.config.t_floor)
        watcher.check_directory()  # a missing directory is a configuration error, before anything starts
        return watcher

    def _start(self, name: str, target: Callable[[], Any]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:  # a component died: stop the agent so systemd restarts it
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
        with contextlib.ExitStack() as stack:
            if self.shipper is not None:
                stack.enter_context(self.shipper)  # takes the shipper lock first: a second agent stops here
                log.info("shipping %s to %s", self.config.db, self.shipper.endpoint)
                if self.config.ezkey is None:
                    log.warning("no ezkey configured: only records carrying their own key will be shipped")
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
            next_summary = self.monotonic() + self.config.summary_interval
            while not self.shutdown.wait(timeout=max(0.0, min(next_summary - self.monotonic(), 60.0))):
                if self.monotonic() >= next_summary:
                    self.log_summary()
                    next_summary = self.monotonic() + self.config.summary_interval
            log.info("shutting down")
            self.wake.set()
            if self.relay is not None:
                self.relay.stop()  # answers what it took; nothing is taken after this
            for watcher in self.watchers:
                watcher.stop()
            deadline = self.monotonic() + self.config.timeout + STOP_GRACE
            for thread in self._threads:
                thread.join(timeout=max(0.0, deadline - self.monotonic()))
            stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            log.error("did not stop in time: %s", ", ".join(stuck))
        else:
            stores = [component.store for component in [self.shipper, *self.watchers] if component is not None]
            if self.relay is not None:
                stores += [self.relay.writer.store, self._metrics.store]
            for store in stores:
                store.close()
        self.log_summary()
        self._store.close()
        return 1 if self._failed or stuck else 0

    def log_summary(self) -> None:
        try:
            pending, inflight = self._store.backlog()
            oldest = self._store.oldest_pending_t()
        except Exception as exc:
            log.warning("cannot read the spool for the summary: %s", exc)
            return
        age = "" if oldest is None else f" (oldest {max(0, int(time.time()) - oldest)} s)"
        ingested = sum(watcher.ingested_records for watcher in self.watchers)
        files = f"; ingested {ingested} records from files" if self.watchers else ""
        if self.relay is not None:
            files += f"; relayed {sum(self.relay.stats.appended.values())} records"
        if self.shipper is None:
            log.info("backlog %d pending%s%s", pending, age, files)
            return
        stats = self.shipper.stats
        log.info("backlog %d pending%s, %d in flight; shipped %d, dead %d this run%s; last error: %s",
                 pending, age, inflight, stats.sent, stats.dead, files,
                 stats.last_error or "none")
