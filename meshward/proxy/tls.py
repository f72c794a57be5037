"""TLS for mesh connections: contexts built from the workload certificate, and the peer's
identity read from a verified handshake.

Every mesh connection is TLS 1.3 with both certificates checked against the trust anchors under
OpenSSL's strict X.509 rules. Host names play no part: mesh identities live in URI SANs, which
OpenSSL's host-name check never matches, so the peer's SPIFFE ID is read from its verified leaf
and compared by the caller.

Contexts are immutable once built; when the certificate renews, build new ones (new connections
take them, live connections keep theirs).
"""

from __future__ import annotations

import pathlib
import secrets
import ssl

from cryptography import x509

from meshward import errors
from meshward.identity import pki
from meshward.proxy import identity

CERT_FILE = "certificate.pem"


def _write_chain(directory: pathlib.Path, certified: identity.Certified) -> pathlib.Path:
    """The public chain beside key.p8 (ssl loads only files), replaced atomically."""
    path = directory / CERT_FILE
    staged = directory / f".{CERT_FILE}.{secrets.token_hex(8)}.tmp"
    staged.write_bytes(certified.chain_pem())
    staged.replace(path)
    return path


def _base(protocol: int, anchors: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cadata=anchors.decode())
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def server_context(
    directory: pathlib.Path,
    certified: identity.Certified,
    anchors: bytes,
    *,
    require_client_certificate: bool = True,
) -> ssl.SSLContext:
    """For inbound mTLS. Without ``require_client_certificate`` a TLS client without a
    certificate is let through the handshake as an unauthenticated TLS peer; one that presents a
    certificate must still present a valid one."""
    ctx = _base(ssl.PROTOCOL_TLS_SERVER, anchors)
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_certificate else ssl.CERT_OPTIONAL
    # gRPC clients insist on negotiating h2. HTTP/1.1 comes first (the server's preference
    # wins): a client offering both then speaks HTTP/1.1, which every HTTP application takes.
    ctx.set_alpn_protocols(["http/1.1", "h2"])
    # No TLS 1.3 session tickets: the proxies never resume (asyncio offers no client session
    # reuse), and OpenSSL 3 builds each ticket by copying the session, client chain included,
    # which cost more CPU than the rest of the handshake on the inbound side.
    ctx.num_tickets = 0
    ctx.load_cert_chain(_write_chain(directory, certified), directory / identity.KEY_FILE)
    return ctx


def client_context(
    directory: pathlib.Path, certified: identity.Certified, anchors: bytes
) -> ssl.SSLContext:
    """For outbound mTLS: present our certificate, require the peer's (identity checked by the
    caller with :func:`peer_identity`)."""
    ctx = _base(ssl.PROTOCOL_TLS_CLIENT, anchors)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(_write_chain(directory, certified), directory / identity.KEY_FILE)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of the verified peer, or None when it presented no certificate.

    Only call this after a completed handshake with one of the contexts above: the chain has then
    been verified against the anchors, and this reads the leaf's single URI SAN.
    """
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    spiffe = pki.spiffe_id(x509.load_der_x509_certificate(der))
    if spiffe is None:
        raise errors.UntrustedChain("the peer's certificate carries no SPIFFE ID")
    return spiffe
