"""The shipper against a real StatHat-compatible receiver on loopback, with faults."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from spool import Spool
from spool.records import KIND_NAMES, make_record
from spool.ship import Shipper
from spool.store import State, Store

from .helpers import T0, TEST_EZKEY, make_config


def expected(records, default_key=TEST_EZKEY):
    """The multiset the receiver should hold for `records`: (stat or key, kind, number, t, key)."""
    return sorted((r.stat or r.key, KIND_NAMES[r.kind], r.number, r.t,
                   (r.ezkey or default_key) if r.stat is not None else r.ukey) for r in records)


def mixed_records(n, seed=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = rng.random()
        t = T0 + rng.randrange(0, 86400)
        if kind < 0.03:
            out.append(make_record(key=f"k{i % 5}", ukey="u", count=rng.randrange(1, 9), t=t))
        elif kind < 0.15:
            out.append(make_record(stat=f"own {i % 11}", value=rng.random(), t=t, ezkey="other-account-key"))
        elif kind < 0.6:
            out.append(make_record(stat=f"count~a,b{i % 3}", count=rng.randrange(1, 100), t=t))
        else:
            out.append(make_record(stat=f"válue {i % 13}", value=round(rng.uniform(-5, 5), 3), t=t))
    return out


class SleepClock:
    """An injected sleep that returns at once and a monotonic clock that its sleeps advance."""

    def __init__(self):
        self.waits = []

    def sleep(self, seconds):
        self.waits.append(seconds)

    def monotonic(self):
        return time.monotonic() + sum(self.waits)


def ship_all(db, receiver, records=(), *, clock=None, max_time=600, **changes):
    config = make_config(db, receiver, **changes)
    clock = clock or SleepClock()
    with Spool(db) as sp:
        sp.append_records(records)
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock.monotonic) as shipper:
        result = shipper.drain(max_time=max_time)
        return shipper, result, store.counts()


def test_thousands_of_mixed_records_arrive_exactly_once_through_bursts_resets_stalls_and_429s(db, receiver):
    records = mixed_records(3000)
    receiver.fail_next(5)
    receiver.reset_next(3)
    receiver.rate_limit_next(2, retry_after="1")
    receiver.stall_next(1, seconds=1.0)
    receiver.fail_next(2, status=500, body="internal")
    shipper, result, counts = ship_all(db, receiver, records, timeout=0.3, batch_size=250)
    assert result.done
    assert receiver.stats() == expected(records)
    assert counts == {"pending": 0, "inflight": 0, "sent": 3000, "dead": 0, "held": 0}
    assert shipper.stats.retries >= 13
    assert max(receiver.batches) <= 250


def test_a_drain_leaves_no_lease_behind_through_failures_resets_and_a_poison_record(db, receiver):
    """Every lease a drain takes is ended by the commit that settles it: lease rows left behind would hold
    nothing yet be walked by every later lease (300 rows after 30,000 records when an ack forgot its lease)."""
    records = [*mixed_records(1200), make_record(stat="poison", count=1, t=T0)]
    receiver.refuse_stat("poison")
    receiver.fail_next(2)
    receiver.reset_after_accept_next(1)
    shipper, result, counts = ship_all(db, receiver, records, timeout=0.3, batch_size=100)
    assert result.done and counts["dead"] == 1 and counts["sent"] == 1200
    with Store(db) as store:
        assert store.conn.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
        assert store.conn.execute("SELECT count(*) FROM lease_runs").fetchone()[0] == 0


def test_every_record_arrives_with_its_original_t(db, receiver):
    records = [make_record(stat="late", count=1, t=T0 - 86400 * 30), make_record(stat="now", value=2, t=T0)]
    ship_all(db, receiver, records)
    assert sorted(a["t"] for a in receiver.accepted) == [T0 - 86400 * 30, T0]


def test_ez_records_are_batched_per_ezkey(db, receiver):
    records = [make_record(stat=f"s{i}", count=1, t=T0, ezkey=("a" if i % 2 else None)) for i in range(10)]
    ship_all(db, receiver, records)
    assert sorted(receiver.batches) == [5, 5]
    assert Counter(a["ezkey"] for a in receiver.accepted) == {"a": 5, TEST_EZKEY: 5}


def test_a_refused_stat_inside_a_batch_ends_as_exactly_one_dead_record_and_the_rest_arrive(db, receiver):
    records = [make_record(stat=f"good {i}", count=i, t=T0 + i) for i in range(99)]
    poison = make_record(stat="poison", count=1, t=T0 + 50)
    receiver.refuse_stat("poison", "invalid stat name")
    shipper, result, counts = ship_all(db, receiver, [*records, poison], batch_size=100)
    assert result.done
    assert counts == {"pending": 0, "inflight": 0, "sent": 99, "dead": 1, "held": 0}
    assert receiver.stats() == expected(records)
    with Store(db) as store:
        [dead] = store.dead_letters()
    assert dead["record"] == poison
    assert (dead["reason"], dead["http_status"]) == ("invalid stat name", 200)
    assert '"status":500' in dead["body"]


def test_a_refused_configured_key_pauses_shipping_and_kills_nothing(db, receiver):
    receiver.refuse_key(TEST_EZKEY)
    records = [make_record(stat="s", count=1, t=T0)] * 5
    shipper, result, counts = ship_all(db, receiver, records, max_time=1)
    assert not result.done and "configured ezkey" in result.reason
    assert counts["dead"] == 0 and counts["pending"] == 5
    with Spool(config=make_config(db, receiver)) as sp:
        status = sp.status()
    assert any("paused" in problem for problem in status["problems"])
    assert TEST_EZKEY not in result.reason and TEST_EZKEY not in str(status)


def test_a_record_whose_own_key_is_refused_goes_dead_without_holding_back_others(db, receiver):
    receiver.refuse_key("revoked-key")
    bad = [make_record(stat=f"own {i}", count=1, t=T0, ezkey="revoked-key") for i in range(8)]
    good = [make_record(stat="fine", count=1, t=T0)]
    shipper, result, counts = ship_all(db, receiver, [*bad, *good])
    assert result.done
    assert counts == {"pending": 0, "inflight": 0, "sent": 1, "dead": 8, "held": 0}
    assert receiver.requests == 2  # the bad key's group died whole: no bisecting through 8 records


def test_a_misconfigured_endpoint_pauses_and_keeps_every_record_pending(db, receiver):
    records = [make_record(stat="s", count=1, t=T0 + i) for i in range(10)]
    waits = []
    receiver.fail_next(1000, status=404, body="404 page not found")
    config = make_config(db, receiver)
    with Spool(db) as sp:
        sp.append_records(records)
    with Store(db) as store, Shipper(store, config, sleep=waits.append) as shipper:
        result = shipper.drain(max_time=0.5)
        assert not result.done and "HTTP 404" in result.reason
        assert store.counts() == {"pending": 10, "inflight": 0, "sent": 0, "dead": 0, "held": 0}
        assert store.meta()["last_result"] == "paused"
    assert waits


def test_retry_waits_grow_exponentially_with_full_jitter_up_to_the_cap(db, receiver):
    receiver.fail_next(12)
    clock = SleepClock()
    ship_all(db, receiver, [make_record(stat="s", count=1, t=T0)], clock=clock, backoff_initial=0.5,
             backoff_max=4.0)
    waits = clock.waits
    assert len(waits) == 12
    for attempt, wait in enumerate(waits, start=1):
        assert 0 <= wait <= min(4.0, 0.5 * 2**attempt)
    assert max(waits[6:]) > 0.5  # the ceiling grew: later waits are not stuck at the initial size


def test_retry_after_is_honoured_and_capped(db, receiver):
    receiver.rate_limit_next(1, retry_after="30")
    receiver.rate_limit_next(1, retry_after="100000")
    clock = SleepClock()
    ship_all(db, receiver, [make_record(stat="s", count=1, t=T0)], clock=clock,
             backoff_initial=0.001, backoff_max=0.01, retry_after_max=600, max_time=3600)
    assert clock.waits == pytest.approx([30, 600], abs=0.05)  # waits run from the failure to the gate


def test_records_without_any_key_stay_pending_and_do_not_block_the_drain(db, receiver):
    records = [make_record(stat="keyless", count=1, t=T0), make_record(stat="own", count=1, t=T0, ezkey="k")]
    shipper, result, counts = ship_all(db, receiver, records, ezkey=None)
    assert result.done
    assert counts["pending"] == 1 and counts["sent"] == 1


def test_classic_records_go_one_per_request_to_c_and_v(db, receiver):
    records = [make_record(key="K1", ukey="U", count=3, t=T0), make_record(key="K2", ukey="U", value=1.5, t=T0)]
    ship_all(db, receiver, records)
    assert receiver.stats() == expected(records)
    assert receiver.batches == []  # no JSON batch was used


def test_shutdown_mid_drain_hands_back_the_unsent_batch(db, receiver):
    records = [make_record(stat="s", count=1, t=T0 + i) for i in range(40)]
    config = make_config(db, receiver, batch_size=10)
    with Spool(db) as sp:
        sp.append_records(records)
    receiver.fail_next(10_000)
    shutdown = threading.Event()

    def sleep(seconds):
        shutdown.set()  # a signal arrives during the first back-off

    with Store(db) as store, Shipper(store, config, shutdown=shutdown, sleep=sleep) as shipper:
        result = shipper.drain()
        assert not result.done
        assert store.counts() == {"pending": 40, "inflight": 0, "sent": 0, "dead": 0, "held": 0}


def test_a_new_shipper_reclaims_leases_left_by_a_dead_one(db, receiver):
    with Spool(db) as sp:
        sp.append_records([make_record(stat="s", count=1, t=T0 + i) for i in range(5)])
    lease_and_die = f"from spool.store import Store; Store({str(db)!r}).lease(5, now={T0}, keyed_only=False)"
    subprocess.run([sys.executable, "-c", lease_and_die], check=True)  # a shipper that died holding a lease
    with Store(db) as store:
        assert store.counts()["inflight"] == 5
    shipper, result, counts = ship_all(db, receiver)
    assert counts["sent"] == 5 and len(receiver.accepted) == 5


def test_a_live_shippers_lease_is_never_taken_by_another_shipper(db, receiver):
    """Two shippers on one spool (e.g. through two hard links, which the lock cannot see): never the same record."""
    with Spool(db) as sp:
        sp.append_records([make_record(stat="s", count=1, t=T0 + i) for i in range(5)])
    with Store(db) as store:
        store.lease(2, now=T0, keyed_only=False)  # held by this live process
        shipper, result, counts = ship_all(db, receiver)
        assert counts["inflight"] == 2 and counts["sent"] == 3 and len(receiver.accepted) == 3


def test_housekeeping_prunes_sent_records_after_retention(db, receiver):
    now = [1_000_000.0]
    config = make_config(db, receiver, retention=3600)
    with Spool(db) as sp:
        sp.append_records([make_record(stat="s", count=1, t=T0 + i) for i in range(5)])
    with Store(db) as store, Shipper(store, config, clock=lambda: now[0]) as shipper:
        assert shipper.drain().done
        now[0] += 3599
        shipper.housekeeping()
        assert store.counts()["sent"] == 5
        now[0] += 2
        shipper._last_housekeeping = shipper._last_prune = float("-inf")  # as if an hour had passed
        shipper.housekeeping()
        assert store.counts()["sent"] == 0


def test_run_ships_records_appended_by_another_connection_while_idle(db, receiver):
    config = make_config(db, receiver)
    with Store(db) as store, Shipper(store, config) as shipper:
        thread = threading.Thread(target=shipper.run)
        thread.start()
        try:
            with Spool(db) as producer:
                producer.count("later", 4, t=T0)
            for _ in range(200):
                if receiver.accepted:
                    break
                shipper.shutdown.wait(0.05)
        finally:
            shipper.stop()
            thread.join(5)
    assert [a["stat"] for a in receiver.accepted] == ["later"]
    with Store(db) as store:
        assert [state for _, state, _ in store.records()] == [State.SENT]


@pytest.mark.parametrize("body", ["<html>captive portal</html>", "ok"])
def test_a_2xx_answer_that_is_not_stathats_is_retried_not_counted_as_delivered(db, receiver, body):
    receiver.fail_next(3, status=200, body=body)
    shipper, result, counts = ship_all(db, receiver, [make_record(stat="s", count=1, t=T0)])
    assert result.done and counts["sent"] == 1 and shipper.stats.retries == 3


def test_an_answer_lost_after_the_receiver_took_the_batch_resends_exactly_that_batch(db, receiver):
    records = [make_record(stat=f"s{i}", count=1, t=T0 + i) for i in range(30)]
    receiver.pass_next(1)
    receiver.reset_after_accept_next(1)  # the second batch is taken, its answer never arrives
    shipper, result, counts = ship_all(db, receiver, records, batch_size=10, max_in_flight=1)  # in order
    assert result.done and counts["sent"] == 30
    duplicated = Counter(a["stat"] for a in receiver.accepted) - Counter(r.stat for r in records)
    assert sorted(duplicated) == sorted(f"s{i}" for i in range(10, 20)) and set(duplicated.values()) == {1}


def test_a_drain_looks_for_suspect_groups_again_after_a_split_or_another_connections_commit(db):
    """Looking for suspects takes a write transaction; a drain skips it while it knows there are none (it looked,
    split nothing since, and no other connection committed). A suspect group another connection's commit left
    (a dead shipper's lease released), or one its own split made, is leased before clean records all the same."""
    import collections

    from spool.errors import Refused
    from spool.ship import _DrainState

    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(40))
    with Store(db) as store, Shipper(store, make_config(db, batch_size=5)) as shipper:
        shipper.ezkey = TEST_EZKEY
        looked = []
        lease_suspects = store.lease_suspects
        store.lease_suspects = lambda **kw: looked.append(1) or lease_suspects(**kw)  # type: ignore[method-assign]
        state, waiting, unsettled = _DrainState(None), collections.deque(), {}

        def lease():
            assert shipper._lease_more(waiting, unsettled, state)
            return waiting.pop()

        def stats(unit):
            return [item.stat for item in unit.items]

        assert stats(lease()) == [f"s{i}" for i in range(5)]
        assert stats(lease()) == [f"s{i}" for i in range(5, 10)]
        assert len(looked) == 1  # none found, and nothing changed since: not looked for again
        with Store(db) as other:  # another connection leaves a suspect group behind
            taken = other.lease(2, now=T0, keyed_only=False, after=10)
            other.split(taken.id, [[item.id for item in taken.items]])
        assert stats(lease()) == ["s10", "s11"]
        assert stats(lease()) == [f"s{i}" for i in range(12, 17)]
        unit = lease()
        assert stats(unit) == [f"s{i}" for i in range(17, 22)] and len(looked) == 3  # found one, then none
        shipper._refused(unit, Refused("invalid stat", http_status=200, body=""), unsettled, state)  # split
        assert stats(lease()) == ["s17", "s18"]
        assert stats(lease()) == ["s19", "s20", "s21"]
        assert stats(lease()) == [f"s{i}" for i in range(22, 27)]
        assert len(looked) == 6


def test_a_drain_searches_after_its_last_lease_only_while_no_other_connection_has_committed(db):
    """Leasing skips the records in flight by starting after the last one leased; a record another connection
    queues meanwhile at the front (here a dead letter requeued: its id is older) is not skipped: that commit
    sends the search back to the front."""
    from spool.ship import _DrainState

    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + 100 + i} for i in range(21))
        taken = sp.store.lease(1, now=T0, keyed_only=False)
        sp.store.mark_dead([taken.items[0].id], reason="no", http_status=200, body="", now=T0)
        sp.store.end_lease(taken.id)
    config = make_config(db, batch_size=5)
    with Store(db) as store, Shipper(store, config) as shipper:
        state = _DrainState(None)
        def stats(lease):  # a lease built by SQLite holds its span of ids
            items = lease.items if lease.data is None else store.leased_records(lease.span)
            return [item.stat for item in items]

        first = shipper._lease_clean(state, keyed_only=False)
        second = shipper._lease_clean(state, keyed_only=False)
        assert stats(first) + stats(second) == [f"s{i}" for i in range(1, 11)]
        with Spool(db) as sp:
            assert sp.store.requeue_dead()[0] == 1
        third = shipper._lease_clean(state, keyed_only=False)
        assert stats(third) == ["s0", "s11", "s12", "s13", "s14"]
        rest = [shipper._lease_clean(state, keyed_only=False) for _ in range(3)]
        assert [stats(lease) for lease in rest[:2]] == [["s15", "s16", "s17", "s18", "s19"], ["s20"]]
        assert rest[2] is None


def test_a_spool_too_busy_to_lease_from_is_waited_out_with_a_short_growing_back_off(db, receiver):
    import sqlite3

    with Spool(db) as sp:
        sp.append_records([make_record(stat=f"s{i}", count=1, t=T0) for i in range(3)])
    now, waits = [1000.0], []
    blocker = sqlite3.connect(db, isolation_level=None)

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        if len(waits) == 2:
            blocker.execute("ROLLBACK")  # the other writer is done: the next lease goes through

    config = make_config(db, receiver)
    try:
        with Store(db, busy_timeout=0.05) as store, \
                Shipper(store, config, sleep=sleep, monotonic=lambda: now[0]) as shipper:
            blocker.execute("BEGIN IMMEDIATE")  # another writer holds the spool: leasing fails with "busy"
            assert shipper.drain(max_time=3600).done
    finally:
        blocker.close()
    assert waits == pytest.approx([0.05, 0.1])  # neither a hot loop nor a wait of the clock's whole reading
    assert sorted(a["stat"] for a in receiver.accepted) == ["s0", "s1", "s2"]


def test_the_commit_that_settles_the_last_records_of_a_lease_ends_that_lease(db, receiver):
    with Spool(db) as sp:
        sp.append_records([make_record(stat=f"s{i}", count=1, t=T0) for i in range(20)])
    config = make_config(db, receiver, batch_size=10, max_in_flight=1)
    open_leases = []
    with Store(db) as store, Shipper(store, config) as shipper:
        def progress(_: int) -> None:
            open_leases.append({lease for (lease,) in store.conn.execute("SELECT id FROM leases")})

        assert shipper.drain(max_time=60, on_progress=progress).done
    # Lease k is acknowledged at the k-th progress: it is gone then (the next may be open, leased in that commit).
    assert [k in leases for k, leases in enumerate(open_leases, 1)] == [False, False]
    assert open_leases[-1] == set()


def test_a_drain_that_gives_up_names_the_last_error_in_its_result_and_its_snapshot(db, receiver):
    with Spool(db) as sp:
        sp.append_records([make_record(stat="s", count=1, t=T0)])
    receiver.fail_next(1000)
    clock = SleepClock()
    with Store(db) as store, \
            Shipper(store, make_config(db, receiver), sleep=clock.sleep, monotonic=clock.monotonic) as shipper:
        result = shipper.drain(max_time=5)
        snapshot = shipper.snapshot()
    assert not result.done and "stopped after 5 s; last error: HTTP 503" in result.reason
    assert "HTTP 503" in snapshot["last_error"] and snapshot["in_flight"] == 0


def test_run_with_no_jitter_configured_drains_at_once_and_reports_no_stop_after_a_clean_drain(db, receiver, caplog):
    import logging

    with Spool(db) as sp:
        sp.append_records([make_record(stat="s", count=1, t=T0)])
    waits: list[float] = []
    with caplog.at_level(logging.INFO, logger="spool"), Store(db) as store, \
            Shipper(store, make_config(db, receiver), sleep=waits.append) as shipper:
        thread = threading.Thread(target=shipper.run)
        thread.start()
        def arrived(stat: str) -> None:
            for _ in range(200):
                if stat in [a["stat"] for a in receiver.accepted]:
                    return
                shipper.shutdown.wait(0.05)

        try:
            arrived("s")
            with Spool(db) as producer:  # shipped by a second drain: the first one has returned
                producer.count("later", 1, t=T0)
            arrived("later")
        finally:
            shipper.stop()
            thread.join(5)
    assert [a["stat"] for a in receiver.accepted] == ["s", "later"] and waits == []
    assert "shipping stopped" not in caplog.text and "jitter" not in caplog.text


# -- a refused configured key holds back only the records sent with it ----------------------------------------


def test_ship_once_with_a_refused_configured_key_still_ships_records_with_their_own_key_and_classic_ones(db, receiver):
    # One refusal of the configured key paused everything: one request, exit 1, the other records all pending.
    import json

    from .helpers import cli_env, run_cli

    receiver.refuse_key("revoked-key-0123")
    with Spool(db) as sp:
        for i in range(3):
            sp.count(f"keyless {i}", 1, t=T0 + i)
        sp.count("own", 1, t=T0, ezkey="own-account-key")
        sp.classic_count(key="stat-key", ukey="user-key", t=T0)
    env = cli_env(db, SPOOL_EZKEY="revoked-key-0123", SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", "--max-time", "30", env=env)
    assert result.returncode == 2 and "refused the configured ezkey" in result.stderr, result.stderr
    assert "shipped 2, dead 0" in result.stderr, result.stderr
    assert sorted(a.get("stat") or a["key"] for a in receiver.accepted) == ["own", "stat-key"]
    status = json.loads(run_cli(db, "status", "--json", env=env).stdout)
    assert (status["pending"], status["inflight"], status["sent"], status["dead"]) == (3, 0, 2, 0)
    assert any(problem.startswith("shipping is paused since") and "refused the configured ezkey" in problem
               for problem in status["problems"]), status
    assert status["health"]["verdict"] == "failing" and "revoked-key-0123" not in json.dumps(status)


def test_status_after_ship_once_with_only_refusals_shows_the_attempt_redacted(db, receiver):
    # last_attempt_at, last_result and last_error stayed null when every answer was a refusal.
    import json

    from .helpers import cli_env, run_cli

    receiver.echo_next(1, status=200, template='{"status":500,"msg":{request_json}}')
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    env = cli_env(db, SPOOL_EZKEY="SuperSecretEzkey-7f3a9Q", SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", "--max-time", "30", env=env)
    assert result.returncode == 2 and "shipped 0, dead 1" in result.stderr, result.stderr
    status = json.loads(run_cli(db, "status", "--json", env=env).stdout)
    assert status["last_attempt_at"] is not None and status["last_result"] == "refused", status
    assert '"ezkey":"***"' in status["last_error"] and "SuperSecret" not in json.dumps(status), status
    assert status["last_success_at"] is None


def test_a_lease_split_after_its_other_part_was_acknowledged_leaves_no_lease_behind(db, receiver):
    """One lease, two requests (a group with its own key beside the configured key's batch); the batch holding a
    refused record is split after the other group was acknowledged: nothing of the lease may stay behind."""

    receiver.refuse_stat("bad")
    with Store(db) as store:
        store.append([make_record(stat="own", count=1, t=T0, ezkey="own-key"),
                      *[make_record(stat=name, count=1, t=T0 + 1) for name in ("a", "bad", "b", "c")]])
    with Store(db) as store, Shipper(store, make_config(db, receiver)) as shipper:
        assert shipper.drain(max_time=30).done
        assert store.lease_count() == 0
        assert store.conn.execute("SELECT count(*) FROM lease_runs").fetchone()[0] == 0
    assert sorted(s[0] for s in receiver.stats()) == ["a", "b", "c", "own"]


MANY_CPUS = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                               reason="needs Linux and two CPUs this process may run on")


def _spooled(db, n: int, prefix: str = "s") -> None:
    with Spool(db) as sp:
        sp.append_records([make_record(stat=f"{prefix}{i}", count=1, t=T0) for i in range(n)])


def _masks(shipper: Shipper) -> list[set[int]]:
    """The CPUs the calling thread and every sender thread may run on now."""
    return [os.sched_getaffinity(0), *(os.sched_getaffinity(tid) for tid in shipper._senders)]


@MANY_CPUS
def test_a_drain_keeps_its_thread_and_its_senders_on_one_cpu_and_gives_the_caller_its_cpus_back(db, receiver):
    _spooled(db, 60)
    before = os.sched_getaffinity(0)
    seen: list[list[set[int]]] = []
    with Store(db) as store, Shipper(store, make_config(db, receiver, batch_size=5, max_in_flight=4)) as shipper:
        assert shipper.drain(max_time=60, on_progress=lambda _: seen.append(_masks(shipper))).done
        assert len(shipper._senders) >= 2  # several were in flight
        after = _masks(shipper)
        # The next drain takes the CPU this thread is on then (moved to another here), the senders with it.
        [first] = seen[0][0]
        _spooled(db, 20, "t")
        os.sched_setaffinity(0, before - {first})
        os.sched_setaffinity(0, before)
        assert shipper.drain(max_time=60, on_progress=lambda _: seen.append(_masks(shipper))).done
    assert all(len(masks) >= 2 and len(masks[0]) == 1 and all(m == masks[0] for m in masks) for masks in seen), seen
    assert after[0] == before  # the caller's thread has its CPUs again; the idle senders stay where they were
    assert os.sched_getaffinity(0) == before
    assert len(receiver.accepted) == 80


@MANY_CPUS
def test_one_cpu_false_leaves_the_threads_where_the_kernel_puts_them(db, receiver):
    _spooled(db, 20)
    before = os.sched_getaffinity(0)
    seen: list[list[set[int]]] = []
    config = make_config(db, receiver, batch_size=5, max_in_flight=4, one_cpu=False)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=60, on_progress=lambda _: seen.append(_masks(shipper))).done
    assert seen and all(mask == before for masks in seen for mask in masks)


def test_refusals_and_drops_are_logged_at_most_once_a_minute_each_line_with_all_since(db, receiver, caplog):
    """The README: every record dropped or refused is counted, and logged at most once a minute."""
    import logging

    receiver.refuse_stat("bad")
    with Spool(db) as sp:
        sp.append_records([make_record(stat="bad" if i % 10 == 0 else f"s{i}", count=1, t=T0) for i in range(100)])
    clock = SleepClock()
    config = make_config(db, receiver, batch_size=5, max_in_flight=1)
    with caplog.at_level(logging.WARNING, logger="spool.ship"), Store(db) as store, \
            Shipper(store, config, sleep=clock.sleep, monotonic=clock.monotonic) as shipper:
        assert shipper.drain(max_time=600).done
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused == ["receiver refused 1 record(s): invalid stat name; moved to dead letters"]
        with Spool(db) as sp:
            sp.append_records([make_record(stat="bad", count=1, t=T0 + i) for i in range(3)])
        clock.waits.append(61)
        assert shipper.drain(max_time=600).done
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        assert refused[1:] == ["receiver refused 10 record(s) in the last minute, the last: invalid stat name; "
                               "moved to dead letters"]
        assert store.counts()["dead"] == 13  # every one of them counted meanwhile
