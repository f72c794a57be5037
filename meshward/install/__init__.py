"""``meshward install`` and ``meshward uninstall``: the control plane as Kubernetes manifests.

Rendering only: nothing here talks to a cluster, so the output can be reviewed, stored and
applied by any tool, in one run, on a new cluster too::

    meshward install | kubectl apply -f -

The output holds no custom resource (kubectl resolves every document's kind before it applies
any, so a custom resource could not be created in the run that creates its CRD): the operator
creates the TrustDomain itself when none exists (``MESHWARD_TRUST_DOMAIN_RESOURCE``, named
after the control-plane namespace). ``--crds`` renders the CRDs alone, to upgrade them.
``meshward uninstall | kubectl delete --ignore-not-found -f -`` removes the control plane and
keeps the CRDs (and with them every policy resource) unless given ``--crds``.

    _manifests  the objects, in apply order
    _rbac       each ServiceAccount's rules and why it needs them
    _trust      the user's own anchor and issuer, checked as the operator will
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

from meshward import errors
from meshward.install import _manifests, _trust

__all__ = ["add_install_arguments", "add_uninstall_arguments"]

_TRUST_FLAGS = (
    "identity_trust_anchors_file",
    "identity_issuer_certificate_file",
    "identity_issuer_key_file",
)
_KEPT = (
    "meshward uninstall keeps:",
    "  - the CRDs, and with them every policy resource in the cluster (pass --crds to delete "
    "them all);",
    "  - in your namespaces, the ConfigMaps the operator wrote (meshward-policy, "
    "meshward-identity-trust-roots): kubectl delete configmap -A "
    "-l app.kubernetes.io/managed-by=meshward-operator;",
    "  - injected pods: their proxies stop getting certificates and fail once theirs expire; "
    "remove meshward.io/inject and restart them first.",
)


def _common(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--namespace",
        default=env("MESHWARD_NAMESPACE", _manifests.DEFAULT_NAMESPACE),
        help="the control plane's namespace [MESHWARD_NAMESPACE] (default meshward)",
    )
    parser.add_argument(
        "--webhook-name",
        default=_manifests.DEFAULT_WEBHOOK_NAME,
        help="name of the operator's webhook configurations (default "
        f"{_manifests.DEFAULT_WEBHOOK_NAME})",
    )


def add_install_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--crds",
        action="store_true",
        help="render only the CustomResourceDefinitions (to upgrade them alone)",
    )
    _common(parser)
    parser.add_argument(
        "--image",
        default=_manifests.default_image(),
        help="the meshward image of every control-plane container and of injected proxies "
        f"(default {_manifests.default_image()})",
    )
    parser.add_argument(
        "--trust-domain",
        default=env("MESHWARD_TRUST_DOMAIN", "cluster.local"),
        help="the mesh's trust domain [MESHWARD_TRUST_DOMAIN] (default cluster.local)",
    )
    trust = parser.add_argument_group(
        "your own trust material",
        "Give all three to use your PKI instead of an anchor and issuer the operator creates. "
        "The issuer's key is then part of the output: pipe it to kubectl, do not store it.",
    )
    trust.add_argument(
        "--identity-trust-anchors-file", type=pathlib.Path, help="PEM bundle of trust anchors"
    )
    trust.add_argument(
        "--identity-issuer-certificate-file",
        type=pathlib.Path,
        help="PEM: the issuer CA (path length 0), then any CAs between it and an anchor",
    )
    trust.add_argument(
        "--identity-issuer-key-file", type=pathlib.Path, help="PEM: the issuer's ECDSA P-256 key"
    )
    parser.set_defaults(func=_install)


def add_uninstall_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--crds",
        action="store_true",
        help="also delete the CRDs, which deletes every meshward resource in the cluster",
    )
    _common(parser)
    parser.set_defaults(func=_uninstall)


def _install(args: argparse.Namespace) -> int:
    if args.crds:
        sys.stdout.write(_manifests.render(_manifests.crds()))
        return 0
    given = [getattr(args, flag) is not None for flag in _TRUST_FLAGS]
    trust = None
    if any(given):
        if not all(given):
            missing = [
                "--" + flag.replace("_", "-")
                for flag, present in zip(_TRUST_FLAGS, given, strict=True)
                if not present
            ]
            raise errors.ConfigError(
                f"your own trust material needs all three --identity-*-file flags; missing "
                f"{', '.join(missing)}"
            )
        trust = _trust.load(
            args.identity_trust_anchors_file,
            args.identity_issuer_certificate_file,
            args.identity_issuer_key_file,
            args.trust_domain,
        )
    settings = _manifests.Settings(
        image=args.image,
        namespace=args.namespace,
        trust_domain=args.trust_domain,
        webhook_name=args.webhook_name,
        trust=trust,
    )
    documents = _manifests.install(settings)
    for warning in trust.warnings if trust else ():
        print(f"meshward: warning: {warning}", file=sys.stderr)
    sys.stdout.write(_manifests.render(documents))
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    settings = _manifests.Settings(
        image=_manifests.default_image(),
        namespace=args.namespace,
        webhook_name=args.webhook_name,
    )
    sys.stdout.write(_manifests.render(_manifests.uninstall(settings, with_crds=args.crds)))
    for line in _KEPT[:1] + _KEPT[2:] if args.crds else _KEPT:
        print(line, file=sys.stderr)
    return 0
