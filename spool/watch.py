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
  back unread, never moved or deleted.

Files with invalid records go to DIR/.rejected/ with NAME.error.txt beside them.
"""

from __future__ import annotations

import collections
import contextlib
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


class IngestResult(NamedTuple):
    path: Path
    outcome: str  # "ingested", "already", "rejected", "failed", "vanished", "interrupted", "changing"
    records: int = 0
    errors: tuple[InvalidRecord, ...] = ()
    moved_to: Path | None = None
    offset: int = 0  # the byte the records taken start at (an appended file: where the last read ended)

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
        return f"{name}: {self.outcome}"


class _RejectFile(Exception):
    pass


class _Interrupted(Exception):
    pass


class _Changed(Exception):
    pass


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
    """Take files into the spool, one transaction each, and move them away after the commit."""

    def __init__(self, store: Store, *, skip_invalid: bool = False, after: str = "move",
                 max_bytes: int = 256 << 20, t_floor: int = T_FLOOR, clock: Callable[[], float] = time.time,
                 interrupted: Callable[[], bool] = lambda: False):
        self.store = store
        self.skip_invalid = skip_invalid
        self.after = after
        self.max_bytes = max_bytes
        self.t_floor = t_floor
        self.clock = clock
        self.interrupted = interrupted

    @classmethod
    def for_watch(cls, store: Store, watch: WatchSettings, **kwargs: object) -> Ingestor:
        return cls(store, skip_invalid=watch.skip_invalid, after=watch.after, max_bytes=watch.max_bytes,
                   **kwargs)  # type: ignore[arg-type]

    def ingest(self, path: Path, *, move: bool = True) -> IngestResult:
        """Ingest one file; with `move`, move it to .done/ or .rejected/ (or delete it) afterwards."""
        try:
            info = path.lstat()
        except FileNotFoundError:
            return IngestResult(path, "vanished")
        refusal = self._refusal(path, info)
        if refusal is not None:
            return self._reject(path, [InvalidRecord(refusal)], move)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return IngestResult(path, "vanished")
        except OSError as exc:
            return self._reject(path, [InvalidRecord(f"cannot read the file: {exc.strerror}")], move)
        try:
            return self._ingest_open(path, fd, move)
        finally:
            os.close(fd)

    def _ingest_open(self, path: Path, fd: int, move: bool) -> IngestResult:
        seen = os.fstat(fd)
        if not stat.S_ISREG(seen.st_mode):  # replaced by something else since the lstat
            return self._reject(path, [InvalidRecord("is not a regular file")], move)
        key = os.fsencode(os.path.abspath(path))
        start = self._resume_at(fd, seen, self.store.file_mark(key))
        if start is None:  # this very file was taken before (a crash came before its move, or --keep)
            return IngestResult(path, "already", moved_to=self._take_away(path, key, seen) if move else None)
        if start and not path.name.lower().endswith(APPENDABLE):
            return self._reject(path, [InvalidRecord(
                f"changed after its first {start} bytes were taken; only {', '.join(APPENDABLE)} files "
                "can be appended to (write a new file for new records)")], move)
        reader = reader_for(path.name)
        assert reader is not None  # _refusal checked the kind
        prefix = _header(fd) if start and path.name.lower().endswith(".csv") else b""
        stream = io.BufferedReader(_Slice(fd, start, seen.st_size, prefix), 1 << 16)
        errors: list[InvalidRecord] = []
        mark = FileMark(key, seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns, tail_hash(fd, seen.st_size))
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
        moved = self._take_away(path, key, seen) if move else None
        return IngestResult(path, "ingested", taken, tuple(errors), moved, start)

    @staticmethod
    def _resume_at(fd: int, seen: os.stat_result, mark: FileMark | None) -> int | None:
        """Where to start reading this file: 0 (a new file), the old end (it grew), None (nothing new)."""
        # The inode alone names the file: a disk can come back (after a power cut, a remount) with another
        # device number (FUSE, btrfs subvolumes, LVM, NFS get theirs when mounted); the tail hash guards the rest.
        if mark is None or mark.ino != seen.st_ino:
            return 0  # never seen, or another file now has this name
        if seen.st_size < mark.offset or tail_hash(fd, mark.offset) != mark.tail:
            return 0  # truncated or rewritten in place: what is there now is new
        return mark.offset if seen.st_size > mark.offset else None

    def _refusal(self, path: Path, info: os.stat_result) -> str | None:
        if stat.S_ISLNK(info.st_mode):
            return "is a symbolic link; links are not followed"
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_size > self.max_bytes:
            return f"is {info.st_size} bytes, over the limit of {self.max_bytes}"
        if reader_for(path.name) is None:
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
        moved = None
        if move:
            self._write_report(path, errors, start)
            moved = _move_into(path, path.parent / REJECTED)
        return IngestResult(path, "rejected", 0, tuple(errors), moved, start)

    def _write_report(self, path: Path, errors: list[InvalidRecord], start: int = 0) -> None:
        lines = [f"lines counted from byte {start}, where the part taken before ended"] if start else []
        lines += [str(error) for error in errors[:MAX_REPORTED]]
        if len(errors) > MAX_REPORTED:
            lines.append(f"... and {len(errors) - MAX_REPORTED} more")
        folder = path.parent / REJECTED
        report = folder / f"{path.name}.error.txt"
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(report, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a bad cell may hold a key
            with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as out:
                os.fchmod(out.fileno(), 0o600)
                out.write("\n".join(lines) + "\n")
                out.flush()
                os.fsync(out.fileno())
            fsync_dir(folder)
        except OSError as exc:
            log.error("cannot write the error report for %s: %s", printable(path.name), exc.strerror)

    def _take_away(self, path: Path, key: bytes, seen: os.stat_result) -> Path | None:
        """Move the file read to .done/ (or delete it), only if what is at the path is still that file, unchanged.

        The rename moves whatever the name points to at that instant, so the moved file is checked after the
        rename; a file that is not the one read, or that grew meanwhile, is put back unread.
        """
        folder = path.parent / DONE
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            target = _free_name(folder, path.name)
            os.rename(path, target)
        except FileNotFoundError:
            return None  # gone already: replaced and removed by its producer
        except OSError as exc:
            log.error("cannot move %s into %s: %s", printable(path.name), DONE, exc.strerror)
            return None
        moved = os.lstat(target)
        if ((moved.st_dev, moved.st_ino, moved.st_size, moved.st_mtime_ns)
                != (seen.st_dev, seen.st_ino, seen.st_size, seen.st_mtime_ns)):
            self._put_back(target, path, key)
            return None
        fsync_dir(folder)
        fsync_dir(path.parent)
        self.store.forget_files([key])  # only now: a mark never outlives its file's stay in the directory
        if self.after == "delete":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)
            return None
        return target

    def _put_back(self, moved: Path, path: Path, key: bytes) -> None:
        """Return a file moved by mistake to its name (never over another file), or under a new one beside it."""
        try:
            os.link(moved, path)
        except FileExistsError:  # a newer file took the name meanwhile: give this one a name of its own
            fresh = _free_name(path.parent, path.name, prefix=True)
            # Its mark goes with it (what was taken from it stays taken); the file now at the old name is new.
            self.store.move_file_mark(key, os.fsencode(os.path.abspath(fresh)))
            os.link(moved, fresh)
            log.warning("%s was replaced while it was moved; the file read earlier is back as %s",
                        printable(path.name), printable(fresh.name))
        os.unlink(moved)
        fsync_dir(path.parent)


def _free_name(folder: Path, name: str, *, prefix: bool = False) -> Path:
    """A name in `folder` that no file has: NAME, then NAME.1, NAME.2 ... (or 1-NAME ... with `prefix`)."""
    target, n = folder / name, 0
    while os.path.lexists(target):
        n += 1
        target = folder / (f"{n}-{name}" if prefix else f"{name}.{n}")
    return target


def _move_into(path: Path, folder: Path) -> Path | None:
    """Move a file into `folder` under a name not already taken there."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        target = _free_name(folder, path.name)
        os.rename(path, target)
        fsync_dir(folder)
        fsync_dir(path.parent)  # the file left the watched directory for good: it is not read again
        return target
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot move %s into %s: %s", printable(path.name), folder.name, exc.strerror)
        return None


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
        try:
            present = [p for p in self.directory.iterdir() if self._takes(p) and not p.is_dir()]
        except OSError as exc:
            log.error("cannot list %s: %s", self.directory, exc.strerror)
            return
        for path in sorted(present, key=_mtime):
            self.offer(path, settle=True)

    def forget_gone(self) -> None:
        """Drop the marks of files of this directory that are no longer there as the file that was read."""
        prefix = os.fsencode(os.path.abspath(self.directory)) + b"/"
        gone = []
        for mark in self.store.file_marks():
            if mark.path.startswith(prefix) and b"/" not in mark.path[len(prefix):]:
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

    def _next(self) -> Path | None:
        """Return the next path to ingest, waiting for events, a settling file, or the next rescan."""
        now = self.monotonic()
        if now >= self._next_scan or self.overflowed.is_set():
            if self.overflowed.is_set():
                log.warning("events for %s were lost (inotify queue overflow); rescanning it", self.directory)
            self.overflowed.clear()
            self.scan()
        if self._deferred and self._deferred[0][0] <= now:
            _, path, seen = heapq.heappop(self._deferred)
            self._waiting.discard(path)
            return self._settled(Path(path), seen)
        wake = min(self._deferred[0][0] if self._deferred else float("inf"), self._next_scan)
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

    def _defer(self, path: Path, seen: tuple[int, int] | None, delay: float | None = None) -> None:
        key = str(path)
        if key in self._waiting:
            return
        self._waiting.add(key)
        heapq.heappush(self._deferred, (self.monotonic() + (self.watch.settle if delay is None else delay),
                                        key, seen))

    def _ingest(self, path: Path) -> None:
        try:
            result = self.ingestor.ingest(path)
        except (StoreError, OSError) as exc:  # the spool or the disk failed (full, I/O error): keep the file, retry
            log.error("cannot ingest %s: %s; will retry", printable(path.name), exc)
            self._defer(path, None, delay=5.0)
            return
        except Exception as exc:  # a bug must not stop the watcher, nor crash-loop the agent on one file
            log.exception("failed to ingest %s: %s; moved it to %s/", printable(path.name), exc, REJECTED)
            result = self.ingestor.reject_failed(path, exc)
        if result.outcome == "vanished":
            return
        if result.outcome == "changing":
            self._defer(path, None)
            return
        if result.outcome in ("ingested", "already") and result.moved_to is None and os.path.lexists(path):
            self.offer(path, settle=True)  # it grew or was replaced while being moved: look again
        level = logging.WARNING if result.outcome in ("rejected", "failed") else logging.INFO
        log.log(level, "%s", result.describe())
        with self._stats_lock:
            self.results.append(result)
            self.outcomes[result.outcome] += 1
            self.ingested_records += result.records
        if result.outcome == "ingested":
            self.on_ingested(result)


class _OverflowWatch(logging.Filter):
    """Notice watchdog's warning that the kernel dropped inotify events (it raises no event for it)."""

    def __init__(self, flag: threading.Event):
        super().__init__()
        self.flag = flag

    def filter(self, record: logging.LogRecord) -> bool:
        if "overflow" in record.getMessage().lower():
            self.flag.set()
        return True


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
