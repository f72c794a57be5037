"""``meshward identity`` commands and the service's pure pieces, without a cluster."""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import stat
import subprocess
import sys

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from meshward import errors
from meshward.identity import commands, pki, server, tokens


def meshward(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshward", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("30m", 1800), ("24h", 86400), ("90d", 7776000)]
)
def test_durations(text: str, seconds: int) -> None:
    assert commands.duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["0d", "0s", "99999999999d", "1y", "-1h", "h", ""])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"duration|more than zero"):
        commands.duration(text)


def test_bad_lifetime_flag_is_one_line(tmp_path: pathlib.Path) -> None:
    proc = meshward("identity", "init", "--out", str(tmp_path), "--anchor-lifetime", "0d")
    assert proc.returncode == 2
    assert "more than zero" in proc.stderr and "Traceback" not in proc.stderr


def test_init_keys_are_private_even_over_looser_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "tls.key").write_text("old")
    (tmp_path / "tls.key").chmod(0o644)
    refused = meshward("identity", "init", "--out", str(tmp_path))
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert (tmp_path / "tls.key").read_text() == "old"
    forced = meshward("identity", "init", "--out", str(tmp_path), "--force")
    assert forced.returncode == 0, forced.stderr
    for key in ("tls.key", "anchor.key"):
        assert stat.S_IMODE((tmp_path / key).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca-bundle.crt").stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_inspect_an_issuer_chain_and_der(tmp_path: pathlib.Path) -> None:
    assert meshward("identity", "init", "--out", str(tmp_path)).returncode == 0
    issuer = meshward(
        "identity",
        "inspect",
        str(tmp_path / "tls.crt"),
        "--anchors",
        str(tmp_path / "ca-bundle.crt"),
    )
    assert issuer.returncode == 0, issuer.stdout + issuer.stderr
    assert "[0] CA" in issuer.stdout and "chain: verifies" in issuer.stdout
    cert = pki.load_certificates((tmp_path / "tls.crt").read_bytes())[0]
    (tmp_path / "issuer.der").write_bytes(cert.public_bytes(serialization.Encoding.DER))
    der = meshward("identity", "inspect", str(tmp_path / "issuer.der"))
    assert der.returncode == 0, der.stderr
    assert "issuer.identity.meshward.cluster.local" in der.stdout
    missing = meshward(
        "identity", "inspect", str(tmp_path / "tls.crt"), "--anchors", str(tmp_path / "nope.crt")
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"meshward: error: can not read {tmp_path / 'nope.crt'}: No such file or directory"
    ]


def test_serve_refuses_an_expired_issuer(tmp_path: pathlib.Path) -> None:
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    anchor, anchor_key = pki.new_trust_anchor(
        "cluster.local", datetime.timedelta(days=365), now=past
    )
    issuer, issuer_key = pki.new_issuer(
        anchor, anchor_key, "cluster.local", datetime.timedelta(days=1), now=past
    )
    (tmp_path / "ca-bundle.crt").write_bytes(pki.to_pem(anchor))
    (tmp_path / "tls.crt").write_bytes(pki.to_pem(issuer))
    (tmp_path / "tls.key").write_bytes(pki.key_to_pem(issuer_key))
    proc = meshward(
        "identity",
        "serve",
        "--issuer-dir",
        str(tmp_path),
        "--trust-anchors",
        str(tmp_path / "ca-bundle.crt"),
        "--addr",
        "127.0.0.1:0",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("meshward: error:") and "expired" in last


@pytest.mark.parametrize(
    ("username", "expected"),
    [
        ("system:serviceaccount:emojivoto:web", tokens.ServiceAccount("emojivoto", "web")),
        ("system:serviceaccount:a:b", tokens.ServiceAccount("a", "b")),
    ],
)
def test_usernames_of_service_accounts(username: str, expected: tokens.ServiceAccount) -> None:
    assert tokens.parse_username(username) == expected


@pytest.mark.parametrize(
    "username",
    [
        "admin",
        "system:serviceaccount:ns",
        "system:serviceaccount:ns:sa:x",
        "system:serviceaccount:NS:sa",
        "system:serviceaccount::sa",
        "system:node:worker",
    ],
)
def test_other_usernames_are_rejected(username: str) -> None:
    with pytest.raises(errors.TokenRejected):
        tokens.parse_username(username)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidCSR("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.InvalidIdentity("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.TokenRejected("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.IdentityMismatch("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.ClusterUnreachable("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.IssuerError("x"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_errors_map_to_grpc_codes(exc: errors.MeshwardError, code: grpc.StatusCode) -> None:
    assert server.status_for(exc) == code
