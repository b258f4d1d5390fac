"""`scripts/bench.py --scale`: what the operator's commands, a bounded append, the agent's start, its endpoints
and its drain cost as the backlog grows, on one spool per size.

    scripts/bench.py --scale                      # 0, 100k, 1M and 5M pending records
    SPOOL_LONG=1 scripts/bench.py --scale         # also 20M and 50M (a week offline at 100 stats/s is 60M)
    scripts/bench.py --scale --sizes 0,1000000 --json

Records are realistic: EZ counts of 1,000 stat names, without a key of their own (the agent ships them with the
configured one), their explicit t spread evenly over a week; default settings but for pacing and start-up
jitter (both off, so the figures are the spool's). Each size's spool is built once through the API
(Spool.add_many in chunks of 100,000: 1M records in 3 s on the 2-core machine alone, 9 s with other work on it;
a build grows in proportion, so 50M takes 3 to 8 minutes) and kept in .bench-cache/scale-N.db (--cache DIR
elsewhere); a rerun uses it, brought to this checkout's schema by opening it once. Every measurement runs on a
fresh copy of it. Only the public API (Spool; compaction through the entry point housekeeping calls) and the CLI
(`python -m spool`) are used, so the table is made the same way on any schema.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _benchlib import (
    ROOT,
    T0,
    WEEK,
    ReceiverProcess,
    cli_env,
    drop_cache,
    fill,
    free_port,
    median_of,
    over_a_week,
    peak_rss_mib,
    remove_spool,
    run_cli,
    spool_command,
    spool_files,
    warm_cache,
)

SHORT = (0, 100_000, 1_000_000, 5_000_000)
LONG = (*SHORT, 20_000_000, 50_000_000)
RSS_UP_TO = 5_000_000  # the short form measures the drain's peak RSS up to this size; SPOOL_LONG=1 at every size
NAMES = 1000
RECIPE = 1  # the records' recipe: a cached spool of another recipe is built again
EXPORTED = 100_000  # records `export --until T` selects
PRODUCER_RATE = 100.0  # appends per second during the drain
BUCKET = 60  # compaction's bucket, seconds
TEST_EZKEY = "bench-ezkey"


@dataclass(frozen=True)
class Row:
    key: str
    operation: str
    unit: str


ROWS = (
    Row("status", "`spool status` (process)", "s"),
    Row("doctor", "`spool doctor` (process)", "s"),
    Row("dead_list", "`spool dead list`, no dead letters (process)", "s"),
    Row("export", f"`spool export --state pending --until T -`, the oldest {EXPORTED // 1000}k records (process)", "s"),
    Row("append_bounded", "one append with `max_pending` set, not reached (API, `Spool.count`)", "ms"),
    Row("add_bounded", "`spool add` with `max_pending` set (process)", "s"),
    Row("start_warm", "agent start → first batch shipped (`spool run`)", "s"),
    Row("start_cold", "agent start → first batch shipped, cold cache", "s"),
    Row("bytes_per_record", "bytes on disk per pending record", "B"),
    Row("compaction_tx", f"compaction ({BUCKET} s buckets): longest write transaction", "ms"),
    Row("healthz", "`/healthz` per probe", "ms"),
    Row("metrics_first", "`/metrics` first scrape", "s"),
    Row("drain_rate", f"drain rate while one producer appends {PRODUCER_RATE:g}/s, `max_pending` set", "records/s"),
    Row("peak_rss", "peak RSS of the agent draining the backlog", "MiB"),
)


@dataclass(frozen=True)
class Effort:
    """How hard each figure is measured: runs per process figure (fewer once `budget` seconds are spent)."""

    runs: int = 5
    budget: float = 60.0
    appends: int = 200
    probes: int = 20
    drain_window: float = 10.0  # seconds of draining the rate is taken over (less if the backlog runs out)
    compaction_cap: float = 60.0  # a compaction pass is stopped after this (its longest transaction so far)
    timeout: float = 1800.0  # a start, a drain: given up after this


QUICK = Effort(runs=1, budget=5.0, appends=5, probes=3, drain_window=1.0, compaction_cap=2.0, timeout=120.0)


def parse_sizes(text: str) -> tuple[int, ...]:
    """'0,100k,1M,5000000' -> (0, 100000, 1000000, 5000000)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        digits = part[:-1] if scale != 1 else part
        if not digits.isdigit():
            raise ValueError(f"not a size: {part!r} (a whole number of records, optionally with k or M)")
        sizes.append(int(digits) * scale)
    return tuple(sorted(set(sizes)))


def label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


# -- the spools ----------------------------------------------------------------------------------------------


def cached_spool(cache: Path, n: int) -> tuple[Path, dict[str, Any]]:
    """The spool of n pending records, built once and kept in `cache`; and how long its build took."""
    from spool import Spool

    cache.mkdir(parents=True, exist_ok=True)
    path, meta = cache / f"scale-{n}.db", cache / f"scale-{n}.json"
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("recipe") == RECIPE and info.get("n") == n:
            try:
                Spool(path, create=False).close()  # brought to this checkout's schema, once, not in a timing
            except Exception as exc:  # a newer schema (another branch's): built again
                print(f"# {path.name} cannot be opened here ({exc}): building it again", file=sys.stderr)
            else:
                return path, {**info, "cached": True}
    partial = cache / f"scale-{n}.partial.db"
    remove_spool(partial)
    started = time.perf_counter()
    fill(partial, n, names=NAMES, t=over_a_week(n))
    seconds = time.perf_counter() - started
    remove_spool(path)
    for file in spool_files(partial):  # closed: the WAL was checkpointed into the file and removed
        os.replace(file, f"{path}{file.name[len(partial.name):]}")
    for leftover in cache.glob(f"{partial.name}*"):  # what the spool keeps beside its file (-shm, its owners)
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    info = {"recipe": RECIPE, "n": n, "build_seconds": round(seconds, 1)}
    meta.write_text(json.dumps(info))
    print(f"# built {label(n)} pending records in {seconds:.1f} s", file=sys.stderr, flush=True)
    return path, {**info, "cached": False}


@contextmanager
def copy_of(source: Path, folder: Path) -> Iterator[Path]:
    """A fresh copy of a cached spool (the measurements change it), in the page cache."""
    target = folder / "s.db"
    remove_spool(target)
    for file in spool_files(source):
        shutil.copyfile(file, f"{target}{file.name[len(source.name):]}")
    warm_cache(target)
    try:
        yield target
    finally:
        remove_spool(target)


class Setup:
    """The config files and environments of one size's measurements: the receiver's endpoint, no pacing, no
    start-up jitter, otherwise default settings; `bounded` adds a max_pending far above the backlog."""

    def __init__(self, folder: Path, n: int, url: str):
        self.folder = folder
        self.bound = 10 * n + 1_000_000
        ship = f'[ship]\nendpoint = "{url}"\nmax_requests_per_second = 0\nreconnect_jitter = 0\n'
        self.plain = folder / "plain.toml"
        self.plain.write_text(ship)
        self.bounded = folder / "bounded.toml"
        self.bounded.write_text(f"[spool]\nmax_pending = {self.bound}\n{ship}")
        self.port = free_port()
        self.relay = folder / "relay.toml"
        self.relay.write_text(f'{ship}[relay]\nenabled = true\nlisten = "127.0.0.1:{self.port}"\n')

    def env(self, db: Path, config: Path, *, key: bool = True) -> dict[str, str]:
        return cli_env(db, config, **({"SPOOL_EZKEY": TEST_EZKEY} if key else {}))


class Agent:
    """`spool run` as a process, its log in a file (shown if it fails)."""

    def __init__(self, env: dict[str, str], folder: Path):
        self.log = folder / "agent.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(spool_command("run"), env=env, stdout=log, stderr=log, cwd=folder)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"spool run exited {self.process.returncode}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def wait_for(condition: Callable[[], bool], agent: Agent, timeout: float, what: str, pause: float = 0.001) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        agent.check()
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: nothing after {timeout:g} s")
        time.sleep(pause)


# -- the figures ---------------------------------------------------------------------------------------------


def commands(db: Path, setup: Setup, n: int, effort: Effort) -> dict[str, float]:
    """The operator's commands and the bounded appends, warm cache."""
    from spool import Spool

    plain, bounded = setup.env(db, setup.plain), setup.env(db, setup.bounded)
    verdicts = (0, 1, 2)  # status exits with its health verdict: a backlog nothing delivered yet is degraded
    run_cli(db, "status", env=plain, ok=verdicts)  # untimed: the first open after the copy
    until = over_a_week(n)(EXPORTED - 1) if n > EXPORTED else T0 + WEEK
    figures = {
        "status": median_of(lambda: run_cli(db, "status", env=plain, ok=verdicts), effort.runs, effort.budget),
        "doctor": median_of(lambda: run_cli(db, "doctor", env=plain, ok=(0, 1)), effort.runs, effort.budget),
        "dead_list": median_of(lambda: run_cli(db, "dead", "list", env=plain), effort.runs, effort.budget),
        "export": median_of(lambda: run_cli(db, "export", "--state", "pending", "--until", str(until), "-",
                                            env=plain), effort.runs, effort.budget),
    }
    with Spool(db, max_pending=setup.bound) as sp:
        figures["append_bounded"] = 1000 * median_of(lambda: sp.count("bench append", 1, t=T0 + WEEK),
                                                     effort.appends, effort.budget / 4)
    figures["add_bounded"] = median_of(lambda: run_cli(db, "add", "bench add", "--count", "1", env=bounded),
                                       effort.runs, effort.budget)
    return figures


def compaction(db: Path, effort: Effort) -> tuple[float, dict[str, Any]]:
    """The longest write transaction of a compaction pass (milliseconds), each timed between two calls of the
    pass's `between` callback (called after every committed transaction); the pass stops at the cap."""
    from spool import Spool

    times: list[float] = []
    with Spool(db) as sp:
        started = time.perf_counter()
        last, stopped = [started], [False]

        def between() -> bool:
            now = time.perf_counter()
            times.append(now - last[0])
            last[0], stopped[0] = now, now - started >= effort.compaction_cap
            return not stopped[0]

        merged = sp.store.compact_counts(bucket=BUCKET, between=between)
        finished = not stopped[0]
        if finished:  # the last transaction ends the pass without a call of `between`
            times.append(time.perf_counter() - last[0])
    times.sort()
    return 1000 * times[-1], {"transactions": len(times), "median_ms": round(1000 * statistics.median(times), 2),
                              "merged": merged, "whole_pass_s": round(time.perf_counter() - started, 2),
                              "finished": finished}


def starts(db: Path, setup: Setup, receiver: Any, n: int, effort: Effort) -> dict[str, float]:
    """From spawning `spool run` to the receiver taking its first batch, warm and cold (the spool file and its WAL
    evicted from the page cache), alternately; every start follows a clean stop (SIGTERM) of the one before."""
    from spool import Spool

    env = setup.env(db, setup.plain)

    def start(cold: bool) -> float:
        with Spool(db) as sp:  # something to ship where earlier starts shipped it all (a small backlog)
            sp.count("bench start", 1)
        receiver.taken()  # forget what the last start shipped
        drop_cache(db) if cold else warm_cache(db)
        started = time.perf_counter()
        agent = Agent(env, setup.folder)
        try:
            wait_for(lambda: receiver.taken() > 0, agent, effort.timeout, "spool run: first batch")
            return time.perf_counter() - started
        finally:
            agent.stop()

    start(False)  # untimed: the first start of an agent on this spool follows no clean stop
    warm: list[float] = []
    cold: list[float] = []
    spent = time.perf_counter()
    for _ in range(effort.runs):
        warm.append(start(False))
        cold.append(start(True))
        if time.perf_counter() - spent > 2 * effort.budget:
            break
    return {"start_warm": statistics.median(warm), "start_cold": statistics.median(cold)}


def endpoints(db: Path, setup: Setup, effort: Effort) -> dict[str, float]:
    """/healthz and the first /metrics scrape of a `spool run` with the relay on a free loopback port. The agent
    has no key, so it ships nothing: the backlog stays what it is while it is probed."""
    agent = Agent(setup.env(db, setup.relay, key=False), setup.folder)
    base = f"http://127.0.0.1:{setup.port}"

    def get(path: str) -> bytes:
        with urllib.request.urlopen(base + path, timeout=600) as answer:  # noqa: S310 - loopback, our URL
            return bytes(answer.read())

    def answers() -> bool:
        try:
            get("/")
            return True
        except OSError:
            return False

    try:
        wait_for(answers, agent, effort.timeout, "the relay", pause=0.01)
        started = time.perf_counter()
        assert b"spool_" in get("/metrics")
        first_scrape = time.perf_counter() - started

        def healthz() -> None:
            try:
                get("/healthz")
            except urllib.error.HTTPError as answer:  # 503: degraded is an answer too
                answer.read()

        probe = median_of(healthz, effort.probes, effort.budget / 4)
    finally:
        agent.stop()
    return {"healthz": 1000 * probe, "metrics_first": first_scrape}


PRODUCER = """
import signal, sys, time
from spool import Spool
db, bound, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
appended, longest = 0, 0.0
with Spool(db, max_pending=bound) as sp:
    print("ready", flush=True)
    due = time.monotonic()
    while not stop:
        began = time.monotonic()
        sp.count("bench producer", 1)
        longest = max(longest, time.monotonic() - began)
        appended += 1
        due = max(due + 1 / rate, time.monotonic())  # an app waits for a slow append; it does not catch up after
        time.sleep(max(0.0, due - time.monotonic()))
print(appended, longest, flush=True)
"""


def drain(db: Path, setup: Setup, receiver: Any, n: int, effort: Effort, rss: bool) -> tuple[dict[str, float | None],
                                                                                           dict[str, Any]]:
    """The agent (`spool run`, max_pending set) draining the backlog while a producer process appends 100
    records/s through the API with the same bound: records/s over the first seconds of the drain; with `rss`, the
    agent's peak RSS once the whole backlog was shipped."""
    producer = subprocess.Popen([sys.executable, "-c", PRODUCER, str(db), str(setup.bound), str(PRODUCER_RATE)],
                                stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert producer.stdout is not None
    producer.stdout.readline()
    receiver.taken()
    agent = Agent(setup.env(db, setup.bounded), setup.folder)
    started = time.perf_counter()
    samples = [(started, 0)]  # (when, records taken so far)
    rate: float | None = None
    peak = None
    try:
        deadline = time.monotonic() + effort.timeout
        while True:
            agent.check()
            if time.monotonic() > deadline:  # the peak so far, if the rate was measured; said in the details
                if rate is None and n:
                    raise RuntimeError(f"the drain of {n:,} records shipped nothing in {effort.timeout:g} s")
                break
            time.sleep(0.02)
            samples.append((time.perf_counter(), samples[-1][1] + receiver.taken()))
            first = next((i for i, (_, total) in enumerate(samples) if total), None)
            if first is None:
                continue
            began, done = samples[first - 1][0], samples[-1]  # from the last look that saw nothing yet
            if rate is None and n and (done[1] >= n or done[0] - began >= effort.drain_window):
                rate = done[1] / (done[0] - began)
            if (rate is not None or not n) and (not rss or done[1] >= n):
                break
        if rss:
            peak = peak_rss_mib(agent.process.pid)
    finally:
        agent.stop()
        producer.send_signal(signal.SIGTERM)
        out, _ = producer.communicate(timeout=120)
    appended, longest = out.split()
    whole = samples[-1][0] - started
    return ({"drain_rate": rate, "peak_rss": peak},
            {"producer_appends": int(appended), "producer_longest_append_ms": round(1000 * float(longest), 2),
             "records_shipped": samples[-1][1], "watched_s": round(whole, 2),
             "backlog_drained": samples[-1][1] >= n})


# -- one size, every size --------------------------------------------------------------------------------------


def measure(n: int, cache: Path, folder: Path, effort: Effort, rss: bool) -> tuple[dict[str, float | None],
                                                                                    dict[str, Any]]:
    source, build = cached_spool(cache, n)
    started = time.perf_counter()
    size = sum(file.stat().st_size for file in spool_files(source))
    values: dict[str, float | None] = {"bytes_per_record": size / n if n else None}
    details: dict[str, Any] = {"build": build, "file_mib": round(size / 2**20, 1)}
    with ReceiverProcess() as receiver:
        setup = Setup(folder, n, receiver.url)
        with copy_of(source, folder) as db:
            values.update(commands(db, setup, n, effort))
            values["compaction_tx"], details["compaction"] = compaction(db, effort)  # last: it merges records
        with copy_of(source, folder) as db:
            values.update(starts(db, setup, receiver, n, effort))
            values.update(endpoints(db, setup, effort))
        with copy_of(source, folder) as db:
            drained, details["drain"] = drain(db, setup, receiver, n, effort, rss)
            values.update(drained)
    details["measure_seconds"] = round(time.perf_counter() - started, 1)
    return values, details


def growth_reference(sizes: tuple[int, ...]) -> int | None:
    """The size growth is taken against: 1M when a larger size is measured, else the smallest non-zero size below
    the largest (None when there is none)."""
    largest = max(sizes)
    if 1_000_000 in sizes and largest > 1_000_000:
        return 1_000_000
    return next((n for n in sizes if 0 < n < largest), None)


def run(sizes: tuple[int, ...], cache: Path, folder: Path, effort: Effort, long: bool) -> dict[str, Any]:
    results: dict[int, dict[str, float | None]] = {}
    details: dict[str, Any] = {}
    for n in sizes:
        rss = long or n <= RSS_UP_TO
        results[n], details[str(n)] = measure(n, cache, folder, effort, rss)
        print(f"# {label(n)}: built in {details[str(n)]['build']['build_seconds']} s"
              f"{' (cached)' if details[str(n)]['build']['cached'] else ''}, measured in "
              f"{details[str(n)]['measure_seconds']} s", file=sys.stderr, flush=True)
    reference = growth_reference(sizes)
    rows = []
    for row in ROWS:
        values = {str(n): results[n].get(row.key) for n in sizes}
        top, base = values[str(max(sizes))], values.get(str(reference)) if reference is not None else None
        rows.append({"key": row.key, "operation": row.operation, "unit": row.unit,
                     "values": {k: None if v is None else round(v, 4) for k, v in values.items()},
                     "growth": round(top / base, 2) if top is not None and base else None})
    import sqlite3

    return {"scale": True, "sizes": list(sizes), "long": long, "growth": [max(sizes), reference],
            "python": sys.version.split()[0], "sqlite": sqlite3.sqlite_version, "rows": rows, "details": details,
            "conditions": "EZ counts of 1,000 stat names, t spread over a week, no key of their own; default "
                          "settings, but pacing and start-up jitter off; receiver: spool.testing.Receiver in its "
                          "own process on loopback; processes are `python -m spool` (interpreter start included); "
                          f"medians of up to {effort.runs} runs; warm page cache unless cold"}


def number(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "records/s":
        return f"{value / 1000:.3g}k" if value >= 1000 else f"{value:.3g}"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    return f"{text} {unit}"


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    top, reference = report["growth"]
    header = f"growth ({label(top)} ÷ {label(reference)})" if reference is not None else "growth"
    lines = [f"| operation | {' | '.join(label(n) for n in sizes)} | {header} |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for row in report["rows"]:
        cells = [number(row["values"][str(n)], row["unit"]) for n in sizes]
        growth = row["growth"]
        ratio = "–" if growth is None else f"{growth:.0f}×" if growth >= 10 else f"{growth:.2g}×"
        lines.append(f"| {row['operation']} | {' | '.join(cells)} | {ratio} |")
    for n in sizes:
        detail = report["details"][str(n)]
        build = detail["build"]
        lines.append("")
        lines.append(f"{label(n)}: {detail['file_mib']} MiB, built in {build['build_seconds']} s"
                     f"{' (cached)' if build['cached'] else ''}, measured in {detail['measure_seconds']} s; "
                     f"compaction {detail['compaction']['transactions']} transactions (median "
                     f"{detail['compaction']['median_ms']} ms){'' if detail['compaction']['finished'] else ', stopped'}"
                     f"; the producer's longest append during the drain "
                     f"{detail['drain']['producer_longest_append_ms']} ms"
                     f"{'' if detail['drain']['backlog_drained'] else ' (the backlog was not drained in time)'}")
    lines.append("")
    lines.append(f"Python {report['python']}, SQLite {report['sqlite']}. {report['conditions']}.")
    return "\n".join(lines)
