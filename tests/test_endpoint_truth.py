"""Endpoints that are not StatHat: the agent's own relay (a loop) is refused or paused with one clear line; an
endpoint whose answers are not StatHat's pauses shipping after a few in a row, loudly once, shown in status, its
answer quoted once.

Real processes (`spool run`, `spool relay`, `spool ship --once`, `spool status`), real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from .helpers import (
    T0,
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

PAGE = b"<!DOCTYPE HTML>\n<html><head><title>Error response</title></head><body><h1>Error 501</h1>" + b"x" * 500


def status_of(db, env) -> dict:
    result = run_cli(db, "status", "--json", env=env)
    return json.loads(result.stdout)


# -- the agent's own relay -----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "http://localhost:{port}/"])
def test_an_agent_whose_endpoint_is_its_own_relay_is_refused_at_start(db, tmp_path, endpoint):
    port = free_port()
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{endpoint.format(port=port)}"\n[relay]\nenabled = true\n'
                      f'listen = "127.0.0.1:{port}"\n')
    result = run_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=30)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    shown = endpoint.format(port=port).rstrip("/")
    assert line.startswith(f"spool: error: ship.endpoint {shown} is this agent's own relay (relay.listen = "
                           f"127.0.0.1:{port})"), line
    assert not db.exists() or status_of(db, cli_env(db))["pending"] == 0


def test_a_loop_through_a_relay_of_the_same_spool_is_detected_at_run_time_and_paused_loudly(db, tmp_path):
    port = free_port()
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    relay = spawn_cli(db, "relay", "--listen", f"127.0.0.1:{port}", env=env)  # another process, the same spool
    config = tmp_path / "ship.toml"
    config.write_text(UNPACED + f'endpoint = "http://127.0.0.1:{port}"\nbackoff_initial = "0.05s"\n'
                      'backoff_max = "0.2s"\n')
    agent = None
    try:
        wait_for_line(relay, "relay listening")
        assert run_cli(db, "add", "loop.check", "--count", "1", "--t", str(T0), env=env).returncode == 0
        agent = spawn_cli(db, "--config", str(config), "run", env=env)
        lines = wait_for_line(agent, "shipping paused")
        status = status_of(db, env)
    finally:
        rest = stop_agent(agent) if agent is not None else ""
        stop_agent(relay)
    said = [line for line in [*lines, *rest.splitlines()] if "relay of this very spool" in line
            and "health: " not in line]  # the summary names the current problem, as every view of health does
    assert len(said) == 1, said  # one loud line, not one per retry
    assert f"ship.endpoint http://127.0.0.1:{port} is a relay of this very spool" in said[0]
    assert status["pending"] + status["inflight"] == 1 and status["sent"] == 0  # one record stays one record
    assert status["last_result"] == "paused" and "relay of this very spool" in status["last_error"]


def test_ship_once_to_a_relay_of_the_same_spool_ends_at_once_saying_why(db):
    port = free_port()
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=f"http://127.0.0.1:{port}")
    relay = spawn_cli(db, "relay", "--listen", f"127.0.0.1:{port}", env=env)
    try:
        wait_for_line(relay, "relay listening")
        run_cli(db, "add", "loop.check", "--count", "1", "--t", str(T0), env=env)
        result = run_cli(db, "ship", "--once", env=env, timeout=30)
    finally:
        stop_agent(relay)
    assert result.returncode != 0 and "is a relay of this very spool" in result.stderr
    assert status_of(db, env)["pending"] == 1


# -- an endpoint that is not StatHat --------------------------------------------------------------------------


class _Switchable(http.server.BaseHTTPRequestHandler):
    """A web server answering POST with an HTML 501 page while `foreign`, else as StatHat answers a batch."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server = self.server
        with server.lock:  # type: ignore[attr-defined]
            server.requests += 1  # type: ignore[attr-defined]
            foreign = server.foreign  # type: ignore[attr-defined]
        if foreign == "hang up":  # no answer at all: says nothing of whether this is StatHat
            self.close_connection = True
            return
        if foreign:
            status, answer, kind = 501, PAGE, "text/html;charset=utf-8"
        else:
            status, kind = 200, "application/json"
            answer = json.dumps({"status": 200, "msg": "ok", "multiple": len(body["data"])}).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


@pytest.fixture
def web_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Switchable)
    server.lock, server.requests, server.foreign = threading.Lock(), 0, True  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="web-server")
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_an_endpoint_that_is_not_stathat_pauses_shipping_once_loudly_and_shows_in_status(db, tmp_path, web_server):
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{web_server.url}"\nbackoff_initial = "0.01s"\nbackoff_max = "0.1s"\n')
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    run_cli(db, "add", "page.views", "--count", "1", "--t", str(T0), env=env)
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        lines = wait_for_line(agent, "shipping paused")
        paused_at = web_server.requests
        wait_for(lambda: web_server.requests >= paused_at + 3)  # still tried now and then, silently
        web_server.foreign = "hang up"
        wait_for(lambda: web_server.requests >= paused_at + 6)  # no answer: the pause goes on, and says nothing
        status = status_of(db, env)
        web_server.foreign = False  # the endpoint answers as StatHat again: shipping resumes by itself
        wait_for(lambda: status_of(db, env)["sent"] == 1)
    finally:
        rest = stop_agent(agent)
    log = "".join(lines) + rest
    assert log.count("<!DOCTYPE HTML>") == 1, log  # the answer quoted once, not at every retry
    assert "x" * 100 not in log  # and cut short
    [paused] = [line for line in log.splitlines() if "shipping paused" in line or "send failed" in line][2:]
    assert f"{web_server.url} does not answer as StatHat does: 3 answers in a row were not StatHat's" in paused
    assert "HTTP 501" in paused and "ship.endpoint" in paused
    assert status["last_result"] == "paused" and "does not answer as StatHat does" in status["last_error"]
    assert status["pending"] + status["inflight"] == 1 and status["sent"] == 0
    assert "answers as StatHat again; shipping resumed" in rest


def test_ship_once_to_an_endpoint_that_is_not_stathat_stops_after_a_few_answers(db, web_server):
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY, SPOOL_ENDPOINT=web_server.url, SPOOL_SHIP_BACKOFF_INITIAL="0.01s",
                  SPOOL_SHIP_BACKOFF_MAX="0.05s")
    run_cli(db, "add", "page.views", "--count", "1", "--t", str(T0), env=env)
    result = run_cli(db, "ship", "--once", env=env, timeout=60)
    assert result.returncode != 0 and "does not answer as StatHat does" in result.stderr
    assert result.stderr.count("<!DOCTYPE HTML>") <= 1 and web_server.requests == 3
