"""Speaking to StatHat: build EZ JSON batches and classic form posts, classify what comes back.

The only module that imports requests. Keys travel in request bodies only, so no URL, log line or
exception message built here can carry one.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import re
import socket
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import requests

from spool.config import DEFAULT_ENDPOINT
from spool.errors import ConfigError, EndpointError, Refused, TransientError
from spool.records import KIND_NAMES, Record

TRANSIENT_STATUSES = frozenset({408, 429})
USER_AGENT = "stathat-spool"


def check_endpoint(url: str, *, allow_insecure: bool = False) -> str:
    """Return the endpoint without a trailing slash; refuse plain http to a non-loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"endpoint must be an http(s) URL like {DEFAULT_ENDPOINT}, not '{url}'")
    if parts.username or parts.password or parts.query:
        raise ConfigError("endpoint must not carry credentials or a query string")
    if parts.scheme == "http" and not allow_insecure and not is_loopback(parts.hostname):
        raise ConfigError(f"endpoint {url} is plain http to a remote host; use https, "
                          "or allow it explicitly with --allow-insecure (allow_insecure = true)")
    if parts.path.rstrip("/").endswith(("/ez", "/c", "/v")):
        root = url.rstrip("/").rsplit("/", 1)[0]
        raise ConfigError(f"endpoint {url} names an API call; give the API root ({root}): spool adds /ez, "
                          "/c and /v itself")
    return url.rstrip("/")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ez_item(record: Record) -> dict[str, Any]:
    """Return one item of an EZ JSON batch's `data` array."""
    return {"stat": record.stat, KIND_NAMES[record.kind]: record.number, "t": record.t}


def classic_form(record: Record) -> tuple[str, dict[str, Any]]:
    """Return the classic API path (/c or /v) and form fields for one classic record."""
    path, field = ("/c", "count") if record.kind == 0 else ("/v", "value")
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
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def classify_response(status: int, body: str, retry_after: str | None = None) -> int | None:
    """Return the number of items the receiver said it took (None if unsaid) or raise what went wrong.

    204, or 2xx with an empty body or `{"status": 200}`: accepted. HTTP 200 with another `status` in its
    JSON body: Refused. 408, 429, 5xx: TransientError (with Retry-After). Any other status: EndpointError,
    a misconfiguration to pause on. A 2xx body that is not StatHat's JSON (a captive portal's page, a proxy's
    error) is transient: counting it as delivered could lose data.
    """
    if status in TRANSIENT_STATUSES or 500 <= status <= 599:
        raise TransientError(f"HTTP {status} {_snippet(body)}".rstrip(),
                             retry_after=retry_after_seconds(retry_after))
    if not 200 <= status <= 299:
        raise EndpointError(f"HTTP {status} from the endpoint {_snippet(body)}; check the endpoint URL".rstrip())
    if status == 204 or not body.strip():
        return None
    try:
        answer = json.loads(body)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or "status" not in answer:
        raise TransientError(f"HTTP {status} with a body that is not StatHat's answer: {_snippet(body)}")
    if answer.get("status") == 200:
        multiple = answer.get("multiple")
        return multiple if isinstance(multiple, int) else None
    message = str(answer.get("msg") or f"status {answer.get('status')}")
    raise Refused(message[:500], http_status=status, body=body, names_key="key" in message.lower())


def _snippet(body: str) -> str:
    text = " ".join(body.split())
    return f"({text[:120]})" if text else ""


class StatHatClient:
    """One connection-reusing session to a StatHat endpoint."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, *, timeout: float = 10.0,
                 allow_insecure: bool = False, verify: bool | str = True):
        self.endpoint = check_endpoint(endpoint, allow_insecure=allow_insecure)
        self.timeout = timeout
        self.session = requests.Session()
        self.session.verify = verify
        self.session.headers["User-Agent"] = USER_AGENT

    def close(self) -> None:
        self.session.close()

    def send_ez(self, ezkey: str, records: Sequence[Record]) -> int | None:
        """POST one EZ JSON batch; return what `classify_response` returns."""
        body = json.dumps({"ezkey": ezkey, "data": [ez_item(r) for r in records]}, separators=(",", ":"))
        return self._post("/ez", data=body.encode(), headers={"Content-Type": "application/json"})

    def send_classic(self, record: Record) -> int | None:
        """POST one classic counter (/c) or value (/v) as a form."""
        path, form = classic_form(record)
        return self._post(path, data=form)

    def _post(self, path: str, **kwargs: Any) -> int | None:
        try:
            response = self.session.post(self.endpoint + path, timeout=self.timeout, allow_redirects=False,
                                         **kwargs)
            body = response.text
        except requests.Timeout:
            raise TransientError(f"no answer from {self.endpoint} within {self.timeout:g} s") from None
        except requests.exceptions.SSLError as exc:
            if "WRONG_VERSION_NUMBER" in str(exc) or "wrong version number" in str(exc):
                raise EndpointError(f"TLS handshake with {self.endpoint} failed: the server speaks plain http "
                                    "there (use http://, or the https port)") from None
            raise EndpointError(f"TLS failure talking to {self.endpoint}: {reason(exc)}") from None
        except requests.RequestException as exc:
            if _unresolvable(exc):
                error = TransientError(f"cannot resolve host {urlsplit(self.endpoint).hostname}: check the "
                                       "endpoint's host name and DNS")
                error.unresolvable = True
                raise error from None
            raise TransientError(f"cannot reach {self.endpoint}: {reason(exc)}") from None
        return classify_response(response.status_code, body, response.headers.get("Retry-After"))


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


def reason(exc: Exception) -> str:
    """Return the gist of a requests error ("[Errno 111] Connection refused"), never a whole repr."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+|Connection aborted|Remote end closed connection[^'\")]*", text)
    return found.group(0) if found else text[:200]
