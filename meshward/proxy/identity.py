"""The proxy's workload identity: a private key that never leaves the pod, and a certificate for
it that is always fresh.

At start the proxy makes an ECDSA P-256 key in memory and writes it, PKCS#8 PEM with mode 0600,
to ``key.p8`` in the identity directory (a memory-backed volume, so it never touches a disk). It
then trades a CSR and the current contents of its token file (projected tokens rotate) for a leaf
from the identity service, which it reaches over TLS trusting only the anchors.

Nothing the identity service returns is taken on faith: the leaf must chain to our anchors, name
exactly our identity, and carry our public key. Renewal follows :mod:`meshward.proxy.renewal`;
while the service is unreachable the current certificate stays in use until it expires.

Two things bring a renewal forward, both driven by the mounted trust roots
(:mod:`meshward.proxy.trust_roots`), which is how an anchor rotation reaches the proxies:

* a new trust bundle the current leaf no longer chains to (its anchor was removed): renew at
  once, since peers holding the new bundle refuse that leaf;
* a ``renew-leaves-before`` time later than the leaf's notBefore: renew after a random delay of
  up to ``renew_jitter`` seconds, so a namespace of proxies does not call the identity service
  at one instant. Each time is honoured once: a leaf's notBefore is backdated for clock skew
  (:data:`meshward.identity.pki.CLOCK_SKEW`), so the leaf that answers the request may itself
  start before the requested time, and must not trigger another renewal.

A new bundle also becomes the anchors that identity service responses are checked against, and
the roots of the next channel to the service (the open one is replaced before the next call).
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

from meshward import errors, trustbundle
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

    @property
    def not_before(self) -> datetime.datetime:
        return self.leaf.not_valid_before_utc

    @property
    def issuer(self) -> x509.Certificate | None:
        """The CA that signed the leaf, as the identity service returned it (None if it
        returned no intermediates: the leaf was signed by an anchor itself)."""
        return self.intermediates[0] if self.intermediates else None

    def chain_pem(self) -> bytes:
        return pki.to_pem(self.leaf, *self.intermediates)

    def chains_to(self, anchors: list[x509.Certificate]) -> bool:
        """Whether this leaf, with its intermediates, verifies against ``anchors`` now."""
        try:
            pki.verify_chain(self.leaf, self.intermediates, anchors)
        except errors.UntrustedChain:
            return False
        return True


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
        self.bundle = trustbundle.load(config.trust_anchors, "the trust anchors")
        self.key = ec.generate_private_key(ec.SECP256R1())
        write_key(config.identity_dir, self.key)
        self._csr = build_csr(self.key, self.identity)
        self.current: Certified | None = None
        self.ready = asyncio.Event()
        self.renewals = 0
        self.failures = 0
        self._channel: grpc.aio.Channel | None = None
        self._channel_roots: bytes | None = None
        self._renew_before: datetime.datetime | None = None
        self._honoured: datetime.datetime | None = None
        self._early: float | None = None
        """Loop time by which an early renewal is due; None: none asked for."""
        self._wake = asyncio.Event()

    @property
    def anchors(self) -> list[x509.Certificate]:
        return list(self.bundle.anchors)

    async def _stub(self) -> identity_pb2_grpc.IdentityStub:
        roots = self.bundle.pem
        if self._channel is not None and self._channel_roots != roots:
            await self.close()  # a new bundle: the next connection trusts it
        if self._channel is None:
            addr = self._config.identity_svc_addr
            self._channel = grpc.aio.secure_channel(
                f"{addr.host}:{addr.port}",
                grpc.ssl_channel_credentials(root_certificates=roots),
                options=[("grpc.ssl_target_name_override", self._config.identity_svc_name)],
            )
            self._channel_roots = roots
        return identity_pb2_grpc.IdentityStub(self._channel)  # type: ignore[no-untyped-call]

    def retrust(self, bundle: trustbundle.Bundle) -> None:
        """Check responses against ``bundle`` from now on; renew at once if the leaf held no
        longer chains to it."""
        self.bundle = bundle
        held = self.current
        if held is not None and not held.chains_to(self.anchors):
            logger.warning(
                "the certificate held (issuer %s) does not chain to the new trust bundle %s: "
                "renewing now",
                held.leaf.issuer.rfc4514_string(),
                bundle.fingerprint,
            )
            self._renew_in(0.0)

    def renew_leaves_before(self, at: datetime.datetime) -> None:
        """The trust roots ask for leaves issued before ``at`` to be renewed."""
        self._renew_before = at
        self._consider_renew_before()

    def _consider_renew_before(self) -> None:
        at, held = self._renew_before, self.current
        if at is None or at == self._honoured or held is None or held.not_before >= at:
            return
        self._honoured = at
        delay = self._jitter() * self._config.renew_jitter
        logger.info(
            "the certificate held starts %s, before %s: renewing in %.1f s as asked",
            held.not_before.isoformat(),
            at.isoformat(),
            delay,
        )
        self._renew_in(delay)

    def _renew_in(self, seconds: float) -> None:
        """Bring the next renewal forward to ``seconds`` from now, if it was due later."""
        due = asyncio.get_running_loop().time() + seconds
        if self._early is None or due < self._early:
            self._early = due
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        """Sleep until the next renewal: ``seconds`` from now, or sooner if one is asked for."""
        loop = asyncio.get_running_loop()
        scheduled = loop.time() + seconds
        while True:
            due = scheduled if self._early is None else min(scheduled, self._early)
            left = due - loop.time()
            if left <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)

    async def certify(self) -> Certified:
        """One Certify call with the token file's current contents; raises on any failure."""
        try:
            token = self._config.token_file.read_bytes().strip()
        except OSError as exc:
            raise errors.TokenRejected(f"can not read the token file: {exc.strerror}") from exc
        stub = await self._stub()
        response = await stub.Certify(
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
            self._early = None  # this attempt answers every request made before it
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
                    "certified as %s until %s by %s; renewing in %.0f s",
                    fresh.identity.spiffe_id,
                    fresh.not_after.isoformat(),
                    fresh.leaf.issuer.rfc4514_string(),
                    wait.total_seconds(),
                )
                self._consider_renew_before()
            await self._sleep(wait.total_seconds())

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._channel_roots = self._channel, None, None
            await channel.close()
