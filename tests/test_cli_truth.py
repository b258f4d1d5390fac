"""The smaller truths of the command line: errors that name what is missing or wrong, times as --since takes
them, a listening address that cannot be read, shell completion, the man page, and JSON logs with fields.

Every test runs `spool` as a real subprocess.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from spool.store import Store

from .helpers import T0, cli_env, run_cli, spawn_cli, stop_agent, wait_for_line


def records(db) -> list[tuple]:
    with Store(db) as store:
        return [(r.stat, r.number, r.t) for _, _, r in store.records()]


@pytest.mark.parametrize(("args", "says"), [
    ((), "missing STAT (or --key and --ukey) and --count N or --value V"),
    (("jobs",), "missing --count N or --value V"),
    (("--count", "1"), "missing STAT (or --key and --ukey)"),
])
def test_add_names_everything_that_is_missing(db, args, says):
    result = run_cli(db, "add", *args)
    assert result.returncode == 2 and result.stderr.startswith(f"spool: error: {says}"), result.stderr
    assert "spool add STAT --count N" in result.stderr  # and shows how


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_a_number_too_large_for_a_float_is_out_of_range_not_inf(db, number):
    result = run_cli(db, "add", "s", "--count", number)
    assert result.returncode == 2
    assert result.stderr.strip() == f"spool: error: count '{number[:3]}…' ({len(number)} characters) is out of range"


def test_a_csv_cell_too_large_for_a_float_is_out_of_range_too(db, tmp_path):
    drop = tmp_path / "big.csv"
    drop.write_text(f"stat,value,t\ns,1e999,{T0}\n")
    result = run_cli(db, "ingest", "--keep", str(drop))
    assert result.returncode == 2 and "is out of range" in result.stderr and "inf" not in result.stderr


@pytest.mark.parametrize(("when", "t"), [
    ("2026-12-01", 1796083200), ("2026-12-01T08:00", 1796112000), ("2026-12-01T08:00:00+01:00", 1796108400),
    (str(T0), T0), (f"{T0}.0", T0),
])
def test_add_takes_t_as_unix_seconds_or_an_iso_date_as_since_does(db, when, t):
    result = run_cli(db, "add", "s", "--count", "1", "--t", when)
    assert result.returncode == 0, result.stderr
    assert records(db) == [("s", 1, t)]


def test_a_t_that_is_neither_says_both_forms(db):
    result = run_cli(db, "add", "s", "--count", "1", "--t", "2026-13-01")
    assert result.returncode == 2
    assert "--t '2026-13-01' is neither unix seconds nor an ISO date" in result.stderr


def test_an_unknown_field_shows_the_typo_itself(db):
    result = run_cli(db, "import", "-", input=b'{"stat": "s", "vaule": 1}\n')
    assert result.returncode == 2
    assert "unknown field 'vaule', did you mean 'value'?" in result.stderr


def test_an_unknown_name_that_is_no_typo_is_quoted_as_input_is_since_it_may_be_a_key(db):
    result = run_cli(db, "import", "-", input=json.dumps({"stat": "s", "count": 1, "x" * 500: 1}).encode() + b"\n")
    assert result.returncode == 2 and "unknown field 'xxx…' (500 characters)" in result.stderr
    result = run_cli(db, "import", "-", input=b'{"stat": "s", "count": 1, "cuont": 1}\n')
    assert "unknown field 'cuont', did you mean 'count'?" in result.stderr


@pytest.mark.parametrize("listen", ["nonsense", "127.0.0.1:http", "127.0.0.1:99999", "[::1"])
def test_a_listening_address_that_cannot_be_read_is_a_parse_error(db, listen):
    result = run_cli(db, "relay", "--listen", listen)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"spool: error: --listen must be HOST:PORT like 127.0.0.1:8080, "
                                            f"not '{listen}'"), result.stderr
    assert "loopback" not in result.stderr


def test_a_remote_address_is_still_refused_as_remote(db):
    result = run_cli(db, "relay", "--listen", "192.0.2.7:8080")
    assert result.returncode == 2 and "is not a loopback address" in result.stderr


# -- shell completion -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _spool_completion spool"), ("zsh", "#compdef spool"),
    ("fish", "complete --no-files --command spool"),
])
def test_completion_prints_clicks_script_for_the_shell(db, shell, marker):
    result = run_cli(db, "completion", shell)
    assert result.returncode == 0, result.stderr
    assert marker in result.stdout and "_SPOOL_COMPLETE" in result.stdout


def test_the_completion_script_completes_commands_and_options(db):
    env = {**cli_env(db), "_SPOOL_COMPLETE": "bash_complete", "COMP_WORDS": "spool sta", "COMP_CWORD": "1"}
    result = run_cli(db, env=env)
    assert "plain,status" in result.stdout.splitlines()
    env.update(COMP_WORDS="spool doctor --j", COMP_CWORD="2")
    assert "plain,--json" in run_cli(db, env=env).stdout.splitlines()


def test_completion_for_an_unknown_shell_is_a_usage_error(db):
    result = run_cli(db, "completion", "tcsh")
    assert result.returncode == 2 and "'tcsh' is not one of 'bash', 'zsh', 'fish'" in result.stderr


# -- the man page --------------------------------------------------------------------------------------------


def test_the_man_page_is_made_from_the_commands_and_reads_cleanly(tmp_path):
    import shutil
    import sys

    page = subprocess.run([sys.executable, "-m", "spool.manpage"], capture_output=True, text=True, check=True).stdout
    assert page.startswith(".TH SPOOL 1 ")
    for command in ("add", "import", "ingest", "run", "ship", "status", "doctor", "dead requeue", "completion"):
        assert f'.SS "spool {command}' in page, command
    assert "Example: spool add" in page.replace("\\-", "-")
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed")
    rendered = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], input=page, capture_output=True, text=True)
    assert rendered.returncode == 0 and rendered.stderr == "", rendered.stderr  # no warnings


# -- JSON logs ------------------------------------------------------------------------------------------------


def test_json_log_lines_carry_the_component_and_the_fields_of_the_event(db, tmp_path):
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    relay = spawn_cli(db, "relay", "--listen", "127.0.0.1:0", "--statsd", f"127.0.0.1:{port}", "--log-format",
                      "json")
    try:
        lines = wait_for_line(relay, "relay listening")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"orders:1|q", ("127.0.0.1", port))
        lines += wait_for_line(relay, "StatsD line")
    finally:
        stop_agent(relay)
    events = [json.loads(line) for line in lines]
    dropped = events[-1]
    assert dropped["component"] == "statsd" and dropped["logger"] == "spool.relay"
    assert dropped["reason"] == "invalid" and dropped["stat"] == "'orders'"
    assert dropped["sender"].startswith("127.0.0.1:")
    started = next(event for event in events if "relay listening" in event["message"])
    assert started["component"] == "relay"


def test_json_log_lines_of_a_failed_send_carry_its_kind_and_counts(db):
    run_cli(db, "add", "s", "--count", "1", "--t", str(T0))
    env = cli_env(db, SPOOL_EZKEY="test-ezkey-0123456789", SPOOL_ENDPOINT="http://127.0.0.1:9")
    result = run_cli(db, "ship", "--once", "--max-time", "1", "--log-format", "json", env=env)
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    failed = next(event for event in events if event["message"].startswith("send failed"))
    assert failed["component"] == "ship" and failed["error_kind"] == "transient"
    assert failed["records"] == 1 and failed["paused"] is False and failed["retry_in"] >= 0
