"""The proxy's workload identity: a private key that never leaves the pod, and a certificate for
it that is always fresh.

At start the proxy makes an ECDSA P-256 key in memory and writes it, PKCS#8 PEM with mode 0600,
to ``key.p8`` in the identity directory (a memory-backed volume, so it never touches a disk). It
then trades a CSR and the current contents of its token file (projected tokens rotate) for a leaf
from the identity service, which it reaches over TLS trusting only the anchors.

Nothing the identity service returns is taken on faith: the leaf must chain to our anchors, name
exactly our identity, and carry our public key. Renewal follows :mod:`meshward.proxy.renewal`;
while the service is unreachable the current certificate stays in use until it expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import secrets
from collections.abc import Callable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshward import errors
from meshward.identity import pki
from meshward.identity._proto import identity_pb2, identity_pb2_grpc
from meshward.proxy import renewal, settings

logger = logging.getLogger(__name__)

KEY_FILE = "key.p8"
CERTIFY_TIMEOUT = 10.0


@dataclasses.dataclass(frozen=True)
class Certified:
    """A leaf we checked, with the chain to present beside it."""

    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    identity: pki.Identity

    @property
    def not_after(self) -> datetime.datetime:
        return self.leaf.not_valid_after_utc

    def chain_pem(self) -> bytes:
        return pki.to_pem(self.leaf, *self.intermediates)


def write_key(directory: os.PathLike[str], key: ec.EllipticCurvePrivateKey) -> None:
    """``key.p8``: PKCS#8 PEM, created 0600 (a stale file is replaced, never reused)."""
    path = os.path.join(directory, KEY_FILE)
    staged = f"{path}.{secrets.token_hex(8)}.tmp"  # never the pid: a container's is always 1
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pki.key_to_pem(key))
        os.replace(staged, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        raise


def build_csr(key: ec.EllipticCurvePrivateKey, identity: pki.Identity) -> bytes:
    """A DER CSR naming our identity (the service ignores the names and uses only the key)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(identity.dns_name)]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.DER)


def check(
    response: identity_pb2.CertifyResponse,
    key: ec.EllipticCurvePrivateKey,
    identity: pki.Identity,
    anchors: list[x509.Certificate],
) -> Certified:
    """Refuse anything but a leaf for our key and identity that chains to our anchors."""
    try:
        leaf = x509.load_der_x509_certificate(response.leaf_certificate)
        intermediates = tuple(
            x509.load_der_x509_certificate(c) for c in response.intermediate_certificates
        )
    except ValueError as exc:
        raise errors.UntrustedChain(
            f"the identity service returned an unreadable certificate: {exc}"
        ) from exc
    pki.verify_chain(leaf, intermediates, anchors)
    if pki.spiffe_id(leaf) != identity.spiffe_id:
        raise errors.UntrustedChain(
            f"the identity service issued {pki.spiffe_id(leaf)!r}, not {identity.spiffe_id!r}"
        )
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise errors.UntrustedChain("the identity service signed a key that is not ours")
    return Certified(leaf=leaf, intermediates=intermediates, identity=identity)


class WorkloadIdentity:
    """Holds the key and keeps a certificate for it. ``ready`` is set once one is held."""

    def __init__(
        self,
        config: settings.ProxySettings,
        *,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        jitter: Callable[[], float] = random.random,
        on_certified: Callable[[Certified], None] | None = None,
    ) -> None:
        """``on_certified`` is called with each new certificate, before it is first used."""
        self._config = config
        self._now = now
        self._jitter = jitter
        self._on_certified = on_certified
        self.identity = pki.Identity.parse(config.local_name, config.trust_domain)
        self.anchors = pki.load_certificates(config.trust_anchors, what="trust anchors")
        self.key = ec.generate_private_key(ec.SECP256R1())
        write_key(config.identity_dir, self.key)
        self._csr = build_csr(self.key, self.identity)
        self.current: Certified | None = None
        self.ready = asyncio.Event()
        self.renewals = 0
        self.failures = 0
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> identity_pb2_grpc.IdentityStub:
        if self._channel is None:
            addr = self._config.identity_svc_addr
            self._channel = grpc.aio.secure_channel(
                f"{addr.host}:{addr.port}",
                grpc.ssl_channel_credentials(root_certificates=self._config.trust_anchors),
                options=[("grpc.ssl_target_name_override", self._config.identity_svc_name)],
            )
        return identity_pb2_grpc.IdentityStub(self._channel)  # type: ignore[no-untyped-call]

    async def certify(self) -> Certified:
        """One Certify call with the token file's current contents; raises on any failure."""
        try:
            token = self._config.token_file.read_bytes().strip()
        except OSError as exc:
            raise errors.TokenRejected(f"can not read the token file: {exc.strerror}") from exc
        response = await self._stub().Certify(
            identity_pb2.CertifyRequest(
                identity=self.identity.dns_name, token=token, certificate_signing_request=self._csr
            ),
            timeout=CERTIFY_TIMEOUT,
        )
        return check(response, self.key, self.identity, self.anchors)

    async def run(self) -> None:
        """Get a certificate, then keep renewing it; never returns (cancel it to stop)."""
        consecutive = 0  # drives the backoff; self.failures counts them all, for metrics
        while True:
            try:
                fresh = await self.certify()
                if self._on_certified is not None:
                    self._on_certified(fresh)
            except Exception as exc:  # noqa: BLE001 - renewal must outlive any one failure
                consecutive += 1
                self.failures += 1
                held = self.current.not_after if self.current else None
                if held is not None and held <= self._now():
                    self.current = None  # expired: not ready, serve nothing with it
                    self.ready.clear()
                wait = renewal.retry_in(self._now(), held, consecutive)
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                logger.warning(
                    "certificate renewal failed (%s); retrying in %.1f s",
                    detail,
                    wait.total_seconds(),
                )
            else:
                consecutive = 0
                self.renewals += 1
                self.current = fresh
                self.ready.set()
                wait = renewal.refresh_in(self._now(), fresh.not_after, self._jitter())
                logger.info(
                    "certified as %s until %s; renewing in %.0f s",
                    fresh.identity.spiffe_id,
                    fresh.not_after.isoformat(),
                    wait.total_seconds(),
                )
            await asyncio.sleep(wait.total_seconds())

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
