"""Every time spool accepts, up to 2100, goes through every path that reads or writes one on a 32-bit time_t.

Debian's armhf has a 32-bit time_t: there the C library's calendar functions (time.gmtime, strftime of a time,
datetime.fromtimestamp...) raise past 2038-01-19T03:14:07Z, while spool accepts `t` up to 2100. The CLI tests
run spool under tests/fixtures/time32, which gives this Python armhf's limit, so that a conversion through
time_t fails here as it would there; the guard keeps every such conversion in spool.clock, which uses datetime
arithmetic from the epoch instead. scripts/arm-check runs the same paths on a real armhf root file system.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spool import clock
from spool.api import parse_when
from spool.stathat import retry_after_seconds

from .helpers import TEST_EZKEY, cli_env, run_cli

ROOT = Path(__file__).resolve().parent.parent
TIME32 = Path(__file__).resolve().parent / "fixtures" / "time32"
Y2038 = 2**31  # 2038-01-19T03:14:08Z: the first second a 32-bit time_t cannot hold
LAST = 4_102_444_799  # 2099-12-31T23:59:59Z: the last second spool accepts


def env32(db: Path, **extra: str) -> dict[str, str]:
    """A `spool` subprocess's environment, on a Python with a 32-bit time_t."""
    return cli_env(db, PYTHONPATH=str(TIME32), **extra)


def test_the_32_bit_time_fixture_makes_gmtime_past_2038_raise(db):
    """The premise of the tests below: in their subprocesses, converting a time past 2038 through time_t raises."""
    probe = "import time; time.gmtime(2**31 - 1); time.gmtime(2**31)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env32(db), timeout=60)
    assert "OverflowError: timestamp out of range for platform time_t" in result.stderr


def test_status_shows_a_record_dated_after_2038_on_a_32_bit_time_t(db):
    assert run_cli(db, "add", "y2038", "--count", "1", "--t", str(Y2038), env=env32(db)).returncode == 0
    result = run_cli(db, "status", env=env32(db, SPOOL_EZKEY=TEST_EZKEY))  # healthy: a key, nothing waits long
    assert result.returncode == 0, result.stderr
    assert "oldest 2038-01-19 03:14:08 UTC" in result.stdout


def test_the_last_second_spool_accepts_goes_through_add_status_export_ship_dead_list_and_replay(db, receiver,
                                                                                               tmp_path):
    env = env32(db, SPOOL_EZKEY=TEST_EZKEY)
    assert run_cli(db, "add", "y2038 kept", "--count", "3", "--t", "2038-01-19T04:14:08+01:00",
                   env=env).returncode == 0  # the first appended: the next to ship, whose time status shows
    assert run_cli(db, "add", "y2100 kept", "--value", "1.5", "--t", "2099-12-31T23:59:59", env=env).returncode == 0
    assert run_cli(db, "add", "y2100 refused", "--count", "2", "--t", str(LAST), env=env).returncode == 0
    status = run_cli(db, "status", env=env)
    assert status.returncode == 0, status.stderr
    assert "oldest 2038-01-19 03:14:08 UTC" in status.stdout

    exported = tmp_path / "exported.jsonl"
    result = run_cli(db, "export", "--state", "pending", "--since", "2099-12-31T23:59:59", "--until", "2100-01-01",
                     str(exported), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted((r["stat"], r["t"]) for r in map(json.loads, exported.read_text().splitlines())) == [
        ("y2100 kept", LAST), ("y2100 refused", LAST)]

    receiver.refuse_stat("y2100 refused")
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, env=env)
    assert result.returncode == 2, result.stderr  # the rest delivered; the refused record is for an operator
    assert "1 record refused by the receiver" in result.stderr.splitlines()[-1]
    assert sorted(receiver.stats()) == [("y2038 kept", "count", 3, Y2038, TEST_EZKEY),
                                        ("y2100 kept", "value", 1.5, LAST, TEST_EZKEY)]
    dead = run_cli(db, "dead", "list", env=env)
    assert dead.returncode == 0, dead.stderr
    assert f"t={LAST}" in dead.stdout

    result = run_cli(db, "replay", "--since", "2038-01-19T03:14:08Z", "--until", "2038-01-19T03:14:08", "--dry-run",
                     env=env)
    assert result.returncode == 0, result.stderr
    assert "would queue 1 sent record" in result.stderr


def test_times_past_2038_are_parsed_and_formatted_exactly_by_arithmetic():
    for t in (Y2038 - 1, Y2038, 3_000_000_000, 4_000_000_000, LAST):
        text = clock.utc_text(t, "%Y-%m-%dT%H:%M:%S")
        assert parse_when(text) == t
        assert parse_when(f"{text}+00:00") == t
    assert clock.utc_text(Y2038) == "2038-01-19 03:14:08 UTC"
    assert clock.utc_text(LAST) == "2099-12-31 23:59:59 UTC"
    assert parse_when("2100-01-01") == LAST + 1
    assert parse_when("2038-01-19T05:14:08+02:00") == Y2038


def test_a_retry_after_date_with_no_zone_is_utc_past_2038_too(monkeypatch):
    """RFC 5322's "-0000" is UTC with no local zone known; it is not this box's local time."""
    import time

    monkeypatch.setenv("TZ", "JST-9")  # nine hours east of UTC, with no tzdata needed
    time.tzset()
    try:
        assert retry_after_seconds("Fri, 31 Dec 2099 23:59:00 -0000", now=LAST - 59 - 30) == 30
        assert retry_after_seconds("Tue, 19 Jan 2038 03:14:08 GMT", now=Y2038 - 5) == 5
    finally:
        monkeypatch.undo()
        time.tzset()


# Calls that convert a time through the platform's time_t: only spool.clock may make them (it makes none).
THROUGH_TIME_T = frozenset({"gmtime", "localtime", "ctime", "asctime", "strftime", "mktime", "timegm",
                            "fromtimestamp", "utcfromtimestamp", "timestamp", "astimezone", "strptime"})


def time_t_calls(source: str) -> list[tuple[int, str]]:
    """The lines and names of every attribute or name in `source` that converts through time_t."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in THROUGH_TIME_T:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.Name) and node.id in THROUGH_TIME_T:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.ImportFrom):
            found.extend((node.lineno, alias.name) for alias in node.names if alias.name in THROUGH_TIME_T)
    return found


def test_only_spool_clock_converts_times_and_never_through_time_t():
    helper = ROOT / "spool" / "clock.py"
    offenders = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in sorted((ROOT / "spool").rglob("*.py"))
                 if path != helper for line, name in time_t_calls(path.read_text())]
    assert offenders == [], "convert times with spool.clock (datetime arithmetic), not through a 32-bit time_t"
    assert {name for _, name in time_t_calls(helper.read_text())} <= {"strftime"}  # of a datetime: no time_t


@pytest.mark.parametrize("source", ["time.gmtime(t)", "from time import localtime", "datetime.fromtimestamp(t)",
                                    "when.timestamp()", "time.strftime('%Y', time.gmtime())"])
def test_the_guard_finds_a_conversion_through_time_t(source):
    assert time_t_calls(source)
