"""One exception tree for spool; the CLI turns each into a one-line message and an exit status."""

from __future__ import annotations


def printable(text: str) -> str:
    """Escape what would break a log line or a terminal: control characters, lone surrogates, newlines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def masked(text: str) -> str:
    """Quote input text that could be a key: at most its first 3 characters, then … and its length."""
    if len(text) <= 3:
        return f"'{printable(text)}'"
    return f"'{printable(text[:3])}…' ({len(text)} characters)"


def redact_url(url: str) -> str:
    """Return a URL fit to print: credentials (user:password@) and any query string shown as ***."""
    import re

    base, query, _ = url.partition("?")
    return printable(re.sub(r"[^/@\s]*@", "***@", base) + ("?***" if query else ""))


class SpoolError(Exception):
    """Base of every error spool raises on purpose."""

    exit_status = 1


class ConfigError(SpoolError):
    """The configuration (file, environment or flags) is invalid."""

    exit_status = 2


class InvalidRecord(SpoolError):
    """A record failed validation; nothing from the call that carried it was committed."""

    exit_status = 2

    def __init__(self, message: str, *, field: str | None = None, line: int | None = None, fatal: bool = False):
        self.reason = message
        self.field = field
        self.line = line
        self.fatal = fatal  # the input itself is broken (truncated, not text): nothing in it can be trusted
        super().__init__(f"line {line}: {message}" if line is not None else message)

    def at_line(self, line: int) -> InvalidRecord:
        """Return a copy of this error that names the input line it came from."""
        return InvalidRecord(self.reason, field=self.field, line=line, fatal=self.fatal)


class IngestRefused(SpoolError):
    """A file that must not be ingested as it is (e.g. one spool already took and moved to .done/)."""

    exit_status = 2


class StoreError(SpoolError):
    """The spool file could not be opened, read or written."""


class SpoolUnusable(StoreError):
    """The spool file cannot be opened or written by this user (permissions, a read-only mount): an operator's
    to mend, not a transient failure."""


class SpoolMissing(StoreError):
    """A command that only reads or manages a spool was pointed at a file that does not exist."""


class SpoolCorrupt(StoreError):
    """The spool file is damaged (not a database, or malformed): nothing more is written to it; it must be moved
    aside for a fresh one (`spool run` does that when it starts)."""


class SpoolFull(StoreError):
    """The spool is at a configured bound (when_full = "reject_new"); nothing from the append was committed."""

    def __init__(self, message: str, *, refused: int = 0):
        super().__init__(message)
        self.refused = refused  # the records of the append refused


class SpoolBusy(StoreError):
    """Another process holds the spool's shipper lock."""


class ShipError(SpoolError):
    """Shipping did not complete."""


class TransientError(ShipError):
    """The receiver could not be reached or asked us to come back later; retry."""

    def __init__(self, message: str, *, retry_after: float | None = None, foreign: bool = False,
                 brief: str | None = None, overload: str | None = None):
        self.retry_after = retry_after
        self.overload = overload  # the receiver is overloaded, and how it says so: "503", "429", "timeout"
        self.unresolvable = False  # the host name did not resolve (a typo, or no DNS yet on this link)
        self.foreign = foreign  # the answer is certainly not StatHat's (a web page, a 501): not StatHat at all?
        self.brief = brief or message  # the message without the answer it quotes (quoted once, not at every retry)
        super().__init__(message)


class EndpointError(ShipError):
    """The endpoint answered in a way that means spool is misconfigured; keep records and pause."""


class Refused(ShipError):
    """The receiver refused what was sent (HTTP 200 with a non-200 status in the body)."""

    def __init__(self, message: str, *, http_status: int, body: str, names_key: bool = False):
        self.http_status = http_status
        self.body = body
        self.names_key = names_key
        super().__init__(message)


class PartlyTaken(Refused):
    """The receiver said it took fewer records than were sent; which ones is unknown, so none can be re-sent."""

    def __init__(self, message: str, *, http_status: int, body: str, taken: int, sent: int):
        self.taken = taken
        self.sent = sent
        super().__init__(message, http_status=http_status, body=body)
