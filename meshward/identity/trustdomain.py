"""The TrustDomain resource (``identity.meshward.io/v1alpha1``) and the plan that keeps it true.

A TrustDomain declares the mesh's trust domain name, how long anchors and issuers live and how
long before expiry the issuer is replaced, and optionally a trust anchor or issuer of the user's
own PKI. :func:`plan` turns the resource, what the control-plane namespace holds now and the
current time into what to write: the anchor and issuer Secrets, the trust bundle, and the status.
It does no I/O (the operator's :mod:`meshward.operator._trust` reads and writes), so every
decision is unit-tested with real certificates from :mod:`meshward.identity.pki`.

Deny when in doubt: material that is present but wrong is reported in words and left untouched.
The only material the plan ever replaces is an issuer it can sign anew from an anchor whose key
it holds; an anchor is never replaced (anchor rotation arrives with its phases, issue 6).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
from typing import Annotated, Literal

import pydantic
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshward import errors
from meshward.identity import commands, pki
from meshward.policy import resources

GROUP = "identity.meshward.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrustDomain"
PLURAL = "trustdomains"

DURATION = r"^[0-9]+(s|m|h|d)$"
TRUST_DOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
MAX_TRUST_DOMAIN = 39
"""``issuer.identity.meshward.<td>`` must fit a certificate's 64-character common name."""

Duration = Annotated[str, pydantic.Field(pattern=DURATION)]


def to_timedelta(text: str, field: str) -> datetime.timedelta:
    """``90d``, ``24h``, ``30m``, ``45s`` (the syntax of ``identity init``'s flags)."""
    try:
        return commands.duration(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"{field}: {exc}") from exc


class SecretRef(resources._Model):
    """A Secret of the user's PKI holding ``tls.crt`` and ``tls.key``."""

    name: Annotated[str, pydantic.Field(pattern=resources.DNS_SUBDOMAIN, max_length=253)]
    namespace: Annotated[str, pydantic.Field(pattern=resources.DNS_LABEL, max_length=63)] | None = (
        None
    )
    """Default: the control-plane namespace."""


class TrustDomainSpec(resources._Model):
    trust_domain: Annotated[
        str, pydantic.Field(pattern=TRUST_DOMAIN, max_length=MAX_TRUST_DOMAIN)
    ] = "cluster.local"
    anchor_lifetime: Duration = "365d"
    issuer_lifetime: Duration = "90d"
    anchor_rotate_before: Duration | None = None
    """Default: a third of ``anchorLifetime``."""
    issuer_rotate_before: Duration | None = None
    """Default: a third of ``issuerLifetime``."""
    anchor_secret_ref: SecretRef | None = None
    issuer_secret_ref: SecretRef | None = None

    @pydantic.model_validator(mode="after")
    def _windows_fit(self) -> TrustDomainSpec:
        for what in ("anchor", "issuer"):
            lifetime = to_timedelta(getattr(self, f"{what}_lifetime"), f"{what}Lifetime")
            raw = getattr(self, f"{what}_rotate_before")
            if raw is None:
                continue
            before = to_timedelta(raw, f"{what}RotateBefore")
            if before >= lifetime:
                raise ValueError(
                    f"{what}RotateBefore {raw} is not shorter than {what}Lifetime "
                    f"{getattr(self, f'{what}_lifetime')}: every new {what} would be due for "
                    f"rotation at once; make {what}RotateBefore shorter (a third of the "
                    "lifetime is the default)"
                )
        return self

    def lifetime(self, what: Literal["anchor", "issuer"]) -> datetime.timedelta:
        return to_timedelta(getattr(self, f"{what}_lifetime"), f"{what}Lifetime")

    def rotate_before(self, what: Literal["anchor", "issuer"]) -> datetime.timedelta:
        raw = getattr(self, f"{what}_rotate_before")
        if raw is None:
            return self.lifetime(what) / 3
        return to_timedelta(raw, f"{what}RotateBefore")


class Phase(enum.StrEnum):
    READY = "Ready"
    """The anchor and issuer are valid and published."""
    ISSUER_ROTATING = "IssuerRotating"
    """A new issuer was written this round; the identity service reloads the mounted Secret."""
    PENDING = "Pending"
    """Waiting for something outside the operator: a referenced Secret."""
    INVALID = "Invalid"
    """The resource or the material it points at can not be used; nothing was written."""
    INACTIVE = "Inactive"
    """Another TrustDomain, created earlier, is the one served."""


class CertificateStatus(resources._Model):
    subject: str
    serial: str
    not_after: str


class TrustDomainStatus(resources._Model):
    observed_generation: int | None = None
    phase: Phase | None = None
    waiting_for: str | None = None
    anchor: CertificateStatus | None = None
    next_anchor: CertificateStatus | None = None
    """The anchor being rotated in (its phases are not built yet: always unset)."""
    issuer: CertificateStatus | None = None
    conditions: tuple[resources.Condition, ...] = ()


class TrustDomain(resources._Model):
    api_version: str = API_VERSION
    kind: Literal["TrustDomain"] = "TrustDomain"
    metadata: resources.Meta
    spec: TrustDomainSpec
    status: TrustDomainStatus | None = None


def parse(body: dict[str, object]) -> TrustDomain:
    """A stored TrustDomain; :class:`InvalidResource` spells out every problem by field."""
    try:
        return TrustDomain.model_validate(body)
    except pydantic.ValidationError as exc:
        raise errors.InvalidResource(resources.describe(exc)) from exc


# -- planning --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Material:
    """A Secret's ``tls.crt`` and ``tls.key`` as read; ``where`` names it in messages."""

    where: str
    cert: bytes | None
    key: bytes | None


@dataclasses.dataclass(frozen=True)
class State:
    """What the cluster holds now. ``anchor``/``issuer``: the operator's Secrets in the
    control-plane namespace; ``user_anchor``/``user_issuer``: the referenced Secrets (None when
    not referenced or not found)."""

    anchor: Material | None = None
    issuer: Material | None = None
    user_anchor: Material | None = None
    user_issuer: Material | None = None


@dataclasses.dataclass(frozen=True)
class SecretWrite:
    """Contents for one of the operator's Secrets (``tls.crt``, ``tls.key``)."""

    cert: bytes
    key: bytes


@dataclasses.dataclass(frozen=True)
class ExpiryWarning:
    """Something a person must act on before it becomes an outage (an Event and a condition)."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Plan:
    anchor_secret: SecretWrite | None
    """Write the anchor Secret (only when the operator created the anchor this round)."""
    issuer_secret: SecretWrite | None
    """Write the issuer Secret (new, rotated, or the user's copied in)."""
    bundle: bytes | None
    """Publish this trust bundle; None leaves the published one alone."""
    status: TrustDomainStatus
    warnings: tuple[ExpiryWarning, ...] = ()
    notes: tuple[str, ...] = ()
    """What was done, for the log (never key material)."""


def bundle_of(anchors: list[x509.Certificate]) -> bytes:
    """The trust bundle: each anchor once, oldest first, ties by fingerprint (a stable text,
    so an unchanged set of anchors never rewrites the ConfigMaps)."""
    unique = {a.fingerprint(_SHA256): a for a in anchors}
    ordered = sorted(unique.items(), key=lambda kv: (kv[1].not_valid_before_utc, kv[0]))
    return pki.to_pem(*(cert for _, cert in ordered))


_SHA256 = hashes.SHA256()


def describe(cert: x509.Certificate) -> CertificateStatus:
    return CertificateStatus(
        subject=cert.subject.rfc4514_string() or "(empty)",
        serial=f"{cert.serial_number:x}",
        not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


class _Refused(Exception):
    """Internal: stop planning, report ``phase`` with ``message``; nothing is written."""

    def __init__(self, phase: Phase, reason: str, message: str) -> None:
        super().__init__(message)
        self.phase, self.reason, self.message = phase, reason, message


@dataclasses.dataclass(frozen=True)
class _Anchors:
    certs: list[x509.Certificate]
    signer: pki.Issuer | None
    """The current anchor with its key, when we hold the key."""
    source: str
    user: bool


def _load_key(pem: bytes, where: str) -> object:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise _Refused(
            Phase.INVALID,
            "InvalidAnchor",
            f"{where}: tls.key is not an unencrypted PEM private key ({exc}); store the "
            "anchor's key unencrypted, or leave tls.key out (the issuer then can not be rotated)",
        ) from exc


def _anchors(material: Material, user: bool, now: datetime.datetime) -> _Anchors:
    if not material.cert:
        raise _Refused(
            Phase.INVALID,
            "InvalidAnchor",
            f"{material.where} has no tls.crt: put the trust anchor certificate (PEM) there",
        )
    try:
        certs = pki.load_certificates(material.cert, f"{material.where} tls.crt")
    except errors.UntrustedChain as exc:
        raise _Refused(Phase.INVALID, "InvalidAnchor", str(exc)) from exc
    for cert in certs:
        problem = _ca_problem(cert)
        if problem:
            raise _Refused(
                Phase.INVALID,
                "InvalidAnchor",
                f"{material.where}: {_name(cert)} can not be a trust anchor: {problem}",
            )
    current = certs[0]
    if now > current.not_valid_after_utc:
        raise _Refused(
            Phase.INVALID,
            "AnchorExpired",
            f"{material.where}: trust anchor {_name(current)} expired at "
            f"{current.not_valid_after_utc.isoformat()}: no leaf under it verifies any more; "
            "provide a new anchor and issuer",
        )
    signer = None
    if material.key:
        key = _load_key(material.key, material.where)
        try:
            signer = pki.Issuer(certificate=current, key=key)  # type: ignore[arg-type]
        except errors.IssuerError as exc:
            raise _Refused(
                Phase.INVALID, "InvalidAnchor", f"{material.where}: the trust anchor's {exc}"
            ) from exc
    live = [c for c in certs if now <= c.not_valid_after_utc]
    return _Anchors(certs=live, signer=signer, source=material.where, user=user)


def _issuer(material: Material, anchors: _Anchors, now: datetime.datetime) -> pki.Issuer:
    """The issuer in ``material``, checked: readable, unexpired, a CA with path length 0, and
    chaining to the anchors. Raises IssuerError saying which."""
    if not material.cert or not material.key:
        raise errors.IssuerError(
            f"{material.where} lacks tls.crt or tls.key: it must hold the issuer certificate "
            "and its private key"
        )
    issuer = pki.Issuer.from_pem(material.cert, material.key, now)
    constraints = _basic_constraints(issuer.certificate)
    if constraints is None or constraints.path_length != 0:
        raise errors.IssuerError(
            f"{material.where}: issuer {_name(issuer.certificate)} must have path length 0 "
            "(it signs only leaves); re-issue it with pathlen:0"
        )
    try:
        issuer.check(anchors.certs, now)
    except errors.IssuerError as exc:
        raise errors.IssuerError(f"{material.where}: {exc}") from exc
    return issuer


def _condition(kind: str, ok: bool | None, reason: str, message: str) -> resources.Condition:
    status: Literal["True", "False", "Unknown"] = (
        "Unknown" if ok is None else "True" if ok else "False"
    )
    return resources.Condition(type=kind, status=status, reason=reason, message=message)


def _when(at: datetime.datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%SZ")


def refused(phase: Phase, reason: str, message: str) -> TrustDomainStatus:
    """The status of a TrustDomain that can not be acted on: why, and what to do."""
    return TrustDomainStatus(
        phase=phase,
        waiting_for=message,
        conditions=(
            _condition("Ready", False, reason, message),
            _condition("AnchorExpiring", None, reason, "no usable trust anchor"),
            _condition("IssuerExpiring", None, reason, "no usable issuer"),
        ),
    )


def plan(spec: TrustDomainSpec, state: State, now: datetime.datetime) -> Plan:
    """What to write so that the cluster holds valid trust material for ``spec`` at ``now``."""
    try:
        return _plan(spec, state, now)
    except _Refused as r:
        return Plan(None, None, None, refused(r.phase, r.reason, r.message))


def _plan(spec: TrustDomainSpec, state: State, now: datetime.datetime) -> Plan:
    notes: list[str] = []
    anchor_write: SecretWrite | None = None
    td = spec.trust_domain

    # The anchor: the user's, the one we (or `identity init`) stored, or a new one.
    if spec.anchor_secret_ref is not None:
        if state.user_anchor is None:
            raise _Refused(
                Phase.PENDING,
                "AnchorSecretNotFound",
                f"the Secret named in anchorSecretRef ({_ref(spec.anchor_secret_ref)}) to "
                "exist, with tls.crt (the trust anchor) and optionally tls.key",
            )
        anchors = _anchors(state.user_anchor, True, now)
    elif state.anchor is not None:
        anchors = _anchors(state.anchor, False, now)
        if anchors.signer is None:
            notes.append(f"{state.anchor.where} holds no tls.key: the issuer can not be rotated")
    elif spec.issuer_secret_ref is not None:
        raise _Refused(
            Phase.INVALID,
            "AnchorMissing",
            f"issuerSecretRef ({_ref(spec.issuer_secret_ref)}) is set but there is no trust "
            "anchor to check it against: set anchorSecretRef to the Secret holding the anchor "
            "that signed it",
        )
    elif state.issuer is not None:
        raise _Refused(
            Phase.INVALID,
            "AnchorMissing",
            f"{state.issuer.where} exists but there is no trust anchor to check it against: "
            "set anchorSecretRef to the Secret holding its anchor, or delete the issuer Secret "
            "so that the operator creates a new anchor and issuer",
        )
    else:
        cert, key = pki.new_trust_anchor(td, spec.lifetime("anchor"), now)
        anchor_write = SecretWrite(cert=pki.to_pem(cert), key=pki.key_to_pem(key))
        anchors = _Anchors(
            certs=[cert], signer=pki.Issuer(cert, key), source="the new anchor", user=False
        )
        notes.append(f"created trust anchor serial {cert.serial_number:x}")

    current_anchor = anchors.certs[0]
    issuer_write: SecretWrite | None = None
    warnings: list[ExpiryWarning] = []
    fresh = False
    """A new issuer was signed this round (so it is not due for rotation)."""

    # The issuer: the user's (copied into ours), ours, or a new one from the anchor.
    if spec.issuer_secret_ref is not None:
        if state.user_issuer is None:
            raise _Refused(
                Phase.PENDING,
                "IssuerSecretNotFound",
                f"the Secret named in issuerSecretRef ({_ref(spec.issuer_secret_ref)}) to "
                "exist, with tls.crt and tls.key (the issuer and its key)",
            )
        try:
            issuer = _issuer(state.user_issuer, anchors, now)
        except errors.IssuerError as exc:
            raise _Refused(Phase.INVALID, "InvalidIssuer", str(exc)) from exc
        wanted = SecretWrite(cert=state.user_issuer.cert or b"", key=state.user_issuer.key or b"")
        current = state.issuer
        if current is None or (current.cert, current.key) != (wanted.cert, wanted.key):
            issuer_write = wanted
            notes.append(f"issuer serial {issuer.certificate.serial_number:x} copied in")
    else:
        found: pki.Issuer | None = None
        problem = None
        if state.issuer is not None:
            try:
                found = _issuer(state.issuer, anchors, now)
            except errors.IssuerError as exc:
                problem = str(exc)
        if found is None:
            if anchors.signer is None:
                what = problem or "there is no issuer yet"
                raise _Refused(
                    Phase.INVALID,
                    "IssuerUnavailable",
                    f"{what}; and the trust anchor's key is not available "
                    f"({anchors.source} has no tls.key) to sign one: give issuerSecretRef, or "
                    "the anchor's tls.key",
                )
            found = _new_issuer(anchors.signer, spec, now)
            issuer_write, fresh = _write(found), True
            notes.append(
                f"issuer serial {found.certificate.serial_number:x} created"
                + (f" (the previous one was refused: {problem})" if problem else "")
            )
        issuer = found

    # Rotation of the issuer before it expires.
    expires = issuer.certificate.not_valid_after_utc
    due = expires - spec.rotate_before("issuer")
    rotated = False
    why = ""
    if now >= due and not fresh:
        renewed_until = min(now + spec.lifetime("issuer"), current_anchor.not_valid_after_utc)
        if spec.issuer_secret_ref is not None:
            why = (
                f"it comes from issuerSecretRef ({_ref(spec.issuer_secret_ref)}): "
                "put a new issuer there"
            )
        elif anchors.signer is None:
            why = f"the trust anchor's key is not available ({anchors.source} has no tls.key)"
        elif renewed_until <= expires:
            why = (
                "a new issuer can not outlive the trust anchor, which expires "
                f"{_when(current_anchor.not_valid_after_utc)}: rotate the anchor"
            )
        else:
            old = issuer
            issuer = _new_issuer(anchors.signer, spec, now)
            issuer_write, rotated = _write(issuer), True
            notes.append(
                f"issuer rotated before its expiry {_when(expires)}: serial "
                f"{old.certificate.serial_number:x} -> {issuer.certificate.serial_number:x}"
            )
    if why:
        message = (
            f"issuer {_name(issuer.certificate)} expires {_when(expires)} and can not be "
            f"rotated: {why}"
        )
        warnings.append(ExpiryWarning("IssuerExpiring", message))
        issuer_expiring = _condition("IssuerExpiring", True, "CanNotRotate", message)
    else:
        issuer_expiring = _condition(
            "IssuerExpiring",
            False,
            "Rotated" if rotated else "InTime",
            f"issuer expires {_when(issuer.certificate.not_valid_after_utc)}; rotation due "
            f"{_when(issuer.certificate.not_valid_after_utc - spec.rotate_before('issuer'))}",
        )
    rotating = rotated or (fresh and state.issuer is not None)

    # The anchor's own warning window: its rotation is not automated yet.
    anchor_due = current_anchor.not_valid_after_utc - spec.rotate_before("anchor")
    if now >= anchor_due:
        message = (
            f"trust anchor {_name(current_anchor)} expires "
            f"{_when(current_anchor.not_valid_after_utc)} and can not be rotated by the operator "
            f"yet: {'replace the Secret ' + anchors.source + ' ' if anchors.user else ''}"
            "add a new anchor to the bundle, move the issuer to it, then drop the old anchor"
        )
        warnings.append(ExpiryWarning("AnchorExpiring", message))
        anchor_expiring = _condition("AnchorExpiring", True, "CanNotRotate", message)
    else:
        anchor_expiring = _condition(
            "AnchorExpiring",
            False,
            "InTime",
            f"trust anchor expires {_when(current_anchor.not_valid_after_utc)}; "
            f"warning from {_when(anchor_due)}",
        )

    phase = Phase.ISSUER_ROTATING if rotating else Phase.READY
    if rotating:
        waiting = (
            "the identity service to reload the issuer Secret (no restart); proxies move to "
            "the new issuer at their next renewal"
        )
    else:
        waiting = (
            f"the next issuer rotation, due "
            f"{_when(issuer.certificate.not_valid_after_utc - spec.rotate_before('issuer'))}"
        )
    status = TrustDomainStatus(
        phase=phase,
        waiting_for=waiting,
        anchor=describe(current_anchor),
        issuer=describe(issuer.certificate),
        conditions=(
            _condition(
                "Ready",
                True,
                "IssuerRotated" if rotating else "Published",
                f"trust bundle of {len(anchors.certs)} anchor(s) published; issuer "
                f"{issuer.certificate.serial_number:x} in force",
            ),
            anchor_expiring,
            issuer_expiring,
        ),
    )
    return Plan(
        anchor_secret=anchor_write,
        issuer_secret=issuer_write,
        bundle=bundle_of(anchors.certs),
        status=status,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def _new_issuer(anchor: pki.Issuer, spec: TrustDomainSpec, now: datetime.datetime) -> pki.Issuer:
    cert, key = pki.new_issuer(
        anchor.certificate, anchor.key, spec.trust_domain, spec.lifetime("issuer"), now
    )
    return pki.Issuer(cert, key)


def _write(issuer: pki.Issuer) -> SecretWrite:
    return SecretWrite(
        cert=pki.to_pem(issuer.certificate, *issuer.chain), key=pki.key_to_pem(issuer.key)
    )


def _ref(ref: SecretRef) -> str:
    return f"secret {ref.namespace or '<control-plane namespace>'}/{ref.name}"


def _name(cert: x509.Certificate) -> str:
    return (
        f"'{cert.subject.rfc4514_string()}'"
        if len(cert.subject)
        else f"serial {cert.serial_number:x}"
    )


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _ca_problem(cert: x509.Certificate) -> str | None:
    """Why ``cert`` can not be a trust anchor (it must be a CA allowed to sign), or None."""
    try:
        constraints = _basic_constraints(cert)
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return "it has no keyUsage extension (keyCertSign is required)"
    except (x509.DuplicateExtension, ValueError) as exc:
        return f"its extensions do not parse ({exc})"
    if constraints is None or not constraints.ca:
        return "it is not a CA (basicConstraints CA=true is missing)"
    if not usage.key_cert_sign:
        return "its keyUsage does not allow keyCertSign"
    return None
