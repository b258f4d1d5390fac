"""The drain loop: lease a batch, send it, bisect refusals, acknowledge; retry policy built with tenacity."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import tenacity
from tenacity.stop import stop_base, stop_when_event_set
from tenacity.wait import wait_base, wait_random_exponential

from spool.config import Config
from spool.errors import EndpointError, Refused, ShipError, StoreError, TransientError
from spool.lock import ShipLock
from spool.stathat import StatHatClient
from spool.store import Lease, Leased, Store

log = logging.getLogger("spool.ship")

META_THROTTLE = 1.0  # seconds between writes of "last attempt" facts while batches keep succeeding
HOUSEKEEPING_INTERVAL = 60.0  # seconds between looks for stale leases
PRUNE_INTERVAL = 3600.0  # seconds between prunes of sent records (retention is days; a prune walks the table)
SETTLE_BACKOFF_MAX = 5.0  # seconds between attempts to record an answer in a busy or full spool
SETTLE_GRACE = 10.0  # seconds an answer is still retried after shutdown was asked


class wait_retry_after(wait_base):
    """Wait as `fallback` does, but never less than the receiver's Retry-After (capped at `cap`)."""

    def __init__(self, fallback: wait_base, cap: float):
        self.fallback = fallback
        self.cap = cap

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.fallback(retry_state)
        error = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(error, "retry_after", None)
        return max(wait, min(retry_after, self.cap)) if retry_after is not None else wait


class stop_at_deadline(stop_base):
    """Stop when the next wait would end past a time.monotonic() deadline (never, when it is None)."""

    def __init__(self, deadline: float | None, monotonic: Callable[[], float]):
        self.deadline = deadline
        self.monotonic = monotonic

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self.deadline is not None and self.monotonic() + retry_state.upcoming_sleep >= self.deadline


class stop_after_shutdown(stop_base):
    """Stop `grace` seconds after `shutdown` is set (never before it is)."""

    def __init__(self, shutdown: threading.Event, grace: float, monotonic: Callable[[], float]):
        self.shutdown = shutdown
        self.grace = grace
        self.monotonic = monotonic
        self._since: float | None = None

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        if not self.shutdown.is_set():
            return False
        if self._since is None:
            self._since = self.monotonic()
        return self.monotonic() - self._since >= self.grace


@dataclass
class ShipStats:
    """What this shipper has done since it started."""

    sent: int = 0
    dead: int = 0
    requests: int = 0
    retries: int = 0
    paced: float = 0.0  # seconds spent keeping to max_requests_per_second
    last_error: str | None = None


@dataclass(frozen=True)
class DrainResult:
    done: bool  # nothing deliverable is left
    reason: str | None = None  # why not, when not done


class Shipper:
    """Drain a spool into a StatHat endpoint. Use one Shipper per spool (it takes the ShipLock)."""

    def __init__(self, store: Store, config: Config, *, client: StatHatClient | None = None,
                 shutdown: threading.Event | None = None, wake: threading.Event | None = None,
                 sleep: Callable[[float], object] | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self.config = config
        self.client = client or StatHatClient(config.endpoint, timeout=config.timeout,
                                              allow_insecure=config.allow_insecure)
        self.shutdown = shutdown or threading.Event()
        self.wake = wake or threading.Event()  # set by in-process producers (and on shutdown)
        self.sleep = sleep or self.shutdown.wait  # back-off waits end early on shutdown
        self.clock = clock
        self.monotonic = monotonic
        self.stats = ShipStats()
        self.rng = random.Random()
        self._next_request = float("-inf")
        self._lock = ShipLock(store.path)
        self._last_meta = float("-inf")
        self._last_housekeeping = float("-inf")
        self._last_prune = float("-inf")

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> Shipper:
        self._lock.acquire()
        # Leases whose owner is proven dead go back to pending. Holding the lock, we also know that a lease an
        # older release left without an owner belongs to a shipper that is gone.
        self.store.sweep_stages()
        freed = self.store.release_dead_leases(unowned_before=float("inf"))
        if freed:
            log.warning("returned %d records leased by a shipper that died to pending", freed)
        return self

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        self.client.close()

    def stop(self) -> None:
        self.shutdown.set()
        self.wake.set()

    # -- one batch -------------------------------------------------------------------------------------

    def ship_batch(self) -> int:
        """Lease one batch and settle it (sent or dead); return how many records were settled.

        On a transient failure or shutdown the lease is dropped, so what was not settled is pending again, and
        the error propagates. Returns 0 when nothing deliverable is pending.
        """
        if self.shutdown.is_set():
            return 0
        lease = self.store.lease(self.config.batch_size, now=self.clock(), keyed_only=self.config.ezkey is None)
        if lease is None:
            return 0
        batch = _Batch(self, lease)
        groups: dict[tuple[str, bool], list[Leased]] = {}
        classic: list[Leased] = []
        for item in lease.items:
            if item.record.stat is None:
                classic.append(item)
            else:
                own = item.record.ezkey is not None
                groups.setdefault((item.record.ezkey or self.config.ezkey or "", own), []).append(item)
        try:
            for (ezkey, own_key), group in groups.items():
                if self.shutdown.is_set():
                    break
                self._send_ez(batch, ezkey, group, own_key=own_key)
            for item in classic:
                if self.shutdown.is_set():
                    break
                self._send_classic(batch, item)
        finally:
            if batch.unsettled:  # failure or shutdown: what is left is pending again
                self.store.end_lease(lease.id)
        self._note(result="ok", error=None)
        return len(lease.items) - batch.unsettled

    def _pace(self) -> None:
        """Keep to max_requests_per_second, so a long backlog drains without flooding the receiver."""
        rate = self.config.max_requests_per_second
        if not rate:
            return
        now = self.monotonic()
        if self._next_request > now:
            self.stats.paced += self._next_request - now
            self.sleep(self._next_request - now)
            now = self._next_request
        self._next_request = now + 1.0 / rate

    def _send_ez(self, batch: _Batch, ezkey: str, group: Sequence[Leased], *, own_key: bool) -> None:
        """Send one EZ batch; on refusal bisect it so only the records the receiver refuses die."""
        self._pace()
        self.stats.requests += 1
        try:
            self.client.send_ez(ezkey, [item.record for item in group])
        except Refused as refusal:
            if refusal.names_key and not own_key:
                raise EndpointError(f"the receiver refused the configured ezkey ({refusal}); "
                                    "records stay pending until the key is fixed") from None
            if refusal.names_key or len(group) == 1:  # a record's own bad key condemns its whole group
                batch.kill(group, refusal)
                return
            middle = len(group) // 2
            self._send_ez(batch, ezkey, group[:middle], own_key=own_key)
            self._send_ez(batch, ezkey, group[middle:], own_key=own_key)
            return
        batch.ack(group)

    def _send_classic(self, batch: _Batch, item: Leased) -> None:
        self._pace()
        self.stats.requests += 1
        try:
            self.client.send_classic(item.record)
        except Refused as refusal:
            batch.kill([item], refusal)
            return
        batch.ack([item])

    def settle(self, write: Callable[[], object]) -> None:
        """Commit what the receiver answered, retrying until it commits: this is the write never given up.

        A delivered batch whose acknowledgement is lost is sent again, so a busy or full spool is waited out
        (with back-off, loudly) rather than abandoned. Only SETTLE_GRACE after a shutdown request is it given
        up, and then the records of that lease are the ones that may be sent twice.
        """
        tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StoreError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=SETTLE_BACKOFF_MAX),
            stop=stop_after_shutdown(self.shutdown, SETTLE_GRACE, self.monotonic),
            sleep=time.sleep,  # not the shutdown-aware sleep: this wait must not be cut short
            before_sleep=lambda state: log.warning(
                "cannot record the receiver's answer yet: %s; retrying in %.1f s",
                state.outcome.exception() if state.outcome else None, state.upcoming_sleep),
            reraise=True,
        )(write)

    # -- retrying --------------------------------------------------------------------------------------

    def _retrying(self, deadline: float | None) -> tenacity.Retrying:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type((TransientError, EndpointError, StoreError)),
            wait=wait_retry_after(wait_random_exponential(multiplier=self.config.backoff_initial,
                                                          max=self.config.backoff_max),
                                  cap=self.config.retry_after_max),
            stop=stop_when_event_set(self.shutdown) | stop_at_deadline(deadline, self.monotonic),
            sleep=self.sleep,
            before_sleep=self._before_sleep,
            reraise=True,
        )

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        error = retry_state.outcome.exception() if retry_state.outcome else None
        self.stats.retries += 1
        paused = isinstance(error, EndpointError)
        self._note(result="paused" if paused else "retrying", error=str(error), force=True)
        level = logging.ERROR if paused else logging.WARNING
        log.log(level, "%s: %s; retrying in %.1f s", "shipping paused" if paused else "send failed",
                error, retry_state.upcoming_sleep)

    def _note(self, *, result: str, error: str | None, force: bool = False) -> None:
        """Record the last attempt in the spool (for `spool status`), at most once a second on success."""
        self.stats.last_error = error if error else self.stats.last_error
        now = self.monotonic()
        if not force and now - self._last_meta < META_THROTTLE:
            return
        self._last_meta = now
        facts: dict[str, object] = {"last_attempt_at": self.clock(), "last_result": result, "last_error": error}
        if result == "ok":
            facts["last_success_at"] = self.clock()
        try:
            self.store.set_meta(**facts)
        except StoreError as exc:  # status bookkeeping must never stop delivery
            log.warning("cannot record shipping status: %s", exc)

    # -- draining --------------------------------------------------------------------------------------

    def drain(self, *, max_time: float | None = None) -> DrainResult:
        """Ship until nothing deliverable is pending, shutdown is asked, or `max_time` seconds pass."""
        deadline = None if max_time is None else self.monotonic() + max_time
        while not self.shutdown.is_set():
            if deadline is not None and self.monotonic() >= deadline:
                return DrainResult(False, f"stopped after {max_time:g} s")
            try:
                settled = self._retrying(deadline)(self.ship_batch)
            except (ShipError, StoreError) as exc:
                return DrainResult(False, str(exc))
            if self.shutdown.is_set():
                break  # a batch cut short by shutdown also settles 0: that is not "done"
            if settled == 0:
                return DrainResult(True)
        return DrainResult(False, "shutting down")

    def run(self) -> None:
        """Drain, then wait for new records (woken by producers or by commits seen in the spool), until shutdown."""
        seen = self.store.data_version()
        jitter = self.rng.uniform(0, self.config.reconnect_jitter)
        if jitter and self.store.backlog()[0]:  # a fleet powering up together must not arrive together
            log.info("waiting %.1f s (jitter) before draining the backlog", jitter)
            self.sleep(jitter)
        while not self.shutdown.is_set():
            self.housekeeping()
            result = self.drain()
            if not result.done and not self.shutdown.is_set():
                log.error("shipping stopped: %s", result.reason)
            while not self.shutdown.is_set():
                self.wake.wait(self.config.idle_poll)
                self.wake.clear()
                version = self.store.data_version()
                if version != seen:
                    seen = version
                    break
                if self.monotonic() - self._last_housekeeping >= HOUSEKEEPING_INTERVAL:
                    break

    def _restamp_held(self) -> None:
        from spool.clock import boot_clock, boot_id
        from spool.records import CLOCK_SANE_AFTER

        wall = self.clock()
        if wall < CLOCK_SANE_AFTER:
            return
        restamped, lost = self.store.restamp_held(wall=wall, mono=boot_clock(), boot=boot_id())
        if restamped:
            log.info("the clock is sane: re-stamped %d records held while it was not", restamped)
        if lost:
            log.warning("%d records held in an earlier boot cannot be placed in time; moved to dead letters", lost)

    def housekeeping(self) -> None:
        """Free leases older than the lease timeout; hourly, prune sent records past retention."""
        now = self.monotonic()
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL:
            return
        self._last_housekeeping = now
        try:
            freed = self.store.release_dead_leases(unowned_before=self.clock() - self.config.lease_timeout)
            self.store.sweep_stages()
            self._restamp_held()
            if self.config.compact_counts:
                saved = self.store.compact_counts(bucket=self.config.compact_counts)
                if saved:
                    log.info("compacted the backlog: %d count records merged away", saved)
            expired = self.store.drop_expired(now=self.clock())
            if expired:
                log.warning("dropped %d pending records older than max_age", expired)
            pruned = 0
            if now - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = now
                pruned = self.store.prune_sent(sent_before=self.clock() - self.config.retention)
        except StoreError as exc:
            log.warning("housekeeping failed: %s", exc)
            return
        if pruned:
            log.info("pruned %d sent records older than the retention period", pruned)
        if freed:
            log.warning("returned %d records of stale leases to pending", freed)


class _Batch:
    """The records of one lease still to settle; the commit that settles the last of them ends the lease."""

    def __init__(self, shipper: Shipper, lease: Lease):
        self.shipper = shipper
        self.lease = lease
        self.unsettled = len(lease.items)

    def ack(self, group: Sequence[Leased]) -> None:
        last = self.unsettled == len(group)
        ids = [item.id for item in group]
        self.shipper.settle(lambda: self.shipper.store.ack(ids, now=self.shipper.clock(),
                                                           lease=self.lease.id if last else None))
        self.unsettled -= len(group)
        self.shipper.stats.sent += len(group)

    def kill(self, group: Sequence[Leased], refusal: Refused) -> None:
        ids = [item.id for item in group]
        self.shipper.settle(lambda: self.shipper.store.mark_dead(
            ids, reason=str(refusal), http_status=refusal.http_status, body=refusal.body, now=self.shipper.clock()))
        self.unsettled -= len(group)
        if self.unsettled == 0:
            self.shipper.settle(lambda: self.shipper.store.end_lease(self.lease.id))
        self.shipper.stats.dead += len(group)
        log.warning("receiver refused %d record(s): %s; moved to dead letters", len(group), refusal)
