"""Parse record files and streams into records. Pure: callers open the files; nothing here touches the disk.

Input forms (`reader_for` picks one by file name; `.gz` on top of any of them means gzip):
* JSON lines: one record object per line (the items of StatHat's `data` array, plus optional `ezkey`, or
  `key` and `ukey` for classic records). Blank lines are skipped.
* A whole StatHat JSON body `{"ezkey": ..., "data": [...]}` (its key applies to its items), or a JSON array
  of record objects; on one line or pretty-printed. (`.json`, and `spool import`, which detects the form.)
  The input is one document over several lines only when its first non-blank line begins a JSON value and
  stops short (`{`, `[`, `{"ezkey": "k",`: the parser reaches the line's end wanting more) and the next
  non-blank line continues it. Otherwise it is JSON lines, and a broken first line is one bad line.
* CSV with a header row naming columns from stat, count, value, t, ezkey, key, ukey (`.csv`).

A line (a CSV record, even over several lines) longer than MAX_LINE is refused, fatal for its file, without
reading more of it than that: memory stays bounded whatever the input, a gzip bomb included. A body's key
and a default key are checked once (records.check_key); error texts quote input as errors.masked does.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

from spool.errors import InvalidRecord
from spool.records import (
    T_FLOOR,
    Record,
    check_key,
    fast_row,
    number_from_text,
    parse_record,
    unknown_field,
)

MAX_LINE = 1 << 20  # bytes in one JSON line
MAX_DOCUMENT = 256 << 20  # bytes in one whole JSON document
CSV_COLUMNS = ("stat", "count", "value", "t", "ezkey", "key", "ukey")
_CSV_NUMBERS = frozenset({"count", "value", "t"})


class Item(NamedTuple):
    """One record object as found in the input (or why that line could not be read)."""

    line: int
    obj: Any
    ezkey: str | None = None  # the key of the StatHat body the object came in
    error: InvalidRecord | None = None


def read_lines(stream: IO[bytes], *, max_line: int = MAX_LINE) -> Iterator[tuple[int, bytes | InvalidRecord]]:
    """Yield (line number, line) from a binary stream; an over-long line comes as an InvalidRecord."""
    number = 0
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            return
        number += 1
        if len(line) > max_line and not line.endswith(b"\n"):
            while (rest := stream.readline(max_line)) and not rest.endswith(b"\n"):
                pass  # skip the remainder of the over-long line
            yield number, InvalidRecord(f"line is longer than {max_line} bytes", line=number)
        else:
            yield number, line


def _decode(raw: bytes, line: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError:
        raise InvalidRecord("not UTF-8 text (is this a binary or compressed file?)", line=line) from None


def _loads(text: str, line: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise json_error(exc, first_line=line) from None
    except ValueError:
        raise InvalidRecord("not valid JSON", line=line) from None
    except RecursionError:
        raise InvalidRecord("JSON nested too deeply", line=line) from None


def json_error(exc: json.JSONDecodeError, *, first_line: int = 1) -> InvalidRecord:
    """Say where JSON text is broken (its line in the input) and, for mistakes people make, why."""
    doc, pos = exc.doc, exc.pos
    line = first_line + exc.lineno - 1
    # A trailing comma (StatHat's own API page prints one): Python 3.13 points at the comma, older ones at the
    # bracket after it. JSON whitespace is only space, tab, CR and LF, so the neighbours found are structural.
    comma = pos if doc[pos:pos + 1] == "," else len(doc[:pos].rstrip(" \t\r\n")) - 1
    close = len(doc) - len(doc[comma + 1:].lstrip(" \t\r\n")) if comma >= 0 else len(doc)
    before = doc[:comma].rstrip(" \t\r\n")[-1:] if comma >= 0 else ""
    if doc[comma:comma + 1] == "," and doc[close:close + 1] in ("]", "}") and before not in ("", ":", ",", "[", "{"):
        close_line = first_line + doc.count("\n", 0, close)
        comma_line = first_line + doc.count("\n", 0, comma)
        where = f"; the comma is on line {comma_line}" if comma_line != close_line else ""
        return InvalidRecord(f"trailing comma before '{doc[close]}' (JSON allows none{where})", line=close_line)
    return InvalidRecord(f"not valid JSON: {exc.msg} at column {exc.colno}", line=line)


def document_items(document: Any, *, line: int = 1) -> Iterator[Item]:
    """Yield the record objects of a parsed StatHat body or JSON array."""
    if isinstance(document, list):
        for obj in document:
            yield Item(line, obj)
        return
    if isinstance(document, dict) and "data" in document:
        try:
            ezkey, data = stathat_body(document)
        except InvalidRecord as error:
            yield Item(line, None, error=error.at_line(line))
            return
        for obj in data:
            yield Item(line, obj, ezkey)
        return
    yield Item(line, document)  # a single record object: validation says what is wrong with it


def stathat_body(body: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """Check a StatHat JSON body as a whole and return (its key, its data items), or raise saying what is wrong.

    The one reader of `{"ezkey": ..., "data": [...]}` for `import`, drop files and the relay. The key (or its
    legacy name `email`) is checked once here: the records then take it unchecked (fast_row).
    """
    extra = body.keys() - {"ezkey", "email", "data"}
    if extra:
        name = sorted(map(str, extra))[0]
        raise InvalidRecord(unknown_field(name, ("ezkey", "email", "data"), "field in the StatHat body"))
    ezkey = body.get("ezkey", body.get("email"))
    if ezkey is not None:
        check_key(ezkey, "ezkey")
    if not isinstance(body.get("data"), list):
        raise InvalidRecord("'data' must be a list of records", field="data")
    return ezkey, body["data"]


def read_json_stream(stream: IO[bytes]) -> Iterator[Item]:
    """Yield record objects from JSON lines, or from one whole JSON document (detected from the input).

    The input is one document over several lines only when its first non-blank line begins a JSON value
    (the parser stops at the line's very end, wanting more: `{`, `[`, `{"ezkey": "k",`) and the next
    non-blank line continues it (the two together still begin a value, or are one). Anything else is JSON
    lines, where a broken first line is one bad line like any other.
    """
    lines = read_lines(stream)
    texts = _texts(lines)  # pulls from `lines` only as asked: once the first line is decided, read `lines` on
    for number, text in texts:
        if isinstance(text, str) and _wants_more(text.strip()):
            following = next(texts, None)
            if (following is not None and isinstance(following[1], str)
                    and _wants_more(f"{text.strip()}\n{following[1].strip()}", complete_ok=True)):
                yield from _document(number, text, following, texts)
                return
            yield from _line_items(number, text)  # the first line's own error
            if following is not None:
                yield from _line_items(*following)
        else:
            yield from _line_items(number, text)
        break
    for number, raw in lines:  # JSON lines: the hot loop of ingestion, so no generator per line
        if isinstance(raw, InvalidRecord):
            yield Item(number, None, error=raw)
            continue
        try:
            text = _decode(raw, number)
            if text.isspace():
                continue
            document = _loads(text, number)
        except InvalidRecord as exc:
            yield Item(number, None, error=exc)
            continue
        if type(document) is dict and "data" not in document:
            yield Item(number, document)  # one record object, the common case
        else:
            yield from document_items(document, line=number)


def _texts(lines: Iterator[tuple[int, bytes | InvalidRecord]]) -> Iterator[tuple[int, str | InvalidRecord]]:
    """Yield (line number, decoded line without its line ending, or why it is unreadable); skip blank lines."""
    for number, raw in lines:
        if isinstance(raw, InvalidRecord):
            yield number, raw
            continue
        try:
            text = _decode(raw, number)
        except InvalidRecord as exc:
            yield number, exc
            continue
        if not text.isspace() and text:
            yield number, text.rstrip("\r\n")


def _line_items(number: int, text: str | InvalidRecord) -> Iterator[Item]:
    """Yield the record objects of one JSON line (an object, an array, a body), or its error."""
    try:
        if isinstance(text, InvalidRecord):
            raise text
        yield from document_items(_loads(text, number), line=number)
    except InvalidRecord as exc:
        yield Item(number, None, error=exc)


def _wants_more(text: str, *, complete_ok: bool = False) -> bool:
    """Tell whether `text` begins a JSON value: the parser stops at its very end, wanting more.

    A JSON string cannot span lines, so a line cut inside a string is broken, never a beginning (the parser
    then points at the string's start, not at the end of the text).
    """
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return exc.pos >= len(text)
    except (ValueError, RecursionError):
        return False
    return complete_ok


def _document(first: int, text: str, following: tuple[int, str | InvalidRecord],
              texts: Iterator[tuple[int, str | InvalidRecord]]) -> Iterator[Item]:
    """Read the rest of a document that began on line `first` and yield its record objects (or one error)."""
    parts, size, last = [text], len(text), first
    for number, more in itertools.chain([following], texts):
        if isinstance(more, InvalidRecord):
            yield Item(number, None, error=more)
            return
        size += len(more)
        if size > MAX_DOCUMENT:
            yield Item(number, None, error=InvalidRecord(f"JSON document is larger than {MAX_DOCUMENT >> 20} MiB",
                                                         line=number))
            return
        parts += ["\n" * (number - last), more]  # blank lines kept, so the parser's line numbers are the file's
        last = number
    try:
        document = json.loads("".join(parts))
    except json.JSONDecodeError as exc:
        error = json_error(exc, first_line=first)
        yield Item(error.line or first, None, error=error)
        return
    except (ValueError, RecursionError):
        yield Item(first, None, error=InvalidRecord("JSON nested too deeply", line=first))
        return
    yield from document_items(document, line=first)


def to_records(items: Iterator[Item], *, ezkey: str | None = None, clock_now: int | None = None,
               t_floor: int = T_FLOOR,
               on_invalid: Callable[[InvalidRecord], None] | None = None) -> Iterator[Record]:
    """Validate items into records. Invalid input raises, unless `on_invalid` takes the error and we go on.

    `ezkey`, the key for records that carry none, is checked first: a bad one raises whatever `on_invalid`.
    """
    if ezkey is not None:
        check_key(ezkey, "ezkey")
    for item in items:
        row = fast_row(item.obj, item.ezkey or ezkey, t_floor) if item.error is None else None
        if row is not None:
            yield row  # type: ignore[misc]  # a Record-shaped row; the store takes either
            continue
        try:
            if item.error is not None:
                raise item.error
            yield parse_record(item.obj, clock_now=clock_now, ezkey=item.ezkey or ezkey, t_floor=t_floor)
        except InvalidRecord as exc:
            error = exc if exc.line is not None else exc.at_line(item.line)
            if on_invalid is None:
                raise error from None
            on_invalid(error)


class _CsvLines:
    """Lines for csv.reader, each (and each record spread over lines by a quoted newline) at most MAX_LINE long.

    TextIOWrapper.readline with a limit keeps universal newlines and never holds more than the limit, so a
    file with no newline (a gzip bomb) costs MAX_LINE, not its size. Characters are counted; as each is at
    least a byte, what is refused is longer than MAX_LINE bytes too.
    """

    def __init__(self, stream: IO[bytes]):
        self.text = io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")
        self.record = 0  # characters of the record being read; reset after each record

    def __iter__(self) -> _CsvLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(MAX_LINE + 1)
        if not line:
            raise StopIteration
        self.record += len(line)
        if self.record > MAX_LINE:
            raise InvalidRecord(f"line is longer than {MAX_LINE} bytes", fatal=True)
        return line


def read_csv(stream: IO[bytes]) -> Iterator[Item]:
    """Yield record objects from CSV whose header names columns from CSV_COLUMNS; empty cells are absent."""
    lines = _CsvLines(stream)
    reader = csv.reader(lines, strict=True)
    try:
        yield from _csv_items(reader, lines)
    except InvalidRecord as exc:  # an over-long line (fatal): nothing after it can be trusted
        yield Item(reader.line_num + 1, None, error=exc.at_line(reader.line_num + 1))


def _csv_items(reader: Any, lines: _CsvLines) -> Iterator[Item]:
    header = [name.strip().lower() for name in next(reader, [])]
    lines.record = 0
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if not header or unknown or len(set(header)) != len(header):
        problem = (unknown_field(unknown[0], CSV_COLUMNS, "column") if unknown else
                   "a column is named twice" if header else "no header row")
        yield Item(1, None, error=InvalidRecord(f"{problem}; the header names columns from "
                                                f"{', '.join(CSV_COLUMNS)}", line=1, fatal=True))
        return
    for row in reader:
        lines.record = 0
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            yield Item(line, None, error=InvalidRecord(f"has {len(row)} cells; the header has {len(header)}",
                                                       line=line))
            continue
        try:
            obj = {name: number_from_text(cell, name) if name in _CSV_NUMBERS else cell.strip()
                   for name, cell in zip(header, row, strict=True) if cell.strip()}
        except InvalidRecord as exc:
            yield Item(line, None, error=exc.at_line(line))
        else:
            yield Item(line, obj)


_READERS: dict[str, Callable[[IO[bytes]], Iterator[Item]]] = {
    ".jsonl": read_json_stream, ".ndjson": read_json_stream, ".json": read_json_stream, ".csv": read_csv,
}
SUFFIXES = tuple(_READERS) + tuple(f"{suffix}.gz" for suffix in _READERS)


def reader_for(name: str) -> Callable[[IO[bytes]], Iterator[Item]] | None:
    """Return the reader for a file name by its extension (gzip-aware), or None for an unknown kind."""
    lowered = name.lower()
    gzipped = lowered.endswith(".gz")
    base = lowered[:-3] if gzipped else lowered
    reader = next((r for suffix, r in _READERS.items() if base.endswith(suffix)), None)
    if reader is None:
        return None
    return _gunzipping(reader) if gzipped else _guarded(reader)


def _guarded(reader: Callable[[IO[bytes]], Iterator[Item]]) -> Callable[[IO[bytes]], Iterator[Item]]:
    """Wrap a reader so that a broken input ends as one fatal error item instead of an exception."""
    def read(stream: IO[bytes]) -> Iterator[Item]:
        last = 0
        try:
            for item in reader(stream):
                last = item.line
                yield item
        except UnicodeDecodeError:
            yield Item(last + 1, None, error=InvalidRecord("not UTF-8 text (a binary file, or another "
                                                           "encoding?)", line=last + 1, fatal=True))
        except csv.Error as exc:
            yield Item(last + 1, None, error=InvalidRecord(f"unreadable CSV: {exc}", line=last + 1, fatal=True))
        except (OSError, EOFError, zlib.error) as exc:
            yield Item(last + 1, None, error=InvalidRecord(f"broken or truncated file: {exc or type(exc).__name__}",
                                                           line=last + 1, fatal=True))
    return read


def _gunzipping(reader: Callable[[IO[bytes]], Iterator[Item]]) -> Callable[[IO[bytes]], Iterator[Item]]:
    import gzip

    guarded = _guarded(reader)

    def read(stream: IO[bytes]) -> Iterator[Item]:
        return guarded(gzip.GzipFile(fileobj=stream, mode="rb"))  # type: ignore[arg-type]
    return read
