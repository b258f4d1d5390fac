"""Crashes: a shipper killed with SIGKILL mid-batch, restarted, delivers everything."""

from __future__ import annotations

import signal
from collections import Counter

from spool import Spool
from spool.store import Store

from .conftest import T0, TEST_EZKEY, cli_env, run_cli, spawn_cli


def test_a_shipper_killed_mid_batch_and_restarted_delivers_everything_duplicating_at_most_that_batch(
        db, receiver):
    n, batch = 1000, 100
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": i + 1, "t": T0 + i} for i in range(n))
    sent = Counter((f"s{i}", i + 1, T0 + i) for i in range(n))
    receiver.pass_next(3)
    receiver.hold_after_accept_next(1, seconds=30)  # the 4th batch is taken, its answer never comes
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    shipper = spawn_cli(db, "ship", "--once", "--batch-size", str(batch), env=env)
    try:
        assert receiver.holding.wait(30), "the shipper never reached the held batch"
        held = receiver.accepted[-batch:]
        shipper.send_signal(signal.SIGKILL)
        shipper.wait(timeout=30)
    finally:
        if shipper.poll() is None:
            shipper.kill()
        shipper.communicate()
    with Store(db) as store:
        assert store.counts()["inflight"] == batch  # the dead shipper's lease is still there
    result = run_cli(db, "ship", "--once", "--batch-size", str(batch), env=env)
    assert result.returncode == 0, result.stderr
    received = Counter((a["stat"], a["number"], a["t"]) for a in receiver.accepted)
    assert received - sent == Counter((a["stat"], a["number"], a["t"]) for a in held)  # that batch, once more
    assert not sent - received  # nothing lost
    with Store(db) as store:
        assert store.counts() == {"pending": 0, "inflight": 0, "sent": n, "dead": 0}
        assert store.integrity_ok()
