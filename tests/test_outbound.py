"""Outbound to a real inbound: the pair end to end over loopback, and the peers it refuses."""

from __future__ import annotations

import asyncio
import pathlib
import uuid

import pytest

from meshward.proxy import outbound, tls
from tests import builders
from tests.test_inbound import ALLOW_VOTE_BOT, STRICT, compiled, sample, settled, sink, workload
from tests.test_proxy_tls import Mesh

WEB = "spiffe://cluster.local/ns/app/sa/web"
DB = "spiffe://cluster.local/ns/app/sa/db"
API = "spiffe://cluster.local/ns/app/sa/api"


def vote_bot(tmp: pathlib.Path, mesh: Mesh) -> outbound.Outbound:
    directory = tmp / f"vote-bot-{uuid.uuid4().hex[:6]}"
    certified = mesh.workload(directory, "vote-bot", ns=builders.NS)
    return outbound.Outbound(
        client_context=lambda: tls.client_context(directory, certified, mesh.anchors)
    )


async def call(proxy: outbound.Outbound, route: outbound.Route) -> bytes:
    """What the application gets back for a line sent through its outbound proxy."""
    server = await proxy.serve("127.0.0.1", 0, route)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"vote\n")
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.readline(), 5)
        except ConnectionResetError:
            return b""  # refused with the request unread: the kernel resets
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_plaintext_app_to_mtls_peer_end_to_end(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    async with workload(tmp_path, mesh, compiled(*ALLOW_VOTE_BOT, mesh=STRICT)) as (port, inbound):
        proxy = vote_bot(tmp_path, mesh)
        assert await call(proxy, outbound.Route("127.0.0.1", port, frozenset({WEB}))) == b"vote\n"
        c = await settled(inbound)
        assert (c.allowed, c.denied, c.plaintext_refused) == (1, 0, 0)
    assert (proxy.counters.connected, proxy.counters.refused_identity) == (1, 0)


async def test_a_peer_with_another_identity_gets_nothing(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    async with workload(tmp_path, mesh, compiled(*ALLOW_VOTE_BOT, mesh=STRICT)) as (port, _):
        proxy = vote_bot(tmp_path, mesh)
        route = outbound.Route("127.0.0.1", port, frozenset({DB}))
        assert await call(proxy, route) == b""
    assert (proxy.counters.connected, proxy.counters.refused_identity) == (0, 1)


async def test_a_peer_proving_one_of_the_expected_identities_gets_through(
    tmp_path: pathlib.Path,
) -> None:
    """As discovery pins a Service: one identity per ServiceAccount among its endpoints."""
    mesh = Mesh()
    async with workload(tmp_path, mesh, compiled(*ALLOW_VOTE_BOT, mesh=STRICT)) as (port, inbound):
        proxy = vote_bot(tmp_path, mesh)
        route = outbound.Route("127.0.0.1", port, frozenset({DB, WEB, API}))
        assert await call(proxy, route) == b"vote\n"
        assert (await settled(inbound)).allowed == 1
    assert (proxy.counters.connected, proxy.counters.refused_identity) == (1, 0)
    assert sample(proxy.metrics, "outbound_tls_peer_refused_total") == 0


@pytest.mark.parametrize("expected", [frozenset({DB, API}), frozenset()], ids=["others", "none"])
async def test_a_peer_outside_the_expected_identities_gets_nothing(
    tmp_path: pathlib.Path, expected: frozenset[str]
) -> None:
    mesh = Mesh()
    received: list[bytes] = []
    policy = compiled(*ALLOW_VOTE_BOT, mesh=STRICT)
    async with workload(tmp_path, mesh, policy, sink(received)) as (port, inbound):
        proxy = vote_bot(tmp_path, mesh)
        assert await call(proxy, outbound.Route("127.0.0.1", port, expected)) == b""
        await settled(inbound)
    assert received in ([], [b""])  # not a byte of the application's reached the peer
    assert (proxy.counters.connected, proxy.counters.refused_identity) == (0, 1)
    refused = {
        reason: sample(proxy.metrics, "outbound_tls_peer_refused_total", reason=reason)
        for reason in ("identity", "no_identity")
    }
    assert refused == {"identity": 1, "no_identity": 0}
    assert sample(proxy.metrics, "tls_handshake_failures_total", direction="outbound") == 0


def test_a_route_takes_a_set_of_identities_not_a_string() -> None:
    with pytest.raises(TypeError, match="frozenset of SPIFFE IDs"):
        outbound.Route("127.0.0.1", 1, WEB)  # type: ignore[arg-type]
    assert outbound.Route("127.0.0.1", 1, frozenset({WEB})).admits(WEB)
    assert not outbound.Route("127.0.0.1", 1, frozenset({WEB})).admits(WEB + "x")
    assert outbound.Route("127.0.0.1", 1, None).admits(DB)


async def test_a_peer_of_another_mesh_is_refused(tmp_path: pathlib.Path) -> None:
    ours, theirs = Mesh(), Mesh()
    async with workload(tmp_path, theirs, compiled(*ALLOW_VOTE_BOT)) as (port, inbound):
        proxy = vote_bot(tmp_path, ours)
        assert await call(proxy, outbound.Route("127.0.0.1", port, None)) == b""
        await settled(inbound)
        assert inbound.counters.allowed == 0
    assert (proxy.counters.connected, proxy.counters.failed) == (0, 1)


async def test_without_a_certificate_nothing_leaves(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    async with workload(tmp_path, mesh, compiled(*ALLOW_VOTE_BOT)) as (port, inbound):
        proxy = outbound.Outbound(client_context=lambda: None)
        assert await call(proxy, outbound.Route("127.0.0.1", port, frozenset({WEB}))) == b""
        assert inbound.counters.accepted == 0
    assert proxy.counters.failed == 1


async def test_a_peer_without_mesh_identity_is_refused_even_with_no_expectation(
    tmp_path: pathlib.Path,
) -> None:
    import datetime
    import ssl

    from meshward.identity import pki

    mesh = Mesh()
    cert, key = pki.new_server_certificate(mesh.issuer, ["localhost"], datetime.timedelta(hours=1))
    (tmp_path / "chain.pem").write_bytes(pki.to_pem(cert, mesh.issuer.certificate))
    (tmp_path / "key.pem").write_bytes(pki.key_to_pem(key))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()

    # Chains to the anchors (like the identity service's own certificate) but names no workload.
    server = await asyncio.start_server(sink, "127.0.0.1", 0, ssl=ctx)
    try:
        proxy = vote_bot(tmp_path, mesh)
        route = outbound.Route("127.0.0.1", server.sockets[0].getsockname()[1], None)
        assert await call(proxy, route) == b""
        await asyncio.sleep(0.2)
        assert received in ([], [b""])
    finally:
        server.close()
    assert (proxy.counters.connected, proxy.counters.refused_identity) == (0, 1)
    refused = {
        reason: sample(proxy.metrics, "outbound_tls_peer_refused_total", reason=reason)
        for reason in ("identity", "no_identity")
    }
    assert refused == {"identity": 0, "no_identity": 1}


async def test_outbound_counts_connections_bytes_and_failed_handshakes(
    tmp_path: pathlib.Path,
) -> None:
    from tests.test_inbound_http import sample

    mesh = Mesh()
    proxy = vote_bot(tmp_path, mesh)
    strict = compiled(*ALLOW_VOTE_BOT, mesh=STRICT)
    async with workload(tmp_path / "ours", mesh, strict) as (port, _):
        assert await call(proxy, outbound.Route("127.0.0.1", port, frozenset({WEB}))) == b"vote\n"
    async with workload(tmp_path / "theirs", Mesh(), compiled(*ALLOW_VOTE_BOT)) as (port, _):
        assert await call(proxy, outbound.Route("127.0.0.1", port, None)) == b""
    for _ in range(100):
        if sample(proxy.metrics, "tcp_close_total", direction="outbound") == 2:
            break
        await asyncio.sleep(0.02)
    m = proxy.metrics
    assert sample(m, "tcp_open_total", direction="outbound") == 2
    assert sample(m, "tcp_open_connections", direction="outbound") == 0
    assert sample(m, "tcp_read_bytes_total", direction="outbound") == len(b"vote\n")
    assert sample(m, "tcp_write_bytes_total", direction="outbound") == len(b"vote\n")
    assert sample(m, "tls_handshake_failures_total", direction="outbound") == 1
