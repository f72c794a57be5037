"""``meshward install`` / ``uninstall``: what they render, and that it works on a real control
plane: applied cleanly (twice), least privilege proven with ``kubectl auth can-i`` and by running
each component with nothing but its own ServiceAccount, and removed again.

The cluster tests use a control plane of their own (``meshward.devcluster``), not the session's:
an install is cluster-wide (CRDs, RBAC, a TrustDomain, webhook configurations) and uninstall may
delete CRDs other tests need.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import os
import pathlib
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from kubernetes import client, config

from meshward import devcluster
from meshward.identity import commands, pki, trustdomain
from meshward.identity._proto import identity_pb2, identity_pb2_grpc
from meshward.operator import _settings
from meshward.policy import compiled
from tests import kubetest
from tests.test_identity_service import (
    IdentityService,
    init_trust,
    make_csr,
    meshward,
    token_for,
)

ROOT = kubetest.ROOT
CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))
NAMESPACED = {"ServiceAccount", "Role", "RoleBinding", "Service", "Deployment", "Secret"}
NAMESPACED |= {"ConfigMap"}


def render(*args: str) -> list[dict[str, Any]]:
    proc = meshward(*args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


@pytest.fixture(scope="module")
def default_text() -> str:
    """``meshward install`` with no flags, as printed."""
    proc = meshward("install")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture
def default_docs(default_text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(default_text) if d is not None]


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} documents"
    return found[0]


def container(docs: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    spec = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
    assert len(spec["containers"]) == 1
    result: dict[str, Any] = spec["containers"][0]
    return result


def env_of(docs: list[dict[str, Any]], deployment: str) -> dict[str, str]:
    """The container's literal environment (fieldRef values left out)."""
    return {e["name"]: e["value"] for e in container(docs, deployment)["env"] if "value" in e}


def flag(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def rules(docs: list[dict[str, Any]], kind: str, name: str) -> set[tuple[str, str, str, str]]:
    """(group, resource, verb, resourceName or "") for every grant of a role."""
    out = set()
    for rule in find(docs, kind, name)["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for res_name in rule.get("resourceNames") or [""]:
                        out.add((group, resource, verb, res_name))
    return out


# -- rendering -------------------------------------------------------------------------------

POLICY_KINDS = (
    "servers",
    "serverauthorizations",
    "authorizationpolicies",
    "meshtlsauthentications",
    "networkauthentications",
    "peerauthentications",
)
WEBHOOK_NAME = "operator.meshward.io"
OPERATOR_CLUSTER_RULES = (
    {("", "namespaces", verb, "") for verb in ("get", "list", "watch")}
    | {("", "pods", verb, "") for verb in ("list", "watch")}
    | {("", "configmaps", v, "") for v in ("list", "watch", "create")}
    | {
        ("", "configmaps", v, name)
        for v in ("get", "update")
        for name in (compiled.CONFIGMAP_NAME, commands.TRUST_ROOTS)
    }
    | {("", "events", "create", "")}
    | {("policy.meshward.io", kind, v, "") for kind in POLICY_KINDS for v in ("list", "watch")}
    | {("policy.meshward.io", f"{kind}/status", "patch", "") for kind in POLICY_KINDS}
    | {("identity.meshward.io", "trustdomains", v, "") for v in ("list", "watch", "create")}
    | {("identity.meshward.io", "trustdomains/status", "patch", "")}
    | {
        ("admissionregistration.k8s.io", kind, "create", "")
        for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")
    }
    | {
        ("admissionregistration.k8s.io", kind, "patch", WEBHOOK_NAME)
        for kind in ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")
    }
    | {
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", v, "")
        for v in ("list", "watch")
    }
    | {("apiextensions.k8s.io", "customresourcedefinitions", v, "") for v in ("list", "watch")}
)


def test_rbac_is_exactly_what_each_component_calls(default_docs: list[dict[str, Any]]) -> None:
    docs = default_docs
    assert rules(docs, "ClusterRole", "meshward-identity") == {
        ("authentication.k8s.io", "tokenreviews", "create", "")
    }
    assert rules(docs, "ClusterRole", "meshward-policy") == {
        ("", "configmaps", "list", compiled.CONFIGMAP_NAME),
        ("", "configmaps", "watch", compiled.CONFIGMAP_NAME),
        ("", "pods", "list", ""),
        ("", "pods", "watch", ""),
        ("", "services", "list", ""),
        ("", "services", "watch", ""),
        ("discovery.k8s.io", "endpointslices", "list", ""),
        ("discovery.k8s.io", "endpointslices", "watch", ""),
    }
    assert rules(docs, "Role", "meshward-policy") == {
        ("", "configmaps", verb, "") for verb in ("get", "create", "update", "delete")
    }
    assert rules(docs, "ClusterRole", "meshward-operator") == OPERATOR_CLUSTER_RULES
    role = find(docs, "Role", "meshward-operator")
    assert role["metadata"]["namespace"] == "meshward"
    assert rules(docs, "Role", "meshward-operator") == {
        ("", "secrets", "get", ""),
        ("", "secrets", "create", ""),
        ("", "secrets", "update", commands.ANCHOR_SECRET),
        ("", "secrets", "update", commands.ISSUER_SECRET),
        ("", "secrets", "update", trustdomain.NEXT_ANCHOR_SECRET),
        ("", "secrets", "delete", trustdomain.NEXT_ANCHOR_SECRET),
    }
    roles = [d for d in docs if d["kind"] in ("ClusterRole", "Role")]
    assert [(d["kind"], d["metadata"]["name"]) for d in roles] == [
        ("ClusterRole", "meshward-operator"),
        ("Role", "meshward-operator"),
        ("ClusterRole", "meshward-identity"),
        ("ClusterRole", "meshward-policy"),
        ("Role", "meshward-policy"),
    ]
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), (role["metadata"]["name"], rule)
    for binding in (d for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        name = binding["metadata"]["name"]
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": name, "namespace": "meshward"}
        ]


def test_every_rule_is_explained_above_its_role(default_text: str) -> None:
    for chunk in default_text.split("\n---\n"):
        body = yaml.safe_load(chunk)
        if body["kind"] not in ("ClusterRole", "Role"):
            continue
        explained: list[str] = []
        for line in chunk.splitlines():
            if line.startswith("# - "):
                explained.append(line[4:])
            elif line.startswith("#   "):
                explained[-1] += " " + line[4:]
        assert len(explained) == len(body["rules"]), chunk
        for item, rule in zip(explained, body["rules"], strict=True):
            granted = f"{', '.join(rule['verbs'])} "
            granted += f"{rule['apiGroups'][0]}/" if rule["apiGroups"][0] else ""
            granted += ", ".join(rule["resources"])
            assert item.startswith(granted), (item, granted)
            why = item.split(": ", 1)[1]
            assert len(why.split()) >= 4, item


def test_order_applies_on_an_empty_cluster_and_crds_are_the_packaged_files(
    default_docs: list[dict[str, Any]],
) -> None:
    docs = default_docs
    kinds = [d["kind"] for d in docs]
    assert kinds[: len(CRD_FILES)] == ["CustomResourceDefinition"] * len(CRD_FILES)
    assert docs[: len(CRD_FILES)] == [yaml.safe_load(f.read_text()) for f in CRD_FILES]
    assert kinds[len(CRD_FILES)] == "Namespace"
    assert "TrustDomain" not in kinds, "no custom resource: one apply creates everything"
    first = {kind: kinds.index(kind) for kind in reversed(kinds)}
    assert first["ServiceAccount"] < first["ClusterRoleBinding"] < first["Deployment"]
    assert first["Service"] < first["Deployment"]
    for doc in docs:
        if doc["kind"] in NAMESPACED:
            assert doc["metadata"]["namespace"] == "meshward", doc["metadata"]
        else:
            assert "namespace" not in doc["metadata"], doc["metadata"]
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names))
    crds_only = meshward("install", "--crds").stdout
    assert crds_only == "---\n".join(f.read_text() for f in CRD_FILES)


def test_components_agree_on_addresses_names_and_image() -> None:
    image = "registry.example/mesh/meshward:1.2.3"
    docs = render(
        "install",
        "--namespace",
        "mesh-system",
        "--trust-domain",
        "example.org",
        "--image",
        image,
        "--webhook-name",
        "hooks.example.org",
    )
    env = env_of(docs, "meshward-operator")
    operator = _settings.from_env(
        {**env, "MESHWARD_WEBHOOK_HOST": "10.1.2.3"}  # the pod IP, from the downward API
    )
    assert operator.policy.root_namespace == "mesh-system"
    assert operator.policy.trust_domain == "example.org"
    assert operator.webhook_name == "hooks.example.org"
    host_ref = [e for e in container(docs, "meshward-operator")["env"] if "valueFrom" in e]
    assert host_ref == [
        {
            "name": "MESHWARD_WEBHOOK_HOST",
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        }
    ]
    injector = operator.injector
    assert injector.image == image
    for svc, addr, tls_name in (
        ("meshward-identity", injector.identity_svc_addr, injector.identity_svc_name),
        ("meshward-policy", injector.policy_svc_addr, injector.policy_svc_name),
    ):
        service = find(docs, "Service", svc)
        host, port = addr.rsplit(":", 1)
        assert host == f"{svc}.mesh-system.svc"
        assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
        served = container(docs, svc)
        assert served["image"] == image
        grpc_port = [p for p in served["ports"] if p["name"] == "grpc"]
        assert grpc_port == [{"name": "grpc", "containerPort": int(port)}]
        assert (
            service["spec"]["selector"]
            == (find(docs, "Deployment", svc)["spec"]["template"]["metadata"]["labels"])
        )
        assert flag(served["command"], "--server-name") == [tls_name]
        assert tls_name == pki.Identity("mesh-system", svc, "example.org").dns_name
        assert flag(served["command"], "--trust-domain") == ["example.org"]
    assert container(docs, "meshward-operator")["image"] == image
    for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"):
        assert "webhooks" not in find(docs, kind, "hooks.example.org")
    patch = rules(docs, "ClusterRole", "meshward-operator-mesh-system")
    assert (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "patch",
        "hooks.example.org",
    ) in patch
    env = {e["name"]: e.get("value") for e in container(docs, "meshward-operator")["env"]}
    assert env["MESHWARD_TRUST_DOMAIN_RESOURCE"] == "mesh-system"  # the TrustDomain it creates
    assert env["MESHWARD_TRUST_DOMAIN"] == "example.org"
    cluster_scoped = [
        d["metadata"]["name"] for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")
    ]
    assert cluster_scoped and all(n.endswith("-mesh-system") for n in cluster_scoped)


def test_every_container_runs_unprivileged_and_mounts_what_its_flags_read(
    default_docs: list[dict[str, Any]],
) -> None:
    docs = default_docs
    for deployment in ("meshward-operator", "meshward-identity", "meshward-policy"):
        pod = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] == deployment
        assert pod["securityContext"]["runAsNonRoot"] is True
        c = container(docs, deployment)
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert c["command"][0] == "meshward"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts.values()) == set(volumes)
        if deployment == "meshward-operator":
            assert mounts[env_of(docs, deployment)["MESHWARD_WEBHOOK_CERT_DIR"]] == "webhook-cert"
            continue
        issuer_dir = flag(c["command"], "--issuer-dir")[0]
        anchors = pathlib.PurePosixPath(flag(c["command"], "--trust-anchors")[0])
        assert volumes[mounts[issuer_dir]]["secret"]["secretName"] == commands.ISSUER_SECRET
        roots = volumes[mounts[str(anchors.parent)]]["configMap"]["name"]
        assert roots == commands.TRUST_ROOTS and anchors.name == "ca-bundle.crt"
        assert c["readinessProbe"]["httpGet"]["path"] == "/ready"


def test_user_trust_material_is_rendered_as_identity_init_writes_it(
    tmp_path: pathlib.Path,
) -> None:
    trust = init_trust(tmp_path / "pki")
    proc = meshward(
        "install",
        "--identity-trust-anchors-file",
        str(trust / "ca-bundle.crt"),
        "--identity-issuer-certificate-file",
        str(trust / "tls.crt"),
        "--identity-issuer-key-file",
        str(trust / "tls.key"),
    )
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    roots = find(docs, "ConfigMap", commands.TRUST_ROOTS)
    assert roots["data"] == {"ca-bundle.crt": (trust / "ca-bundle.crt").read_text()}
    issuer = find(docs, "Secret", commands.ISSUER_SECRET)
    assert issuer["type"] == "kubernetes.io/tls"
    assert issuer["stringData"] == {
        "tls.crt": (trust / "tls.crt").read_text(),
        "tls.key": (trust / "tls.key").read_text(),
    }
    anchor = find(docs, "Secret", commands.ANCHOR_SECRET)
    assert anchor["stringData"] == {"tls.crt": (trust / "ca-bundle.crt").read_text()}
    assert "anchor.key" not in proc.stdout and (trust / "anchor.key").read_text() not in proc.stdout
    # The operator, given exactly these Secrets, serves them and writes nothing (for the
    # TrustDomain it creates: the trust domain, default lifetimes).
    plan = trustdomain.plan(
        trustdomain.TrustDomainSpec.model_validate({"trustDomain": "cluster.local"}),
        trustdomain.State(
            anchor=trustdomain.Material("anchor", anchor["stringData"]["tls.crt"].encode(), None),
            issuer=trustdomain.Material(
                "issuer",
                issuer["stringData"]["tls.crt"].encode(),
                issuer["stringData"]["tls.key"].encode(),
            ),
        ),
        datetime.datetime.now(datetime.UTC),
    )
    assert plan.status.phase == trustdomain.Phase.READY
    assert plan.issuer_secret is None and plan.anchor_secret is None


def test_user_trust_material_that_would_not_serve_is_refused_in_words(
    tmp_path: pathlib.Path,
) -> None:
    one, other = init_trust(tmp_path / "one"), init_trust(tmp_path / "other")

    def install(anchors: pathlib.Path, cert: pathlib.Path, key: pathlib.Path | None) -> str:
        args = [
            "install",
            "--identity-trust-anchors-file",
            str(anchors),
            "--identity-issuer-certificate-file",
            str(cert),
        ]
        if key is not None:
            args += ["--identity-issuer-key-file", str(key)]
        proc = meshward(*args)
        assert proc.returncode == 1 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("meshward: error: "), proc.stderr
        return lines[0]

    error = install(one / "ca-bundle.crt", one / "tls.crt", None)
    assert "needs all three" in error and "--identity-issuer-key-file" in error
    error = install(other / "ca-bundle.crt", one / "tls.crt", one / "tls.key")
    assert "does not chain to the trust anchors" in error and "meshward identity inspect" in error
    error = install(one / "ca-bundle.crt", one / "tls.crt", one / "missing.key")
    assert "--identity-issuer-key-file" in error and "missing.key" in error
    (tmp_path / "not-pem").write_text("hello\n")
    error = install(tmp_path / "not-pem", one / "tls.crt", one / "tls.key")
    assert "--identity-trust-anchors-file" in error and "no PEM" in error
    error = install(one / "ca-bundle.crt", one / "tls.crt", other / "tls.key")
    assert "key" in error and "can not be served" in error


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("--namespace", "Mesh_System"), "--namespace 'Mesh_System' is not a namespace name"),
        (("--image", "two words"), "--image 'two words' is not an image reference"),
        (("--trust-domain", "Not A Domain"), "--trust-domain"),
        (("--webhook-name", "Bad_Name"), "--webhook-name 'Bad_Name' is not a DNS name"),
    ],
)
def test_bad_flags_are_one_line_saying_what_to_use(args: tuple[str, ...], words: str) -> None:
    proc = meshward("install", *args)
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


def test_uninstall_renders_access_first_and_keeps_the_crds_unless_asked() -> None:
    proc = meshward("uninstall")
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ClusterRoleBinding", "meshward-operator"),
        ("ClusterRoleBinding", "meshward-identity"),
        ("ClusterRoleBinding", "meshward-policy"),
        ("ValidatingWebhookConfiguration", WEBHOOK_NAME),
        ("MutatingWebhookConfiguration", WEBHOOK_NAME),
        ("TrustDomain", "meshward"),
        ("Namespace", "meshward"),
        ("ClusterRole", "meshward-operator"),
        ("ClusterRole", "meshward-identity"),
        ("ClusterRole", "meshward-policy"),
    ]
    assert "keeps" in proc.stderr and "--crds" in proc.stderr
    assert "app.kubernetes.io/managed-by=meshward-operator" in proc.stderr
    with_crds = [d for d in yaml.safe_load_all(meshward("uninstall", "--crds").stdout) if d]
    crd_names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in CRD_FILES]
    assert [d["metadata"]["name"] for d in with_crds[-len(CRD_FILES) :]] == crd_names
    assert "TrustDomain" not in [d["kind"] for d in with_crds]


# -- on a control plane of our own -----------------------------------------------------------


@dataclasses.dataclass
class Plane:
    """A private control plane with meshward installed (``meshward install`` defaults)."""

    kubeconfig: pathlib.Path
    kubectl: kubetest.Kubectl
    api: client.ApiClient
    first_apply: list[subprocess.CompletedProcess[str]]
    docs: list[dict[str, Any]]

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def install(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        rendered = meshward("install", *args)
        assert rendered.returncode == 0, rendered.stderr
        return self.kubectl.apply(rendered.stdout, check=check)


@dataclasses.dataclass
class Running:
    proc: subprocess.Popen[bytes]
    admin_port: int
    log: pathlib.Path

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/ready"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    directory = tmp_path_factory.mktemp("install-plane")
    cluster = devcluster.up(directory / "cp")
    try:
        started = start_plane(cluster.kubeconfig)
        yield started
        started.api.close()
    finally:
        devcluster.down(directory / "cp")


def start_plane(kubeconfig: pathlib.Path) -> Plane:
    """Install with the documented command, on a control plane that has never seen meshward;
    keep what kubectl said."""
    kubectl = kubetest.Kubectl(kubeconfig)
    rendered = meshward("install")
    assert rendered.returncode == 0, rendered.stderr
    applied = [kubectl.apply(rendered.stdout, check=False)]
    docs = render("install")
    api = config.new_client_from_config(config_file=str(kubeconfig))
    return Plane(kubeconfig, kubectl, api, applied, docs)


def sa_kubeconfig(plane: Plane, sa: str, path: pathlib.Path) -> pathlib.Path:
    """A kubeconfig for the same cluster that authenticates as ServiceAccount meshward/<sa>."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=[devcluster._cluster.SERVICE_ACCOUNT_ISSUER], expiration_seconds=3600
        )
    )
    token = plane.core.create_namespaced_service_account_token(sa, "meshward", request)
    kubeconfig = kubetest.read_kubeconfig(plane.kubeconfig)
    kubeconfig["users"] = [{"name": "admin", "user": {"token": token.status.token}}]
    kubetest.write_kubeconfig(path, kubeconfig)
    return path


def operator_as_installed(plane: Plane, directory: pathlib.Path) -> kubetest.Operator:
    """The operator with the installed Deployment's settings, as its own ServiceAccount, on
    loopback (the pod IP becomes 127.0.0.1). Started; stop it with ``.stop()``."""
    directory.mkdir(parents=True, exist_ok=True)
    kubeconfig = sa_kubeconfig(plane, "meshward-operator", directory / "kubeconfig")
    env = env_of(plane.docs, "meshward-operator")
    op = kubetest.Operator(kubeconfig, directory / "operator.log")
    op.extra_env = {
        **env,
        "MESHWARD_WEBHOOK_HOST": "127.0.0.1",
        "MESHWARD_WEBHOOK_PORT": str(op.webhook_port),
        "MESHWARD_WEBHOOK_CERT_DIR": str(directory / "webhook"),
        "MESHWARD_EXCLUDED_NAMESPACES": "kube-system,kube-public,kube-node-lease",
    }
    op.start(("-m", "meshward", "operator"))
    return op


def wait_operator_ready(plane: Plane, op: kubetest.Operator) -> None:
    """Until the TrustDomain is Ready and both webhook configurations list webhooks."""
    admission = client.AdmissionregistrationV1Api(plane.api)

    def ready() -> bool:
        td = plane.custom.get_cluster_custom_object(
            trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, "meshward"
        )
        validating = admission.read_validating_webhook_configuration(WEBHOOK_NAME)
        mutating = admission.read_mutating_webhook_configuration(WEBHOOK_NAME)
        selector = [w.namespace_selector for w in mutating.webhooks or []]
        return (
            (td.get("status") or {}).get("phase") == "Ready"
            and bool(validating.webhooks)
            and bool(selector)
            and all(s is not None and s.match_expressions for s in selector)
        )

    try:
        kubetest.wait_for("the installed operator to be ready", ready, timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{op.log_tail()}") from exc


def trust_files(plane: Plane, directory: pathlib.Path) -> pathlib.Path:
    """The issuer Secret and trust-roots ConfigMap as the kubelet would mount them."""
    directory.mkdir(parents=True, exist_ok=True)
    secret = plane.core.read_namespaced_secret(commands.ISSUER_SECRET, "meshward")
    for key in ("tls.crt", "tls.key"):
        (directory / key).write_bytes(base64.b64decode(secret.data[key]))
    roots = plane.core.read_namespaced_config_map(commands.TRUST_ROOTS, "meshward")
    (directory / "ca-bundle.crt").write_text(roots.data["ca-bundle.crt"])
    return directory


def served_flags(plane: Plane, deployment: str) -> list[str]:
    """The installed server's flags, but for the addresses and mounted paths, which a test on
    loopback gives itself."""
    command = container(plane.docs, deployment)["command"]
    assert command[:1] == ["meshward"] and command[-1:] != ["serve"]
    kept = []
    args = command[command.index("serve") + 1 :]
    for name, value in zip(args[::2], args[1::2], strict=True):
        if name not in ("--addr", "--admin-addr", "--issuer-dir", "--trust-anchors"):
            kept += [name, value]
    return kept


def no_forbidden(log: str) -> None:
    lowered = log.lower()
    assert "forbidden" not in lowered and "not enough permissions" not in lowered, log[-3000:]


@pytest.mark.cluster
def test_one_command_installs_cleanly_and_again_changes_nothing(plane: Plane) -> None:
    (first,) = plane.first_apply
    assert first.returncode == 0, first.stderr
    created = [line for line in first.stdout.splitlines() if line.endswith(" created")]
    assert len(created) == len(plane.docs)
    again = plane.install()
    lines = again.stdout.strip().splitlines()
    assert len(lines) == len(plane.docs)
    assert all(line.endswith(" unchanged") for line in lines), again.stdout
    apps = client.AppsV1Api(plane.api)
    rbac = client.RbacAuthorizationV1Api(plane.api)
    for name in ("meshward-operator", "meshward-identity", "meshward-policy"):
        assert apps.read_namespaced_deployment(name, "meshward").spec.replicas == 1
        plane.core.read_namespaced_service_account(name, "meshward")
        rbac.read_cluster_role(name)
        rbac.read_cluster_role_binding(name)
    for name in ("meshward-identity", "meshward-policy"):
        assert plane.core.read_namespaced_service(name, "meshward").spec.cluster_ip
    rbac.read_namespaced_role("meshward-operator", "meshward")
    admission = client.AdmissionregistrationV1Api(plane.api)
    admission.read_validating_webhook_configuration(WEBHOOK_NAME)
    admission.read_mutating_webhook_configuration(WEBHOOK_NAME)


CAN_I = [
    # (service account, kubectl auth can-i arguments, allowed)
    ("meshward-identity", ("create", "tokenreviews.authentication.k8s.io"), True),
    ("meshward-identity", ("get", "secrets", "-n", "meshward"), False),
    ("meshward-identity", ("list", "pods", "--all-namespaces"), False),
    ("meshward-identity", ("list", "configmaps", "-n", "meshward"), False),
    ("meshward-identity", ("create", "events", "-n", "meshward"), False),
    ("meshward-policy", ("list", "configmaps/meshward-policy", "--all-namespaces"), True),
    ("meshward-policy", ("watch", "configmaps/meshward-policy", "--all-namespaces"), True),
    ("meshward-policy", ("list", "configmaps", "--all-namespaces"), False),
    ("meshward-policy", ("get", "configmaps/kube-root-ca.crt", "-n", "default"), False),
    ("meshward-policy", ("update", "configmaps", "-n", "meshward"), True),
    ("meshward-policy", ("update", "configmaps", "-n", "default"), False),
    ("meshward-policy", ("get", "secrets", "-n", "default"), False),
    ("meshward-policy", ("create", "configmaps", "-n", "default"), False),
    ("meshward-policy", ("get", "secrets", "-n", "meshward"), False),
    ("meshward-policy", ("create", "tokenreviews.authentication.k8s.io"), False),
    ("meshward-policy", ("list", "pods", "--all-namespaces"), True),
    ("meshward-policy", ("watch", "pods", "--all-namespaces"), True),
    ("meshward-policy", ("get", "pods", "-n", "default"), False),
    ("meshward-policy", ("create", "pods", "-n", "default"), False),
    ("meshward-policy", ("delete", "pods", "-n", "default"), False),
    ("meshward-policy", ("patch", "pods", "-n", "default", "--subresource=status"), False),
    ("meshward-policy", ("create", "pods", "-n", "default", "--subresource=exec"), False),
    ("meshward-policy", ("get", "pods", "-n", "default", "--subresource=log"), False),
    ("meshward-policy", ("list", "services", "--all-namespaces"), True),
    ("meshward-policy", ("watch", "services", "--all-namespaces"), True),
    ("meshward-policy", ("update", "services", "-n", "default"), False),
    ("meshward-policy", ("list", "endpointslices.discovery.k8s.io", "--all-namespaces"), True),
    ("meshward-policy", ("watch", "endpointslices.discovery.k8s.io", "--all-namespaces"), True),
    ("meshward-policy", ("create", "endpointslices.discovery.k8s.io", "-n", "default"), False),
    ("meshward-policy", ("list", "endpoints", "--all-namespaces"), False),
    ("meshward-policy", ("list", "secrets", "--all-namespaces"), False),
    ("meshward-policy", ("list", "nodes"), False),
    ("meshward-operator", ("get", "secrets", "-n", "meshward"), True),
    ("meshward-operator", ("create", "secrets", "-n", "meshward"), True),
    ("meshward-operator", ("update", f"secrets/{commands.ISSUER_SECRET}", "-n", "meshward"), True),
    ("meshward-operator", ("update", "secrets/someone-elses", "-n", "meshward"), False),
    ("meshward-operator", ("delete", f"secrets/{commands.ISSUER_SECRET}", "-n", "meshward"), False),
    (
        "meshward-operator",
        ("delete", f"secrets/{trustdomain.NEXT_ANCHOR_SECRET}", "-n", "meshward"),
        True,
    ),
    ("meshward-operator", ("get", "secrets", "-n", "default"), False),
    ("meshward-operator", ("list", "secrets", "-n", "meshward"), False),
    (
        "meshward-operator",
        ("update", f"configmaps/{compiled.CONFIGMAP_NAME}", "-n", "default"),
        True,
    ),
    ("meshward-operator", ("update", f"configmaps/{commands.TRUST_ROOTS}", "-n", "default"), True),
    ("meshward-operator", ("update", "configmaps/coredns", "-n", "kube-system"), False),
    ("meshward-operator", ("get", "configmaps/someone-elses", "-n", "default"), False),
    ("meshward-operator", ("delete", "configmaps", "-n", "default"), False),
    ("meshward-operator", ("list", "pods", "--all-namespaces"), True),
    ("meshward-operator", ("create", "pods", "-n", "default"), False),
    ("meshward-operator", ("patch", "pods", "-n", "default"), False),
    ("meshward-operator", ("delete", "namespaces"), False),
    ("meshward-operator", ("patch", "servers.policy.meshward.io/x", "-n", "default"), False),
    ("meshward-operator", ("patch", "servers.policy.meshward.io", "--subresource=status"), True),
    ("meshward-operator", ("create", "trustdomains.identity.meshward.io"), True),
    ("meshward-operator", ("delete", "trustdomains.identity.meshward.io"), False),
    (
        "meshward-operator",
        ("patch", f"validatingwebhookconfigurations.admissionregistration.k8s.io/{WEBHOOK_NAME}"),
        True,
    ),
    (
        "meshward-operator",
        ("patch", "validatingwebhookconfigurations.admissionregistration.k8s.io/another"),
        False,
    ),
    ("meshward-operator", ("create", "tokenreviews.authentication.k8s.io"), False),
    ("meshward-operator", ("*", "*"), False),
]


@pytest.mark.cluster
def test_least_privilege_by_kubectl_auth_can_i(plane: Plane) -> None:
    wrong = []
    for sa, args, allowed in CAN_I:
        proc = plane.kubectl.run(
            "auth", "can-i", *args, f"--as=system:serviceaccount:meshward:{sa}", check=False
        )
        answer = proc.stdout.strip()
        assert answer in ("yes", "no"), proc.stderr
        if (answer == "yes") != allowed:
            wrong.append(f"{sa} {' '.join(args)}: {answer}")
    assert not wrong, wrong


@pytest.mark.cluster
def test_the_operator_does_its_work_with_only_its_rbac(
    plane: Plane, tmp_path: pathlib.Path
) -> None:
    op = operator_as_installed(plane, tmp_path / "operator")
    meshed = f"meshed-{uuid.uuid4().hex[:5]}"
    try:
        wait_operator_ready(plane, op)
        for name in (commands.ANCHOR_SECRET, commands.ISSUER_SECRET):
            plane.core.read_namespaced_secret(name, "meshward")  # created with create secrets
        plane.core.create_namespace(
            client.V1Namespace(
                metadata=client.V1ObjectMeta(
                    name=meshed, annotations={"meshward.io/inject": "enabled"}
                )
            )
        )
        plane.kubectl.apply(
            yaml.safe_dump(
                {
                    "apiVersion": "policy.meshward.io/v1alpha1",
                    "kind": "Server",
                    "metadata": {"name": "web", "namespace": meshed},
                    "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080},
                }
            )
        )
        document = kubetest.wait_document(
            plane.core, meshed, lambda d: len(d.servers) == 1, "the compiled Server"
        )
        assert isinstance(document, compiled.PolicyDocument)
        kubetest.wait_for(
            "the trust bundle in the meshed namespace",
            lambda: plane.core.read_namespaced_config_map(commands.TRUST_ROOTS, meshed),
        )

        def accepted() -> bool:
            server = plane.custom.get_namespaced_custom_object(
                "policy.meshward.io", "v1alpha1", meshed, "servers", "web"
            )
            conditions = (server.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions)

        kubetest.wait_for("the Server's Accepted condition", accepted)
        kubetest.wait_service_account(plane.core, meshed)
        kubetest.wait_injecting(plane.core, meshed, "the installed operator's injector")
        both = {
            "apiVersion": "policy.meshward.io/v1alpha1",
            "kind": "ServerAuthorization",
            "metadata": {"name": "both", "namespace": meshed},
            "spec": {
                "server": {"name": "web"},
                "client": {"unauthenticated": True, "meshTLS": {"identities": ["*"]}},
            },
        }
        refused = plane.kubectl.apply(yaml.safe_dump(both), check=False)
        assert refused.returncode != 0
        assert "set exactly one of meshTLS or unauthenticated" in refused.stderr
    finally:
        op.stop()
        plane.core.delete_namespace(meshed)
    no_forbidden(op.log.read_text(errors="replace"))


@pytest.mark.cluster
def test_identity_and_policy_servers_start_with_only_their_rbac(
    plane: Plane, tmp_path: pathlib.Path
) -> None:
    op = operator_as_installed(plane, tmp_path / "operator")
    try:
        wait_operator_ready(plane, op)
        trust = trust_files(plane, tmp_path / "trust")
    finally:
        op.stop()
    identity_config = sa_kubeconfig(plane, "meshward-identity", tmp_path / "identity.kubeconfig")
    served = container(plane.docs, "meshward-identity")["command"]
    identity = IdentityService(
        identity_config,
        trust,
        tmp_path / "identity.log",
        verbose=False,
        extra=tuple(served_flags(plane, "meshward-identity")),
    )
    policy_config = sa_kubeconfig(plane, "meshward-policy", tmp_path / "policy.kubeconfig")
    policy_log = tmp_path / "policy.log"
    admin_port = kubetest.free_port()
    with policy_log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "policy",
                "serve",
                *served_flags(plane, "meshward-policy"),
                "--issuer-dir",
                str(trust),
                "--trust-anchors",
                str(trust / "ca-bundle.crt"),
                "--addr",
                f"127.0.0.1:{kubetest.free_port()}",
                "--admin-addr",
                f"127.0.0.1:{admin_port}",
            ],
            env={**os.environ, "KUBECONFIG": str(policy_config)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    policy = Running(proc, admin_port, policy_log)
    try:
        identity.start()
        name = pki.Identity("default", "web", "cluster.local").dns_name
        csr, _ = make_csr()
        # As a proxy does: the installed server name, verified against the anchors.
        channel = grpc.secure_channel(
            f"127.0.0.1:{identity.port}",
            grpc.ssl_channel_credentials((trust / "ca-bundle.crt").read_bytes()),
            options=[("grpc.ssl_target_name_override", flag(served, "--server-name")[0])],
        )
        with channel:
            issued = identity_pb2_grpc.IdentityStub(channel).Certify(
                identity_pb2.CertifyRequest(
                    identity=name,
                    token=token_for(plane.core, "default", "web").encode(),
                    certificate_signing_request=csr,
                ),
                timeout=30,
            )
        leaf = x509.load_der_x509_certificate(issued.leaf_certificate)
        assert pki.spiffe_id(leaf) == "spiffe://cluster.local/ns/default/sa/web"
        kubetest.wait_for(
            f"the policy server to be ready\n{policy_log.read_text(errors='replace')}",
            policy.ready,
            30,
        )
    finally:
        identity.stop()
        policy.stop()
    no_forbidden(identity.log_tail())
    no_forbidden(policy_log.read_text(errors="replace"))


@pytest.mark.cluster
def test_uninstall_removes_its_install_and_keeps_the_crds_and_another(plane: Plane) -> None:
    ns, hooks = "mesh-second", "hooks.second.example"
    plane.install("--namespace", ns, "--webhook-name", hooks)
    rendered = meshward("uninstall", "--namespace", ns, "--webhook-name", hooks)
    assert rendered.returncode == 0, rendered.stderr
    # No operator ran for this install, so it has no TrustDomain: --ignore-not-found, as the
    # README says.
    removed = plane.kubectl.run(
        "delete", "--ignore-not-found", "-f", "-", "--timeout=60s", input=rendered.stdout
    )
    assert len(removed.stdout.strip().splitlines()) == 9, removed.stdout
    rbac = client.RbacAuthorizationV1Api(plane.api)
    admission = client.AdmissionregistrationV1Api(plane.api)
    gone = [
        lambda: plane.core.read_namespace(ns),
        lambda: rbac.read_cluster_role(f"meshward-operator-{ns}"),
        lambda: rbac.read_cluster_role_binding(f"meshward-identity-{ns}"),
        lambda: admission.read_validating_webhook_configuration(hooks),
        lambda: admission.read_mutating_webhook_configuration(hooks),
        lambda: plane.custom.get_cluster_custom_object(
            trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, ns
        ),
    ]
    for read in gone:
        with pytest.raises(client.exceptions.ApiException) as caught:
            read()
        assert caught.value.status == 404
    ext = client.ApiextensionsV1Api(plane.api)
    for crd in CRD_FILES:
        ext.read_custom_resource_definition(yaml.safe_load(crd.read_text())["metadata"]["name"])
    # The first install is untouched.
    again = plane.install()
    assert all(line.endswith(" unchanged") for line in again.stdout.strip().splitlines())


@pytest.mark.cluster
def test_uninstall_with_crds_leaves_no_meshward_object(tmp_path: pathlib.Path) -> None:
    cluster = devcluster.up(tmp_path / "cp", controller_manager=True)
    try:
        plane = start_plane(cluster.kubeconfig)
        assert [p.returncode for p in plane.first_apply] == [0]
        rendered = meshward("uninstall", "--crds")
        plane.kubectl.run("delete", "-f", "-", "--timeout=60s", input=rendered.stdout)
        left = plane.kubectl.run(
            "get",
            "crd,clusterrole,clusterrolebinding,validatingwebhookconfiguration,"
            "mutatingwebhookconfiguration,namespace",
            "-l",
            "app.kubernetes.io/part-of=meshward",
            "-o",
            "name",
        )
        assert left.stdout.strip() == ""
        assert plane.kubectl.run("get", "namespace", "meshward", check=False).returncode != 0
        plane.api.close()
    finally:
        devcluster.down(tmp_path / "cp")
