"""The inbound side: every connection to the workload, and on HTTP ports every request, is
checked before a byte of it reaches the application.

For each accepted connection: peek at the first bytes (nothing consumed), let the port's
effective mTLS mode decide how to treat them (STRICT refuses plaintext; PERMISSIVE takes TLS or
plaintext; DISABLE passes bytes through untouched), terminate TLS and read the client's SPIFFE ID
from its verified certificate. Then the protocol of the (decrypted) stream: the one the covering
Server declares, else detected from its first bytes (:mod:`meshward.proxy.detect`). No policy
yet means deny.

- Where a request's method and path can not change the outcome
  (:meth:`~meshward.policy.decision.Policy.routes_matter` is False), one decision per
  connection: allowed, the bytes are spliced to the application unparsed (the fast path, which
  does not even wait to learn the protocol); denied, a TCP connection is closed without
  forwarding a byte, an HTTP/1 client gets 403 for its first request, an HTTP/2 client a gRPC
  PERMISSION_DENIED or a 403 on each request (:mod:`meshward.proxy.grpc_deny`), then the
  connection is closed.
- Where they can (probe paths on a port no Server covers, HTTP route rules), HTTP/1 is decided
  request by request (:mod:`meshward.proxy.http`): allowed requests are forwarded, keep-alive
  and pipelining included; at the first denied request the proxy stops reading, lets the
  application answer every request already forwarded, then answers 403 and closes. A plaintext
  HTTP/1 client under STRICT is let this far, so that a kubelet probe (which can not speak mTLS)
  reaches its probe path while every other request is refused.
- HTTP/2 where routes matter is decided per connection with no request (fail closed: a rule
  that needs a route never matches), because refusing one stream of a multiplexed connection
  while forwarding the others would need a full HTTP/2 proxy.

Live connections: :meth:`Inbound.revalidate` re-decides every allowed connection against a new
policy and closes those it no longer allows (both legs, counted as terminated); the others are
not touched. An upgraded tunnel (WebSocket, CONNECT) is re-decided with the request that opened
it, since it has no next request to meet the new policy. New connections take the new policy as
soon as the ``policy`` callable returns it.

Bounded, so that clients not (yet) allowed can not hold the workload's connection slots:

- at most ``max_connections`` at once (beyond, a connection is closed at once);
- at most ``max_pending_per_source`` from one source address that are not allowed yet: being
  detected, in their handshake, reading their first request head, or being refused (beyond,
  closed at once). A connection stops counting once policy allowed it or its first request;
  from then on it holds its slot as long as its traffic lasts, as policy allowed;
- every wait on a client has a deadline: detection and handshake (10 s each), each request head
  (:data:`HEAD_TIMEOUT` from its first byte, then 408), a keep-alive connection idle between
  requests (:data:`IDLE_TIMEOUT`), a refused client's request and the sending of its answer
  (:data:`REFUSAL_TIMEOUT`), and the application's answers owed before a refusal
  (:data:`ANSWER_TIMEOUT`).

How connections arrive is the caller's business (``serve`` binds a port in local mode); the
handler takes an accepted socket and the destination port that policy should see.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from meshward import errors
from meshward.policy import compile as policy_compile
from meshward.policy import decision, resources
from meshward.proxy import detect, forward, grpc_deny, http, listener, tls
from meshward.proxy import metrics as proxy_metrics

logger = logging.getLogger(__name__)

DETECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
REFUSAL_TIMEOUT = 10.0
"""How long a refused HTTP client has to send the request the refusal answers."""
LINGER = 2.0
"""After a refusal, how long the client's unread bytes are drained before closing, so the
kernel does not reset the connection (and discard the answer) over them."""
LINGER_BYTES = 1 << 20
OVER_LIMIT_LOG_INTERVAL = 1.0
ANSWER_TIMEOUT = 30.0
"""After the client finished sending, or before a refusal is sent, how long the application has
to answer the requests it was sent."""
HEAD_TIMEOUT = 10.0
"""How long a request head (request line and headers) may take from its first byte; the first
request's from the start of per-request handling. A head trickled byte by byte can not hold a
connection slot longer."""
IDLE_TIMEOUT = 60.0
"""How long a per-request connection may stay idle (no request in progress, no answer owed)
before the proxy closes it: within the range common HTTP servers use for keep-alive (5 to 75 s),
long enough that a client's pooled connection is reused, short enough that idle ones give their
slot back."""
CLOSE_TIMEOUT = 5.0
"""How long a client being closed has to take what it was sent, before the connection is cut."""
MAX_PENDING_PER_SOURCE = 256
"""Default for connections from one source address not allowed yet: far more than one client
opens at once, yet filling ``max_connections`` with undecided connections needs many sources."""


@dataclasses.dataclass
class Counters:
    """What happened to connections and requests, for tests (metrics has the labelled ones)."""

    accepted: int = 0
    allowed: int = 0
    """Connections allowed with one decision (spliced)."""
    denied: int = 0
    """Connections refused with one decision."""
    plaintext_refused: int = 0
    handshake_failed: int = 0
    per_request: int = 0
    """Connections decided request by request (HTTP/1 where routes matter)."""
    requests_allowed: int = 0
    requests_denied: int = 0
    terminated: int = 0
    """Live connections closed by :meth:`Inbound.revalidate`."""
    over_limit: int = 0
    """Connections closed at once because ``max_connections`` were open."""
    source_limited: int = 0
    """Connections closed at once because their source had ``max_pending_per_source`` open."""


ServerContext = Callable[[bool], ssl.SSLContext | None]
"""Given whether a client certificate is required, the current server context (None: no
certificate yet, so TLS can not be served)."""

_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _Conn:
    """One accepted connection: what revalidation needs, and the bytes metrics count."""

    __slots__ = (
        "app_host",
        "client",
        "client_id",
        "dest",
        "pending",
        "per_request",
        "tally",
        "terminated",
        "transports",
        "tunnel",
    )

    def __init__(self, dest: decision.Destination, pending: str, app_host: str) -> None:
        self.dest = dest
        self.app_host = app_host
        """Where the application is reached: loopback in local mode, the pod's own address
        (the original destination) in transparent mode."""
        self.client = decision.Client()
        self.client_id: str | None = None
        self.pending: str | None = pending
        """The source address this connection counts against until it is allowed."""
        self.per_request = False
        self.tunnel: decision.Request | None = None
        """The request that opened an upgraded tunnel, to re-decide it on a policy update."""
        self.tally = forward.Transferred()
        """``a_to_b``: bytes read from the client; ``b_to_a``: bytes written to it."""
        self.transports: list[asyncio.WriteTransport] = []
        self.terminated = False

    def abort(self) -> None:
        """Close both legs now; the handler's own cleanup follows."""
        for transport in self.transports:
            transport.abort()


def _declared(protocol: resources.ProxyProtocol | None) -> detect.Protocol | None:
    """How to treat a Server's declared protocol; None: detect it."""
    if protocol is resources.ProxyProtocol.HTTP1:
        return detect.Protocol.HTTP1
    if protocol in (resources.ProxyProtocol.HTTP2, resources.ProxyProtocol.GRPC):
        return detect.Protocol.HTTP2
    if protocol in (resources.ProxyProtocol.OPAQUE, resources.ProxyProtocol.TLS):
        return detect.Protocol.OPAQUE  # TLS: the application's own, passed through unread
    return None


def _rule(verdict: decision.Decision | None) -> str:
    if verdict is None:
        return "no policy yet"
    return f"{verdict.rule_kind} {verdict.rule_name}: {verdict.reason}"


class Inbound:
    """One workload's inbound side: accepts, decides and forwards (see the module docstring).

    ``policy`` is asked for the policy in force at each decision; ``metrics`` (a registry of its
    own when not given) counts what happens; :attr:`counters` is the same, unlabelled, for tests.
    """

    def __init__(
        self,
        *,
        policy: Callable[[], decision.Policy | None],
        server_context: ServerContext,
        pod: str | None,
        labels: dict[str, str],
        app_host: str = "127.0.0.1",
        metrics: proxy_metrics.Metrics | None = None,
        max_connections: int = 10_000,
        max_pending_per_source: int = MAX_PENDING_PER_SOURCE,
    ) -> None:
        self._policy = policy
        self._server_context = server_context
        self._pod = pod
        self._labels = labels
        self._app_host = app_host
        self.metrics = metrics if metrics is not None else proxy_metrics.Metrics()
        self._max_connections = max_connections
        self._open = 0
        self._live: set[_Conn] = set()
        """Allowed connections, for :meth:`revalidate`."""
        self._max_pending_per_source = max_pending_per_source
        self._pending: dict[str, int] = {}
        """Per source address, its connections not allowed yet."""
        self._over_limit_log = _Throttle()
        self._source_limit_log = _Throttle()
        self.counters = Counters()

    # -- accepting ----------------------------------------------------------------------------

    async def handle(
        self, sock: socket.socket, port: int, app_port: int, app_host: str | None = None
    ) -> None:
        """Own ``sock`` from here on: it is closed on every path. The application is reached
        at ``app_host`` (default: the constructor's) on ``app_port``."""
        if self._open >= self._max_connections:
            with contextlib.suppress(OSError):
                sock.close()
            self._over_limit()
            return
        peer = _peer_ip(sock)
        if self._pending.get(peer, 0) >= self._max_pending_per_source:
            with contextlib.suppress(OSError):
                sock.close()
            self._source_limited(peer)
            return
        self._open += 1
        self._pending[peer] = self._pending.get(peer, 0) + 1
        self.counters.accepted += 1
        self.metrics.opened("inbound")
        dest = decision.Destination(port=port, labels=self._labels, pod=self._pod)
        conn = _Conn(dest, pending=peer, app_host=app_host or self._app_host)
        try:
            await self._handle(sock, conn, peer, app_port)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            logger.debug("inbound connection from %s ended: %s", peer, exc)
        except Exception:
            logger.exception("inbound connection from %s failed unexpectedly", peer)
        finally:
            self._live.discard(conn)
            self._settle(conn)
            self._open -= 1
            with contextlib.suppress(OSError):
                sock.close()
            self.metrics.closed("inbound", conn.tally.a_to_b, conn.tally.b_to_a)

    def _over_limit(self) -> None:
        self.counters.over_limit += 1
        self.metrics.over_limit("inbound")
        unlogged = self._over_limit_log.due()
        if unlogged:
            logger.warning(
                "closed %d inbound connection(s) at once: %d are open, the most allowed",
                unlogged,
                self._max_connections,
            )

    def _source_limited(self, source: str) -> None:
        self.counters.source_limited += 1
        self.metrics.source_limit("inbound")
        unlogged = self._source_limit_log.due()
        if unlogged:
            logger.warning(
                "closed %d inbound connection(s) at once, the last from %s: it has %d open "
                "that are not allowed yet, the most allowed per source address",
                unlogged,
                source,
                self._max_pending_per_source,
            )

    def _settle(self, conn: _Conn) -> None:
        """``conn`` was allowed (or ended): it no longer counts against its source."""
        source, conn.pending = conn.pending, None
        if source is None:
            return
        left = self._pending.get(source, 0) - 1
        if left > 0:
            self._pending[source] = left
        else:
            self._pending.pop(source, None)

    async def _handle(self, sock: socket.socket, conn: _Conn, peer: str, app_port: int) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy()
        dest, port = conn.dest, conn.dest.port
        first = await _peek(sock, DETECT_TIMEOUT)
        raw = detect.detect(first) or detect.Protocol.OPAQUE
        mode = policy.mtls_mode(dest) if policy is not None else resources.MTLSMode.STRICT
        terminate = raw is detect.Protocol.TLS and mode is not resources.MTLSMode.DISABLE
        if mode is resources.MTLSMode.STRICT and not terminate:
            # A plaintext HTTP/1 request may still be a kubelet probe, which policy lets
            # through STRICT; everything else in plaintext is refused here.
            probe_possible = (
                policy is not None
                and raw is detect.Protocol.HTTP1
                and policy.routes_matter(dest)
                and _declared(policy.proxy_protocol(dest)) in (None, detect.Protocol.HTTP1)
            )
            if not probe_possible:
                self.counters.plaintext_refused += 1
                logger.info("refused plaintext from %s on port %d: mTLS is STRICT", peer, port)
                return
        ctx = self._server_context(mode is resources.MTLSMode.STRICT) if terminate else None
        if terminate and ctx is None:
            logger.info("refused TLS from %s on port %d: no certificate yet", peer, port)
            return
        reader = asyncio.StreamReader(limit=forward.CHUNK)
        protocol_obj = forward.StreamProtocol(reader)  # a stream forward.splice can take over
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol_obj, sock, ssl=ctx),
                HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            if terminate:
                self.counters.handshake_failed += 1
                self.metrics.handshake_failed("inbound")
                logger.info("TLS handshake from %s on port %d failed: %s", peer, port, exc)
            return
        conn.transports.append(transport)
        writer = asyncio.StreamWriter(transport, protocol_obj, reader, loop)
        # Without TLS the detection above saw the stream itself; with TLS, only its wrapping.
        detected = None if terminate else raw
        try:
            await self._decide(conn, (reader, writer), peer, app_port, terminate, detected)
        finally:
            transport.abort()  # after an orderly close, a no-op; on every other path, the close

    # -- deciding -----------------------------------------------------------------------------

    async def _decide(
        self,
        conn: _Conn,
        client_stream: _Stream,
        peer: str,
        app_port: int,
        terminate: bool,
        detected: detect.Protocol | None,
    ) -> None:
        reader, writer = client_stream
        port = conn.dest.port
        try:
            identity = tls.peer_identity(writer.get_extra_info("ssl_object")) if terminate else None
        except errors.UntrustedChain as exc:
            self.counters.denied += 1
            refused = _no_mesh_identity(self._policy(), conn.dest, peer, str(exc))
            self.metrics.authorized("tcp", refused, port, None, True)
            logger.info("denied a TLS client from %s on port %d: %s", peer, port, refused.reason)
            return
        conn.client = decision.Client(identity=identity, source_ip=peer, tls=terminate)
        conn.client_id = (policy_compile.spiffe_to_dns(identity) or identity) if identity else None

        policy = self._policy()
        protocol = _declared(policy.proxy_protocol(conn.dest)) if policy is not None else None
        prefix = b""
        if policy is not None and policy.routes_matter(conn.dest):
            if protocol is None:
                prefix, protocol = await self._sniff(reader, detected, conn)
            if protocol is detect.Protocol.HTTP1:
                self.counters.per_request += 1
                conn.per_request = True
                self._live.add(conn)
                await _Http1(self, conn, client_stream, app_port, prefix).run()
                return
            policy = self._policy()  # the sniff took time: decide on the policy of now

        verdict = policy.decide(conn.dest, conn.client) if policy is not None else None
        # One count per connection-level decision, however a refusal is told (metrics' docstring).
        self.metrics.authorized("tcp", verdict, port, conn.client_id, terminate)
        if verdict is not None and verdict.allowed:
            self._live.add(conn)  # with the decision, no await between: revalidate sees it
            self._settle(conn)
            self.counters.allowed += 1
            self._log_audit("connection", conn, verdict)
            await self._splice(conn, client_stream, app_port, prefix)
            return

        self.counters.denied += 1
        if protocol is None:
            prefix, protocol = await self._sniff(reader, detected, conn)
        if protocol is detect.Protocol.HTTP1:
            self._log_denied("HTTP/1 connection", conn, verdict)
            await self._refuse_http1(conn, client_stream, prefix, verdict)
        elif protocol is detect.Protocol.HTTP2:
            self._log_denied("HTTP/2 connection", conn, verdict)
            await self._refuse_http2(conn, client_stream, prefix, verdict)
        else:
            self._log_denied("connection", conn, verdict)

    def _log_denied(self, what: str, conn: _Conn, verdict: decision.Decision | None) -> None:
        logger.info(
            "denied %s from %s (%s) on port %d: %s",
            what,
            conn.client_id or "an unauthenticated client",
            conn.client.source_ip,
            conn.dest.port,
            _rule(verdict),
        )

    def _log_audit(self, what: str, conn: _Conn, verdict: decision.Decision | None) -> None:
        """The ``audit`` policy allows what it would refuse otherwise: say so, to be reviewed."""
        if verdict is not None and verdict.audit:
            logger.info(
                "audit: allowed %s from %s (%s) on port %d: %s",
                what,
                conn.client_id or "an unauthenticated client",
                conn.client.source_ip,
                conn.dest.port,
                _rule(verdict),
            )

    def _reason(self, conn: _Conn, verdict: decision.Decision | None) -> str | None:
        """The refusal's reason header: for meshed clients only."""
        return _rule(verdict) if conn.client.identity is not None else None

    async def _sniff(
        self, reader: asyncio.StreamReader, detected: detect.Protocol | None, conn: _Conn
    ) -> tuple[bytes, detect.Protocol]:
        """The stream's protocol, and the bytes read to learn it (to be passed on first).

        ``detected``: what the peek at the raw socket found, which for a plaintext stream is
        already the answer (nothing read)."""
        if detected is not None:
            return b"", (
                detected if detected is not detect.Protocol.TLS else detect.Protocol.OPAQUE
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DETECT_TIMEOUT
        seen = b""
        while len(seen) < detect.PEEK:
            found = detect.detect(seen)
            if found is not None:
                break
            try:
                more = await asyncio.wait_for(
                    reader.read(detect.PEEK - len(seen)), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                break
            if not more:
                break
            seen += more
        conn.tally.a_to_b += len(seen)
        found = detect.detect(seen)
        if found is None or found is detect.Protocol.TLS:
            found = detect.Protocol.OPAQUE  # TLS inside mesh TLS: the application's own
        return seen, found

    # -- allowed: splice ----------------------------------------------------------------------

    async def _splice(self, conn: _Conn, client: _Stream, app_port: int, prefix: bytes) -> None:
        try:
            app = await forward.open_connection(conn.app_host, app_port)
        except OSError as exc:
            logger.warning("application port %d refused the connection: %s", app_port, exc)
            return
        conn.transports.append(app[1].transport)
        if conn.terminated:  # a policy update closed it while the application was dialled
            app[1].transport.abort()
            return
        if prefix:
            app[1].write(prefix)
        # The application closing its side ends the connection (see forward's contract).
        await forward.splice(client, app, tally=conn.tally, half_close_grace=0.0)

    # -- denied: refusals ---------------------------------------------------------------------

    async def _refuse_http1(
        self, conn: _Conn, client: _Stream, prefix: bytes, verdict: decision.Decision | None
    ) -> None:
        """Read the first request's head, answer 403 (400 if it is not HTTP/1), close."""
        reader, writer = client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSAL_TIMEOUT
        requests = http.Requests()
        data = prefix
        while True:
            for event in requests.feed(data):
                if isinstance(event, http.Head):
                    await _answer(writer, http.forbidden(self._reason(conn, verdict)), conn)
                    await _linger_and_close(reader, writer, conn)
                    return
                if isinstance(event, http.Malformed):
                    await _answer(writer, http.bad_request(event.reason), conn)
                    await _linger_and_close(reader, writer, conn)
                    return
            try:
                data = await asyncio.wait_for(
                    reader.read(forward.CHUNK), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                return
            if not data:
                return
            conn.tally.a_to_b += len(data)

    async def _refuse_http2(
        self, conn: _Conn, client: _Stream, prefix: bytes, verdict: decision.Decision | None
    ) -> int:
        """Answer each request (gRPC status 7, or 403), GOAWAY, close; return how many."""
        reader, writer = client
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSAL_TIMEOUT
        refusal = grpc_deny.Refusal(self._reason(conn, verdict))
        await _answer(writer, refusal.start(), conn)
        data = prefix
        while True:
            if data:
                await _answer(writer, refusal.receive(data), conn)
            if refusal.done:
                break
            try:
                data = await asyncio.wait_for(
                    reader.read(forward.CHUNK), max(0.0, deadline - loop.time())
                )
            except TimeoutError:
                break
            if not data:
                break
            conn.tally.a_to_b += len(data)
        await _answer(writer, refusal.goodbye(), conn)
        await _linger_and_close(reader, writer, conn)
        return refusal.answered

    # -- policy updates -----------------------------------------------------------------------

    def revalidate(self, policy: decision.Policy) -> int:
        """Close the live connections ``policy`` no longer allows; return how many.

        A spliced connection is re-decided as a connection (no request). One decided request by
        request keeps going while routes matter (its next request meets the new policy anyway),
        and is closed only when the new policy refuses the connection as such and no route
        could change that. An upgraded tunnel (WebSocket, CONNECT) has no next request: it is
        re-decided with the request that opened it. Connections the new policy allows are not
        touched.
        """
        closed = 0
        for conn in list(self._live):
            if conn.terminated:
                continue
            verdict = policy.decide(conn.dest, conn.client, conn.tunnel)
            if verdict.allowed:
                continue
            if conn.per_request and conn.tunnel is None and policy.routes_matter(conn.dest):
                continue
            conn.terminated = True
            self._live.discard(conn)
            conn.abort()
            closed += 1
            self.counters.terminated += 1
            self.metrics.terminated(verdict, conn.dest.port, conn.client_id, conn.client.tls)
            logger.info(
                "closed a live connection from %s (%s) on port %d after a policy update: %s",
                conn.client_id or "an unauthenticated client",
                conn.client.source_ip,
                conn.dest.port,
                _rule(verdict),
            )
        return closed

    # -- local mode ---------------------------------------------------------------------------

    async def serve(
        self, host: str, port: int, app_port: int, policy_port: int | None = None
    ) -> listener.Listener:
        """Local mode: listen on ``host:port`` and forward allowed connections to ``app_port``,
        deciding as if they were addressed to ``policy_port`` (default: ``app_port``)."""

        async def accepted(sock: socket.socket) -> None:
            await self.handle(sock, policy_port or app_port, app_port)

        return await listener.listen(host, port, accepted, "inbound")


class _Http1:
    """One HTTP/1 connection decided request by request.

    Two tasks: this one reads the client's requests, decides each with the policy of the moment
    and forwards the allowed ones; ``_answers`` forwards the application's responses untouched
    while :class:`http.Responses` follows them, so a refusal can wait for every answer owed.
    The application is connected at the first allowed request: a client refused at once never
    reaches it.

    Every wait on the client also watches the application: once the application ends its side
    (it closed an idle keep-alive connection, ended a response that runs until the close, or
    its answers could not be forwarded), what it answered is flushed and the client is closed,
    as a direct connection would be. Deadlines (the module docstring's): a request head,
    :data:`HEAD_TIMEOUT` from its first byte (408); no request in progress and no answer owed,
    :data:`IDLE_TIMEOUT`. Bodies and tunnels get none of the proxy's: the request was allowed,
    and the application paces it.
    """

    def __init__(
        self, inbound: Inbound, conn: _Conn, client: _Stream, app_port: int, prefix: bytes
    ) -> None:
        self._inbound = inbound
        self._conn = conn
        self._reader, self._writer = client
        self._app_port = app_port
        self._prefix = prefix
        self._requests = http.Requests()
        self._responses = http.Responses()
        self._app: _Stream | None = None
        self._answering: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        now = asyncio.get_running_loop().time()
        self._head_started: float | None = now
        """When the request head being read began; None between requests. The first request's
        counts from here: its first bytes arrived already, or are due now."""
        self._admitted = False
        self._active = now
        """When a request was last admitted or an answer last forwarded: idleness counts from
        here (bytes between requests do not reset it)."""

    async def run(self) -> None:
        try:
            await self._serve()
        finally:
            if self._answering is not None:
                self._answering.cancel()
                (outcome,) = await asyncio.gather(self._answering, return_exceptions=True)
                if isinstance(outcome, Exception) and not isinstance(outcome, OSError):
                    logger.error("forwarding the application's answers failed", exc_info=outcome)
            if self._app is not None:
                self._app[1].transport.abort()
        await _close(self._writer)

    async def _serve(self) -> None:
        conn = self._conn
        data = self._prefix
        held: list[bytes] = []  # bytes after an Upgrade or CONNECT request
        upgrading = False
        while True:
            if not data:
                read = await self._read(deadlines=True)
                if read is None:
                    return
                if not read:
                    await self._client_done()
                    return
                data = read
            for event in self._requests.feed(data):
                if isinstance(event, http.Head):
                    if not await self._admit(event):
                        return
                    upgrading = upgrading or event.upgrade
                elif isinstance(event, http.Body):
                    if self._app is not None:  # always: a body follows its admitted head
                        self._app[1].write(event.data)
                elif isinstance(event, http.Tunnel):
                    held.append(event.data)
                else:
                    logger.info(
                        "malformed HTTP/1 request from %s on port %d: %s",
                        conn.client_id or conn.client.source_ip,
                        conn.dest.port,
                        event.reason,
                    )
                    await self._refuse(http.bad_request(event.reason))
                    return
            data = b""
            if self._requests.in_head:
                if self._head_started is None:
                    self._head_started = asyncio.get_running_loop().time()
            elif self._admitted:
                self._head_started = None
            if self._app is not None and not await self._to_app(b""):
                return
            if upgrading:
                await self._upgrade(b"".join(held))
                return

    async def _read(self, *, deadlines: bool) -> bytes | None:
        """The client's next bytes (b"" once it finished sending); None when the connection is
        over: the application ended its side, or a deadline passed (and was dealt with)."""
        loop = asyncio.get_running_loop()
        reading = asyncio.ensure_future(self._reader.read(forward.CHUNK))
        try:
            while True:
                if self._answering is not None and self._answering.done():
                    logger.debug(
                        "the application ended the connection from %s on port %d: closing it",
                        self._conn.client.source_ip,
                        self._conn.dest.port,
                    )
                    return None
                if reading.done():
                    data = reading.result()
                    self._conn.tally.a_to_b += len(data)
                    return data
                deadline = self._deadline() if deadlines else None
                if deadline is not None and loop.time() >= deadline:
                    await self._expire()
                    return None
                waits: set[asyncio.Future[Any]] = {reading}
                if self._answering is not None:
                    waits.add(self._answering)
                progress = None
                if deadlines and deadline is None:  # an answer may start the idle clock
                    self._progress.clear()
                    progress = asyncio.ensure_future(self._progress.wait())
                    waits.add(progress)
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if progress is not None:
                        progress.cancel()
        finally:
            if not reading.done():
                reading.cancel()  # StreamReader.read loses nothing when cancelled
                await asyncio.gather(reading, return_exceptions=True)

    def _deadline(self) -> float | None:
        if self._head_started is not None:
            return self._head_started + HEAD_TIMEOUT
        if self._requests.idle and self._responses.pending == 0:
            return self._active + IDLE_TIMEOUT
        return None

    async def _expire(self) -> None:
        conn = self._conn
        if self._requests.in_head:
            logger.info(
                "closed an HTTP/1 connection from %s on port %d: its request head was not "
                "complete %g s after its first byte",
                conn.client_id or conn.client.source_ip,
                conn.dest.port,
                HEAD_TIMEOUT,
            )
            await self._refuse(http.request_timeout(HEAD_TIMEOUT))
        else:
            logger.debug(
                "closed an idle HTTP/1 connection from %s on port %d",
                conn.client_id or conn.client.source_ip,
                conn.dest.port,
            )

    async def _to_app(self, data: bytes) -> bool:
        """Write ``data`` to the application and wait for it to take it; False if it is gone."""
        assert self._app is not None
        try:
            if data:
                self._app[1].write(data)
            await self._app[1].drain()
        except OSError:
            return False
        return True

    async def _admit(self, head: http.Head) -> bool:
        """Decide one request; forward its head if allowed. False: the connection is done."""
        inbound, conn = self._inbound, self._conn
        policy = inbound._policy()
        request = decision.Request(head.method, head.path)
        verdict = policy.decide(conn.dest, conn.client, request) if policy is not None else None
        allowed = verdict is not None and verdict.allowed
        inbound.metrics.authorized("http", verdict, conn.dest.port, conn.client_id, conn.client.tls)
        if not allowed:
            inbound.counters.requests_denied += 1
            inbound._log_denied(f"{head.method} {head.path}", conn, verdict)
            await self._refuse(http.forbidden(inbound._reason(conn, verdict)))
            return False
        inbound.counters.requests_allowed += 1
        inbound._settle(conn)
        inbound._log_audit(f"{head.method} {head.path}", conn, verdict)
        self._admitted = True
        self._head_started = None
        self._active = asyncio.get_running_loop().time()
        if head.upgrade:
            conn.tunnel = request  # no request follows: revalidate re-decides this one
        if self._app is None:
            try:
                self._app = await asyncio.open_connection(self._conn.app_host, self._app_port)
            except OSError as exc:
                logger.warning(
                    "application port %d refused the connection: %s", self._app_port, exc
                )
                await self._refuse(http.bad_gateway())
                return False
            conn.transports.append(self._app[1].transport)
            if conn.terminated:  # a policy update closed it while the application was dialled
                return False
            self._answering = asyncio.ensure_future(self._answers(self._app[0]))
        self._responses.expect(head.method)
        self._app[1].write(head.head)
        return True

    async def _answers(self, app_reader: asyncio.StreamReader) -> None:
        """Forward the application's bytes to the client, following its responses."""
        loop = asyncio.get_running_loop()
        try:
            while data := await app_reader.read(forward.CHUNK):
                self._writer.write(data)
                self._conn.tally.b_to_a += len(data)
                self._active = loop.time()
                self._responses.feed(data)
                await self._writer.drain()
                self._progress.set()
        finally:
            self._progress.set()

    async def _until(self, done: Callable[[], bool]) -> bool:
        """Wait until ``done()``; False if the application stopped answering first."""
        while not done():
            if self._answering is None or self._answering.done():
                return done()
            self._progress.clear()
            await self._progress.wait()
        return True

    def _all_answered(self) -> bool:
        r = self._responses
        return r.pending == 0 and r.broken is None and not r.tunnel

    async def _refuse(self, answer: bytes) -> None:
        """Stop reading the client; once every forwarded request has its answer, send
        ``answer`` and close. If the application left a request unanswered (it closed, its
        responses can not be followed, or :data:`ANSWER_TIMEOUT` passed), close without it: a
        403 there would read as part of another response."""
        try:
            answered = await asyncio.wait_for(self._until(self._all_answered), ANSWER_TIMEOUT)
        except TimeoutError:
            answered = False
        if not answered:
            logger.info(
                "closed an HTTP/1 connection from %s on port %d without its refusal: the "
                "application left %d request(s) unanswered",
                self._conn.client_id or self._conn.client.source_ip,
                self._conn.dest.port,
                self._responses.pending,
            )
            return
        await _answer(self._writer, answer, self._conn)
        await _linger_and_close(self._reader, self._writer, self._conn)

    async def _upgrade(self, held: bytes) -> None:
        """An Upgrade or CONNECT was forwarded: a tunnel if the application accepts it, else
        the connection ends after its answer (what the client sent after it is not HTTP/1
        this proxy can decide)."""
        tunnel = await self._until(lambda: self._responses.tunnel or self._all_answered())
        if not (tunnel and self._responses.tunnel) or self._app is None:
            return
        if held and not await self._to_app(held):
            return
        while data := await self._read(deadlines=False):
            if not await self._to_app(data):
                return
        if data is None:  # the application ended the tunnel
            return
        if self._app[1].can_write_eof():
            with contextlib.suppress(OSError):
                self._app[1].write_eof()
        await self._until(lambda: False)  # until the application is done too

    async def _client_done(self) -> None:
        """The client sent all it will: let the application answer what it was sent."""
        if self._app is None or self._responses.pending == 0:
            return
        if self._app[1].can_write_eof():
            with contextlib.suppress(OSError):
                self._app[1].write_eof()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until(self._all_answered), ANSWER_TIMEOUT)


async def _answer(writer: asyncio.StreamWriter, data: bytes, conn: _Conn) -> None:
    """Send the proxy's own answer; a client that does not take it within
    :data:`REFUSAL_TIMEOUT` is given up on (TimeoutError)."""
    if data:
        writer.write(data)
        conn.tally.b_to_a += len(data)
        await asyncio.wait_for(writer.drain(), REFUSAL_TIMEOUT)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close gracefully: what was written is flushed first, for at most :data:`CLOSE_TIMEOUT`
    (the caller's abort then cuts a client that does not take it)."""
    writer.close()
    with contextlib.suppress(TimeoutError, OSError):
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)


async def _linger_and_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
) -> None:
    """Close after a refusal without losing it: end our side, drain what the client still
    sends (bounded in time and bytes), then close, flushing what was written."""
    if writer.can_write_eof():
        with contextlib.suppress(OSError):
            writer.write_eof()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LINGER
    drained = 0
    with contextlib.suppress(TimeoutError, OSError):
        while drained < LINGER_BYTES:
            data = await asyncio.wait_for(reader.read(forward.CHUNK), deadline - loop.time())
            if not data:
                break
            drained += len(data)
    conn.tally.a_to_b += drained
    writer.close()
    with contextlib.suppress(TimeoutError, OSError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), LINGER)


class _Throttle:
    """At most one log line per :data:`OVER_LIMIT_LOG_INTERVAL`, telling how many events it
    stands for (a flood of refusals must not become a flood of log lines)."""

    def __init__(self) -> None:
        self._logged = float("-inf")
        self._unlogged = 0

    def due(self) -> int:
        """Count one event; how many to report now (0: not yet)."""
        self._unlogged += 1
        now = asyncio.get_running_loop().time()
        if now - self._logged < OVER_LIMIT_LOG_INTERVAL:
            return 0
        self._logged = now
        unlogged, self._unlogged = self._unlogged, 0
        return unlogged


def _no_mesh_identity(
    policy: decision.Policy | None, dest: decision.Destination, peer: str, why: str
) -> decision.Decision:
    """The refusal of a client whose certificate verified but names no SPIFFE ID, on the Server
    that covers the port (for the metrics' labels)."""
    client = decision.Client(source_ip=peer, tls=True)
    base = policy.decide(dest, client) if policy is not None else None
    return decision.Decision(
        allowed=False,
        audit=False,
        server_kind=base.server_kind if base is not None else "default",
        server_name=base.server_name if base is not None else proxy_metrics.NO_POLICY,
        rule_kind="certificate",
        rule_name="no-spiffe-id",
        reason=f"{why}: only a mesh certificate identifies a client; present one the identity "
        "service issued, or none",
        mtls_mode=base.mtls_mode if base is not None else resources.MTLSMode.STRICT,
    )


def _peer_ip(sock: socket.socket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return "0.0.0.0"


async def _peek(sock: socket.socket, timeout: float) -> bytes:
    """The first bytes, left in the socket: until :func:`detect.detect` can decide, the peer
    stops sending, or ``timeout`` (a client that sends nothing gets decided as opaque)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    seen = b""
    idle = 0.005
    while loop.time() < deadline:
        ready: asyncio.Future[None] = loop.create_future()

        def wake(future: asyncio.Future[None] = ready) -> None:
            if not future.done():
                future.set_result(None)

        loop.add_reader(sock.fileno(), wake)
        try:
            await asyncio.wait_for(ready, max(0.0, deadline - loop.time()))
        except TimeoutError:
            return seen
        finally:
            loop.remove_reader(sock.fileno())
        data = sock.recv(detect.PEEK, socket.MSG_PEEK)
        if not data or detect.detect(data) is not None or len(data) >= detect.PEEK:
            return data
        if data == seen:
            # Still the same prefix: the socket stays readable, so poll gently, not in a spin.
            idle = min(0.1, idle * 2)
            await asyncio.sleep(idle)
        else:
            idle = 0.005
        seen = data
    return seen
