"""What Spool's operator methods return: imports, shipping once, exports, dead letters, requeues and purges.

A module of its own, imported by those methods when they return: building these classes costs more than the
rest of spool.api, and appending a record (`spool add` is a process per stat) never needs them. They are still
importable from spool.api.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from spool.errors import InvalidRecord
    from spool.records import Record


class ImportResult(NamedTuple):
    taken: int
    invalid: tuple[InvalidRecord, ...] = ()  # skipped (with skip_invalid), at most spool.api.MAX_REPORTED


class ShipResult(NamedTuple):
    done: bool  # nothing deliverable is left
    sent: int
    dead: int  # records the receiver refused in this run (dead letters now)
    pending: int  # left when it stopped
    keyless: int  # pending records that carry no key while none is configured (they wait)
    reason: str | None  # why not done
    expired: int = 0  # pending records dropped because their t was older than spool.max_age
    held: int = 0  # records left held: stamped while the clock was wrong, and it still is
    operator: bool = False  # it stopped on what only an operator can fix: the configured key, the endpoint
    keyless_more: bool = False  # `keyless` is of the oldest pending records only: there may be more

    @property
    def outcome(self) -> str:
        """"delivered": nothing this run could deliver is left; "link": records remain because the receiver
        could not be reached or kept failing (a later run will deliver them); "operator": records remain, or
        were refused, for a reason only an operator can fix (no key, a key unreadable or refused, the clock, an
        endpoint that cannot work, records the receiver refused)."""
        if self.operator or self.keyless or self.held or self.dead:
            return "operator"
        return "delivered" if self.done else "link"


class ExportResult(NamedTuple):
    exported: int
    held_left: int  # held records left in the spool (their time is not known yet)
    removed: bool


class DeadLetter(NamedTuple):
    id: int
    record: Record
    dead_at: float | None
    reason: str | None
    http_status: int | None
    body: str | None


class Settled(NamedTuple):
    """What a requeue or purge did: how many records, and which ids it was given that are not dead letters."""

    records: int
    missing: tuple[int, ...] = ()
    unknown_time: tuple[int, ...] = ()  # requeue: dead letters stamped while the clock was wrong, kept dead
