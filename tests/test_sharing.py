"""A spool any app can produce to: in a setgid directory its group may write (the packaged /var/lib/spool), every
file spool makes is the group's too, whatever the umask; a user who cannot write a spool is told, in one line,
what applies (join its group, or the relay or a drop directory), and so is `spool doctor`.

The modes are checked in this process. The users are real: as root, producers run as other users (setpriv) with
the system's python3 and this checkout on their path.
"""

from __future__ import annotations

import contextlib
import grp
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from spool import Spool
from spool.lock import ShipLock
from spool.records import make_record
from spool.store import Store

from .helpers import T0

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    before = os.umask(mask)
    try:
        yield
    finally:
        os.umask(before)


def modes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): oct(stat.S_IMODE(p.stat().st_mode)) for p in sorted(folder.rglob("*"))}


def every_file_spool_makes(db: Path) -> dict[str, str]:
    """Make the spool, its WAL, an owner's lock (a lease) and the ship lock, all open at once: their modes."""
    with Store(db) as store, ShipLock(db):
        store.append_one(make_record(stat="s", count=1, t=T0))
        assert store.lease(10, now=T0, keyed_only=False) is not None
        return modes(db.parent)


def test_in_a_setgid_directory_its_group_may_write_every_file_spool_makes_is_the_groups(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2770)
    with umask(0o077):  # systemd's UMask=0077 for the agent
        made = every_file_spool_makes(shared / "spool.db")
    token = next(name for name in made if name.startswith("spool.db.owners/"))
    assert made == {"spool.db": "0o660", "spool.db-shm": "0o660", "spool.db-wal": "0o660",
                    "spool.db.owners": "0o2770", token: "0o660", "spool.db.ship.lock": "0o660"}
    assert {p.stat().st_gid for p in shared.rglob("*")} == {shared.stat().st_gid}


def test_anywhere_else_the_spool_stays_private_to_its_owner(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    with umask(0o022):
        made = every_file_spool_makes(private / "spool.db")
    token = next(name for name in made if name.startswith("spool.db.owners/"))
    assert made == {"spool.db": "0o600", "spool.db-shm": "0o600", "spool.db-wal": "0o600",
                    "spool.db.owners": "0o700", token: "0o600", "spool.db.ship.lock": "0o600"}


# -- other users ---------------------------------------------------------------------------------------------


def _system_python_runs_this_checkout() -> bool:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not Path(SYSTEM_PYTHON).exists():
        return False
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True)
    return found.stdout.strip() == str(sys.version_info[:2])


needs_users = pytest.mark.skipif(not _system_python_runs_this_checkout(),
                                 reason="needs root, setpriv and a system python3 of this version")
OWNER = 12345  # the agent's user (no name: the message says its uid)
APP = 65534  # nobody, as an app's user


@pytest.fixture
def box() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="spool-sharing-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def group() -> tuple[int, str]:
    """A group with a name (the messages name it), neither root's nor the app user's own (nogroup is nobody's)."""
    named = {g.gr_name: g.gr_gid for g in grp.getgrall() if g.gr_gid not in (0, APP)}
    name = next((n for n in ("users", "staff", "daemon") if n in named), None) or sorted(named)[0]
    return named[name], name


def as_user(uid: int, groups: list[int], db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`spool ARGS` as another user, with the system's python3 and this checkout (its packages) on its path."""
    path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    user = ["setpriv", f"--reuid={uid}", f"--regid={uid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
    env = {"HOME": "/nonexistent", "PYTHONPATH": path, "SPOOL_DB": str(db), "SPOOL_CONFIG": os.devnull,
           "SPOOL_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run([*user, "sh", "-c", 'umask 077; exec "$@"', "sh", SYSTEM_PYTHON, "-m", "spool", *args],
                          capture_output=True, text=True, env=env, timeout=60, cwd="/")


def state_directory(box: Path, mode: int, gid: int) -> Path:
    state = box / "state"
    state.mkdir()
    os.chown(state, OWNER, gid)
    state.chmod(mode)
    return state


@needs_users
def test_a_user_in_the_spools_group_adds_to_the_spool_its_owner_made(box):
    gid, _ = group()
    db = state_directory(box, 0o2770, gid) / "spool.db"
    first = as_user(OWNER, [], db, "add", "by the agent's user", "--count", "1")
    assert first.returncode == 0, first.stderr
    app = as_user(APP, [gid], db, "add", "by an app", "--count", "1")
    assert app.returncode == 0, app.stderr
    assert (db.stat().st_uid, oct(stat.S_IMODE(db.stat().st_mode))) == (OWNER, "0o660")
    with Spool(db) as sp:
        assert sorted(r.stat for _, _, r in sp.store.records()) == ["by an app", "by the agent's user"]
    doctor = as_user(APP, [gid], db, "doctor")
    [line] = [row for row in doctor.stdout.splitlines() if "producers:" in row]
    assert line.startswith("ok   producers: nobody (uid 65534) can add stats; the spool is shared with group "), line
    assert "ok   spool: bookkeeping sound" in doctor.stdout, doctor.stdout  # 0660 is no leak in a shared directory


@needs_users
def test_a_user_outside_the_group_is_told_to_join_it_or_use_the_relay_or_a_drop_directory(box):
    gid, name = group()
    db = state_directory(box, 0o2770, gid) / "spool.db"
    assert as_user(OWNER, [], db, "add", "s", "--count", "1").returncode == 0
    for args in (("add", "s", "--count", "1"), ("import", "-")):
        result = as_user(APP, [], db, *args)
        assert result.returncode == 1
        [line] = result.stderr.splitlines()  # was `spool: error: Permission denied: .../spool.db`
        assert line == (f"spool: error: cannot write spool {db}: {db.parent} is not writable by nobody (uid 65534); "
                        f"add this user to group {name} (usermod -aG {name} USER; it counts from the next login), or "
                        "send stats through the relay or a drop directory"), line
    doctor = as_user(APP, [], db, "doctor")
    assert doctor.returncode == 1 and "Traceback" not in doctor.stderr, doctor.stderr
    [line] = [row for row in doctor.stdout.splitlines() if "producers:" in row]
    assert line.startswith(f"FAIL producers: {db.parent} is not writable by nobody (uid 65534) -- fix: add this "
                           f"user to group {name}"), line


@needs_users
def test_a_private_spool_tells_other_users_to_use_the_relay_or_a_drop_directory(box):
    db = state_directory(box, 0o700, OWNER) / "spool.db"
    assert as_user(OWNER, [], db, "add", "s", "--count", "1").returncode == 0
    assert oct(stat.S_IMODE(db.stat().st_mode)) == "0o600"
    result = as_user(APP, [], db, "add", "s", "--count", "1")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"spool: error: cannot write spool {db}: {db.parent} is not writable by nobody (uid "
                           "65534) (the spool is private to its owner); send stats through the relay or a drop "
                           "directory"), line


@needs_users
def test_a_private_spool_file_in_a_shared_directory_says_which_file(box):
    gid, name = group()
    state = state_directory(box, 0o700, gid)
    db = state / "spool.db"
    assert as_user(OWNER, [], db, "add", "s", "--count", "1").returncode == 0  # made while it was private: 0600
    state.chmod(0o2770)
    result = as_user(APP, [gid], db, "add", "s", "--count", "1")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert f"{db} is not writable by nobody (uid 65534); add this user to group {name}" in line, line
