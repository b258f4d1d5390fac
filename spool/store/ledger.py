"""The shipper's side: leases, acknowledgements, suspects (records refused together, split apart), dead marking,
and releasing the leases of owners that died. The storage contract (in spool/store/__init__.py) says what each
guarantees.

The ledger (schema 10) keeps books per batch, not per record: a lease is one row and the runs of ids it holds;
leasing takes its records out of the queue, an acknowledgement writes a row of `settled` per run and ends the
lease. No record is rewritten when it is shipped.
"""

from __future__ import annotations

import functools
import operator
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from spool.owners import PREFIX, is_legacy
from spool.records import Record
from spool.store.core import _FIELDS, _IDS, _SERIES, Core, State, _delete_records, _dumps

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
    """A batch leased to the shipper: the lease's own id and its records, oldest first."""

    id: int
    items: list[Leased]
    version: int = 0  # PRAGMA data_version inside the lease's transaction: changes once another connection commits


class Ledger(Core):
    """Leasing records to the shipper and settling them: SENT, DEAD, suspect, or pending again."""

    def lease(self, limit: int, *, now: float, keyed_only: bool, after: tuple[int, int] | None = None) -> Lease | None:
        """Lease up to `limit` of the oldest queued records (oldest t first, then append order); None when none.

        Queued: pending, and neither leased nor suspect (suspects are leased by `lease_suspects`). `keyed_only`
        skips EZ records that carry no ezkey (there is no configured key to send them with). `after`, a (t, id)
        the caller knows no queued record it could lease precedes, starts the search there instead of walking
        past records it skips (see Shipper._lease_clean for when that is known).
        """
        params: tuple[int, ...] = (limit,)
        where = self._shippable(now, keyed_only, "q.t")
        if after is not None:
            where, params = f"{where} AND q.t >= ? AND (q.t > ? OR q.id > ?)", (after[0], after[0], after[1], limit)
        owner = self.owners.claim()
        with self._write(wait=False) as conn:  # a lease lost in a power cut only leaves its records queued
            rows = conn.execute(f"SELECT r.id, {_FIELDS} FROM queue q CROSS JOIN records r ON r.id = q.id {_SERIES} "
                                f"WHERE 1{where}{self._hidden(conn, 'q.id')} ORDER BY q.t, q.id LIMIT ?",
                                params).fetchall()
            if not rows:
                return None
            _dequeue(conn, rows)
            return self._new_lease(conn, rows, owner, now)

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
        where = f" AND {_KEYED}" if keyed_only else ""
        if self.max_age is not None:
            where += f" AND {t} >= {int(now - self.max_age)}"  # too old to ship: left for drop_expired
        return where

    @staticmethod
    def _new_lease(conn: sqlite3.Connection, rows: list[Any], owner: str, now: float) -> Lease:
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        lease = conn.execute("INSERT INTO leases (leased_at, owner) VALUES (?, ?) RETURNING id",
                             (now, owner)).fetchone()[0]
        ids = list(map(_ID, rows))
        lo, hi = min(ids), max(ids)
        runs = [(lo, hi)] if hi - lo + 1 == len(ids) else _runs(ids)  # ids are unique: that is one run
        conn.executemany("INSERT INTO lease_runs (lo, hi, lease) VALUES (?, ?, ?)", [(a, b, lease) for a, b in runs])
        return Lease(lease, list(map(_leased, rows)), version)

    def ack(self, ids: Sequence[int], *, now: float, lease: int | None = None, leases: Sequence[int] = (),
            note: dict[str, Any] | None = None) -> int:
        """Mark records SENT: the receiver acknowledged them. They leave their lease; no record is rewritten.

        With `lease` (or several, `leases`), end those leases in the same commit; with `note`, record those
        facts (the last shipping result) in it too, so keeping status true costs no commit of its own.
        Returns how many records became SENT (those a lease still held: each is acknowledged once).
        """
        ended = [*leases] if lease is None else [*leases, lease]
        runs = _runs(ids)
        with self._write() as conn:
            held = self._take(conn, runs)  # the runs of ids that were pending (a lease held them), and are no more
            n = sum(hi - lo + 1 for lo, hi in held)  # a run holds live records only: one per id
            self._tally(conn, pending=-n, sent=n)
            if held:  # when they were settled, a row per run: pruning finds them by it
                conn.executemany("INSERT OR IGNORE INTO settled (done_at, lo, hi) VALUES (?, ?, ?)",
                                 [(now, lo, hi) for lo, hi in held])
            if ended:
                self._end_leases(conn, ended)
            if note:
                self._set_meta(conn, note)
            return n

    def _take(self, conn: sqlite3.Connection, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Take the pending records among runs of ids out of wherever they wait (a lease's runs; else the queue
        or a suspect group); return the runs of ids taken. The shipper settles what its leases hold, and only
        that costs nothing more than the lease's row; records settled from the queue are looked up one by one."""
        held = self._unlease(conn, runs)
        rest = [part for run in runs for part in _subtract(run, _intersect([run], held))]
        if not rest:
            return held
        waiting = [record_id for lo, hi in rest for (record_id,) in conn.execute(
            f"SELECT r.id FROM records r WHERE r.id BETWEEN ? AND ? AND r.state = {State.PENDING} AND (EXISTS "
            f"(SELECT 1 FROM queue q WHERE q.t = r.t AND q.id = r.id) OR r.id IN (SELECT id FROM suspects))",
            (lo, hi))]
        if not waiting:
            return held
        listed = _dumps(waiting)
        conn.execute(f"DELETE FROM queue WHERE (t, id) IN (SELECT t, id FROM records WHERE id IN ({_IDS}))", (listed,))
        conn.execute(f"DELETE FROM suspects WHERE id IN ({_IDS})", (listed,))
        return sorted(held + _runs(waiting))

    @staticmethod
    def _unlease(conn: sqlite3.Connection, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Take runs of ids out of the live leases' runs; return the parts some lease held, as runs."""
        if not runs:
            return []
        held: list[tuple[int, int]] = []
        for lo, hi, lease in conn.execute("SELECT lo, hi, lease FROM lease_runs").fetchall():
            cut = _intersect([(lo, hi)], runs)
            if not cut:
                continue
            held += cut
            conn.execute("DELETE FROM lease_runs WHERE lo = ?", (lo,))
            conn.executemany("INSERT INTO lease_runs (lo, hi, lease) VALUES (?, ?, ?)",
                             [(a, b, lease) for a, b in _subtract((lo, hi), cut)])
        return sorted(held)

    @staticmethod
    def _end_leases(conn: sqlite3.Connection, leases: Sequence[int]) -> None:
        """Drop leases: the live records their runs still hold are queued again."""
        ended = _dumps(list(leases))
        runs = conn.execute(f"SELECT lo, hi FROM lease_runs WHERE lease IN ({_IDS})", (ended,)).fetchall()
        _queue(conn, runs)
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
                taken = self._take(conn, _runs(half))
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
            _queue(conn, self._take(conn, _runs(ids)))
            if end:
                self._end_leases(conn, [lease])

    def expire(self, ids: Sequence[int], *, lease: int, end: bool = False) -> int:
        """Delete leased records found older than max_age before a (re)send, counted as dropped_age.

        They leave their lease; with `end`, the lease ends in the same commit. Returns how many were dropped.
        """
        with self._write() as conn:
            held = self._take(conn, _runs(ids))
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
            held = self._take(conn, _runs(ids))
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


def _dequeue(conn: sqlite3.Connection, rows: list[Any]) -> None:
    """Take leased rows (id first, t last, in queue order) out of the queue: by one range of the queue when they
    are all of it between the first and the last (the common case: nothing skipped), else one by one."""
    first, last = (rows[0][-1], rows[0][0]), (rows[-1][-1], rows[-1][0])
    span = "(t, id) >= (?, ?) AND (t, id) <= (?, ?)"
    if conn.execute(f"SELECT count(*) FROM queue WHERE {span}", (*first, *last)).fetchone()[0] == len(rows):
        conn.execute(f"DELETE FROM queue WHERE {span}", (*first, *last))
    else:
        conn.executemany("DELETE FROM queue WHERE t = ? AND id = ?", [(row[-1], row[0]) for row in rows])


def _queue(conn: sqlite3.Connection, runs: Iterable[tuple[int, int]]) -> None:
    """Put the live records of runs of ids (back) into the queue."""
    conn.executemany(f"INSERT OR IGNORE INTO queue (t, id) SELECT t, id FROM records WHERE id BETWEEN ? AND ? "
                     f"AND state = {State.PENDING}", list(runs))


def _count_live(conn: sqlite3.Connection, runs: Iterable[tuple[int, int]]) -> int:
    """Count the live records in runs of ids (a lease's runs: what it holds)."""
    return sum(conn.execute(f"SELECT count(*) FROM records WHERE id BETWEEN ? AND ? AND state = {State.PENDING}",
                            run).fetchone()[0] for run in runs)


def _within(runs: list[tuple[int, int]], column: str) -> str:
    if not runs:
        return " AND 0"
    return " AND (" + " OR ".join(f"{column} BETWEEN {int(lo)} AND {int(hi)}" for lo, hi in runs) + ")"


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs both sorted lists of runs cover."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if lo <= hi:
            out.append((lo, hi))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(run: tuple[int, int], cuts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """What is left of a run once sorted, disjoint runs within it are taken out."""
    out, lo = [], run[0]
    for a, b in cuts:
        if a > lo:
            out.append((lo, a - 1))
        lo = b + 1
    if lo <= run[1]:
        out.append((lo, run[1]))
    return out


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Return the ids as sorted runs of consecutive integers, (first, last) each."""
    runs: list[tuple[int, int]] = []
    ordered = sorted(ids)
    if not ordered:
        return runs
    if ordered[-1] - ordered[0] + 1 == len(ordered):  # one run, without a Python step per id (a whole batch)
        return [(ordered[0], ordered[-1])]
    first = last = ordered[0]
    for i in ordered:
        if i > last + 1:
            runs.append((first, last))
            first = i
        last = i
    runs.append((first, last))
    return runs
