"""The running proxy: settings in, every part started and wired together, everything stopped.

``meshward proxy`` and ``python -m meshward.proxy`` call :func:`main`. Tests and the demo call
:func:`start` for an in-process proxy and ``Running.stop()`` when done.

Wiring, in start order:

1. :class:`~meshward.proxy.identity.WorkloadIdentity` makes the key and keeps a certificate;
   each new certificate first becomes a fresh set of TLS contexts (:class:`Contexts`), which new
   connections take while live ones keep theirs.
   :class:`~meshward.proxy.trust_roots.TrustRoots` follows the mounted trust bundle: a new one
   rebuilds the contexts the same way, becomes the anchors of the identity and policy channels
   for their next connection, and may bring a renewal forward.
2. The policy source (a file, or the policy service) follows the namespace's compiled document;
   each update is handed to the inbound side, which closes live connections it no longer allows.
   With the policy service, :mod:`~meshward.proxy.report` also reports the trust state held
   (bundle, leaf issuer) to it.
3. Local mode listeners: one inbound listener per ``LISTEN_PORT=APP_PORT`` entry, one outbound
   listener per ``LISTEN_PORT=[IDENTITY@]HOST:PORT`` entry; with no such entries, transparent
   mode (:mod:`~meshward.proxy.transparent`) on the inbound and outbound listener addresses.
   In transparent mode with the policy service, :mod:`~meshward.proxy.discovery` asks it how
   each outbound connection into the mesh networks goes (meshed, and to whom, or plaintext),
   over a channel authenticated like the policy stream's.
4. The admin server: ready once a certificate is held.

Nothing waits for the certificate before listening: until one arrives, inbound TLS and outbound
connections are refused (and the admin server says not ready), exactly as after an expiry.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import uvloop
from cryptography.hazmat.primitives import serialization

from meshward import errors, trustbundle
from meshward.identity import pki
from meshward.policy import decision
from meshward.proxy import (
    admin,
    discovery,
    identity,
    inbound,
    listener,
    metrics,
    outbound,
    policy_channel,
    policy_source,
    policy_stream,
    report,
    settings,
    tls,
    transparent,
    trust_roots,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Contexts:
    """TLS contexts for the certificate currently held and the trust bundle in force; rebuilt
    once per new certificate and once per new bundle."""

    def __init__(
        self,
        config: settings.ProxySettings,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
    ) -> None:
        self._config = config
        self._now = now
        self._anchors = config.trust_anchors
        self._certified: identity.Certified | None = None
        self._server_mtls: ssl.SSLContext | None = None
        self._server_optional: ssl.SSLContext | None = None
        self._client: ssl.SSLContext | None = None

    def update(self, certified: identity.Certified, anchors: bytes | None = None) -> None:
        """Build contexts for ``certified`` trusting ``anchors`` (default: the bundle in force);
        raises (keeping the old ones) if that fails."""
        directory = self._config.identity_dir
        anchors = self._anchors if anchors is None else anchors
        server_mtls = tls.server_context(directory, certified, anchors)
        server_optional = tls.server_context(
            directory, certified, anchors, require_client_certificate=False
        )
        client = tls.client_context(directory, certified, anchors)
        self._server_mtls, self._server_optional, self._client = (
            server_mtls,
            server_optional,
            client,
        )
        self._certified = certified
        self._anchors = anchors

    def retrust(self, anchors: bytes) -> None:
        """Trust ``anchors`` (PEM) in new handshakes; live connections keep their contexts."""
        if self._certified is None:
            self._anchors = anchors
        else:
            self.update(self._certified, anchors)

    @property
    def certified(self) -> identity.Certified | None:
        """The certificate in use, None before the first and after it expired."""
        held = self._certified
        if held is None or held.not_after <= self._now():
            return None
        return held

    def server(self, require_client_certificate: bool) -> ssl.SSLContext | None:
        if self.certified is None:
            return None
        return self._server_mtls if require_client_certificate else self._server_optional

    def client(self) -> ssl.SSLContext | None:
        return self._client if self.certified is not None else None


PolicySource = policy_source.FileSource | policy_stream.StreamSource


@dataclasses.dataclass
class Running:
    """A started proxy. ``inbound_ports``/``outbound_ports``/``admin_port`` are the bound ports
    (useful when the settings asked for port 0)."""

    config: settings.ProxySettings
    identity: identity.WorkloadIdentity
    contexts: Contexts
    trust: trust_roots.TrustRoots
    metrics: metrics.Metrics
    source: PolicySource
    inbound: inbound.Inbound
    outbound: outbound.Outbound
    discovery: discovery.Discovery | None
    """Transparent mode with the policy service: how outbound destinations are looked up."""
    inbound_ports: list[int]
    outbound_ports: list[int]
    admin_port: int
    _closers: list[Callable[[], Awaitable[None]]]
    _tasks: list[asyncio.Task[None]]

    async def stop(self) -> None:
        """Stop listening, close every connection, stop renewing; safe to call twice."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        closers, self._closers = self._closers, []
        for close in reversed(closers):
            try:
                await close()
            except (OSError, RuntimeError) as exc:
                logger.debug("while stopping: %s", exc)
        await self.identity.close()


def _policy_source(
    config: settings.ProxySettings,
    on_update: Callable[[decision.Policy], None],
    credentials: policy_channel.Credentials,
) -> PolicySource:
    """The file source for local runs, else the policy service, authenticated with the
    workload certificate (the stream waits until there is one)."""
    if config.policy_file is not None:
        return policy_source.FileSource(config.policy_file, on_update=on_update)
    assert config.policy_svc_addr is not None and config.policy_svc_name is not None
    return policy_stream.StreamSource(
        str(config.policy_svc_addr),
        config.policy_svc_name,
        config.namespace,
        config.trust_anchors,
        credentials,
        on_update=on_update,
    )


async def start(config: settings.ProxySettings) -> Running:
    """Start every part of the proxy; raises :class:`~meshward.errors.ConfigError` when a
    listener can not bind (nothing is left running then)."""
    loop = asyncio.get_running_loop()
    proxy_metrics = metrics.Metrics()
    contexts = Contexts(config)

    def certified(fresh: identity.Certified) -> None:
        contexts.update(fresh)
        proxy_metrics.cert_refresh.inc()

    workload = identity.WorkloadIdentity(config, on_certified=certified)
    bundle = trustbundle.load(config.trust_anchors, "the trust anchors")
    proxy_metrics.certificate_expiry(
        lambda: held.not_after.timestamp() if (held := contexts.certified) else 0.0
    )

    key_pem = workload.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )

    holder: list[inbound.Inbound] = []

    def policy_updated(policy: decision.Policy) -> None:
        proxy_metrics.policy_updates.inc()
        if config.pod_name not in policy.document.pods:
            logger.warning(
                "the policy for namespace %s does not list pod %s (yet): denying every "
                "inbound connection until it does",
                policy.document.namespace,
                config.pod_name,
            )
        elif holder:
            closed = holder[0].revalidate(policy)
            if closed:
                logger.info("policy update closed %d connection(s) it no longer allows", closed)

    def credentials() -> tuple[bytes, bytes] | None:
        held = contexts.certified
        return (key_pem, held.chain_pem()) if held is not None else None

    source = _policy_source(config, policy_updated, credentials)

    def retrusted(fresh: trustbundle.Bundle) -> None:
        contexts.retrust(fresh.pem)
        workload.retrust(fresh)
        if isinstance(source, policy_stream.StreamSource):
            source.trust(fresh.pem)

    roots = trust_roots.TrustRoots(
        bundle,
        config.trust_anchors_file,
        on_bundle=retrusted,
        on_renew_before=workload.renew_leaves_before,
        metrics=proxy_metrics,
    )

    def placed() -> decision.Policy | None:
        """The policy, once it knows this pod: until the operator has added the pod (with its
        labels, which Servers select by) to the document, no decision could see which Servers
        cover it, so every connection is denied."""
        policy = source.current()
        if policy is None or config.pod_name not in policy.document.pods:
            return None
        return policy

    inbound_side = inbound.Inbound(
        policy=placed,
        server_context=contexts.server,
        pod=config.pod_name,
        labels={},
        metrics=proxy_metrics,
    )
    holder.append(inbound_side)
    outbound_side = outbound.Outbound(client_context=contexts.client, metrics=proxy_metrics)
    reporter = (
        report.Reporter(
            source.address,
            source.server_name,
            config.namespace,
            config.pod_name,
            key=key_pem,
            certified=lambda: contexts.certified,
            bundle=lambda: roots.current,
            interval=config.report_interval,
        )
        if isinstance(source, policy_stream.StreamSource) and config.pod_name is not None
        else None
    )
    lookups = (
        discovery.Discovery(
            source.address,
            source.server_name,
            credentials,
            anchors=lambda: roots.current.pem,
            trust_domain=config.trust_domain,
        )
        if config.transparent and isinstance(source, policy_stream.StreamSource)
        else None
    )
    answers = admin.Admin(
        metrics=proxy_metrics, certified=lambda: contexts.certified, trust=lambda: roots.current
    )

    closers: list[Callable[[], Awaitable[None]]] = []
    tasks: list[asyncio.Task[None]] = []
    running = Running(
        config=config,
        identity=workload,
        contexts=contexts,
        trust=roots,
        metrics=proxy_metrics,
        source=source,
        inbound=inbound_side,
        outbound=outbound_side,
        discovery=lookups,
        inbound_ports=[],
        outbound_ports=[],
        admin_port=0,
        _closers=closers,
        _tasks=tasks,
    )
    try:
        tasks.append(loop.create_task(workload.run(), name="identity"))
        tasks.append(loop.create_task(source.run(), name="policy"))
        tasks.append(loop.create_task(roots.run(), name="trust-roots"))
        if lookups is not None:
            closers.append(lookups.close)
        if reporter is not None:
            closers.append(reporter.close)
            tasks.append(loop.create_task(reporter.run(), name="report"))
        for entry in config.local_inbound:
            bound = await _bind(
                f"inbound {entry.listen}",
                inbound_side.serve(
                    entry.listen.host, entry.listen.port, entry.app_port, entry.policy_port
                ),
            )
            closers.append(_closer(bound))
            running.inbound_ports.append(bound.port)
        for out in config.local_outbound:
            route = outbound.Route(
                out.peer.host,
                out.peer.port,
                frozenset({pki.Identity.parse(out.identity, config.trust_domain).spiffe_id})
                if out.identity
                else None,
            )
            server = await _bind(
                f"outbound {out.listen}",
                outbound_side.serve(out.listen.host, out.listen.port, route),
            )
            closers.append(_closer(server))
            running.outbound_ports.append(server.sockets[0].getsockname()[1])
        if config.transparent:
            side = transparent.Transparent(
                inbound_side=inbound_side,
                outbound_side=outbound_side,
                mesh_networks=config.mesh_networks,
                proxy_ports=(config.admin.port,),
                discovery=lookups,
            )
            redirected_in = await _bind(
                f"inbound {config.inbound}",
                side.serve_inbound(config.inbound.host, config.inbound.port),
            )
            closers.append(_closer(redirected_in))
            running.inbound_ports.append(redirected_in.port)
            redirected_out = await _bind(
                f"outbound {config.outbound}",
                side.serve_outbound(config.outbound.host, config.outbound.port),
            )
            closers.append(_closer(redirected_out))
            running.outbound_ports.append(redirected_out.port)
            # proxy-init redirects IPv6 too wherever the pod has it: take it on the same ports.
            twins = (
                (config.inbound.host, redirected_in.port, side.serve_inbound),
                (config.outbound.host, redirected_out.port, side.serve_outbound),
            )
            for host, port, serve in twins:
                twin = listener.ipv6_twin(host)
                if twin is None:
                    continue
                try:
                    closers.append(_closer(await serve(twin, port)))
                except OSError as exc:
                    logger.info("no IPv6 listener on [%s]:%d (%s)", twin, port, exc.strerror)
        admin_server = await _bind(
            f"admin {config.admin}", answers.serve(config.admin.host, config.admin.port)
        )
        closers.append(_closer(admin_server))
        running.admin_port = admin_server.sockets[0].getsockname()[1]
    except BaseException:
        await running.stop()
        raise
    if not config.transparent and not config.local_inbound:
        logger.warning(
            "no inbound ports: set %s, or unset %s for transparent mode",
            settings.LOCAL_INBOUND,
            settings.LOCAL_OUTBOUND,
        )
    logger.info(
        "proxy for %s: inbound %s, outbound %s, admin %d",
        config.local_name,
        running.inbound_ports or "none",
        running.outbound_ports or "none",
        running.admin_port,
    )
    return running


def _closer(
    server: asyncio.Server | listener.Listener,
) -> Callable[[], Awaitable[None]]:
    async def close() -> None:
        server.close()
        await server.wait_closed()

    return close


async def _bind(what: str, starting: Awaitable[_T]) -> _T:
    try:
        return await starting
    except OSError as exc:
        raise errors.ConfigError(f"can not listen for {what}: {exc.strerror}") from exc


async def run(config: settings.ProxySettings) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    running = await start(config)
    try:
        await stopping.wait()
        logger.info("stopping")
    finally:
        await running.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """The ``meshward proxy`` command: settings from the environment, logs to stderr."""
    verbose = "--verbose" in (argv or [])
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("meshward").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        config = settings.from_env()
        # Everything imported lives as long as the process: out of the collector's sight, a
        # full collection walks what connections allocate, not every module (~0.1 s otherwise).
        gc.collect()
        gc.freeze()
        # uvloop: its transports and TLS are compiled, where asyncio's are Python, which the data
        # plane spends most of its time in (bench/bench_proxy.py: about a third less CPU per
        # request, and bulk TLS faster too).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(config))
    except errors.MeshwardError as exc:
        print(f"meshward proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
