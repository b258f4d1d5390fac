"""A StatHat-compatible receiver on loopback, with scriptable faults, for spool's tests and yours.

    with Receiver() as receiver:
        receiver.fail_next(3)                 # the next 3 requests get 503
        ... ship to receiver.url ...
        assert receiver.accepted == [...]

It answers as the real service does (see STATHAT.md): 204 for a single call, 200 with
{"status":200,"msg":"ok"} for `vb=1`, 200 with {"status":200,"msg":"ok","multiple":N} for a JSON batch,
and refusals as HTTP 200 with {"status":500,"msg":...}. Run `python -m spool.testing` for a standalone one.
"""

from __future__ import annotations

import fnmatch
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

OVERLOADED = "Back-end server is at capacity"


@dataclass
class _Fault:
    action: str  # "status", "reset", "reset_after_accept", "stall", "hold_after_accept", "trickle", "echo"
    status: int = 503
    body: str = OVERLOADED  # for "echo": the template, {request} and {request_json} replaced
    cut: int | None = None  # for "echo": bytes of the answer sent at most
    retry_after: str | None = None
    seconds: float = 0.0
    rate: float = 1.0  # bytes a second, for "trickle"


class Receiver:
    """A real HTTP server on 127.0.0.1 (port 0 by default) that records every stat it accepts."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.accepted: list[dict[str, Any]] = []  # every stat taken, in arrival order
        self.requests = 0  # every request seen, faulted or not
        self.batches: list[int] = []  # size of every JSON batch accepted
        self._faults: list[_Fault] = []
        self._refused_stats: dict[str, str] = {}
        self._refused_keys: set[str] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self.holding = threading.Event()  # set while a request taken by hold_after_accept_next is held
        self.latency = 0.0  # seconds every answer waits (a long link), set at will
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most requests it ever answered at once
        self._server = _QuietServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- scripting faults -------------------------------------------------------------------------

    def pass_next(self, n: int) -> None:
        """Serve the next `n` requests normally (to place a later fault at a given request)."""
        self._add(n, _Fault("pass"))

    def fail_next(self, n: int, status: int = 503, body: str = OVERLOADED,
                  retry_after: str | None = None) -> None:
        """Answer the next `n` requests with `status` (503 "at capacity" unless told otherwise)."""
        self._add(n, _Fault("status", status=status, body=body, retry_after=retry_after))

    def rate_limit_next(self, n: int, retry_after: str = "1") -> None:
        """Answer the next `n` requests with 429 and a Retry-After header."""
        self.fail_next(n, status=429, body="Too Many Requests", retry_after=retry_after)

    def echo_next(self, n: int, status: int = 502, template: str = "{request}", cut: int | None = None) -> None:
        """Answer the next `n` requests with the request body they carried, untaken, as a proxy or WAF may.

        `template` places it: `{request}` is the body as it came, `{request_json}` the same as a JSON string
        (so `'{"status":500,"msg":{request_json}}'` is a StatHat refusal quoting it). `cut`: send at most this
        many bytes of the answer (a proxy that quotes the start of a request).
        """
        self._add(n, _Fault("echo", status=status, body=template, cut=cut))

    def reset_next(self, n: int) -> None:
        """Drop the connection of the next `n` requests without reading them or answering."""
        self._add(n, _Fault("reset"))

    def reset_after_accept_next(self, n: int) -> None:
        """Take the next `n` requests (their stats count as accepted), then drop the connection unanswered."""
        self._add(n, _Fault("reset_after_accept"))

    def hold_after_accept_next(self, n: int, seconds: float) -> None:
        """Take the next `n` requests, then hold them unanswered for `seconds` (set `holding` meanwhile)."""
        self._add(n, _Fault("hold_after_accept", seconds=seconds))

    def stall_next(self, n: int, seconds: float) -> None:
        """Hold the next `n` requests for `seconds` (past the client's timeout), then drop them untaken."""
        self._add(n, _Fault("stall", seconds=seconds))

    def trickle_next(self, n: int, bytes_per_second: float = 1.0) -> None:
        """Take the next `n` requests, then send the whole answer (status line included) a byte at a time."""
        self._add(n, _Fault("trickle", rate=bytes_per_second))

    def refuse_stat(self, stat: str, msg: str = "invalid stat name") -> None:
        """Refuse every request that carries `stat` (a glob: `bad*`), as StatHat refuses: HTTP 200, status 500."""
        with self._lock:
            self._refused_stats[stat] = msg

    def refuse_key(self, key: str) -> None:
        """Refuse every request made with this ezkey (or classic key) with "invalid keys"."""
        with self._lock:
            self._refused_keys.add(key)

    def _add(self, n: int, fault: _Fault) -> None:
        with self._lock:
            self._faults.extend([fault] * n)

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            self.requests += 1
            fault = self._faults.pop(0) if self._faults else None
            return None if fault is not None and fault.action == "pass" else fault

    # -- running ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Receiver:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="spool-test-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        with self._lock:
            for conn in list(self._connections):  # wake handlers blocked on idle keep-alive sockets
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> list[tuple[Any, ...]]:
        """Return the accepted stats as sortable tuples (stat or key, kind, number, t, key), for multisets."""
        with self._lock:
            return sorted((a.get("stat") or a["key"], a["kind"], a["number"], a["t"],
                           a.get("ezkey") or a.get("ukey")) for a in self.accepted)

    # -- the protocol -------------------------------------------------------------------------------

    def _take(self, items: list[dict[str, Any]]) -> tuple[int, dict[str, Any] | None]:
        """Validate items as StatHat does; return (count taken, refusal body or None)."""
        for item in items:
            refusal = self._refusal(item)
            if refusal is not None:
                return 0, {"status": 500, "msg": refusal}
        with self._lock:
            self.accepted.extend(items)
        return len(items), None

    def _refusal(self, item: dict[str, Any]) -> str | None:
        if "key" in item or "ukey" in item:
            if not item.get("key") or not item.get("ukey"):
                return "invalid keys"
        elif not item.get("ezkey"):
            return "no ezkey specified"
        elif not item.get("stat"):
            return "no stat specified"
        if item.get("number") is None:
            return "no count or value specified"
        with self._lock:
            if item.get("ezkey") in self._refused_keys or item.get("key") in self._refused_keys:
                return "invalid keys"
            stat = item.get("stat") or ""
            return next((msg for pattern, msg in self._refused_stats.items() if fnmatch.fnmatchcase(stat, pattern)),
                        None)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "spool-test-receiver"

            def log_message(self, format: str, *args: Any) -> None:  # quiet by design
                pass

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in separate writes: without this, Nagle's algorithm holds the body
                # until the client's delayed ACK (~40 ms per answer on a keep-alive connection).
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                with receiver._lock:
                    receiver._connections.discard(self.connection)
                super().finish()

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path == "/":  # a ping (spool doctor's): answers at once, or trickles if told to
                    fault = receiver._next_fault()
                    if fault is not None and fault.action == "trickle":
                        self._trickle({"status": 200, "msg": "ok"}, fault.rate)
                    else:
                        self._answer(200, b"", "text/plain")
                    return
                self._serve(parts.path, parse_qs(parts.query, keep_blank_values=True), None)

            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                try:
                    if receiver.latency:
                        receiver._stopping.wait(receiver.latency)
                    self._post()
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1

            def _post(self) -> None:
                fault = receiver._next_fault()
                length = int(self.headers.get("Content-Length") or 0)
                if fault is not None and fault.action == "reset":
                    self._reset()
                    return
                raw = self.rfile.read(length)
                if fault is not None and fault.action == "stall":
                    receiver._stopping.wait(fault.seconds)
                    self._reset()
                    return
                if fault is not None and fault.action == "echo":
                    request = raw.decode("utf-8", "replace")
                    echoed = fault.body.replace("{request_json}", json.dumps(request)).replace("{request}", request)
                    self._answer(fault.status, echoed.encode()[:fault.cut], "text/plain")
                    return
                if fault is not None and fault.action == "status":
                    headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                    self._answer(fault.status, fault.body.encode(), "text/plain", headers)
                    return
                parts = urlsplit(self.path)
                query = parse_qs(parts.query, keep_blank_values=True)
                if (self.headers.get("Content-Type") or "").startswith("application/json"):
                    self._serve(parts.path, query, raw, fault)
                else:
                    form = parse_qs(raw.decode("utf-8", "replace"), keep_blank_values=True)
                    self._serve(parts.path, {**query, **form}, None, fault)

            def _serve(self, path: str, form: dict[str, list[str]], json_body: bytes | None,
                       fault: _Fault | None = None) -> None:
                if path not in ("/ez", "/c", "/v"):
                    self._answer(404, b"404 page not found\n", "text/plain")
                    return
                if json_body is not None:
                    taken, refusal = self._take_json(json_body)
                    answer: dict[str, Any] | None = refusal or {"status": 200, "msg": "ok", "multiple": taken}
                else:
                    taken, refusal = receiver._take([_form_item(path, form)])
                    verbose = form.get("vb", [""])[0] == "1"
                    answer = refusal or ({"status": 200, "msg": "ok"} if verbose else None)
                if fault is not None and fault.action == "hold_after_accept":
                    receiver.holding.set()
                    receiver._stopping.wait(fault.seconds)
                    receiver.holding.clear()
                    self._reset()
                elif fault is not None and fault.action == "trickle":
                    self._trickle(answer, fault.rate)
                elif fault is not None:  # reset_after_accept
                    self._reset()
                elif answer is None:
                    self._answer(204, b"", None)
                else:
                    self._answer(200, json.dumps(answer, separators=(",", ":")).encode(), "application/json")

            def _take_json(self, raw: bytes) -> tuple[int, dict[str, Any] | None]:
                try:
                    body = json.loads(raw)
                    data = body["data"]
                    ezkey = body.get("ezkey") or body.get("email")
                    items = [_json_item(item, ezkey) for item in data]
                except (ValueError, KeyError, TypeError, AttributeError):
                    return 0, {"status": 500, "msg": "invalid json"}
                if not ezkey:
                    return 0, {"status": 500, "msg": "no ezkey specified"}
                with receiver._lock:
                    receiver.batches.append(len(items))
                return receiver._take(items)

            def _answer(self, status: int, body: bytes, content_type: str | None,
                        headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                if content_type:
                    self.send_header("Content-Type", content_type)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                if status != 204:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if status != 204:
                    self.wfile.write(body)

            def _trickle(self, answer: dict[str, Any] | None, rate: float) -> None:
                """Send a complete, valid answer, so slowly that only a deadline for the whole of it ends it."""
                body = json.dumps(answer or {"status": 200, "msg": "ok"}).encode()
                raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                self.close_connection = True
                for i in range(len(raw)):
                    if receiver._stopping.wait(1 / rate):
                        return
                    try:
                        self.connection.sendall(raw[i:i + 1])
                    except OSError:
                        return  # the client gave up: what it should do

            def _reset(self) -> None:
                """Close with a TCP reset and no answer at all."""
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

        return Handler


class _QuietServer(ThreadingHTTPServer):
    """A client that hangs up (a shipper killed, a timeout) is ordinary here: no traceback for it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


def _number(text: str | None) -> int | float | None:
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return None


def _form_item(path: str, form: dict[str, list[str]]) -> dict[str, Any]:
    first = {name: values[0] for name, values in form.items()}
    t = _number(first.get("t"))
    item: dict[str, Any] = {"t": int(t) if t is not None else int(time.time())}
    if path == "/ez":
        item.update(stat=first.get("stat"), ezkey=first.get("ezkey") or first.get("email"))
    else:
        item.update(key=first.get("key"), ukey=first.get("ukey"))
    if path == "/c" or (path == "/ez" and "count" in first):
        item.update(kind="count", number=_number(first.get("count", "1")))
    else:
        item.update(kind="value", number=_number(first.get("value")))
    return item


def _json_item(raw: dict[str, Any], ezkey: str | None) -> dict[str, Any]:
    kind = "count" if "count" in raw else "value"
    number = raw.get(kind)
    t = raw.get("t")
    return {"stat": raw.get("stat"), "ezkey": ezkey, "kind": kind,
            "number": number if isinstance(number, int | float) and not isinstance(number, bool) else None,
            "t": int(t) if isinstance(t, int | float) else int(time.time())}


def main(argv: list[str] | None = None) -> int:
    """Run a receiver in the foreground and print what it takes: `python -m spool.testing --help`."""
    import argparse
    import signal
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m spool.testing",
        description="A StatHat-compatible receiver on loopback that prints every stat it takes (keys shortened). "
                    "Point spool at it: SPOOL_ENDPOINT=http://127.0.0.1:8000 spool ship --once",
        epilog="Example: python -m spool.testing --port 8000 --refuse-stat 'bad *' --fail-next 3")
    parser.add_argument("port_arg", nargs="?", type=int, metavar="PORT", help="the port (same as --port)")
    parser.add_argument("--port", type=int, default=8000, help="the port on 127.0.0.1 (0: any free one); default 8000")
    parser.add_argument("--refuse-stat", action="append", default=[], metavar="GLOB",
                        help="refuse stats whose name matches, as StatHat does (they become dead letters); repeatable")
    parser.add_argument("--fail-next", type=int, default=0, metavar="N",
                        help="answer the next N requests 503 'at capacity' (spool retries them)")
    parser.add_argument("--latency", type=float, default=0.0, metavar="SECONDS", help="delay every answer")
    args = parser.parse_args(argv)
    port = args.port_arg if args.port_arg is not None else args.port
    try:
        receiver = Receiver(port=port)
    except OSError as exc:
        print(f"spool.testing: error: cannot listen on 127.0.0.1:{port}: {exc.strerror} (is another receiver "
              "running? try --port 0)", file=sys.stderr)
        return 1
    for pattern in args.refuse_stat:
        receiver.refuse_stat(pattern)
    receiver.fail_next(args.fail_next)
    receiver.latency = args.latency
    receiver.start()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print(f"StatHat-compatible test receiver on {receiver.url} (Ctrl-C to stop)", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.5)
            for item in receiver.accepted[seen:]:
                shown = {name: (value[:3] + "…" if name in ("ezkey", "key", "ukey") and value else value)
                         for name, value in item.items()}  # keys are secrets, even here
                print(json.dumps(shown, sort_keys=True, ensure_ascii=False), flush=True)
            seen = len(receiver.accepted)
    except KeyboardInterrupt:
        receiver.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
