"""Proxies report their trust state to the control plane (issue 6).

First the published format as the operator reads it (:mod:`meshward.proxyreports`: parse,
merge, liveness), then real proxies in their own processes, certified by the real identity
service, reporting to a real policy server that publishes ConfigMaps in a real API server.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from kubernetes import client

from meshward import errors, proxyreports, trustbundle
from meshward.identity import pki
from meshward.policyserver import metrics, reports, server
from meshward.policyserver._proto import policy_pb2
from tests import kubetest
from tests.test_bundle import ConfigMapVolume
from tests.test_identity_service import IdentityService, init_trust, name, token_for
from tests.test_proxy_run import Proxy

NOW = datetime.datetime(2026, 11, 24, 10, 0, 0, tzinfo=datetime.UTC)
BUNDLE = "sha256:" + "b" * 64
ISSUER = "sha256:" + "1" * 64


def proxy(
    pod: str, reported_at: datetime.datetime = NOW, bundle: str = BUNDLE
) -> proxyreports.Proxy:
    return proxyreports.Proxy(
        pod=pod,
        identity="spiffe://cluster.local/ns/apps/sa/web",
        trust_bundle=bundle,
        leaf_issuer=ISSUER,
        leaf_not_after=NOW + datetime.timedelta(hours=24),
        proxy_version="0.1.0",
        reported_at=reported_at,
    )


# -- the format --------------------------------------------------------------------------------


def test_a_published_key_reads_back_as_written() -> None:
    published = proxyreports.publish("policy-0", [proxy("web-1"), proxy("web-0")], NOW)
    text = published.to_json()
    assert proxyreports.parse(text) == published
    raw = json.loads(text)
    assert raw["reportedBy"] == "policy-0" and raw["updatedAt"] == "2026-11-24T10:00:00Z"
    assert [p["pod"] for p in raw["proxies"]] == ["web-0", "web-1"]  # sorted by pod
    assert raw["proxies"][0] == {
        "pod": "web-0",
        "identity": "spiffe://cluster.local/ns/apps/sa/web",
        "trustBundle": BUNDLE,
        "leafIssuer": ISSUER,
        "leafNotAfter": "2026-11-25T10:00:00Z",
        "proxyVersion": "0.1.0",
        "reportedAt": "2026-11-24T10:00:00Z",
    }


def test_times_are_written_in_utc_to_the_second() -> None:
    east = datetime.timezone(datetime.timedelta(hours=2))
    at = datetime.datetime(2026, 11, 24, 12, 0, 0, 999_999, tzinfo=east)
    raw = json.loads(proxyreports.publish("p", [proxy("web-0", at)], at).to_json())
    assert raw["updatedAt"] == raw["proxies"][0]["reportedAt"] == "2026-11-24T10:00:00Z"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("{", "is not JSON"),
        ("[]", "is not a JSON object"),
        ('{"reportedBy": "p", "proxies": []}', "updatedAt: Field required"),
        (
            '{"reportedBy": "p", "updatedAt": "2026-11-24T10:00:00", "proxies": []}',
            "updatedAt: Input should have timezone info",
        ),
        (
            '{"reportedBy": "p", "updatedAt": 1795000000, "proxies": []}',
            "updatedAt: Input should be a valid datetime",
        ),
        ('{"reportedBy": "p q", "updatedAt": "2026-11-24T10:00:00Z", "proxies": []}', "reportedBy"),
    ],
)
def test_a_malformed_key_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(errors.InvalidProxyReport) as refused:
        proxyreports.parse(text, "key policy-0.json")
    assert str(refused.value).startswith("key policy-0.json ")
    assert says in str(refused.value)


def test_a_malformed_entry_is_refused() -> None:
    good = json.loads(proxyreports.publish("p", [proxy("web-0")], NOW).to_json())
    for field, bad in [
        ("trustBundle", "sha256:" + "B" * 64),
        ("trustBundle", "sha256:abc"),
        ("leafIssuer", "md5:" + "1" * 32),
        ("pod", "Web_0"),
        ("reportedAt", "yesterday"),
        ("identity", "web"),
    ]:
        entry = {**good["proxies"][0], field: bad}
        with pytest.raises(errors.InvalidProxyReport) as refused:
            proxyreports.parse(json.dumps({**good, "proxies": [entry]}))
        assert f"proxies.0.{field}" in str(refused.value), (field, str(refused.value))


def test_entries_must_be_sorted_and_unique() -> None:
    good = json.loads(proxyreports.publish("p", [proxy("web-0"), proxy("web-1")], NOW).to_json())
    for proxies in (good["proxies"][::-1], [good["proxies"][0]] * 2):
        with pytest.raises(errors.InvalidProxyReport, match="sorted by pod, each pod once"):
            proxyreports.parse(json.dumps({**good, "proxies": proxies}))
    with pytest.raises(ValueError):
        proxyreports.publish("p", [proxy("web-0"), proxy("web-0")], NOW)


def test_fields_a_newer_server_adds_are_ignored() -> None:
    raw = json.loads(proxyreports.publish("p", [proxy("web-0")], NOW).to_json())
    raw["schemaHint"] = "v2"
    raw["proxies"][0]["node"] = "node-1"
    assert proxyreports.parse(json.dumps(raw)).proxies == (proxy("web-0"),)


def test_liveness_is_a_report_at_most_90_seconds_old() -> None:
    entry = proxy("web-0")
    assert entry.live(NOW + datetime.timedelta(seconds=90))
    assert not entry.live(NOW + datetime.timedelta(seconds=91))
    assert entry.live(NOW - datetime.timedelta(seconds=5))  # the reader's clock is behind


def test_collect_takes_each_pods_newest_report_across_replicas() -> None:
    old = NOW - datetime.timedelta(seconds=60)
    data = {
        "policy-0.json": proxyreports.publish(
            "policy-0",
            [proxy("web-0", old), proxy("web-1", NOW - datetime.timedelta(minutes=5))],
            NOW,
        ).to_json(),
        "policy-1.json": proxyreports.publish(
            "policy-1", [proxy("web-0", NOW, bundle=ISSUER)], NOW
        ).to_json(),
        "policy-2.json": "{",
        "README": "not a replica's key",
    }
    collected = proxyreports.collect(data)
    assert collected.proxies["web-0"].trust_bundle == ISSUER  # policy-1's is newer
    assert set(collected.proxies) == {"web-0", "web-1"}
    assert set(collected.live(NOW + datetime.timedelta(seconds=1))) == {"web-0"}
    (unreadable,) = collected.unreadable
    assert unreadable.startswith("key policy-2.json is not JSON")
    assert proxyreports.collect(None) == proxyreports.Collected(proxies={})


def test_configmap_names_fit_kubernetes_and_stay_distinct() -> None:
    assert proxyreports.configmap_name("emojivoto") == "meshward-proxies-emojivoto"
    assert proxyreports.configmap_name("a" * 63) == "meshward-proxies-" + "a" * 63
    long_a, long_b = "x" * 300 + "a", "x" * 300 + "b"
    names = {proxyreports.configmap_name(long_a), proxyreports.configmap_name(long_b)}
    assert len(names) == 2 and all(len(n) <= 253 for n in names)
    assert all(n.startswith("meshward-proxies-xxx") for n in names)
    assert proxyreports.data_key("meshward-policy-5d8f-x2x7q") == "meshward-policy-5d8f-x2x7q.json"


def test_the_server_keeps_a_bounded_number_of_pods_per_namespace() -> None:
    held = reports.Reports(metrics.Metrics(), max_per_namespace=2)
    caller = pki.Identity("apps", "web", "cluster.local")

    def request(pod: str) -> policy_pb2.ProxyReport:
        return policy_pb2.ProxyReport(
            namespace="apps",
            pod=pod,
            trust_bundle_fingerprint=BUNDLE,
            leaf_issuer_fingerprint=ISSUER,
            leaf_not_after_unix=1_900_000_000,
            proxy_version="0.1.0",
        )

    held.record("apps", request("web-0"), caller, NOW)
    held.record("apps", request("web-1"), caller, NOW)
    with pytest.raises(errors.TooManyProxies, match="already has 2 pods reporting"):
        held.record("apps", request("web-2"), caller, NOW)
    held.record("apps", request("web-1"), caller, NOW + datetime.timedelta(seconds=1))  # known
    assert [p.pod for p in held.proxies("apps")] == ["web-0", "web-1"]
    held.record("other", request("web-2"), pki.Identity("other", "web", "cluster.local"), NOW)
    # web-0 (silent since NOW) expires, web-1 (refreshed a second later) stays: room for web-2
    later = NOW + held.expiry
    assert held.expire(later) == ["apps", "other"]
    assert [p.pod for p in held.proxies("apps")] == ["web-1"]
    held.record("apps", request("web-2"), caller, later)
    assert [p.pod for p in held.proxies("apps")] == ["web-1", "web-2"]
    assert held.expire(later + held.expiry) == ["apps"]
    assert held.namespaces() == [] and held.next_expiry() is None


# -- real proxies ------------------------------------------------------------------------------


@pytest.fixture
def control_plane(core: client.CoreV1Api) -> Iterator[str]:
    own = f"t-cp-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=own)))
    yield own
    core.delete_namespace(own)


@pytest.fixture
def identity_service(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[IdentityService]:
    service = IdentityService(kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "identity.log")
    service.start()
    yield service
    service.stop()


async def start_policy_server(
    trust: pathlib.Path, control_plane: str, port: int = 0
) -> server.Running:
    """The policy server in this process; it forgets a pod after 3 s without a report."""
    running = await server.start(
        server.Settings(
            trust_domain="cluster.local",
            issuer_dir=trust,
            anchors_file=trust / "ca-bundle.crt",
            address=f"127.0.0.1:{port}",
            admin_address="127.0.0.1:0",
            namespace=control_plane,
            instance="policy-0",
            report_expiry=3.0,
        )
    )
    await asyncio.wait_for(running.synced.wait(), 20)
    return running


@pytest.fixture
async def policy_server(
    kubeconfig: pathlib.Path,
    identity_service: IdentityService,
    control_plane: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[server.Running]:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    running = await start_policy_server(identity_service.trust, control_plane)
    yield running
    await running.stop()


def reporting_proxy(
    tmp: pathlib.Path,
    service: IdentityService,
    core: client.CoreV1Api,
    namespace: str,
    port: int,
    trust_roots: pathlib.Path,
) -> Proxy:
    """Proxy ``web-0`` following the policy service on ``port``, heartbeat every second."""
    return Proxy(
        tmp,
        service,
        token_for(core, namespace, "web"),
        name("web", namespace),
        None,
        policy_service=port,
        app_port=kubetest.free_port(),
        pod="web-0",
        trust_roots=trust_roots,
        env={"MESHWARD_PROXY_REPORT_INTERVAL": "1"},
    )


def published(
    core: client.CoreV1Api, control_plane: str, namespace: str
) -> client.V1ConfigMap | None:
    try:
        found: client.V1ConfigMap = core.read_namespaced_config_map(
            proxyreports.configmap_name(namespace), control_plane
        )
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


def web_0(core: client.CoreV1Api, control_plane: str, namespace: str) -> proxyreports.Proxy | None:
    configmap = published(core, control_plane, namespace)
    if configmap is None:
        return None
    return proxyreports.collect(configmap.data).proxies.get("web-0")


async def eventually(what: str, check: Callable[[], object], timeout: float) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


def identity_of(web: Proxy) -> tuple[str, str, datetime.datetime]:
    """(bundle fingerprint, leaf issuer fingerprint, leaf notAfter) from /identity."""
    found = web.identity()
    bundle, issuer = found["trust_bundle"], found["issuer"]
    assert isinstance(bundle, dict) and isinstance(issuer, dict)
    not_after = datetime.datetime.fromisoformat(str(found["not_after"]))
    return str(bundle["fingerprint"]), str(issuer["fingerprint"]), not_after


@pytest.mark.cluster
async def test_a_proxy_reports_what_it_holds_and_follows_a_bundle_change(
    policy_server: server.Running,
    identity_service: IdentityService,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
    tmp_path: pathlib.Path,
) -> None:
    trust = identity_service.trust
    roots = ConfigMapVolume(tmp_path / "trust-roots")
    roots.write({"ca-bundle.crt": (trust / "ca-bundle.crt").read_text()})
    web = reporting_proxy(
        tmp_path / "web", identity_service, core, namespace, policy_server.port, roots.directory
    )
    web.start()
    try:
        await eventually("the report", lambda: web_0(core, control_plane, namespace), 10)
        entry = web_0(core, control_plane, namespace)
        assert entry is not None
        bundle, issuer, not_after = identity_of(web)
        assert (entry.trust_bundle, entry.leaf_issuer) == (bundle, issuer)
        assert entry.leaf_not_after == not_after.replace(microsecond=0)
        assert entry.identity == f"spiffe://cluster.local/ns/{namespace}/sa/web"
        assert entry.proxy_version == importlib.metadata.version("meshward")
        configmap = published(core, control_plane, namespace)
        assert configmap is not None
        assert configmap.metadata.annotations[proxyreports.NAMESPACE_ANNOTATION] == namespace
        assert list(configmap.data) == ["policy-0.json"]

        # a second anchor joins the mounted bundle: the report follows within seconds
        anchor, _ = pki.new_trust_anchor("cluster.local", datetime.timedelta(days=1))
        old = pki.load_certificates((trust / "ca-bundle.crt").read_bytes())
        both = trustbundle.fingerprint([*old, anchor])
        roots.write(
            {"ca-bundle.crt": (trust / "ca-bundle.crt").read_text() + pki.to_pem(anchor).decode()}
        )
        took = await eventually(
            "the new bundle in the ConfigMap",
            lambda: (e := web_0(core, control_plane, namespace)) and e.trust_bundle == both,
            10,
        )
        assert took < 5.0, took
        assert identity_of(web)[0] == both
        assert web.ready()
    finally:
        web.stop()
    # a proxy that stops is dropped once its reports expire (3 s here, 90 s by default)
    took = await eventually(
        "the stopped proxy to be dropped",
        lambda: published(core, control_plane, namespace) is None,
        10,
    )
    assert took < 6.0, took
    assert "WARNING meshward.proxy.report" not in web.log_tail()


@pytest.mark.cluster
async def test_a_proxy_keeps_serving_while_it_can_not_report_and_catches_up(
    kubeconfig: pathlib.Path,
    identity_service: IdentityService,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    trust = identity_service.trust
    roots = ConfigMapVolume(tmp_path / "trust-roots")
    roots.write({"ca-bundle.crt": (trust / "ca-bundle.crt").read_text()})
    port = kubetest.free_port()  # no policy server there yet
    web = reporting_proxy(
        tmp_path / "web", identity_service, core, namespace, port, roots.directory
    )
    web.start()  # ready: a report that can not be sent holds nothing up
    try:
        await asyncio.sleep(3.5)  # several heartbeats fail
        log = web.log_tail()
        assert log.count("WARNING meshward.proxy.report") == 1, log
        assert "can not report the trust state to the policy server" in log
        assert web.ready()
        running = await start_policy_server(trust, control_plane, port)
        try:
            await eventually("the report", lambda: web_0(core, control_plane, namespace), 10)
        finally:
            await running.stop()
        assert web_0(core, control_plane, namespace).trust_bundle == identity_of(web)[0]  # type: ignore[union-attr]
        await eventually(
            "the recovery in the log", lambda: "trust state reported to" in web.log_tail(), 5
        )
    finally:
        web.stop()
