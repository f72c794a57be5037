"""Every namespace's ``meshward-policy`` ConfigMap, followed from the API server into
:class:`~meshward.policyserver.documents.Documents`.

A full list (paged) first, then a watch from the list's resourceVersion, resumed from the last
version seen when the API server ends it; when that version has expired (410 Gone) or anything
fails, the ConfigMaps are listed again, after a capped exponential backoff if it was a failure.
Throughout an outage the documents already held keep being served: proxies keep their policy
when the source is unreachable, and so does this server.

Requests and events are read as plain JSON, not through the client's models: a compiled
document may be close to a ConfigMap's 1 MiB, more than the client's line-based watch reader
accepts, and the models would only be turned back into JSON text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from meshward import errors
from meshward.policy import compiled
from meshward.policyserver import documents, metrics

logger = logging.getLogger(__name__)

SELECTOR = f"metadata.name={compiled.CONFIGMAP_NAME}"
PAGE = 100
WATCH_TIMEOUT = 300
"""Seconds the API server keeps one watch open; it is then resumed where it left off."""
CONNECT_TIMEOUT = 10.0
LIST_TIMEOUT = 60.0
MAX_EVENT_BYTES = 8 * 1024 * 1024
"""A 1 MiB ConfigMap (or any object etcd holds), JSON-escaped inside a watch event, with room
to spare."""
BACKOFF_MIN, BACKOFF_MAX = 0.2, 10.0


class ConfigMapSource:
    """Keeps ``store`` equal to the cluster's valid documents. ``synced`` is set once the first
    full list has been taken in (before that, a namespace's document may just not be read yet)."""

    def __init__(
        self, api: client.ApiClient, store: documents.Documents, counters: metrics.Metrics
    ) -> None:
        # Any: called with _preload_content=False it returns the raw aiohttp response.
        self._core: Any = client.CoreV1Api(api)
        self._host = str(api.configuration.host)
        self._store = store
        self._metrics = counters
        self.synced = asyncio.Event()

    async def run(self) -> None:
        """List and watch until cancelled."""
        failures = 0
        while True:
            try:
                version = await self._list()
                if failures:
                    logger.info(
                        "reading meshward-policy ConfigMaps again after %d failures", failures
                    )
                failures = 0
                self.synced.set()
                await self._watch(version)
            except errors.ClusterUnreachable as exc:
                failures += 1
                self._metrics.source_errors.inc()
                delay = backoff(failures)
                log = logger.warning if failures == 1 else logger.debug
                log(
                    "can not follow the meshward-policy ConfigMaps (%s); serving the %d "
                    "document(s) held, retrying in %.1f s",
                    exc,
                    len(self._store.namespaces()),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _list(self) -> str:
        """Take in every ConfigMap, forget documents whose ConfigMap is gone; the list's version."""
        seen: list[str] = []
        token: str | None = None
        while True:
            page = await self._request(
                "list",
                field_selector=SELECTOR,
                limit=PAGE,
                _continue=token,
                _request_timeout=(CONNECT_TIMEOUT, LIST_TIMEOUT),
            )
            body = parse_json(await self._read_all(page), "a list of ConfigMaps")
            for item in body.get("items") or ():
                namespace = self._apply("ADDED", item, quiet=True)
                if namespace:
                    seen.append(namespace)
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                for gone in self._store.retain(seen):
                    logger.info("namespace %s: policy ConfigMap gone; new watchers get none", gone)
                self._metrics.documents.set(len(self._store.namespaces()))
                logger.info("read %d namespaces' compiled policy", len(seen))
                return str(meta.get("resourceVersion") or "")

    async def _watch(self, version: str) -> None:
        """Apply events until the version expires (410 Gone); resume after ordinary ends."""
        while True:
            response = await self._request(
                "watch",
                field_selector=SELECTOR,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=version,
                timeout_seconds=WATCH_TIMEOUT,
                _request_timeout=(CONNECT_TIMEOUT, WATCH_TIMEOUT + 60),
            )
            try:
                async for event in events(response, self._host):
                    kind = event.get("type")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        if obj.get("code") == 410:
                            logger.debug("watch version %s expired; listing again", version)
                            return
                        raise errors.ClusterUnreachable(
                            f"the watch at {self._host} failed: HTTP {obj.get('code')} "
                            f"{obj.get('message')}"
                        )
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._apply(kind, obj)
                        self._metrics.documents.set(len(self._store.namespaces()))
            finally:
                response.release()

    def _apply(self, kind: str, configmap: dict[str, Any], quiet: bool = False) -> str | None:
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

    async def _request(self, what: str, **kwargs: Any) -> aiohttp.ClientResponse:
        return await request(
            self._core.list_config_map_for_all_namespaces,
            self._host,
            what,
            "ConfigMaps",
            "configmaps",
            **kwargs,
        )

    async def _read_all(self, response: aiohttp.ClientResponse) -> bytes:
        return await read_all(response, self._host)


# -- shared with the other list-and-watch sources (meshward.policyserver.destinations) -------


def backoff(failures: int) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: capped, exponential, and
    jittered so that replicas do not retry in step."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** (failures - 1)) * (0.5 + random.random() / 2)


async def request(
    call: Callable[..., Awaitable[Any]],
    host: str,
    what: str,
    kind: str,
    resource: str,
    **kwargs: Any,
) -> aiohttp.ClientResponse:
    """The raw response of ``call``, a kubernetes_asyncio list method (a watch with
    ``watch=True``) of ``kind`` objects (``resource`` as RBAC names it), to read as JSON.

    Raises ClusterUnreachable, naming the missing grant on HTTP 403, for any failure."""
    try:
        response: aiohttp.ClientResponse = await call(_preload_content=False, **kwargs)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the API server at {host} did not answer the {what}: {type(exc).__name__} {exc}"
        ) from exc
    if not 200 <= response.status <= 299:
        try:
            text = await response.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            text = ""
        finally:
            response.release()
        message = status_message(text) or str(response.reason)
        hint = (
            f": grant list and watch on {resource} cluster-wide" if response.status == 403 else ""
        )
        raise errors.ClusterUnreachable(
            f"the {what} of {kind} failed at {host}: HTTP {response.status} {message}{hint}"
        )
    return response


async def read_all(response: aiohttp.ClientResponse, host: str) -> bytes:
    """A whole list response, released afterwards."""
    try:
        return await response.read()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the API server at {host} broke off a list: {type(exc).__name__} {exc}"
        ) from exc
    finally:
        response.release()


async def events(response: aiohttp.ClientResponse, host: str) -> AsyncIterator[dict[str, Any]]:
    """The watch's newline-delimited JSON events, of any size up to MAX_EVENT_BYTES."""
    buffer = bytearray()
    try:
        async for chunk in response.content.iter_any():
            scanned = len(buffer)
            buffer += chunk
            while (end := buffer.find(b"\n", scanned)) >= 0:
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                scanned = 0
                if line.strip():
                    yield parse_json(line, "a watch event")
            if len(buffer) > MAX_EVENT_BYTES:
                raise errors.ClusterUnreachable(
                    f"a watch event from {host} is over {MAX_EVENT_BYTES} bytes; no Kubernetes "
                    "object is that large (etcd stores at most 1.5 MiB)"
                )
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise errors.ClusterUnreachable(
            f"the watch at {host} broke off: {type(exc).__name__} {exc}"
        ) from exc


def parse_json(data: bytes, what: str) -> dict[str, Any]:
    """``data`` as the JSON object the API server must have sent; ClusterUnreachable if not."""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise errors.ClusterUnreachable(f"the API server sent {what} that is not JSON") from exc
    if not isinstance(value, dict):
        raise errors.ClusterUnreachable(f"the API server sent {what} that is not a JSON object")
    return value


def status_message(text: str) -> str:
    """The message of a Kubernetes Status in ``text``; empty when there is none."""
    try:
        status = json.loads(text)
    except ValueError:
        return ""
    return str(status.get("message") or "") if isinstance(status, dict) else ""
