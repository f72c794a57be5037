"""The container image and the dependency locks, as far as they can be checked without Docker.

No Docker engine runs here, so the builder stage is run by hand, from the Dockerfile itself: its
COPY lines fill a context taken from the checkout through .dockerignore, and its RUN lines run in
that context under the stage's ENV, with the image's absolute paths moved under a temporary
directory. The lock installs from PyPI, each file hash-checked, through pip's cache (a second run
downloads nothing); with PyPI unreachable the tests fail and say so, since CI has the network.
Then each entry point's ``--help`` runs from the environment that results, as the image's
ENTRYPOINT would run it. The final stage (base image, apt's iptables, the user) can only be read,
not run: one test reads it and checks it against the UID the injector and proxy-init use.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
from packaging import requirements, utils

from meshward import inject
from meshward.proxy import interception
from tests import kubetest

ROOT = kubetest.ROOT
DOCKERFILE = ROOT / "Dockerfile"
PYPI = "https://pypi.org/simple/"
KEEP_PIP_SETTINGS = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_CACHE_DIR", "PIP_PROXY"}
"""How pip reaches PyPI here; every other pip setting of this machine stays out of the build."""
STEP_TIMEOUT = 600


@dataclasses.dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    instructions: tuple[Instruction, ...]

    def all(self, keyword: str) -> list[str]:
        return [i.arguments for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        pairs = (p.partition("=") for e in self.all("ENV") for p in shlex.split(e))
        return {key: value for key, _, value in pairs}


def stages(text: str) -> list[Stage]:
    """The Dockerfile's stages; continued lines joined, comment lines dropped as Docker does."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "the Dockerfile ends in a continued line"
    found: list[Stage] = []
    for line in lines:
        keyword, _, arguments = line.partition(" ")
        keyword, arguments = keyword.upper(), arguments.strip()
        if keyword == "FROM":
            name = arguments.split()[-1] if " as " in arguments.lower() else str(len(found))
            found.append(Stage(name, ()))
        elif found:
            last = found[-1]
            found[-1] = Stage(last.name, (*last.instructions, Instruction(keyword, arguments)))
    return found


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, pattern) per line of .dockerignore, in Docker's glob syntax (``**`` included)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        glob = line.removeprefix("!").strip().strip("/")
        regex, i = "", 0
        while i < len(glob):
            if glob.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif glob.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif glob[i] == "[":
                end = glob.index("]", i)
                regex, i = regex + "[" + glob[i + 1 : end].replace("!", "^", 1) + "]", end + 1
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(glob[i], re.escape(glob[i]))
                i += 1
        rules.append((negated, re.compile(regex)))
    return rules


def ignored_by_docker(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves ``path`` out of the context: the last rule matching it, or one of
    its parent directories, decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negated, pattern in rules:
        if any(pattern.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def pip_environment() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if (not k.startswith("PIP_") or k in KEEP_PIP_SETTINGS)
        and k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def require_pypi() -> None:
    try:
        with urllib.request.urlopen(PYPI + "pip/", timeout=20) as answer:
            answer.read(1)
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        pytest.fail(
            f"PyPI ({PYPI}) is unreachable: {exc}. These tests install requirements.lock from "
            "it as the image's builder does (pip's cache spares the downloads, not the index); "
            "run them where PyPI can be reached"
        )


@dataclasses.dataclass(frozen=True)
class Built:
    """The builder stage's result: its runtime virtual environment, and where the image's
    absolute paths were moved to."""

    root: pathlib.Path
    venv: pathlib.Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, capture_output=True, text=True, cwd=self.root, env=pip_environment(), timeout=120
        )


def run_builder(root: pathlib.Path) -> Built:
    """Every instruction of the Dockerfile's builder stage, under ``root``."""
    builder = next((s for s in stages(DOCKERFILE.read_text()) if s.name == "builder"), None)
    assert builder is not None, "the Dockerfile has no stage named builder (FROM ... AS builder)"
    rules = dockerignore_rules()
    env = pip_environment()
    workdir = root

    def inside(path: str) -> pathlib.Path:
        return root / path.lstrip("/") if path.startswith("/") else workdir / path

    def ignore(directory: str, names: list[str]) -> set[str]:
        where = pathlib.Path(directory).relative_to(ROOT)
        return {n for n in names if ignored_by_docker((where / n).as_posix(), rules)}

    for step in builder.instructions:
        if step.keyword == "ENV":
            for pair in shlex.split(step.arguments):
                key, _, value = pair.partition("=")
                env[key] = str(inside(value)) if value.startswith("/") else value
        elif step.keyword == "WORKDIR":
            workdir = inside(step.arguments)
            workdir.mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            *sources, target = shlex.split(step.arguments)
            assert not any(s.startswith("--") for s in sources), f"COPY {step.arguments}"
            for source in sources:
                name = source.strip("/")
                assert not ignored_by_docker(name, rules), (
                    f"COPY {source}: .dockerignore leaves it out of the build context"
                )
                if (ROOT / name).is_dir():
                    shutil.copytree(
                        ROOT / name,
                        inside(target),
                        symlinks=True,
                        ignore=ignore,
                        dirs_exist_ok=True,
                    )
                else:
                    inside(target).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / name, inside(target) / pathlib.Path(name).name)
        elif step.keyword == "RUN":
            command = re.sub(r"^(--\S+\s+)+", "", step.arguments)
            done = subprocess.run(
                ["/bin/sh", "-c", command],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
            )
            assert done.returncode == 0, (
                f"RUN {command}\nexited {done.returncode}:\n{done.stdout[-3000:]}"
                f"{done.stderr[-3000:]}"
            )
        else:
            pytest.fail(f"the builder stage has a {step.keyword} this test does not run: teach it")
    return Built(root, pathlib.Path(env["VIRTUAL_ENV"]))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    require_pypi()
    return run_builder(tmp_path_factory.mktemp("image"))


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ((), "usage: meshward [-h] COMMAND"),
        (("operator",), "usage: meshward operator"),
        (("identity", "serve"), "usage: meshward identity serve"),
        (("policy", "serve"), "usage: meshward policy serve"),
        (("proxy",), "usage: meshward proxy"),
        (("proxy-init",), "usage: meshward proxy-init"),
    ],
    ids=["meshward", "operator", "identity-serve", "policy-serve", "proxy", "proxy-init"],
)
def test_entry_point_prints_its_usage(built: Built, command: tuple[str, ...], usage: str) -> None:
    done = built.run(str(built.venv / "bin" / "meshward"), *command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(usage), done.stdout[:300]


def test_proxy_init_dry_run_exempts_the_proxy_uid(built: Built) -> None:
    done = built.run(str(built.venv / "bin" / "meshward"), "proxy-init", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"--uid-owner {interception.PROXY_UID} -j RETURN" in done.stdout


def test_installed_wheel_ships_the_crds(built: Built) -> None:
    """``meshward install`` reads the CRDs from the installed package: they must be files in it,
    the same as crds/ in the checkout, and no link back to a checkout."""
    script = (
        "import importlib.resources, json, meshward\n"
        "crds = importlib.resources.files('meshward') / 'crds'\n"
        "print(json.dumps({'package': meshward.__file__,"
        " 'crds': {p.name: p.read_text() for p in crds.iterdir()}}))\n"
    )
    done = built.run(str(built.venv / "bin" / "python"), "-I", "-c", script)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    package = pathlib.Path(found["package"])
    assert package.is_relative_to(built.venv), f"meshward imported from {package}, not the venv"
    assert not (package.parent / "crds").is_symlink()
    expected = {p.name: p.read_text() for p in sorted((ROOT / "crds").glob("*.yaml"))}
    assert expected and found["crds"] == expected


@dataclasses.dataclass(frozen=True)
class Pin:
    version: str
    hashes: tuple[str, ...]


def pins(lock: pathlib.Path) -> dict[str, list[Pin]]:
    """Each requirement of a lock by its normalized name; every one must be ``==`` with hashes."""
    text = re.sub(r"\\\n", " ", lock.read_text())
    found: dict[str, list[Pin]] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split(" --hash=")
        parsed = requirements.Requirement(requirement)
        specs = list(parsed.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, (
            f"{lock.name}: {requirement!r} is not pinned to one version with =="
        )
        hashes = tuple(o.strip() for o in options)
        assert hashes and all(h.startswith("sha256:") for h in hashes), (
            f"{lock.name}: {parsed.name} has no sha256 hashes"
        )
        found.setdefault(utils.canonicalize_name(parsed.name), []).append(
            Pin(specs[0].version, hashes)
        )
    return found


def project_dependencies(table: dict[str, object]) -> list[str]:
    project = table["project"]
    assert isinstance(project, dict)
    return list(project["dependencies"])


def build_requirements(table: dict[str, object]) -> list[str]:
    build = table["build-system"]
    assert isinstance(build, dict)
    return list(build["requires"])


@pytest.mark.parametrize(
    ("lock", "declared"),
    [("requirements.lock", project_dependencies), ("requirements-build.lock", build_requirements)],
)
def test_lock_pins_every_declared_dependency(
    lock: str, declared: Callable[[dict[str, object]], list[str]]
) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pinned = pins(ROOT / lock)
    for dependency in declared(pyproject):
        wanted = requirements.Requirement(dependency)
        found = pinned.get(utils.canonicalize_name(wanted.name), [])
        assert len(found) == 1, (
            f"{lock} pins {wanted.name} {len(found)} times, not once: "
            "run python3 scripts/lock.py after changing pyproject.toml"
        )
        assert wanted.specifier.contains(found[0].version, prereleases=True), (
            f"{lock} pins {wanted.name}=={found[0].version}, outside pyproject.toml's "
            f"{wanted.specifier}: run python3 scripts/lock.py"
        )


def test_locks_are_what_pyproject_resolves_to() -> None:
    """The locks hold no hand edits and no drift: resolving pyproject.toml again, as of the
    moment recorded in them, gives the same bytes (needs PyPI, and uv, installed on first use)."""
    require_pypi()
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "lock.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_image_runs_as_the_proxy_uid_with_iptables_and_the_builders_venv() -> None:
    """The final stage, read: its user is the UID the injector gives the proxy and proxy-init
    exempts, it has iptables for proxy-init, and its entry point is the builder's meshward."""
    found = stages(DOCKERFILE.read_text())
    final = found[-1]
    uid = inject.Settings.defaults("cluster.local", "0.0.0").proxy_uid
    assert uid == interception.PROXY_UID
    assert final.all("USER") == [f"{uid}:{uid}"]
    setup = " ".join(final.all("RUN"))
    assert re.search(r"apt-get install [^&]*\biptables\b", setup), setup
    assert re.search(rf"useradd [^&]*--uid {uid}\b", setup), setup
    assert [json.loads(e) for e in final.all("ENTRYPOINT")] == [["meshward"]]
    venv = found[0].env()["VIRTUAL_ENV"]
    assert f"--from=builder {venv} {venv}" in final.all("COPY")
    assert final.env()["PATH"] == f"{venv}/bin:$PATH"
