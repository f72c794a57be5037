"""Every namespace's ``meshward-policy`` ConfigMap, followed from the API server into
:class:`~meshward.policyserver.documents.Documents`.

A full list (paged) first, then a watch from the list's resourceVersion, resumed from the last
version seen when the API server ends it; when that version has expired (410 Gone) or anything
fails, the ConfigMaps are listed again, after a capped exponential backoff if it was a failure
(the loop is :class:`meshward.policyserver.watching.Follower`). Throughout an outage the
documents already held keep being served: proxies keep their policy when the source is
unreachable, and so does this server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client

from meshward import errors
from meshward.policy import compiled
from meshward.policyserver import documents, metrics, watching

logger = logging.getLogger(__name__)

SELECTOR = f"metadata.name={compiled.CONFIGMAP_NAME}"
PAGE = 100


class ConfigMapSource(watching.Follower):
    """Keeps ``store`` equal to the cluster's valid documents. ``synced`` is set once the first
    full list has been taken in (before that, a namespace's document may just not be read yet)."""

    def __init__(
        self, api: client.ApiClient, store: documents.Documents, counters: metrics.Metrics
    ) -> None:
        # Any: called with _preload_content=False it returns the raw aiohttp response.
        core: Any = client.CoreV1Api(api)
        super().__init__(
            call=core.list_config_map_for_all_namespaces,
            host=str(api.configuration.host),
            title="ConfigMaps",
            rbac="configmaps",
            subject="the meshward-policy ConfigMaps",
            page=PAGE,
            errors_counter=counters.source_errors,
            log=logger,
            field_selector=SELECTOR,
        )
        self._store = store
        self._metrics = counters
        self._seen: list[str] = []
        self.synced = asyncio.Event()

    def begin_list(self) -> None:
        self._seen = []

    def take_page(self, items: list[Mapping[str, Any]]) -> None:
        for item in items:
            namespace = self._apply("ADDED", item, quiet=True)
            if namespace:
                self._seen.append(namespace)

    def commit_list(self) -> None:
        """Forget documents whose ConfigMap is gone; the first time, the store is synced."""
        for gone in self._store.retain(self._seen):
            logger.info("namespace %s: policy ConfigMap gone; new watchers get none", gone)
        self._metrics.documents.set(len(self._store.namespaces()))
        logger.info("read %d namespaces' compiled policy", len(self._seen))
        self.synced.set()

    def apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        self._apply(kind, obj)
        self._metrics.documents.set(len(self._store.namespaces()))

    def holding(self) -> str:
        return f"serving the {len(self._store.namespaces())} document(s) held"

    def _apply(self, kind: str, configmap: Mapping[str, Any], quiet: bool = False) -> str | None:
        """One ConfigMap event into the store; the namespace if it holds a valid document.
        ``quiet`` (a full list) logs changes at debug level: there may be thousands."""
        namespace = str((configmap.get("metadata") or {}).get("namespace") or "")
        if not namespace:
            return None
        if kind == "DELETED":
            if self._store.remove(namespace):
                logger.info(
                    "namespace %s: policy ConfigMap deleted; new watchers get none", namespace
                )
            return None
        raw = (configmap.get("data") or {}).get(compiled.CONFIGMAP_KEY)
        try:
            if not isinstance(raw, str):
                raise errors.PolicyError(
                    f"the ConfigMap has no {compiled.CONFIGMAP_KEY!r} key; the operator writes "
                    "it: check that it runs, or delete the ConfigMap so it is rebuilt"
                )
            changed = self._store.put(namespace, raw.encode())
        except errors.PolicyError as exc:
            self._metrics.documents_refused.inc()
            held = self._store.get(namespace)
            logger.error(
                "namespace %s: compiled policy refused, still serving %s: %s",
                namespace,
                held.hash[:19] if held else "none (watchers get no policy)",
                exc,
            )
            return namespace if held else None
        if changed:
            held = self._store.get(namespace)
            (logger.debug if quiet else logger.info)(
                "namespace %s: policy %s in effect", namespace, held.hash[:19] if held else ""
            )
        return namespace
