"""The link simulator itself: kept-alive connections, faults on one exchange, seeded schedules, windows."""

from __future__ import annotations

from collections import Counter
from contextlib import closing

import pytest

from spool.errors import TransientError
from spool.records import make_record
from spool.stathat import StatHatClient

from ..helpers import T0, TEST_EZKEY
from .faultproxy import FaultProxy, Schedule, Window


def batch(n: int, tag: str = "s") -> list:
    return [make_record(stat=f"{tag}{i}", count=1, t=T0 + i) for i in range(n)]


def test_a_kept_alive_connection_carries_many_exchanges_and_a_scripted_fault_hits_exactly_its_exchange(receiver):
    with FaultProxy(receiver) as proxy, closing(StatHatClient(proxy.url, timeout=2)) as client:
        proxy.next("pass", 2)
        proxy.next("lost", 1)  # the third exchange, on the connection the first two used
        outcomes = []
        for k in range(5):
            try:
                client.send_ez(TEST_EZKEY, batch(3, f"b{k}-"))
                outcomes.append("ok")
            except TransientError:
                outcomes.append("error")
    assert outcomes == ["ok", "ok", "error", "ok", "ok"]
    assert [(e.number, e.connection, e.mode) for e in proxy.exchanges] == [
        (1, 1, "pass"), (2, 1, "pass"), (3, 1, "lost"), (4, 2, "pass"), (5, 2, "pass")]
    assert len(receiver.batches) == 5  # the lost exchange's batch was taken: its answer is what got lost
    assert [e.may_duplicate(slower_than=10) for e in proxy.exchanges] == [False, False, True, False, False]


@pytest.mark.parametrize(("mode", "value", "taken"), [("reset", 0, False), ("stall", 0.2, False),
                                                      ("truncate", 9, True), ("truncate", -3, True), ("lost", 0, True)])
def test_each_fault_fails_the_exchange_and_reaches_the_receiver_only_when_it_says_so(receiver, mode, value, taken):
    with FaultProxy(receiver) as proxy, closing(StatHatClient(proxy.url, timeout=2)) as client:
        proxy.next(mode, 1, value)
        with pytest.raises(TransientError):
            client.send_ez(TEST_EZKEY, batch(2))
        client.send_ez(TEST_EZKEY, batch(2, "after"))  # the link goes on working after the fault
    assert len(receiver.batches) == (2 if taken else 1)
    assert proxy.exchanges[0].forwarded is taken and not proxy.exchanges[0].answered


def test_a_client_that_times_out_on_a_held_request_ends_the_hold_and_nothing_reaches_the_receiver(receiver):
    with FaultProxy(receiver) as proxy, closing(StatHatClient(proxy.url, timeout=0.3)) as client:
        proxy.next("halfopen")
        with pytest.raises(TransientError, match="within"):
            client.send_ez(TEST_EZKEY, batch(2))
        client.send_ez(TEST_EZKEY, batch(2))
    assert len(receiver.batches) == 1 and proxy.counts == {"halfopen": 1, "pass": 1}


def test_the_same_seed_chooses_the_same_faults_for_the_same_exchanges_whatever_the_order():
    link = {"latency": 0.01, "jitter": 0.02, "stall": 3.0,
            "faults": (("reset", 0.05), ("stall", 0.02), ("truncate", 0.03), ("lost", 0.04))}
    one, same, other = Schedule(seed=1, **link), Schedule(seed=1, **link), Schedule(seed=2, **link)
    choices = [one.choose(k) for k in range(1, 5001)]
    assert choices == [same.choose(k) for k in reversed(range(1, 5001))][::-1]
    assert choices != [other.choose(k) for k in range(1, 5001)]
    modes = Counter(mode for mode, _ in choices)
    assert set(modes) == {"latency", "reset", "stall", "truncate", "lost"}
    assert 150 < modes["reset"] < 350 and 50 < modes["stall"] < 150  # the stated probabilities, roughly
    assert all(0.01 <= value <= 0.03 for mode, value in choices if mode == "latency")
    assert all(value == 3.0 for mode, value in choices if mode == "stall")


def test_a_bad_day_places_its_windows_inside_the_day_from_the_seed_alone():
    day = dict(outages=3, spikes=2, outage=(1.0, 2.0), spike=(0.5, 1.0), spike_latency=(0.2, 0.4))
    schedule = Schedule.bad_day(7, 60.0, **day)
    assert schedule == Schedule.bad_day(7, 60.0, **day) != Schedule.bad_day(8, 60.0, **day)
    kinds = Counter(w.kind for w in schedule.windows)
    assert kinds == {"blackhole": 3, "latency": 2}
    assert all(0 <= w.start < w.end <= 60.0 for w in schedule.windows)
    assert all(0.2 <= w.value <= 0.4 for w in schedule.windows if w.kind == "latency")


def test_an_outage_window_holds_requests_silent_while_it_is_open_and_a_spike_adds_latency_after_it(receiver):
    now = [0.0]
    schedule = Schedule(windows=(Window(10, 20, "blackhole"), Window(20, 30, "latency", 0.05)))
    with FaultProxy(receiver, schedule, monotonic=lambda: now[0]) as proxy, \
            closing(StatHatClient(proxy.url, timeout=0.3)) as client:
        client.send_ez(TEST_EZKEY, batch(1, "before"))
        now[0] = 15.0
        with pytest.raises(TransientError):
            client.send_ez(TEST_EZKEY, batch(1, "during"))
        now[0] = 25.0
        client.send_ez(TEST_EZKEY, batch(1, "spike"))
        now[0] = 35.0
        client.send_ez(TEST_EZKEY, batch(1, "after"))
    assert [(e.mode, e.value) for e in proxy.exchanges] == [
        ("pass", 0.0), ("halfopen", 0.0), ("latency", 0.05), ("pass", 0.0)]
    assert [item["stat"] for item in receiver.accepted] == ["before0", "spike0", "after0"]


def test_heal_ends_every_fault_at_once(receiver):
    schedule = Schedule(faults=(("reset", 1.0),), windows=(Window(0, 1e9, "blackhole"),))
    with FaultProxy(receiver, schedule) as proxy, closing(StatHatClient(proxy.url, timeout=0.3)) as client:
        proxy.next("reset", 5)
        proxy.heal()
        for k in range(3):
            client.send_ez(TEST_EZKEY, batch(1, f"h{k}-"))
    assert proxy.counts == {"pass": 3}


def test_stopping_the_simulator_ends_an_exchange_that_waits_on_a_receiver_holding_its_answer(receiver):
    receiver.hold_after_accept_next(1, seconds=60)
    with FaultProxy(receiver) as proxy, closing(StatHatClient(proxy.url, timeout=0.3)) as client:
        with pytest.raises(TransientError):
            client.send_ez(TEST_EZKEY, batch(1))
        assert receiver.holding.wait(10)
    assert not [thread for thread in proxy._threads if thread.is_alive()]
    assert proxy.exchanges[0].forwarded and not proxy.exchanges[0].answered
