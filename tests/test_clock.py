"""Clock sanity for every way of shipping: held records are re-stamped by `ship --once` too, and checked.

The wrong clocks are real: `faketime` (libfaketime) runs a producer whose wall clock says 2000-01-01, with
its monotonic clocks either true (a box without a real-time clock before NTP) or faked as well (a monotonic
clock that jumped, which would re-stamp a record decades away).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from spool.store import Store

from .helpers import T0, TEST_EZKEY, cli_env, run_cli

pytestmark = pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime (libfaketime) is not installed")


def add_in_2000(db, stat, *, fake_monotonic=False):
    env = cli_env(db)
    if not fake_monotonic:
        env["DONT_FAKE_MONOTONIC"] = "1"  # the wall clock is wrong, CLOCK_BOOTTIME is true
    result = subprocess.run(["faketime", "2000-01-01 00:00:00", sys.executable, "-m", "spool", "add", stat,
                             "--count", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_ship_once_restamps_records_held_while_the_clock_was_wrong_and_ships_them(db, receiver):
    add_in_2000(db, "before ntp")
    with Store(db) as store:
        assert store.counts()["held"] == 1
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert "shipped 1" in result.stderr
    [got] = receiver.accepted
    assert got["stat"] == "before ntp" and got["t"] > T0  # the true time of the add, not 2000
    with Store(db) as store:
        assert store.counts()["held"] == 0 and store.counters()["restamped"] == 1


def test_a_restamp_that_would_land_in_the_future_is_a_dead_letter_with_the_reason(db, receiver):
    add_in_2000(db, "jumped", fake_monotonic=True)  # its CLOCK_BOOTTIME said 946684800 s since boot
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", env=env)
    assert result.returncode == 2, result.stderr  # a dead letter: an operator must look
    assert "shipped 0, dead 1" in result.stderr
    assert receiver.accepted == []  # never shipped with a t decades away
    [dead] = [json.loads(line) for line in run_cli(db, "dead", "list", "--json").stdout.splitlines()]
    assert dead["stat"] == "jumped" and "in the future or before the floor" in dead["reason"]
    status = json.loads(run_cli(db, "status", "--json", env=env).stdout)
    assert status["counters"]["restamp_refused"] == 1 and status["held"] == 0


def test_a_restamp_that_would_land_before_the_floor_is_a_dead_letter(db, receiver):
    add_in_2000(db, "too early")
    with Store(db) as store:  # as if the boot clock had run far ahead between the add and now
        store.conn.execute("UPDATE held SET mono = mono - 2e9")
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "ship", "--once", env=env).returncode == 2  # a dead letter: an operator must look
    assert receiver.accepted == []
    assert "before the floor" in run_cli(db, "dead", "list").stdout


def test_a_dropped_file_read_while_the_clock_is_wrong_has_its_undated_records_held_not_dated_2000(db, tmp_path):
    dropped = tmp_path / "undated.jsonl"
    dropped.write_text('{"stat": "undated", "count": 1}\n' + json.dumps({"stat": "dated", "count": 1, "t": T0}) + "\n")
    env = {**cli_env(db), "DONT_FAKE_MONOTONIC": "1"}
    result = subprocess.run(["faketime", "2000-01-01 00:00:00", sys.executable, "-m", "spool", "ingest",
                             str(dropped)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with Store(db) as store:
        assert {r.stat: s for _, s, r in store.records()} == {"undated": 4, "dated": 0}  # HELD, PENDING
