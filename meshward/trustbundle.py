"""The trust bundle as proxies and the operator both see it: one fingerprint, one validity check,
and the renewal request that travels beside it.

The ``meshward-identity-trust-roots`` ConfigMap carries the bundle (key ``ca-bundle.crt``) and,
during an anchor rotation, ``renew-leaves-before``: an RFC 3339 time asking every proxy whose
leaf was issued before it to renew now instead of on its usual schedule. Proxies mount the
ConfigMap and report the :func:`fingerprint` of the bundle they have loaded; the operator
computes the same fingerprint from the ConfigMap and waits until every proxy reports it. Both
sides must therefore compute it here, and only here.

No I/O: callers read the files.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshward import errors

ANCHORS_KEY = "ca-bundle.crt"
"""The ConfigMap key, and so the mounted file's name, of the PEM bundle."""
RENEW_BEFORE_KEY = "renew-leaves-before"
"""The ConfigMap key, and the mounted file's name, of the early-renewal request."""

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
    r"([Zz]|[+-]\d{2}:\d{2})"
)


def fingerprint(anchors: Iterable[x509.Certificate]) -> str:
    """``sha256:<hex>`` of the anchors' DER encodings, sorted bytewise, then concatenated.

    Sorting makes the fingerprint a property of the set of anchors: the order of the PEM blocks
    in the ConfigMap, or a duplicate added by hand, does not change what proxies report. For a
    one-anchor bundle it equals ``openssl x509 -outform DER | sha256sum``.
    """
    ders = sorted({cert.public_bytes(serialization.Encoding.DER) for cert in anchors})
    return "sha256:" + hashlib.sha256(b"".join(ders)).hexdigest()


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of one certificate's DER: how a leaf's issuer is named in reports."""
    return "sha256:" + hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclasses.dataclass(frozen=True)
class Anchor:
    """What a report says about one anchor."""

    subject: str
    not_after: datetime.datetime
    fingerprint: str


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A checked trust bundle: the PEM as given (what TLS libraries load) and its anchors."""

    pem: bytes
    anchors: tuple[x509.Certificate, ...]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.anchors)

    def describe(self) -> tuple[Anchor, ...]:
        return tuple(
            Anchor(
                subject=cert.subject.rfc4514_string(),
                not_after=cert.not_valid_after_utc,
                fingerprint=certificate_fingerprint(cert),
            )
            for cert in self.anchors
        )


def load(pem: bytes, what: str, now: datetime.datetime | None = None) -> Bundle:
    """The bundle in ``pem`` if it can anchor mesh identities, else
    :class:`~meshward.errors.InvalidTrustBundle` saying why (``what`` names the source).

    Usable means: it parses; it holds at least one certificate; every certificate is a CA
    (basicConstraints CA=true; a leaf in the bundle would be trusted as a root, so one such
    mistake refuses the whole bundle rather than silently trusting it); and not all of them have
    expired at ``now`` (an expired anchor beside a current one is normal during a rotation).
    """
    at = now or datetime.datetime.now(datetime.UTC)
    if not pem.strip():
        raise errors.InvalidTrustBundle(
            f"{what} is empty: it must hold the trust anchors as PEM 'CERTIFICATE' blocks"
        )
    try:
        anchors = tuple(x509.load_pem_x509_certificates(pem))
    except ValueError as exc:
        raise errors.InvalidTrustBundle(
            f"{what} is not a PEM certificate bundle ({exc}): it must hold one or more "
            "'-----BEGIN CERTIFICATE-----' blocks"
        ) from exc
    for cert in anchors:
        problem = _not_a_ca(cert)
        if problem:
            raise errors.InvalidTrustBundle(
                f"{what} holds {_name(cert)}, which {problem}: a trust bundle holds only CA "
                "certificates (the trust anchors), never a leaf or a server certificate"
            )
    if all(cert.not_valid_after_utc <= at for cert in anchors):
        expiries = ", ".join(
            f"{_name(cert)} at {cert.not_valid_after_utc.isoformat()}" for cert in anchors
        )
        raise errors.InvalidTrustBundle(
            f"{what}: every anchor has expired ({expiries}): publish a current trust anchor"
        )
    return Bundle(pem=pem, anchors=anchors)


def parse_renew_before(text: str) -> datetime.datetime:
    """The time in a ``renew-leaves-before`` value: RFC 3339 with an explicit offset, e.g.
    ``2026-11-24T10:00:00Z``; returned in UTC. Raises
    :class:`~meshward.errors.InvalidTrustBundle` saying what is wrong.
    """
    value = text.strip()
    match = _RFC3339.fullmatch(value)
    if match is None:
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise errors.InvalidTrustBundle(
            f"{shown!r} is not an RFC 3339 time with an offset, e.g. 2026-11-24T10:00:00Z"
        )
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    micro = int((match[7] or ".0")[1:7].ljust(6, "0"))
    zone = match[8]
    if zone in ("Z", "z"):
        offset = datetime.timedelta(0)
    else:
        sign = -1 if zone[0] == "-" else 1
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise errors.InvalidTrustBundle(
                f"{value!r} has offset {zone}, which is not a valid UTC offset"
            )
        offset = sign * datetime.timedelta(hours=hours, minutes=minutes)
    second = min(second, 59)  # RFC 3339 allows a leap second; datetime does not
    try:
        at = datetime.datetime(
            year, month, day, hour, minute, second, micro, tzinfo=datetime.timezone(offset)
        )
    except ValueError as exc:
        raise errors.InvalidTrustBundle(
            f"{value!r} is not a real date and time ({exc}): write e.g. 2026-11-24T10:00:00Z"
        ) from None
    return at.astimezone(datetime.UTC)


def format_renew_before(at: datetime.datetime) -> str:
    """``at`` as the ConfigMap value :func:`parse_renew_before` reads (UTC, ``Z``)."""
    if at.tzinfo is None:
        raise ValueError("the renewal time must be timezone-aware")
    return at.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")


def _not_a_ca(cert: x509.Certificate) -> str | None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return "has no basicConstraints extension"
    except (x509.DuplicateExtension, ValueError) as exc:
        return f"has extensions that do not parse ({exc})"
    if not constraints.ca:
        return "is not a CA (basicConstraints CA=false)"
    return None


def _name(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    return (
        f"certificate {subject!r}" if subject else f"a certificate (serial {cert.serial_number:x})"
    )
