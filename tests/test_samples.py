"""Every manifest in samples/ applied with kubectl, and the per-namespace document it produces.

Namespaces named in a sample are renamed to unique ones (text substitution, identities included),
so the samples run beside each other and beside a user's cluster; the root namespace keeps its
name because the operator's mesh-wide setting points at it.
"""

from __future__ import annotations

import base64
import pathlib
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client

from meshward import inject
from meshward.identity import commands, pki, trustdomain
from meshward.policy import compiled, decision
from tests import kubetest

pytestmark = pytest.mark.cluster

SAMPLES = kubetest.ROOT / "samples"
TD = "cluster.local"


class Applied:
    """A sample as applied: its namespaces renamed (``rename`` to unique names, ``root`` to the
    test operator's root namespace, which the test run owns)."""

    def __init__(
        self,
        kubectl: kubetest.Kubectl,
        core: client.CoreV1Api,
        sample: str,
        rename: tuple[str, ...],
        root: tuple[str, str] | None = None,
    ) -> None:
        suffix = uuid.uuid4().hex[:5]
        self.names = {ns: f"{ns}-{suffix}" for ns in rename}
        text = (SAMPLES / sample).read_text()
        for old, new in self.names.items():
            text = re.sub(rf"(?<![-\w]){re.escape(old)}(?![-\w])", new, text)
        if root is not None:  # only as a namespace: "meshward" is also in the API group
            text = re.sub(rf"(?<=namespace: ){re.escape(root[0])}(?![-\w.])", root[1], text)
        self.text, self.kubectl, self.core = text, kubectl, core

    def ns(self, original: str) -> str:
        return self.names[original]

    def create_namespaces(self) -> None:
        for name in self.names.values():
            self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    def delete(self) -> None:
        self.kubectl.run(
            "delete", "--ignore-not-found", "--wait=false", "-f", "-", input=self.text, check=False
        )
        for name in self.names.values():
            self.kubectl.run(
                "delete", "namespace", name, "--ignore-not-found", "--wait=false", check=False
            )


ApplySample = Callable[..., Applied]


@pytest.fixture
def apply_sample(
    kubectl: kubetest.Kubectl, core: client.CoreV1Api, operator: kubetest.Operator
) -> Iterator[ApplySample]:
    applied: list[Applied] = []

    def apply(sample: str, rename: tuple[str, ...], create_namespaces: bool = False) -> Applied:
        a = Applied(kubectl, core, sample, rename, root=("meshward", operator.root_namespace))
        applied.append(a)
        if create_namespaces:
            a.create_namespaces()
        kubectl.apply(a.text)
        return a

    yield apply
    for a in applied:
        a.delete()


def identity(sa: str, ns: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


def jail_decisions(doc: compiled.PolicyDocument, ns: str) -> dict[str, bool]:
    policy = decision.Policy(doc)
    results = {}
    for app in ("web-svc", "emoji-svc", "voting-svc"):
        dest = decision.Destination(port=8080, labels={"app": app})
        results[f"{app} from own namespace"] = decision.decide(
            policy, dest, decision.Client(identity(f"{app}-caller", ns), "10.1.2.3", True)
        ).allowed
        results[f"{app} from outsider"] = decision.decide(
            policy, dest, decision.Client(identity("default", "outsider"), "10.1.2.4", True)
        ).allowed
        results[f"{app} plaintext"] = decision.decide(
            policy, dest, decision.Client(None, "10.1.2.5", False)
        ).allowed
    return results


JAIL = {
    f"{app} {who}": who == "from own namespace"
    for app in ("web-svc", "emoji-svc", "voting-svc")
    for who in ("from own namespace", "from outsider", "plaintext")
}


JAIL_SAMPLES = (
    "namespace-jail-server-authorization.yaml",
    "namespace-jail-authorization-policy.yaml",
)


@pytest.mark.parametrize("sample", JAIL_SAMPLES)
def test_namespace_jail(apply_sample: ApplySample, core: client.CoreV1Api, sample: str) -> None:
    applied = apply_sample(sample, ("emojivoto",))
    ns = applied.ns("emojivoto")
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: len(d.servers) == 3 and all(s.rules for s in d.servers),
        "three locked Servers",
    )
    assert {s.name for s in doc.servers} == {"web-http", "emoji-grpc", "voting-grpc"}
    for srv in doc.servers:
        assert srv.access_policy == "deny"
        (rule,) = srv.rules
        assert rule.name == "emojivoto-only"
        assert rule.identities == ((f"*.{ns}.serviceaccount.identity.meshward.{TD}",),)
    assert jail_decisions(doc, ns) == JAIL


def test_peer_authentication_strict_with_exception(
    apply_sample: ApplySample,
    core: client.CoreV1Api,
    kubectl: kubetest.Kubectl,
    operator: kubetest.Operator,
    namespace: str,
) -> None:
    applied = apply_sample(
        "peer-authentication-strict.yaml", ("emojivoto",), create_namespaces=True
    )
    ns = applied.ns("emojivoto")
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: d.mesh_peer_authentication is not None and bool(d.peer_authentications),
        "the mesh-wide and workload PeerAuthentications",
    )
    assert doc.mesh_peer_authentication is not None
    assert (doc.mesh_peer_authentication.name, doc.mesh_peer_authentication.mode) == (
        "default",
        "STRICT",
    )
    policy = decision.Policy(doc)
    legacy, other = {"app": "legacy"}, {"app": "web-svc"}
    assert policy.mtls_mode(decision.Destination(port=8080, labels=other)) == "STRICT"
    assert policy.mtls_mode(decision.Destination(port=8080, labels=legacy)) == "PERMISSIVE"
    assert policy.mtls_mode(decision.Destination(port=9090, labels=legacy)) == "DISABLE"
    plain = decision.Client(None, "10.1.1.1", False)
    refused = decision.decide(policy, decision.Destination(port=8080, labels=other), plain)
    assert not refused.allowed and refused.rule_kind == "PeerAuthentication"
    assert decision.decide(policy, decision.Destination(port=8080, labels=legacy), plain).allowed

    # Every other namespace sees the mesh-wide policy too; removing it lifts STRICT everywhere.
    elsewhere = kubetest.wait_document(
        core, namespace, lambda d: d.mesh_peer_authentication is not None
    )
    assert elsewhere.mesh_peer_authentication is not None
    assert elsewhere.mesh_peer_authentication.namespace == operator.root_namespace
    kubectl.run("delete", "peerauthentication", "default", "-n", operator.root_namespace)
    kubetest.wait_document(
        core, namespace, lambda d: d.mesh_peer_authentication is None, "STRICT lifted"
    )


def test_deny_with_probes(
    apply_sample: ApplySample, core: client.CoreV1Api, kubectl: kubetest.Kubectl
) -> None:
    applied = apply_sample("deny-with-probes.yaml", ("payments",))
    ns = applied.ns("payments")
    kubetest.wait_service_account(core, ns)
    kubectl.apply(
        kubetest.pod_manifest(
            ns, "payments-api-0", "payments-api", probes={"livenessProbe": ("/live", "admin")}
        )
    )
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: "payments-api-0" in d.pods and any(s.rules for s in d.servers),
        "pod and Server",
    )
    assert doc.default_policy == "deny"
    policy = decision.Policy(doc)
    api = decision.Destination(port=8080, pod="payments-api-0")
    admin = decision.Destination(port=9990, pod="payments-api-0")
    office = decision.decide(policy, api, decision.Client(None, "10.20.1.5", False))
    assert office.allowed and (office.rule_kind, office.rule_name) == (
        "AuthorizationPolicy",
        "payments-api-from-office",
    )
    assert not decision.decide(policy, api, decision.Client(None, "10.20.99.5", False)).allowed
    assert not decision.decide(policy, api, decision.Client(None, "192.168.1.1", False)).allowed
    kubelet = decision.Client(None, "10.0.0.1", False)
    probe = decision.decide(policy, admin, kubelet, decision.Request("GET", "/live"))
    assert probe.allowed and (probe.rule_kind, probe.rule_name) == (
        "AuthorizationPolicy",
        "probes-from-kubelet",
    )
    # The probe port is the nodes' only: the office, and the nodes on the API port, are refused.
    assert not decision.decide(policy, admin, decision.Client(None, "10.20.1.5", False)).allowed
    assert not decision.decide(policy, api, kubelet, decision.Request("GET", "/live")).allowed


def test_injected_namespace(
    apply_sample: ApplySample, core: client.CoreV1Api, injector: inject.Settings
) -> None:
    """The Deployment's pod, created by its ReplicaSet (a controller, as in a real cluster),
    is stored with the proxy."""
    applied = apply_sample("injected-namespace.yaml", ("booksapp",))
    ns = applied.ns("booksapp")
    (pod,) = kubetest.wait_for(
        "the webapp Deployment's pod",
        lambda: core.list_namespaced_pod(ns, label_selector="app=webapp").items,
        timeout=60,
    )
    assert [c.name for c in pod.spec.containers] == ["meshward-proxy", "webapp"]
    assert [c.name for c in pod.spec.init_containers] == ["meshward-init"]
    assert pod.spec.containers[0].image == injector.image
    assert pod.metadata.annotations[inject.VERSION_ANNOTATION] == injector.version


def test_trust_domain(
    apply_sample: ApplySample,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    operator: kubetest.Operator,
) -> None:
    """The operator creates the anchor and issuer and publishes the bundle; status says when
    each expires."""
    apply_sample("trustdomain.yaml", ())

    def ready() -> dict[str, Any] | None:
        obj: dict[str, Any] = custom.get_cluster_custom_object(
            trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, "cluster-local"
        )
        return obj["status"] if (obj.get("status") or {}).get("phase") == "Ready" else None

    status = kubetest.wait_for(f"TrustDomain cluster-local Ready\n{operator.log_tail()}", ready)
    root = operator.root_namespace
    issuer = core.read_namespaced_secret(commands.ISSUER_SECRET, root).data
    roots = core.read_namespaced_config_map(commands.TRUST_ROOTS, root).data
    anchors = pki.load_certificates(roots["ca-bundle.crt"].encode())
    loaded = pki.Issuer.from_pem(
        base64.b64decode(issuer["tls.crt"]), base64.b64decode(issuer["tls.key"])
    )
    loaded.check(anchors)
    assert status["issuer"]["serial"] == f"{loaded.certificate.serial_number:x}"
    assert status["anchor"]["serial"] in {f"{a.serial_number:x}" for a in anchors}


def test_every_sample_is_applied_by_a_test() -> None:
    """A sample added without a test applying it fails here."""
    source = pathlib.Path(__file__).read_text()
    applied = set(re.findall(r'apply_sample\(\s*"([^"]+\.yaml)"', source)) | set(JAIL_SAMPLES)
    assert {p.name for p in SAMPLES.glob("*.yaml")} <= applied
