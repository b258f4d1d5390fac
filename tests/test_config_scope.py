"""A mistake in the configuration stops only the commands that use what it is about, and always names the file
and the line.

Producers (`spool add`, `import`, `ingest`: cron jobs and apps) use only [spool]: a bad shipping, relay, metrics,
log or watch setting is one warning line for them, and the stat is spooled. `spool run`, `spool ship` and
`spool doctor` refuse it. A bad [spool] setting, or a file that is not TOML, stops everything.
"""

from __future__ import annotations

import pytest

from spool import Spool, config
from spool.errors import ConfigError
from spool.store import Store

from .helpers import cli_env, run_cli

NOT_USED_BY_PRODUCERS = [
    ("[ship]\nbatch_size = \"500\"\n", 2, 'ship.batch_size must be a whole number from 1 to 1000, not "500"'),
    ("[ship]\n# the link\n\ntimeout = 'soon'\n", 4, "ship.timeout must be a duration"),
    ("[ship]\nendpoint = 'http://stathat.example'\n", 2, "plain http to a remote host"),
    ("[ship]\nbackoff_initial = '2m'\nbackoff_max = '1m'\n", 2, "backoff_initial must not be larger"),
    ("[ship]\nendpiont = 'https://api.stathat.com'\n", 2, "unknown key 'endpiont' in [ship]; did you mean 'endpoint'?"),
    ("[relay]\nenabled = true\nlisten = '0.0.0.0:8080'\n", 3, "set relay.allow_remote = true"),
    ("[metrics]\nunhealthy_after = 'never'\n", 2, "metrics.unhealthy_after must be a duration"),
    ("[log]\nlevel = 'loud'\n", 2, "log.level must be one of"),
    ("[spool]\nretention = '1w'\n[[watch]]\npath = '/tmp'\n[[watch]]\npoll = 'often'\npath = '/var/tmp'\n", 6,
     'watch.poll must be true or false, not "often"'),
    ("[shp]\nbatch_size = 3\n", 1, "unknown section [shp]; did you mean 'ship'?"),
]


def stats(db):
    with Store(db) as store:
        return [record.stat for _, _, record in store.records()]


def with_config(db, tmp_path, text, **extra):
    path = tmp_path / "spool.toml"
    path.write_text(text)
    env = cli_env(db, **extra)
    env["SPOOL_CONFIG"] = str(path)
    return path, env


@pytest.mark.parametrize(("text", "line", "message"), NOT_USED_BY_PRODUCERS)
def test_a_bad_setting_producers_do_not_use_is_one_warning_line_and_the_stat_is_spooled(db, tmp_path, text, line,
                                                                                       message):
    path, env = with_config(db, tmp_path, text)
    added = run_cli(db, "add", "jobs done", "--count", "1", env=env)
    assert added.returncode == 0, added.stderr
    [warning] = added.stderr.splitlines()
    assert warning.startswith(f"spool: warning: config {path}, line {line}: ") and message in warning, warning
    assert "`spool add` does not use it" in warning, warning
    imported = run_cli(db, "import", "-", input=b'{"stat": "imported", "count": 1}\n', env=env)
    assert imported.returncode == 0 and f"config {path}, line {line}: " in imported.stderr, imported.stderr
    assert stats(db) == ["jobs done", "imported"]


@pytest.mark.parametrize(("text", "line", "message"), NOT_USED_BY_PRODUCERS)
@pytest.mark.parametrize("command", [("ship", "--once"), ("run",), ("status",)], ids=lambda c: c[0])
def test_the_commands_that_use_it_refuse_it_naming_the_file_and_the_line(db, tmp_path, text, line, message,
                                                                         command):
    path, env = with_config(db, tmp_path, text)
    with Spool(db) as sp:
        sp.count("waiting", 1)
    result = run_cli(db, *command, env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    [error] = result.stderr.strip().splitlines()
    assert error.startswith(f"spool: error: config {path}, line {line}: ") and message in error, error


@pytest.mark.parametrize(("text", "line", "message"), NOT_USED_BY_PRODUCERS[:3])
def test_doctor_fails_the_config_check_naming_the_file_and_the_line(db, tmp_path, text, line, message):
    path, env = with_config(db, tmp_path, text)
    result = run_cli(db, "doctor", env=env, timeout=60)
    assert result.returncode == 1
    [check] = [row for row in result.stdout.splitlines() if row.startswith("FAIL config:")]
    assert check.startswith(f"FAIL config: config {path}, line {line}: ") and message in check, result.stdout


@pytest.mark.parametrize(("text", "message"), [
    ("[spool]\nsynchronous = 'off'\n", "line 2: spool.synchronous must be one of"),
    ("[spool]\nmax_pending = '100'\n", "line 2: spool.max_pending must be a whole number"),
    ("[spoool]\npath = '/tmp/x.db'\n", "line 1: unknown section [spoool]; did you mean 'spool'?"),
    ("[spool]\nsynchronus = 'normal'\n", "line 2: unknown key 'synchronus' in [spool]"),
    ("[ship\n", "is not valid TOML: Expected ']' at the end of a table declaration (at line 1"),
])
def test_a_bad_spool_setting_still_stops_producers(db, tmp_path, text, message):
    path, env = with_config(db, tmp_path, text)
    result = run_cli(db, "add", "jobs done", "--count", "1", env=env)
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(f"spool: error: config {path}") and message in line, line
    assert not db.exists()


def test_a_bad_shipping_setting_in_the_environment_is_a_warning_for_producers_too(db):
    env = cli_env(db, SPOOL_SHIP_BATCH_SIZE="lots")
    result = run_cli(db, "add", "s", "--count", "1", env=env)
    assert result.returncode == 0 and "SPOOL_SHIP_BATCH_SIZE must be a whole number" in result.stderr
    assert run_cli(db, "ship", "--once", env=env).returncode == 2


def test_load_keeps_the_default_of_a_setting_the_caller_does_not_use(tmp_path):
    path = tmp_path / "spool.toml"
    path.write_text("[spool]\nretention = '2d'\n[ship]\nbatch_size = '500'\ntimeout = '30s'\n")
    loaded = config.load(path, env={}, uses=("spool",))
    assert loaded.spool.retention == 2 * 86400 and loaded.ship.batch_size == 500 and loaded.ship.timeout == 30
    assert loaded.warnings == (f'config {path}, line 4: ship.batch_size must be a whole number from 1 to 1000, '
                               'not "500"',)
    with pytest.raises(ConfigError, match=f"config {path}, line 4: ship.batch_size"):
        config.load(path, env={})
