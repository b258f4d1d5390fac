from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from spool.testing import Receiver

# Timing-based checks fail on noisy machines; examples count is raised by SPOOL_LONG=1.
settings.register_profile("spool", deadline=None, suppress_health_check=[HealthCheck.too_slow],
                          max_examples=500 if os.environ.get("SPOOL_LONG") else 100)
settings.load_profile("spool")
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


@pytest.fixture
def drop_dir(tmp_path: Path) -> Path:
    """An empty drop directory."""
    path = tmp_path / "drop"
    path.mkdir()
    return path
