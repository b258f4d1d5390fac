from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .disk import NUMBER_XATTR
from .mount import LazyMount, MountError


def fuse_missing() -> str | None:
    """Say why FUSE cannot run on this machine, or None when it can (as root, a missing package is an error)."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine (FUSE is not available: a container without the device?)"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "fusermount3 is not installed and we are not root to install it (apt-get install fuse3)"
    return None


@pytest.fixture(scope="session")
def fuse_works(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Skip the power-cut tests where FUSE cannot run at all; fail where it should and does not."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    probe = tmp_path_factory.mktemp("fuse-probe")
    try:
        os.setxattr(probe, NUMBER_XATTR, b"1")
    except OSError as e:
        pytest.skip(f"the file system of the test's temporary directory keeps no user xattrs ({e.strerror}): "
                    "lazyfs keeps inode numbers in them")
    try:
        with LazyMount(probe / "disk", probe / "mnt"):
            pass
    except MountError as e:
        if "not permitted" in str(e) or "Permission denied" in str(e):
            pytest.skip(f"mounting FUSE is not permitted here: {e}")
        raise


@pytest.fixture
def lazyfs(fuse_works: None, tmp_path: Path) -> Iterator[Callable[[], LazyMount]]:
    """Mount lazyfs over tmp_path/disk at tmp_path/mnt (call again after a cut to remount); always unmounts."""
    mounts: list[LazyMount] = []

    def mount() -> LazyMount:
        for earlier in mounts:
            earlier.unmount()
        mounts.append(LazyMount(tmp_path / "disk", tmp_path / "mnt"))
        mounts[-1].mount()
        return mounts[-1]

    try:
        yield mount
    finally:
        for each in mounts:
            each.unmount()
    for each in mounts:
        assert not each.errors(), f"lazyfs logged errors:\n{each.errors()}"
