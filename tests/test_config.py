"""Configuration: declared once, loaded in order, every mistake one clear error, keys read only to ship."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
from pathlib import Path

import pytest

from spool import config
from spool.errors import ConfigError

from .helpers import cli_env, run_cli

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    path = tmp_path / "spool.toml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "DEFAULT_CONFIG", tmp_path / "no-such.toml")
    cfg = config.load(env={"HOME": str(tmp_path)})
    assert cfg.ship.endpoint == "https://api.stathat.com" and cfg.file is None
    assert cfg.ship.batch_size == 500 and cfg.spool.synchronous == "full" and cfg.spool.retention == 7 * 86400
    assert cfg.db == tmp_path / ".local" / "state" / "spool" / "spool.db"
    assert config.load(env={"XDG_STATE_HOME": "/srv/state"}).db.as_posix() == "/srv/state/spool/spool.db"
    assert cfg.source == "built-in defaults"


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    path = write(tmp_path, '[ship]\nendpoint = "https://file.example"\nbatch_size = 100\ntimeout = "30s"\n')
    env = {"SPOOL_ENDPOINT": "https://env.example", "SPOOL_SHIP_TIMEOUT": "45"}
    cfg = config.load(path, env=env, batch_size="200")
    assert (cfg.ship.endpoint, cfg.ship.batch_size, cfg.ship.timeout) == ("https://env.example", 200, 45.0)
    cfg = config.load(path, env=env, endpoint="https://flag.example")
    assert cfg.ship.endpoint == "https://flag.example"


def test_every_setting_can_come_from_the_environment_by_section_and_key(tmp_path):
    env = {"SPOOL_SPOOL_MAX_PENDING": "1000", "SPOOL_RELAY_ENABLED": "yes", "SPOOL_LOG_LEVEL": "debug",
           "SPOOL_SPOOL_MAX_SPOOL_BYTES": "5M", "SPOOL_METRICS_LISTEN": "true", "SPOOL_SHIP_EZKEY": "env-key",
           "SPOOL_DB": str(tmp_path / "short.db"), "SPOOL_SPOOL_PATH": str(tmp_path / "long.db")}
    cfg = config.load(env=env)
    assert cfg.spool.max_pending == 1000 and cfg.relay.enabled is True and cfg.log.level == "debug"
    assert cfg.spool.max_spool_bytes == 5 << 20 and cfg.metrics.listen == "127.0.0.1:9464"
    assert cfg.ship.ezkey == "env-key"
    assert cfg.db == tmp_path / "long.db" and cfg.db_source == "SPOOL_SPOOL_PATH"  # the long name wins
    with pytest.raises(ConfigError, match="SPOOL_SHIP_BATCH_SIZE must be a whole number"):
        config.load(env={"SPOOL_SHIP_BATCH_SIZE": "lots"})


def test_the_config_file_comes_from_the_flag_the_environment_or_the_default_location(tmp_path, monkeypatch):
    path = write(tmp_path, "[spool]\nsynchronous = 'normal'\n")
    assert config.load(env={"SPOOL_CONFIG": str(path)}).spool.synchronous == "normal"
    default = tmp_path / "etc-spool.toml"
    default.write_text("[ship]\nbatch_size = 42\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG", default)
    cfg = config.load(env={})
    assert cfg.ship.batch_size == 42 and cfg.source == f"{default} (from the default location)"
    assert config.load(path, env={}).ship.batch_size == 500  # --config wins over the default location
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml", env={})


@pytest.mark.parametrize(("text", "message"), [
    ("[ship]\nendpiont = 'x'\n", "unknown key 'endpiont' in [ship]; did you mean 'endpoint'?"),
    ("[shp]\n", "unknown section [shp]; did you mean 'ship'?"),
    ("[ship]\nbatch_size = 5000\n", "ship.batch_size must be a whole number from 1 to 1000, not 5000"),
    ("[ship]\nbatch_size = 0\n", "ship.batch_size must be a whole number from 1 to 1000, not 0"),
    ("[ship]\nbatch_size = \"500\"\n", 'ship.batch_size must be a whole number from 1 to 1000, not "500"'),
    ("[relay]\nenabled = \"yes\"\n", 'relay.enabled must be true or false, not "yes"'),
    ("[ship]\ntimeout = 'soon'\n", "ship.timeout must be a duration"),
    ("[spool]\nsynchronous = 'off'\n", 'spool.synchronous must be one of "full", "normal"'),
    ("[log]\nlevel = 'loud'\n", "log.level must be one of"),
    ("ship = 3\n", "'ship' must be a [ship] table"),
    ("[ship\n", "not valid TOML"),
    ("[ship]\nbackoff_initial = '2m'\nbackoff_max = '1m'\n", "backoff_initial must not be larger"),
    ("[ship]\nendpoint = 'https://api.stathat.com/ez'\n", "give the API root (https://api.stathat.com)"),
    ("[ship]\nendpoint = 'http://stathat.example'\n", "plain http to a remote host"),
    ("[relay]\nlisten = '0.0.0.0:8080'\n", "set relay.allow_remote = true"),
    ("[relay]\nlisten = 'localhost:http'\n", "relay.listen must be HOST:PORT"),
    ("[metrics]\nlisten = '10.0.0.1:9464'\n", "set metrics.allow_remote = true"),
])
def test_each_mistake_gives_one_clear_error_when_the_config_is_loaded(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), (0.5, 0.5), ("90", 90.0), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
    ("7d", 604800.0), ("1w", 604800.0), ("1h30m", 5400.0), ("1d 12h", 129600.0),
])
def test_durations(text, seconds):
    assert config.Duration().parse(text, "x", False) == seconds


@pytest.mark.parametrize("text", ["soon", "5 minutes", "1h30", "-5", "m", ""])
def test_durations_refused(text):
    with pytest.raises(ConfigError, match="x must be a duration"):
        config.Duration().parse(text, "x", False)


@pytest.mark.parametrize(("text", "size"), [
    (1048576, 1 << 20), ("512K", 512 << 10), ("5M", 5 << 20), ("1G", 1 << 30), ("256MiB", 256 << 20),
    ("5MB", 5_000_000), ("1000", 1000),
])
def test_sizes(text, size):
    assert config.Size().parse(text, "x", False) == size


def test_the_ezkey_is_read_from_a_key_file_only_when_shipping_and_never_shown(tmp_path, caplog):
    key_file = tmp_path / "ezkey"
    key_file.write_text("file-key-123\n")
    os.chmod(key_file, 0o600)
    cfg = config.load(write(tmp_path, f"[ship]\nezkey_file = '{key_file}'\n"), env={})
    assert cfg.ezkey() == "file-key-123"
    assert "file-key-123" not in repr(cfg)
    assert config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey() == "file-key-123"
    assert "env-secret" not in repr(config.load(env={"SPOOL_EZKEY": "env-secret"}))
    assert not caplog.records


def test_a_world_readable_key_file_is_warned_about(tmp_path, caplog):
    key_file = tmp_path / "ezkey"
    key_file.write_text("k")
    os.chmod(key_file, 0o644)
    with caplog.at_level(logging.WARNING, logger="spool"):
        config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey()
    assert "readable by every user" in caplog.text
    assert "k\n" not in caplog.text


def test_a_missing_or_empty_key_file_stops_shipping_not_loading(tmp_path):
    cfg = config.load(env={"SPOOL_EZKEY_FILE": str(tmp_path / "missing")})  # producers need no key
    with pytest.raises(ConfigError, match=r"cannot read ship\.ezkey_file"):
        cfg.ezkey()
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config.load(env={"SPOOL_EZKEY_FILE": str(tmp_path / "empty")}).ezkey()


def test_a_missing_key_file_never_stops_producers_but_stops_shipping_loudly(db, tmp_path):
    env = cli_env(db, SPOOL_EZKEY_FILE=str(tmp_path / "no-such-key"))
    assert run_cli(db, "add", "s", "--count", "1", env=env).returncode == 0
    assert run_cli(db, "status", env=env).returncode == 0
    assert run_cli(db, "dead", "list", env=env).returncode == 0
    shipped = run_cli(db, "ship", "--once", "--max-time", "5", env=env)
    assert shipped.returncode == 2  # only an operator can fix it
    assert "cannot read ship.ezkey_file" in shipped.stderr.splitlines()[-1]


def test_the_example_config_is_generated_from_the_declarations_and_is_valid(tmp_path):
    example = (ROOT / "packaging" / "spool.toml").read_text()
    assert example == config.example_toml(), "regenerate it: python -m spool.config toml > packaging/spool.toml"
    values = config.read_file(write(tmp_path, example))
    assert values["relay"] == config.RelaySettings() and values["log"] == config.LogSettings()
    # A system-wide install: the spool under /var/lib/spool, the key in a file beside this config.
    assert values["spool"].path == Path("/var/lib/spool/spool.db")
    assert values["ship"] == config.ShipSettings(ezkey_file=Path("/etc/spool/ezkey"))
    # The commented settings must themselves be valid: uncomment them all and read the file again.
    uncommented = re.sub(r"(?m)^# (\[\[watch\]\]|\w+ = .*)$", r"\1", example)
    document = tomllib.loads(uncommented)
    config.watch_entry(document["watch"][0], "example")
    config.read_file(write(tmp_path, uncommented))


def test_the_readme_reference_table_is_generated_from_the_declarations():
    readme = (ROOT / "README.md").read_text()
    assert config.reference_markdown() in readme, "regenerate it: python -m spool.config markdown"


def test_every_setting_has_help_and_a_type_and_a_flag_only_once():
    flags = []
    for section in [*config.SECTIONS.values(), config.WatchSettings]:
        for field in dataclasses.fields(section):
            assert field.metadata["help"] and isinstance(field.metadata["kind"], config.SettingType)
            if field.metadata["flag"]:
                flags.append(field.metadata["flag"])
    assert len(flags) == len(set(flags))


def test_replace_takes_section_and_key_or_a_key_no_two_sections_share():
    cfg = config.Config().replace(batch_size=10, **{"relay.listen": "127.0.0.1:1"})
    assert cfg.ship.batch_size == 10 and cfg.relay.listen == "127.0.0.1:1"
    with pytest.raises(ConfigError, match="several sections"):
        config.Config().replace(allow_remote=True)


def test_settings_compare_hash_and_show_by_value_and_stay_frozen():
    # The agent restarts only the parts whose settings changed on SIGHUP: that is this equality.
    loaded, same = config.load(env={"SPOOL_SHIP_BATCH_SIZE": "200"}), config.load(env={"SPOOL_SHIP_BATCH_SIZE": "200"})
    assert loaded == same and hash(loaded) == hash(same) and loaded.ship == same.ship
    assert loaded.ship != config.ShipSettings() and loaded.log == config.LogSettings()
    assert len({loaded.ship, same.ship, config.ShipSettings()}) == 2
    assert config.RelaySettings() != config.MetricsSettings() and config.LogSettings() != "LogSettings()"
    assert repr(config.LogSettings()) == "LogSettings(level='info', format='text', summary_interval=60.0)"
    entry = config.WatchSettings(path=Path("/drop"), poll=True)
    assert repr(entry).startswith("WatchSettings(path=PosixPath('/drop'), poll=True, poll_interval=1.0, ")
    assert dataclasses.replace(entry, poll=False) == config.WatchSettings(path=Path("/drop"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.poll = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del entry.poll


def test_settings_are_made_as_dataclasses_make_them():
    assert config.LogSettings("debug", "json") == config.LogSettings(level="debug", format="json")
    assert config.LogSettings("debug").summary_interval == 60.0  # the declared default
    assert [f.name for f in dataclasses.fields(config.LogSettings)] == ["level", "format", "summary_interval"]
    assert config.LogSettings.__match_args__ == ("level", "format", "summary_interval")
    with pytest.raises(TypeError, match="unexpected keyword argument 'levels'"):
        config.LogSettings(levels="debug")
    with pytest.raises(TypeError, match="multiple values for argument 'level'"):
        config.LogSettings("debug", level="info")
    with pytest.raises(TypeError, match="takes from 1 to 4 positional arguments but 5 were given"):
        config.LogSettings("debug", "json", 1.0, "extra")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        dataclasses.replace(config.LogSettings(), colour="red")


# -- the configured key obeys the rule every key obeys (spool add --ezkey's) -----------------------------------

BAD_KEYS = {"a control character": "Secret\x01Key", "a newline": "Secret\nKey", "NUL": "Secret\x00Key",
            "TAB": "Secret\tKey", "DEL": "Secret\x7fKey", "U+0085": "Secret\x85Key", "a BOM": "\ufeffSecretKey",
            "a lone surrogate": "Secret\ud800Key", "280 characters": "SecretKey" * 31 + "x"}


def _toml_string(text):
    return '"' + "".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in text) + '"'


@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_a_configured_key_that_is_no_key_is_refused_naming_where_never_showing_it(tmp_path, key):
    where = {"SPOOL_EZKEY": lambda: config.load(env={"SPOOL_EZKEY": key}),
             "--ezkey": lambda: config.load(env={}, ezkey=key),
             "[ship] ezkey": lambda: config.load(write(tmp_path, f"[ship]\nezkey = {_toml_string(key)}\n"), env={})}
    for name, load in where.items():
        with pytest.raises(ConfigError) as refused:
            load()
        message = str(refused.value)
        assert "Secret" not in message and "\n" not in message, (name, message)
        # TOML has no way to write a lone surrogate: tomllib refuses the escape itself
        assert name.split()[-1] in message or "not valid TOML" in message, (name, message)
    key_file = tmp_path / "ezkey"
    key_file.write_bytes(key.encode("utf-8", "surrogatepass") + b"\n")
    key_file.chmod(0o600)
    with pytest.raises(ConfigError) as refused:
        config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey()
    assert "Secret" not in str(refused.value) and str(key_file) in str(refused.value), str(refused.value)


def test_a_key_file_may_end_with_one_line_end_and_holds_one_line(tmp_path):
    key_file = tmp_path / "ezkey"
    for text, key in (("Secret-Key\n", "Secret-Key"), ("Secret-Key\r\n", "Secret-Key"), ("Secret-Key", "Secret-Key")):
        key_file.write_text(text)
        assert config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey() == key
    for text in ("Secret-Key\nOther-Key\n", "Secret-Key\n\n"):
        key_file.write_text(text)
        with pytest.raises(ConfigError, match="one line") as refused:
            config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey()
        assert "Secret" not in str(refused.value)


def test_ship_and_run_refuse_a_configured_key_with_a_tab_in_one_line_and_send_nothing(db, receiver):
    from spool import Spool

    with Spool(db) as sp:
        sp.count("s", 1, t=1_700_000_000)
    env = cli_env(db, SPOOL_EZKEY="Secret\tKey", SPOOL_ENDPOINT=receiver.url)
    for args in (("ship", "--once"), ("run",)):
        result = run_cli(db, *args, env=env, timeout=30)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            "spool: error: SPOOL_EZKEY has control characters; it is not a valid key"], result.stderr
    assert receiver.requests == 0
