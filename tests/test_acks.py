"""The acknowledgement of a delivered batch is the one write never given up; producers never hold the lock long."""

from __future__ import annotations

import sqlite3
import threading
from collections import Counter

from spool import Spool
from spool.records import record_rows
from spool.ship import Shipper
from spool.store import Store

from .helpers import T0, TEST_EZKEY, cli_env, make_config, run_cli, spawn_cli
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
