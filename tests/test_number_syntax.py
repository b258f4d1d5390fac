"""Numbers are read as StatHat reads them on every path: `spool add`, CSV drop files, the relay, StatsD.

Python's int() and float() also read '1_000', Arabic-Indic and full-width digits, 'infinity', and numbers
wrapped in exotic whitespace. StatHat does not, so neither does spool: each path refuses them as it refuses
any bad number, and stores nothing.
"""

from __future__ import annotations

import json
import socket

import pytest
import requests

from spool.records import make_record
from spool.store import Store

from .helpers import T0, run_cli, running_relay, wait_for

# Text that spool read as a number (Python's int() and float(), after str.strip()) and StatHat does not.
PYTHON_ONLY = ["1_000", "١٢٣", "１２", "\u20035", "5\x1c", "infinity", "NaN"]
OPTIONS = ["--count", "--value", "--t"] * 2 + ["--count"]  # each number through a different option
COLUMNS = [option[2:] for option in OPTIONS]
IDS = ["underscore", "arabic-indic", "full-width", "em-space", "file-separator", "infinity", "nan"]


def spooled(db):
    if not db.exists():
        return []
    with Store(db) as store:
        return [record for _, _, record in store.records()]


# -- spool add ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "option"), list(zip(PYTHON_ONLY, OPTIONS, strict=True)),
                         ids=IDS)
def test_spool_add_refuses_a_number_stathat_would_not_read_with_one_line_and_status_2(db, text, option):
    args = ["add", "s", option, text] + ([] if option != "--t" else ["--count", "1"])
    result = run_cli(db, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spool: error: "), result.stderr
    assert f"{option[2:]} " in lines[0] and "is not a number" in lines[0]
    assert spooled(db) == []


def test_spool_add_still_takes_every_number_stathat_reads(db):
    for option, text in [("--count", "1e3"), ("--value", "-1.5"), ("--value", ".5"), ("--count", "+3"),
                         ("--value", " 7 ")]:
        result = run_cli(db, "add", "s", option, text, "--t", str(T0))
        assert result.returncode == 0, result.stderr
    assert [r.number for r in spooled(db)] == [1000.0, -1.5, 0.5, 3, 7]


# -- CSV drop files ----------------------------------------------------------------------------------------


def test_a_csv_drop_file_with_such_cells_is_rejected_naming_each_line(db, tmp_path):
    rows = {"count": f"bad,{{}},,{T0}", "value": f"bad,,{{}},{T0}", "t": "bad,1,,{}"}
    bad = [rows[column].format(text) for column, text in zip(COLUMNS, PYTHON_ONLY, strict=True)]
    path = tmp_path / "job.csv"
    path.write_text("stat,count,value,t\n" + f"good,1,,{T0}\n" + "\n".join(bad) + f"\ngood,2,,{T0}\n",
                    encoding="utf-8")
    result = run_cli(db, "ingest", str(path))
    assert result.returncode == 2, result.stderr
    report = (tmp_path / ".rejected" / "job.csv.error.txt").read_text(encoding="utf-8").splitlines()
    assert len(report) == len(PYTHON_ONLY), report
    for line, (column, error) in enumerate(zip(COLUMNS, report, strict=True), start=3):
        assert error.startswith(f"line {line}: {column} ") and "is not a number" in error, error
    assert spooled(db) == []  # all or nothing: the good lines wait for the file to be fixed


# -- the relay: EZ and classic calls, JSON batches ---------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    db = tmp_path_factory.mktemp("relay") / "spool.db"
    with running_relay(db, statsd="127.0.0.1:0") as relay:
        yield relay, db


def http(method, url, **kwargs):
    """Make one request on a connection of its own, closed by the relay after its answer (no thread lingers)."""
    headers = {"Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, url, timeout=10, headers=headers, **kwargs)


CALLS = [
    ("GET", "/ez", {"ezkey": "k", "stat": "s"}, "count"),
    ("POST", "/ez", {"ezkey": "k", "stat": "s"}, "value"),
    ("POST", "/ez", {"ezkey": "k", "stat": "s", "count": "1"}, "t"),
    ("POST", "/c", {"key": "K", "ukey": "U"}, "count"),
    ("GET", "/v", {"key": "K", "ukey": "U"}, "value"),
    ("POST", "/v", {"key": "K", "ukey": "U", "value": "1"}, "t"),
]


@pytest.mark.parametrize(("method", "path", "form", "field"), CALLS,
                         ids=[f"{m} {p} {f}" for m, p, _, f in CALLS])
@pytest.mark.parametrize("text", PYTHON_ONLY, ids=IDS)
def test_the_relay_refuses_such_a_number_as_stathat_refuses_a_bad_call_and_stores_nothing(
        relay, method, path, form, field, text):
    server, db = relay
    before = len(spooled(db))
    fields = {**form, field: text}
    answer = http(method, server.url + path, **({"params": fields} if method == "GET" else {"data": fields}))
    assert answer.status_code == 200
    body = answer.json()
    assert body["status"] == 500 and body["msg"].startswith(f"{field} ") and "is not a number" in body["msg"]
    assert len(spooled(db)) == before


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_json_batch_with_a_nan_or_infinity_is_invalid_json_as_stathat_says(relay, constant):
    server, db = relay
    before = len(spooled(db))
    body = '{"ezkey": "k", "data": [{"stat": "ok", "count": 1}, {"stat": "s", "value": CONSTANT}]}'
    body = body.replace("CONSTANT", constant)
    answer = http("POST", server.url + "/ez", data=body, headers={"Content-Type": "application/json"})
    assert (answer.status_code, answer.json()) == (200, {"status": 500, "msg": "invalid json"})
    assert len(spooled(db)) == before


def test_a_json_batch_with_a_number_in_a_string_is_refused(relay):
    server, db = relay
    before = len(spooled(db))
    answer = http("POST", server.url + "/ez", json={"ezkey": "k", "data": [{"stat": "s", "count": "1_000"}]})
    assert answer.status_code == 200 and answer.json()["status"] == 500
    assert "count must be a number, not the string" in answer.json()["msg"]
    assert len(spooled(db)) == before


@pytest.mark.parametrize("length", ["1_0", "+10", "١٠"])
def test_a_content_length_that_is_not_ascii_digits_is_refused(relay, length):
    server, db = relay
    before = len(spooled(db))
    body = b"ezkey=k&stat=s&count=1"
    host, port = server.server.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"POST /ez HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                       b"Content-Length: " + length.encode() + b"\r\n\r\n" + body)
        answer = client.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.1 200 ") and b'{"status":500,"msg":"bad Content-Length"}' in answer
    assert len(spooled(db)) == before


def test_the_relay_still_takes_every_number_stathat_reads(relay):
    server, db = relay
    before = len(spooled(db))
    for number in ["9", "0.375", "1e3", "-1.5", ".5", "+2"]:
        answer = http("POST", server.url + "/ez", data={"ezkey": "k", "stat": "fine", "value": number, "t": T0})
        assert answer.status_code == 204, answer.text
    assert [r.number for r in spooled(db)[before:]] == [9, 0.375, 1000.0, -1.5, 0.5, 2]


# -- StatsD ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    "hits:1_000|c", "hits:١٢٣|c", "hits:１２|c", "hits:\u20035|c", "temp:infinity|g", "temp:+1_0|g",
    "hits:1|c|@0.2_5", "hits:1|c|@٠.٥", "hits:1|c|@\u20030.5", f"hits:1|c|T{T0}".replace("1", "١"),
    f"hits:1|c|T{T0:_}",
])
def test_a_statsd_line_with_such_a_number_is_counted_invalid_and_stores_nothing(relay, line):
    server, db = relay
    before = outcomes(server, db)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(line.encode(), server.statsd_address)
    # Wait for the packet's outcome, whichever it is: a wrongly taken line fails at once, not by a timeout.
    wait_for(lambda: outcomes(server, db) != before)
    assert outcomes(server, db) == {**before, "invalid": before["invalid"] + 1}


def outcomes(server, db) -> dict[str, int]:
    """What became of the StatsD lines so far: records spooled, lines invalid, lines dropped (by reason)."""
    snapshot = server.snapshot()
    return {"records": len(spooled(db)), "invalid": snapshot["statsd_invalid"], **snapshot["statsd_dropped"]}


def test_statsd_still_takes_a_sample_rate_and_its_own_time(relay):
    server, db = relay
    before = len(spooled(db))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(f"rated:1|c|@0.5|T{T0}".encode(), server.statsd_address)
    wait_for(lambda: len(spooled(db)) > before)
    assert spooled(db)[before:] == [make_record(stat="rated", count=2.0, t=T0)]


# -- JSON lines: numbers the json module reads are ASCII already; NaN and Infinity are refused --------------


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_import_refuses_a_nan_or_infinity_naming_the_line(db, constant):
    lines = json.dumps({"stat": "ok", "count": 1, "t": T0}) + "\n" + '{"stat": "s", "value": ' + constant + "}\n"
    result = run_cli(db, "import", "-", input=lines.encode())
    assert result.returncode == 2
    assert result.stderr.startswith("spool: error: line 2: value must be a finite number"), result.stderr
    assert spooled(db) == []
