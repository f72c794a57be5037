"""Copy bytes both ways between two connections until both sides are done.

The contract every proxied connection relies on:
- backpressure: at most one chunk is read ahead of what the other side has accepted (``drain``
  after every write), so a slow peer slows its sender instead of growing a buffer;
- half-close: when one side finishes sending, the other side is told (``write_eof``) and may go
  on sending the other way. asyncio's TLS transport can not half-close: when the direction
  towards a TLS leg ends, the other direction gets ``half_close_grace`` seconds to finish (a
  reply that does not wait for the EOF still arrives), then the connection is closed both ways
  instead of waiting forever for an EOF the peer can not see;
- cleanup: both connections are closed on every path, errors and cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

CHUNK = 64 * 1024
HALF_CLOSE_GRACE = 30.0
"""How long the other direction may go on after one ended on a leg that can not half-close."""


@dataclasses.dataclass
class Transferred:
    """Bytes copied each way, for metrics."""

    a_to_b: int = 0
    b_to_a: int = 0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bool]:
    """Copy until EOF; return the bytes copied and whether the EOF could be passed on."""
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
            return copied, True
    return copied, False


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    half_close_grace: float = HALF_CLOSE_GRACE,
) -> Transferred:
    """Copy a -> b and b -> a concurrently; return when both directions ended, when one failed,
    or ``half_close_grace`` seconds after one ended without being able to pass its EOF on."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    result = Transferred()
    forward = asyncio.ensure_future(_pump(a_reader, b_writer))
    backward = asyncio.ensure_future(_pump(b_reader, a_writer))
    try:
        done, pending = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        if pending and not first.cancelled() and first.exception() is None:
            _, eof_passed = first.result()
            await asyncio.wait(pending, timeout=None if eof_passed else half_close_grace)
        for task, field in ((forward, "a_to_b"), (backward, "b_to_a")):
            if task.done() and not task.cancelled() and task.exception() is None:
                setattr(result, field, task.result()[0])
    finally:
        for task in (forward, backward):
            task.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        await asyncio.gather(_close(a_writer), _close(b_writer))
    return result
