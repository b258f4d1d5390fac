"""What every room of the store shares: record states, the SQL vocabulary, transactions, the condition that hides
open stages, counters and meta, and SQLite's errors translated into messages an operator can act on."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spool.errors import SpoolCorrupt, SpoolUnusable, StoreError

if TYPE_CHECKING:
    import logging

    from spool.config import SpoolSettings
    from spool.health import LossLog
    from spool.owners import Owners
    from spool.store.files import FileMark


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
    """A record's stored state. Since version 10, PENDING is "live": pending, in flight or sent, as the ledger
    says (the queue's runs, leases and suspect groups hold the pending ones; every other live record is sent).
    (1 was never used.)"""

    PENDING = 0
    SENT = 2  # versions 1 to 9 only: version 10 keeps sent records LIVE, out of the queue, in runs of `settled`
    DEAD = 3
    HELD = 4  # stamped while the clock was wrong: waits for its real t
    STAGED = 5  # version 5 only: part of a large append not yet whole (version 6 hides those by their ids)


BUSY_TIMEOUT = 30.0  # seconds a writer waits for another writer before "database is locked"
# A connection checkpoints after this many of its commits, or once they changed this many rows, whichever comes
# first: about SQLite's own cadence (1,000 WAL pages: an append commits five or six), which spool turns off
# (see Core.checkpoint).
CHECKPOINT_COMMITS = 128
CHECKPOINT_ROWS = 20_000
CHECKPOINT_WAIT = 0.05  # seconds a checkpoint after a commit waits for the write lock, else it is left to a later one
# Bytes the write-ahead log is cut back to when it restarts (journal_size_limit), and past which any connection's
# commit checkpoints (looked at once a second at most): several checkpoint intervals, so only abnormal growth
# (a long reader; commits of processes too short-lived to reach a cadence of their own) is cut or checkpointed.
WAL_LIMIT = 4 << 20
WAL_LOOK_EVERY = 1.0  # seconds
BEGIN_POLL_MS = 2  # SQLite's busy handler waits this long for the write lock (its tries at 0, 1, 2 ms) ...
BEGIN_POLL_SLEEP = 0.0005  # ... then a writer sleeps this long before it asks again

_COLUMNS = "stat, key, ukey, ezkey, kind, number, t"  # a Record's fields, as the view `record_view` names them
# A record's fields, from `records r` joined to its series `s` (the join is by the series' primary key).
_FIELDS = "s.stat, s.key, s.ukey, s.ezkey, s.kind, r.number, r.t"
_SERIES = "CROSS JOIN series s ON s.id = r.series"
_IDS = "SELECT value FROM json_each(?)"  # a JSON array of ids bound as one parameter
TALLIED = ("pending", "held", "sent", "dead", "staged")  # the kept counts: the columns of `tally` (schema 9)
SERIES_EPOCH = "series_epoch"  # meta: changes whenever a series is forgotten (writers' memory of series is stale)


def sqlite_library() -> str:
    """Say which SQLite this Python uses, and whether it has the WAL-reset bug (see Core.checkpoint)."""
    fixed = wal_reset_fixed(sqlite3.sqlite_version_info)
    bug = "" if fixed else " (it has the WAL-reset bug; spool's checkpoints avoid it)"
    return f"SQLite {sqlite3.sqlite_version}{bug}"


def wal_reset_fixed(version: tuple[int, ...]) -> bool:
    """Whether this SQLite version has the fix of the WAL-reset bug: 3.51.3, and the backports 3.50.7 and 3.44.6."""
    return version >= (3, 51, 3) or (3, 50, 7) <= version < (3, 51) or (3, 44, 6) <= version < (3, 45)


class Core:
    """The state every room of `Store` works on (set when it is opened: see connection.Opening), and the helpers
    they all use."""

    path: Path
    synchronous: str
    busy_timeout: float
    owners: Owners
    limits: SpoolSettings | None
    max_age: float | None
    conn: sqlite3.Connection
    _full: bool
    _losses: LossLog | None  # records dropped at a bound, said at most once a minute (made when first needed)
    _series: dict[tuple[Any, ...], int]  # (stat, key, ukey, ezkey, kind) -> series id, of committed series
    _fresh_series: list[tuple[Any, ...]]  # series the open transaction made (forgotten if it rolls back)
    _series_epoch: Any  # meta's series_epoch when `_series` was last known good
    _guard: sqlite3.Connection | None  # holds the write lock while `conn` checkpoints (opened on first use)
    _file: tuple[str, tuple[int, int]]  # the file `conn` opened: its absolute path then, and (device, inode)
    _unsettled: tuple[int, int]  # commits since the last checkpoint try, and conn.total_changes at it
    _wal_looked_at: float  # when a commit last looked at the WAL's size (time.monotonic)

    if TYPE_CHECKING:  # provided by other rooms (appends, files); declared so each room type-checks on its own
        def _bounded(self) -> contextlib.AbstractContextManager[sqlite3.Connection]: ...

        def _enforce(self, conn: sqlite3.Connection, incoming: int, *, held: int = 0, since: int = 0) -> None: ...

        def _mark_file(self, conn: sqlite3.Connection, mark: FileMark) -> None: ...

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
                self._begin_immediate()
                try:
                    yield self.conn
                    self.conn.execute("COMMIT")
                except BaseException:
                    if self.conn.in_transaction:
                        self.conn.execute("ROLLBACK")
                    for fresh in self._fresh_series:  # series this transaction made are not there
                        self._series.pop(fresh, None)
                    raise
                finally:
                    self._fresh_series.clear()
            finally:
                if relaxed:  # every other write, appends included, waits for the disk as configured
                    self.conn.execute("PRAGMA synchronous=FULL")
        self._after_commit()  # committed: nothing after this may fail or undo the write

    def _begin_immediate(self, conn: sqlite3.Connection | None = None, wait: float | None = None) -> None:
        """Take the write lock, asking for it again every millisecond or so until busy_timeout has passed.

        SQLite's own busy handler sleeps ever longer between tries (25, 50, then 100 ms): against a shipper that
        commits hundreds of short transactions a second, a producer's append lost the race for the lock again
        and again, and waited up to a second (measured during a 5M-record drain). Short polls wait only about
        as long as the lock is held.
        """
        conn = conn or self.conn
        deadline = time.monotonic() + (self.busy_timeout if wait is None else wait)
        conn.execute(f"PRAGMA busy_timeout = {BEGIN_POLL_MS}")
        try:
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if _code(exc) not in (_BUSY, _LOCKED) or time.monotonic() >= deadline:
                        raise
                    time.sleep(BEGIN_POLL_SLEEP)
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")

    # -- checkpoints ---------------------------------------------------------------------------------------------

    def checkpoint(self, *, wait: float = CHECKPOINT_WAIT) -> tuple[int, int] | None:
        """Copy the WAL's frames into the database file while the write lock is held; return (frames in the WAL,
        frames copied), or None when the write lock was not had within `wait` seconds (nothing was done).

        SQLite from 3.7.0 to 3.51.2 (Ubuntu 22.04 has 3.37.2; fixed in 3.51.3, 3.50.7 and 3.44.6) can corrupt a
        WAL database, or lose committed transactions, when a checkpoint that does not hold the write lock starts
        while another connection's commit restarts the WAL (https://sqlite.org/wal.html#walresetbug). SQLite's
        automatic checkpoints are such checkpoints, run by whichever connection's commit filled the WAL. So every
        spool connection has them off (connection.Opening), and spool checkpoints only here: a second connection
        of this Store takes the write lock, this one copies the frames (PASSIVE: readers are not waited for), and
        the lock is let go. No commit can restart the WAL meanwhile. Readers are never blocked; every writer waits
        as long as the copy takes (65 MiB of WAL took 0.07 s on this machine's disk; an SD card is slower).
        """
        if self.conn.in_transaction:
            return None
        guard = self._guard
        if guard is None:
            guard = self._open_guard()
            if guard is None:
                return None
        try:
            self._begin_immediate(guard, wait)
        except sqlite3.OperationalError as exc:
            if _code(exc) in (_BUSY, _LOCKED):
                return None
            raise
        try:
            _busy, frames, copied = self._copy_wal()
        finally:
            guard.execute("ROLLBACK")
        return frames, copied

    def _open_guard(self) -> sqlite3.Connection | None:
        """Open the connection that holds the write lock while `conn` checkpoints, on the file `conn` has open: the
        path as it was resolved when `conn` opened it, never creating a file, and only while that path still names
        the same file (a spool moved aside under an open Store has a new file at its path). None: not that file."""
        from urllib.parse import quote

        where, identity = self._file
        try:
            now = os.stat(where)
        except OSError:
            return None
        if (now.st_dev, now.st_ino) != identity:
            _log().debug("no checkpoint: %s is no longer the file this Store opened", where)
            return None
        guard = sqlite3.connect(f"file:{quote(where)}?mode=rw", uri=True, timeout=self.busy_timeout,
                                isolation_level=None, check_same_thread=False)
        guard.execute("PRAGMA wal_autocheckpoint = 0")
        self._guard = guard
        return guard

    def _wal_outgrown(self) -> bool:
        now = time.monotonic()
        if now - self._wal_looked_at < WAL_LOOK_EVERY:
            return False
        self._wal_looked_at = now
        try:
            return os.stat(f"{self._file[0]}-wal").st_size > WAL_LIMIT
        except OSError:
            return False

    def _copy_wal(self) -> tuple[int, int, int]:
        """Run the checkpoint itself (the write lock is held by the guard): (busy, frames in the WAL, copied)."""
        return self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _after_commit(self) -> None:
        """Checkpoint every CHECKPOINT_COMMITS commits of this connection, or CHECKPOINT_ROWS rows changed, or when
        the WAL has grown past WAL_LIMIT: many processes that commit a few times each (`spool add` from cron) reach
        no cadence of their own, and while another connection stays open none of them is the last to close."""
        commits, rows = self._unsettled
        if (commits + 1 < CHECKPOINT_COMMITS and self.conn.total_changes - rows < CHECKPOINT_ROWS
                and not self._wal_outgrown()):
            self._unsettled = (commits + 1, rows)
            return
        self._unsettled = (0, self.conn.total_changes)  # tried once per cadence, done or not
        try:  # the commit is done: nothing here may fail it
            self.checkpoint()
        except sqlite3.Error as exc:
            _log().debug("checkpoint after a commit left to a later one: %s", exc)

    def _hidden(self, conn: sqlite3.Connection | None = None, column: str = "id") -> str:
        """Return the condition leaving out the records of open stages (" AND NOT (id BETWEEN lo AND hi)" per
        span, on `column`; "" when no append is open). Read it in the transaction of the statement it goes into."""
        return _outside((conn or self.conn).execute("SELECT lo, hi FROM stage_spans").fetchall(), column)

    @staticmethod
    def _in_flight(conn: sqlite3.Connection, column: str = "id") -> str:
        """Return the condition leaving out the records live leases hold (few runs: max_in_flight batches)."""
        return _outside(conn.execute("SELECT lo, hi FROM lease_runs").fetchall(), column)

    @staticmethod
    def _tally(conn: sqlite3.Connection, **changes: int) -> None:
        """Add to the kept counts of records per state (pending=-n, sent=n, ...), in the caller's transaction: the
        one whose statements changed those records, by the rows they changed. A change of 0 writes nothing."""
        changed = {name: n for name, n in changes.items() if n}
        if changed:
            conn.execute(_tally_statement(tuple(changed)), tuple(changed.values()))

    @staticmethod
    def _kept(conn: sqlite3.Connection, name: str) -> int:
        """Return one kept count, as the caller's transaction sees it."""
        return conn.execute(f"SELECT {name} FROM tally").fetchone()[0]

    def tally(self) -> dict[str, int]:
        """Return the kept counts of records per state (pending includes those in flight; staged: records of
        appends not yet published), read at once: no record is read."""
        with self._read():
            return dict(zip(TALLIED, self.conn.execute(f"SELECT {', '.join(TALLIED)} FROM tally").fetchone(),
                            strict=True))

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


def _delete_records(conn: sqlite3.Connection, where: str, params: Any = (), *, each: Any = None) -> int:
    """Delete the records `where` selects (a condition on `records`, with `params`, or once per item of `each`);
    return how many.

    Each series keeps how many records carry it (`refs`): one none is left of is forgotten, so a spool of ever new
    stat names does not keep every name it ever saw. Writers remember series by id: forgetting one changes
    `series_epoch` in meta, and a writer whose memory is older starts afresh (see Appends._series_id).
    """
    import collections

    gone: collections.Counter[int] = collections.Counter()
    for one in ([params] if each is None else each):
        gone.update(series for (series,) in conn.execute(f"DELETE FROM records WHERE {where} RETURNING series", one))
    if gone:
        conn.executemany("UPDATE series SET refs = refs - ? WHERE id = ?", [(n, s) for s, n in gone.items()])
        if conn.execute(f"DELETE FROM series WHERE refs <= 0 AND id IN ({_IDS})", (_dumps(list(gone)),)).rowcount:
            conn.execute(f"INSERT INTO meta (name, value) VALUES ('{SERIES_EPOCH}', 1) ON CONFLICT (name) "
                         "DO UPDATE SET value = CAST(value AS INTEGER) + 1")
    return sum(gone.values())


def _outside(spans: list[tuple[int, int]], column: str) -> str:
    return "".join(f" AND NOT ({column} BETWEEN {int(lo)} AND {int(hi)})" for lo, hi in spans)


@functools.cache
def _tally_statement(names: tuple[str, ...]) -> str:
    return f"UPDATE tally SET {', '.join(f'{name} = {name} + ?' for name in names)}"


class _Corrupt(Exception):
    pass


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
        if _code(exc) in (_READONLY, _CANTOPEN, _PERM):
            raise SpoolUnusable(_explain(exc, path, busy_timeout)) from None
        raise StoreError(_explain(exc, path, busy_timeout)) from None


def _corrupt(path: Path, detail: str) -> SpoolCorrupt:
    """The error for a damaged spool file: what SQLite found, and what to do (the file is never repaired in place)."""
    return SpoolCorrupt(f"spool {path} is not a usable spool database ({detail}): (re)start `spool run`, which moves "
                        f"it aside as {path.name}.corrupt-<time> and starts a fresh spool (damage deep among the "
                        f"records: once `spool doctor --deep` found it), or move {path.name} and its -wal and -shm "
                        "files aside yourself")


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
