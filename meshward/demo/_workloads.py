"""The demo's workloads (emojivoto's web, emoji, voting and vote bot, and an outsider in another
namespace), their Pods, and how a running one is reached, whichever mode runs it.

A meshed workload is an application process plus a proxy process, with a Pod object in the
cluster that names it (the proxy's policy lists pods by name, with the labels the sample's
Servers select). In local mode the demo runs both processes on loopback; in transparent mode in
a network namespace, as the injected Pod's containers (see ``_local`` and ``_transparent``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

from meshward.identity import pki

APP_PORT = 8080
"""Every application's port in its pod, as the sample's Servers say."""
EMOJIVOTO = "emojivoto"
OUTSIDER = "outsider"
TRUST_DOMAIN = "cluster.local"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One workload: ServiceAccount ``name`` in ``namespace``, Pod ``<name>-0`` labelled
    ``app=<app_label>``; ``serves`` whether its application listens on :data:`APP_PORT`;
    ``calls`` the workloads its application dials."""

    name: str
    namespace: str
    app_label: str
    serves: bool
    calls: tuple[str, ...] = ()

    @property
    def pod(self) -> str:
        return f"{self.name}-0"

    @property
    def identity(self) -> str:
        """Its mesh identity, DNS form (what a peer's proxy is told to expect)."""
        return pki.Identity(self.namespace, self.name, TRUST_DOMAIN).dns_name


SPECS = {
    spec.name: spec
    for spec in (
        Spec("web", EMOJIVOTO, "web-svc", serves=True, calls=("emoji", "voting")),
        Spec("emoji", EMOJIVOTO, "emoji-svc", serves=True),
        Spec("voting", EMOJIVOTO, "voting-svc", serves=True),
        Spec("vote-bot", EMOJIVOTO, "vote-bot", serves=False, calls=("web",)),
        Spec(OUTSIDER, OUTSIDER, OUTSIDER, serves=False, calls=("web", "emoji")),
    )
}
SERVING = tuple(name for name, spec in SPECS.items() if spec.serves)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A running workload: where its proxy logs and answers admin requests, how to run a
    process as part of it (``prefix`` before the argv), and the ``host:port`` its application
    dials to reach each workload it calls."""

    spec: Spec
    proxy_log: pathlib.Path
    admin: str
    """``host:port`` of the proxy's admin server."""
    prefix: tuple[str, ...]
    routes: Mapping[str, str]


def app_command(spec: Spec, host: str, port: int, routes: Mapping[str, str]) -> list[str]:
    """The application's command line (``python`` resolved by whoever runs it)."""
    module = ["python", "-u", "-m", "meshward.demo._apps"]
    if spec.name == "web":
        return [
            *(*module, "web", "--host", host, "--port", str(port)),
            *("--emoji", routes["emoji"], "--voting", routes["voting"]),
        ]
    return [*module, spec.name, "--listen", f"{host}:{port}"]


def resolve_python(argv: list[str]) -> list[str]:
    return [sys.executable if arg == "python" and i == 0 else arg for i, arg in enumerate(argv)]


def pod_manifest(
    spec: Spec, command: list[str] | None, annotations: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The workload's Pod: what the operator compiles into the policy document (its name and
    labels), and in transparent mode what the injector turns into the pod that runs."""
    container: dict[str, Any] = {
        "name": "app",
        "image": "registry.invalid/meshward-demo:1",
        "command": command or ["python", "-m", "meshward.demo._apps", spec.name],
    }
    if spec.serves:
        container["ports"] = [{"name": "http", "containerPort": APP_PORT}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": spec.pod,
            "namespace": spec.namespace,
            "labels": {"app": spec.app_label, "app.kubernetes.io/part-of": "meshward-demo"},
            "annotations": dict(annotations or {}),
        },
        "spec": {"serviceAccountName": spec.name, "containers": [container]},
    }
