"""What every control-plane service (identity, policy) does to serve: prove at start that its RBAC
is in place, hold a TLS certificate it issues itself from the mesh issuer, and answer /ready,
/live and /metrics on an admin address.

The serving certificate chains to the trust anchors, so a proxy holding only the anchors can
verify the service before it has a certificate of its own. It is re-issued when the issuer
changes on disk and at half of its life; new connections get the new one (grpc's dynamic server
credentials), connections in flight keep theirs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING

import aiohttp
import grpc
import prometheus_client
from aiohttp import web
from kubernetes_asyncio import client

from meshward import errors
from meshward.identity import pki

if TYPE_CHECKING:
    from meshward.identity import authority

SERVING_LIFETIME = datetime.timedelta(hours=24)
ACCESS_REVIEW_TIMEOUT = 5.0


class ServingCertificate:
    """A service's own TLS certificate: re-issued when the issuer changes, and when half of its
    life has passed (it is short-lived like any leaf, and must never lapse).

    With ``verify_clients`` the configuration also carries the trust anchors as the roots that
    client certificates must chain to, so new anchors take effect with the new issuer.
    """

    def __init__(
        self,
        server_names: Sequence[str],
        material: authority.TrustMaterial,
        *,
        verify_clients: bool = False,
    ) -> None:
        self._server_names = tuple(server_names)
        self._verify_clients = verify_clients
        self.renew_at = datetime.datetime.now(datetime.UTC)
        self.current = self._issue(material)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def _issue(self, material: authority.TrustMaterial) -> grpc.ServerCertificateConfiguration:
        cert, key = pki.new_server_certificate(
            material.issuer, self._server_names, SERVING_LIFETIME
        )
        self.renew_at = (
            cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2
        )
        chain = pki.to_pem(cert, material.issuer.certificate, *material.issuer.chain)
        roots = pki.to_pem(*material.anchors) if self._verify_clients else None
        return grpc.ssl_server_certificate_configuration(
            [(pki.key_to_pem(key), chain)], root_certificates=roots
        )

    def replace(self, material: authority.TrustMaterial) -> None:
        self._pending = self.current = self._issue(material)

    def due(self) -> bool:
        return datetime.datetime.now(datetime.UTC) >= self.renew_at

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc on each new connection: the new configuration once, then None."""
        pending, self._pending = self._pending, None
        return pending

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that follow :meth:`replace`, requiring client certificates when
        built with ``verify_clients``."""
        return grpc.dynamic_ssl_server_credentials(
            self.current, self.fetch, require_client_authentication=self._verify_clients
        )


async def admin(
    address: str, registry: prometheus_client.CollectorRegistry, ready: asyncio.Event
) -> web.AppRunner:
    """Serve /metrics (``registry``), /ready (200 while ``ready`` is set, else 503) and /live on
    ``address`` ("host:port"); stop it with ``await runner.cleanup()``."""

    async def metrics_handler(_: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(registry)
        return web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def ready_handler(_: web.Request) -> web.Response:
        return web.Response(
            text="ready\n" if ready.is_set() else "not ready\n",
            status=200 if ready.is_set() else 503,
        )

    async def live_handler(_: web.Request) -> web.Response:
        return web.Response(text="live\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/ready", ready_handler)
    app.router.add_get("/live", live_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = address.rpartition(":")
    try:
        await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    except (OSError, ValueError) as exc:
        await runner.cleanup()
        raise errors.ConfigError(
            f"can not serve the admin endpoint on {address}: {exc}; pass a free host:port"
        ) from exc
    return runner


@dataclasses.dataclass(frozen=True)
class Access:
    """One permission a service needs: ``verb`` on ``resource`` of API ``group`` (core: "")
    in ``namespace``, or cluster-wide when None; only on the object ``name``, when set (a list
    or watch selecting ``metadata.name`` is authorized as a request for that name)."""

    group: str
    resource: str
    verb: str
    namespace: str | None = None
    name: str | None = None


async def missing_access(api: client.ApiClient, wanted: Sequence[Access]) -> list[Access]:
    """Which of ``wanted`` the API server denies us (SelfSubjectAccessReview), in order.

    Raises ClusterUnreachable when the API server does not answer or fails the review.
    """
    authz = client.AuthorizationV1Api(api)
    host = api.configuration.host
    missing = []
    for access in wanted:
        review = client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    group=access.group,
                    resource=access.resource,
                    verb=access.verb,
                    namespace=access.namespace,
                    name=access.name,
                )
            )
        )
        try:
            result = await authz.create_self_subject_access_review(
                review, _request_timeout=ACCESS_REVIEW_TIMEOUT
            )
        except client.exceptions.ApiException as exc:
            raise errors.ClusterUnreachable(
                f"SelfSubjectAccessReview failed at {host}: HTTP {exc.status} {exc.reason}"
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise errors.ClusterUnreachable(
                f"the API server at {host} did not answer: {type(exc).__name__} {exc}"
            ) from exc
        if not (result.status and result.status.allowed):
            missing.append(access)
    return missing
