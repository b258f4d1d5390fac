"""Configuration: precedence, validation with one clear error per mistake, and key handling."""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import pytest

from spool import config
from spool.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def write(tmp_path, text):
    path = tmp_path / "spool.toml"
    path.write_text(text)
    return path


def test_defaults_when_nothing_is_given(tmp_path):
    cfg = config.load(env={"HOME": str(tmp_path)})
    assert cfg.endpoint == "https://api.stathat.com"
    assert cfg.batch_size == 500 and cfg.synchronous == "full" and cfg.retention == 7 * 86400
    assert cfg.db == tmp_path / ".local" / "state" / "spool" / "spool.db"
    assert config.load(env={"XDG_STATE_HOME": "/srv/state"}).db.as_posix() == "/srv/state/spool/spool.db"


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path):
    path = write(tmp_path, '[ship]\nendpoint = "https://file.example"\nbatch_size = 100\ntimeout = "30s"\n')
    env = {"SPOOL_ENDPOINT": "https://env.example"}
    cfg = config.load(path, env=env, batch_size=200)
    assert (cfg.endpoint, cfg.batch_size, cfg.timeout) == ("https://env.example", 200, 30.0)
    cfg = config.load(path, env=env, endpoint="https://flag.example")
    assert cfg.endpoint == "https://flag.example"


def test_the_config_file_can_come_from_the_environment(tmp_path):
    path = write(tmp_path, "[spool]\nsynchronous = 'normal'\n")
    assert config.load(env={"SPOOL_CONFIG": str(path)}).synchronous == "normal"


@pytest.mark.parametrize(("text", "message"), [
    ("[ship]\nendpiont = 'x'\n", "unknown key 'endpiont' in [ship]; did you mean 'endpoint'?"),
    ("[shp]\n", "unknown section [shp]; did you mean 'ship'?"),
    ("[ship]\nbatch_size = 5000\n", "ship.batch_size must be at most 1000"),
    ("[ship]\nbatch_size = 0\n", "ship.batch_size must be a positive whole number"),
    ("[ship]\ntimeout = 'soon'\n", "ship.timeout must be a duration"),
    ("[spool]\nsynchronous = 'off'\n", "spool.synchronous must be one of full, normal"),
    ("[log]\nlevel = 'loud'\n", "log.level must be one of"),
    ("ship = 3\n", "'ship' must be a [ship] table"),
    ("[ship\n", "not valid TOML"),
    ("[ship]\nbackoff_initial = '2m'\nbackoff_max = '1m'\n", "backoff_initial must not be larger"),
])
def test_each_mistake_gives_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text), env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "seconds"), [
    (30, 30.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0),
])
def test_durations(text, seconds):
    assert config.parse_duration(text, "x") == seconds


def test_the_ezkey_is_read_from_a_key_file_and_never_shown(tmp_path, caplog):
    key_file = tmp_path / "ezkey"
    key_file.write_text("file-key-123\n")
    os.chmod(key_file, 0o600)
    cfg = config.load(write(tmp_path, f"[ship]\nezkey_file = '{key_file}'\n"), env={})
    assert cfg.ezkey == "file-key-123"
    assert "file-key-123" not in repr(cfg)
    assert config.load(env={"SPOOL_EZKEY_FILE": str(key_file)}).ezkey == "file-key-123"
    assert not caplog.records


def test_a_world_readable_key_file_is_warned_about(tmp_path, caplog):
    key_file = tmp_path / "ezkey"
    key_file.write_text("k")
    os.chmod(key_file, 0o644)
    with caplog.at_level(logging.WARNING, logger="spool"):
        config.load(env={"SPOOL_EZKEY_FILE": str(key_file)})
    assert "readable by every user" in caplog.text
    assert "k\n" not in caplog.text


def test_a_missing_or_empty_key_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read ezkey_file"):
        config.load(env={"SPOOL_EZKEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        config.load(env={"SPOOL_EZKEY_FILE": str(tmp_path / "empty")})


def test_the_example_config_in_packaging_is_valid_and_names_every_option(tmp_path):
    example = (Path(__file__).parent.parent / "packaging" / "spool.toml").read_text()
    key_file = tmp_path / "ezkey"
    key_file.write_text("k")
    os.chmod(key_file, 0o600)
    values = config.read_file(write(tmp_path, example.replace("/etc/spool/ezkey", str(key_file))))
    assert values["batch_size"] == 500 and values["ezkey"] == "k"
    for section, keys in config._SCHEMA.items():
        assert f"[{section}]" in example
        for key in keys:
            assert f"\n{key} = " in example or f"\n# {key} = " in example, f"{section}.{key} is not documented"
    assert "\n# [[watch]]\n" in example
    for key in config._WATCH_SCHEMA:
        assert f"\n# {key} = " in example, f"watch.{key} is not documented"
    for key in config._RELAY_SCHEMA:
        assert f"\n{key} = " in example or f"\n# {key} = " in example, f"relay.{key} is not documented"
    assert values["relay"].listen == "127.0.0.1:8080" and values["relay"].enabled is False
    # The commented example must itself be valid: uncomment its settings and read it.
    watch_part = example[example.index("\n# [[watch]]"):example.index("\n[relay]")]
    uncommented = re.sub(r"(?m)^# (\[\[watch\]\]|\w+ = .*)$", r"\1", watch_part)
    entry = config.watch_entry(tomllib.loads(uncommented)["watch"][0], "example")
    assert entry.max_bytes == 256 << 20 and entry.after == "move"
