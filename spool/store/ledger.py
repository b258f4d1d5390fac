"""The shipper's side: leases, acknowledgements, suspects (records refused together, split apart), dead marking,
and releasing the leases of owners that died. The storage contract (in spool/store/__init__.py) says what each
guarantees."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from spool.owners import PREFIX, is_legacy
from spool.records import Record
from spool.store.core import _COLUMNS, _IDS, _LEASED, Core, State, _dumps

MAX_BODY = 2000  # characters of a refusal's response body kept with a dead record

ACK_RUN = 4  # ids per run of consecutive ids, on average, from which an ack updates run by run
_KEYED = "(ezkey IS NOT NULL OR key IS NOT NULL)"


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
        """Lease up to `limit` of the oldest clean pending records no lease names; None when there are none.

        Clean: never refused as part of a batch (suspects are leased by `lease_suspects`). `keyed_only` skips
        EZ records that carry no ezkey (there is no configured key to send them with). `after`, a (t, id) the
        caller knows no unleased clean record precedes, starts the search there instead of walking past the
        records in flight (see Shipper._lease_clean for when that is known).
        """
        params: tuple[int, ...] = (limit,)
        where = f"split IS NULL{self._shippable(now, keyed_only)}"
        if after is not None:
            where, params = f"{where} AND t >= ? AND (t > ? OR id > ?)", (after[0], after[0], after[1], limit)
        return self._lease(f"{where} ORDER BY t, id LIMIT ?", params, now)

    def lease_suspects(self, *, now: float, keyed_only: bool) -> Lease | None:
        """Lease one suspect group (records refused together, split apart to find the refused ones), or None."""
        where = f"split IS NOT NULL{self._shippable(now, keyed_only)}"
        return self._lease(f"split = (SELECT min(split) FROM records WHERE state = {State.PENDING} AND {where} "
                           f"AND id NOT IN ({_LEASED})) ORDER BY t, id", (), now)

    def _shippable(self, now: float, keyed_only: bool) -> str:
        where = f" AND {_KEYED}" if keyed_only else ""
        if self.max_age is not None:
            where += f" AND t >= {int(now - self.max_age)}"  # too old to ship: left for drop_expired
        return where

    def _lease(self, where: str, params: tuple[Any, ...], now: float) -> Lease | None:
        owner = self.owners.claim()
        with self._write(wait=False) as conn:
            rows = conn.execute(f"SELECT id, {_COLUMNS} FROM records WHERE state = {State.PENDING}{self._hidden(conn)} "
                                f"AND id NOT IN ({_LEASED}) AND {where}", params).fetchall()
            if not rows:
                return None
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            ids = [row[0] for row in rows]
            lease = conn.execute("INSERT INTO leases (leased_at, owner, first_id, last_id) VALUES (?, ?, ?, ?) "
                                 "RETURNING id", (now, owner, min(ids), max(ids))).fetchone()[0]
            conn.execute("INSERT INTO leased (id, lease) SELECT value, ? FROM json_each(?)", (lease, _dumps(ids)))
        return Lease(lease, list(map(_leased, rows)), version)

    def ack(self, ids: Sequence[int], *, now: float, lease: int | None = None, leases: Sequence[int] = (),
            note: dict[str, Any] | None = None) -> int:
        """Mark records SENT: the receiver acknowledged them. They leave their lease.

        With `lease` (or several, `leases`), end those leases in the same commit; with `note`, record those
        facts (the last shipping result) in it too, so keeping status true costs no commit of its own.
        """
        ended = [*leases] if lease is None else [*leases, lease]
        runs = _runs(ids)
        with self._write() as conn:
            if len(runs) * ACK_RUN <= len(ids):
                # By runs of consecutive ids (a batch of a backlog appended in time order is one run): a range of
                # the primary key is walked once, one statement per run. (UPDATE ... FROM a table of runs did the
                # same walk but copied every row it changed into a temporary table first: a third slower.)
                n = conn.executemany(f"UPDATE records SET state = {State.SENT}, done_at = ?, split = NULL "
                                     f"WHERE id BETWEEN ? AND ? AND state = {State.PENDING}",
                                     [(now, lo, hi) for lo, hi in runs]).rowcount
            else:  # scattered ids: one statement looking each up beats a statement per short run
                n = conn.execute(f"UPDATE records SET state = {State.SENT}, done_at = ?, split = NULL "
                                 f"WHERE id IN ({_IDS}) AND state = {State.PENDING}",
                                 (now, _dumps(list(ids)))).rowcount
            self._tally(conn, pending=-n, sent=n)
            if n:  # when they were settled, a row per run: pruning finds them by it (schema 8, `settled`)
                conn.executemany("INSERT OR IGNORE INTO settled (done_at, lo, hi) VALUES (?, ?, ?)",
                                 [(now, lo, hi) for lo, hi in runs])
            if ended:
                self._end_leases(conn, ended)
            if note:
                self._set_meta(conn, note)
            return n

    @staticmethod
    def _end_leases(conn: sqlite3.Connection, leases: Sequence[int]) -> None:
        """Drop leases and their rows of `leased`, each by the span of ids it holds."""
        ended = _dumps(list(leases))
        spans = conn.execute(f"SELECT id, first_id, last_id FROM leases WHERE id IN ({_IDS})", (ended,)).fetchall()
        conn.executemany("DELETE FROM leased WHERE id BETWEEN ? AND ? AND lease = ?",
                         [(first, last, lease) for lease, first, last in spans if first is not None])
        conn.execute(f"DELETE FROM leases WHERE id IN ({_IDS})", (ended,))

    def split(self, lease: int, halves: Sequence[Sequence[int]], *, end: bool = False) -> None:
        """Mark records the receiver refused together as suspect groups (one per half) and give them back.

        Each group is named by its smallest id. The records leave the lease in the same commit, so they can
        be leased again at once, each group on its own: the bisection goes on where it stopped, whatever
        happens to the shipper in between.
        """
        every = [i for half in halves for i in half]
        with self._write() as conn:
            for half in halves:
                conn.execute(f"UPDATE records SET split = ? WHERE id IN ({_IDS}) AND state = {State.PENDING}",
                             (min(half), _dumps(list(half))))
            conn.execute(f"DELETE FROM leased WHERE id IN ({_IDS})", (_dumps(every),))
            if end:  # the last of the lease the shipper held: whatever else it named was settled before
                self._end_leases(conn, [lease])
            else:
                conn.execute("DELETE FROM leases WHERE id = ? AND NOT EXISTS (SELECT 1 FROM leased WHERE lease = ?)",
                             (lease, lease))

    def release(self, lease: int, ids: Sequence[int], *, end: bool = False) -> None:
        """Give leased records back unsent: pending and unleased at once, while the rest of their lease goes on.

        With `end`, the lease ends in the same commit (these were the last of it the shipper held).
        """
        with self._write(wait=False) as conn:  # a lease given back is a lease: a power cut may undo it harmlessly
            conn.execute(f"DELETE FROM leased WHERE id IN ({_IDS}) AND lease = ?", (_dumps(list(ids)), lease))
            if end:
                self._end_leases(conn, [lease])

    def expire(self, ids: Sequence[int], *, lease: int, end: bool = False) -> int:
        """Delete leased records found older than max_age before a (re)send, counted as dropped_age.

        They leave their lease; with `end`, the lease ends in the same commit. Returns how many were dropped.
        """
        with self._write() as conn:
            dropped = conn.execute(f"DELETE FROM records WHERE id IN ({_IDS}) AND state = {State.PENDING}",
                                   (_dumps(list(ids)),)).rowcount
            conn.execute(f"DELETE FROM leased WHERE id IN ({_IDS}) AND lease = ?", (_dumps(list(ids)), lease))
            if dropped:
                self._tally(conn, pending=-dropped)
                self._add_count(conn, "dropped_age", dropped)
            if end:
                self._end_leases(conn, [lease])
            return dropped

    def suspects(self) -> int:
        """Return how many pending records are suspect (refused as part of a batch, not yet isolated)."""
        return self.conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING} "
                                 "AND split IS NOT NULL").fetchone()[0]

    def end_lease(self, lease: int) -> None:
        """Drop a lease: the records it named that were not settled are pending again."""
        with self._write() as conn:
            self._end_leases(conn, [lease])

    def mark_dead(self, ids: Sequence[int], *, reason: str, http_status: int | None, body: str,
                  now: float) -> int:
        """Move records to DEAD, keeping the receiver's reason, status and body."""
        with self._write() as conn:
            n = conn.execute(
                f"UPDATE records SET state = {State.DEAD}, done_at = ?, reason = ?, http_status = ?, body = ?, "
                f"split = NULL "
                f"WHERE id IN ({_IDS}) AND state = {State.PENDING}",
                (now, reason, http_status, body[:MAX_BODY], _dumps(list(ids)))).rowcount
            self._tally(conn, pending=-n, dead=n)
            return n

    def release_dead_leases(self, *, unowned_before: float | None = None) -> int:
        """Drop the leases whose owner is proven dead; return how many pending records they named.

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
            named = conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING} AND id IN "
                                 f"(SELECT leased.id FROM leased JOIN leases ON leased.lease = leases.id "
                                 f"WHERE {where})", params).fetchone()[0]
            conn.execute(f"DELETE FROM leased WHERE lease IN (SELECT id FROM leases WHERE {where})", params)
            conn.execute(f"DELETE FROM leases WHERE {where}", params)
            return named

    def lease_count(self) -> int:
        """Return how many leases are live (a drained, idle spool has none)."""
        return self.conn.execute("SELECT count(*) FROM leases").fetchone()[0]

    def data_version(self) -> int:
        """Return a number that changes whenever another connection commits to the spool."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Return the ids as sorted runs of consecutive integers, (first, last) each."""
    runs: list[tuple[int, int]] = []
    ordered = sorted(ids)
    if not ordered:
        return runs
    first = last = ordered[0]
    for i in ordered:
        if i > last + 1:
            runs.append((first, last))
            first = i
        last = i
    runs.append((first, last))
    return runs
