"""The policy API end to end: ``meshward-policy`` ConfigMaps in a real API server, the policy
server over mutual TLS on loopback, and the proxy's StreamSource following its namespace.

Client certificates are signed by the same issuer the identity service uses (the chain is what
the server checks); one test gets its certificate from the real identity service instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import pathlib
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client
from kubernetes import config as kubernetes_config

from meshward import devcluster, errors, kube, proxyreports
from meshward.identity import pki
from meshward.policy import compile as policy_compile
from meshward.policy import compiled, decision
from meshward.policy.resources import DefaultPolicy
from meshward.policyserver import destinations, documents, metrics, publisher, reports, server
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import identity, policy_stream
from tests import builders, kubetest
from tests.test_destinations import (
    EndpointSlices,
    create_pod,
    endpoint_slice,
    free_ips,
    pod_spec,
    service_accounts,
)
from tests.test_identity_service import IdentityService, init_trust, meshward, name, token_for
from tests.test_proxy_identity import proxy_settings
from tests.test_proxy_identity import running as renewing

# Documents are written by hand here: the operator must not restore its own over them.
pytestmark = [pytest.mark.cluster, pytest.mark.unmanaged]

TD = "cluster.local"
KeyAndChain = tuple[bytes, bytes]


# -- documents and ConfigMaps ----------------------------------------------------------------


def document(namespace: str, default: DefaultPolicy, pods: int = 1) -> compiled.PolicyDocument:
    """A compiled document for ``namespace``; its default policy tells documents apart."""
    found = [builders.pod(f"web-{i}", ports={"http": 8080}) for i in range(pods)]
    state = builders.state(ns=namespace, pods=found)
    settings = policy_compile.Settings(default_policy=default)
    return policy_compile.compile_namespace(state, settings).document


def put_policy(core: client.CoreV1Api, namespace: str, text: str) -> None:
    """Write the namespace's meshward-policy ConfigMap as the operator does."""
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=compiled.CONFIGMAP_NAME, namespace=namespace),
        data={compiled.CONFIGMAP_KEY: text},
    )
    try:
        core.replace_namespaced_config_map(compiled.CONFIGMAP_NAME, namespace, body)
    except client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise
        core.create_namespaced_config_map(namespace, body)


def allows(source: policy_stream.StreamSource) -> bool | None:
    policy = source.current()
    if policy is None:
        return None
    dest = decision.Destination(port=8080, pod="web-0")
    return decision.decide(policy, dest, decision.Client(source_ip="10.1.1.1")).allowed


# -- certificates ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return init_trust(tmp_path_factory.mktemp("trust"))


def issuer_of(trust: pathlib.Path) -> pki.Issuer:
    return pki.Issuer.from_pem((trust / "tls.crt").read_bytes(), (trust / "tls.key").read_bytes())


def workload_certificate(
    trust: pathlib.Path,
    namespace: str,
    sa: str = "web",
    trust_domain: str = TD,
    lifetime: datetime.timedelta = datetime.timedelta(hours=1),
) -> KeyAndChain:
    """(key PEM, chain PEM) of a workload leaf from ``trust``'s issuer, as a proxy holds it."""
    issuer = issuer_of(trust)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.sign_leaf(
        issuer, key.public_key(), pki.Identity(namespace, sa, trust_domain), lifetime=lifetime
    )
    return pki.key_to_pem(key), pki.to_pem(leaf, issuer.certificate, *issuer.chain)


def certificate_without_spiffe_id(trust: pathlib.Path) -> KeyAndChain:
    """A client certificate from the mesh issuer that names a host, not a workload."""
    issuer = issuer_of(trust)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ski = issuer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.example")]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(issuer.key, hashes.SHA256())
    )
    return pki.key_to_pem(key), pki.to_pem(cert, issuer.certificate)


# -- the server and the client ---------------------------------------------------------------


def settings(trust: pathlib.Path, port: int = 0) -> server.Settings:
    return server.Settings(
        trust_domain=TD,
        issuer_dir=trust,
        anchors_file=trust / "ca-bundle.crt",
        address=f"127.0.0.1:{port}",
        admin_address="127.0.0.1:0",
    )


async def start_server(trust: pathlib.Path, port: int = 0) -> server.Running:
    running = await server.start(settings(trust, port))
    await asyncio.wait_for(running.synced.wait(), 20)
    return running


@pytest.fixture
async def policy_server(
    kubeconfig: pathlib.Path, trust: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[server.Running]:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    running = await start_server(trust)
    yield running
    await running.stop()


def stream_source(
    port: int,
    trust: pathlib.Path,
    namespace: str,
    credentials: Callable[[], KeyAndChain | None],
    on_update: Callable[[decision.Policy], None] | None = None,
) -> policy_stream.StreamSource:
    return policy_stream.StreamSource(
        f"127.0.0.1:{port}",
        "localhost",
        namespace,
        (trust / "ca-bundle.crt").read_bytes(),
        credentials,
        on_update=on_update,
    )


@contextlib.asynccontextmanager
async def following(source: policy_stream.StreamSource) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(source.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def eventually(what: str, check: Callable[[], object], timeout: float = 10.0) -> float:
    """Seconds until ``check()`` is truthy; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def watch_once(
    port: int, anchors: bytes, namespace: str, credentials: KeyAndChain | None
) -> policy_pb2.PolicyUpdate:
    """The first update of a Watch, made by hand; raises the call's error."""
    key, chain = credentials or (None, None)
    creds = grpc.ssl_channel_credentials(anchors, key, chain)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        call = policy_pb2_grpc.PolicyStub(channel).Watch(
            policy_pb2.WatchRequest(namespace=namespace), timeout=10
        )
        async for update in call:
            return update
    raise AssertionError("the stream ended without an update")


async def metric(admin_port: int, sample: str) -> float:
    """One sample from the server's /metrics, as Prometheus scrapes it."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin_port}/metrics") as response,
    ):
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {sample} in /metrics:\n{text}")


async def metric_becomes(admin_port: int, sample: str, value: float, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (found := await metric(admin_port, sample)) != value:
        if loop.time() > deadline:
            raise AssertionError(f"{sample} is {found}, not {value}, after {timeout} s")
        await asyncio.sleep(0.02)


# -- the tests -------------------------------------------------------------------------------


async def test_the_document_arrives_and_an_update_within_a_second(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    first = document(namespace, DefaultPolicy.ALL_UNAUTHENTICATED)
    put_policy(core, namespace, first.to_json())
    seen: list[decision.Policy] = []
    credentials = workload_certificate(trust, namespace)
    source = stream_source(policy_server.port, trust, namespace, lambda: credentials, seen.append)
    async with following(source):
        await eventually("the first document", lambda: source.current() is not None)
        assert source.document is not None and source.document.hash == first.sealed().hash
        assert allows(source) is True
        second = document(namespace, DefaultPolicy.DENY)
        put_policy(core, namespace, second.to_json())
        took = await eventually("the update", lambda: allows(source) is False)
        assert took < 1.0, f"the update took {took:.2f} s"
        assert source.document is not None and source.document.hash == second.sealed().hash
    assert source.updates == 2 and source.refused == 0
    assert [p.document.hash for p in seen] == [first.sealed().hash, second.sealed().hash]


async def test_a_large_document_arrives_whole(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    credentials = workload_certificate(trust, namespace)
    source = stream_source(policy_server.port, trust, namespace, lambda: credentials)
    large = document(namespace, DefaultPolicy.DENY, pods=5000)
    text = large.to_json()
    # well over the 128 KiB a line-reading watch client takes, under a ConfigMap's 1 MiB
    assert 3 * 128 * 1024 < len(text) < 1_000_000
    async with following(source):
        await eventually("the connection", lambda: source.connected)
        put_policy(core, namespace, text)  # seen through the watch, not the first list
        await eventually("the large document", lambda: source.document is not None)
    assert source.document is not None and len(source.document.pods) == 5000


async def test_the_document_is_sent_byte_for_byte_and_only_to_its_namespace(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    text = document(namespace, DefaultPolicy.DENY).to_json()
    put_policy(core, namespace, text)
    anchors = (trust / "ca-bundle.crt").read_bytes()
    credentials = workload_certificate(trust, namespace)
    update = await watch_once(policy_server.port, anchors, namespace, credentials)
    assert update.document == text.encode()
    assert update.hash == compiled.PolicyDocument.from_json(text).hash

    other = workload_certificate(trust, "t-someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_once(policy_server.port, anchors, namespace, other)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allows watching namespace 't-someone-else' only" in str(refused.value.details())
    denied = 'policy_watches_refused_total{code="permission_denied"}'
    assert await metric(policy_server.admin_port, denied) == 1


async def test_a_proxy_asking_for_another_namespace_gets_nothing_and_says_why(
    policy_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    other = workload_certificate(trust, "t-someone-else")
    source = stream_source(policy_server.port, trust, namespace, lambda: other)
    async with following(source):
        await asyncio.sleep(1.5)
        assert source.current() is None and not source.connected
    (warning,) = [
        r.getMessage()
        for r in caplog.records
        if r.name == policy_stream.__name__ and r.levelno == logging.WARNING
    ]
    assert "PERMISSION_DENIED" in warning and "no policy (all inbound denied)" in warning


async def test_a_certificate_of_another_trust_domain_is_permission_denied(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    anchors = (trust / "ca-bundle.crt").read_bytes()
    foreign = workload_certificate(trust, namespace, trust_domain="other.example")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_once(policy_server.port, anchors, namespace, foreign)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "trust domain 'other.example'" in str(refused.value.details())


async def test_a_certificate_without_a_spiffe_id_is_unauthenticated(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    anchors = (trust / "ca-bundle.crt").read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_once(
            policy_server.port, anchors, namespace, certificate_without_spiffe_id(trust)
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no SPIFFE ID" in str(refused.value.details())


async def test_a_client_without_a_certificate_can_not_connect(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    anchors = (trust / "ca-bundle.crt").read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_once(policy_server.port, anchors, namespace, None)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed

    source = stream_source(policy_server.port, trust, namespace, lambda: None)
    async with following(source):
        await asyncio.sleep(1.5)
        assert source.current() is None and not source.connected
    assert await metric(policy_server.admin_port, "policy_updates_sent_total") == 0


async def test_a_certificate_from_a_foreign_ca_is_refused(
    policy_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    foreign = workload_certificate(init_trust(tmp_path / "foreign"), namespace)
    anchors = (trust / "ca-bundle.crt").read_bytes()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await watch_once(policy_server.port, anchors, namespace, foreign)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    source = stream_source(policy_server.port, trust, namespace, lambda: foreign)
    async with following(source):
        await asyncio.sleep(1.5)
        assert source.current() is None and not source.connected
    assert await metric(policy_server.admin_port, "policy_updates_sent_total") == 0


async def test_no_document_means_no_policy_until_one_appears(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    credentials = workload_certificate(trust, namespace)
    source = stream_source(policy_server.port, trust, namespace, lambda: credentials)
    async with following(source):
        await eventually("the connection", lambda: source.connected)
        await asyncio.sleep(1.0)
        assert source.current() is None and source.document is None and source.updates == 0
        put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
        took = await eventually("the first document", lambda: source.current() is not None)
        assert took < 1.0
    assert allows(source) is False


async def test_a_broken_document_is_refused_and_the_last_valid_one_stays(
    policy_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    valid = document(namespace, DefaultPolicy.ALL_UNAUTHENTICATED)
    put_policy(core, namespace, valid.to_json())
    credentials = workload_certificate(trust, namespace)
    source = stream_source(policy_server.port, trust, namespace, lambda: credentials)
    denying = document(namespace, DefaultPolicy.DENY).to_json()
    tampered = denying.replace('"deny"', '"all-unauthenticated"')
    foreign = document("t-someone-else", DefaultPolicy.DENY).to_json()
    async with following(source):
        await eventually("the valid document", lambda: source.current() is not None)
        for count, broken in enumerate(("{", tampered, foreign), 1):
            put_policy(core, namespace, broken)
            await metric_becomes(policy_server.admin_port, "policy_documents_refused_total", count)
        await asyncio.sleep(0.3)
        assert source.document is not None and source.document.hash == valid.sealed().hash
        assert allows(source) is True and source.updates == 1
        # a watcher that connects now still gets the last valid document
        anchors = (trust / "ca-bundle.crt").read_bytes()
        update = await watch_once(policy_server.port, anchors, namespace, credentials)
        assert update.hash == valid.sealed().hash
        fixed = document(namespace, DefaultPolicy.DENY)
        put_policy(core, namespace, fixed.to_json())
        await eventually("the next valid document", lambda: allows(source) is False, 2.0)
    assert source.refused == 0  # the server never sent the broken ones
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("hash does not match" in m for m in messages)
    assert any("is for namespace 't-someone-else'" in m for m in messages)


async def test_the_proxy_keeps_its_policy_while_the_server_is_down_and_catches_up(
    kubeconfig: pathlib.Path,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="meshward")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    first = document(namespace, DefaultPolicy.ALL_UNAUTHENTICATED)
    put_policy(core, namespace, first.to_json())
    credentials = workload_certificate(trust, namespace)
    running = await start_server(trust)
    port = running.port
    source = stream_source(port, trust, namespace, lambda: credentials)
    try:
        async with following(source):
            await eventually("the first document", lambda: allows(source) is True)
            loop = asyncio.get_running_loop()
            stopping = loop.time()
            await running.stop()
            assert loop.time() - stopping < 1.0, "open Watches held up the shutdown"
            await eventually("the disconnect", lambda: not source.connected)
            put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
            await asyncio.sleep(3)  # several reconnect attempts
            assert allows(source) is True, "the last policy must stay while the server is down"
            running = await start_server(trust, port)
            await eventually("the catch-up", lambda: allows(source) is False, 10.0)
    finally:
        await running.stop()
    lost = [
        r
        for r in caplog.records
        if r.name == policy_stream.__name__ and r.levelno == logging.WARNING
    ]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    assert "keeping policy sha256:" in lost[0].getMessage()
    assert any("restored" in r.getMessage() for r in caplog.records)


async def test_the_server_serves_through_an_api_server_outage_and_catches_up(
    trust: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A control plane of its own, whose kube-apiserver is restarted under the policy server.
    Policy keeps being served; destination lookups are refused, and the server is not ready,
    once the outage outlasts what the server's picture of the cluster may be trusted for."""
    cluster = devcluster.up(tmp_path / "cp", controller_manager=False)
    restarted: subprocess.Popen[bytes] | None = None
    api = kubernetes_config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="apps")))
        put_policy(core, "apps", document("apps", DefaultPolicy.ALL_UNAUTHENTICATED).to_json())
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
        running = await server.start(dataclasses.replace(settings(trust), lookups_stale_after=2))
        await asyncio.wait_for(running.synced.wait(), 20)
        try:
            credentials = workload_certificate(trust, "apps")
            source = stream_source(running.port, trust, "apps", lambda: credentials)
            reply = await lookup(running.port, trust, credentials, "10.0.0.1", 80)
            assert not reply.meshed
            assert await readiness(running, trust, credentials) == (200, "SERVING")
            async with following(source):
                await eventually("the first document", lambda: allows(source) is True)
                pid = cluster.pids["kube-apiserver"]
                argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
                os.kill(pid, signal.SIGKILL)  # it crashes
                await eventually("the API server to exit", lambda: os.waitpid(pid, os.WNOHANG)[0])
                await eventually(
                    "the policy server to notice",
                    lambda: "can not follow" in caplog.text,
                    timeout=20,
                )
                await eventually("the server not to be ready", lambda: not running.synced.is_set())
                assert await readiness(running, trust, credentials) == (503, "NOT_SERVING")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await lookup(running.port, trust, credentials, "10.0.0.1", 80)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "has not heard from the API server about Pods" in str(
                    refused.value.details()
                )
                assert "not ready: the policy server has not heard" in caplog.text
                # a proxy that starts during the outage still gets the last document
                late = stream_source(running.port, trust, "apps", lambda: credentials)
                async with following(late):
                    await eventually("the late proxy's policy", lambda: allows(late) is True)
                with (tmp_path / "cp" / "kube-apiserver.log").open("ab") as log:
                    restarted = subprocess.Popen(
                        argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                await eventually("the API server to be back", cluster.ready, timeout=60)
                put_policy(core, "apps", document("apps", DefaultPolicy.DENY).to_json())
                await eventually("the change", lambda: allows(source) is False, timeout=20)
                await eventually("ready again", running.synced.is_set, timeout=20)
            assert await readiness(running, trust, credentials) == (200, "SERVING")
            reply = await lookup(running.port, trust, credentials, "10.0.0.1", 80)
            assert not reply.meshed
            assert await metric(running.admin_port, "policy_source_errors_total") >= 1
            assert await metric(running.admin_port, "policy_ready") == 1
        finally:
            await running.stop()
    finally:
        api.close()
        if restarted is not None:
            restarted.terminate()
            restarted.wait(timeout=30)
        devcluster.down(tmp_path / "cp")


async def readiness(
    running: server.Running, trust: pathlib.Path, credentials: KeyAndChain
) -> tuple[int, str]:
    """The HTTP status of /ready and the gRPC health of the Policy service, as probes and
    load balancers see them."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{running.admin_port}/ready") as response,
    ):
        http = response.status
    key, chain = credentials
    creds = grpc.ssl_channel_credentials((trust / "ca-bundle.crt").read_bytes(), key, chain)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{running.port}", creds, options) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=server.SERVICE), timeout=10
        )
    return http, health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)


async def test_a_renewed_certificate_reopens_the_stream_and_an_expired_one_ends_it(
    policy_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.ALL_UNAUTHENTICATED).to_json())
    short = datetime.timedelta(seconds=3)
    renewing = {"now": workload_certificate(trust, namespace, lifetime=short)}
    stuck = workload_certificate(trust, namespace, "stuck", lifetime=short)
    renewed_source = stream_source(policy_server.port, trust, namespace, lambda: renewing["now"])
    stuck_source = stream_source(policy_server.port, trust, namespace, lambda: stuck)
    async with following(renewed_source), following(stuck_source):
        await eventually(
            "both streams", lambda: renewed_source.connected and stuck_source.connected
        )
        renewing["now"] = workload_certificate(trust, namespace)  # valid for an hour
        await asyncio.sleep(4)  # past the short certificates' expiry
        assert not stuck_source.connected, "a stream must not outlive its certificate"
        put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
        took = await eventually("the renewed stream's update", lambda: not allows(renewed_source))
        assert took < 1.0
        assert allows(stuck_source) is True, "the expired proxy keeps its last policy"
    await metric_becomes(policy_server.admin_port, "policy_watchers", 0)
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == policy_stream.__name__ and r.levelno == logging.WARNING
    ]
    assert len(warnings) == 1 and "expired" in warnings[0], warnings  # only the stuck one


async def test_a_proxy_refuses_what_a_rogue_server_sends(
    trust: pathlib.Path, namespace: str
) -> None:
    """Defence in depth: a server with a valid serving certificate (say, a compromised policy
    server) that sends tampered or foreign documents does not change the proxy's policy."""
    valid = document(namespace, DefaultPolicy.ALL_UNAUTHENTICATED)
    good = valid.to_json().encode()
    sends = [
        policy_pb2.PolicyUpdate(document=good, hash=valid.sealed().hash),
        policy_pb2.PolicyUpdate(document=good, hash="sha256:" + "0" * 64),
        policy_pb2.PolicyUpdate(
            document=good.replace(b'"all-unauthenticated"', b'"deny"'), hash=valid.sealed().hash
        ),
        policy_pb2.PolicyUpdate(
            document=document("t-someone-else", DefaultPolicy.DENY).to_json().encode(),
            hash=document("t-someone-else", DefaultPolicy.DENY).sealed().hash,
        ),
    ]

    class Rogue(policy_pb2_grpc.PolicyServicer):
        async def Watch(
            self, request: policy_pb2.WatchRequest, context: grpc.aio.ServicerContext
        ) -> None:
            for update in sends:
                await context.write(update)
            await asyncio.Event().wait()

    issuer = issuer_of(trust)
    cert, key = pki.new_server_certificate(issuer, ["localhost"], datetime.timedelta(hours=1))
    rogue = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServicer_to_server(Rogue(), rogue)
    port = rogue.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials([(pki.key_to_pem(key), pki.to_pem(cert, issuer.certificate))]),
    )
    await rogue.start()
    try:
        credentials = workload_certificate(trust, namespace)
        source = stream_source(port, trust, namespace, lambda: credentials)
        async with following(source):
            await eventually("the three refusals", lambda: source.refused == 3)
            assert source.updates == 1 and allows(source) is True
    finally:
        await rogue.stop(0)


async def test_a_proxy_watches_with_the_certificate_of_the_identity_service(
    policy_server: server.Running,
    kubeconfig: pathlib.Path,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    svc = IdentityService(kubeconfig, trust, tmp_path / "identity.log")
    svc.start()
    try:
        config = proxy_settings(
            tmp_path, svc, token_for(core, namespace, "web"), name("web", namespace)
        )
        workload = identity.WorkloadIdentity(config)

        def credentials() -> KeyAndChain | None:
            held = workload.current
            return None if held is None else (pki.key_to_pem(workload.key), held.chain_pem())

        source = stream_source(policy_server.port, trust, namespace, credentials)
        async with following(source):
            await asyncio.sleep(0.5)
            assert source.current() is None  # no certificate yet: waiting, not connected
            async with renewing(workload):
                await eventually("the policy", lambda: source.current() is not None, 20)
    finally:
        svc.stop()
    assert allows(source) is False


# -- the command -----------------------------------------------------------------------------


@pytest.fixture
def served(
    kubeconfig: pathlib.Path, trust: pathlib.Path, tmp_path: pathlib.Path, control_plane: str
) -> Iterator[tuple[int, int]]:
    """``meshward policy serve`` in its own process, as a pod runs it: (port, admin port).
    It runs in namespace ``control_plane`` as pod meshward-policy-7 (MESHWARD_NAMESPACE and
    POD_NAME, as the Deployment sets them)."""
    port, admin = kubetest.free_port(), kubetest.free_port()
    log = tmp_path / "policy.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "policy",
                "serve",
                "--verbose",
                "--issuer-dir",
                str(trust),
                "--trust-anchors",
                str(trust / "ca-bundle.crt"),
                "--addr",
                f"127.0.0.1:{port}",
                "--admin-addr",
                f"127.0.0.1:{admin}",
            ],
            env={
                **os.environ,
                "KUBECONFIG": str(kubeconfig),
                "MESHWARD_NAMESPACE": control_plane,
                "POD_NAME": "meshward-policy-7",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        kubetest.wait_for("the policy server to be ready", ready, 30)
        yield port, admin
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_meshward_policy_serve(
    served: tuple[int, int],
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    port, admin = served
    put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
    credentials = workload_certificate(trust, namespace)
    key, chain = credentials
    anchors = (trust / "ca-bundle.crt").read_bytes()
    creds = grpc.ssl_channel_credentials(anchors, key, chain)
    # the default serving certificate names the server's mesh identity
    options = [("grpc.ssl_target_name_override", server.own_identity(TD).dns_name)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        status = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=server.SERVICE), timeout=10
        )
        await policy_pb2_grpc.PolicyStub(channel).Report(report_request(namespace), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    await eventually("the report", lambda: published(core, control_plane, namespace))
    configmap = published(core, control_plane, namespace)
    assert configmap is not None and list(configmap.data) == ["meshward-policy-7.json"]
    source = stream_source(port, trust, namespace, lambda: credentials)
    async with following(source):
        await eventually("the policy", lambda: source.current() is not None)
        assert await metric(admin, "policy_watchers") == 1
        assert await metric(admin, "policy_updates_sent_total") >= 1


def test_policy_serve_refuses_to_start_without_configmap_rbac(
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    trust: pathlib.Path,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    limited = kubetest.powerless_kubeconfig(kubeconfig, core, namespace, tmp_path / "kubeconfig")
    proc = meshward(
        "policy",
        "serve",
        "--issuer-dir",
        str(trust),
        "--trust-anchors",
        str(trust / "ca-bundle.crt"),
        "--addr",
        "127.0.0.1:0",
        env={"KUBECONFIG": str(limited)},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("meshward: error: the policy server may not list or watch configmaps")
    assert "list or watch pods, list or watch services, list or watch endpointslices." in last
    assert "verbs: [list, watch], resourceNames: [meshward-policy]" in last
    assert "resources: [pods, services], verbs: [list, watch]" in last
    assert "{apiGroups: [discovery.k8s.io], resources: [endpointslices]" in last


# -- proxy reports (issue 6) -----------------------------------------------------------------

BUNDLE = "sha256:" + "b" * 64
ISSUER = "sha256:" + "1" * 64
INSTANCE = "policy-0"


@pytest.fixture
def control_plane(core: client.CoreV1Api) -> Iterator[str]:
    """The policy server's own namespace, where it publishes the reports."""
    own = f"t-cp-{uuid.uuid4().hex[:8]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=own)))
    yield own
    core.delete_namespace(own)


@pytest.fixture
async def reporting_server(
    kubeconfig: pathlib.Path,
    trust: pathlib.Path,
    control_plane: str,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[server.Running]:
    """A policy server that forgets a pod after 3 s without a report."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    running = await server.start(
        dataclasses.replace(
            settings(trust), namespace=control_plane, instance=INSTANCE, report_expiry=3.0
        )
    )
    await asyncio.wait_for(running.synced.wait(), 20)
    yield running
    await running.stop()


def report_request(namespace: str, **fields: object) -> policy_pb2.ProxyReport:
    values: dict[str, object] = {
        "namespace": namespace,
        "pod": "web-0",
        "trust_bundle_fingerprint": BUNDLE,
        "leaf_issuer_fingerprint": ISSUER,
        "leaf_not_after_unix": 1_900_000_000,
        "proxy_version": "0.1.0",
    }
    values.update(fields)
    return policy_pb2.ProxyReport(**values)  # type: ignore[arg-type]


async def send_report(
    port: int, trust: pathlib.Path, credentials: KeyAndChain, request: policy_pb2.ProxyReport
) -> None:
    """One Report call as a proxy makes it; raises the call's error."""
    key, chain = credentials
    creds = grpc.ssl_channel_credentials((trust / "ca-bundle.crt").read_bytes(), key, chain)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        await policy_pb2_grpc.PolicyStub(channel).Report(request, timeout=10)


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


def published_proxies(
    core: client.CoreV1Api, control_plane: str, namespace: str
) -> dict[str, proxyreports.Proxy]:
    configmap = published(core, control_plane, namespace)
    if configmap is None:
        return {}
    collected = proxyreports.collect(configmap.data)
    assert collected.unreadable == ()
    return dict(collected.proxies)


async def test_a_report_is_published_for_the_operator(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    credentials = workload_certificate(trust, namespace)
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    await send_report(reporting_server.port, trust, credentials, report_request(namespace))
    took = await eventually(
        "the ConfigMap", lambda: published(core, control_plane, namespace) is not None
    )
    assert took < 2.0
    configmap = published(core, control_plane, namespace)
    assert configmap is not None
    assert configmap.metadata.labels == {"meshward.io/proxy-reports": "true"}
    assert configmap.metadata.annotations == {"meshward.io/namespace": namespace}
    assert list(configmap.data) == ["policy-0.json"]
    key = proxyreports.parse(configmap.data["policy-0.json"])
    assert key.reported_by == INSTANCE and key.updated_at >= before
    (proxy,) = key.proxies
    assert proxy.pod == "web-0"
    assert proxy.identity == f"spiffe://{TD}/ns/{namespace}/sa/web"
    assert (proxy.trust_bundle, proxy.leaf_issuer) == (BUNDLE, ISSUER)
    assert proxy.leaf_not_after == datetime.datetime.fromtimestamp(1_900_000_000, datetime.UTC)
    assert proxy.proxy_version == "0.1.0"
    assert proxy.reported_at >= before
    assert proxy.live(datetime.datetime.now(datetime.UTC))
    assert '"reportedAt":"20' in configmap.data["policy-0.json"]  # RFC 3339 text, not a number
    port = reporting_server.admin_port
    assert await metric(port, 'policy_reports_received_total{result="ok"}') == 1
    assert await metric(port, f'policy_proxies_reporting{{namespace="{namespace}"}}') == 1


async def test_a_report_for_another_namespace_is_permission_denied(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    other = workload_certificate(trust, "t-someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_report(reporting_server.port, trust, other, report_request(namespace))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "allows reporting for namespace 't-someone-else' only, not " in str(
        refused.value.details()
    )
    foreign = workload_certificate(trust, namespace, trust_domain="other.example")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_report(reporting_server.port, trust, foreign, report_request(namespace))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "trust domain 'other.example'" in str(refused.value.details())
    no_workload = certificate_without_spiffe_id(trust)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_report(reporting_server.port, trust, no_workload, report_request(namespace))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await asyncio.sleep(1.5)  # past the debounce: nothing was published
    assert published(core, control_plane, namespace) is None
    port = reporting_server.admin_port
    assert await metric(port, 'policy_reports_received_total{result="permission_denied"}') == 2
    assert await metric(port, 'policy_reports_received_total{result="unauthenticated"}') == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"pod": "Web_0"}, "pod 'Web_0' is not a DNS-1123 subdomain"),
        ({"pod": ""}, "pod '' is not a DNS-1123 subdomain"),
        ({"pod": "a" * 254}, "is not a DNS-1123 subdomain"),
        ({"trust_bundle_fingerprint": "sha256:XYZ"}, "trust_bundle_fingerprint 'sha256:XYZ'"),
        ({"trust_bundle_fingerprint": BUNDLE + "\n"}, "trust_bundle_fingerprint"),
        ({"trust_bundle_fingerprint": ""}, "trust_bundle_fingerprint ''"),
        ({"leaf_issuer_fingerprint": "md5:" + "1" * 32}, "leaf_issuer_fingerprint 'md5:"),
        ({"leaf_issuer_fingerprint": ISSUER.upper()}, "leaf_issuer_fingerprint 'SHA256:"),
        ({"leaf_not_after_unix": 0}, "leaf_not_after_unix 0 is not a time"),
        ({"leaf_not_after_unix": 10**12}, "leaf_not_after_unix 1000000000000"),
        ({"proxy_version": ""}, "proxy_version '' is not"),
        ({"proxy_version": "1.0 beta"}, "proxy_version '1.0 beta' is not"),
    ],
)
async def test_a_malformed_report_is_invalid_argument(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
    fields: dict[str, object],
    named: str,
) -> None:
    credentials = workload_certificate(trust, namespace)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await send_report(
            reporting_server.port, trust, credentials, report_request(namespace, **fields)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(refused.value.details())
    assert details.startswith("the report is malformed: ") and named in details, details
    assert ": send " in details  # and what to send instead
    port = reporting_server.admin_port
    assert await metric(port, 'policy_reports_received_total{result="invalid_argument"}') == 1
    await asyncio.sleep(1.2)
    assert published(core, control_plane, namespace) is None


async def test_an_empty_leaf_issuer_means_an_anchor_signed_the_leaf(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    credentials = workload_certificate(trust, namespace)
    request = report_request(namespace, leaf_issuer_fingerprint="")
    await send_report(reporting_server.port, trust, credentials, request)
    await eventually("the report", lambda: published_proxies(core, control_plane, namespace))
    assert published_proxies(core, control_plane, namespace)["web-0"].leaf_issuer is None


async def test_a_pod_that_stops_reporting_is_dropped_after_the_expiry(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    web = workload_certificate(trust, namespace)
    port = reporting_server.port
    await send_report(port, trust, web, report_request(namespace, pod="web-0"))
    await send_report(port, trust, web, report_request(namespace, pod="web-1"))
    await eventually(
        "both pods",
        lambda: set(published_proxies(core, control_plane, namespace)) == {"web-0", "web-1"},
    )
    # web-1 keeps reporting; web-0 stopped: it goes after the 3-s expiry, web-1 stays
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 3.5:
        await send_report(port, trust, web, report_request(namespace, pod="web-1"))
        await asyncio.sleep(0.5)
    await eventually(
        "web-0 to be dropped",
        lambda: set(published_proxies(core, control_plane, namespace)) == {"web-1"},
        timeout=3.0,
    )
    admin = reporting_server.admin_port
    assert await metric(admin, f'policy_proxies_reporting{{namespace="{namespace}"}}') == 1
    # the last pod goes too, and with it the ConfigMap
    await eventually(
        "the ConfigMap to be deleted",
        lambda: published(core, control_plane, namespace) is None,
        timeout=6.0,
    )
    assert reporting_server.reports.proxies(namespace) == ()


async def test_heartbeats_refresh_the_published_times_with_few_writes(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(publisher, "REFRESH", 1.5)  # 30 s in production
    web = workload_certificate(trust, namespace)
    port, admin = reporting_server.port, reporting_server.admin_port
    await send_report(port, trust, web, report_request(namespace))
    await eventually("the report", lambda: published_proxies(core, control_plane, namespace))
    first = published_proxies(core, control_plane, namespace)["web-0"].reported_at
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    while loop.time() - start < 4.0:  # a heartbeat every 0.1 s
        await send_report(port, trust, web, report_request(namespace))
        sent += 1
        await asyncio.sleep(0.1)
    later = published_proxies(core, control_plane, namespace)["web-0"].reported_at
    assert later - first >= datetime.timedelta(seconds=2), (first, later)
    writes = await metric(admin, 'policy_report_writes_total{result="ok"}')
    assert sent >= 20 and 2 <= writes <= 5, (sent, writes)
    # a changed bundle is published at once, not at the next refresh
    await send_report(port, trust, web, report_request(namespace, trust_bundle_fingerprint=ISSUER))
    took = await eventually(
        "the new bundle",
        lambda: published_proxies(core, control_plane, namespace)["web-0"].trust_bundle == ISSUER,
    )
    assert took < 1.5


async def test_other_replicas_keys_are_kept_and_long_silent_ones_removed(
    reporting_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    control_plane: str,
) -> None:
    now = datetime.datetime.now(datetime.UTC)

    def replica(name: str, updated: datetime.datetime, pod: str) -> str:
        entry = proxyreports.Proxy(
            pod=pod,
            identity=f"spiffe://{TD}/ns/{namespace}/sa/web",
            trust_bundle=BUNDLE,
            leaf_issuer=None,
            leaf_not_after=now + datetime.timedelta(hours=1),
            proxy_version="0.1.0",
            reported_at=updated,
        )
        return proxyreports.publish(name, [entry], updated).to_json()

    core.create_namespaced_config_map(
        control_plane,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=proxyreports.configmap_name(namespace),
                labels={proxyreports.LABEL: "true"},
                annotations={proxyreports.NAMESPACE_ANNOTATION: namespace},
            ),
            data={
                "policy-1.json": replica("policy-1", now, "web-1"),
                "policy-2.json": replica("policy-2", now - datetime.timedelta(hours=1), "web-2"),
                "notes": "not a replica's key: left alone",
            },
        ),
    )
    web = workload_certificate(trust, namespace)
    await send_report(reporting_server.port, trust, web, report_request(namespace))

    def keys() -> set[str]:
        configmap = published(core, control_plane, namespace)
        return set(configmap.data) if configmap is not None else set()

    await eventually("our key", lambda: "policy-0.json" in keys())
    assert keys() == {"policy-0.json", "policy-1.json", "notes"}  # policy-2 long gone
    merged = proxyreports.collect(published(core, control_plane, namespace).data)  # type: ignore[union-attr]
    assert set(merged.live(datetime.datetime.now(datetime.UTC))) == {"web-0", "web-1"}
    # when our pod expires, only our key goes: the ConfigMap stays for the others
    await eventually("our key to go", lambda: "policy-0.json" not in keys(), timeout=8.0)
    assert keys() == {"policy-1.json", "notes"}


async def test_the_server_starts_without_rights_to_publish_and_says_so(
    kubeconfig: pathlib.Path,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Serving policy matters more than reports: a missing namespace (or Role) is an error in
    the log and a failed write in the metrics, not a server that refuses to start."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    missing = f"t-missing-{uuid.uuid4().hex[:6]}"
    running = await server.start(dataclasses.replace(settings(trust), namespace=missing))
    try:
        await asyncio.wait_for(running.synced.wait(), 20)
        put_policy(core, namespace, document(namespace, DefaultPolicy.DENY).to_json())
        credentials = workload_certificate(trust, namespace)
        await send_report(running.port, trust, credentials, report_request(namespace))
        failed = 'policy_report_writes_total{result="failed"}'
        for _ in range(50):  # the sample appears with the first failure
            with contextlib.suppress(AssertionError):
                if await metric(running.admin_port, failed) >= 1:
                    break
            await asyncio.sleep(0.1)
        assert await metric(running.admin_port, failed) >= 1
        source = stream_source(running.port, trust, namespace, lambda: credentials)
        async with following(source):
            await eventually("the policy", lambda: source.current() is not None)
    finally:
        await running.stop()
    (warning,) = [r.getMessage() for r in caplog.records if r.name == publisher.__name__]
    assert f"does namespace {missing} exist? Set --namespace (MESHWARD_NAMESPACE)" in warning


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"namespace": "Meshward"}, "namespace 'Meshward' is not a Kubernetes namespace name"),
        ({"instance": "policy/0"}, "replica name 'policy/0' can not name a ConfigMap key"),
    ],
)
async def test_the_server_refuses_names_it_can_not_publish_under(
    trust: pathlib.Path, change: dict[str, str], says: str
) -> None:
    with pytest.raises(errors.ConfigError) as refused:
        await server.start(dataclasses.replace(settings(trust), **change))  # type: ignore[arg-type]
    assert says in str(refused.value)


# -- destination lookups ---------------------------------------------------------------------


async def lookup(
    port: int, trust: pathlib.Path, credentials: KeyAndChain | None, address: str, to: int
) -> policy_pb2.LookupReply:
    """One Lookup as a proxy makes it; raises the call's error."""
    key, chain = credentials or (None, None)
    creds = grpc.ssl_channel_credentials((trust / "ca-bundle.crt").read_bytes(), key, chain)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options) as channel:
        reply: policy_pb2.LookupReply = await policy_pb2_grpc.PolicyStub(channel).Lookup(
            policy_pb2.LookupRequest(address=address, port=to), timeout=10
        )
    return reply


async def test_lookup_answers_a_meshed_pod_with_its_identity_and_an_unknown_ip_plain(
    policy_server: server.Running, trust: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    service_accounts(core, namespace, "web")
    web_ip, unknown_ip = free_ips(2)
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    # any workload of the mesh may ask, whatever its namespace
    caller = workload_certificate(trust, "t-someone-else", "client")
    port = policy_server.port
    replies: list[policy_pb2.LookupReply] = []

    async def meshed() -> bool:
        replies.append(await lookup(port, trust, caller, web_ip, 8080))
        return replies[-1].meshed

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not await meshed():
        assert loop.time() < deadline, "the pod was never answered as meshed"
        await asyncio.sleep(0.05)
    reply = replies[-1]
    assert list(reply.identities) == [f"spiffe://{TD}/ns/{namespace}/sa/web"]
    assert reply.ttl_ms == 5000
    skipped = await lookup(port, trust, caller, web_ip, 4191)  # the proxy's admin port
    assert not skipped.meshed and list(skipped.identities) == []
    plain = await lookup(port, trust, caller, unknown_ip, 8080)
    assert not plain.meshed and list(plain.identities) == [] and plain.ttl_ms == 5000
    admin = policy_server.admin_port
    assert await metric(admin, 'policy_lookups_total{result="meshed"}') == 1
    assert await metric(admin, 'policy_lookups_total{result="plain"}') == len(replies) - 1 + 2
    assert await metric(admin, 'policy_destinations{kind="pods"}') >= 1


@pytest.mark.parametrize(
    ("address", "to", "says"),
    [
        ("web.shop.svc.cluster.local", 80, "address 'web.shop.svc.cluster.local' is not an IP"),
        ("", 80, "address '' is not an IP literal"),
        ("10.0.0.1", 0, "port 0 is not a port number: send the destination port, 1 to 65535"),
        ("10.0.0.1", 70000, "port 70000 is not a port number"),
    ],
)
async def test_a_malformed_lookup_is_invalid_argument(
    policy_server: server.Running, trust: pathlib.Path, address: str, to: int, says: str
) -> None:
    credentials = workload_certificate(trust, "t-someone-else")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup(policy_server.port, trust, credentials, address, to)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in str(refused.value.details())
    admin = policy_server.admin_port
    assert await metric(admin, 'policy_lookups_total{result="invalid_argument"}') == 1


async def test_lookup_needs_a_mesh_certificate_of_this_trust_domain(
    policy_server: server.Running, trust: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    port = policy_server.port
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup(port, trust, None, "10.0.0.1", 80)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
    foreign_ca = workload_certificate(init_trust(tmp_path / "foreign"), "apps")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup(port, trust, foreign_ca, "10.0.0.1", 80)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup(port, trust, certificate_without_spiffe_id(trust), "10.0.0.1", 80)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no SPIFFE ID" in str(refused.value.details())
    other_domain = workload_certificate(trust, "apps", trust_domain="other.example")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await lookup(port, trust, other_domain, "10.0.0.1", 80)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "trust domain 'other.example'" in str(refused.value.details())
    admin = policy_server.admin_port
    assert await metric(admin, 'policy_lookups_total{result="unauthenticated"}') == 1
    assert await metric(admin, 'policy_lookups_total{result="permission_denied"}') == 1


async def test_lookup_is_unavailable_until_the_cluster_has_been_listed(
    trust: pathlib.Path,
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The real servicer over mutual TLS, with a source whose first lists have not been made:
    it must refuse to answer rather than say "plaintext" for a pod it does not know yet."""
    service_accounts(core, namespace, "web")
    (web_ip,) = free_ips(1)
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api = await kube.connect()
    counters = metrics.Metrics()
    source = destinations.Source(api, destinations.Index(TD), counters)
    servicer = server.PolicyServicer(
        documents.Documents(), counters, TD, reports.Reports(counters), source
    )
    issuer = issuer_of(trust)
    cert, key = pki.new_server_certificate(issuer, ["localhost"], datetime.timedelta(hours=1))
    credentials = grpc.ssl_server_credentials(
        [(pki.key_to_pem(key), pki.to_pem(cert, issuer.certificate))],
        root_certificates=(trust / "ca-bundle.crt").read_bytes(),
        require_client_auth=True,
    )
    grpc_server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServicer_to_server(servicer, grpc_server)  # type: ignore[no-untyped-call]
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    await grpc_server.start()
    task: asyncio.Task[None] | None = None
    try:
        caller = workload_certificate(trust, "apps")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await lookup(port, trust, caller, web_ip, 8080)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "has not yet listed the cluster's pods, services and endpointslices" in str(
            refused.value.details()
        )
        task = asyncio.get_running_loop().create_task(source.run())
        await asyncio.wait_for(source.synced.wait(), 20)
        reply = await lookup(port, trust, caller, web_ip, 8080)
        assert reply.meshed and list(reply.identities) == [f"spiffe://{TD}/ns/{namespace}/sa/web"]
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await grpc_server.stop(0)
        await api.close()
    assert (
        counters.registry.get_sample_value("policy_lookups_total", {"result": "unavailable"}) == 1
    )


async def test_a_lookup_the_index_can_not_settle_yet_is_unavailable_and_says_why(
    policy_server: server.Running,
    trust: pathlib.Path,
    core: client.CoreV1Api,
    api: client.ApiClient,
    namespace: str,
) -> None:
    """An endpoint naming a pod the server has not seen: "retry", never "plaintext"."""
    service_accounts(core, namespace, "web")
    (web_ip,) = free_ips(1)
    created = core.create_namespaced_service(
        namespace, {"metadata": {"name": "web"}, "spec": {"ports": [{"port": 80}]}}
    )
    body = endpoint_slice(
        "web-manual", "web", [(web_ip, True)], [("", 80)], namespace, pods={web_ip: "web-0"}
    )
    EndpointSlices(api, namespace).put(body)
    caller = workload_certificate(trust, "apps")
    port, address = policy_server.port, created.spec.cluster_ip

    async def refusal() -> grpc.aio.AioRpcError | None:
        try:
            await lookup(port, trust, caller, address, 80)
        except grpc.aio.AioRpcError as exc:
            return exc
        return None

    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while (refused := await refusal()) is None:
        assert loop.time() < deadline, "the lookup never said it can not tell yet"
        await asyncio.sleep(0.05)
    assert refused.code() == grpc.StatusCode.UNAVAILABLE
    assert str(refused.details()) == (
        f"the policy server can not tell yet whether {address} port 80 is meshed: "
        f"EndpointSlice {namespace}/web-manual lists pod {namespace}/web-0, which the server "
        "has not seen yet; retry shortly, and meanwhile do not guess"
    )
    create_pod(core, namespace, pod_spec("web-0", namespace), web_ip)
    deadline = loop.time() + 10
    while (refused := await refusal()) is not None:
        assert loop.time() < deadline, f"still refused once web-0 exists: {refused.details()}"
        await asyncio.sleep(0.05)
    reply = await lookup(port, trust, caller, address, 80)
    assert reply.meshed and list(reply.identities) == [f"spiffe://{TD}/ns/{namespace}/sa/web"]


def pod_with_status(name: str, namespace: str, ip: str) -> dict[str, object]:
    pod = pod_spec(name, namespace)
    pod["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    return pod


async def test_a_background_task_that_fails_is_logged_counted_and_started_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A task that dies of a bug must not leave the server answering from a frozen picture."""
    counters = metrics.Metrics()
    runs: list[int] = []
    restarted = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise KeyError("a bug")
        if len(runs) == 2:
            return  # ends without being asked to
        restarted.set()
        await asyncio.Event().wait()

    task = asyncio.get_running_loop().create_task(server.supervised("flaky", flaky, counters, 0.01))
    try:
        await asyncio.wait_for(restarted.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert counters.registry.get_sample_value("policy_task_failures_total", {"task": "flaky"}) == 2
    failed = [r for r in caplog.records if r.name == server.__name__]
    assert [r.levelno for r in failed] == [logging.ERROR, logging.ERROR]
    assert "the flaky task failed; starting it again" in failed[0].getMessage()
    assert failed[0].exc_info is not None and "a bug" in str(failed[0].exc_info[1])
    assert "the flaky task ended by itself; starting it again" in failed[1].getMessage()
