"""Mesh TLS over real loopback sockets: who may complete a handshake, and who the peer is."""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from meshward.identity import pki
from meshward.proxy import identity, tls

TD = "cluster.local"


class Mesh:
    """An anchor and issuer, and workloads certified by them (as the identity service would)."""

    def __init__(self) -> None:
        anchor, anchor_key = pki.new_trust_anchor(TD, datetime.timedelta(days=1))
        cert, key = pki.new_issuer(anchor, anchor_key, TD, datetime.timedelta(hours=12))
        self.issuer = pki.Issuer(certificate=cert, key=key)
        self.anchors = pki.to_pem(anchor)

    def workload(self, directory: pathlib.Path, sa: str, ns: str = "apps") -> identity.Certified:
        directory.mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        identity.write_key(directory, key)
        who = pki.Identity(ns, sa, TD)
        leaf = pki.sign_leaf(self.issuer, key.public_key(), who)
        return identity.Certified(leaf=leaf, intermediates=(self.issuer.certificate,), identity=who)


async def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> tuple[str | None, str | None, BaseException | None]:
    """(identity the server saw, identity the client saw, client error)."""
    seen: list[str | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(tls.peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        data = await reader.read()
        client_saw = tls.peer_identity(writer.get_extra_info("ssl_object"))
        writer.close()
        assert data == b"ok"
    except (ssl.SSLError, ConnectionError, AssertionError) as exc:
        return (seen[0] if seen else None), None, exc
    finally:
        server.close()
        await server.wait_closed()
    return seen[0], client_saw, None


async def test_mutual_tls_names_both_peers(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    web, api = mesh.workload(tmp_path / "web", "web"), mesh.workload(tmp_path / "api", "api")
    server = tls.server_context(tmp_path / "api", api, mesh.anchors)
    client = tls.client_context(tmp_path / "web", web, mesh.anchors)
    server_saw, client_saw, err = await handshake(server, client)
    assert err is None
    assert server_saw == "spiffe://cluster.local/ns/apps/sa/web"
    assert client_saw == "spiffe://cluster.local/ns/apps/sa/api"


def _anonymous_client(anchors: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=anchors.decode())
    return ctx


async def test_client_without_certificate(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    api = mesh.workload(tmp_path / "api", "api")
    strict = tls.server_context(tmp_path / "api", api, mesh.anchors)
    _, _, err = await handshake(strict, _anonymous_client(mesh.anchors))
    assert err is not None
    optional = tls.server_context(
        tmp_path / "api", api, mesh.anchors, require_client_certificate=False
    )
    server_saw, client_saw, err = await handshake(optional, _anonymous_client(mesh.anchors))
    assert err is None and server_saw is None
    assert client_saw == "spiffe://cluster.local/ns/apps/sa/api"


@pytest.mark.parametrize("require", [True, False])
async def test_client_of_another_mesh_is_refused(tmp_path: pathlib.Path, require: bool) -> None:
    ours, theirs = Mesh(), Mesh()
    api = ours.workload(tmp_path / "api", "api")
    intruder = theirs.workload(tmp_path / "intruder", "web")
    server = tls.server_context(
        tmp_path / "api", api, ours.anchors, require_client_certificate=require
    )
    client = tls.client_context(tmp_path / "intruder", intruder, ours.anchors)
    server_saw, _, err = await handshake(server, client)
    assert err is not None and server_saw is None


async def test_server_of_another_mesh_is_refused(tmp_path: pathlib.Path) -> None:
    ours, theirs = Mesh(), Mesh()
    impostor = theirs.workload(tmp_path / "impostor", "api")
    web = ours.workload(tmp_path / "web", "web")
    server = tls.server_context(tmp_path / "impostor", impostor, theirs.anchors)
    _, _, err = await handshake(server, tls.client_context(tmp_path / "web", web, ours.anchors))
    assert isinstance(err, ssl.SSLCertVerificationError)


async def test_tls_1_2_is_refused(tmp_path: pathlib.Path) -> None:
    mesh = Mesh()
    api, web = mesh.workload(tmp_path / "api", "api"), mesh.workload(tmp_path / "web", "web")
    old = tls.client_context(tmp_path / "web", web, mesh.anchors)
    old.minimum_version = ssl.TLSVersion.TLSv1_2
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    _, _, err = await handshake(tls.server_context(tmp_path / "api", api, mesh.anchors), old)
    assert err is not None


async def test_the_server_issues_no_session_tickets(tmp_path: pathlib.Path) -> None:
    """Nothing would resume them, and each costs the server a copy of the client's chain."""
    mesh = Mesh()
    server = mesh.workload(tmp_path / "server", "web")
    client = mesh.workload(tmp_path / "client", "vote")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server_ctx = tls.server_context(tmp_path / "server", server, mesh.anchors)
    listener = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = listener.sockets[0].getsockname()[1]
    try:
        client_ctx = tls.client_context(tmp_path / "client", client, mesh.anchors)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        assert await reader.read() == b"ok"
        session = writer.get_extra_info("ssl_object").session
        writer.close()
        assert session is None or not session.has_ticket
    finally:
        listener.close()
        await listener.wait_closed()
