"""Batches built by SQLite (a lease's `data`): what the receiver gets is what Python would have sent, and the
batches SQLite cannot build exactly are built in Python (see spool.store.ledger.Lease)."""

from __future__ import annotations

import json

import pytest

from spool.config import Config
from spool.records import INT64_MAX, make_record
from spool.ship import Shipper
from spool.stathat import ez_body
from spool.store import Store
from tests.helpers import T0, TEST_EZKEY, assert_counts_true, make_config

ODD_NAMES = ["température °C", "载荷", "emoji 🚀 rockets", 'quote " and back\\slash', "slash/and|pipe", "a" * 255]


def test_a_batch_sqlite_builds_carries_what_python_would_build(db, receiver):
    records = [make_record(stat=name, count=n, t=T0 + i)
               for i, (name, n) in enumerate(zip(ODD_NAMES * 3, [1, -5, INT64_MAX, -INT64_MAX, 0, 7] * 3, strict=True))]
    records += [make_record(stat="an integer value", value=42, t=T0 + 50)]
    with Store(db, limits=Config().replace(**{"spool.max_age": 100 * 365 * 86400.0}).spool) as store:
        store.append(records)
        lease = store.lease(100, now=T0, keyed_only=False, built=True)
        assert lease is not None and lease.data is not None and lease.items == []
        assert (lease.size, lease.min_t) == (len(records), T0)  # the oldest t, for max_age
        assert json.loads(lease.data) == json.loads(ez_body(TEST_EZKEY, records))["data"]
        store.end_lease(lease.id)
        with Shipper(store, make_config(db, receiver)) as shipper:
            assert shipper.drain(max_time=30).done
    expected = sorted((r.stat, "count" if r.kind == 0 else "value", r.number, r.t, TEST_EZKEY) for r in records)
    assert receiver.stats() == expected
    assert all(type(a["number"]) is int for a in receiver.accepted)
    assert_counts_true(db)


@pytest.mark.parametrize("odd", [
    make_record(stat="float", value=0.30000000000000004, t=T0),
    make_record(stat="the largest float", value=1.7976931348623157e308, t=T0),
    make_record(stat="own key", count=1, t=T0, ezkey="its-own-key"),
    make_record(key="classic-key", ukey="classic-ukey", count=1, t=T0),
], ids=["float", "largest float", "own key", "classic"])
def test_a_batch_sqlite_cannot_build_exactly_is_built_in_python_and_arrives_exact(db, receiver, odd):
    plain = [make_record(stat=f"plain {i}", count=i, t=T0 + i) for i in range(5)]
    with Store(db) as store:
        store.append([*plain[:2], odd, *plain[2:]])
        lease = store.lease(100, now=T0, keyed_only=False, built=True)
        assert lease is not None and lease.data is None and len(lease.items) == 6
        store.end_lease(lease.id)
        with Shipper(store, make_config(db, receiver)) as shipper:
            assert shipper.drain(max_time=30).done
    [got] = [a for a in receiver.accepted if (a.get("stat") or a.get("key")) == (odd.stat or odd.key)]
    if odd.kind == 1:  # a value: the very float
        assert type(got["number"]) is float and got["number"] == odd.number
    assert len(receiver.accepted) == 6
    assert_counts_true(db)


def test_a_built_batch_with_a_gap_in_its_ids_is_built_in_python(db, receiver):
    with Store(db) as store:
        store.append([make_record(stat=f"s{i}", count=1, t=T0 + i) for i in range(10)])
        taken = store.lease(1, now=T0, keyed_only=False, after=4)  # id 5 is in flight: the rest has a gap
        assert taken is not None and [item.id for item in taken.items] == [5]
        lease = store.lease(100, now=T0, keyed_only=False, built=True)
        assert lease is not None and lease.data is None and [item.id for item in lease.items] == [
            1, 2, 3, 4, 6, 7, 8, 9, 10]
        assert store.conn.execute("SELECT lo, hi FROM lease_runs WHERE lease = ? ORDER BY lo",
                                  (lease.id,)).fetchall() == [(1, 4), (6, 10)]
    assert_counts_true(db)


def _data(body: bytes) -> str:
    """The `data` array of an EZ batch, as written."""
    text = body.decode()
    return text[text.index('"data":') + len('"data":'):-1]


@pytest.mark.parametrize("number", [3.0, -42.0, 1e14, 1e15, -1e15, 0.0, -0.0, 0, 2.5, -2.5, 1e-7, 10**15,
                                    INT64_MAX, -INT64_MAX, 2.0**63, -(2.0**63), 1e19, 1.7976931348623157e308])
def test_a_built_batch_writes_every_number_as_python_would_from_the_spool(db, number):
    """Byte for byte what ez_body writes of the stored records, whichever way each batch is read. The spool stores an
    integral float in int64's range as an integer (3.0 is sent as 3, as ever); a REAL left in the spool is written
    otherwise by SQLite (1e19 as 1.0e+19), so a batch holding one is built in Python."""
    records = [make_record(stat=f"s{i}", value=i + 1, t=T0 + i) for i in range(600)]
    records[250] = make_record(stat="odd", value=number, t=T0 + 250)
    sent, stored = [], []
    with Store(db) as store:
        store.append(records)
        while (lease := store.lease(500, now=T0, keyed_only=False, built=True)) is not None:
            items = lease.items or store.leased_records(lease.span)
            sent.append(_data(ez_body(TEST_EZKEY, items)) if lease.data is None else lease.data)
            stored.append(_data(ez_body(TEST_EZKEY, items)))
            store.ack([item.id for item in items], now=T0, lease=lease.id)
    assert sent == stored and len(sent) == 2
    assert ('"stat":"odd","value":3,' in sent[0]) == (number == 3.0)
