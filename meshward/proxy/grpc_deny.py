"""Refusing an HTTP/2 connection the way its client understands (sans-I/O).

Closing a denied HTTP/2 connection outright would leave a gRPC client with UNAVAILABLE, which it
retries as if the server were down. So the proxy speaks just enough HTTP/2 (with ``h2``) to
answer each request on the connection: a gRPC request (content-type ``application/grpc...``)
gets HTTP 200 with ``grpc-status: 7`` (PERMISSION_DENIED) as a trailers-only response, anything
else ``:status 403``; then GOAWAY, and the caller closes.

Bounded, so a denied client can not hold the proxy: at most :data:`MAX_STREAMS` requests are
answered (later ones are reset as refused), and the caller gives the whole exchange a deadline.
The ``meshward-proxy-error`` header naming the reason goes only to meshed clients, as on HTTP/1.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from meshward.proxy import http

MAX_STREAMS = 32
"""Requests answered on one refused connection; later ones are reset (REFUSED_STREAM). (h2
also refuses more than 100 streams open at once.)"""
PERMISSION_DENIED = 7
GRPC_MESSAGE = "unauthorized request on route"


def _grpc_message(text: str) -> str:
    """Percent-encoded as the gRPC spec wants ``grpc-message``: printable ASCII but ``%``."""
    return "".join(
        c if " " <= c <= "~" and c != "%" else "".join(f"%{b:02X}" for b in c.encode())
        for c in text
    )


class Refusal:
    """One refused HTTP/2 connection, from the server side.

    ``receive`` the client's bytes (the connection preface first) and send what it returns;
    once ``done``, send :meth:`goodbye`'s bytes and close.
    """

    def __init__(self, reason: str | None) -> None:
        self._reason = reason
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self._conn.initiate_connection()
        self.answered = 0
        """Requests answered (gRPC status 7 or 403)."""
        self.done = False
        """At least one request was answered, or the client ended or broke the connection."""
        self._last_stream = 0
        self._closed = False

    def start(self) -> bytes:
        """The server's connection preface (SETTINGS), to send first."""
        return self._conn.data_to_send()

    def receive(self, data: bytes) -> bytes:
        if self._closed:
            return b""
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.done = True
            self._closed = True
            self._conn.close_connection(
                error_code=h2.errors.ErrorCodes.PROTOCOL_ERROR, last_stream_id=self._last_stream
            )
            return self._conn.data_to_send()
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self._answer(event.stream_id, event.headers or [])
            elif isinstance(event, h2.events.DataReceived):
                # Acknowledged, so a client sending a body does not stall on flow control.
                if event.flow_controlled_length:
                    self._conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.done = True
                self._closed = True
        return self._conn.data_to_send()

    def goodbye(self) -> bytes:
        """GOAWAY naming the last request answered (the client may retry later ones elsewhere)."""
        if not self._closed:
            self._closed = True
            self._conn.close_connection(last_stream_id=self._last_stream)
        return self._conn.data_to_send()

    def _answer(self, stream_id: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.answered >= MAX_STREAMS:
            self._conn.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.answered += 1
        self.done = True
        self._last_stream = max(self._last_stream, stream_id)
        content_type = dict(headers).get(b"content-type", b"")
        detail = []
        if self._reason is not None:
            detail.append((http.ERROR_HEADER, http.header_value(self._reason)))
        if content_type.startswith(b"application/grpc"):
            self._conn.send_headers(
                stream_id,
                [
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(PERMISSION_DENIED)),
                    ("grpc-message", _grpc_message(GRPC_MESSAGE)),
                    *detail,
                ],
                end_stream=True,
            )
            return
        self._conn.send_headers(
            stream_id,
            [
                (":status", "403"),
                ("content-type", "text/plain"),
                ("content-length", str(len(http.FORBIDDEN_BODY))),
                *detail,
            ],
        )
        self._conn.send_data(stream_id, http.FORBIDDEN_BODY, end_stream=True)
