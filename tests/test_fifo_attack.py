"""What the outside attack on the queue in append order found, each through the path it was found on."""

from __future__ import annotations

import json
import signal
import time

import pytest

from spool import Spool
from spool.errors import SpoolFull
from spool.store import Store
from tests.helpers import T0, TEST_EZKEY, assert_counts_true, cli_env, jsonl, run_cli, spawn_cli, wait_for

DAY = 86_400


def status(db, env) -> dict:
    result = run_cli(db, "status", "--json", env=env)
    return json.loads(result.stdout)


def test_a_suspect_group_that_passed_max_age_while_no_shipper_ran_is_dropped_by_ship_once(db, receiver):
    # A bisection interrupted (the shipper stopped) and resumed only after max_age: the group was never leased
    # again (too old) nor dropped (only the queue was looked at), and `ship --once` said all was delivered.
    now = time.time()
    with Store(db) as store:
        store.append([("s", None, None, None, 0, 1, int(now - 2 * DAY) + i) for i in range(4)])
        lease = store.lease(10, now=now, keyed_only=False)
        ids = [item.id for item in lease.items]
        store.split(lease.id, [ids[:2], ids[2:]], end=True)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url, SPOOL_SPOOL_MAX_AGE="1d")
    shipped = run_cli(db, "ship", "--once", env=env)
    assert shipped.returncode == 0, shipped.stderr
    assert "dropped 4 older than max_age" in shipped.stderr.splitlines()[-1]
    after = status(db, env)
    assert (after["pending"], after["inflight"], after["counters"]["dropped_age"]) == (0, 0, 4)
    assert receiver.accepted == []
    assert_counts_true(db)


def test_ship_once_drops_an_old_import_appended_after_newer_records_and_says_so(db, receiver):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url, SPOOL_SPOOL_MAX_AGE="1d")
    now = int(time.time())
    fresh = "".join(json.dumps({"stat": "fresh", "count": 1, "t": now - i}) + "\n" for i in range(150))
    old = "".join(json.dumps({"stat": "old", "count": 1, "t": now - 3 * DAY + i}) + "\n" for i in range(150))
    for lines in (fresh, old):  # the old import last: at the back of the queue
        assert run_cli(db, "import", "-", input=lines.encode(), env=env).returncode == 0
    shipped = run_cli(db, "ship", "--once", "--batch-size", "100", env=env)
    assert shipped.returncode == 0, shipped.stderr
    assert shipped.stderr.splitlines()[-1] == "shipped 150, dead 0, dropped 150 older than max_age"
    assert {a["stat"] for a in receiver.accepted} == {"fresh"} and len(receiver.accepted) == 150
    after = status(db, env)
    assert (after["pending"], after["counters"]["dropped_age"]) == (0, 150)
    assert_counts_true(db)


def test_drop_oldest_drops_suspect_records_appended_before_the_queued_ones(db):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(10))
        lease = sp.store.lease(4, now=T0, keyed_only=False)  # refused together, split apart: suspects
        ids = [item.id for item in lease.items]
        sp.store.split(lease.id, [ids[:2], ids[2:]], end=True)
    with Spool(db, max_pending=10) as sp:
        sp.add_many({"stat": f"new{i}", "count": 1, "t": T0 + 100} for i in range(3))
        kept = sorted(r.stat for _, _, r in sp.store.records())
    assert kept == sorted([f"s{i}" for i in range(3, 10)] + ["new0", "new1", "new2"])  # s0, s1, s2 went first
    assert_counts_true(db)


def test_export_leaves_out_the_records_in_flight_as_export_remove_does(db, tmp_path):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(10))
        lease = sp.store.lease(4, now=T0, keyed_only=False)
        assert lease is not None
        for state in ("pending", "all"):
            out = tmp_path / f"{state}.jsonl"
            result = sp.export(out, state=state)
            stats = [json.loads(line)["stat"] for line in out.read_text().splitlines()]
            assert stats == [f"s{i}" for i in range(4, 10)] and result.exported == 6
            assert sp.store.count_selected(state) == 6


def test_an_append_larger_than_max_pending_is_refused_for_what_it_is(db):
    with Spool(db, max_pending=10) as sp, pytest.raises(SpoolFull, match="these 15 records alone are more than "
                                                                          "max_pending"):
        sp.add_many({"stat": "s", "count": 1, "t": T0 + i} for i in range(15))


def test_ship_once_stopped_by_sigterm_awaits_its_answers_hands_back_the_rest_and_exits_1(db, receiver):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "import", "-", input=jsonl(*[f"s{i}" for i in range(300)]).encode(), env=env).returncode == 0
    receiver.latency = 1.0
    shipping = spawn_cli(db, "ship", "--once", "--batch-size", "100", "--max-in-flight", "1", env=env)
    wait_for(lambda: receiver.requests >= 1)  # the first batch is on its way
    shipping.send_signal(signal.SIGTERM)
    _, stderr = shipping.communicate(timeout=30)
    assert shipping.returncode == 1, stderr
    assert "stopped by a signal" in stderr.splitlines()[-1] and "Traceback" not in stderr
    after = status(db, env)
    assert after["inflight"] == 0  # handed back, not left to a dead owner
    assert after["sent"] == len(receiver.accepted) and after["pending"] == 300 - after["sent"]
    assert_counts_true(db)
