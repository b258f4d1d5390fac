"""The clocks spool reads: this boot's id and the monotonic clock held records keep.

Linux facts are read from /proc; elsewhere the functions degrade to answers that are safe (an unknown boot
never matches). Whether the owner of a stage or a lease lives is not told by pids and start times (they name
nothing across PID namespaces, containers and emulators) but by a lock: see spool.owners.
"""

from __future__ import annotations

import time

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
