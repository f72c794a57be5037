"""Transparent mode: the workloads as injected pods, each in a network namespace on a bridge.

The namespaces are annotated for injection, so the Pods the demo creates come back from the API
server with the operator's ``meshward-init`` and ``meshward-proxy`` containers. The demo then
does what a kubelet would with each stored Pod (:func:`start`): it gives the pod a network
namespace and an address, fills the volumes (a ServiceAccount token from TokenRequest for the
projected one, a directory for each emptyDir), resolves the containers' environment (values,
``fieldRef``, ``configMapKeyRef``, ``$(VAR)``), runs the init container's ``meshward
proxy-init`` in the namespace, then the proxy under the UID its securityContext names and the
application as root. Applications dial ordinary pod addresses on port 8080; the interception
rules send every connection through the proxies.

The operator is told to inject proxies that reach the identity service and the policy server
at the bridge's address (there is no cluster DNS here), with their default certificate name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import pathlib
import random
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any

from meshward import errors, inject
from meshward.demo import _iptables, _mesh, _processes, _workloads
from meshward.proxy import interception

SUBNETS = ipaddress.IPv4Network("10.78.0.0/16")
"""Pods get a free /24 of it: inside the private ranges proxies treat as the mesh."""
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_HOSTS = {name: 2 + i for i, name in enumerate(_workloads.SPECS)}


def problem() -> str | None:
    """Why transparent mode can not run here, or None when it can."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces, iptables); run as root to see it"
    for tool in ("ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"it needs {tool} (iproute2, util-linux) on PATH"
    name = f"mwdemo-probe-{uuid.uuid4().hex[:6]}"
    try:
        _iptables.run(["ip", "netns", "add", name])
    except errors.InterceptionError as exc:
        return f"`ip netns add` does not work here ({exc})"
    with contextlib.suppress(errors.InterceptionError):
        _iptables.run(["ip", "netns", "del", name])
    try:
        _iptables.run(
            [
                *("setpriv", f"--reuid={interception.PROXY_UID}"),
                *(f"--regid={interception.PROXY_UID}", "--clear-groups"),
                *(sys.executable, "-c", "import meshward.proxy.run"),
            ]
        )
    except errors.InterceptionError:
        return (
            f"the proxy's UID {interception.PROXY_UID} can not import meshward from "
            f"{sys.prefix}: make the checkout and its parents traversable (chmod o+rx)"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Pod:
    netns: str
    ip: str

    def prefix(self, uid: int | None = None) -> tuple[str, ...]:
        """The argv prefix that runs a command in the pod (as ``uid``, no capabilities)."""
        argv: tuple[str, ...] = ("ip", "netns", "exec", self.netns)
        if uid is not None:
            argv += ("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups")
        return argv


class Network:
    """A bridge with the host's address on it, and one network namespace per pod."""

    def __init__(self, processes: _processes.Processes, subnet: ipaddress.IPv4Network) -> None:
        self.processes = processes
        self.id = uuid.uuid4().hex[:6]
        self.bridge = f"mwd{self.id}"
        self.subnet = subnet
        self.gateway = str(subnet.network_address + 1)
        self.pods: dict[str, Pod] = {}
        self.links: list[str] = []
        self.iptables: _iptables.Iptables | None = None

    @classmethod
    async def create(cls, processes: _processes.Processes) -> Network:
        """The bridge and a namespace for every workload (removed again if a step fails)."""
        network = cls(processes, await _free_subnet(processes))
        try:
            await network._ip("link", "add", network.bridge, "type", "bridge")
            await network._ip(
                "addr",
                "add",
                f"{network.gateway}/{network.subnet.prefixlen}",
                "dev",
                network.bridge,
            )
            await network._ip("link", "set", network.bridge, "up")
            for name in _workloads.SPECS:
                await network._add(name, _HOSTS[name])
            # Fetched from Debian the first time (cached per user): a one-time, blocking set-up.
            network.iptables = _iptables.iptables()
        except BaseException:
            await network.close()
            raise
        return network

    async def _ip(self, *args: str, netns: str | None = None) -> None:
        argv = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
        done = await self.processes.run(argv, dict(os.environ))
        if done.returncode != 0:
            raise errors.InterceptionError(f"`{' '.join(argv)}` failed: {done.stderr.strip()}")

    async def _add(self, name: str, host: int) -> None:
        pod = Pod(f"mwdemo-{self.id}-{name}", str(self.subnet.network_address + host))
        veth = f"mwdv{self.id}{len(self.pods)}"
        await self._ip("netns", "add", pod.netns)
        self.pods[name] = pod
        await self._ip(
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns
        )
        self.links.append(veth)
        await self._ip("link", "set", veth, "master", self.bridge, "up")
        await self._ip(
            "addr", "add", f"{pod.ip}/{self.subnet.prefixlen}", "dev", "eth0", netns=pod.netns
        )
        await self._ip("link", "set", "eth0", "up", netns=pod.netns)
        await self._ip("link", "set", "lo", "up", netns=pod.netns)
        await self._ip("route", "add", "default", "via", self.gateway, netns=pod.netns)

    async def close(self) -> None:
        """Remove the namespaces, links and bridge (what is already gone is skipped)."""
        for pod in self.pods.values():
            await self.processes.run(["ip", "netns", "del", pod.netns], dict(os.environ))
        self.pods.clear()
        for link in [*self.links, self.bridge]:  # a veth goes with its namespace, as a rule
            shown = await self.processes.run(["ip", "link", "show", link], dict(os.environ))
            if shown.returncode == 0:
                await self.processes.run(["ip", "link", "del", link], dict(os.environ))
        self.links.clear()


async def _free_subnet(processes: _processes.Processes) -> ipaddress.IPv4Network:
    used = await processes.run(["ip", "-4", "-o", "addr", "show"], dict(os.environ))
    routes = await processes.run(["ip", "-4", "route", "show"], dict(os.environ))
    subnets = list(SUBNETS.subnets(new_prefix=24))
    random.shuffle(subnets)
    for subnet in subnets:
        prefix = str(subnet.network_address).rsplit(".", 1)[0] + "."
        if prefix not in used.stdout and prefix not in routes.stdout:
            return subnet
    raise errors.InterceptionError(f"every /24 of {SUBNETS} is in use on this host")


def operator_env(identity_addr: str, policy_addr: str) -> dict[str, str]:
    """The injector's settings: proxies reach both services at the bridge's address."""
    return {
        "MESHWARD_INJECT_IDENTITY_SVC_ADDR": identity_addr,
        "MESHWARD_INJECT_IDENTITY_SVC_NAME": _mesh.SERVICE_NAME,
        "MESHWARD_INJECT_POLICY_SVC_ADDR": policy_addr,
        "MESHWARD_INJECT_POLICY_SVC_NAME": _mesh.SERVICE_NAME,
    }


def pods(network: Network) -> list[dict[str, Any]]:
    """The workloads' Pods, applications dialing their peers' pod addresses on port 8080."""
    manifests = []
    for spec in _workloads.SPECS.values():
        routes = {t: f"{network.pods[t].ip}:{_workloads.APP_PORT}" for t in spec.calls}
        command = _workloads.app_command(spec, "0.0.0.0", _workloads.APP_PORT, routes)
        manifests.append(_workloads.pod_manifest(spec, command))
    return manifests


async def until_injecting(mesh: _mesh.Mesh, ns: str) -> None:
    """Until the API server calls the operator's injector for pods of ``ns`` (it learns of a
    new webhook configuration a moment after it changes): a dry-run create stores nothing."""
    probe: Any = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"probe-{uuid.uuid4().hex[:6]}"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/probe:1"}]},
    }

    async def injected() -> bool:
        pod = await mesh.core.create_namespaced_pod(ns, probe, dry_run="All")
        return bool(pod.spec.containers[0].name == inject.PROXY_CONTAINER)

    await _mesh.wait_for("the injector", injected, 30, mesh.logs / "operator.log")


async def start(
    mesh: _mesh.Mesh, processes: _processes.Processes, network: Network
) -> tuple[dict[str, _workloads.Workload], str]:
    """Run every stored (injected) Pod as a kubelet would; the workloads, and where a
    plaintext caller on the host reaches web."""
    iptables = network.iptables
    assert iptables is not None

    async def run_pod(spec: _workloads.Spec) -> _workloads.Workload:
        stored = await mesh.pod(spec.namespace, spec.pod)
        containers = {c["name"]: c for c in stored["spec"]["containers"]}
        inits = {c["name"]: c for c in stored["spec"].get("initContainers") or []}
        if inject.PROXY_CONTAINER not in containers or inject.INIT_CONTAINER not in inits:
            raise errors.InjectionError(
                f"pod {spec.namespace}/{spec.pod} came back without the meshward containers: "
                f"is the operator's injector answering? (see {mesh.logs / 'operator.log'})"
            )
        pod = network.pods[spec.name]
        proxy = containers[inject.PROXY_CONTAINER]
        proxy_uid = int(proxy["securityContext"]["runAsUser"])
        volumes = await _volumes(mesh, stored, proxy, proxy_uid)
        init = inits[inject.INIT_CONTAINER]
        done = await processes.run(
            [
                *pod.prefix(),
                *_meshward(init["command"]),
                *("--iptables", str(iptables.path)),
            ],
            iptables.env,
        )
        if done.returncode != 0:
            raise errors.InterceptionError(
                f"meshward-init of pod {spec.pod} failed: {done.stderr.strip()}"
            )
        env = await _environment(mesh, stored, proxy, volumes)
        log = mesh.logs / f"{spec.name}-proxy.log"
        await processes.start(
            f"{spec.name}-proxy",
            [*pod.prefix(proxy_uid), *_meshward(proxy["command"])],
            log,
            {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", **env},
        )
        if spec.serves:
            app = containers["app"]
            await processes.start(
                f"{spec.name}-app",
                [*pod.prefix(), *_workloads.resolve_python(list(app["command"]))],
                mesh.logs / f"{spec.name}-app.log",
                dict(os.environ),
            )
        routes = {t: f"{network.pods[t].ip}:{_workloads.APP_PORT}" for t in spec.calls}
        admin = f"{pod.ip}:{interception.ADMIN_PORT}"
        return _workloads.Workload(spec, log, admin, pod.prefix(), routes)

    # What a kubelet reports of a running pod, for every pod before any container starts: no
    # proxy's destination lookup then finds a peer's address unmeshed while it is starting.
    for spec in _workloads.SPECS.values():
        ip = network.pods[spec.name].ip
        await mesh.core.patch_namespaced_pod_status(
            spec.pod,
            spec.namespace,
            {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
        )
    # Pods start side by side, as a kubelet starts them.
    started = await asyncio.gather(*(run_pod(spec) for spec in _workloads.SPECS.values()))
    running = {workload.spec.name: workload for workload in started}
    return running, f"{network.pods['web'].ip}:{_workloads.APP_PORT}"


def _meshward(command: list[str]) -> list[str]:
    """A container's ``meshward ...`` command, run by this interpreter."""
    if not command or command[0] != "meshward":
        raise errors.InjectionError(f"unexpected meshward container command {command!r}")
    return [sys.executable, "-u", "-m", "meshward", *command[1:]]


async def _volumes(
    mesh: _mesh.Mesh, pod: Mapping[str, Any], container: Mapping[str, Any], uid: int
) -> dict[str, pathlib.Path]:
    """A directory per volume ``container`` mounts, readable by the proxy's UID: an emptyDir
    empty (and the UID's), a configMap's keys as files, a projected volume's ServiceAccount
    tokens (mode 0600; no audience means the API server's) and ConfigMap keys. Downward API
    sources are left out: the proxy reads none."""
    home = mesh.state / "pods" / pod["metadata"]["name"]
    found = {}
    ns, sa = pod["metadata"]["namespace"], pod["spec"]["serviceAccountName"]
    mounted = {m["name"] for m in container.get("volumeMounts") or []}
    for volume in pod["spec"].get("volumes") or []:
        if volume["name"] not in mounted:
            continue
        directory = home / volume["name"]
        directory.mkdir(parents=True)
        files: dict[str, str] = {}
        if "configMap" in volume:
            files |= await _config_map_files(mesh, ns, volume["configMap"])
        for source in (volume.get("projected") or {}).get("sources") or []:
            if "configMap" in source:
                files |= await _config_map_files(mesh, ns, source["configMap"])
            if token := source.get("serviceAccountToken"):
                path = directory / token["path"]
                path.write_text(await mesh.token(ns, sa, token.get("audience")))
                path.chmod(0o600)
                os.chown(path, uid, uid)
        for name, text in files.items():
            (directory / name).write_text(text)
            (directory / name).chmod(0o644)
        os.chown(directory, uid, uid)
        found[volume["name"]] = directory
    home.chmod(0o755)
    return found


async def _config_map_files(mesh: _mesh.Mesh, ns: str, ref: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap volume source's files: its ``items``, else every key."""
    cm = await mesh.core.read_namespaced_config_map(ref["name"], ns)
    data: dict[str, str] = cm.data or {}
    items = ref.get("items") or [{"key": key, "path": key} for key in data]
    return {item["path"]: data[item["key"]] for item in items}


async def _environment(
    mesh: _mesh.Mesh,
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    volumes: Mapping[str, pathlib.Path],
) -> dict[str, str]:
    """The container's environment as the kubelet resolves it, with mount paths rewritten to
    the directories that stand in for the volumes."""
    fields = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "spec.serviceAccountName": pod["spec"]["serviceAccountName"],
    }
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts") or []}
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        source = entry.get("valueFrom") or {}
        if "value" in entry:
            value = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(entry["value"]))
        elif "fieldRef" in source:
            value = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            cm = await mesh.core.read_namespaced_config_map(
                ref["name"], fields["metadata.namespace"]
            )
            value = (cm.data or {})[ref["key"]]
        else:
            raise errors.InjectionError(f"can not resolve environment variable {entry['name']}")
        for mount, directory in mounts.items():
            if value == mount or value.startswith(f"{mount}/"):
                value = str(directory) + value[len(mount) :]
        env[entry["name"]] = value
    return env
