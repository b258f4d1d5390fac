"""Several producer processes and a shipper on one spool file at the same time."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from spool.store import Store

from ..helpers import T0, TEST_EZKEY, UNPACED, assert_counts_true, cli_env, spawn_cli

PRODUCER = """
import sys
from spool import Spool
worker, n = int(sys.argv[1]), int(sys.argv[2])
with Spool(sys.argv[3]) as sp:
    for i in range(n):
        if i % 10 == 0:
            sp.add_many([{"stat": f"w{worker}", "count": 1, "t": T0 + i}] * 5)
        else:
            sp.count(f"w{worker}", 1, t=T0 + i)
""".replace("T0", str(T0))


def test_eight_producers_a_shipper_and_a_watcher_on_one_spool_lose_nothing_and_never_see_locked(
        tmp_path, receiver):
    db, drop, config = tmp_path / "spool.db", tmp_path / "drop", tmp_path / "spool.toml"
    drop.mkdir()
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = 50\n[[watch]]\npath = "{drop}"\n')
    workers, n, from_file = 8, 200, 3000
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(w), str(n), str(db)],
                                      stderr=subprocess.PIPE, text=True) for w in range(workers)]
        (drop / ".f.part").write_text("".join(f'{{"stat":"file","count":1,"t":{T0 + i}}}\n' for i in range(from_file)))
        (drop / ".f.part").rename(drop / "f.jsonl")
        for producer in producers:
            _, stderr = producer.communicate(timeout=120)
            assert producer.returncode == 0, stderr
            assert "locked" not in stderr
        assert_counts_true(db)  # one snapshot, while the agent ships and ingests beside it
        per_worker = n + (n // 10) * 4  # every 10th step adds a batch of 5 instead of 1
        expected = workers * per_worker + from_file
        deadline_polls = 1200
        while len(receiver.accepted) < expected and deadline_polls:
            receiver._stopping.wait(0.05)
            deadline_polls -= 1
    finally:
        agent.terminate()
        _, agent_err = agent.communicate(timeout=30)
    assert agent.returncode == 0, agent_err
    assert "locked" not in agent_err
    assert Counter(a["stat"] for a in receiver.accepted) == Counter(
        {**{f"w{w}": per_worker for w in range(workers)}, "file": from_file})
    with Store(db) as store:
        assert store.counts()["sent"] == expected
    assert_counts_true(db)
