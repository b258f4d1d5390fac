from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from spool.config import Config
from spool.testing import Receiver

# Timing-based checks fail on noisy machines; examples count is raised by SPOOL_LONG=1.
settings.register_profile("spool", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          max_examples=500 if os.environ.get("SPOOL_LONG") else 100)
settings.load_profile("spool")

# Subprocesses (the CLI, the agent) turn deprecations from our own modules into errors too, as pyproject.toml's
# filterwarnings does in this process. -W matches module names literally, so each module is named.
_OURS = sorted(f"spool.{p.stem}" for p in (Path(__file__).resolve().parent.parent / "spool").glob("[!_]*.py"))
os.environ["PYTHONWARNINGS"] = ",".join(
    [os.environ.get("PYTHONWARNINGS", ""), *(f"error::DeprecationWarning:{m}" for m in ["spool", *_OURS])]).strip(",")

T0 = 1_700_000_000  # a fixed, plausible unix time for records in tests
TEST_EZKEY = "test-ezkey-0123456789"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves threads of its own running (bounded wait for them to end)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


def make_config(db: Path, receiver: Receiver | None = None, **changes: object) -> Config:
    """A Config for tests: loopback receiver, tiny back-off, short timeout."""
    base = Config(db=db, endpoint=receiver.url if receiver else "http://127.0.0.1:9", ezkey=TEST_EZKEY,
                  backoff_initial=0.001, backoff_max=0.01, timeout=2.0, idle_poll=0.05,
                  max_requests_per_second=0, reconnect_jitter=0)
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
        for line in process.stderr:  # type: ignore[union-attr]
            lines.append(line)
            if text in line:
                found.set()
                return

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
