"""Helpers for tests that run against a real API server: kubectl, waiting, the operator process."""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client import exceptions

from meshward import errors
from meshward.policy import compiled

T = TypeVar("T")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, fn: Callable[[], T | None], timeout: float = 20.0) -> T:
    """Poll ``fn`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except (exceptions.ApiException, AssertionError, KeyError, errors.PolicyError) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


class Kubectl:
    def __init__(self, kubeconfig: pathlib.Path) -> None:
        self.kubeconfig = kubeconfig

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def apply(self, manifest: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", input=manifest, check=check)


def read_document(core: client.CoreV1Api, namespace: str) -> compiled.PolicyDocument | None:
    try:
        cm = core.read_namespaced_config_map(compiled.CONFIGMAP_NAME, namespace)
    except exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return compiled.PolicyDocument.from_json((cm.data or {})[compiled.CONFIGMAP_KEY])


def wait_document(
    core: client.CoreV1Api,
    namespace: str,
    check: Callable[[compiled.PolicyDocument], bool] = lambda d: True,
    what: str = "the compiled policy",
    timeout: float = 20.0,
) -> compiled.PolicyDocument:
    def probe() -> compiled.PolicyDocument | None:
        doc = read_document(core, namespace)
        return doc if doc is not None and check(doc) else None

    return wait_for(f"{what} in namespace {namespace}", probe, timeout)


def read_kubeconfig(path: pathlib.Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def write_kubeconfig(path: pathlib.Path, config: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def powerless_kubeconfig(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, path: pathlib.Path
) -> pathlib.Path:
    """A kubeconfig at ``path`` for the same cluster, authenticated as ServiceAccount
    ``powerless`` of ``namespace``, which no RBAC rule grants anything."""
    try:
        core.create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="powerless"))
        )
    except exceptions.ApiException as exc:
        if exc.status != 409:
            raise
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=600
        )
    )
    token = core.create_namespaced_service_account_token("powerless", namespace, request)
    config = read_kubeconfig(kubeconfig)
    config["users"] = [{"name": "admin", "user": {"token": token.status.token}}]
    write_kubeconfig(path, config)
    return path


def pod_manifest(
    namespace: str,
    name: str,
    app: str,
    *,
    annotations: dict[str, str] | None = None,
    probes: dict[str, tuple[str, int | str]] | None = None,
) -> str:
    """A Pod with container ports http (8080) and admin (9990) and the given HTTP probes
    (``{"readinessProbe": ("/ready", "admin")}``), as YAML. The API server only stores it."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": app},
            "annotations": annotations or {},
        },
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "registry.invalid/app:1",
                    "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"name": "admin", "containerPort": 9990},
                    ],
                    **{
                        kind: {"httpGet": {"path": path, "port": port}}
                        for kind, (path, port) in (probes or {}).items()
                    },
                }
            ]
        },
    }
    return yaml.safe_dump(pod, sort_keys=False)


def wait_service_account(core: client.CoreV1Api, namespace: str) -> None:
    """Pods need the namespace's default ServiceAccount, which the controller-manager adds."""
    wait_for(
        f"the default ServiceAccount in {namespace}",
        lambda: core.read_namespaced_service_account("default", namespace),
    )


UNMANAGED = "t-unmanaged-"
"""Namespaces named with this prefix are left alone by the test operator: tests that write a
policy document by hand use them (the operator would restore its own document)."""


class Operator:
    """The operator as a user runs it, in its own process.

    Each instance has its own root namespace and webhook configuration name, so a test run on a
    shared cluster (``MESHWARD_TEST_KUBECONFIG``) changes nothing mesh-wide outside itself.
    ``MESHWARD_WEBHOOK_HOST`` from the environment is passed on: against a remote cluster, set it
    to an address of this machine that the API server can reach.
    """

    def __init__(
        self, kubeconfig: pathlib.Path, log: pathlib.Path, env: dict[str, str] | None = None
    ) -> None:
        run = uuid.uuid4().hex[:6]
        self.kubeconfig = kubeconfig
        self.log = log
        self.webhook_port = free_port()
        self.root_namespace = f"t-root-{run}"
        self.webhook_name = f"validate-{run}.policy.meshward.io"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "MESHWARD_WEBHOOK_PORT": str(self.webhook_port),
            "MESHWARD_WEBHOOK_NAME": self.webhook_name,
            "MESHWARD_ROOT_NAMESPACE": self.root_namespace,
            "MESHWARD_EXCLUDED_NAMESPACES": f"kube-system,kube-public,kube-node-lease,{UNMANAGED}*",
            **self.extra_env,
        }

    def start(self, argv: tuple[str, ...] = ("-m", "meshward", "operator", "--verbose")) -> None:
        """Start ``python <argv>``: by default ``meshward operator``."""
        env = self.env()
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
        out.close()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def wait_injecting(
    core: client.CoreV1Api, namespace: str, what: str = "the injector", timeout: float = 30.0
) -> None:
    """Until the API server calls an injector that injects pods of ``namespace`` (it learns of
    webhook configurations a moment after they change). Dry-run creates go through admission
    and store nothing."""
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"probe-{uuid.uuid4().hex[:6]}",
            "annotations": {"meshward.io/inject": "enabled"},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
    }

    def injected() -> bool:
        pod = core.create_namespaced_pod(namespace, probe, dry_run="All")
        return bool(pod.spec.containers[0].name == "meshward-proxy")

    wait_for(f"{what} to inject pods in {namespace}", injected, timeout)
