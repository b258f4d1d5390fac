"""A FUSE file system that keeps unsynced writes in memory and can lose them on command (a simulated power cut).

    python -m tests.powercut.lazyfs BACKING MOUNTPOINT    # serve until unmounted
    kill -USR1 PID                                        # cut: drop what is pending, then EIO for everything
    fusermount3 -u MOUNTPOINT                             # unmount (-uz when processes still hold files)

It prints "ready" once mounted and "cut" once a cut is done, one line each on stdout. An orderly unmount
(no cut) makes everything durable, as a clean shutdown does. The durability rules are in disk.py.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import mfusepy

from .disk import Disk, FsError, Inode

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("lazyfs")
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2  # special tv_nsec values of utimensat(2)


def guarded(method: F) -> F:
    """Run a FUSE operation under the file system's lock; after a cut every operation fails with EIO."""

    @functools.wraps(method)
    def run(self: LazyFS, *args: Any, **kwargs: Any) -> Any:
        with self._mutex:
            if self.cut_done:
                raise mfusepy.FuseOSError(errno.EIO)
            try:
                return method(self, *args, **kwargs)
            except FsError as e:
                raise mfusepy.FuseOSError(e.errno) from None
            except Exception:  # a bug here, or the backing directory failing: say so loudly, fail the call
                log.exception("lazyfs: %s failed", method.__name__)
                raise mfusepy.FuseOSError(errno.EIO) from None

    return run  # type: ignore[return-value]


class Handle:
    """An open file or directory: the inode (which outlives its name) and the open flags."""

    def __init__(self, node: Inode, flags: int):
        self.node, self.flags = node, flags


class LazyFS(mfusepy.Operations):
    """The FUSE operations: the logical view of a Disk, whose durable state is the backing directory."""

    use_ns = True
    # Operations on open files get their handle, never a path: the inode, not the name, is what they act on.
    flag_nullpath_ok = True
    flag_nopath = True

    def __init__(self, disk: Disk):
        self.disk = disk
        self._mutex = threading.RLock()
        self.cut_done = False
        self.handles: dict[int, Handle] = {}
        self._next_handle = 1

    # -- power ---------------------------------------------------------------------------------------------

    def cut(self) -> None:
        """Lose everything pending, as a power cut does; from now on every operation fails with EIO."""
        with self._mutex:
            self.cut_done = True
            self.disk.discard()
            self.handles.clear()

    def init(self, path: str) -> None:
        announce("ready")

    def destroy(self, path: str) -> None:
        with self._mutex:
            if not self.cut_done:
                self.disk.sync_all()
                self.disk.discard()  # closes the backing files

    # -- handles ---------------------------------------------------------------------------------------------

    def _open_handle(self, node: Inode, flags: int) -> int:
        number = self._next_handle
        self._next_handle += 1
        self.handles[number] = Handle(node, flags)
        self.disk.opened(node)
        return number

    def _handle(self, fi: Any) -> Handle:
        number = fi if isinstance(fi, int) else fi.fh
        try:
            return self.handles[number]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def _node(self, path: str | None, fi: Any = None) -> Inode:
        if fi is not None:
            return self._handle(fi).node
        if path is None:
            raise FsError(errno.EBADF)
        return self.disk.lookup(path)

    # -- attributes ------------------------------------------------------------------------------------------

    @guarded
    def getattr(self, path: str | None, fh: Any = None) -> dict[str, int]:
        return self._node(path, fh).attrs()

    # Attributes other than the size are kept in the cache only (a new file is created with its mode).
    @guarded
    def chmod(self, path: str | None, mode: int, fh: Any = None) -> int:
        node = self._node(path, fh)
        node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        return 0

    @guarded
    def chown(self, path: str | None, uid: int, gid: int, fh: Any = None) -> int:
        node = self._node(path, fh)
        node.uid = node.uid if uid == -1 else uid
        node.gid = node.gid if gid == -1 else gid
        return 0

    @guarded
    def utimens(self, path: str | None, times: tuple[int | None, int | None], fh: Any = None) -> int:
        node = self._node(path, fh)
        atime, mtime = times  # None: leave as is (UTIME_OMIT)
        node.atime_ns = node.atime_ns if atime is None else atime
        node.mtime_ns = node.mtime_ns if mtime is None else mtime
        return 0

    @guarded
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.disk.backing)
        return {key: getattr(st, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                  "f_files", "f_ffree", "f_favail", "f_namemax")}

    # -- namespace -------------------------------------------------------------------------------------------

    def _new(self, mode: int) -> Inode:
        uid, gid, _pid = mfusepy.fuse_get_context()
        return self.disk.new_inode(mode, uid, gid)

    @guarded
    def create(self, path: str, mode: int, fi: Any) -> int:
        node = self._new(stat.S_IFREG | stat.S_IMODE(mode))
        self.disk.link_new(path, node)
        fi.fh = self._open_handle(node, fi.flags)
        fi.keep_cache = 1
        return 0

    @guarded
    def mkdir(self, path: str, mode: int) -> int:
        self.disk.link_new(path, self._new(stat.S_IFDIR | stat.S_IMODE(mode)))
        return 0

    @guarded
    def symlink(self, path: str, target: str) -> int:
        node = self._new(stat.S_IFLNK | 0o777)
        node.target = target
        self.disk.link_new(path, node)
        return 0

    @guarded
    def readlink(self, path: str) -> str:
        node = self.disk.lookup(path)
        if not stat.S_ISLNK(node.mode):
            raise FsError(errno.EINVAL)
        return node.target

    @guarded
    def unlink(self, path: str) -> int:
        self.disk.remove(path, directory=False)
        return 0

    @guarded
    def rmdir(self, path: str) -> int:
        self.disk.remove(path, directory=True)
        return 0

    @guarded
    def rename(self, old: str, new: str) -> int:
        self.disk.rename(old, new)
        return 0

    @guarded
    def opendir(self, path: str) -> int:
        node = self.disk.lookup(path)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        return self._open_handle(node, os.O_RDONLY)

    @guarded
    def readdir(self, path: str | None, fh: int) -> list[tuple[str, dict[str, int], int]]:
        # Each entry carries its inode number: with use_ino a zero one would make readdir(3) skip the entry.
        node = self._node(path, fh)
        listed = [(".", node), ("..", self.disk.root), *node.entries.items()]
        return [(name, {"st_ino": each.number, "st_mode": each.mode}, 0) for name, each in listed]

    @guarded
    def releasedir(self, path: str | None, fh: int) -> int:
        self.disk.released(self.handles.pop(fh).node)
        return 0

    @guarded
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        self.disk.sync_dir(self._node(path, fh))
        return 0

    # -- file data -------------------------------------------------------------------------------------------

    @guarded
    def open(self, path: str, fi: Any) -> int:
        node = self.disk.lookup(path)
        if not node.is_file:
            raise FsError(errno.EISDIR if node.is_dir else errno.EINVAL)
        fi.fh = self._open_handle(node, fi.flags)
        fi.keep_cache = 1  # every change goes through this mount, so the kernel's page cache is never stale
        return 0

    @guarded
    def read(self, path: str | None, size: int, offset: int, fi: Any) -> bytes:
        return self.disk.read(self._handle(fi).node, size, offset)

    @guarded
    def write(self, path: str | None, data: bytes, offset: int, fi: Any) -> int:
        handle = self._handle(fi)
        written = self.disk.write(handle.node, data, offset)
        if handle.flags & os.O_DSYNC:  # O_SYNC includes it: such a write returns only once durable
            self.disk.sync_file(handle.node)
        return written

    @guarded
    def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
        node = self._node(path, fh)
        if not node.is_file:
            raise FsError(errno.EISDIR)
        self.disk.truncate(node, length)
        return 0

    @guarded
    def fsync(self, path: str | None, datasync: int, fi: Any) -> int:
        self.disk.sync_file(self._handle(fi).node)
        return 0

    @guarded
    def flush(self, path: str | None, fi: Any) -> int:
        return 0  # closing a file makes nothing durable

    @guarded
    def release(self, path: str | None, fi: Any) -> int:
        self.disk.released(self.handles.pop(fi.fh).node)
        return 0


class _FUSE(mfusepy.FUSE):
    """mfusepy's FUSE, passing the file handle where it drops it and refusing rename flags it would drop."""

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)

    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        return self.operations.truncate(self._path(path), length, fip.contents if fip else None)

    def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
        return self.operations.chmod(self._path(path), mode, fip.contents if fip else None)

    def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
        # -1 ("leave as is") arrives as the unsigned maximum
        uid = -1 if uid == (1 << 32) - 1 else uid
        gid = -1 if gid == (1 << 32) - 1 else gid
        return self.operations.chown(self._path(path), uid, gid, fip.contents if fip else None)

    def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
        now = time.time_ns()
        times = (now, now)
        if buf:
            times = tuple(now if ts.tv_nsec == UTIME_NOW else None if ts.tv_nsec == UTIME_OMIT
                          else ts.tv_sec * 10**9 + ts.tv_nsec for ts in (buf.contents.actime, buf.contents.modtime))
        return self.operations.utimens(self._path(path), times, fip.contents if fip else None)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: not modelled; callers fall back to plain rename
            return -errno.EINVAL
        return self.rename_fuse_2(old, new)


def announce(line: str) -> None:
    """Tell the process that started us where we are (one line on stdout)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def cut_on_signal(fs: LazyFS) -> None:
    """Wait for SIGUSR1 and cut (the signal is blocked everywhere else, so this thread takes it)."""
    while True:
        signal.sigwait({signal.SIGUSR1})
        fs.cut()
        announce("cut")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.powercut.lazyfs", description=__doc__.split("\n")[0])
    parser.add_argument("backing", help="the directory that plays the disk")
    parser.add_argument("mountpoint")
    parser.add_argument("--no-fsync-backing", action="store_true",
                        help="do not fsync the backing files (only to measure what the real fsyncs cost)")
    parser.add_argument("--debug", action="store_true", help="log every FUSE operation to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr)
    fs = LazyFS(Disk(args.backing, fsync_backing=not args.no_fsync_backing))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # before any thread starts, so all inherit it
    threading.Thread(target=cut_on_signal, args=(fs,), name="lazyfs-cut", daemon=True).start()
    # hard_remove: an unlinked open file is unlinked, not renamed to .fuse_hidden (which would be a rename);
    # use_ino: stable inode numbers (SQLite tells files apart by them).
    _FUSE(fs, args.mountpoint, raw_fi=True, foreground=True, hard_remove=True, use_ino=True,
          fsname="lazyfs", subtype="lazyfs", debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
