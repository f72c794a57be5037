"""The operator's pure pieces that need no API server."""

from __future__ import annotations

from typing import Any

import kubernetes_asyncio.client
import pytest

from meshward import errors
from meshward.operator import _reconcile, _settings
from meshward.policy import compiled, decision


def _document(pods: int) -> compiled.PolicyDocument:
    return compiled.PolicyDocument(
        namespace="big",
        trust_domain="cluster.local",
        cluster_networks=("10.0.0.0/8",),
        default_policy="all-unauthenticated",
        pods={
            f"web-7d9f8b6c4-{i:05d}": compiled.Pod(
                labels={"app": "web", "pod-template-hash": "7d9f8b6c4", "team": "storefront"},
                ports={"http": 8080, "admin": 9990},
                probes=({"port": 9990, "path": "/ready"}, {"port": 9990, "path": "/live"}),
            )
            for i in range(pods)
        },
    )


def test_a_document_that_fits_is_written_as_it_is() -> None:
    doc = _document(10)
    written, text = _reconcile.fit(doc, "big")
    assert written == doc
    assert compiled.PolicyDocument.from_json(text) == doc.sealed()


def test_an_oversized_document_fails_closed() -> None:
    doc = _document(8000)
    assert len(doc.to_json()) > _reconcile.MAX_DOCUMENT_BYTES
    written, text = _reconcile.fit(doc, "big")
    assert len(text) <= _reconcile.MAX_DOCUMENT_BYTES
    parsed = compiled.PolicyDocument.from_json(text)
    assert parsed == written.sealed()
    assert parsed.pods == {}
    outsider = decision.Client(identity=None, source_ip="10.1.1.1", tls=False)
    before = decision.decide(
        decision.Policy(doc), decision.Destination(8080, pod="web-7d9f8b6c4-00001"), outsider
    )
    after = decision.decide(
        decision.Policy(parsed), decision.Destination(8080, {"app": "web"}), outsider
    )
    assert before.allowed and not after.allowed


class _Recorder(_reconcile.Reconciler):
    """A reconciler that records which namespaces it was asked to rebuild, and does nothing."""

    def __init__(self) -> None:
        super().__init__(kubernetes_asyncio.client.ApiClient(), _settings.from_env({}))
        self.marked: list[str | None] = []

    def mark(self, namespace: str | None, delay: float = 0) -> None:
        self.marked.append(namespace)


def _pod_body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "web-0", "labels": {"app": "web"}},
        "spec": {
            "containers": [{"name": "web", "ports": [{"name": "http", "containerPort": 8080}]}]
        },
        "status": {"phase": "Pending"},
    }
    for key, value in changes.items():
        section, field = key.split("__")
        body[section][field] = value
    return body


async def test_pod_status_churn_does_not_rebuild() -> None:
    rec = _Recorder()
    rec.pod_changed("ns", _pod_body())
    rec.pod_changed("ns", _pod_body(status__phase="Running"))
    rec.pod_changed("ns", _pod_body(status__podIP="10.1.2.3"))
    assert rec.marked == ["ns"]
    rec.pod_changed("ns", _pod_body(metadata__labels={"app": "web", "v": "2"}))
    rec.pod_changed("ns", _pod_body(metadata__deletionTimestamp="2026-11-23T00:00:00Z"))
    rec.pod_changed("ns", _pod_body(), deleted=True)
    rec.pod_changed("ns", _pod_body())
    await rec.close()
    assert rec.marked == ["ns"] * 5


def test_excluded_namespaces_by_name_or_pattern() -> None:
    settings = _settings.from_env({"MESHWARD_EXCLUDED_NAMESPACES": "kube-system, team-*"})
    assert settings.excludes("kube-system") and settings.excludes("team-a")
    assert not settings.excludes("kube-public") and not settings.excludes("my-team-a")
    default = _settings.from_env({})
    assert default.excludes("kube-node-lease") and not default.excludes("default")


def test_the_trust_domain_to_create_is_named_or_none() -> None:
    assert _settings.from_env({}).trust_domain_resource is None
    named = _settings.from_env({"MESHWARD_TRUST_DOMAIN_RESOURCE": "meshward"})
    assert named.trust_domain_resource == "meshward"
    with pytest.raises(errors.ConfigError) as bad:
        _settings.from_env({"MESHWARD_TRUST_DOMAIN_RESOURCE": "Mesh_Ward"})
    assert "MESHWARD_TRUST_DOMAIN_RESOURCE" in str(bad.value)
