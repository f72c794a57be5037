"""``meshward policy serve``: the Policy API over mutual TLS, plus health, metrics and reloads.

Only a mesh workload may watch, and only its own namespace: the TLS handshake requires a client
certificate chained to the trust anchors, and each Watch reads the namespace from that
certificate's SPIFFE ID (``spiffe://<td>/ns/<ns>/sa/<sa>``). A stream lives no longer than the
certificate that opened it; the proxy reconnects with its renewed one. Reports of the proxies'
trust state are taken the same way, each for the caller's own namespace only, and published
as ConfigMaps in the server's own namespace (:mod:`meshward.policyserver.publisher`). Any mesh
workload of the trust domain may look up whether a destination is meshed and which identity
must answer there (:mod:`meshward.policyserver.destinations`), once the server has listed the
cluster's pods, Services and EndpointSlices and while it keeps hearing about them; otherwise
the lookup is refused (UNAVAILABLE) and the server reports not ready, so proxies fail closed.
Every background task is supervised: one that fails is logged, counted and started again.

The serving certificate is issued from the mesh issuer like the identity service's (see
:mod:`meshward.identity.serving`), and the anchors it requires of clients follow the trust
material on disk. Everything runs on one asyncio loop: gRPC, the watches, the admin HTTP
server, the reload poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import pathlib
import re
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import grpc
import yaml
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubernetes_asyncio import client, config

from meshward import errors, kube, proxyreports
from meshward.identity import authority, pki, serving
from meshward.policy import compiled
from meshward.policyserver import configmaps, destinations, documents, metrics, publisher, reports
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE = "meshward.policy.v1.Policy"
NAMESPACE, SERVICE_ACCOUNT = "meshward", "meshward-policy"
"""Where the server runs, and as whom: its mesh identity name is its default server name."""
RELOAD_INTERVAL = 1.0
READINESS_INTERVAL = 1.0
"""Seconds between checks, once ready, that destination lookups have not gone stale."""
RESTART_MIN, RESTART_MAX = 1.0, 30.0
"""Seconds before a background task that failed unexpectedly is started again: doubled at
each failure in a row, up to the maximum."""
WATCHED = (
    ("", "configmaps", compiled.CONFIGMAP_NAME),
    ("", "pods", None),
    ("", "services", None),
    ("discovery.k8s.io", "endpointslices", None),
)
"""(group, resource, name) the server lists and watches cluster-wide: the compiled policy, and
what destination lookups are answered from."""
NEEDED = tuple(
    serving.Access(group=group, resource=resource, verb=verb, name=name)
    for group, resource, name in WATCHED
    for verb in ("list", "watch")
)
RBAC_HINT = (
    "bind its ServiceAccount to a ClusterRole with the rules "
    '{apiGroups: [""], resources: [configmaps], verbs: [list, watch], '
    f"resourceNames: [{compiled.CONFIGMAP_NAME}]}}, "
    '{apiGroups: [""], resources: [pods, services], verbs: [list, watch]} and '
    "{apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]} "
    "(meshward install renders them)"
)
REPORT_VERBS = ("get", "create", "update", "delete")
"""What publishing the proxies' reports needs on configmaps in the server's own namespace."""
OPTIONS = (
    # Find proxies that vanished without closing (their watcher would linger), and let the
    # proxies' own keepalive pings through on an otherwise quiet stream.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)
_MAX_ECHO = 63
"""Longest requested namespace quoted back in an error (a DNS label's limit)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    trust_domain: str
    issuer_dir: pathlib.Path
    anchors_file: pathlib.Path
    address: str = "0.0.0.0:8090"
    admin_address: str = "0.0.0.0:9991"
    server_names: tuple[str, ...] = ("localhost",)
    """DNS SANs of the serving certificate (proxies check one against the target name)."""
    namespace: str = NAMESPACE
    """The control plane's namespace, where the server runs: it publishes reports there."""
    instance: str = ""
    """This replica's name, its data key in the report ConfigMaps; empty: the POD_NAME
    environment variable, else the host name."""
    report_expiry: float = reports.EXPIRY
    """Seconds after which a pod that stopped reporting is forgotten."""
    lookups_stale_after: float = destinations.STALE_AFTER
    """Seconds without news from the API server about pods, Services or EndpointSlices after
    which lookups are refused and the server reports not ready."""


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who opened a Watch, from its verified client certificate."""

    identity: pki.Identity
    expires: datetime.datetime


def authenticate(auth_context: Mapping[str, Sequence[bytes]], trust_domain: str) -> Caller:
    """The caller's mesh identity, read from the certificate grpc verified in the handshake.

    Raises UntrustedChain or InvalidIdentity (UNAUTHENTICATED) when the certificate names no
    workload, PolicyAccessDenied (PERMISSION_DENIED) when it is of another trust domain.
    """
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        raise errors.UntrustedChain(
            "no client certificate: connect with the workload's mesh certificate"
        )
    try:
        cert = x509.load_pem_x509_certificate(pems[0])
    except ValueError as exc:
        raise errors.UntrustedChain(f"the client certificate is unreadable: {exc}") from exc
    uri = pki.spiffe_id(cert)
    if uri is None:
        raise errors.UntrustedChain(
            "the client certificate carries no SPIFFE ID (exactly one spiffe:// URI SAN): "
            "connect with the workload certificate the identity service issued"
        )
    domain, _, path = uri.removeprefix("spiffe://").partition("/")
    if domain != trust_domain:
        raise errors.PolicyAccessDenied(
            f"the client certificate {uri} is of trust domain {domain!r}, and this mesh is "
            f"{trust_domain!r}: use a certificate from this mesh's identity service"
        )
    parts = path.split("/")
    try:
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise errors.InvalidIdentity("not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
        identity = pki.Identity(namespace=parts[1], service_account=parts[3], trust_domain=domain)
    except errors.InvalidIdentity as exc:
        raise errors.InvalidIdentity(
            f"the client certificate's SPIFFE ID {uri} names no workload ({exc}): connect with "
            "the workload certificate the identity service issued"
        ) from exc
    return Caller(identity=identity, expires=cert.not_valid_after_utc)


def authorize(caller: Caller, namespace: str) -> None:
    """PolicyAccessDenied unless ``caller`` may watch ``namespace`` (only its own)."""
    if namespace != caller.identity.namespace:
        shown = namespace if len(namespace) <= _MAX_ECHO else namespace[:_MAX_ECHO] + "..."
        raise errors.PolicyAccessDenied(
            f"the certificate of {caller.identity.spiffe_id} allows watching namespace "
            f"{caller.identity.namespace!r} only, not {shown!r}: ask for your own namespace"
        )


def authorize_report(caller: Caller, namespace: str, now: datetime.datetime) -> None:
    """ReportAccessDenied unless ``caller`` may report for ``namespace`` (only its own), and
    UntrustedChain if its certificate expired since the connection was made."""
    if caller.expires <= now:
        raise errors.UntrustedChain(
            f"the client certificate expired at {caller.expires.isoformat()}: report with the "
            "renewed one"
        )
    if namespace != caller.identity.namespace:
        shown = namespace if len(namespace) <= _MAX_ECHO else namespace[:_MAX_ECHO] + "..."
        raise errors.ReportAccessDenied(
            f"the certificate of {caller.identity.spiffe_id} allows reporting for namespace "
            f"{caller.identity.namespace!r} only, not {shown!r}: report the proxy's own "
            "namespace"
        )


def authorize_lookup(caller: Caller, now: datetime.datetime) -> None:
    """UntrustedChain if ``caller``'s certificate expired since the connection was made. Any
    workload of the trust domain (which :func:`authenticate` checked) may look up any address:
    an answer reveals no more than the certificate the address presents to whoever connects."""
    if caller.expires <= now:
        raise errors.UntrustedChain(
            f"the client certificate expired at {caller.expires.isoformat()}: look up with the "
            "renewed one"
        )


def own_identity(trust_domain: str) -> pki.Identity:
    return pki.Identity(NAMESPACE, SERVICE_ACCOUNT, trust_domain)


def status_for(exc: errors.MeshwardError) -> grpc.StatusCode:
    if isinstance(exc, errors.PolicyAccessDenied | errors.ReportAccessDenied):
        return grpc.StatusCode.PERMISSION_DENIED
    if isinstance(exc, errors.InvalidProxyReport | errors.InvalidLookup):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, errors.TooManyProxies):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, errors.IdentityError):
        return grpc.StatusCode.UNAUTHENTICATED
    return grpc.StatusCode.INTERNAL


class PolicyServicer(policy_pb2_grpc.PolicyServicer):
    def __init__(
        self,
        store: documents.Documents,
        counters: metrics.Metrics,
        trust_domain: str,
        held: reports.Reports,
        lookups: destinations.Source,
    ) -> None:
        self._store = store
        self._metrics = counters
        self._trust_domain = trust_domain
        self._reports = held
        self._destinations = lookups
        self._refusals_logged: set[tuple[str, str, str]] = set()

    async def Watch(
        self, request: policy_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> None:
        namespace = request.namespace
        try:
            caller = authenticate(context.auth_context(), self._trust_domain)
            authorize(caller, namespace)
        except (errors.IdentityError, errors.PolicyError) as exc:
            code = status_for(exc)
            self._metrics.watches_refused.labels(code=code.name.lower()).inc()
            logger.info("watch refused: %s: %s", code.name, exc)
            await context.abort(code, str(exc))
            raise  # abort raises; this line is never reached
        # Headers now tell the proxy it is in, even before its namespace has a document.
        await context.send_initial_metadata(())
        self._metrics.watchers.inc()
        logger.debug("%s watches namespace %s", caller.identity.spiffe_id, namespace)
        left = (caller.expires - datetime.datetime.now(datetime.UTC)).total_seconds()
        try:
            async with asyncio.timeout(left):
                async for entry in self._store.follow(namespace):
                    await context.write(
                        policy_pb2.PolicyUpdate(document=entry.raw, hash=entry.hash)
                    )
                    self._metrics.updates_sent.inc()
        except TimeoutError:
            logger.debug("watch by %s ended: its certificate expired", caller.identity.spiffe_id)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"the client certificate expired at {caller.expires.isoformat()}: reconnect "
                "with the renewed one",
            )
        finally:
            self._metrics.watchers.dec()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the policy server is stopping")

    async def Report(
        self, request: policy_pb2.ProxyReport, context: grpc.aio.ServicerContext
    ) -> policy_pb2.ReportAck:
        now = datetime.datetime.now(datetime.UTC)
        caller: Caller | None = None
        try:
            caller = authenticate(context.auth_context(), self._trust_domain)
            authorize_report(caller, request.namespace, now)
            self._reports.record(request.namespace, request, caller.identity, now)
        except (errors.IdentityError, errors.PolicyError, errors.ReportError) as exc:
            code = status_for(exc)
            self._metrics.reports_received.labels(result=code.name.lower()).inc()
            who = caller.identity.spiffe_id if caller else "a client without a mesh identity"
            self._log_refusal("report", who, code, exc)
            await context.abort(code, str(exc))
            raise  # abort raises; this line is never reached
        self._metrics.reports_received.labels(result="ok").inc()
        return policy_pb2.ReportAck()

    async def Lookup(
        self, request: policy_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.LookupReply:
        caller: Caller | None = None
        try:
            caller = authenticate(context.auth_context(), self._trust_domain)
            authorize_lookup(caller, datetime.datetime.now(datetime.UTC))
            address, port = destinations.parse(request.address, request.port)
        except (errors.IdentityError, errors.PolicyError) as exc:
            code = status_for(exc)
            self._metrics.lookups.labels(result=code.name.lower()).inc()
            who = caller.identity.spiffe_id if caller else "a client without a mesh identity"
            self._log_refusal("lookup", who, code, exc)
            await context.abort(code, str(exc))
            raise  # abort raises; this line is never reached
        why = self._destinations.unavailable()
        if why is not None:
            self._metrics.lookups.labels(result="unavailable").inc()
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the policy server {why}, so it can not tell whether a destination is meshed: "
                "retry shortly, and meanwhile do not guess",
            )
        answer = self._destinations.index.lookup(address, port)
        if isinstance(answer, destinations.Unsure):
            self._metrics.lookups.labels(result="unavailable").inc()
            logger.debug("lookup of %s port %d unanswered: %s", address, port, answer.why)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"the policy server can not tell yet whether {address} port {port} is meshed: "
                f"{answer.why}; retry shortly, and meanwhile do not guess",
            )
            raise  # abort raises; this line is never reached
        self._metrics.lookups.labels(result="meshed" if answer.meshed else "plain").inc()
        logger.debug(
            "lookup by %s: %s port %d is %s",
            caller.identity.spiffe_id,
            address,
            port,
            f"meshed ({', '.join(answer.identities)})" if answer.meshed else "plaintext",
        )
        return policy_pb2.LookupReply(
            meshed=answer.meshed, identities=answer.identities, ttl_ms=destinations.TTL_MS
        )

    def _log_refusal(self, what: str, who: str, code: grpc.StatusCode, exc: Exception) -> None:
        """The first refusal of each call, caller and reason at info level, the rest at debug:
        a misconfigured proxy reports every 30 s and looks up at every connection."""
        seen = (what, who, code.name)
        first = seen not in self._refusals_logged
        if first:
            if len(self._refusals_logged) >= 10_000:
                self._refusals_logged.clear()
            self._refusals_logged.add(seen)
        (logger.info if first else logger.debug)(
            "%s from %s refused: %s: %s", what, who, code.name, exc
        )


@dataclasses.dataclass
class Running:
    """A started server: its bound ports, what it serves, and how to stop it."""

    port: int
    admin_port: int
    server: grpc.aio.Server
    store: documents.Documents
    reports: reports.Reports
    """The proxies' latest reports, as published."""
    destinations: destinations.Index
    """What destination lookups are answered from."""
    synced: asyncio.Event
    """Set while the server reports ready: once every namespace's ConfigMap and the cluster's
    pods, Services and EndpointSlices have been read, and cleared while destination lookups
    are stale (see :meth:`meshward.policyserver.destinations.Source.unavailable`)."""
    _cleanup: contextlib.AsyncExitStack

    async def stop(self) -> None:
        """End every Watch with UNAVAILABLE, then close the servers and the API client."""
        await self._cleanup.aclose()


async def _reload(
    source: authority.FileSource,
    material: authority.TrustMaterial,
    certificate: serving.ServingCertificate,
) -> None:
    """Re-issue the serving certificate when the trust material changes or half its life
    has passed; a failure keeps the current one and is retried."""
    failing = False
    while True:
        await asyncio.sleep(RELOAD_INTERVAL)
        try:
            fresh = source.changed()
            if fresh is not None:
                material = fresh
                certificate.replace(fresh)
            elif certificate.due():
                certificate.replace(material)
        except errors.IdentityError as exc:
            if not failing:
                logger.error("can not re-issue the serving certificate, keeping it: %s", exc)
            failing = True
        else:
            failing = False


async def _readiness(
    synced: Sequence[asyncio.Event],
    lookups: destinations.Source,
    health_servicer: health.aio.HealthServicer,
    ready: asyncio.Event,
    counters: metrics.Metrics,
) -> None:
    """Report ready (gRPC health, /ready) once everything has been listed, and not ready while
    destination lookups are refused as stale: the proxies then fail closed, and a Service in
    front of several replicas sends them to one that is not stale."""
    for event in synced:
        await event.wait()
    serving: bool | None = None
    while True:
        why = lookups.unavailable()
        if (why is None) != serving:
            if why is not None:
                logger.error("not ready: the policy server %s", why)
            elif serving is False:
                logger.info("ready again: destination lookups are answered")
            serving = why is None
            status = health_pb2.HealthCheckResponse.SERVING
            if not serving:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            await health_servicer.set(SERVICE, status)
            await health_servicer.set("", status)
            counters.ready.set(1 if serving else 0)
            (ready.set if serving else ready.clear)()
        await asyncio.sleep(READINESS_INTERVAL)


async def supervised(
    name: str,
    run: Callable[[], Awaitable[None]],
    counters: metrics.Metrics,
    pause: float = RESTART_MIN,
) -> None:
    """Run ``run()`` until cancelled, starting it again after a pause (``pause`` seconds,
    doubled at each failure in a row) whenever it fails with an unexpected exception or ends:
    logged with its traceback and counted in ``policy_task_failures``. A background task must
    never stop silently and leave the server answering from a picture that no longer moves."""
    failures = 0
    while True:
        started = time.monotonic()
        failure: Exception | None = None
        try:
            await run()
        except Exception as exc:  # noqa: BLE001 - any failure is logged, counted, retried
            failure = exc
        if time.monotonic() - started > RESTART_MAX:
            failures = 0
        failures += 1
        counters.task_failures.labels(task=name).inc()
        delay = min(RESTART_MAX, pause * 2.0 ** (failures - 1))
        logger.error(
            "the %s task %s; starting it again in %.0f s",
            name,
            "failed" if failure else "ended by itself",
            delay,
            exc_info=failure,
        )
        await asyncio.sleep(delay)


async def start(settings: Settings) -> Running:
    """Check settings, trust material and RBAC, then serve; raises before serving if any is
    wrong. The server is ready once the ConfigMaps, pods, Services and EndpointSlices have been
    read, and while destination lookups are not stale (``Running.synced``)."""
    own = own_identity(settings.trust_domain)  # also checks the trust domain
    instance = _instance(settings)
    source = authority.FileSource(settings.issuer_dir, settings.anchors_file)
    material = source.load()
    certificate = serving.ServingCertificate(settings.server_names, material, verify_clients=True)
    try:
        api = await kube.connect()
    except (config.ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        # TypeError, ValueError: what kubernetes_asyncio raises on some malformed kubeconfigs
        raise errors.ConfigError(
            f"can not load the cluster configuration ({exc}): set KUBECONFIG to a kubeconfig "
            "file, or run in a pod with a ServiceAccount"
        ) from exc
    stack = contextlib.AsyncExitStack()
    try:
        stack.push_async_callback(api.close)
        missing = await serving.missing_access(api, NEEDED)
        if missing:
            raise errors.ConfigError(
                f"the policy server may not {_denied(missing)} cluster-wide: {RBAC_HINT}"
            )
        await _check_report_access(api, settings.namespace)
        store = documents.Documents()
        counters = metrics.Metrics()
        watch = configmaps.ConfigMapSource(api, store, counters)
        held = reports.Reports(counters, expiry=settings.report_expiry)
        index = destinations.Index(settings.trust_domain)
        lookups = destinations.Source(api, index, counters, settings.lookups_stale_after)
        publishing = publisher.Publisher(api, held, counters, settings.namespace, instance)

        server = grpc.aio.server(options=OPTIONS)
        policy_pb2_grpc.add_PolicyServicer_to_server(  # type: ignore[no-untyped-call]
            PolicyServicer(store, counters, settings.trust_domain, held, lookups),
            server,
        )
        stack.push_async_callback(server.stop, 1.0)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        await health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        port = server.add_secure_port(settings.address, certificate.credentials())
        if port == 0:
            raise errors.ConfigError(
                f"can not listen on {settings.address}: is the port taken? pass a free host:port"
            )
        await server.start()
        stack.callback(store.close)  # runs first: open Watches end before the server stops

        ready = asyncio.Event()
        admin = await serving.admin(settings.admin_address, counters.registry, ready)
        stack.push_async_callback(admin.cleanup)
        admin_port = int(admin.addresses[0][1])

        loop = asyncio.get_running_loop()
        background: dict[str, Callable[[], Awaitable[None]]] = {
            "configmaps": watch.run,
            "destinations": lookups.run,
            "reload": lambda: _reload(source, material, certificate),
            "readiness": lambda: _readiness(
                (watch.synced, lookups.synced), lookups, health_servicer, ready, counters
            ),
            "publisher": publishing.run,
        }
        tasks = [
            loop.create_task(supervised(name, run, counters), name=f"policy-{name}")
            for name, run in background.items()
        ]

        async def cancel() -> None:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        stack.push_async_callback(cancel)
        logger.info(
            "policy server %s listening on port %d (trust domain %s), admin on port %d; "
            "publishing proxy reports to namespace %s as %s",
            own.dns_name,
            port,
            settings.trust_domain,
            admin_port,
            settings.namespace,
            proxyreports.data_key(instance),
        )
    except BaseException:
        await stack.aclose()
        raise
    return Running(
        port=port,
        admin_port=admin_port,
        server=server,
        store=store,
        reports=held,
        destinations=index,
        synced=ready,
        _cleanup=stack,
    )


def _denied(missing: Sequence[serving.Access]) -> str:
    """``missing`` in words: "list or watch configmaps, watch pods"."""
    verbs: dict[str, list[str]] = {}
    for access in missing:
        resource = f"{access.resource}.{access.group}" if access.group else access.resource
        verbs.setdefault(resource, []).append(access.verb)
    return ", ".join(f"{' or '.join(said)} {resource}" for resource, said in verbs.items())


def _instance(settings: Settings) -> str:
    """This replica's name (see ``Settings.instance``), checked: a key of ConfigMaps."""
    if not (
        settings.namespace
        and len(settings.namespace) <= 63
        and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", settings.namespace)
    ):
        raise errors.ConfigError(
            f"namespace {settings.namespace[:80]!r} is not a Kubernetes namespace name: set "
            "--namespace (MESHWARD_NAMESPACE) to the one the policy server runs in"
        )
    instance = settings.instance or os.environ.get("POD_NAME", "") or socket.gethostname()
    if not re.fullmatch(proxyreports.INSTANCE, instance):
        raise errors.ConfigError(
            f"replica name {instance[:80]!r} can not name a ConfigMap key (1 to 200 of "
            "a-z A-Z 0-9 . _ -): set the POD_NAME environment variable to the pod's name"
        )
    return instance


async def _check_report_access(api: client.ApiClient, namespace: str) -> None:
    """Log, without refusing to start, when the proxies' reports can not be published: serving
    policy matters more, and each failed write is logged and counted too."""
    wanted = [serving.Access("", "configmaps", verb, namespace) for verb in REPORT_VERBS]
    missing = await serving.missing_access(api, wanted)
    if missing:
        logger.error(
            "the policy server may not %s configmaps in namespace %s, so the proxies' trust-"
            "state reports will not be published and anchor rotations will wait: grant it a "
            'Role there with the rule {apiGroups: [""], resources: [configmaps], verbs: [%s]}',
            " or ".join(access.verb for access in missing),
            namespace,
            ", ".join(REPORT_VERBS),
        )


async def serve(settings: Settings) -> None:
    running = await start(settings)
    try:
        await running.server.wait_for_termination()
    finally:
        await running.stop()
