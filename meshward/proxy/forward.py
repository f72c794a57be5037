"""Copy bytes both ways between two connections until both sides are done.

The contract every proxied connection relies on:
- backpressure: at most one chunk is read ahead of what the other side has accepted (``drain``
  after every write), so a slow peer slows its sender instead of growing a buffer;
- half-close: when one side finishes sending, the other side is told (``write_eof``) and may go
  on sending the other way. asyncio's TLS transport can not half-close; on a TLS leg the EOF is
  held back and the connection closes once both directions are done;
- cleanup: both connections are closed on every path, errors and cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

CHUNK = 64 * 1024


@dataclasses.dataclass
class Transferred:
    """Bytes copied each way, for metrics."""

    a_to_b: int = 0
    b_to_a: int = 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    copied = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
        copied += len(data)
    if writer.can_write_eof():
        with contextlib.suppress(OSError, NotImplementedError):
            writer.write_eof()
    return copied


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> Transferred:
    """Copy a -> b and b -> a concurrently; return when both directions ended (or one failed)."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    result = Transferred()
    forward = asyncio.ensure_future(_pump(a_reader, b_writer))
    backward = asyncio.ensure_future(_pump(b_reader, a_writer))
    try:
        _, pending = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_EXCEPTION)
        for task in pending:  # one direction failed: the connection is over both ways
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if forward.done() and not forward.cancelled() and forward.exception() is None:
            result.a_to_b = forward.result()
        if backward.done() and not backward.cancelled() and backward.exception() is None:
            result.b_to_a = backward.result()
    finally:
        for task in (forward, backward):
            task.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        await asyncio.gather(_close(a_writer), _close(b_writer))
    return result
