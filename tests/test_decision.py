"""Decisions, table-driven: each row builds its policy from resources through compile_namespace
(so the compiler and the decision index are tested together) and checks the verdict and the
rule that gave it, as a person reading proxy metrics would."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest

from meshward.policy import compiled, resources, workload
from meshward.policy.compile import Settings, compile_namespace
from meshward.policy.decision import Client, Decision, Destination, Policy, Request, decide
from meshward.policy.resources import DefaultPolicy, MTLSMode
from tests.builders import (
    CREATED,
    NS,
    TD,
    WEB,
    authz,
    ident,
    meta,
    mtls_auth,
    net_auth,
    peer,
    pod,
    policy,
    server,
    state,
)

OLD, NEW = CREATED, "2024-06-01T00:00:00Z"


def spiffe(sa: str, ns: str = NS, td: str = TD) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


# -- resource builders (what a user would apply; the shared ones are in tests.builders) -------


def authz_ids(*patterns: str) -> resources.ServerAuthorization:
    return authz("allow", {"meshTLS": {"identities": list(patterns)}})


def build(
    *items: resources.PolicyResource,
    pods: tuple[workload.Pod, ...] = (WEB,),
    default: DefaultPolicy = DefaultPolicy.DENY,
    ns_default: str | None = None,
    mesh: tuple[resources.PeerAuthentication, ...] = (),
) -> Policy:
    """Compile one namespace from these resources and index it."""
    annotations = {workload.DEFAULT_POLICY_ANNOTATION: ns_default} if ns_default else {}
    st = state(*items, pods=pods, annotations=annotations, mesh=mesh)
    return Policy(compile_namespace(st, Settings(default_policy=default)).document)


# -- clients ---------------------------------------------------------------------------------

IN_IP, OUT_IP = "10.1.2.3", "203.0.113.7"
PLAIN_IN = Client(source_ip=IN_IP)
PLAIN_OUT = Client(source_ip=OUT_IP)
MTLS_IN = Client(identity=spiffe("frontend"), source_ip=IN_IP, tls=True)
MTLS_OUT = Client(identity=spiffe("frontend"), source_ip=OUT_IP, tls=True)
TLS_NOID = Client(source_ip=IN_IP, tls=True)
CLIENTS = {
    "plain-in": PLAIN_IN,
    "plain-out": PLAIN_OUT,
    "mtls-in": MTLS_IN,
    "mtls-out": MTLS_OUT,
    "tls-noid": TLS_NOID,
}


def mtls(identity: str, ip: str = IN_IP) -> Client:
    return Client(identity=identity, source_ip=ip, tls=True)


@dataclasses.dataclass(frozen=True)
class Want:
    allowed: bool
    rule_kind: str
    rule_name: str
    server: str | None = None
    """server_name, when the row cares."""
    audit: bool = False
    mtls: MTLSMode | None = None


def allow(kind: str, name: str, **kw: Any) -> Want:
    return Want(True, kind, name, **kw)


def deny(kind: str, name: str, **kw: Any) -> Want:
    return Want(False, kind, name, **kw)


# -- scenarios: named policies, built once ---------------------------------------------------

SCENARIOS: dict[str, Callable[[], Policy]] = {}


def scenario(fn: Callable[[], Policy]) -> Callable[[], Policy]:
    SCENARIOS[fn.__name__] = functools.cache(fn)
    return fn


for _p in DefaultPolicy:
    SCENARIOS[f"default_{_p.value}"] = functools.cache(
        functools.partial(build, default=_p)  # no Server: the default decides
    )


def _pattern_scenario(*patterns: str) -> Callable[[], Policy]:
    return functools.cache(lambda: build(server("web-http", 8080), authz_ids(*patterns)))


SCENARIOS |= {
    "exact_dns": _pattern_scenario(ident("frontend")),
    "suffix": _pattern_scenario(f"*.{NS}.serviceaccount.identity.meshward.{TD}"),
    "any": _pattern_scenario("*"),
    "spiffe_exact": _pattern_scenario(spiffe("frontend")),
    "spiffe_sa_wildcard": _pattern_scenario(f"spiffe://{TD}/ns/{NS}/sa/*"),
    "spiffe_other_form": _pattern_scenario(f"spiffe://{TD}/workload/batch"),
    "two_patterns": _pattern_scenario(ident("frontend"), spiffe("ops", "tools")),
}


@scenario
def service_accounts() -> Policy:
    return build(
        server("web-http", 8080),
        authz(
            "allow",
            {
                "meshTLS": {
                    "serviceAccounts": [{"name": "frontend"}, {"name": "ci", "namespace": "tools"}]
                }
            },
        ),
    )


@scenario
def unauthenticated_tls() -> Policy:
    return build(
        server("web-http", 8080), authz("allow", {"meshTLS": {"unauthenticatedTLS": True}})
    )


@scenario
def networks_except() -> Policy:
    nets = [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}, {"cidr": "2001:db8::/32"}]
    return build(
        server("web-http", 8080), authz("inside", {"unauthenticated": True, "networks": nets})
    )


@scenario
def networks_default() -> Policy:
    return build(server("web-http", 8080), authz("cluster", {"unauthenticated": True}))


@scenario
def mtls_networks() -> Policy:
    client = {
        "meshTLS": {"identities": [ident("frontend")]},
        "networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}],
    }
    return build(server("web-http", 8080), authz("fe-internal", client))


@scenario
def precedence() -> Policy:
    """Cluster all-unauthenticated < namespace deny < pod annotation < Server accessPolicy."""
    return build(
        server("web-http", 8080, app="web", access="all-unauthenticated"),
        server("open-admin", 9090, app="open", access="all-authenticated"),
        pods=(WEB, pod("open-0", "open", default="all-unauthenticated")),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        ns_default="deny",
    )


@scenario
def invalid_annotations() -> Policy:
    return build(
        pods=(WEB, pod("odd-0", "odd", default="allow-all")),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        ns_default="everything-goes",
    )


@scenario
def pod_annotation_only() -> Policy:
    return build(
        pods=(WEB, pod("strict-0", "strict", default="cluster-authenticated")),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


@scenario
def named_ports() -> Policy:
    return build(
        server("web-http", "http"),
        pods=(WEB, pod("web-1", "web", {"http": 8000})),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


@scenario
def numeric_port() -> Policy:
    return build(server("web-http", 8080), default=DefaultPolicy.ALL_UNAUTHENTICATED)


@scenario
def probes() -> Policy:
    web = pod(
        "web-0",
        "web",
        {"http": 8080},
        probes=((8081, "/healthz"), (8081, "/ready"), (8080, "/live")),
    )
    return build(server("web-http", "http"), pods=(web,), default=DefaultPolicy.DENY)


@scenario
def probes_strict() -> Policy:
    web = pod("web-0", "web", {"http": 8080}, probes=((8081, "/healthz"),))
    return build(
        server("web-http", "http"),
        pods=(web,),
        default=DefaultPolicy.DENY,
        mesh=(peer("mesh-default", "STRICT", ns="meshward"),),
    )


@scenario
def ap_all_refs() -> Policy:
    return build(
        server("web-http", 8080),
        mtls_auth("frontend-id", identities=[spiffe("frontend")]),
        net_auth("internal", {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}),
        policy(
            "fe-internal",
            [
                {"kind": "MeshTLSAuthentication", "name": "frontend-id"},
                {"kind": "NetworkAuthentication", "name": "internal"},
            ],
        ),
    )


@scenario
def ap_namespace_target() -> Policy:
    return build(
        server("web-http", 8080),
        server("web-admin", 9090),
        net_auth("office", {"cidr": "192.168.0.0/16"}),
        policy("ns-net", [{"kind": "NetworkAuthentication", "name": "office"}], NS, "Namespace"),
        policy("ns-sa", [{"kind": "ServiceAccount", "name": "backend"}], NS, "Namespace"),
    )


@scenario
def ap_identity_refs() -> Policy:
    refs = [
        {"kind": "Namespace", "name": "other"},
        {"kind": "ServiceAccount", "name": "*", "namespace": "ops"},
        {"kind": "ServiceAccount", "name": "frontend"},
    ]
    return build(
        server("web-http", 8080),
        mtls_auth("by-refs", identityRefs=refs),
        policy("refs", [{"kind": "MeshTLSAuthentication", "name": "by-refs"}]),
    )


@scenario
def ap_broken_ref() -> Policy:
    """A policy with a missing ref grants nothing, even when its other refs would match."""
    return build(
        server("web-http", 8080),
        net_auth("internal", {"cidr": "10.0.0.0/8"}),
        policy(
            "half",
            [
                {"kind": "NetworkAuthentication", "name": "internal"},
                {"kind": "MeshTLSAuthentication", "name": "missing"},
            ],
        ),
    )


PODS_PA = (WEB, pod("db-0", "db", {"pg": 5432}))


@scenario
def pa_none() -> Policy:
    return build(pods=PODS_PA, default=DefaultPolicy.ALL_UNAUTHENTICATED)


@scenario
def pa_mesh_strict() -> Policy:
    return build(
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        mesh=(peer("mesh-default", "STRICT", ns="meshward"),),
    )


@scenario
def pa_namespace_over_mesh() -> Policy:
    return build(
        peer("ns-default", "PERMISSIVE"),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        mesh=(peer("mesh-default", "STRICT", ns="meshward"),),
    )


@scenario
def pa_namespace_unset() -> Policy:
    return build(
        peer("ns-default", "UNSET"),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        mesh=(peer("mesh-default", "STRICT", ns="meshward"),),
    )


@scenario
def pa_workload() -> Policy:
    return build(
        peer("ns-strict", "STRICT"),
        peer("web-disable", "DISABLE", app="web"),
        peer("db-ports", "UNSET", app="db", ports={"8081": "PERMISSIVE", "8082": "UNSET"}),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
        mesh=(peer("mesh-default", "PERMISSIVE", ns="meshward"),),
    )


@scenario
def pa_port_strict() -> Policy:
    return build(
        peer("web-ports", "PERMISSIVE", app="web", ports={"8080": "STRICT"}),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


@scenario
def pa_oldest_workload() -> Policy:
    return build(
        peer("a-newer", "STRICT", app="web", created=NEW),
        peer("z-older", "PERMISSIVE", app="web", created=OLD),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


@scenario
def pa_oldest_namespace() -> Policy:
    return build(
        peer("a-newer", "PERMISSIVE", created=NEW),
        peer("z-older", "STRICT", created=OLD),
        pods=PODS_PA,
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


@scenario
def pa_disable_hides_identity() -> Policy:
    return build(
        peer("ns-disable", "DISABLE"),
        server("web-http", 8080),
        authz_ids(ident("frontend")),
        pods=PODS_PA,
    )


# -- the table -------------------------------------------------------------------------------


def D(port: int, pod_name: str | None = "web-0", **labels: str) -> Destination:
    return Destination(port=port, labels=labels, pod=pod_name)


GET = Request("GET", "/")
SA, AP = "ServerAuthorization", "AuthorizationPolicy"
PA, DEF = "PeerAuthentication", "default"

ROWS: list[Any] = []


def row(
    scn: str, dest: Destination, client: Client, want: Want, req: Request | None = None, *, id: str
) -> None:
    ROWS.append(pytest.param(scn, dest, client, req, want, id=f"{scn}:{id}"))


# every default policy x every kind of client, on a port no Server covers
_DEFAULT_MATRIX = {
    "all-unauthenticated": {"plain-in", "plain-out", "mtls-in", "mtls-out", "tls-noid"},
    "all-authenticated": {"mtls-in", "mtls-out"},
    "cluster-unauthenticated": {"plain-in", "mtls-in", "tls-noid"},
    "cluster-authenticated": {"mtls-in"},
    "deny": set(),
    "audit": {"plain-in", "plain-out", "mtls-in", "mtls-out", "tls-noid"},
}
for _policy, _allowed in _DEFAULT_MATRIX.items():
    for _name, _client in CLIENTS.items():
        _want = Want(_name in _allowed, DEF, _policy, server=_policy, audit=_policy == "audit")
        row(f"default_{_policy}", D(7000), _client, _want, id=_name)

# identity patterns on a Server (accessPolicy deny when nothing matches)
NO = deny(DEF, "deny", server="web-http")
YES = allow(SA, "allow", server="web-http")
_FRONTEND_DNS = mtls(ident("frontend"))
_BACKEND = mtls(spiffe("backend"))
_OTHER_NS = mtls(spiffe("frontend", "other"))
_FOREIGN_TD = mtls(spiffe("frontend", td="example.org"))
_PATTERN_TABLE = {
    "exact_dns": {"spiffe": YES, "dns": YES, "backend": NO, "other-ns": NO, "foreign-td": NO},
    "suffix": {"spiffe": YES, "dns": YES, "backend": YES, "other-ns": NO, "foreign-td": NO},
    "any": {"spiffe": YES, "dns": YES, "backend": YES, "other-ns": YES, "foreign-td": YES},
    "spiffe_exact": {"spiffe": YES, "dns": YES, "backend": NO, "other-ns": NO, "foreign-td": NO},
    "spiffe_sa_wildcard": {
        "spiffe": YES,
        "dns": YES,
        "backend": YES,
        "other-ns": NO,
        "foreign-td": NO,
    },
    "spiffe_other_form": {"spiffe": NO, "dns": NO, "backend": NO, "other-ns": NO, "foreign-td": NO},
    "service_accounts": {
        "spiffe": YES,
        "dns": YES,
        "backend": NO,
        "other-ns": NO,
        "foreign-td": NO,
    },
    "two_patterns": {"spiffe": YES, "dns": YES, "backend": NO, "other-ns": NO, "foreign-td": NO},
}
_PATTERN_CLIENTS = {
    "spiffe": MTLS_IN,
    "dns": _FRONTEND_DNS,
    "backend": _BACKEND,
    "other-ns": _OTHER_NS,
    "foreign-td": _FOREIGN_TD,
}
for _scn, _expect in _PATTERN_TABLE.items():
    for _name, _want in _expect.items():
        row(_scn, D(8080), _PATTERN_CLIENTS[_name], _want, id=_name)
    row(_scn, D(8080), PLAIN_IN, NO, id="plaintext")
    row(_scn, D(8080), TLS_NOID, NO, id="tls-without-identity")
row("spiffe_other_form", D(8080), mtls(f"spiffe://{TD}/workload/batch"), YES, id="exact-spiffe")
row("spiffe_other_form", D(8080), mtls(f"spiffe://{TD}/workload/other"), NO, id="other-spiffe")
row("service_accounts", D(8080), mtls(spiffe("ci", "tools")), YES, id="sa-in-named-namespace")
row("service_accounts", D(8080), mtls(spiffe("ci")), NO, id="sa-name-in-wrong-namespace")
row("two_patterns", D(8080), mtls(spiffe("ops", "tools")), YES, id="second-pattern")
row("any", D(8080), mtls(f"spiffe://{TD}/ns/{NS}/sa/*"), NO, id="wildcard-claimed-by-client")
row("unauthenticated_tls", D(8080), TLS_NOID, YES, id="tls-without-identity")
row("unauthenticated_tls", D(8080), MTLS_IN, YES, id="mtls-with-identity")
row("unauthenticated_tls", D(8080), MTLS_OUT, NO, id="outside-cluster-networks")
row("unauthenticated_tls", D(8080), PLAIN_IN, NO, id="plaintext")

# networks with except
_IN = allow(SA, "inside")
_OUT = deny(DEF, "deny")
for _ip, _want, _id in [
    ("10.1.2.3", _IN, "inside-cidr"),
    ("10.9.1.1", _OUT, "in-except"),
    ("10.10.0.1", _IN, "just-past-except"),
    ("11.0.0.1", _OUT, "outside"),
    ("2001:db8::5", _IN, "ipv6-inside"),
    ("2001:db9::5", _OUT, "ipv6-outside"),
    ("::ffff:10.1.2.3", _IN, "ipv4-mapped"),
    ("not-an-ip", _OUT, "unparseable"),
    ("010.1.2.3", _OUT, "leading-zero-refused"),
]:
    row("networks_except", D(8080), Client(source_ip=_ip), _want, id=_id)
for _ip, _ok, _id in [
    ("192.168.1.1", True, "cluster-v4"),
    ("fd00::1", True, "cluster-v6"),
    ("203.0.113.7", False, "outside-cluster"),
]:
    _want = allow(SA, "cluster") if _ok else deny(DEF, "deny")
    row("networks_default", D(8080), Client(source_ip=_ip), _want, id=_id)
row("mtls_networks", D(8080), MTLS_IN, allow(SA, "fe-internal"), id="identity-and-network")
row("mtls_networks", D(8080), mtls(ident("frontend"), "10.9.0.1"), NO, id="identity-from-except")
row("mtls_networks", D(8080), MTLS_OUT, NO, id="identity-from-outside")

# precedence: Server accessPolicy > pod annotation > namespace annotation > cluster setting
row(
    "precedence",
    D(7000),
    PLAIN_IN,
    deny(DEF, "deny", server="deny"),
    id="ns-annotation-beats-setting",
)
row(
    "precedence", D(7000, "open-0"), PLAIN_OUT, allow(DEF, "all-unauthenticated"), id="pod-beats-ns"
)
row(
    "precedence",
    D(9090, "open-0"),
    PLAIN_IN,
    deny(DEF, "all-authenticated", server="open-admin"),
    id="server-beats-pod",
)
row(
    "precedence",
    D(9090, "open-0"),
    MTLS_OUT,
    allow(DEF, "all-authenticated", server="open-admin"),
    id="server-access-policy-allows",
)
row(
    "precedence",
    D(8080),
    PLAIN_OUT,
    allow(DEF, "all-unauthenticated", server="web-http"),
    id="server-beats-ns",
)
row("precedence", D(7000, None, app="open"), PLAIN_IN, deny(DEF, "deny"), id="unknown-pod-uses-ns")
row("invalid_annotations", D(7000), PLAIN_IN, deny(DEF, "deny"), id="bad-ns-annotation-denies")
row(
    "invalid_annotations",
    D(7000, "odd-0"),
    MTLS_IN,
    deny(DEF, "deny"),
    id="bad-pod-annotation-denies",
)
row(
    "pod_annotation_only",
    D(7000),
    PLAIN_OUT,
    allow(DEF, "all-unauthenticated"),
    id="setting-applies",
)
row(
    "pod_annotation_only",
    D(7000, "strict-0"),
    PLAIN_IN,
    deny(DEF, "cluster-authenticated"),
    id="pod-restricts",
)
row(
    "pod_annotation_only",
    D(7000, "strict-0"),
    MTLS_IN,
    allow(DEF, "cluster-authenticated"),
    id="pod-allows-mtls",
)

# Server covering a port or not; named ports
_SRV_DENY = deny(DEF, "deny", server="web-http")
_DEFAULT_OK = allow(DEF, "all-unauthenticated", server="all-unauthenticated")
row("named_ports", D(8080), PLAIN_IN, _SRV_DENY, id="named-port-on-web-0")
row("named_ports", D(8000, "web-1"), PLAIN_IN, _SRV_DENY, id="same-name-other-number")
row("named_ports", D(8080, "web-1"), PLAIN_IN, _DEFAULT_OK, id="number-not-named-on-web-1")
row("named_ports", D(7000), PLAIN_IN, _DEFAULT_OK, id="uncovered-port")
# without the pod a named port can not be resolved: the Server that may cover it decides, not
# the (here all-unauthenticated) default, which would allow what the Server refuses
row(
    "named_ports",
    D(8080, None, app="web"),
    PLAIN_IN,
    _SRV_DENY,
    id="labels-only-named-port-server-decides",
)
row(
    "named_ports",
    D(8080, "web-7", app="web"),
    PLAIN_IN,
    _SRV_DENY,
    id="pod-not-in-document-named-port-server-decides",
)
row("named_ports", D(8080, None, app="db"), PLAIN_IN, _DEFAULT_OK, id="labels-not-selected-named")
row("numeric_port", D(8080, None, app="web"), PLAIN_IN, _SRV_DENY, id="labels-only-numeric")
row("numeric_port", D(8080, None, app="db"), PLAIN_IN, _DEFAULT_OK, id="labels-not-selected")
row(
    "numeric_port",
    D(8080, "gone", app="web"),
    PLAIN_IN,
    _SRV_DENY,
    id="unknown-pod-falls-back-to-labels",
)

# probes: GET of the exact path, on a port no Server covers, even under deny
_PROBE_DENY = deny(DEF, "deny", server="deny")
row(
    "probes",
    D(8081),
    PLAIN_OUT,
    allow("probe", "/healthz", server="deny"),
    Request("GET", "/healthz"),
    id="get-healthz",
)
row(
    "probes", D(8081), PLAIN_OUT, allow("probe", "/ready"), Request("GET", "/ready"), id="get-ready"
)
row("probes", D(8081), PLAIN_OUT, _PROBE_DENY, Request("POST", "/healthz"), id="post-refused")
row("probes", D(8081), PLAIN_OUT, _PROBE_DENY, Request("GET", "/healthz/x"), id="other-path")
row("probes", D(8081), PLAIN_OUT, _PROBE_DENY, Request("GET", "/live"), id="path-of-other-port")
row("probes", D(8082), PLAIN_OUT, _PROBE_DENY, Request("GET", "/healthz"), id="other-port")
row("probes", D(8081), PLAIN_OUT, _PROBE_DENY, None, id="tcp-connection")
row("probes", D(8080), PLAIN_OUT, _SRV_DENY, Request("GET", "/live"), id="server-covered-port")
row(
    "probes",
    D(8081, None, app="web"),
    PLAIN_OUT,
    deny(DEF, "deny", server="web-http"),  # its named port may be 8081, for all we know
    Request("GET", "/healthz"),
    id="pod-unknown",
)

# probes under mesh-wide STRICT: the kubelet can not speak mTLS, so only its exact probe passes
_STRICT_DENY = deny("PeerAuthentication", "mesh-default", server="deny")
row(
    "probes_strict",
    D(8081),
    PLAIN_OUT,
    allow("probe", "/healthz", server="deny"),
    Request("GET", "/healthz"),
    id="strict-probe-path",
)
row("probes_strict", D(8081), PLAIN_OUT, _STRICT_DENY, Request("GET", "/x"), id="strict-other-path")
row("probes_strict", D(8081), PLAIN_OUT, _STRICT_DENY, None, id="strict-tcp")
row(
    "probes_strict",
    D(8080),
    PLAIN_OUT,
    deny("PeerAuthentication", "mesh-default", server="web-http"),
    Request("GET", "/healthz"),
    id="strict-server-port",
)

# AuthorizationPolicy: every required ref must match
_AP_NO = deny(DEF, "deny", server="web-http")
row(
    "ap_all_refs",
    D(8080),
    MTLS_IN,
    allow(AP, "fe-internal", server="web-http"),
    id="identity-and-network",
)
row("ap_all_refs", D(8080), MTLS_OUT, _AP_NO, id="identity-only")
row("ap_all_refs", D(8080), PLAIN_IN, _AP_NO, id="network-only")
row("ap_all_refs", D(8080), mtls(spiffe("frontend"), "10.9.3.3"), _AP_NO, id="network-except")
row("ap_all_refs", D(8080), mtls(spiffe("backend")), _AP_NO, id="other-identity")
row("ap_all_refs", D(8080), MTLS_IN, allow(AP, "fe-internal"), GET, id="http-request")
row(
    "ap_namespace_target",
    D(9090),
    mtls(spiffe("backend")),
    allow(AP, "ns-sa", server="web-admin"),
    id="sa-ref-any-network",
)
row(
    "ap_namespace_target",
    D(8080),
    mtls(spiffe("backend"), OUT_IP),
    allow(AP, "ns-sa"),
    id="sa-ref-outside",
)
row(
    "ap_namespace_target",
    D(8080),
    Client(source_ip="192.168.4.4"),
    allow(AP, "ns-net"),
    id="network-ref-plaintext",
)
row("ap_namespace_target", D(8080), PLAIN_IN, _AP_NO, id="neither")
row(
    "ap_namespace_target",
    D(7000),
    PLAIN_IN,
    deny(DEF, "deny", server="deny"),
    id="uncovered-port-untouched",
)
row(
    "ap_identity_refs",
    D(8080),
    mtls(spiffe("anyone", "other")),
    allow(AP, "refs"),
    id="namespace-ref",
)
row(
    "ap_identity_refs",
    D(8080),
    mtls(spiffe("deploy", "ops"), OUT_IP),
    allow(AP, "refs"),
    id="sa-star-ref",
)
row("ap_identity_refs", D(8080), MTLS_IN, allow(AP, "refs"), id="sa-ref-default-namespace")
row("ap_identity_refs", D(8080), mtls(spiffe("backend")), _AP_NO, id="unlisted-sa")
row("ap_broken_ref", D(8080), MTLS_IN, _AP_NO, id="missing-ref-grants-nothing")

# PeerAuthentication: workload port-level > workload > namespace > mesh; UNSET inherits
_OK = allow(DEF, "all-unauthenticated")
P, S, X = MTLSMode.PERMISSIVE, MTLSMode.STRICT, MTLSMode.DISABLE
row("pa_none", D(8080), PLAIN_IN, dataclasses.replace(_OK, mtls=P), id="nothing-is-permissive")
row(
    "pa_mesh_strict",
    D(8080),
    PLAIN_IN,
    deny(PA, "mesh-default", mtls=S, server="all-unauthenticated"),
    id="plaintext",
)
row("pa_mesh_strict", D(8080), MTLS_OUT, dataclasses.replace(_OK, mtls=S), id="mtls")
row(
    "pa_mesh_strict", D(8080), TLS_NOID, dataclasses.replace(_OK, mtls=S), id="tls-without-identity"
)
row(
    "pa_mesh_strict",
    D(5432, None, app="x"),
    PLAIN_IN,
    deny(PA, "mesh-default", mtls=S),
    id="labels-only",
)
row(
    "pa_namespace_over_mesh",
    D(8080),
    PLAIN_OUT,
    dataclasses.replace(_OK, mtls=P),
    id="namespace-wins",
)
row(
    "pa_namespace_unset",
    D(8080),
    PLAIN_IN,
    deny(PA, "mesh-default", mtls=S),
    id="unset-inherits-mesh",
)
row("pa_workload", D(8080), PLAIN_IN, dataclasses.replace(_OK, mtls=X), id="workload-disable")
row(
    "pa_workload",
    D(5432, "db-0"),
    PLAIN_IN,
    deny(PA, "ns-strict", mtls=S),
    id="workload-unset-inherits-ns",
)
row(
    "pa_workload",
    D(8081, "db-0"),
    PLAIN_IN,
    dataclasses.replace(_OK, mtls=P),
    id="port-level-beats-ns",
)
row(
    "pa_workload",
    D(8082, "db-0"),
    PLAIN_IN,
    deny(PA, "ns-strict", mtls=S),
    id="port-level-unset-inherits",
)
row(
    "pa_workload",
    D(8080, None, app="web"),
    PLAIN_IN,
    dataclasses.replace(_OK, mtls=X),
    id="labels-only-workload",
)
row(
    "pa_workload",
    D(8080, None, app="cache"),
    PLAIN_IN,
    deny(PA, "ns-strict", mtls=S),
    id="labels-only-namespace",
)
row("pa_port_strict", D(8080), PLAIN_IN, deny(PA, "web-ports", mtls=S), id="port-strict")
row("pa_port_strict", D(9090), PLAIN_IN, dataclasses.replace(_OK, mtls=P), id="other-port-workload")
row(
    "pa_port_strict",
    D(8080, "db-0"),
    PLAIN_IN,
    dataclasses.replace(_OK, mtls=P),
    id="port-level-only-on-selected",
)
row(
    "pa_oldest_workload",
    D(8080),
    PLAIN_IN,
    dataclasses.replace(_OK, mtls=P),
    id="oldest-not-first-name",
)
row(
    "pa_oldest_namespace",
    D(8080),
    PLAIN_IN,
    deny(PA, "z-older", mtls=S),
    id="oldest-not-first-name",
)
row(
    "pa_disable_hides_identity",
    D(8080),
    MTLS_IN,
    deny(DEF, "deny", mtls=X, server="web-http"),
    id="no-identity-seen",
)
row(
    "pa_disable_hides_identity",
    D(7000),
    PLAIN_IN,
    deny(DEF, "deny", mtls=X),
    id="plaintext-not-refused-by-mtls",
)


_POLICY_NAMES = {p.value for p in DefaultPolicy}


@pytest.mark.parametrize(("scn", "dest", "client", "request_", "want"), ROWS)
def test_decision(
    scn: str, dest: Destination, client: Client, request_: Request | None, want: Want
) -> None:
    got = decide(SCENARIOS[scn](), dest, client, request_)
    assert (got.allowed, got.rule_kind, got.rule_name) == (
        want.allowed,
        want.rule_kind,
        want.rule_name,
    ), got.reason
    assert got.audit == want.audit
    if want.server is not None:
        assert got.server_name == want.server
        assert got.server_kind == ("default" if want.server in _POLICY_NAMES else "Server")
    if want.mtls is not None:
        assert got.mtls_mode == want.mtls
    assert got.mtls_mode is not MTLSMode.UNSET
    if not got.allowed:  # a person reading the denial can tell which client it was
        assert client.source_ip in got.reason


# -- properties of the decision API itself ---------------------------------------------------


def test_mtls_mode_matches_decision() -> None:
    pol = SCENARIOS["pa_workload"]()
    for dest in (D(8080), D(5432, "db-0"), D(8081, "db-0"), D(1, None, app="web")):
        assert pol.mtls_mode(dest) == decide(pol, dest, MTLS_IN).mtls_mode


def test_denials_name_each_client_even_when_repeated() -> None:
    """Decisions are memoised; a denial must still describe the client in front of it."""
    pol = SCENARIOS["default_deny"]()
    first = decide(pol, D(7000), Client(source_ip="203.0.113.1"))
    second = decide(pol, D(7000), Client(source_ip="203.0.113.2"))
    again = decide(pol, D(7000), Client(source_ip="203.0.113.1"))
    assert "203.0.113.1" in first.reason and "203.0.113.2" in second.reason
    assert again == first
    named = decide(pol, D(7000), mtls(spiffe("frontend")))
    assert ident("frontend") in named.reason


def test_decision_is_a_plain_frozen_value() -> None:
    got = decide(SCENARIOS["default_audit"](), D(7000), PLAIN_OUT)
    rebuilt = Decision(**{f.name: getattr(got, f.name) for f in dataclasses.fields(Decision)})
    assert got == rebuilt and hash(got) == hash(rebuilt) and repr(got) == repr(rebuilt)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.allowed = False  # type: ignore[misc]


def test_rule_with_http_match_needs_a_request() -> None:
    """Rules restricted to an HTTP route never match a bare TCP connection."""
    doc = SCENARIOS["numeric_port"]().document
    srv = doc.servers[0]
    route = compiled.Rule(
        kind="probe", name="metrics", http=compiled.HTTPMatch(method="GET", path="/metrics")
    )
    doc = doc.model_copy(update={"servers": (srv.model_copy(update={"rules": (route,)}),)})
    pol = Policy(doc)
    assert decide(pol, D(8080), PLAIN_OUT, Request("GET", "/metrics")).rule_name == "metrics"
    assert not decide(pol, D(8080), PLAIN_OUT, None).allowed
    assert not decide(pol, D(8080), PLAIN_OUT, Request("GET", "/other")).allowed


@scenario
def named_and_numeric() -> Policy:
    return build(
        server("b-named", "http", access="deny"),
        server("c-named", "admin", access="all-unauthenticated"),
        server("a-numeric", 9090, access="all-authenticated"),
        authz("fe", {"meshTLS": {"serviceAccounts": [{"name": "frontend"}]}}, "b-named"),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )


def test_labels_only_named_port_server_decides_and_says_why() -> None:
    """Deny when in doubt: without the pod, the first named-port Server selecting the labels
    (document order) decides, unless a Server with this numeric port matched."""
    pol = SCENARIOS["named_and_numeric"]()
    for dest in (D(8080, None, app="web"), D(8080, "not-yet", app="web")):
        got = decide(pol, dest, PLAIN_OUT)
        assert (got.allowed, got.server_kind, got.server_name) == (False, "Server", "b-named")
        assert "named port 'http' could not be resolved" in got.reason, got.reason
        assert "not in the compiled policy yet" in got.reason
        assert PLAIN_OUT.source_ip in got.reason
        allowed = decide(pol, dest, MTLS_IN)  # b-named's authorization still applies
        assert (allowed.allowed, allowed.rule_kind, allowed.rule_name) == (True, SA, "fe")
        assert "could not be resolved" in allowed.reason
        assert decide(pol, dest, MTLS_IN) is allowed  # memoised
    numeric = decide(pol, D(9090, None, app="web"), PLAIN_OUT)
    assert (numeric.server_name, numeric.allowed) == ("a-numeric", False)
    assert "could not be resolved" not in numeric.reason
    known = decide(pol, D(8080), PLAIN_OUT)  # with the pod, the port resolves as usual
    assert (known.server_name, known.allowed) == ("b-named", False)
    assert "could not be resolved" not in known.reason
    elsewhere = decide(pol, D(7000), PLAIN_OUT)  # on a known pod, other ports are not its
    assert (elsewhere.server_kind, elsewhere.allowed) == ("default", True)


def _named_server(name: str, port: str, selector: dict[str, Any]) -> resources.Server:
    return resources.Server.model_validate(
        {"metadata": meta(name), "spec": {"podSelector": selector, "port": port}}
    )


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"app": "web", "tier": "front"}, "a-web-front"),
        ({"tier": "front", "app": "web"}, "a-web-front"),  # label order does not matter
        ({"app": "web", "tier": "front", "env": "prod"}, "a-web-front"),
        ({"app": "web", "tier": "back"}, "d-everything"),  # a's first label alone is not enough
        ({"team": "x", "env": "prod"}, "b-env"),
        ({"team": "x"}, "c-team"),
        ({}, "d-everything"),
    ],
)
def test_labels_only_named_port_server_is_first_in_document_order(
    labels: dict[str, str], expected: str
) -> None:
    """Selectors with matchLabels and those without are looked up apart; order still holds."""
    pol = build(
        _named_server("a-web-front", "http", {"matchLabels": {"app": "web", "tier": "front"}}),
        _named_server(
            "b-env", "admin", {"matchExpressions": [{"key": "env", "operator": "Exists"}]}
        ),
        _named_server("c-team", "grpc", {"matchLabels": {"team": "x"}}),
        _named_server("d-everything", "metrics", {}),
        default=DefaultPolicy.ALL_UNAUTHENTICATED,
    )
    got = decide(pol, D(8080, None, **labels), PLAIN_IN)
    assert (got.allowed, got.server_name) == (False, expected), got.reason
    assert "could not be resolved" in got.reason


def test_labels_only_named_port_under_strict_names_the_server() -> None:
    pol = SCENARIOS["probes_strict"]()
    got = decide(pol, D(8081, None, app="web"), PLAIN_OUT, Request("GET", "/healthz"))
    assert (got.allowed, got.rule_kind, got.server_name) == (False, PA, "web-http")
    assert "could not be resolved" in got.reason


def test_hand_written_document_may_quote_a_port_number() -> None:
    """compiled.Server accepts ``"port": "8080"``; it can only mean the number."""
    doc = SCENARIOS["numeric_port"]().document
    srv = doc.servers[0].model_copy(update={"port": "8080"})
    doc = compiled.PolicyDocument.from_json(doc.model_copy(update={"servers": (srv,)}).to_json())
    assert doc.servers[0].port == "8080"
    pol = Policy(doc)
    for dest in (D(8080), D(8080, None, app="web")):
        got = decide(pol, dest, PLAIN_IN)
        assert (got.allowed, got.server_name) == (False, "web-http"), got.reason
        assert "could not be resolved" not in got.reason


def test_hand_written_document_spiffe_patterns_are_normalised() -> None:
    """compile writes DNS-form identities; a hand-written document may still use SPIFFE."""
    doc = SCENARIOS["exact_dns"]().document
    (rule,) = doc.servers[0].rules
    rule = rule.model_copy(update={"identities": ((spiffe("frontend"),),)})
    srv = doc.servers[0].model_copy(update={"rules": (rule,)})
    pol = Policy(doc.model_copy(update={"servers": (srv,)}))
    assert decide(pol, D(8080), mtls(ident("frontend"))).allowed
    assert decide(pol, D(8080), MTLS_IN).allowed


def test_disable_denial_explains_the_missing_identity() -> None:
    pol = SCENARIOS["pa_disable_hides_identity"]()
    with_identity = decide(pol, D(8080), MTLS_IN)
    plaintext = decide(pol, D(8080), PLAIN_IN)  # same source address, same port
    assert not with_identity.allowed and not plaintext.allowed
    assert "DISABLE" in with_identity.reason
    assert "DISABLE" not in plaintext.reason


# -- what the proxy asks before it parses: the declared protocol, whether routes matter ------


def _server_speaking(name: str, port: int | str, protocol: str) -> resources.Server:
    return resources.Server.model_validate(
        {
            "metadata": meta(name),
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "port": port,
                "proxyProtocol": protocol,
            },
        }
    )


def test_proxy_protocol_is_the_covering_servers() -> None:
    web = pod("web-0", "web", {"http": 8080, "grpc": 9090})
    pol = build(
        _server_speaking("web-http", "http", "HTTP/1"),
        _server_speaking("web-grpc", 9090, "gRPC"),
        _server_speaking("web-db", 5432, "opaque"),
        server("web-plain", 7000),
        pods=(web,),
    )
    P = resources.ProxyProtocol
    assert pol.proxy_protocol(D(8080)) is P.HTTP1  # through the pod's named port
    assert pol.proxy_protocol(D(9090)) is P.GRPC
    assert pol.proxy_protocol(D(5432)) is P.OPAQUE
    assert pol.proxy_protocol(D(7000)) is P.UNKNOWN  # declared nothing: detect
    assert pol.proxy_protocol(D(6000)) is None  # no Server at all
    assert pol.proxy_protocol(D(9090, None, app="web")) is P.GRPC  # labels only
    assert pol.proxy_protocol(D(9090, None, app="db")) is None


def test_routes_matter_where_a_probe_or_an_http_rule_can_change_the_outcome() -> None:
    pol = SCENARIOS["probes"]()  # Server on 8080 (no routes); probes on 8081, and 8080
    assert pol.routes_matter(D(8081))  # no Server, probe paths: GET /healthz differs
    assert not pol.routes_matter(D(8080))  # the Server decides, its probe path does not count
    assert not pol.routes_matter(D(9000))  # no Server, no probe
    assert not pol.routes_matter(D(8081, None, app="web"))  # pod unknown: no probes known
    # ...and that answer agrees with decide(): on 8081 a path changes the outcome
    assert decide(pol, D(8081), PLAIN_OUT, Request("GET", "/healthz")).allowed
    assert not decide(pol, D(8081), PLAIN_OUT, Request("GET", "/admin")).allowed

    doc = SCENARIOS["numeric_port"]().document
    srv = doc.servers[0]
    route = compiled.Rule(
        kind="probe", name="metrics", http=compiled.HTTPMatch(method="GET", path="/metrics")
    )
    with_route = Policy(
        doc.model_copy(update={"servers": (srv.model_copy(update={"rules": (route,)}),)})
    )
    assert with_route.routes_matter(D(8080))
    assert with_route.routes_matter(D(8080, None, app="web"))
    assert not SCENARIOS["numeric_port"]().routes_matter(D(8080))
