"""``meshward identity serve``: the Certify API over TLS, plus health, metrics and reloads.

The gRPC side is served with a certificate this service issues itself from the issuer in force,
chained to the trust anchors, so a proxy holding only the anchors can verify the service before
it has a certificate of its own. When the issuer changes on disk, the serving certificate is
re-issued and new connections get it (grpc's dynamic server credentials); connections in flight
keep theirs. Everything runs on one asyncio loop: gRPC, the admin HTTP server, the reload poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import pathlib
import time
from typing import Any

import grpc
import prometheus_client
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshward import errors, kube
from meshward.identity import authority, pki, tokens
from meshward.identity._proto import identity_pb2, identity_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "meshward.identity.v1.Identity"
RELOAD_INTERVAL = 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    trust_domain: str
    issuer_dir: pathlib.Path
    anchors_file: pathlib.Path
    address: str = "0.0.0.0:8080"
    admin_address: str = "0.0.0.0:9990"
    server_names: tuple[str, ...] = ("localhost",)
    """DNS SANs of the serving certificate (gRPC clients check one against the target name)."""
    lifetime: datetime.timedelta = pki.DEFAULT_LEAF_LIFETIME


class Metrics:
    """Prometheus metrics in a registry of their own (several services may share a process)."""

    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.issued = prometheus_client.Counter(
            "identity_cert_issued",
            "Certify calls by result (ok or the gRPC status code's name)",
            ["result"],
            registry=self.registry,
        )
        self.latency = prometheus_client.Histogram(
            "identity_certify_duration_seconds",
            "Certify latency, TokenReview included",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.issuer_expiry = prometheus_client.Gauge(
            "identity_issuer_expiration_timestamp_seconds",
            "When the issuer in force expires (Unix time)",
            registry=self.registry,
        )


_STATUS = (
    (errors.InvalidCSR, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidIdentity, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.TokenRejected, grpc.StatusCode.UNAUTHENTICATED),
    (errors.IdentityMismatch, grpc.StatusCode.PERMISSION_DENIED),
    (errors.ClusterUnreachable, grpc.StatusCode.UNAVAILABLE),
    (errors.IssuerError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: errors.MeshwardError) -> grpc.StatusCode:
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class IdentityServicer(identity_pb2_grpc.IdentityServicer):
    def __init__(
        self, ca: authority.Authority, reviewer: tokens.Reviewer, metrics: Metrics
    ) -> None:
        self._ca = ca
        self._reviewer = reviewer
        self._metrics = metrics

    async def Certify(
        self, request: identity_pb2.CertifyRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CertifyResponse:
        start = time.perf_counter()
        try:
            issued = await authority.certify(
                self._ca,
                self._reviewer,
                request.identity,
                request.token,
                request.certificate_signing_request,
            )
        except (errors.IdentityError, errors.ClusterUnreachable) as exc:
            code = status_for(exc)
            self._metrics.issued.labels(result=code.name.lower()).inc()
            self._metrics.latency.observe(time.perf_counter() - start)
            logger.info("certify %r refused: %s: %s", request.identity[:256], code.name, exc)
            await context.abort(code, str(exc))
            raise  # abort raises; this line is never reached
        self._metrics.issued.labels(result="ok").inc()
        self._metrics.latency.observe(time.perf_counter() - start)
        valid_until = timestamp_pb2.Timestamp()
        valid_until.FromDatetime(issued.leaf.not_valid_after_utc)
        logger.debug(
            "issued certificate for %s until %s",
            issued.identity.dns_name,
            issued.leaf.not_valid_after_utc.isoformat(),
        )
        der = serialization.Encoding.DER
        return identity_pb2.CertifyResponse(
            leaf_certificate=issued.leaf.public_bytes(der),
            intermediate_certificates=[c.public_bytes(der) for c in issued.chain],
            valid_until=valid_until,
        )


SERVING_LIFETIME = datetime.timedelta(hours=24)


class _ServingCertificate:
    """The service's own TLS certificate: re-issued when the issuer changes, and when half of
    its life has passed (it is short-lived like any leaf, and must never lapse)."""

    def __init__(self, settings: Settings, material: authority.TrustMaterial) -> None:
        self._settings = settings
        self.renew_at = datetime.datetime.now(datetime.UTC)
        self.current = self._issue(material)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    def _issue(self, material: authority.TrustMaterial) -> grpc.ServerCertificateConfiguration:
        cert, key = pki.new_server_certificate(
            material.issuer, self._settings.server_names, SERVING_LIFETIME
        )
        self.renew_at = (
            cert.not_valid_before_utc + (cert.not_valid_after_utc - cert.not_valid_before_utc) / 2
        )
        chain = pki.to_pem(cert, material.issuer.certificate, *material.issuer.chain)
        return grpc.ssl_server_certificate_configuration([(pki.key_to_pem(key), chain)])

    def replace(self, material: authority.TrustMaterial) -> None:
        self._pending = self.current = self._issue(material)

    def due(self) -> bool:
        return datetime.datetime.now(datetime.UTC) >= self.renew_at

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by grpc on each new connection: the new configuration once, then None."""
        pending, self._pending = self._pending, None
        return pending


async def _admin(settings: Settings, metrics: Metrics, ready: asyncio.Event) -> web.AppRunner:
    async def metrics_handler(_: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(metrics.registry)
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
    host, _, port = settings.admin_address.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
    return runner


@dataclasses.dataclass
class Running:
    """A started service: its bound port and how to stop it."""

    port: int
    server: grpc.aio.Server
    tasks: list[asyncio.Task[Any]]
    admin: web.AppRunner
    api: Any

    async def stop(self, grace: float = 1.0) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.stop(grace)
        await self.admin.cleanup()
        await self.api.close()


async def start(settings: Settings) -> Running:
    """Check RBAC and trust material, then serve; raises before serving if either is wrong."""
    source = authority.FileSource(settings.issuer_dir, settings.anchors_file)
    material = source.load()
    api = await kube.connect()
    try:
        reviewer = tokens.Reviewer(api)
        await reviewer.check_permission()
    except BaseException:
        await api.close()
        raise
    ca = authority.Authority(material, settings.trust_domain, settings.lifetime)
    metrics = Metrics()
    metrics.issuer_expiry.set(material.issuer.certificate.not_valid_after_utc.timestamp())
    serving = _ServingCertificate(settings, material)

    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityServicer(ca, reviewer, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    credentials = grpc.dynamic_ssl_server_credentials(serving.current, serving.fetch)
    port = server.add_secure_port(settings.address, credentials)
    if port == 0:
        await api.close()
        raise errors.ConfigError(f"can not listen on {settings.address}: is the port taken?")
    await server.start()
    ready = asyncio.Event()
    admin = await _admin(settings, metrics, ready)
    await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ready.set()

    async def reload() -> None:
        serving_status = health_pb2.HealthCheckResponse.SERVING
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            fresh = source.changed()
            if fresh is not None:
                ca.material = fresh
                serving.replace(fresh)
                metrics.issuer_expiry.set(fresh.issuer.certificate.not_valid_after_utc.timestamp())
            elif serving.due():
                serving.replace(ca.material)
            expired = ca.material.issuer.certificate.not_valid_after_utc <= datetime.datetime.now(
                datetime.UTC
            )
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if expired
                else health_pb2.HealthCheckResponse.SERVING
            )
            if status != serving_status:
                serving_status = status
                if expired:
                    logger.error("the issuer has expired: Certify fails until a new one is mounted")
                    ready.clear()
                else:
                    ready.set()
                await health_servicer.set(SERVICE, status)
                await health_servicer.set("", status)

    task = asyncio.get_running_loop().create_task(reload())
    logger.info(
        "identity service listening on port %d (trust domain %s)", port, settings.trust_domain
    )
    return Running(port=port, server=server, tasks=[task], admin=admin, api=api)


async def serve(settings: Settings) -> None:
    running = await start(settings)
    try:
        await running.server.wait_for_termination()
    finally:
        await running.stop()
