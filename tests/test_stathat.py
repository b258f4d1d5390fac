"""Talking to StatHat: response classification exactly as STATHAT.md describes the service."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spool.errors import ConfigError, EndpointError, Refused, TransientError
from spool.records import Record, make_record
from spool.stathat import (
    StatHatClient,
    check_endpoint,
    classify_response,
    ez_body,
    ez_item,
    redact,
    retry_after_seconds,
)

from .helpers import T0


@pytest.mark.parametrize(("status", "body", "taken"), [
    (204, "", None),
    (200, "", None),
    (200, '{"status":200,"msg":"ok"}', None),
    (200, '{"status":200,"msg":"ok","multiple":3}', 3),
])
def test_acceptances(status, body, taken):
    assert classify_response(status, body) == taken


@pytest.mark.parametrize(("body", "message", "names_key"), [
    ('{"status":500,"msg":"invalid keys"}', "invalid keys", True),
    ('{"status":500,"msg":"no ezkey specified"}', "no ezkey specified", True),
    ('{"status":500,"msg":"invalid stat name"}', "invalid stat name", False),
    ('{"status":400}', "status 400", False),
])
def test_http_200_with_another_status_in_the_body_is_a_refusal_never_a_success(body, message, names_key):
    with pytest.raises(Refused) as caught:
        classify_response(200, body)
    assert str(caught.value) == message
    assert caught.value.names_key is names_key
    assert caught.value.body == body and caught.value.http_status == 200


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_overload_and_server_errors_are_transient(status):
    with pytest.raises(TransientError):
        classify_response(status, "Back-end server is at capacity")


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 405, 410])
def test_other_statuses_mean_a_misconfigured_endpoint(status):
    with pytest.raises(EndpointError, match=f"HTTP {status}"):
        classify_response(status, "nope")


@pytest.mark.parametrize("body", ["<html>wifi login</html>", "[1,2]", '{"msg":"ok"}'])
def test_a_2xx_body_that_is_not_stathats_answer_is_transient(body):
    with pytest.raises(TransientError, match="not StatHat's answer"):
        classify_response(200, body)


def test_retry_after_in_seconds_or_as_an_http_date():
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds(None) is None
    with pytest.raises(TransientError) as caught:
        classify_response(503, "", retry_after="7")
    assert caught.value.retry_after == 7


@pytest.mark.parametrize(("url", "ok"), [
    ("https://api.stathat.com", True),
    ("https://api.stathat.com/", True),
    ("http://127.0.0.1:8080", True),
    ("http://localhost:8080", True),
    ("http://[::1]:8080", True),
    ("http://api.stathat.com", False),
    ("ftp://api.stathat.com", False),
    ("api.stathat.com", False),
    ("https://user:pw@api.stathat.com", False),
])
def test_plain_http_is_refused_unless_loopback_or_allowed(url, ok):
    if ok:
        assert not check_endpoint(url).endswith("/")
    else:
        with pytest.raises(ConfigError):
            check_endpoint(url)
    assert check_endpoint("http://api.stathat.com", allow_insecure=True) == "http://api.stathat.com"


def test_an_ez_batch_is_one_json_post_with_the_key_in_the_body(receiver):
    client = StatHatClient(receiver.url)
    try:
        client.send_ez("key-1", [make_record(stat="a & b = c", count=2, t=T0),
                                 make_record(stat="m~x,y", value=0.25, t=T0 + 1)])
    finally:
        client.close()
    assert receiver.accepted == [
        {"stat": "a & b = c", "ezkey": "key-1", "kind": "count", "number": 2, "t": T0},
        {"stat": "m~x,y", "ezkey": "key-1", "kind": "value", "number": 0.25, "t": T0 + 1},
    ]


def test_connection_errors_are_transient_and_never_carry_the_key():
    client = StatHatClient("http://127.0.0.1:9", timeout=1)  # nothing listens on the discard port
    try:
        with pytest.raises(TransientError) as caught:
            client.send_ez("secret-key-value", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
    assert "secret-key-value" not in str(caught.value)
    assert "cannot reach http://127.0.0.1:9" in str(caught.value)


def test_tls_against_a_plain_http_port_is_an_endpoint_error_that_says_so(receiver):
    client = StatHatClient(receiver.url.replace("http://", "https://"), timeout=5)
    try:
        with pytest.raises(EndpointError, match="the server speaks plain http there"):
            client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()


def test_a_tls_server_the_client_does_not_trust_is_a_tls_failure_not_a_plain_http_hint(tmp_path):
    import shutil
    import socket
    import ssl
    import subprocess
    import threading

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:  # one handshake, which the client breaks off: it does not trust this certificate
        try:
            conn, _ = listener.accept()
            with conn:
                context.wrap_socket(conn, server_side=True).close()
        except OSError:  # ssl.SSLError is one
            pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = StatHatClient(f"https://127.0.0.1:{listener.getsockname()[1]}", timeout=5)
    try:
        with pytest.raises(EndpointError) as caught:
            client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
        server.join(10)
        listener.close()
    assert "TLS failure talking to" in str(caught.value) and "plain http" not in str(caught.value)


def test_an_https_endpoint_is_reached_through_the_https_proxy_of_the_environment(monkeypatch):
    import socket
    import threading

    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = socket.create_server(("127.0.0.1", 0))
    proxy.settimeout(10)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    asked: list[bytes] = []

    def serve() -> None:  # a proxy that reads the request, then hangs up
        try:
            conn, _ = proxy.accept()
            with conn:
                asked.append(conn.recv(4096))
        except OSError:
            pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    client = StatHatClient("https://127.0.0.1:9", timeout=5)
    try:
        with pytest.raises(TransientError):
            client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
        server.join(10)
        proxy.close()
    assert asked and asked[0].startswith(b"CONNECT 127.0.0.1:9 ")


def test_a_host_name_that_does_not_resolve_is_transient_and_named_as_such():
    client = StatHatClient("https://no-such-host.invalid", timeout=5)
    try:
        with pytest.raises(TransientError, match=r"cannot resolve host no-such-host\.invalid") as caught:
            client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
    assert caught.value.unresolvable  # before any delivery, `ship --once` stops at once on it


@given(st.lists(st.builds(
    Record, stat=st.text(min_size=1, max_size=40).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s)),
    key=st.none(), ukey=st.none(), ezkey=st.none(), kind=st.sampled_from([0, 1]),
    number=st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False),
    t=st.integers(min_value=1_000_000_000, max_value=4_102_444_800)), max_size=20), st.text(min_size=1, max_size=20))
def test_an_ez_batch_is_byte_for_byte_what_json_dumps_makes_of_its_items(records, ezkey):
    expected = json.dumps({"ezkey": ezkey, "data": [ez_item(r) for r in records]}, separators=(",", ":"))
    assert ez_body(ezkey, records) == expected.encode()


class _Recorder:
    """A real HTTP server on loopback that keeps each request's line, headers and body, answers StatHat's ok,
    and sets a cookie in its answers when told to (a load balancer's sticky session)."""

    def __init__(self, cookie: str | None = None):
        import http.server
        import threading

        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                recorder.requests.append((self.requestline, dict(self.headers), body))
                answer = json.dumps({"status": 200, "msg": "ok", "multiple": len(json.loads(body)["data"])}).encode()
                self.send_response(200)
                if cookie:
                    self.send_header("Set-Cookie", cookie)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_every_ez_batch_carries_what_the_session_prepares_auth_proxy_and_cookies(tmp_path, monkeypatch):
    """EZ batches reuse one preparation of their request: each must still carry the session's headers and the
    credentials from ~/.netrc, go through the environment's proxy, and (once the receiver set one) the cookie."""
    import base64

    netrc = tmp_path / "netrc"
    netrc.write_text("machine stathat.invalid login user password secret\n")
    netrc.chmod(0o600)
    proxy = _Recorder(cookie="sticky=b1; Path=/")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = StatHatClient("http://stathat.invalid", allow_insecure=True, timeout=5)
    try:
        for n in (1, 3, 2):
            records = [make_record(stat=f"s{i}", count=i + 1, t=T0 + i) for i in range(n)]
            assert client.send_ez("k", records) == n
    finally:
        client.close()
        proxy.close()
    assert [line for line, _, _ in proxy.requests] == ["POST http://stathat.invalid/ez HTTP/1.1"] * 3
    auth = "Basic " + base64.b64encode(b"user:secret").decode()
    for i, (_, headers, body) in enumerate(proxy.requests):
        assert body == ez_body("k", [make_record(stat=f"s{j}", count=j + 1, t=T0 + j) for j in range((1, 3, 2)[i])])
        assert int(headers["Content-Length"]) == len(body)
        assert (headers["Content-Type"], headers["User-Agent"], headers["Authorization"]) == (
            "application/json", "stathat-spool", auth)
        assert headers.get("Cookie") == (None if i == 0 else "sticky=b1")


# -- a refusal names the key only in StatHat's own words ----------------------------------------------------


@pytest.mark.parametrize(("msg", "names_key"), [
    ("invalid keys", True),
    ("no ezkey specified", True),
    ("invalid stat name: hockey scores", False),  # "hockey" holds "key"
    ("keyboard cat is not a stat", False),
    ("invalid keys in stat 'a'", False),
    ("Invalid Keys", False),
])
def test_only_stathats_exact_key_refusals_name_the_key(msg, names_key):
    with pytest.raises(Refused) as caught:
        classify_response(200, json.dumps({"status": 500, "msg": msg}))
    assert caught.value.names_key is names_key


# -- nothing quoted from an answer carries a key -------------------------------------------------------------

SECRET = "Zq7-SuperSecret/Xk9+é"  # URL-encoding and JSON-escaping both change it
UKEY = "Uk3-UserKeyValue&=9"


def leaks(text: str, key: str = SECRET) -> bool:
    """Whether any 4 characters in a row of `key` show in `text` (a key cut short leaks its start)."""
    return any(key[i:i + 4] in text for i in range(len(key) - 3))


def _echoes() -> dict[str, str]:
    from urllib.parse import urlencode

    ez = ez_body(SECRET, [make_record(stat="s", count=1, t=T0)]).decode()
    form = urlencode({"key": SECRET, "ukey": UKEY, "count": 1, "t": T0})
    return {
        "ez json": ez,
        "form": form,
        "query string": f"GET /c?{form} HTTP/1.1",
        "json inside json": json.dumps({"error": "upstream refused", "request": ez}),
        "python repr": repr({"ezkey": SECRET, "data": []}),
        "bytes repr": repr(ez.encode()),
        "bare key": f"no route for account {SECRET} today",
        "key past the quote limit": "x" * 110 + " " + SECRET + " and more",
        "key cut by the receiver": ez[:14],
        "bare key cut by the receiver": f"no route for account {SECRET[:9]}",
    }


def _answers(body: str) -> list[tuple[int, str, int | None]]:
    """(HTTP status, answer, items sent) for every kind of answer that quotes the receiver's text."""
    return [(502, body, None), (404, body, None), (200, body, None),
            (200, json.dumps({"status": 500, "msg": f"refused: {body}"}), None),
            (200, json.dumps({"status": 500, "msg": "invalid stat name", "request": body}), None),
            (200, json.dumps({"status": 200, "msg": "ok", "multiple": 1, "request": body}), 2)]


@pytest.mark.parametrize("echo", list(_echoes()))
def test_no_answer_quotes_a_key_the_request_carried_in_any_spelling(echo):
    for status, body, sent in _answers(_echoes()[echo]):
        with pytest.raises((TransientError, EndpointError, Refused)) as caught:
            classify_response(status, body, sent=sent, keys=(SECRET, UKEY))
        quoted = [str(caught.value), getattr(caught.value, "body", "")]
        assert not any(leaks(text) or leaks(text, UKEY) for text in quoted), (status, quoted)


def test_key_fields_are_redacted_even_for_keys_the_request_did_not_carry():
    other = "OtherAccountKey-12345"
    for body in (json.dumps({"ezkey": other}), f"key={other}&ukey={other}", repr({"ukey": other}),
                 json.dumps({"request": json.dumps({"key": other})}), '{"ezkey":"' + other[:10]):
        with pytest.raises(TransientError) as caught:
            classify_response(502, body)
        assert not leaks(str(caught.value), other), str(caught.value)


def test_a_redacted_answer_still_says_what_came_back():
    body = ez_body(SECRET, [make_record(stat="s", count=1, t=T0)]).decode()
    with pytest.raises(TransientError) as caught:
        classify_response(502, body, keys=(SECRET,))
    assert str(caught.value) == 'HTTP 502 ({"ezkey":"***","data":[{"stat":"s","count":1,"t":1700000000}]})'
    with pytest.raises(Refused) as refused:
        classify_response(200, json.dumps({"status": 500, "msg": f"no stat for {SECRET}"}), keys=(SECRET,))
    assert str(refused.value) == "no stat for ***"
    assert not leaks(refused.value.body)


def test_a_key_that_spells_part_of_the_answer_does_not_change_how_it_is_classified():
    # The classification reads the answer as it came; only what is quoted is redacted.
    with pytest.raises(Refused) as caught:
        classify_response(200, '{"status":500,"msg":"invalid keys"}', keys=("invalid keys", "status"))
    assert caught.value.names_key
    assert classify_response(200, '{"status":200,"msg":"ok","multiple":3}', keys=("status", "multiple")) == 3


def test_the_client_redacts_the_keys_of_what_it_sent_from_an_echoing_proxys_answer(receiver):
    receiver.echo_next(1, status=502)
    receiver.echo_next(1, status=502, cut=18)  # '{"ezkey":"Zq7-Sup': the proxy quotes the start of the request
    receiver.echo_next(1, status=502)
    client = StatHatClient(receiver.url)
    try:
        with pytest.raises(TransientError) as ez:
            client.send_ez(SECRET, [make_record(stat="s", count=1, t=T0)])
        with pytest.raises(TransientError) as cut:
            client.send_ez(SECRET, [make_record(stat="s", count=1, t=T0)])
        with pytest.raises(TransientError) as classic:
            client.send_classic(make_record(key=SECRET, ukey=UKEY, count=1, t=T0))
        receiver.fail_next(1, status=502, body=f"the last account seen was {SECRET}")  # an earlier request's key
        with pytest.raises(TransientError) as earlier:
            client.send_classic(make_record(key="another-stat-key", ukey=UKEY, count=1, t=T0))
    finally:
        client.close()
    assert str(cut.value) == 'HTTP 502 ({"ezkey":"***)'
    for caught in (ez, cut, classic, earlier):
        assert str(caught.value).startswith("HTTP 502 (") and "***" in str(caught.value)
        assert not leaks(str(caught.value)) and not leaks(str(caught.value), UKEY), str(caught.value)


def _one_batch_server(respond):
    """A raw server on 127.0.0.1 that reads one EZ batch and lets `respond(connection, request)` answer it.

    Returns (url, stop): stop() joins the server's thread and closes it.
    """
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(10)

    def serve() -> None:
        try:
            connection, _ = server.accept()
        except OSError:
            return
        with connection:
            data = b""
            while b"}]}" not in data:
                data += connection.recv(65536)
            respond(connection, data)

    thread = threading.Thread(target=serve)
    thread.start()

    def stop() -> None:
        thread.join(10)
        server.close()

    return f"http://127.0.0.1:{server.getsockname()[1]}", stop


def test_an_exception_quoting_the_answer_is_redacted_too():
    # A chunked answer whose first "chunk size" is the request: urllib3's error quotes the line it read.
    def respond(connection, request):
        body = request.partition(b"\r\n\r\n")[2]
        connection.sendall(b"HTTP/1.1 502 Bad Gateway\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"\r\n")

    url, stop = _one_batch_server(respond)
    client = StatHatClient(url, timeout=5)
    try:
        with pytest.raises(TransientError) as caught:
            client.send_ez(SECRET, [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
        stop()
    assert "InvalidChunkLength" in str(caught.value)  # the exception's own text, quoted
    assert not leaks(str(caught.value)), str(caught.value)


def _spellings(key: str) -> list[str]:
    from urllib.parse import quote, quote_plus

    escaped = json.dumps(key)[1:-1]
    lower_hex = re.sub("%[0-9A-F]{2}", lambda m: m.group().lower(), quote(key, safe=""))
    upper_hex = re.sub(r"\\u[0-9a-f]{4}", lambda m: "\\u" + m.group()[2:].upper(), escaped)
    return [key, quote(key, safe=""), quote_plus(key, safe=""), lower_hex, escaped, json.dumps(escaped)[1:-1],
            upper_hex, repr(key.encode()), repr(repr(key.encode()))]


@given(key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_/+@.=&é😀 ", min_size=4, max_size=40),
       spelling=st.integers(min_value=0, max_value=8), cut=st.none() | st.integers(min_value=0),
       before=st.text(alphabet=" <>{}[]:,;!#~\n", max_size=20), after=st.text(alphabet=" <>{}[]:,;!#~", max_size=20))
def test_a_key_in_any_spelling_whole_or_cut_short_is_redacted(key, spelling, cut, before, after):
    text = _spellings(key)[spelling]
    text = text if cut is None else text[:cut]
    assert not leaks(redact(before + text + after, [key]), key)


# -- a redirect is never followed: a misconfiguration, on every path -----------------------------------------


class _Redirector:
    """A real HTTP server on loopback answering every request with `status` and a Location to `target`."""

    def __init__(self, status: int, target: str):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(status)
                self.send_header("Location", target + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def __enter__(self) -> _Redirector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self._thread.join(10)
        self.server.server_close()


REDIRECTS = [301, 302, 303, 307, 308]


@pytest.mark.parametrize("path", ["ez", "classic"])
@pytest.mark.parametrize("status", REDIRECTS)
def test_a_redirect_is_never_followed_and_is_a_misconfigured_endpoint(receiver, status, path):
    with _Redirector(status, receiver.url) as redirector:
        client = StatHatClient(redirector.url, timeout=5)
        try:
            with pytest.raises(EndpointError) as caught:
                if path == "ez":
                    client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
                else:
                    client.send_classic(make_record(key="key-1", ukey="ukey-1", count=1, t=T0))
        finally:
            client.close()
    assert str(caught.value).startswith(f"HTTP {status} from the endpoint, a redirect to {receiver.url}/")
    assert "spool follows no redirect" in str(caught.value)
    assert receiver.requests == 0  # the key went nowhere else


@pytest.mark.parametrize("status", REDIRECTS)
def test_ship_once_ends_at_once_on_a_redirect_with_one_line_saying_what_to_fix(db, receiver, status):
    from spool import Spool

    from .helpers import TEST_EZKEY, cli_env, run_cli

    with Spool(db) as sp:
        sp.count("s", 1, t=T0)
    with _Redirector(status, receiver.url) as redirector:
        result = run_cli(db, "ship", "--once", "--endpoint", redirector.url, "--max-time", "10",
                         env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY), timeout=60)
    assert result.returncode == 2, result.stderr  # an operator must fix the endpoint
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert f"HTTP {status} from the endpoint, a redirect to {receiver.url}/ez" in last, last
    assert "1 record still pending" in last and receiver.requests == 0


def test_close_hangs_up_every_connection_at_once_though_an_error_still_refers_to_its_answer():
    # urllib3 2 leaves a closed pool's connections to the garbage collector, and an error kept (a log record,
    # a test's `caught`) keeps the answer, its pool and its socket alive: close() must not wait for that.
    import threading

    hung_up = threading.Event()

    def respond(connection, request):
        connection.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        connection.settimeout(10)
        try:
            if connection.recv(1) == b"":  # the client hung up, as close() must
                hung_up.set()
        except OSError:
            pass

    url, stop = _one_batch_server(respond)
    client = StatHatClient(url, timeout=5)
    try:
        with pytest.raises(EndpointError) as caught:
            client.send_ez("key-1", [make_record(stat="s", count=1, t=T0)])
    finally:
        client.close()
        hung_up.wait(10)
        stop()
    assert hung_up.is_set(), caught.value


# -- a key of 1 to 3 characters: redacted where it stands as a whole token ----------------------------------

SHORT_KEYS = ["q", "x7", "xq7", "é", "a b", "k&"]


@pytest.mark.parametrize("key", SHORT_KEYS)
def test_a_short_key_standing_as_a_token_is_redacted_in_any_spelling(key):
    for spelling in _spellings(key)[:7]:  # as sent, URL- or form-encoded, JSON-escaped once or twice
        for before, after in [("no account ", " here"), ("", ""), ("(", ")"), ('{"msg":"', '"}'), ("id:", ";"),
                              ("account%20", "%20here"), ("line\\n", "\\t"), ("x\\u0020", "\\u0021")]:
            assert redact(before + spelling + after, [key]) == before + "***" + after, (spelling, before)


@pytest.mark.parametrize(("key", "text"), [
    ("xq7", "xq7abc and axq7 and xq7_1 and _xq7 and xq7é"),
    ("q", "quite quick: a faq, qq, q1"),
    ("x7", "0x7f and x77"),
])
def test_a_short_key_inside_a_word_is_left_as_it_is(key, text):
    assert redact(text, [key]) == text


@pytest.mark.parametrize("key", SHORT_KEYS)
def test_a_short_key_in_a_key_field_or_parameter_is_always_redacted(key):
    from urllib.parse import urlencode

    assert redact(json.dumps({"ezkey": key}), [key]) == '{"ezkey": "***"}'
    assert redact(urlencode({"key": key, "ukey": key, "count": 1}), [key]) == "key=***&ukey=***&count=1"
    assert redact(json.dumps({"ezkey": key}), []) == '{"ezkey": "***"}'  # whether or not it was sent


def test_a_short_key_quoted_bare_by_the_receiver_never_shows():
    with pytest.raises(TransientError) as caught:
        classify_response(502, "no route for account xq7, try again", keys=("xq7",))
    assert str(caught.value) == "HTTP 502 (no route for account ***, try again)"
    with pytest.raises(Refused) as refused:
        classify_response(200, '{"status":500,"msg":"xq7 is unknown"}', keys=("xq7",))
    assert str(refused.value) == "*** is unknown" and "xq7" not in refused.value.body
