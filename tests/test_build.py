"""The release files from scripts/build: the zipapp runs the agent on the system's python3 in a clean environment,
as an unprivileged user with no home; the .deb holds what it must, and installs and purges in a throwaway root."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import T0, TEST_EZKEY, wait_for, wait_for_line

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"  # the Python the boxes have, not the venv's
VERSION = "0.1.0"

pytestmark = pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="no system python3 at /usr/bin/python3")


def unprivileged() -> tuple[list[str], int, int]:
    """A command prefix that runs as nobody (when we are root), and that user's uid and gid."""
    if os.geteuid() != 0:
        return [], os.geteuid(), os.getegid()
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    return prefix, nobody.pw_uid, nobody.pw_gid


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    """Build once for this module, offline, from the wheels scripts/bootstrap fetched into .wheels/."""
    assert any((ROOT / ".wheels").glob("sqlite_utils-*.whl")), "no wheels in .wheels/: run scripts/bootstrap"
    out = Path(tempfile.mkdtemp(prefix="spool-dist-"))
    out.chmod(0o755)  # the unprivileged user must read the zipapp
    try:
        result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build"), "--offline", "--out", str(out)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        yield out
    finally:
        shutil.rmtree(out)


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Path]:
    """A directory the unprivileged user owns: its spool, its temporary files, its drop directory."""
    _, uid, gid = unprivileged()
    folder = Path(tempfile.mkdtemp(prefix="spool-box-"))
    for path in (folder, folder / "tmp", folder / "drop"):
        path.mkdir(exist_ok=True)
        os.chown(path, uid, gid)
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def clean_env(box: Path, **extra: str) -> dict[str, str]:
    """What `env -i` leaves, plus a home that does not exist and the spool's own variables."""
    return {"HOME": "/nonexistent", "TMPDIR": str(box / "tmp"), "SPOOL_DB": str(box / "spool.db"), **extra}


def zipapp_command(program: Path, *args: str, python: str = SYSTEM_PYTHON) -> list[str]:
    prefix, _, _ = unprivileged()
    return [*prefix, python, "-X", "importtime", str(program), *args]


def imported(stderr: str) -> set[str]:
    """The modules a process imported, from its -X importtime lines."""
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")} - {
        "package"}


def messages(stderr: str) -> str:
    return "\n".join(line for line in stderr.splitlines() if not line.startswith("import time:"))


def run_zipapp(program: Path, box: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(zipapp_command(program, *args), capture_output=True, text=True, env=clean_env(box, **extra),
                            cwd="/", timeout=60)
    assert not any(m == "pip" or m.startswith("pip.") for m in imported(result.stderr)), "the zipapp imported pip"
    return result


def test_the_build_makes_the_sdist_the_wheel_the_zipapp_and_the_deb(built):
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted([f"stathat_spool-{VERSION}.tar.gz", f"stathat_spool-{VERSION}-py3-none-any.whl",
                            "spool.pyz", f"stathat-spool_{VERSION}_all.deb"])
    with tarfile.open(built / f"stathat_spool-{VERSION}.tar.gz") as sdist:
        assert f"stathat_spool-{VERSION}/spool/cli.py" in sdist.getnames()


def test_the_zipapp_is_pure_python_for_3_10_and_up_without_pip(built):
    names = zipfile.ZipFile(built / "spool.pyz").namelist()
    tops = {name.split("/")[0] for name in names}
    assert {"__main__.py", "spool", "sqlite_utils", "tenacity", "requests", "watchdog", "click", "prometheus_client",
            "charset_normalizer", "tomli"} <= tops  # tomli: 3.10 has no tomllib
    assert "pip" not in tops and not any(t.startswith("pip-") for t in tops)
    assert "spool/cli.pyc" in names and "spool/cli.py" in names  # bytecode where zipimport looks, and sources
    assert (built / "spool.pyz").read_bytes().startswith(b"#!/usr/bin/env python3\n")


# -- pure Python: spool.pyz and the .deb are "for any architecture" only while nothing in them is native code ----

NATIVE_SUFFIXES = (".so", ".pyd", ".dll", ".dylib", ".a", ".o")
NATIVE_MAGIC = (b"\x7fELF", b"MZ", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"!<arch>\n")  # ELF, PE, Mach-O (fat too), ar


def native_code(archive: zipfile.ZipFile) -> list[str]:
    """The members that are (or are named as) compiled code: by name, and by content whatever the name."""
    found = []
    for name in archive.namelist():
        base = name.rsplit("/", 1)[-1]
        if base.endswith(NATIVE_SUFFIXES) or ".so." in base or archive.read(name).startswith(NATIVE_MAGIC):
            found.append(name)
    return found


def bytecode_faults(archive: zipfile.ZipFile, magic: bytes) -> list[str]:
    """What is wrong with the zipapp's bytecode: each .pyc is for `magic`'s Python (others skip it and read the
    source beside it, which must be there), not checked against a source date, and where zipimport looks."""
    names = set(archive.namelist())
    faults = [f"{n}: in __pycache__, where zipimport never looks" for n in names if "__pycache__/" in n]
    for name in sorted(n for n in names if n.endswith(".pyc")):
        header = archive.read(name)[:8]
        if header[:4] != magic:
            faults.append(f"{name}: bytecode of another Python (magic {header[:4]!r}, not {magic!r})")
        if int.from_bytes(header[4:8], "little") != 0b01:
            faults.append(f"{name}: not unchecked-hash bytecode")
        if name.removesuffix("c") not in names:
            faults.append(f"{name}: no source beside it, so no other Python can import it")
    return faults


def deb_zipapp(built: Path, folder: Path) -> zipfile.ZipFile:
    subprocess.run(["dpkg-deb", "-x", str(built / f"stathat-spool_{VERSION}_all.deb"), str(folder)], check=True)
    return zipfile.ZipFile(folder / "usr" / "bin" / "spool")


def test_the_wheel_the_zipapp_and_the_debs_zipapp_carry_no_native_code(built, tmp_path):
    wheel = zipfile.ZipFile(built / f"stathat_spool-{VERSION}-py3-none-any.whl")
    for archive in (wheel, zipfile.ZipFile(built / "spool.pyz"), deb_zipapp(built, tmp_path)):
        assert native_code(archive) == [], archive.filename
    metadata = wheel.read(f"stathat_spool-{VERSION}.dist-info/WHEEL").decode().splitlines()
    assert "Root-Is-Purelib: true" in metadata and "Tag: py3-none-any" in metadata
    assert not [n for n in wheel.namelist() if n.endswith(".pyc")]  # the installer compiles for its own Python


def test_the_zipapps_bytecode_is_for_the_building_python_with_every_source_beside_it(built, tmp_path):
    import importlib.util

    for archive in (zipfile.ZipFile(built / "spool.pyz"), deb_zipapp(built, tmp_path)):
        assert any(n.endswith(".pyc") for n in archive.namelist())
        assert bytecode_faults(archive, importlib.util.MAGIC_NUMBER) == [], archive.filename


def test_the_guards_find_native_code_whatever_its_name_and_stray_bytecode(tmp_path):
    """The two guards above can fail: an archive with a compiled module, an ELF under a .py name, bytecode of
    another Python, bytecode with no source."""
    import importlib.util

    faulty = tmp_path / "faulty.zip"
    magic = importlib.util.MAGIC_NUMBER
    with zipfile.ZipFile(faulty, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr("pkg/_speedups.cpython-311-arm-linux-gnueabihf.so", b"\x7fELF\x01")
        archive.writestr("pkg/innocent.py", b"\x7fELF\x02\x01")
        archive.writestr("pkg/libffi.so.8", b"")
        archive.writestr("pkg/__init__.pyc", b"\x00\x00\r\n" + (1).to_bytes(4, "little"))
        archive.writestr("pkg/orphan.pyc", magic + (1).to_bytes(4, "little"))
        archive.writestr("pkg/__pycache__/x.cpython-311.pyc", magic + (0).to_bytes(4, "little"))
    with zipfile.ZipFile(faulty) as archive:
        assert native_code(archive) == ["pkg/_speedups.cpython-311-arm-linux-gnueabihf.so", "pkg/innocent.py",
                                        "pkg/libffi.so.8"]
        faults = bytecode_faults(archive, magic)
    assert sorted(faults) == [
        "pkg/__init__.pyc: bytecode of another Python (magic b'\\x00\\x00\\r\\n', not " + repr(magic) + ")",
        "pkg/__pycache__/x.cpython-311.pyc: in __pycache__, where zipimport never looks",
        "pkg/__pycache__/x.cpython-311.pyc: no source beside it, so no other Python can import it",
        "pkg/__pycache__/x.cpython-311.pyc: not unchecked-hash bytecode",
        "pkg/orphan.pyc: no source beside it, so no other Python can import it"]


CODE_ORIGIN = ("import sys; sys.path.insert(0, sys.argv[1]); import spool.cli; "
               "print(spool.cli.main.__code__.co_filename)")


def test_the_zipapp_bytecode_is_used_by_the_python_that_built_it(built):
    """Bytecode names its file spool.pyz/...; code compiled from the sources at import names the archive's path."""
    origin = subprocess.run([sys.executable, "-c", CODE_ORIGIN, str(built / "spool.pyz")], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert origin == "spool.pyz/spool/cli.py"


def test_the_zipapp_shows_help_adds_and_reports_status_with_no_home_as_an_unprivileged_user(built, box):
    pyz = built / "spool.pyz"
    result = run_zipapp(pyz, box, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage: spool" in result.stdout
    result = run_zipapp(pyz, box, "add", "pyz requests", "--count", "2", "--t", str(T0))
    assert result.returncode == 0, messages(result.stderr)
    result = run_zipapp(pyz, box, "status")
    assert result.returncode == 2, messages(result.stderr)  # failing: the record has no key, and none is configured
    assert "pending    1" in result.stdout and "health       failing" in result.stdout
    assert sorted(p.name for p in box.iterdir() if not p.name.startswith("spool.db")) == ["drop", "tmp"]


def test_the_zipapp_ships_once_to_the_receiver_and_leaves_no_temporary_file(built, box, receiver):
    pyz = built / "spool.pyz"
    assert run_zipapp(pyz, box, "add", "pyz shipped", "--value", "1.5", "--t", str(T0)).returncode == 0
    result = run_zipapp(pyz, box, "ship", "--once", "--endpoint", receiver.url, SPOOL_EZKEY=TEST_EZKEY)
    assert result.returncode == 0, messages(result.stderr)
    assert receiver.stats() == [("pyz shipped", "value", 1.5, T0, TEST_EZKEY)]
    assert "requests" in imported(result.stderr)  # the shipping path really ran from the archive
    assert list((box / "tmp").iterdir()) == []  # certifi's CA bundle file is removed at exit


def test_the_zipapp_runs_the_agent_ships_a_dropped_file_and_exits_0_on_sigterm(built, box, receiver):
    config = box / "spool.toml"
    config.write_text(f'[ship]\nendpoint = "{receiver.url}"\nmax_requests_per_second = 0\nreconnect_jitter = 0\n'
                      f'[[watch]]\npath = "{box / "drop"}"\n')
    config.chmod(0o644)
    agent = subprocess.Popen(zipapp_command(built / "spool.pyz", "--config", str(config), "run"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
                             env=clean_env(box, SPOOL_EZKEY=TEST_EZKEY))
    try:
        lines = wait_for_line(agent, "watching")
        part = box / "drop" / ".job.part"
        part.write_text(f'{{"stat": "pyz dropped", "count": 3, "t": {T0}}}\n')
        part.rename(box / "drop" / "job.jsonl")
        wait_for(lambda: [a["stat"] for a in receiver.accepted] == ["pyz dropped"])
        wait_for(lambda: (box / "drop" / ".done" / "job.jsonl").exists())
        agent.send_signal(signal.SIGTERM)
        _, stderr = agent.communicate(timeout=30)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    assert agent.returncode == 0, messages("".join(lines) + stderr)
    assert "shutting down" in stderr
    assert not any(m == "pip" or m.startswith("pip.") for m in imported("".join(lines) + stderr))


def other_python() -> str:
    """The oldest Python 3.10+ from pyenv other than the system's (3.10 is the one without tomllib)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    others = [p for p in (pyenv / "versions").glob("3.1[0-9]*/bin/python3")
              if p.resolve() != Path(SYSTEM_PYTHON).resolve() and p.resolve() != Path(sys.executable).resolve()]
    if not others:
        pytest.skip("no other Python 3.10+ here")
    return str(min(others))


def test_the_zipapp_runs_from_its_sources_on_other_pythons(built, box):
    """Bytecode is for one Python; any other 3.10+ runs the sources (as ourselves, not as nobody: pyenv's
    interpreters usually live in a home nobody may enter)."""
    python = other_python()
    origin = subprocess.run([python, "-c", CODE_ORIGIN, str(built / "spool.pyz")], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert origin == str(built / "spool.pyz" / "spool" / "cli.py")  # compiled from the source at import
    config = box / "spool.toml"
    config.write_text("[spool]\nretention = \"1d\"\n")
    for args in (["add", "old python", "--count", "1"], ["--config", str(config), "status"]):
        result = subprocess.run([python, str(built / "spool.pyz"), *args], capture_output=True, text=True,
                                env=clean_env(box, SPOOL_EZKEY=TEST_EZKEY), cwd="/", timeout=60)
        assert result.returncode == 0, (python, result.stderr)  # status: healthy (a fresh record, a key)
    assert "pending    1" in result.stdout


def test_the_zipapp_can_carry_bytecode_for_the_boxes_python(tmp_path):
    python = other_python()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build"), "--offline", "--no-deb",
                             "--bytecode-for", python, "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    origin = subprocess.run([python, "-c", CODE_ORIGIN, str(tmp_path / "spool.pyz")], capture_output=True,
                            text=True, check=True).stdout.strip()
    assert origin == "spool.pyz/spool/cli.py"


# -- the .deb ------------------------------------------------------------------------------------------------


def deb(built: Path) -> Path:
    return built / f"stathat-spool_{VERSION}_all.deb"


@pytest.fixture(scope="module")
def deb_control(built) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="spool-deb-control-"))
    try:
        subprocess.run(["dpkg-deb", "--control", str(deb(built)), str(folder)], check=True)
        yield folder
    finally:
        shutil.rmtree(folder)


def test_the_deb_says_what_it_is_and_depends_only_on_python3(built):
    info = subprocess.run(["dpkg-deb", "--info", str(deb(built))], capture_output=True, text=True, check=True).stdout
    fields = dict(line.strip().split(": ", 1) for line in info.splitlines() if ": " in line and line.startswith(" "))
    assert fields["Package"] == "stathat-spool"
    assert fields["Version"] == VERSION
    assert fields["Architecture"] == "all"
    assert fields["Depends"] == "python3 (>= 3.10)"


def test_the_deb_holds_the_zipapp_the_unit_and_the_config(built, tmp_path):
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb(built))], capture_output=True, text=True,
                             check=True).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert {"/usr/bin/spool", "/lib/systemd/system/spool.service", "/etc/spool/spool.toml"} <= files
    subprocess.run(["dpkg-deb", "-x", str(deb(built)), str(tmp_path)], check=True)
    unit = (tmp_path / "lib/systemd/system/spool.service").read_text()
    assert "ExecStart=/usr/bin/spool --config /etc/spool/spool.toml run" in unit
    assert "/opt/spool" not in unit
    assert (tmp_path / "etc/spool/spool.toml").read_text() == (ROOT / "packaging/spool.toml").read_text()
    binary = tmp_path / "usr/bin/spool"
    assert binary.stat().st_mode & 0o755 == 0o755
    assert binary.read_bytes().startswith(b"#!/usr/bin/python3 -IS\n")


def test_the_deb_holds_the_man_page_made_from_the_commands(built, tmp_path):
    import gzip

    subprocess.run(["dpkg-deb", "-x", str(deb(built)), str(tmp_path)], check=True)
    packed = tmp_path / "usr/share/man/man1/spool.1.gz"
    assert packed.stat().st_mode & 0o777 == 0o644
    page = gzip.decompress(packed.read_bytes()).decode()
    assert page.startswith(f'.TH SPOOL 1 "" "spool {VERSION}" "User Commands"')
    for command in ("add", "run", "doctor", "dead purge", "completion"):
        assert f'.SS "spool {command} ' in page
    if shutil.which("man") is not None:
        shown = subprocess.run(["man", "-l", str(packed)], capture_output=True, text=True,
                               env={**os.environ, "MANPAGER": "cat", "COLUMNS": "100"})
        assert shown.returncode == 0 and "spool doctor [OPTIONS]" in shown.stdout, shown.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_debs_unit(built, tmp_path):
    subprocess.run(["dpkg-deb", "-x", str(deb(built)), str(tmp_path)], check=True)
    unit = tmp_path / "spool.service"  # verify wants ExecStart to exist: point it at the unpacked command
    unit.write_text((tmp_path / "lib/systemd/system/spool.service").read_text()
                    .replace("/usr/bin/spool", str(tmp_path / "usr/bin/spool")))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_debs_spool_command_runs_by_its_own_shebang(built, tmp_path, box, receiver):
    """/usr/bin/python3 -IS: nothing from dist-packages, so everything the agent imports is in the file."""
    subprocess.run(["dpkg-deb", "-x", str(deb(built)), str(tmp_path)], check=True)
    binary = box / "spool"  # somewhere the unprivileged user can reach
    shutil.copy2(tmp_path / "usr/bin/spool", binary)
    prefix, _, _ = unprivileged()
    for args in (["add", "deb stat", "--count", "1", "--t", str(T0)], ["status"],
                 ["ship", "--once", "--endpoint", receiver.url]):
        result = subprocess.run([*prefix, str(binary), *args], capture_output=True, text=True, cwd="/", timeout=60,
                                env=clean_env(box, SPOOL_EZKEY=TEST_EZKEY))
        if args == ["status"]:  # degraded (exit 1): a record from T0, years ago, and nothing delivered yet
            assert result.returncode == 1 and "pending    1" in result.stdout, result.stdout + result.stderr
            continue
        assert result.returncode == 0, result.stderr
    assert receiver.stats() == [("deb stat", "count", 1, T0, TEST_EZKEY)]


def test_the_debs_conffile_is_the_config_and_its_scripts_are_valid_sh(deb_control):
    assert (deb_control / "conffiles").read_text().split() == ["/etc/spool/spool.toml"]
    for name in ("postinst", "prerm", "postrm"):
        script = deb_control / name
        assert script.stat().st_mode & 0o111, name
        assert script.read_text().startswith("#!/bin/sh\n")
        result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)
    assert "/var/lib/spool" not in "".join(line for line in (deb_control / "postrm").read_text().splitlines()
                                          if "rm " in line)  # the spool is never removed


def throwaway_root(folder: Path) -> Path:
    """A root with an empty dpkg database and a passwd that knows only root."""
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "etc"):
        (folder / sub).mkdir(parents=True)
    for name in ("status", "available"):
        (folder / "var/lib/dpkg" / name).touch()
    for name, line in (("passwd", "root:x:0:0:root:/root:/bin/sh"), ("group", "root:x:0:"),
                       ("shadow", "root:*:19000:0:99999:7:::"), ("gshadow", "root:*::")):
        (folder / "etc" / name).write_text(line + "\n")
    return folder


def dpkg(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """dpkg on the throwaway root; maintainer scripts run on this machine with DPKG_ROOT set (no chroot)."""
    result = subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", "--force-depends",
                             "--log=/dev/null", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root sets file owners: needs root")
def test_the_deb_installs_idempotently_and_its_purge_keeps_the_spool(built, tmp_path):
    root = throwaway_root(tmp_path / "root")
    dpkg(root, "--install", str(deb(built)))
    dpkg(root, "--install", str(deb(built)))  # again, as an upgrade would: postinst is idempotent
    users = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    [spool] = [u for u in users if u[0] == "spool"]
    assert spool[5:] == ["/var/lib/spool", "/usr/sbin/nologin"]
    state = (root / "var/lib/spool").stat()  # setgid, the group's: any user in the group spool may produce
    assert (state.st_uid, state.st_gid, oct(state.st_mode & 0o7777)) == (int(spool[2]), int(spool[3]), "0o2770")
    assert "Conffiles:\n /etc/spool/spool.toml" in dpkg(root, "--status", "stathat-spool").stdout
    assert (root / "usr/bin/spool").exists()
    (root / "var/lib/spool/spool.db").write_text("records not shipped yet")
    os.chown(root / "var/lib/spool/spool.db", int(spool[2]), int(spool[3]))

    purge = dpkg(root, "--purge", "stathat-spool")
    assert "/var/lib/spool is kept" in purge.stdout
    assert (root / "var/lib/spool/spool.db").read_text() == "records not shipped yet"
    assert "spool:" not in (root / "etc/passwd").read_text()
    assert not (root / "usr/bin/spool").exists()
    assert not (root / "etc/spool/spool.toml").exists()

    with open(root / "etc/passwd", "a") as passwd:  # meanwhile another user took the old uid
        passwd.write(f"other:x:{spool[2]}:{spool[3]}::/nonexistent:/usr/sbin/nologin\n")
    dpkg(root, "--install", str(deb(built)))  # back again: the kept spool belongs to the new spool user
    old_uid = spool[2]
    [spool] = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("spool:")]
    assert (root / "var/lib/spool").stat().st_uid == int(spool[2]) != int(old_uid)
    assert (root / "var/lib/spool/spool.db").stat().st_uid == int(spool[2])


@pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root sets file owners, and other users are needed: needs root")
def test_on_the_packaged_box_a_user_in_the_spool_group_produces_and_others_are_told_what_applies(built):
    folder = Path(tempfile.mkdtemp(prefix="spool-packaged-"))
    folder.chmod(0o755)  # every user reaches the installed files (pytest's own folders are root's alone)
    try:
        root = throwaway_root(folder / "root")
        root.chmod(0o755)
        (root / "var/lib/spool").mkdir(parents=True, mode=0o700)  # an earlier install's private spool, kept
        with open(root / "var/lib/spool/spool.db", "w"):
            pass
        os.chmod(root / "var/lib/spool/spool.db", 0o600)
        dpkg(root, "--install", str(deb(built)))
        [spool] = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()
                   if line.startswith("spool:")]
        uid, gid = int(spool[2]), int(spool[3])
        db = root / "var/lib/spool/spool.db"
        assert (db.stat().st_gid, oct(db.stat().st_mode & 0o777)) == (gid, "0o660")
        db.unlink()  # a fresh box: the agent's user makes it, under systemd's UMask=0077

        def as_user(user: int, groups: list[int], *args: str) -> subprocess.CompletedProcess[str]:
            who = ["setpriv", f"--reuid={user}", f"--regid={user if user != uid else gid}",
                   f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]
            env = {"HOME": "/nonexistent", "SPOOL_DB": str(db), "SPOOL_CONFIG": os.devnull,
                   "SPOOL_ENDPOINT": "http://127.0.0.1:9"}
            return subprocess.run([*who, "sh", "-c", 'umask 077; exec "$@"', "sh", str(root / "usr/bin/spool"),
                                   *args], capture_output=True, text=True, env=env, cwd="/", timeout=60)

        assert as_user(uid, [], "add", "by the agent's user", "--count", "1").returncode == 0
        assert oct(db.stat().st_mode & 0o777) == "0o660"
        nobody = pwd.getpwnam("nobody").pw_uid
        app = as_user(nobody, [gid], "add", "by an app", "--count", "1", "--t", str(T0))
        assert app.returncode == 0, messages(app.stderr)
        status = as_user(nobody, [gid], "status")
        assert "pending    2" in status.stdout, status.stdout + status.stderr
        other = as_user(nobody, [], "add", "by a stranger", "--count", "1")
        assert other.returncode == 1
        [line] = other.stderr.splitlines()  # it was `spool: error: Permission denied: /var/lib/spool/spool.db`
        assert line.startswith(f"spool: error: cannot write spool {db}: {db.parent} is not writable by nobody"), line
        assert "add this user to group" in line and "or send stats through the relay or a drop directory" in line
        doctor = as_user(nobody, [], "doctor")
        assert f"FAIL producers: {db.parent} is not writable by nobody" in doctor.stdout, doctor.stdout
    finally:
        shutil.rmtree(folder)
