"""Proxy injection: what a Pod becomes when it joins the mesh, decided and built without I/O.

The operator's mutating webhook and ``meshward inject`` both call :func:`inject`, so a pod
injected by the cluster and a manifest injected offline come out the same. The caller reads the
namespace's annotations and the clock; this module only looks at what it is given.

When a pod is injected: the annotation ``meshward.io/inject`` on the pod (``enabled`` or
``disabled``) wins; without it, the namespace's annotation decides; without either, the pod is
left alone. hostNetwork pods are left alone too (interception would rewrite the node's own
network), and so are pods injected already (annotation ``meshward.io/proxy-version``, or a
container named ``meshward-proxy``), which makes injection idempotent. A value other than
``enabled`` or ``disabled``, or a pod that would break the proxy (an application port or UID the
proxy needs), raises :class:`~meshward.errors.InjectionError`: refusing the pod with the reason
is safer than guessing whether its owner wanted it meshed.

What injection adds:

- the ``meshward-proxy`` container, first, so that it starts before the application; its
  environment is every ``MESHWARD_PROXY_*`` variable the proxy reads
  (:mod:`meshward.proxy.settings`). The local identity name is built by Kubernetes from the
  pod's ServiceAccount and namespace (``$(VAR)`` expansion of two fieldRef variables defined
  just before it), and the trust anchors come from the ``meshward-identity-trust-roots``
  ConfigMap of the pod's namespace, mounted as a volume (not copied into the environment) so
  that the proxy follows it as it changes during an anchor rotation, and sees the
  ``renew-leaves-before`` request mounted beside the bundle;
- a projected ServiceAccount token for the identity service's audience and a memory-backed
  emptyDir for the proxy's private key, which therefore never touches the node's disk;
- the ``meshward-init`` init container, last, so that the application's own init containers run
  before traffic is redirected to a proxy that is not running yet. It runs
  ``meshward proxy-init`` with NET_ADMIN and NET_RAW, and always exempts the proxy's admin port
  from inbound redirection, so that the kubelet's probes reach the proxy directly;
- the annotations ``meshward.io/proxy-version`` and ``meshward.io/injected-at``, and
  ``kubectl.kubernetes.io/default-container`` (the first application container) when absent, so
  that ``kubectl logs`` and ``exec`` keep meaning the application.

The application's containers are not modified: their probes keep working because the compiled
policy allows the kubelet's probe paths (see :mod:`meshward.policy.compile`).

The webhook that calls this (:mod:`meshward.operator._handlers`) has failurePolicy ``Ignore``,
as Linkerd's injector: while the operator is down, pods are created without the proxy (visibly:
no ``meshward.io/proxy-version``) instead of a down operator blocking every deployment.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
from collections.abc import Iterable, Mapping
from typing import Any

from meshward import errors, trustbundle
from meshward.identity import commands, pki, tokens
from meshward.proxy import settings as proxy_settings

INJECT_ANNOTATION = "meshward.io/inject"
VERSION_ANNOTATION = "meshward.io/proxy-version"
INJECTED_AT_ANNOTATION = "meshward.io/injected-at"
DEFAULT_CONTAINER_ANNOTATION = "kubectl.kubernetes.io/default-container"
ENABLED, DISABLED = "enabled", "disabled"

PROXY_CONTAINER = "meshward-proxy"
INIT_CONTAINER = "meshward-init"
TOKEN_VOLUME = "meshward-identity-token"
TOKEN_DIR = "/var/run/secrets/tokens"
TOKEN_FILE = f"{TOKEN_DIR}/{TOKEN_VOLUME}"
TOKEN_EXPIRATION_SECONDS = 86400
IDENTITY_VOLUME = "meshward-identity-end-entity"
IDENTITY_DIR = "/var/run/meshward/identity/end-entity"
TRUST_ROOTS_VOLUME = "meshward-trust-roots"
TRUST_ROOTS_DIR = "/var/run/meshward/trust-roots"
XTABLES_VOLUME = "meshward-init-xtables-lock"
"""iptables takes its lock in /run, which the init container's read-only root can not hold."""
PROXY_PORT_NAME, ADMIN_PORT_NAME = "meshward-proxy", "meshward-admin"
POD_SA_VAR, POD_NS_VAR = "_pod_sa", "_pod_ns"
RESERVED_VOLUMES = (TOKEN_VOLUME, IDENTITY_VOLUME, TRUST_ROOTS_VOLUME, XTABLES_VOLUME)
CONTROL_PLANE_NAMESPACE = "meshward"
"""Where the identity and policy services run: their certificates carry this namespace."""
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""Set on every Namespace by Kubernetes 1.21 and later (not by 1.20)."""


def package_version() -> str:
    """The installed meshward version, recorded on injected pods and used in the image tag."""
    try:
        return importlib.metadata.version("meshward")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the injected proxy is told; the operator reads it from ``MESHWARD_INJECT_*``."""

    image: str
    version: str
    """Recorded in ``meshward.io/proxy-version``."""
    identity_svc_addr: str
    identity_svc_name: str
    policy_svc_addr: str
    policy_svc_name: str
    trust_domain: str = "cluster.local"
    proxy_uid: int = 2102
    """The proxy's UID: its own traffic is exempt from redirection, by this UID."""
    inbound_port: int = 4143
    outbound_port: int = 4140
    admin_port: int = 4191
    cpu_request: str = "100m"
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"
    skip_inbound_ports: tuple[int, ...] = ()
    """Inbound ports not redirected to the proxy (the admin port never is)."""
    skip_outbound_ports: tuple[int, ...] = ()

    @classmethod
    def defaults(
        cls, trust_domain: str, version: str, namespace: str = CONTROL_PLANE_NAMESPACE
    ) -> Settings:
        """The in-cluster control plane in ``namespace``: its Services and mesh identities."""

        def name(service: str) -> str:
            return pki.Identity(namespace, service, trust_domain).dns_name

        return cls(
            image=f"ghcr.io/meshward/meshward:{version}",
            version=version,
            identity_svc_addr=f"meshward-identity.{namespace}.svc:8080",
            identity_svc_name=name("meshward-identity"),
            policy_svc_addr=f"meshward-policy.{namespace}.svc:8090",
            policy_svc_name=name("meshward-policy"),
            trust_domain=trust_domain,
        )


@dataclasses.dataclass(frozen=True)
class Injected:
    """The pod as it should be stored (a new dict; the input is never modified)."""

    pod: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """The pod stays as it is, for ``reason`` (a phrase such as "hostNetwork pod")."""

    reason: str


Result = Injected | Skipped


def inject(
    pod: Mapping[str, Any],
    namespace_annotations: Mapping[str, str],
    settings: Settings,
    injected_at: str,
) -> Result:
    """Decide whether ``pod`` (a Pod, or a pod template: ``metadata`` and ``spec``) is injected,
    and build it if so. ``injected_at`` is an RFC 3339 time, recorded on the pod.

    Raises :class:`~meshward.errors.InjectionError` for an annotation that is neither
    ``enabled`` nor ``disabled``, a malformed pod, or one the proxy can not serve.
    """
    metadata = _mapping(pod.get("metadata"), "metadata")
    spec = _mapping(pod.get("spec"), "spec")
    annotations = _mapping(metadata.get("annotations"), "metadata.annotations")
    containers = _containers(spec, "containers")
    init_containers = _containers(spec, "initContainers")
    if VERSION_ANNOTATION in annotations:
        return Skipped(f"already injected (annotation {VERSION_ANNOTATION})")
    if any(c.get("name") == PROXY_CONTAINER for c in containers):
        return Skipped(f"already injected (it has a container named {PROXY_CONTAINER})")
    if not containers:
        raise errors.InjectionError(
            "spec.containers is empty: a pod needs at least one container to inject beside"
        )
    skip = _skip_reason(annotations, namespace_annotations)
    if skip is not None:
        return Skipped(skip)
    if spec.get("hostNetwork") is True:
        return Skipped(
            "hostNetwork pod: redirecting its traffic would rewrite the node's own network"
        )
    _check_conflicts(spec, containers, init_containers, settings)

    result = copy.deepcopy(dict(pod))
    meta = result.setdefault("metadata", {})
    notes = dict(meta.get("annotations") or {})
    notes[VERSION_ANNOTATION] = settings.version
    notes[INJECTED_AT_ANNOTATION] = injected_at
    first = containers[0].get("name")
    if isinstance(first, str) and first:
        notes.setdefault(DEFAULT_CONTAINER_ANNOTATION, first)
    meta["annotations"] = notes
    new_spec = result["spec"]
    new_spec["containers"] = [proxy_container(settings), *new_spec["containers"]]
    new_spec["initContainers"] = [*(new_spec.get("initContainers") or []), init_container(settings)]
    new_spec["volumes"] = [*(new_spec.get("volumes") or []), *volumes()]
    return Injected(result)


def _skip_reason(
    annotations: Mapping[str, Any], namespace_annotations: Mapping[str, str]
) -> str | None:
    """Why the annotations leave the pod alone, or None when they ask for injection."""
    own = annotations.get(INJECT_ANNOTATION)
    if own is not None:
        _check_value(own, f"the pod's annotation {INJECT_ANNOTATION}")
        return None if own == ENABLED else f"the pod is annotated {INJECT_ANNOTATION}: disabled"
    inherited = namespace_annotations.get(INJECT_ANNOTATION)
    if inherited is None:
        return (
            f"injection is not enabled: annotate the pod or its namespace "
            f"{INJECT_ANNOTATION}: {ENABLED}"
        )
    _check_value(inherited, f"the namespace's annotation {INJECT_ANNOTATION}")
    return (
        None
        if inherited == ENABLED
        else f"the namespace is annotated {INJECT_ANNOTATION}: disabled"
    )


def _check_value(value: Any, where: str) -> None:
    if value not in (ENABLED, DISABLED):
        raise errors.InjectionError(
            f"{where} is {value!r}: set it to {ENABLED!r} or {DISABLED!r} (or remove it)"
        )


def _check_conflicts(
    spec: Mapping[str, Any],
    containers: list[Mapping[str, Any]],
    init_containers: list[Mapping[str, Any]],
    settings: Settings,
) -> None:
    """Refuse a pod whose application would collide with the proxy, naming the collision."""
    proxy_ports = {settings.inbound_port, settings.outbound_port, settings.admin_port}
    listed = ", ".join(str(p) for p in sorted(proxy_ports))
    for c in init_containers:
        if c.get("name") == INIT_CONTAINER:
            raise errors.InjectionError(
                f"init container name {INIT_CONTAINER!r} is reserved for meshward: rename it"
            )
    for c in containers:
        for port in c.get("ports") or []:
            if isinstance(port, Mapping) and port.get("containerPort") in proxy_ports:
                raise errors.InjectionError(
                    f"container {c.get('name')!r} declares port {port['containerPort']}, which "
                    f"the meshward proxy listens on: move the application off ports {listed}, "
                    f"or annotate the pod {INJECT_ANNOTATION}: {DISABLED}"
                )
    pod_uid = _mapping(spec.get("securityContext"), "spec.securityContext").get("runAsUser")
    for c in containers:
        context = _mapping(c.get("securityContext"), "securityContext of a container")
        uid = context.get("runAsUser", pod_uid)
        if uid == settings.proxy_uid:
            raise errors.InjectionError(
                f"container {c.get('name')!r} runs as UID {uid}, the proxy's UID, so its traffic "
                "would bypass the proxy and its policy: run it as another user"
            )
    for volume in spec.get("volumes") or []:
        if isinstance(volume, Mapping) and volume.get("name") in RESERVED_VOLUMES:
            raise errors.InjectionError(
                f"volume name {volume['name']!r} is reserved for the meshward proxy: rename it"
            )


def proxy_container(settings: Settings) -> dict[str, Any]:
    """The sidecar: ``meshward proxy`` configured entirely by its environment."""
    local_name = f"$({POD_SA_VAR}).$({POD_NS_VAR}).{pki.IDENTITY_INFIX}.{settings.trust_domain}"
    env: list[dict[str, Any]] = [
        {"name": proxy_settings.IDENTITY_DIR, "value": IDENTITY_DIR},
        {
            "name": proxy_settings.TRUST_ANCHORS_FILE,
            "value": f"{TRUST_ROOTS_DIR}/{trustbundle.ANCHORS_KEY}",
        },
        {"name": proxy_settings.TOKEN_FILE, "value": TOKEN_FILE},
        _field_env(POD_SA_VAR, "spec.serviceAccountName"),
        _field_env(POD_NS_VAR, "metadata.namespace"),
        {"name": proxy_settings.LOCAL_NAME, "value": local_name},
        {"name": proxy_settings.IDENTITY_SVC_ADDR, "value": settings.identity_svc_addr},
        {"name": proxy_settings.IDENTITY_SVC_NAME, "value": settings.identity_svc_name},
        {"name": proxy_settings.POLICY_SVC_ADDR, "value": settings.policy_svc_addr},
        {"name": proxy_settings.POLICY_SVC_NAME, "value": settings.policy_svc_name},
        _field_env(proxy_settings.POD_NAME, "metadata.name"),
        {"name": proxy_settings.INBOUND_LISTEN_ADDR, "value": f"0.0.0.0:{settings.inbound_port}"},
        {
            "name": proxy_settings.OUTBOUND_LISTEN_ADDR,
            "value": f"127.0.0.1:{settings.outbound_port}",
        },
        {"name": proxy_settings.ADMIN_LISTEN_ADDR, "value": f"0.0.0.0:{settings.admin_port}"},
    ]
    return {
        "name": PROXY_CONTAINER,
        "image": settings.image,
        "command": ["meshward", "proxy"],
        "env": env,
        "ports": [
            {"name": PROXY_PORT_NAME, "containerPort": settings.inbound_port, "protocol": "TCP"},
            {"name": ADMIN_PORT_NAME, "containerPort": settings.admin_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/ready", "port": settings.admin_port},
            "initialDelaySeconds": 2,
        },
        "livenessProbe": {
            "httpGet": {"path": "/live", "port": settings.admin_port},
            "initialDelaySeconds": 10,
        },
        "resources": {
            "requests": {"cpu": settings.cpu_request, "memory": settings.memory_request},
            "limits": {"memory": settings.memory_limit},
        },
        "securityContext": {
            "runAsUser": settings.proxy_uid,
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [
            {"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": TRUST_ROOTS_VOLUME, "mountPath": TRUST_ROOTS_DIR, "readOnly": True},
        ],
    }


def init_container(settings: Settings) -> dict[str, Any]:
    """``meshward proxy-init``: installs the redirection rules, then exits."""
    skip_inbound = sorted({settings.admin_port, *settings.skip_inbound_ports})
    command = [
        "meshward",
        "proxy-init",
        "--inbound-port",
        str(settings.inbound_port),
        "--outbound-port",
        str(settings.outbound_port),
        "--proxy-uid",
        str(settings.proxy_uid),
        "--skip-inbound-ports",
        _ports(skip_inbound),
    ]
    if settings.skip_outbound_ports:
        command += ["--skip-outbound-ports", _ports(sorted(set(settings.skip_outbound_ports)))]
    return {
        "name": INIT_CONTAINER,
        "image": settings.image,
        "command": command,
        "resources": {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "128Mi"},
        },
        "securityContext": {
            # iptables needs root and these two capabilities, nothing more.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": XTABLES_VOLUME, "mountPath": "/run"}],
    }


def volumes() -> list[dict[str, Any]]:
    """The token the proxy proves its ServiceAccount with, its key's home, the trust roots it
    follows, iptables' lock."""
    return [
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": tokens.AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                            "path": TOKEN_VOLUME,
                        }
                    }
                ]
            },
        },
        {"name": IDENTITY_VOLUME, "emptyDir": {"medium": "Memory"}},
        {"name": TRUST_ROOTS_VOLUME, "configMap": {"name": commands.TRUST_ROOTS}},
        {"name": XTABLES_VOLUME, "emptyDir": {}},
    ]


def namespace_selector(skipped: Iterable[str]) -> dict[str, Any]:
    """A webhook namespaceSelector matching every namespace except ``skipped`` (exact names).

    It relies on the ``kubernetes.io/metadata.name`` label, which Kubernetes 1.21+ sets; on
    older clusters it matches everything, so the webhook must filter those namespaces too.
    """
    return {
        "matchExpressions": [
            {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": sorted(set(skipped))}
        ]
    }


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": path}}}


def _ports(ports: Iterable[int]) -> str:
    return ",".join(str(p) for p in ports)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.InjectionError(
            f"{where} is a {type(value).__name__}, not a mapping: fix the pod spec"
        )
    return value


def _containers(spec: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = spec.get(key) or []
    if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
        raise errors.InjectionError(f"spec.{key} must be a list of containers: fix the pod spec")
    return value


# -- manifests: what ``meshward inject`` walks -----------------------------------------------

TEMPLATE_PATHS: Mapping[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
"""Where each workload kind keeps the pod template injection applies to."""
OFFLINE_NAMESPACE: Mapping[str, str] = {INJECT_ANNOTATION: ENABLED}
"""Offline there is no Namespace to ask: asking for injection means the namespace enables it,
and a template annotated ``disabled`` still opts out."""


@dataclasses.dataclass(frozen=True)
class Report:
    """What happened to one object of a manifest: ``kind/name``, and why when it was skipped."""

    object: str
    injected: bool
    reason: str = ""

    def __str__(self) -> str:
        return (
            f"{self.object} injected" if self.injected else f"{self.object} skipped: {self.reason}"
        )


def inject_object(
    obj: Any, settings: Settings, injected_at: str, where: str = "object"
) -> tuple[dict[str, Any], list[Report]]:
    """Inject the pod template(s) of one manifest object: a Pod, a workload of
    :data:`TEMPLATE_PATHS`, or a ``List`` of them (other kinds pass through unchanged).

    Returns the object as it should be written and a report per object. Raises
    :class:`~meshward.errors.InjectionError` naming the object (``where`` says where it came
    from, such as "document 2") when it is not a Kubernetes object or can not be injected.
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("kind"), str) or not obj["kind"]:
        raise errors.InjectionError(
            f"{where} is not a Kubernetes object (a mapping with apiVersion and kind): fix it "
            "or remove it"
        )
    kind: str = obj["kind"]
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    label = f"{kind.lower()}/{name or '<unnamed>'}"
    if kind == "List":
        items = obj.get("items") or []
        if not isinstance(items, list):
            raise errors.InjectionError(f"{where} ({label}): items must be a list of objects")
        result, reports = copy.deepcopy(dict(obj)), []
        result["items"] = []
        for i, item in enumerate(items):
            injected, more = inject_object(item, settings, injected_at, f"{where}, item {i + 1}")
            result["items"].append(injected)
            reports += more
        return result, reports
    if kind != "Pod" and kind not in TEMPLATE_PATHS:
        return copy.deepcopy(dict(obj)), [Report(label, False, "not a workload with pods")]
    result = copy.deepcopy(dict(obj))
    template: Any = result
    holder: Any = None
    key = ""
    for key in TEMPLATE_PATHS.get(kind, ()):
        holder = template
        template = holder.get(key) if isinstance(holder, dict) else None
    if not isinstance(template, dict):
        dotted = ".".join(TEMPLATE_PATHS[kind])
        raise errors.InjectionError(
            f"{where} ({label}) has no pod template at {dotted}: fix the manifest"
        )
    try:
        outcome = inject(template, OFFLINE_NAMESPACE, settings, injected_at)
    except errors.InjectionError as exc:
        raise errors.InjectionError(f"{where} ({label}): {exc}") from None
    if isinstance(outcome, Skipped):
        return result, [Report(label, False, outcome.reason)]
    if holder is None:  # a Pod: the object is the template
        return outcome.pod, [Report(label, True)]
    holder[key] = outcome.pod
    return result, [Report(label, True)]
