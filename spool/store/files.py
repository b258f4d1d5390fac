"""The marks of dropped files: what the spool knows of each file it took records from, committed with them."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from typing import NamedTuple

from spool.store.core import Core


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


class FileMarks(Core):
    """Reading, moving and forgetting the marks of dropped files (`Appends` commits them with their records)."""

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

    def copy_file_mark(self, old: bytes, new: bytes) -> None:
        """Give the file at `old` a second mark under `new` (the name it is about to be moved to)."""
        with self._write() as conn:
            conn.execute("DELETE FROM files WHERE path = ?", (new,))
            conn.execute("INSERT INTO files (path, dev, ino, offset, mtime_ns, tail, records, at) "
                         "SELECT ?, dev, ino, offset, mtime_ns, tail, records, at FROM files WHERE path = ?",
                         (new, old))

    def file_marks_of_inode(self, ino: int, folder: bytes) -> list[FileMark]:
        """The marks of files directly in `folder` (ending in /) that had inode number `ino` when read."""
        rows = self.conn.execute("SELECT path, dev, ino, offset, mtime_ns, tail, records FROM files "
                                 "WHERE ino = ? AND substr(path, 1, ?) = ?", (ino, len(folder), folder))
        return [FileMark(*row) for row in rows if b"/" not in row[0][len(folder):]]

    def move_file_mark(self, old: bytes, new: bytes) -> None:
        """Let a file's mark follow it to a new name."""
        with self._write() as conn:
            conn.execute("DELETE FROM files WHERE path = ?", (new,))
            conn.execute("UPDATE files SET path = ? WHERE path = ?", (new, old))
