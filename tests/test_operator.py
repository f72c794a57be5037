"""The operator against a real API server: documents, status, admission, restarts."""

from __future__ import annotations

import signal
import textwrap
import time

import pytest
from kubernetes import client

from meshward.policy import compiled
from tests import kubetest

pytestmark = pytest.mark.cluster

TD = "cluster.local"


def server(ns: str, name: str = "web-http", port: int | str = 8080, app: str = "web") -> str:
    return textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: Server
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          podSelector: {{matchLabels: {{app: {app}}}}}
          port: {port}
          proxyProtocol: HTTP/1
    """)


def authorization(ns: str, name: str, server_name: str, identity: str) -> str:
    return textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: ServerAuthorization
        metadata: {{name: {name}, namespace: {ns}}}
        spec:
          server: {{name: {server_name}}}
          client:
            meshTLS:
              identities: ["{identity}"]
    """)


def conditions(
    custom: client.CustomObjectsApi, ns: str, plural: str, name: str
) -> dict[str, dict[str, str]]:
    obj = custom.get_namespaced_custom_object("policy.meshward.io", "v1alpha1", ns, plural, name)
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def rules(doc: compiled.PolicyDocument, server_name: str) -> list[compiled.Rule]:
    return [r for s in doc.servers if s.name == server_name for r in s.rules]


def test_every_namespace_gets_a_document(
    operator: kubetest.Operator, core: client.CoreV1Api, namespace: str
) -> None:
    doc = kubetest.wait_document(core, namespace)
    assert doc.namespace == namespace
    assert doc.default_policy == "all-unauthenticated"
    assert doc.servers == ()
    assert doc.hash == doc.content_hash()


def test_updates_and_deletes_propagate(
    operator: kubetest.Operator, kubectl: kubetest.Kubectl, core: client.CoreV1Api, namespace: str
) -> None:
    ns = namespace
    kubectl.apply(
        server(ns)
        + "---"
        + authorization(
            ns, "web-from-ns", "web-http", f"*.{ns}.serviceaccount.identity.meshward.{TD}"
        )
    )
    doc = kubetest.wait_document(
        core, ns, lambda d: bool(rules(d, "web-http")), "Server web-http with a rule"
    )
    (rule,) = rules(doc, "web-http")
    assert (rule.kind, rule.name) == ("ServerAuthorization", "web-from-ns")
    assert rule.identities == ((f"*.{ns}.serviceaccount.identity.meshward.{TD}",),)

    kubectl.apply(
        authorization(
            ns, "web-from-ns", "web-http", f"vote-bot.{ns}.serviceaccount.identity.meshward.{TD}"
        )
    )
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: any(
            "vote-bot" in i for r in rules(d, "web-http") for g in r.identities for i in g
        ),
        "the updated identity",
    )
    assert len(rules(doc, "web-http")) == 1

    kubectl.run("delete", "serverauthorization", "web-from-ns", "-n", ns)
    doc = kubetest.wait_document(
        core, ns, lambda d: d.servers != () and not rules(d, "web-http"), "the rule removed"
    )
    assert [s.name for s in doc.servers] == ["web-http"]

    kubectl.run("delete", "server", "web-http", "-n", ns)
    kubetest.wait_document(core, ns, lambda d: d.servers == (), "the Server removed")


def test_invalid_resources_are_refused_with_the_reason(
    operator: kubetest.Operator, kubectl: kubetest.Kubectl, namespace: str
) -> None:
    both = textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: ServerAuthorization
        metadata: {{name: both, namespace: {namespace}}}
        spec:
          server: {{name: web-http}}
          client:
            unauthenticated: true
            meshTLS: {{identities: ["*"]}}
    """)
    proc = kubectl.apply(both, check=False)
    assert proc.returncode != 0
    assert "set exactly one of meshTLS or unauthenticated" in proc.stderr

    bad_except = textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: NetworkAuthentication
        metadata: {{name: office, namespace: {namespace}}}
        spec:
          networks: [{{cidr: 10.1.0.0/16, except: [10.2.0.0/24]}}]
    """)
    proc = kubectl.apply(bad_except, check=False)
    assert proc.returncode != 0
    assert "does not lie inside cidr" in proc.stderr

    proc = kubectl.apply(server(namespace, port=0), check=False)
    assert proc.returncode != 0
    assert "spec.port" in proc.stderr


def test_status_says_what_is_wrong_and_recovers(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    ns = namespace
    kubectl.apply(authorization(ns, "orphan", "missing-server", "*"))
    cond = kubetest.wait_for(
        "ResolvedRefs=False on the orphan authorization",
        lambda: (
            (c := conditions(custom, ns, "serverauthorizations", "orphan"))
            .get("ResolvedRefs", {})
            .get("status")
            == "False"
            and c
        ),
    )
    assert "missing-server" in cond["ResolvedRefs"]["message"]

    kubectl.apply(server(ns, name="missing-server"))
    cond = kubetest.wait_for(
        "ResolvedRefs=True once the Server exists",
        lambda: (
            (c := conditions(custom, ns, "serverauthorizations", "orphan"))
            .get("ResolvedRefs", {})
            .get("status")
            == "True"
            and c
        ),
    )
    assert cond["Accepted"]["status"] == "True"


PROBES = {"readinessProbe": ("/ready", "admin"), "livenessProbe": ("/live", 9990)}


def test_pods_named_ports_probes_and_annotations(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    ns = namespace
    kubetest.wait_service_account(core, ns)
    kubectl.run("annotate", "namespace", ns, "config.meshward.io/default-inbound-policy=deny")
    kubectl.apply(
        kubetest.pod_manifest(
            ns,
            "web-0",
            "web",
            annotations={"config.meshward.io/default-inbound-policy": "all-authenticated"},
            probes=PROBES,
        )
        + "\n---\n"
        + kubetest.pod_manifest(ns, "other-0", "other", probes=PROBES)
        + "\n---\n"
        + server(ns, port="http")
    )
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: {"web-0", "other-0"} <= set(d.pods) and d.default_policy == "deny",
        "both pods",
    )
    web = doc.pods["web-0"]
    assert web.ports == {"http": 8080, "admin": 9990}
    assert {(p.port, p.path) for p in web.probes} == {(9990, "/ready"), (9990, "/live")}
    assert web.default_policy == "all-authenticated"
    assert doc.pods["other-0"].default_policy is None
    cond = kubetest.wait_for(
        "Server web-http resolved",
        lambda: (
            (c := conditions(custom, ns, "servers", "web-http"))
            .get("ResolvedRefs", {})
            .get("status")
            == "True"
            and c
        ),
    )
    assert cond["Accepted"]["status"] == "True"

    kubectl.run("delete", "pod", "web-0", "-n", ns, "--grace-period=0", "--force")
    doc = kubetest.wait_document(core, ns, lambda d: "web-0" not in d.pods, "the deleted pod gone")
    assert "other-0" in doc.pods


def test_an_edited_document_is_restored(
    operator: kubetest.Operator, kubectl: kubetest.Kubectl, core: client.CoreV1Api, namespace: str
) -> None:
    kubectl.apply(server(namespace))
    original = kubetest.wait_document(core, namespace, lambda d: bool(d.servers))
    core.patch_namespaced_config_map(
        compiled.CONFIGMAP_NAME, namespace, {"data": {compiled.CONFIGMAP_KEY: "{}"}}
    )
    restored = kubetest.wait_document(
        core, namespace, lambda d: d.hash == original.hash, "the document restored"
    )
    assert restored.servers == original.servers
    core.delete_namespaced_config_map(compiled.CONFIGMAP_NAME, namespace)
    kubetest.wait_document(
        core, namespace, lambda d: d.hash == original.hash, "the document recreated"
    )


def test_restart_half_way_converges_to_the_same_document(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    custom: client.CustomObjectsApi,
    namespace: str,
) -> None:
    ns = namespace
    first = server(ns) + "---" + authorization(ns, "a", "web-http", "*")
    second = (
        server(ns, name="admin", port=9990)
        + "---"
        + authorization(ns, "b", "admin", f"ops.{ns}.serviceaccount.identity.meshward.{TD}")
    )
    kubectl.apply(first + "---" + second)
    reference = kubetest.wait_document(
        core, ns, lambda d: len(d.servers) == 2 and all(s.rules for s in d.servers)
    )
    kubectl.run("delete", "servers,serverauthorizations", "--all", "-n", ns)
    kubetest.wait_document(core, ns, lambda d: not d.servers, "policy emptied")

    operator.stop(signal.SIGKILL)
    try:
        kubectl.apply(first)
        operator.start()
        time.sleep(1.5)  # killed while starting up: listing, compiling or writing
        operator.stop(signal.SIGKILL)
        operator.start()
        kubetest.wait_document(
            core, ns, lambda d: len(d.servers) == 1, "the first half", timeout=60
        )
        operator.stop(signal.SIGKILL)
        kubectl.apply(second)
        broken = textwrap.dedent(f"""
            apiVersion: policy.meshward.io/v1alpha1
            kind: ServerAuthorization
            metadata: {{name: broken, namespace: {ns}}}
            spec:
              server: {{name: web-http}}
              client: {{unauthenticated: true, meshTLS: {{identities: ["*"]}}}}
        """)
        # With the operator (and so its webhook) down, failurePolicy Ignore lets this through:
        # the restarted operator must report it and leave it out, without disturbing the rest.
        kubectl.apply(broken)
    finally:
        operator.start()
    doc = kubetest.wait_document(
        core, ns, lambda d: d.hash == reference.hash, "the same document as before", timeout=60
    )
    assert [s.name for s in doc.servers] == ["admin", "web-http"]
    cond = kubetest.wait_for(
        "the broken authorization reported",
        lambda: (
            (c := conditions(custom, ns, "serverauthorizations", "broken"))
            .get("Accepted", {})
            .get("status")
            == "False"
            and c
        ),
    )
    assert "exactly one of meshTLS or unauthenticated" in cond["Accepted"]["message"]
    assert operator.alive()


def test_kopf_run_entry_point(
    operator: kubetest.Operator, kubectl: kubetest.Kubectl, core: client.CoreV1Api, namespace: str
) -> None:
    """``kopf run -m meshward.operator --all-namespaces`` is the same operator."""
    operator.stop()
    try:
        operator.start(("-m", "kopf", "run", "-m", "meshward.operator", "--all-namespaces"))
        kubectl.apply(server(namespace))
        doc = kubetest.wait_document(
            core, namespace, lambda d: bool(d.servers), "a document from kopf run", timeout=60
        )
        assert [s.name for s in doc.servers] == ["web-http"]
        refused = kubectl.apply(server(namespace, name="zero", port=0), check=False)
        assert refused.returncode != 0
    finally:
        operator.stop()
        operator.start()
