"""The operator's pure pieces that need no API server."""

from __future__ import annotations

from meshward.operator import _reconcile
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
