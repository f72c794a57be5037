"""The proxy's trust state, reported to the policy server so an anchor rotation can tell when
every proxy is ready for its next phase (issue 6; what the server makes of it:
:mod:`meshward.proxyreports`).

A report says which trust bundle is in force (:func:`meshward.trustbundle.fingerprint`), which
issuer signed the leaf held and when that leaf expires, the pod and the proxy's version: what
``/identity`` on the admin endpoint shows. It is sent once the proxy holds a certificate, again
within :data:`CHECK_EVERY` seconds of the bundle or the leaf changing, and every ``interval``
seconds (30 by default) as a heartbeat, since the server forgets a proxy it has not heard from
for three of them.

Reports go over a channel of their own (:class:`meshward.proxy.policy_channel.Channel`) with
the TLS set-up of the policy stream: the workload certificate as client certificate, the server
verified against the trust bundle in force and the policy service's name. The channel is
replaced when either changes, so a report never runs ahead of the TLS state it describes (it is
built from the same certificate and bundle).

Reporting never affects serving: a failed report is logged (a warning when the failure is new,
debug while it repeats, info once it works again) and retried at the next heartbeat.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
from collections.abc import Callable

import grpc

from meshward import trustbundle
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import identity, policy_channel

logger = logging.getLogger(__name__)

CHECK_EVERY = 0.5
"""Seconds between looks at the bundle and the leaf: a change is reported within this."""
CALL_TIMEOUT = 10.0


def proxy_version() -> str:
    """The installed meshward version, as the report carries it."""
    try:
        return importlib.metadata.version("meshward")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclasses.dataclass(frozen=True)
class State:
    """What a report says; a new one differs from the last in something worth reporting."""

    trust_bundle: str
    leaf_issuer: str
    """Empty when the leaf came without an issuer certificate (an anchor signed it)."""
    leaf_not_after: int
    leaf_serial: int


def state_of(certified: identity.Certified, bundle: trustbundle.Bundle) -> State:
    issuer = certified.issuer
    return State(
        trust_bundle=bundle.fingerprint,
        leaf_issuer=trustbundle.certificate_fingerprint(issuer) if issuer is not None else "",
        leaf_not_after=int(certified.not_after.timestamp()),
        leaf_serial=certified.leaf.serial_number,
    )


class Reporter:
    def __init__(
        self,
        address: str,
        server_name: str,
        namespace: str,
        pod: str,
        *,
        key: bytes,
        certified: Callable[[], identity.Certified | None],
        bundle: Callable[[], trustbundle.Bundle],
        interval: float,
        version: str | None = None,
    ) -> None:
        """Report ``pod`` of ``namespace`` to the policy server at ``address`` ("host:port"),
        whose certificate names ``server_name``. ``key`` is the workload key (PEM);
        ``certified`` gives the certificate held (None: none, nothing is reported) and
        ``bundle`` the trust bundle in force."""
        self.address = address
        self.server_name = server_name
        self.namespace = namespace
        self.pod = pod
        self.interval = interval
        self.version = version or proxy_version()
        self._key = key
        self._certified = certified
        self._bundle = bundle
        # A short reconnect backoff: after an outage, gRPC's default (up to 120 s) could miss
        # the three heartbeats after which the server forgets the proxy.
        self._channel = policy_channel.Channel(
            address, server_name, policy_channel.reconnect_options()
        )
        self._attempted: State | None = None
        self._failing: str | None = None
        """The status code name of the failure in progress, if any."""
        self.sent = 0
        """Reports the server accepted."""

    async def run(self) -> None:
        """Report until cancelled."""
        loop = asyncio.get_running_loop()
        due = 0.0
        while True:
            certified = self._certified()
            if certified is not None:
                bundle = self._bundle()
                state = state_of(certified, bundle)
                if state != self._attempted or loop.time() >= due:
                    self._attempted = state
                    due = loop.time() + self.interval
                    try:
                        await self._send(certified, bundle, state)
                    except Exception as exc:  # noqa: BLE001 - reporting must outlive any failure
                        self._failed(type(exc).__name__, str(exc))
            await asyncio.sleep(CHECK_EVERY)

    async def _send(
        self, certified: identity.Certified, bundle: trustbundle.Bundle, state: State
    ) -> None:
        request = policy_pb2.ProxyReport(
            namespace=self.namespace,
            pod=self.pod,
            trust_bundle_fingerprint=state.trust_bundle,
            leaf_issuer_fingerprint=state.leaf_issuer,
            leaf_not_after_unix=state.leaf_not_after,
            proxy_version=self.version,
        )
        try:
            stub = self._stub(certified, bundle)
            await stub.Report(request, timeout=CALL_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            self._failed(exc.code().name, str(exc.details()))
            return
        self.sent += 1
        if self._failing is not None:
            logger.info("trust state reported to %s again", self.address)
            self._failing = None
        logger.debug(
            "reported trust bundle %s, leaf issuer %s to %s",
            state.trust_bundle,
            state.leaf_issuer or "none",
            self.address,
        )

    def _failed(self, code: str, details: str) -> None:
        log = logger.warning if code != self._failing else logger.debug
        log(
            "can not report the trust state to the policy server at %s (%s: %s); retrying "
            "every %g s",
            self.address,
            code,
            details,
            self.interval,
        )
        self._failing = code

    def _stub(
        self, certified: identity.Certified, bundle: trustbundle.Bundle
    ) -> policy_pb2_grpc.PolicyStub:
        """A stub on a channel with the certificate and bundle in force (a new channel when
        either changed since the last report)."""
        tls = policy_channel.ChannelTls(
            anchors=bundle.pem, key=self._key, chain=certified.chain_pem()
        )
        channel = self._channel.get(tls)
        return policy_pb2_grpc.PolicyStub(channel)  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        """Close the channel (the next report opens another)."""
        await self._channel.close()
