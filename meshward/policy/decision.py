"""Decide one inbound connection or request against a compiled PolicyDocument.

Pure and fast: :class:`Policy` turns a document into indexes once (per-pod port -> Server maps,
parsed networks, identity pattern sets, the effective mTLS mode per pod and port), so
:func:`decide` is a few dictionary look-ups and integer comparisons. Decisions are memoised in
bounded tables: an allowing one carries no client detail and is shared by every client, a denial
names its client and is shared only by that client's repeated connections. A destination known
only by its labels is resolved (Server, mTLS mode) once per port and label set, in another
bounded table. The tables are plain dicts, so concurrent threads at worst build the same entry
twice.

Order of evaluation:

1. The effective mTLS mode (Istio precedence: workload port-level > workload > namespace >
   mesh-wide; the oldest matching workload policy wins; UNSET inherits; nothing is PERMISSIVE).
   STRICT refuses plaintext, except a kubelet probe (step 4), which can not speak mTLS: without
   that exception, mesh-wide STRICT would fail every pod's readiness. DISABLE means the proxy
   does not terminate mTLS, so it sees no peer identity: the client is judged as plaintext (as
   Istio does for principals).
2. The Server covering (pod, port): named ports resolve through the pod's ports. Without a known
   pod (``Destination.pod`` unset, or not in the document yet), Server selectors are matched
   against ``Destination.labels``: the first Server with that numeric port covers it; failing
   that, the first Server with a named port that selects the labels decides, since its port can
   not be resolved and it may well be this one (deny when in doubt: the namespace default may
   allow what that Server would refuse). Its reason says so.
3. With a Server, its first matching rule allows; otherwise its accessPolicy decides.
4. Without one, an HTTP probe path of the pod (GET, exact path, on that port) is allowed;
   otherwise the pod's default policy, else the namespace's.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Mapping

from meshward.policy import compiled, resources
from meshward.policy.compile import identity_pattern, spiffe_to_dns
from meshward.policy.resources import DefaultPolicy, MTLSMode

# -- the public shapes -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Destination:
    port: int
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    pod: str | None = None
    """Pod name if known: then the document's pod supplies labels, named ports and probes."""


@dataclasses.dataclass(frozen=True, slots=True)
class Client:
    identity: str | None = None
    """A SPIFFE ID (``spiffe://td/ns/N/sa/S``) or the DNS identity name; implies ``tls``."""
    source_ip: str = "127.0.0.1"
    tls: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request; decisions about a TCP connection pass ``None`` instead."""

    method: str
    path: str


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    audit: bool
    """Allowed only because the policy in force is ``audit``."""
    server_kind: str
    """``Server`` or ``default`` (Linkerd's ``srv_kind``)."""
    server_name: str
    """The Server's name, or the default policy's value such as ``all-unauthenticated``."""
    rule_kind: str
    """ServerAuthorization, AuthorizationPolicy, probe, default or PeerAuthentication."""
    rule_name: str
    reason: str
    mtls_mode: MTLSMode
    """The effective mode: never UNSET."""


# -- parsing helpers (cached: the same clients come back again and again) --------------------

_Ip = tuple[int, int]
"""(IP version, address as an integer)."""
_Net = tuple[int, int, int, tuple[tuple[int, int], ...]]
"""(version, network, mask, excepts as (network, mask))."""
_IdGroup = tuple[bool, frozenset[str], tuple[str, ...]]
"""(any identity, exact identities, suffixes each starting with '.')."""
_Mtls = tuple[MTLSMode, str, str, str]
"""(mode, its value, PeerAuthentication name, how to name it in a reason)."""

# Enum member look-ups cost ~150 ns each on Python 3.11; the hot path compares to these instead.
_STRICT = MTLSMode.STRICT
_DISABLE = MTLSMode.DISABLE
_UNSET = MTLSMode.UNSET
# Default policies are held as their plain string values inside the index: comparing and
# hashing a str is fast, while Enum.__hash__ and .value are Python-level calls.
_DENY = DefaultPolicy.DENY.value
_AUDIT = DefaultPolicy.AUDIT.value
_ALL_UNAUTHENTICATED = DefaultPolicy.ALL_UNAUTHENTICATED.value
_ALL_AUTHENTICATED = DefaultPolicy.ALL_AUTHENTICATED.value
_CLUSTER_UNAUTHENTICATED = DefaultPolicy.CLUSTER_UNAUTHENTICATED.value

_MEMO_LIMIT = 1 << 16
"""Memo tables are cleared when they reach this size, which bounds memory."""


@functools.lru_cache(maxsize=65536)
def _parse_ip(text: str) -> _Ip | None:
    parts = text.split(".")
    if len(parts) == 4 and all(p.isascii() and p.isdigit() for p in parts):
        # a plain dotted quad, without the ipaddress module: 4x faster on a cache miss
        value = 0
        for part in parts:
            if len(part) > 3 or (len(part) > 1 and part[0] == "0") or int(part) > 255:
                return None  # leading zeros are ambiguous (octal?); ipaddress refuses them too
            value = value << 8 | int(part)
        return 4, value
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.version, int(addr)


@functools.lru_cache(maxsize=65536)
def _normalise(identity: str) -> str | None:
    """The DNS form of a client identity; None (no identity) for one carrying a wildcard."""
    if not identity or "*" in identity:
        return None
    return spiffe_to_dns(identity) or identity


def _cidr(text: str) -> tuple[int, int, int] | None:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    return net.version, int(net.network_address), int(net.netmask)


def _net(cidr: str, excepts: tuple[str, ...] = ()) -> _Net | None:
    base = _cidr(cidr)
    if base is None:
        return None
    version, addr, mask = base
    carved = []
    for ex in excepts:
        sub = _cidr(ex)
        if sub is not None and sub[0] == version:
            carved.append((sub[1], sub[2]))
    return version, addr, mask, tuple(carved)


def _net_group(nets: tuple[compiled.Network, ...]) -> tuple[_Net, ...]:
    return tuple(n for n in (_net(x.cidr, x.except_) for x in nets) if n is not None)


def _in_groups(ip: _Ip, groups: tuple[tuple[_Net, ...], ...]) -> bool:
    """Inside one network of every group (and outside that network's excepts)."""
    version, value = ip
    for group in groups:
        for n_version, addr, mask, excepts in group:
            if n_version == version and value & mask == addr:
                for ex_addr, ex_mask in excepts:
                    if value & ex_mask == ex_addr:
                        break
                else:
                    break  # this group is met
        else:
            return False
    return True


def _id_group(patterns: tuple[str, ...]) -> _IdGroup:
    any_identity = False
    exact: set[str] = set()
    suffixes: list[str] = []
    for raw in patterns:
        # compile normalises, but a hand-written document (proxies load any) may not: keep this
        pattern = identity_pattern(raw)
        if pattern == "*":
            any_identity = True
        elif pattern.startswith("*."):
            suffixes.append(pattern[1:])
        else:
            exact.add(pattern)
    return any_identity, frozenset(exact), tuple(suffixes)


def _in_id_groups(identity: str, groups: tuple[_IdGroup, ...]) -> bool:
    """One pattern of every group matches: exact, ``*``, or ``*.suffix``."""
    for any_identity, exact, suffixes in groups:
        if any_identity or identity in exact:
            continue
        for suffix in suffixes:
            if identity.endswith(suffix):
                break
        else:
            return False
    return True


class _Selector:
    """A LabelSelector flattened for matching against any Mapping."""

    __slots__ = ("exprs", "labels")

    def __init__(self, sel: resources.LabelSelector) -> None:
        self.labels = tuple(sel.match_labels.items())
        self.exprs = tuple((e.key, e.operator, frozenset(e.values)) for e in sel.match_expressions)

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.exprs:
            present = key in labels
            if op == "In":
                if not present or labels[key] not in values:
                    return False
            elif op == "NotIn":
                if present and labels[key] in values:
                    return False
            elif op == "Exists":
                if not present:
                    return False
            elif present:  # DoesNotExist
                return False
        return True


_new = object.__new__
_set_fields = tuple(
    getattr(Decision, f.name).__set__ for f in dataclasses.fields(Decision)
)  # slot descriptors: filling them directly skips the frozen __setattr__ (2x faster)


def _decision(
    allowed: bool,
    audit: bool,
    server_kind: str,
    server_name: str,
    rule_kind: str,
    rule_name: str,
    reason: str,
    mtls_mode: MTLSMode,
) -> Decision:
    """``Decision(...)`` built twice as fast; equal to what the constructor gives."""
    d = _new(Decision)
    s_allowed, s_audit, s_skind, s_sname, s_rkind, s_rname, s_reason, s_mode = _set_fields
    s_allowed(d, allowed)
    s_audit(d, audit)
    s_skind(d, server_kind)
    s_sname(d, server_name)
    s_rkind(d, rule_kind)
    s_rname(d, rule_name)
    s_reason(d, reason)
    s_mode(d, mtls_mode)
    return d


class _Rule:
    __slots__ = (
        "allowed",
        "allowed_unresolved",
        "http",
        "ids",
        "kind",
        "name",
        "nets",
        "reason",
        "tls",
    )

    def __init__(self, rule: compiled.Rule, server: str) -> None:
        self.kind = rule.kind
        self.name = rule.name
        self.ids = tuple(_id_group(g) for g in rule.identities)
        self.nets = tuple(_net_group(g) for g in rule.networks)
        self.tls = rule.tls or bool(rule.identities)
        self.http = (rule.http.method, rule.http.path) if rule.http is not None else None
        self.reason = f"{rule.kind} {rule.name} authorizes this client on Server {server}"
        self.allowed: dict[str, Decision] = {}
        """The allowing decision per mTLS mode (by value), built on first use."""
        self.allowed_unresolved: dict[str, Decision] = {}
        """The same, when its Server decides a port it may not cover (``_Server.unresolved``)."""


class _Server:
    __slots__ = (
        "access_policy",
        "by_client",
        "has_routes",
        "name",
        "port",
        "protocol",
        "rules",
        "selector",
        "unresolved",
    )

    def __init__(self, server: compiled.Server) -> None:
        self.name = server.name
        port = server.port
        # compile writes numbers as int, but a hand-written document may quote one ("8080"), which
        # compiled.Server accepts; no port name is all digits, so it can only mean the number
        self.port: int | str = int(port) if isinstance(port, str) and port.isdigit() else port
        self.unresolved = (
            f"; Server {server.name} decides because its named port {port!r} could not be "
            "resolved: the pod is not in the compiled policy yet (deny when in doubt)"
        )
        """Appended to the reason when this Server decides a port it may not cover."""
        self.access_policy = server.access_policy.value
        self.rules = tuple(_Rule(r, server.name) for r in server.rules)
        self.has_routes = any(r.http is not None for r in self.rules)
        """Whether a request's method and path can change a decision on this Server."""
        self.protocol = server.proxy_protocol
        self.selector = _Selector(server.pod_selector)
        self.by_client: dict[tuple[str | None, bool], tuple[_Rule, ...]] = {}

    def rules_for(self, identity: str | None, tls: bool) -> tuple[_Rule, ...]:
        """The rules whose TLS and identity requirements this client meets, in order.

        Memoised per (identity, tls): a mesh has far fewer identities than connections, so
        only network and HTTP checks remain per decision.
        """
        key = (identity, tls)
        hit = self.by_client.get(key)
        if hit is None:
            if len(self.by_client) >= _MEMO_LIMIT:
                self.by_client.clear()
            hit = self.by_client[key] = tuple(
                r
                for r in self.rules
                if (tls or not r.tls)
                and (not r.ids or (identity is not None and _in_id_groups(identity, r.ids)))
            )
        return hit


class _Pod:
    __slots__ = ("default", "mtls_default", "mtls_ports", "probe_ports", "probes", "servers")

    def __init__(
        self,
        servers: dict[int, _Server],
        default: str,
        probes: frozenset[tuple[int, str]],
        mtls: tuple[_Mtls, dict[int, _Mtls]],
    ) -> None:
        self.servers = servers
        self.default = default
        self.probes = probes
        self.probe_ports = frozenset(port for port, _ in probes)
        self.mtls_default, self.mtls_ports = mtls


class _WorkloadPA:
    __slots__ = ("match", "mode", "name", "ports", "where")

    def __init__(self, pa: compiled.PeerAuthentication) -> None:
        self.match = tuple((pa.selector or {}).items())
        self.mode = pa.mode
        self.name = pa.name
        self.where = f"PeerAuthentication {pa.namespace}/{pa.name}"
        self.ports: dict[int, _Mtls] = {}
        for port, mode in pa.port_level_mtls.items():
            if port.isdigit() and mode is not MTLSMode.UNSET:
                self.ports[int(port)] = (mode, mode.value, pa.name, f"port {port} of {self.where}")


def _who(identity: str | None, tls: bool, source_ip: str) -> str:
    if identity is not None:
        return f"identity {identity} from {source_ip}"
    if tls:
        return f"a TLS client without identity from {source_ip}"
    return f"a plaintext client from {source_ip}"


_PERMISSIVE: _Mtls = (
    MTLSMode.PERMISSIVE,
    MTLSMode.PERMISSIVE.value,
    "",
    "no PeerAuthentication (PERMISSIVE)",
)


# -- the index -------------------------------------------------------------------------------


class Policy:
    """An index of one PolicyDocument, built once, for fast decisions."""

    def __init__(self, document: compiled.PolicyDocument) -> None:
        self.document = document
        self.namespace = document.namespace
        self._default = document.default_policy.value
        self._cluster = (
            _net_group(tuple(compiled.Network(cidr=c) for c in document.cluster_networks)),
        )
        self._memo: dict[tuple[object, ...], Decision] = {}

        mesh = document.mesh_peer_authentication
        base = _PERMISSIVE
        if mesh is not None and mesh.mode is not MTLSMode.UNSET:
            where = f"mesh-wide PeerAuthentication {mesh.namespace}/{mesh.name}"
            base = (mesh.mode, mesh.mode.value, mesh.name, where)
        workload: list[_WorkloadPA] = []
        namespace_wide_seen = False
        for pa in document.peer_authentications:
            if pa.selector:
                workload.append(_WorkloadPA(pa))
            elif not namespace_wide_seen:  # the first is the oldest
                namespace_wide_seen = True
                if pa.mode is not MTLSMode.UNSET:
                    where = f"PeerAuthentication {pa.namespace}/{pa.name}"
                    base = (pa.mode, pa.mode.value, pa.name, where)
        self._mtls_base = base
        self._workload_pas = tuple(workload)

        self._servers = tuple(_Server(s) for s in document.servers)
        by_port: dict[int, list[_Server]] = {}
        for srv in self._servers:
            if isinstance(srv.port, int):
                by_port.setdefault(srv.port, []).append(srv)
        self._by_port = {port: tuple(s) for port, s in by_port.items()}
        # Servers with a named port: without the pod, any port may be theirs. Indexed by one
        # label their selector requires, so a look-up costs a few dict hits, not a scan.
        named_by_label: dict[tuple[str, str], list[tuple[int, _Server]]] = {}
        named_any: list[tuple[int, _Server]] = []  # selectors without matchLabels
        for order, srv in enumerate(self._servers):
            if isinstance(srv.port, str):
                if srv.selector.labels:
                    named_by_label.setdefault(srv.selector.labels[0], []).append((order, srv))
                else:
                    named_any.append((order, srv))
        self._named_by_label = {k: tuple(v) for k, v in named_by_label.items()}
        self._named_any = tuple(named_any)
        self._by_labels: dict[
            tuple[int, frozenset[tuple[str, str]]], tuple[_Server | None, str, _Mtls]
        ] = {}
        """Labels-only destinations resolved once: (port, labels) -> (Server, note, mTLS)."""

        self._pods: dict[str, _Pod] = {}
        for name, pod in document.pods.items():
            servers: dict[int, _Server] = {}
            for srv in self._servers:
                if not srv.selector.matches(pod.labels):
                    continue
                port = srv.port if isinstance(srv.port, int) else pod.ports.get(srv.port)
                if port is not None:
                    servers.setdefault(port, srv)  # document order: first wins
            default = pod.default_policy.value if pod.default_policy else self._default
            self._pods[name] = _Pod(
                servers=servers,
                default=default,
                probes=frozenset((p.port, p.path) for p in pod.probes),
                mtls=self._mtls_chain(pod.labels),
            )

    def _mtls_chain(self, labels: Mapping[str, str]) -> tuple[_Mtls, dict[int, _Mtls]]:
        """(mode for the workload, port-level overrides) for pods with these labels."""
        get = labels.get
        for pa in self._workload_pas:  # oldest first
            for key, value in pa.match:
                if get(key) != value:
                    break
            else:
                base = self._mtls_base
                if pa.mode is not _UNSET:
                    base = (pa.mode, pa.mode.value, pa.name, pa.where)
                return base, pa.ports
        return self._mtls_base, {}

    def _resolve_labels(
        self, port: int, labels: Mapping[str, str]
    ) -> tuple[_Server | None, str, _Mtls]:
        """(Server, reason note, mTLS) for a destination known only by its labels."""
        server: _Server | None = None
        note = ""  # set when a named-port Server decides without knowing its port
        for candidate in self._by_port.get(port, ()):
            if candidate.selector.matches(labels):
                server = candidate
                break
        else:
            server = self._named_server(labels)
            if server is not None:
                note = server.unresolved
        if self._workload_pas:
            mtls_default, mtls_ports = self._mtls_chain(labels)
            return server, note, mtls_ports.get(port, mtls_default)
        return server, note, self._mtls_base

    def _named_server(self, labels: Mapping[str, str]) -> _Server | None:
        """The first Server (document order) with a named port whose selector matches."""
        best_order = len(self._servers)
        best: _Server | None = None
        by_label = self._named_by_label
        if by_label:
            for item in labels.items():
                for order, srv in by_label.get(item, ()):  # each list is in document order
                    if order >= best_order:
                        break
                    if srv.selector.matches(labels):
                        best_order, best = order, srv
                        break
        for order, srv in self._named_any:
            if order >= best_order:
                break
            if srv.selector.matches(labels):
                return srv
        return best

    def mtls_mode(self, dest: Destination) -> MTLSMode:
        """The effective mTLS mode on this destination (never UNSET)."""
        pod = self._pods.get(dest.pod) if dest.pod is not None else None
        if pod is not None:
            default, ports = pod.mtls_default, pod.mtls_ports
        else:
            default, ports = self._mtls_chain(dest.labels)
        return ports.get(dest.port, default)[0]

    def _covering(self, dest: Destination) -> tuple[_Server | None, _Pod | None]:
        """(the Server covering ``dest``, its pod if known): what :meth:`decide` resolves."""
        pod = self._pods.get(dest.pod) if dest.pod is not None else None
        if pod is not None:
            return pod.servers.get(dest.port), pod
        label_key = (dest.port, frozenset(dest.labels.items()))
        resolved = self._by_labels.get(label_key)
        if resolved is None:
            if len(self._by_labels) >= _MEMO_LIMIT:
                self._by_labels.clear()
            resolved = self._by_labels[label_key] = self._resolve_labels(dest.port, dest.labels)
        return resolved[0], None

    def proxy_protocol(self, dest: Destination) -> resources.ProxyProtocol | None:
        """The protocol the covering Server declares, or None when no Server covers ``dest``
        (the proxy then detects it from the first bytes)."""
        server, _ = self._covering(dest)
        return None if server is None else server.protocol

    def routes_matter(self, dest: Destination) -> bool:
        """Whether a request's method and path can change a decision on ``dest``: the covering
        Server has a rule restricted to an HTTP route, or no Server covers it and the pod has a
        probe path on this port. When False, one decision per connection (``request`` None)
        is as good as one per request, and the proxy need not parse HTTP at all."""
        server, pod = self._covering(dest)
        if server is not None:
            return server.has_routes
        return pod is not None and dest.port in pod.probe_ports

    # -- deciding --

    def decide(self, dest: Destination, client: Client, request: Request | None = None) -> Decision:
        port = dest.port
        pod_name = dest.pod
        pod = self._pods.get(pod_name) if pod_name is not None else None
        server: _Server | None = None
        note = ""  # set when a named-port Server decides without knowing its port
        if pod is not None:
            server = pod.servers.get(port)
            mtls = pod.mtls_ports.get(port) if pod.mtls_ports else None
            if mtls is None:
                mtls = pod.mtls_default
            default = pod.default
        else:
            labels = dest.labels
            label_key = (port, frozenset(labels.items()))
            resolved = self._by_labels.get(label_key)
            if resolved is None:
                if len(self._by_labels) >= _MEMO_LIMIT:
                    self._by_labels.clear()
                resolved = self._by_labels[label_key] = self._resolve_labels(port, labels)
            server, note, mtls = resolved
            default = self._default
        mode, mode_key, pa_name, pa_where = mtls

        identity = client.identity
        tls = client.tls or identity is not None
        probe = (
            server is None
            and pod is not None
            and request is not None
            and request.method == "GET"
            and (port, request.path) in pod.probes
        )
        if mode is _DISABLE:
            identity, tls = None, False
        elif mode is _STRICT and not tls and not probe:
            return _decision(
                False,
                False,
                "default" if server is None else "Server",
                default if server is None else server.name,
                "PeerAuthentication",
                pa_name,
                f"{pa_where} requires mTLS (STRICT) on port {port}: plaintext from "
                f"{client.source_ip} is refused{note}",
                mode,
            )
        nid = _normalise(identity) if identity else None

        if server is not None:
            ip: _Ip | None = None
            ip_known = False
            for rule in server.rules_for(nid, tls):
                http = rule.http
                if http is not None and (
                    request is None or request.method != http[0] or request.path != http[1]
                ):
                    continue
                if rule.nets:
                    if not ip_known:
                        ip, ip_known = _parse_ip(client.source_ip), True
                    if ip is None or not _in_groups(ip, rule.nets):
                        continue
                allowed = rule.allowed_unresolved if note else rule.allowed
                hit = allowed.get(mode_key)
                if hit is None:
                    hit = allowed[mode_key] = _decision(
                        True,
                        False,
                        "Server",
                        server.name,
                        rule.kind,
                        rule.name,
                        rule.reason + note,
                        mode,
                    )
                return hit
            return self._by_default(
                server.access_policy, server, port, nid, tls, client, mode, mode_key, note
            )

        if probe and request is not None:  # probe implies a request; the test narrows the type
            key: tuple[object, ...] = ("probe", port, request.path, mode_key, default)
            hit = self._memo.get(key)
            if hit is None:
                reason = (
                    f"GET {request.path} on port {port} is a probe path of the pod, "
                    "allowed without authentication"
                )
                hit = self._remember(
                    key,
                    _decision(True, False, "default", default, "probe", request.path, reason, mode),
                )
            return hit
        return self._by_default(default, None, port, nid, tls, client, mode, mode_key, "")

    def _remember(self, key: tuple[object, ...], decision: Decision) -> Decision:
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = decision
        return decision

    def _by_default(
        self,
        policy: str,
        server: _Server | None,
        port: int,
        nid: str | None,
        tls: bool,
        client: Client,
        mode: MTLSMode,
        mode_key: str,
        note: str,
    ) -> Decision:
        """A default policy (or a Server's accessPolicy, when ``server`` is set) for this client.

        Decisions are memoised by everything their fields depend on: a denial names the
        client, so it is shared only by repeated connections from the same client. ``note``
        is appended to the reason (empty, or ``_Server.unresolved``).
        """
        has_identity = nid is not None
        in_cluster = True
        if policy in (_ALL_UNAUTHENTICATED, _AUDIT):
            allowed = True
        elif policy == _DENY:
            allowed = False
        elif policy == _ALL_AUTHENTICATED:
            allowed = has_identity
        else:
            ip = _parse_ip(client.source_ip)
            in_cluster = ip is not None and _in_groups(ip, self._cluster)
            allowed = in_cluster and (has_identity or policy == _CLUSTER_UNAUTHENTICATED)

        if allowed:
            key: tuple[object, ...] = (server, policy, port, mode_key, note)
        else:
            key = (
                server,
                policy,
                port,
                mode_key,
                note,
                client.identity,
                client.tls,
                client.source_ip,
            )
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        server_kind = "default" if server is None else "Server"
        server_name = policy if server is None else server.name
        if server is None:
            where = f"port {port} is not covered by a Server and the default policy {policy}"
        else:
            where = f"no authorization on Server {server.name} matched; its accessPolicy {policy}"

        if allowed:
            audit = policy == _AUDIT
            why = "allows it and flags it for audit" if audit else "allows it"
            reason = f"{where} {why}"
        else:
            audit = False
            who = _who(nid, tls, client.source_ip)
            if mode is _DISABLE and (client.tls or client.identity):
                who += " (mTLS is DISABLE here, so the proxy sees no TLS or identity)"
            if policy == _DENY:
                needs = "refuses every client"
            else:
                lacks = []
                if not has_identity and policy != _CLUSTER_UNAUTHENTICATED:
                    lacks.append("a mesh identity")
                if not in_cluster:
                    lacks.append("a source in the cluster networks")
                needs = f"needs {' and '.join(lacks)}"
            if server is None:
                reason = f"{where} {needs}: refused {who}"
            else:
                reason = (
                    f"no authorization on Server {server.name} allows {who}, and its "
                    f"accessPolicy {policy} {needs}"
                )
        decision = _decision(
            allowed, audit, server_kind, server_name, "default", policy, reason + note, mode
        )
        return self._remember(key, decision)


def decide(
    policy: Policy, dest: Destination, client: Client, request: Request | None = None
) -> Decision:
    """Decide one connection (``request`` None) or HTTP request; see the module docstring."""
    return policy.decide(dest, client, request)
