"""Power cuts at random instants under load: what spool said was done survives, and nothing is taken twice.

The spool, a drop directory and the export files live on lazyfs, which loses every write not fsynced when the
power goes (see README.md). Every kind of producer runs at once against `spool run` (shipping to the test
receiver, which is not on the mount: what it accepted is delivered for good), with an `export --remove` at
some point; at a random instant the power goes. Every process is killed, the disk is mounted again, and the
next stretch of load begins with the agent restarted (so cuts also land in its recovery). After the last cut
the agent drains, and:

* every record a producer was told was done is delivered, or in the spool, or in an export file;
* every record delivered is in the spool as sent (retention is 7 days: none is pruned), or was moved out by
  an export after a cut lost its acknowledgement (then it counts as resent);
* no record is in the spool twice (a dropped file is taken once, an import whole or not at all);
* an export that exited 0 holds exactly what it said it moved, none of which is still in the spool;
* every file in `.done/` was taken in, and none is left waiting in the drop directory;
* the receiver got a record again only across a cut, and no cut made spool send more again than the stated
  bound, max_in_flight x batch_size records (README, "Delivery guarantees");
* SQLite's integrity check passes after every cut, and the kept counts equal a real count of the records.

The other tests here cut the power at chosen moments: synchronous = "normal", an export between two chunks,
a quarantined spool, a file taken but not yet moved, a spool in a directory spool made. `SPOOL_LONG=1` runs
200 cuts under load instead of 20; `pytest -s` prints the figures (docs/powercut.md has a run's).
"""

from __future__ import annotations

import bisect
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spool import Spool
from spool.store import State, Store

from ..helpers import T0, assert_counts_true
from .load import (
    Agent,
    Layout,
    Phase,
    Processes,
    Tally,
    api_child,
    clean_env,
    spool_args,
    spool_env,
    wait_until,
    write_config,
)
from .mount import LazyMount, fsync_dir, power_back

LONG = bool(os.environ.get("SPOOL_LONG"))
TRIALS, CUTS = (20, 10) if LONG else (2, 10)
BATCH_SIZE, MAX_IN_FLIGHT = 20, 4
RESENT_PER_CUT = BATCH_SIZE * MAX_IN_FLIGHT  # the README's bound for one power cut


def prepare(layout: Layout) -> None:
    """Make the directories spool is given, durably: the operator's (or systemd's) part, not spool's."""
    for folder in (layout.db.parent, layout.drop, layout.exports):
        folder.mkdir()
    fsync_dir(layout.mount)
    layout.scratch.mkdir()


def integrity_ok(db: Path) -> bool:
    """Return whether SQLite's integrity check passes; assert that the kept counts are true (a cut loses a
    transaction whole, its change to the counts with it)."""
    if not db.exists():  # the power went before the first process created it
        return True
    with Store(db) as store:
        sound = store.integrity_ok()
    if sound:
        assert_counts_true(db)
    return sound


def quiet(receiver: Any) -> int:
    """Wait until the receiver answers nothing (requests of killed processes are done); return what it took."""
    wait_until(lambda: receiver.in_flight == 0, 30, "the receiver to finish the requests under way")
    return len(receiver.accepted)


def drain(layout: Layout, timeout: float = 60) -> None:
    """Run the agent until nothing is pending, in flight, or waiting in the drop directory; it must exit 0."""
    agent = Agent(layout, Processes())
    try:
        wait_until(agent.relay_up.is_set, 30, "the agent to start")
        with Store(layout.db) as store:
            def settled() -> bool:
                # The directory first: a file gone from it had its records committed before it was moved.
                waiting = [name for name in os.listdir(layout.drop) if not name.startswith(".")]
                counts = store.counts()
                return counts["pending"] + counts["inflight"] + counts["held"] == 0 and not waiting
            wait_until(settled, timeout, "the agent to drain")
    finally:
        agent.stop()


@dataclass
class Figures:
    cuts: int
    done: Counter[str]  # records producers were told were done, by producer: each one is checked
    delivered: int
    exported: int
    in_export_and_spool: int  # the last chunk of an export cut short
    resent: int  # extra copies: sent again, or moved out by an export after being delivered
    most_resent_by_a_cut: int
    lost: int = 0


def resends_by_cut(accepted: list[dict[str, Any]], marks: list[int]) -> dict[int, int]:
    """Count the copies sent again, by the cut that lost the acknowledgement of the copy before them.

    `marks[k]` is how many stats the receiver had taken when the agent started again after cut k: a copy
    taken before it and after the mark before (phase k) was under way at cut k, and only a cut sends a
    copy again. One taken after the last cut, in the final drain, must never be sent again.
    """
    previous: dict[str, int] = {}
    by_cut: dict[int, int] = defaultdict(int)
    for index, item in enumerate(accepted):
        stat = item["stat"]
        if stat in previous:
            cut = bisect.bisect_right(marks, previous[stat])  # the phase of the copy before, ended by that cut
            assert cut < len(marks), f"{stat!r} was sent again with no power cut after the copy before"
            by_cut[cut] += 1
        previous[stat] = index
    return by_cut


def check(layout: Layout, tally: Tally, accepted: list[dict[str, Any]], marks: list[int]) -> Figures:
    """Check every promise against the disk after the last cut and the drain; return the figures."""
    with Store(layout.db) as store:
        assert store.integrity_ok()
        counts = store.counts()
        rows = [(state, record.stat) for _, state, record in store.records()]
    assert_counts_true(layout.db)
    assert counts["pending"] == counts["inflight"] == counts["held"] == counts["dead"] == 0, counts
    in_spool = Counter(stat for _, stat in rows)
    sent = {stat for state, stat in rows if state == State.SENT}
    delivered = Counter(item["stat"] for item in accepted)
    exports = {path: Counter(json.loads(line)["stat"] for line in path.read_text().splitlines())
               for path in layout.exports.iterdir()}
    exported = sum(exports.values(), Counter())

    lost = sorted(stat for stat in tally.done if stat not in delivered and stat not in in_spool
                  and stat not in exported)
    assert not lost, f"{len(lost)} records told done are nowhere, e.g. {lost[:5]}"
    twice = sorted(stat for stat, n in in_spool.items() if n > 1)
    assert not twice, f"{len(twice)} records are in the spool twice, e.g. {twice[:5]}"
    # A batch delivered just before a cut, its acknowledgement lost, is pending again afterwards: it is sent
    # again, or moved out by an export (and sent again when the file is imported). Both count as resent.
    unsent = sorted(stat for stat in delivered if stat not in sent and stat not in exported)
    assert not unsent, f"{len(unsent)} delivered records are not in the spool as sent, e.g. {unsent[:5]}"
    for path, moved in tally.exports.items():
        holds = exports[path]
        assert sum(holds.values()) == moved, f"{path.name} holds {sum(holds.values())} records, not {moved}"
        assert max(holds.values(), default=1) == 1, f"{path.name} holds a record twice"
        assert not [stat for stat in holds if stat in in_spool], f"{path.name} holds records still in the spool"
    done = layout.drop / ".done"
    for name in os.listdir(done) if done.exists() else []:
        taken = [stat for stat in tally.files[name] if stat in in_spool or stat in exported]
        assert taken == tally.files[name], f".done/{name} was not taken in"
    assert not [name for name in os.listdir(layout.drop) if not name.startswith(".")]

    by_cut = resends_by_cut(accepted, marks)
    for stat in exported:
        if stat in delivered and stat not in in_spool:  # moved out after a cut lost its acknowledgement
            by_cut[bisect.bisect_right(marks, last_copy(accepted, stat))] += 1
    # An export cut short can leave its last chunk both in its file and in the spool (README): not resent by
    # the shipper, but sent again if the file is imported. Only exports that did not finish may do it.
    both = sum(1 for stat in exported if stat in in_spool)
    worst = max(by_cut, key=by_cut.__getitem__, default=0)
    assert by_cut[worst] <= RESENT_PER_CUT, f"cut {worst} had {by_cut[worst]} records sent again"
    resent = sum(by_cut.values())
    return Figures(len(marks), Counter(stat.split()[1] for stat in tally.done), len(delivered),
                   sum(exported.values()), both, resent, max(by_cut.values(), default=0))


def last_copy(accepted: list[dict[str, Any]], stat: str) -> int:
    return max(i for i, item in enumerate(accepted) if item["stat"] == stat)


def report(name: str, figures: Figures) -> None:
    """One line of figures per trial (pytest -s shows them; docs/powercut.md has a run's)."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in sorted(figures.done.items()))
    print(f"\n{name}: {figures.cuts} cuts; {figures.done.total()} records told done ({kinds}), all checked; "
          f"{figures.delivered} delivered, {figures.exported} exported ({figures.in_export_and_spool} of them "
          f"also left in the spool by an export cut short), {figures.lost} lost; {figures.resent} resent, at most "
          f"{figures.most_resent_by_a_cut} by one cut (bound {RESENT_PER_CUT} a cut)")


@pytest.mark.parametrize("seed", range(TRIALS))
def test_what_spool_said_was_done_survives_random_power_cuts_under_load(lazyfs, tmp_path, receiver, seed):
    rng = random.Random(seed)
    fs = lazyfs()
    layout = Layout(fs.mountpoint, tmp_path / "spool.toml", tmp_path / "imports")
    prepare(layout)
    write_config(layout, receiver.url, batch_size=BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT)
    receiver.latency = 0.02  # a backlog builds up, for the export to take part of
    tally = Tally()
    marks: list[int] = []
    for cut in range(CUTS):
        phase = Phase(layout, tally, rng, f"c{cut}")
        phase.start()
        time.sleep(rng.uniform(0.3, 2.0))
        device = os.stat(fs.mountpoint).st_dev
        fs.cut()
        phase.end()
        fs = power_back(lazyfs, device)
        assert integrity_ok(layout.db), f"SQLite's integrity check failed after cut {cut}"
        marks.append(quiet(receiver))
    receiver.latency = 0
    drain(layout)
    figures = check(layout, tally, receiver.accepted, marks)
    report(f"seed {seed}", figures)


QUIET_CUTS = 30 if LONG else 6


def test_a_cut_while_a_backlog_drains_with_no_producer_resends_no_more_than_the_bound(lazyfs, tmp_path, receiver):
    """Cuts while `spool ship --once` drains a backlog and nothing else writes to the spool.

    Under load, producers commit with fsync all the time, and each of their syncs makes every commit before it
    durable too, the shipper's included. Here only the shipper's own commits decide what a cut loses: leases
    (committed without waiting for the disk: losing one only returns its records to pending) and acknowledgements
    (committed with synchronous=FULL). What was in flight at a cut, at most max_in_flight x batch_size records,
    may be sent again; nothing acknowledged before may be, and nothing is lost.
    """
    rng = random.Random(5)
    fs = lazyfs()
    layout = Layout(fs.mountpoint, tmp_path / "spool.toml", tmp_path / "imports")
    prepare(layout)
    write_config(layout, receiver.url, batch_size=BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT)
    n = 1000 * QUIET_CUTS  # a cut lets at most 600 through: the backlog outlasts the cuts
    with Spool(layout.db) as sp:
        sp.add_many({"stat": f"q{i}", "count": 1, "t": T0 + i} for i in range(n))
    receiver.latency = 0.002  # the drain lasts through the cuts
    marks: list[int] = []
    for cut in range(QUIET_CUTS):
        processes = Processes()
        processes.spawn(spool_args("ship", "--once"), spool_env(layout))
        start = len(receiver.accepted)
        goal = start + rng.randrange(100, 600)
        wait_until(lambda: len(receiver.accepted) >= goal, 60, "the drain to get going")  # noqa: B023
        device = os.stat(fs.mountpoint).st_dev
        fs.cut()
        processes.kill_all()
        processes.close()
        fs = power_back(lazyfs, device)
        assert integrity_ok(layout.db), f"SQLite's integrity check failed after cut {cut}"
        marks.append(quiet(receiver))
    receiver.latency = 0
    finish = subprocess.run(spool_args("ship", "--once"), env=spool_env(layout), capture_output=True, text=True,
                            timeout=120)
    assert finish.returncode == 0, finish.stderr
    with Store(layout.db) as store:
        assert store.counts()["sent"] == n and store.lease_count() == 0
    delivered = Counter(item["stat"] for item in receiver.accepted)
    assert set(delivered) == {f"q{i}" for i in range(n)}
    by_cut = resends_by_cut(receiver.accepted, marks)
    worst = max(by_cut.values(), default=0)
    assert worst <= RESENT_PER_CUT, f"a cut had {worst} records sent again (bound {RESENT_PER_CUT})"
    print(f"\nquiet drain: {QUIET_CUTS} cuts; {n} records, {len(receiver.accepted)} deliveries; "
          f"{sum(by_cut.values())} resent, at most {worst} by one cut (bound {RESENT_PER_CUT} a cut), 0 lost")


NORMAL_CUTS = 50 if LONG else 8


def appending(db: Path, synchronous: str, prefix: str, seed: int) -> tuple[Processes, list[str], threading.Thread]:
    """Start a process appending through the API; return it, the list of calls that returned, and its reader."""
    processes = Processes()
    child = processes.spawn(api_child(db, synchronous, prefix, seed), dict(os.environ))
    assert child is not None and child.stdout is not None
    returned: list[str] = []

    def read() -> None:
        returned.extend(line.rstrip("\n") for line in child.stdout)  # type: ignore[union-attr]

    reader = threading.Thread(target=read, name="api-reader")
    reader.start()
    return processes, returned, reader


def test_synchronous_normal_loses_only_the_last_commits_at_a_cut_and_never_corrupts(lazyfs, tmp_path):
    """With synchronous = "normal" the WAL reaches the disk at checkpoints only: a cut loses what came after.

    One process appends a record per call (commit order = the order it prints them); at a random moment a
    checkpoint runs, then the power goes. What survives must be exactly the first records, at least all of
    those committed before the checkpoint, and everything that survived an earlier cut; the integrity
    check must pass every time.
    """
    rng = random.Random(7)
    fs = lazyfs()
    db = fs.mountpoint / "state" / "spool.db"
    db.parent.mkdir()
    fsync_dir(fs.mountpoint)
    kept: set[str] = set()
    lost_some = told = lost = 0
    for cut in range(NORMAL_CUTS):
        processes, returned, reader = appending(db, "normal", f"n{cut} ", rng.randrange(1 << 30))
        wait_until(lambda: len(returned) > 5, 30, "the first appends")  # noqa: B023 (waited for here)
        time.sleep(rng.uniform(0, 0.3))
        before = len(returned)  # these calls returned: their commits are in the WAL
        with Store(db, synchronous="normal") as checkpointing:  # as spool's own connections checkpoint
            done = checkpointing.checkpoint(wait=30)
        floor = before if done is not None and done[0] == done[1] else 0
        time.sleep(rng.uniform(0, 0.3))
        fs.cut()
        processes.kill_all()
        reader.join(timeout=30)
        processes.close()
        fs = lazyfs()
        with Store(db, synchronous="normal") as store:
            assert store.integrity_ok(), f"integrity check failed after cut {cut}"
            stats = {record.stat for _, _, record in store.records()}
        assert_counts_true(db)
        assert kept <= stats, f"cut {cut} lost records that had survived an earlier cut"
        mine = [stat for stat in returned if stat in stats]
        survived = len(mine)
        assert mine == returned[:survived], f"cut {cut} kept records but not all of those before them"
        assert {stat for stat in stats if stat.startswith(f"n{cut} ")} <= {*returned, f"n{cut} {len(returned)}"}
        assert survived >= floor, f"cut {cut} lost records committed before a checkpoint"
        lost_some += survived < len(returned)
        told += len(returned)
        lost += len(returned) - survived
        kept = stats
    assert lost_some, "normal mode never lost a commit at a cut: the cuts did not test it"
    print(f"\nsynchronous = normal: {NORMAL_CUTS} cuts; {told} appends returned, {lost} of them lost (all after "
          f"the last checkpoint, {lost_some} cuts lost some), integrity check passed after every cut")


STAGED_CHILD = """
import sys
from spool.store import Store
db, prefix, t0 = sys.argv[1], sys.argv[2], int(sys.argv[3])
with Store(db) as store:
    for n in range(100_000):
        store.append([(f"{prefix}{n} {i}", None, None, None, 0, 1, t0 + i) for i in range(45)], chunk=10)
        print(f"{prefix}{n}", flush=True)
"""


def test_a_cut_during_large_appends_keeps_each_one_that_returned_whole_and_no_part_of_another(lazyfs):
    """Large appends are staged in chunks whose commits do not wait for the disk; their last one does.

    One process makes appends of 45 records in chunks of 10, printing each once it returned; the power goes at
    a random instant. Every append that returned is there whole; any other is there whole or not at all
    (what a cut left of an unpublished one is hidden, then swept: its owner is gone).
    """
    rng = random.Random(11)
    fs = lazyfs()
    db = fs.mountpoint / "state" / "spool.db"
    db.parent.mkdir()
    fsync_dir(fs.mountpoint)
    cut_a_stage = 0
    for cut in range(NORMAL_CUTS):
        processes = Processes()
        child = processes.spawn([sys.executable, "-c", STAGED_CHILD, str(db), f"c{cut}a", str(T0)], dict(os.environ))
        assert child is not None and child.stdout is not None
        returned: list[str] = []
        reader = threading.Thread(target=lambda out=child.stdout, got=returned: got.extend(
            line.rstrip("\n") for line in out), name="staged-reader")
        reader.start()
        wait_until(lambda: len(returned) > 2, 30, "the first appends")  # noqa: B023 (waited for here)
        time.sleep(rng.uniform(0, 0.3))
        fs.cut()
        processes.kill_all()
        reader.join(timeout=30)
        processes.close()
        fs = lazyfs()
        with Store(db) as store:
            assert store.integrity_ok(), f"integrity check failed after cut {cut}"
            hidden = store.conn.execute("SELECT count(*) FROM stage_spans").fetchone()[0]
            cut_a_stage += hidden > 0
            visible = Counter(record.stat.rsplit(" ", 1)[0] for _, _, record in store.records())
            assert_counts_true(db)  # what a cut left of an unpublished append counts as staged
            store.sweep_stages()
            assert_counts_true(db)
            assert store.conn.execute("SELECT count(*) FROM records").fetchone()[0] == visible.total()
            assert store.conn.execute("SELECT count(*) FROM stages").fetchone()[0] == 0
        assert set(visible.values()) <= {45}, f"cut {cut} left part of an append visible"
        assert {f"{name}" for name in returned} <= set(visible), f"cut {cut} lost an append that had returned"
    print(f"\nlarge appends: {NORMAL_CUTS} cuts, {cut_a_stage} of them in the middle of a staged append")


def test_the_first_append_to_a_spool_in_a_directory_spool_made_survives_a_cut(lazyfs):
    fs = lazyfs()
    db = fs.mountpoint / "state" / "spool" / "spool.db"  # as $XDG_STATE_HOME/spool/spool.db on a first run
    with Spool(db) as sp:
        sp.count("first", 1, t=T0)
    fs.cut()
    fs = lazyfs()
    assert db.exists(), "the spool is gone"
    with Store(db) as store:
        assert [record.stat for _, _, record in store.records()] == ["first"]


def test_a_corrupt_spool_moved_aside_and_the_fresh_one_both_survive_a_cut(lazyfs, tmp_path):
    fs = lazyfs()
    layout = Layout(fs.mountpoint, tmp_path / "spool.toml", tmp_path / "imports")
    prepare(layout)
    junk = b"not a spool\n" * 1000
    with open(layout.db, "wb") as f:
        f.write(junk)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(layout.db.parent)
    write_config(layout, "http://127.0.0.1:9", batch_size=BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT)
    processes = Processes()
    agent = Agent(layout, processes)
    try:
        assert agent.relay_up.wait(30), "".join(agent.lines)
        host, port = agent.relay.removeprefix("http://").rsplit(":", 1)  # type: ignore[union-attr]
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        connection.request("POST", "/ez", f"ezkey=k&stat=after&count=1&t={T0}",
                           {"Content-Type": "application/x-www-form-urlencoded"})
        assert connection.getresponse().status == 204
        connection.close()
        fs.cut()
    finally:
        processes.kill_all()
        agent.reader.join(timeout=30)
        processes.close()
    fs = lazyfs()
    moved = [path for path in layout.db.parent.iterdir() if ".corrupt-" in path.name]
    assert [path.read_bytes() for path in moved] == [junk]
    with Store(layout.db) as store:
        assert [record.stat for _, _, record in store.records()] == ["after"]
        assert store.counters()["corrupt_quarantined"] == 1
    assert_counts_true(layout.db)


def test_an_export_cut_between_chunks_leaves_every_record_in_its_file_or_in_the_spool(lazyfs, tmp_path):
    """`export --remove` moves a chunk at a time (10,000 records): the power going between two must lose none.

    The cut comes right after the first chunk left the spool, while the export writes the next: the file
    must hold that chunk (synced before the chunk was deleted), and every other record must still be in
    the spool, at most the chunk under way being in both.
    """
    n = 25_000
    fs = lazyfs()
    layout = Layout(fs.mountpoint, tmp_path / "spool.toml", tmp_path / "imports")
    prepare(layout)
    write_config(layout, "http://127.0.0.1:9", batch_size=BATCH_SIZE, max_in_flight=MAX_IN_FLIGHT)
    stats = [f"e {i}" for i in range(n)]
    with Spool(layout.db) as sp:
        sp.add_many({"stat": stat, "count": 1, "t": T0} for stat in stats)
    target = layout.exports / "moved.jsonl"
    processes = Processes()
    export = processes.spawn(spool_args("export", "--remove", str(target)), spool_env(layout))
    assert export is not None
    try:
        with Store(layout.db) as store:
            wait_until(lambda: store.counts()["pending"] < n or export.poll() is not None, 60,
                       "the first chunk to leave the spool")
        fs.cut()
        assert export.poll() is None, "the export ended before the cut: it was not cut between chunks"
    finally:
        processes.kill_all()
        processes.close()
    fs = lazyfs()
    with Store(layout.db) as store:
        assert store.integrity_ok()
        left = Counter(record.stat for _, _, record in store.records())
    assert_counts_true(layout.db)
    lines = target.read_text().splitlines() if target.exists() else []  # created before the first chunk
    moved = Counter(json.loads(line)["stat"] for line in lines)
    assert set(moved) | set(left) == set(stats), f"{n - len(set(moved) | set(left))} records are in neither"
    assert max(moved.values()) == 1 and max(left.values(), default=1) == 1
    assert len(moved) >= 10_000, "the chunk that left the spool is not in the file"
    assert len(set(moved) & set(left)) <= 10_000


def durable_job(fs: LazyMount) -> tuple[Path, Path, Path]:
    """A drop directory and a spool's directory on the mount, and job.jsonl (3 records) in the drop directory,
    all durable: (drop directory, spool path, job file)."""
    drop, db = fs.mountpoint / "drop", fs.mountpoint / "state" / "spool.db"
    drop.mkdir()
    db.parent.mkdir()
    fsync_dir(fs.mountpoint)
    job = drop / "job.jsonl"
    with open(job, "w") as f:
        f.write("".join(json.dumps({"stat": f"job {i}", "count": 1, "t": T0}) + "\n" for i in range(3)))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(drop)
    return drop, db, job


@pytest.mark.parametrize("device", ["the same", "another"])
def test_a_file_taken_just_before_a_cut_is_not_taken_again_when_the_disk_comes_back(lazyfs, device):
    """The power goes after a file's records and identity were committed and before it was moved to .done/."""
    fs = lazyfs()
    drop, db, job = durable_job(fs)
    env = clean_env()
    taken = subprocess.run(spool_args("--db", str(db), "ingest", "--keep", str(job)), env=env,
                           capture_output=True, text=True)  # taken and left in place: the state a cut leaves
    assert taken.returncode == 0, taken.stderr
    before = os.stat(fs.mountpoint).st_dev
    # An open directory keeps the cut mount's device number taken after it is detached, so the disk comes back
    # with another one.
    holder = os.open(fs.mountpoint, os.O_RDONLY | os.O_DIRECTORY) if device == "another" else None
    try:
        fs.cut()
        fs = lazyfs() if holder is not None else power_back(lazyfs, before)
        assert (os.stat(fs.mountpoint).st_dev == before) == (device == "the same")
        again = subprocess.run(spool_args("--db", str(db), "ingest", str(job)), env=env, capture_output=True,
                               text=True)
        assert again.returncode == 0, again.stderr
    finally:
        if holder is not None:
            os.close(holder)
    with Store(db) as store:
        assert sorted(record.stat for _, _, record in store.records()) == ["job 0", "job 1", "job 2"]
    assert (drop / ".done" / "job.jsonl").exists()


def test_with_synchronous_normal_a_file_moved_to_done_is_still_in_the_spool_after_a_cut(lazyfs, tmp_path):
    """normal may lose the last appends, but never a file's: the file leaves the directory for good."""
    fs = lazyfs()
    drop, db, job = durable_job(fs)
    config = tmp_path / "normal.toml"
    config.write_text('[spool]\nsynchronous = "normal"\n')
    env = clean_env()
    # The watcher, running on: its connection stays open (a last close would checkpoint the WAL to disk).
    watcher = subprocess.Popen(spool_args("--config", str(config), "--db", str(db), "watch", str(drop)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(watcher.stderr), daemon=True)
    reader.start()
    try:
        # The file is taken once the watcher says so: its move is durable then (the rename alone is not, until
        # both directories are synced; a cut between the two leaves the file in place, known, and not taken twice).
        deadline = time.monotonic() + 30
        while not any("ingested 3 records from job.jsonl" in line for line in said) and time.monotonic() < deadline:
            time.sleep(0.05)
        fs.cut()
    finally:
        watcher.kill()
        watcher.wait(30)
    fs = lazyfs()
    assert (drop / ".done" / "job.jsonl").exists() and not job.exists(), said
    with Store(db) as store:
        assert sorted(record.stat for _, _, record in store.records()) == ["job 0", "job 1", "job 2"]
