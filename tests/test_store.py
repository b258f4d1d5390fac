"""The spool store: schema, durability settings and the pending/inflight/sent/dead state machine."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys

import pytest

from spool import Spool
from spool.errors import InvalidRecord, SpoolBusy, StoreError
from spool.lock import ShipLock
from spool.owners import owners_directory
from spool.records import make_record
from spool.store import SCHEMA_VERSION, State, Store

from .helpers import IN_PID_NAMESPACE, T0, pid_namespace_unavailable


def ez(stat: str = "s", n: int | float = 1, t: int = T0, ezkey: str | None = None):
    return make_record(stat=stat, count=n, t=t, ezkey=ezkey)


def states(store: Store) -> dict[str, int]:
    return {k: v for k, v in store.counts().items() if v}


def test_a_new_spool_file_is_private_to_its_owner_and_in_wal_mode(tmp_path):
    path = tmp_path / "state" / "spool" / "spool.db"
    with Store(path) as store:
        store.append([ez()])
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.conn.execute("SELECT count(*) FROM _sqlite_migrations").fetchone()[0] == SCHEMA_VERSION
        assert stat.S_IMODE(os.stat(f"{path}-wal").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700


def test_synchronous_normal_is_selectable_and_anything_else_refused(db):
    with Store(db, synchronous="normal") as store:
        assert store.conn.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(StoreError, match="synchronous"):
        Store(db, synchronous="off")


def test_the_public_door_opens_a_spool_with_full_durability_unless_told_normal(db):
    """Spool(path), Spool(path, synchronous=...) and Spool(config=...): what a Python user and every command open."""
    from spool.config import Config

    def synchronous(sp: Spool) -> int:
        return sp.store.conn.execute("PRAGMA synchronous").fetchone()[0]

    with Spool(db) as sp:
        assert synchronous(sp) == 2  # FULL: a commit survives a power cut
    with Spool(db, synchronous="normal") as sp:
        assert synchronous(sp) == 1
    with Spool(config=Config().replace(**{"spool.path": db, "spool.synchronous": "normal"})) as sp:
        assert synchronous(sp) == 1


def test_records_survive_closing_and_reopening(db):
    with Store(db) as store:
        store.append([ez("a", 1), ez("b", 2.5)])
    with Store(db) as store:
        assert [r for _, _, r in store.records()] == [ez("a", 1), ez("b", 2.5)]


def test_an_invalid_record_in_a_batch_commits_nothing_from_that_batch(db):
    with Spool(db) as sp:
        sp.count("kept", 1, t=T0)
        with pytest.raises(InvalidRecord):
            sp.add_many([{"stat": "a", "count": 1, "t": T0}, {"stat": "", "count": 1}])
        assert sp.store.counts()["pending"] == 1


def test_lease_takes_the_first_appended_records_first_whatever_their_t_and_marks_them_in_flight(db):
    with Store(db) as store:
        store.append([ez("first", t=T0 + 50), ez("second", t=T0), ez("third", t=T0 + 10)])
        lease = store.lease(2, now=T0, keyed_only=False)
        assert [item.record.stat for item in lease.items] == ["first", "second"]
        assert states(store) == {"pending": 1, "inflight": 2}


def test_a_leased_record_is_never_leased_twice(db):
    with Store(db) as a, Store(db) as b:
        a.append([ez(t=T0 + i) for i in range(10)])
        first = a.lease(6, now=T0, keyed_only=False).items
        second = b.lease(6, now=T0, keyed_only=False).items
        assert len(first) == 6 and len(second) == 4
        assert not {i.id for i in first} & {i.id for i in second}
        assert a.lease(6, now=T0, keyed_only=False) is None  # all of them are leased


def test_keyed_only_leases_skip_ez_records_without_a_key(db):
    with Store(db) as store:
        store.append([ez("nokey"), ez("own", ezkey="k"), make_record(key="k", ukey="u", count=1, t=T0)])
        leased = store.lease(10, now=T0, keyed_only=True).items
        assert sorted(str(i.record.stat) for i in leased) == ["None", "own"]
        assert store.keyless_among_oldest(10) == 1


def test_ack_kill_and_end_lease_move_records_between_states(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(3)])
        lease = store.lease(3, now=T0, keyed_only=False)
        a, b, c = lease.items
        assert store.ack([a.id], now=T0) == 1
        assert store.mark_dead([c.id], reason="invalid stat", http_status=200, body='{"status":500}', now=T0) == 1
        assert states(store) == {"sent": 1, "inflight": 1, "dead": 1}
        store.end_lease(lease.id)  # b was neither sent nor refused: pending again
        assert states(store) == {"sent": 1, "pending": 1, "dead": 1}
        [dead] = store.dead_letters()
        assert (dead["id"], dead["reason"], dead["http_status"]) == (c.id, "invalid stat", 200)


def test_ending_a_lease_does_not_touch_records_already_settled(db):
    with Store(db) as store:
        store.append([ez()])
        lease = store.lease(1, now=T0, keyed_only=False)
        store.ack([lease.items[0].id], now=T0)
        store.end_lease(lease.id)
        assert states(store) == {"sent": 1}


def test_the_ack_that_settles_a_batch_can_end_its_lease_in_the_same_commit(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(3)])
        lease = store.lease(3, now=T0, keyed_only=False)
        store.ack([item.id for item in lease.items], now=T0, lease=lease.id)
        assert states(store) == {"sent": 3}
        assert store.conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0


@pytest.mark.parametrize("pick", [
    lambda ids: ids[3:40] + ids[50:90] + [ids[95]],  # runs: acknowledged run by run
    lambda ids: ids[0::2] + ids[1:20:2],  # mostly scattered ids (and unsorted): looked up one by one
    lambda ids: [ids[7], ids[7], ids[5], ids[6], ids[6]],  # repeated ids
    lambda ids: [],
], ids=["runs", "scattered", "repeats", "none"])
def test_an_ack_marks_exactly_the_ids_it_names_sent_whatever_their_runs(db, pick):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(100)])
        lease = store.lease(100, now=T0, keyed_only=False)
        ids = [item.id for item in lease.items]
        store.mark_dead(ids[40:50], reason="r", http_status=200, body="", now=T0)  # settled: an ack leaves it
        acked = pick(ids)
        wanted = set(acked) - set(ids[40:50])
        assert store.ack(acked, now=T0 + 1) == len(wanted)
        sent = {record_id for record_id, _, _ in store.records(State.SENT)}
        assert sent == wanted
        settled = {i for lo, hi in store.conn.execute("SELECT lo, hi FROM settled WHERE done_at = ?", (T0 + 1,))
                   for i in range(lo, hi + 1)}
        assert settled == wanted  # when, kept per run of ids
        assert states(store) == {k: v for k, v in {"sent": len(wanted), "dead": 10,
                                                   "inflight": 90 - len(wanted)}.items() if v}


@pytest.mark.parametrize("n", [5, 300])
def test_shipping_rewrites_no_record_and_an_ack_writes_the_same_whatever_the_batch(db, n):
    """A lease is a row and its run of ids, and shortens the queue's run it took them from; an acknowledgement
    ends the lease and writes one row of `settled` per run: the records themselves are never written."""
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(n)])
        records = store.conn.execute("SELECT * FROM records ORDER BY id").fetchall()
        before = store.conn.total_changes
        lease = store.lease(n, now=T0, keyed_only=False)
        assert lease is not None
        assert store.conn.total_changes - before == 1 + 1 + 1  # the lease, its run, the queue's run
        before = store.conn.total_changes
        store.ack([item.id for item in lease.items], now=T0, lease=lease.id)
        assert store.conn.total_changes - before == 1 + 1 + 1 + 1  # settled, the run, the lease, the tally
        assert store.conn.execute("SELECT * FROM records ORDER BY id").fetchall() == records
        assert states(store) == {"sent": n}


_LEASING = """
import os, signal, sys
from spool.store import Store
store = Store(sys.argv[1])
lease = store.lease(2, now=100.0, keyed_only=False)
print(len(lease.items), flush=True)
sys.stdin.readline()  # holds its lease until told to die, then dies as SIGKILL leaves it
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("where", ["here", "in another PID namespace"])
def test_leases_of_a_live_owner_are_never_freed_and_a_killed_owners_are(db, where):
    """Liveness is the kernel's: the owner holds a lock the kernel drops when it dies, however it dies. No pid is
    compared, so an owner whose pid means nothing here (another PID namespace, a container) is not taken for dead."""
    prefix: tuple[str, ...] = ()
    if where != "here":
        if reason := pid_namespace_unavailable():
            pytest.skip(reason)
        prefix = IN_PID_NAMESPACE
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(6)])
    child = subprocess.Popen([*prefix, sys.executable, "-c", _LEASING, str(db)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "2\n"
        with Store(db) as store, Store(db) as beside:
            beside.lease(2, now=200.0, keyed_only=False)  # another owner in this very process
            assert store.release_dead_leases(unowned_before=float("inf")) == 0  # both alive
            assert beside.release_dead_leases(unowned_before=float("inf")) == 0
            assert states(store) == {"pending": 2, "inflight": 4}
            child.communicate("die\n", timeout=30)  # killed (by itself: unshare waits for it to end)
            assert store.release_dead_leases() == 2  # the kernel dropped its lock
            assert states(store) == {"pending": 4, "inflight": 2}
            beside.close()  # a closed Store owns nothing any more
            assert store.release_dead_leases() == 2
            assert states(store) == {"pending": 6}
    finally:
        child.kill()
        child.communicate()
    assert not list(owners_directory(db).iterdir())  # each dead owner's lock file went with it


def test_leases_of_an_earlier_release_are_freed_by_the_shipper_or_after_the_boot_they_were_taken_in(db):
    """Owners named by boot, pid and process start (schema 6) cannot be checked (the pid may be another PID
    namespace's): such a lease is freed as one that names no owner (by the holder of the ship lock, or after
    the lease timeout), or once its boot is over."""
    from spool.clock import boot_id

    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(6)])
        for owner in (f"{boot_id()}:{os.getpid()}:1234", "an-earlier-boot:1:1234", None):
            lease = store.lease(2, now=200.0, keyed_only=False)
            store.conn.execute("UPDATE leases SET owner = ? WHERE id = ?", (owner, lease.id))
        assert store.release_dead_leases() == 2  # the earlier boot's
        assert store.release_dead_leases(unowned_before=150.0) == 0  # leased at 200: too recent
        assert store.release_dead_leases(unowned_before=250.0) == 4
        assert states(store) == {"pending": 6}


def test_lease_ids_are_never_reused(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(3)])
        first = store.lease(1, now=T0, keyed_only=False)
        store.end_lease(first.id)
        second = store.lease(1, now=T0, keyed_only=False)
        assert second.id > first.id


def test_dead_records_can_be_requeued_or_purged_by_id_or_all(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(4)])
        lease = store.lease(4, now=T0, keyed_only=False)
        leased = lease.items
        store.mark_dead([i.id for i in leased], reason="r", http_status=200, body="", now=T0)
        store.end_lease(lease.id)  # as the shipper does once a batch is settled
        assert store.requeue_dead([leased[0].id]) == (1, (), ())
        assert store.purge_dead([leased[1].id, 999]) == (1, (999,))
        assert states(store) == {"pending": 1, "dead": 2}
        assert store.requeue_dead() == (2, (), ())
        assert store.purge_dead() == (0, ())
        assert states(store) == {"pending": 3}
        assert store.dead_letters() == []


def test_prune_deletes_only_sent_records_older_than_the_cutoff_in_small_steps(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(25)])
        old = store.lease(20, now=T0, keyed_only=False).items
        store.ack([i.id for i in old[:15]], now=1000.0)
        store.ack([i.id for i in old[15:]], now=5000.0)
        assert store.prune_sent(sent_before=2000.0, step=4) == 15
        assert states(store) == {"sent": 5, "pending": 5}


def test_status_facts_persist_in_the_spool(db):
    with Store(db) as store:
        store.set_meta(last_result="retrying", last_error="HTTP 503")
    with Store(db) as store:
        assert store.meta() == {"last_result": "retrying", "last_error": "HTTP 503"}


def test_a_spool_from_a_newer_version_is_refused(db):
    with Store(db):
        pass
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this spool understands"):
        Store(db)


def test_a_file_that_is_not_a_database_gives_a_clear_error(db):
    db.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreError, match="not a usable spool database"):
        Store(db)


def test_an_unwritable_location_gives_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create spool"):
        Store(blocker / "spool.db")


def test_only_one_shipper_can_hold_a_spool(db):
    with ShipLock(db) as lock:
        assert lock.holder() == os.getpid()
        with pytest.raises(SpoolBusy, match=f"pid {os.getpid()}"):
            ShipLock(db).acquire()
    assert ShipLock(db).holder() is None
    with ShipLock(db):
        pass


def test_add_many_streams_a_generator_in_one_transaction(db):
    def produce():
        for i in range(10_000):
            yield {"stat": f"s{i % 7}", "value": i, "t": T0 + i}

    with Spool(db) as sp:
        assert sp.add_many(produce()) == 10_000
        assert sp.store.counts()["pending"] == 10_000


def test_prune_walks_past_records_of_other_states_interleaved_with_old_sent_ones(db):
    with Store(db) as store:
        store.append([ez(t=T0 + i) for i in range(40)])
        lease = store.lease(40, now=T0, keyed_only=False)
        ids = [item.id for item in lease.items]
        store.ack(ids[0::3], now=1000.0)  # old enough to prune
        store.mark_dead(ids[1::3], reason="r", http_status=200, body="", now=1000.0)  # dead: kept
        store.ack(ids[2::3][:5], now=9000.0)  # sent recently: kept
        store.end_lease(lease.id)
        assert store.prune_sent(sent_before=2000.0, step=3) == len(ids[0::3])
        assert states(store) == {"dead": len(ids[1::3]), "sent": 5, "pending": len(ids[2::3]) - 5}


def test_the_api_appends_classic_records_and_single_record_dicts(db):
    with Spool(db) as sp:
        sp.classic_count(key="K", ukey="U", count=3, t=T0)
        sp.classic_value(key="K", ukey="U", value=0.5, t=T0 + 1)
        sp.add({"stat": "d", "value": 2, "t": T0 + 2, "email": "me@example.com"})
        with pytest.raises(InvalidRecord, match="ukey is missing"):
            sp.add({"key": "K", "count": 1})
        assert [r for _, _, r in sp.store.records()] == [
            make_record(key="K", ukey="U", count=3, t=T0), make_record(key="K", ukey="U", value=0.5, t=T0 + 1),
            make_record(stat="d", value=2, t=T0 + 2, ezkey="me@example.com")]


@pytest.mark.parametrize("chunk", [100, 2])  # one transaction, and staged
def test_an_append_of_mixed_shapes_stores_every_field_and_null_exactly_as_given(db, chunk):
    # Text columns that are NULL in a whole chunk are left out of the insert rather than bound: a chunk where
    # some rows fill a column and others do not must still store each row's own value, NULL included.
    rows = [ez("a", 1), make_record(key="k", ukey="u", value=2.5, t=T0), ez("b", 3, ezkey="own"),
            make_record(stat="c", value=-1.5, t=T0 + 1), ("d", None, None, None, 0, 2**62, T0 + 2)]
    with Store(db) as store:
        assert store.append(rows, chunk=chunk) == 5
        got = store.conn.execute("SELECT stat, key, ukey, ezkey, kind, number, typeof(number), t FROM record_view "
                                 "ORDER BY id").fetchall()
    assert got == [("a", None, None, None, 0, 1, "integer", T0), (None, "k", "u", None, 1, 2.5, "real", T0),
                   ("b", None, None, "own", 0, 3, "integer", T0), ("c", None, None, None, 1, -1.5, "real", T0 + 1),
                   ("d", None, None, None, 0, 2**62, "integer", T0 + 2)]


def test_an_append_of_ez_records_alone_stores_their_key_columns_as_null(db):
    with Store(db) as store:
        store.append([ez("a"), ez("b")] * 3)
        assert store.conn.execute("SELECT count(*) FROM record_view WHERE key IS NULL AND ukey IS NULL "
                                  "AND ezkey IS NULL AND stat IS NOT NULL").fetchone()[0] == 6


def test_an_append_of_a_malformed_row_is_refused_whole(db):
    with Store(db) as store:
        with pytest.raises(StoreError):
            store.append([ez("a"), ("b", None, None, None, 0, 1)])
        assert store.counts()["pending"] == 0


@pytest.mark.parametrize("chunk", [100, 2])  # one transaction, and staged
def test_a_file_mark_is_committed_with_the_records_taken_from_it(db, chunk):
    from spool.store import FileMark

    mark = FileMark(b"/drop/a.jsonl", 1, 2, 300, 5, "tail")
    with Store(db) as store:
        assert store.append([ez(str(i)) for i in range(5)], file=mark, chunk=chunk) == 5
        assert store.file_mark(b"/drop/a.jsonl") == mark._replace(records=5)
        assert states(store) == {"pending": 5}


def test_a_file_mark_follows_its_file_to_a_new_name_replacing_the_mark_there(db):
    from spool.store import FileMark

    old, new = FileMark(b"/drop/a.jsonl", 1, 2, 300, 5, "a"), FileMark(b"/drop/b.jsonl", 1, 3, 10, 5, "b")
    with Store(db) as store:
        store.append([ez("a")], file=old)
        store.append([ez("b")], file=new)
        store.move_file_mark(old.path, new.path)
        assert store.file_marks() == [old._replace(path=new.path, records=1)]


def test_the_size_on_disk_is_the_database_file_and_its_write_ahead_log(db):
    with Store(db) as store:
        store.append([ez(str(i)) for i in range(100)])
        wal = db.with_name(db.name + "-wal")
        assert store.size_bytes() == os.path.getsize(db) + (os.path.getsize(wal) if wal.exists() else 0) > 0


def test_moving_records_out_takes_every_chunk_of_the_selection(db):
    moved: list = []
    with Store(db) as store:
        store.append([ez("a", t=T0 + i) for i in range(7)])
        store.append([ez("b", t=T0 + i) for i in range(7)])
        assert store.count_selected("pending", since=T0 + 2, stat_glob="a") == 5
        assert [r.t for _, r in store.export("pending", since=T0 + 2, stat_glob="a")] == list(range(T0 + 2, T0 + 7))
        assert store.move_out("pending", moved.extend, since=T0 + 2, stat_glob="a", chunk=2) == 5
        assert [r.t for r in moved] == list(range(T0 + 2, T0 + 7))
        assert states(store) == {"pending": 9}


_HOLDING = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")  # the write lock, held until told
print("holding", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
print("released", flush=True)
sys.stdin.readline()
"""


def test_a_writer_waits_for_the_write_lock_as_long_as_busy_timeout_then_says_so_and_takes_it_once_free(db):
    with Store(db) as store:
        store.append([ez()])
    holder = subprocess.Popen([sys.executable, "-c", _HOLDING, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "holding\n"
        with Store(db, busy_timeout=0.3) as store:
            with pytest.raises(StoreError, match=r"stayed locked by another process for 0\.3 s"):
                store.append([ez("refused")])
            holder.stdin.write("\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == "released\n"
            store.append([ez("taken")])
            assert sorted(r.stat for _, _, r in store.records()) == ["s", "taken"]
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_letter_requeued_while_its_old_lease_is_open_is_pending_and_leased_anew(db):
    """A refused record leaves its lease: requeued, it is pending (not in flight) and the next lease takes it."""
    with Store(db) as store:
        store.append([make_record(stat="refused once", count=1, t=T0)])
        old = store.lease(10, now=T0, keyed_only=False)
        (item,) = old.items
        assert store.mark_dead([item.id], reason="refused", http_status=200, body="{}", now=T0) == 1
        assert store.requeue_dead()[:2] == (1, ())
        assert (store.counts()["pending"], store.counts()["inflight"]) == (1, 0)
        again = store.lease(10, now=T0 + 2, keyed_only=False)
        assert [i.id for i in again.items] == [item.id] and store.counts()["inflight"] == 1
        store.end_lease(old.id)  # the old lease's end leaves it with the new one
        assert store.counts()["inflight"] == 1


def test_an_append_of_more_new_names_than_the_store_remembers_is_taken_whole(db):
    # The Store's memory of names starts afresh once it holds SERIES_CACHE of them: that happened halfway through
    # one append, which then failed with a KeyError for a name it had just added.
    from spool.store.appends import SERIES_CACHE

    with Store(db) as store:
        store.append([("first", None, None, None, 0, 1, T0)])
        store.append([(f"s {i}", None, None, None, 0, 1, T0) for i in range(SERIES_CACHE + 1)])
        store.append([("first", None, None, None, 0, 1, T0), ("s 7", None, None, None, 0, 1, T0)])
        assert store.tally()["pending"] == SERIES_CACHE + 4
        names = [record.stat for _, _, record in store.records()]
        assert names[:2] == ["first", "s 0"] and names[-2:] == ["first", "s 7"]
