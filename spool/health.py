"""One health verdict, computed here and nowhere else: `spool status` (its lines, --json and exit status),
/healthz, the agent's minute summary and systemd's STATUS= all show what `assess` says of the same facts.

* ok (exit 0): nothing needs a look.
* degraded (exit 1): spool copes and recovers by itself (a failing link, records waiting long), or something
  happened that needs a look but stops nothing else (dead letters, held records, a dead shipper's leases).
* failing (exit 2): records cannot be taken or shipped until an operator acts: the spool not writable or
  damaged, the configured key missing, unreadable or refused, an endpoint that cannot work, records with no key
  while none is configured.

Only what is current is a problem: the shipper notes a problem when it begins and clears it when shipping
recovers (spool.ship), and past events (records dropped at a bound, a spool set aside) are notes, not problems.
`assess` is pure; `read_facts` gathers the facts from a spool through its Store.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spool.config import Config
    from spool.store import Store

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
EXIT_STATUS = {OK: 0, DEGRADED: 1, FAILING: 2}  # `spool status` exits with these (README: CLI reference)
OPERATOR_KINDS = ("key", "endpoint")  # the shipper's problems only an operator can fix (the link's mends itself)


@dataclass(frozen=True)
class Facts:
    """What the verdict is made of, as one process sees it now."""

    now: float
    pending: int = 0  # waiting, not in flight
    inflight: int = 0
    dead: int = 0
    held: int = 0
    oldest_pending_age: float | None = None
    keyless: int = 0  # pending records with no key of their own while none is configured
    keyless_more: bool = False  # only the oldest pending records were looked at: there may be more
    shipper_running: bool = True
    last_success_at: float | None = None
    problem: Mapping[str, Any] | None = None  # the shipper's current problem: kind, text, since (spool.ship)
    integrity: Mapping[str, Any] | None = None  # the last full check (spool.checkup)
    writable: bool = True
    commit_error: str | None = None  # the relay's last commit failed
    started_at: float | None = None  # the agent's start: "nothing delivered for" counts from there at most
    unhealthy_after: float = 900.0
    uid: int | None = None  # who could not write the spool


@dataclass(frozen=True)
class Problem:
    level: str  # DEGRADED or FAILING
    text: str


@dataclass(frozen=True)
class Health:
    verdict: str
    problems: tuple[Problem, ...] = field(default=())

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.verdict]

    @property
    def texts(self) -> list[str]:
        return [problem.text for problem in self.problems]

    def summary(self) -> str:
        """The verdict and its first problem, in one line (the minute summary, systemd's STATUS=)."""
        if not self.problems:
            return self.verdict
        more = len(self.problems) - 1
        return f"{self.verdict}: {self.problems[0].text}" + (f" (and {more} more problem{'s' * (more > 1)})"
                                                              if more else "")

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "problems": [{"level": p.level, "text": p.text} for p in self.problems]}


def assess(facts: Facts) -> Health:
    """The verdict on a spool and its shipping, with every current problem (failing ones first)."""
    failing: list[str] = []
    degraded: list[str] = []
    if not facts.writable:
        who = f" by uid {facts.uid}" if facts.uid is not None else ""
        failing.append(f"the spool is not writable{who}: nothing can be added to it")
    if facts.commit_error is not None:
        failing.append(f"the last commit failed: {facts.commit_error}")
    integrity = facts.integrity or {}
    if integrity.get("state") == "damaged":  # found by the background check (spool.checkup) or doctor --deep
        failing.append(f"the spool is damaged (the full integrity check found: {integrity.get('detail')}): `spool "
                       "export --state pending FILE` saves what can still be read; the next start of `spool run` "
                       "moves the file aside and starts a fresh spool")
    problem = facts.problem or {}
    if problem.get("text"):
        since = problem.get("since")
        when = "" if not isinstance(since, int | float) else f" since {_when(since)} ({lasted(facts.now - since)})"
        left = "" if facts.shipper_running else " (as the last shipper left it; none runs now)"
        if problem.get("kind") in OPERATOR_KINDS:
            failing.append(f"shipping is paused{when}: {problem['text']}{left}")
        else:
            degraded.append(f"the receiver is failing{when}; retrying: {problem['text']}{left}")
    if facts.keyless:
        failing.append(keyless_words(facts.keyless, facts.keyless_more, "pending record"))
    waiting = facts.pending + facts.inflight
    quiet = _quiet(facts)
    old = facts.oldest_pending_age is None or facts.oldest_pending_age >= facts.unhealthy_after
    if waiting and quiet >= facts.unhealthy_after and old:
        since = "yet" if quiet == float("inf") else f"for {quiet:.0f} s"
        alone = "" if facts.shipper_running else ("; no shipper is running (start `spool run`, or run `spool ship "
                                                  "--once` from cron)")
        degraded.append(f"{_n(waiting, 'record')} waiting and nothing delivered {since}{alone}")
    if facts.inflight and not facts.shipper_running:
        degraded.append(f"{_n(facts.inflight, 'record')} leased by a shipper that is no longer running; they return "
                        "to pending when a shipper starts")
    if facts.dead:
        degraded.append(f"{_n(facts.dead, 'record')} refused by the receiver (see `spool dead list`)")
    if facts.held:
        degraded.append(f"{_n(facts.held, 'record')} stamped while the system clock was wrong: held until their "
                        "real time is known (start NTP)")
    verdict = FAILING if failing else DEGRADED if degraded else OK
    return Health(verdict, tuple([Problem(FAILING, text) for text in failing]
                                 + [Problem(DEGRADED, text) for text in degraded]))


def _quiet(facts: Facts) -> float:
    """Seconds since a delivery (or since the agent started, if later); infinite if neither ever was."""
    since = max((t for t in (facts.last_success_at, facts.started_at) if t is not None), default=None)
    return float("inf") if since is None else max(0.0, facts.now - since)


KEYLESS_LOOK = 1000  # the oldest pending records /healthz and the summary look at for records without a key


def keyless_look(store: Store, waiting: int) -> tuple[int, bool]:
    """How many of the oldest KEYLESS_LOOK waiting records carry no key of their own (while none is configured,
    they gather there as the others are shipped), and whether there may be more: a look that costs the same
    whatever the backlog (counting them all read every record: 2.7 s per `spool status` at 5M)."""
    keyless = store.keyless_among_oldest(KEYLESS_LOOK) if waiting else 0
    return keyless, keyless > 0 and waiting > KEYLESS_LOOK


def keyless_words(n: int, more: bool, noun: str) -> str:
    """The problem of records without a key while none is configured, in words (`more`: n is a lower bound)."""
    some = f"{n:,}+ {noun}s" if more else _n(n, noun)
    return f"{some} {'carries' if n == 1 and not more else 'carry'} no ezkey and none is configured (set " \
           "ship.ezkey_file or SPOOL_EZKEY_FILE)"


def read_facts(store: Store, config: Config, *, now: float | None = None, started_at: float | None = None,
               commit_error: str | None = None) -> Facts:
    """Gather the facts from a spool: kept counts and meta, a few reads whatever the backlog."""
    from spool.lock import ShipLock

    now = time.time() if now is None else now
    counts = store.counts()  # one snapshot: the numbers agree
    oldest = store.oldest_pending_t()
    meta = store.meta()
    waiting = counts["pending"] + counts["inflight"]
    keyless, more = (0, False) if config.ship.keyed else keyless_look(store, waiting)
    path = store.path
    writable = os.access(path.parent, os.W_OK) and os.access(path, os.W_OK)
    try:
        running = ShipLock(path).holder() is not None
    except OSError:  # its lock file is not ours to read: say nothing of a shipper rather than something false
        running = True
    return Facts(
        now=now, pending=counts["pending"], inflight=counts["inflight"], dead=counts["dead"], held=counts["held"],
        oldest_pending_age=None if oldest is None else max(0, int(now) - oldest), keyless=keyless, keyless_more=more,
        shipper_running=running, last_success_at=meta.get("last_success_at"),
        problem=meta.get("problem"), integrity=meta.get("integrity"), writable=writable, commit_error=commit_error,
        started_at=started_at, unhealthy_after=config.metrics.unhealthy_after,
        uid=os.getuid() if hasattr(os, "getuid") else None)


def notes(counters: Mapping[str, int]) -> list[str]:
    """What happened that is no current problem but an operator should know: records dropped at a bound, ..."""
    said = []
    for name, what in (("dropped_oldest", "dropped (oldest first) because the spool was at its limit"),
                       ("dropped_age", "dropped because their t was older than max_age"),
                       ("refused_full", "refused because the spool was full"),
                       ("restamp_refused", "held records whose re-stamp was impossible (dead letters)"),
                       ("corrupt_quarantined", "corrupt spool files moved aside")):
        if counters.get(name):
            said.append(f"{counters[name]:,} {what}")
    return said


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _when(t: float) -> str:
    from spool.clock import utc_text  # every calendar conversion is there (a 32-bit time_t ends in 2038)

    return utc_text(t)


class LossLog:
    """Say records lost (dropped at a bound or past max_age, refused) at most once a minute per kind, as the README
    promises: a line at once when nothing of that kind was said in the last minute, else with the next loss a
    minute after, counting every record since. They are counted in status and /metrics meanwhile.

    `message` takes the count first, and "{}" where " in the last minute[, the last]" goes when the line counts
    more than this loss: `say("refused", n, "receiver refused %d record(s){}: %s", reason)`.
    """

    EVERY = 60.0  # seconds

    def __init__(self, logger: Any, monotonic: Any = time.monotonic, *, last: str = ""):
        import threading

        self._logger, self._monotonic, self._last = logger, monotonic, last
        self._said: dict[str, tuple[float, int]] = {}  # kind -> when last said, records since
        self._lock = threading.Lock()  # housekeeping's thread and the drain's both drop

    def say(self, kind: str, count: int, message: str, *args: object, **kwargs: Any) -> None:
        now = self._monotonic()
        with self._lock:
            said, since = self._said.get(kind, (float("-inf"), 0))
            since += count
            if now - said < self.EVERY:
                self._said[kind] = (said, since)
                return
            self._said[kind] = (now, 0)
        if "extra" in kwargs:
            kwargs["extra"] = {**kwargs["extra"], "records": since}
        self._logger.warning(message.format("" if since == count else " in the last minute" + self._last), since,
                             *args, **kwargs)


def lasted(seconds: float) -> str:
    """'45 s', '8 min', '3.5 h', '2.0 d'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
