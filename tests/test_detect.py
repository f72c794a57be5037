"""Protocol detection from first bytes."""

from __future__ import annotations

import pytest

from meshward.proxy.detect import HTTP2_PREFACE, PEEK, Protocol, detect

CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00" * 20


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (CLIENT_HELLO, Protocol.TLS),
        (bytes.fromhex("160303"), Protocol.TLS),
        (bytes.fromhex("160305"), Protocol.OPAQUE),
        (bytes.fromhex("160203"), Protocol.OPAQUE),
        (HTTP2_PREFACE + b"\x00\x00", Protocol.HTTP2),
        (b"GET / HTTP/1.1\r\n", Protocol.HTTP1),
        (b"POST /x HTTP/1.1\r\n", Protocol.HTTP1),
        (b"OPTIONS * HTTP/1.1\r\n", Protocol.HTTP1),
        (b"GETX / HTTP/1.1\r\n", Protocol.OPAQUE),
        (b"\x00\x01\x02", Protocol.OPAQUE),
        (b"SSH-2.0-OpenSSH_9.2\r\n", Protocol.OPAQUE),
        (b"PRI * HTTP/1.1\r\n", Protocol.OPAQUE),
    ],
)
def test_detect(first: bytes, expected: Protocol) -> None:
    assert detect(first) is expected


@pytest.mark.parametrize(
    "first", [b"", b"\x16", b"\x16\x03", b"G", b"GE", b"GET", b"PRI * HTTP/2", b"OPTI"]
)
def test_needs_more_bytes(first: bytes) -> None:
    assert detect(first) is None


def test_every_prefix_of_a_protocol_is_undecided_or_right() -> None:
    for whole, expected in (
        (HTTP2_PREFACE, Protocol.HTTP2),
        (b"DELETE /a HTTP/1.1", Protocol.HTTP1),
    ):
        for n in range(len(whole) + 1):
            assert detect(whole[:n]) in (None, expected)
        assert detect(whole) is expected
    assert len(HTTP2_PREFACE) == PEEK
