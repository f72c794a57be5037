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

from meshward import errors, kube, trustbundle
from meshward.identity import authority, pki, serving, tokens
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
        self.anchor_expiry = prometheus_client.Gauge(
            "identity_trust_anchor_expiration_timestamp_seconds",
            "When each trust anchor of the bundle in force expires (Unix time), by fingerprint",
            ["fingerprint"],
            registry=self.registry,
        )

    def material(self, material: authority.TrustMaterial) -> None:
        """Expiries of the trust material in force; an alert on either is the warning that
        comes before an outage."""
        self.issuer_expiry.set(material.issuer.certificate.not_valid_after_utc.timestamp())
        self.anchor_expiry.clear()
        for anchor in material.anchors:
            fingerprint = trustbundle.certificate_fingerprint(anchor)
            self.anchor_expiry.labels(fingerprint).set(anchor.not_valid_after_utc.timestamp())


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
    metrics.material(material)
    certificate = serving.ServingCertificate(settings.server_names, material)

    server = grpc.aio.server()
    identity_pb2_grpc.add_IdentityServicer_to_server(  # type: ignore[no-untyped-call]
        IdentityServicer(ca, reviewer, metrics), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(settings.address, certificate.credentials())
    if port == 0:
        await api.close()
        raise errors.ConfigError(f"can not listen on {settings.address}: is the port taken?")
    await server.start()
    ready = asyncio.Event()
    admin = await serving.admin(settings.admin_address, metrics.registry, ready)
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
                certificate.replace(fresh)
                metrics.material(fresh)
            elif certificate.due():
                certificate.replace(ca.material)
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
