"""The ``meshward`` command line as a pod runs it: the data-plane commands stay lean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CONTROL_PLANE_LIBRARIES = ("kopf", "kubernetes_asyncio", "kubernetes", "aiohttp", "yaml")

PROBE = """
import json, sys
from meshward import cli
try:
    status = cli.main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code
loaded = [name for name in {libraries!r} if name in sys.modules]
print(json.dumps({{"status": status, "loaded": loaded}}))
"""


def run(*argv: str) -> dict[str, object]:
    code = PROBE.format(libraries=CONTROL_PLANE_LIBRARIES)
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize(
    "argv",
    [
        ("proxy", "--help"),
        ("proxy-init", "--dry-run"),
    ],
)
def test_the_commands_a_pod_runs_load_no_control_plane_library(argv: tuple[str, ...]) -> None:
    result = run(*argv)
    assert result["status"] == 0
    assert result["loaded"] == []


def test_the_other_commands_are_all_there() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshward", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    for command in ("operator", "identity", "proxy", "proxy-init", "inject", "policy", "check"):
        assert command in done.stdout
    assert run("inject", "--help")["status"] == 0
