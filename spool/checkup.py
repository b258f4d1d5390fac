"""The agent's start-up check: ship at once after a clean stop; after an unclean one, check the whole file in the
background, once shipping is idle.

Opening the spool checks only what is cheap whatever the backlog (store.connection: the small bookkeeping tables,
and the root and edges of the records table and its indexes), so producers' doors open and shipping starts at
once. The full integrity check reads every page: minutes on an SD card with a week of backlog. It is owed
only when the last agent did not stop cleanly (a crash, a kill, a power cut; or no agent ever ran on the
file): the agent holding the ship lock removes the clean-stop mark from the spool's meta as it starts, and sets
it again as it stops cleanly with nothing left to check. Producers (`spool add`, `spool relay` alone) never
touch the mark.

An owed check runs in a thread of its own, on a connection of its own (a reader: it blocks no writer), when
the shipper first has nothing to move (its backlog drained, or a failing link waited out), never before: it
is low priority by running at idle, not by a nice value (that is the whole process's, shipper included). It
also pauses `spool.integrity_pause` before each step of about a million SQLite operations if asked. What it
finds is logged as an error and recorded in the spool's meta, where `spool status`, `/healthz` and `spool
doctor` read it; the spool is set aside (NAME.corrupt-<time>) at the next start of `spool run`, never from
under a running agent. A check stopped by shutdown is owed again at the next start.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from spool.clock import utc_text
from spool.config import Config
from spool.errors import StoreError
from spool.store import Store

log = logging.getLogger("spool.checkup")

STEP_CALLS = 1000  # calls of the check's step hook (store.CHECK_STEP_OPS operations each) between two pauses
IDLE_POLL = 0.5  # seconds between looks at the stop request while waiting for the shipper to be idle


def _when(t: float) -> str:
    return utc_text(t)


def full_check(store: Store, *, step: Callable[[], bool] | None = None, clock: Callable[[], float] = time.time,
               monotonic: Callable[[], float] = time.monotonic) -> dict[str, Any] | None:
    """Run SQLite's full integrity check of the spool; return its verdict as `record_integrity` takes it.

    None when `step` stopped it. The agent's background check and `spool doctor --deep` both run this.
    """
    started = monotonic()
    found = store.full_check(step)
    if found is None:
        return None
    verdict: dict[str, Any] = {"state": "damaged" if found else "sound", "at": clock(),
                               "seconds": round(monotonic() - started, 1)}
    if found:
        verdict["detail"] = "; ".join(found)
    return verdict


class Checkup:
    """One agent's start-up check. `idle` is set by the shipper when it first has nothing to move."""

    def __init__(self, config: Config, *, idle: threading.Event, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.idle = idle
        self.clock = clock
        self.monotonic = monotonic
        self.pause = config.spool.integrity_pause
        self.owed: bool | None = None  # None: not begun (this agent holds no ship lock yet)
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self._store: Store | None = None  # the check's own connection, while it runs (stop interrupts it)
        self._store_lock = threading.Lock()
        self._calls = 0

    def begin(self, store: Store) -> None:
        """Take the clean-stop mark (the caller holds the ship lock); without it, start the background check.

        Once per agent: a reload that replaces the shipper does not begin again.
        """
        if self.owed is not None:
            return
        try:
            stopped = store.take_clean_stop()
        except StoreError as exc:  # a full disk, say: check anyway; shipping is not held up for the mark
            log.warning("cannot take the clean-stop mark: %s", exc)
            stopped = None
        self.owed = stopped is None
        if not self.owed:
            log.info("the last stop was clean (%s): shipping at once, no integrity check", _when(stopped or 0))
            return
        with contextlib.suppress(StoreError):  # status then shows the last verdict until the check begins
            store.record_integrity("owed", self.clock())
        log.warning("the last stop was not clean (a crash, a kill or a power cut; or no agent ran on this spool "
                    "yet): the whole file is checked in the background once shipping is idle")
        self.thread = threading.Thread(target=self._run, name="spool-checkup", daemon=True)
        self.thread.start()

    def end(self, store: Store, *, clean: bool) -> None:
        """Set the clean-stop mark if this agent stops cleanly with nothing left to check (ship lock held)."""
        if self.owed is None:
            return
        if not clean:
            log.warning("not a clean stop: the next start checks the whole spool in the background")
            return
        if self.owed:
            log.info("stopping before the integrity check finished: the next start checks the spool again")
            return
        store.mark_clean_stop(self.clock())

    def stop(self, timeout: float) -> None:
        """Stop the check if it runs (it is owed again at the next start); wait up to `timeout` seconds."""
        self.stopping.set()
        with self._store_lock:
            if self._store is not None:
                self._store.conn.interrupt()  # SQLite stops at its next page or row, even between steps
        if self.thread is not None:
            self.thread.join(timeout)

    # -- the check's thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self.idle.wait(IDLE_POLL):  # shipping first: the check waits until the shipper is idle
            if self.stopping.is_set():
                return
        try:
            store = Store.for_config(self.config)
        except StoreError as exc:
            log.error("integrity check: cannot open the spool: %s; it runs again at the next start", exc)
            return
        with self._store_lock:
            self._store = store
        try:
            if not self.stopping.is_set():
                self._check(store)
        except StoreError as exc:
            log.error("integrity check failed to run: %s; it runs again at the next start", exc)
        finally:
            with self._store_lock:
                self._store = None
            with contextlib.suppress(StoreError):
                store.close()

    def _check(self, store: Store) -> None:
        store.record_integrity("checking", self.clock())
        log.info("integrity check: shipping is idle; checking the whole spool (%.1f MiB) in the background",
                 store.size_bytes() / 1048576)
        verdict = full_check(store, step=self._step, clock=self.clock, monotonic=self.monotonic)
        if verdict is None:
            store.record_integrity("owed", self.clock())
            log.info("integrity check stopped before it finished; the next start checks the spool again")
            return
        store.record_integrity(**verdict)
        self.owed = False  # damage too is settled: the next start sets the file aside
        if verdict["state"] == "damaged":
            log.error("integrity check: the spool %s is DAMAGED: %s. The agent goes on with what it can read; "
                      "the next start of `spool run` moves the file aside as %s.corrupt-<time> and starts a fresh "
                      "spool (`spool export --state pending FILE` first saves what can still be read)",
                      store.path, verdict["detail"], store.path.name)
        else:
            log.info("integrity check: the spool is sound (%.1f s)", verdict["seconds"])

    def _step(self) -> bool:
        """Called by SQLite every few hundred records checked: pause if asked; return True to stop the check."""
        self._calls += 1
        if self.pause and self._calls % STEP_CALLS == 1:
            self.stopping.wait(self.pause)
        return self.stopping.is_set()
