"""Delivery on real links: progress is guaranteed, requests are pipelined, status and health tell the truth."""

from __future__ import annotations

import json
import random
import time
from collections import Counter

import pytest

from spool import Spool
from spool.records import make_record
from spool.ship import AdaptiveLimit, Shipper
from spool.store import Store

from .helpers import T0, TEST_EZKEY, cli_env, make_config, run_cli


def backlog(db, n, *, poison=(), seed=0):
    """n clean records plus the poison stats, shuffled in time; the first poison record is the oldest of all."""
    rng = random.Random(seed)
    records = [make_record(stat=f"s{i}", count=1, t=T0 + 10 + rng.randrange(86400)) for i in range(n)]
    records += [make_record(stat=name, count=1, t=T0 + (0 if k == 0 else rng.randrange(86400)))
                for k, name in enumerate(poison)]
    with Spool(db) as sp:
        sp.append_records(records)
    return Counter(f"s{i}" for i in range(n))


def flaky_link(receiver, requests, *, stall=3.0):
    """A reset every 7th request, a 429 every 11th, a stall past the timeout every 13th; the rest pass."""
    for i in range(1, requests + 1):
        if i % 7 == 0:
            receiver.reset_next(1)
        elif i % 11 == 0:
            receiver.rate_limit_next(1, retry_after="0")
        elif i % 13 == 0:
            receiver.stall_next(1, seconds=stall)
        else:
            receiver.pass_next(1)


def test_a_poison_record_at_the_head_of_a_backlog_on_a_flaky_link_holds_nothing_up(db, receiver):
    """The livelock of 0.1: one refused record, oldest of 3,000, and a link failing every few requests."""
    clean = backlog(db, 3000, poison=["poison"])
    receiver.refuse_stat("poison", "invalid stat name")
    flaky_link(receiver, 2000)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", "--timeout", "1", "--max-time", "120", env=env, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]  # everything else delivered; the refused record needs a look
    assert result.stderr.splitlines()[-1] == "spool: error: 1 record refused by the receiver (see `spool dead list`)"
    assert Counter(a["stat"] for a in receiver.accepted) == clean
    dead = [json.loads(line) for line in run_cli(db, "dead", "list", "--json").stdout.splitlines()]
    assert [(d["stat"], d["reason"]) for d in dead] == [("poison", "invalid stat name")]


@pytest.mark.parametrize("seed", range(3))
def test_every_record_ends_sent_or_dead_whatever_transient_failures_come(db, receiver, seed):
    """The invariant, under a random schedule of failures that never take a request: exactly once, or dead."""
    rng = random.Random(seed)
    poison = [f"poison {k}" for k in range(rng.randrange(1, 5))]
    clean = backlog(db, 1500, poison=poison, seed=seed)
    for name in poison:
        receiver.refuse_stat(name)
    for _ in range(600):
        fault = rng.random()
        if fault < 0.1:
            receiver.reset_next(1)
        elif fault < 0.2:
            receiver.fail_next(1)
        elif fault < 0.25:
            receiver.rate_limit_next(1, retry_after="0")
        else:
            receiver.pass_next(1)
    config = make_config(db, receiver, batch_size=rng.choice([7, 50, 200]), max_in_flight=rng.choice([1, 3, 8]))
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=120).done
        counts = store.counts()
        assert (counts["pending"], counts["inflight"], store.lease_count(), store.suspects()) == (0, 0, 0, 0)
        assert sorted(d["record"].stat for d in store.dead_letters()) == sorted(poison)
    assert Counter(a["stat"] for a in receiver.accepted) == clean


def test_requests_are_pipelined_on_a_long_link_and_never_beyond_max_in_flight(db, receiver):
    backlog(db, 4000)
    receiver.latency = 0.2
    config = make_config(db, receiver, batch_size=100, max_in_flight=6)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=120).done
    assert 3 <= receiver.max_in_flight <= 6


def test_pacing_does_not_stop_the_pipeline(db, receiver):
    """Between paced requests the drain waits for answers only until the next one may go."""
    backlog(db, 2000)
    receiver.latency = 0.3
    config = make_config(db, receiver, batch_size=100, max_in_flight=6, max_requests_per_second=30)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=120).done
    assert receiver.max_in_flight >= 3


def test_one_at_a_time_when_max_in_flight_is_one(db, receiver):
    backlog(db, 500)
    receiver.latency = 0.05
    config = make_config(db, receiver, batch_size=50, max_in_flight=1)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=60).done
    assert receiver.max_in_flight == 1


def test_the_concurrency_limit_grows_on_clean_answers_and_halves_on_trouble():
    now = [0.0]
    limit = AdaptiveLimit(8, monotonic=lambda: now[0])
    for _ in range(40):
        limit.success(0.3)
    assert limit.value == 8
    limit.trouble()
    assert limit.value == 4
    limit.trouble()  # the same event (within one round trip) seen by another request: no second cut
    assert limit.value == 4
    now[0] += 1
    limit.trouble()
    assert limit.value == 2
    for _ in range(10):
        limit.success(5.0)  # answers far slower than the link's best: a queue is building, do not grow
    assert limit.value == 2


def test_pacing_holds_with_many_requests_in_flight(db, receiver):
    backlog(db, 300)
    now = [1000.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    config = make_config(db, receiver, batch_size=10, max_in_flight=8, max_requests_per_second=5)
    with Store(db) as store, Shipper(store, config, sleep=sleep, monotonic=lambda: now[0]) as shipper:
        assert shipper.drain(max_time=3600).done
    # 30 requests at 5 a second take at least 29 intervals of 0.2 s of (simulated) time.
    assert now[0] - 1000.0 >= 29 * 0.2 - 1e-6


def test_status_shows_a_recovered_failure_as_past(db, receiver):
    backlog(db, 10)
    receiver.fail_next(3)
    config = make_config(db, receiver)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert shipper.drain(max_time=60).done
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    status = json.loads(run_cli(db, "status", "--json", env=env).stdout)
    assert status["last_result"] == "ok" and status["last_error"] is None
    assert status["last_success_at"] is not None
    assert not [p for p in status["problems"] if "retrying" in p or "failing" in p]


def test_successes_are_recorded_at_most_once_a_second_and_the_last_when_the_drain_ends(db, receiver):
    """Status bookkeeping rides on acknowledgements but is not rewritten with every one of them: a success note
    is written when the last was a second ago (or something changed), and the last one when the drain ends."""
    backlog(db, 50)
    ticks = iter(range(1, 100_000))
    wall = iter(range(T0, T0 + 100_000))
    config = make_config(db, receiver, batch_size=5, max_in_flight=1)
    with Store(db) as store, Shipper(store, config, clock=lambda: float(next(wall)),
                                     monotonic=lambda: next(ticks) / 1000) as shipper:
        notes: list[str] = []
        store.conn.set_trace_callback(lambda sql: notes.append(sql) if "last_success_at" in sql else None)
        assert shipper.drain(max_time=60).done
        store.conn.set_trace_callback(None)
        meta = store.meta()
        last_ack = store.conn.execute("SELECT max(done_at) FROM settled").fetchone()[0]
    assert len(receiver.accepted) == 50
    assert 1 <= len(notes) <= 3, notes  # ten acknowledgements within a second (by the monotonic clock)
    assert last_ack - 5 <= meta["last_success_at"] < last_ack and meta["last_result"] == "ok"


def test_a_failure_right_after_a_success_is_recorded_at_once(db, receiver):
    backlog(db, 20)
    receiver.pass_next(1)
    receiver.fail_next(1000)
    config = make_config(db, receiver, batch_size=10, max_in_flight=1)
    with Store(db) as store, Shipper(store, config) as shipper:
        assert not shipper.drain(max_time=0.5).done
        meta = store.meta()
    assert meta["last_result"] == "retrying" and "503" in meta["last_error"]
    assert meta["last_success_at"] is not None


@pytest.mark.parametrize(("path", "hint", "status"), [("/ez", "spool adds /ez", 2), ("/api", "HTTP 404", 2)])
def test_ship_once_ends_at_once_against_an_endpoint_that_cannot_work(db, receiver, path, hint, status):
    backlog(db, 3)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url + path)
    started = time.monotonic()
    result = run_cli(db, "ship", "--once", "--max-time", "300", env=env, timeout=60)
    assert result.returncode == status
    assert hint in result.stderr.splitlines()[-1]
    assert time.monotonic() - started < 60  # not the 300 s of --max-time (a generous bound, not a timing test)


def test_ship_once_ends_at_once_when_tls_meets_a_plain_http_server(db, receiver):
    backlog(db, 1)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url.replace("http://", "https://"))
    result = run_cli(db, "ship", "--once", "--max-time", "300", env=env, timeout=60)
    assert result.returncode == 2  # an operator must fix the endpoint
    assert "plain http" in result.stderr.splitlines()[-1]


def test_ship_once_ends_at_once_when_the_host_name_does_not_resolve(db):
    backlog(db, 1)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT="https://no-such-host.invalid")
    result = run_cli(db, "ship", "--once", "--max-time", "300", env=env, timeout=60)
    assert result.returncode == 1
    assert "no-such-host.invalid" in result.stderr.splitlines()[-1]
    assert "resolve" in result.stderr.splitlines()[-1]


def on_a_terminal(args, env, timeout=60):
    """Run `spool ARGS` with stderr on a pseudo-terminal; return everything it wrote there."""
    import os
    import pty
    import subprocess
    import sys

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "spool", *args], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def test_ship_once_and_import_show_progress_on_a_terminal_and_nothing_when_not(db, tmp_path, receiver):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(f'{{"stat":"s{i}","count":1,"t":{T0}}}\n' for i in range(30_000)))
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    status, shown = on_a_terminal(["import", str(big)], env)
    assert status == 0 and "importing" in shown and "100%" in shown
    status, shown = on_a_terminal(["ship", "--once"], env)
    assert status == 0 and "shipping" in shown and "30000/30000" in shown
    piped = run_cli(db, "import", str(big), env=env)
    assert "importing" not in piped.stderr and piped.stderr == "imported 30,000 records\n"


def test_a_batch_the_receiver_took_only_part_of_is_dead_with_the_answer_and_never_resent(db, receiver):
    backlog(db, 100)
    receiver.fail_next(1, status=200, body='{"status":200,"msg":"ok","multiple":1}')
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "ship", "--once", "--batch-size", "100", env=env)
    assert result.returncode == 2, result.stderr  # dead letters: an operator must look
    assert receiver.requests == 1  # not split, not sent again: some of it was counted already
    dead = [json.loads(line) for line in run_cli(db, "dead", "list", "--json").stdout.splitlines()]
    assert len(dead) == 100 and "took 1 of 100" in dead[0]["reason"]
