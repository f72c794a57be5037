"""Issue 6 end to end: an issuer rotation and a full anchor rotation under live traffic, with zero
failed requests, and an operator killed (SIGKILL) and restarted in the middle of each phase.

The real operator serves a TrustDomain on the session control plane (its own root namespace; the
TrustDomain is cleared before and after, as in ``test_trustdomain``). Three proxies run in their
own processes, certified by the real identity service and following the real policy server, to
which they report their trust state every second; the policy server publishes the reports in the
operator's namespace, where the operator takes its census. ``web`` serves an echo application;
``client``'s outbound port leads to it, and a steady loop of requests runs through them, on new
connections and on one long-lived connection, for the whole test. ``laggard`` carries no traffic:
its token is made unusable to hold the rotation in IssuerSwitched, the way a proxy that can not
renew holds it in a cluster.

There is no kubelet: :class:`Kubelet` stands in for it, copying the trust-roots ConfigMap and the
issuer Secret into the files the processes read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import os
import pathlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import yaml
from cryptography import x509
from kubernetes import client
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig

from meshward import errors, inject, proxyreports, trustbundle
from meshward.identity import authority, commands, pki, trustdomain
from meshward.proxy import settings as proxy_settings
from tests import kubetest
from tests.test_bundle import ConfigMapVolume
from tests.test_bundle_rotation import CA, present
from tests.test_identity_service import IdentityService, name, token_for
from tests.test_proxy_run import PolicyService, Proxy, server_and_authorization, until_placed
from tests.test_trustdomain import PREFIX, manifest

pytestmark = pytest.mark.cluster

T = TypeVar("T")

KUBELET_POLL = 0.5
"""Seconds between the stand-in kubelet's looks at the ConfigMaps and the Secret."""
LEAF_LIFETIME = "20s"
"""Short leaves: proxies renew about every 14 s, so they reach a rotated issuer on their own."""
ISSUER_DUE_AFTER = 30
"""Seconds after its creation at which the first issuer falls due for rotation: an hour-long
issuer rotated this long before its expiry. The operator's periodic round (every minute)
rotates it while the traffic runs."""
WORKLOADS = ("web", "client", "laggard")


# -- the stand-in kubelet ----------------------------------------------------------------------


class Kubelet:
    """Stands in for the kubelet, which this control plane does not have.

    Every :data:`KUBELET_POLL` seconds it reads the trust-roots ConfigMap (``ca-bundle.crt`` and
    ``renew-leaves-before``) and the issuer Secret of the operator's namespace, and the
    trust-roots ConfigMap of each workload namespace, and puts what changed into the volumes it
    keeps: a control-plane volume (the identity service's, the policy server's) projects the
    ConfigMap and the Secret into one directory; a proxy's volume holds its namespace's
    ConfigMap. Each update is the kubelet's atomic swap of the ``..data`` link
    (:class:`tests.test_bundle.ConfigMapVolume`), so a reader sees one version or the next.
    """

    def __init__(self, api: aclient.ApiClient, root: str) -> None:
        self._core = aclient.CoreV1Api(api)
        self._root = root
        self._control_plane: list[ConfigMapVolume] = []
        self._workloads: list[tuple[str, ConfigMapVolume]] = []
        self._written: dict[pathlib.Path, dict[str, str]] = {}
        self.running = True
        """Cleared to stop :meth:`run` after its current pass."""

    def control_plane_volume(self, directory: pathlib.Path) -> pathlib.Path:
        self._control_plane.append(ConfigMapVolume(directory))
        return directory

    def workload_volume(self, namespace: str, directory: pathlib.Path) -> pathlib.Path:
        self._workloads.append((namespace, ConfigMapVolume(directory)))
        return directory

    async def sync(self) -> None:
        roots = await self._config_map(self._root)
        issuer = await self._secret(self._root, commands.ISSUER_SECRET)
        if roots is not None and issuer is not None:
            for volume in self._control_plane:
                self._put(volume, {**roots, **issuer})
        read: dict[str, dict[str, str] | None] = {}
        for namespace, volume in self._workloads:
            if namespace not in read:
                read[namespace] = await self._config_map(namespace)
            data = read[namespace]
            if data is not None:
                self._put(volume, data)

    async def run(self) -> None:
        while self.running:
            await self.sync()
            await asyncio.sleep(KUBELET_POLL)

    def _put(self, volume: ConfigMapVolume, data: dict[str, str]) -> None:
        if self._written.get(volume.directory) != data:
            volume.write(data)
            self._written[volume.directory] = data

    async def _config_map(self, namespace: str) -> dict[str, str] | None:
        try:
            found = await self._core.read_namespaced_config_map(commands.TRUST_ROOTS, namespace)
        except aclient.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(found.data or {})

    async def _secret(self, namespace: str, secret: str) -> dict[str, str] | None:
        try:
            found = await self._core.read_namespaced_secret(secret, namespace)
        except aclient.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}


# -- the processes and the traffic -------------------------------------------------------------


class Traffic:
    """Requests through ``port`` (client's outbound) until stopped: a new connection each time,
    and one long-lived connection used all along. Every failure is recorded with its time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests = 0
        self.kept_alive = 0
        """Exchanges on the long-lived connection."""
        self.failures: list[str] = []
        self._start = time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []
        self._running = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._running = True
        self._tasks = [loop.create_task(self._new_connections()), loop.create_task(self._kept())]

    async def stop(self) -> None:
        """Let each loop finish its request (they end on a flag: Python 3.11's wait_for can
        swallow a cancellation that meets a finished request), then make sure they are gone."""
        self._running = False
        for task in self._tasks:
            await finish(task)

    def _failed(self, what: str, problem: str) -> None:
        self.failures.append(f"{time.monotonic() - self._start:7.2f} s {what}: {problem}")

    async def _new_connections(self) -> None:
        while self._running:
            self.requests += 1
            payload = f"request-{self.requests:07d}".encode()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 5
                )
            except (OSError, TimeoutError) as exc:
                self._failed(f"request {self.requests}", f"connect: {exc!r}")
            else:
                try:
                    writer.write(payload)
                    await writer.drain()
                    echo = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
                    if echo != payload:
                        self._failed(f"request {self.requests}", f"echo {echo!r}")
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self._failed(f"request {self.requests}", repr(exc))
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            await asyncio.sleep(0.05)

    async def _kept(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            while self._running:
                payload = f"kept-{self.kept_alive:07d}".encode()
                try:
                    writer.write(payload)
                    await writer.drain()
                    echo = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                    self._failed("the long-lived connection", repr(exc))
                    return
                if echo != payload:
                    self._failed("the long-lived connection", f"echo {echo!r}")
                    return
                self.kept_alive += 1
                await asyncio.sleep(0.1)
        finally:
            writer.close()


@pytest.fixture
async def aapi(kubeconfig: pathlib.Path) -> AsyncIterator[aclient.ApiClient]:
    """An asyncio API client: the test's loop also carries the traffic, so nothing blocks it
    for long."""
    api = await aconfig.new_client_from_config(config_file=str(kubeconfig))
    yield api
    await api.close()


def _clear(core: client.CoreV1Api, custom: client.CustomObjectsApi, root: str) -> None:
    """No TrustDomain of these tests, and no trust material or proxy reports in the operator's
    namespace (the next-anchor Secret too: a rotation cut short leaves it)."""
    for item in custom.list_cluster_custom_object(
        trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL
    )["items"]:
        if item["metadata"]["name"].startswith(PREFIX):
            custom.delete_cluster_custom_object(
                trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, item["metadata"]["name"]
            )
    for delete, what in (
        (core.delete_namespaced_secret, commands.ISSUER_SECRET),
        (core.delete_namespaced_secret, commands.ANCHOR_SECRET),
        (core.delete_namespaced_secret, trustdomain.NEXT_ANCHOR_SECRET),
        (core.delete_namespaced_config_map, commands.TRUST_ROOTS),
    ):
        try:
            delete(what, root)
        except client.exceptions.ApiException as exc:
            if exc.status != 404:
                raise
    core.delete_collection_namespaced_config_map(root, label_selector=f"{proxyreports.LABEL}=true")


@pytest.fixture
def td(
    operator: kubetest.Operator, core: client.CoreV1Api, custom: client.CustomObjectsApi
) -> Iterator[str]:
    """A fresh TrustDomain name; the operator's namespace emptied of trust material before and
    after, and the operator left running whatever happened."""
    _clear(core, custom, operator.root_namespace)
    yield f"{PREFIX}rotation-{uuid.uuid4().hex[:6]}"
    if not operator.alive():
        operator.start()
    _clear(core, custom, operator.root_namespace)


@pytest.fixture
def stragglers(core: client.CoreV1Api) -> Iterator[str]:
    """A namespace for silent pods (:func:`silent_pod`), not meshed."""
    ns = f"t-stragglers-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    kubetest.wait_service_account(core, ns)
    yield ns
    core.delete_namespace(ns)


def silent_pod(core: client.CoreV1Api, ns: str, pod: str) -> str:
    """A pod that looks injected and runs (the status is patched: there is no kubelet) but never
    reports: the operator's census counts it as a proxy not known to be ready, which holds an
    anchor rotation in its phase. Returns ``namespace/pod`` as the census names it."""
    core.create_namespaced_pod(
        ns,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name=pod),
            spec=client.V1PodSpec(
                containers=[
                    client.V1Container(name="app", image="registry.invalid/app:1"),
                    client.V1Container(
                        name=inject.PROXY_CONTAINER, image="registry.invalid/proxy:1"
                    ),
                ]
            ),
        ),
    )
    core.patch_namespaced_pod_status(pod, ns, {"status": {"phase": "Running"}})
    return f"{ns}/{pod}"


def workload_pod(ns: str, sa: str) -> str:
    """Pod ``<sa>-0`` running as ServiceAccount ``sa`` (stored only: the proxies run here)."""
    pod = yaml.safe_load(kubetest.pod_manifest(ns, f"{sa}-0", sa))
    pod["spec"]["serviceAccountName"] = sa
    return yaml.safe_dump(pod)


def waiting_on(status: dict[str, Any]) -> list[str] | None:
    """The proxies ``status.waitingFor`` names (``...: ns/pod, ns/pod``), None if it names none."""
    text = str(status.get("waitingFor") or "")
    if "): " not in text:
        return None
    return sorted(text.rsplit("): ", 1)[1].split(", "))


def reported(proxy: Proxy) -> tuple[str, str]:
    """(trust bundle fingerprint, leaf issuer fingerprint) from the proxy's /identity."""
    found = proxy.identity()
    bundle, issuer = found["trust_bundle"], found["issuer"]
    assert isinstance(bundle, dict) and isinstance(issuer, dict)
    return str(bundle["fingerprint"]), str(issuer["fingerprint"])


def issuer_of(core: client.CoreV1Api, root: str) -> pki.Issuer:
    s = core.read_namespaced_secret(commands.ISSUER_SECRET, root)
    data = s.data or {}
    return pki.Issuer.from_pem(base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]))


def certificate_in(core: client.CoreV1Api, root: str, secret: str) -> bytes | None:
    try:
        s = core.read_namespaced_secret(secret, root)
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return base64.b64decode((s.data or {})["tls.crt"])


def trust_roots(core: client.CoreV1Api, ns: str) -> dict[str, str]:
    return dict(core.read_namespaced_config_map(commands.TRUST_ROOTS, ns).data or {})


def bundle_in(core: client.CoreV1Api, ns: str) -> list[x509.Certificate]:
    return pki.load_certificates(trust_roots(core, ns)[authority.ANCHORS].encode())


def chains_to(issuer: pki.Issuer, anchor: x509.Certificate) -> bool:
    try:
        issuer.check([anchor])
    except errors.IssuerError:
        return False
    return True


class Scene:
    """What the test drives, and how it waits: every wait polls, fails with the TrustDomain's
    status, the operator's log and the traffic's failures, and notices a dead kubelet."""

    def __init__(
        self,
        aapi: aclient.ApiClient,
        core: client.CoreV1Api,
        operator: kubetest.Operator,
        td: str,
    ) -> None:
        self.custom = aclient.CustomObjectsApi(aapi)
        self.core = core
        self.operator = operator
        self.td = td
        self.proxies: dict[str, Proxy] = {}
        self.traffic: Traffic | None = None
        self.kubelet: asyncio.Task[None] | None = None

    async def status(self) -> dict[str, Any]:
        found: dict[str, Any] = await self.custom.get_cluster_custom_object(
            trustdomain.GROUP, trustdomain.VERSION, trustdomain.PLURAL, self.td
        )
        return dict(found.get("status") or {})

    async def until(
        self,
        what: str,
        probe: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
        timeout: float = 30.0,
    ) -> T:
        deadline = time.monotonic() + timeout
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.kubelet is not None and self.kubelet.done():
                self.kubelet.result()  # raises what stopped it
                raise AssertionError("the stand-in kubelet stopped")
            try:
                value = probe()
                if inspect.isawaitable(value):
                    value = await value
            except (aclient.exceptions.ApiException, AssertionError, KeyError, OSError) as exc:
                last, value = exc, None
            if value:
                return value  # type: ignore[return-value]
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})\n"
            f"status: {await self.status()}\n"
            f"traffic failures: {self.traffic.failures if self.traffic else None}\n"
            f"operator:\n{self.operator.log_tail()}"
        )

    async def until_status(
        self, what: str, check: Callable[[dict[str, Any]], bool], timeout: float = 30.0
    ) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            status = await self.status()
            return status if check(status) else None

        return await self.until(f"TrustDomain {self.td}: {what}", probe, timeout)

    async def until_proxies(
        self, what: str, bundle: str | None = None, issuer: str | None = None
    ) -> None:
        """Until every proxy's /identity shows ``bundle`` and ``issuer`` (fingerprints)."""

        def probe() -> bool:
            for proxy in self.proxies.values():
                found_bundle, found_issuer = reported(proxy)
                if bundle is not None and found_bundle != bundle:
                    return False
                if issuer is not None and found_issuer != issuer:
                    return False
            return True

        await self.until(f"every proxy to show {what}", probe)

    async def restart_operator(self, phase: str, silent: str, late: list[str]) -> dict[str, Any]:
        """SIGKILL the operator in ``phase`` and start it again. While it is down the silent
        pod ``silent`` appears, so the restarted operator's first rounds show in the status:
        still in ``phase``, waiting for ``late`` and ``silent``. Returns that status."""
        before = await self.status()
        assert before["phase"] == phase, before
        assert self.operator.proc is not None
        killed = self.operator.proc
        self.operator.stop(signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL
        namespace, pod = silent.split("/")
        silent_pod(self.core, namespace, pod)
        self.operator.start()
        after = await self.until_status(
            f"the restarted operator, still in {phase}, to wait for {silent} too",
            lambda s: waiting_on(s) == sorted([*late, silent]),
        )
        assert after["phase"] == phase
        assert after["phaseSince"] == before["phaseSince"], "the phase did not start again"
        assert after["nextAnchor"] == before["nextAnchor"]
        assert after["issuer"] == before["issuer"]
        assert after["anchor"] == before["anchor"]
        return after


async def test_an_anchor_and_an_issuer_rotation_fail_no_request(
    operator: kubetest.Operator,
    kubectl: kubetest.Kubectl,
    kubeconfig: pathlib.Path,
    core: client.CoreV1Api,
    aapi: aclient.ApiClient,
    td: str,
    namespace: str,
    stragglers: str,
    echo: int,
    tmp_path: pathlib.Path,
) -> None:
    root, ns = operator.root_namespace, namespace
    scene = Scene(aapi, core, operator, td)

    # The workloads: meshed namespace, ServiceAccounts, Pods, a Server that lets client in.
    core.patch_namespace(
        ns, {"metadata": {"annotations": {inject.INJECT_ANNOTATION: inject.ENABLED}}}
    )
    kubetest.wait_service_account(core, ns)
    tokens = {sa: token_for(core, ns, sa) for sa in WORKLOADS}
    for sa in WORKLOADS:
        kubectl.apply(workload_pod(ns, sa))
    kubectl.apply(server_and_authorization(ns, echo, "client"))
    kubetest.wait_document(
        core,
        ns,
        lambda d: [len(s.rules) for s in d.servers if s.name == "web"] == [1],
        "Server web letting client in",
    )

    # The TrustDomain; its first issuer falls due for rotation ISSUER_DUE_AFTER seconds on.
    kubectl.apply(
        manifest(td, issuerLifetime="1h", issuerRotateBefore=f"{3600 - ISSUER_DUE_AFTER}s")
    )
    first = await scene.until_status("Ready", lambda s: s.get("phase") == "Ready")
    (anchor_a,) = pki.load_certificates(certificate_in(core, root, commands.ANCHOR_SECRET) or b"")
    issuer_0 = issuer_of(core, root)
    assert first["issuer"]["serial"] == f"{issuer_0.certificate.serial_number:x}"
    await scene.until(f"the trust bundle in {ns}", lambda: bundle_in(core, ns))

    kubelet = Kubelet(aapi, root)
    identity_volume = kubelet.control_plane_volume(tmp_path / "identity-volume")
    policy_volume = kubelet.control_plane_volume(tmp_path / "policy-volume")
    volumes = {sa: kubelet.workload_volume(ns, tmp_path / f"{sa}-trust-roots") for sa in WORKLOADS}
    await kubelet.sync()

    identity = IdentityService(
        kubeconfig, identity_volume, tmp_path / "identity.log", extra=("--lifetime", LEAF_LIFETIME)
    )
    policy: PolicyService | None = None
    rotate: asyncio.subprocess.Process | None = None
    try:
        scene.kubelet = asyncio.get_running_loop().create_task(kubelet.run())
        identity.start(wait=False)
        policy = PolicyService(kubeconfig, policy_volume, tmp_path / "policy.log", namespace=root)
        await scene.until("the identity service", identity.ready)
        await scene.until("the policy server", policy.ready)
        web = name("web", ns)
        for sa in WORKLOADS:
            scene.proxies[sa] = Proxy(
                tmp_path / sa,
                identity,
                tokens[sa],
                name(sa, ns),
                None,
                policy_service=policy.port,
                app_port=echo if sa == "web" else None,
                peer=(scene.proxies["web"].inbound_port, web) if sa == "client" else None,
                pod=f"{sa}-0",
                trust_roots=volumes[sa],
                env={
                    proxy_settings.REPORT_INTERVAL: "1",
                    proxy_settings.RENEW_JITTER: "1",
                },
            )
            scene.proxies[sa].start(wait=False)
        for sa, proxy in scene.proxies.items():
            await scene.until(f"proxy {sa} to be ready\n{proxy.log_tail()}", proxy.ready)
        await until_placed(scene.proxies["web"])
        traffic = scene.traffic = Traffic(scene.proxies["client"].outbound_port)
        traffic.start()
        if (await scene.status())["issuer"] != first["issuer"]:
            pytest.fail(
                f"the issuer was rotated before the traffic began: setup took more than "
                f"{ISSUER_DUE_AFTER} s"
            )

        # -- the issuer rotation: the operator's periodic round finds the issuer due ----------
        rotated = await scene.until_status(
            "the issuer rotated",
            lambda s: s.get("issuer", {}).get("serial") != first["issuer"]["serial"],
            timeout=ISSUER_DUE_AFTER + 70,
        )
        issuer_1 = issuer_of(core, root)
        assert rotated["issuer"]["serial"] == f"{issuer_1.certificate.serial_number:x}"
        assert rotated["anchor"] == first["anchor"]
        assert issuer_1.certificate != issuer_0.certificate
        assert chains_to(issuer_1, anchor_a)
        # Rotate no more: the new issuer would be due in ISSUER_DUE_AFTER seconds too.
        await scene.custom.patch_cluster_custom_object(
            trustdomain.GROUP,
            trustdomain.VERSION,
            trustdomain.PLURAL,
            td,
            {"spec": {"issuerRotateBefore": "20m"}},
            _content_type="application/merge-patch+json",
        )
        await scene.until_proxies(
            "a leaf of the rotated issuer",
            bundle=trustbundle.fingerprint([anchor_a]),
            issuer=trustbundle.certificate_fingerprint(issuer_1.certificate),
        )
        await scene.until_status("Ready", lambda s: s.get("phase") == "Ready")
        assert (await scene.status())["issuer"] == rotated["issuer"]
        assert traffic.failures == [], traffic.failures

        # -- the anchor rotation --------------------------------------------------------------
        old = CA(anchor_a, issuer_1)
        old_client = old.client(tmp_path / "old-client", "client", ns, trusts=old.pem)
        assert await present(scene.proxies["web"].inbound_port, old_client) == b"ping"
        s1 = silent_pod(core, stragglers, "straggler-1")
        rotate = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "meshward", "identity", "rotate"),
            *("--name", td, "--wait", "--timeout", "3m"),
            env={**os.environ, "KUBECONFIG": str(kubeconfig)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )

        # AnchorAdded: both anchors published; every proxy but the silent pod loads them.
        added = await scene.until_status(
            "AnchorAdded, waiting only for the silent pod",
            lambda s: s.get("phase") == "AnchorAdded" and waiting_on(s) == [s1],
        )
        (anchor_b,) = pki.load_certificates(
            certificate_in(core, root, trustdomain.NEXT_ANCHOR_SECRET) or b""
        )
        assert added["nextAnchor"]["serial"] == f"{anchor_b.serial_number:x}"
        assert added["anchor"] == first["anchor"]
        both = trustbundle.fingerprint([anchor_a, anchor_b])
        assert trustbundle.fingerprint(bundle_in(core, root)) == both
        await scene.until_proxies("both anchors", bundle=both)
        next_anchor_pem = certificate_in(core, root, trustdomain.NEXT_ANCHOR_SECRET)

        await scene.restart_operator("AnchorAdded", f"{stragglers}/straggler-2", late=[s1])
        assert certificate_in(core, root, trustdomain.NEXT_ANCHOR_SECRET) == next_anchor_pem
        assert certificate_in(core, root, commands.ANCHOR_SECRET) == pki.to_pem(anchor_a)
        assert trustbundle.fingerprint(bundle_in(core, root)) == both

        # The laggard's token stops working: from now on it can not renew its leaf.
        laggard = scene.proxies["laggard"]
        _replace(laggard.dir / "token", "revoked")
        for pod in ("straggler-1", "straggler-2"):
            core.delete_namespaced_pod(pod, stragglers)

        # IssuerSwitched: an issuer of the new anchor signs; proxies are asked to renew early.
        switched = await scene.until_status(
            "IssuerSwitched", lambda s: s.get("phase") == "IssuerSwitched"
        )
        issuer_n = issuer_of(core, root)
        assert switched["issuer"]["serial"] == f"{issuer_n.certificate.serial_number:x}"
        assert chains_to(issuer_n, anchor_b) and not chains_to(issuer_n, anchor_a)
        assert switched["nextAnchor"] == added["nextAnchor"]
        renew_before = trust_roots(core, root)[trustbundle.RENEW_BEFORE_KEY]
        laggard_name = f"{ns}/laggard-0"
        await scene.until_status(
            "every proxy but the laggard to hold a leaf of the new issuer",
            lambda s: s.get("phase") == "IssuerSwitched" and waiting_on(s) == [laggard_name],
        )
        for sa in ("web", "client"):
            assert reported(scene.proxies[sa]) == (
                both,
                trustbundle.certificate_fingerprint(issuer_n.certificate),
            )

        await scene.restart_operator(
            "IssuerSwitched", f"{stragglers}/straggler-3", late=[laggard_name]
        )
        assert certificate_in(core, root, trustdomain.NEXT_ANCHOR_SECRET) == next_anchor_pem
        assert issuer_of(core, root).certificate == issuer_n.certificate, "no second switch"
        assert trust_roots(core, root)[trustbundle.RENEW_BEFORE_KEY] == renew_before
        for sa in ("web", "client"):  # asked once, renewed early once
            log = scene.proxies[sa].log.read_text()
            assert log.count("as asked") == 1, log

        # The laggard gets a working token again, the silent pod goes: the rotation completes.
        core.delete_namespaced_pod("straggler-3", stragglers)
        _replace(laggard.dir / "token", token_for(core, ns, "laggard"))
        done = await scene.until_status(
            "Ready after the anchor rotation",
            lambda s: s.get("phase") == "Ready" and not s.get("nextAnchor"),
            timeout=45,
        )
        assert done["anchor"]["serial"] == f"{anchor_b.serial_number:x}"
        assert done["issuer"] == switched["issuer"]
        assert certificate_in(core, root, commands.ANCHOR_SECRET) == next_anchor_pem
        assert certificate_in(core, root, trustdomain.NEXT_ANCHOR_SECRET) is None
        assert bundle_in(core, root) == [anchor_b]
        assert bundle_in(core, ns) == [anchor_b]
        await scene.until_proxies(
            "the new anchor alone and a leaf of its issuer",
            bundle=trustbundle.fingerprint([anchor_b]),
            issuer=trustbundle.certificate_fingerprint(issuer_n.certificate),
        )
        # Keys went to Secrets only: no control-plane log holds one, verbose as they are.
        pem_key = base64.b64encode(b"-----BEGIN PRIVATE KEY-----").decode()
        for log in (operator.log, identity.log, policy.log):
            text = log.read_text(errors="replace")
            assert "PRIVATE KEY" not in text and pem_key not in text, f"a key in {log}"
        output, _ = await asyncio.wait_for(rotate.communicate(), 30)
        shown = output.decode()
        assert rotate.returncode == 0, shown
        for line in ("AnchorAdded: waiting for", "IssuerSwitched: waiting for"):
            assert line in shown, shown
        assert f"anchor rotation complete: anchor {anchor_b.serial_number:x}" in shown

        # A leaf from the old anchor is refused now; a fresh one from the new issuer is not.
        trusts = old.pem + pki.to_pem(anchor_b)
        old_client = old.client(tmp_path / "old-client-after", "client", ns, trusts=trusts)
        new = CA(anchor_b, issuer_n)
        new_client = new.client(tmp_path / "new-client", "client", ns, trusts=trusts)
        web_proxy = scene.proxies["web"]
        refusals = _handshake_refusals(web_proxy)
        assert await present(web_proxy.inbound_port, old_client) == b""
        assert await present(web_proxy.inbound_port, new_client) == b"ping"
        (refusal,) = _handshake_refusals(web_proxy)[len(refusals) :]
        assert "certificate verify failed" in refusal, refusal

        await traffic.stop()
        assert traffic.failures == [], (
            f"{len(traffic.failures)} failures in {traffic.requests} requests and "
            f"{traffic.kept_alive} exchanges on the long-lived connection:\n"
            + "\n".join(traffic.failures)
        )
        assert traffic.requests > 300
        assert traffic.kept_alive > 300  # one connection, open from the first issuer to the last
    finally:
        if scene.traffic is not None:
            await scene.traffic.stop()
        if scene.kubelet is not None:
            kubelet.running = False
            await finish(scene.kubelet)
        if rotate is not None and rotate.returncode is None:
            rotate.kill()
            await rotate.wait()
        for proxy in scene.proxies.values():
            proxy.stop()
        if policy is not None:
            policy.stop()
        identity.stop()


async def finish(task: asyncio.Task[None], timeout: float = 15.0) -> None:
    """Wait for ``task``, told to stop, to end; cancel it if it has not within ``timeout``.
    Never hangs: a cancellation it swallows leaves it running, and the test goes on."""
    await asyncio.wait({task}, timeout=timeout)
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=timeout)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: the test reports failures its own way


def _replace(path: pathlib.Path, text: str) -> None:
    """Write ``path`` atomically, as a projected token is rotated."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


def _handshake_refusals(proxy: Proxy) -> list[str]:
    """The lines where ``proxy`` logged an inbound TLS handshake it refused."""
    return [
        line
        for line in proxy.log.read_text(errors="replace").splitlines()
        if "TLS handshake from" in line and "failed" in line
    ]
