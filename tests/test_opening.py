"""Opening a spool: many processes at the same instant, through symlinks, where it cannot be written."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid

import pytest

from spool.store import Store

from .helpers import TEST_EZKEY, cli_env, damage_spool, jsonl, run_cli, spawn_cli, stop_agent, wait_for, wait_for_line


def _open_and_add(db, go, i, results):
    from spool import Spool

    while not os.path.exists(go):  # every process is forked and spinning: they open the new spool together
        time.sleep(0.0005)
    try:
        with Spool(db) as sp:
            sp.count(f"s{i}", 1)
        results.put(None)
    except Exception as exc:
        results.put(repr(exc))


@pytest.mark.parametrize("attempt", range(4))
def test_processes_opening_a_new_spool_at_the_same_instant_all_commit(tmp_path, attempt):
    db, go = tmp_path / "new" / "spool.db", tmp_path / "go"
    n = 32
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    adders = [fork.Process(target=_open_and_add, args=(db, go, i, results)) for i in range(n)]
    for adder in adders:
        adder.start()
    time.sleep(0.5)  # let them all reach the wait (a late one only makes the race milder)
    go.touch()
    failures = [error for error in (results.get(timeout=60) for _ in adders) if error]
    for adder in adders:
        adder.join(10)
    assert failures == []
    with Store(db) as store:
        assert store.counts()["pending"] == n


def test_status_never_makes_a_starting_shipper_fail(db, receiver):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "add", "s", "--count", "1", env=env).returncode == 0
    peeker = subprocess.Popen([sys.executable, "-c", f"""
import sys
from spool.lock import ShipLock
lock = ShipLock({str(db)!r})
while True:
    lock.holder()
"""])
    try:
        for _ in range(10):
            result = run_cli(db, "ship", "--once", env=env)
            assert result.returncode == 0, result.stderr
    finally:
        peeker.kill()
        peeker.wait()


def test_a_second_shipper_through_a_symlink_is_refused_and_nothing_is_sent_twice(db, tmp_path, receiver):
    link = tmp_path / "link.db"
    assert run_cli(db, "add", "s", "--count", "1").returncode == 0
    os.symlink(db, link)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    agent = spawn_cli(db, "run", env=env)
    try:
        wait_for_line(agent, "shipping")
        wait_for(lambda: len(receiver.accepted) == 1)
        second = run_cli(link, "--db", str(link), "ship", "--once", env=env)
        assert second.returncode == 1 and "another shipper" in second.stderr
        for i in range(50):
            assert run_cli(link, "--db", str(link), "add", f"t{i}", "--count", "1", env=env).returncode == 0
        wait_for(lambda: len(receiver.accepted) == 51)
    finally:
        stop_agent(agent)
    assert sorted(a["stat"] for a in receiver.accepted) == sorted(["s"] + [f"t{i}" for i in range(50)])


@pytest.mark.parametrize("where", ["header", "meta", "records", "queue_runs", "series"])
def test_spool_run_moves_aside_at_start_a_spool_damaged_where_opening_looks(db, receiver, where):
    # Opening no longer reads the whole file (the full check runs in the background, after shipping starts), but
    # what SQLite cannot open, the bookkeeping tables, and the root and edges of the records and their indexes
    # (every append, lease and ack walks them) are still looked at, and damage there is set aside at start.
    assert run_cli(db, "import", "-", input=jsonl("a", "b").encode()).returncode == 0
    damage_spool(db, where)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    agent = spawn_cli(db, "run", env=env)
    try:
        wait_for_line(agent, "was corrupt")
        assert run_cli(db, "add", "fresh", "--count", "1", env=env).returncode == 0
        wait_for(lambda: [a["stat"] for a in receiver.accepted] == ["fresh"])
    finally:
        stop_agent(agent)
    assert [p.name for p in db.parent.glob("spool.db.corrupt-*")] != []


@pytest.fixture
def tmpfs(tmp_path):
    """A 600 KiB tmpfs of our own (root only), so 'read-only' and 'full' are real file system states."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    name = f"spool-test-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", name, str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def env_on(fs, db, **extra):
    """cli_env writes a config beside the spool; on a read-only or full file system it goes beside it instead."""
    env = cli_env(fs.parent / "spool-elsewhere.db", **extra)
    env["SPOOL_DB"] = str(db)
    return env


COMMANDS = [("add", "s", "--count", "1"), ("status",), ("ship", "--once", "--max-time", "5"), ("dead", "list")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_a_read_only_spool_directory_gives_one_line_that_says_what_to_do(tmpfs, command):
    folder = tmpfs / "state"
    folder.mkdir()
    db = folder / "spool.db"
    assert run_cli(db, "add", "first", "--count", "1", env=env_on(tmpfs, db)).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    result = run_cli(db, *command, env=env_on(tmpfs, db, SPOOL_EZKEY=TEST_EZKEY))
    assert result.returncode == (2 if command[0] in ("status", "ship") else 1), result.stderr  # 2: an operator must act
    [line] = result.stderr.splitlines()[-1:]
    assert line.startswith("spool: error:") and "internal error" not in line
    assert "read-only" in line or "writable" in line, line


@pytest.mark.parametrize(("command", "says"), [(COMMANDS[0], "no space left"), (COMMANDS[1], "no spool at"),
                                               (COMMANDS[2], "no spool at")], ids=["add", "status", "ship"])
def test_a_full_disk_before_the_first_open_gives_one_line_that_says_so(tmpfs, command, says):
    with open(tmpfs / "ballast", "wb", buffering=0) as ballast:
        try:
            while True:
                ballast.write(b"\0" * 4096)
        except OSError:
            pass
    db = tmpfs / "spool.db"
    result = run_cli(db, *command, env=env_on(tmpfs, db, SPOOL_EZKEY=TEST_EZKEY))
    assert result.returncode == 1, result.stderr
    line = result.stderr.splitlines()[-1]
    assert line.startswith("spool: error:") and "internal error" not in line
    assert says in line, line  # only producers create a spool; the others say there is none


def test_doctor_runs_every_check_when_the_spool_cannot_be_opened(tmpfs):
    folder = tmpfs / "state"
    folder.mkdir()
    db = folder / "spool.db"
    assert run_cli(db, "add", "first", "--count", "1", env=env_on(tmpfs, db)).returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    result = run_cli(db, "doctor", env=env_on(tmpfs, db))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    names = [line.split(":")[0] for line in result.stdout.splitlines()]
    assert "FAIL spool" in names and "ok   clock" in names and len(names) >= 6
    json.dumps(names)
