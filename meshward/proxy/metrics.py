"""What the proxy counts, in Prometheus text on the admin server's ``/metrics``.

Names follow Linkerd's proxy where it has one, so existing dashboards and alerts carry over:

    inbound_tcp_authz_allow_total      connections allowed         } by server, authorization,
    inbound_tcp_authz_deny_total       connections refused         } tls and client identity
    inbound_tcp_authz_terminate_total  live connections closed by a policy update
    inbound_http_authz_allow_total     HTTP requests allowed
    inbound_http_authz_deny_total      HTTP requests refused (403)
    tcp_open_total / tcp_close_total / tcp_open_connections     by direction
    tcp_read_bytes_total / tcp_write_bytes_total                by direction, counted as the
                                                                proxy reads from and writes to
                                                                the client side
    tls_handshake_failures_total       by direction (no Linkerd equivalent)
    outbound_tls_peer_refused_total    by reason: outbound peers whose chain verified but that
                                       were refused before a byte was sent, as ``identity``
                                       (it proved an identity outside the ones expected for
                                       the destination) or ``no_identity`` (it named no mesh
                                       identity); no Linkerd equivalent
    tcp_refused_over_limit_total       by direction: closed at once, the most connections open
    tcp_refused_source_limit_total     by direction: closed at once, the most undecided
                                       connections from that source address open
    identity_cert_expiration_timestamp_seconds, identity_cert_refresh_total
    identity_trust_bundle_info         1, labelled with the fingerprint of the trust bundle in
                                       force (meshward.trustbundle.fingerprint)
    identity_trust_bundle_reloads_total  by result: ok (a new bundle took effect) or invalid (a
                                       changed bundle file was refused, the old bundle kept)
    policy_updates_total
    outbound_discovery_total           transparent mode, by result: how outbound connections
                                       into the mesh networks went on the policy service's
                                       word (no Linkerd equivalent): meshed (mTLS, the peer's
                                       identity pinned), plain (not meshed: plaintext),
                                       stale (no answer now: mTLS pinned to the identities of
                                       an expired meshed answer) or fallback (no answer: mTLS
                                       to any mesh identity)

Which counter a decision lands in follows what was decided, so that both outcomes on a port
always count under the same protocol:

- a decision about a connection (one per connection: opaque TCP, and HTTP where no request can
  change the outcome) counts once in ``inbound_tcp_authz_*``, allowed or denied, however the
  refusal is delivered: closed outright, a 403 to an HTTP/1 client, or a 403 or gRPC status 7
  to each request of an HTTP/2 client (still one count: the requests answered are how the
  refusal is told, not further decisions);
- a decision about a request (HTTP/1 where routes matter, request by request) counts once per
  request in ``inbound_http_authz_*``;
- a client certificate that verifies against the trust anchors but names no SPIFFE ID is an
  ``inbound_tcp_authz_deny_total`` with ``authz_kind="certificate"`` and
  ``authz_name="no-spiffe-id"``, not a handshake failure: TLS accepted the chain, the proxy
  refused the client. ``tls_handshake_failures_total`` counts only handshakes TLS itself failed
  (an untrusted or expired chain, no certificate where one is required, a timeout).

A server is ``srv_kind="Server"`` with the Server's name, or ``srv_kind="default"`` with the
default policy's name; the authorization is the rule that decided (``authz_kind`` such as
``ServerAuthorization``, ``AuthorizationPolicy``, ``probe``, ``default``, ``PeerAuthentication``
or ``certificate``). A decision the ``audit`` default policy allowed has ``authz_kind="default"``
and ``authz_name="audit"`` (and the proxy logs it). ``client_id`` is the client's identity name,
empty without mTLS.

Each proxy owns its registry, so several proxies (and tests) in one process never mix figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import prometheus_client

from meshward.policy import decision

GROUP = "policy.meshward.io"
NO_POLICY = "no-policy"
"""``srv_name`` of denials made before any policy arrived."""

_AUTHZ_LABELS = (
    "srv_group",
    "srv_kind",
    "srv_name",
    "srv_port",
    "authz_group",
    "authz_kind",
    "authz_name",
    "tls",
    "client_id",
)

Direction = Literal["inbound", "outbound"]
ReloadResult = Literal["ok", "invalid"]
DiscoveryResult = Literal["meshed", "plain", "stale", "fallback"]
PeerRefusal = Literal["identity", "no_identity"]


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        r = self.registry

        def authz(name: str, what: str) -> prometheus_client.Counter:
            return prometheus_client.Counter(name, what, _AUTHZ_LABELS, registry=r)

        # prometheus_client appends "_total" to counter names itself.
        self._tcp_allow = authz("inbound_tcp_authz_allow", "Inbound connections allowed")
        self._tcp_deny = authz("inbound_tcp_authz_deny", "Inbound connections refused")
        self._tcp_terminate = authz(
            "inbound_tcp_authz_terminate",
            "Live inbound connections closed because a policy update no longer allows them",
        )
        self._http_allow = authz("inbound_http_authz_allow", "Inbound HTTP requests allowed")
        self._http_deny = authz("inbound_http_authz_deny", "Inbound HTTP requests refused")
        self._open = prometheus_client.Counter(
            "tcp_open", "Connections opened", ["direction"], registry=r
        )
        self._close = prometheus_client.Counter(
            "tcp_close", "Connections closed", ["direction"], registry=r
        )
        self._open_now = prometheus_client.Gauge(
            "tcp_open_connections", "Connections open now", ["direction"], registry=r
        )
        self._read = prometheus_client.Counter(
            "tcp_read_bytes", "Bytes read from clients", ["direction"], registry=r
        )
        self._written = prometheus_client.Counter(
            "tcp_write_bytes", "Bytes written to clients", ["direction"], registry=r
        )
        self._handshake = prometheus_client.Counter(
            "tls_handshake_failures", "TLS handshakes that failed", ["direction"], registry=r
        )
        self._peer_refused = prometheus_client.Counter(
            "outbound_tls_peer_refused",
            "Outbound peers refused after a verified handshake: an identity other than the ones "
            "expected (identity) or no mesh identity at all (no_identity)",
            ["reason"],
            registry=r,
        )
        for reason in get_args(PeerRefusal):
            self._peer_refused.labels(reason)
        self._over_limit = prometheus_client.Counter(
            "tcp_refused_over_limit",
            "Connections closed at once because the most allowed were open",
            ["direction"],
            registry=r,
        )
        self._source_limit = prometheus_client.Counter(
            "tcp_refused_source_limit",
            "Connections closed at once because their source had the most undecided ones open",
            ["direction"],
            registry=r,
        )
        self.policy_updates = prometheus_client.Counter(
            "policy_updates", "Policy documents taken into effect", registry=r
        )
        self.cert_refresh = prometheus_client.Counter(
            "identity_cert_refresh", "Certificates obtained from the identity service", registry=r
        )
        self._cert_expiry = prometheus_client.Gauge(
            "identity_cert_expiration_timestamp_seconds",
            "When the current workload certificate expires (0: none held)",
            registry=r,
        )

        self._bundle_info = prometheus_client.Gauge(
            "identity_trust_bundle_info",
            "The trust bundle in force, by fingerprint (sha256 over its anchors' sorted DER)",
            ["fingerprint"],
            registry=r,
        )
        self._bundle_reloads = prometheus_client.Counter(
            "identity_trust_bundle_reloads",
            "Changes of the mounted trust bundle: taken into effect (ok) or refused (invalid)",
            ["result"],
            registry=r,
        )
        for result in get_args(ReloadResult):
            self._bundle_reloads.labels(result)  # both series exist from the start, at 0
        self._discovery = prometheus_client.Counter(
            "outbound_discovery",
            "Outbound connections into the mesh networks, by what destination discovery "
            "decided: meshed, plain, stale (no answer: pinned to an expired answer's "
            "identities) or fallback (no answer: mTLS to any mesh identity)",
            ["result"],
            registry=r,
        )
        for found in get_args(DiscoveryResult):
            self._discovery.labels(found)

    def trust_bundle(self, fingerprint: str) -> None:
        """The bundle in force is now the one with ``fingerprint`` (the only series, at 1)."""
        self._bundle_info.clear()
        self._bundle_info.labels(fingerprint).set(1)

    def bundle_reloaded(self, result: ReloadResult) -> None:
        self._bundle_reloads.labels(result).inc()

    def discovered(self, result: DiscoveryResult) -> None:
        """Count one outbound connection decided by destination discovery."""
        self._discovery.labels(result).inc()

    def certificate_expiry(self, seconds: Callable[[], float]) -> None:
        """Read the certificate's expiry at each scrape (a Unix time; 0 while none is held)."""
        self._cert_expiry.set_function(seconds)

    def authorized(
        self,
        protocol: Literal["tcp", "http"],
        verdict: decision.Decision | None,
        port: int,
        client_id: str | None,
        tls: bool,
    ) -> None:
        """Count one decision: allow or deny by ``verdict`` (None, no policy yet: deny)."""
        allowed = verdict is not None and verdict.allowed
        if protocol == "tcp":
            counter = self._tcp_allow if allowed else self._tcp_deny
        else:
            counter = self._http_allow if allowed else self._http_deny
        counter.labels(*_authz_labels(verdict, port, client_id, tls)).inc()

    def terminated(
        self, verdict: decision.Decision | None, port: int, client_id: str | None, tls: bool
    ) -> None:
        """Count a live connection closed because the new policy's ``verdict`` refuses it."""
        self._tcp_terminate.labels(*_authz_labels(verdict, port, client_id, tls)).inc()

    def opened(self, direction: Direction) -> None:
        self._open.labels(direction).inc()
        self._open_now.labels(direction).inc()

    def closed(self, direction: Direction, read: int = 0, written: int = 0) -> None:
        """A connection ended; ``read`` and ``written`` are the bytes exchanged with the client."""
        self._close.labels(direction).inc()
        self._open_now.labels(direction).dec()
        if read:
            self._read.labels(direction).inc(read)
        if written:
            self._written.labels(direction).inc(written)

    def handshake_failed(self, direction: Direction) -> None:
        self._handshake.labels(direction).inc()

    def peer_refused(self, reason: PeerRefusal) -> None:
        """Count an outbound peer refused for ``reason`` after its chain verified."""
        self._peer_refused.labels(reason).inc()

    def over_limit(self, direction: Direction) -> None:
        self._over_limit.labels(direction).inc()

    def source_limit(self, direction: Direction) -> None:
        self._source_limit.labels(direction).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def _authz_labels(
    verdict: decision.Decision | None, port: int, client_id: str | None, tls: bool
) -> tuple[str, ...]:
    if verdict is None:
        srv_kind, srv_name, authz_kind, authz_name = "default", NO_POLICY, "default", NO_POLICY
    else:
        srv_kind, srv_name = verdict.server_kind, verdict.server_name
        authz_kind, authz_name = verdict.rule_kind, verdict.rule_name
    return (
        GROUP,
        srv_kind,
        srv_name,
        str(port),
        GROUP,
        authz_kind,
        authz_name,
        "true" if tls else "false",
        client_id or "",
    )
