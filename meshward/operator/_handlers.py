"""kopf handlers: thin. Each says which namespace to rebuild, or validates one object.

Every handler here is an ``on.event`` (no progress stored on the objects) or an admission
handler; the work happens in :mod:`meshward.operator._reconcile`.
"""

from __future__ import annotations

import logging
import pathlib
import tempfile
from typing import Any

import kopf

from meshward import errors, kube
from meshward.operator import _certs, _reconcile, _settings
from meshward.policy import compiled, resources


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
        settings.admission.server = kopf.WebhookServer(
            addr=config.webhook_host,
            port=config.webhook_port,
            host=config.webhook_host,
            certfile=str(certfile),
            pkeyfile=str(pkeyfile),
        )
        settings.admission.managed = config.webhook_name
    memo.config = config
    memo.reconciler = _reconcile.Reconciler(await kube.connect(), config)
    memo.reconciler.start()


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Cancel the reconciler's tasks and close its API client."""
    if "reconciler" in memo:
        await memo.reconciler.close()


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
