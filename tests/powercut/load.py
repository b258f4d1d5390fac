"""Load for the power-cut trials: every way of producing records, the agent, and an export, all on one mount.

Each producer writes records with stat names of their own (unique across a whole trial), and notes a record
*done* only when spool said so: `spool add` and `spool import` exited 0, an API call returned (the child
prints the stat after the call), the relay answered 2xx, the watcher moved the file to `.done/`, `spool
export --remove` exited 0. A cut can land anywhere; whatever a producer was doing then is simply not done.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from ..helpers import T0, TEST_EZKEY
from .mount import fsync_dir

RELAY_CLIENTS = 16
T_SPAN = 1000  # records get t in [T0, T0 + T_SPAN): an export of t <= the middle takes part of the backlog
API_CHILD = """
import sys
import time
from spool import Spool
db, synchronous, prefix, count, t0, seed, span = sys.argv[1:]
import random
rng = random.Random(int(seed))
with Spool(db, synchronous=synchronous) as sp:
    for i in range(int(count)):
        stat = f"{prefix}{i}"
        sp.count(stat, 1, t=int(t0) + rng.randrange(int(span)))
        print(stat, flush=True)
        time.sleep(0.005)  # a steady producer, not one that takes the whole file system for itself
"""


def api_child(db: Path, synchronous: str, prefix: str, seed: int, count: int = 100_000) -> list[str]:
    """The command of a process appending through the API, one record a call, printing each once it returned."""
    return [sys.executable, "-c", API_CHILD, str(db), synchronous, prefix, str(count), str(T0), str(seed),
            str(T_SPAN)]


@dataclass
class Layout:
    """Where everything lives: the spool, the drop directory and the exports on the mount; config beside it."""

    mount: Path
    config: Path  # on the real disk: not part of any promise
    scratch: Path  # on the real disk: files to import

    @property
    def db(self) -> Path:
        return self.mount / "state" / "spool.db"

    @property
    def drop(self) -> Path:
        return self.mount / "drop"

    @property
    def exports(self) -> Path:
        return self.mount / "export"


def write_config(layout: Layout, endpoint: str, *, batch_size: int, max_in_flight: int,
                 synchronous: str = "full") -> None:
    """The agent's config: relay on a port of its choosing, one drop directory, shipping unpaced."""
    layout.config.write_text(f"""
[spool]
path = "{layout.db}"
synchronous = "{synchronous}"
[ship]
endpoint = "{endpoint}"
ezkey = "{TEST_EZKEY}"
batch_size = {batch_size}
max_in_flight = {max_in_flight}
max_requests_per_second = 0
reconnect_jitter = 0
idle_poll = "50ms"
backoff_initial = "10ms"
backoff_max = "100ms"
timeout = "5s"
[log]
level = "info"
[relay]
enabled = true
listen = "127.0.0.1:0"
[[watch]]
path = "{layout.drop}"
settle = "200ms"
rescan = "1s"
""")


def clean_env() -> dict[str, str]:
    """This environment without any SPOOL_ setting: spool reads only what a test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}


def spool_env(layout: Layout) -> dict[str, str]:
    return {**clean_env(), "SPOOL_CONFIG": str(layout.config), "PYTHONUNBUFFERED": "1"}


class Processes:
    """Every child of one phase, so that a cut can kill them all; none starts once they were killed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._children: list[subprocess.Popen[str]] = []
        self.killed = False

    def spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen[str] | None:
        with self._lock:
            if self.killed:
                return None
            child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                     text=True, env=env)
            self._children.append(child)
            return child

    def kill_all(self) -> None:
        with self._lock:
            self.killed = True
            children = list(self._children)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGKILL)
        for child in children:
            child.wait(timeout=30)

    def close(self) -> None:
        """Close the pipes of children that ended (once nothing reads them any more)."""
        with self._lock:
            for child in self._children:
                for pipe in (child.stdout, child.stderr):
                    if pipe is not None:
                        pipe.close()


def spool_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "spool", *args]


@dataclass
class Tally:
    """What producers were told was done, by stat; what the exports said; what was seen in .done/."""

    done: set[str] = field(default_factory=set)
    exports: dict[Path, int] = field(default_factory=dict)  # completed export file -> records it said it moved
    done_files: set[str] = field(default_factory=set)  # names seen in .done/
    files: dict[str, list[str]] = field(default_factory=dict)  # drop file name -> its stats
    lock: threading.Lock = field(default_factory=threading.Lock)

    def told_done(self, *stats: str) -> None:
        with self.lock:
            self.done.update(stats)


class Agent:
    """`spool run` in a child: its stderr is read as it comes, and the relay's address taken from it."""

    def __init__(self, layout: Layout, processes: Processes):
        self.lines: list[str] = []
        self.relay: str | None = None
        self.relay_up = threading.Event()
        self.child = processes.spawn(spool_args("run"), spool_env(layout))
        self.reader = threading.Thread(target=self._read, name="agent-log", daemon=True)
        if self.child is not None:
            self.reader.start()

    def _read(self) -> None:
        assert self.child is not None and self.child.stderr is not None
        for line in self.child.stderr:
            self.lines.append(line)
            if "relay listening on " in line:
                self.relay = line.split("relay listening on ")[1].split(",")[0].strip()
                self.relay_up.set()

    def stop(self) -> str:
        """SIGTERM; return the log once it exited (it must exit 0)."""
        assert self.child is not None
        self.child.send_signal(signal.SIGTERM)
        self.child.wait(timeout=60)
        self.reader.join(timeout=30)
        for pipe in (self.child.stdout, self.child.stderr):
            pipe.close()  # type: ignore[union-attr]
        assert self.child.returncode == 0, "".join(self.lines)
        return "".join(self.lines)


class Phase:
    """One stretch of load between two cuts: the agent restarted, every producer running, an export somewhere."""

    def __init__(self, layout: Layout, tally: Tally, rng: random.Random, name: str, *,
                 synchronous: str = "full"):
        self.layout, self.tally, self.rng, self.name = layout, tally, rng, name
        self.synchronous = synchronous
        self.processes = Processes()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.env = spool_env(layout)
        self.agent: Agent | None = None

    def start(self) -> None:
        self.agent = Agent(self.layout, self.processes)
        work: list[tuple[str, Callable[[], None]]] = [
            ("add", self._adds), ("api", self._api), ("import", self._imports), ("drop", self._drops),
            ("done-watch", self._watch_done), ("export", self._export),
            *((f"relay-{n}", lambda n=n: self._relay_client(n)) for n in range(RELAY_CLIENTS))]
        for label, target in work:
            thread = threading.Thread(target=self._guard(target), name=f"{self.name}-{label}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def end(self) -> None:
        """The power went: kill every child, let every producer thread notice and end."""
        self.stop.set()
        self.processes.kill_all()
        threads = [*self.threads, *([self.agent.reader] if self.agent and self.agent.child else [])]
        for thread in threads:
            thread.join(timeout=30)
            assert not thread.is_alive(), f"{thread.name} did not end"
        self.processes.close()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with contextlib.suppress(OSError):  # EIO, ENOTCONN, refused connections: the power is out
                target()
        return run

    def _t(self) -> int:
        return T0 + self.rng.randrange(T_SPAN)

    def _run(self, args: list[str]) -> subprocess.CompletedProcess[str] | None:
        child = self.processes.spawn(args, self.env)
        if child is None:
            return None
        out, err = child.communicate(timeout=60)
        return subprocess.CompletedProcess(args, child.returncode, out, err)

    # -- producers --------------------------------------------------------------------------------------------

    def _adds(self) -> None:
        for i in range(10_000):
            stat = f"{self.name} add {i}"
            result = self._run(spool_args("add", stat, "--count", "1", "--t", str(self._t())))
            if result is None:
                return
            if result.returncode == 0:
                self.tally.told_done(stat)

    def _api(self) -> None:
        child = self.processes.spawn(api_child(self.layout.db, self.synchronous, f"{self.name} api ",
                                               self.rng.randrange(1 << 30)), self.env)
        if child is None:
            return
        assert child.stdout is not None
        for line in child.stdout:  # each line: a call that returned
            self.tally.told_done(line.rstrip("\n"))
        child.communicate(timeout=60)

    def _imports(self) -> None:
        for n in range(10_000):
            stats = [f"{self.name} import {n} {i}" for i in range(50)]
            source = self.layout.scratch / f"{self.name.replace(' ', '-')}-import-{n}.jsonl"
            source.write_text("".join(json.dumps({"stat": stat, "count": 1, "t": self._t()}) + "\n"
                                      for stat in stats))
            result = self._run(spool_args("import", str(source)))
            if result is None:
                return
            if result.returncode == 0:
                self.tally.told_done(*stats)

    def _relay_client(self, n: int) -> None:
        assert self.agent is not None
        while not self.agent.relay_up.wait(0.05):
            if self.stop.is_set():
                return
        assert self.agent.relay is not None
        host, port = self.agent.relay.removeprefix("http://").rsplit(":", 1)
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            for i in range(100_000):
                if self.stop.is_set():
                    return
                stat = f"{self.name} relay {n} {i}"
                body = urlencode({"ezkey": TEST_EZKEY, "stat": stat, "count": 1, "t": self._t()})
                try:
                    connection.request("POST", "/ez", body, {"Content-Type": "application/x-www-form-urlencoded"})
                    answer = connection.getresponse()
                    answer.read()
                except (OSError, http.client.HTTPException):  # the agent went down (a cut) before it answered whole
                    return
                if not 200 <= answer.status < 300:
                    return
                self.tally.told_done(stat)
        finally:
            connection.close()

    def _drops(self) -> None:
        """Write drop files as careful producers do: a dot name, the data fsynced, then a rename.

        Half of them also fsync the directory after the rename, so the file is on the disk before spool takes
        it: from then on only spool's own fsyncs keep it from being taken twice after a cut.
        """
        drop = self.layout.drop
        for n in range(10_000):
            if self.stop.wait(0.05):
                return
            name = f"{self.name.replace(' ', '-')}-{n}.jsonl"
            stats = [f"{self.name} drop {n} {i}" for i in range(20)]
            with self.tally.lock:
                self.tally.files[name] = stats
            with open(drop / f".{name}.part", "w") as f:
                f.write("".join(json.dumps({"stat": stat, "count": 1, "t": self._t()}) + "\n" for stat in stats))
                f.flush()
                os.fsync(f.fileno())
            durable = self.rng.random() < 0.5
            os.rename(drop / f".{name}.part", drop / name)
            if durable:
                fsync_dir(drop)

    def _watch_done(self) -> None:
        """A file is done once the watcher moved it to .done/ (it moves a file only after its commit)."""
        done = self.layout.drop / ".done"
        while not self.stop.wait(0.02):
            if not done.exists():
                continue
            for name in os.listdir(done):
                with self.tally.lock:
                    stats = self.tally.files.get(name)
                    if stats is not None and name not in self.tally.done_files:
                        self.tally.done_files.add(name)
                        self.tally.done.update(stats)

    def _export(self) -> None:
        if self.stop.wait(self.rng.uniform(0.2, 1.5)):
            return
        target = self.layout.exports / f"{self.name.replace(' ', '-')}.jsonl"
        result = self._run(spool_args("export", "--remove", "--until", str(T0 + T_SPAN // 2), str(target)))
        if result is not None and result.returncode == 0:
            moved = int(result.stderr.split("exported ")[1].split()[0].replace(",", ""))  # "1,124 records"
            with self.tally.lock:
                self.tally.exports[target] = moved


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
