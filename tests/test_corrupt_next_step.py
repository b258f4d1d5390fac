"""A spool file that is not a sound database gives the next step wherever it is met: every command that opens it
says, in its one error line, that `spool run` moves it aside (and starts a fresh spool) or that it can be moved
aside by hand, never only SQLite's `file is not a database`; doctor says it in its spool check; the library's
error says the same. Nothing is written to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3

import pytest

from spool import Spool
from spool.errors import SpoolCorrupt

from .helpers import T0, TEST_EZKEY, cli_env, damage_spool, run_cli, spawn_cli, stop_agent, wait_for_line

NEXT_STEP = "(re)start `spool run`, which moves it aside as spool.db.corrupt-<time> and starts a fresh spool"
BY_HAND = "or move spool.db and its -wal and -shm files aside yourself"


def text_file(db):
    db.write_text("these are notes, not a database\n" * 40)


def random_bytes(db):
    db.write_bytes(hashlib.sha256(b"seed").digest() * 200)


def damaged_header(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(100))
    damage_spool(db, "header")


def cut_short(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(3000))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(db, "r+b") as f:
        f.truncate(8192)


FILES = {"a text file": text_file, "random bytes": random_bytes, "a damaged header": damaged_header,
         "a spool cut short": cut_short}
COMMANDS = [("status",), ("status", "--json"), ("add", "s", "--count", "1"), ("import", "-"), ("export", "-"),
            ("export", "--state", "all", "OUT"), ("dead", "list"), ("dead", "requeue", "--all"),
            ("replay", "--since", "2020-01-01"), ("ship", "--once", "--max-time", "5"), ("ingest", "IN")]


@pytest.mark.parametrize("make", list(FILES.values()), ids=list(FILES))
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_every_command_on_a_spool_that_is_not_a_database_says_what_to_do(db, tmp_path, make, command):
    make(db)
    before = db.read_bytes()
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "in.jsonl").write_text('{"stat": "dropped", "count": 1}\n')
    args = [str(tmp_path / "out.jsonl") if a == "OUT" else str(drop / "in.jsonl") if a == "IN" else a
            for a in command]
    result = run_cli(db, *args, input=b'{"stat": "s", "count": 1}\n',
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT="http://127.0.0.1:9"))
    # status and ship --once exit 2, "failing: an operator must act" (cron must not read it as a link that failed);
    # every other command fails as any error does.
    assert result.returncode == (2 if command[0] in ("status", "ship") else 1), result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"spool: error: spool {db} is not a usable spool database ("), line
    assert NEXT_STEP in line and BY_HAND in line, line
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert db.read_bytes() == before  # nothing written to it
    assert not list(tmp_path.glob("spool.db.corrupt-*"))  # moved aside only by `spool run`


@pytest.mark.parametrize("make", list(FILES.values()), ids=list(FILES))
def test_doctor_says_what_to_do_in_its_spool_check(db, make):
    make(db)
    result = run_cli(db, "doctor", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT="http://127.0.0.1:9"))
    [line] = [row for row in result.stdout.splitlines() if row.startswith("FAIL spool:")]
    assert NEXT_STEP in line and "fix: `spool run` moves a corrupt spool aside" in line, line


@pytest.mark.parametrize("make", list(FILES.values()), ids=list(FILES))
def test_the_librarys_error_says_what_to_do(db, make):
    make(db)
    with pytest.raises(SpoolCorrupt) as caught:
        Spool(db)
    assert NEXT_STEP in str(caught.value) and BY_HAND in str(caught.value)


def test_spool_run_moves_a_text_file_aside_and_status_then_notes_it(db, tmp_path):
    text_file(db)
    config = tmp_path / "stop.toml"
    config.write_text("[ship]\nreconnect_jitter = 0\n")
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_ENDPOINT="http://127.0.0.1:9"))
    try:
        line = wait_for_line(agent, "was corrupt")[-1]
        wait_for_line(agent, "shipping ")  # running, its signal handlers set
    finally:
        stop_agent(agent)
    assert "moved it to spool.db.corrupt-" in line and "started a fresh spool" in line, line
    [moved] = tmp_path.glob("spool.db.corrupt-*")
    assert moved.read_text().startswith("these are notes")
    report = json.loads(run_cli(db, "status", "--json").stdout)
    assert report["notes"] == ["1 corrupt spool files moved aside"] and report["counters"]["corrupt_quarantined"] == 1
