"""Record validation: every rule names its field and says what is wrong."""

from __future__ import annotations

import math

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from spool.errors import InvalidRecord
from spool.records import (
    COUNT,
    VALUE,
    Record,
    check_key,
    expand_stat,
    fast_row,
    fast_rows,
    make_record,
    number_from_text,
    parse_record,
    record_rows,
)

T = 1_700_000_000


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"stat": "", "count": 1}, "stat", "stat is empty"),
    ({"stat": "   ", "count": 1}, "stat", "stat is empty"),
    ({"stat": "x" * 256, "count": 1}, "stat", "256 characters long; the limit is 255"),
    ({"stat": "tab\there", "count": 1}, "stat", "control character"),
    ({"stat": "nul\x00", "count": 1}, "stat", "control character"),
    ({"stat": "line\u2028sep", "count": 1}, "stat", "control character"),
    ({"stat": 42, "count": 1}, "stat", "stat must be a string"),
    ({"stat": "a~b~c", "count": 1}, "stat", "more than one '~'"),
    ({"stat": "~b,c", "count": 1}, "stat", "empty prefix"),
    ({"stat": "a~", "count": 1}, "stat", "empty name"),
    ({"stat": "a~b,,c", "count": 1}, "stat", "empty name"),
    ({"stat": "a~b, ", "count": 1}, "stat", "empty name"),
    ({"stat": "p" * 200 + "~" + "n" * 60, "count": 1}, "stat", "over 255 characters"),
    ({"stat": "p~" + ",".join(["n"] * 3000), "count": 1}, "stat", "limit for a ~ form"),
    ({"stat": "s"}, "count", "give count or value"),
    ({"stat": "s", "count": 1, "value": 2}, "count", "not both"),
    ({"stat": "s", "count": float("nan")}, "count", "finite"),
    ({"stat": "s", "value": float("inf")}, "value", "finite"),
    ({"stat": "s", "value": "3"}, "value", "must be a number, not the string '3'"),
    ({"stat": "s", "value": True}, "value", "must be a number, not a boolean"),
    ({"stat": "s", "count": 2**64}, "count", "out of range"),
    ({"stat": "s", "count": 1, "t": 1.5e9 + 0.5}, "t", "whole unix seconds"),
    ({"stat": "s", "count": 1, "t": -5}, "t", "negative"),
    ({"stat": "s", "count": 1, "t": 1_700_000_000_000}, "t", "looks like milliseconds"),
    ({"stat": "s", "count": 1, "t": 1_700_000_000_000_000}, "t", "looks like milliseconds"),
    ({"stat": "s", "count": 1, "t": 5_000_000_000}, "t", "after the year 2100"),
    ({"stat": "s", "count": 1, "t": 86400}, "t", "before 1000000000"),
    ({"stat": "s", "count": 1, "t": "1700000000"}, "t", "must be an integer"),
    ({"stat": "s", "count": 1, "t": float("nan")}, "t", "must be an integer"),
    ({"stat": "s", "count": 1, "ezkey": ""}, "ezkey", "ezkey is empty"),
    ({"stat": "s", "count": 1, "key": "k", "ukey": "u"}, "stat", "not both"),
    ({"stat": "s", "count": 1, "key": "k"}, "stat", "not both"),
    ({"stat": "s", "count": 1, "ukey": "u"}, "stat", "not both"),
    ({"key": " ", "ukey": "u", "count": 1}, "key", "key is empty"),
    ({"key": "k", "count": 1}, "ukey", "ukey is missing"),
    ({"ukey": "u", "count": 1}, "key", "key is missing"),
    ({"key": "k", "ukey": "u", "count": 1, "ezkey": "e"}, "ezkey", "belongs to EZ records"),
    ({"count": 1}, "stat", "give stat (EZ API) or key and ukey"),
    ({"stat": "s", "count": 1, "vaule": 2}, "vaule", "unknown field 'vaule', did you mean 'value'?"),
])
def test_invalid_records_are_refused_naming_the_field(fields, field, message):
    with pytest.raises(InvalidRecord) as caught:
        parse_record(fields, clock_now=T)
    assert caught.value.field == field
    assert message in str(caught.value)


def test_a_refused_key_is_never_repeated_in_the_message():
    secret = "sekrit\x01key"
    with pytest.raises(InvalidRecord) as caught:
        parse_record({"stat": "s", "count": 1, "ezkey": secret}, clock_now=T)
    assert "sekrit" not in str(caught.value)


@pytest.mark.parametrize("stat", [
    "messages sent", "ünïcödé stat 📈", "日本語の統計", "a" * 255, "prefix~one,two,three", "x~" + "y" * 253,
    "with & and = and + signs", "spaces  inside",
])
def test_valid_stat_names_are_kept_exactly(stat):
    record = parse_record({"stat": stat, "value": 0.5, "t": T})
    assert record.stat == stat


def test_a_record_without_t_is_stamped_with_the_time_of_append():
    record = make_record(stat="s", count=1, clock_now=T + 7)
    assert record.t == T + 7


@pytest.mark.parametrize("fields", [{"key": "k", "ukey": "u"}, {"key": "k", "ukey": "u", "count": None}])
def test_a_classic_record_with_neither_count_nor_value_is_a_counter_hit_of_one(fields):
    assert parse_record({**fields, "t": T}) == make_record(key="k", ukey="u", count=1, t=T)


def test_an_ez_record_with_neither_count_nor_value_is_still_refused():
    with pytest.raises(InvalidRecord, match="give count or value"):
        parse_record({"stat": "s", "t": T})


def test_a_whole_float_t_is_taken_as_integer_seconds():
    assert parse_record({"stat": "s", "count": 1, "t": 1_700_000_000.0}).t == 1_700_000_000


def test_the_email_alias_names_the_ezkey():
    assert parse_record({"stat": "s", "count": 1, "email": "me@example.com"}).ezkey == "me@example.com"


def test_a_batch_ezkey_applies_only_to_ez_records_without_their_own():
    assert parse_record({"stat": "s", "count": 1}, ezkey="batch").ezkey == "batch"
    assert parse_record({"stat": "s", "count": 1, "ezkey": "own"}, ezkey="batch").ezkey == "own"
    classic = parse_record({"key": "k", "ukey": "u", "count": 1}, ezkey="batch")
    assert classic.ezkey is None and classic.key == "k"


def test_the_tilde_form_expands_to_prefix_space_name():
    assert expand_stat("messages sent~total,female") == ["messages sent total", "messages sent female"]
    assert expand_stat("plain") == ["plain"]


finite = st.one_of(st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1),
                   st.floats(allow_nan=False, allow_infinity=False))
names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"), blacklist_characters="~"),
                min_size=1, max_size=255).filter(str.strip)


@given(stat=names, number=finite, kind=st.sampled_from([COUNT, VALUE]),
       t=st.integers(min_value=1_000_000_000, max_value=4_102_444_800), ezkey=st.none() | st.just("k"))
def test_every_valid_record_round_trips_through_its_dict_form(stat, number, kind, t, ezkey):
    record = Record(stat, None, None, ezkey, kind, number, t)
    assert parse_record(record.to_dict()) == record


@given(st.dictionaries(st.sampled_from(["stat", "count", "value", "t", "ezkey", "key", "ukey", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=300),
                                 st.lists(st.integers(), max_size=2))))
def test_arbitrary_objects_are_either_valid_records_or_refused_with_a_reason(obj):
    try:
        record = parse_record(obj, clock_now=T)
    except InvalidRecord as exc:
        assert exc.reason
        return
    assert isinstance(record.number, int | float) and math.isfinite(record.number)
    assert 1_000_000_000 <= record.t <= 4_102_444_800
    assert (record.stat is None) == (record.key is not None)


plain_names = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=0, max_size=260)
surrogates = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
with_surrogates = st.text(st.one_of(st.characters(), surrogates), min_size=1, max_size=20)
any_stat = st.one_of(plain_names, names, st.text(max_size=300), with_surrogates)
any_ezkey = st.one_of(st.none(), st.just("k"), with_surrogates, st.sampled_from(["", " ", "k" * 256, "k\x00"]))
any_t = st.one_of(st.integers(min_value=1_000_000_000 - 5, max_value=4_102_444_800 + 5),  # mostly valid
                  st.one_of(st.integers(min_value=-10, max_value=10**12), st.floats(), st.text(max_size=3)))
any_number = st.one_of(finite, st.one_of(st.integers(min_value=-(2**64), max_value=2**64), st.floats(),
                                         st.booleans(), st.none(), st.text(max_size=3)))
canonical_shape = st.builds(lambda stat, t, key, number: {"stat": stat, "t": t, key: number},
                            any_stat, any_t, st.sampled_from(["count", "value"]), any_number)
odd_shape = st.fixed_dictionaries({"stat": any_stat, "t": any_t},
                                  optional={"count": any_number, "value": any_number, "ezkey": st.text(max_size=5),
                                            "x": st.integers()})
near_valid = st.builds(lambda stat, t, key, number: {"stat": stat, "t": t, key: number},
                       plain_names, st.integers(min_value=1_000_000_000 - 2, max_value=4_102_444_800 + 2),
                       st.sampled_from(["count", "value"]), finite)
record_like = st.one_of(near_valid, canonical_shape, odd_shape)


@given(record_like, any_ezkey)
@example({"stat": "s", "t": 4_102_444_801, "count": 1}, None)  # one past the last valid t
@example({"stat": "s", "t": 999_999_999, "count": 1}, None)  # one before the floor
@example({"stat": "a~", "t": T, "count": 1}, None)  # broken ~ forms
@example({"stat": "~b", "t": T, "count": 1}, None)
@example({"stat": " ", "t": T, "count": 1}, None)
@example({"stat": "", "t": T, "count": 1}, None)
@example({"stat": "x" * 256, "t": T, "count": 1}, None)
@example({"stat": "s", "t": T, "count": 2**63}, None)
@example({"stat": "s", "t": T, "value": float("nan")}, None)
@example({"stat": "s", "t": T, "count": True}, None)
@example({"stat": "s", "t": True, "count": 1}, None)
@example({"stat": "s", "t": T, "count": None, "value": 1}, None)
@example({"stat": "a\ud800", "t": T, "count": 1}, None)
@example({"stat": "s", "t": T, "count": 1}, "k\udfff")
def test_the_fast_path_accepts_only_what_the_full_validator_accepts_and_builds_the_same_row(obj, ezkey):
    try:
        if ezkey is not None:
            check_key(ezkey, "ezkey")
    except InvalidRecord:
        # A shared key is checked once, before any record (fast_row takes it as checked): refused up front.
        with pytest.raises(InvalidRecord):
            list(record_rows([obj], ezkey=ezkey))
        return
    row = fast_row(obj, ezkey, 1_000_000_000)
    assert fast_rows([obj], ezkey, 1_000_000_000) == [row]  # the list form (batched appends) is the same rule
    assert row is None or type(row[4]) is int  # a plain int: sqlite3 binds an IntEnum the slow way
    event("fast path took it" if row is not None else "left to the full validator")
    if row is None:
        return
    try:
        assert tuple(parse_record(obj, ezkey=ezkey)) == row
    except InvalidRecord as exc:
        raise AssertionError(f"the fast path accepted {obj!r}, which is invalid: {exc}") from None


def test_record_rows_gives_the_shared_ezkey_to_the_records_of_the_fast_path():
    rows = list(record_rows([{"stat": "a", "count": 1, "t": T}, {"stat": "b", "count": 1}], ezkey="shared",
                            clock_now=T))
    assert [row[3] for row in rows] == ["shared", "shared"]


def test_record_rows_stamps_a_record_without_t_with_the_clock_it_is_given():
    rows = list(record_rows([{"stat": "a", "count": 1}, {"stat": "b", "value": 2, "ezkey": "own"}], clock_now=T))
    assert [row[6] for row in rows] == [T, T]


@pytest.mark.parametrize("obj", [{"stat": "a", "count": 1, "t": T - 1},
                                 {"stat": "a", "count": 1, "t": T - 1, "ezkey": "own"}])
def test_record_rows_refuses_a_t_before_the_configured_floor_on_every_path(obj):
    with pytest.raises(InvalidRecord, match="configured floor") as caught:
        list(record_rows([obj], t_floor=T))
    assert caught.value.field == "t"


def test_a_number_that_is_not_one_names_its_field():
    with pytest.raises(InvalidRecord, match="is not a number") as caught:
        number_from_text(" 12abc ", "value")
    assert caught.value.field == "value"


def test_record_rows_validates_every_record_of_a_large_stream_including_the_slow_ones():
    objs = [{"stat": "plain", "count": i, "t": T} if i % 3 else {"stat": "a~b,c", "value": i, "t": T}
            for i in range(10_000)]
    rows = list(record_rows(objs))
    assert len(rows) == 10_000 and rows[1] == ("plain", None, None, None, COUNT, 1, T)
    assert rows[3] == Record("a~b,c", None, None, None, VALUE, 3, T)
    with pytest.raises(InvalidRecord):
        list(record_rows([*objs, {"stat": "", "count": 1, "t": T}]))


# -- the number syntax: what StatHat reads, on every path that takes a number as text ------------------------

@pytest.mark.parametrize(("text", "number"), [
    ("9", 9), ("0.375", 0.375), ("13.947", 13.947),  # StatHat's own examples
    ("-1.5", -1.5), ("+3", 3), ("-0", 0), ("007", 7),
    (".5", 0.5), ("5.", 5.0), ("1e3", 1000.0), ("1E3", 1000.0), ("1e+20", 1e20), ("1.5e-05", 1.5e-05),
    (" 12 ", 12), ("\t7\t", 7), ("9\r\n", 9),  # ASCII spaces, tabs and line ends around it
    ("9223372036854775807", 2**63 - 1),  # syntax only: the range is checked with the record
])
def test_a_number_stathat_reads_is_read_the_same(text, number):
    parsed = number_from_text(text, "count")
    assert parsed == number and type(parsed) is type(number)


@pytest.mark.parametrize(("text", "why"), [
    ("1_000", "'_'"), ("1_0.5", "'_'"), ("1e1_0", "'_'"),  # Python's digit grouping
    ("١٢٣", "ASCII digits"), ("１２", "ASCII digits"), ("٣.٥", "ASCII digits"), ("1e٣", "ASCII digits"),
    ("\u20035", "spaces"), ("5\u2003", "spaces"), ("\xa05", "spaces"), ("\x1c5", "spaces"), ("5\x1f", "spaces"),
    ("\x0b5", "spaces"), ("5\x0c", "spaces"),  # whitespace to Python, not to StatHat
    ("inf", "finite"), ("-Infinity", "finite"), ("nan", "finite"), ("+NaN", "finite"), (" inf ", "finite"),
    ("", None), (" ", None), ("abc", None), ("0x10", None), ("0b1", None), ("1j", None), ("1e", None),
    ("e3", None), (".", None), ("-", None), ("+-1", None), ("1.2.3", None), ("1,5", None), ("1 000", None),
    ("²", None), ("5\x00", None), ("12abc", None),
])
def test_number_syntax_stathat_refuses_is_refused_naming_the_field_and_why(text, why):
    with pytest.raises(InvalidRecord, match="is not a number") as caught:
        number_from_text(text, "count")
    assert caught.value.field == "count" and caught.value.reason.startswith("count ")
    if why is not None:
        assert why in caught.value.reason


@given(st.text(max_size=12))
@example("1_000")
@example("١٢٣")
@example("\u2003 5")
def test_no_text_outside_ascii_and_no_digit_grouping_is_ever_a_number(text):
    try:
        number = number_from_text(text, "value")
    except InvalidRecord:
        return
    assert text.isascii() and "_" not in text and math.isfinite(number)
    assert number == float(text)  # a subset of what Python reads, read the same


@given(finite)
def test_every_number_spool_writes_as_text_reads_back_unchanged(number):
    # Classic records go to StatHat as form fields (str of the number); exports and CSV round-trip too.
    assert number_from_text(str(number), "value") == number
    assert number_from_text(repr(number), "value") == number


def test_a_number_of_more_digits_than_python_converts_is_refused_not_an_internal_error():
    with pytest.raises(InvalidRecord, match="count"):
        make_record(stat="s", count=number_from_text("9" * 5000, "count"))
