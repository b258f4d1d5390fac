"""Housekeeping that never walks the table: pruning, dead letters, a window of pending records, count compaction,
the WAL after a long reader, and the space a drained backlog leaves, on real spool files.

What a statement reads is measured by SQLite itself: a progress handler counts the virtual machine's steps, so
"reads no records" is "costs the same on a spool ten times larger", whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spool.store import State, Store
from tests.helpers import T0

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
        assert transactions.changes == [1000 + 2, 500 + 1]  # the records, and the rows of their runs
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
            assert store.requeue_dead() == (0, ())
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


def test_exporting_a_window_of_pending_records_reads_the_window_not_the_backlog(tmp_path):
    def cost(path: Path, pending: int) -> tuple[int, list[int], list[int]]:
        with spool_of(path, pending) as store:
            # Late records inside the window, appended after the backlog: the export still lists by id.
            store.append([("late", None, None, None, 0, 1, T0 + 5)] * 3)
            with vm_steps(store.conn) as steps:
                exported = [i for i, _ in store.export("pending", until=T0 + 19)]  # `export --until T`
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


# -- the WAL and the file ------------------------------------------------------------------------------------


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_wal_a_long_export_let_grow_is_emptied_when_it_ends(db):
    # A 60 s export during a drain grew the WAL to 372 MiB, and it stayed that size.
    with spool_of(db, 1_000) as reader, Store(db) as writer:
        exported = reader.export("pending")
        next(exported)  # the export's snapshot is held from here
        for lo in range(0, 30_000, 1_000):
            writer.append(counts(1_000, start=1_000 + lo))
        grown = wal_size(db)
        assert grown > 1 << 20
        assert sum(1 for _ in exported) == 999
        assert wal_size(db) == 0, (grown, wal_size(db))
        assert reader.conn.execute("PRAGMA journal_size_limit").fetchone()[0] == 16 << 20


def drained_and_pruned(store: Store, n: int) -> int:
    """Append n records, ship and prune them all; return the file's size then."""
    for lo in range(0, n, 10_000):
        store.append(counts(min(10_000, n - lo), start=lo))
    settle_all(store, now=1000.0)
    assert store.prune_sent(sent_before=2000.0) == n
    store.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return store.path.stat().st_size


# -- upgrades -----------------------------------------------------------------------------------------------


def test_a_schema_7_spool_gets_its_settled_runs_and_the_index_of_dead_letters(db):
    with spool_of(db, 100) as store:
        settle_all(store, now=1000.0)
        store.conn.execute("DROP TABLE settled")
        store.conn.execute("DROP INDEX dead")
        store.conn.execute("PRAGMA user_version = 7")
    with Store(db) as store:
        names = {row[0] for row in store.conn.execute("SELECT name FROM sqlite_master")}
        assert {"settled", "dead"} <= names
        assert store.prune_sent(sent_before=999.0) == 0
        assert store.prune_sent(sent_before=2000.0) == 100  # the sent records from before were entered
        assert store.conn.execute("SELECT count(*) FROM settled").fetchone()[0] == 0
