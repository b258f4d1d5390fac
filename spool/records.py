"""The stat record: its type, validation and the rules for names, numbers and times. Pure: no I/O."""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from enum import IntEnum
from typing import Any, NamedTuple

from spool.errors import InvalidRecord, masked, printable


class Kind(IntEnum):
    """What a record's number is: a count (StatHat sums them per bucket) or a value (averaged)."""

    COUNT = 0
    VALUE = 1

    @property
    def field(self) -> str:
        """The record field (and API parameter) that carries the number: "count" or "value"."""
        return self.name.lower()


COUNT, VALUE = Kind.COUNT, Kind.VALUE
KIND_NAMES = ("count", "value")  # indexed by kind, as stored

MAX_NAME = 255  # StatHat's limit for one stat name (and for each name a `~` form expands to)
MAX_MULTI = 4096  # a `prefix~a,b,...` string as a whole; far beyond any real use, short of abuse
MAX_KEY = 255
# `t` is unix seconds. Anything from 1e11 on is in the year 5138 or later as seconds, but is "now" as
# milliseconds, so say that. Between 2100 and that, it is most likely a bug; refuse it too.
T_MAX = 4_102_444_800  # 2100-01-01T00:00:00Z
T_LOOKS_LIKE_MS = 100_000_000_000
T_FLOOR = 1_000_000_000  # 2001-09-09: old enough for any real backfill, new enough to catch a 1970 clock
# A system clock before this release of spool is wrong (a box without a real-time clock boots in 1970, or at
# its last shutdown). Records spool stamps then are HELD: stamped 0, kept with the boot's monotonic time, and
# re-stamped once the clock is sane (see Store.restamp_held). An explicit t is never 0 (T_FLOOR refuses it).
CLOCK_SANE_AFTER = 1_790_000_000  # 2026-09-21
HELD_T = 0
INT64_MAX = 2**63 - 1

# Compiled on first use (re caches it): most records never reach the slow path that needs it.
_CONTROL = r"[\x00-\x1f\x7f-\x9f\u2028\u2029]"
# A lone surrogate (JSON's "\ud800", Python's surrogateescape) is no character at all: SQLite cannot store it.
_SURROGATE = r"[\ud800-\udfff]"
_SURROGATE_REASON = "contains a lone surrogate (not valid Unicode)"
_EZ_FIELDS = frozenset({"stat", "count", "value", "t", "ezkey", "email"})
_CLASSIC_FIELDS = frozenset({"key", "ukey", "count", "value", "t"})
_ALL_FIELDS = _EZ_FIELDS | _CLASSIC_FIELDS


class Record(NamedTuple):
    """One stat observation, validated; field order is the store's column order."""

    stat: str | None  # EZ stat name; None for a classic record
    key: str | None  # classic: the stat's private key
    ukey: str | None  # classic: the user key
    ezkey: str | None  # EZ: the record's own account key; None means "the configured one"
    kind: int  # COUNT or VALUE
    number: int | float
    t: int  # unix seconds, always present

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-lines form that `parse_record` reads back unchanged."""
        out: dict[str, Any] = {"key": self.key, "ukey": self.ukey} if self.stat is None else {"stat": self.stat}
        out[KIND_NAMES[self.kind]] = self.number
        out["t"] = self.t
        if self.ezkey is not None:
            out["ezkey"] = self.ezkey
        return out


def stamp(wall: float) -> int:
    """Return the t spool stamps at wall-clock time `wall`: whole seconds, or HELD_T if the clock is wrong."""
    return int(wall) if wall >= CLOCK_SANE_AFTER else HELD_T


def now() -> int:
    """Return the t to stamp on a record now (see stamp)."""
    return stamp(time.time())


def check_stat(stat: object) -> str:
    """Return `stat` if it is a valid StatHat stat name (plain or `prefix~a,b` form), else raise."""
    if not isinstance(stat, str):
        raise InvalidRecord(f"stat must be a string, not {_type_name(stat)}", field="stat")
    if "~" not in stat and len(stat) <= MAX_NAME and stat.isprintable() and stat.strip():
        return stat  # the common case, decided by C-speed checks alone
    if not stat.strip():
        raise InvalidRecord("stat is empty", field="stat")
    if re.search(_SURROGATE, stat):
        raise InvalidRecord(f"stat {_SURROGATE_REASON}", field="stat")
    if re.search(_CONTROL, stat):
        raise InvalidRecord("stat contains a control character", field="stat")
    if "~" not in stat:
        if len(stat) > MAX_NAME:
            raise InvalidRecord(f"stat is {len(stat)} characters long; the limit is {MAX_NAME}", field="stat")
        return stat
    if len(stat) > MAX_MULTI:
        raise InvalidRecord(f"stat is {len(stat)} characters long; the limit for a ~ form is {MAX_MULTI}",
                            field="stat")
    prefix, _, names = stat.partition("~")
    if "~" in names:
        raise InvalidRecord("stat has more than one '~'; the form is 'prefix~name1,name2'", field="stat")
    if not prefix.strip():
        raise InvalidRecord("stat has an empty prefix before '~'", field="stat")
    for name in names.split(","):
        if not name.strip():
            raise InvalidRecord("stat has an empty name in its '~' list", field="stat")
        if len(prefix) + 1 + len(name) > MAX_NAME:
            raise InvalidRecord(f"stat expands to a name of {len(prefix) + 1 + len(name)} characters, over "
                                f"{MAX_NAME} characters (its '~' list names {masked(name)})", field="stat")
    return stat


def unknown_field(name: str, known: Iterable[str], what: str = "field") -> str:
    """Say that `name` is no known field: "unknown field 'vaule', did you mean 'value'?".

    A misspelt name (close to a known one) is shown as written, so the typo shows; any other is quoted as input
    is (errors.masked): what stands where a name should may be a value, a key (a CSV file without its header
    row, a key written as a JSON name).
    """
    hint = did_you_mean(name, known)
    shown = f"'{printable(name)}'" if hint and len(name) <= 40 else masked(name)
    return f"unknown {what} {shown}{hint}"


def check_number(number: object, field: str) -> int | float:
    """Return `number` if it is a finite int or float StatHat can take, else raise."""
    if type(number) is int:
        if -INT64_MAX <= number <= INT64_MAX:
            return number
        raise InvalidRecord(f"{field} {number} is out of range", field=field)
    if type(number) is float:
        if math.isfinite(number):
            return number
        raise InvalidRecord(f"{field} must be a finite number, not {number}", field=field)
    if isinstance(number, bool) or not isinstance(number, int | float):
        raise InvalidRecord(f"{field} must be a number, not {_type_name(number)}", field=field)
    return check_number(int(number) if isinstance(number, int) else float(number), field)


def check_t(t: object, floor: int = T_FLOOR) -> int:
    """Return `t` as whole unix seconds if it is a plausible time, else raise saying what is wrong."""
    if type(t) is int:
        seconds = t
    elif type(t) is float and math.isfinite(t):
        if not t.is_integer():
            raise InvalidRecord(f"t must be whole unix seconds, not {t}", field="t")
        seconds = int(t)
    else:
        raise InvalidRecord(f"t must be an integer (unix seconds), not {_type_name(t)}", field="t")
    if seconds >= T_LOOKS_LIKE_MS:
        raise InvalidRecord(f"t {seconds} looks like milliseconds; t is unix seconds "
                            f"(did you mean {seconds // 1000}?)", field="t")
    if seconds > T_MAX:
        raise InvalidRecord(f"t {seconds} is after the year 2100; t is unix seconds", field="t")
    if seconds < 0:
        raise InvalidRecord(f"t {seconds} is negative; t is unix seconds", field="t")
    if seconds < floor:
        raise InvalidRecord(f"t {seconds} is before {floor} (the configured floor); "
                            "is the clock that stamped it wrong?", field="t")
    return seconds


def check_key(key: object, field: str) -> str:
    """Return `key` if it is a usable key string; the message never repeats the key itself.

    The one rule for keys (ezkey, email, key, ukey) on every path: a record's own, a StatHat body's, a
    default given to an import or a batch, the configured key. Callers check a key shared by many records once,
    before use.
    """
    if not isinstance(key, str):
        raise InvalidRecord(f"{field} must be a string, not {_type_name(key)}", field=field)
    if not key.strip():
        raise InvalidRecord(f"{field} is empty", field=field)
    if len(key) > MAX_KEY:
        raise InvalidRecord(f"{field} is {len(key)} characters long; a key is at most {MAX_KEY}", field=field)
    if re.search(_SURROGATE, key):
        raise InvalidRecord(f"{field} {_SURROGATE_REASON}", field=field)
    if re.search(_CONTROL, key):
        raise InvalidRecord(f"{field} has control characters; it is not a valid key", field=field)
    if not key.isascii():  # invisible in every terminal and editor: a key saved with a BOM looks right and is not
        import unicodedata

        if any(unicodedata.category(c) == "Cf" for c in key):
            raise InvalidRecord(f"{field} has an invisible format character (a byte-order mark, a zero-width "
                                "space); it is not a valid key", field=field)
    return key


def make_record(*, stat: object = None, count: object = None, value: object = None, t: object = None,
                ezkey: object = None, key: object = None, ukey: object = None,
                clock_now: int | None = None, t_floor: int = T_FLOOR) -> Record:
    """Validate one record's fields and return it; a missing `t` is stamped with the current time."""
    if count is not None and value is not None:
        raise InvalidRecord("give count or value, not both", field="count")
    if count is not None:
        kind, number = COUNT, check_number(count, "count")
    elif value is not None:
        kind, number = VALUE, check_number(value, "value")
    else:
        raise InvalidRecord("give count or value", field="count")
    seconds = (clock_now if clock_now is not None else now()) if t is None else check_t(t, t_floor)
    if stat is not None:
        if key is not None or ukey is not None:
            raise InvalidRecord("a record has either stat (EZ API) or key and ukey (classic API), not both",
                                field="stat")
        return Record(check_stat(stat), None, None, None if ezkey is None else check_key(ezkey, "ezkey"),
                      kind, number, seconds)
    if key is None and ukey is None:
        raise InvalidRecord("give stat (EZ API) or key and ukey (classic API)", field="stat")
    if ezkey is not None:
        raise InvalidRecord("ezkey belongs to EZ records; a classic record has key and ukey", field="ezkey")
    if key is None or ukey is None:
        missing = "key" if key is None else "ukey"
        raise InvalidRecord(f"a classic record needs both key and ukey; {missing} is missing", field=missing)
    return Record(None, check_key(key, "key"), check_key(ukey, "ukey"), None, kind, number, seconds)


def parse_record(obj: object, *, clock_now: int | None = None, ezkey: str | None = None,
                 t_floor: int = T_FLOOR) -> Record:
    """Validate one JSON-lines record object; `ezkey` applies when the object has none of its own.

    A classic record with neither count nor value is a counter hit of 1, as StatHat's /c takes it.
    """
    if not isinstance(obj, Mapping):
        raise InvalidRecord(f"a record must be a JSON object, not {_type_name(obj)}")
    unknown = obj.keys() - _ALL_FIELDS
    if unknown:
        name = sorted(map(str, unknown))[0]
        raise InvalidRecord(unknown_field(name, _ALL_FIELDS), field=name)
    own_key = obj.get("ezkey", obj.get("email"))
    if own_key is None and "stat" in obj:
        own_key = ezkey
    count = obj.get("count")
    if (count is None and obj.get("value") is None and obj.get("stat") is None
            and (obj.get("key") is not None or obj.get("ukey") is not None)):
        count = 1  # StatHat's classic counter: count is optional, default 1 (its value API requires value)
    return make_record(stat=obj.get("stat"), count=count, value=obj.get("value"), t=obj.get("t"),
                       ezkey=own_key, key=obj.get("key"), ukey=obj.get("ukey"), clock_now=clock_now,
                       t_floor=t_floor)


def number_from_text(text: str, field: str) -> int | float:
    """Read a number written as StatHat reads one (form fields, CSV cells, CLI arguments, StatsD); no range checks.

    The one number syntax for text on every path: ASCII only, an optional sign, decimal digits with an optional
    fraction ("5", "-1.5", ".5", "5."), an optional exponent ("1e3"); spaces, tabs and line ends around it are
    ignored. Python's int() and float() read more (StatHat does not): "1_000", non-ASCII digits (Arabic-Indic,
    full-width), other whitespace ("\u2003", "\x1c"), "inf" and "nan".
    """
    cleaned = text.strip(_NUMBER_SPACE)
    if cleaned.isascii():
        if cleaned.isdigit() or re.fullmatch(_INTEGER, cleaned):  # the common case at C speed first
            try:
                return int(cleaned)
            except ValueError:  # more digits than int() converts: far out of range as a count anyway
                raise InvalidRecord(f"{field} {masked(cleaned)} is out of range", field=field) from None
        if re.fullmatch(_DECIMAL, cleaned):
            number = float(cleaned)
            if math.isinf(number):  # "1e400": a number, too large for a float (not "not inf": none was written)
                raise InvalidRecord(f"{field} {masked(cleaned)} is out of range", field=field)
            return number
    raise InvalidRecord(f"{field} {masked(cleaned)} is not a number{_why_not_a_number(cleaned)}", field=field)


# StatHat's number syntax (see number_from_text) in ASCII classes: `\d` and `\s` match more. Compiled on first use.
_NUMBER_SPACE = " \t\r\n"
_INTEGER = r"[+-]?[0-9]+"
_DECIMAL = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"


def _why_not_a_number(text: str) -> str:
    """Say why text that Python reads as a number (once str.strip()ped) is not one to StatHat; "" for others."""
    try:
        number = float(text.strip())
    except ValueError:
        return ""
    if not math.isfinite(number):
        return " (StatHat takes finite numbers only)"
    if "_" in text:
        return " (StatHat reads no '_' between digits)"
    if any(char.isdigit() and not char.isascii() for char in text):
        return " (StatHat reads the ASCII digits 0-9 only)"
    return " (only spaces, tabs and line ends may surround a number)"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """Return ", did you mean 'value'?" for a misspelt field name close to a known one, else ""."""
    import difflib

    close = difflib.get_close_matches(name.lower(), sorted(known), n=1)
    return f", did you mean '{close[0]}'?" if close else ""


def fast_row(obj: object, ezkey: str | None, t_floor: int) -> tuple[Any, ...] | None:
    """Return the store row for a record object of the common shape that is plainly valid, else None.

    The hot path of ingestion: exactly {"stat", "count" or "value", "t"} with a plain name, a finite number and
    whole seconds is accepted with C-speed checks alone. None means "not decided here": call parse_record,
    which accepts or refuses with a reason. `ezkey` is the key shared by the records, already checked once by
    the caller (check_key; record_rows and formats.to_records do it). Given that, never accepts what
    parse_record refuses. `fast_rows` is the same rule over a list.
    """
    try:
        stat, t = obj["stat"], obj["t"]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        return None
    if type(obj) is not dict or len(obj) != 3:
        return None
    number = obj.get("count")  # with three keys, stat, t and a non-None count/value fix the shape exactly
    if number is None:
        number, kind = obj.get("value"), 1
    else:
        kind = 0  # Kind.COUNT as a plain int: sqlite3 binds an int subclass through its slow adapter lookup
    if (type(stat) is str and type(t) is int and t_floor <= t <= T_MAX and 0 < len(stat) <= MAX_NAME
            and "~" not in stat and stat.isprintable() and not stat.isspace()
            and ((type(number) is int and -INT64_MAX <= number <= INT64_MAX)
                 or (type(number) is float and math.isfinite(number)))):
        return (stat, None, None, ezkey, kind, number, t)
    return None


def fast_rows(objs: list[Any], ezkey: str | None, t_floor: int) -> list[tuple[Any, ...] | None]:
    """fast_row of each object, as one list comprehension: no Python call per record (half its cost).

    The hot path of batched appends. The conditions are fast_row's, in the same order of concern: the shape
    (a dict of exactly three keys, stat and t among them, count or else value not None), then t, the number and
    the name.
    """
    return [(stat, None, None, ezkey, kind, number, t)
            if (type(obj) is dict and len(obj) == 3 and type(stat := obj.get("stat")) is str
                and type(t := obj.get("t")) is int and t_floor <= t <= T_MAX
                and (((number := obj.get("count")) is not None and not (kind := 0))
                     or ((number := obj.get("value")) is not None and (kind := 1)))
                and ((type(number) is int and -INT64_MAX <= number <= INT64_MAX)
                     or (type(number) is float and math.isfinite(number)))
                and 0 < len(stat) <= MAX_NAME and "~" not in stat and stat.isprintable() and not stat.isspace())
            else None
            for obj in objs]


def record_rows(objs: Iterable[object], *, clock_now: int | None = None, ezkey: str | None = None,
                t_floor: int = T_FLOOR, chunk: int = 4096) -> Iterator[tuple[Any, ...]]:
    """Validate record objects into store rows (Record-shaped tuples), streaming; raises on the first invalid.

    Works a chunk at a time (fast_rows, then chain()), so the common case costs no Python call and no
    generator step per record; memory is bounded by the chunk, not the input. A bad `ezkey` raises at once.
    """
    if ezkey is not None:
        check_key(ezkey, "ezkey")
    return itertools.chain.from_iterable(_row_chunks(iter(objs), clock_now, ezkey, t_floor, chunk))


def _row_chunks(objs: Iterator[object], clock_now: int | None, ezkey: str | None, t_floor: int,
                size: int) -> Iterator[list[Any]]:
    offset = 0
    while batch := list(itertools.islice(objs, size)):
        rows = fast_rows(batch, ezkey, t_floor)
        if None in rows:  # some need the full validator, which accepts them or says why not
            for index, (obj, row) in enumerate(zip(batch, rows, strict=True)):
                if row is None:
                    try:
                        rows[index] = parse_record(obj, clock_now=clock_now, ezkey=ezkey, t_floor=t_floor)
                    except InvalidRecord as exc:  # say which one: the input has no lines to name
                        raise InvalidRecord(f"record {offset + index}: {exc.reason}", field=exc.field) from None
        offset += len(batch)
        yield rows


def expand_stat(stat: str) -> list[str]:
    """Return the stat names a `prefix~a,b` form stands for (one name for a plain stat)."""
    if "~" not in stat:
        return [stat]
    prefix, _, names = stat.partition("~")
    return [f"{prefix} {name}" for name in names.split(",")]


def _type_name(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    if isinstance(obj, str):
        return f"the string {masked(obj)}"
    if isinstance(obj, dict):
        return "an object"
    return "a list" if isinstance(obj, list) else type(obj).__name__
