"""The shipper's side: leases, acknowledgements, suspects (records refused together, split apart), dead marking,
and releasing the leases of owners that died. The storage contract (in spool/store/__init__.py) says what each
guarantees.

The ledger (schemas 10 and 11) keeps books per batch, not per record: a lease is one row and the runs of ids it
holds; leasing takes its records out of the queue's runs, an acknowledgement writes a row of `settled` per run
and ends the lease. No record is rewritten when it is shipped.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from spool.owners import PREFIX, is_legacy
from spool.records import INT64_MAX, Record
from spool.store.core import _FIELDS, _IDS, _SERIES, Core, State, _delete_records, _dumps, _log
from spool.store.queue import (
    QUEUE_FROM,
    QUEUED_FROM,
    dequeue,
    enqueue,
    front,
    intersect,
    queued_between,
    queued_ids,
    runs_of,
    subtract,
)

MAX_BODY = 2000  # characters of a refusal's response body kept with a dead record

ACK_RUN = 4  # kept for callers that read it: acknowledgements are by runs of ids whatever their shape
_KEYED = "(s.ezkey IS NOT NULL OR s.key IS NOT NULL)"
_ID = operator.itemgetter(0)


class Leased(NamedTuple):
    """A record the shipper holds a lease on: its id and its stored fields (one row of the lease's query)."""

    id: int
    stat: str | None
    key: str | None
    ukey: str | None
    ezkey: str | None
    kind: int
    number: int | float
    t: int

    @property
    def record(self) -> Record:
        return Record(*self[1:])


# A lease's rows become Leased in C, without a Python call per row (500 of them per batch).
_leased: Callable[[Sequence[Any]], Leased] = functools.partial(tuple.__new__, Leased)


class Lease(NamedTuple):
    """A batch leased to the shipper: the lease's own id and its records, in append order.

    A lease asked `built` may come as the `data` array of its EZ request instead, built by SQLite (`items` is then
    empty): records lo..hi (`span`, every id of it), each an EZ stat with no key of its own and an integer number;
    the oldest t among them is `min_t` (when the spool has a max_age; else it may be 0). The shipper reads the
    records themselves only if it must (a refusal, or a max_age they may have passed).
    """

    id: int
    items: list[Leased]
    version: int = 0  # PRAGMA data_version inside the lease's transaction: changes once another connection commits
    data: str | None = None
    span: tuple[int, int] = (0, -1)
    min_t: int = 0

    @property
    def size(self) -> int:
        """How many records the lease holds."""
        return self.span[1] - self.span[0] + 1 if self.data is not None else len(self.items)

    @property
    def last_id(self) -> int:
        return self.span[1] if self.data is not None else self.items[-1].id


# The EZ `data` array of up to ? queued records (the rows of `front`), built by SQLite, with what says whether it
# may be sent as it is: how many, their first and last id, the oldest t, how many numbers are floats (SQLite's
# text of a float is not always Python's exact one: those batches are built in Python) and how many records are
# classic or carry their own ezkey (they go in requests of their own).
_BUILT = ("SELECT count(*), min(id), max(id), min(t), total(typeof(number) = 'real'), "
          "total(stat IS NULL OR ezkey IS NOT NULL), json_group_array(json_object('stat', stat, "
          "CASE kind WHEN 0 THEN 'count' ELSE 'value' END, number, 't', t)) FROM ({rows})")
BUILT_RETRY = 16  # leases after a batch that could not be built in SQLite before trying again
# The common case, read far more cheaply (no walk of the queue's runs, no check per record that stops a batch):
# the batch is ids ? to ? of one run of the queue, every one of them a live record as SQLite can send it. Records
# that are not (gone, past max_age, classic, with a key of their own, or a REAL number, whose SQLite text is not
# always Python's) are left out, so a count short of the ids' says to read the batch the general way (_BUILT).
# `number` has NUMERIC affinity (declared ANY): SQLite stores an integral number as an INTEGER when it can, so a
# REAL left there is not integral, or outside -INT64_MAX..INT64_MAX (-2**63 stays a REAL): within those bounds, a
# number equal to its CAST to INTEGER is an INTEGER. Checked so, not by typeof() per record, which cost a tenth
# of the whole batch's reading.
_BUILT_RANGE = ("SELECT count(*), {min_t}, json_group_array(json_object('stat', s.stat, CASE s.kind WHEN 0 THEN "
                "'count' ELSE 'value' END, r.number, 't', r.t)) FROM records r CROSS JOIN series s ON s.id = r.series "
                "AND s.stat IS NOT NULL AND s.ezkey IS NULL WHERE r.id BETWEEN ? AND ? AND r.state = {pending}{where} "
                f"AND r.number BETWEEN -{INT64_MAX} AND {INT64_MAX} AND r.number = CAST(r.number AS INTEGER)")
# The queue's first run with ids after ?, and whether it is the last run.
_FIRST_RUN = ("SELECT q.lo, q.hi, q.lo = (SELECT max(lo) FROM queue_runs) FROM queue_runs q "
              "WHERE q.lo >= coalesce((SELECT max(lo) FROM queue_runs WHERE lo <= ?), 0) AND q.hi > ? "
              "ORDER BY q.lo LIMIT 1")


class Ledger(Core):
    """Leasing records to the shipper and settling them: SENT, DEAD, suspect, or pending again."""

    _unbuilt = 0  # leases to go before trying to build a batch in SQLite again (see Lease)
    aged_out = 0  # records past max_age leases dropped (counted as dropped_age too): the shipper takes and resets it

    def lease(self, limit: int, *, now: float, keyed_only: bool, after: int | None = None,
              built: bool = False) -> Lease | None:
        """Lease up to `limit` of the first queued records (in append order); None when none.

        Queued: pending, and neither leased nor suspect (suspects are leased by `lease_suspects`). `keyed_only`
        skips EZ records that carry no ezkey (there is no configured key to send them with): they stay queued.
        Records older than max_age that the lease walks past are deleted (counted as dropped_age): they would
        not be shipped. `after`, an id the caller knows no queued record it could lease precedes, starts the
        search there instead of walking past records it skips (see Shipper._lease_clean for when that is known).
        `built`: the lease may come as its EZ request's data, built by SQLite (see Lease).
        """
        start = 0 if after is None else after
        owner = self.owners.claim()
        with self._write(wait=False) as conn:  # a lease lost in a power cut only leaves its records queued
            spans = conn.execute("SELECT lo, hi FROM stage_spans ORDER BY lo").fetchall()
            where = self._shippable(now, keyed_only, "r.t")
            # Under keyed_only every record sent carries its own key: a batch SQLite builds has none (see Lease).
            may_build = built and not spans and not keyed_only and self._may_build()
            ranged = self._lease_range(conn, start, where, limit, owner, now) if may_build else None
            if ranged is not None:
                return ranged
            built_row = self._build(conn, start, where, limit) if may_build else None
            if built_row is not None and not built_row[0]:
                self._clear_rest(conn, start, spans, now)
                return None
            rows = [] if built_row is not None else front(conn, start, _FIELDS, _SERIES, where, limit, spans=spans)
            if built_row is None and not rows:
                if not keyed_only:  # nothing to ship from `after` on: what the runs still span there is gone
                    self._clear_rest(conn, start, spans, now)
                return None
            count, last = (built_row[0], built_row[2]) if built_row is not None else (len(rows), rows[-1][0])
            if count < limit and not keyed_only:  # the walk reached the end: what is left in the runs is gone
                last = INT64_MAX
            walked = [(start + 1, last)]
            if spans:  # an open stage's records stay queued, unseen until it is published
                walked = [part for run in walked for part in subtract(run, [tuple(span) for span in spans])]
            if self.max_age is not None:
                self._drop_walked(conn, start, last, now)
            if keyed_only and count < sum(hi - lo + 1 for lo, hi in walked):  # perhaps some walked past: queued
                skipped = [record_id for (record_id,) in conn.execute(
                    f"SELECT r.id FROM {queued_between(start + 1, last, _SERIES)} "
                    f"AND r.state = {State.PENDING} AND NOT {_KEYED}")]
                walked = [part for run in walked for part in subtract(run, runs_of(skipped))]
            dequeue(conn, walked)
            if built_row is not None:
                _, lo, hi, min_t, data = built_row
                return self._built_lease(conn, owner, now, lo, hi, min_t, data)
            return self._new_lease(conn, rows, owner, now)

    def _may_build(self) -> bool:
        """Whether to try building a batch in SQLite: not for BUILT_RETRY leases after a batch it could not build."""
        if self._unbuilt > 0:
            self._unbuilt -= 1
            return False
        return True

    def _lease_range(self, conn: sqlite3.Connection, start: int, where: str, limit: int, owner: str,
                     now: float) -> Lease | None:
        """Lease the common case of a batch SQLite builds (see _BUILT_RANGE): ids lo..hi from the queue's first run
        after `start`, a whole batch or the rest of the queue, every one of them a record SQLite can send as it
        is; nothing is walked past. None: not so (nothing is written; read it with _build). The oldest t is for
        max_age alone: without it, 0 (not looked for)."""
        run = conn.execute(_FIRST_RUN, (start + 1, start)).fetchone()
        if run is None:
            return None
        lo = max(run[0], start + 1)
        hi = min(run[1], lo + limit - 1)
        if hi - lo + 1 < limit and not (run[2] and hi == run[1]):  # a short run, and more queued after it
            return None
        query = _BUILT_RANGE.format(pending=State.PENDING, where=where,
                                    min_t="0" if self.max_age is None else "min(r.t)")
        count, min_t, data = conn.execute(query, (lo, hi)).fetchone()
        if count != hi - lo + 1:
            return None
        dequeue(conn, [(lo, hi)], found=[(run[0], run[1])])
        return self._built_lease(conn, owner, now, lo, hi, min_t, data)

    @classmethod
    def _built_lease(cls, conn: sqlite3.Connection, owner: str, now: float, lo: int, hi: int, min_t: int,
                     data: str) -> Lease:
        """Commit a lease of records lo..hi, every id of them, with its `data` array built by SQLite."""
        return cls._new_lease(conn, [], owner, now, runs=[(lo, hi)])._replace(data=data, span=(lo, hi), min_t=min_t)

    def _build(self, conn: sqlite3.Connection, start: int, where: str, limit: int) -> tuple[Any, ...] | None:
        """(count, first id, last id, oldest t, the `data` array) of the batch a lease would take, if it can be sent
        as SQLite built it (a count of 0: nothing to lease); else None, and the next BUILT_RETRY leases do not try.
        Records are read through the queue's runs, checked one by one (_BUILT)."""
        rows = (f"SELECT r.id, s.stat, s.ezkey, s.kind, r.number, r.t FROM {QUEUED_FROM} {_SERIES} WHERE {QUEUE_FROM} "
                f"AND r.state = {State.PENDING}{where} ORDER BY q.lo, r.id LIMIT ?")
        query = _BUILT.format(rows=rows)
        row = conn.execute(query, (start + 1, start, limit)).fetchone()
        count, lo, hi, min_t, floats, others, data = row
        if count and (floats or others or hi - lo + 1 != count):  # not every id of lo..hi: built in Python
            self._unbuilt = BUILT_RETRY
            return None
        return count, lo, hi, min_t, data

    def leased_records(self, span: tuple[int, int]) -> list[Leased]:
        """Return the live records of ids lo..hi (a built lease's span: see Lease), in id order."""
        return list(map(_leased, self.conn.execute(
            f"SELECT r.id, {_FIELDS} FROM records r {_SERIES} WHERE r.id BETWEEN ? AND ? AND r.state = {State.PENDING} "
            "ORDER BY r.id", span)))

    def _clear_rest(self, conn: sqlite3.Connection, start: int, spans: list[Any], now: float) -> None:
        """Take the ids after `start` out of the queue's runs, once a lease found nothing to ship there: their
        records are gone, or past max_age (dropped here, as a lease walking past them drops them). With an open
        stage, left as they are (its records are queued, and walking them would cost the stage's size)."""
        if spans or not conn.execute("SELECT 1 FROM queue_runs WHERE hi > ? LIMIT 1", (start,)).fetchone():
            return
        if self.max_age is not None:
            self._drop_walked(conn, start, INT64_MAX, now)
        dequeue(conn, [(start + 1, INT64_MAX)])

    def _drop_walked(self, conn: sqlite3.Connection, start: int, last: int, now: float) -> None:
        """Delete the queued records past max_age among ids start+1..last: the lease walked past them. Counted as
        dropped_age."""
        assert self.max_age is not None
        old = [record_id for (record_id,) in conn.execute(
            f"SELECT r.id FROM {queued_between(start + 1, last)} AND r.state = {State.PENDING} "
            f"AND r.t < ?{self._hidden(conn, 'r.id')}", (int(now - self.max_age),))]
        if old:
            dropped = _delete_records(conn, f"id IN ({_IDS})", (_dumps(old),))
            self._tally(conn, pending=-dropped)
            self._add_count(conn, "dropped_age", dropped)
            self.aged_out += dropped  # a rollback of the lease undoes it, and the lease raises: never taken then

    def lease_suspects(self, *, now: float, keyed_only: bool) -> Lease | None:
        """Lease one suspect group (records refused together, split apart to find the refused ones), or None."""
        owner = self.owners.claim()
        with self._write(wait=False) as conn:
            where = f"{self._shippable(now, keyed_only, 'r.t')}{self._hidden(conn, 'g.id')}"
            source = f"suspects g CROSS JOIN records r ON r.id = g.id {_SERIES}"
            rows = conn.execute(f"SELECT r.id, {_FIELDS} FROM {source} WHERE g.grp = (SELECT min(g.grp) FROM {source} "
                                f"WHERE 1{where}){where} ORDER BY r.t, r.id").fetchall()
            if not rows:
                return None
            conn.execute(f"DELETE FROM suspects WHERE id IN ({_IDS})", (_dumps([row[0] for row in rows]),))
            return self._new_lease(conn, rows, owner, now)

    def _shippable(self, now: float, keyed_only: bool, t: str) -> str:
        """The conditions (each starting with AND) on records a lease may take: keyed ones only, if asked; none
        older than max_age (a lease drops those it walks past; suspects that old wait for their lease to expire)."""
        where = f" AND {_KEYED}" if keyed_only else ""
        if self.max_age is not None:
            where += f" AND {t} >= {int(now - self.max_age)}"
        return where

    @staticmethod
    def _new_lease(conn: sqlite3.Connection, rows: list[Any], owner: str, now: float,
                   runs: list[tuple[int, int]] | None = None) -> Lease:
        """Commit a lease of `rows` (rows of the lease's query, id first), or of the ids of `runs` (rows empty)."""
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        lease = conn.execute("INSERT INTO leases (leased_at, owner) VALUES (?, ?) RETURNING id",
                             (now, owner)).fetchone()[0]
        if runs is None:
            ids = list(map(_ID, rows))
            lo, hi = min(ids), max(ids)
            runs = [(lo, hi)] if hi - lo + 1 == len(ids) else runs_of(ids)  # ids are unique: that is one run
        conn.executemany("INSERT INTO lease_runs (lo, hi, lease) VALUES (?, ?, ?)", [(a, b, lease) for a, b in runs])
        return Lease(lease, list(map(_leased, rows)), version)

    def ack(self, ids: Sequence[int], *, now: float, lease: int | None = None, leases: Sequence[int] = (),
            note: dict[str, Any] | None = None) -> int:
        """Mark records SENT: the receiver acknowledged them. They leave their lease; no record is rewritten.

        With `lease` (or several, `leases`), end those leases in the same commit; with `note`, record those
        facts (the last shipping result) in it too, so keeping status true costs no commit of its own.
        Returns how many records became SENT (those a lease still held: each is acknowledged once).
        """
        with self._write() as conn:
            return self._ack(conn, ids, now, [*leases] if lease is None else [*leases, lease], note)

    def ack_and_lease(self, ids: Sequence[int], *, now: float, leases: Sequence[int] = (),
                      note: dict[str, Any] | None = None, limit: int, after: int,
                      version: int) -> tuple[int, Lease | None]:
        """ack(), and in the same commit the lease of the next batch after id `after`, if no other connection
        has committed since this one read data_version `version` (the caller's knowledge of the spool still
        holds) and the batch is the common one SQLite builds (_build_range: EZ records of the configured key,
        taken whole from one run of the queue). Returns (what ack returns, the lease or None: lease() then).

        One commit instead of two for the shipper's steady state; the lease is durable with the acknowledgement.
        A failure of the lease's part undoes only that part."""
        owner = self.owners.name  # claimed by the lease being acknowledged
        with self._write() as conn:
            n = self._ack(conn, ids, now, [*leases], note)
            if owner is None or self._unbuilt or conn.execute("PRAGMA data_version").fetchone()[0] != version:
                return n, None
            conn.execute("SAVEPOINT ahead")
            try:
                spans = conn.execute("SELECT 1 FROM stage_spans LIMIT 1").fetchone()
                lease = None if spans else self._lease_range(conn, after, self._shippable(now, False, "r.t"), limit,
                                                             owner, now)
            except sqlite3.Error as exc:  # the acknowledgement must commit whatever befalls the lease
                _log().warning("cannot lease the next batch with an acknowledgement: %s", exc)
                conn.execute("ROLLBACK TO ahead")
                lease = None
            conn.execute("RELEASE ahead")
            return n, lease

    def _ack(self, conn: sqlite3.Connection, ids: Sequence[int], now: float, ended: list[int],
             note: dict[str, Any] | None) -> int:
        runs = runs_of(ids)
        # Each live lease's runs once these are taken out (read by _take, if there are ids to take).
        left: dict[int, list[tuple[int, int]]] | None = {} if runs else None
        held = self._take(conn, runs, left)  # the runs of ids that were pending (leased), and are no more
        n = sum(hi - lo + 1 for lo, hi in held)  # a run holds live records only: one per id
        self._tally(conn, pending=-n, sent=n)
        if held:  # when they were settled, a row per run: pruning finds them by it
            conn.executemany("INSERT OR IGNORE INTO settled (done_at, lo, hi) VALUES (?, ?, ?)",
                             [(now, lo, hi) for lo, hi in held])
        if ended:
            self._end_leases(conn, ended, left)
        if note:
            self._set_meta(conn, note)
        return n

    def _take(self, conn: sqlite3.Connection, runs: list[tuple[int, int]],
              left: dict[int, list[tuple[int, int]]] | None = None) -> list[tuple[int, int]]:
        """Take the pending records among runs of ids out of wherever they wait (a lease's runs; else the queue
        or a suspect group); return the runs of ids taken. The shipper settles what its leases hold, and only
        that costs nothing more than the lease's row; records settled from the queue are looked up one by one.
        `left`: as _unlease."""
        held = self._unlease(conn, runs, left)
        rest = [part for run in runs for part in subtract(run, intersect([run], held))]
        if not rest:
            return held
        waiting = queued_ids(conn, rest)
        suspect = [record_id for (record_id,) in conn.execute(
            f"SELECT g.id FROM suspects g CROSS JOIN records r ON r.id = g.id WHERE r.state = {State.PENDING}"
            f"{_within(rest, 'g.id')}")]
        if not waiting and not suspect:
            return held
        dequeue(conn, runs_of(waiting))
        if suspect:
            conn.execute(f"DELETE FROM suspects WHERE id IN ({_IDS})", (_dumps(suspect),))
        return sorted(held + runs_of(waiting + suspect))

    @staticmethod
    def _unlease(conn: sqlite3.Connection, runs: list[tuple[int, int]],
                 left: dict[int, list[tuple[int, int]]] | None = None) -> list[tuple[int, int]]:
        """Take runs of ids out of the live leases' runs; return the parts some lease held, as runs. `left`, if
        given, is filled with every live lease's runs as they are afterwards (all of them are read here)."""
        if not runs:
            return []
        held: list[tuple[int, int]] = []
        for lo, hi, lease in conn.execute("SELECT lo, hi, lease FROM lease_runs").fetchall():
            cut = intersect([(lo, hi)], runs)
            rest = subtract((lo, hi), cut) if cut else [(lo, hi)]
            if left is not None:
                left.setdefault(lease, []).extend(rest)
            if not cut:
                continue
            held += cut
            conn.execute("DELETE FROM lease_runs WHERE lo = ?", (lo,))
            if rest:
                conn.executemany("INSERT INTO lease_runs (lo, hi, lease) VALUES (?, ?, ?)",
                                 [(a, b, lease) for a, b in rest])
        return sorted(held)

    @staticmethod
    def _end_leases(conn: sqlite3.Connection, leases: Sequence[int],
                    left: dict[int, list[tuple[int, int]]] | None = None) -> None:
        """Drop leases: the live records their runs still hold are queued again. `left`: every live lease's runs,
        if the caller has just read them (as _unlease does), so they are not read again."""
        ended = _dumps(list(leases))
        if left is None:
            runs = conn.execute(f"SELECT lo, hi FROM lease_runs WHERE lease IN ({_IDS})", (ended,)).fetchall()
        else:
            runs = [run for lease in leases for run in left.get(lease, ())]
        if runs:
            enqueue(conn, runs)
            conn.execute(f"DELETE FROM lease_runs WHERE lease IN ({_IDS})", (ended,))
        conn.execute(f"DELETE FROM leases WHERE id IN ({_IDS})", (ended,))

    def split(self, lease: int, halves: Sequence[Sequence[int]], *, end: bool = False) -> None:
        """Mark records the receiver refused together as suspect groups (one per half) and give them back.

        Each group is named by its smallest id. The records leave the lease in the same commit, so they can
        be leased again at once, each group on its own: the bisection goes on where it stopped, whatever
        happens to the shipper in between.
        """
        with self._write() as conn:
            for half in halves:
                taken = self._take(conn, runs_of(half))
                conn.execute(f"INSERT OR REPLACE INTO suspects (id, grp) SELECT r.id, ? FROM records r "
                             f"WHERE r.id IN ({_IDS}) AND r.state = {State.PENDING}{_within(taken, 'r.id')}",
                             (min(half), _dumps(list(half))))
            if end:  # the last of the lease the shipper held: whatever else it named was settled before
                self._end_leases(conn, [lease])
            else:
                conn.execute("DELETE FROM leases WHERE id = ? AND NOT EXISTS "
                             "(SELECT 1 FROM lease_runs WHERE lease = ?)", (lease, lease))

    def release(self, lease: int, ids: Sequence[int], *, end: bool = False) -> None:
        """Give leased records back unsent: queued at once, while the rest of their lease goes on.

        With `end`, the lease ends in the same commit (these were the last of it the shipper held).
        """
        with self._write(wait=False) as conn:  # a lease given back is a lease: a power cut may undo it harmlessly
            enqueue(conn, self._take(conn, runs_of(ids)))
            if end:
                self._end_leases(conn, [lease])

    def expire(self, ids: Sequence[int], *, lease: int, end: bool = False) -> int:
        """Delete leased records found older than max_age before a (re)send, counted as dropped_age.

        They leave their lease; with `end`, the lease ends in the same commit. Returns how many were dropped.
        """
        with self._write() as conn:
            held = self._take(conn, runs_of(ids))
            dropped = _delete_records(conn, f"id BETWEEN ? AND ? AND state = {State.PENDING}", each=held)
            if dropped:
                self._tally(conn, pending=-dropped)
                self._add_count(conn, "dropped_age", dropped)
            if end:
                self._end_leases(conn, [lease])
            return dropped

    def suspects(self) -> int:
        """Return how many pending records are suspect (refused as part of a batch, not yet isolated)."""
        return self.conn.execute("SELECT count(*) FROM suspects").fetchone()[0]

    def end_lease(self, lease: int) -> None:
        """Drop a lease: the records it held that were not settled are pending (queued) again."""
        with self._write() as conn:
            self._end_leases(conn, [lease])

    def mark_dead(self, ids: Sequence[int], *, reason: str, http_status: int | None, body: str,
                  now: float) -> int:
        """Move records to DEAD, keeping the receiver's reason, status and body. They leave their lease."""
        with self._write() as conn:
            held = self._take(conn, runs_of(ids))
            n = max(0, conn.executemany(f"UPDATE records SET state = {State.DEAD} WHERE id BETWEEN ? AND ? "
                                        f"AND state = {State.PENDING}", held).rowcount) if held else 0
            if n:
                conn.executemany(f"INSERT OR REPLACE INTO dead (id, done_at, reason, http_status, body) SELECT id, ?, "
                                 f"?, ?, ? FROM records WHERE id BETWEEN ? AND ? AND state = {State.DEAD}",
                                 [(now, reason, http_status, body[:MAX_BODY], lo, hi) for lo, hi in held])
            self._tally(conn, pending=-n, dead=n)
            return n

    def release_dead_leases(self, *, unowned_before: float | None = None) -> int:
        """Drop the leases whose owner is proven dead; return how many pending records they held.

        A lease whose owner cannot be checked (an earlier release recorded none, or named it by pid: see
        spool.owners) is dropped when it was taken before `unowned_before` (the caller holds the ship lock, or
        the lease is older than the lease timeout), or once the boot it was taken in is over.
        """
        owners = [owner for (owner,) in self.conn.execute("SELECT DISTINCT owner FROM leases")]
        dead = [owner for owner in owners if owner is not None and not self.owners.is_alive(owner)]
        unchecked = any(owner is None or is_legacy(owner) for owner in owners)
        if not dead and not (unowned_before is not None and unchecked):
            return 0
        with self._write() as conn:
            where = "owner IN (SELECT value FROM json_each(?))"
            params: list[Any] = [_dumps(dead)]
            if unowned_before is not None:
                where += f" OR ((owner IS NULL OR owner NOT LIKE '{PREFIX}%') AND leased_at < ?)"
                params.append(unowned_before)
            ended = [lease for (lease,) in conn.execute(f"SELECT id FROM leases WHERE {where}", params)]
            runs = conn.execute(f"SELECT lo, hi FROM lease_runs WHERE lease IN ({_IDS})", (_dumps(ended),)).fetchall()
            named = _count_live(conn, runs)
            self._end_leases(conn, ended)
            return named

    def lease_count(self) -> int:
        """Return how many leases are live (a drained, idle spool has none)."""
        return self.conn.execute("SELECT count(*) FROM leases").fetchone()[0]

    def data_version(self) -> int:
        """Return a number that changes whenever another connection commits to the spool."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]


def _count_live(conn: sqlite3.Connection, runs: Iterable[tuple[int, int]]) -> int:
    """Count the live records in runs of ids (a lease's runs: what it holds)."""
    return sum(conn.execute(f"SELECT count(*) FROM records WHERE id BETWEEN ? AND ? AND state = {State.PENDING}",
                            run).fetchone()[0] for run in runs)


def _within(runs: list[tuple[int, int]], column: str) -> str:
    if not runs:
        return " AND 0"
    return " AND (" + " OR ".join(f"{column} BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in runs) + ")"
