"""The load generator and reference proxies the proxy benchmark runs: wrk, haproxy and stunnel,
taken from PATH when there, otherwise fetched once per user from Debian's registry.

Nothing is installed system-wide and no root is needed: a private apt configuration (see
:mod:`meshward.devcluster._debian`) downloads each package and the libraries it needs that this
machine lacks, ``dpkg-deb -x`` unpacks them into ``~/.cache/meshward/bench-tools/``, and the tools
run with ``LD_LIBRARY_PATH`` pointed at the unpacked libraries. A failure names the step and the
package, and the log to read.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence

from meshward import errors
from meshward.devcluster import _debian


@dataclasses.dataclass(frozen=True)
class Tool:
    """A program: the names it has on PATH, its Debian package, its path inside that package."""

    names: tuple[str, ...]
    package: str
    path: str


WRK = Tool(("wrk",), "wrk", "usr/bin/wrk")
HAPROXY = Tool(("haproxy",), "haproxy", "usr/sbin/haproxy")
STUNNEL = Tool(("stunnel4", "stunnel"), "stunnel4", "usr/bin/stunnel4")
ALL = (WRK, HAPROXY, STUNNEL)


@dataclasses.dataclass(frozen=True)
class Tools:
    """Where each tool is, and the environment to run the fetched ones in."""

    wrk: pathlib.Path
    haproxy: pathlib.Path
    stunnel: pathlib.Path
    env: Mapping[str, str]
    """``os.environ`` plus ``LD_LIBRARY_PATH`` for fetched libraries, when there are any."""
    origin: Mapping[str, str]
    """Per tool: ``PATH`` or the cache directory it came from (for the report)."""


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(base) / "meshward" / "bench-tools"


def ensure() -> Tools:
    """Every tool, fetching into the per-user cache those not on PATH (once)."""
    found = {tool.package: _on_path(tool) for tool in ALL}
    root = cache_dir() / "root"
    lib_path: list[str] = []
    if any(path is None for path in found.values()):
        _fetch_once(root)
        lib_path = _library_dirs(root)
    env = dict(os.environ)
    if lib_path:
        env["LD_LIBRARY_PATH"] = ":".join([*lib_path, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    paths = {t.package: found[t.package] or root / t.path for t in ALL}
    return Tools(
        wrk=paths[WRK.package],
        haproxy=paths[HAPROXY.package],
        stunnel=paths[STUNNEL.package],
        env=env,
        origin={t.package: "PATH" if found[t.package] else str(cache_dir()) for t in ALL},
    )


def _on_path(tool: Tool) -> pathlib.Path | None:
    for name in tool.names:
        where = shutil.which(name)
        if where:
            return pathlib.Path(where)
    return None


def _fetch_once(root: pathlib.Path) -> None:
    """Fill ``root`` unless a complete, working copy is there; one fetch at a time per user."""
    if _complete(root):
        return
    with _debian.step("lock the bench-tools cache"):
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = (root.parent / ".fetch.lock").open("w")
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _complete(root):
            _fetch(root)


def _complete(root: pathlib.Path) -> bool:
    return (root / ".complete").is_file() and not _missing_libraries(root)


def _fetch(root: pathlib.Path) -> None:
    work = root.parent / "fetch"
    with _debian.step("prepare the bench-tools fetch directory"):
        shutil.rmtree(work, ignore_errors=True)
        (work / "debs").mkdir(parents=True)
    log = work / "fetch.log"
    _progress(f"fetching {', '.join(t.package for t in ALL)} from Debian (log: {log})")
    apt = _debian.Apt.create(work / "apt", (("deb", "bookworm"),), log)
    apt.update()
    roots = [t.package for t in ALL]
    packages = roots + _needed_libraries(apt, roots)
    staging = work / "root"
    for package in packages:
        _debian.run(
            f"download {package}",
            ["apt-get", *apt.options, "download", package],
            cwd=work / "debs",
            log=log,
        )
        debs = sorted((work / "debs").glob(f"{package}_*.deb"))
        if not debs:
            raise errors.ControlPlaneError(
                f"download {package}", f"apt-get left no {package}_*.deb in {work / 'debs'}"
            )
        _debian.run(f"unpack {package}", ["dpkg-deb", "-x", str(debs[0]), str(staging)], log=log)
    missing = _missing_libraries(staging)
    if missing:
        raise errors.ControlPlaneError(
            "check the fetched tools",
            f"{missing}: a library package is missing from the fetch list; install the "
            "tool with apt-get instead, or report this",
        )
    with _debian.step("install the bench tools"):
        (staging / ".complete").write_text("\n".join(packages) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
        shutil.rmtree(work, ignore_errors=True)
    _progress(f"bench tools ready in {root}")


def _needed_libraries(apt: _debian.Apt, roots: Sequence[str]) -> list[str]:
    """The library packages the ``roots`` need, directly or not, that this machine lacks.

    Only dependencies named ``lib*`` are followed: the others (adduser, init scripts, perl for
    a wrapper script) are not needed to run the binaries. Of alternatives, one already
    installed satisfies the dependency; otherwise the first real package is taken.
    """
    chosen: list[str] = []
    seen = set(roots)
    frontier = list(roots)
    while frontier:
        groups = _depends(apt, frontier)
        names = {name for alternatives in groups for name in alternatives}
        installed = _installed(sorted(names))
        frontier = []
        for alternatives in groups:
            if any(name in installed or name in seen for name in alternatives):
                continue
            libraries = [n for n in alternatives if n.startswith("lib")]
            if libraries:
                seen.add(libraries[0])
                chosen.append(libraries[0])
                frontier.append(libraries[0])
    return chosen


def _depends(apt: _debian.Apt, packages: Sequence[str]) -> list[tuple[str, ...]]:
    """Each Depends/PreDepends of ``packages`` as its tuple of alternatives."""
    text = _debian.output(
        f"resolve dependencies of {' '.join(packages)}",
        [
            "apt-cache",
            *apt.options,
            "depends",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *packages,
        ],
        log=apt.log,
    )
    groups: list[tuple[str, ...]] = []
    pending: list[str] = []
    for line in text.splitlines():
        if not line.startswith(" "):
            pending = []
            continue
        entry = line.strip()
        more = entry.startswith("|")
        kind, sep, name = entry.lstrip("|").partition(": ")
        if not sep or kind not in ("Depends", "PreDepends"):
            continue  # the providers listed under a virtual package, or another relation
        if not name.startswith("<"):
            pending.append(name.split(":")[0])
        if not more:
            if pending:
                groups.append(tuple(pending))
            pending = []
    return groups


def _installed(names: Sequence[str]) -> set[str]:
    """Those of ``names`` that dpkg has installed on this machine."""
    if not names:
        return set()
    try:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\n", *names],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError as exc:
        raise errors.ControlPlaneError(
            "resolve dependencies",
            "dpkg-query not found: fetching the bench tools needs a Debian system; "
            "put wrk, haproxy and stunnel on PATH instead",
        ) from exc
    # Exit status 1 only means some names are not installed; those lines are simply absent.
    return {
        fields[0]
        for fields in (line.split() for line in proc.stdout.splitlines())
        if len(fields) == 2 and fields[1].startswith("ii")
    }


def _library_dirs(root: pathlib.Path) -> list[str]:
    """Directories under ``root`` holding shared libraries, in a stable order."""
    found: set[str] = set()
    for top in ("lib", "usr/lib"):
        base = root / top
        if base.is_dir():
            found.update(str(p.parent) for p in base.rglob("*.so*") if p.is_file())
    return sorted(found)


def _missing_libraries(root: pathlib.Path) -> str:
    """What the tools under ``root`` fail to load ('' when nothing), as ldd tells it."""
    env = {**os.environ, "LD_LIBRARY_PATH": ":".join(_library_dirs(root))}
    problems: list[str] = []
    for tool in ALL:
        binary = root / tool.path
        if not binary.is_file():
            problems.append(f"{tool.package}: no {tool.path}")
            continue
        proc = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            if "not a dynamic executable" in proc.stdout + proc.stderr:
                continue  # statically linked
            problems.append(f"{tool.package}: ldd failed: {proc.stderr.strip()[:200]}")
            continue
        lost = [line.split()[0] for line in proc.stdout.splitlines() if "not found" in line]
        if lost:
            problems.append(f"{tool.package} needs {', '.join(lost)}")
    return "; ".join(problems)


def _progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
