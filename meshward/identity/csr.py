"""Parse the certificate signing requests proxies send to Certify, and refuse the bad ones early.

A CSR arrives from an unauthenticated-until-TokenReview peer, so it is treated as hostile input:
its size is capped before any parsing, its self-signature must verify (proof the sender holds the
private key), and its key must be one we are willing to certify. Nothing else in the CSR is
trusted: the identity service takes only the public key and writes every extension itself
(see :func:`meshward.identity.pki.sign_leaf`).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from meshward.errors import InvalidCSR

MAX_CSR_BYTES = 16 * 1024
MIN_RSA_BITS = 2048
# Far above anything a proxy generates; bounds the cost of checking a hostile CSR's signature.
MAX_RSA_BITS = 8192

_ACCEPTED = f"ECDSA P-256 (secp256r1) or RSA of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits"


def parse(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER PKCS#10 CSR and check its size, signature and key.

    Raises :class:`InvalidCSR` naming the problem. The size limit is checked before parsing.
    """
    if len(data) > MAX_CSR_BYTES:
        raise InvalidCSR(
            f"CSR is {len(data)} bytes, over the {MAX_CSR_BYTES}-byte limit: "
            "send a single PKCS#10 request (a P-256 CSR is well under 1 KiB)"
        )
    stripped = data.strip()
    if not stripped:
        raise InvalidCSR("CSR is empty: send a PEM or DER PKCS#10 certificate signing request")
    pem = stripped.startswith(b"-----BEGIN")
    try:
        csr = x509.load_pem_x509_csr(data) if pem else x509.load_der_x509_csr(data)
    except ValueError as e:
        form = "PEM" if pem else "DER"
        raise InvalidCSR(
            f"not a {form} PKCS#10 certificate signing request ({e}): "
            "send a CSR, PEM with a 'CERTIFICATE REQUEST' header or raw DER"
        ) from e
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidCSR(f"CSR public key can not be read ({e}): use {_ACCEPTED}") from e
    # The key is checked before the signature so a huge RSA key never costs a verification.
    check_public_key(key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as e:
        raise InvalidCSR(f"CSR signature can not be checked ({e}): sign it with SHA-256") from e
    if not valid:
        raise InvalidCSR(
            "CSR signature does not verify: the request was altered or not signed with the "
            "private key of the public key it carries; regenerate the CSR"
        )
    return csr


def check_public_key(key: CertificatePublicKeyTypes) -> None:
    """Refuse a key we would not certify: only ECDSA P-256 and RSA 2048..8192 bits pass."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return
        raise InvalidCSR(f"CSR key is ECDSA on curve {key.curve.name}: use {_ACCEPTED}")
    if isinstance(key, rsa.RSAPublicKey):
        if MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            return
        raise InvalidCSR(f"CSR key is RSA-{key.key_size}: use {_ACCEPTED}")
    raise InvalidCSR(f"CSR key type {type(key).__name__} is not accepted: use {_ACCEPTED}")
