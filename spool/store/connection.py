"""Opening a spool file: creating it private, the pragmas, the bookkeeping check, quarantining a corrupt spool;
and closing it."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from spool.clock import boot_clock, boot_id
from spool.durable import fsync_dir
from spool.errors import SpoolMissing, StoreError
from spool.owners import Owners
from spool.store.core import (
    _BUSY,
    _CORRUPT,
    _LOCKED,
    _NOTADB,
    BUSY_TIMEOUT,
    _code,
    _Corrupt,
    _corrupt,
    _log,
    _translated,
)
from spool.store.schema import Schema

if TYPE_CHECKING:
    from spool.config import SpoolSettings

PAGE_SIZE = 1024  # bytes, for new spools (see _prepare)
WAL_LIMIT = 16 << 20  # bytes the write-ahead log is cut back to when it restarts (journal_size_limit)


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
        # A new spool can give pages back to the file system once a backlog has drained (`release_space`, a
        # bounded step per housekeeping tick); an existing one keeps its mode and reuses its free pages
        # (switching needs a VACUUM, a rewrite of the whole file: see docs/design.md, "Space"). Asked of an
        # existing file the pragma is a write transaction, so it is asked of a new one only.
        if self.conn.execute("PRAGMA page_count").fetchone()[0] == 0:
            self.conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        self.conn.execute("PRAGMA journal_mode=WAL")  # a file that is not a database fails here (SQLITE_NOTADB)
        # Once a long reader (an export) has let the WAL grow, the next restart of the log cuts it back to this.
        self.conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
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
