"""Odd bytes from producers: broken first lines, lone surrogates, odd keys, gzip bombs, keys in the wrong column."""

from __future__ import annotations

import gzip
import io
import json
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests

from spool.errors import InvalidRecord, StoreError
from spool.formats import read_json_stream, to_records
from spool.records import parse_record, record_rows
from spool.store import Store

from .helpers import STATHAT_JSON_EXAMPLE, T0, cli_env, run_cli, running_relay, wait_for


def pending(db):
    with Store(db) as store:
        return [record for _, _, record in store.records()]


def good_lines(n: int) -> str:
    return "".join(json.dumps({"stat": f"s{i}", "count": 1, "t": T0}) + "\n" for i in range(n))


# -- item 4: a broken first line is one bad line, not the start of a document --------------------------------


@pytest.mark.parametrize("first", [
    '{"stat": "a", "count": 1',  # cut off after a number: a JSON prefix, but the next line does not continue it
    '{"stat": "a", "cou',  # cut off inside a string
    '{"stat": "a", "count": 1}}',  # one brace too many
    '{oops',
    '[1, 2',
])
def test_import_skip_invalid_with_a_broken_first_line_takes_every_good_line(db, tmp_path, first):
    path = tmp_path / "in.jsonl"
    path.write_text(first + "\n" + good_lines(999))
    result = run_cli(db, "import", "--skip-invalid", str(path))
    assert result.returncode == 0, result.stderr
    assert "skipped line 1: not valid JSON" in result.stderr
    assert "imported 999 records, skipped 1 invalid" in result.stderr
    assert len(pending(db)) == 999


def test_a_broken_first_line_in_a_drop_file_with_skip_invalid_loses_only_that_line(db, tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"stat": "a", "count": 1\n' + good_lines(50))
    result = run_cli(db, "ingest", "--skip-invalid", str(path))
    assert result.returncode == 0, result.stderr
    assert len(pending(db)) == 50
    assert "line 1: not valid JSON" in (tmp_path / ".rejected" / "job.jsonl.error.txt").read_text()


@pytest.mark.parametrize("text", [
    json.dumps({"ezkey": "k", "data": [{"stat": "a", "count": 1, "t": T0}, {"stat": "b", "value": 2, "t": T0}]},
               indent=2),
    json.dumps([{"stat": "a", "count": 1, "t": T0}, {"stat": "b", "value": 2, "t": T0}], indent=4),
    '[{"stat": "a", "count": 1, "t": T0},\n {"stat": "b", "value": 2, "t": T0}]\n',
    '{"ezkey": "k",\n "data": [\n{"stat": "a", "count": 1, "t": T0},\n{"stat": "b", "value": 2, "t": T0}\n]}',
    '\n\n[\n{"stat": "a", "count": 1, "t": T0}\n,\n{"stat": "b", "value": 2, "t": T0}\n]\n',
])
def test_a_pretty_printed_document_is_still_read_as_one_document(text):
    text = text.replace("T0", str(T0))
    records = list(to_records(read_json_stream(io.BytesIO(text.encode())), ezkey="k"))
    assert [(r[0], r[5]) for r in records] == [("a", 1), ("b", 2)]


def test_stathats_own_example_with_its_trailing_comma_is_one_precise_error_not_four_lines(db):
    errors = []
    records = list(to_records(read_json_stream(io.BytesIO(STATHAT_JSON_EXAMPLE.encode())), on_invalid=errors.append))
    assert records == []
    assert len(errors) == 1
    assert errors[0].reason == "trailing comma before ']' (JSON allows none; the comma is on line 7)"
    assert errors[0].line == 8  # the line of the "]" after the trailing comma, not the first line


@pytest.mark.parametrize(("text", "message"), [
    ('{"stat": "a", "count": 1,}', "line 1: trailing comma before '}' (JSON allows none)"),
    ('[{"stat": "a", "count": 1},  ]', "line 1: trailing comma before ']' (JSON allows none)"),
    ('[\n{"stat": "a", "count": 1},\n\n]',
     "line 4: trailing comma before ']' (JSON allows none; the comma is on line 2)"),
    ('{"stat": ,}', "line 1: not valid JSON: Expecting value at column 10"),  # a missing value, not a trailing comma
    ('[1,,]', "line 1: not valid JSON: Expecting value at column 4"),
])
def test_a_trailing_comma_is_named_with_its_line_and_other_breakage_keeps_the_parsers_words(text, message):
    errors = []
    list(to_records(read_json_stream(io.BytesIO(text.encode())), on_invalid=errors.append))
    assert [str(error) for error in errors] == [message]


@pytest.mark.parametrize("pos", [10, 12])  # Python 3.13 points at the comma; 3.10-3.12 at the bracket after it
def test_the_trailing_comma_is_found_wherever_the_parser_points(pos):
    from spool.formats import json_error

    doc = '[\n  1,\n  2,\n]'
    error = json_error(json.JSONDecodeError("any message", doc, pos))
    assert (error.line, error.reason) == (4, "trailing comma before ']' (JSON allows none; the comma is on line 3)")


# -- item 9: a lone surrogate is refused at validation, and the relay's writer survives anything ------------

SURROGATE_LINE = json.dumps({"stat": "a\ud800", "count": 1, "t": T0}) + "\n"  # JSON's escape: \ud800


@pytest.mark.parametrize("fields", [
    {"stat": "a\ud800b", "count": 1}, {"stat": "\udfff", "count": 1}, {"stat": "x~a,\ud800", "count": 1},
    {"stat": "s", "count": 1, "ezkey": "k\ud800"}, {"stat": "s", "count": 1, "email": "\udc80@example.com"},
    {"key": "k\ud800", "ukey": "u", "count": 1}, {"key": "k", "ukey": "\ud800", "value": 1},
])
def test_a_lone_surrogate_in_any_text_field_is_refused_with_a_reason(fields):
    with pytest.raises(InvalidRecord, match="contains a lone surrogate \\(not valid Unicode\\)"):
        parse_record({**fields, "t": T0})
    with pytest.raises(InvalidRecord, match="lone surrogate"):
        list(record_rows([{**fields, "t": T0}]))


def test_import_refuses_a_lone_surrogate_with_a_reason_not_an_internal_error(db, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(SURROGATE_LINE + good_lines(3))
    result = run_cli(db, "import", str(path))
    assert result.returncode == 2, result.stderr
    assert "line 1: stat contains a lone surrogate (not valid Unicode)" in result.stderr
    assert "internal error" not in result.stderr
    result = run_cli(db, "import", "--skip-invalid", str(path))
    assert result.returncode == 0 and "imported 3 records, skipped 1 invalid" in result.stderr
    assert len(pending(db)) == 3


def test_a_drop_file_with_a_lone_surrogate_is_rejected_with_the_reason(db, tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text(SURROGATE_LINE)
    result = run_cli(db, "ingest", str(path))
    assert result.returncode == 2, result.stderr
    assert "lone surrogate" in (tmp_path / ".rejected" / "job.jsonl.error.txt").read_text()


@pytest.fixture(scope="module")
def shared_relay(tmp_path_factory):
    """One relay for the tests that only look at its answers (starting and stopping one costs half a second)."""
    db = tmp_path_factory.mktemp("relay") / "spool.db"
    with running_relay(db) as relay:
        yield relay, db


def http(method, url, **kwargs):
    """Make one request on a connection of its own, closed by the relay after its answer (no thread lingers)."""
    headers = {"Connection": "close", **kwargs.pop("headers", {})}
    return requests.request(method, url, timeout=10, headers=headers, **kwargs)


@pytest.mark.parametrize(("path", "kwargs"), [
    ("/ez", {"data": '{"ezkey": "k", "data": [{"stat": "a\\ud800", "count": 1}]}',
             "headers": {"Content-Type": "application/json"}}),
    ("/ez", {"data": '{"ezkey": "k\\udc00", "data": [{"stat": "a", "count": 1}]}',
             "headers": {"Content-Type": "application/json"}}),
    ("/ez", {"data": "ezkey=k&stat=a%ED%A0%80&count=1"}),
])
def test_the_relay_refuses_a_lone_surrogate_as_stathat_would_and_goes_on(shared_relay, path, kwargs):
    relay, db = shared_relay
    before = len(pending(db))
    answer = http("POST", relay.url + path, **kwargs)
    assert answer.status_code == 200 and answer.json()["status"] == 500
    after = http("POST", relay.url + "/ez", data={"ezkey": "k", "stat": "fine", "count": "1"})
    assert after.status_code == 204
    assert http("GET", relay.url + "/healthz").json()["status"] == "ok"
    assert [r.stat for r in pending(db)[before:]] == ["fine"]


def test_the_relays_writer_survives_an_error_nobody_expected_and_health_says_so(db):
    # A row SQLite cannot encode (validation refuses such text now, so it is handed to the writer directly):
    # the real sqlite3 module raises UnicodeEncodeError, which is no StoreError.
    unexpected = ("a\ud800", None, None, "k", 0, 1, T0)
    with running_relay(db) as relay:
        with pytest.raises(StoreError, match="UnicodeEncodeError"):
            within(lambda: relay.writer.write([unexpected]))
        health = http("GET", relay.url + "/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failing"
        assert "UnicodeEncodeError" in health.json()["error"]
        answer = http("POST", relay.url + "/ez", data={"ezkey": "k", "stat": "after", "count": "1"})
        assert answer.status_code == 204
        assert http("GET", relay.url + "/healthz").json()["status"] == "ok"
    assert [r.stat for r in pending(db)] == ["after"]


def within(call, seconds=30):
    """Return call(), or fail the test if it has not returned after `seconds` (a hang, not an answer)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no return within {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def test_one_bad_request_in_a_group_does_not_fail_the_others(db):
    with running_relay(db) as relay:
        results = {}

        def write(name, stat):
            try:
                relay.writer.write([(stat, None, None, "k", 0, 1, T0)])
                results[name] = "ok"
            except StoreError:
                results[name] = "refused"

        # Another process holds the write lock: the writer's first commit waits, the next two calls queue up
        # behind it and are committed together, as one group, once the lock is free.
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        first = threading.Thread(target=write, args=("first", "first"))
        first.start()
        wait_for(lambda: relay.writer._queue.qsize() == 0)
        threads = [threading.Thread(target=write, args=(name, stat))
                   for name, stat in (("bad", "a\ud800"), ("good", "good"))]
        for thread in threads:
            thread.start()
        wait_for(lambda: relay.writer._queue.qsize() == 2)
        blocker.execute("COMMIT")
        blocker.close()
        for thread in [first, *threads]:
            thread.join(10)
        assert results == {"first": "ok", "bad": "refused", "good": "ok"}
    assert sorted(r.stat for r in pending(db)) == ["first", "good"]


# -- item 16: one rule for keys on every path ------------------------------------------------------------------

BAD_KEYS = [("", "ezkey is empty"), ("   ", "ezkey is empty"), ("k" * 100_000, "100000 characters long"),
            ("key\x00with\x1bcontrols", "control characters"), ("k\ud800", "lone surrogate")]


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_a_stathat_bodys_key_is_checked_like_any_key(db, tmp_path, key, reason):
    body = json.dumps({"ezkey": key, "data": [{"stat": "a", "count": 1, "t": T0}]})
    result = run_cli(db, "import", "-", input=body.encode())
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr and "internal error" not in result.stderr
    drop = tmp_path / "body.json"
    drop.write_text(body)
    assert run_cli(db, "ingest", str(drop)).returncode == 2
    assert reason in (tmp_path / ".rejected" / "body.json.error.txt").read_text()
    assert pending(db) == []


@pytest.mark.parametrize(("key", "reason"), [
    *[(k, r) for k, r in BAD_KEYS if k.isprintable()],  # argv holds no NUL
    ("k\udcff", "lone surrogate"),  # the byte 0xff, not UTF-8: Python's argv decoding makes it a lone surrogate
])
def test_the_default_key_of_an_import_is_checked_before_any_record(db, key, reason):
    result = run_cli(db, "import", "--ezkey", key, "-", input=good_lines(3).encode())
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr
    assert pending(db) == []


@pytest.mark.parametrize(("key", "reason"), BAD_KEYS)
def test_a_key_given_to_record_rows_is_checked_once_before_use(key, reason):
    with pytest.raises(InvalidRecord, match=reason):
        list(record_rows([{"stat": "a", "count": 1, "t": T0}], ezkey=key))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"json": {"ezkey": "   ", "data": [{"stat": "a", "count": 1}]}}, "no ezkey specified"),
    ({"json": {"ezkey": "k" * 100_000, "data": [{"stat": "a", "count": 1}]}}, "invalid keys"),
    ({"json": {"ezkey": "key\x07bell", "data": [{"stat": "a", "count": 1}]}}, "invalid keys"),
    ({"json": {"ezkey": 12345, "data": [{"stat": "a", "count": 1}]}}, "invalid keys"),
    ({"data": {"ezkey": "  ", "stat": "a", "count": "1"}}, "no ezkey specified"),
    ({"data": {"ezkey": "key\x07bell", "stat": "a", "count": "1"}}, "invalid keys"),
    ({"data": {"ezkey": "k" * 300, "stat": "a", "count": "1"}}, "invalid keys"),
])
def test_the_relay_answers_a_bad_key_as_stathat_does(shared_relay, kwargs, message):
    relay, db = shared_relay
    before = len(pending(db))
    answer = http("POST", relay.url + "/ez", **kwargs)
    assert answer.status_code == 200 and answer.json() == {"status": 500, "msg": message}
    assert len(pending(db)) == before


# -- item 17: no value that could be a key is echoed ---------------------------------------------------------

SECRET = "SECRETKEY0123456789abcdef"


def test_a_key_in_a_csv_count_column_is_never_echoed_in_the_log_or_the_report(db, tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text(f"stat,count\nlogins,{SECRET}\n")
    result = run_cli(db, "ingest", str(path))
    assert result.returncode == 2
    report = (tmp_path / ".rejected" / "mixed.csv.error.txt").read_text()
    assert "count 'SEC…' (25 characters) is not a number" in report
    assert "SECRETK" not in report and "SECRETK" not in result.stderr + result.stdout


def test_a_csv_without_a_header_row_does_not_echo_the_key_in_its_first_row(db, tmp_path):
    path = tmp_path / "headless.csv"
    path.write_text(f"{SECRET},logins,1\n")
    assert run_cli(db, "ingest", str(path)).returncode == 2
    report = (tmp_path / ".rejected" / "headless.csv.error.txt").read_text()
    assert "unknown column 'sec…' (25 characters)" in report and "secretk" not in report.lower()


@pytest.mark.parametrize("line", [
    {"stat": "s", "count": SECRET, "t": T0}, {"stat": "s", "value": 1, "t": T0, SECRET: 1},
    {"ezkey": "k", "data": [], SECRET: 1},
])
def test_import_never_echoes_a_value_that_could_be_a_key(db, line):
    result = run_cli(db, "import", "-", input=(json.dumps(line) + "\n").encode())
    assert result.returncode == 2 and "'SEC…' (25 characters)" in result.stderr
    assert "SECRETK" not in result.stderr


def test_the_relay_never_echoes_a_value_that_could_be_a_key(shared_relay):
    relay, _ = shared_relay
    answer = http("POST", relay.url + "/ez", data={"ezkey": "k", "stat": "s", "count": SECRET})
    assert answer.json() == {"status": 500, "msg": "count 'SEC…' (25 characters) is not a number"}


@pytest.mark.parametrize("endpoint", ["https://user:hunter2@127.0.0.1:9", "http://127.0.0.1:9/?ezkey=hunter2",
                                      "ftp://hunter2@127.0.0.1"])
def test_doctor_never_prints_credentials_of_the_endpoint(db, endpoint):
    result = run_cli(db, "doctor", env=cli_env(db, SPOOL_ENDPOINT=endpoint))
    assert "endpoint" in result.stdout + result.stderr
    assert "hunter2" not in result.stdout + result.stderr
    assert "***" in result.stdout + result.stderr


# -- item 13: a gzip bomb costs no more memory as CSV than as JSON lines -------------------------------------

# Run `spool ingest` and report the peak RSS of that very process (VmHWM is reset by exec, unlike ru_maxrss,
# which would carry the forking test process's own peak).
MEASURED_INGEST = """
import runpy, sys
sys.argv = ["spool", "ingest", sys.argv[1]]
try:
    runpy.run_module("spool", run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print("peak kB", hwm.split()[1], file=sys.stderr)
"""


@pytest.mark.parametrize(("name", "head"), [("bomb.csv.gz", b"stat,count\nx,"), ("bomb.jsonl.gz", b'{"stat": "')])
def test_a_gzip_bomb_with_no_newline_is_rejected_in_bounded_memory(db, tmp_path, name, head):
    # 300 MiB of one byte, no newline, in 0.3 MB: gzip members, concatenated, read as one stream.
    path = tmp_path / name
    path.write_bytes(gzip.compress(head) + gzip.compress(b"a" * (1 << 20), 9) * 300)
    result = subprocess.run([sys.executable, "-c", MEASURED_INGEST, str(path)], capture_output=True, text=True,
                            env=cli_env(db), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "line is longer than 1048576 bytes" in (tmp_path / ".rejected" / f"{name}.error.txt").read_text()
    peak_mib = int(result.stderr.split("peak kB")[1].split()[0]) / 1024
    assert peak_mib < 200, f"peak RSS {peak_mib:.0f} MiB"


def test_a_form_with_a_blank_t_is_refused_not_dropped(shared_relay):
    # Found by the relay fuzz test: "t= " raised outside the refusal handling and the connection was cut.
    relay, _ = shared_relay
    answer = http("POST", relay.url + "/ez", data="ezkey=k&stat=s&count=1&t=%20")
    assert answer.status_code == 200 and answer.json()["status"] == 500
    assert "t" in answer.json()["msg"] and "not a number" in answer.json()["msg"]
