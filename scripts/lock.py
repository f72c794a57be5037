#!/usr/bin/env python3
"""Regenerate meshward's dependency locks from pyproject.toml, the same way every time.

The container image installs exactly what the locks name, each file checked against its hash
(``pip install --require-hashes``), so a release rebuilt later, or on another machine, runs the
same code. Two locks, both at the top of the repository:

    requirements.lock        [project] dependencies and everything they pull in (the runtime)
    requirements-build.lock  [build-system] requires: what builds the meshward wheel

Each records in its header the moment it was resolved at (``uploaded-before``): the resolver
sees only files uploaded to PyPI before then, so running this again writes the same bytes, and a
lock changes only when pyproject.toml's dependencies do or when ``--upgrade`` moves that moment
to now. The resolver is uv, pinned below, installed on first use in a virtual environment under
the user's cache directory (``$XDG_CACHE_HOME/meshward/tools``). The resolution is universal:
one lock for every platform and every Python the project supports, so the image's Python (on
amd64 and arm64) and a developer's both install from it. Only versions with wheels are chosen,
since the image's builder installs wheels only (no compiler in it).

    python3 scripts/lock.py            rewrite the locks (same moment: picks up pyproject.toml)
    python3 scripts/lock.py --upgrade  re-resolve at the current moment: the newest releases
    python3 scripts/lock.py --check    change nothing; exit 1 if a lock is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
RUNTIME_LOCK = ROOT / "requirements.lock"
BUILD_LOCK = ROOT / "requirements-build.lock"

UV = "0.13.8"
"""The resolver's version: another version may write the same resolution differently."""
INDEX = "https://pypi.org/simple"
CUTOFF_LINE = re.compile(r"^# uploaded-before: (\S+)$", re.MULTILINE)
TIMEOUT = 300.0


class LockError(Exception):
    """The locks could not be written: the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Lock:
    """One lock file: where it goes, what it pins, and the header that says so."""

    path: pathlib.Path
    what: str
    source: str
    """What uv reads: pyproject.toml, or ``-`` for requirements given on standard input."""
    stdin: str = ""


def locks(pyproject: dict[str, object]) -> list[Lock]:
    build = pyproject.get("build-system")
    requires = build.get("requires") if isinstance(build, dict) else None
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise LockError("pyproject.toml has no [build-system] requires list: add one")
    return [
        Lock(
            RUNTIME_LOCK,
            "the runtime dependencies of meshward (pyproject.toml's [project] dependencies and "
            "all they pull in)",
            PYPROJECT.name,
        ),
        Lock(
            BUILD_LOCK,
            "what builds the meshward wheel (pyproject.toml's [build-system] requires)",
            "-",
            "".join(f"{r}\n" for r in requires),
        ),
    ]


def lowest_python(pyproject: dict[str, object]) -> str:
    """The oldest Python the project supports, from ``requires-python = ">=X.Y"``."""
    project = pyproject.get("project")
    spec = project.get("requires-python") if isinstance(project, dict) else None
    match = re.fullmatch(r"\s*>=\s*(\d+\.\d+)\s*", spec) if isinstance(spec, str) else None
    if match is None:
        raise LockError(
            f"pyproject.toml's requires-python is {spec!r}; this script needs the form '>=X.Y' "
            "to know which Pythons the lock must serve"
        )
    return match.group(1)


def recorded_cutoff() -> str | None:
    """The moment the runtime lock was resolved at, or None when there is no lock yet."""
    try:
        text = RUNTIME_LOCK.read_text()
    except FileNotFoundError:
        return None
    match = CUTOFF_LINE.search(text)
    if match is None:
        raise LockError(
            f"{RUNTIME_LOCK.name} has no '# uploaded-before:' line (edited by hand?): "
            "run with --upgrade to resolve afresh"
        )
    return match.group(1)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def tools_dir() -> pathlib.Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(pathlib.Path.home() / ".cache")
    return pathlib.Path(cache) / "meshward" / "tools" / f"uv-{UV}"


def ensure_uv() -> pathlib.Path:
    """The pinned uv, installed once into its own virtual environment."""
    venv = tools_dir()
    uv = venv / "bin" / "uv"
    if uv.exists():
        return uv
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"uv=={UV}"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if done.returncode != 0:
            raise LockError(
                f"could not install uv {UV} into {venv} (is PyPI reachable?):\n"
                f"{done.stderr.strip()}"
            )
    return uv


def resolve(uv: pathlib.Path, lock: Lock, python: str, cutoff: str) -> str:
    """The lock's text: our header, then uv's pins with every file's hash."""
    command = [
        str(uv),
        "--no-config",
        "pip",
        "compile",
        lock.source,
        "--universal",
        "--python-version",
        python,
        "--generate-hashes",
        "--only-binary",
        ":all:",
        "--exclude-newer",
        cutoff,
        "--default-index",
        INDEX,
        "--no-header",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    done = subprocess.run(
        command,
        input=lock.stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        raise LockError(
            f"uv could not resolve {lock.path.name}:\n{done.stderr.strip()}\n"
            f"If pyproject.toml now asks for a release newer than {cutoff}, run with --upgrade."
        )
    about = textwrap.fill(
        f"{lock.path.name}, generated: do not edit; regenerate with python3 scripts/lock.py. "
        f"It pins {lock.what}, each with the hashes of its files on PyPI, for pip install "
        "--require-hashes.",
        width=98,
        initial_indent="# ",
        subsequent_indent="# ",
    )
    header = (
        f"{about}\n"
        f"# uploaded-before: {cutoff}\n"
        f"# resolver: uv {UV}, universal, Python >= {python}, wheels only, {INDEX}\n"
    )
    return header + done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Regenerate requirements.lock and requirements-build.lock from pyproject.toml"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--upgrade", action="store_true", help="resolve at the current moment: newest releases"
    )
    mode.add_argument(
        "--check", action="store_true", help="change nothing; exit 1 if a lock is out of date"
    )
    args = parser.parse_args(argv)
    stale: list[str] = []
    try:
        pyproject = tomllib.loads(PYPROJECT.read_text())
        python = lowest_python(pyproject)
        cutoff = None if args.upgrade else recorded_cutoff()
        if cutoff is None and args.check:
            raise LockError(f"there is no {RUNTIME_LOCK.name}: run python3 scripts/lock.py")
        cutoff = cutoff or now()
        uv = ensure_uv()
        for lock in locks(pyproject):
            text = resolve(uv, lock, python, cutoff)
            old = lock.path.read_text() if lock.path.exists() else ""
            if text == old:
                print(f"{lock.path.name}: up to date (uploaded-before {cutoff})")
            elif args.check:
                stale.append(lock.path.name)
                diff = difflib.unified_diff(
                    old.splitlines(), text.splitlines(), lock.path.name, "resolved", lineterm=""
                )
                print("\n".join(list(diff)[:60]))
            else:
                lock.path.write_text(text)
                print(f"{lock.path.name}: written (uploaded-before {cutoff})")
    except (LockError, OSError, tomllib.TOMLDecodeError, subprocess.TimeoutExpired) as exc:
        print(f"lock: error: {exc}", file=sys.stderr)
        return 1
    if stale:
        print(
            f"lock: {', '.join(stale)} not what pyproject.toml resolves to: "
            "run python3 scripts/lock.py and commit the result",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
