"""``meshward dev``: a second control plane beside the session's, and its one-line errors."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import pytest

from meshward import devcluster

pytestmark = pytest.mark.cluster


def meshward(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_up_status_down_beside_another(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "second"
    up = meshward("dev", "up", "--dir", str(state))
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state / 'kubeconfig'}" in up.stdout
    try:
        nodes = subprocess.run(
            ["kubectl", f"--kubeconfig={state / 'kubeconfig'}", "get", "namespace", "default"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert nodes.returncode == 0, nodes.stderr
        status = meshward("dev", "status", "--dir", str(state))
        assert status.returncode == 0
        assert "ready" in status.stdout and "kube-apiserver" in status.stdout
        assert devcluster.load(state) is not None
    finally:
        down = meshward("dev", "down", "--dir", str(state))
    assert down.returncode == 0
    assert not state.exists()
    status = meshward("dev", "status", "--dir", str(state))
    assert status.returncode == 1
    assert "no control plane" in status.stdout


def test_taken_port_is_one_line_naming_the_step(tmp_path: pathlib.Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = meshward("dev", "up", "--dir", str(tmp_path / "x"), "--port", str(port))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "start kube-apiserver" in lines[0] and f"port {port}" in lines[0] and "taken" in lines[0]


def test_missing_binaries_are_one_line_naming_the_step(tmp_path: pathlib.Path) -> None:
    proc = meshward(
        "dev",
        "up",
        "--dir",
        str(tmp_path / "x"),
        env={"KUBEBUILDER_ASSETS": str(tmp_path / "nothing-here")},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("meshward: error: binaries:")
    assert "KUBEBUILDER_ASSETS" in lines[0]


def test_failed_build_step_is_one_line_naming_the_step(tmp_path: pathlib.Path) -> None:
    # An empty cache and a mirror nobody serves: the very first build step fails.
    proc = meshward(
        "dev",
        "build",
        env={
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "MESHWARD_DEBIAN_MIRROR": "http://127.0.0.1:9",
            "KUBEBUILDER_ASSETS": "",
        },
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("meshward: error: apt-get update:")
    assert "127.0.0.1:9" in errors[0]  # the cause, not only the step
    assert "[1/7]" in proc.stderr  # progress was shown before the failure


def test_kubebuilder_assets_are_used(tmp_path: pathlib.Path) -> None:
    found = devcluster.locate()
    assert found is not None
    assets = tmp_path / "assets"
    assets.mkdir()
    for name, path in (("etcd", found.etcd), ("kube-apiserver", found.apiserver)):
        (assets / name).symlink_to(path)
    proc = meshward("dev", "build", env={"KUBEBUILDER_ASSETS": str(assets)})
    assert proc.returncode == 0, proc.stderr
    assert str(assets / "kube-apiserver") in proc.stdout


def test_a_directory_that_is_not_ours_is_never_deleted(tmp_path: pathlib.Path) -> None:
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    up = meshward("dev", "up", "--dir", str(precious))
    assert up.returncode == 1
    assert "is not a meshward control plane directory" in up.stderr
    down = meshward("dev", "down", "--dir", str(precious))
    assert down.returncode == 0
    assert "no control plane" in down.stdout
    assert (precious / "notes.txt").read_text() == "keep me"
