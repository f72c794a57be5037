"""``meshward policy explain``: the decision a proxy would make, and the rule behind it.

Reads the namespace's compiled document and the pod from the live cluster, then calls the same
pure :func:`meshward.policy.decision.decide` the proxies use. Exit status: 0 allowed, 2 denied,
1 when the question can not be answered (no document, no such pod or port).
"""

from __future__ import annotations

import argparse
import ipaddress

from meshward import errors
from meshward.policy import compiled, decision, resources, workload

EXIT_ALLOWED, EXIT_DENIED = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--namespace", "-n", required=True)
    parser.add_argument("--pod", required=True, help="destination pod name")
    parser.add_argument(
        "--port", required=True, help="destination port: number or container port name"
    )
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--identity", help="client mesh identity (SPIFFE ID or identity name)")
    who.add_argument(
        "--unauthenticated", action="store_true", help="a plaintext client (the default)"
    )
    who.add_argument("--tls", action="store_true", help="a TLS client without a mesh identity")
    parser.add_argument(
        "--source-ip",
        help="client address (default: the first address of the cluster networks, else 127.0.0.1)",
    )
    parser.add_argument("--method", help="HTTP method, for a request on an HTTP port")
    parser.add_argument("--path", help="HTTP path, for a request on an HTTP port")
    parser.add_argument("--kubeconfig", help="default: $KUBECONFIG or ~/.kube/config")


def _load(args: argparse.Namespace) -> tuple[compiled.PolicyDocument, workload.Pod | None]:
    import urllib3
    from kubernetes import client, config
    from kubernetes.client import exceptions

    try:
        config.load_kube_config(config_file=args.kubeconfig)  # type: ignore[no-untyped-call]
    except (config.ConfigException, OSError) as exc:
        raise errors.ConfigError(f"can not load a kubeconfig: {exc}") from exc
    api = client.ApiClient()
    core = client.CoreV1Api(api)
    try:
        try:
            cm = core.read_namespaced_config_map(compiled.CONFIGMAP_NAME, args.namespace)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                raise errors.PolicyNotFound(
                    f"namespace {args.namespace} has no {compiled.CONFIGMAP_NAME} ConfigMap: "
                    "is the operator running, and does the namespace exist?"
                ) from exc
            raise errors.PolicyError(f"reading {compiled.CONFIGMAP_NAME}: {exc.reason}") from exc
        text = (cm.data or {}).get(compiled.CONFIGMAP_KEY, "")
        document = compiled.PolicyDocument.from_json(text)
        pod = None
        try:
            raw = core.read_namespaced_pod(args.pod, args.namespace)
        except exceptions.ApiException as exc:
            if exc.status != 404:
                raise errors.PolicyError(f"reading pod {args.pod}: {exc.reason}") from exc
        else:
            body = api.sanitize_for_serialization(raw)  # type: ignore[no-untyped-call]
            pod = workload.Pod.from_api(body)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        host = api.configuration.host
        raise errors.ClusterUnreachable(f"can not reach the API server at {host}: {exc}") from exc
    finally:
        api.close()  # type: ignore[no-untyped-call]
    return document, pod


def main(args: argparse.Namespace) -> int:
    document, pod = _load(args)
    known = document.pods.get(args.pod)
    if pod is None and known is None:
        raise errors.PodNotFound(f"pod {args.namespace}/{args.pod} not found")
    labels = dict(pod.labels if pod is not None else known.labels if known else {})
    ports = dict(pod.ports if pod is not None else known.ports if known else {})
    if args.port.isdigit():
        port = int(args.port)
    elif args.port in ports:
        port = ports[args.port]
    else:
        raise errors.PolicyError(
            f"pod {args.pod} has no container port named {args.port!r} "
            f"(named ports: {', '.join(sorted(ports)) or 'none'})"
        )
    source_ip = args.source_ip
    if source_ip is None and document.cluster_networks:
        first = ipaddress.ip_network(document.cluster_networks[0], strict=False)
        source_ip = str(next(first.hosts(), first.network_address))
    source_ip = source_ip or "127.0.0.1"
    request = None
    if args.method or args.path:
        request = decision.Request(method=(args.method or "GET").upper(), path=args.path or "/")
    client_info = decision.Client(
        identity=args.identity, source_ip=source_ip, tls=bool(args.identity or args.tls)
    )
    result = decision.decide(
        decision.Policy(document),
        decision.Destination(port=port, labels=labels, pod=args.pod),
        client_info,
        request,
    )
    who = (args.identity and f"{args.identity} (mTLS)") or (
        "TLS without identity" if args.tls else "plaintext client"
    )
    what = f" {request.method} {request.path}" if request else ""
    print(
        f"{'ALLOW' if result.allowed else 'DENY'}{' (audit)' if result.audit else ''}  "
        f"{args.namespace}/{args.pod}:{port}{what}  from {who} at {source_ip}"
    )
    server = (
        f"Server {result.server_name}"
        if result.server_kind == "Server"
        else f"no Server; default policy {result.server_name}"
    )
    print(f"  server:  {server}")
    print(f"  rule:    {result.rule_kind} {result.rule_name}")
    print(f"  mtls:    {resources.MTLSMode(result.mtls_mode).value}")
    print(f"  reason:  {result.reason}")
    print(f"  policy:  {document.hash}")
    return EXIT_ALLOWED if result.allowed else EXIT_DENIED
