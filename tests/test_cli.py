"""The `spool` command, run as a real subprocess."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import click
import pytest

from spool import Spool
from spool.cli import cli
from spool.records import make_record
from spool.store import Store

from .helpers import T0, TEST_EZKEY, UNPACED, cli_env, run_cli, spawn_cli, stop_agent, wait_for


def assert_one_line_error(result, status, text):
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spool: error: ")
    assert text in lines[0]
    assert "Traceback" not in result.stderr


def pending(db):
    with Store(db) as store:
        return [record for _, _, record in store.records()]


def test_add_appends_an_ez_counter_and_a_classic_value(db):
    assert run_cli(db, "add", "jobs done~all,nightly", "--count", "2", "--t", str(T0)).returncode == 0
    assert run_cli(db, "add", "--key", "K", "--ukey", "U", "--value", "0.5", "--t", str(T0)).returncode == 0
    assert pending(db) == [make_record(stat="jobs done~all,nightly", count=2, t=T0),
                           make_record(key="K", ukey="U", value=0.5, t=T0)]


def test_add_without_t_stamps_the_current_time(db):
    before = int(time.time())
    assert run_cli(db, "add", "s", "--value", "1").returncode == 0
    assert before <= pending(db)[0].t <= int(time.time())


@pytest.mark.parametrize(("args", "text"), [
    (["add", "s", "--value", "nan"], "value 'nan' is not a number (StatHat takes finite numbers only)"),
    (["add", "s", "--value", "abc"], "value 'abc' is not a number"),
    (["add", "s", "--count", "1", "--t", "1700000000000"], "looks like milliseconds"),
    (["add", "s", "--count", "1", "--value", "2"], "not both"),
    (["add", "s"], "missing --count N or --value V"),
    (["add", "", "--count", "1"], "stat is empty"),
    (["add", "a~b,,c", "--count", "1"], "empty name"),
    (["add", "--key", "K", "--count", "1"], "ukey is missing"),
    (["add", "s", "--count", "1e999"], "out of range"),
    (["nonsense"], "No such command"),
    (["dead", "requeue"], "give record IDs or --all"),
])
def test_usage_and_validation_errors_are_one_line_with_status_2(db, args, text):
    assert_one_line_error(run_cli(db, *args), 2, text)
    assert not db.exists() or pending(db) == []


def test_runtime_failures_are_one_line_with_status_1(db, tmp_path):
    assert_one_line_error(run_cli(db, "import", str(tmp_path / "missing.jsonl")), 1, "No such file")
    not_a_db = tmp_path / "garbage.db"
    not_a_db.write_bytes(b"\x00garbage" * 1000)
    assert_one_line_error(run_cli(not_a_db, "export", "-"), 1, "not a usable spool database")
    # status and ship --once say "failing: an operator must act" with 2 (not "the link failed", 1)
    assert_one_line_error(run_cli(not_a_db, "status"), 2, "not a usable spool database")


def test_config_errors_are_one_line_with_status_2(db, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[ship]\nbatchsize = 3\n")
    assert_one_line_error(run_cli(db, "--config", str(bad), "status"), 2, "did you mean 'batch_size'")


def test_import_is_all_or_nothing_and_names_the_bad_line(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"stat":"a","count":1,"t":{T0}}}\n\n{{"stat":"b","value":"x"}}\n')
    assert_one_line_error(run_cli(db, "import", str(path)), 2, "line 3: value must be a number")
    assert pending(db) == []


def test_import_skip_invalid_takes_the_good_records_and_reports_each_bad_one(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(f'{{"stat":"a","count":1,"t":{T0}}}\n{{oops\n{{"stat":"b","value":1,"t":5}}\n'
                    f'{{"stat":"c","value":2,"t":{T0}}}\n')
    result = run_cli(db, "import", "--skip-invalid", str(path))
    assert result.returncode == 0
    assert "skipped line 2: not valid JSON" in result.stderr
    assert "skipped line 3: t 5 is before" in result.stderr
    assert "imported 2 records, skipped 2 invalid" in result.stderr
    assert [r.stat for r in pending(db)] == ["a", "c"]


def test_import_reads_a_stathat_body_from_stdin_and_applies_its_key(db):
    body = json.dumps({"ezkey": "body-key", "data": [{"stat": "a", "count": 1, "t": T0},
                                                      {"stat": "b", "value": 2.5, "t": T0}]}, indent=2)
    result = run_cli(db, "import", "-", input=body.encode())
    assert result.returncode == 0, result.stderr
    assert [(r.stat, r.ezkey) for r in pending(db)] == [("a", "body-key"), ("b", "body-key")]


def test_status_json_has_the_documented_keys_and_no_key_material(db):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0, ezkey="record-secret")
        sp.count("s", 1, t=T0 + 5)
    result = run_cli(db, "status", "--json", env=cli_env(db, SPOOL_EZKEY="configured-secret"))
    status = json.loads(result.stdout)
    assert {"pending": 2, "inflight": 0, "sent": 0, "dead": 0, "oldest_pending_t": T0}.items() <= status.items()
    assert "secret" not in result.stdout


def test_status_explains_why_records_are_stuck(db):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    result = run_cli(db, "status")
    assert result.returncode == 2  # failing: records wait for a key only an operator can give
    assert "pending    1" in result.stdout and "health       failing, 2 problems below" in result.stdout
    assert "1 pending record carries no ezkey and none is configured" in result.stdout
    assert "no shipper is running" in result.stdout


def test_ship_once_delivers_and_exits_0(db, receiver):
    with Spool(db) as sp:
        sp.add_many([{"stat": f"s{i}", "count": i, "t": T0} for i in range(50)])
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--batch-size", "20",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    assert result.returncode == 0, result.stderr
    assert len(receiver.accepted) == 50 and sorted(receiver.batches) == [10, 20, 20]  # pipelined: any order
    assert TEST_EZKEY not in result.stderr
    status = json.loads(run_cli(db, "status", "--json").stdout)
    assert status["pending"] == 0 and status["sent"] == 50 and status["last_result"] == "ok"


def test_ship_once_gives_up_after_max_time_saying_what_is_left(db, receiver):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    receiver.fail_next(100_000)
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "1",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    assert result.returncode == 1
    assert "spool: error: 1 record still pending: stopped after 1 s; last error: HTTP 503" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_second_shipper_on_the_same_spool_is_refused(db, receiver):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    receiver.fail_next(100_000)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    first = spawn_cli(db, "run", env=env)
    try:
        for _ in range(100):
            if json.loads(run_cli(db, "status", "--json").stdout)["shipper_pid"] == first.pid:
                break
            time.sleep(0.05)
        second = run_cli(db, "ship", "--once", env=env)
        assert_one_line_error(second, 1, f"another shipper (pid {first.pid}) is already draining this spool")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


def test_run_exits_0_on_sigterm_mid_drain_with_nothing_lost(db, receiver):
    with Spool(db) as sp:
        sp.add_many([{"stat": f"s{i}", "count": 1, "t": T0 + i} for i in range(300)])
    receiver.fail_next(100_000)  # the receiver is down: the agent is retrying when the signal comes
    agent = spawn_cli(db, "run", "--batch-size", "100",
                      env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url))
    deadline = time.monotonic() + 30
    while receiver.requests < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.send_signal(signal.SIGTERM)
    _, stderr = agent.communicate(timeout=30)
    assert agent.returncode == 0, stderr
    assert "shutting down" in stderr and "Traceback" not in stderr
    assert TEST_EZKEY not in stderr
    with Store(db) as store:
        assert store.counts() == {"pending": 300, "inflight": 0, "sent": 0, "dead": 0, "held": 0}


def test_dead_list_requeue_and_purge(db, receiver):
    with Spool(db) as sp:
        sp.count("poison", 1, t=T0)
        sp.count("poison", 2, t=T0)
        sp.count("fine", 3, t=T0)
    receiver.refuse_stat("poison", "invalid stat name")
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=receiver.url)
    assert run_cli(db, "ship", "--once", env=env).returncode == 2  # records refused: an operator must look
    listed = [json.loads(line) for line in run_cli(db, "dead", "list", "--json").stdout.splitlines()]
    assert [(d["stat"], d["number"], d["reason"]) for d in listed] == [
        ("poison", 1, "invalid stat name"), ("poison", 2, "invalid stat name")]
    assert "requeued 1 record\n" in run_cli(db, "dead", "requeue", str(listed[0]["id"])).stderr
    assert "purged 1 record\n" in run_cli(db, "dead", "purge", "--all").stderr
    status = json.loads(run_cli(db, "status", "--json").stdout)
    assert (status["pending"], status["dead"], status["sent"]) == (1, 0, 1)


def all_commands(group=cli, prefix=()):
    context = click.Context(group)
    for name in group.list_commands(context):  # the commands of spool/cli_ops.py are registered on first need
        command = group.get_command(context, name)
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


@pytest.mark.parametrize(("path", "command"), list(all_commands()), ids=lambda v: " ".join(v) if
                         isinstance(v, tuple) else "")
def test_every_command_has_help_ending_with_an_example(path, command):
    assert command.help and "Example:" in command.help.strip().splitlines()[-1]
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"


def test_help_runs_as_a_process_and_mentions_every_command(db):
    result = run_cli(db, "--help")
    assert result.returncode == 0
    names = [path[0] for path, _ in all_commands() if len(path) == 1]
    assert {"add", "import", "ingest", "run", "ship", "status", "export", "doctor", "dead"} <= set(names)
    for name in names:
        assert name in result.stdout


def test_add_applies_the_configured_t_floor_not_the_built_in_one(db, tmp_path):
    assert_one_line_error(run_cli(db, "add", "old", "--count", "1", "--t", "86400"), 2, "before 1000000000")
    config = tmp_path / "spool.toml"
    config.write_text("[spool]\nt_floor = 0\n")
    assert run_cli(db, "--config", str(config), "add", "old", "--count", "1", "--t", "86400").returncode == 0
    assert pending(db)[0].t == 86400


def test_run_ingests_dropped_files_and_ships_them(db, receiver, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n[[watch]]\npath = "{drop}"\n')
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    try:
        (drop / ".f.part").write_text(f'{{"stat":"from file","value":4.5,"t":{T0}}}\n')
        (drop / ".f.part").rename(drop / "f.jsonl")
        wait_for(lambda: receiver.accepted)
    finally:
        stderr = stop_agent(agent)
    assert [(a["stat"], a["number"], a["t"]) for a in receiver.accepted] == [("from file", 4.5, T0)]
    assert "ingested 1 records from f.jsonl" in stderr


def test_a_watched_directory_that_does_not_exist_is_a_one_line_config_error(db, tmp_path):
    config = tmp_path / "spool.toml"
    config.write_text(f'[[watch]]\npath = "{tmp_path / "missing"}"\n')
    assert_one_line_error(run_cli(db, "--config", str(config), "run"), 2, "does not exist")


def test_ingest_reports_each_file_and_exits_2_when_one_is_rejected(db, tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(f'{{"stat":"g","count":1,"t":{T0}}}\n')
    bad.write_text('{"stat":"b"}\n')
    result = run_cli(db, "ingest", str(good), str(bad))
    assert result.returncode == 2
    assert "ingested 1 records from good.jsonl" in result.stderr
    assert "rejected bad.jsonl: line 1: give count or value" in result.stderr
    assert [r.stat for r in pending(db)] == ["g"]
    assert (tmp_path / ".rejected" / "bad.jsonl.error.txt").exists()


@pytest.mark.parametrize("args", [[], ["dead"]])
def test_a_missing_command_shows_the_help_and_one_error_line(db, args):
    result = run_cli(db, *args)
    assert result.returncode == 2
    assert "Commands:" in result.stdout
    assert_one_line_error(result, 2, "missing command")


# What `spool ARGS` runs (the console script, `python -m spool` and the zipapp all call spool.__main__.main), with
# the state of the garbage collector reported as the process ends.
GC_AT_EXIT = """
import atexit, gc, sys
atexit.register(lambda: print("enabled", gc.isenabled(), "frozen", gc.get_freeze_count(), file=sys.stderr))
sys.argv = ["spool", *sys.argv[1:]]
from spool.__main__ import main
main()
"""


def test_the_command_runs_with_the_collector_on_and_its_start_up_objects_frozen(db):
    # The collector is paused only while the CLI is imported: a long-running agent must not be left without it.
    result = subprocess.run([sys.executable, "-c", GC_AT_EXIT, "add", "gc", "--count", "1", "--t", str(T0)],
                            capture_output=True, text=True, env=cli_env(db), timeout=60)
    assert result.returncode == 0, result.stderr
    enabled, frozen = result.stderr.split()[1::2]
    assert enabled == "True"
    assert int(frozen) > 1000  # the modules, classes and command tree made while the CLI was imported
    assert [r.stat for r in pending(db)] == ["gc"]


def imported_by(db, *args):
    """The modules a `spool ARGS` process imported (from its -X importtime lines)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "spool", *args], capture_output=True,
                            text=True, env=cli_env(db), timeout=60)
    assert result.returncode == 0, result.stderr
    return {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}


def test_add_to_an_existing_spool_imports_only_what_appending_needs(db):
    # `spool add` is a whole process per stat: shipping, watching, the schema tool, logging, JSON and the
    # other commands' definitions cost start-up time it has no use for. (The config file is read: tomllib is.)
    assert run_cli(db, "add", "first", "--count", "1", "--t", str(T0)).returncode == 0  # the schema exists
    modules = imported_by(db, "add", "second", "--count", "1", "--t", str(T0))
    assert {"spool.cli", "spool.api", "spool.store", "sqlite3"} <= modules
    needless = {"spool.cli_ops", "spool.results", "spool.agent", "spool.ship", "spool.watch", "requests", "urllib3",
                "tenacity", "watchdog", "sqlite_utils", "prometheus_client", "logging", "json"}
    assert not modules & needless, modules & needless
    assert [r.stat for r in pending(db)] == ["first", "second"]


@pytest.mark.parametrize("command", [["export"], ["replay"]])
def test_a_window_ending_before_it_starts_is_a_usage_error_exit_2(db, command):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    result = run_cli(db, *command, "--since", str(T0 + 10), "--until", str(T0))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("spool: error: --until") and "is before --since" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("when", ["²", "١٧٠٠٠٠٠٠٠٠", "--5", "1_700_000_000"])
def test_a_window_bound_that_is_not_ascii_digits_or_an_iso_date_is_a_usage_error_exit_2(db, when):
    # str.isdigit() says yes to "²" (int() then failed: an internal error) and to Arabic-Indic digits (read as
    # 1700000000).
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    assert_one_line_error(run_cli(db, "replay", "--dry-run", "--since", when), 2,
                          "is neither unix seconds nor an ISO date")
