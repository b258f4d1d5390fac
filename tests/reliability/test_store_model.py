"""The store against a simple model (Hypothesis stateful testing), on a real SQLite file, reopened at random."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from spool.records import make_record
from spool.store import Store

from ..helpers import assert_counts_true

DEAD_OWNER = "another-boot:1:1"  # a process identity from a boot that is over: proven dead

T0 = 1_700_000_000


class StoreModel(RuleBasedStateMachine):
    """Model: each record id -> "pending" | "sent" | "dead"; live leases -> the ids they name."""

    def __init__(self):
        super().__init__()
        self.folder = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.store = Store(self.folder / "spool.db", synchronous="normal")
        self.state: dict[int, str] = {}
        self.sent_at: dict[int, float] = {}
        self.leases: dict[int, set[int]] = {}
        self.clock = 1000.0

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def leased(self) -> set[int]:
        return set().union(*self.leases.values()) if self.leases else set()

    def some_of(self, lease_id: int) -> st.SearchStrategy[list[int]]:
        """Some of the records a lease holds (none left when all of them became dead letters)."""
        held = sorted(self.leases[lease_id])
        return st.lists(st.sampled_from(held), unique=True) if held else st.just([])

    @rule(n=st.integers(min_value=1, max_value=20), keyed=st.booleans(), chunk=st.sampled_from([4, 20_000]))
    def append(self, n, keyed, chunk):
        """Append n records; with chunks of 4, staged (in chunks, then published) when n > 4."""
        before = {row[0] for row in self.store.conn.execute("SELECT id FROM records")}
        self.store.append([make_record(stat=f"s{i}", count=1, t=T0 + i, ezkey="k" if keyed else None)
                           for i in range(n)], chunk=chunk)
        for (record_id,) in self.store.conn.execute("SELECT id FROM records"):
            if record_id not in before:
                self.state[record_id] = "pending"

    @rule(limit=st.integers(min_value=1, max_value=15))
    def lease(self, limit):
        lease = self.store.lease(limit, now=self.clock, keyed_only=False)
        free = [i for i, s in self.state.items() if s == "pending" and i not in self.leased()]
        if lease is None:
            assert not free
            return
        ids = {item.id for item in lease.items}
        assert len(ids) == min(limit, len(free))
        assert ids <= set(free), "leased a record that was not free"
        self.leases[lease.id] = ids

    @precondition(lambda self: self.leases)
    @rule(data=st.data(), end=st.booleans())
    def ack(self, data, end):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        ids = data.draw(self.some_of(lease_id))
        self.clock += 1
        self.store.ack(ids, now=self.clock, lease=lease_id if end else None)
        for i in ids:  # a lease can still name a record acked and pruned meanwhile: the store ignores it
            if self.state.get(i) == "pending":
                self.state[i], self.sent_at[i] = "sent", self.clock
        if end:
            del self.leases[lease_id]

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def kill(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        ids = data.draw(self.some_of(lease_id))
        self.store.mark_dead(ids, reason="refused", http_status=200, body="{}", now=self.clock)
        for i in ids:
            if self.state.get(i) == "pending":
                self.state[i] = "dead"
        self.leases[lease_id] -= set(ids)  # dead letters leave their lease (requeued, they are leased anew)

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def end_lease(self, data):
        lease_id = data.draw(st.sampled_from(sorted(self.leases)))
        self.store.end_lease(lease_id)
        del self.leases[lease_id]

    @rule()
    def the_shipper_dies(self):
        """Every lease's owner dies (as if a shipper process had held them); they return to pending."""
        named = sum(1 for i in self.leased() if self.state.get(i) == "pending")
        self.store.conn.execute("UPDATE leases SET owner = ?", (DEAD_OWNER,))
        assert self.store.release_dead_leases() == named
        self.leases.clear()

    @rule(everything=st.booleans(), data=st.data())
    def requeue_dead(self, everything, data):
        dead = sorted(i for i, s in self.state.items() if s == "dead")
        ids = None if everything else data.draw(st.lists(st.sampled_from(dead), unique=True)) if dead else []
        n, missing, _ = self.store.requeue_dead(ids)
        chosen = dead if ids is None else ids
        assert (n, missing) == (len(chosen), ())
        for i in chosen:
            self.state[i] = "pending"

    @rule()
    def purge_dead(self):
        dead = [i for i, s in self.state.items() if s == "dead"]
        assert self.store.purge_dead() == (len(dead), ())
        for i in dead:
            del self.state[i]

    @rule(age=st.floats(min_value=0, max_value=50), step=st.integers(min_value=1, max_value=7))
    def prune(self, age, step):
        cutoff = self.clock - age
        expired = [i for i, s in self.state.items() if s == "sent" and self.sent_at[i] < cutoff]
        assert self.store.prune_sent(sent_before=cutoff, step=step) == len(expired)
        for i in expired:
            del self.state[i]

    @rule()
    def replay(self):
        """Queue pending copies of every retained sent record (new records, new ids)."""
        before = {row[0] for row in self.store.conn.execute("SELECT id FROM records")}
        sent = sum(1 for s in self.state.values() if s == "sent")
        assert self.store.replay(since=T0, until=None) == sent
        for (record_id,) in self.store.conn.execute("SELECT id FROM records"):
            if record_id not in before:
                self.state[record_id] = "pending"

    @rule()
    def export_remove_pending(self):
        """Move every pending record not in flight out of the spool (`export --remove`)."""
        moved = [i for i, s in self.state.items() if s == "pending" and i not in self.leased()]
        assert self.store.move_out("pending", lambda records: None, chunk=3) == len(moved)
        for i in moved:
            del self.state[i]

    @rule()
    def close_and_reopen(self):
        self.store.close()
        self.store = Store(self.folder / "spool.db", synchronous="normal")

    @invariant()
    def counts_match_the_model(self):
        leased = self.leased()
        want = {"pending": 0, "inflight": 0, "sent": 0, "dead": 0, "held": 0}
        for i, s in self.state.items():
            want["inflight" if s == "pending" and i in leased else s] += 1
        assert self.store.counts() == want

    @invariant()
    def the_kept_counts_equal_a_real_count_of_the_records(self):
        assert_counts_true(self.folder / "spool.db")

    @invariant()
    def every_record_is_in_exactly_the_state_the_model_says(self):
        stored = {record_id: state for record_id, state, _ in self.store.records()}
        names = {0: "pending", 2: "sent", 3: "dead"}
        assert {i: names[s] for i, s in stored.items()} == self.state

    @invariant()
    def every_record_in_flight_is_held_by_exactly_one_live_lease_the_model_knows(self):
        runs = self.store.conn.execute("SELECT lo, hi, leases.id FROM lease_runs LEFT JOIN leases "
                                       "ON lease_runs.lease = leases.id").fetchall()
        assert all(lease is not None for _, _, lease in runs), "a record is held by a lease that ended"
        rows = [(record_id, lease) for lo, hi, lease in runs for record_id in range(lo, hi + 1)]
        assert len({record_id for record_id, _ in rows}) == len(rows), "a record is held by two leases"
        held = {record_id: lease for record_id, lease in rows if self.state.get(record_id) == "pending"}
        assert held == {i: lease for lease, ids in self.leases.items() for i in ids if self.state.get(i) == "pending"}


StoreModel.TestCase.settings = settings(max_examples=200 if os.environ.get("SPOOL_LONG") else 40,
                                        stateful_step_count=40, deadline=None)
test_the_store_behaves_like_its_model = StoreModel.TestCase
