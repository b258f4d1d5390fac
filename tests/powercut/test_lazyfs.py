"""lazyfs keeps what was synced and loses the rest at a cut, by the rules in disk.py; SQLite works on it."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from .mount import LazyMount, fsync_dir, is_mounted, power_back

Mount = Callable[[], LazyMount]


def write(path: Path, data: bytes, *, sync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def durable(path: Path) -> Path:
    """Give a durable file's path: data written, fsynced, and its name fsynced into its directory."""
    write(path, b"durable", sync=True)
    fsync_dir(path.parent)
    return path


def power_cut(lazyfs: Mount, fs: LazyMount) -> LazyMount:
    """Cut the power and mount again over the same disk."""
    fs.cut()
    return lazyfs()


def test_unsynced_data_shows_until_a_cut_loses_it_and_synced_data_is_kept(lazyfs):
    fs = lazyfs()
    path = durable(fs.mountpoint / "a")
    with open(path, "ab") as f:
        f.write(b" then unsynced")
    assert path.read_bytes() == b"durable then unsynced"  # readers see the cache, as with a page cache
    assert (fs.backing / "a").read_bytes() == b"durable"  # the disk does not have it yet
    fs = power_cut(lazyfs, fs)
    assert path.read_bytes() == b"durable"
    with open(path, "ab") as f:
        f.write(b" then synced")
        f.flush()
        os.fdatasync(f.fileno())
    fs = power_cut(lazyfs, fs)
    assert path.read_bytes() == b"durable then synced"


def test_a_write_through_an_o_dsync_handle_is_durable_when_it_returns(lazyfs):
    fs = lazyfs()
    path = durable(fs.mountpoint / "f")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_DSYNC)
    try:
        os.write(fd, b" and synced")
    finally:
        os.close(fd)
    fs = power_cut(lazyfs, fs)
    assert path.read_bytes() == b"durable and synced"


def test_a_truncate_is_durable_only_after_fsync_and_what_it_cut_off_never_shows_again(lazyfs):
    fs = lazyfs()
    path = fs.mountpoint / "big"
    write(path, b"x" * 10_000, sync=True)
    fsync_dir(fs.mountpoint)
    os.truncate(path, 100)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"y")  # extends the file again: the gap must read as zeros, not as the old bytes
    assert path.read_bytes() == b"x" * 100 + bytes(4900) + b"y"
    fs = power_cut(lazyfs, fs)
    assert path.read_bytes() == b"x" * 10_000
    os.truncate(path, 100)
    with open(path, "r+b") as f:
        f.seek(5000)
        f.write(b"y")
        f.flush()
        os.fsync(f.fileno())
    fs = power_cut(lazyfs, fs)
    assert path.read_bytes() == b"x" * 100 + bytes(4900) + b"y"


def test_a_created_file_needs_its_directory_fsynced_and_its_data_its_own_fsync(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    write(mnt / "file-synced-only", b"data", sync=True)
    write(mnt / "name-synced-only", b"data", sync=False)
    assert sorted(os.listdir(mnt)) == ["file-synced-only", "name-synced-only"]
    fsync_dir(mnt)  # both names are durable now; only the first file's data was synced before it
    write(mnt / "never-synced", b"data", sync=True)  # the file's own fsync does not make its name durable
    fs = power_cut(lazyfs, fs)
    assert sorted(os.listdir(mnt)) == ["file-synced-only", "name-synced-only"]
    assert (mnt / "file-synced-only").read_bytes() == b"data"
    assert (mnt / "name-synced-only").read_bytes() == b""


def test_a_rename_is_lost_without_a_directory_fsync_and_kept_with_one(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    durable(mnt / "a")
    os.rename(mnt / "a", mnt / "b")
    assert os.listdir(mnt) == ["b"]
    fs = power_cut(lazyfs, fs)
    assert os.listdir(mnt) == ["a"]
    os.rename(mnt / "a", mnt / "b")
    fsync_dir(mnt)
    fs = power_cut(lazyfs, fs)
    assert os.listdir(mnt) == ["b"]
    assert (mnt / "b").read_bytes() == b"durable"


def test_a_rename_over_a_file_replaces_it_whole_once_the_directory_is_synced(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    durable(mnt / "target")
    write(mnt / "target.tmp", b"new", sync=True)
    os.replace(mnt / "target.tmp", mnt / "target")
    fs = power_cut(lazyfs, fs)
    assert sorted(os.listdir(mnt)) == ["target"]  # neither the new name nor its create reached the disk
    assert (mnt / "target").read_bytes() == b"durable"
    write(mnt / "target.tmp", b"new", sync=True)
    os.replace(mnt / "target.tmp", mnt / "target")
    fsync_dir(mnt)
    fs = power_cut(lazyfs, fs)
    assert sorted(os.listdir(mnt)) == ["target"]
    assert (mnt / "target").read_bytes() == b"new"


def test_a_rename_across_directories_needs_both_fsynced_and_is_never_half_done(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    (mnt / "in").mkdir()
    (mnt / "done").mkdir()
    fsync_dir(mnt)
    durable(mnt / "in" / "f")
    os.rename(mnt / "in" / "f", mnt / "done" / "f")
    fsync_dir(mnt / "done")  # the destination only: not enough
    fs = power_cut(lazyfs, fs)
    assert (os.listdir(mnt / "in"), os.listdir(mnt / "done")) == (["f"], [])
    os.rename(mnt / "in" / "f", mnt / "done" / "f")
    fsync_dir(mnt / "in")
    fs = power_cut(lazyfs, fs)
    assert (os.listdir(mnt / "in"), os.listdir(mnt / "done")) == (["f"], [])
    os.rename(mnt / "in" / "f", mnt / "done" / "f")
    fsync_dir(mnt / "done")
    fsync_dir(mnt / "in")
    fs = power_cut(lazyfs, fs)
    assert (os.listdir(mnt / "in"), os.listdir(mnt / "done")) == ([], ["f"])
    assert (mnt / "done" / "f").read_bytes() == b"durable"


def test_an_unlink_is_undone_by_a_cut_unless_its_directory_was_fsynced(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    durable(mnt / "f")
    os.unlink(mnt / "f")
    assert os.listdir(mnt) == []
    fs = power_cut(lazyfs, fs)
    assert (mnt / "f").read_bytes() == b"durable"
    os.unlink(mnt / "f")
    fsync_dir(mnt)
    fs = power_cut(lazyfs, fs)
    assert os.listdir(mnt) == []


def test_a_new_directory_and_what_is_in_it_need_the_parent_fsynced_too(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    (mnt / "d").mkdir()
    durable(mnt / "d" / "f")  # the file and the new directory are synced, the directory's name is not
    assert os.listdir(fs.backing) == []
    fs = power_cut(lazyfs, fs)
    assert os.listdir(mnt) == []
    (mnt / "d").mkdir()
    durable(mnt / "d" / "f")
    fsync_dir(mnt)
    fs = power_cut(lazyfs, fs)
    assert (mnt / "d" / "f").read_bytes() == b"durable"


def test_inode_numbers_survive_a_remount_and_a_cut_and_new_ones_never_reuse_them(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    (mnt / "d").mkdir()
    fsync_dir(mnt)
    names = ["d", *(f"d/{n}" for n in range(20))]  # numbered in this order; listed back in another
    for name in names[1:]:
        durable(mnt / name)
    numbers = [os.lstat(mnt / name).st_ino for name in names]
    (fs.backing / "placed").write_bytes(b"put on the disk behind the mount's back")
    fs = lazyfs()  # an orderly remount
    assert [os.lstat(mnt / name).st_ino for name in names] == numbers
    names.append("placed")  # numbered at this mount, and keeps that number from now on
    numbers.append(os.lstat(mnt / "placed").st_ino)
    os.rename(mnt / "d" / "0", mnt / "d" / "renamed")
    fsync_dir(mnt / "d")
    write(mnt / "unsynced", b"", sync=False)  # its number dies with it at the cut
    fs = power_cut(lazyfs, fs)
    names[1] = "d/renamed"  # a renamed file is the same file
    assert [os.lstat(mnt / name).st_ino for name in names] == numbers
    write(mnt / "new", b"", sync=False)
    assert os.lstat(mnt / "new").st_ino not in numbers


def test_a_remount_gets_its_device_number_back_once_a_lower_one_is_free_for_good(lazyfs, tmp_path):
    # The kernel gives a new mount the lowest free device number: once the trial beside this one ended, every
    # remount of this disk got that trial's lower number, never its own again.
    if os.geteuid() != 0:
        pytest.skip("the placeholder mounts that hold lower device numbers need root")
    (tmp_path / "beside").mkdir()
    beside = LazyMount(tmp_path / "beside" / "disk", tmp_path / "beside" / "mnt")
    beside.mount()
    try:
        fs = lazyfs()
        for _ in range(20):
            if os.stat(fs.mountpoint).st_dev > os.stat(beside.mountpoint).st_dev:
                break
            fs = lazyfs()  # another test freed a lower number meanwhile
        else:
            pytest.skip("this disk never got a device number above the other's (other tests' mounts came and went)")
        device = os.stat(fs.mountpoint).st_dev
        durable(fs.mountpoint / "f")
        fs.cut()
    finally:
        beside.unmount()
    fs = power_back(lazyfs, device)
    assert os.stat(fs.mountpoint).st_dev == device
    assert (fs.mountpoint / "f").read_bytes() == b"durable"


def test_a_shared_mapping_is_durable_after_msync_and_lost_without_it(lazyfs):
    fs = lazyfs()
    path = fs.mountpoint / "mapped"
    write(path, bytes(8192), sync=True)
    fsync_dir(fs.mountpoint)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 8192) as mapped:
        mapped[0:5] = b"first"
        mapped.flush()  # msync(MS_SYNC): the kernel writes the page back and fsyncs
        mapped[4096:4102] = b"second"
    fs = power_cut(lazyfs, fs)
    data = path.read_bytes()
    assert (data[0:5], data[4096:4102]) == (b"first", bytes(6))


def test_an_orderly_unmount_makes_everything_durable(lazyfs):
    fs = lazyfs()
    mnt = fs.mountpoint
    (mnt / "d").mkdir()
    write(mnt / "d" / "f", b"never synced", sync=False)
    fs.unmount()
    assert (fs.backing / "d" / "f").read_bytes() == b"never synced"


def test_after_a_cut_a_process_still_using_the_mount_gets_eio_and_the_mount_goes_cleanly(lazyfs):
    fs = lazyfs()
    script = textwrap.dedent("""
        import os, sys
        fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"before")
        print("open", flush=True)
        sys.stdin.readline()
        try:
            os.write(fd, b"after")
            print("written")
        except OSError as e:
            print(e.errno)
    """)
    writer = subprocess.Popen([sys.executable, "-c", script, str(fs.mountpoint / "f")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "open\n"
        fs.cut()
        with pytest.raises(OSError) as open_error:
            os.open(fs.mountpoint / "f", os.O_RDONLY)  # an open always reaches lazyfs; a stat may not
        assert open_error.value.errno == errno.EIO
        out, _ = writer.communicate("go\n", timeout=30)
        assert out.strip() == str(errno.EIO)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    fs.unmount()
    assert not is_mounted(fs.mountpoint)
    assert os.listdir(fs.backing) == []


def test_unmount_leaves_no_mount_even_while_a_process_still_holds_files_on_it(lazyfs):
    fs = lazyfs()
    script = "import os, sys; f = open('f', 'w'); print('holding', flush=True); sys.stdin.readline()"
    holder = subprocess.Popen([sys.executable, "-c", script], cwd=fs.mountpoint, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        daemon = fs.proc
        fs.cut()
        fs.unmount()
        assert not is_mounted(fs.mountpoint)
        assert daemon.poll() is not None
    finally:
        holder.kill()
        holder.communicate()


def hold_lock(path: Path, kind: str) -> subprocess.Popen[str]:
    """Start a process that takes a lock on path (flock or fcntl), says so, and keeps it until told."""
    script = textwrap.dedent(f"""
        import fcntl, sys
        f = open(sys.argv[1], "a")
        {"fcntl.flock(f, fcntl.LOCK_EX)" if kind == "flock" else "fcntl.lockf(f, fcntl.LOCK_EX)"}
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("kind", ["flock", "fcntl"])
def test_a_lock_held_by_one_process_excludes_another(lazyfs, kind):
    fs = lazyfs()
    path = fs.mountpoint / "lock"
    take = (lambda f: fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)) if kind == "flock" else \
        (lambda f: fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB))
    holder = hold_lock(path, kind)
    try:
        with open(path, "a") as f:
            with pytest.raises(BlockingIOError):
                take(f)
            holder.communicate("release\n", timeout=30)
            take(f)  # free once the holder is gone
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


SQLITE_WRITER = textwrap.dedent("""
    import sqlite3, sys
    path, synchronous, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, payload BLOB)")
    for n in range(first, first + count):
        db.execute("INSERT INTO t VALUES (?, randomblob(200))", (n,))
    if "--checkpoint" in sys.argv:
        db.execute("PRAGMA wal_checkpoint(RESTART)")
    print("committed", flush=True)
    sys.stdin.readline()  # keep the connection open: closing it would checkpoint
""")


def sqlite_writes(path: Path, synchronous: str, first: int, count: int, *flags: str) -> subprocess.Popen[str]:
    """Start a process that commits rows first..first+count-1 one transaction each, then holds the database."""
    writer = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(path), synchronous, str(first), str(count),
                               *flags], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = writer.stdout.readline()
    assert line == "committed\n", f"the writer failed: {line!r}"
    return writer


def stop(*procs: subprocess.Popen[str]) -> None:
    for proc in procs:
        proc.kill()
        proc.communicate()


def rows_and_integrity(path: Path) -> tuple[list[int], str]:
    db = sqlite3.connect(path)
    try:
        return ([n for (n,) in db.execute("SELECT n FROM t ORDER BY n")],
                db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def test_sqlite_wal_with_synchronous_full_keeps_every_commit_through_a_cut(lazyfs):
    fs = lazyfs()
    db = fs.mountpoint / "spool.db"
    writer = sqlite_writes(db, "FULL", 0, 50)
    try:
        fs.cut()
    finally:
        stop(writer)
    lazyfs()
    assert rows_and_integrity(db) == (list(range(50)), "ok")


def test_sqlite_wal_with_synchronous_normal_loses_the_commits_since_the_last_checkpoint_but_never_corrupts(
        lazyfs):
    fs = lazyfs()
    db = fs.mountpoint / "spool.db"
    stop(sqlite_writes(db, "FULL", 0, 20))  # synced in the WAL at each commit: kept
    first = sqlite_writes(db, "NORMAL", 20, 20, "--checkpoint")  # synced by the checkpoint: kept
    second = sqlite_writes(db, "NORMAL", 40, 20)  # after it, in a restarted WAL: lost
    try:
        assert rows_and_integrity(db) == (list(range(60)), "ok")
        fs.cut()
    finally:
        stop(first, second)
    lazyfs()
    assert rows_and_integrity(db) == (list(range(40)), "ok")


def test_sqlite_processes_exclude_each_other_and_share_the_wal_index_on_the_mount(lazyfs):
    fs = lazyfs()
    db = fs.mountpoint / "counter.db"
    with sqlite3.connect(db) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE c (n INTEGER)")
        setup.execute("INSERT INTO c VALUES (0)")
    setup.close()
    # Read-modify-write in separate transactions: without working locks and a shared -shm, updates get lost.
    script = textwrap.dedent("""
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=60)
        db.execute("PRAGMA synchronous=FULL")
        for _ in range(100):
            db.execute("BEGIN IMMEDIATE")
            (n,) = db.execute("SELECT n FROM c").fetchone()
            db.execute("UPDATE c SET n = ?", (n + 1,))
            db.execute("COMMIT")
        db.close()
    """)
    workers = [subprocess.Popen([sys.executable, "-c", script, str(db)]) for _ in range(3)]
    assert [w.wait(timeout=120) for w in workers] == [0, 0, 0]
    fs = power_cut(lazyfs, fs)
    with sqlite3.connect(db) as check:
        assert check.execute("SELECT n FROM c").fetchone() == (300,)
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Map every path under root to its content (None for directories)."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found


def random_operation(rng: random.Random, reference: Path) -> Callable[[Path], None]:
    """Choose a random file operation that is valid on what the reference holds; return it, to apply to a root."""
    dirs = [Path("."), *sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_dir())]
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    target = rng.choice(dirs) / f"n{rng.randrange(8)}"
    offset, data = rng.randrange(20_000), rng.randbytes(rng.randrange(6_000))
    if files and rng.random() < 0.6:
        chosen = rng.choice(files)
        action = rng.choice(["write", "truncate", "rename", "unlink", "fsync"])
        if action == "write":
            def write_into(root: Path) -> None:
                with open(root / chosen, "r+b") as f:
                    f.seek(offset)
                    f.write(data)
            return write_into
        if action == "truncate":
            return lambda root: os.truncate(root / chosen, offset // 2)
        if action == "rename" and not (reference / target).is_dir():
            return lambda root: os.replace(root / chosen, root / target)
        if action == "unlink":
            return lambda root: os.unlink(root / chosen)
        return lambda root: fsync_file(root / chosen)
    if not (reference / target).exists():
        if len(dirs) < 6 and rng.random() < 0.2:
            return lambda root: (root / target).mkdir()
        return lambda root: (root / target).write_bytes(data)
    empty = [d for d in dirs[1:] if not any((reference / d).iterdir())]
    if empty and rng.random() < 0.5:
        return lambda root: (root / empty[0]).rmdir()
    return lambda root: fsync_dir(root / target.parent)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def test_the_mount_shows_what_a_plain_directory_would_and_an_orderly_unmount_stores_it(lazyfs, tmp_path):
    fs = lazyfs()
    reference = tmp_path / "reference"
    reference.mkdir()
    rng = random.Random(14)
    for step in range(300):
        operation = random_operation(rng, reference)
        operation(reference)
        operation(fs.mountpoint)
        if step % 50 == 0:
            assert snapshot(fs.mountpoint) == snapshot(reference), f"after step {step}"
    assert snapshot(fs.mountpoint) == snapshot(reference)
    fs.unmount()
    assert snapshot(fs.backing) == snapshot(reference)


class FlatDirectoryOracle:
    """What a cut must leave of one directory, by the rules, kept independently of lazyfs's own model."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}  # logical: name -> inode
        self.content: dict[int, bytes] = {}  # logical content of each inode
        self.durable_names: dict[str, int] = {}
        self.durable_content: dict[int, bytes] = {}
        self.inodes = iter(range(1, 1 << 30))

    def after_cut(self) -> dict[str, bytes]:
        survivors = {name: self.durable_content.get(ino, b"") for name, ino in self.durable_names.items()}
        self.names = dict(self.durable_names)
        self.content = {ino: self.durable_content.get(ino, b"") for ino in self.names.values()}
        return survivors


def random_flat_operation(rng: random.Random, oracle: FlatDirectoryOracle, mnt: Path) -> None:
    """Do one random operation in mnt, and record its effect in the oracle."""
    name = f"f{rng.randrange(6)}"
    existing = sorted(oracle.names)
    action = rng.choice(["create", "write", "truncate", "rename", "unlink", "fsync", "fsync", "dirsync"])
    if action == "create" and name not in oracle.names:
        ino = next(oracle.inodes)
        oracle.names[name], oracle.content[ino] = ino, b""
        (mnt / name).touch()
    elif action == "write" and existing:
        chosen, offset, data = rng.choice(existing), rng.randrange(9000), rng.randbytes(rng.randrange(5000))
        ino = oracle.names[chosen]
        old = oracle.content[ino]
        oracle.content[ino] = (old + bytes(max(0, offset - len(old))))[:offset] + data + old[offset + len(data):]
        with open(mnt / chosen, "r+b") as f:
            f.seek(offset)
            f.write(data)
    elif action == "truncate" and existing:
        chosen, length = rng.choice(existing), rng.randrange(9000)
        ino = oracle.names[chosen]
        oracle.content[ino] = (oracle.content[ino] + bytes(length))[:length]
        os.truncate(mnt / chosen, length)
    elif action == "rename" and existing:
        chosen = rng.choice(existing)
        oracle.names[name] = oracle.names.pop(chosen)
        os.replace(mnt / chosen, mnt / name)
    elif action == "unlink" and existing:
        chosen = rng.choice(existing)
        del oracle.names[chosen]
        os.unlink(mnt / chosen)
    elif action == "fsync" and existing:
        chosen = rng.choice(existing)
        ino = oracle.names[chosen]
        oracle.durable_content[ino] = oracle.content[ino]
        fsync_file(mnt / chosen)
    elif action == "dirsync":
        oracle.durable_names = dict(oracle.names)
        fsync_dir(mnt)


def test_random_operations_and_cuts_leave_exactly_what_was_synced(lazyfs):
    fs = lazyfs()
    oracle = FlatDirectoryOracle()
    rng = random.Random(14)
    for round_ in range(6):
        for _ in range(60):
            random_flat_operation(rng, oracle, fs.mountpoint)
        fs = power_cut(lazyfs, fs)
        assert snapshot(fs.mountpoint) == oracle.after_cut(), f"after cut {round_}"
