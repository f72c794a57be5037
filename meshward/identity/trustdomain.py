"""The TrustDomain resource (``identity.meshward.io/v1alpha1``) and the plan that keeps it true.

A TrustDomain declares the mesh's trust domain name, how long anchors and issuers live and how
long before expiry the issuer is replaced, and optionally a trust anchor or issuer of the user's
own PKI. :func:`plan` turns the resource, what the control-plane namespace holds now and the
current time into what to write: the anchor and issuer Secrets, the trust bundle, and the status.
It does no I/O (the operator's :mod:`meshward.operator._trust` reads and writes), so every
decision is unit-tested with real certificates from :mod:`meshward.identity.pki`.

Deny when in doubt: material that is present but wrong is reported in words and left untouched.
The plan replaces an issuer only by signing a new one from an anchor whose key it holds, and an
anchor only through the rotation phases below.

Anchor rotation, started before the anchor's expiry or on request (the
``identity.meshward.io/rotate-anchor`` annotation, as ``meshward identity rotate`` sets it):

1. a new anchor is created and kept in its own Secret; the bundle trusts both anchors
   (phase ``AnchorAdded``);
2. it waits until every proxy reports the new bundle (:class:`Census`);
3. the issuer is replaced by one the new anchor signs, and proxies are asked to renew early
   (``renew-leaves-before`` beside the bundle; phase ``IssuerSwitched``);
4. it waits until every proxy holds a leaf of that issuer;
5. the new anchor becomes the anchor and the old one leaves the bundle (phase ``Ready``).

Every step is derived again each round from the Secrets, the census and the stored status, so an
operator restarted at any point resumes where it stopped.
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

from meshward import errors, trustbundle
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
    ANCHOR_ADDED = "AnchorAdded"
    """Anchor rotation, steps 1-2: both anchors trusted; waiting for every proxy to load them."""
    ISSUER_SWITCHED = "IssuerSwitched"
    """Anchor rotation, steps 3-4: the new anchor signs the issuer; waiting for every proxy to
    hold a leaf of it."""


ROTATING = frozenset({Phase.ANCHOR_ADDED, Phase.ISSUER_SWITCHED})
ROTATE_ANNOTATION = "identity.meshward.io/rotate-anchor"
"""Set to any new value (``meshward identity rotate`` writes the time) to start an anchor
rotation now; the value handled last is kept in ``status.rotationRequest``."""
NEXT_ANCHOR_SECRET = "meshward-identity-next-anchor"
"""Holds the anchor being rotated in, with its key, until it becomes the anchor."""
RENEW_REPEAT = datetime.timedelta(minutes=2)
"""While proxies still hold leaves of the old issuer, the early-renewal request is renewed this
often: a proxy that renewed before the identity service loaded the new issuer asks again."""
RENEW_REPEATS = 10
"""At most this many repeats (20 minutes): every proxy renews at each, so a proxy that can not
renew at all must not keep the whole mesh renewing; it renews on its own schedule, and the
rotation waits for it (the status names it)."""


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
    """The anchor being rotated in, during an anchor rotation."""
    issuer: CertificateStatus | None = None
    phase_since: str | None = None
    """When the current rotation phase began (RFC 3339); unset outside a rotation."""
    rotation_request: str | None = None
    """The last value of the rotate-anchor annotation that was acted on."""
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
class ProxyState:
    """What one proxy last reported: the fingerprints of its trust bundle and of its leaf's
    issuer (:mod:`meshward.trustbundle`); None when it reported neither yet."""

    name: str
    """``namespace/pod``."""
    bundle: str | None
    issuer: str | None


@dataclasses.dataclass(frozen=True)
class Census:
    """The proxies an anchor rotation waits for.

    ``proxies``: every live report. ``silent``: proxies known to run (injected pods) that sent
    no live report; they count as not done, since nothing says they are.
    """

    proxies: tuple[ProxyState, ...] = ()
    silent: tuple[str, ...] = ()

    def without_bundle(self, fingerprint: str) -> list[str]:
        """Proxies not known to have loaded the bundle ``fingerprint``."""
        late = [p.name for p in self.proxies if p.bundle != fingerprint]
        return sorted({*late, *self.silent})

    def without_leaf_of(self, issuer: str) -> list[str]:
        """Proxies not known to hold a leaf of the issuer whose fingerprint is ``issuer``."""
        late = [p.name for p in self.proxies if p.issuer != issuer]
        return sorted({*late, *self.silent})


@dataclasses.dataclass(frozen=True)
class State:
    """What the cluster holds now. ``anchor``/``issuer``/``next_anchor``: the operator's Secrets
    in the control-plane namespace; ``user_anchor``/``user_issuer``: the referenced Secrets (None
    when not referenced or not found); ``census``: the proxies' reports; ``rotate_request``: the
    rotate-anchor annotation's value; ``previous``: the status stored last round."""

    anchor: Material | None = None
    issuer: Material | None = None
    user_anchor: Material | None = None
    user_issuer: Material | None = None
    next_anchor: Material | None = None
    census: Census = Census()
    rotate_request: str | None = None
    previous: TrustDomainStatus | None = None


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
    next_anchor_secret: SecretWrite | None = None
    """Write the next-anchor Secret (a rotation begins)."""
    delete_next_anchor: bool = False
    """Delete the next-anchor Secret, after the anchor Secret holds it (a rotation ends)."""
    renew_leaves_before: datetime.datetime | None = None
    """Publish beside the bundle: proxies whose leaf began before this renew now."""


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
        status = refused(r.phase, r.reason, r.message)
        if state.previous is not None:  # a request already acted on stays acted on
            status = status.model_copy(update={"rotation_request": state.previous.rotation_request})
        return Plan(None, None, None, status)


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

    # An anchor rotation under way: the next anchor is trusted beside the current one.
    nxt: pki.Issuer | None = None
    delete_next = False
    if state.next_anchor is not None:
        if anchors.user or anchors.signer is None:
            notes.append(
                f"{state.next_anchor.where} left alone: the operator rotates only an anchor "
                "whose key it holds"
            )
        else:
            candidate = _next_anchor(state.next_anchor, state.issuer, now)
            if candidate.certificate == current_anchor:
                delete_next = True  # promoted last round; only the clean-up was left
            else:
                nxt = candidate
                anchors = dataclasses.replace(
                    anchors, certs=[*anchors.certs, candidate.certificate]
                )

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

    # Rotation of the issuer before it expires, by the anchor that signed it.
    signer = anchors.signer
    if nxt is not None and _signed_by(issuer, nxt.certificate, now):
        signer = nxt
    signing_anchor = signer.certificate if signer is not None else current_anchor
    expires = issuer.certificate.not_valid_after_utc
    due = expires - spec.rotate_before("issuer")
    rotated = False
    why = ""
    if now >= due and not fresh:
        renewed_until = min(now + spec.lifetime("issuer"), signing_anchor.not_valid_after_utc)
        if spec.issuer_secret_ref is not None:
            why = (
                f"it comes from issuerSecretRef ({_ref(spec.issuer_secret_ref)}): "
                "put a new issuer there"
            )
        elif signer is None:
            why = f"the trust anchor's key is not available ({anchors.source} has no tls.key)"
        elif renewed_until <= expires:
            why = (
                "a new issuer can not outlive the trust anchor, which expires "
                f"{_when(signing_anchor.not_valid_after_utc)}: rotate the anchor"
            )
        else:
            old = issuer
            issuer = _new_issuer(signer, spec, now)
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

    # The anchor's rotation, in phases (see the module's docstring).
    previous = state.previous
    handled = previous.rotation_request if previous is not None else None
    requested = state.rotate_request is not None and state.rotate_request != handled
    anchor_due = current_anchor.not_valid_after_utc - spec.rotate_before("anchor")
    bundle_certs = list(anchors.certs)
    next_write: SecretWrite | None = None
    next_cert: x509.Certificate | None = None
    rotation: Phase | None = None
    since: datetime.datetime | None = None
    renew_before: datetime.datetime | None = None
    waiting = ""
    if nxt is not None:
        next_cert = nxt.certificate
        switched = False
        if signer is not nxt:
            published = trustbundle.fingerprint(bundle_certs)
            late = state.census.without_bundle(published)
            if late or (fresh or rotated):
                rotation, since = Phase.ANCHOR_ADDED, _since(previous, Phase.ANCHOR_ADDED, now)
                waiting = (
                    f"{_count(late)} to load the trust bundle with both anchors "
                    f"({published}): {_names(late)}"
                    if late
                    else "the next round: the issuer was replaced in this one"
                )
            else:
                old = issuer
                issuer = _new_issuer(nxt, spec, now)
                issuer_write, signer, switched = _write(issuer), nxt, True
                notes.append(
                    f"anchor rotation: every proxy trusts the new anchor; issuer "
                    f"{old.certificate.serial_number:x} replaced by "
                    f"{issuer.certificate.serial_number:x}, signed by the new anchor"
                )
        if signer is nxt:
            issued = trustbundle.certificate_fingerprint(issuer.certificate)
            late = state.census.without_leaf_of(issued)
            if switched or late or fresh or rotated:
                rotation = Phase.ISSUER_SWITCHED
                # Whole seconds, as the status keeps it: later rounds ask for the same time.
                since = (
                    now.replace(microsecond=0)
                    if switched
                    else _since(previous, Phase.ISSUER_SWITCHED, now)
                )
                repeats = min((now - since) // RENEW_REPEAT, RENEW_REPEATS)
                renew_before = since + RENEW_REPEAT * repeats
                waiting = (
                    f"{_count(late)} to hold a leaf of the new issuer (asked to renew early, "
                    f"last at {_when(renew_before)}): {_names(late)}"
                    if late and not switched
                    else "every proxy to renew from the new issuer (asked to renew early)"
                )
            else:
                anchor_write = SecretWrite(
                    cert=pki.to_pem(nxt.certificate), key=pki.key_to_pem(nxt.key)
                )
                delete_next = True
                notes.append(
                    f"anchor rotation complete: anchor {current_anchor.serial_number:x} "
                    f"replaced by {nxt.certificate.serial_number:x} and dropped from the bundle"
                )
                current_anchor, bundle_certs, next_cert = nxt.certificate, [nxt.certificate], None
                anchor_due = current_anchor.not_valid_after_utc - spec.rotate_before("anchor")
    elif (
        (requested or now >= anchor_due)
        and not anchors.user
        and anchors.signer is not None
        and spec.issuer_secret_ref is None
    ):
        cert, key = pki.new_trust_anchor(td, spec.lifetime("anchor"), now)
        next_write = SecretWrite(cert=pki.to_pem(cert), key=pki.key_to_pem(key))
        next_cert = cert
        bundle_certs.append(cert)
        rotation, since = Phase.ANCHOR_ADDED, now
        waiting = "every proxy to load the trust bundle with both anchors"
        cause = "on request" if requested else f"before its expiry {_when(anchor_due)}"
        notes.append(
            f"anchor rotation started {cause}: new anchor serial {cert.serial_number:x} "
            "trusted beside the current one"
        )
    if requested:
        handled = state.rotate_request

    stalled_from = current_anchor.not_valid_after_utc - spec.rotate_before("anchor") / 2
    if rotation is not None and now >= stalled_from:
        message = (
            f"trust anchor {_name(current_anchor)} expires "
            f"{_when(current_anchor.not_valid_after_utc)} and its rotation has not finished "
            f"(phase {rotation.value}, waiting for {waiting}): make those proxies report or "
            "renew (their logs say why not), or delete their pods"
        )
        warnings.append(ExpiryWarning("AnchorExpiring", message))
        anchor_expiring = _condition("AnchorExpiring", True, "RotationStalled", message)
    elif rotation is not None:
        anchor_expiring = _condition(
            "AnchorExpiring",
            False,
            "Rotating",
            f"the trust anchor is being replaced (phase {rotation.value}); the current one "
            f"expires {_when(current_anchor.not_valid_after_utc)}",
        )
    elif now >= anchor_due or (requested and rotation is None):
        if anchors.user:
            whose = (
                f"it is yours ({anchors.source}): put a new anchor there beside the current one, "
                "move the issuer to it, then drop the old one"
            )
        elif spec.issuer_secret_ref is not None:
            whose = (
                f"the issuer is yours (issuerSecretRef {_ref(spec.issuer_secret_ref)}): the "
                "new anchor could not sign it; issue a new anchor and issuer in your PKI"
            )
        else:
            whose = f"the anchor's key is not held ({anchors.source} has no tls.key)"
        message = (
            f"trust anchor {_name(current_anchor)} expires "
            f"{_when(current_anchor.not_valid_after_utc)} and the operator can not rotate it: "
            f"{whose}"
        )
        warnings.append(ExpiryWarning("AnchorExpiring", message))
        anchor_expiring = _condition("AnchorExpiring", True, "CanNotRotate", message)
    else:
        anchor_expiring = _condition(
            "AnchorExpiring",
            False,
            "InTime",
            f"trust anchor expires {_when(current_anchor.not_valid_after_utc)}; rotation "
            f"starts {_when(anchor_due)}",
        )

    if rotation is not None:
        phase = rotation
    else:
        phase = Phase.ISSUER_ROTATING if rotating else Phase.READY
        if rotating:
            waiting = (
                "the identity service to reload the issuer Secret (no restart); proxies move "
                "to the new issuer at their next renewal"
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
        next_anchor=describe(next_cert) if next_cert is not None else None,
        issuer=describe(issuer.certificate),
        phase_since=_rfc3339(since) if since is not None else None,
        rotation_request=handled,
        conditions=(
            _condition(
                "Ready",
                True,
                "IssuerRotated" if rotating else "Published",
                f"trust bundle of {len(bundle_certs)} anchor(s) published; issuer "
                f"{issuer.certificate.serial_number:x} in force",
            ),
            anchor_expiring,
            issuer_expiring,
        ),
    )
    return Plan(
        anchor_secret=anchor_write,
        issuer_secret=issuer_write,
        bundle=bundle_of(bundle_certs),
        status=status,
        warnings=tuple(warnings),
        notes=tuple(notes),
        next_anchor_secret=next_write,
        delete_next_anchor=delete_next,
        renew_leaves_before=renew_before,
    )


def _next_anchor(material: Material, issuer: Material | None, now: datetime.datetime) -> pki.Issuer:
    """The anchor being rotated in, with its key; a Secret that can not serve is refused,
    saying what to do: start again, unless the issuer is already signed by it, since every
    leaf is then signed under it and dropping it from the bundle would break them all."""
    advice = f"delete {material.where} to start the anchor rotation again"
    if issuer is not None and issuer.cert and material.cert and _issued(material.cert, issuer.cert):
        advice = (
            f"restore {material.where} as it was (certificate and key): the issuer is already "
            "signed by it, so every proxy's leaf is too; do not delete it"
        )
    try:
        found = _anchors(material, False, now)
    except _Refused as r:
        raise _Refused(Phase.INVALID, "InvalidNextAnchor", f"{r.message}; {advice}") from None
    if found.signer is None:
        raise _Refused(
            Phase.INVALID,
            "InvalidNextAnchor",
            f"{material.where} holds no tls.key: the new anchor can not sign the issuer; {advice}",
        )
    return found.signer


def _issued(anchor_pem: bytes, issuer_pem: bytes) -> bool:
    """Whether the first certificate of ``anchor_pem`` issued the first of ``issuer_pem`` (by
    name and key identifier: enough to tell which anchor it hangs under, not a verification)."""
    try:
        anchor = pki.load_certificates(anchor_pem)[0]
        issuer = pki.load_certificates(issuer_pem)[0]
    except errors.UntrustedChain:
        return False
    key_id = _key_id(anchor)
    return (
        anchor.subject == issuer.issuer
        and key_id is not None
        and (key_id == _authority_key_id(issuer))
    )


def _key_id(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def _authority_key_id(cert: x509.Certificate) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return ext.key_identifier


def _signed_by(issuer: pki.Issuer, anchor: x509.Certificate, now: datetime.datetime) -> bool:
    try:
        issuer.check([anchor], now)
    except errors.IssuerError:
        return False
    return True


def _since(
    previous: TrustDomainStatus | None, phase: Phase, now: datetime.datetime
) -> datetime.datetime:
    """When ``phase`` began: as stored, if the stored status is in it, else ``now`` (in whole
    seconds, as the status keeps it, so that later rounds derive the same times)."""
    fresh = now.replace(microsecond=0)
    if previous is None or previous.phase != phase or previous.phase_since is None:
        return fresh
    try:
        began = datetime.datetime.fromisoformat(previous.phase_since.replace("Z", "+00:00"))
    except ValueError:
        return fresh
    return min(began if began.tzinfo else began.replace(tzinfo=datetime.UTC), now)


def _count(names: list[str]) -> str:
    return f"{len(names)} prox{'y' if len(names) == 1 else 'ies'}"


def _names(names: list[str], shown: int = 5) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _rfc3339(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
