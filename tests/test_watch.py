"""Drop directories with a real watchdog observer on tmp_path: every file exactly once, bad ones rejected."""

from __future__ import annotations

import gzip
import json
import os
import time

import pytest

from spool.store import State, Store
from spool.watch import DONE, REJECTED, Ingestor

from .helpers import T0, Running, drop, jsonl, outcomes, stats_in, wait_for


def test_a_file_renamed_into_place_is_ingested_and_moved_to_done(drop_dir, db):
    with Running(drop_dir, db) as watcher:
        drop(drop_dir, "a.jsonl", jsonl("a1", "a2"))
        wait_for(lambda: watcher.results)
    assert outcomes(watcher) == [("a.jsonl", "ingested")]
    assert stats_in(db) == ["a1", "a2"]
    assert not (drop_dir / "a.jsonl").exists() and (drop_dir / DONE / "a.jsonl").exists()


def test_a_file_written_in_place_is_read_only_after_it_is_closed(drop_dir, db):
    """Writes keep coming (within `settle` of each other): the file is read once it is closed."""
    with Running(drop_dir, db, settle=2.0) as watcher:
        with open(drop_dir / "slow.jsonl", "w") as handle:
            handle.write(jsonl("first"))
            handle.flush()
            time.sleep(0.3)  # an open writer: the close-after-write event has not come yet
            assert not watcher.results
            handle.write(jsonl("second"))
        wait_for(lambda: watcher.results)
    assert stats_in(db) == ["first", "second"]


def test_temporary_and_hidden_names_are_ignored(drop_dir, db):
    with Running(drop_dir, db) as watcher:
        (drop_dir / "x.jsonl.tmp").write_text(jsonl("tmp"))
        (drop_dir / "y.part").write_text(jsonl("part"))
        (drop_dir / ".hidden.jsonl").write_text(jsonl("hidden"))
        drop(drop_dir, "real.jsonl", jsonl("real"))
        wait_for(lambda: watcher.results)
        time.sleep(0.2)
    assert outcomes(watcher) == [("real.jsonl", "ingested")]
    assert (drop_dir / "x.jsonl.tmp").exists() and (drop_dir / "y.part").exists()


def test_files_present_at_start_are_ingested_first_oldest_first(drop_dir, db):
    for i, name in enumerate(["c.jsonl", "a.jsonl", "b.jsonl"]):
        path = drop_dir / name
        path.write_text(jsonl(name))
        os.utime(path, (T0 + i, T0 + i))
    with Running(drop_dir, db) as watcher:
        wait_for(lambda: len(watcher.results) == 3)
    assert stats_in(db) == ["c.jsonl", "a.jsonl", "b.jsonl"]


def test_poll_mode_finds_files_without_inotify(drop_dir, db):
    with Running(drop_dir, db, poll=True, poll_interval=0.1) as watcher:
        drop(drop_dir, "polled.csv", "stat,value,t\npolled,2.5,1700000000\n")
        wait_for(lambda: watcher.results)
    assert outcomes(watcher) == [("polled.csv", "ingested")]
    assert stats_in(db) == ["polled"]


@pytest.mark.parametrize(("name", "content"), [
    ("a.jsonl", jsonl("x")),
    ("a.ndjson", jsonl("x")),
    ("a.json", json.dumps({"ezkey": "k", "data": [{"stat": "x", "count": 1, "t": T0}]}, indent=2)),
    ("a.json", json.dumps([{"stat": "x", "count": 1, "t": T0}])),
    ("a.csv", f"stat,count,t\nx,1,{T0}\n"),
    ("a.jsonl.gz", gzip.compress(jsonl("x").encode(), mtime=0)),
    ("a.csv.gz", gzip.compress(f"stat,count,t\nx,1,{T0}\n".encode(), mtime=0)),
    ("A.JSONL", jsonl("x")),
])
def test_each_format_is_ingested(drop_dir, db, name, content):
    with Store(db) as store:
        result = Ingestor(store).ingest(drop(drop_dir, name, content))
    assert (result.outcome, result.records) == ("ingested", 1)
    assert stats_in(db) == ["x"]


def test_a_second_file_with_the_same_bytes_is_a_second_event(drop_dir, db):
    """A nightly job dropping {"stat": "backups done", "count": 1} three times means three backups."""
    nightly = '{"stat": "backups done", "count": 1}\n'
    with Running(drop_dir, db) as watcher:
        for night in range(3):
            drop(drop_dir, f"night-{night}.jsonl", nightly)
            wait_for(lambda n=night: len(watcher.results) == n + 1)
        drop(drop_dir, "night-0.jsonl", nightly)  # and the same name again, another night
        wait_for(lambda: len(watcher.results) == 4)
    assert [o for _, o in outcomes(watcher)] == ["ingested"] * 4
    assert stats_in(db) == ["backups done"] * 4


def make_fifo(directory):
    os.mkfifo(directory / "pipe.jsonl")
    return directory / "pipe.jsonl"


def make_symlink(directory):
    target = directory.parent / "elsewhere.jsonl"
    target.write_text(jsonl("x"))
    os.symlink(target, directory / "link.jsonl")
    return directory / "link.jsonl"


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("bad.jsonl", '{"stat": "ok", "count": 1}\n{oops\n', "line 2: not valid JSON"),
    ("bad.jsonl", jsonl("fine") + '{"stat": "x", "count": "one"}\n', "line 2: count must be a number"),
    ("ms.jsonl", '{"stat": "x", "count": 1, "t": 1700000000000}\n', "looks like milliseconds"),
    ("nan.jsonl", '{"stat": "x", "value": NaN}\n', "finite"),
    ("bad.csv", "stat,cuont\nx,1\n", "unknown column 'cuont', did you mean 'count'?"),
    ("garbage.jsonl", bytes(range(256)) * 40, "not UTF-8"),
    ("utf16.jsonl", jsonl("x").encode("utf-16"), "not UTF-8"),
    ("broken.jsonl.gz", gzip.compress(jsonl(*"abcdef").encode(), mtime=0)[:-12], "truncated"),
    ("notgzip.csv.gz", b"stat,count\nx,1\n", "Not a gzipped file"),
    ("long.jsonl", b'{"stat": "' + b"x" * (1 << 20) + b'"}\n', "longer than"),
    ("notes.txt", "hello", "not a known kind of file"),
])
def test_bad_files_go_to_rejected_with_the_reason_beside_them(drop_dir, db, name, content, reason):
    with Store(db) as store:
        result = Ingestor(store).ingest(drop(drop_dir, name, content))
    assert result.outcome == "rejected"
    report = (drop_dir / REJECTED / f"{name}.error.txt").read_text()
    assert reason in report
    assert (drop_dir / REJECTED / name).exists() and not (drop_dir / name).exists()
    assert stats_in(db) == []


@pytest.mark.parametrize(("make", "reason"), [(make_fifo, "not a regular file"),
                                              (make_symlink, "symbolic link")])
def test_special_files_are_rejected_not_followed(drop_dir, db, make, reason):
    with Store(db) as store:
        result = Ingestor(store).ingest(make(drop_dir))
    assert result.outcome == "rejected" and reason in str(result.errors[0])
    assert stats_in(db) == []


def test_a_file_over_the_size_limit_is_rejected_unread(drop_dir, db):
    with Store(db) as store:
        result = Ingestor(store, max_bytes=100).ingest(drop(drop_dir, "big.jsonl", jsonl(*"abcdefgh")))
    assert result.outcome == "rejected" and "over the limit of 100" in str(result.errors[0])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file, so an unreadable file cannot be made")
def test_an_unreadable_file_is_rejected(drop_dir, db):
    path = drop(drop_dir, "secret.jsonl", jsonl("x"))
    path.chmod(0)
    with Store(db) as store:
        result = Ingestor(store).ingest(path)
    assert result.outcome == "rejected" and "cannot read" in str(result.errors[0])


def test_every_bad_line_is_reported_not_just_the_first(drop_dir, db):
    content = jsonl("ok") + '{"stat": ""}\n' + jsonl("ok2") + '{"stat": "x", "value": "v"}\n'
    with Store(db) as store:
        Ingestor(store).ingest(drop(drop_dir, "two.jsonl", content))
    report = (drop_dir / REJECTED / "two.jsonl.error.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in report] == ["line 2", "line 4"]


def test_skip_invalid_takes_the_good_records_and_reports_the_bad(drop_dir, db):
    content = jsonl("good1") + "{nope\n" + jsonl("good2")
    with Store(db) as store:
        result = Ingestor(store, skip_invalid=True).ingest(drop(drop_dir, "mixed.jsonl", content))
    assert (result.outcome, result.records) == ("ingested", 2)
    assert stats_in(db) == ["good1", "good2"]
    assert "line 2: not valid JSON" in (drop_dir / REJECTED / "mixed.jsonl.error.txt").read_text()
    assert (drop_dir / DONE / "mixed.jsonl").exists()


def test_skip_invalid_still_rejects_a_truncated_file_whole(drop_dir, db):
    content = gzip.compress(jsonl(*[f"s{i}" for i in range(500)]).encode())[:-40]
    with Store(db) as store:
        result = Ingestor(store, skip_invalid=True).ingest(drop(drop_dir, "cut.jsonl.gz", content))
    assert result.outcome == "rejected"
    assert stats_in(db) == []


def test_the_watcher_survives_bad_files_and_goes_on(drop_dir, db):
    with Running(drop_dir, db) as watcher:
        drop(drop_dir, "bad.jsonl", "{{{{\n")
        drop(drop_dir, "worse.csv.gz", b"\x1f\x8b garbage")
        os.mkfifo(drop_dir / "pipe.csv")
        drop(drop_dir, "good.jsonl", jsonl("survived"))
        wait_for(lambda: ("good.jsonl", "ingested") in outcomes(watcher))
    assert stats_in(db) == ["survived"]
    assert sorted(o for _, o in outcomes(watcher)) == ["ingested", "rejected", "rejected", "rejected"]
    assert watcher.outcomes == {"ingested": 1, "rejected": 3} and watcher.ingested_records == 1


def test_delete_after_ingest(drop_dir, db):
    with Store(db) as store:
        Ingestor(store, after="delete").ingest(drop(drop_dir, "gone.jsonl", jsonl("x")))
    assert not (drop_dir / "gone.jsonl").exists() and not (drop_dir / DONE / "gone.jsonl").exists()
    assert stats_in(db) == ["x"]


def test_a_name_already_in_done_is_not_overwritten(drop_dir, db):
    with Store(db) as store:
        ingestor = Ingestor(store)
        ingestor.ingest(drop(drop_dir, "same.jsonl", jsonl("first")))
        ingestor.ingest(drop(drop_dir, "same.jsonl", jsonl("second")))
    assert sorted(os.listdir(drop_dir / DONE)) == ["same.jsonl", "same.jsonl.1"]
    assert stats_in(db) == ["first", "second"]


def test_a_file_ingested_but_not_yet_moved_is_moved_not_taken_again(drop_dir, db):
    """The crash window between commit and move: the file's identity is known, so the file only moves."""
    path = drop(drop_dir, "window.jsonl", jsonl("once"))
    with Store(db) as store:
        assert Ingestor(store).ingest(path, move=False).outcome == "ingested"
        assert path.exists()
        assert Ingestor(store).ingest(path).outcome == "already"
        assert store.file_marks() == []  # the mark goes once the file has left the directory
    assert stats_in(db) == ["once"] and (drop_dir / DONE / "window.jsonl").exists()


def test_a_file_read_while_the_clock_is_wrong_has_its_undated_records_held(drop_dir, db):
    """Stamped as `spool add` stamps: a box that booted in 1970 holds a record until its time is known."""
    content = jsonl("dated") + '{"stat": "undated", "count": 1}\n'
    with Store(db) as store:
        result = Ingestor(store, clock=lambda: 86_400.0).ingest(drop(drop_dir, "early.jsonl", content))
        assert result.outcome == "ingested"
        assert (store.counts()["pending"], store.counts()["held"]) == (1, 1)
        assert [r.stat for _, _, r in store.records(State.HELD)] == ["undated"]


def test_a_file_longer_than_the_shutdown_check_interval_is_ingested_whole(drop_dir, db):
    from spool.watch import INTERRUPT_EVERY

    stats = [f"s{i}" for i in range(INTERRUPT_EVERY + 1)]
    with Store(db) as store:
        result = Ingestor(store).ingest(drop(drop_dir, "big.jsonl", jsonl(*stats)))
    assert (result.outcome, result.records) == ("ingested", INTERRUPT_EVERY + 1)
    assert len(stats_in(db)) == INTERRUPT_EVERY + 1


def test_a_shutdown_while_a_large_file_is_read_commits_nothing_and_leaves_the_file(drop_dir, db):
    from spool.watch import INTERRUPT_EVERY, IngestResult

    path = drop(drop_dir, "big.jsonl", jsonl(*[f"s{i}" for i in range(INTERRUPT_EVERY + 1)]))
    with Store(db) as store:
        assert Ingestor(store, interrupted=lambda: True).ingest(path) == IngestResult(path, "interrupted")
    assert stats_in(db) == [] and path.exists()


def test_a_file_that_changes_while_it_is_read_is_left_to_settle_and_read_again_whole(drop_dir, db):
    from spool.watch import INTERRUPT_EVERY

    stats = [f"s{i}" for i in range(INTERRUPT_EVERY + 1)]
    path = drop(drop_dir, "growing.jsonl", jsonl(*stats))

    def producer_writes_on() -> bool:  # called while the file is being read
        with open(path, "a") as out:
            out.write(jsonl("late"))
        return False

    with Store(db) as store:
        result = Ingestor(store, interrupted=producer_writes_on).ingest(path)
        assert (result.path, result.outcome, result.records) == (path, "changing", 0)
        assert "read again once it settles" in result.describe()
        assert stats_in(db) == [] and path.exists()
        assert Ingestor(store).ingest(path).records == INTERRUPT_EVERY + 2
    assert stats_in(db) == [*stats, "late"]


def test_a_json_file_that_grew_after_it_was_taken_is_rejected_not_read_twice(drop_dir, db):
    path = drop(drop_dir, "batch.json", jsonl("first"))
    with Store(db) as store:
        assert Ingestor(store).ingest(path, move=False).records == 1
        with open(path, "a") as out:
            out.write(jsonl("second"))
        result = Ingestor(store).ingest(path)
    assert result.outcome == "rejected" and "can be appended to" in str(result.errors[0])
    assert (drop_dir / REJECTED / "batch.json").exists() and not path.exists()
    assert "can be appended to" in (drop_dir / REJECTED / "batch.json.error.txt").read_text()
    assert stats_in(db) == ["first"]


def test_a_file_gone_before_it_is_read_is_reported_as_vanished_by_its_name(drop_dir, db):
    from spool.watch import IngestResult

    with Store(db) as store:
        assert Ingestor(store).ingest(drop_dir / "gone.jsonl") == IngestResult(drop_dir / "gone.jsonl", "vanished")


def test_every_rejected_file_gets_its_report_in_a_folder_only_spool_can_read(drop_dir, db):
    with Store(db) as store:
        first = Ingestor(store).ingest(drop(drop_dir, "one.jsonl", '{"stat": ""}\n{"stat": "x"}\n'))
        Ingestor(store).ingest(drop(drop_dir, "two.jsonl", "{nope\n"))
    assert first.describe() == "rejected one.jsonl: line 1: give count or value (and 1 more)"
    assert os.stat(drop_dir / REJECTED).st_mode & 0o777 == 0o700  # a bad cell may hold a key
    for name in ("one.jsonl", "two.jsonl"):
        report = drop_dir / REJECTED / f"{name}.error.txt"
        assert report.read_text().startswith("line 1:") and os.stat(report).st_mode & 0o777 == 0o600


def test_a_missing_drop_directory_is_refused_naming_it(tmp_path):
    from spool.errors import ConfigError
    from spool.watch import check_directory

    with pytest.raises(ConfigError, match="does not exist or is not a directory"):
        check_directory(tmp_path / "missing")
