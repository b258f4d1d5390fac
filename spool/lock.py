"""The shipper lock: one shipper per spool file, the kernel drops the lock when its holder dies."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from spool.errors import SpoolBusy
from spool.sharing import open_new

ACQUIRE_PATIENCE = 2.0  # seconds a starting shipper waits out a status reader's brief shared lock


IDENTITY_HEADER = "Spool-Identity"  # carries spool_identity(): on the relay's answers, and on the shipper's requests


def spool_identity(spool_path: str | os.PathLike[str]) -> str | None:
    """A name for one spool file on this box in this boot, or None if there is no such file.

    Every path to the file (and a container sharing its volume) gives the same name; another file, or another
    box, gives another. The relay puts it on its answers and the shipper on its requests, so a listener is
    known for this spool's own (doctor) and a shipper sending to its own spool's relay is stopped (a loop). A
    digest: it tells nothing of the path.
    """
    import hashlib

    from spool.clock import boot_id

    try:
        info = os.stat(spool_path)
    except OSError:
        return None
    return hashlib.sha256(f"{boot_id()}:{info.st_dev}:{info.st_ino}".encode()).hexdigest()[:16]


def lock_path(spool_path: str | os.PathLike[str]) -> Path:
    """Return the lock file of a spool, named after the real file so every path to it shares one lock."""
    return Path(f"{os.path.realpath(spool_path)}.ship.lock")


class ShipLock:
    """An exclusive flock on SPOOL.ship.lock, held by the one process that ships the spool."""

    def __init__(self, spool_path: str | os.PathLike[str]):
        self.path = lock_path(spool_path)
        self._fd: int | None = None

    def acquire(self, *, patience: float = ACQUIRE_PATIENCE) -> ShipLock:
        """Take the lock or raise SpoolBusy naming the holder's pid."""
        fd = open_new(self.path, os.O_RDWR)  # readable by the group of a shared spool: `spool status` reads it
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                # A live pid in the file: a shipper holds it. Otherwise it is most likely `spool status`
                # peeking with a shared lock for an instant (or a shipper that is just starting): wait a little.
                if (holder.isdigit() and _pid_exists(int(holder))) or time.monotonic() >= deadline:
                    os.close(fd)
                    raise SpoolBusy(f"another shipper (pid {holder or 'unknown'}) is already draining "
                                    "this spool") from None
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def holder(self) -> int | None:
        """Return the pid of the shipper holding the lock (-1 if unknown), or None when none is running."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)  # also drops the shared lock, if we got it
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # no pid in the file: the lock is free (readers need not wait)
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> ShipLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True
