#!/usr/bin/env python3
"""Agent start-up at scale: from spawning `spool run` to the relay's first 2xx and to the first batch shipped.

    scripts/bench_startup.py                          # 1M records, this checkout, warm and cold page cache
    scripts/bench_startup.py --records 200000 --runs 3
    scripts/bench_startup.py --baseline /path/to/other/checkout   # the same runs, interleaved, with that code

One spool of N pending records (1,000 stat names, built with bulk appends) is copied afresh for every run, so
every start finds the same file. Cases: "unclean" (no clean-stop mark: a crash, a power cut, or the first start
of an agent), "clean" (the mark set, as a clean stop leaves it; older code has no mark and ignores it). "cold"
evicts the copy from the page cache first (posix_fadvise DONTNEED on that file only: the machine's other caches
are left alone); "warm" reads it once first. The receiver is spool.testing's, in this process; no pacing, no
jitter. Each figure is the median of --runs runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _benchlib import ROOT, drop_cache, each_second, fill, free_port, use_project_venv, warm_cache

use_project_venv(__file__)
sys.path.insert(0, str(ROOT))

from spool.testing import Receiver  # noqa: E402

TEST_EZKEY = "bench-ezkey"


def prepare(source: Path, target: Path, *, clean: bool, cold: bool) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{target}{suffix}")
    shutil.copyfile(source, target)
    if clean:  # what a clean stop leaves (raw SQL: older code has no API for it, and ignores it)
        with contextlib.closing(sqlite3.connect(target)) as conn:
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('clean_stop', ?)", (str(time.time()),))
            conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('integrity', ?)",
                         (json.dumps({"state": "sound", "at": time.time()}),))
            conn.commit()
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    drop_cache(target) if cold else warm_cache(target)


def one_start(tree: Path, db: Path, receiver: Receiver, folder: Path) -> tuple[float, float]:
    """Start `spool run` from `tree`; return seconds to the relay's first 2xx and to the first batch received."""
    import requests

    port = free_port()
    config = folder / "bench.toml"
    config.write_text(f'[ship]\nendpoint = "{receiver.url}"\nmax_requests_per_second = 0\nreconnect_jitter = 0\n'
                      f'[relay]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
    env.update(PYTHONPATH=str(tree), SPOOL_DB=str(db), SPOOL_EZKEY=TEST_EZKEY)
    with receiver._lock:
        receiver.accepted.clear()
    relay_at: list[float] = []
    done = threading.Event()

    def poke_relay() -> None:
        session = requests.Session()
        while not done.is_set():
            with contextlib.suppress(requests.RequestException):
                answer = session.post(f"http://127.0.0.1:{port}/ez", timeout=60,
                                      data={"ezkey": TEST_EZKEY, "stat": "bench relay", "count": 1})
                if 200 <= answer.status_code < 300:
                    relay_at.append(time.monotonic())
                    return
            time.sleep(0.005)

    started = time.monotonic()
    agent = subprocess.Popen([sys.executable, "-m", "spool", "--config", str(config), "run"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder)
    poker = threading.Thread(target=poke_relay)
    poker.start()
    try:
        while not receiver.accepted:
            if agent.poll() is not None:
                raise RuntimeError(f"spool run exited {agent.returncode}")
            time.sleep(0.001)
        batch_at = time.monotonic()
        poker.join(120)
    finally:
        done.set()
        agent.send_signal(signal.SIGTERM)
        agent.wait(120)
        poker.join(10)
    return (relay_at[0] - started if relay_at else float("nan")), batch_at - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="another checkout of spool to compare with")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    trees = {"this": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    rows = []
    with tempfile.TemporaryDirectory(prefix="spool-startup-") as scratch, Receiver() as receiver:
        folder = Path(scratch)
        source = folder / "source.db"
        began = time.monotonic()
        fill(source, args.records, names=1000, t=each_second(100))
        print(f"built {args.records:,} records ({source.stat().st_size / 1048576:.0f} MiB) in "
              f"{time.monotonic() - began:.0f} s", file=sys.stderr)
        db = folder / "spool.db"
        for cold in (False, True):
            for clean in (False, True):
                results: dict[str, list[tuple[float, float]]] = {name: [] for name in trees}
                for _ in range(args.runs):
                    for name, tree in trees.items():  # interleaved
                        prepare(source, db, clean=clean, cold=cold)
                        results[name].append(one_start(tree, db, receiver, folder))
                for name, runs in results.items():
                    row = {"code": name, "cache": "cold" if cold else "warm",
                           "last stop": "clean" if clean else "unclean", "records": args.records,
                           "relay 2xx s": round(statistics.median(r[0] for r in runs), 3),
                           "first batch s": round(statistics.median(r[1] for r in runs), 3)}
                    rows.append(row)
                    if not args.json:
                        print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
