"""The committed gRPC stubs are exactly what identity.proto generates (as reputable projects
check in CI): edit the .proto, run ``make proto``, commit both."""

from __future__ import annotations

import pathlib

from meshward.identity._proto import generate

STUBS = ("identity_pb2.py", "identity_pb2.pyi", "identity_pb2_grpc.py")


def test_committed_stubs_match_the_proto(tmp_path: pathlib.Path) -> None:
    generate.generate(tmp_path)
    fresh = tmp_path / generate.PROTO.parent
    for name in STUBS:
        committed = (generate.HERE / name).read_text()
        assert (fresh / name).read_text() == committed, (
            f"{name} is stale: run `make proto` and commit the result"
        )
