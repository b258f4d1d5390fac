"""The acknowledgement of a delivered batch is the one write never given up; producers never hold the lock long."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter

from spool import Spool
from spool.records import record_rows
from spool.ship import Shipper
from spool.store import Store

from .helpers import T0, TEST_EZKEY, assert_counts_true, cli_env, make_config, run_cli, spawn_cli
from .reliability.faultproxy import FaultProxy


def test_an_ack_that_meets_a_locked_spool_is_retried_until_it_commits_and_nothing_is_sent_twice(db, receiver):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(300))
    released = threading.Event()

    def hold_the_lock_while_the_answer_travels() -> None:
        while receiver.requests == 0 and not released.is_set():
            released.wait(0.005)
        other = sqlite3.connect(db, isolation_level=None)  # another process's long transaction
        other.execute("BEGIN IMMEDIATE")
        released.wait(1.5)
        other.execute("COMMIT")
        other.close()

    with FaultProxy(receiver) as proxy:
        proxy.next("latency", 1, 0.3)  # the first answer arrives while the lock is held
        locker = threading.Thread(target=hold_the_lock_while_the_answer_travels)
        locker.start()
        config = make_config(db, receiver, endpoint=proxy.url, batch_size=100)
        try:
            with Store(db, busy_timeout=0.1) as store, Shipper(store, config) as shipper:
                assert shipper.drain(max_time=60).done
                assert store.counts()["sent"] == 300 and store.lease_count() == 0
        finally:
            released.set()
            locker.join()
    assert Counter(a["stat"] for a in receiver.accepted) == Counter({f"s{i}": 1 for i in range(300)})


def test_a_big_import_beside_a_shipper_neither_blocks_it_nor_causes_a_duplicate(db, tmp_path, receiver):
    big = tmp_path / "big.jsonl"
    n = 60_000  # three staged chunks
    big.write_text("".join(f'{{"stat":"i{i}","count":1,"t":{T0}}}\n' for i in range(n)))
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(1000))
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    importer = spawn_cli(db, "import", str(big), env=env)
    shipped = run_cli(db, "ship", "--once", "--batch-size", "100", "--max-time", "120", env=env, timeout=150)
    _, import_err = importer.communicate(timeout=120)
    assert importer.returncode == 0, import_err
    assert shipped.returncode in (0, 1), shipped.stderr
    assert "locked" not in shipped.stderr
    finish = run_cli(db, "ship", "--once", "--batch-size", "1000", "--max-time", "120", env=env, timeout=150)
    assert finish.returncode == 0, finish.stderr
    got = Counter(a["stat"] for a in receiver.accepted)
    assert len(got) == n + 1000 and set(got.values()) == {1}


def test_a_staged_import_is_invisible_until_it_is_whole(db):
    rows = ({"stat": f"s{i}", "count": 1, "t": T0} for i in range(50))
    with Spool(db) as sp:
        seen = []

        def watching():
            for i, row in enumerate(rows):
                if i == 45:
                    with Store(db) as other:
                        seen.append(other.counts()["pending"])
                yield row

        assert sp.store.append(record_rows(watching()), chunk=10) == 50
        assert seen == [0] and sp.store.counts()["pending"] == 50
        assert sp.store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0


# -- an acknowledgement that leases the next batch in its own commit (Ledger.ack_and_lease) --------------------


def _first_lease(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i % 7}", "count": 1, "t": T0 + i} for i in range(1200))
    store = Store(db)
    lease = store.lease(500, now=T0, keyed_only=False, built=True)
    assert lease is not None and lease.span == (1, 500)
    return store, lease


def _ack_ahead(store, lease, version):
    return store.ack_and_lease(range(lease.span[0], lease.span[1] + 1), now=T0, leases=[lease.id], limit=500,
                               after=lease.last_id, version=version)


def test_an_acknowledgement_leases_the_next_batch_in_its_commit_when_nothing_else_committed(db):
    store, first = _first_lease(db)
    with store:
        sent, nxt = _ack_ahead(store, first, store.data_version())
        assert sent == 500 and nxt is not None and nxt.span == (501, 1000) and nxt.data is not None
    with Store(db) as other:  # committed, both: the next lease is as durable as the acknowledgement
        assert [row[0] for row in other.conn.execute("SELECT id FROM leases")] == [nxt.id]
        assert other.counts()["sent"] == 500
    assert_counts_true(db)


def test_after_another_connection_committed_the_acknowledgement_leases_nothing(db):
    store, first = _first_lease(db)
    with store:
        version = store.data_version()
        with Spool(db) as producer:  # what the drain knew of the spool may no longer hold
            producer.count("late", 1, t=T0)
        sent, nxt = _ack_ahead(store, first, version)
        assert (sent, nxt) == (500, None)
        assert store.conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    assert_counts_true(db)


def test_beside_an_open_stage_the_acknowledgement_leases_nothing(db):
    store, first = _first_lease(db)
    seen = []

    def big_append():
        for i in range(30):
            if i == 25:  # two chunks of this append are committed, unpublished: a stage is open
                seen.append(_ack_ahead(store, first, store.data_version()))
            yield (f"big{i}", None, None, None, 0, 1, T0)

    with store, Store(db) as appender:
        appender.append(big_append(), chunk=10)
    assert [(sent, nxt) for sent, nxt in seen] == [(500, None)]
    assert_counts_true(db)


def test_a_lease_that_fails_inside_the_acknowledgement_undoes_itself_alone(db, caplog):
    store, first = _first_lease(db)
    with store:
        # A real SQLite error in the lease's part (as a full disk or a constraint would raise): the acknowledgement
        # must commit whatever befalls the lease.
        store.conn.execute("CREATE TEMP TRIGGER no_lease BEFORE INSERT ON leases BEGIN SELECT RAISE(ABORT, "
                           "'cannot lease'); END")
        sent, nxt = _ack_ahead(store, first, store.data_version())
        assert (sent, nxt) == (500, None)
        store.conn.execute("DROP TRIGGER temp.no_lease")
        assert store.counts()["sent"] == 500
        assert store.conn.execute("SELECT lo, hi FROM queue_runs").fetchall() == [(501, 1200)]  # not dequeued
    assert "cannot lease the next batch with an acknowledgement: cannot lease" in caplog.text
    assert_counts_true(db)
