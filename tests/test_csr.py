"""CSR parsing: what proxies send is accepted in both encodings, and every way a hostile or broken
request can be wrong is refused with InvalidCSR naming the problem."""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from meshward.errors import InvalidCSR
from meshward.identity import csr


def build(key: CertificateIssuerPrivateKeyTypes | None = None) -> x509.CertificateSigningRequest:
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .sign(key, algorithm)
    )


def der(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.DER)


def pem(request: x509.CertificateSigningRequest) -> bytes:
    return request.public_bytes(serialization.Encoding.PEM)


def refused(data: bytes, *words: str) -> str:
    with pytest.raises(InvalidCSR) as caught:
        csr.parse(data)
    message = str(caught.value)
    for word in words:
        assert word in message, message
    return message


@pytest.mark.parametrize("encode", [pem, der], ids=["pem", "der"])
def test_accepts_p256_in_either_encoding(
    encode: Callable[[x509.CertificateSigningRequest], bytes],
) -> None:
    request = build()
    parsed = csr.parse(encode(request))
    assert der(parsed) == der(request)


def test_accepts_rsa_2048() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    parsed = csr.parse(pem(build(key)))
    public = parsed.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert public.key_size == 2048


def test_accepts_pem_with_surrounding_whitespace() -> None:
    request = build()
    assert der(csr.parse(b"\n  " + pem(request) + b"\n\n")) == der(request)


def test_refuses_empty() -> None:
    refused(b"", "empty")
    refused(b" \n\t", "empty")


def test_refuses_garbage() -> None:
    refused(b"hello, I am not a CSR", "not a DER PKCS#10")
    refused(
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!!\n-----END CERTIFICATE REQUEST-----\n", "PEM"
    )


def test_refuses_truncated_der() -> None:
    data = der(build())
    refused(data[: len(data) // 2], "not a DER PKCS#10")
    refused(data[:-1], "not a DER PKCS#10")


def test_refuses_a_certificate_instead_of_a_csr() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a csr")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )
    refused(cert.public_bytes(serialization.Encoding.PEM), "not a PEM PKCS#10")


def test_size_limit_is_checked_before_parsing() -> None:
    # A valid CSR padded past the limit: refused for its size, not for its content.
    request = pem(build())
    oversized = request + b"\n" * (csr.MAX_CSR_BYTES + 1 - len(request))
    assert len(oversized) == csr.MAX_CSR_BYTES + 1
    refused(oversized, str(csr.MAX_CSR_BYTES), "limit")
    # Garbage over the limit says the same thing: the parser never ran.
    refused(b"\x00" * (csr.MAX_CSR_BYTES + 1), "limit")
    # Exactly at the limit is still parsed.
    at_limit = request + b"\n" * (csr.MAX_CSR_BYTES - len(request))
    assert der(csr.parse(at_limit)) == der(x509.load_pem_x509_csr(request))


def test_refuses_corrupted_signature() -> None:
    data = bytearray(der(build()))
    # The signature BIT STRING ends the DER; its last byte is the low byte of ECDSA's s.
    data[-1] ^= 0x01
    message = refused(bytes(data), "signature does not verify")
    assert "regenerate" in message


def test_refuses_csr_signed_by_another_key() -> None:
    # The CSR carries one public key but is signed by a different private key.
    carried = ec.generate_private_key(ec.SECP256R1())
    signer = ec.generate_private_key(ec.SECP256R1())
    genuine = build(carried)
    forged = build(signer)
    # Splice: take the signed body of `genuine`, the signature of `forged`.
    body = genuine.tbs_certrequest_bytes
    forged_der = der(forged)
    forged_body = forged.tbs_certrequest_bytes
    spliced = forged_der.replace(forged_body, body)
    assert spliced != forged_der
    refused(spliced, "signature does not verify")


def test_refuses_p384() -> None:
    refused(pem(build(ec.generate_private_key(ec.SECP384R1()))), "secp384r1", "P-256")


def test_refuses_rsa_1024() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    refused(pem(build(key)), "RSA-1024", "2048")


def test_refuses_ed25519() -> None:
    refused(pem(build(ed25519.Ed25519PrivateKey.generate())), "Ed25519", "P-256")


def test_check_public_key_is_the_same_rule() -> None:
    csr.check_public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(InvalidCSR, match="secp521r1"):
        csr.check_public_key(ec.generate_private_key(ec.SECP521R1()).public_key())
