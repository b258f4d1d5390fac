"""Drop directories: files written into a watched directory are taken into the spool exactly once.

A file's records and its identity (a SHA-256 of its bytes) are committed in one transaction; only after
that commit is the file moved to DIR/.done/ (or deleted). A crash at any instant leaves the file either
ingested once (and moved, or moved on the next start because its digest is known) or not at all and still
in place. Files with invalid records go to DIR/.rejected/ with NAME.error.txt beside them.
"""

from __future__ import annotations

import collections
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
from typing import NamedTuple

from spool.config import WatchConfig
from spool.errors import InvalidRecord, StoreError
from spool.formats import SUFFIXES, reader_for, to_records
from spool.records import T_FLOOR, Record
from spool.store import Store

log = logging.getLogger("spool.watch")

DONE, REJECTED = ".done", ".rejected"
IGNORED_SUFFIXES = (".tmp", ".part", ".swp", "~")
MAX_REPORTED = 1000  # error lines written to NAME.error.txt
INTERRUPT_EVERY = 10_000  # records between checks for shutdown while ingesting a large file
RECENT = 1000  # results a long-running watcher keeps (totals are counted, not kept)


class IngestResult(NamedTuple):
    path: Path
    outcome: str  # "ingested", "duplicate", "rejected", "vanished", "interrupted"
    records: int = 0
    errors: tuple[InvalidRecord, ...] = ()
    moved_to: Path | None = None

    def describe(self) -> str:
        """One log line saying what happened to the file."""
        name = self.path.name
        if self.outcome == "ingested":
            skipped = f", skipped {len(self.errors)} invalid" if self.errors else ""
            return f"ingested {self.records} records from {name}{skipped}"
        if self.outcome == "duplicate":
            return f"{name} was ingested before (same content); not taken again"
        if self.outcome == "rejected":
            first = self.errors[0] if self.errors else "rejected"
            more = f" (and {len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
            return f"rejected {name}: {first}{more}"
        return f"{name}: {self.outcome}"


class _RejectFile(Exception):
    pass


class _Interrupted(Exception):
    pass


class _HashingReader(io.RawIOBase):
    """A raw stream that hashes every byte read through it."""

    def __init__(self, fd: int):
        self._file = os.fdopen(fd, "rb", buffering=0)
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._file.readinto(buffer) or 0
        self.hash.update(buffer[:n])
        return n

    def digest_of_all(self) -> str:
        """Hash whatever the parser did not read, then return the digest of the whole file."""
        while chunk := self._file.read(1 << 20):
            self.hash.update(chunk)
        return self.hash.hexdigest()

    def release(self) -> None:
        """Close the file itself. (Parsers' wrappers call close() when collected; the digest still needs it.)"""
        self._file.close()
        self.close()


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
    def for_watch(cls, store: Store, watch: WatchConfig, **kwargs: object) -> Ingestor:
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
        reader = reader_for(path.name)
        assert reader is not None  # _refusal checked the kind
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return IngestResult(path, "vanished")
        except OSError as exc:
            return self._reject(path, [InvalidRecord(f"cannot read the file: {exc.strerror}")], move)
        raw = _HashingReader(fd)
        errors: list[InvalidRecord] = []
        try:
            records = self._checked(to_records(reader(io.BufferedReader(raw, 1 << 16)), clock_now=int(self.clock()),
                                               t_floor=self.t_floor, on_invalid=errors.append), errors)
            taken = self.store.append_file(records, digest=raw.digest_of_all, name=path.name, now=self.clock())
        except _RejectFile:
            return self._reject(path, errors, move)
        except _Interrupted:
            return IngestResult(path, "interrupted")
        finally:
            raw.release()
        if taken is None:
            return IngestResult(path, "duplicate", moved_to=self._finish(path) if move else None)
        if errors:  # skip_invalid: the good records are in; say which were left out and why
            self._write_report(path, errors)
        return IngestResult(path, "ingested", taken, tuple(errors), self._finish(path) if move else None)

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

    def _checked(self, records: Iterator[Record], errors: list[InvalidRecord]) -> Iterator[Record]:
        """Pass records through; stop for shutdown; at the end reject the file if its errors say so.

        Once a file is bound to be rejected, it is read on (inserting nothing) only to report every bad line.
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
        if errors and (not self.skip_invalid or any(error.fatal for error in errors)):
            raise _RejectFile

    def _reject(self, path: Path, errors: list[InvalidRecord], move: bool) -> IngestResult:
        moved = None
        if move:
            self._write_report(path, errors)
            moved = _move_into(path, path.parent / REJECTED)
        return IngestResult(path, "rejected", 0, tuple(errors), moved)

    def _write_report(self, path: Path, errors: list[InvalidRecord]) -> None:
        lines = [str(error) for error in errors[:MAX_REPORTED]]
        if len(errors) > MAX_REPORTED:
            lines.append(f"... and {len(errors) - MAX_REPORTED} more")
        folder = path.parent / REJECTED
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            (folder / f"{path.name}.error.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        except OSError as exc:
            log.error("cannot write the error report for %s: %s", path.name, exc.strerror)

    def _finish(self, path: Path) -> Path | None:
        if self.after == "delete":
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.error("cannot delete ingested %s: %s", path.name, exc.strerror)
            return None
        return _move_into(path, path.parent / DONE)


def _move_into(path: Path, folder: Path) -> Path | None:
    """Move a file into `folder` under a name not already taken there."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        target = folder / path.name
        n = 0
        while target.exists():
            n += 1
            target = folder / f"{path.name}.{n}"
        os.rename(path, target)
        return target
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot move %s into %s: %s", path.name, folder.name, exc.strerror)
        return None


def is_candidate(path: Path) -> bool:
    """Whether a file name is one producers mean us to take (not a temporary or hidden one)."""
    name = path.name
    return not name.startswith(".") and not name.endswith(IGNORED_SUFFIXES)


class DirectoryWatcher:
    """Watch one directory with watchdog and ingest what lands there, oldest first, on one worker thread."""

    def __init__(self, watch: WatchConfig, store: Store, *, shutdown: threading.Event | None = None,
                 on_ingested: Callable[[IngestResult], None] | None = None, t_floor: int = T_FLOOR):
        self.watch = watch
        self.directory = watch.path
        self.store = store
        self.shutdown = shutdown or threading.Event()
        self.on_ingested = on_ingested or (lambda result: None)
        self.ingestor = Ingestor.for_watch(store, watch, t_floor=t_floor, interrupted=self.shutdown.is_set)
        self.results: collections.deque[IngestResult] = collections.deque(maxlen=RECENT)  # recent files only
        self.outcomes: collections.Counter[str] = collections.Counter()  # files by outcome, since start
        self.ingested_records = 0
        self._queue: queue.Queue[tuple[Path, bool] | None] = queue.Queue()  # (path, must settle); None: stop
        self._deferred: list[tuple[float, str]] = []  # (not before, path) heap for files still settling
        self._observer = None

    def check_directory(self) -> None:
        """Fail early, with a clear reason, if the directory cannot be watched."""
        from spool.errors import ConfigError

        if not self.directory.is_dir():
            raise ConfigError(f"watched directory {self.directory} does not exist or is not a directory")
        if not os.access(self.directory, os.R_OK | os.W_OK | os.X_OK):
            raise ConfigError(f"watched directory {self.directory} must be readable and writable by spool")

    def start(self) -> None:
        """Start the observer; then queue what is already there, oldest first."""
        from watchdog.events import FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        self.check_directory()
        handler = _Handler(self)
        if self.watch.poll:
            observer = PollingObserver(timeout=self.watch.poll_interval)
            kinds = [FileCreatedEvent, FileModifiedEvent, FileMovedEvent]
        else:
            observer = Observer()
            kinds = [FileClosedEvent, FileMovedEvent]
        observer.schedule(handler, str(self.directory), recursive=False, event_filter=kinds)
        observer.daemon = True
        observer.start()
        self._observer = observer
        for path in sorted(self._present(), key=_mtime):
            self.offer(path, settle=True)

    def _present(self) -> list[Path]:
        return [p for p in self.directory.iterdir() if is_candidate(p) and not p.is_dir()]

    def offer(self, path: Path, *, settle: bool) -> None:
        """Queue a path for ingestion (after it has settled, for paths found by scans and polls)."""
        if path.parent == self.directory and is_candidate(path):
            self._queue.put((path, settle))

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
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=10)
            self._observer = None

    def _next(self) -> Path | None:
        """Return the next path to ingest, waiting for events or for a settling file to be ready."""
        timeout = None
        if self._deferred:
            timeout = max(0.0, self._deferred[0][0] - time.monotonic())
            if timeout == 0.0:
                return Path(heapq.heappop(self._deferred)[1])
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is None:
            return None  # stop() also set the shutdown event
        path, settle = item
        age = time.time() - _mtime(path)
        if settle and age < self.watch.settle:  # may still be written by a producer ignoring the convention
            heapq.heappush(self._deferred, (time.monotonic() + self.watch.settle - age, str(path)))
            return None
        return path

    def _ingest(self, path: Path) -> None:
        try:
            result = self.ingestor.ingest(path)
        except StoreError as exc:  # the spool is unwritable (disk full, ...): keep the file, try again later
            log.error("cannot ingest %s: %s; will retry", path.name, exc)
            heapq.heappush(self._deferred, (time.monotonic() + 5.0, str(path)))
            return
        if result.outcome == "vanished":
            return
        level = logging.WARNING if result.outcome in ("rejected", "duplicate") else logging.INFO
        log.log(level, "%s", result.describe())
        self.results.append(result)
        self.outcomes[result.outcome] += 1
        self.ingested_records += result.records
        if result.outcome == "ingested":
            self.on_ingested(result)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


class _Handler:
    """Turn watchdog events into paths for the watcher (close-after-write, moved into place, polled).

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
        elif kind in ("created", "modified"):  # polling: no close events, so wait for the file to settle
            self.watcher.offer(Path(os.fsdecode(event.src_path)), settle=True)  # type: ignore[attr-defined]
