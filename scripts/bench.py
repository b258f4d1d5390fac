#!/usr/bin/env python3
"""spool's benchmarks: every figure beside its baseline, measured in the same run on the same machine.

    scripts/bench.py            # the full suite (several minutes)
    scripts/bench.py --quick    # a small smoke run (the test suite runs this so the benchmark cannot rot)
    scripts/bench.py --json     # one JSON object instead of the table
    scripts/bench.py --only append_batched,drain
    scripts/bench.py --scale    # how figures grow with the backlog: 0 to 5M pending records (scripts/_scale.py)

Ratios, not absolute times, are the figures: machines differ and are noisy. Each timing is the median of
several repetitions. Peers (persist-queue, litequeue) are installed into .bench-deps/ on first use, for the
benchmark only, and compared at the durability each gives by default: persist-queue commits with SQLite's
synchronous=FULL (so against spool's default, full), litequeue with synchronous=NORMAL (against spool's
normal). The package is byte-compiled first, as an installed one is (pip compiles at install time).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _benchlib import (  # scripts/ is on sys.path: this file's folder
    ROOT,
    T0,
    ReceiverProcess,
    each_second,
    fill,
    free_port,
    scratch,
    use_project_venv,
)

BENCH_DEPS = ROOT / ".bench-deps"
use_project_venv(__file__)
sys.path.insert(0, str(ROOT))

from spool import Spool  # noqa: E402
from spool.config import Config  # noqa: E402
from spool.ship import Shipper  # noqa: E402
from spool.store import Store  # noqa: E402
from spool.testing import Receiver  # noqa: E402


class Figure:
    """One measured figure: ours beside its baseline, the target the ratio must meet (None: reported only), and
    the conditions it was measured in (receiver, pacing, durability, sizes)."""

    def __init__(self, name: str, ours: float, baseline: float | None, unit: str, target: str | None, ratio: float,
                 note: str = "", conditions: str = ""):
        self.name, self.ours, self.baseline, self.unit = name, ours, baseline, unit
        self.target, self.ratio, self.note, self.conditions = target, ratio, note, conditions
        self.passed: bool | None = None
        if target is not None:
            op, bound = target.split(" ")
            self.passed = ratio >= float(bound) if op == ">=" else ratio <= float(bound)

    def row(self) -> dict[str, Any]:
        return {"figure": self.name, "ours": round(self.ours, 4),
                "baseline": None if self.baseline is None else round(self.baseline, 4), "unit": self.unit,
                "ratio": round(self.ratio, 3), "target": self.target, "met": self.passed, "note": self.note,
                "conditions": self.conditions}


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def interleaved(ours: Callable[[], float], base: Callable[[], float], rounds: int) -> tuple[float, float]:
    """Run two timed functions A B A B ... (each returns its own timing), so drift in load hits both alike."""
    a, b = [], []
    for _ in range(rounds):
        gc.collect()
        a.append(ours())
        gc.collect()
        b.append(base())
    return statistics.median(a), statistics.median(b)


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


RAW_SCHEMA = """
CREATE TABLE records (id INTEGER PRIMARY KEY, state INTEGER NOT NULL DEFAULT 0, stat TEXT, key TEXT, ukey TEXT,
  ezkey TEXT, kind INTEGER NOT NULL, number ANY NOT NULL, t INTEGER NOT NULL, done_at FLOAT, reason TEXT,
  http_status INTEGER, body TEXT, held_boot TEXT, held_mono FLOAT, stage INTEGER, split INTEGER);
CREATE INDEX pending_t ON records (t) WHERE state = 0;
"""
RAW_INSERT = "INSERT INTO records (stat, key, ukey, ezkey, kind, number, t) VALUES (?, ?, ?, ?, ?, ?, ?)"


def raw_connection(path: Path, synchronous: str) -> sqlite3.Connection:
    """The baseline: plain sqlite3 on a table of the same shape, with the same pragmas as spool."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(RAW_SCHEMA)
    return conn


def bench_config(db: Path, url: str, **changes: Any) -> Config:
    """A Config for a benchmark: this spool, this receiver, a key; other settings by name."""
    return Config().replace(**{"spool.path": db, "endpoint": url, "ezkey": "bench-key", **changes})


def dicts(n: int) -> list[dict[str, Any]]:
    return [{"stat": f"bench stat {i % 50}", "count": i % 7 + 1, "t": T0 + i} for i in range(n)]


# -- figures -------------------------------------------------------------------------------------------


def bench_append_batched(n: int, rounds: int) -> list[Figure]:
    """Spool.add_many (validation included) against raw executemany of ready-made tuples into a table of the same
    columns and one index. Only the append is timed on both sides: each spool and each raw table is opened and
    its schema made before the clock starts."""
    records = dicts(n)
    tuples = [(r["stat"], None, None, None, 0, r["count"], r["t"]) for r in records]

    def ours() -> float:
        with scratch() as folder, Spool(folder / "s.db") as sp:
            started = time.perf_counter()
            sp.add_many(records)
            return time.perf_counter() - started

    def raw() -> float:
        with scratch() as folder:
            conn = raw_connection(folder / "r.db", "FULL")
            started = time.perf_counter()
            with conn:
                conn.executemany(RAW_INSERT, tuples)
            took = time.perf_counter() - started
            conn.close()
            return took

    a, b = interleaved(ours, raw, rounds)
    return [Figure(f"batched append, add_many {n} records", n / a, n / b, "records/s", ">= 0.75", b / a,
                   conditions=f"{n:,} records in one call; both synchronous=FULL, WAL; raw: executemany of tuples "
                              "into the same columns with one index (t, pending only); median of "
                              f"{rounds} interleaved runs, open and schema outside the timing")]


def bench_append_single(n: int, repeat: int) -> list[Figure]:
    """One record per commit: Spool.count against raw insert+commit, for synchronous normal and full."""
    figures = []
    for synchronous, target in (("normal", ">= 0.6"), ("full", ">= 0.8")):
        def ours(sync: str = synchronous) -> None:
            with scratch() as folder, Spool(folder / "s.db", synchronous=sync) as sp:
                for i in range(n):
                    sp.count("bench stat", 1, t=T0 + i)

        def raw(sync: str = synchronous) -> None:
            with scratch() as folder:
                conn = raw_connection(folder / "r.db", sync.upper())
                for i in range(n):
                    conn.execute(RAW_INSERT, ("bench stat", None, None, None, 0, 1, T0 + i))
                    conn.commit()
                conn.close()

        a, b = median_time(ours, repeat), median_time(raw, repeat)
        figures.append(Figure(f"single-record append, one commit each, synchronous={synchronous}", n / a, n / b,
                              "records/s", target, b / a,
                              conditions=f"{n:,} Spool.count calls against raw insert+commit, both synchronous="
                                         f"{synchronous}, WAL; median of {repeat}, open included on both sides"))
    return figures


def ensure_peers() -> bool:
    """Make persist-queue and litequeue importable (installed into .bench-deps/ for the benchmark only)."""
    sys.path.insert(0, str(BENCH_DEPS))
    try:
        import litequeue  # noqa: F401
        import persistqueue  # noqa: F401
        return True
    except ImportError:
        pass
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                             "--target", str(BENCH_DEPS), "persist-queue", "litequeue"], capture_output=True)
    if result.returncode != 0:
        return False
    import importlib

    importlib.invalidate_caches()
    return True


def bench_peers(n: int, repeat: int) -> list[Figure]:
    """One durable put per record: spool against persist-queue's SQLiteAckQueue and litequeue."""
    if not ensure_peers():
        return [Figure("single append vs peers", 0, None, "records/s", ">= 1", 0,
                       note="persist-queue/litequeue could not be installed")]
    import litequeue
    import persistqueue

    def ours(synchronous: str) -> Callable[[], None]:
        def run() -> None:
            with scratch() as folder, Spool(folder / "s.db", synchronous=synchronous) as sp:
                for i in range(n):
                    sp.count("bench stat", 1, t=T0 + i)
        return run

    def persist_queue() -> None:
        with scratch() as folder:
            q = persistqueue.SQLiteAckQueue(str(folder / "pq"), auto_commit=True)
            for i in range(n):
                q.put({"stat": "bench stat", "count": 1, "t": T0 + i})

    def lite_queue() -> None:
        with scratch() as folder:
            q = litequeue.LiteQueue(str(folder / "lq.db"))
            for i in range(n):
                q.put(json.dumps({"stat": "bench stat", "count": 1, "t": T0 + i}))
            q.close() if hasattr(q, "close") else None

    full, p = median_time(ours("full"), repeat), median_time(persist_queue, repeat)
    normal, lq = median_time(ours("normal"), repeat), median_time(lite_queue, repeat)
    return [Figure("single append (full) vs persist-queue SQLiteAckQueue.put", n / full, n / p, "records/s", ">= 5",
                   p / full, note="both synchronous=FULL: one fsync per record bounds both",
                   conditions=f"{n:,} puts, one commit each; median of {repeat}"),
            Figure("single append (normal) vs litequeue put", n / normal, n / lq, "records/s", ">= 2", lq / normal,
                   note="both synchronous=NORMAL", conditions=f"{n:,} puts, one commit each; median of {repeat}")]


class Build:
    """The release files (scripts/build): a wheel for a regular install and the zipapp. Started early in quick
    mode so it overlaps the other figures (their timings are not figures there)."""

    def __init__(self, folder: Path):
        self.out = folder / "dist"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "build"), "--offline", "--no-deb",
                                         "--out", str(self.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self) -> Path:
        if self.process.returncode is None:
            _, err = self.process.communicate()
            if self.process.returncode != 0:
                raise RuntimeError(f"scripts/build failed: {err.decode()[-2000:]}")
        return self.out


def regular_install(build: Build, folder: Path) -> Path:
    """Install the wheel into a fresh venv, as pip installs a release (dependencies from .wheels/); its bin/."""
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    wheel = next(build.wait().glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--disable-pip-version-check", "--no-index", "--find-links", str(ROOT / ".wheels"), str(wheel)],
                   check=True, capture_output=True)
    return venv / "bin"


def time_processes(ours: list[str], base: list[str], runs: int, env: dict[str, str]) -> tuple[float, float]:
    """Median wall time of two commands run alternately, `runs` times each."""
    def timed(command: list[str]) -> Callable[[], float]:
        def run() -> float:
            started = time.perf_counter()
            subprocess.run(command, env=env, check=True)
            return time.perf_counter() - started
        return run

    return interleaved(timed(ours), timed(base), runs)


def bench_add_process(build: Build | None, runs: int) -> list[Figure]:
    """`spool add` as a whole process, from a regular install, against `python -c "import click, sqlite3"`."""
    with scratch() as folder:
        if build is None:  # quick mode: the project's editable .venv, a smoke run only
            bin_dir, how = ROOT / ".venv" / "bin", "the editable .venv (quick mode: smoke only)"
        else:
            bin_dir, how = regular_install(build, folder), "a regular install of the wheel in a fresh venv"
        env = dict(os.environ, SPOOL_DB=str(folder / "s.db"))
        subprocess.run([str(bin_dir / "spool"), "add", "warm", "--count", "1"], env=env, check=True)  # schema exists
        a, b = time_processes([str(bin_dir / "spool"), "add", "bench", "--count", "1"],
                              [str(bin_dir / "python"), "-c", "import click, sqlite3"], runs, env)
    return [Figure("`spool add` process (one record)", a * 1000, b * 1000, "ms", "<= 1.3", a / b,
                   conditions=f"{how}; Python {sys.version.split()[0]}; the spool exists, synchronous=FULL; "
                              f"median of {runs} interleaved runs; baseline: the same venv's python")]


def bench_zipapp_add(build: Build, runs: int) -> list[Figure]:
    """`spool add` from the one-file zipapp (scripts/build) against the venv's `spool add`, same interpreter."""
    spool = ROOT / ".venv" / "bin" / "spool"
    with scratch() as folder:
        zipapp = [sys.executable, str(build.wait() / "spool.pyz")]
        env = dict(os.environ, SPOOL_DB=str(folder / "s.db"))
        subprocess.run([str(spool), "add", "warm", "--count", "1"], env=env, check=True)  # schema exists
        a, b = time_processes([*zipapp, "add", "bench", "--count", "1"], [str(spool), "add", "bench", "--count", "1"],
                              runs, env)
    return [Figure("`spool add` process: zipapp vs venv", a * 1000, b * 1000, "ms", "<= 1.3", a / b,
                   note=f"both on Python {sys.version.split()[0]}; the zipapp's bytecode is for it",
                   conditions=f"median of {runs} interleaved runs; the spool exists, synchronous=FULL")]


def fill_backlog(path: Path, n: int) -> None:
    """n pending records of 50 stat names, one a second of t (the drain's bare loop posts the same)."""
    fill(path, n, names=50, t=each_second(1))


def bench_drain(n: int, rounds: int) -> list[Figure]:
    """Drain an n-record backlog against a bare requests loop posting the same batches, interleaved; and the CPU
    spool spends per shipped record (it decides the drain rate of a small ARM box)."""
    import requests

    with scratch() as folder, ReceiverProcess() as receiver:
        db = folder / "s.db"
        bodies = [json.dumps({"ezkey": "bench-key", "data": [
            {"stat": f"bench stat {i % 50}", "count": 1, "t": T0 + i} for i in range(s, min(n, s + 500))]},
            separators=(",", ":")).encode() for s in range(0, n, 500)]
        cpu: dict[str, list[float]] = {"ours": [], "bare": []}
        receiver_cpu: dict[str, list[float]] = {"ours": [], "bare": []}

        def ours() -> float:
            fill_backlog(db, n)
            config = bench_config(db, receiver.url, synchronous="full", max_requests_per_second=0)
            gc.collect()
            started, used, served = time.perf_counter(), cpu_seconds(), receiver.cpu()
            with Store.for_config(config) as store, Shipper(store, config) as shipper:
                assert shipper.drain().done
            took = time.perf_counter() - started
            cpu["ours"].append(cpu_seconds() - used)
            receiver_cpu["ours"].append(receiver.cpu() - served)
            assert receiver.taken() == n
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            return took

        def bare() -> float:
            with requests.Session() as session:
                started, used, served = time.perf_counter(), cpu_seconds(), receiver.cpu()
                for body in bodies:
                    response = session.post(f"{receiver.url}/ez", data=body,
                                            headers={"Content-Type": "application/json"})
                    response.raise_for_status()
                took = time.perf_counter() - started
                cpu["bare"].append(cpu_seconds() - used)
                receiver_cpu["bare"].append(receiver.cpu() - served)
            assert receiver.taken() == n
            return took

        a, b = interleaved(ours, bare, rounds)
    conditions = (f"{n:,} records, batches of 500, one key; receiver: spool.testing.Receiver in its own process "
                  "on loopback, no latency, no Nagle stall; pacing off (max_requests_per_second = 0), "
                  f"max_in_flight 8; synchronous=FULL; median of {rounds} interleaved runs")
    per_1000 = statistics.median(cpu["ours"]) / n * 1000
    bare_per_1000 = statistics.median(cpu["bare"]) / n * 1000
    # Where the two processes cannot each have a core (a shared machine), the records/s ratio tends to the ratio
    # of the CPU both spend per record, the receiver's included: its figures tell how to read the first one.
    served = {side: statistics.median(times) / n * 1e6 for side, times in receiver_cpu.items()}
    return [Figure(f"drain of a {n}-record backlog to the test receiver", n / a, n / b, "records/s", ">= 0.8", b / a,
                   note="baseline: a bare requests loop posting the same (pre-built) batches", conditions=conditions),
            Figure("drain CPU per 1,000 shipped records", per_1000 * 1000, bare_per_1000 * 1000, "ms", None,
                   per_1000 / bare_per_1000,
                   note="user+sys of the shipping process (all its threads) / records; baseline: the bare loop's",
                   conditions=f"{conditions}; the receiver meanwhile: {served['ours']:.2f} ms vs "
                              f"{served['bare']:.2f} ms per 1,000 records")]


def bench_pipeline(n: int, latency: float = 0.3) -> list[Figure]:
    """Drain through a receiver 300 ms away: requests in flight (the default) against one at a time."""
    def drain(max_in_flight: int) -> float:
        with scratch() as folder, Receiver() as receiver:
            receiver.latency = latency
            db = folder / "s.db"
            fill_backlog(db, n)
            config = bench_config(db, receiver.url, max_in_flight=max_in_flight)
            started = time.perf_counter()
            with Store(db) as store, Shipper(store, config) as shipper:
                assert shipper.drain().done
            assert len(receiver.accepted) == n
            return n / (time.perf_counter() - started)

    default = Config().ship
    ours, serial = drain(default.max_in_flight), drain(1)
    return [Figure(f"drain of {n} records through a {latency * 1000:g} ms link (max_in_flight {default.max_in_flight}, "
                   f"{default.max_requests_per_second:g} req/s)", ours, serial, "records/s", ">= 4", ours / serial,
                   note="baseline: the same drain with max_in_flight = 1, in the same run",
                   conditions=f"{n:,} records, batches of 500; receiver: spool.testing.Receiver in this process, every "
                              f"answer {latency * 1000:g} ms late; default pacing and max_in_flight; synchronous=FULL")]


def bench_livelock(n: int, stall: float = 3.0) -> list[Figure]:
    """One refused record at the head of a backlog on a link failing every few requests: time to drain."""
    with scratch() as folder, Receiver() as receiver:
        db = folder / "s.db"
        with Spool(db) as sp:
            sp.count("poison", 1, t=T0 - 1)  # the oldest record of all
        fill_backlog(db, n)
        receiver.refuse_stat("poison")
        for i in range(1, 4000):
            if i % 7 == 0:
                receiver.reset_next(1)
            elif i % 11 == 0:
                receiver.rate_limit_next(1, retry_after="0")
            elif i % 13 == 0:
                receiver.stall_next(1, seconds=stall)
            else:
                receiver.pass_next(1)
        config = bench_config(db, receiver.url, timeout=1.0)
        started = time.perf_counter()
        with Store(db) as store, Shipper(store, config) as shipper:
            assert shipper.drain(max_time=600).done
            dead = [d["record"].stat for d in store.dead_letters()]
        took = time.perf_counter() - started
        assert len(receiver.accepted) == n and dead == ["poison"], (len(receiver.accepted), dead)
    return [Figure(f"livelock scenario: {n} records, 1 poison, a reset/429/stall every 7/11/13 requests", took,
                   None, "s", "<= 60", took, note="all clean records delivered, exactly the poison dead",
                   conditions=f"receiver: spool.testing.Receiver in this process; timeout 1 s, stalls {stall:g} s; "
                              "default pacing (20 req/s) and batch size; synchronous=FULL")]


# VmHWM, not ru_maxrss: on Linux ru_maxrss survives execve, so a child forked from this (large) benchmark
# process would report the parent's peak.
DRAIN_CHILD = """
import sys
from spool.config import Config
from spool.ship import Shipper
from spool.store import Store
db, url = sys.argv[1], sys.argv[2]
config = Config().replace(**{"spool.path": db, "endpoint": url, "ezkey": "bench-key", "max_requests_per_second": 0})
with Store(db) as store, Shipper(store, config) as shipper:
    assert shipper.drain().done
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])
"""


def peak_rss_of_drain(n: int) -> float:
    """Peak RSS in MiB of a process draining an n-record backlog."""
    with scratch() as folder, Receiver() as receiver:
        db = folder / "s.db"
        fill_backlog(db, n)
        out = subprocess.run([sys.executable, "-c", DRAIN_CHILD, str(db), receiver.url], check=True,
                             capture_output=True, text=True, cwd=ROOT).stdout
    return int(out.split()[-1]) / 1024


def bench_memory(small: int, large: int) -> list[Figure]:
    a, b = peak_rss_of_drain(large), peak_rss_of_drain(small)
    conditions = ("a child process draining the backlog (VmHWM); receiver: spool.testing.Receiver in the bench "
                  "process; pacing off; synchronous=FULL; batches of 500")
    return [Figure(f"peak RSS draining {large} vs {small} backlog", a, b, "MiB", "<= 1.2", a / b,
                   conditions=conditions),
            Figure(f"peak RSS draining {large} backlog", a, None, "MiB", "<= 80", a, conditions=conditions)]


def bench_ingest(n: int, repeat: int) -> list[Figure]:
    """Ingest an n-line JSONL file against json.loads per line + executemany."""
    from spool.watch import Ingestor

    with scratch() as folder:
        source = folder / "big.jsonl"
        with open(source, "w") as handle:
            for i in range(n):
                handle.write(f'{{"stat":"bench stat {i % 50}","count":{i % 7 + 1},"t":{T0 + i}}}\n')

        def ours() -> None:
            with scratch() as inner, Store(inner / "s.db") as store:
                result = Ingestor(store).ingest(source, move=False)
                assert result.records == n, result

        def raw() -> None:
            with scratch() as inner:
                conn = raw_connection(inner / "r.db", "FULL")
                with open(source, "rb") as handle, conn:
                    conn.executemany(RAW_INSERT, ((o["stat"], None, None, None, 0, o["count"], o["t"])
                                                  for o in map(json.loads, handle)))
                conn.close()

        a, b = median_time(ours, repeat), median_time(raw, repeat)
    return [Figure(f"ingest of a {n}-line JSONL file", n / a, n / b, "records/s", ">= 0.6", b / a,
                   conditions=f"{n:,} lines; both synchronous=FULL; raw: json.loads per line + executemany into the "
                              f"same columns with one index; median of {repeat}, spool open included on both sides")]


DISK_CHILD = """
import sys, time
from spool import Spool
from spool.config import Config
from spool.ship import Shipper
from spool.store import Store
def written():
    return int(next(l for l in open("/proc/self/io") if l.startswith("write_bytes")).split()[1])
db, url, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
single = mode == "single"
with Spool(db):
    pass  # the file and its schema exist before counting: a record's life is measured, not a spool's birth
before = written()
with Spool(db) as sp:
    if single:
        for i in range(n):
            sp.count(f"s{i % 50}", 1, t=1700000000 + i)
    else:
        for start in range(0, n, 500):
            sp.add_many({"stat": f"s{i % 50}", "count": 1, "t": 1700000000 + i} for i in range(start, start + 500))
if mode == "ship":  # what shipping alone writes: from a backlog already on disk
    with Store(db) as store:
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    import os; os.sync()
    before = written()
config = Config().replace(**{"spool.path": db, "endpoint": url, "ezkey": "k", "max_requests_per_second": 0})
with Store(db) as store, Shipper(store, config) as shipper:
    assert shipper.drain().done
    if mode != "ship":
        store.prune_sent(sent_before=time.time() + 1)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
import os; os.sync()
print(written() - before)
"""


def bench_disk(batched: int, single: int) -> list[Figure]:
    """Bytes written to storage per record over its life (append, ship, prune, checkpoint): appended 500 per
    commit, and one per commit (every `spool add`, Spool.count, a lightly loaded relay)."""
    figures = []
    for mode, n, target in (("batch", batched, "<= 512"), ("single", single, None), ("ship", batched, "<= 40")):
        with scratch() as folder, Receiver() as receiver:
            out = subprocess.run([sys.executable, "-c", DISK_CHILD, str(folder / "s.db"), receiver.url, str(n), mode],
                                 check=True, capture_output=True, text=True, cwd=ROOT).stdout
        per_record = int(out.split()[-1]) / n
        what = {"batch": "500 records per commit; append, ship, prune", "single": "one record per commit; append, "
                "ship, prune", "ship": "shipping alone, batches of 500: leases, acks, their WAL and checkpoint"}[mode]
        figures.append(Figure(f"disk bytes written per record ({what})", per_record, None, "B",
                              target, per_record,
                              conditions=f"{n:,} records; /proc/self/io write_bytes of the process, after a final "
                                         "checkpoint and sync; synchronous=FULL; pages of 1 KiB (new spools); ext4; "
                                         "shipped in batches of 500, pacing off"))
    return figures


def bench_size(n: int, names: int = 1_000) -> list[Figure]:
    """Bytes on disk per pending record: n EZ counts of `names` stat names (realistic names), checkpointed."""
    with scratch() as folder:
        db = folder / "s.db"
        with Spool(db, synchronous="normal") as sp:
            for start in range(0, n, 50_000):
                sp.add_many({"stat": f"site.web-{i % names:04d}.requests.count", "count": 1, "t": T0 + i}
                            for i in range(start, min(n, start + 50_000)))
            sp.store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        per_record = db.stat().st_size / n
    return [Figure(f"bytes on disk per pending EZ record ({names:,} stat names)", per_record, None, "B", "<= 50",
                   per_record, conditions=f"{n:,} records named like 'site.web-0042.requests.count', the file after a "
                                          "checkpoint / records; pages of 1 KiB (new spools)")]


def bench_idle(seconds: float) -> list[Figure]:
    """CPU used by an idle `spool run` in full mode (shipper, one watched directory, the relay) over a period long
    enough to hold its housekeeping and its summary (every 60 s) when `seconds` >= 120."""
    import urllib.request

    with scratch() as folder, Receiver() as receiver:
        drop = folder / "drop"
        drop.mkdir()
        port = free_port()
        config = folder / "spool.toml"
        config.write_text(f'[ship]\nendpoint = "{receiver.url}"\nezkey = "k"\n[relay]\nenabled = true\n'
                          f'listen = "127.0.0.1:{port}"\n[[watch]]\npath = "{drop}"\n')
        agent = subprocess.Popen([str(ROOT / ".venv" / "bin" / "spool"), "--db", str(folder / "s.db"),
                                  "--config", str(config), "run"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # start-up is not idling: wait for the relay to answer, then a moment more
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or agent.poll() is not None:
                    agent.kill()
                    raise RuntimeError("spool run did not start") from None
                time.sleep(0.05)
        time.sleep(min(1.0, seconds))
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu() -> float:
            fields = Path(f"/proc/{agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before, started = cpu(), time.monotonic()
        time.sleep(seconds)
        used, elapsed = cpu() - before, time.monotonic() - started
        agent.terminate()
        agent.wait(30)
    percent = 100 * used / elapsed
    return [Figure(f"idle `spool run` CPU over {seconds:g} s", percent, None, "% of a core", "<= 0.5", percent,
                   conditions="full mode: shipper, relay (HTTP) and one watched directory (inotify), default "
                              "intervals (housekeeping and the summary every 60 s, idle_poll 2 s); empty spool; "
                              f"CPU ticks of the process ({1000 / ticks:g} ms each) over {seconds:g} s")]


RELAY_LOAD = """
import http.client, json, sys, threading, time
host, port, clients, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
form = "ezkey=k&stat=bench&count=1&t=1700000000"
batch = json.dumps({"ezkey": "k", "data": [{"stat": f"bench {i}", "count": 1, "t": 1700000000} for i in range(20)]})
KINDS = {  # answer kind: (body, content type, expected status)
    "form": (form, "application/x-www-form-urlencoded", 204),
    "vb": (form + "&vb=1", "application/x-www-form-urlencoded", 200),
    "batch": (batch, "application/json", 200),
}
for kind, (body, content_type, status) in KINDS.items():
    counts = [0] * clients
    stop = time.perf_counter() + seconds
    def client(k):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while time.perf_counter() < stop:
            conn.request("POST", "/ez", body, {"Content-Type": content_type})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == status, (kind, answer.status)
            counts[k] += 1
        conn.close()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads: t.start()
    for t in threads: t.join()
    print(kind, sum(counts) / (time.perf_counter() - started), flush=True)
"""
RELAY_KINDS = {"form": "form -> 204", "vb": "form vb=1 -> 200 JSON", "batch": "JSON batch of 20 -> 200 multiple"}


class NullStore:
    """The baseline's store: takes rows and commits nothing, so the relay's writer thread hop stays in the path."""

    def append(self, rows: Any) -> int:
        return sum(1 for _ in rows)


def bench_relay(seconds: float, rounds: int, clients: int = 16) -> list[Figure]:
    """Durable requests/s through the relay for every answer kind, against the same server whose writer thread
    commits nothing (the same hop from request thread to writer and back), interleaved A B A B."""
    from spool.config import RelaySettings
    from spool.relay import GroupWriter, Relay

    def rates(spooling: bool) -> dict[str, float]:
        with scratch() as folder, Store(folder / "s.db") as store:
            relay = Relay(RelaySettings(enabled=True, listen="127.0.0.1:0", max_connections=64), store)
            if not spooling:
                relay.writer.stop()
                relay.writer = GroupWriter(NullStore())  # type: ignore[arg-type]
            relay.start()
            try:
                host, port = relay.server.server_address[:2]
                out = subprocess.run([sys.executable, "-c", RELAY_LOAD, str(host), str(port), str(clients),
                                      str(seconds)], check=True, capture_output=True, text=True).stdout
            finally:
                relay.stop()
        return {kind: float(rate) for kind, rate in (line.split() for line in out.splitlines())}

    ours: dict[str, list[float]] = {kind: [] for kind in RELAY_KINDS}
    base: dict[str, list[float]] = {kind: [] for kind in RELAY_KINDS}
    for _ in range(rounds):
        for kind, rate in rates(True).items():
            ours[kind].append(rate)
        for kind, rate in rates(False).items():
            base[kind].append(rate)
    figures = []
    for kind, label in RELAY_KINDS.items():
        a, b = statistics.median(ours[kind]), statistics.median(base[kind])
        figures.append(Figure(f"relay: durable requests/s, {clients} concurrent clients, {label}", a, b, "requests/s",
                              ">= 0.7", a / b,
                              note="baseline: the same relay, its writer thread committing nothing",
                              conditions=f"{clients} keep-alive clients in another process, {seconds:g} s per kind; "
                                         f"synchronous=FULL, group commit; median of {rounds} interleaved rounds"))
    return figures


# -- running --------------------------------------------------------------------------------------------


def suite(quick: bool, folder: Path) -> dict[str, Callable[[], list[Figure]]]:
    builds: list[Build] = []

    def build() -> Build:  # one build serves both `spool add` figures
        if not builds:
            builds.append(Build(folder))
        return builds[0]

    if quick:  # a smoke run of every figure: small sizes, short waits; nothing here is a measurement
        build()  # started now: it runs while the other figures do
        return {
            "append_batched": lambda: bench_append_batched(2_000, 1),
            "append_single": lambda: bench_append_single(20, 1),
            "add_process": lambda: bench_add_process(None, 1),
            "zipapp_add": lambda: bench_zipapp_add(build(), 1),
            "drain": lambda: bench_drain(2_000, 1),
            "pipeline": lambda: bench_pipeline(1_000, latency=0.02),
            "livelock": lambda: bench_livelock(100, stall=0.0),
            "memory": lambda: bench_memory(500, 1_000),
            "ingest": lambda: bench_ingest(2_000, 1),
            "disk": lambda: bench_disk(1_000, 50),
            "size": lambda: bench_size(2_000),
            "idle": lambda: bench_idle(0.3),
            "relay": lambda: bench_relay(0.2, 1, clients=2),
        }
    return {
        "append_batched": lambda: bench_append_batched(200_000, 5),
        "append_single": lambda: bench_append_single(2_000, 5),
        "peers": lambda: bench_peers(2_000, 3),
        "add_process": lambda: bench_add_process(build(), 30),
        "zipapp_add": lambda: bench_zipapp_add(build(), 30),
        "drain": lambda: bench_drain(500_000, 3),
        "pipeline": lambda: bench_pipeline(50_000),
        "livelock": lambda: bench_livelock(3_000),
        "memory": lambda: bench_memory(100_000, 1_000_000),
        "ingest": lambda: bench_ingest(1_000_000, 3),
        "disk": lambda: bench_disk(100_000, 5_000),
        "size": lambda: bench_size(1_000_000),
        "idle": lambda: bench_idle(125),
        "relay": lambda: bench_relay(4.0, 5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", help="comma-separated figure groups to run")
    parser.add_argument("--scale", action="store_true",
                        help="the scale table instead: each figure on spools of 0 to 5M pending records (SPOOL_LONG=1: "
                             "to 50M); with --quick, one run of each (a smoke run)")
    parser.add_argument("--sizes", help="with --scale: these backlog sizes instead, e.g. 0,100k,1M")
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench-cache",
                        help="with --scale: where built spools are kept (default .bench-cache/)")
    args = parser.parse_args()
    if args.scale:
        return scale(args, parser)
    if args.sizes:
        parser.error("--sizes goes with --scale")
    import compileall

    compileall.compile_dir(str(ROOT / "spool"), quiet=1)  # as an installed package is; PYTHONDONTWRITEBYTECODE
    with scratch() as folder:
        benches = suite(args.quick, folder)
        chosen = args.only.split(",") if args.only else list(benches)
        unknown = [name for name in chosen if name not in benches]
        if unknown:
            parser.error(f"unknown figure group(s): {', '.join(unknown)}; known: {', '.join(benches)}")
        rows = []
        for name in chosen:
            for figure in benches[name]():
                rows.append(figure.row())
                if not args.json:
                    print(format_row(figure.row()), flush=True)
    if args.json:
        print(json.dumps({"quick": args.quick, "python": sys.version.split()[0],
                          "sqlite": sqlite3.sqlite_version, "figures": rows}, indent=2))
    return 0


def scale(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import _scale

    long = os.environ.get("SPOOL_LONG") == "1"
    try:
        sizes = _scale.parse_sizes(args.sizes) if args.sizes else _scale.LONG if long else _scale.SHORT
    except ValueError as exc:
        parser.error(f"--sizes: {exc}")
    if args.only:
        parser.error("--only does not go with --scale")
    with scratch("spool-scale-") as folder:
        report = _scale.run(sizes, args.cache, folder, _scale.QUICK if args.quick else _scale.Effort(), long)
    print(json.dumps(report, indent=2) if args.json else _scale.markdown(report))
    return 0


def number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.4f}"


def format_row(row: dict[str, Any]) -> str:
    baseline = "" if row["baseline"] is None else f" vs {number(row['baseline'])}"
    verdict = "" if row["met"] is None else " met" if row["met"] else " MISSED"
    target = "reported only" if row["target"] is None else f"target {row['target']}"
    return (f"{row['figure']:<62} {number(row['ours']):>12}{baseline:<16} {row['unit']:<10} "
            f"ratio {row['ratio']:.2f} ({target}){verdict}\n    {row['conditions']}")


if __name__ == "__main__":
    sys.exit(main())
