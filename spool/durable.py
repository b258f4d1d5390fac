"""Files that must survive a power cut: new files and renames are made durable with their directory.

fsync of a file makes its data durable, not its name: a new directory entry (a created file, a rename)
reaches the disk with an fsync of the directory that holds it. Every hand-off a promise depends on (an
export file, a drop file moved to .done/, a quarantined spool) goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of a directory (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_private(path: Path, *, append: bool = False) -> int:
    """Open a file for writing that only its owner can read: a new one, or with `append` an existing one.

    Without `append` an existing file is refused (FileExistsError): overwriting it could destroy the only
    copy of records moved out of a spool earlier. The new name is made durable before anything is written.
    """
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an existing file we append to may have been readable by others
        fsync_dir(path.parent or Path("."))
    except BaseException:
        os.close(fd)
        raise
    return fd
