"""`Spool`: the one door to everything spool does. The CLI is a thin client of it: parse, one call, print.

    from spool import Spool

    with Spool("/var/lib/spool/spool.db") as sp:
        sp.count("messages sent~total,female", 1)
        sp.value("ws0 load average", 0.73, t=1363118126, ezkey="...")
        sp.ship_once(endpoint="https://api.stathat.com", ezkey_file="/etc/spool/ezkey")

Every append returns only after its records are committed. Operator work (import, ingest, export, replay,
dead letters, status, shipping what is pending) is here too, so a Python user gets all a CLI user gets.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, cast

from spool.config import Config
from spool.errors import ConfigError, InvalidRecord, SpoolError, StoreError
from spool.records import Record, make_record, now, parse_record, record_rows
from spool.store import Store

if TYPE_CHECKING:
    import threading

    from spool.results import DeadLetter, ExportResult, ImportResult, Settled, ShipResult

MAX_REPORTED = 1000  # invalid lines an import reports at most
_RESULTS = ("ImportResult", "ShipResult", "ExportResult", "DeadLetter", "Settled")  # in spool.results


def __getattr__(name: str) -> Any:
    """The result types, from spool.results (where they are built only when first needed)."""
    if name in _RESULTS:
        from spool import results

        return getattr(results, name)
    raise AttributeError(f"module 'spool.api' has no attribute {name!r}")


class InvalidInput(InvalidRecord):
    """An import had invalid records and nothing from it was committed; `errors` lists them (up to a limit)."""

    def __init__(self, errors: Sequence[InvalidRecord], more: int = 0):
        self.errors = tuple(errors)
        first = errors[0]
        extra = len(errors) - 1 + more
        suffix = f" (and {extra} more invalid line{'s' if extra != 1 else ''})" if extra else ""
        super().__init__(f"{first.reason}{suffix}; nothing was imported", field=first.field, line=first.line)


class Spool:
    """A durable spool of StatHat records in one SQLite file.

    `Spool(path)` uses the default settings; `Spool(config=...)` a loaded Config; `[spool]` settings can be
    given as keywords (`Spool(path, synchronous="normal", max_pending=100_000)`). With `create=False` a missing
    file is an error (SpoolMissing) instead of a new empty spool.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, config: Config | None = None,
                 create: bool = True, **spool_settings: Any):
        config = config or Config()
        changes = {f"spool.{name}": value for name, value in spool_settings.items()}
        if path is not None:
            changes["spool.path"] = Path(path)
        self.config = config.replace(**changes) if changes else config
        self.path = self.config.db
        try:
            self.store = Store.for_config(self.config, create=create)
        except (PermissionError, StoreError) as exc:
            from spool.errors import SpoolUnusable

            if not isinstance(exc, PermissionError) and type(exc) not in (StoreError, SpoolUnusable):
                raise  # corrupt, missing, full, busy: said as they are
            from spool.sharing import cannot_write

            hint = cannot_write(self.path)  # a spool another user owns: say what this user can do instead
            if hint is None:
                raise
            raise SpoolUnusable(hint) from None

    @classmethod
    def from_config(cls, config: Config, *, create: bool = True) -> Spool:
        return cls(config=config, create=create)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producing -----------------------------------------------------------------------------------

    @property
    def t_floor(self) -> int:
        return self.config.spool.t_floor

    def count(self, stat: str, count: int | float = 1, *, t: int | None = None,
              ezkey: str | None = None) -> Record:
        """Append an EZ counter; `t` defaults to now."""
        return self.append(make_record(stat=stat, count=count, t=t, ezkey=ezkey, t_floor=self.t_floor))

    def value(self, stat: str, value: int | float, *, t: int | None = None, ezkey: str | None = None) -> Record:
        """Append an EZ value; `t` defaults to now."""
        return self.append(make_record(stat=stat, value=value, t=t, ezkey=ezkey, t_floor=self.t_floor))

    def classic_count(self, *, key: str, ukey: str, count: int | float = 1, t: int | None = None) -> Record:
        """Append a classic-API counter (stat key + user key)."""
        return self.append(make_record(key=key, ukey=ukey, count=count, t=t, t_floor=self.t_floor))

    def classic_value(self, *, key: str, ukey: str, value: int | float, t: int | None = None) -> Record:
        """Append a classic-API value (stat key + user key)."""
        return self.append(make_record(key=key, ukey=ukey, value=value, t=t, t_floor=self.t_floor))

    def append(self, record: Record) -> Record:
        """Commit one validated record."""
        self.store.append_one(record)
        return record

    def add(self, record: Mapping[str, Any]) -> Record:
        """Validate and commit one record given in the JSON-lines form."""
        return self.append(parse_record(record, t_floor=self.t_floor))

    def add_many(self, records: Iterable[Mapping[str, Any]], *, ezkey: str | None = None) -> int:
        """Validate and commit many records: all of them, or none if one is invalid (its index is named).

        `ezkey` applies to EZ records without their own. Records are consumed as a stream.
        """
        return self.store.append(record_rows(records, clock_now=now(), ezkey=ezkey, t_floor=self.t_floor))

    def append_records(self, records: Iterable[Record]) -> int:
        """Commit already-validated records in one transaction."""
        return self.store.append(records)

    def import_lines(self, stream: IO[bytes], *, ezkey: str | None = None, skip_invalid: bool = False,
                     on_progress: Callable[[int], object] | None = None) -> ImportResult:
        """Import JSON lines or a StatHat body from a binary stream, all or nothing unless `skip_invalid`.

        Every invalid line is reported (up to MAX_REPORTED): with `skip_invalid` in the result, else in the
        InvalidInput raised, and then nothing is committed. `on_progress` gets the bytes read as they are.
        """
        from spool.formats import read_json_stream, to_records
        from spool.records import check_key
        from spool.results import ImportResult

        if ezkey is not None:
            check_key(ezkey, "--ezkey")
        errors: list[InvalidRecord] = []
        more = [0]

        def collect(error: InvalidRecord) -> None:
            if len(errors) < MAX_REPORTED:
                errors.append(error)
            else:
                more[0] += 1

        source = cast(IO[bytes], _Counting(stream, on_progress)) if on_progress else stream
        records = to_records(read_json_stream(source), ezkey=ezkey, clock_now=now(), t_floor=self.t_floor,
                             on_invalid=collect)

        def checked() -> Iterator[Any]:
            yield from records
            if errors and not skip_invalid:
                raise InvalidInput(errors, more[0])  # inside the append: nothing from it commits

        return ImportResult(self.store.append(checked()), tuple(errors))

    def ingest(self, path: str | os.PathLike[str], *, skip_invalid: bool = False, keep: bool = False) -> Any:
        """Ingest one record file exactly as a watched directory does; return its IngestResult.

        The file moves to .done/ (or .rejected/) beside it, unless `keep`; a file still being written, or
        appended to while it was moved, is read again until it settles (a few tries).
        """
        from spool.errors import IngestRefused
        from spool.watch import DONE, REJECTED, DirectoryLock, Ingestor

        target = Path(path)
        if target.parent.name in (DONE, REJECTED):
            raise IngestRefused(f"{target} is in a {target.parent.name}/ folder, where spool put it after taking "
                                "(or refusing) it; to take it again on purpose, copy it under a new name")
        ingestor = Ingestor(self.store, skip_invalid=skip_invalid, t_floor=self.t_floor)
        lock = DirectoryLock(target.parent).acquire(
            busy="is watched by a running spool (spool run or spool watch): it takes the files there itself")
        try:
            for attempt in range(5):
                result = ingestor.ingest(target, move=not keep)
                settled = keep or result.moved_to is not None or result.unmoved is not None or not target.exists()
                if result.outcome != "changing" and (settled or result.outcome in ("rejected", "failed")):
                    break
                time.sleep(0.2 * (attempt + 1))
        finally:
            lock.release()
        return result

    # -- shipping ---------------------------------------------------------------------------------------

    def ship_once(self, *, max_time: float | None = 300.0, on_progress: Callable[[int], object] | None = None,
                  shutdown: threading.Event | None = None, **ship_settings: Any) -> ShipResult:
        """Deliver what is pending now, then return: done, or why not (after `max_time` seconds at most).

        Held records are re-stamped first (if the clock is sane), and records older than max_age dropped (counted
        as dropped_age, as the agent does). A misconfiguration that waiting cannot fix
        (a 404, TLS against plain http, a host that does not resolve) ends it at once. `[ship]` settings can be
        given as keywords (`endpoint=`, `ezkey_file=`, `batch_size=`, ...). Setting `shutdown` stops it early: the
        answers in flight are awaited (up to ship.stop_wait), and what is left stays pending.
        """
        from spool.health import keyless_look
        from spool.results import ShipResult
        from spool.ship import Shipper

        config = self.config.replace(**{f"ship.{name}": value for name, value in ship_settings.items()})
        unplaceable = self.store.counters().get("restamp_refused", 0)
        with Shipper(self.store, config, shutdown=shutdown) as shipper:
            result = shipper.drain(max_time=max_time, fail_fast=True, on_progress=on_progress)
            stats = shipper.snapshot()
        counts = self.store.counts()
        # Held records whose time could not be placed became dead letters too, as the refused ones did.
        dead = stats["dead"] + self.store.counters().get("restamp_refused", 0) - unplaceable
        # Records without a key of their own are a reason only when none is configured (an unusable one is its own).
        keyless, more = (0, False) if config.ship.keyed else keyless_look(self.store, counts["pending"])
        return ShipResult(result.done, stats["sent"], dead, counts["pending"], keyless, result.reason,
                          stats["expired"], held=counts["held"], operator=result.operator, keyless_more=more)

    def backlog(self) -> int:
        """Return how many records wait to be shipped (not in flight)."""
        return self.store.backlog()[0]

    # -- moving backlog ----------------------------------------------------------------------------------

    def export(self, target: str | os.PathLike[str] | IO[str], *, state: str = "pending", since: int | None = None,
               until: int | None = None, remove: bool = False, append: bool = False,
               on_progress: Callable[[int], object] | None = None) -> ExportResult:
        """Write records as JSON lines that `import_lines` reads back unchanged.

        `target` is a path (created 0600; an existing file is refused unless `append`) or a text stream. With
        `remove` the records move: each chunk is written, fsynced and deleted here in one transaction (a path
        only). Records in flight are left out, and so are held records (their time is not known yet).
        """
        import json

        from spool.durable import open_private
        from spool.results import ExportResult

        _check_window(since, until)
        if remove and not isinstance(target, str | os.PathLike):
            raise SpoolError("export --remove needs a file: records must be on disk before they leave the spool")
        held = self.store.counts()["held"] if state == "all" else 0

        def lines(records: Iterable[Record]) -> str:
            return "".join(json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records)

        if not isinstance(target, str | os.PathLike):
            n = 0
            for _, record in self.store.export(state, since=since, until=until):
                target.write(lines([record]))
                n += 1
                if on_progress and n % 1000 == 0:
                    on_progress(1000)
            return ExportResult(n, held, False)
        try:
            fd = open_private(Path(target), append=append)
        except FileExistsError:
            raise SpoolError(f"{target} exists; give another name, or --append to add to it") from None
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            def write(records: list[Record]) -> None:
                out.write(lines(records))
                out.flush()
                os.fsync(out.fileno())  # on disk before this chunk is deleted from the spool
                if on_progress:
                    on_progress(len(records))

            if remove:
                n = self.store.move_out(state, write, since=since, until=until)
            else:
                chunk: list[Record] = []
                n = 0
                for _, record in self.store.export(state, since=since, until=until):
                    chunk.append(record)
                    if len(chunk) == 10_000:
                        write(chunk)
                        n += len(chunk)
                        chunk = []
                write(chunk)
                n += len(chunk)
        return ExportResult(n, held, remove)

    def count_selected(self, state: str, *, since: int | None = None, until: int | None = None,
                       stat: str | None = None) -> int:
        """Return how many records a state and time window select (what export or replay would take)."""
        _check_window(since, until)
        return self.store.count_selected(state, since=since, until=until, stat_glob=stat)

    def replay(self, *, since: int, until: int | None = None, stat: str | None = None, dry_run: bool = False) -> int:
        """Queue pending copies of retained sent records (StatHat counts them again); return how many."""
        _check_window(since, until)
        if dry_run:
            return self.store.count_selected("sent", since=since, until=until, stat_glob=stat)
        return self.store.replay(since=since, until=until, stat_glob=stat)

    # -- dead letters ------------------------------------------------------------------------------------

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """Return records the receiver refused, oldest first, with its reason, HTTP status and body."""
        from spool.results import DeadLetter

        return [DeadLetter(**row) for row in self.store.dead_letters(limit)]

    def requeue(self, ids: Sequence[int] | None = None) -> Settled:
        """Return dead records (all when `ids` is None) to pending; name the ids that are not dead letters."""
        from spool.results import Settled

        return Settled(*self.store.requeue_dead(ids))

    def purge(self, ids: Sequence[int] | None = None) -> Settled:
        """Delete dead records (all when `ids` is None); name the ids that are not dead letters."""
        from spool.results import Settled

        return Settled(*self.store.purge_dead(ids))

    # -- what operators see ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Return counts per state, the backlog's age, size on disk, the endpoint, the last shipping attempt, and
        the health verdict (spool.health) with every current problem; past events are `notes`."""
        from spool.errors import redact_url
        from spool.health import assess, notes, read_facts
        from spool.lock import ShipLock

        facts = read_facts(self.store, self.config)
        health = assess(facts)
        counts = self.store.counts(staged=True)  # staged: records of appends not yet whole, pending once they are
        oldest = self.store.oldest_pending_t()
        meta = self.store.meta()
        try:
            shipper = ShipLock(self.path).holder()
        except OSError:  # a lock file this user cannot read: a shipper may run, its pid is not ours to know
            shipper = -1
        counters = self.store.counters()
        return {
            **counts,
            "oldest_pending_t": oldest,
            "oldest_pending_age": None if oldest is None else max(0, int(facts.now) - oldest),
            "size_bytes": self.store.size_bytes(),
            "path": str(self.path),
            "config": self.config.source,
            "path_from": self.config.db_source,
            "endpoint": redact_url(self.config.ship.endpoint),
            "shipper_pid": shipper,
            "last_attempt_at": meta.get("last_attempt_at"),
            "last_result": meta.get("last_result"),
            "last_error": meta.get("last_error"),
            "last_success_at": meta.get("last_success_at"),
            "pacing": meta.get("pacing") if shipper else None,  # the running shipper's pace, and why
            "counters": counters,
            "integrity": self.store.integrity() or None,  # the last full check (spool.checkup), None if never
            "health": health.to_dict(),
            "problems": health.texts,
            "notes": notes(counters),
        }


def check_setup(config_file: str | None, *, flags: Mapping[str, Any] | None = None,
                clock: Callable[[], float] = time.time, deep: bool = False, recount: bool = False) -> list[Any]:
    """Check the whole setup (`spool doctor`): one Verdict per part, every check run even if the config is broken.

    `deep`: also run SQLite's full integrity check of the spool (it reads the whole file) and record its verdict,
    and count every record to compare with the kept counts; `recount` then sets those that differ.
    """
    from spool import config as configuration
    from spool.doctor import checks

    flags = dict(flags or {})

    def fallback() -> Config:
        db = flags.get("spool.path") or os.environ.get("SPOOL_DB")
        path = Path(db).expanduser() if db else configuration.default_db_path()
        return Config().replace(**{"spool.path": path})

    return list(checks(lambda: configuration.load(config_file, **flags), fallback=fallback, clock=clock, deep=deep,
                       recount=recount))


def parse_when(text: str, name: str = "time") -> int:
    """Read a time given as unix seconds or as an ISO 8601 date/time (UTC unless it says otherwise)."""
    import datetime

    from spool.clock import unix_seconds
    from spool.errors import ConfigError
    from spool.records import T_LOOKS_LIKE_MS

    digits = text.strip().removeprefix("-")
    if digits.isascii() and digits.isdigit() and len(digits) < 100:  # isdigit() alone takes "²" and "١٧٠٠"
        seconds = int(text)
        if seconds >= T_LOOKS_LIKE_MS:
            raise ConfigError(f"{name} {seconds} looks like milliseconds; give unix seconds "
                              f"(did you mean {seconds // 1000}?)")
        return seconds
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"{name} '{text}' is neither unix seconds nor an ISO date like 2026-11-20T08:00 "
                          "(UTC unless it names a zone)") from None
    return unix_seconds(when)  # arithmetic: a date past 2038 needs no 64-bit time_t


def _check_window(since: int | None, until: int | None) -> None:
    if since is not None and until is not None and until < since:
        raise ConfigError(f"--until ({until}) is before --since ({since}): the window selects nothing")


class _Counting(io.RawIOBase):
    """A binary stream that reports how many bytes were read through it (for a progress bar)."""

    def __init__(self, stream: IO[bytes], update: Callable[[int], object]):
        self._stream = stream
        self._update = update

    def readable(self) -> bool:
        return True

    def readline(self, size: int | None = -1) -> bytes:
        line = self._stream.readline(-1 if size is None else size)
        self._update(len(line))
        return line

    def read(self, size: int | None = -1) -> bytes:
        data = self._stream.read(-1 if size is None else size)
        self._update(len(data))
        return data
