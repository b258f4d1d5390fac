"""What the agent exposes at /metrics (Prometheus, via prometheus_client) and /healthz.

The collector reads the spool through its own connection and the components through their snapshots
(plain dicts copied under each component's lock), never their live internals. /metrics and /healthz are
served on the relay's port and, with `[metrics] listen`, on a port of their own (MetricsServer).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spool.config import Config, MetricsSettings, check_bind
from spool.errors import ConfigError
from spool.lock import IDENTITY_HEADER, spool_identity
from spool.store import Store

Snapshot = Callable[[], dict[str, Any]]
MaybeSnapshot = Callable[[], "dict[str, Any] | None"]  # None: that component is not running now


class Metrics:
    """A prometheus_client collector over the spool (its own connection) and the components' snapshots."""

    def __init__(self, store: Store, *, shipper: MaybeSnapshot | None = None, relay: MaybeSnapshot | None = None,
                 watchers: Callable[[], list[dict[str, Any]]] = list, unhealthy_after: float | None = None,
                 clock: Callable[[], float] = time.time, config: Config | None = None):
        """`config`: the agent's (whether a key is configured, unhealthy_after); `unhealthy_after` overrides it."""
        from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

        self.store = store
        self.config = config or Config()
        if unhealthy_after is not None:
            self.config = self.config.replace(**{"metrics.unhealthy_after": unhealthy_after})
        self.shipper = shipper
        self.relay = relay
        self.watchers = watchers
        self.clock = clock
        self.started_at = clock()
        self._lock = threading.Lock()  # one connection, several HTTP threads
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(self)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def health(self, commit_error: str | None = None) -> dict[str, Any]:
        """The /healthz report: the verdict of spool.health (as `spool status` gives it), every current problem,
        and the backlog. `commit_error`: the relay's last commit failed (failing until one succeeds again).

        Degraded (as Fluent Bit's health thresholds do) when records are waiting and nothing was delivered for
        `unhealthy_after` seconds (counted from the agent's start if nothing was delivered since).
        """
        from spool.health import assess, read_facts

        with self._lock:
            facts = read_facts(self.store, self.config, now=self.clock(), started_at=self.started_at,
                               commit_error=commit_error)
        verdict = assess(facts)
        return {"status": verdict.verdict, "problems": verdict.texts, "health": verdict.to_dict(),
                "writable": facts.writable, "pending": facts.pending, "inflight": facts.inflight,
                "last_success_at": facts.last_success_at, "oldest_pending_age": facts.oldest_pending_age}

    def health_answer(self, commit_error: str | None = None) -> tuple[int, dict[str, Any]]:
        """The /healthz answer: 200 when the verdict is ok, else 503 with every reason."""
        report = self.health(commit_error)
        return (200 if report["status"] == "ok" else 503), report

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        from spool import __version__

        with self._lock:
            counts = self.store.counts()  # kept counts: fresh at every scrape
            oldest = self.store.oldest_pending_t()
            meta = self.store.meta()
            counters = self.store.counters()
        yield InfoMetricFamily("spool_build", "spool's version", value={"version": __version__})
        dropped = CounterMetricFamily("spool_dropped", "Records dropped or refused at a bound, by reason",
                                      labels=["reason"])
        for reason in ("dropped_oldest", "dropped_age", "refused_full", "restamp_refused"):
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
                                value=0 if oldest is None else max(0, self.clock() - oldest))
        yield GaugeMetricFamily("spool_size_bytes", "Spool file and WAL size", value=self.store.size_bytes())
        if meta.get("last_success_at"):
            yield GaugeMetricFamily("spool_last_ship_success_timestamp_seconds",
                                    "When StatHat last acknowledged a batch", value=meta["last_success_at"])
        appended = CounterMetricFamily("spool_appended", "Records taken into the spool by this process",
                                       labels=["source"])
        relay = self.relay() if self.relay is not None else None
        if relay is not None:
            for source, n in relay["appended"].items():
                appended.add_metric([source], n)
            yield CounterMetricFamily("spool_relay_refused", "Relay requests refused as StatHat would",
                                      value=relay["refused"])
            yield CounterMetricFamily("spool_statsd_invalid_lines", "StatsD lines ignored as invalid",
                                      value=relay["statsd_invalid"])
            statsd = CounterMetricFamily("spool_statsd_dropped", "Readable StatsD lines (or set members) dropped, "
                                         "by reason", labels=["reason"])
            for reason, n in sorted(relay["statsd_dropped"].items()):
                statsd.add_metric([reason], n)
            yield statsd
            yield CounterMetricFamily("spool_statsd_tags_dropped", "StatsD lines taken without their DogStatsD "
                                      "tags (relay.statsd_tags = \"drop\")", value=relay["statsd_tags_dropped"])
            yield CounterMetricFamily("spool_relay_busy", "Connections turned away at the connection limit",
                                      value=relay["busy"])
        files = CounterMetricFamily("spool_ingested_files", "Dropped files by outcome", labels=["outcome"])
        outcomes: dict[str, int] = {}
        ingested = 0
        for watcher in self.watchers():
            for outcome, n in watcher["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + n
            ingested += watcher["records"]
        for outcome, n in sorted(outcomes.items()):
            files.add_metric([outcome], n)
        appended.add_metric(["watch"], ingested)
        yield appended
        yield files
        ship = self.shipper() if self.shipper is not None else None
        if ship is not None:
            yield CounterMetricFamily("spool_shipped", "Records StatHat acknowledged (this process)",
                                      value=ship["sent"])
            yield CounterMetricFamily("spool_dead", "Records StatHat refused (this process)", value=ship["dead"])
            yield CounterMetricFamily("spool_ship_retries", "Send attempts retried", value=ship["retries"])
            requests = CounterMetricFamily("spool_ship_requests", "Requests to the receiver by outcome",
                                           labels=["outcome"])
            for outcome, n in sorted(ship["outcomes"].items()):
                requests.add_metric([outcome], n)
            yield requests
            yield GaugeMetricFamily("spool_ship_in_flight", "Requests under way now", value=ship["in_flight"])
            yield GaugeMetricFamily("spool_ship_concurrency_limit", "Requests the link is trusted with at once",
                                    value=ship["limit"])
            yield GaugeMetricFamily("spool_ship_paced_rate", "Requests a second the drain is paced at now (0: not "
                                    "paced)", value=ship["paced_rate"])
            why = GaugeMetricFamily("spool_ship_pacing", "Why the drain is paced where it is (the reason is 1)",
                                    labels=["reason"])
            why.add_metric([ship["pacing"]], 1)
            yield why
            histogram = HistogramMetricFamily("spool_ship_request_seconds", "Time to the receiver's answer")
            cumulative, buckets = 0, []
            for bound, n in zip((*ship["latency_bounds"], float("inf")), ship["latency_buckets"], strict=True):
                cumulative += n
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            histogram.add_metric([], buckets, sum_value=ship["latency_sum"])
            yield histogram


class MetricsServer:
    """/metrics and /healthz on a port of their own ([metrics] listen), for an agent running without the relay."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics):
        assert settings.listen is not None
        host, port = check_bind(settings.listen, "metrics.listen", 9464, settings.allow_remote)
        handler = type("Handler", (_MetricsHandler,), {"metrics": metrics,
                                                       "identity": spool_identity(metrics.store.path)})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        try:
            self.server = server_class((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"cannot listen on metrics.listen {settings.listen}: {exc.strerror}") from None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    def start(self) -> MetricsServer:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="spool-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(10)


class _MetricsHandler(BaseHTTPRequestHandler):
    metrics: Metrics
    identity: str | None  # the spool's (spool.lock.spool_identity), on every answer: doctor knows its own by it
    protocol_version = "HTTP/1.1"
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/metrics":
            self._send(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif self.path.split("?")[0] == "/healthz":
            code, body = self.metrics.health_answer()
            self._send(code, json.dumps(body).encode(), "application/json")
        else:
            self._send(404, b"404 page not found\n", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.identity:
            self.send_header(IDENTITY_HEADER, self.identity)
        self.end_headers()
        self.wfile.write(body)
