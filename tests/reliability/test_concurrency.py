"""Several producer processes and a shipper on one spool file at the same time."""

from __future__ import annotations

import subprocess
import sys

from spool.store import Store

from ..conftest import T0, TEST_EZKEY, cli_env, spawn_cli

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


def test_producers_in_several_processes_and_a_running_shipper_lose_nothing_and_never_see_locked(db, receiver):
    workers, n = 6, 300
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    agent = spawn_cli(db, "run", "--batch-size", "50", env=env)
    try:
        producers = [subprocess.Popen([sys.executable, "-c", PRODUCER, str(w), str(n), str(db)],
                                      stderr=subprocess.PIPE, text=True) for w in range(workers)]
        for producer in producers:
            _, stderr = producer.communicate(timeout=120)
            assert producer.returncode == 0, stderr
            assert "locked" not in stderr
        per_worker = n + (n // 10) * 4  # every 10th step adds a batch of 5 instead of 1
        deadline_polls = 600
        while len(receiver.accepted) < workers * per_worker and deadline_polls:
            receiver._stopping.wait(0.05)
            deadline_polls -= 1
    finally:
        agent.terminate()
        _, agent_err = agent.communicate(timeout=30)
    assert agent.returncode == 0, agent_err
    assert "locked" not in agent_err
    assert sorted(a["stat"] for a in receiver.accepted) == sorted(
        f"w{w}" for w in range(workers) for _ in range(per_worker))
    with Store(db) as store:
        assert store.counts()["sent"] == workers * per_worker
