"""Helpers the tests share: configs, CLI subprocesses, waiting, drop files, a running relay and watcher.

Fixtures live in conftest.py; everything a test imports comes from here (no test imports another test).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spool.config import Config, RelaySettings, WatchSettings
from spool.metrics import Metrics
from spool.relay import Relay
from spool.store import PAGE_SIZE, Store
from spool.testing import Receiver
from spool.watch import DirectoryWatcher

T0 = 1_700_000_000  # a fixed, plausible unix time for records in tests
TEST_EZKEY = "test-ezkey-0123456789"
# StatHat's JSON API example, verbatim from its documentation (trailing comma included).
STATHAT_JSON_EXAMPLE = """{
    "ezkey": "XXXYYYZZZ",
    "data": [
        {"stat": "page view", "count": 2},
        {"stat": "messages sent~total,female,europe", "count": 1},
        {"stat": "request time~total,messages", "value": 23.094},
        {"stat": "ws0: load average", "value": 0.732, "t": 1363118126},
    ]
}
"""


def make_config(db: Path, receiver: Receiver | None = None, **changes: Any) -> Config:
    """A Config for tests: loopback receiver, tiny back-off, short timeout; `changes` by setting name."""
    base = Config().replace(**{
        "spool.path": db, "endpoint": receiver.url if receiver else "http://127.0.0.1:9", "ezkey": TEST_EZKEY,
        "backoff_initial": 0.001, "backoff_max": 0.01, "timeout": 2.0, "idle_poll": 0.05,
        "max_requests_per_second": 0, "reconnect_jitter": 0})
    return base.replace(**changes)


UNPACED = "[ship]\nmax_requests_per_second = 0\nreconnect_jitter = 0\n"  # pacing is tested with a fake clock
def cli_env(db: Path, **extra: str) -> dict[str, str]:
    """The environment for a `spool` subprocess: its spool, and a config without pacing or start-up jitter."""
    config = db.parent / "unpaced.toml"
    config.write_text(UNPACED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
    env.update(SPOOL_DB=str(db), SPOOL_CONFIG=str(config), PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(db: Path, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `spool ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "spool", *args], input=input.decode() if input else None,
                          capture_output=True, text=True, env=env or cli_env(db), timeout=timeout)


def spawn_cli(db: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "spool", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or cli_env(db))


def wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 30) -> list[str]:
    """Read the process's stderr until a line containing `text`; return the lines read."""
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        # Byte by byte from the descriptor: a buffered reader would keep the lines after the match
        # in its buffer, where a later communicate() (which reads the descriptor) never sees them.
        fd = process.stderr.fileno()  # type: ignore[union-attr]
        line = b""
        while byte := os.read(fd, 1):
            line += byte
            if byte == b"\n":
                lines.append(line.decode(errors="replace"))
                if text in lines[-1]:
                    found.set()
                    return
                line = b""

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    found.wait(timeout)
    assert found.is_set(), f"no line with {text!r} within {timeout} s: {lines}"
    return lines


def wait_for(condition, timeout: float = 20.0) -> None:
    """Wait (polling) until `condition()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting")
        time.sleep(0.02)


def stop_agent(agent: subprocess.Popen[str]) -> str:
    """SIGTERM a `spool run` subprocess, assert it exits 0, and return its stderr."""
    import signal

    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=30)
    assert agent.returncode == 0, stderr
    return stderr



def damage_spool(db: Path, where: str) -> None:
    """Overwrite the spool file's header, or the whole first page of the table or index `where`, with garbage."""
    if where == "header":
        offset, size = 0, 100
    else:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (where,)).fetchone()[0]
        offset, size = (root - 1) * PAGE_SIZE, PAGE_SIZE
    with open(db, "r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef" * (size // 4))

# -- kept counts -----------------------------------------------------------------------------------------

KEPT = ("pending", "held", "sent", "dead", "staged")  # the columns of the spool's tally


def kept_and_real_counts(db: Path | Store) -> tuple[dict[str, int], dict[str, int]]:
    """Return the spool's kept counts (its tally) and a real count of its records, read in one snapshot.

    The real count is written here, not asked of the store: records named by an open stage's spans are staged;
    dead and held records are stored so; a live record is pending if it waits in the queue, a suspect group or a
    lease's run of ids (in flight is pending), and sent otherwise.
    """
    path = db.path if isinstance(db, Store) else db
    names = {0: "pending", 2: "sent", 3: "dead", 4: "held", 5: "staged"}
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN")
        kept = dict(zip(KEPT, conn.execute(f"SELECT {', '.join(KEPT)} FROM tally").fetchone(), strict=True))
        real = dict.fromkeys(KEPT, 0)
        for state, n in conn.execute(
                "SELECT CASE WHEN EXISTS (SELECT 1 FROM stage_spans WHERE records.id BETWEEN lo AND hi) THEN 5 "
                "WHEN state != 0 THEN state WHEN EXISTS (SELECT 1 FROM queue_runs q WHERE records.id BETWEEN q.lo "
                "AND q.hi) OR id IN (SELECT id FROM suspects) OR EXISTS (SELECT 1 FROM lease_runs "
                "WHERE records.id BETWEEN lo AND hi) THEN 0 ELSE 2 END AS s, count(*) FROM records GROUP BY s"):
            real[names[state]] += n
        # Each live record waits in one place at most (the queue's runs, a suspect group, a lease's runs), and the
        # queue's runs span no record of another state: else it would be counted once and shipped twice.
        twice = conn.execute(
            "SELECT id, state, (SELECT count(*) FROM queue_runs q WHERE records.id BETWEEN q.lo AND q.hi) + "
            "(id IN (SELECT id FROM suspects)) + (SELECT count(*) FROM lease_runs l WHERE records.id BETWEEN l.lo "
            "AND l.hi) AS places FROM records WHERE places > 1 OR (state != 0 AND places > 0) LIMIT 5").fetchall()
        conn.execute("COMMIT")
    assert not twice, f"records (id, state, places) waiting in more than one place, or not live: {twice}"
    return kept, real


def assert_counts_true(db: Path | Store) -> None:
    """Assert that the spool's kept counts equal a real count of its records (no path forgot its tally)."""
    kept, real = kept_and_real_counts(db)
    assert kept == real, f"kept counts {kept} differ from the records {real}"


# -- drop directories ---------------------------------------------------------------------------------


def jsonl(*stats: str, t: int = T0) -> str:
    return "".join(json.dumps({"stat": s, "count": 1, "t": t}) + "\n" for s in stats)


def drop(directory: Path, name: str, content: str | bytes) -> Path:
    """Write under a temporary name and rename into place, as producers are told to."""
    temp = directory / f".{name}.part"
    temp.write_bytes(content.encode() if isinstance(content, str) else content)
    final = directory / name
    os.rename(temp, final)
    return final


def taken(db: Path) -> Counter[str]:
    """Each stat in the spool with how many times it is there."""
    with Store(db) as store:
        return Counter(record.stat for _, _, record in store.records())


def stats_in(db: Path) -> list[str]:
    with Store(db) as store:
        return [record.stat for _, _, record in store.records()]


class Running:
    """A DirectoryWatcher running in a thread, stopped (and joined) on exit."""

    def __init__(self, directory: Path, db: Path, **options: Any):
        options.setdefault("settle", 0.0)
        self.watcher = DirectoryWatcher(WatchSettings(path=directory, **options), Store(db))
        self.thread = threading.Thread(target=self.watcher.run, name="test-watcher")

    def __enter__(self) -> DirectoryWatcher:
        self.watcher.start()
        self.thread.start()
        return self.watcher

    def __exit__(self, *exc: object) -> None:
        self.watcher.stop()
        self.thread.join(10)
        self.watcher.store.close()


def outcomes(watcher: DirectoryWatcher) -> list[tuple[str, str]]:
    return [(r.path.name, r.outcome) for r in watcher.results]


# -- the relay ---------------------------------------------------------------------------------------


@contextmanager
def running_relay(db: Path, *, spool: dict[str, Any] | None = None, **options: Any) -> Iterator[Relay]:
    """A relay on 127.0.0.1, port 0, over `db`, with /metrics and /healthz; stopped on exit.

    `spool` holds [spool] settings for the relay's store (its bounds: `{"max_pending": 1, ...}`).
    """
    config = RelaySettings(enabled=True, listen="127.0.0.1:0", **options)
    metrics = Metrics(Store(db))
    limits = Config().replace(**{f"spool.{name}": value for name, value in (spool or {}).items()}).spool
    relay = Relay(config, Store(db, limits=limits), health=metrics.health, metrics=metrics.render).start()
    metrics.relay = relay.snapshot
    try:
        yield relay
    finally:
        relay.stop()
        relay.writer.store.close()
        metrics.store.close()


# -- another PID namespace ---------------------------------------------------------------------------

# A process as a container sharing the spool's volume runs it: its pids and /proc are its own. --kill-child ends
# it with unshare, so a test that kills what it started leaves nothing behind.
IN_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")


def pid_namespace_unavailable() -> str | None:
    """Return why a process cannot be started in a PID namespace of its own here, or None if it can."""
    import shutil

    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run([*IN_PID_NAMESPACE, "true"], capture_output=True, text=True)
    if probe.returncode:
        return f"unshare cannot make a PID namespace here (root or user namespaces needed): {probe.stderr.strip()}"
    return None


def free_ports(*kinds: int) -> list[int]:
    """Free loopback ports, one per socket kind asked for (socket.SOCK_STREAM, socket.SOCK_DGRAM)."""
    import socket

    ports = []
    for kind in kinds:
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    return ports


def free_port() -> int:
    """A free loopback TCP port."""
    import socket

    return free_ports(socket.SOCK_STREAM)[0]
