"""One health verdict, shown everywhere the same: `spool status` (its lines, --json and exit status), /healthz, the
agent's minute summary and systemd's STATUS= all say what spool.health's `assess` says of the same facts.

A problem is logged once when it starts and once when it ends, and nothing stale is shown as current: the last
error of a problem that is over is not the shipper's problem now, and the last attempt is the last attempt.
"""

from __future__ import annotations

import json
import re
import socket
import time

import pytest
import requests

from spool import Spool
from spool.health import DEGRADED, FAILING, OK, Facts, assess
from spool.store import Store

from .helpers import (
    TEST_EZKEY,
    UNPACED,
    cli_env,
    free_port,
    run_cli,
    spawn_cli,
    stop_agent,
    wait_for,
    wait_for_line,
)

NOW = 1_800_000_000.0


# -- the verdict, from the facts ------------------------------------------------------------------------------


@pytest.mark.parametrize(("facts", "verdict", "says"), [
    (Facts(now=NOW), OK, []),
    (Facts(now=NOW, pending=5, oldest_pending_age=3, last_success_at=NOW - 3600), OK, []),  # just appended
    (Facts(now=NOW, pending=5, oldest_pending_age=1000, last_success_at=NOW - 10), OK, []),  # delivering
    (Facts(now=NOW, pending=5, oldest_pending_age=1000, last_success_at=NOW - 1000), DEGRADED,
     ["5 records waiting and nothing delivered for 1000 s"]),
    (Facts(now=NOW, pending=5, oldest_pending_age=1000, shipper_running=False), DEGRADED,
     ["5 records waiting and nothing delivered yet; no shipper is running"]),
    (Facts(now=NOW, pending=5, oldest_pending_age=1000, started_at=NOW - 60), OK, []),  # the agent just started
    (Facts(now=NOW, problem={"kind": "link", "text": "HTTP 503", "since": NOW - 480}), DEGRADED,
     ["the receiver is failing since 2027-01-15 07:52:00 UTC (8 min); retrying: HTTP 503"]),
    (Facts(now=NOW, problem={"kind": "key", "text": "the key file is empty", "since": NOW - 30}), FAILING,
     ["shipping is paused since 2027-01-15 07:59:30 UTC (30 s): the key file is empty"]),
    (Facts(now=NOW, problem={"kind": "endpoint", "text": "HTTP 404", "since": NOW}, shipper_running=False), FAILING,
     ["(as the last shipper left it; none runs now)"]),
    (Facts(now=NOW, pending=2, keyless=2, oldest_pending_age=1), FAILING, ["2 pending records carry no ezkey"]),
    (Facts(now=NOW, pending=2000, keyless=1000, keyless_more=True, oldest_pending_age=1), FAILING,
     ["1,000+ pending records carry no ezkey"]),
    (Facts(now=NOW, dead=1), DEGRADED, ["1 record refused by the receiver (see `spool dead list`)"]),
    (Facts(now=NOW, held=3), DEGRADED, ["3 records stamped while the system clock was wrong"]),
    (Facts(now=NOW, inflight=4, shipper_running=False, oldest_pending_age=1), DEGRADED,
     ["4 records leased by a shipper that is no longer running"]),
    (Facts(now=NOW, writable=False, uid=1001), FAILING, ["the spool is not writable by uid 1001"]),
    (Facts(now=NOW, commit_error="disk I/O error"), FAILING, ["the last commit failed: disk I/O error"]),
    (Facts(now=NOW, integrity={"state": "damaged", "detail": "page 7"}), FAILING,
     ["the spool is damaged (the full integrity check found: page 7)"]),
    (Facts(now=NOW, integrity={"state": "owed"}), OK, []),
], ids=lambda v: None if isinstance(v, Facts | list) else v)
def test_the_verdict_says_every_current_problem(facts, verdict, says):
    health = assess(facts)
    assert health.verdict == verdict and health.exit_status == {OK: 0, DEGRADED: 1, FAILING: 2}[verdict]
    assert len(health.problems) == len(says)
    for text, problem in zip(says, health.problems, strict=True):
        assert text in problem.text, problem.text


def test_failing_problems_come_first_and_the_summary_names_the_first():
    health = assess(Facts(now=NOW, dead=1, problem={"kind": "key", "text": "refused", "since": NOW}))
    assert [p.level for p in health.problems] == [FAILING, DEGRADED]
    assert health.summary() == ("failing: shipping is paused since 2027-01-15 08:00:00 UTC (0 s): refused (and 1 "
                                "more problem)")
    assert assess(Facts(now=NOW)).summary() == "ok"


# -- `spool status`: the verdict, its exit status, the endpoint ---------------------------------------------


def status(db, env=None):
    result = run_cli(db, "status", "--json", env=env)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_status_exits_0_when_healthy_and_shows_the_endpoint_without_a_key(db, receiver):
    with Spool(db) as sp:
        sp.count("s", 1)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "ship", "--once", env=env).returncode == 0
    code, report = status(db, env)
    assert code == 0 and report["health"] == {"verdict": "ok", "problems": []} and report["problems"] == []
    assert report["endpoint"] == receiver.url and report["last_success_at"] is not None
    human = run_cli(db, "status", env=env)
    assert human.returncode == 0 and "health       ok\n" in human.stdout
    assert f"endpoint     {receiver.url}\n" in human.stdout and TEST_EZKEY not in human.stdout + json.dumps(report)


def test_status_exits_1_when_degraded_and_lists_the_problem(db, receiver):
    receiver.refuse_stat("bad")
    with Spool(db) as sp:
        sp.count("bad", 1)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    run_cli(db, "ship", "--once", env=env)
    code, report = status(db, env)
    assert code == 1 and report["health"]["verdict"] == "degraded"
    assert report["health"]["problems"] == [{"level": "degraded",
                                             "text": "1 record refused by the receiver (see `spool dead list`)"}]
    assert report["problems"] == ["1 record refused by the receiver (see `spool dead list`)"]
    assert run_cli(db, "status", env=env).returncode == 1


def test_status_exits_2_when_records_wait_for_an_operator(db):
    with Spool(db) as sp:
        sp.count("keyless", 1)
    code, report = status(db)
    assert code == 2 and report["health"]["verdict"] == "failing"
    assert "1 pending record carries no ezkey" in report["problems"][0]


def test_status_shows_the_shipping_problem_a_cron_run_left_until_a_later_run_solves_it(db, receiver):
    receiver.fail_next(100_000)
    with Spool(db) as sp:
        sp.count("s", 1)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "ship", "--once", "--max-time", "1", env=env).returncode == 1
    code, report = status(db, env)
    assert code == 1, report
    [problem] = report["problems"]
    assert problem.startswith("the receiver is failing since ") and "retrying: HTTP 503" in problem, problem
    assert problem.endswith("(as the last shipper left it; none runs now)"), problem
    receiver.fail_next(0)
    with receiver._lock:
        receiver._faults.clear()
    shipped = run_cli(db, "ship", "--once", "--log-format", "json", env=env)
    assert shipped.returncode == 0, shipped.stderr
    [said] = [json.loads(line) for line in shipped.stderr.splitlines()
              if line.startswith("{") and "shipping recovered after" in line]
    assert said["message"].endswith("; 1 record delivered since"), said
    assert (said["error_kind"], said["delivered"], said["component"]) == ("link", 1, "ship") and said["lasted"] >= 0
    assert status(db, env)[0] == 0


def test_a_key_problem_stays_the_problem_while_records_with_their_own_key_ship(db, receiver, tmp_path):
    # The status read its problems from the last attempt: each delivery of records carrying their own key made it
    # `ok`, and the paused key vanished from the problems (and the exit status) until its next probe.
    receiver.refuse_key("revoked-key-0123")
    with Spool(db) as sp:
        sp.count("needs the configured key", 1)
    config = agent_config(tmp_path, receiver)
    env = cli_env(db, SPOOL_EZKEY="revoked-key-0123")
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        wait_for_line(agent, "refused the configured ezkey")
        with Spool(db) as sp:
            sp.count("own key", 1, ezkey="own-account-key")
        wait_for(lambda: [a["stat"] for a in receiver.accepted] == ["own key"])
        wait_for(lambda: status(db, {**env, "SPOOL_CONFIG": str(config)})[1]["last_result"] == "ok")
        code, report = status(db, {**env, "SPOOL_CONFIG": str(config)})
    finally:
        stop_agent(agent)
    assert report["last_error"] is None  # the last attempt is the last attempt: it succeeded
    assert code == 2 and any(p.startswith("shipping is paused since ") and "refused the configured ezkey" in p
                             for p in report["problems"]), report
    assert "revoked-key-0123" not in json.dumps(report)


def test_the_last_attempt_is_the_last_attempt_and_its_error_clears_when_one_succeeds(db, receiver):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    with Spool(db) as sp:
        sp.count("good", 1)
    run_cli(db, "ship", "--once", env=env)
    first = status(db, env)[1]
    assert (first["last_result"], first["last_error"]) == ("ok", None)
    receiver.refuse_stat("bad")
    with Spool(db) as sp:
        sp.count("bad", 1)
    run_cli(db, "ship", "--once", env=env)
    second = status(db, env)[1]
    assert second["last_result"] == "refused" and second["last_error"] == "invalid stat name"
    assert second["last_attempt_at"] > first["last_attempt_at"]
    with Spool(db) as sp:
        sp.count("good again", 1)
    run_cli(db, "ship", "--once", env=env)
    third = status(db, env)[1]
    assert (third["last_result"], third["last_error"]) == ("ok", None)
    assert third["last_attempt_at"] > second["last_attempt_at"]


# -- the agent: /healthz, the summary, systemd's STATUS=, and a problem's start and end --------------------


def agent_config(tmp_path, receiver, *, key_file=None, relay_port=None):
    text = UNPACED + f'endpoint = "{receiver.url}"\n'
    if key_file is not None:
        text += f'ezkey_file = "{key_file}"\n'
    text += '[log]\nsummary_interval = "1s"\n'
    if relay_port is not None:
        text += f'[relay]\nenabled = true\nlisten = "127.0.0.1:{relay_port}"\n'
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def ageless(problems):
    """Problems without how long ago they began (two readings a second apart differ there only)."""
    return [re.sub(r" \(\d+(\.\d)? (s|min|h|d)\)", "", problem) for problem in problems]


def test_an_empty_key_file_at_start_is_the_agents_problem_everywhere_until_it_is_fixed(db, receiver, tmp_path):
    key_file = tmp_path / "ezkey"
    key_file.write_text("")
    key_file.chmod(0o600)
    with Spool(db) as sp:
        sp.count("s", 1)
    port = free_port()
    config = agent_config(tmp_path, receiver, key_file=key_file, relay_port=port)
    env = cli_env(db)
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        paused = wait_for_line(agent, "shipping paused: ship.ezkey_file")[-1]
        assert "the key file is looked at every 5 s: shipping resumes by itself once it is fixed" in paused, paused
        summary = wait_for_line(agent, "health: failing: shipping is paused since")[-1]
        assert "is empty" in summary, summary
        code, report = status(db, {**env, "SPOOL_CONFIG": str(config)})
        assert report["shipper_pid"] == agent.pid and code == 2, report
        assert any("shipping is paused since" in p and "is empty" in p for p in report["problems"]), report
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert ageless(health.json()["problems"]) == ageless(report["problems"])  # one verdict, said the same

        key_file.write_text(TEST_EZKEY + "\n")
        recovered = wait_for_line(agent, "shipping recovered after")[-1]
        assert "1 record delivered since" in recovered, recovered
        ok = wait_for_line(agent, "health: ok")[-1]
        assert "last error" not in ok and "empty" not in ok, ok  # nothing stale is shown as current
        assert status(db, {**env, "SPOOL_CONFIG": str(config)})[0] == 0
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()["status"] == "ok"
    finally:
        stderr = stop_agent(agent)
    assert stderr.count("shipping recovered after") <= 1, stderr
    assert TEST_EZKEY not in stderr


def test_a_key_file_fixed_while_the_link_is_down_leaves_the_links_problem_not_the_keys(db, tmp_path):
    """The key problem ends when the key file is fixed, even while the receiver cannot be reached (the file is looked
    at while the link backs off too); what is shown then is the link's problem, degraded, not a stale "is empty"."""
    class Down:  # an endpoint where nothing listens
        url = f"http://127.0.0.1:{free_port()}"

    key_file = tmp_path / "ezkey"
    key_file.write_text("")
    key_file.chmod(0o600)
    with Spool(db) as sp:
        sp.count("s", 1)
    config = agent_config(tmp_path, Down, key_file=key_file)
    env = {**cli_env(db), "SPOOL_CONFIG": str(config)}
    agent = spawn_cli(db, "run", env=env)
    try:
        wait_for_line(agent, "shipping paused: ship.ezkey_file")
        key_file.write_text(TEST_EZKEY + "\n")
        wait_for_line(agent, "the ezkey was changed; shipping resumed")
        code, report = status(db, env)
        assert code == 1 and report["health"]["verdict"] == "degraded", report
        assert not any("empty" in p for p in report["problems"]), report
        assert any("the receiver is failing" in p for p in report["problems"]), report
    finally:
        stderr = stop_agent(agent)
    assert TEST_EZKEY not in stderr


def test_a_failing_link_is_logged_when_it_starts_and_once_when_it_ends(db, receiver, tmp_path):
    receiver.fail_next(3)
    with Spool(db) as sp:
        sp.count("s", 1)
    config = agent_config(tmp_path, receiver)
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    lines: list[str] = []
    try:
        lines += wait_for_line(agent, "shipping recovered after")
        assert "1 record delivered since" in lines[-1], lines
        assert len(receiver.accepted) == 1
        lines += wait_for_line(agent, "health: ok")
    finally:
        lines.append(stop_agent(agent))
    said = "".join(lines)
    assert "send failed: HTTP 503" in said, said  # when it started
    assert said.count("shipping recovered after") == 1, said  # and once when it ended


def test_systemd_status_says_the_verdict(db, receiver, tmp_path):
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    with Spool(db) as sp:
        sp.count("keyless", 1)
    config = agent_config(tmp_path, receiver)
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, NOTIFY_SOCKET=address))
    messages: list[str] = []
    try:
        while not any(m.startswith("STATUS=failing") for m in messages):
            messages.append(listener.recv(4096).decode())
    finally:
        stop_agent(agent)
        listener.close()
    status_line = next(m for m in messages if m.startswith("STATUS=failing"))
    assert "1 pending record carries no ezkey and none is configured" in status_line, status_line
    assert status_line.endswith("; 1 pending"), status_line


def test_healthz_and_status_agree_on_a_damaged_spool_and_a_failed_commit(db):
    from spool.config import Config, RelaySettings
    from spool.metrics import Metrics
    from spool.relay import Relay

    with Spool(db) as sp:
        sp.count("s", 1)
        sp.store.record_integrity("damaged", time.time(), detail="page 7: btree damaged")
    with Store(db) as store:
        metrics = Metrics(store, config=Config().replace(**{"spool.path": db, "ship.ezkey": TEST_EZKEY}))
        relay = Relay(RelaySettings(enabled=True, listen="127.0.0.1:0"), Store(db), health=metrics.health).start()
        try:
            answer = requests.get(f"{relay.url}/healthz", timeout=10)
            with Spool(db, config=metrics.config) as sp:
                report = sp.status()
            assert answer.status_code == 503 and answer.json()["status"] == "failing" == report["health"]["verdict"]
            assert answer.json()["problems"] == report["problems"]
            relay.writer.last_error = "disk I/O error"  # as a failed commit leaves it
            failed = requests.get(f"{relay.url}/healthz", timeout=10).json()
            assert failed["problems"][0] == "the last commit failed: disk I/O error" and failed["status"] == "failing"
        finally:
            relay.stop()
