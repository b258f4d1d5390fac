"""The fleet simulation's smoke mode runs, so scripts/fleet.py cannot rot (its figures are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from spool.config import Config

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
    shipped = Config().ship
    defaults = report["results"][1]
    assert defaults["scenario"].startswith("spool's defaults")
    # spool's defaults are the declared ones: the fleet changes what scales it down, never a pacing setting
    assert {name: defaults["settings"][name] for name in ("pacing", "max_requests_per_second", "max_in_flight")} == {
        "pacing": shipped.pacing, "max_requests_per_second": shipped.max_requests_per_second,
        "max_in_flight": shipped.max_in_flight}
    assert [(r["settings"]["pacing"], r["settings"]["max_requests_per_second"]) for r in report["results"]] == [
        ("adaptive", 0), ("adaptive", 20), ("fixed", 20), ("fixed", 2 * setup["capacity"] / setup["agents"])]
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
        assert set(row["figures"]) == {"refused", "drained", "peak"}


def test_the_sweep_runs_spools_defaults_at_every_point_and_checks_the_three_figures():
    result = fleet("--sweep", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["scenario"].startswith("spool's defaults") and len(report["points"]) == 2
    for point in report["points"]:
        row, setup = point["result"], point["fleet"]
        assert row["drained_seconds"] is not None and row["records"] == setup["agents"] * setup["backlog"]
        ideal = row["ideal_seconds"]
        assert row["figures"] == {"refused": row["refused"] <= 0.1 * row["requests"],
                                  "drained": row["drained_seconds"] <= 1.3 * ideal + 3,
                                  "peak": row["peak_offered"] <= 1.5 * setup["capacity"]}



def test_the_model_runs_spools_own_pacing_law_over_the_sweep_in_seconds():
    result = fleet("--sweep", "--model", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] is True and len(report["points"]) == 2
    for point in report["points"]:
        row, setup = point["result"], point["fleet"]
        batches = -(-setup["backlog"] // setup["batch_size"])
        # every request the agents needed was taken once; each refusal is one more request offered
        assert row["requests"] - row["refused"] == setup["agents"] * batches
        assert row["series"] == [] and row["drained_seconds"] > 0
        assert row["peak_answered"] <= setup["capacity"] + setup["burst"]


def test_the_model_goes_only_with_the_sweep_of_spools_defaults():
    for args in (["--model"], ["--sweep", "--model", "--only", "3"]):
        result = fleet(*args)
        assert result.returncode == 2 and "--model" in result.stderr and "Traceback" not in result.stderr
