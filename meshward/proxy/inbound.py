"""The inbound side: every connection to the workload is checked before a byte reaches it.

For each accepted connection: peek at the first bytes (nothing consumed), let the port's
effective mTLS mode decide how to treat them (STRICT refuses plaintext; PERMISSIVE takes TLS or
plaintext; DISABLE passes bytes through untouched), terminate TLS and read the client's SPIFFE ID
from its verified certificate, ask :func:`meshward.policy.decision.decide`, then either splice the
connection to the application or close it without forwarding a byte. No policy yet means deny.

This module decides per connection. Per-request decisions on HTTP ports (403, gRPC status 7, the
probe-path allowances) are the next layer and are not built yet; until then an HTTP port is
decided as a TCP connection.

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

from meshward import errors
from meshward.policy import decision, resources
from meshward.proxy import detect, forward, tls

logger = logging.getLogger(__name__)

DETECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


@dataclasses.dataclass
class Counters:
    """What happened to connections, for metrics and tests."""

    accepted: int = 0
    allowed: int = 0
    denied: int = 0
    plaintext_refused: int = 0
    handshake_failed: int = 0


ServerContext = Callable[[bool], ssl.SSLContext | None]
"""Given whether a client certificate is required, the current server context (None: no
certificate yet, so TLS can not be served)."""


class Inbound:
    def __init__(
        self,
        *,
        policy: Callable[[], decision.Policy | None],
        server_context: ServerContext,
        pod: str | None,
        labels: dict[str, str],
        app_host: str = "127.0.0.1",
    ) -> None:
        self._policy = policy
        self._server_context = server_context
        self._pod = pod
        self._labels = labels
        self._app_host = app_host
        self.counters = Counters()

    async def handle(self, sock: socket.socket, port: int, app_port: int) -> None:
        """Own ``sock`` from here on: it is closed on every path."""
        self.counters.accepted += 1
        peer = _peer_ip(sock)
        try:
            await self._handle(sock, peer, port, app_port)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            logger.debug("inbound connection from %s ended: %s", peer, exc)
        except Exception:
            logger.exception("inbound connection from %s failed unexpectedly", peer)
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    async def _handle(self, sock: socket.socket, peer: str, port: int, app_port: int) -> None:
        loop = asyncio.get_running_loop()
        policy = self._policy()
        dest = decision.Destination(port=port, labels=self._labels, pod=self._pod)
        first = await _peek(sock, DETECT_TIMEOUT)
        protocol = detect.detect(first) or detect.Protocol.OPAQUE
        mode = policy.mtls_mode(dest) if policy is not None else resources.MTLSMode.STRICT
        terminate = protocol is detect.Protocol.TLS and mode is not resources.MTLSMode.DISABLE
        if mode is resources.MTLSMode.STRICT and not terminate:
            self.counters.plaintext_refused += 1
            logger.info("refused plaintext from %s on port %d: mTLS is STRICT", peer, port)
            return
        ctx = self._server_context(mode is resources.MTLSMode.STRICT) if terminate else None
        if terminate and ctx is None:
            logger.info("refused TLS from %s on port %d: no certificate yet", peer, port)
            return
        reader = asyncio.StreamReader(limit=forward.CHUNK)
        protocol_obj = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await asyncio.wait_for(
                loop.connect_accepted_socket(lambda: protocol_obj, sock, ssl=ctx),
                HANDSHAKE_TIMEOUT,
            )
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            if terminate:
                self.counters.handshake_failed += 1
                logger.info("TLS handshake from %s on port %d failed: %s", peer, port, exc)
            return
        writer = asyncio.StreamWriter(transport, protocol_obj, reader, loop)
        try:
            await self._decide_and_forward(
                reader, writer, policy, dest, peer, port, app_port, terminate
            )
        finally:
            transport.abort()  # after splice, a no-op; on every other path, the only close

    async def _decide_and_forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        policy: decision.Policy | None,
        dest: decision.Destination,
        peer: str,
        port: int,
        app_port: int,
        terminate: bool,
    ) -> None:
        try:
            identity = tls.peer_identity(writer.get_extra_info("ssl_object")) if terminate else None
        except errors.UntrustedChain:
            self.counters.denied += 1
            logger.info("denied a certificate without a mesh identity from %s on %d", peer, port)
            return
        client = decision.Client(identity=identity, source_ip=peer, tls=terminate)
        verdict = decision.decide(policy, dest, client) if policy is not None else None
        if verdict is None or not verdict.allowed:
            self.counters.denied += 1
            rule = (
                f"{verdict.rule_kind} {verdict.rule_name}: {verdict.reason}"
                if verdict
                else "no policy yet"
            )
            logger.info(
                "denied %s from %s on port %d (%s)", identity or "unauthenticated", peer, port, rule
            )
            return
        self.counters.allowed += 1
        try:
            app = await asyncio.open_connection(self._app_host, app_port)
        except OSError as exc:
            logger.warning("application port %d refused the connection: %s", app_port, exc)
            return
        await forward.splice((reader, writer), app)

    async def serve(
        self, host: str, port: int, app_port: int, policy_port: int | None = None
    ) -> _Server:
        """Local mode: listen on ``host:port`` and forward allowed connections to ``app_port``,
        deciding as if they were addressed to ``policy_port`` (default: ``app_port``)."""
        loop = asyncio.get_running_loop()
        listener = socket.socket(
            socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM
        )
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(512)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        tasks: set[asyncio.Task[None]] = set()

        async def accept_loop() -> None:
            while True:
                try:
                    sock, _ = await loop.sock_accept(listener)
                except OSError as exc:  # out of descriptors, say: back off, keep listening
                    logger.warning("accepting on port %d failed: %s", port, exc)
                    await asyncio.sleep(0.1)
                    continue
                sock.setblocking(False)
                task = loop.create_task(self.handle(sock, policy_port or app_port, app_port))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        return _Server(listener, loop.create_task(accept_loop()), tasks)


class _Server:
    """The accept loop and its connections, closed together."""

    def __init__(
        self, listener: socket.socket, accepting: asyncio.Task[None], tasks: set[asyncio.Task[None]]
    ) -> None:
        self._listener = listener
        self._accepting = accepting
        self._tasks = tasks

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    def close(self) -> None:
        self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()
        self._listener.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(self._accepting, *self._tasks, return_exceptions=True)


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
