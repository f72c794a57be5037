"""Destination discovery, the server side: which addresses are meshed and which identity must
answer there, from Pods, Services and EndpointSlices.

The index is tested on plain dicts shaped as the API server sends them (pods injected by the
real injector), then fed by the real list and watch of a real API server as objects change.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import ipaddress
import pathlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import pytest
from kubernetes import client

from meshward import errors, inject, kube
from meshward.policyserver import destinations, metrics
from meshward.policyserver.destinations import Answer, Kind
from tests import kubetest

TD = "cluster.local"
AT = "2026-01-01T00:00:00Z"
SETTINGS = inject.Settings.defaults(TD, "1.2.3")
PLAIN = Answer(meshed=False)


def spiffe(namespace: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{namespace}/sa/{sa}"


def pod_spec(
    name: str,
    namespace: str = "shop",
    sa: str | None = "web",
    injected: bool = True,
    skip_inbound: tuple[int, ...] = (),
) -> dict[str, Any]:
    """A Pod as stored before the kubelet runs it: injected by the real injector, if asked."""
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "annotations": {}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [{"name": "http", "containerPort": 8080}],
                }
            ]
        },
    }
    if sa is not None:
        pod["spec"]["serviceAccountName"] = sa
    if not injected:
        return pod
    settings = dataclasses.replace(SETTINGS, skip_inbound_ports=skip_inbound)
    result = inject.inject(pod, {inject.INJECT_ANNOTATION: inject.ENABLED}, settings, AT)
    assert isinstance(result, inject.Injected), result
    return result.pod


def running(pod: dict[str, Any], *ips: str, phase: str = "Running") -> dict[str, Any]:
    """``pod`` with the status the kubelet would report."""
    out = copy.deepcopy(pod)
    out["status"] = {"phase": phase, "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
    return out


def meshed_pod(name: str, ip: str, **kwargs: Any) -> dict[str, Any]:
    return running(pod_spec(name, **kwargs), ip)


def service(
    name: str,
    cluster_ips: Iterable[str],
    ports: Iterable[tuple[str, int, int | str]],
    namespace: str = "shop",
) -> dict[str, Any]:
    """A Service with ``ports`` (name, port, targetPort)."""
    ips = list(cluster_ips)
    return {
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "clusterIP": ips[0],
            "clusterIPs": ips,
            "ports": [
                {"name": n, "port": p, "targetPort": t, "protocol": "TCP"} for n, p, t in ports
            ],
        },
    }


Conditions = bool | None | dict[str, bool]
"""An endpoint's ``ready`` condition (None: unset), or all its conditions."""
TERMINATING = {"ready": False, "serving": True, "terminating": True}
"""A pod being deleted that still passes its readiness probe."""


def endpoint_slice(
    name: str,
    service_name: str,
    endpoints: Iterable[tuple[str, Conditions]],
    ports: Iterable[tuple[str, int]],
    namespace: str = "shop",
    address_type: str = "IPv4",
    pods: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """An EndpointSlice of ``service_name``: endpoints (address, conditions), ports (name,
    port), and the pod (``targetRef``) at each address in ``pods``."""
    listed = []
    for address, conditions in endpoints:
        entry: dict[str, Any] = {"addresses": [address]}
        if isinstance(conditions, dict):
            entry["conditions"] = conditions
        elif conditions is not None:
            entry["conditions"] = {"ready": conditions}
        if pods and address in pods:
            entry["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": pods[address]}
        listed.append(entry)
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {destinations.SERVICE_NAME_LABEL: service_name},
        },
        "addressType": address_type,
        "endpoints": listed,
        "ports": [{"name": n, "port": p, "protocol": "TCP"} for n, p in ports],
    }


def index_of(
    pods: Iterable[dict[str, Any]] = (),
    services: Iterable[dict[str, Any]] = (),
    slices: Iterable[dict[str, Any]] = (),
) -> destinations.Index:
    index = destinations.Index(TD)
    index.load(Kind.PODS, pods)
    index.load(Kind.SERVICES, services)
    index.load(Kind.ENDPOINTSLICES, slices)
    return index


def ask(index: destinations.Index, address: str, port: int) -> Answer | destinations.Unsure:
    return index.lookup(*destinations.parse(address, port))


def is_meshed(index: destinations.Index, address: str, port: int) -> bool:
    answer = ask(index, address, port)
    return isinstance(answer, Answer) and answer.meshed


# -- pods ------------------------------------------------------------------------------------


def test_an_injected_running_pod_is_meshed_with_its_service_account() -> None:
    index = index_of([meshed_pod("web-0", "10.42.0.7"), meshed_pod("db-0", "10.42.0.8", sa=None)])
    assert ask(index, "10.42.0.7", 8080) == Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "10.42.0.7", 5432) == Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "10.42.0.8", 5432) == Answer(True, (spiffe("shop", "default"),))
    assert ask(index, "10.42.0.9", 8080) == PLAIN


def test_pods_without_a_proxy_that_takes_traffic_are_plain() -> None:
    unmeshed = running(pod_spec("plain", injected=False), "10.42.1.1")
    host_network = running(pod_spec("host"), "10.42.1.2")
    host_network["spec"]["hostNetwork"] = True
    pending = running(pod_spec("pending"), "10.42.1.3", phase="Pending")
    finished = running(pod_spec("done"), "10.42.1.4", phase="Succeeded")
    no_init = running(pod_spec("no-init"), "10.42.1.5")
    no_init["spec"]["initContainers"] = []
    unparsable = running(pod_spec("bad-args"), "10.42.1.6")
    unparsable["spec"]["initContainers"][0]["command"] += ["--skip-inbound-ports", "http"]
    index = index_of([unmeshed, host_network, pending, finished, no_init, unparsable])
    for last in range(1, 7):
        assert ask(index, f"10.42.1.{last}", 8080) == PLAIN, last
    assert index.size(Kind.PODS) == 0  # only meshed pods are kept


def test_ports_that_proxy_init_skips_are_plain_on_that_pod() -> None:
    index = index_of([meshed_pod("web-0", "10.42.0.7", skip_inbound=(9000, 22))])
    meshed = Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "10.42.0.7", 8080) == meshed
    assert ask(index, "10.42.0.7", 9000) == PLAIN
    assert ask(index, "10.42.0.7", 22) == PLAIN
    assert ask(index, "10.42.0.7", SETTINGS.admin_port) == PLAIN  # reached without the proxy
    by_hand = meshed_pod("web-1", "10.42.0.8")
    init = by_hand["spec"]["initContainers"][0]
    init["command"] = ["meshward", "proxy-init"]
    init["args"] = ["--admin-port", "4444", "--skip-inbound-ports", "9000-9100,25"]
    index = index_of([by_hand])
    assert [
        p for p in (25, 4444, 8999, 9000, 9050, 9100, 9101) if is_meshed(index, "10.42.0.8", p)
    ] == [
        8999,
        9101,
    ]
    assert is_meshed(index, "10.42.0.8", SETTINGS.admin_port)  # not this pod's admin port


def test_both_families_of_a_dual_stack_pod_are_meshed() -> None:
    index = index_of([running(pod_spec("web-0"), "10.42.0.7", "fd00:42::7")])
    meshed = Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "10.42.0.7", 8080) == meshed
    assert ask(index, "fd00:42::7", 8080) == meshed
    assert ask(index, "fd00:42:0:0:0:0:0:7", 8080) == meshed
    assert ask(index, "::ffff:10.42.0.7", 8080) == meshed  # as a dual-stack socket reports it
    v4_only = index_of([meshed_pod("web-0", "10.42.0.7")])
    assert ask(v4_only, "fd00:42::7", 8080) == PLAIN


def test_events_change_the_answers() -> None:
    index = index_of([meshed_pod("web-0", "10.42.0.7")])
    index.apply(Kind.PODS, "DELETED", meshed_pod("web-0", "10.42.0.7"))
    assert ask(index, "10.42.0.7", 8080) == PLAIN
    index.apply(Kind.PODS, "ADDED", running(pod_spec("web-0"), "10.42.0.7", phase="Pending"))
    assert ask(index, "10.42.0.7", 8080) == PLAIN
    index.apply(Kind.PODS, "MODIFIED", meshed_pod("web-0", "10.42.0.7"))
    assert is_meshed(index, "10.42.0.7", 8080)
    index.apply(Kind.PODS, "MODIFIED", meshed_pod("web-0", "10.42.0.9"))  # a new IP
    assert ask(index, "10.42.0.7", 8080) == PLAIN and is_meshed(index, "10.42.0.9", 8080)
    # an IP handed to another pod before the first is gone: either may be the one that answers
    index.apply(Kind.PODS, "ADDED", meshed_pod("api-0", "10.42.0.9", sa="api"))
    both = (spiffe("shop", "api"), spiffe("shop", "web"))
    assert ask(index, "10.42.0.9", 8080) == Answer(True, both)
    index.load(Kind.PODS, [meshed_pod("api-0", "10.42.0.9", sa="api")])  # a relist
    assert ask(index, "10.42.0.9", 8080) == Answer(True, (spiffe("shop", "api"),))


# -- services --------------------------------------------------------------------------------

CLUSTER_IP = "10.96.0.10"


def shop(
    endpoints: Iterable[tuple[str, bool | None]], pods: Iterable[dict[str, Any]]
) -> destinations.Index:
    """Service web (80 -> http 8080, 443 -> admin 9443) with one slice of ``endpoints``."""
    return index_of(
        pods,
        [service("web", [CLUSTER_IP], [("http", 80, "http"), ("admin", 443, 9443)])],
        [endpoint_slice("web-a", "web", endpoints, [("http", 8080), ("admin", 9443)])],
    )


def test_a_service_whose_ready_endpoints_are_all_meshed_is_meshed_with_their_identities() -> None:
    pods = [
        meshed_pod("web-0", "10.42.0.7"),
        meshed_pod("web-1", "10.42.0.8"),
        meshed_pod("canary-0", "10.42.0.9", sa="web-canary"),
    ]
    index = shop([("10.42.0.7", True), ("10.42.0.8", None), ("10.42.0.9", True)], pods)
    both = (spiffe("shop", "web"), spiffe("shop", "web-canary"))
    assert ask(index, CLUSTER_IP, 80) == Answer(True, both)
    assert ask(index, CLUSTER_IP, 8080) == PLAIN  # not a port of the Service
    assert ask(index, "10.96.0.11", 80) == PLAIN


def test_a_service_with_one_unmeshed_ready_endpoint_is_plain() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7"), running(pod_spec("old", injected=False), "10.42.0.8")]
    assert ask(shop([("10.42.0.7", True), ("10.42.0.8", True)], pods), CLUSTER_IP, 80) == PLAIN
    # not ready: no traffic goes there, so it does not count
    index = shop([("10.42.0.7", True), ("10.42.0.8", False)], pods)
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    # an endpoint that is no pod at all (a selectorless Service pointing outside)
    assert ask(shop([("10.42.0.7", True), ("192.0.2.1", True)], pods), CLUSTER_IP, 80) == PLAIN


def test_a_service_without_ready_endpoints_is_plain() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7")]
    assert ask(shop([], pods), CLUSTER_IP, 80) == PLAIN
    assert ask(shop([("10.42.0.7", False)], pods), CLUSTER_IP, 80) == PLAIN
    no_slices = index_of(pods, [service("web", [CLUSTER_IP], [("http", 80, 8080)])])
    assert ask(no_slices, CLUSTER_IP, 80) == PLAIN


def test_the_service_port_maps_to_the_target_port_the_slice_names() -> None:
    # the pods' proxies skip 9443: the admin port of the Service goes to them unproxied
    pods = [meshed_pod("web-0", "10.42.0.7", skip_inbound=(9443,))]
    index = shop([("10.42.0.7", True)], pods)
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    assert ask(index, CLUSTER_IP, 443) == PLAIN
    # and when the skipped port is the one http targets, http is plain too
    pods = [meshed_pod("web-0", "10.42.0.7", skip_inbound=(8080,))]
    index = shop([("10.42.0.7", True)], pods)
    assert ask(index, CLUSTER_IP, 80) == PLAIN
    assert is_meshed(index, CLUSTER_IP, 443)


def test_a_headless_service_has_no_cluster_ip_but_its_pods_answer() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7")]
    headless = service("web", ["None"], [("http", 80, 8080)])
    index = index_of(
        pods, [headless], [endpoint_slice("web-a", "web", [("10.42.0.7", True)], [("http", 8080)])]
    )
    assert index.size(Kind.SERVICES) == 0
    assert is_meshed(index, "10.42.0.7", 8080)


def test_a_dual_stack_service_uses_the_slices_of_the_address_family() -> None:
    pods = [running(pod_spec("web-0"), "10.42.0.7", "fd00:42::7")]
    plain_v6 = running(pod_spec("web-1", injected=False), "10.42.0.8", "fd00:42::8")
    index = index_of(
        [*pods, plain_v6],
        [service("web", [CLUSTER_IP, "fd00:96::10"], [("", 80, 8080)])],
        [
            endpoint_slice("web-4", "web", [("10.42.0.7", True)], [("", 8080)]),
            endpoint_slice(
                "web-6",
                "web",
                [("fd00:42::7", True), ("fd00:42::8", True)],
                [("", 8080)],
                address_type="IPv6",
            ),
        ],
    )
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "fd00:96::10", 80) == PLAIN


def test_slices_of_another_service_or_namespace_do_not_count() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7"), running(pod_spec("x", injected=False), "10.42.0.8")]
    index = index_of(
        pods,
        [service("web", [CLUSTER_IP], [("http", 80, 8080)])],
        [
            endpoint_slice("web-a", "web", [("10.42.0.7", True)], [("http", 8080)]),
            endpoint_slice("api-a", "api", [("10.42.0.8", True)], [("http", 8080)]),
            endpoint_slice("web-a", "web", [("10.42.0.8", True)], [("http", 8080)], "other"),
        ],
    )
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    index.apply(
        Kind.ENDPOINTSLICES,
        "MODIFIED",
        endpoint_slice(
            "web-a", "web", [("10.42.0.7", True), ("10.42.0.8", True)], [("http", 8080)]
        ),
    )
    assert ask(index, CLUSTER_IP, 80) == PLAIN


def test_a_service_whose_endpoints_all_terminate_is_judged_by_those_still_serving() -> None:
    """kube-proxy (1.26+) sends a Service's traffic to terminating endpoints that still serve
    when none is ready, as in a one-replica rollout: they decide the answer then."""
    old = meshed_pod("web-0", "10.42.0.7")
    plain_old = running(pod_spec("legacy-0", injected=False), "10.42.0.8")
    web = Answer(True, (spiffe("shop", "web"),))
    assert ask(shop([("10.42.0.7", TERMINATING)], [old]), CLUSTER_IP, 80) == web
    assert ask(shop([("10.42.0.8", TERMINATING)], [plain_old]), CLUSTER_IP, 80) == PLAIN
    both = [("10.42.0.7", TERMINATING), ("10.42.0.8", TERMINATING)]
    assert ask(shop(both, [old, plain_old]), CLUSTER_IP, 80) == PLAIN
    # a ready endpoint takes all the traffic: the terminating ones no longer count
    new = meshed_pod("web-1", "10.42.0.9", sa="web-next")
    rollout = shop([("10.42.0.8", TERMINATING), ("10.42.0.9", True)], [plain_old, new])
    assert ask(rollout, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web-next"),))
    # terminating and no longer serving: no traffic goes there
    gone = {"ready": False, "serving": False, "terminating": True}
    assert ask(shop([("10.42.0.8", gone)], [plain_old]), CLUSTER_IP, 80) == PLAIN
    assert (
        ask(shop([("10.42.0.8", gone), ("10.42.0.7", True)], [old, plain_old]), CLUSTER_IP, 80)
        == web
    )
    # not ready and not terminating (failing its probe): never a fallback
    unready = {"ready": False, "serving": False, "terminating": False}
    assert ask(shop([("10.42.0.8", unready)], [plain_old]), CLUSTER_IP, 80) == PLAIN
    # serving unset means serving, as the API defines it
    assert (
        ask(shop([("10.42.0.7", {"ready": False, "terminating": True})], [old]), CLUSTER_IP, 80)
        == web
    )


def test_the_fallback_to_terminating_endpoints_spans_all_slices_of_the_family() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7"), running(pod_spec("x", injected=False), "10.42.0.8")]
    index = index_of(
        pods,
        [service("web", [CLUSTER_IP], [("http", 80, 8080)])],
        [
            endpoint_slice("web-a", "web", [("10.42.0.8", TERMINATING)], [("http", 8080)]),
            endpoint_slice("web-b", "web", [("10.42.0.7", True)], [("http", 8080)]),
        ],
    )
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    index.apply(
        Kind.ENDPOINTSLICES,
        "MODIFIED",
        endpoint_slice("web-b", "web", [("10.42.0.7", False)], [("http", 8080)]),
    )
    assert ask(index, CLUSTER_IP, 80) == PLAIN  # now only the unmeshed terminating one serves


def test_external_and_load_balancer_ips_are_answered_like_the_cluster_ip() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7")]
    exposed = service("web", [CLUSTER_IP], [("http", 80, "http")])
    exposed["spec"]["externalIPs"] = ["192.0.2.10", "not-an-ip"]
    exposed["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "198.51.100.7"},
                {"hostname": "lb.example.com"},
                {"ip": "198.51.100.8", "ipMode": "Proxy"},  # the balancer proxies: no rule
                {"ip": "198.51.100.9", "ipMode": "VIP"},
            ]
        }
    }
    index = index_of(
        pods, [exposed], [endpoint_slice("web-a", "web", [("10.42.0.7", True)], [("http", 8080)])]
    )
    web = Answer(True, (spiffe("shop", "web"),))
    for address in (CLUSTER_IP, "192.0.2.10", "198.51.100.7", "198.51.100.9"):
        assert ask(index, address, 80) == web, address
        assert ask(index, address, 8080) == PLAIN, address  # only the Service's ports
    assert ask(index, "198.51.100.8", 80) == PLAIN
    # kube-proxy forwards nothing for a headless Service, external IPs or not
    headless = copy.deepcopy(exposed)
    headless["spec"]["clusterIP"], headless["spec"]["clusterIPs"] = "None", ["None"]
    index.apply(Kind.SERVICES, "MODIFIED", headless)
    assert ask(index, "192.0.2.10", 80) == PLAIN and ask(index, "198.51.100.7", 80) == PLAIN


# -- endpoints by the pod they name ---------------------------------------------------------


def test_an_endpoint_is_judged_by_the_pod_its_target_ref_names() -> None:
    """When two pods claim an IP (one gone, the API not yet told), the endpoint's targetRef
    says which one the Service sends to: only its identity may answer."""
    pods = [meshed_pod("web-0", "10.42.0.7"), meshed_pod("old-0", "10.42.0.7", sa="old")]
    slices = [
        endpoint_slice(
            "web-a", "web", [("10.42.0.7", True)], [("http", 8080)], pods={"10.42.0.7": "web-0"}
        )
    ]
    index = index_of(pods, [service("web", [CLUSTER_IP], [("http", 80, 8080)])], slices)
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    assert ask(index, "10.42.0.7", 8080) == Answer(  # the pod IP itself: either may answer
        True, (spiffe("shop", "old"), spiffe("shop", "web"))
    )


def test_an_endpoint_whose_pod_is_not_seen_yet_is_unsure_never_plain() -> None:
    plain = running(pod_spec("legacy-0", injected=False), "10.42.0.8")
    refs = {"10.42.0.7": "web-0", "10.42.0.8": "legacy-0"}
    svc = service("web", [CLUSTER_IP], [("http", 80, 8080)])

    def sliced(*addresses: str) -> dict[str, Any]:
        return endpoint_slice(
            "web-a", "web", [(a, True) for a in addresses], [("http", 8080)], pods=refs
        )

    index = index_of([], [svc], [sliced("10.42.0.7")])
    answer = ask(index, CLUSTER_IP, 80)
    assert isinstance(answer, destinations.Unsure)
    assert answer.why == (
        "EndpointSlice shop/web-a lists pod shop/web-0, which the server has not seen yet"
    )
    index.apply(Kind.PODS, "ADDED", meshed_pod("web-0", "10.42.0.7"))
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))
    # seen and not meshed differs from not seen: a sure "plain"
    index.apply(Kind.PODS, "DELETED", meshed_pod("web-0", "10.42.0.7"))
    index.apply(Kind.PODS, "ADDED", plain)
    index.apply(Kind.ENDPOINTSLICES, "MODIFIED", sliced("10.42.0.7", "10.42.0.8"))
    assert ask(index, CLUSTER_IP, 80) == PLAIN  # legacy-0 is plain, whatever web-0 is
    index.apply(Kind.ENDPOINTSLICES, "MODIFIED", sliced("10.42.0.8"))
    assert ask(index, CLUSTER_IP, 80) == PLAIN
    # an unmeshed pod without an IP yet is known too
    pending = running(pod_spec("legacy-0", injected=False), "10.42.0.8", phase="Pending")
    index.apply(Kind.PODS, "MODIFIED", pending)
    assert ask(index, CLUSTER_IP, 80) == PLAIN
    index.apply(Kind.PODS, "DELETED", pending)
    assert isinstance(ask(index, CLUSTER_IP, 80), destinations.Unsure)


def test_an_endpoint_naming_a_pod_that_does_not_hold_its_address_is_unsure() -> None:
    """A StatefulSet pod recreated under its name at a new IP, the slice not yet updated:
    the old address may be anybody's now."""
    index = index_of(
        [meshed_pod("web-0", "10.42.0.9")],
        [service("web", [CLUSTER_IP], [("http", 80, 8080)])],
        [
            endpoint_slice(
                "web-a", "web", [("10.42.0.7", True)], [("http", 8080)], pods={"10.42.0.7": "web-0"}
            )
        ],
    )
    answer = ask(index, CLUSTER_IP, 80)
    assert isinstance(answer, destinations.Unsure)
    assert "lists pod shop/web-0 at 10.42.0.7, which that pod does not hold" in answer.why


def test_an_endpoint_naming_another_kind_is_judged_by_its_address() -> None:
    pods = [meshed_pod("web-0", "10.42.0.7")]
    piece = endpoint_slice("web-a", "web", [("10.42.0.7", True)], [("http", 8080)])
    piece["endpoints"][0]["targetRef"] = {"kind": "VirtualMachine", "name": "vm-0"}
    index = index_of(pods, [service("web", [CLUSTER_IP], [("http", 80, 8080)])], [piece])
    assert ask(index, CLUSTER_IP, 80) == Answer(True, (spiffe("shop", "web"),))


# -- answers held, and what changes them ------------------------------------------------------


def big_shop(endpoints: int) -> tuple[destinations.Index, list[dict[str, Any]]]:
    """Service web with ``endpoints`` meshed pods behind it, in slices of 100 as Kubernetes
    cuts them."""
    template = pod_spec("web-0")
    pods, refs = [], {}
    for i in range(endpoints):
        pod = copy.deepcopy(template)
        pod["metadata"]["name"] = f"web-{i}"
        ip = str(ipaddress.ip_address("10.42.0.1") + i)
        pods.append(running(pod, ip))
        refs[ip] = f"web-{i}"
    addresses = list(refs)
    slices = [
        endpoint_slice(
            f"web-{start}",
            "web",
            [(a, True) for a in addresses[start : start + 100]],
            [("http", 8080)],
            pods=refs,
        )
        for start in range(0, endpoints, 100)
    ]
    index = index_of(pods, [service("web", [CLUSTER_IP], [("http", 80, 8080)])], slices)
    return index, pods


def test_a_lookup_of_a_big_service_is_quick_and_follows_every_change() -> None:
    index, pods = big_shop(2000)
    web = Answer(True, (spiffe("shop", "web"),))
    assert ask(index, CLUSTER_IP, 80) == web
    address, port = destinations.parse(CLUSTER_IP, 80)
    started = time.perf_counter()
    for _ in range(2000):
        index.lookup(address, port)
    # walking 2000 endpoints at each lookup took about 10 ms each, 20 s for these
    assert time.perf_counter() - started < 2.0
    # each kind's events, and relists, change the answer held
    unmeshed = running(pod_spec("web-1500", injected=False), "10.42.5.221")
    index.apply(Kind.PODS, "MODIFIED", unmeshed)
    assert ask(index, CLUSTER_IP, 80) == PLAIN
    index.load(Kind.PODS, pods)
    assert ask(index, CLUSTER_IP, 80) == web
    index.apply(Kind.SERVICES, "MODIFIED", service("web", [CLUSTER_IP], [("http", 8000, 8080)]))
    assert ask(index, CLUSTER_IP, 80) == PLAIN and ask(index, CLUSTER_IP, 8000) == web
    index.apply(
        Kind.ENDPOINTSLICES,
        "ADDED",
        endpoint_slice("web-extra", "web", [("192.0.2.1", True)], [("http", 8080)]),
    )
    assert ask(index, CLUSTER_IP, 8000) == PLAIN
    index.apply(
        Kind.ENDPOINTSLICES,
        "DELETED",
        endpoint_slice("web-extra", "web", [("192.0.2.1", True)], [("http", 8080)]),
    )
    assert ask(index, CLUSTER_IP, 8000) == web
    index.load(Kind.ENDPOINTSLICES, [])
    assert ask(index, CLUSTER_IP, 8000) == PLAIN


# -- requests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "port", "says"),
    [
        ("web.shop.svc", 80, "address 'web.shop.svc' is not an IP literal"),
        ("", 80, "address '' is not an IP literal"),
        ("10.0.0.256", 80, "address '10.0.0.256' is not an IP literal"),
        ("010.0.0.1", 80, "is not an IP literal"),
        ("10.0.0.1:80", 80, "is not an IP literal"),
        ("fe80::1%eth0", 80, "has a zone: send it without '%eth0'"),
        ("10.0.0.1", 0, "port 0 is not a port number"),
        ("10.0.0.1", 65536, "port 65536 is not a port number"),
    ],
)
def test_a_malformed_request_says_what_is_wrong(address: str, port: int, says: str) -> None:
    with pytest.raises(errors.InvalidLookup) as refused:
        destinations.parse(address, port)
    assert says in str(refused.value)
    assert ": send " in str(refused.value)


def test_a_long_address_is_not_echoed_whole() -> None:
    with pytest.raises(errors.InvalidLookup) as refused:
        destinations.parse("x" * 10_000, 80)
    assert len(str(refused.value)) < 300


# -- against the API server ------------------------------------------------------------------


def free_ips(count: int) -> list[str]:
    """Pod IPs no other test of the session uses."""
    base = ipaddress.ip_address("10.128.0.0") + random.randrange(1, 2**20) * 4
    return [str(base + i) for i in range(count)]


@contextlib.asynccontextmanager
async def following(
    stale_after: float = destinations.STALE_AFTER,
) -> AsyncIterator[tuple[destinations.Source, metrics.Metrics]]:
    """The list-and-watch source of the cluster KUBECONFIG names, once synced."""
    api = await kube.connect()
    counters = metrics.Metrics()
    source = destinations.Source(api, destinations.Index(TD), counters, stale_after)
    task = asyncio.get_running_loop().create_task(source.run())
    try:
        await asyncio.wait_for(source.synced.wait(), 20)
        yield source, counters
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()


@pytest.fixture
async def followed(
    kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[destinations.Index, metrics.Metrics]]:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    async with following() as (source, counters):
        yield source.index, counters


async def becomes(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def create_pod(core: client.CoreV1Api, namespace: str, pod: dict[str, Any], *ips: str) -> None:
    """Store ``pod`` and report it running at ``ips``, as a kubelet would."""
    body = copy.deepcopy(pod)
    body["metadata"]["namespace"] = namespace
    body.pop("status", None)
    core.create_namespaced_pod(namespace, body)
    status = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
    core.patch_namespaced_pod_status(body["metadata"]["name"], namespace, {"status": status})


class EndpointSlices:
    """EndpointSlices written by hand, in the version the API server serves (Kubernetes 1.20,
    which the tests' control plane runs, has only v1beta1; its fields used here are v1's)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        served = {v.version for v in client.DiscoveryApi(api).get_api_group().versions}
        self.version = "v1" if "v1" in served else "v1beta1"

    def put(self, body: dict[str, Any]) -> None:
        """Create or replace it."""
        full = {**body, "apiVersion": f"discovery.k8s.io/{self.version}", "kind": "EndpointSlice"}
        where = ("discovery.k8s.io", self.version, self.namespace, "endpointslices")
        try:
            current = self.custom.get_namespaced_custom_object(*where, body["metadata"]["name"])
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
            self.custom.create_namespaced_custom_object(*where, full)
            return
        full["metadata"] = {
            **full["metadata"],
            "resourceVersion": current["metadata"]["resourceVersion"],
        }
        self.custom.replace_namespaced_custom_object(*where, body["metadata"]["name"], full)


def service_accounts(core: client.CoreV1Api, namespace: str, *names: str) -> None:
    for name in names:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )


@pytest.mark.cluster
async def test_answers_follow_pods_as_they_change(
    followed: tuple[destinations.Index, metrics.Metrics], core: client.CoreV1Api, namespace: str
) -> None:
    index, _ = followed
    service_accounts(core, namespace, "web", "api")
    web_ip, api_ip, probe_ip = free_ips(3)
    v6 = "fd00:42::" + format(random.randrange(1, 2**16), "x")
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip, v6)
    web = Answer(True, (spiffe(namespace, "web"),))
    await becomes("web-0 to be meshed", lambda: ask(index, web_ip, 8080) == web)
    assert ask(index, v6, 8080) == web
    assert ask(index, web_ip, SETTINGS.admin_port) == PLAIN

    # a pod stored with the init container but not (yet) annotated as injected is plain until
    # the annotation arrives
    unannotated = pod_spec("api-0", namespace, sa="api")
    del unannotated["metadata"]["annotations"][inject.VERSION_ANNOTATION]
    create_pod(core, namespace, unannotated, api_ip)
    # pods are watched in order: once a pod stored after it is seen, api-0 has been seen too
    create_pod(core, namespace, pod_spec("probe-0", namespace), probe_ip)
    await becomes("a later pod to be seen", lambda: ask(index, probe_ip, 8080) == web)
    assert ask(index, api_ip, 8080) == PLAIN
    core.patch_namespaced_pod(
        "api-0", namespace, {"metadata": {"annotations": {inject.VERSION_ANNOTATION: "1.2.3"}}}
    )
    api = Answer(True, (spiffe(namespace, "api"),))
    await becomes("api-0 to be meshed", lambda: ask(index, api_ip, 8080) == api)

    core.patch_namespaced_pod_status("web-0", namespace, {"status": {"phase": "Succeeded"}})
    await becomes("finished web-0 to be plain", lambda: ask(index, web_ip, 8080) == PLAIN)
    core.delete_namespaced_pod("api-0", namespace, grace_period_seconds=0)
    await becomes("deleted api-0 to be plain", lambda: ask(index, api_ip, 8080) == PLAIN)
    assert ask(index, v6, 8080) == PLAIN


@pytest.mark.cluster
async def test_answers_follow_a_service_and_its_endpoint_slices(
    followed: tuple[destinations.Index, metrics.Metrics],
    core: client.CoreV1Api,
    api: client.ApiClient,
    kubectl: kubetest.Kubectl,
    namespace: str,
) -> None:
    index, counters = followed
    slices = EndpointSlices(api, namespace)
    service_accounts(core, namespace, "web", "web-canary")
    web_ip, canary_ip, plain_ip = free_ips(3)
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    create_pod(core, namespace, pod_spec("canary-0", namespace, sa="web-canary"), canary_ip)
    create_pod(core, namespace, pod_spec("old-0", namespace, injected=False), plain_ip)
    created = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        },
    )
    cluster_ip = created.spec.cluster_ip
    assert cluster_ip and cluster_ip != "None"

    def slice_of(*addresses: str) -> dict[str, Any]:
        body = endpoint_slice(
            "web-manual", "web", [(a, True) for a in addresses], [("http", 8080)], namespace
        )
        body["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "meshward-tests"
        return body

    # Services are watched in order: once a Service created after web is seen, so is web
    probe = core.create_namespaced_service(
        namespace, {"metadata": {"name": "probe"}, "spec": {"ports": [{"port": 80}]}}
    )
    probe_slice = endpoint_slice("probe-manual", "probe", [(web_ip, True)], [("", 80)], namespace)
    slices.put(probe_slice)
    await becomes("a later Service to be seen", lambda: is_meshed(index, probe.spec.cluster_ip, 80))
    assert ask(index, cluster_ip, 80) == PLAIN  # no endpoints yet
    slices.put(slice_of(web_ip, canary_ip))
    both = Answer(True, (spiffe(namespace, "web"), spiffe(namespace, "web-canary")))
    await becomes("the Service to be meshed", lambda: ask(index, cluster_ip, 80) == both)
    assert ask(index, cluster_ip, 8080) == PLAIN  # the target port is not the Service's

    slices.put(slice_of(web_ip, plain_ip))
    await becomes(
        "an unmeshed endpoint to make it plain", lambda: ask(index, cluster_ip, 80) == PLAIN
    )
    slices.put(slice_of(web_ip))
    web = Answer(True, (spiffe(namespace, "web"),))
    await becomes("the Service to be meshed again", lambda: ask(index, cluster_ip, 80) == web)
    core.delete_namespaced_pod("web-0", namespace, grace_period_seconds=0)
    await becomes("its only pod gone", lambda: ask(index, cluster_ip, 80) == PLAIN)
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    await becomes("the pod back", lambda: ask(index, cluster_ip, 80) == web)
    kubectl.run("delete", "service", "web", "-n", namespace)
    await becomes("the Service gone", lambda: ask(index, cluster_ip, 80) == PLAIN)
    gauge = counters.registry.get_sample_value("policy_destinations", {"kind": "endpointslices"})
    assert gauge is not None and gauge >= 1


@pytest.mark.cluster
async def test_objects_that_exist_before_it_starts_are_answered_once_synced(
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    api: client.ApiClient,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first list, not the watch, brings them in: no answer is given before it is done."""
    service_accounts(core, namespace, "web")
    (ip,) = free_ips(1)
    create_pod(core, namespace, pod_spec("web-0", namespace), ip)
    created = core.create_namespaced_service(
        namespace, {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
    )
    slice_body = endpoint_slice("web-manual", "web", [(ip, True)], [("", 80)], namespace)
    EndpointSlices(api, namespace).put(slice_body)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    async with following() as (source, _):
        index = source.index
        web = Answer(True, (spiffe(namespace, "web"),))
        assert ask(index, ip, 80) == web
        assert ask(index, created.spec.cluster_ip, 80) == web


@pytest.mark.cluster
async def test_a_service_is_answered_on_its_external_and_balancer_ips_by_its_pods(
    followed: tuple[destinations.Index, metrics.Metrics],
    core: client.CoreV1Api,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """The Service's addresses and the endpoints' pods as the API server stores them."""
    index, _ = followed
    service_accounts(core, namespace, "web")
    web_ip, later_ip = free_ips(2)
    external, balancer = (
        f"192.0.2.{random.randrange(1, 255)}",
        f"198.51.100.{random.randrange(1, 255)}",
    )
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    created = core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "type": "LoadBalancer",
                "externalIPs": [external],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
    )
    core.patch_namespaced_service_status(
        "web", namespace, {"status": {"loadBalancer": {"ingress": [{"ip": balancer}]}}}
    )
    refs = {web_ip: "web-0", later_ip: "web-1"}
    slices = EndpointSlices(api, namespace)

    def slice_of(*addresses: str) -> dict[str, Any]:
        body = endpoint_slice(
            "web-manual",
            "web",
            [(a, True) for a in addresses],
            [("http", 8080)],
            namespace,
            pods=refs,
        )
        body["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"] = "meshward-tests"
        return body

    slices.put(slice_of(web_ip))
    web = Answer(True, (spiffe(namespace, "web"),))
    for address in (created.spec.cluster_ip, external, balancer):
        await becomes(f"{address} to be meshed", lambda at=address: ask(index, at, 80) == web)
    # an endpoint whose pod the server has not seen (the pod is not even created yet)
    slices.put(slice_of(web_ip, later_ip))
    await becomes(
        "the unknown pod to make it unsure",
        lambda: isinstance(ask(index, external, 80), destinations.Unsure),
    )
    unsure = ask(index, external, 80)
    assert isinstance(unsure, destinations.Unsure)
    assert f"lists pod {namespace}/web-1, which the server has not seen yet" in unsure.why
    create_pod(core, namespace, pod_spec("web-1", namespace, injected=False), later_ip)
    await becomes("the pod seen, unmeshed", lambda: ask(index, balancer, 80) == PLAIN)


@pytest.mark.cluster
async def test_a_quiet_cluster_with_open_watches_is_not_stale(
    kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staleness is silence from a failing API server, not a cluster where nothing changes:
    an open watch is news enough."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    async with following(stale_after=0.3) as (source, _):
        assert source.unavailable() is None
        await asyncio.sleep(1.0)
        assert source.unavailable() is None
