"""Large appends: staged in chunks, hidden by the ids they span until their last transaction publishes them whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import spool.store.appends
from spool import Spool
from spool.errors import InvalidRecord, SpoolFull, StoreError
from spool.owners import owners_directory
from spool.records import make_record, record_rows
from spool.ship import Shipper
from spool.store import SCHEMA_VERSION, STAGE_CHUNK, State, Store

from .helpers import (
    IN_PID_NAMESPACE,
    T0,
    TEST_EZKEY,
    assert_counts_true,
    cli_env,
    make_config,
    pid_namespace_unavailable,
    run_cli,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent


def rows(n: int, *, stat: str = "big", t: int = T0, start: int = 0) -> list[tuple[Any, ...]]:
    return [(f"{stat}{i}", None, None, None, 0, 1, t + i) for i in range(start, start + n)]


def spans(store: Store) -> int:
    return store.conn.execute("SELECT count(*) FROM stage_spans").fetchone()[0]


def everything_a_reader_sees(db: Path) -> dict[str, Any]:
    """What every reader of records reports, from another connection (another process would see the same); and
    the kept counts must be true (staged records count as staged)."""
    assert_counts_true(db)
    with Store(db) as other:
        seen = {
            "counts": {k: v for k, v in other.counts().items() if v},
            "backlog": other.backlog(),
            "oldest": other.oldest_pending_t(),
            "keyless": other.keyless_among_oldest(10_000),
            "records": sorted(r.stat for _, _, r in other.records()),
            "pending records": sorted(r.stat for _, _, r in other.records(State.PENDING)),
            "held records": sorted(r.stat for _, _, r in other.records(State.HELD)),
            "selected": other.count_selected("all"),
            "export": sorted(r.stat for _, r in other.export("pending")),
        }
        lease = other.lease(10_000, now=T0, keyed_only=False)
        seen["leased"] = sorted(item.stat for item in lease.items) if lease else []
        if lease:
            other.end_lease(lease.id)
    return seen


def test_no_reader_sees_any_part_of_a_large_append_until_it_is_whole(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"old{i}", "count": 1, "t": T0 + 10_000 + i} for i in range(3))
        sp.store.append([make_record(stat="undated old", count=1, clock_now=0)])
    before = everything_a_reader_sees(db)
    assert before["counts"] == {"pending": 3, "held": 1} and len(before["leased"]) == 3
    seen = []

    def watched() -> Iterator[Any]:
        for i, row in enumerate([*rows(5), make_record(stat="undated", count=1, clock_now=0), *rows(44, start=5)]):
            if i in (10, 30, 49):  # after 1, 3 and 4 chunks are committed
                seen.append(everything_a_reader_sees(db))
            yield row

    with Store(db) as store:
        assert store.append(watched(), chunk=10) == 50
        assert spans(store) == 0 and store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0
    assert seen == [before] * 3  # older records than what was visible (t), and held ones too: none of it
    after = everything_a_reader_sees(db)
    assert after["counts"] == {"pending": 52, "held": 2}
    # The oldest pending time is that of the next record to ship (the first appended): one of those before it.
    assert len(after["leased"]) == 52 and after["oldest"] == T0 + 10_000


def test_the_last_transaction_publishes_without_rewriting_a_record(db):
    with Store(db) as store:
        store.append(rows(100), chunk=10)
        # Each chunk's rows are written once, in their final state: the table has no STAGED record and the
        # (merged) span of the ids is gone with the stage.
        assert store.conn.execute(f"SELECT count(*) FROM records WHERE state = {State.STAGED}").fetchone()[0] == 0
        assert store.conn.execute("SELECT min(id), max(id), count(*) FROM records").fetchone() == (1, 100, 100)
        assert store.conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'staged'").fetchone()[0] == 0


def test_a_shipper_draining_beside_a_large_append_ships_none_of_it_until_it_is_whole(db, receiver):
    with Spool(db) as sp:
        sp.add_many({"stat": f"live{i}", "count": 1, "t": T0 + 100_000 + i} for i in range(30))
    config = make_config(db, receiver, batch_size=7)
    shipped_midway = []

    def watched() -> Iterator[Any]:
        for i, row in enumerate(rows(95)):
            if i and i % 20 == 0:  # chunks of the append are committed: a whole drain runs now
                with Store(db) as store, Shipper(store, config) as shipper:
                    shipper.drain(max_time=30)
                shipped_midway.append(len(receiver.accepted))
            yield row

    with Store(db) as store:
        assert store.append(watched(), chunk=10) == 95
    assert shipped_midway == [30, 30, 30, 30]
    assert all(a["stat"].startswith("live") for a in receiver.accepted)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=30).done
        assert store.counts()["sent"] == 125
    assert len(receiver.accepted) == 125


def test_a_failed_validation_midway_leaves_nothing_and_no_span(db):
    objs = [{"stat": f"s{i}", "count": 1, "t": T0} for i in range(35)] + [{"stat": "", "count": 1, "t": T0}]
    with Store(db) as store:
        with pytest.raises(InvalidRecord):
            store.append(record_rows(objs), chunk=10)
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 0
        assert spans(store) == 0 and store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0


def test_bounds_enforced_beside_an_open_stage_never_touch_its_records(db):
    """drop_oldest, compaction, age drops and re-stamping work on published records only: an open stage's are not
    theirs, though they are the oldest, mergeable, expired and held records in the spool."""
    from spool.clock import boot_clock, boot_id

    staged = [("staged", None, None, None, 0, 1, T0 - 5_000 + i) for i in range(30)]
    staged[3] = make_record(stat="undated", count=1, clock_now=0)
    outcomes = {}

    def watched() -> Iterator[Any]:
        for i, row in enumerate(staged):
            if i == 25:
                with Spool(db, max_pending=6, max_age=60) as other:
                    other.add_many({"stat": "x", "count": 1, "t": T0 + k} for k in range(6))  # drops the oldest
                    outcomes["compacted"] = other.store.compact_counts(bucket=3600)  # the 6 x left: 1
                    outcomes["expired"] = other.store.drop_expired(now=T0 + 1_000_000)  # that one
                    outcomes["restamped"] = other.store.restamp_held(wall=T0, mono=boot_clock(), boot=boot_id(),
                                                                     floor=T0 - 10)
                    outcomes["lost"] = other.store.restamp_held(wall=T0, mono=0, boot="another boot", floor=T0)
                    moved: list[Any] = []
                    outcomes["moved"] = other.store.move_out("all", moved.extend)  # export --remove
                    outcomes["counters"] = other.store.counters()
            yield row

    with Store(db) as store:
        store.append([make_record(stat="x", count=1, t=T0 - 1)])
        assert store.append(watched(), chunk=10) == 30
        left = sorted((r.stat, state) for _, state, r in store.records())
    assert outcomes["compacted"] == 5 and outcomes["expired"] == 1 and outcomes["restamped"] == (0, 0)
    assert outcomes["lost"] == (0, 0) and outcomes["moved"] == 0 and outcomes["counters"]["dropped_oldest"] == 1
    assert left == sorted([("staged", State.PENDING)] * 29 + [("undated", State.HELD)])


def test_a_full_spool_refuses_a_large_append_whole_and_discards_what_was_staged(db):
    with Spool(db, max_pending=40, when_full="reject_new") as sp:
        sp.add_many({"stat": "x", "count": 1, "t": T0} for _ in range(5))
        with pytest.raises(SpoolFull, match="5 records waiting, the limit is 40; 50 new records refused"):
            sp.store.append(rows(50), chunk=10)
        assert sp.store.counts()["pending"] == 5
        assert sp.store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 5 and spans(sp.store) == 0


_KILLED_APPEND = textwrap.dedent("""
    import os, sys, time
    from spool.store import Store
    T0, db = int(sys.argv[2]), sys.argv[1]

    def rows():
        for i in range(100):
            if i == 65:  # six chunks committed: say so and wait to be killed
                print("staged", flush=True)
                time.sleep(60)
            yield (f"big{i}", None, None, None, 0, 1, T0 + i)

    with Store(db) as store:
        store.append(rows(), chunk=10)
""")


def test_a_large_append_killed_midway_leaves_nothing_visible_or_shipped_and_is_swept(db, receiver, monkeypatch):
    with Spool(db) as sp:
        sp.add_many({"stat": f"live{i}", "count": 1, "t": T0 + 1_000 + i} for i in range(5))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_APPEND, str(db), str(T0)], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline() == "staged\n"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.communicate(timeout=30)
    with Store(db) as store:
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 65  # 60 staged, on disk
        assert everything_a_reader_sees(db)["counts"] == {"pending": 5}
        with Shipper(store, make_config(db, receiver, batch_size=4)) as shipper:  # the shipper sweeps first
            monkeypatch.setattr(spool.store.appends, "SWEEP_CHUNK", 7)  # discarded in small transactions
            assert shipper.drain(max_time=30).done
        assert sorted(a["stat"] for a in receiver.accepted) == [f"live{i}" for i in range(5)]
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 5
        assert spans(store) == 0 and store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0
        assert store.integrity_ok()
    assert not list(owners_directory(db).iterdir())  # the killed owner's lock file went with its proof of death


def test_discarding_a_stage_in_pieces_keeps_what_is_left_hidden(db, monkeypatch):
    with Store(db) as store:
        store.append(rows(3, stat="live"))
        store.conn.execute("INSERT INTO stages (id, owner, started_at) VALUES (99, 'x', 0)")
        store.conn.execute("BEGIN IMMEDIATE")
        store._stage_chunk(store.conn, 99, rows(25))
        store.conn.execute("COMMIT")
        monkeypatch.setattr(spool.store.appends, "SWEEP_CHUNK", 10)
        left = []
        real_write = store._write

        def watching_write(**kw: Any) -> Any:  # after each discarding transaction, look from another connection
            left.append(everything_a_reader_sees(db)["counts"])
            return real_write(**kw)

        monkeypatch.setattr(store, "_write", watching_write)
        store._discard_stage(99)
        monkeypatch.undo()
        assert left == [{"pending": 3}] * 4
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3 and spans(store) == 0


def test_a_version_5_spool_keeps_its_records_and_discards_appends_staged_the_old_way_once_their_boot_is_over(db):
    """Version 5 named a stage's owner by boot, pid and process start: a pid cannot tell a process that died from
    one in another PID namespace, so such a stage is discarded only once its boot is over. Until then the spool is
    not upgraded (version 10 copies every record into its new layout): it says so, and nothing is lost."""
    import sqlite3
    from contextlib import closing

    from spool.clock import boot_id
    from spool.errors import StoreError
    from spool.store.schema import _MIGRATIONS

    dead, running = "an-earlier-boot:4242:1234", f"{boot_id()}:4242:1234"
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:  # version 5's layout, as it wrote it
        for version in range(1, 6):
            _MIGRATIONS[version](conn)
        conn.executemany("INSERT INTO records (stat, kind, number, t) VALUES (?, 0, 1, ?)",
                         [(f"kept{i}", T0 + i) for i in range(3)])
        # A version-5 append of an earlier boot, and one of this boot that may still be running.
        conn.execute("INSERT INTO stages (id, owner, started_at) VALUES (7, ?, 0), (8, ?, 0)", (dead, running))
        conn.executemany(f"INSERT INTO records (stat, kind, number, t, state, stage) VALUES (?, 0, 1, ?, "
                         f"{State.STAGED}, ?)", [(f"s{stage} {i}", T0, stage) for stage in (7, 8) for i in range(12)])
        conn.execute("PRAGMA user_version = 5")
    with pytest.raises(StoreError, match="still running"):
        Store(db)
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5  # untouched: the migration is one transaction
        assert conn.execute("SELECT count(*) FROM records").fetchone()[0] == 27
        conn.execute("UPDATE stages SET owner = ? WHERE id = 8", (dead,))  # now its boot is over too
    with Store(db) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert sorted(r.stat for _, _, r in store.records()) == ["kept0", "kept1", "kept2"]
        assert store.counts() == {"pending": 3, "inflight": 0, "sent": 0, "dead": 0, "held": 0}
        assert store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0
        store.append(rows(25, stat="new"), chunk=10)
        assert store.counts()["pending"] == 28
    assert_counts_true(db)


def test_a_stage_an_earlier_release_left_is_kept_while_its_boot_lasts(db):
    """Schema 6 named a stage's owner by boot, pid and process start: kept while that boot lasts, discarded after."""
    from spool.clock import boot_id

    with Store(db) as store:
        store.append(rows(3, stat="live"))
        store.conn.execute("INSERT INTO stages (id, owner, started_at) VALUES (99, ?, 0)", (f"{boot_id()}:1:1",))
        store.conn.execute("BEGIN IMMEDIATE")
        store._stage_chunk(store.conn, 99, rows(25))
        store.conn.execute("COMMIT")
        assert store.sweep_stages() == 0  # pid 1 is not that process here, but it may be pid 1 elsewhere
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 28
        store.conn.execute("UPDATE stages SET owner = 'an-earlier-boot:1:1'")
        assert store.sweep_stages() == 1
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3 and spans(store) == 0


def test_status_of_a_spool_with_an_open_stage_counts_only_what_is_published(db):
    seen = []

    def watched() -> Iterator[Any]:
        for i, row in enumerate(rows(25)):
            if i == 21:
                with Spool(db) as other:
                    status = other.status()
                    seen.append((status["pending"], status["held"], status["oldest_pending_t"]))
            yield row

    with Store(db) as store:
        store.append(rows(2, stat="live", t=T0 + 5))
        store.append(watched(), chunk=10)
    assert seen == [(2, 0, T0 + 5)]


# -- who may discard a stage ---------------------------------------------------------------------------------


def staged_spans(db: Path) -> int:
    with Store(db) as store:
        return spans(store)


def test_an_import_in_another_pid_namespace_lands_whole_beside_a_shipper_on_the_host(db, receiver):
    """A producer in a container sharing the spool's volume: its pid means nothing on the host (it is pid 1 there,
    and the host's pid 1 is another process), which must not be taken for its death."""
    if reason := pid_namespace_unavailable():
        pytest.skip(reason)
    with Spool(db) as sp:
        sp.add_many({"stat": f"live{i}", "count": 1, "t": T0 + i} for i in range(5))
    n = 2 * STAGE_CHUNK + 500
    lines = [f'{{"stat":"i{i}","count":1,"t":{T0}}}\n' for i in range(n)]
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    importer = subprocess.Popen([*IN_PID_NAMESPACE, sys.executable, "-m", "spool", "import", "-"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env)
    try:
        assert importer.stdin is not None
        importer.stdin.write("".join(lines[:STAGE_CHUNK + 1]))  # its first chunk commits; it waits for the rest
        importer.stdin.flush()
        wait_for(lambda: staged_spans(db) > 0)
        shipped = run_cli(db, "ship", "--once", env=env)  # sweeps the stages of dead owners first
        assert shipped.returncode == 0, shipped.stderr
        _, stderr = importer.communicate("".join(lines[STAGE_CHUNK + 1:]), timeout=60)
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.communicate()
    assert importer.returncode == 0, stderr
    assert f"imported {n:,} records" in stderr
    with Store(db) as store:
        assert store.counts() == {"pending": n, "inflight": 0, "sent": 5, "dead": 0, "held": 0}


_EMULATED = textwrap.dedent("""
    import sys
    import spool.clock
    # qemu-user answers an emulated process's read of /proc/self/stat with a start time of its own making:
    # what the process would record about itself is not what the kernel shows everyone else.
    spool.clock._start_time = lambda pid: "1"
    from spool.store import Store
    T0, db = int(sys.argv[2]), sys.argv[1]

    def rows():
        for i in range(100):
            if i == 35:  # three chunks committed: say so and wait
                print("staged", flush=True)
                sys.stdin.readline()
            yield (f"big{i}", None, None, None, 0, 1, T0 + i)

    try:
        with Store(db) as store:
            print(store.append(rows(), chunk=10), flush=True)
    except Exception as exc:
        print(f"failed: {exc}", flush=True)
""")


def test_an_append_under_an_emulator_that_fakes_its_start_time_lands_whole_beside_a_shipper(db, receiver):
    with Spool(db) as sp:
        sp.add_many({"stat": f"live{i}", "count": 1, "t": T0 + i} for i in range(5))
    child = subprocess.Popen([sys.executable, "-c", _EMULATED, str(db), str(T0)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline() == "staged\n"
        env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
        shipped = run_cli(db, "ship", "--once", env=env)
        assert shipped.returncode == 0, shipped.stderr
        said, _ = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
        child.communicate()
    assert said == "100\n"
    with Store(db) as store:
        assert store.counts() == {"pending": 100, "inflight": 0, "sent": 5, "dead": 0, "held": 0}


def discard_partly(db: Path, n: int) -> None:
    """Discard the first `n` records of the open stage as one transaction of a sweep does (span shrinking)."""
    with Store(db) as other:
        conn = other.conn
        lo, hi = conn.execute("SELECT lo, hi FROM stage_spans ORDER BY lo LIMIT 1").fetchone()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM records WHERE id BETWEEN ? AND ?", (lo, lo + n - 1))
        conn.execute("UPDATE stage_spans SET lo = ? WHERE lo = ?", (lo + n, lo))
        conn.execute("COMMIT")


def discard_whole(db: Path) -> None:
    with Store(db) as other:
        [(stage,)] = other.conn.execute("SELECT id FROM stages").fetchall()
        other._discard_stage(stage)


@pytest.mark.parametrize("when", ["between chunks", "before it publishes"])
@pytest.mark.parametrize("how", ["whole", "partly"])
def test_an_append_whose_stage_another_process_discarded_fails_and_publishes_nothing(db, when, how):
    """However the stage was lost (an older release that judged its owner by pid; a hand that removed the owners'
    locks), the append says so and publishes none of what is left: never a count of records that are not there."""
    discard = discard_whole if how == "whole" else lambda db: discard_partly(db, 5)

    def watched() -> Iterator[Any]:
        yield from rows(35)
        if when == "between chunks":
            discard(db)
        yield from rows(30, start=35)
        if when == "before it publishes":  # after the last row: what follows is the publishing transaction
            discard(db)

    with Store(db) as store:
        store.append(rows(3, stat="live"))
        with pytest.raises(StoreError, match=r"discarded by another process.*nothing was appended"):
            store.append(watched(), chunk=10)
        assert sorted(r.stat for _, _, r in store.records()) == ["live0", "live1", "live2"]
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 3
        assert spans(store) == 0 and store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0


def test_an_import_whose_stage_was_discarded_exits_non_zero_with_one_line_and_never_says_imported(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"live{i}", "count": 1, "t": T0 + i} for i in range(5))
    n = STAGE_CHUNK + 100
    lines = [f'{{"stat":"i{i}","count":1,"t":{T0}}}\n' for i in range(n)]
    importer = subprocess.Popen([sys.executable, "-m", "spool", "import", "-"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(db))
    try:
        assert importer.stdin is not None
        importer.stdin.write("".join(lines[:STAGE_CHUNK + 1]))
        importer.stdin.flush()
        wait_for(lambda: staged_spans(db) > 0)
        discard_partly(db, 100)  # as a sweep that took its owner for dead would begin
        _, stderr = importer.communicate("".join(lines[STAGE_CHUNK + 1:]), timeout=60)
    finally:
        if importer.poll() is None:
            importer.kill()
            importer.communicate()
    assert importer.returncode == 1
    assert "imported" not in stderr and "Traceback" not in stderr
    assert stderr.count("\n") == 1 and "discarded by another process" in stderr, stderr
    with Store(db) as store:
        assert store.counts()["pending"] == 5
        assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == 5


_CLAIMS_AND_DIES = textwrap.dedent("""
    import os, signal, sys
    from spool.store import Store
    store = Store(sys.argv[1])
    store.owners.claim()  # as a staged append or a lease begins
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_lock_files_of_owners_that_died_owning_nothing_are_removed_and_a_live_owners_stays(db):
    with Spool(db) as sp:
        sp.add({"stat": "small", "count": 1, "t": T0})
    assert not owners_directory(db).exists()  # an append that is not staged owns nothing: no lock taken
    killed = subprocess.run([sys.executable, "-c", _CLAIMS_AND_DIES, str(db)], env={**os.environ,
                            "PYTHONPATH": str(ROOT)})
    assert killed.returncode == -signal.SIGKILL
    with Store(db) as live, Store(db) as sweeper:
        mine = live.owners.claim()
        assert len(list(owners_directory(db).iterdir())) == 2
        assert sweeper.sweep_stages() == 0
        assert [path.name for path in owners_directory(db).iterdir()] == [mine.removeprefix("lock:")]
        assert sweeper.owners.is_alive(mine)
    assert not list(owners_directory(db).iterdir())  # closing gave it up
