"""Drop directories against producers' ordinary habits: names reused, files appended to, slow writers.

Each producer is a real process; the watcher is a real `spool watch` process or a real observer. The check
is always the exact multiset of records: every line written is in the spool once, none twice.
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

from spool.config import WatchSettings
from spool.records import make_record
from spool.store import Store
from spool.watch import DONE, DirectoryWatcher, Ingestor

from .helpers import T0, Running, drop, jsonl, outcomes, spawn_cli, stats_in, stop_agent, taken, wait_for, wait_for_line


def produce(script: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args])


REUSING_PRODUCER = """
    import json, os, sys, time
    folder, files, lines = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for f in range(files):
        part = os.path.join(folder, ".job.part")
        with open(part, "w") as out:
            for i in range(lines):
                out.write(json.dumps({"stat": f"f{f} l{i}", "count": 1, "t": 1700000000}) + "\\n")
        os.rename(part, os.path.join(folder, "job.jsonl"))  # always the same name
        time.sleep(0.002 * (f % 5))
"""


@pytest.mark.parametrize("after", ["move", "delete"])
def test_a_producer_renaming_new_files_over_one_name_loses_nothing(drop_dir, db, after):
    watcher = spawn_cli(db, "watch", str(drop_dir), *(["--delete"] if after == "delete" else []))
    wait_for_line(watcher, "watching")
    files, lines = 40, 50
    producer = produce(REUSING_PRODUCER, str(drop_dir), str(files), str(lines))
    assert producer.wait(60) == 0
    expected = Counter({f"f{f} l{i}": 1 for f in range(files) for i in range(lines)})
    try:
        # A file replaced before the watcher read it was never there to read: what was read is all taken once.
        wait_for(lambda: not (drop_dir / "job.jsonl").exists(), timeout=30)
    finally:
        stop_agent(watcher)
    got = taken(db)
    assert set(got.values()) <= {1}, "a record was taken twice"
    # Every file whose content is in the spool was whole; none is in .done/ unread.
    for f in range(files):
        n = sum(got[f"f{f} l{i}"] for i in range(lines))
        assert n in (0, lines), f"file {f}: {n} of {lines} lines"
    if after == "move":
        done = Counter()
        for path in (drop_dir / DONE).iterdir():
            done.update(json.loads(line)["stat"] for line in path.read_text().splitlines())
        # Never a file moved there unread. (A file read and then replaced by the producer is in no directory.)
        assert not done - got, "a file in .done/ was not the file ingested"
        assert done, "nothing reached .done/"
    assert got[f"f{files - 1} l0"] == 1  # the last file always stays until read
    assert +got <= expected


APPENDING_PRODUCER = """
    import json, sys, time
    path, lines = sys.argv[1], int(sys.argv[2])
    for i in range(lines):
        with open(path, "a") as out:  # open, append, close: a close-after-write event each time
            out.write(json.dumps({"stat": f"line {i}", "count": 1, "t": 1700000000}) + "\\n")
        if i % 100 == 0:
            time.sleep(0.01)
"""


def test_a_producer_appending_to_one_file_has_every_line_taken_once(drop_dir, db):
    watcher = spawn_cli(db, "watch", str(drop_dir))
    wait_for_line(watcher, "watching")
    lines = 3000
    producer = produce(APPENDING_PRODUCER, str(drop_dir / "log.jsonl"), str(lines))
    try:
        assert producer.wait(120) == 0
        wait_for(lambda: sum(taken(db).values()) >= lines and not (drop_dir / "log.jsonl").exists(), timeout=60)
    finally:
        stop_agent(watcher)
    assert taken(db) == Counter({f"line {i}": 1 for i in range(lines)})


def test_a_file_that_grew_after_it_was_read_gives_only_its_new_lines(drop_dir, db):
    path = drop_dir / "grows.jsonl"
    path.write_text(jsonl("a", "b"))
    with Store(db) as store:
        ingestor = Ingestor(store)
        assert ingestor.ingest(path, move=False).records == 2
        with open(path, "a") as out:
            out.write(jsonl("c"))
        second = ingestor.ingest(path, move=False)
        assert (second.outcome, second.records, second.offset) == ("ingested", 1, len(jsonl("a", "b")))
        assert ingestor.ingest(path, move=False).outcome == "already"
    assert stats_in(db) == ["a", "b", "c"]


def test_a_csv_that_grew_is_read_on_with_its_header(drop_dir, db):
    path = drop_dir / "grows.csv"
    path.write_text(f"stat,count,t\na,1,{T0}\n")
    with Store(db) as store:
        ingestor = Ingestor(store)
        ingestor.ingest(path, move=False)
        with open(path, "a") as out:
            out.write(f"b,2,{T0}\n")
        assert ingestor.ingest(path).records == 1
    assert stats_in(db) == ["a", "b"]


def test_a_file_rewritten_in_place_is_a_new_file(drop_dir, db):
    path = drop_dir / "rewritten.jsonl"
    path.write_text(jsonl("old1", "old2"))
    with Store(db) as store:
        ingestor = Ingestor(store)
        ingestor.ingest(path, move=False)
        path.write_text(jsonl("new1", "new2", "new3"))  # truncated and rewritten: longer, other bytes
        assert ingestor.ingest(path).records == 3
    assert stats_in(db) == ["old1", "old2", "new1", "new2", "new3"]


@pytest.mark.parametrize("after", ["move", "delete"])
def test_a_file_replaced_after_it_was_read_is_put_back_unread_not_moved(drop_dir, db, after):
    """The moment between reading and moving: the producer renames a new file over the name."""
    path = drop(drop_dir, "job.jsonl", jsonl("first"))

    class Replacing(Ingestor):
        def _take_away(self, path, key, seen):
            drop(drop_dir, "job.jsonl", jsonl("second"))  # lands right before the move
            return super()._take_away(path, key, seen)

    with Store(db) as store:
        result = Replacing(store, after=after).ingest(path)
        assert result.outcome == "ingested" and result.moved_to is None
        assert path.exists(), "the new file must be back under its name"
        assert Ingestor(store, after=after).ingest(path).records == 1
    assert stats_in(db) == ["first", "second"]
    assert len(list((drop_dir / DONE).iterdir())) == (1 if after == "move" else 0)


class AppendsWhileMoved(Ingestor):
    """An ingestor whose file gets a line appended (a producer's open, append, close) just before it is moved."""

    def _take_away(self, path, key, seen):
        with open(path, "a") as out:
            out.write(jsonl("late"))
        return super()._take_away(path, key, seen)


def test_a_file_appended_to_while_it_is_moved_is_put_back_and_its_rest_taken(drop_dir, db):
    path = drop(drop_dir, "log.jsonl", jsonl("first"))
    with Store(db) as store:
        assert AppendsWhileMoved(store).ingest(path).moved_to is None
        assert Ingestor(store).ingest(path).records == 1
    assert stats_in(db) == ["first", "late"]


SLOW_WRITER = """
    import json, sys, time
    with open(sys.argv[1], "w") as out:
        for i in range(int(sys.argv[2])):
            out.write(json.dumps({"stat": f"slow {i}", "count": 1, "t": 1700000000}) + "\\n")
            out.flush()
            time.sleep(0.2)
"""


def test_poll_mode_waits_until_a_slowly_written_file_has_settled(drop_dir, db):
    with Running(drop_dir, db, poll=True, poll_interval=0.1, settle=1.0) as watcher:
        writer = produce(SLOW_WRITER, str(drop_dir / "slow.jsonl"), "20")
        assert writer.wait(30) == 0
        wait_for(lambda: watcher.results, timeout=30)
    assert outcomes(watcher) == [("slow.jsonl", "ingested")]
    assert stats_in(db) == [f"slow {i}" for i in range(20)]


def test_a_file_moved_in_from_another_directory_is_taken_without_waiting_for_a_rescan(tmp_path, drop_dir, db):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(jsonl("moved in"))
    os.utime(outside, (T0, T0))
    with Running(drop_dir, db, settle=1.0, rescan=3600) as watcher:
        os.rename(outside, drop_dir / "moved.jsonl")  # inotify says "created": no close event comes
        wait_for(lambda: watcher.results, timeout=10)
    assert stats_in(db) == ["moved in"]


def test_a_file_dated_in_the_future_waits_only_the_settle_time(drop_dir, db):
    path = drop_dir / "future.jsonl"
    path.write_text(jsonl("from the future"))
    os.utime(path, (time.time() + 86400, time.time() + 86400))  # a producer whose clock is a day ahead
    with Running(drop_dir, db, settle=0.5, rescan=3600) as watcher:
        wait_for(lambda: watcher.results, timeout=10)
    assert stats_in(db) == ["from the future"]


def test_files_whose_events_were_lost_are_found_by_the_periodic_rescan(drop_dir, db):
    watcher = DirectoryWatcher(WatchSettings(path=drop_dir, settle=0.0, rescan=0.3), Store(db))
    watcher.scan()  # as at start, but with no observer running: no event will ever come for what follows
    drop(drop_dir, "unseen.jsonl", jsonl("found"))
    deadline = time.monotonic() + 10
    while not watcher.results and time.monotonic() < deadline:
        path = watcher._next()
        if path is not None:
            watcher._ingest(path)
    watcher.store.close()
    assert stats_in(db) == ["found"]


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering the inotify queue limit needs root")
def test_nothing_waits_for_a_restart_after_an_inotify_queue_overflow(drop_dir, db):
    """A real overflow; found by the rescan at once (watchdog 7 says it overflowed) or at the next periodic one."""
    limit = Path("/proc/sys/fs/inotify/max_queued_events")
    old = limit.read_text()
    limit.write_text("8\n")  # a tiny kernel queue (it applies to watches made from now on)
    try:
        with Running(drop_dir, db, rescan=2) as watcher:
            limit.write_text(old)
            for i in range(300):
                (drop_dir / f".{i}.part").write_text(jsonl(f"file {i}"))
            for i in range(300):
                os.rename(drop_dir / f".{i}.part", drop_dir / f"{i}.jsonl")
            wait_for(lambda: len(watcher.results) == 300, timeout=60)
    finally:
        limit.write_text(old)
    assert sorted(stats_in(db)) == sorted(f"file {i}" for i in range(300))


def test_watchdogs_word_of_an_overflow_starts_a_rescan_at_once(drop_dir, db):
    import logging

    watcher = DirectoryWatcher(WatchSettings(path=drop_dir, settle=0.0, rescan=3600), Store(db))
    try:
        watcher.start()
        watcher._observer.stop()  # events stop here: as if the kernel had dropped every one from now on
        watcher._observer.join()
        drop(drop_dir, "unseen.jsonl", jsonl("found"))
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events "
                                                                  "were lost")  # what watchdog 7 logs
        assert watcher.overflowed.is_set()
        deadline = time.monotonic() + 10
        while not watcher.results and time.monotonic() < deadline:
            path = watcher._next()
            if path is not None:
                watcher._ingest(path)
    finally:
        watcher.close()
        watcher.store.close()
    assert stats_in(db) == ["found"]


def test_names_that_are_not_utf8_or_hold_newlines_are_taken_and_logged_escaped(drop_dir, db):
    forged = "a\nINFO spool.watch: forged.jsonl"
    drop(drop_dir, forged, jsonl("newline name"))
    (drop_dir / os.fsdecode(b"caf\xe9.jsonl")).write_text(jsonl("latin-1 name"))
    agent = spawn_cli(db, "watch", str(drop_dir))
    try:
        wait_for(lambda: sorted(stats_in(db)) == ["latin-1 name", "newline name"], timeout=20)
    finally:
        stderr = stop_agent(agent)
    assert "forged.jsonl" in stderr and "\nINFO spool.watch: forged" not in stderr
    assert "a\\nINFO" in stderr and "caf\\udce9.jsonl" in stderr
    assert sorted(os.listdir(drop_dir / DONE)) == sorted([forged, os.fsdecode(b"caf\xe9.jsonl")])


def test_the_files_table_keeps_only_files_still_in_the_directory_or_lingering_in_done(drop_dir, db):
    def marks():
        with Store(db) as store:
            return len(store.file_marks())

    with Running(drop_dir, db, linger=0.3) as watcher:
        for i in range(30):
            drop(drop_dir, f"f{i}.jsonl", jsonl(f"s{i}"))
        wait_for(lambda: len(watcher.results) == 30)
        wait_for(lambda: marks() == 0)  # each file's linger in .done/ ended: its mark is gone
    assert len(list((drop_dir / DONE).iterdir())) == 30


def test_a_file_put_back_while_a_newer_one_took_its_name_keeps_its_kind_of_name_and_its_mark(drop_dir, db):
    path = drop(drop_dir, "log.jsonl", jsonl("first"))

    class Crowded(AppendsWhileMoved):
        def _put_back(self, folder, name, path, key):
            drop(drop_dir, "log.jsonl", jsonl("newer"))  # a new file takes the name before this one is back
            super()._put_back(folder, name, path, key)

    with Store(db) as store:
        assert Crowded(store).ingest(path).moved_to is None
        back = drop_dir / "1-log.jsonl"
        assert back.exists(), "put back under a name the watcher still reads as JSON lines"
        assert Ingestor(store).ingest(back).records == 1  # its mark followed it: only what was appended
        assert Ingestor(store).ingest(path).records == 1
    assert stats_in(db) == ["first", "late", "newer"]


@pytest.mark.parametrize("through_symlink", [False, True])
def test_a_drop_directory_that_holds_the_spool_never_takes_the_spool_for_a_dropped_file(tmp_path, through_symlink):
    # /var/lib/spool holding both the spool and a [[watch]] path is a natural setup: the spool, its journals,
    # its lock and a quarantined copy must stay where they are (they went to .rejected/, the spool with them).
    box = tmp_path / "box"
    box.mkdir()
    db = box / "spool.db"
    if through_symlink:  # the spool named through a link elsewhere, the real file in the watched directory
        (tmp_path / "elsewhere").mkdir()
        (tmp_path / "elsewhere" / "spool.db").symlink_to(db)
        db = tmp_path / "elsewhere" / "spool.db"
    with Store(db) as store:
        store.append_one(make_record(stat="before", count=1, t=T0))
    (box / "spool.db.corrupt-20260101T000000").write_bytes(b"a quarantined spool")
    for name in ("spool.db", "spool.db.corrupt-20260101T000000"):
        os.utime(box / name, (T0, T0))  # settled long ago: the start-up scan would take them at once
    agent = spawn_cli(db, "watch", str(box))
    try:
        wait_for_line(agent, "watching")
        drop(box, "job.jsonl", jsonl("dropped"))
        wait_for(lambda: (box / DONE / "job.jsonl").exists())  # after the spool's files: they are older
    finally:
        stderr = stop_agent(agent)
    assert not (box / ".rejected").exists(), stderr
    assert sorted(stats_in(db)) == ["before", "dropped"]
    assert (box / "spool.db.corrupt-20260101T000000").exists()
