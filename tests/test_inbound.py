"""The inbound side over real loopback sockets and real TLS: who reaches the application."""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshward.identity import pki
from meshward.policy import compile as policy_compile
from meshward.policy import decision
from meshward.policy.resources import DefaultPolicy
from meshward.proxy import inbound, tls
from tests import builders
from tests.test_proxy_tls import Mesh


def compiled(
    *items: object, default: DefaultPolicy = DefaultPolicy.DENY, mesh: tuple[object, ...] = ()
) -> decision.Policy:
    settings = policy_compile.Settings(default_policy=default, cluster_networks=("127.0.0.0/8",))
    state = builders.state(*items, mesh=mesh)  # type: ignore[arg-type]
    return decision.Policy(policy_compile.compile_namespace(state, settings).document)


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def sink(received: list[bytes]) -> Handler:
    """An application that records everything it is sent."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()

    return handle


@contextlib.asynccontextmanager
async def workload(
    tmp: pathlib.Path, mesh: Mesh, policy: decision.Policy | None, application: Handler = echo
) -> AsyncIterator[tuple[int, inbound.Inbound]]:
    """An application (echo by default) behind an inbound proxy for pod web-0 (app=web);
    yields the proxy's port and the proxy."""
    app = await asyncio.start_server(application, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    own = mesh.workload(tmp / "web-proxy", "web", ns=builders.NS)

    def server_context(require: bool) -> ssl.SSLContext:
        return tls.server_context(
            tmp / "web-proxy", own, mesh.anchors, require_client_certificate=require
        )

    proxy = inbound.Inbound(
        policy=lambda: policy, server_context=server_context, pod="web-0", labels={"app": "web"}
    )
    server = await proxy.serve("127.0.0.1", 0, app_port, policy_port=8080)
    try:
        yield server.port, proxy
    finally:
        server.close()
        await server.wait_closed()
        app.close()


async def settled(proxy: inbound.Inbound) -> inbound.Counters:
    """The counters once every accepted connection has an outcome (the proxy may still be
    finishing a handshake the client already gave up on)."""
    c = proxy.counters
    for _ in range(100):
        decided = c.allowed + c.denied + c.per_request
        if c.accepted == decided + c.plaintext_refused + c.handshake_failed:
            break
        await asyncio.sleep(0.05)
    return c


async def talk(port: int, ctx: ssl.SSLContext | None) -> bytes:
    """Send a line and read until the proxy or the echo closes; b'' means nothing came back."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        writer.write(b"ping\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        return data
    except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
        return b""


def client(tmp: pathlib.Path, mesh: Mesh, sa: str) -> ssl.SSLContext:
    directory = tmp / f"client-{sa}-{uuid.uuid4().hex[:6]}"
    certified = mesh.workload(directory, sa, ns=builders.NS)
    return tls.client_context(directory, certified, mesh.anchors)


STRICT = (builders.peer("mesh", "STRICT", ns="meshward"),)
ALLOW_VOTE_BOT = (
    builders.server("web-http", 8080),
    builders.authz("web-from-vote-bot", {"meshTLS": {"identities": [builders.ident("vote-bot")]}}),
)


async def test_strict_allows_the_authorized_identity_only(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    policy = compiled(*ALLOW_VOTE_BOT, mesh=STRICT)
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b"ping\n"
        assert await talk(port, client(tmp_path, mesh, "intruder")) == b""
        assert await talk(port, None) == b""  # plaintext under STRICT
        assert await talk(port, client(tmp_path, Mesh(), "vote-bot")) == b""  # another mesh
        c = await settled(proxy)
    assert (c.accepted, c.allowed, c.denied, c.plaintext_refused, c.handshake_failed) == (
        4,
        1,
        1,
        1,
        1,
    ), c


async def test_permissive_serves_plaintext_and_tls(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    policy = compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED)
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        assert await talk(port, None) == b"ping\n"
        assert await talk(port, client(tmp_path, mesh, "anyone")) == b"ping\n"
    assert proxy.counters.allowed == 2


async def test_identity_rules_can_not_be_met_in_plaintext(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    policy = compiled(*ALLOW_VOTE_BOT)  # PERMISSIVE: plaintext is accepted, but carries no identity
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        assert await talk(port, None) == b""
        assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b"ping\n"
    assert (proxy.counters.denied, proxy.counters.allowed) == (1, 1)


async def test_no_policy_denies_everything(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    async with workload(tmp_path, mesh, None) as (port, proxy):
        assert await talk(port, None) == b""
        assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b""
    assert proxy.counters.allowed == 0


async def test_denied_connections_get_no_byte_through(tmp_path: pathlib.Path) -> None:
    received: list[bytes] = []
    policy = compiled(*ALLOW_VOTE_BOT, mesh=STRICT)
    mesh = Mesh()
    async with workload(tmp_path, mesh, policy, sink(received)) as (port, _):
        assert await talk(port, client(tmp_path, mesh, "intruder")) == b""
        await asyncio.sleep(0.2)
    assert received == []


def _client_trusting(tmp: pathlib.Path, mesh: Mesh, ours: Mesh, sa: str) -> ssl.SSLContext:
    """A client certified by ``mesh`` that trusts ``ours`` (so only the proxy can refuse it)."""
    directory = tmp / f"client-{sa}-{uuid.uuid4().hex[:6]}"
    certified = mesh.workload(directory, sa, ns=builders.NS)
    return tls.client_context(directory, certified, ours.anchors)


async def test_the_proxy_itself_refuses_a_client_of_another_mesh(tmp_path: pathlib.Path) -> None:
    ours = Mesh()
    async with workload(tmp_path, ours, compiled(*ALLOW_VOTE_BOT, mesh=STRICT)) as (port, proxy):
        assert await talk(port, _client_trusting(tmp_path, Mesh(), ours, "vote-bot")) == b""
        c = await settled(proxy)
    assert (c.allowed, c.handshake_failed) == (0, 1)


async def test_a_certificate_without_mesh_identity_is_denied_and_serving_goes_on(
    tmp_path: pathlib.Path,
) -> None:
    import datetime

    mesh = Mesh()
    directory = tmp_path / "no-spiffe"
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    # Chains to the anchors, may authenticate clients, but names no mesh identity.
    cert = pki._end_entity(
        mesh.issuer,
        key.public_key(),
        sans=[x509.DNSName("client.example")],
        usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
        not_before=now - datetime.timedelta(minutes=1),
        not_after=now + datetime.timedelta(hours=1),
    )
    (directory / "chain.pem").write_bytes(pki.to_pem(cert, mesh.issuer.certificate))
    (directory / "key.pem").write_bytes(pki.key_to_pem(key))
    odd = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    odd.check_hostname = False
    odd.load_verify_locations(cadata=mesh.anchors.decode())
    odd.load_cert_chain(directory / "chain.pem", directory / "key.pem")
    policy = compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED)
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        for _ in range(3):
            assert await talk(port, odd) == b""
        assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b"ping\n"
        c = await settled(proxy)
    assert (c.denied, c.allowed) == (3, 1)


@pytest.mark.parametrize(
    ("default", "reply"),
    [(DefaultPolicy.ALL_UNAUTHENTICATED, b"ping\n"), (DefaultPolicy.ALL_AUTHENTICATED, b"")],
)
async def test_permissive_tls_without_a_client_certificate(
    tmp_path: pathlib.Path, default: DefaultPolicy, reply: bytes
) -> None:
    mesh = Mesh()
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=mesh.anchors.decode())
    async with workload(tmp_path, mesh, compiled(default=default)) as (port, _):
        assert await talk(port, anonymous) == reply


async def test_plaintext_under_strict_gets_no_byte_to_the_app(tmp_path: pathlib.Path) -> None:
    received: list[bytes] = []
    policy = compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED, mesh=STRICT)
    async with workload(tmp_path, Mesh(), policy, sink(received)) as (port, proxy):
        assert await talk(port, None) == b""
        await asyncio.sleep(0.2)
        assert received == [] and proxy.counters.plaintext_refused == 1
