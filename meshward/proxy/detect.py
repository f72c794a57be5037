"""What protocol a connection speaks, from its first bytes (sans-I/O).

PERMISSIVE ports take TLS and plaintext on the same port, and any port may carry HTTP whether or
not a Server declares it; the proxy peeks at the first bytes (without consuming them) and asks
:func:`detect`. A TLS connection begins with a handshake record (content type 22, version 3.x);
HTTP/2 with prior knowledge begins with its fixed preface; HTTP/1 with a method and a space.
"""

from __future__ import annotations

import enum

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
PEEK = len(HTTP2_PREFACE)
"""Enough bytes to tell every protocol apart."""


class Protocol(enum.Enum):
    TLS = "tls"
    HTTP1 = "http/1"
    HTTP2 = "http/2"
    OPAQUE = "opaque"


def detect(first: bytes) -> Protocol | None:
    """The protocol, or None when ``first`` is a prefix that needs more bytes to decide.

    Call again with more bytes while it returns None and fewer than :data:`PEEK` bytes have
    arrived; at end of stream, a None means :attr:`Protocol.OPAQUE`.
    """
    if not first:
        return None
    if first[0] == 0x16:
        if len(first) < 3:
            return None
        return Protocol.TLS if first[1] == 0x03 and first[2] <= 0x04 else Protocol.OPAQUE
    if HTTP2_PREFACE.startswith(first[: len(HTTP2_PREFACE)]):
        return Protocol.HTTP2 if len(first) >= len(HTTP2_PREFACE) else None
    for method in METHODS:
        candidate = method + b" "
        if first.startswith(candidate):
            return Protocol.HTTP1
        if candidate.startswith(first):
            return None
    return Protocol.OPAQUE
