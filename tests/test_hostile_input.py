"""Odd bytes from producers: broken first lines, lone surrogates, odd keys, gzip bombs, keys in the wrong column."""

from __future__ import annotations

import io
import json

import pytest

from spool.formats import read_json_stream, to_records
from spool.store import Store

from .conftest import T0, run_cli

STATHAT_EXAMPLE = """{
    "ezkey": "XXXYYYZZZ",
    "data": [
        {"stat": "page view", "count": 2},
        {"stat": "messages sent~total,female,europe", "count": 1},
        {"stat": "request time~total,messages", "value": 23.094},
        {"stat": "ws0: load average", "value": 0.732, "t": 1363118126},
    ]
}
"""


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
    records = list(to_records(read_json_stream(io.BytesIO(STATHAT_EXAMPLE.encode())), on_invalid=errors.append))
    assert records == []
    assert len(errors) == 1 and "not valid JSON" in errors[0].reason
    assert errors[0].line == 8  # the line of the "]" after the trailing comma, not the first line
