"""A simulated disk cache over a real directory: what is written is seen at once, what is synced survives a cut.

The backing directory always holds exactly what a disk would hold if the power went now. Everything else --
file data not yet fsynced, namespace changes whose directories were not yet fsynced -- lives in this model,
and `cut` throws it away.

File data (and size) is durable after fsync/fdatasync of that file. A namespace change (create, mkdir,
symlink, unlink, rmdir, rename) is durable only after an fsync of its parent directory made after it; a
rename needs both parents fsynced, and is then applied whole (never both names, never neither). fsync of a
file does not make its name durable. That is what POSIX promises and no more (ext4 and xfs give more in
practice, since a journal commit carries every earlier change), so a program that survives this model
survives them. Pending changes reach the backing directory in the order they were made, except that a change
waits only for earlier pending changes it depends on: the same entry, the same inode, the creation of the
directory it is in, the contents of a directory it removes, and (for simplicity) every earlier directory
rename when it renames a directory.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass, field

PAGE = 4096
# A file's inode number in the model, kept with its backing file (a user xattr): a real file system keeps inode
# numbers across a power cut, and programs that know files by (device, inode) rely on that.
NUMBER_XATTR = "user.lazyfs.ino"


class FsError(OSError):
    """An error the file system returns to its caller (an errno)."""

    def __init__(self, code: int):
        super().__init__(code, os.strerror(code))


@dataclass(eq=False)
class Inode:
    """A file, directory or symlink: its logical (cached) state and where its durable state is."""

    number: int
    mode: int
    uid: int = 0
    gid: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    links: int = 1  # logical names (0 once unlinked)
    handles: int = 0  # open file or directory handles
    entries: dict[str, Inode] = field(default_factory=dict)  # directories: logical entries
    target: str = ""  # symlinks
    # Where the inode is on disk: durable parent and name (None while it has no durable name).
    dparent: Inode | None = None
    dname: str = ""
    # File data: dirty pages over the durable content, of which only the first `base_limit` bytes still show.
    size: int = 0
    dirty: dict[int, bytearray] = field(default_factory=dict)
    base_limit: int = 0
    mem: bytearray | None = None  # durable content of a file that has no durable name yet
    fd: int | None = None  # the backing file, opened on demand

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def attrs(self) -> dict[str, int]:
        """Return this inode's stat attributes as the logical view shows them."""
        if self.is_dir:
            nlink = 2 + sum(1 for child in self.entries.values() if child.is_dir)
            size = 4096
        else:
            nlink, size = self.links, (len(self.target) if stat.S_ISLNK(self.mode) else self.size)
        return {"st_ino": self.number, "st_mode": self.mode, "st_nlink": nlink, "st_uid": self.uid,
                "st_gid": self.gid, "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": PAGE,
                "st_atime": self.atime_ns, "st_mtime": self.mtime_ns, "st_ctime": self.ctime_ns}


@dataclass(eq=False)
class Change:
    """One pending namespace change: an entry made, removed or moved, and the directories still to be synced."""

    kind: str  # "create", "remove" or "rename"
    subject: Inode
    parent: Inode
    name: str
    new_parent: Inode | None = None
    new_name: str = ""
    replaced: Inode | None = None
    unsynced: set[int] = field(default_factory=set)  # numbers of the directories whose fsync it still needs

    def entries(self) -> set[tuple[int, str]]:
        found = {(self.parent.number, self.name)}
        if self.new_parent is not None:
            found.add((self.new_parent.number, self.new_name))
        return found

    def subjects(self) -> set[int]:
        return {self.subject.number} | ({self.replaced.number} if self.replaced else set())

    def parents(self) -> set[int]:
        return {self.parent.number} | ({self.new_parent.number} if self.new_parent else set())


class Disk:
    """The logical tree, the pending changes, and the rules by which they reach the backing directory."""

    def __init__(self, backing: str, *, fsync_backing: bool = True):
        self.backing = os.path.realpath(backing)
        self.fsync_backing = fsync_backing  # the host's own crash safety; off only to measure
        self._numbers = iter(())  # set once what is on disk is loaded, above every number kept there
        self.pending: list[Change] = []
        self.dirty_files: set[Inode] = set()
        self.open_fds: set[Inode] = set()
        self.root = self._load_root()

    # -- loading what is on disk ---------------------------------------------------------------------------

    def _load_root(self) -> Inode:
        root = self._inode_from(os.lstat(self.backing), number=1)
        unnumbered: list[tuple[Inode, str]] = []  # put there behind our back, or symlinks (no user xattrs)
        stack = [(root, self.backing)]
        while stack:
            directory, path = stack.pop()
            with os.scandir(path) as found:
                for entry in found:
                    st = entry.stat(follow_symlinks=False)
                    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                        continue  # sockets and fifos are no disk content
                    child = self._inode_from(st, number=_kept_number(entry.path))
                    if not child.number:
                        unnumbered.append((child, entry.path))
                    child.dparent, child.dname = directory, entry.name
                    if stat.S_ISLNK(st.st_mode):
                        child.target = os.readlink(entry.path)
                    directory.entries[entry.name] = child
                    if child.is_dir:
                        stack.append((child, entry.path))
        highest = max([1, *(node.number for node in self._walk(root))])
        self._numbers = iter(range(highest + 1, 1 << 62))
        for node, path in unnumbered:
            node.number = next(self._numbers)
            if not stat.S_ISLNK(node.mode):
                _keep_number(path, node.number)
        return root

    def _walk(self, directory: Inode) -> list[Inode]:
        found = []
        for child in directory.entries.values():
            found.append(child)
            if child.is_dir:
                found += self._walk(child)
        return found

    @staticmethod
    def _inode_from(st: os.stat_result, number: int) -> Inode:
        return Inode(number=number, mode=st.st_mode, uid=st.st_uid, gid=st.st_gid,
                     atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                     size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
                     base_limit=st.st_size if stat.S_ISREG(st.st_mode) else 0)

    def new_inode(self, mode: int, uid: int, gid: int) -> Inode:
        """Make an inode that exists only in the cache (no durable name, empty durable content)."""
        now = time.time_ns()
        node = Inode(number=next(self._numbers), mode=mode, uid=uid, gid=gid, atime_ns=now, mtime_ns=now,
                     ctime_ns=now)
        if node.is_file:
            node.mem = bytearray()
        return node

    # -- the logical namespace -------------------------------------------------------------------------------

    def lookup(self, path: str) -> Inode:
        """Return the inode a path names in the logical view."""
        node = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            if not node.is_dir:
                raise FsError(errno.ENOTDIR)
            try:
                node = node.entries[part]
            except KeyError:
                raise FsError(errno.ENOENT) from None
        return node

    def parent_and_name(self, path: str) -> tuple[Inode, str]:
        """Return the directory a path is in (which must exist) and its last component."""
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.lookup(head or "/")
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        return parent, name

    def link_new(self, path: str, node: Inode) -> None:
        """Give a new inode its name (create, mkdir, symlink), pending until its directory is fsynced."""
        parent, name = self.parent_and_name(path)
        if name in parent.entries:
            raise FsError(errno.EEXIST)
        parent.entries[name] = node
        self._touch(parent)
        self.pending.append(Change("create", node, parent, name, unsynced={parent.number}))

    def remove(self, path: str, *, directory: bool) -> None:
        """Unlink a file or symlink, or remove an empty directory, pending until its directory is fsynced."""
        parent, name = self.parent_and_name(path)
        node = self.lookup(path)
        if directory and not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if not directory and node.is_dir:
            raise FsError(errno.EISDIR)
        if directory and node.entries:
            raise FsError(errno.ENOTEMPTY)
        del parent.entries[name]
        node.links = 0
        self._touch(parent)
        self.pending.append(Change("remove", node, parent, name, unsynced={parent.number}))
        self._forget_if_unused(node)

    def rename(self, old: str, new: str) -> None:
        """Move an entry (replacing what the new name held), pending until both directories are fsynced."""
        old_parent, old_name = self.parent_and_name(old)
        new_parent, new_name = self.parent_and_name(new)
        node = self.lookup(old)
        replaced = new_parent.entries.get(new_name)
        if replaced is node:
            return
        if node.is_dir and self._is_within(new_parent, node):
            raise FsError(errno.EINVAL)
        if replaced is not None:
            if node.is_dir and not replaced.is_dir:
                raise FsError(errno.ENOTDIR)
            if not node.is_dir and replaced.is_dir:
                raise FsError(errno.EISDIR)
            if replaced.is_dir and replaced.entries:
                raise FsError(errno.ENOTEMPTY)
            replaced.links = 0
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = node
        self._touch(old_parent)
        self._touch(new_parent)
        self.pending.append(Change("rename", node, old_parent, old_name, new_parent, new_name, replaced,
                                   unsynced={old_parent.number, new_parent.number}))
        if replaced is not None:
            self._forget_if_unused(replaced)

    def _is_within(self, node: Inode, ancestor: Inode) -> bool:
        if node is ancestor:
            return True
        return any(self._is_within(node, child) for child in ancestor.entries.values() if child.is_dir)

    @staticmethod
    def _touch(node: Inode) -> None:
        node.mtime_ns = node.ctime_ns = time.time_ns()

    # -- file data -------------------------------------------------------------------------------------------

    def read(self, node: Inode, size: int, offset: int) -> bytes:
        """Read what the cache shows: dirty pages over the still-visible durable content, zeros beyond."""
        end = min(offset + size, node.size)
        out = bytearray()
        position = offset
        while position < end:
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, end - position)
            page = node.dirty.get(index)
            if page is None:
                page = self._clean_page(node, index)
            out += page[within:within + take]
            position += take
        return bytes(out)

    def write(self, node: Inode, data: bytes, offset: int) -> int:
        """Write into the cache only: nothing reaches the backing file before an fsync."""
        position, done = offset, 0
        while done < len(data):
            index, within = divmod(position, PAGE)
            take = min(PAGE - within, len(data) - done)
            page = node.dirty.get(index)
            if page is None:
                page = node.dirty[index] = self._clean_page(node, index)
            page[within:within + take] = data[done:done + take]
            position += take
            done += take
        node.size = max(node.size, offset + len(data))
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self.dirty_files.add(node)
        return len(data)

    def truncate(self, node: Inode, length: int) -> None:
        """Change a file's size in the cache; what is cut off stops showing at once, durably only on fsync."""
        if length < node.size:
            last = (length - 1) // PAGE if length else -1
            for index in [i for i in node.dirty if i > last]:
                del node.dirty[index]
            tail = node.dirty.get(last)
            if tail is not None:
                tail[length - last * PAGE:] = bytes(PAGE - (length - last * PAGE))  # bytes past the end read zero
            node.base_limit = min(node.base_limit, length)
        node.size = length
        node.mtime_ns = node.ctime_ns = time.time_ns()
        self.dirty_files.add(node)

    def _clean_page(self, node: Inode, index: int) -> bytearray:
        start = index * PAGE
        page = bytearray(PAGE)
        visible = min(PAGE, node.base_limit - start)
        if visible > 0:
            if node.mem is not None:
                chunk = node.mem[start:start + visible]
            else:
                chunk = os.pread(self._backing_fd(node), visible, start)
            page[:len(chunk)] = chunk
        return page

    def sync_file(self, node: Inode) -> None:
        """Make a file's data and size durable: write its dirty pages to its durable content."""
        if node not in self.dirty_files:
            return
        if node.mem is not None:
            del node.mem[node.base_limit:]
            for index, page in node.dirty.items():
                start = index * PAGE
                if len(node.mem) < start:
                    node.mem.extend(bytes(start - len(node.mem)))
                node.mem[start:start + PAGE] = page
            del node.mem[node.size:]
            node.mem.extend(bytes(node.size - len(node.mem)))
        else:
            fd = self._backing_fd(node)
            os.ftruncate(fd, node.base_limit)  # what a truncate cut off must not come back as old bytes
            for index, page in sorted(node.dirty.items()):
                os.pwrite(fd, page, index * PAGE)
            os.ftruncate(fd, node.size)
            os.utime(fd, ns=(node.atime_ns, node.mtime_ns))  # fsync makes the inode durable, times included
            if self.fsync_backing:
                os.fsync(fd)
        node.dirty.clear()
        node.base_limit = node.size
        self.dirty_files.discard(node)

    def _backing_fd(self, node: Inode) -> int:
        if node.fd is None:
            path = self.durable_path(node)
            assert path is not None, f"inode {node.number} has neither a durable name nor an open backing file"
            node.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self.open_fds.add(node)
        return node.fd

    def opened(self, node: Inode) -> None:
        """Count a new handle on an inode."""
        node.handles += 1

    def released(self, node: Inode) -> None:
        """Drop a handle; an inode nothing uses any more gives up its backing file (opened again on demand)."""
        node.handles -= 1
        self._forget_if_unused(node)

    def _forget_if_unused(self, node: Inode) -> None:
        if node.handles:
            return
        if node.links == 0:  # nothing can read it again: its unsynced data is as good as lost
            node.dirty.clear()
            self.dirty_files.discard(node)
        if node.fd is not None and node not in self.dirty_files:
            os.close(node.fd)
            node.fd = None
            self.open_fds.discard(node)

    # -- durability ------------------------------------------------------------------------------------------

    def durable_path(self, node: Inode) -> str | None:
        """Return where an inode is on disk, or None when no durable name reaches it."""
        parts = []
        while node is not self.root:
            if node.dparent is None:
                return None
            parts.append(node.dname)
            node = node.dparent
        return os.path.join(self.backing, *reversed(parts))

    def sync_dir(self, node: Inode) -> None:
        """Make every namespace change in this directory durable (those that need nothing more)."""
        for change in self.pending:
            change.unsynced.discard(node.number)
        self._apply_ready()
        if self.fsync_backing:
            path = self.durable_path(node)
            if path is not None:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def sync_all(self) -> None:
        """Make everything durable, as an orderly shutdown does."""
        for node in list(self.dirty_files):
            self.sync_file(node)
        for change in self.pending:
            change.unsynced.clear()
        self._apply_ready()
        assert not self.pending, f"changes that could not be applied: {self.pending}"

    def _apply_ready(self) -> None:
        """Apply, in order, every pending change whose directories are synced and that waits for no other."""
        kept: list[Change] = []
        entries: set[tuple[int, str]] = set()
        subjects: set[int] = set()
        parents: set[int] = set()
        created: set[int] = set()
        dir_renamed = False
        for change in self.pending:
            is_dir_rename = change.kind == "rename" and change.subject.is_dir
            blocked = (change.unsynced or change.entries() & entries or change.subjects() & subjects
                       or change.parents() & created
                       or (change.kind == "remove" and change.subject.number in parents)
                       or (change.replaced is not None and change.replaced.number in parents)
                       or (is_dir_rename and dir_renamed))
            if blocked:
                kept.append(change)
                entries |= change.entries()
                subjects |= change.subjects()
                parents |= change.parents()
                if change.kind == "create":
                    created.add(change.subject.number)
                dir_renamed = dir_renamed or is_dir_rename
            else:
                self._apply(change)
        self.pending = kept

    def _apply(self, change: Change) -> None:
        node = change.subject
        if change.kind == "create":
            path = self._durable_child(change.parent, change.name)
            if node.is_dir:
                os.mkdir(path, stat.S_IMODE(node.mode))
                _keep_number(path, node.number)
            elif stat.S_ISLNK(node.mode):
                os.symlink(node.target, path)
            else:
                self._materialize(node, path)
            node.dparent, node.dname = change.parent, change.name
        elif change.kind == "remove":
            path = self._durable_child(change.parent, change.name)
            if node.is_dir:
                os.rmdir(path)
            else:
                self._keep_content_if_used(node)
                os.unlink(path)
            node.dparent = None
        else:
            assert change.new_parent is not None
            old = self._durable_child(change.parent, change.name)
            new = self._durable_child(change.new_parent, change.new_name)
            if change.replaced is not None:
                self._keep_content_if_used(change.replaced)
                change.replaced.dparent = None
            os.rename(old, new)
            node.dparent, node.dname = change.new_parent, change.new_name

    def _durable_child(self, parent: Inode, name: str) -> str:
        where = self.durable_path(parent)
        assert where is not None, f"directory inode {parent.number} has no durable name"
        return os.path.join(where, name)

    def _materialize(self, node: Inode, path: str) -> None:
        """Create a file's durable name, with the content that was durable while it had none."""
        assert node.mem is not None
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, stat.S_IMODE(node.mode))
        _keep_number(fd, node.number)
        os.write(fd, node.mem)
        os.utime(fd, ns=(node.atime_ns, node.mtime_ns))
        if self.fsync_backing:
            os.fsync(fd)
        node.mem = None
        node.fd = fd
        self.open_fds.add(node)

    def _keep_content_if_used(self, node: Inode) -> None:
        """Hold the backing file open for an inode still in use, so its content outlives its last name."""
        if node.is_file and node.handles > 0 and node.mem is None:
            self._backing_fd(node)

    def discard(self) -> None:
        """Drop everything not durable (the power cut): the backing directory is left as it is."""
        for node in list(self.open_fds):
            if node.fd is not None:
                os.close(node.fd)
                node.fd = None
        self.open_fds.clear()
        self.pending.clear()
        self.dirty_files.clear()


def _kept_number(path: str) -> int:
    """Return the inode number a backing file had in the model, or 0 if it has none."""
    try:
        return int(os.getxattr(path, NUMBER_XATTR, follow_symlinks=False))
    except (OSError, ValueError):
        return 0


def _keep_number(where: str | int, number: int) -> None:
    """Keep an inode's number with its backing file (a path, or an open descriptor)."""
    os.setxattr(where, NUMBER_XATTR, str(number).encode())
