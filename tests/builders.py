"""Builders for the policy inputs the unit tests compile: the resources a user would apply
(Server, ServerAuthorization, AuthorizationPolicy, MeshTLSAuthentication, NetworkAuthentication,
PeerAuthentication), already validated by their models, plus pods and the NamespaceState that
carries them into compile_namespace.

Every resource lives in namespace ``NS`` and is stamped ``CREATED`` unless told otherwise; the
spec fields are given as a user would write them in YAML (camelCase dicts), so a test reads
like the manifest it stands for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meshward.policy import resources, workload
from meshward.policy.compile import NamespaceState

NS = "app"
"""The namespace every builder puts its resource in unless told otherwise."""
TD = "cluster.local"
"""The trust domain of the identities the tests expect."""
CREATED = "2024-01-01T00:00:00Z"
"""The creationTimestamp every builder stamps unless told otherwise."""


def ident(sa: str, ns: str = NS) -> str:
    """The DNS-form identity compile writes for a service account."""
    return f"{sa}.{ns}.serviceaccount.identity.meshward.{TD}"


def meta(
    name: str, *, created: str | None = CREATED, ns: str = NS, **labels: str
) -> dict[str, Any]:
    """Object metadata; ``created=None`` leaves creationTimestamp out."""
    found: dict[str, Any] = {"name": name, "namespace": ns, "labels": labels}
    if created is not None:
        found["creationTimestamp"] = created
    return found


def server(
    name: str,
    port: int | str = 8080,
    app: str = "web",
    *,
    access: str = "deny",
    created: str | None = CREATED,
    **labels: str,
) -> resources.Server:
    """A Server selecting pods ``app=<app>``; ``labels`` go on the Server itself."""
    return resources.Server.model_validate(
        {
            "metadata": meta(name, created=created, **labels),
            "spec": {
                "podSelector": {"matchLabels": {"app": app}},
                "port": port,
                "accessPolicy": access,
            },
        }
    )


def authz(
    name: str, client: dict[str, Any], srv: str | None = "web-http", **selector: str
) -> resources.ServerAuthorization:
    """A ServerAuthorization of Server ``srv``, or with ``srv=None`` of the Servers whose labels
    match ``selector``."""
    ref: dict[str, Any] = {"name": srv} if srv else {"selector": {"matchLabels": selector}}
    return resources.ServerAuthorization.model_validate(
        {"metadata": meta(name), "spec": {"server": ref, "client": client}}
    )


def policy(
    name: str, refs: list[dict[str, str]], target: str = "web-http", kind: str = "Server"
) -> resources.AuthorizationPolicy:
    return resources.AuthorizationPolicy.model_validate(
        {
            "metadata": meta(name),
            "spec": {
                "targetRef": {"kind": kind, "name": target},
                "requiredAuthenticationRefs": refs,
            },
        }
    )


def mtls_auth(name: str, **spec: Any) -> resources.MeshTLSAuthentication:
    return resources.MeshTLSAuthentication.model_validate({"metadata": meta(name), "spec": spec})


def net_auth(name: str, *networks: dict[str, Any]) -> resources.NetworkAuthentication:
    """A NetworkAuthentication; each network as written, e.g. ``{"cidr": "10.0.0.0/8"}``."""
    return resources.NetworkAuthentication.model_validate(
        {"metadata": meta(name), "spec": {"networks": list(networks)}}
    )


def peer(
    name: str,
    mode: str,
    app: str | None = None,
    *,
    ports: Mapping[str, str] | None = None,
    created: str | None = CREATED,
    ns: str = NS,
) -> resources.PeerAuthentication:
    """A PeerAuthentication: namespace-wide, or with ``app`` for the pods ``app=<app>``;
    ``ports`` maps a port to its own mode."""
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if app:
        spec["selector"] = {"matchLabels": {"app": app}}
    if ports:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    return resources.PeerAuthentication.model_validate(
        {"metadata": meta(name, created=created, ns=ns), "spec": spec}
    )


def pod(
    name: str,
    app: str = "web",
    ports: Mapping[str, int] | None = None,
    probes: Sequence[tuple[int, str]] = (),
    *,
    default: str | None = None,
    host_network: bool = False,
    **labels: str,
) -> workload.Pod:
    """A pod labelled ``app=<app>`` (and ``labels``); ``default`` is its default-inbound-policy
    annotation, ``probes`` its HTTP probes as (port, path)."""
    return workload.Pod(
        name=name,
        labels={"app": app, **labels},
        annotations={workload.DEFAULT_POLICY_ANNOTATION: default} if default else {},
        ports=dict(ports or {}),
        probes=tuple(workload.HTTPProbe(port, path) for port, path in probes),
        host_network=host_network,
    )


WEB = pod("web-0", ports={"http": 8080})


def state(
    *items: resources.PolicyResource,
    pods: Sequence[workload.Pod] = (WEB,),
    annotations: Mapping[str, str] | None = None,
    mesh: Sequence[resources.PeerAuthentication] = (),
    ns: str = NS,
) -> NamespaceState:
    """The NamespaceState of namespace ``ns`` holding these resources and pods; ``mesh`` is the
    root namespace's PeerAuthentications."""

    def of(kind: type[Any]) -> list[Any]:
        return [i for i in items if isinstance(i, kind)]

    return NamespaceState(
        namespace=ns,
        annotations=dict(annotations or {}),
        pods=list(pods),
        servers=of(resources.Server),
        server_authorizations=of(resources.ServerAuthorization),
        authorization_policies=of(resources.AuthorizationPolicy),
        mesh_tls_authentications=of(resources.MeshTLSAuthentication),
        network_authentications=of(resources.NetworkAuthentication),
        peer_authentications=of(resources.PeerAuthentication),
        mesh_peer_authentications=list(mesh),
    )
