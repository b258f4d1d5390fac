"""The clocks spool reads: this boot's id, the monotonic clock held records keep, and process identity.

Linux facts are read from /proc; elsewhere the functions degrade to answers that are safe (an unknown boot
never matches, a process that cannot be checked is taken to be alive).
"""

from __future__ import annotations

import os
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


def _start_time(pid: int) -> str | None:
    """Return a running process's start time in clock ticks since boot (/proc/PID/stat field 22), or None.

    None also for a zombie: it has exited, whatever its parent has not yet collected.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces or ')': split after the last ')'.
    fields = text[text.rfind(b")") + 2:].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def process_identity(pid: int | None = None) -> str:
    """Return "BOOT:PID:START", naming one process in one boot (pids are reused; start times are not)."""
    pid = os.getpid() if pid is None else pid
    return f"{boot_id()}:{pid}:{_start_time(pid) or '?'}"


def is_alive(identity: str | None) -> bool:
    """Whether the process an identity names still runs. None (an owner not recorded) counts as dead.

    A different boot, a missing process or one with another start time is dead: proven. Where /proc cannot
    tell (not Linux), a process whose pid exists is taken to be alive, the side that never duplicates.
    """
    if not identity:
        return False
    boot, _, rest = identity.partition(":")
    pid_text, _, start = rest.partition(":")
    if not pid_text.isdigit():
        return False
    if boot != "unknown" and boot != boot_id():
        return False
    pid = int(pid_text)
    if os.path.isdir("/proc/self"):
        started = _start_time(pid)
        return started is not None and start in ("?", started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
