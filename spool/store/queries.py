"""The operator's side: counts and status pieces, dead letters (list, requeue, purge), export, moving backlog out,
replay, compaction, pruning sent records, and re-stamping held records once the clock is sane."""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import operator
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar, NamedTuple

from spool.errors import StoreError
from spool.records import INT64_MAX, Kind, Record
from spool.store.core import _FIELDS, _IDS, _SERIES, Core, State, _delete_records, _dumps, _loads, _outside, _translated
from spool.store.queue import (
    QUEUE_FROM,
    QUEUED,
    QUEUED_FROM,
    enqueue,
    enqueue_new,
    front,
    runs_of,
)
from spool.store.schema import _TALLY_STATES, _count_records, _set_tally

PRUNE_STEP = 1000  # sent records deleted per transaction
RELEASE_STEP = 256  # free pages given back to the file system per transaction (tens of ms)
RELEASE_KEEP = 4 << 20  # bytes of free pages always kept for new records (more: a quarter of the pages in use)
WAL_RESET_WAIT = 0.05  # seconds the checkpoint after a long reader waits for the write lock
_INCREMENTAL = 2  # PRAGMA auto_vacuum
COMPACT_STEP = 1000  # pending records' index entries a compaction transaction reads at most
_COMPACTION = "compaction"  # meta: where the compaction pass stands (a _Cursor)

Between = Callable[[], bool]  # called between the transactions of a long job: False stops it (it resumes later)

# Whether a live record `r` is pending (queued, suspect, or held by a lease); a live record that is not is sent.
_WAITING = (f"({QUEUED} OR r.id IN (SELECT id FROM suspects) "
            "OR EXISTS (SELECT 1 FROM lease_runs WHERE r.id BETWEEN lo AND hi))")
# The ids of the pending records that are not queued (suspect, in flight), for `r.id IN (...)`: few.
_HELD_ELSEWHERE = ("SELECT id FROM suspects UNION ALL SELECT r2.id FROM lease_runs CROSS JOIN records r2 "
                   "ON r2.id BETWEEN lo AND hi")
_ROW_ID = operator.itemgetter(0)
_STATE = (f"CASE WHEN r.state != {State.PENDING} THEN r.state WHEN {_WAITING} THEN {State.PENDING} "
          f"ELSE {State.SENT} END")  # a record's state as before version 10 stored it

COUNTED = ("pending", "inflight", "sent", "dead", "held")  # what counts() reports (staged records are not there)
RESTAMP_SLACK = 60  # seconds past now a re-stamped t may land (clock granularity), no more


class Queries(Core):
    """What operators ask of a spool and do to its backlog."""

    def prune_sent(self, *, sent_before: float, step: int = PRUNE_STEP, between: Between | None = None) -> int:
        """Delete SENT records settled before `sent_before`, oldest settled first, about `step` per transaction.

        The runs of ids acknowledgements settled are rows of `settled`, by when: each step takes the oldest of
        them (at least one, then up to `step` ids in all) and deletes the sent records in their ranges, so with
        nothing old enough a run reads one row, whatever the backlog. A record is deleted only if its own
        done_at is before the cut-off too (a range may outlive its records: export --remove, the byte bound).
        `between` is called after each committed step; when it returns False the run stops there (the next one
        goes on). Returns how many records were deleted.
        """
        total = 0
        while True:
            # A step lost in a power cut only leaves records to prune again: its commit need not wait for the disk.
            with self._write(wait=False) as conn:
                n, more = prune_runs(conn, step, sent_before)
            total += n
            if not more or (between is not None and not between()):
                return total

    def release_space(self, *, step: int = RELEASE_STEP, keep: int = RELEASE_KEEP,
                      between: Between | None = None) -> int:
        """Give free pages beyond a reserve back to the file system, `step` pages per transaction; return how many.

        Only a spool made with auto_vacuum=INCREMENTAL (every spool since schema 8 was created so) can: others
        reuse their free pages for new records instead. The reserve (a quarter of the pages in use, at least
        `keep` bytes) is what hourly pruning frees and appends take again, so a spool in its steady state
        moves no page; what a drained backlog and its pruning left is given back over a few housekeeping ticks.
        """
        released = 0
        while self._to_release(self.conn, keep) > 0:  # looked at first without the write lock: mostly, nothing
            with self._write(wait=False) as conn:  # lost in a power cut: the pages are simply still free
                n = min(step, self._to_release(conn, keep))
                for _ in range(n):  # sqlite3 steps a statement without columns once: one page per execute
                    conn.execute("PRAGMA incremental_vacuum(1)")
            released += max(n, 0)
            if between is not None and not between():
                break
        return released

    @staticmethod
    def _to_release(conn: sqlite3.Connection, keep: int) -> int:
        """Return how many free pages are beyond the reserve (0 unless the spool is auto_vacuum=INCREMENTAL)."""
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != _INCREMENTAL:
            return 0
        pages, free, size = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                             for name in ("page_count", "freelist_count", "page_size"))
        return free - max((pages - free) // 4, keep // size)

    # -- dead letters ------------------------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Return dead records, oldest first, with the receiver's reason, status and body."""
        with self._read():
            rows = self.conn.execute(
                f"SELECT r.id, {_FIELDS}, d.done_at, d.reason, d.http_status, d.body FROM dead d CROSS JOIN records r "
                f"ON r.id = d.id {_SERIES} WHERE r.state = {State.DEAD} ORDER BY d.id LIMIT ?",
                (-1 if limit is None else limit,)).fetchall()
        return [{"id": row[0], "record": Record(*row[1:8]), "dead_at": row[8], "reason": row[9],
                 "http_status": row[10], "body": row[11]} for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        """Return dead records (all when `ids` is None) to PENDING; return (how many, ids that are not dead, ids of
        dead letters whose time is unknown). Those were stamped while the clock was wrong and could not be placed
        in time (t is 0): they stay dead, as a record is never shipped with a wrong t."""
        return self._dead_by_ids(ids, requeued=True)

    def purge_dead(self, ids: Sequence[int] | None = None) -> tuple[int, tuple[int, ...]]:
        """Delete dead records (all when `ids` is None); return (how many, ids that are not dead)."""
        return self._dead_by_ids(ids)[:2]

    def _dead_by_ids(self, ids: Sequence[int] | None, *,
                     requeued: bool = False) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
        with self._write() as conn:
            missing: tuple[int, ...] = ()
            unknown: tuple[int, ...] = ()
            if ids is None:
                chosen = [row[0] for row in conn.execute(f"SELECT d.id FROM dead d CROSS JOIN records r ON r.id = d.id "
                                                         f"WHERE r.state = {State.DEAD}")]
            else:
                wanted = sorted(set(ids))
                found = {row[0] for row in conn.execute(f"SELECT id FROM records WHERE state = {State.DEAD} "
                                                        f"AND id IN ({_IDS})", (_dumps(wanted),))}
                missing = tuple(i for i in wanted if i not in found)
                chosen = sorted(found)
            if requeued and chosen:
                unknown = tuple(row[0] for row in conn.execute(
                    f"SELECT id FROM records WHERE id IN ({_IDS}) AND t <= 0 ORDER BY id", (_dumps(chosen),)))
                chosen = [i for i in chosen if i not in set(unknown)]
            listed = _dumps(chosen)
            conn.execute(f"DELETE FROM dead WHERE id IN ({_IDS})", (listed,))
            if requeued:  # pending again, queued by their own ids: at the front
                n = conn.execute(f"UPDATE records SET state = {State.PENDING} WHERE id IN ({_IDS})", (listed,)).rowcount
                enqueue(conn, runs_of(chosen))
            else:
                n = _delete_records(conn, f"id IN ({_IDS})", (listed,))
            self._tally(conn, dead=-n, pending=n if requeued else 0)
            return n, missing, unknown

    # -- what operators see -------------------------------------------------------------------------

    def counts(self, *, staged: bool = False) -> dict[str, int]:
        """Return how many records are in each state (published ones; with `staged`, also how many records
        appends not yet whole hold).

        Kept counts, and the records the live leases name (a few batches): nothing else is read.
        """
        with self._read():  # one snapshot for both reads, so the numbers agree
            kept = self.tally()
            pending, inflight = self.backlog()
        counts = {"pending": pending, "inflight": inflight, "sent": kept["sent"], "dead": kept["dead"],
                  "held": kept["held"]}
        return {**counts, "staged": kept["staged"]} if staged else counts

    def backlog(self) -> tuple[int, int]:
        """Return (pending, in flight): the kept count of pending records, and those of them a lease names."""
        with self._read():
            waiting = self._kept(self.conn, "pending")
            # Leases name few records (max_in_flight batches, and a dead owner's until a shipper frees them): each
            # is looked up by id, never the other way round (the pending records are the backlog).
            inflight = self.conn.execute(f"SELECT count(*) FROM lease_runs CROSS JOIN records "
                                         f"ON records.id BETWEEN lo AND hi WHERE records.state = {State.PENDING}"
                                         ).fetchone()[0]
        return waiting - inflight, inflight

    def count_records(self) -> tuple[dict[str, int], dict[str, int]]:
        """Return the kept counts and a real count of the records, in one snapshot: `doctor --deep` compares them.

        The real count reads every record (seconds on a spool of millions).
        """
        with self._read():
            counted = self.tally(), _count_records(self.conn)
        self._after_long_read()  # it read every record, holding one snapshot
        return counted

    def recount(self) -> tuple[dict[str, int], dict[str, int]]:
        """Set the kept counts to a real count of the records (in one transaction); return (what they were, what
        they are now). Only needed if something changed records without keeping the counts (a release before
        version 8 still running beside this one)."""
        with self._write() as conn:
            kept, real = self.tally(), _count_records(conn)
            _set_tally(conn, real)
        self._after_long_read()
        return kept, real

    def oldest_pending_t(self) -> int | None:
        """The t of the oldest of: the first queued record (the oldest appended of them: the next to ship), the
        suspect ones, those in flight. Not the oldest t of the whole backlog (only a read of it all knows that):
        the age of what shipping has yet to reach."""
        with self._read():
            spans = self.conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
            first = [row[1] for row in front(self.conn, 0, "r.t", "", "", 1, spans=spans)]
            others = self.conn.execute(
                f"SELECT min(t) FROM (SELECT r.t FROM suspects g CROSS JOIN records r ON r.id = g.id "
                f"WHERE 1{_outside(spans, 'g.id')} UNION ALL SELECT r.t FROM lease_runs CROSS JOIN records r "
                f"ON r.id BETWEEN lo AND hi WHERE r.state = {State.PENDING})").fetchone()[0]
            return min([*first, *([] if others is None else [others])], default=None)

    def _keyless_series(self) -> bool:
        """Whether some EZ series has no key of its own (if none has, no record can lack one: nothing to count)."""
        return self.conn.execute("SELECT 1 FROM series WHERE stat IS NOT NULL AND ezkey IS NULL").fetchone() is not None

    def keyless_among_oldest(self, limit: int) -> int:
        """Return how many of the `limit` first queued records are EZ records with no ezkey of their own: a look
        whose cost is `limit`, whatever the backlog (/healthz asks it at every poll). While no key is configured,
        such records are never shipped, so they gather there as the others leave."""
        with self._read():
            if not self._keyless_series():
                return 0
            spans = self.conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
            first = front(self.conn, 0, "s.stat IS NOT NULL AND s.ezkey IS NULL", _SERIES, "", limit, spans=spans)
            return sum(keyless for _, keyless in first)

    def size_bytes(self) -> int:
        """Return the spool's size on disk: the database file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def integrity_ok(self) -> bool:
        with _translated(self.path, self.busy_timeout):
            sound = self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        self._after_long_read()  # it read the whole file, holding one snapshot
        return sound

    def records(self, state: int | None = None) -> Iterator[tuple[int, int, Record]]:
        """Yield (id, state, record) for every record (of one stored state), in append order, streaming."""
        # One statement (one snapshot, however slowly it is consumed) leaves out the records of open stages.
        sql = (f"SELECT r.id, {_STATE} AS derived, {_FIELDS} FROM records r {_SERIES} WHERE NOT EXISTS "
               "(SELECT 1 FROM stage_spans WHERE r.id BETWEEN lo AND hi)")
        cursor = (self.conn.execute(f"{sql} AND derived = ? ORDER BY r.id", (state,)) if state is not None
                  else self.conn.execute(f"{sql} ORDER BY r.id"))
        for row in cursor:
            yield row[0], row[1], Record(*row[2:])

    # -- clock sanity ------------------------------------------------------------------------------

    def restamp_held(self, *, wall: float, mono: float, boot: str, floor: int) -> tuple[int, int]:
        """Give held records their real t, now that the clock (`wall`) is sane; return (restamped, dead).

        A record held in this boot gets t = wall - (mono - its monotonic time), if that lands between `floor`
        and now: a monotonic clock that jumped would place it in the future or before the floor, and such a
        record is not shipped with a wrong time; it becomes DEAD with the reason (counted as
        restamp_refused). One held in an earlier boot cannot be placed in time: DEAD with the reason too.
        Dead letters can be inspected, requeued or purged.
        """
        with self._write() as conn:
            hidden = self._hidden(conn, "h.id")  # held records of an unfinished append wait for it
            held = conn.execute(f"SELECT h.id, h.boot, h.mono FROM held h CROSS JOIN records r ON r.id = h.id "
                                f"WHERE r.state = {State.HELD}{hidden}").fetchall()
            placed, refused, lost = [], [], []
            for record_id, held_boot, held_mono in held:
                if held_boot != boot or held_mono is None:
                    lost.append((wall, "stamped while the clock was wrong, in an earlier boot: its time is unknown",
                                 record_id))
                    continue
                t = int(wall - (mono - held_mono))
                if floor <= t <= wall + RESTAMP_SLACK:
                    placed.append((t, record_id))
                else:
                    refused.append((wall, f"re-stamped to t {t}, which is in the future or before the floor ({floor}): "
                                          "the monotonic clock is not to be trusted; its time is unknown", record_id))
            conn.executemany(f"UPDATE records SET t = ?, state = {State.PENDING} WHERE id = ?", placed)
            enqueue(conn, runs_of(record_id for _, record_id in placed))
            conn.executemany(f"UPDATE records SET state = {State.DEAD} WHERE id = ?",
                             [(record_id,) for *_, record_id in refused + lost])
            conn.executemany("INSERT OR REPLACE INTO dead (done_at, reason, id) VALUES (?, ?, ?)", refused + lost)
            conn.executemany("DELETE FROM held WHERE id = ?", [(row[0],) for row in held])
            self._tally(conn, held=-len(held), pending=len(placed), dead=len(refused) + len(lost))
            if placed:
                self._add_count(conn, "restamped", len(placed))
            if refused:
                self._add_count(conn, "restamp_refused", len(refused))
            return len(placed), len(refused) + len(lost)

    # -- compaction --------------------------------------------------------------------------------

    def compact_counts(self, *, bucket: int, rows: int = COMPACT_STEP, between: Between | None = None) -> int:
        """Merge pending counters (not in flight) of the same key and stat within one `bucket` of seconds.

        Each group becomes one record holding the sum, at the bucket's start: the first of them, rewritten; the
        others are deleted. Exact for counters at that resolution; values are never merged; a sum that would
        leave what validation accepts starts a new record. Returns how many records this call merged away.

        A pass walks the queued records in append order (the queue's runs) from where the last transaction
        stopped, reading at most `rows` records per transaction: no transaction holds the write lock longer than
        that, whatever the backlog, and the whole pass is one walk of the queue. Where it stands is kept in meta
        with the records that hold the sums it used last (up to `rows` of them, by stat and bucket: a bucket
        larger than a step still becomes one record per group, and records appended later with the time of a
        bucket still kept join its sum), and `between`, called after each committed transaction, stops the pass
        when it returns False: the next call resumes it.

        A pass that reached the newest records parks there: later calls merge what is appended after it without
        reading the backlog again. Records queued behind it (given back by a lease, requeued) and sums no longer
        kept wait for the next whole pass, which starts once as many record ids have been given out since it
        parked as the pass read: all told, the walks cost a few times the records appended.
        """
        merged = 0
        while True:
            with self._write(wait=False) as conn:  # lost in a power cut: those records are merely not merged yet
                kept = cursor = self._compaction_cursor(conn, bucket, rows)
                spans = conn.execute("SELECT lo, hi FROM stage_spans").fetchall()  # open stages: not there yet
                entries = front(conn, cursor.id, "r.series, s.kind, r.number, r.t", _SERIES, "", rows, spans=spans)
                end = len(entries) < rows
                cursor, gone = self._merge(conn, cursor, entries, rows)
                if gone:
                    self._add_count(conn, "compacted", gone)
                if end and cursor.parked_at is None:
                    cursor = cursor._replace(parked_at=_newest_id(conn))
                if cursor != kept:  # a parked pass that found nothing new writes nothing (an idle box, every tick)
                    self._set_meta(conn, {_COMPACTION: cursor._asdict()})
            merged += gone
            if end or (between is not None and not between()):
                return merged

    def _compaction_cursor(self, conn: sqlite3.Connection, bucket: int, rows: int) -> _Cursor:
        """Where the pass stands (kept in meta), its sums checked: a new pass when none is kept for this bucket size,
        or when a parked one has seen as many new ids as it read."""
        kept = conn.execute("SELECT value FROM meta WHERE name = ?", (_COMPACTION,)).fetchone()
        try:
            cursor = _Cursor(**_loads(kept[0])) if kept is not None else None
        except (TypeError, ValueError):  # not one this release wrote: a new pass
            cursor = None
        if cursor is None or cursor.bucket != bucket or any(len(kept) != 4 for kept in cursor.sums):
            return _Cursor(bucket)
        if cursor.parked_at is not None:
            newest = _newest_id(conn)
            if newest - cursor.parked_at >= max(cursor.read, rows):
                return _Cursor(bucket)
        return cursor

    def _merge(self, conn: sqlite3.Connection, cursor: _Cursor, entries: list[tuple[Any, ...]],
               rows: int) -> tuple[_Cursor, int]:
        """Fold a step's entries (rows of `front`) into the sums of their buckets; return where the pass stands
        after them, and how many records were merged away."""
        if not entries:
            return cursor, 0
        bucket = cursor.bucket
        # (group, bucket index) -> [the record holding the sum, the sum, whether this step changed it]
        sums = {(group, at): [record_id, total, False] for group, at, record_id, total in cursor.sums}
        # A record holding a kept sum may have been leased, shipped or dropped since: then it holds it no more.
        # Only the sums this step's records would join are looked at (not every sum kept).
        wanted = [sums[key][0] for key in {(group, t // bucket) for _, group, _, _, t in entries} if key in sums]
        if wanted:
            holding = dict(conn.execute(f"SELECT r.id, r.number FROM records r WHERE r.id IN ({_IDS}) "
                                        f"AND r.state = {State.PENDING} AND {QUEUED}", (_dumps(wanted),)).fetchall())
            sums = {key: kept for key, kept in sums.items()
                    if kept[0] not in wanted or holding.get(kept[0], _GONE) == kept[1]}
        gone: list[int] = []
        changed: list[tuple[Any, ...]] = []
        for record_id, group, kind, number, t in entries:
            if kind != Kind.COUNT or t <= 0:
                continue
            key = (group, t // bucket)
            into = sums.pop(key, None)  # put back last: the sums most recently used are those carried on
            if into is not None and into[0] == record_id:  # the record holding the sum, read again
                sums[key] = into
                continue
            total = into[1] + number if into is not None else number
            if into is None or not _fits(total):
                if into is not None and into[2]:  # full: it keeps what it holds
                    changed.append((into[1], key[1] * bucket, into[0]))
                sums[key] = [record_id, number, False]  # this record holds the group's sum from here on
                continue
            into[1], into[2] = total, True
            sums[key] = into
            gone.append(record_id)
        changed += [(total, at * bucket, held) for (_, at), (held, total, dirty) in sums.items() if dirty]
        if gone or changed:
            self._tally(conn, pending=-_delete_queued(conn, gone))
            # A record holding a sum moves to its bucket's start (its place in the queue is its id: unchanged).
            conn.executemany("UPDATE records SET number = ?, t = ? WHERE id = ?", changed)
        last = entries[-1]
        read = cursor.read if cursor.parked_at is not None else cursor.read + len(entries)
        # The sums most recently used are carried into the next step (the walk may meet their buckets again), as
        # many as a step reads at most.
        kept = list(sums.items())[-rows:]
        carried = [[group, at, held, total] for (group, at), (held, total, _) in kept]
        return cursor._replace(id=last[0], read=read, sums=carried), len(gone)

    # -- moving backlog ----------------------------------------------------------------------------

    # "all" leaves out HELD records, and "dead" and "all" the dead letters they became when they could not be placed
    # in time: their time is not known, so no file can carry them (import refuses t=0). Each selection is one or
    # more sources (FROM, WHERE), each read in id order: pending records are the queue's (read run by run, never
    # the sent ones) and the few suspect or in flight.
    _SELECTIONS: ClassVar[dict[str, list[tuple[str, str, str]]]] = {
        "pending": [(QUEUED_FROM, f"r.state = {State.PENDING} AND {QUEUE_FROM}", "q.lo, r.id"),
                    ("records r", f"r.state = {State.PENDING} AND r.id IN ({_HELD_ELSEWHERE})", "r.id")],
        "sent": [("records r", f"r.state = {State.PENDING} AND NOT {_WAITING}", "r.id")],
        "dead": [("records r", f"r.state = {State.DEAD} AND r.t > 0", "r.id")],
        "all": [("records r", f"(r.state = {State.PENDING} OR (r.state = {State.DEAD} AND r.t > 0))", "r.id")]}

    def _selected(self, conn: sqlite3.Connection, state: str, since: int | None, until: int | None,
                  stat_glob: str | None, columns: str, *, after: int = 0, limit: int = -1,
                  extra: str = "") -> Iterator[Any]:
        """Yield rows (r.id, then `columns`) of the selected records with ids above `after`, in id order (at most
        `limit`); `extra`: more conditions, each starting with AND."""
        if state not in self._SELECTIONS:
            raise StoreError(f"state must be one of {', '.join(self._SELECTIONS)}, not '{state}'")
        where, params = self._filters(since, until, stat_glob)
        hidden = self._hidden(conn, "r.id")
        parts = []
        for source, condition, order in self._SELECTIONS[state]:
            # The queue's runs: each read from after+1 on, from the first one worth reading.
            starts = (after + 1,) * source.count("?") + (after,) * condition.count("?")
            parts.append(conn.execute(f"SELECT r.id, {columns} FROM {source} {_SERIES} WHERE {condition}{where}"
                                      f"{hidden}{extra} AND r.id > ? ORDER BY {order} LIMIT ?",
                                      (*starts, *params, after, limit)))
        rows = parts[0] if len(parts) == 1 else heapq.merge(*parts, key=_ROW_ID)
        return itertools.islice(rows, limit) if limit >= 0 else iter(rows)

    def _filters(self, since: int | None, until: int | None, stat_glob: str | None) -> tuple[str, list[Any]]:
        where, params = "", list[Any]()
        for condition, value in (("r.t >= ?", since), ("r.t <= ?", until), ("s.stat GLOB ?", stat_glob)):
            if value is not None:
                where += f" AND {condition}"
                params.append(value)
        return where, params

    def count_selected(self, state: str, *, since: int | None = None, until: int | None = None,
                       stat_glob: str | None = None) -> int:
        """Count what `export` would write (records in flight are left out)."""
        return self._count(state, *self._filters(since, until, stat_glob), in_flight=False)

    def _count(self, state: str, where: str, params: Sequence[Any] = (), *, in_flight: bool = True) -> int:
        """Count the records a selection (see _SELECTIONS) holds, `where` (conditions starting with AND) too."""
        if state not in self._SELECTIONS:
            raise StoreError(f"state must be one of {', '.join(self._SELECTIONS)}, not '{state}'")
        with self._read():
            hidden = self._hidden(column="r.id") + ("" if in_flight else self._in_flight(self.conn, "r.id"))
            return sum(self.conn.execute(f"SELECT count(*) FROM {source} {_SERIES} WHERE {condition}{where}{hidden}",
                                         (0,) * (source + condition).count("?") + tuple(params)).fetchone()[0]
                       for source, condition, _ in self._SELECTIONS[state])

    def export(self, state: str, *, since: int | None = None, until: int | None = None,
               stat_glob: str | None = None) -> Iterator[tuple[int, Record]]:
        """Yield (id, record) of the selected records in append order, streaming (one read snapshot); records in
        flight are left out, as `move_out` leaves them.

        Pending records are read from the queue's runs (and the few suspect or in flight): the cost of the
        pending records, whatever the spool keeps besides. Once the snapshot is let go, the WAL it held back is
        checkpointed (`_after_long_read`).
        """
        try:
            with self._read():
                in_flight = self._in_flight(self.conn, "r.id")  # being sent: exported, they could be sent twice
                for row in self._selected(self.conn, state, since, until, stat_glob, _FIELDS, extra=in_flight):
                    yield row[0], Record(*row[1:])
        finally:
            self._after_long_read()

    def _after_long_read(self) -> None:
        """Checkpoint the WAL a long reader held back, without keeping any writer waiting long.

        While a snapshot is held, nothing appended after it can be checkpointed, so the WAL grows with every
        commit (a drain writes hundreds of bytes per record). Once it is let go, everything can be copied; the
        next commit then starts the WAL over and cuts the file back to journal_size_limit (WAL_LIMIT).
        """
        with contextlib.suppress(sqlite3.Error):  # a courtesy to the disk: a busy spool leaves it to a later one
            self.checkpoint(wait=WAL_RESET_WAIT)

    def move_out(self, state: str, write: Callable[[list[Record]], None], *, since: int | None = None,
                 until: int | None = None, stat_glob: str | None = None, chunk: int = 10_000) -> int:
        """Hand the selected records to `write` a chunk at a time and delete each chunk once `write` returned.

        Each chunk is selected, written (the callback must make it durable: flush and fsync) and deleted in
        one transaction, so a record leaves the spool only after it is in the file, and no shipper can lease
        it meanwhile. Records in flight are skipped (they are being sent). A crash can leave at most the last
        chunk both in the file and in the spool; never in neither. Returns how many records moved.
        """
        moved, after = 0, 0
        while True:
            with self._write() as conn:
                rows = list(self._selected(conn, state, since, until, stat_glob, f"{_FIELDS}, {_STATE}", after=after,
                                           limit=chunk, extra=self._in_flight(conn, "r.id")))
                if not rows:
                    return moved
                write([Record(*row[1:8]) for row in rows])
                ids = [row[0] for row in rows]
                listed = _dumps(ids)
                for table in ("suspects", "dead"):
                    conn.execute(f"DELETE FROM {table} WHERE id IN ({_IDS})", (listed,))
                _delete_records(conn, f"id IN ({_IDS})", (listed,))
                states = [row[8] for row in rows]  # every one deleted: selected in this transaction
                self._tally(conn, **{_TALLY_STATES[State(state)]: -states.count(state) for state in set(states)})
            moved += len(rows)
            after = ids[-1]

    def replay(self, *, since: int | None, until: int | None, stat_glob: str | None = None) -> int:
        """Queue pending copies of retained SENT records (StatHat will count them again); return how many."""
        where, params = self._filters(since, until, stat_glob)
        with self._bounded() as conn:
            since = _newest_id(conn)
            copied = collections.Counter(series for (series,) in conn.execute(
                f"INSERT INTO records (series, number, t) SELECT r.series, r.number, r.t FROM records r {_SERIES} "
                f"WHERE {self._SELECTIONS['sent'][0][1]}{where} ORDER BY r.id RETURNING series", params))
            conn.executemany("UPDATE series SET refs = refs + ? WHERE id = ?", [(n, s) for s, n in copied.items()])
            queued = sum(copied.values())
            if queued > 0:  # one statement: its records have consecutive ids, up to the last given
                newest = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                enqueue_new(conn, newest - queued + 1, newest)
            self._tally(conn, pending=queued)
            self._enforce(conn, queued, since=since)
            return queued


def prune_runs(conn: sqlite3.Connection, step: int, before: float | None) -> tuple[int, bool]:
    """Delete the sent records of the oldest settled runs (settled before `before`, if given), up to `step`
    ids of ranges (at least one run); return (records deleted, whether older runs are left)."""
    cut = "" if before is None else "WHERE done_at < ? "
    rows = conn.execute(f"SELECT done_at, lo, hi FROM settled {cut}ORDER BY done_at, lo LIMIT ?",
                        (step,) if before is None else (before, step)).fetchall()
    taken, span = 0, 0
    for _, lo, hi in rows:
        if taken and span + hi - lo + 1 > step:
            break
        taken, span = taken + 1, span + hi - lo + 1
    runs = rows[:taken]
    # A run holds the records one acknowledgement settled: live ones there are sent (none is ever pending again).
    deleted = _delete_records(conn, f"id BETWEEN ? AND ? AND state = {State.PENDING}",
                              each=[(lo, hi) for _, lo, hi in runs])
    Core._tally(conn, sent=-deleted)
    conn.executemany("DELETE FROM settled WHERE done_at = ? AND lo = ?", [(done, lo) for done, lo, _ in runs])
    return deleted, taken < len(rows) or len(rows) == step


class _Cursor(NamedTuple):
    """Where a compaction pass stands: past record `id` in the queue, having read `read` records; parked
    (when the ids given out reached `parked_at`) once it read the newest. `sums`: [group, bucket index, id, total]
    of the records holding the sums it used last."""

    bucket: int
    id: int = 0
    read: int = 0
    parked_at: int | None = None
    sums: list[list[Any]] = []  # noqa: RUF012 - a NamedTuple's default, never mutated


_GONE = object()


def _newest_id(conn: sqlite3.Connection) -> int:
    """The highest record id ever given out (ids are never reused)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
    return 0 if row is None else row[0]


def _delete_queued(conn: sqlite3.Connection, ids: list[int]) -> int:
    """Delete queued records by id; return how many. Their ids stay in the queue's runs (nothing is queued there
    any more, and the next lease walking past takes them out): cutting each out would split a run per record,
    where a compaction pass merges most records away."""
    if not ids:
        return 0
    return _delete_records(conn, f"id IN ({_IDS})", (_dumps(ids),))


def _fits(total: int | float) -> bool:
    """Whether a sum is still a number validation accepts (a 64-bit integer, a finite float)."""
    return abs(total) <= INT64_MAX if isinstance(total, int) else math.isfinite(total)
