"""Opening a spool file: creating it private, the pragmas, the bookkeeping check, quarantining a corrupt spool;
and closing it. Also what the agent keeps about the file's soundness: its clean-stop mark, and the verdict of
the last full integrity check (see spool.checkup)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spool.clock import boot_clock, boot_id, utc_text
from spool.durable import fsync_dir
from spool.errors import SpoolMissing, StoreError
from spool.owners import Owners
from spool.sharing import open_new
from spool.store.core import (
    _BUSY,
    _CORRUPT,
    _LOCKED,
    _NOTADB,
    BUSY_TIMEOUT,
    WAL_LIMIT,
    _code,
    _Corrupt,
    _corrupt,
    _loads,
    _log,
    _translated,
)
from spool.store.schema import Schema

if TYPE_CHECKING:
    from spool.config import SpoolSettings

PAGE_SIZE = 1024  # bytes, for new spools (see _prepare)
_INTERRUPT = 9  # SQLITE_INTERRUPT: a full check stopped by its `step`
CHECK_STEP_OPS = 1000  # SQLite operations between two calls of a full check's `step` (a few hundred records)
CLEAN_STOP = "clean_stop"  # meta: when the agent last stopped cleanly (absent while one runs, or after a crash)
INTEGRITY = "integrity"  # meta: the last full check: {"state": owed|checking|sound|damaged, "at": ..., ...}


class Opening(Schema):
    """Opening and closing the spool file."""

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
        self._losses = None
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
            from spool.lock import ShipLock

            shipper = ShipLock(self.path).holder()
            if shipper is not None:  # never moved from under a running agent: it is set aside when that one stops
                raise _corrupt(self.path, f"{corrupt}; not moved aside while a shipper (pid {shipper}) runs on it"
                               ) from None
            moved = self._quarantine()
            _log().error("spool %s was corrupt (%s); moved it to %s and started a fresh spool",
                      self.path, corrupt, moved.name)
            self._open(synchronous, check=False)
            self.add_counts(corrupt_quarantined=1)

    def _open(self, synchronous: str, *, check: bool) -> None:
        self._series, self._fresh_series, self._series_epoch = {}, [], None  # a file of its own: its own series
        self._guard, self._unsettled, self._wal_looked_at = None, (0, 0), float("-inf")
        _create_private_file(self.path)
        with _translated(self.path, self.busy_timeout):
            self.conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                        check_same_thread=False)
            opened = os.stat(self.path)
            self._file = (os.path.abspath(self.path), (opened.st_dev, opened.st_ino))
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
            self._close_connections()
            if _code(exc) in (_CORRUPT, _NOTADB):
                raise _Corrupt(str(exc)) from None
            with _translated(self.path, self.busy_timeout):
                raise
        except BaseException:
            self._close_connections()
            raise

    def _prepare(self, synchronous: str, *, check: bool) -> None:
        # A new spool gets 1 KiB pages (an existing one keeps its own: WAL mode cannot change it). A commit
        # writes each page it touches whole into the WAL, and one record per commit (`spool add`, the relay
        # under light load) touches two: 4 KiB pages made that 12.8 kB written per record, 1 KiB pages 6.9 kB;
        # 500-record batches went from 535 to 423 B per record over its life (docs/benchmarks.md).
        self.conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        # A new spool can give pages back to the file system once a backlog has drained (`release_space`, a
        # bounded step per housekeeping tick); an existing one keeps its mode and reuses its free pages
        # (switching needs a VACUUM, a rewrite of the whole file: see docs/design.md, "Space"). Asked of an
        # existing file the pragma is a write transaction, so it is asked of a new one only.
        if self.conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.conn.execute("PRAGMA journal_mode=WAL")  # a file that is not a database fails here (SQLITE_NOTADB)
        # Checkpoints only while the write lock is held, never SQLite's automatic ones (Core.checkpoint: the
        # WAL-reset bug of SQLite before 3.51.3).
        self.conn.execute("PRAGMA wal_autocheckpoint=0")
        # Once a long reader (an export) has let the WAL grow, the next restart of the log cuts it back to this.
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
        # Every page a statement reads is checked more closely, so damage on the path of an append is reported
        # (SQLITE_CORRUPT) before the append writes beside it, at no cost worth measuring.
        self.conn.execute("PRAGMA cell_size_check=ON")
        # A join of a few runs of ids to the records must walk the primary key by range. Left to itself, SQLite may
        # build an automatic index over every record for it instead (a full read of the backlog, per statement).
        self.conn.execute("PRAGMA automatic_index=OFF")
        self._check_bookkeeping()
        if check:  # the agent's open: also the paths every append, lease and ack walks (never the whole file)
            self._check_paths()
        self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._full = synchronous == "full"  # the configured durability (a lease commits without waiting: _write)
        self._migrate()
        if check:
            verdict = self.integrity()
            if verdict.get("state") == "damaged":  # found by a full check since; set aside now, at a start
                raise _Corrupt(f"a full integrity check found damage on "
                               f"{utc_text(verdict.get('at', 0))}: "
                               f"{verdict.get('detail')}")

    def _check_bookkeeping(self) -> None:
        """Check every table but the records (the schema, counters, leases, stages, file marks): cheap, and the same
        cost whatever the backlog.

        These small tables are written by every lease, acknowledgement and bound, so they are where a power cut or a
        failing card most likely leaves damage, and `spool run` moves a spool aside for damage anywhere: a producer
        must not append (and exit 0) to a file the agent will set aside. The records table and the queue, with tens
        of millions of rows, are not walked at each open: an append's statements read their pages on their path, and
        SQLite reports damage there (SQLITE_CORRUPT) before anything is written.
        """
        if sqlite3.sqlite_version_info < (3, 33, 0):  # quick_check(TABLE) came with 3.33; before, it checks it all
            return
        tables = [row[0] for row in self.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT IN ('records', 'queue')")]
        for table in ("sqlite_master", *tables):
            verdict = self.conn.execute(f'PRAGMA quick_check("{table}")').fetchone()[0]
            if verdict != "ok":
                raise _Corrupt(f"its table {table} failed SQLite's quick check")

    def _check_paths(self) -> None:
        """Read the first and the last entry of the records table and of each of its indexes.

        That is the root and the two edges of each b-tree, a few pages whatever the backlog: appends go to the
        end of the table, leases start at the oldest pending entry, and a damaged root stops everything. Damage
        elsewhere among the records is left to the full check, which the agent runs in the background.
        """
        probes = ["SELECT id FROM records ORDER BY id LIMIT 1", "SELECT id FROM records ORDER BY id DESC LIMIT 1"]
        if self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'queue'").fetchone() is not None:
            probes += ["SELECT t, id FROM queue ORDER BY t, id LIMIT 1",
                       "SELECT t, id FROM queue ORDER BY t DESC, id DESC LIMIT 1"]
        for name, sql in self.conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records' AND sql NOT NULL"):
            first = self.conn.execute(f'PRAGMA index_info("{name}")').fetchone()
            if first is None or first[2] is None:  # an index on an expression: no column to order by
                continue
            where = sql.upper().rfind(" WHERE ")
            partial = f" WHERE {sql[where + 7:]}" if where >= 0 else ""
            probes += [f'SELECT 1 FROM records INDEXED BY "{name}"{partial} ORDER BY "{first[2]}"{way} LIMIT 1'
                       for way in ("", " DESC")]
        for probe in probes:
            try:
                self.conn.execute(probe).fetchall()
            except sqlite3.OperationalError as exc:
                if _code(exc) in (_CORRUPT, _NOTADB):
                    raise
                _log().debug("path check skipped (%s): %s", exc, probe)  # an index the planner cannot walk so

    # -- the agent's marks: a clean stop, and the last full check ---------------------------------------------

    def full_check(self, step: Callable[[], bool] | None = None) -> list[str] | None:
        """Run SQLite's full integrity check on this connection; return what it found ([] when sound).

        It reads every page of the file, one read transaction, and stops at the first finding: a damaged file
        is damaged, and the first place says where. `step` is called every CHECK_STEP_OPS of SQLite's operations
        of it (SQLite 3.43 and later also while it walks the pages; earlier, while it checks rows and indexes);
        returning True stops the check, and None is returned. Damage SQLite reports as an error instead of a
        finding (a row it cannot read) is returned as the finding.
        """
        if step is not None:
            self.conn.set_progress_handler(step, CHECK_STEP_OPS)
        try:
            # One finding at most: with more, the check goes on past the first into rows it may fail to read, and
            # Python's sqlite3 (before 3.12) loses a row already found when the next step fails.
            [(verdict,)] = self.conn.execute("PRAGMA integrity_check(1)").fetchall()
            return [] if verdict == "ok" else ["; ".join(line for line in verdict.splitlines()
                                                         if not line.startswith("*** in database"))]
        except sqlite3.DatabaseError as exc:
            if _code(exc) in (_CORRUPT, _NOTADB):
                return [str(exc)]
            if _code(exc) == _INTERRUPT or "interrupted" in str(exc):
                return None
            with _translated(self.path, self.busy_timeout):
                raise
        finally:
            if step is not None:
                self.conn.set_progress_handler(None, 0)

    def take_clean_stop(self) -> float | None:
        """Remove the clean-stop mark and return when it was set (None: the last agent did not stop cleanly).

        Called by the agent holding the ship lock as it starts. The removal waits for the disk whatever
        spool.synchronous says: a mark that came back after a power cut would hide that cut from the next start.
        """
        self.conn.execute("PRAGMA synchronous=FULL")
        try:
            with self._write() as conn:
                row = conn.execute("SELECT value FROM meta WHERE name = ?", (CLEAN_STOP,)).fetchone()
                conn.execute("DELETE FROM meta WHERE name = ?", (CLEAN_STOP,))
        finally:
            self.conn.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
        return None if row is None else float(_loads(row[0]))

    def mark_clean_stop(self, at: float) -> None:
        """Record that the agent holding the ship lock stopped cleanly, with nothing left to check."""
        self.set_meta(**{CLEAN_STOP: at})

    def integrity(self) -> dict[str, Any]:
        """Return the verdict of the last full check ({} when none was ever run or owed)."""
        with self._read():
            row = self.conn.execute("SELECT value FROM meta WHERE name = ?", (INTEGRITY,)).fetchone()
        return {} if row is None else dict(_loads(row[0]))

    def record_integrity(self, state: str, at: float, **details: Any) -> None:
        """Record the full check's state: owed, checking, sound or damaged (the next agent start sets it aside)."""
        self.set_meta(**{INTEGRITY: {"state": state, "at": at, **details}})

    def _quarantine(self) -> Path:
        stamp = utc_text(time.time(), "%Y%m%dT%H%M%S")
        moved = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{moved}{suffix}")
        fsync_dir(self.path.parent)  # the renames are durable before a fresh spool takes the name
        return moved

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            self._close_connections()
        finally:
            self.owners.release()  # what this Store still owns is a dead owner's now

    def _close_connections(self) -> None:
        guard, self._guard = self._guard, None
        try:
            if guard is not None:
                guard.close()
        finally:
            self.conn.close()  # the last connection to the file checkpoints as it closes, holding it alone


def _create_private_file(path: Path) -> None:
    """Create the spool file (and its directory) readable by its owner only (and its group, in a shared directory:
    spool.sharing), if it does not exist yet."""
    if path.exists():
        return
    blocker = next((folder for folder in reversed(path.parents) if folder.exists() and not folder.is_dir()), None)
    if blocker is not None:
        raise StoreError(f"cannot create spool {path}: {blocker} is a file, not a directory (check --db, SPOOL_DB "
                         "or spool.path)")
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(open_new(path, os.O_WRONLY))  # 0600, or 0660 in a shared directory (spool.sharing)
        # A new name is durable once its directory is synced: the file's, then each directory made for it,
        # deepest first (SQLite syncs only the spool's own directory, and only when it makes the WAL).
        for folder in (path.parent, *(made_one.parent for made_one in made)):
            fsync_dir(folder)
    except OSError as exc:
        raise StoreError(f"cannot create spool {path}: {exc.strerror}") from None
