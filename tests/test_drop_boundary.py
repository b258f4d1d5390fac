"""The drop directory's boundary, attacked: links a producer plants, appends racing the move, reused inodes,
one directory watched twice, a folder spool cannot move into, and lines still being written.

Producers and spool are real processes wherever the habit is a process's; the check is always what reached
the spool (every line once, none twice) and what spool did to files that are not its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from spool.store import Store
from spool.watch import DONE, REJECTED, Ingestor

from .helpers import (
    T0,
    Running,
    cli_env,
    drop,
    jsonl,
    outcomes,
    run_cli,
    spawn_cli,
    stats_in,
    stop_agent,
    taken,
    wait_for,
    wait_for_line,
)


def seeded(db: Path, n: int = 50) -> None:
    """A spool holding `n` pending records: what a planted link must not destroy."""
    with Store(db) as store:
        store.append(json_records(n))


def json_records(n: int):
    from spool.records import make_record
    return [make_record(stat=f"kept {i}", count=1, t=T0) for i in range(n)]


# -- (1) spool never follows a link it did not make, never writes through a name a producer placed ------------


def test_a_report_name_planted_as_a_link_to_the_spool_never_writes_through_it(drop_dir, db):
    seeded(db)
    before = db.read_bytes()
    (drop_dir / REJECTED).mkdir()
    os.symlink(db, drop_dir / REJECTED / "evil.jsonl.error.txt")
    victim = drop_dir.parent / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, drop_dir / REJECTED / "evil.jsonl")  # and the name the file itself would move to
    (drop_dir / "evil.jsonl").write_text("not json\n")
    result = run_cli(db, "ingest", str(drop_dir / "evil.jsonl"))
    assert result.returncode == 2, result.stderr
    assert db.read_bytes()[:100] == before[:100]
    assert victim.read_text() == "precious\n"
    assert sorted(taken(db)) == sorted(f"kept {i}" for i in range(50))
    # The report is written, under a name of spool's own choosing, and says why.
    reports = [p for p in (drop_dir / REJECTED).iterdir() if p.name.endswith(".error.txt") and not p.is_symlink()]
    assert len(reports) == 1 and "not valid JSON" in reports[0].read_text()
    assert os.readlink(drop_dir / REJECTED / "evil.jsonl.error.txt") == str(db)


def test_a_hard_link_planted_as_the_report_name_is_not_written_through(drop_dir, db):
    victim = drop_dir.parent / "victim.txt"
    victim.write_text("precious\n")
    (drop_dir / REJECTED).mkdir()
    os.link(victim, drop_dir / REJECTED / "bad.jsonl.error.txt")
    (drop_dir / "bad.jsonl").write_text("{\n")
    assert run_cli(db, "ingest", str(drop_dir / "bad.jsonl")).returncode == 2
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("folder", [DONE, REJECTED])
def test_done_and_rejected_folders_that_are_links_are_never_followed(drop_dir, db, folder):
    elsewhere = drop_dir.parent / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, drop_dir / folder)
    good = folder == DONE
    (drop_dir / "f.jsonl").write_text(jsonl("a") if good else "nope\n")
    result = run_cli(db, "ingest", str(drop_dir / "f.jsonl"))
    assert result.returncode != 0
    assert "symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert list(elsewhere.iterdir()) == []
    assert (drop_dir / "f.jsonl").exists()  # left where it was
    assert stats_in(db) == (["a"] if good else [])
    # Taken once: a second run does not take it again.
    run_cli(db, "ingest", str(drop_dir / "f.jsonl"))
    assert stats_in(db) == (["a"] if good else [])


# -- (2) every byte written to a file opened in the drop directory is taken exactly once ---------------------


OPEN_PAUSE_APPEND = """
    import json, random, sys, time
    path, lines = sys.argv[1], int(sys.argv[2])
    rng = random.Random(7)
    for i in range(lines):
        with open(path, "a") as out:
            time.sleep(rng.random() * 0.01)  # the file may be moved to .done/ right here
            out.write(json.dumps({"stat": f"line {i}", "count": 1, "t": 1700000000}) + "\\n")
"""


def pausing_producer(drop_dir: Path, lines: int) -> None:
    producer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(OPEN_PAUSE_APPEND),
                                 str(drop_dir / "log.jsonl"), str(lines)])
    assert producer.wait(120) == 0


def test_an_open_append_close_producer_pausing_before_each_write_loses_no_line(drop_dir, db):
    watcher = spawn_cli(db, "watch", str(drop_dir))
    wait_for_line(watcher, "watching")
    try:
        pausing_producer(drop_dir, 300)
        wait_for(lambda: sum(taken(db).values()) >= 300, timeout=60)
        time.sleep(0.5)  # a duplicate, if any, would come now
    finally:
        stop_agent(watcher)
    assert taken(db) == Counter({f"line {i}": 1 for i in range(300)})


def test_with_after_delete_a_moved_file_is_deleted_only_once_its_linger_ended(drop_dir, db):
    with Running(drop_dir, db, after="delete", linger=0.5):
        pausing_producer(drop_dir, 300)
        wait_for(lambda: sum(taken(db).values()) >= 300 and not any((drop_dir / DONE).iterdir()), timeout=60)
    assert taken(db) == Counter({f"line {i}": 1 for i in range(300)})


def test_bytes_written_to_a_moved_file_before_a_crash_are_taken_after_the_restart(drop_dir, db):
    watcher = spawn_cli(db, "watch", str(drop_dir))
    wait_for_line(watcher, "watching")
    path = drop_dir / "log.jsonl"
    with open(path, "a") as late:  # opened before the move, written after it
        late.write(jsonl("first"))
        late.flush()
        os.fsync(late.fileno())
        moved = drop_dir / DONE / "log.jsonl"
        try:
            wait_for(moved.exists, timeout=20)
        finally:
            watcher.kill()  # no clean stop: the watch on the moved file dies with the process
            watcher.communicate()
        late.write(jsonl("second"))
    assert stats_in(db) == ["first"]
    again = spawn_cli(db, "watch", str(drop_dir))
    try:
        wait_for(lambda: stats_in(db) == ["first", "second"], timeout=20)
    finally:
        stop_agent(again)
    assert stats_in(db) == ["first", "second"]


# -- (3) identity is never confused by a reused inode or identical bytes -------------------------------------


def test_a_kept_file_rewritten_in_place_with_the_same_bytes_is_a_new_file(drop_dir, db):
    path = drop_dir / "same.jsonl"
    path.write_text(jsonl("again"))
    assert run_cli(db, "ingest", "--keep", str(path)).returncode == 0
    mtime = path.stat().st_mtime_ns
    with open(path, "w") as out:  # `printf ... > same.jsonl`: truncated and written again
        out.write(jsonl("again"))
    os.utime(path, ns=(mtime + 1_000_000_000, mtime + 1_000_000_000))  # a second later, as in life
    result = run_cli(db, "ingest", "--keep", str(path))
    assert result.returncode == 0, result.stderr
    assert "ingested 1 record" in result.stderr
    assert stats_in(db) == ["again", "again"]


def test_a_kept_file_deleted_and_made_again_with_the_same_bytes_is_a_new_file(drop_dir, db):
    path = drop_dir / "same.jsonl"
    path.write_text(jsonl("again"))
    assert run_cli(db, "ingest", "--keep", str(path)).returncode == 0
    info = path.stat()
    path.unlink()
    path.write_text(jsonl("again"))  # the freed inode number is usually given straight back
    os.utime(path, ns=(info.st_mtime_ns + 10_000_000, info.st_mtime_ns + 10_000_000))
    assert run_cli(db, "ingest", "--keep", str(path)).returncode == 0
    assert stats_in(db) == ["again", "again"]


def test_a_kept_file_unchanged_is_still_taken_once(drop_dir, db):
    path = drop_dir / "same.jsonl"
    path.write_text(jsonl("once"))
    for _ in range(3):
        assert run_cli(db, "ingest", "--keep", str(path)).returncode == 0
    assert stats_in(db) == ["once"]


# -- (4) one directory has one owner ---------------------------------------------------------------------------


def test_a_config_naming_one_directory_twice_is_refused(tmp_path, drop_dir, db):
    config = tmp_path / "spool.toml"
    config.write_text(f'[[watch]]\npath = "{drop_dir}"\n\n[[watch]]\npath = "{drop_dir}/../drop/"\n')
    result = run_cli(db, "run", env={**cli_env(db), "SPOOL_CONFIG": str(config)}, timeout=30)
    assert result.returncode == 2
    assert "same directory" in result.stderr and "Traceback" not in result.stderr


def test_a_second_watcher_of_a_watched_directory_is_refused(drop_dir, db):
    first = spawn_cli(db, "watch", str(drop_dir))
    try:
        wait_for_line(first, "watching")
        second = run_cli(db, "watch", str(drop_dir), timeout=30)
        assert second.returncode != 0
        assert "already" in second.stderr and "Traceback" not in second.stderr
        ingest = run_cli(db, "ingest", str(drop(drop_dir, ".x.part", jsonl("a"))), timeout=30)
        assert ingest.returncode != 0 and "watch" in ingest.stderr
        for i in range(30):
            drop(drop_dir, f"f{i}.jsonl", jsonl(f"s{i}"))
        wait_for(lambda: sum(taken(db).values()) >= 30, timeout=30)
    finally:
        stop_agent(first)
    assert taken(db) == Counter({f"s{i}": 1 for i in range(30)})


def test_two_watchers_in_one_process_cannot_share_a_directory(drop_dir, db):
    with Running(drop_dir, db), pytest.raises(Exception, match="already"), Running(drop_dir.parent / "drop", db):
        pass


# -- (8) a file that cannot be moved backs off, says so once, and doctor names the folder --------------------


def test_a_file_that_cannot_be_moved_is_retried_with_back_off_and_one_loud_line(drop_dir, db):
    (drop_dir / DONE).write_text("a file where the folder should be\n")  # as a root-owned 0700 .done/ does
    watcher = spawn_cli(db, "watch", str(drop_dir))
    try:
        wait_for_line(watcher, "watching")
        drop(drop_dir, "stuck.jsonl", jsonl("a"))
        wait_for(lambda: stats_in(db) == ["a"], timeout=20)
        time.sleep(1)
        start = time.monotonic()
        cpu_before = _cpu_seconds(watcher.pid)
        time.sleep(1.5)
        busy = (_cpu_seconds(watcher.pid) - cpu_before) / (time.monotonic() - start)
        (drop_dir / DONE).unlink()  # the operator mends it; the file moves on a later try
        wait_for(lambda: (drop_dir / DONE / "stuck.jsonl").exists(), timeout=30)
    finally:
        log = stop_agent(watcher)
    assert stats_in(db) == ["a"]
    assert busy < 0.2, f"the watcher used {busy:.0%} of a core waiting on one file"
    loud = [line for line in log.splitlines() if "stuck.jsonl" in line and ("ERROR" in line or "WARNING" in line)]
    assert len(loud) == 1, loud
    assert "retried" in loud[0]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("how", ["file", "link"])
def test_doctor_names_a_done_or_rejected_folder_spool_cannot_use(tmp_path, drop_dir, db, how):
    if how == "file":
        (drop_dir / DONE).write_text("x")
    else:
        os.symlink(tmp_path, drop_dir / REJECTED)
    config = tmp_path / "spool.toml"
    config.write_text(f'[[watch]]\npath = "{drop_dir}"\n')
    result = run_cli(db, "doctor", env={**cli_env(db), "SPOOL_CONFIG": str(config)}, timeout=60)
    folder = DONE if how == "file" else REJECTED
    failed = [line for line in result.stdout.splitlines() if folder in line and "FAIL" in line]
    assert failed, result.stdout


# -- (13) a last line without its newline is still being written ---------------------------------------------


SLOW_LINE = """
    import sys, time
    path = sys.argv[1]
    line = '{"stat": "slow", "count": 1, "t": 1700000000}\\n'
    with open(path, "w") as out:
        out.write(line[:25]); out.flush()
        time.sleep(2.5)
        out.write(line[25:]); out.flush()
"""


def test_a_slow_writer_paused_mid_line_is_not_rejected(drop_dir, db):
    watcher = spawn_cli(db, "watch", "--poll", "--poll-interval", "0.2", str(drop_dir))  # read once settled (1 s)
    try:
        wait_for_line(watcher, "watching")
        producer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SLOW_LINE), str(drop_dir / "s.jsonl")])
        assert producer.wait(30) == 0
        wait_for(lambda: stats_in(db) == ["slow"], timeout=30)
    finally:
        stop_agent(watcher)
    assert not (drop_dir / REJECTED).exists()


def test_a_complete_lines_part_is_taken_and_the_partial_line_waits_for_its_newline(drop_dir, db):
    path = drop_dir / "p.jsonl"
    path.write_text(jsonl("a", "b") + '{"stat": "c", "co')
    with Store(db) as store:
        ingestor = Ingestor(store, partial_wait=60)
        first = ingestor.ingest(path)
        assert (first.outcome, first.records) == ("partial", 2)
        assert path.exists()  # not moved: its last line is still coming
        with open(path, "a") as out:
            out.write(f'unt": 1, "t": {T0}}}\n')
        second = ingestor.ingest(path)
        assert (second.outcome, second.records) == ("ingested", 1)
    assert stats_in(db) == ["a", "b", "c"]


@pytest.mark.parametrize("last, expected", [(json.dumps({"stat": "end", "count": 1, "t": T0}), "ingested"),
                                            ('{"stat": "end", "co', "rejected")])
def test_a_partial_last_line_quiet_for_long_is_judged(drop_dir, db, last, expected):
    path = drop_dir / "q.jsonl"
    path.write_text(jsonl("a") + last)
    old = time.time() - 3600
    os.utime(path, (old, old))
    with Store(db) as store:
        result = Ingestor(store, partial_wait=60).ingest(path)
    assert result.outcome == expected
    assert stats_in(db) == (["a", "end"] if expected == "ingested" else [])


def test_a_watched_file_missing_its_final_newline_is_taken_once_it_is_quiet(drop_dir, db):
    with Running(drop_dir, db, partial_wait=0.5) as watcher:
        drop(drop_dir, "n.jsonl", jsonl("a") + json.dumps({"stat": "b", "count": 1, "t": T0}))
        wait_for(lambda: (drop_dir / DONE / "n.jsonl").exists(), timeout=20)
    assert stats_in(db) == ["a", "b"]
    assert ("n.jsonl", "partial") in outcomes(watcher)


def test_a_one_shot_ingest_judges_a_last_line_without_newline_at_once(drop_dir, db):
    path = drop_dir / "n.jsonl"
    path.write_text(json.dumps({"stat": "b", "count": 1, "t": T0}))
    result = run_cli(db, "ingest", str(path))
    assert result.returncode == 0, result.stderr
    assert stats_in(db) == ["b"]


# -- the second outside attack ------------------------------------------------------------------------------------


class DiesAfterTheRename(Exception):
    pass


def test_a_watcher_killed_right_after_the_move_still_takes_what_is_written_to_the_moved_file(drop_dir, db,
                                                                                             monkeypatch):
    import spool.watch

    path = drop(drop_dir, "log.jsonl", jsonl("first"))

    def dies(self, *others):
        raise DiesAfterTheRename  # the process ends here: renamed, nothing after the rename committed

    monkeypatch.setattr(spool.watch._Folder, "sync", dies)
    with Store(db) as store, pytest.raises(DiesAfterTheRename):
        Ingestor(store, linger=True).ingest(path)
    monkeypatch.undo()
    moved = drop_dir / DONE / "log.jsonl"
    with open(moved, "a") as late:  # a producer that opened the file before the move writes now
        late.write(jsonl("second"))
    with Running(drop_dir, db, linger=0.2):
        wait_for(lambda: stats_in(db) == ["first", "second"], timeout=20)
    assert stats_in(db) == ["first", "second"]


def test_a_watcher_whose_directory_was_replaced_takes_nothing_from_the_new_one(tmp_path, db):
    first_dir = tmp_path / "d"
    first_dir.mkdir()
    other = tmp_path / "other.db"
    with Running(first_dir, db, rescan=0.1):
        first_dir.rename(tmp_path / "d.old")
        first_dir.mkdir()
        with Running(first_dir, other, rescan=0.1):  # the new directory has its own watcher
            for i in range(5):
                drop(first_dir, f"f{i}.jsonl", jsonl(f"s{i}"))
            wait_for(lambda: len(stats_in(other)) == 5, timeout=20)
            time.sleep(0.5)  # several rescans of the first watcher
    assert stats_in(db) == []
    assert sorted(stats_in(other)) == [f"s{i}" for i in range(5)]


def test_a_stuck_file_renamed_in_the_directory_is_not_taken_again(drop_dir, db):
    (drop_dir / DONE).write_text("not a folder\n")
    with Running(drop_dir, db) as watcher:
        drop(drop_dir, "app.jsonl", jsonl("a", "b"))
        wait_for(lambda: stats_in(db) == ["a", "b"], timeout=20)
        os.rename(drop_dir / "app.jsonl", drop_dir / "app.1.jsonl")  # rename rotation
        wait_for(lambda: any(r.path.name == "app.1.jsonl" for r in watcher.results), timeout=20)
    assert stats_in(db) == ["a", "b"]


def test_two_names_of_one_file_are_one_file(drop_dir, db):
    (drop_dir / ".a.part").write_text(jsonl("a"))
    os.link(drop_dir / ".a.part", drop_dir / ".b.part")
    os.rename(drop_dir / ".a.part", drop_dir / "a.jsonl")
    with Store(db) as store:
        assert Ingestor(store).ingest(drop_dir / "a.jsonl", move=False).records == 1
        os.rename(drop_dir / ".b.part", drop_dir / "b.jsonl")
        assert Ingestor(store).ingest(drop_dir / "b.jsonl").outcome == "already"
    assert stats_in(db) == ["a"]


def test_a_file_in_done_is_not_ingested_again_by_hand(drop_dir, db):
    drop(drop_dir, "f.jsonl", jsonl("a"))
    assert run_cli(db, "ingest", str(drop_dir / "f.jsonl")).returncode == 0
    again = run_cli(db, "ingest", str(drop_dir / DONE / "f.jsonl"))
    assert again.returncode == 2 and "Traceback" not in again.stderr and ".done/" in again.stderr
    assert stats_in(db) == ["a"]


def test_names_at_the_length_limit_are_moved_and_reported(drop_dir, db):
    long = "x" * (255 - len(".jsonl")) + ".jsonl"
    (drop_dir / long).write_text(jsonl("a"))
    assert run_cli(db, "ingest", str(drop_dir / long)).returncode == 0
    (drop_dir / long).write_text(jsonl("b"))  # the name again: .done/ needs another, longer name for it
    second = run_cli(db, "ingest", str(drop_dir / long))
    assert second.returncode == 0, second.stderr
    assert sorted(stats_in(db)) == ["a", "b"]
    assert len(list((drop_dir / DONE).iterdir())) == 2 and not (drop_dir / long).exists()
    bad = "y" * 248 + ".jsonl"
    (drop_dir / bad).write_text("not json\n")
    rejected = run_cli(db, "ingest", str(drop_dir / bad), str(drop(drop_dir, "ok.jsonl", jsonl("c"))))
    assert rejected.returncode == 2 and "Traceback" not in rejected.stderr
    assert any(p.name.endswith(".error.txt") for p in (drop_dir / REJECTED).iterdir())
    assert sorted(stats_in(db)) == ["a", "b", "c"]
