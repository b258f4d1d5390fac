"""The spool file: schema, and every SQL statement spool runs. The only module that touches sqlite3.

The storage contract, stated once:

* A record is in exactly one state: PENDING, INFLIGHT (pending and named by a live lease), SENT or DEAD.
* `append` returns only after its transaction committed; with synchronous=FULL (the default) that
  survives power loss, with NORMAL it survives a crash of the process but maybe not of the machine.
* `lease` takes the oldest pending records not already leased (by `t`, then append order) in one statement
  inside one immediate transaction, so two shippers can never lease the same record. A lease is one small
  row holding the batch's ids: leasing rewrites no record, which keeps writes per record low (SD cards).
* `ack` marks records SENT; it is called only after the receiver acknowledged them. `kill` moves records to
  DEAD with the receiver's reason, HTTP status and body. `end_lease` drops the lease: whatever it named that
  was not settled is simply pending again (transient failure, shutdown).
* One shipper per spool file, enforced by `ShipLock`; whoever holds it may drop every lease at start-up,
  because their holder is known to be dead.
* SENT records are kept for the retention period (for replay) and then pruned in small transactions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from spool.errors import SpoolBusy, SpoolFull, StoreError
from spool.records import Record

log = logging.getLogger("spool.store")

PENDING, SENT, DEAD, HELD = 0, 2, 3, 4  # stored states; "in flight" is PENDING named by a lease, never stored
STATE_NAMES = ("pending", "inflight", "sent", "dead", "held")  # indexed by state (1: in flight, as counted)

SCHEMA_VERSION = 3
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another writer before "database is locked"
MAX_BODY = 2000  # characters of a refusal's response body kept with a dead record

_COLUMNS = "stat, key, ukey, ezkey, kind, number, t"
# A record stamped while the clock was wrong arrives with t = 0 (records.HELD_T): it is stored HELD, with
# the boot it was stamped in and that boot's monotonic clock, computed here so the append path stays one
# statement.
_INSERT = (f"INSERT INTO records ({_COLUMNS}, state, held_boot, held_mono) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, "
           f"CASE WHEN ?7 = 0 THEN 4 ELSE 0 END, CASE WHEN ?7 = 0 THEN boot_id() END, "
           f"CASE WHEN ?7 = 0 THEN boot_clock() END)")
_IDS = "SELECT value FROM json_each(?)"  # a JSON array of ids bound as one parameter
_LEASED = "SELECT value FROM leases, json_each(leases.ids)"  # every id some live lease names
_KEYED = "(ezkey IS NOT NULL OR key IS NOT NULL)"


class Leased(NamedTuple):
    """A record the shipper holds a lease on."""

    id: int
    record: Record


class Lease(NamedTuple):
    """A batch leased to the shipper: the lease's own id and its records, oldest first."""

    id: int
    items: list[Leased]


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create the version-1 schema with sqlite-utils (imported here only: the append path never needs it)."""
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.create_table(
        "records",
        {
            "id": int,
            "state": int,  # PENDING, SENT, DEAD (in flight = pending and named by a lease)
            "stat": str,  # EZ stat name; NULL for classic records
            "key": str,  # classic stat key
            "ukey": str,  # classic user key
            "ezkey": str,  # the record's own EZ key; NULL means the configured one
            "kind": int,  # 0 count, 1 value
            "number": "ANY",  # keeps ints as ints and floats as floats
            "t": int,  # unix seconds
            "done_at": float,  # when it became SENT or DEAD
            "reason": str,  # DEAD: the receiver's message
            "http_status": int,  # DEAD: the HTTP status of the refusal
            "body": str,  # DEAD: the response body, truncated
        },
        pk="id",
        not_null={"state", "kind", "number", "t"},
        defaults={"state": PENDING},
        if_not_exists=True,
    )
    # Only pending records are indexed (by t, then id): that serves leasing oldest-first and the backlog's
    # count and age, while acks and prunes touch no index pages at all (a third fewer bytes written per
    # record; see scripts/bench.py). Everything else walks the primary key.
    conn.execute(f"CREATE INDEX IF NOT EXISTS pending_t ON records (t) WHERE state = {PENDING}")
    db.create_table("meta", {"name": str, "value": str}, pk="name", if_not_exists=True)


def _add_files_and_leases(conn: sqlite3.Connection) -> None:
    """Version 2: the identity of every ingested file (taken exactly once), and leases as rows of their own."""
    import sqlite_utils

    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.create_table("files", {"digest": str, "name": str, "records": int, "at": float}, pk="digest",
                    if_not_exists=True)
    db.create_table("leases", {"id": int, "ids": str, "leased_at": float}, pk="id",
                    not_null={"ids", "leased_at"}, if_not_exists=True)


def _add_held(conn: sqlite3.Connection) -> None:
    """Version 3: records stamped while the clock was wrong keep their boot and its monotonic clock."""
    import sqlite_utils

    records = sqlite_utils.Database(conn, execute_plugins=False).table("records")
    records.add_column("held_boot", str)
    records.add_column("held_mono", float)


_MIGRATIONS = {1: _create_schema, 2: _add_files_and_leases, 3: _add_held}  # version reached -> step


class _AlreadyIngested(Exception):
    pass


class Store:
    """An open spool file. One connection; use one Store per thread."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full",
                 busy_timeout: float = BUSY_TIMEOUT, limits: Any = None, quarantine: bool = False):
        """Open (creating if need be) a spool file.

        `limits` (config.Limits) bounds it. With `quarantine`, a file that is not a sound spool (not a
        database, or failing SQLite's quick check) is moved aside as NAME.corrupt-<time> and a fresh spool is
        started in its place: the long-running agent must not crash-loop on a corrupt file.
        """
        self.path = Path(path)
        if synchronous not in ("full", "normal"):
            raise StoreError(f"synchronous must be 'full' or 'normal', not '{synchronous}'")
        self.busy_timeout = busy_timeout
        self.limits = limits if limits is not None and limits.active else None
        self.max_age = getattr(limits, "max_age", None)
        try:
            self._open(synchronous, check=quarantine)
        except _Corrupt as corrupt:
            if not quarantine:
                raise StoreError(f"spool {self.path} is not a usable spool database: {corrupt}") from None
            moved = self._quarantine()
            log.error("spool %s was corrupt (%s); moved it to %s and started a fresh spool",
                      self.path, corrupt, moved.name)
            self._open(synchronous, check=False)
            self.bump(corrupt_quarantined=1)

    @classmethod
    def for_config(cls, config: Any, *, quarantine: bool = False) -> Store:
        """Open the spool a Config names, with its synchronous mode and limits."""
        return cls(config.db, synchronous=config.synchronous, limits=config.limits, quarantine=quarantine)

    def _open(self, synchronous: str, *, check: bool) -> None:
        _create_private_file(self.path)
        try:
            self.conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                        check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open spool {self.path}: {exc}") from None
        self.conn.create_function("boot_id", 0, boot_id)
        self.conn.create_function("boot_clock", 0, boot_clock)
        try:
            try:
                self.conn.execute("PRAGMA journal_mode=WAL")
                if check and self.conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    raise _Corrupt("failed SQLite's quick check")
            except sqlite3.DatabaseError as exc:
                if "not a database" in str(exc) or "malformed" in str(exc):
                    raise _Corrupt(str(exc)) from None
                raise
            with _translated(self.path, self.busy_timeout):
                self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
                self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def _quarantine(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{moved}{suffix}")
        return moved

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        if self._schema_version() == SCHEMA_VERSION:
            return
        with self._write():  # re-read inside the lock: another process may have migrated meanwhile
            version = self._schema_version()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[target](self.conn)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _schema_version(self) -> int:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(f"spool {self.path} has schema version {version}, newer than this spool "
                             f"understands ({SCHEMA_VERSION}); upgrade spool")
        return version

    @contextlib.contextmanager
    def _read(self) -> Iterator[None]:
        """Run several reads on one snapshot, so counts taken together agree with each other."""
        if self.conn.in_transaction:  # already inside one: that snapshot serves
            yield
            return
        with _translated(self.path, self.busy_timeout):
            self.conn.execute("BEGIN")
            try:
                yield
            finally:
                self.conn.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """Run the block in one immediate transaction, translating SQLite's errors into StoreError."""
        with _translated(self.path, self.busy_timeout):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    # -- producers -------------------------------------------------------------------------------

    def append(self, records: Iterable[Sequence[Any]]) -> int:
        """Commit `records` (Records, or tuples of the same shape; consumed lazily) in one transaction.

        Returns how many were committed.

        If iterating raises (a record failed validation), nothing from this call is committed.
        """
        with self._bounded() as conn:
            before = conn.total_changes
            conn.executemany(_INSERT, records)
            return conn.total_changes - before

    @contextlib.contextmanager
    def _bounded(self) -> Iterator[sqlite3.Connection]:
        """An appending transaction that ends by bringing the spool back within its limits.

        drop_oldest: the oldest pending records not in flight are deleted (sent records go first when the
        bound is in bytes), counted in the same commit. reject_new: nothing from this append is committed,
        SpoolFull is raised, and the refusal is counted.
        """
        try:
            with self._write() as conn:
                before = conn.total_changes
                yield conn
                if self.limits is not None:
                    self._enforce(conn, conn.total_changes - before)
        except SpoolFull:
            self.bump(refused_full=1)
            raise

    def _enforce(self, conn: sqlite3.Connection, incoming: int) -> None:
        limits = self.limits
        assert limits is not None
        reject = limits.when_full == "reject_new"
        if limits.max_pending is not None:
            pending = conn.execute(f"SELECT count(*) FROM records WHERE state = {PENDING}").fetchone()[0]
            excess = pending - limits.max_pending
            if excess > 0 and reject:
                raise SpoolFull(f"spool full: {pending - incoming} records pending, the limit is "
                                f"{limits.max_pending}; {incoming} new records refused")
            if excess > 0:
                self._drop_oldest(conn, excess)
        if limits.max_spool_bytes is not None:
            while (used := self._used_bytes(conn)) > limits.max_spool_bytes:
                if self._prune_some(conn):
                    continue  # delivered records give way first
                if reject:
                    raise SpoolFull(f"spool full: {used} bytes in use, the limit is {limits.max_spool_bytes}; "
                                    f"{incoming} new records refused")
                if not self._drop_oldest(conn, 1000):
                    break

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * conn.execute("PRAGMA page_size").fetchone()[0]

    def _prune_some(self, conn: sqlite3.Connection) -> int:
        return conn.execute(f"DELETE FROM records WHERE id IN (SELECT id FROM records WHERE state = {SENT} "
                            "ORDER BY id LIMIT 1000)").rowcount

    def _drop_oldest(self, conn: sqlite3.Connection, n: int) -> int:
        dropped = conn.execute(f"DELETE FROM records WHERE id IN (SELECT id FROM records WHERE state = {PENDING} "
                               f"AND id NOT IN ({_LEASED}) ORDER BY t, id LIMIT ?)", (n,)).rowcount
        if dropped:
            self._bump(conn, "dropped_oldest", dropped)
            _warn_rate_limited("spool is at its limit: dropped %d oldest pending records", dropped)
        return dropped

    def drop_expired(self, *, now: float) -> int:
        """Delete pending records (not in flight) whose t is older than max_age; they would not be shipped."""
        if self.max_age is None:
            return 0
        with self._write() as conn:
            dropped = conn.execute(f"DELETE FROM records WHERE state = {PENDING} AND t < ? AND id NOT IN ({_LEASED})",
                                   (now - self.max_age,)).rowcount
            if dropped:
                self._bump(conn, "dropped_age", dropped)
        return dropped

    def bump(self, **counts: int) -> None:
        """Add to named counters (drops, refusals, ...) in their own transaction."""
        with self._write() as conn:
            for name, n in counts.items():
                self._bump(conn, name, n)

    @staticmethod
    def _bump(conn: sqlite3.Connection, name: str, n: int) -> None:
        conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                     "SET value = CAST(value AS INTEGER) + excluded.value", (f"count.{name}", n))

    def counters(self) -> dict[str, int]:
        """Return the counters (dropped_oldest, dropped_age, refused_full, corrupt_quarantined, ...)."""
        return {name[6:]: int(value) for name, value in
                self.conn.execute("SELECT name, value FROM meta WHERE name LIKE 'count.%'")}

    def append_file(self, records: Iterable[Sequence[Any]], *, digest: Callable[[], str], name: str,
                    now: float) -> int | None:
        """Commit a file's records together with its identity, in one transaction.

        `digest` is called after `records` is consumed (it may hash what was read). If a file with that
        digest was committed before, nothing is committed and None is returned.
        """
        try:
            with self._bounded() as conn:
                before = conn.total_changes
                conn.executemany(_INSERT, records)
                taken = conn.total_changes - before
                if conn.execute("INSERT OR IGNORE INTO files (digest, name, records, at) VALUES (?, ?, ?, ?)",
                                (digest(), name, taken, now)).rowcount == 0:
                    raise _AlreadyIngested
                return taken
        except _AlreadyIngested:
            return None

    def append_one(self, record: Record) -> None:
        """Commit one record: a lone INSERT in autocommit mode is its own transaction (one statement, not three)."""
        if self.limits is not None:
            self.append([record])
            return
        with _translated(self.path, self.busy_timeout):
            self.conn.execute(_INSERT, record)

    # -- the shipper's state machine -------------------------------------------------------------

    def lease(self, limit: int, *, now: float, keyed_only: bool) -> Lease | None:
        """Lease up to `limit` of the oldest pending records no lease names; None when there are none.

        `keyed_only` skips EZ records that carry no ezkey (there is no configured key to send them with).
        """
        where = f"state = {PENDING} AND {_KEYED}" if keyed_only else f"state = {PENDING}"
        if self.max_age is not None:
            where += f" AND t >= {int(now - self.max_age)}"  # too old to ship: left for drop_expired
        with self._write() as conn:
            row = conn.execute(
                f"INSERT INTO leases (ids, leased_at) SELECT json_group_array(id), ? FROM "
                f"(SELECT id FROM records WHERE {where} AND id NOT IN ({_LEASED}) ORDER BY t, id LIMIT ?) "
                f"HAVING count(*) > 0 RETURNING id, ids", (now, limit)).fetchone()
            if row is None:
                return None
            rows = conn.execute(f"SELECT id, {_COLUMNS} FROM records WHERE id IN ({_IDS}) ORDER BY t, id",
                                (row[1],)).fetchall()
        return Lease(row[0], [Leased(r[0], Record(*r[1:])) for r in rows])

    def ack(self, ids: Sequence[int], *, now: float, lease: int | None = None) -> int:
        """Mark records SENT: the receiver acknowledged them. With `lease`, end that lease in the same commit."""
        with self._write() as conn:
            n = conn.execute(f"UPDATE records SET state = {SENT}, done_at = ? WHERE id IN ({_IDS}) "
                             f"AND state = {PENDING}", (now, json.dumps(list(ids)))).rowcount
            if lease is not None:
                conn.execute("DELETE FROM leases WHERE id = ?", (lease,))
            return n

    def end_lease(self, lease: int) -> None:
        """Drop a lease: the records it named that were not settled are pending again."""
        with self._write() as conn:
            conn.execute("DELETE FROM leases WHERE id = ?", (lease,))

    def kill(self, ids: Sequence[int], *, reason: str, http_status: int | None, body: str,
             now: float) -> int:
        """Move records to DEAD, keeping the receiver's reason, status and body."""
        with self._write() as conn:
            return conn.execute(
                f"UPDATE records SET state = {DEAD}, done_at = ?, reason = ?, http_status = ?, body = ? "
                f"WHERE id IN ({_IDS}) AND state = {PENDING}",
                (now, reason, http_status, body[:MAX_BODY], json.dumps(list(ids)))).rowcount

    def release_stale_leases(self, *, leased_before: float | None = None) -> int:
        """Drop leases taken before `leased_before` (all of them when None); return the records they named."""
        with self._write() as conn:
            cutoff = "" if leased_before is None else "WHERE leased_at < ?"
            params = () if leased_before is None else (leased_before,)
            named = conn.execute(f"SELECT count(*) FROM records WHERE state = {PENDING} AND id IN "
                                 f"(SELECT value FROM leases, json_each(leases.ids) {cutoff})", params).fetchone()[0]
            conn.execute(f"DELETE FROM leases {cutoff}", params)
            return named

    def prune_sent(self, *, sent_before: float, step: int = 1000) -> int:
        """Delete SENT records older than the retention cut-off, `step` rows per transaction.

        Walks the table once by id, so a run costs one pass however many steps it takes.
        """
        total, after = 0, 0
        while True:
            with self._write() as conn:
                ids = [row[0] for row in conn.execute(
                    f"SELECT id FROM records WHERE id > ? AND state = {SENT} AND done_at < ? ORDER BY id LIMIT ?",
                    (after, sent_before, step))]
                if ids:
                    conn.execute(f"DELETE FROM records WHERE id IN ({_IDS})", (json.dumps(ids),))
            total += len(ids)
            if len(ids) < step:
                return total
            after = ids[-1]

    def data_version(self) -> int:
        """Return a number that changes whenever another connection commits to the spool."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    # -- dead letters ------------------------------------------------------------------------------

    def dead(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Return dead records, oldest first, with the receiver's reason, status and body."""
        rows = self.conn.execute(
            f"SELECT id, {_COLUMNS}, done_at, reason, http_status, body FROM records "
            f"WHERE state = {DEAD} ORDER BY id LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        return [{"id": row[0], "record": Record(*row[1:8]), "dead_at": row[8], "reason": row[9],
                 "http_status": row[10], "body": row[11]} for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Return dead records (all when `ids` is None) to PENDING for another try."""
        with self._write() as conn:
            clear = (f"UPDATE records SET state = {PENDING}, done_at = NULL, reason = NULL, "
                     f"http_status = NULL, body = NULL WHERE state = {DEAD}")
            if ids is None:
                return conn.execute(clear).rowcount
            return conn.execute(f"{clear} AND id IN ({_IDS})", (json.dumps(list(ids)),)).rowcount

    def purge_dead(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead records (all when `ids` is None)."""
        with self._write() as conn:
            if ids is None:
                return conn.execute(f"DELETE FROM records WHERE state = {DEAD}").rowcount
            return conn.execute(f"DELETE FROM records WHERE state = {DEAD} AND id IN ({_IDS})",
                                (json.dumps(list(ids)),)).rowcount

    # -- what operators see -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Return how many records are in each state."""
        counts = dict.fromkeys(STATE_NAMES, 0)
        with self._read():  # one snapshot for both reads, so the numbers agree
            for state, n in self.conn.execute("SELECT state, count(*) FROM records GROUP BY state"):
                counts[STATE_NAMES[state]] = n
            counts["pending"], counts["inflight"] = self.backlog()
        return counts

    def backlog(self) -> tuple[int, int]:
        """Return (pending, in flight) from the pending index alone: cheap enough to ask every minute."""
        with self._read():
            waiting = self.conn.execute(f"SELECT count(*) FROM records WHERE state = {PENDING}").fetchone()[0]
            inflight = self.conn.execute(f"SELECT count(*) FROM records WHERE state = {PENDING} "
                                         f"AND id IN ({_LEASED})").fetchone()[0]
        return waiting - inflight, inflight

    def oldest_pending_t(self) -> int | None:
        return self.conn.execute(f"SELECT min(t) FROM records WHERE state = {PENDING}").fetchone()[0]

    def keyless_pending(self) -> int:
        """Return how many pending EZ records carry no ezkey of their own."""
        return self.conn.execute(f"SELECT count(*) FROM records WHERE state = {PENDING} "
                                 "AND stat IS NOT NULL AND ezkey IS NULL").fetchone()[0]

    def size_bytes(self) -> int:
        """Return the spool's size on disk: the database file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def integrity_ok(self) -> bool:
        return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def records(self, state: int | None = None) -> Iterator[tuple[int, int, Record]]:
        """Yield (id, state, record) for every record (of one stored state), in append order, streaming."""
        sql = f"SELECT id, state, {_COLUMNS} FROM records"
        cursor = (self.conn.execute(f"{sql} WHERE state = ? ORDER BY id", (state,)) if state is not None
                  else self.conn.execute(f"{sql} ORDER BY id"))
        for row in cursor:
            yield row[0], row[1], Record(*row[2:])

    # -- clock sanity ------------------------------------------------------------------------------

    def restamp_held(self, *, wall: float, mono: float, boot: str) -> tuple[int, int]:
        """Give held records their real t, now that the clock (`wall`) is sane; return (restamped, lost).

        A record held in this boot gets t = wall - (mono - its monotonic time). One held in an earlier boot
        cannot be placed in time: it becomes DEAD with the reason, for an operator to requeue or purge.
        """
        with self._write() as conn:
            restamped = conn.execute(
                f"UPDATE records SET t = CAST(? - (? - held_mono) AS INTEGER), state = {PENDING}, held_boot = NULL, "
                f"held_mono = NULL WHERE state = {HELD} AND held_boot = ?", (wall, mono, boot)).rowcount
            lost = conn.execute(
                f"UPDATE records SET state = {DEAD}, done_at = ?, reason = ?, held_boot = NULL WHERE state = {HELD} "
                f"AND held_boot != ?", (wall, "stamped while the clock was wrong, in an earlier boot: its time is "
                                              "unknown", boot)).rowcount
            if restamped:
                self._bump(conn, "restamped", restamped)
            return restamped, lost

    # -- compaction --------------------------------------------------------------------------------

    def compact_counts(self, *, bucket: int, groups: int = 500) -> int:
        """Merge pending counters (not in flight) of the same key and stat within one `bucket` of seconds.

        Each group becomes one record holding the sum, at the bucket's start. Exact for counters at that
        resolution; values are never merged. Works `groups` groups per transaction; returns records saved.
        """
        saved = 0
        while True:
            with self._write() as conn:
                rows = conn.execute(
                    f"SELECT stat, key, ukey, ezkey, (t / ?1) * ?1 AS bucket, count(*), sum(number), "
                    f"json_group_array(id) FROM records WHERE state = {PENDING} AND kind = 0 "
                    f"AND id NOT IN ({_LEASED}) GROUP BY stat, key, ukey, ezkey, bucket HAVING count(*) > 1 "
                    f"LIMIT ?2", (bucket, groups)).fetchall()
                merged = 0
                for stat, key, ukey, ezkey, start, n, total, ids in rows:
                    conn.execute(f"DELETE FROM records WHERE id IN ({_IDS})", (ids,))
                    conn.execute(_INSERT, (stat, key, ukey, ezkey, 0, total, start))
                    merged += n - 1
                if merged:
                    self._bump(conn, "compacted", merged)
            saved += merged
            if len(rows) < groups:
                return saved

    # -- moving backlog ----------------------------------------------------------------------------

    _SELECTIONS: ClassVar[dict[str, str]] = {"pending": f"state = {PENDING}", "sent": f"state = {SENT}",
                                              "dead": f"state = {DEAD}", "all": "1"}

    def _selection(self, state: str, since: int | None, until: int | None,
                   stat_glob: str | None = None) -> tuple[str, list[Any]]:
        if state not in self._SELECTIONS:
            raise StoreError(f"state must be one of {', '.join(self._SELECTIONS)}, not '{state}'")
        where, params = [self._SELECTIONS[state]], []
        if since is not None:
            where.append("t >= ?")
            params.append(since)
        if until is not None:
            where.append("t <= ?")
            params.append(until)
        if stat_glob is not None:
            where.append("stat GLOB ?")
            params.append(stat_glob)
        return " AND ".join(where), params

    def count_selected(self, state: str, *, since: int | None = None, until: int | None = None,
                       stat_glob: str | None = None) -> int:
        where, params = self._selection(state, since, until, stat_glob)
        return self.conn.execute(f"SELECT count(*) FROM records WHERE {where}", params).fetchone()[0]

    def export(self, state: str, *, since: int | None = None, until: int | None = None,
               stat_glob: str | None = None) -> Iterator[tuple[int, Record]]:
        """Yield (id, record) of the selected records in append order, streaming (one read snapshot)."""
        where, params = self._selection(state, since, until, stat_glob)
        with self._read():
            for row in self.conn.execute(f"SELECT id, {_COLUMNS} FROM records WHERE {where} ORDER BY id", params):
                yield row[0], Record(*row[1:])

    def remove_exported(self, state: str, *, up_to_id: int, since: int | None = None, until: int | None = None,
                        stat_glob: str | None = None) -> int:
        """Delete what `export` yielded (ids up to `up_to_id`), except records in flight: they are being sent."""
        where, params = self._selection(state, since, until, stat_glob)
        with self._write() as conn:
            return conn.execute(f"DELETE FROM records WHERE {where} AND id <= ? AND id NOT IN ({_LEASED})",
                                [*params, up_to_id]).rowcount

    def replay(self, *, since: int | None, until: int | None, stat_glob: str | None = None) -> int:
        """Queue pending copies of retained SENT records (StatHat will count them again); return how many."""
        where, params = self._selection("sent", since, until, stat_glob)
        with self._bounded() as conn:
            return conn.execute(f"INSERT INTO records ({_COLUMNS}) SELECT {_COLUMNS} FROM records WHERE {where} "
                                "ORDER BY id", params).rowcount

    # -- small persistent facts (last shipping attempt, ...) ----------------------------------------

    def set_meta(self, **values: Any) -> None:
        with self._write() as conn:
            conn.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                             [(name, json.dumps(value)) for name, value in values.items()])

    def meta(self) -> dict[str, Any]:
        return {name: json.loads(value) for name, value in self.conn.execute("SELECT name, value FROM meta")}


def boot_id() -> str:
    """This boot's id (Linux), so held records are re-stamped only with the monotonic clock they were taken by."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def boot_clock() -> float:
    """Seconds since boot, suspend included: the clock held records keep."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class _Corrupt(Exception):
    pass


_last_warning = [0.0]


def _warn_rate_limited(message: str, *args: object) -> None:
    """Log a warning at most once a minute (drops can happen on every append when the spool is full)."""
    now = time.monotonic()
    if now - _last_warning[0] >= 60:
        _last_warning[0] = now
        log.warning(message, *args)


class ShipLock:
    """An exclusive lock that makes one process the spool's only shipper; the kernel drops it on death."""

    def __init__(self, spool_path: str | os.PathLike[str]):
        self.path = Path(f"{spool_path}.ship.lock")
        self._fd: int | None = None

    def acquire(self) -> ShipLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolBusy(f"another shipper (pid {holder}) is already draining this spool") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> int | None:
        """Return the pid of the process holding the lock, or None when no shipper is running."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)  # also drops the shared lock, if we got it
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> ShipLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create_private_file(path: Path) -> None:
    """Create the spool file (and its directory) readable by its owner only, if it does not exist yet."""
    if path.exists():
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        raise StoreError(f"cannot create spool {path}: {exc.strerror}") from None


@contextlib.contextmanager
def _translated(path: Path, busy_timeout: float) -> Iterator[None]:
    """Turn SQLite's exceptions into StoreError with a message an operator can act on."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "full" in text:
            raise StoreError(f"spool full: {path}: the disk has no space left") from None
        if "locked" in text or "busy" in text:
            raise StoreError(f"spool {path} stayed locked by another process for "
                             f"{busy_timeout:g} s; try again") from None
        if "readonly" in text or "unable to open" in text:
            raise StoreError(f"cannot write spool {path}: {text}") from None
        raise StoreError(f"spool {path}: {text}") from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"spool {path} is not a usable spool database: {exc}") from None

