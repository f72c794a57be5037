"""The certificate authority: the trust material in force, and the Certify decision.

Trust material comes from files because that is how Kubernetes delivers it to a pod: the issuer
Secret (``tls.crt``, ``tls.key``) and the trust-roots ConfigMap (``ca-bundle.crt``) are mounted as
volumes, and the kubelet swaps their contents in place when they change. :class:`FileSource`
notices the swap and reloads; a bad new issuer is refused and the current one stays in force.

Contract of :func:`certify`: the cheap checks come first (identity syntax, CSR), then the one
API call (TokenReview); a token for one ServiceAccount never yields a certificate for another;
only the CSR's public key is used, never its names or extensions.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import pathlib

from cryptography import x509

from meshward import errors
from meshward.identity import csr, pki, tokens

logger = logging.getLogger(__name__)

ISSUER_CERT, ISSUER_KEY, ANCHORS = "tls.crt", "tls.key", "ca-bundle.crt"
MAX_IDENTITY = 253
"""A DNS name's limit: longer requests are refused before anything echoes them."""


@dataclasses.dataclass(frozen=True)
class TrustMaterial:
    issuer: pki.Issuer
    anchors: tuple[x509.Certificate, ...]

    @classmethod
    def load(cls, issuer_dir: pathlib.Path, anchors_file: pathlib.Path) -> TrustMaterial:
        """Read and check the issuer and anchors; IssuerError says what is wrong and where."""
        try:
            cert_pem = (issuer_dir / ISSUER_CERT).read_bytes()
            key_pem = (issuer_dir / ISSUER_KEY).read_bytes()
            bundle = anchors_file.read_bytes()
        except OSError as exc:
            raise errors.IssuerError(
                f"can not read trust material: {exc}; run 'meshward identity init' or mount the "
                "issuer Secret and the trust-roots ConfigMap"
            ) from exc
        issuer = pki.Issuer.from_pem(cert_pem, key_pem)
        try:
            anchors = tuple(pki.load_certificates(bundle))
        except errors.IdentityError as exc:
            raise errors.IssuerError(f"trust anchors in {anchors_file}: {exc}") from exc
        issuer.check(anchors)
        return cls(issuer=issuer, anchors=anchors)


@dataclasses.dataclass(frozen=True)
class Issued:
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    """Issuer first, then any intermediates above it; never the anchor."""
    identity: pki.Identity


class Authority:
    """Signs leaves with the issuer currently in force."""

    def __init__(
        self,
        material: TrustMaterial,
        trust_domain: str,
        lifetime: datetime.timedelta = pki.DEFAULT_LEAF_LIFETIME,
    ) -> None:
        self.material = material
        self.trust_domain = trust_domain
        self.lifetime = lifetime

    def sign(self, request: x509.CertificateSigningRequest, identity: pki.Identity) -> Issued:
        issuer = self.material.issuer
        leaf = pki.sign_leaf(issuer, request.public_key(), identity, lifetime=self.lifetime)
        return Issued(leaf=leaf, chain=(issuer.certificate, *issuer.chain), identity=identity)


async def certify(
    authority: Authority, reviewer: tokens.Reviewer, identity: str, token: bytes, request: bytes
) -> Issued:
    """The Certify flow; raises an IdentityError subclass or ClusterUnreachable."""
    if len(identity) > MAX_IDENTITY:
        raise errors.InvalidIdentity(
            f"the identity is {len(identity)} characters long; a mesh identity name is at most "
            f"{MAX_IDENTITY}"
        )
    wanted = pki.Identity.parse(identity, authority.trust_domain)
    parsed = csr.parse(request)
    try:
        text = token.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise errors.TokenRejected(
            "the token is not ASCII: send the token file's contents"
        ) from exc
    account = await reviewer.review(text)
    if (account.namespace, account.name) != (wanted.namespace, wanted.service_account):
        raise errors.IdentityMismatch(
            f"the token authenticates ServiceAccount {account.namespace}/{account.name}, which "
            f"may not request identity {identity}"
        )
    return authority.sign(parsed, wanted)


class FileSource:
    """Reloads trust material when the mounted files change (polled: cheap, and it survives the
    kubelet's symlink swaps, which file-watch APIs can miss)."""

    def __init__(self, issuer_dir: pathlib.Path, anchors_file: pathlib.Path) -> None:
        self.issuer_dir = issuer_dir
        self.anchors_file = anchors_file
        self._seen = self._fingerprint()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        for path in (
            self.issuer_dir / ISSUER_CERT,
            self.issuer_dir / ISSUER_KEY,
            self.anchors_file,
        ):
            try:
                st = os.stat(path)
            except OSError:
                digest.update(b"missing")
                continue
            digest.update(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
        return digest.hexdigest()

    def load(self) -> TrustMaterial:
        self._seen = self._fingerprint()
        return TrustMaterial.load(self.issuer_dir, self.anchors_file)

    def changed(self) -> TrustMaterial | None:
        """New material if the files changed and the new material is valid, else None."""
        seen = self._fingerprint()
        if seen == self._seen:
            return None
        self._seen = seen
        try:
            material = TrustMaterial.load(self.issuer_dir, self.anchors_file)
        except errors.IdentityError as exc:
            logger.error("new trust material refused, keeping the current issuer: %s", exc)
            return None
        logger.info(
            "trust material reloaded: issuer %s valid until %s, %d anchor(s)",
            material.issuer.certificate.subject.rfc4514_string(),
            material.issuer.certificate.not_valid_after_utc.isoformat(),
            len(material.anchors),
        )
        return material
