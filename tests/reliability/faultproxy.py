"""A link simulator: a TCP proxy on loopback that puts a bad network between the shipper and the receiver.

It reads just enough HTTP/1.1 to know where each *exchange* (one request, its answer) begins and ends, so it
keeps the client's connection alive across exchanges as a real link does (the shipper's requests Sessions
send many exchanges over one connection) and faults one exchange at a time, wherever it falls on a connection.
Towards the receiver each exchange gets a fresh connection, so nothing the receiver does can blur the count.

Faults of one exchange (`mode`, `value`):
  pass       forward the request, return the whole answer (after the link's latency, if any)
  latency    as pass, `value` seconds later
  reset      reset the connection (TCP RST) before the request reaches the receiver
  stall      hold the request silent for `value` seconds (or until the client gives up), then reset; never
             forwarded
  halfopen   hold the request silent until the client gives up (or the proxy stops); never forwarded
  truncate   forward it (the receiver takes it), return only the first `value` bytes of the answer (negative:
             all but the last -`value`), then close
  lost       forward it (the receiver takes it), then reset: the whole answer is lost

Where an exchange's fault comes from, first that applies:
  1. `next(mode, n, value)`: scripted, for the next n exchanges in arrival order;
  2. a blackhole (the `blackhole` event, or a window of the schedule): the request is held as `halfopen`; an
     answer coming back while a blackhole is on is held too (taken by the receiver, never seen by the client);
  3. the `Schedule`: its seeded per-exchange probabilities, its latency and jitter, its latency windows.

Determinism: exchanges are numbered as their requests arrive, and the schedule draws exchange k's fault from
(seed, k) alone, so one seed makes the same choices for the same exchange numbers however threads interleave.
Timing still decides which exchanges an outage window covers and whether a client gave up before its
answer came; `exchanges` records what happened to each, so a test can count the events that may duplicate.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from spool.testing import Receiver


@dataclass(frozen=True)
class Window:
    """A stretch of simulated time: a blackhole (nothing gets through) or a latency spike (`value` s more)."""

    start: float  # seconds after the simulator started
    end: float
    kind: str  # "blackhole" or "latency"
    value: float = 0.0


@dataclass(frozen=True)
class Schedule:
    """A seeded bad link: per-exchange fault probabilities, latency with jitter, windows of outage and spikes."""

    seed: int = 0
    latency: float = 0.0  # seconds added to every forwarded exchange
    jitter: float = 0.0  # plus a uniform random part of this
    faults: tuple[tuple[str, float], ...] = ()  # (mode, probability per exchange): reset, stall, truncate, lost
    stall: float = 5.0  # seconds a stall holds (longer than the client's timeout: it gives up first)
    windows: tuple[Window, ...] = ()
    # Where a truncated answer is cut (bytes kept; negative: all but that many): anywhere in the status line,
    # the headers or the body. (A cut in the headers reads to http.client as a whole answer with no body; see
    # test_a_refusal_whose_answer_is_cut_in_its_headers_is_never_taken_for_a_delivery.)
    cuts: tuple[int, ...] = (*range(160), *range(-20, 0))

    def choose(self, number: int) -> tuple[str, float]:
        """Return exchange `number`'s fault and its value, from (seed, number) alone."""
        rng = random.Random(f"{self.seed}:{number}")
        draw, delay, keep = rng.random(), self.latency + rng.uniform(0, self.jitter), rng.choice(self.cuts)
        for mode, probability in self.faults:
            if draw < probability:
                return mode, {"stall": self.stall, "truncate": keep}.get(mode, delay)
            draw -= probability
        return ("latency", delay) if delay else ("pass", 0.0)

    def window(self, at: float, kind: str) -> Window | None:
        """Return the window of `kind` open at `at` seconds, if any."""
        return next((w for w in self.windows if w.kind == kind and w.start <= at < w.end), None)

    @classmethod
    def bad_day(cls, seed: int, duration: float, *, outages: int, spikes: int, outage: tuple[float, float],
                spike: tuple[float, float], spike_latency: tuple[float, float], **link: object) -> Schedule:
        """Spread `outages` blackholes and `spikes` latency spikes over `duration`: one of each kind per equal
        slot of the day, at a seeded random time within its slot, with seeded lengths and latencies."""
        rng = random.Random(seed)
        windows = []
        for kind, n, length, extra in (("blackhole", outages, outage, (0.0, 0.0)),
                                       ("latency", spikes, spike, spike_latency)):
            slot = duration / max(1, n)
            for k in range(n):
                span = min(rng.uniform(*length), slot)
                start = k * slot + rng.uniform(0, slot - span)
                windows.append(Window(start, start + span, kind, round(rng.uniform(*extra), 3)))
        return cls(seed=seed, windows=tuple(sorted(windows, key=lambda w: w.start)), **link)  # type: ignore[arg-type]


@dataclass
class Exchange:
    """What happened to one exchange."""

    number: int
    connection: int  # the client connection it travelled on (numbered as accepted)
    mode: str
    value: float
    at: float  # seconds after the simulator started, when its request had arrived whole
    forwarded: bool = False  # the receiver got the request
    answered: bool = False  # the whole answer was handed to the client's socket
    seconds: float = 0.0  # from the request's arrival to the whole answer handed back (or to the failure)

    def may_duplicate(self, slower_than: float) -> bool:
        """Whether the receiver may have taken this request while the client saw no answer.

        True when the answer was not handed back whole, or took longer than `slower_than` (a client whose
        timeout is near that may have given up first and will send the records again).
        """
        return self.forwarded and (not self.answered or self.seconds >= slower_than)


class FaultProxy:
    """The link simulator (see the module's docstring). Use as a context manager; `url` is its address."""

    def __init__(self, upstream: Receiver, schedule: Schedule | None = None, *,
                 monotonic: Callable[[], float] = time.monotonic):
        host, port = upstream._server.server_address[:2]
        self.upstream = (host, port)
        self.schedule = schedule or Schedule()
        self.monotonic = monotonic  # the schedule's clock (injectable: windows can be tested without waiting)
        self.modes: deque[tuple[str, float]] = deque()  # scripted faults for the next exchanges
        self.blackhole = threading.Event()
        self.counts: dict[str, int] = {}  # exchanges per mode
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self._started = monotonic()
        self._healed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self._threads: list[threading.Thread] = []
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def now(self) -> float:
        """Seconds since the simulator started (the schedule's clock)."""
        return self.monotonic() - self._started

    def next(self, mode: str, n: int = 1, value: float = 0.0) -> None:
        """Give the next `n` exchanges this fault (before anything the schedule would choose)."""
        with self._lock:
            self.modes.extend([(mode, value)] * n)

    def heal(self) -> None:
        """End every fault: no more scripted faults, blackholes, windows, latency or random faults."""
        with self._lock:
            self._healed = True
            self.modes.clear()
            self.blackhole.clear()

    def __enter__(self) -> FaultProxy:
        self._started = self.monotonic()
        self._spawn(self._accept, "link-sim")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        with self._lock:
            for conn in self._open:  # wakes threads blocked reading an idle kept-alive connection
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for thread in self._threads:
            thread.join(10)
        self._listener.close()

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.connections += 1
                self._open.add(client)
                number = self.connections
            self._spawn(self._serve, "link-sim-conn", client, number)

    def _blackholed(self, at: float) -> bool:
        return not self._healed and (self.blackhole.is_set() or self.schedule.window(at, "blackhole") is not None)

    def _choose(self, connection: int) -> Exchange:
        with self._lock:
            number, at = len(self.exchanges) + 1, self.now()
            if self.modes:
                mode, value = self.modes.popleft()
            elif self._blackholed(at):
                mode, value = "halfopen", 0.0
            elif self._healed:
                mode, value = "pass", 0.0
            else:
                mode, value = self.schedule.choose(number)
                spike = self.schedule.window(at, "latency")
                if spike is not None and mode in ("pass", "latency"):
                    mode, value = "latency", value + spike.value
            exchange = Exchange(number, connection, mode, value, at)
            self.exchanges.append(exchange)
            self.counts[mode] = self.counts.get(mode, 0) + 1
            return exchange

    def _serve(self, client: socket.socket, connection: int) -> None:
        reader = _Reader(client)
        try:
            while not self._stop.is_set():
                request = reader.message()
                if request is None:
                    return  # the client closed its kept-alive connection
                exchange = self._choose(connection)
                if not self._exchange(client, request, exchange):
                    return
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(client)
            try:
                client.close()
            except OSError:
                pass

    def _exchange(self, client: socket.socket, request: bytes, exchange: Exchange) -> bool:
        """Carry one exchange through its fault; return whether the client's connection lives on."""
        started = time.monotonic()
        mode, value = exchange.mode, exchange.value
        if mode == "reset":
            _reset(client)
            return False
        if mode in ("stall", "halfopen"):
            self._hold(client, value if mode == "stall" else None)
            _reset(client)
            return False
        if mode == "latency":
            self._stop.wait(value)
            if self._stop.is_set():
                return False
        # (For truncate and lost the schedule's latency is not added: the answer is lost either way.)
        with socket.create_connection(self.upstream, timeout=30) as upstream:
            with self._lock:
                self._open.add(upstream)  # so that stopping wakes a thread waiting on a slow receiver
            try:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                upstream.sendall(request)
                exchange.forwarded = True
                answer = _Reader(upstream).message(response=True)
            finally:
                with self._lock:
                    self._open.discard(upstream)
        exchange.seconds = time.monotonic() - started
        if answer is None:  # the receiver dropped it (its own fault): the client sees the connection drop
            _reset(client)
            return False
        if mode == "lost":
            _reset(client)
            return False
        if self._blackholed(self.now()):  # the way back went dark meanwhile
            self._hold(client, None)
            _reset(client)
            return False
        if mode == "truncate":
            keep = int(value) if value >= 0 else len(answer) + int(value)
            client.sendall(answer[: max(0, min(keep, len(answer) - 1))])
            return False
        client.sendall(answer)
        exchange.answered = True
        exchange.seconds = time.monotonic() - started
        return b"\r\nconnection: close" not in answer.partition(b"\r\n\r\n")[0].lower()

    def _hold(self, client: socket.socket, seconds: float | None) -> None:
        """Answer nothing until `seconds` pass, the client gives up (closes), or the proxy stops."""
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._stop.is_set():
            left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if left <= 0:
                return
            readable, _, _ = select.select([client], [], [], left)
            if readable:
                try:
                    if not client.recv(65536):
                        return
                except OSError:
                    return


def _reset(conn: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped link or a crashed middlebox would."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class _Reader:
    """Read whole HTTP/1.1 messages (Content-Length bodies; none for a 204) from one socket, keeping the rest."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.buffer = b""

    def _fill(self) -> bool:
        chunk = self.conn.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def message(self, response: bool = False) -> bytes | None:
        """Return the next whole message, or None if the peer closed before one arrived whole."""
        try:
            while b"\r\n\r\n" not in self.buffer:
                if not self._fill():
                    return None
            head, _, _ = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
                elif name.strip().lower() == b"transfer-encoding":
                    raise OSError("chunked bodies are not simulated")
            if response and head.split(b" ")[1] == b"204":
                length = 0
            size = len(head) + 4 + length
            while len(self.buffer) < size:
                if not self._fill():
                    return None
        except (ConnectionError, TimeoutError):
            return None
        message, self.buffer = self.buffer[:size], self.buffer[size:]
        return message

