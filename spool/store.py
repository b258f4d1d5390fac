"""The spool file: schema, and every SQL statement spool runs. The only module that touches sqlite3.

The storage contract, stated once:

* A record is in exactly one state: PENDING, INFLIGHT (pending and named by a live lease), SENT or DEAD.
* `append` returns only after its transaction committed; with synchronous=FULL (the default) that
  survives power loss, with NORMAL it survives a crash of the process but maybe not of the machine.
* A large append is staged: written in chunks, each committed as the records it will be (PENDING, or HELD)
  with their ids named in the spans of its open stage (`stage_spans`). Every reader of records leaves the ids
  of open stages out (leases, counts, status, export, the bounds, age drops, compaction, re-stamping), so
  none of it is visible. Its last transaction deletes the stage's spans (with the file mark and the bounds):
  the whole append appears at once, without rewriting a record. All or nothing, and no transaction holds the
  write lock for long (a chunk, or that publish). Staged records of an owner that died are discarded
  (`sweep_stages`), a chunk per transaction, the span shrinking with them so what is left stays hidden. An
  append whose stage is no longer whole when it publishes (or before a chunk) fails and publishes nothing.
* `lease` takes the oldest pending records not already leased (by `t`, then append order) inside one
  immediate transaction (the write lock is held from its start, so no other shipper can lease between the
  query and the insert): two shippers can never lease the same record. A lease is one small row naming its
  owner (a lock its Store holds: `spool.owners`), and each record it holds is one row of `leased` (record
  id -> lease): leasing rewrites no record, which keeps writes per record low (SD cards), and "is this record
  in flight?" is one lookup by id. Lease ids are never reused (AUTOINCREMENT). A lease is committed without waiting for
  the disk: one lost in a power cut only returns its records to pending, as its owner's death would, and
  the next durable commit (an acknowledgement) makes it durable anyway.
* `ack` marks records SENT (and they leave their lease); it is called only after the receiver acknowledged
  them. `mark_dead` moves records to DEAD with the receiver's reason, HTTP status and body. `end_lease` drops
  the lease: whatever it named that was not settled is simply pending again (transient failure, shutdown).
* A stage or a lease is taken from its owner only when the owner is proven dead (`sweep_stages`,
  `release_dead_leases`): its lock, which the kernel drops when the owner's process ends, could be taken.
  No pid is compared: pids name nothing across PID namespaces, containers and emulators. A live owner's
  stage or lease is never taken from it.
* A dropped file's identity (path, device, inode, the offset read up to, mtime, a hash of the bytes just
  before that offset) is committed with its records; see `FileMark`.
* SENT records are kept for the retention period (for replay) and then pruned in small transactions.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from spool.clock import boot_clock, boot_id
from spool.durable import fsync_dir
from spool.errors import SpoolCorrupt, SpoolFull, SpoolMissing, StoreError
from spool.owners import PREFIX, Owners, is_legacy, legacy_alive
from spool.records import INT64_MAX, Kind, Record

if TYPE_CHECKING:
    import logging

    from spool.config import Config, SpoolSettings


# json and logging are imported on first use: appending one record (`spool add`, a whole process each time) needs
# neither, and importing them is several milliseconds of that process's start-up.
def _dumps(value: Any) -> str:
    import json

    return json.dumps(value)


def _loads(text: str) -> Any:
    import json

    return json.loads(text)


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("spool.store")


class State(IntEnum):
    """A record's stored state. "In flight" is PENDING named by a lease, never stored. (1 was never used.)"""

    PENDING = 0
    SENT = 2
    DEAD = 3
    HELD = 4  # stamped while the clock was wrong: waits for its real t
    STAGED = 5  # version 5 only: part of a large append not yet whole (version 6 hides those by their ids)


COUNTED = ("pending", "inflight", "sent", "dead", "held")  # what counts() reports (staged records are not there)

SCHEMA_VERSION = 7
PAGE_SIZE = 1024  # bytes, for new spools (see _prepare)
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another writer before "database is locked"
MAX_BODY = 2000  # characters of a refusal's response body kept with a dead record
RESTAMP_SLACK = 60  # seconds past now a re-stamped t may land (clock granularity), no more
STAGE_CHUNK = 20_000  # rows: an append larger than this is staged in transactions of this size
SWEEP_CHUNK = 20_000  # rows deleted per transaction when discarding a stage

_COLUMNS = "stat, key, ukey, ezkey, kind, number, t"
_INSERT = f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
_NAMES = tuple(_COLUMNS.split(", "))
# A record stamped while the clock was wrong arrives with t = 0 (records.HELD_T). It is made HELD, with the
# boot it was stamped in and that boot's monotonic clock, by one statement at the end of the appending
# transaction: an index seek that finds nothing in the common case, so the insert itself stays plain.
_HOLD = (f"UPDATE records SET state = {State.HELD}, held_boot = boot_id(), held_mono = boot_clock() "
         f"WHERE state = {State.PENDING} AND t = 0")
_IDS = "SELECT value FROM json_each(?)"  # a JSON array of ids bound as one parameter
_LEASED = "SELECT id FROM leased"  # every record some live lease holds
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
        defaults={"state": int(State.PENDING)},
        if_not_exists=True,
    )
    # Only pending records are indexed (by t, then id): that serves leasing oldest-first and the backlog's
    # count and age, while acks and prunes touch no index pages at all (a third fewer bytes written per
    # record; see scripts/bench.py). Everything else walks the primary key.
    conn.execute(f"CREATE INDEX IF NOT EXISTS pending_t ON records (t) WHERE state = {State.PENDING}")
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


def _v4(conn: sqlite3.Connection) -> None:
    """Version 4: files by identity, leases with owners and never-reused ids, staged appends, suspects.

    * files: 0.1.0 knew files by a digest of their content, which dropped a second file with the same bytes.
      Those rows cannot be mapped to an identity; they only mattered for a file committed but not yet moved
      when 0.1.0 stopped, which is gone from its directory by now in all but that crash. They are dropped.
    * leases: ids under AUTOINCREMENT are never reused; `owner` names the process that holds the lease.
    * records.stage: the append a STAGED record belongs to (see `stages`). records.split: the suspect group
      of a record the receiver refused as part of a batch (the shipper isolates such records).
    * partial indexes of staged, suspect and held records: each holds only those, so it costs nothing when
      there are none.
    """
    conn.execute("DROP TABLE IF EXISTS files")
    conn.execute("CREATE TABLE files (path BLOB PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL, "
                 "offset INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, tail TEXT NOT NULL, "
                 "records INTEGER NOT NULL, at REAL NOT NULL)")
    conn.execute("CREATE TABLE leases_v4 (id INTEGER PRIMARY KEY AUTOINCREMENT, ids TEXT NOT NULL, "
                 "leased_at REAL NOT NULL, owner TEXT)")
    conn.execute("INSERT INTO leases_v4 (id, ids, leased_at) SELECT id, ids, leased_at FROM leases")
    conn.execute("DROP TABLE leases")
    conn.execute("ALTER TABLE leases_v4 RENAME TO leases")
    conn.execute("CREATE TABLE stages (id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, "
                 "started_at REAL NOT NULL)")
    conn.execute("ALTER TABLE records ADD COLUMN stage INTEGER")
    conn.execute("ALTER TABLE records ADD COLUMN split INTEGER")
    conn.execute(f"CREATE INDEX staged ON records (stage, t) WHERE state = {State.STAGED}")
    conn.execute(f"CREATE INDEX suspects ON records (split) WHERE state = {State.PENDING} AND split IS NOT NULL")
    # Every drain looks for held records to re-stamp: an index holding only those keeps that look free.
    conn.execute(f"CREATE INDEX held ON records (held_boot) WHERE state = {State.HELD}")


def _v5(conn: sqlite3.Connection) -> None:
    """Version 5: the records a lease holds are rows of `leased` (record id -> lease), not a JSON list in the lease.

    Leasing asks of every candidate whether some lease holds it: with lists, each lease parsed every live
    lease's list (its cost grew with the records in flight); a row per record is one lookup by id.
    """
    conn.execute("CREATE TABLE leased (id INTEGER PRIMARY KEY, lease INTEGER NOT NULL)")
    conn.execute("INSERT OR IGNORE INTO leased (id, lease) SELECT value, leases.id FROM leases, "
                 "json_each(leases.ids) ORDER BY leases.id")
    conn.execute("ALTER TABLE leases DROP COLUMN ids")
    # The span of record ids a lease holds: ending it deletes its rows of `leased` by a range, not a scan.
    conn.execute("ALTER TABLE leases ADD COLUMN first_id INTEGER")
    conn.execute("ALTER TABLE leases ADD COLUMN last_id INTEGER")
    conn.execute("UPDATE leases SET first_id = (SELECT min(id) FROM leased WHERE lease = leases.id), "
                 "last_id = (SELECT max(id) FROM leased WHERE lease = leases.id)")


def _v6(conn: sqlite3.Connection) -> None:
    """Version 6: an unfinished large append is hidden by the ids it spans, not by a state its records must leave.

    Version 5 committed a large append's chunks as STAGED records and made them PENDING in its last
    transaction: one UPDATE rewrote every record and moved every index entry, about doubling the append's work
    (and holding the write lock for that whole statement). Now the chunks are committed as the records they
    will be, and `stage_spans` names the ranges of ids each open stage holds; every reader of records leaves
    those out, and the last transaction deletes the stage's spans: no record is rewritten.

    The index of STAGED records goes (it cost every insert); the version-5 appends whose process died are
    discarded first, by it. One still running finishes as it began (its UPDATE finds its records without the
    index, more slowly); should it die, `sweep_stages` discards it by one scan: `meta` keeps the last stage id
    version 5 gave (ids are never reused), so only those stages are looked for as STAGED records.
    """
    for stage, owner in conn.execute("SELECT id, owner FROM stages").fetchall():
        if not legacy_alive(owner):
            conn.execute(f"DELETE FROM records WHERE state = {State.STAGED} AND stage = ?", (stage,))
            conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
    last = conn.execute("SELECT max(id) FROM stages").fetchone()[0]
    if last is not None:
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (_V5_STAGES, _dumps(last)))
    conn.execute("DROP INDEX IF EXISTS staged")
    conn.execute("CREATE TABLE stage_spans (lo INTEGER PRIMARY KEY, hi INTEGER NOT NULL, stage INTEGER NOT NULL)")


_V5_STAGES = "version_5_stages_up_to"  # meta: stage ids up to this one staged their records as STAGED


def _v7(conn: sqlite3.Connection) -> None:
    """Version 7: stages and leases are owned by locks ("lock:TOKEN", see spool.owners), not by boot, pid and start.

    Nothing is rewritten: the owners version 6 named stay, judged as spool.owners says. The version is what
    changes, so that a release judging owners by pid refuses this spool instead of taking a running import's
    owner for dead (it cannot read a lock's name) and discarding its stage.
    """


_MIGRATIONS = {1: _create_schema, 2: _add_files_and_leases, 3: _add_held, 4: _v4, 5: _v5, 6: _v6,
               7: _v7}  # version -> step


class FileMark(NamedTuple):
    """What the spool knows of a dropped file it took records from, committed with those records.

    `offset` is how many bytes were read (the records taken end there); `tail` a hash of the bytes just before
    it, which tells a file that grew by appending (the tail is unchanged) from one rewritten in place.
    """

    path: bytes  # os.fsencode of the absolute path: file names need not be UTF-8
    dev: int
    ino: int
    offset: int
    mtime_ns: int
    tail: str
    records: int = 0


class Store:
    """An open spool file. One connection; use one Store per thread."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "full",
                 busy_timeout: float = BUSY_TIMEOUT, limits: SpoolSettings | None = None, quarantine: bool = False,
                 create: bool = True):
        """Open (creating if need be) a spool file.

        `limits` (the [spool] settings) bounds it. Without `create`, a missing file is an error (SpoolMissing):
        commands that only read or manage a spool never make one. With `quarantine`, a file that is not a sound
        spool (not a
        database, or failing SQLite's quick check) is moved aside as NAME.corrupt-<time> and a fresh spool is
        started in its place: the long-running agent must not crash-loop on a corrupt file.
        """
        self.path = Path(path)
        self.synchronous = synchronous
        self.owners = Owners(self.path)  # the lock this Store's stages and leases belong to, taken when first needed
        self._last_warning = float("-inf")
        if synchronous not in ("full", "normal"):
            raise StoreError(f"synchronous must be 'full' or 'normal', not '{synchronous}'")
        self.busy_timeout = busy_timeout
        if not create and not self.path.exists():
            raise SpoolMissing(f"no spool at {self.path}: nothing was spooled there yet (is --db, SPOOL_DB or "
                               "spool.path the one you meant?)")
        self.limits = limits if limits is not None and limits.bounded else None
        self.max_age = getattr(limits, "max_age", None)
        try:
            self._open(synchronous, check=quarantine)
        except _Corrupt as corrupt:
            if not quarantine:
                raise _corrupt(self.path, str(corrupt)) from None
            moved = self._quarantine()
            _log().error("spool %s was corrupt (%s); moved it to %s and started a fresh spool",
                      self.path, corrupt, moved.name)
            self._open(synchronous, check=False)
            self.add_counts(corrupt_quarantined=1)

    @classmethod
    def for_config(cls, config: Config, *, quarantine: bool = False, create: bool = True) -> Store:
        """Open the spool a Config names, with its synchronous mode and limits."""
        return cls(config.db, synchronous=config.spool.synchronous, limits=config.spool, quarantine=quarantine,
                   create=create)

    def _open(self, synchronous: str, *, check: bool) -> None:
        _create_private_file(self.path)
        with _translated(self.path, self.busy_timeout):
            self.conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                        check_same_thread=False)
        self.conn.create_function("boot_id", 0, boot_id)
        self.conn.create_function("boot_clock", 0, boot_clock)
        try:
            # Several processes opening a new spool at once race for the switch to WAL and the schema; the
            # switch does not always wait on the busy handler, so wait here as any write would.
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    self._prepare(synchronous, check=check)
                    return
                except sqlite3.OperationalError as exc:
                    if _code(exc) not in (_BUSY, _LOCKED) or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.01)
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if _code(exc) in (_CORRUPT, _NOTADB):
                raise _Corrupt(str(exc)) from None
            with _translated(self.path, self.busy_timeout):
                raise
        except BaseException:
            self.conn.close()
            raise

    def _prepare(self, synchronous: str, *, check: bool) -> None:
        # A new spool gets 1 KiB pages (an existing one keeps its own: WAL mode cannot change it). A commit
        # writes each page it touches whole into the WAL, and one record per commit (`spool add`, the relay
        # under light load) touches two: 4 KiB pages made that 12.8 kB written per record, 1 KiB pages 6.9 kB;
        # 500-record batches went from 535 to 423 B per record over its life (docs/benchmarks.md).
        self.conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        self.conn.execute("PRAGMA journal_mode=WAL")  # a file that is not a database fails here (SQLITE_NOTADB)
        # Every page a statement reads is checked more closely, so damage on the path of an append is reported
        # (SQLITE_CORRUPT) before the append writes beside it, at no cost worth measuring.
        self.conn.execute("PRAGMA cell_size_check=ON")
        if check:
            if self.conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise _Corrupt("failed SQLite's quick check")
        else:
            self._check_bookkeeping()
        self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._full = synchronous == "full"  # the configured durability (a lease commits without waiting: _write)
        self._migrate()

    def _check_bookkeeping(self) -> None:
        """Check every table but the records (the schema, counters, leases, stages, file marks): cheap, and the same
        cost whatever the backlog.

        These small tables are written by every lease, acknowledgement and bound, so they are where a power cut or a
        failing card most likely leaves damage, and `spool run` moves a spool aside for damage anywhere: a producer
        must not append (and exit 0) to a file the agent will set aside. The records table, with its tens of millions
        of rows, is not walked at each open: an append's statements read its pages on their path, and SQLite reports
        damage there (SQLITE_CORRUPT) before anything is written.
        """
        if sqlite3.sqlite_version_info < (3, 33, 0):  # quick_check(TABLE) came with 3.33; before, it checks it all
            return
        tables = [row[0] for row in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'records'")]
        for table in ("sqlite_master", *tables):
            verdict = self.conn.execute(f'PRAGMA quick_check("{table}")').fetchone()[0]
            if verdict != "ok":
                raise _Corrupt(f"its table {table} failed SQLite's quick check")

    def _quarantine(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{moved}{suffix}")
        fsync_dir(self.path.parent)  # the renames are durable before a fresh spool takes the name
        return moved

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self.owners.release()  # what this Store still owns is a dead owner's now

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        if self._schema_version() == SCHEMA_VERSION:
            return
        self.conn.execute("BEGIN IMMEDIATE")  # re-read inside the lock: another process may have migrated
        try:
            version = self._schema_version()
            for target in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[target](self.conn)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

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
    def _write(self, *, wait: bool = True) -> Iterator[sqlite3.Connection]:
        """Run the block in one immediate transaction, translating SQLite's errors into StoreError.

        Without `wait`, the commit does not wait for the disk even under synchronous=FULL (NORMAL's guarantee:
        it survives a crash of the process, and a power cut may take it with the other commits since the last
        sync, never an earlier one). Only for writes whose loss a power cut may cause harmlessly (a lease, a
        chunk of an append not yet published).
        """
        relaxed = self._full and not wait
        with _translated(self.path, self.busy_timeout):
            if relaxed:
                self.conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    raise
            finally:
                if relaxed:  # every other write, appends included, waits for the disk as configured
                    self.conn.execute("PRAGMA synchronous=FULL")

    # -- producers -------------------------------------------------------------------------------

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
                _insert(conn, first)
                held = conn.execute(_HOLD).rowcount
                if file is not None:
                    self._mark_file(conn, file._replace(records=len(first)))
                self._enforce(conn, len(first), held=held)
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
                # Publishing the whole append is deleting its spans: no record is rewritten.
                conn.execute("DELETE FROM stage_spans WHERE stage = ?", (stage,))
                conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
                if file is not None:
                    self._mark_file(conn, file._replace(records=taken))
                self._enforce(conn, taken, held=held)
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

    @staticmethod
    def _stage_chunk(conn: sqlite3.Connection, stage: int, part: list[Sequence[Any]]) -> int:
        """Insert one chunk of an open stage and name its ids in the stage's spans, in one transaction (so no
        reader ever sees them outside a span); hold those stamped while the clock was wrong. Returns how many."""
        lo = (conn.execute("SELECT max(id) FROM records").fetchone()[0] or 0) + 1
        _insert(conn, part)
        hi = lo + len(part) - 1
        if conn.execute("SELECT last_insert_rowid()").fetchone()[0] != hi:  # ids past max(id) are consecutive
            raise StoreError("spool: a staged chunk did not get consecutive record ids")
        if not conn.execute("UPDATE stage_spans SET hi = ? WHERE stage = ? AND hi = ?", (hi, stage, lo - 1)).rowcount:
            conn.execute("INSERT INTO stage_spans (lo, hi, stage) VALUES (?, ?, ?)", (lo, hi, stage))
        return conn.execute(f"{_HOLD} AND id BETWEEN ? AND ?", (lo, hi)).rowcount

    def _discard_stage(self, stage: int) -> None:
        """Delete an unfinished append's records, at most SWEEP_CHUNK per transaction, each shrinking its span
        with them (what is left stays hidden), then the stage itself."""
        while True:
            with self._write() as conn:
                span = conn.execute("SELECT lo, hi FROM stage_spans WHERE stage = ? ORDER BY lo LIMIT 1",
                                    (stage,)).fetchone()
                if span is None:
                    legacy = conn.execute("SELECT value FROM meta WHERE name = ?", (_V5_STAGES,)).fetchone()
                    if legacy is not None and stage <= _loads(legacy[0]):  # staged by version 5: one scan
                        conn.execute(f"DELETE FROM records WHERE state = {State.STAGED} AND stage = ?", (stage,))
                    conn.execute("DELETE FROM stages WHERE id = ?", (stage,))
                    return
                lo, hi = span
                end = min(hi, lo + SWEEP_CHUNK - 1)
                conn.execute("DELETE FROM records WHERE id BETWEEN ? AND ?", (lo, end))
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

    def _hidden(self, conn: sqlite3.Connection | None = None) -> str:
        """Return the condition leaving out the records of open stages (" AND NOT (id BETWEEN lo AND hi)" per
        span; "" when no append is open). Read it in the transaction of the statement it goes into."""
        spans = (conn or self.conn).execute("SELECT lo, hi FROM stage_spans").fetchall()
        return "".join(f" AND NOT (id BETWEEN {int(lo)} AND {int(hi)})" for lo, hi in spans)

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

    def _enforce(self, conn: sqlite3.Connection, incoming: int, *, held: int = 0) -> None:
        """Bring the spool back within its limits at the end of an appending transaction.

        drop_oldest: the oldest pending records not in flight are deleted (sent records go first when the
        bound is in bytes), counted in the same commit. reject_new: SpoolFull, so nothing is committed.
        `incoming` records were added, `held` of them held (not pending).
        """
        limits = self.limits
        if limits is None:
            return
        reject = limits.when_full == "reject_new"
        if limits.max_pending is not None:
            pending = conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING}"
                                   f"{self._hidden(conn)}").fetchone()[0]
            excess = pending - limits.max_pending
            if excess > 0 and reject:
                raise SpoolFull(f"spool full: {pending - (incoming - held)} records pending, the limit is "
                                f"{limits.max_pending}; {incoming} new records refused", refused=incoming)
            if excess > 0:
                self._drop_oldest(conn, excess)
        if limits.max_spool_bytes is not None:
            while (used := self._used_bytes(conn)) > limits.max_spool_bytes:
                if self._prune_some(conn):
                    continue  # delivered records give way first
                if reject:
                    raise SpoolFull(f"spool full: {used} bytes in use, the limit is {limits.max_spool_bytes}; "
                                    f"{incoming} new records refused", refused=incoming)
                if not self._drop_oldest(conn, 1000):
                    break

    def _used_bytes(self, conn: sqlite3.Connection) -> int:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
        return pages * conn.execute("PRAGMA page_size").fetchone()[0]

    def _prune_some(self, conn: sqlite3.Connection) -> int:
        return conn.execute(f"DELETE FROM records WHERE id IN (SELECT id FROM records WHERE state = {State.SENT} "
                            "ORDER BY id LIMIT 1000)").rowcount

    def _drop_oldest(self, conn: sqlite3.Connection, n: int) -> int:
        dropped = conn.execute(f"DELETE FROM records WHERE id IN (SELECT id FROM records WHERE state = {State.PENDING} "
                               f"AND id NOT IN ({_LEASED}){self._hidden(conn)} ORDER BY t, id LIMIT ?)", (n,)).rowcount
        if dropped:
            self._add_count(conn, "dropped_oldest", dropped)
            self._warn_rate_limited("spool is at its limit: dropped %d oldest pending records", dropped)
        return dropped

    def _warn_rate_limited(self, message: str, *args: object) -> None:
        """Log a warning at most once a minute (drops can happen on every append when the spool is full)."""
        now = time.monotonic()
        if now - self._last_warning >= 60:
            self._last_warning = now
            _log().warning(message, *args)

    def drop_expired(self, *, now: float) -> int:
        """Delete pending records (not in flight) whose t is older than max_age; they would not be shipped."""
        if self.max_age is None:
            return 0
        with self._write() as conn:
            dropped = conn.execute(f"DELETE FROM records WHERE state = {State.PENDING} AND t < ? "
                                   f"AND id NOT IN ({_LEASED}){self._hidden(conn)}",
                                   (now - self.max_age,)).rowcount
            if dropped:
                self._add_count(conn, "dropped_age", dropped)
        return dropped

    def add_counts(self, **counts: int) -> None:
        """Add to named counters (drops, refusals, ...) in their own transaction."""
        with self._write() as conn:
            for name, n in counts.items():
                self._add_count(conn, name, n)

    @staticmethod
    def _add_count(conn: sqlite3.Connection, name: str, n: int) -> None:
        conn.execute("INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                     "SET value = CAST(value AS INTEGER) + excluded.value", (f"count.{name}", n))

    def counters(self) -> dict[str, int]:
        """Return the counters (dropped_oldest, dropped_age, refused_full, corrupt_quarantined, ...)."""
        with self._read():  # damage is reported as such (SpoolCorrupt), as by every read
            return {name[6:]: int(value) for name, value in
                    self.conn.execute("SELECT name, value FROM meta WHERE name LIKE 'count.%'")}

    # -- dropped files --------------------------------------------------------------------------------

    def _mark_file(self, conn: sqlite3.Connection, mark: FileMark) -> None:
        conn.execute("INSERT INTO files (path, dev, ino, offset, mtime_ns, tail, records, at) "
                     "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET dev = excluded.dev, "
                     "ino = excluded.ino, offset = excluded.offset, mtime_ns = excluded.mtime_ns, "
                     "tail = excluded.tail, records = excluded.records, at = excluded.at",
                     (*mark, time.time()))

    def file_mark(self, path: bytes) -> FileMark | None:
        """Return the mark committed for a file path, or None if no records were taken from a file there."""
        row = self.conn.execute("SELECT path, dev, ino, offset, mtime_ns, tail, records FROM files "
                                "WHERE path = ?", (path,)).fetchone()
        return FileMark(*row) if row else None

    def file_marks(self) -> list[FileMark]:
        return [FileMark(*row) for row in
                self.conn.execute("SELECT path, dev, ino, offset, mtime_ns, tail, records FROM files")]

    def forget_files(self, paths: Iterable[bytes]) -> int:
        """Drop the marks of files that are gone (moved to .done/, deleted, replaced); return how many."""
        with self._write() as conn:
            return sum(conn.execute("DELETE FROM files WHERE path = ?", (path,)).rowcount for path in paths)

    def move_file_mark(self, old: bytes, new: bytes) -> None:
        """Let a file's mark follow it to a new name."""
        with self._write() as conn:
            conn.execute("DELETE FROM files WHERE path = ?", (new,))
            conn.execute("UPDATE files SET path = ? WHERE path = ?", (new, old))

    def append_one(self, record: Record) -> None:
        """Commit one record: a lone INSERT in autocommit mode is its own transaction (one statement, not three)."""
        if self.limits is not None or record[6] == 0:  # bounds, or a held record: a transaction of its own
            self.append([record])
            return
        with _translated(self.path, self.busy_timeout):
            self.conn.execute(_INSERT, record)

    # -- the shipper's state machine -------------------------------------------------------------

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

    def split(self, lease: int, halves: Sequence[Sequence[int]]) -> None:
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
            conn.execute("DELETE FROM leases WHERE id = ? AND NOT EXISTS (SELECT 1 FROM leased WHERE lease = ?)",
                         (lease, lease))

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
            return conn.execute(
                f"UPDATE records SET state = {State.DEAD}, done_at = ?, reason = ?, http_status = ?, body = ?, "
                f"split = NULL "
                f"WHERE id IN ({_IDS}) AND state = {State.PENDING}",
                (now, reason, http_status, body[:MAX_BODY], _dumps(list(ids)))).rowcount

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

    def prune_sent(self, *, sent_before: float, step: int = 1000) -> int:
        """Delete SENT records older than the retention cut-off, `step` rows per transaction.

        Walks the table once by id, so a run costs one pass however many steps it takes.
        """
        total, after = 0, 0
        while True:
            with self._write() as conn:
                ids = [row[0] for row in conn.execute(
                    f"SELECT id FROM records WHERE id > ? AND state = {State.SENT} AND done_at < ? ORDER BY id LIMIT ?",
                    (after, sent_before, step))]
                if ids:
                    conn.execute(f"DELETE FROM records WHERE id IN ({_IDS})", (_dumps(ids),))
            total += len(ids)
            if len(ids) < step:
                return total
            after = ids[-1]

    def data_version(self) -> int:
        """Return a number that changes whenever another connection commits to the spool."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    # -- dead letters ------------------------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Return dead records, oldest first, with the receiver's reason, status and body."""
        with self._read():
            rows = self.conn.execute(
                f"SELECT id, {_COLUMNS}, done_at, reason, http_status, body FROM records "
                f"WHERE state = {State.DEAD} ORDER BY id LIMIT ?", (-1 if limit is None else limit,)).fetchall()
        return [{"id": row[0], "record": Record(*row[1:8]), "dead_at": row[8], "reason": row[9],
                 "http_status": row[10], "body": row[11]} for row in rows]

    def requeue_dead(self, ids: Sequence[int] | None = None) -> tuple[int, tuple[int, ...]]:
        """Return dead records (all when `ids` is None) to PENDING; return (how many, ids that are not dead)."""
        clear = (f"UPDATE records SET state = {State.PENDING}, done_at = NULL, reason = NULL, "
                 f"http_status = NULL, body = NULL WHERE state = {State.DEAD}")
        return self._dead_by_ids(clear, ids)

    def purge_dead(self, ids: Sequence[int] | None = None) -> tuple[int, tuple[int, ...]]:
        """Delete dead records (all when `ids` is None); return (how many, ids that are not dead)."""
        return self._dead_by_ids(f"DELETE FROM records WHERE state = {State.DEAD}", ids)

    def _dead_by_ids(self, statement: str, ids: Sequence[int] | None) -> tuple[int, tuple[int, ...]]:
        with self._write() as conn:
            if ids is None:
                return conn.execute(statement).rowcount, ()
            wanted = _dumps(sorted(set(ids)))
            missing = tuple(row[0] for row in conn.execute(
                f"SELECT value FROM json_each(?) WHERE value NOT IN (SELECT id FROM records WHERE state = {State.DEAD} "
                f"AND id IN ({_IDS}))", (wanted, wanted)))
            return conn.execute(f"{statement} AND id IN ({_IDS})", (wanted,)).rowcount, missing

    # -- what operators see -------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Return how many records are in each state."""
        counts = dict.fromkeys(COUNTED, 0)
        with self._read():  # one snapshot for both reads, so the numbers agree
            for state, n in self.conn.execute(f"SELECT state, count(*) FROM records WHERE state != {State.STAGED}"
                                              f"{self._hidden()} GROUP BY state"):
                counts[State(state).name.lower()] = n
            counts["pending"], counts["inflight"] = self.backlog()
        return counts

    def backlog(self) -> tuple[int, int]:
        """Return (pending, in flight) from the pending index alone: cheap enough to ask every minute."""
        with self._read():
            waiting = self.conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING}"
                                        f"{self._hidden()}").fetchone()[0]
            inflight = self.conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING} "
                                         f"AND id IN ({_LEASED})").fetchone()[0]
        return waiting - inflight, inflight

    def oldest_pending_t(self) -> int | None:
        with self._read():
            return self.conn.execute(f"SELECT min(t) FROM records WHERE state = {State.PENDING}"
                                     f"{self._hidden()}").fetchone()[0]

    def keyless_pending(self) -> int:
        """Return how many pending EZ records carry no ezkey of their own."""
        with self._read():
            return self.conn.execute(f"SELECT count(*) FROM records WHERE state = {State.PENDING} "
                                     f"AND stat IS NOT NULL AND ezkey IS NULL{self._hidden()}").fetchone()[0]

    def size_bytes(self) -> int:
        """Return the spool's size on disk: the database file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(f"{self.path}{suffix}").st_size
        return total

    def integrity_ok(self) -> bool:
        with _translated(self.path, self.busy_timeout):
            return self.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    def records(self, state: int | None = None) -> Iterator[tuple[int, int, Record]]:
        """Yield (id, state, record) for every record (of one stored state), in append order, streaming."""
        # One statement (one snapshot, however slowly it is consumed) leaves out the records of open stages.
        sql = (f"SELECT id, state, {_COLUMNS} FROM records WHERE NOT EXISTS (SELECT 1 FROM stage_spans "
               "WHERE records.id BETWEEN lo AND hi)")
        cursor = (self.conn.execute(f"{sql} AND state = ? ORDER BY id", (state,)) if state is not None
                  else self.conn.execute(f"{sql} AND state != {State.STAGED} ORDER BY id"))
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
        placed = "CAST(:wall - (:mono - held_mono) AS INTEGER)"
        params = {"wall": wall, "mono": mono, "boot": boot, "floor": floor, "slack": wall + RESTAMP_SLACK}
        with self._write() as conn:
            hidden = self._hidden(conn)  # held records of an unfinished append wait for it
            restamped = conn.execute(
                f"UPDATE records SET t = {placed}, state = {State.PENDING}, held_boot = NULL, held_mono = NULL "
                f"WHERE state = {State.HELD} AND held_boot = :boot AND {placed} BETWEEN :floor AND :slack{hidden}",
                params).rowcount
            refused = conn.execute(
                f"UPDATE records SET state = {State.DEAD}, done_at = :wall, reason = 're-stamped to t ' || {placed} || "
                f"', which is in the future or before the floor (' || :floor || '): the monotonic clock is not "
                f"to be trusted; its time is unknown', held_boot = NULL "
                f"WHERE state = {State.HELD} AND held_boot = :boot{hidden}",
                params).rowcount
            lost = conn.execute(
                f"UPDATE records SET state = {State.DEAD}, done_at = :wall, "
                f"reason = 'stamped while the clock was wrong, "
                f"in an earlier boot: its time is unknown', held_boot = NULL WHERE state = {State.HELD} "
                f"AND held_boot IS NOT :boot{hidden}", params).rowcount
            if restamped:
                self._add_count(conn, "restamped", restamped)
            if refused:
                self._add_count(conn, "restamp_refused", refused)
            return restamped, refused + lost

    # -- compaction --------------------------------------------------------------------------------

    def compact_counts(self, *, bucket: int, groups: int = 500) -> int:
        """Merge pending counters (not in flight) of the same key and stat within one `bucket` of seconds.

        Each group becomes one record holding the sum, at the bucket's start. Exact for counters at that
        resolution; values are never merged. Works `groups` groups per transaction; returns records saved.
        """
        saved, after = 0, ""
        while True:
            with self._write() as conn:
                # The sums are taken here, not with SQL's sum(), which raises on integer overflow; a group
                # whose sum would leave what validation accepts is merged only as far as it fits.
                rows = conn.execute(
                    f"SELECT stat, key, ukey, ezkey, bucket, json_group_array(json_array(id, number)), "
                    f"json_array(stat, key, ukey, ezkey, bucket) AS tag FROM (SELECT id, stat, key, ukey, ezkey, "
                    f"number, (t / ?) * ? AS bucket FROM records WHERE state = {State.PENDING} "
                    f"AND kind = {Kind.COUNT} AND t > 0{self._hidden(conn)} "
                    f"AND id NOT IN ({_LEASED}) ORDER BY id) GROUP BY stat, key, ukey, ezkey, bucket "
                    f"HAVING count(*) > 1 AND tag > ? ORDER BY tag LIMIT ?",
                    (bucket, bucket, after, groups)).fetchall()
                merged = 0
                for stat, key, ukey, ezkey, start, members, _ in rows:
                    for ids, total in _mergeable(_loads(members)):
                        conn.execute(f"DELETE FROM records WHERE id IN ({_IDS})", (_dumps(ids),))
                        conn.execute(_INSERT, (stat, key, ukey, ezkey, 0, total, start))
                        merged += len(ids) - 1
                if merged:
                    self._add_count(conn, "compacted", merged)
            saved += merged
            if len(rows) < groups:
                return saved
            after = rows[-1][6]

    # -- moving backlog ----------------------------------------------------------------------------

    # "all" leaves out HELD records: their time is not known yet, so no file can carry them (import refuses t=0).
    _SELECTIONS: ClassVar[dict[str, str]] = {"pending": f"state = {State.PENDING}", "sent": f"state = {State.SENT}",
                                              "dead": f"state = {State.DEAD}",
                                              "all": f"state IN ({State.PENDING}, {State.SENT}, {State.DEAD})"}

    def _selection(self, state: str, since: int | None, until: int | None,
                   stat_glob: str | None = None) -> tuple[str, list[Any]]:
        if state not in self._SELECTIONS:
            raise StoreError(f"state must be one of {', '.join(self._SELECTIONS)}, not '{state}'")
        where, params = [self._SELECTIONS[state]], list[Any]()
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
        with self._read():
            return self.conn.execute(f"SELECT count(*) FROM records WHERE {where}{self._hidden()}",
                                     params).fetchone()[0]

    def export(self, state: str, *, since: int | None = None, until: int | None = None,
               stat_glob: str | None = None) -> Iterator[tuple[int, Record]]:
        """Yield (id, record) of the selected records in append order, streaming (one read snapshot)."""
        where, params = self._selection(state, since, until, stat_glob)
        with self._read():
            for row in self.conn.execute(f"SELECT id, {_COLUMNS} FROM records WHERE {where}{self._hidden()} "
                                         "ORDER BY id", params):
                yield row[0], Record(*row[1:])

    def move_out(self, state: str, write: Callable[[list[Record]], None], *, since: int | None = None,
                 until: int | None = None, stat_glob: str | None = None, chunk: int = 10_000) -> int:
        """Hand the selected records to `write` a chunk at a time and delete each chunk once `write` returned.

        Each chunk is selected, written (the callback must make it durable: flush and fsync) and deleted in
        one transaction, so a record leaves the spool only after it is in the file, and no shipper can lease
        it meanwhile. Records in flight are skipped (they are being sent). A crash can leave at most the last
        chunk both in the file and in the spool; never in neither. Returns how many records moved.
        """
        where, params = self._selection(state, since, until, stat_glob)
        moved, after = 0, 0
        while True:
            with self._write() as conn:
                rows = conn.execute(f"SELECT id, {_COLUMNS} FROM records WHERE {where}{self._hidden(conn)} AND id > ? "
                                    f"AND id NOT IN ({_LEASED}) ORDER BY id LIMIT ?",
                                    [*params, after, chunk]).fetchall()
                if not rows:
                    return moved
                write([Record(*row[1:]) for row in rows])
                ids = [row[0] for row in rows]
                conn.execute(f"DELETE FROM records WHERE id IN ({_IDS})", (_dumps(ids),))
            moved += len(rows)
            after = ids[-1]

    def replay(self, *, since: int | None, until: int | None, stat_glob: str | None = None) -> int:
        """Queue pending copies of retained SENT records (StatHat will count them again); return how many."""
        where, params = self._selection("sent", since, until, stat_glob)
        with self._bounded() as conn:
            queued = conn.execute(f"INSERT INTO records ({_COLUMNS}) SELECT {_COLUMNS} FROM records WHERE {where} "
                                  "ORDER BY id", params).rowcount
            self._enforce(conn, queued)
            return queued

    # -- small persistent facts (last shipping attempt, ...) ----------------------------------------

    def set_meta(self, **values: Any) -> None:
        with self._write() as conn:
            self._set_meta(conn, values)

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
        conn.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                         [(name, _dumps(value)) for name, value in values.items()])

    def meta(self) -> dict[str, Any]:
        with self._read():
            return {name: _loads(value) for name, value in self.conn.execute("SELECT name, value FROM meta")}


class _Corrupt(Exception):
    pass




def _create_private_file(path: Path) -> None:
    """Create the spool file (and its directory) readable by its owner only, if it does not exist yet."""
    if path.exists():
        return
    blocker = next((folder for folder in reversed(path.parents) if folder.exists() and not folder.is_dir()), None)
    if blocker is not None:
        raise StoreError(f"cannot create spool {path}: {blocker} is a file, not a directory (check --db, SPOOL_DB "
                         "or spool.path)")
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        # A new name is durable once its directory is synced: the file's, then each directory made for it,
        # deepest first (SQLite syncs only the spool's own directory, and only when it makes the WAL).
        for folder in (path.parent, *(made_one.parent for made_one in made)):
            fsync_dir(folder)
    except OSError as exc:
        raise StoreError(f"cannot create spool {path}: {exc.strerror}") from None


def _insert(conn: sqlite3.Connection, rows: list[Sequence[Any]]) -> None:
    """Insert Record-shaped rows, binding only the text columns (stat, key, ukey, ezkey) some row fills.

    sqlite3 binds a None through its adapter lookup (a tuple built, a dict and two attributes looked up, per
    parameter): the three NULL key columns of an EZ record cost about as much as the rest of its insert. A text
    column that is NULL in every row is left out of the statement (it defaults to NULL) instead of bound.
    """
    n = len(rows)
    if operator.countOf(map(len, rows), 7) != n:  # a malformed row: executemany says what is wrong with it
        conn.executemany(_INSERT, rows)
        return
    kept = (*(i for i in range(4) if operator.countOf(map(operator.itemgetter(i), rows), None) != n), 4, 5, 6)
    if len(kept) == 7:
        conn.executemany(_INSERT, rows)
    else:
        conn.executemany(_insert_statement(kept), map(operator.itemgetter(*kept), rows))


@functools.cache
def _insert_statement(kept: tuple[int, ...]) -> str:
    return (f"INSERT INTO records ({', '.join(_NAMES[i] for i in kept)}) "
            f"VALUES ({', '.join('?' * len(kept))})")


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


def _mergeable(members: list[list[Any]]) -> Iterator[tuple[list[int], int | float]]:
    """Split one compaction group's (id, number) pairs into runs whose sum validation would still accept."""
    ids: list[int] = []
    total: int | float = 0
    for record_id, number in members:
        candidate = total + number
        fits = abs(candidate) <= INT64_MAX if isinstance(candidate, int) else math.isfinite(candidate)
        if ids and not fits:
            if len(ids) > 1:
                yield ids, total
            ids, total = [], 0
        ids.append(record_id)
        total = total + number
    if len(ids) > 1:
        yield ids, total


# SQLite's primary result codes that need their own message (sqlite3.h).
_PERM, _BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 3, 5, 6, 8, 10, 11, 13, 14, 26
_CODES_BY_TEXT = (("database or disk is full", _FULL), ("locked", _BUSY), ("readonly", _READONLY),
                  ("unable to open", _CANTOPEN), ("disk I/O error", _IOERR), ("not a database", _NOTADB),
                  ("malformed", _CORRUPT))


def _code(exc: sqlite3.Error) -> int | None:
    """Return SQLite's primary result code of an error (Python 3.11+ carries it; 3.10: read from the text)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF
    text = str(exc)
    return next((code for words, code in _CODES_BY_TEXT if words in text), None)


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parents):
        with contextlib.suppress(OSError):
            import shutil  # here, not at the top: it drags in bz2, lzma and zlib, a tenth of `spool add`'s imports

            return shutil.disk_usage(folder).free
    return None


@contextlib.contextmanager
def _translated(path: Path, busy_timeout: float) -> Iterator[None]:
    """Turn SQLite's exceptions into StoreError with a message an operator can act on, by result code."""
    try:
        yield
    except sqlite3.Error as exc:
        if _code(exc) in (_CORRUPT, _NOTADB):
            raise _corrupt(path, str(exc)) from None
        raise StoreError(_explain(exc, path, busy_timeout)) from None


def _corrupt(path: Path, detail: str) -> SpoolCorrupt:
    """The error for a damaged spool file: what SQLite found, and what to do (the file is never repaired in place)."""
    return SpoolCorrupt(f"spool {path} is not a usable spool database ({detail}): (re)start `spool run`, which moves "
                        f"it aside as {path.name}.corrupt-<time> and starts a fresh spool, or move {path.name} and its "
                        "-wal and -shm files aside yourself")


def _explain(exc: sqlite3.Error, path: Path, busy_timeout: float) -> str:
    code = _code(exc)
    user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "this user"
    if code == _FULL or (code == _IOERR and _free_bytes(path) == 0):
        return f"spool full: {path}: the disk has no space left; free some (appends and shipping resume by themselves)"
    if code in (_BUSY, _LOCKED):
        return f"spool {path} stayed locked by another process for {busy_timeout:g} s; try again"
    if code == _READONLY:
        return (f"cannot write spool {path}: it or its directory is read-only for {user} "
                "(check the owner and mode, or a read-only mount)")
    if code in (_CANTOPEN, _PERM):
        return (f"cannot open spool {path}: its directory must exist and be writable by {user} "
                "(SQLite creates PATH-wal and PATH-shm beside it)")
    if code == _IOERR:
        return f"disk I/O error on spool {path}: the disk may be failing or have been removed"
    return f"spool {path}: {exc}"
