"""A small TCP proxy on loopback that injects network faults between the shipper and the receiver.

Each client connection carries one HTTP exchange (the proxy closes it after the answer), so a fault queued
with `next(...)` hits exactly the next request. Modes:
  pass      forward the request, return the whole answer
  latency   as pass, after `seconds`
  reset     close the client connection with a TCP reset before anything reaches the receiver
  halfopen  read the request, forward nothing, answer nothing, keep the connection open (until stopped)
  truncate  forward the request (the receiver takes it), return only the first `keep` bytes of the answer
While `blackhole` is on, every connection is treated as halfopen.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import deque

from spool.testing import Receiver


class FaultProxy:
    def __init__(self, upstream: Receiver):
        host, port = upstream._server.server_address[:2]
        self.upstream = (host, port)
        self.modes: deque[tuple[str, float]] = deque()
        self.blackhole = threading.Event()
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def next(self, mode: str, n: int = 1, value: float = 0.0) -> None:
        with self._lock:
            self.modes.extend([(mode, value)] * n)

    def __enter__(self) -> FaultProxy:
        thread = threading.Thread(target=self._accept, name="fault-proxy", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            for conn in self._open:
                try:
                    conn.close()
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                mode = ("halfopen", 0.0) if self.blackhole.is_set() else (
                    self.modes.popleft() if self.modes else ("pass", 0.0))
                self.counts[mode[0]] = self.counts.get(mode[0], 0) + 1
                self._open.append(client)
            thread = threading.Thread(target=self._serve, args=(client, *mode), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, client: socket.socket, mode: str, value: float) -> None:
        try:
            client.settimeout(10)
            if mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            request = _read_message(client)
            if request is None:
                return
            if mode == "halfopen":
                self._stop.wait()  # hold it open, silent, until the proxy stops
                return
            if mode == "latency":
                self._stop.wait(value)
            with socket.create_connection(self.upstream, timeout=10) as upstream:
                upstream.sendall(request)
                answer = _read_message(upstream, response=True) or b""
            client.sendall(answer[: int(value)] if mode == "truncate" else answer)
        except OSError:
            pass
        finally:
            try:
                client.close()
            except OSError:
                pass


def _read_message(conn: socket.socket, response: bool = False) -> bytes | None:
    """Read one HTTP/1.1 message with a Content-Length body (or none, for 204)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if response and head.split(b" ")[1] == b"204":
        length = 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
