"""Transparent mode: the accept loops behind ``meshward proxy-init``'s redirect rules.

The application dials ordinary addresses and ports; iptables sends every such connection to
the proxy's inbound or outbound port, and this module reads where each was going
(:mod:`meshward.proxy.original_dst`) and hands it to the side that decides:

- inbound: a connection to ``ip:port`` of the pod is decided as one to ``port`` and forwarded
  to the application at that same ``ip:port``, not loopback, so a port bound to 127.0.0.1 only
  stays out of other pods' reach (:meth:`Inbound.handle
  <meshward.proxy.inbound.Inbound.handle>`). One that was not redirected, or was addressed to a
  port of the proxy's own, is refused: there is no application behind it.
- outbound: a connection to ``ip:port`` outside the mesh networks (the cluster's pod and
  service ranges) is passed through in plaintext, unread, as if there were no proxy. Inside
  them, destination discovery (:mod:`meshward.proxy.discovery`, when the proxy follows the
  policy service) says how it goes: over mTLS to that same ``ip:port`` (:meth:`Outbound.handle
  <meshward.proxy.outbound.Outbound.handle>`), where the peer's own rules redirect it to the
  peer's inbound proxy, which must prove one of the identities discovery named; or in
  plaintext, when nothing meshed answers there. Without an answer (unless discovery still
  holds the identities of a recent meshed one: those stay pinned), and without discovery (a
  policy file), it goes over mTLS and any identity the trust anchors vouch for is accepted:
  nothing is sent in clear on a guess. :func:`plan` makes that choice.

Both loops tolerate a failing accept (out of descriptors, say) by backing off, and both are
bounded: inbound by the inbound side's own limit, outbound by ``max_outbound`` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterable

from meshward import errors
from meshward.proxy import discovery as proxy_discovery
from meshward.proxy import forward, inbound, listener, networks, original_dst, outbound
from meshward.proxy import metrics as proxy_metrics

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
OVER_LIMIT_LOG_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to do with one outbound connection."""

    route: outbound.Route | None
    """Carry it over mTLS along this route; None: pass it through in plaintext."""
    discovered: proxy_metrics.DiscoveryResult | None
    """How destination discovery decided it; None when it was not asked."""


def plan(
    dest: original_dst.Destination,
    in_mesh_networks: bool,
    answer: proxy_discovery.Answer | None,
) -> Plan:
    """The choice for a connection to ``dest``, given whether it lies in the mesh networks
    and what discovery answered (None: it was not asked, as without the policy service)."""
    if not in_mesh_networks:
        return Plan(route=None, discovered=None)
    if answer is None:
        return Plan(route=outbound.Route(dest.host, dest.port, None), discovered=None)
    if isinstance(answer, proxy_discovery.Meshed):
        return Plan(
            route=outbound.Route(dest.host, dest.port, answer.identities),
            discovered="stale" if answer.stale else "meshed",
        )
    if isinstance(answer, proxy_discovery.Plain):
        return Plan(route=None, discovered="plain")
    return Plan(route=outbound.Route(dest.host, dest.port, None), discovered="fallback")


@dataclasses.dataclass
class Counters:
    """What the accept loops did with connections, for tests and logs."""

    inbound: int = 0
    """Handed to the inbound side."""
    inbound_refused: int = 0
    """Not redirected, or addressed to one of the proxy's own ports."""
    meshed: int = 0
    """Outbound, carried over mTLS (fallbacks included)."""
    passed_through: int = 0
    """Outbound to a destination outside the mesh networks, passed through in plaintext."""
    discovered_plain: int = 0
    """Outbound into the mesh networks, passed through in plaintext: discovery said nothing
    meshed answers there."""
    discovery_fallback: int = 0
    """Outbound into the mesh networks that discovery could not answer for: carried over mTLS
    to any mesh identity (counted in ``meshed`` too)."""
    discovery_stale: int = 0
    """Outbound into the mesh networks that discovery could not answer for now, held to the
    identities of its last, expired, meshed answer (counted in ``meshed`` too)."""
    outbound_refused: int = 0
    """Outbound but not redirected."""
    outbound_failed: int = 0
    """Passed through, but the destination could not be reached."""
    over_limit: int = 0


class Transparent:
    """The inbound and outbound accept loops of one proxy in transparent mode.

    ``mesh_networks`` (default :data:`meshward.proxy.networks.DEFAULT_MESH_NETWORKS`) are
    where outbound connections may go over mTLS; ``discovery``, when given, says for each
    destination there whether they do and who must answer (without it, every one does, to any
    mesh identity). ``proxy_ports`` are the proxy's own ports (the admin port, say): a
    redirected connection addressed to one of them is refused; the ports the loops listen on
    are added as they bind.
    """

    def __init__(
        self,
        *,
        inbound_side: inbound.Inbound,
        outbound_side: outbound.Outbound,
        mesh_networks: Iterable[networks.Network] | None = None,
        proxy_ports: Iterable[int] = (),
        max_outbound: int = 10_000,
        discovery: proxy_discovery.Discovery | None = None,
    ) -> None:
        self._inbound = inbound_side
        self._outbound = outbound_side
        self._discovery = discovery
        self._mesh = (
            tuple(mesh_networks) if mesh_networks is not None else networks.parse_mesh_networks("")
        )
        self._proxy_ports = set(proxy_ports)
        self._max_outbound = max_outbound
        self._outbound_open = 0
        self._over_limit_logged = float("-inf")
        self.counters = Counters()

    def meshed(self, host: str) -> bool:
        """Whether a connection to ``host`` is carried over mTLS."""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._mesh)

    async def serve_inbound(self, host: str, port: int) -> listener.Listener:
        """Take redirected inbound connections on ``host:port``."""
        return await self._serve(host, port, self._inbound_connection, "inbound")

    async def serve_outbound(self, host: str, port: int) -> listener.Listener:
        """Take redirected outbound connections on ``host:port``."""
        return await self._serve(host, port, self._outbound_connection, "outbound")

    # -- accepting ----------------------------------------------------------------------------

    async def _serve(
        self,
        host: str,
        port: int,
        handle: Callable[[socket.socket], Coroutine[None, None, None]],
        what: str,
    ) -> listener.Listener:
        bound = await listener.listen(host, port, handle, what)
        self._proxy_ports.add(bound.port)
        return bound

    def _destination(self, sock: socket.socket, what: str) -> original_dst.Destination | None:
        """The original destination, or None (``sock`` closed) when there is none to use."""
        try:
            dest = original_dst.original_destination(sock)
        except (errors.NotRedirected, OSError) as exc:
            logger.info("%s connection refused: %s", what, exc)
            sock.close()
            return None
        return dest

    # -- inbound ------------------------------------------------------------------------------

    async def _inbound_connection(self, sock: socket.socket) -> None:
        dest = self._destination(sock, "inbound")
        if dest is None:
            self.counters.inbound_refused += 1
            return
        if dest.port in self._proxy_ports:
            self.counters.inbound_refused += 1
            logger.info(
                "refused an inbound connection to %s: the port is the proxy's own, "
                "not the application's",
                dest,
            )
            sock.close()
            return
        self.counters.inbound += 1
        # To the address the client dialled, not loopback: an application port bound to
        # 127.0.0.1 only (a debug or admin port) must not become reachable from other pods.
        await self._inbound.handle(sock, dest.port, dest.port, app_host=dest.host)

    # -- outbound -----------------------------------------------------------------------------

    async def _outbound_connection(self, sock: socket.socket) -> None:
        dest = self._destination(sock, "outbound")
        if dest is None:
            self.counters.outbound_refused += 1
            return
        if self._outbound_open >= self._max_outbound:
            sock.close()
            self._over_limit()
            return
        self._outbound_open += 1
        try:
            chosen = await self.choose(dest)
            reader, writer = await _streams(sock)
            if chosen.route is not None:
                await self._outbound.handle(reader, writer, chosen.route)
            else:
                await self._pass_through(reader, writer, dest)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            logger.debug("outbound connection to %s ended: %s", dest, exc)
        except Exception:
            logger.exception("outbound connection to %s failed unexpectedly", dest)
        finally:
            self._outbound_open -= 1
            with contextlib.suppress(OSError):
                sock.close()  # a no-op once a transport owns and closed it

    async def choose(self, dest: original_dst.Destination) -> Plan:
        """How an outbound connection to ``dest`` goes (:func:`plan`), asking discovery when
        the destination is in the mesh networks; counted in :attr:`counters` and the metrics."""
        in_mesh = self.meshed(dest.host)
        answer = None
        if in_mesh and self._discovery is not None:
            answer = await self._discovery.lookup(dest.host, dest.port)
        chosen = plan(dest, in_mesh, answer)
        if chosen.route is not None:
            self.counters.meshed += 1
        elif in_mesh:
            self.counters.discovered_plain += 1
        else:
            self.counters.passed_through += 1
        if chosen.discovered == "fallback":
            self.counters.discovery_fallback += 1
        elif chosen.discovered == "stale":
            self.counters.discovery_stale += 1
        if chosen.discovered is not None:
            self._outbound.metrics.discovered(chosen.discovered)
        return chosen

    async def _pass_through(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        dest: original_dst.Destination,
    ) -> None:
        """Plaintext to a destination outside the mesh (or not meshed), as the application
        sent it."""
        metrics = self._outbound.metrics
        metrics.opened("outbound")
        tally = forward.Transferred()
        try:
            try:
                peer = await asyncio.wait_for(
                    asyncio.open_connection(dest.host, dest.port, limit=forward.CHUNK),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError) as exc:
                self.counters.outbound_failed += 1
                logger.info("outbound to %s (plaintext) failed: %s", dest, exc)
                return
            await forward.splice((reader, writer), peer, tally=tally)
        finally:
            writer.transport.abort()  # after splice, a no-op: it closed both already
            metrics.closed("outbound", tally.a_to_b, tally.b_to_a)

    def _over_limit(self) -> None:
        self.counters.over_limit += 1
        self._outbound.metrics.over_limit("outbound")
        now = asyncio.get_running_loop().time()
        if now - self._over_limit_logged >= OVER_LIMIT_LOG_INTERVAL:
            logger.warning(
                "closed an outbound connection at once: %d are open, the most allowed",
                self._max_outbound,
            )
            self._over_limit_logged = now


async def _streams(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over an accepted socket; the transport owns the socket from here on."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=forward.CHUNK)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)
