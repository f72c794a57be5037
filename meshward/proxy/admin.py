"""The proxy's admin server: probes, metrics and the current identity, over plain HTTP/1.

    GET /live       200 while the process runs
    GET /ready      200 once the proxy holds a certificate, 503 before (and after it expired)
    GET /metrics    Prometheus text (see :mod:`meshward.proxy.metrics`)
    GET /identity   JSON: identity name, SPIFFE ID, validity and seconds left, the leaf's
                    issuer, and the trust bundle in force; 503 without a certificate
    GET /identity?format=pem   the certificate chain the proxy presents, PEM (public material
                    only: the key never leaves key.p8)
    POST /shutdown  stop the proxy as SIGTERM would (exit status 0); from loopback only

``/shutdown`` is for pods that finish, such as a Job's: a sidecar that never exits keeps the pod
running after its application is done, so the application's last step is
``curl -X POST http://localhost:4191/shutdown``. Only a caller in the pod itself may ask: the
admin port is reachable from other pods (the kubelet probes it), and they get 403.

Five small endpoints do not need a web framework: this is a small asyncio server that reads
one request head (at most 8 KiB, within 5 s), answers it and closes the connection, which keeps
the proxy's memory small and its surface obvious. Anything else gets 404, 405 or 400.

``/identity`` is also what an anchor rotation waits on: ``trust_bundle.fingerprint`` says which
bundle the proxy has loaded (:func:`meshward.trustbundle.fingerprint`, the same value the
operator computes from the ConfigMap) and ``issuer.fingerprint`` which issuer signed its leaf
(:func:`meshward.trustbundle.certificate_fingerprint` of the issuer certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import signal
from collections.abc import Callable

from meshward import trustbundle
from meshward.proxy import identity, metrics

logger = logging.getLogger(__name__)

MAX_HEAD = 8 * 1024
READ_TIMEOUT = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"

    def encode(self) -> bytes:
        head = (
            f"HTTP/1.1 {self.status} {_REASONS[self.status]}\r\n"
            f"content-type: {self.content_type}\r\n"
            f"content-length: {len(self.body)}\r\n"
            "connection: close\r\n\r\n"
        )
        return head.encode("ascii") + self.body


class Admin:
    """Answers admin requests from the proxy's live state (pure: :meth:`respond` does no I/O)."""

    def __init__(
        self,
        *,
        metrics: metrics.Metrics,
        certified: Callable[[], identity.Certified | None],
        trust: Callable[[], trustbundle.Bundle] | None = None,
        now: Callable[[], datetime.datetime] = lambda: datetime.datetime.now(datetime.UTC),
        shutdown: Callable[[], None] = lambda: signal.raise_signal(signal.SIGTERM),
    ) -> None:
        """``trust`` gives the trust bundle in force (None: not reported); ``shutdown`` stops the
        proxy (by default the process signals itself, taking the path a kubelet's stop takes)."""
        self._metrics = metrics
        self._certified = certified
        self._trust = trust
        self._now = now
        self._shutdown = shutdown

    def respond(self, method: str, target: str, *, from_loopback: bool = False) -> Response:
        """The answer to one request; ``from_loopback`` says the caller is in the pod itself."""
        path, _, query = target.partition("?")
        if path == "/shutdown":
            return self._shutdown_requested(method, from_loopback)
        routes: dict[str, Callable[[str], Response]] = {
            "/live": lambda _: Response(200, b"live\n"),
            "/ready": self._ready,
            "/metrics": lambda _: Response(
                200, self._metrics.exposition(), "text/plain; version=0.0.4; charset=utf-8"
            ),
            "/identity": self._identity,
        }
        route = routes.get(path)
        if route is None:
            known = ", ".join((*routes, "/shutdown"))
            return Response(404, f"no such endpoint {path!r}: try {known}\n".encode())
        if method not in ("GET", "HEAD"):
            return Response(405, f"{path} answers GET only\n".encode())
        response = route(query)
        if method == "HEAD":
            return dataclasses.replace(response, body=b"")
        return response

    def _shutdown_requested(self, method: str, from_loopback: bool) -> Response:
        if method != "POST":
            return Response(405, b"/shutdown answers POST only\n")
        if not from_loopback:
            logger.warning("refused a shutdown request from outside the pod")
            return Response(403, b"/shutdown is taken from loopback only, inside the pod\n")
        logger.info("shutdown requested on the admin port")
        self._shutdown()
        return Response(200, b"shutting down\n")

    def _held(self) -> identity.Certified | None:
        certified = self._certified()
        if certified is None or certified.not_after <= self._now():
            return None
        return certified

    def _ready(self, _: str) -> Response:
        if self._held() is None:
            return Response(503, b"not ready: no certificate yet\n")
        return Response(200, b"ready\n")

    def _identity(self, query: str) -> Response:
        certified = self._held()
        if certified is None:
            return Response(503, b"no certificate yet\n")
        if query == "format=pem":
            return Response(200, certified.chain_pem(), "application/x-pem-file")
        issuer = certified.issuer
        body: dict[str, object] = {
            "identity": certified.identity.dns_name,
            "spiffe_id": certified.identity.spiffe_id,
            "not_before": certified.not_before.isoformat(),
            "not_after": certified.not_after.isoformat(),
            "seconds_left": int((certified.not_after - self._now()).total_seconds()),
            "serial": format(certified.leaf.serial_number, "x"),
            "issuer": {
                "subject": certified.leaf.issuer.rfc4514_string(),
                "fingerprint": (
                    trustbundle.certificate_fingerprint(issuer) if issuer is not None else None
                ),
            },
        }
        if self._trust is not None:
            bundle = self._trust()
            body["trust_bundle"] = {
                "fingerprint": bundle.fingerprint,
                "anchors": [
                    {
                        "subject": anchor.subject,
                        "not_after": anchor.not_after.isoformat(),
                        "fingerprint": anchor.fingerprint,
                    }
                    for anchor in bundle.describe()
                ],
            }
        return Response(200, json.dumps(body, indent=2).encode() + b"\n", "application/json")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request per connection; the connection is closed on every path."""
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except asyncio.LimitOverrunError:
                response = Response(400, b"request head too large\n")
            except (asyncio.IncompleteReadError, TimeoutError):
                return
            else:
                response = self._parse_and_respond(head, _is_loopback(writer))
            writer.write(response.encode())
            await writer.drain()
        except (OSError, ConnectionError) as exc:
            logger.debug("admin connection ended: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    def _parse_and_respond(self, head: bytes, from_loopback: bool) -> Response:
        line = head.split(b"\r\n", 1)[0]
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return Response(400, b"not an HTTP/1 request line\n")
        try:
            method, target = parts[0].decode("ascii"), parts[1].decode("ascii")
        except UnicodeDecodeError:
            return Response(400, b"request line is not ASCII\n")
        return self.respond(method, target, from_loopback=from_loopback)

    async def serve(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(self.handle, host, port, limit=MAX_HEAD)


def _is_loopback(writer: asyncio.StreamWriter) -> bool:
    """Whether the connection comes from this host's loopback (in a pod: the pod itself)."""
    peer = writer.get_extra_info("peername")
    try:
        address = ipaddress.ip_address(peer[0]) if peer else None
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback
