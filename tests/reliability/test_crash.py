"""Crashes: a shipper killed with SIGKILL mid-batch, restarted, delivers everything."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import pytest

from spool import Spool
from spool.config import Config
from spool.store import Store

from ..helpers import T0, TEST_EZKEY, assert_counts_true, cli_env, run_cli, spawn_cli, wait_for_line


def test_a_shipper_killed_mid_batch_and_restarted_delivers_everything_duplicating_at_most_that_batch(
        db, receiver):
    n, batch = 1000, 100
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": i + 1, "t": T0 + i} for i in range(n))
    sent = Counter((f"s{i}", i + 1, T0 + i) for i in range(n))
    receiver.pass_next(3)
    receiver.hold_after_accept_next(1, seconds=30)  # the 4th batch is taken, its answer never comes
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    serial = db.parent / "serial.toml"  # one request at a time: the held batch is the only one in flight
    serial.write_text("[ship]\nmax_requests_per_second = 0\nreconnect_jitter = 0\nmax_in_flight = 1\n")
    env["SPOOL_CONFIG"] = str(serial)
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
    assert_counts_true(db)
    result = run_cli(db, "ship", "--once", "--batch-size", str(batch), env=env)
    assert result.returncode == 0, result.stderr
    received = Counter((a["stat"], a["number"], a["t"]) for a in receiver.accepted)
    assert received - sent == Counter((a["stat"], a["number"], a["t"]) for a in held)  # that batch, once more
    assert not sent - received  # nothing lost
    with Store(db) as store:
        assert store.counts() == {"pending": 0, "inflight": 0, "sent": n, "dead": 0, "held": 0}
        assert store.integrity_ok()
    assert_counts_true(db)


TRIALS = 30 if os.environ.get("SPOOL_LONG") else 3


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_watcher_killed_mid_file_and_restarted_ingests_every_record_exactly_once(tmp_path, trial):
    db, drop = tmp_path / "spool.db", tmp_path / "drop"
    drop.mkdir()
    n = 100_000
    (drop / "big.jsonl").write_text("".join(f'{{"stat":"s{i}","count":1,"t":{T0}}}\n' for i in range(n)))
    os.utime(drop / "big.jsonl", (T0, T0))  # old enough to need no settling
    watcher = spawn_cli(db, "watch", str(drop))
    time.sleep(random.Random(trial).uniform(0.2, 2.0))  # somewhere in start-up, the ingest, or after it
    watcher.send_signal(signal.SIGKILL)
    watcher.communicate(timeout=30)
    if db.exists():
        assert_counts_true(db)  # killed mid-file: its stage, if any, counts as staged
    restarted = spawn_cli(db, "watch", str(drop))
    wait_for_line(restarted, "watching")  # signal handlers are installed by now
    try:
        deadline = time.monotonic() + 60
        while (drop / "big.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        restarted.send_signal(signal.SIGTERM)
        _, stderr = restarted.communicate(timeout=30)
    assert restarted.returncode == 0, stderr
    assert (drop / ".done" / "big.jsonl").exists()
    with Store(db) as store:
        stats = Counter(record.stat for _, _, record in store.records())
        assert store.integrity_ok()
    assert_counts_true(db)
    assert len(stats) == n and set(stats.values()) == {1}


@pytest.mark.parametrize("trial", range(TRIALS))
def test_an_import_killed_at_a_random_instant_commits_all_or_nothing(tmp_path, trial):
    db, source = tmp_path / "spool.db", tmp_path / "big.jsonl"
    n = 100_000
    source.write_text("".join(f'{{"stat":"s{i}","count":1,"t":{T0}}}\n' for i in range(n)))
    importer = spawn_cli(db, "import", str(source))
    time.sleep(random.Random(100 + trial).uniform(0.1, 2.5))
    importer.send_signal(signal.SIGKILL)
    importer.communicate(timeout=30)
    with Store(db) as store:
        first = store.counts()["pending"]
        assert store.integrity_ok()
    assert_counts_true(db)  # what the killed import staged counts as staged, never as pending
    assert first in (0, n), f"a killed import left {first} of {n} records"
    if first == 0:
        assert run_cli(db, "import", str(source)).returncode == 0
    with Store(db) as store:
        stats = Counter(record.stat for _, _, record in store.records())
    assert_counts_true(db)
    assert len(stats) == n and set(stats.values()) == {1}


@pytest.mark.parametrize("trial", range(TRIALS))
def test_a_shipper_killed_at_a_random_instant_duplicates_at_most_the_batches_in_flight(tmp_path, receiver, trial):
    db = tmp_path / "spool.db"
    n, batch = 20_000, 200
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(n))
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    shipper = spawn_cli(db, "ship", "--once", "--batch-size", str(batch), env=env)
    time.sleep(random.Random(200 + trial).uniform(0.3, 2.0))
    shipper.send_signal(signal.SIGKILL)
    shipper.communicate(timeout=30)
    assert_counts_true(db)
    result = run_cli(db, "ship", "--once", "--batch-size", str(batch), env=env)
    assert result.returncode == 0, result.stderr
    got = Counter(int(a["stat"][1:]) for a in receiver.accepted)
    assert set(got) == set(range(n))  # nothing lost
    duplicated = sorted(i for i, times in got.items() if times > 1)
    assert all(got[i] == 2 for i in duplicated)
    # Leases are taken oldest first, `batch` records each: whole batches were sent again, and no more of them
    # than could be in flight at once.
    batches = Counter(i // batch for i in duplicated)
    assert all(size == batch for size in batches.values())
    assert len(batches) <= Config().ship.max_in_flight
    with Store(db) as store:
        assert store.counts() == {"pending": 0, "inflight": 0, "sent": n, "dead": 0, "held": 0}
        assert store.integrity_ok()
    assert_counts_true(db)
