"""kopf handlers: thin. Each says which namespace to rebuild, validates one object, or
injects the proxy into one pod.

Every handler here is an ``on.event`` (no progress stored on the objects) or an admission
handler; the work happens in :mod:`meshward.operator._reconcile` and :mod:`meshward.inject`.

The injector is a mutating webhook on Pod CREATE, served by kopf over HTTPS with the same
certificate as the validating webhook; kopf keeps the MutatingWebhookConfiguration (named like
the validating one, ``MESHWARD_WEBHOOK_NAME``) in sync, CA bundle included. Its failurePolicy is
``Ignore``, as Linkerd's: while the operator is down, pods are still created, un-meshed (and
visibly so: no ``meshward.io/proxy-version`` annotation; a rollout restart meshes them), rather
than a down operator stopping every deployment in the cluster, its own included. A stopped
operator removes its webhooks from the configurations (kopf's cleanup); a crashed one leaves
them, and Ignore applies. kopf can not set a webhook's namespaceSelector or timeout, so
:func:`injector_selector` adds them each time the configuration changes: the selector leaves out
the root (control-plane) namespace and the excluded namespaces by their
``kubernetes.io/metadata.name`` label. Kubernetes before 1.21 does not set that label, and
patterns such as ``team-*`` can not be expressed in it, so the webhook also skips those
namespaces itself.
"""

from __future__ import annotations

import copy
import datetime
import logging
import pathlib
import tempfile
from collections.abc import AsyncIterator
from typing import Any, cast

import kopf
from kubernetes_asyncio import client

from meshward import errors, inject, kube
from meshward.identity import trustdomain
from meshward.operator import _certs, _reconcile, _settings, _trust
from meshward.policy import compiled, resources

logger = logging.getLogger(__name__)

INJECT_ID = "inject-pods"
INJECT_TIMEOUT_SECONDS = 10
"""How long the API server waits for the injector before Ignore lets the pod through."""
NAMESPACE_READ_TIMEOUT = 5.0


class _WebhookServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server, with each request's namespace copied into its object.

    Kubernetes 1.20 does not fill ``metadata.namespace`` in before admission when the client
    left it out (controllers and most clients do), and kopf hands handlers only the object.
    """

    async def __call__(self, fn: kopf.WebhookFn) -> AsyncIterator[kopf.WebhookClientConfig]:
        async def with_namespace(
            request: Any,
            *,
            webhook: str | None = None,
            headers: kopf.Headers | None = None,
            sslpeer: kopf.SSLPeer | None = None,
        ) -> Any:
            payload = request.get("request") or {}
            namespace, obj = payload.get("namespace"), payload.get("object")
            if namespace and isinstance(obj, dict):
                meta = obj.setdefault("metadata", {})
                if isinstance(meta, dict) and not meta.get("namespace"):
                    meta["namespace"] = namespace
            return await fn(request, webhook=webhook, headers=headers, sslpeer=sslpeer)

        async for config in super().__call__(with_namespace):
            yield config


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Read settings (fail fast on a bad one), set kopf up, start the reconciler."""
    config = _settings.from_env()
    settings.peering.standalone = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    if config.webhook_port:
        cert_dir = pathlib.Path(
            config.webhook_cert_dir or tempfile.mkdtemp(prefix="meshward-webhook-")
        )
        certfile, pkeyfile = _certs.write_self_signed(cert_dir, config.webhook_host)
        settings.admission.server = _WebhookServer(
            addr=config.webhook_host,
            port=config.webhook_port,
            host=config.webhook_host,
            certfile=str(certfile),
            pkeyfile=str(pkeyfile),
        )
        settings.admission.managed = config.webhook_name
    memo.config = config
    memo.admission_api = await kube.connect()
    memo.reconciler = _reconcile.Reconciler(await kube.connect(), config)
    memo.reconciler.start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Cancel the reconciler's tasks and close the API clients."""
    if "reconciler" in memo:
        await memo.reconciler.close()
    if "admission_api" in memo:
        await memo.admission_api.close()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its ServiceAccount; elsewhere: the kubeconfig (kopf's own logic)."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
    return info or kopf.login_with_kubeconfig(**kwargs)


def _policy_event(kind: str) -> None:
    """Register the rebuild and admission handlers of one policy kind."""
    plural = resources.PLURALS[kind]

    @kopf.on.event(resources.GROUP, resources.VERSION, plural, id=f"rebuild-on-{plural}")
    async def rebuild(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
        """A resource changed: rebuild its namespace (all of them for mesh-wide policy)."""
        reconciler: _reconcile.Reconciler = memo.reconciler
        if kind == "PeerAuthentication" and namespace == memo.config.policy.root_namespace:
            reconciler.mark_all()
        else:
            reconciler.mark(namespace)

    if not _settings.webhook_enabled():
        return  # kopf refuses admission handlers without a server to serve them

    # Admission: the schema can not say "exactly one of", "except inside cidr" and the like.
    # failurePolicy Ignore: while the operator is down, resources still pass the CRD schema and
    # the operator reports anything invalid in status when it returns (and leaves it out of policy).
    @kopf.on.validate(
        resources.GROUP,
        resources.VERSION,
        plural,
        id=f"validate-{plural}",
        operations=["CREATE", "UPDATE"],
        ignore_failures=True,
    )
    def validate(body: kopf.Body, **_: Any) -> None:
        """Refuse what the schema can not express, with the model's message."""
        raw = dict(body)
        raw.setdefault("kind", kind)
        try:
            resources.parse(raw)
        except errors.InvalidResource as exc:
            raise kopf.AdmissionError(
                f"{kind} {body.get('metadata', {}).get('name', '')}: {exc}", code=422
            ) from exc


for _kind in resources.KINDS:
    _policy_event(_kind)


@kopf.on.event("", "v1", "pods", id="rebuild-on-pods")
async def pods(
    type: str | None, namespace: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    """Labels, named ports, probes and annotations of pods feed the document."""
    memo.reconciler.pod_changed(namespace, body, deleted=type == "DELETED")


@kopf.on.event("", "v1", "namespaces", id="rebuild-on-namespaces")
async def namespaces(name: str, memo: kopf.Memo, **_: Any) -> None:
    """The namespace annotation sets the default policy; a new namespace gets one."""
    memo.reconciler.mark(name)


@kopf.on.event(
    "",
    "v1",
    "configmaps",
    id="restore-policy-document",
    field="metadata.name",
    value=compiled.CONFIGMAP_NAME,
)
async def documents(namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Someone edited or deleted a compiled document: rebuild it (a no-op when it is ours)."""
    memo.reconciler.mark(namespace)


def _injector() -> None:
    """Register the injector and the keeper of its webhook's selector."""
    if not _settings.webhook_enabled():
        return

    @kopf.on.mutate("", "v1", "pods", id=INJECT_ID, operations=["CREATE"], ignore_failures=True)
    async def inject_proxy(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
        """Add the proxy to a pod that asks for it (see :mod:`meshward.inject`)."""
        config: _settings.OperatorSettings = memo.config
        pod = copy.deepcopy(dict(body))
        meta = pod.get("metadata") or {}
        namespace = meta.get("namespace") or ""
        what = f"pod {namespace}/{meta.get('name') or (meta.get('generateName') or '') + '*'}"
        if not namespace or not config.injects_into(namespace):
            return
        annotations = {}
        if inject.INJECT_ANNOTATION not in (meta.get("annotations") or {}):
            annotations = await _namespace_annotations(memo.admission_api, namespace, what)
        at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            result = inject.inject(pod, annotations, config.injector, at)
        except errors.InjectionError as exc:
            logger.warning("%s refused: %s", what, exc)
            raise kopf.AdmissionError(f"meshward injector: {what}: {exc}", code=400) from exc
        if isinstance(result, inject.Skipped):
            logger.debug("%s not injected: %s", what, result.reason)
            return
        injected = result.pod

        def replace(raw: kopf.RawBody) -> None:
            whole = cast(dict[str, Any], raw)
            whole.clear()
            whole.update(copy.deepcopy(injected))

        patch.fns.append(replace)
        logger.info("%s injected with proxy %s", what, config.injector.version)
        trust: _trust.TrustKeeper | None = getattr(memo, "trust", None)
        if trust is not None:
            trust.pod_injected(namespace)  # its proxy reads the trust bundle from this namespace

    @kopf.on.event(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        id="keep-injector-selector",
        when=lambda name, memo, **_: name == memo.config.webhook_name,
    )
    async def injector_selector(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        """Give the injector's webhook the namespaceSelector and timeout kopf can not set."""
        config: _settings.OperatorSettings = memo.config
        wanted = inject.namespace_selector(config.injector_skipped_namespaces())
        entry = f"{INJECT_ID}.{config.webhook_name}"
        ops: list[dict[str, Any]] = []
        for i, webhook in enumerate(body.get("webhooks") or []):
            if webhook.get("name") != entry:
                continue
            if (
                webhook.get("namespaceSelector") == wanted
                and webhook.get("timeoutSeconds") == INJECT_TIMEOUT_SECONDS
            ):
                continue
            ops += [
                {"op": "test", "path": f"/webhooks/{i}/name", "value": entry},
                {"op": "add", "path": f"/webhooks/{i}/namespaceSelector", "value": wanted},
                {
                    "op": "add",
                    "path": f"/webhooks/{i}/timeoutSeconds",
                    "value": INJECT_TIMEOUT_SECONDS,
                },
            ]
        if not ops:
            return
        api = client.AdmissionregistrationV1Api(memo.admission_api)
        try:
            await api.patch_mutating_webhook_configuration(
                config.webhook_name,
                ops,
                _content_type="application/json-patch+json",  # type: ignore[call-arg]
            )
        except client.exceptions.ApiException as exc:
            if exc.status not in (404, 409, 422):  # gone, or changed under us: a new event follows
                raise
        logger.info("webhook %s: namespaceSelector and timeout set", entry)


async def _namespace_annotations(
    api: client.ApiClient, namespace: str, what: str
) -> dict[str, str]:
    """The namespace's annotations; refuse the pod when they can not be read (its controller
    retries), rather than guess whether it should be meshed."""
    try:
        ns = await client.CoreV1Api(api).read_namespace(
            namespace, _request_timeout=NAMESPACE_READ_TIMEOUT
        )
    except Exception as exc:  # any failure to read it means: do not guess
        reason = kube.api_message(exc) or type(exc).__name__
        raise kopf.AdmissionError(
            f"meshward injector: {what}: can not read namespace {namespace} to decide whether "
            f"to inject ({reason}); the pod is refused so that it is not created un-meshed by "
            "mistake: try again",
            code=503,
        ) from exc
    return dict(ns.metadata.annotations or {})


_injector()


# -- trust domain: anchor, issuer and bundle (see meshward.operator._trust) -----------------


@kopf.on.startup(id="start-trust-keeper")
async def start_trust_keeper(memo: kopf.Memo, **_: Any) -> None:
    """Start the keeper of the TrustDomain's material; its first round runs at once."""
    memo.trust = _trust.TrustKeeper(await kube.connect(), _settings.from_env())
    memo.trust.start()


@kopf.on.cleanup(id="stop-trust-keeper")
async def stop_trust_keeper(memo: kopf.Memo, **_: Any) -> None:
    if "trust" in memo:
        await memo.trust.close()


@kopf.on.event(
    trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, id="trust-on-trustdomains"
)
async def trust_domains(memo: kopf.Memo, **_: Any) -> None:
    """A TrustDomain was created, changed or deleted (or seen on resume): plan again."""
    memo.trust.poke()


@kopf.on.event("", "v1", "namespaces", id="trust-roots-on-namespaces")
async def trust_roots_for_namespace(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A namespace annotated for injection (now or later) gets the trust bundle."""
    memo.trust.namespace_changed(name, dict(body.get("metadata", {}).get("annotations") or {}))
