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

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence

from meshward import errors

KUBERNETES_VERSION = "v1.20.2"
KUBERNETES_SOURCE = "kubernetes=1.20.5+really1.20.2-1.1+deb12u1"
GO_PACKAGES = ("golang-1.15-go", "golang-1.15-src")
ETCD_PACKAGE = "etcd-server/bookworm"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
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
    with _step("lock the build cache"):
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


@contextlib.contextmanager
def _step(step: str) -> Iterator[None]:
    """Turn a file-system failure inside ``step`` into a one-line ControlPlaneError."""
    try:
        yield
    except (OSError, tarfile.TarError) as exc:
        raise errors.ControlPlaneError(step, str(exc)) from exc


def _stderr_progress(message: str) -> None:
    print(f"meshward: {message}", file=sys.stderr, flush=True)


def _mirror() -> str:
    """The Debian mirror this machine's apt already uses (its host is not ours to hard-code)."""
    candidates: list[str] = []
    sources = pathlib.Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text().split("\n\n"):
            fields = dict(
                (k.strip().lower(), v.strip())
                for k, _, v in (line.partition(":") for line in stanza.splitlines())
                if not k.startswith("#") and v
            )
            suites = fields.get("suites", "").split()
            if "deb" in fields.get("types", "") and any(
                s in ("bookworm", "bullseye", "trixie") for s in suites
            ):
                candidates += fields.get("uris", "").split()
    legacy = pathlib.Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            m = re.match(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(bookworm|bullseye|trixie)\s", line)
            if m:
                candidates.append(m.group(1))
    override = os.environ.get("MESHWARD_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    for uri in candidates:
        if not uri.rstrip("/").endswith("-security"):
            return uri.rstrip("/")
    raise errors.ControlPlaneError(
        "find Debian mirror",
        "no Debian mirror found in /etc/apt; set MESHWARD_DEBIAN_MIRROR=<url of a Debian mirror>",
    )


def _run(
    step: str,
    argv: Sequence[str],
    *,
    cwd: pathlib.Path | None = None,
    env: dict[str, str] | None = None,
    log: pathlib.Path,
) -> None:
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError as exc:
            raise errors.ControlPlaneError(step, f"{argv[0]} not found ({exc})") from exc
    if proc.returncode != 0:
        raise errors.ControlPlaneError(
            step, f"{argv[0]} exited {proc.returncode}: {_cause(log)} (full log: {log})"
        )


def _cause(log: pathlib.Path) -> str:
    """The most telling line of a failed step's output: its first error, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last_command = max((i for i, line in enumerate(lines) if line.startswith("$ ")), default=-1)
    lines = lines[last_command + 1 :]
    for line in lines:
        if line.startswith(("E:", "W:")) or "error" in line.lower() or "failed" in line.lower():
            return line[:200]
    return lines[-1][:200] if lines else "(no output)"


def build(dest: pathlib.Path, progress: Progress) -> None:
    """Download sources and toolchain from Debian's registry and build into ``dest``.

    Takes a few minutes on two cores; each step is reported through ``progress``. A failure
    raises ControlPlaneError naming the step, and leaves no half-filled ``dest``.
    """
    work = dest.parent / f"build-{KUBERNETES_VERSION}"
    with _step("prepare build directory"):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    log = work / "build.log"
    steps = 7

    progress(f"[1/{steps}] private apt index from Debian's registry (log: {log})")
    mirror = _mirror()
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True)
    sources = apt / "sources.list"
    sources.write_text(
        "".join(
            f"{kind} [signed-by={KEYRING}] {mirror} {suite} main\n"
            for kind, suite in (("deb-src", "bookworm"), ("deb", "bookworm"), ("deb", "bullseye"))
        )
    )
    apt_opts = [
        f"-o=Dir::Etc::SourceList={sources}",
        "-o=Dir::Etc::SourceParts=/dev/null",
        f"-o=Dir::State::Lists={apt / 'lists'}",
        f"-o=Dir::Cache={apt / 'cache'}",
        "-o=APT::Sandbox::User=root",
        "-o=Debug::NoLocking=1",
        "-q",
    ]
    _run("apt-get update", ["apt-get", *apt_opts, "--error-on=any", "update"], log=log)

    progress(f"[2/{steps}] downloading Kubernetes {KUBERNETES_VERSION} source, Go 1.15 and etcd")
    downloads = work / "debs"
    downloads.mkdir()
    _run(
        "download kubernetes source",
        ["apt-get", *apt_opts, "source", "--download-only", KUBERNETES_SOURCE],
        cwd=downloads,
        log=log,
    )
    _run(
        "download go and etcd",
        ["apt-get", *apt_opts, "download", *GO_PACKAGES, ETCD_PACKAGE],
        cwd=downloads,
        log=log,
    )

    progress(f"[3/{steps}] unpacking")
    tools = work / "tools"
    for deb in sorted(downloads.glob("*.deb")):
        _run(f"unpack {deb.name}", ["dpkg", "-x", str(deb), str(tools)], log=log)
    origs = sorted(downloads.glob("kubernetes_*.orig.tar.*"))
    if not origs:
        raise errors.ControlPlaneError(
            "unpack kubernetes source", f"no orig tarball in {downloads}"
        )
    gopath = work / "gopath"
    tree = gopath / "src" / "k8s.io" / "kubernetes"
    unpack = work / "unpack"
    with _step("unpack kubernetes source"):
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
    _run(
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
    _run(
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
    _run(
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
    _run(
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
    with _step("install binaries"):
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
