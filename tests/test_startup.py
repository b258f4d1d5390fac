"""Start-up that does not read the whole file: producers' doors open and shipping starts at once; the full integrity
check runs in the background only after an unclean stop, once shipping is idle; `doctor --deep` runs it on demand.
Real `spool run` processes, a real receiver, real damage to the file."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import threading

import requests

from spool.api import Spool
from spool.store import PAGE_SIZE

from .helpers import T0, TEST_EZKEY, UNPACED, cli_env, drop, jsonl, run_cli, spawn_cli, wait_for


class Agent:
    """A `spool run` subprocess whose stderr is read, line by line, in a thread of the test; killed on exit if a
    failed test left it running."""

    def __init__(self, db, config, **env):
        self.process = spawn_cli(db, "--config", str(config), "run",
                                 env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY, **env))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)

    def has(self, text):
        return any(text in line for line in self.lines)

    def line(self, text):
        """Wait for a line with `text`; return it."""
        wait_for(lambda: self.has(text), timeout=30)
        return next(line for line in self.lines if text in line)

    def stop(self, sig=signal.SIGTERM):
        self.process.send_signal(sig)
        self.process.wait(30)
        self.reader.join(10)
        self.process.stdout.close()
        self.process.stderr.close()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.stop(signal.SIGKILL)

    def relay_url(self):
        return re.search(r"relay listening on (http://\S+?)[,\s]", self.line("relay listening on")).group(1)


def config_file(tmp_path, receiver, *, relay=False, watched=None):
    text = UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = 500\n'
    if relay:
        text += '[relay]\nenabled = true\nlisten = "127.0.0.1:0"\n'
    if watched is not None:
        text += f'[[watch]]\npath = "{watched}"\nsettle = 0\n'
    path = tmp_path / "spool.toml"
    path.write_text(text)
    return path


def backlog(db, n, start=0):
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(start, start + n))


def integrity(db):
    result = run_cli(db, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["integrity"]


def test_producers_are_served_and_shipping_goes_on_while_the_background_check_runs(tmp_path, db, receiver):
    # `spool run` ran SQLite's quick check of the whole file before anything started: at 50M records, 35 s
    # (94 s from a cold disk) with the relay refusing StatHat clients and drop files waiting. Now the check
    # runs beside them; a pause of an hour per step keeps it running for the whole test, deterministically.
    watched = tmp_path / "drop"
    watched.mkdir()
    backlog(db, 3000)  # never shipped by an agent: no clean stop recorded, so the check is owed
    with Agent(db, config_file(tmp_path, receiver, relay=True, watched=watched),
               SPOOL_SPOOL_INTEGRITY_PAUSE="1h") as agent:
        agent.line("integrity check: shipping is idle")
        assert len(receiver.accepted) == 3000  # the backlog shipped first
        assert integrity(db)["state"] == "checking"
        answer = requests.post(f"{agent.relay_url()}/ez", data={"ezkey": TEST_EZKEY, "stat": "relayed",
                                                                "count": 1, "t": T0})
        assert answer.status_code == 204, answer.text
        drop(watched, "late.jsonl", jsonl("dropped"))
        wait_for(lambda: {"relayed", "dropped"} <= {a["stat"] for a in receiver.accepted})
        wait_for(lambda: (watched / ".done" / "late.jsonl").exists())
        assert integrity(db)["state"] == "checking"  # all of it happened while the check ran
        assert agent.stop() == 0, agent.lines
    assert agent.has("integrity check stopped before it finished")
    assert integrity(db)["state"] == "owed"  # cut short by the stop: the next start checks again


def test_after_a_clean_stop_nothing_is_checked_and_after_a_kill_the_next_start_ships_first_then_checks(
        tmp_path, db, receiver):
    config = config_file(tmp_path, receiver)
    backlog(db, 100)
    with Agent(db, config) as first:
        first.line("integrity check: the spool is sound")
        assert first.stop() == 0, first.lines
    checked = integrity(db)
    assert checked["state"] == "sound"

    backlog(db, 100, start=100)
    with Agent(db, config) as second:
        second.line("the last stop was clean")
        wait_for(lambda: len(receiver.accepted) == 200 and shipped(db) == 200)  # answered, and marked sent
        assert second.stop(signal.SIGKILL) == -signal.SIGKILL
    assert not second.has("integrity check:")  # no check was started
    assert integrity(db) == checked  # the verdict of the first run's check stands

    backlog(db, 2000, start=200)
    with Agent(db, config) as third:
        third.line("the last stop was not clean")
        third.line("integrity check: shipping is idle")
        assert len(receiver.accepted) == 2200  # everything shipped before the check began
        third.line("integrity check: the spool is sound")
        assert third.stop() == 0, third.lines
    assert integrity(db)["at"] > checked["at"]


def shipped(db) -> int:
    """Records marked sent (a kill after the receiver's answer but before that mark resends the batch)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT coalesce(sum(hi - lo + 1), 0) FROM settled").fetchone()[0]  # runs acknowledged


def leaf_in_the_middle_of_the_records(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        leaves = [row[0] for row in conn.execute(
            "SELECT pageno FROM dbstat WHERE name = 'records' AND pagetype = 'leaf' ORDER BY path")]
    assert len(leaves) > 20
    return leaves[len(leaves) // 2]


def doctor_says(db, *args):
    result = run_cli(db, "doctor", *args)
    [line] = [line for line in result.stdout.splitlines() if line[5:].startswith("spool:")]
    return line


def test_damage_deep_in_the_records_is_found_in_the_background_the_agent_ships_on_and_sets_it_aside_next_start(
        tmp_path, db, receiver):
    backlog(db, 3000)
    assert run_cli(db, "ship", "--once", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY,
                                                    SPOOL_ENDPOINT=receiver.url)).returncode == 0
    page = leaf_in_the_middle_of_the_records(db)  # sent records, kept for replay: no append or lease reads it
    with open(db, "r+b") as f:
        f.seek((page - 1) * PAGE_SIZE)
        f.write(b"\xde\xad\xbe\xef" * (PAGE_SIZE // 4))
    assert doctor_says(db).startswith("ok   spool: bookkeeping sound")  # plain doctor does not read every page

    with Agent(db, config_file(tmp_path, receiver, relay=True)) as agent:
        found = agent.line("is DAMAGED")
        assert "ERROR" in found and "next start of `spool run` moves the file aside" in found
        answer = requests.post(f"{agent.relay_url()}/ez", data={"ezkey": TEST_EZKEY, "stat": "after", "count": 1,
                                                                "t": T0})
        assert answer.status_code == 204, answer.text
        wait_for(lambda: any(a["stat"] == "after" for a in receiver.accepted))  # it ships what it can
        health = requests.get(f"{agent.relay_url()}/healthz")
        assert health.status_code == 503 and "damaged" in " ".join(health.json()["problems"])
        deep = doctor_says(db, "--deep")
        assert deep.startswith("FAIL spool: the full integrity check") and "found damage" in deep
        second = run_cli(db, "relay", env=cli_env(db, SPOOL_RELAY_LISTEN="127.0.0.1:0"))
        assert second.returncode == 1 and "not moved aside while a shipper" in second.stderr  # not under it
        assert db.exists()
        assert agent.stop() == 0, agent.lines

    with Agent(db, config_file(tmp_path, receiver)) as restarted:
        restarted.line("was corrupt (a full integrity check found damage")
        restarted.line("integrity check: the spool is sound")  # the fresh spool's
        assert restarted.stop() == 0, restarted.lines
    assert [p.name for p in tmp_path.glob("spool.db.corrupt-*")]


def test_doctor_deep_finds_what_plain_doctor_does_not_read(db):
    backlog(db, 3000)
    page = leaf_in_the_middle_of_the_records(db)
    with open(db, "r+b") as f:
        f.seek((page - 1) * PAGE_SIZE)
        f.write(b"\0" * PAGE_SIZE)
    assert "no full check recorded" in doctor_says(db)
    assert "found damage" in doctor_says(db, "--deep")
    assert "found damage" in doctor_says(db)  # recorded: every doctor says so until the file is set aside
