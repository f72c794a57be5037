"""The identity service against a real API server, with real TokenRequest tokens: what a proxy
sees when it calls Certify."""

from __future__ import annotations

import datetime
import os
import pathlib
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client

from meshward import devcluster, trustbundle
from meshward.identity import pki
from meshward.identity._proto import identity_pb2, identity_pb2_grpc
from tests import kubetest

pytestmark = pytest.mark.cluster

TD = "cluster.local"
AUDIENCE = "identity.meshward.io"


def meshward(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


class IdentityService:
    """``meshward identity serve`` in its own process, as a pod would run it."""

    def __init__(
        self,
        kubeconfig: pathlib.Path,
        trust: pathlib.Path,
        log: pathlib.Path,
        verbose: bool = True,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.kubeconfig, self.trust, self.log = kubeconfig, trust, log
        self.verbose, self.extra = verbose, extra
        self.port, self.admin_port = kubetest.free_port(), kubetest.free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshward",
                "identity",
                "serve",
                *(["--verbose"] if self.verbose else []),
                *self.extra,
                "--issuer-dir",
                str(self.trust),
                "--trust-anchors",
                str(self.trust / "ca-bundle.crt"),
                "--addr",
                f"127.0.0.1:{self.port}",
                "--admin-addr",
                f"127.0.0.1:{self.admin_port}",
            ],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        if wait:
            kubetest.wait_for(
                f"the identity service to be ready\n{self.log_tail()}", self.ready, 30
            )

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/ready"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.admin_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def channel(self) -> grpc.Channel:
        anchors = (self.trust / "ca-bundle.crt").read_bytes()
        return grpc.secure_channel(
            f"localhost:{self.port}", grpc.ssl_channel_credentials(root_certificates=anchors)
        )

    def certify(
        self, identity: str, token: str | bytes, csr: bytes
    ) -> identity_pb2.CertifyResponse:
        with self.channel() as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            return stub.Certify(
                identity_pb2.CertifyRequest(
                    identity=identity,
                    token=token.encode() if isinstance(token, str) else token,
                    certificate_signing_request=csr,
                ),
                timeout=30,
            )


def init_trust(directory: pathlib.Path, *extra: str) -> pathlib.Path:
    proc = meshward("identity", "init", "--out", str(directory), *extra)
    assert proc.returncode == 0, proc.stderr
    return directory


@pytest.fixture(scope="module")
def trust(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return init_trust(tmp_path_factory.mktemp("trust"))


@pytest.fixture(scope="module")
def service(
    kubeconfig: pathlib.Path, trust: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IdentityService]:
    svc = IdentityService(kubeconfig, trust, tmp_path_factory.mktemp("identity") / "identity.log")
    svc.start()
    yield svc
    svc.stop()


def swap(directory: pathlib.Path, files: dict[str, bytes]) -> None:
    """Replace each file atomically, in order, as the kubelet swaps a mounted Secret."""
    for file, data in files.items():
        staged = directory / f".{file}.new"
        staged.write_bytes(data)
        staged.replace(directory / file)


def make_csr(
    key: ec.EllipticCurvePrivateKey | None = None, *, extensions: bool = False
) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    if extensions:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("evil.example"), x509.UniformResourceIdentifier("spiffe://evil/x")]
            ),
            critical=False,
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def token_for(core: client.CoreV1Api, namespace: str, sa: str, audience: str = AUDIENCE) -> str:
    try:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
        )
    except client.exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[audience], expiration_seconds=600)
    )
    return str(core.create_namespaced_service_account_token(sa, namespace, request).status.token)


def name(sa: str, ns: str) -> str:
    return f"{sa}.{ns}.serviceaccount.identity.meshward.{TD}"


def refused(call: object) -> grpc.RpcError:
    assert callable(call)
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_happy_path(service: IdentityService, core: client.CoreV1Api, namespace: str) -> None:
    token = token_for(core, namespace, "web")
    csr, key = make_csr()
    response = service.certify(name("web", namespace), token, csr)
    leaf = x509.load_der_x509_certificate(response.leaf_certificate)
    chain = [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates]
    anchors = pki.load_certificates((service.trust / "ca-bundle.crt").read_bytes())
    pki.verify_chain(leaf, chain, anchors)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/ns/{namespace}/sa/web"
    ]
    assert san.get_values_for_type(x509.DNSName) == [name("web", namespace)]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(hours=24) <= lifetime <= datetime.timedelta(hours=24, seconds=21)
    assert response.valid_until.ToDatetime(datetime.UTC) == leaf.not_valid_after_utc
    metrics = service.metrics()
    assert 'identity_cert_issued_total{result="ok"}' in metrics
    (anchor,) = anchors
    series = (
        "identity_trust_anchor_expiration_timestamp_seconds"
        f'{{fingerprint="{trustbundle.certificate_fingerprint(anchor)}"}} '
    )
    values = [line.removeprefix(series) for line in metrics.splitlines() if line.startswith(series)]
    assert [float(v) for v in values] == [anchor.not_valid_after_utc.timestamp()], metrics


def test_csr_extensions_are_ignored(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    csr, _ = make_csr(extensions=True)
    response = service.certify(name("web", namespace), token_for(core, namespace, "web"), csr)
    leaf = x509.load_der_x509_certificate(response.leaf_certificate)
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in san] in (
        [name("web", namespace), f"spiffe://{TD}/ns/{namespace}/sa/web"],
        [f"spiffe://{TD}/ns/{namespace}/sa/web", name("web", namespace)],
    )


def test_wrong_audience_is_unauthenticated(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    token = token_for(
        core, namespace, "web", audience="https://kubernetes.default.svc.cluster.local"
    )
    csr, _ = make_csr()
    err = refused(lambda: service.certify(name("web", namespace), token, csr))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "rejected the token" in (err.details() or "")


def test_token_of_another_service_account_is_permission_denied(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    token = token_for(core, namespace, "web")
    csr, _ = make_csr()
    err = refused(lambda: service.certify(name("admin", namespace), token, csr))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert f"{namespace}/web" in (err.details() or "")


def test_deleted_service_account_is_unauthenticated(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    token = token_for(core, namespace, "gone")
    core.delete_namespaced_service_account("gone", namespace)
    csr, _ = make_csr()
    err = refused(lambda: service.certify(name("gone", namespace), token, csr))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("case", ["garbage", "truncated", "oversize", "bad-signature", "empty"])
def test_bad_csrs_are_invalid_argument(
    service: IdentityService, core: client.CoreV1Api, namespace: str, case: str
) -> None:
    good, _ = make_csr()
    csr = {
        "garbage": b"not a certificate signing request",
        "truncated": good[: len(good) // 2],
        "oversize": good + b"\0" * (16 * 1024),
        "bad-signature": good[:-4] + bytes(b ^ 0xFF for b in good[-4:]),
        "empty": b"",
    }[case]
    token = token_for(core, namespace, "web")
    err = refused(lambda: service.certify(name("web", namespace), token, csr))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert (err.details() or "").strip()
    assert service.proc is not None and service.proc.poll() is None  # still serving


def test_malformed_identity_is_invalid_argument(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    csr, _ = make_csr()
    token = token_for(core, namespace, "web")
    for bad in ("web", f"web.{namespace}.serviceaccount.identity.meshward.other.domain", ""):
        err = refused(lambda bad=bad: service.certify(bad, token, csr))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    huge = "a" * 100_000
    err = refused(lambda: service.certify(huge, token, csr))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000 characters" in (err.details() or "") and huge not in (err.details() or "")
    assert huge not in service.log.read_text(errors="replace")


def test_health_service_answers(service: IdentityService) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with service.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshward.identity.v1.Identity"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_tokens_never_reach_the_logs(
    service: IdentityService, core: client.CoreV1Api, namespace: str
) -> None:
    token = token_for(core, namespace, "web")
    csr, _ = make_csr()
    refused(lambda: service.certify(name("other", namespace), token, csr))
    service.certify(name("web", namespace), token, csr)
    time.sleep(0.2)
    log = service.log.read_text(errors="replace")
    assert f"issued certificate for {name('web', namespace)}" in log
    assert token not in log and token[-40:] not in log


def test_issuer_rotated_on_disk_while_serving(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    trust = init_trust(tmp_path / "trust")
    svc = IdentityService(kubeconfig, trust, tmp_path / "identity.log")
    svc.start()
    try:
        token = token_for(core, namespace, "web")
        csr, _ = make_csr()
        before = x509.load_der_x509_certificate(
            svc.certify(name("web", namespace), token, csr).intermediate_certificates[0]
        )
        anchor = pki.load_certificates((trust / "ca-bundle.crt").read_bytes())[0]
        anchor_key = serialization.load_pem_private_key((trust / "anchor.key").read_bytes(), None)
        assert isinstance(anchor_key, ec.EllipticCurvePrivateKey)
        issuer, issuer_key = pki.new_issuer(anchor, anchor_key, TD, datetime.timedelta(days=30))
        swap(trust, {"tls.key": pki.key_to_pem(issuer_key), "tls.crt": pki.to_pem(issuer)})

        def new_issuer_signs() -> bool:
            got = svc.certify(name("web", namespace), token, csr).intermediate_certificates[0]
            return x509.load_der_x509_certificate(got) == issuer

        kubetest.wait_for("leaves from the new issuer", new_issuer_signs, timeout=15)
        assert before != issuer
        assert svc.proc is not None and svc.proc.poll() is None
    finally:
        svc.stop()


def test_refuses_to_start_with_an_issuer_from_another_anchor(
    kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    ours, theirs = init_trust(tmp_path / "ours"), init_trust(tmp_path / "theirs")
    (ours / "ca-bundle.crt").write_bytes((theirs / "ca-bundle.crt").read_bytes())
    proc = meshward(
        "identity",
        "serve",
        "--issuer-dir",
        str(ours),
        "--trust-anchors",
        str(ours / "ca-bundle.crt"),
        "--addr",
        "127.0.0.1:0",
        env={"KUBECONFIG": str(kubeconfig)},
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("meshward: error:") and "anchor" in line


def test_refuses_to_start_without_tokenreview_rbac(
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    trust: pathlib.Path,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    limited = kubetest.powerless_kubeconfig(kubeconfig, core, namespace, tmp_path / "kubeconfig")
    proc = meshward(
        "identity",
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
    assert "may not create TokenReviews" in last and "tokenreviews" in last


def test_api_server_outage_is_unavailable_then_recovers(tmp_path: pathlib.Path) -> None:
    cluster = devcluster.up(tmp_path / "cp", controller_manager=False)
    try:
        from kubernetes import config as kconfig

        api = kconfig.new_client_from_config(config_file=str(cluster.kubeconfig))
        core = client.CoreV1Api(api)
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="apps")))
        token = token_for(core, "apps", "web")
        svc = IdentityService(cluster.kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "log")
        svc.start()
        csr, _ = make_csr()
        try:
            svc.certify(name("web", "apps"), token, csr)
            os.kill(cluster.pids["kube-apiserver"], signal.SIGSTOP)
            try:
                err = refused(lambda: svc.certify(name("web", "apps"), token, csr))
                assert err.code() == grpc.StatusCode.UNAVAILABLE
                assert "API server" in (err.details() or "")
            finally:
                os.kill(cluster.pids["kube-apiserver"], signal.SIGCONT)
            kubetest.wait_for(
                "Certify to work again",
                lambda: svc.certify(name("web", "apps"), token, csr).leaf_certificate,
                timeout=30,
            )
            assert 'identity_cert_issued_total{result="unavailable"} 1.0' in svc.metrics()
        finally:
            svc.stop()
            api.close()
    finally:
        devcluster.down(tmp_path / "cp")


def test_init_into_the_cluster_and_refuse_to_overwrite(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str
) -> None:
    env = {"KUBECONFIG": str(kubeconfig)}
    first = meshward("identity", "init", "--namespace", namespace, env=env)
    assert first.returncode == 0, first.stderr
    issuer = core.read_namespaced_secret("meshward-identity-issuer", namespace)
    roots = core.read_namespaced_config_map("meshward-identity-trust-roots", namespace)
    assert issuer.type == "kubernetes.io/tls" and set(issuer.data) == {"tls.crt", "tls.key"}
    anchors = pki.load_certificates(roots.data["ca-bundle.crt"].encode())
    import base64

    material = pki.Issuer.from_pem(
        base64.b64decode(issuer.data["tls.crt"]), base64.b64decode(issuer.data["tls.key"])
    )
    material.check(anchors)
    again = meshward("identity", "init", "--namespace", namespace, env=env)
    assert again.returncode == 1
    assert "--force" in again.stderr and "meshward-identity-issuer" in again.stderr
    forced = meshward("identity", "init", "--namespace", namespace, "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    replaced = core.read_namespaced_config_map("meshward-identity-trust-roots", namespace)
    assert replaced.data["ca-bundle.crt"] != roots.data["ca-bundle.crt"]


def test_inspect_prints_the_chain_and_checks_it(
    service: IdentityService, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    csr, _ = make_csr()
    response = service.certify(name("web", namespace), token_for(core, namespace, "web"), csr)
    chain = [response.leaf_certificate, *response.intermediate_certificates]
    pem = b"".join(pki.to_pem(x509.load_der_x509_certificate(c)) for c in chain)
    (tmp_path / "chain.pem").write_bytes(pem)
    ok = meshward(
        "identity",
        "inspect",
        str(tmp_path / "chain.pem"),
        "--anchors",
        str(service.trust / "ca-bundle.crt"),
    )
    assert ok.returncode == 0, ok.stderr
    assert f"spiffe id: spiffe://{TD}/ns/{namespace}/sa/web" in ok.stdout
    assert "days left" in ok.stdout and "chain: verifies" in ok.stdout
    foreign = init_trust(tmp_path / "foreign")
    bad = meshward(
        "identity",
        "inspect",
        str(tmp_path / "chain.pem"),
        "--anchors",
        str(foreign / "ca-bundle.crt"),
    )
    assert bad.returncode == 2
    assert "does NOT verify" in bad.stdout


def test_new_anchor_and_issuer_reload_and_serving_certificate_follows(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    trust = init_trust(tmp_path / "trust")
    svc = IdentityService(kubeconfig, trust, tmp_path / "identity.log")
    svc.start()
    try:
        old_anchor = (trust / "ca-bundle.crt").read_bytes()
        new_anchor, new_anchor_key = pki.new_trust_anchor(TD, datetime.timedelta(days=365))
        issuer, issuer_key = pki.new_issuer(
            new_anchor, new_anchor_key, TD, datetime.timedelta(days=30)
        )
        # Trust both anchors, sign with the new one (the middle phase of an anchor rotation).
        swap(
            trust,
            {
                "ca-bundle.crt": old_anchor + pki.to_pem(new_anchor),
                "tls.key": pki.key_to_pem(issuer_key),
                "tls.crt": pki.to_pem(issuer),
            },
        )
        only_new = tmp_path / "only-new.crt"
        only_new.write_bytes(pki.to_pem(new_anchor))
        token = token_for(core, namespace, "web")
        csr, _ = make_csr()

        def certify_trusting_only_the_new_anchor() -> bytes:
            channel = grpc.secure_channel(
                f"localhost:{svc.port}",
                grpc.ssl_channel_credentials(root_certificates=only_new.read_bytes()),
            )
            with channel:
                response = identity_pb2_grpc.IdentityStub(channel).Certify(
                    identity_pb2.CertifyRequest(
                        identity=name("web", namespace),
                        token=token.encode(),
                        certificate_signing_request=csr,
                    ),
                    timeout=5,
                )
            leaf = x509.load_der_x509_certificate(response.leaf_certificate)
            chain = [x509.load_der_x509_certificate(c) for c in response.intermediate_certificates]
            pki.verify_chain(leaf, chain, [new_anchor])
            return bytes(response.leaf_certificate)

        def reloaded() -> bytes | None:
            try:
                return certify_trusting_only_the_new_anchor()
            except grpc.RpcError:
                return None  # still the old serving certificate: the handshake fails

        kubetest.wait_for("a service and leaves that chain to the new anchor", reloaded, 15)
        assert "trust material reloaded" in svc.log.read_text()
    finally:
        svc.stop()
