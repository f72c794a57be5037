"""``meshward identity init | inspect | serve``: the command-line face of the identity service.

``init`` makes a trust anchor and an issuer signed by it, into files (the layout the service
reads) or into the cluster as the Secret and ConfigMap the service mounts. ``inspect`` prints a
chain and whether it verifies against the anchors. ``serve`` runs the service.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import logging
import os
import pathlib
import re
import secrets
import typing
import urllib.error
import urllib.request
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from meshward import errors
from meshward.identity import authority, pki

ISSUER_SECRET = "meshward-identity-issuer"
ANCHOR_SECRET = "meshward-identity-trust-anchor"
TRUST_ROOTS = "meshward-identity-trust-roots"
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")


MAX_DURATION = datetime.timedelta(days=36500)


def duration(text: str) -> datetime.timedelta:
    """``90d``, ``24h``, ``30m``, ``45s``: more than zero, at most 100 years."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 24h or 90d")
    seconds = int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 0 < seconds <= MAX_DURATION.total_seconds():
        raise argparse.ArgumentTypeError(f"{text!r} must be more than zero and at most 36500d")
    return datetime.timedelta(seconds=seconds)


def _write_private(path: pathlib.Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all, with ``mode`` from the first byte (never widened by
    an existing file's mode, never through a symlink)."""
    staged = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staged, path)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="identity_command", required=True, metavar="ACTION")
    env = os.environ.get

    init = sub.add_parser("init", help="create a trust anchor and an issuer signed by it")
    where = init.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", type=pathlib.Path, help="write files into this directory")
    where.add_argument(
        "--namespace", help="write the Secrets and ConfigMap into this (control-plane) namespace"
    )
    init.add_argument("--trust-domain", default=env("MESHWARD_TRUST_DOMAIN", "cluster.local"))
    init.add_argument("--anchor-lifetime", type=duration, default=duration("365d"))
    init.add_argument("--issuer-lifetime", type=duration, default=duration("90d"))
    init.add_argument("--force", action="store_true", help="replace existing trust material")
    init.set_defaults(func=_init)

    inspect = sub.add_parser(
        "inspect",
        help="print a certificate chain and check it",
        description="Print a chain from a file, or the one a pod's proxy presents now "
        "(--namespace N --pod P: read from the proxy's admin server at the pod's IP), and "
        "check it against the trust anchors.",
    )
    inspect.add_argument(
        "file", type=pathlib.Path, nargs="?", help="PEM or DER: leaf first, then intermediates"
    )
    inspect.add_argument("--namespace", "-n", help="the pod's namespace (with --pod)")
    inspect.add_argument("--pod", help="inspect the certificate this pod's proxy presents")
    inspect.add_argument(
        "--admin-port", type=int, default=4191, help="the proxy's admin port (default 4191)"
    )
    inspect.add_argument(
        "--anchors",
        type=pathlib.Path,
        help="trust anchors (PEM) to verify the chain against; with --pod the default is the "
        f"cluster's {TRUST_ROOTS} ConfigMap",
    )
    inspect.add_argument(
        "--identity-namespace",
        default=env("MESHWARD_NAMESPACE", "meshward"),
        help=f"where the {TRUST_ROOTS} ConfigMap lives (default: meshward)",
    )
    inspect.set_defaults(func=_inspect)

    rotate = sub.add_parser(
        "rotate",
        help="rotate the trust anchor now, through the operator's phases",
        description="Ask the operator to rotate the served TrustDomain's trust anchor now: it "
        "adds a new anchor to the bundle, waits until every proxy has loaded it, moves the "
        "issuer to the new anchor, waits until every proxy holds a leaf from it (asking them to "
        "renew early), then drops the old anchor. Sets the annotation "
        "identity.meshward.io/rotate-anchor; with --wait, follows the phases until done.",
    )
    rotate.add_argument("--name", help="the TrustDomain (default: the one served)")
    rotate.add_argument("--wait", action="store_true", help="follow the phases until Ready")
    rotate.add_argument(
        "--timeout", type=duration, default=duration("10m"), help="with --wait (default 10m)"
    )
    rotate.set_defaults(func=_rotate)

    serve = sub.add_parser("serve", help="run the identity service")
    serve.add_argument("--trust-domain", default=env("MESHWARD_TRUST_DOMAIN", "cluster.local"))
    serve.add_argument(
        "--issuer-dir",
        type=pathlib.Path,
        default=pathlib.Path(
            env("MESHWARD_IDENTITY_ISSUER_DIR", "/var/run/meshward/identity/issuer")
        ),
        help="holds tls.crt and tls.key (the mounted issuer Secret)",
    )
    serve.add_argument(
        "--trust-anchors",
        type=pathlib.Path,
        default=pathlib.Path(
            env(
                "MESHWARD_IDENTITY_TRUST_ANCHORS",
                "/var/run/meshward/identity/trust-roots/ca-bundle.crt",
            )
        ),
        help="PEM bundle (the mounted trust-roots ConfigMap's ca-bundle.crt)",
    )
    serve.add_argument("--addr", default=env("MESHWARD_IDENTITY_ADDR", "0.0.0.0:8080"))
    serve.add_argument("--admin-addr", default=env("MESHWARD_IDENTITY_ADMIN_ADDR", "0.0.0.0:9990"))
    serve.add_argument(
        "--server-name",
        action="append",
        help="DNS name in the serving certificate (repeatable; default: localhost and the "
        "service's mesh identity name)",
    )
    serve.add_argument(
        "--lifetime", type=duration, default=pki.DEFAULT_LEAF_LIFETIME, help="leaf lifetime"
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="debug log per issuance")
    serve.set_defaults(func=_serve)


def _init(args: argparse.Namespace) -> int:
    anchor, anchor_key = pki.new_trust_anchor(args.trust_domain, args.anchor_lifetime)
    issuer, issuer_key = pki.new_issuer(anchor, anchor_key, args.trust_domain, args.issuer_lifetime)
    files = {
        authority.ANCHORS: pki.to_pem(anchor),
        authority.ISSUER_CERT: pki.to_pem(issuer),
        authority.ISSUER_KEY: pki.key_to_pem(issuer_key),
        "anchor.key": pki.key_to_pem(anchor_key),
    }
    if args.out is not None:
        out: pathlib.Path = args.out
        existing = [n for n in files if (out / n).exists()]
        if existing and not args.force:
            raise errors.ConfigError(
                f"{out} already holds {', '.join(existing)}; pass --force to replace them"
            )
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            _write_private(out / name, data, 0o600 if name.endswith(".key") else 0o644)
        print(f"trust anchor and issuer written to {out}")
        print(f"  {authority.ANCHORS}: the trust anchor (give it to proxies)")
        print(f"  {authority.ISSUER_CERT}, {authority.ISSUER_KEY}: the issuer (identity service)")
        print("  anchor.key: the anchor's private key: keep it offline; it signs future issuers")
    else:
        _init_cluster(args, files)
    expiry = "%Y-%m-%d"
    print(
        f"anchor expires {anchor.not_valid_after_utc:{expiry}}, "
        f"issuer {issuer.not_valid_after_utc:{expiry}}"
    )
    return 0


def _init_cluster(args: argparse.Namespace, files: dict[str, bytes]) -> None:
    from kubernetes import client, config
    from kubernetes.client import exceptions

    config.load_kube_config()  # type: ignore[no-untyped-call]
    core = client.CoreV1Api()
    ns = args.namespace

    def secret(name: str, cert: str, key: str) -> client.V1Secret:
        return client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, namespace=ns),
            type="kubernetes.io/tls",
            string_data={"tls.crt": files[cert].decode(), "tls.key": files[key].decode()},
        )

    secrets = [
        (ISSUER_SECRET, secret(ISSUER_SECRET, authority.ISSUER_CERT, authority.ISSUER_KEY)),
        (ANCHOR_SECRET, secret(ANCHOR_SECRET, authority.ANCHORS, "anchor.key")),
    ]
    roots = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name=TRUST_ROOTS, namespace=ns),
        data={authority.ANCHORS: files[authority.ANCHORS].decode()},
    )

    def missing(read: Any, name: str) -> bool:
        try:
            read(name, ns)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    try:
        secret_exists = {
            name: not missing(core.read_namespaced_secret, name) for name, _ in secrets
        }
        roots_exist = not missing(core.read_namespaced_config_map, TRUST_ROOTS)
        existing = [f"secret/{name}" for name, found in secret_exists.items() if found]
        existing += [f"configmap/{TRUST_ROOTS}"] if roots_exist else []
        if existing and not args.force:
            raise errors.ConfigError(
                f"namespace {ns} already holds {', '.join(existing)}; pass --force to replace "
                "the trust material"
            )
        for name, body in secrets:
            if secret_exists[name]:
                core.replace_namespaced_secret(name, ns, body)
            else:
                core.create_namespaced_secret(ns, body)
            print(f"secret/{name} written in namespace {ns}")
        if roots_exist:
            core.replace_namespaced_config_map(TRUST_ROOTS, ns, roots)
        else:
            core.create_namespaced_config_map(ns, roots)
        print(f"configmap/{TRUST_ROOTS} written in namespace {ns}")
    except exceptions.ApiException as exc:
        raise errors.ConfigError(f"writing trust material to namespace {ns}: {exc.reason}") from exc


def _describe(cert: x509.Certificate, now: datetime.datetime) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    left = cert.not_valid_after_utc - now
    return [
        f"subject:   {cert.subject.rfc4514_string() or '(empty)'}",
        f"issuer:    {cert.issuer.rfc4514_string()}",
        f"spiffe id: {pki.spiffe_id(cert) or '-'}",
        f"dns names: {', '.join(dns) or '-'}",
        f"valid:     {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} .. "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC "
        f"({left.total_seconds() / 86400:.1f} days left"
        f"{', EXPIRED' if left.total_seconds() < 0 else ''})",
        f"ca:        {'yes' if ca else 'no'}",
    ]


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise errors.ConfigError(f"can not read {path}: {exc.strerror}") from exc


def _load_chain(data: bytes, path: pathlib.Path | str) -> list[x509.Certificate]:
    """PEM (one or more certificates) or DER (one, as Certify returns it)."""
    if b"-----BEGIN" in data:
        return pki.load_certificates(data, what=str(path))
    try:
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise errors.ConfigError(f"{path} holds no PEM or DER certificate") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _verify_ca_chain(
    chain: list[x509.Certificate], anchors: list[x509.Certificate], now: datetime.datetime
) -> None:
    """An issuer chain (no leaf): each certificate signed by the next, the last by an anchor."""
    for cert in chain:
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise errors.UntrustedChain(f"{cert.subject.rfc4514_string()} is not valid now")
    for child, parent in itertools.pairwise(chain):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise errors.UntrustedChain(
                f"{child.subject.rfc4514_string()} is not signed by the next certificate"
            ) from exc
    for anchor in anchors:
        try:
            chain[-1].verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise errors.UntrustedChain("the last certificate is not signed by any of the anchors")


def _pod_chain(namespace: str, pod: str, admin_port: int) -> bytes:
    """The chain a pod's proxy presents, from its admin server's ``/identity?format=pem``."""
    from kubernetes import client, config
    from kubernetes.client import exceptions

    config.load_kube_config()  # type: ignore[no-untyped-call]
    try:
        found = client.CoreV1Api().read_namespaced_pod(pod, namespace)
    except exceptions.ApiException as exc:
        if exc.status == 404:
            raise errors.ConfigError(f"there is no pod {pod} in namespace {namespace}") from exc
        raise errors.ConfigError(f"reading pod {namespace}/{pod}: {exc.reason}") from exc
    ip = found.status.pod_ip if found.status else None
    if not ip:
        raise errors.ConfigError(f"pod {namespace}/{pod} has no IP yet: is it running?")
    host = f"[{ip}]" if ":" in ip else ip
    url = f"http://{host}:{admin_port}/identity?format=pem"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as exc:
        raise errors.ConfigError(
            f"the proxy of pod {namespace}/{pod} holds no certificate ({url} answered "
            f"{exc.code}): is its identity service reachable?"
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise errors.ConfigError(
            f"can not reach the proxy of pod {namespace}/{pod} at {url} ({reason}): is it "
            "meshed, and is --admin-port its admin port?"
        ) from exc


def _cluster_anchors(namespace: str) -> bytes:
    from kubernetes import client, config
    from kubernetes.client import exceptions

    config.load_kube_config()  # type: ignore[no-untyped-call]
    try:
        roots = client.CoreV1Api().read_namespaced_config_map(TRUST_ROOTS, namespace)
    except exceptions.ApiException as exc:
        raise errors.ConfigError(
            f"can not read configmap/{TRUST_ROOTS} in namespace {namespace} ({exc.reason}): "
            "pass --anchors FILE or --identity-namespace"
        ) from exc
    bundle = (roots.data or {}).get(authority.ANCHORS, "")
    if not bundle:
        raise errors.ConfigError(f"configmap/{TRUST_ROOTS} holds no {authority.ANCHORS}")
    return str(bundle).encode()


def _inspect(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.pod is None):
        raise errors.ConfigError("inspect takes a FILE or --namespace N --pod P, not both")
    if args.pod is not None and args.namespace is None:
        raise errors.ConfigError("--pod needs --namespace")
    if args.pod is not None:
        source = f"pod {args.namespace}/{args.pod}"
        chain = _load_chain(_pod_chain(args.namespace, args.pod, args.admin_port), source)
        print(f"certificate presented by the proxy of {source}")
    else:
        chain = _load_chain(_read(args.file), args.file)
    now = datetime.datetime.now(datetime.UTC)
    for i, cert in enumerate(chain):
        role = "CA" if _is_ca(cert) else "leaf"
        print(f"[{i}] {role if i == 0 else 'intermediate'}")
        for line in _describe(cert, now):
            print(f"    {line}")
    if args.anchors is not None:
        where = str(args.anchors)
        anchors = pki.load_certificates(_read(args.anchors), what=where)
    elif args.pod is not None:
        where = f"configmap/{TRUST_ROOTS} in namespace {args.identity_namespace}"
        anchors = pki.load_certificates(_cluster_anchors(args.identity_namespace), what=where)
    else:
        print("chain: not verified (pass --anchors FILE to check it against trust anchors)")
        return 0
    try:
        if _is_ca(chain[0]):
            _verify_ca_chain(chain, anchors, now)
        else:
            pki.verify_chain(chain[0], chain[1:], anchors, now=now)
    except errors.UntrustedChain as exc:
        print(f"chain: does NOT verify against {where}: {exc}")
        return 2
    print(f"chain: verifies against {where} ({len(anchors)} anchor(s))")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    import time

    from kubernetes import client, config
    from kubernetes.client import exceptions

    from meshward.identity import trustdomain

    config.load_kube_config()  # type: ignore[no-untyped-call]
    api: typing.Any = client.CustomObjectsApi()
    where = (trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL)
    item: dict[str, typing.Any]
    try:
        if args.name:
            item = api.get_cluster_custom_object(*where, args.name)
        else:
            listing: dict[str, typing.Any] = api.list_cluster_custom_object(*where)
            items = [
                i for i in listing.get("items", []) if not i["metadata"].get("deletionTimestamp")
            ]
            if not items:
                raise errors.ConfigError(
                    "there is no TrustDomain: apply one (samples/trustdomain.yaml) first"
                )
            item = min(
                items,
                key=lambda i: (i["metadata"].get("creationTimestamp", ""), i["metadata"]["name"]),
            )
        name = item["metadata"]["name"]
        status = item.get("status") or {}
        before = (status.get("anchor") or {}).get("serial")
        if status.get("phase") in {p.value for p in trustdomain.ROTATING}:
            print(f"trustdomain {name}: an anchor rotation is under way ({status['phase']})")
            request = status.get("rotationRequest")
        else:
            request = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            patch = {"metadata": {"annotations": {trustdomain.ROTATE_ANNOTATION: request}}}
            api.patch_cluster_custom_object(*where, name, patch)
            print(f"trustdomain {name}: anchor rotation requested ({request})")
    except exceptions.ApiException as exc:
        raise errors.ConfigError(f"can not reach the TrustDomain: {exc.reason}") from exc
    if not args.wait:
        print(f"follow it with: kubectl get trustdomain {name} -o wide -w")
        return 0
    deadline = time.monotonic() + args.timeout.total_seconds()
    shown = ""
    while time.monotonic() < deadline:
        current: dict[str, typing.Any] = api.get_cluster_custom_object(*where, name)
        status = current.get("status") or {}
        line = f"{status.get('phase')}: waiting for {status.get('waitingFor')}"
        if line != shown:
            print(line)
            shown = line
        handled = status.get("rotationRequest") == request
        can_not = [
            c.get("message", "")
            for c in status.get("conditions") or ()
            if c.get("type") == "AnchorExpiring" and c.get("reason") == "CanNotRotate"
        ]
        if handled and can_not and not status.get("nextAnchor"):
            raise errors.ConfigError(f"the anchor was not rotated: {can_not[0]}")
        serial = (status.get("anchor") or {}).get("serial")
        if (
            handled
            and status.get("phase") == trustdomain.Phase.READY.value
            and not status.get("nextAnchor")
            and serial != before
        ):
            print(f"anchor rotation complete: anchor {serial} (was {before})")
            return 0
        if status.get("phase") == trustdomain.Phase.INVALID.value:
            return 1
        time.sleep(1.0)
    raise errors.ConfigError(
        f"the rotation did not finish within {args.timeout}; it goes on: see kubectl get "
        f"trustdomain {name} -o yaml"
    )


def _serve(args: argparse.Namespace) -> int:
    from meshward.identity import server

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Only our own loggers go to debug: the API client's debug log prints request bodies, and a
    # TokenReview's body is the token.
    logging.getLogger("meshward").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    own = pki.Identity("meshward", "meshward-identity", args.trust_domain)
    names = tuple(args.server_name or ("localhost", own.dns_name))
    settings = server.Settings(
        trust_domain=args.trust_domain,
        issuer_dir=args.issuer_dir,
        anchors_file=args.trust_anchors,
        address=args.addr,
        admin_address=args.admin_addr,
        server_names=names,
        lifetime=args.lifetime,
    )
    asyncio.run(server.serve(settings))
    return 0
