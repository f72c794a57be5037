"""The demo's control plane: the embedded Kubernetes control plane, the CRDs, the operator, the
identity service and the policy server, each as a user runs it, and the cluster objects the
workloads need (namespaces, ServiceAccounts, Pods, tokens, the compiled policy documents).

Everything runs from ``state`` (the demo's temporary directory) and is stopped by
:meth:`Mesh.close`: the services by :class:`~meshward.demo._processes.Processes`, the control
plane by :func:`meshward.devcluster.down`.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import pathlib
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import yaml
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import exceptions

from meshward import devcluster, errors
from meshward.demo import _processes
from meshward.identity import authority, commands, tokens
from meshward.policy import compiled

T = TypeVar("T")

ROOT_NAMESPACE = "meshward"
SERVICE_NAME = "localhost"
"""The name the identity service's and the policy server's certificates carry by default, and
the one proxies are told to expect (they reach both by address, not by a Service name)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def python() -> list[str]:
    """How to run meshward's modules: this interpreter, unbuffered."""
    return [sys.executable, "-u"]


async def wait_for(
    what: str, probe: Callable[[], Awaitable[T | None]], timeout: float, log: pathlib.Path | None
) -> T:
    """Poll ``probe`` until it returns something truthy; ControlPlaneError naming ``what`` (and
    the last lines of ``log``) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise errors.ControlPlaneError(what, f"not done after {timeout:.0f} s{tail(log)}")
        await asyncio.sleep(0.1)


def tail(log: pathlib.Path | None, lines: int = 8) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return f"; last lines of {log}:\n    " + "\n    ".join(text)


async def http_status(url: str) -> int | None:
    """GET ``url`` (plain HTTP, loopback or the bridge); its status, None when unreachable."""
    from meshward.demo import _apps

    answer = await _apps.http_get(url)
    status = answer.get("status")
    return status if isinstance(status, int) else None


class Mesh:
    """The control plane side of the demo; see the module docstring."""

    def __init__(self, state: pathlib.Path, processes: _processes.Processes) -> None:
        self.state = state
        self.processes = processes
        self.cluster_dir = state / "control-plane"
        self.logs = state / "logs"
        self.logs.mkdir(exist_ok=True)
        self.trust = state / "trust"
        self.kubeconfig = self.cluster_dir / "kubeconfig"
        self.identity_addr = ""
        self.policy_addr = ""
        self.api: client.ApiClient | None = None
        self.run_id = uuid.uuid4().hex[:6]

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), **extra}

    # -- the control plane -------------------------------------------------------------------

    async def control_plane(self) -> None:
        """etcd, kube-apiserver and kube-controller-manager on loopback (binaries cached)."""
        # devcluster.up polls with blocking sleeps; nothing else runs yet, so it may block.
        devcluster.up(self.cluster_dir)
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(self.kubeconfig), client_configuration=configuration
        )
        self.api = client.ApiClient(configuration)

    @property
    def core(self) -> client.CoreV1Api:
        assert self.api is not None, "the control plane is not up"
        return client.CoreV1Api(self.api)

    async def kubectl(self, *args: str, stdin: str | None = None) -> str:
        """``kubectl`` against the demo's control plane; ControlPlaneError on failure."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise errors.ControlPlaneError(
                "kubectl", "kubectl is not on PATH: install it (any version from 1.20 on)"
            )
        argv = [kubectl, f"--kubeconfig={self.kubeconfig}", *args]
        if stdin is not None:
            staged = self.state / f"manifest-{uuid.uuid4().hex[:8]}.yaml"
            staged.write_text(stdin)
            argv = [*argv, "-f", str(staged)]
        done = await self.processes.run(argv, self.env())
        if done.returncode != 0:
            raise errors.ControlPlaneError(
                f"kubectl {' '.join(args)}", (done.stderr or done.stdout).strip()
            )
        return done.stdout

    async def crds(self) -> None:
        crds = importlib.resources.files("meshward") / "crds"
        with importlib.resources.as_file(crds) as found:
            directory = str(found.resolve())  # kubectl reads a link to a directory as a file
            await self.kubectl("apply", "-f", directory)
            await self.kubectl(
                "wait", "--for=condition=established", "--timeout=30s", "-f", directory
            )

    async def operator(self, extra_env: Mapping[str, str]) -> None:
        """``meshward operator``, its webhooks on a free loopback port; returns once it has
        compiled its first document and registered its validating webhook."""
        await self.apply([namespace(ROOT_NAMESPACE)])
        webhook_name = f"validate-demo-{self.run_id}.policy.meshward.io"
        cert_dir = self.state / "webhook"
        cert_dir.mkdir()
        log = self.logs / "operator.log"
        env = self.env(
            MESHWARD_ROOT_NAMESPACE=ROOT_NAMESPACE,
            MESHWARD_WEBHOOK_PORT=str(free_port()),
            MESHWARD_WEBHOOK_NAME=webhook_name,
            MESHWARD_WEBHOOK_CERT_DIR=str(cert_dir),
            **extra_env,
        )
        await self.processes.start("operator", [*python(), "-m", "meshward", "operator"], log, env)
        await wait_for(
            "the operator's first policy document",
            lambda: self.document(ROOT_NAMESPACE),
            60,
            log,
        )
        admission = client.AdmissionregistrationV1Api(self.api)

        async def webhook() -> bool:
            try:
                await admission.read_validating_webhook_configuration(webhook_name)
            except exceptions.ApiException:
                return False
            return True

        await wait_for("the operator's validating webhook", webhook, 30, log)

    async def identity(self, host: str) -> None:
        """``meshward identity init`` into files, then ``meshward identity serve`` on ``host``."""
        done = await self.processes.run(
            [*python(), "-m", "meshward", "identity", "init", "--out", str(self.trust)],
            self.env(),
        )
        if done.returncode != 0:
            raise errors.ControlPlaneError("meshward identity init", done.stderr.strip())
        self.trust.chmod(0o755)
        port, admin = free_port(host), free_port()
        self.identity_addr = f"{host}:{port}"
        log = self.logs / "identity.log"
        await self.processes.start(
            "identity",
            [
                *(*python(), "-m", "meshward", "identity", "serve"),
                *("--issuer-dir", str(self.trust)),
                *("--trust-anchors", str(self.trust / authority.ANCHORS)),
                *("--addr", self.identity_addr, "--admin-addr", f"127.0.0.1:{admin}"),
            ],
            log,
            self.env(),
        )
        await wait_for(
            "the identity service",
            lambda: self._ready(f"http://127.0.0.1:{admin}/ready"),
            30,
            log,
        )

    async def policy_server(self, host: str) -> None:
        """``meshward policy serve`` on ``host``: proxies follow their namespace's policy."""
        port, admin = free_port(host), free_port()
        self.policy_addr = f"{host}:{port}"
        log = self.logs / "policy.log"
        await self.processes.start(
            "policy",
            [
                *(*python(), "-m", "meshward", "policy", "serve"),
                *("--issuer-dir", str(self.trust)),
                *("--trust-anchors", str(self.trust / authority.ANCHORS)),
                *("--addr", self.policy_addr, "--admin-addr", f"127.0.0.1:{admin}"),
            ],
            log,
            self.env(),
        )
        await wait_for(
            "the policy server", lambda: self._ready(f"http://127.0.0.1:{admin}/ready"), 30, log
        )

    @staticmethod
    async def _ready(url: str) -> bool:
        return await http_status(url) == 200

    @property
    def anchors(self) -> str:
        return (self.trust / authority.ANCHORS).read_text()

    # -- cluster objects ---------------------------------------------------------------------

    async def apply(self, objects: Sequence[Mapping[str, Any]]) -> None:
        await self.kubectl("apply", stdin=yaml.safe_dump_all(list(objects), sort_keys=False))

    async def token(self, ns: str, sa: str, audience: str | None = tokens.AUDIENCE) -> str:
        """A projected-style ServiceAccount token, as the kubelet would mount it (for the API
        server's own audiences when ``audience`` is None)."""
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[audience] if audience else [], expiration_seconds=3600
            )
        )
        answer = await self.core.create_namespaced_service_account_token(sa, ns, request)
        return str(answer.status.token)

    async def pod(self, ns: str, name: str) -> dict[str, Any]:
        assert self.api is not None
        found = await self.core.read_namespaced_pod(name, ns)
        body: dict[str, Any] = self.api.sanitize_for_serialization(found)
        return body

    async def document(self, ns: str) -> compiled.PolicyDocument | None:
        """The namespace's compiled policy document, None until the operator wrote one."""
        try:
            cm = await self.core.read_namespaced_config_map(compiled.CONFIGMAP_NAME, ns)
        except exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        text = (cm.data or {}).get(compiled.CONFIGMAP_KEY)
        return compiled.PolicyDocument.from_json(text) if text else None

    async def wait_document(
        self, ns: str, check: Callable[[compiled.PolicyDocument], bool], what: str
    ) -> compiled.PolicyDocument:
        async def probe() -> compiled.PolicyDocument | None:
            doc = await self.document(ns)
            return doc if doc is not None and check(doc) else None

        return await wait_for(what, probe, 30, self.logs / "operator.log")

    async def close(self) -> None:
        if self.api is not None:
            await self.api.close()
            self.api = None


# -- manifests ---------------------------------------------------------------------------------


def namespace(name: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "annotations": dict(annotations or {})},
    }


def service_account(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns},
    }


def trust_roots(ns: str, bundle: str) -> dict[str, Any]:
    """The trust bundle ConfigMap injected proxies read their anchors from."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": commands.TRUST_ROOTS, "namespace": ns},
        "data": {authority.ANCHORS: bundle},
    }
