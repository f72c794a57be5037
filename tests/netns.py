"""Pods as network namespaces, and iptables to intercept their traffic, for transparent-mode tests.

:class:`Network` makes a bridge on the host with the first address of a /24 in 10.77.0.0/16
(a free one, picked at random), and one namespace per pod, joined to the bridge by a veth pair,
with its own address on it and the bridge as its default route. Everything it made (processes
are the caller's) is removed by :meth:`Network.close`, on every path.

:func:`iptables` is the iptables on PATH, or else Debian's, fetched once into the per-user cache
(``$XDG_CACHE_HOME/meshward/iptables``) and run from there (:mod:`meshward.demo._iptables`,
which the demo's transparent mode uses too). :func:`skip_reason` says why these tests can not
run here (not root, no ``ip netns``), for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import ipaddress
import os
import random
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence

from meshward.demo import _iptables


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


# -- iptables: meshward.demo._iptables (the demo's transparent mode uses the same) -----------

Iptables = _iptables.Iptables
iptables = _iptables.iptables
cache_dir = _iptables.cache_dir


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
