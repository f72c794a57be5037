"""The certificate authority's core: mesh identities, trust anchors, issuers and SPIFFE leaves.

Follows Linkerd's identity design (a long-lived trust anchor signs a shorter-lived issuer, the
issuer signs 24-hour workload leaves) and the SPIFFE X509-SVID profile (exactly one
``spiffe://`` URI SAN). Every certificate is built to pass strict RFC 5280 verifiers (OpenSSL
``-x509_strict``, CPython's ``VERIFY_X509_STRICT``, :mod:`cryptography.x509.verification`),
because a chain that one of them rejects is an outage for the proxies using it:

* leaves have an empty subject, so their SAN extension is critical (SPIFFE prefers no CN);
* every certificate carries a SubjectKeyIdentifier, and its AuthorityKeyIdentifier is copied
  from the issuer's SubjectKeyIdentifier extension so path building matches by key id;
* a leaf never outlives its issuer chain: ``notAfter`` is clamped to the earliest ``notAfter``
  of the issuer and its intermediates; ``notBefore`` is backdated 20 s for clock skew.

Nothing in a CSR but its public key reaches a certificate. The module does no I/O.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Sequence
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
    PublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from meshward.errors import InvalidIdentity, IssuerError, UntrustedChain
from meshward.identity import csr
from meshward.policy.resources import is_dns_label

IDENTITY_INFIX = "serviceaccount.identity.meshward"
CLOCK_SKEW = datetime.timedelta(seconds=20)
DEFAULT_LEAF_LIFETIME = datetime.timedelta(hours=24)
_MAX_DNS_NAME = 253
_MAX_COMMON_NAME = 64  # ub-common-name, RFC 5280 appendix A
_MAX_SHOWN = 100
"""Characters of an untrusted name quoted in an error at most."""
_SPIFFE_SCHEME = "spiffe://"

_E = TypeVar("_E", bound=x509.ExtensionType)


# -- identities ------------------------------------------------------------------------------


def _is_dns_name(name: str) -> bool:
    """Whether ``name`` is a lowercase DNS name: at most 253 characters of dot-joined labels."""
    return len(name) <= _MAX_DNS_NAME and all(is_dns_label(label) for label in name.split("."))


def _check_trust_domain(trust_domain: str) -> None:
    if not _is_dns_name(trust_domain):
        raise InvalidIdentity(
            f"trust domain {trust_domain!r} is not a lowercase DNS name "
            "(labels of a-z, 0-9 and '-', e.g. 'cluster.local'): fix the trust domain setting"
        )


@dataclasses.dataclass(frozen=True)
class Identity:
    """A workload's mesh identity: its ServiceAccount, namespace and the mesh's trust domain.

    Construction validates every part (:class:`InvalidIdentity`), so an ``Identity`` always
    renders to a well-formed SPIFFE ID and DNS name.
    """

    namespace: str
    service_account: str
    trust_domain: str

    def __post_init__(self) -> None:
        _check_trust_domain(self.trust_domain)
        for what, value in (
            ("namespace", self.namespace),
            ("service account", self.service_account),
        ):
            if not is_dns_label(value):
                raise InvalidIdentity(
                    f"{what} {value!r} is not a DNS-1123 label (1-63 characters of a-z, 0-9 "
                    f"and '-', starting and ending alphanumeric); expected {self._form()}"
                )
        if len(self.dns_name) > _MAX_DNS_NAME:
            raise InvalidIdentity(
                f"identity {self.dns_name!r} is longer than {_MAX_DNS_NAME} characters, "
                "the limit for a DNS name: use shorter names"
            )

    def _form(self) -> str:
        return _expected_form(self.trust_domain)

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def dns_name(self) -> str:
        return f"{self.service_account}.{self.namespace}.{IDENTITY_INFIX}.{self.trust_domain}"

    @classmethod
    def parse(cls, name: str, trust_domain: str) -> Identity:
        """Parse the DNS form ``<sa>.<ns>.serviceaccount.identity.meshward.<trust_domain>``."""
        _check_trust_domain(trust_domain)
        suffix = f".{IDENTITY_INFIX}.{trust_domain}"
        prefix = name[: -len(suffix)] if name.endswith(suffix) else ""
        parts = prefix.split(".")
        if len(parts) != 2 or not all(is_dns_label(part) for part in parts):
            raise InvalidIdentity(
                f"{name!r} is not a mesh identity of this trust domain: expected "
                f"{_expected_form(trust_domain)}, where <sa> and <ns> are lowercase DNS labels"
            )
        service_account, namespace = parts
        return cls(namespace=namespace, service_account=service_account, trust_domain=trust_domain)

    @classmethod
    def from_spiffe_id(cls, text: str, trust_domain: str | None = None) -> Identity:
        """Parse a workload's SPIFFE ID, ``spiffe://<trust domain>/ns/<ns>/sa/<sa>``, as
        :attr:`spiffe_id` renders it: lowercase, nothing before or after, every part checked
        as the constructor checks it. With ``trust_domain``, an ID of another trust domain is
        refused too: an identity vouched for by another mesh is none of this one's.

        Raises :class:`InvalidIdentity` saying which part is wrong.
        """
        if trust_domain is not None:
            _check_trust_domain(trust_domain)
        shown = repr(text[:_MAX_SHOWN]) + ("..." if len(text) > _MAX_SHOWN else "")
        form = "spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
        parts = text.removeprefix(_SPIFFE_SCHEME).split("/")
        if not text.startswith(_SPIFFE_SCHEME) or len(parts) != 5 or parts[1::2] != ["ns", "sa"]:
            raise InvalidIdentity(f"{shown} is not a workload's SPIFFE ID: expected {form}")
        domain, _, namespace, _, service_account = parts
        if trust_domain is not None and domain != trust_domain:
            raise InvalidIdentity(
                f"{shown} is of trust domain {domain[:_MAX_SHOWN]!r}, not {trust_domain!r}: "
                "only identities of this mesh's trust domain are accepted"
            )
        if not _is_dns_name(domain):
            raise InvalidIdentity(
                f"{shown} is not a workload's SPIFFE ID: its trust domain is not a lowercase "
                f"DNS name (labels of a-z, 0-9 and '-', e.g. 'cluster.local'); expected {form}"
            )
        for what, value in (("namespace", namespace), ("service account", service_account)):
            if not is_dns_label(value):
                raise InvalidIdentity(
                    f"{shown} is not a workload's SPIFFE ID: its {what} is not a DNS-1123 label "
                    f"(1-63 characters of a-z, 0-9 and '-', starting and ending alphanumeric); "
                    f"expected {form}"
                )
        dns_name = f"{service_account}.{namespace}.{IDENTITY_INFIX}.{domain}"
        if len(dns_name) > _MAX_DNS_NAME:
            raise InvalidIdentity(
                f"{shown} names an identity whose DNS form would be longer than "
                f"{_MAX_DNS_NAME} characters, the limit for a DNS name: use shorter names"
            )
        return cls(namespace=namespace, service_account=service_account, trust_domain=domain)


def _expected_form(trust_domain: str) -> str:
    return f"<sa>.<ns>.{IDENTITY_INFIX}.{trust_domain}"


# -- loading and encoding --------------------------------------------------------------------


def load_certificates(pem: bytes, what: str = "certificate bundle") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order; other PEM blocks are ignored.

    Raises :class:`UntrustedChain` (certificates we can not read can not be trusted) when there
    is no certificate or a block does not parse. ``what`` names the source in the message.
    """
    if not pem.strip():
        raise UntrustedChain(f"{what} is empty: it must hold PEM 'CERTIFICATE' blocks")
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise UntrustedChain(
            f"{what} is not a PEM certificate bundle ({e}): it must hold one or more "
            "'-----BEGIN CERTIFICATE-----' blocks"
        ) from e


def to_pem(*certs: x509.Certificate) -> bytes:
    """Certificates as one PEM bundle, in the order given (leaf first, then its issuers)."""
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)


def key_to_pem(key: PrivateKeyTypes) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def spiffe_id(cert: x509.Certificate) -> str | None:
    """The certificate's SPIFFE ID: its only URI SAN if that starts with ``spiffe://``."""
    uris = _uri_sans(cert)
    if uris is None or len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return uris[0]


# -- the issuer ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Issuer:
    """The intermediate CA that signs leaves, its key, and any CAs between it and the anchor.

    Construction checks what does not depend on time (:class:`IssuerError`): the key is ECDSA
    P-256 and matches the certificate, the certificate is a CA that may sign certificates, and
    each certificate in ``chain`` issued the one before it. Validity in time and the link to a
    trust anchor are checked by :meth:`check`.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "chain", tuple(self.chain))
        problem = _signer_problem(self.certificate, self.key)
        if problem:
            raise IssuerError(
                f"issuer {problem}; tls.crt must start with an ECDSA P-256 CA certificate "
                "(basicConstraints CA=true, keyUsage keyCertSign, a subjectKeyIdentifier) "
                "and tls.key must be its private key"
            )
        for cert in self.chain:
            problem = _ca_problem(cert)
            if problem:
                raise IssuerError(
                    f"intermediate {_name(cert)} in the issuer bundle can not sign: {problem}; "
                    "tls.crt must hold only the issuer and the CAs above it"
                )
        for child, parent in itertools.pairwise((self.certificate, *self.chain)):
            if not _issued_by(child, parent):
                raise IssuerError(
                    f"issuer bundle is out of order: {_name(parent)} did not issue "
                    f"{_name(child)}; tls.crt must hold the issuer first, then each CA above it"
                )

    @classmethod
    def from_pem(
        cls, cert_pem: bytes, key_pem: bytes, now: datetime.datetime | None = None
    ) -> Issuer:
        """The issuer from ``tls.crt`` (issuer first, then any intermediates) and ``tls.key``.

        Raises :class:`IssuerError` on unreadable PEM, a mismatched key, a non-CA certificate,
        or a certificate in the bundle that has expired (at ``now``, default the current time).
        """
        try:
            certs = load_certificates(cert_pem, "issuer certificate (tls.crt)")
        except UntrustedChain as e:
            raise IssuerError(str(e)) from e
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError as e:  # encrypted key and no password
            raise IssuerError(
                f"issuer key (tls.key) is encrypted ({e}): store it unencrypted in the secret"
            ) from e
        except (ValueError, UnsupportedAlgorithm) as e:
            raise IssuerError(
                f"issuer key (tls.key) is not a PEM private key ({e}): "
                "store the issuer's PKCS#8 or SEC1 PEM private key"
            ) from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IssuerError(
                f"issuer key (tls.key) is {_describe_key(key)}: "
                "issue the issuer with an ECDSA P-256 key"
            )
        issuer = cls(certificate=certs[0], key=key, chain=tuple(certs[1:]))
        at = _utc(now)
        for cert in certs:
            _check_unexpired(cert, at)
        return issuer

    def check(
        self, anchors: Sequence[x509.Certificate], now: datetime.datetime | None = None
    ) -> None:
        """Raise :class:`IssuerError` unless leaves this issuer signs would verify at ``now``.

        Checks that the issuer and its intermediates are within validity, that the anchor they
        chain to is too, and that a throwaway probe leaf signed by the issuer verifies against
        ``anchors``: the CA path (signatures, key ids, path length, CA extensions) is judged by
        the same strict RFC 5280 rules as :func:`verify_chain`; the probe's own extensions are not.
        """
        if not anchors:
            raise IssuerError(
                "no trust anchors to check the issuer against: configure the trust anchor bundle"
            )
        at = _utc(now)
        path = (self.certificate, *self.chain)
        for cert in path:
            if at < cert.not_valid_before_utc:
                raise IssuerError(
                    f"{_name(cert)} is not valid until {cert.not_valid_before_utc.isoformat()} "
                    f"(now {at.isoformat()}): check the clock, or wait before using it"
                )
            _check_unexpired(cert, at)
        top = path[-1]
        candidates = [a for a in anchors if a == top or a.subject == top.issuer]
        if candidates and all(at > a.not_valid_after_utc for a in candidates):
            raise IssuerError(
                f"trust anchor {_name(candidates[0])} expired at "
                f"{candidates[0].not_valid_after_utc.isoformat()}: rotate the trust anchor "
                "and re-issue the issuer from the new one"
            )
        probe_key = ec.generate_private_key(ec.SECP256R1())
        probe = _end_entity(
            self,
            probe_key.public_key(),
            sans=None,
            usages=None,
            not_before=at - CLOCK_SKEW,
            not_after=at + datetime.timedelta(minutes=1),
        )
        verifier = (
            PolicyBuilder()
            .store(Store(list(anchors)))
            .time(at)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        try:
            verifier.verify(probe, list(path))
        except VerificationError as e:
            names = ", ".join(_name(a) for a in anchors)
            raise IssuerError(
                f"issuer {_name(self.certificate)} does not chain to the trust anchors "
                f"({names}): {e}; issue the issuer from one of these anchors, "
                "or add its anchor to the trust anchor bundle"
            ) from e


# -- issuing ---------------------------------------------------------------------------------


def new_trust_anchor(
    trust_domain: str, lifetime: datetime.timedelta, now: datetime.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed ECDSA P-256 root, CN ``root.identity.meshward.<td>``, path length free."""
    _check_trust_domain(trust_domain)
    _check_lifetime(lifetime)
    at = _issuance_time(now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _ca_name("root", trust_domain)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = _builder(
        ca=True,
        subject=name,
        issuer=name,
        public_key=key.public_key(),
        issuer_ski=ski,
        path_length=None,
        not_before=at - CLOCK_SKEW,
        not_after=at + lifetime,
    )
    return builder.sign(key, hashes.SHA256()), key


def new_issuer(
    anchor: x509.Certificate,
    anchor_key: ec.EllipticCurvePrivateKey,
    trust_domain: str,
    lifetime: datetime.timedelta,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An ECDSA P-256 issuer CA signed by ``anchor``: CN ``issuer.identity.meshward.<td>``,
    path length 0, ``notAfter`` clamped to the anchor's."""
    _check_trust_domain(trust_domain)
    _check_lifetime(lifetime)
    at = _issuance_time(now)
    problem = _signer_problem(anchor, anchor_key)
    if problem:
        raise IssuerError(f"trust anchor {problem}: pass the anchor certificate and its own key")
    constraints = _extension(anchor, x509.BasicConstraints)
    if constraints is not None and constraints.path_length == 0:
        raise IssuerError(
            f"trust anchor {_name(anchor)} has path length 0 and can not sign an issuer CA: "
            "create an anchor without a path length constraint"
        )
    not_after = _clamp(at, lifetime, anchor, ())
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(
        ca=True,
        subject=_ca_name("issuer", trust_domain),
        issuer=anchor.subject,
        public_key=key.public_key(),
        issuer_ski=_ski(anchor),
        path_length=0,
        not_before=at - CLOCK_SKEW,
        not_after=not_after,
    )
    return builder.sign(anchor_key, hashes.SHA256()), key


def sign_leaf(
    issuer: Issuer,
    public_key: CertificatePublicKeyTypes,
    identity: Identity,
    lifetime: datetime.timedelta = DEFAULT_LEAF_LIFETIME,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A SPIFFE X509-SVID for ``identity`` over ``public_key`` (from a checked CSR).

    The certificate has an empty subject, a critical SAN extension holding exactly the SPIFFE
    URI and the identity's DNS name, CA=false, keyUsage digitalSignature and EKU serverAuth +
    clientAuth. It is valid from ``now - 20 s`` until ``now + lifetime``, clamped to the
    earliest expiry in the issuer chain. Raises :class:`IssuerError` if the issuer has expired
    and :class:`InvalidCSR` if the key is not one we certify.
    """
    csr.check_public_key(public_key)
    _check_lifetime(lifetime)
    at = _issuance_time(now)
    return _end_entity(
        issuer,
        public_key,
        sans=[
            x509.UniformResourceIdentifier(identity.spiffe_id),
            x509.DNSName(identity.dns_name),
        ],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=at - CLOCK_SKEW,
        not_after=_clamp(at, lifetime, issuer.certificate, issuer.chain),
    )


def new_server_certificate(
    issuer: Issuer,
    dns_names: Sequence[str],
    lifetime: datetime.timedelta,
    now: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate and fresh P-256 key for the identity service itself.

    Empty subject, critical SAN of ``dns_names`` (gRPC clients match the DNS SAN), EKU
    serverAuth only, CA=false, signed by ``issuer`` with the same clamping as leaves.
    Raises :class:`InvalidIdentity` if a name is not a lowercase DNS name.
    """
    if isinstance(dns_names, str) or not dns_names:
        raise InvalidIdentity("a server certificate needs at least one DNS name (a list)")
    for dns_name in dns_names:
        if not _is_dns_name(dns_name):
            raise InvalidIdentity(
                f"server name {dns_name!r} is not a lowercase DNS name, e.g. "
                "'meshward-identity.meshward.svc.cluster.local'"
            )
    _check_lifetime(lifetime)
    at = _issuance_time(now)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _end_entity(
        issuer,
        key.public_key(),
        sans=[x509.DNSName(name) for name in dict.fromkeys(dns_names)],
        usages=[ExtendedKeyUsageOID.SERVER_AUTH],
        not_before=at - CLOCK_SKEW,
        not_after=_clamp(at, lifetime, issuer.certificate, issuer.chain),
    )
    return cert, key


# -- verifying -------------------------------------------------------------------------------


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: datetime.datetime | None = None,
) -> None:
    """Raise :class:`UntrustedChain` unless ``leaf`` is a mesh identity certificate that chains
    to one of ``anchors`` through ``intermediates`` at ``now``.

    Path validation is :mod:`cryptography.x509.verification`'s client verifier (RFC 5280 and
    the CA/B web PKI profile, EKU clientAuth); on top, the leaf must carry exactly one URI SAN,
    a ``spiffe://`` ID.
    """
    if not anchors:
        raise UntrustedChain("no trust anchors to verify against: configure the trust anchors")
    verifier = PolicyBuilder().store(Store(list(anchors))).time(_utc(now)).build_client_verifier()
    try:
        verifier.verify(leaf, list(intermediates))
    except VerificationError as e:
        raise UntrustedChain(
            f"certificate {_describe_leaf(leaf)} does not verify against the trust anchors: {e}"
        ) from e
    if spiffe_id(leaf) is None:
        raise UntrustedChain(
            f"certificate {_name(leaf)} has URI SANs {_uri_sans(leaf) or []}: a mesh identity "
            "certificate carries exactly one URI SAN, its spiffe:// ID"
        )


# -- helpers ---------------------------------------------------------------------------------


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    """``now`` as an aware UTC datetime; naive values are taken to be UTC already."""
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        return now.replace(tzinfo=datetime.UTC)
    return now.astimezone(datetime.UTC)


def _issuance_time(now: datetime.datetime | None) -> datetime.datetime:
    # Certificates store whole seconds; truncating here keeps notBefore/notAfter exact.
    return _utc(now).replace(microsecond=0)


def _check_lifetime(lifetime: datetime.timedelta) -> None:
    if lifetime <= datetime.timedelta(0):
        raise ValueError(f"certificate lifetime must be positive, got {lifetime}")


def _clamp(
    at: datetime.datetime,
    lifetime: datetime.timedelta,
    issuer: x509.Certificate,
    chain: Sequence[x509.Certificate],
) -> datetime.datetime:
    """``at + lifetime``, but never past the expiry of the issuer or any CA above it."""
    for cert in (issuer, *chain):
        # Not _check_unexpired: at notAfter itself a CA is still valid, but a leaf would be dead.
        if at >= cert.not_valid_after_utc:
            raise IssuerError(_expired(cert, at))
    return min(at + lifetime, *(cert.not_valid_after_utc for cert in (issuer, *chain)))


def _check_unexpired(cert: x509.Certificate, at: datetime.datetime) -> None:
    """Raise :class:`IssuerError` if CA ``cert`` has expired at ``at`` (``notAfter`` inclusive)."""
    if at > cert.not_valid_after_utc:
        raise IssuerError(_expired(cert, at))


def _expired(cert: x509.Certificate, at: datetime.datetime) -> str:
    return (
        f"{_name(cert)} expired at {cert.not_valid_after_utc.isoformat()} "
        f"(now {at.isoformat()}): rotate it, issuing a new issuer certificate and key from "
        "the trust anchor, and update the issuer secret"
    )


def _ca_name(role: str, trust_domain: str) -> x509.Name:
    common_name = f"{role}.identity.meshward.{trust_domain}"
    if len(common_name) > _MAX_COMMON_NAME:
        raise InvalidIdentity(
            f"CA common name {common_name!r} is over {_MAX_COMMON_NAME} characters: "
            "use a shorter trust domain"
        )
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer_ski: x509.SubjectKeyIdentifier,
    ca: bool,
    path_length: int | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.CertificateBuilder:
    """What every certificate we issue carries: a random serial, critical basic constraints and
    key usage, an SKI, and the AKI taken from the issuer's SKI (strict verifiers need it)."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
        .add_extension(_key_usage(key_cert_sign=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )


def _end_entity(
    issuer: Issuer,
    public_key: CertificatePublicKeyTypes,
    *,
    sans: list[x509.GeneralName] | None,
    usages: list[x509.ObjectIdentifier] | None,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    builder = _builder(
        subject=x509.Name([]),
        issuer=issuer.certificate.subject,
        public_key=public_key,
        issuer_ski=_ski(issuer.certificate),
        ca=False,
        path_length=None,
        not_before=not_before,
        not_after=not_after,
    )
    if sans is not None:
        # The subject is empty, so RFC 5280 4.2.1.6 requires the SAN extension to be critical.
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    if usages is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


def _key_usage(*, key_cert_sign: bool) -> x509.KeyUsage:
    """keyCertSign + cRLSign for a CA, digitalSignature alone for an end entity."""
    return x509.KeyUsage(
        digital_signature=not key_cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=key_cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    ski = _extension(cert, x509.SubjectKeyIdentifier)
    if ski is None:
        raise IssuerError(
            f"{_name(cert)} has no subjectKeyIdentifier, so certificates it signs can not name "
            "it in authorityKeyIdentifier: re-issue it with a subjectKeyIdentifier"
        )
    return ski


def _ca_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` can not sign certificates, or None if it can."""
    try:
        constraints = _extension(cert, x509.BasicConstraints)
        usage = _extension(cert, x509.KeyUsage)
        ski = _extension(cert, x509.SubjectKeyIdentifier)
    except (x509.DuplicateExtension, ValueError) as e:
        return f"its extensions do not parse ({e})"
    if constraints is None or not constraints.ca:
        return "it is not a CA (basicConstraints CA=true is missing)"
    if usage is None or not usage.key_cert_sign:
        return "its keyUsage does not allow keyCertSign"
    if ski is None:
        return "it has no subjectKeyIdentifier"
    return None


def _signer_problem(cert: x509.Certificate, key: object) -> str | None:
    """Why ``cert`` with private ``key`` can not sign certificates for us, or None."""
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        return f"key is {_describe_key(key)}, not ECDSA P-256"
    try:
        cert_key: PublicKeyTypes = cert.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        return f"certificate {_name(cert)} has an unreadable public key ({e})"
    if _spki(cert_key) != _spki(key.public_key()):
        return f"key does not match certificate {_name(cert)}"
    problem = _ca_problem(cert)
    return f"certificate {_name(cert)} can not sign certificates: {problem}" if problem else None


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _uri_sans(cert: x509.Certificate) -> list[str] | None:
    """The URI SANs, or None when there is no (readable) SAN extension."""
    try:
        sans = _extension(cert, x509.SubjectAlternativeName)
    except (x509.DuplicateExtension, ValueError):
        return None
    if sans is None:
        return None
    return sans.get_values_for_type(x509.UniformResourceIdentifier)


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _name(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return f"'{subject}'" if subject else f"certificate with serial {cert.serial_number:x}"


def _describe_leaf(cert: x509.Certificate) -> str:
    identity = spiffe_id(cert)
    return identity if identity else _name(cert)


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA on {key.curve.name}"
    return type(key).__name__
