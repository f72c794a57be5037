"""The TrustDomain plan, without a cluster: real certificates from meshward.identity.pki, a
chosen ``now``, and what the operator would write."""

from __future__ import annotations

import datetime

import pytest
from cryptography import x509

from meshward import errors, trustbundle
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
    assert {w.reason for w in at_32.warnings} == {"IssuerExpiring"}
    # ...and the anchor, within its window, is being rotated: that is what ends the warning.
    assert at_32.next_anchor_secret is not None
    assert at_32.status.phase == trustdomain.Phase.ANCHOR_ADDED


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


# -- anchor rotation ---------------------------------------------------------------------------


class Cluster:
    """What the operator's Secrets and the TrustDomain's status hold, as each plan leaves them."""

    def __init__(self, s: trustdomain.TrustDomainSpec, now: datetime.datetime = NOW) -> None:
        self.spec = s
        self.anchor: trustdomain.Material | None = None
        self.issuer: trustdomain.Material | None = None
        self.next: trustdomain.Material | None = None
        self.status: trustdomain.TrustDomainStatus | None = None
        self.bundle = b""
        self.round(now)

    def round(
        self,
        now: datetime.datetime,
        census: trustdomain.Census = trustdomain.Census(),  # noqa: B008
        request: str | None = None,
    ) -> trustdomain.Plan:
        state = trustdomain.State(
            anchor=self.anchor,
            issuer=self.issuer,
            next_anchor=self.next,
            census=census,
            rotate_request=request,
            previous=self.status,
        )
        plan = trustdomain.plan(self.spec, state, now)
        if plan.anchor_secret is not None:
            self.anchor = material(
                "secret cp/anchor", plan.anchor_secret.cert, plan.anchor_secret.key
            )
        if plan.next_anchor_secret is not None:
            w = plan.next_anchor_secret
            self.next = material("secret cp/next-anchor", w.cert, w.key)
        if plan.delete_next_anchor:
            self.next = None
        if plan.issuer_secret is not None:
            self.issuer = material(
                "secret cp/issuer", plan.issuer_secret.cert, plan.issuer_secret.key
            )
        if plan.bundle is not None:
            self.bundle = plan.bundle
        self.status = plan.status
        return plan

    def bundle_fingerprint(self) -> str:
        return trustbundle.fingerprint(certs(self.bundle))

    def issuer_fingerprint(self) -> str:
        assert self.issuer is not None and self.issuer.cert is not None
        return trustbundle.certificate_fingerprint(certs(self.issuer.cert)[0])


def proxies(bundle: str | None, issuer: str | None, *names: str) -> trustdomain.Census:
    return trustdomain.Census(
        proxies=tuple(trustdomain.ProxyState(name, bundle, issuer) for name in names)
    )


def test_anchor_rotation_runs_its_phases_as_proxies_report() -> None:
    s = spec(
        anchorLifetime="300d",
        anchorRotateBefore="100d",
        issuerLifetime="300d",
        issuerRotateBefore="10d",
    )
    cluster = Cluster(s)
    old_anchor = certs(cluster.anchor.cert or b"")[0]  # type: ignore[union-attr]
    old_bundle, old_issuer = cluster.bundle_fingerprint(), cluster.issuer_fingerprint()
    names = ("shop/web-1", "shop/db-0")

    # Day 150: nothing due yet; the proxies hold the old bundle and leaves of the old issuer.
    quiet = cluster.round(NOW + 150 * DAY, proxies(old_bundle, old_issuer, *names))
    assert quiet.next_anchor_secret is None and quiet.status.phase == trustdomain.Phase.READY

    # Day 201: within anchorRotateBefore. Step 1: a new anchor, trusted beside the old one.
    t1 = NOW + 201 * DAY
    started = cluster.round(t1, proxies(old_bundle, old_issuer, *names))
    assert started.next_anchor_secret is not None and started.anchor_secret is None
    new_anchor = certs(started.next_anchor_secret.cert)[0]
    assert set(certs(cluster.bundle)) == {old_anchor, new_anchor}
    assert started.issuer_secret is None, "the issuer waits until every proxy trusts the anchor"
    assert started.status.phase == trustdomain.Phase.ANCHOR_ADDED
    assert started.status.next_anchor is not None
    new_bundle = cluster.bundle_fingerprint()

    # Step 2: one proxy has loaded the new bundle, the other has not: wait, naming it.
    mixed = trustdomain.Census(
        proxies=(
            trustdomain.ProxyState("shop/web-1", new_bundle, old_issuer),
            trustdomain.ProxyState("shop/db-0", old_bundle, old_issuer),
        )
    )
    waiting = cluster.round(t1 + datetime.timedelta(seconds=30), mixed)
    assert waiting.issuer_secret is None and waiting.anchor_secret is None
    assert waiting.status.phase == trustdomain.Phase.ANCHOR_ADDED
    assert "1 proxy" in (waiting.status.waiting_for or "")
    assert "shop/db-0" in (waiting.status.waiting_for or "")
    assert "shop/web-1" not in (waiting.status.waiting_for or "")
    assert set(certs(waiting.bundle or b"")) == {old_anchor, new_anchor}

    # Step 3: all have it. The issuer moves to the new anchor; proxies are asked to renew.
    t3 = t1 + datetime.timedelta(minutes=1)
    switched = cluster.round(t3, proxies(new_bundle, old_issuer, *names))
    assert switched.issuer_secret is not None
    issuer = pki.Issuer.from_pem(switched.issuer_secret.cert, switched.issuer_secret.key, t3)
    issuer.check([new_anchor], t3)
    with pytest.raises(errors.IssuerError):
        issuer.check([old_anchor], t3)
    assert switched.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    assert switched.renew_leaves_before == t3
    assert set(certs(switched.bundle or b"")) == {old_anchor, new_anchor}
    new_issuer = cluster.issuer_fingerprint()

    # Step 4: one proxy still holds an old leaf; the renewal request repeats for it.
    half = trustdomain.Census(
        proxies=(
            trustdomain.ProxyState("shop/web-1", new_bundle, new_issuer),
            trustdomain.ProxyState("shop/db-0", new_bundle, old_issuer),
        )
    )
    late = cluster.round(t3 + datetime.timedelta(minutes=5), half)
    assert late.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    assert late.issuer_secret is None and late.anchor_secret is None
    assert late.renew_leaves_before == t3 + 2 * trustdomain.RENEW_REPEAT
    assert "shop/db-0" in (late.status.waiting_for or "")

    # Step 5: every leaf is from the new issuer: the new anchor becomes the anchor, alone.
    t5 = t3 + datetime.timedelta(minutes=6)
    done = cluster.round(t5, proxies(new_bundle, new_issuer, *names))
    assert done.anchor_secret is not None and done.delete_next_anchor
    assert certs(done.anchor_secret.cert) == [new_anchor]
    assert certs(done.bundle or b"") == [new_anchor]
    assert done.status.phase == trustdomain.Phase.READY
    assert done.status.next_anchor is None and done.renew_leaves_before is None
    assert done.issuer_secret is None, "the issuer of step 3 stays"
    assert dict(conditions(done))["AnchorExpiring"][0] == "False"

    # And it stays done: no second rotation, nothing more written.
    after = cluster.round(t5 + DAY, proxies(cluster.bundle_fingerprint(), new_issuer, *names))
    assert (after.anchor_secret, after.next_anchor_secret, after.issuer_secret) == (None,) * 3
    assert after.status.phase == trustdomain.Phase.READY


def test_a_proxy_known_to_run_but_silent_holds_the_rotation() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="now")
    fingerprint = cluster.bundle_fingerprint()
    census = trustdomain.Census(
        proxies=(trustdomain.ProxyState("shop/web-1", fingerprint, None),),
        silent=("shop/legacy-0",),
    )
    held = cluster.round(NOW + DAY + datetime.timedelta(minutes=1), census)
    assert held.issuer_secret is None
    assert held.status.phase == trustdomain.Phase.ANCHOR_ADDED
    assert "shop/legacy-0" in (held.status.waiting_for or "")


def test_an_interrupted_rotation_resumes_from_what_is_stored() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="r1")
    t3 = NOW + DAY + datetime.timedelta(minutes=1)
    cluster.round(t3, proxies(cluster.bundle_fingerprint(), None, "a/b"))
    assert cluster.status is not None and cluster.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    # The operator restarts: a new round sees only Secrets and the stored status.
    resumed = cluster.round(
        t3 + datetime.timedelta(minutes=3), proxies(cluster.bundle_fingerprint(), None, "a/b")
    )
    assert resumed.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    assert resumed.status.phase_since == t3.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert resumed.renew_leaves_before == t3 + trustdomain.RENEW_REPEAT
    assert resumed.issuer_secret is None, "the switched issuer is kept, not signed again"
    # Stopped between writing the anchor and deleting the next-anchor Secret: only that is left.
    new_issuer = cluster.issuer_fingerprint()
    done = cluster.round(t3 + datetime.timedelta(minutes=4), proxies(None, new_issuer, "a/b"))
    assert done.delete_next_anchor
    assert cluster.anchor is not None and cluster.next is None
    cluster.next = cluster.anchor  # as if the delete had not happened
    again = cluster.round(t3 + datetime.timedelta(minutes=5))
    assert again.delete_next_anchor and again.anchor_secret is None
    assert again.status.phase == trustdomain.Phase.READY


def test_a_request_is_acted_on_once() -> None:
    cluster = Cluster(spec())
    first_round = cluster.round(NOW + DAY, request="2030-01-02T00:00:00Z")
    assert first_round.next_anchor_secret is not None
    assert first_round.status.rotation_request == "2030-01-02T00:00:00Z"
    cluster.round(NOW + DAY + datetime.timedelta(seconds=1))
    cluster.round(NOW + DAY + datetime.timedelta(seconds=2))
    assert cluster.next is None and cluster.status is not None
    assert cluster.status.phase == trustdomain.Phase.READY
    same = cluster.round(NOW + 2 * DAY, request="2030-01-02T00:00:00Z")
    assert same.next_anchor_secret is None, "the same request value does not rotate again"
    new = cluster.round(NOW + 3 * DAY, request="2030-01-04T00:00:00Z")
    assert new.next_anchor_secret is not None


def test_a_users_anchor_is_not_rotated_and_a_request_says_why() -> None:
    anchor, anchor_key = pki.new_trust_anchor(TD, 300 * DAY, NOW)
    user = material("secret pki/root", pki.to_pem(anchor), None)
    issuer_cert, issuer_key = pki.new_issuer(anchor, anchor_key, TD, 30 * DAY, NOW)
    s = spec(anchorSecretRef={"name": "root", "namespace": "pki"}, issuerSecretRef={"name": "i"})
    state = trustdomain.State(
        user_anchor=user,
        user_issuer=material("secret cp/i", pki.to_pem(issuer_cert), pki.key_to_pem(issuer_key)),
        rotate_request="please",
    )
    plan = trustdomain.plan(s, state, NOW + DAY)
    assert plan.next_anchor_secret is None
    status, reason, message = conditions(plan)["AnchorExpiring"]
    assert (status, reason) == ("True", "CanNotRotate")
    assert "it is yours (secret pki/root)" in message


def test_a_next_anchor_without_its_key_is_refused_with_what_to_do() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="r")
    assert cluster.next is not None
    cluster.next = material(cluster.next.where, cluster.next.cert, None)
    plan = cluster.round(NOW + DAY + datetime.timedelta(seconds=1))
    assert plan.status.phase == trustdomain.Phase.INVALID
    assert "holds no tls.key" in (plan.status.waiting_for or "")
    assert "delete secret cp/next-anchor" in (plan.status.waiting_for or "")
    assert (plan.issuer_secret, plan.anchor_secret, plan.bundle) == (None, None, None)


def test_no_anchor_rotation_while_the_issuer_is_the_users() -> None:
    anchor, anchor_key = pki.new_trust_anchor(TD, 300 * DAY, NOW)
    issuer_cert, issuer_key = pki.new_issuer(anchor, anchor_key, TD, 300 * DAY, NOW)
    s = spec(anchorLifetime="300d", anchorRotateBefore="100d", issuerSecretRef={"name": "mine"})
    state = trustdomain.State(
        anchor=material("secret cp/anchor", pki.to_pem(anchor), pki.key_to_pem(anchor_key)),
        issuer=material("secret cp/issuer", pki.to_pem(issuer_cert), pki.key_to_pem(issuer_key)),
        user_issuer=material("secret cp/mine", pki.to_pem(issuer_cert), pki.key_to_pem(issuer_key)),
    )
    plan = trustdomain.plan(s, state, NOW + 250 * DAY)
    assert plan.next_anchor_secret is None and plan.issuer_secret is None
    status, reason, message = conditions(plan)["AnchorExpiring"]
    assert (status, reason) == ("True", "CanNotRotate")
    assert "the issuer is yours (issuerSecretRef" in message


def test_a_rotation_that_stalls_warns_before_the_anchor_expires() -> None:
    s = spec(
        anchorLifetime="300d",
        anchorRotateBefore="100d",
        issuerLifetime="300d",
        issuerRotateBefore="10d",
    )
    cluster = Cluster(s)
    held = trustdomain.Census(silent=("shop/stuck-0",))
    cluster.round(NOW + 201 * DAY, held)
    early = cluster.round(NOW + 230 * DAY, held)
    assert early.status.phase == trustdomain.Phase.ANCHOR_ADDED and not early.warnings
    late = cluster.round(NOW + 251 * DAY, held)  # past half of the 100-day window
    assert late.status.phase == trustdomain.Phase.ANCHOR_ADDED
    status, reason, message = conditions(late)["AnchorExpiring"]
    assert (status, reason) == ("True", "RotationStalled")
    assert "shop/stuck-0" in message and [w.reason for w in late.warnings] == ["AnchorExpiring"]


def test_the_renewal_request_is_repeated_a_bounded_number_of_times() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="r")
    t3 = NOW + DAY + datetime.timedelta(minutes=1)
    cluster.round(t3, proxies(cluster.bundle_fingerprint(), None, "a/b"))
    old_leaf = proxies(cluster.bundle_fingerprint(), "sha256:" + "0" * 64, "a/b")
    hours_later = cluster.round(t3 + datetime.timedelta(hours=5), old_leaf)
    assert hours_later.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    last = t3 + trustdomain.RENEW_REPEAT * trustdomain.RENEW_REPEATS
    assert hours_later.renew_leaves_before == last


def test_a_refused_round_keeps_the_request_it_acted_on() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="r1")
    assert cluster.next is not None
    cluster.next = material(cluster.next.where, b"not a certificate", cluster.next.key)
    refused = cluster.round(NOW + DAY + datetime.timedelta(seconds=1), request="r1")
    assert refused.status.phase == trustdomain.Phase.INVALID
    assert refused.status.rotation_request == "r1", "a fixed setup must not rotate again"


def test_a_next_anchor_that_signs_the_issuer_is_never_to_be_deleted() -> None:
    cluster = Cluster(spec())
    cluster.round(NOW + DAY, request="r")
    cluster.round(
        NOW + DAY + datetime.timedelta(minutes=1),
        proxies(cluster.bundle_fingerprint(), None, "a/b"),
    )
    assert cluster.status is not None and cluster.status.phase == trustdomain.Phase.ISSUER_SWITCHED
    assert cluster.next is not None
    cluster.next = material(cluster.next.where, cluster.next.cert, None)
    plan = cluster.round(NOW + DAY + datetime.timedelta(minutes=2))
    assert plan.status.phase == trustdomain.Phase.INVALID
    waiting = plan.status.waiting_for or ""
    assert "restore secret cp/next-anchor as it was" in waiting and "do not delete it" in waiting
    assert (plan.issuer_secret, plan.anchor_secret, plan.bundle) == (None, None, None)
