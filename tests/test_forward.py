"""Bytes both ways through ``forward.splice`` over real loopback sockets."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import socket

from meshward.proxy import forward


async def relay_to(upstream_port: int) -> tuple[asyncio.Server, list[forward.Transferred]]:
    """A relay that splices each accepted connection to the upstream port."""
    results: list[forward.Transferred] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await forward.open_connection("127.0.0.1", upstream_port)
        results.append(await forward.splice((reader, writer), up))

    server = await forward.start_server(handle, "127.0.0.1", 0)
    return server, results


def port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


async def test_half_close_reaches_the_other_side_and_the_reply_comes_back() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(upstream, "127.0.0.1", 0)
    relay, results = await relay_to(port(app))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"hello")
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got hello"
        writer.close()
        await asyncio.sleep(0.1)
        assert results and (results[0].a_to_b, results[0].b_to_a) == (5, 9)
    finally:
        relay.close()
        app.close()


async def test_large_transfer_is_intact_and_backpressure_bounds_buffering() -> None:
    payload = os.urandom(32 * 1024 * 1024)
    received = hashlib.sha256()
    slow_started = asyncio.Event()
    buffered: list[int] = []

    async def slow_sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        slow_started.set()
        total = 0
        while chunk := await reader.read(16 * 1024):
            received.update(chunk)
            total += len(chunk)
            if total < 4 * 1024 * 1024:
                await asyncio.sleep(0.001)  # a slow reader at first
        writer.write(str(total).encode())
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(slow_sink, "127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await forward.open_connection("127.0.0.1", port(app))

        async def watch() -> None:
            while not up_writer.is_closing():
                buffered.append(up_writer.transport.get_write_buffer_size())
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        try:
            await forward.splice((reader, writer), (up_reader, up_writer))
        finally:
            watcher.cancel()

    relay = await forward.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 60)
        assert int(reply) == len(payload)
        assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
        # drain() after every write: never more than the transport's high-water mark plus a chunk
        assert buffered and max(buffered) <= 64 * 1024 + forward.CHUNK
        writer.close()
    finally:
        relay.close()
        app.close()


async def test_a_reset_upstream_closes_the_client_side_too() -> None:
    async def resetting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.close()  # RST

    app = await asyncio.start_server(resetting, "127.0.0.1", 0)
    relay, results = await relay_to(port(app))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"x")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)  # the relay closed us: EOF, not a hang
        assert data == b""
        await asyncio.sleep(0.1)
        assert len(results) == 1
        writer.close()
    finally:
        relay.close()
        app.close()


async def _tls_relay(
    tmp: pathlib.Path, upstream: object, grace: float
) -> tuple[asyncio.Server, asyncio.Server]:
    """A plaintext relay whose upstream leg is TLS (as every mesh hop is)."""
    from meshward.proxy import tls
    from tests.test_proxy_tls import Mesh

    mesh = Mesh()
    server_cert = mesh.workload(tmp / "upstream", "api")
    client_cert = mesh.workload(tmp / "relay", "web")
    app = await asyncio.start_server(
        upstream,  # type: ignore[arg-type]
        "127.0.0.1",
        0,
        ssl=tls.server_context(tmp / "upstream", server_cert, mesh.anchors),
    )
    ctx = tls.client_context(tmp / "relay", client_cert, mesh.anchors)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await forward.open_connection("127.0.0.1", port(app), ssl_context=ctx)
        await forward.splice((reader, writer), up, half_close_grace=grace)

    return app, await forward.start_server(handle, "127.0.0.1", 0)


async def test_tls_leg_still_delivers_a_reply_after_the_client_half_closes(
    tmp_path: pathlib.Path,
) -> None:
    async def replies_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"yo\n")
        await writer.drain()
        await asyncio.sleep(30)  # keeps its side open

    app, relay = await _tls_relay(tmp_path, replies_at_once, grace=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"hi\n")
        writer.write_eof()
        start = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(reader.read(), 10) == b"yo\n"
        assert asyncio.get_running_loop().time() - start < 5  # closed after the grace, no hang
        writer.close()
    finally:
        relay.close()
        app.close()


async def test_tls_leg_does_not_hang_on_a_peer_waiting_for_eof(tmp_path: pathlib.Path) -> None:
    async def waits_for_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # an EOF that a TLS leg can not deliver
        writer.close()

    app, relay = await _tls_relay(tmp_path, waits_for_eof, grace=0.5)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"hi\n")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    finally:
        relay.close()
        app.close()


async def test_a_connection_cut_short_still_counts_what_it_carried() -> None:
    """Metrics read the tally as bytes flow: a connection aborted mid-way (a policy update
    closing it, say) has its bytes counted all the same."""
    tally = forward.Transferred()
    spliced = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5) + b"!")
        await writer.drain()
        await reader.read()
        writer.close()

    app = await asyncio.start_server(upstream, "127.0.0.1", 0)
    legs: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await forward.open_connection("127.0.0.1", port(app))
        legs.extend((writer, up[1]))
        spliced.set()
        await forward.splice((reader, writer), up, tally=tally)

    relay = await forward.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"hello")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"hello!"
        await spliced.wait()
        for leg in legs:
            leg.transport.abort()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert (tally.a_to_b, tally.b_to_a) == (5, 6)
    finally:
        relay.close()
        app.close()


async def test_bytes_and_eof_that_arrived_before_the_splice_are_passed_on() -> None:
    """The client sends its request and finishes sending while the relay is still deciding:
    what its stream buffered, and the EOF, reach the upstream once the splice takes over."""
    arrived = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the EOF the client sent before the splice
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(upstream, "127.0.0.1", 0)
    results: list[forward.Transferred] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await arrived.wait()
        await asyncio.sleep(0.2)  # the bytes and the FIN are in the stream by now
        up = await forward.open_connection("127.0.0.1", port(app))
        results.append(await forward.splice((reader, writer), up))

    relay = await forward.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"early bytes")
        writer.write_eof()
        await writer.drain()
        arrived.set()
        assert await asyncio.wait_for(reader.read(), 5) == b"got early bytes"
        writer.close()
        await asyncio.sleep(0.1)
        assert results and (results[0].a_to_b, results[0].b_to_a) == (11, 15)
    finally:
        relay.close()
        app.close()


async def test_a_slow_client_bounds_what_is_buffered_towards_it() -> None:
    """Backpressure the other way: the upstream sends fast, the client reads slowly."""
    payload = os.urandom(16 * 1024 * 1024)
    buffered: list[int] = []

    async def fast_source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(fast_source, "127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await forward.open_connection("127.0.0.1", port(app))

        async def watch() -> None:
            while not writer.is_closing():
                buffered.append(writer.transport.get_write_buffer_size())
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        try:
            await forward.splice((reader, writer), up)
        finally:
            watcher.cancel()

    relay = await forward.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        received = hashlib.sha256()
        total = 0
        while chunk := await asyncio.wait_for(reader.read(16 * 1024), 30):
            received.update(chunk)
            total += len(chunk)
            if total < 4 * 1024 * 1024:
                await asyncio.sleep(0.001)
        assert total == len(payload)
        assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
        assert buffered and max(buffered) <= 64 * 1024 + forward.CHUNK
        writer.close()
    finally:
        relay.close()
        app.close()


async def test_plain_asyncio_streams_are_spliced_under_the_same_contract() -> None:
    """Streams that did not come from forward.StreamProtocol take the coroutine path: the
    half-close still reaches the upstream, the reply comes back, and the bytes are counted."""
    results: list[forward.Transferred] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()
        writer.write(b"got " + request)
        await writer.drain()
        writer.close()

    app = await asyncio.start_server(upstream, "127.0.0.1", 0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up = await asyncio.open_connection("127.0.0.1", port(app))
        results.append(await forward.splice((reader, writer), up))

    relay = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port(relay))
        writer.write(b"hello")
        await writer.drain()
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"got hello"
        writer.close()
        await asyncio.sleep(0.1)
        assert results and (results[0].a_to_b, results[0].b_to_a) == (5, 9)
    finally:
        relay.close()
        app.close()
