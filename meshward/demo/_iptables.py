"""An iptables that works in a fresh network namespace: the one on PATH, else Debian's, fetched
once into the per-user cache (``$XDG_CACHE_HOME/meshward/iptables``) and run from there, as the
control plane's binaries are: nothing is installed system-wide. Its ``-save`` and ``-restore``
programs (and ip6tables') come with it, from the same package.

Shared by the demo's transparent mode and the network-namespace tests (tests/netns.py).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import pathlib
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence

from meshward import errors
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
    def restore(self) -> pathlib.Path:
        """The matching ``iptables-restore``, with which ``meshward proxy-init`` applies the
        rules in one commit."""
        return self.path.with_name(f"{self.path.name}-restore")

    @property
    def ip6(self) -> pathlib.Path:
        return self.path.with_name(self.path.name.replace("iptables", "ip6tables", 1))


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "meshward" / "iptables"


def run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """Run ``argv``; its standard output, or an InterceptionError quoting what it printed."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=60, env=dict(env or os.environ)
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.InterceptionError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        raise errors.InterceptionError(
            f"`{' '.join(argv)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


def cached() -> bool:
    """Whether an iptables is at hand without fetching (on PATH, or fetched before)."""
    return shutil.which("iptables") is not None or (cache_dir() / "root" / ".complete").is_file()


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
    """The first candidate that can list the nat table in a fresh namespace and has its
    restore program beside it (proxy-init needs both)."""
    problems = []
    for path in candidates:
        restore = Iptables(path, env).restore
        if shutil.which(restore) is None:
            problems.append(f"{restore} is missing: proxy-init applies the rules with it")
            continue
        name = f"mw-probe-{uuid.uuid4().hex[:6]}"
        run(["ip", "netns", "add", name])
        try:
            run(["ip", "netns", "exec", name, str(path), "-t", "nat", "-S"], env)
        except errors.InterceptionError as exc:
            problems.append(str(exc))
            continue
        finally:
            run(["ip", "netns", "del", name])
        return Iptables(path, env)
    raise errors.InterceptionError(
        "no iptables works in a network namespace here: " + "; ".join(problems)
    )


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
