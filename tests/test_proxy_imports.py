"""Every module of the proxy imports on its own, in a fresh interpreter: an import cycle only
shows when the cycle's modules are entered in a particular order (``from meshward.proxy import
transparent`` first, say), which a test session that imported them in another order hides."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import meshward.proxy

MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(meshward.proxy.__path__, "meshward.proxy.")
    if info.name != "meshward.proxy.__main__"  # runs the proxy when imported
)


def test_the_modules_are_found() -> None:
    # A broken discovery would make every parametrized test below vanish, not fail.
    assert {"meshward.proxy.transparent", "meshward.proxy.networks"} <= set(MODULES)
    assert len(MODULES) > 20


@pytest.mark.parametrize("module", MODULES)
def test_the_module_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"import {module} failed:\n{done.stderr[-2000:]}"
