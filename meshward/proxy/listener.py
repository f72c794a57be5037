"""A listening socket and its accept loop, shared by local and transparent mode.

Contract: :func:`listen` binds (raising ``OSError`` if it can not, nothing left open), then hands
every accepted socket, non-blocking with ``TCP_NODELAY``, to ``handle`` in a task of its own,
which owns the socket from then on. Accepting survives running out of descriptors (it backs off
and goes on). :meth:`Listener.close` stops accepting and cancels every connection it started.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine

logger = logging.getLogger(__name__)

ACCEPT_BACKOFF = 0.1
"""After a failed accept (out of descriptors, say), how long to wait before the next."""
BACKLOG = 512

Handler = Callable[[socket.socket], Coroutine[None, None, None]]


class Listener:
    """One accept loop and the connections it started, closed together."""

    def __init__(
        self, sock: socket.socket, accepting: asyncio.Task[None], tasks: set[asyncio.Task[None]]
    ) -> None:
        self._sock = sock
        self._accepting = accepting
        self._tasks = tasks

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *list(self._tasks), return_exceptions=True)


_TWINS = {"0.0.0.0": "::", "127.0.0.1": "::1"}


def ipv6_twin(host: str) -> str | None:
    """The IPv6 address that listens for what ``host`` listens for in IPv4 (every address, or
    loopback), or None: transparent mode binds both, since the pod's ip6tables rules redirect
    IPv6 to the same ports. One socket per family (see :func:`listen`)."""
    return _TWINS.get(host)


async def listen(host: str, port: int, handle: Handler, what: str) -> Listener:
    """Listen on ``host:port`` (``what`` names the listener in logs)."""
    loop = asyncio.get_running_loop()
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every reply waits out the client's delayed ACK (40 ms on Linux).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # One family per socket: the kernel reports no original destination for an IPv4
            # client of an IPv6 socket.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    tasks: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        while True:
            try:
                client, _ = await loop.sock_accept(sock)
            except OSError as exc:  # out of descriptors, say: back off, keep listening
                logger.warning("accepting %s connections on port %d failed: %s", what, port, exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            try:
                client.setblocking(False)
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:  # the client is gone already
                logger.debug("%s connection dropped at accept: %s", what, exc)
                client.close()
                continue
            task = loop.create_task(handle(client))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    return Listener(sock, loop.create_task(accept_loop()), tasks)
