"""Fetch packages from Debian's registry without installing anything system-wide.

A private apt configuration (its own sources list, package lists and download cache) pointed
at the mirror this machine's apt already uses: ``apt-get download`` and ``apt-get source``
then work as any user, and ``dpkg -x`` unpacks where we choose. Shared by the control-plane
build (:mod:`meshward.devcluster._build`) and the benchmarks' tool fetcher.

Every command's output goes to one log file; a failure raises
:class:`~meshward.errors.ControlPlaneError` naming the step, the most telling line of the
output, and the log's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import subprocess
import tarfile
from collections.abc import Iterator, Sequence

from meshward import errors

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SUITES = ("bookworm", "bullseye", "trixie")


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Turn a file-system failure inside step ``name`` into a one-line ControlPlaneError."""
    try:
        yield
    except (OSError, tarfile.TarError) as exc:
        raise errors.ControlPlaneError(name, str(exc)) from exc


def mirror() -> str:
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
            if "deb" in fields.get("types", "") and any(s in SUITES for s in suites):
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


def run(
    name: str,
    argv: Sequence[str],
    *,
    cwd: pathlib.Path | None = None,
    env: dict[str, str] | None = None,
    log: pathlib.Path,
) -> None:
    """Run ``argv`` as step ``name``, its output appended to ``log``; raise if it fails."""
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        except FileNotFoundError as exc:
            raise errors.ControlPlaneError(name, f"{argv[0]} not found ({exc})") from exc
    if proc.returncode != 0:
        raise errors.ControlPlaneError(
            name, f"{argv[0]} exited {proc.returncode}: {cause(log)} (full log: {log})"
        )


def output(name: str, argv: Sequence[str], *, log: pathlib.Path) -> str:
    """Run ``argv`` as step ``name`` and return its standard output (errors go to ``log``)."""
    with log.open("ab") as err:
        err.write(f"\n$ {' '.join(argv)}\n".encode())
        err.flush()
        try:
            proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=err, text=True)
        except FileNotFoundError as exc:
            raise errors.ControlPlaneError(name, f"{argv[0]} not found ({exc})") from exc
    if proc.returncode != 0:
        raise errors.ControlPlaneError(
            name, f"{argv[0]} exited {proc.returncode}: {cause(log)} (full log: {log})"
        )
    return proc.stdout


def cause(log: pathlib.Path) -> str:
    """The most telling line of a failed step's output: its first error, else its last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last_command = max((i for i, line in enumerate(lines) if line.startswith("$ ")), default=-1)
    lines = lines[last_command + 1 :]
    for line in lines:
        if line.startswith(("E:", "W:")) or "error" in line.lower() or "failed" in line.lower():
            return line[:200]
    return lines[-1][:200] if lines else "(no output)"


@dataclasses.dataclass(frozen=True)
class Apt:
    """A private apt configuration under ``root``; every command it runs logs to ``log``."""

    root: pathlib.Path
    log: pathlib.Path

    @classmethod
    def create(
        cls, root: pathlib.Path, entries: Sequence[tuple[str, str]], log: pathlib.Path
    ) -> Apt:
        """Lay out ``root`` with a sources list of ``entries`` as (``deb`` or ``deb-src``,
        suite), main component, on this machine's mirror, signed by Debian's archive keyring."""
        url = mirror()
        with step("prepare private apt configuration"):
            for sub in ("lists/partial", "cache/archives/partial"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            (root / "sources.list").write_text(
                "".join(
                    f"{kind} [signed-by={KEYRING}] {url} {suite} main\n" for kind, suite in entries
                )
            )
        return cls(root, log)

    @property
    def options(self) -> list[str]:
        """Options that point apt-get and apt-cache at this configuration only."""
        return [
            f"-o=Dir::Etc::SourceList={self.root / 'sources.list'}",
            "-o=Dir::Etc::SourceParts=/dev/null",
            f"-o=Dir::State::Lists={self.root / 'lists'}",
            f"-o=Dir::Cache={self.root / 'cache'}",
            "-o=APT::Sandbox::User=root",
            "-o=Debug::NoLocking=1",
            "-q",
        ]

    def update(self) -> None:
        """Fetch the package lists; any failed index is an error, not a stale list."""
        run("apt-get update", ["apt-get", *self.options, "--error-on=any", "update"], log=self.log)
