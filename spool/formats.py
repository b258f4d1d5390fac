"""Parse record files and streams into records. Pure: callers open the files; nothing here touches the disk.

Input forms:
* JSON lines: one record object per line (the items of StatHat's `data` array, plus optional `ezkey`, or
  `key` and `ukey` for classic records). Blank lines are skipped.
* A whole StatHat JSON body `{"ezkey": ..., "data": [...]}` (its key applies to its items), or a JSON array
  of record objects; on one line or pretty-printed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import IO, Any, NamedTuple

from spool.errors import InvalidRecord
from spool.records import T_FLOOR, Record, parse_record

MAX_LINE = 1 << 20  # bytes in one JSON line
MAX_DOCUMENT = 256 << 20  # bytes in one whole JSON document


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
    except ValueError as exc:
        raise InvalidRecord(f"not valid JSON: {exc.msg} at column {exc.colno}", line=line) from None
    except RecursionError:
        raise InvalidRecord("JSON nested too deeply", line=line) from None


def document_items(document: Any, *, line: int = 1) -> Iterator[Item]:
    """Yield the record objects of a parsed StatHat body or JSON array."""
    if isinstance(document, list):
        for obj in document:
            yield Item(line, obj)
        return
    if isinstance(document, dict) and "data" in document:
        extra = document.keys() - {"ezkey", "email", "data"}
        ezkey = document.get("ezkey", document.get("email"))
        if extra:
            error = InvalidRecord(f"unknown field '{sorted(extra)[0][:40]}' in the StatHat body", line=line)
        elif ezkey is not None and not isinstance(ezkey, str):
            error = InvalidRecord("ezkey must be a string", field="ezkey", line=line)
        elif not isinstance(document["data"], list):
            error = InvalidRecord("'data' must be a list of records", line=line)
        else:
            for obj in document["data"]:
                yield Item(line, obj, ezkey)
            return
        yield Item(line, None, error=error)
        return
    yield Item(line, document)  # a single record object: validation says what is wrong with it


def read_json_stream(stream: IO[bytes]) -> Iterator[Item]:
    """Yield record objects from JSON lines, or from one whole JSON document (detected from the input)."""
    lines = read_lines(stream)
    for number, raw in lines:
        try:
            text = _raw_text(number, raw)
            if not text:
                continue
            try:
                document = json.loads(text)
            except ValueError:
                if text[0] not in "{[":
                    raise
                # A document spread over several lines: read it whole.
                document = _loads(_read_rest(text, lines), number)
        except (InvalidRecord, ValueError, RecursionError) as exc:
            yield Item(number, None, error=_as_invalid(exc, number))
        else:
            yield from document_items(document, line=number)
        break
    for number, raw in lines:
        try:
            text = _raw_text(number, raw)
            if text:
                yield from document_items(_loads(text, number), line=number)
        except InvalidRecord as exc:
            yield Item(number, None, error=exc)


def _raw_text(number: int, raw: bytes | InvalidRecord) -> str:
    if isinstance(raw, InvalidRecord):
        raise raw
    return _decode(raw, number).strip()


def _as_invalid(exc: Exception, line: int) -> InvalidRecord:
    if isinstance(exc, InvalidRecord):
        return exc
    if isinstance(exc, json.JSONDecodeError):
        return InvalidRecord(f"not valid JSON: {exc.msg} at column {exc.colno}", line=line)
    return InvalidRecord("not valid JSON", line=line)


def _read_rest(first: str, lines: Iterator[tuple[int, bytes | InvalidRecord]]) -> str:
    parts = [first]
    size = len(first)
    for number, raw in lines:
        if isinstance(raw, InvalidRecord):
            raise raw
        size += len(raw)
        if size > MAX_DOCUMENT:
            raise InvalidRecord(f"JSON document is larger than {MAX_DOCUMENT >> 20} MiB", line=number)
        parts.append(_decode(raw, number))
    return "\n".join(parts)


def to_records(items: Iterator[Item], *, ezkey: str | None = None, clock_now: int | None = None,
               t_floor: int = T_FLOOR,
               on_invalid: Callable[[InvalidRecord], None] | None = None) -> Iterator[Record]:
    """Validate items into records. Invalid input raises, unless `on_invalid` takes the error and we go on."""
    for item in items:
        try:
            if item.error is not None:
                raise item.error
            yield parse_record(item.obj, clock_now=clock_now, ezkey=item.ezkey or ezkey, t_floor=t_floor)
        except InvalidRecord as exc:
            error = exc if exc.line is not None else exc.at_line(item.line)
            if on_invalid is None:
                raise error from None
            on_invalid(error)
