"""Where the proxy's policy comes from in a mesh: the policy server's Watch stream, over mutual
TLS with the workload certificate.

Same contract as :class:`meshward.proxy.policy_source.FileSource`: ``current()`` is the last
valid policy, or None before there was one (the inbound side denies everything then); a document
that fails to parse, whose hash does not match its content, or that is for another namespace is
refused and the last valid policy stays; ``on_update`` is called after a new policy takes effect.

When the server is unreachable or the stream breaks, the policy held stays in force, the outage
is logged once, and the stream is reopened with capped exponential backoff (0.1 s to 5 s); the
server resends the current document at once, so the proxy catches up. The client certificate is
read through a callable: while there is none the source waits, and when it renews the stream is
reopened with the new one (the server ends a stream when the certificate that opened it expires).

The channel is built as every client of the policy service in the proxy builds it
(:mod:`meshward.proxy.policy_channel`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import grpc

from meshward import errors
from meshward.identity import pki
from meshward.policy import compiled, decision, resources
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import policy_channel

logger = logging.getLogger(__name__)

BACKOFF_MIN, BACKOFF_MAX = 0.1, 5.0
CREDENTIALS_POLL = 0.5
"""How often the certificate is checked for renewal (and awaited while there is none)."""
KEEPALIVE = (
    # A quiet stream is normal (policy rarely changes): ping to notice a server that vanished.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)


class StreamSource:
    def __init__(
        self,
        address: str,
        server_name: str,
        namespace: str,
        anchors: bytes,
        credentials: policy_channel.Credentials,
        *,
        on_update: Callable[[decision.Policy], None] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """Follow ``namespace``'s policy from the server at ``address`` ("host:port"), whose
        certificate must chain to ``anchors`` (PEM) and name ``server_name``."""
        policy_channel.check_address(address, server_name)
        if not resources.is_dns_label(namespace):
            raise errors.ConfigError(
                f"namespace {namespace!r} is not a DNS-1123 label: pass the pod's namespace"
            )
        pki.load_certificates(anchors, what="trust anchors")
        self.address = address
        self.server_name = server_name
        self.namespace = namespace
        self._anchors = anchors
        self._credentials = credentials
        self._on_update = on_update
        self._jitter = jitter
        self._policy: decision.Policy | None = None
        self._document: compiled.PolicyDocument | None = None
        self.updates = 0
        self.refused = 0
        self.connected = False
        """True while a stream is open and accepted by the server."""
        self._failures = 0
        self._outage_since: float | None = None

    def current(self) -> decision.Policy | None:
        return self._policy

    def trust(self, anchors: bytes) -> None:
        """Verify the server against ``anchors`` (PEM) from the next stream on; the open stream
        stays up (it was verified when it was opened)."""
        pki.load_certificates(anchors, what="trust anchors")
        self._anchors = anchors

    @property
    def document(self) -> compiled.PolicyDocument | None:
        return self._document

    async def run(self) -> None:
        """Follow the stream until cancelled."""
        waiting_logged = False
        while True:
            try:
                credentials = self._credentials()
                if credentials is None:
                    if not waiting_logged:
                        logger.info("policy stream waits for the workload certificate")
                        waiting_logged = True
                    await asyncio.sleep(CREDENTIALS_POLL)
                    continue
                waiting_logged = False
                reason = await self._stream(credentials)
            except Exception as exc:  # noqa: BLE001 - the policy held must outlive any failure
                reason = f"{type(exc).__name__}: {exc}"
            if reason is None:
                continue  # the certificate renewed: reopen with it at once
            self._failures += 1
            base = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(self._failures - 1, 16))
            delay = max(BACKOFF_MIN, base * (0.5 + self._jitter() / 2))
            if self._outage_since is None:
                self._outage_since = asyncio.get_running_loop().time()
                held = self._document.hash[:19] if self._document else None
                logger.warning(
                    "policy stream to %s lost (%s); keeping %s, reconnecting",
                    self.address,
                    reason,
                    f"policy {held}" if held else "no policy (all inbound denied)",
                )
            else:
                logger.debug("policy stream to %s still down (%s)", self.address, reason)
            await asyncio.sleep(delay)

    async def _stream(self, credentials: tuple[bytes, bytes]) -> str | None:
        """One Watch: None when it ended because the certificate renewed, else why it failed."""
        key, chain = credentials
        tls = policy_channel.ChannelTls(anchors=self._anchors, key=key, chain=chain)
        async with policy_channel.open_channel(
            self.address, self.server_name, tls, KEEPALIVE
        ) as channel:
            stub = policy_pb2_grpc.PolicyStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Watch(policy_pb2.WatchRequest(namespace=self.namespace))
            loop = asyncio.get_running_loop()
            reading = loop.create_task(self._read(call))
            renewed = loop.create_task(self._renewed(credentials))
            try:
                done, _ = await asyncio.wait(
                    {reading, renewed}, return_when=asyncio.FIRST_COMPLETED
                )
                if renewed in done:
                    logger.info("workload certificate renewed: reopening the policy stream")
                    return None
                return reading.result()
            finally:
                self.connected = False
                for task in (reading, renewed):
                    task.cancel()
                call.cancel()
                await asyncio.gather(reading, renewed, return_exceptions=True)

    def _accepted(self) -> None:
        """The server took the Watch: the outage, if any, is over."""
        self.connected = True
        self._failures = 0
        if self._outage_since is not None:
            logger.info(
                "policy stream to %s restored after %.1f s",
                self.address,
                asyncio.get_running_loop().time() - self._outage_since,
            )
            self._outage_since = None

    async def _read(self, call: grpc.aio.UnaryStreamCall) -> str:
        """Take in updates until the stream ends; why it ended."""
        try:
            await call.initial_metadata()
            if not call.done():
                self._accepted()
            async for update in call:
                self._take(update)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        code = await call.code()
        return f"the server ended the stream ({code.name})"

    async def _renewed(self, credentials: tuple[bytes, bytes]) -> None:
        """Return once the credentials callable hands out a different certificate."""
        while True:
            await asyncio.sleep(CREDENTIALS_POLL)
            fresh = self._credentials()
            if fresh is not None and fresh != credentials:
                return

    def _take(self, update: policy_pb2.PolicyUpdate) -> None:
        try:
            document = compiled.PolicyDocument.from_json(update.document)
            if update.hash != document.hash:
                raise errors.PolicyError(
                    f"the update says hash {update.hash[:80]!r} but carries a document with "
                    f"hash {document.hash!r}"
                )
            if document.namespace != self.namespace:
                raise errors.PolicyError(
                    f"the document is for namespace {document.namespace!r}, not {self.namespace!r}"
                )
        except errors.PolicyError as exc:
            self.refused += 1
            logger.error(
                "policy from %s refused, keeping the last valid one: %s", self.address, exc
            )
            return
        if self._document is not None and document.hash == self._document.hash:
            return
        policy = decision.Policy(document)
        self._document = document
        self._policy = policy
        self.updates += 1
        logger.info("policy %s from %s in effect", document.hash[:19], self.address)
        if self._on_update is not None:
            try:
                self._on_update(policy)
            except Exception:  # a failing listener must not stop policy updates
                logger.exception("the policy update listener failed; the new policy is in effect")
