"""Who may write a spool. A private spool (0600 files in a 0700 directory) is its owner's alone. A shared one lives
in a setgid directory its group may write (the .deb makes /var/lib/spool so: 2770, group spool): every file spool
makes there (the spool and its -wal and -shm, its ship lock, its owners' locks and their directory) is made for
the group too, whatever the umask, so every member of the group can produce (`spool add`, `import`, the library)
while the agent ships.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

SHARED_FILE, PRIVATE_FILE = 0o660, 0o600
SHARED_DIRECTORY, PRIVATE_DIRECTORY = 0o2770, 0o700


def shared(directory: str | os.PathLike[str]) -> bool:
    """Whether spool files made in `directory` are its group's too: it is setgid and its group may write it."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return False
    return bool(mode & stat.S_ISGID and mode & stat.S_IWGRP)


def file_mode(directory: str | os.PathLike[str]) -> int:
    """The mode of a file spool makes in `directory`."""
    return SHARED_FILE if shared(directory) else PRIVATE_FILE


def directory_mode(parent: str | os.PathLike[str]) -> int:
    """The mode of a directory spool makes in `parent`."""
    return SHARED_DIRECTORY if shared(parent) else PRIVATE_DIRECTORY


def open_new(path: str | os.PathLike[str], flags: int) -> int:
    """os.open with O_CREAT and the mode its directory asks for; a file made shared gets it whatever the umask."""
    mode = file_mode(Path(path).parent)
    fd = os.open(path, flags | os.O_CREAT, mode)
    if mode != PRIVATE_FILE:
        try:
            info = os.fstat(fd)
            if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != mode:
                os.fchmod(fd, mode)  # the umask took the group's bits (systemd's UMask=0077)
        except BaseException:
            os.close(fd)
            raise
    return fd


def make_directory(path: Path) -> None:
    """mkdir with the mode its parent asks for (whatever the umask); nothing if it exists."""
    mode = directory_mode(path.parent)
    try:
        path.mkdir(mode=mode)
    except FileExistsError:
        return
    if mode != PRIVATE_DIRECTORY:
        os.chmod(path, mode)


def who() -> str:
    """This process's user, as an operator would name it: 'app (uid 1001)'."""
    uid = os.geteuid()
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def group_name(gid: int) -> str:
    try:
        import grp

        return grp.getgrgid(gid).gr_name
    except (ImportError, KeyError):
        return str(gid)


def cannot_write(path: str | os.PathLike[str]) -> str | None:
    """Why this user cannot write the spool at `path`, with what to do instead, in one line; None if it can
    (or if that is for opening it to say: a read-only mount, a missing directory)."""
    problem = access_problem(path)
    return None if problem is None else f"cannot write spool {path}: {problem[0]}; {problem[1]}"


def access_problem(path: str | os.PathLike[str],
                   others: str = "the relay or a drop directory") -> tuple[str, str] | None:
    """(what stops this user writing the spool, what to do) or None: what applies, for a shared spool (join its
    group) or a private one (`others`: how stats reach it another way)."""
    spool = Path(path)
    folder = spool.parent
    try:
        info = os.stat(folder)
    except PermissionError:
        blocked = next((p for p in reversed(folder.parents) if not os.access(p, os.X_OK)), folder)
        return _said(f"{blocked} is closed to {who()}", None, others)
    except OSError:
        return None
    if _read_only_mount(folder):
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return _said(f"{folder} is not writable by {who()}", info, others)
    files = [spool, *(Path(f"{spool}{suffix}") for suffix in ("-wal", "-shm"))]
    blocked_file = next((f for f in files if os.path.lexists(f) and not os.access(f, os.R_OK | os.W_OK)), None)
    return None if blocked_file is None else _said(f"{blocked_file} is not writable by {who()}", info, others)


def _said(what: str, folder: os.stat_result | None, others: str) -> tuple[str, str]:
    if folder is not None and folder.st_mode & stat.S_ISGID and folder.st_mode & stat.S_IWGRP:
        group = group_name(folder.st_gid)
        return what, (f"add this user to group {group} (usermod -aG {group} USER; it counts from the next login), "
                      f"or send stats through {others}")
    return (f"{what} (the spool is private to its owner)",
            f"send stats through {others}, or share the spool with a group (README: a box where any app can "
            "produce)")


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False
