"""The relay: a real HTTP client (and a UDP sender) against a real relay on 127.0.0.1, port 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
import requests

from spool.config import RelaySettings
from spool.errors import ConfigError
from spool.metrics import Metrics
from spool.records import make_record
from spool.relay import Relay
from spool.ship import Shipper
from spool.store import Store

from .helpers import (
    T0,
    TEST_EZKEY,
    UNPACED,
    cli_env,
    damage_spool,
    make_config,
    running_relay,
    spawn_cli,
    stop_agent,
    wait_for,
    wait_for_line,
)


def spooled(db):
    with Store(db) as store:
        return [record for _, _, record in store.records()]


@pytest.fixture
def relay(db):
    with running_relay(db) as r:
        yield r


def test_ez_by_get_query_is_answered_204_and_is_on_disk_before_the_answer(relay, db):
    answer = requests.get(f"{relay.url}/ez", params={"ezkey": "k", "stat": "hits", "count": "2", "t": T0})
    assert (answer.status_code, answer.content) == (204, b"")
    assert spooled(db) == [make_record(stat="hits", count=2, t=T0, ezkey="k")]


def test_ez_by_post_form_with_vb_gets_the_verbose_answer_byte_for_byte(relay, db):
    answer = requests.post(f"{relay.url}/ez", data={"ezkey": "k", "stat": "load", "value": "0.73", "vb": "1"})
    assert (answer.status_code, answer.content) == (200, b'{"status":200,"msg":"ok"}')
    assert spooled(db)[0].number == 0.73


def test_ez_json_batch_with_the_tilde_form_answers_multiple(relay, db):
    body = {"ezkey": "k", "data": [{"stat": "messages sent~total,female", "count": 1, "t": T0},
                                   {"stat": "ws0 load", "value": 0.5}]}
    answer = requests.post(f"{relay.url}/ez", json=body)
    assert (answer.status_code, answer.content) == (200, b'{"status":200,"msg":"ok","multiple":2}')
    first, second = spooled(db)
    assert first == make_record(stat="messages sent~total,female", count=1, t=T0, ezkey="k")
    assert abs(second.t - time.time()) < 5  # no t: stamped on arrival, so it is never sent without one


def test_the_email_alias_names_the_account(relay, db):
    requests.post(f"{relay.url}/ez", data={"email": "me@example.com", "stat": "s", "count": "1"})
    assert spooled(db)[0].ezkey == "me@example.com"


def test_classic_counter_and_value(relay, db):
    assert requests.post(f"{relay.url}/c", data={"key": "K", "ukey": "U", "t": T0}).status_code == 204
    assert requests.get(f"{relay.url}/v", params={"key": "K", "ukey": "U", "value": "9.5", "t": T0}).status_code == 204
    assert spooled(db) == [make_record(key="K", ukey="U", count=1, t=T0),
                           make_record(key="K", ukey="U", value=9.5, t=T0)]


def test_a_form_body_with_raw_spaces_from_a_client_that_does_not_encode_is_taken(relay, db):
    raw = f"ezkey=k&stat=messages sent today&count=1&t={T0}".encode()
    answer = requests.post(f"{relay.url}/ez", data=raw,
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert answer.status_code == 204
    assert spooled(db)[0].stat == "messages sent today"


@pytest.mark.parametrize(("path", "data", "message"), [
    ("/ez", {"stat": "s", "count": "1"}, "no ezkey specified"),
    ("/ez", {"ezkey": "k", "count": "1"}, "give stat"),
    ("/ez", {"ezkey": "k", "stat": "s"}, "give count or value"),
    ("/ez", {"ezkey": "k", "stat": "s", "count": "lots"}, "count 'lot…' (4 characters) is not a number"),
    ("/ez", {"ezkey": "k", "stat": "s", "value": "nan"}, "finite"),
    ("/ez", {"ezkey": "k", "stat": "s", "count": "1", "t": "1700000000000"}, "looks like milliseconds"),
    ("/ez", {"ezkey": "k", "stat": "a~", "count": "1"}, "empty name"),
    ("/c", {"key": "K", "count": "1"}, "invalid keys"),
    ("/v", {"key": "K", "ukey": "U"}, "give count or value"),
])
def test_refusals_are_http_200_with_status_500_naming_the_problem(relay, db, path, data, message):
    answer = requests.post(f"{relay.url}{path}", data=data)
    assert answer.status_code == 200
    assert answer.json()["status"] == 500 and message in answer.json()["msg"]
    assert spooled(db) == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"ezkey": "k"}', b'{"data": []}',
                                  b'{"ezkey": "k", "data": [{"stat": "ok", "count": 1}, {"stat": ""}]}'])
def test_a_bad_json_batch_is_refused_whole(relay, db, body):
    answer = requests.post(f"{relay.url}/ez", data=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 200 and answer.json()["status"] == 500
    assert spooled(db) == []


def test_a_key_is_never_echoed_in_a_refusal(relay):
    answer = requests.post(f"{relay.url}/ez", data={"ezkey": "secret-key-xyz", "stat": "", "count": "1"})
    assert "secret-key-xyz" not in answer.text


def test_an_oversized_body_is_refused_without_reading_it(db):
    with running_relay(db, max_body=1000) as relay:
        answer = requests.post(f"{relay.url}/ez", data=b"x" * 5000,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert answer.json() == {"status": 500, "msg": "request body too large (limit 1000 bytes)"}
        assert answer.headers["Connection"] == "close"


def test_a_slow_client_cannot_hold_a_worker(db):
    with running_relay(db, request_timeout=0.5) as relay:
        host, port = relay.server.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as slow:
            slow.sendall(b"POST /ez HTTP/1.1\r\nHost: x\r\n")  # ...and never the rest
            started = time.monotonic()
            assert slow.recv(1024) == b""  # the relay closed it
            assert time.monotonic() - started < 8
        assert requests.get(f"{relay.url}/").status_code == 200  # and still serves others


def test_connections_past_the_limit_are_turned_away_at_once(db):
    with running_relay(db, max_connections=2) as relay:
        host, port = relay.server.server_address[:2]
        held = [socket.create_connection((host, port)) for _ in range(2)]
        try:
            time.sleep(0.2)
            with socket.create_connection((host, port), timeout=5) as third:
                assert third.recv(1024).startswith(b"HTTP/1.1 503")
        finally:
            for conn in held:
                conn.close()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{relay.url}/", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert relay.stats.busy >= 1


def test_concurrent_clients_and_a_draining_shipper_deliver_everything_with_its_original_t(db, receiver):
    clients, each = 16, 40
    with running_relay(db) as relay, Store(db) as store, \
            Shipper(store, make_config(db, receiver, batch_size=100)) as shipper:
        ship = threading.Thread(target=shipper.run)
        ship.start()

        def client(n):
            with requests.Session() as session:
                for i in range(each):
                    answer = session.post(f"{relay.url}/ez", data={"ezkey": TEST_EZKEY, "stat": f"c{n}",
                                                                   "count": "1", "t": T0 + i})
                    assert answer.status_code == 204

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 30
        while len(receiver.accepted) < clients * each and time.monotonic() < deadline:
            time.sleep(0.05)
        shipper.stop()
        ship.join(10)
    assert sorted((a["stat"], a["t"]) for a in receiver.accepted) == sorted(
        (f"c{n}", T0 + i) for n in range(clients) for i in range(each))
    assert relay.writer.commits < clients * each  # requests shared commits


def test_statsd_counters_gauges_and_timers_become_records_and_bad_lines_are_counted(db):
    with running_relay(db, statsd="127.0.0.1:0", statsd_prefix="app.") as relay:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"hits:3|c\nsampled:1|c|@0.1\nload:0.5|g\nlatency:12|ms\nsize:7|h\n"
                       b"garbage\nbad:x|c\nweird:1|x\n:1|c", relay.statsd_address)
        deadline = time.monotonic() + 10
        while len(spooled(db)) < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        while relay.stats.statsd_invalid < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    got = {(r.stat, ("count", "value")[r.kind], r.number) for r in spooled(db)}
    assert got == {("app.hits", "count", 3), ("app.sampled", "count", 10.0), ("app.load", "value", 0.5),
                   ("app.latency", "value", 12), ("app.size", "value", 7)}
    assert relay.stats.statsd_invalid == 4
    assert relay.stats.appended["statsd"] == 5  # /metrics: spool_appended_total{source="statsd"}


def test_healthz_and_metrics(relay, db):
    requests.post(f"{relay.url}/ez", data={"ezkey": "k", "stat": "s", "count": "1", "t": T0})
    health = requests.get(f"{relay.url}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["pending"] == 1
    metrics = requests.get(f"{relay.url}/metrics").text
    assert 'spool_records{state="pending"} 1.0' in metrics
    assert 'spool_appended_total{source="http"} 1.0' in metrics
    assert "spool_oldest_pending_age_seconds" in metrics
    assert 'spool_dropped_total{reason="dropped_oldest"} 0.0' in metrics


def test_a_non_loopback_address_needs_allow_remote(db):
    with pytest.raises(ConfigError, match="not a loopback address"), Store(db) as store:
        Relay(RelaySettings(listen="0.0.0.0:0"), store)


def test_run_with_the_relay_takes_stats_and_ships_them(db, receiver, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'endpoint = "{receiver.url}"\n[relay]\nenabled = true\n'
                      f'listen = "127.0.0.1:{port}"\n')
    agent = spawn_cli(db, "--config", str(config), "run", env=cli_env(db, SPOOL_EZKEY=TEST_EZKEY))
    try:
        wait_for_line(agent, "relay listening")
        body = {"ezkey": TEST_EZKEY, "data": [{"stat": "via relay", "value": 1.5, "t": T0}]}
        assert requests.post(f"http://127.0.0.1:{port}/ez", json=body).json()["multiple"] == 1
        wait_for(lambda: receiver.accepted)
    finally:
        stderr = stop_agent(agent)
    assert [(a["stat"], a["number"], a["t"]) for a in receiver.accepted] == [("via relay", 1.5, T0)]
    assert json.dumps(TEST_EZKEY) not in stderr


def test_healthz_says_degraded_when_records_wait_and_nothing_was_delivered_for_a_while(db):
    now = [1_800_000_000.0]
    metrics = Metrics(Store(db), unhealthy_after=900, clock=lambda: now[0])
    relay = Relay(RelaySettings(enabled=True, listen="127.0.0.1:0"), Store(db), health=metrics.health).start()
    try:
        assert requests.get(f"{relay.url}/healthz").status_code == 200  # nothing waits: healthy
        requests.post(f"{relay.url}/ez", data={"ezkey": "k", "stat": "s", "count": "1", "t": T0})
        now[0] += 899
        assert requests.get(f"{relay.url}/healthz").status_code == 200
        now[0] += 2
        health = requests.get(f"{relay.url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert "nothing delivered for 901 s" in health.json()["problems"][0]
        with Store(db) as store:  # a delivery (as the shipper records it with its acknowledgement)
            store.set_meta(last_success_at=now[0])
        assert requests.get(f"{relay.url}/healthz").json()["status"] == "ok"
    finally:
        relay.stop()
        relay.writer.store.close()
        metrics.store.close()


def test_the_relays_threads_leave_sigterm_and_sigint_to_the_main_thread(db):
    # Python handles signals in the main thread only: one taken by a relay thread left `spool run` asleep.
    def blocked(native_id: int) -> int | None:
        try:
            with open(f"/proc/self/task/{native_id}/status") as status:
                return int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
        except FileNotFoundError:  # a connection's thread that ended since it was listed takes no signal
            return None

    stop_signals = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    with running_relay(db, statsd="127.0.0.1:0") as relay, \
            socket.create_connection(relay.server.server_address[:2]) as held:  # a connection's own thread
        held.sendall(b"GET /ez")
        wait_for(lambda: any("process_request_thread" in t.name for t in threading.enumerate()))
        threads = [t for t in threading.enumerate()
                   if t.name.startswith(("spool-relay", "spool-statsd")) or "process_request_thread" in t.name]
        assert {t.name for t in threads} >= {"spool-relay", "spool-relay-writer", "spool-statsd"}
        masks = {thread.name: blocked(thread.native_id) for thread in threads}
        assert all(masks[name] is not None for name in ("spool-relay", "spool-relay-writer", "spool-statsd"))
        assert all(mask & stop_signals == stop_signals for mask in masks.values() if mask is not None), masks
    assert blocked(threading.get_native_id()) & stop_signals == 0  # the main thread still takes them


def test_a_relay_over_a_damaged_spool_answers_503_never_2xx_and_says_what_to_do(db):
    with Store(db) as store:
        store.append([make_record(stat="before", count=1, t=T0)])
    damage_spool(db, "records")  # found by the append's own statements, as SQLite reads the pages on their path
    with running_relay(db) as relay:
        single = requests.post(f"{relay.url}/ez", data={"ezkey": "k", "stat": "s", "count": "1"})
        batch = requests.post(f"{relay.url}/ez", json={"ezkey": "k", "data": [{"stat": "s", "count": 1}]})
    for answer in (single, batch):
        assert answer.status_code == 503, answer.text
        assert "not a usable spool database" in answer.text and "`spool run`, which moves it aside" in answer.text

def test_a_relay_in_front_of_a_full_spool_answers_503_never_204_and_healthz_says_failing(db):
    form = {"ezkey": "k", "count": "1", "t": T0}
    with running_relay(db, spool={"max_pending": 1, "when_full": "reject_new"}) as relay:
        assert requests.post(f"{relay.url}/ez", data={**form, "stat": "first"}).status_code == 204
        refused = requests.post(f"{relay.url}/ez", data={**form, "stat": "second"})
        assert refused.status_code == 503 and "spool full" in refused.text
        batch = requests.post(f"{relay.url}/ez", json={"ezkey": "k", "data": [{"stat": "third", "count": 1}]})
        assert batch.status_code == 503
        health = requests.get(f"{relay.url}/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert "spool full" in health.json()["error"]
        assert [r.stat for r in spooled(db)] == ["first"]  # what was answered 503 is not there
        with Store(db) as store:  # the shipper delivers what waited: room again
            lease = store.lease(10, now=T0, keyed_only=False)
            store.ack([item.id for item in lease.items], now=T0, lease=lease.id)
        assert requests.post(f"{relay.url}/ez", data={**form, "stat": "fourth"}).status_code == 204
        assert requests.get(f"{relay.url}/healthz").json()["status"] == "ok"
