"""The outbound side: the application speaks plaintext to its proxy, the proxy speaks mTLS to
the peer's proxy, and refuses a peer that is not the identity it expects.

The peer's certificate must chain to the trust anchors (the client context checks that in the
handshake) and name a SPIFFE ID; when the route names the identities expected there, the peer's
must be one of them, or the connection is closed before a byte of the application's is sent.

Where a connection goes is given by a :class:`Route`: in local mode one per listening port (with
the one identity configured for it, if any); in transparent mode from the connection's original
destination, with the identities destination discovery (:mod:`meshward.proxy.discovery`) says
must answer there.
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
    identities: frozenset[str] | None
    """The SPIFFE IDs of which the peer must prove one; None: any mesh identity will do. An
    empty set admits no peer."""

    def __post_init__(self) -> None:
        # A str would pass a membership test by substring: insist on the set.
        if self.identities is not None and not isinstance(self.identities, frozenset):
            raise TypeError(
                f"Route.identities must be a frozenset of SPIFFE IDs or None, not "
                f"{type(self.identities).__name__}"
            )

    def admits(self, identity: str) -> bool:
        """Whether a peer proving ``identity`` may carry this route's connection."""
        return self.identities is None or identity in self.identities

    def expected(self) -> str:
        """Who the route expects, for logs."""
        if self.identities is None:
            return "any mesh identity"
        if not self.identities:
            return "no identity at all"
        return "one of " + ", ".join(sorted(self.identities))


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
        if seen is None or not route.admits(seen):
            self.counters.refused_identity += 1
            self.metrics.peer_refused("no_identity" if seen is None else "identity")
            logger.warning(
                "refused peer %s:%d: it is %s, expected %s",
                route.host,
                route.port,
                seen or "no mesh identity",
                route.expected(),
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
