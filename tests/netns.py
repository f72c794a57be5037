"""Pods as network namespaces, and iptables to intercept their traffic, for transparent-mode tests.

:class:`Network` makes a bridge on the host with the first address of a /24 in 10.77.0.0/16
(a free one, picked at random), and one namespace per pod, joined to the bridge by a veth pair,
with its own address on it and the bridge as its default route. Everything it made (processes
are the caller's) is removed by :meth:`Network.close`, on every path.

:func:`iptables` is the iptables on PATH, or else Debian's, fetched once into the per-user cache
(``$XDG_CACHE_HOME/meshward/iptables``) and run from there, as the benchmarks fetch their tools:
nothing is installed system-wide. :func:`skip_reason` says why these tests can not run here
(not root, no ``ip netns``), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import ipaddress
import os
import pathlib
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence

from meshward.devcluster import _debian

PACKAGES = (
    "iptables",
    "libip4tc2",
    "libip6tc2",
    "libxtables12",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
    "libnftnl11",
)
"""iptables and the libraries it loads (its other dependencies are not needed to run it)."""
BACKENDS = ("iptables-nft", "iptables-legacy")
"""The fetched package's programs, in the order tried (``iptables`` itself is a link that
Debian's alternatives system makes at install time, so an unpacked package has none)."""


def skip_reason() -> str | None:
    """Why network-namespace tests can not run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to make network namespaces and install iptables rules (CI runs as root)"
    for tool in ("ip", "setpriv"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux) on PATH"
    return _netns_problem()


@functools.cache
def unprivileged_problem(uid: int) -> str | None:
    """Why a process of ``uid`` can not run meshward from this checkout (the proxy runs under
    its own UID, which the interception rules exempt), or None when it can."""
    probe = subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"),
            *(sys.executable, "-c", "import meshward.proxy.run"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode == 0:
        return None
    last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return (
        f"UID {uid} (the proxy's) can not import meshward from {sys.prefix} ({last}): the "
        "checkout or its parent directories are private to root; clone it where other users "
        "may traverse (e.g. chmod o+x on the parents) to run this test"
    )


@functools.cache
def _netns_problem() -> str | None:
    name = f"mw-probe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` does not work here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run ``argv``; its standard output, or an AssertionError quoting what it printed."""
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=60, env=dict(env or os.environ)
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


# -- iptables --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Iptables:
    """An iptables program that works in a fresh network namespace, and how to run it."""

    path: pathlib.Path
    env: Mapping[str, str]
    """``os.environ``, plus where a fetched copy finds its libraries and extensions."""

    @property
    def save(self) -> pathlib.Path:
        """The matching ``iptables-save`` (``iptables-nft-save`` for ``iptables-nft``...)."""
        return self.path.with_name(f"{self.path.name}-save")

    @property
    def ip6(self) -> pathlib.Path:
        return self.path.with_name(self.path.name.replace("iptables", "ip6tables", 1))


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "meshward" / "iptables"


@functools.cache
def iptables() -> Iptables:
    """iptables from PATH, else fetched from Debian into the per-user cache (once)."""
    on_path = shutil.which("iptables")
    if on_path is not None:
        return _working([pathlib.Path(on_path)], dict(os.environ))
    root = cache_dir() / "root"
    _fetch_once(root)
    env = dict(os.environ)
    (libs,) = root.glob("usr/lib/*-linux-gnu")
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH", "")]))
    env["XTABLES_LIBDIR"] = str(libs / "xtables")
    return _working([root / "usr" / "sbin" / name for name in BACKENDS], env)


def _working(candidates: Sequence[pathlib.Path], env: dict[str, str]) -> Iptables:
    """The first candidate that can list the nat table in a fresh namespace."""
    problems = []
    for path in candidates:
        name = f"mw-probe-{uuid.uuid4().hex[:6]}"
        run(["ip", "netns", "add", name])
        try:
            run(["ip", "netns", "exec", name, str(path), "-t", "nat", "-S"], env)
        except AssertionError as exc:
            problems.append(str(exc))
            continue
        finally:
            run(["ip", "netns", "del", name])
        return Iptables(path, env)
    raise AssertionError("no iptables works in a network namespace here: " + "; ".join(problems))


def _fetch_once(root: pathlib.Path) -> None:
    if (root / ".complete").is_file():
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with (root.parent / ".fetch.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / ".complete").is_file():
            _fetch(root)


def _fetch(root: pathlib.Path) -> None:
    work = root.parent / "fetch"
    shutil.rmtree(work, ignore_errors=True)
    (work / "debs").mkdir(parents=True)
    log = work / "fetch.log"
    apt = _debian.Apt.create(work / "apt", (("deb", "bookworm"),), log)
    apt.update()
    staging = work / "root"
    for package in PACKAGES:
        _debian.run(
            f"download {package}",
            ["apt-get", *apt.options, "download", package],
            cwd=work / "debs",
            log=log,
        )
        (deb,) = (work / "debs").glob(f"{package}_*.deb")
        _debian.run(f"unpack {package}", ["dpkg-deb", "-x", str(deb), str(staging)], log=log)
    (staging / ".complete").write_text("\n".join(PACKAGES) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    shutil.rmtree(work, ignore_errors=True)


# -- pods and the network between them ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pod:
    """A network namespace with one address on the bridge."""

    netns: str
    ip: str

    def argv(self, *argv: str, uid: int | None = None) -> list[str]:
        """``argv`` run inside the namespace, as ``uid`` when given (no capabilities then)."""
        prefix = ["ip", "netns", "exec", self.netns]
        if uid is not None:
            prefix += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        return [*prefix, *argv]

    def run(self, *argv: str, env: Mapping[str, str] | None = None) -> str:
        return run(self.argv(*argv), env)


class Network:
    """A bridge on the host and pods on it; see the module docstring."""

    def __init__(self) -> None:
        self.id = uuid.uuid4().hex[:6]
        self.bridge = f"mwb{self.id}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        """The bridge's (the host's) address, reachable from every pod."""
        self.pods: dict[str, Pod] = {}
        self._links: list[str] = []
        try:
            run(["ip", "link", "add", self.bridge, "type", "bridge"])
            run(
                ["ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge]
            )
            run(["ip", "link", "set", self.bridge, "up"])
        except BaseException:
            self.close()
            raise

    def add(self, name: str, host: int) -> Pod:
        """A pod named ``name`` with the ``host``-th address of the subnet."""
        pod = Pod(f"mw-{self.id}-{name}", str(self.subnet.network_address + host))
        veth = f"mwv{self.id}{len(self.pods)}"
        run(["ip", "netns", "add", pod.netns])
        self.pods[name] = pod
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", pod.netns])
        self._links.append(veth)
        run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        pod.run("ip", "addr", "add", f"{pod.ip}/{self.subnet.prefixlen}", "dev", "eth0")
        pod.run("ip", "link", "set", "eth0", "up")
        pod.run("ip", "link", "set", "lo", "up")
        pod.run("ip", "route", "add", "default", "via", self.gateway)
        return pod

    def close(self) -> None:
        """Remove the namespaces, links and bridge; what is already gone is skipped."""
        for pod in self.pods.values():
            with contextlib.suppress(AssertionError):
                run(["ip", "netns", "del", pod.netns])
        present = run(["ip", "-o", "link", "show"]).split()
        for link in [*self._links, self.bridge]:  # a veth goes with its namespace, as a rule
            if f"{link}:" in present or any(word.startswith(f"{link}@") for word in present):
                with contextlib.suppress(AssertionError):
                    run(["ip", "link", "del", link])
        self.pods.clear()


def _free_subnet() -> ipaddress.IPv4Network:
    """A /24 of 10.77.0.0/16 that no address on this host is in."""
    used = run(["ip", "-4", "-o", "addr", "show"])
    routes = run(["ip", "-4", "route", "show"])
    choices = list(range(256))
    random.shuffle(choices)
    for third in choices:
        subnet = ipaddress.IPv4Network(f"10.77.{third}.0/24")
        prefix = f"10.77.{third}."
        if prefix not in used and prefix not in routes:
            return subnet
    raise AssertionError("every /24 of 10.77.0.0/16 is in use on this host")
