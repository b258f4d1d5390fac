"""A daemon that behaves: SIGHUP reloads, systemd hears READY/RELOADING/STOPPING and watchdog pings, logs
carry their priority under journald, metrics and health have a port of their own. Real processes only."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections import Counter

import requests

from .helpers import (
    T0,
    TEST_EZKEY,
    UNPACED,
    cli_env,
    drop,
    free_port,
    jsonl,
    spawn_cli,
    stop_agent,
    wait_for,
    wait_for_line,
)


def config_text(receiver, port, *watched, batch_size=100):
    text = UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = {batch_size}\n'
    text += f'[relay]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
    return text + "".join(f'[[watch]]\npath = "{path}"\nsettle = 0\n' for path in watched)


class Lines:
    """Read a process's stderr in a thread, keeping every line."""

    def __init__(self, process):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self.thread.start()

    def _read(self, process):
        for line in process.stderr:
            self.lines.append(line)

    def has(self, text):
        return any(text in line for line in self.lines)


def test_sighup_reloads_what_changed_and_loses_or_repeats_nothing(tmp_path, db, receiver):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    port = free_port()
    config = tmp_path / "spool.toml"
    config.write_text(config_text(receiver, port, first))
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    log = Lines(agent)
    sent, failures, stop = Counter(), [], threading.Event()

    def relay_client():  # a StatHat client posting through the reload: never refused, never lost
        session, n = requests.Session(), 0
        while not stop.is_set():
            answer = session.post(f"http://127.0.0.1:{port}/ez", data={"ezkey": TEST_EZKEY, "stat": f"r{n}",
                                                                      "count": 1, "t": T0})
            if answer.status_code == 204:
                sent[f"r{n}"] += 1
            else:
                failures.append(answer.status_code)
            n += 1

    try:
        wait_for(lambda: log.has("relay listening"))
        client = threading.Thread(target=relay_client)
        client.start()
        drop(first, "one.jsonl", jsonl("from a"))
        wait_for(lambda: any(a["stat"] == "from a" for a in receiver.accepted))
        config.write_text(config_text(receiver, port, first, second, batch_size=10))
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reloaded the configuration"))
        drop(second, "two.jsonl", jsonl("from b"))
        wait_for(lambda: any(a["stat"] == "from b" for a in receiver.accepted))
        stop.set()
        client.join()
        wait_for(lambda: sum(1 for a in receiver.accepted if a["stat"].startswith("r")) == sum(sent.values()))
    finally:
        stop.set()
        stop_agent(agent)
    reloaded = next(line for line in log.lines if "reloaded the configuration" in line)
    assert "restarted ship, watch" in reloaded and "relay" not in reloaded  # the relay's settings did not change
    assert failures == []  # the relay answered all along
    got = Counter(a["stat"] for a in receiver.accepted)
    assert got == Counter({**sent, "from a": 1, "from b": 1})
    assert max(receiver.batches[-3:]) <= 10  # the new batch size took effect


def test_an_invalid_config_on_reload_is_refused_and_the_running_one_kept(tmp_path, db, receiver):
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n')
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    log = Lines(agent)
    try:
        wait_for(lambda: log.has("shipping"))
        config.write_text("[ship]\nbatch_size = 'many'\n")
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reload refused"))
        from .helpers import run_cli

        assert run_cli(db, "add", "still shipping", "--count", "1", "--t", str(T0)).returncode == 0
        wait_for(lambda: [a["stat"] for a in receiver.accepted] == ["still shipping"])
    finally:
        stop_agent(agent)
    assert any("ship.batch_size must be a whole number" in line for line in log.lines)


def test_systemd_hears_ready_reloading_stopping_and_watchdog_pings(tmp_path, db, receiver):
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n')
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, NOTIFY_SOCKET=address, WATCHDOG_USEC="200000")
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    messages: list[str] = []

    def until(state):
        while not any(state in m for m in messages):
            messages.append(listener.recv(4096).decode())

    try:
        until("READY=1")
        until("WATCHDOG=1")
        agent.send_signal(signal.SIGHUP)
        until("RELOADING=1")
        reloading = next(m for m in messages if "RELOADING=1" in m)
        assert "MONOTONIC_USEC=" in reloading
        count = len(messages)
        while not any("READY=1" in m for m in messages[count:]):
            messages.append(listener.recv(4096).decode())
    finally:
        stop_agent(agent)
        until("STOPPING=1")
        listener.close()
    assert sum("WATCHDOG=1" in m for m in messages) >= 1


def test_under_journald_every_line_carries_its_priority(db):
    env = cli_env(db, JOURNAL_STREAM="8:12345")  # what systemd sets when stderr is the journal
    agent = spawn_cli(db, "run", env=env)
    first = wait_for_line(agent, "spool agent")
    stderr = "".join(first) + stop_agent(agent)
    lines = [line for line in stderr.splitlines() if line]
    assert lines and all(line[:3] in ("<3>", "<4>", "<6>", "<7>") for line in lines), lines
    assert any(line.startswith("<4>WARNING no ezkey configured") for line in lines)


def test_json_log_lines_when_asked(db):
    agent = spawn_cli(db, "run", "--log-format", "json", "--log-level", "debug")
    wait_for_line(agent, "spool agent")
    stderr = stop_agent(agent)
    entries = [json.loads(line) for line in stderr.splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= entries[0].keys()
    assert any(entry["message"] == "shutting down" for entry in entries)


def test_metrics_and_health_have_a_port_of_their_own_without_the_relay(tmp_path, db, receiver):
    port = free_port()
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    try:
        wait_for_line(agent, "metrics and health on")
        metrics = requests.get(f"http://127.0.0.1:{port}/metrics").text
        health = requests.get(f"http://127.0.0.1:{port}/healthz")
    finally:
        stop_agent(agent)
    for name in ("process_resident_memory_bytes", "spool_build_info", 'spool_records{state="pending"}',
                 "spool_ship_request_seconds_bucket", "spool_ship_in_flight"):
        assert name in metrics, name
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_sighup_to_a_command_without_the_full_agent_does_not_kill_it(db):
    agent = spawn_cli(db, "ship")
    wait_for_line(agent, "shipping")
    agent.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert agent.poll() is None
    stop_agent(agent)


def test_sigterm_does_not_wait_out_a_long_timeout_for_answers_that_do_not_come(db, receiver, tmp_path):
    # systemd kills a unit that is not gone after TimeoutStopSec (30 s in ours): with `timeout = "120s"` the
    # agent waited for the receiver's answers that long. It now waits a few seconds, then cuts them short.
    from spool.api import Spool

    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(30))
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = 10\ntimeout = "120s"\n')
    receiver.hold_after_accept_next(3, seconds=120)  # batches taken, no answer for two minutes
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    wait_for(lambda: receiver.holding.is_set(), timeout=30)  # the first batch is in flight (the limit starts at 1)
    asked = time.monotonic()
    stderr = stop_agent(agent)
    assert time.monotonic() - asked < 25, stderr  # STOP_WAIT (5 s) and the hand-back, far from 120 s
    assert "requests still unanswered 5 s after shutdown was asked: cut short" in stderr, stderr
    assert "cut short before its answer came: spool is stopping; its records stay pending" in stderr, stderr
    assert "no complete answer within" not in stderr and "retrying in" not in stderr, stderr  # why it ended, truly
    with Spool(db) as sp:  # unanswered is not delivered: every record waits to be sent again
        status = sp.status()
    assert (status["pending"], status["inflight"], status["sent"]) == (30, 0, 0)


def _slow_receiver_config(receiver, *, batch_size, timeout, stop_wait):
    return UNPACED + (f'endpoint = "{receiver.url}"\nbatch_size = {batch_size}\ntimeout = "{timeout}s"\n'
                      f'stop_wait = "{stop_wait}s"\n')


def test_a_reload_waits_for_the_answers_in_flight_and_sends_no_record_twice(db, receiver, tmp_path):
    # A SIGHUP that retuned [ship] cut the requests still waiting for answers due well within ship.timeout, and
    # the new shipper sent their records again: StatHat counted them twice. Only a real stop cuts requests.
    from spool.api import Spool

    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(30))
    config = tmp_path / "spool.toml"
    config.write_text(_slow_receiver_config(receiver, batch_size=10, timeout=5, stop_wait=0.3))
    receiver.latency = 2.0  # every answer comes 2 s after its request: past stop_wait, within timeout
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    log = Lines(agent)
    try:
        wait_for(lambda: receiver.in_flight > 0)  # a batch waits for its answer
        config.write_text(_slow_receiver_config(receiver, batch_size=20, timeout=5, stop_wait=0.3))
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reloaded the configuration"))
        with Spool(db) as sp:
            wait_for(lambda: sp.status()["sent"] == 30)
        wait_for(lambda: receiver.in_flight == 0)  # a request cut short would still be taken by now
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)  # what the reader thread did not take, communicate() did
    assert Counter(a["stat"] for a in receiver.accepted) == Counter(f"s{i}" for i in range(30))
    assert "reloaded the configuration: restarted ship" in stderr, stderr
    assert "cut short" not in stderr and "no complete answer" not in stderr, stderr


def test_a_sigterm_while_a_reload_awaits_answers_still_cuts_them_after_stop_wait(db, receiver, tmp_path):
    from spool.api import Spool

    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(10))
    config = tmp_path / "spool.toml"
    config.write_text(_slow_receiver_config(receiver, batch_size=10, timeout=120, stop_wait=0.3))
    receiver.hold_after_accept_next(1, seconds=120)  # taken, no answer for two minutes
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    wait_for(lambda: receiver.holding.is_set())
    config.write_text(_slow_receiver_config(receiver, batch_size=5, timeout=120, stop_wait=0.3))
    agent.send_signal(signal.SIGHUP)  # the reload waits for that answer (it may come within ship.timeout)...
    wait_for_line(agent, "awaiting the answers to 1 requests in flight")
    stderr = stop_agent(agent)  # ...but a stop does not: cut short after stop_wait, exit 0 (within 30 s)
    assert "cut short" in stderr and "stopping before the reload finished" in stderr, stderr
    with Spool(db) as sp:
        status = sp.status()
    assert (status["pending"], status["inflight"], status["sent"]) == (10, 0, 0)


# -- the configured key: fixed while the agent runs, with or without a reload ------------------------------

REVOKED = "revoked-key-0123456"


def _keyless(db, n=3):
    from spool.api import Spool

    with Spool(db) as sp:
        sp.add_many({"stat": f"k{i}", "count": 1, "t": T0 + i} for i in range(n))


def _key_agent(db, receiver, key_file):
    env = cli_env(db, SPOOL_EZKEY_FILE=str(key_file), SPOOL_ENDPOINT=receiver.url)
    agent = spawn_cli(db, "run", env=env)
    return agent, Lines(agent)


def _write_key(path, key, *, rename=False):
    target = path.with_name(".ezkey.new") if rename else path
    target.write_text(key + "\n")  # in place: the same inode, truncated and rewritten
    target.chmod(0o600)
    if rename:
        target.rename(path)


def _paused_on_a_refused_key(db, receiver, key_file):
    """An agent whose key file holds a key the receiver refuses, paused on it; (agent, log)."""
    _write_key(key_file, REVOKED)
    receiver.refuse_key(REVOKED)
    _keyless(db)
    agent, log = _key_agent(db, receiver, key_file)
    try:
        wait_for(lambda: log.has("refused the configured ezkey"))
    except BaseException:
        stop_agent(agent)
        raise
    return agent, log


def test_a_key_file_fixed_in_place_resumes_shipping_without_a_reload(db, receiver, tmp_path):
    # Paused on a refused key, the agent went on sending the old key for ever: it never looked at the file again.
    key_file = tmp_path / "ezkey"
    agent, log = _paused_on_a_refused_key(db, receiver, key_file)
    try:
        _write_key(key_file, TEST_EZKEY)
        wait_for(lambda: len(receiver.accepted) == 3)
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert {a["ezkey"] for a in receiver.accepted} == {TEST_EZKEY}
    assert stderr.count("the ezkey was changed; shipping resumed") == 1, stderr
    assert REVOKED not in stderr and TEST_EZKEY not in stderr


def test_a_key_file_replaced_then_a_reload_restarts_shipping_with_the_new_key(db, receiver, tmp_path):
    # The reload compared the settings only (the file's path): "nothing changed", and the old key stayed.
    key_file = tmp_path / "ezkey"
    agent, log = _paused_on_a_refused_key(db, receiver, key_file)
    try:
        _write_key(key_file, TEST_EZKEY, rename=True)
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reloaded the configuration"))
        wait_for(lambda: len(receiver.accepted) == 3)
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert "reloaded the configuration: restarted ship" in stderr, stderr
    assert REVOKED not in stderr and TEST_EZKEY not in stderr


def test_a_key_file_created_after_start_starts_shipping(db, receiver, tmp_path):
    key_file = tmp_path / "ezkey"
    _keyless(db)
    agent, log = _key_agent(db, receiver, key_file)
    try:
        wait_for(lambda: log.has("cannot read ship.ezkey_file"))
        _write_key(key_file, TEST_EZKEY, rename=True)
        wait_for(lambda: len(receiver.accepted) == 3)
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert stderr.count("the ezkey was changed; shipping resumed") == 1, stderr


def test_a_refused_configured_key_holds_only_its_records_and_leaves_them_pending_not_in_flight(db, receiver, tmp_path):
    from spool.api import Spool

    receiver.refuse_key(REVOKED)
    _keyless(db)
    with Spool(db) as sp:
        sp.count("own", 1, t=T0, ezkey="own-account-key")
        sp.classic_count(key="stat-key", ukey="user-key", t=T0)
    env = cli_env(db, SPOOL_EZKEY=REVOKED, SPOOL_ENDPOINT=receiver.url)
    agent = spawn_cli(db, "run", env=env)
    log = Lines(agent)
    try:
        wait_for(lambda: sorted(a.get("stat") or a["key"] for a in receiver.accepted) == ["own", "stat-key"])
        with Spool(db) as sp:
            def paused():  # the records the key holds are pending, as the pause says; none stays leased
                status.update(sp.status())
                return ((status["pending"], status["inflight"]) == (3, 0)
                        and any("refused the configured ezkey" in problem for problem in status["problems"]))

            status: dict = {}
            wait_for(paused)
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert REVOKED not in stderr and REVOKED not in str(status)


# -- a reload keeps the link's back-off and does not wait the start-up jitter again ---------------------------


def test_a_reload_keeps_the_receivers_retry_after(db, receiver, tmp_path):
    # A new shipper started with a clean slate: every SIGHUP sent a request at once into a receiver that had
    # asked for 30 s of quiet.
    _keyless(db)
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = 10\n')
    receiver.fail_next(1000, retry_after="30")
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    log = Lines(agent)
    try:
        wait_for(lambda: log.has("retrying in"))
        config.write_text(UNPACED + f'endpoint = "{receiver.url}"\nbatch_size = 5\n')
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reloaded the configuration"))
        wait_for(lambda: log.has("backing off"))  # the new shipper waits out what the old one was told
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert "reloaded the configuration: restarted ship" in stderr, stderr
    assert receiver.requests == 1, stderr


def test_a_reload_does_not_wait_the_start_up_jitter_again(db, receiver, tmp_path):
    _keyless(db)
    config = tmp_path / "spool.toml"
    ship = (f'[ship]\nmax_requests_per_second = 0\nreconnect_jitter = "0.5s"\nbackoff_max = "1s"\n'
            f'endpoint = "{receiver.url}"\n')
    config.write_text(ship + "batch_size = 10\n")
    receiver.fail_next(1000)  # the backlog stays
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    log = Lines(agent)
    try:
        wait_for(lambda: log.has("(jitter)") and log.has("send failed"))
        config.write_text(ship + "batch_size = 5\n")
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: log.has("reloaded the configuration"))
        sent = receiver.requests
        wait_for(lambda: receiver.requests > sent)  # the new shipper sends
    finally:
        stderr = "".join(log.lines) + stop_agent(agent)
    assert "reloaded the configuration: restarted ship" in stderr, stderr
    assert stderr.count("(jitter)") == 1, stderr
