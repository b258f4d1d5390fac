"""Odd answers from a receiver: short counts, odd statuses, trickles, deep nesting. Real servers on loopback."""

from __future__ import annotations

import http.server
import json
import math
import socket
import struct
import threading
from collections.abc import Callable

import pytest

from spool import PartlyTaken, Spool
from spool.errors import Refused, TransientError
from spool.records import make_record
from spool.stathat import StatHatClient, classify_response

from .helpers import T0, TEST_EZKEY, cli_env, run_cli, spawn_cli, stop_agent, wait_for, wait_for_line

NESTED = "[" * 20_000 + "]" * 20_000  # far past Python's recursion limit, yet small


def records(n: int) -> list:
    return [make_record(stat=f"s{i}", count=1, t=T0) for i in range(n)]


def send(receiver, n: int, **options):
    client = StatHatClient(receiver.url, **options)
    try:
        return client.send_ez(TEST_EZKEY, records(n))
    finally:
        client.close()


# -- item 6: a short count is a batch we cannot account for --------------------------------------------------


def test_a_receiver_that_took_1_of_100_records_is_partly_taken_never_all_sent(receiver):
    receiver.fail_next(1, status=200, body='{"status":200,"msg":"ok","multiple":1}')
    with pytest.raises(PartlyTaken) as caught:
        send(receiver, 100)
    assert isinstance(caught.value, Refused)
    assert (caught.value.taken, caught.value.sent) == (1, 100)
    assert str(caught.value).startswith("the receiver took 1 of 100 records; which ones is unknown (answer: ")
    assert caught.value.body == '{"status":200,"msg":"ok","multiple":1}'


@pytest.mark.parametrize("multiple", [100, 140, 100.0, "100"])
def test_as_many_or_more_than_sent_is_accepted(multiple):
    # More is fine: StatHat may count the stats a ~ form expands to.
    body = json.dumps({"status": 200, "msg": "ok", "multiple": multiple})
    assert classify_response(200, body, sent=100) in (100, 140)


@pytest.mark.parametrize("status", ['"200"', '"200 "', "200.0", '" 200"'])
def test_a_200_status_written_as_a_string_or_a_float_is_accepted(receiver, status):
    receiver.fail_next(1, status=200, body='{"status":' + status + ',"msg":"ok","multiple":3}')
    assert send(receiver, 3) == 3


@pytest.mark.parametrize("status", ['"500"', "500", "400.0", '"404 "'])
def test_a_status_that_is_clearly_not_200_is_a_refusal(status):
    with pytest.raises(Refused):
        classify_response(200, '{"status":' + status + ',"msg":"invalid stat"}')


# -- item 10: a trickling answer ends at the deadline -------------------------------------------------------


def test_a_trickling_answer_ends_within_the_timeout_as_a_transient_failure(receiver):
    receiver.trickle_next(1, bytes_per_second=4)
    with pytest.raises(TransientError, match="no complete answer within 1 s"):
        send(receiver, 1, timeout=1)


def test_ship_once_against_a_trickling_receiver_ends_within_its_max_time(db, receiver):
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    receiver.trickle_next(1000, bytes_per_second=2)  # every attempt trickles: 200 bytes at 2 B/s is 100 s each
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--timeout", "1", "--max-time", "5",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=30)
    assert result.returncode == 1, result.stderr
    assert "1 record still pending: stopped after 5 s; last error: no complete answer within 1 s" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_answer_larger_than_stathat_would_ever_send_is_transient(receiver):
    receiver.fail_next(1, status=200, body='{"status":200,"msg":"' + "x" * (1 << 20) + '"}')
    with pytest.raises(TransientError, match="not StatHat's answer"):
        send(receiver, 1)


# -- item 11: any answer is classified, never raised as something else --------------------------------------


def test_a_deeply_nested_answer_is_transient_not_a_crash(receiver):
    receiver.fail_next(1, status=200, body=NESTED)
    with pytest.raises(TransientError, match="not StatHat's answer"):
        send(receiver, 1)


def test_ship_once_against_a_receiver_answering_deep_nesting_says_why_and_exits_2(db, receiver):
    # Answers that are not StatHat's pause shipping after a few in a row (the endpoint is wrong: an operator's to
    # fix, exit 2), where --max-time used to decide, by how many answers came within it, between that and exit 1.
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    receiver.fail_next(100_000, status=200, body='{"status":' + NESTED + "}")
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "60",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=90)
    assert result.returncode == 2, result.stderr
    assert ("1 record still pending: " + receiver.url + " does not answer as StatHat does: 3 answers in a row were "
            "not StatHat's (the last: HTTP 200 with a body that is not StatHat's answer)") in result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr


@pytest.mark.parametrize("body", [
    '{"status":[200]}', '{"status":{"code":200}}', '{"status":null}', '{"status":true}', '{"status":"ok"}',
    '{"status":"", "msg": "?"}', "\x00\xff binary", '{"status":1e999}', '{"status":NaN}',
])
def test_a_status_of_an_odd_type_is_not_stathats_answer(body):
    with pytest.raises(TransientError, match="not StatHat's answer"):
        classify_response(200, body)


@pytest.mark.parametrize("answer", [
    {"status": 500, "msg": 12}, {"status": 500, "msg": ["a", {"b": 1}]}, {"status": 500, "msg": None},
    {"status": 500, "msg": "line\nbreak\x1b[31m"},
])
def test_a_refusal_with_an_odd_message_is_still_a_refusal_with_a_printable_reason(answer):
    with pytest.raises(Refused) as caught:
        classify_response(200, json.dumps(answer))
    assert str(caught.value) and str(caught.value).isprintable()


# The rule, on a batch of 2 records. A count (`status`, `multiple`) is a whole number: a JSON number (2, 2.0) or
# a string in spool's one number syntax (ASCII, spaces around allowed: "2", " 2"). `status` 200 is an
# acceptance, another count a refusal; `multiple` absent says nothing more, a count of at least the records sent
# is all taken, a smaller one is partly taken (dead: which were taken is unknown). Anything else is not
# StatHat's answer: transient, neither delivered nor dead.
ANSWER_RULE = [
    ({"status": 200}, 2, None), ({"status": "200"}, 2, None), ({"status": " 200"}, 2, None),
    ({"status": 200.0}, 2, None), ({"status": 200, "multiple": 2}, 2, 2), ({"status": 200, "multiple": "2"}, 2, 2),
    ({"status": 200, "multiple": 2.0}, 2, 2), ({"status": 200, "multiple": 5}, 2, 5),
    ({"status": 200, "multiple": 0}, 2, PartlyTaken), ({"status": 200, "multiple": 1}, 2, PartlyTaken),
    ({"status": 200, "multiple": "1"}, 2, PartlyTaken),
    ({"status": 500, "msg": "invalid stat"}, 2, Refused), ({"status": "500"}, 2, Refused),
    ({"status": 500, "multiple": "junk"}, 2, Refused),  # the status decides first
    *(({"status": 200, "multiple": junk}, 2, TransientError) for junk in [
        -1, 1.5, True, False, None, math.nan, math.inf, "many", "-1", "1.5", "２", "٢", "1_0", [2], {"n": 2}]),
    *(({"status": junk}, 2, TransientError) for junk in [
        "２００", "٢٠٠", "200.5", 200.5, "2_00", "0x c8", True, None, math.nan, "ok", [200], {"code": 200}]),
    ({"multiple": 2}, 2, TransientError), ({}, 2, TransientError),
]


@pytest.mark.parametrize(("answer", "sent", "outcome"), ANSWER_RULE, ids=lambda v: json.dumps(v, allow_nan=True)
                         if isinstance(v, dict) else None)
def test_the_answer_rule_one_outcome_for_each_answer(answer, sent, outcome):
    body = json.dumps(answer, allow_nan=True, ensure_ascii=False)
    if isinstance(outcome, type):
        with pytest.raises(outcome) as caught:
            classify_response(200, body, sent=sent)
        assert type(caught.value) is outcome  # a PartlyTaken is a Refused: the exact class counts here
        if outcome is TransientError:
            assert "not StatHat's answer" in str(caught.value)
    else:
        assert classify_response(200, body, sent=sent) == outcome


def test_ship_once_never_takes_a_multiple_that_is_no_count_for_a_delivery(db, receiver):
    with Spool(db) as sp:
        sp.count("a", 1, t=T0)
        sp.count("b", 1, t=T0)
    receiver.fail_next(100_000, status=200, body='{"status":200,"msg":"ok","multiple":-1}')
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "1",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=30)
    assert result.returncode == 1, result.stderr
    assert "shipped 0, dead 0" in result.stderr and "2 records still pending" in result.stderr, result.stderr
    assert "not StatHat's answer" in result.stderr


def test_a_status_in_full_width_digits_is_not_stathats_answer():
    body = '{"status":"２００","msg":"ok","multiple":3}'.encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    with Scripted(answering(head, body)) as server, pytest.raises(TransientError, match="not StatHat's answer"):
        send(server, 3)


def test_doctor_gives_a_trickling_endpoint_its_timeout_not_more(db, receiver, tmp_path):
    receiver.trickle_next(1, bytes_per_second=2)  # doctor's GET / meets it: 100 s of answer
    config = tmp_path / "timeout.toml"
    config.write_text('[ship]\ntimeout = "1s"\n')
    env = {**cli_env(db, SPOOL_ENDPOINT=receiver.url), "SPOOL_CONFIG": str(config)}
    result = run_cli(db, "doctor", env=env, timeout=30)
    assert "endpoint: " + receiver.url + " not reachable: no complete answer within 1 s" in result.stdout


def test_an_answer_with_a_malformed_header_line_is_one_log_line_not_urllib3s_traceback(db):
    # urllib3 logs a header defect as a warning with its traceback; spool says what happened in its own line.
    import socket
    import threading

    answer = (b"HTTP/1.1 200 OK\r\nbroken header line\r\nContent-Type: application/json\r\n"
              b"Content-Length: 0\r\n\r\n")
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                connection, _ = server.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    try:
        result = run_cli(db, "ship", "--once", "--endpoint", f"http://127.0.0.1:{server.getsockname()[1]}",
                         "--max-time", "2", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=30)
    finally:
        done.set()
        thread.join(10)
        server.close()
    assert result.returncode == 1, result.stderr
    assert "with no length, and headers cut short or malformed" in result.stderr
    assert "Traceback" not in result.stderr and "Failed to parse headers" not in result.stderr, result.stderr


# -- a refusal names the key only in StatHat's own words ----------------------------------------------------


def test_a_refused_stat_whose_reason_holds_the_letters_key_dies_alone_and_the_rest_ship(db, receiver):
    receiver.refuse_stat("hockey scores", "invalid stat name: hockey scores")
    with Spool(db) as sp:
        for i in range(20):
            sp.count(f"good {i}", 1, t=T0 + i)
        sp.count("hockey scores", 3, t=T0 + 5)
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "30",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=60)
    assert result.returncode == 2, result.stderr  # a record refused: README's exit 2 (the rest delivered)
    assert "shipped 20, dead 1" in result.stderr
    assert "ezkey" not in result.stderr and "paused" not in result.stderr, result.stderr
    assert len(receiver.accepted) == 20
    with Spool(db) as sp:
        [dead] = sp.dead_letters()
    assert (dead.reason, dead.record.stat) == ("invalid stat name: hockey scores", "hockey scores")


def test_a_classic_records_refused_keys_are_its_own_and_pause_nothing(db, receiver):
    receiver.refuse_key("revoked-stat-key")
    with Spool(db) as sp:
        sp.classic_count(key="revoked-stat-key", ukey="user-key-1", t=T0)
        sp.count("fine", 1, t=T0)
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "30",
                     env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=60)
    assert result.returncode == 2, result.stderr  # its refusal needs a look, and says nothing of the configured key
    assert "shipped 1, dead 1" in result.stderr and "configured ezkey" not in result.stderr, result.stderr


# -- an answer that echoes the request never shows its key --------------------------------------------------

SECRET = "SuperSecretEzkey-7f3a9Q"


def leaks(text: str | bytes, key: str = SECRET) -> bool:
    """Whether any 6 characters in a row of `key` show in `text`."""
    raw = text if isinstance(text, bytes) else text.encode()
    return any(key[i:i + 6].encode() in raw for i in range(len(key) - 5))


def spool_bytes(db) -> bytes:
    return b"".join(path.read_bytes() for path in db.parent.glob(db.name + "*") if path.is_file())


def test_ship_once_through_a_proxy_echoing_the_request_shows_the_key_nowhere(db, receiver):
    receiver.echo_next(10_000, status=502)
    with Spool(db) as sp:  # keyless records: the configured key goes in each request, never in the spool
        for i in range(3):
            sp.count(f"s{i}", 1, t=T0 + i)
    env = cli_env(db, SPOOL_EZKEY=SECRET)
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "1", "--log-level", "debug",
                     env=env, timeout=60)
    assert result.returncode == 1 and 'HTTP 502 ({"ezkey":"***"' in result.stderr, result.stderr
    status, as_json = run_cli(db, "status", env=env), run_cli(db, "status", "--json", env=env)
    assert '"ezkey":"***"' in json.loads(as_json.stdout)["last_error"]
    for text in (result.stdout, result.stderr, status.stdout, status.stderr, as_json.stdout, as_json.stderr):
        assert not leaks(text), text
    assert not leaks(spool_bytes(db))


def test_a_refusal_quoting_the_request_leaves_a_dead_letter_without_the_key(db, receiver):
    receiver.echo_next(1, status=200, template='{"status":500,"msg":{request_json},"request":{request}}')
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    env = cli_env(db, SPOOL_EZKEY=SECRET)
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "30", env=env, timeout=60)
    assert result.returncode == 2 and "shipped 0, dead 1" in result.stderr, result.stderr
    listed = run_cli(db, "dead", "list", "--json", env=env)
    with Spool(db) as sp:
        [dead] = sp.dead_letters()
    assert '"ezkey":"***"' in dead.reason and dead.body and '"ezkey":"***"' in dead.body
    for text in (result.stderr, listed.stdout, listed.stderr, dead.reason, dead.body):
        assert not leaks(text), text
    assert not leaks(spool_bytes(db))


def test_the_agent_through_a_proxy_echoing_the_request_shows_the_key_nowhere(db, receiver):
    receiver.echo_next(10_000, status=502)
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    env = cli_env(db, SPOOL_EZKEY=SECRET)
    agent = spawn_cli(db, "run", "--endpoint", receiver.url, "--log-level", "debug", env=env)
    try:
        lines = wait_for_line(agent, "send failed")
        status = run_cli(db, "status", "--json", env=env)
    finally:
        stderr = stop_agent(agent)
    assert '"ezkey":"***"' in json.loads(status.stdout)["last_error"]
    for text in (*lines, stderr, status.stdout, status.stderr):
        assert not leaks(text), text
    assert not leaks(spool_bytes(db))


def test_ship_once_never_shows_a_short_key_the_receiver_quotes(db, receiver):
    receiver.fail_next(10_000, status=502, body="no route for account xq7 (ezkey=xq7), try later")
    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    env = cli_env(db, SPOOL_EZKEY="xq7")
    result = run_cli(db, "ship", "--once", "--endpoint", receiver.url, "--max-time", "1", env=env, timeout=60)
    status = run_cli(db, "status", "--json", env=env)
    assert result.returncode == 1, result.stderr
    assert "HTTP 502 (no route for account *** (ezkey=***" in result.stderr, result.stderr
    assert "xq7" not in result.stderr + result.stdout + status.stdout + status.stderr  # last_error, stored


# -- answers http.server cannot give: a raw receiver --------------------------------------------------------


class Scripted:
    """A receiver on 127.0.0.1 written on raw sockets, for answers http.server cannot give. Each request is read
    whole (its body kept in `bodies`), answered with the bytes `answer(body)` returns, and its connection then
    ended as `end` says: "close" (a clean close, FIN), "reset" (a TCP reset) or "hold" (kept open, unanswered
    further, until the client hangs up). With `trickle`, the answer's body goes a byte every `trickle` seconds
    (its headers at once). Connections are served one after another."""

    def __init__(self, answer: Callable[[bytes], bytes], end: str = "close", trickle: float = 0.0):
        self.bodies: list[bytes] = []
        self._answer, self._end, self._trickle = answer, end, trickle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="scripted-receiver")
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def __enter__(self) -> Scripted:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join(10)
        self._listener.close()

    def stats(self) -> list[str]:
        """The stat of every item of every request received, in order (a record sent twice shows twice)."""
        return [item["stat"] for body in self.bodies for item in json.loads(body)["data"]]

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(0.05)
                try:
                    self._exchange(connection)
                except OSError:
                    pass  # the client hung up: what a client may do

    def _receive(self, connection: socket.socket, data: bytes, done: Callable[[bytes], bool]) -> bytes:
        while not done(data) and not self._stopping.is_set():
            try:
                more = connection.recv(65536)
            except TimeoutError:
                continue
            if not more:
                raise ConnectionError("the client hung up")
            data += more
        return data

    def _exchange(self, connection: socket.socket) -> None:
        data = self._receive(connection, b"", lambda d: b"\r\n\r\n" in d)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = self._receive(connection, body, lambda d: len(d) >= length)
        self.bodies.append(body)
        answer = self._answer(body)
        if self._trickle:
            head, blank, answer = answer.partition(b"\r\n\r\n")
            connection.sendall(head + blank)
            for i in range(len(answer)):
                if self._stopping.wait(self._trickle):
                    return
                connection.sendall(answer[i:i + 1])
        else:
            connection.sendall(answer)
        if self._end == "reset":
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self._end == "hold":
            try:
                self._receive(connection, b"", lambda d: False)
            except ConnectionError:
                pass


def ok(body: bytes) -> bytes:
    """StatHat's acceptance of an EZ batch, for the request body it answers."""
    return json.dumps({"status": 200, "msg": "ok", "multiple": len(json.loads(body)["data"])}).encode()


def answering(head: bytes, body: Callable[[bytes], bytes] | bytes = b"") -> Callable[[bytes], bytes]:
    """An answer made of `head` (the status line and headers, blank line included) and `body`."""
    return lambda request: head + (body(request) if callable(body) else body)


def backlog(db, n: int = 3) -> None:
    with Spool(db) as sp:
        for i in range(n):
            sp.count(f"s{i}", 1, t=T0 + i)


# -- an answer whose body ends where the connection closes (RFC 9112 section 6.3) ---------------------------

UNFRAMED = {  # whole answers, each delimited by the connection's close: no Content-Length, not chunked
    "HTTP/1.0, JSON": answering(b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6\r\nContent-Type: application/json\r\n\r\n",
                                ok),
    "HTTP/1.1 Connection: close, JSON": answering(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n", ok),
    "HTTP/1.0, empty": answering(b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6\r\n\r\n"),
}


@pytest.mark.parametrize("answer", list(UNFRAMED))
def test_ship_once_takes_a_whole_answer_that_ends_where_the_connection_closed(db, answer):
    backlog(db, 3)
    with Scripted(UNFRAMED[answer]) as server:
        result = run_cli(db, "ship", "--once", "--endpoint", server.url, "--max-time", "10",
                         env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "shipped 3, dead 0" in result.stderr
    assert server.stats() == ["s0", "s1", "s2"]  # each record sent once


def test_the_agent_takes_the_answer_of_a_plain_http_server_that_sends_no_length(db):
    """http.server as most people write it: HTTP/1.0, a JSON body, no Content-Length; the body ends at the close."""
    stats: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):  # protocol_version: HTTP/1.0, the default
        def log_message(self, *args):
            pass

        def do_POST(self):
            request = self.rfile.read(int(self.headers["Content-Length"]))
            stats.extend(item["stat"] for item in json.loads(request)["data"])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(ok(request))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    serving.start()
    backlog(db, 3)
    agent = spawn_cli(db, "run", "--endpoint", f"http://127.0.0.1:{server.server_address[1]}",
                      env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    try:
        def all_sent() -> bool:
            with Spool(db) as sp:
                return sp.status()["sent"] == 3

        wait_for(all_sent)
    finally:
        stderr = stop_agent(agent)
        server.shutdown()
        serving.join(10)
        server.server_close()
    assert sorted(stats) == ["s0", "s1", "s2"], stderr  # each once: not re-sent for want of a length
    assert "send failed" not in stderr, stderr


@pytest.mark.parametrize(("answer", "end"), [
    # an answer cut in its headers reads to http.client as a whole one with no body: a refusal may hide there
    pytest.param(answering(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"), "close", id="cut after a header"),
    pytest.param(answering(b"HTTP/1.0 200 OK\r\nContent-Ty"), "close", id="cut in a header"),
    pytest.param(answering(b"HTTP/1.1 200 OK\r\nContent-Length: "), "close", id="cut in its Content-Length"),
    pytest.param(answering(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chun"), "close", id="cut in chunked"),
    # a body cut short by a clean close is no JSON
    pytest.param(answering(b"HTTP/1.0 200 OK\r\n\r\n", b'{"status":500,"msg":"invalid st'), "close",
                 id="body cut, closed"),
    # a whole body, but the connection was reset, not closed: no proof the answer ended there
    pytest.param(answering(b"HTTP/1.0 200 OK\r\n\r\n", ok), "reset", id="JSON, reset"),
    pytest.param(answering(b"HTTP/1.0 200 OK\r\n\r\n"), "reset", id="empty, reset"),
    # headers, then nothing until the deadline cuts the request: a body cut by the timeout, not the receiver
    pytest.param(answering(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"), "hold",
                 id="empty, held"),
    pytest.param(answering(b"HTTP/1.0 200 OK\r\n\r\n", b'{"status":200,"msg":"ok","multiple":3}'), "hold",
                 id="JSON, held"),
])
def test_an_unframed_answer_not_proved_whole_is_never_taken_for_a_delivery(answer, end):
    with Scripted(answer, end=end) as server, pytest.raises(TransientError) as caught:
        send(server, 3, timeout=1)
    assert len(server.bodies) == 1, caught.value


@pytest.mark.parametrize("body", [b"", b'{"status":500,"msg":"in'])
def test_a_body_closed_before_its_content_length_is_never_taken(body):
    # urllib3 1.26 does not check a Content-Length: a body cut right after the headers read as an empty 200.
    cut = answering(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 35\r\n\r\n", body)
    with Scripted(cut) as server, pytest.raises(TransientError):
        send(server, 3)


def test_a_whole_unframed_refusal_is_a_refusal():
    refusal = answering(b"HTTP/1.0 200 OK\r\n\r\n", b'{"status":500,"msg":"invalid stat name"}')
    with Scripted(refusal) as server, pytest.raises(Refused, match="invalid stat name"):
        send(server, 3)


@pytest.mark.parametrize("head", [
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", id="no length"),
    pytest.param(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 30\r\n\r\n",
                 id="Connection: close"),
])
def test_an_answer_that_ends_with_its_connection_still_ends_at_the_deadline_when_it_trickles(head):
    # http.client gives the socket to such an answer and lets go of it: the deadline must still reach it.
    body = b'{"status":200,"msg":"ok","multiple":3}'[:30]
    trickling = Scripted(answering(head, body), trickle=0.3)  # 9 s of body, each byte within the 1 s timeout
    with trickling as server, pytest.raises(TransientError, match="no complete answer within 1 s"):
        send(server, 3, timeout=1)


# -- interim 1xx answers before the final one ---------------------------------------------------------------


def final(request: bytes) -> bytes:
    """StatHat's acceptance, framed by its Content-Length."""
    body = ok(request)
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


INTERIM = {
    "102": b"HTTP/1.1 102 Processing\r\n\r\n",
    "103": b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
    "100 then 103": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
    "103 twice, then 102": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 103 Early Hints\r\n\r\n"
                           b"HTTP/1.1 102 Processing\r\n\r\n",
    "199": b"HTTP/1.1 199 Unassigned\r\nX-Note: interim\r\n\r\n",
}


def interim_then_final(interim: bytes) -> Callable[[bytes], bytes]:
    return lambda request: interim + final(request)


@pytest.mark.parametrize("interim", list(INTERIM))
def test_interim_answers_are_skipped_and_the_final_answer_taken(interim):
    with Scripted(interim_then_final(INTERIM[interim])) as server:
        assert send(server, 3) == 3
    assert len(server.bodies) == 1


def test_ship_once_takes_the_200_after_a_103_and_sends_each_record_once(db):
    backlog(db, 3)
    with Scripted(interim_then_final(INTERIM["103"])) as server:
        result = run_cli(db, "ship", "--once", "--endpoint", server.url, "--max-time", "10",
                         env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=60)
    assert result.returncode == 0, result.stderr
    assert "shipped 3, dead 0" in result.stderr
    assert server.stats() == ["s0", "s1", "s2"]


def test_a_101_is_no_answer_to_the_request_so_its_outcome_is_unknown_and_transient():
    switch = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    with Scripted(switch) as server, pytest.raises(TransientError, match=r"^HTTP 101 .*unknown"):
        send(server, 3)
    with pytest.raises(TransientError, match=r"^HTTP 103 .*unknown"):  # however a 1xx reaches classification
        classify_response(103, "")
