"""An open-loop HTTP/1.1 load generator: request i leaves at t0 + i/rate, whatever came before.

Why: a closed-loop generator (wrk, or hey within each worker) sends a connection's next request
only once the previous one is answered, so a slow answer delays every request queued behind it,
the rate drops, and the stall never reaches the percentiles (coordinated omission). Here the
schedule is fixed before the run, and each latency runs from the request's *scheduled* send time
to the arrival of the last byte of its answer: a stall in the target, or in this generator, shows
up in the tail instead of being hidden.

How:
  - a periodic Linux timerfd (CLOCK_MONOTONIC, absolute, nanoseconds) expires once per request
    and wakes the event loop; asyncio's and uvloop's own timers round to whole milliseconds,
    which at 1,000 requests/s would add up to a millisecond to every send;
  - keep-alive connections, one request in flight on each: a request takes an idle connection,
    or opens a new one when none is idle (up to ``--connections-max``); beyond that it is not
    sent and counts as ``late``, an error;
  - answers are parsed with httptools; only 2xx answers count as successes. The errors, by kind:
    ``late`` (no connection to send on), ``connect`` (could not open one), ``timeout`` (not
    answered ``--timeout`` after the scheduled time; the connection is dropped), ``closed``
    (the target closed the connection first), ``status`` (not 2xx), ``malformed`` and
    ``unsolicited`` (bytes that are no answer to a request);
  - it runs as its own process, so its CPU time is nobody else's and the target's measurements
    (``/proc`` of the proxies) stay clean; the event loop is uvloop when installed (``--loop``).

It prints one JSON object: the achieved rate, counts, errors by kind, latency percentiles in
microseconds, and ``lag_*_us``: how late after its scheduled time this generator took each
request up (timer wake-up and event-loop delay, before any connect or write), the generator's
own share of the latencies.

    python bench/openloop.py --url http://127.0.0.1:8080/ --rate 1000 --seconds 10 \\
        [--connections-max 64] [--timeout 5] [--loop auto|asyncio|uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
import typing
import urllib.parse
from collections.abc import Sequence

import httptools

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from meshward import errors

CLOCK_MONOTONIC = 1
TFD_TIMER_ABSTIME = 1
SWEEP_SECONDS = 0.05
READ_BUFFER_BYTES = 65536
START_DELAY_NS = 20_000_000
"""The schedule starts this long after the warm-up, so the timer is armed in the future."""
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9), ("max", 100.0))


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the requests go, and the bytes of the one request sent over and over."""

    url: str
    host: str
    port: int
    request: bytes


@dataclasses.dataclass(frozen=True)
class Result:
    """One run, as printed."""

    url: str
    loop: str
    rate_target: float
    seconds: float
    scheduled: int
    rate: float
    """Successful answers per second, from the first scheduled send to the last answer (or the
    end of the schedule, when later)."""
    count: int
    """Requests answered 2xx."""
    errors: int
    """Requests not answered 2xx in time, whatever the reason (``error_kinds``)."""
    error_kinds: dict[str, int]
    connections: int
    """Connections opened or attempted, the warm-up's included."""
    latency_us: dict[str, float]
    """Percentiles of scheduled send time to the last byte of a 2xx answer."""
    lag_us: dict[str, float]
    """Percentiles of scheduled send time to the moment this generator took the request up."""

    def to_json(self) -> str:
        doc = {
            k: v for k, v in dataclasses.asdict(self).items() if k not in ("latency_us", "lag_us")
        }
        doc |= {f"{name}_us": value for name, value in self.latency_us.items()}
        doc |= {f"lag_{name}_us": value for name, value in self.lag_us.items()}
        return json.dumps(doc)


def parse_target(url: str) -> Target:
    """The target of ``--url``: plain ``http://host:port/path`` only, with a clear error else."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        raise errors.ConfigError(
            f"--url {url!r}: only plain http:// URLs are supported (the proxies under test do "
            "the TLS); give http://HOST:PORT/PATH"
        )
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise errors.ConfigError(f"--url {url!r}: the port is not a number 1-65535") from exc
    if not parts.hostname:
        raise errors.ConfigError(f"--url {url!r} names no host: give http://HOST:PORT/PATH")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    host_header = parts.netloc.rpartition("@")[2]
    request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: openloop\r\n\r\n"
    return Target(url, parts.hostname, port, request.encode("ascii"))


# -- the schedule's clock ---------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


class _Itimerspec(ctypes.Structure):
    _fields_ = (("it_interval", _Timespec), ("it_value", _Timespec))


def _timespec(ns: int) -> _Timespec:
    return _Timespec(ns // 1_000_000_000, ns % 1_000_000_000)


class Ticker:
    """A periodic timerfd expiring at ``start_ns + k * interval_ns`` (CLOCK_MONOTONIC, the clock
    of ``time.monotonic_ns``), read without blocking; for the event loop to wait on."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.timerfd_create.argtypes = (ctypes.c_int, ctypes.c_int)
        self._libc.timerfd_create.restype = ctypes.c_int
        self._libc.timerfd_settime.argtypes = (
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_Itimerspec),
            ctypes.POINTER(_Itimerspec),
        )
        self._libc.timerfd_settime.restype = ctypes.c_int
        fd = self._libc.timerfd_create(CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise errors.MeshwardError(
                f"timerfd_create failed ({os.strerror(err)}): the generator needs Linux's timerfd"
            )
        self.fd: int = fd

    def arm(self, start_ns: int, interval_ns: int) -> None:
        spec = _Itimerspec(_timespec(interval_ns), _timespec(start_ns))
        if self._libc.timerfd_settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
            err = ctypes.get_errno()
            raise errors.MeshwardError(f"timerfd_settime failed: {os.strerror(err)}")

    def expirations(self) -> int:
        """Expirations since the last read; 0 when there were none (a spurious wake-up)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), sys.byteorder)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)


# -- connections --------------------------------------------------------------------------


class Connection(asyncio.BufferedProtocol):
    """One keep-alive connection with at most one request in flight.

    Answers are read into one buffer per connection: ``data_received`` would get a fresh bytes
    object per read, which asyncio allocates at 256 KiB and so maps and unmaps on every answer.

    With one small request in flight, the write buffer never holds more than that request;
    still, a connection whose transport asked to pause writing is not given another.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.scheduled: int | None = None
        """Scheduled send time (ns) of the request in flight, None when idle."""
        self.buffer = memoryview(bytearray(READ_BUFFER_BYTES))
        self.arrived = 0
        self.paused = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = typing.cast(asyncio.Transport, transport)

    def send(self, scheduled: int) -> None:
        assert self.transport is not None
        self.scheduled = scheduled
        self.transport.write(self.pool.target.request)

    def usable(self) -> bool:
        return not self.closed and not self.paused and self.scheduled is None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.arrived = time.monotonic_ns()
        if self.scheduled is None:
            self.pool.drop(self, "unsolicited")
            return
        try:
            self.parser.feed_data(self.buffer[:nbytes])
        except httptools.HttpParserError:
            self.pool.drop(self, "malformed")

    def on_message_complete(self) -> None:
        scheduled, self.scheduled = self.scheduled, None
        if scheduled is None:
            return
        status = self.parser.get_status_code()
        keep_alive = self.parser.should_keep_alive()
        self.pool.answered(self, scheduled, self.arrived, status, keep_alive)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)


class Pool:
    """The run: the schedule, the connections, and the tally of answers."""

    def __init__(
        self,
        target: Target,
        rate: float,
        seconds: float,
        connections_max: int,
        timeout: float,
    ) -> None:
        self.target = target
        self.loop = asyncio.get_running_loop()
        self.interval_ns = max(1, round(1e9 / rate))
        self.total = max(1, round(rate * seconds))
        self.connections_max = connections_max
        self.timeout_ns = int(timeout * 1e9)
        self.t0 = 0
        self.next_index = 0
        self.inflight = 0
        self.opened = 0
        self.last_arrival = 0
        self.connections: set[Connection] = set()
        self.idle: collections.deque[Connection] = collections.deque()
        self.connecting: set[asyncio.Task[None]] = set()
        self.latencies: list[int] = []
        self.lags: list[int] = []
        self.failures: collections.Counter[str] = collections.Counter()
        self.done = asyncio.Event()
        self.probe: asyncio.Future[int] | None = None

    # Opening, probing, closing.

    async def open(self, timeout_ns: int) -> Connection:
        """A new connection, counted against ``--connections-max`` while open."""
        self.opened += 1
        _, conn = await asyncio.wait_for(
            self.loop.create_connection(
                lambda: Connection(self), self.target.host, self.target.port
            ),
            max(0, timeout_ns) / 1e9,
        )
        return conn

    async def warm_up(self) -> None:
        """One request before the schedule: the target must answer 2xx, and the connection
        it used is the first idle one (so request 0 does not pay for a connect)."""
        try:
            conn = await self.open(self.timeout_ns)
        except (OSError, TimeoutError) as exc:
            raise errors.MeshwardError(
                f"cannot connect to {self.target.url} ({exc or 'timed out'}): start the target "
                "first, or fix --url"
            ) from exc
        self.connections.add(conn)
        self.probe = self.loop.create_future()
        conn.send(time.monotonic_ns())
        try:
            status = await asyncio.wait_for(self.probe, self.timeout_ns / 1e9)
        except TimeoutError as exc:
            raise errors.MeshwardError(
                f"{self.target.url} did not answer a first GET within {self.timeout_ns / 1e9:g} s"
            ) from exc
        finally:
            self.probe = None
        if not 200 <= status < 300:
            raise errors.MeshwardError(
                f"{self.target.url} answered a first GET with status {status}, not 2xx: point "
                "--url at a path that succeeds"
            )

    def close(self) -> None:
        for task in self.connecting:
            task.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()

    # The schedule.

    def start(self, ticker: Ticker) -> None:
        self.t0 = time.monotonic_ns() + START_DELAY_NS
        self.loop.add_reader(ticker.fd, self.on_tick, ticker)
        ticker.arm(self.t0, self.interval_ns)
        self.loop.call_later(SWEEP_SECONDS, self.sweep)

    def on_tick(self, ticker: Ticker) -> None:
        for _ in range(ticker.expirations()):
            if self.next_index >= self.total:
                break
            scheduled = self.t0 + self.next_index * self.interval_ns
            self.next_index += 1
            self.dispatch(scheduled)
        if self.next_index >= self.total:
            self.loop.remove_reader(ticker.fd)
            self.settle()

    def dispatch(self, scheduled: int) -> None:
        self.lags.append(time.monotonic_ns() - scheduled)
        while self.idle:
            conn = self.idle.pop()
            if conn.usable():
                self.inflight += 1
                conn.send(scheduled)
                return
        if len(self.connections) + len(self.connecting) >= self.connections_max:
            self.failures["late"] += 1
            return
        self.inflight += 1
        task = self.loop.create_task(self.connect_and_send(scheduled))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    async def connect_and_send(self, scheduled: int) -> None:
        """Open a connection for the request scheduled at ``scheduled``; connecting counts
        against the request's ``--timeout``."""
        try:
            conn = await self.open(scheduled + self.timeout_ns - time.monotonic_ns())
        except (OSError, TimeoutError):
            self.fail("connect")
            return
        if conn.closed:
            self.fail("closed")
            return
        self.connections.add(conn)
        conn.send(scheduled)

    def sweep(self) -> None:
        """Fail each request still unanswered ``--timeout`` after its scheduled time."""
        now = time.monotonic_ns()
        for conn in list(self.connections):
            if conn.scheduled is not None and now - conn.scheduled > self.timeout_ns:
                self.drop(conn, "timeout")
        if not self.done.is_set():
            self.loop.call_later(SWEEP_SECONDS, self.sweep)

    # Answers and failures.

    def answered(
        self, conn: Connection, scheduled: int, arrived: int, status: int, keep_alive: bool
    ) -> None:
        if self.probe is not None:
            self.probe.set_result(status)
        elif 200 <= status < 300:
            self.latencies.append(arrived - scheduled)
            self.last_arrival = max(self.last_arrival, arrived)
            self.inflight -= 1
        else:
            self.fail("status")
        if keep_alive and not conn.closed:
            self.idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        self.settle()

    def drop(self, conn: Connection, kind: str) -> None:
        """Give up on ``conn``'s request as a ``kind`` failure, and on the connection."""
        if conn.scheduled is not None:
            conn.scheduled = None
            self.fail(kind)
        if conn.transport is not None:
            conn.transport.abort()

    def lost(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.scheduled is not None:
            conn.scheduled = None
            self.fail("closed")

    def fail(self, kind: str) -> None:
        if self.probe is not None:
            if not self.probe.done():
                self.probe.set_exception(
                    errors.MeshwardError(f"the first GET to {self.target.url} failed: {kind}")
                )
            return
        self.failures[kind] += 1
        self.inflight -= 1
        self.settle()

    def settle(self) -> None:
        if self.next_index >= self.total and self.inflight == 0:
            self.done.set()

    def result(self, loop_name: str, rate: float, seconds: float) -> Result:
        end = max(self.last_arrival, self.t0 + self.total * self.interval_ns)
        return Result(
            url=self.target.url,
            loop=loop_name,
            rate_target=rate,
            seconds=seconds,
            scheduled=self.total,
            rate=round(len(self.latencies) / ((end - self.t0) / 1e9), 1),
            count=len(self.latencies),
            errors=sum(self.failures.values()),
            error_kinds=dict(sorted(self.failures.items())),
            connections=self.opened,
            latency_us=percentiles_us(self.latencies),
            lag_us=percentiles_us(self.lags),
        )


def percentiles_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """Nearest-rank percentiles of ``samples_ns``, in microseconds to 0.1 (empty: all 0)."""
    ordered = sorted(samples_ns)
    out: dict[str, float] = {}
    for name, pct in PERCENTILES:
        rank = max(1, math.ceil(pct / 100 * len(ordered)))
        out[name] = round(ordered[rank - 1] / 1000, 1) if ordered else 0.0
    return out


async def run(
    target: Target, rate: float, seconds: float, connections_max: int, timeout: float
) -> Pool:
    pool = Pool(target, rate, seconds, connections_max, timeout)
    ticker = Ticker()
    try:
        await pool.warm_up()
        # Everything allocated so far lives for the run: keep the collector off it, so a full
        # collection during the run has little to walk (a pause would land in the tail).
        gc.collect()
        gc.freeze()
        pool.start(ticker)
        await pool.done.wait()
    finally:
        if pool.t0:
            pool.loop.remove_reader(ticker.fd)
        ticker.close()
        pool.close()
        # Let the aborted transports report connection_lost before the loop goes.
        await asyncio.sleep(0)
    return pool


def pick_loop(choice: str) -> str:
    """``auto`` is uvloop when it is installed (it measured faster), else asyncio."""
    if choice == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    if choice == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise errors.ConfigError("--loop uvloop: uvloop is not installed (pip install uvloop)")
    return choice


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="http://HOST:PORT/PATH to GET")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True, help="length of the schedule")
    parser.add_argument(
        "--connections-max", type=int, default=64, help="open connections at most (default 64)"
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds before an unanswered request fails"
    )
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 1e6:
        parser.error(f"--rate {args.rate:g}: give requests per second, more than 0, at most 1e6")
    if not args.seconds > 0 or args.rate * args.seconds < 1:
        parser.error(f"--seconds {args.seconds:g}: give a positive length of at least 1/rate")
    if args.connections_max < 1:
        parser.error(f"--connections-max {args.connections_max}: give at least 1")
    if not args.timeout > 0:
        parser.error(f"--timeout {args.timeout:g}: give a positive number of seconds")
    try:
        target = parse_target(args.url)
        loop_name = pick_loop(args.loop)
        factory = (
            importlib.import_module("uvloop").new_event_loop if loop_name == "uvloop" else None
        )
        with asyncio.Runner(loop_factory=factory) as runner:
            pool = runner.run(
                run(target, args.rate, args.seconds, args.connections_max, args.timeout)
            )
    except errors.MeshwardError as exc:
        print(f"openloop: {exc}", file=sys.stderr)
        return 1
    print(pool.result(loop_name, args.rate, args.seconds).to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
