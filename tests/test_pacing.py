"""Adaptive pacing: the request rate starts gently, is cut on overload and grows back, never above the ceiling;
a backlog's first requests are spread by its size at start-up and whenever the link comes back.

The law is driven by a fake clock, so every rate is exact; the shipper runs against a real receiver."""

from __future__ import annotations

import itertools
import json
import random
import re
import threading

import pytest

from spool import Spool
from spool.errors import TransientError
from spool.metrics import Metrics
from spool.ship import AdaptivePace, Shipper
from spool.stathat import StatHatClient, classify_response
from spool.store import Store

from .helpers import T0, TEST_EZKEY, cli_env, make_config, run_cli, spawn_cli, stop_agent, wait_for


class FakeClock:
    """Monotonic time that only sleeps move (`sleep` records each wait)."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def pace(ceiling: float = 20.0, seed: int = 1) -> tuple[AdaptivePace, FakeClock]:
    clock = FakeClock(0.0)
    return AdaptivePace(ceiling, clock, random.Random(seed)), clock


def clean_answers(p: AdaptivePace, clock: FakeClock, n: int, every: float = 0.1) -> list[float]:
    """Send and have answered cleanly n requests, `every` seconds apart; the rate after each answer."""
    rates = []
    for _ in range(n):
        p.sent()
        clock.now += every
        p.answered()
        rates.append(round(p.rate, 6))
    return rates


def backlog(db, n: int) -> None:
    with Spool(db) as sp:
        sp.add_many({"stat": f"s{i % 50}", "count": 1, "t": T0 + i} for i in range(n))


# -- the law, exactly -------------------------------------------------------------------------------------


def test_the_rate_starts_gently_and_doubles_with_every_clean_answer_up_to_max_requests_per_second():
    p, clock = pace(ceiling=20.0)
    assert (p.rate, p.why) == (2.0, "starting gently")
    assert clean_answers(p, clock, 6) == [4.0, 8.0, 16.0, 20.0, 20.0, 20.0]
    assert p.why == "at max_requests_per_second"


def test_a_ceiling_below_the_gentle_start_is_where_the_rate_starts_and_it_is_never_passed():
    p, clock = pace(ceiling=0.5)
    assert p.rate == 0.5
    assert clean_answers(p, clock, 3) == [0.5, 0.5, 0.5]
    p.sent()
    clock.now += 0.1
    p.overloaded("503", sent_at=clock.now - 0.1)
    assert p.rate == 0.1875  # half of what the receiver took over 4 intervals (3 answers in 8 s: 0.375 req/s)
    clock.now += 100
    assert clean_answers(p, clock, 3, every=5.0) == [0.5, 0.5, 0.5]  # back, up to the ceiling only


def test_a_503_cuts_the_rate_to_half_of_what_the_receiver_took_and_it_grows_back_along_the_cubic_curve():
    p, clock = pace()
    assert clean_answers(p, clock, 4) == [4.0, 8.0, 16.0, 20.0]  # answered at 0.1 ... 0.4 s
    p.sent()
    clock.now += 0.1
    p.overloaded("503", sent_at=0.4)
    # Paced at 20 req/s, but the receiver took 4 answers in the last 2 s: 2 req/s. Half of that.
    assert (p.rate, p.why) == (1.0, "503s from the receiver")
    rates = []
    for since_cut in (1.0, 2.0, 3.0, 4.0):  # back at 2 req/s after cbrt(2 x 0.5 / 0.4) = 1.357 s, then faster
        clock.now = 0.5 + since_cut
        p.answered()
        rates.append(round(p.rate, 6))
    assert rates == [1.981768, 2.106236, 3.773402, 9.383266]
    assert p.why == "growing while answers are clean"
    clock.now = 6.5
    p.answered()
    assert p.rate == 20.0 and p.why == "at max_requests_per_second"  # the curve goes on; the ceiling holds


def test_a_clean_answer_at_most_triples_the_rate_however_long_ago_the_cut_was():
    p, clock = pace()
    p.sent()
    clock.now += 0.1
    p.overloaded("503", sent_at=0.0)
    assert p.rate == 1.0  # nothing taken yet: half the rate itself
    clock.now = 3600.0  # the curve is far above the ceiling by now
    assert [p.answered() or round(p.rate, 6) for _ in range(4)] == [3.0, 9.0, 20.0, 20.0]


def test_one_overload_met_by_every_request_in_flight_cuts_once():
    p, clock = pace()
    clean_answers(p, clock, 4)
    sent = [clock.now] * 3  # three requests in flight, all sent before the cut
    for _ in sent:
        p.sent()
    clock.now += 0.1
    for at in sent:
        p.overloaded("503", sent_at=at)
    assert p.rate == 1.0
    clock.now += 5.0  # a request sent after the cut, and refused: a new event, a new cut
    p.sent()
    p.overloaded("503", sent_at=clock.now)
    assert p.rate == 0.5  # nothing taken in the last 4 intervals (4 s): half the rate itself


@pytest.mark.parametrize("kind, why", [("429", "429s from the receiver"), ("timeout", "answers timing out")])
def test_429s_and_timeouts_cut_as_503s_do_and_say_so(kind, why):
    p, clock = pace()
    clean_answers(p, clock, 4)
    p.sent()
    clock.now += 0.1
    p.overloaded(kind, sent_at=0.4)
    assert (p.rate, p.why) == (1.0, why)


def test_a_retry_after_holds_the_next_request_that_long_whatever_the_rate():
    p, clock = pace()
    clean_answers(p, clock, 4)
    p.sent()
    clock.now += 0.1
    p.overloaded("429", sent_at=0.4, retry_after=30.0)
    assert p.ready_at() == 0.5 + 30.0
    assert p.holding() and p.why == "Retry-After: the receiver asked for a pause of 30 s"
    clock.now = 30.5
    assert not p.holding()


def test_cuts_never_take_the_rate_below_one_request_every_ten_seconds():
    p, clock = pace()
    rates = []
    for _ in range(6):
        p.sent()
        clock.now += 20.0
        p.overloaded("503", sent_at=clock.now - 20.0)
        rates.append(p.rate)
    assert rates == [1.0, 0.5, 0.25, 0.125, 0.1, 0.1]


def test_after_a_cut_the_next_request_waits_one_interval_give_or_take_half_of_one_at_random():
    p, clock = pace(seed=5)
    clean_answers(p, clock, 4)
    p.sent()
    clock.now += 0.1
    p.overloaded("503", sent_at=0.4)
    assert p.rate == 1.0
    assert p.ready_at() == pytest.approx(0.5 + random.Random(5).uniform(0.5, 1.5) / 1.0)


def test_agents_refused_together_do_not_come_back_together():
    """Lockstep is what a fleet must not do: the same history, other seeds, other instants."""
    again = []
    for seed in range(5):
        p, clock = pace(seed=seed)
        for _ in range(3):  # three 503s in a row, nothing ever taken
            clock.now = max(clock.now, p.ready_at())
            p.sent()
            p.overloaded("503", sent_at=clock.now)
        again.append(round(p.ready_at(), 6))
    assert len(set(again)) == 5, again


def test_a_restart_starts_gently_again_and_forgets_what_was_taken():
    p, clock = pace()
    clean_answers(p, clock, 6)
    p.restart()
    assert (p.rate, p.why) == (2.0, "starting gently again: the link came back")
    assert clean_answers(p, clock, 2) == [4.0, 8.0]


def test_only_answers_that_say_the_receiver_is_overloaded_slow_the_pace():
    def overload(status: int) -> str | None:
        with pytest.raises(TransientError) as caught:
            classify_response(status, "Back-end server is at capacity" if status == 503 else "")
        return caught.value.overload

    assert [overload(s) for s in (503, 429, 504, 500, 502, 408)] == ["503", "429", "timeout", None, None, None]


# -- the shipper ------------------------------------------------------------------------------------------


class TimedClient(StatHatClient):
    """The real client, noting when (on the shipper's clock) each batch went."""

    def __init__(self, *args, clock, sent, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock, self._sent = clock, sent

    def _send_ez_body(self, ezkey, body, count):  # every EZ batch, built in Python or by SQLite
        self._sent.append(self._clock())
        return super()._send_ez_body(ezkey, body, count)


def test_an_adaptive_drain_never_sends_faster_than_max_requests_per_second(db, receiver):
    backlog(db, 3000)
    clock, sent = FakeClock(), []
    config = make_config(db, receiver, batch_size=50, max_in_flight=8, max_requests_per_second=5)
    factory = lambda: TimedClient(receiver.url, timeout=2.0, clock=clock, sent=sent)  # noqa: E731
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock,
                                     client_factory=factory) as shipper:
        assert shipper.drain(max_time=3600).done
        assert (shipper.pace.rate, shipper.pace.why) == (5.0, "at max_requests_per_second")
    assert len(sent) == 60
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert min(gaps) >= 1 / 5 - 1e-9
    assert gaps[:3] == pytest.approx([1 / 4, 1 / 5, 1 / 5])  # from 2 req/s, doubled with each answer


def test_503s_slow_the_drain_and_metrics_say_how_fast_and_why(db, receiver):
    backlog(db, 500)
    receiver.pass_next(4)
    receiver.fail_next(3)  # a burst of 503s met by the requests in flight
    clock = FakeClock()
    config = make_config(db, receiver, batch_size=50, max_in_flight=1, max_requests_per_second=20)
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock) as shipper:
        assert shipper.drain(max_time=3600).done
        metrics = Metrics(store, shipper=shipper.snapshot)
        page = metrics.render().decode()
        snapshot = shipper.snapshot()
    assert receiver.requests == 13
    assert snapshot["pacing"] in ("growing while answers are clean", "at max_requests_per_second")
    assert f"spool_ship_paced_rate {snapshot['paced_rate']}" in page
    assert f'spool_ship_pacing{{reason="{snapshot["pacing"]}"}} 1.0' in page


def test_503s_met_by_adaptive_pacing_wait_the_pace_not_the_back_off(db, receiver):
    backlog(db, 100)
    receiver.fail_next(3)
    clock = FakeClock()
    config = make_config(db, receiver, batch_size=50, max_in_flight=1, max_requests_per_second=20,
                         backoff_initial=60.0, backoff_max=600.0)
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock) as shipper:
        shipper.rng.seed(11)
        assert shipper.drain(max_time=3600).done
    # Each 503 halves the pace (nothing taken yet): the next request waits an interval at it, give or take half
    # of one at random, never a back-off step (60 s here).
    draws = random.Random(11)
    assert clock.waits[:3] == pytest.approx([draws.uniform(0.5, 1.5) / rate for rate in (1.0, 0.5, 0.25)]), clock.waits


@pytest.mark.parametrize("records, window", [(1000, 9 * 0.3), (30_000, 10.0)])
def test_when_the_link_comes_back_the_next_requests_are_spread_by_the_backlog_and_start_gently(
        db, receiver, records, window):
    """Four resets in a row (the link is down), then answers: a wait of a random part of 0.3 s per request
    left (reconnect_jitter, 10 s, at most), and the rate starts again at 2 req/s, doubling."""
    backlog(db, records)
    receiver.reset_next(4)
    clock = FakeClock()
    config = make_config(db, receiver, batch_size=100, max_in_flight=1, max_requests_per_second=20,
                         reconnect_jitter=10.0, backoff_initial=0.5, backoff_max=1.0)
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock) as shipper:
        shipper.rng.seed(3)
        assert shipper.drain(max_time=3600).done
    spread = random.Random(3).uniform(0, window)  # 0.64 s of 2.7, 2.38 s of 10: more than an interval
    assert clock.waits[4] == pytest.approx(spread)  # after the four back-off waits: the spread
    assert clock.waits[5:7] == pytest.approx([1 / 8, 1 / 16])  # then the gentle start again


def test_run_spreads_a_backlogs_first_requests_by_its_size_and_fixed_pacing_by_the_whole_jitter(db, receiver):
    backlog(db, 2000)  # 20 requests: a random part of 6 s
    waits = {}
    for pacing in ("adaptive", "fixed"):
        seen: list[float] = []
        config = make_config(db, receiver, batch_size=100, max_requests_per_second=1000, reconnect_jitter=10.0,
                             pacing=pacing)
        shutdown = threading.Event()
        with Store(db) as store, Shipper(store, config, shutdown=shutdown, sleep=seen.append) as shipper:
            shipper.rng.seed(7)
            thread = threading.Thread(target=shipper.run)
            thread.start()
            wait_for(lambda seen=seen: bool(seen))
            shipper.stop()
            thread.join(10)
        waits[pacing] = seen[0]
    assert waits == {"adaptive": pytest.approx(random.Random(7).uniform(0, 6.0)),
                     "fixed": pytest.approx(random.Random(7).uniform(0, 10.0))}


def drained_then_handed_over(db, receiver, records: int):
    """A backlog drained by a shipper at the default ceiling (20 req/s), and what it hands to its successor."""
    backlog(db, records)
    clock = FakeClock()
    config = make_config(db, receiver, batch_size=100, max_requests_per_second=20)
    with Store(db) as store, Shipper(store, config, sleep=clock.sleep, monotonic=clock) as first:
        assert first.drain(max_time=3600).done
        return first, first.handover(), config, clock


def test_a_reload_keeps_the_pace_learnt_under_the_new_ceiling(db, receiver):
    first, handover, config, clock = drained_then_handed_over(db, receiver, 1000)
    assert first.pace.rate == 20.0
    with Store(db) as store, Shipper(store, config.replace(max_requests_per_second=8), sleep=clock.sleep,
                                     monotonic=clock, handover=handover) as second:
        assert second.pace is first.pace
        assert (second.pace.rate, second.pace.ceiling) == (8.0, 8.0)


def test_status_shows_the_paced_rate_and_why_while_the_receiver_answers_503(db, receiver, tmp_path):
    backlog(db, 200)
    config = tmp_path / "spool.toml"
    config.write_text(f'[ship]\nendpoint = "{receiver.url}"\nreconnect_jitter = 0\nbatch_size = 10\n'
                      'backoff_max = "1s"\n')
    receiver.fail_next(10_000)
    env = cli_env(db, SPOOL_EZKEY=TEST_EZKEY)
    agent = spawn_cli(db, "--config", str(config), "run", env=env)
    try:
        def pacing() -> dict | None:
            return json.loads(run_cli(db, "--config", str(config), "status", "--json", env=env).stdout)["pacing"]

        wait_for(lambda: (pacing() or {}).get("why") == "503s from the receiver", timeout=30)
        text = run_cli(db, "--config", str(config), "status", env=env).stdout
    finally:
        stop_agent(agent)
    assert re.search(r"^pacing {7}[0-9.]+ req/s: 503s from the receiver \(at most 20\)$", text, re.M), text
    after = json.loads(run_cli(db, "--config", str(config), "status", "--json", env=env).stdout)
    assert after["pacing"] is None  # no shipper running: no pace to show


def test_status_shows_the_pace_of_the_shipper_running_now_even_after_a_reload_ends_pacing(db, receiver):
    _, handover, config, _ = drained_then_handed_over(db, receiver, 300)
    with Spool(db) as sp:
        assert sp.status()["pacing"] is None  # no shipper runs
    backlog(db, 300)
    unpaced = config.replace(max_requests_per_second=0)
    shutdown = threading.Event()
    with Store(db) as store, Shipper(store, unpaced, shutdown=shutdown, handover=handover) as second:
        thread = threading.Thread(target=second.run)
        thread.start()
        try:
            wait_for(lambda: len(receiver.accepted) == 600)
            with Spool(db) as sp:
                status = sp.status()
        finally:
            second.stop()
            thread.join(10)
    assert status["pacing"] == {"rate": 0.0, "why": "not paced (max_requests_per_second = 0)", "ceiling": 0.0}
    from spool.cli_ops import format_status

    assert "pacing       not paced (max_requests_per_second = 0)\n" in format_status(status) + "\n"


def test_status_says_the_first_request_waits_while_the_start_is_spread(db, receiver):
    backlog(db, 3000)  # 6 requests of 500: a random part of 1.8 s
    config = make_config(db, receiver, reconnect_jitter=10.0, max_requests_per_second=20)
    shutdown, waiting, release = threading.Event(), threading.Event(), threading.Event()

    def sleep(seconds: float) -> None:
        waiting.set()
        release.wait(10)

    with Store(db) as store, Shipper(store, config, shutdown=shutdown, sleep=sleep) as shipper:
        shipper.rng.seed(2)
        thread = threading.Thread(target=shipper.run)
        thread.start()
        try:
            assert waiting.wait(10)
            with Spool(db) as sp:
                during = sp.status()["pacing"]
            release.set()
            wait_for(lambda: len(receiver.accepted) == 3000)
        finally:
            release.set()
            shipper.stop()
            thread.join(10)
    jitter = random.Random(2).uniform(0, 1.8)
    assert during == {"rate": 2.0, "why": f"the first request waits {jitter:.1f} s (a random start: reconnect_jitter)",
                      "ceiling": 20.0}
