"""``meshward check``: is this install working, and what should be done about what is not?

Each check prints one line with a mark and, unless it passed, a hint. In order:

    control plane reachable   the API server answers with the kubeconfig given
    CRDs established          every meshward CRD exists and is served
    webhook (validating)      the operator's configurations list webhooks, and each address
    webhook (mutating)        answers TLS with a certificate that verifies against its caBundle
    trust anchors valid       the trust-roots ConfigMap holds CA certificates, valid now
    issuer valid              the issuer Secret holds a CA and its key, chaining to the anchors
    identity service          answers a gRPC health check over TLS verified against the anchors
    proxy certificates        no proxy that reports to the policy service holds a certificate
                              that has expired or expires within ``--proxy-window`` (6 h)

A certificate inside its warning window is a warning, not a failure: still valid, but it has to
be rotated soon. The window is ``--anchor-window`` / ``--issuer-window``; by default 60 days for
anchors (as Linkerd) and 7 days for the issuer, each capped at a quarter of the certificate's
lifetime, so that a short-lived issuer the operator rotates on time (a third of its lifetime
before expiry, by default) does not warn, and one that is not rotated does, well before it
expires. Checks that depend on a failed one are skipped, saying why.

Exit status: 0 when every check passed, 1 otherwise (warnings included).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import enum
import os
import pathlib
import ssl
import sys
import urllib.parse
from collections.abc import Sequence

import aiohttp
import grpc
import yaml
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_asyncio import client, config

from meshward import errors, kube, proxyreports
from meshward.identity import authority, commands, pki, server
from meshward.install import _manifests, _rbac

ANCHOR_WINDOW = datetime.timedelta(days=60)
ISSUER_WINDOW = datetime.timedelta(days=7)
PROXY_WINDOW = datetime.timedelta(hours=6)
"""A proxy renews its 24 h leaf with about 7 h left; less than this left means renewals fail."""
TIMEOUT = 5.0


class Outcome(enum.Enum):
    PASS = "[ok]  "
    WARN = "[warn]"
    FAIL = "[FAIL]"
    SKIP = "[skip]"


@dataclasses.dataclass(frozen=True)
class Result:
    """One check's line: what was checked, what was found, and what to do about it."""

    name: str
    outcome: Outcome
    detail: str
    hint: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.outcome.value} {self.name}: {self.detail}"]
        if self.hint and self.outcome in (Outcome.WARN, Outcome.FAIL):
            out.append(f"       hint: {self.hint}")
        return out


@dataclasses.dataclass(frozen=True)
class Settings:
    kubeconfig: pathlib.Path | None
    namespace: str
    trust_domain: str
    webhook_name: str
    identity_addr: str
    identity_name: str
    anchor_window: datetime.timedelta | None = None
    """None: :data:`ANCHOR_WINDOW`, capped at a quarter of each anchor's lifetime."""
    issuer_window: datetime.timedelta | None = None
    """None: :data:`ISSUER_WINDOW`, capped at a quarter of the issuer's lifetime."""
    proxy_window: datetime.timedelta = PROXY_WINDOW
    timeout: float = TIMEOUT


def window(
    cert: x509.Certificate, given: datetime.timedelta | None, default: datetime.timedelta
) -> datetime.timedelta:
    """How long before ``cert`` expires a warning is due: ``given`` if set, else ``default``
    capped at a quarter of the certificate's lifetime."""
    if given is not None:
        return given
    return min(default, (cert.not_valid_after_utc - cert.not_valid_before_utc) / 4)


def _when(at: datetime.datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def _left(cert: x509.Certificate, now: datetime.datetime) -> str:
    days = (cert.not_valid_after_utc - now).total_seconds() / 86400
    return f"expires {_when(cert.not_valid_after_utc)}, in {days:.1f} days"


def _days(span: datetime.timedelta) -> str:
    """``7-day``, ``2.5-day``, ``6-hour``: rounded to a tenth (lifetimes carry clock skew)."""
    days = span.total_seconds() / 86400
    if days >= 1:
        return f"{round(days, 1):g}-day"
    return f"{round(days * 24, 1):g}-hour"


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _reason(exc: BaseException) -> str:
    """An exception for a person: its type, and its message when it has one."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


class _Checker:
    """Runs the checks in order against one API client; each returns its Result."""

    def __init__(self, settings: Settings, api: client.ApiClient) -> None:
        self.settings = settings
        self.api = api
        self.now = datetime.datetime.now(datetime.UTC)
        self.anchors: list[x509.Certificate] = []
        self.anchors_pem = b""

    def _api_problem(self, exc: BaseException, what: str, fix: str) -> tuple[str, str]:
        """Detail and hint for a failed API call: forbidden, missing, or no answer."""
        if isinstance(exc, client.exceptions.ApiException):
            if exc.status in (401, 403):
                return (
                    f"may not read {what} ({kube.api_message(exc)})",
                    "run the check with a kubeconfig allowed to read it (a cluster admin's)",
                )
            if exc.status == 404:
                return f"{what} not found", fix
            return f"reading {what} failed: HTTP {exc.status} {kube.api_message(exc)}", fix
        return (
            f"reading {what} failed: {_reason(exc)}",
            "check that the API server answers (kubectl get --raw /readyz)",
        )

    async def reachable(self) -> Result:
        name = "control plane reachable"
        host = self.api.configuration.host
        try:
            version = await client.VersionApi(self.api).get_code(
                _request_timeout=self.settings.timeout
            )
        except client.exceptions.ApiException as exc:
            return Result(
                name,
                Outcome.FAIL,
                f"{host} answered HTTP {exc.status} {kube.api_message(exc)}",
                "check the credentials of the kubeconfig (kubectl version)",
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return Result(
                name,
                Outcome.FAIL,
                f"{host} did not answer ({_reason(exc)})",
                "check --kubeconfig (or KUBECONFIG) and that the API server is up "
                "(kubectl version); for the local control plane: meshward dev status",
            )
        return Result(name, Outcome.PASS, f"{host}, Kubernetes {version.git_version}")

    async def crds(self) -> Result:
        name = "CRDs established"
        ext = client.ApiextensionsV1Api(self.api)
        wanted = [doc.name for doc in _manifests.crds()]
        missing, pending = [], []
        for crd in wanted:
            try:
                found = await ext.read_custom_resource_definition(
                    crd, _request_timeout=self.settings.timeout
                )
            except client.exceptions.ApiException as exc:
                if exc.status != 404:
                    detail, hint = self._api_problem(exc, f"CRD {crd}", "")
                    return Result(name, Outcome.FAIL, detail, hint)
                missing.append(crd)
                continue
            conditions = {c.type: c.status for c in (found.status.conditions or [])}
            if conditions.get("Established") != "True":
                pending.append(crd)
        if missing:
            return Result(
                name,
                Outcome.FAIL,
                f"{len(missing)} of {len(wanted)} missing: {', '.join(missing)}",
                "apply them: meshward install --crds | kubectl apply -f -",
            )
        if pending:
            return Result(
                name,
                Outcome.FAIL,
                f"not established yet: {', '.join(pending)}",
                "wait a moment and check again; if it persists, kubectl describe crd "
                f"{pending[0]} says why",
            )
        return Result(name, Outcome.PASS, f"all {len(wanted)} served")

    async def webhook(self, kind: str) -> Result:
        name = f"webhook ({kind})"
        admission = client.AdmissionregistrationV1Api(self.api)
        read = (
            admission.read_validating_webhook_configuration
            if kind == "validating"
            else admission.read_mutating_webhook_configuration
        )
        running = (
            f"is the operator running? kubectl -n {self.settings.namespace} get deploy "
            f"{_rbac.OPERATOR}; its log says why"
        )
        try:
            configuration = await read(
                self.settings.webhook_name, _request_timeout=self.settings.timeout
            )
        except (client.exceptions.ApiException, TimeoutError, aiohttp.ClientError, OSError) as e:
            detail, hint = self._api_problem(
                e,
                f"{kind}webhookconfiguration {self.settings.webhook_name}",
                f"the operator creates it at start: {running}; or install it: meshward install "
                "| kubectl apply -f - (--webhook-name if yours has another name)",
            )
            return Result(name, Outcome.FAIL, detail, hint)
        hooks = configuration.webhooks or []
        if not hooks:
            return Result(
                name,
                Outcome.FAIL,
                f"{self.settings.webhook_name} lists no webhooks: the operator has not "
                "registered them",
                running,
            )
        targets: dict[tuple[str, int, str], list[str]] = {}
        for hook in hooks:
            cc = hook.client_config
            if cc.url:
                parsed = urllib.parse.urlsplit(cc.url)
                host, port = parsed.hostname or "", parsed.port or 443
            elif cc.service is not None:
                host = f"{cc.service.name}.{cc.service.namespace}.svc"
                port = cc.service.port or 443
            else:
                return Result(
                    name, Outcome.FAIL, f"webhook {hook.name} has no URL or Service", running
                )
            targets.setdefault((host, port, cc.ca_bundle or ""), []).append(hook.name)
        served = []
        for (host, port, bundle), names in targets.items():
            problem = await self._tls(host, port, bundle)
            if problem:
                return Result(
                    name,
                    Outcome.FAIL,
                    f"{len(names)} webhook(s) at {host}:{port}: {problem}",
                    f"the API server calls them there: {running}. A certificate that does not "
                    "verify means the configuration is stale: restart the operator and it "
                    "writes a fresh one. The address is the operator pod's IP: from outside "
                    "the cluster network it can not answer, so run the check from inside "
                    "(e.g. a pod with this image: meshward check)",
                )
            served.append(f"{host}:{port}")
        return Result(
            name,
            Outcome.PASS,
            f"{self.settings.webhook_name}: {len(hooks)} webhook(s) at {', '.join(served)}, "
            "certificate verified against the caBundle",
        )

    async def _tls(self, host: str, port: int, bundle: str) -> str:
        """Why a TLS handshake with ``host:port`` verified against ``bundle`` (base64 PEM, or
        empty for the system's roots) fails, or "" when it succeeds."""
        try:
            roots = base64.b64decode(bundle, validate=True).decode("ascii") if bundle else None
            context = ssl.create_default_context(cadata=roots)
        except (binascii.Error, UnicodeDecodeError, ssl.SSLError, ValueError) as exc:
            return f"its caBundle is not a PEM bundle ({exc})"
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=context, server_hostname=host),
                self.settings.timeout,
            )
        except ssl.SSLCertVerificationError as exc:
            return f"the certificate does not verify against the caBundle ({exc.verify_message})"
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            return f"nothing answers TLS there ({_reason(exc)})"
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        return ""

    async def trust_anchors(self) -> Result:
        name = "trust anchors valid"
        where = f"configmap/{commands.TRUST_ROOTS} in namespace {self.settings.namespace}"
        try:
            cm = await client.CoreV1Api(self.api).read_namespaced_config_map(
                commands.TRUST_ROOTS,
                self.settings.namespace,
                _request_timeout=self.settings.timeout,
            )
        except (client.exceptions.ApiException, TimeoutError, aiohttp.ClientError, OSError) as e:
            detail, hint = self._api_problem(
                e,
                where,
                "the operator writes it for the TrustDomain (kubectl get trustdomain shows "
                "why not); install with meshward install | kubectl apply -f -",
            )
            return Result(name, Outcome.FAIL, detail, hint)
        pem = str((cm.data or {}).get(authority.ANCHORS, "")).encode()
        try:
            anchors = pki.load_certificates(pem, f"{where} key {authority.ANCHORS}")
        except errors.UntrustedChain as exc:
            return Result(
                name,
                Outcome.FAIL,
                str(exc),
                "the operator rewrites it from the anchor Secret: delete the ConfigMap, or fix "
                "the TrustDomain",
            )
        bad = [
            f"{_name(a)} is not a CA" if not _is_ca(a) else f"{_name(a)} is not valid now"
            for a in anchors
            if not _is_ca(a) or not a.not_valid_before_utc <= self.now <= a.not_valid_after_utc
        ]
        if bad:
            return Result(
                name,
                Outcome.FAIL,
                "; ".join(bad),
                "replace the anchors (and the issuer, signed by a valid one): see the "
                "TrustDomain's status, kubectl get trustdomain -o yaml",
            )
        self.anchors, self.anchors_pem = anchors, pem
        soon = [
            a
            for a in anchors
            if a.not_valid_after_utc - self.now
            <= window(a, self.settings.anchor_window, ANCHOR_WINDOW)
        ]
        if soon:
            first = min(soon, key=lambda a: a.not_valid_after_utc)
            span = window(first, self.settings.anchor_window, ANCHOR_WINDOW)
            return Result(
                name,
                Outcome.WARN,
                f"{_name(first)} {_left(first, self.now)}: inside the {_days(span)} warning window",
                "the operator rotates an anchor whose key it holds on its own (kubectl get "
                "trustdomain -o wide shows the phase; meshward identity rotate starts it now); "
                "for an anchor of yours, add the new one to the bundle, move the issuer to it, "
                "then drop the old one",
            )
        earliest = min(anchors, key=lambda a: a.not_valid_after_utc)
        return Result(
            name,
            Outcome.PASS,
            f"{len(anchors)} CA certificate(s), valid now; {_name(earliest)} "
            f"{_left(earliest, self.now)}",
        )

    async def issuer(self) -> Result:
        name = "issuer valid"
        if not self.anchors:
            return Result(name, Outcome.SKIP, "no valid trust anchors to check it against")
        where = f"secret/{commands.ISSUER_SECRET} in namespace {self.settings.namespace}"
        try:
            secret = await client.CoreV1Api(self.api).read_namespaced_secret(
                commands.ISSUER_SECRET,
                self.settings.namespace,
                _request_timeout=self.settings.timeout,
            )
        except (client.exceptions.ApiException, TimeoutError, aiohttp.ClientError, OSError) as e:
            detail, hint = self._api_problem(
                e,
                where,
                "the operator creates it for the TrustDomain (kubectl get trustdomain shows why "
                "not), or give your own: meshward install --identity-issuer-certificate-file ...",
            )
            return Result(name, Outcome.FAIL, detail, hint)
        data = secret.data or {}
        try:
            cert_pem = base64.b64decode(data.get(authority.ISSUER_CERT) or "")
            key_pem = base64.b64decode(data.get(authority.ISSUER_KEY) or "")
            issuer = pki.Issuer.from_pem(cert_pem, key_pem, self.now)
            issuer.check(self.anchors, self.now)
        except (errors.IdentityError, binascii.Error) as exc:
            return Result(
                name,
                Outcome.FAIL,
                f"{where}: {exc}",
                "the identity service can not sign with it: replace it (the operator does so "
                "for a TrustDomain whose anchor key it holds; delete the Secret to make it)",
            )
        cert = issuer.certificate
        span = window(cert, self.settings.issuer_window, ISSUER_WINDOW)
        if cert.not_valid_after_utc - self.now <= span:
            return Result(
                name,
                Outcome.WARN,
                f"{_name(cert)} {_left(cert, self.now)}: inside the {_days(span)} warning window",
                "it was not rotated in time: see kubectl get trustdomain -o yaml (the operator "
                "rotates an issuer it can sign); for your own PKI, issue a new issuer from the "
                f"anchor and replace {where}",
            )
        return Result(
            name, Outcome.PASS, f"{_name(cert)} chains to the anchors, {_left(cert, self.now)}"
        )

    async def identity(self) -> Result:
        name = "identity service answering"
        if not self.anchors:
            return Result(name, Outcome.SKIP, "no valid trust anchors to verify it with")
        target, ns = self.settings.identity_addr, self.settings.namespace
        credentials = grpc.ssl_channel_credentials(root_certificates=self.anchors_pem)
        options = [("grpc.ssl_target_name_override", self.settings.identity_name)]
        request = health_pb2.HealthCheckRequest(service=server.SERVICE)
        async with grpc.aio.secure_channel(target, credentials, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                response = await stub.Check(request, timeout=self.settings.timeout)
            except grpc.aio.AioRpcError as exc:
                return Result(
                    name,
                    Outcome.FAIL,
                    f"{target}: {exc.code().name} {exc.details()}",
                    f"is it running? kubectl -n {ns} get deploy {_rbac.IDENTITY} (its log says "
                    "why). Outside the cluster, forward its port: kubectl -n "
                    f"{ns} port-forward svc/{_rbac.IDENTITY} 8080 and pass "
                    "--identity-addr localhost:8080. A TLS error means its certificate is not "
                    f"for {self.settings.identity_name} or not from these anchors",
                )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return Result(
                name,
                Outcome.FAIL,
                f"{target} answers {status}",
                "it stops serving when its issuer has expired: check the issuer above",
            )
        return Result(
            name,
            Outcome.PASS,
            f"{target} is SERVING, its certificate for {self.settings.identity_name} "
            "verified against the anchors",
        )

    async def proxies(self) -> Result:
        name = "proxy certificates"
        ns = self.settings.namespace
        try:
            listing = await client.CoreV1Api(self.api).list_namespaced_config_map(
                ns,
                label_selector=f"{proxyreports.LABEL}=true",
                _request_timeout=self.settings.timeout,
            )
        except (client.exceptions.ApiException, TimeoutError, aiohttp.ClientError, OSError) as e:
            detail, hint = self._api_problem(
                e, f"the proxies' reports in namespace {ns}", "read them with list configmaps"
            )
            return Result(name, Outcome.FAIL, detail, hint)
        live: list[tuple[str, proxyreports.Proxy]] = []
        for configmap in listing.items:
            meshed = (configmap.metadata.annotations or {}).get(proxyreports.NAMESPACE_ANNOTATION)
            if meshed:
                collected = proxyreports.collect(configmap.data)
                live += [(f"{meshed}/{pod}", p) for pod, p in collected.live(self.now).items()]
        if not live:
            return Result(
                name,
                Outcome.PASS,
                "no proxy reports (proxies that follow the policy service report their "
                "certificates to it)",
            )
        live.sort(key=lambda item: item[1].leaf_not_after)
        window = self.settings.proxy_window
        expired = [pod for pod, p in live if p.leaf_not_after <= self.now]
        expiring = [pod for pod, p in live if self.now < p.leaf_not_after <= self.now + window]
        logs = "kubectl logs -n NAMESPACE POD -c meshward-proxy says why it can not renew"
        if expired:
            return Result(
                name,
                Outcome.FAIL,
                f"{len(expired)} of {len(live)} proxies hold an expired certificate: "
                f"{_listed(expired)}",
                f"their mTLS connections fail: {logs}; check the identity service line above",
            )
        if expiring:
            return Result(
                name,
                Outcome.WARN,
                f"{len(expiring)} of {len(live)} proxies' certificates expire within "
                f"{_hours(window)}: {_listed(expiring)}",
                f"a proxy renews with about 7 h left, so these renewals are failing: {logs}",
            )
        soonest = live[0][1].leaf_not_after - self.now
        return Result(
            name,
            Outcome.PASS,
            f"{len(live)} proxies report, every certificate valid for more than "
            f"{_hours(window)} (the soonest expires in {_hours(soonest)})",
        )


def _listed(names: list[str], shown: int = 5) -> str:
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _hours(span: datetime.timedelta) -> str:
    return f"{span.total_seconds() / 3600:.1f} h"


async def _connect(kubeconfig: pathlib.Path | None) -> client.ApiClient:
    if kubeconfig is None:
        return await kube.connect()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    return client.ApiClient(configuration)


async def run(settings: Settings) -> list[Result]:
    """Every check, in order; never raises for what it finds."""
    hint = "pass --kubeconfig FILE or set KUBECONFIG; for the local control plane: meshward dev up"
    if settings.kubeconfig is not None and not settings.kubeconfig.is_file():
        first = Result(
            "control plane reachable", Outcome.FAIL, f"{settings.kubeconfig} is not a file", hint
        )
        return [first, *_skipped("needs the control plane")]
    try:
        api = await _connect(settings.kubeconfig)
    except (config.ConfigException, OSError, ValueError, TypeError, yaml.YAMLError) as exc:
        source = settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
        first = Result(
            "control plane reachable",
            Outcome.FAIL,
            f"no usable kubeconfig at {source} ({exc})",
            hint,
        )
        return [first, *_skipped("needs the control plane")]
    try:
        checker = _Checker(settings, api)
        results = [await checker.reachable()]
        if results[0].outcome is Outcome.FAIL:
            return results + _skipped("needs the control plane")
        results.append(await checker.crds())
        results.append(await checker.webhook("validating"))
        results.append(await checker.webhook("mutating"))
        results.append(await checker.trust_anchors())
        results.append(await checker.issuer())
        results.append(await checker.identity())
        results.append(await checker.proxies())
        return results
    finally:
        await api.close()


def _skipped(why: str) -> list[Result]:
    return [
        Result(name, Outcome.SKIP, why)
        for name in (
            "CRDs established",
            "webhook (validating)",
            "webhook (mutating)",
            "trust anchors valid",
            "issuer valid",
            "identity service answering",
            "proxy certificates",
        )
    ]


def report(results: Sequence[Result]) -> str:
    lines = [line for result in results for line in result.lines()]
    counts = {o: sum(r.outcome is o for r in results) for o in Outcome}
    if counts[Outcome.PASS] == len(results):
        lines.append(f"all {len(results)} checks passed")
    else:
        lines.append(
            f"{counts[Outcome.PASS]} passed, {counts[Outcome.WARN]} warning(s), "
            f"{counts[Outcome.FAIL]} failed, {counts[Outcome.SKIP]} skipped"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--kubeconfig", type=pathlib.Path, help="default: KUBECONFIG, else ~/.kube/config"
    )
    parser.add_argument(
        "--namespace",
        default=env("MESHWARD_NAMESPACE", _manifests.DEFAULT_NAMESPACE),
        help="the control plane's namespace [MESHWARD_NAMESPACE] (default meshward)",
    )
    parser.add_argument(
        "--trust-domain",
        default=env("MESHWARD_TRUST_DOMAIN", "cluster.local"),
        help="the mesh's trust domain [MESHWARD_TRUST_DOMAIN] (default cluster.local)",
    )
    parser.add_argument(
        "--webhook-name",
        default=_manifests.DEFAULT_WEBHOOK_NAME,
        help=f"the operator's webhook configurations (default {_manifests.DEFAULT_WEBHOOK_NAME})",
    )
    parser.add_argument(
        "--identity-addr",
        help="host:port of the identity service (default meshward-identity.<namespace>.svc:8080, "
        "which resolves inside the cluster; outside, port-forward it)",
    )
    parser.add_argument(
        "--identity-name",
        help="the name its certificate must carry (default its mesh identity, "
        "meshward-identity.<namespace>.serviceaccount.identity.meshward.<trust domain>)",
    )
    parser.add_argument(
        "--anchor-window",
        type=commands.duration,
        help="warn when an anchor expires within this (default 60d, at most a quarter of its "
        "lifetime)",
    )
    parser.add_argument(
        "--issuer-window",
        type=commands.duration,
        help="warn when the issuer expires within this (default 7d, at most a quarter of its "
        "lifetime)",
    )
    parser.add_argument(
        "--proxy-window",
        type=commands.duration,
        default=PROXY_WINDOW,
        help="warn when a reporting proxy's certificate expires within this (default 6h)",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT, help="seconds per network call (default 5)"
    )
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    try:
        identity_name = (
            args.identity_name
            or pki.Identity(args.namespace, _rbac.IDENTITY, args.trust_domain).dns_name
        )
    except errors.InvalidIdentity as exc:
        raise errors.ConfigError(f"--namespace / --trust-domain: {exc}") from exc
    if args.timeout <= 0:
        raise errors.ConfigError(f"--timeout {args.timeout} must be more than zero seconds")
    settings = Settings(
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        trust_domain=args.trust_domain,
        webhook_name=args.webhook_name,
        identity_addr=args.identity_addr
        or f"{_rbac.IDENTITY}.{args.namespace}.svc:{_manifests.IDENTITY_PORT}",
        identity_name=identity_name,
        anchor_window=args.anchor_window,
        issuer_window=args.issuer_window,
        proxy_window=args.proxy_window,
        timeout=args.timeout,
    )
    results = asyncio.run(run(settings))
    sys.stdout.write(report(results))
    return 0 if all(r.outcome is Outcome.PASS for r in results) else 1
