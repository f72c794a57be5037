"""The proxies' reports, published for the operator as ``meshward-proxies-<namespace>``
ConfigMaps in the policy server's own namespace (format and reading rules:
:mod:`meshward.proxyreports`).

Each replica owns one data key of each ConfigMap, ``<its pod name>.json``, and changes only that
key: every write reads the ConfigMap and writes it back with the version it read (a conflict with
another replica's write is retried), so replicas never need patch rights. A namespace is written

* when what its proxies hold changes (a pod appears, is forgotten, or reports another bundle,
  issuer, leaf or version), at most once per :data:`DEBOUNCE` second, so a rollout of hundreds
  of pods is a handful of writes;
* every :data:`REFRESH` seconds while it has proxies, to carry their heartbeats' ``reportedAt``
  forward (each heartbeat alone causes no write);
* to remove the key once it has none; the ConfigMap is deleted with its last key.

While writing, keys of replicas that have not written for :data:`REPLICA_GONE` seconds (a replica
deleted without cleaning up) are removed. A failed write is logged once (then at debug level
until it succeeds again), counted, and retried with backoff; the reports stay held meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from meshward import errors, proxyreports
from meshward.policyserver import metrics, reports

logger = logging.getLogger(__name__)

DEBOUNCE = 1.0
REFRESH = 30.0
REPLICA_GONE = datetime.timedelta(minutes=10)
BACKOFF_MIN, BACKOFF_MAX = 1.0, 30.0
REQUEST_TIMEOUT = 10.0
CONFLICT_RETRIES = 5


@dataclasses.dataclass
class _Written:
    """What the key of one namespace holds (as far as this replica knows), and when."""

    state: tuple[proxyreports.Proxy, ...] | None
    """The proxies written, with their times cleared; None: the key is absent."""
    at: float
    """Loop time of the last write (or failed attempt)."""
    failures: int = 0


def _due(
    written: _Written | None, state: tuple[proxyreports.Proxy, ...] | None, now: float
) -> float | None:
    """When a namespace is to be written next (loop time), None if it need not be."""
    if written is None:
        return None if state is None else now
    if written.failures:
        return written.at + min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(written.failures - 1, 16))
    if written.state != state:
        return written.at + DEBOUNCE
    if state is not None:
        return written.at + REFRESH
    return None


def _state(proxies: tuple[proxyreports.Proxy, ...]) -> tuple[proxyreports.Proxy, ...]:
    return tuple(p.model_copy(update={"reported_at": datetime.datetime.min}) for p in proxies)


class Publisher:
    def __init__(
        self,
        api: client.ApiClient,
        store: reports.Reports,
        counters: metrics.Metrics,
        namespace: str,
        instance: str,
        *,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        """Publish ``store`` into ConfigMaps of ``namespace`` under the key of ``instance``."""
        self._core: Any = client.CoreV1Api(api)
        self._host = str(api.configuration.host)
        self._store = store
        self._metrics = counters
        self.namespace = namespace
        self.instance = instance
        self.key = proxyreports.data_key(instance)
        self._now = now
        self._written: dict[str, _Written] = {}

    async def run(self) -> None:
        """Publish until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self._store.changed.clear()
            self._store.expire(self._now())
            wake = await self._publish_due(loop.time())
            expiry = self._store.next_expiry()
            if expiry is not None:
                left = (expiry - self._now()).total_seconds()
                wake = left if wake is None else min(wake, left)
            if self._store.changed.is_set():
                continue
            timeout = 3600.0 if wake is None else max(0.0, wake) + 0.01
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._store.changed.wait(), timeout)

    async def _publish_due(self, now: float) -> float | None:
        """Write every namespace that is due; seconds until the next one will be, if any."""
        wake: float | None = None
        for namespace in sorted(set(self._store.namespaces()) | set(self._written)):
            proxies = self._store.proxies(namespace)
            state = _state(proxies) if proxies else None
            written = self._written.get(namespace)
            due = _due(written, state, now)
            if due is None:
                if written is not None and now - written.at >= DEBOUNCE:
                    del self._written[namespace]  # its key is gone, as wanted
            elif due > now:
                wake = due - now if wake is None else min(wake, due - now)
            else:
                await self._write(namespace, proxies, state, now)
        return wake

    async def _write(
        self,
        namespace: str,
        proxies: tuple[proxyreports.Proxy, ...],
        state: tuple[proxyreports.Proxy, ...] | None,
        now: float,
    ) -> None:
        name = proxyreports.configmap_name(namespace)
        written = self._written.get(namespace)
        text = (
            proxyreports.publish(self.instance, proxies, self._now()).to_json() if proxies else None
        )
        try:
            await self._put(name, namespace, text)
        except errors.ClusterUnreachable as exc:
            failures = (written.failures if written else 0) + 1
            self._written[namespace] = _Written(
                state=written.state if written else None, at=now, failures=failures
            )
            self._metrics.report_writes.labels(result="failed").inc()
            (logger.warning if failures == 1 else logger.debug)(
                "can not publish the proxy reports of namespace %s to ConfigMap %s/%s, "
                "retrying: %s",
                namespace,
                self.namespace,
                name,
                exc,
            )
            return
        self._metrics.report_writes.labels(result="ok").inc()
        if written is not None and written.failures:
            logger.info(
                "published the proxy reports of namespace %s again after %d failures",
                namespace,
                written.failures,
            )
        logger.debug(
            "namespace %s: %d proxies published to %s/%s",
            namespace,
            len(proxies),
            self.namespace,
            name,
        )
        self._written[namespace] = _Written(state=state, at=now)

    async def _put(self, name: str, namespace: str, text: str | None) -> None:
        """Make our key of ConfigMap ``name`` hold ``text`` (None: remove it), leaving the other
        replicas' keys as they are; retried when another replica's write came in between."""
        core = self._core
        for _ in range(CONFLICT_RETRIES):
            current = await self._call("read", core.read_namespaced_config_map, name, ok=(404,))
            if current is None:
                if text is None:
                    return
                body = self._body(name, namespace, {self.key: text})
                if await self._call("create", core.create_namespaced_config_map, body=body):
                    return
                continue  # another replica created it first
            version = current.metadata.resource_version
            data = dict(current.data or {})
            wanted = self._prune(dict(data))
            if text is None:
                wanted.pop(self.key, None)
            else:
                wanted[self.key] = text
            labels = {**(current.metadata.labels or {}), proxyreports.LABEL: "true"}
            notes = {**(current.metadata.annotations or {}), **self._annotations(namespace)}
            if (wanted, labels, notes) == (
                data,
                current.metadata.labels,
                current.metadata.annotations,
            ):
                return
            if wanted:
                body = self._body(name, namespace, wanted)
                body["metadata"].update(labels=labels, annotations=notes, resourceVersion=version)
                done = await self._call(
                    "update", core.replace_namespaced_config_map, name, body=body, ok=(404,)
                )
            else:
                options = client.V1DeleteOptions(
                    preconditions=client.V1Preconditions(resource_version=version)
                )
                done = await self._call(
                    "delete", core.delete_namespaced_config_map, name, body=options, ok=(404,)
                )
            if done:
                return
        raise errors.ClusterUnreachable(
            f"ConfigMap {self.namespace}/{name} changed under each of {CONFLICT_RETRIES} writes "
            "in a row (by other policy server replicas?)"
        )

    def _prune(self, data: dict[str, str]) -> dict[str, str]:
        """``data`` without the keys of replicas that stopped writing long ago."""
        cutoff = self._now() - REPLICA_GONE
        for key, text in list(data.items()):
            if key == self.key or not key.endswith(proxyreports.KEY_SUFFIX):
                continue
            try:
                published = proxyreports.parse(text, f"key {key}")
            except errors.InvalidProxyReport:
                continue  # perhaps a newer server's format: not ours to judge
            if published.updated_at < cutoff:
                logger.info(
                    "removing key %s (replica %s, last written %s) from the proxy reports",
                    key,
                    published.reported_by,
                    published.updated_at.isoformat(),
                )
                del data[key]
        return data

    @staticmethod
    def _annotations(namespace: str) -> dict[str, str]:
        return {proxyreports.NAMESPACE_ANNOTATION: namespace}

    def _body(self, name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {proxyreports.LABEL: "true"},
                "annotations": self._annotations(namespace),
            },
            "data": data,
        }

    async def _call(
        self, what: str, method: Any, *args: Any, ok: tuple[int, ...] = (), **kwargs: Any
    ) -> Any:
        """``method`` on a ConfigMap of our namespace: its result, or None when it failed with
        409 Conflict (a write raced another) or a status in ``ok``; raises ClusterUnreachable
        for any other failure."""
        try:
            return await method(
                *args, namespace=self.namespace, _request_timeout=REQUEST_TIMEOUT, **kwargs
            )
        except client.ApiException as exc:
            if exc.status in ok or (what != "read" and exc.status == 409):
                return None
            raise errors.ClusterUnreachable(self._refused(what, exc)) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise errors.ClusterUnreachable(
                f"the API server at {self._host} did not answer the ConfigMap {what}: "
                f"{type(exc).__name__} {exc}"
            ) from exc

    def _refused(self, what: str, exc: client.ApiException) -> str:
        message = f"the ConfigMap {what} failed at {self._host}: HTTP {exc.status} {exc.reason}"
        if exc.status == 403:
            return (
                f"{message}: grant the policy server get, create, update and delete on "
                f"configmaps in namespace {self.namespace}"
            )
        if exc.status == 404:
            return (
                f"{message}: does namespace {self.namespace} exist? Set --namespace "
                "(MESHWARD_NAMESPACE) to the namespace the policy server runs in"
            )
        return message
