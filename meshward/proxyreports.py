"""What proxies report about their trust state, as the policy server publishes it for the
operator: the one definition of the ``meshward-proxies-<namespace>`` ConfigMaps. No I/O.

An anchor rotation (issue 6) waits, between phases, until every proxy has loaded the new trust
bundle and, later, until every proxy holds a leaf from the new issuer. Each proxy sends its
state to the policy server it follows (the ``Report`` RPC of ``policyserver/_proto/policy.proto``)
when it changes and every 30 s as a heartbeat; the server keeps the latest report per pod and
writes them here.

Where: ConfigMaps in the control plane's namespace (where the policy server runs, ``meshward``
by default), one per meshed namespace, named by :func:`configmap_name`
(``meshward-proxies-<namespace>``), labelled ``meshward.io/proxy-reports: "true"`` (list them
with that selector) and annotated ``meshward.io/namespace: <namespace>`` (the annotation, not the
name, is authoritative).

Layout: each policy server replica owns one data key, ``<replica pod name>.json``, holding a
:class:`Published` as compact JSON::

    {"reportedBy": "meshward-policy-6d9f-x2x7q",
     "updatedAt": "2026-11-24T10:00:00Z",
     "proxies": [{"pod": "web-0",
                  "identity": "spiffe://cluster.local/ns/emojivoto/sa/web",
                  "trustBundle": "sha256:<64 hex>",
                  "leafIssuer": "sha256:<64 hex>",      (null: signed by an anchor itself)
                  "leafNotAfter": "2026-11-25T10:00:00Z",
                  "proxyVersion": "0.1.0",
                  "reportedAt": "2026-11-24T09:59:58Z"}, ...]}   (sorted by pod)

Fingerprints are computed as :mod:`meshward.trustbundle` defines them, the same values a proxy's
admin endpoint shows on ``/identity``. Times are RFC 3339 in UTC, to the second.

How a reader decides which proxies are live (:func:`collect`, then :meth:`Collected.live`):

1. Read every ``*.json`` key of the namespace's ConfigMap. A proxy reports to one replica at a
   time, but after it moves (a reconnect, a replica restart) an older replica may still list
   it for a while: per pod, the entry with the newest ``reportedAt`` wins.
2. A pod is live when that ``reportedAt`` is at most :data:`LIVE_WITHIN` (90 s) old. The
   numbers behind it: a proxy reports every 30 s; a server rewrites its key when what it holds
   changes (within a second) and at least every 30 s while it holds any proxy, so a live proxy's
   ``reportedAt`` here is at most about 61 s old, and 90 s leaves room for one late
   heartbeat. The server itself forgets a pod not heard from for 90 s.
3. A pod absent from the ConfigMap, or not live, is not known to hold anything; whether such a
   pod blocks a phase (it may be starting, or gone) is the reader's decision, made with the
   pod list.

Readers must compare with their own clock; a key that does not parse is reported in
:attr:`Collected.unreadable` and contributes nothing (so it can only delay a rotation, never
rush one). Unknown fields are ignored, so a newer server can add some.

Trust: a report is authenticated (the server takes it only over mTLS from a certificate of the
same namespace), but any proxy of a namespace may report for any pod of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import pydantic
from pydantic import alias_generators

from meshward import errors
from meshward.policy import resources

CONFIGMAP_PREFIX = "meshward-proxies-"
LABEL = "meshward.io/proxy-reports"
"""Label on every report ConfigMap, value ``"true"``."""
NAMESPACE_ANNOTATION = "meshward.io/namespace"
"""Annotation naming the meshed namespace a report ConfigMap describes."""
KEY_SUFFIX = ".json"
LIVE_WITHIN = datetime.timedelta(seconds=90)
"""A pod whose newest ``reportedAt`` is older than this is not live."""
MAX_NAME = 253

FINGERPRINT = r"^sha256:[0-9a-f]{64}$"
VERSION = r"^[A-Za-z0-9.+_-]{1,64}$"
POD = resources.DNS_SUBDOMAIN
MAX_POD = 253
INSTANCE = r"^[-._a-zA-Z0-9]{1,200}$"
"""A replica name: it becomes a ConfigMap data key (with :data:`KEY_SUFFIX`)."""

Fingerprint = Annotated[str, pydantic.Field(pattern=FINGERPRINT)]


def _rfc3339(at: datetime.datetime) -> str:
    return at.astimezone(datetime.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
    )


class Proxy(_Model):
    """One pod's latest report, as one replica received it."""

    pod: Annotated[str, pydantic.Field(pattern=POD, max_length=MAX_POD)]
    identity: Annotated[str, pydantic.Field(pattern=r"^spiffe://[^\s]+$", max_length=2048)]
    """The SPIFFE ID of the certificate the report came with."""
    trust_bundle: Fingerprint
    leaf_issuer: Fingerprint | None
    leaf_not_after: pydantic.AwareDatetime
    proxy_version: Annotated[str, pydantic.Field(pattern=VERSION)]
    reported_at: pydantic.AwareDatetime

    @pydantic.field_serializer("leaf_not_after", "reported_at")
    def _times(self, at: datetime.datetime) -> str:
        return _rfc3339(at)

    def live(self, now: datetime.datetime) -> bool:
        """Whether this report is recent enough to count (see the module docstring)."""
        return now - self.reported_at <= LIVE_WITHIN


class Published(_Model):
    """One replica's data key: every pod of the namespace that reports to it."""

    reported_by: Annotated[str, pydantic.Field(pattern=INSTANCE)]
    updated_at: pydantic.AwareDatetime
    proxies: tuple[Proxy, ...]

    @pydantic.field_serializer("updated_at")
    def _time(self, at: datetime.datetime) -> str:
        return _rfc3339(at)

    @pydantic.model_validator(mode="after")
    def _sorted_and_unique(self) -> Published:
        pods = [proxy.pod for proxy in self.proxies]
        if pods != sorted(set(pods)):
            raise ValueError("proxies must be sorted by pod, each pod once")
        return self

    def to_json(self) -> str:
        return json.dumps(
            self.model_dump(by_alias=True, mode="json"), sort_keys=True, separators=(",", ":")
        )


def publish(reported_by: str, proxies: Iterable[Proxy], updated_at: datetime.datetime) -> Published:
    """A replica's key, its proxies sorted by pod (raises ValueError on a duplicate pod)."""
    return Published(
        reported_by=reported_by,
        updated_at=updated_at,
        proxies=tuple(sorted(proxies, key=lambda proxy: proxy.pod)),
    )


def parse(text: str | bytes, what: str = "the report list") -> Published:
    """A replica's key parsed and checked; raises :class:`~meshward.errors.InvalidProxyReport`
    naming ``what`` and every problem."""
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:
        raise errors.InvalidProxyReport(f"{what} is not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise errors.InvalidProxyReport(f"{what} is not a JSON object")
    try:
        return Published.model_validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        raise errors.InvalidProxyReport(
            f"{what} is malformed: {resources.describe(exc)}; the policy server rewrites it "
            "within 30 s, or delete the key so it does"
        ) from exc


def configmap_name(namespace: str) -> str:
    """``meshward-proxies-<namespace>``; a name over Kubernetes' 253 characters is cut and
    ends in a hash of the namespace instead (not for a valid namespace, at most 63)."""
    name = CONFIGMAP_PREFIX + namespace
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(namespace.encode()).hexdigest()[:16]
    keep = MAX_NAME - len(CONFIGMAP_PREFIX) - 1 - len(digest)
    return f"{CONFIGMAP_PREFIX}{namespace[:keep].rstrip('-.')}-{digest}"


def data_key(instance: str) -> str:
    """The data key a replica named ``instance`` owns."""
    return instance + KEY_SUFFIX


@dataclasses.dataclass(frozen=True)
class Collected:
    """Every replica's key of one ConfigMap, merged."""

    proxies: Mapping[str, Proxy]
    """Per pod, the entry with the newest ``reportedAt`` (live or not)."""
    unreadable: tuple[str, ...] = ()
    """One line per key that did not parse: the key and why."""

    def live(self, now: datetime.datetime) -> dict[str, Proxy]:
        """The pods whose newest report is at most :data:`LIVE_WITHIN` old at ``now``."""
        return {pod: proxy for pod, proxy in self.proxies.items() if proxy.live(now)}


def collect(data: Mapping[str, str] | None) -> Collected:
    """Merge the ``*.json`` keys of a report ConfigMap's ``data`` (None: no data)."""
    newest: dict[str, Proxy] = {}
    unreadable: list[str] = []
    for key, text in sorted((data or {}).items()):
        if not key.endswith(KEY_SUFFIX):
            continue
        try:
            published = parse(text, f"key {key}")
        except errors.InvalidProxyReport as exc:
            unreadable.append(str(exc))
            continue
        for proxy in published.proxies:
            held = newest.get(proxy.pod)
            if held is None or proxy.reported_at > held.reported_at:
                newest[proxy.pod] = proxy
    return Collected(proxies=newest, unreadable=tuple(unreadable))
