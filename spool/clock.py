"""The clocks spool reads (this boot's id, the monotonic clock held records keep), and its one calendar.

Linux facts are read from /proc; elsewhere the functions degrade to answers that are safe (an unknown boot
never matches). Whether the owner of a stage or a lease lives is not told by pids and start times (they name
nothing across PID namespaces, containers and emulators) but by a lock: see spool.owners.

Every conversion between unix seconds and a date is here, and is datetime arithmetic from the epoch: never the
C library's calendar (time.gmtime, strftime of a time, fromtimestamp, a naive datetime's timestamp()), which
goes through the platform's time_t, and that is 32 bits on armhf: it raises past 2038-01-19, while spool takes
any `t` up to 2100 (tests/test_time_range.py keeps such calls out of the package).
"""

from __future__ import annotations

import datetime
import time

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
ONE_SECOND = datetime.timedelta(seconds=1)

_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """Return this boot's id, so held records are re-stamped only with the clock they were taken by."""
    try:
        with open(_BOOT_ID) as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def boot_clock() -> float:
    """Return seconds since boot, suspend included: the clock held records keep."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def utc(t: float) -> datetime.datetime:
    """Return unix seconds as a UTC datetime, whatever the platform's time_t."""
    return EPOCH + datetime.timedelta(seconds=t)


def utc_text(t: float, form: str = "%Y-%m-%d %H:%M:%S UTC") -> str:
    """Format unix seconds in UTC: the one time format of every command's output, unless `form` says another."""
    return utc(t).strftime(form)  # a datetime's strftime formats its fields: no time_t in the way


def unix_seconds(when: datetime.datetime) -> int:
    """Return a datetime as whole unix seconds (rounded down); one that names no zone is UTC."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return (when - EPOCH) // ONE_SECOND
