"""A local StatHat-compatible endpoint (and a StatsD listener): apps keep their StatHat client, spool keeps the stats.

Every request is answered only after its records are committed to the spool. Concurrent requests share
commits: one writer thread commits everything that arrived while its previous commit ran (group commit),
so many clients do not each pay for an fsync.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import math
import queue
import re
import select
import signal
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from spool.config import RelaySettings, check_bind, parse_address
from spool.errors import ConfigError, InvalidRecord, StoreError, printable
from spool.formats import stathat_body
from spool.lock import IDENTITY_HEADER, spool_identity
from spool.records import (
    T_FLOOR,
    check_key,
    check_number,
    check_stat,
    check_t,
    make_record,
    now,
    number_from_text,
    record_rows,
)
from spool.records import stamp as stamp_at
from spool.store import Store

log = logging.getLogger("spool.relay")

MAX_GROUP = 10_000  # rows in one group commit at most


# -- the protocol: requests to records (pure) -----------------------------------------------------------


class Refusal(Exception):
    """A request StatHat would refuse: answered HTTP 200 with {"status":500,"msg":...}."""


def request_key(value: object, field: str, missing: str) -> str:
    """Return a request's key, or refuse it as StatHat does: `missing` if absent or blank, else "invalid keys"."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise Refusal(missing)
    try:
        return check_key(value, field)
    except InvalidRecord:
        raise Refusal("invalid keys") from None


def form_records(path: str, form: dict[str, str], stamp: int, t_floor: int = T_FLOOR) -> list[Any]:
    """Records from one /ez, /c or /v call given as form fields (query string or body)."""
    def number(field: str) -> int | float | None:
        text = form.get(field)
        return None if text is None or text == "" else number_from_text(text, field)

    try:
        t = number("t")  # inside: "t= " is a refusal like any other, not an error that drops the connection
        if path == "/ez":
            ezkey = request_key(form.get("ezkey") or form.get("email"), "ezkey", "no ezkey specified")
            return [make_record(stat=form.get("stat"), count=number("count"), value=number("value"), t=t,
                                ezkey=ezkey, clock_now=stamp, t_floor=t_floor)]
        key = request_key(form.get("key"), "key", "invalid keys")
        ukey = request_key(form.get("ukey"), "ukey", "invalid keys")
        if path == "/c":
            count = number("count")
            return [make_record(key=key, ukey=ukey, count=1 if count is None else count, t=t, clock_now=stamp,
                                t_floor=t_floor)]
        return [make_record(key=key, ukey=ukey, value=number("value"), t=t, clock_now=stamp, t_floor=t_floor)]
    except InvalidRecord as exc:
        raise Refusal(exc.reason) from None


def json_records(body: bytes, stamp: int, t_floor: int = T_FLOOR) -> list[Any]:
    """Records from one /ez JSON batch {"ezkey": ..., "data": [...]}, refused as StatHat refuses."""
    try:
        document = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise Refusal("invalid json") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise Refusal("invalid json: expected {\"ezkey\": ..., \"data\": [...]}")
    ezkey = request_key(document.get("ezkey") or document.get("email"), "ezkey", "no ezkey specified")
    try:
        _, items = stathat_body(document)
    except InvalidRecord as exc:
        raise Refusal(f"invalid json: {exc.reason}") from None
    if any(isinstance(item, dict) and "ezkey" in item for item in items):
        raise Refusal("invalid json: a data item carries its own ezkey")
    try:
        return list(record_rows(items, clock_now=stamp, ezkey=ezkey, t_floor=t_floor))
    except InvalidRecord as exc:
        raise Refusal(exc.reason) from None


def _not_json(constant: str) -> None:
    """Refuse NaN, Infinity and -Infinity: Python's json module reads them, JSON (and StatHat) does not."""
    raise ValueError(f"{constant} is not JSON")


STATSD_KINDS = {"c": "count", "g": "value", "ms": "value", "h": "value", "d": "value"}
# Why a StatsD line was not taken as it came, for /metrics (spool_statsd_*): "invalid" lines are unreadable;
# the others are readable lines the listener cannot turn into a true stat (or, tags_dropped, took without tags).
STATSD_DROPS = ("filtered", "set_refused", "set_overflow")  # filtered: by relay.statsd_drop, on purpose (not logged)
STATSD_REASONS = {
    "set_refused": "sets are refused (relay.statsd_sets = 0)",
    "set_overflow": "too many distinct set members at once",
}
MAX_GAUGES = 100_000  # gauge names remembered for delta gauges; the least recently set is forgotten first
MAX_SET_MEMBERS = 1_000_000  # distinct set members held at once (as 64-bit hashes: ~60 MiB at most)


class StatsdReader:
    """StatsD and DogStatsD lines to records, with the state the protocol needs. Pure: no sockets, no clock.

    Counters (`|c`, `|@rate` scales them), timers and distributions (`|ms`, `|d`) and histograms (`|h`) are
    records at once. A gauge (`|g`) is a value; a delta gauge (`+3|g`, `-3|g`) moves the last gauge of that
    name this reader saw, from 0 if it saw none (as Etsy's statsd does: a restart forgets them); several
    settings of one gauge in one packet record its last value only (as pystatsd sends a negative gauge: `0|g`
    then `-5|g`). A set (`|s`) collects distinct members per window of `set_window` seconds (aligned to the
    clock) and becomes a value stat, the number of members, at the window's start; 0 refuses sets (counted).
    DogStatsD tags (`|#env:prod,canary`) and Telegraf's (`name,env=prod:1|c`) are appended to the name, sorted
    (`name canary env=prod`), or dropped (counted). A metric whose name (as sent, before the prefix and tags)
    matches a glob of `drop` is dropped, counted as "filtered". `|T<unix>` gives a counter, gauge or timer its
    own time; `|c:<id>` (a container) is ignored; several values in one line (`name:1:2:3|d`) are several
    records.

    Every line not taken is counted and told to `on_drop(reason, detail, stat, line, sender)`: the reason
    ("invalid" or one of STATSD_DROPS), what is wrong, the metric's name (None if it has none), the line.
    """

    def __init__(self, prefix: str = "", *, tags: str = "append", set_window: float = 60.0,
                 t_floor: int = T_FLOOR, max_gauges: int = MAX_GAUGES, max_set_members: int = MAX_SET_MEMBERS,
                 drop: Sequence[str] = (), on_drop: Callable[[str, str, str | None, str, Any], None] | None = None):
        self.prefix = prefix
        self.drop = tuple(drop)
        self.on_drop = on_drop
        self.tags = tags
        self.set_window = set_window
        self.t_floor = t_floor
        self.max_gauges = max_gauges
        self.max_set_members = max_set_members
        self.gauges: OrderedDict[str, int | float] = OrderedDict()
        self.sets: dict[tuple[float, str], set[int]] = {}  # (window start, stat) -> hashes of its members
        self.members = 0
        self.first_end = math.inf  # when the earliest window of self.sets ends
        self.last_start = -math.inf  # when the latest one starts
        self.counts: Counter[str] = Counter()  # "invalid", "tags_dropped" and STATSD_DROPS
        self._sender: Any = None  # where the packet being read came from (for on_drop)

    def read(self, packet: bytes, wall: float, sender: Any = None) -> list[Any]:
        """Return the records of one packet (newline-separated lines) that arrived at wall-clock time `wall`.

        `sender` (the address it came from) is only passed on to `on_drop`.
        """
        records: list[Any] = []
        gauge_at: dict[tuple[str, int], int] = {}  # a gauge's record in this packet: replaced by later settings
        stamp = stamp_at(wall)
        self._sender = sender
        for raw in packet.split(b"\n"):
            line = raw.strip()
            if not line:
                continue
            text = line.decode("utf-8", "replace")
            try:
                self._line(line.decode("utf-8"), wall, stamp, records, gauge_at)
            except UnicodeDecodeError:
                self._drop("invalid", "not UTF-8 text", text)
            except (ValueError, InvalidRecord) as exc:
                self._drop("invalid", exc.reason if isinstance(exc, InvalidRecord) else str(exc), text)
        return records

    def _drop(self, reason: str, detail: str, line: str) -> None:
        """Count a line not taken, and tell on_drop which, and why."""
        self.counts[reason] += 1
        if self.on_drop is not None:
            name = line.partition(":")[0].strip() if ":" in line else line.partition("|")[0].strip()
            self.on_drop(reason, detail, (self.prefix + name) if name else None, line, self._sender)

    def flush(self, wall: float, *, everything: bool = False) -> list[Any]:
        """Return a value record for each set whose window has ended by `wall` (or every set, at shutdown)."""
        if not everything and self.last_start <= wall < self.first_end:
            return []  # the common case, per packet: no window has ended
        # A window that starts after `wall` (the clock was stepped back) is written now, not hours later.
        ended = [key for key in self.sets if everything or not key[0] <= wall < key[0] + self.set_window]
        records = []
        for start, stat in ended:
            members = self.sets.pop((start, stat))
            self.members -= len(members)
            t = stamp_at(start)
            records.append(make_record(stat=stat, value=len(members), t=t, clock_now=t, t_floor=0))
        self.first_end = min((start + self.set_window for start, _ in self.sets), default=math.inf)
        self.last_start = max((start for start, _ in self.sets), default=-math.inf)
        return records

    def _line(self, line: str, wall: float, stamp: int, records: list[Any],
              gauge_at: dict[tuple[str, int], int]) -> None:
        name, colon, rest = line.partition(":")
        if not colon or not name.strip():
            raise ValueError("a metric needs a name and a value (name:value|type)")  # before the prefix hides it
        name, folded = _telegraf_tags(name)
        if self.drop and any(fnmatch.fnmatchcase(name.strip(), glob) for glob in self.drop):
            self.counts["filtered"] += 1
            return
        fields = rest.split("|")
        if len(fields) < 2:
            raise ValueError("a metric needs a type (name:value|type)")
        kind, rate, t, tags = fields[1], 1.0, stamp, None
        if kind != "s" and kind not in STATSD_KINDS:
            raise ValueError(f"unknown metric type '{printable(kind[:10])}'")
        for extra in fields[2:]:
            if extra.startswith("@"):
                rate = number_from_text(extra[1:], "sample rate")
                if not 0 < rate <= 1:
                    raise ValueError("sample rate must be in (0, 1]")
            elif extra.startswith("#"):
                tags = extra[1:]
            elif extra.startswith("T") and kind != "s":
                t = check_t(number_from_text(extra[1:], "t"), self.t_floor)
            elif not extra.startswith("c:"):
                raise ValueError(f"unknown field '|{printable(extra[:10])}'")
        stat, untagged = self._name(self.prefix + name, tags, folded)
        if kind == "s":
            self._member(stat, fields[0], wall, line)
        else:
            field = STATSD_KINDS[kind]
            numbers = [(text, number_from_text(text, field)) for text in fields[0].split(":")]
            if kind == "c":
                records += [make_record(stat=stat, count=number / rate if rate < 1 else number, t=t, clock_now=t,
                                        t_floor=0) for _, number in numbers]
            elif kind != "g":
                records += [make_record(stat=stat, value=number, t=t, clock_now=t, t_floor=0) for _, number in numbers]
            else:
                self._gauge(stat, t, numbers, records, gauge_at)
        self.counts["tags_dropped"] += untagged  # only for a line taken

    def _name(self, name: str, tags: str | None, folded: Sequence[str] = ()) -> tuple[str, bool]:
        """The stat name for a metric name and its tags, DogStatsD's (`a:b,c`) and Telegraf's (`a=b`), by the
        `tags` setting; True if tags were dropped."""
        dogs = (tag.strip().replace(":", "=", 1) for tag in (tags or "").split(","))
        parts = sorted(set(filter(None, (*dogs, *folded))))
        if not parts or self.tags == "drop":
            return check_stat(name), bool(parts)
        if any("~" in part for part in parts):
            raise ValueError("a tag with '~' would make StatHat's multi-stat form")
        return check_stat(" ".join([name, *parts])), False

    def _gauge(self, stat: str, t: int, numbers: list[tuple[str, int | float]], records: list[Any],
               gauge_at: dict[tuple[str, int], int]) -> None:
        """Set a gauge (a delta moves the last one, or 0) and record its value: one record per gauge per packet."""
        gauge = self.gauges.get(stat)
        for text, number in numbers:
            if text.lstrip()[:1] in ("+", "-"):  # a delta, from 0 if no gauge of that name is known (Etsy's rule)
                number = check_number((gauge or 0) + number, "value")
            gauge = number
        assert gauge is not None  # a line has a value at least
        record = make_record(stat=stat, value=gauge, t=t, clock_now=t, t_floor=0)
        self.gauges[stat] = gauge
        self.gauges.move_to_end(stat)
        if len(self.gauges) > self.max_gauges:
            self.gauges.popitem(last=False)
        if (stat, t) in gauge_at:
            records[gauge_at[stat, t]] = record
        else:
            gauge_at[stat, t] = len(records)
            records.append(record)

    def _member(self, stat: str, member: str, wall: float, line: str) -> None:
        if self.set_window <= 0:
            self._drop("set_refused", STATSD_REASONS["set_refused"], line)
            return
        start = wall // self.set_window * self.set_window
        members = self.sets.setdefault((start, stat), set())
        token = hash(member)
        if token in members:
            return
        if self.members >= self.max_set_members:
            self._drop("set_overflow", f"{STATSD_REASONS['set_overflow']} ({self.max_set_members:,})", line)
            if not members:
                del self.sets[start, stat]
            return
        members.add(token)
        self.members += 1
        self.first_end = min(self.first_end, start + self.set_window)
        self.last_start = max(self.last_start, start)


def _telegraf_tags(name: str) -> tuple[str, list[str]]:
    """Split Telegraf's tags off a metric name (`requests,env=prod,region=eu`): the name, and its `key=value` tags.

    A name with a comma but not only `key=value` parts after it (`a,b`) is a name, left as it is.
    """
    if "," not in name:
        return name, []
    base, *parts = name.split(",")
    tags = [part.strip() for part in parts if part.strip()]
    if not base.strip() or not tags or not all("=" in tag and not tag.startswith("=") for tag in tags):
        return name, []
    return base, tags


SHOWN_LINE = 80  # characters of a dropped StatsD line (or its name) a log line shows at most
_STATSD_KEY_FIELD = re.compile(r"(?i)((?:ez|u)?key|email)(\s*[:=]\s*)[^|,#\s&]+")


def shown_statsd(text: str) -> str:
    """A StatsD line or name fit to log, quoted: key-looking fields (`ezkey=...`, a tag `key:...`) as ***, cut
    short (its length told)."""
    from spool.stathat import redact  # the one redaction of what is quoted (imported when a drop is logged)

    text = printable(redact(_STATSD_KEY_FIELD.sub(lambda m: m.group(1) + m.group(2) + "***", text)))
    return f"'{text}'" if len(text) <= SHOWN_LINE else f"'{text[:SHOWN_LINE]}…' ({len(text)} characters)"


class DropLog:
    """Say which StatsD lines were dropped, naming the sender, the stat, the line and why, and stay short.

    A culprit (a sending host, a stat, a reason) is named once a minute: what it sends again within its minute
    is counted and told in one line when the minute is over. At most `max_lines` lines a minute in all (a
    flood of distinct names must not flood the log); the rest is counted and told then too.
    """

    def __init__(self, logger: logging.Logger, *, window: float = 60.0, max_lines: int = 50,
                 max_culprits: int = 1000, monotonic: Callable[[], float] = time.monotonic):
        self.log = logger
        self.window = window
        self.max_lines = max_lines
        self.max_culprits = max_culprits
        self.monotonic = monotonic
        # (host, reason, stat) -> [when its minute began, lines held back since, the detail last seen]
        self.culprits: dict[tuple[Any, str, str | None], list[Any]] = {}
        self.minute_began = -math.inf  # of the whole log's budget
        self.lines = 0  # logged in this minute
        self.unsaid = 0  # dropped lines not logged in this minute (past the budget)

    def dropped(self, reason: str, detail: str, stat: str | None, line: str, sender: Any) -> None:
        """Log one dropped line, unless its culprit was named less than a minute ago (then count it)."""
        now = self.monotonic()
        self.tick(now)
        host = sender[0] if sender else None
        culprit = self.culprits.get((host, reason, stat))
        if culprit is not None:
            culprit[1] += 1
            culprit[2] = detail
            return
        if self.lines >= self.max_lines or len(self.culprits) >= self.max_culprits:
            self.unsaid += 1
            return
        if self.lines == 0:
            self.minute_began = now
        self.lines += 1
        self.culprits[host, reason, stat] = [now, 0, detail]
        where = ((f"[{sender[0]}]:{sender[1]}" if ":" in sender[0] else f"{sender[0]}:{sender[1]}") if sender
                 else "an unknown sender")
        named = f"stat {shown_statsd(stat)}" if stat else "no stat name"
        self.log.warning("StatsD line from %s dropped, %s: %s (line %s)", where, named, detail, shown_statsd(line),
                         extra={"component": "statsd", "reason": reason, "sender": where,
                                "stat": shown_statsd(stat) if stat else None})

    def tick(self, now: float | None = None) -> None:
        """Tell what was held back, for each culprit whose minute is over, and for the whole log's minute."""
        now = self.monotonic() if now is None else now
        for key, (began, held, detail) in list(self.culprits.items()):
            if now - began < self.window:
                continue
            del self.culprits[key]
            if held:
                host, reason, stat = key
                named = f"stat {shown_statsd(stat)}" if stat else "no stat name"
                self.log.warning("StatsD: %s more lines from %s dropped in the last minute, %s: %s", f"{held:,}",
                                 host or "an unknown sender", named, detail,
                                 extra={"component": "statsd", "reason": reason, "count": held})
        if (self.lines or self.unsaid) and now - self.minute_began >= self.window:
            if self.unsaid:
                self.log.warning("StatsD: %s more dropped lines not logged in the last minute (at most %d lines a "
                                 "minute); spool_statsd_* in /metrics counts them all", f"{self.unsaid:,}",
                                 self.max_lines, extra={"component": "statsd", "count": self.unsaid})
            self.lines = self.unsaid = 0


def start_without_stop_signals(thread: threading.Thread) -> None:
    """Start `thread` with SIGINT and SIGTERM blocked in it (and in every thread it starts).

    Python runs signal handlers in the main thread only. A process-directed signal that a busy thread of ours
    takes leaves the main thread asleep in its wait, so `spool run` would not stop (seen: one SIGTERM in four,
    sent just after an HTTP request). A thread inherits the mask of the thread that starts it, so the mask is
    set here, around the start, leaving no instant in which the new thread could take one; the caller's own
    mask is restored at once.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# -- committing in groups ---------------------------------------------------------------------------------


class _Waiting:
    __slots__ = ("done", "error", "rows")

    def __init__(self, rows: Sequence[Any]):
        self.rows = rows
        self.done = threading.Event()
        self.error: StoreError | None = None


class GroupWriter:
    """One writer thread: commits whatever arrived while its last commit ran, then wakes those callers."""

    def __init__(self, store: Store, on_commit: Callable[[int], None] = lambda n: None):
        self.store = store
        self.on_commit = on_commit
        self.commits = 0
        self.last_error: str | None = None
        self._queue: queue.Queue[_Waiting | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="spool-relay-writer", daemon=True)
        start_without_stop_signals(self._thread)

    def write(self, rows: Sequence[Any]) -> None:
        """Return once `rows` are committed; raise StoreError if they could not be."""
        waiting = _Waiting(rows)
        self._queue.put(waiting)
        waiting.done.wait()
        if waiting.error is not None:
            raise waiting.error

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        while (first := self._queue.get()) is not None:
            group, size, stopping = [first], len(first.rows), False
            while size < MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stopping = True
                    break
                group.append(more)
                size += len(more.rows)
            self._commit(group)
            if stopping:
                return

    def _commit(self, group: list[_Waiting]) -> None:
        """Commit one group and wake its callers, each with its outcome. Never raises: the writer must live on."""
        try:
            size = self.store.append(row for waiting in group for row in waiting.rows)
        except StoreError as exc:
            self._fail(group, exc)
            return
        except Exception as exc:
            if len(group) > 1:  # perhaps one caller's rows: commit each caller's alone, so only that one fails
                for waiting in group:
                    self._commit([waiting])
                return
            log.exception("relay: a commit failed unexpectedly; its caller gets 503 and the relay goes on")
            self._fail(group, StoreError(f"commit failed: {type(exc).__name__}: {printable(str(exc))[:200]}"))
            return
        self.commits += 1
        self.last_error = None
        try:
            self.on_commit(size)
        except Exception:
            log.exception("relay: after a commit, telling the agent failed")
        for waiting in group:
            waiting.done.set()

    def _fail(self, group: list[_Waiting], error: StoreError) -> None:
        self.last_error = str(error)  # /healthz says failing until a commit succeeds again
        for waiting in group:
            waiting.error = error
            waiting.done.set()


# -- the HTTP side ----------------------------------------------------------------------------------------


class RelayStats:
    """Counts for /metrics and the summary."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.appended: dict[str, int] = {"http": 0, "statsd": 0}
        self.refused = 0
        self.statsd_invalid = 0
        self.statsd_dropped: dict[str, int] = dict.fromkeys(STATSD_DROPS, 0)
        self.statsd_tags_dropped = 0
        self.busy = 0

    def count(self, name: str, n: int = 1) -> None:
        """Add to one of the counters: refused, statsd_invalid, busy."""
        with self.lock:
            setattr(self, name, getattr(self, name) + n)

    def statsd(self, counts: Counter[str]) -> None:
        """Copy a StatsD reader's counts (its own totals, kept by the listener's thread) for /metrics."""
        with self.lock:
            self.statsd_invalid = counts["invalid"]
            self.statsd_tags_dropped = counts["tags_dropped"]
            self.statsd_dropped = {reason: counts[reason] for reason in STATSD_DROPS}

    def took(self, source: str, n: int) -> None:
        """Count records taken into the spool from `source` (http, statsd)."""
        with self.lock:
            self.appended[source] += n


def _health_of_commits(commit_error: str | None) -> dict[str, Any]:
    """/healthz for a relay that knows nothing more than its own commits."""
    from spool.health import Facts, assess

    verdict = assess(Facts(now=time.time(), commit_error=commit_error))
    return {"status": verdict.verdict, "problems": verdict.texts, "health": verdict.to_dict()}


class Relay:
    """The HTTP endpoint (and optional StatsD listener) in front of one spool."""

    def __init__(self, config: RelaySettings, store: Store, *, t_floor: int = T_FLOOR,
                 on_commit: Callable[[int], None] = lambda n: None,
                 health: Callable[[str | None], dict[str, Any]] | None = None,
                 metrics: Callable[[], bytes] | None = None):
        self.config = config
        self.t_floor = t_floor
        self.stats = RelayStats()
        self.health = health or _health_of_commits  # the agent's: the whole verdict (Metrics.health)
        self.metrics = metrics
        host, port = check_bind(config.listen, "relay.listen", 8080, config.allow_remote)  # before anything starts
        if config.statsd:
            check_bind(config.statsd, "relay.statsd", 8125, config.allow_remote)
        self.identity = spool_identity(store.path)  # on every answer: doctor knows this spool's own relay by it
        self.writer = GroupWriter(store, on_commit)
        self._slots = threading.BoundedSemaphore(config.max_connections)
        try:
            self.server = _Server((host, port), RelayHandler, self)
        except OSError as exc:
            self.writer.stop()
            raise ConfigError(f"cannot listen on {config.listen}: {exc.strerror}") from None
        self.drops = DropLog(log)
        self.statsd = StatsdReader(config.statsd_prefix, tags=config.statsd_tags, set_window=config.statsd_sets,
                                   t_floor=t_floor, drop=config.statsd_drop, on_drop=self.drops.dropped)
        self.udp: list[socket.socket] = []  # one socket per address (localhost: 127.0.0.1 and ::1)
        if config.statsd:
            self.udp = self._bind_statsd(config.statsd)
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._copied: Counter[str] = Counter()  # the reader's counts as /metrics last got them

    def _bind_statsd(self, address: str) -> list[socket.socket]:
        """Bind StatsD's UDP sockets: `localhost` is both loopbacks (clients resolve it to either), else the one."""
        host, port = parse_address(address, "relay.statsd", 8125)
        try:
            if host != "localhost":
                return [self._udp_socket(host, port)]
            for _ in range(20 if port == 0 else 1):  # port 0: a port free on both loopbacks
                v4 = self._udp_socket("127.0.0.1", port)
                try:
                    return [v4, self._udp_socket("::1", v4.getsockname()[1])]
                except OSError as exc:
                    if exc.errno == errno.EADDRINUSE and port == 0:
                        v4.close()
                        continue
                    if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                        v4.close()
                        raise
                    log.warning("StatsD: this box has no IPv6 loopback (::1: %s); listening on %s:%d only",
                                exc.strerror, "127.0.0.1", v4.getsockname()[1])
                    return [v4]
            raise OSError(errno.EADDRINUSE, "no port free on both 127.0.0.1 and ::1")
        except OSError as exc:
            self.server.server_close()
            self.writer.stop()
            raise ConfigError(f"cannot listen for StatsD on {address}: {exc.strerror}") from None

    def _udp_socket(self, host: str, port: int) -> socket.socket:
        udp = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            if ":" in host:
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.config.statsd_buffer)
            udp.bind((host, port))
        except OSError as exc:
            udp.close()
            if ":" in host and exc.errno == errno.EADDRINUSE:
                exc.strerror = f"[{host}]:{port}: {exc.strerror}"
            raise
        udp.setblocking(False)
        return udp

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"

    @property
    def statsd_address(self) -> tuple[str, int] | None:
        """The first StatsD address (127.0.0.1's, for localhost), or None without StatsD."""
        return self.udp[0].getsockname()[:2] if self.udp else None

    @property
    def statsd_addresses(self) -> list[tuple[str, int]]:
        return [udp.getsockname()[:2] for udp in self.udp]

    def snapshot(self) -> dict[str, Any]:
        """What the relay has done, for /metrics: counts copied under the lock, never the live objects."""
        with self.stats.lock:
            return {"appended": dict(self.stats.appended), "refused": self.stats.refused,
                    "statsd_invalid": self.stats.statsd_invalid, "statsd_dropped": dict(self.stats.statsd_dropped),
                    "statsd_tags_dropped": self.stats.statsd_tags_dropped, "busy": self.stats.busy}

    def health_answer(self) -> tuple[int, dict[str, Any]]:
        """The /healthz answer: 200 ok, or 503 with every reason it is failing or degraded (spool.health's
        verdict, with this relay's last commit among the facts)."""
        error = self.writer.last_error
        report = {**self.health(error), "error": error}
        return (200 if report["status"] == "ok" else 503), report

    def start(self) -> Relay:
        thread = threading.Thread(target=self._serve, name="spool-relay", daemon=True)
        start_without_stop_signals(thread)  # and so every connection's thread, started from that one
        self._threads.append(thread)
        if self.udp:
            thread = threading.Thread(target=self._statsd_loop, name="spool-statsd", daemon=True)
            start_without_stop_signals(thread)
            self._threads.append(thread)
        return self

    def _serve(self) -> None:
        self.server.serve_forever(poll_interval=0.5)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._stopping.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(10)
        for udp in self.udp:  # once the loop that reads them ended: a socket closed under select() wakes nothing
            udp.close()
        if self.udp:
            self._write_statsd(self.statsd.flush(time.time(), everything=True))  # a set's last, partial window
        self.writer.stop()

    def _statsd_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                ready, _, _ = select.select(self.udp, [], [], 0.5)
            except OSError:
                return
            if not ready:
                self._statsd_packet(b"", None)  # a set's window may have ended meanwhile
            for udp in ready:
                for _ in range(64):  # a few packets of each socket in turn
                    try:
                        packet, sender = udp.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        return
                    self._statsd_packet(packet, sender)

    def _statsd_packet(self, packet: bytes, sender: Any) -> None:
        wall = time.time()
        records = self.statsd.read(packet, wall, sender) if packet else []
        records += self.statsd.flush(wall)
        self.drops.tick()
        if self.statsd.counts != self._copied:
            self._copied = self.statsd.counts.copy()
            self.stats.statsd(self._copied)
        self._write_statsd(records)

    def _write_statsd(self, records: list[Any]) -> None:
        if records:
            try:
                self.writer.write(records)
                self.stats.took("statsd", len(records))
            except StoreError as exc:
                log.error("StatsD records lost: %s", exc)

    def take(self, parse: Callable[[int], list[Any]], *, batch: bool) -> tuple[str, int]:
        """Parse a request's records and commit them; return ("ok", n), ("refused", 0) or raise StoreError."""
        records = parse(now())
        if not records and not batch:
            raise Refusal("nothing to record")
        if records:
            self.writer.write(records)
        self.stats.took("http", len(records))
        return "ok", len(records)


class RelayHandler(BaseHTTPRequestHandler):
    """One connection to the relay: StatHat's API, answered only after commit; /healthz and /metrics too."""

    protocol_version = "HTTP/1.1"
    server_version = "spool-relay"
    server: _Server
    _loop_said = False  # a loop is logged once per process

    @property
    def relay(self) -> Relay:
        return self.server.relay

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.relay.config.request_timeout)  # per read; the request has a deadline too
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the body until the
        # client's delayed ACK (~40 ms per answer on a keep-alive connection).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # access logs would be one line per stat
        pass

    def handle_one_request(self) -> None:
        # A slow client must not hold a worker: close the connection if a request is not read in time.
        self._timer = threading.Timer(self.relay.config.request_timeout, self._give_up)
        self._timer.daemon = True
        self._timer.start()
        try:
            super().handle_one_request()
        finally:
            self._timer.cancel()

    def _give_up(self) -> None:
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def do_GET(self) -> None:
        self._timer.cancel()
        parts = urlsplit(self.path)
        if parts.path == "/":
            self._send(200, b"", "text/plain")
        elif parts.path == "/healthz":
            code, body = self.relay.health_answer()
            self._send(code, json.dumps(body).encode(), "application/json")
        elif parts.path == "/metrics" and self.relay.metrics is not None:
            self._send(200, self.relay.metrics(), "text/plain; version=0.0.4; charset=utf-8")
        elif parts.path in ("/ez", "/c", "/v") and not self._looped():
            self._take_form(parts.path, parts.query)
        else:
            self._send(404, b"404 page not found\n", "text/plain")

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if parts.path not in ("/ez", "/c", "/v"):
            self._send(404, b"404 page not found\n", "text/plain")
            return
        if self._looped():
            return
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._refuse("chunked bodies are not supported; send Content-Length")
            return
        declared = (self.headers.get("Content-Length") or "0").strip(" \t")  # ASCII digits only: int() reads "+1_0"
        length = int(declared) if declared.isascii() and declared.isdigit() and len(declared) < 19 else -1
        limit = self.relay.config.max_body
        if not 0 <= length <= limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._refuse(f"request body too large (limit {limit} bytes)" if length > 0 else "bad Content-Length")
            return
        body = self.rfile.read(length)
        self._timer.cancel()
        if len(body) < length:
            self.close_connection = True
            return
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if content_type == "application/json":
            self._take(lambda stamp: json_records(body, stamp, self.relay.t_floor), batch=True)
            return
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse("request body is not UTF-8")
            return
        self._take_form(parts.path, f"{parts.query}&{text}" if parts.query else text)

    def _looped(self) -> bool:
        """Refuse (508, taking nothing) a request from the shipper of this very spool: a loop. Its answer carries
        the spool's identity, which that shipper knows for its own (spool.stathat)."""
        if self.relay.identity is None or self.headers.get(IDENTITY_HEADER) != self.relay.identity:
            return False
        if not self._loop_said:
            log.error("relay: a request from the shipper of this very spool (its ship.endpoint is this relay); "
                      "refused: records would come back for ever")
            type(self)._loop_said = True
        self.close_connection = True
        self._send(508, b"508 loop detected: this relay's spool is the one that sent the request\n", "text/plain")
        return True

    def _take_form(self, path: str, query: str) -> None:
        try:
            fields = parse_qs(query, keep_blank_values=True, errors="strict", max_num_fields=50)
        except (ValueError, UnicodeDecodeError):
            self._refuse("malformed form")
            return
        form = {name: values[0] for name, values in fields.items()}
        verbose = form.get("vb") == "1"
        self._take(lambda stamp: form_records(path, form, stamp, self.relay.t_floor), verbose=verbose)

    def _take(self, parse: Callable[[int], list[Any]], *, batch: bool = False, verbose: bool = False) -> None:
        try:
            _, taken = self.relay.take(parse, batch=batch)
        except Refusal as refusal:
            self._refuse(str(refusal))
            return
        except StoreError as exc:
            log.error("relay could not spool a request: %s", exc)
            self._send(503, f"spool unavailable: {exc}".encode("utf-8", "backslashreplace"), "text/plain")
            return
        if batch:
            self._send_json({"status": 200, "msg": "ok", "multiple": taken})
        elif verbose:
            self._send_json({"status": 200, "msg": "ok"})
        else:
            self._send(204, b"", None)

    def _refuse(self, message: str) -> None:
        self.relay.stats.count("refused")
        self._send_json({"status": 500, "msg": message})

    def _send_json(self, answer: dict[str, Any]) -> None:
        self._send(200, json.dumps(answer, separators=(",", ":")).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str | None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        if self.relay.identity:
            self.send_header(IDENTITY_HEADER, self.relay.identity)
        if self.relay.udp:
            self.send_header("Spool-StatsD", " ".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                                                      for host, port in self.relay.statsd_addresses))
        if status != 204:
            self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if status != 204:
            self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    """A threading server with a cap on connections: past it, new ones get 503 at once."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], relay: Relay):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.relay = relay
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.relay._slots.acquire(blocking=False):
            self.relay.stats.count("busy")
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.relay._slots.release()
