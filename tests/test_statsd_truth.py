"""StatsD as operators need it: drops named (stat, line, sender), deltas as Etsy's statsd takes them, both loopbacks
of `localhost`, a drop list, Telegraf's tags.

Real UDP sockets to a real listener: a `spool relay` subprocess where the log is what is tested, else the relay
in this process on 127.0.0.1, port 0. The rate limit of the drop log is tested with an injected clock.
"""

from __future__ import annotations

import logging
import socket

import pytest
import requests

from spool.relay import DropLog, StatsdReader
from spool.store import Store

from .helpers import UNPACED, cli_env, free_ports, running_relay, spawn_cli, stop_agent, wait_for, wait_for_line

SECRET = "sekr1t-ezkey-value-0123"


def spooled(db) -> list[tuple]:
    if not db.exists():
        return []
    with Store(db) as store:
        return [(r.stat, ("count", "value")[r.kind], r.number) for _, _, r in store.records()]


@pytest.fixture
def relay_process(db, tmp_path):
    """A `spool relay` subprocess with StatsD on 127.0.0.1; yields (process, statsd port); stopped at the end."""
    http, udp = free_ports(socket.SOCK_STREAM, socket.SOCK_DGRAM)
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + f'[relay]\nlisten = "127.0.0.1:{http}"\nstatsd = "127.0.0.1:{udp}"\n')
    process = spawn_cli(db, "--config", str(config), "relay", env=cli_env(db))
    wait_for_line(process, "relay listening")
    outcome: dict[str, str] = {}
    yield process, udp, outcome
    if process.poll() is None:
        outcome["stderr"] = stop_agent(process)


def send_from(port: int, *packets: bytes, sender_port: int = 0) -> int:
    """Send packets from one UDP socket; return the sender's port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.bind(("127.0.0.1", sender_port))
        for packet in packets:
            client.sendto(packet, ("127.0.0.1", port))
        return client.getsockname()[1]


def test_a_dropped_line_is_logged_with_its_stat_the_line_cut_short_and_the_sender(relay_process, db):
    process, port, _ = relay_process
    long_line = b"checkout.latency:" + b"9" * 300 + b"|zz"
    sender = send_from(port, b"orders.placed:1|q", long_line, f"pay.ezkey={SECRET}:1|c|x".encode())
    send_from(port, b"ok.marker:1|c")  # a good line after them: once it is spooled, the bad ones were read
    wait_for(lambda: spooled(db) == [("ok.marker", "count", 1)])
    stderr = stop_agent(process)
    drops = [line for line in stderr.splitlines() if "StatsD line" in line]
    assert len(drops) == 3, stderr
    first, second, third = drops
    assert f"from 127.0.0.1:{sender}" in first
    assert "stat 'orders.placed'" in first and "'orders.placed:1|q'" in first
    assert "unknown metric type 'q'" in first
    assert "stat 'checkout.latency'" in second
    assert "9" * 60 in second and "9" * 100 not in second and "(320 characters)" in second  # cut, its length told
    assert SECRET not in stderr and SECRET[:8] not in stderr  # a key-looking field is redacted
    assert "ezkey=***" in third
    assert "lines ignored as invalid" not in stderr  # no anonymous summary


def test_a_culprit_is_named_once_a_minute_not_once_a_line(relay_process, db):
    process, port, _ = relay_process
    send_from(port, *[b"orders.placed:1|q"] * 5)
    send_from(port, b"orders.placed:1|q")  # another socket, the same host and stat: the same culprit
    send_from(port, b"refunds:1|q")  # another stat: another culprit
    send_from(port, b"ok.marker:1|c")
    wait_for(lambda: spooled(db) == [("ok.marker", "count", 1)])
    stderr = stop_agent(process)
    drops = [line for line in stderr.splitlines() if "StatsD line" in line]
    assert [("'orders.placed'" in line, "'refunds'" in line) for line in drops] == [(True, False), (False, True)]


def test_the_drop_log_says_how_many_lines_it_held_back_when_the_culprits_minute_is_over(caplog):
    now = [1000.0]
    drops = DropLog(logging.getLogger("spool.test.drops"), monotonic=lambda: now[0])
    caplog.set_level(logging.INFO, logger="spool.test.drops")
    for _ in range(4):
        drops.dropped("invalid", "unknown metric type 'q'", "a", "a:1|q", ("10.0.0.7", 4000))
    drops.dropped("invalid", "unknown metric type 'q'", "a", "a:1|q", ("10.0.0.8", 4000))  # another host
    now[0] += 59
    drops.tick()
    assert len(caplog.records) == 2  # one line per culprit so far
    now[0] += 2
    drops.tick()
    held = [r.getMessage() for r in caplog.records[2:]]
    assert held == ["StatsD: 3 more lines from 10.0.0.7 dropped in the last minute, stat 'a': unknown metric type "
                    "'q'"]
    drops.dropped("invalid", "unknown metric type 'q'", "a", "a:1|q", ("10.0.0.7", 4001))  # a new minute
    assert "from 10.0.0.7:4001" in caplog.records[-1].getMessage()


def test_the_drop_log_is_bounded_whatever_the_number_of_culprits(caplog):
    now = [0.0]
    drops = DropLog(logging.getLogger("spool.test.flood"), monotonic=lambda: now[0], max_lines=5)
    caplog.set_level(logging.INFO, logger="spool.test.flood")
    for i in range(1000):
        drops.dropped("invalid", "bad", f"stat{i}", f"stat{i}:1|q", ("10.0.0.7", 4000))
    assert len(caplog.records) == 5
    now[0] += 61
    drops.tick()
    assert caplog.records[-1].getMessage() == ("StatsD: 995 more dropped lines not logged in the last minute (at "
                                               "most 5 lines a minute); spool_statsd_* in /metrics counts them all")
    assert len(drops.culprits) <= drops.max_culprits


# -- delta gauges as Etsy's statsd takes them ---------------------------------------------------------------


def test_a_delta_gauge_with_no_earlier_value_starts_from_0(db):
    with running_relay(db, statsd="127.0.0.1:0") as relay, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"up:+3|g", relay.statsd_address)
        client.sendto(b"down:-2|g", relay.statsd_address)
        client.sendto(b"up:+1|g", relay.statsd_address)
        wait_for(lambda: len(spooled(db)) == 3)
        text = requests.get(f"{relay.url}/metrics", timeout=10).text
    assert spooled(db) == [("up", "value", 3), ("down", "value", -2), ("up", "value", 4)]
    assert "delta_without_gauge" not in text


def test_a_packet_of_deltas_only_records_the_sum_from_0():
    reader = StatsdReader()
    records = reader.read(b"g:+5|g\ng:-1|g", 1_800_000_000)
    assert [(r.stat, r.number) for r in records] == [("g", 4)]
    assert not +reader.counts  # nothing dropped or invalid


# -- localhost: both loopbacks ---------------------------------------------------------------------------


def test_localhost_is_heard_on_127_0_0_1_and_on_the_ipv6_loopback(db):
    with running_relay(db, statsd="localhost:0") as relay:
        port = relay.statsd_address[1]
        assert sorted(relay.statsd_addresses) == [("127.0.0.1", port), ("::1", port)]
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as v6, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as v4:
            v6.sendto(b"node.client:1|c", ("::1", port))  # Node 17+ resolves localhost to ::1
            v4.sendto(b"python.client:1|c", ("127.0.0.1", port))
            wait_for(lambda: len(spooled(db)) == 2)
    assert sorted(spooled(db)) == [("node.client", "count", 1), ("python.client", "count", 1)]


def test_statsd_true_means_localhost_on_both_loopbacks():
    from spool.config import load

    config = load(env={"SPOOL_RELAY_STATSD": "true", "HOME": "/nonexistent"})
    assert config.relay.statsd == "localhost:8125"


def test_without_an_ipv6_loopback_the_listener_goes_on_with_127_0_0_1_and_says_so_once(db, tmp_path):
    import shutil
    import subprocess
    import sys

    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode:
        pytest.skip("no network namespace can be made here (unshare -rn)")
    config = tmp_path / "spool.toml"
    config.write_text(UNPACED + '[relay]\nlisten = "127.0.0.1:8080"\nstatsd = "localhost:8125"\n')
    # A network namespace of its own whose loopback has no ::1 (IPv6 disabled on it), as on some boxes.
    script = ("ip link set lo up && echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6 && "
              f"exec {sys.executable} -m spool --config {config} relay")
    process = subprocess.Popen(["unshare", "-rn", "sh", "-c", script], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=cli_env(db))
    try:
        lines = wait_for_line(process, "relay listening")
    finally:
        rest = stop_agent(process)
    said = [line for line in [*lines, *rest.splitlines()] if "::1" in line]
    assert len(said) == 1 and "listening on 127.0.0.1:8125 only" in said[0], [*lines, rest]
    assert "StatsD on udp 127.0.0.1:8125\n" in lines[-1]


# -- what is dropped on purpose, and Telegraf's tags -------------------------------------------------------


def test_dogstatsd_client_telemetry_is_dropped_by_default_and_counted(db):
    with running_relay(db, statsd="127.0.0.1:0") as relay, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"datadog.dogstatsd.client.metrics:11|c|#client:py,client_version:0.47.0\n"
                      b"datadog.dogstatsd.client.bytes_sent:900|c|#client:py", relay.statsd_address)
        client.sendto(b"app.hits:1|c", relay.statsd_address)
        wait_for(lambda: len(spooled(db)) == 1)
        text = requests.get(f"{relay.url}/metrics", timeout=10).text
    assert spooled(db) == [("app.hits", "count", 1)]
    assert 'spool_statsd_dropped_total{reason="filtered"} 2.0' in text


def test_the_drop_list_is_globs_from_the_config_and_can_be_emptied(db, tmp_path):
    from spool.config import load

    config = tmp_path / "spool.toml"
    config.write_text('[relay]\nstatsd_drop = ["debug.*", "*.tmp"]\n')
    assert load(config, env={}).relay.statsd_drop == ("debug.*", "*.tmp")
    assert load(env={"SPOOL_RELAY_STATSD_DROP": "a.*, b.*"}).relay.statsd_drop == ("a.*", "b.*")
    config.write_text("[relay]\nstatsd_drop = []\n")
    assert load(config, env={}).relay.statsd_drop == ()
    config.write_text('[relay]\nstatsd_drop = "debug.*"\n')
    with pytest.raises(Exception, match=r"relay.statsd_drop must be a list of globs"):
        load(config, env={})
    reader = StatsdReader(drop=("debug.*",))
    assert [r.stat for r in reader.read(b"debug.x:1|c\ndatadog.dogstatsd.client.metrics:1|c\nlive:1|c", 0)] == [
        "datadog.dogstatsd.client.metrics", "live"]
    assert reader.counts["filtered"] == 1


@pytest.mark.parametrize(("line", "stat"), [
    (b"requests,env=prod,region=eu:1|c", "requests env=prod region=eu"),  # Telegraf's tags in the name
    (b"requests,region=eu:1|c|#canary,env:prod", "requests canary env=prod region=eu"),  # with DogStatsD's
    (b"requests,env=prod:1|c|#env:prod", "requests env=prod"),  # one tag given both ways is one tag
    (b"a,b:1|c", "a,b"),  # a comma without tags is part of the name
])
def test_telegraf_tags_are_folded_into_the_name_as_dogstatsd_tags_are(line, stat):
    reader = StatsdReader()
    assert [r.stat for r in reader.read(line, 1_800_000_000)] == [stat]


def test_telegraf_tags_are_dropped_like_dogstatsd_tags_when_asked():
    reader = StatsdReader(tags="drop", drop=("debug.*",))
    records = reader.read(b"requests,env=prod:1|c\ndebug.x,env=prod:1|c", 1_800_000_000)
    assert [r.stat for r in records] == ["requests"]
    assert reader.counts["tags_dropped"] == 1 and reader.counts["filtered"] == 1
