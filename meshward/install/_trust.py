"""The user's own trust anchors and issuer, checked before they are rendered.

``meshward install --identity-*-file`` renders them as the objects ``meshward identity init
--namespace`` writes: the trust-roots ConfigMap, the issuer Secret and the anchor Secret, this
one without a key (the anchor's key stays with the user). The TrustDomain that install renders
beside them makes the operator use them: it publishes the bundle to meshed namespaces and warns
before either certificate expires, but it can not rotate the issuer without the anchor's key.

The material is judged by the operator's own planning function, so what install accepts is what
the operator will serve.
"""

from __future__ import annotations

import dataclasses
import datetime
import pathlib

from meshward import errors
from meshward.identity import trustdomain


@dataclasses.dataclass(frozen=True)
class UserTrust:
    """PEM bytes as read: the anchor bundle, the issuer chain (issuer first) and its key."""

    anchors: bytes
    issuer_cert: bytes
    issuer_key: bytes
    warnings: tuple[str, ...] = ()
    """What the operator will warn about at once (a certificate inside its rotation window)."""


def _read(path: pathlib.Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(
            f"{flag}: can not read {path}: {exc.strerror}; pass the path of a PEM file"
        ) from exc
    if b"-----BEGIN" not in data:
        raise errors.ConfigError(f"{flag}: {path} holds no PEM block; pass a PEM file")
    return data


def load(
    anchors: pathlib.Path,
    issuer_cert: pathlib.Path,
    issuer_key: pathlib.Path,
    trust_domain: str,
    now: datetime.datetime | None = None,
) -> UserTrust:
    """Read the three files and check that the operator would serve them; ConfigError says what
    is wrong otherwise."""
    trust = UserTrust(
        anchors=_read(anchors, "--identity-trust-anchors-file"),
        issuer_cert=_read(issuer_cert, "--identity-issuer-certificate-file"),
        issuer_key=_read(issuer_key, "--identity-issuer-key-file"),
    )
    spec = trustdomain.TrustDomainSpec(trust_domain=trust_domain)
    state = trustdomain.State(
        anchor=trustdomain.Material(where=str(anchors), cert=trust.anchors, key=None),
        issuer=trustdomain.Material(
            where=f"{issuer_cert} and {issuer_key}", cert=trust.issuer_cert, key=trust.issuer_key
        ),
    )
    plan = trustdomain.plan(spec, state, now or datetime.datetime.now(datetime.UTC))
    if plan.status.phase != trustdomain.Phase.READY or plan.issuer_secret is not None:
        problem = plan.status.waiting_for or "the issuer can not be used"
        raise errors.ConfigError(
            f"the trust material can not be served: {problem}. Check the files with "
            "'meshward identity inspect FILE --anchors ANCHORS', or leave the three "
            "--identity-*-file flags out to let the operator create an anchor and issuer"
        )
    return dataclasses.replace(trust, warnings=tuple(w.message for w in plan.warnings))
