"""Speaking to systemd: sd_notify(3) over $NOTIFY_SOCKET, in a few lines of our own (no libsystemd).

READY=1 once the agent serves, RELOADING=1 (with MONOTONIC_USEC) while a SIGHUP is applied, STOPPING=1 at
shutdown, WATCHDOG=1 every half of $WATCHDOG_USEC while the agent is healthy. Outside systemd every call
does nothing.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send states ("READY=1", ...) to systemd; return whether there was a socket to send them to."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address  # '@': the abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(states).encode(), target)
    except OSError:
        return False  # systemd gone (or a stale variable): nothing to tell
    return True


def reloading() -> None:
    """Tell systemd a reload started (Type=notify-reload wants the monotonic time with it)."""
    notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd asks for (half its WatchdogSec), or None when it asks none."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
