"""``python -m meshward.proxy`` end to end: real proxies in their own processes, certified by the
real identity service, following the document the real operator compiles from applied resources.

Each test runs a workload as in local mode: an application (an echo server in the test), the
server's proxy in front of it, and client proxies whose outbound ports lead to the server's
inbound port. The policy file stands in for the mounted ``meshward-policy`` ConfigMap: the test
copies the operator's document into it, as the kubelet would.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from kubernetes import client
from prometheus_client import parser

from meshward.policy import compiled
from tests import kubetest
from tests.test_identity_service import IdentityService, init_trust, name, token_for

pytestmark = pytest.mark.cluster


class Proxy:
    """One proxy process and its admin endpoints."""

    def __init__(
        self,
        tmp: pathlib.Path,
        service: IdentityService,
        token: str,
        local_name: str,
        policy_file: pathlib.Path | None,
        *,
        policy_service: int | None = None,
        app_port: int | None = None,
        peer: tuple[int, str] | None = None,
        pod: str = "web-0",
        trust_roots: pathlib.Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """With ``trust_roots`` (a mounted trust-roots ConfigMap's directory) the proxy follows
        the bundle file there, as injected proxies do; without, it gets the identity service's
        anchors as PEM in its environment. ``env`` adds or overrides variables."""
        self.dir = tmp
        (tmp / "identity").mkdir(parents=True)
        (tmp / "token").write_text(token)
        self.log = tmp / "proxy.log"
        self.inbound_port = kubetest.free_port()
        self.outbound_port = kubetest.free_port()
        self.admin_port = kubetest.free_port()
        self.env = {
            "MESHWARD_PROXY_IDENTITY_DIR": str(tmp / "identity"),
            "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS": (service.trust / "ca-bundle.crt").read_text(),
            "MESHWARD_PROXY_IDENTITY_TOKEN_FILE": str(tmp / "token"),
            "MESHWARD_PROXY_IDENTITY_LOCAL_NAME": local_name,
            "MESHWARD_PROXY_IDENTITY_SVC_ADDR": f"127.0.0.1:{service.port}",
            "MESHWARD_PROXY_IDENTITY_SVC_NAME": "localhost",
            # Host only, in local mode; without local entries (transparent mode) the listeners.
            "MESHWARD_PROXY_INBOUND_LISTEN_ADDR": f"127.0.0.1:{kubetest.free_port()}",
            "MESHWARD_PROXY_OUTBOUND_LISTEN_ADDR": f"127.0.0.1:{kubetest.free_port()}",
            "MESHWARD_PROXY_ADMIN_LISTEN_ADDR": f"127.0.0.1:{self.admin_port}",
        }
        if policy_file is not None:
            self.env["MESHWARD_PROXY_POLICY_FILE"] = str(policy_file)
        if policy_service is not None:
            self.env["MESHWARD_PROXY_POLICY_SVC_ADDR"] = f"127.0.0.1:{policy_service}"
            self.env["MESHWARD_PROXY_POLICY_SVC_NAME"] = "localhost"
        if app_port is not None:
            self.env["MESHWARD_PROXY_LOCAL_INBOUND"] = f"{self.inbound_port}={app_port}"
        if peer is not None:
            port, identity = peer
            self.env["MESHWARD_PROXY_LOCAL_OUTBOUND"] = (
                f"{self.outbound_port}={identity}@127.0.0.1:{port}"
            )
        self.env["MESHWARD_PROXY_POD_NAME"] = pod
        if trust_roots is not None:
            del self.env["MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS"]
            self.env["MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS_FILE"] = str(
                trust_roots / "ca-bundle.crt"
            )
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait: bool = True) -> Proxy:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "meshward.proxy", "--verbose"],
                env={**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait:
            kubetest.wait_for(f"the proxy to be ready\n{self.log_tail()}", self.ready, 30)
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def ready(self) -> bool:
        return self._answers("/ready")

    def live(self) -> bool:
        return self._answers("/live")

    def _answers(self, path: str) -> bool:
        try:
            return self.get(path)[0] == 200
        except OSError:
            return False

    def identity(self) -> dict[str, object]:
        status, body = self.get("/identity")
        assert status == 200, body
        found: dict[str, object] = json.loads(body)
        return found

    def metric(self, metric: str, **labels: str) -> float:
        """The sum of ``metric``'s samples whose labels include ``labels``."""
        _, body = self.get("/metrics")
        return sum(
            sample.value
            for family in parser.text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == metric and labels.items() <= sample.labels.items()
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def server_and_authorization(ns: str, port: int, *clients: str, protocol: str = "opaque") -> str:
    """A Server on ``port`` for pods app=web, speaking ``protocol``, and who may reach it."""
    manifest = textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: Server
        metadata: {{name: web, namespace: {ns}}}
        spec:
          podSelector: {{matchLabels: {{app: web}}}}
          port: {port}
          proxyProtocol: {protocol}
    """)
    for sa in clients:
        manifest += "---" + textwrap.dedent(f"""
            apiVersion: policy.meshward.io/v1alpha1
            kind: ServerAuthorization
            metadata: {{name: from-{sa}, namespace: {ns}}}
            spec:
              server: {{name: web}}
              client:
                networks: [{{cidr: 127.0.0.0/8}}]  # local mode: clients come from loopback
                meshTLS:
                  serviceAccounts: [{{name: {sa}}}]
        """)
    return manifest


def mount_policy(
    core: client.CoreV1Api, ns: str, path: pathlib.Path, authorizations: int
) -> compiled.PolicyDocument:
    """Wait for the operator's document with that many authorizations on Server web, then
    write it where the proxy reads it (atomically, as the kubelet swaps a ConfigMap volume)."""
    doc = kubetest.wait_document(
        core,
        ns,
        lambda d: [len(s.rules) for s in d.servers if s.name == "web"] == [authorizations],
        f"Server web with {authorizations} authorization(s)",
    )
    staged = path.with_suffix(".tmp")
    staged.write_text(doc.to_json())
    staged.replace(path)
    return doc


@pytest.fixture
def identity_service(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[IdentityService]:
    svc = IdentityService(
        kubeconfig,
        init_trust(tmp_path / "trust"),
        tmp_path / "identity.log",
        extra=("--lifetime", "25s"),
    )
    svc.start()
    yield svc
    svc.stop()


@pytest.fixture(params=["opaque"])
def protocol(request: pytest.FixtureRequest) -> str:
    """What the application speaks (and its Server declares): parametrize indirectly."""
    return str(request.param)


@pytest.fixture
async def app(protocol: str) -> AsyncIterator[int]:
    """The application behind the server's proxy: an echo server (opaque), an HTTP/1 server
    answering 200 "hello", or a gRPC server with the health service."""
    if protocol == "gRPC":
        grpc_server = grpc.aio.server()
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
        port = grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        yield port
        await grpc_server.stop(0)
        return

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(hello if protocol == "HTTP/1" else echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()


async def until_placed(server_proxy: Proxy) -> None:
    """Until the server's proxy holds its first policy (from a stream, it follows the
    certificate the stream is opened with)."""
    deadline = time.monotonic() + 10
    while server_proxy.metric("policy_updates_total") < 1:
        assert time.monotonic() < deadline, f"no policy arrived\n{server_proxy.log_tail()}"
        await asyncio.sleep(0.05)


async def ping(port: int, payload: bytes = b"ping") -> bytes:
    """Connect, send ``payload``, and return what comes back before the echo or EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        except asyncio.IncompleteReadError as exc:
            return exc.partial
    finally:
        writer.close()


@dataclasses.dataclass
class Workloads:
    """The proxies by ServiceAccount, and how their policy reaches them."""

    proxies: dict[str, Proxy]
    source: str
    """``file``: the test copies the operator's document into the file the proxies read;
    ``service``: the proxies follow ``meshward policy serve``, which watches the ConfigMap."""
    policy_file: pathlib.Path

    def publish(self, doc: compiled.PolicyDocument) -> float:
        """Make ``doc`` the proxies' source; returns when it changed (time.monotonic())."""
        if self.source == "file":
            staged = self.policy_file.with_suffix(".tmp")
            staged.write_text(doc.to_json())
            staged.replace(self.policy_file)
        return time.monotonic()  # service: the ConfigMap holds it already


class PolicyService:
    """``meshward policy serve`` in its own process; with ``namespace``, it publishes the
    proxies' reports there (as replica ``policy-0``)."""

    def __init__(
        self,
        kubeconfig: pathlib.Path,
        trust: pathlib.Path,
        log: pathlib.Path,
        namespace: str | None = None,
    ) -> None:
        self.port, self.admin_port = kubetest.free_port(), kubetest.free_port()
        reports = ("--namespace", namespace) if namespace else ()
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "meshward", "policy", "serve", "--verbose"),
                    *("--issuer-dir", str(trust), "--trust-anchors", str(trust / "ca-bundle.crt")),
                    *("--addr", f"127.0.0.1:{self.port}"),
                    *("--admin-addr", f"127.0.0.1:{self.admin_port}"),
                    *reports,
                ],
                env={**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "policy-0"},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.log = log

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.admin_port}/ready"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(params=["file"])
def mesh(
    request: pytest.FixtureRequest,
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
    identity_service: IdentityService,
    app: int,
    protocol: str,
    tmp_path: pathlib.Path,
) -> Iterator[Workloads]:
    """Pod web-0 served by a proxy that lets ServiceAccount ``client`` in; proxies for
    ``client`` and ``intruder`` pointing at it. Parametrize indirectly with ``service`` to have
    the proxies follow the policy service instead of a file."""
    ns = namespace
    kubectl.apply(kubetest.pod_manifest(ns, "web-0", "web"))
    kubectl.apply(server_and_authorization(ns, app, "client", protocol=protocol))
    policy_file = tmp_path / "policy.json"
    mount_policy(core, ns, policy_file, 1)
    policy_service = None
    if request.param == "service":
        policy_service = PolicyService(kubeconfig, identity_service.trust, tmp_path / "policy.log")
        kubetest.wait_for("the policy service", policy_service.ready, 30)
    source = {
        "policy_file": None if policy_service else policy_file,
        "policy_service": policy_service.port if policy_service else None,
    }
    web = name("web", ns)
    proxies = {
        "web": Proxy(
            tmp_path / "web",
            identity_service,
            token_for(core, ns, "web"),
            web,
            app_port=app,
            pod="web-0",
            **source,  # type: ignore[arg-type]
        )
    }
    for sa in ("client", "intruder"):
        proxies[sa] = Proxy(
            tmp_path / sa,
            identity_service,
            token_for(core, ns, sa),
            name(sa, ns),
            peer=(proxies["web"].inbound_port, web),
            pod=f"{sa}-0",  # not in the policy: these proxies only dial out
            **source,  # type: ignore[arg-type]
        )
    try:
        for proxy in proxies.values():
            proxy.start()
        yield Workloads(proxies, request.param, policy_file)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        if policy_service is not None:
            policy_service.stop()


@pytest.mark.parametrize("mesh", ["file", "service"], indirect=True)
async def test_the_authorized_client_gets_through_and_no_one_else(
    mesh: Workloads, namespace: str
) -> None:
    web, ok, intruder = (mesh.proxies[sa] for sa in ("web", "client", "intruder"))
    await until_placed(web)
    assert await ping(ok.outbound_port) == b"ping"
    assert await ping(intruder.outbound_port) == b""
    assert await ping(web.inbound_port) == b""  # plaintext: no identity, not authorized
    assert (
        web.metric(
            "inbound_tcp_authz_allow_total",
            srv_kind="Server",
            srv_name="web",
            authz_kind="ServerAuthorization",
            authz_name="from-client",
            client_id=name("client", namespace),
        )
        == 1
    )
    assert web.metric("inbound_tcp_authz_deny_total", client_id=name("intruder", namespace)) == 1
    assert web.metric("inbound_tcp_authz_deny_total", tls="false") == 1
    denials = [line for line in web.log_tail().splitlines() if "denied" in line]
    intruder_line = next(line for line in denials if name("intruder", namespace) in line)
    assert "Server web" in intruder_line or "web" in intruder_line.split(":", 3)[-1]
    assert "deny" in intruder_line  # names the rule that refused it


@pytest.mark.parametrize("mesh", ["file", "service"], indirect=True)
async def test_a_policy_update_reaches_a_live_proxy(
    mesh: Workloads,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    namespace: str,
    app: int,
) -> None:
    web, ok, intruder = (mesh.proxies[sa] for sa in ("web", "client", "intruder"))
    await until_placed(web)
    reader, writer = await asyncio.open_connection("127.0.0.1", ok.outbound_port)
    try:
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
        # Now intruder is let in and client is not.
        kubectl.apply(server_and_authorization(namespace, app, "intruder"))
        kubectl.run("delete", "serverauthorization", "from-client", "-n", namespace)
        doc = kubetest.wait_document(
            core,
            namespace,
            lambda d: (
                [r.name for s in d.servers if s.name == "web" for r in s.rules] == ["from-intruder"]
            ),
            "only intruder authorized",
        )
        published = mesh.publish(doc)
        # The live connection is closed, within a second.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - published < 1.0
    finally:
        writer.close()
    assert await ping(ok.outbound_port) == b""
    assert await ping(intruder.outbound_port) == b"ping"
    assert web.metric("inbound_tcp_authz_terminate_total", client_id=name("client", namespace)) == 1
    updates = web.metric("policy_updates_total")
    # From the service, the document between the two kubectl calls may arrive too.
    assert updates == 2 if mesh.source == "file" else updates in (2, 3)


async def test_renewal_under_continuous_traffic_fails_no_connection(mesh: Workloads) -> None:
    web, ok = mesh.proxies["web"], mesh.proxies["client"]
    serials = {str(web.identity()["serial"])}
    failures = attempts = 0
    reader, writer = await asyncio.open_connection("127.0.0.1", ok.outbound_port)
    try:
        deadline = time.monotonic() + 45  # 25 s certificates: renewed about every 17 s
        while time.monotonic() < deadline:
            attempts += 1
            if await ping(ok.outbound_port, b"x" * 512) != b"x" * 512:
                failures += 1
            writer.write(b"long-lived")
            assert await asyncio.wait_for(reader.readexactly(10), 5) == b"long-lived"
            serials.add(str(web.identity()["serial"]))
            await asyncio.sleep(0.05)
    finally:
        writer.close()
    assert failures == 0, f"{failures} of {attempts} connections failed"
    assert attempts > 200
    assert len(serials) >= 3  # the first certificate and at least two renewals, all served
    assert web.metric("identity_cert_refresh_total") >= 3
    assert ok.metric("identity_cert_refresh_total") >= 3


@pytest.mark.parametrize("protocol", ["HTTP/1"], indirect=True)
async def test_a_denied_http_client_gets_403_and_the_rule(mesh: Workloads, namespace: str) -> None:
    web, ok, intruder = (mesh.proxies[sa] for sa in ("web", "client", "intruder"))
    await until_placed(web)

    def get(port: int) -> tuple[int, str | None, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/votes")
            response = conn.getresponse()
            return response.status, response.getheader("meshward-proxy-error"), response.read()
        finally:
            conn.close()

    assert await asyncio.to_thread(get, ok.outbound_port) == (200, None, b"hello")
    status, reason, _ = await asyncio.to_thread(get, intruder.outbound_port)
    assert status == 403
    assert reason is not None and "Server web" in reason  # a meshed client is told why
    # No route rule on this Server, so one decision per connection: counted as tcp (metrics.py).
    assert web.metric("inbound_tcp_authz_deny_total", client_id=name("intruder", namespace)) == 1
    assert web.metric("inbound_http_authz_deny_total") == 0


@pytest.mark.parametrize("protocol", ["gRPC"], indirect=True)
async def test_a_denied_grpc_client_gets_permission_denied(mesh: Workloads) -> None:
    web, ok, intruder = (mesh.proxies[sa] for sa in ("web", "client", "intruder"))
    await until_placed(web)

    async def check(port: int) -> health_pb2.HealthCheckResponse:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert (await check(ok.outbound_port)).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await check(intruder.outbound_port)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_missing_setting_stops_it_at_start(tmp_path: pathlib.Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHWARD_PROXY_")}
    proc = subprocess.run(
        [sys.executable, "-m", "meshward.proxy"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "MESHWARD_PROXY_IDENTITY_DIR is not set" in proc.stderr
    assert "MESHWARD_PROXY_POLICY_FILE" in proc.stderr


def test_not_ready_until_it_holds_a_certificate(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    service = IdentityService(kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "id.log")
    proxy = Proxy(
        tmp_path / "web",
        service,
        token_for(core, namespace, "web"),
        name("web", namespace),
        tmp_path / "policy.json",
    )
    proxy.start(wait=False)
    try:
        kubetest.wait_for(f"the admin server\n{proxy.log_tail()}", proxy.live)
        assert proxy.get("/ready")[0] == 503  # the identity service is not running yet
        assert proxy.metric("identity_cert_expiration_timestamp_seconds") == 0
        service.start()
        try:
            kubetest.wait_for(f"readiness\n{proxy.log_tail()}", proxy.ready, 30)
            assert proxy.identity()["spiffe_id"] == f"spiffe://cluster.local/ns/{namespace}/sa/web"
        finally:
            service.stop()
    finally:
        proxy.stop()


def test_inspect_the_certificate_a_pod_presents(
    mesh: Workloads,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
) -> None:
    web = mesh.proxies["web"]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    def inspect(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshward", "identity", "inspect", "-n", namespace, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    admin = ("--admin-port", str(web.admin_port), "--identity-namespace", namespace)
    no_ip = inspect("--pod", "web-0", *admin)
    assert no_ip.returncode == 1 and "has no IP yet" in no_ip.stderr
    # No kubelet here: say where the pod runs, as the kubelet would.
    status = {"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}
    core.patch_namespaced_pod_status("web-0", namespace, status)
    core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="meshward-identity-trust-roots"),
            data={"ca-bundle.crt": web.env["MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS"]},
        ),
    )
    found = inspect("--pod", "web-0", *admin)
    assert found.returncode == 0, found.stderr
    assert f"spiffe id: spiffe://cluster.local/ns/{namespace}/sa/web" in found.stdout
    assert "days left" in found.stdout
    assert "chain: verifies against configmap/meshward-identity-trust-roots" in found.stdout
    wrong_port = inspect("--pod", "web-0", "--admin-port", str(kubetest.free_port()))
    assert wrong_port.returncode == 1 and "can not reach the proxy" in wrong_port.stderr
    missing = inspect("--pod", "web-9", *admin)
    assert missing.returncode == 1 and "there is no pod web-9" in missing.stderr
