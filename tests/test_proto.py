"""The committed gRPC stubs are exactly what their .proto files generate (as reputable projects
check in CI): edit a .proto, run ``make proto``, commit both."""

from __future__ import annotations

import pathlib

import pytest

from meshward.identity._proto import generate


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("stubs")
    generate.generate(out)
    return out


@pytest.mark.parametrize("proto", generate.PROTOS, ids=lambda p: p.name)
def test_committed_stubs_match_the_proto(fresh: pathlib.Path, proto: pathlib.Path) -> None:
    for name in generate.stubs(proto):
        committed = generate.ROOT / proto.parent / name
        assert committed.exists(), f"{committed} is missing: run `make proto` and commit it"
        assert (fresh / proto.parent / name).read_text() == committed.read_text(), (
            f"{proto.parent / name} is stale: run `make proto` and commit the result"
        )


def test_every_proto_in_the_tree_is_generated() -> None:
    found = {p.relative_to(generate.ROOT) for p in (generate.ROOT / "meshward").rglob("*.proto")}
    assert found == set(generate.PROTOS), "add the new .proto to generate.PROTOS"
