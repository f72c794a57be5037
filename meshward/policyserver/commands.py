"""``meshward policy serve``: the command-line face of the policy server, flag for flag like
``meshward identity serve`` (each flag also read from a MESHWARD_POLICY_* variable; the
namespace from MESHWARD_NAMESPACE, shared with the other control-plane services)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib


def add_arguments(serve: argparse.ArgumentParser) -> None:
    env = os.environ.get
    serve.add_argument(
        "--trust-domain",
        default=env("MESHWARD_TRUST_DOMAIN", "cluster.local"),
        help="the mesh's trust domain: only certificates of it may watch (default cluster.local)",
    )
    serve.add_argument(
        "--issuer-dir",
        type=pathlib.Path,
        default=pathlib.Path(
            env("MESHWARD_POLICY_ISSUER_DIR", "/var/run/meshward/identity/issuer")
        ),
        help="holds tls.crt and tls.key (the mounted issuer Secret): the server issues its own "
        "serving certificate from it",
    )
    serve.add_argument(
        "--trust-anchors",
        type=pathlib.Path,
        default=pathlib.Path(
            env(
                "MESHWARD_POLICY_TRUST_ANCHORS",
                "/var/run/meshward/identity/trust-roots/ca-bundle.crt",
            )
        ),
        help="PEM bundle (the mounted trust-roots ConfigMap's ca-bundle.crt): proxies' "
        "certificates must chain to it",
    )
    serve.add_argument(
        "--addr",
        default=env("MESHWARD_POLICY_ADDR", "0.0.0.0:8090"),
        help="host:port of the Policy API (default 0.0.0.0:8090)",
    )
    serve.add_argument(
        "--admin-addr",
        default=env("MESHWARD_POLICY_ADMIN_ADDR", "0.0.0.0:9991"),
        help="host:port of /ready, /live and /metrics (default 0.0.0.0:9991)",
    )
    serve.add_argument(
        "--server-name",
        action="append",
        help="DNS name in the serving certificate (repeatable; default: localhost and the "
        "server's mesh identity name, meshward-policy.meshward.serviceaccount.identity."
        "meshward.<trust-domain>)",
    )
    serve.add_argument(
        "--namespace",
        default=env("MESHWARD_NAMESPACE", "meshward"),
        help="the namespace the server runs in (MESHWARD_NAMESPACE, default meshward): it "
        "publishes the proxies' trust-state reports there, as meshward-proxies-<namespace> "
        "ConfigMaps under the key <POD_NAME, else the host name>.json",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug log per watch")
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from meshward.policyserver import server

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Only our own loggers go to debug: the API client's debug log prints whole responses.
    logging.getLogger("meshward").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    own = server.own_identity(args.trust_domain)
    settings = server.Settings(
        trust_domain=args.trust_domain,
        issuer_dir=args.issuer_dir,
        anchors_file=args.trust_anchors,
        address=args.addr,
        admin_address=args.admin_addr,
        server_names=tuple(args.server_name or ("localhost", own.dns_name)),
        namespace=args.namespace,
    )
    asyncio.run(server.serve(settings))
    return 0
