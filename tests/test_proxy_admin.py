"""The proxy's admin server: probes, metrics and /identity, answered as an HTTP client sees them."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import json
import pathlib
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from prometheus_client import parser

from meshward import trustbundle
from meshward.identity import pki
from meshward.proxy import admin, identity, metrics
from tests.test_proxy_tls import Mesh


def make(certified: identity.Certified | None) -> admin.Admin:
    return admin.Admin(metrics=metrics.Metrics(), certified=lambda: certified)


def test_not_ready_without_a_certificate() -> None:
    answers = make(None)
    assert answers.respond("GET", "/live").status == 200
    assert answers.respond("GET", "/ready").status == 503
    assert answers.respond("GET", "/identity").status == 503


def test_ready_and_the_identity_once_certified(tmp_path: pathlib.Path) -> None:
    certified = Mesh().workload(tmp_path / "web", "web")
    answers = make(certified)
    assert answers.respond("GET", "/ready").status == 200
    found = json.loads(answers.respond("GET", "/identity").body)
    assert found["spiffe_id"] == "spiffe://cluster.local/ns/apps/sa/web"
    assert found["identity"] == "web.apps.serviceaccount.identity.meshward.cluster.local"
    assert datetime.datetime.fromisoformat(found["not_after"]) == certified.not_after
    assert 0 < found["seconds_left"] <= 24 * 3600
    pem = answers.respond("GET", "/identity?format=pem")
    chain = x509.load_pem_x509_certificates(pem.body)
    assert chain[0] == certified.leaf and b"PRIVATE KEY" not in pem.body


def test_the_identity_names_the_issuer_and_the_trust_bundle(tmp_path: pathlib.Path) -> None:
    """What an anchor rotation waits on: which bundle the proxy trusts, which issuer signed it."""
    mesh, other = Mesh(), Mesh()
    certified = mesh.workload(tmp_path / "web", "web")
    bundle = trustbundle.load(mesh.anchors + other.anchors, "test")
    answers = admin.Admin(
        metrics=metrics.Metrics(), certified=lambda: certified, trust=lambda: bundle
    )
    found = json.loads(answers.respond("GET", "/identity").body)
    issuer = mesh.issuer.certificate
    assert found["issuer"] == {
        "subject": "CN=issuer.identity.meshward.cluster.local",
        "fingerprint": "sha256:" + issuer.fingerprint(hashes.SHA256()).hex(),
    }
    assert (
        datetime.datetime.fromisoformat(found["not_before"]) == certified.leaf.not_valid_before_utc
    )
    trust = found["trust_bundle"]
    assert trust["fingerprint"] == trustbundle.fingerprint(pki.load_certificates(bundle.pem))
    anchors = pki.load_certificates(bundle.pem)
    assert trust["anchors"] == [
        {
            "subject": "CN=root.identity.meshward.cluster.local",
            "not_after": cert.not_valid_after_utc.isoformat(),
            "fingerprint": "sha256:" + cert.fingerprint(hashes.SHA256()).hex(),
        }
        for cert in anchors
    ]


def test_an_expired_certificate_is_not_ready(tmp_path: pathlib.Path) -> None:
    certified = Mesh().workload(tmp_path / "web", "web")
    later = certified.not_after + datetime.timedelta(seconds=1)
    answers = admin.Admin(metrics=metrics.Metrics(), certified=lambda: certified, now=lambda: later)
    assert answers.respond("GET", "/ready").status == 503


def test_unknown_paths_and_methods() -> None:
    answers = make(None)
    missing = answers.respond("GET", "/debug")
    assert missing.status == 404 and b"/metrics" in missing.body
    assert answers.respond("POST", "/ready").status == 405
    assert answers.respond("HEAD", "/live").body == b""


async def test_over_a_real_socket(tmp_path: pathlib.Path) -> None:
    certified = Mesh().workload(tmp_path / "web", "web")
    proxy_metrics = metrics.Metrics()
    proxy_metrics.certificate_expiry(lambda: certified.not_after.timestamp())
    server = await admin.Admin(metrics=proxy_metrics, certified=lambda: certified).serve(
        "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]

    def get(path: str, raw: bytes | None = None) -> tuple[int, bytes]:
        if raw is not None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(raw)
                return 0, sock.recv(65536)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    try:
        status, body = await asyncio.to_thread(get, "/metrics")
        assert status == 200
        samples = {
            sample.name: sample.value
            for family in parser.text_string_to_metric_families(body.decode())
            for sample in family.samples
        }
        expiry = samples["identity_cert_expiration_timestamp_seconds"]
        assert expiry == certified.not_after.timestamp()
        status, body = await asyncio.to_thread(get, "/identity")
        assert status == 200 and json.loads(body)["spiffe_id"].endswith("/sa/web")
        _, garbage = await asyncio.to_thread(get, "", b"\x16\x03\x01 not http\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.1 400 ")
        _, huge = await asyncio.to_thread(get, "", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 400 ")
    finally:
        server.close()
        await server.wait_closed()


def test_shutdown_is_taken_from_loopback_only_and_by_post() -> None:
    asked: list[bool] = []
    answers = admin.Admin(
        metrics=metrics.Metrics(), certified=lambda: None, shutdown=lambda: asked.append(True)
    )
    assert answers.respond("GET", "/shutdown", from_loopback=True).status == 405
    refused = answers.respond("POST", "/shutdown", from_loopback=False)
    assert refused.status == 403 and b"loopback" in refused.body
    assert asked == []
    assert answers.respond("POST", "/shutdown", from_loopback=True).status == 200
    assert asked == [True]


def _routable_address() -> str | None:
    """An address of this host other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if address.startswith("127.") else address


async def test_shutdown_over_a_real_socket_from_loopback_and_from_another_address() -> None:
    asked: list[bool] = []
    served = admin.Admin(
        metrics=metrics.Metrics(), certified=lambda: None, shutdown=lambda: asked.append(True)
    )
    server = await served.serve("0.0.0.0", 0)
    port = server.sockets[0].getsockname()[1]

    def post(host: str) -> int:
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("POST", "/shutdown")
            return conn.getresponse().status
        finally:
            conn.close()

    try:
        other = _routable_address()
        if other is not None:
            assert await asyncio.to_thread(post, other) == 403
            assert asked == []
        assert await asyncio.to_thread(post, "127.0.0.1") == 200
        assert asked == [True]
    finally:
        server.close()
        await server.wait_closed()
