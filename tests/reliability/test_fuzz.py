"""Fuzzing with Hypothesis: hostile input never crashes spool or escapes as a traceback; refusals carry reasons."""

from __future__ import annotations

import gzip
import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spool.cli import main
from spool.errors import InvalidRecord
from spool.formats import SUFFIXES, read_json_stream, reader_for, to_records
from spool.store import Store
from spool.watch import Ingestor

EXAMPLES = 300 if os.environ.get("SPOOL_LONG") else 60
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Text as producers really send it: any character, lone surrogates included (JSON's "\ud800"; encoded with
# surrogatepass they are also bytes that are not UTF-8).
lone_surrogates = st.integers(min_value=0xD800, max_value=0xDFFF).map(chr)
odd_text = st.text(st.one_of(st.characters(), lone_surrogates), max_size=20)
json_ish = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["stat", "count", "value", "t", "ezkey", "key", "ukey", "data", "x"]), inner, max_size=5),
    max_leaves=12)
lines = st.lists(st.one_of(json_ish.map(lambda v: __import__("json").dumps(v)), st.text(max_size=60), odd_text),
                 max_size=12).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))
raw_bytes = st.binary(max_size=400)


@fuzz
@given(data=st.one_of(lines, raw_bytes), ezkey=st.none() | odd_text)
def test_import_parsing_never_raises_anything_but_a_refusal_with_a_reason(tmp_path_factory, data, ezkey):
    errors = []
    try:
        records = list(to_records(read_json_stream(io.BytesIO(data)), ezkey=ezkey, clock_now=1_700_000_000,
                                  on_invalid=errors.append))
    except InvalidRecord as exc:  # only a bad default key is refused before any record
        assert exc.field == "ezkey" and exc.reason
        return
    assert all(record[6] >= 1_000_000_000 for record in records)
    assert all(isinstance(e, InvalidRecord) and e.reason and e.reason.isprintable() for e in errors)
    with Store(tmp_path_factory.mktemp("import") / "spool.db") as store:
        assert store.append(records) == len(records)  # whatever validation took, SQLite can store


@fuzz
@given(data=st.one_of(lines, raw_bytes), suffix=st.sampled_from(SUFFIXES), compress=st.booleans())
def test_every_file_format_takes_any_bytes_without_crashing(tmp_path_factory, data, suffix, compress):
    folder = tmp_path_factory.mktemp("drop")
    if suffix.endswith(".gz") and compress:
        data = gzip.compress(data)
    path = folder / f"fuzz{suffix}"
    path.write_bytes(data)
    assert reader_for(path.name) is not None
    with Store(folder / "spool.db") as store:
        result = Ingestor(store, skip_invalid=True).ingest(path)
    assert result.outcome in ("ingested", "rejected")
    assert result.outcome == "ingested" or all(e.reason for e in result.errors)


tokens = st.sampled_from(["add", "import", "status", "dead", "list", "requeue", "purge", "ingest", "--count",
                          "--value", "--t", "--key", "--ukey", "--ezkey", "--json", "--all", "--limit",
                          "--skip-invalid", "--keep", "-", "1", "-1", "nan", "1e999", "1700000000",
                          "1700000000000", "x~y,z", "", "ü📈", "--help", "--nope"])
argv = st.lists(st.one_of(tokens, st.text(max_size=12)), max_size=7)


@fuzz
@given(args=argv)
def test_the_cli_never_shows_a_traceback(args, capsys, monkeypatch):
    folder = Path(tempfile.mkdtemp(prefix="spool-fuzz-"))
    monkeypatch.setenv("SPOOL_DB", str(folder / "spool.db"))
    monkeypatch.chdir(folder)  # relative file names land here
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"")))  # a real stdin has a binary buffer
    with pytest.raises(SystemExit) as exited:
        main(["--db", str(folder / "spool.db"), *args])
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "internal error" not in out.err
    if exited.value.code not in (0, None):
        assert out.err.strip(), "a failure must say why"
        assert out.err.strip().splitlines()[-1].startswith("spool: error: ")


@fuzz
@given(packet=st.one_of(raw_bytes, st.lists(st.one_of(st.text(max_size=30), odd_text), max_size=8).map(
    lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass"))))
def test_statsd_packets_never_crash_the_parser_and_every_record_is_valid(packet):
    from spool.records import check_stat
    from spool.relay import StatsdReader

    reader = StatsdReader("p.", set_window=60, t_floor=1_000_000_000)
    records = reader.read(packet, 1_800_000_000) + reader.flush(1_800_000_000, everything=True)
    assert all(n >= 0 for n in reader.counts.values())
    for record in records:
        assert check_stat(record.stat) and 1_000_000_000 <= record.t <= 4_102_444_800


@pytest.fixture(scope="module")
def live_relay(tmp_path_factory):
    from spool.config import RelaySettings
    from spool.relay import Relay

    folder = tmp_path_factory.mktemp("relay")
    store = Store(folder / "spool.db")
    relay = Relay(RelaySettings(enabled=True, listen="127.0.0.1:0"), store).start()
    yield relay
    relay.stop()
    store.close()


@fuzz
@given(path=st.sampled_from(["/ez", "/c", "/v", "/", "/x", "/ez?vb=1"]), body=st.one_of(raw_bytes, lines),
       content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain", ""]))
def test_any_http_request_gets_an_answer_never_a_crash(live_relay, path, body, content_type):
    import requests

    answer = requests.post(live_relay.url + path, data=body, headers={"Content-Type": content_type}, timeout=10)
    assert answer.status_code in (200, 204, 404)
    if answer.status_code == 200 and path != "/":
        assert answer.json()["status"] in (200, 500)
        assert answer.json()["status"] == 200 or answer.json()["msg"]
    assert live_relay.writer.last_error is None


form_values = st.one_of(odd_text, st.sampled_from(["", " ", "1", "1.5", "1700000000", "nan", "k" * 300]))
form_fields = st.dictionaries(st.sampled_from(["ezkey", "email", "stat", "count", "value", "t", "key", "ukey",
                                               "vb"]), form_values, max_size=6)


@fuzz
@given(path=st.sampled_from(["/ez", "/c", "/v"]), fields=form_fields, as_json=st.booleans(),
       items=st.lists(st.dictionaries(st.sampled_from(["stat", "count", "value", "t"]),
                                      st.one_of(form_values, st.integers(), st.floats()), max_size=4), max_size=3))
def test_any_request_fields_with_odd_text_get_stathats_answer(live_relay, path, fields, as_json, items):
    """Fields with lone surrogates (JSON escapes; in forms, percent-encoded bytes that are not UTF-8)."""
    import json
    from urllib.parse import quote

    import requests

    if as_json:
        body = json.dumps({**{k: v for k, v in fields.items() if k in ("ezkey", "email")}, "data": items}).encode()
        headers = {"Content-Type": "application/json"}
    else:
        body = "&".join(f"{quote(k)}={quote(v, errors='surrogatepass')}" for k, v in fields.items()).encode()
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
    answer = requests.post(live_relay.url + path, data=body, headers=headers, timeout=10)
    assert answer.status_code in (200, 204), answer.text
    if answer.status_code == 200:
        assert answer.json()["status"] in (200, 500)
        assert answer.json()["status"] == 200 or answer.json()["msg"].isprintable()
    assert live_relay.writer.last_error is None


# -- receiver answers: whatever comes back is classified (sent, refused, transient, misconfigured) ---------------

answer_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([200, "200", "200 ", 200.0, 500, "500", -1, 2**70]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
answers = st.fixed_dictionaries({}, optional={"status": answer_values, "msg": answer_values,
                                              "multiple": answer_values}).map(
    lambda d: __import__("json").dumps(d, allow_nan=True))
nested = st.integers(min_value=1, max_value=200_000).map(lambda n: '{"status":' + "[" * n + "]" * n + "}")
bodies = st.one_of(answers, nested, st.text(max_size=200), raw_bytes.map(lambda b: b.decode("latin-1")),
                   st.integers(min_value=0, max_value=3).map(lambda n: '{"status":200,"msg":"' + "x" * (10**n) * 100))


odd_retry_after = st.sampled_from(["1e999", "-5", "nan", "Wed, 21 Oct 99999 07:28:00 GMT",
                                   "Mon, 01 Jan 0001 00:00:00 GMT"])


@fuzz
@given(status=st.integers(min_value=100, max_value=599), body=bodies,
       retry_after=st.none() | st.text(max_size=40) | odd_retry_after,
       sent=st.none() | st.integers(min_value=1, max_value=1000))
def test_any_answer_is_classified_never_raised_as_anything_else(status, body, retry_after, sent):
    from spool.errors import EndpointError, Refused, TransientError
    from spool.stathat import classify_response

    try:
        taken = classify_response(status, body, retry_after, sent=sent)
    except (TransientError, EndpointError) as exc:
        assert str(exc).isprintable()
        return
    except Refused as exc:
        assert str(exc) and str(exc).isprintable()
        return
    assert taken is None or (isinstance(taken, int) and taken >= (sent or 0))
