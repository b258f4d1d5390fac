"""`spool run`: the long-running agent. Components run in threads on one shared shutdown event."""

from __future__ import annotations

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


class Agent:
    """Run the shipper (and, as configured, other components) until SIGTERM/SIGINT."""

    def __init__(self, config: Config, *, monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.shutdown = threading.Event()
        self.wake = threading.Event()
        self.monotonic = monotonic
        self._threads: list[threading.Thread] = []
        self._failed: list[str] = []
        self._store = Store(config.db, synchronous=config.synchronous)  # the main thread's, for summaries
        self.shipper = Shipper(Store(config.db, synchronous=config.synchronous), config,
                               shutdown=self.shutdown, wake=self.wake)

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
        with self.shipper:
            log.info("spool agent started: spool %s, endpoint %s", self.config.db, self.shipper.client.endpoint)
            if self.config.ezkey is None:
                log.warning("no ezkey configured: only records carrying their own key will be shipped")
            self._start("shipper", self.shipper.run)
            next_summary = self.monotonic() + self.config.summary_interval
            while not self.shutdown.wait(timeout=max(0.0, min(next_summary - self.monotonic(), 60.0))):
                if self.monotonic() >= next_summary:
                    self.log_summary()
                    next_summary = self.monotonic() + self.config.summary_interval
            log.info("shutting down")
            self.wake.set()
            deadline = self.monotonic() + self.config.timeout + STOP_GRACE
            for thread in self._threads:
                thread.join(timeout=max(0.0, deadline - self.monotonic()))
            stuck = [thread.name for thread in self._threads if thread.is_alive()]
        if stuck:
            log.error("did not stop in time: %s", ", ".join(stuck))
        else:
            self.shipper.store.close()
        self.log_summary()
        self._store.close()
        return 1 if self._failed or stuck else 0

    def log_summary(self) -> None:
        try:
            counts = self._store.counts()
            oldest = self._store.oldest_pending_t()
        except Exception as exc:
            log.warning("cannot read the spool for the summary: %s", exc)
            return
        stats = self.shipper.stats
        age = "" if oldest is None else f" (oldest {max(0, int(time.time()) - oldest)} s)"
        log.info("backlog %d pending%s, %d in flight; shipped %d, dead %d this run; last error: %s",
                 counts["pending"], age, counts["inflight"], stats.sent, stats.dead, stats.last_error or "none")
