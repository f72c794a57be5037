"""Local mode: every workload's application and proxy on loopback, ports mapped explicitly.

Each serving application listens on a free loopback port; its proxy's inbound port is where
peers reach it, decided as :data:`~meshward.demo._workloads.APP_PORT`, the port the application
has in its pod (``MESHWARD_PROXY_LOCAL_INBOUND``'s ``LISTEN=APP@POD_PORT`` form, since web, emoji
and voting can not all bind 8080 on one host). Each caller's proxy has one outbound port per
workload it calls,
which carries the connection over mTLS to that workload's inbound port and checks that the peer
proves the expected identity. Clients come from 127.0.0.1, so the operator is told that loopback
is a cluster network (a ServerAuthorization without ``networks`` means the cluster networks).
"""

from __future__ import annotations

import os

from meshward.demo import _mesh, _processes, _workloads
from meshward.policy import compile as policy_compile
from meshward.proxy import settings

CLUSTER_NETWORKS = ",".join(("127.0.0.0/8", *policy_compile.Settings().cluster_networks))
HOST = "127.0.0.1"


def operator_env() -> dict[str, str]:
    return {"MESHWARD_CLUSTER_NETWORKS": CLUSTER_NETWORKS}


def pods() -> list[dict[str, object]]:
    """The Pods as records only: in local mode nothing in the cluster runs them."""
    return [_workloads.pod_manifest(spec, None) for spec in _workloads.SPECS.values()]


async def start(
    mesh: _mesh.Mesh, processes: _processes.Processes
) -> tuple[dict[str, _workloads.Workload], str]:
    """Start every application and proxy; the workloads, and where a plaintext caller (no
    proxy, no TLS) reaches web."""
    inbound = {name: _mesh.free_port() for name in _workloads.SERVING}
    app_ports = {name: _mesh.free_port() for name in _workloads.SERVING}
    running: dict[str, _workloads.Workload] = {}
    for spec in _workloads.SPECS.values():
        home = mesh.state / "workloads" / spec.name
        (home / "identity").mkdir(parents=True)
        token = home / "token"
        token.write_text(await mesh.token(spec.namespace, spec.name))
        token.chmod(0o600)
        outbound = {target: _mesh.free_port() for target in spec.calls}
        admin = _mesh.free_port()
        env = {
            settings.IDENTITY_DIR: str(home / "identity"),
            settings.TRUST_ANCHORS: mesh.anchors,
            settings.TOKEN_FILE: str(token),
            settings.LOCAL_NAME: spec.identity,
            settings.IDENTITY_SVC_ADDR: mesh.identity_addr,
            settings.IDENTITY_SVC_NAME: _mesh.SERVICE_NAME,
            settings.POLICY_SVC_ADDR: mesh.policy_addr,
            settings.POLICY_SVC_NAME: _mesh.SERVICE_NAME,
            settings.POD_NAME: spec.pod,
            settings.INBOUND_LISTEN_ADDR: f"{HOST}:{_mesh.free_port()}",
            settings.OUTBOUND_LISTEN_ADDR: f"{HOST}:{_mesh.free_port()}",
            settings.ADMIN_LISTEN_ADDR: f"{HOST}:{admin}",
        }
        if spec.serves:
            env[settings.LOCAL_INBOUND] = (
                f"{inbound[spec.name]}={app_ports[spec.name]}@{_workloads.APP_PORT}"
            )
        if outbound:
            env[settings.LOCAL_OUTBOUND] = ",".join(
                f"{port}={_workloads.SPECS[target].identity}@{HOST}:{inbound[target]}"
                for target, port in outbound.items()
            )
        routes = {target: f"{HOST}:{port}" for target, port in outbound.items()}
        log = mesh.logs / f"{spec.name}-proxy.log"
        await processes.start(
            f"{spec.name}-proxy",
            [*_mesh.python(), "-m", "meshward.proxy"],
            log,
            {**os.environ, **env},
        )
        if spec.serves:
            argv = _workloads.app_command(spec, HOST, app_ports[spec.name], routes)
            await processes.start(
                f"{spec.name}-app",
                _workloads.resolve_python(argv),
                mesh.logs / f"{spec.name}-app.log",
                dict(os.environ),
            )
        running[spec.name] = _workloads.Workload(spec, log, f"{HOST}:{admin}", (), routes)
    return running, f"{HOST}:{inbound['web']}"
