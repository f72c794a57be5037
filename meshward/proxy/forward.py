"""Copy bytes both ways between two connections until both sides are done.

The contract every proxied connection relies on:
- backpressure: at most one chunk is read ahead of what the other side has accepted (``drain``
  after every write), so a slow peer slows its sender instead of growing a buffer;
- half-close: when one side finishes sending, the other side is told (``write_eof``) and may go
  on sending the other way. asyncio's TLS transport can not half-close: when the direction
  towards a TLS leg ends, the other direction may go on while it keeps moving (a reply that
  does not wait for the EOF still arrives) and the connection is closed both ways once it has
  been idle for ``half_close_grace`` seconds, instead of waiting forever for an EOF the peer can
  not see. A caller that knows the ended side is done for good passes 0: the inbound side does
  for its application, since a server that closes its side has answered all it will, and the
  client's proxy then sees the close at once rather than after its own grace;
- cleanup: both connections are closed on every path, errors and cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

CHUNK = 64 * 1024
HALF_CLOSE_GRACE = 5.0
"""How long the other direction may stay idle after one ended on a leg that can not half-close.
Every connection waiting out its grace holds its buffers, so this is short."""


@dataclasses.dataclass
class Transferred:
    """Bytes copied each way, for metrics: kept up to date as they flow, so a connection cut
    short (an error, or a policy update closing it) still counts what it carried."""

    a_to_b: int = 0
    b_to_a: int = 0


async def _pump(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    tally: Transferred,
    forward: bool,
) -> bool:
    """Copy until EOF, counting into ``tally`` (``a_to_b`` if ``forward``); return whether the
    EOF could be passed on."""
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
        if forward:
            tally.a_to_b += len(data)
        else:
            tally.b_to_a += len(data)
    if writer.can_write_eof():
        with contextlib.suppress(OSError, NotImplementedError):
            writer.write_eof()
            return True
    return False


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(writer.wait_closed(), 5)


async def splice(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    *,
    half_close_grace: float = HALF_CLOSE_GRACE,
    tally: Transferred | None = None,
) -> Transferred:
    """Copy a -> b and b -> a concurrently; return when both directions ended, when one failed,
    or once one ended without being able to pass its EOF on and the other then stayed idle for
    ``half_close_grace`` seconds.

    The bytes copied are added to ``tally`` as they flow (a new one if not given), which is
    returned."""
    (a_reader, a_writer), (b_reader, b_writer) = a, b
    result = tally if tally is not None else Transferred()
    forward = asyncio.ensure_future(_pump(a_reader, b_writer, result, True))
    backward = asyncio.ensure_future(_pump(b_reader, a_writer, result, False))
    try:
        done, pending = await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
        first = done.pop()
        if pending and not first.cancelled() and first.exception() is None:
            if first.result():  # the EOF was passed on: the other side decides when it ends
                await asyncio.wait(pending)
            else:
                while pending:
                    moved = result.a_to_b + result.b_to_a
                    _, pending = await asyncio.wait(pending, timeout=half_close_grace)
                    if result.a_to_b + result.b_to_a == moved:
                        break  # idle for a whole grace
    finally:
        for task in (forward, backward):
            task.cancel()
        await asyncio.gather(forward, backward, return_exceptions=True)
        await asyncio.gather(_close(a_writer), _close(b_writer))
    return result
