#!/usr/bin/env python3
"""Housekeeping on a large backlog: what pruning, dead-letter listing, a bounded export, count compaction, a long
export during a drain, and draining plus pruning cost, on spools of N pending records.

    scripts/bench_housekeeping.py 1000000            # every figure at 1M pending records
    scripts/bench_housekeeping.py 5000000 --only prune,dead,export,compact

Records are realistic: EZ counts of 1,000 stat names at 100 records/s of `t` (so each name has 6 records in a
60 s bucket), default settings. Spools are built once per N and commit into $SPOOL_BENCH_DIR (default: the
temporary directory's spool-hk-bench) and copied for each figure. Run it on two checkouts (before and after a
change) to compare; docs/benchmarks.md has the figures and the commit each came from.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _benchlib import ROOT, T0, each_second, fill, median_of, run_cli, use_project_venv

NAMES = 1000
RATE = 100  # records per second of t

use_project_venv(__file__, bootstrap=False)
sys.path.insert(0, str(ROOT))

from spool.store import Store  # noqa: E402

HEAD = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
# spools are built by (and kept for) this checkout
BENCH_DIR = Path(os.environ.get("SPOOL_BENCH_DIR") or Path(tempfile.gettempdir()) / "spool-hk-bench") / HEAD


def built(n: int) -> Path:
    """A spool of n pending records (built once, kept for later runs)."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"pending-{n}.db"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        fill(partial, n, names=NAMES, t=each_second(RATE))  # closed: its WAL is checkpointed and removed
        os.rename(partial, path)
        print(f"# built {n:,} records in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


@contextlib.contextmanager
def copy_of(n: int, name: str) -> Any:
    target = BENCH_DIR / f"work-{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(built(n), target)
    Store(target).close()  # migrated (if this checkout's schema is newer) before anything is timed
    try:
        yield target
    finally:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{target}{suffix}").unlink(missing_ok=True)


def figure(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"{name:<62} {value:>12,.3f} {unit:<4} {note}", flush=True)


def bench_prune(n: int) -> None:
    with copy_of(n, "prune") as db, Store(db) as store:
        lease = store.lease(1000, now=T0, keyed_only=False)
        assert lease is not None
        store.ack([item.id for item in lease.items], now=time.time(), lease=lease.id)  # sent just now: kept
        figure(f"prune_sent, nothing old enough ({n:,} pending)",
               median_of(lambda: store.prune_sent(sent_before=1.0), 3), "s")


def bench_dead(n: int) -> None:
    with copy_of(n, "dead") as db:
        figure(f"`spool dead list`, no dead letters ({n:,} pending)",
               median_of(lambda: run_cli(db, "dead", "list"), 3), "s", "(a process)")


def bench_export(n: int) -> None:
    with copy_of(n, "export") as db:
        until = T0 + 100_000 // RATE - 1
        figure(f"`spool export --state pending --until T -` (100k of {n:,})",
               median_of(lambda: run_cli(db, "export", "--state", "pending", "--until", str(until), "-"), 3), "s",
               "(a process, to /dev/null)")


COMPACT_CHILD = """
import sys, time
from spool.store import Store
db, cap = sys.argv[1], float(sys.argv[2])
longest, began, transactions = 0.0, [0.0], 0
def trace(sql):
    global longest, transactions
    if sql.startswith("BEGIN IMMEDIATE"):
        began[0] = time.perf_counter()
    elif sql == "COMMIT" and began[0]:
        took = time.perf_counter() - began[0]
        longest = max(longest, took)
        transactions += 1
        began[0] = 0.0
        print(f"tx {took:.4f} {transactions}", flush=True)
try:  # as the agent's housekeeping runs it: the write lock left free between two transactions
    from spool.ship import Gap
    gap = Gap()
    paced = {"between": lambda: gap() or True}
except ImportError:  # a checkout from before compaction had steps
    paced = {}
with Store(db) as store:
    store.conn.set_trace_callback(trace)
    started = time.perf_counter()
    saved = store.compact_counts(bucket=60, **paced)
    print(f"done {time.perf_counter() - started:.3f} {saved} {longest:.4f} {transactions}", flush=True)
"""


def bench_compact(n: int, cap: float) -> None:
    """The longest write transaction of a compaction pass, the whole pass (given up after `cap` s), and the
    longest `spool add` (a process) while it runs."""
    with copy_of(n, "compact") as db:
        alone = sorted(run_cli(db, "add", "before compaction", "--count", "1") for _ in range(5))
        child = subprocess.Popen([sys.executable, "-c", COMPACT_CHILD, str(db), str(cap)], stdout=subprocess.PIPE,
                                 text=True, cwd=ROOT)
        assert child.stdout is not None
        durations: list[float] = []
        done, adds = None, []
        started = time.perf_counter()
        os.set_blocking(child.stdout.fileno(), False)
        buffer = ""
        while child.poll() is None and time.perf_counter() - started < cap:
            adds.append(run_cli(db, "add", "during compaction", "--count", "1", check=False))
            with contextlib.suppress(TypeError):
                buffer += child.stdout.read() or ""
            time.sleep(0.2)
        if child.poll() is None:
            child.kill()
        child.wait()
        with contextlib.suppress(TypeError):
            buffer += child.stdout.read() or ""
        for line in buffer.splitlines():
            fields = line.split()
            if fields[0] == "tx":
                durations.append(float(fields[1]))
            elif fields[0] == "done":
                done = (float(fields[1]), int(fields[2]))
        durations.sort()
        longest = durations[-1] if durations else 0.0
        middle = durations[len(durations) // 2] if durations else 0.0
        p99 = durations[int(len(durations) * 0.99)] if durations else 0.0
        figure(f"compaction: longest write transaction ({n:,} pending counts)", longest, "s",
               f"(median {middle * 1000:.0f} ms, 99th percentile {p99 * 1000:.0f} ms of {len(durations):,} "
               f"transactions{'' if done else f'; stopped after {cap:g} s'})")
        if done:
            figure(f"compaction: the whole pass ({n:,})", done[0], "s", f"({done[1]:,} records merged away)")
        figure("`spool add` alone (the same spool, before): median of 5", alone[2], "s", "(a process)")
        failed = sum(1 for took in adds if took < 0)
        figure(f"`spool add` during compaction: longest of {len(adds)}", max(map(abs, adds), default=0.0), "s",
               f"(a process{f'; {failed} failed: the spool stayed locked past the busy timeout' if failed else ''})")


DRAIN_CHILD = """
import sys
from spool.config import Config
from spool.ship import Shipper
from spool.store import Store
db, url = sys.argv[1], sys.argv[2]
config = Config().replace(**{"spool.path": db, "endpoint": url, "ezkey": "bench-key", "max_requests_per_second": 20,
                             "reconnect_jitter": 0})
with Store.for_config(config) as store, Shipper(store, config) as shipper:
    print("draining", flush=True)
    shipper.drain(max_time=float(sys.argv[3]))
"""


def bench_wal(n: int, seconds: float = 60.0) -> None:
    """The WAL's size after an export lasting `seconds` while a drain (paced, 20 requests/s) runs."""
    from spool import Spool
    from spool.testing import Receiver

    with copy_of(n, "wal") as db, Receiver() as receiver:
        wal = Path(f"{db}-wal")
        drain = subprocess.Popen([sys.executable, "-c", DRAIN_CHILD, str(db), receiver.url, str(seconds * 2)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert drain.stdout is not None
        drain.stdout.readline()
        largest = [0]
        export_n = 100_000
        pause = seconds / export_n

        class Slow:
            def __init__(self) -> None:
                self.lines = 0

            def write(self, text: str) -> None:
                self.lines += 1
                if self.lines % 100 == 0:
                    time.sleep(pause * 100)
                    largest[0] = max(largest[0], wal.stat().st_size if wal.exists() else 0)

        with Spool(db) as sp:
            sp.export(Slow(), state="pending", until=T0 + export_n // RATE - 1)
            export_ended = time.perf_counter()
        after = []
        while drain.poll() is None and time.perf_counter() - export_ended < 10:
            time.sleep(1)
            after.append(wal.stat().st_size if wal.exists() else 0)
        drain.kill()
        drain.wait()
        figure(f"WAL at its largest during a {seconds:g} s export while draining", largest[0] / 2**20, "MiB")
        figure("WAL 10 s after the export ended (drain still running)", after[-1] / 2**20 if after else 0, "MiB")


def bench_space(n: int) -> None:
    """The file after every record was shipped (leased and acked in batches of 500, no HTTP) and pruned, then after
    housekeeping gave back what it frees (`release_space`, where this checkout has it)."""
    with copy_of(n, "space") as db, Store(db) as store:
        before = db.stat().st_size
        while (lease := store.lease(500, now=T0, keyed_only=False)) is not None:
            store.ack([item.id for item in lease.items], now=1000.0, lease=lease.id)
        store.prune_sent(sent_before=2000.0)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        drained = db.stat().st_size
        durations: list[float] = []
        released = 0
        release = getattr(store, "release_space", None)  # one call: it goes on until only a reserve is free
        if release is not None:
            began = [0.0]

            def trace(sql: str) -> None:
                if sql.startswith("BEGIN IMMEDIATE"):
                    began[0] = time.perf_counter()
                elif sql == "COMMIT" and began[0]:
                    durations.append(time.perf_counter() - began[0])

            store.conn.set_trace_callback(trace)
            released = release()
            store.conn.set_trace_callback(None)
            durations = sorted(durations) or [0.0]  # a small spool keeps all its free pages (the reserve)
            store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        mode = store.conn.execute("PRAGMA auto_vacuum").fetchone()[0]
        figure(f"file with {n:,} pending", before / 2**20, "MiB", f"(auto_vacuum={mode})")
        figure("file after draining and pruning them all", drained / 2**20, "MiB")
        if release is not None:
            figure("file after release_space (housekeeping)", db.stat().st_size / 2**20, "MiB",
                   f"({released:,} pages given back in {len(durations):,} transactions: median "
                   f"{durations[len(durations) // 2] * 1000:.0f} ms, 99th percentile "
                   f"{durations[int(len(durations) * 0.99)] * 1000:.0f} ms, longest {durations[-1] * 1000:.0f} ms)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("n", type=int, help="pending records in the spool")
    parser.add_argument("--only", default="prune,dead,export,compact,wal,space")
    parser.add_argument("--cap", type=float, default=300.0, help="seconds after which a compaction pass is given up")
    args = parser.parse_args()
    print(f"# {ROOT} at {HEAD}", flush=True)
    for name in args.only.split(","):
        if name == "compact":
            bench_compact(args.n, args.cap)
        else:
            globals()[f"bench_{name}"](args.n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
