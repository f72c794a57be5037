"""meshward.kube.connect against the real API server: the proxy environment is honoured (read once,
at connect), and ``NO_PROXY`` still sends the API server's own address direct."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import pytest
from kubernetes_asyncio import client

from meshward import kube


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that records each tunnel's target and relays the bytes."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            writer.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        await asyncio.gather(
            self._relay(reader, up_writer), self._relay(up_reader, writer), return_exceptions=True
        )


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    relay = ConnectProxy()
    relay.server = await asyncio.start_server(relay.handle, "127.0.0.1", 0)
    try:
        yield relay
    finally:
        relay.server.close()
        await relay.server.wait_closed()


async def list_namespaces(kubeconfig: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api = await kube.connect()
    try:
        namespaces = await client.CoreV1Api(api).list_namespace()
        return {ns.metadata.name for ns in namespaces.items}
    finally:
        await api.close()


async def test_https_proxy_from_the_environment_carries_the_api_calls(
    kubeconfig: pathlib.Path, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NO_PROXY", "no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    assert "kube-system" in await list_namespaces(kubeconfig, monkeypatch)
    assert len(proxy.targets) >= 1
    assert all(target.startswith("127.0.0.1:") for target in proxy.targets)


async def test_no_proxy_sends_the_api_server_direct(
    kubeconfig: pathlib.Path, proxy: ConnectProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("no_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
    assert "kube-system" in await list_namespaces(kubeconfig, monkeypatch)
    assert proxy.targets == []


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "https://10.0.0.1:6443", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "https://10.0.0.1:6443", "http://proxy:3128"),
        ({"https_proxy": "http://proxy:3128"}, "https://api.example:6443", "http://proxy:3128"),
        (
            {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".example"},
            "https://api.example:6443",
            None,
        ),
        ({"HTTP_PROXY": "http://proxy:3128"}, "https://10.0.0.1:6443", None),
    ],
)
def test_environment_proxy_follows_the_usual_variables(
    env: dict[str, str], url: str, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert kube.environment_proxy(url) == expected
