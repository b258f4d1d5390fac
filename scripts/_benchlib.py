"""What spool's benchmark scripts share: the project's venv, backlogs filled through the API, `spool` processes
timed, the page cache warmed or dropped for one file, a free loopback port, a process's peak RSS.

Everything here goes through spool's public API (`Spool`) and its CLI (`python -m spool`), never its tables, so a
script keeps working, unchanged, on a spool of another schema.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
T0 = 1_700_000_000
WEEK = 7 * 86400


def use_project_venv(script: str, *, bootstrap: bool = True) -> None:
    """Re-run `script` inside the project's .venv (made by scripts/bootstrap first) unless it already runs there."""
    if Path(sys.prefix).resolve() == (ROOT / ".venv").resolve():
        return
    if bootstrap:
        subprocess.run([str(ROOT / "scripts" / "bootstrap")], check=True)
    os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), script, *sys.argv[1:]])  # noqa: S606 - re-exec ourselves


@contextlib.contextmanager
def scratch(prefix: str = "spool-bench-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def each_second(rate: int) -> Callable[[int], int]:
    """Record i's t when `rate` records arrive per second of t."""
    return lambda i: T0 + i // rate


def over_a_week(n: int) -> Callable[[int], int]:
    """Record i's t when n records are spread evenly over a week."""
    return lambda i: T0 + i * WEEK // max(n, 1)


def fill(path: Path, n: int, *, names: int, t: Callable[[int], int], chunk: int = 100_000) -> None:
    """Append n pending EZ counts (no key of their own) of `names` stat names through Spool.add_many, in large
    chunks, synchronous=normal: the fastest way in through the API (about 300k records/s on a 2-core machine)."""
    from spool import Spool

    with Spool(path, synchronous="normal") as sp:
        for start in range(0, n, chunk):
            sp.add_many({"stat": f"bench stat {i % names}", "count": 1, "t": t(i)}
                        for i in range(start, min(n, start + chunk)))


def remove_spool(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def spool_files(path: Path) -> list[Path]:
    """The spool file and its WAL, those that exist."""
    return [p for p in (path, Path(f"{path}-wal")) if p.exists()]


def warm_cache(path: Path) -> None:
    """Read the spool file and its WAL once, so what follows finds them in the page cache."""
    for file in spool_files(path):
        with open(file, "rb") as handle:
            while handle.read(1 << 20):
                pass


def drop_cache(path: Path) -> None:
    """Evict the spool file and its WAL (those files alone) from the page cache: posix_fadvise DONTNEED, after
    an fsync (dirty pages are not evicted). No root needed; the machine's other caches are left alone."""
    for file in spool_files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cli_env(db: Path, config: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `spool` process on db: none of the caller's SPOOL_* settings leak in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOOL_")}
    env["SPOOL_DB"] = str(db)
    if config is not None:
        env["SPOOL_CONFIG"] = str(config)
    env.update(extra)
    return env


def spool_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "spool", *args]


def run_cli(db: Path, *args: str, config: Path | None = None, check: bool = True, ok: tuple[int, ...] = (0,),
            env: dict[str, str] | None = None) -> float:
    """Run `spool ARGS` on db as a process; return its wall time in seconds (negative if it failed and `check` is
    off). Exit statuses in `ok` count as success (`spool doctor` exits 1 when a check fails)."""
    started = time.perf_counter()
    done = subprocess.run(spool_command(*args), env=env or cli_env(db, config), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    took = time.perf_counter() - started
    if done.returncode not in ok:
        if check:
            raise RuntimeError(f"spool {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
        return -took
    return took


def median_of(fn: Callable[[], Any], runs: int, budget: float = float("inf")) -> float:
    """Median wall time of up to `runs` calls of fn, fewer once `budget` seconds are spent (one at least)."""
    times: list[float] = []
    spent = time.perf_counter()
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
        if time.perf_counter() - spent > budget:
            break
    return statistics.median(times)


def peak_rss_mib(pid: int) -> float:
    """A live process's peak resident set (VmHWM) in MiB. Not ru_maxrss: on Linux that survives execve, so a
    child forked from a large benchmark process would report its parent's peak."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


# spool.testing's Receiver (TCP_NODELAY, so no answer waits on a delayed
# ACK) in a process of its own, so it does not share a GIL with the shipper. It prints only its URL; "count"
# on stdin answers (and forgets) how many stats it took.
RECEIVER_CHILD = """
import sys
from spool.testing import Receiver
with Receiver() as receiver:
    print(receiver.url, flush=True)
    for line in sys.stdin:
        with receiver._lock:
            taken = len(receiver.accepted)
            receiver.accepted.clear()
        print(taken, flush=True)
"""


class ReceiverProcess:
    """spool.testing.Receiver in a child process."""

    def __enter__(self) -> ReceiverProcess:
        self.process = subprocess.Popen([sys.executable, "-c", RECEIVER_CHILD], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        return self

    def taken(self) -> int:
        """How many stats it took since the last call."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("count\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def cpu(self) -> float:
        """User + system CPU seconds the receiver has used so far (Linux: /proc; elsewhere 0)."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)
