"""Counts that are kept, not counted: the spool's tally of records per state is changed in the transactions that
change the records, so status, the bounds, /healthz and /metrics read as much of a spool of millions as of ten."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

import pytest

from spool import Spool
from spool.clock import boot_clock, boot_id
from spool.config import Config, SpoolSettings
from spool.errors import SpoolFull
from spool.metrics import Metrics
from spool.records import HELD_T, make_record
from spool.store import State, Store

from .helpers import T0, assert_counts_true, cli_env, kept_and_real_counts, make_config, run_cli

DEAD_OWNER = "another-boot:1:1"  # an owner from a boot that is over: proven dead


def limits(**settings: Any) -> SpoolSettings:
    return Config().replace(**{f"spool.{name}": value for name, value in settings.items()}).spool


def rows(n: int, *, stat: str = "s", t: int = T0, start: int = 0) -> list[tuple[Any, ...]]:
    return [(f"{stat}{i}", None, None, None, 0, 1, t + i) for i in range(start, start + n)]


def held(stat: str) -> tuple[Any, ...]:
    return (stat, None, None, None, 0, 1, HELD_T)  # stamped while the clock was wrong


def ids(store: Store, state: State) -> list[int]:
    """The ids of the records in a state (pending: in flight included), in append order."""
    return [record_id for record_id, _, _ in store.records(state)]


# -- every path keeps the tally -------------------------------------------------------------------------------


def test_every_way_a_record_comes_goes_or_changes_state_keeps_the_kept_counts_true(db, tmp_path):
    with Store(db) as store:
        store.append(rows(30))
        assert_counts_true(db)
        store.append_one(make_record(stat="one", count=1, t=T0))
        store.append_one(make_record(stat="early", count=1, clock_now=HELD_T))  # held: a transaction of its own
        assert_counts_true(db)
        store.append([*rows(43, stat="big"), held("big early"), held("big early 2")], chunk=10)  # staged, published
        assert store.tally() == {"pending": 74, "held": 3, "sent": 0, "dead": 0, "staged": 0}
        assert_counts_true(db)

        # A stage whose owner died: counted as staged while it is open, and no more once swept.
        store.conn.execute("INSERT INTO stages (id, owner, started_at) VALUES (99, ?, 0)", (DEAD_OWNER,))
        store.conn.execute("BEGIN IMMEDIATE")
        store._stage_chunk(store.conn, 99, [*rows(12, stat="orphan"), held("orphan early")])
        store.conn.execute("COMMIT")
        assert store.tally()["staged"] == 13
        assert_counts_true(db)
        assert store.sweep_stages() == 1
        assert store.tally()["staged"] == 0
        assert_counts_true(db)

        # The ledger: lease, ack, split, mark dead, end the lease; a dead owner's lease freed.
        lease = store.lease(20, now=T0, keyed_only=False)
        assert lease is not None
        leased = [item.id for item in lease.items]
        assert store.counts()["inflight"] == 20
        store.ack(leased[:8], now=T0 + 10)
        store.split(lease.id, [leased[8:10], leased[10:12]])
        store.mark_dead(leased[12:15], reason="refused", http_status=200, body="{}", now=T0 + 10)
        assert_counts_true(db)
        store.ack(leased[15:17], now=T0 + 11, lease=lease.id)
        assert_counts_true(db)
        other = store.lease(5, now=T0, keyed_only=False)
        assert other is not None
        store.conn.execute("UPDATE leases SET owner = ?", (DEAD_OWNER,))
        assert store.release_dead_leases() == 5
        assert store.counts() == {"pending": 61, "inflight": 0, "sent": 10, "dead": 3, "held": 3}
        assert_counts_true(db)
        third = store.lease(3, now=T0, keyed_only=False)  # found too old before a (re)send: dropped
        assert third is not None
        assert store.expire([item.id for item in third.items[:2]], lease=third.id) == 2
        store.end_lease(third.id)
        assert store.counts()["pending"] == 59
        assert_counts_true(db)

        # Dead letters: requeued and purged, by id and all.
        dead = ids(store, State.DEAD)
        assert store.requeue_dead([dead[0], 123_456]) == (1, (123_456,), ())
        assert_counts_true(db)
        assert store.purge_dead([dead[1]]) == (1, ())
        assert_counts_true(db)
        store.mark_dead(ids(store, State.PENDING)[:4], reason="refused", http_status=200, body="{}", now=T0 + 12)
        assert store.requeue_dead() == (5, (), ())
        assert_counts_true(db)
        store.mark_dead(ids(store, State.PENDING)[:2], reason="refused", http_status=200, body="{}", now=T0 + 12)
        assert store.purge_dead() == (2, ())
        assert_counts_true(db)

        # Held records re-stamped (this boot), or dead (a wrong monotonic time, an earlier boot).
        store.conn.execute("UPDATE held SET boot = 'an-earlier-boot' WHERE id = (SELECT id FROM record_view "
                           "WHERE stat = 'big early 2')")
        assert store.restamp_held(wall=T0 + 100.0, mono=boot_clock() + 10, boot=boot_id(), floor=T0) == (2, 1)
        assert_counts_true(db)

        # Compaction merges pending counts; pruning deletes sent ones; replay queues copies of sent ones.
        store.append(rows(6, stat="same", t=T0) + rows(6, stat="same", t=T0))
        assert store.compact_counts(bucket=3600) > 0
        assert_counts_true(db)
        assert store.replay(since=T0, until=None) == 10
        assert_counts_true(db)
        assert store.prune_sent(sent_before=T0 + 10.5, step=3) == 8
        assert_counts_true(db)

        # Records moved out (export --remove), of one state and of all.
        moved: list[Any] = []
        assert store.move_out("sent", moved.extend, chunk=1) == 2
        assert_counts_true(db)
        store.mark_dead(ids(store, State.PENDING)[:3], reason="refused", http_status=200, body="{}", now=T0 + 20)
        store.ack(ids(store, State.PENDING)[:3], now=T0 + 20)
        assert store.move_out("all", moved.extend, since=T0, until=T0 + 20, chunk=7) > 0
        assert_counts_true(db)
        assert store.tally()["pending"] > 0


def test_the_bounds_keep_the_counts_true_as_they_drop_refuse_and_prune(db):
    with Store(db, limits=limits(max_pending=50)) as store:
        store.append(rows(40))
        store.append(rows(30, start=40))  # 20 oldest dropped
        assert store.counters()["dropped_oldest"] == 20
        assert store.tally()["pending"] == 50
        assert_counts_true(db)
        store.append(rows(45, start=70), chunk=10)  # staged, then the bound drops the oldest
        assert store.tally()["pending"] == 50
        assert_counts_true(db)
    with Store(db, limits=limits(max_pending=50, when_full="reject_new")) as store:
        with pytest.raises(SpoolFull):
            store.append(rows(5, start=200))
        with pytest.raises(SpoolFull):
            store.append(rows(45, start=300), chunk=10)
        assert store.tally()["pending"] == 50
        assert_counts_true(db)
    with Store(db) as store:
        lease = store.lease(30, now=T0, keyed_only=False)
        assert lease is not None
        store.ack([item.id for item in lease.items], now=T0, lease=lease.id)
    with Store(db) as store:
        used = store._used_bytes(store.conn)
    with Store(db, limits=limits(max_spool_bytes=used)) as store:  # sent records give way first, then the oldest
        store.append(rows(20, start=400))
        assert store.tally()["sent"] == 0
        assert_counts_true(db)
    with Store(db, limits=limits(max_spool_bytes=1)) as store:  # nothing older can make room: refused whole
        before = store.tally()
        with pytest.raises(SpoolFull, match="nothing older than these 10 records can make room"):
            store.append(rows(10, start=900))
        assert store.tally() == before
        assert_counts_true(db)
    with Store(db, limits=limits(max_age=60.0)) as store:
        older = store.tally()["pending"]  # every one of them older than a minute before T0 + 1030
        store.append(rows(10, t=T0) + rows(5, t=T0 + 1000))
        assert store.drop_expired(now=T0 + 1030) == older + 10
        assert store.tally()["pending"] == 5
        assert_counts_true(db)


def test_a_fresh_spool_in_place_of_a_corrupt_one_starts_with_true_counts(db):
    db.write_bytes(b"this is not a database" * 100)
    with Store(db, quarantine=True) as store:
        store.append(rows(3))
        assert store.tally() == {"pending": 3, "held": 0, "sent": 0, "dead": 0, "staged": 0}
    assert_counts_true(db)


# -- an import in progress ------------------------------------------------------------------------------------


def pausing(source: list[tuple[Any, ...]], at: int, then: Callable[[], None]) -> Iterator[tuple[Any, ...]]:
    """Yield `source`, calling `then` before row `at` (the chunks before it are committed, hidden by their stage)."""
    for i, row in enumerate(source):
        if i == at:
            then()
        yield row


def test_an_import_in_progress_is_counted_as_staged_never_as_pending_until_it_publishes(db):
    seen: list[dict[str, Any]] = []

    def look() -> None:
        with Spool(db) as other:
            status = other.status()
            seen.append({name: status[name] for name in ("pending", "held", "staged")})
        assert_counts_true(db)

    with Store(db) as store:
        store.append(rows(2, stat="live", t=T0 + 5))
        store.append(pausing([*rows(24), held("early")], at=21, then=look), chunk=10)
        assert seen == [{"pending": 2, "held": 0, "staged": 20}]
        with Spool(db) as after:
            status = after.status()
            assert (status["pending"], status["held"], status["staged"]) == (26, 1, 0)
    assert_counts_true(db)


def test_a_recount_counts_each_state_once_including_an_import_that_is_still_open(db):
    """A real count (what the migration to the kept counts and `doctor --deep --recount` set the tally to) taken
    while another process's import has committed chunks: those count as staged, and its publishing moves them to
    pending in the tally the recount made."""
    found: list[dict[str, int]] = []

    def recount() -> None:
        with Store(db) as store:
            store.conn.execute("UPDATE tally SET pending = 0, sent = 0, staged = 0")  # wrong, as a bug would leave it
            found.append(store.recount()[1])
        assert_counts_true(db)

    with Store(db) as store:
        store.append([*rows(6, stat="kept"), held("kept early")])
        lease = store.lease(2, now=T0, keyed_only=False)
        assert lease is not None
        store.ack([lease.items[0].id], now=T0)
        store.mark_dead([lease.items[1].id], reason="refused", http_status=200, body="{}", now=T0)
        store.append(pausing(rows(25, stat="big"), at=21, then=recount), chunk=10)
    assert found == [{"pending": 4, "held": 1, "sent": 1, "dead": 1, "staged": 20}]
    with Store(db) as store:
        assert store.tally() == {"pending": 29, "held": 1, "sent": 1, "dead": 1, "staged": 0}
    assert_counts_true(db)


# -- what reads the counts reads as much of a large spool as of a small one ------------------------------------


def vm_steps(conn: Any, action: Callable[[], object]) -> int:
    """Return how many instructions SQLite's virtual machine ran on `conn` during `action()` (the work it did,
    counted exactly: a count over n rows runs several instructions per row)."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(tick, 1)
    try:
        action()
    finally:
        conn.set_progress_handler(None, 1)
    return steps


def make_spool(db: Path, backlog: int) -> None:
    """The same small spool (a few records of every state, ten in flight), plus `backlog` newer pending records."""
    with Store(db) as store:
        store.append([*rows(40, stat="old"), held("early")])
        lease = store.lease(10, now=T0, keyed_only=False)
        assert lease is not None
        store.ack([item.id for item in lease.items[:3]], now=T0)
        store.mark_dead([item.id for item in lease.items[3:5]], reason="refused", http_status=200, body="{}", now=T0)
        store.lease(10, now=T0, keyed_only=False)
        if backlog:
            store.append(rows(backlog, stat="backlog", t=T0 + 1000))


READERS = ("counts", "backlog", "status", "healthz", "metrics", "dead list", "an append with max_pending set",
           "an append with max_pending set, at the bound", "an append with max_spool_bytes set",
           "an append with max_spool_bytes set, at the bound")


def reader(name: str, db: Path, stack: ExitStack) -> tuple[sqlite3.Connection, Callable[[], object]]:
    """Open what `name` reads with, on `db`; return its connection and the read."""
    if name == "status":
        sp = stack.enter_context(Spool(config=make_config(db)))  # a key configured: no record's key is asked about
        return sp.store.conn, sp.status
    if name.startswith("an append"):
        settings = {"max_spool_bytes": 10**12} if "bytes" in name else {"max_pending": 10**9}
        with Store(db) as store:
            if "at the bound" in name and "bytes" in name:  # the sent records give way, then the oldest 1,000
                used = store._used_bytes(store.conn)
                settings = {"max_spool_bytes": used - 1}
            elif "at the bound" in name:  # each append drops the oldest record not in flight
                settings = {"max_pending": store.tally()["pending"]}
        store = stack.enter_context(Store(db, limits=limits(**settings)))
        return store.conn, lambda: store.append([make_record(stat="new", count=1, t=T0 + 10**6)])
    store = stack.enter_context(Store(db))
    if name in ("healthz", "metrics"):
        metrics = Metrics(store)
        return store.conn, metrics.health if name == "healthz" else metrics.render
    return store.conn, {"counts": store.counts, "backlog": store.backlog, "dead list": store.dead_letters}[name]


@pytest.mark.parametrize("name", READERS)
def test_what_reads_the_counts_does_as_much_work_on_a_backlog_of_30_000_as_on_one_of_2_000(tmp_path, name):
    work = {}
    for backlog in (2_000, 30_000):  # enough for a byte bound to drop its 1,000 oldest from either
        db = tmp_path / f"spool-{backlog}.db"
        make_spool(db, backlog)
        with ExitStack() as stack:
            conn, read = reader(name, db, stack)
            work[backlog] = vm_steps(conn, read)
    assert work[30_000] <= work[2_000] + 50, f"{name}: {work[2_000]} steps with 2,000, {work[30_000]} with 30,000"


# -- doctor --deep ---------------------------------------------------------------------------------------------


def test_doctor_deep_names_each_kept_count_that_differs_from_the_records_and_recount_sets_them(db):
    with Store(db) as store:
        store.append(rows(10))
    env = cli_env(db)
    result = run_cli(db, "doctor", "--deep", env=env)
    [line] = [line for line in result.stdout.splitlines() if " counts:" in line]
    assert line.startswith("ok   counts: kept counts match the records"), result.stdout
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:  # as a release that forgot one would leave it
        conn.execute("UPDATE tally SET pending = pending + 5, sent = 3")
    assert " counts:" not in run_cli(db, "doctor", env=env).stdout  # the plain doctor reads no record
    result = run_cli(db, "doctor", "--deep", env=env)
    assert result.returncode == 1
    [line] = [line for line in result.stdout.splitlines() if " counts:" in line]
    assert line.startswith("FAIL counts: kept counts differ from the records: pending 15 kept, 10 counted; "
                           "sent 3 kept, 0 counted -- fix: spool doctor --deep --recount"), line
    assert "counts" in result.stderr
    result = run_cli(db, "doctor", "--deep", "--recount", env=env)
    [line] = [line for line in result.stdout.splitlines() if " counts:" in line]
    assert line.startswith("ok   counts: set to the records' counts: pending 15 kept, 10 counted; sent 3 kept, "
                           "0 counted"), line
    kept, real = kept_and_real_counts(db)
    assert kept == real and kept["pending"] == 10
    assert "Traceback" not in result.stderr


def test_recount_without_deep_is_a_usage_error(db):
    result = run_cli(db, "doctor", "--recount")
    assert result.returncode == 2 and "--recount" in result.stderr and "Traceback" not in result.stderr


def test_the_counts_of_a_new_spool_are_its_zero_records(db):
    with Store(db) as store:
        assert store.tally() == {"pending": 0, "held": 0, "sent": 0, "dead": 0, "staged": 0}
    assert_counts_true(db)


# -- the bounds and records held while the clock was wrong ---------------------------------------------------


def test_held_records_count_against_max_pending_and_give_way_first(db):
    """A box without a real-time clock holds what it stamps until the clock is sane: those records wait as much as
    pending ones do, and their time is unknown, so at the bound they make room before records that can ship."""
    with Store(db, limits=limits(max_pending=5)) as store:
        store.append([held(f"h{i}") for i in range(5)])
        store.append(rows(2, stat="dated"))
        assert store.tally()["held"] == 3 and store.tally()["pending"] == 2
        assert store.counters()["dropped_oldest"] == 2
        assert sorted(r.stat for _, _, r in store.records(State.HELD)) == ["h2", "h3", "h4"]
        assert_counts_true(db)


def test_a_byte_bound_holds_against_held_records(db):
    with Store(db) as store:
        base = store._used_bytes(store.conn)
    bound = base + (64 << 10)
    with Store(db, limits=limits(max_spool_bytes=bound)) as store:
        for k in range(20):  # 100 records of unique 100-character names an append: 2,000 in all, far past the bound
            store.append([held(f"{'h' * 100} {i}") for i in range(k * 100, (k + 1) * 100)])
            assert store._used_bytes(store.conn) <= bound
        assert store.counters()["dropped_oldest"] > 0
        store.append(rows(1, stat="dated"))  # a record that can ship is kept; held ones made room
        assert [r.stat for _, _, r in store.records(State.PENDING)] == ["dated0"]
        assert_counts_true(db)


def test_an_append_reports_every_record_its_bound_dropped_in_one_line(db, caplog):
    with Store(db, limits=limits(max_spool_bytes=10**9)) as store:
        store.append(rows(3000))
    with Store(db) as store:
        used = store._used_bytes(store.conn)
    with Store(db, limits=limits(max_spool_bytes=used)) as store:
        store.append(rows(1500, stat="new"))  # more than one step (1,000 records) of drops
        dropped = store.counters()["dropped_oldest"]
    assert dropped > 1000
    [line] = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert line == f"spool is at its limit: dropped {dropped} oldest waiting records"


def test_a_dead_letter_whose_time_is_unknown_is_never_requeued_nor_exported(db):
    with Store(db) as store:
        store.append([held("undated"), *rows(1, stat="refused")])
        assert store.restamp_held(wall=T0, mono=0.0, boot="another boot", floor=T0) == (0, 1)  # an earlier boot
        [refused] = [i for i, _, r in store.records(State.PENDING) if r.stat == "refused0"]
        store.mark_dead([refused], reason="invalid stat name", http_status=200, body="{}", now=T0)
    env = cli_env(db)
    requeued = run_cli(db, "dead", "requeue", "--all", env=env)
    assert requeued.returncode == 1
    assert "requeued 1 record" in requeued.stderr and "no known time" in requeued.stderr
    assert "Traceback" not in requeued.stderr
    exported = run_cli(db, "export", "--state", "all", "-", env=env)
    assert exported.returncode == 0 and [line for line in exported.stdout.splitlines() if line] == [
        json.dumps({"stat": "refused0", "count": 1, "t": T0})]
    with Store(db) as store:
        assert store.tally()["dead"] == 1 and [r.t for _, _, r in store.records(State.DEAD)] == [0]
