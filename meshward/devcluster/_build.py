"""Obtain kube-apiserver, kube-controller-manager and etcd without a cluster or Docker.

Where they come from, in order: ``KUBEBUILDER_ASSETS`` (envtest's convention, a directory
holding ``etcd`` and ``kube-apiserver``), the per-user cache, or a one-time build from
Debian's package registry. The build uses a private apt configuration pointed at the mirror
this machine already uses, so nothing is installed system-wide.

Why Kubernetes 1.20 built with Go 1.15: it is the newest Debian source that still carries the
full tree with vendor/, and its vendored reflect2 crashes on the first custom resource when built
with Go >= 1.18.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib
import shutil
import sys
import tarfile
from collections.abc import Callable

from meshward import errors
from meshward.devcluster import _debian

KUBERNETES_VERSION = "v1.20.2"
KUBERNETES_SOURCE = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
GO_PACKAGES = ("golang-1.15-go", "golang-1.15-src")
ETCD_PACKAGE = "etcd-server/bookworm"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager")
REQUIRED = ("etcd", "kube-apiserver")

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane executables; ``controller_manager`` is optional."""

    etcd: pathlib.Path
    apiserver: pathlib.Path
    controller_manager: pathlib.Path | None


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "meshward" / "control-plane" / KUBERNETES_VERSION


def _from_dir(d: pathlib.Path) -> Binaries | None:
    if not all((d / name).is_file() and os.access(d / name, os.X_OK) for name in REQUIRED):
        return None
    cm = d / "kube-controller-manager"
    return Binaries(d / "etcd", d / "kube-apiserver", cm if cm.is_file() else None)


def locate() -> Binaries | None:
    """Binaries already on this machine, or None when they must be built."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        found = _from_dir(pathlib.Path(assets))
        if found is None:
            raise errors.ControlPlaneError(
                "binaries",
                f"KUBEBUILDER_ASSETS={assets} does not hold executable {' and '.join(REQUIRED)}; "
                "fix the path or unset it to use meshward's own build",
            )
        return found
    return _from_dir(cache_dir())


def ensure(progress: Progress | None = None) -> Binaries:
    """Return usable binaries, building them once into the cache if needed."""
    found = locate()
    if found is not None:
        return found
    dest = cache_dir()
    with _debian.step("lock the build cache"):
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = (dest.parent / ".build.lock").open("w")
    with lock:
        # One build at a time per cache; whoever waited finds the other's result.
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _from_dir(dest)
        if built is None:
            build(dest, progress or _stderr_progress)
            built = _from_dir(dest)
    if built is None:
        raise errors.ControlPlaneError("install", f"the build finished but {dest} lacks binaries")
    return built


def _stderr_progress(message: str) -> None:
    print(f"meshward: {message}", file=sys.stderr, flush=True)


def build(dest: pathlib.Path, progress: Progress) -> None:
    """Download sources and toolchain from Debian's registry and build into ``dest``.

    Takes a few minutes on two cores; each step is reported through ``progress``. A failure
    raises ControlPlaneError naming the step, and leaves no half-filled ``dest``.
    """
    work = dest.parent / f"build-{KUBERNETES_VERSION}"
    with _debian.step("prepare build directory"):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    log = work / "build.log"
    steps = 7

    progress(f"[1/{steps}] private apt index from Debian's registry (log: {log})")
    apt = _debian.Apt.create(
        work / "apt", (("deb-src", "bookworm"), ("deb", "bookworm"), ("deb", "bullseye")), log
    )
    apt.update()

    progress(f"[2/{steps}] downloading Kubernetes {KUBERNETES_VERSION} source, Go 1.15 and etcd")
    downloads = work / "debs"
    downloads.mkdir()
    _debian.run(
        "download kubernetes source",
        ["apt-get", *apt.options, "source", "--download-only", KUBERNETES_SOURCE],
        cwd=downloads,
        log=log,
    )
    _debian.run(
        "download go and etcd",
        ["apt-get", *apt.options, "download", *GO_PACKAGES, ETCD_PACKAGE],
        cwd=downloads,
        log=log,
    )

    progress(f"[3/{steps}] unpacking")
    tools = work / "tools"
    for deb in sorted(downloads.glob("*.deb")):
        _debian.run(f"unpack {deb.name}", ["dpkg", "-x", str(deb), str(tools)], log=log)
    origs = sorted(downloads.glob("kubernetes_*.orig.tar.*"))
    if not origs:
        raise errors.ControlPlaneError(
            "unpack kubernetes source", f"no orig tarball in {downloads}"
        )
    gopath = work / "gopath"
    tree = gopath / "src" / "k8s.io" / "kubernetes"
    unpack = work / "unpack"
    with _debian.step("unpack kubernetes source"):
        tree.parent.mkdir(parents=True)
        with tarfile.open(origs[0]) as tar:
            tar.extractall(unpack, filter="tar")
        tops = list(unpack.iterdir())
        if len(tops) != 1:
            raise errors.ControlPlaneError(
                "unpack kubernetes source", f"expected one top directory in {origs[0].name}"
            )
        tops[0].rename(tree)

    goroot = tools / "usr" / "lib" / "go-1.15"
    env = {
        "PATH": f"{goroot / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": str(work),
        "GOROOT": str(goroot),
        "GOPATH": str(gopath),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
        "GOCACHE": str(work / "gocache"),
        "GOFLAGS": "",
    }
    go = str(goroot / "bin" / "go")

    progress(f"[4/{steps}] generating OpenAPI definitions")
    _debian.run(
        "build openapi-gen",
        [
            go,
            "build",
            "-o",
            str(work / "openapi-gen"),
            "./vendor/k8s.io/kube-openapi/cmd/openapi-gen",
        ],
        cwd=tree,
        env=env,
        log=log,
    )
    packages = _openapi_packages(tree)
    _debian.run(
        "generate openapi",
        [
            str(work / "openapi-gen"),
            "--input-dirs",
            ",".join(packages),
            "--output-base",
            str(gopath / "src"),
            "--output-package",
            "k8s.io/kubernetes/pkg/generated/openapi",
            "-O",
            "zz_generated.openapi",
            "--go-header-file",
            str(tree / "hack" / "boilerplate" / "boilerplate.generatego.txt"),
        ],
        cwd=tree,
        env=env,
        log=log,
    )

    v = "k8s.io/kubernetes/vendor/k8s.io/component-base/version"
    ldflags = f"-s -w -X {v}.gitVersion={KUBERNETES_VERSION} -X {v}.gitMajor=1 -X {v}.gitMinor=20"
    out = work / "bin"
    progress(f"[5/{steps}] building kube-apiserver (about 2-3 minutes)")
    _debian.run(
        "build kube-apiserver",
        [
            go,
            "build",
            "-ldflags",
            ldflags,
            "-o",
            str(out / "kube-apiserver"),
            "./cmd/kube-apiserver",
        ],
        cwd=tree,
        env=env,
        log=log,
    )
    progress(f"[6/{steps}] building kube-controller-manager (about 1 minute)")
    _debian.run(
        "build kube-controller-manager",
        [
            go,
            "build",
            "-ldflags",
            ldflags,
            "-o",
            str(out / "kube-controller-manager"),
            "./cmd/kube-controller-manager",
        ],
        cwd=tree,
        env=env,
        log=log,
    )

    progress(f"[7/{steps}] installing into {dest}")
    etcd = tools / "usr" / "bin" / "etcd"
    if not etcd.is_file():
        raise errors.ControlPlaneError(
            "install etcd", f"etcd not found in the etcd-server package at {etcd}"
        )
    with _debian.step("install binaries"):
        shutil.copy2(etcd, out / "etcd")
        staging = dest.with_name(dest.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(out, staging)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
        shutil.rmtree(work, ignore_errors=True)
    progress(f"control plane binaries ready in {dest}")


def _openapi_packages(tree: pathlib.Path) -> list[str]:
    """Every Go package carrying a ``+k8s:openapi-gen=`` tag, as an import path."""
    found: set[str] = set()
    for root in (tree / "pkg", tree / "staging" / "src"):
        for path in root.rglob("*.go"):
            if "+k8s:openapi-gen=" not in path.read_text(errors="replace"):
                continue
            rel = path.parent.relative_to(tree)
            parts = rel.parts
            if parts[0] == "staging":
                found.add("/".join(parts[2:]))
            else:
                found.add("k8s.io/kubernetes/" + "/".join(parts))
    return sorted(found)
