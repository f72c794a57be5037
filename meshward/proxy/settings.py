"""The proxy's settings, from environment variables named after Linkerd's ``LINKERD2_PROXY_*``.

    MESHWARD_PROXY_IDENTITY_DIR            existing directory the proxy writes its key (key.p8) to
    MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS_FILE
                                           the mounted trust bundle (the meshward-identity-
                                           trust-roots ConfigMap's ca-bundle.crt), followed
                                           as it changes; or instead, fixed for the run:
    MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS  PEM text (not a path) of one or more trust anchors
    MESHWARD_PROXY_IDENTITY_TOKEN_FILE     projected ServiceAccount token, re-read at each renewal
    MESHWARD_PROXY_IDENTITY_LOCAL_NAME     <sa>.<ns>.serviceaccount.identity.meshward.<td>
    MESHWARD_PROXY_IDENTITY_SVC_ADDR       identity service host:port
    MESHWARD_PROXY_IDENTITY_SVC_NAME       DNS name the identity service's certificate carries
    MESHWARD_PROXY_IDENTITY_RENEW_JITTER   the longest random delay, in seconds, before an
                                           early renewal the trust-roots ConfigMap asks for
                                           (renew-leaves-before), default 5
    MESHWARD_PROXY_INBOUND_LISTEN_ADDR     inbound listener, default 0.0.0.0:4143
    MESHWARD_PROXY_OUTBOUND_LISTEN_ADDR    outbound listener, default 127.0.0.1:4140
    MESHWARD_PROXY_ADMIN_LISTEN_ADDR       admin listener (metrics, probes), default 0.0.0.0:4191
    MESHWARD_PROXY_POLICY_FILE             the compiled policy document (the mounted
                                           meshward-policy ConfigMap's file), or instead:
    MESHWARD_PROXY_POLICY_SVC_ADDR         the policy service's host:port, and
    MESHWARD_PROXY_POLICY_SVC_NAME         the DNS name its certificate carries (in
                                           transparent mode it also answers destination
                                           lookups: see below)
    MESHWARD_PROXY_REPORT_INTERVAL         with the policy service: seconds between the
                                           heartbeats reporting the proxy's trust state to it
                                           (default 30; the server forgets a proxy after 90 s,
                                           so change it only in tests)
    MESHWARD_PROXY_POD_NAME                the pod's name: the policy document lists pods by
                                           name, with the labels Servers select them by
    MESHWARD_PROXY_LOCAL_INBOUND           local mode: LISTEN_PORT=APP_PORT[@POD_PORT][,...]
    MESHWARD_PROXY_LOCAL_OUTBOUND          local mode: LISTEN_PORT=[IDENTITY@]HOST:PORT[,...]
    MESHWARD_PROXY_OUTBOUND_MESH_NETWORKS  transparent mode: CIDRs whose destinations get mTLS,
                                           default the private ranges (10/8, 100.64/10,
                                           172.16/12, 192.168/16, fd00::/8)

The identity variables are required (exactly one of the two trust anchor variables), the pod's
name, and one policy source: a file, or the service's address and name. The trust bundle must
hold only CA certificates, not all expired (:func:`meshward.trustbundle.load`); from a file, the
proxy watches it and the ``renew-leaves-before`` file beside it (:mod:`meshward.proxy.trust_roots`).
Local mode (no pods, no interception) maps ports explicitly: each inbound entry listens on the
inbound listener's host at LISTEN_PORT, forwards allowed connections to 127.0.0.1:APP_PORT, and
is decided as a connection to APP_PORT; each outbound entry takes plaintext on the outbound
listener's host at LISTEN_PORT and speaks mTLS to HOST:PORT, which must prove IDENTITY (the DNS
form, <sa>.<ns>.serviceaccount.identity.meshward.<td>) when one is given.
Transparent mode (no LOCAL_* entries: ``meshward proxy-init`` redirects the pod's TCP) takes
every redirected connection on the inbound and outbound listeners, reads its original
destination, and passes destinations outside the mesh networks through in plaintext. For one
inside them, a proxy that follows the policy service asks it (destination discovery,
:mod:`meshward.proxy.discovery`) whether the address and port are meshed: if so the connection
goes over mTLS and the peer must prove one of the identities named, if not it goes in
plaintext; when no answer comes within a second (the service unreachable or not yet synced),
it goes over mTLS to any mesh identity, never in plaintext on a guess. With a policy file
there is no discovery: every destination in the mesh networks gets mTLS to any mesh identity.

A variable set to an empty (or blank) value counts as unset.
:func:`from_env` checks every variable and raises one :class:`~meshward.errors.ConfigError`
listing every problem, each naming its variable and what a valid value looks like, so a person
fixes them in one go. The token file's contents are never read here, let alone reported.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Protocol, TypeVar

from meshward import trustbundle
from meshward.errors import ConfigError, IdentityError
from meshward.identity import pki
from meshward.proxy import networks

IDENTITY_DIR = "MESHWARD_PROXY_IDENTITY_DIR"
TRUST_ANCHORS = "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS"
TRUST_ANCHORS_FILE = "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS_FILE"
RENEW_JITTER = "MESHWARD_PROXY_IDENTITY_RENEW_JITTER"
TOKEN_FILE = "MESHWARD_PROXY_IDENTITY_TOKEN_FILE"
LOCAL_NAME = "MESHWARD_PROXY_IDENTITY_LOCAL_NAME"
IDENTITY_SVC_ADDR = "MESHWARD_PROXY_IDENTITY_SVC_ADDR"
IDENTITY_SVC_NAME = "MESHWARD_PROXY_IDENTITY_SVC_NAME"
INBOUND_LISTEN_ADDR = "MESHWARD_PROXY_INBOUND_LISTEN_ADDR"
OUTBOUND_LISTEN_ADDR = "MESHWARD_PROXY_OUTBOUND_LISTEN_ADDR"
ADMIN_LISTEN_ADDR = "MESHWARD_PROXY_ADMIN_LISTEN_ADDR"
POLICY_FILE = "MESHWARD_PROXY_POLICY_FILE"
POLICY_SVC_ADDR = "MESHWARD_PROXY_POLICY_SVC_ADDR"
POLICY_SVC_NAME = "MESHWARD_PROXY_POLICY_SVC_NAME"
REPORT_INTERVAL = "MESHWARD_PROXY_REPORT_INTERVAL"
POD_NAME = "MESHWARD_PROXY_POD_NAME"
LOCAL_INBOUND = "MESHWARD_PROXY_LOCAL_INBOUND"
LOCAL_OUTBOUND = "MESHWARD_PROXY_LOCAL_OUTBOUND"
MESH_NETWORKS = "MESHWARD_PROXY_OUTBOUND_MESH_NETWORKS"

EXAMPLES = {
    IDENTITY_DIR: "/var/run/meshward/identity/end-entity",
    TRUST_ANCHORS: "-----BEGIN CERTIFICATE-----\\n...\\n-----END CERTIFICATE-----",
    TRUST_ANCHORS_FILE: "/var/run/meshward/trust-roots/ca-bundle.crt",
    RENEW_JITTER: "5",
    TOKEN_FILE: "/var/run/secrets/tokens/meshward-identity-token",
    LOCAL_NAME: "web.emojivoto.serviceaccount.identity.meshward.cluster.local",
    IDENTITY_SVC_ADDR: "meshward-identity.meshward.svc:8080",
    IDENTITY_SVC_NAME: "meshward-identity.meshward.serviceaccount.identity.meshward.cluster.local",
    INBOUND_LISTEN_ADDR: "0.0.0.0:4143",
    OUTBOUND_LISTEN_ADDR: "127.0.0.1:4140",
    ADMIN_LISTEN_ADDR: "0.0.0.0:4191",
    POLICY_FILE: "/var/run/meshward/policy/policy.json",
    POLICY_SVC_ADDR: "meshward-policy.meshward.svc:8090",
    POLICY_SVC_NAME: "meshward-policy.meshward.serviceaccount.identity.meshward.cluster.local",
    REPORT_INTERVAL: "30",
    POD_NAME: "web-5d8f7c9b4-x2x7q",
    LOCAL_INBOUND: "4143=8080,4144=9090",
    LOCAL_OUTBOUND: "4140=web.emojivoto.serviceaccount.identity.meshward.cluster.local"
    "@127.0.0.1:5143",
    MESH_NETWORKS: "10.0.0.0/8,fd00::/8",
}
"""A valid value of each variable, as quoted in error messages."""

_IDENTITY_INFIX = f".{pki.IDENTITY_INFIX}."
_MAX_SHOWN = 80
_MAX_DNS_NAME = 253
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
# A JWS in compact form: its header is base64url JSON, so it starts with "eyJ" ('{"').
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_WILDCARDS = frozenset({"0.0.0.0", "::"})
DEFAULT_RENEW_JITTER = 5.0
MAX_RENEW_JITTER = 300.0
DEFAULT_REPORT_INTERVAL = 30.0
MIN_REPORT_INTERVAL, MAX_REPORT_INTERVAL = 0.1, 300.0

_T = TypeVar("_T")


class _Read(Protocol):
    def __call__(self, var: str, check: Callable[[str], _T]) -> _T | None: ...


@dataclasses.dataclass(frozen=True)
class Address:
    """A socket address; ``host`` is a host name or IP address, IPv6 without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, listen: bool = True) -> Address:
        """``host:port``, ``[ipv6]:port``, or for a listener (``listen``) ``:port``, which
        means every IPv4 interface (``0.0.0.0``).

        The host is an IPv4 address, a bracketed IPv6 address, or a host name (letters, digits
        and '-' in dot-separated labels, optionally ending in '.'); the port is 1-65535.
        Raises :class:`ConfigError` saying what is wrong.
        """
        try:
            return _address(text, listen=listen)
        except _Invalid as e:
            raise ConfigError(f"address {text!r} {e}") from None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class LocalInbound:
    """Local mode: connections to ``listen`` go to the application on ``app_port``, and policy
    decides them as connections to ``pod_port`` (the port the application has in its pod, when
    several applications share one host and can not all bind it)."""

    listen: Address
    app_port: int
    pod_port: int | None = None

    @property
    def policy_port(self) -> int:
        return self.pod_port or self.app_port


@dataclasses.dataclass(frozen=True)
class LocalOutbound:
    """Local mode: plaintext on ``listen`` goes out as mTLS to ``peer``, which must be
    ``identity`` (DNS form) when that is set."""

    listen: Address
    peer: Address
    identity: str | None


@dataclasses.dataclass(frozen=True)
class ProxySettings:
    """Everything the proxy reads from its environment, checked (see the module docstring)."""

    identity_dir: pathlib.Path
    trust_anchors: bytes
    """PEM text of the trust anchors at start (from the variable, or the file's contents then);
    a checked bundle (:func:`meshward.trustbundle.load`)."""
    token_file: pathlib.Path
    """Re-read at every renewal: projected tokens rotate."""
    local_name: str
    trust_domain: str
    """The part of ``local_name`` after ``.serviceaccount.identity.meshward.``."""
    identity_svc_addr: Address
    identity_svc_name: str
    inbound: Address = Address("0.0.0.0", 4143)
    outbound: Address = Address("127.0.0.1", 4140)
    admin: Address = Address("0.0.0.0", 4191)
    policy_file: pathlib.Path | None = None
    policy_svc_addr: Address | None = None
    policy_svc_name: str | None = None
    """With ``policy_svc_addr``; exactly one policy source is set."""
    pod_name: str | None = None
    """Always set from the environment; None only for identity-only uses of these settings,
    and a proxy without it denies every inbound connection."""
    local_inbound: tuple[LocalInbound, ...] = ()
    local_outbound: tuple[LocalOutbound, ...] = ()
    mesh_networks: tuple[networks.Network, ...] = networks.parse_mesh_networks("")
    """Transparent mode: where outbound connections go over mTLS."""
    trust_anchors_file: pathlib.Path | None = None
    """Where the trust bundle is mounted, followed as it changes; None: the anchors are fixed."""
    renew_jitter: float = DEFAULT_RENEW_JITTER
    """The longest random delay, in seconds, before an early renewal asked for by
    ``renew-leaves-before``, so that a namespace of proxies does not renew at one instant."""
    report_interval: float = DEFAULT_REPORT_INTERVAL
    """Seconds between heartbeats reporting the trust state to the policy service."""

    @property
    def transparent(self) -> bool:
        """No local-mode entries: connections arrive through the interception rules."""
        return not self.local_inbound and not self.local_outbound

    @property
    def namespace(self) -> str:
        """The workload's namespace, from its identity name."""
        return self.local_name.split(".")[1]


def from_env(env: Mapping[str, str] | None = None) -> ProxySettings:
    """The proxy's settings from ``env`` (default :data:`os.environ`).

    Raises one :class:`ConfigError` naming every missing or malformed variable.
    """
    env = os.environ if env is None else env
    problems: list[str] = []

    def read(var: str, check: Callable[[str], _T]) -> _T | None:
        """``check(value)``, or None after recording why the variable is unusable."""
        value = env.get(var, "")
        if not value.strip():
            problems.append(f"{var} is not set: set it to {_describe(var)}")
            return None
        try:
            return check(value)
        except _Invalid as e:
            problems.append(f"{var}{_shown(var, value)} {e}: set it to {_describe(var)}")
            return None
        except OSError:
            # e.g. a name too long to be a path (a pasted token?): the OS error would quote it.
            problems.append(
                f"{var}{_shown(var, value)} is not a usable path: set it to {_describe(var)}"
            )
            return None

    def listener(var: str, default: Address) -> Address | None:
        if not env.get(var, "").strip():
            return default
        return read(var, lambda value: _address(value, listen=True))

    identity_dir = read(IDENTITY_DIR, _identity_dir)
    trust_anchors, trust_anchors_file = _trust_source(env, read, problems)
    token_file = read(TOKEN_FILE, _token_file)
    identity = read(LOCAL_NAME, _local_name)
    svc_addr = read(IDENTITY_SVC_ADDR, lambda value: _address(value, listen=False))
    svc_name = read(IDENTITY_SVC_NAME, _svc_name)
    listeners = {
        INBOUND_LISTEN_ADDR: listener(INBOUND_LISTEN_ADDR, ProxySettings.inbound),
        OUTBOUND_LISTEN_ADDR: listener(OUTBOUND_LISTEN_ADDR, ProxySettings.outbound),
        ADMIN_LISTEN_ADDR: listener(ADMIN_LISTEN_ADDR, ProxySettings.admin),
    }
    policy_file, policy_svc_addr, policy_svc_name = _policy_source(env, read, problems)
    pod_name = read(POD_NAME, _pod_name)
    inbound_host = (listeners[INBOUND_LISTEN_ADDR] or ProxySettings.inbound).host
    outbound_host = (listeners[OUTBOUND_LISTEN_ADDR] or ProxySettings.outbound).host
    local_inbound: tuple[LocalInbound, ...] = ()
    local_outbound: tuple[LocalOutbound, ...] = ()
    if env.get(LOCAL_INBOUND, "").strip():
        local_inbound = read(LOCAL_INBOUND, lambda v: _local_inbound(v, inbound_host)) or ()
    if env.get(LOCAL_OUTBOUND, "").strip():
        local_outbound = read(LOCAL_OUTBOUND, lambda v: _local_outbound(v, outbound_host)) or ()
    mesh_networks = networks.parse_mesh_networks("")
    if env.get(MESH_NETWORKS, "").strip():
        mesh_networks = read(MESH_NETWORKS, _mesh_networks) or mesh_networks
    renew_jitter: float | None = DEFAULT_RENEW_JITTER
    if env.get(RENEW_JITTER, "").strip():
        renew_jitter = read(RENEW_JITTER, _renew_jitter)
    report_interval: float | None = DEFAULT_REPORT_INTERVAL
    if env.get(REPORT_INTERVAL, "").strip():
        report_interval = read(REPORT_INTERVAL, _report_interval)
    named = list(listeners.items())
    named += [(LOCAL_INBOUND, entry.listen) for entry in local_inbound]
    named += [(LOCAL_OUTBOUND, entry.listen) for entry in local_outbound]
    if local_inbound:  # the local entries stand in for the inbound listener
        named = [(var, a) for var, a in named if var != INBOUND_LISTEN_ADDR]
    if local_outbound:
        named = [(var, a) for var, a in named if var != OUTBOUND_LISTEN_ADDR]
    for (var_a, a), (var_b, b) in itertools.combinations(named, 2):
        if a is not None and b is not None and _overlap(a, b):
            where = var_a if var_a == var_b else f"{var_a} ({a}) and {var_b}"
            problems.append(
                f"{where} ({b}) would listen on the same port: give each listener its own port"
            )
    if problems:
        if len(problems) == 1:
            raise ConfigError(f"proxy configuration: {problems[0]}")
        listed = "".join(f"\n  - {problem}" for problem in problems)
        raise ConfigError(f"proxy configuration has {len(problems)} problems:{listed}")
    # Every value was recorded as a problem if it were None; the asserts tell mypy so.
    assert identity_dir is not None and trust_anchors is not None and token_file is not None
    assert identity is not None and svc_addr is not None and svc_name is not None
    inbound, outbound, admin = listeners.values()
    assert inbound is not None and outbound is not None and admin is not None
    assert renew_jitter is not None and report_interval is not None
    return ProxySettings(
        identity_dir=identity_dir,
        trust_anchors=trust_anchors,
        token_file=token_file,
        local_name=identity.dns_name,
        trust_domain=identity.trust_domain,
        identity_svc_addr=svc_addr,
        identity_svc_name=svc_name,
        inbound=inbound,
        outbound=outbound,
        admin=admin,
        policy_file=policy_file,
        policy_svc_addr=policy_svc_addr,
        policy_svc_name=policy_svc_name,
        pod_name=pod_name,
        local_inbound=local_inbound,
        local_outbound=local_outbound,
        mesh_networks=mesh_networks,
        trust_anchors_file=trust_anchors_file,
        renew_jitter=renew_jitter,
        report_interval=report_interval,
    )


def _trust_source(
    env: Mapping[str, str], read: _Read, problems: list[str]
) -> tuple[bytes | None, pathlib.Path | None]:
    """Exactly one of the trust anchor variables: the PEM (fixed) or the mounted file
    (followed). Returns the anchors' PEM and the file, if that is the source."""
    pem_given = bool(env.get(TRUST_ANCHORS, "").strip())
    file_given = bool(env.get(TRUST_ANCHORS_FILE, "").strip())
    if pem_given and file_given:
        problems.append(
            f"{TRUST_ANCHORS} and {TRUST_ANCHORS_FILE} are both set: unset one ("
            f"{TRUST_ANCHORS_FILE} follows the mounted ConfigMap as it changes, "
            f"{TRUST_ANCHORS} is fixed for the proxy's life)"
        )
        return None, None
    if not pem_given and not file_given:
        problems.append(
            f"{TRUST_ANCHORS_FILE} is not set: set it to {_describe(TRUST_ANCHORS_FILE)}, "
            f"or set {TRUST_ANCHORS} to {_describe(TRUST_ANCHORS)}"
        )
        return None, None
    if pem_given:
        return read(TRUST_ANCHORS, _trust_anchors), None
    found = read(TRUST_ANCHORS_FILE, _trust_anchors_file)
    if found is None:
        return None, None
    path, pem = found
    return pem, path


def _policy_source(
    env: Mapping[str, str],
    read: _Read,
    problems: list[str],
) -> tuple[pathlib.Path | None, Address | None, str | None]:
    """Exactly one policy source: the file, or the service's address and name together."""
    given = {
        var for var in (POLICY_FILE, POLICY_SVC_ADDR, POLICY_SVC_NAME) if env.get(var, "").strip()
    }
    if not given:
        problems.append(
            f"no policy source: set {POLICY_FILE} to {_describe(POLICY_FILE)}, or "
            f"{POLICY_SVC_ADDR} and {POLICY_SVC_NAME} to the policy service's address and name"
        )
        return None, None, None
    if POLICY_FILE in given and given - {POLICY_FILE}:
        problems.append(
            f"{POLICY_FILE} and {POLICY_SVC_ADDR}/{POLICY_SVC_NAME} are both set: "
            "choose one policy source"
        )
        return None, None, None
    if POLICY_FILE in given:
        return read(POLICY_FILE, _policy_file), None, None
    addr = read(POLICY_SVC_ADDR, lambda value: _address(value, listen=False))
    name = read(POLICY_SVC_NAME, _svc_name)
    return None, addr, name


# -- one check per variable ------------------------------------------------------------------
# Each returns the parsed value or raises _Invalid with the reason, which reads after
# "<VAR>='<value>'" in the message.


class _Invalid(Exception):
    """Why a value is unusable, as a predicate: "does not exist"; never leaves this module."""


def _address(text: str, *, listen: bool) -> Address:
    if text.startswith("["):
        close = text.find("]")
        host, rest = (text[1:close], text[close + 1 :]) if close > 0 else (text[1:], "")
        if not rest.startswith(":"):
            raise _Invalid("is not host:port (no ':port' after the bracketed IPv6 address)")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid(f"is not host:port ([{host}] is not an IPv6 address)") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise _Invalid("is not host:port (no ':port')")
        if ":" in host:
            raise _Invalid("is not host:port (an IPv6 address goes in brackets, e.g. [::1]:4143)")
        if not host:
            if not listen:
                raise _Invalid("is not host:port (no host)")
            host = "0.0.0.0"
        elif _all_numeric(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise _Invalid(f"is not host:port ({host!r} is not an IPv4 address)") from None
        elif not _is_host_name(host):
            raise _Invalid(
                f"is not host:port ({host!r} is neither an IP address nor a host name of "
                "letters, digits and '-' in dot-separated labels)"
            )
    if not _PORT.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
        raise _Invalid(f"is not host:port (port {port_text!r} is not a number from 1 to 65535)")
    return Address(host, int(port_text))


def _identity_dir(value: str) -> pathlib.Path:
    path = pathlib.Path(value)
    if not path.exists():
        raise _Invalid("does not exist")
    if not path.is_dir():
        raise _Invalid("is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise _Invalid("is a directory the proxy can not write to")
    return path


def _trust_anchors(value: str) -> bytes:
    pem = value.encode("utf-8", "replace")
    try:
        pki.load_certificates(pem, TRUST_ANCHORS)
    except IdentityError as e:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            detail = e.__cause__ or e
            raise _Invalid(f"holds a certificate that does not parse ({detail})") from None
        if value.startswith(("/", "./", "~")) or value.endswith((".pem", ".crt")):
            raise _Invalid(f"looks like a path (a path goes in {TRUST_ANCHORS_FILE})") from None
        raise _Invalid("holds no '-----BEGIN CERTIFICATE-----' block") from None
    try:
        trustbundle.load(pem, "the bundle")
    except IdentityError as e:
        raise _Invalid(f"is not a usable trust bundle ({e})") from None
    return pem


def _trust_anchors_file(value: str) -> tuple[pathlib.Path, bytes]:
    if "-----BEGIN" in value:
        raise _Invalid(f"holds PEM text, not a path (PEM text goes in {TRUST_ANCHORS})")
    path = pathlib.Path(value)
    if not path.exists():
        raise _Invalid("does not exist")
    if path.is_dir():
        raise _Invalid(f"is a directory: name the {trustbundle.ANCHORS_KEY} file inside it")
    try:
        pem = path.read_bytes()
    except OSError as e:
        raise _Invalid(f"can not be read ({e.strerror})") from None
    try:
        trustbundle.load(pem, "the file")
    except IdentityError as e:
        raise _Invalid(f"is not a usable trust bundle ({e})") from None
    return path, pem


def _renew_jitter(value: str) -> float:
    text = value.strip().removesuffix("s")
    try:
        seconds = float(text)
    except ValueError:
        raise _Invalid("is not a number of seconds") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_RENEW_JITTER:
        raise _Invalid(f"is not between 0 and {MAX_RENEW_JITTER:g} seconds")
    return seconds


def _report_interval(value: str) -> float:
    text = value.strip().removesuffix("s")
    try:
        seconds = float(text)
    except ValueError:
        raise _Invalid("is not a number of seconds") from None
    if not math.isfinite(seconds) or not MIN_REPORT_INTERVAL <= seconds <= MAX_REPORT_INTERVAL:
        raise _Invalid(
            f"is not between {MIN_REPORT_INTERVAL:g} and {MAX_REPORT_INTERVAL:g} seconds"
        )
    return seconds


def _token_file(value: str) -> pathlib.Path:
    if _looks_like_token(value):
        raise _Invalid("holds what looks like a token itself, not the path of a token file")
    path = pathlib.Path(value)
    if not path.exists():
        raise _Invalid("does not exist")
    if not path.is_file():
        raise _Invalid("is not a file")
    if not os.access(path, os.R_OK):
        raise _Invalid("is a file the proxy can not read")
    return path


def _local_name(value: str) -> pki.Identity:
    prefix, infix, trust_domain = value.partition(_IDENTITY_INFIX)
    if not infix or not trust_domain:
        raise _Invalid(f"is not of the form <sa>.<ns>{_IDENTITY_INFIX}<trust-domain>")
    try:
        return pki.Identity.parse(value, trust_domain)
    except IdentityError as e:
        if not _is_dns_name(trust_domain):
            reason = f"names trust domain {trust_domain!r}, which is not a lowercase DNS name"
        elif not _is_sa_ns(prefix):
            reason = f"starts with {prefix!r}, not <sa>.<ns> (two lowercase DNS labels)"
        else:
            reason = f"is not a mesh identity ({e})"
        raise _Invalid(reason) from None


def _is_sa_ns(prefix: str) -> bool:
    labels = prefix.split(".")
    return len(labels) == 2 and all(_DNS_LABEL.fullmatch(label) for label in labels)


def _policy_file(value: str) -> pathlib.Path:
    path = pathlib.Path(value)
    if path.is_dir():
        raise _Invalid("is a directory: name the document's file inside it")
    if not path.parent.is_dir():
        raise _Invalid(f"is in {str(path.parent)!r}, which is not a directory")
    return path  # the file itself may appear later: until then there is no policy, so deny


def _pod_name(value: str) -> str:
    if not _is_dns_name(value):
        raise _Invalid("is not a pod name (lowercase letters, digits, '-' and '.')")
    return value


def _entries(value: str) -> list[tuple[str, str]]:
    entries = []
    for entry in value.split(","):
        left, equals, right = entry.strip().partition("=")
        if not equals or not left or not right:
            raise _Invalid(f"has entry {entry.strip()!r}, which is not LISTEN_PORT=...")
        entries.append((left.strip(), right.strip()))
    return entries


def _port(text: str, what: str) -> int:
    if not _PORT.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise _Invalid(f"has {what} {text!r}, which is not a port number from 1 to 65535")
    return int(text)


def _local_inbound(value: str, host: str) -> tuple[LocalInbound, ...]:
    found = []
    for listen, target in _entries(value):
        app, at, pod = target.partition("@")
        found.append(
            LocalInbound(
                Address(host, _port(listen, "listen port")),
                _port(app, "application port"),
                _port(pod, "pod port") if at else None,
            )
        )
    return tuple(found)


def _local_outbound(value: str, host: str) -> tuple[LocalOutbound, ...]:
    found = []
    for listen, target in _entries(value):
        identity, at, peer = target.rpartition("@")
        if at:
            try:
                _local_name(identity)
            except _Invalid as e:
                raise _Invalid(f"names peer identity {identity!r}, which {e}") from None
        try:
            address = _address(peer, listen=False)
        except _Invalid as e:
            raise _Invalid(f"has peer {peer!r}, which {e}") from None
        found.append(
            LocalOutbound(Address(host, _port(listen, "listen port")), address, identity or None)
        )
    return tuple(found)


def _mesh_networks(value: str) -> tuple[networks.Network, ...]:
    for entry in value.split(","):
        try:
            ipaddress.ip_network(entry.strip())
        except ValueError:
            raise _Invalid(f"has {entry.strip()!r}, which is not a network in CIDR form") from None
    return networks.parse_mesh_networks(value)


def _svc_name(value: str) -> str:
    if not _is_dns_name(value):
        raise _Invalid(
            "is not a lowercase DNS name (a-z, 0-9 and '-' in dot-separated labels, "
            "no trailing dot)"
        )
    return value


# -- helpers ---------------------------------------------------------------------------------


_DESCRIPTIONS = {
    IDENTITY_DIR: "an existing directory the proxy can write its key (key.p8) to",
    TRUST_ANCHORS: "the PEM text (not a path) of one or more trust anchor certificates",
    TRUST_ANCHORS_FILE: "the path of the mounted trust bundle (the meshward-identity-trust-roots "
    "ConfigMap's ca-bundle.crt)",
    RENEW_JITTER: f"a number of seconds from 0 to {MAX_RENEW_JITTER:g} (or unset it)",
    TOKEN_FILE: "the path of the pod's projected ServiceAccount token (audience "
    "identity.meshward.io)",
    LOCAL_NAME: "the pod's identity, <sa>.<ns>.serviceaccount.identity.meshward.<trust-domain>, "
    "in lowercase",
    IDENTITY_SVC_ADDR: "the identity service's host:port",
    IDENTITY_SVC_NAME: "the DNS name on the identity service's certificate",
    INBOUND_LISTEN_ADDR: "the inbound listener's host:port, [ipv6]:port or :port (or unset it)",
    OUTBOUND_LISTEN_ADDR: "the outbound listener's host:port, [ipv6]:port or :port (or unset it)",
    ADMIN_LISTEN_ADDR: "the admin listener's host:port, [ipv6]:port or :port (or unset it)",
    POLICY_FILE: "the path of the compiled policy document",
    POLICY_SVC_ADDR: "the policy service's host:port",
    POLICY_SVC_NAME: "the DNS name on the policy service's certificate",
    REPORT_INTERVAL: f"a number of seconds from {MIN_REPORT_INTERVAL:g} to "
    f"{MAX_REPORT_INTERVAL:g} (or unset it for 30)",
    POD_NAME: "the pod's name",
    LOCAL_INBOUND: "LISTEN_PORT=APP_PORT[@POD_PORT] entries separated by commas",
    LOCAL_OUTBOUND: "LISTEN_PORT=[IDENTITY@]HOST:PORT entries separated by commas",
    MESH_NETWORKS: "CIDRs separated by commas",
}


def _describe(var: str) -> str:
    return f"{_DESCRIPTIONS[var]}, e.g. {EXAMPLES[var]}"


def _shown(var: str, value: str) -> str:
    """``='<value>'`` for the message, shortened; PEM is summarised and a token never shown."""
    if var == TOKEN_FILE and (_looks_like_token(value) or len(value) > _MAX_SHOWN):
        return ""  # a token pasted in place of its path must never reach a log
    if var == TRUST_ANCHORS and len(value) > _MAX_SHOWN:
        return f" ({len(value)} characters)"
    if len(value) > _MAX_SHOWN:
        value = value[:_MAX_SHOWN] + "..."
    return f"={value!r}"


def _looks_like_token(value: str) -> bool:
    return bool(_JWT.search(value))


def _all_numeric(host: str) -> bool:
    return all(label.isdecimal() and label.isascii() for label in host.split("."))


def _is_dns_name(name: str) -> bool:
    """Whether ``name`` is a lowercase DNS name (no trailing dot), as certificates carry."""
    return len(name) <= _MAX_DNS_NAME and all(_DNS_LABEL.fullmatch(p) for p in name.split("."))


def _is_host_name(host: str) -> bool:
    name = host.removesuffix(".")
    return len(name) <= _MAX_DNS_NAME and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _overlap(a: Address, b: Address) -> bool:
    """Whether listeners on ``a`` and ``b`` can not both bind."""
    return a.port == b.port and (a.host == b.host or bool({a.host, b.host} & _WILDCARDS))
