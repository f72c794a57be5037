"""Fixtures: one real control plane per test run, a namespace per test, the operator process.

``MESHWARD_TEST_KUBECONFIG=<path>`` runs the same tests against an existing cluster instead of
starting one (the CRDs are applied to it; the operator runs locally against it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from kubernetes import client, config

from meshward import devcluster, inject
from meshward.operator import _settings
from tests import kubetest


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    existing = os.environ.get("MESHWARD_TEST_KUBECONFIG")
    if existing:
        yield pathlib.Path(existing)
        return
    directory = tmp_path_factory.mktemp("control-plane")
    cluster = devcluster.up(directory)
    try:
        yield cluster.kubeconfig
    finally:
        devcluster.down(directory)


@pytest.fixture(scope="session")
def kubectl(kubeconfig: pathlib.Path) -> kubetest.Kubectl:
    return kubetest.Kubectl(kubeconfig)


@pytest.fixture(scope="session")
def api(kubeconfig: pathlib.Path) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(config_file=str(kubeconfig))
    yield api
    api.close()


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="session")
def crds(kubectl: kubetest.Kubectl) -> None:
    kubectl.run("apply", "-f", str(kubetest.ROOT / "crds"))
    kubectl.run(
        "wait", "--for=condition=established", "--timeout=30s", "-f", str(kubetest.ROOT / "crds")
    )


@pytest.fixture(scope="session")
def operator(
    kubeconfig: pathlib.Path,
    crds: None,
    core: client.CoreV1Api,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[kubetest.Operator]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = kubetest.Operator(kubeconfig, log)
    admission = client.AdmissionregistrationV1Api(core.api_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=op.root_namespace)))
    op.start()
    try:
        kubetest.wait_document(
            core, op.root_namespace, what="the operator's first document", timeout=60
        )
        kubetest.wait_for(
            f"the validating webhook configuration {op.webhook_name}",
            lambda: admission.read_validating_webhook_configuration(op.webhook_name),
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{op.log_tail()}") from exc
    yield op
    op.stop()
    admission.delete_validating_webhook_configuration(op.webhook_name)
    with contextlib.suppress(client.exceptions.ApiException):  # made by the injector
        admission.delete_mutating_webhook_configuration(op.webhook_name)
    core.delete_namespace(op.root_namespace)


@pytest.fixture(scope="session")
def injector(operator: kubetest.Operator, core: client.CoreV1Api) -> inject.Settings:
    """The session operator's injector, answering the API server; its settings."""
    name = f"t-inject-ready-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        kubetest.wait_service_account(core, name)
        kubetest.wait_injecting(core, name, "the session operator's injector")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\noperator log:\n{operator.log_tail()}") from exc
    finally:
        core.delete_namespace(name)
    return _settings.injector_from_env(operator.env())


@pytest.fixture
def namespace(request: pytest.FixtureRequest, core: client.CoreV1Api) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (deletion is not awaited). Tests
    marked ``unmanaged`` get one the test operator leaves alone (:data:`kubetest.UNMANAGED`)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    prefix = kubetest.UNMANAGED if request.node.get_closest_marker("unmanaged") else "t-"
    name = f"{prefix}{slug}-{uuid.uuid4().hex[:5]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
async def echo() -> AsyncIterator[int]:
    """An application on loopback that echoes what it reads; yields its port."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
