"""Housekeeping that never walks the table: pruning, dead letters, a window of pending records, count compaction,
the WAL after a long reader, and the space a drained backlog leaves, on real spool files.

What a statement reads is measured by SQLite itself: a progress handler counts the virtual machine's steps, so
"reads no records" is "costs the same on a spool ten times larger", whatever the machine's speed.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spool.records import Record
from spool.ship import Shipper
from spool.store import State, Store
from spool.store.core import WAL_LIMIT, wal_reset_fixed
from tests.helpers import T0, TEST_EZKEY, assert_counts_true, cli_env, make_config, run_cli, wait_for

SMALL, LARGE = 2_000, 20_000
MINUTE = T0 // 60 * 60  # the start of a one-minute bucket


def counts(n: int, *, names: int = 50, per_second: int = 5, start: int = 0) -> list[tuple[Any, ...]]:
    """n EZ counts of `names` stats, `per_second` records per second of t (so several per name per minute)."""
    return [(f"s{i % names}", None, None, None, 0, 1, T0 + i // per_second) for i in range(start, start + n)]


def spool_of(path: Path, pending: int, **kwargs: Any) -> Store:
    store = Store(path, **kwargs)
    for lo in range(0, pending, 10_000):
        store.append(counts(min(10_000, pending - lo), start=lo))
    return store


@contextlib.contextmanager
def vm_steps(conn: sqlite3.Connection) -> Iterator[list[int]]:
    """Count the SQLite virtual machine's steps (in hundreds) run on `conn` inside the block."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(tick, 100)
    try:
        yield steps
    finally:
        conn.set_progress_handler(None, 0)


class Transactions:
    """The VM steps (in hundreds) and rows changed of each write transaction a connection commits."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.steps: list[int] = []
        self.changes: list[int] = []
        self._open: tuple[int, int] | None = None
        self._ticks = 0

    def __enter__(self) -> Transactions:
        self.conn.set_progress_handler(self._tick, 100)
        self.conn.set_trace_callback(self._trace)
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.set_progress_handler(None, 0)
        self.conn.set_trace_callback(None)

    def _tick(self) -> int:
        self._ticks += 1
        return 0

    def _trace(self, sql: str) -> None:
        if sql.startswith("BEGIN IMMEDIATE"):
            self._open = (self._ticks, self.conn.total_changes)
        elif sql == "COMMIT" and self._open is not None:
            ticks, changes = self._open
            self.steps.append(self._ticks - ticks)
            self.changes.append(self.conn.total_changes - changes)
            self._open = None


def bucket_sums(store: Store, bucket: int) -> dict[tuple[Any, ...], Any]:
    sums: dict[tuple[Any, ...], Any] = {}
    for _, state, r in store.records():
        key = (r.stat, r.kind, r.t // bucket * bucket if r.kind == 0 else r.t, state, r.number if r.kind else None)
        sums[key] = sums.get(key, 0) + (r.number if r.kind == 0 else 1)
    return sums


def settle_all(store: Store, *, now: float) -> None:
    while (lease := store.lease(500, now=T0, keyed_only=False)) is not None:
        store.ack([item.id for item in lease.items], now=now, lease=lease.id)


# -- pruning ----------------------------------------------------------------------------------------------


def prune_cost(path: Path, pending: int) -> int:
    with spool_of(path, pending) as store:
        lease = store.lease(10, now=T0, keyed_only=False)
        assert lease is not None
        store.ack([item.id for item in lease.items], now=T0 + 100.0, lease=lease.id)  # settled recently: kept
        with vm_steps(store.conn) as steps:
            assert store.prune_sent(sent_before=T0 - 1.0) == 0
        assert store.counts()["sent"] == 10
        return steps[0]


def test_pruning_with_nothing_old_enough_reads_no_records_however_large_the_backlog(tmp_path):
    # The hourly prune walked the whole table inside a write transaction when nothing was old enough (5.5 s
    # at 50M records): now it reads the oldest of the runs acknowledgements settled, and stops there.
    small, large = prune_cost(tmp_path / "small.db", SMALL), prune_cost(tmp_path / "large.db", LARGE)
    assert large <= small + 2, (small, large)


def test_pruning_takes_the_oldest_settled_first_a_step_per_transaction_and_stops_when_asked(db):
    with spool_of(db, 2_500) as store:
        leases = [store.lease(500, now=T0, keyed_only=False) for _ in range(5)]
        for i, lease in enumerate(reversed(leases)):  # the newest records were settled first
            assert lease is not None
            store.ack([item.id for item in lease.items], now=1000.0 + i, lease=lease.id)
        with Transactions(store.conn) as transactions:
            # Stopped after the first step (as at shutdown): the next run goes on from there.
            assert store.prune_sent(sent_before=1003.0, step=1000, between=lambda: False) == 1000
            assert store.prune_sent(sent_before=1003.0, step=1000) == 500
        # The records, the rows of their runs, the tally, and how many records each of the 50 series has left.
        assert transactions.changes == [1000 + 2 + 1 + 50, 500 + 1 + 1 + 50]
        left = sorted(i for i, state, _ in store.records() if state == State.SENT)
        assert left == sorted(item.id for lease in leases[:2] for item in lease.items)  # settled at 1003, 1004


def test_a_byte_bound_over_a_backlog_with_nothing_sent_reads_no_records_to_find_sent_ones(tmp_path):
    from spool.config import SpoolSettings

    def cost(path: Path, pending: int) -> int:
        with spool_of(path, pending) as store:
            used = store.conn.execute("SELECT (SELECT page_count FROM pragma_page_count) - "
                                      "(SELECT freelist_count FROM pragma_freelist_count)").fetchone()[0] * 1024
        with Store(path, limits=SpoolSettings(max_spool_bytes=used)) as store, vm_steps(store.conn) as steps:
            store.append(counts(50, start=pending))  # over the bound: delivered records would give way first
            assert store.counters()["dropped_oldest"] == 1000
            return steps[0]

    small, large = cost(tmp_path / "small.db", SMALL), cost(tmp_path / "large.db", LARGE)
    assert large <= small * 1.5 + 10, (small, large)


# -- dead letters and windows of pending records -----------------------------------------------------------


def test_listing_requeueing_and_purging_dead_letters_cost_nothing_when_there_are_none(tmp_path):
    def cost(path: Path, pending: int) -> int:
        with spool_of(path, pending) as store, vm_steps(store.conn) as steps:
            assert store.dead_letters() == []
            assert store.requeue_dead() == (0, (), ())
            assert store.purge_dead() == (0, ())
            return steps[0]

    small, large = cost(tmp_path / "small.db", SMALL), cost(tmp_path / "large.db", LARGE)
    assert large <= small + 2, (small, large)


def test_dead_letters_are_listed_oldest_first_from_their_index(db):
    with spool_of(db, 100) as store:
        lease = store.lease(100, now=T0, keyed_only=False)
        assert lease is not None
        ids = [item.id for item in lease.items]
        store.mark_dead(ids[50:60], reason="no", http_status=200, body="", now=T0)
        store.mark_dead(ids[5:8], reason="no", http_status=200, body="", now=T0 + 1)
        store.end_lease(lease.id)
        assert [d["id"] for d in store.dead_letters()] == sorted(ids[5:8] + ids[50:60])
        assert [d["id"] for d in store.dead_letters(2)] == ids[5:7]


def test_exporting_pending_records_reads_the_pending_ones_not_the_sent_ones_kept_for_replay(tmp_path):
    """Pending records are read from the queue's runs (and the few suspect or in flight): a spool that keeps ten
    times more sent records for replay exports its window of pending ones at the same cost."""
    def cost(path: Path, sent: int) -> tuple[int, list[int], list[int]]:
        with spool_of(path, sent) as store:
            while (lease := store.lease(5_000, now=T0, keyed_only=False)) is not None:
                store.ack([item.id for item in lease.items], now=T0, lease=lease.id)
            store.append(counts(SMALL))  # the pending backlog, the same in both
            # Late records inside the window, appended after the backlog: the export still lists by id.
            store.append([("late", None, None, None, 0, 1, T0 + 5)] * 3)
            with vm_steps(store.conn) as steps:
                exported = [i for i, _ in store.export("pending", until=T0 + 19)]  # `export --until T`
                assert store.count_selected("pending", until=T0 + 19) == len(exported)
            expected = [i for i, _, r in store.records(State.PENDING) if r.t <= T0 + 19]
            return steps[0], exported, expected

    small, exported, expected = cost(tmp_path / "small.db", SMALL)
    large, _, _ = cost(tmp_path / "large.db", LARGE)
    assert exported == expected and len(exported) == 103  # 20 seconds of 5 records, and the 3 late ones
    assert large <= small * 1.5, (small, large)


# -- compaction ----------------------------------------------------------------------------------------


def compaction_transactions(path: Path, pending: int, rows: int) -> Transactions:
    with spool_of(path, pending) as store:
        before = bucket_sums(store, 60)
        with Transactions(store.conn) as transactions:
            assert store.compact_counts(bucket=60, rows=rows) > 0
        assert bucket_sums(store, 60) == before
        return transactions


def test_each_compaction_transaction_reads_a_step_of_records_whatever_the_backlog(tmp_path):
    # One transaction grouped the whole backlog (6.4 s holding the write lock at 20M records), and a pass took
    # a transaction per few hundred groups (> 600 s at 5M): now a transaction reads at most `rows` index
    # entries, and a pass is one walk of the index.
    small = compaction_transactions(tmp_path / "small.db", 3_000, rows=200)
    large = compaction_transactions(tmp_path / "large.db", 30_000, rows=200)
    assert max(large.steps) <= max(small.steps) * 1.3, (max(small.steps), max(large.steps))
    assert len(large.steps) <= 30_000 // 200 + 1
    # Deletes (records, their queue entries), the rewrites of the sums, each series' count of records, its cursor.
    assert max(large.changes) <= 3 * 200 + 5


def test_a_bucket_larger_than_a_step_still_becomes_one_record_per_stat(db):
    with Store(db) as store:
        store.append([(f"s{i % 3}", None, None, None, 0, i, MINUTE + i % 60) for i in range(600)])  # one minute
        store.append([("v", None, None, None, 1, 2.5, MINUTE + 1)] * 4)  # values are never merged
        assert store.compact_counts(bucket=60, rows=50) == 600 - 3
        left = sorted((r.stat, r.number, r.t) for _, _, r in store.records())
        assert left == [(f"s{k}", sum(range(k, 600, 3)), MINUTE) for k in range(3)] + [("v", 2.5, MINUTE + 1)] * 4
        assert store.counters()["compacted"] == 597
    assert_counts_true(db)


def test_an_interrupted_compaction_resumes_where_it_stopped(tmp_path):
    whole, resumed = tmp_path / "whole.db", tmp_path / "resumed.db"
    with spool_of(whole, 6_000) as store, Transactions(store.conn) as uninterrupted:
        store.compact_counts(bucket=60, rows=500)
    with spool_of(resumed, 6_000) as store:
        asked: list[int] = []
        store.compact_counts(bucket=60, rows=500, between=lambda: len(asked) < 3 and not asked.append(1))
    with Store(resumed) as store, Transactions(store.conn) as rest:
        store.compact_counts(bucket=60, rows=500)  # another process, later: it goes on from the kept cursor
    assert len(rest.steps) == len(uninterrupted.steps) - 4
    with Store(whole) as a, Store(resumed) as b:
        assert [r for _, _, r in a.records()] == [r for _, _, r in b.records()]
    assert_counts_true(whole)
    assert_counts_true(resumed)


def test_a_sum_leased_between_two_steps_is_left_to_the_shipper_and_sums_stay_exact(db):
    with Store(db) as store:
        store.append([("s", None, None, None, 0, 1, MINUTE + i // 10) for i in range(400)])  # one bucket
        before = bucket_sums(store, 60)
        store.compact_counts(bucket=60, rows=100, between=lambda: False)  # one step: its sum is in the oldest record
        lease = store.lease(1, now=T0, keyed_only=False)
        assert lease is not None and lease.items[0].number == 100
        store.compact_counts(bucket=60, rows=100)
        assert [r.number for _, _, r in store.records(State.PENDING)] == [100, 300]  # a new sum; the leased kept
        assert bucket_sums(store, 60) == before
        store.end_lease(lease.id)
    assert_counts_true(db)


def test_a_finished_pass_merges_what_arrives_after_it_without_reading_the_backlog_again(db):
    with spool_of(db, 12_000) as store:
        store.compact_counts(bucket=60)
        newest = max(r.t for _, _, r in store.records())
        store.append([("s1", None, None, None, 0, 7, newest)] * 10)  # the newest bucket goes on
        with vm_steps(store.conn) as steps:
            assert store.compact_counts(bucket=60) == 10
        assert steps[0] < 50, steps[0]  # the newest bucket only, not 12,000 records
        sums = [r.number for _, _, r in store.records() if r.stat == "s1" and r.t == newest // 60 * 60]
        assert len(sums) == 1 and sums[0] > 70


def test_records_appended_after_a_pass_with_the_time_of_a_bucket_it_keeps_join_that_sum(db):
    with spool_of(db, 1_000) as store:
        store.compact_counts(bucket=60)
        before = len(list(store.records()))
        [(_, first)] = [(i, r) for i, _, r in store.records() if r.stat == "s1" and r.t == MINUTE]
        store.append([("s1", None, None, None, 0, 1, MINUTE + 1)] * 10)  # an old time, appended after the pass
        store.compact_counts(bucket=60)
        assert len(list(store.records())) == before
        [now] = [r for _, _, r in store.records() if r.stat == "s1" and r.t == MINUTE]
        assert now.number == first.number + 10
    assert_counts_true(db)


def test_records_given_back_behind_a_parked_pass_are_merged_by_the_next_whole_pass(db):
    with spool_of(db, 1_000) as store:
        lease = store.lease(10, now=T0, keyed_only=False)  # in flight while the pass goes by: not merged
        assert lease is not None
        store.compact_counts(bucket=60)
        store.end_lease(lease.id)  # back in the queue, behind where the pass parked
        before = len(list(store.records()))
        store.compact_counts(bucket=60)
        assert len(list(store.records())) == before  # not yet: a whole pass costs the backlog
        store.append(counts(1_000, start=1_000))  # as many new ids as the pass read: a whole pass is due
        store.compact_counts(bucket=60)
        groups = collections.Counter((r.stat, r.t // 60) for _, _, r in store.records())
        assert set(groups.values()) == {1}, groups  # one record per stat and minute: the given back ones too
    assert_counts_true(db)


def test_spool_add_completes_while_compaction_of_a_big_spool_is_under_way(db):
    added: list[Any] = []

    def between() -> bool:
        if not added:  # mid-pass: a producer's append (a process of its own) goes through
            added.append(run_cli(db, "add", "during", "--count", "5", "--t", str(T0 + 1), timeout=30))
        return True

    with spool_of(db, 30_000) as store:
        before = bucket_sums(store, 60)
        assert store.compact_counts(bucket=60, rows=1000, between=between) > 0
        assert added[0].returncode == 0, added[0].stderr
        assert [r for _, _, r in store.records() if r.stat == "during"] == [Record("during", None, None, None, 0, 5,
                                                                                   T0 + 1)]
        assert bucket_sums(store, 60) == {**before, ("during", 0, MINUTE, 0, None): 5}


def test_the_first_batch_ships_while_compaction_is_paused_between_transactions(db, receiver):
    # The shipper compacted the whole backlog before its first drain (the first batch at 1M records came after
    # 141 s instead of 1 s): compaction now runs beside the drain, in housekeeping's own thread and connection.
    with spool_of(db, 5_000):
        pass
    paused, release = threading.Event(), threading.Event()

    def between() -> None:
        paused.set()
        assert release.wait(30)

    config = make_config(db, receiver, compact_counts=60)
    with Store.for_config(config) as store, Shipper(store, config, between_housekeeping=between) as shipper:
        thread = threading.Thread(target=shipper.run)
        thread.start()
        try:
            assert paused.wait(30)
            wait_for(lambda: len(receiver.accepted) >= 500, 30)  # while compaction is still paused
            assert not release.is_set()
        finally:
            release.set()
            shipper.stop()
            thread.join(30)
    assert not thread.is_alive()


def test_housekeeping_leaves_the_write_lock_free_between_its_transactions_as_long_as_it_held_it():
    # A `spool add` waited 23 s behind compaction: taking the lock again at once, a long job can starve a
    # producer polling in SQLite's busy handler. Between two steps it now waits as long as the step took.
    from spool.ship import HOUSEKEEPING_GAP, Gap

    now, waits = [100.0], []
    gap = Gap(waits.append, monotonic=lambda: now[0])
    now[0] += 0.2  # a slow step
    gap()
    now[0] += 0.001  # a quick one
    gap()
    assert waits == [pytest.approx(0.2), HOUSEKEEPING_GAP] and HOUSEKEEPING_GAP >= 0.025


# -- the WAL and the file ------------------------------------------------------------------------------------


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_a_long_export_let_grow_is_copied_when_it_ends_and_then_started_over(db):
    # A 60 s export during a drain grew the WAL to 372 MiB, and it stayed that size.
    with spool_of(db, 1_000) as reader, Store(db) as writer:
        exported = reader.export("pending")
        next(exported)  # the export's snapshot is held from here
        for lo in range(0, 30_000, 1_000):
            writer.append(counts(1_000, start=1_000 + lo))
        grown = wal_size(db)
        assert grown > 1 << 19
        before = db.stat().st_size  # the writer's checkpoints could copy only what the export's snapshot has
        assert before < grown >> 4
        assert sum(1 for _ in exported) == 999
        assert db.stat().st_size > before + (grown >> 2)  # copied into the database as the export ended
        writer.append(counts(1_000, start=40_000))
        assert wal_size(db) == min(grown, WAL_LIMIT)  # started over from its beginning: not appended to
        assert reader.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == WAL_LIMIT


def test_no_spool_connection_runs_sqlites_automatic_checkpoints(db):
    # SQLite before 3.51.3 can corrupt a WAL database when a checkpoint that does not hold the write lock starts as
    # another connection's commit restarts the WAL: automatic checkpoints are such checkpoints.
    with Store(db) as store:
        store.append(counts(10))
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        store.checkpoint()
        assert store._guard is not None
        assert store._guard.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0


def test_a_producer_alone_keeps_the_wal_small_with_checkpoints_of_its_own(db):
    with Store(db, synchronous="normal") as store:
        for i in range(2_000):  # one record per commit, as `spool add` and the relay under light load append
            store.append(counts(1, start=i))
        assert db.stat().st_size > 30 << 10  # most of them copied into the database (without: one 1 KiB page)
        assert wal_size(db) < 1 << 20  # 2,000 commits of five or six 1 KiB pages each: 11 MiB


def test_short_lived_producers_keep_the_wal_bounded_while_another_connection_stays_open(db):
    # Each Store commits once, far from a cadence of its own, and none is the last connection to close.
    long_name = "x" * 200
    with Store(db) as staying:
        staying.append(counts(1))
        for n in range(200):
            with Store(db, synchronous="normal") as once:
                once.append([(f"{long_name} {n} {i}", None, None, None, 0, 1, T0) for i in range(100)])
        assert wal_size(db) <= WAL_LIMIT + (512 << 10), wal_size(db)  # 200 of about 60 kB: 12 MB unchecked


@pytest.mark.parametrize(("version", "fixed"), [((3, 37, 2), False), ((3, 40, 1), False), ((3, 44, 5), False),
                                              ((3, 44, 6), True), ((3, 45, 0), False), ((3, 50, 6), False),
                                              ((3, 50, 7), True), ((3, 51, 2), False), ((3, 51, 3), True),
                                              ((3, 52, 0), True)])
def test_the_versions_with_the_fix_of_the_wal_reset_bug_are_known(version, fixed):
    assert wal_reset_fixed(version) is fixed


def test_doctor_says_which_sqlite_is_in_use_and_whether_it_has_the_wal_reset_bug(db, receiver):
    with Store(db) as store:
        store.append(counts(1))
    doctor = run_cli(db, "doctor", env=cli_env(db, SPOOL_ENDPOINT=receiver.url, SPOOL_EZKEY=TEST_EZKEY))
    [line] = [line for line in doctor.stdout.splitlines() if line.startswith("ok   spool:")]
    assert f"SQLite {sqlite3.sqlite_version}" in line, line
    assert ("WAL-reset bug" in line) is not wal_reset_fixed(sqlite3.sqlite_version_info), line


def test_a_checkpoint_holds_the_lock_of_the_file_it_copies_and_makes_no_other(db, tmp_path, monkeypatch):
    # The guard was opened by path when first needed: after the spool was moved aside under an open Store it made
    # and locked a new file there, and the copy ran unguarded; after a change of directory, the same elsewhere.
    with Store(db) as store:
        store.append(counts(10))
        db.rename(db.with_name("aside.db"))
        assert store.checkpoint() is None  # not that file any more: nothing to guard it with
        assert not db.exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    with Store("relative.db") as store:
        store.append(counts(10))
        monkeypatch.chdir(elsewhere)
        frames, copied = store.checkpoint()
        assert frames == copied > 0
        assert not (elsewhere / "relative.db").exists()


def test_a_checkpoint_copies_the_wal_only_while_it_holds_the_write_lock(db):
    class Watched(Store):
        def _copy_wal(self) -> tuple[int, int, int]:
            with (contextlib.closing(sqlite3.connect(db, timeout=0)) as other,
                  pytest.raises(sqlite3.OperationalError, match="locked")):
                other.execute("BEGIN IMMEDIATE")  # no commit can restart the WAL while it is copied
            copying.append(True)
            return super()._copy_wal()

    copying: list[bool] = []
    with Watched(db) as store:
        store.append(counts(100))
        frames, copied = store.checkpoint()
        assert copying == [True] and frames == copied > 0
        with contextlib.closing(sqlite3.connect(db)) as other:
            other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the checkpoint is left for later
            assert store.checkpoint(wait=0.01) is None
            other.execute("ROLLBACK")
        assert copying == [True]
        store.append(counts(1))  # and the lock was let go: writes go on


def drained_and_pruned(store: Store, n: int) -> int:
    """Append n records, ship and prune them all; return the file's size then."""
    for lo in range(0, n, 10_000):
        store.append(counts(min(10_000, n - lo), start=lo))
    settle_all(store, now=1000.0)
    assert store.prune_sent(sent_before=2000.0) == n
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.path.stat().st_size


def test_a_new_spool_gives_back_the_space_a_drained_backlog_left_in_bounded_steps(db):
    with Store(db) as store:
        assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL, for every new spool
        drained = drained_and_pruned(store, 40_000)
        assert drained > 600 << 10  # 40,000 records of about 17 bytes, freed
        pages: list[int] = [store.conn.execute("PRAGMA page_count").fetchone()[0]]

        def between() -> bool:
            pages.append(store.conn.execute("PRAGMA page_count").fetchone()[0])
            return True

        released = store.release_space(step=64, keep=128 << 10, between=between)
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # Each transaction a step: 64 free pages, and the pointer-map page (one per ~200 pages) they may leave.
        assert max(a - b for a, b in itertools.pairwise(pages)) <= 65
        assert len(pages) > 5 and 0 < released <= pages[0] - pages[-1]
        assert store.path.stat().st_size <= 256 << 10, store.path.stat().st_size
        assert store.release_space(keep=128 << 10) == 0  # what is left is the reserve new records take
        store.append(counts(100))
        assert store.counts()["pending"] == 100


def test_an_existing_spool_keeps_its_mode_and_reuses_its_free_pages(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:  # made before new spools were INCREMENTAL
        conn.execute("PRAGMA page_size = 1024")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE early (x)")
    with Store(db) as store:
        assert store.conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0  # switching would rewrite the file
        drained = drained_and_pruned(store, 20_000)
        assert store.release_space() == 0
        drained_and_pruned(store, 20_000)  # the next backlog takes the pages the last one freed
        assert store.path.stat().st_size <= drained * 1.05


def test_housekeeping_prunes_and_gives_the_space_back(db, receiver):
    now = [1_000_000.0]
    config = make_config(db, receiver, retention=3600)
    long_name = "a stat with a long name, as some are: " + "x" * 80
    with Store.for_config(config) as store:
        for lo in range(0, 60_000, 10_000):
            # Names of their own: what a name costs is kept once per name, and given back with its last record.
            store.append([(f"{long_name} {i}", None, None, None, 0, 1, T0 + i) for i in range(lo, lo + 10_000)])
        settle_all(store, now=now[0])  # shipped (as the drain settles them)
    with Store.for_config(config) as store, Shipper(store, config, clock=lambda: now[0],
                                                    between_housekeeping=lambda: None) as shipper:
        full = store.path.stat().st_size
        assert full > 1 << 20
        now[0] += 3601
        shipper.housekeeping()
        assert store.counts()["sent"] == 0
        assert store.conn.execute("SELECT count(*) FROM series").fetchone()[0] == 0
        store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert store.path.stat().st_size < full / 2


# -- upgrades -----------------------------------------------------------------------------------------------


def test_a_schema_7_spool_gets_its_settled_runs_and_the_index_of_dead_letters(db):
    from spool.store.schema import _MIGRATIONS

    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as conn:  # version 7's layout, as it wrote it
        for version in range(1, 8):
            _MIGRATIONS[version](conn)
        conn.executemany("INSERT INTO records (stat, kind, number, t, state, done_at) VALUES (?, 0, 1, ?, 2, 1000.0)",
                         [(f"s{i % 50}", T0 + i) for i in range(100)])
        conn.execute("PRAGMA user_version = 7")
    with Store(db) as store:
        names = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master")}
        assert {"settled", "dead"} <= names
        assert store.counts()["sent"] == 100
        assert store.prune_sent(sent_before=999.0) == 0
        assert store.prune_sent(sent_before=2000.0) == 100  # the sent records from before were entered
        assert store.conn.execute("SELECT count(*) FROM settled").fetchone()[0] == 0


def test_status_with_no_key_configured_looks_at_the_oldest_records_not_the_backlog(tmp_path):
    """With no ezkey configured, `spool status` counted every pending record without a key (2.7 s at 5M records):
    it looks at the oldest 1,000, as /healthz does, and says when there may be more."""
    from spool import Spool

    def cost(name: str, pending: int) -> tuple[int, dict[str, Any]]:
        spool_of(tmp_path / f"{name}.db", pending).close()
        with Spool(tmp_path / f"{name}.db") as sp:
            assert not sp.config.ship.keyed
            with vm_steps(sp.store.conn) as steps:
                report = sp.status()
            return steps[0], report

    small, _ = cost("small", SMALL)
    large, report = cost("large", LARGE)
    assert large <= small * 1.5, (small, large)
    problems = " ".join(problem["text"] for problem in report["health"]["problems"])
    assert "1,000+ pending records carry no ezkey and none is configured" in problems, problems
