"""The objects of an install, as plain dicts in the order ``kubectl apply -f -`` takes them.

Order: the CRDs, the control-plane namespace, ServiceAccounts, RBAC, trust material, Services,
Deployments and the webhook configurations. No custom resource: kubectl maps every document's
kind before it applies any, so one could not be created in the run that creates its CRD. The
operator creates the TrustDomain (named after the control-plane namespace) when none exists.

The operator's admission webhooks are served by kopf, which writes a ``url`` client
configuration (``https://<MESHWARD_WEBHOOK_HOST>:9443/...``) and its CA bundle into the two
webhook configurations named ``--webhook-name``; it binds and advertises the same host, so the
operator is given its pod IP (downward API) and no Service fronts it. A restarted operator pod
has a new IP and rewrites the configurations at start. Install renders both configurations
empty (no ``webhooks``) so that uninstall removes them and a second apply leaves kopf's
webhooks alone.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import textwrap
from typing import Any

import yaml

from meshward import errors, inject
from meshward.identity import authority, commands, pki, trustdomain
from meshward.install import _rbac, _trust
from meshward.operator import _settings
from meshward.policy import resources

DEFAULT_NAMESPACE = "meshward"
DEFAULT_WEBHOOK_NAME = _settings.OperatorSettings.webhook_name
PART_OF = {"app.kubernetes.io/part-of": "meshward"}
IDENTITY_PORT, IDENTITY_ADMIN_PORT = 8080, 9990
POLICY_PORT, POLICY_ADMIN_PORT = 8090, 9991
WEBHOOK_PORT = 9443
RUN_AS = 65532
"""UID and GID of every control-plane container: any non-root ID works; a numeric one lets the
kubelet enforce runAsNonRoot whatever the image's USER says."""
WEBHOOK_CERT_DIR = "/var/run/meshward/webhook"
ISSUER_DIR = "/var/run/meshward/identity/issuer"
TRUST_ROOTS_DIR = "/var/run/meshward/identity/trust-roots"


def default_image() -> str:
    return f"ghcr.io/meshward/meshward:{inject.package_version()}"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What an install is made of; construction checks every value (ConfigError)."""

    image: str
    namespace: str = DEFAULT_NAMESPACE
    trust_domain: str = "cluster.local"
    webhook_name: str = DEFAULT_WEBHOOK_NAME
    trust: _trust.UserTrust | None = None
    """The user's anchor and issuer; None: the operator creates them for the TrustDomain."""

    def __post_init__(self) -> None:
        if not resources.is_dns_label(self.namespace):
            raise errors.ConfigError(
                f"--namespace {self.namespace!r} is not a namespace name: use 1-63 characters "
                "of a-z, 0-9 and '-'"
            )
        try:
            self.identity_name(_rbac.IDENTITY)
        except errors.InvalidIdentity as exc:
            raise errors.ConfigError(f"--trust-domain: {exc}") from exc
        if not self.image or any(ch.isspace() for ch in self.image):
            raise errors.ConfigError(
                f"--image {self.image!r} is not an image reference: pass one without spaces, "
                "such as ghcr.io/meshward/meshward:0.1.0"
            )
        if not all(resources.is_dns_label(part) for part in self.webhook_name.split(".")):
            raise errors.ConfigError(
                f"--webhook-name {self.webhook_name!r} is not a DNS name: use lowercase "
                "labels joined by dots, such as operator.meshward.io"
            )

    def identity_name(self, service_account: str) -> str:
        """The mesh identity (DNS form) a control-plane service presents to proxies."""
        return pki.Identity(self.namespace, service_account, self.trust_domain).dns_name

    def cluster_name(self, component: str) -> str:
        """A cluster-scoped object's name: the component's, suffixed with the namespace when it
        is not the default one, so that two installs never share one."""
        if self.namespace == DEFAULT_NAMESPACE:
            return component
        return f"{component}-{self.namespace}"


@dataclasses.dataclass(frozen=True)
class Document:
    """One object, and the comment printed above it; ``text``, when set, is printed instead of
    the object (a packaged file, kept with its own comments)."""

    body: dict[str, Any]
    comment: str = ""
    text: str | None = None

    @property
    def kind(self) -> str:
        return str(self.body["kind"])

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])


class _Dumper(yaml.SafeDumper):
    """Writes a dict used twice in full both times (no ``&id001`` anchors for a person to
    follow)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _comment(text: str) -> str:
    lines = []
    for paragraph in text.splitlines():
        wrapped = textwrap.wrap(
            paragraph,
            width=98,
            subsequent_indent="  ",
            break_long_words=False,
            break_on_hyphens=False,
        ) or [""]
        lines += [f"# {line}".rstrip() for line in wrapped]
    return "".join(f"{line}\n" for line in lines)


def render(documents: list[Document]) -> str:
    """Multi-document YAML: each document preceded by its comment lines."""
    parts = []
    for doc in documents:
        if doc.text is not None:
            parts.append(doc.text if doc.text.endswith("\n") else doc.text + "\n")
            continue
        body = yaml.dump(doc.body, Dumper=_Dumper, sort_keys=False)
        parts.append(_comment(doc.comment) + body)
    return "---\n".join(parts)


def crds() -> list[Document]:
    """The packaged CRDs, read from the installed package so that a wheel renders them too."""
    folder = importlib.resources.files("meshward") / "crds"
    files = sorted(
        (entry for entry in folder.iterdir() if entry.name.endswith(".yaml")),
        key=lambda entry: entry.name,
    )
    if not files:
        raise errors.ConfigError(
            "the meshward package holds no CRDs (meshward/crds/*.yaml): reinstall meshward"
        )
    documents = []
    for entry in files:
        text = entry.read_text(encoding="utf-8")
        documents.append(Document(yaml.safe_load(text), text=text))
    return documents


def _meta(name: str, namespace: str | None = None, component: str | None = None) -> dict[str, Any]:
    labels = dict(PART_OF)
    if component:
        labels["app.kubernetes.io/name"] = component
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    meta["labels"] = labels
    return meta


def _namespace(s: Settings) -> Document:
    meta = _meta(s.namespace)
    # Kubernetes sets this label itself from 1.21; the injector's namespaceSelector reads it.
    meta["labels"]["kubernetes.io/metadata.name"] = s.namespace
    return Document(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": meta},
        "The control plane's namespace; the operator's root namespace (mesh-wide policy) too.",
    )


def _service_account(s: Settings, name: str) -> Document:
    return Document(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(name, s.namespace, name)}
    )


def _rbac_documents(s: Settings, grants: _rbac.Grants) -> list[Document]:
    sa = grants.service_account
    subject = [{"kind": "ServiceAccount", "name": sa, "namespace": s.namespace}]
    name = s.cluster_name(sa)
    docs = [
        Document(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": _meta(name, component=sa),
                "rules": [rule.manifest() for rule in grants.cluster],
            },
            f"What {sa} may do in the whole cluster, and why:\n"
            + "\n".join(f"- {rule.describe()}" for rule in grants.cluster),
        ),
        Document(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": _meta(name, component=sa),
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": name,
                },
                "subjects": subject,
            }
        ),
    ]
    if grants.namespaced:
        docs += [
            Document(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": _meta(sa, s.namespace, sa),
                    "rules": [rule.manifest() for rule in grants.namespaced],
                },
                f"What {sa} may do in namespace {s.namespace} only, and why:\n"
                + "\n".join(f"- {rule.describe()}" for rule in grants.namespaced),
            ),
            Document(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": _meta(sa, s.namespace, sa),
                    "roleRef": {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Role",
                        "name": sa,
                    },
                    "subjects": subject,
                }
            ),
        ]
    return docs


def _user_trust(s: Settings, trust: _trust.UserTrust) -> list[Document]:
    ns = s.namespace
    return [
        Document(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": _meta(commands.TRUST_ROOTS, ns),
                "data": {authority.ANCHORS: trust.anchors.decode()},
            },
            "Your trust anchors: proxies and the control plane verify certificates against them.",
        ),
        Document(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": _meta(commands.ANCHOR_SECRET, ns),
                "type": "Opaque",
                "stringData": {"tls.crt": trust.anchors.decode()},
            },
            "The trust anchors again, without a key: the operator checks the issuer against them\n"
            "and publishes them to meshed namespaces. Without the anchor's key it can not rotate\n"
            "the issuer; it warns before the issuer expires.",
        ),
        Document(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": _meta(commands.ISSUER_SECRET, ns),
                "type": "kubernetes.io/tls",
                "stringData": {
                    "tls.crt": trust.issuer_cert.decode(),
                    "tls.key": trust.issuer_key.decode(),
                },
            },
            "Your issuer and its private key: the identity service signs proxies' certificates\n"
            "with it. Keep this output out of logs and version control.",
        ),
    ]


def _service(s: Settings, name: str, port: int, why: str) -> Document:
    return Document(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, s.namespace, name),
            "spec": {
                "selector": {**PART_OF, "app.kubernetes.io/name": name},
                "ports": [{"name": "grpc", "port": port, "targetPort": "grpc"}],
            },
        },
        why,
    )


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _deployment(
    s: Settings,
    name: str,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    why: str,
) -> Document:
    labels = {**PART_OF, "app.kubernetes.io/name": name}
    spec: dict[str, Any] = {"replicas": 1, "selector": {"matchLabels": labels}}
    if name == _rbac.OPERATOR:
        spec["strategy"] = {"type": "Recreate"}  # never two at once: it runs without peering
    container = {
        "name": name.removeprefix("meshward-"),
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        **container,
        "securityContext": _container_security(),
    }
    container["volumeMounts"] = [*container.get("volumeMounts", []), _TMP_MOUNT]
    return Document(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(name, s.namespace, name),
            "spec": {
                **spec,
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {inject.INJECT_ANNOTATION: "disabled"},
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [container],
                        "volumes": [*volumes, {"name": "tmp", "emptyDir": {}}],
                    },
                },
            },
        },
        why,
    )


_TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
_TRUST_VOLUMES = [
    {"name": "issuer", "secret": {"secretName": commands.ISSUER_SECRET}},
    {"name": "trust-roots", "configMap": {"name": commands.TRUST_ROOTS}},
]
_TRUST_MOUNTS = [
    {"name": "issuer", "mountPath": ISSUER_DIR, "readOnly": True},
    {"name": "trust-roots", "mountPath": TRUST_ROOTS_DIR, "readOnly": True},
]


def _probes() -> dict[str, Any]:
    return {
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "admin"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/live", "port": "admin"}, "periodSeconds": 10},
    }


def _resources(cpu: str, memory: str, limit: str) -> dict[str, Any]:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": limit}}


def operator_env(s: Settings) -> list[dict[str, Any]]:
    """The operator's settings (see :mod:`meshward.operator._settings`)."""
    td = s.trust_domain
    env: list[dict[str, Any]] = [
        {"name": _settings.ENV["trust_domain"], "value": td},
        {"name": _settings.ENV["root_namespace"], "value": s.namespace},
        {
            "name": _settings.ENV["webhook_host"],
            "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
        },
        {"name": _settings.ENV["webhook_port"], "value": str(WEBHOOK_PORT)},
        {"name": _settings.ENV["webhook_cert_dir"], "value": WEBHOOK_CERT_DIR},
        {"name": _settings.ENV["webhook_name"], "value": s.webhook_name},
        {"name": _settings.ENV["trust_domain_resource"], "value": s.namespace},
        {"name": _settings.INJECT_ENV["proxy_image"], "value": s.image},
        {
            "name": _settings.INJECT_ENV["identity_svc_addr"],
            "value": f"{_rbac.IDENTITY}.{s.namespace}.svc:{IDENTITY_PORT}",
        },
        {
            "name": _settings.INJECT_ENV["identity_svc_name"],
            "value": s.identity_name(_rbac.IDENTITY),
        },
        {
            "name": _settings.INJECT_ENV["policy_svc_addr"],
            "value": f"{_rbac.POLICY}.{s.namespace}.svc:{POLICY_PORT}",
        },
        {"name": _settings.INJECT_ENV["policy_svc_name"], "value": s.identity_name(_rbac.POLICY)},
    ]
    return env


def _deployments(s: Settings) -> list[Document]:
    operator = _deployment(
        s,
        _rbac.OPERATOR,
        {
            "command": ["meshward", "operator"],
            "env": operator_env(s),
            "ports": [{"name": "webhook", "containerPort": WEBHOOK_PORT}],
            "readinessProbe": {"tcpSocket": {"port": "webhook"}, "periodSeconds": 5},
            "resources": _resources("100m", "128Mi", "512Mi"),
            "volumeMounts": [{"name": "webhook-cert", "mountPath": WEBHOOK_CERT_DIR}],
        },
        [{"name": "webhook-cert", "emptyDir": {}}],
        "The operator: compiles policy, keeps the trust material, validates policy resources\n"
        "and injects the proxy (admission webhooks at its pod IP, port 9443).",
    )
    identity = _deployment(
        s,
        _rbac.IDENTITY,
        {
            "command": [
                "meshward",
                "identity",
                "serve",
                "--trust-domain",
                s.trust_domain,
                "--server-name",
                s.identity_name(_rbac.IDENTITY),
                "--addr",
                f"0.0.0.0:{IDENTITY_PORT}",
                "--admin-addr",
                f"0.0.0.0:{IDENTITY_ADMIN_PORT}",
                "--issuer-dir",
                ISSUER_DIR,
                "--trust-anchors",
                f"{TRUST_ROOTS_DIR}/{authority.ANCHORS}",
            ],
            "ports": [
                {"name": "grpc", "containerPort": IDENTITY_PORT},
                {"name": "admin", "containerPort": IDENTITY_ADMIN_PORT},
            ],
            **_probes(),
            "resources": _resources("100m", "64Mi", "256Mi"),
            "volumeMounts": list(_TRUST_MOUNTS),
        },
        list(_TRUST_VOLUMES),
        "The identity service: signs proxies' certificates with the mounted issuer.",
    )
    policy = _deployment(
        s,
        _rbac.POLICY,
        {
            "command": [
                "meshward",
                "policy",
                "serve",
                "--trust-domain",
                s.trust_domain,
                "--server-name",
                s.identity_name(_rbac.POLICY),
                "--addr",
                f"0.0.0.0:{POLICY_PORT}",
                "--admin-addr",
                f"0.0.0.0:{POLICY_ADMIN_PORT}",
                "--issuer-dir",
                ISSUER_DIR,
                "--trust-anchors",
                f"{TRUST_ROOTS_DIR}/{authority.ANCHORS}",
                "--namespace",
                s.namespace,
            ],
            "env": [
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            ],
            "ports": [
                {"name": "grpc", "containerPort": POLICY_PORT},
                {"name": "admin", "containerPort": POLICY_ADMIN_PORT},
            ],
            **_probes(),
            "resources": _resources("100m", "64Mi", "256Mi"),
            "volumeMounts": list(_TRUST_MOUNTS),
        },
        list(_TRUST_VOLUMES),
        "The policy server: streams each namespace's compiled policy to its proxies.",
    )
    return [operator, identity, policy]


def _webhook_configurations(s: Settings) -> list[Document]:
    return [
        Document(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": kind,
                "metadata": _meta(s.webhook_name, component=_rbac.OPERATOR),
            },
            "Filled in by the operator (kopf) when it starts: its webhooks, their URL and CA.",
        )
        for kind in ("ValidatingWebhookConfiguration", "MutatingWebhookConfiguration")
    ]


def install(s: Settings) -> list[Document]:
    """Every object of an install, CRDs first."""
    all_grants = (_rbac.operator(s.webhook_name), _rbac.identity(), _rbac.policy())
    docs = [*crds(), _namespace(s)]
    docs += [_service_account(s, g.service_account) for g in all_grants]
    for grants in all_grants:
        docs += _rbac_documents(s, grants)
    if s.trust is not None:
        docs += _user_trust(s, s.trust)
    docs += [
        _service(
            s,
            _rbac.IDENTITY,
            IDENTITY_PORT,
            "Proxies ask the identity service for their certificates here.",
        ),
        _service(s, _rbac.POLICY, POLICY_PORT, "Proxies follow their namespace's policy here."),
    ]
    docs += _deployments(s)
    docs += _webhook_configurations(s)
    return docs


def uninstall(s: Settings, with_crds: bool = False) -> list[Document]:
    """What ``kubectl delete -f -`` removes: access first, so nothing re-creates what follows;
    the namespace takes the Deployments, Secrets and namespaced RBAC with it."""
    all_grants = (_rbac.operator(s.webhook_name), _rbac.identity(), _rbac.policy())
    docs: list[Document] = []
    for grants in all_grants:
        name = s.cluster_name(grants.service_account)
        docs.append(
            Document(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRoleBinding",
                    "metadata": {"name": name},
                }
            )
        )
    docs += [Document({**d.body, "metadata": {"name": d.name}}) for d in _webhook_configurations(s)]
    if not with_crds:  # with them, deleting the CRD deletes the TrustDomain
        docs.append(
            Document(
                {
                    "apiVersion": trustdomain.API_VERSION,
                    "kind": trustdomain.KIND,
                    "metadata": {"name": s.namespace},
                }
            )
        )
    docs.append(
        Document({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": s.namespace}})
    )
    for grants in all_grants:
        docs.append(
            Document(
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "ClusterRole",
                    "metadata": {"name": s.cluster_name(grants.service_account)},
                }
            )
        )
    if with_crds:
        docs += [
            Document(
                {
                    "apiVersion": d.body["apiVersion"],
                    "kind": d.kind,
                    "metadata": {"name": d.name},
                },
                "Deleting a CRD deletes every resource of its kind, in every namespace.",
            )
            for d in crds()
        ]
    return docs
