"""The proxy's workload identity against the real identity service and API server."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import stat
from collections.abc import AsyncIterator, Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from meshward.identity import pki
from meshward.proxy import identity, settings
from tests.test_identity_service import IdentityService, init_trust, name, token_for

pytestmark = pytest.mark.cluster


def proxy_settings(
    tmp: pathlib.Path,
    svc: IdentityService,
    token: str,
    local_name: str,
    anchors: bytes | None = None,
) -> settings.ProxySettings:
    (tmp / "identity").mkdir(exist_ok=True)
    (tmp / "token").write_text(token)
    return settings.ProxySettings(
        identity_dir=tmp / "identity",
        trust_anchors=anchors or (svc.trust / "ca-bundle.crt").read_bytes(),
        token_file=tmp / "token",
        local_name=local_name,
        trust_domain="cluster.local",
        identity_svc_addr=settings.Address("127.0.0.1", svc.port),
        identity_svc_name="localhost",
    )


@pytest.fixture
def service(kubeconfig: pathlib.Path, tmp_path: pathlib.Path) -> Iterator[IdentityService]:
    svc = IdentityService(kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "identity.log")
    svc.start()
    yield svc
    svc.stop()


@contextlib.asynccontextmanager
async def running(workload: identity.WorkloadIdentity) -> AsyncIterator[asyncio.Task[None]]:
    """The renewal loop, cancelled and its channel closed however the test ends."""
    task = asyncio.get_running_loop().create_task(workload.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await workload.close()


async def test_gets_a_certificate_for_its_own_key(
    service: IdentityService, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    config = proxy_settings(
        tmp_path, service, token_for(core, namespace, "web"), name("web", namespace)
    )
    workload = identity.WorkloadIdentity(config)
    async with running(workload):
        await asyncio.wait_for(workload.ready.wait(), 20)
    assert workload.current is not None
    assert pki.spiffe_id(workload.current.leaf) == f"spiffe://cluster.local/ns/{namespace}/sa/web"
    key_file = config.identity_dir / identity.KEY_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    loaded = serialization.load_pem_private_key(pem, None)
    assert (
        loaded.public_key().public_numbers() == workload.current.leaf.public_key().public_numbers()
    )
    pki.verify_chain(workload.current.leaf, workload.current.intermediates, workload.anchors)


async def test_renews_before_expiry(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    svc = IdentityService(
        kubeconfig,
        init_trust(tmp_path / "trust"),
        tmp_path / "identity.log",
        extra=("--lifetime", "14s"),
    )
    svc.start()
    try:
        config = proxy_settings(
            tmp_path, svc, token_for(core, namespace, "web"), name("web", namespace)
        )
        workload = identity.WorkloadIdentity(config, jitter=lambda: 0.0)
        async with running(workload):
            await asyncio.wait_for(workload.ready.wait(), 20)
            first = workload.current
            assert first is not None
            deadline = asyncio.get_running_loop().time() + 25
            while workload.renewals < 2 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
            assert workload.renewals >= 2
            assert workload.current is not None and workload.current.leaf != first.leaf
            # renewed while the first was still valid: the new leaf was issued before it expired
            issued = workload.current.leaf.not_valid_before_utc + pki.CLOCK_SKEW
            assert issued < first.not_after
            assert workload.failures == 0
    finally:
        svc.stop()


async def test_waits_for_a_late_identity_service(
    kubeconfig: pathlib.Path, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    svc = IdentityService(kubeconfig, init_trust(tmp_path / "trust"), tmp_path / "identity.log")
    config = proxy_settings(
        tmp_path, svc, token_for(core, namespace, "web"), name("web", namespace)
    )
    workload = identity.WorkloadIdentity(config)
    async with running(workload):
        await asyncio.sleep(2)
        assert not workload.ready.is_set() and workload.failures >= 1
        svc.start()
        try:
            await asyncio.wait_for(workload.ready.wait(), 30)
        finally:
            svc.stop()
    assert workload.current is not None


async def test_refuses_a_service_of_another_mesh(
    service: IdentityService, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    foreign = init_trust(tmp_path / "foreign")
    config = proxy_settings(
        tmp_path,
        service,
        token_for(core, namespace, "web"),
        name("web", namespace),
        anchors=(foreign / "ca-bundle.crt").read_bytes(),
    )
    workload = identity.WorkloadIdentity(config)
    async with running(workload):
        await asyncio.sleep(3)
        assert not workload.ready.is_set()
        assert workload.failures >= 1
    assert workload.current is None


async def test_a_token_of_another_account_gets_nothing(
    service: IdentityService, core: client.CoreV1Api, namespace: str, tmp_path: pathlib.Path
) -> None:
    config = proxy_settings(
        tmp_path, service, token_for(core, namespace, "other"), name("web", namespace)
    )
    workload = identity.WorkloadIdentity(config)
    async with running(workload):
        await asyncio.sleep(3)
        assert not workload.ready.is_set() and workload.failures >= 1
    assert (
        "PERMISSION_DENIED" in service.log.read_text()
        or "may not request" in service.log.read_text()
    )
