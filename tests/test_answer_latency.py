"""No answer waits for the client's delayed ACK: every kind of answer, on a keep-alive connection.

The relay and the bundled receiver write an answer's headers and its body in two sends. With Nagle's
algorithm on, the body waits until the client acknowledges the headers, and a client delays that ACK by
~40 ms: every answer with a body took ~44 ms against ~2 ms for a 204 (about 22 requests a second on one
connection). The bound below is loose on purpose: a median of 20 answers under 20 ms passes on a busy
machine, and a stall of 40 ms on every answer cannot pass it. Speed itself is measured in scripts/bench.py.
"""

from __future__ import annotations

import http.client
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest

from spool.testing import Receiver

from .helpers import T0, running_relay

ROUNDS = 20
BOUND = 0.020  # seconds: half the delayed-ACK stall this test exists to catch

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}
BATCH = json.dumps({"ezkey": "k", "data": [{"stat": "a", "count": 1, "t": T0}, {"stat": "b", "value": 2, "t": T0}]})

# name: (method, path, body, headers, expected status, expected body or None for any)
RELAY_ANSWERS = {
    "204": ("POST", "/ez", f"ezkey=k&stat=s&count=1&t={T0}", FORM, 204, b""),
    "vb=1": ("POST", "/ez", f"ezkey=k&stat=s&count=1&t={T0}&vb=1", FORM, 200, b'{"status":200,"msg":"ok"}'),
    "batch": ("POST", "/ez", BATCH, JSON, 200, b'{"status":200,"msg":"ok","multiple":2}'),
    "refusal": ("POST", "/ez", "ezkey=k&count=1", FORM, 200, None),
    "404": ("GET", "/nowhere", None, {}, 404, b"404 page not found\n"),
    "healthz": ("GET", "/healthz", None, {}, 200, None),
    "metrics": ("GET", "/metrics", None, {}, 200, None),
}

RECEIVER_ANSWERS = {
    "204": ("POST", "/ez", f"ezkey=k&stat=s&count=1&t={T0}", FORM, 204, b""),
    "vb=1": ("POST", "/ez", f"ezkey=k&stat=s&count=1&t={T0}&vb=1", FORM, 200, b'{"status":200,"msg":"ok"}'),
    "batch": ("POST", "/ez", BATCH, JSON, 200, b'{"status":200,"msg":"ok","multiple":2}'),
    "refusal": ("POST", "/ez", "ezkey=k&stat=refused&count=1", FORM, 200,
                b'{"status":500,"msg":"invalid stat name"}'),
    "404": ("GET", "/nowhere", None, {}, 404, b"404 page not found\n"),
    "ping": ("GET", "/", None, {}, 200, b""),
}


def median_answer_time(url: str, method: str, path: str, body: str | None, headers: dict[str, str],
                       status: int, expected: bytes | None) -> float:
    """Ask the same thing ROUNDS times on one keep-alive connection; check every answer; return the median time."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    times = []
    try:
        for _ in range(ROUNDS):
            started = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            answer = conn.getresponse()
            content = answer.read()
            times.append(time.perf_counter() - started)
            assert answer.status == status, (answer.status, content)
            assert expected is None or content == expected, content
            assert not answer.will_close  # the same connection serves the next request
    finally:
        conn.close()
    return statistics.median(times)


@pytest.fixture(scope="module")
def relay(tmp_path_factory) -> Iterator[str]:
    with running_relay(tmp_path_factory.mktemp("relay") / "spool.db") as running:
        yield running.url


@pytest.mark.parametrize("kind", RELAY_ANSWERS)
def test_the_relay_answers_on_a_keep_alive_connection_without_a_delayed_ack_stall(relay, kind):
    assert median_answer_time(relay, *RELAY_ANSWERS[kind]) < BOUND


@contextmanager
def failing_relay(tmp_path) -> Iterator[str]:
    """A relay whose every commit is refused (a full spool under reject_new): it answers 503."""
    db = tmp_path / "spool.db"
    with running_relay(db, spool={"max_pending": 1, "when_full": "reject_new"}) as relay:
        from spool.store import Store

        with Store(db) as store:
            store.append([("waiting", None, None, "k", 0, 1, T0)])  # the spool is at its bound now
        yield relay.url


def test_the_relays_503_for_a_spool_it_cannot_write_has_no_stall_either(tmp_path):
    with failing_relay(tmp_path) as url:
        assert median_answer_time(url, "POST", "/ez", f"ezkey=k&stat=s&count=1&t={T0}", FORM, 503, None) < BOUND
        assert median_answer_time(url, "GET", "/healthz", None, {}, 503, None) < BOUND


@pytest.fixture(scope="module")
def receiver_url() -> Iterator[str]:
    with Receiver() as receiver:
        receiver.refuse_stat("refused")
        yield receiver.url


@pytest.mark.parametrize("kind", RECEIVER_ANSWERS)
def test_the_test_receiver_answers_on_a_keep_alive_connection_without_a_delayed_ack_stall(receiver_url, kind):
    assert median_answer_time(receiver_url, *RECEIVER_ANSWERS[kind]) < BOUND


def test_the_test_receivers_503_has_no_stall_either():
    with Receiver() as receiver:
        receiver.fail_next(ROUNDS)
        assert median_answer_time(receiver.url, "POST", "/ez", "ezkey=k&stat=s&count=1", FORM, 503,
                                  b"Back-end server is at capacity") < BOUND
