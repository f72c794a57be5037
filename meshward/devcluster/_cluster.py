"""Start, inspect and stop etcd + kube-apiserver (+ kube-controller-manager) on loopback.

Each control plane lives in its own state directory (ports, pids, logs, data, kubeconfig), so
several run side by side. Processes run in their own sessions and outlive the command that
started them; ``down`` stops them by the pids recorded in ``state.json``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from meshward import errors
from meshward.devcluster import _build, _pki

READY_TIMEOUT = 60.0
MARKER = ".meshward-dev"
"""Written first into every state directory: only a directory carrying it is ever deleted."""
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A running local control plane, as recorded in its state directory."""

    directory: pathlib.Path
    server: str
    etcd_port: int
    apiserver_port: int
    pids: dict[str, int]

    @property
    def kubeconfig(self) -> pathlib.Path:
        return self.directory / "kubeconfig"

    @property
    def token(self) -> str:
        return (self.directory / "tokens.csv").read_text().split(",", 1)[0]

    def alive(self) -> dict[str, bool]:
        return {name: _alive(pid) and _ours(name, pid) for name, pid in self.pids.items()}

    def ready(self, timeout: float = 2.0) -> bool:
        try:
            return _get(self, "/readyz", timeout) == 200
        except OSError:
            return False


def default_directory(name: str = "default") -> pathlib.Path:
    base = os.environ.get("XDG_STATE_HOME") or str(pathlib.Path.home() / ".local" / "state")
    return pathlib.Path(base) / "meshward" / "dev" / name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _get(cluster: Cluster, path: str, timeout: float) -> int:
    ctx = ssl.create_default_context(cafile=str(cluster.directory / "ca.crt"))
    req = urllib.request.Request(
        cluster.server + path, headers={"Authorization": f"Bearer {cluster.token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _spawn(argv: list[str], log: pathlib.Path) -> int:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return proc.pid


def _log_tail(log: pathlib.Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if any(w in line.lower() for w in ("error", "fatal", "address already in use", "failed")):
            return line.strip()[:300]
    return lines[-1].strip()[:300] if lines else "(no output)"


def _wait(
    step: str, check: Callable[[], bool], pid: int, log: pathlib.Path, deadline: float
) -> None:
    """Poll ``check`` until true; fail naming ``step`` if the process dies or time runs out."""
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise errors.ControlPlaneError(step, f"exited early: {_log_tail(log)} (log: {log})")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.1)
    raise errors.ControlPlaneError(step, f"not ready after {READY_TIMEOUT:.0f} s (log: {log})")


def _write_kubeconfig(cluster: Cluster) -> None:
    ca = base64.b64encode((cluster.directory / "ca.crt").read_bytes()).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "meshward-dev",
                "cluster": {"server": cluster.server, "certificate-authority-data": ca},
            }
        ],
        "users": [{"name": "admin", "user": {"token": cluster.token}}],
        "contexts": [
            {"name": "meshward-dev", "context": {"cluster": "meshward-dev", "user": "admin"}}
        ],
        "current-context": "meshward-dev",
    }
    path = cluster.kubeconfig
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


def load(directory: pathlib.Path) -> Cluster | None:
    """The control plane recorded in ``directory``, or None if there is none."""
    try:
        raw = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return Cluster(
        directory=directory,
        server=raw["server"],
        etcd_port=raw["etcdPort"],
        apiserver_port=raw["apiserverPort"],
        pids={k: int(v) for k, v in raw["pids"].items()},
    )


def up(
    directory: pathlib.Path,
    *,
    apiserver_port: int | None = None,
    controller_manager: bool = True,
    progress: _build.Progress | None = None,
) -> Cluster:
    """Start a control plane whose state lives in ``directory``; return once /readyz answers 200.

    Raises ControlPlaneError naming the step (binaries, a taken port, a process that exits or does
    not get ready); whatever was started by then is stopped again.
    """
    existing = load(directory)
    if existing is not None and any(existing.alive().values()):
        raise errors.ControlPlaneError(
            "start",
            f"a control plane already runs in {directory}; use it, or run "
            f"'meshward dev down --dir {directory}' first",
        )
    binaries = _build.ensure(progress)
    if apiserver_port is not None and _port_taken(apiserver_port):
        raise errors.ControlPlaneError(
            "start kube-apiserver",
            f"port {apiserver_port} on 127.0.0.1 is taken; pick another "
            "with --port or leave it out to choose a free one",
        )
    _claim(directory)
    (directory / "etcd-data").mkdir(mode=0o700)
    _pki.generate(directory)
    etcd_port, peer_port = _free_port(), _free_port()
    api_port = apiserver_port or _free_port()
    cluster = Cluster(directory, f"https://127.0.0.1:{api_port}", etcd_port, api_port, {})
    pids: dict[str, int] = {}

    def record() -> None:
        state = {
            "server": cluster.server,
            "etcdPort": etcd_port,
            "apiserverPort": api_port,
            "pids": pids,
        }
        (directory / "state.json").write_text(json.dumps(state, indent=2) + "\n")

    deadline = time.monotonic() + READY_TIMEOUT
    try:
        log = directory / "etcd.log"
        pids["etcd"] = _spawn(
            [
                str(binaries.etcd),
                "--data-dir",
                str(directory / "etcd-data"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
            log,
        )
        record()

        def etcd_healthy() -> bool:
            url = f"http://127.0.0.1:{etcd_port}/health"
            with urllib.request.urlopen(url, timeout=1) as resp:
                return bool(json.load(resp).get("health") == "true")

        _wait("start etcd", etcd_healthy, pids["etcd"], log, deadline)

        log = directory / "kube-apiserver.log"
        d = directory
        pids["kube-apiserver"] = _spawn(
            [
                str(binaries.apiserver),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--secure-port={api_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={d}",
                f"--tls-cert-file={d / 'apiserver.crt'}",
                f"--tls-private-key-file={d / 'apiserver.key'}",
                f"--client-ca-file={d / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--token-auth-file={d / 'tokens.csv'}",
                f"--service-account-key-file={d / 'sa.pub'}",
                f"--service-account-signing-key-file={d / 'sa.key'}",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--api-audiences={SERVICE_ACCOUNT_ISSUER}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--feature-gates=BoundServiceAccountTokenVolume=true",
            ],
            log,
        )
        record()
        _wait("start kube-apiserver", cluster.ready, pids["kube-apiserver"], log, deadline)
        _write_kubeconfig(cluster)

        if controller_manager and binaries.controller_manager is not None:
            log = directory / "kube-controller-manager.log"
            pids["kube-controller-manager"] = _spawn(
                [
                    str(binaries.controller_manager),
                    f"--kubeconfig={cluster.kubeconfig}",
                    "--leader-elect=false",
                    f"--service-account-private-key-file={d / 'sa.key'}",
                    f"--root-ca-file={d / 'ca.crt'}",
                    "--controllers=*,-nodeipam,-nodelifecycle,-ttl,-bootstrapsigner,-tokencleaner",
                    "--bind-address=127.0.0.1",
                    "--secure-port=0",
                    "--port=0",
                    "--use-service-account-credentials=false",
                ],
                log,
            )
            record()
    except BaseException:
        _stop(pids)
        raise
    return dataclasses.replace(cluster, pids=dict(pids))


def _ours(name: str, pid: int) -> bool:
    """Whether ``pid`` still runs the binary it was recorded for (pids are reused)."""
    try:
        argv0 = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except OSError:
        return False
    return pathlib.Path(argv0.decode(errors="replace")).name == name


def _stop(recorded: dict[str, int], timeout: float = 10.0) -> None:
    pids = {name: pid for name, pid in recorded.items() if _ours(name, pid)}
    for pid in reversed(list(pids.values())):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    for pid in recorded.values():  # reap our own children, zombies included
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _claim(directory: pathlib.Path) -> None:
    """Make ``directory`` an empty state directory of ours; refuse one holding anything else."""
    if directory.exists():
        if not (directory / MARKER).exists() and any(directory.iterdir()):
            raise errors.ControlPlaneError(
                "start",
                f"{directory} is not empty and is not a meshward control plane directory; "
                "choose a new or empty directory with --dir",
            )
        shutil.rmtree(directory)
    directory.mkdir(parents=True, mode=0o700)
    (directory / MARKER).touch()


def down(directory: pathlib.Path) -> bool:
    """Stop the control plane in ``directory`` and remove its state; False if there was none.

    Only a directory that ``up`` made (it carries the marker file) is removed.
    """
    if not (directory / MARKER).exists():
        return False
    cluster = load(directory)
    if cluster is not None:
        _stop(cluster.pids)
    shutil.rmtree(directory, ignore_errors=True)
    return True
