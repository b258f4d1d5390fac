#!/usr/bin/env python3
"""spool's benchmarks: every figure beside its baseline, measured in the same run on the same machine.

    scripts/bench.py            # the full suite (several minutes)
    scripts/bench.py --quick    # a small smoke run (the test suite runs this so the benchmark cannot rot)
    scripts/bench.py --json     # one JSON object instead of the table
    scripts/bench.py --only append_batched,drain

Ratios, not absolute times, are the figures: machines differ and are noisy. Each timing is the median of
several repetitions. Peers (persist-queue, litequeue) are installed into .bench-deps/ on first use, for the
benchmark only, and compared at the durability each gives by default: persist-queue commits with SQLite's
synchronous=FULL (so against spool's default, full), litequeue with synchronous=NORMAL (against spool's
normal). The package is byte-compiled first, as an installed one is (pip compiles at install time).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
BENCH_DEPS = ROOT / ".bench-deps"
T0 = 1_700_000_000

if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():  # run inside the project's venv
    subprocess.run([str(ROOT / "scripts" / "bootstrap")], check=True)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), __file__, *sys.argv[1:]])  # noqa: S606 - re-exec ourselves

sys.path.insert(0, str(ROOT))

from spool import Spool  # noqa: E402
from spool.config import Config  # noqa: E402
from spool.ship import Shipper  # noqa: E402
from spool.store import Store  # noqa: E402
from spool.testing import Receiver  # noqa: E402


class Figure:
    """One measured figure: ours beside its baseline, and the target the ratio must meet."""

    def __init__(self, name: str, ours: float, baseline: float | None, unit: str, target: str, ratio: float,
                 note: str = ""):
        self.name, self.ours, self.baseline, self.unit = name, ours, baseline, unit
        self.target, self.ratio, self.note = target, ratio, note
        op, bound = target.split(" ")
        self.passed = ratio >= float(bound) if op == ">=" else ratio <= float(bound)

    def row(self) -> dict[str, Any]:
        return {"figure": self.name, "ours": round(self.ours, 3),
                "baseline": None if self.baseline is None else round(self.baseline, 3), "unit": self.unit,
                "ratio": round(self.ratio, 3), "target": self.target, "met": self.passed, "note": self.note}


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="spool-bench-") as folder:
        yield Path(folder)


RAW_SCHEMA = """
CREATE TABLE records (id INTEGER PRIMARY KEY, state INTEGER NOT NULL DEFAULT 0, stat TEXT, key TEXT, ukey TEXT,
  ezkey TEXT, kind INTEGER NOT NULL, number ANY NOT NULL, t INTEGER NOT NULL, lease_at FLOAT, done_at FLOAT,
  reason TEXT, http_status INTEGER, body TEXT);
CREATE INDEX records_state_t ON records (state, t);
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


def bench_append_batched(n: int, repeat: int) -> list[Figure]:
    """Spool.add_many (validation included) against raw executemany of ready-made tuples."""
    records = dicts(n)
    tuples = [(r["stat"], None, None, None, 0, r["count"], r["t"]) for r in records]

    def ours() -> None:
        with scratch() as folder, Spool(folder / "s.db") as sp:
            sp.add_many(records)

    def raw() -> None:
        with scratch() as folder:
            conn = raw_connection(folder / "r.db", "FULL")
            with conn:
                conn.executemany(RAW_INSERT, tuples)
            conn.close()

    a, b = median_time(ours, repeat), median_time(raw, repeat)
    return [Figure(f"batched append, add_many {n} records", n / a, n / b, "records/s", ">= 0.75", b / a)]


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
                              "records/s", target, b / a))
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
                   p / full, note="both synchronous=FULL: one fsync per record bounds both"),
            Figure("single append (normal) vs litequeue put", n / normal, n / lq, "records/s", ">= 2", lq / normal,
                   note="both synchronous=NORMAL")]


def bench_add_process(runs: int) -> list[Figure]:
    """`spool add` as a whole process against `python -c "import click, sqlite3"`."""
    spool = ROOT / ".venv" / "bin" / "spool"
    with scratch() as folder:
        env = dict(os.environ, SPOOL_DB=str(folder / "s.db"))
        subprocess.run([str(spool), "add", "warm", "--count", "1"], env=env, check=True)  # schema exists
        ours, base = [], []
        for _ in range(runs):  # interleaved, so drift in machine load hits both alike
            started = time.perf_counter()
            subprocess.run([str(spool), "add", "bench", "--count", "1"], env=env, check=True)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", "import click, sqlite3"], check=True)
            base.append(time.perf_counter() - started)
    a, b = statistics.median(ours), statistics.median(base)
    return [Figure("`spool add` process (one record)", a * 1000, b * 1000, "ms", "<= 1.3", a / b)]


def bench_zipapp_add(runs: int) -> list[Figure]:
    """`spool add` from the one-file zipapp (scripts/build) against the venv's `spool add`, same interpreter."""
    spool = ROOT / ".venv" / "bin" / "spool"
    with scratch() as folder:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "build"), "--offline", "--no-deb", "--out",
                        str(folder / "dist")], check=True, capture_output=True)
        zipapp = [sys.executable, str(folder / "dist" / "spool.pyz")]
        env = dict(os.environ, SPOOL_DB=str(folder / "s.db"))
        subprocess.run([str(spool), "add", "warm", "--count", "1"], env=env, check=True)  # schema exists
        ours, base = [], []
        for _ in range(runs):  # interleaved, so drift in machine load hits both alike
            started = time.perf_counter()
            subprocess.run([*zipapp, "add", "bench", "--count", "1"], env=env, check=True)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run([str(spool), "add", "bench", "--count", "1"], env=env, check=True)
            base.append(time.perf_counter() - started)
    a, b = statistics.median(ours), statistics.median(base)
    return [Figure("`spool add` process: zipapp vs venv", a * 1000, b * 1000, "ms", "<= 1.3", a / b,
                   note=f"both on Python {sys.version.split()[0]}; the zipapp's bytecode is for it")]


def fill_backlog(path: Path, n: int) -> None:
    with Spool(path, synchronous="normal") as sp:
        step = 50_000
        for start in range(0, n, step):
            sp.add_many({"stat": f"bench stat {i % 50}", "count": 1, "t": T0 + i}
                        for i in range(start, min(n, start + step)))


def bench_drain(n: int) -> list[Figure]:
    """Drain an n-record backlog to the test receiver against a bare requests loop posting the same batches."""
    import requests

    with scratch() as folder, Receiver() as receiver:
        db = folder / "s.db"
        fill_backlog(db, n)
        # the drain itself, not the pacing, is measured
        config = bench_config(db, receiver.url, synchronous="full", max_requests_per_second=0)
        started = time.perf_counter()
        with Store(db) as store, Shipper(store, config) as shipper:
            assert shipper.drain().done
        ours = time.perf_counter() - started
        assert len(receiver.accepted) == n
        bodies = [json.dumps({"ezkey": "bench-key", "data": [
            {"stat": f"bench stat {i % 50}", "count": 1, "t": T0 + i} for i in range(s, min(n, s + 500))]},
            separators=(",", ":")).encode() for s in range(0, n, 500)]
        receiver.accepted.clear()
        session = requests.Session()
        started = time.perf_counter()
        for body in bodies:
            response = session.post(f"{receiver.url}/ez", data=body, headers={"Content-Type": "application/json"})
            response.raise_for_status()
        base = time.perf_counter() - started
        session.close()
    return [Figure(f"drain of a {n}-record backlog to the test receiver", n / ours, n / base, "records/s",
                   ">= 0.8", base / ours)]


def bench_pipeline(n: int) -> list[Figure]:
    """Drain through a receiver 300 ms away: requests in flight (the default) against one at a time."""
    def drain(max_in_flight: int) -> float:
        with scratch() as folder, Receiver() as receiver:
            receiver.latency = 0.3
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
    return [Figure(f"drain of {n} records through a 300 ms link (max_in_flight {default.max_in_flight}, "
                   f"{default.max_requests_per_second:g} req/s)", ours, serial, "records/s", ">= 4", ours / serial,
                   note="baseline: the same drain with max_in_flight = 1, in the same run")]


def bench_livelock(n: int) -> list[Figure]:
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
                receiver.stall_next(1, seconds=3)
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
                   None, "s", "<= 60", took, note="all clean records delivered, exactly the poison dead")]


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
    return [Figure(f"peak RSS draining {large} vs {small} backlog", a, b, "MiB", "<= 1.2", a / b),
            Figure(f"peak RSS draining {large} backlog", a, None, "MiB", "<= 80", a)]


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
    return [Figure(f"ingest of a {n}-line JSONL file", n / a, n / b, "records/s", ">= 0.6", b / a)]


DISK_CHILD = """
import sys, time
from spool import Spool
from spool.config import Config
from spool.ship import Shipper
from spool.store import Store
def written():
    return int(next(l for l in open("/proc/self/io") if l.startswith("write_bytes")).split()[1])
db, url, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = written()
with Spool(db) as sp:
    for start in range(0, n, 500):
        sp.add_many({"stat": f"s{i % 50}", "count": 1, "t": 1700000000 + i} for i in range(start, start + 500))
config = Config().replace(**{"spool.path": db, "endpoint": url, "ezkey": "k", "max_requests_per_second": 0})
with Store(db) as store, Shipper(store, config) as shipper:
    assert shipper.drain().done
    store.prune_sent(sent_before=time.time() + 1)
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
import os; os.sync()
print(written() - before)
"""


def bench_disk(n: int) -> list[Figure]:
    """Bytes written to storage per record over its life: batched append, ship, prune."""
    with scratch() as folder, Receiver() as receiver:
        out = subprocess.run([sys.executable, "-c", DISK_CHILD, str(folder / "s.db"), receiver.url, str(n)],
                             check=True, capture_output=True, text=True, cwd=ROOT).stdout
    per_record = int(out.split()[-1]) / n
    return [Figure("disk bytes written per record (append, ship, prune)", per_record, None, "B", "<= 512",
                   per_record)]


def bench_idle(seconds: float) -> list[Figure]:
    """CPU used by an idle `spool run` (shipper and one watched directory) over a period."""
    with scratch() as folder, Receiver() as receiver:
        drop = folder / "drop"
        drop.mkdir()
        config = folder / "spool.toml"
        config.write_text(f'[ship]\nendpoint = "{receiver.url}"\nezkey = "k"\n[[watch]]\npath = "{drop}"\n')
        agent = subprocess.Popen([str(ROOT / ".venv" / "bin" / "spool"), "--db", str(folder / "s.db"),
                                  "--config", str(config), "run"], stderr=subprocess.DEVNULL)
        time.sleep(3)  # start-up is not idling
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
    return [Figure(f"idle `spool run` CPU over {seconds:g} s", percent, None, "% of a core", "<= 0.5", percent)]


RELAY_LOAD = """
import http.client, sys, threading, time
host, port, clients, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
body = "ezkey=k&stat=bench&count=1&t=1700000000"
def client():
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for _ in range(each):
        conn.request("POST", "/ez", body, {"Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 204, answer.status
threads = [threading.Thread(target=client) for _ in range(clients)]
started = time.perf_counter()
for t in threads: t.start()
for t in threads: t.join()
print(clients * each / (time.perf_counter() - started))
"""


def bench_relay(each: int, repeat: int) -> list[Figure]:
    """Durable single-stat requests/s through the relay, 16 clients, beside the same server not spooling."""
    from spool.config import RelaySettings
    from spool.relay import Relay

    class NotSpooling:  # the baseline: the same server and parsing, answering without committing anything
        commits, last_error = 0, None

        def write(self, rows: Any) -> None:
            pass

        def stop(self) -> None:
            pass

    def rate(spooling: bool) -> float:
        with scratch() as folder, Store(folder / "s.db") as store:
            relay = Relay(RelaySettings(enabled=True, listen="127.0.0.1:0", max_connections=64), store)
            if not spooling:
                relay.writer.stop()
                relay.writer = NotSpooling()  # type: ignore[assignment]
            relay.start()
            try:
                host, port = relay.server.server_address[:2]
                out = subprocess.run([sys.executable, "-c", RELAY_LOAD, host, str(port), "16", str(each)],
                                     check=True, capture_output=True, text=True).stdout
            finally:
                relay.stop()
            return float(out.split()[-1])

    ours = statistics.median(rate(True) for _ in range(repeat))
    base = statistics.median(rate(False) for _ in range(repeat))
    return [Figure("relay: durable requests/s, 16 concurrent clients", ours, base, "requests/s", ">= 0.7",
                   ours / base)]


# -- running --------------------------------------------------------------------------------------------


def suite(quick: bool) -> dict[str, Callable[[], list[Figure]]]:
    if quick:
        return {
            "append_batched": lambda: bench_append_batched(5_000, 1),
            "append_single": lambda: bench_append_single(50, 1),
            "add_process": lambda: bench_add_process(2),
            "zipapp_add": lambda: bench_zipapp_add(2),
            "drain": lambda: bench_drain(2_000),
            "pipeline": lambda: bench_pipeline(2_000),
            "livelock": lambda: bench_livelock(300),
            "memory": lambda: bench_memory(1_000, 3_000),
            "ingest": lambda: bench_ingest(5_000, 1),
            "disk": lambda: bench_disk(2_000),
            "idle": lambda: bench_idle(1),
            "relay": lambda: bench_relay(20, 1),
        }
    return {
        "append_batched": lambda: bench_append_batched(200_000, 5),
        "append_single": lambda: bench_append_single(2_000, 5),
        "peers": lambda: bench_peers(2_000, 3),
        "add_process": lambda: bench_add_process(30),
        "zipapp_add": lambda: bench_zipapp_add(30),
        "drain": lambda: bench_drain(1_000_000),
        "pipeline": lambda: bench_pipeline(50_000),
        "livelock": lambda: bench_livelock(3_000),
        "memory": lambda: bench_memory(100_000, 1_000_000),
        "ingest": lambda: bench_ingest(1_000_000, 3),
        "disk": lambda: bench_disk(100_000),
        "idle": lambda: bench_idle(30),
        "relay": lambda: bench_relay(500, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--only", help="comma-separated figure groups to run")
    args = parser.parse_args()
    import compileall

    compileall.compile_dir(str(ROOT / "spool"), quiet=1)  # as an installed package is; PYTHONDONTWRITEBYTECODE
    benches = suite(args.quick)
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


def format_row(row: dict[str, Any]) -> str:
    baseline = "" if row["baseline"] is None else f" vs {row['baseline']:,.1f}"
    verdict = "met" if row["met"] else "MISSED"
    return (f"{row['figure']:<62} {row['ours']:>12,.1f}{baseline:<16} {row['unit']:<10} "
            f"ratio {row['ratio']:.2f} (target {row['target']}) {verdict}")


if __name__ == "__main__":
    sys.exit(main())
