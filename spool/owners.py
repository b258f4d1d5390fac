"""Owners the kernel ends: a stage or a lease belongs to a Store only while it holds a lock.

A Store that stages an append or leases records first takes an exclusive flock on a file of its own,
SPOOL.owners/TOKEN (TOKEN: 64 random bits), and names itself "lock:TOKEN" in the spool. The kernel drops the
lock when the last descriptor of that open file closes, however the process ends (exit, SIGKILL, the OOM
killer). flock belongs to the open file, not to a pid: it holds across PID namespaces, containers sharing
the spool's volume and emulators (qemu-user hands flock to the host kernel), where a pid and a start time
name nothing (the pid is another namespace's; qemu-user fakes the start time a process reads of itself).

An owner is alive while its lock cannot be taken. Whoever takes it has proven the owner dead and removes
its file; a missing file is a dead owner too (the file exists, locked, before the name is written anywhere).

Owners written by schema 6 and earlier are "BOOT:PID:START". Those cannot be checked (the pid may be another
namespace's, the start time an emulator's), so they count as alive until their boot is over: a stage of
theirs stays hidden until the next boot rather than being discarded under a running import, and a lease
of theirs is freed as one that names no owner (by the shipper holding the ship lock, or after the timeout).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from spool.clock import boot_id
from spool.errors import StoreError
from spool.sharing import make_directory, open_new

PREFIX = "lock:"
_HEX = frozenset("0123456789abcdef")


def _is_token(name: str) -> bool:
    """Whether a name is a token (16 lowercase hex digits): never a path, nor a name a token cannot be."""
    return len(name) == 16 and _HEX.issuperset(name)


def owners_directory(spool_path: str | os.PathLike[str]) -> Path:
    """Return the directory of a spool's owner locks, named after the real file so every path to it shares it."""
    return Path(f"{os.path.realpath(spool_path)}.owners")


def is_legacy(owner: str | None) -> bool:
    """Whether an owner was named by boot, pid and process start (schema 6 and earlier): it cannot be checked."""
    return owner is not None and not owner.startswith(PREFIX)


def legacy_alive(owner: str) -> bool:
    """Whether a "BOOT:PID:START" owner may still run: until its boot is over (its pid proves nothing)."""
    boot = owner.partition(":")[0]
    return boot in ("unknown", boot_id())


class Owners:
    """One Store's claim on a spool (taken when first needed), and the proof of other owners' deaths."""

    def __init__(self, spool_path: str | os.PathLike[str]):
        self._spool = spool_path
        self._directory: Path | None = None
        self._fd: int | None = None
        self.name: str | None = None  # "lock:TOKEN" while the lock is held

    @property
    def directory(self) -> Path:
        if self._directory is None:  # resolved when first needed: `spool add` never stages nor leases
            self._directory = owners_directory(self._spool)
        return self._directory

    def claim(self) -> str:
        """Return this Store's owner name, taking its lock first if it does not hold it yet."""
        if self.name is not None:
            return self.name
        try:
            make_directory(self.directory)  # 0700, or 2770 beside a shared spool (spool.sharing)
            while True:
                token = os.urandom(8).hex()
                path = self.directory / token
                fd = open_new(path, os.O_RDWR | os.O_EXCL)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    # A sweep may have found the file between its creation and the lock, taken it for a dead
                    # owner's and removed it: a lock on a file no longer in the directory proves nothing.
                    linked = os.fstat(fd).st_nlink > 0
                except BlockingIOError:
                    linked = False  # that sweep holds it now, and removes it
                except BaseException:
                    os.close(fd)
                    raise
                if linked:
                    break
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot take an owner's lock in {self.directory}: {exc.strerror} (its directory "
                             "must be writable, as the spool's is)") from None
        self._fd, self.name = fd, f"{PREFIX}{token}"
        return self.name

    def release(self) -> None:
        """Give up the claim: whatever this Store still owns in the spool is a dead owner's from now on."""
        if self._fd is None or self.name is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.directory / self.name[len(PREFIX):])
        os.close(self._fd)  # drops the lock
        self._fd = self.name = None

    def is_alive(self, owner: str | None) -> bool:
        """Whether an owner named in the spool may still use what it owns. None (no owner recorded) is dead."""
        if owner is None:
            return False
        if owner == self.name:
            return True
        if is_legacy(owner):
            return legacy_alive(owner)
        token = owner[len(PREFIX):]
        if not _is_token(token):
            return False  # no process can hold a lock under such a name
        return not self._take(token)

    def sweep(self) -> int:
        """Remove the lock files of owners that died (the spool may name them no more); return how many."""
        try:
            names = [entry.name for entry in os.scandir(self.directory)]
        except OSError:
            return 0
        return sum(self._take(name) for name in names
                   if _is_token(name) and self.name != f"{PREFIX}{name}")

    def _take(self, token: str) -> bool:
        """Take a dead owner's lock and remove its file: True if it is dead (proven now, or gone already)."""
        path = self.directory / token
        try:
            fd = os.open(path, os.O_RDWR)  # for writing: flock over NFS is a POSIX write lock
        except FileNotFoundError:
            return True  # its file is made and locked before its name is written: removed by a proof of death
        except OSError:
            return False  # cannot tell: alive, the side that never loses a record
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: its owner lives
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while holding the lock: no owner can be claiming it
            return True
        finally:
            os.close(fd)
