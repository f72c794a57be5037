"""Which destinations are meshed: the answers to the proxies' ``Lookup``, from the cluster's
Pods, Services and EndpointSlices.

A proxy in transparent mode asks before it dials an address whether mTLS goes there and which
identity must answer; guessing either way breaks something (mTLS to a pod without a proxy, or
plaintext and no pinned peer to one with). The answer, for an address and port:

- the IP of a *meshed pod*: injected (annotation ``meshward.io/proxy-version``), not
  hostNetwork, phase Running, with that IP among ``status.podIP``/``podIPs``, and a
  ``meshward-init`` init container whose ``meshward proxy-init`` arguments parse: the port is
  meshed unless that proxy-init leaves it alone (its admin port, ``--skip-inbound-ports``),
  and the identity is ``spiffe://<td>/ns/<ns>/sa/<serviceAccountName or default>``. An injected
  pod without a readable proxy-init has no inbound redirection, so its proxy takes nothing;
- an address kube-proxy forwards for a Service (``spec.clusterIPs``, ``spec.externalIPs``,
  ``status.loadBalancer.ingress[].ip`` unless its ``ipMode`` is Proxy; headless and
  ExternalName Services have none): the Service's TCP ``port`` is meshed when every endpoint
  kube-proxy may send it to has a meshed pod behind it for the slice's port of the same name,
  which is the resolved ``targetPort``. Those endpoints are, over the Service's EndpointSlices
  (label ``kubernetes.io/service-name``) of the address's family, the ready ones
  (``conditions.ready`` not false) or, when there is none, the terminating ones still serving
  (``serving`` not false, ``terminating`` true), as kube-proxy 1.26+ falls back to them. The
  pod behind an endpoint is its ``targetRef`` pod, which must hold the endpoint's addresses;
  an endpoint without a pod ``targetRef`` is judged by the meshed pods holding its address.
  The identities are those of these pods; no such endpoint is not meshed;
- anything else, plaintext.

When several meshed pods claim one IP (a pod gone, the API not yet told), each must take the
port, and any of their identities may answer. When an endpoint names a pod this server has
not seen (its watch of pods lags the one of EndpointSlices) or a pod that no longer holds the
endpoint's address, the answer is :class:`Unsure` and the proxy is told to retry, not to guess.

:class:`Index` is the pure part, fed API objects as plain camelCase dicts and keeping only
what lookups need: every pod by key (meshed, or a marker that it is not, so that "not meshed"
differs from "not seen yet"), Services, EndpointSlices, and the Service answers worked out
since the last change. :class:`Source` is the async edge: it lists and watches the three kinds
across all namespaces with :mod:`meshward.policyserver.watching` (a full paged list, a watch
from its resourceVersion, a relist on 410 Gone or failure after a backoff), and sets
``synced`` once each kind has been listed; until then the server answers UNAVAILABLE rather
than guess. Through a short outage the answers held keep being given; once any kind has gone
:data:`STALE_AFTER` without a successful list, a watch event or an open watch,
:meth:`Source.unavailable` says so, and the server answers UNAVAILABLE and reports not ready
until it hears from the API server again. EndpointSlices are read as discovery.k8s.io/v1, or
v1beta1 from an API server without v1 (Kubernetes 1.20).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import functools
import ipaddress
import logging
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, Literal, NoReturn, TypeVar

from kubernetes_asyncio import client

from meshward import errors, inject
from meshward.identity import pki
from meshward.policyserver import metrics, watching
from meshward.proxy import interception, proxy_init

logger = logging.getLogger(__name__)

TTL = 5.0
"""Seconds a proxy may act on an answer before asking again. It bounds how long a change goes
unnoticed: an IP reused by another pod is dialled with the old answer for at most this long.
A stale "meshed" answer fails closed, since the new pod can not prove the pinned identity; a
stale "plaintext" answer reaches a pod whose own proxy then applies its inbound policy."""
TTL_MS = int(TTL * 1000)
STALE_AFTER = 60.0
"""Seconds any of the three kinds may go without a successful list, a watch event or an open
watch before lookups are refused (UNAVAILABLE) and the server reports not ready. Answers held
through a short outage (an API server restart, a leader change) are nearly always still right,
so serving them keeps traffic flowing; after a minute of silence pods have likely been replaced
and their IPs reused, and an old "plaintext" answer could send cleartext to a meshed pod. The
proxies then fail closed instead of acting on a picture of the cluster that has gone stale."""
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PAGE = 500
"""Objects per list request: a page of pods is parsed whole, so this bounds that buffer."""

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Key = tuple[str, str]
"""(namespace, name) of an object."""
_MAX_SHOWN = 64
_FAMILIES = {"IPv4": 4, "IPv6": 6}


class Kind(enum.StrEnum):
    """The kinds followed, as the API (and RBAC) names their resources."""

    PODS = "pods"
    SERVICES = "services"
    ENDPOINTSLICES = "endpointslices"


@dataclasses.dataclass(frozen=True)
class Answer:
    """Whether a destination is meshed, and which SPIFFE IDs may answer there (sorted)."""

    meshed: bool
    identities: tuple[str, ...] = ()


PLAIN = Answer(meshed=False)


@dataclasses.dataclass(frozen=True)
class Unsure:
    """No answer yet: what the index holds does not settle it (``why`` says what is missing).
    The caller is told to retry shortly, never plaintext."""

    why: str


class _Unmeshed(enum.Enum):
    """The record of a pod that was seen and is not a meshed pod (see the module)."""

    UNMESHED = "unmeshed"


UNMESHED = _Unmeshed.UNMESHED


@dataclasses.dataclass(frozen=True)
class Pod:
    """A meshed pod: its IPs, SPIFFE ID, and the inbound ports its proxy does not take."""

    ips: tuple[IP, ...]
    identity: str
    skipped: tuple[interception.PortRange, ...]

    def takes(self, port: int) -> bool:
        return not any(r.first <= port <= r.last for r in self.skipped)


PodRecord = Pod | Literal[_Unmeshed.UNMESHED]
"""What is held of each pod seen: the meshed pod, or the marker that it is not one."""


@dataclasses.dataclass(frozen=True)
class ServicePort:
    name: str
    port: int


@dataclasses.dataclass(frozen=True)
class Service:
    """A Service's TCP ports and the addresses kube-proxy forwards them on: cluster IPs,
    external IPs and load-balancer ingress IPs."""

    addresses: tuple[IP, ...]
    ports: tuple[ServicePort, ...]


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One endpoint's addresses (empty when one does not parse: not meshed) and the pod its
    ``targetRef`` names, if it names one."""

    addresses: tuple[IP, ...]
    pod: Key | None = None


@dataclasses.dataclass(frozen=True)
class EndpointSlice:
    """One slice of a Service's endpoints: its TCP ports by name, its ready endpoints, and its
    terminating endpoints that still serve (kube-proxy's fallback when none is ready)."""

    name: str
    service: str
    family: int
    ports: tuple[ServicePort, ...]
    ready: tuple[Endpoint, ...]
    terminating: tuple[Endpoint, ...] = ()

    def port_named(self, name: str) -> int | None:
        return next((p.port for p in self.ports if p.name == name), None)


def parse(address: str, port: int) -> tuple[IP, int]:
    """A lookup's destination, checked: an IPv4-mapped IPv6 address means its IPv4 address.
    Raises :class:`~meshward.errors.InvalidLookup` saying what is wrong."""
    shown = address if len(address) <= _MAX_SHOWN else address[:_MAX_SHOWN] + "..."
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise errors.InvalidLookup(
            f"address {shown!r} is not an IP literal: send the connection's original "
            "destination address, e.g. '10.42.0.7' or 'fd00::7'"
        ) from None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise errors.InvalidLookup(
                f"address {shown!r} has a zone: send it without '%{ip.scope_id}'"
            )
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
    if not 1 <= port <= 65535:
        raise errors.InvalidLookup(
            f"port {port} is not a port number: send the destination port, 1 to 65535"
        )
    return ip, port


# -- reducing API objects to what lookups need ------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _key(obj: Mapping[str, Any]) -> Key | None:
    meta = _mapping(obj.get("metadata"))
    namespace, name = meta.get("namespace"), meta.get("name")
    if isinstance(namespace, str) and namespace and isinstance(name, str) and name:
        return namespace, name
    return None


def _ips(values: Iterable[Any]) -> tuple[IP, ...]:
    """The distinct IPs among ``values``; what is not an IP literal is left out."""
    found: list[IP] = []
    for value in values:
        if not isinstance(value, str):
            continue
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            continue
        if ip not in found:
            found.append(ip)
    return tuple(found)


def _addresses(values: Any) -> tuple[IP, ...]:
    """An endpoint's addresses; empty unless there is one and every one is an IP."""
    if not isinstance(values, list) or not values:
        return ()
    every = all(_ips([value]) for value in values)
    return _ips(values) if every else ()


def _tcp_ports(ports: Any) -> tuple[ServicePort, ...]:
    found = []
    for port in ports if isinstance(ports, list) else ():
        entry = _mapping(port)
        number = entry.get("port")
        if entry.get("protocol", "TCP") in ("TCP", None) and isinstance(number, int):
            found.append(ServicePort(str(entry.get("name") or ""), number))
    return tuple(found)


class _ProxyInitArguments(argparse.ArgumentParser):
    """``meshward proxy-init``'s own arguments, read from a pod spec: an error raises (the pod
    is then not meshed) instead of ending the process."""

    def error(self, message: str) -> NoReturn:
        raise errors.ConfigError(message)


def _proxy_init_parser() -> argparse.ArgumentParser:
    parser = _ProxyInitArguments(prog="meshward proxy-init", add_help=False)
    proxy_init.add_arguments(parser)
    return parser


_PROXY_INIT = _proxy_init_parser()


@functools.lru_cache(maxsize=256)
def _not_intercepted(argv: tuple[str, ...]) -> tuple[interception.PortRange, ...] | None:
    """The inbound ports that the init container ``argv`` leaves to reach the pod directly
    (the admin port and ``--skip-inbound-ports``), parsed as proxy-init parses them; None when
    it does not run proxy-init or proxy-init would refuse its arguments. Cached: a
    Deployment's pods share one."""
    if "proxy-init" not in argv:
        return None
    try:
        args = _PROXY_INIT.parse_args(list(argv[argv.index("proxy-init") + 1 :]))
        config = proxy_init.config_from(args)
    except errors.ConfigError as exc:
        logger.debug("proxy-init arguments %s do not parse: %s", argv, exc)
        return None
    admin = interception.PortRange(config.admin_port, config.admin_port)
    return (admin, *config.skip_inbound_ports)


def _skipped_inbound(spec: Mapping[str, Any]) -> tuple[interception.PortRange, ...] | None:
    """What the pod's meshward-init container exempts from redirection; None without one."""
    containers = spec.get("initContainers")
    for container in containers if isinstance(containers, list) else ():
        entry = _mapping(container)
        if entry.get("name") != inject.INIT_CONTAINER:
            continue
        command, args = entry.get("command") or [], entry.get("args") or []
        if not isinstance(command, list) or not isinstance(args, list):
            return None
        argv = (*command, *args)
        if not all(isinstance(arg, str) for arg in argv):
            return None
        return _not_intercepted(argv)
    return None


def reduce_pod(obj: Mapping[str, Any], trust_domain: str) -> Pod | None:
    """The pod as a lookup sees it, or None when it is not a meshed pod (see the module)."""
    key = _key(obj)
    status, spec = _mapping(obj.get("status")), _mapping(obj.get("spec"))
    annotations = _mapping(_mapping(obj.get("metadata")).get("annotations"))
    if key is None or status.get("phase") != "Running" or spec.get("hostNetwork") is True:
        return None
    if inject.VERSION_ANNOTATION not in annotations:
        return None
    listed = status.get("podIPs")
    ips = _ips(
        [
            status.get("podIP"),
            *(_mapping(entry).get("ip") for entry in (listed if isinstance(listed, list) else ())),
        ]
    )
    skipped = _skipped_inbound(spec)
    if not ips or skipped is None:
        return None
    account = spec.get("serviceAccountName") or "default"
    try:
        identity = pki.Identity(key[0], str(account), trust_domain).spiffe_id
    except errors.InvalidIdentity:
        return None
    return Pod(ips=ips, identity=sys.intern(identity), skipped=skipped)


def reduce_service(obj: Mapping[str, Any]) -> Service | None:
    """The Service's TCP ports and the addresses kube-proxy forwards them on; None when it has
    no cluster IP (headless, ExternalName: kube-proxy forwards nothing for it) or no TCP port."""
    spec, status = _mapping(obj.get("spec")), _mapping(obj.get("status"))
    if spec.get("type") == "ExternalName":
        return None
    listed = spec.get("clusterIPs")
    raw = listed if isinstance(listed, list) and listed else [spec.get("clusterIP")]
    cluster_ips = _ips(ip for ip in raw if ip != "None")
    ports = _tcp_ports(spec.get("ports"))
    if not cluster_ips or not ports:
        return None
    external = spec.get("externalIPs")
    ingress = _mapping(status.get("loadBalancer")).get("ingress")
    balanced = [
        _mapping(entry).get("ip")
        for entry in (ingress if isinstance(ingress, list) else ())
        if _mapping(entry).get("ipMode") != "Proxy"  # delivered by the balancer, not kube-proxy
    ]
    others = _ips([*(external if isinstance(external, list) else ()), *balanced])
    return Service(
        addresses=(*cluster_ips, *(ip for ip in others if ip not in cluster_ips)), ports=ports
    )


def _endpoint(entry: Mapping[str, Any], namespace: str) -> Endpoint:
    ref = _mapping(entry.get("targetRef"))
    name, ref_namespace = ref.get("name"), ref.get("namespace") or namespace
    pod = None
    if ref.get("kind") == "Pod" and isinstance(name, str) and name:
        pod = (sys.intern(str(ref_namespace)), sys.intern(name))
    return Endpoint(_addresses(entry.get("addresses")), pod)


def reduce_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice | None:
    """The slice's Service, family, TCP ports, ready and serving terminating endpoints; None
    for a slice of no Service or of FQDN addresses (which no cluster IP forwards to)."""
    key = _key(obj)
    labels = _mapping(_mapping(obj.get("metadata")).get("labels"))
    service = labels.get(SERVICE_NAME_LABEL)
    family = _FAMILIES.get(str(obj.get("addressType")))
    if key is None or not isinstance(service, str) or not service or family is None:
        return None
    ready, terminating = [], []
    endpoints = obj.get("endpoints")
    for endpoint in endpoints if isinstance(endpoints, list) else ():
        entry = _mapping(endpoint)
        conditions = _mapping(entry.get("conditions"))
        # as the API defines them: ready and serving unset mean true, terminating unset false
        if conditions.get("ready") is not False:
            ready.append(_endpoint(entry, key[0]))
        elif conditions.get("serving") is not False and conditions.get("terminating") is True:
            terminating.append(_endpoint(entry, key[0]))
    return EndpointSlice(
        key[1], service, family, _tcp_ports(obj.get("ports")), tuple(ready), tuple(terminating)
    )


# -- the index --------------------------------------------------------------------------------

R = TypeVar("R")


class _Table(Generic[R]):
    """One kind's reduced objects by key, and the keys under each secondary value (an IP, a
    Service). A full list is staged object by object, then replaces the table at once, so a
    lookup never sees half of one. ``counted`` is how many records ``counts`` (what the
    metrics show)."""

    def __init__(
        self,
        reduce: Callable[[Mapping[str, Any]], R | None],
        secondary: Callable[[Key, R], Iterable[Hashable]],
        counts: Callable[[R], bool] = lambda _: True,
    ) -> None:
        self._reduce = reduce
        self._secondary = secondary
        self._counts = counts
        self.records: dict[Key, R] = {}
        self.counted = 0
        self._by: dict[Hashable, set[Key]] = {}
        self._staged: dict[Key, R] = {}

    def apply(self, event: str, obj: Mapping[str, Any]) -> None:
        """A watch event (ADDED, MODIFIED, DELETED) of one object."""
        key = _key(obj)
        if key is None:
            return
        record = None if event == "DELETED" else self._reduce(obj)
        old = self.records.pop(key, None)
        if old is not None:
            self.counted -= self._counts(old)
            for value in self._secondary(key, old):
                keys = self._by.get(value)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._by[value]
        if record is not None:
            self._add(key, record)

    def stage(self, obj: Mapping[str, Any]) -> None:
        """One object of a full list in progress."""
        key = _key(obj)
        record = self._reduce(obj) if key is not None else None
        if key is not None and record is not None:
            self._staged[key] = record

    def discard_staged(self) -> None:
        self._staged = {}

    def commit(self) -> None:
        """The staged list becomes the table."""
        staged, self._staged = self._staged, {}
        self.records, self._by, self.counted = {}, {}, 0
        for key, record in staged.items():
            self._add(key, record)

    def find(self, value: Hashable) -> list[tuple[Key, R]]:
        return [(key, self.records[key]) for key in sorted(self._by.get(value, ()))]

    def _add(self, key: Key, record: R) -> None:
        self.records[key] = record
        self.counted += self._counts(record)
        for value in self._secondary(key, record):
            self._by.setdefault(value, set()).add(key)


Result = Answer | Unsure


class Index:
    """The cluster's pods, Services and EndpointSlices, reduced, and the lookups they answer.
    Pure and synchronous: :class:`Source` feeds it, tests feed it dicts.

    A Service's answer for an address family and port is worked out once and kept until
    anything changes (``generation``): a big Service then costs one dict lookup, not a walk
    over its endpoints at every connection."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self.generation = 0
        """Bumped by every change; the Service answers held are of one generation."""
        self._pods: _Table[PodRecord] = _Table(
            functools.partial(_pod_record, trust_domain=trust_domain),
            lambda _, pod: pod.ips if isinstance(pod, Pod) else (),
            lambda pod: isinstance(pod, Pod),
        )
        self._services: _Table[Service] = _Table(reduce_service, lambda _, svc: svc.addresses)
        self._slices: _Table[EndpointSlice] = _Table(
            reduce_endpoint_slice, lambda key, piece: [(key[0], piece.service)]
        )
        self._answers: dict[tuple[Key, int, int], Result] = {}
        self._answers_generation = 0

    def table(self, kind: Kind) -> _Table[Any]:
        tables: dict[Kind, _Table[Any]] = {
            Kind.PODS: self._pods,
            Kind.SERVICES: self._services,
            Kind.ENDPOINTSLICES: self._slices,
        }
        return tables[kind]

    def changed(self) -> None:
        """Something held changed: the Service answers worked out so far are void."""
        self.generation += 1

    def load(self, kind: Kind, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace what is held of ``kind`` by ``objects``, as a full list does."""
        table = self.table(kind)
        table.discard_staged()
        for obj in objects:
            table.stage(obj)
        table.commit()
        self.changed()

    def apply(self, kind: Kind, event: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        self.table(kind).apply(event, obj)
        self.changed()

    def size(self, kind: Kind) -> int:
        """Objects that lookups use: meshed pods, Services with cluster IPs, EndpointSlices of
        Services."""
        return self.table(kind).counted

    def lookup(self, address: IP, port: int) -> Result:
        """How a connection to ``address``:``port`` goes (see the module)."""
        services = self._services.find(address)
        if services:
            return _all_of(
                [self._service(key, svc, address.version, port) for key, svc in services]
            )
        return self._at(address, port)

    def _at(self, address: IP, port: int) -> Answer:
        """Judged by the meshed pods that hold ``address``."""
        pods = self._pods.find(address)
        if not pods or not all(isinstance(pod, Pod) and pod.takes(port) for _, pod in pods):
            return PLAIN
        return Answer(
            True, tuple(sorted({pod.identity for _, pod in pods if isinstance(pod, Pod)}))
        )

    def _service(self, key: Key, service: Service, family: int, port: int) -> Result:
        named = next((p.name for p in service.ports if p.port == port), None)
        if named is None:
            return PLAIN
        if self._answers_generation != self.generation:
            self._answers.clear()
            self._answers_generation = self.generation
        memo = (key, family, port)
        found = self._answers.get(memo)
        if found is None:
            found = self._answers[memo] = self._endpoints(key, named, family)
        return found

    def _endpoints(self, key: Key, named: str, family: int) -> Result:
        """Judged by the endpoints kube-proxy sends the Service's port ``named`` to: the ready
        ones, else the serving terminating ones."""
        ready: list[tuple[EndpointSlice, Endpoint, int]] = []
        terminating: list[tuple[EndpointSlice, Endpoint, int]] = []
        for _, piece in self._slices.find(key):
            target = piece.port_named(named)
            if piece.family != family or target is None:
                continue
            ready += [(piece, endpoint, target) for endpoint in piece.ready]
            terminating += [(piece, endpoint, target) for endpoint in piece.terminating]
        return _all_of([self._endpoint(key[0], *chosen) for chosen in ready or terminating])

    def _endpoint(
        self, namespace: str, piece: EndpointSlice, endpoint: Endpoint, port: int
    ) -> Result:
        if not endpoint.addresses:
            return PLAIN
        if endpoint.pod is None:
            return _all_of([self._at(address, port) for address in endpoint.addresses])
        pod = self._pods.records.get(endpoint.pod)
        shown = "/".join(endpoint.pod)
        if pod is None:
            return Unsure(
                f"EndpointSlice {namespace}/{piece.name} lists pod {shown}, which the server "
                "has not seen yet"
            )
        if pod is UNMESHED:
            return PLAIN
        if not all(address in pod.ips for address in endpoint.addresses):
            return Unsure(
                f"EndpointSlice {namespace}/{piece.name} lists pod {shown} at "
                f"{', '.join(map(str, endpoint.addresses))}, which that pod does not hold"
            )
        return Answer(True, (pod.identity,)) if pod.takes(port) else PLAIN


def _pod_record(obj: Mapping[str, Any], trust_domain: str) -> PodRecord:
    return reduce_pod(obj, trust_domain) or UNMESHED


def _all_of(answers: list[Result]) -> Result:
    """Meshed when there is at least one answer and all are meshed, with their identities;
    plain when one is plain; otherwise (one is unsure) unsure."""
    if not answers:
        return PLAIN
    unsure = None
    identities: set[str] = set()
    for answer in answers:
        if isinstance(answer, Unsure):
            unsure = unsure or answer
        elif not answer.meshed:
            return PLAIN
        else:
            identities.update(answer.identities)
    return unsure or Answer(True, tuple(sorted(identities)))


# -- the async edge: list and watch -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Resource:
    kind: Kind
    title: str
    """As messages name it."""
    rbac: str
    """As a missing grant is named."""


class Source:
    """Keeps an :class:`Index` equal to the cluster's Pods, Services and EndpointSlices.
    ``synced`` is set once each kind has been listed in full; before that, an address may be
    meshed without the index knowing it yet. :meth:`unavailable` says when lookups must not be
    answered: before that, or once the index has gone stale (see :data:`STALE_AFTER`)."""

    def __init__(
        self,
        api: client.ApiClient,
        index: Index,
        counters: metrics.Metrics,
        stale_after: float = STALE_AFTER,
    ) -> None:
        # Any: called with _preload_content=False they return the raw aiohttp response.
        core: Any = client.CoreV1Api(api)
        host = str(api.configuration.host)
        self.index = index
        self.synced = asyncio.Event()
        self._stale_after = stale_after
        self._followers = (
            _Follower(
                _Resource(Kind.PODS, "Pods", "pods"),
                core.list_pod_for_all_namespaces,
                host,
                index,
                counters,
                self._listed,
            ),
            _Follower(
                _Resource(Kind.SERVICES, "Services", "services"),
                core.list_service_for_all_namespaces,
                host,
                index,
                counters,
                self._listed,
            ),
            _Follower(
                _Resource(
                    Kind.ENDPOINTSLICES, "EndpointSlices", "endpointslices (discovery.k8s.io)"
                ),
                _EndpointSlices(api).list,
                host,
                index,
                counters,
                self._listed,
            ),
        )

    async def run(self) -> None:
        """List and watch the three kinds until cancelled."""
        async with asyncio.TaskGroup() as group:
            for follower in self._followers:
                group.create_task(follower.run())

    def unavailable(self) -> str | None:
        """Why lookups can not be answered now (completing "the policy server ..."), or None
        when they can."""
        if not self.synced.is_set():
            return "has not yet listed the cluster's pods, services and endpointslices"
        now = time.monotonic()
        silent = [(f.silent_for(now), f.resource.title) for f in self._followers]
        stale = [(seconds, title) for seconds, title in silent if seconds > self._stale_after]
        if not stale:
            return None
        return (
            f"has not heard from the API server about {', '.join(t for _, t in stale)} for "
            f"{max(seconds for seconds, _ in stale):.0f} s (more than {self._stale_after:g} s), "
            "so what it holds may be out of date"
        )

    def _listed(self) -> None:
        if not self.synced.is_set() and all(f.listed for f in self._followers):
            logger.info(
                "destination lookups answered from %d meshed pods, %d Services, %d EndpointSlices",
                *(self.index.size(f.resource.kind) for f in self._followers),
            )
            self.synced.set()


_QUERY = {
    "limit": "limit",
    "_continue": "continue",
    "watch": "watch",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "resource_version": "resourceVersion",
    "timeout_seconds": "timeoutSeconds",
}
"""The client's list arguments, as query parameters."""


class _EndpointSlices:
    """EndpointSlices of discovery.k8s.io/v1 where the API server serves it, else of v1beta1
    (Kubernetes 1.20), whose fields that lookups read are the same. The client knows only v1,
    so v1beta1 is requested by its path. The version is asked at each full list."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._v1: Any = client.DiscoveryV1Api(api)
        self._group: Any = client.DiscoveryApi(api)
        self._version: str | None = None

    async def list(self, **kwargs: Any) -> Any:
        """As ``DiscoveryV1Api.list_endpoint_slice_for_all_namespaces``."""
        if self._version is None or not (kwargs.get("watch") or kwargs.get("_continue")):
            self._version = await self._served(kwargs.get("_request_timeout"))
        if self._version == "v1":
            return await self._v1.list_endpoint_slice_for_all_namespaces(**kwargs)
        unknown = set(kwargs) - {*_QUERY, "_preload_content", "_request_timeout"}
        if unknown:
            raise TypeError(f"unexpected list arguments {sorted(unknown)}")
        query = [(_QUERY[k], v) for k, v in kwargs.items() if k in _QUERY and v is not None]
        return await self._api.call_api(
            "/apis/discovery.k8s.io/v1beta1/endpointslices",
            "GET",
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
            _preload_content=kwargs.get("_preload_content", True),
            _request_timeout=kwargs.get("_request_timeout"),
        )

    async def _served(self, timeout: Any) -> str:
        host = self._api.configuration.host
        try:
            group = await self._group.get_api_group(_request_timeout=timeout)
        except client.exceptions.ApiException as exc:
            raise errors.ClusterUnreachable(
                f"the API server at {host} did not say which discovery.k8s.io versions it "
                f"serves: HTTP {exc.status} {exc.reason}"
            ) from exc
        served = {entry.version for entry in group.versions or ()}
        for version in ("v1", "v1beta1"):
            if version in served:
                return version
        raise errors.ClusterUnreachable(
            f"the API server at {host} serves no EndpointSlices (discovery.k8s.io v1 or "
            "v1beta1): run Kubernetes 1.20 or later"
        )


class _Follower(watching.Follower):
    """One kind, followed into its table of the :class:`Index`, noting when it last heard from
    the API server."""

    def __init__(
        self,
        resource: _Resource,
        call: Callable[..., Any],
        host: str,
        index: Index,
        counters: metrics.Metrics,
        on_listed: Callable[[], None],
    ) -> None:
        super().__init__(
            call=call,
            host=host,
            title=resource.title,
            rbac=resource.rbac,
            subject=f"the cluster's {resource.title}",
            page=PAGE,
            errors_counter=counters.destination_source_errors.labels(kind=resource.kind),
            log=logger,
        )
        self.resource = resource
        self.listed = False
        self._on_listed = on_listed
        self._index = index
        self._table = index.table(resource.kind)
        self._metrics = counters
        self._heard = time.monotonic()
        self._watching = False

    def silent_for(self, now: float) -> float:
        """Seconds since the last list page or watch event, or since an open watch closed; 0
        while a watch is open."""
        return 0.0 if self._watching else max(0.0, now - self._heard)

    def begin_list(self) -> None:
        self._table.discard_staged()

    def take_page(self, items: list[Mapping[str, Any]]) -> None:
        self._heard = time.monotonic()
        for item in items:
            self._table.stage(item)

    def commit_list(self) -> None:
        """The full list replaces the table; the first time, this kind is listed."""
        self._table.commit()
        self._index.changed()
        self._count()
        logger.debug("listed %d %s of interest", self._table.counted, self.resource.title)
        self.listed = True
        self._on_listed()

    def end_list(self) -> None:
        self._table.discard_staged()

    def watch_opened(self) -> None:
        self._watching = True

    def watch_closed(self) -> None:
        self._watching = False
        self._heard = time.monotonic()

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        self._index.apply(self.resource.kind, kind, obj)
        self._count()

    def holding(self) -> str:
        return f"answering lookups from the {self._table.counted} held for up to {STALE_AFTER:g} s"

    def _count(self) -> None:
        self._metrics.destinations.labels(kind=self.resource.kind).set(self._table.counted)
