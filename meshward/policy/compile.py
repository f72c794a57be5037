"""Compile one namespace's policy resources into the PolicyDocument that proxies read.

Pure and deterministic: the same resources in any order give a byte-identical document (servers,
rules and pods are sorted by name, which Kubernetes keeps unique per kind in a namespace). It
never raises on user input: whatever is wrong with a resource becomes a ``False`` condition with
a message saying what to change, and that resource's effect is left out of the document, so a
mistake can only take access away (deny when in doubt), never grant it. That holds even for a
resource built without validation (``model_construct``): what the model would refuse, such as an
AuthorizationPolicy without authentications, is refused here too rather than trusted.

Mesh-wide PeerAuthentication is chosen here and nowhere else: callers pass every valid
PeerAuthentication of the root namespace, and this module picks the mesh-wide one from them, so
the root namespace and every other namespace agree on it.

Semantics follow Linkerd (Server, ServerAuthorization, AuthorizationPolicy, MeshTLSAuthentication,
NetworkAuthentication, default-inbound-policy annotations, probe paths) and Istio
(PeerAuthentication precedence). Identities are written in their Linkerd-style DNS form
``<sa>.<ns>.serviceaccount.identity.meshward.<trust-domain>``; SPIFFE-form patterns for a service
account are converted to it here, so the decision code compares strings only.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from meshward.policy import compiled, resources, workload
from meshward.policy.resources import DefaultPolicy

IDENTITY_INFIX = "serviceaccount.identity.meshward"

ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Cluster-wide inputs to compilation (from the operator's configuration)."""

    trust_domain: str = "cluster.local"
    cluster_networks: tuple[str, ...] = (
        "10.0.0.0/8",
        "100.64.0.0/10",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "fd00::/8",
    )
    default_policy: DefaultPolicy = DefaultPolicy.ALL_UNAUTHENTICATED
    root_namespace: str = "meshward"
    """Where the mesh-wide PeerAuthentication lives (Istio's root namespace)."""


@dataclasses.dataclass(frozen=True)
class NamespaceState:
    """Everything in one namespace that policy depends on, already parsed."""

    namespace: str
    annotations: Mapping[str, str]
    pods: Sequence[workload.Pod]
    servers: Sequence[resources.Server]
    server_authorizations: Sequence[resources.ServerAuthorization]
    authorization_policies: Sequence[resources.AuthorizationPolicy]
    mesh_tls_authentications: Sequence[resources.MeshTLSAuthentication]
    network_authentications: Sequence[resources.NetworkAuthentication]
    peer_authentications: Sequence[resources.PeerAuthentication]
    mesh_peer_authentications: Sequence[resources.PeerAuthentication] = ()
    """Every valid PeerAuthentication of the root namespace, selectors and all: do not filter.

    Compilation alone picks the mesh-wide one (no selector or empty ``matchLabels``; the oldest
    wins) and ignores the root namespace's workload ones, which select only pods of the root
    namespace. Filtering here as well is how the root namespace and the others came to disagree.
    """


@dataclasses.dataclass(frozen=True)
class CompileResult:
    document: compiled.PolicyDocument
    """Sealed: its hash is filled in."""
    conditions: Mapping[tuple[str, str], tuple[resources.Condition, ...]]
    """(kind, name) -> (Accepted, ResolvedRefs) for every resource of the namespace."""
    warnings: tuple[str, ...]
    """Problems that belong to no policy resource (annotations, settings)."""


# -- identities ------------------------------------------------------------------------------


def identity_name(service_account: str, namespace: str, trust_domain: str) -> str:
    """The DNS-form identity of a service account (``*`` as the name: any in the namespace)."""
    return f"{service_account}.{namespace}.{IDENTITY_INFIX}.{trust_domain}"


def spiffe_to_dns(spiffe_id: str) -> str | None:
    """``spiffe://<td>/ns/<ns>/sa/<sa>`` -> ``<sa>.<ns>.serviceaccount.identity.meshward.<td>``.

    None for anything else (other SPIFFE paths, a wildcard namespace or trust domain), which
    callers keep as an exact string. ``sa`` may be ``*`` (a pattern for any SA of the namespace).
    """
    if not spiffe_id.startswith("spiffe://"):
        return None
    parts = spiffe_id[9:].split("/")
    if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
        return None
    td, ns, sa = parts[0], parts[2], parts[4]
    if not td or not ns or not sa or "*" in td or "*" in ns or ("*" in sa and sa != "*"):
        return None
    return identity_name(sa, ns, td)


def identity_pattern(pattern: str) -> str:
    """A pattern in its canonical form: SPIFFE service-account patterns become DNS form."""
    return spiffe_to_dns(pattern) or pattern


# -- conditions ------------------------------------------------------------------------------


def _condition(type_: str, ok: bool, reason: str, message: str) -> resources.Condition:
    return resources.Condition(
        type=type_, status="True" if ok else "False", reason=reason, message=message
    )


_ACCEPTED_OK = _condition(ACCEPTED, True, "Accepted", "valid and in effect")
_RESOLVED_OK = _condition(RESOLVED_REFS, True, "Resolved", "every reference resolves")
_OK = (_ACCEPTED_OK, _RESOLVED_OK)


# -- helpers ---------------------------------------------------------------------------------

_R = TypeVar("_R", bound=resources.PolicyResource)

_NEVER = datetime.datetime.max.replace(tzinfo=datetime.UTC)


def _created(meta: resources.Meta) -> tuple[datetime.datetime, str]:
    """Age order: creationTimestamp, then name; an unknown or unreadable time counts as newest."""
    ts = meta.creation_timestamp
    when = _NEVER
    if ts:
        try:
            parsed = datetime.datetime.fromisoformat(ts)
        except ValueError:
            parsed = _NEVER
        when = parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)
    return when, meta.name


def _by_name(items: Iterable[_R]) -> list[_R]:
    """Resources sorted by name (unique per kind and namespace, as the API server keeps them)."""
    return sorted(items, key=lambda r: r.metadata.name)


def _parse_policy(value: str, where: str, warnings: list[str]) -> DefaultPolicy:
    """A default-policy annotation value; an invalid one warns and means deny."""
    try:
        return DefaultPolicy(value.strip())
    except ValueError:
        allowed = ", ".join(p.value for p in DefaultPolicy)
        warnings.append(
            f"{where}: annotation {workload.DEFAULT_POLICY_ANNOTATION}={value!r} is not one of "
            f"{allowed}; using deny until it is fixed"
        )
        return DefaultPolicy.DENY


def _server_port(server: resources.Server) -> int | str:
    """The Server's port. The model refuses an all-digit name, but one built without
    validation may carry it; it can only mean the number (port names need a letter)."""
    port = server.spec.port
    if isinstance(port, str) and port.isdigit():
        return int(port)
    return port


def _networks(nets: Iterable[resources.Network]) -> tuple[compiled.Network, ...]:
    return tuple(compiled.Network(cidr=n.cidr, except_=n.except_) for n in nets)


def _cluster_group(settings: Settings, warnings: list[str]) -> tuple[compiled.Network, ...]:
    # Settings is a plain dataclass: only the operator's loader validates it, and callers such as
    # tests and tools construct it directly, so a bad CIDR must not reach the document here.
    group = []
    for cidr in settings.cluster_networks:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            warnings.append(f"cluster network {cidr!r} is not a CIDR; it is ignored")
            continue
        group.append(compiled.Network(cidr=cidr))
    return tuple(group)


def _names(items: Iterable[str], limit: int = 5) -> str:
    listed = sorted(items)
    shown = ", ".join(listed[:limit])
    return shown + (f" and {len(listed) - limit} more" if len(listed) > limit else "")


def _workload_labels(pa: resources.PeerAuthentication) -> dict[str, str] | None:
    """A workload PeerAuthentication's ``matchLabels``; None for a namespace-wide one (or,
    in the root namespace, mesh-wide): no selector, or one with empty ``matchLabels``."""
    sel = pa.spec.selector
    return dict(sel.match_labels) if sel is not None and sel.match_labels else None


def _selector_text(sel: resources.LabelSelector, what: str = "pod") -> str:
    if not sel.match_labels and not sel.match_expressions:
        return f"{{}} (every {what})"
    return json.dumps(sel.dump(), sort_keys=True)


# -- the compiler ----------------------------------------------------------------------------


class _Compiler:
    """One compilation; holds the namespace's indexes while rules are resolved."""

    def __init__(self, state: NamespaceState, settings: Settings) -> None:
        self.state = state
        self.settings = settings
        self.ns = state.namespace
        self.td = settings.trust_domain
        self.warnings: list[str] = []
        self.conditions: dict[tuple[str, str], tuple[resources.Condition, ...]] = {}
        self.cluster_group = _cluster_group(settings, self.warnings)
        self.pods = sorted((p for p in state.pods if not p.host_network), key=lambda p: p.name)
        self.pod_labels = {p.name: dict(p.labels) for p in self.pods}
        self.rejected_servers: dict[str, str] = {}

    def set(
        self,
        resource: resources.PolicyResource,
        accepted: resources.Condition,
        resolved: resources.Condition,
    ) -> None:
        ok = accepted is _ACCEPTED_OK and resolved is _RESOLVED_OK
        self.conditions[(resource.kind, resource.metadata.name)] = (
            _OK if ok else (accepted, resolved)
        )

    def run(self) -> CompileResult:
        annotation = self.state.annotations.get(workload.DEFAULT_POLICY_ANNOTATION)
        ns_default = (
            self.settings.default_policy
            if annotation is None
            else _parse_policy(annotation, f"namespace {self.ns}", self.warnings)
        )
        doc_pods = {p.name: self.pod(p) for p in self.pods}

        servers = self.servers()
        rules: dict[str, list[compiled.Rule]] = {name: [] for name in servers}
        self.server_authorizations(servers, rules)
        self.authorization_policies(servers, rules)
        self.authentications()
        mesh_pa, own_pas = self.peer_authentications()

        compiled_servers = []
        for name in sorted(servers):
            srv = servers[name]
            compiled_servers.append(
                compiled.Server(
                    name=name,
                    pod_selector=srv.spec.pod_selector,
                    port=_server_port(srv),
                    proxy_protocol=srv.spec.proxy_protocol,
                    access_policy=srv.spec.access_policy,
                    rules=tuple(sorted(rules[name], key=lambda r: (r.kind, r.name))),
                )
            )
        document = compiled.PolicyDocument(
            namespace=self.ns,
            trust_domain=self.td,
            cluster_networks=tuple(n.cidr for n in self.cluster_group),
            default_policy=ns_default,
            servers=tuple(compiled_servers),
            pods=doc_pods,
            mesh_peer_authentication=mesh_pa,
            peer_authentications=own_pas,
        ).sealed()
        conditions = {k: self.conditions[k] for k in sorted(self.conditions)}
        return CompileResult(
            document=document, conditions=conditions, warnings=tuple(self.warnings)
        )

    # -- pods --

    def pod(self, p: workload.Pod) -> compiled.Pod:
        annotation = p.annotations.get(workload.DEFAULT_POLICY_ANNOTATION)
        default = (
            None
            if annotation is None
            else _parse_policy(annotation, f"pod {self.ns}/{p.name}", self.warnings)
        )
        probes = sorted({(pr.port, pr.path) for pr in p.probes})
        return compiled.Pod(
            labels=dict(p.labels),
            default_policy=default,
            ports=dict(p.ports),
            probes=tuple(compiled.HTTPMatchOnPort(port=port, path=path) for port, path in probes),
        )

    # -- Servers --

    def servers(self) -> dict[str, resources.Server]:
        """The Servers in effect; a newer Server claiming a port an older one holds is left out."""
        claims: dict[tuple[str, int], str] = {}
        accepted: dict[str, resources.Server] = {}
        candidates = _by_name(self.state.servers)
        for srv in sorted(candidates, key=lambda s: _created(s.metadata)):
            name = srv.metadata.name
            port = _server_port(srv)
            selector = srv.spec.pod_selector
            selected = [p for p in self.pods if selector.matches(self.pod_labels[p.name])]
            if isinstance(port, int):
                resolved = [(p.name, port) for p in selected]
            else:
                resolved = [(p.name, p.ports[port]) for p in selected if port in p.ports]

            if not selected:
                refs = _condition(
                    RESOLVED_REFS,
                    False,
                    "NoMatchingPods",
                    f"podSelector {_selector_text(selector)} matches no pod in namespace "
                    f"{self.ns}; the Server takes effect when such pods exist",
                )
            elif isinstance(port, str) and not resolved:
                refs = _condition(
                    RESOLVED_REFS,
                    False,
                    "UnknownNamedPort",
                    f"none of the selected pods ({_names(p.name for p in selected)}) has a "
                    f"container port named {port!r}; name a declared port or use its number",
                )
            elif isinstance(port, str) and len(resolved) < len(selected):
                missing = {p.name for p in selected} - {pod for pod, _ in resolved}
                refs = _condition(
                    RESOLVED_REFS,
                    True,
                    "Resolved",
                    f"port {port!r} resolves on {len(resolved)} of {len(selected)} selected "
                    f"pods; not on {_names(missing)}",
                )
            else:
                refs = _RESOLVED_OK

            conflicts = [(pod, p, claims[(pod, p)]) for pod, p in resolved if (pod, p) in claims]
            if conflicts:
                pod, p, holder = conflicts[0]
                more = f" (and {len(conflicts) - 1} more pods)" if len(conflicts) > 1 else ""
                msg = (
                    f"port {p} on pod {pod}{more} is already claimed by Server {holder}, which "
                    "is older (or as old and first by name); change this Server's port or "
                    "podSelector, or delete one of them"
                )
                self.rejected_servers[name] = msg
                self.set(srv, _condition(ACCEPTED, False, "PortConflict", msg), refs)
                continue
            for key in resolved:
                claims[key] = name
            accepted[name] = srv
            self.set(srv, _ACCEPTED_OK, refs)
        return accepted

    def missing_server(self, name: str) -> resources.Condition:
        if name in self.rejected_servers:
            return _condition(
                RESOLVED_REFS,
                False,
                "ServerNotAccepted",
                f"Server {name} is not in effect: {self.rejected_servers[name]}",
            )
        return _condition(
            RESOLVED_REFS,
            False,
            "ServerNotFound",
            f"there is no Server {name} in namespace {self.ns}; create it or fix the name",
        )

    # -- ServerAuthorization --

    def server_authorizations(
        self, servers: dict[str, resources.Server], rules: dict[str, list[compiled.Rule]]
    ) -> None:
        for sa in _by_name(self.state.server_authorizations):
            ref = sa.spec.server
            if ref.name is not None:
                targets = [ref.name] if ref.name in servers else []
                refs = _RESOLVED_OK if targets else self.missing_server(ref.name)
            elif ref.selector is None:  # the model refuses this; one built without it may not
                msg = "server sets neither name nor selector; set exactly one of them"
                self.set(
                    sa,
                    _condition(ACCEPTED, False, "InvalidServerRef", msg),
                    _condition(RESOLVED_REFS, False, "InvalidServerRef", msg),
                )
                continue
            else:
                sel = ref.selector
                targets = [n for n in sorted(servers) if sel.matches(servers[n].metadata.labels)]
                refs = _RESOLVED_OK
                if not targets:
                    refs = _condition(
                        RESOLVED_REFS,
                        False,
                        "NoMatchingServers",
                        f"server.selector {_selector_text(sel, 'Server')} matches "
                        f"no Server in effect in namespace {self.ns}; label a Server to match",
                    )
            networks = sa.spec.client.networks
            if networks is not None and not networks:
                invalid = _condition(
                    ACCEPTED,
                    False,
                    "InvalidNetworks",
                    "client.networks is an empty list, so no client could match; remove it "
                    "to mean the cluster networks, or list CIDRs",
                )
                self.set(sa, invalid, refs)
                continue
            rule = self.sa_rule(sa)
            for t in targets:
                rules[t].append(rule)
            self.set(sa, _ACCEPTED_OK, refs)

    def sa_rule(self, sa: resources.ServerAuthorization) -> compiled.Rule:
        client = sa.spec.client
        networks = (
            (self.cluster_group,) if client.networks is None else (_networks(client.networks),)
        )
        identities: tuple[tuple[str, ...], ...] = ()
        tls = False
        mtls = client.mesh_tls
        if not client.unauthenticated and mtls is not None:
            tls = True
            if mtls.identities:
                identities = (tuple(sorted({identity_pattern(i) for i in mtls.identities})),)
            elif mtls.service_accounts:
                identities = (
                    tuple(
                        sorted(
                            {
                                identity_name(s.name, s.namespace or self.ns, self.td)
                                for s in mtls.service_accounts
                            }
                        )
                    ),
                )
        return compiled.Rule(
            kind="ServerAuthorization",
            name=sa.metadata.name,
            identities=identities,
            networks=networks,
            tls=tls,
        )

    # -- AuthorizationPolicy --

    def authorization_policies(
        self, servers: dict[str, resources.Server], rules: dict[str, list[compiled.Rule]]
    ) -> None:
        mtls_auths = {m.metadata.name: m for m in _by_name(self.state.mesh_tls_authentications)}
        net_auths = {n.metadata.name: n for n in _by_name(self.state.network_authentications)}
        mtls_groups: dict[str, tuple[str, ...]] = {}  # shared by the policies naming them
        net_groups: dict[str, tuple[compiled.Network, ...]] = {}
        for ap in _by_name(self.state.authorization_policies):
            target = ap.spec.target_ref
            targets: list[str] = []
            target_problem: resources.Condition | None = None
            invalid_target: str | None = None
            if target.kind == "Server":
                if target.group not in (None, "", resources.GROUP):
                    invalid_target = (
                        f"targetRef group {target.group!r} is not {resources.GROUP}; "
                        "set it to that or leave it out"
                    )
                elif target.name in servers:
                    targets = [target.name]
                else:
                    target_problem = self.missing_server(target.name)
            elif target.group not in (None, "", "core"):
                invalid_target = (
                    f"targetRef group {target.group!r} for a Namespace must be empty or core"
                )
            elif target.name != self.ns:
                invalid_target = (
                    f"targetRef Namespace {target.name} is not this policy's namespace "
                    f"{self.ns}; a policy can target only its own namespace"
                )
            else:
                targets = sorted(servers)

            identity_groups: list[tuple[str, ...]] = []
            network_groups: list[tuple[compiled.Network, ...]] = []
            missing: list[str] = []
            for ref in ap.spec.required_authentication_refs:
                ref_ns = ref.namespace or self.ns
                where = f"{ref.kind} {ref_ns}/{ref.name}"
                if ref.kind == "ServiceAccount":
                    if ref.group not in (None, "", "core"):
                        missing.append(f"{where}: group {ref.group!r} must be empty or core")
                        continue
                    identity_groups.append((identity_name(ref.name, ref_ns, self.td),))
                    continue
                if ref.group not in (None, "", resources.GROUP):
                    missing.append(f"{where}: group {ref.group!r} is not {resources.GROUP}")
                    continue
                if ref_ns != self.ns:
                    missing.append(f"{where}: only refs in the policy's own namespace resolve")
                    continue
                if ref.kind == "MeshTLSAuthentication":
                    m = mtls_auths.get(ref.name)
                    if m is None:
                        missing.append(f"{where} does not exist")
                        continue
                    if ref.name not in mtls_groups:
                        mtls_groups[ref.name] = self.mtls_patterns(m)
                    identity_groups.append(mtls_groups[ref.name])
                else:
                    n = net_auths.get(ref.name)
                    if n is None:
                        missing.append(f"{where} does not exist")
                        continue
                    if ref.name not in net_groups:
                        net_groups[ref.name] = _networks(n.spec.networks)
                    network_groups.append(net_groups[ref.name])

            if not ap.spec.required_authentication_refs:
                # No requirement at all would allow every client: refuse it, whatever the model
                # let through (it refuses this too, but compile must not depend on that).
                self.set(
                    ap,
                    _condition(
                        ACCEPTED,
                        False,
                        "NoAuthentications",
                        "requiredAuthenticationRefs is empty, which would allow every client; "
                        "list at least one authentication ref (a MeshTLSAuthentication, "
                        "NetworkAuthentication or ServiceAccount)",
                    ),
                    _condition(RESOLVED_REFS, False, "InvalidTarget", invalid_target)
                    if invalid_target is not None
                    else target_problem or _RESOLVED_OK,
                )
                continue
            if invalid_target is not None:
                self.set(
                    ap,
                    _condition(ACCEPTED, False, "InvalidTarget", invalid_target),
                    _condition(RESOLVED_REFS, False, "InvalidTarget", invalid_target),
                )
                continue
            if missing:
                if target_problem is not None:
                    missing.append(target_problem.message)
                msg = "; ".join(missing) + " (the policy grants nothing until every ref resolves)"
                self.set(
                    ap,
                    _condition(ACCEPTED, False, "RefNotFound", msg),
                    _condition(RESOLVED_REFS, False, "RefNotFound", msg),
                )
                continue
            rule = compiled.Rule(
                kind="AuthorizationPolicy",
                name=ap.metadata.name,
                identities=tuple(identity_groups),
                networks=tuple(network_groups),
                tls=bool(identity_groups),
            )
            for t in targets:
                rules[t].append(rule)
            self.set(ap, _ACCEPTED_OK, target_problem or _RESOLVED_OK)

    def mtls_patterns(self, m: resources.MeshTLSAuthentication) -> tuple[str, ...]:
        """One identity group: the authentication's identities, or its refs as identities."""
        own_ns = m.metadata.namespace or self.ns
        patterns: set[str] = set()
        for ident in m.spec.identities or ():
            patterns.add(identity_pattern(ident))
        for ref in m.spec.identity_refs or ():
            if ref.kind == "ServiceAccount":
                patterns.add(identity_name(ref.name, ref.namespace or own_ns, self.td))
            elif ref.name == "*":
                patterns.add(f"*.{IDENTITY_INFIX}.{self.td}")
            else:
                patterns.add(identity_name("*", ref.name, self.td))
        return tuple(sorted(patterns))

    def authentications(self) -> None:
        for m in _by_name(self.state.mesh_tls_authentications):
            self.set(m, _ACCEPTED_OK, _RESOLVED_OK)
        for n in _by_name(self.state.network_authentications):
            self.set(n, _ACCEPTED_OK, _RESOLVED_OK)

    # -- PeerAuthentication --

    def peer_authentications(
        self,
    ) -> tuple[compiled.PeerAuthentication | None, tuple[compiled.PeerAuthentication, ...]]:
        """Istio's choice: the oldest selector-less policy per level, workload ones by age.

        The mesh-wide policy is picked from every PeerAuthentication of the root namespace
        (``mesh_peer_authentications``, plus this namespace's own when it is the root); the root
        namespace's workload policies select pods of the root namespace only, so other
        namespaces ignore them.
        """

        def selectorless(pa: resources.PeerAuthentication) -> bool:
            return _workload_labels(pa) is None

        def to_compiled(pa: resources.PeerAuthentication, ns: str) -> compiled.PeerAuthentication:
            return compiled.PeerAuthentication(
                name=pa.metadata.name,
                namespace=pa.metadata.namespace or ns,
                selector=_workload_labels(pa),
                mode=pa.spec.mtls.mode,
                port_level_mtls={p: m.mode for p, m in sorted(pa.spec.port_level_mtls.items())},
            )

        own = _by_name(self.state.peer_authentications)
        own_wide = sorted((p for p in own if selectorless(p)), key=lambda p: _created(p.metadata))
        is_root = self.ns == self.settings.root_namespace
        mesh_candidates = [
            (p, self.settings.root_namespace)
            for p in _by_name(self.state.mesh_peer_authentications)
            if selectorless(p)
        ]
        if is_root:
            known = {p.metadata.name for p, _ in mesh_candidates}
            mesh_candidates += [(p, self.ns) for p in own_wide if p.metadata.name not in known]
        mesh_candidates.sort(key=lambda c: _created(c[0].metadata))
        mesh = to_compiled(*mesh_candidates[0]) if mesh_candidates else None

        level = "mesh-wide" if is_root else "namespace-wide"
        if is_root:
            winner = mesh_candidates[0][0].metadata.name if mesh_candidates else None
        else:
            winner = own_wide[0].metadata.name if own_wide else None
        for pa in own_wide:
            if pa.metadata.name == winner:
                self.set(pa, _ACCEPTED_OK, _RESOLVED_OK)
            else:
                self.set(
                    pa,
                    _condition(
                        ACCEPTED,
                        False,
                        "Superseded",
                        f"the older {level} PeerAuthentication {winner} is in effect (Istio uses "
                        "the oldest); delete one of them or give this one a selector",
                    ),
                    _RESOLVED_OK,
                )
        out: list[compiled.PeerAuthentication] = []
        if own_wide and not is_root:
            out.append(to_compiled(own_wide[0], self.ns))
        workload_pas = sorted(
            ((p, sel) for p in own if (sel := _workload_labels(p)) is not None),
            key=lambda c: _created(c[0].metadata),
        )
        for pa, selected in workload_pas:
            wanted = selected.items()
            if any(wanted <= labels.items() for labels in self.pod_labels.values()):
                refs = _RESOLVED_OK
            else:
                refs = _condition(
                    RESOLVED_REFS,
                    False,
                    "NoMatchingPods",
                    f"selector.matchLabels {json.dumps(dict(wanted), sort_keys=True)} matches no "
                    f"pod in namespace {self.ns}; it takes effect when such pods exist",
                )
            self.set(pa, _ACCEPTED_OK, refs)
            out.append(to_compiled(pa, self.ns))
        return mesh, tuple(out)


def compile_namespace(state: NamespaceState, settings: Settings) -> CompileResult:
    """Compile one namespace; see the module docstring for the guarantees."""
    return _Compiler(state, settings).run()
