"""The producers' side: appending records (staged in chunks when large), stages and their sweep, and the bounds
(max_pending, max_spool_bytes, max_age) enforced at the end of each appending transaction."""

from __future__ import annotations

import collections
import contextlib
import itertools
import operator
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from spool.errors import SpoolFull, StoreError
from spool.records import Record
from spool.store.core import _IDS, SERIES_EPOCH, Core, State, _delete_records, _dumps, _log, _outside
from spool.store.files import FileMark
from spool.store.queries import _delete_queued, _newest_id, prune_runs
from spool.store.queue import enqueue_new, front

STAGE_CHUNK = 20_000  # rows: an append larger than this is staged in transactions of this size
SWEEP_CHUNK = 20_000  # rows deleted per transaction when discarding a stage

SERIES_CACHE = 100_000  # series a Store remembers (stat, key, ukey, ezkey, kind -> id); more: it starts afresh
_ONE_MORE = "UPDATE tally SET pending = pending + 1"
_SERIES_OF = "SELECT id FROM series WHERE stat IS ? AND key IS ? AND ukey IS ? AND ezkey IS ? AND kind = ?"
_NEW_SERIES = "INSERT INTO series (stat, key, ukey, ezkey, kind) VALUES (?, ?, ?, ?, ?) RETURNING id"
_SHAPE = operator.itemgetter(0, 1, 2, 3, 4)
_NUMBER, _T = operator.itemgetter(5), operator.itemgetter(6)


class Appends(Core):
    """Committing records: all or nothing, however many."""

    def append(self, records: Iterable[Sequence[Any]], *, file: FileMark | None = None,
               chunk: int = STAGE_CHUNK) -> int:
        """Commit `records` (Records, or tuples of the same shape; consumed lazily), all or nothing.

        Returns how many were committed. With `file`, that file's mark is committed with them (replacing
        any earlier mark for its path). If iterating raises (a record failed validation), nothing from this
        call is committed.

        Up to `chunk` records go in one transaction. A larger append is staged: written `chunk` records per
        transaction, hidden by the spans of ids of its open stage, then published by deleting those spans in
        the transaction that also commits the file mark and enforces the bounds. No transaction holds the
        write lock for long, so a shipper's acknowledgement is never kept waiting by a big import.
        """
        with self._synced() if file is not None else contextlib.nullcontext():
            return self._append(iter(records), file, chunk)

    def _append(self, rows: Iterator[Sequence[Any]], file: FileMark | None, chunk: int) -> int:
        first = list(itertools.islice(rows, chunk))
        extra = next(rows, None) if len(first) == chunk else None
        if extra is None:
            with self._bounded() as conn:
                since = _newest_id(conn)
                held = self._insert(conn, first)
                self._tally(conn, pending=len(first) - held, held=held)
                if file is not None:
                    self._mark_file(conn, file._replace(records=len(first)))
                self._enforce(conn, len(first), held=held, since=since)
            return len(first)
        return self._append_staged(itertools.chain(first, [extra], rows), file, chunk)

    @contextlib.contextmanager
    def _synced(self) -> Iterator[None]:
        """Commit with synchronous=FULL whatever the spool's mode: a dropped file's records must be on disk
        before the file leaves its directory for good (with "normal" a power cut could lose both)."""
        if self.synchronous == "full":
            yield
            return
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self.conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")

    def _append_staged(self, rows: Iterator[Sequence[Any]], file: FileMark | None, chunk: int) -> int:
        self.sweep_stages()
        owner = self.owners.claim()
        with self._write() as conn:
            stage = conn.execute("INSERT INTO stages (owner, started_at) VALUES (?, ?) RETURNING id",
                                 (owner, time.time())).fetchone()[0]
        taken = held = 0
        try:
            while part := list(itertools.islice(rows, chunk)):
                # A chunk's commit need not wait for the disk: the WAL is one file appended in order, so the last
                # transaction's sync makes every chunk durable with it; a power cut before that loses a stage
                # that was never published (swept as its owner's), never a record of an append that returned.
                with self._write(wait=False) as conn:
                    self._check_stage(conn, stage, taken)  # one discarded under us stops here, not at the end
                    held += self._stage_chunk(conn, stage, part)
                taken += len(part)
            with self._bounded() as conn:
                self._check_stage(conn, stage, taken)  # whole, or not at all
                since = conn.execute("SELECT min(lo) - 1 FROM stage_spans WHERE stage = ?", (stage,)).fetchone()[0]
                # Publishing the whole append is deleting its spans: no record is rewritten.
                conn.execute("DELETE FROM stage_spans WHERE stage = ?", (stage,))
                conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
                self._tally(conn, staged=-taken, pending=taken - held, held=held)  # _check_stage: all `taken` are there
                if file is not None:
                    self._mark_file(conn, file._replace(records=taken))
                self._enforce(conn, taken, held=held, since=since or 0)
        except BaseException:
            with contextlib.suppress(StoreError):
                self._discard_stage(stage)
            raise
        return taken

    def _check_stage(self, conn: sqlite3.Connection, stage: int, taken: int) -> None:
        """Raise StoreError unless the stage is still open and its spans hold every one of the `taken` records it
        staged: another process that took its owner for dead may have discarded it, or begun to."""
        left = conn.execute("SELECT coalesce(sum(hi - lo + 1), 0) FROM stage_spans WHERE stage = ?",
                            (stage,)).fetchone()[0]
        if left != taken or conn.execute("SELECT 1 FROM stages WHERE id = ?", (stage,)).fetchone() is None:
            raise StoreError(f"spool {self.path}: this append's staged records were discarded by another process "
                             f"that took their owner for dead ({left:,} of {taken:,} left): nothing was appended; "
                             "try again")

    def _stage_chunk(self, conn: sqlite3.Connection, stage: int, part: list[Sequence[Any]]) -> int:
        """Insert one chunk of an open stage and name its ids in the stage's spans, in one transaction (so no
        reader ever sees them outside a span), counted as staged; hold those stamped while the clock was wrong.
        Returns how many are held."""
        lo, hi = self._insert_records(conn, part)
        if not conn.execute("UPDATE stage_spans SET hi = ? WHERE stage = ? AND hi = ?", (hi, stage, lo - 1)).rowcount:
            conn.execute("INSERT INTO stage_spans (lo, hi, stage) VALUES (?, ?, ?)", (lo, hi, stage))
        self._tally(conn, staged=len(part))
        return self._queue_new(conn, lo, hi, part)

    def _discard_stage(self, stage: int) -> None:
        """Delete an unfinished append's records, at most SWEEP_CHUNK per transaction, each shrinking its span
        with them (what is left stays hidden), then the stage itself."""
        while True:
            with self._write() as conn:
                span = conn.execute("SELECT lo, hi FROM stage_spans WHERE stage = ? ORDER BY lo LIMIT 1",
                                    (stage,)).fetchone()
                if span is None:
                    conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
                    return
                lo, hi = span
                end = min(hi, lo + SWEEP_CHUNK - 1)
                conn.execute("DELETE FROM held WHERE id BETWEEN ? AND ?", (lo, end))
                self._tally(conn, staged=-_delete_records(conn, "id BETWEEN ? AND ?", (lo, end)))
                if end == hi:
                    conn.execute("DELETE FROM stage_spans WHERE lo = ?", (lo,))
                else:
                    conn.execute("UPDATE stage_spans SET lo = ? WHERE lo = ?", (end + 1, lo))

    def sweep_stages(self) -> int:
        """Discard the staged records of appends whose owner died before finishing; return how many stages."""
        dead = [stage for stage, owner in self.conn.execute("SELECT id, owner FROM stages").fetchall()
                if not self.owners.is_alive(owner)]
        for stage in dead:
            self._discard_stage(stage)
        self.owners.sweep()  # and the lock files of owners that died owning nothing
        return len(dead)

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[sqlite3.Connection]:
        """An appending transaction; the block ends by calling `_enforce` with what it added.

        A SpoolFull from it rolls back the whole transaction and is counted.
        """
        try:
            with self._write() as conn:
                yield conn
        except SpoolFull as full:
            self.add_counts(refused_full=full.refused)  # records, as every other counter of drops counts
            raise

    def _enforce(self, conn: sqlite3.Connection, incoming: int, *, held: int = 0, since: int = 0) -> None:
        """Bring the spool back within its limits at the end of an appending transaction.

        `incoming` records were added (ids above `since`), `held` of them held. Records waiting count against
        max_pending whether pending (in flight included) or held. drop_oldest: sent records give way first when
        the bound is in bytes, then held records (their time is unknown: a box whose clock is wrong keeps what it
        can ship), oldest appended first, then the oldest pending records not in flight; all counted in the
        same commit. Never this append's own records: when nothing older can make room (everything else in
        flight), the append is refused whole (SpoolFull), as with reject_new, rather than reported taken and
        dropped.
        """
        limits = self.limits
        if limits is None:
            return
        reject = limits.when_full == "reject_new"
        dropped = 0
        if limits.max_pending is not None:
            waiting = self._kept(conn, "pending") + self._kept(conn, "held")
            excess = waiting - limits.max_pending
            if excess > 0 and reject:
                raise SpoolFull(f"spool full: {waiting - incoming} records waiting, the limit is "
                                f"{limits.max_pending}; {incoming} new records refused", refused=incoming)
            if excess > 0 and incoming > limits.max_pending:
                raise SpoolFull(f"spool full: these {incoming} records alone are more than max_pending "
                                f"({limits.max_pending}): refused (raise the bound, or append them in parts)",
                                refused=incoming)
            if excess > 0:
                dropped += self._drop_oldest(conn, excess, since)
                if dropped < excess:
                    raise SpoolFull(f"spool full: {waiting - incoming} records waiting, the limit is "
                                    f"{limits.max_pending}, and only records in flight are older than these "
                                    f"{incoming}: refused (try again once the shipper settles them)",
                                    refused=incoming)
        if limits.max_spool_bytes is not None:
            while (used := self._used_bytes(conn)) > limits.max_spool_bytes:
                if self._prune_some(conn):
                    continue  # delivered records give way first
                if reject:
                    raise SpoolFull(f"spool full: {used} bytes in use, the limit is {limits.max_spool_bytes}; "
                                    f"{incoming} new records refused", refused=incoming)
                step = self._drop_oldest(conn, 1000, since)
                if not step:
                    raise SpoolFull(f"spool full: {used} bytes in use, the limit is {limits.max_spool_bytes}, "
                                    f"and nothing older than these {incoming} records can make room (in flight, "
                                    "dead letters): refused", refused=incoming)
                dropped += step
        if dropped:  # one line for the whole append (at most a line a minute), with what it dropped in all
            if self._losses is None:
                from spool.health import LossLog

                self._losses = LossLog(_log())
            self._losses.say("oldest", dropped, "spool is at its limit: dropped %d oldest waiting records{}")

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * conn.execute("PRAGMA page_size").fetchone()[0]

    def _prune_some(self, conn: sqlite3.Connection) -> int:
        # The oldest settled first, by their runs (`settled`): with no sent records left, one row is read.
        while True:
            deleted, more = prune_runs(conn, 1000, None)
            if deleted or not more:
                return deleted

    def _drop_oldest(self, conn: sqlite3.Connection, n: int, since: int) -> int:
        """Delete up to n of the oldest waiting records appended before id `since` (held ones first, then pending
        ones not in flight, queued or suspect, oldest appended first), counted as dropped_oldest; return how many."""
        hidden = self._hidden(conn, "h.id")
        held = [row[0] for row in conn.execute(
            f"SELECT h.id FROM held h CROSS JOIN records r ON r.id = h.id WHERE r.state = {State.HELD} AND h.id <= ?"
            f"{hidden} ORDER BY h.id LIMIT ?", (since, n))]
        gone_held = 0
        if held:
            listed = _dumps(held)
            conn.execute(f"DELETE FROM held WHERE id IN ({_IDS})", (listed,))
            gone_held = _delete_records(conn, f"id IN ({_IDS})", (listed,))
            self._tally(conn, held=-gone_held)
        gone = 0
        if len(held) < n:  # the first queued, in append order, and suspects (refused in a batch) older than those
            spans = conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
            oldest = [row[0] for row in front(conn, 0, "r.t", "", f" AND r.id <= {int(since)}", n - len(held),
                                              spans=spans)]
            suspects = [row[0] for row in conn.execute(
                f"SELECT g.id FROM suspects g CROSS JOIN records r ON r.id = g.id WHERE r.state = {State.PENDING} "
                f"AND g.id <= ?{_outside(spans, 'g.id')} ORDER BY g.id LIMIT ?", (since, n - len(held)))]
            if suspects:
                oldest = sorted(oldest + suspects)[:n - len(held)]
                conn.execute(f"DELETE FROM suspects WHERE id IN ({_IDS})", (_dumps(oldest),))
            gone = _delete_queued(conn, oldest)
        self._tally(conn, pending=-gone)
        if gone + gone_held:
            self._add_count(conn, "dropped_oldest", gone + gone_held)
        return gone + gone_held

    def _insert(self, conn: sqlite3.Connection, rows: list[Sequence[Any]]) -> int:
        """Insert Record-shaped rows and queue them; return how many of them are held (see `_queue_new`)."""
        if not rows:
            return 0
        return self._queue_new(conn, *self._insert_records(conn, rows), rows)

    def _insert_records(self, conn: sqlite3.Connection, rows: list[Sequence[Any]]) -> tuple[int, int]:
        """Insert Record-shaped rows as (series, number, t); return the (first, last) ids they were given.

        Ids are given one past the highest ever given (AUTOINCREMENT), one after the other inside the write
        lock, so the rows of one statement have consecutive ids.
        """
        if operator.countOf(map(len, rows), 7) != len(rows):
            raise StoreError("spool: a record to append does not have the 7 fields of a Record")
        self._recall_series(conn)
        shapes = list(map(_SHAPE, rows))
        # This append's own map: the Store's memory starts afresh when it is full, perhaps halfway through these.
        wanted = set(shapes)
        series = {shape: self._series[shape] for shape in wanted.intersection(self._series)}
        for shape in wanted.difference(series):
            series[shape] = self._series_id(conn, shape)
        ids = list(map(series.__getitem__, shapes))
        conn.executemany("INSERT INTO records (series, number, t) VALUES (?, ?, ?)",
                         zip(ids, map(_NUMBER, rows), map(_T, rows), strict=True))
        conn.executemany("UPDATE series SET refs = refs + ? WHERE id = ?",
                         [(n, s) for s, n in collections.Counter(ids).items()])
        hi = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
        return hi - len(rows) + 1, hi

    def _recall_series(self, conn: sqlite3.Connection) -> None:
        """Forget the series this Store remembers if any was forgotten in the spool since (by `_delete_records`)."""
        row = conn.execute(f"SELECT value FROM meta WHERE name = '{SERIES_EPOCH}'").fetchone()
        epoch = None if row is None else row[0]
        if epoch != self._series_epoch:
            self._series.clear()
            self._series_epoch = epoch

    def _series_id(self, conn: sqlite3.Connection, shape: tuple[Any, ...]) -> int:
        """Return the id of a series (stat, key, ukey, ezkey, kind), adding it if the spool has none yet. Inside
        the write lock: no other process can add the same one meanwhile."""
        known = self._series.get(shape)
        if known is not None:
            return known
        if len(self._series) >= SERIES_CACHE:
            self._series.clear()
        row = conn.execute(_SERIES_OF, shape).fetchone()
        if row is None:
            row = conn.execute(_NEW_SERIES, shape).fetchone()
            self._fresh_series.append(shape)
        self._series[shape] = row[0]
        return row[0]

    @staticmethod
    def _queue_new(conn: sqlite3.Connection, lo: int, hi: int, rows: list[Sequence[Any]]) -> int:
        """Queue the records just inserted with ids lo..hi (`rows`, in order); hold those stamped while the clock
        was wrong.

        A record stamped while the clock was wrong arrives with t = 0 (records.HELD_T): it becomes HELD, with the
        boot it was stamped in and that boot's monotonic clock, instead of queued. Queueing the others is one row
        of the queue's runs changed, mostly. Returns how many were held.
        """
        held = [lo + i for i, t in enumerate(map(_T, rows)) if t == 0] if 0 in map(_T, rows) else []
        enqueue_new(conn, lo, hi, held)
        if held:
            listed = _dumps(held)
            conn.execute(f"UPDATE records SET state = {State.HELD} WHERE id IN ({_IDS})", (listed,))
            conn.execute("INSERT INTO held (id, boot, mono) SELECT value, boot_id(), boot_clock() FROM json_each(?)",
                         (listed,))
        return len(held)

    def drop_expired(self, *, now: float, step: int = 1000) -> int:
        """Delete the queued records at the front of the queue (the oldest appended, not in flight) whose t is
        older than max_age, up to the first that is not, and suspect ones that old: they would not be shipped.
        Queued ones further back are deleted when a lease walks past them (`lease`). At most `step` per
        transaction; returns how many."""
        if self.max_age is None:
            return 0
        dropped, cutoff = 0, now - self.max_age
        while True:
            with self._write() as conn:
                spans = conn.execute("SELECT lo, hi FROM stage_spans").fetchall()
                first = front(conn, 0, "r.t", "", "", step, spans=spans)
                old = list(itertools.takewhile(lambda row: row[1] < cutoff, first))
                if not dropped:  # suspects (records refused together, being split apart) are few: all at once
                    old += conn.execute(f"SELECT g.id, r.t FROM suspects g CROSS JOIN records r ON r.id = g.id "
                                        f"WHERE r.t < ?{_outside(spans, 'g.id')}", (cutoff,)).fetchall()
                    conn.execute(f"DELETE FROM suspects WHERE id IN ({_IDS})", (_dumps([row[0] for row in old]),))
                gone = _delete_queued(conn, [row[0] for row in old])
                if gone:
                    self._tally(conn, pending=-gone)
                    self._add_count(conn, "dropped_age", gone)
            dropped += gone
            if len(old) < step:
                return dropped

    def append_one(self, record: Record) -> None:
        """Commit one record: its INSERT and the pending count's +1, the least a transaction can be."""
        if self.limits is not None or record[6] == 0:  # bounds, or a held record: the whole append
            self.append([record])
            return
        with self._write() as conn:
            self._recall_series(conn)
            series = self._series_id(conn, record[:5])
            record_id = conn.execute("INSERT INTO records (series, number, t) VALUES (?, ?, ?) RETURNING id",
                                     (series, record[5], record[6])).fetchone()[0]
            conn.execute("UPDATE series SET refs = refs + 1 WHERE id = ?", (series,))
            enqueue_new(conn, record_id, record_id)
            conn.execute(_ONE_MORE)
