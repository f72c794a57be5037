"""Keep the served TrustDomain's trust material in the cluster: the operator's I/O edge for it.

Each round reads the TrustDomains, the Secrets of the control-plane namespace (the root
namespace setting), any Secrets the served TrustDomain references and, for an anchor rotation,
what the proxies report; asks the pure :func:`meshward.identity.trustdomain.plan` what to do; and
writes it in an order that never leaves a proxy without a trusted path: the next-anchor Secret,
the anchor Secret, the trust bundle (the control plane's ConfigMap and every meshed
namespace's, with the early-renewal request beside it), the issuer Secret, the removal of the
next-anchor Secret, then the status. During an anchor rotation rounds run every
:data:`ROTATION_POLL` seconds, so each phase moves on soon after the proxies have.

Only the TrustDomain created first (ties by name) is served; the others are told so in their
status. Rounds are requested by events (:meth:`TrustKeeper.poke`: cheap, coalesced), run one at a
time, retried with backoff on failure, and run anyway every ``interval`` seconds, which is what
makes the issuer rotate on time. Keys are written only to Secrets and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from kubernetes_asyncio import client

from meshward import errors, inject, kube, proxyreports, trustbundle
from meshward.identity import authority, commands, trustdomain
from meshward.operator import _settings

logger = logging.getLogger(__name__)

DEBOUNCE = 0.05
MAX_BACKOFF = 30.0
INTERVAL = 60.0
"""How often every round runs anyway: the issuer's rotation is noticed within this time."""
ROTATION_POLL = 2.0
"""How often rounds run while an anchor rotation waits for the proxies."""
MANAGED_BY = {"app.kubernetes.io/managed-by": "meshward-operator"}
EVENT_NAMESPACE = "default"
"""Where Kubernetes keeps Events of cluster-scoped objects."""


class TrustKeeper:
    """Runs planning rounds for the served TrustDomain; ``start()`` begins the periodic round,
    ``close()`` cancels every task it started and closes its API client."""

    def __init__(self, api: client.ApiClient, settings: _settings.OperatorSettings) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._settings = settings
        self._namespace = settings.policy.root_namespace
        self._lock = asyncio.Lock()
        self._pending = False
        self._failures = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._with_injected_pods: set[str] = set()
        self._seeded = False
        """Namespaces where a pod asked for the proxy itself: its container reads the bundle
        from its own namespace, annotated for injection or not."""

    def pod_injected(self, namespace: str) -> None:
        """The injector added a proxy to a pod in ``namespace``: publish the bundle there."""
        if namespace not in self._with_injected_pods:
            self._with_injected_pods.add(namespace)
            self.poke()

    def poke(self, delay: float = DEBOUNCE) -> None:
        """Ask for a round soon; never raises."""
        if self._pending:
            return
        self._pending = True
        self._spawn(self._run(delay))

    def namespace_changed(self, name: str, annotations: Mapping[str, str]) -> None:
        """A Namespace event: a meshed namespace needs the bundle (a round writes it)."""
        if self._meshed(name, annotations):
            self.poke()

    def start(self, interval: float = INTERVAL) -> None:
        self._spawn(self._every(interval))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._api.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _every(self, interval: float) -> None:
        while True:
            self.poke()
            await asyncio.sleep(interval)

    async def _run(self, delay: float) -> None:
        await asyncio.sleep(delay)
        async with self._lock:
            self._pending = False
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried with backoff, never fatal
                self._failures += 1
                backoff = min(MAX_BACKOFF, 0.5 * 2 ** (self._failures - 1))
                logger.warning(
                    "trust domain: round failed (%s); retrying in %.1f s",
                    kube.api_message(exc) or type(exc).__name__,
                    backoff,
                )
                self.poke(delay=backoff)
            else:
                self._failures = 0

    def _meshed(self, name: str, annotations: Mapping[str, str]) -> bool:
        return (
            annotations.get(inject.INJECT_ANNOTATION) == inject.ENABLED
            and name != self._namespace
            and not self._settings.excludes(name)
        )

    # -- one round -------------------------------------------------------------------------

    async def round(self) -> None:
        """Read, plan and write once."""
        if not self._seeded:
            # After a restart: namespaces where injected pods already run need the bundle too.
            for pod in (await self._core.list_pod_for_all_namespaces()).items:
                if _has_proxy(pod):
                    self._with_injected_pods.add(pod.metadata.namespace)
            self._seeded = True
        listing = await self._custom.list_cluster_custom_object(
            trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL
        )
        items: list[dict[str, Any]] = sorted(
            listing.get("items", []),
            key=lambda i: (i["metadata"].get("creationTimestamp", ""), i["metadata"]["name"]),
        )
        items = [i for i in items if not i["metadata"].get("deletionTimestamp")]
        if not items:
            await self._create_default()
            return
        served, others = items[0], items[1:]
        for other in others:
            await self._write_status(
                other,
                trustdomain.refused(
                    trustdomain.Phase.INACTIVE,
                    "NotServed",
                    f"TrustDomain {served['metadata']['name']}, created earlier, is the one "
                    "served; delete one of the two",
                ),
                (),
            )
        try:
            resource = trustdomain.parse(served)
        except errors.InvalidResource as exc:
            status = trustdomain.refused(
                trustdomain.Phase.INVALID,
                "InvalidSpec",
                f"{exc}; fix the TrustDomain and apply it again",
            )
            await self._write_status(served, status, ())
            return
        spec = resource.spec
        annotations = served["metadata"].get("annotations") or {}
        next_anchor = await self._material(self._namespace, trustdomain.NEXT_ANCHOR_SECRET)
        state = trustdomain.State(
            anchor=await self._material(self._namespace, commands.ANCHOR_SECRET),
            issuer=await self._material(self._namespace, commands.ISSUER_SECRET),
            user_anchor=await self._referenced(spec.anchor_secret_ref),
            user_issuer=await self._referenced(spec.issuer_secret_ref),
            next_anchor=next_anchor,
            census=await self._census() if next_anchor is not None else trustdomain.Census(),
            rotate_request=annotations.get(trustdomain.ROTATE_ANNOTATION),
            previous=resource.status,
        )
        plan = trustdomain.plan(spec, state, datetime.datetime.now(datetime.UTC))
        name = resource.metadata.name
        if plan.next_anchor_secret is not None:
            await self._write_secret(trustdomain.NEXT_ANCHOR_SECRET, plan.next_anchor_secret)
        if plan.anchor_secret is not None:
            await self._write_secret(commands.ANCHOR_SECRET, plan.anchor_secret)
        if plan.bundle is not None:
            await self._publish(plan.bundle.decode(), plan.renew_leaves_before)
        if plan.issuer_secret is not None:
            await self._write_secret(commands.ISSUER_SECRET, plan.issuer_secret)
        if plan.delete_next_anchor:
            await self._delete_secret(trustdomain.NEXT_ANCHOR_SECRET)
        for note in plan.notes:
            logger.info("trust domain %s: %s", name, note)
        await self._write_status(served, plan.status, plan.warnings)
        if plan.status.phase in trustdomain.ROTATING:
            self.poke(delay=ROTATION_POLL)

    async def _create_default(self) -> None:
        """Create the TrustDomain the settings name, if any (its creation brings a round)."""
        name = self._settings.trust_domain_resource
        if name is None:
            return
        body = {
            "apiVersion": trustdomain.API_VERSION,
            "kind": trustdomain.KIND,
            "metadata": {"name": name, "labels": dict(MANAGED_BY)},
            "spec": {"trustDomain": self._settings.policy.trust_domain},
        }
        try:
            await self._custom.create_cluster_custom_object(
                trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, body
            )
        except client.exceptions.ApiException as exc:
            if exc.status != 409:  # created meanwhile: fine
                raise
            return
        logger.info("trust domain: created TrustDomain %s (none existed)", name)
        self.poke()

    async def _census(self) -> trustdomain.Census:
        """What the proxies report (:mod:`meshward.proxyreports`), and the injected pods that
        run without a live report: an anchor rotation waits for both.

        A report counts only for a pod that exists, is not being deleted, and runs as the
        ServiceAccount of the certificate the report came with: any proxy of a namespace may
        report, so one must not speak for its neighbours, nor hold the rotation with pods that
        do not exist.
        """
        now = datetime.datetime.now(datetime.UTC)
        pods = {
            f"{pod.metadata.namespace}/{pod.metadata.name}": pod
            for pod in (await self._core.list_pod_for_all_namespaces()).items
            if not pod.metadata.deletion_timestamp
        }
        listing = await self._core.list_namespaced_config_map(
            self._namespace, label_selector=f"{proxyreports.LABEL}=true"
        )
        reported: dict[str, trustdomain.ProxyState] = {}
        for configmap in listing.items:
            namespace = (configmap.metadata.annotations or {}).get(
                proxyreports.NAMESPACE_ANNOTATION
            )
            if not namespace:
                continue
            collected = proxyreports.collect(configmap.data)
            for problem in collected.unreadable:
                logger.warning("trust domain: configmap %s: %s", configmap.metadata.name, problem)
            for name_in_ns, proxy in collected.live(now).items():
                name = f"{namespace}/{name_in_ns}"
                pod = pods.get(name)
                account = proxy.identity.rpartition("/sa/")[2]
                if pod is None or (pod.spec.service_account_name or "default") != account:
                    logger.info(
                        "trust domain: report for %s ignored: no such pod runs as %s",
                        name,
                        proxy.identity,
                    )
                    continue
                reported[name] = trustdomain.ProxyState(name, proxy.trust_bundle, proxy.leaf_issuer)
        silent = sorted(
            name
            for name, pod in pods.items()
            if (pod.status and pod.status.phase == "Running")
            and _has_proxy(pod)
            and name not in reported
        )
        return trustdomain.Census(proxies=tuple(reported.values()), silent=tuple(silent))

    async def _material(self, namespace: str, name: str) -> trustdomain.Material | None:
        try:
            secret = await self._core.read_namespaced_secret(name, namespace)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        data = secret.data or {}

        def field(key: str) -> bytes | None:
            value = data.get(key)
            return _b64decode(value) if value else None

        return trustdomain.Material(
            where=f"secret {namespace}/{name}", cert=field("tls.crt"), key=field("tls.key")
        )

    async def _referenced(self, ref: trustdomain.SecretRef | None) -> trustdomain.Material | None:
        if ref is None:
            return None
        return await self._material(ref.namespace or self._namespace, ref.name)

    async def _write_secret(self, name: str, wanted: trustdomain.SecretWrite) -> None:
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(
                name=name, namespace=self._namespace, labels=dict(MANAGED_BY)
            ),
            type="kubernetes.io/tls",
            data={"tls.crt": _b64encode(wanted.cert), "tls.key": _b64encode(wanted.key)},
        )
        try:
            current = await self._core.read_namespaced_secret(name, self._namespace)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
            await self._core.create_namespaced_secret(self._namespace, body)
        else:
            body.metadata.resource_version = current.metadata.resource_version
            await self._core.replace_namespaced_secret(name, self._namespace, body)
        logger.info("trust domain: secret %s/%s written", self._namespace, name)

    async def _delete_secret(self, name: str) -> None:
        try:
            await self._core.delete_namespaced_secret(name, self._namespace)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
        logger.info("trust domain: secret %s/%s deleted", self._namespace, name)

    async def _publish(self, bundle: str, renew_before: datetime.datetime | None) -> None:
        """The bundle, and the early-renewal request if any, into the control-plane namespace
        and every meshed namespace."""
        data = {authority.ANCHORS: bundle}
        if renew_before is not None:
            data[trustbundle.RENEW_BEFORE_KEY] = trustbundle.format_renew_before(renew_before)
        await self._write_bundle(self._namespace, data)
        for ns in (await self._core.list_namespace()).items:
            meta = ns.metadata
            if ns.status and ns.status.phase == "Terminating":
                continue
            if self._meshed(meta.name, meta.annotations or {}) or (
                meta.name in self._with_injected_pods and not self._settings.excludes(meta.name)
            ):
                try:
                    await self._write_bundle(meta.name, data)
                except client.exceptions.ApiException as exc:
                    if exc.status not in (403, 404, 409):  # going away, or raced: next round
                        raise
                    logger.warning(
                        "trust domain: bundle not written in namespace %s: %s",
                        meta.name,
                        kube.api_message(exc),
                    )

    async def _write_bundle(self, namespace: str, data: dict[str, str]) -> None:
        body = client.V1ConfigMap(
            metadata=client.V1ObjectMeta(
                name=commands.TRUST_ROOTS, namespace=namespace, labels=dict(MANAGED_BY)
            ),
            data=data,
        )
        try:
            current = await self._core.read_namespaced_config_map(commands.TRUST_ROOTS, namespace)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
            await self._core.create_namespaced_config_map(namespace, body)
        else:
            if (current.data or {}) == data:
                return
            body.metadata.resource_version = current.metadata.resource_version
            await self._core.replace_namespaced_config_map(commands.TRUST_ROOTS, namespace, body)
        logger.info("trust domain: trust bundle published in namespace %s", namespace)

    async def _write_status(
        self,
        item: Mapping[str, Any],
        status: trustdomain.TrustDomainStatus,
        warnings: tuple[trustdomain.ExpiryWarning, ...],
    ) -> None:
        """Write ``status`` unless it is what is stored; keep each condition's transition time;
        post an Event for each warning whose condition has just turned True."""
        meta = item["metadata"]
        old = item.get("status") or {}
        previous = {c.get("type"): c for c in old.get("conditions") or []}
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        generation = meta.get("generation")
        conditions = []
        for cond in status.conditions:
            before = previous.get(cond.type) or {}
            same = before.get("status") == cond.status
            conditions.append(
                cond.model_copy(
                    update={
                        "observed_generation": generation,
                        "last_transition_time": before.get("lastTransitionTime") if same else now,
                    }
                )
            )
        full = status.model_copy(
            update={"observed_generation": generation, "conditions": tuple(conditions)}
        )
        wanted = full.dump()
        # Merge patch: a field we no longer set is sent as null, which removes it.
        patch = {key: wanted.get(key) for key in _STATUS_KEYS}
        if {k: v for k, v in patch.items() if v is not None} != _comparable(old):
            try:
                await self._custom.patch_cluster_custom_object_status(  # type: ignore[call-arg]
                    trustdomain.GROUP,
                    trustdomain.VERSION,
                    trustdomain.PLURAL,
                    meta["name"],
                    {"status": patch},
                    _content_type="application/merge-patch+json",
                )
            except client.exceptions.ApiException as exc:
                if exc.status != 404:
                    raise
                return
        for warning in warnings:
            if (previous.get(warning.reason) or {}).get("status") != "True":
                logger.warning("trust domain %s: %s", meta["name"], warning.message)
                await self._post_event(item, warning)

    async def _post_event(
        self, item: Mapping[str, Any], warning: trustdomain.ExpiryWarning
    ) -> None:
        meta = item["metadata"]
        now = datetime.datetime.now(datetime.UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                generate_name=f"{meta['name']}.", namespace=EVENT_NAMESPACE
            ),
            involved_object=client.V1ObjectReference(
                api_version=trustdomain.API_VERSION,
                kind=trustdomain.KIND,
                name=meta["name"],
                uid=meta.get("uid"),
            ),
            reason=warning.reason,
            message=warning.message,
            type="Warning",
            source=client.V1EventSource(component="meshward-operator"),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            await self._core.create_namespaced_event(EVENT_NAMESPACE, event)
        except client.exceptions.ApiException as exc:  # the condition still says it
            logger.warning("trust domain: event not posted: %s", kube.api_message(exc))


_STATUS_KEYS = tuple(
    field.alias or name for name, field in trustdomain.TrustDomainStatus.model_fields.items()
)


def _comparable(stored: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stored.items() if k in _STATUS_KEYS and v is not None}


def _has_proxy(pod: Any) -> bool:
    return any(c.name == inject.PROXY_CONTAINER for c in (pod.spec.containers or ()))


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text)
