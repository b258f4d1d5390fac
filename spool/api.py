"""The producer and operator API: `Spool`. Every append returns only after its records are committed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spool.config import Config, Limits, default_db_path
from spool.lock import ShipLock
from spool.records import T_FLOOR, Record, make_record, now, parse_record, record_rows
from spool.store import Store


class Spool:
    """A durable spool of StatHat records in one SQLite file.

        with Spool("/var/lib/spool/spool.db") as sp:
            sp.count("messages sent~total,female", 1)
            sp.value("ws0 load average", 0.73, t=1363118126, ezkey="...")
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, synchronous: str = "full",
                 t_floor: int = T_FLOOR, limits: Limits | None = None):
        self.path = Path(path) if path is not None else default_db_path()
        self.t_floor = t_floor
        self.store = Store(self.path, synchronous=synchronous, limits=limits)

    @classmethod
    def from_config(cls, config: Config) -> Spool:
        return cls(config.db, synchronous=config.synchronous, t_floor=config.t_floor, limits=config.limits)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- producing -----------------------------------------------------------------------------------

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
        """Validate and commit many records in one transaction: all of them, or none if one is invalid.

        `ezkey` applies to EZ records without their own. Records are consumed as a stream.
        """
        return self.store.append(record_rows(records, clock_now=now(), ezkey=ezkey, t_floor=self.t_floor))

    def append_records(self, records: Iterable[Record]) -> int:
        """Commit already-validated records in one transaction."""
        return self.store.append(records)

    # -- operating ------------------------------------------------------------------------------------

    def status(self, config: Config | None = None) -> dict[str, Any]:
        """Return counts per state, the backlog's age, size on disk, the last shipping attempt, and problems."""
        counts = self.store.counts()
        oldest = self.store.oldest_pending_t()
        meta = self.store.meta()
        shipper = ShipLock(self.path).holder()
        status: dict[str, Any] = {
            **counts,
            "oldest_pending_t": oldest,
            "oldest_pending_age": None if oldest is None else max(0, int(time.time()) - oldest),
            "size_bytes": self.store.size_bytes(),
            "path": str(self.path),
            "shipper_pid": shipper,
            "last_attempt_at": meta.get("last_attempt_at"),
            "last_result": meta.get("last_result"),
            "last_error": meta.get("last_error"),
            "last_success_at": meta.get("last_success_at"),
            "counters": self.store.counters(),
        }
        status["problems"] = self._problems(status, config)
        return status

    def _problems(self, status: Mapping[str, Any], config: Config | None) -> list[str]:
        problems = []
        if status["pending"] and config is not None and config.ezkey is None:
            keyless = self.store.keyless_pending()
            if keyless:
                problems.append(f"{keyless} pending records have no ezkey and none is configured "
                                "(set SPOOL_EZKEY, ship.ezkey or ship.ezkey_file)")
        if status["last_result"] == "paused":
            problems.append(f"shipping is paused: {status['last_error']}")
        elif status["last_result"] == "retrying":
            problems.append(f"the receiver is failing; retrying: {status['last_error']}")
        if status["inflight"] and status["shipper_pid"] is None:
            problems.append(f"{status['inflight']} records were leased by a shipper that is no longer "
                            "running; they return to pending when a shipper starts")
        if status["pending"] and status["shipper_pid"] is None:
            problems.append("no shipper is running (start `spool run` or `spool ship`)")
        if status["dead"]:
            problems.append(f"{status['dead']} records were refused by the receiver (see `spool dead list`)")
        if status["held"]:
            problems.append(f"{status['held']} records were stamped while the system clock was wrong; they are "
                            "held and get their real time once the clock is right (start NTP)")
        counters = status["counters"]
        for name, what in (("dropped_oldest", "dropped (oldest first) because the spool was at its limit"),
                           ("dropped_age", "dropped because their t was older than max_age"),
                           ("refused_full", "appends refused because the spool was full"),
                           ("corrupt_quarantined", "corrupt spool files moved aside")):
            if counters.get(name):
                problems.append(f"{counters[name]} {what}")
        return problems

    def dead(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Return dead-lettered records with the receiver's reason, HTTP status and body."""
        return self.store.dead(limit)

    def requeue_dead(self, ids: Sequence[int] | None = None) -> int:
        """Return dead records (all when `ids` is None) to pending."""
        return self.store.requeue_dead(ids)

    def purge_dead(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead records (all when `ids` is None)."""
        return self.store.purge_dead(ids)
