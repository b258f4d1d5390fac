#!/usr/bin/env python3
"""A fleet of spool agents comes back from a shared outage and drains into one receiver of fixed capacity.

    scripts/fleet.py                          # 200 agents, four scenarios (a few minutes on 2 cores)
    scripts/fleet.py --plot docs/fleet.png    # and draw requests/s and the fleet's backlog over time
    scripts/fleet.py --sweep                  # spool's defaults over fleet sizes, capacities and backlogs: a table
    SPOOL_LONG=1 scripts/fleet.py --sweep     # the whole sweep (backlogs of 10,000 records too: hours)
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

"spool's defaults" changes no shipping setting: the pacing settings are spool.config's declared defaults. The
fleet itself sets what scales it down (100 records a request, so that 1,000 records make 10 requests) and what
only speeds the simulation up (synchronous = "normal"). The sweep checks three figures at every point: refused
at most 10 % of requests, the fleet drained within 1.3 times the ideal time plus 3 s, a peak offered load of at
most 1.5 times the capacity.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
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
from spool.ship import AdaptivePace, Shipper, spread_limit  # noqa: E402
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
    limit: float  # seconds before a scenario is given up as not drained
    scale: dict[str, Any] = field(default_factory=dict)  # settings the scaled-down fleet changes (quick: back-off)

    @property
    def requests(self) -> int:
        return self.agents * -(-self.backlog // self.batch_size)


@dataclass(frozen=True)
class Scenario:
    name: str
    settings: dict[str, Any] = field(default_factory=dict)  # shipping settings changed from spool's defaults


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
    figures: dict[str, bool]  # refused <= 10 %, drained within 1.3 x ideal + 3 s, peak offered <= 1.5 x capacity
    fleet_cpu: float  # share of one core the fleet's process used (a busy one would slow the agents)
    receiver_cpu: float
    series: list[dict[str, float]] = field(default_factory=list)  # per second: offered, answered, refused, backlog


def scenarios(fleet: Fleet) -> list[Scenario]:
    """Neither pacing nor jitter; spool's defaults; the last release's fixed pacing; fixed pacing hand-tuned.

    Hand-tuned: the start spread over the ideal drain time (every request at exactly the capacity), so agents
    arrive about as fast as the receiver can serve them, each paced at twice its share of the capacity so it
    can finish its own backlog within half that time (what the README asked of operators before pacing adapted).
    """
    share = fleet.capacity / fleet.agents
    spread = fleet.requests / fleet.capacity
    ship = Config().ship  # the declared defaults, named and never repeated here
    return [
        Scenario("no pacing, no jitter", {"max_requests_per_second": 0, "reconnect_jitter": 0}),
        Scenario(f"spool's defaults: adaptive, at most {ship.max_requests_per_second:g} req/s"),
        Scenario(f"fixed pacing (the last release): {ship.max_requests_per_second:g} req/s, "
                 f"{ship.reconnect_jitter:g} s jitter", {"pacing": "fixed"}),
        Scenario(f"hand-tuned fixed pacing: {2 * share:g} req/s, {spread:g} s jitter",
                 {"pacing": "fixed", "max_requests_per_second": 2 * share, "reconnect_jitter": spread}),
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


AGENTS_PER_PROCESS = 25  # more threads in one interpreter queue up for its lock (every row SQLite returns takes it)
MAX_PROCESSES = 16


def agents_process(slice_: list[tuple[int, Path]], settings: dict[str, Any], seed: int, stop: Any,
                   reports: Any) -> None:
    """Run some of the fleet's agents, each spool's Shipper in a thread, until `stop`; report failures and CPU."""
    logging.getLogger("spool").setLevel(logging.ERROR)
    shutdown = threading.Event()
    shippers: list[Shipper] = []
    failures: list[str] = []

    def agent(index: int, path: Path) -> None:
        config = Config().replace(**{"spool.path": path, **settings})
        try:
            with Store(path, synchronous="normal") as store, Shipper(store, config, shutdown=shutdown) as shipper:
                shipper.rng.seed(seed * 100_000 + index)  # its pace draws from it too
                shippers.append(shipper)
                shipper.run()
        except Exception as exc:  # reported, never silent: a failed agent leaves its backlog undrained
            failures.append(f"agent {index}: {exc!r}")

    threads = [threading.Thread(target=agent, args=(i, path), name=f"agent-{i}") for i, path in slice_]
    for thread in threads:
        thread.start()
    stop.wait()
    shutdown.set()
    for shipper in list(shippers):
        shipper.stop()
    for thread in threads:
        thread.join(60)
    reports.put((failures, _cpu_seconds()))


def run(fleet: Fleet, scenario: Scenario, seed: int) -> Result:
    """Start every agent at once against a fresh receiver; wait until the fleet is drained; tally the load.

    The agents run in several processes (AGENTS_PER_PROCESS threads each), started together and given the same
    instant to begin: hundreds of shipper threads in one interpreter spend the machine's CPU queueing for its
    lock instead of sending (measured: 1.5 cores busy, the receiver offered less than its capacity)."""
    random.seed(seed)  # tenacity's full jitter draws from the random module
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="spool-fleet-") as scratch:
        paths = make_spools(Path(scratch), fleet)
        base = time.monotonic()
        receiver = CapacityReceiver(fleet.capacity, fleet.burst, base)
        settings = {"endpoint": receiver.url, "ezkey": "fleet-ezkey", "synchronous": "normal",
                    "batch_size": fleet.batch_size, "idle_poll": 1.0, **fleet.scale, **scenario.settings}
        count = min(MAX_PROCESSES, max(1, -(-fleet.agents // AGENTS_PER_PROCESS)))
        agents = list(enumerate(paths))
        stop, reports = context.Event(), context.Queue()
        processes = [context.Process(target=agents_process, args=(agents[k::count], settings, seed, stop, reports),
                                     daemon=True) for k in range(count)]
        total = fleet.agents * fleet.backlog
        started = time.monotonic()
        for process in processes:
            process.start()
        drained = None
        while time.monotonic() - started < fleet.limit:
            if receiver.taken.value >= total:
                drained = time.monotonic() - started
                break
            time.sleep(0.05)
        wall = time.monotonic() - started
        stop.set()
        failures: list[str] = []
        cpu = 0.0
        for _ in processes:
            failed, used = reports.get(timeout=120)
            failures += failed
            cpu += used
        for process in processes:
            process.join(30)
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
    return tally_result(fleet, scenario, tally, started - base, drained, cpu / wall, wall)


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
    settings = {**{name: getattr(Config().ship, name) for name in ("pacing", "max_requests_per_second",
                                                                  "reconnect_jitter", "max_in_flight")},
                **fleet.scale, **scenario.settings}
    ideal = fleet.requests / fleet.capacity
    peak_offered = int(max(c[0] for c in counts) / BIN)
    refused, requests = sum(c[2] for c in counts), sum(c[0] for c in counts)
    figures = {"refused": refused <= 0.10 * requests,
               "drained": drained is not None and drained <= 1.3 * ideal + 3,
               "peak": peak_offered <= 1.5 * fleet.capacity}
    return Result(scenario=scenario.name, settings=settings, agents=fleet.agents, records=total,
                  capacity=fleet.capacity, ideal_seconds=round(ideal, 2),
                  drained_seconds=None if drained is None else round(drained, 1),
                  bulk_seconds=None if bulk is None else round(bulk, 1),
                  peak_offered=peak_offered, peak_answered=int(max(c[1] for c in counts) / BIN),
                  refused=refused, requests=requests, figures=figures,
                  fleet_cpu=round(fleet_cpu, 2), receiver_cpu=round(tally["cpu"] / wall, 2), series=series)


# -- the model: the same pacing law, every agent and the receiver as events ----------------------------------


class _ModelClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def model_run(fleet: Fleet, seed: int, latency: float = 0.003) -> Result:
    """The fleet as events, in seconds of CPU: every agent is spool's own pace (`AdaptivePace`, the law `spool
    run` uses, on a clock the model moves) and spread (`spread_limit`), one request in flight, answered after
    `latency`; the receiver is the same token bucket. What it leaves out: the concurrency window, the back-off
    of failures that are not overload, HTTP and the spool. It runs the whole sweep at full size in seconds, and
    agrees with the real fleet within a few percent where both are run (`--sweep` beside `--sweep --model`)."""
    rng = random.Random(seed)
    clock = _ModelClock()
    ship = Config().replace(batch_size=fleet.batch_size).ship  # as the real agents are set (`run`)
    paces = [AdaptivePace(ship.max_requests_per_second, clock, random.Random(seed * 100_000 + i))
             for i in range(fleet.agents)]
    left = [-(-fleet.backlog // fleet.batch_size)] * fleet.agents
    events: list[tuple[float, int, int, float]] = []  # (when, 0: ready to send / 1: taken / 2: refused, agent, sent)
    for agent in range(fleet.agents):
        events.append((rng.uniform(0, spread_limit(fleet.backlog, ship)), 0, agent, 0.0))
    heapq.heapify(events)
    bucket = TokenBucket(fleet.capacity, fleet.burst)
    bins: dict[int, list[int]] = {}
    busy = [False] * fleet.agents
    drained = 0.0
    taken_at: list[tuple[float, int]] = []
    while events:
        now, kind, agent, sent_at = heapq.heappop(events)
        clock.now = now
        pace = paces[agent]
        if kind == 0:
            if busy[agent] or not left[agent]:
                continue
            if pace.ready_at() > now + 1e-12:
                heapq.heappush(events, (pace.ready_at(), 0, agent, 0.0))
                continue
            pace.sent()
            busy[agent] = True
            counts = bins.setdefault(int(now // BIN), [0, 0, 0, 0])
            counts[0] += 1
            if bucket.take(now):
                counts[1] += 1
                heapq.heappush(events, (now + latency, 1, agent, now))
            else:
                counts[2] += 1
                heapq.heappush(events, (now + latency, 2, agent, now))
            continue
        busy[agent] = False
        if kind == 1:
            left[agent] -= 1
            taken_at.append((now, fleet.batch_size))
            bins[int(sent_at // BIN)][3] += fleet.batch_size
            pace.answered()
            if not left[agent]:
                drained = max(drained, now)
                continue
        else:
            pace.overloaded("503", sent_at=sent_at)
        heapq.heappush(events, (now, 0, agent, 0.0))
    tally = {"bins": bins, "taken_at": taken_at, "cpu": 0.0}
    return tally_result(fleet, scenarios(fleet)[1], tally, 0.0, drained, 0.0, max(drained, 1e-9))


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


SWEEP_AGENTS = (50, 200, 1000)
SWEEP_CAPACITY = (50.0, 100.0, 400.0)
SWEEP_BACKLOG = (1000, 10_000)  # records per agent
SWEEP_SCALE = 5  # the default sweep runs a fifth of the agents against a fifth of the capacity


@dataclass(frozen=True)
class Point:
    agents: int  # the point of the sweep this run stands for
    capacity: float
    fleet: Fleet  # what runs: the same share of the capacity per agent, the same ideal time


def sweep_points(long: bool, quick: bool = False) -> list[Point]:
    """The sweep: N agents x capacity C x backlog. The default runs each point scaled down (N / 5 agents against
    C / 5 req/s: each agent's share of the capacity, the ideal time and the start-up's load against the capacity
    are the point's; the receiver still lets 10 requests through at once) with backlogs of 1,000 records: 1,000
    threads of one process on 2 cores are the simulation's limit, not spool's, and the backlogs of 10,000 add
    hours. SPOOL_LONG=1 runs the whole sweep as named: every point at full size, both backlogs. `quick`: two tiny
    points, a smoke run."""
    if quick:
        return [Point(10, 20.0, Fleet(agents=10, backlog=200, batch_size=100, capacity=20.0, burst=5, limit=60)),
                Point(10, 80.0, Fleet(agents=10, backlog=200, batch_size=100, capacity=80.0, burst=5, limit=60))]
    scale, backlogs = (1, SWEEP_BACKLOG) if long else (SWEEP_SCALE, SWEEP_BACKLOG[:1])
    points = []
    for backlog in backlogs:
        for agents in SWEEP_AGENTS:
            for capacity in SWEEP_CAPACITY:
                ideal = agents * -(-backlog // 100) / capacity
                points.append(Point(agents, capacity, Fleet(
                    agents=agents // scale, backlog=backlog, batch_size=100, capacity=capacity / scale, burst=10,
                    limit=max(120.0, 4 * ideal + 30))))
    return points


def format_sweep_row(result: Result, point: Point) -> str:
    fleet = point.fleet
    drained = "not drained" if result.drained_seconds is None else (
        f"{result.drained_seconds:.1f} s ({result.drained_seconds / result.ideal_seconds:.1f}x)")
    marks = ", ".join(name if met else f"{name} MISSED" for name, met in result.figures.items())
    cpu = "model" if result.fleet_cpu == 0 and result.receiver_cpu == 0 else f"{result.fleet_cpu:.0%}"
    run_as = "" if (fleet.agents, fleet.capacity) == (point.agents, point.capacity) else (
        f" ({fleet.agents} x {fleet.capacity:g})")
    return (f"| {point.agents:,} x {point.capacity:g}{run_as} | {fleet.backlog:,} | {result.ideal_seconds:g} s | "
            f"{drained} | {result.refused:,} of {result.requests:,} ({result.refused / result.requests:.1%}) | "
            f"{result.peak_offered / fleet.capacity:.1f}x | {marks} | {cpu} |")


SWEEP_HEADER = ("| agents x capacity (req/s) | records each | ideal | all delivered | refused (503) | peak offered "
                "(x capacity) | figures | fleet CPU |\n|---|---|---|---|---|---|---|---|")


def run_sweep(args: argparse.Namespace, scenario: int) -> int:
    """One scenario (spool's defaults unless told) at every point of the sweep, a table row each as it ends."""
    long = os.environ.get("SPOOL_LONG") == "1" or args.model  # the model runs every point at full size
    points = sweep_points(long, args.quick)
    chosen = scenarios(points[0].fleet)[scenario - 1]
    if not args.json:
        extent = ("a smoke run" if args.quick else "the model, the whole sweep at full size" if args.model else
                  "the whole sweep, at full size" if long else
                  f"scaled down: N / {SWEEP_SCALE} agents against C / {SWEEP_SCALE} req/s, backlogs of 1,000 "
                  "records; SPOOL_LONG=1 for the whole sweep")
        print(f"{chosen.name.split(':')[0]} over {len(points)} fleets ({extent}); figures: refused <= 10 %, "
              "drained within 1.3 x ideal + 3 s, peak offered <= 1.5 x capacity", flush=True)
        print(SWEEP_HEADER, flush=True)
    rows = []
    with quiet_spool():
        for point in points:
            result = (model_run(point.fleet, args.seed) if args.model else
                      run(point.fleet, scenarios(point.fleet)[scenario - 1], args.seed))
            result.series = []
            rows.append({"agents": point.agents, "capacity": point.capacity, "fleet": asdict(point.fleet),
                         "result": asdict(result)})
            if not args.json:
                print(format_sweep_row(result, point), flush=True)
    if args.json:
        print(json.dumps({"long": long, "quick": args.quick, "model": args.model, "scenario": chosen.name,
                          "points": rows}, indent=2))
    else:
        met = sum(all(row["result"]["figures"].values()) for row in rows)
        print(f"every figure met at {met} of {len(rows)} points", flush=True)
    return 0


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
    parser.add_argument("--sweep", action="store_true", help="spool's defaults (or the one scenario --only names) "
                        "over fleet sizes, capacities and backlogs, as a table (SPOOL_LONG=1: the whole sweep)")
    parser.add_argument("--model", action="store_true", help="with --sweep: run spool's defaults through the event "
                        "model instead of real shippers (every point at full size, in seconds)")
    args = parser.parse_args()
    if args.model and not args.sweep:
        parser.error("--model goes with --sweep")
    if args.model and args.only and args.only != "2":
        parser.error("--model runs spool's defaults (scenario 2) only")
    if args.sweep:
        if args.only and not (args.only.isdigit() and 1 <= int(args.only) <= 4):
            parser.error("--sweep runs one scenario: --only takes one number from 1 to 4")
        return run_sweep(args, int(args.only or 2))
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("fleet: error: --plot needs matplotlib: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
            return 2
    if args.quick:  # shorter waits: a smoke run
        fleet = Fleet(agents=args.agents or 20, backlog=200, batch_size=100, capacity=args.capacity or 50, burst=5,
                      limit=60, scale={"backoff_max": 1.0, "reconnect_jitter": 0.5})
    else:
        fleet = Fleet(agents=args.agents or 200, backlog=1000, batch_size=100, capacity=args.capacity or 100,
                      burst=10, limit=240)
    if fleet.agents < 1 or fleet.capacity <= 0:
        parser.error("--agents and --capacity must be positive")
    chosen = scenarios(fleet)
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
