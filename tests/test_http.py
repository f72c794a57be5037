"""HTTP/1 framing for per-request decisions, the proxy's own answers, and the HTTP/2 refusal:
the pure parts, fed the bytes real clients and servers send."""

from __future__ import annotations

import email.message
import http.client
import io

import h2.config
import h2.connection
import h2.events
import pytest

from meshward.proxy import grpc_deny
from meshward.proxy import http as proxy_http

PIPELINED = (
    b"GET /healthz?verbose=1 HTTP/1.1\r\nHost: web\r\n\r\n"
    b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"
    b"PUT /item HTTP/1.1\r\nContent-Length: 4\r\n\r\nbody"
    b"GET /last HTTP/1.0\r\n\r\n"
)


def feed_all(data: bytes, step: int) -> list[proxy_http.Event]:
    requests = proxy_http.Requests()
    events: list[proxy_http.Event] = []
    for i in range(0, len(data), step):
        events += requests.feed(data[i : i + step])
    return events


def forwarded(events: list[proxy_http.Event]) -> bytes:
    out = b""
    for e in events:
        if isinstance(e, proxy_http.Head):
            out += e.head
        elif isinstance(e, proxy_http.Body):
            out += e.data
    return out


class _Seen:
    """What a second, independent parse of the forwarded bytes finds (what the app sees)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = []
        self._url = b""
        self._body = b""
        self._headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.requests.append((self._url.decode(), self._body, self._headers))
        self._url, self._body, self._headers = b"", b"", []


def reparse(data: bytes) -> list[tuple[str, bytes, list[tuple[bytes, bytes]]]]:
    import httptools

    seen = _Seen()
    httptools.HttpRequestParser(seen).feed_data(data)
    return seen.requests


@pytest.mark.parametrize("step", [1, 7, 64, len(PIPELINED)])
def test_pipelined_requests_come_out_in_order_however_the_bytes_arrive(step: int) -> None:
    events = feed_all(PIPELINED, step)
    heads = [e for e in events if isinstance(e, proxy_http.Head)]
    assert [(h.method, h.path) for h in heads] == [
        ("GET", "/healthz"),
        ("POST", "/upload"),
        ("PUT", "/item"),
        ("GET", "/last"),
    ]
    assert heads[0].target == "/healthz?verbose=1"  # forwarded as sent, decided without query
    assert not any(isinstance(e, proxy_http.Malformed) for e in events)
    # What the application gets is the same four requests, bodies and trailers intact.
    seen = reparse(forwarded(events))
    assert [(url, body) for url, body, _ in seen] == [
        ("/healthz?verbose=1", b""),
        ("/upload", b"hello world"),
        ("/item", b"body"),
        ("/last", b""),
    ]
    assert (b"X-Checksum", b"42") in seen[1][2]  # the chunked body's trailer
    assert b"HTTP/1.0" in heads[3].head


def test_a_body_is_emitted_between_its_head_and_the_next() -> None:
    """Decisions happen at each head, so a body must come after its own head and before the
    next one: a refused request's body is never forwarded under an earlier allowance."""
    groups: list[tuple[str, bytes]] = []
    for e in feed_all(PIPELINED, 5):
        if isinstance(e, proxy_http.Head):
            groups.append((e.path, b""))
        elif isinstance(e, proxy_http.Body):
            path, body = groups[-1]
            groups[-1] = (path, body + e.data)
    assert [(path, len(body) > 0) for path, body in groups] == [
        ("/healthz", False),
        ("/upload", True),
        ("/item", True),
        ("/last", False),
    ]
    assert groups[2][1] == b"body"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"GET / HTTP/1.1\nHost: a\n\n", "CRLF"),  # bare LF
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "Content"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "whitespace"),
        (b"\x16\x03\x01\x00\x05hello", "method"),  # TLS where plaintext HTTP was expected
        (b"BREW /pot HTTP/1.1\r\n\r\n", "method"),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    ],
)
def test_malformed_requests_are_named_and_end_the_stream(raw: bytes, why: str) -> None:
    requests = proxy_http.Requests()
    events = requests.feed(raw)
    assert isinstance(events[-1], proxy_http.Malformed), events
    assert why.lower() in events[-1].reason.lower(), events[-1].reason
    assert requests.feed(b"GET / HTTP/1.1\r\n\r\n") == []  # nothing more is read


def test_smuggling_attempt_is_refused_not_split() -> None:
    """CL.TE: the classic desync. A lenient parser would forward a hidden second request."""
    raw = (
        b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n"
    )
    events = proxy_http.Requests().feed(raw)
    assert not any(isinstance(e, proxy_http.Head) for e in events)
    assert isinstance(events[-1], proxy_http.Malformed)


def test_head_size_is_bounded() -> None:
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (proxy_http.MAX_HEAD - 100) + b"\r\n\r\n"
    events = proxy_http.Requests().feed(big)
    assert isinstance(events[0], proxy_http.Head)  # up to MAX_HEAD: always fine
    requests = proxy_http.Requests()
    endless = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (3 * proxy_http.MAX_HEAD)
    events = []
    for i in range(0, len(endless), 4096):  # a client that never ends its head
        events += requests.feed(endless[i : i + 4096])
    assert len(events) == 1 and isinstance(events[0], proxy_http.Malformed)
    assert "larger than" in events[0].reason


def test_upgrade_holds_back_what_follows() -> None:
    raw = (
        b"GET /socket HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        b"\x81\x05hello"
    )
    requests = proxy_http.Requests()
    events = requests.feed(raw)
    assert isinstance(events[0], proxy_http.Head) and events[0].upgrade
    assert events[1:] == [proxy_http.Tunnel(b"\x81\x05hello")]
    assert requests.feed(b"GET /admin HTTP/1.1\r\n\r\n") == [
        proxy_http.Tunnel(b"GET /admin HTTP/1.1\r\n\r\n")  # not a request: tunnel bytes
    ]
    connect = proxy_http.Requests().feed(b"CONNECT db:5432 HTTP/1.1\r\n\r\n")
    assert isinstance(connect[0], proxy_http.Head) and connect[0].upgrade
    assert connect[0].path == "db:5432"


def test_the_parser_tells_a_head_in_progress_from_a_connection_between_requests() -> None:
    """What the proxy's deadlines key on: a head timer from a head's first byte, an idle timer
    only between requests (a body in progress is neither)."""
    requests = proxy_http.Requests()
    states = []
    for piece in (
        b"\r\n",  # stray line ends between requests begin nothing
        b"P",
        b"OST /a HTTP/1.1\r\nContent-Length: 4\r\n",
        b"\r\nbo",
        b"dy",
        b"GET /b HTTP/1.1\r\n\r\n",
    ):
        requests.feed(piece)
        states.append((requests.in_head, requests.idle))
    assert states == [
        (False, True),
        (True, False),
        (True, False),
        (False, False),
        (False, True),
        (False, True),
    ]
    requests.feed(b"GET /c HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")  # malformed
    assert (requests.in_head, requests.idle) == (False, False)


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("/a/b?c=d", "/a/b"),
        ("/a/b", "/a/b"),
        ("/healthz/../admin", "/healthz/../admin"),  # never normalised: exact rules stay exact
        ("/%68ealthz", "/%68ealthz"),
        ("http://web:8080/ready?x", "/ready"),
        ("http://web:8080", "/"),
        ("*", "*"),
    ],
)
def test_request_path(target: str, path: str) -> None:
    assert proxy_http.request_path(target) == path


# -- responses --------------------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
HEAD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n"  # no body follows a HEAD's


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_responses_are_counted_off_as_they_complete(step: int) -> None:
    r = proxy_http.Responses()
    for method in ("GET", "HEAD", "POST", "GET", "HEAD"):
        r.expect(method)
    stream = (
        OK
        + HEAD_ANSWER
        + b"HTTP/1.1 100 Continue\r\n\r\n"  # interim: the POST is still owed its answer
        + CHUNKED
        + b"HTTP/1.1 204 No Content\r\n\r\n"
        + HEAD_ANSWER
    )
    pending = []
    for i in range(0, len(stream), step):
        r.feed(stream[i : i + step])
        pending.append(r.pending)
    assert r.pending == 0 and r.broken is None and not r.tunnel
    assert pending == sorted(pending, reverse=True)  # only ever goes down


def test_a_response_in_pieces_is_owed_until_its_end() -> None:
    r = proxy_http.Responses()
    r.expect("GET")
    r.feed(CHUNKED[:-3])
    assert r.pending == 1
    r.feed(CHUNKED[-3:])
    assert r.pending == 0


def test_responses_nobody_asked_for_break_the_follow() -> None:
    r = proxy_http.Responses()
    r.feed(OK)
    assert r.broken is not None and "never sent" in r.broken
    garbage = proxy_http.Responses()
    garbage.expect("GET")
    garbage.feed(b"SSH-2.0-OpenSSH\r\n")
    assert garbage.broken is not None and garbage.pending == 1


def test_upgrades_and_connect_become_tunnels() -> None:
    r = proxy_http.Responses()
    r.expect("GET")
    r.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    assert r.tunnel
    c = proxy_http.Responses()
    c.expect("CONNECT")
    c.feed(b"HTTP/1.1 200 Connection established\r\n\r\n\x00\x01binary")
    assert c.tunnel and c.pending == 0
    refused = proxy_http.Responses()
    refused.expect("CONNECT")
    refused.feed(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
    assert not refused.tunnel and refused.pending == 0


# -- the proxy's answers ----------------------------------------------------------------------


def parse_answer(raw: bytes) -> tuple[int, email.message.Message, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    headers = http.client.parse_headers(io.BytesIO(header_block + b"\r\n\r\n"))
    return int(status_line.split()[1]), headers, body


def test_403_names_the_reason_only_to_meshed_clients() -> None:
    status, headers, body = parse_answer(proxy_http.forbidden(None))
    assert status == 403 and body == b"unauthorized request on route\n"
    assert headers["content-type"] == "text/plain" and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert proxy_http.ERROR_HEADER not in headers
    reason = "default deny: port 8080 is not covered by a Server"
    _, meshed, _ = parse_answer(proxy_http.forbidden(reason))
    assert meshed[proxy_http.ERROR_HEADER] == reason


def test_the_reason_can_not_inject_headers() -> None:
    raw = proxy_http.forbidden("x\r\nSet-Cookie: evil=1\r\n\r\n<html>")
    status, headers, body = parse_answer(raw)
    assert status == 403 and "set-cookie" not in headers
    assert body == b"unauthorized request on route\n"
    assert headers[proxy_http.ERROR_HEADER].startswith("x??Set-Cookie")


def test_408_says_what_is_wrong_and_what_to_do() -> None:
    status, headers, body = parse_answer(proxy_http.request_timeout(10.0))
    assert status == 408 and headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert b"not complete within 10 s of its first byte" in body
    assert b"without pausing" in body


def test_400_says_what_is_wrong() -> None:
    status, headers, body = parse_answer(proxy_http.bad_request("Expected CRLF after version"))
    assert status == 400 and headers["connection"] == "close"
    assert b"Expected CRLF after version" in body and b"send a valid HTTP/1.1 request" in body


# -- the HTTP/2 refusal -----------------------------------------------------------------------


def _client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    return c


def _exchange(
    client: h2.connection.H2Connection, refusal: grpc_deny.Refusal
) -> list[h2.events.Event]:
    events = client.receive_data(refusal.start())
    events += client.receive_data(refusal.receive(client.data_to_send()))
    return events


GRPC_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "web"),
    (":path", "/grpc.health.v1.Health/Check"),
    ("content-type", "application/grpc+proto"),
    ("te", "trailers"),
]


@pytest.mark.parametrize("reason", [None, "ServerAuthorization web: not this client"])
def test_grpc_requests_get_permission_denied(reason: str | None) -> None:
    client, refusal = _client(), grpc_deny.Refusal(reason)
    client.send_headers(1, GRPC_HEADERS)
    client.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)
    events = _exchange(client, refusal)
    answer = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    headers = {k.decode(): v.decode() for k, v in answer.headers}
    assert headers[":status"] == "200" and headers["grpc-status"] == "7"
    assert "unauthorized" in headers["grpc-message"]
    assert (proxy_http.ERROR_HEADER in headers) == (reason is not None)
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)
    assert refusal.done and refusal.answered == 1
    away = client.receive_data(refusal.goodbye())
    assert isinstance(away[0], h2.events.ConnectionTerminated) and away[0].last_stream_id == 1


def test_other_http2_requests_get_403() -> None:
    client, refusal = _client(), grpc_deny.Refusal(None)
    client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":authority", "w"), (":path", "/")], True
    )
    events = _exchange(client, refusal)
    answer = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    assert dict(answer.headers)[b":status"] == b"403"
    body = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    assert body == proxy_http.FORBIDDEN_BODY


def test_a_refused_http2_client_gets_a_bounded_number_of_answers() -> None:
    client, refusal = _client(), grpc_deny.Refusal(None)
    for i in range(grpc_deny.MAX_STREAMS + 20):
        client.send_headers(2 * i + 1, GRPC_HEADERS, end_stream=True)
    events = _exchange(client, refusal)
    answered = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    reset = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert len(answered) == grpc_deny.MAX_STREAMS == refusal.answered
    assert len(reset) == 20


def test_garbage_instead_of_http2_ends_the_refusal() -> None:
    refusal = grpc_deny.Refusal(None)
    refusal.start()
    settings_on_a_stream = b"\x00\x00\x00\x04\x00\x00\x00\x00\x01"  # a protocol error
    out = refusal.receive(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings_on_a_stream)
    assert refusal.done and refusal.answered == 0 and out  # a GOAWAY saying why
