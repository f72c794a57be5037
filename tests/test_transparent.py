"""Transparent interception for real: pods as network namespaces on a bridge, rules from
``meshward proxy-init``, proxies under their own UID in transparent mode.

The end-to-end test runs an unmodified HTTP server in one pod and unmodified clients in others:
the clients dial the server pod's IP and the application's port, nothing else, and the proxies
in between carry the connection over mTLS, certified by the real identity service, and decide it
by the policy the real operator compiled. These tests need root, ``ip netns`` and iptables
(fetched from Debian when not installed): without root or ``ip netns`` they are skipped, saying
so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client
from prometheus_client import parser

from meshward import inject
from meshward.identity import pki
from meshward.operator import _settings
from meshward.proxy import interception
from tests import kubetest, netns
from tests.test_identity_service import IdentityService, init_trust, name, token_for

PROXY_UID = interception.PROXY_UID
APP_PORT = 8080
GREETING = "hello from web-0\n"

HTTP_CLIENT = textwrap.dedent("""
    import http.client, json, sys
    conn = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=10)
    try:
        conn.request("GET", sys.argv[3])
        response = conn.getresponse()
        print(json.dumps({"status": response.status, "body": response.read().decode()}))
    except (OSError, http.client.HTTPException) as exc:
        print(json.dumps({"error": type(exc).__name__}))
""")
"""An unmodified client: plain http.client, dialing an ordinary address and port."""

ORIGINAL_DESTINATIONS = textwrap.dedent("""
    import json, socket, sys
    from meshward import errors
    from meshward.proxy import original_dst

    def listen(family, host):
        sock = socket.socket(family)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, 4140))
        sock.listen()
        return sock

    def where(listener, address):
        with socket.create_connection(address, timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                try:
                    return str(original_dst.original_destination(accepted))
                except errors.NotRedirected as exc:
                    return "not redirected: " + str(exc)

    v4 = listen(socket.AF_INET, "127.0.0.1")
    v6 = listen(socket.AF_INET6, "::1")
    print(json.dumps({
        "v4": where(v4, (sys.argv[1], 8080)),
        "v6": where(v6, (sys.argv[2], 8443)),
        "direct": where(v4, ("127.0.0.1", 4140)),
    }))
""")


@pytest.fixture
def network() -> Iterator[netns.Network]:
    reason = netns.skip_reason()
    if reason is not None:
        pytest.skip(reason)
    net = netns.Network()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def ipt(network: netns.Network) -> netns.Iptables:
    return netns.iptables()


def proxy_init(
    pod: netns.Pod, ipt: netns.Iptables, *args: str, without_net_admin: bool = False
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "meshward", "proxy-init", "--iptables", str(ipt.path), *args]
    if without_net_admin:  # root still, but as an init container without NET_ADMIN would be
        argv = ["setpriv", "--bounding-set=-net_admin", *argv]
    return subprocess.run(
        pod.argv(*argv),
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(ipt.env),
        cwd=kubetest.ROOT,
    )


def nat_rules(pod: netns.Pod, save: pathlib.Path, ipt: netns.Iptables) -> list[str]:
    text = pod.run(str(save), "-t", "nat", env=ipt.env)
    return [line for line in text.splitlines() if line.startswith("-A ")]


def test_proxy_init_installs_the_rules_once_however_often_it_runs(
    network: netns.Network, ipt: netns.Iptables
) -> None:
    pod = network.add("pod", 2)
    flags = ("--skip-inbound-ports", "22,9000-9100", "--skip-outbound-ports", "443")
    dry = proxy_init(pod, ipt, *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert nat_rules(pod, ipt.save, ipt) == []  # the dry run changed nothing
    expected = [line for line in dry.stdout.splitlines() if line.startswith("-A ")]
    for _ in range(2):
        done = proxy_init(pod, ipt, *flags)
        assert done.returncode == 0, done.stderr
    assert nat_rules(pod, ipt.save, ipt) == expected
    ip6_save = ipt.ip6.with_name(f"{ipt.ip6.name}-save")
    assert nat_rules(pod, ip6_save, ipt) == expected  # IPv6 is not a way around the proxy


def test_proxy_init_without_net_admin_says_which_rule_failed_and_why(
    network: netns.Network, ipt: netns.Iptables, tmp_path: pathlib.Path
) -> None:
    pod = network.add("pod", 2)
    denied = proxy_init(pod, ipt, without_net_admin=True)
    assert denied.returncode == 1
    assert "IPv4: could not check whether PREROUTING already jumps" in denied.stderr
    assert "Permission denied" in denied.stderr and "CAP_NET_ADMIN" in denied.stderr
    assert "Traceback" not in denied.stderr
    assert nat_rules(pod, ipt.save, ipt) == []

    # A re-run that fails half-way (iptables without its multiport extension) keeps the rules
    # in force: the restore is all or nothing.
    done = proxy_init(pod, ipt)
    assert done.returncode == 0, done.stderr
    installed = nat_rules(pod, ipt.save, ipt)
    argv = [sys.executable, "-m", "meshward", "proxy-init", "--iptables", str(ipt.path)]
    broken = subprocess.run(
        pod.argv("env", f"XTABLES_LIBDIR={tmp_path}", *argv, "--skip-outbound-ports", "443"),
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(ipt.env),
        cwd=kubetest.ROOT,
    )
    assert broken.returncode == 1
    assert "IPv4: " in broken.stderr and "none of the IPv4 rules changed" in broken.stderr
    assert "`-A MESHWARD_INBOUND -p tcp -m multiport --dports 4191 -j RETURN`" in broken.stderr
    assert "Couldn't load match `multiport'" in broken.stderr
    assert "iptables lacks that extension" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert nat_rules(pod, ipt.save, ipt) == installed


def test_proxy_init_run_again_never_lets_a_connection_bypass_the_proxy(
    network: netns.Network, ipt: netns.Iptables, tmp_path: pathlib.Path
) -> None:
    """Re-running proxy-init (an init container restarted) replaces the rules in one commit:
    a process dialing out all the while sees every connection redirected, none going past."""
    watcher = textwrap.dedent("""
        import json, os, socket, struct, sys, time
        target, stop = (sys.argv[1], int(sys.argv[2])), sys.argv[3]
        proxy = socket.socket()  # where the proxy's outbound listener would be
        proxy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        proxy.bind(("0.0.0.0", int(sys.argv[4])))
        proxy.listen(64)
        proxy.settimeout(1)

        def went_past():
            with socket.socket() as dialer:
                dialer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                dialer.settimeout(1)
                try:
                    dialer.connect(target)
                    accepted, peer = proxy.accept()
                except OSError as exc:
                    return repr(exc)
                with accepted:
                    return None if peer == dialer.getsockname() else f"the proxy got {peer}"

        redirected, bypassed, give_up = 0, [], time.monotonic() + 20
        while not os.path.exists(stop):
            problem = went_past()
            if problem is None:
                redirected += 1
                if redirected == 1:
                    print("ready", flush=True)
            else:
                bypassed.append(problem)
                if not redirected and time.monotonic() > give_up:
                    print(f"never redirected: {problem}", flush=True)
                    break
            time.sleep(0.001)
        print(json.dumps({"redirected": redirected, "bypassed": bypassed}))
    """)
    pod = network.add("pod", 2)
    first = proxy_init(pod, ipt)
    assert first.returncode == 0, first.stderr
    installed = nat_rules(pod, ipt.save, ipt)
    stop = tmp_path / "stop"
    ready = ""
    dialing = subprocess.Popen(
        pod.argv(
            *(sys.executable, "-c", watcher, network.gateway, "9", str(stop)),
            str(interception.OUTBOUND_PORT),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert dialing.stdout is not None
        ready = dialing.stdout.readline()
        if ready == "ready\n":
            for _ in range(20):
                again = proxy_init(pod, ipt)
                assert again.returncode == 0, again.stderr
    finally:
        stop.touch()
        out, err = dialing.communicate(timeout=30)
    assert ready == "ready\n", f"the dialer never reached the proxy: {ready} {err}"
    seen = json.loads(out)
    assert seen["bypassed"] == [], f"{len(seen['bypassed'])} connections went past the proxy"
    assert seen["redirected"] > 100, err  # it kept dialing the whole time
    assert nat_rules(pod, ipt.save, ipt) == installed  # one copy of each, as before


def test_original_destinations_of_redirected_connections(
    network: netns.Network, ipt: netns.Iptables
) -> None:
    pod = network.add("pod", 2)
    v6_net = f"fd77:{network.subnet.network_address.packed[2]:x}::"
    pod.run("ip", "-6", "addr", "add", f"{v6_net}2/64", "dev", "eth0", "nodad")
    done = proxy_init(pod, ipt)
    assert done.returncode == 0, done.stderr
    far_v4 = str(network.subnet.network_address + 9)  # nobody has it: the redirect answers
    found = json.loads(
        pod.run(sys.executable, "-c", ORIGINAL_DESTINATIONS, far_v4, f"{v6_net}9", env=ipt.env)
    )
    assert found["v4"] == f"{far_v4}:8080"
    assert found["v6"] == f"[{v6_net}9]:8443"
    assert found["direct"].startswith("not redirected")


# -- end to end ------------------------------------------------------------------------------


class BridgeIdentityService(IdentityService):
    """The identity service on the bridge's address, where the pods reach it."""

    def __init__(self, kubeconfig: pathlib.Path, trust: pathlib.Path, log: pathlib.Path, host: str):
        super().__init__(kubeconfig, trust, log)
        self.host = host

    def start(self, wait: bool = True) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "meshward",
                    "identity",
                    "serve",
                    "--verbose",
                    "--issuer-dir",
                    str(self.trust),
                    "--trust-anchors",
                    str(self.trust / "ca-bundle.crt"),
                    "--addr",
                    f"{self.host}:{self.port}",
                    "--admin-addr",
                    f"127.0.0.1:{self.admin_port}",
                ],
                env={**os.environ, "KUBECONFIG": str(self.kubeconfig)},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if wait:
            kubetest.wait_for(f"the identity service\n{self.log_tail()}", self.ready, 30)


class Processes:
    """Processes started for a test, stopped (in reverse order) on every path."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: pathlib.Path, env: dict[str, str]) -> None:
        with log.open("ab") as out:
            self.procs.append(
                subprocess.Popen(
                    argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=kubetest.ROOT
                )
            )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


@pytest.fixture
def processes(network: netns.Network) -> Iterator[Processes]:
    """Depends on ``network`` so that the processes stop before their namespaces go."""
    started = Processes()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def shared_dir() -> Iterator[pathlib.Path]:
    """A directory the proxies' UID can reach (pytest's own are private to root)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="meshward-transparent-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class PodProxy:
    """The proxy of one pod: a transparent-mode proxy process under UID 2102, in the pod."""

    def __init__(self, pod: netns.Pod, log: pathlib.Path, env: dict[str, str]) -> None:
        self.pod, self.log, self.env = pod, log, env

    def get(self, path: str) -> tuple[int, bytes]:
        url = f"http://{self.pod.ip}:{interception.ADMIN_PORT}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def ready(self) -> bool:
        try:
            return self.get("/ready")[0] == 200
        except OSError:
            return False

    def metric(self, metric: str, **labels: str) -> float:
        _, body = self.get("/metrics")
        return sum(
            sample.value
            for family in parser.text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == metric and labels.items() <= sample.labels.items()
        )

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def authorization(ns: str, clients_cidr: str, sa: str) -> str:
    """An opaque Server on the application's port for app=web, and ``sa`` let in from the
    pods' network."""
    return textwrap.dedent(f"""
        apiVersion: policy.meshward.io/v1alpha1
        kind: Server
        metadata: {{name: web, namespace: {ns}}}
        spec:
          podSelector: {{matchLabels: {{app: web}}}}
          port: {APP_PORT}
          proxyProtocol: opaque
        ---
        apiVersion: policy.meshward.io/v1alpha1
        kind: ServerAuthorization
        metadata: {{name: from-{sa}, namespace: {ns}}}
        spec:
          server: {{name: web}}
          client:
            networks: [{{cidr: {clients_cidr}}}]
            meshTLS:
              serviceAccounts: [{{name: {sa}}}]
    """)


async def http_get(
    pod: netns.Pod, host: str, port: int, path: str = "/hello.txt"
) -> dict[str, object]:
    """An unmodified client in ``pod`` asks ``host:port`` for ``path``."""
    proc = await asyncio.create_subprocess_exec(
        *pod.argv(sys.executable, "-c", HTTP_CLIENT, host, str(port), path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    answer: dict[str, object] = json.loads(out)
    return answer


@pytest.fixture
async def outside_server(network: netns.Network) -> AsyncIterator[int]:
    """A plain HTTP responder on the host's bridge address: outside the mesh networks."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = b"outside\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, network.gateway, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


IPV6_DIAL = """
import socket, sys
with socket.create_connection(("::1", int(sys.argv[1])), timeout=5) as s:
    print("accepted, then closed" if s.recv(1) == b"" else "answered")
"""


@pytest.mark.cluster
async def test_an_unmodified_client_reaches_a_meshed_server_over_mtls_and_policy_holds(
    network: netns.Network,
    ipt: netns.Iptables,
    processes: Processes,
    shared_dir: pathlib.Path,
    outside_server: int,
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    if (reason := netns.unprivileged_problem(PROXY_UID)) is not None:
        pytest.skip(reason)
    ns = namespace
    # Pods at the top half of the /24; the host's bridge address (.1) is outside the mesh.
    pods = {
        sa: network.add(sa, host) for sa, host in (("web", 130), ("client", 131), ("intruder", 132))
    }
    mesh = f"{network.subnet.network_address + 128}/25"
    for pod in pods.values():
        done = proxy_init(pod, ipt)
        assert done.returncode == 0, done.stderr

    identity = BridgeIdentityService(
        kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "identity.log", network.gateway
    )
    identity.start()
    try:
        kubectl.apply(kubetest.pod_manifest(ns, "web-0", "web"))
        kubectl.apply(authorization(ns, mesh, "client"))
        doc = kubetest.wait_document(
            core,
            ns,
            lambda d: [len(s.rules) for s in d.servers if s.name == "web"] == [1],
            "Server web with its authorization",
        )
        policy = shared_dir / "policy.json"
        policy.write_text(doc.to_json())
        policy.chmod(0o644)

        site = shared_dir / "site"
        site.mkdir()
        (site / "hello.txt").write_text(GREETING)
        app_log = tmp_path / "app.log"  # logs stay for a look after a failure
        processes.start(
            pods["web"].argv(
                sys.executable,
                "-u",
                "-m",
                "http.server",
                str(APP_PORT),
                "--bind",
                "0.0.0.0",
                "--directory",
                str(site),
            ),
            app_log,
            dict(os.environ),
        )
        proxies = {}
        for sa, pod in pods.items():
            directory = shared_dir / sa
            (directory / "identity").mkdir(parents=True)
            (directory / "token").write_text(token_for(core, ns, sa))
            for path in (directory / "identity", directory / "token"):
                os.chown(path, PROXY_UID, PROXY_UID)
            (directory / "token").chmod(0o600)
            env = {
                **os.environ,
                "MESHWARD_PROXY_IDENTITY_DIR": str(directory / "identity"),
                "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS": (
                    identity.trust / "ca-bundle.crt"
                ).read_text(),
                "MESHWARD_PROXY_IDENTITY_TOKEN_FILE": str(directory / "token"),
                "MESHWARD_PROXY_IDENTITY_LOCAL_NAME": name(sa, ns),
                "MESHWARD_PROXY_IDENTITY_SVC_ADDR": f"{network.gateway}:{identity.port}",
                "MESHWARD_PROXY_IDENTITY_SVC_NAME": "localhost",
                "MESHWARD_PROXY_POLICY_FILE": str(policy),
                "MESHWARD_PROXY_OUTBOUND_MESH_NETWORKS": mesh,
                "MESHWARD_PROXY_POD_NAME": f"{sa}-0",
            }
            proxies[sa] = PodProxy(pod, tmp_path / f"{sa}-proxy.log", env)
            processes.start(
                pod.argv(sys.executable, "-m", "meshward.proxy", "--verbose", uid=PROXY_UID),
                proxies[sa].log,
                env,
            )
        for proxy in proxies.values():
            try:
                kubetest.wait_for(f"the proxy in {proxy.pod.netns}", proxy.ready, 30)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{proxy.log_tail()}") from None
        kubetest.wait_for("the application", lambda: "Serving HTTP" in app_log.read_text())

        web, ok = proxies["web"], proxies["client"]
        server_ip = pods["web"].ip
        # The authorized client: it dialled the pod's IP and the app's port, nothing else.
        assert await http_get(pods["client"], server_ip, APP_PORT) == {
            "status": 200,
            "body": GREETING,
        }
        assert (
            web.metric(
                "inbound_tcp_authz_allow_total",
                srv_kind="Server",
                srv_name="web",
                srv_port=str(APP_PORT),
                authz_name="from-client",
                tls="true",
                client_id=name("client", ns),
            )
            == 1
        ), web.log_tail()
        assert ok.metric("tcp_open_total", direction="outbound") == 1  # through its own proxy
        # The application only ever sees its proxy, which dials the pod's own address (a
        # loopback-only port stays private to the pod).
        requests = [line for line in app_log.read_text().splitlines() if "GET /" in line]
        assert len(requests) == 1 and requests[0].startswith(f"{server_ip} ")

        # The proxy's own inbound port is not a way in: nothing behind it to forward to.
        assert "error" in await http_get(pods["client"], server_ip, interception.INBOUND_PORT)

        # Where the pod has IPv6, proxy-init redirects it too, and the proxy listens for it on
        # the same ports (a dial straight to them is accepted, then closed: not redirected).
        if pods["web"].run("cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6").strip() == "0":
            for port in (interception.INBOUND_PORT, interception.OUTBOUND_PORT):
                answer = pods["web"].run(sys.executable, "-c", IPV6_DIAL, str(port))
                assert answer.strip() == "accepted, then closed", (port, answer, web.log_tail())

        # Another ServiceAccount over mTLS: denied by the server's policy.
        refused = await http_get(pods["intruder"], server_ip, APP_PORT)
        assert "error" in refused, refused
        assert (
            web.metric("inbound_tcp_authz_deny_total", tls="true", client_id=name("intruder", ns))
            == 1
        )

        # No proxy at all (the host, plaintext): the redirect leaves no way around the policy.
        reader, writer = await asyncio.open_connection(server_ip, APP_PORT)
        try:
            writer.write(b"GET /hello.txt HTTP/1.1\r\nHost: web\r\n\r\n")
            await writer.drain()
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), 15) == b""
        finally:
            writer.close()
        assert len([line for line in app_log.read_text().splitlines() if "GET /" in line]) == 1

        # Outside the mesh networks, the client's bytes pass through its proxy in plaintext.
        before = ok.metric("tcp_open_total", direction="outbound")
        outside = await http_get(pods["client"], network.gateway, outside_server, "/")
        assert outside == {"status": 200, "body": "outside\n"}
        assert ok.metric("tcp_open_total", direction="outbound") == before + 1
    finally:
        identity.stop()


# -- destination discovery, end to end ---------------------------------------------------------


class BridgePolicyService:
    """``meshward policy serve`` on the bridge's address, where the pods' proxies reach it; its
    admin port (readiness, metrics) on the host's loopback."""

    def __init__(self, host: str, port: int, log: pathlib.Path) -> None:
        self.host, self.port, self.log = host, port, log
        self.admin_port = kubetest.free_port()

    def start(
        self,
        processes: Processes,
        kubeconfig: pathlib.Path,
        trust: pathlib.Path,
        server_name: str,
        namespace: str,
    ) -> None:
        """Serve with the mesh issuer in ``trust``, named ``server_name``, publishing the
        proxies' reports to ``namespace``; returns once it has listed the cluster."""
        processes.start(
            [
                *(sys.executable, "-m", "meshward", "policy", "serve", "--verbose"),
                *("--issuer-dir", str(trust), "--trust-anchors", str(trust / "ca-bundle.crt")),
                *("--addr", f"{self.host}:{self.port}"),
                *("--admin-addr", f"127.0.0.1:{self.admin_port}"),
                *("--server-name", server_name, "--namespace", namespace),
            ],
            self.log,
            {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "policy-0"},
        )
        kubetest.wait_for(f"the policy service\n{self.log_tail()}", self.ready, 30)

    def get(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.admin_port}{path}"
        with urllib.request.urlopen(url, timeout=2) as resp:
            body: bytes = resp.read()
            return body

    def ready(self) -> bool:
        try:
            self.get("/ready")
        except OSError:  # refused while starting, 503 (HTTPError) until synced
            return False
        return True

    def lookups(self) -> dict[str, float]:
        """``policy_lookups_total`` by result."""
        return {
            sample.labels["result"]: sample.value
            for family in parser.text_string_to_metric_families(self.get("/metrics").decode())
            for sample in family.samples
            if sample.name == "policy_lookups_total"
        }

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def running_pod(
    core: client.CoreV1Api,
    namespace: str,
    pod: str,
    service_account: str,
    ip: str,
    injector: inject.Settings | None,
) -> dict[str, Any]:
    """Create Pod ``pod`` (label app=<pod without its -0>) running as ``service_account``,
    injected as ``meshward inject`` would with ``injector`` (None: left plain), and mark it
    Running at ``ip`` as the kubelet would. Returns the pod as created."""
    manifest = yaml.safe_load(kubetest.pod_manifest(namespace, pod, pod.removesuffix("-0")))
    manifest["spec"]["serviceAccountName"] = service_account
    if injector is not None:
        at = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        manifest, reports = inject.inject_object(manifest, injector, at, pod)
        assert [report.injected for report in reports] == [True], reports
    core.create_namespaced_pod(namespace, manifest)
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    core.patch_namespaced_pod_status(pod, namespace, {"status": status})
    created: dict[str, Any] = manifest
    return created


def init_arguments(pod: dict[str, Any]) -> list[str]:
    """The arguments the injected pod's meshward-init container gives ``meshward proxy-init``."""
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == inject.INIT_CONTAINER]
    command: list[str] = init["command"]
    assert command[:2] == ["meshward", "proxy-init"], command
    return command[2:]


def serve_site(
    processes: Processes, pod: netns.Pod, shared_dir: pathlib.Path, log: pathlib.Path
) -> str:
    """An unmodified http.server in ``pod`` on the application's port, serving /hello.txt,
    which names the pod; returns that greeting."""
    site = shared_dir / f"site-{pod.netns}"
    site.mkdir()
    greeting = f"hello from {pod.netns}\n"
    (site / "hello.txt").write_text(greeting)
    processes.start(
        pod.argv(
            *(sys.executable, "-u", "-m", "http.server", str(APP_PORT)),
            *("--bind", "0.0.0.0", "--directory", str(site)),
        ),
        log,
        dict(os.environ),
    )
    return greeting


def start_pod_proxy(
    processes: Processes,
    pod: netns.Pod,
    directory: pathlib.Path,
    log: pathlib.Path,
    token: str,
    env: dict[str, str],
) -> PodProxy:
    """The pod's transparent proxy under its own UID, with ``token`` and ``env`` (the
    MESHWARD_PROXY_* variables besides the identity directory and token file)."""
    (directory / "identity").mkdir(parents=True)
    (directory / "token").write_text(token)
    for path in (directory / "identity", directory / "token"):
        os.chown(path, PROXY_UID, PROXY_UID)
    (directory / "token").chmod(0o600)
    full = {
        **os.environ,
        "MESHWARD_PROXY_IDENTITY_DIR": str(directory / "identity"),
        "MESHWARD_PROXY_IDENTITY_TOKEN_FILE": str(directory / "token"),
        **env,
    }
    proxy = PodProxy(pod, log, full)
    processes.start(
        pod.argv(sys.executable, "-m", "meshward.proxy", "--verbose", uid=PROXY_UID), log, full
    )
    return proxy


def placed(proxy: PodProxy) -> bool:
    """Whether ``proxy`` has taken a policy document into effect."""
    return proxy.metric("policy_updates_total") >= 1


def serving(app_log: pathlib.Path) -> bool:
    """Whether the http.server logging to ``app_log`` listens."""
    return "Serving HTTP" in app_log.read_text()


def requests_in(app_log: pathlib.Path) -> list[str]:
    """The requests an http.server logged, one line each."""
    return [line for line in app_log.read_text().splitlines() if "GET /" in line]


@pytest.mark.cluster
async def test_discovery_sends_mtls_to_meshed_pods_only_and_pins_who_answers(
    network: netns.Network,
    ipt: netns.Iptables,
    processes: Processes,
    shared_dir: pathlib.Path,
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    core: client.CoreV1Api,
    kubeconfig: pathlib.Path,
    namespace: str,
    tmp_path: pathlib.Path,
) -> None:
    """``web`` is meshed, ``legacy`` is not (no rules, no proxy), ``impostor``'s API record says
    ServiceAccount web2 while its proxy is certified as ``intruder``. The client's proxy follows
    the real policy service, whose lookups answer from the Pods the API holds: it carries
    the connection to web over mTLS, to legacy in plaintext, and refuses impostor. ``blind``
    reads a policy file instead: without discovery it can not reach legacy, and takes impostor
    for anyone in the mesh."""
    if (reason := netns.unprivileged_problem(PROXY_UID)) is not None:
        pytest.skip(reason)
    ns = namespace
    hosts = {"web": 130, "client": 131, "legacy": 132, "impostor": 133, "blind": 134}
    pods = {role: network.add(role, host) for role, host in hosts.items()}
    mesh = f"{network.subnet.network_address + 128}/25"

    identity = BridgeIdentityService(
        kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "identity.log", network.gateway
    )
    identity.start()
    policy = BridgePolicyService(network.gateway, kubetest.free_port(), tmp_path / "policy.log")
    # The injector as the operator would run it here: the services at the bridge's address.
    injector = _settings.injector_from_env(
        {
            "MESHWARD_INJECT_IDENTITY_SVC_ADDR": f"{network.gateway}:{identity.port}",
            "MESHWARD_INJECT_IDENTITY_SVC_NAME": "localhost",
            "MESHWARD_INJECT_POLICY_SVC_ADDR": f"{policy.host}:{policy.port}",
        }
    )
    proxies: dict[str, PodProxy] = {}

    def logs() -> str:
        tails = [f"--- {role} proxy\n{proxy.log_tail()}" for role, proxy in proxies.items()]
        return "\n".join([*tails, f"--- policy service\n{policy.log_tail()}"])

    def wait(what: str, done: Callable[[], bool], timeout: float = 30) -> None:
        """kubetest.wait_for, its failure followed by the logs as they are then."""
        try:
            kubetest.wait_for(what, done, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{logs()}") from None

    try:
        # Tokens first: they create the ServiceAccounts the pods run as.
        tokens = {sa: token_for(core, ns, sa) for sa in ("web", "client", "intruder", "blind")}
        core.create_namespaced_service_account(
            ns, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="web2"))
        )
        kubetest.wait_service_account(core, ns)  # legacy runs as default
        accounts = {"web": "web", "client": "client", "impostor": "web2", "blind": "blind"}
        for role, sa in accounts.items():
            record = running_pod(core, ns, f"{role}-0", sa, pods[role].ip, injector)
            # The rules are the ones the pod's injected init container would install.
            done = proxy_init(pods[role], ipt, *init_arguments(record))
            assert done.returncode == 0, done.stderr
        running_pod(core, ns, "legacy-0", "default", pods["legacy"].ip, None)

        kubectl.apply(authorization(ns, mesh, "client"))
        doc = kubetest.wait_document(
            core,
            ns,
            lambda d: (
                [len(s.rules) for s in d.servers if s.name == "web"] == [1]
                and {"web-0", "client-0", "impostor-0"} <= d.pods.keys()
            ),
            "Server web with its authorization, and the meshed pods",
        )
        policy_file = shared_dir / "policy.json"
        policy_file.write_text(doc.to_json())
        policy_file.chmod(0o644)
        policy.start(processes, kubeconfig, identity.trust, injector.policy_svc_name, ns)

        app_logs = {role: tmp_path / f"{role}-app.log" for role in ("web", "legacy", "impostor")}
        greetings = {
            role: serve_site(processes, pods[role], shared_dir, log)
            for role, log in app_logs.items()
        }

        common = {
            "MESHWARD_PROXY_IDENTITY_TRUST_ANCHORS": (identity.trust / "ca-bundle.crt").read_text(),
            "MESHWARD_PROXY_IDENTITY_SVC_ADDR": injector.identity_svc_addr,
            "MESHWARD_PROXY_IDENTITY_SVC_NAME": injector.identity_svc_name,
            "MESHWARD_PROXY_OUTBOUND_MESH_NETWORKS": mesh,
        }
        service = {
            "MESHWARD_PROXY_POLICY_SVC_ADDR": injector.policy_svc_addr,
            "MESHWARD_PROXY_POLICY_SVC_NAME": injector.policy_svc_name,
        }
        # role: (certified as, policy source); impostor's certificate is not its record's.
        setups = {
            "web": ("web", service),
            "client": ("client", service),
            "impostor": ("intruder", service),
            "blind": ("blind", {"MESHWARD_PROXY_POLICY_FILE": str(policy_file)}),
        }
        for role, (sa, source) in setups.items():
            proxies[role] = start_pod_proxy(
                processes,
                pods[role],
                shared_dir / role,
                tmp_path / f"{role}-proxy.log",
                tokens[sa],
                {
                    **common,
                    **source,
                    "MESHWARD_PROXY_IDENTITY_LOCAL_NAME": name(sa, ns),
                    "MESHWARD_PROXY_POD_NAME": f"{role}-0",
                },
            )
        for role, proxy in proxies.items():
            wait(f"the proxy of {role}", proxy.ready)
        for role in ("web", "client", "impostor"):  # each has its namespace's policy
            wait(f"the policy to reach {role}'s proxy", functools.partial(placed, proxies[role]))
        for role, log in app_logs.items():
            wait(f"{role}'s application", functools.partial(serving, log))
        web, ok, blind = proxies["web"], proxies["client"], proxies["blind"]
        ip = {role: pod.ip for role, pod in pods.items()}

        # 1. Meshed: over mTLS, and web's proxy saw the client's identity.
        answer = await http_get(pods["client"], ip["web"], APP_PORT)
        assert answer == {"status": 200, "body": greetings["web"]}, f"{answer}\n{logs()}"
        allowed = web.metric(
            "inbound_tcp_authz_allow_total",
            srv_name="web",
            authz_name="from-client",
            tls="true",
            client_id=name("client", ns),
        )
        assert allowed == 1, logs()

        # 2. Not meshed: plaintext, straight from the client's pod to the application.
        answer = await http_get(pods["client"], ip["legacy"], APP_PORT)
        assert answer == {"status": 200, "body": greetings["legacy"]}, f"{answer}\n{logs()}"
        assert [line.split()[0] for line in requests_in(app_logs["legacy"])] == [ip["client"]]
        # Without discovery (a policy file) the same dial goes out as mTLS, which legacy's
        # plain HTTP server can not answer.
        answer = await http_get(pods["blind"], ip["legacy"], APP_PORT)
        assert answer.get("status") != 200, f"{answer}\n{logs()}"
        assert blind.metric("tls_handshake_failures_total", direction="outbound") == 1, logs()
        assert blind.metric("outbound_discovery_total") == 0
        assert len(requests_in(app_logs["legacy"])) == 1

        # 3. Pinned: impostor's proxy has a certificate the anchors vouch for, but not of web2,
        # the ServiceAccount its pod runs as: refused before a byte of the request is sent.
        answer = await http_get(pods["client"], ip["impostor"], APP_PORT)
        assert answer.get("status") != 200, f"{answer}\n{logs()}"
        intruder, web2 = (
            pki.Identity(ns, sa, injector.trust_domain) for sa in ("intruder", "web2")
        )
        refusal = (
            f"refused peer {ip['impostor']}:{APP_PORT}: it is {intruder.spiffe_id}, expected "
            f"one of {web2.spiffe_id}"
        )
        wait(f"the client's proxy to log {refusal!r}", lambda: refusal in ok.log.read_text())
        assert requests_in(app_logs["impostor"]) == []
        # Accepting any mesh identity, as blind does without discovery, impostor would answer.
        answer = await http_get(pods["blind"], ip["impostor"], APP_PORT)
        assert answer == {"status": 200, "body": greetings["impostor"]}, f"{answer}\n{logs()}"

        # 4. Each outbound connection was decided on the policy service's word, and it counted
        # the same lookups: two meshed (web, impostor), one plain (legacy), none refused.
        discovered = {
            result: ok.metric("outbound_discovery_total", result=result)
            for result in ("meshed", "plain", "fallback")
        }
        assert discovered == {"meshed": 2, "plain": 1, "fallback": 0}, logs()
        assert policy.lookups() == {"meshed": 2, "plain": 1}, logs()
    finally:
        identity.stop()
