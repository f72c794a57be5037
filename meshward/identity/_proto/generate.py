"""Regenerate every gRPC stub meshward commits: ``python -m meshward.identity._proto.generate``.

The stubs are committed (so installing meshward needs no protoc); ``make proto`` runs this, and a
test regenerates into a temporary directory and fails if the committed files differ. The output
depends only on the .proto files and on the grpcio-tools version pinned in pyproject.toml. Each
.proto's stubs are written beside it: ``<name>_pb2.py``, ``<name>_pb2.pyi``, ``<name>_pb2_grpc.py``.
"""

from __future__ import annotations

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
PROTOS = (
    pathlib.Path("meshward/identity/_proto/identity.proto"),
    pathlib.Path("meshward/policyserver/_proto/policy.proto"),
)
"""Relative to the repository root, which is also the import root the stubs are generated for."""


def stubs(proto: pathlib.Path) -> tuple[str, str, str]:
    """The file names generated for ``proto``."""
    return (f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi", f"{proto.stem}_pb2_grpc.py")


def generate(out: pathlib.Path) -> None:
    """Write the stubs of every proto in PROTOS under ``out`` (a root, laid out like ROOT)."""
    import grpc_tools
    from grpc_tools import protoc  # a build-time tool: only this script needs it

    includes = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for proto in PROTOS:
        code = protoc.main(
            [
                "protoc",
                f"-I{ROOT}",
                f"-I{includes}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                str(proto),
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {proto} with exit status {code}")


if __name__ == "__main__":
    generate(ROOT if len(sys.argv) < 2 else pathlib.Path(sys.argv[1]))
