"""``meshward policy explain`` against the live cluster, as a user runs it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
from kubernetes import client

from tests import kubetest


def explain(kubeconfig: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshward",
            "policy",
            "explain",
            "--kubeconfig",
            str(kubeconfig),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


@pytest.mark.cluster
def test_explain_names_the_deciding_rule(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
) -> None:
    ns = namespace
    kubetest.wait_service_account(core, ns)
    kubectl.run("annotate", "namespace", ns, "config.meshward.io/default-inbound-policy=deny")
    kubectl.apply(
        kubetest.pod_manifest(ns, "web-0", "web", probes={"readinessProbe": ("/ready", "admin")})
        + textwrap.dedent(f"""
        ---
        apiVersion: policy.meshward.io/v1alpha1
        kind: Server
        metadata: {{name: web-http, namespace: {ns}}}
        spec:
          podSelector: {{matchLabels: {{app: web}}}}
          port: http
          proxyProtocol: HTTP/1
        ---
        apiVersion: policy.meshward.io/v1alpha1
        kind: ServerAuthorization
        metadata: {{name: web-from-ns, namespace: {ns}}}
        spec:
          server: {{name: web-http}}
          client:
            meshTLS:
              identities: ["*.{ns}.serviceaccount.identity.meshward.cluster.local"]
    """)
    )
    kubetest.wait_document(
        core,
        ns,
        lambda d: (
            "web-0" in d.pods and any(s.rules for s in d.servers) and d.default_policy == "deny"
        ),
    )

    own = explain(
        kubeconfig,
        "-n",
        ns,
        "--pod",
        "web-0",
        "--port",
        "http",
        "--identity",
        f"spiffe://cluster.local/ns/{ns}/sa/vote-bot",
    )
    assert own.returncode == 0, own.stdout + own.stderr
    assert own.stdout.startswith("ALLOW")
    assert "ServerAuthorization web-from-ns" in own.stdout
    assert "Server web-http" in own.stdout

    outsider = explain(
        kubeconfig,
        "-n",
        ns,
        "--pod",
        "web-0",
        "--port",
        "8080",
        "--identity",
        "spiffe://cluster.local/ns/elsewhere/sa/default",
    )
    assert outsider.returncode == 2, outsider.stdout + outsider.stderr
    assert outsider.stdout.startswith("DENY")
    assert "web-http" in outsider.stdout

    probe = explain(
        kubeconfig,
        "-n",
        ns,
        "--pod",
        "web-0",
        "--port",
        "admin",
        "--unauthenticated",
        "--method",
        "GET",
        "--path",
        "/ready",
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert "probe" in probe.stdout

    other_path = explain(
        kubeconfig,
        "-n",
        ns,
        "--pod",
        "web-0",
        "--port",
        "admin",
        "--unauthenticated",
        "--method",
        "GET",
        "--path",
        "/admin",
    )
    assert other_path.returncode == 2
    assert "default deny" in other_path.stdout or "deny" in other_path.stdout.splitlines()[1]

    missing = explain(kubeconfig, "-n", ns, "--pod", "nope", "--port", "80", "--unauthenticated")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"meshward: error: pod {ns}/nope not found"]


def test_an_unreachable_api_server_is_one_line(tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
    )
    proc = explain(kubeconfig, "-n", "default", "--pod", "web-0", "--port", "80")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("meshward: error: can not reach the API server at https://127.0.0.1:9")
