"""The channel every client of the policy service in the proxy uses: the Watch stream
(:mod:`meshward.proxy.policy_stream`), the trust-state reports (:mod:`meshward.proxy.report`)
and the destination lookups (:mod:`meshward.proxy.discovery`) all authenticate the same way,
with the workload certificate as client certificate and the server verified against the trust
bundle in force and the policy service's name.

:func:`open_channel` gives a channel for one connection's worth of use (the stream opens one per
Watch); :class:`Channel` keeps one for a caller of unary methods and replaces it when the
certificate renews or the trust bundle changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence

import grpc

from meshward import errors

RETIRE_GRACE = 2.0
"""Seconds a replaced :class:`Channel` gives the calls still on it before it is closed."""

RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 5.0
"""Seconds between a failed connection attempt and the next, from the first to at most the
last (:func:`reconnect_options`). gRPC's default grows to 120 s; while a channel waits out its
backoff every call on it fails at once, so after a long outage of the policy service the
proxy could go on getting no answer for up to two minutes after the service was back.
Measured on loopback, destination lookups after a 30 s outage were answered again after
10.2-16.3 s (median 12.7) with the defaults, 1.1-4.1 s (median 1.6) with 1 s to 5 s."""

Credentials = Callable[[], tuple[bytes, bytes] | None]
"""Returns the workload's (private key PEM, certificate chain PEM), or None while it has none."""
ChannelOptions = Sequence[tuple[str, int | str]]


@dataclasses.dataclass(frozen=True)
class ChannelTls:
    """What a channel to the policy service is built from: the workload's key and certificate
    chain (PEM) as its client certificate, and the trust anchors (PEM) that the server's
    certificate must chain to."""

    anchors: bytes
    key: bytes
    chain: bytes


def check_address(address: str, server_name: str) -> None:
    """Raise :class:`~meshward.errors.ConfigError` unless ``address`` is "host:port" and
    ``server_name`` is set."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.ConfigError(
            f"policy server address {address!r} is not host:port, e.g. "
            "'meshward-policy.meshward.svc.cluster.local:8090'"
        )
    if not server_name:
        raise errors.ConfigError(
            "the policy server name is empty: pass the DNS name in its certificate"
        )


def reconnect_options(
    initial: float = RECONNECT_INITIAL, maximum: float = RECONNECT_MAX
) -> ChannelOptions:
    """Channel options that retry a lost connection after ``initial`` seconds, backing off to
    at most ``maximum``. A connection attempt is given ``maximum`` seconds as well (gRPC's
    ``min_reconnect_backoff_ms`` is that time, 20 s by default): enough for a handshake with a
    loaded server, short enough that an attempt lost in a partition is soon replaced by a new
    one once the network heals."""
    if not 0 < initial <= maximum:
        raise errors.ConfigError(
            f"the reconnect backoff must start above 0 s and not exceed its maximum, not "
            f"{initial} s to {maximum} s"
        )
    return (
        ("grpc.initial_reconnect_backoff_ms", round(initial * 1000)),
        ("grpc.max_reconnect_backoff_ms", round(maximum * 1000)),
        ("grpc.min_reconnect_backoff_ms", round(maximum * 1000)),
    )


def open_channel(
    address: str, server_name: str, tls: ChannelTls, options: ChannelOptions = ()
) -> grpc.aio.Channel:
    """A channel to the policy service at ``address`` over mutual TLS: ``tls``'s certificate
    as the client's, the server's verified against ``tls.anchors`` and ``server_name``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.anchors, private_key=tls.key, certificate_chain=tls.chain
    )
    return grpc.aio.secure_channel(
        address, credentials, (("grpc.ssl_target_name_override", server_name), *options)
    )


class Channel:
    """A channel to the policy service kept for unary calls, built from the TLS state asked
    for: the same state reuses it, a different one (a renewed certificate, a new trust bundle)
    replaces it. A replaced channel is closed after the calls on it had
    :data:`RETIRE_GRACE` seconds to finish, so concurrent callers are not cut off."""

    def __init__(self, address: str, server_name: str, options: ChannelOptions = ()) -> None:
        check_address(address, server_name)
        self.address = address
        self.server_name = server_name
        self._options = tuple(options)
        self._channel: grpc.aio.Channel | None = None
        self._tls: ChannelTls | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    def get(self, tls: ChannelTls) -> grpc.aio.Channel:
        """The channel built from ``tls`` (a new one when the state differs from the last)."""
        if self._channel is not None and self._tls == tls:
            return self._channel
        old = self._channel
        self._channel = open_channel(self.address, self.server_name, tls, self._options)
        self._tls = tls
        if old is not None:
            retiring = asyncio.get_running_loop().create_task(old.close(RETIRE_GRACE))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        return self._channel

    async def close(self) -> None:
        """Close the channel and any being replaced (the next :meth:`get` opens another)."""
        channel, self._channel, self._tls = self._channel, None, None
        if channel is not None:
            await channel.close()
        retiring = list(self._retiring)
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)
