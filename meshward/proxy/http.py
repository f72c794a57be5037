"""HTTP/1 as a per-request authorization needs it (sans-I/O), and the proxy's own answers.

:class:`Requests` turns the bytes a client sends into requests, each with the method and path a
decision needs, in order, pipelined or not. The bytes forwarded to the application are the
request as the parser understood it, written out again (head, then the body re-framed the same
way: a Content-Length body as is, a chunked body as chunks), never the client's raw bytes: the
application can only ever see the requests that were decided, whatever ambiguity a client tries
(request smuggling lives in the gap between two parsers' readings). The parser, ``httptools``
(llhttp), is strict: bare LF line ends, obsolete line folding, Content-Length together with
Transfer-Encoding, and a request Transfer-Encoding not ending in chunked are malformed.

:class:`Responses` follows the application's answers just enough to know when every forwarded
request has been answered, so that a refusal (403) can be written after them and not into the
middle of one. The response bytes themselves are forwarded untouched.

An ``Upgrade`` or ``CONNECT`` request may take the connection out of HTTP/1: what follows it is
held back until the application answers (101, or 2xx to CONNECT: a tunnel from then on).

The answers: :func:`forbidden` (403 "unauthorized request on route"), :func:`bad_request` (400),
:func:`request_timeout` (408) and :func:`bad_gateway` (502), each closing the connection. The
``meshward-proxy-error`` header naming the reason goes only to meshed clients (those that proved
an identity): others learn only that they were refused, not how the policy is built.
"""

from __future__ import annotations

import collections
import dataclasses

import httptools

MAX_HEAD = 64 * 1024
"""A request head (request line and headers) this large is always accepted; one larger is
refused at the latest two :data:`_PIECE` s later."""
_PIECE = 16 * 1024
"""Bytes handed to the parser at a time: how precisely a head's size is known."""
ERROR_HEADER = "meshward-proxy-error"
FORBIDDEN_BODY = b"unauthorized request on route\n"
_MAX_REASON = 1024


# -- requests ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Head:
    """A request's head, complete: decide on ``method`` and ``path``, then forward ``head``."""

    method: str
    target: str
    """The request-target as sent (origin form ``/a?b``, absolute form, ``*``, or authority)."""
    path: str
    """The path a policy matches: the target without its query, exactly as sent (no decoding:
    an exact-path rule never matches a disguised path)."""
    head: bytes
    """The head as forwarded to the application."""
    upgrade: bool
    """Upgrade or CONNECT: the connection may leave HTTP/1 once the application agrees."""


@dataclasses.dataclass(frozen=True, slots=True)
class Body:
    """Bytes of the current request's body (re-framed), to forward after its head."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Tunnel:
    """Bytes after an Upgrade or CONNECT request: not HTTP/1, forward only once the application
    accepted the upgrade."""

    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Malformed:
    """The client's bytes are not HTTP/1 this proxy accepts; nothing after them is read."""

    reason: str


Event = Head | Body | Tunnel | Malformed


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing; never leaves this module."""


def request_path(target: str) -> str:
    """The path of a request-target: ``/a/b?q`` -> ``/a/b``; ``http://h/a?q`` -> ``/a``."""
    if target.startswith("/"):
        return target.split("?", 1)[0].split("#", 1)[0]
    if "://" in target:
        try:
            path = httptools.parse_url(target.encode("latin-1")).path
        except httptools.HttpParserInvalidURLError:
            return target
        return (path or b"/").decode("latin-1")
    return target  # "*" (OPTIONS) or an authority (CONNECT)


class Requests:
    """Feed the client's bytes; get :data:`Event` s. After a :class:`Malformed`, nothing more."""

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._target = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._in_head = False
        self._chunked = False
        self._trailers: list[tuple[bytes, bytes]] = []
        self._head_done = False
        self._in_request = False
        self._failed = False
        self._tunnel = False

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._target.clear()
        self._headers = []
        self._trailers = []
        self._head_size = 0
        self._in_head = True
        self._in_request = True
        self._head_done = False

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_done = True
        method = self._parser.get_method().decode("latin-1")
        target = self._target.decode("latin-1")
        self._chunked = any(n.lower() == b"transfer-encoding" for n, _ in self._headers)
        version = self._parser.get_http_version()
        lines = [f"{method} {target} HTTP/{version}\r\n".encode("latin-1")]
        lines += [name + b": " + value + b"\r\n" for name, value in self._headers]
        lines.append(b"\r\n")
        upgrade = method == "CONNECT" or self._parser.should_upgrade()
        self._events.append(Head(method, target, request_path(target), b"".join(lines), upgrade))

    def on_body(self, body: bytes) -> None:
        if self._chunked:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        self._events.append(Body(body))

    def on_message_complete(self) -> None:
        self._in_request = False
        if self._chunked:
            trailers = b"".join(n + b": " + v + b"\r\n" for n, v in self._trailers)
            self._events.append(Body(b"0\r\n" + trailers + b"\r\n"))
            self._chunked = False

    # the interface

    @property
    def in_head(self) -> bool:
        """A request head has begun and is not complete yet (a deadline runs on it)."""
        return self._in_head and not self._failed

    @property
    def idle(self) -> bool:
        """Between requests: the last one is complete (body included) and no next one began."""
        return not self._in_request and not self._tunnel and not self._failed

    def feed(self, data: bytes) -> list[Event]:
        if self._failed or not data:
            return []
        if self._tunnel:
            return [Tunnel(data)]
        self._events = []
        for start in range(0, len(data), _PIECE):
            self._feed(data, start)
            if self._failed:
                break
            if self._tunnel:
                if start + _PIECE < len(data):
                    self._events.append(Tunnel(data[start + _PIECE :]))
                break
        return self._events

    def _feed(self, data: bytes, start: int) -> None:
        piece = data[start : start + _PIECE]
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade as upgrade:
            self._tunnel = True
            offset = int(upgrade.args[0])
            if offset < len(piece):
                self._events.append(Tunnel(piece[offset:]))
            return
        except httptools.HttpParserError as exc:
            self._failed = True
            self._events.append(Malformed(_describe(exc)))
            return
        if self._in_head:
            # Counted by pieces: the piece a head began in may also hold the previous request's
            # end, so the count exceeds the head by less than a piece.
            self._head_size += len(piece)
            if self._head_size > MAX_HEAD + _PIECE:
                self._failed = True
                self._events.append(Malformed(f"request head larger than {MAX_HEAD} bytes"))


def _describe(exc: httptools.HttpParserError) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return text.replace("`", "")


# -- responses --------------------------------------------------------------------------------


class Responses:
    """Follows the application's responses to the requests forwarded so far.

    llhttp can not be told that a response answers a HEAD (no body, whatever Content-Length
    says) or a CONNECT (a 2xx opens a tunnel); while such a request awaits its answer, bytes are
    parsed one at a time, so the response head's end is known exactly and a fresh parser takes
    over after it. That costs only on those rare connections.
    """

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._waiting: collections.deque[str] = collections.deque()
        self._bodyless = 0
        """Forwarded HEAD and CONNECT requests not answered yet."""
        self._status = 0
        self.tunnel = False
        """The application accepted an upgrade (101) or a CONNECT (2xx): bytes only from now."""
        self.broken: str | None = None
        """Why the responses can no longer be followed, if they can not."""

    @property
    def pending(self) -> int:
        """Requests forwarded and not answered yet."""
        return len(self._waiting)

    def expect(self, method: str) -> None:
        """A request with this method was forwarded: a response to it will follow."""
        self._waiting.append(method)
        if method in ("HEAD", "CONNECT"):
            self._bodyless += 1

    # httptools callbacks

    def on_message_begin(self) -> None:
        if not self._waiting:
            self.broken = "the application answered a request it was never sent"
            raise _Stop

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        method = self._waiting[0]
        if method == "CONNECT" and 200 <= self._status < 300:
            self._answered()
            self.tunnel = True
            raise _Stop
        if method == "HEAD" and self._status >= 200:
            self._answered()
            raise _Stop

    def on_message_complete(self) -> None:
        if self._status >= 200:
            self._answered()  # 1xx are interim: the final answer is still to come

    def _answered(self) -> None:
        if self._waiting.popleft() in ("HEAD", "CONNECT"):
            self._bodyless -= 1

    # the interface

    def feed(self, data: bytes) -> None:
        if self.tunnel or self.broken is not None or not data:
            return
        if not self._bodyless:
            self._feed(data)
            return
        for i in range(len(data)):
            if self._feed(data[i : i + 1]):
                # a bodyless answer's head ended on this byte: the rest is the next response
                self._parser = httptools.HttpResponseParser(self)
            if self.tunnel or self.broken is not None:
                return
            if not self._bodyless:
                self._feed(data[i + 1 :])
                return

    def _feed(self, data: bytes) -> bool:
        """Parse ``data``; True when a callback stopped the parser on purpose."""
        if not data:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.tunnel = self._status == 101
            if not self.tunnel:
                self.broken = "the application answered an upgrade it did not accept"
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Stop):
                return True
            raise
        except httptools.HttpParserError as exc:
            self.broken = f"the application's response is malformed: {_describe(exc)}"
        return False


# -- the proxy's own answers ------------------------------------------------------------------


def header_value(text: str) -> str:
    """``text`` safe as one header value: printable ASCII only, bounded."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean[:_MAX_REASON]


def _response(status: str, body: bytes, reason: str | None) -> bytes:
    lines = [
        f"HTTP/1.1 {status}",
        "content-type: text/plain",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if reason is not None:
        lines.append(f"{ERROR_HEADER}: {header_value(reason)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def forbidden(reason: str | None) -> bytes:
    """The 403 for a refused request; ``reason`` (the header) only for a meshed client."""
    return _response("403 Forbidden", FORBIDDEN_BODY, reason)


def bad_request(what: str) -> bytes:
    """The 400 for bytes that are not a valid HTTP/1 request: says what is wrong."""
    body = f"malformed HTTP/1 request: {header_value(what)}; send a valid HTTP/1.1 request\n"
    return _response("400 Bad Request", body.encode("latin-1"), None)


def request_timeout(seconds: float) -> bytes:
    """The 408 for a request head that did not arrive in time."""
    body = (
        f"request head not complete within {seconds:g} s of its first byte; "
        "send each request's line and headers without pausing\n"
    )
    return _response("408 Request Timeout", body.encode("latin-1"), None)


def bad_gateway() -> bytes:
    """The 502 for an allowed request the application did not take (its port refused)."""
    return _response("502 Bad Gateway", b"the application is not accepting connections\n", None)
