"""Rebuild a namespace's compiled policy from its current state, and write it back.

This is the operator's I/O edge. Events only say *which* namespace to look at again: every
reconcile reads the whole namespace afresh, compiles it with the pure
:func:`meshward.policy.compile.compile_namespace`, then writes the ``meshward-policy``
ConfigMap and the resources' status conditions where they changed. A missed or reordered event
therefore can not leave a stale allow.

Contract: ``mark(ns)`` is cheap and never raises; reconciles of one namespace never overlap;
bursts of events coalesce into one reconcile; a failed reconcile is retried with backoff; one
namespace's failure never touches another's.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any

from kubernetes_asyncio import client

from meshward import errors, kube
from meshward.operator import _settings
from meshward.policy import compile as policy_compile
from meshward.policy import compiled, resources, workload

logger = logging.getLogger(__name__)

DEBOUNCE = 0.02
MAX_BACKOFF = 30.0
RESYNC_INTERVAL = 300.0
"""Every namespace is rebuilt this often anyway: a safety net for events lost in transit."""
MAX_DOCUMENT_BYTES = 1_000_000
"""A ConfigMap holds at most 1 MiB, metadata included."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshward-operator"}
HASH_ANNOTATION = "policy.meshward.io/hash"


def fit(document: compiled.PolicyDocument, namespace: str) -> tuple[compiled.PolicyDocument, str]:
    """The document and its JSON, shrunk to fail closed if it would not fit in a ConfigMap.

    Keeping the previous document instead would keep allows that were since removed, so an
    oversized namespace gets deny-by-default without per-pod entries (Servers still apply), and
    an error in the log says why.
    """
    text = document.to_json()
    if len(text) <= MAX_DOCUMENT_BYTES:
        return document, text
    logger.error(
        "namespace %s: compiled policy is %d bytes (%d pods), over the %d-byte ConfigMap limit; "
        "writing a deny-by-default document without per-pod entries instead",
        namespace,
        len(text),
        len(document.pods),
        MAX_DOCUMENT_BYTES,
    )
    closed = document.model_copy(
        update={"pods": {}, "default_policy": resources.DefaultPolicy.DENY}
    )
    return closed, closed.to_json()


class Reconciler:
    """Rebuilds namespaces on request: coalesced, serialised per namespace, retried on failure.

    Create it inside the operator's event loop; ``start()`` begins the periodic resync and
    ``close()`` cancels every task it started.
    """

    def __init__(self, api: client.ApiClient, settings: _settings.OperatorSettings) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._settings = settings
        self._pending: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_requested = False
        self._pods: dict[tuple[str, str], tuple[workload.Pod, bool]] = {}

    def mark(self, namespace: str | None, delay: float = DEBOUNCE) -> None:
        """Ask for ``namespace`` to be rebuilt soon."""
        if not namespace or self._settings.excludes(namespace):
            return
        if namespace in self._pending:
            return
        self._pending.add(namespace)
        self._spawn(self._run(namespace, delay))

    def pod_changed(
        self, namespace: str | None, body: Mapping[str, Any], deleted: bool = False
    ) -> None:
        """A pod event: rebuild only when what policy reads of the pod changed (its labels,
        ports, probes, annotations, deletion), not on every status update."""
        if not namespace:
            return
        pod = workload.Pod.from_api(body)
        key = (namespace, pod.name)
        seen = (pod, bool((body.get("metadata") or {}).get("deletionTimestamp")))
        if deleted:
            self._pods.pop(key, None)
        elif self._pods.get(key) == seen:
            return
        else:
            self._pods[key] = seen
        self.mark(namespace)

    def mark_all(self) -> None:
        """Ask for every namespace to be rebuilt (a mesh-wide setting changed); never lost:
        listing the namespaces is retried with backoff until it succeeds."""
        if self._all_requested:
            return
        self._all_requested = True
        self._spawn(self._mark_all())

    def start(self, interval: float = RESYNC_INTERVAL) -> None:
        """Begin rebuilding every namespace each ``interval`` seconds."""
        self._spawn(self._resync(interval))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mark_all(self) -> None:
        failures = 0
        while True:
            try:
                listing = await self._core.list_namespace()
            except Exception as exc:  # noqa: BLE001 - retried until the API answers
                failures += 1
                backoff = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
                logger.warning(
                    "listing namespaces failed (%s); retrying in %.1f s",
                    kube.api_message(exc) or type(exc).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                continue
            self._all_requested = False
            for ns in listing.items:
                self.mark(ns.metadata.name)
            return

    async def _resync(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.mark_all()

    async def close(self) -> None:
        """Cancel every task this reconciler started, and close its API client."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._api.close()

    async def _run(self, namespace: str, delay: float) -> None:
        await asyncio.sleep(delay)
        lock = self._locks.setdefault(namespace, asyncio.Lock())
        async with lock:
            self._pending.discard(namespace)
            try:
                await self.reconcile(namespace)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one namespace must never stop the others
                failures = self._failures.get(namespace, 0) + 1
                self._failures[namespace] = failures
                backoff = min(MAX_BACKOFF, 0.5 * 2 ** (failures - 1))
                logger.warning(
                    "reconciling namespace %s failed (%s); retrying in %.1f s",
                    namespace,
                    kube.api_message(exc) or type(exc).__name__,
                    backoff,
                )
                self.mark(namespace, delay=backoff)
            else:
                self._failures.pop(namespace, None)

    async def _list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        body = await self._custom.list_namespaced_custom_object(
            resources.GROUP, resources.VERSION, namespace, resources.PLURALS[kind]
        )
        items: list[dict[str, Any]] = body.get("items", [])
        for item in items:
            item.setdefault("kind", kind)
        return items

    async def reconcile(self, namespace: str) -> None:
        """Read, compile and write one namespace."""
        try:
            ns = await self._core.read_namespace(namespace)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return
            raise
        if ns.status and ns.status.phase == "Terminating":
            return
        pods = [
            workload.Pod.from_api(kube.to_dict(self._api, p))
            for p in (await self._core.list_namespaced_pod(namespace)).items
            if not (p.metadata.deletion_timestamp)
        ]
        raw: dict[str, list[dict[str, Any]]] = {}
        for kind in resources.KINDS:
            raw[kind] = await self._list(kind, namespace)
        root = self._settings.policy.root_namespace
        mesh_raw = (
            raw["PeerAuthentication"]
            if namespace == root
            else await self._list("PeerAuthentication", root)
        )
        parsed: dict[str, list[Any]] = {kind: [] for kind in resources.KINDS}
        invalid: dict[tuple[str, str], str] = {}
        for kind, items in raw.items():
            for item in items:
                try:
                    parsed[kind].append(resources.parse(item))
                except errors.InvalidResource as exc:
                    invalid[(kind, item["metadata"]["name"])] = str(exc)
        # Every valid one: compile alone decides which of them are mesh-wide.
        mesh: list[resources.PeerAuthentication] = []
        for item in mesh_raw:
            try:
                pa = resources.parse(item)
            except errors.InvalidResource:
                continue
            if isinstance(pa, resources.PeerAuthentication):
                mesh.append(pa)
        state = policy_compile.NamespaceState(
            namespace=namespace,
            annotations=dict(ns.metadata.annotations or {}),
            pods=pods,
            servers=parsed["Server"],
            server_authorizations=parsed["ServerAuthorization"],
            authorization_policies=parsed["AuthorizationPolicy"],
            mesh_tls_authentications=parsed["MeshTLSAuthentication"],
            network_authentications=parsed["NetworkAuthentication"],
            peer_authentications=parsed["PeerAuthentication"],
            mesh_peer_authentications=mesh,
        )
        result = policy_compile.compile_namespace(state, self._settings.policy)
        for warning in result.warnings:
            logger.warning("namespace %s: %s", namespace, warning)
        await self._write_document(namespace, result.document)
        conditions = dict(result.conditions)
        for key, message in invalid.items():
            conditions[key] = (
                resources.Condition(
                    type="Accepted",
                    status="False",
                    reason="Invalid",
                    message=f"{message}; fix the resource and apply it again",
                ),
                resources.Condition(
                    type="ResolvedRefs",
                    status="Unknown",
                    reason="Invalid",
                    message="not resolved: the resource is invalid",
                ),
            )
        for kind, items in raw.items():
            for item in items:
                wanted = conditions.get((kind, item["metadata"]["name"]))
                if wanted is not None:
                    await self._write_status(namespace, kind, item, wanted)

    async def _write_document(self, namespace: str, document: compiled.PolicyDocument) -> None:
        document, text = fit(document, namespace)
        sealed_hash = document.sealed().hash
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=compiled.CONFIGMAP_NAME,
                namespace=namespace,
                labels=dict(MANAGED_BY),
                annotations={HASH_ANNOTATION: sealed_hash},
            ),
            data={compiled.CONFIGMAP_KEY: text},
        )
        try:
            current = await self._core.read_namespaced_config_map(
                compiled.CONFIGMAP_NAME, namespace
            )
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
            await self._core.create_namespaced_config_map(namespace, body)
            logger.info("namespace %s: policy %s written", namespace, sealed_hash[:19])
            return
        if (current.data or {}).get(compiled.CONFIGMAP_KEY) == text and (
            current.metadata.annotations or {}
        ).get(HASH_ANNOTATION) == sealed_hash:
            return
        body.metadata.resource_version = current.metadata.resource_version
        await self._core.replace_namespaced_config_map(compiled.CONFIGMAP_NAME, namespace, body)
        logger.info("namespace %s: policy %s written", namespace, sealed_hash[:19])

    async def _write_status(
        self,
        namespace: str,
        kind: str,
        item: Mapping[str, Any],
        wanted: Sequence[resources.Condition],
    ) -> None:
        meta = item["metadata"]
        status = item.get("status") or {}
        previous = {c.get("type"): c for c in status.get("conditions") or []}
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        generation = meta.get("generation")
        conditions = []
        changed = status.get("observedGeneration") != generation
        for cond in wanted:
            old = previous.get(cond.type) or {}
            same_status = old.get("status") == cond.status
            entry = cond.model_copy(
                update={
                    "observed_generation": generation,
                    "last_transition_time": old.get("lastTransitionTime") if same_status else now,
                }
            ).dump()
            entry.setdefault("lastTransitionTime", now)
            if any(
                old.get(k) != entry.get(k)
                for k in ("status", "reason", "message", "observedGeneration")
            ):
                changed = True
            conditions.append(entry)
        if not changed:
            return
        try:
            await self._custom.patch_namespaced_custom_object_status(  # type: ignore[call-arg]
                resources.GROUP,
                resources.VERSION,
                namespace,
                resources.PLURALS[kind],
                meta["name"],
                {"status": {"observedGeneration": generation, "conditions": conditions}},
                _content_type="application/merge-patch+json",
            )
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
