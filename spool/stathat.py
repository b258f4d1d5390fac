"""Speaking to StatHat: build EZ JSON batches and classic form posts, classify what comes back.

The only module that imports requests (and urllib3 under it). Keys travel in request bodies only, so no URL
built here carries one; and whatever an error quotes from an answer (its body, the text of an exception that
quotes it) is redacted here, of every key the request carried and of every key field, before any caller can log,
store or show it (see `redact`): a proxy that echoes the request must not put the ezkey in a log line.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.poolmanager import pool_classes_by_scheme

from spool.clock import unix_seconds
from spool.config import DEFAULT_ENDPOINT, check_endpoint
from spool.errors import EndpointError, InvalidRecord, PartlyTaken, Refused, TransientError, printable, redact_url
from spool.lock import IDENTITY_HEADER
from spool.records import KIND_NAMES, Kind, Record, number_from_text

TRANSIENT_STATUSES = frozenset({408, 429})
# Answers that say the receiver has more than it can take (StatHat: 503 "Back-end server is at capacity"), and
# a gateway's timeout: the shipper's pacing slows down for them (a 500 or a reset says nothing of load).
OVERLOAD_STATUSES = {429: "429", 503: "503", 504: "timeout"}
KEY_REFUSALS = frozenset({"invalid keys", "no ezkey specified"})  # StatHat's refusals of a key, word for word
USER_AGENT = "stathat-spool"
MAX_ANSWER = 64 << 10  # bytes of an answer body read at most; StatHat's answers are tens of bytes
MAX_KEYS_REMEMBERED = 64  # keys a client redacts from answers besides the request's own (the ones sent lately)


class EzRecord(Protocol):
    """What an EZ batch needs of a record: a Record, or a row the shipper leased (store.Leased)."""

    @property
    def stat(self) -> str | None: ...
    @property
    def kind(self) -> int: ...
    @property
    def number(self) -> int | float: ...
    @property
    def t(self) -> int: ...


def ez_item(record: EzRecord) -> dict[str, Any]:
    """Return one item of an EZ JSON batch's `data` array."""
    return {"stat": record.stat, KIND_NAMES[record.kind]: record.number, "t": record.t}


_NUMBER_FIELDS = tuple(f'"{name}":' for name in KIND_NAMES)  # by kind
_quoted = functools.lru_cache(maxsize=4096)(json.dumps)  # a stat name as a JSON string; names repeat


def ez_body(ezkey: str, records: Sequence[EzRecord]) -> bytes:
    """Return an EZ JSON batch, byte for byte what json.dumps(..., separators=(",", ":")) makes of it.

    Written item by item: building a dict per record for json.dumps cost twice as much, and a drain writes
    500 of them per request. Numbers are ints or finite floats (validated), whose repr is their JSON.
    """
    fields = _NUMBER_FIELDS
    data = ",".join([f'{{"stat":{_quoted(r.stat)},{fields[r.kind]}{r.number!r},"t":{r.t}}}' for r in records])
    return f'{{"ezkey":{json.dumps(ezkey)},"data":[{data}]}}'.encode()


def classic_form(record: Record) -> tuple[str, dict[str, Any]]:
    """Return the classic API path (/c or /v) and form fields for one classic record."""
    path, field = ("/c", "count") if record.kind == Kind.COUNT else ("/v", "value")
    return path, {"key": record.key, "ukey": record.ukey, field: record.number, "t": record.t}


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Parse a Retry-After header (seconds or an HTTP date) into seconds from now."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = unix_seconds(email.utils.parsedate_to_datetime(value))  # "-0000" (no zone known) is UTC
    except (TypeError, ValueError, OverflowError, IndexError):  # whatever a malformed date makes it raise
        return None
    return max(0.0, when - (time.time() if now is None else now))


def classify_response(status: int, body: str, retry_after: str | None = None, *,
                      sent: int | None = None, keys: Iterable[str] = (), location: str | None = None,
                      content_type: str | None = None) -> int | None:
    """Return the number of items the receiver said it took (None if unsaid) or raise what went wrong.

    A count (`status`, `multiple`) is a whole number: a JSON number (200, 200.0) or text in spool's one number
    syntax (ASCII, as StatHat writes numbers: "200", " 200"; no full-width digits). 204, or 2xx with an empty
    body or a `status` of 200: accepted. HTTP 200 with another count as `status` in its JSON body: Refused
    (naming the key only if its `msg` is one of StatHat's own KEY_REFUSALS, word for word: "invalid stat name:
    hockey" is not one). `multiple` absent: taken, count unsaid; at least the `sent` items: taken; fewer:
    PartlyTaken (a Refused): which items were taken is unknown. 408, 429, 5xx, 1xx (no final answer):
    TransientError (with Retry-After). Any other HTTP status: EndpointError, a misconfiguration to pause on
    (a redirect names its `location`: spool follows none, as it could take the key elsewhere). A 2xx body not
    StatHat's answer (a captive portal's page, a proxy's error, a `status` or a `multiple` that is no count)
    is transient: counting it as delivered could lose data, as a refusal it could drop what was taken.
    Whatever the body holds, nothing else is raised. A transient answer that is certainly not StatHat's (see
    `foreign_answer`; a 2xx body not StatHat's) is marked `foreign`, and its `brief` message quotes no body.

    The answer is read as it came; what the error quotes of it (message, Refused.body) is redacted of `keys`
    (those the request carried) and of every key field first.
    """
    if status < 200:  # an interim answer, where the answer should be (101, or a 1xx through a SOCKS proxy)
        raise TransientError(f"HTTP {status} with no final answer after it: whether the request was taken is "
                             "unknown, so it is sent again")
    if status in TRANSIENT_STATUSES or 500 <= status <= 599:
        overload = OVERLOAD_STATUSES.get(status)
        if foreign_answer(status, body, content_type):
            raise TransientError(f"HTTP {status} {_snippet(body, keys)}".rstrip(), foreign=True,
                                 brief=f"HTTP {status}, not StatHat's answer",
                                 retry_after=retry_after_seconds(retry_after), overload=overload)
        raise TransientError(f"HTTP {status} {_snippet(body, keys)}".rstrip(),
                             retry_after=retry_after_seconds(retry_after), overload=overload)
    if 300 <= status <= 399 and location is not None:
        target = printable(redact(location, keys))
        target = target if len(target) <= 200 else target[:200] + "…"
        raise EndpointError(f"HTTP {status} from the endpoint, a redirect to {target}: spool follows no redirect "
                            "(it could take the key elsewhere); set the endpoint to where the API answers")
    if not 200 <= status <= 299:
        raise EndpointError(" ".join(["HTTP", str(status), "from the endpoint", _snippet(body, keys)]).rstrip()
                            + "; check the endpoint URL")
    if status == 204 or not body.strip():
        return None
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        answer = None
    code = _count(answer.get("status")) if isinstance(answer, dict) else None
    if code is None:
        raise TransientError(f"HTTP {status} with a body that is not StatHat's answer: {_snippet(body, keys)}",
                             foreign=True, brief=f"HTTP {status} with a body that is not StatHat's answer")
    if code != 200:
        msg = answer.get("msg")
        message = printable(redact(str(msg or f"status {answer.get('status')}"), keys))[:500]
        raise Refused(message, http_status=status, body=redact(body, keys),
                      names_key=isinstance(msg, str) and msg in KEY_REFUSALS)
    if "multiple" not in answer:
        return None
    taken = _count(answer["multiple"])
    if taken is None or taken < 0:
        raise TransientError(f"HTTP {status} with a body that is not StatHat's answer (its multiple is no count): "
                             f"{_snippet(body, keys)}")
    if sent is not None and taken < sent:
        raise PartlyTaken(f"the receiver took {taken} of {sent} records; which ones is unknown "
                          f"(answer: {_snippet(body, keys)[1:-1]})", http_status=status, body=redact(body, keys),
                          taken=taken, sent=sent)
    return taken


def foreign_answer(status: int, body: str, content_type: str | None = None) -> bool:
    """Whether a failing answer is certainly not StatHat's: a web page (HTML), or "501 Not Implemented" / "505 HTTP
    Version Not Supported" (StatHat implements its API). StatHat fails with a few words of text ("Back-end server
    is at capacity") or nothing; a proxy between spool and StatHat may fail with a page too, so one such answer
    means nothing: the shipper pauses only after several in a row."""
    if status in (501, 505):
        return True
    if (content_type or "").split(";")[0].strip().lower() in ("text/html", "application/xhtml+xml"):
        return True
    return body.lstrip()[:15].lower().startswith(("<!doctype", "<html", "<?xml", "<head", "<body"))


def _count(value: object) -> int | None:
    """Return a JSON status or count as the whole number it is (200, 200.0, "200", " 200"), or None if it is none."""
    if isinstance(value, str):
        try:
            value = number_from_text(value, "count")
        except InvalidRecord:
            return None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _quoted_answer(body: str, keys: Iterable[str]) -> str:
    """An answer's body quoted once, for a person: redacted, on one line, cut to 80 characters (its length told)."""
    text = printable(" ".join(redact(body, keys)[:1000].split()))
    return f"'{text}'" if len(text) <= 80 else f"'{text[:80]}…' ({len(body)} characters)"


def _snippet(body: str, keys: Iterable[str]) -> str:
    text = printable(" ".join(redact(body, keys)[:1000].split()))  # redacted before it is cut: a cut key shows no part
    return f"({text[:120]})" if text else ""


# -- redacting what is quoted from an answer ----------------------------------------------------------------

REDACTED = "***"
SHOWN = 3  # characters of a key that may show (errors.masked shows as many): a run of more is redacted

_FIELD = r"(?:ezkey|ukey|key)"
# "ezkey": "...", 'key': '...', \"ukey\":\"...\" (a request quoted inside a JSON string): up to the closing
# quote, or the end of a text cut short.
_QUOTED_FIELD = re.compile(r"""(\\*["']""" + _FIELD + r"""\\*["']\s*:\s*\\*["'])[^"']*?(?=\\*["']|\Z)""",
                           re.IGNORECASE)
# ezkey=... in a form body or a query string (also URL-encoded as ezkey%3D...), quoted or not.
_PARAMETER = re.compile(r"""(?<![\w.-])(""" + _FIELD + r"""(?:=|%3D))(\\*["'])?(?(2)[^"']*|[^&\s"'<>]*)""",
                        re.IGNORECASE)


def redact(text: str, keys: Iterable[str] = ()) -> str:
    """Return `text` fit to quote: each of `keys` and the value of each ezkey, key or ukey field shown as ***.

    A key is found as sent, URL-encoded, JSON- or repr-escaped (any number of times), and cut short: any run
    of more than SHOWN of its first characters is redacted. A key of SHOWN characters or fewer is redacted
    where it stands as a whole token, not inside a word ("xq7" in "no account xq7", not in "xq7abc"): so short
    a string is found in too many words. Fields are found in JSON, Python reprs, form bodies and query
    strings, whatever key they hold. Redact before cutting a text short.
    """
    for key in sorted(set(keys), key=len, reverse=True):
        if len(key) > SHOWN:
            text = _redact_key(text, key)
        elif key:
            text = _short_key_pattern(key).sub(REDACTED, text)
    text = _QUOTED_FIELD.sub(lambda m: m.group(1) + REDACTED, text)
    return _PARAMETER.sub(lambda m: m.group(1) + (m.group(2) or "") + REDACTED, text)


def _redact_key(text: str, key: str) -> str:
    head, chars = _key_patterns(key)
    out, at = [], 0
    while (found := head.search(text, at)) is not None:
        end, i = found.end(), SHOWN + 1
        while i < len(key) and (more := chars[i].match(text, end)) is not None:
            end, i = more.end(), i + 1
        out += [text[at:found.start()], REDACTED]
        at = end
    return "".join(out) + text[at:] if out else text


# Where a whole token begins and ends: no word character next to it, unless one ending an escape (%20, \u0020,
# \x20, \n).
_ALONE_BEFORE = r"(?:(?<!\w)|(?<=%[0-9A-Fa-f]{2})|(?<=\\u[0-9A-Fa-f]{4})|(?<=\\x[0-9A-Fa-f]{2})|(?<=\\[nrtbf]))"
_ALONE_AFTER = r"(?!\w)"


@functools.lru_cache(maxsize=64)
def _short_key_pattern(key: str) -> re.Pattern[str]:
    """A pattern for a short key, however spelled, standing as a whole token."""
    return re.compile(_ALONE_BEFORE + "".join(_spelled(char) for char in key) + _ALONE_AFTER)


@functools.lru_cache(maxsize=64)
def _key_patterns(key: str) -> tuple[re.Pattern[str], list[re.Pattern[str]]]:
    """A pattern for a key's first SHOWN + 1 characters, and one for each of its characters, however spelled."""
    spelled = [_spelled(char) for char in key]
    return re.compile("".join(spelled[:SHOWN + 1])), [re.compile(pattern) for pattern in spelled]


@functools.lru_cache(maxsize=1024)
def _spelled(char: str) -> str:
    """A pattern for one character of a key as an answer may spell it: itself (escaped by backslashes or not),
    percent-encoded (form or URL, "+" for a space), as \\uXXXX (JSON) or \\xXX (a repr of bytes), hex in any case."""
    utf8 = char.encode()
    ways = [r"\\*" + re.escape(char), "".join("%" + _hex(byte) for byte in utf8)]
    if char == " ":
        ways.append(r"\+")
    units = char.encode("utf-16-be")
    ways.append("".join(r"\\+u" + _hex(units[i]) + _hex(units[i + 1]) for i in range(0, len(units), 2)))
    if not char.isascii():
        ways.append("".join(r"\\+x" + _hex(byte) for byte in utf8))
    return "(?:" + "|".join(ways) + ")"


def _hex(byte: int) -> str:
    return "".join(f"[{digit}{digit.upper()}]" if digit.isalpha() else digit for digit in f"{byte:02x}")


# -- a deadline for the whole request ------------------------------------------------------------------------
#
# requests' timeout bounds each socket operation, not the request: an answer trickling in a byte a second
# never trips it. So each request runs under a _Deadline, and our connections (installed by _DeadlineAdapter)
# hand themselves to the deadline of the thread that uses them: urllib3 calls connect() and request() on the
# thread making the request. When time is up, the client's watchdog thread shuts the socket down and the
# blocked read ends at once. One watchdog thread serves all of a client's requests (starting a timer thread
# per request cost a fast drain more than the rest of its requests' work); it ends when idle a moment. This
# uses only public, long-stable parts of urllib3 (PoolManager.pool_classes_by_scheme, ConnectionCls,
# HTTPConnection.connect/request), present alike in urllib3 1.26 and 2.x.

_watching = threading.local()  # .deadline: the _Deadline of the request this thread is making, if any


class _Deadline:
    """Shut down the socket of the request this thread makes once `seconds` have passed."""

    def __init__(self, seconds: float, watchdog: _Watchdog):
        self.expired = False
        self.aborted = False  # ended by abort() (spool is stopping), not by its time running out
        self.at = time.monotonic() + seconds
        self._connection: Any = None
        self._lock = threading.Lock()
        self._watchdog = watchdog

    def __enter__(self) -> _Deadline:
        _watching.deadline = self
        self._watchdog.watch(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._watchdog.forget(self)
        _watching.deadline = None

    def watch(self, connection: Any) -> None:
        """Take the connection the request now uses, or the socket its answer is read from (shut at once if
        time is already up)."""
        with self._lock:
            self._connection = connection
            if self.expired:
                _shut(connection)

    def expire(self, *, aborted: bool = False) -> None:
        with self._lock:
            self.expired = True
            self.aborted = self.aborted or aborted
            if self._connection is not None:
                _shut(self._connection)


class _Watchdog:
    """One thread that expires the deadline of the request a client is making (one at a time), if it passes."""

    LINGER = 0.5  # seconds the thread waits for the next request before it ends

    def __init__(self) -> None:
        self._wake = threading.Condition()
        self._current: _Deadline | None = None
        self._thread: threading.Thread | None = None
        self._sleeping_until = float("inf")  # the thread is woken only for a deadline earlier than this
        self._closed = False
        self._aborted = False

    def watch(self, deadline: _Deadline) -> None:
        if self._aborted:
            deadline.expire(aborted=True)
            return
        with self._wake:
            self._current = deadline
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="spool-deadline", daemon=True)
                self._thread.start()
            elif deadline.at < self._sleeping_until:
                self._wake.notify()

    def forget(self, deadline: _Deadline) -> None:
        with self._wake:
            if self._current is deadline:
                self._current = None  # no wake-up: the thread finds it gone when it looks (or lingers out)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    def abort(self) -> None:
        """Cut the request being made now, and every later one, short at once (from any thread)."""
        with self._wake:
            self._aborted = True
            current, self._current = self._current, None
        if current is not None:
            current.expire(aborted=True)

    def _run(self) -> None:
        with self._wake:
            idle_since: float | None = None
            while not self._closed:
                now = time.monotonic()
                current = self._current
                if current is None:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since >= self.LINGER:
                        break
                    self._sleeping_until = idle_since + self.LINGER
                elif now >= current.at:
                    self._current = None
                    current.expire()
                    continue
                else:
                    idle_since = None
                    self._sleeping_until = current.at
                self._wake.wait(self._sleeping_until - now)
            self._thread = None
            self._sleeping_until = float("inf")


def _shut(connection: Any) -> None:
    sock = getattr(connection, "sock", connection)  # a connection's socket, or an answer's
    sock = getattr(sock, "socket", sock)  # urllib3's SSLTransport (TLS through a TLS proxy) wraps a socket
    if isinstance(sock, socket.socket):
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: leaves an SSL object intact
        except OSError:
            pass  # already closed


def _hand_over(connection: Any) -> None:
    deadline = getattr(_watching, "deadline", None)
    if deadline is not None:
        deadline.watch(connection)


# -- what http.client does not say of an answer ------------------------------------------------------------
#
# An answer with no Content-Length that is not chunked ends where the connection closes (RFC 9112 section 6.3).
# http.client reads it so, but it reads an answer cut in its headers the same way: the headers read up to the
# cut, then no body, a whole 2xx to all appearances (and a refusal may be what was cut). So our connections
# make their responses from _Answer, which notes whether the header block ended in its blank line. urllib3
# itself relies on response_class and on _read_status (its proxy tunnel reads the CONNECT answer with them).
# _Answer also reads past interim answers (1xx) to the final one, as RFC 9110 section 15.2 asks of a client.


class _LastLine:
    """A response's file, noting the last line read from it (the header block's last, once begin() returned)."""

    def __init__(self, fp: Any):
        self.fp = fp
        self.last: bytes | None = None

    def readline(self, limit: int = -1) -> bytes:
        self.last = self.fp.readline(limit)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fp, name)


class _Answer(http.client.HTTPResponse):
    """http.client's response, which also tells whether its body's end is known, and whether its headers are whole."""

    framed = False  # the end of the body is known before it is read: a Content-Length, chunked, or no body (204)
    headers_whole = False  # the header block ended in its blank line, and every line in it is a header

    def __init__(self, sock: Any, *args: Any, **kwargs: Any):
        super().__init__(sock, *args, **kwargs)
        # An answer that ends with its connection (no length, or "Connection: close") is handed this socket,
        # and the connection lets go of it (its sock is None): the deadline must reach it here.
        _hand_over(sock)

    def begin(self) -> None:
        if self.headers is not None:  # read already (http.client's own guard)
            return
        watched = _LastLine(self.fp)
        self.fp = watched
        try:
            super().begin()
        finally:
            if self.fp is watched:
                self.fp = watched.fp
        self.framed = self.chunked or self.length is not None
        try:
            urllib3.util.response.assert_header_parsing(self.msg)
            parsed = True
        except (urllib3.exceptions.HeaderParsingError, TypeError):
            parsed = False
        self.headers_whole = watched.last in (b"\r\n", b"\n") and parsed
        if self.status < 200:  # 101 Switching Protocols: what follows on this connection is no HTTP of ours
            self.will_close = True

    def _read_status(self) -> tuple[str, int, str]:
        """Read the final answer's status line, past interim answers (1xx but 101: 102 Processing, 103 Early
        Hints) and their headers: http.client skips only 100 Continue, and took a 103 for the answer."""
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # not in the stubs
            if status == 101 or not 100 <= status <= 199:
                return version, status, reason
            http.client.parse_headers(self.fp)  # read and dropped, with http.client's bounds on lines


def _answer_of(response: requests.Response) -> _Answer | None:
    """The _Answer http.client read for a response (requests reads the same attribute), or None: through a SOCKS
    proxy, whose connections are urllib3's own, what _Answer notes is unknown."""
    answer = getattr(response.raw, "_original_response", None)
    return answer if isinstance(answer, _Answer) else None


def _framed(response: requests.Response) -> bool:
    """Whether the end of an answer's body was known before it was read (not where the connection closed)."""
    answer = _answer_of(response)
    if answer is None:  # as http.client frames an answer: no body (204, 304), a Content-Length, or chunked
        return (response.status_code in (204, 304) or "Content-Length" in response.headers
                or "chunked" in response.headers.get("Transfer-Encoding", ""))
    return answer.framed


class _Watched:
    """Mixed into urllib3's connections: hand the connection to the current request's deadline; make responses
    that tell whether an answer is whole (_Answer)."""

    response_class: type[http.client.HTTPResponse] = _Answer

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        _hand_over(self)  # a deadline that expired while connecting shuts the new socket now

    def request(self, *args: Any, **kwargs: Any) -> Any:
        _hand_over(self)  # a kept-alive connection is not connected again
        return super().request(*args, **kwargs)  # type: ignore[misc]


class _HTTPConnection(_Watched, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter, making its connections from _Watched classes."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if manager.pool_classes_by_scheme is pool_classes_by_scheme:  # not SOCKS, which has its own classes
            manager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}
        return manager


# Errors that end a request whose socket the deadline shut (which one depends on where it was cut).
_CUT = (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException, OSError)


class _Session(requests.Session):
    """requests' session, for which no answer is a redirect: spool follows none (it could take the key elsewhere),
    and requests would still read the answer and prepare the request it redirects to, even when told not to
    follow it (for Response.next), which failed on an EZ batch's request (prepared by _ez, without cookies)."""

    def get_redirect_target(self, resp: requests.Response) -> None:
        return None


class StatHatClient:
    """One connection-reusing session to a StatHat endpoint; each request has `timeout` seconds in all."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 10.0,
                 allow_insecure: bool = False, verify: bool | str = True, identity: str | None = None):
        """`identity`: the spool this client ships (spool.lock.spool_identity), sent with every request, so a relay
        of that same spool refuses it, and its answer is known for a loop (EndpointError)."""
        self.endpoint = check_endpoint(endpoint, allow_insecure=allow_insecure)
        self.timeout = timeout
        self.identity = identity
        self.session = _Session()
        self.session.mount("http://", _DeadlineAdapter())
        self.session.mount("https://", _DeadlineAdapter())
        self.session.verify = verify
        # The environment (proxies, no_proxy, a CA bundle, ~/.netrc) is read once, here: requests would read it
        # again on every request, walking os.environ and the netrc file each time.
        self.session.trust_env = False
        self.session.proxies.update(requests.utils.get_environ_proxies(self.endpoint))
        bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
        if verify is True and bundle:
            self.session.verify = bundle
        self.session.auth = requests.utils.get_netrc_auth(self.endpoint)
        self._watchdog = _Watchdog()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers["Accept-Encoding"] = "identity"  # a tiny answer; nothing to inflate
        if identity:
            self.session.headers[IDENTITY_HEADER] = identity
        self._ez_request: requests.PreparedRequest | None = None  # an EZ batch's request but its body (see _ez)
        # The keys this client sent lately, newest last: redacted from every answer, as an answer may quote an
        # earlier request (a proxy's cache, a keep-alive mix-up), not only its own.
        self._keys: dict[str, None] = {}

    def close(self) -> None:
        """Hang up every connection now: urllib3 2 leaves a cleared pool's to the garbage collector, and an error
        still kept refers to its answer, whose pool holds them."""
        for adapter in self.session.adapters.values():  # ours, both: _DeadlineAdapter
            for manager in (getattr(adapter, "poolmanager", None), *getattr(adapter, "proxy_manager", {}).values()):
                # keys(): urllib3's pool container refuses to be iterated
                for pool in [manager.pools.get(key) for key in manager.pools.keys()] if manager else ():  # noqa: SIM118
                    if pool is not None:
                        pool.close()
        self.session.close()
        self._watchdog.close()

    def abort(self) -> None:
        """End the request in flight now (it fails as a transient error; its records stay pending), and refuse
        to wait on any later one: for a shutdown that must not wait out `timeout`."""
        self._watchdog.abort()

    def send_ez(self, ezkey: str, records: Sequence[EzRecord]) -> int | None:
        """POST one EZ JSON batch; return what `classify_response` returns."""
        return self._send_ez_body(ezkey, ez_body(ezkey, records), len(records))

    def send_ez_data(self, ezkey: str, data: str, count: int) -> int | None:
        """POST one EZ JSON batch whose `data` array is given as JSON text (`count` records); as `send_ez`."""
        return self._send_ez_body(ezkey, f'{{"ezkey":{json.dumps(ezkey)},"data":{data}}}'.encode(), count)

    def _send_ez_body(self, ezkey: str, body: bytes, count: int) -> int | None:
        keys = self._sending(ezkey)
        if self.session.cookies:  # the receiver set a cookie: each request is prepared anew to carry it
            return self._post("/ez", keys, sent=count, data=body, headers={"Content-Type": "application/json"})
        return self._answered(*self._request("POST", "/ez", keys, prepared=self._ez(body)), keys, sent=count)

    def _ez(self, body: bytes) -> requests.PreparedRequest:
        """The request for an EZ batch: the session's preparation of it (URL, headers, auth), made once, with this
        body. Preparing each request anew (merging the session's settings, cookies and hooks) cost a drain more
        CPU than building the batch; nothing it merges changes while no cookie is set."""
        template = self._ez_request
        if template is None:
            template = self._ez_request = self.session.prepare_request(requests.Request(
                "POST", self.endpoint + "/ez", data=b"{}", headers={"Content-Type": "application/json"}))
        request = requests.PreparedRequest()
        request.method, request.url, request.hooks = template.method, template.url, template.hooks
        request.headers = template.headers.copy()
        request.headers["Content-Length"] = str(len(body))
        request.body = body
        return request

    def send_classic(self, record: Record) -> int | None:
        """POST one classic counter (/c) or value (/v) as a form."""
        path, form = classic_form(record)
        return self._post(path, self._sending(record.key, record.ukey), data=form)

    def probe(self, ezkey: str | None) -> str:
        """Send an EZ JSON batch with no data (nothing is counted) and say how the endpoint answered, if it is as
        StatHat answers (doctor's check of the endpoint). Raises EndpointError for an answer that is not StatHat's,
        Refused for StatHat's refusal of the key (names_key), TransientError when it cannot be reached now."""
        keys = self._sending(ezkey)
        body = json.dumps({"ezkey": ezkey or "", "data": []}).encode()
        response, text = self._request("POST", "/ez", keys, data=body, headers={"Content-Type": "application/json"})
        status = response.status_code
        try:
            self._answered(response, text, keys, sent=None)
        except Refused as refusal:
            if refusal.names_key and ezkey:
                raise
            return f"HTTP {status}, StatHat's refusal: {refusal}"  # e.g. "no ezkey specified": no key configured
        except TransientError as exc:
            if exc.foreign:
                raise EndpointError(f"it answered an EZ batch with HTTP {status}, not StatHat's answer "
                                    f"({_quoted_answer(text, keys)})") from None
            raise
        return f"HTTP {status}" + (", status 200" if text.strip() else "")

    def _sending(self, *keys: str | None) -> tuple[str, ...]:
        """Remember the keys a request carries; return every key an answer to it must not quote."""
        for key in keys:
            if key:
                self._keys.pop(key, None)  # to the end: the newest
                self._keys[key] = None
                if len(self._keys) > MAX_KEYS_REMEMBERED:
                    del self._keys[next(iter(self._keys))]
        return tuple(self._keys)

    def _post(self, path: str, keys: tuple[str, ...], *, sent: int | None = None, **kwargs: Any) -> int | None:
        return self._answered(*self._request("POST", path, keys, **kwargs), keys, sent=sent)

    def _answered(self, response: requests.Response, body: str, keys: tuple[str, ...], *,
                  sent: int | None) -> int | None:
        if self.identity and response.headers.get(IDENTITY_HEADER) == self.identity:
            raise EndpointError(f"ship.endpoint {redact_url(self.endpoint)} is a relay of this very spool: what it "
                                f"ships would come back to it, for ever; set ship.endpoint to StatHat's API root, "
                                f"{DEFAULT_ENDPOINT}")
        answer = _answer_of(response)
        if 200 <= response.status_code <= 299 and not _framed(response) and not (answer and answer.headers_whole):
            # Its body ended where the connection closed (cleanly: _request saw to that), but an answer cut in its
            # headers reads as a whole one with no body: a refusal could hide there.
            raise TransientError(f"HTTP {response.status_code} from {self.endpoint} with no length, and headers "
                                 "cut short or malformed: where the answer ends is unknown, so it is not taken "
                                 "for a delivery")
        return classify_response(response.status_code, body, response.headers.get("Retry-After"), sent=sent,
                                 keys=keys, location=response.headers.get("Location"),
                                 content_type=response.headers.get("Content-Type"))

    def _request(self, method: str, path: str, keys: tuple[str, ...], *,
                 prepared: requests.PreparedRequest | None = None, **kwargs: Any) -> tuple[requests.Response, str]:
        deadline = _Deadline(self.timeout, self._watchdog)
        try:
            with deadline:
                if prepared is not None:  # what session.request does once a request is prepared
                    response = self.session.send(prepared, timeout=self.timeout, allow_redirects=False, stream=True)
                else:
                    response = self.session.request(method, self.endpoint + path, timeout=self.timeout,
                                                    allow_redirects=False, stream=True, **kwargs)
                with response:
                    body = _read_answer(response)
        except _CUT as exc:
            if deadline.expired or isinstance(exc, requests.Timeout):
                # No connection at all within the deadline says the link is down, not that the receiver is busy.
                raise self._cut_short(deadline, connected=not isinstance(exc, requests.ConnectTimeout)) from None
            if isinstance(exc, requests.exceptions.SSLError):
                if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc):
                    raise EndpointError(f"TLS handshake with {self.endpoint} failed: the server speaks plain "
                                        "http there (use http://, or the https port)") from None
                raise EndpointError(f"TLS failure talking to {self.endpoint}: {reason(exc, keys)}") from None
            if _unresolvable(exc):
                error = TransientError(f"cannot resolve host {urlsplit(self.endpoint).hostname}: check the "
                                       "endpoint's host name and DNS")
                error.unresolvable = True
                raise error from None
            raise TransientError(f"cannot reach {self.endpoint}: {reason(exc, keys)}") from None
        answer = _answer_of(response)
        if answer is not None and answer.length:  # bytes its Content-Length promised never came (urllib3 1.26
            # does not check): a body cut by the receiver's close, or by the deadline
            raise self._cut_short(deadline) if deadline.expired else TransientError(
                f"HTTP {response.status_code} from {self.endpoint} cut short: the connection closed before the "
                "length its answer announced")
        if deadline.expired and not _framed(response):
            raise self._cut_short(deadline)  # the body "ended" where the deadline shut the socket, not the receiver
        return response, body

    def _cut_short(self, deadline: _Deadline, *, connected: bool = True) -> TransientError:
        if deadline.aborted:  # the log must say why it ended: not the receiver's slowness
            return TransientError(f"request to {self.endpoint} cut short before its answer came: spool is stopping")
        return TransientError(f"no complete answer within {self.timeout:g} s from {self.endpoint}",
                              overload="timeout" if connected else None)


def _read_answer(response: requests.Response) -> str:
    """Return the answer body, read up to MAX_ANSWER bytes; a longer one is not StatHat's answer (transient)."""
    chunks, size = [], 0
    for chunk in response.iter_content(chunk_size=8192):
        size += len(chunk)
        if size > MAX_ANSWER:
            raise TransientError(f"HTTP {response.status_code} with an answer over {MAX_ANSWER >> 10} KiB, "
                                 "which is not StatHat's answer")
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode(response.encoding or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return b"".join(chunks).decode("utf-8", "replace")


def _unresolvable(exc: BaseException) -> bool:
    """Whether a requests error comes from a host name that does not resolve (a gaierror underneath).

    requests and urllib3 wrap the cause a few levels deep (in `args`, `reason`, `__cause__`), differently
    from version to version, so look through all of them.
    """
    todo, seen = [exc], 0
    while todo and seen < 20:
        error = todo.pop()
        seen += 1
        if isinstance(error, socket.gaierror) or type(error).__name__ == "NameResolutionError":
            return True
        todo += [e for e in (error.__cause__, error.__context__, getattr(error, "reason", None), *error.args)
                 if isinstance(e, BaseException)]
    return False


def reason(exc: Exception, keys: Iterable[str] = ()) -> str:
    """Return the gist of a requests error ("[Errno 111] Connection refused"), never a whole repr, redacted: its
    text may quote the answer (urllib3 quotes a malformed chunk size line) or a URL."""
    text = redact(str(exc), keys)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+|Connection aborted|Remote end closed connection[^'\")]*", text)
    return found.group(0) if found else text[:200]
