"""One way to reach the Kubernetes API from async code: in-cluster config when running in a pod,
else the kubeconfig named by ``KUBECONFIG`` (or ``~/.kube/config``)."""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client import exceptions

POOL_SIZE = 64
"""Concurrent connections to the API server; the library's default (5 per CPU) queues Certify
calls behind each other's TokenReviews."""


async def connect(pool_size: int = POOL_SIZE) -> client.ApiClient:
    """An ApiClient for the current cluster; close it with ``await api.close()``.

    The proxy environment (``HTTPS_PROXY``, ``NO_PROXY``) is read once here. The library's session
    reads it, and ``~/.netrc``, in a worker thread on every request, which cost a Certify more
    CPU than signing the certificate.
    """
    configuration = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    configuration.connection_pool_maxsize = pool_size
    if not configuration.proxy:
        configuration.proxy = environment_proxy(configuration.host or "")
    api = client.ApiClient(configuration)
    rest = api.rest_client
    # The same connector (TLS context, pool), without the per-request environment lookups; the
    # replaced session owns nothing else and counts as closed once the connector is.
    rest.pool_manager = aiohttp.ClientSession(
        connector=rest.pool_manager.connector, trust_env=False, read_bufsize=2**21
    )
    return api


def environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, honouring ``NO_PROXY``; None for direct."""
    parsed = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    # On Linux this is the environment's NO_PROXY match, the one aiohttp applies too.
    if urllib.request.proxy_bypass(parsed.hostname or "", proxies):
        return None
    return proxies.get(parsed.scheme or "https")


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
