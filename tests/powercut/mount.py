"""Run lazyfs in a subprocess over a backing directory: mount, cut, unmount, and never leave a mount behind."""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0


def fsync_dir(path: Path) -> None:
    """Make a directory's entries durable, as a careful producer does. The tests' own copy, kept apart from
    spool.durable's on purpose: what they set up must not depend on the code they check."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MountError(RuntimeError):
    """lazyfs could not be mounted; the message says why (its stderr)."""


class LazyMount:
    """One lazyfs process serving `mountpoint` from `backing`; a context manager that always unmounts."""

    def __init__(self, backing: Path, mountpoint: Path, *extra_args: str):
        self.backing, self.mountpoint, self.extra_args = Path(backing), Path(mountpoint), extra_args
        self.log = self.mountpoint.parent / f"{self.mountpoint.name}.lazyfs.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.was_cut = False

    def __enter__(self) -> LazyMount:
        self.mount()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.unmount()

    def mount(self) -> None:
        """Start lazyfs and return once the mount serves requests."""
        assert self.proc is None, "already mounted"
        self.was_cut = False
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut.lazyfs", str(self.backing), str(self.mountpoint),
                 *self.extra_args], stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env)
        if self._wait_for_line("ready") and is_mounted(self.mountpoint):
            return
        self.unmount()
        raise MountError(f"lazyfs did not mount {self.mountpoint}: {self.errors() or 'no error given'}")

    def cut(self) -> None:
        """Lose everything not yet durable, as a power cut does; the mount answers EIO until unmounted."""
        assert self.proc is not None and self.proc.poll() is None, "lazyfs is not running"
        self.proc.send_signal(signal.SIGUSR1)
        self.was_cut = True
        if not self._wait_for_line("cut"):
            raise MountError(f"lazyfs did not confirm the cut: {self.errors()}")

    def unmount(self) -> None:
        """Unmount and stop lazyfs; safe to call at any point, twice too.

        Without a cut this is an orderly shutdown: everything pending becomes durable. While processes still
        hold files on the mount it is detached lazily; after a cut lazyfs is killed at once (they see
        ENOTCONN), otherwise it is given 10 s for them to close their files, then killed (losing, as a cut
        does, what was still pending).
        """
        if self.proc is None:
            self._detach()  # a mount left by an earlier, killed run
            return
        proc, self.proc = self.proc, None
        busy = (proc.poll() is None and is_mounted(self.mountpoint)
                and subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True).returncode)
        if busy:  # files still open on it
            if self.was_cut:
                proc.kill()  # nothing is left to save; processes still on the mount now see ENOTCONN
            else:
                self._abort_connection()  # the daemon ends and syncs; without fusectl, it waits for the last close
            self._detach()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()  # the kernel ends the connection when the daemon's /dev/fuse closes
            proc.wait()
        finally:
            if proc.stdout:
                proc.stdout.close()
        self._detach()

    def errors(self) -> str:
        """Return what lazyfs wrote to stderr, less libfuse's harmless notice about thread counts."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(line for line in text.splitlines() if "max threads" not in line).strip()

    def _wait_for_line(self, expected: str) -> bool:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + READY_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                break
            line = self.proc.stdout.readline()
            if not line:  # the process ended
                return False
            if line.decode().strip() == expected:
                return True
        return False

    def _abort_connection(self) -> None:
        """Fail every request still waiting on this mount, so a hung reader cannot hold it."""
        device = mount_device(self.mountpoint)  # from the mount table: stat would fail on a cut mount
        if device is None:
            return
        try:
            Path("/sys/fs/fuse/connections", str(os.minor(device)), "abort").write_text("1")
        except OSError:
            pass  # no fusectl here: the kill and lazy unmount that follow still end it

    def _detach(self) -> None:
        """Lazily unmount whatever is still mounted here (processes with open files keep them, and see errors)."""
        for _ in range(3):
            if not is_mounted(self.mountpoint):
                return
            if shutil.which("fusermount3"):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
            if is_mounted(self.mountpoint):
                subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


def mount_device(path: Path) -> int | None:
    """Return the device number of the mount at a path, by the kernel's table (None when nothing is mounted)."""
    where = os.path.realpath(path)
    with open("/proc/self/mountinfo") as table:
        for line in table:
            fields = line.split(" ")
            point = fields[4]
            for escaped, plain in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(escaped, plain)
            if point == where:
                major, minor = fields[2].split(":")
                return os.makedev(int(major), int(minor))
    return None


def is_mounted(path: Path) -> bool:
    """Say whether a path is a mount point (a FUSE mount whose daemon died counts)."""
    return mount_device(path) is not None


def power_back(lazyfs: Callable[[], LazyMount], device: int) -> LazyMount:
    """Mount the disk again after a cut, as the same device: a disk keeps its device number across a reboot.

    The kernel frees a FUSE mount's device number a moment after the mount is gone, and gives a new mount the
    lowest free one, so a new mount may get another one at first: spool knows drop files by device and inode.
    Once a lower number is free for good (the trial beside this one ended), every try would get that one, so
    lower numbers are held meanwhile by placeholder mounts (tmpfs; as root) and tries are spaced at random.
    """
    deadline = time.monotonic() + 60
    spacing = random.Random()
    held: list[Path] = []
    try:
        while True:
            fs = lazyfs()
            got = os.stat(fs.mountpoint).st_dev
            if got == device:
                return fs
            assert time.monotonic() < deadline, f"the disk never came back as device {device}"
            fs.unmount()
            if got < device:
                placeholder = _hold_a_device_number(fs.mountpoint.parent / f"held-{len(held)}", device)
                if placeholder is not None:
                    held.append(placeholder)
            time.sleep(spacing.uniform(0.02, 0.3))
    finally:
        for placeholder in held:
            subprocess.run(["umount", str(placeholder)], capture_output=True)


def _hold_a_device_number(where: Path, device: int) -> Path | None:
    """Mount a tmpfs at `where` if it takes a device number below `device`; return it (None: nothing held)."""
    if os.geteuid() != 0:
        return None
    where.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "held", str(where)], capture_output=True).returncode:
        return None
    if os.stat(where).st_dev < device:
        return where
    subprocess.run(["umount", str(where)], capture_output=True)  # it took ours, or one above: not wanted
    return None
