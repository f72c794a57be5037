"""compile_namespace: determinism, the conditions a user reads on each resource, the compiled
content, and that a broken resource only ever takes its own effect away."""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest

from meshward.policy import compiled, resources
from meshward.policy.compile import CompileResult, NamespaceState, Settings, compile_namespace
from meshward.policy.decision import Client, Destination, Policy, Request, decide
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

T1, T2, T3 = CREATED, "2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z"
CLUSTER = Settings().cluster_networks


# -- builders (the shared ones are in tests.builders) ----------------------------------------


def unvalidated_policy(
    name: str, refs: list[dict[str, str]], target: str = "web-http", kind: str = "Server"
) -> resources.AuthorizationPolicy:
    """An AuthorizationPolicy built without the model's checks (which refuse an empty
    requiredAuthenticationRefs): compile must stay safe when handed one anyway."""
    spec = resources.AuthorizationPolicySpec.model_construct(
        target_ref=resources.TargetRef.model_validate({"kind": kind, "name": target}),
        required_authentication_refs=tuple(
            resources.AuthenticationRef.model_validate(r) for r in refs
        ),
    )
    return resources.AuthorizationPolicy.model_construct(
        metadata=resources.Meta.model_validate(meta(name)), spec=spec
    )


def compile_(*items: resources.PolicyResource, **kw: Any) -> CompileResult:
    settings = kw.pop("settings", Settings())
    return compile_namespace(state(*items, **kw), settings)


def cond(result: CompileResult, kind: str, name: str) -> dict[str, resources.Condition]:
    return {c.type: c for c in result.conditions[(kind, name)]}


def server_doc(result: CompileResult, name: str) -> compiled.Server:
    (found,) = [s for s in result.document.servers if s.name == name]
    return found


def rule_names(result: CompileResult, srv: str) -> list[str]:
    return [r.name for r in server_doc(result, srv).rules]


# -- a namespace with a bit of everything ----------------------------------------------------


def rich_items() -> list[resources.PolicyResource]:
    return [
        server("web-http", "http", tier="front"),
        server("web-admin", 9090, tier="front"),
        server("db-pg", 5432, app="db"),
        server("late", 9090, created=T3),  # conflicts with web-admin
        authz("fe", {"meshTLS": {"identities": [f"spiffe://{TD}/ns/{NS}/sa/frontend"]}}),
        authz("front-tls", {"meshTLS": {"unauthenticatedTLS": True}}, None, tier="front"),
        authz("lost", {"unauthenticated": True}, "nope"),
        policy("db-fe", [{"kind": "MeshTLSAuthentication", "name": "fe-id"}], "db-pg"),
        policy(
            "ns-office",
            [
                {"kind": "NetworkAuthentication", "name": "office"},
                {"kind": "ServiceAccount", "name": "ops", "namespace": "tools"},
            ],
            NS,
            "Namespace",
        ),
        policy("broken", [{"kind": "MeshTLSAuthentication", "name": "missing"}]),
        mtls_auth("fe-id", identityRefs=[{"kind": "ServiceAccount", "name": "frontend"}]),
        net_auth("office", {"cidr": "192.168.0.0/16"}, {"cidr": "10.20.0.0/16"}),
        peer("ns-wide", "PERMISSIVE", created=T1),
        peer("ns-wide-newer", "STRICT", created=T2),
        peer("db-strict", "STRICT", app="db", ports={"5432": "STRICT", "9100": "PERMISSIVE"}),
        peer("web-unset", "UNSET", app="web", created=T2),
    ]


RICH_PODS = [
    pod("web-0", ports={"http": 8080}, probes=[(8081, "/ready"), (8081, "/healthz")]),
    pod("web-1", ports={"http": 8000}, tier="canary"),
    pod(
        "db-0",
        app="db",
        ports={"pg": 5432},
        default="cluster-authenticated",
    ),
    pod("node-agent", app="agent", host_network=True),
]
RICH_MESH = [
    peer("mesh", "STRICT", ns="meshward"),
    peer("mesh-later", "DISABLE", ns="meshward", created=T2),
]


def rich_state(rng: random.Random | None = None) -> NamespaceState:
    items = rich_items()
    pods = list(RICH_PODS)
    mesh = list(RICH_MESH)
    if rng is not None:
        rng.shuffle(items)
        rng.shuffle(pods)
        rng.shuffle(mesh)
        pods = [  # the same labels, inserted in another order
            dataclasses.replace(
                p, labels=dict(sorted(p.labels.items(), reverse=rng.random() < 0.5))
            )
            for p in pods
        ]
    return state(*items, pods=pods, mesh=mesh)


# -- determinism and the document contract ---------------------------------------------------


def test_shuffled_input_gives_identical_document_and_conditions() -> None:
    base = compile_namespace(rich_state(), Settings())
    for seed in range(8):
        again = compile_namespace(rich_state(random.Random(seed)), Settings())
        assert again.document.to_json() == base.document.to_json()
        assert again.document.hash == base.document.hash
        assert dict(again.conditions) == dict(base.conditions)
        assert again.warnings == base.warnings


def test_document_is_sorted_and_sealed() -> None:
    doc = compile_namespace(rich_state(random.Random(3)), Settings()).document
    names = [s.name for s in doc.servers]
    assert names == sorted(names)
    for srv in doc.servers:
        keys = [(r.kind, r.name) for r in srv.rules]
        assert keys == sorted(keys)
    assert list(doc.pods) == sorted(doc.pods)
    assert doc.hash == doc.content_hash() and doc.hash.startswith("sha256:")


def test_json_round_trip_keeps_document_and_decisions() -> None:
    doc = compile_namespace(rich_state(), Settings()).document
    back = compiled.PolicyDocument.from_json(doc.to_json())
    assert back == doc
    before, after = Policy(doc), Policy(back)
    clients = [
        Client(source_ip="10.1.2.3"),
        Client(identity=f"spiffe://{TD}/ns/{NS}/sa/frontend", source_ip="10.1.2.3", tls=True),
        Client(identity=ident("ops", "tools"), source_ip="203.0.113.9", tls=True),
        Client(source_ip="192.168.3.3", tls=True),
    ]
    dests = [
        Destination(p, pod=n.name) for p in (5432, 8000, 8080, 8081, 9090) for n in RICH_PODS[0:3]
    ]
    dests += [Destination(n.ports.get("http", 1), pod=n.name) for n in RICH_PODS[:2]]
    for dest, client in itertools.product(dests, clients):
        for req in (None, Request("GET", "/ready")):
            assert decide(before, dest, client, req) == decide(after, dest, client, req)


def test_every_resource_gets_accepted_and_resolved_refs_and_no_times() -> None:
    result = compile_namespace(rich_state(), Settings())
    expected = {(r.kind, r.metadata.name) for r in rich_items()}
    assert set(result.conditions) == expected
    for conditions in result.conditions.values():
        assert [c.type for c in conditions] == ["Accepted", "ResolvedRefs"]
        for c in conditions:
            assert c.reason and c.reason[0].isupper() and " " not in c.reason
            assert c.last_transition_time is None and c.observed_generation is None
            if c.status == "False":
                assert len(c.message) > 20


def test_condition_summary_of_the_rich_namespace() -> None:
    """One look at every condition a user would see for the mixed namespace."""
    result = compile_namespace(rich_state(), Settings())
    summary = {
        key: tuple(f"{c.status}:{c.reason}" for c in conds)
        for key, conds in result.conditions.items()
    }
    ok = ("True:Accepted", "True:Resolved")
    assert summary == {
        ("Server", "web-http"): ok,
        ("Server", "web-admin"): ok,
        ("Server", "db-pg"): ok,
        ("Server", "late"): ("False:PortConflict", "True:Resolved"),
        ("ServerAuthorization", "fe"): ok,
        ("ServerAuthorization", "front-tls"): ok,
        ("ServerAuthorization", "lost"): ("True:Accepted", "False:ServerNotFound"),
        ("AuthorizationPolicy", "db-fe"): ok,
        ("AuthorizationPolicy", "ns-office"): ok,
        ("AuthorizationPolicy", "broken"): ("False:RefNotFound", "False:RefNotFound"),
        ("MeshTLSAuthentication", "fe-id"): ok,
        ("NetworkAuthentication", "office"): ok,
        ("PeerAuthentication", "ns-wide"): ok,
        ("PeerAuthentication", "ns-wide-newer"): ("False:Superseded", "True:Resolved"),
        ("PeerAuthentication", "db-strict"): ok,
        ("PeerAuthentication", "web-unset"): ok,
    }


# -- Servers ---------------------------------------------------------------------------------


def test_server_matching_no_pod_is_accepted_but_says_so() -> None:
    result = compile_(server("ghost", 80, app="ghost"))
    c = cond(result, "Server", "ghost")
    assert c["Accepted"].status == "True"
    assert (c["ResolvedRefs"].status, c["ResolvedRefs"].reason) == ("False", "NoMatchingPods")
    assert "ghost" in c["ResolvedRefs"].message
    assert [s.name for s in result.document.servers] == ["ghost"]  # pods may come later


def test_named_port_unknown_on_every_selected_pod() -> None:
    result = compile_(server("web-grpc", "grpc"))
    c = cond(result, "Server", "web-grpc")
    assert (c["ResolvedRefs"].status, c["ResolvedRefs"].reason) == ("False", "UnknownNamedPort")
    assert "'grpc'" in c["ResolvedRefs"].message and "web-0" in c["ResolvedRefs"].message
    assert c["Accepted"].status == "True"


def test_named_port_known_on_some_pods_resolves_and_names_the_others() -> None:
    result = compile_(server("web-http", "http"), pods=[WEB, pod("web-9")])
    c = cond(result, "Server", "web-http")
    assert c["ResolvedRefs"].status == "True"
    assert "web-9" in c["ResolvedRefs"].message


@pytest.mark.parametrize(
    ("a", "b", "winner", "loser"),
    [
        (server("zeta", 8080, created=T1), server("alpha", 8080, created=T2), "zeta", "alpha"),
        (server("beta", 8080, created=T1), server("alpha", 8080, created=T1), "alpha", "beta"),
        (server("alpha", 8080, created=None), server("zeta", 8080, created=T3), "zeta", "alpha"),
        (
            server("named", "http", created=T1),
            server("number", 8080, created=T2),
            "named",
            "number",
        ),
    ],
    ids=[
        "older-wins",
        "same-time-name-wins",
        "no-timestamp-is-newest",
        "named-vs-number",
    ],
)
def test_port_conflict_older_server_keeps_the_port(
    a: resources.Server, b: resources.Server, winner: str, loser: str
) -> None:
    for order in ((a, b), (b, a)):
        result = compile_(*order)
        lost = cond(result, "Server", loser)["Accepted"]
        assert (lost.status, lost.reason) == ("False", "PortConflict")
        assert winner in lost.message and "web-0" in lost.message and "8080" in lost.message
        assert cond(result, "Server", winner)["Accepted"].status == "True"
        assert [s.name for s in result.document.servers] == [winner]


def test_same_port_on_different_pods_is_no_conflict() -> None:
    result = compile_(
        server("web-http", 8080), server("db-http", 8080, app="db"), pods=[WEB, pod("db-0", "db")]
    )
    assert {s.name for s in result.document.servers} == {"web-http", "db-http"}


# -- ServerAuthorization ---------------------------------------------------------------------


def test_server_authorization_to_missing_server() -> None:
    result = compile_(server("web-http"), authz("fe", {"unauthenticated": True}, "web-htp"))
    c = cond(result, "ServerAuthorization", "fe")["ResolvedRefs"]
    assert (c.status, c.reason) == ("False", "ServerNotFound")
    assert "web-htp" in c.message
    assert rule_names(result, "web-http") == []


def test_server_authorization_to_conflicting_server_says_why() -> None:
    result = compile_(
        server("web-http", created=T1),
        server("web-copy", created=T2),
        authz("fe", {"unauthenticated": True}, "web-copy"),
    )
    c = cond(result, "ServerAuthorization", "fe")["ResolvedRefs"]
    assert (c.status, c.reason) == ("False", "ServerNotAccepted")
    assert "web-http" in c.message  # the Server holding the port


def test_server_selector_matching_nothing_and_matching_several() -> None:
    result = compile_(
        server("web-http", 8080, tier="front"),
        server("web-admin", 9090, tier="front"),
        server("web-debug", 6060),
        authz("front", {"unauthenticated": True}, None, tier="front"),
        authz("back", {"unauthenticated": True}, None, tier="back"),
    )
    assert rule_names(result, "web-http") == ["front"]
    assert rule_names(result, "web-admin") == ["front"]
    assert rule_names(result, "web-debug") == []
    c = cond(result, "ServerAuthorization", "back")["ResolvedRefs"]
    assert (c.status, c.reason) == ("False", "NoMatchingServers")
    assert "back" in c.message


@pytest.mark.parametrize(
    ("client", "identities", "networks", "tls"),
    [
        ({"unauthenticated": True}, (), (CLUSTER,), False),
        (
            {
                "unauthenticated": True,
                "networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}],
            },
            (),
            ((("10.0.0.0/8", ("10.9.0.0/16",)),),),
            False,
        ),
        ({"meshTLS": {"unauthenticatedTLS": True}}, (), (CLUSTER,), True),
        (
            {
                "meshTLS": {
                    "identities": [f"spiffe://{TD}/ns/{NS}/sa/fe", f"spiffe://{TD}/ns/ops/sa/*"]
                }
            },
            ((ident("*", "ops"), ident("fe")),),  # sorted
            (CLUSTER,),
            True,
        ),
        (
            {"meshTLS": {"identities": ["spiffe://example.org/job/batch", "*"]}},
            (("*", "spiffe://example.org/job/batch"),),
            (CLUSTER,),
            True,
        ),
        (
            {
                "meshTLS": {
                    "serviceAccounts": [{"name": "fe"}, {"name": "ci", "namespace": "tools"}]
                }
            },
            ((ident("ci", "tools"), ident("fe")),),
            (CLUSTER,),
            True,
        ),
    ],
    ids=["unauthenticated", "networks-except", "unauthenticated-tls", "spiffe", "other-ids", "sas"],
)
def test_server_authorization_compiles_to_rule(
    client: dict[str, Any],
    identities: tuple[tuple[str, ...], ...],
    networks: tuple[tuple[Any, ...], ...],
    tls: bool,
) -> None:
    result = compile_(server("web-http"), authz("rule", client))
    (rule,) = server_doc(result, "web-http").rules
    assert rule.kind == "ServerAuthorization" and rule.name == "rule"
    assert rule.identities == identities
    got_nets = tuple(
        tuple(n.cidr if not n.except_ else (n.cidr, n.except_) for n in group)
        for group in rule.networks
    )
    assert got_nets == networks
    assert rule.tls == tls


def test_server_authorization_with_empty_networks_is_refused() -> None:
    result = compile_(
        server("web-http"), authz("nobody", {"unauthenticated": True, "networks": []})
    )
    c = cond(result, "ServerAuthorization", "nobody")["Accepted"]
    assert (c.status, c.reason) == ("False", "InvalidNetworks")
    assert rule_names(result, "web-http") == []


# -- AuthorizationPolicy ---------------------------------------------------------------------


def test_authorization_policy_refs_become_groups() -> None:
    result = compile_(
        server("web-http"),
        mtls_auth(
            "fe-id",
            identityRefs=[
                {"kind": "ServiceAccount", "name": "fe"},
                {"kind": "ServiceAccount", "name": "*", "namespace": "ops"},
                {"kind": "Namespace", "name": "batch"},
            ],
        ),
        net_auth("office", {"cidr": "192.168.0.0/16"}),
        policy(
            "all",
            [
                {"kind": "MeshTLSAuthentication", "name": "fe-id"},
                {"kind": "NetworkAuthentication", "name": "office"},
                {"kind": "ServiceAccount", "name": "deployer", "namespace": "ci"},
            ],
        ),
    )
    (rule,) = server_doc(result, "web-http").rules
    assert rule.kind == "AuthorizationPolicy"
    assert rule.identities == (
        (ident("*", "batch"), ident("*", "ops"), ident("fe")),  # sorted
        (ident("deployer", "ci"),),
    )
    assert [[n.cidr for n in g] for g in rule.networks] == [["192.168.0.0/16"]]
    assert rule.tls


def test_authorization_policy_without_identity_ref_lets_plaintext_in() -> None:
    result = compile_(
        server("web-http"),
        net_auth("office", {"cidr": "192.168.0.0/16"}),
        policy("office", [{"kind": "NetworkAuthentication", "name": "office"}]),
    )
    (rule,) = server_doc(result, "web-http").rules
    assert rule.identities == () and not rule.tls


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ({"kind": "MeshTLSAuthentication", "name": "missing"}, "MeshTLSAuthentication app/missing"),
        ({"kind": "NetworkAuthentication", "name": "missing"}, "NetworkAuthentication app/missing"),
        ({"kind": "MeshTLSAuthentication", "name": "fe-id", "namespace": "other"}, "own namespace"),
        (
            {"kind": "NetworkAuthentication", "name": "office", "group": "example.com"},
            "example.com",
        ),
    ],
    ids=["missing-mtls", "missing-network", "other-namespace", "wrong-group"],
)
def test_authorization_policy_with_unresolved_ref_is_left_out(
    ref: dict[str, str], needle: str
) -> None:
    result = compile_(
        server("web-http"),
        mtls_auth("fe-id", identities=[ident("fe")]),
        net_auth("office", {"cidr": "192.168.0.0/16"}),
        policy("half", [{"kind": "MeshTLSAuthentication", "name": "fe-id"}, ref]),
        policy("fine", [{"kind": "MeshTLSAuthentication", "name": "fe-id"}]),
    )
    c = cond(result, "AuthorizationPolicy", "half")
    assert (c["Accepted"].status, c["Accepted"].reason) == ("False", "RefNotFound")
    assert (c["ResolvedRefs"].status, c["ResolvedRefs"].reason) == ("False", "RefNotFound")
    assert needle in c["ResolvedRefs"].message
    assert rule_names(result, "web-http") == ["fine"]


@pytest.mark.parametrize(
    ("target", "kind", "resolved"),
    [("web-http", "Server", "True"), (NS, "Namespace", "True"), ("web-htp", "Server", "False")],
    ids=["server", "namespace", "missing-server"],
)
def test_authorization_policy_without_authentications_is_refused(
    target: str, kind: str, resolved: str
) -> None:
    """An empty requiredAuthenticationRefs would require nothing, so allow every client."""
    empty = unvalidated_policy("everyone", [], target, kind)
    result = compile_(server("web-http"), server("web-admin", 9090), empty)
    c = cond(result, "AuthorizationPolicy", "everyone")
    assert (c["Accepted"].status, c["Accepted"].reason) == ("False", "NoAuthentications")
    assert "at least one" in c["Accepted"].message
    assert c["ResolvedRefs"].status == resolved
    assert all(not s.rules for s in result.document.servers)
    pol = Policy(result.document)
    for port in (8080, 9090):
        got = decide(pol, Destination(port, pod="web-0"), Client(source_ip="203.0.113.9"))
        assert not got.allowed, got.reason
    assert compile_(server("web-http"), server("web-admin", 9090)).document.hash == (
        result.document.hash
    )


def test_server_authorization_without_server_ref_is_refused() -> None:
    """The model wants exactly one of name and selector; compile must not trust it did."""
    ref = resources.ServerRef.model_construct(name=None, selector=None)
    spec = resources.ServerAuthorizationSpec.model_construct(
        server=ref, client=resources.Client.model_validate({"unauthenticated": True})
    )
    sa = resources.ServerAuthorization.model_construct(
        metadata=resources.Meta.model_validate(meta("nowhere")), spec=spec
    )
    result = compile_(server("web-http"), sa)
    c = cond(result, "ServerAuthorization", "nowhere")
    assert (c["Accepted"].status, c["Accepted"].reason) == ("False", "InvalidServerRef")
    assert (c["ResolvedRefs"].status, c["ResolvedRefs"].reason) == ("False", "InvalidServerRef")
    assert rule_names(result, "web-http") == []


def test_authorization_policy_targets() -> None:
    result = compile_(
        server("web-http"),
        server("web-admin", 9090),
        policy("to-missing", [{"kind": "ServiceAccount", "name": "a"}], "web-htp"),
        policy(
            "to-other-ns", [{"kind": "ServiceAccount", "name": "a"}], "kube-system", "Namespace"
        ),
        policy("to-ns", [{"kind": "ServiceAccount", "name": "a"}], NS, "Namespace"),
    )
    missing = cond(result, "AuthorizationPolicy", "to-missing")
    assert missing["Accepted"].status == "True"
    assert (missing["ResolvedRefs"].status, missing["ResolvedRefs"].reason) == (
        "False",
        "ServerNotFound",
    )
    other = cond(result, "AuthorizationPolicy", "to-other-ns")["Accepted"]
    assert (other.status, other.reason) == ("False", "InvalidTarget")
    assert "kube-system" in other.message
    assert rule_names(result, "web-http") == ["to-ns"]
    assert rule_names(result, "web-admin") == ["to-ns"]


# -- default policies, pods -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "annotation", "expected", "warns"),
    [
        (DefaultPolicy.ALL_UNAUTHENTICATED, None, DefaultPolicy.ALL_UNAUTHENTICATED, False),
        (
            DefaultPolicy.ALL_UNAUTHENTICATED,
            "cluster-authenticated",
            DefaultPolicy.CLUSTER_AUTHENTICATED,
            False,
        ),
        (DefaultPolicy.ALL_UNAUTHENTICATED, " audit ", DefaultPolicy.AUDIT, False),
        (DefaultPolicy.ALL_UNAUTHENTICATED, "allow", DefaultPolicy.DENY, True),
        (DefaultPolicy.CLUSTER_UNAUTHENTICATED, None, DefaultPolicy.CLUSTER_UNAUTHENTICATED, False),
    ],
    ids=["setting", "annotation", "annotation-spaces", "invalid-annotation", "other-setting"],
)
def test_namespace_default_policy(
    setting: DefaultPolicy, annotation: str | None, expected: DefaultPolicy, warns: bool
) -> None:
    notes = {"config.meshward.io/default-inbound-policy": annotation} if annotation else {}
    result = compile_(annotations=notes, settings=Settings(default_policy=setting))
    assert result.document.default_policy is expected
    assert bool(result.warnings) == warns
    if warns:
        assert "'allow'" in result.warnings[0] and f"namespace {NS}" in result.warnings[0]


def test_pods_in_document() -> None:
    result = compile_(
        pods=[
            pod(
                "web-0",
                ports={"http": 8080},
                probes=[(8081, "/ready"), (8081, "/healthz"), (8081, "/ready")],
            ),
            pod("web-1", default="all-authenticated"),
            pod("web-2", default="wide-open"),
            pod("agent", host_network=True),
        ]
    )
    pods = result.document.pods
    assert set(pods) == {"web-0", "web-1", "web-2"}  # hostNetwork pods are not meshed
    assert pods["web-0"].ports == {"http": 8080}
    assert [(p.port, p.path) for p in pods["web-0"].probes] == [
        (8081, "/healthz"),
        (8081, "/ready"),
    ]
    assert pods["web-0"].default_policy is None
    assert pods["web-1"].default_policy is DefaultPolicy.ALL_AUTHENTICATED
    assert pods["web-2"].default_policy is DefaultPolicy.DENY
    assert len(result.warnings) == 1 and "web-2" in result.warnings[0]


def test_invalid_cluster_network_setting_warns() -> None:
    result = compile_(settings=Settings(cluster_networks=("10.0.0.0/8", "ten-net")))
    assert any("ten-net" in w for w in result.warnings)


# -- PeerAuthentication ----------------------------------------------------------------------


def test_peer_authentication_levels_and_age() -> None:
    result = compile_(
        peer("ns-new", "STRICT", created=T2),
        peer("ns-old", "PERMISSIVE", created=T1),
        peer("web-later", "DISABLE", app="web", created=T3),
        peer("web-first", "STRICT", app="web", created=T1, ports={"8081": "PERMISSIVE"}),
        peer("nobody", "STRICT", app="nothing", created=T2),
        mesh=[
            peer("mesh-b", "PERMISSIVE", ns="meshward", created=T2),
            peer("mesh-a", "STRICT", ns="meshward", created=T3),
            peer("root-workload", "DISABLE", app="x", ns="meshward", created=T1),
        ],
    )
    doc = result.document
    assert doc.mesh_peer_authentication is not None
    assert (doc.mesh_peer_authentication.name, doc.mesh_peer_authentication.namespace) == (
        "mesh-b",
        "meshward",
    )
    assert [(p.name, p.selector) for p in doc.peer_authentications] == [
        ("ns-old", None),
        ("web-first", {"app": "web"}),
        ("nobody", {"app": "nothing"}),
        ("web-later", {"app": "web"}),
    ]
    assert doc.peer_authentications[1].port_level_mtls == {"8081": MTLSMode.PERMISSIVE}
    superseded = cond(result, "PeerAuthentication", "ns-new")["Accepted"]
    assert (superseded.status, superseded.reason) == ("False", "Superseded")
    assert "ns-old" in superseded.message
    unmatched = cond(result, "PeerAuthentication", "nobody")["ResolvedRefs"]
    assert (unmatched.status, unmatched.reason) == ("False", "NoMatchingPods")


def test_root_namespace_policy_is_the_mesh_policy() -> None:
    root = peer("default", "STRICT", ns="meshward")
    result = compile_namespace(
        state(root, mesh=[root], ns="meshward", pods=[]), Settings(root_namespace="meshward")
    )
    assert result.document.mesh_peer_authentication is not None
    assert result.document.mesh_peer_authentication.name == "default"
    assert result.document.peer_authentications == ()
    assert cond(result, "PeerAuthentication", "default")["Accepted"].status == "True"


def _root_peer(
    name: str, mode: str, selector: dict[str, Any] | None, created: str
) -> resources.PeerAuthentication:
    """A PeerAuthentication of the root namespace; ``selector`` as written (``{}`` included)."""
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if selector is not None:
        spec["selector"] = selector
    return resources.PeerAuthentication.model_validate(
        {"metadata": meta(name, created=created, ns="meshward"), "spec": spec}
    )


@pytest.mark.parametrize(
    ("selector", "mesh_wide"),
    [({"matchLabels": {}}, True), ({}, True), ({"matchLabels": {"app": "web"}}, False)],
    ids=["empty-match-labels", "empty-selector", "workload-selector"],
)
def test_mesh_wide_peer_authentication_is_picked_by_compile(
    selector: dict[str, Any], mesh_wide: bool
) -> None:
    """The reconciler passes every root PeerAuthentication; compile alone picks the mesh-wide
    one, the same way in the root namespace and in every other, and ignores root workload ones
    (they select pods of the root namespace only)."""
    root_pas = [
        _root_peer("a-strict", "STRICT", selector, T1),  # the oldest
        _root_peer("z-later", "PERMISSIVE", None, T2),  # selector-less, newer
    ]
    settings = Settings(root_namespace="meshward")
    other = compile_namespace(state(mesh=root_pas), settings)
    root = compile_namespace(state(*root_pas, mesh=root_pas, ns="meshward"), settings)
    expected = "a-strict" if mesh_wide else "z-later"
    for result in (other, root):
        mesh = result.document.mesh_peer_authentication
        assert mesh is not None and (mesh.name, mesh.namespace) == (expected, "meshward")
    assert other.document.mesh_peer_authentication == root.document.mesh_peer_authentication
    assert other.document.peer_authentications == ()  # nothing of the root's applies here

    plaintext = Client(source_ip="10.1.1.1")
    got = decide(Policy(other.document), Destination(8080, pod="web-0"), plaintext)
    if mesh_wide:
        assert (got.allowed, got.mtls_mode) == (False, MTLSMode.STRICT), got.reason
        assert (got.rule_kind, got.rule_name) == ("PeerAuthentication", "a-strict")
    else:
        assert (got.allowed, got.mtls_mode) == (True, MTLSMode.PERMISSIVE), got.reason
    labels_only = decide(Policy(other.document), Destination(8080, {"app": "web"}), plaintext)
    assert labels_only.mtls_mode == got.mtls_mode


# -- broken resources only take their own effect away ----------------------------------------


def _good() -> list[resources.PolicyResource]:
    return [
        server("web-http", created=T1),
        authz("fe", {"meshTLS": {"serviceAccounts": [{"name": "fe"}]}}),
        mtls_auth("fe-id", identities=[ident("fe")]),
        policy("ap-fe", [{"kind": "MeshTLSAuthentication", "name": "fe-id"}]),
        peer("ns", "PERMISSIVE", created=T1),
    ]


def _broken() -> list[resources.PolicyResource]:
    return [
        server("web-copy", created=T2),  # port conflict, newer
        authz("to-nothing", {"unauthenticated": True}, "missing"),
        authz("empty-nets", {"unauthenticated": True, "networks": []}),
        policy("ap-missing", [{"kind": "MeshTLSAuthentication", "name": "nope"}]),
        policy("ap-foreign", [{"kind": "ServiceAccount", "name": "x"}], "default", "Namespace"),
        peer("ns-newer", "DISABLE", created=T2),
    ]


def test_broken_resources_do_not_affect_the_others() -> None:
    good = compile_(*_good())
    mixed = compile_(*_good(), *_broken())
    assert mixed.document.to_json() == good.document.to_json()
    for key, conditions in good.conditions.items():
        assert mixed.conditions[key] == conditions
    for r in _broken():
        statuses = [c.status for c in mixed.conditions[(r.kind, r.metadata.name)]]
        assert "False" in statuses


# -- property check over random namespaces (no hypothesis: a seeded generator) ---------------


def _random_state(rng: random.Random) -> NamespaceState:
    apps = ["web", "db", "cache"]
    names = ["a", "b", "c", "d"]
    times = [T1, T2, T3, None]
    pods = [
        pod(f"p{i}", rng.choice(apps), ports=rng.choice([{}, {"http": 8080}, {"http": 8000}]))
        for i in range(rng.randrange(0, 4))
    ]
    items: list[resources.PolicyResource] = []
    for n in rng.sample(names, rng.randrange(0, 4)):
        items.append(
            server(
                f"s-{n}",
                rng.choice((8080, 9090, "http")),
                rng.choice(apps),
                created=rng.choice(times),
            )
        )
    for n in rng.sample(names, rng.randrange(0, 4)):
        if rng.random() < 0.5:
            client: dict[str, Any] = {"unauthenticated": True}
        else:
            client = {
                "meshTLS": {
                    "identities": [
                        rng.choice(
                            ["*", ident("fe"), f"*.{NS}.serviceaccount.identity.meshward.{TD}"]
                        )
                    ]
                }
            }
        if rng.random() < 0.3:
            client["networks"] = rng.choice([[], [{"cidr": "10.0.0.0/8"}]])
        items.append(authz(f"sa-{n}", client, f"s-{rng.choice(names)}"))
    for n in rng.sample(names, rng.randrange(0, 4)):
        refs = [
            {
                "kind": rng.choice(["MeshTLSAuthentication", "NetworkAuthentication"]),
                "name": f"auth-{rng.choice(names)}",
            }
            for _ in range(rng.randrange(0, 3))
        ]
        make = policy if refs else unvalidated_policy  # the model refuses an empty list
        if rng.random() < 0.3:
            items.append(make(f"ap-{n}", refs, rng.choice([NS, "other"]), "Namespace"))
        else:
            items.append(make(f"ap-{n}", refs, f"s-{rng.choice(names)}"))
    for n in rng.sample(names, rng.randrange(0, 3)):
        items.append(mtls_auth(f"auth-{n}", identities=[ident(rng.choice(["fe", "be"]))]))
    for n in rng.sample(names, rng.randrange(0, 3)):
        items.append(net_auth(f"auth-{n}", {"cidr": rng.choice(["10.0.0.0/8", "192.168.0.0/16"])}))
    for n in rng.sample(names, rng.randrange(0, 3)):
        app = rng.choice([None, *apps])
        items.append(
            peer(
                f"pa-{n}",
                rng.choice(["STRICT", "PERMISSIVE", "DISABLE", "UNSET"]),
                app,
                created=rng.choice(times),
            )
        )
    return state(
        *items,
        pods=pods,
        annotations=rng.choice(
            [
                {},
                {
                    "config.meshward.io/default-inbound-policy": rng.choice(
                        ["deny", "audit", "bogus"]
                    )
                },
            ]
        ),
    )


_GRID_CLIENTS = [
    Client(source_ip="10.1.1.1"),
    Client(source_ip="203.0.113.1"),
    Client(identity=ident("fe"), source_ip="10.1.1.1"),
    Client(identity=ident("be"), source_ip="192.168.1.1"),
    Client(source_ip="10.1.1.1", tls=True),
]


def _decisions(result: CompileResult, st: NamespaceState) -> list[tuple[bool, str, str]]:
    pol = Policy(result.document)
    dests = [Destination(port, pod=p.name) for p in st.pods for port in (8000, 8080, 9090)]
    dests += [Destination(8080, labels={"app": "web"})]
    return [
        (d.allowed, d.rule_kind, d.rule_name)
        for dest, client in itertools.product(dests, _GRID_CLIENTS)
        for d in [decide(pol, dest, client)]
    ]


def _without(st: NamespaceState, kind: str, name: str) -> NamespaceState:
    def keep(items: Sequence[Any]) -> list[Any]:
        return [r for r in items if (r.kind, r.metadata.name) != (kind, name)]

    return dataclasses.replace(
        st,
        servers=keep(st.servers),
        server_authorizations=keep(st.server_authorizations),
        authorization_policies=keep(st.authorization_policies),
        mesh_tls_authentications=keep(st.mesh_tls_authentications),
        network_authentications=keep(st.network_authentications),
        peer_authentications=keep(st.peer_authentications),
    )


@pytest.mark.parametrize("seed", range(60))
def test_random_namespaces(seed: int) -> None:
    """For any namespace: compiling never raises, is order-independent, labels every resource,
    only Accepted resources grant access, and a resource that is not Accepted has no effect."""
    rng = random.Random(seed)
    st = _random_state(rng)
    result = compile_namespace(st, Settings())

    everything: list[resources.PolicyResource] = [
        *st.servers,
        *st.server_authorizations,
        *st.authorization_policies,
        *st.mesh_tls_authentications,
        *st.network_authentications,
        *st.peer_authentications,
    ]
    assert set(result.conditions) == {(r.kind, r.metadata.name) for r in everything}

    shuffled = dataclasses.replace(
        st,
        pods=rng.sample(list(st.pods), len(st.pods)),
        servers=rng.sample(list(st.servers), len(st.servers)),
        authorization_policies=rng.sample(
            list(st.authorization_policies), len(st.authorization_policies)
        ),
        peer_authentications=rng.sample(
            list(st.peer_authentications), len(st.peer_authentications)
        ),
    )
    assert compile_namespace(shuffled, Settings()).document.to_json() == result.document.to_json()

    decisions = _decisions(result, st)
    for allowed, kind, name in decisions:
        if allowed and kind in ("ServerAuthorization", "AuthorizationPolicy"):
            assert cond(result, kind, name)["Accepted"].status == "True"

    for r in everything:
        if cond(result, r.kind, r.metadata.name)["Accepted"].status == "False":
            pruned = compile_namespace(_without(st, r.kind, r.metadata.name), Settings())
            assert pruned.document.hash == result.document.hash, (r.kind, r.metadata.name)
