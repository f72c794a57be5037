"""One way to reach the Kubernetes API from async code: in-cluster config when running in a pod,
else the kubeconfig named by ``KUBECONFIG`` (or ``~/.kube/config``)."""

from __future__ import annotations

import json
import os
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import exceptions


async def connect() -> client.ApiClient:
    """An ApiClient for the current cluster; close it with ``await api.close()``."""
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    return client.ApiClient(configuration)


def to_dict(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    """A generated model object as the plain camelCase dict the API server sent."""
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


def api_message(exc: BaseException) -> str:
    """The API server's own message from an ApiException, for error text a person reads."""
    if isinstance(exc, exceptions.ApiException):
        try:
            return str(json.loads(exc.body or "{}").get("message") or exc.reason)
        except ValueError:
            return str(exc.reason)
    return str(exc)
