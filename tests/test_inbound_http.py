"""Per-request authorization end to end: real HTTP/1 (http.client) and gRPC (grpcio) clients,
real mesh TLS, a real application, all on loopback, through the inbound proxy. Also live
connections closed by a policy update, the connection limits and deadlines, and the metrics a
user scrapes."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import pathlib
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from meshward.policy import compile as policy_compile
from meshward.policy import compiled as policy_compiled
from meshward.policy import decision, resources
from meshward.policy.resources import DefaultPolicy
from meshward.proxy import http as proxy_http
from meshward.proxy import inbound, metrics, tls
from tests import builders
from tests.test_inbound import ALLOW_VOTE_BOT, STRICT, Handler, echo, sample
from tests.test_proxy_tls import Mesh

VOTE_BOT = builders.ident("vote-bot")
INTRUDER = builders.ident("intruder")
WEB_DNS = "web.app.serviceaccount.identity.meshward.cluster.local"


def compiled(
    *items: object,
    default: DefaultPolicy = DefaultPolicy.DENY,
    mesh: tuple[object, ...] = (),
    probes: tuple[tuple[int, str], ...] = (),
) -> decision.Policy:
    settings = policy_compile.Settings(default_policy=default, cluster_networks=("127.0.0.0/8",))
    web = builders.pod("web-0", ports={"http": 8080}, probes=probes)
    state = builders.state(*items, pods=(web,), mesh=mesh)  # type: ignore[arg-type]
    return decision.Policy(policy_compile.compile_namespace(state, settings).document)


def with_route(policy: decision.Policy, method: str, path: str) -> decision.Policy:
    """``policy`` with its first Server's rules replaced by one HTTP route rule (hand-written
    documents may carry them; a proxy must honour them)."""
    doc = policy.document
    route = policy_compiled.Rule(
        kind="AuthorizationPolicy",
        name="upload-route",
        http=policy_compiled.HTTPMatch(method=method, path=path),
    )
    srv = doc.servers[0].model_copy(update={"rules": (route,)})
    return decision.Policy(doc.model_copy(update={"servers": (srv,)}))


class App:
    """A small HTTP/1.1 application: answers ``<METHOD> <target> <body>`` on a keep-alive
    connection and records every request it was sent (the proxy must not send it refused ones).

    ``/slow`` is answered only once :attr:`release` is set; after :attr:`keep_alive` answers on
    a connection (if set) the application closes it, as servers close idle connections."""

    def __init__(self, keep_alive: int | None = None) -> None:
        self.seen: list[str] = []
        self.release = asyncio.Event()
        self.keep_alive = keep_alive

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answered = 0
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = dict(
                    (k.lower(), v) for k, v in (line.split(": ", 1) for line in lines[1:] if line)
                )
                body = b""
                if "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        body += await reader.readexactly(size)
                        await reader.readexactly(2)
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailers
                self.seen.append(f"{method} {target}")
                if target == "/slow":
                    await self.release.wait()
                reply = f"{method} {target} ".encode() + body
                if method == "HEAD":  # the length of what a GET would get, and no body
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                    continue
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(reply), reply)
                )
                await writer.drain()
                answered += 1
                if answered == self.keep_alive:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def proxy(
    tmp: pathlib.Path,
    mesh: Mesh,
    policy: Callable[[], decision.Policy | None],
    application: Handler,
    *,
    proxy_metrics: metrics.Metrics | None = None,
    max_connections: int = 10_000,
    max_pending_per_source: int = inbound.MAX_PENDING_PER_SOURCE,
) -> AsyncIterator[tuple[int, inbound.Inbound]]:
    """``application`` behind an inbound proxy for pod web-0 (app=web), deciding as port 8080;
    yields the proxy's port and the proxy."""
    app = await asyncio.start_server(application, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    directory = tmp / f"web-proxy-{uuid.uuid4().hex[:6]}"
    own = mesh.workload(directory, "web", ns=builders.NS)

    def server_context(require: bool) -> ssl.SSLContext:
        return tls.server_context(directory, own, mesh.anchors, require_client_certificate=require)

    side = inbound.Inbound(
        policy=policy,
        server_context=server_context,
        pod="web-0",
        labels={"app": "web"},
        metrics=proxy_metrics,
        max_connections=max_connections,
        max_pending_per_source=max_pending_per_source,
    )
    server = await side.serve("127.0.0.1", 0, app_port, policy_port=8080)
    try:
        yield server.port, side
    finally:
        server.close()
        await server.wait_closed()
        app.close()


def client_dir(tmp: pathlib.Path, mesh: Mesh, sa: str) -> pathlib.Path:
    directory = tmp / f"client-{sa}-{uuid.uuid4().hex[:6]}"
    certified = mesh.workload(directory, sa, ns=builders.NS)
    tls.client_context(directory, certified, mesh.anchors)  # writes certificate.pem
    return directory


def client_ctx(tmp: pathlib.Path, mesh: Mesh, sa: str) -> ssl.SSLContext:
    directory = tmp / f"client-{sa}-{uuid.uuid4().hex[:6]}"
    certified = mesh.workload(directory, sa, ns=builders.NS)
    return tls.client_context(directory, certified, mesh.anchors)


Answer = tuple[int, dict[str, str], bytes]


def requests(
    port: int,
    ctx: ssl.SSLContext | None,
    *calls: tuple[str, str] | tuple[str, str, bytes],
    source: str = "127.0.0.1",
) -> list[Answer | str]:
    """Make ``calls`` (method, path[, body]) in order on one keep-alive connection from
    ``source``, as a user's client would; an answer, or the error's name once the connection is
    gone."""
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(
            "127.0.0.1", port, context=ctx, timeout=10, source_address=(source, 0)
        )
        if ctx is not None
        else http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    )
    answers: list[Answer | str] = []
    try:
        for call in calls:
            method, path = call[0], call[1]
            body = call[2] if len(call) == 3 else None  # type: ignore[misc]
            if conn.sock is None and answers:
                answers.append("closed")  # the proxy closed it: no silent reconnect
                continue
            try:
                conn.request(method, path, body=body)
                response = conn.getresponse()
                answers.append((response.status, dict(response.getheaders()), response.read()))
            except (OSError, http.client.HTTPException) as exc:
                answers.append(type(exc).__name__)
    finally:
        conn.close()
    return answers


async def settle(side: inbound.Inbound, opened: int) -> None:
    """Until every connection counted as opened is closed again (metrics are final then)."""
    for _ in range(200):
        closed = sample(side.metrics, "tcp_close_total", direction="inbound")
        if closed >= opened:
            return
        await asyncio.sleep(0.025)


# -- HTTP/1 ------------------------------------------------------------------------------------


async def test_a_denied_port_answers_403_with_the_reason_only_for_meshed_clients(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh, app = Mesh(), App()
    policy = compiled(*ALLOW_VOTE_BOT)  # PERMISSIVE: plaintext accepted, but has no identity
    caplog.set_level(logging.INFO, logger=inbound.__name__)
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        plain = await asyncio.to_thread(requests, port, None, ("GET", "/"))
        intruder = await asyncio.to_thread(
            requests, port, client_ctx(tmp_path, mesh, "intruder"), ("GET", "/")
        )
        allowed = await asyncio.to_thread(
            requests, port, client_ctx(tmp_path, mesh, "vote-bot"), ("GET", "/ballot")
        )
        await settle(side, 3)
    status, headers, body = plain[0]  # type: ignore[misc]
    assert (status, body) == (403, b"unauthorized request on route\n")
    assert proxy_http.ERROR_HEADER not in headers
    status, headers, body = intruder[0]  # type: ignore[misc]
    assert status == 403
    reason = headers[proxy_http.ERROR_HEADER]
    assert "web-http" in reason and INTRUDER in reason, reason
    assert allowed == [(200, {"Content-Length": "12"}, b"GET /ballot ")]
    assert app.seen == ["GET /ballot"]  # the refused requests never reached it

    # One decision per connection on this port: allowed and denied both count as tcp, once.
    m = side.metrics
    deny = "inbound_tcp_authz_deny_total"
    assert sample(m, deny, srv_name="web-http", client_id="", tls="false") == 1
    assert sample(m, deny, srv_name="web-http", client_id=INTRUDER, tls="true") == 1
    assert sample(m, deny, authz_kind="default", authz_name="deny", srv_port="8080") == 2
    assert sample(m, deny) == 2
    allow = "inbound_tcp_authz_allow_total"
    assert sample(m, allow, client_id=VOTE_BOT, authz_name="web-from-vote-bot") == 1
    assert sample(m, allow) == 1
    assert sample(m, "inbound_http_authz_deny_total") == 0
    assert sample(m, "inbound_http_authz_allow_total") == 0
    assert sample(m, "tcp_open_total", direction="inbound") == 3
    assert sample(m, "tcp_open_connections", direction="inbound") == 0
    assert sample(m, "tcp_write_bytes_total", direction="inbound") > 2 * len(
        proxy_http.FORBIDDEN_BODY
    )
    denials = [r.getMessage() for r in caplog.records if r.getMessage().startswith("denied")]
    assert any(INTRUDER in d and "default deny" in d for d in denials), denials
    assert any("unauthenticated" in d and "port 8080" in d for d in denials), denials


async def test_a_probe_path_is_allowed_under_deny_and_other_paths_get_403(
    tmp_path: pathlib.Path,
) -> None:
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),))  # no Server on 8080, default deny
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        answers = await asyncio.to_thread(
            requests,
            port,
            None,
            ("GET", "/healthz"),
            ("GET", "/healthz?full=1"),  # the query is no part of the path
            ("POST", "/healthz", b"x"),  # probes are GET only
            ("GET", "/healthz"),  # after a 403 the connection is closed
        )
        await settle(side, 1)
    assert answers[0] == (200, {"Content-Length": "13"}, b"GET /healthz ")
    assert answers[1][0] == 200  # type: ignore[index]
    assert answers[2][0] == 403 and answers[3] == "closed"  # type: ignore[index]
    assert app.seen == ["GET /healthz", "GET /healthz?full=1"]
    assert side.counters.per_request == 1
    m = side.metrics  # decided request by request: each request counts as http, once
    assert sample(m, "inbound_http_authz_allow_total", authz_kind="probe") == 2
    assert sample(m, "inbound_http_authz_allow_total") == 2
    assert sample(m, "inbound_http_authz_deny_total", authz_name="deny") == 1
    assert sample(m, "inbound_http_authz_deny_total") == 1
    assert sample(m, "inbound_tcp_authz_allow_total") == 0
    assert sample(m, "inbound_tcp_authz_deny_total") == 0


async def test_pipelined_requests_stop_at_the_first_denied_one(tmp_path: pathlib.Path) -> None:
    """Three requests in one write: the first is answered by the application, the second by
    the proxy's 403 after it, and the third is never read."""
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),))
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"GET /healthz HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /admin HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /healthz HTTP/1.1\r\nHost: web\r\n\r\n"
        )
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 5)  # until the proxy closes
        writer.close()
    first, _, rest = received.partition(b"GET /healthz ")
    assert first.startswith(b"HTTP/1.1 200 OK")
    assert rest.startswith(b"HTTP/1.1 403 Forbidden") and rest.count(b"HTTP/1.1") == 1
    assert app.seen == ["GET /healthz"]


async def test_route_rules_forward_allowed_bodies_intact(tmp_path: pathlib.Path) -> None:
    """A Server whose only rule is an HTTP route: the matching request and its chunked body
    reach the application, another method on the same path does not."""
    mesh, app = Mesh(), App()
    policy = with_route(compiled(*ALLOW_VOTE_BOT), "POST", "/upload")
    body = b"x" * 100_000
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        chunked = b"".join(
            b"%x\r\n%b\r\n" % (len(part), part) for part in (body[:70_000], body[70_000:])
        )
        writer.write(
            b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked
            + b"0\r\n\r\n"
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        assert await reader.readexactly(length) == b"POST /upload " + body
        writer.write(b"GET /upload HTTP/1.1\r\nHost: web\r\n\r\n")
        await writer.drain()
        refused = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    assert refused.startswith(b"HTTP/1.1 403 Forbidden")
    assert app.seen == ["POST /upload"]


async def test_a_refusal_after_head_requests_waits_only_for_their_bodyless_answers(
    tmp_path: pathlib.Path,
) -> None:
    """A HEAD's answer announces a length but carries no body: the 403 follows it at once."""
    mesh, app = Mesh(), App()
    policy = with_route(compiled(*ALLOW_VOTE_BOT), "HEAD", "/doc")
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"HEAD /doc HTTP/1.1\r\n\r\nHEAD /doc HTTP/1.1\r\n\r\nGET /doc HTTP/1.1\r\n\r\n"
        )
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert [a.split(b"\r\n")[0] for a in answers] == [b"200 OK", b"200 OK", b"403 Forbidden"]
    assert app.seen == ["HEAD /doc", "HEAD /doc"]


async def test_over_mesh_tls_the_bytes_read_to_detect_reach_the_application(
    tmp_path: pathlib.Path,
) -> None:
    """Where routes matter, the proxy reads a TLS client's first bytes to learn its protocol;
    they must still reach the application, for opaque bytes and for HTTP alike."""
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),), default=DefaultPolicy.ALL_AUTHENTICATED)
    async with proxy(tmp_path, mesh, lambda: policy, echo) as (port, side):
        stream = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(tmp_path, mesh, "vote-bot")
        )
        assert await ping(*stream) == b"ping\n"
        stream[1].close()
        assert side.counters.allowed == 1
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        ctx = client_ctx(tmp_path, mesh, "vote-bot")
        answers = await asyncio.to_thread(requests, port, ctx, ("GET", "/healthz"), ("GET", "/x"))
        plain = await asyncio.to_thread(requests, port, None, ("GET", "/x"))
    assert [a[0] for a in answers] == [200, 200]  # type: ignore[index]
    assert plain[0][0] == 403  # type: ignore[index]
    assert app.seen == ["GET /healthz", "GET /x"] and side.counters.per_request == 2


async def test_malformed_http_gets_400_and_the_application_nothing(
    tmp_path: pathlib.Path,
) -> None:
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),))
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /healthz HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert side.counters.per_request == 1
    assert answer.startswith(b"HTTP/1.1 400 Bad Request") and b"Content-Length" in answer
    assert app.seen == []


async def test_strict_lets_a_plaintext_probe_through_and_nothing_else(
    tmp_path: pathlib.Path,
) -> None:
    """A kubelet probe can not speak mTLS: under STRICT its probe path still answers."""
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/ready"),), mesh=STRICT)
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        probe = await asyncio.to_thread(requests, port, None, ("GET", "/ready"), ("GET", "/"))
    assert probe[0][0] == 200 and probe[1][0] == 403  # type: ignore[index]
    assert proxy_http.ERROR_HEADER not in probe[1][1]  # type: ignore[index]
    assert app.seen == ["GET /ready"]
    deny = "inbound_http_authz_deny_total"
    assert sample(side.metrics, deny, authz_kind="PeerAuthentication") == 1


# -- gRPC --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def grpc_app() -> AsyncIterator[Handler]:
    """A real grpc.aio server (the health service, SERVING); yields a handler that connects
    each proxied connection to it."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from meshward.proxy import forward

        up = await asyncio.open_connection("127.0.0.1", grpc_port)
        await forward.splice((reader, writer), up)

    try:
        yield relay
    finally:
        await server.stop(None)


async def check(port: int, creds: grpc.ChannelCredentials | None) -> str:
    """The health status, or the gRPC status code name (and the proxy's reason, if any)."""
    target = f"127.0.0.1:{port}"
    options = [("grpc.ssl_target_name_override", WEB_DNS)]
    channel = (
        grpc.aio.secure_channel(target, creds, options)
        if creds is not None
        else grpc.aio.insecure_channel(target)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        except grpc.aio.AioRpcError as err:
            trailers = dict(err.trailing_metadata() or ())
            return f"{err.code().name} {trailers.get(proxy_http.ERROR_HEADER, '-')}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def grpc_creds(tmp: pathlib.Path, mesh: Mesh, sa: str) -> grpc.ChannelCredentials:
    directory = client_dir(tmp, mesh, sa)
    return grpc.ssl_channel_credentials(
        root_certificates=mesh.anchors,
        private_key=(directory / "key.p8").read_bytes(),
        certificate_chain=(directory / tls.CERT_FILE).read_bytes(),
    )


async def test_grpc_clients_get_permission_denied_or_a_real_answer(
    tmp_path: pathlib.Path,
) -> None:
    mesh = Mesh()
    policy = compiled(*ALLOW_VOTE_BOT)
    async with grpc_app() as relay, proxy(tmp_path, mesh, lambda: policy, relay) as (port, side):
        allowed = await check(port, grpc_creds(tmp_path, mesh, "vote-bot"))
        intruder = await check(port, grpc_creds(tmp_path, mesh, "intruder"))
        plaintext = await check(port, None)
        await settle(side, 3)
    assert allowed == "SERVING"
    code, _, reason = intruder.partition(" ")
    assert code == "PERMISSION_DENIED" and INTRUDER in reason, intruder
    assert plaintext == "PERMISSION_DENIED -"  # no reason for an unmeshed client
    m = side.metrics
    deny = "inbound_tcp_authz_deny_total"
    assert sample(m, deny, client_id=INTRUDER, tls="true") == 1
    assert sample(m, deny, client_id="", tls="false") == 1
    assert sample(m, deny) == 2
    assert sample(m, "inbound_tcp_authz_allow_total", client_id=VOTE_BOT) == 1
    assert sample(m, "inbound_tcp_authz_allow_total") == 1
    assert sample(m, "inbound_http_authz_deny_total") == 0  # the gRPC status 7 tells the denial


async def test_grpc_on_a_declared_port_where_routes_matter_fails_closed(
    tmp_path: pathlib.Path,
) -> None:
    """HTTP/2 is decided per connection without a request: a route rule never matches it."""
    mesh = Mesh()
    grpc_server = resources.Server.model_validate(
        {
            "metadata": builders.meta("web-http"),
            "spec": {
                "podSelector": {"matchLabels": {"app": "web"}},
                "port": 8080,
                "proxyProtocol": "gRPC",
            },
        }
    )
    path = "/grpc.health.v1.Health/Check"
    policy = with_route(compiled(grpc_server), "POST", path)
    assert policy.routes_matter(decision.Destination(8080, {"app": "web"}, "web-0"))
    async with grpc_app() as relay, proxy(tmp_path, mesh, lambda: policy, relay) as (port, _):
        assert (await check(port, None)).startswith("PERMISSION_DENIED")


# -- live connections and limits ---------------------------------------------------------------


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    try:
        writer.write(b"ping\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    except (ConnectionError, ssl.SSLError):
        return b""


async def test_revalidate_closes_only_the_connections_the_new_policy_refuses(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = Mesh()
    current = [compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED)]
    caplog.set_level(logging.INFO, logger=inbound.__name__)
    async with proxy(tmp_path, mesh, lambda: current[0], echo) as (port, side):
        plain = await asyncio.open_connection("127.0.0.1", port)
        meshed = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx(tmp_path, mesh, "vote-bot")
        )
        assert await ping(*plain) == b"ping\n" and await ping(*meshed) == b"ping\n"

        assert side.revalidate(current[0]) == 0  # the same policy: nothing happens
        current[0] = compiled(*ALLOW_VOTE_BOT)  # plaintext no longer allowed
        assert side.revalidate(current[0]) == 1

        assert await ping(*plain) == b""  # closed by the proxy
        assert await ping(*meshed) == b"ping\n"  # untouched
        fresh = await asyncio.open_connection("127.0.0.1", port)
        assert await ping(*fresh) == b""  # new: denied
        assert side.revalidate(current[0]) == 0  # counted once
        for _, w in (plain, meshed, fresh):
            w.close()
    m = side.metrics
    terminate = "inbound_tcp_authz_terminate_total"
    assert sample(m, terminate) == 1
    assert sample(m, terminate, srv_name="web-http", client_id="", authz_name="deny") == 1
    assert side.counters.terminated == 1
    assert any("after a policy update" in r.getMessage() for r in caplog.records)


async def test_revalidate_leaves_request_by_request_connections_to_their_next_request(
    tmp_path: pathlib.Path,
) -> None:
    mesh, app = Mesh(), App()
    probes = ((8080, "/healthz"),)
    current = [compiled(probes=probes, default=DefaultPolicy.ALL_UNAUTHENTICATED)]
    async with proxy(tmp_path, mesh, lambda: current[0], app) as (port, side):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def get(path: str) -> bytes:
            writer.write(b"GET %b HTTP/1.1\r\nHost: web\r\n\r\n" % path.encode())
            await writer.drain()
            try:
                return (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).split(b"\r\n")[0]
            except (asyncio.IncompleteReadError, ConnectionError):
                return b""

        assert await get("/admin") == b"HTTP/1.1 200 OK"
        await reader.readexactly(len("GET /admin "))
        current[0] = compiled(probes=probes)  # deny, but the probe path still matters
        assert side.revalidate(current[0]) == 0
        assert await get("/healthz") == b"HTTP/1.1 200 OK"  # the next request, new policy
        await reader.readexactly(len("GET /healthz "))
        assert await get("/admin") == b"HTTP/1.1 403 Forbidden"
        writer.close()


async def test_beyond_max_connections_new_ones_are_closed_at_once(
    tmp_path: pathlib.Path,
) -> None:
    mesh = Mesh()
    policy = compiled(default=DefaultPolicy.ALL_UNAUTHENTICATED)
    async with proxy(tmp_path, mesh, lambda: policy, echo, max_connections=1) as (port, side):
        first = await asyncio.open_connection("127.0.0.1", port)
        assert await ping(*first) == b"ping\n"
        second = await asyncio.open_connection("127.0.0.1", port)
        assert await ping(*second) == b""
        assert await ping(*first) == b"ping\n"  # the open one goes on
        first[1].close()
        second[1].close()
        await settle(side, 1)
        third = await asyncio.open_connection("127.0.0.1", port)
        assert await ping(*third) == b"ping\n"  # room again
        third[1].close()
    assert side.counters.over_limit == 1
    assert sample(side.metrics, "tcp_refused_over_limit_total", direction="inbound") == 1


async def test_a_denied_tcp_connection_is_closed_without_a_byte_and_counted(
    tmp_path: pathlib.Path,
) -> None:
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())
        writer.close()

    mesh = Mesh()
    policy = compiled(*ALLOW_VOTE_BOT)
    async with proxy(tmp_path, mesh, lambda: policy, sink) as (port, side):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.sendall(b"\x00\x01opaque protocol bytes")
        raw.settimeout(5)
        data = await asyncio.to_thread(raw.recv, 100)
        raw.close()
        await settle(side, 1)
    assert data == b"" and received == []
    assert sample(side.metrics, "inbound_tcp_authz_deny_total", client_id="", tls="false") == 1
    assert sample(side.metrics, "inbound_http_authz_deny_total") == 0


# -- deadlines and per-source limits -----------------------------------------------------------


async def connect(
    port: int, source: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One response with a Content-Length: (status line, body)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head.split(b"\r\n")[0], await asyncio.wait_for(reader.readexactly(length), 5)


UNFINISHED = b"GET /healthz HTTP/1.1\r\nHost: w"


async def test_unfinished_request_heads_are_cut_off_and_the_probe_gets_in(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three plaintext clients hold every slot with unfinished heads under STRICT (one keeps
    trickling bytes): each gets 408 once its head is HEAD_TIMEOUT old, and a probe gets in."""
    monkeypatch.setattr(inbound, "HEAD_TIMEOUT", 0.5)
    monkeypatch.setattr(inbound, "LINGER", 0.2)
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),), mesh=STRICT)
    async with proxy(tmp_path, mesh, lambda: policy, app, max_connections=3) as (port, side):
        loop = asyncio.get_running_loop()
        slow = [await connect(port, f"127.0.0.{i}") for i in (2, 3, 4)]
        started = loop.time()
        for _, writer in slow:
            writer.write(UNFINISHED)
            await writer.drain()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(20):
                    await asyncio.sleep(0.05)
                    writer.write(b"x")
                    await writer.drain()

        trickling = asyncio.ensure_future(trickle(slow[2][1]))
        cut = [await asyncio.wait_for(reader.read(), 5) for reader, _ in slow]
        elapsed = loop.time() - started
        await asyncio.gather(trickling, return_exceptions=True)
        probe = await asyncio.to_thread(requests, port, None, ("GET", "/healthz"))
        for _, writer in slow:
            writer.close()
    assert all(c.startswith(b"HTTP/1.1 408 Request Timeout") for c in cut), cut
    assert b"send each request's line and headers without pausing" in cut[0]
    assert 0.5 <= elapsed < 2.5, elapsed
    assert probe[0][0] == 200  # type: ignore[index]
    assert app.seen == ["GET /healthz"]
    assert side.counters.over_limit == 0


async def test_one_source_can_not_hold_every_slot_before_it_is_allowed(
    tmp_path: pathlib.Path,
) -> None:
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/healthz"),), mesh=STRICT)
    limits = {"max_connections": 3, "max_pending_per_source": 2}
    async with proxy(tmp_path, mesh, lambda: policy, app, **limits) as (port, side):
        held = [await connect(port, "127.0.0.2") for _ in range(3)]
        for _, writer in held:
            writer.write(UNFINISHED)
            await writer.drain()
        assert await asyncio.wait_for(held[2][0].read(), 5) == b""  # closed at once
        probe = await asyncio.to_thread(requests, port, None, ("GET", "/healthz"))
        assert probe[0][0] == 200  # type: ignore[index]
        for _, writer in held:
            writer.close()
        await settle(side, 3)

        # Allowed connections no longer count against their source: three open from one.
        kept = []
        for _ in range(3):
            reader, writer = await connect(port, "127.0.0.2")
            kept.append(writer)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
            await writer.drain()
            assert (await answer(reader))[0] == b"HTTP/1.1 200 OK"
        for writer in kept:
            writer.close()
    assert side.counters.source_limited == 1 and side.counters.over_limit == 0
    assert sample(side.metrics, "tcp_refused_source_limit_total", direction="inbound") == 1


async def test_an_idle_keep_alive_connection_is_closed_but_a_slow_answer_is_awaited(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbound, "IDLE_TIMEOUT", 0.3)
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/slow"),))
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, _):
        loop = asyncio.get_running_loop()
        reader, writer = await connect(port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: w\r\n\r\n")
        await writer.drain()
        loop.call_later(0.8, app.release.set)  # longer than IDLE_TIMEOUT: an answer is owed
        assert await answer(reader) == (b"HTTP/1.1 200 OK", b"GET /slow ")
        answered = loop.time()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # then idle: closed
        idle = loop.time() - answered
        writer.close()
    assert 0.3 <= idle < 2.0, idle


async def test_a_refusal_waits_for_owed_answers_only_so_long(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allowed request the application never answers, then a denied one: the proxy can not
    send its 403 (it would read as the first answer), so it closes after ANSWER_TIMEOUT."""
    monkeypatch.setattr(inbound, "ANSWER_TIMEOUT", 0.3)
    mesh, app = Mesh(), App()
    policy = compiled(probes=((8080, "/slow"),))
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, side):
        reader, writer = await connect(port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: w\r\n\r\nGET /admin HTTP/1.1\r\n\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        await settle(side, 1)
        app.release.set()
    assert app.seen == ["GET /slow"]
    assert side.counters.requests_denied == 1


# -- when the application ends -----------------------------------------------------------------


async def test_when_the_application_closes_an_idle_connection_the_client_is_closed_too(
    tmp_path: pathlib.Path,
) -> None:
    """Else the client's next request would go into a dead connection and wait forever."""
    mesh, app = Mesh(), App(keep_alive=1)
    policy = compiled(probes=((8080, "/healthz"),))
    async with proxy(tmp_path, mesh, lambda: policy, app) as (port, _):
        reader, writer = await connect(port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n")
        await writer.drain()
        assert await answer(reader) == (b"HTTP/1.1 200 OK", b"GET /healthz ")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        again = await asyncio.to_thread(
            requests, port, None, ("GET", "/healthz"), ("GET", "/healthz")
        )
    # http.client does not look for the close before its second request, which fails at once
    # (it would time out if the proxy held the client's side open).
    assert again[0][0] == 200, again  # type: ignore[index]
    assert again[1] in ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError"), again


async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An HTTP/1.0 server: a response without a length, ended by closing the connection."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + b"y" * 100_000)
    await writer.drain()
    writer.close()


async def test_a_response_ended_by_the_close_reaches_its_end_plain_and_over_mesh_tls(
    tmp_path: pathlib.Path,
) -> None:
    """The client is closed gracefully: a TLS client gets the whole body and a clean end."""
    mesh = Mesh()
    policy = compiled(probes=((8080, "/healthz"),), default=DefaultPolicy.ALL_AUTHENTICATED)
    async with proxy(tmp_path, mesh, lambda: policy, close_delimited) as (port, side):
        plain = await asyncio.to_thread(requests, port, None, ("GET", "/healthz"))
        meshed = await asyncio.to_thread(
            requests, port, client_ctx(tmp_path, mesh, "vote-bot"), ("GET", "/doc")
        )
    expected = (200, {"Content-Type": "text/plain"}, b"y" * 100_000)
    assert plain == [expected] and meshed == [expected]
    assert side.counters.per_request == 2


# -- tunnels -----------------------------------------------------------------------------------


async def tunnels(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accepts a WebSocket upgrade or a CONNECT, then echoes."""
    head = await reader.readuntil(b"\r\n\r\n")
    if head.startswith(b"CONNECT "):
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
    else:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
    await echo(reader, writer)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("GET", "/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"),
        ("CONNECT", "db.app:5432", b""),
    ],
)
async def test_a_policy_update_closes_a_tunnel_it_no_longer_allows(
    tmp_path: pathlib.Path, method: str, target: str, headers: bytes
) -> None:
    mesh = Mesh()
    current = [with_route(compiled(*ALLOW_VOTE_BOT), method, target)]
    async with proxy(tmp_path, mesh, lambda: current[0], tunnels) as (port, side):
        reader, writer = await connect(port)
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: web\r\n".encode() + headers + b"\r\n")
        await writer.drain()
        status = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).split(b" ")[1]
        assert status in (b"101", b"200")
        assert await ping(reader, writer) == b"ping\n"

        assert side.revalidate(current[0]) == 0  # still allowed: untouched
        assert await ping(reader, writer) == b"ping\n"
        current[0] = with_route(compiled(*ALLOW_VOTE_BOT), method, "/other")
        assert side.revalidate(current[0]) == 1
        assert await ping(reader, writer) == b""
        assert side.revalidate(current[0]) == 0  # counted once
        writer.close()
    m = side.metrics
    terminate = "inbound_tcp_authz_terminate_total"
    assert sample(m, terminate, srv_name="web-http", authz_name="deny", client_id="") == 1
    assert sample(m, terminate) == 1 and side.counters.terminated == 1
