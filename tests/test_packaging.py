"""Packaging: the systemd unit is valid, the wheel carries what it must, the README says how to deploy."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "packaging" / "spool.service"


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_has_the_hardening_and_lifecycle_directives_we_document():
    unit = unit_sections()
    service = unit["Service"]
    assert service["ExecStart"].split()[0].endswith("/bin/spool")  # the console script itself: signals arrive
    assert service["ExecStart"].split()[-1] == "run"
    for directive, value in [("User", "spool"), ("StateDirectory", "spool"), ("ProtectSystem", "strict"),
                             ("NoNewPrivileges", "true"), ("PrivateTmp", "true"), ("Restart", "on-failure")]:
        assert service[directive] == value, directive
    assert 10 < int(service["TimeoutStopSec"]) <= 90
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_every_directive_in_the_unit_is_commented():
    """Each directive sits in a run of directives whose first line has a comment above it."""
    lines = UNIT.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" not in line or line.startswith("#"):
            continue
        above = number - 1
        while above >= 0 and "=" in lines[above] and not lines[above].startswith("#"):
            above -= 1
        assert above >= 0 and lines[above].startswith("#"), f"line {number + 1} '{line}' has no comment above it"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    spool = Path(sys.executable).parent / "spool"  # verify wants ExecStart to exist: use the real console script
    unit = tmp_path / "spool.service"
    unit.write_text(UNIT.read_text().replace("/opt/spool/bin/spool", str(spool)))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_wheel_contains_the_package_and_its_type_marker(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(ROOT)], check=True,
                   capture_output=True)
    [wheel] = tmp_path.glob("stathat_spool-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "spool").rglob("*.py")}  # subpackages too
    assert modules <= names
    assert "spool/py.typed" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "spool = spool.__main__:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_readme_says_how_to_install_the_packaging_files():
    readme = (ROOT / "README.md").read_text()
    assert "packaging/spool.service /etc/systemd/system/spool.service" in readme
    assert "packaging/spool.toml /etc/spool/spool.toml" in readme
