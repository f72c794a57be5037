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
- a Service cluster IP (``spec.clusterIPs``; headless and ExternalName Services have none):
  the Service's TCP ``port`` is meshed when every ready endpoint (``conditions.ready`` not
  false) of its EndpointSlices (label ``kubernetes.io/service-name``, same address family) has
  a meshed-pod address for the slice's port of the same name, which is the resolved
  ``targetPort``. The identities are those of these pods; no ready endpoint is not meshed;
- anything else, plaintext.

When several meshed pods claim one IP (a pod gone, the API not yet told), each must take the
port, and any of their identities may answer.

:class:`Index` is the pure part, fed API objects as plain camelCase dicts and keeping only
what lookups need. :class:`Source` is the async edge: it lists and watches the three kinds
across all namespaces like :mod:`meshward.policyserver.configmaps` (a full paged list, a watch
from its resourceVersion, a relist on 410 Gone or failure after a backoff), and sets
``synced`` once each kind has been listed; until then the server answers UNAVAILABLE rather
than guess. Through an outage the answers held keep being given. EndpointSlices are read as
discovery.k8s.io/v1, or v1beta1 from an API server without v1 (Kubernetes 1.20).
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
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Generic, NoReturn, TypeVar

import aiohttp
from kubernetes_asyncio import client

from meshward import errors, inject
from meshward.identity import pki
from meshward.policyserver import configmaps, metrics
from meshward.proxy import interception, proxy_init

logger = logging.getLogger(__name__)

TTL = 5.0
"""Seconds a proxy may act on an answer before asking again. It bounds how long a change goes
unnoticed: an IP reused by another pod is dialled with the old answer for at most this long.
A stale "meshed" answer fails closed, since the new pod can not prove the pinned identity; a
stale "plaintext" answer reaches a pod whose own proxy then applies its inbound policy."""
TTL_MS = int(TTL * 1000)
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
class Pod:
    """A meshed pod: its IPs, SPIFFE ID, and the inbound ports its proxy does not take."""

    ips: tuple[IP, ...]
    identity: str
    skipped: tuple[interception.PortRange, ...]

    def takes(self, port: int) -> bool:
        return not any(r.first <= port <= r.last for r in self.skipped)


@dataclasses.dataclass(frozen=True)
class ServicePort:
    name: str
    port: int


@dataclasses.dataclass(frozen=True)
class Service:
    """A Service's cluster IPs and TCP ports."""

    cluster_ips: tuple[IP, ...]
    ports: tuple[ServicePort, ...]


@dataclasses.dataclass(frozen=True)
class EndpointSlice:
    """One slice of a Service's endpoints: its TCP ports by name and its ready endpoints'
    addresses (an empty tuple for an endpoint whose address does not parse: not meshed)."""

    service: str
    family: int
    ports: tuple[ServicePort, ...]
    ready: tuple[tuple[IP, ...], ...]

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
    """The Service's cluster IPs and TCP ports; None when it has neither."""
    spec = _mapping(obj.get("spec"))
    if spec.get("type") == "ExternalName":
        return None
    listed = spec.get("clusterIPs")
    raw = listed if isinstance(listed, list) and listed else [spec.get("clusterIP")]
    ips = _ips(ip for ip in raw if ip != "None")
    ports = _tcp_ports(spec.get("ports"))
    if not ips or not ports:
        return None
    return Service(cluster_ips=ips, ports=ports)


def reduce_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice | None:
    """The slice's Service, family, TCP ports and ready endpoints; None for a slice of no
    Service or of FQDN addresses (which no cluster IP forwards to)."""
    labels = _mapping(_mapping(obj.get("metadata")).get("labels"))
    service = labels.get(SERVICE_NAME_LABEL)
    family = _FAMILIES.get(str(obj.get("addressType")))
    if not isinstance(service, str) or not service or family is None:
        return None
    ready = []
    endpoints = obj.get("endpoints")
    for endpoint in endpoints if isinstance(endpoints, list) else ():
        entry = _mapping(endpoint)
        if _mapping(entry.get("conditions")).get("ready") is False:
            continue
        ready.append(_addresses(entry.get("addresses")))
    return EndpointSlice(service, family, _tcp_ports(obj.get("ports")), tuple(ready))


# -- the index --------------------------------------------------------------------------------

R = TypeVar("R")


class _Table(Generic[R]):
    """One kind's reduced objects by key, and the keys under each secondary value (an IP, a
    Service). A full list is staged object by object, then replaces the table at once, so a
    lookup never sees half of one."""

    def __init__(
        self,
        reduce: Callable[[Mapping[str, Any]], R | None],
        secondary: Callable[[Key, R], Iterable[Hashable]],
    ) -> None:
        self._reduce = reduce
        self._secondary = secondary
        self.records: dict[Key, R] = {}
        self._by: dict[Hashable, set[Key]] = {}
        self._staged: dict[Key, R] = {}

    def __len__(self) -> int:
        return len(self.records)

    def apply(self, event: str, obj: Mapping[str, Any]) -> None:
        """A watch event (ADDED, MODIFIED, DELETED) of one object."""
        key = _key(obj)
        if key is None:
            return
        record = None if event == "DELETED" else self._reduce(obj)
        old = self.records.pop(key, None)
        if old is not None:
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
        self.records, self._by = {}, {}
        for key, record in staged.items():
            self._add(key, record)

    def find(self, value: Hashable) -> list[tuple[Key, R]]:
        return [(key, self.records[key]) for key in sorted(self._by.get(value, ()))]

    def _add(self, key: Key, record: R) -> None:
        self.records[key] = record
        for value in self._secondary(key, record):
            self._by.setdefault(value, set()).add(key)


class Index:
    """The cluster's meshed pods, Services and EndpointSlices, reduced, and the lookups they
    answer. Pure and synchronous: :class:`Source` feeds it, tests feed it dicts."""

    def __init__(self, trust_domain: str) -> None:
        self.trust_domain = trust_domain
        self._pods: _Table[Pod] = _Table(
            functools.partial(reduce_pod, trust_domain=trust_domain), lambda _, pod: pod.ips
        )
        self._services: _Table[Service] = _Table(reduce_service, lambda _, svc: svc.cluster_ips)
        self._slices: _Table[EndpointSlice] = _Table(
            reduce_endpoint_slice, lambda key, piece: [(key[0], piece.service)]
        )

    def table(self, kind: Kind) -> _Table[Any]:
        tables: dict[Kind, _Table[Any]] = {
            Kind.PODS: self._pods,
            Kind.SERVICES: self._services,
            Kind.ENDPOINTSLICES: self._slices,
        }
        return tables[kind]

    def load(self, kind: Kind, objects: Iterable[Mapping[str, Any]]) -> None:
        """Replace what is held of ``kind`` by ``objects``, as a full list does."""
        table = self.table(kind)
        table.discard_staged()
        for obj in objects:
            table.stage(obj)
        table.commit()

    def apply(self, kind: Kind, event: str, obj: Mapping[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        self.table(kind).apply(event, obj)

    def size(self, kind: Kind) -> int:
        """Objects held: meshed pods, Services with cluster IPs, EndpointSlices of Services."""
        return len(self.table(kind))

    def lookup(self, address: IP, port: int) -> Answer:
        """How a connection to ``address``:``port`` goes (see the module)."""
        services = self._services.find(address)
        if services:
            answers = [self._service(key, svc, address.version, port) for key, svc in services]
            return _all_of(answers)
        return self._pod(address, port)

    def _pod(self, address: IP, port: int) -> Answer:
        pods = self._pods.find(address)
        if not pods or not all(pod.takes(port) for _, pod in pods):
            return PLAIN
        return Answer(True, tuple(sorted({pod.identity for _, pod in pods})))

    def _service(self, key: Key, service: Service, family: int, port: int) -> Answer:
        named = next((p.name for p in service.ports if p.port == port), None)
        if named is None:
            return PLAIN
        answers = []
        for _, piece in self._slices.find(key):
            target = piece.port_named(named)
            if piece.family != family or target is None:
                continue
            for addresses in piece.ready:
                if not addresses:
                    return PLAIN
                answers += [self._pod(address, target) for address in addresses]
        return _all_of(answers)


def _all_of(answers: list[Answer]) -> Answer:
    """Meshed when there is at least one answer and all are meshed; their identities."""
    if not answers or not all(answer.meshed for answer in answers):
        return PLAIN
    return Answer(True, tuple(sorted({i for answer in answers for i in answer.identities})))


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
    meshed without the index knowing it yet."""

    def __init__(self, api: client.ApiClient, index: Index, counters: metrics.Metrics) -> None:
        # Any: called with _preload_content=False they return the raw aiohttp response.
        core: Any = client.CoreV1Api(api)
        host = str(api.configuration.host)
        self.index = index
        self.synced = asyncio.Event()
        self._followers = (
            _Follower(
                _Resource(Kind.PODS, "Pods", "pods"),
                core.list_pod_for_all_namespaces,
                host,
                index,
                counters,
            ),
            _Follower(
                _Resource(Kind.SERVICES, "Services", "services"),
                core.list_service_for_all_namespaces,
                host,
                index,
                counters,
            ),
            _Follower(
                _Resource(
                    Kind.ENDPOINTSLICES, "EndpointSlices", "endpointslices (discovery.k8s.io)"
                ),
                _EndpointSlices(api).list,
                host,
                index,
                counters,
            ),
        )

    async def run(self) -> None:
        """List and watch the three kinds until cancelled."""
        async with asyncio.TaskGroup() as group:
            for follower in self._followers:
                group.create_task(follower.run(self._listed))

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


class _Follower:
    """One kind, followed as :class:`meshward.policyserver.configmaps.ConfigMapSource`
    follows the ConfigMaps."""

    def __init__(
        self,
        resource: _Resource,
        call: Callable[..., Any],
        host: str,
        index: Index,
        counters: metrics.Metrics,
    ) -> None:
        self.resource = resource
        self.listed = False
        self._call = call
        self._host = host
        self._table = index.table(resource.kind)
        self._metrics = counters

    async def run(self, on_listed: Callable[[], None]) -> None:
        failures = 0
        while True:
            try:
                version = await self._list()
                if failures:
                    logger.info(
                        "reading the cluster's %s again after %d failures",
                        self.resource.title,
                        failures,
                    )
                failures = 0
                self.listed = True
                on_listed()
                await self._watch(version)
            except errors.ClusterUnreachable as exc:
                failures += 1
                self._metrics.destination_source_errors.labels(kind=self.resource.kind).inc()
                delay = configmaps.backoff(failures)
                log = logger.warning if failures == 1 else logger.debug
                log(
                    "can not follow the cluster's %s (%s); answering lookups from the %d held, "
                    "retrying in %.1f s",
                    self.resource.title,
                    exc,
                    len(self._table),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        """Replace the table by a full (paged) list; the list's version."""
        self._table.discard_staged()
        token: str | None = None
        try:
            while True:
                page = await self._request(
                    "list",
                    limit=PAGE,
                    _continue=token,
                    _request_timeout=(configmaps.CONNECT_TIMEOUT, configmaps.LIST_TIMEOUT),
                )
                body = configmaps.parse_json(
                    await configmaps.read_all(page, self._host), f"a list of {self.resource.title}"
                )
                items = body.get("items")
                for item in items if isinstance(items, list) else ():
                    if isinstance(item, Mapping):
                        self._table.stage(item)
                meta = _mapping(body.get("metadata"))
                token = meta.get("continue") or None
                if token is None:
                    self._table.commit()
                    self._count()
                    logger.debug("listed %d %s of interest", len(self._table), self.resource.title)
                    return str(meta.get("resourceVersion") or "")
        finally:
            self._table.discard_staged()

    async def _watch(self, version: str) -> None:
        """Apply events until the version expires (410 Gone); resume after ordinary ends."""
        while True:
            response = await self._request(
                "watch",
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=version,
                timeout_seconds=configmaps.WATCH_TIMEOUT,
                _request_timeout=(configmaps.CONNECT_TIMEOUT, configmaps.WATCH_TIMEOUT + 60),
            )
            try:
                async for event in configmaps.events(response, self._host):
                    kind = event.get("type")
                    obj = _mapping(event.get("object"))
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            logger.debug(
                                "%s watch version %s expired; listing again",
                                self.resource.title,
                                version,
                            )
                            return
                        raise errors.ClusterUnreachable(
                            f"the watch of {self.resource.title} at {self._host} failed: "
                            f"HTTP {obj.get('code')} {obj.get('message')}"
                        )
                    version = str(_mapping(obj.get("metadata")).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._table.apply(str(kind), obj)
                        self._count()
            finally:
                response.release()

    def _count(self) -> None:
        self._metrics.destinations.labels(kind=self.resource.kind).set(len(self._table))

    async def _request(self, what: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await configmaps.request(
            self._call, self._host, what, self.resource.title, self.resource.rbac, **kwargs
        )
