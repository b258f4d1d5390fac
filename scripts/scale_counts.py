#!/usr/bin/env python3
"""What the operator's and the bounds' reads cost on a large backlog: status, a bounded `spool add`, the end of
`ship --once`, dead list, /healthz and /metrics.

    scripts/scale_counts.py                   # 1M pending records (about a minute to build)
    scripts/scale_counts.py --records 5000000 --keep /tmp/spool-5m.db

The spool is built with the API's append in batches of 50,000 (1,000 stat names, one record a second), kept
at --keep if given (a later run with the same --keep reuses it); each run measures a fresh copy of it. Each
figure is the median of several runs; CLI figures are whole processes (`python -m spool`), so they include
the interpreter's start.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # PYTHONPATH (another checkout, to compare) comes first

from spool import Spool  # noqa: E402
from spool.config import Config  # noqa: E402
from spool.metrics import Metrics  # noqa: E402
from spool.records import make_record  # noqa: E402
from spool.store import Store  # noqa: E402
from spool.testing import Receiver  # noqa: E402

T0 = 1_700_000_000


def build(path: Path, n: int) -> None:
    with Spool(path, synchronous="normal") as sp:
        step = 50_000
        for start in range(0, n, step):
            sp.add_many({"stat": f"scale stat {i % 1000}", "count": 1, "t": T0 + i}
                        for i in range(start, min(n, start + step)))


def median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cli(db: Path, config: Path, *args: str, check: bool = True) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
    env.update(SPOOL_DB=str(db), SPOOL_CONFIG=str(config), SPOOL_EZKEY="scale-key")
    done = subprocess.run([sys.executable, "-m", "spool", *args], env=env, capture_output=True, text=True)
    if check and done.returncode:
        raise SystemExit(f"spool {' '.join(args)} failed: {done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="build the spool here (reused when it exists)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spool-scale-") as scratch:
        folder = Path(scratch)
        source = args.keep or folder / "built.db"
        if not source.exists():
            started = time.perf_counter()
            build(source, args.records)
            print(f"built {args.records:,} pending records in {time.perf_counter() - started:.1f} s", flush=True)
        db = folder / "s.db"
        with contextlib.closing(sqlite3.connect(source)) as conn:  # into the one file (not Store: no migration)
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copyfile(source, db)  # the measurements change it: a copy, so every run starts alike
        plain = folder / "plain.toml"
        plain.write_text("[ship]\nmax_requests_per_second = 0\nreconnect_jitter = 0\n")
        bounded = folder / "bounded.toml"
        bounded.write_text(f"[spool]\nmax_pending = {args.records * 10}\n"
                           "[ship]\nmax_requests_per_second = 0\nreconnect_jitter = 0\n")
        cli(db, plain, "status")  # opens (and migrates) once, untimed
        with Store(db) as store:
            pending = store.counts()["pending"]
        rows: list[tuple[str, float, str]] = []
        rows.append(("`spool status` (process)", median(lambda: cli(db, plain, "status"), args.runs), "s"))
        rows.append(("`spool add` with max_pending set (process)",
                     median(lambda: cli(db, bounded, "add", "scale add", "--count", "1"), args.runs), "s"))
        rows.append(("`spool dead list` (process, none dead)",
                     median(lambda: cli(db, plain, "dead", "list"), args.runs), "s"))
        limits = Config().replace(**{"spool.max_pending": args.records * 10}).spool
        record = make_record(stat="scale append", count=1, t=T0)
        with Store(db, limits=limits) as store:
            rows.append(("one append with max_pending set (API)",
                         median(lambda: store.append([record]), args.runs * 4) * 1000, "ms"))
        with Store(db) as store:
            rows.append(("one append, unbounded (API: append_one)",
                         median(lambda: store.append_one(record), args.runs * 4) * 1000, "ms"))
            metrics = Metrics(store)

            def first_scrape() -> bytes:
                if hasattr(metrics, "_counts"):  # releases that cached a full count for 30 s: forget it
                    metrics._counts = None
                return metrics.render()

            rows.append(("/healthz (Metrics.health)", median(metrics.health, args.runs) * 1000, "ms"))
            rows.append(("/metrics first scrape (Metrics.render)", median(first_scrape, args.runs) * 1000, "ms"))
        with Receiver() as receiver:
            # Ships for a second, then counts what is left and returns: the time past that second is the end.
            took = median(lambda: cli(db, plain, "ship", "--once", "--max-time", "1", "--endpoint", receiver.url,
                                      check=False), 3)
            rows.append(("`spool ship --once --max-time 1` (process): past the 1 s of shipping", took - 1.0, "s"))
        print(f"\n{pending:,} pending records ({db.stat().st_size / 1048576:.0f} MiB), median of {args.runs} runs\n")
        for name, value, unit in rows:
            print(f"| {name} | {value:.3f} {unit} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
