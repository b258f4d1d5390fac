#!/usr/bin/env python3
"""A fleet of spool agents comes back from a shared outage and drains into one receiver of fixed capacity.

    scripts/fleet.py                          # 200 agents, four scenarios (about 3 minutes on 2 cores)
    scripts/fleet.py --plot docs/fleet.png    # and draw requests/s and the fleet's backlog over time
    scripts/fleet.py --quick --json           # a tiny fleet in seconds (the test suite's smoke run)

Every agent is spool's real Shipper (`Shipper.run`, as `spool run` drives it) in a thread of this process,
with its own spool file holding its own backlog, as a box has after a site-wide power cut. All start at the
same instant, when power returns. The receiver runs in its own process, speaks StatHat's EZ JSON API, and
answers at most `capacity` requests a second (a token bucket); above that it answers 503 "Back-end server
is at capacity", as StatHat does. Time is scaled down with the receiver: a small capacity and small backlogs
make minutes of a real fleet's recovery into seconds here; the ratios are what carry over.

Reported per scenario: the receiver's peak load (requests/s offered and answered, in 1-second bins), the
requests refused with 503, and the time until the whole fleet is drained, beside the ideal time (every
request needed, sent at exactly the capacity). The plot needs matplotlib: `.venv/bin/pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
T0 = 1_700_000_000
OVERLOADED = b"Back-end server is at capacity"
BIN = 1.0  # seconds per sample of the receiver's load

if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():  # run inside the project's venv
    subprocess.run([str(ROOT / "scripts" / "bootstrap")], check=True)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])  # noqa: S606 - re-exec ourselves

sys.path.insert(0, str(ROOT))

from spool import Spool  # noqa: E402
from spool.config import Config  # noqa: E402
from spool.ship import Shipper  # noqa: E402
from spool.store import Store  # noqa: E402

# -- the receiver: one process, a fixed capacity ----------------------------------------------------------


class TokenBucket:
    """Allow `rate` requests a second on average, at most `burst` at once."""

    def __init__(self, rate: float, burst: float):
        self.rate, self.burst, self.tokens = rate, burst, burst
        self.at: float | None = None

    def take(self, now: float) -> bool:
        if self.at is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def serve(pipe: Any, capacity: float, burst: float, base: float, taken: Any, stop: Any) -> None:
    """Serve StatHat's EZ JSON API until `stop`; count per second what was offered, answered and refused."""
    bucket = TokenBucket(capacity, burst)
    bins: dict[int, list[int]] = {}  # second -> [offered, answered, refused, records taken]
    taken_at: list[tuple[float, int]] = []  # (when, records) for every batch taken
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            now = time.monotonic()
            with lock:
                counts = bins.setdefault(int((now - base) // BIN), [0, 0, 0, 0])
                counts[0] += 1
                accepted = bucket.take(now)
                if not accepted:
                    counts[2] += 1
            if not accepted:
                self.answer(503, OVERLOADED, "text/plain")
                return
            try:
                n = len(json.loads(body)["data"])
            except (ValueError, KeyError, TypeError):
                self.answer(200, b'{"status":500,"msg":"invalid json"}', "application/json")
                return
            with lock:
                counts[1] += 1
                counts[3] += n
                taken.value += n
                taken_at.append((now - base, n))
            self.answer(200, json.dumps({"status": 200, "msg": "ok", "multiple": n}).encode(), "application/json")

        def answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 4096  # a whole fleet connects at once: a short listen queue would drop SYNs

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    pipe.send(server.server_address[1])
    stop.wait()
    with lock:
        pipe.send({"bins": dict(bins), "taken_at": taken_at, "cpu": _cpu_seconds()})


class CapacityReceiver:
    """The receiver in its own process (so the fleet's threads do not share its interpreter)."""

    def __init__(self, capacity: float, burst: float, base: float):
        context = multiprocessing.get_context("fork")
        self.taken = context.Value("q", 0, lock=False)  # records taken: how the fleet knows it is drained
        self._stop = context.Event()
        self._pipe, child = context.Pipe()
        self._process = context.Process(target=serve, args=(child, capacity, burst, base, self.taken, self._stop),
                                        daemon=True)
        self._process.start()
        self.url = f"http://127.0.0.1:{self._pipe.recv()}"

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        tally = self._pipe.recv()
        self._process.terminate()  # its keep-alive handler threads would otherwise wait on idle sockets
        self._process.join(10)
        return tally


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- the fleet ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    agents: int
    backlog: int  # records per agent
    batch_size: int
    capacity: float  # requests/s the receiver answers
    burst: float  # requests it answers at once beyond the rate
    backoff_max: float
    limit: float  # seconds before a scenario is given up as not drained

    @property
    def requests(self) -> int:
        return self.agents * -(-self.backlog // self.batch_size)


@dataclass(frozen=True)
class Scenario:
    name: str
    max_requests_per_second: float
    reconnect_jitter: float
    max_in_flight: int


@dataclass
class Result:
    scenario: str
    settings: dict[str, float]
    agents: int
    records: int
    capacity: float
    ideal_seconds: float  # every request needed, at exactly the capacity
    drained_seconds: float | None  # None: not drained within the limit
    bulk_seconds: float | None  # until 99% of the records were taken (the last few wait out their back-off)
    peak_offered: int  # requests/s, 1-second bins
    peak_answered: int
    refused: int  # 503s
    requests: int  # every request the receiver saw
    fleet_cpu: float  # share of one core the fleet's process used (a busy one would slow the agents)
    receiver_cpu: float
    series: list[dict[str, float]] = field(default_factory=list)  # per second: offered, answered, refused, backlog


def scenarios(fleet: Fleet, jitter: float) -> list[Scenario]:
    """Neither pacing nor jitter; spool's defaults; pacing alone; both, tuned to the fleet and the receiver.

    Tuned: the start spread over the ideal drain time (every request at exactly the capacity), so agents arrive
    about as fast as the receiver can serve them, each paced at twice its share of the capacity so it can
    finish its own backlog within half that time.
    """
    share = fleet.capacity / fleet.agents
    spread = fleet.requests / fleet.capacity
    return [
        Scenario("no pacing, no jitter", 0, 0, 8),
        Scenario(f"spool's defaults: 20 req/s each, {jitter:g} s jitter", 20, jitter, 8),
        Scenario(f"paced at the fleet's share: {share:g} req/s each, no jitter", share, 0, 8),
        Scenario(f"tuned: {2 * share:g} req/s each, {spread:g} s jitter", 2 * share, spread, 8),
    ]


def make_spools(folder: Path, fleet: Fleet) -> list[Path]:
    """Give every agent its own spool holding the same-sized backlog (one spool made, then copied)."""
    template = folder / "template.db"
    with Spool(template, synchronous="normal") as sp:
        sp.add_many({"stat": f"fleet stat {j % 25}", "count": 1, "t": T0 + j} for j in range(fleet.backlog))
    paths = []
    for i in range(fleet.agents):
        path = folder / f"agent-{i:04d}.db"
        shutil.copyfile(template, path)
        paths.append(path)
    return paths


def run(fleet: Fleet, scenario: Scenario, seed: int) -> Result:
    """Start every agent at once against a fresh receiver; wait until the fleet is drained; tally the load."""
    random.seed(seed)  # tenacity's full jitter draws from the random module
    with tempfile.TemporaryDirectory(prefix="spool-fleet-") as scratch:
        paths = make_spools(Path(scratch), fleet)
        base = time.monotonic()
        receiver = CapacityReceiver(fleet.capacity, fleet.burst, base)
        shutdown = threading.Event()
        shippers: list[Shipper] = []
        failures: list[str] = []

        def agent(index: int, path: Path) -> None:
            config = Config().replace(**{
                "spool.path": path, "endpoint": receiver.url, "ezkey": "fleet-ezkey", "synchronous": "normal",
                "batch_size": fleet.batch_size, "backoff_max": fleet.backoff_max, "idle_poll": 1.0,
                "max_requests_per_second": scenario.max_requests_per_second,
                "reconnect_jitter": scenario.reconnect_jitter, "max_in_flight": scenario.max_in_flight})
            try:
                with Store(path, synchronous="normal") as store, Shipper(store, config, shutdown=shutdown) as shipper:
                    shipper.rng = random.Random(seed * 100_000 + index)
                    shippers.append(shipper)
                    shipper.run()
            except Exception as exc:  # reported, never silent: a failed agent leaves its backlog undrained
                failures.append(f"agent {index}: {exc!r}")

        total = fleet.agents * fleet.backlog
        threads = [threading.Thread(target=agent, args=(i, path), name=f"agent-{i}") for i, path in enumerate(paths)]
        cpu_before = _cpu_seconds()
        started = time.monotonic()
        for thread in threads:
            thread.start()
        drained = None
        while time.monotonic() - started < fleet.limit:
            if receiver.taken.value >= total:
                drained = time.monotonic() - started
                break
            time.sleep(0.05)
        wall = time.monotonic() - started
        fleet_cpu = (_cpu_seconds() - cpu_before) / wall
        shutdown.set()
        for shipper in list(shippers):
            shipper.stop()
        for thread in threads:
            thread.join(60)
        tally = receiver.stop()
        if failures:
            raise SystemExit(f"fleet: {len(failures)} agents failed, e.g. {failures[0]}")
        if drained is not None:
            left = 0
            for path in paths:
                with Store(path) as store:
                    left += sum(store.backlog())
            if left:
                raise SystemExit(f"fleet: the receiver took every record, yet {left} are pending in the spools")
    return tally_result(fleet, scenario, tally, started - base, drained, fleet_cpu, wall)


def tally_result(fleet: Fleet, scenario: Scenario, tally: dict[str, Any], offset: float, drained: float | None,
                 fleet_cpu: float, wall: float) -> Result:
    """Turn the receiver's per-second counts into the figures and a series from the instant the fleet started."""
    bins = {second: counts for second, counts in tally["bins"].items()}
    total = fleet.agents * fleet.backlog
    first, last = int(offset // BIN), int((offset + wall) // BIN)
    backlog, series = total, []
    for second in range(first, last + 1):
        offered, answered, refused, records = bins.get(second, [0, 0, 0, 0])
        backlog -= records
        series.append({"t": round(second * BIN - offset + BIN, 3), "offered": offered / BIN,
                       "answered": answered / BIN, "refused": refused / BIN, "backlog": max(0, backlog)})
    counts = list(bins.values()) or [[0, 0, 0, 0]]
    bulk, delivered = None, 0
    for when, records in sorted(tally["taken_at"]):
        delivered += records
        if delivered >= total * 0.99:
            bulk = when - offset
            break
    return Result(scenario=scenario.name, settings={"max_requests_per_second": scenario.max_requests_per_second,
                                                    "reconnect_jitter": scenario.reconnect_jitter,
                                                    "max_in_flight": scenario.max_in_flight},
                  agents=fleet.agents, records=total, capacity=fleet.capacity,
                  ideal_seconds=round(fleet.requests / fleet.capacity, 1),
                  drained_seconds=None if drained is None else round(drained, 1),
                  bulk_seconds=None if bulk is None else round(bulk, 1),
                  peak_offered=int(max(c[0] for c in counts) / BIN), peak_answered=int(max(c[1] for c in counts) / BIN),
                  refused=sum(c[2] for c in counts), requests=sum(c[0] for c in counts),
                  fleet_cpu=round(fleet_cpu, 2), receiver_cpu=round(tally["cpu"] / wall, 2), series=series)


# -- reporting ------------------------------------------------------------------------------------------


def plot(results: list[Result], fleet: Fleet, path: Path) -> None:
    """Draw requests/s offered (and the capacity) and the fleet's backlog over time, one line per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    colors = ["#d62728", "#ff7f0e", "#1f77b4", "#2ca02c"]
    figure, (load, backlog) = plt.subplots(2, 1, figsize=(10, 7.5), sharex=True, constrained_layout=True)
    for result, color in zip(results, colors, strict=False):
        t = [0.0] + [row["t"] for row in result.series]
        drained = "not drained" if result.drained_seconds is None else f"all in {result.drained_seconds:g} s"
        label = (f"{result.scenario}: peak {result.peak_offered} req/s, {result.refused:,} refused (503), "
                 f"99% in {result.bulk_seconds} s, {drained}")
        load.step(t, [0.0] + [row["offered"] for row in result.series], where="pre", color=color, label=label)
        backlog.plot(t, [result.records] + [row["backlog"] for row in result.series], color=color, label=label)
    load.axhline(fleet.capacity, color="black", linestyle="--", linewidth=1,
                 label=f"the receiver's capacity, {fleet.capacity:g} req/s: above it, 503")
    load.set_ylabel("requests/s offered to the receiver")
    load.set_title(f"{fleet.agents} agents back from a shared outage, {fleet.backlog:,} records each, "
                   f"into one receiver (ideal drain {fleet.requests / fleet.capacity:g} s)", fontsize=11)
    load.legend(loc="upper right", fontsize=8.5)
    load.set_ylim(bottom=0)
    backlog.set_ylabel("fleet backlog (records pending)")
    backlog.set_xlabel("seconds since power returned")
    backlog.set_ylim(bottom=0)
    backlog.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
    for axes in (load, backlog):
        axes.grid(True, alpha=0.3)
    backlog.set_xlim(left=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_result(result: Result) -> str:
    drained = "not drained" if result.drained_seconds is None else f"{result.drained_seconds:>5.1f} s"
    return (f"{result.scenario:<52} peak offered {result.peak_offered:>4} req/s, answered {result.peak_answered:>4} "
            f"req/s; refused (503) {result.refused:>5,} of {result.requests:>5,}; 99% in {result.bulk_seconds} s, "
            f"all in {drained} (ideal {result.ideal_seconds:g} s); CPU fleet {result.fleet_cpu:.0%}, "
            f"receiver {result.receiver_cpu:.0%}")


@contextlib.contextmanager
def quiet_spool() -> Iterator[None]:
    """The fleet logs every 503 of every agent: keep only errors."""
    logger = logging.getLogger("spool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny fleet in seconds: a smoke run, not a measurement")
    parser.add_argument("--agents", type=int, help="agents in the fleet (default 200; --quick: 20)")
    parser.add_argument("--capacity", type=float, help="requests/s the receiver answers (default 100; --quick: 50)")
    parser.add_argument("--only", help="comma-separated scenario numbers to run (1 to 4)")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="draw the load and the backlog over time to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seed", type=int, default=1, help="seeds the agents' jitter and back-off (default 1)")
    args = parser.parse_args()
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fleet: error: --plot needs matplotlib: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
            return 2
    if args.quick:
        fleet = Fleet(agents=args.agents or 20, backlog=200, batch_size=100, capacity=args.capacity or 50, burst=5,
                      backoff_max=1.0, limit=60)
        jitter = 0.5
    else:
        fleet = Fleet(agents=args.agents or 200, backlog=1000, batch_size=100, capacity=args.capacity or 100,
                      burst=10, backoff_max=60.0, limit=240)
        jitter = 10.0
    if fleet.agents < 1 or fleet.capacity <= 0:
        parser.error("--agents and --capacity must be positive")
    chosen = scenarios(fleet, jitter)
    if args.only:
        numbers = [n.strip() for n in args.only.split(",")]
        if not all(n.isdigit() and 1 <= int(n) <= len(chosen) for n in numbers):
            parser.error(f"--only takes scenario numbers from 1 to {len(chosen)}")
        chosen = [chosen[int(n) - 1] for n in numbers]
    results = []
    with quiet_spool():
        for scenario in chosen:
            result = run(fleet, scenario, args.seed)
            results.append(result)
            if not args.json:
                print(format_result(result), flush=True)
    if args.plot:
        plot(results, fleet, args.plot)
    if args.json:
        print(json.dumps({"quick": args.quick, "fleet": asdict(fleet), "results": [asdict(r) for r in results]},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
