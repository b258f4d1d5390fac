"""The fleet simulation's smoke mode runs, so scripts/fleet.py cannot rot (its figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "fleet.py"), "--quick", *args],
                          capture_output=True, text=True, timeout=300)


def test_a_tiny_fleet_drains_every_scenario_into_the_capacity_limited_receiver_and_draws_it(tmp_path):
    picture = tmp_path / "fleet.png"
    result = fleet("--json", "--plot", str(picture))
    if importlib.util.find_spec("matplotlib") is None:  # the bench extra is not installed: one clear line
        assert result.returncode == 2 and "pip install -e '.[bench]'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        result = fleet("--json")
    else:
        assert picture.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    setup = report["fleet"]
    assert [r["settings"]["max_requests_per_second"] for r in report["results"]] == [
        0, 20, setup["capacity"] / setup["agents"], 2 * setup["capacity"] / setup["agents"]]
    for row in report["results"]:
        assert row["drained_seconds"] is not None and row["bulk_seconds"] is not None, row["scenario"]
        assert row["records"] == setup["agents"] * setup["backlog"]
        assert row["series"][-1]["backlog"] == 0
        batches = -(-setup["backlog"] // setup["batch_size"])
        assert sum(second["answered"] for second in row["series"]) >= setup["agents"] * batches
        assert row["refused"] == row["requests"] - sum(second["answered"] for second in row["series"])
        # the receiver's capacity is a token bucket: no second answers more than the rate plus the burst
        assert row["peak_answered"] <= setup["capacity"] + setup["burst"]
        assert row["peak_offered"] >= row["peak_answered"] > 0
