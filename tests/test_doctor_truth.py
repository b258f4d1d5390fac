"""`spool doctor` that knows the agent: the ports it holds are fine, a fresh box is fine, and the endpoint is
checked with a real, harmless StatHat request whose answer must be StatHat's.

Real processes: `spool run` and `spool relay` subprocesses, `spool doctor` as a subprocess, a real receiver (and a
plain web server) on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading

import pytest

from .helpers import TEST_EZKEY, UNPACED, cli_env, free_ports, run_cli, spawn_cli, stop_agent, wait_for_line


def lines_of(result, name: str) -> list[str]:
    return [line for line in result.stdout.splitlines() if line[5:].startswith(f"{name}:")]


@pytest.fixture
def agent_config(tmp_path, receiver):
    """A config with the relay (and StatsD) and the metrics port on free ports, shipping to the receiver."""
    relay, metrics, statsd = free_ports(socket.SOCK_STREAM, socket.SOCK_STREAM, socket.SOCK_DGRAM)
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n[relay]\nenabled = true\nlisten = "127.0.0.1:{relay}"\n'
                      f'statsd = "127.0.0.1:{statsd}"\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n')
    return config, relay, metrics, statsd


def test_the_ports_the_running_agent_holds_are_ok(db, agent_config):
    config, relay, metrics, statsd = agent_config
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        wait_for_line(agent, "metrics and health on")
        result = run_cli(db, "--config", str(config), "doctor", env=env)
    finally:
        stop_agent(agent)
    assert lines_of(result, "relay port") == [f"ok   relay port: 127.0.0.1:{relay} is this spool's relay, running"]
    assert lines_of(result, "statsd port") == [f"ok   statsd port: 127.0.0.1:{statsd} is this spool's relay's "
                                               "StatsD listener, running"]
    assert lines_of(result, "metrics port") == [f"ok   metrics port: 127.0.0.1:{metrics} is this spool's metrics "
                                                "server, running"]
    assert "FAIL" not in result.stdout, result.stdout
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_free_ports_of_a_stopped_agent_are_ok_too(db, agent_config):
    config, relay, _, statsd = agent_config
    result = run_cli(db, "--config", str(config), "doctor", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    assert lines_of(result, "relay port") == [f"ok   relay port: 127.0.0.1:{relay} is free"]
    assert lines_of(result, "statsd port") == [f"ok   statsd port: 127.0.0.1:{statsd} is free"]


def test_a_port_held_by_another_spool_or_by_something_else_fails(db, tmp_path, agent_config):
    config, relay, _, _ = agent_config
    other = tmp_path / "other" / "spool.db"
    other.parent.mkdir()
    stranger = spawn_cli(other, "relay", "--listen", f"127.0.0.1:{relay}", env=cli_env(other))
    try:
        wait_for_line(stranger, "relay listening")
        result = run_cli(db, "--config", str(config), "doctor", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    finally:
        stop_agent(stranger)
    [line] = lines_of(result, "relay port")
    assert line.startswith(f"FAIL relay port: 127.0.0.1:{relay} is held by the relay of another spool file")
    assert result.returncode == 1
    with socket.create_server(("127.0.0.1", relay)):  # not a spool at all
        result = run_cli(db, "--config", str(config), "doctor", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    [line] = lines_of(result, "relay port")
    assert line.startswith(f"FAIL relay port: 127.0.0.1:{relay} is not free")


def test_a_fresh_box_is_fine(tmp_path, receiver):
    home = tmp_path / "home"
    home.mkdir()  # no ~/.local/state yet: the spool's directory is made on first use
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOOL_", "XDG_"))}
    env.update(HOME=str(home), SPOOL_ENDPOINT=receiver.url, SPOOL_EZKEY=TEST_EZKEY)
    result = run_cli(tmp_path / "unused.db", "doctor", env=env)
    [disk] = lines_of(result, "disk")
    assert disk.startswith("ok   disk: ") and f"free at {home}" in disk, result.stdout
    assert "FAIL" not in result.stdout and result.returncode == 0, result.stdout
    assert not (home / ".local").exists()  # doctor made nothing


def test_the_endpoint_check_is_a_harmless_stathat_request_whose_answer_is_recognised(db, receiver):
    result = run_cli(db, "doctor", env=cli_env(db, SPOOL_ENDPOINT=receiver.url, SPOOL_EZKEY=TEST_EZKEY))
    assert lines_of(result, "endpoint") == [f"ok   endpoint: {receiver.url} answered as StatHat does (an EZ "
                                            "batch with no data: HTTP 200, status 200)"]
    assert receiver.batches == [0] and receiver.stats() == []  # one JSON batch, no data: nothing counted


class _AnyWebServer(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web_server(tmp_path):
    """A plain web server (python's http.server): GET / is 200, POST is 501 with an HTML page."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AnyWebServer)
    thread = threading.Thread(target=server.serve_forever, name="web-server")
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_any_web_server_fails_the_endpoint_check_with_one_clear_line(db, web_server):
    result = run_cli(db, "doctor", env=cli_env(db, SPOOL_ENDPOINT=web_server, SPOOL_EZKEY=TEST_EZKEY))
    [line] = lines_of(result, "endpoint")
    assert line.startswith(f"FAIL endpoint: {web_server} is not StatHat: it answered an EZ batch with HTTP 501, "
                           "not StatHat's answer ('<!DOCTYPE HTML>"), line
    assert "fix: set ship.endpoint to StatHat's API root, https://api.stathat.com" in line
    assert len(line) < 400 and TEST_EZKEY not in result.stdout
    assert result.returncode == 1


def test_doctor_json_gives_every_check_and_the_verdict(db, receiver):
    result = run_cli(db, "doctor", "--json", env=cli_env(db, SPOOL_ENDPOINT=receiver.url, SPOOL_EZKEY=TEST_EZKEY))
    report = json.loads(result.stdout)
    assert report["ok"] is True and result.returncode == 0
    names = [check["name"] for check in report["checks"]]
    assert names[:3] == ["config", "ezkey", "endpoint"]
    assert all(set(check) == {"name", "ok", "detail", "fix"} for check in report["checks"])
    failing = run_cli(db, "doctor", "--json", env=cli_env(db, SPOOL_ENDPOINT="http://127.0.0.1:9"))
    report = json.loads(failing.stdout)
    assert report["ok"] is False and failing.returncode == 1
    assert {check["name"] for check in report["checks"] if not check["ok"]} >= {"ezkey", "endpoint"}
    assert failing.stderr.startswith("spool: error: ")


def test_doctor_json_is_one_document_even_when_nothing_else_works(db, tmp_path):
    broken = tmp_path / "broken.toml"
    broken.write_text("[ship]\nbatch_size = 0\n")
    result = run_cli(db, "--config", str(broken), "doctor", "--json", env=cli_env(db))
    report = json.loads(result.stdout)
    assert report["checks"][0]["name"] == "config" and report["checks"][0]["ok"] is False
    assert "ship.batch_size" in report["checks"][0]["detail"] and result.returncode == 1
