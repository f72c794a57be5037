"""The TrustDomain plan, without a cluster: real certificates from meshward.identity.pki, a
chosen ``now``, and what the operator would write."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from meshward import errors
from meshward.identity import pki, trustdomain

TD = "cluster.local"
NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)


def spec(**fields: object) -> trustdomain.TrustDomainSpec:
    return trustdomain.TrustDomainSpec.model_validate({"trustDomain": TD, **fields})


def material(where: str, cert: bytes | None, key: bytes | None) -> trustdomain.Material:
    return trustdomain.Material(where=where, cert=cert, key=key)


def written(plan: trustdomain.Plan, which: str) -> trustdomain.Material:
    secret = getattr(plan, f"{which}_secret")
    assert secret is not None, f"the plan writes no {which} Secret"
    return material(f"secret cp/{which}", secret.cert, secret.key)


def conditions(plan: trustdomain.Plan) -> dict[str, tuple[str, str, str]]:
    return {c.type: (c.status, c.reason, c.message) for c in plan.status.conditions}


def first(s: trustdomain.TrustDomainSpec, now: datetime.datetime = NOW) -> trustdomain.Plan:
    return trustdomain.plan(s, trustdomain.State(), now)


def later(
    s: trustdomain.TrustDomainSpec, previous: trustdomain.Plan, now: datetime.datetime
) -> trustdomain.Plan:
    """The next round, with what ``previous`` wrote in the cluster."""
    state = trustdomain.State(
        anchor=written(previous, "anchor"), issuer=written(previous, "issuer")
    )
    return trustdomain.plan(s, state, now)


def certs(data: bytes) -> list[x509.Certificate]:
    return pki.load_certificates(data)


def test_nothing_there_creates_anchor_issuer_and_bundle() -> None:
    plan = first(spec(anchorLifetime="365d", issuerLifetime="90d"))
    (anchor,) = certs(written(plan, "anchor").cert or b"")
    issuer = pki.Issuer.from_pem(written(plan, "issuer").cert or b"", plan.issuer_secret.key, NOW)  # type: ignore[union-attr]
    issuer.check([anchor], NOW)
    assert plan.bundle == pki.to_pem(anchor)
    assert anchor.not_valid_after_utc == NOW + datetime.timedelta(days=365)
    assert issuer.certificate.not_valid_after_utc == NOW + datetime.timedelta(days=90)
    assert (
        issuer.certificate.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value.path_length
        == 0
    )
    status = plan.status
    assert status.phase == trustdomain.Phase.READY
    assert status.anchor is not None and status.issuer is not None
    assert status.anchor.serial == f"{anchor.serial_number:x}"
    assert status.issuer.not_after == "2030-04-01T00:00:00Z"
    assert status.next_anchor is None
    assert conditions(plan)["Ready"][0] == "True"
    assert conditions(plan)["IssuerExpiring"][:2] == ("False", "InTime")
    assert "rotation due 2030-03-02" in conditions(plan)["IssuerExpiring"][2]
    assert plan.warnings == ()


def test_existing_material_is_adopted_not_recreated() -> None:
    s = spec()
    created = first(s)
    again = later(s, created, NOW + DAY)
    assert (again.anchor_secret, again.issuer_secret) == (None, None)
    assert again.bundle == created.bundle
    assert again.status.issuer == created.status.issuer
    assert again.status.phase == trustdomain.Phase.READY


def test_issuer_rotated_within_its_window_by_the_same_anchor() -> None:
    s = spec(issuerLifetime="30d", issuerRotateBefore="10d")
    created = first(s)
    assert later(s, created, NOW + 19 * DAY).issuer_secret is None
    rotated = later(s, created, NOW + 21 * DAY)
    new = written(rotated, "issuer")
    old = pki.Issuer.from_pem(written(created, "issuer").cert or b"", created.issuer_secret.key)  # type: ignore[union-attr]
    fresh = pki.Issuer.from_pem(new.cert or b"", new.key or b"", NOW + 21 * DAY)
    anchors = certs(rotated.bundle or b"")
    fresh.check(anchors, NOW + 21 * DAY)
    assert fresh.certificate.serial_number != old.certificate.serial_number
    assert fresh.certificate.issuer == old.certificate.issuer
    assert rotated.anchor_secret is None and rotated.bundle == created.bundle
    assert rotated.status.phase == trustdomain.Phase.ISSUER_ROTATING
    assert rotated.status.issuer is not None
    assert rotated.status.issuer.serial == f"{fresh.certificate.serial_number:x}"
    assert conditions(rotated)["IssuerExpiring"][:2] == ("False", "Rotated")
    # The round after: the new issuer is in place, nothing more to do.
    state = trustdomain.State(anchor=written(created, "anchor"), issuer=new)
    settled = trustdomain.plan(s, state, NOW + 21 * DAY)
    assert settled.issuer_secret is None and settled.status.phase == trustdomain.Phase.READY


def test_default_window_is_a_third_of_the_lifetime() -> None:
    s = spec(issuerLifetime="90d")
    created = first(s)
    assert later(s, created, NOW + 59 * DAY).issuer_secret is None
    assert later(s, created, NOW + 61 * DAY).issuer_secret is not None


def test_expired_issuer_is_replaced_when_the_anchor_key_is_held() -> None:
    s = spec(issuerLifetime="30d")
    created = first(s)
    replaced = later(s, created, NOW + 31 * DAY)
    assert replaced.issuer_secret is not None
    assert "refused" in " ".join(replaced.notes)


def test_no_rotation_past_the_anchor_warns_instead() -> None:
    s = spec(anchorLifetime="40d", issuerLifetime="30d", issuerRotateBefore="10d")
    created = first(s)
    # Day 35: the issuer (to day 30) has been replaced already at day 25 in real life; here a
    # new issuer could only live to day 40, the anchor's end. Rotating at day 25 reaches day 40.
    at_25 = later(s, created, NOW + 25 * DAY)
    assert at_25.issuer_secret is not None
    state = trustdomain.State(anchor=written(created, "anchor"), issuer=written(at_25, "issuer"))
    at_32 = trustdomain.plan(s, state, NOW + 32 * DAY)
    assert at_32.issuer_secret is None, "a new issuer would expire no later: no endless rotation"
    status, reason, message = conditions(at_32)["IssuerExpiring"]
    assert (status, reason) == ("True", "CanNotRotate")
    assert "can not outlive the trust anchor" in message
    assert {w.reason for w in at_32.warnings} == {"IssuerExpiring", "AnchorExpiring"}


def user_pki(
    anchor_days: int = 365, issuer_days: int = 30
) -> tuple[trustdomain.Material, trustdomain.Material, x509.Certificate]:
    """An organisation's anchor (certificate only, key kept elsewhere) and its issuer."""
    anchor, anchor_key = pki.new_trust_anchor(TD, datetime.timedelta(days=anchor_days), NOW)
    issuer, issuer_key = pki.new_issuer(
        anchor, anchor_key, TD, datetime.timedelta(days=issuer_days), NOW
    )
    return (
        material("secret pki/root", pki.to_pem(anchor), None),
        material("secret pki/issuer", pki.to_pem(issuer), pki.key_to_pem(issuer_key)),
        anchor,
    )


REFS = {"anchorSecretRef": {"name": "root"}, "issuerSecretRef": {"name": "issuer"}}


def test_user_pki_is_copied_in_and_published() -> None:
    anchor_m, issuer_m, anchor = user_pki()
    state = trustdomain.State(user_anchor=anchor_m, user_issuer=issuer_m)
    plan = trustdomain.plan(spec(**REFS), state, NOW)
    assert plan.anchor_secret is None, "the user's anchor is not copied (nor its key)"
    assert plan.issuer_secret == trustdomain.SecretWrite(issuer_m.cert or b"", issuer_m.key or b"")
    assert plan.bundle == pki.to_pem(anchor)
    assert plan.status.phase == trustdomain.Phase.READY
    copied = trustdomain.State(
        user_anchor=anchor_m,
        user_issuer=issuer_m,
        issuer=material("x", issuer_m.cert, issuer_m.key),
    )
    assert trustdomain.plan(spec(**REFS), copied, NOW).issuer_secret is None


def test_user_issuer_from_another_anchor_is_refused_and_nothing_written() -> None:
    anchor_m, _, _ = user_pki()
    _, other_issuer, _ = user_pki()
    ours = first(spec())
    state = trustdomain.State(
        anchor=written(ours, "anchor"),
        issuer=written(ours, "issuer"),
        user_anchor=anchor_m,
        user_issuer=other_issuer,
    )
    plan = trustdomain.plan(spec(**REFS), state, NOW)
    assert (plan.anchor_secret, plan.issuer_secret, plan.bundle) == (None, None, None)
    assert plan.status.phase == trustdomain.Phase.INVALID
    status, reason, message = conditions(plan)["Ready"]
    assert (status, reason) == ("False", "InvalidIssuer")
    assert "secret pki/issuer" in message and "does not chain to the trust anchors" in message


def test_user_issuer_that_may_sign_cas_is_refused() -> None:
    anchor, anchor_key = pki.new_trust_anchor(TD, 365 * DAY, NOW)
    # An anchor used as the "issuer": a CA without path length 0.
    state = trustdomain.State(
        user_anchor=material("secret pki/root", pki.to_pem(anchor), None),
        user_issuer=material("secret pki/issuer", pki.to_pem(anchor), pki.key_to_pem(anchor_key)),
    )
    plan = trustdomain.plan(spec(**REFS), state, NOW)
    assert "path length 0" in conditions(plan)["Ready"][2]
    assert plan.issuer_secret is None


def test_expired_user_issuer_is_refused() -> None:
    anchor_m, issuer_m, _ = user_pki(issuer_days=1)
    state = trustdomain.State(user_anchor=anchor_m, user_issuer=issuer_m)
    plan = trustdomain.plan(spec(**REFS), state, NOW + 2 * DAY)
    assert plan.status.phase == trustdomain.Phase.INVALID
    assert "expired" in conditions(plan)["Ready"][2]


def test_user_issuer_in_its_window_warns_it_can_not_be_rotated() -> None:
    anchor_m, issuer_m, _ = user_pki(anchor_days=20, issuer_days=10)
    state = trustdomain.State(user_anchor=anchor_m, user_issuer=issuer_m)
    s = spec(**REFS, issuerRotateBefore="5d", anchorRotateBefore="15d")
    plan = trustdomain.plan(s, state, NOW + 6 * DAY)
    assert plan.issuer_secret is not None  # copied in: the user's own, not a new one
    assert plan.issuer_secret.cert == issuer_m.cert
    reasons = {w.reason: w.message for w in plan.warnings}
    assert set(reasons) == {"IssuerExpiring", "AnchorExpiring"}
    assert "issuerSecretRef" in reasons["IssuerExpiring"]
    assert "secret pki/root" in reasons["AnchorExpiring"]
    assert conditions(plan)["AnchorExpiring"][0] == "True"


def test_referenced_secret_missing_is_pending() -> None:
    plan = trustdomain.plan(spec(**REFS), trustdomain.State(), NOW)
    assert plan.status.phase == trustdomain.Phase.PENDING
    assert plan.status.waiting_for is not None and "anchorSecretRef" in plan.status.waiting_for
    assert (plan.anchor_secret, plan.issuer_secret, plan.bundle) == (None, None, None)


def test_issuer_without_its_anchor_is_not_replaced() -> None:
    ours = first(spec())
    plan = trustdomain.plan(spec(), trustdomain.State(issuer=written(ours, "issuer")), NOW)
    assert plan.status.phase == trustdomain.Phase.INVALID
    assert "anchorSecretRef" in conditions(plan)["Ready"][2]
    assert (plan.anchor_secret, plan.issuer_secret, plan.bundle) == (None, None, None)


def test_anchor_without_key_and_no_issuer_says_what_to_give() -> None:
    anchor_m, _, _ = user_pki()
    state = trustdomain.State(user_anchor=anchor_m)
    plan = trustdomain.plan(spec(anchorSecretRef={"name": "root"}), state, NOW)
    assert "has no tls.key" in conditions(plan)["Ready"][2]
    assert plan.issuer_secret is None


def test_user_anchor_with_key_signs_and_rotates_the_issuer() -> None:
    anchor, key = pki.new_trust_anchor(TD, 365 * DAY, NOW)
    anchor_m = material("secret pki/root", pki.to_pem(anchor), pki.key_to_pem(key))
    s = spec(anchorSecretRef={"name": "root"}, issuerLifetime="30d")
    created = trustdomain.plan(s, trustdomain.State(user_anchor=anchor_m), NOW)
    issuer = written(created, "issuer")
    pki.Issuer.from_pem(issuer.cert or b"", issuer.key or b"").check([anchor], NOW)
    state = trustdomain.State(user_anchor=anchor_m, issuer=issuer)
    assert trustdomain.plan(s, state, NOW + 21 * DAY).issuer_secret is not None


def test_bundle_is_stable_and_without_duplicates() -> None:
    a, _ = pki.new_trust_anchor(TD, 365 * DAY, NOW)
    b, _ = pki.new_trust_anchor(TD, 365 * DAY, NOW + DAY)
    assert trustdomain.bundle_of([b, a, b]) == trustdomain.bundle_of([a, b]) == pki.to_pem(a, b)


def test_garbage_anchor_secret_is_reported_not_replaced() -> None:
    state = trustdomain.State(anchor=material("secret cp/anchor", b"not pem", b"x"))
    plan = trustdomain.plan(spec(), state, NOW)
    assert plan.status.phase == trustdomain.Phase.INVALID
    assert "secret cp/anchor" in conditions(plan)["Ready"][2]
    assert (plan.anchor_secret, plan.issuer_secret, plan.bundle) == (None, None, None)


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"issuerLifetime": "1h", "issuerRotateBefore": "2h"}, "issuerRotateBefore 2h"),
        ({"anchorLifetime": "10d", "anchorRotateBefore": "10d"}, "anchorRotateBefore 10d"),
        ({"issuerLifetime": "90 days"}, "spec.issuerLifetime"),
        ({"trustDomain": "Cluster.Local"}, "spec.trustDomain"),
        ({"issuerLifetime": "0d"}, "more than zero"),
    ],
)
def test_bad_specs_say_what_to_fix(fields: dict[str, str], fragment: str) -> None:
    body = {
        "apiVersion": trustdomain.API_VERSION,
        "kind": "TrustDomain",
        "metadata": {"name": "t"},
        "spec": {"trustDomain": TD, **fields},
    }
    with pytest.raises(errors.InvalidResource, match=fragment):
        trustdomain.parse(body)
