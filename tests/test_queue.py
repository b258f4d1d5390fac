"""The queue as runs of ids (schema 11): what each walk of it costs, and the shape it keeps.

Costs are SQLite's own count of virtual-machine steps (see tests/test_housekeeping.py): a walk that starts at an id
deep inside a run must cost what it reads from there, not the ids before it, on a backlog ten times larger too.
"""

from __future__ import annotations

from typing import Any

import pytest

from spool.store import Store
from tests.helpers import T0, assert_counts_true
from tests.test_housekeeping import LARGE, SMALL, counts, spool_of, vm_steps


def queue_runs(store: Store) -> list[tuple[int, int]]:
    return store.conn.execute("SELECT lo, hi FROM queue_runs ORDER BY lo").fetchall()


WALKS: dict[str, Any] = {
    # a lease that starts after a mark (the drain's search past records it skips)
    "lease after": lambda store, last: store.lease(5, now=T0, keyed_only=False, after=last - 10),
    # an acknowledgement of queued records (not leased): they are looked up in the queue's runs
    "ack of queued": lambda store, last: store.ack([last - 3, last - 2], now=T0),
    # a dead letter made of queued records, and a release of them
    "mark dead": lambda store, last: store.mark_dead([last - 5], reason="no", http_status=200, body="", now=T0),
}


@pytest.mark.parametrize("walk", list(WALKS))
def test_a_walk_of_the_queue_from_an_id_costs_what_it_reads_not_the_ids_before_it(tmp_path, walk):
    def cost(name: str, pending: int) -> int:
        with spool_of(tmp_path / f"{name}.db", pending) as store:
            assert queue_runs(store) == [(1, pending)]  # one run: every walk starts deep inside it
            with vm_steps(store.conn) as steps:
                WALKS[walk](store, pending)
            assert_counts_true(store)
            return steps[0]

    small, large = cost("small", SMALL), cost("large", LARGE)
    assert large <= small * 1.5 + 5, (small, large)


def test_export_remove_reads_chunk_after_chunk_from_where_the_last_one_ended(tmp_path):
    """Each chunk of `export --remove` starts at the id the last one ended at: the whole move reads the pending
    records once (ten times the backlog, about ten times the steps), never again from the front."""
    def cost(name: str, pending: int) -> int:
        with spool_of(tmp_path / f"{name}.db", pending) as store:
            moved: list[int] = []
            with vm_steps(store.conn) as steps:
                assert store.move_out("pending", lambda records: moved.append(len(records)), chunk=100) == pending
            assert set(moved) == {100} and store.counts()["pending"] == 0
            assert_counts_true(store)
            return steps[0]

    small, large = cost("small", SMALL), cost("large", LARGE)
    assert large <= small * (LARGE / SMALL) * 1.5, (small, large)


def test_appends_grow_the_last_run_and_a_lease_shortens_the_first(db):
    with Store(db) as store:
        for i in range(5):
            store.append(counts(10, start=10 * i))  # five appends: one run
        store.append_one(("one more", None, None, None, 0, 1, T0))
        assert queue_runs(store) == [(1, 51)]
        lease = store.lease(20, now=T0, keyed_only=False)
        assert lease is not None and [item.id for item in lease.items] == list(range(1, 21))
        assert queue_runs(store) == [(21, 51)]
        store.end_lease(lease.id)  # given back: at the front again, a run of its own
        assert queue_runs(store) == [(1, 20), (21, 51)]
        assert [item.id for item in store.lease(25, now=T0, keyed_only=False).items] == list(range(1, 26))
    assert_counts_true(db)


def test_held_records_are_left_out_of_the_runs_and_join_the_queue_when_re_stamped(db):
    with Store(db) as store:
        rows = [*counts(3), ("undated", None, None, None, 0, 1, 0), *counts(3, start=3)]
        store.append(rows)
        assert queue_runs(store) == [(1, 3), (5, 7)]
        boot, mono = store.conn.execute("SELECT boot, mono FROM held").fetchone()
        assert store.restamp_held(wall=T0 + 100, mono=mono + 10, boot=boot, floor=T0) == (1, 0)
        assert queue_runs(store) == [(1, 3), (4, 4), (5, 7)]
        lease = store.lease(10, now=T0 + 100, keyed_only=False)
        assert [item.id for item in lease.items] == list(range(1, 8))  # in append order, the re-stamped one too
        assert queue_runs(store) == []
    assert_counts_true(db)


def test_a_lease_while_a_large_import_is_open_skips_its_records_without_walking_them(db):
    """An open stage's records are queued but not visible: a shipper with nothing else to lease looks past
    them at the cost of a few statements, however much of the import is already written."""
    costs: dict[int, int] = {}

    def rows():
        for i in range(20_000):
            if i in (2_000, 19_000):  # after 2 and 19 chunks are committed
                with Store(db) as other, vm_steps(other.conn) as steps:
                    assert other.lease(10, now=T0, keyed_only=False, built=True) is None
                costs[i] = steps[0]
            yield ("imported", None, None, None, 0, 1, T0 + i)

    with Store(db) as store:
        store.append([("before", None, None, None, 0, 1, T0)])
        lease = store.lease(1, now=T0, keyed_only=False)  # in flight: nothing else is leasable
        assert store.append(rows(), chunk=1_000) == 20_000
        store.end_lease(lease.id)
    assert costs[19_000] <= costs[2_000] * 1.5 + 5, costs
    assert_counts_true(db)


def test_records_deleted_from_the_queue_leave_its_runs_whole(db):
    """Compaction merges most records away and the bounds drop others: their ids stay inside the runs (nothing
    is queued there any more), so the queue stays a few rows instead of a row per survivor."""
    with spool_of(db, 20_000) as store:
        assert store.compact_counts(bucket=60) > 10_000
        assert store.drop_expired(now=T0) == 0
        assert len(queue_runs(store)) == 1
        survivors = store.counts()["pending"]
        lease = store.lease(survivors, now=T0, keyed_only=False)
        assert lease is not None and len(lease.items) == survivors
        assert queue_runs(store)[0][0] > lease.items[-1].id  # the lease took the gaps it walked past with it
        assert store.lease(10, now=T0, keyed_only=False) is None
        assert queue_runs(store) == []  # and one that found nothing, those it did not reach
    assert_counts_true(db)
