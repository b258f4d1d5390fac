"""Upgrades keep the backlog: a spool written by each released schema opens, migrates and ships."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from spool.api import Spool
from spool.ship import Shipper
from spool.store import SCHEMA_VERSION, Store
from tests.helpers import TEST_EZKEY, assert_counts_true, make_config

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_spool_from_release_0_1_0_migrates_ships_its_backlog_and_keeps_its_dead_letters(tmp_path, receiver):
    db = tmp_path / "spool.db"
    shutil.copy(FIXTURES / "spool-schema3-0.1.0.db", db)
    with Spool(db) as sp:
        assert sp.store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        before = sp.status()
        assert before["pending"] + before["inflight"] == 9
        assert (before["sent"], before["dead"], before["held"]) == (1, 1, 1)
        assert before["counters"]["dropped_oldest"] == 2
        [dead] = sp.dead_letters()
        assert dead.reason == "invalid stat name" and dead.record.stat == "fixture dead"
    assert_counts_true(db)  # counted once, from the records, as it migrated
    config = make_config(db, receiver)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=30).done
    shipped = receiver.stats()
    assert len(shipped) == 9
    assert {s[0] for s in shipped} >= {f"fixture pending {i}" for i in range(5)} | {
        "fixture own key~a,b", "fixture-classic-key", "fixture from file"}
    own = [s for s in shipped if s[0] == "fixture own key~a,b"]
    assert own == [("fixture own key~a,b", "value", 0.5, 1763500010, "fixture-own-key")]
    assert ("fixture pending 0", "count", 1, 1763500000, TEST_EZKEY) in shipped
    with Spool(db) as sp:
        after = sp.status()
        assert (after["pending"], after["inflight"], after["held"]) == (0, 0, 0)
        assert after["sent"] == 10
        # The held record was stamped in a boot that is over: its time cannot be known, so it is a dead letter.
        reasons = {d.record.stat: d.reason for d in sp.dead_letters()}
        assert reasons["fixture dead"] == "invalid stat name"
        assert "earlier boot" in reasons["fixture held"]
    assert_counts_true(db)


@pytest.mark.parametrize(("fixture", "word"), [("spool-schema6-main-cb81073.db", "six"),
                                               ("spool-schema9-main-0c2cf2b.db", "nine"),
                                               ("spool-schema10-main-a9a7b60.db", "ten")])
def test_a_spool_of_an_earlier_schema_migrates_frees_a_dead_shippers_lease_ships_and_keeps_its_dead_letters(
        tmp_path, receiver, fixture, word):
    """Made by tests/fixtures/make_spool.py with the spool of commit cb81073 (schema 6, the second wave's main) and of
    commit 0c2cf2b (schema 9, the last before the ledger) and of commit a9a7b60 (schema 10, the ledger's first form)."""
    db = tmp_path / "spool.db"
    shutil.copy(FIXTURES / fixture, db)
    with Spool(db) as sp:
        assert sp.store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        # sqlite-utils' migrations know every step: those the old spool had (by its version), and the new ones.
        steps = sp.store.conn.execute("SELECT name FROM _sqlite_migrations WHERE migration_set = 'spool' "
                                      "ORDER BY id").fetchall()
        assert [name for (name,) in steps] == [f"schema_{v:02d}" for v in range(1, SCHEMA_VERSION + 1)]
        before = sp.status()
        assert before["pending"] + before["inflight"] == 10
        assert (before["sent"], before["dead"], before["held"]) == (1, 1, 1)
        assert before["counters"]["dropped_oldest"] == 4 and before["counters"]["dropped_age"] == 1
        [dead] = sp.dead_letters()
        assert dead.reason == "invalid stat name" and dead.record.stat == f"{word} dead"
        assert sp.store.file_mark(b"/var/spool/drop/job.jsonl").offset == 60
        # Every record copied into the ledger's layout, its series interned: 13 stat names and keys.
        assert sp.store.conn.execute("SELECT count(*) FROM series").fetchone()[0] == 13
    assert_counts_true(db)  # counted once, from the records, as it migrated
    config = make_config(db, receiver)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=30).done
    shipped = receiver.stats()
    assert sorted(s[0] for s in shipped) == sorted(
        [f"{word} pending {i}" for i in range(5)] + [f"{word} own key", f"{word}-classic-key", f"{word} suspect a",
                                                    f"{word} suspect b", f"{word} from file"])
    assert (f"{word} own key", "value", 2.5, 1763600010, f"{word}-own-key") in shipped
    with Spool(db) as sp:
        after = sp.status()
        assert (after["pending"], after["inflight"], after["held"]) == (0, 0, 0)
        assert after["sent"] == 11
        reasons = {d.record.stat: d.reason for d in sp.dead_letters()}
        assert reasons[f"{word} dead"] == "invalid stat name"
        assert "earlier boot" in reasons[f"{word} held"]
    assert_counts_true(db)
