"""The benchmark's smoke mode runs, so scripts/bench.py cannot rot (figures are not asserted: machines are noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_benchmark_runs_in_quick_mode_and_reports_every_figure_beside_its_baseline():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    names = " | ".join(row["figure"] for row in report["figures"])
    for expected in ["batched append", "single-record append", "`spool add` process", "zipapp vs venv", "drain",
                     "CPU seconds per 1,000 shipped records", "peak RSS", "ingest",
                     "disk bytes written per record (500 records per commit", "(one record per commit",
                     "idle `spool run` CPU", "relay: durable requests/s", "-> 204", "vb=1", "JSON batch"]:
        assert expected in names
    for row in report["figures"]:
        assert row["ours"] > 0 or "CPU" in row["figure"], row
        assert row["target"] is None or row["target"].split()[0] in (">=", "<=")
        assert row["conditions"], row  # every figure says what it was measured against


def test_the_housekeeping_benchmark_runs_on_a_small_spool(tmp_path):
    import os

    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_housekeeping.py"), "3000",
                             "--only", "prune,dead,export,compact,space", "--cap", "60"],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "SPOOL_BENCH_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    for expected in ["prune_sent, nothing old enough", "`spool dead list`", "`spool export",
                     "longest write transaction", "the whole pass", "`spool add` during compaction",
                     "after release_space"]:
        assert expected in result.stdout, result.stdout
