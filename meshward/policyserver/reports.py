"""The latest trust-state report of each proxy, per namespace, held for the publisher.

The Report RPC feeds :meth:`Reports.record` with a request already authenticated and authorized
for its namespace; this module checks its fields, keeps it (with the time it arrived and the
caller's SPIFFE ID), and forgets a pod not heard from for ``expiry`` seconds (three heartbeats).
:mod:`meshward.policyserver.publisher` writes what is held to ConfigMaps: :attr:`Reports.changed`
wakes it when what a namespace holds changed other than in ``reportedAt`` (a heartbeat alone
does not wake it; it refreshes those on its own schedule).
"""

from __future__ import annotations

import asyncio
import datetime
import re

import pydantic

from meshward import errors, proxyreports
from meshward.identity import pki
from meshward.policy import resources
from meshward.policyserver import metrics
from meshward.policyserver._proto import policy_pb2

EXPIRY = 90.0
"""Seconds after which a pod that stopped reporting is forgotten: three 30-s heartbeats."""
MAX_PER_NAMESPACE = 1000
"""Pods one namespace may have reporting to one server: bounds memory and keeps the published
list well under a ConfigMap's 1 MiB (an entry is about 450 bytes)."""
MAX_UNIX = 253402300799
"""9999-12-31T23:59:59Z, the last time RFC 3339 can write."""
_MAX_ECHO = 80

_FINGERPRINT = re.compile(proxyreports.FINGERPRINT)
_VERSION = re.compile(proxyreports.VERSION)
_POD = re.compile(proxyreports.POD)


def check(
    request: policy_pb2.ProxyReport, caller: pki.Identity, now: datetime.datetime
) -> proxyreports.Proxy:
    """The report as it will be published; raises InvalidProxyReport naming every bad field
    and what to send instead. The namespace is the caller's business (see the server)."""
    problems = []
    if not (len(request.pod) <= proxyreports.MAX_POD and _POD.fullmatch(request.pod)):
        problems.append(
            f"pod {_shown(request.pod)} is not a DNS-1123 subdomain (lowercase letters, digits, "
            "'-' and '.', at most 253): send the pod's name (MESHWARD_PROXY_POD_NAME)"
        )
    if not _FINGERPRINT.fullmatch(request.trust_bundle_fingerprint):
        problems.append(
            f"trust_bundle_fingerprint {_shown(request.trust_bundle_fingerprint)} is not "
            "sha256:<64 lowercase hex digits>: send meshward.trustbundle.fingerprint of the "
            "bundle in force"
        )
    issuer = request.leaf_issuer_fingerprint
    if issuer and not _FINGERPRINT.fullmatch(issuer):
        problems.append(
            f"leaf_issuer_fingerprint {_shown(issuer)} is not sha256:<64 lowercase hex "
            "digits>: send meshward.trustbundle.certificate_fingerprint of the leaf's issuer, "
            "or nothing if an anchor signed the leaf itself"
        )
    if not 0 < request.leaf_not_after_unix <= MAX_UNIX:
        problems.append(
            f"leaf_not_after_unix {request.leaf_not_after_unix} is not a time after 1970 and "
            "before 10000: send the leaf's notAfter in seconds since the Unix epoch"
        )
    if not _VERSION.fullmatch(request.proxy_version):
        problems.append(
            f"proxy_version {_shown(request.proxy_version)} is not 1 to 64 of A-Z a-z 0-9 . + "
            "_ -: send the proxy's meshward version"
        )
    if problems:
        raise errors.InvalidProxyReport("the report is malformed: " + "; ".join(problems))
    try:
        return proxyreports.Proxy(
            pod=request.pod,
            identity=caller.spiffe_id,
            trust_bundle=request.trust_bundle_fingerprint,
            leaf_issuer=issuer or None,
            leaf_not_after=datetime.datetime.fromtimestamp(
                request.leaf_not_after_unix, datetime.UTC
            ),
            proxy_version=request.proxy_version,
            reported_at=now,
        )
    except pydantic.ValidationError as exc:  # the checks above should have caught it
        raise errors.InvalidProxyReport(
            f"the report is malformed: {resources.describe(exc)}"
        ) from exc


def _shown(value: str) -> str:
    return repr(value if len(value) <= _MAX_ECHO else value[:_MAX_ECHO] + "...")


def _state(proxy: proxyreports.Proxy) -> proxyreports.Proxy:
    """What a report says, apart from when it arrived."""
    return proxy.model_copy(update={"reported_at": datetime.datetime.min})


class Reports:
    """Create and use it inside one event loop."""

    def __init__(
        self,
        counters: metrics.Metrics,
        expiry: float = EXPIRY,
        max_per_namespace: int = MAX_PER_NAMESPACE,
    ) -> None:
        self._metrics = counters
        self.expiry = datetime.timedelta(seconds=expiry)
        self._max = max_per_namespace
        self._held: dict[str, dict[str, proxyreports.Proxy]] = {}
        self.changed = asyncio.Event()
        """Set when a namespace's reports changed other than in their times; the publisher
        clears it before it looks."""

    def record(
        self,
        namespace: str,
        request: policy_pb2.ProxyReport,
        caller: pki.Identity,
        now: datetime.datetime,
    ) -> proxyreports.Proxy:
        """Check and keep one report for ``namespace`` (the caller's, already authorized);
        raises InvalidProxyReport, or TooManyProxies for a new pod over the limit."""
        proxy = check(request, caller, now)
        pods = self._held.setdefault(namespace, {})
        held = pods.get(proxy.pod)
        if held is None and len(pods) >= self._max:
            raise errors.TooManyProxies(
                f"namespace {namespace!r} already has {len(pods)} pods reporting to this policy "
                f"server, its limit: pod {proxy.pod!r} is not recorded (reports of pods that "
                f"stopped are forgotten after {self.expiry.total_seconds():g} s)"
            )
        pods[proxy.pod] = proxy
        if held is None or _state(held) != _state(proxy):
            self.changed.set()
        self._metrics.proxies_reporting.labels(namespace=namespace).set(len(pods))
        return proxy

    def namespaces(self) -> list[str]:
        return list(self._held)

    def proxies(self, namespace: str) -> tuple[proxyreports.Proxy, ...]:
        """The pods of ``namespace`` reporting now, sorted by pod."""
        pods = self._held.get(namespace, {})
        return tuple(pods[pod] for pod in sorted(pods))

    def expire(self, now: datetime.datetime) -> list[str]:
        """Forget pods not heard from for ``expiry``; the namespaces that lost one."""
        cutoff = now - self.expiry
        touched = []
        for namespace, pods in list(self._held.items()):
            gone = [pod for pod, proxy in pods.items() if proxy.reported_at <= cutoff]
            if not gone:
                continue
            for pod in gone:
                del pods[pod]
            touched.append(namespace)
            if pods:
                self._metrics.proxies_reporting.labels(namespace=namespace).set(len(pods))
            else:
                del self._held[namespace]
                self._metrics.proxies_reporting.remove(namespace)
        if touched:
            self.changed.set()
        return touched

    def next_expiry(self) -> datetime.datetime | None:
        """When the oldest report held expires, if any is held."""
        oldest = min(
            (proxy.reported_at for pods in self._held.values() for proxy in pods.values()),
            default=None,
        )
        return None if oldest is None else oldest + self.expiry
