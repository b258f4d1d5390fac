"""StatHat's API page, pasted as users paste it, through every producer: add, import, drop files, the relay.

Every path must end with the same records in the spool. The page's JSON example ends its `data` array with
a trailing comma: `import` and drop files name the line and the cause; the relay refuses it as StatHat does.
"""

from __future__ import annotations

import time

import pytest
import requests

from spool.records import make_record
from spool.store import Store

from .helpers import STATHAT_JSON_EXAMPLE, run_cli, running_relay

# The page's own values, verbatim.
EZKEY = "john@example.com"  # the account's email works as an ezkey
CLASSIC = "i2oer9xisFGsHDNVYzJTM2cy9Xj"  # the page uses this one string as both key and ukey
PAGE_T = 1362772440
JSON_T = 1363118126
JSON_VERBATIM = STATHAT_JSON_EXAMPLE
JSON_FIXED = JSON_VERBATIM.replace("1363118126},\n", "1363118126}\n")
TRAILING_COMMA = "line 8: trailing comma before ']' (JSON allows none; the comma is on line 7)"

STAMPED = "stamped on arrival"
EXPECTED = sorted([
    # EZ parameters: count, then value, then the multi-stat form
    ("ws0 load average", None, None, EZKEY, 0, 9, PAGE_T),
    ("ws0 load average", None, None, EZKEY, 1, 0.375, PAGE_T),
    ("messages sent~total,female,europe", None, None, EZKEY, 0, 1, PAGE_T),
    # the JSON body, its comma removed
    ("page view", None, None, "XXXYYYZZZ", 0, 2, STAMPED),
    ("messages sent~total,female,europe", None, None, "XXXYYYZZZ", 0, 1, STAMPED),
    ("request time~total,messages", None, None, "XXXYYYZZZ", 1, 23.094, STAMPED),
    ("ws0: load average", None, None, "XXXYYYZZZ", 1, 0.732, JSON_T),
    # classic: /c with count, /c without count ("default is 1"), /v
    (None, CLASSIC, CLASSIC, None, 0, 9, PAGE_T),
    (None, CLASSIC, CLASSIC, None, 0, 1, PAGE_T),
    (None, CLASSIC, CLASSIC, None, 1, 13.947, PAGE_T),
], key=repr)


def spooled(db, since: float) -> list[tuple]:
    """The spool's records as tuples; a t stamped during the test reads STAMPED."""
    with Store(db) as store:
        records = [record for _, _, record in store.records()]
    return sorted(((*r[:-1], STAMPED if r.t >= int(since) else r.t) for r in records), key=repr)


def by_add(db, tmp_path) -> None:
    ez = [("ws0 load average", "--count", "9"), ("ws0 load average", "--value", "0.375"),
          ("messages sent~total,female,europe", "--count", "1")]
    for stat, kind, number in ez:
        assert run_cli(db, "add", stat, kind, number, "--t", str(PAGE_T), "--ezkey", EZKEY).returncode == 0
    for stat, kind, number, *t in [("page view", "--count", "2"), ("messages sent~total,female,europe", "--count", "1"),
                                   ("request time~total,messages", "--value", "23.094"),
                                   ("ws0: load average", "--value", "0.732", "--t", str(JSON_T))]:
        assert run_cli(db, "add", stat, kind, number, *t, "--ezkey", "XXXYYYZZZ").returncode == 0
    for number in (["--count", "9"], [], ["--value", "13.947"]):
        result = run_cli(db, "add", "--key", CLASSIC, "--ukey", CLASSIC, *number, "--t", str(PAGE_T))
        assert result.returncode == 0, result.stderr


def lines_file(tmp_path, name: str) -> str:
    path = tmp_path / name
    path.write_text(
        f'{{"stat": "ws0 load average", "count": 9, "t": {PAGE_T}, "ezkey": "{EZKEY}"}}\n'
        f'{{"stat": "ws0 load average", "value": 0.375, "t": {PAGE_T}, "ezkey": "{EZKEY}"}}\n'
        f'{{"stat": "messages sent~total,female,europe", "count": 1, "t": {PAGE_T}, "ezkey": "{EZKEY}"}}\n'
        f'{{"key": "{CLASSIC}", "ukey": "{CLASSIC}", "count": 9, "t": {PAGE_T}}}\n'
        f'{{"key": "{CLASSIC}", "ukey": "{CLASSIC}", "t": {PAGE_T}}}\n'
        f'{{"key": "{CLASSIC}", "ukey": "{CLASSIC}", "value": 13.947, "t": {PAGE_T}}}\n')
    return str(path)


def by_import(db, tmp_path) -> None:
    verbatim = tmp_path / "verbatim.json"
    verbatim.write_text(JSON_VERBATIM)
    refused = run_cli(db, "import", str(verbatim))
    assert refused.returncode == 2
    assert refused.stderr == f"spool: error: {TRAILING_COMMA}; nothing was imported\n"
    fixed = tmp_path / "fixed.json"
    fixed.write_text(JSON_FIXED)
    for path in (lines_file(tmp_path, "page.jsonl"), str(fixed)):
        result = run_cli(db, "import", path)
        assert result.returncode == 0, result.stderr


def by_drop_files(db, tmp_path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "verbatim.json").write_text(JSON_VERBATIM)
    (drop / "fixed.json").write_text(JSON_FIXED)
    (drop / "params.csv").write_text(  # EZ parameters and the classic calls, one per row; empty cells are absent
        "stat,count,value,t,ezkey,key,ukey\n"
        f"ws0 load average,9,,{PAGE_T},{EZKEY},,\n"
        f"ws0 load average,,0.375,{PAGE_T},{EZKEY},,\n"
        f'"messages sent~total,female,europe",1,,{PAGE_T},{EZKEY},,\n'
        f"{'':s},9,,{PAGE_T},,{CLASSIC},{CLASSIC}\n"
        f",,,{PAGE_T},,{CLASSIC},{CLASSIC}\n"
        f",,13.947,{PAGE_T},,{CLASSIC},{CLASSIC}\n")
    result = run_cli(db, "ingest", *(str(drop / name) for name in ("verbatim.json", "fixed.json", "params.csv")))
    assert result.returncode == 2, result.stderr  # one file rejected
    assert f"rejected verbatim.json: {TRAILING_COMMA}" in result.stderr
    assert (drop / ".rejected" / "verbatim.json.error.txt").read_text() == TRAILING_COMMA + "\n"
    assert sorted(p.name for p in (drop / ".done").iterdir()) == ["fixed.json", "params.csv"]


def by_relay(db, tmp_path) -> None:
    with running_relay(db) as relay:
        url = relay.url
        answers = [
            requests.get(f"{url}/ez", params={"ezkey": EZKEY, "stat": "ws0 load average", "count": "9", "t": PAGE_T}),
            requests.post(f"{url}/ez", data={"ezkey": EZKEY, "stat": "ws0 load average", "value": "0.375",
                                             "t": PAGE_T}),
            requests.post(f"{url}/ez", data={"ezkey": EZKEY, "stat": "messages sent~total,female,europe",
                                             "count": "1", "t": PAGE_T}),
            requests.get(f"{url}/c", params={"key": CLASSIC, "ukey": CLASSIC, "count": "9", "t": PAGE_T}),
            requests.post(f"{url}/c", data={"key": CLASSIC, "ukey": CLASSIC, "t": PAGE_T}),
            requests.post(f"{url}/v", data={"key": CLASSIC, "ukey": CLASSIC, "value": "13.947", "t": PAGE_T}),
        ]
        assert [(a.status_code, a.content) for a in answers] == [(204, b"")] * 6
        verbatim = requests.post(f"{url}/ez", data=JSON_VERBATIM, headers={"Content-Type": "application/json"})
        assert (verbatim.status_code, verbatim.json()) == (200, {"status": 500, "msg": "invalid json"})
        fixed = requests.post(f"{url}/ez", data=JSON_FIXED, headers={"Content-Type": "application/json"})
        assert (fixed.status_code, fixed.content) == (200, b'{"status":200,"msg":"ok","multiple":4}')


@pytest.mark.parametrize("produce", [by_add, by_import, by_drop_files, by_relay],
                         ids=["add", "import", "drop files", "relay"])
def test_every_example_on_stathats_api_page_gives_the_same_records_by_every_path(db, tmp_path, produce):
    started = time.time()
    produce(db, tmp_path)
    assert spooled(db, started) == EXPECTED


def test_a_classic_record_with_neither_count_nor_value_is_a_counter_hit_of_one_through_the_api(db):
    from spool import Spool

    with Spool(db) as sp:
        taken = sp.add({"key": CLASSIC, "ukey": CLASSIC, "t": PAGE_T})
        assert sp.add_many([{"key": CLASSIC, "ukey": CLASSIC, "t": PAGE_T}]) == 1
    assert taken == make_record(key=CLASSIC, ukey=CLASSIC, count=1, t=PAGE_T)
    with Store(db) as store:
        assert [record for _, _, record in store.records()] == [taken, taken]
