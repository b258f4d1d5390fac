"""A bad day: producers, `spool run` and the link simulator together, with outages, spikes, poison and SIGKILLs.

Producers of every kind (`spool add` and `spool import` processes, files dropped into a watched directory, the
Python API) write all day; the agent ships through a link that resets, stalls, cuts answers, loses answers
after the receiver took them, goes dark for whole windows and slows down in spikes; a few records are ones
the receiver refuses; the agent is killed with SIGKILL at seeded moments and started again. At the end (link
healed, agent restarted) the spool must drain, and then:

* every record produced is in the spool exactly once, and the receiver took every clean one (nothing lost);
* exactly the poison records are dead, with the receiver's reason;
* duplicates are within the stated bound: an answer that may have been lost after the receiver took its
  request resends at most that one request (`BATCH` records), and a SIGKILL at most the requests in flight
  (`IN_FLIGHT` times `BATCH`). The simulator's exchange log and our own kill log count those events.

About 30 s by default; `SPOOL_LONG=1` makes the day ten minutes long.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from spool import Spool
from spool.store import Store
from spool.testing import Receiver

from ..helpers import T0, TEST_EZKEY, assert_counts_true, cli_env, run_cli
from .faultproxy import FaultProxy, Schedule

LONG = bool(os.environ.get("SPOOL_LONG"))
DAY = 600.0 if LONG else 16.0  # seconds of bad weather
SCALE = DAY / 16.0  # producers, kills and windows grow with the day
SEED = 20261127
BATCH, IN_FLIGHT, TIMEOUT = 40, 4, 2.0
SLOW = TIMEOUT / 4  # an answer slower than this may have come after its client gave up: counted as an event
POISON = ("poison one", "poison two", "poison three")
FAULTS = (("reset", 0.03), ("stall", 0.01), ("truncate", 0.02), ("lost", 0.02))

AGENT_CONFIG = f"""
[ship]
batch_size = {BATCH}
max_in_flight = {IN_FLIGHT}
timeout = "{TIMEOUT}s"
backoff_initial = "0.05s"
backoff_max = "0.5s"
max_requests_per_second = 200
reconnect_jitter = 0
idle_poll = "0.2s"

[log]
summary_interval = "5s"

[[watch]]
path = "{{drop}}"
settle = "0.2s"
rescan = "1s"
"""


class Agent:
    """`spool run` as a subprocess that can be killed and started again; every life logs to one file."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "spool", "run"], env=self.env,
                                            stdout=subprocess.DEVNULL, stderr=log)
        self.starts += 1

    def kill(self) -> None:
        assert self.process is not None and self.process.poll() is None, self.tail()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def tail(self) -> str:
        return "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-40:])


class Producers:
    """Every kind of producer, each in its own thread, writing seeded records through the day."""

    def __init__(self, db: Path, drop: Path, work: Path, rng: random.Random):
        self.db, self.drop, self.work = db, drop, work
        self.rng = random.Random(rng.random())
        self.produced: Counter[tuple[str, float, int]] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _took(self, records: list[dict]) -> None:
        with self._lock:
            self.produced.update((r["stat"], r.get("count", r.get("value")), r["t"]) for r in records)

    def start(self, deadline: float) -> None:
        plans = [(self._adds, int(12 * SCALE)), (self._imports, int(5 * SCALE)), (self._drops, int(8 * SCALE)),
                 (self._api, int(50 * SCALE))]
        for target, n in plans:
            rng = random.Random(self.rng.random())
            thread = threading.Thread(target=self._paced, args=(target, n, deadline, rng), name=target.__name__)
            thread.start()
            self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(120)
        assert not self.errors, self.errors

    def _paced(self, produce, n: int, deadline: float, rng: random.Random) -> None:
        """Call `produce(k, rng)` n times, spread evenly over what is left of the day."""
        for k in range(n):
            try:
                produce(k, rng)
            except Exception as exc:  # a producer must never fail: collected, asserted by join
                self.errors.append(f"{produce.__name__} {k}: {exc!r}")
                return
            left = deadline - time.monotonic()
            time.sleep(max(0.0, left / max(1, n - k - 1)) if left > 0 else 0)

    def _adds(self, k: int, rng: random.Random) -> None:
        record = {"stat": f"add {k}", "count": k + 1, "t": T0 + k}
        result = run_cli(self.db, "add", record["stat"], "--count", str(record["count"]), "--t", str(record["t"]))
        assert result.returncode == 0, result.stderr
        self._took([record])

    def _imports(self, k: int, rng: random.Random) -> None:
        records = [{"stat": f"import {k} {j}", "count": j % 7 + 1, "t": T0 + j} for j in range(rng.randrange(200, 800))]
        source = self.work / f"import-{k}.jsonl"
        source.write_text("".join(json.dumps(r) + "\n" for r in records))
        result = run_cli(self.db, "import", str(source))
        assert result.returncode == 0, result.stderr
        self._took(records)

    def _drops(self, k: int, rng: random.Random) -> None:
        records = [{"stat": f"drop {k} {j}", "value": j / 4, "t": T0 + 2 * j} for j in range(rng.randrange(50, 300))]
        part = self.drop / f".drop-{k}.part"
        part.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.rename(part, self.drop / f"drop-{k}.jsonl")  # the hand-off convention: write aside, then rename
        self._took(records)

    def _api(self, k: int, rng: random.Random) -> None:
        records = [{"stat": f"api {k} {j}", "value": j / 10, "t": T0 + 3 * j} for j in range(rng.randrange(20, 120))]
        with Spool(self.db) as sp:
            sp.add_many(records)
            if k in (3, 17, 31):  # a few records the receiver refuses, among the clean ones
                sp.count(POISON[(3, 17, 31).index(k)], 1, t=T0 + k)
        self._took(records)


def drained(db: Path, drop: Path) -> bool:
    if any(path.suffix == ".jsonl" for path in drop.iterdir()):
        return False  # a file still waits for the watcher
    with Store(db) as store:
        return store.backlog() == (0, 0) and store.counts()["dead"] == len(POISON)


def test_a_bad_day_on_the_link_loses_nothing_kills_only_the_poison_and_duplicates_within_the_bound(tmp_path):
    db, drop, log = tmp_path / "spool.db", tmp_path / "drop", tmp_path / "agent.log"
    drop.mkdir()
    rng = random.Random(SEED)
    n = max(1, round(SCALE))
    schedule = Schedule.bad_day(SEED, DAY, outages=2 * n, spikes=2 * n, outage=(1.5, 3.0), spike=(1.0, 3.0),
                                spike_latency=(0.2, 2.5), latency=0.002, jitter=0.02, stall=TIMEOUT + 1,
                                faults=FAULTS)
    slot = DAY / (3 * n)  # one SIGKILL in each third of the day (in each of 3n slots), at a seeded moment
    kills = [k * slot + rng.uniform(0.5, slot - 0.5) for k in range(3 * n)]
    config = tmp_path / "agent.toml"
    config.write_text(AGENT_CONFIG.format(drop=drop))
    with Receiver() as receiver, FaultProxy(receiver, schedule) as proxy:
        for stat in POISON:
            receiver.refuse_stat(stat)
        for mode, value in (("lost", 0), ("truncate", 5), ("reset", 0), ("stall", TIMEOUT + 1)):
            proxy.next("pass", 2)  # the day opens with one of each fault for certain; the schedule does the rest
            proxy.next(mode, 1, value)
        env = {**cli_env(db), "SPOOL_EZKEY": TEST_EZKEY, "SPOOL_ENDPOINT": proxy.url, "SPOOL_CONFIG": str(config)}
        agent = Agent(env, log)
        producers = Producers(db, drop, tmp_path, rng)
        started = time.monotonic()
        agent.start()
        producers.start(started + DAY)
        try:
            for at in kills:  # SIGKILL at seeded moments of the day, back after a seeded pause
                time.sleep(max(0.0, started + at - time.monotonic()))
                agent.kill()
                assert_counts_true(db)  # one snapshot: true even while the producers go on appending
                time.sleep(rng.uniform(0.0, 0.5))
                agent.start()
            producers.join()
            proxy.heal()
            agent.kill()  # the day's last kill, then the agent comes back to a healthy link
            agent.start()
            deadline = time.monotonic() + (900 if LONG else 120)
            while not drained(db, drop):
                assert time.monotonic() < deadline, f"not drained in time\n{agent.tail()}"
                assert agent.process.poll() is None, f"the agent exited\n{agent.tail()}"
                time.sleep(0.1)
            assert agent.stop() == 0, agent.tail()
        finally:
            if agent.process is not None and agent.process.poll() is None:
                agent.process.kill()
                agent.process.wait()
        got = Counter((a["stat"], a["number"], a["t"]) for a in receiver.accepted)
    expected = producers.produced
    poison = Counter((stat, 1, T0 + k) for stat, k in zip(POISON, (3, 17, 31), strict=True))

    # Every record produced is in the spool once: no producer, ingest or restart took one twice or lost one.
    with Store(db) as store:
        kept = Counter((r.stat, r.number, r.t) for _, _, r in store.records())
        counts = store.counts()
        assert store.integrity_ok()
    assert_counts_true(db)
    assert kept == expected + poison
    assert counts == {"pending": 0, "inflight": 0, "sent": sum(expected.values()), "dead": len(POISON), "held": 0}

    # Exactly the poison is dead, with the receiver's reason.
    listed = run_cli(db, "dead", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    dead = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(row["stat"] for row in dead) == sorted(POISON)
    assert {row["reason"] for row in dead} == {"invalid stat name"}

    # Nothing lost; nothing foreign; duplicates within the bound the events allow.
    assert not expected - got, f"lost: {list((expected - got).items())[:10]}"
    duplicates = got - expected
    assert set(duplicates) <= set(expected), "the receiver took a record nobody produced (or a poison one)"
    lost_answers = sum(exchange.may_duplicate(SLOW) for exchange in proxy.exchanges)
    killed = len(kills) + 1
    bound = lost_answers * BATCH + killed * IN_FLIGHT * BATCH
    report = {"records": sum(expected.values()), "poison": len(POISON), "exchanges": len(proxy.exchanges),
              "connections": proxy.connections, "faults": dict(sorted(proxy.counts.items())),
              "answers possibly lost": lost_answers, "SIGKILLs": killed, "agent starts": agent.starts,
              "duplicates": sum(duplicates.values()), "bound": bound}
    print("soak:", json.dumps(report))
    assert sum(duplicates.values()) <= bound, report

    # The day was as bad as planned: the outages and spikes struck, the schedule's own faults too (beyond the
    # four that opened the day), and the agent really died and came back.
    assert sum(proxy.counts.get(mode, 0) for mode in ("reset", "stall", "truncate", "lost")) > 4, report
    for mode in ("reset", "stall", "truncate", "lost", "halfopen", "latency"):
        assert proxy.counts.get(mode, 0) > 0, report
    assert agent.starts == killed + 1
