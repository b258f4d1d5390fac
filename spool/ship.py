"""The drain: lease batches, keep several requests in flight, settle each answer, isolate refused records.

The shipper's thread owns the spool connection and decides; a small pool of sender threads only speaks HTTP.
Every request is one *unit*: the records of one lease that share a key (an EZ JSON batch), or one classic
record. What comes back settles the unit:

* accepted: its records are SENT (the acknowledgement is the one write never given up, see `settle`);
* refused, one record (or a record's own key refused, or the receiver took part of a batch): DEAD, with the
  receiver's answer;
* refused, several records: the unit is split in two *suspect groups*, marked in the spool, and each is sent
  on its own later. Clean records keep flowing in full batches meanwhile;
* transient (network, 5xx, 429, timeout): the same unit is sent again, on the same lease, after a back-off
  shared by the whole link; nothing settled is redone. Before every (re)send, records that passed max_age
  meanwhile are taken out (dropped, counted);
* the configured key refused (or unreadable): the records sent with it are given back, pending, and wait
  until it is fixed (its file is looked at every KEY_RECHECK seconds); records with their own key and
  classic records go on.

So progress is guaranteed: every refusal either settles a record or replaces a group by two smaller ones,
and no schedule of transient failures undoes what was settled. Every record ends SENT or DEAD (with a
reason), unless a bound the operator configured drops it first.

How many requests are in flight adapts to the link (AIMD, as Vector's adaptive request concurrency): one
more per round trip while answers come back fast and clean, half as many after a timeout, a reset, a 429 or
a 503, never more than `max_in_flight`, and never faster than `max_requests_per_second`.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import functools
import logging
import operator
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import tenacity
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from spool.config import DEFAULT_ENDPOINT, Config, ShipSettings, check_endpoint
from spool.errors import ConfigError, EndpointError, PartlyTaken, Refused, StoreError, TransientError
from spool.health import LossLog, lasted
from spool.lock import ShipLock, spool_identity
from spool.stathat import StatHatClient
from spool.store import Lease, Leased, Store

log = logging.getLogger("spool.ship")
_T = TypeVar("_T")
_ID, _STAT, _EZKEY = operator.itemgetter(0), operator.itemgetter(1), operator.itemgetter(4)  # fields of a Leased

META_THROTTLE = 1.0  # seconds between writes of an unchanged failure note
HOUSEKEEPING_INTERVAL = 60.0  # seconds between looks for dead owners' leases, held records, expired records
PRUNE_INTERVAL = 3600.0  # seconds between prunes of sent records (retention is days; a prune reads what it deletes)
HOUSEKEEPING_GAP = 0.025  # seconds at least the write lock is left free between two housekeeping transactions
SETTLE_BACKOFF_MAX = 5.0  # seconds between attempts to record an answer in a busy or full spool
SETTLE_GRACE = 10.0  # seconds an answer is still retried after shutdown was asked
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # seconds: a histogram of answer times
ANSWER_POLL = 0.5  # seconds the drain waits for an answer before looking at shutdown and the deadline again
KEY_RECHECK = 5.0  # seconds between looks at the key file while the configured key cannot be used
FOREIGN_PAUSE = 3  # answers in a row certainly not StatHat's (a web page, a 501) that pause shipping
# Adaptive pacing (docs/design.md, "Pacing"): the law and its parameters.
PACE_START = 2.0  # requests/s: where the rate starts (at start-up, and again when the link comes back)
PACE_SLOW_START = 2.0  # until the first overload the rate doubles with every clean answer (as TCP's window does)
PACE_BETA = 0.5  # on overload the rate is cut to this share of what the receiver took
PACE_CUBIC = 0.4  # requests/s per s^3: how fast the rate grows back along the cubic curve (AWS's scale constant)
PACE_STEP = 3.0  # a clean answer at most multiplies the rate by this
PACE_WINDOW = 2.0  # seconds: what the receiver took is counted over this, or over 4 intervals if longer
PACE_FLOOR = 0.1  # requests/s: the slowest the drain is ever paced (one request every 10 s)
SPREAD_PER_REQUEST = 0.3  # seconds of spread per request of backlog (reconnect_jitter at most)
RECOVERY_RUN = 3  # back-off steps in a row with no answer from the receiver: their end is a recovery


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
    expired: int = 0  # pending records dropped because their t was older than max_age
    requests: int = 0
    retries: int = 0
    splits: int = 0  # refused batches split to find the refused records
    paced: float = 0.0  # seconds spent keeping to max_requests_per_second
    in_flight: int = 0  # requests under way now
    limit: int = 1  # requests the link is trusted with at once now
    last_error: str | None = None
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)  # answers by kind
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def answered(self, outcome: str, seconds: float) -> None:
        """Count one answer (ok, refused, transient, endpoint) and how long it took."""
        self.outcomes[outcome] += 1
        self.latency_sum += seconds
        self.latency_buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1


@dataclass(frozen=True)
class DrainResult:
    done: bool  # nothing deliverable is left
    reason: str | None = None  # why not, when not done
    operator: bool = False  # what stops it only an operator can fix (the configured key, the endpoint), not waiting


@dataclass
class _Unit:
    """One request's worth of a lease: records sharing a key, or one classic record.

    A unit of a built lease (see Lease) carries its request's `data` as SQLite built it and the span of ids it
    holds; its records are read (`load`, in the shipper's thread) only when something needs them one by one: a
    refusal to split, records past max_age.
    """

    lease: int
    loaded: list[Leased] | None  # the records, or None while only `data` and `span` stand for them
    ezkey: str | None  # None: a classic record
    own_key: bool = False  # the records carry their own key (a refusal of it is theirs, not the config's)
    sent_at: float = float("-inf")  # monotonic: when it was last sent
    data: str | None = None  # the EZ `data` array, built by SQLite (only while `loaded` is None)
    span: tuple[int, int] = (0, -1)
    min_t: int = 0
    load: Callable[[tuple[int, int]], list[Leased]] | None = None

    @property
    def items(self) -> list[Leased]:
        if self.loaded is None:
            assert self.load is not None
            self.loaded, self.data = self.load(self.span), None
        return self.loaded

    @items.setter
    def items(self, items: list[Leased]) -> None:
        self.loaded, self.data = items, None

    @property
    def size(self) -> int:
        return self.span[1] - self.span[0] + 1 if self.loaded is None else len(self.loaded)

    @property
    def ids(self) -> Sequence[int]:
        return range(self.span[0], self.span[1] + 1) if self.loaded is None else list(map(_ID, self.loaded))


@dataclass
class _KeyPause:
    """Why the records sent with the configured key wait, and when a refused key is tried again."""

    reason: str
    key: str | None  # the key the receiver refused; None: the key could not be read
    probe_at: float = float("inf")  # monotonic: the refused key is tried again then (an account may take it again)


@dataclass
class _Trouble:
    """Shipping's current problem, from when it began until shipping recovers: noted in the spool's meta as
    `problem` (what `spool status`, /healthz and the summary show: spool.health), logged when it ends."""

    kind: str  # "key" (the configured key unusable or refused), "endpoint" (misconfigured), "link" (transient)
    text: str
    since: float  # wall clock: when it began (kept across restarts and reloads while it lasts)
    sent: int  # records this shipper had delivered then (for "N records delivered since")

    def noted(self) -> dict[str, object]:
        return {"kind": self.kind, "text": self.text, "since": self.since}


@dataclass(frozen=True)
class Handover:
    """What a shipper replaced by a reload hands to the next: start-up is over, the link's back-off, a key pause."""

    endpoint: str
    not_before: float  # monotonic: no request before this (a back-off, a Retry-After, the start-up jitter)
    failures: int  # consecutive failures of the link: the back-off goes on growing from there
    pause: _KeyPause | None  # the configured key was unusable: held while the key read is the one refused
    pace: Pace | None = None  # the request rate learnt: a reload does not start gently again


@dataclass
class _Answer:
    unit: _Unit
    error: Exception | None  # None: accepted
    seconds: float


class AdaptiveLimit:
    """How many requests to keep in flight: additive increase while the link is clean, halve on trouble."""

    def __init__(self, maximum: int, monotonic: Callable[[], float] = time.monotonic):
        self.maximum = max(1, maximum)
        self.monotonic = monotonic
        self._limit = 1.0
        self._fastest = float("inf")
        self._last_cut = float("-inf")

    @property
    def value(self) -> int:
        return int(self._limit)

    def success(self, seconds: float) -> None:
        """A clean answer: one more request in flight per round trip, unless answers are getting slower."""
        self._fastest = min(self._fastest, seconds)
        if seconds <= 2 * self._fastest + 0.05:  # slower than that: a queue is building at the receiver
            self._limit = min(self.maximum, self._limit + 1 / self._limit)

    def trouble(self) -> None:
        """A timeout, reset, 429 or 503: half as many, at most once per round trip (one event, one cut)."""
        now = self.monotonic()
        if now - self._last_cut >= min(self._fastest, 1.0):
            self._limit = max(1.0, self._limit / 2)
            self._last_cut = now


_OVERLOAD_WORDS = {"503": "503s from the receiver", "429": "429s from the receiver",
                   "timeout": "answers timing out"}


class AdaptivePace:
    """The drain's request rate: a gentle start multiplied with every clean answer (as TCP's slow start), then
    CUBIC as the AWS SDKs' adaptive retry mode runs it: on overload, a cut to PACE_BETA of the rate the receiver
    took, then growth back along a cubic curve of the time since the cut, flat near the rate cut from and
    faster beyond it. Never above `ceiling`, never below PACE_FLOOR.

    Deterministic: time is read from `monotonic`, and `rng` only spreads the request after a cut.
    """

    def __init__(self, ceiling: float, monotonic: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        self.ceiling = ceiling
        self.monotonic = monotonic
        self.rng = rng or random.Random()
        self.rate = min(PACE_START, ceiling)
        self.why = "starting gently"
        self._slow_start = True
        self._peak = 0.0  # the rate cut from (CUBIC's W_max)
        self._cut_at = float("-inf")
        self._sent_at = float("-inf")  # the last request went then
        self._hold = float("-inf")  # no request before this (after a cut, a Retry-After)
        self._taken: collections.deque[float] = collections.deque()  # when the receiver took requests, recently
        self._settle_why()

    def ready_at(self) -> float:
        """When the next request may go (monotonic)."""
        return max(self._sent_at + 1.0 / self.rate, self._hold)

    def sent(self) -> None:
        self._sent_at = self.monotonic()

    def answered(self) -> None:
        """A clean answer (the receiver took what was sent, or refused it for what it is): grow."""
        now = self.monotonic()
        self._taken.append(now)
        if self._slow_start:
            self.rate = min(self.ceiling, self.rate * PACE_SLOW_START)
        else:
            k = (self._peak * (1 - PACE_BETA) / PACE_CUBIC) ** (1 / 3)  # when the curve is back at the peak
            curve = self._peak + PACE_CUBIC * (now - self._cut_at - k) ** 3
            self.rate = max(min(PACE_FLOOR, self.ceiling), min(self.ceiling, curve, self.rate * PACE_STEP))
        self._settle_why()

    def overloaded(self, kind: str, *, sent_at: float, retry_after: float | None = None) -> None:
        """An answer that says the receiver is overloaded (`kind`: "503", "429", "timeout"): cut the rate to
        PACE_BETA of what the receiver took over the last PACE_WINDOW seconds, once per event (answers to
        requests sent before the last cut are that cut's); the next request goes one interval at the new rate later,
        give or take half of one at random."""
        now = self.monotonic()
        if sent_at >= self._cut_at:
            window = max(PACE_WINDOW, 4 / self.rate)  # a slow pace needs a longer look to see what was taken
            while self._taken and self._taken[0] <= now - window:
                self._taken.popleft()
            # Nothing taken yet says nothing of the receiver's room: then the rate itself is cut.
            taken = len(self._taken) / window if self._taken else self.rate
            floor = min(PACE_FLOOR, self.ceiling)
            self._peak = max(floor, min(self.rate, taken))
            self.rate = max(floor, self._peak * PACE_BETA)
            self._cut_at = now
            self._slow_start = False
            # The next request one interval at the new rate from now, give or take half of one: agents cut by one
            # burst of refusals must not come back in the same instant (nor again after every later cut).
            self._sent_at = now - 1 / self.rate
            self._hold = max(self._hold, now + self.rng.uniform(0.5, 1.5) / self.rate)
            self.why = _OVERLOAD_WORDS.get(kind, kind)
        if retry_after is not None:
            self._hold = max(self._hold, now + retry_after)
            self.why = f"Retry-After: the receiver asked for a pause of {retry_after:g} s"

    def holding(self) -> bool:
        """Whether the next request waits for the receiver (after a cut, a Retry-After), not for the pace."""
        return self.monotonic() < self._hold

    def restart(self) -> None:
        """Start gently again (the link came back after failing): the rate learnt before may be stale."""
        self.rate = min(PACE_START, self.ceiling)
        self._slow_start, self._peak, self._cut_at = True, 0.0, float("-inf")
        self._taken.clear()
        self.why = "starting gently again: the link came back"

    def adopted(self, new: AdaptivePace) -> AdaptivePace:
        """Go on in the shipper that replaces this one (a reload): its clock, its randomness, its ceiling."""
        self.monotonic, self.rng, self.ceiling = new.monotonic, new.rng, new.ceiling
        self.rate = min(self.rate, self.ceiling)
        self._settle_why()
        return self

    def _settle_why(self) -> None:
        if self.rate >= self.ceiling:
            self.why = "at max_requests_per_second"
        elif self._slow_start:
            self.why = self.why if self.why.startswith("starting gently") else "starting gently"
        elif self.rate >= self._peak:
            self.why = "growing while answers are clean"


class FixedPace:
    """`pacing = "fixed"`: max_requests_per_second, always."""

    def __init__(self, ceiling: float, monotonic: Callable[[], float] = time.monotonic):
        self.ceiling = self.rate = ceiling
        self.monotonic = monotonic
        self.why = "fixed at max_requests_per_second (pacing = fixed)"
        self._sent_at = float("-inf")

    def ready_at(self) -> float:
        return self._sent_at + 1.0 / self.rate

    def sent(self) -> None:
        self._sent_at = self.monotonic()

    def answered(self) -> None:
        pass

    def overloaded(self, kind: str, *, sent_at: float, retry_after: float | None = None) -> None:
        pass  # the link's back-off answers overload

    def holding(self) -> bool:
        return False


Pace = AdaptivePace | FixedPace


class Shipper:
    """Drain a spool into a StatHat endpoint. Use one Shipper per spool (it takes the ShipLock)."""

    def __init__(self, store: Store, config: Config, *,
                 client_factory: Callable[[], StatHatClient] | None = None,
                 shutdown: threading.Event | None = None, wake: threading.Event | None = None,
                 hurry: threading.Event | None = None, idle: threading.Event | None = None,
                 sleep: Callable[[float], object] | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic, handover: Handover | None = None,
                 between_housekeeping: Callable[[], object] | None = None):
        """`between_housekeeping` is called between the transactions of housekeeping's long jobs (compaction,
        pruning, giving space back); by default it leaves the write lock free a while (`Gap`). Tests pause them
        there instead."""
        self.store = store
        self.config = config
        self.endpoint = check_endpoint(config.ship.endpoint, allow_insecure=config.ship.allow_insecure)
        identity = spool_identity(store.path)  # a relay of this same spool refuses us, and we know its answer
        self.client_factory = client_factory or (lambda: StatHatClient(
            config.ship.endpoint, timeout=config.ship.timeout, allow_insecure=config.ship.allow_insecure,
            identity=identity))
        self.ezkey: str | None = None  # the configured key, read when a drain starts (a key file may be fixed)
        self._pause: _KeyPause | None = None  # the configured key cannot be used: its records wait (see _read_key)
        self._key_seen: tuple[int, ...] | None = None  # the key file's identity when it was last read
        self._next_key_look = float("-inf")
        self.shutdown = shutdown or threading.Event()
        # Set when the process stops, not when only this shipper does (a reload): the answers in flight are then
        # awaited ship.stop_wait at most. Without it, stopping this shipper is stopping the process.
        self.hurry = hurry or self.shutdown
        self.wake = wake or threading.Event()  # set by in-process producers (and on shutdown)
        # Set when this shipper first has nothing to move (its drain ended, or it waits out a failing link): the
        # agent's background integrity check waits for it (spool.checkup).
        self.idle = idle or threading.Event()
        self.sleep = sleep or self.shutdown.wait  # back-off waits end early on shutdown
        self.clock = clock
        self.monotonic = monotonic
        self.stats = ShipStats()
        self._stats_lock = threading.Lock()  # the drain updates, /metrics reads (snapshot)
        self.rng = random.Random()
        self.limit = AdaptiveLimit(config.ship.max_in_flight, monotonic)
        self._backoff = wait_retry_after(wait_random_exponential(multiplier=config.ship.backoff_initial,
                                                                 max=config.ship.backoff_max),
                                         cap=config.ship.retry_after_max)
        self.pace = _make_pace(config, monotonic, self.rng)
        self._outage = 0  # back-off steps in a row with no answer from the receiver (see _link_back)
        # The link's back-off, kept across drains and handed to the shipper that replaces this one at a reload.
        self._resumed = handover is not None  # a reload: start-up (and its jitter) is over
        same_link = handover is not None and handover.endpoint == self.endpoint
        self._not_before = handover.not_before if handover is not None and same_link else float("-inf")
        self._failures = handover.failures if handover is not None and same_link else 0
        if handover is not None and same_link:
            self._pause = handover.pause
            if isinstance(self.pace, AdaptivePace) and isinstance(handover.pace, AdaptivePace):
                self.pace = handover.pace.adopted(self.pace)  # what it learnt, under this config's ceiling
        self._pacing_noted: tuple[float, str, float] = (0.0, "", float("-inf"))  # rate, why, when (see _pacing_note)
        self._stopped: str | None = None  # why the last drain stopped, as logged
        self._lock = ShipLock(store.path)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._clients: list[StatHatClient] = []
        self._clients_lock = threading.Lock()
        self._senders: list[int] = []  # the sender threads' native ids (see _one_cpu)
        self._losses = LossLog(log, self.monotonic, last=", the last")  # records dropped or refused, said
        self._answers: queue.SimpleQueue[_Answer] = queue.SimpleQueue()
        self._last_note: tuple[str, str | None, float] = ("", None, float("-inf"))
        self._unwritten: dict[str, object] | None = None  # the last success note not yet recorded (see _note_ok)
        self._trouble: _Trouble | None = None  # the current problem (taken over from the spool's meta at start)
        self._last_housekeeping = float("-inf")
        self._last_prune = float("-inf")
        self._between_housekeeping = between_housekeeping
        self._foreign = 0  # answers in a row that were certainly not StatHat's (see _foreign_answer)
        self._foreign_quoted = False  # the first of them was quoted in the log
        self._foreign_reason = ""  # why shipping paused for them
        self._paused_said: str | None = None  # the pause last logged (said once, not at every probe)

    # -- lifecycle -----------------------------------------------------------------------------------

    def __enter__(self) -> Shipper:
        self._lock.acquire()
        # Leases whose owner is proven dead go back to pending. Holding the lock, we also know that a lease an
        # older release left without an owner belongs to a shipper that is gone.
        self.store.sweep_stages()
        freed = self.store.release_dead_leases(unowned_before=float("inf"))
        if freed:
            log.warning("returned %d records leased by a shipper that died to pending", freed)
        self._trouble = _adopted(self.store)  # what the last shipper left unsolved: until this one solves it
        self._pool = concurrent.futures.ThreadPoolExecutor(self.config.ship.max_in_flight, "spool-sender",
                                                           initializer=self._sender_started)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._clients_lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
        self._lock.release()

    def stop(self) -> None:
        self.shutdown.set()
        self.wake.set()

    def handover(self) -> Handover:
        """What the shipper replacing this one (a reload) must know: the link's back-off (see Handover)."""
        return Handover(self.endpoint, self._not_before, self._failures, self._pause, self.pace)

    def snapshot(self) -> dict[str, Any]:
        """What this shipper has done, for /metrics and the summary: copied under its lock."""
        with self._stats_lock:
            stats = self.stats
            return {"sent": stats.sent, "dead": stats.dead, "expired": stats.expired, "retries": stats.retries,
                    "requests": stats.requests,
                    "in_flight": stats.in_flight, "limit": self.limit.value, "outcomes": dict(stats.outcomes),
                    "latency_bounds": LATENCY_BUCKETS, "latency_buckets": list(stats.latency_buckets),
                    "latency_sum": stats.latency_sum,
                    "last_error": stats.last_error,
                    "paced_rate": self.pace.rate if self.pace else 0.0,
                    "pacing": self.pace.why if self.pace else "not paced (max_requests_per_second = 0)"}

    # -- sending (sender threads: HTTP only, no spool) -------------------------------------------------

    def _sender_started(self) -> None:
        with self._clients_lock:
            self._senders.append(threading.get_native_id())

    def _one_cpu(self) -> Callable[[], None]:
        """Keep this thread and the sender threads on one CPU while this drain runs (ship.one_cpu, Linux), the one
        this thread runs on now; return what gives this thread its CPUs back (senders made meanwhile keep it).

        They run one at a time (Python's GIL), so one core loses them nothing; spread over cores, every hand-over
        of the GIL woke a thread on another core: a drain on loopback spent about a fifth of its CPU so (twice
        the context switches), and shipped a third fewer records a second (docs/benchmarks.md). Taken again at
        every drain, where the kernel has this thread then: a long-lived agent follows the box's load."""
        if not self.config.ship.one_cpu or not hasattr(os, "sched_setaffinity"):
            return _nothing
        try:
            allowed = os.sched_getaffinity(0)
            cpu = _current_cpu()
            if len(allowed) < 2:
                return _nothing
            cpu = cpu if cpu in allowed else min(allowed)
            os.sched_setaffinity(0, {cpu})
        except OSError as exc:
            log.debug("the drain's threads are left where the kernel puts them: %s", exc)
            return _nothing
        with self._clients_lock:
            senders = list(self._senders)
        for sender in senders:
            try:
                os.sched_setaffinity(sender, {cpu})
            except OSError:  # gone, or not allowed there: the kernel places it
                pass

        def undo() -> None:
            try:
                os.sched_setaffinity(0, allowed)
            except OSError as exc:
                log.debug("cannot give the drain's thread its CPUs back: %s", exc)

        return undo

    def _client(self) -> StatHatClient:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self.client_factory()
            with self._clients_lock:
                self._clients.append(client)
        return client

    def _send(self, unit: _Unit) -> None:
        started = time.monotonic()
        try:
            if unit.ezkey is None:
                self._client().send_classic(unit.items[0].record)
            elif unit.data is not None:
                self._client().send_ez_data(unit.ezkey, unit.data, unit.size)
            else:
                self._client().send_ez(unit.ezkey, unit.items)
            error: Exception | None = None
        except (Refused, TransientError, EndpointError) as exc:
            error = exc
        except Exception as exc:  # a bug must not lose the unit: it is retried like a transient failure
            log.exception("sending failed unexpectedly")
            error = TransientError(f"unexpected {type(exc).__name__}: {exc}")
        self._answers.put(_Answer(unit, error, time.monotonic() - started))

    # -- the drain (the shipper's thread: the spool and every decision) ---------------------------------

    def drain(self, *, max_time: float | None = None, fail_fast: bool = False,
              on_progress: Callable[[int], object] | None = None) -> DrainResult:
        """Ship until nothing deliverable is pending, shutdown is asked, or `max_time` seconds pass.

        `fail_fast` (for `ship --once`): a misconfiguration that waiting cannot fix (a 404 from the endpoint,
        TLS against plain http, an unresolvable host before anything was delivered) ends the drain at once.
        `on_progress` is called with the number of records settled by each answer.
        """
        if self._pool is None:
            raise RuntimeError("use the Shipper as a context manager: `with Shipper(...) as shipper:`")
        deadline = None if max_time is None else self.monotonic() + max_time
        self._read_key()  # unusable, it holds back only the records sent with it
        try:
            self.restamp_held()  # every way of shipping (the agent, ship --once from cron) places held records
        except StoreError as exc:
            log.warning("cannot re-stamp held records: %s", exc)
        try:
            self.drop_expired()  # and drops, counted, what max_age says will never be shipped (leasing skips it)
        except StoreError as exc:
            log.warning("cannot drop records older than max_age: %s", exc)
        waiting: collections.deque[_Unit] = collections.deque()  # units ready to send, retries first
        unsettled: dict[int, int] = {}  # lease -> records not yet settled
        state = _DrainState(deadline, gate=max(0.0, self._not_before), failures=self._failures)
        undo_one_cpu = self._one_cpu()
        try:
            while True:
                if self.shutdown.is_set():
                    return state.stopped("shutting down")
                if deadline is not None and self.monotonic() >= deadline:
                    return state.stopped(f"stopped after {max_time:g} s", self._pause)
                if state.failed is not None and fail_fast:
                    return state.stopped(state.failed)
                patience = self._dispatch(waiting, unsettled, state)
                if self.stats.in_flight == 0 and not waiting and state.blocked:
                    self.sleep(max(0.0, state.gate - self.monotonic()))  # then lease again
                    continue
                if self.stats.in_flight == 0 and not waiting:
                    if state.failed is None and self._pause is not None:
                        return DrainResult(False, self._pause.reason, operator=True)  # noted when it began
                    if state.failed is None:
                        self._recovered(write=True)  # nothing deliverable is left: nothing is wrong (a fixed key)
                        return DrainResult(True)
                    return state.stopped(state.failed)
                if self.stats.in_flight == 0:
                    continue  # the dispatch stopped for shutdown or the deadline: seen at the top
                try:
                    answers = [self._answers.get(timeout=patience)]
                except queue.Empty:
                    continue
                while True:  # every answer that is here already: acceptances in a row share one commit
                    try:
                        answers.append(self._answers.get_nowait())
                    except queue.Empty:
                        break
                for i, run in enumerate(_runs_of_answers(answers)):
                    if i:  # the slots freed so far are refilled before the next answer is looked at, as ever
                        self._dispatch(waiting, unsettled, state)
                    self._settle_answers(run, waiting, unsettled, state, on_progress)
        finally:
            try:
                self._finish(waiting, unsettled)
            finally:
                undo_one_cpu()

    def _dispatch(self, waiting: collections.deque[_Unit], unsettled: dict[int, int], state: _DrainState) -> float:
        """Send units while the link's limit allows and the gate (back-off) and pacing let us.

        Returns how long to wait for answers before trying again (pacing or the back-off holds a unit back).
        """
        assert self._pool is not None
        self.stats.limit = self.limit.value
        if self._pause is not None and self._key_file_changed():  # looked at while the link backs off too
            self._read_key()
        while self.stats.in_flight < self.limit.value:
            if self.shutdown.is_set() or (state.deadline is not None and self.monotonic() >= state.deadline):
                return ANSWER_POLL
            if not waiting and not self._lease_more(waiting, unsettled, state):
                return ANSWER_POLL
            now = self.monotonic()
            pace = self.pace.ready_at() if self.pace is not None else 0.0
            wait = max(state.gate, pace) - now
            if wait > 0:
                if self.stats.in_flight:
                    return min(wait, ANSWER_POLL)  # wait for answers meanwhile, then look again
                if state.deadline is not None:
                    wait = min(wait, state.deadline - now)
                if pace > state.gate and not (self.pace is not None and self.pace.holding()):  # pacing holds us
                    self.stats.paced += wait
                else:  # a failing link is waited out: nothing moves meanwhile
                    self.idle.set()
                self.sleep(wait)
                continue
            unit = waiting.popleft()
            if unit.ezkey is not None and not unit.own_key and self._key_held():
                self._give_back(unit, unsettled)  # the configured key is refused: its records wait, unleased
                continue
            if not self._unexpired(unit, unsettled):
                continue
            if self.pace is not None:
                self.pace.sent()
            unit.sent_at = self.monotonic()
            with self._stats_lock:
                self.stats.requests += 1
                self.stats.in_flight += 1
            self._pool.submit(self._send, unit)
        return ANSWER_POLL

    def _lease_more(self, waiting: collections.deque[_Unit], unsettled: dict[int, int], state: _DrainState) -> bool:
        """Lease the next suspect group, or else the next clean batch, as units; False when there is none."""
        if state.failed is not None:  # paused: probe with what is already leased, lease nothing new
            return False
        if self._pause is not None and self._key_file_changed():
            self._read_key()
        keyed_only = self.ezkey is None or self._key_held()
        if keyed_only != state.keyed_only:  # what the last search knew was of records leased under the other rule
            state.keyed_only, state.after, state.no_suspects = keyed_only, None, None
        try:
            version = self.store.data_version()  # our own commits leave it as it is
            lease = (self._lease_suspects(state, keyed_only, version)
                     or self._lease_clean(state, keyed_only, version))
            self._aged_out()
        except StoreError as exc:  # a busy or full spool: like a transient failure of the link, wait and retry
            state.blocked = f"cannot lease records: {exc}"
            state.last_error = state.blocked
            state.gate = self.monotonic() + min(SETTLE_BACKOFF_MAX, 0.05 * 2 ** min(state.failures, 7))
            state.failures += 1
            log.warning("%s; retrying", state.blocked)
            return False
        state.blocked = None
        if lease is None:
            return False
        self._queue_lease(lease, waiting, unsettled)
        return True

    def _queue_lease(self, lease: Lease, waiting: collections.deque[_Unit], unsettled: dict[int, int]) -> None:
        """A new lease's units wait to be sent; all its records are unsettled."""
        unsettled[lease.id] = lease.size
        waiting.extend(self._units(lease))

    def _aged_out(self) -> None:
        """Count and say the records past max_age that leasing dropped (it walked past them)."""
        dropped, self.store.aged_out = self.store.aged_out, 0
        if dropped:
            with self._stats_lock:
                self.stats.expired += dropped
            self._losses.say("max_age", dropped, "dropped %d pending records older than max_age{}")

    def _lease_suspects(self, state: _DrainState, keyed_only: bool, version: int) -> Lease | None:
        """Lease the next suspect group, unless this drain knows there is none to lease.

        It knows when it looked and found none, split nothing since, and no other connection has committed since
        (the spool's data_version is unchanged): only a split makes suspects, and within a drain this shipper
        returns no suspect group to pending unleased. Looking takes a write transaction, once per batch.
        """
        if state.no_suspects == version:
            return None
        lease = self.store.lease_suspects(now=self.clock(), keyed_only=keyed_only)
        state.no_suspects = version if lease is None else None
        return lease

    def _lease_clean(self, state: _DrainState, keyed_only: bool, version: int | None = None) -> Lease | None:
        """Lease the next clean batch, searching after the last one this drain leased while that is exact.

        Every clean pending record up to the last one leased was leased then (in append order), and within a
        drain this shipper returns none of them to pending unleased: it settles them (sent, dead, or suspect,
        which this query never takes). Only another connection's commit (a requeue, a re-stamp, a lease given
        back) can, and that changes the spool's data_version: then, or when nothing is found after the mark,
        the search starts from the front again.
        """
        limit, now = self.config.ship.batch_size, self.clock()
        if version is None:
            version = self.store.data_version()
        if state.after is not None and version == state.after_version:
            lease = self.store.lease(limit, now=now, keyed_only=keyed_only, after=state.after, built=True)
            if lease is not None:
                state.after = lease.last_id
                return lease
        lease = self.store.lease(limit, now=now, keyed_only=keyed_only, built=True)
        state.after = None if lease is None else lease.last_id
        state.after_version = None if lease is None else lease.version
        return lease

    def _units(self, lease: Lease) -> list[_Unit]:
        if lease.data is not None:  # built by SQLite: EZ stats without keys of their own (see Lease)
            return [_Unit(lease.id, None, self.ezkey or "", data=lease.data, span=lease.span, min_t=lease.min_t,
                          load=self.store.leased_records)]
        items = lease.items
        # The common case, looked at in C: every record an EZ stat without a key of its own.
        if None not in map(_STAT, items) and operator.countOf(map(_EZKEY, items), None) == len(items):
            return [_Unit(lease.id, lease.items, self.ezkey or "")]
        groups: dict[tuple[str, bool], list[Leased]] = {}
        units = []
        for item in lease.items:
            if item.stat is None:
                units.append(_Unit(lease.id, [item], None, own_key=True))  # its key and ukey are its own
            else:
                own = item.ezkey is not None
                groups.setdefault((item.ezkey or self.ezkey or "", own), []).append(item)
        return [_Unit(lease.id, group, key, own) for (key, own), group in groups.items()] + units

    def _settle_answers(self, answers: list[_Answer], waiting: collections.deque[_Unit], unsettled: dict[int, int],
                        state: _DrainState, on_progress: Callable[[int], object] | None) -> None:
        """Settle answers in the order they came; acceptances in a row share one commit (group commit)."""
        accepted: list[_Answer] = []
        for answer in answers:
            unit, error = answer.unit, answer.error
            with self._stats_lock:
                self.stats.in_flight -= 1
                self.stats.answered("ok" if error is None else "refused" if isinstance(error, Refused) else
                                    "endpoint" if isinstance(error, EndpointError) else "transient", answer.seconds)
            if not isinstance(error, TransientError | EndpointError):  # accepted or refused: StatHat's answer
                self._stathat_again()
            if error is None:
                self.limit.success(answer.seconds)
                state.gate, state.failures, state.failed, state.delivered = 0.0, 0, None, True
                self._not_before, self._failures = float("-inf"), 0
                self._answered(state)
                if self._pause is not None and not unit.own_key and unit.ezkey == self._pause.key:
                    self._resume("the receiver took the configured ezkey again; shipping resumed")
                accepted.append(answer)
                continue
            self._acknowledge(accepted, unsettled, on_progress)  # before anything else is written
            accepted = []
            if isinstance(error, Refused):
                self._answered(state)
            if isinstance(error, Refused) and error.names_key and not unit.own_key:
                self._pause_key(f"the receiver refused the configured ezkey ({error}); records that need it stay "
                                "pending until the key is fixed", unit.ezkey)
                self._give_back(unit, unsettled)
                continue
            if isinstance(error, Refused):
                self._refused(unit, error, unsettled, state)
                if on_progress and unit.size == 1:
                    on_progress(1)
            else:
                self._failed(unit, error, waiting, state)
        self._acknowledge(accepted, unsettled, on_progress, ahead=(waiting, state))

    def _acknowledge(self, accepted: list[_Answer], unsettled: dict[int, int],
                     on_progress: Callable[[int], object] | None,
                     ahead: tuple[collections.deque[_Unit], _DrainState] | None = None) -> None:
        """Mark the records of accepted units SENT, and end the leases they complete, in one commit. With `ahead`
        (the drain's queue of units and state), the next batch is leased in that commit too when the drain would
        lease it right after (see _lease_ahead)."""
        if not accepted:
            return
        ids: list[int] = []
        ended = []
        for answer in accepted:
            ids.extend(answer.unit.ids)
            if self._settled(answer.unit, unsettled):
                ended.append(answer.unit.lease)
        note = self._pacing_note()
        if self._pause is None:  # while the configured key is held back, only its own answer ends that problem
            note.update(self._recovered(delivering=len(ids)))
        note.update(self._note_ok(write=bool(note)))
        mark = self._lease_ahead(*ahead) if ahead is not None else None
        if ahead is None or mark is None:
            self.settle(lambda: self.store.ack(ids, now=self.clock(), leases=ended, note=note or None))
        else:
            after, version = mark
            _, lease = self.settle(lambda: self.store.ack_and_lease(
                ids, now=self.clock(), leases=ended, note=note or None, limit=self.config.ship.batch_size,
                after=after, version=version))
            if lease is not None:
                waiting, state = ahead
                self._queue_lease(lease, waiting, unsettled)
                state.after = lease.last_id  # the mark moves on; data_version is still the one it was read at
        self.stats.sent += len(ids)
        if on_progress:
            for answer in accepted:
                on_progress(answer.unit.size)

    def _lease_ahead(self, waiting: collections.deque[_Unit], state: _DrainState) -> tuple[int, int] | None:
        """(after, data_version) for leasing the next clean batch in the commit of an acknowledgement, when the
        drain would lease it at once anyway: a slot is free, no unit waits, nothing is wrong or stopping, keyless
        records may be sent, and what the drain knows holds while no other connection commits (no suspect group
        to lease, every clean record up to `after` leased: see _lease_clean). None: lease as ever (_lease_more)."""
        if waiting or self.stats.in_flight >= self.limit.value or self.shutdown.is_set():
            return None
        if state.failed is not None or state.blocked is not None or self._pause is not None:
            return None
        if state.deadline is not None and self.monotonic() >= state.deadline:
            return None
        if state.keyed_only or self.ezkey is None or state.after is None or state.after_version is None:
            return None
        if state.no_suspects != state.after_version:
            return None
        return state.after, state.after_version

    def _refused(self, unit: _Unit, refusal: Refused, unsettled: dict[int, int], state: _DrainState) -> None:
        ids = [item.id for item in unit.items]
        whole = len(ids) == 1 or refusal.names_key or isinstance(refusal, PartlyTaken)
        if not whole:  # somewhere in here is what the receiver refuses: isolate it, in the spool
            middle = len(ids) // 2
            last = self._settled(unit, unsettled)
            self.settle(lambda: self.store.split(unit.lease, [ids[:middle], ids[middle:]], end=last))
            state.no_suspects = None  # two groups to lease
            self.stats.splits += 1
            self._note("refused", str(refusal))
            log.info("receiver refused a batch of %d records (%s); splitting it to find which", len(ids), refusal)
            return
        last = self._settled(unit, unsettled)
        self.settle(lambda: self.store.mark_dead(ids, reason=str(refusal), http_status=refusal.http_status,
                                                  body=refusal.body, now=self.clock()))
        if last:
            self.settle(lambda: self.store.end_lease(unit.lease))
        self.stats.dead += len(ids)
        self._note("refused", str(refusal))
        self._losses.say("refused", len(ids), "receiver refused %d record(s){}: %s; moved to dead letters", refusal,
                       extra={"error_kind": "refused", "http_status": refusal.http_status})

    def _failed(self, unit: _Unit, error: Exception, waiting: collections.deque[_Unit], state: _DrainState) -> None:
        """A transient failure or a misconfiguration: the same unit goes again, after the link's back-off.

        A misconfiguration pauses shipping (what is leased is still tried, after the back-off), and so do
        FOREIGN_PAUSE answers in a row that are certainly not StatHat's (a web page, a 501): said once, loudly,
        with the answer quoted once, not at every retry."""
        waiting.appendleft(unit)
        self.limit.trouble()
        self.stats.retries += 1
        message = self._foreign_answer(error) if isinstance(error, TransientError) else str(error)
        paused = isinstance(error, EndpointError) or self._foreign >= FOREIGN_PAUSE
        now = self.monotonic()
        # One burst of failures met by every request in flight is one event: it backs off one step, not one
        # step per request. A failure that comes while the link is already backing off only waits with it.
        # Adaptive pacing answers the receiver's overload itself: its cut (and a Retry-After) is the back-off.
        overload = error.overload if isinstance(error, TransientError) else None
        paced = overload is not None and isinstance(self.pace, AdaptivePace)
        if overload is not None:
            self._link_back(state)  # the receiver answers: the link is up
            if self.pace is not None:
                retry_after = getattr(error, "retry_after", None)
                self.pace.overloaded(overload, sent_at=unit.sent_at, retry_after=None if retry_after is None
                                     else min(retry_after, self.config.ship.retry_after_max))
                self._note_pacing()
        if not paced and now >= state.gate:
            if overload is None and isinstance(error, TransientError):
                self._outage += 1
            state.failures += 1
            retry_state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
            retry_state.attempt_number = state.failures
            retry_state.set_exception((type(error), error, None))
            state.gate = now + self._backoff(retry_state)
        if not paused:  # the link's back-off outlives this drain, and this shipper (see Handover)
            self._not_before, self._failures = state.gate, state.failures
        wait = max(state.gate, self.pace.ready_at() if self.pace is not None else 0.0) - now
        state.last_error = message
        if paused or (getattr(error, "unresolvable", False) and not state.delivered):
            state.failed = message
            state.misconfigured = paused  # a host that does not resolve may be a link with no DNS yet
        self._note("paused" if paused else "retrying", message, "endpoint" if paused else "link")
        level = logging.ERROR if paused else logging.WARNING
        if paused and message == self._paused_said:
            level = logging.DEBUG  # a pause is said when it begins (and when it ends), not at every probe
        if paused:
            self._paused_said = message
        kind = ("endpoint" if isinstance(error, EndpointError) else
                "foreign" if getattr(error, "foreign", False) else "transient")
        fields = {"error_kind": kind, "records": unit.size, "paused": paused}
        if self.shutdown.is_set():  # an answer awaited while stopping: this shipper sends nothing more
            log.log(level, "%s: %s; its records stay pending", "shipping paused" if paused else "send failed", message,
                    extra=fields)
            return
        log.log(level, "%s: %s; retrying in %.1f s", "shipping paused" if paused else "send failed", message, wait,
                extra={**fields, "retry_in": round(wait, 3)})

    def _answered(self, state: _DrainState) -> None:
        """The receiver answered as StatHat does (took what was sent, or refused it): the pace grows."""
        self._link_back(state)
        if self.pace is not None:
            self.pace.answered()

    def _link_back(self, state: _DrainState) -> None:
        """The receiver answers after RECOVERY_RUN back-off steps without an answer (the link came back): start
        gently again, and spread the next requests as a start-up is (a fleet behind one uplink comes back
        together)."""
        outage, self._outage = self._outage, 0
        if outage < RECOVERY_RUN or not isinstance(self.pace, AdaptivePace):
            return
        self.pace.restart()
        spread = self._spread()
        state.gate = self._not_before = max(state.gate, self.monotonic() + spread)
        log.info("the receiver answers again after %d failed attempts: the next requests wait %.1f s (spread) and "
                 "the rate starts again at %g req/s", outage, spread, self.pace.rate)

    def _spread(self) -> float:
        """A random wait before a backlog's first requests: a part of SPREAD_PER_REQUEST per request of backlog,
        reconnect_jitter at most (a fleet of small backlogs is not held back; large ones do not come together)."""
        try:
            pending, _ = self.store.backlog()
        except StoreError:
            pending = self.config.ship.batch_size
        return self.rng.uniform(0, spread_limit(pending, self.config.ship))

    def _foreign_answer(self, error: TransientError) -> str:
        """Count answers that are certainly not StatHat's, in a row; return what to say of this one: its answer
        quoted the first time, then not, and from the FOREIGN_PAUSE-th one in a row on, why shipping pauses."""
        if not error.foreign:  # no answer at all, or one StatHat could give (a 503): neither breaks the row
            return self._foreign_reason if self._foreign >= FOREIGN_PAUSE else str(error)  # nor ends a pause
        self._foreign += 1
        if self._foreign < FOREIGN_PAUSE:
            quoted, self._foreign_quoted = self._foreign_quoted, True
            return error.brief if quoted else str(error)
        if self._foreign == FOREIGN_PAUSE:
            self._foreign_reason = (
                f"{self.endpoint} does not answer as StatHat does: {FOREIGN_PAUSE} answers in a row were not "
                f"StatHat's (the last: {error.brief}); is ship.endpoint StatHat's API root ({DEFAULT_ENDPOINT})? "
                f"Records stay pending; it is tried again every {self.config.ship.backoff_max:g} s at most")
        return self._foreign_reason

    def _stathat_again(self) -> None:
        """An answer as StatHat answers: the count of foreign answers starts again (and a pause for them ends)."""
        if self._foreign >= FOREIGN_PAUSE:
            log.info("the endpoint answers as StatHat again; shipping resumed")
        self._foreign, self._foreign_quoted, self._paused_said = 0, False, None

    def _give_back(self, unit: _Unit, unsettled: dict[int, int]) -> None:
        """Return a unit's records to pending unsent (the rest of its lease goes on)."""
        ids = unit.ids
        last = self._settled(unit, unsettled)
        self.settle(lambda: self.store.release(unit.lease, ids, end=last))

    def _unexpired(self, unit: _Unit, unsettled: dict[int, int]) -> bool:
        """Take out of a unit, dropped and counted, the records that passed max_age; False if none is left."""
        max_age = self.config.spool.max_age
        if max_age is None:
            return True
        cutoff = self.clock() - max_age
        if unit.loaded is None and unit.min_t >= cutoff:  # built: none of it is that old
            return True
        old = [item for item in unit.items if item.t < cutoff]
        if not old:
            return True
        unit.items = [item for item in unit.items if item.t >= cutoff]
        last = self._settled(_Unit(unit.lease, old, unit.ezkey), unsettled)
        self.settle(lambda: self.store.expire([item.id for item in old], lease=unit.lease, end=last))
        self.stats.expired += len(old)
        self._losses.say("max_age", len(old), "dropped %d pending records older than max_age{}")
        return bool(unit.items)

    # -- the configured key ---------------------------------------------------------------------------

    def _read_key(self) -> None:
        """Read the configured key now (a key file may have been fixed): pause or resume the records needing it."""
        self._key_seen = self._key_file_identity()
        try:
            key = self.config.ezkey()
        except ConfigError as exc:  # producers go on, and so do records with their own key; loudly
            self.ezkey = None
            self._pause_key(str(exc), None)
            return
        self.ezkey = key
        if self._pause is not None and self._pause.key != key:
            self._resume("the ezkey was changed; shipping resumed")

    def _pause_key(self, reason: str, key: str | None) -> None:
        """Hold back the records sent with the configured key (said once, noted for `spool status`)."""
        said = self._pause is not None and self._pause.reason == reason
        probe = max(self.config.ship.backoff_max, KEY_RECHECK)
        self._pause = _KeyPause(reason, key, float("inf") if key is None else self.monotonic() + probe)
        self._note("paused", reason, "key")
        if not said:  # and what happens next: nothing needs a restart once the key is right
            changes = "when the key file changes" if self.config.ship.ezkey_file is not None else "at a reload"
            then = (f"the key file is looked at every {KEY_RECHECK:g} s" if key is None else
                    f"the key is tried again every {probe:g} s, and at once {changes}")
            log.error("shipping paused: %s (%s: shipping resumes by itself once it is fixed)", reason, then)

    def _resume(self, why: str) -> None:
        self._pause = None
        self._stopped = None
        log.info("%s", why)
        trouble = self._trouble
        if trouble is not None and trouble.kind == "key":  # that problem is over: what is left is the link's to say
            self._trouble = _Trouble("link", "the key is usable again; waiting for the receiver's answer",
                                     trouble.since, trouble.sent)
            try:
                self.store.set_meta(problem=self._trouble.noted())
            except StoreError as exc:
                log.warning("cannot record shipping status: %s", exc)

    def _key_held(self) -> bool:
        """Whether the records sent with the configured key must wait now (not even a probe is due)."""
        pause = self._pause
        return pause is not None and (pause.key is None or self.monotonic() < pause.probe_at)

    def _key_file_identity(self) -> tuple[int, ...] | None:
        if self.config.ship.ezkey is not None or self.config.ship.ezkey_file is None:
            return None
        try:
            st = os.stat(self.config.ship.ezkey_file)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid, st.st_gid)

    def _key_file_changed(self) -> bool:
        """Look at the key file (every KEY_RECHECK seconds at most): whether it changed since it was read."""
        now = self.monotonic()
        if self.config.ship.ezkey is not None or self.config.ship.ezkey_file is None or now < self._next_key_look:
            return False
        self._next_key_look = now + KEY_RECHECK
        return self._key_file_identity() != self._key_seen

    def _settled(self, unit: _Unit, unsettled: dict[int, int], *, end: bool = True) -> bool:
        """Count a unit's records as settled in its lease; return whether that was the lease's last."""
        unsettled[unit.lease] -= unit.size
        if unsettled[unit.lease] == 0:
            del unsettled[unit.lease]
            return end
        return False

    def _finish(self, waiting: collections.deque[_Unit], unsettled: dict[int, int]) -> None:
        """Wait for the requests in flight, settle their answers, and hand back every lease still held.

        Every request ends by itself within ship.timeout, so its answer is awaited: a shipper stopped for a
        reload must not cut an answer that can still come (the next shipper would send those records again, and
        StatHat would count them twice). Only when the process stops (`hurry`: SIGTERM under systemd's
        TimeoutStopSec) are the requests still unanswered ship.stop_wait later cut short.
        """
        cut_at: float | None = None
        cut = False
        last_answer = time.monotonic()
        if self.stats.in_flight and self.shutdown.is_set() and not self.hurry.is_set():
            log.info("awaiting the answers to %d requests in flight (due within %g s) before this shipper stops",
                     self.stats.in_flight, self.config.ship.timeout)
        while self.stats.in_flight:
            now = time.monotonic()
            if cut_at is None and self.hurry.is_set():
                cut_at = now + self.config.ship.stop_wait
            if not cut and cut_at is not None and now >= cut_at:
                log.warning("%d requests still unanswered %g s after shutdown was asked: cut short; their "
                            "records stay pending and are sent again", self.stats.in_flight,
                            self.config.ship.stop_wait)
                with self._clients_lock:
                    for client in self._clients:
                        client.abort()
                cut = True
            if now - last_answer > self.config.ship.timeout + 5:  # past every request's deadline: a bug, or a hang
                log.error("%d requests did not end in time; their records will be sent again", self.stats.in_flight)
                self.stats.in_flight = 0
                break
            # A short wait: a SIGTERM that comes while a reload waits for answers must still cut them in time.
            wait = ANSWER_POLL if cut or cut_at is None else min(ANSWER_POLL, max(0.0, cut_at - now))
            try:
                answer = self._answers.get(timeout=wait)
            except queue.Empty:
                continue
            last_answer = time.monotonic()
            self._settle_answers([answer], collections.deque(), unsettled, _DrainState(None), None)
        for lease in list(unsettled):
            self.settle(functools.partial(self.store.end_lease, lease))
        unsettled.clear()
        waiting.clear()
        self._flush_note()

    # -- status ---------------------------------------------------------------------------------------

    def _note_ok(self, *, write: bool = False) -> dict[str, object]:
        """The facts an acknowledgement records with it: the last attempt succeeded, now. While every attempt
        succeeds, they are recorded at most once a second (META_THROTTLE; `write`: now, whatever the last); the
        last of them is recorded when the drain ends (_flush_note)."""
        now = self.clock()
        self.stats.last_error = None  # the last attempt succeeded: no error is current
        last_result, last_error, at = self._last_note
        note = {"last_attempt_at": now, "last_result": "ok", "last_error": None, "last_success_at": now}
        if not write and (last_result, last_error) == ("ok", None) and self.monotonic() - at < META_THROTTLE:
            self._unwritten = note
            return {}
        self._last_note, self._unwritten = ("ok", None, self.monotonic()), None
        return note

    def _flush_note(self) -> None:
        """Record the success notes held back (see _note_ok)."""
        note, self._unwritten = self._unwritten, None
        if note:
            try:
                self.store.set_meta(**note)
            except StoreError as exc:  # status bookkeeping must never stop delivery
                log.warning("cannot record shipping status: %s", exc)

    def _pacing_note(self) -> dict[str, object]:
        """The pace for `spool status` (meta `pacing`) when it changed: its reason, or its rate by a tenth (at
        most once a second); {} otherwise. A shipper that is not paced says so (a reload may have ended a pace)."""
        rate, why, ceiling = ((self.pace.rate, self.pace.why, self.pace.ceiling) if self.pace is not None else
                              (0.0, "not paced (max_requests_per_second = 0)", 0.0))
        noted_rate, noted_why, at = self._pacing_noted
        now = self.monotonic()
        if why == noted_why and (abs(rate - noted_rate) <= 0.1 * noted_rate or now - at < META_THROTTLE):
            return {}
        self._pacing_noted = (rate, why, now)
        return {"pacing": {"rate": float(f"{rate:.4g}"), "why": why, "ceiling": ceiling}}

    def _note_pacing(self) -> None:
        """Record a changed pace now (an overload answer changed it: no acknowledgement carries it)."""
        note = self._pacing_note()
        if note:
            try:
                self.store.set_meta(**note)
            except StoreError as exc:  # status bookkeeping must never stop delivery
                log.warning("cannot record shipping status: %s", exc)

    def _note(self, result: str, error: str | None, trouble: str | None = None) -> None:
        """Record a failed attempt for `spool status`: at once when it changes, at most once a second while it
        repeats; and, of kind `trouble`, the problem shipping has now (noted at once when it begins or changes)."""
        self.stats.last_error = error
        problem = self._troubled(trouble, error or result) if trouble is not None else {}
        last_result, last_error, at = self._last_note
        if not problem and (result, error) == (last_result, last_error) and self.monotonic() - at < META_THROTTLE:
            return
        self._last_note = (result, error, self.monotonic())
        held_back, self._unwritten = self._unwritten, None  # a success not yet recorded: its time goes too
        succeeded = {"last_success_at": held_back["last_success_at"]} if held_back else {}
        try:
            self.store.set_meta(**succeeded, last_attempt_at=self.clock(), last_result=result, last_error=error,
                                **problem)
        except StoreError as exc:  # status bookkeeping must never stop delivery
            log.warning("cannot record shipping status: %s", exc)

    def _troubled(self, kind: str, text: str) -> dict[str, object]:
        """Shipping has a problem: return the note to record if it is a new one (it keeps when the trouble began)."""
        trouble = self._trouble
        if trouble is not None and (trouble.kind, trouble.text) == (kind, text):
            return {}
        if trouble is not None and trouble.kind != "link" and kind == "link":
            return {}  # the key or the endpoint waits for an operator: that stays the problem to show
        self._trouble = _Trouble(kind, text, trouble.since if trouble is not None else self.clock(),
                                 trouble.sent if trouble is not None else self.stats.sent)
        return {"problem": self._trouble.noted()}

    def _recovered(self, *, delivering: int = 0, write: bool = False) -> dict[str, object]:
        """Shipping works again: say so once, with how long the problem lasted; return the note that clears it
        (or, with `write`, record it now)."""
        trouble, self._trouble = self._trouble, None
        if trouble is None:
            return {}
        delivered, seconds = self.stats.sent + delivering - trouble.sent, max(0.0, self.clock() - trouble.since)
        log.info("shipping recovered after %s; %s record%s delivered since", lasted(seconds), f"{delivered:,}",
                 "" if delivered == 1 else "s", extra={"error_kind": trouble.kind, "lasted": round(seconds, 3),
                                                      "delivered": delivered})
        if write:
            try:
                self.store.set_meta(problem=None)
            except StoreError as exc:
                log.warning("cannot record shipping status: %s", exc)
        return {"problem": None}

    def settle(self, write: Callable[[], _T]) -> _T:
        """Commit what the receiver answered, retrying until it commits: this is the write never given up.
        Returns what the write that committed returned.

        A delivered batch whose acknowledgement is lost is sent again, so a busy or full spool is waited out
        (with back-off, loudly) rather than abandoned. Only SETTLE_GRACE after a shutdown request is it given
        up, and then the records of that lease are the ones that may be sent twice.
        """
        try:
            return write()  # the common case, without building a retry policy for it
        except StoreError as exc:
            log.warning("cannot record the receiver's answer yet: %s; retrying", exc)
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(StoreError),
            wait=tenacity.wait_exponential(multiplier=0.05, max=SETTLE_BACKOFF_MAX),
            stop=stop_after_shutdown(self.shutdown, SETTLE_GRACE, self.monotonic),
            sleep=time.sleep,  # not the shutdown-aware sleep: this wait must not be cut short
            before_sleep=lambda state: log.warning(
                "cannot record the receiver's answer yet: %s; retrying in %.1f s",
                state.outcome.exception() if state.outcome else None, state.upcoming_sleep),
            reraise=True,
        )(write)

    # -- running --------------------------------------------------------------------------------------

    def run(self) -> None:
        """Drain, then wait for new records (woken by producers or by commits seen in the spool), until shutdown.

        Housekeeping runs meanwhile in a thread of its own, on its own connection (`keep_house`): a drain can last
        as long as the backlog (or an outage), and compaction as long as its pass, so neither waits for the other.
        """
        done = threading.Event()
        keeper = threading.Thread(target=self.keep_house, args=(done,), name="spool-housekeeping", daemon=True)
        keeper.start()
        try:
            self._ship_until_shutdown()
        finally:
            done.set()
            keeper.join()

    def _ship_until_shutdown(self) -> None:
        seen = self.store.data_version()
        if self._resumed:  # a reload: the jitter was waited when the agent started; the link's back-off holds
            wait = self._not_before - self.monotonic()
            if wait > 0:
                log.info("the link is backing off: the first request waits %.1f s (a reload keeps the back-off)",
                         wait)
        else:
            adaptive = isinstance(self.pace, AdaptivePace)  # the spread is scaled to the backlog; else all of it
            jitter = self._spread() if adaptive else self.rng.uniform(0, self.config.ship.reconnect_jitter)
            if jitter and self.store.backlog()[0]:  # a fleet powering up together must not arrive together
                log.info("waiting %.1f s (jitter) before draining the backlog", jitter)
                self._not_before = self.monotonic() + jitter  # a reload meanwhile waits out the rest of it
                pace, why = self.pace, self.pace.why if self.pace is not None else ""
                if pace is not None:  # what status shows meanwhile
                    pace.why = f"the first request waits {jitter:.1f} s (a random start: reconnect_jitter)"
                self._note_pacing()
                self.sleep(jitter)
                if pace is not None:
                    pace.why = why
        self._note_pacing()  # what status shows from the start (a reload's new pace, or none)
        while not self.shutdown.is_set():
            result = self.drain()
            self.idle.set()
            stopped = None if result.done or self.shutdown.is_set() else result.reason
            if stopped and stopped != self._stopped and not (self._pause and stopped == self._pause.reason):
                log.error("shipping stopped: %s", stopped)  # once: a pause is said when it begins
            self._stopped = stopped
            while not self.shutdown.is_set():
                self.wake.wait(min(self.config.ship.idle_poll, KEY_RECHECK) if self._pause else
                               self.config.ship.idle_poll)
                self.wake.clear()
                pause = self._pause
                if pause is not None and (self._key_file_changed() or self.monotonic() >= pause.probe_at):
                    break  # the key file changed, or the refused key may be tried again
                version = self.store.data_version()  # housekeeping's commits (a re-stamp) are seen too
                if version != seen:
                    seen = version
                    break

    def keep_house(self, done: threading.Event) -> None:
        """Run `housekeeping` every HOUSEKEEPING_INTERVAL on a spool connection of its own, until `done` is set."""
        try:
            store = Store(self.store.path, synchronous=self.config.spool.synchronous, limits=self.config.spool)
        except StoreError as exc:
            log.error("housekeeping cannot open the spool: %s; sent records are not pruned meanwhile", exc)
            return
        with store:
            while not done.is_set():
                try:
                    self.housekeeping(store, done)
                except Exception:  # a bug here must not end housekeeping for the life of the agent
                    log.exception("housekeeping failed")
                done.wait(HOUSEKEEPING_INTERVAL)

    def restamp_held(self, store: Store | None = None) -> None:
        """Give held records their time if the clock is sane now (see Store.restamp_held)."""
        from spool.clock import boot_clock, boot_id
        from spool.records import CLOCK_SANE_AFTER

        wall = self.clock()
        if wall < CLOCK_SANE_AFTER:
            return
        restamped, lost = (store or self.store).restamp_held(wall=wall, mono=boot_clock(), boot=boot_id(),
                                                  floor=self.config.spool.t_floor)
        if restamped:
            log.info("the clock is sane: re-stamped %d records held while it was not", restamped)
        if lost:
            log.warning("%d held records cannot be placed in time (held in an earlier boot, or the monotonic "
                        "clock jumped); moved to dead letters with the reason", lost)

    def drop_expired(self, store: Store | None = None) -> None:
        """Drop pending records whose t is older than max_age, counted (dropped_age) and logged."""
        expired = (store or self.store).drop_expired(now=self.clock())
        if expired:
            with self._stats_lock:  # housekeeping's thread and the drain's both drop
                self.stats.expired += expired
            self._losses.say("max_age", expired, "dropped %d pending records older than max_age{}")

    def housekeeping(self, store: Store | None = None, done: threading.Event | None = None) -> None:
        """Free dead owners' leases; re-stamp held records; compact; expire; hourly, prune sent records; give
        space back. On `store` (the shipper's own by default); the long jobs stop between two transactions once
        `done` (or shutdown) is set, and resume at the next call."""
        store = store or self.store
        now = self.monotonic()
        if now - self._last_housekeeping < HOUSEKEEPING_INTERVAL:
            return
        self._last_housekeeping = now

        stop = done or self.shutdown
        pause = self._between_housekeeping or Gap(stop.wait)

        def between() -> bool:
            pause()
            return not (self.shutdown.is_set() or stop.is_set())

        try:
            freed = store.release_dead_leases(unowned_before=self.clock() - self.config.ship.lease_timeout)
            if freed:
                log.warning("returned %d records of leases whose shipper died to pending", freed)
            store.sweep_stages()
            self.restamp_held(store)
            if self.config.spool.compact_counts:
                saved = store.compact_counts(bucket=int(self.config.spool.compact_counts), between=between)
                if saved:
                    log.info("compacted the backlog: %d count records merged away", saved)
            self.drop_expired(store)
            if now - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = now
                pruned = store.prune_sent(sent_before=self.clock() - self.config.spool.retention, between=between)
                if pruned:
                    log.info("pruned %d sent records older than the retention period", pruned)
            store.release_space(between=between)
        except StoreError as exc:
            log.warning("housekeeping failed: %s", exc)


def _adopted(store: Store) -> _Trouble | None:
    """The problem a shipper before this one noted and did not see end (this one shows it until it is solved)."""
    try:
        noted = store.meta().get("problem")
    except StoreError:
        return None
    if not isinstance(noted, dict) or not isinstance(noted.get("since"), int | float):
        return None
    return _Trouble(str(noted.get("kind")), str(noted.get("text")), float(noted["since"]), 0)


def spread_limit(pending: int, ship: ShipSettings) -> float:
    """The longest wait before a backlog of `pending` records starts to drain (adaptive pacing): SPREAD_PER_REQUEST
    per request it needs, reconnect_jitter at most."""
    return min(ship.reconnect_jitter, -(-pending // ship.batch_size) * SPREAD_PER_REQUEST)


def _make_pace(config: Config, monotonic: Callable[[], float], rng: random.Random) -> Pace | None:
    """The pace the config asks for: none (max_requests_per_second = 0), adaptive or fixed."""
    ceiling = config.ship.max_requests_per_second
    if not ceiling:
        return None
    return AdaptivePace(ceiling, monotonic, rng) if config.ship.pacing == "adaptive" else FixedPace(ceiling, monotonic)


class Gap:
    """Between two transactions of a long job, leave the write lock free as long as the last one held it, and
    HOUSEKEEPING_GAP at least.

    A producer waiting for the lock is in SQLite's busy handler, which polls 1, 2, 5, ... 25 ms apart at first,
    then 50 and 100 ms: were the job to take the lock again at once, a waiter could miss every free moment (a
    `spool add` waited 23 s behind compaction). With free moments as long as the held ones (25 ms at least),
    it gets its turn after about one transaction, and the job still has half the time.
    """

    def __init__(self, wait: Callable[[float], object] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic):
        self.wait = wait
        self.monotonic = monotonic
        self.since = monotonic()

    def __call__(self) -> None:
        self.wait(max(HOUSEKEEPING_GAP, self.monotonic() - self.since))
        self.since = self.monotonic()


def _nothing() -> None:
    pass


def _current_cpu() -> int | None:
    """The CPU this thread runs on now (Linux: field 39 of /proc/thread-self/stat), or None."""
    try:
        with open("/proc/thread-self/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[36])  # after "pid (comm)", field 3 is first
    except (OSError, IndexError, ValueError):
        return None


def _runs_of_answers(answers: list[_Answer]) -> list[list[_Answer]]:
    """Split answers, in order, into runs of acceptances and single other answers."""
    runs: list[list[_Answer]] = []
    for answer in answers:
        if answer.error is None and runs and runs[-1][-1].error is None:
            runs[-1].append(answer)
        else:
            runs.append([answer])
    return runs


@dataclass
class _DrainState:
    """What one drain knows of the link: the back-off gate, consecutive failures, a reason to give up."""

    deadline: float | None
    gate: float = 0.0  # no request before this (monotonic)
    failures: int = 0
    failed: str | None = None  # a misconfiguration (or an unresolvable host before any delivery)
    misconfigured: bool = False  # `failed` is a misconfiguration (not a host that did not resolve)
    blocked: str | None = None  # leasing failed (the spool busy or full): retried after the gate
    after: int | None = None  # the id of the last clean record leased: the next search starts there
    after_version: int | None = None  # the spool's data_version when `after` was exact
    no_suspects: int | None = None  # the spool's data_version when no suspect group was left to lease
    delivered: bool = False
    keyed_only: bool | None = None  # the rule of the last lease: records sent with the configured key left out

    last_error: str | None = None

    def stopped(self, why: str, pause: _KeyPause | None = None) -> DrainResult:
        if self.failed:
            return DrainResult(False, self.failed, operator=self.misconfigured)
        if pause is not None:
            return DrainResult(False, pause.reason, operator=True)
        return DrainResult(False, f"{why}; last error: {self.last_error}" if self.last_error else why)

