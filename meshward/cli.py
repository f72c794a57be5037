"""The ``meshward`` command: one entry point, a subcommand per component.

Every deliberate failure is a :class:`meshward.errors.MeshwardError`; it is printed as one line
(``meshward: error: ...``) with exit status 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Callable, Sequence

from meshward import errors

Handler = Callable[[argparse.Namespace], int]


def _dev_directory(args: argparse.Namespace) -> pathlib.Path:
    from meshward import devcluster

    return pathlib.Path(args.dir) if args.dir else devcluster.default_directory(args.name)


def _dev_up(args: argparse.Namespace) -> int:
    from meshward import devcluster

    directory = _dev_directory(args)
    cluster = devcluster.up(
        directory, apiserver_port=args.port, controller_manager=not args.no_controller_manager
    )
    print(f"control plane ready at {cluster.server} (state in {directory})")
    print(f"export KUBECONFIG={cluster.kubeconfig}")
    return 0


def _dev_build(args: argparse.Namespace) -> int:
    from meshward import devcluster

    binaries = devcluster.ensure()
    print(f"kube-apiserver  {binaries.apiserver}")
    print(f"etcd            {binaries.etcd}")
    if binaries.controller_manager:
        print(f"controller-mgr  {binaries.controller_manager}")
    return 0


def _dev_status(args: argparse.Namespace) -> int:
    from meshward import devcluster

    directory = _dev_directory(args)
    cluster = devcluster.load(directory)
    if cluster is None:
        print(f"no control plane in {directory}")
        return 1
    ready = cluster.ready()
    print(f"server      {cluster.server}  ({'ready' if ready else 'NOT READY'})")
    print(f"kubeconfig  {cluster.kubeconfig}")
    for name, alive in cluster.alive().items():
        print(f"{name:<24} pid {cluster.pids[name]:<8} {'running' if alive else 'STOPPED'}")
    return 0 if ready else 1


def _dev_down(args: argparse.Namespace) -> int:
    from meshward import devcluster

    directory = _dev_directory(args)
    if devcluster.down(directory):
        print(f"stopped and removed {directory}")
    else:
        print(f"no control plane in {directory}")
    return 0


def _operator(args: argparse.Namespace) -> int:
    from meshward.operator import _run

    return _run.run(args)


def _proxy(args: argparse.Namespace) -> int:
    from meshward.proxy import run

    return run.main(["--verbose"] if args.verbose else [])


def _proxy_init(args: argparse.Namespace) -> int:
    from meshward.proxy import proxy_init

    return proxy_init.main(args)


def _inject(args: argparse.Namespace) -> int:
    import datetime

    import yaml

    from meshward import inject
    from meshward.operator import _settings

    settings = _settings.injector_from_arguments(args)
    source = "standard input" if args.filename == "-" else args.filename
    try:
        text = sys.stdin.read() if args.filename == "-" else pathlib.Path(args.filename).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise errors.InjectionError(f"can not read {source}: {reason}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "unreadable"
        raise errors.InjectionError(
            f"{source} is not valid YAML{where}: {problem}; fix the file"
        ) from None
    if not documents:
        raise errors.InjectionError(f"{source} holds no Kubernetes objects")
    at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    output, reports = [], []
    for i, document in enumerate(documents, start=1):
        injected, more = inject.inject_object(document, settings, at, f"document {i}")
        output.append(injected)
        reports += more
    sys.stdout.write(yaml.safe_dump_all(output, sort_keys=False))
    for report in reports:
        print(report, file=sys.stderr)
    return 0


def _policy_explain(args: argparse.Namespace) -> int:
    from meshward import explain

    return explain.main(args)


def _demo(args: argparse.Namespace) -> int:
    from meshward.demo import _run

    return _run.run(args)


def _add_data_plane(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The commands every meshed pod runs: they import nothing of the control plane."""
    proxy = sub.add_parser(
        "proxy",
        help="run the sidecar proxy (configured by MESHWARD_PROXY_* variables)",
        description="Run the sidecar proxy. Its settings come from MESHWARD_PROXY_* environment "
        "variables, listed in meshward/proxy/settings.py; a missing or malformed one stops it "
        "at start with a message naming the variable.",
    )
    proxy.add_argument("--verbose", action="store_true", help="debug logs from meshward")
    proxy.set_defaults(func=_proxy)

    proxy_init = sub.add_parser(
        "proxy-init",
        help="install the iptables rules that send a pod's TCP traffic through its proxy",
        description="Install, in the current network namespace, the nat rules that redirect "
        "inbound and outbound TCP to the proxy, exempting the proxy's own UID, loopback, the "
        "admin port and the skipped ports. Idempotent; needs root (CAP_NET_ADMIN).",
    )
    from meshward.proxy import proxy_init as proxy_init_module

    proxy_init_module.add_arguments(proxy_init)
    proxy_init.set_defaults(func=_proxy_init)


def build_parser(only_data_plane: bool = False) -> argparse.ArgumentParser:
    """The whole command line; with ``only_data_plane``, just ``proxy`` and ``proxy-init``."""
    parser = argparse.ArgumentParser(
        prog="meshward", description="Service-mesh identity and authorization for Kubernetes."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if only_data_plane:
        _add_data_plane(sub)
        return parser

    dev = sub.add_parser("dev", help="a real local control plane (etcd + kube-apiserver)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")
    build = dev_sub.add_parser(
        "build", help="find or build the control plane binaries (cached per user)"
    )
    build.set_defaults(func=_dev_build)
    for name, fn, text in (
        ("up", _dev_up, "start a control plane on loopback and write its kubeconfig"),
        ("status", _dev_status, "show whether it runs and is ready"),
        ("down", _dev_down, "stop it and remove its state"),
    ):
        p = dev_sub.add_parser(name, help=text, description=text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--name", default="default", help="several can run side by side")
        where.add_argument("--dir", help="state directory (default: per-user state dir + name)")
        if name == "up":
            p.add_argument("--port", type=int, help="kube-apiserver port (default: a free one)")
            p.add_argument(
                "--no-controller-manager",
                action="store_true",
                help="skip kube-controller-manager (no default ServiceAccounts, no namespace GC)",
            )
        p.set_defaults(func=fn)

    op = sub.add_parser("operator", help="run the operator (same as kopf run -m meshward.operator)")
    from meshward.operator import _settings

    _settings.add_arguments(op)
    op.set_defaults(func=_operator)

    identity = sub.add_parser("identity", help="the identity service and its trust material")
    from meshward.identity import commands as identity_commands

    identity_commands.add_arguments(identity)

    _add_data_plane(sub)

    injector = sub.add_parser(
        "inject",
        help="add the meshward proxy to the pods of Kubernetes manifests (written to stdout)",
        description="Read manifests (one or many YAML documents, List kinds included), add the "
        "meshward proxy to the pod templates of Pods, Deployments, StatefulSets, DaemonSets, "
        "ReplicaSets, Jobs and CronJobs, and write them to standard output; standard error "
        "says for each object whether it was injected, or why not. A template annotated "
        "meshward.io/inject: disabled, a hostNetwork pod and an injected pod are left as they "
        "are. Settings come from the flags, else the MESHWARD_INJECT_* variables the operator "
        "reads, so both inject the same proxy.",
    )
    injector.add_argument(
        "-f", "--filename", required=True, metavar="FILE", help="manifest file, or - for stdin"
    )
    injector.add_argument("--trust-domain", help="mesh trust domain [MESHWARD_TRUST_DOMAIN]")
    _settings.add_injector_arguments(injector)
    injector.set_defaults(func=_inject)

    policy = sub.add_parser("policy", help="inspect and serve compiled policy")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    explain = policy_sub.add_parser(
        "explain", help="show whether a client may reach a pod's port, and the deciding rule"
    )
    from meshward import explain as explain_module

    explain_module.add_arguments(explain)
    explain.set_defaults(func=_policy_explain)
    serve = policy_sub.add_parser(
        "serve",
        help="run the policy server: proxies watch their namespace's policy over mutual TLS",
    )
    from meshward.policyserver import commands as policy_commands

    policy_commands.add_arguments(serve)

    demo = sub.add_parser(
        "demo",
        help="the namespace-jail lockdown on an embedded control plane, before and after",
        description="Start a local control plane, the operator, the identity service and the "
        "policy server, an emojivoto-like app in namespace emojivoto and an outsider in another, "
        "all meshed; call between them, apply samples/namespace-jail-server-authorization.yaml "
        "with kubectl, call again, and print each call's expected and observed outcome and the "
        "deciding rule. Exit status 0 when every call did what was expected. Everything it "
        "starts is stopped and removed when it ends, also on Ctrl-C.",
    )
    from meshward import demo as demo_command

    demo_command.add_arguments(demo)
    demo.set_defaults(func=_demo)

    from meshward import check, install

    install.add_install_arguments(
        sub.add_parser(
            "install",
            help="render the control plane's manifests (pipe to kubectl apply -f -)",
            description="Render CRDs, namespace, ServiceAccounts, least-privilege RBAC, the "
            "operator, identity service and policy server, their Services, the webhook "
            "configurations and the trust material, in apply order, for one kubectl apply "
            "(the operator then creates the TrustDomain).",
        )
    )
    install.add_uninstall_arguments(
        sub.add_parser(
            "uninstall",
            help="render what removes the control plane "
            "(pipe to kubectl delete --ignore-not-found -f -)",
            description="Render the control plane's objects for kubectl delete; standard error "
            "says what is kept (the CRDs unless --crds, ConfigMaps in your namespaces).",
        )
    )
    check.add_arguments(
        sub.add_parser(
            "check",
            help="verify an install: CRDs, API, webhooks, trust material, identity service",
            description="Run each check and print it with a mark ([ok], [warn], [FAIL], "
            "[skip]) and, unless it passed, a hint saying what to do. Exit status 0 when "
            "every check passed, 1 otherwise (a warning included).",
        )
    )
    return parser


DATA_PLANE = frozenset({"proxy", "proxy-init"})
"""Commands run in every meshed pod. Their parser is built alone: the full one imports the
operator's and the installer's libraries (kopf, the Kubernetes client, aiohttp), which would
add about 60 MB to each proxy's resident memory."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(only_data_plane=bool(argv) and argv[0] in DATA_PLANE)
    args = parser.parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except errors.MeshwardError as exc:
        print(f"meshward: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
