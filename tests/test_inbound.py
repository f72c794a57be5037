"""The inbound side over real loopback sockets and real TLS: who reaches the application."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import pathlib
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families

from meshward.identity import pki
from meshward.policy import compile as policy_compile
from meshward.policy import decision
from meshward.policy.resources import DefaultPolicy
from meshward.proxy import identity as proxy_identity
from meshward.proxy import inbound, metrics, tls
from tests import builders
from tests.test_proxy_tls import TD, Mesh


def compiled(
    *items: object,
    default: DefaultPolicy = DefaultPolicy.DENY,
    mesh: tuple[object, ...] = (),
    networks: tuple[str, ...] = ("127.0.0.0/8",),
) -> decision.Policy:
    settings = policy_compile.Settings(default_policy=default, cluster_networks=networks)
    state = builders.state(*items, mesh=mesh)  # type: ignore[arg-type]
    return decision.Policy(policy_compile.compile_namespace(state, settings).document)


def sample(m: metrics.Metrics, name: str, **labels: str) -> float:
    """The value a scrape shows for ``name`` (summed over series matching ``labels``)."""
    total = 0.0
    for family in text_string_to_metric_families(m.exposition().decode()):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


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
    tmp: pathlib.Path,
    mesh: Mesh,
    policy: decision.Policy | None,
    application: Handler = echo,
    *,
    app_tls: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[int, inbound.Inbound]]:
    """An application (echo by default, speaking TLS of its own with ``app_tls``) behind an
    inbound proxy for pod web-0 (app=web); yields the proxy's port and the proxy."""
    app = await asyncio.start_server(application, "127.0.0.1", 0, ssl=app_tls)
    app_port = app.sockets[0].getsockname()[1]
    directory = tmp / f"web-proxy-{uuid.uuid4().hex[:6]}"
    own = mesh.workload(directory, "web", ns=builders.NS)

    def server_context(require: bool) -> ssl.SSLContext:
        return tls.server_context(directory, own, mesh.anchors, require_client_certificate=require)

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


async def talk(port: int, ctx: ssl.SSLContext | None, source: str = "127.0.0.1") -> bytes:
    """Send a line from ``source`` and read a line back; b'' means nothing came back."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, local_addr=(source, 0)
        )
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
    # A policy refusal (metrics' docstring): TLS itself accepted the chain.
    m = proxy.metrics
    deny = "inbound_tcp_authz_deny_total"
    assert sample(m, deny, authz_kind="certificate", authz_name="no-spiffe-id", tls="true") == 3
    assert sample(m, deny, srv_kind="default", srv_name="all-unauthenticated") == 3
    assert sample(m, deny) == 3
    assert sample(m, "inbound_tcp_authz_allow_total") == 1
    assert sample(m, "tls_handshake_failures_total") == 0


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


async def test_an_expired_client_certificate_is_refused(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate the mesh issued, for an allowed identity, but expired an hour ago."""
    mesh = Mesh()
    directory = tmp_path / "expired"
    directory.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    proxy_identity.write_key(directory, key)
    who = pki.Identity(builders.NS, "vote-bot", TD)
    two_hours_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=2)
    leaf = pki.sign_leaf(
        mesh.issuer, key.public_key(), who, lifetime=datetime.timedelta(hours=1), now=two_hours_ago
    )
    assert leaf.not_valid_after_utc < datetime.datetime.now(datetime.UTC)
    certified = proxy_identity.Certified(
        leaf=leaf, intermediates=(mesh.issuer.certificate,), identity=who
    )
    expired = tls.client_context(directory, certified, mesh.anchors)
    caplog.set_level(logging.INFO, logger=inbound.__name__)
    for peers in (STRICT, ()):  # PERMISSIVE too: a certificate presented must be valid
        policy = compiled(*ALLOW_VOTE_BOT, mesh=peers)
        async with workload(tmp_path, mesh, policy) as (port, proxy):
            assert await talk(port, expired) == b""
            assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b"ping\n"
            c = await settled(proxy)
        assert (c.handshake_failed, c.allowed, c.denied) == (1, 1, 0), c
        assert sample(proxy.metrics, "tls_handshake_failures_total", direction="inbound") == 1
        assert sample(proxy.metrics, "inbound_tcp_authz_allow_total") == 1
    failures = [r.getMessage() for r in caplog.records if "handshake" in r.getMessage()]
    assert len(failures) == 2 and all("certificate has expired" in f for f in failures), failures


DISABLE = (builders.peer("mesh", "DISABLE", ns="meshward"),)


async def test_disable_passes_plaintext_and_tls_through_untouched(tmp_path: pathlib.Path) -> None:
    """Under DISABLE the proxy terminates nothing: a TLS client completes its handshake with
    the application itself, whose certificate it sees, not the proxy's."""
    mesh = Mesh()
    backend_dir = tmp_path / "backend"
    backend = mesh.workload(backend_dir, "backend", ns=builders.NS)
    app_tls = tls.server_context(
        backend_dir, backend, mesh.anchors, require_client_certificate=False
    )
    policy = compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED, mesh=DISABLE)
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        assert await talk(port, None) == b"ping\n"
    assert proxy.counters.allowed == 1
    async with workload(tmp_path, mesh, policy, app_tls=app_tls) as (port, proxy):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client(tmp_path, mesh, "vote-bot")
        )
        seen = tls.peer_identity(writer.get_extra_info("ssl_object"))
        writer.write(b"ping\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        writer.close()
        c = await settled(proxy)
    assert seen == f"spiffe://{TD}/ns/{builders.NS}/sa/backend"
    assert (c.allowed, c.handshake_failed) == (1, 0)
    # The proxy saw no identity: the client counts as plaintext.
    allow = "inbound_tcp_authz_allow_total"
    assert sample(proxy.metrics, allow, tls="false", client_id="") == 1


async def test_disable_judges_a_mesh_client_as_plaintext(tmp_path: pathlib.Path) -> None:
    """Identity rules can not be met where the proxy does not terminate mTLS."""
    mesh = Mesh()
    policy = compiled(*ALLOW_VOTE_BOT, mesh=DISABLE)
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        assert await talk(port, client(tmp_path, mesh, "vote-bot")) == b""
        c = await settled(proxy)
    assert (c.denied, c.allowed, c.handshake_failed) == (1, 0, 0)
    assert sample(proxy.metrics, "inbound_tcp_authz_deny_total", tls="false", client_id="") == 1


IN_CLUSTER, OUTSIDE = "127.0.0.2", "127.0.0.3"
"""Source addresses on loopback: the tests' cluster network is 127.0.0.2/32 alone."""


@pytest.mark.parametrize(
    ("default", "allowed"),
    [
        (DefaultPolicy.CLUSTER_AUTHENTICATED, {(IN_CLUSTER, True)}),
        (DefaultPolicy.CLUSTER_UNAUTHENTICATED, {(IN_CLUSTER, True), (IN_CLUSTER, False)}),
        (
            DefaultPolicy.AUDIT,
            {(IN_CLUSTER, True), (IN_CLUSTER, False), (OUTSIDE, True), (OUTSIDE, False)},
        ),
    ],
)
async def test_default_policies_by_source_network_and_identity(
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
    default: DefaultPolicy,
    allowed: set[tuple[str, bool]],
) -> None:
    mesh = Mesh()
    policy = compiled(default=default, networks=(f"{IN_CLUSTER}/32",))
    caplog.set_level(logging.INFO, logger=inbound.__name__)
    outcomes: dict[tuple[str, bool], bool] = {}
    async with workload(tmp_path, mesh, policy) as (port, proxy):
        for source in (IN_CLUSTER, OUTSIDE):
            for meshed in (True, False):
                ctx = client(tmp_path, mesh, "vote-bot") if meshed else None
                outcomes[source, meshed] = await talk(port, ctx, source) == b"ping\n"
        c = await settled(proxy)
    assert {k for k, ok in outcomes.items() if ok} == allowed
    assert (c.allowed, c.denied) == (len(allowed), 4 - len(allowed))
    m = proxy.metrics
    name = default.value
    assert sample(m, "inbound_tcp_authz_allow_total", authz_name=name) == len(allowed)
    assert sample(m, "inbound_tcp_authz_deny_total", authz_name=name) == 4 - len(allowed)
    audited = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit:")]
    if default is DefaultPolicy.AUDIT:
        # Allowed, and flagged: in the log for review, and by authz_name="audit" in the metrics.
        assert len(audited) == 4 and all("flags it for audit" in a for a in audited), audited
        assert any(OUTSIDE in a and "unauthenticated" in a for a in audited), audited
    else:
        assert audited == []
