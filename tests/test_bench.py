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
                     "CPU per 1,000 shipped records", "peak RSS", "ingest",
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


SCALE_ROWS = {  # every row of the scale table (docs/benchmarks.md), and whether it has a figure on an empty spool
    "`spool status`": True, "`spool doctor`": True, "`spool dead list`": True, "`spool export": True,
    "one append with `max_pending` set": True, "`spool add` with `max_pending` set": True,
    "agent start → first batch shipped (`spool run`)": True, "first batch shipped, cold cache": True,
    "bytes on disk per pending record": False, "compaction": True, "`/healthz` per probe": True,
    "`/metrics` first scrape": True, "drain rate while one producer appends": False,
    "peak RSS of the agent draining": True,
}


def test_the_scale_table_has_a_figure_for_every_row_at_every_size_and_keeps_the_spools_it_built(tmp_path):
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--scale", "--quick", "--sizes",
                             "0,25k", "--cache", str(cache), "--json"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["sizes"] == [0, 25_000]
    assert len(report["rows"]) == len(SCALE_ROWS)
    for name, on_empty in SCALE_ROWS.items():
        row = next(row for row in report["rows"] if name in row["operation"])
        for size, value in row["values"].items():
            if size == "0" and not on_empty:
                assert value is None, row
            else:
                assert isinstance(value, (int, float)) and value > 0, row
    per_record = next(row for row in report["rows"] if "bytes on disk" in row["operation"])["values"]["25000"]
    assert 10 < per_record < 1000
    assert sorted(p.name for p in cache.iterdir() if "partial" not in p.name and p.suffix == ".db") == [
        "scale-0.db", "scale-25000.db"]
    assert not [p for p in cache.iterdir() if "partial" in p.name]  # nothing of a build is left behind

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import _scale
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    table = _scale.markdown(report).splitlines()
    assert table[0].startswith("| operation | 0 | 25k | growth")
    for name in SCALE_ROWS:
        line = next(line for line in table if line.startswith("| ") and name in line)
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 4, line  # the operation, two sizes, the growth
        assert cells[2][0].isdigit(), line  # a number at 25k
