"""``meshward check`` against an install that runs: the operator and the identity service with
their installed settings and ServiceAccounts, on a control plane of this module's own. Every
check passes; then one thing at a time is broken (an issuer left to near its expiry, the
identity service stopped, a webhook's CA bundle replaced, no install in the namespace, no API
server) and the check says so with a hint."""

from __future__ import annotations

import base64
import dataclasses
import datetime
import pathlib
import subprocess
from collections.abc import Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client

from meshward import check, devcluster, proxyreports
from meshward.identity import commands, pki, trustdomain
from tests import kubetest
from tests.test_identity_service import IdentityService, init_trust, meshward
from tests.test_install import (
    WEBHOOK_NAME,
    Plane,
    operator_as_installed,
    sa_kubeconfig,
    served_flags,
    start_plane,
    trust_files,
    wait_operator_ready,
)

NAMES = (
    "control plane reachable",
    "CRDs established",
    "webhook (validating)",
    "webhook (mutating)",
    "trust anchors valid",
    "issuer valid",
    "identity service answering",
    "proxy certificates",
)


@dataclasses.dataclass(frozen=True)
class Line:
    mark: str
    detail: str
    hint: str


def parse(stdout: str) -> dict[str, Line]:
    """Each check's mark, detail and hint, by name, from the command's output."""
    lines: dict[str, Line] = {}
    last = ""
    for text in stdout.splitlines()[:-1]:
        if text.startswith("       hint: "):
            previous = lines[last]
            lines[last] = dataclasses.replace(previous, hint=text.removeprefix("       hint: "))
            continue
        mark, rest = text[:6], text[7:]
        last, _, detail = rest.partition(": ")
        lines[last] = Line(mark, detail, "")
    assert tuple(lines) == NAMES, stdout
    return lines


@dataclasses.dataclass
class Install:
    plane: Plane
    identity: IdentityService

    def check(self, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Line]]:
        proc = meshward(
            "check",
            "--kubeconfig",
            str(self.plane.kubeconfig),
            "--identity-addr",
            f"127.0.0.1:{self.identity.port}",
            *args,
        )
        assert proc.stderr == "", proc.stderr
        return proc, parse(proc.stdout)


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Install]:
    directory = tmp_path_factory.mktemp("check")
    cluster = devcluster.up(directory / "cp")
    try:
        plane = start_plane(cluster.kubeconfig)
        assert [p.returncode for p in plane.first_apply] == [0]
        op = operator_as_installed(plane, directory / "operator")
        identity = IdentityService(
            sa_kubeconfig(plane, "meshward-identity", directory / "identity.kubeconfig"),
            directory / "trust",
            directory / "identity.log",
            verbose=False,
            extra=tuple(served_flags(plane, "meshward-identity")),
        )
        try:
            wait_operator_ready(plane, op)
            trust_files(plane, directory / "trust")
            identity.start()
            yield Install(plane, identity)
        finally:
            identity.stop()
            op.stop()
            plane.api.close()
    finally:
        devcluster.down(directory / "cp")


@pytest.mark.cluster
def test_every_check_passes_on_a_running_install(install: Install) -> None:
    proc, lines = install.check()
    assert proc.returncode == 0, proc.stdout
    assert all(line.mark == "[ok]  " and not line.hint for line in lines.values()), proc.stdout
    assert proc.stdout.splitlines()[-1] == "all 8 checks passed"
    assert lines["CRDs established"].detail == "all 7 served"
    assert f"{WEBHOOK_NAME}: " in lines["webhook (validating)"].detail
    assert "certificate verified against the caBundle" in lines["webhook (mutating)"].detail
    assert "SERVING" in lines["identity service answering"].detail
    assert lines["proxy certificates"].detail.startswith("no proxy reports")
    assert "CN=issuer.identity.meshward.cluster.local chains to the anchors" in (
        lines["issuer valid"].detail
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.mark.cluster
def test_an_issuer_left_near_its_expiry_is_a_warning_with_a_hint(install: Install) -> None:
    plane = install.plane
    td_api = (trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, "meshward")
    # Rotation an hour before expiry: the operator keeps an issuer with two days left, as it
    # would keep one it can not rotate (your own PKI without the anchor's key).
    plane.custom.patch_cluster_custom_object(*td_api, {"spec": {"issuerRotateBefore": "1h"}})
    original = plane.core.read_namespaced_secret(commands.ISSUER_SECRET, "meshward")
    anchor_secret = plane.core.read_namespaced_secret(commands.ANCHOR_SECRET, "meshward")
    anchor = x509.load_pem_x509_certificate(base64.b64decode(anchor_secret.data["tls.crt"]))
    anchor_key = serialization.load_pem_private_key(
        base64.b64decode(anchor_secret.data["tls.key"]), None
    )
    assert isinstance(anchor_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    old, old_key = pki.new_issuer(
        anchor,
        anchor_key,
        "cluster.local",
        datetime.timedelta(days=10),
        now=now - datetime.timedelta(days=8),
    )
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=commands.ISSUER_SECRET, namespace="meshward"),
        type="kubernetes.io/tls",
        data={"tls.crt": _b64(pki.to_pem(old)), "tls.key": _b64(pki.key_to_pem(old_key))},
    )
    plane.core.replace_namespaced_secret(commands.ISSUER_SECRET, "meshward", body)
    try:
        proc, lines = install.check()
        assert proc.returncode == 1, proc.stdout
        issuer = lines["issuer valid"]
        assert issuer.mark == "[warn]", proc.stdout
        assert "in 2.0 days: inside the 2.5-day warning window" in issuer.detail
        assert "not rotated in time" in issuer.hint and "kubectl get trustdomain" in issuer.hint
        others = [line.mark for name, line in lines.items() if name != "issuer valid"]
        assert others == ["[ok]  "] * 7, proc.stdout
        assert proc.stdout.splitlines()[-1] == "7 passed, 1 warning(s), 0 failed, 0 skipped"
        # An explicit window of a day: two days left is fine again.
        proc, lines = install.check("--issuer-window", "1d")
        assert proc.returncode == 0 and lines["issuer valid"].mark == "[ok]  ", proc.stdout
    finally:
        original.metadata.resource_version = None
        plane.core.replace_namespaced_secret(commands.ISSUER_SECRET, "meshward", original)
        plane.custom.patch_cluster_custom_object(*td_api, {"spec": {"issuerRotateBefore": None}})


@pytest.mark.cluster
def test_a_stopped_identity_service_fails_with_a_hint(install: Install) -> None:
    install.identity.stop()
    try:
        proc, lines = install.check("--timeout", "2")
    finally:
        install.identity.start()
    assert proc.returncode == 1
    identity = lines["identity service answering"]
    assert identity.mark == "[FAIL]", proc.stdout
    assert identity.detail.startswith(f"127.0.0.1:{install.identity.port}: UNAVAILABLE")
    assert "kubectl -n meshward get deploy meshward-identity" in identity.hint
    assert "port-forward svc/meshward-identity 8080" in identity.hint
    others = [line.mark for name, line in lines.items() if name != "identity service answering"]
    assert others == ["[ok]  "] * 7, proc.stdout


@pytest.mark.cluster
def test_a_webhook_whose_certificate_does_not_match_its_ca_bundle_fails(
    install: Install, tmp_path: pathlib.Path
) -> None:
    admission = client.AdmissionregistrationV1Api(install.plane.api)
    current = admission.read_validating_webhook_configuration(WEBHOOK_NAME)
    other_ca = (init_trust(tmp_path / "other") / "ca-bundle.crt").read_bytes()
    patch = [
        {"op": "replace", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": _b64(other_ca)}
        for i in range(len(current.webhooks))
    ]
    admission.patch_validating_webhook_configuration(WEBHOOK_NAME, patch)
    try:
        proc, lines = install.check()
    finally:
        restore = [
            {
                "op": "replace",
                "path": f"/webhooks/{i}/clientConfig/caBundle",
                "value": hook.client_config.ca_bundle,
            }
            for i, hook in enumerate(current.webhooks)
        ]
        admission.patch_validating_webhook_configuration(WEBHOOK_NAME, restore)
    assert proc.returncode == 1
    webhook = lines["webhook (validating)"]
    assert webhook.mark == "[FAIL]", proc.stdout
    assert "does not verify against the caBundle" in webhook.detail
    assert "restart the operator" in webhook.hint and "pod's IP" in webhook.hint
    assert lines["webhook (mutating)"].mark == "[ok]  "


@pytest.mark.cluster
def test_a_namespace_without_an_install_fails_and_says_how_to_install(install: Install) -> None:
    proc, lines = install.check("--namespace", "nowhere")
    assert proc.returncode == 1
    anchors = lines["trust anchors valid"]
    assert anchors.mark == "[FAIL]"
    assert anchors.detail == (f"configmap/{commands.TRUST_ROOTS} in namespace nowhere not found")
    assert "install with meshward install | kubectl apply -f -" in anchors.hint
    assert lines["issuer valid"].mark == "[skip]"
    assert lines["identity service answering"].mark == "[skip]"
    assert lines["CRDs established"].mark == "[ok]  "


def test_no_api_server_fails_first_and_skips_the_rest(tmp_path: pathlib.Path) -> None:
    port = kubetest.free_port()
    kubeconfig = tmp_path / "kubeconfig"
    kubetest.write_kubeconfig(
        kubeconfig,
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "gone",
                    "cluster": {
                        "server": f"https://127.0.0.1:{port}",
                        "insecure-skip-tls-verify": True,
                    },
                }
            ],
            "users": [{"name": "u", "user": {"token": "not-a-real-token"}}],
            "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u"}}],
            "current-context": "gone",
        },
    )
    proc = meshward("check", "--kubeconfig", str(kubeconfig), "--timeout", "2")
    assert proc.returncode == 1
    lines = parse(proc.stdout)
    first = lines["control plane reachable"]
    assert first.mark == "[FAIL]" and f"https://127.0.0.1:{port} did not answer" in first.detail
    assert "--kubeconfig" in first.hint
    assert [line.mark for line in lines.values()][1:] == ["[skip]"] * 7
    missing = meshward("check", "--kubeconfig", str(tmp_path / "absent"))
    assert missing.returncode == 1
    assert parse(missing.stdout)["control plane reachable"].detail == (
        f"{tmp_path / 'absent'} is not a file"
    )


def _report(plane: Plane, namespace: str, leaves: dict[str, datetime.timedelta]) -> str:
    """Publish, as the policy server does, live reports of proxies whose leaves expire in the
    given times; returns the ConfigMap's name."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    fingerprint = "sha256:" + "ab" * 32
    published = proxyreports.publish(
        "meshward-policy-0",
        [
            proxyreports.Proxy(
                pod=pod,
                identity=f"spiffe://cluster.local/ns/{namespace}/sa/default",
                trust_bundle=fingerprint,
                leaf_issuer=fingerprint,
                leaf_not_after=now + left,
                proxy_version="0.1.0",
                reported_at=now,
            )
            for pod, left in leaves.items()
        ],
        now,
    )
    name = proxyreports.configmap_name(namespace)
    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(
            name=name,
            namespace="meshward",
            labels={proxyreports.LABEL: "true"},
            annotations={proxyreports.NAMESPACE_ANNOTATION: namespace},
        ),
        data={proxyreports.data_key("meshward-policy-0"): published.to_json()},
    )
    plane.core.create_namespaced_config_map("meshward", body)
    return name


@pytest.mark.cluster
def test_proxies_whose_certificates_run_out_are_named(install: Install) -> None:
    hour = datetime.timedelta(hours=1)
    healthy = _report(install.plane, "shop", {"web-0": 20 * hour, "web-1": 9 * hour})
    try:
        proc, lines = install.check()
        assert proc.returncode == 0, proc.stdout
        assert lines["proxy certificates"].detail.startswith(
            "2 proxies report, every certificate valid for more than 6.0 h (the soonest "
            "expires in 9.0 h)"
        )
        failing = _report(install.plane, "pay", {"api-0": 2 * hour, "api-1": -hour})
        try:
            proc, lines = install.check()
            proxies = lines["proxy certificates"]
            assert proc.returncode == 1 and proxies.mark == "[FAIL]", proc.stdout
            assert proxies.detail == "1 of 4 proxies hold an expired certificate: pay/api-1"
            assert "kubectl logs -n NAMESPACE POD -c meshward-proxy" in proxies.hint
            install.plane.core.delete_namespaced_config_map(failing, "meshward")
            failing = _report(install.plane, "pay", {"api-0": 2 * hour})
            proc, lines = install.check()
            proxies = lines["proxy certificates"]
            assert proc.returncode == 1 and proxies.mark == "[warn]", proc.stdout
            assert proxies.detail == "1 of 3 proxies' certificates expire within 6.0 h: pay/api-0"
            assert "renewals are failing" in proxies.hint
            proc, lines = install.check("--proxy-window", "1h")
            assert proc.returncode == 0, proc.stdout
        finally:
            install.plane.core.delete_namespaced_config_map(failing, "meshward")
    finally:
        install.plane.core.delete_namespaced_config_map(healthy, "meshward")


def _cert(lifetime: datetime.timedelta) -> x509.Certificate:
    cert, _ = pki.new_trust_anchor("cluster.local", lifetime)
    return cert


def test_the_warning_window_is_capped_at_a_quarter_of_the_lifetime() -> None:
    day = datetime.timedelta(days=1)
    skew = pki.CLOCK_SKEW  # certificates start this much before they are made
    assert check.window(_cert(90 * day), None, check.ISSUER_WINDOW) == 7 * day
    assert check.window(_cert(day), None, check.ISSUER_WINDOW) == (day + skew) / 4
    assert check.window(_cert(365 * day), None, check.ANCHOR_WINDOW) == 60 * day
    assert check.window(_cert(30 * day), None, check.ANCHOR_WINDOW) == (30 * day + skew) / 4
    assert check.window(_cert(day), 3 * day, check.ISSUER_WINDOW) == 3 * day


def test_hints_are_shown_for_warnings_and_failures_only() -> None:
    results = [
        check.Result("a", check.Outcome.PASS, "fine", "unused"),
        check.Result("b", check.Outcome.WARN, "soon", "rotate it"),
        check.Result("c", check.Outcome.FAIL, "broken", "fix it"),
        check.Result("d", check.Outcome.SKIP, "needs c", "unused"),
    ]
    assert check.report(results).splitlines() == [
        "[ok]   a: fine",
        "[warn] b: soon",
        "       hint: rotate it",
        "[FAIL] c: broken",
        "       hint: fix it",
        "[skip] d: needs c",
        "1 passed, 1 warning(s), 1 failed, 1 skipped",
    ]
