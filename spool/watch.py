"""Drop directories: files written into a watched directory are taken into the spool exactly once.

A file is known by its identity, never its content: its path, device and inode, and how far it was read
(the offset, the mtime then, and a hash of the bytes just before the offset). The identity is committed in
the same transaction as the records read; only after that commit is the file moved to DIR/.done/ (or
deleted), and only if the file at the path is still the one read, unchanged. So:

* a crash at any instant leaves the file either taken once (and moved on the next start, since its identity
  is known) or not at all and still in place;
* a file replaced under the same name is a new file, read whole; two files with the same bytes are two;
* a file that grew after it was read (a producer appending) has only its new part taken later;
* a file found to be another one at the moment of the move (a producer renamed a new file over it) is put
  back unread, never moved or deleted;
* a file moved to .done/ stays watched there for `linger` seconds after its last change, its mark kept: what a
  producer that opened it before the move writes afterwards is taken too (and after a crash, on restart);
* a last line without its newline is a line still being written: it waits for its newline, or for the file to
  stay unchanged `partial_wait` seconds, and only then is it judged.

Files with invalid records go to DIR/.rejected/ with a NAME.error.txt report beside them.

The boundary is hostile: producers own the directory too. spool never follows a link it did not make (the
files, .done/ and .rejected/ are opened without following links and used through their descriptors), never
writes through a name a producer could have placed (reports are created new, never truncated), and takes one
directory with one process at a time (an flock on the directory).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import hashlib
import heapq
import io
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from spool.config import WatchSettings
from spool.durable import fsync_dir
from spool.errors import InvalidRecord, StoreError, printable
from spool.formats import SUFFIXES, reader_for, to_records
from spool.records import T_FLOOR, Record, stamp
from spool.store import FileMark, Store

log = logging.getLogger("spool.watch")

DONE, REJECTED = ".done", ".rejected"
IGNORED_SUFFIXES = (".tmp", ".part", ".swp", "~")
APPENDABLE = (".jsonl", ".ndjson", ".csv")  # line formats: what was appended can be read from the old end
TAIL = 1 << 16  # bytes before the offset whose hash tells an appended file from one rewritten in place
MAX_REPORTED = 1000  # error lines written to NAME.error.txt
INTERRUPT_EVERY = 10_000  # records between checks for shutdown while ingesting a large file
RECENT = 1000  # results a long-running watcher keeps (totals are counted, not kept)
MAX_BACKOFF = 300.0  # seconds between tries at most, for a file that cannot be moved


class IngestResult(NamedTuple):
    path: Path
    # "ingested", "partial" (complete lines taken, the last one still being written), "already", "rejected",
    # "failed", "vanished", "interrupted", "changing"
    outcome: str
    records: int = 0
    errors: tuple[InvalidRecord, ...] = ()
    moved_to: Path | None = None
    offset: int = 0  # the byte the records taken start at (an appended file: where the last read ended)
    unmoved: str | None = None  # why the file could not be moved away (it stays, taken; retried later)

    def describe(self) -> str:
        """One log line saying what happened to the file (its name escaped: names can hold anything)."""
        name = printable(self.path.name)
        if self.outcome == "ingested":
            skipped = f", skipped {len(self.errors)} invalid" if self.errors else ""
            appended = f" (appended after byte {self.offset})" if self.offset else ""
            return f"ingested {self.records} records from {name}{appended}{skipped}"
        if self.outcome == "already":
            return f"{name} was taken before (same file, unchanged); moved without reading it again"
        if self.outcome in ("rejected", "failed"):
            first = self.errors[0] if self.errors else "rejected"
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            return f"rejected {name}: {first}{more}"
        if self.outcome == "changing":
            return f"{name} changed while it was read; nothing taken, it is read again once it settles"
        if self.outcome == "partial":
            return (f"took {self.records} records from {name}; its last line has no newline yet and waits for it"
                    if self.records else f"{name}: its only line has no newline yet; waiting for it")
        return f"{name}: {self.outcome}"

    def describe_unmoved(self, retry: str) -> str:
        """The one loud line for a file spool could not move away: what was taken, why, and what happens next."""
        name = printable(self.path.name)
        folder = REJECTED if self.outcome in ("rejected", "failed") else DONE
        kept = "nothing taken from it" if folder == REJECTED else "its records are taken (never twice)"
        return (f"cannot move {name} into {folder}/: {self.unmoved}; {kept}, it stays where it is and is "
                f"retried {retry}")


class _RejectFile(Exception):
    pass


class _Interrupted(Exception):
    pass


class _Changed(Exception):
    pass


class Unmovable(Exception):
    """A file cannot be moved into .done/ or .rejected/ (the folder is a link, not a folder, not writable)."""


class _Slice(io.RawIOBase):
    """The bytes [start, end) of an open file (after `prefix`), read with pread: what is read is what was seen."""

    def __init__(self, fd: int, start: int, end: int, prefix: bytes = b""):
        self._fd, self._pos, self._end, self._prefix = fd, start, end, prefix

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        want = min(len(buffer), self._end - self._pos)
        if want <= 0:
            return 0
        data = os.pread(self._fd, want, self._pos)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)


def tail_hash(fd: int, offset: int) -> str:
    """Hash the bytes just before `offset`: unchanged in a file that was only appended to since."""
    start = max(0, offset - TAIL)
    return hashlib.sha256(os.pread(fd, offset - start, start)).hexdigest()


def _header(fd: int) -> bytes:
    """The first line of a file (a CSV header), bounded."""
    head = os.pread(fd, 1 << 20, 0)
    cut = head.find(b"\n")
    return head if cut < 0 else head[:cut + 1]


class Ingestor:
    """Take files into the spool, one transaction each, and move them away after the commit.

    `linger` (a watcher's): a moved file keeps its mark under its new name, to be watched there for growth (see
    DirectoryWatcher); without it (a one-shot ingest) the mark is forgotten and `after = "delete"` deletes at
    once. `partial_wait`: how long a line format's last line without a newline may stay unchanged before it is
    judged as it is (0: at once, as a one-shot ingest of a file the operator named does).
    """

    def __init__(self, store: Store, *, skip_invalid: bool = False, after: str = "move",
                 max_bytes: int = 256 << 20, t_floor: int = T_FLOOR, clock: Callable[[], float] = time.time,
                 interrupted: Callable[[], bool] = lambda: False, linger: bool = False, partial_wait: float = 0.0):
        self.store = store
        self.skip_invalid = skip_invalid
        self.after = after
        self.max_bytes = max_bytes
        self.t_floor = t_floor
        self.clock = clock
        self.interrupted = interrupted
        self.linger = linger
        self.partial_wait = partial_wait

    @classmethod
    def for_watch(cls, store: Store, watch: WatchSettings, **kwargs: object) -> Ingestor:
        return cls(store, skip_invalid=watch.skip_invalid, after=watch.after, max_bytes=watch.max_bytes,
                   linger=True, partial_wait=watch.partial_wait, **kwargs)  # type: ignore[arg-type]

    def ingest(self, path: Path, *, move: bool = True, kind: str | None = None) -> IngestResult:
        """Ingest one file; with `move`, move it to .done/ or .rejected/ (or delete it) afterwards.

        `kind`: the name whose extension says the format (a file lingering in .done/ may have a numbered name).
        """
        kind = kind or path.name
        try:
            info = path.lstat()
        except FileNotFoundError:
            return IngestResult(path, "vanished")
        refusal = self._refusal(kind, info)
        if refusal is not None:
            return self._reject(path, [InvalidRecord(refusal)], move)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return IngestResult(path, "vanished")
        except OSError as exc:
            return self._reject(path, [InvalidRecord(f"cannot read the file: {exc.strerror}")], move)
        try:
            return self._ingest_open(path, fd, move, kind)
        finally:
            os.close(fd)

    def _ingest_open(self, path: Path, fd: int, move: bool, kind: str) -> IngestResult:
        seen = os.fstat(fd)
        if not stat.S_ISREG(seen.st_mode):  # replaced by something else since the lstat
            return self._reject(path, [InvalidRecord("is not a regular file")], move)
        key = os.fsencode(os.path.abspath(path))
        mark = self.store.file_mark(key)
        if mark is None:
            mark = self._renamed(key, fd, seen)
        start = self._resume_at(fd, seen, mark)
        if start is None:  # this very file was taken before (a crash came before its move, or --keep)
            return self._taken(IngestResult(path, "already"), key, seen, move)
        lines = kind.lower().endswith(APPENDABLE)
        if start and not lines:
            return self._reject(path, [InvalidRecord(
                f"changed after its first {start} bytes were taken; only {', '.join(APPENDABLE)} files "
                "can be appended to (write a new file for new records)")], move)
        end = self._complete_lines_end(fd, start, seen) if lines else seen.st_size
        if end <= start < seen.st_size:  # only a line still being written: nothing to take yet
            return IngestResult(path, "partial", offset=start)
        reader = reader_for(kind)
        assert reader is not None  # _refusal checked the kind
        prefix = _header(fd) if start and kind.lower().endswith(".csv") else b""
        stream = io.BufferedReader(_Slice(fd, start, end, prefix), 1 << 16)
        errors: list[InvalidRecord] = []
        mark = FileMark(key, seen.st_dev, seen.st_ino, end, seen.st_mtime_ns, tail_hash(fd, end))
        try:
            records = self._checked(to_records(reader(stream), clock_now=stamp(self.clock()), t_floor=self.t_floor,
                                               on_invalid=errors.append), errors, fd, seen)
            taken = self.store.append(records, file=mark)
        except _RejectFile:
            return self._reject(path, errors, move, start)
        except _Interrupted:
            return IngestResult(path, "interrupted")
        except _Changed:
            return IngestResult(path, "changing")
        if errors:  # skip_invalid: the good records are in; say which were left out and why
            self._write_report(path, errors, start)
        if end < seen.st_size:  # the last line is still coming: the file stays, its mark says where to go on
            return IngestResult(path, "partial", taken, tuple(errors), offset=start)
        return self._taken(IngestResult(path, "ingested", taken, tuple(errors), offset=start), key, seen, move)

    def _renamed(self, key: bytes, fd: int, seen: os.stat_result) -> FileMark | None:
        """The mark of this very file taken under another name in the same folder (renamed, or a hard link).

        Only a file unchanged since it was read counts (same inode, size, mtime and bytes): a new file on a
        reused inode number is never taken for the old one. Its mark moves to this name (or is copied, when the
        old name still holds the file).
        """
        folder = key[:key.rindex(b"/") + 1]
        for mark in self.store.file_marks_of_inode(seen.st_ino, folder):
            if ((mark.offset, mark.mtime_ns) == (seen.st_size, seen.st_mtime_ns)
                    and tail_hash(fd, mark.offset) == mark.tail):
                try:
                    still = os.lstat(mark.path).st_ino == seen.st_ino
                except OSError:
                    still = False
                if still:
                    self.store.copy_file_mark(mark.path, key)
                else:
                    self.store.move_file_mark(mark.path, key)
                return mark._replace(path=key)
        return None

    def _complete_lines_end(self, fd: int, start: int, seen: os.stat_result) -> int:
        """Where the complete lines after `start` end: a last line without its newline is still being written.

        It is taken as it is once the file has been unchanged for `partial_wait` seconds (0: at once).
        """
        end = seen.st_size
        if end <= start or os.pread(fd, 1, end - 1) == b"\n":
            return end
        if self.clock() - seen.st_mtime >= self.partial_wait:
            return end
        position = end
        while position > start:  # back from the end to the last newline, a block at a time
            begin = max(start, position - (1 << 16))
            cut = os.pread(fd, position - begin, begin).rfind(b"\n")
            if cut >= 0:
                return begin + cut + 1
            position = begin
        return start

    def _taken(self, result: IngestResult, key: bytes, seen: os.stat_result, move: bool) -> IngestResult:
        """Move a file whose records are committed out of the way; say so in the result, or why not."""
        if not move:
            return result
        try:
            return result._replace(moved_to=self._take_away(result.path, key, seen))
        except Unmovable as exc:
            return result._replace(unmoved=str(exc))

    @staticmethod
    def _resume_at(fd: int, seen: os.stat_result, mark: FileMark | None) -> int | None:
        """Where to start reading this file: 0 (a new file), the old end (it grew), None (nothing new)."""
        # The inode alone names the file: a disk can come back (after a power cut, a remount) with another
        # device number (FUSE, btrfs subvolumes, LVM, NFS get theirs when mounted); the tail hash guards the rest.
        if mark is None or mark.ino != seen.st_ino:
            return 0  # never seen, or another file now has this name
        if seen.st_size < mark.offset or tail_hash(fd, mark.offset) != mark.tail:
            return 0  # truncated or rewritten in place: what is there now is new
        if seen.st_size == mark.offset:
            # The same size and bytes, but written since (its mtime moved): rewritten in place with the same
            # bytes, or deleted and made again under a reused inode number. A new file, read whole.
            return None if seen.st_mtime_ns == mark.mtime_ns else 0
        return mark.offset

    def _refusal(self, kind: str, info: os.stat_result) -> str | None:
        if stat.S_ISLNK(info.st_mode):
            return "is a symbolic link; links are not followed"
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_size > self.max_bytes:
            return f"is {info.st_size} bytes, over the limit of {self.max_bytes}"
        if reader_for(kind) is None:
            return f"is not a known kind of file (expected one of {', '.join(SUFFIXES)})"
        return None

    def _checked(self, records: Iterator[Record], errors: list[InvalidRecord], fd: int,
                 seen: os.stat_result) -> Iterator[Record]:
        """Pass records through; stop for shutdown; at the end reject the file if its errors say so.

        Once a file is bound to be rejected, it is read on (inserting nothing) only to report every bad line.
        A file whose size or mtime changed while it was read is being written: nothing from it is committed.
        """
        doomed = False
        for n, record in enumerate(records, start=1):
            if n % INTERRUPT_EVERY == 0 and self.interrupted():
                raise _Interrupted
            doomed = doomed or (bool(errors) and (errors[-1].fatal or not self.skip_invalid))
            if doomed:
                if errors[-1].fatal or len(errors) >= MAX_REPORTED:
                    break
                continue
            yield record
        now = os.fstat(fd)
        if (now.st_size, now.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns):
            raise _Changed
        if errors and (not self.skip_invalid or any(error.fatal for error in errors)):
            raise _RejectFile

    def reject_failed(self, path: Path, exc: Exception) -> IngestResult:
        """Move a file whose ingest failed unexpectedly to .rejected/, with the error, so nothing loops on it."""
        result = self._reject(path, [InvalidRecord(f"internal error: {type(exc).__name__}: {exc}")], True)
        return result._replace(outcome="failed")

    def _reject(self, path: Path, errors: list[InvalidRecord], move: bool, start: int = 0) -> IngestResult:
        result = IngestResult(path, "rejected", 0, tuple(errors), offset=start)
        if not move:
            return result
        try:
            with _Folder(path.parent, REJECTED) as folder:
                name = folder.move_in(path)
                if name is None:
                    return result  # gone already
                folder.sync(path.parent)  # the file left the watched directory for good: it is not read again
                folder.report(name, _report_lines(errors, start))
                return result._replace(moved_to=folder.path / name)
        except Unmovable as exc:
            return result._replace(unmoved=str(exc))

    def _write_report(self, path: Path, errors: list[InvalidRecord], start: int = 0) -> None:
        """The report of the bad lines of a file whose good records were taken (skip_invalid)."""
        try:
            with _Folder(path.parent, REJECTED) as folder:
                folder.report(path.name, _report_lines(errors, start))
        except Unmovable as exc:
            log.error("cannot write the error report for %s: %s", printable(path.name), exc)

    def _take_away(self, path: Path, key: bytes, seen: os.stat_result) -> Path | None:
        """Move the file read to .done/ (or delete it), only if what is at the path is still that file, unchanged.

        The rename moves whatever the name points to at that instant, so the moved file is checked after the
        rename; a file that is not the one read, or that grew meanwhile, is put back unread. Raises Unmovable.
        """
        with _Folder(path.parent, DONE) as folder:
            name = folder.free_name(path.name)
            target = folder.path / name
            target_key = os.fsencode(os.path.abspath(target))
            if self.linger:
                # The mark goes ahead of the file: a crash just after the rename leaves the moved file known, so
                # what a producer writes to it afterwards is taken on restart.
                self.store.copy_file_mark(key, target_key)
            try:
                moved_name = folder.move_in(path, name)
            except Unmovable:
                if self.linger:
                    self.store.forget_files([target_key])
                raise
            if moved_name is None:
                if self.linger:
                    self.store.forget_files([target_key])
                return None  # gone already: replaced and removed by its producer
            moved = folder.lstat(name)
            if ((moved.st_dev, moved.st_ino, moved.st_size, moved.st_mtime_ns)
                    != (seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns)):
                if self.linger:
                    self.store.forget_files([target_key])
                self._put_back(folder, name, path, key)
                return None
            folder.sync(path.parent)
            if self.linger:  # the mark follows the file: what is written to it from now on is taken too
                self.store.forget_files([key])
                return target
            self.store.forget_files([key])  # only now: a mark never outlives its file's stay in the directory
            if self.after == "delete":
                folder.unlink(name)
                return None
            return target

    def _put_back(self, folder: _Folder, name: str, path: Path, key: bytes) -> None:
        """Return a file moved by mistake to its name (never over another file), or under a new one beside it."""
        try:
            os.link(name, path, src_dir_fd=folder.fd, follow_symlinks=False)
        except FileExistsError:  # a newer file took the name meanwhile: give this one a name of its own
            fresh = _free_name(path.parent, path.name, prefix=True)
            # Its mark goes with it (what was taken from it stays taken); the file now at the old name is new.
            self.store.move_file_mark(key, os.fsencode(os.path.abspath(fresh)))
            os.link(name, fresh, src_dir_fd=folder.fd, follow_symlinks=False)
            log.warning("%s was replaced while it was moved; the file read earlier is back as %s",
                        printable(path.name), printable(fresh.name))
        folder.unlink(name)
        fsync_dir(path.parent)


def _report_lines(errors: list[InvalidRecord], start: int) -> list[str]:
    lines = [f"lines counted from byte {start}, where the part taken before ended"] if start else []
    lines += [str(error) for error in errors[:MAX_REPORTED]]
    if len(errors) > MAX_REPORTED:
        lines.append(f"... and {len(errors) - MAX_REPORTED} more")
    return lines


class _Folder:
    """DIR/.done/ or DIR/.rejected/, made if missing, opened without following links and used by descriptor.

    A producer can write the drop directory too: it may make these folders itself, or links in their place, or
    plant links and hard links under the names spool would write. So the folder is opened with O_NOFOLLOW (a
    link is refused, with its name), every name in it is resolved against that descriptor (a folder swapped for
    a link after it was opened changes nothing), files are moved in under names no entry has, and reports are
    created new (O_EXCL), never opened over an existing name.
    """

    def __init__(self, parent: Path, name: str):
        self.path = parent / name
        self.fd = -1

    def __enter__(self) -> _Folder:
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass  # spool's own from before, or the producer's: checked as it is opened
        except OSError as exc:
            raise Unmovable(_folder_problem(self.path, exc)) from None
        try:
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise Unmovable(_folder_problem(self.path, exc)) from None
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def free_name(self, name: str, *, suffix: str = "") -> str:
        """NAME, then NAME.1, NAME.2 ... (each + `suffix`): the first that no entry in the folder has.

        A name too long for the file system with its number or suffix is shortened in its middle (its start and
        its extensions kept), so a file whose name is near the limit can still be moved and reported.
        """
        candidate, n = _fit(name, suffix), 0
        while True:
            try:
                os.lstat(candidate, dir_fd=self.fd)
            except FileNotFoundError:
                return candidate
            n += 1
            candidate = _fit(name, f".{n}{suffix}")

    def move_in(self, path: Path, name: str | None = None) -> str | None:
        """Rename `path` into the folder under `name` (or a free name); return it (None if the file was gone)."""
        name = name or self.free_name(path.name)
        try:
            os.rename(path, name, dst_dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise Unmovable(_folder_problem(self.path, exc)) from None
        return name

    def lstat(self, name: str) -> os.stat_result:
        return os.lstat(name, dir_fd=self.fd)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def sync(self, *others: Path) -> None:
        """Make the folder's entries durable (and those of `others`, the directory a file left)."""
        os.fsync(self.fd)
        for other in others:
            fsync_dir(other)

    def report(self, name: str, lines: list[str]) -> None:
        """Write NAME.error.txt (or NAME.1.error.txt ... when taken): a new file, only the owner can read it."""
        for _ in range(100):
            report = self.free_name(name, suffix=".error.txt")
            try:
                # A bad cell may hold a key: 0600. O_EXCL: a name a producer placed (a link) is never written through.
                fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=self.fd)
                break
            except FileExistsError:
                continue  # planted between the look and the create: choose again
            except OSError as exc:
                log.error("cannot write the error report for %s: %s", printable(name), exc.strerror)
                return
        else:
            return
        try:
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
                out.write("\n".join(lines) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.fsync(self.fd)
        except OSError as exc:
            log.error("cannot write the error report for %s: %s", printable(name), exc.strerror)


NAME_MAX = 255  # bytes in one file name (Linux file systems)


def _fit(name: str, suffix: str) -> str:
    """NAME + SUFFIX, with NAME shortened in its middle if the whole would be longer than a name may be."""
    whole = os.fsencode(name + suffix)
    if len(whole) <= NAME_MAX:
        return name + suffix
    raw, extra = os.fsencode(name), len(os.fsencode(suffix))
    ends = raw[-24:] if b"." in raw[-24:] else b""
    ends = ends[ends.index(b"."):] if ends else b""  # its extensions, which say its format
    keep = NAME_MAX - extra - len(ends) - 1
    return os.fsdecode(raw[:keep] + b"~" + ends) + suffix


def _folder_problem(folder: Path, exc: OSError) -> str:
    """Why a file cannot go into `folder`, in words an operator acts on."""
    if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and folder.is_symlink()):
        return f"{folder.name}/ is a symbolic link; spool never follows links in a drop directory (remove it)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return f"{folder.name} is not a directory (remove it; spool makes the folder)"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{folder.name}/ is not writable by spool (make the spool user its owner)"
    return f"{folder.name}/: {exc.strerror}"


def folder_problem(directory: Path, name: str) -> str | None:
    """Why spool could not move files into DIR/NAME (.done, .rejected) as it stands, or None (missing is fine)."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # made on first use
    except OSError as exc:
        return _folder_problem(directory / name, exc)
    os.close(fd)  # a folder, not a link: can spool write in it?
    if not os.access(directory / name, os.W_OK | os.X_OK):
        return _folder_problem(directory / name, PermissionError(errno.EACCES, "Permission denied"))
    return None


def _free_name(folder: Path, name: str, *, prefix: bool = False) -> Path:
    """A name in `folder` that no file has: NAME, then NAME.1, NAME.2 ... (or 1-NAME ... with `prefix`)."""
    target, n = folder / name, 0
    while os.path.lexists(target):
        n += 1
        target = folder / (f"{n}-{name}" if prefix else f"{name}.{n}")
    return target


class DirectoryLock:
    """One directory, one taker: an flock on the directory, which the kernel drops when its holder ends.

    Two watchers of one directory (two [[watch]] tables naming it two ways, `spool watch` beside the agent, a
    `spool ingest` of a file in a watched directory) would each read a file before either moves it: its records
    would be taken twice. File systems without flock on directories (some network ones) are watched unlocked.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.fd: int | None = None
        self.identity: tuple[int, int] | None = None  # (device, inode) of the directory locked

    def acquire(self, *, busy: str) -> DirectoryLock:
        from spool.errors import SpoolBusy

        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolBusy(f"{self.directory} {busy}") from None
        except OSError as exc:
            log.warning("cannot lock %s (%s): two spool processes could take its files", self.directory,
                        exc.strerror)
        self.fd = fd
        self.identity = _identity(os.fstat(fd))
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_directory(directory: Path) -> None:
    """Raise ConfigError, with the reason, if a drop directory cannot be watched."""
    from spool.errors import ConfigError

    if not directory.is_dir():
        raise ConfigError(f"watched directory {directory} does not exist or is not a directory")
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise ConfigError(f"watched directory {directory} must be readable and writable by spool")


def is_candidate(path: Path) -> bool:
    """Whether a file name is one producers mean us to take (not a temporary or hidden one)."""
    name = path.name
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


# What SQLite and spool put beside a spool file SPOOL: its journals, the shipper's lock, a quarantined copy.
_SPOOL_COMPANIONS = ("-wal", "-shm", "-journal", ".ship.lock", ".owners", ".corrupt-")


def spool_files(spool: Path, directory: Path) -> tuple[str, ...]:
    """The names in `directory` that belong to the spool itself (empty if the spool lives elsewhere).

    A drop directory may be the spool's own directory (both under /var/lib/spool, say): the spool file, its
    journals and lock must never be taken for dropped files, or the live spool would be moved to .rejected/.
    Both the path as given and the real file behind a symlink count.
    """
    here = os.path.realpath(directory)
    return tuple(path.name for path in {Path(os.path.abspath(spool)), Path(os.path.realpath(spool))}
                 if os.path.realpath(path.parent) == here)


def is_spool_file(name: str, spools: tuple[str, ...]) -> bool:
    return any(name == spool or (name.startswith(spool) and name[len(spool):].startswith(_SPOOL_COMPANIONS))
               for spool in spools)


class DirectoryWatcher:
    """Watch one directory with watchdog and ingest what lands there, oldest first, on one worker thread.

    Events start the work; a rescan of the directory (at start, every `rescan` seconds, and at once after the
    kernel dropped events) makes sure no file waits for a restart whatever the events did.
    """

    def __init__(self, watch: WatchSettings, store: Store, *, shutdown: threading.Event | None = None,
                 on_ingested: Callable[[IngestResult], None] | None = None, t_floor: int = T_FLOOR,
                 monotonic: Callable[[], float] = time.monotonic):
        self.watch = watch
        self.directory = watch.path
        self.store = store
        self.shutdown = shutdown or threading.Event()
        self.on_ingested = on_ingested or (lambda result: None)
        self.monotonic = monotonic
        self.ingestor = Ingestor.for_watch(store, watch, t_floor=t_floor, interrupted=self.shutdown.is_set)
        self.results: collections.deque[IngestResult] = collections.deque(maxlen=RECENT)  # recent files only
        self.outcomes: collections.Counter[str] = collections.Counter()  # files by outcome, since start
        self.ingested_records = 0
        self._stats_lock = threading.Lock()  # this watcher's thread counts, /metrics reads (snapshot)
        self.overflowed = threading.Event()  # the kernel dropped events: rescan now
        self._queue: queue.Queue[tuple[str, bool] | None] = queue.Queue()  # (path, must settle); None: stop
        # Files still settling: (when to look again, path, (size, mtime_ns) when last seen), and their paths.
        self._deferred: list[tuple[float, str, tuple[int, int] | None]] = []
        self._waiting: set[str] = set()
        # Files moved to .done/ still watched for what a producer that opened them before the move writes:
        # (when to look, path in .done/, the name that says its format).
        self._lingering: list[tuple[float, str, str]] = []
        self._backoff: dict[str, float] = {}  # files that could not be moved: the wait before the next try
        self._lock = DirectoryLock(self.directory)
        self._astray = False  # the path names another directory than the one locked
        self._next_scan = float("inf")
        self._observer: Any = None
        self._overflow_watch = _OverflowWatch(self.overflowed)
        self._spool_files = spool_files(store.path, self.directory)

    def snapshot(self) -> dict[str, Any]:
        """Files by outcome and records taken since start, copied under the lock (for /metrics)."""
        with self._stats_lock:
            return {"outcomes": dict(self.outcomes), "records": self.ingested_records}

    def check_directory(self) -> None:
        """Fail early, with a clear reason, if the directory cannot be watched."""
        check_directory(self.directory)

    def start(self) -> None:
        """Start the observer; then queue what is already there, oldest first."""
        from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent
        from watchdog.observers import Observer
        from watchdog.observers.api import BaseObserver
        from watchdog.observers.polling import PollingObserver

        self.check_directory()
        self._lock.acquire(busy="is already watched by another spool process (spool run or spool watch); "
                                "one directory has one watcher, or its files would be taken twice")
        handler: Any = _Handler(self)  # observers only call dispatch(): no watchdog base class needed
        observer: BaseObserver
        if self.watch.poll:
            observer = PollingObserver(timeout=self.watch.poll_interval)
            kinds = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent]
        else:
            observer = Observer()
            # Created: a file moved in from another directory of the file system comes only as "created".
            kinds = [FileClosedEvent, FileMovedEvent, FileCreatedEvent]
        logging.getLogger("watchdog.observers.inotify_c").addFilter(self._overflow_watch)
        observer.schedule(handler, str(self.directory), recursive=False, event_filter=kinds)
        observer.daemon = True
        observer.start()
        self._observer = observer
        self.forget_gone()
        self.scan()

    def scan(self) -> None:
        """Queue every candidate file in the directory, oldest first (files already waiting are not doubled)."""
        self._next_scan = self.monotonic() + self.watch.rescan
        if not self._still_ours():
            return
        try:
            present = [p for p in self.directory.iterdir() if self._takes(p) and not p.is_dir()]
        except OSError as exc:
            log.error("cannot list %s: %s", self.directory, exc.strerror)
            return
        for path in sorted(present, key=_mtime):
            self.offer(path, settle=True)

    def forget_gone(self) -> None:
        """Drop the marks of files of this directory that are no longer there as the file that was read.

        Files in .done/ that still have a mark were moved less than `linger` seconds before spool stopped
        (or died): they are watched for growth again, from now on.
        """
        prefix = os.fsencode(os.path.abspath(self.directory)) + b"/"
        done = prefix + os.fsencode(DONE) + b"/"
        gone = []
        for mark in self.store.file_marks():
            if mark.path.startswith(done) and b"/" not in mark.path[len(done):]:
                name = os.fsdecode(mark.path[len(done):])
                self._linger(os.fsdecode(mark.path), _kind_of(name))
            elif mark.path.startswith(prefix) and b"/" not in mark.path[len(prefix):]:
                try:
                    if os.lstat(mark.path).st_ino == mark.ino:
                        continue
                except OSError:
                    pass
                gone.append(mark.path)
        if gone:
            self.store.forget_files(gone)

    def offer(self, path: Path, *, settle: bool) -> None:
        """Queue a path for ingestion (after it has settled, for paths found by scans, polls and creation)."""
        if path.parent == self.directory and self._takes(path):
            self._queue.put((str(path), settle))

    def _takes(self, path: Path) -> bool:
        return is_candidate(path) and not is_spool_file(path.name, self._spool_files)

    def stop(self) -> None:
        self.shutdown.set()
        self._queue.put(None)

    def run(self) -> None:
        """Ingest until stopped. Call start() first (or let run do it)."""
        if self._observer is None:
            self.start()
        try:
            while not self.shutdown.is_set():
                path = self._next()
                if self.shutdown.is_set():
                    break
                if path is not None:
                    self._ingest(path)
        finally:
            self.close()

    def close(self) -> None:
        logging.getLogger("watchdog.observers.inotify_c").removeFilter(self._overflow_watch)
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None
        self._lock.release()

    def _next(self) -> Path | None:
        """Return the next path to ingest, waiting for events, a settling file, or the next rescan."""
        now = self.monotonic()
        if now >= self._next_scan or self.overflowed.is_set():
            if self.overflowed.is_set():
                log.warning("events for %s were lost (inotify queue overflow); rescanning it", self.directory)
            self.overflowed.clear()
            self.scan()
        if self._lingering and self._lingering[0][0] <= now:
            _, moved, kind = heapq.heappop(self._lingering)
            self._check_lingering(Path(moved), kind)
            return None
        if self._deferred and self._deferred[0][0] <= now:
            _, path, seen = heapq.heappop(self._deferred)
            self._waiting.discard(path)
            return self._settled(Path(path), seen)
        wake = min(self._deferred[0][0] if self._deferred else float("inf"), self._next_scan,
                   self._lingering[0][0] if self._lingering else float("inf"))
        try:
            item = self._queue.get(timeout=max(0.0, min(wake - now, 1.0)))
        except queue.Empty:
            return None
        if item is None:
            return None  # stop() also set the shutdown event
        path, settle = item
        if not settle:
            return Path(path)
        if path in self._waiting:
            return None  # already settling: its own re-check decides
        return self._settled(Path(path), None)

    def _settled(self, path: Path, seen: tuple[int, int] | None) -> Path | None:
        """Return the path if the file has settled; else look at it again after `settle` seconds.

        Settled: unchanged since it was last seen `settle` seconds ago or, at first sight, last modified at
        least `settle` seconds ago by the wall clock. A modification time in the future (a producer's clock
        ahead of ours) proves nothing: such a file is watched for `settle` seconds like a new one.
        """
        try:
            info = path.lstat()
        except OSError:
            return None
        now = (info.st_size, info.st_mtime_ns)
        age = time.time() - info.st_mtime
        if now == seen or (seen is None and age >= self.watch.settle):
            return path
        self._defer(path, now)
        return None

    def _defer(self, path: Path, seen: tuple[int, int] | None, delay: float | None = None, *,
               exclusive: bool = True) -> None:
        """Look at a path again later. `exclusive`: until then, events and scans do not bring it sooner."""
        key = str(path)
        if key in self._waiting:
            return
        if exclusive:
            self._waiting.add(key)
        heapq.heappush(self._deferred, (self.monotonic() + (self.watch.settle if delay is None else delay),
                                        key, seen))

    def _still_ours(self) -> bool:
        """Whether the directory's path still names the directory locked at start (not replaced, not re-linked)."""
        if self._lock.identity is None:
            return True  # not started (nothing locked): nothing to compare with
        try:
            ours = self._lock.identity == _identity(os.stat(self.directory))
        except OSError:
            ours = False
        if not ours and not self._astray:
            log.error("%s no longer names the directory spool locked when it started (it was replaced, moved or "
                      "re-linked); no file is taken from it until spool is restarted", self.directory)
        self._astray = not ours
        return ours

    def _ingest(self, path: Path) -> None:
        if not self._still_ours():
            return
        key = str(path)
        retry = key in self._backoff
        try:
            result = self.ingestor.ingest(path)
        except (StoreError, OSError) as exc:  # the spool or the disk failed (full, I/O error): keep the file, retry
            delay = min(self._backoff.get(key, 2.5) * 2, MAX_BACKOFF)
            log.log(logging.DEBUG if retry else logging.ERROR, "cannot ingest %s: %s; retried at growing "
                    "intervals up to %.0f s", printable(path.name), exc, MAX_BACKOFF)
            self._backoff[key] = delay
            self._defer(path, None, delay=delay)
            return
        except Exception as exc:  # a bug must not stop the watcher, nor crash-loop the agent on one file
            log.exception("failed to ingest %s: %s; moved it to %s/", printable(path.name), exc, REJECTED)
            result = self.ingestor.reject_failed(path, exc)
        if result.outcome == "vanished":
            self._backoff.pop(str(path), None)
            return
        if result.outcome == "changing":
            self._defer(path, None)
            return
        if result.outcome == "partial":  # look again once the last line could have been judged (or sooner, on close)
            self._defer(path, None, delay=self._partial_delay(path), exclusive=False)  # its newline may come sooner
        elif result.unmoved is not None:
            self._retry_move(result)
        else:
            if self._backoff.pop(str(path), None) is not None and result.moved_to is not None:
                log.info("moved %s into %s/ at last", printable(path.name), result.moved_to.parent.name)
            if result.moved_to is not None and result.moved_to.parent.name == DONE:
                self._linger(str(result.moved_to), path.name)
            elif result.outcome in ("ingested", "already") and result.moved_to is None and os.path.lexists(path):
                self.offer(path, settle=True)  # it grew or was replaced while being moved: look again
        if retry and result.unmoved is not None:
            log.debug("%s", result.describe())  # said loudly at the first try
        elif result.outcome != "partial" or result.records:
            level = logging.WARNING if result.outcome in ("rejected", "failed") else logging.INFO
            log.log(level, "%s", result.describe())
        self._count(result)

    def _count(self, result: IngestResult) -> None:
        with self._stats_lock:
            self.results.append(result)
            self.outcomes[result.outcome] += 1
            self.ingested_records += result.records
        if result.records:
            self.on_ingested(result)

    def _partial_delay(self, path: Path) -> float:
        """Seconds until a file whose last line has no newline has been quiet for `partial_wait`."""
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            return self.watch.settle
        return max(0.05, min(self.watch.partial_wait - age + 0.05, self.watch.partial_wait))

    def _retry_move(self, result: IngestResult) -> None:
        """A file spool could not move away: one loud line, then tries at doubling intervals (5 min at most)."""
        key = str(result.path)
        delay = self._backoff.get(key)
        if delay is None:
            delay = max(1.0, self.watch.settle)
            log.error("%s", result.describe_unmoved(f"at growing intervals up to {MAX_BACKOFF:.0f} s"))
        else:
            delay = min(delay * 2, MAX_BACKOFF)
            log.debug("%s", result.describe_unmoved(f"in {delay:.0f} s"))
        self._backoff[key] = delay
        self._defer(result.path, None, delay=delay)

    def _linger(self, moved: str, kind: str) -> None:
        heapq.heappush(self._lingering, (self.monotonic() + self.watch.linger, moved, kind))

    def _check_lingering(self, moved: Path, kind: str) -> None:
        """Take what was written to a file in .done/ since it was moved; stop watching it once it stays quiet."""
        key = os.fsencode(os.path.abspath(moved))
        try:
            mark = self.store.file_mark(key)
            if mark is None or os.lstat(moved).st_ino != mark.ino:  # not the file moved there: not ours to read
                self.store.forget_files([key])
                return
            result = self.ingestor.ingest(moved, move=False, kind=kind)
        except (StoreError, OSError) as exc:
            log.error("cannot read %s/%s again: %s; will retry", DONE, printable(moved.name), exc)
            heapq.heappush(self._lingering, (self.monotonic() + 5.0, str(moved), kind))
            return
        if result.outcome in ("ingested", "partial", "changing", "interrupted"):
            if result.records:
                log.info("took %d records written to %s/%s after it was moved there", result.records, DONE,
                         printable(moved.name))
                self._count(result)
            self._linger(str(moved), kind)  # still being written: watch on
            return
        if result.outcome in ("rejected", "failed"):
            first = result.errors[0] if result.errors else "rejected"
            log.warning("%s/%s was written to after it was moved there, and what was added is not taken: %s",
                        DONE, printable(moved.name), first)
        self.store.forget_files([os.fsencode(os.path.abspath(moved))])
        if self.watch.after == "delete" and result.outcome == "already":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(moved)


class _OverflowWatch(logging.Filter):
    """Notice watchdog's warning that the kernel dropped inotify events (it raises no event for it)."""

    def __init__(self, flag: threading.Event):
        super().__init__()
        self.flag = flag

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self.flag.set()
        return True


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _kind_of(name: str) -> str:
    """The name that says a file's format, from its name in .done/ (NAME.1, NAME.2 ... when NAME was taken)."""
    base, dot, number = name.rpartition(".")
    return base if dot and number.isdigit() else name


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


class _Handler:
    """Turn watchdog events into paths for the watcher (close-after-write, moved into place, created, polled).

    Observers only call `dispatch`, so this needs no watchdog base class (and no import at module load).
    """

    def __init__(self, watcher: DirectoryWatcher):
        self.watcher = watcher

    def dispatch(self, event: object) -> None:
        if getattr(event, "is_directory", False):
            return
        kind = getattr(event, "event_type", "")
        if kind == "moved":
            self.watcher.offer(Path(os.fsdecode(event.dest_path)), settle=False)  # type: ignore[attr-defined]
        elif kind == "closed":
            self.watcher.offer(Path(os.fsdecode(event.src_path)), settle=False)  # type: ignore[attr-defined]
        elif kind in ("created", "modified"):  # moved in from elsewhere, or polled: wait for it to settle
            self.watcher.offer(Path(os.fsdecode(event.src_path)), settle=True)  # type: ignore[attr-defined]
