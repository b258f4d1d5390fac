"""What the agent exposes at /metrics (Prometheus, via prometheus_client) and /healthz."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from spool.store import Store

COUNTS_TTL = 30.0  # seconds a full count by state is reused (it walks the table; backlog figures do not)


class Metrics:
    """A prometheus_client collector reading the spool (its own connection) and the agent's components."""

    def __init__(self, store: Store, *, shipper: Any = None, relay: Any = None,
                 watchers: Callable[[], list[Any]] = list, unhealthy_after: float = 900.0,
                 clock: Callable[[], float] = time.time):
        from prometheus_client import CollectorRegistry

        self.store = store
        self.unhealthy_after = unhealthy_after
        self.clock = clock
        self.started_at = clock()
        self.shipper = shipper
        self.relay = relay
        self.watchers = watchers
        self._lock = threading.Lock()  # one connection, several HTTP threads
        self._counts: tuple[float, dict[str, int]] | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def health(self) -> dict[str, Any]:
        """A short status for /healthz: the backlog, the last delivery, and every reason it is not healthy.

        Degraded (as Fluent Bit's health thresholds do) when records are waiting and nothing was delivered for
        `unhealthy_after` seconds (counted from the agent's start if nothing was delivered since).
        """
        with self._lock:
            pending, inflight = self.store.backlog()
            oldest = self.store.oldest_pending_t()
            last = self.store.meta().get("last_success_at")
        now = self.clock()
        writable = os.access(self.store.path.parent, os.W_OK) and os.access(self.store.path, os.W_OK)
        problems = [] if writable else ["the spool is not writable"]
        quiet = now - max(last or 0.0, self.started_at)
        if pending + inflight and quiet >= self.unhealthy_after:
            problems.append(f"{pending + inflight} records waiting and nothing delivered for {quiet:.0f} s")
        return {"writable": writable, "pending": pending, "inflight": inflight, "last_success_at": last,
                "oldest_pending_age": None if oldest is None else max(0, int(now) - oldest), "problems": problems}

    def _state_counts(self) -> dict[str, int]:
        stamp = time.monotonic()
        if self._counts is None or stamp - self._counts[0] > COUNTS_TTL:
            self._counts = (stamp, self.store.counts())
        counts = dict(self._counts[1])
        counts["pending"], counts["inflight"] = self.store.backlog()  # always fresh: cheap
        return counts

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            counts = self._state_counts()
            oldest = self.store.oldest_pending_t()
            meta = self.store.meta()
            counters = self.store.counters()
        dropped = CounterMetricFamily("spool_dropped", "Records dropped or refused at a bound, by reason",
                                      labels=["reason"])
        for reason in ("dropped_oldest", "dropped_age", "refused_full"):
            dropped.add_metric([reason], counters.get(reason, 0))
        yield dropped
        yield CounterMetricFamily("spool_compacted", "Count records merged away by compaction",
                                  value=counters.get("compacted", 0))
        yield CounterMetricFamily("spool_corrupt_quarantined", "Corrupt spool files moved aside",
                                  value=counters.get("corrupt_quarantined", 0))
        records = GaugeMetricFamily("spool_records", "Records in the spool by state", labels=["state"])
        for state, n in counts.items():
            records.add_metric([state], n)
        yield records
        yield GaugeMetricFamily("spool_oldest_pending_age_seconds", "Age of the oldest pending record's t",
                                value=0 if oldest is None else max(0, time.time() - oldest))
        yield GaugeMetricFamily("spool_size_bytes", "Spool file and WAL size", value=self.store.size_bytes())
        if meta.get("last_success_at"):
            yield GaugeMetricFamily("spool_last_ship_success_timestamp_seconds",
                                    "When StatHat last acknowledged a batch", value=meta["last_success_at"])
        appended = CounterMetricFamily("spool_appended", "Records taken into the spool by this process",
                                       labels=["source"])
        if self.relay is not None:
            with self.relay.stats.lock:
                for source, n in self.relay.stats.appended.items():
                    appended.add_metric([source], n)
                refused, invalid, busy = (self.relay.stats.refused, self.relay.stats.statsd_invalid,
                                          self.relay.stats.busy)
            yield CounterMetricFamily("spool_relay_refused", "Relay requests refused as StatHat would", value=refused)
            yield CounterMetricFamily("spool_statsd_invalid_lines", "StatsD lines ignored as invalid", value=invalid)
            yield CounterMetricFamily("spool_relay_busy", "Connections turned away at the connection limit",
                                      value=busy)
        files = CounterMetricFamily("spool_ingested_files", "Dropped files by outcome", labels=["outcome"])
        outcomes: dict[str, int] = {}
        ingested = 0
        for watcher in self.watchers():
            for outcome, n in list(watcher.outcomes.items()):
                outcomes[outcome] = outcomes.get(outcome, 0) + n
            ingested += watcher.ingested_records
        for outcome, n in outcomes.items():
            files.add_metric([outcome], n)
        appended.add_metric(["watch"], ingested)
        yield appended
        yield files
        if self.shipper is not None:
            stats = self.shipper.stats
            yield CounterMetricFamily("spool_shipped", "Records StatHat acknowledged (this process)", value=stats.sent)
            yield CounterMetricFamily("spool_dead", "Records StatHat refused (this process)", value=stats.dead)
            yield CounterMetricFamily("spool_ship_retries", "Send attempts retried", value=stats.retries)
