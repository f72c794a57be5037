"""Regenerate the gRPC stubs from identity.proto: ``python -m meshward.identity._proto.generate``.

The stubs are committed (so installing meshward needs no protoc); ``make proto`` runs this, and a
test regenerates into a temporary directory and fails if the committed files differ. The output
depends only on the .proto and on the grpcio-tools version pinned in pyproject.toml.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROTO = HERE.relative_to(ROOT) / "identity.proto"


def generate(out: pathlib.Path) -> None:
    """Write identity_pb2.py, identity_pb2.pyi and identity_pb2_grpc.py under ``out`` (a root)."""
    import grpc_tools
    from grpc_tools import protoc  # a build-time tool: only this script needs it

    includes = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{ROOT}",
            f"-I{includes}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO),
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit status {code}")


if __name__ == "__main__":
    generate(ROOT if len(sys.argv) < 2 else pathlib.Path(sys.argv[1]))
