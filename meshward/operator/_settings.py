"""Operator settings: environment variables first, so ``kopf run -m meshward.operator`` and
``meshward operator`` (whose flags set the same variables) behave the same.

The injector's settings (``MESHWARD_INJECT_*``) are also what ``meshward inject`` reads, so the
webhook and the offline command inject the same proxy.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import ipaddress
import os
import re

from meshward import errors, inject
from meshward.policy import compile as policy_compile
from meshward.policy import resources
from meshward.proxy import interception

ENV = {
    "trust_domain": "MESHWARD_TRUST_DOMAIN",
    "cluster_networks": "MESHWARD_CLUSTER_NETWORKS",
    "default_policy": "MESHWARD_DEFAULT_INBOUND_POLICY",
    "root_namespace": "MESHWARD_ROOT_NAMESPACE",
    "webhook_host": "MESHWARD_WEBHOOK_HOST",
    "webhook_port": "MESHWARD_WEBHOOK_PORT",
    "webhook_cert_dir": "MESHWARD_WEBHOOK_CERT_DIR",
    "webhook_name": "MESHWARD_WEBHOOK_NAME",
    "excluded_namespaces": "MESHWARD_EXCLUDED_NAMESPACES",
    "trust_domain_resource": "MESHWARD_TRUST_DOMAIN_RESOURCE",
}
INJECT_ENV = {
    "proxy_image": "MESHWARD_INJECT_PROXY_IMAGE",
    "proxy_uid": "MESHWARD_INJECT_PROXY_UID",
    "identity_svc_addr": "MESHWARD_INJECT_IDENTITY_SVC_ADDR",
    "identity_svc_name": "MESHWARD_INJECT_IDENTITY_SVC_NAME",
    "policy_svc_addr": "MESHWARD_INJECT_POLICY_SVC_ADDR",
    "policy_svc_name": "MESHWARD_INJECT_POLICY_SVC_NAME",
    "proxy_cpu_request": "MESHWARD_INJECT_PROXY_CPU_REQUEST",
    "proxy_memory_request": "MESHWARD_INJECT_PROXY_MEMORY_REQUEST",
    "proxy_memory_limit": "MESHWARD_INJECT_PROXY_MEMORY_LIMIT",
    "skip_inbound_ports": "MESHWARD_INJECT_SKIP_INBOUND_PORTS",
    "skip_outbound_ports": "MESHWARD_INJECT_SKIP_OUTBOUND_PORTS",
}
"""The injector's settings; each also has a flag named after its key (``--proxy-image``)."""
INJECT_HELP = {
    "proxy_image": "image of the proxy and init containers (default ghcr.io/meshward/meshward:"
    "<meshward version>)",
    "proxy_uid": "UID the proxy runs as; its traffic is not redirected (default 2102)",
    "identity_svc_addr": "identity service host:port (default meshward-identity.meshward.svc:8080)",
    "identity_svc_name": "name in the identity service's certificate (default its mesh identity)",
    "policy_svc_addr": "policy service host:port (default meshward-policy.meshward.svc:8090)",
    "policy_svc_name": "name in the policy service's certificate (default its mesh identity)",
    "proxy_cpu_request": "the proxy's CPU request (default 100m)",
    "proxy_memory_request": "the proxy's memory request (default 64Mi)",
    "proxy_memory_limit": "the proxy's memory limit (default 256Mi)",
    "skip_inbound_ports": "comma-separated inbound ports not redirected to the proxy",
    "skip_outbound_ports": "comma-separated outbound ports not redirected to the proxy",
}
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_ADDRESS = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?:[0-9]{1,5}")


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    policy: policy_compile.Settings
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 9443
    """0 turns the admission webhooks off: no injection, and policy resources are validated only
    by the operator, which reports in status."""
    webhook_cert_dir: str | None = None
    webhook_name: str = "operator.meshward.io"
    excluded_namespaces: frozenset[str] = frozenset(
        {"kube-system", "kube-public", "kube-node-lease"}
    )
    """Names, or patterns with ``*`` (``team-*``), of namespaces the operator leaves alone."""
    trust_domain_resource: str | None = None
    """When set, the name of a TrustDomain the operator creates (for the mesh's trust domain,
    with default lifetimes) while none exists: what ``meshward install`` asks for, so that one
    ``kubectl apply`` suffices (kubectl can not create a custom resource in the run that creates
    its CRD)."""
    injector: inject.Settings = dataclasses.field(
        default_factory=lambda: inject.Settings.defaults("cluster.local", inject.package_version())
    )

    def excludes(self, namespace: str) -> bool:
        return namespace in self.excluded_namespaces or any(
            "*" in pattern and fnmatch.fnmatchcase(namespace, pattern)
            for pattern in self.excluded_namespaces
        )

    def injects_into(self, namespace: str) -> bool:
        """Whether the injector may touch pods of ``namespace``: never the control plane's own
        (the root namespace) nor an excluded one."""
        return namespace != self.policy.root_namespace and not self.excludes(namespace)

    def injector_skipped_namespaces(self) -> frozenset[str]:
        """The exact names the webhook's namespaceSelector leaves out (patterns can not be
        expressed there; the webhook filters those itself)."""
        exact = {n for n in self.excluded_namespaces if "*" not in n}
        return frozenset({self.policy.root_namespace, *exact})


def _bad(var: str, value: str, expected: str) -> errors.ConfigError:
    return errors.ConfigError(f"{var}={value!r} is not valid: expected {expected}")


def _trust_domain(env: dict[str, str]) -> str:
    trust_domain = env.get(ENV["trust_domain"], policy_compile.Settings().trust_domain)
    if not trust_domain or not all(resources.is_dns_label(p) for p in trust_domain.split(".")):
        raise _bad(ENV["trust_domain"], trust_domain, "a lowercase DNS name such as cluster.local")
    return trust_domain


def _ports(var: str, raw: str) -> tuple[int, ...]:
    ports = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or not 0 < int(part) <= 65535:
            raise _bad(var, raw, "comma-separated port numbers (1-65535), e.g. 25,3306")
        ports.append(int(part))
    return tuple(sorted(set(ports)))


def injector_from_env(env: dict[str, str] | None = None) -> inject.Settings:
    """The injector's settings (``MESHWARD_INJECT_*`` and ``MESHWARD_TRUST_DOMAIN``); a
    malformed value raises ConfigError naming the variable."""
    env = dict(os.environ if env is None else env)
    defaults = inject.Settings.defaults(_trust_domain(env), inject.package_version())
    changes: dict[str, object] = {}

    def value(key: str) -> str | None:
        raw = env.get(INJECT_ENV[key], "").strip()
        return raw or None

    if (image := value("proxy_image")) is not None:
        if any(ch.isspace() for ch in image):
            raise _bad(INJECT_ENV["proxy_image"], image, "an image reference without spaces")
        changes["image"] = image
    if (uid := value("proxy_uid")) is not None:
        if not uid.isdigit() or not 0 < int(uid) < 2**31:
            raise _bad(INJECT_ENV["proxy_uid"], uid, "a UID other than 0 (root), e.g. 2102")
        changes["proxy_uid"] = int(uid)
    for key in ("identity_svc_addr", "policy_svc_addr"):
        if (addr := value(key)) is not None:
            port = addr.rpartition(":")[2]
            if not _ADDRESS.fullmatch(addr) or not 0 < int(port) <= 65535:
                raise _bad(
                    INJECT_ENV[key], addr, "host:port with a lowercase DNS name or IPv4 address"
                )
            changes[key] = addr
    for key in ("identity_svc_name", "policy_svc_name"):
        if (name := value(key)) is not None:
            if not all(resources.is_dns_label(p) for p in name.split(".")):
                raise _bad(INJECT_ENV[key], name, "a lowercase DNS name")
            changes[key] = name
    for key, field in (
        ("proxy_cpu_request", "cpu_request"),
        ("proxy_memory_request", "memory_request"),
        ("proxy_memory_limit", "memory_limit"),
    ):
        if (quantity := value(key)) is not None:
            if not _QUANTITY.fullmatch(quantity):
                raise _bad(INJECT_ENV[key], quantity, "a Kubernetes quantity such as 100m or 64Mi")
            changes[field] = quantity
    for key in ("skip_inbound_ports", "skip_outbound_ports"):
        if (raw := value(key)) is not None:
            changes[key] = _ports(INJECT_ENV[key], raw)
    settings = dataclasses.replace(defaults, **changes)  # type: ignore[arg-type]
    _check_interception(settings)
    return settings


def _check_interception(settings: inject.Settings) -> None:
    """Refuse settings whose ``meshward proxy-init`` invocation would fail in every pod."""

    def ranges(ports: tuple[int, ...]) -> tuple[interception.PortRange, ...]:
        return tuple(interception.PortRange(port, port) for port in ports)

    try:
        interception.Config(
            inbound_port=settings.inbound_port,
            outbound_port=settings.outbound_port,
            proxy_uid=settings.proxy_uid,
            admin_port=settings.admin_port,
            skip_inbound_ports=ranges(settings.skip_inbound_ports),
            skip_outbound_ports=ranges(settings.skip_outbound_ports),
        )
    except errors.ConfigError as exc:
        raise errors.ConfigError(
            f"{INJECT_ENV['skip_inbound_ports']} / {INJECT_ENV['skip_outbound_ports']}: the "
            f"init container of every injected pod would fail: {exc}"
        ) from exc


def from_env(env: dict[str, str] | None = None) -> OperatorSettings:
    """Read settings; a malformed value raises ConfigError naming the variable."""
    env = dict(os.environ if env is None else env)
    defaults = policy_compile.Settings()
    trust_domain = _trust_domain(env)
    networks = defaults.cluster_networks
    if ENV["cluster_networks"] in env:
        raw = env[ENV["cluster_networks"]]
        networks = tuple(n.strip() for n in raw.split(",") if n.strip())
        try:
            for n in networks:
                ipaddress.ip_network(n, strict=False)
        except ValueError as exc:
            raise _bad(ENV["cluster_networks"], raw, "comma-separated CIDRs") from exc
    default_raw = env.get(ENV["default_policy"], defaults.default_policy.value)
    try:
        default_policy = resources.DefaultPolicy(default_raw)
    except ValueError as exc:
        allowed = ", ".join(p.value for p in resources.DefaultPolicy)
        raise _bad(ENV["default_policy"], default_raw, f"one of {allowed}") from exc
    root = env.get(ENV["root_namespace"], defaults.root_namespace)
    if not resources.is_dns_label(root):
        raise _bad(ENV["root_namespace"], root, "a namespace name")
    port_raw = env.get(ENV["webhook_port"], "9443")
    if not port_raw.isdigit() or int(port_raw) > 65535:
        raise _bad(ENV["webhook_port"], port_raw, "a port number, or 0 to turn the webhook off")
    excluded = OperatorSettings.excluded_namespaces
    if ENV["excluded_namespaces"] in env:
        excluded = frozenset(
            n.strip() for n in env[ENV["excluded_namespaces"]].split(",") if n.strip()
        )
    resource = env.get(ENV["trust_domain_resource"], "").strip() or None
    if resource is not None and not re.fullmatch(resources.DNS_SUBDOMAIN, resource):
        raise _bad(ENV["trust_domain_resource"], resource, "a TrustDomain name (DNS subdomain)")
    return OperatorSettings(
        policy=policy_compile.Settings(
            trust_domain=trust_domain,
            cluster_networks=networks,
            default_policy=default_policy,
            root_namespace=root,
        ),
        webhook_host=env.get(ENV["webhook_host"], "127.0.0.1"),
        webhook_port=int(port_raw),
        webhook_cert_dir=env.get(ENV["webhook_cert_dir"]) or None,
        webhook_name=env.get(ENV["webhook_name"], OperatorSettings.webhook_name),
        excluded_namespaces=excluded,
        trust_domain_resource=resource,
        injector=injector_from_env(env),
    )


def webhook_enabled() -> bool:
    """Whether the admission webhooks (validation, injection) are on; read when the handlers
    are registered."""
    return os.environ.get(ENV["webhook_port"], "9443") != "0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for ``meshward operator``; each sets the environment variable of the same setting."""
    parser.add_argument("--trust-domain", help=f"mesh trust domain [{ENV['trust_domain']}]")
    parser.add_argument(
        "--cluster-networks", help=f"comma-separated CIDRs [{ENV['cluster_networks']}]"
    )
    parser.add_argument(
        "--default-inbound-policy",
        choices=[p.value for p in resources.DefaultPolicy],
        help=f"cluster-wide default [{ENV['default_policy']}]",
    )
    parser.add_argument(
        "--root-namespace", help=f"mesh-wide policy namespace [{ENV['root_namespace']}]"
    )
    parser.add_argument(
        "--webhook-host", help=f"address the API server calls [{ENV['webhook_host']}]"
    )
    parser.add_argument("--webhook-port", help=f"0 turns it off [{ENV['webhook_port']}]")
    parser.add_argument("--webhook-cert-dir", help=f"[{ENV['webhook_cert_dir']}]")
    add_injector_arguments(parser)
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (default: all)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def add_injector_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for the injected proxy (``meshward operator`` and ``meshward inject``)."""
    group = parser.add_argument_group("injected proxy")
    for key, var in INJECT_ENV.items():
        group.add_argument(f"--{key.replace('_', '-')}", help=f"{INJECT_HELP[key]} [{var}]")


def injector_from_arguments(args: argparse.Namespace) -> inject.Settings:
    """The injector's settings: the environment, overridden by the flags that were given."""
    env = dict(os.environ)
    for key, var in {**INJECT_ENV, "trust_domain": ENV["trust_domain"]}.items():
        value = getattr(args, key, None)
        if value is not None:
            env[var] = str(value)
    return injector_from_env(env)


def apply_arguments(args: argparse.Namespace) -> None:
    for field, var in INJECT_ENV.items():
        value = getattr(args, field, None)
        if value is not None:
            os.environ[var] = str(value)
    for field, var in ENV.items():
        value = getattr(args, field.replace("default_policy", "default_inbound_policy"), None)
        if value is not None:
            os.environ[var] = str(value)
