"""Backlog operations: bounds, disk full, corrupt spools, pacing, replay, export and import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spool import Spool
from spool.errors import SpoolCorrupt, SpoolFull, StoreError
from spool.records import make_record
from spool.store import Store

from .helpers import T0, TEST_EZKEY, UNPACED, assert_counts_true, cli_env, damage_spool, jsonl, run_cli


def records(n, start=0, stat="s"):
    return [{"stat": f"{stat}{i}", "count": 1, "t": T0 + i} for i in range(start, start + n)]


def test_drop_oldest_keeps_the_newest_records_and_counts_exactly_what_it_dropped(db):
    with Spool(db, max_pending=100) as sp:
        sp.add_many(records(80))
        sp.add_many(records(50, start=80))
        sp.count("single", 1, t=T0 + 1000)
        kept = [r.stat for _, _, r in sp.store.records()]
        assert len(kept) == 100 and kept[-1] == "single" and "s31" in kept and "s30" not in kept
        assert sp.store.counters() == {"dropped_oldest": 31}
        status = sp.status()  # said as something that happened, not as a current problem
        assert "31 dropped (oldest first)" in " ".join(status["notes"])
        assert not any("dropped" in problem for problem in status["problems"])


def test_reject_new_refuses_the_whole_append_and_counts_its_records(db):
    with Spool(db, max_pending=100, when_full="reject_new") as sp:
        sp.add_many(records(90))
        with pytest.raises(SpoolFull, match="spool full: 90 records waiting, the limit is 100; 20 new records"):
            sp.add_many(records(20, start=90))
        assert sp.store.counts()["pending"] == 90  # nothing of the refused append
        sp.add_many(records(10, start=90))  # exactly up to the bound is fine
        with pytest.raises(SpoolFull):
            sp.count("one more", 1, t=T0)
        assert sp.store.counters() == {"refused_full": 21}  # records, as the other drop counters count


def test_a_file_a_full_spool_refuses_stays_where_it_was_and_the_error_counts_what_waits(db, tmp_path):
    config = tmp_path / "bounded.toml"
    config.write_text(UNPACED + '[spool]\nmax_pending = 5\nwhen_full = "reject_new"\n')
    with Spool(db) as sp:
        sp.add_many(records(3))
    folder = tmp_path / "drop"
    folder.mkdir()
    dropped = folder / "six.jsonl"
    dropped.write_text(jsonl(*(f"f{i}" for i in range(6))))
    result = run_cli(db, "ingest", str(dropped), env={**cli_env(db), "SPOOL_CONFIG": str(config)})
    assert result.returncode == 1
    assert "spool full: 3 records waiting, the limit is 5; 6 new records refused" in result.stderr
    assert [p.name for p in folder.iterdir()] == ["six.jsonl"]  # not in .done/ with 0 records: taken later
    with Store(db) as store:
        assert store.counts()["pending"] == 3 and store.file_marks() == []


def test_a_refusal_counts_what_waited_before_even_when_some_new_records_are_held(db, tmp_path):
    """Records stamped while the clock is wrong are held, not pending: they are no part of what waited."""
    from spool.watch import Ingestor

    dropped = tmp_path / "mixed.jsonl"
    dropped.write_text(jsonl(*(f"f{i}" for i in range(5))) + '{"stat": "undated", "count": 1}\n')
    with Spool(db, max_pending=4, when_full="reject_new") as sp:
        sp.add_many(records(2))
        with pytest.raises(SpoolFull, match="spool full: 2 records waiting, the limit is 4; 6 new records refused"):
            Ingestor(sp.store, clock=lambda: 86_400.0).ingest(dropped)
        assert dropped.exists()
        rows = [make_record(stat=f"g{i}", count=1, t=T0) for i in range(5)] + [
            make_record(stat="undated", count=1, clock_now=0)]
        with pytest.raises(SpoolFull, match="spool full: 2 records waiting, the limit is 4; 6 new records refused"):
            sp.store.append(rows, chunk=2)  # a large append, staged: the same count
        assert sp.store.counts()["pending"] == 2


def test_records_in_flight_are_never_dropped(db):
    with Spool(db, max_pending=10) as sp:
        sp.add_many(records(10))
        lease = sp.store.lease(10, now=T0, keyed_only=False)
        # Everything older is in flight: drop_oldest would have to take the new ones, so they are refused whole
        # (an append is never reported taken and dropped at once).
        with pytest.raises(SpoolFull, match="only records in flight are older than these 5"):
            sp.add_many(records(5, start=10))
        counts = sp.store.counts()
        assert counts["inflight"] == 10 and counts["pending"] == 0
        assert sp.store.counters() == {"refused_full": 5}
        sp.store.end_lease(lease.id)


def test_a_byte_bound_prunes_sent_records_first_then_drops_oldest(db):
    with Spool(db, max_spool_bytes=400_000) as sp:
        sp.add_many(records(3000, stat="old"))
        lease = sp.store.lease(3000, now=T0, keyed_only=False)
        sp.store.ack([i.id for i in lease.items], now=T0, lease=lease.id)
        for start in range(0, 30_000, 3000):
            sp.add_many(records(3000, start=start, stat="new"))
        counts = sp.store.counts()
        assert counts["sent"] == 0  # delivered records gave way first
        used = sp.store._used_bytes(sp.store.conn)
        assert used <= 400_000
        assert sp.store.counters()["dropped_oldest"] == 30_000 - counts["pending"]


def test_records_older_than_max_age_are_not_shipped_and_are_dropped_counted(db):
    with Spool(db, max_age=3600) as sp:
        sp.add_many([*records(3), {"stat": "fresh", "count": 1, "t": T0 + 10_000}])
        assert sp.store.drop_expired(now=T0 + 10_000) == 3  # the front of the queue, up to the first fresh one
        assert sp.store.counters() == {"dropped_age": 3}
        lease = sp.store.lease(10, now=T0 + 10_000, keyed_only=False)
        assert [i.record.stat for i in lease.items] == ["fresh"]
        assert_counts_true(sp.store)


def test_a_lease_drops_the_records_past_max_age_it_walks_past_and_ships_the_rest(db):
    """Records appended late with old times (an import) are not at the front of the queue: housekeeping stops at
    the first fresh record, and the lease that reaches them drops them, counted, instead of shipping them."""
    with Spool(db, max_age=3600) as sp:
        sp.add_many([{"stat": "fresh 1", "count": 1, "t": T0 + 10_000}, *records(3),
                     {"stat": "fresh 2", "count": 1, "t": T0 + 10_000}])
        assert sp.store.drop_expired(now=T0 + 10_000) == 0
        lease = sp.store.lease(10, now=T0 + 10_000, keyed_only=False)
        assert [i.record.stat for i in lease.items] == ["fresh 1", "fresh 2"]
        assert sp.store.counters() == {"dropped_age": 3}
        assert sp.store.counts()["inflight"] == 2 and sp.store.counts()["pending"] == 0
        assert_counts_true(sp.store)


def test_suspect_records_past_max_age_are_dropped_counted_not_left_pending_for_ever(db):
    """Records refused together and split apart (suspects) are leased only while within max_age: once past it,
    housekeeping drops them, counted, as it drops queued ones."""
    with Spool(db, max_age=3600) as sp:
        sp.add_many(records(4))
        lease = sp.store.lease(10, now=T0, keyed_only=False)
        ids = [item.id for item in lease.items]
        sp.store.split(lease.id, [ids[:2], ids[2:]], end=True)
        assert sp.store.suspects() == 4
        assert sp.store.lease_suspects(now=T0 + 10_000, keyed_only=False) is None  # too old to ship
        assert sp.store.drop_expired(now=T0 + 10_000) == 4
        assert sp.store.suspects() == 0 and sp.store.counts()["pending"] == 0
        assert sp.store.counters() == {"dropped_age": 4}
        assert_counts_true(sp.store)


def test_expiry_spares_records_in_flight_so_a_delivery_is_acknowledged_not_counted_as_dropped(db):
    with Spool(db, max_age=3600) as sp:
        sp.add_many(records(3))
        lease = sp.store.lease(10, now=T0 + 100, keyed_only=False)  # leased while fresh, on their way
        assert sp.store.drop_expired(now=T0 + 10_000) == 0
        assert sp.store.ack([item.id for item in lease.items], now=T0 + 10_000, lease=lease.id) == 3
        assert sp.store.counts()["sent"] == 3 and sp.store.counters() == {}


def test_ship_once_from_cron_drops_and_counts_records_older_than_max_age(db, receiver):
    # Only the agent's housekeeping dropped them: `ship --once` skipped them, exited 0, and they stayed pending for
    # ever, uncounted. Every drain drops them now, before it leases. T0 is years ago: no waiting for time to pass.
    env = cli_env(db, SPOOL_SPOOL_MAX_AGE="1d", SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    lines = jsonl("old 1", "old 2", "old 3") + '{"stat": "fresh", "count": 1}\n'  # fresh: stamped now
    assert run_cli(db, "import", "-", input=lines.encode(), env=env).returncode == 0
    shipped = run_cli(db, "ship", "--once", env=env)
    assert shipped.returncode == 0, shipped.stderr
    assert [a["stat"] for a in receiver.accepted] == ["fresh"]
    assert "dropped 3 pending records older than max_age" in shipped.stderr, shipped.stderr
    assert "shipped 1, dead 0, dropped 3 older than max_age" in shipped.stderr, shipped.stderr
    status = json.loads(run_cli(db, "status", "--json", env=env).stdout)
    assert (status["pending"], status["sent"], status["counters"]) == (0, 1, {"dropped_age": 3})
    assert "3 dropped because their t was older than max_age" in status["notes"]

def test_a_corrupt_spool_is_moved_aside_and_a_fresh_one_started(db):
    with Spool(db) as sp:
        sp.add_many(records(10))
    with open(db, "r+b") as f:  # wreck the schema page
        f.seek(100)
        f.write(os.urandom(3000))
    with pytest.raises(StoreError, match="not a usable spool database"):
        Store(db)  # producers are told plainly
    with Store(db, quarantine=True) as store:  # the agent moves it aside and goes on
        assert store.counts()["pending"] == 0
        assert store.counters() == {"corrupt_quarantined": 1}
    aside = [p.name for p in db.parent.iterdir() if ".corrupt-" in p.name]
    assert aside and aside[0].startswith("spool.db.corrupt-")


@pytest.mark.parametrize("where", ["header", "records", "meta", "lease_runs"])
@pytest.mark.parametrize("command", [["add", "new", "--count", "1"], ["import", "-"], ["ingest", "drop.jsonl"]])
def test_appending_to_a_damaged_spool_is_refused_naming_the_next_step_and_writes_nothing(db, tmp_path, where,
                                                                                        command):
    # `spool add` exited 0 into a spool whose bookkeeping pages were damaged (status said malformed); the next
    # `spool run` moved the file aside, new record included, so it was never shipped.
    assert run_cli(db, "import", "-", input=jsonl("a", "b").encode()).returncode == 0
    damage_spool(db, where)
    before = db.read_bytes()
    (tmp_path / "drop.jsonl").write_text(jsonl("new"))
    result = run_cli(db, *[str(tmp_path / a) if a.endswith(".jsonl") else a for a in command],
                     input=jsonl("new").encode())
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spool: error: "), result.stderr
    assert f"spool {db} is not a usable spool database" in lines[0]
    assert "`spool run`, which moves it aside" in lines[0] and "or move spool.db" in lines[0]  # what to do
    wal = db.with_name(f"{db.name}-wal")
    assert db.read_bytes() == before and (not wal.exists() or wal.stat().st_size == 0)  # nothing written
    assert (tmp_path / "drop.jsonl").exists()  # a drop file stays where it was: it was not taken


@pytest.mark.parametrize("where", ["meta", "records"])
def test_the_python_api_refuses_a_damaged_spool_with_spool_corrupt(db, where):
    # Damage in the bookkeeping tables is found when the spool opens; in the records, by the append's own statements.
    with Spool(db) as sp:
        sp.add_many(records(3))
    damage_spool(db, where)
    with pytest.raises(SpoolCorrupt, match="`spool run`, which moves it aside"), Spool(db) as sp:
        sp.count("new", 1)

def test_a_file_that_is_not_a_database_is_quarantined_too(db):
    db.write_bytes(b"garbage" * 1000)
    with Store(db, quarantine=True) as store:
        store.append([make_record(stat="s", count=1, t=T0)])
        assert store.counts()["pending"] == 1


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", f"spool-test-{uuid.uuid4().hex[:8]}",
                             str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_fails_the_append_clearly_keeps_what_was_committed_and_recovers(small_disk):
    db = small_disk / "spool.db"
    ballast = small_disk / "ballast"
    with Spool(db) as sp:
        sp.add_many(records(200))
        with open(ballast, "wb", buffering=0) as f:  # fill what is left of the disk
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        with pytest.raises(StoreError, match=r"spool full: .* no space left"):
            for start in range(200, 100_000, 500):
                sp.add_many(records(500, start=start))
        assert sp.store.integrity_ok()
        kept = sp.store.counts()["pending"]
        assert kept >= 200
        ballast.unlink()  # space returns: appends work again, no restart
        sp.add_many(records(10, start=500_000))
        assert sp.store.counts()["pending"] == kept + 10


def test_status_json_reports_the_counters(db, tmp_path):
    config = tmp_path / "spool.toml"
    config.write_text("[spool]\nmax_pending = 5\n")
    for i in range(7):
        assert run_cli(db, "--config", str(config), "add", f"s{i}", "--count", "1", "--t", str(T0 + i)).returncode == 0
    status = json.loads(run_cli(db, "--config", str(config), "status", "--json").stdout)
    assert status["pending"] == 5 and status["counters"] == {"dropped_oldest": 2}


def test_fixed_pacing_keeps_the_drain_to_max_requests_per_second(db, receiver):
    from spool.ship import Shipper

    from .helpers import make_config
    from .test_ship import SleepClock

    with Spool(db) as sp:
        sp.add_many(records(1000))
    clock = SleepClock()
    config = make_config(db, receiver, batch_size=100, max_requests_per_second=4, pacing="fixed")
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock.monotonic) as shipper:
        started = clock.monotonic()
        assert shipper.drain().done
        elapsed = clock.monotonic() - started
    assert len(receiver.batches) == 10
    assert elapsed >= 9 / 4  # ten requests, a quarter second apart at least
    assert all(0 < wait <= 0.25 for wait in clock.waits)


def test_run_waits_a_jittered_delay_before_draining_a_backlog(db, receiver):
    import threading

    from spool.ship import Shipper

    from .helpers import make_config

    with Spool(db) as sp:
        sp.add_many(records(5))
    waits = []
    config = make_config(db, receiver, reconnect_jitter=30)
    shutdown = threading.Event()
    with Store(db) as store, Shipper(store, config, shutdown=shutdown, sleep=waits.append) as shipper:
        shipper.rng.seed(7)
        thread = threading.Thread(target=shipper.run)
        thread.start()
        deadline = 200
        while len(receiver.accepted) < 5 and deadline:
            shutdown.wait(0.05)
            deadline -= 1
        shipper.stop()
        thread.join(10)
    assert 0 < waits[0] <= 30 and len(receiver.accepted) == 5


def test_export_then_import_round_trips_every_record_unchanged(db, tmp_path):
    originals = [make_record(stat="plain", count=3, t=T0), make_record(stat="ünï~a,b", value=0.25, t=T0 + 1),
                 make_record(stat="own key", count=1.5, t=T0 + 2, ezkey="account-2"),
                 make_record(key="K", ukey="U", value=-7, t=T0 + 3)]
    with Spool(db) as sp:
        sp.append_records(originals)
    out = tmp_path / "backlog.jsonl"
    result = run_cli(db, "export", str(out))
    assert result.returncode == 0 and "exported 4 records" in result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"  # it holds keys
    other = tmp_path / "other.db"
    assert run_cli(other, "import", str(out)).returncode == 0
    with Store(other) as store:
        assert [r for _, _, r in store.records()] == originals


def test_export_remove_moves_backlog_without_leaving_it_to_be_sent_twice(db, tmp_path):
    with Spool(db) as sp:
        sp.add_many(records(20))
    out = tmp_path / "moved.jsonl"
    assert "exported 20 records and removed them" in run_cli(db, "export", "--remove", str(out)).stderr
    assert len(out.read_text().splitlines()) == 20
    with Store(db) as store:
        assert store.counts()["pending"] == 0


def test_export_selects_by_state_and_time(db):
    with Spool(db) as sp:
        sp.add_many(records(10))
    result = run_cli(db, "export", "--since", str(T0 + 3), "--until", "2023-11-14T22:13:27", "-")
    assert [json.loads(line)["t"] for line in result.stdout.splitlines()] == [T0 + 3, T0 + 4, T0 + 5, T0 + 6, T0 + 7]
    assert run_cli(db, "export", "--state", "dead").stdout == ""


def test_replay_queues_copies_of_retained_sent_records_and_says_they_count_again(db):
    with Spool(db) as sp:
        sp.add_many(records(10, stat="api ") + records(5, start=10, stat="web "))
        lease = sp.store.lease(100, now=T0, keyed_only=False)
        sp.store.ack([i.id for i in lease.items], now=T0, lease=lease.id)
    dry = run_cli(db, "replay", "--since", str(T0 + 5), "--stat", "api *", "--dry-run")
    assert "would queue 5 sent records" in dry.stderr and "count them again" in dry.stderr
    with Store(db) as store:
        assert store.counts()["pending"] == 0
    assert "queued 5 sent records" in run_cli(db, "replay", "--since", str(T0 + 5), "--stat", "api *").stderr
    with Store(db) as store:
        assert sorted(r.stat for _, _, r in store.records(0)) == [f"api {i}" for i in range(5, 10)]
        assert store.counts()["sent"] == 15


def test_a_bad_time_is_a_one_line_usage_error(db):
    result = run_cli(db, "replay", "--since", "last tuesday")
    assert result.returncode == 2 and "neither unix seconds nor an ISO date" in result.stderr


def test_doctor_passes_a_sound_setup_and_names_each_check(db, receiver, tmp_path):
    key = tmp_path / "ezkey"
    key.write_text("k")
    key.chmod(0o600)
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    env = cli_env(db, SPOOL_EZKEY_FILE=str(key), SPOOL_ENDPOINT=receiver.url)
    result = run_cli(db, "doctor", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert names == ["ok   config", "ok   ezkey", "ok   endpoint", "ok   clock", "ok   disk", "ok   spool",
                     "ok   producers"]
    assert "k\n" not in result.stdout


def test_doctor_fails_with_a_fix_for_each_problem(db, tmp_path):
    config = tmp_path / "spool.toml"
    config.write_text(f'[ship]\nendpoint = "http://127.0.0.1:9"\n[[watch]]\npath = "{tmp_path / "gone"}"\n'
                      '[relay]\nenabled = true\nlisten = "127.0.0.1:1"\n')
    result = run_cli(db, "--config", str(config), "doctor")
    assert result.returncode == 1
    failed = {line.split(":")[0][5:] for line in result.stdout.splitlines() if line.startswith("FAIL")}
    assert {"ezkey", "endpoint", f"watch {tmp_path / 'gone'}"} <= failed
    assert all("-- fix:" in line for line in result.stdout.splitlines() if line.startswith("FAIL"))
    assert "spool: error: 3 checks failed: ezkey, endpoint, watch" in result.stderr


def test_doctor_catches_a_clock_from_before_the_release(db):
    from spool.config import Config
    from spool.doctor import checks

    config = Config().replace(**{"spool.path": db})
    verdicts = {v.name: v for v in checks(lambda: config, fallback=lambda: config, clock=lambda: 86_400.0,
                                          probe=lambda url, timeout: "HTTP 200")}
    assert not verdicts["clock"].ok and "1970-01-02" in verdicts["clock"].detail and "NTP" in verdicts["clock"].fix


def test_doctor_reports_a_config_error_as_a_failed_check(db, tmp_path):
    config = tmp_path / "spool.toml"
    config.write_text("[ship]\nbatchsize = 1\n")
    result = run_cli(db, "--config", str(config), "doctor")
    assert result.returncode == 1 and result.stdout.startswith("FAIL config:")


def bucket_sums(store, bucket):
    sums, values = {}, []
    for _, state, r in store.records():
        if r.kind == 0:
            k = (r.stat, r.key, r.ezkey, r.t // bucket * bucket, state)
            sums[k] = sums.get(k, 0) + r.number
        else:
            values.append((r.stat, r.number, r.t, state))
    return sums, sorted(values)


def test_compaction_merges_counts_per_stat_key_and_bucket_exactly_and_leaves_the_rest(db):
    with Spool(db) as sp:
        sp.add_many([{"stat": f"c{i % 3}", "count": i, "t": T0 + i} for i in range(600)])
        sp.add_many([{"stat": "c0", "count": 1, "t": T0 + i, "ezkey": "other"} for i in range(0, 600, 7)])
        sp.add_many([{"stat": "v", "value": i / 7, "t": T0 + i} for i in range(100)])
        lease = sp.store.lease(50, now=T0, keyed_only=False)  # in flight: must not be touched
        leased = sorted(i.id for i in lease.items)
        before = bucket_sums(sp.store, 60)
        total_before = sum(sp.store.counts().values())
        saved = sp.store.compact_counts(bucket=60, rows=7)
        after = bucket_sums(sp.store, 60)
        assert after == before  # every (stat, key, bucket) sum unchanged; values untouched
        assert saved == total_before - sum(sp.store.counts().values()) > 0
        assert sp.store.counters()["compacted"] == saved
        assert sorted(i for i, _, _ in sp.store.records() if i in set(leased)) == leased
        assert sp.store.compact_counts(bucket=60) == 0  # nothing left to merge
        sp.store.end_lease(lease.id)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([None, "k2"]), st.booleans(),
                          st.integers(min_value=-5, max_value=10**6), st.integers(min_value=0, max_value=600)),
                max_size=60),
       st.sampled_from([1, 10, 60, 3600]))
def test_compaction_preserves_every_bucket_sum(tmp_path_factory, items, bucket):
    db = tmp_path_factory.mktemp("compact") / "spool.db"
    with Spool(db) as sp:
        sp.append_records([make_record(stat=s, ezkey=k, t=T0 + dt, **({"count": n} if is_count else {"value": n}))
                           for s, k, is_count, n, dt in items])
        before = bucket_sums(sp.store, bucket)
        sp.store.compact_counts(bucket=bucket, rows=3)
        assert bucket_sums(sp.store, bucket) == before


def test_records_stamped_while_the_clock_is_wrong_are_held_then_restamped_within_the_boot(db):
    from spool.clock import boot_clock, boot_id
    from spool.records import HELD_T, stamp

    assert stamp(86_400.0) == HELD_T  # a box that booted in 1970
    with Spool(db) as sp:
        sp.append(make_record(stat="early", count=1, clock_now=stamp(86_400.0)))
        sp.count("explicit", 1, t=T0)  # an explicit t is never held
        status = sp.status()
        assert (status["held"], status["pending"]) == (1, 1)
        assert "held" in " ".join(status["problems"])
        assert sp.store.lease(10, now=T0, keyed_only=False).items[0].record.stat == "explicit"  # held never ships
        mono = boot_clock()
        restamped, lost = sp.store.restamp_held(wall=1_800_000_000.0, mono=mono + 30, boot=boot_id(), floor=T0)
        assert (restamped, lost) == (1, 0)
        [early] = [r for _, _, r in sp.store.records() if r.stat == "early"]
        assert abs(early.t - (1_800_000_000 - 30)) <= 1  # the real time, from the monotonic clock
        assert sp.store.counters()["restamped"] == 1


def test_held_records_from_an_earlier_boot_become_dead_with_the_reason(db):
    from spool.records import stamp

    with Spool(db) as sp:
        sp.append(make_record(stat="early", count=1, clock_now=stamp(86_400.0)))
        assert sp.store.restamp_held(wall=1_800_000_000.0, mono=5.0, boot="another-boot", floor=T0) == (0, 1)
        [dead] = sp.dead_letters()
        assert "earlier boot" in dead.reason


def test_the_shipper_restamps_held_records_once_its_clock_is_sane(db, receiver):
    from spool.records import stamp
    from spool.ship import Shipper

    from .helpers import make_config

    with Spool(db) as sp:
        sp.append(make_record(stat="early", count=1, clock_now=stamp(86_400.0)))
    wall = [86_500.0]
    with Store(db) as store, Shipper(store, make_config(db, receiver), clock=lambda: wall[0]) as shipper:
        shipper.housekeeping()
        assert store.counts()["held"] == 1  # the clock is still wrong: nothing to do
        wall[0] = 1_800_000_000.0
        shipper._last_housekeeping = float("-inf")
        shipper.housekeeping()
        assert shipper.drain().done
    assert [a["stat"] for a in receiver.accepted] == ["early"] and receiver.accepted[0]["t"] > 1_790_000_000


def test_a_version_1_spool_is_migrated_keeping_its_records(db):
    import sqlite3

    from spool.store import SCHEMA_VERSION, _create_schema

    conn = sqlite3.connect(db, isolation_level=None)
    _create_schema(conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO records (stat, kind, number, t) VALUES ('old', 0, 4, ?)", (T0,))
    conn.close()
    with Store(db) as store:
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert [r for _, _, r in store.records()] == [make_record(stat="old", count=4, t=T0)]
        store.append([make_record(stat="new", count=1, t=T0)])  # the new columns and tables are there
        assert store.lease(5, now=T0, keyed_only=False) is not None


def test_compaction_merges_the_run_that_fits_even_when_it_is_only_a_pair(db):
    # The third counter would overflow the sum of the first two: those two still become one record.
    with Spool(db, max_age=3600) as sp:
        sp.add_many([{"stat": "ints", "count": 2**62, "t": T0}, {"stat": "ints", "count": 2**62 - 1, "t": T0},
                     {"stat": "ints", "count": 1, "t": T0}])
        assert sp.store.compact_counts(bucket=60) == 1
        assert sorted(r.number for _, _, r in sp.store.records()) == [1, 2**63 - 1]


def test_compaction_never_merges_past_what_validation_accepts_and_housekeeping_goes_on(db, receiver):
    from spool.ship import Shipper

    from .helpers import make_config

    big_int, big_float = 2**62, 1e308
    with Spool(db, max_age=3600) as sp:
        sp.add_many([{"stat": "ints", "count": big_int, "t": T0}, {"stat": "ints", "count": big_int, "t": T0},
                     {"stat": "floats", "count": big_float, "t": T0}, {"stat": "floats", "count": big_float, "t": T0},
                     {"stat": "small", "count": 1, "t": T0}, {"stat": "small", "count": 2, "t": T0}])
        assert sp.store.compact_counts(bucket=60) == 1  # only the small pair fits in one record
        numbers = sorted((r.stat, r.number) for _, _, r in sp.store.records())
        assert numbers == [("floats", big_float), ("floats", big_float), ("ints", big_int), ("ints", big_int),
                           ("small", 3)]
    config = make_config(db, receiver, compact_counts=60, max_age=3600)
    with Store.for_config(config) as store, Shipper(store, config, clock=lambda: T0 + 7200.0) as shipper:
        shipper.housekeeping()  # compaction runs, then max_age drops the (now too old) records: it got there
        assert store.counts()["pending"] == 0 and store.counters()["dropped_age"] == 5


def test_a_batch_retried_past_max_age_sends_only_its_records_still_young_enough(db, receiver):
    # A record leased while young was sent on every retry, however old it became: delivered at 7.6 s with a
    # max_age of 4 s, counted sent. Every (re)send takes out what passed max_age meanwhile, counted as dropped.
    from spool.ship import Shipper

    from .helpers import make_config

    now = [float(T0)]

    def sleep(seconds):  # the shipper's clock and its monotonic clock move only when it waits
        now[0] += seconds

    with Spool(db) as sp:
        sp.add_many([{"stat": "aging", "count": 1, "t": T0 - 1}, {"stat": "young", "count": 1, "t": T0 + 5}])
    receiver.fail_next(2, retry_after="3")
    config = make_config(db, receiver, max_age=4)
    with Store.for_config(config) as store, Shipper(store, config, sleep=sleep, clock=lambda: now[0],
                                                    monotonic=lambda: now[0]) as shipper:
        result = shipper.drain(max_time=3600)
        assert result.done and shipper.stats.expired == 1
        assert store.counts()["pending"] == store.counts()["inflight"] == 0
        assert store.counters() == {"dropped_age": 1}
    assert [a["stat"] for a in receiver.accepted] == ["young"]
    assert receiver.requests == 3
