"""Moving backlog with `spool export`: never overwrite, never lose, never both in the file and at StatHat."""

from __future__ import annotations

import json
import os
import stat
from collections import Counter

from spool import Spool
from spool.records import HELD_T, make_record
from spool.store import Store
from spool.testing import Receiver

from .helpers import T0, TEST_EZKEY, cli_env, run_cli, spawn_cli, stop_agent, wait_for


def backlog(db, n, stat="s"):
    with Spool(db) as sp:
        sp.add_many({"stat": f"{stat}{i}", "count": 1, "t": T0 + i} for i in range(n))


def stats_in_file(path):
    return Counter(json.loads(line)["stat"] for line in path.read_text().splitlines())


def test_export_remove_refuses_an_existing_file_so_a_first_backlog_is_never_overwritten(db, tmp_path):
    out = tmp_path / "moved.jsonl"
    backlog(db, 10, "first")
    assert run_cli(db, "export", "--remove", str(out)).returncode == 0
    backlog(db, 5, "second")
    again = run_cli(db, "export", "--remove", str(out))
    assert again.returncode == 1
    assert again.stderr == f"spool: error: {out} exists; give another name, or --append to add to it\n"
    assert stats_in_file(out) == Counter({f"first{i}": 1 for i in range(10)})
    with Store(db) as store:
        assert store.counts()["pending"] == 5  # the second backlog is still here


def test_export_append_adds_to_a_file_and_makes_it_private(db, tmp_path):
    out = tmp_path / "moved.jsonl"
    out.write_text("")
    os.chmod(out, 0o644)
    backlog(db, 3)
    assert run_cli(db, "export", "--remove", "--append", str(out)).returncode == 0
    backlog(db, 2, "more")
    assert run_cli(db, "export", "--remove", "--append", str(out)).returncode == 0
    assert sum(stats_in_file(out).values()) == 5
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_export_all_leaves_held_records_in_the_spool_and_says_so(db, tmp_path):
    out = tmp_path / "all.jsonl"
    with Spool(db) as sp:
        sp.append(make_record(stat="held", count=1, clock_now=HELD_T))  # stamped while the clock was wrong
        sp.count("timed", 1, t=T0)
    result = run_cli(db, "export", "--state", "all", "--remove", str(out))
    assert result.returncode == 0
    assert "exported 1 record and removed them from this spool, 1 held record left out" in result.stderr
    assert stats_in_file(out) == Counter({"timed": 1})
    with Store(db) as store:
        assert store.counts()["held"] == 1
    assert run_cli(tmp_path / "elsewhere.db", "import", str(out)).returncode == 0


def test_export_remove_while_the_agent_ships_puts_no_record_both_in_the_file_and_at_statHat(db, tmp_path):
    n = 6000
    backlog(db, n)
    out = tmp_path / "moved.jsonl"
    with Receiver() as receiver:
        receiver.latency = 0.05  # a link that takes a while: the export surely meets batches in flight
        env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
        agent = spawn_cli(db, "run", "--batch-size", "100", env=env)
        try:
            wait_for(lambda: len(receiver.accepted) >= 500, timeout=30)
            result = run_cli(db, "export", "--remove", str(out), env=env)
            assert result.returncode == 0, result.stderr
        finally:
            stop_agent(agent)
        shipped = Counter(a["stat"] for a in receiver.accepted)
    exported = stats_in_file(out)
    with Store(db) as store:
        left = Counter(record.stat for _, state, record in store.records() if state == 0)
    assert not shipped & exported, "records were both exported and shipped"
    assert shipped + exported + left == Counter({f"s{i}": 1 for i in range(n)})
    assert exported and shipped


def test_export_remove_to_stdout_is_refused(db):
    backlog(db, 1)
    result = run_cli(db, "export", "--remove", "-")
    assert result.returncode == 2 and "--remove needs a FILE" in result.stderr
