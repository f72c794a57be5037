"""The outbound side: the application speaks plaintext to its proxy, the proxy speaks mTLS to
the peer's proxy, and refuses a peer that is not the identity it expects.

The peer's certificate must chain to the trust anchors (the client context checks that in the
handshake); when the route names an expected identity, the peer's SPIFFE ID must be exactly that
one, or the connection is closed before a byte of the application's is sent.

Where a connection goes is given by a :class:`Route`: in local mode one per listening port; in
transparent mode (later) from the connection's original destination.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Callable

from meshward import errors
from meshward.proxy import forward, tls
from meshward.proxy import metrics as proxy_metrics

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Route:
    host: str
    port: int
    """The peer proxy's inbound address."""
    identity: str | None
    """The SPIFFE ID the peer must prove, when known."""


@dataclasses.dataclass
class Counters:
    accepted: int = 0
    connected: int = 0
    refused_identity: int = 0
    failed: int = 0


class Outbound:
    def __init__(
        self,
        *,
        client_context: Callable[[], ssl.SSLContext | None],
        metrics: proxy_metrics.Metrics | None = None,
    ) -> None:
        self._client_context = client_context
        self.metrics = metrics if metrics is not None else proxy_metrics.Metrics()
        self.counters = Counters()

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, route: Route
    ) -> None:
        """Own the application's connection from here on: it is closed on every path."""
        self.counters.accepted += 1
        self.metrics.opened("outbound")
        tally = forward.Transferred()  # a_to_b: read from the application; b_to_a: written
        try:
            await self._handle(reader, writer, route, tally)
        finally:
            writer.close()  # after splice, a no-op: splice closed it already
            self.metrics.closed("outbound", tally.a_to_b, tally.b_to_a)

    async def _handle(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        route: Route,
        tally: forward.Transferred,
    ) -> None:
        ctx = self._client_context()
        if ctx is None:
            self.counters.failed += 1
            logger.info("outbound to %s:%d refused: no certificate yet", route.host, route.port)
            return
        try:
            peer_reader, peer_writer = await asyncio.wait_for(
                forward.open_connection(route.host, route.port, ssl_context=ctx), CONNECT_TIMEOUT
            )
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            self.counters.failed += 1
            if isinstance(exc, ssl.SSLError):
                self.metrics.handshake_failed("outbound")
            logger.info("outbound to %s:%d failed: %s", route.host, route.port, exc)
            return
        try:
            seen: str | None = tls.peer_identity(peer_writer.get_extra_info("ssl_object"))
        except errors.UntrustedChain:
            seen = None
        # A peer must prove a mesh identity: one that chains to the anchors but names none (the
        # identity service's own certificate, say) is not a mesh workload.
        if seen is None or (route.identity is not None and seen != route.identity):
            self.counters.refused_identity += 1
            logger.warning(
                "refused peer %s:%d: it is %s, expected %s",
                route.host,
                route.port,
                seen,
                route.identity,
            )
            peer_writer.transport.abort()
            return
        self.counters.connected += 1
        await forward.splice((reader, writer), (peer_reader, peer_writer), tally=tally)

    async def serve(self, host: str, port: int, route: Route) -> asyncio.Server:
        """Local mode: every connection to ``host:port`` goes to ``route``."""

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.handle(reader, writer, route)

        return await forward.start_server(accepted, host, port)
