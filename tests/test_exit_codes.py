"""Exit statuses cron can trust: `ship --once` says by its status whether anything it could not deliver is left,
and whether a later run will deliver it (1: the link failed) or only an operator can (2: no key, a key unreadable
or refused, the clock, an endpoint that cannot work, records the receiver refused). 0: nothing is left.

Real processes (`python -m spool`), a real receiver on loopback, real spool files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from spool import Spool

from .helpers import T0, TEST_EZKEY, cli_env, run_cli

DELIVERED, LINK, OPERATOR = 0, 1, 2


def backlog(db, *stats, ezkey=None):
    with Spool(db) as sp:
        for i, stat in enumerate(stats):
            sp.count(stat, 1, t=T0 + i, ezkey=ezkey)


def ship_once(db, *args, **env):
    result = run_cli(db, "ship", "--once", *args, env=cli_env(db, **env), timeout=60)
    assert "Traceback" not in result.stderr, result.stderr
    return result


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_everything_delivered_is_0(db, receiver):
    backlog(db, "a", "b")
    result = ship_once(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == DELIVERED, result.stderr
    assert "shipped 2, dead 0" in result.stderr and len(receiver.accepted) == 2


def test_an_empty_spool_is_0(db, receiver):
    backlog(db)
    assert ship_once(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url).returncode == DELIVERED


def test_records_without_a_key_while_none_is_configured_wait_for_an_operator(db, receiver):
    # It was `shipped 0, dead 0`, a warning, and 0: cron never noticed a box that delivered nothing for days.
    backlog(db, "keyless")
    backlog(db, "own key", ezkey="its-own-key")
    result = ship_once(db, SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == OPERATOR, result.stderr
    assert [a["stat"] for a in receiver.accepted] == ["own key"]
    line = last_line(result)
    assert line.startswith("spool: error: 1 record still pending:") and "no ezkey" in line, line
    assert "ship.ezkey_file" in line


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_key_file_waits_for_an_operator(db, receiver, tmp_path, content):
    key = tmp_path / "ezkey"
    key.write_text(content)
    key.chmod(0o600)
    backlog(db, "s")
    result = ship_once(db, SPOOL_EZKEY_FILE=str(key), SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == OPERATOR, result.stderr
    assert "is empty" in last_line(result) and receiver.requests == 0


def test_a_refused_key_waits_for_an_operator(db, receiver):
    receiver.refuse_key("revoked-key-0123")
    backlog(db, "s")
    result = ship_once(db, SPOOL_EZKEY="revoked-key-0123", SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == OPERATOR, result.stderr
    assert "refused the configured ezkey" in last_line(result)
    assert "revoked-key-0123" not in result.stderr


def test_an_endpoint_that_cannot_work_waits_for_an_operator(db, receiver):
    backlog(db, "s")
    result = ship_once(db, "--max-time", "300", SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url + "/api")
    assert result.returncode == OPERATOR, result.stderr
    assert "HTTP 404" in last_line(result)


def test_records_the_receiver_refused_need_an_operator_though_the_rest_was_delivered(db, receiver):
    receiver.refuse_stat("bad *")
    backlog(db, "good", "bad name")
    result = ship_once(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == OPERATOR, result.stderr
    assert [a["stat"] for a in receiver.accepted] == ["good"]
    assert "1 record refused by the receiver (see `spool dead list`)" in last_line(result)


def test_a_failing_link_is_1_and_says_a_later_run_retries(db, receiver):
    receiver.fail_next(100_000)
    backlog(db, "s")
    result = ship_once(db, "--max-time", "1", SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == LINK, result.stderr
    line = last_line(result)
    assert "1 record still pending: stopped after 1 s; last error: HTTP 503" in line and "later run" in line, line


def test_an_unreachable_receiver_is_the_link_not_the_operator(db):
    backlog(db, "s")
    result = ship_once(db, "--max-time", "1", SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT="http://127.0.0.1:9")
    assert result.returncode == LINK, result.stderr


def test_an_operators_reason_wins_over_the_links(db, receiver):
    receiver.fail_next(100_000)
    backlog(db, "keyless")
    backlog(db, "own key", ezkey="its-own-key")
    result = ship_once(db, "--max-time", "1", SPOOL_ENDPOINT=receiver.url)
    assert result.returncode == OPERATOR, result.stderr
    line = last_line(result)
    assert "no ezkey" in line and "HTTP 503" in line, line


@pytest.mark.skipif(shutil.which("faketime") is None, reason="faketime (libfaketime) is not installed")
def test_records_held_while_the_clock_is_still_wrong_wait_for_an_operator(db, receiver):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url, DONT_FAKE_MONOTONIC="1")

    def in_2000(*args):
        return subprocess.run(["faketime", "2000-01-01 00:00:00", sys.executable, "-m", "spool", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    assert in_2000("add", "before ntp", "--count", "1").returncode == 0
    result = in_2000("ship", "--once")
    assert result.returncode == OPERATOR, result.stderr
    assert "held until it is right (start NTP" in last_line(result), result.stderr
    assert receiver.accepted == []
    assert ship_once(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url).returncode == DELIVERED  # NTP came
    assert [a["stat"] for a in receiver.accepted] == ["before ntp"]


def test_the_readme_documents_each_exit_status_of_ship_once():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme[readme.index("## CLI reference"):readme.index("## Configuration")]
    row = next(line for line in reference.splitlines() if line.startswith("| `spool ship --once"))
    for status, words in ((0, "nothing"), (1, "link"), (2, "operator")):
        assert f"exit {status}" in row and words in row, row
