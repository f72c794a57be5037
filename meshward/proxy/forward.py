"""Copy bytes both ways between two connections until both sides are done.

The contract every proxied connection relies on:
- backpressure: a side is read at most ``CHUNK`` bytes at a time, and not at all while the other
  side's transport holds more than its high-water mark, so a slow peer slows its sender instead
  of growing a buffer (at most one chunk beyond the mark is ever buffered);
- half-close: when one side finishes sending, the other side is told (``write_eof``) and may go
  on sending the other way. asyncio's TLS transport can not half-close: when the direction
  towards a TLS leg ends, the other direction may go on while it keeps moving (a reply that
  does not wait for the EOF still arrives) and the connection is closed both ways once it has
  been idle for ``half_close_grace`` seconds, instead of waiting forever for an EOF the peer can
  not see. A caller that knows the ended side is done for good passes 0: the inbound side does
  for its application, since a server that closes its side has answered all it will, and the
  client's proxy then sees the close at once rather than after its own grace;
- cleanup: both connections are closed on every path, errors and cancellation included;
- metrics: the bytes copied are counted as they flow, so a connection cut short (an error, or a
  policy update aborting its transports) still counts what it carried.

Why protocols: a proxied request is a handful of small chunks, and a coroutine step per chunk
(read, write, drain, in two tasks) cost more than the copying. :func:`splice` hands both
transports to small protocols that write what one side receives straight to the other from the
event loop's own callbacks, with flow control wired transport to transport. Streams are taken
over when they come from :class:`StreamProtocol` (:func:`open_connection`, :func:`start_server`,
or a caller's own), which remembers an EOF received before the hand-over; bytes a stream had
already buffered are passed on first, so nothing read before the decision is lost. Other
asyncio streams are copied by a coroutine per direction, under the same contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import threading
import typing
from collections.abc import Awaitable, Callable

CHUNK = 64 * 1024
HALF_CLOSE_GRACE = 5.0
"""How long the other direction may stay idle after one ended on a leg that can not half-close.
Every connection waiting out its grace holds its buffers, so this is short."""
CLOSE_TIMEOUT = 5.0
"""How long a closing side may take to flush what it was sent before it is aborted."""

_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclasses.dataclass
class Transferred:
    """Bytes copied each way, for metrics: kept up to date as they flow, so a connection cut
    short (an error, or a policy update closing it) still counts what it carried."""

    a_to_b: int = 0
    b_to_a: int = 0


class StreamProtocol(asyncio.StreamReaderProtocol):
    """A stream protocol that remembers whether the peer finished sending, so that
    :func:`splice` can take the connection over without losing an EOF that came first."""

    eof = False

    def eof_received(self) -> bool | None:
        self.eof = True
        return super().eof_received()


async def open_connection(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None
) -> _Stream:
    """:func:`asyncio.open_connection`, with streams :func:`splice` can take over."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CHUNK, loop=loop)
    protocol = StreamProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port, ssl=ssl_context)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
) -> asyncio.Server:
    """:func:`asyncio.start_server`, with streams :func:`splice` can take over."""
    loop = asyncio.get_running_loop()

    def accepted() -> StreamProtocol:
        return StreamProtocol(asyncio.StreamReader(limit=CHUNK, loop=loop), handler, loop=loop)

    return await loop.create_server(accepted, host, port)


class _Scratch(threading.local):
    """The buffer legs receive into, one per thread (so per event loop): every chunk is copied
    out in the same callback, so one buffer serves every connection, where one per leg would
    hold ``CHUNK`` for each idle connection."""

    def __init__(self) -> None:
        self.buffer = bytearray(CHUNK)
        self.view = memoryview(self.buffer)


_SCRATCH = _Scratch()


class _Splice:
    """What the two legs of one splice share: the tally, each side's state, how it is going.

    Side 0 is ``a``, side 1 is ``b``. The legs reach each other only through their transports
    (whose protocol each is, until it is lost), so nothing of a finished splice waits for the
    cyclic garbage collector."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tally: Transferred) -> None:
        self.tally = tally
        self.eof = [False, False]
        """Each side finished sending."""
        self.lost = [False, False]
        self.closed: tuple[asyncio.Future[None], asyncio.Future[None]] = (
            loop.create_future(),
            loop.create_future(),
        )
        self.ended: asyncio.Future[None] = loop.create_future()
        """Both directions ended, or a side was lost: close both."""
        self.stalled: asyncio.Future[None] = loop.create_future()
        """A direction ended and its EOF could not be passed on: the grace rule applies."""

    def end(self) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def received_eof(self, side: int, peer: asyncio.WriteTransport) -> None:
        """Side ``side`` finished sending: tell ``peer`` (the other side) if it can be told."""
        if self.eof[side]:
            return
        self.eof[side] = True
        if self.eof[1 - side] or self.lost[1 - side] or peer.is_closing():
            self.end()
        elif peer.can_write_eof():
            try:
                peer.write_eof()
            except (OSError, NotImplementedError):
                self.end()
        else:
            self.stall()

    def stall(self) -> None:
        if not self.stalled.done():
            self.stalled.set_result(None)

    def was_lost(self, side: int) -> None:
        if self.lost[side]:
            return
        self.lost[side] = True
        if not self.closed[side].done():
            self.closed[side].set_result(None)
        self.end()


class _Leg(asyncio.BufferedProtocol):
    """One side of a splice: what its transport receives is written to the other side's."""

    __slots__ = ("_buffer", "_keep_open", "_peer", "_side", "_splice", "_view")

    def __init__(
        self, splice: _Splice, side: int, transport: asyncio.Transport, peer: asyncio.Transport
    ) -> None:
        self._splice = splice
        self._side = side
        self._keep_open = transport.can_write_eof()
        self._peer = peer
        self._buffer = _SCRATCH.buffer
        self._view = _SCRATCH.view

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        peer = self._peer
        # Once the other side is closing, the splice is ending: what is left goes nowhere
        # (and uvloop raises for a write to a closed transport, where asyncio drops it).
        if peer.is_closing():
            return
        # A copy: a TLS transport (or uvloop's) may keep a reference to what it is given.
        peer.write(self._buffer[:nbytes])
        if self._side:
            self._splice.tally.b_to_a += nbytes
        else:
            self._splice.tally.a_to_b += nbytes

    def eof_received(self) -> bool:
        self._splice.received_eof(self._side, self._peer)
        # Keep a plain side open for the other direction; TLS closes itself regardless.
        return self._keep_open

    def pause_writing(self) -> None:
        self._peer.pause_reading()

    def resume_writing(self) -> None:
        self._peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._splice.was_lost(self._side)

    def release(self) -> None:
        """Once its transport is closed: let go of the other side's. A TLS transport keeps
        its protocol's methods after closing, so two legs holding each other's transports
        would otherwise be a cycle that only the cyclic GC frees, TLS buffers included."""
        del self._peer


async def _hand_over(
    state: _Splice, streams: tuple[_Stream, _Stream], eofs: tuple[bool, bool]
) -> list[_Leg | None]:
    """Give both transports to legs, then replay what their streams already hold: the buffered
    bytes, then an EOF, then a lost connection (a side lost already keeps its stream's protocol,
    which hears the rest). Does not suspend: no event reaches either side in between. Returns
    the legs, None for a side lost already."""
    transports = [typing.cast(asyncio.Transport, writer.transport) for _, writer in streams]
    legs: list[_Leg | None] = []
    held: list[bytes] = []
    for side, (reader, _) in enumerate(streams):
        transport = transports[side]
        leg = None
        if not transport.is_closing():
            leg = _Leg(state, side, transport, transports[1 - side])
            transport.set_protocol(leg)
        legs.append(leg)
        data = b""
        if reader.exception() is None:
            reader.feed_eof()  # so reading what is buffered returns at once
            data = await reader.read()  # also resumes a transport the stream had paused
        held.append(data)
    for side, data in enumerate(held):
        if data and not transports[1 - side].is_closing():
            transports[1 - side].write(data)
            if side:
                state.tally.b_to_a += len(data)
            else:
                state.tally.a_to_b += len(data)
    for side, eof in enumerate(eofs):
        if eof:
            state.received_eof(side, transports[1 - side])
    for side, leg in enumerate(legs):
        if leg is None:
            state.was_lost(side)
    return legs


async def _close(
    state: _Splice,
    streams: tuple[_Stream, _Stream],
    protocols: tuple[StreamProtocol, StreamProtocol],
    legs: list[_Leg | None],
) -> None:
    """Close both sides, flushing what they were sent; abort what does not close in time."""
    transports = [writer.transport for _, writer in streams]
    if not legs:  # cut short before the hand-over: nothing to flush
        for transport in transports:
            transport.abort()
        return
    for transport in transports:
        transport.close()
    try:
        await asyncio.wait(state.closed, timeout=CLOSE_TIMEOUT)
    finally:
        for side, transport in enumerate(transports):
            if not state.closed[side].done():
                transport.abort()
            leg = legs[side]
            if leg is not None:
                leg.release()
                # The stream's own protocol never heard the end: tell it, which also lets go of
                # the stream and transport it holds without waiting for the cyclic GC.
                protocols[side].connection_lost(None)


async def splice(
    a: _Stream,
    b: _Stream,
    *,
    half_close_grace: float = HALF_CLOSE_GRACE,
    tally: Transferred | None = None,
) -> Transferred:
    """Copy a -> b and b -> a; return when both directions ended, when one side was lost, or
    once one ended without being able to pass its EOF on and the other then stayed idle for
    ``half_close_grace`` seconds. Both streams are closed on return.

    Streams from :class:`StreamProtocol` are taken over by protocols (the fast path); any other
    asyncio streams are copied by two coroutines, under the same contract.

    The bytes copied are added to ``tally`` as they flow (a new one if not given), which is
    returned."""
    result = tally if tally is not None else Transferred()
    a_protocol, b_protocol = (stream[1].transport.get_protocol() for stream in (a, b))
    if isinstance(a_protocol, StreamProtocol) and isinstance(b_protocol, StreamProtocol):
        await _splice_transports(a, b, (a_protocol, b_protocol), half_close_grace, result)
    else:
        await _splice_streams(a, b, half_close_grace, result)
    return result


async def _grace(state: _Splice, half_close_grace: float) -> None:
    """Once a direction ended without passing its EOF on: wait while the other keeps moving."""
    tally = state.tally
    if state.ended.done() or half_close_grace <= 0:
        return
    while True:
        moved = tally.a_to_b + tally.b_to_a
        done, _ = await asyncio.wait((state.ended,), timeout=half_close_grace)
        if done or tally.a_to_b + tally.b_to_a == moved:
            return  # over, or idle for a whole grace


async def _splice_transports(
    a: _Stream,
    b: _Stream,
    protocols: tuple[StreamProtocol, StreamProtocol],
    half_close_grace: float,
    tally: Transferred,
) -> None:
    state = _Splice(asyncio.get_running_loop(), tally)
    streams = (a, b)
    legs: list[_Leg | None] = []
    try:
        for _, writer in streams:
            # Start with nothing paused, so the legs' flow control begins in step with the
            # transports'. A side lost meanwhile is handled below: its bytes still go on.
            with contextlib.suppress(OSError):
                await writer.drain()
        legs = await _hand_over(state, streams, (protocols[0].eof, protocols[1].eof))
        await asyncio.wait((state.ended, state.stalled), return_when=asyncio.FIRST_COMPLETED)
        await _grace(state, half_close_grace)
    finally:
        await _close(state, streams, protocols, legs)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Splice, forward: bool
) -> None:
    """Copy until EOF, counting into the tally (``a_to_b`` if ``forward``), then pass the EOF
    on or say it could not be."""
    tally = state.tally
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
        if forward:
            tally.a_to_b += len(data)
        else:
            tally.b_to_a += len(data)
    if writer.can_write_eof():
        with contextlib.suppress(OSError, NotImplementedError):
            writer.write_eof()
            return
    state.stall()


async def _close_stream(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


async def _splice_streams(
    a: _Stream, b: _Stream, half_close_grace: float, tally: Transferred
) -> None:
    """The general path: a coroutine per direction (``read``, ``write``, ``drain``)."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    state = _Splice(asyncio.get_running_loop(), tally)
    pumps = (
        asyncio.ensure_future(_pump(a_reader, b_writer, state, True)),
        asyncio.ensure_future(_pump(b_reader, a_writer, state, False)),
    )

    def pump_done(done: asyncio.Future[None]) -> None:
        failed = not done.cancelled() and done.exception() is not None
        if failed or all(pump.done() for pump in pumps):
            state.end()

    for pump in pumps:
        pump.add_done_callback(pump_done)
    try:
        await asyncio.wait((state.ended, state.stalled), return_when=asyncio.FIRST_COMPLETED)
        await _grace(state, half_close_grace)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await asyncio.gather(_close_stream(a_writer), _close_stream(b_writer))
