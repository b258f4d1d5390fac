"""StatsD as real clients speak it: the PyPI `statsd` client against a real listener on 127.0.0.1, port 0.

Each metric is sent and waited for before the next, so UDP's ordering never matters. The `statsd` client has
no distributions, histograms or DogStatsD tags: DogStatsClient adds them through the client's own code path
(prefix, sampling, socket), as the DogStatsD clients format them.
"""

from __future__ import annotations

import random
import socket

import pytest
import requests
import statsd

from spool.records import make_record
from spool.relay import StatsdReader
from spool.store import Store

from .helpers import T0, UNPACED, cli_env, running_relay, spawn_cli, stop_agent, wait_for, wait_for_line

WINDOW_START = 1_800_000_000  # a multiple of 60: a window of sets starts here


class DogStatsClient(statsd.StatsClient):
    """The statsd client with DogStatsD's distributions, histograms and tags (`|#env:prod`)."""

    def distribution(self, stat: str, value: float, rate: float = 1, tags: tuple[str, ...] = ()) -> None:
        self._send_stat(stat, f"{value}|d{self._tags(tags)}", rate)

    def histogram(self, stat: str, value: float, rate: float = 1, tags: tuple[str, ...] = ()) -> None:
        self._send_stat(stat, f"{value}|h{self._tags(tags)}", rate)

    def incr_tagged(self, stat: str, count: int = 1, rate: float = 1, tags: tuple[str, ...] = ()) -> None:
        self._send_stat(stat, f"{count}|c{self._tags(tags)}", rate)

    @staticmethod
    def _tags(tags: tuple[str, ...]) -> str:
        return f"|#{','.join(tags)}" if tags else ""


def spooled(db) -> list[tuple]:
    with Store(db) as store:
        return [(r.stat, ("count", "value")[r.kind], r.number) for _, _, r in store.records()]


def metrics(relay) -> str:
    return requests.get(f"{relay.url}/metrics", timeout=10).text


class Listener:
    """A relay with StatsD on, a client pointed at it, and a way to send one metric and wait for its outcome."""

    def __init__(self, relay, db):
        self.relay, self.db = relay, db
        host, port = relay.statsd_address
        self.client = DogStatsClient(host, port, prefix="app")

    def send(self, action, *, records: int = 0, **reasons: int) -> None:
        """Run `action(client)`; wait until the spool holds `records` more records and the counts reach `reasons`."""
        before = len(spooled(self.db))
        action(self.client)

        def arrived() -> bool:
            snapshot = self.relay.snapshot()
            counts = {"invalid": snapshot["statsd_invalid"], "tags_dropped": snapshot["statsd_tags_dropped"],
                      **snapshot["statsd_dropped"]}
            return len(spooled(self.db)) >= before + records and all(counts[r] >= n for r, n in reasons.items())

        wait_for(arrived)


@pytest.fixture
def listen(db):
    opened = []

    def start(**options) -> Listener:
        context = running_relay(db, statsd="127.0.0.1:0", **options)
        listener = Listener(context.__enter__(), db)
        opened.append((context, listener))
        return listener

    yield start
    for context, listener in reversed(opened):
        listener.client.close()
        context.__exit__(None, None, None)


def test_every_line_type_the_statsd_client_sends_becomes_the_right_stat(listen, db):
    listener = listen()
    send = listener.send
    send(lambda c: c.incr("hits", 3), records=1)
    send(lambda c: c.decr("hits"), records=1)
    state = random.getstate()
    try:  # the client samples with the global random: seed it so that this one call is sent
        random.seed(next(seed for seed in range(100) if random.Random(seed).random() <= 0.5))
        send(lambda c: c.incr("sampled", rate=0.5), records=1)  # sent as 1|c|@0.5: one of two, so 2
    finally:
        random.setstate(state)
    send(lambda c: c.gauge("temp", 70), records=1)
    send(lambda c: c.gauge("temp", 3, delta=True), records=1)  # +3|g: the gauge moved by 3
    send(lambda c: c.gauge("temp", -3, delta=True), records=1)  # -3|g
    send(lambda c: c.gauge("level", -5), records=1)  # sent as 0|g then -5|g in one packet: the gauge is -5
    send(lambda c: c.timing("latency", 12.5), records=1)  # 12.500000|ms
    send(lambda c: c.distribution("size", 7), records=1)
    send(lambda c: c.histogram("depth", 4), records=1)
    send(lambda c: c.incr_tagged("requests", 1, tags=("region:eu", "env:prod", "canary")), records=1)
    for member in ("alice", "bob", "alice"):
        send(lambda c, member=member: c.set("users", member))
    listener.relay.stop()  # a set's window is written when it ends, or at shutdown: now
    assert spooled(db) == [
        ("app.hits", "count", 3), ("app.hits", "count", -1), ("app.sampled", "count", 2.0),
        ("app.temp", "value", 70), ("app.temp", "value", 73), ("app.temp", "value", 70),
        ("app.level", "value", -5), ("app.latency", "value", 12.5), ("app.size", "value", 7),
        ("app.depth", "value", 4), ("app.requests canary env=prod region=eu", "count", 1),
        ("app.users", "value", 2),  # distinct members in the window
    ]
    assert listener.relay.snapshot()["statsd_invalid"] == 0


def test_a_restart_forgets_gauges_so_a_delta_then_starts_from_0(listen, db):
    first = listen()
    first.send(lambda c: c.gauge("temp", 70), records=1)
    first.send(lambda c: c.gauge("temp", 3, delta=True), records=1)
    first.relay.stop()
    again = listen()  # a new listener on the same spool: the gauge is forgotten
    again.send(lambda c: c.gauge("temp", -3, delta=True), records=1)
    assert spooled(db) == [("app.temp", "value", 70), ("app.temp", "value", 73), ("app.temp", "value", -3)]


def test_sets_are_refused_with_a_counted_reason_when_statsd_sets_is_0(listen, db):
    listener = listen(statsd_sets=0)
    listener.send(lambda c: c.set("users", "alice"), set_refused=1)
    listener.send(lambda c: c.incr("hits"), records=1)
    assert 'spool_statsd_dropped_total{reason="set_refused"} 1.0' in metrics(listener.relay)
    listener.relay.stop()
    assert spooled(db) == [("app.hits", "count", 1)]


def test_tags_are_dropped_and_counted_when_statsd_tags_is_drop(listen, db):
    listener = listen(statsd_tags="drop")
    listener.send(lambda c: c.incr_tagged("requests", 2, tags=("env:prod",)), records=1, tags_dropped=1)
    listener.send(lambda c: c.incr("requests", 1), records=1)
    assert spooled(db) == [("app.requests", "count", 2), ("app.requests", "count", 1)]
    text = metrics(listener.relay)
    assert "spool_statsd_tags_dropped_total 1.0" in text
    assert 'spool_statsd_dropped_total{reason="set_refused"} 0.0' in text  # every reason shows, from 0


def test_a_tag_with_a_tilde_is_invalid_not_a_multi_stat(listen, db):
    listener = listen()
    listener.send(lambda c: c.incr_tagged("requests", 1, tags=("path:~home",)), invalid=1)
    listener.send(lambda c: c.incr("requests"), records=1)
    assert spooled(db) == [("app.requests", "count", 1)]


def test_sets_count_distinct_members_per_window_aligned_to_the_clock():
    reader = StatsdReader(set_window=60)
    assert reader.read(b"users:alice|s\nusers:bob|s\nusers:alice|s", WINDOW_START + 5) == []
    assert reader.read(b"users:carol|s\nusers:alice|s", WINDOW_START + 59.5) == []
    assert reader.flush(WINDOW_START + 59.9) == []
    reader.read(b"users:dave|s", WINDOW_START + 61)  # the next window
    assert reader.flush(WINDOW_START + 60) == [make_record(stat="users", value=3, t=WINDOW_START)]
    assert reader.flush(WINDOW_START + 70, everything=True) == [make_record(stat="users", value=1,
                                                                            t=WINDOW_START + 60)]
    assert reader.members == 0 and reader.sets == {}


def test_a_sets_window_is_written_at_once_when_the_clock_is_stepped_back():
    reader = StatsdReader(set_window=60)
    reader.read(b"users:alice|s", WINDOW_START + 3600)
    assert reader.flush(WINDOW_START + 3630) == []
    assert reader.flush(WINDOW_START + 5) == [make_record(stat="users", value=1, t=WINDOW_START + 3600)]


def test_set_members_past_the_cap_are_dropped_and_counted():
    reader = StatsdReader(set_window=60, max_set_members=2)
    reader.read(b"a:1|s\na:2|s\na:2|s\nb:3|s\na:4|s", WINDOW_START)
    assert reader.counts["set_overflow"] == 2
    assert reader.flush(WINDOW_START, everything=True) == [make_record(stat="a", value=2, t=WINDOW_START)]


@pytest.mark.parametrize(("packet", "expected"), [
    (b"g:5|g\ng:+1|g\ng:-10|g", [("g", 1, -4)]),  # one gauge per packet: its last value
    (b"d:1:2:3|d", [("d", 1, 1), ("d", 1, 2), ("d", 1, 3)]),  # DogStatsD packs several values in a line
    (b"c:1|c|@0.5|#env:prod|c:abc123", [("c env=prod", 0, 2.0)]),  # any order; a container id is ignored
    (f"c:4|c|T{T0}".encode(), [("c", 0, 4)]),  # its own time: checked below
    (b"c:1:x|c", []),  # a line is taken whole or not at all
    (b"c:1|c|T17000000000000", []),  # a time in milliseconds is invalid
    (b"c:1|c|@2", []), (b"c:1|c|@0", []),  # a rate of 0 would divide by zero
    (b"c:1|q", []), (b"c:1|c|zz", []), (b":1|c", []), (b"c|c", []), (b"g:nan|g", []),
])
def test_statsd_lines(packet, expected):
    reader = StatsdReader(set_window=60)
    records = reader.read(packet, WINDOW_START)
    assert [(r.stat, int(r.kind), r.number) for r in records] == expected
    assert all(r.t == (T0 if b"|T" in packet else WINDOW_START) for r in records)
    assert reader.counts["invalid"] == (0 if expected else 1)
    assert reader.counts["tags_dropped"] == 0  # tags appended to the name are not dropped


def test_spool_relay_takes_its_statsd_settings_from_the_config_file(db, tmp_path):
    ports = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'[relay]\nlisten = "127.0.0.1:{ports[0]}"\nstatsd = "127.0.0.1:{ports[1]}"\n'
                      'statsd_tags = "drop"\nstatsd_sets = 0\n')
    relay = spawn_cli(db, "--config", str(config), "relay", env=cli_env(db))
    client = DogStatsClient("127.0.0.1", ports[1])
    try:
        wait_for_line(relay, "relay listening")
        client.set("users", "alice")
        client.incr_tagged("requests", 1, tags=("env:prod",))
        wait_for(lambda: len(spooled(db)) == 1)

        def counted() -> str:
            text = requests.get(f"http://127.0.0.1:{ports[0]}/metrics", timeout=10).text
            return text if 'reason="set_refused"} 1.0' in text else ""

        wait_for(counted)
        assert "spool_statsd_tags_dropped_total 1.0" in counted()
    finally:
        client.close()
        stop_agent(relay)
    assert spooled(db) == [("requests", "count", 1)]
