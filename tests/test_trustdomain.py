"""TrustDomain against the real API server and the real operator: material created, published
to meshed namespaces, the issuer rotated under a running identity service, user PKI refused in
words, warnings as Events, and nothing re-created by a restart."""

from __future__ import annotations

import base64
import datetime
import pathlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from cryptography import x509
from kubernetes import client

from meshward.identity import commands, pki, trustdomain
from tests import kubetest
from tests.test_identity_service import (
    IdentityService,
    make_csr,
    meshward,
    name,
    swap,
    token_for,
)

pytestmark = pytest.mark.cluster

TD = "cluster.local"
PREFIX = "t-td-"


def get(custom: client.CustomObjectsApi, td: str) -> dict[str, Any]:
    obj: dict[str, Any] = custom.get_cluster_custom_object(
        trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, td
    )
    return obj


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def wait_status(
    custom: client.CustomObjectsApi,
    td: str,
    check: Callable[[dict[str, Any]], bool],
    what: str,
    operator: kubetest.Operator,
    timeout: float = 30.0,
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = get(custom, td)
        return obj if check(obj) else None

    try:
        return kubetest.wait_for(f"TrustDomain {td}: {what}", probe, timeout)
    except AssertionError as exc:
        status = (get(custom, td).get("status") or {}) if td else {}
        raise AssertionError(f"{exc}\nstatus: {status}\noperator:\n{operator.log_tail()}") from exc


def phase(value: str) -> Callable[[dict[str, Any]], bool]:
    return lambda obj: (obj.get("status") or {}).get("phase") == value


def secret(core: client.CoreV1Api, ns: str, secret_name: str) -> tuple[bytes, bytes, str]:
    s = core.read_namespaced_secret(secret_name, ns)
    data = s.data or {}
    return (
        base64.b64decode(data["tls.crt"]),
        base64.b64decode(data.get("tls.key", "")),
        str(s.metadata.resource_version),
    )


def bundle(core: client.CoreV1Api, ns: str) -> bytes:
    cm = core.read_namespaced_config_map(commands.TRUST_ROOTS, ns)
    return str((cm.data or {})["ca-bundle.crt"]).encode()


def manifest(td: str, **spec: Any) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": trustdomain.API_VERSION,
            "kind": trustdomain.KIND,
            "metadata": {"name": td},
            "spec": {"trustDomain": TD, **spec},
        }
    )


def tls_secret(ns: str, secret_name: str, cert: bytes, key: bytes | None) -> client.V1Secret:
    data = {"tls.crt": base64.b64encode(cert).decode()}
    if key is not None:
        data["tls.key"] = base64.b64encode(key).decode()
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=secret_name, namespace=ns), type="Opaque", data=data
    )


def _clear(core: client.CoreV1Api, custom: client.CustomObjectsApi, root: str) -> None:
    """No TrustDomain of these tests and no trust material in the test operator's namespace."""
    for item in custom.list_cluster_custom_object(
        trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL
    )["items"]:
        if (
            item["metadata"]["name"].startswith(PREFIX)
            or item["metadata"]["name"] == "cluster-local"
        ):
            custom.delete_cluster_custom_object(
                trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, item["metadata"]["name"]
            )
    for delete, what in (
        (core.delete_namespaced_secret, commands.ISSUER_SECRET),
        (core.delete_namespaced_secret, commands.ANCHOR_SECRET),
        (core.delete_namespaced_secret, trustdomain.NEXT_ANCHOR_SECRET),
        (core.delete_namespaced_config_map, commands.TRUST_ROOTS),
    ):
        try:
            delete(what, root)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise


@pytest.fixture
def td(
    operator: kubetest.Operator, core: client.CoreV1Api, custom: client.CustomObjectsApi
) -> Iterator[str]:
    """A fresh TrustDomain name, with the operator's namespace emptied of trust material."""
    _clear(core, custom, operator.root_namespace)
    yield f"{PREFIX}{uuid.uuid4().hex[:6]}"
    _clear(core, custom, operator.root_namespace)


def meshed_namespace(core: client.CoreV1Api, annotated: bool) -> str:
    ns = f"t-td-mesh-{uuid.uuid4().hex[:5]}"
    annotations = {"meshward.io/inject": "enabled"} if annotated else {}
    core.create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, annotations=annotations))
    )
    return ns


def test_material_created_published_and_reported(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    td: str,
) -> None:
    root = operator.root_namespace
    before = meshed_namespace(core, annotated=True)
    after = meshed_namespace(core, annotated=False)
    plain = meshed_namespace(core, annotated=False)
    try:
        kubectl.apply(manifest(td, anchorLifetime="30d", issuerLifetime="2d"))
        obj = wait_status(custom, td, phase("Ready"), "Ready", operator)
        anchor_pem, anchor_key, _ = secret(core, root, commands.ANCHOR_SECRET)
        issuer_pem, issuer_key, _ = secret(core, root, commands.ISSUER_SECRET)
        (anchor,) = pki.load_certificates(anchor_pem)
        assert anchor_key.startswith(b"-----BEGIN PRIVATE KEY-----")
        anchors = pki.load_certificates(bundle(core, root))
        assert anchors == [anchor]
        issuer = pki.Issuer.from_pem(issuer_pem, issuer_key)
        issuer.check(anchors)
        status = obj["status"]
        assert status["anchor"]["serial"] == f"{anchor.serial_number:x}"
        assert status["issuer"]["serial"] == f"{issuer.certificate.serial_number:x}"
        assert status["issuer"]["notAfter"] == issuer.certificate.not_valid_after_utc.strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        left = anchor.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert datetime.timedelta(days=29) < left <= datetime.timedelta(days=30)
        assert conditions(obj)["Ready"]["status"] == "True"
        assert "rotation due" in conditions(obj)["IssuerExpiring"]["message"]
        assert "rotation" in status["waitingFor"]
        # No key material in the ConfigMaps the proxies read.
        assert b"PRIVATE KEY" not in bundle(core, root)

        kubetest.wait_for(
            "the bundle in the namespace annotated before", lambda: bundle(core, before)
        )
        assert pki.load_certificates(bundle(core, before)) == [anchor]
        core.patch_namespace(
            after, {"metadata": {"annotations": {"meshward.io/inject": "enabled"}}}
        )
        kubetest.wait_for(
            "the bundle in the namespace annotated after", lambda: bundle(core, after)
        )
        assert pki.load_certificates(bundle(core, after)) == [anchor]

        # A pod that asks for the proxy itself, in a namespace that does not: its proxy reads
        # the bundle from its own namespace, so the bundle follows it there.
        kubetest.wait_service_account(core, plain)
        kubectl.apply(
            kubetest.pod_manifest(
                plain, "web-0", "web", annotations={"meshward.io/inject": "enabled"}
            )
        )
        stored = core.read_namespaced_pod("web-0", plain)
        assert "meshward-proxy" in [c.name for c in stored.spec.containers]
        kubetest.wait_for(
            "the bundle in the namespace of an injected pod", lambda: bundle(core, plain)
        )
        assert pki.load_certificates(bundle(core, plain)) == [anchor]

        columns = kubectl.run("get", "trustdomain", td).stdout
        assert "Ready" in columns and status["issuer"]["notAfter"] in columns

        # A second TrustDomain is not served, and says which one is.
        second = f"{PREFIX}second-{uuid.uuid4().hex[:4]}"
        kubectl.apply(manifest(second))
        other = wait_status(custom, second, phase("Inactive"), "Inactive", operator)
        assert td in conditions(other)["Ready"]["message"]
        assert secret(core, root, commands.ISSUER_SECRET)[0] == issuer_pem
    finally:
        core.delete_namespace(before)
        core.delete_namespace(after)
        core.delete_namespace(plain)


def test_issuer_rotated_and_identity_service_follows_without_restart(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    td: str,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    root = operator.root_namespace
    kubectl.apply(manifest(td, issuerLifetime="1h"))
    first = wait_status(custom, td, phase("Ready"), "Ready", operator)["status"]

    # Mount the Secret and ConfigMap as the kubelet would: files the service reads.
    mount = tmp_path / "mount"
    mount.mkdir()
    old_pem, old_key, _ = secret(core, root, commands.ISSUER_SECRET)
    swap(mount, {"tls.crt": old_pem, "tls.key": old_key, "ca-bundle.crt": bundle(core, root)})
    svc = IdentityService(kubeconfig, mount, tmp_path / "identity.log")
    svc.start()
    try:
        token = token_for(core, namespace, "web")
        csr, _ = make_csr()
        old = svc.certify(name("web", namespace), token, csr)
        old_leaf = x509.load_der_x509_certificate(old.leaf_certificate)
        old_issuer = x509.load_der_x509_certificate(old.intermediate_certificates[0])

        # The issuer has an hour left; rotating 2 hours before expiry makes it due now.
        kubectl.apply(manifest(td, issuerLifetime="1d", issuerRotateBefore="2h"))
        rotated = wait_status(
            custom,
            td,
            lambda o: (
                (o.get("status") or {}).get("issuer", {}).get("serial") != first["issuer"]["serial"]
            ),
            "a new issuer",
            operator,
        )["status"]
        assert rotated["anchor"] == first["anchor"]
        assert rotated["phase"] in ("IssuerRotating", "Ready")
        new_pem, new_key, _ = secret(core, root, commands.ISSUER_SECRET)
        new = pki.Issuer.from_pem(new_pem, new_key)
        anchors = pki.load_certificates(bundle(core, root))
        new.check(anchors)
        assert rotated["issuer"]["serial"] == f"{new.certificate.serial_number:x}"
        assert new.certificate.issuer == old_issuer.issuer
        left = new.certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
        assert left > datetime.timedelta(hours=23)

        swap(mount, {"tls.key": new_key, "tls.crt": new_pem})

        def from_new_issuer() -> x509.Certificate | None:
            got = svc.certify(name("web", namespace), token, csr)
            chain = [x509.load_der_x509_certificate(c) for c in got.intermediate_certificates]
            leaf = x509.load_der_x509_certificate(got.leaf_certificate)
            return leaf if chain[0] == new.certificate else None

        leaf = kubetest.wait_for("a leaf from the new issuer", from_new_issuer, timeout=20)
        pki.verify_chain(leaf, [new.certificate], anchors)
        pki.verify_chain(old_leaf, [old_issuer], anchors)  # old leaves keep verifying
        assert svc.proc is not None and svc.proc.poll() is None, "no restart"
        settled = wait_status(custom, td, phase("Ready"), "Ready after the rotation", operator)
        assert settled["status"]["issuer"]["serial"] == rotated["issuer"]["serial"]
    finally:
        svc.stop()


def test_user_issuer_from_another_anchor_is_refused_and_nothing_overwritten(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    td: str,
    namespace: str,
) -> None:
    root = operator.root_namespace
    kubectl.apply(manifest(td))
    wait_status(custom, td, phase("Ready"), "Ready", operator)
    anchor_before = secret(core, root, commands.ANCHOR_SECRET)
    issuer_before = secret(core, root, commands.ISSUER_SECRET)
    bundle_before = bundle(core, root)

    users_anchor, _ = pki.new_trust_anchor(TD, datetime.timedelta(days=365))
    other_anchor, other_key = pki.new_trust_anchor(TD, datetime.timedelta(days=365))
    stray, stray_key = pki.new_issuer(other_anchor, other_key, TD, datetime.timedelta(days=30))
    core.create_namespaced_secret(
        namespace, tls_secret(namespace, "root", pki.to_pem(users_anchor), None)
    )
    core.create_namespaced_secret(
        namespace, tls_secret(namespace, "issuer", pki.to_pem(stray), pki.key_to_pem(stray_key))
    )
    kubectl.apply(
        manifest(
            td,
            anchorSecretRef={"name": "root", "namespace": namespace},
            issuerSecretRef={"name": "issuer", "namespace": namespace},
        )
    )
    obj = wait_status(custom, td, phase("Invalid"), "Invalid", operator)
    ready = conditions(obj)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidIssuer")
    assert f"secret {namespace}/issuer" in ready["message"]
    assert "does not chain to the trust anchors" in ready["message"]
    assert obj["status"]["waitingFor"] == ready["message"]
    assert secret(core, root, commands.ANCHOR_SECRET) == anchor_before
    assert secret(core, root, commands.ISSUER_SECRET) == issuer_before
    assert bundle(core, root) == bundle_before


def test_issuer_that_can_not_be_rotated_warns_with_an_event(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    td: str,
    namespace: str,
) -> None:
    """The user's anchor without its key: the issuer, an hour from expiry, can not be renewed."""
    anchor, anchor_key = pki.new_trust_anchor(TD, datetime.timedelta(days=365))
    issuer, issuer_key = pki.new_issuer(anchor, anchor_key, TD, datetime.timedelta(hours=1))
    core.create_namespaced_secret(
        namespace, tls_secret(namespace, "root", pki.to_pem(anchor), None)
    )
    core.create_namespaced_secret(
        namespace, tls_secret(namespace, "issuer", pki.to_pem(issuer), pki.key_to_pem(issuer_key))
    )
    kubectl.apply(
        manifest(
            td,
            issuerRotateBefore="2h",
            anchorSecretRef={"name": "root", "namespace": namespace},
            issuerSecretRef={"name": "issuer", "namespace": namespace},
        )
    )
    obj = wait_status(
        custom,
        td,
        lambda o: conditions(o).get("IssuerExpiring", {}).get("status") == "True",
        "the IssuerExpiring warning",
        operator,
    )
    message = conditions(obj)["IssuerExpiring"]["message"]
    assert "can not be rotated" in message and "issuerSecretRef" in message
    assert obj["status"]["phase"] == "Ready", "still serving until it expires"
    uid = obj["metadata"]["uid"]

    def warning_event() -> list[client.CoreV1Event]:
        events = core.list_namespaced_event(
            "default", field_selector=f"involvedObject.name={td}"
        ).items
        return [e for e in events if e.reason == "IssuerExpiring" and e.involved_object.uid == uid]

    (event,) = kubetest.wait_for("the IssuerExpiring event", warning_event)
    assert event.type == "Warning" and event.message == message
    root = operator.root_namespace
    assert secret(core, root, commands.ISSUER_SECRET)[0] == pki.to_pem(issuer)


def test_operator_restart_does_not_recreate_material(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    td: str,
) -> None:
    root = operator.root_namespace
    kubectl.apply(manifest(td))
    first = wait_status(custom, td, phase("Ready"), "Ready", operator)["status"]
    anchor_before = secret(core, root, commands.ANCHOR_SECRET)
    issuer_before = secret(core, root, commands.ISSUER_SECRET)
    operator.stop()
    try:
        late = meshed_namespace(core, annotated=True)
    finally:
        operator.start()
    try:
        # The bundle reaching a namespace meshed while it was down shows a round has run.
        kubetest.wait_for(
            f"the restarted operator's bundle in {late}\n{operator.log_tail()}",
            lambda: bundle(core, late),
            timeout=60,
        )
        assert secret(core, root, commands.ANCHOR_SECRET) == anchor_before
        assert secret(core, root, commands.ISSUER_SECRET) == issuer_before
        assert get(custom, td)["status"]["issuer"] == first["issuer"]
        admission = client.AdmissionregistrationV1Api(core.api_client)
        kubetest.wait_for(
            "the restarted operator's webhook",
            lambda: admission.read_validating_webhook_configuration(operator.webhook_name),
            timeout=60,
        )
    finally:
        core.delete_namespace(late)


def test_identity_rotate_follows_the_phases_to_a_new_anchor(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    kubeconfig: pathlib.Path,
    td: str,
) -> None:
    """With no proxy to wait for, the phases run through on their own; the command follows them
    and names the anchor it ended with."""
    root = operator.root_namespace
    kubectl.apply(manifest(td))
    wait_status(custom, td, phase("Ready"), "Ready", operator)
    old_anchor = pki.load_certificates(secret(core, root, commands.ANCHOR_SECRET)[0])[0]
    env = {"KUBECONFIG": str(kubeconfig)}
    proc = meshward("identity", "rotate", "--name", td, "--wait", "--timeout", "50s", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr + operator.log_tail()
    (new_anchor,) = pki.load_certificates(secret(core, root, commands.ANCHOR_SECRET)[0])
    assert new_anchor != old_anchor
    assert f"anchor rotation complete: anchor {new_anchor.serial_number:x}" in proc.stdout
    assert "AnchorAdded" in proc.stdout or "IssuerSwitched" in proc.stdout, proc.stdout
    assert pki.load_certificates(bundle(core, root)) == [new_anchor], "the old anchor is gone"
    issuer_pem, issuer_key, _ = secret(core, root, commands.ISSUER_SECRET)
    pki.Issuer.from_pem(issuer_pem, issuer_key).check([new_anchor])
    with pytest.raises(client.exceptions.ApiException) as gone:
        core.read_namespaced_secret(trustdomain.NEXT_ANCHOR_SECRET, root)
    assert gone.value.status == 404
    status = get(custom, td)["status"]
    annotation = get(custom, td)["metadata"]["annotations"][trustdomain.ROTATE_ANNOTATION]
    assert status["rotationRequest"] == annotation and "nextAnchor" not in status
