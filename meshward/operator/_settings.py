"""Operator settings: environment variables first, so ``kopf run -m meshward.operator`` and
``meshward operator`` (whose flags set the same variables) behave the same."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import ipaddress
import os

from meshward import errors
from meshward.policy import compile as policy_compile
from meshward.policy import resources

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
}


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    policy: policy_compile.Settings
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 9443
    """0 turns the validating webhook off (the operator still validates and reports in status)."""
    webhook_cert_dir: str | None = None
    webhook_name: str = "validate.policy.meshward.io"
    excluded_namespaces: frozenset[str] = frozenset(
        {"kube-system", "kube-public", "kube-node-lease"}
    )
    """Names, or patterns with ``*`` (``team-*``), of namespaces the operator leaves alone."""

    def excludes(self, namespace: str) -> bool:
        return namespace in self.excluded_namespaces or any(
            "*" in pattern and fnmatch.fnmatchcase(namespace, pattern)
            for pattern in self.excluded_namespaces
        )


def _bad(var: str, value: str, expected: str) -> errors.ConfigError:
    return errors.ConfigError(f"{var}={value!r} is not valid: expected {expected}")


def from_env(env: dict[str, str] | None = None) -> OperatorSettings:
    """Read settings; a malformed value raises ConfigError naming the variable."""
    env = dict(os.environ if env is None else env)
    defaults = policy_compile.Settings()
    trust_domain = env.get(ENV["trust_domain"], defaults.trust_domain)
    if not trust_domain or not all(resources.is_dns_label(p) for p in trust_domain.split(".")):
        raise _bad(ENV["trust_domain"], trust_domain, "a lowercase DNS name such as cluster.local")
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
        webhook_name=env.get(ENV["webhook_name"], "validate.policy.meshward.io"),
        excluded_namespaces=excluded,
    )


def webhook_enabled() -> bool:
    """Whether the validating webhook is on; read when the handlers are registered."""
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
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch only these namespaces (default: all)",
    )
    parser.add_argument("-v", "--verbose", action="store_true")


def apply_arguments(args: argparse.Namespace) -> None:
    for field, var in ENV.items():
        value = getattr(args, field.replace("default_policy", "default_inbound_policy"), None)
        if value is not None:
            os.environ[var] = str(value)
