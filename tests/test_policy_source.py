"""The proxy's file policy source: updates, bad documents, and no policy at all."""

from __future__ import annotations

import asyncio
import pathlib

from meshward.policy import compile as policy_compile
from meshward.policy import compiled, decision
from meshward.policy.resources import DefaultPolicy
from meshward.proxy import policy_source
from tests import builders

DEST = decision.Destination(port=8080, pod="web-0")
CLIENT = decision.Client(identity=None, source_ip="10.1.1.1", tls=False)


def document(default: DefaultPolicy) -> compiled.PolicyDocument:
    settings = policy_compile.Settings(default_policy=default)
    return policy_compile.compile_namespace(builders.state(), settings).document


def write(path: pathlib.Path, text: str) -> None:
    staged = path.with_name(path.name + ".new")
    staged.write_text(text)
    staged.replace(path)  # as the kubelet swaps a mounted ConfigMap


def allows(source: policy_source.FileSource) -> bool | None:
    policy = source.current()
    return None if policy is None else decision.decide(policy, DEST, CLIENT).allowed


async def test_updates_take_effect_within_a_second(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "policy.json"
    write(path, document(DefaultPolicy.ALL_UNAUTHENTICATED).to_json())
    source = policy_source.FileSource(path)
    task = asyncio.ensure_future(source.run())
    try:
        await asyncio.sleep(0.1)
        assert allows(source) is True
        write(path, document(DefaultPolicy.DENY).to_json())
        loop = asyncio.get_running_loop()
        start = loop.time()
        while allows(source) is not False and loop.time() - start < 2:
            await asyncio.sleep(0.05)
        assert allows(source) is False
        assert loop.time() - start < 1.0
        assert source.updates == 2
    finally:
        task.cancel()


def test_a_bad_document_keeps_the_last_valid_policy(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "policy.json"
    write(path, document(DefaultPolicy.ALL_UNAUTHENTICATED).to_json())
    source = policy_source.FileSource(path)
    assert source.poll() and allows(source) is True
    good = document(DefaultPolicy.DENY).to_json()
    for bad in ("{", good.replace('"deny"', '"all-unauthenticated"'), '{"schemaVersion": "v9"}'):
        write(path, bad)
        assert not source.poll()
        assert allows(source) is True
    assert source.refused == 3


def test_no_document_means_no_policy(tmp_path: pathlib.Path) -> None:
    source = policy_source.FileSource(tmp_path / "missing.json")
    assert not source.poll()
    assert source.current() is None
    write(tmp_path / "missing.json", "not json")
    assert not source.poll() and source.current() is None
