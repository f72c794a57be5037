"""The CA core: identities, anchor -> issuer -> leaf chains and their verification.

Chains are checked three ways: by pki.verify_chain, by ``openssl verify -x509_strict`` and by a
CPython mutual-TLS handshake with VERIFY_X509_STRICT (both OpenSSL's strict RFC 5280 checks),
each with a negative control so the test can fail. Certificates that pki must reject are built
here by hand with cryptography, never through pki's own helpers.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib
import re
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from meshward.errors import InvalidCSR, InvalidIdentity, IssuerError, UntrustedChain
from meshward.identity import csr, pki

TD = "cluster.local"
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
SKEW = datetime.timedelta(seconds=20)
WEB = pki.Identity(namespace="default", service_account="web", trust_domain=TD)
E = TypeVar("E", bound=x509.ExtensionType)
FORM = "<sa>.<ns>.serviceaccount.identity.meshward.cluster.local"


@dataclasses.dataclass(frozen=True)
class Trust:
    anchor: x509.Certificate
    anchor_key: ec.EllipticCurvePrivateKey
    issuer: pki.Issuer


def new_trust(
    now: datetime.datetime = NOW, issuer_lifetime: datetime.timedelta = 30 * DAY
) -> Trust:
    anchor, anchor_key = pki.new_trust_anchor(TD, 365 * DAY, now=now)
    cert, key = pki.new_issuer(anchor, anchor_key, TD, issuer_lifetime, now=now)
    return Trust(anchor, anchor_key, pki.Issuer(certificate=cert, key=key))


@pytest.fixture(scope="module")
def trust() -> Trust:
    return new_trust()


@pytest.fixture(scope="module")
def foreign() -> Trust:
    return new_trust()


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ext(cert: x509.Certificate, kind: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(kind)


def ski(cert: x509.Certificate) -> bytes:
    return ext(cert, x509.SubjectKeyIdentifier).value.digest


def hostile_csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A CSR that asks for a subject, extra SANs and CA=true: none of it may reach the leaf."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("evil.example"),
                    x509.UniformResourceIdentifier(
                        "spiffe://cluster.local/ns/kube-system/sa/admin"
                    ),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def issue(
    issuer: pki.Issuer,
    identity: pki.Identity = WEB,
    now: datetime.datetime | None = None,
    lifetime: datetime.timedelta = pki.DEFAULT_LEAF_LIFETIME,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf the way the identity service makes one: hostile CSR -> csr.parse -> sign_leaf."""
    key = p256()
    request = csr.parse(hostile_csr(key).public_bytes(serialization.Encoding.PEM))
    leaf = pki.sign_leaf(issuer, request.public_key(), identity, lifetime=lifetime, now=now)
    return leaf, key


def key_usage(*, digital_signature: bool = False, ca: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    cn: str,
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    path_length: int | None,
    not_after: datetime.datetime,
    not_before: datetime.datetime = NOW - HOUR,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A CA certificate built by hand; self-signed when ``signer`` is None."""
    key = p256()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    parent_cert, parent_key = signer if signer else (None, key)
    parent_ski = (
        ski(parent_cert)
        if parent_cert
        else x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(parent_cert.subject if parent_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(parent_ski, None, None),
            critical=False,
        )
        .sign(parent_key, hashes.SHA256())
    )
    return cert, key


def hand_made_leaf(issuer: pki.Issuer, sans: Sequence[x509.GeneralName]) -> x509.Certificate:
    """A leaf with everything right but the SANs, which the caller chooses."""
    key = p256()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier(ski(issuer.certificate), None, None), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    return builder.sign(issuer.key, hashes.SHA256())


def write(directory: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    path = directory / name
    path.write_bytes(data)
    return path


# -- the happy path, three verifiers ---------------------------------------------------------


def test_chain_verifies(trust: Trust) -> None:
    leaf, _ = issue(trust.issuer)
    pki.verify_chain(leaf, [trust.issuer.certificate], [trust.anchor])
    # With several anchors (as during anchor rotation) it still finds the right one.
    other = new_trust()
    pki.verify_chain(leaf, [trust.issuer.certificate], [other.anchor, trust.anchor])


def openssl_verify(
    tmp_path: pathlib.Path,
    purpose: str,
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchor: x509.Certificate,
) -> subprocess.CompletedProcess[str]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: the strict third-party verifier check needs it")
    command = [
        openssl,
        "verify",
        "-x509_strict",
        "-purpose",
        purpose,
        "-CAfile",
        str(write(tmp_path, "anchor.pem", pki.to_pem(anchor))),
        "-untrusted",
        str(write(tmp_path, "intermediates.pem", pki.to_pem(*intermediates))),
        str(write(tmp_path, "leaf.pem", pki.to_pem(leaf))),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def test_openssl_strict_accepts_leaf(trust: Trust, foreign: Trust, tmp_path: pathlib.Path) -> None:
    leaf, _ = issue(trust.issuer)
    result = openssl_verify(tmp_path, "sslclient", leaf, [trust.issuer.certificate], trust.anchor)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
    # Negative control: the same leaf against another mesh's anchor is refused.
    result = openssl_verify(tmp_path, "sslclient", leaf, [trust.issuer.certificate], foreign.anchor)
    assert result.returncode != 0


def test_openssl_strict_accepts_server_certificate(trust: Trust, tmp_path: pathlib.Path) -> None:
    cert, _ = pki.new_server_certificate(trust.issuer, ["identity.meshward.svc"], HOUR)
    result = openssl_verify(tmp_path, "sslserver", cert, [trust.issuer.certificate], trust.anchor)
    assert result.returncode == 0, result.stdout + result.stderr
    # The server certificate is not a client certificate (EKU serverAuth only).
    result = openssl_verify(tmp_path, "sslclient", cert, [trust.issuer.certificate], trust.anchor)
    assert result.returncode != 0


def handshake(client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    """Drive a TLS handshake between two in-memory endpoints; SSLError if either refuses."""
    client_in, client_out, server_in, server_out = bios
    done = {"client": False, "server": False}
    for _ in range(10):
        for side, endpoint in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    endpoint.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            server_in.write(client_out.read())
            client_in.write(server_out.read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def mtls(
    tmp_path: pathlib.Path,
    anchor: x509.Certificate,
    server_chain: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, pki.Issuer],
    client_chain: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, pki.Issuer],
) -> dict[str, object]:
    """Mutual TLS with VERIFY_X509_STRICT on both sides; the server's view of the client."""

    def context(
        purpose: ssl.Purpose,
        chain: tuple[x509.Certificate, ec.EllipticCurvePrivateKey, pki.Issuer],
        name: str,
    ) -> ssl.SSLContext:
        cert, key, issuer = chain
        ctx = ssl.create_default_context(purpose, cadata=pki.to_pem(anchor).decode())
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(
            write(tmp_path, f"{name}.crt", pki.to_pem(cert, issuer.certificate)),
            write(tmp_path, f"{name}.key", pki.key_to_pem(key)),
        )
        return ctx

    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = context(ssl.Purpose.SERVER_AUTH, client_chain, "client").wrap_bio(
        bios[0], bios[1], server_hostname="identity.meshward.svc"
    )
    server = context(ssl.Purpose.CLIENT_AUTH, server_chain, "server").wrap_bio(
        bios[2], bios[3], server_side=True
    )
    handshake(client, server, bios)
    peer = server.getpeercert()
    assert peer is not None
    return dict(peer)


def test_cpython_strict_mutual_tls(trust: Trust, foreign: Trust, tmp_path: pathlib.Path) -> None:
    server_cert, server_key = pki.new_server_certificate(
        trust.issuer, ["identity.meshward.svc"], HOUR
    )
    server = (server_cert, server_key, trust.issuer)
    leaf, leaf_key = issue(trust.issuer)
    peer = mtls(tmp_path, trust.anchor, server, (leaf, leaf_key, trust.issuer))
    assert peer["subjectAltName"] == (("URI", WEB.spiffe_id), ("DNS", WEB.dns_name))
    # Negative control: a client certificate from another mesh fails the server's verification.
    stranger, stranger_key = issue(foreign.issuer)
    with pytest.raises(ssl.SSLError, match="certificate verify failed"):
        mtls(tmp_path, trust.anchor, server, (stranger, stranger_key, foreign.issuer))


# -- what a leaf contains --------------------------------------------------------------------


def test_leaf_takes_only_the_public_key_from_the_csr(trust: Trust) -> None:
    leaf, key = issue(trust.issuer)
    sans = ext(leaf, x509.SubjectAlternativeName)
    assert sans.critical  # the subject is empty
    assert leaf.subject == x509.Name([])
    assert list(sans.value) == [
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/web"),
        x509.DNSName("web.default.serviceaccount.identity.meshward.cluster.local"),
    ]
    assert ext(leaf, x509.BasicConstraints).value.ca is False
    assert leaf.public_key() == key.public_key()
    assert pki.spiffe_id(leaf) == "spiffe://cluster.local/ns/default/sa/web"


def test_leaf_extensions(trust: Trust) -> None:
    leaf, key = issue(trust.issuer)
    constraints = ext(leaf, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(False, None)
    usage = ext(leaf, x509.KeyUsage)
    assert usage.critical and usage.value == key_usage(digital_signature=True)
    assert set(ext(leaf, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    }
    assert ski(leaf) == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski(trust.issuer.certificate)
    assert leaf.issuer == trust.issuer.certificate.subject
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    leaf.verify_directly_issued_by(trust.issuer.certificate)
    assert {e.oid for e in leaf.extensions} == {
        x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
        x509.oid.ExtensionOID.KEY_USAGE,
        x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
        x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    }


def test_leaf_validity(trust: Trust) -> None:
    at = NOW + 3 * HOUR
    leaf, _ = issue(trust.issuer, now=at)
    assert leaf.not_valid_before_utc == at - SKEW
    assert leaf.not_valid_after_utc == at + 24 * HOUR
    short, _ = issue(trust.issuer, now=at, lifetime=HOUR)
    assert short.not_valid_after_utc == at + HOUR


def test_naive_and_non_utc_now_mean_the_same_instant(trust: Trust) -> None:
    at = NOW + HOUR
    naive, _ = issue(trust.issuer, now=at.replace(tzinfo=None))
    shifted, _ = issue(trust.issuer, now=at.astimezone(datetime.timezone(HOUR * 5)))
    for leaf in (naive, shifted):
        assert leaf.not_valid_before_utc == at - SKEW
        assert leaf.not_valid_after_utc == at + 24 * HOUR


def test_leaf_is_clamped_to_the_issuer(trust: Trust) -> None:
    cert, key = pki.new_issuer(trust.anchor, trust.anchor_key, TD, 2 * HOUR, now=NOW)
    short_lived = pki.Issuer(certificate=cert, key=key)
    leaf, _ = issue(short_lived, now=NOW)
    assert leaf.not_valid_after_utc == cert.not_valid_after_utc == NOW + 2 * HOUR
    pki.verify_chain(leaf, [cert], [trust.anchor], now=NOW + HOUR)


def test_leaf_is_clamped_to_an_intermediate_above_the_issuer(tmp_path: pathlib.Path) -> None:
    anchor = make_ca("anchor", None, path_length=None, not_after=NOW + 365 * DAY)
    middle = make_ca("middle", anchor, path_length=1, not_after=NOW + 3 * HOUR)
    issuer_cert, issuer_key = make_ca("issuer", middle, path_length=0, not_after=NOW + 10 * HOUR)
    issuer = pki.Issuer(certificate=issuer_cert, key=issuer_key, chain=(middle[0],))
    issuer.check([anchor[0]])
    leaf, _ = issue(issuer, now=NOW)
    assert leaf.not_valid_after_utc == middle[0].not_valid_after_utc == NOW + 3 * HOUR
    pki.verify_chain(leaf, [issuer_cert, middle[0]], [anchor[0]])
    result = openssl_verify(tmp_path, "sslclient", leaf, [issuer_cert, middle[0]], anchor[0])
    assert result.returncode == 0, result.stdout + result.stderr


def test_serials_are_random_and_distinct(trust: Trust) -> None:
    serials = [issue(trust.issuer)[0].serial_number for _ in range(16)]
    assert len(set(serials)) == len(serials)
    # cryptography's random serials carry ~159 random bits; 64 or fewer would mean a counter.
    assert all(serial > 0 and serial.bit_length() > 64 for serial in serials)
    assert trust.issuer.certificate.serial_number not in serials


def test_sign_leaf_refuses_an_expired_issuer() -> None:
    old = new_trust(now=NOW - 10 * DAY, issuer_lifetime=DAY)
    with pytest.raises(IssuerError, match="expired"):
        pki.sign_leaf(old.issuer, p256().public_key(), WEB)


def test_sign_leaf_refuses_a_key_we_do_not_certify(trust: Trust) -> None:
    with pytest.raises(InvalidCSR, match="secp384r1"):
        pki.sign_leaf(trust.issuer, ec.generate_private_key(ec.SECP384R1()).public_key(), WEB)


# -- identities ------------------------------------------------------------------------------


def test_identity_forms() -> None:
    assert WEB.spiffe_id == "spiffe://cluster.local/ns/default/sa/web"
    assert WEB.dns_name == "web.default.serviceaccount.identity.meshward.cluster.local"
    assert pki.Identity.parse(WEB.dns_name, TD) == WEB


@pytest.mark.parametrize(
    ("name", "trust_domain", "namespace", "service_account"),
    [
        ("web.default.serviceaccount.identity.meshward.cluster.local", TD, "default", "web"),
        ("api-v2.team-1.serviceaccount.identity.meshward.cluster.local", TD, "team-1", "api-v2"),
        ("0.1.serviceaccount.identity.meshward.example.org", "example.org", "1", "0"),
        (
            f"{'a' * 63}.default.serviceaccount.identity.meshward.cluster.local",
            TD,
            "default",
            "a" * 63,
        ),
    ],
)
def test_identity_parse_accepts(
    name: str, trust_domain: str, namespace: str, service_account: str
) -> None:
    identity = pki.Identity.parse(name, trust_domain)
    assert (identity.namespace, identity.service_account) == (namespace, service_account)
    assert identity.trust_domain == trust_domain
    assert identity.dns_name == name


@pytest.mark.parametrize(
    "name",
    [
        "Web.default.serviceaccount.identity.meshward.cluster.local",
        "web.default.SERVICEACCOUNT.identity.meshward.cluster.local",
        "web.default.serviceaccount.identity.meshward.example.org",
        "web.default.serviceaccount.identity.meshward.cluster.local.",
        "a.web.default.serviceaccount.identity.meshward.cluster.local",
        "web.serviceaccount.identity.meshward.cluster.local",
        "web..serviceaccount.identity.meshward.cluster.local",
        "-web.default.serviceaccount.identity.meshward.cluster.local",
        "web_1.default.serviceaccount.identity.meshward.cluster.local",
        f"{'a' * 64}.default.serviceaccount.identity.meshward.cluster.local",
        f"web.{'n' * 64}.serviceaccount.identity.meshward.cluster.local",
        "serviceaccount.identity.meshward.cluster.local",
        "spiffe://cluster.local/ns/default/sa/web",
        "",
    ],
    ids=lambda name: name[:40] or "empty",
)
def test_identity_parse_refuses(name: str) -> None:
    with pytest.raises(InvalidIdentity) as caught:
        pki.Identity.parse(name, TD)
    assert FORM in str(caught.value)


def test_identity_parse_matches_the_whole_trust_domain() -> None:
    # ".meshward.local" is a suffix of the name, but trust domain "local" is not "cluster.local".
    with pytest.raises(InvalidIdentity):
        pki.Identity.parse(WEB.dns_name, "local")
    with pytest.raises(InvalidIdentity, match="trust domain"):
        pki.Identity.parse(WEB.dns_name, "Cluster.Local")


@pytest.mark.parametrize(
    ("namespace", "service_account", "trust_domain"),
    [("Default", "web", TD), ("default", "", TD), ("default", "web", ""), ("a/b", "web", TD)],
)
def test_identity_refuses_bad_parts(
    namespace: str, service_account: str, trust_domain: str
) -> None:
    with pytest.raises(InvalidIdentity):
        pki.Identity(namespace, service_account, trust_domain)


@pytest.mark.parametrize(
    ("text", "namespace", "service_account", "trust_domain"),
    [
        ("spiffe://cluster.local/ns/default/sa/web", "default", "web", TD),
        ("spiffe://example.org/ns/team-1/sa/api-v2", "team-1", "api-v2", "example.org"),
        ("spiffe://td/ns/0/sa/1", "0", "1", "td"),
    ],
)
def test_identity_from_spiffe_id_accepts(
    text: str, namespace: str, service_account: str, trust_domain: str
) -> None:
    identity = pki.Identity.from_spiffe_id(text)
    assert identity == pki.Identity(namespace, service_account, trust_domain)
    assert identity.spiffe_id == text  # it renders back to what was parsed
    assert pki.Identity.from_spiffe_id(text, trust_domain) == identity


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("spiffe://cluster.local/ns/default/sa/web/extra", "expected spiffe://<trust domain>/ns/"),
        ("spiffe://cluster.local/ns/default/sa/", "its service account is not a DNS-1123"),
        ("spiffe://cluster.local/sa/web/ns/default", "expected spiffe://<trust domain>/ns/"),
        ("spiffe://cluster.local/ns/Default/sa/web", "its namespace is not a DNS-1123 label"),
        ("spiffe://cluster.local/ns/default/sa/web_1", "its service account is not a DNS-1123"),
        ("spiffe://Cluster.Local/ns/default/sa/web", "trust domain is not a lowercase DNS"),
        ("spiffe://cluster.local:8443/ns/default/sa/web", "trust domain is not a lowercase DNS"),
        ("spiffe:///ns/default/sa/web", "trust domain is not a lowercase DNS"),
        ("SPIFFE://cluster.local/ns/default/sa/web", "expected spiffe://"),
        ("https://cluster.local/ns/default/sa/web", "expected spiffe://"),
        ("spiffe://cluster.local/ns/default/sa/web?x=1", "its service account is not a DNS-1123"),
        ("spiffe://cluster.local/ns/default/sa/web#", "its service account is not a DNS-1123"),
        ("spiffe://cluster.local/ns/default/sa/web%2F", "its service account is not a DNS-1123"),
        ("web.default.serviceaccount.identity.meshward.cluster.local", "expected spiffe://"),
        ("", "expected spiffe://"),
        (f"spiffe://cluster.local/ns/default/sa/{'a' * 64}", "its service account is not a"),
        (
            f"spiffe://{'.'.join(['d' * 60] * 3)}/ns/{'n' * 63}/sa/{'s' * 63}",
            "DNS form would be longer than 253 characters",
        ),
    ],
    ids=lambda value: value[:48] or "empty",
)
def test_identity_from_spiffe_id_refuses(text: str, says: str) -> None:
    with pytest.raises(InvalidIdentity, match=re.escape(says)) as caught:
        pki.Identity.from_spiffe_id(text)
    assert len(str(caught.value)) < 500  # an untrusted name is quoted, not repeated in full


def test_identity_from_spiffe_id_insists_on_the_trust_domain_asked_for() -> None:
    says = "of trust domain 'example.org', not 'cluster.local'"
    with pytest.raises(InvalidIdentity, match=re.escape(says)):
        pki.Identity.from_spiffe_id("spiffe://example.org/ns/default/sa/web", TD)
    # A suffix or prefix of the trust domain is another trust domain.
    for other in ("local", "cluster.local.evil", "evil-cluster.local"):
        with pytest.raises(InvalidIdentity, match="only identities of this mesh's trust domain"):
            pki.Identity.from_spiffe_id(f"spiffe://{other}/ns/default/sa/web", TD)
    with pytest.raises(InvalidIdentity, match="fix the trust domain setting"):
        pki.Identity.from_spiffe_id(WEB.spiffe_id, "Cluster.Local")


# -- anchors and issuers ---------------------------------------------------------------------


def test_trust_anchor_shape() -> None:
    at = NOW - HOUR
    anchor, key = pki.new_trust_anchor(TD, 365 * DAY, now=at)
    assert anchor.subject.rfc4514_string() == "CN=root.identity.meshward.cluster.local"
    assert anchor.issuer == anchor.subject
    anchor.verify_directly_issued_by(anchor)
    assert isinstance(key.curve, ec.SECP256R1)
    assert anchor.public_key() == key.public_key()
    constraints = ext(anchor, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, None)
    usage = ext(anchor, x509.KeyUsage)
    assert usage.critical and usage.value == key_usage(ca=True)
    assert ski(anchor) == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert ext(anchor, x509.AuthorityKeyIdentifier).value.key_identifier == ski(anchor)
    assert anchor.not_valid_before_utc == at - SKEW
    assert anchor.not_valid_after_utc == at + 365 * DAY


def test_issuer_shape(trust: Trust) -> None:
    cert, key = pki.new_issuer(trust.anchor, trust.anchor_key, TD, 30 * DAY, now=NOW)
    assert cert.subject.rfc4514_string() == "CN=issuer.identity.meshward.cluster.local"
    assert cert.issuer == trust.anchor.subject
    cert.verify_directly_issued_by(trust.anchor)
    assert isinstance(key.curve, ec.SECP256R1)
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value == x509.BasicConstraints(True, 0)
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value == key_usage(ca=True)
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski(trust.anchor)
    assert cert.not_valid_before_utc == NOW - SKEW
    assert cert.not_valid_after_utc == NOW + 30 * DAY
    assert cert.serial_number != trust.anchor.serial_number


def test_issuer_is_clamped_to_the_anchor(trust: Trust) -> None:
    cert, _ = pki.new_issuer(trust.anchor, trust.anchor_key, TD, 5000 * DAY, now=NOW)
    assert cert.not_valid_after_utc == trust.anchor.not_valid_after_utc


def test_new_issuer_refuses_a_bad_anchor(trust: Trust) -> None:
    with pytest.raises(IssuerError, match="does not match"):
        pki.new_issuer(trust.anchor, p256(), TD, DAY)
    leaf, leaf_key = issue(trust.issuer)
    with pytest.raises(IssuerError, match="not a CA"):
        pki.new_issuer(leaf, leaf_key, TD, DAY)
    pinned, pinned_key = make_ca("pinned", None, path_length=0, not_after=NOW + DAY)
    with pytest.raises(IssuerError, match="path length 0"):
        pki.new_issuer(pinned, pinned_key, TD, DAY)
    old_anchor, old_key = pki.new_trust_anchor(TD, DAY, now=NOW - 10 * DAY)
    with pytest.raises(IssuerError, match="expired"):
        pki.new_issuer(old_anchor, old_key, TD, DAY)


def test_ca_names_must_fit_a_common_name() -> None:
    with pytest.raises(InvalidIdentity, match="shorter trust domain"):
        pki.new_trust_anchor("a" * 50 + ".local", DAY)


def test_issuer_from_pem(trust: Trust) -> None:
    issuer = pki.Issuer.from_pem(
        pki.to_pem(trust.issuer.certificate), pki.key_to_pem(trust.issuer.key)
    )
    assert issuer.certificate == trust.issuer.certificate
    assert issuer.chain == ()
    assert issuer.key.private_numbers() == trust.issuer.key.private_numbers()
    # tls.crt may carry the CAs above the issuer (here the anchor itself).
    bundled = pki.Issuer.from_pem(
        pki.to_pem(trust.issuer.certificate, trust.anchor), pki.key_to_pem(trust.issuer.key)
    )
    assert bundled.chain == (trust.anchor,)
    bundled.check([trust.anchor])
    # A SEC1 ("EC PRIVATE KEY") key is read too.
    sec1 = trust.issuer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    pki.Issuer.from_pem(pki.to_pem(trust.issuer.certificate), sec1)


def test_issuer_from_pem_refuses(trust: Trust, foreign: Trust) -> None:
    cert_pem = pki.to_pem(trust.issuer.certificate)
    key_pem = pki.key_to_pem(trust.issuer.key)
    cases: list[tuple[bytes, bytes, str]] = [
        (b"not a certificate", key_pem, "tls.crt"),
        (b"", key_pem, "empty"),
        (cert_pem, b"not a key", "tls.key"),
        (cert_pem, pki.key_to_pem(foreign.issuer.key), "does not match"),
        (cert_pem, pki.key_to_pem(p256()), "does not match"),
        (pki.to_pem(trust.issuer.certificate, foreign.anchor), key_pem, "out of order"),
    ]
    leaf, leaf_key = issue(trust.issuer)
    cases.append((pki.to_pem(leaf), pki.key_to_pem(leaf_key), "not a CA"))
    encrypted = trust.issuer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    cases.append((cert_pem, encrypted, "encrypted"))
    for certs, key, words in cases:
        with pytest.raises(IssuerError, match=words):
            pki.Issuer.from_pem(certs, key)


def test_issuer_from_pem_refuses_an_expired_issuer() -> None:
    old = new_trust(now=NOW - 10 * DAY, issuer_lifetime=DAY)
    cert_pem = pki.to_pem(old.issuer.certificate)
    key_pem = pki.key_to_pem(old.issuer.key)
    with pytest.raises(IssuerError, match="expired"):
        pki.Issuer.from_pem(cert_pem, key_pem)
    # The same material, seen from a time when it was valid, loads.
    pki.Issuer.from_pem(cert_pem, key_pem, now=NOW - 10 * DAY + HOUR)


def test_issuer_check(trust: Trust, foreign: Trust) -> None:
    trust.issuer.check([trust.anchor])
    trust.issuer.check([foreign.anchor, trust.anchor])
    with pytest.raises(IssuerError, match="does not chain to the trust anchors"):
        trust.issuer.check([foreign.anchor])
    with pytest.raises(IssuerError, match="expired"):
        trust.issuer.check([trust.anchor], now=NOW + 31 * DAY)
    with pytest.raises(IssuerError, match="not valid until"):
        trust.issuer.check([trust.anchor], now=NOW - HOUR)
    with pytest.raises(IssuerError, match="no trust anchors"):
        trust.issuer.check([])


def test_issuer_check_refuses_an_expired_anchor() -> None:
    anchor = make_ca("anchor", None, path_length=None, not_after=NOW + DAY)
    cert, key = make_ca("issuer", anchor, path_length=0, not_after=NOW + 10 * DAY)
    issuer = pki.Issuer(certificate=cert, key=key)
    issuer.check([anchor[0]])
    with pytest.raises(IssuerError, match=r"trust anchor .* expired"):
        issuer.check([anchor[0]], now=NOW + 2 * DAY)


def test_issuer_check_applies_path_length() -> None:
    # The anchor allows no CA below it, so leaves of this issuer would never verify.
    anchor = make_ca("anchor", None, path_length=0, not_after=NOW + DAY)
    cert, key = make_ca("issuer", anchor, path_length=0, not_after=NOW + DAY)
    with pytest.raises(IssuerError, match="does not chain"):
        pki.Issuer(certificate=cert, key=key).check([anchor[0]])


# -- verify_chain refusals -------------------------------------------------------------------


def test_verify_chain_refuses_a_leaf_from_another_ca(trust: Trust, foreign: Trust) -> None:
    leaf, _ = issue(foreign.issuer)
    with pytest.raises(UntrustedChain, match=WEB.spiffe_id):
        pki.verify_chain(leaf, [foreign.issuer.certificate], [trust.anchor])
    with pytest.raises(UntrustedChain):
        pki.verify_chain(leaf, [trust.issuer.certificate], [trust.anchor])


def test_verify_chain_refuses_an_expired_leaf(trust: Trust) -> None:
    leaf, _ = issue(trust.issuer, now=NOW, lifetime=HOUR)
    pki.verify_chain(leaf, [trust.issuer.certificate], [trust.anchor], now=NOW + HOUR)
    with pytest.raises(UntrustedChain, match="not valid"):
        pki.verify_chain(
            leaf,
            [trust.issuer.certificate],
            [trust.anchor],
            now=NOW + HOUR + datetime.timedelta(seconds=1),
        )
    # Seen from now, a leaf issued two hours ago for one hour has expired.
    old, _ = issue(trust.issuer, now=NOW - 2 * HOUR, lifetime=HOUR)
    with pytest.raises(UntrustedChain):
        pki.verify_chain(old, [trust.issuer.certificate], [trust.anchor])


def test_verify_chain_refuses_a_missing_intermediate(trust: Trust) -> None:
    leaf, _ = issue(trust.issuer)
    with pytest.raises(UntrustedChain):
        pki.verify_chain(leaf, [], [trust.anchor])


def test_verify_chain_refuses_no_anchors(trust: Trust) -> None:
    leaf, _ = issue(trust.issuer)
    with pytest.raises(UntrustedChain, match="no trust anchors"):
        pki.verify_chain(leaf, [trust.issuer.certificate], [])


def test_verify_chain_needs_exactly_one_spiffe_uri(trust: Trust) -> None:
    intermediates = [trust.issuer.certificate]
    uri = x509.UniformResourceIdentifier(WEB.spiffe_id)
    dns = x509.DNSName(WEB.dns_name)
    # Control: the hand-made leaf is otherwise acceptable.
    pki.verify_chain(hand_made_leaf(trust.issuer, [uri, dns]), intermediates, [trust.anchor])
    refused: list[list[x509.GeneralName]] = [
        [dns],
        [uri, x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/db"), dns],
        [x509.UniformResourceIdentifier("https://cluster.local/web"), dns],
    ]
    for sans in refused:
        leaf = hand_made_leaf(trust.issuer, sans)
        with pytest.raises(UntrustedChain, match="exactly one URI SAN"):
            pki.verify_chain(leaf, intermediates, [trust.anchor])
        assert pki.spiffe_id(leaf) is None


def test_verify_chain_refuses_a_server_certificate(trust: Trust) -> None:
    cert, _ = pki.new_server_certificate(trust.issuer, ["identity.meshward.svc"], HOUR)
    with pytest.raises(UntrustedChain):
        pki.verify_chain(cert, [trust.issuer.certificate], [trust.anchor])


# -- the identity service's own certificate --------------------------------------------------


def test_server_certificate(trust: Trust) -> None:
    names = ["identity.meshward.svc", "identity.meshward.svc.cluster.local"]
    cert, key = pki.new_server_certificate(trust.issuer, names, 2 * HOUR, now=NOW)
    assert cert.public_key() == key.public_key()
    assert cert.subject == x509.Name([])
    sans = ext(cert, x509.SubjectAlternativeName)
    assert sans.critical
    assert list(sans.value) == [x509.DNSName(name) for name in names]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.BasicConstraints).value.ca is False
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ski(
        trust.issuer.certificate
    )
    assert cert.not_valid_before_utc == NOW - SKEW
    assert cert.not_valid_after_utc == NOW + 2 * HOUR
    assert pki.spiffe_id(cert) is None
    for name in names:
        verifier = (
            PolicyBuilder()
            .store(Store([trust.anchor]))
            .time(NOW)
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(cert, [trust.issuer.certificate])


@pytest.mark.parametrize("names", [[], ["Identity.svc"], ["under_score.svc"], ["a..b"]])
def test_server_certificate_refuses_bad_names(trust: Trust, names: list[str]) -> None:
    with pytest.raises(InvalidIdentity):
        pki.new_server_certificate(trust.issuer, names, HOUR)


# -- PEM in and out --------------------------------------------------------------------------


def test_load_certificates(trust: Trust) -> None:
    bundle = pki.to_pem(trust.issuer.certificate, trust.anchor)
    assert pki.load_certificates(bundle) == [trust.issuer.certificate, trust.anchor]
    # Other PEM blocks (a key pasted into the bundle) are skipped, not fatal.
    mixed = pki.key_to_pem(p256()) + pki.to_pem(trust.anchor)
    assert pki.load_certificates(mixed) == [trust.anchor]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\n",
        b"garbage",
        b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    ],
)
def test_load_certificates_refuses(data: bytes) -> None:
    with pytest.raises(UntrustedChain, match="trust anchors"):
        pki.load_certificates(data, "trust anchors")


def test_pem_round_trips(trust: Trust) -> None:
    key_pem = pki.key_to_pem(trust.issuer.key)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == trust.issuer.key.private_numbers()
    pem = pki.to_pem(trust.issuer.certificate, trust.anchor)
    assert pem.count(b"-----BEGIN CERTIFICATE-----") == 2
    assert x509.load_pem_x509_certificates(pem) == [trust.issuer.certificate, trust.anchor]
