"""Destination discovery, as the proxy's outbound side uses it: a real gRPC server over mutual
TLS on loopback answers Lookup from a table each test controls (it stands in for the policy
server's index, which is tested with the server), and the proxy's client caches, shares and
falls back as it must. Then the choice transparent mode makes from each answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from meshward import errors
from meshward.identity import pki
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import discovery, inbound, original_dst, outbound, policy_channel, transparent
from tests import kubetest
from tests.test_inbound import sample
from tests.test_proxy_tls import TD, Mesh

WEB = "spiffe://cluster.local/ns/apps/sa/web"
API = "spiffe://cluster.local/ns/apps/sa/api"
POD = ("10.1.2.3", 8080)
SERVICE = ("10.96.0.10", 80)
UNMESHED = ("10.1.9.9", 5432)
KeyAndChain = tuple[bytes, bytes]
RECONNECT = (0.1, 0.3)


def meshed(*identities: str, ttl_ms: int = 10_000) -> policy_pb2.LookupReply:
    return policy_pb2.LookupReply(meshed=True, identities=identities, ttl_ms=ttl_ms)


def plain(ttl_ms: int = 10_000) -> policy_pb2.LookupReply:
    return policy_pb2.LookupReply(meshed=False, ttl_ms=ttl_ms)


class Table(policy_pb2_grpc.PolicyServicer):
    """Answers Lookup from ``answers`` (a status code: fail with it), after ``delay`` seconds,
    and records each call with the SPIFFE ID of the client certificate it came with."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], policy_pb2.LookupReply | grpc.StatusCode] = {}
        self.calls: list[tuple[str, int, str | None]] = []
        self.delay = 0.0

    async def Lookup(
        self, request: policy_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> policy_pb2.LookupReply:
        pems = context.auth_context().get("x509_pem_cert") or []
        caller = pki.spiffe_id(x509.load_pem_x509_certificate(pems[0])) if pems else None
        self.calls.append((request.address, request.port, caller))
        if self.delay:
            await asyncio.sleep(self.delay)
        answer = self.answers.get((request.address, request.port))
        if answer is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "not in the test's table")
        if isinstance(answer, grpc.StatusCode):
            await context.abort(answer, "the test says so")
        assert isinstance(answer, policy_pb2.LookupReply)
        return answer


def workload_credentials(mesh: Mesh, sa: str = "web") -> KeyAndChain:
    """(key PEM, chain PEM) of a workload certificate, as the proxy holds it."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = pki.sign_leaf(mesh.issuer, key.public_key(), pki.Identity("apps", sa, TD))
    return pki.key_to_pem(key), pki.to_pem(leaf, mesh.issuer.certificate)


@contextlib.asynccontextmanager
async def serving(mesh: Mesh, table: Table, port: int = 0) -> AsyncIterator[int]:
    """The table behind a gRPC server on ``port`` (0: any free one) that requires a client
    certificate chained to ``mesh``'s anchors and presents a serving certificate for
    "localhost" from its issuer."""
    cert, key = pki.new_server_certificate(mesh.issuer, ["localhost"], datetime.timedelta(hours=1))
    credentials = grpc.ssl_server_credentials(
        [(pki.key_to_pem(key), pki.to_pem(cert, mesh.issuer.certificate))],
        root_certificates=mesh.anchors,
        require_client_auth=True,
    )
    server = grpc.aio.server()
    policy_pb2_grpc.add_PolicyServicer_to_server(table, server)
    port = server.add_secure_port(f"127.0.0.1:{port}", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@contextlib.asynccontextmanager
async def client(
    port: int,
    mesh: Mesh,
    *,
    timeout: float = discovery.CALL_TIMEOUT,
    max_ttl: float = discovery.MAX_TTL,
    max_entries: int = discovery.MAX_ENTRIES,
    stale_for: float = discovery.STALE_FOR,
    retry_after: float = discovery.RETRY_AFTER,
    reconnect: tuple[float, float] = (
        policy_channel.RECONNECT_INITIAL,
        policy_channel.RECONNECT_MAX,
    ),
) -> AsyncIterator[discovery.Discovery]:
    held = workload_credentials(mesh)
    lookups = discovery.Discovery(
        f"127.0.0.1:{port}",
        "localhost",
        lambda: held,
        lambda: mesh.anchors,
        trust_domain=TD,
        timeout=timeout,
        max_ttl=max_ttl,
        max_entries=max_entries,
        stale_for=stale_for,
        retry_after=retry_after,
        reconnect=reconnect,
    )
    try:
        yield lookups
    finally:
        await lookups.close()


# -- answers and the cache -------------------------------------------------------------------


async def test_an_answer_is_asked_once_and_served_from_the_cache_within_its_ttl() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB), UNMESHED: plain()}
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        for _ in range(3):
            assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
            assert await lookups.lookup(*UNMESHED) == discovery.Plain()
    # One call per destination, each authenticated with the workload's certificate.
    assert table.calls == [(*POD, WEB), (*UNMESHED, WEB)]
    assert (lookups.counters.calls, lookups.counters.cached) == (2, 4)


async def test_an_answer_is_asked_again_once_its_ttl_is_over() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=200)}
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
        assert len(table.calls) == 1
        await asyncio.sleep(0.3)
        table.answers[POD] = meshed(WEB, API)  # the pod was replaced by a Service's endpoints
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB, API}))
    assert len(table.calls) == 2


async def test_the_ttl_is_capped_and_zero_means_not_cached() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=3_600_000), SERVICE: meshed(API, ttl_ms=0)}
    async with serving(mesh, table) as port, client(port, mesh, max_ttl=0.2) as lookups:
        await lookups.lookup(*POD)
        await lookups.lookup(*POD)
        await asyncio.sleep(0.3)
        await lookups.lookup(*POD)  # an hour asked for, 0.2 s granted
        await lookups.lookup(*SERVICE)
        await lookups.lookup(*SERVICE)
    assert [call[:2] for call in table.calls] == [POD, POD, SERVICE, SERVICE]


async def test_concurrent_connections_to_one_destination_wait_for_one_call() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {SERVICE: meshed(WEB, API)}
    table.delay = 0.3
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        waiting = [asyncio.ensure_future(lookups.lookup(*SERVICE)) for _ in range(20)]
        await asyncio.sleep(0.1)
        waiting[0].cancel()  # that connection went away: the others still get their answer
        answers = await asyncio.gather(*waiting[1:])
    assert answers == [discovery.Meshed(frozenset({WEB, API}))] * 19
    assert len(table.calls) == 1
    assert lookups.counters.shared == 19


async def test_the_cache_is_bounded_and_drops_the_oldest_answer() -> None:
    mesh, table = Mesh(), Table()
    destinations = [(f"10.1.0.{i}", 8080) for i in range(1, 6)]
    table.answers = {d: meshed(WEB) for d in destinations}
    async with serving(mesh, table) as port, client(port, mesh, max_entries=3) as lookups:
        for destination in destinations:
            await lookups.lookup(*destination)
        assert lookups.size == 3 and lookups.counters.evicted == 2
        await lookups.lookup(*destinations[-1])  # among the newest: cached
        assert len(table.calls) == 5
        await lookups.lookup(*destinations[0])  # the oldest: dropped, asked again
        assert len(table.calls) == 6
        assert lookups.size == 3


# -- no answer: mTLS to any mesh identity, never plaintext -----------------------------------


async def test_unavailable_falls_back_is_remembered_briefly_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server says UNAVAILABLE until it has listed the cluster: the proxy must not guess."""
    mesh, table = Mesh(), Table()
    table.answers = {UNMESHED: grpc.StatusCode.UNAVAILABLE}
    caplog.set_level(logging.INFO, logger=discovery.__name__)
    async with serving(mesh, table) as port, client(port, mesh, retry_after=0.2) as lookups:
        for _ in range(3):
            answer = await lookups.lookup(*UNMESHED)
            assert isinstance(answer, discovery.Unanswered)
            assert answer.reason == "UNAVAILABLE: the test says so"
        assert len(table.calls) == 1  # the failure is remembered for retry_after
        table.answers[UNMESHED] = plain()
        await asyncio.sleep(0.25)
        assert await lookups.lookup(*UNMESHED) == discovery.Plain()
    assert len(table.calls) == 2
    assert (lookups.counters.unanswered, lookups.counters.remembered) == (3, 2)
    logged = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [message for level, message in logged if level == logging.WARNING]
    assert len(warnings) == 1, warnings  # rate limited
    assert "did not say whether 10.1.9.9:5432 is meshed (UNAVAILABLE" in warnings[0]
    assert "over mTLS to any mesh identity" in warnings[0]
    assert logged[-1] == (
        logging.INFO,
        f"the policy service at 127.0.0.1:{port} answers destination lookups again",
    )


async def test_an_unreachable_server_falls_back_at_once() -> None:
    mesh = Mesh()
    async with client(kubetest.free_port(), mesh) as lookups:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await lookups.lookup(*POD)
        took = loop.time() - started
    assert isinstance(answer, discovery.Unanswered)
    assert answer.reason.startswith("UNAVAILABLE")
    assert took < discovery.CALL_TIMEOUT + 0.5


async def test_a_slow_server_falls_back_at_the_deadline() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB)}
    table.delay = 2.0
    async with serving(mesh, table) as port, client(port, mesh, timeout=0.3) as lookups:
        loop = asyncio.get_running_loop()
        started = loop.time()
        answer = await lookups.lookup(*POD)
        assert loop.time() - started < 1.5
    assert isinstance(answer, discovery.Unanswered)
    assert answer.reason.startswith("DEADLINE_EXCEEDED")


async def test_a_failure_is_remembered_so_connections_do_not_each_wait_the_deadline() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB), SERVICE: meshed(API)}
    table.delay = 2.0
    async with (
        serving(mesh, table) as port,
        client(port, mesh, timeout=0.3, retry_after=0.6) as lookups,
    ):
        loop = asyncio.get_running_loop()
        first = await lookups.lookup(*POD)
        assert isinstance(first, discovery.Unanswered)
        started = loop.time()
        again = [await lookups.lookup(*POD) for _ in range(10)]
        assert loop.time() - started < 0.1  # not 10 deadlines: the fallback at once
        assert again == [first] * 10
        assert len(table.calls) == 1
        # Per destination: another one is asked (and waits its deadline).
        assert isinstance(await lookups.lookup(*SERVICE), discovery.Unanswered)
        assert len(table.calls) == 2
        table.delay = 0.0
        await asyncio.sleep(0.6)  # past retry_after: asked again
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
    assert len(table.calls) == 3
    assert (lookups.counters.unanswered, lookups.counters.remembered) == (12, 10)


async def test_an_expired_meshed_answer_still_pins_while_the_server_is_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage of the policy service must not let any mesh identity answer for a destination
    it said only web serves; for a bounded time past the answer's expiry."""
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=200)}
    port = kubetest.free_port()
    caplog.set_level(logging.WARNING, logger=discovery.__name__)
    async with client(port, mesh, stale_for=1.0, retry_after=0) as lookups:
        async with serving(mesh, table, port):
            assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
        await asyncio.sleep(0.3)  # expired, and the server is gone
        for _ in range(2):
            assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}), stale=True)
        assert "keeping it to the identities last named for it" in caplog.text
        await asyncio.sleep(1.0)  # more than stale_for past the expiry
        unpinned = await lookups.lookup(*POD)
        assert isinstance(unpinned, discovery.Unanswered)
        assert unpinned.reason.startswith("UNAVAILABLE")
        assert lookups.size == 0
    assert lookups.counters.stale == 2
    assert len(table.calls) == 1


async def test_an_expired_plain_answer_is_not_reused_when_the_server_fails() -> None:
    """Plaintext on an old word would fail open: mTLS to any mesh identity instead."""
    mesh, table = Mesh(), Table()
    table.answers = {UNMESHED: plain(ttl_ms=200)}
    async with serving(mesh, table) as port, client(port, mesh, retry_after=0) as lookups:
        assert await lookups.lookup(*UNMESHED) == discovery.Plain()
        await asyncio.sleep(0.3)
        table.answers[UNMESHED] = grpc.StatusCode.UNAVAILABLE
        answer = await lookups.lookup(*UNMESHED)
    assert answer == discovery.Unanswered("UNAVAILABLE: the test says so")
    assert lookups.counters.stale == 0 and lookups.size == 0


async def test_a_fresh_answer_replaces_a_stale_one() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=100)}
    async with serving(mesh, table) as port, client(port, mesh, retry_after=0) as lookups:
        await lookups.lookup(*POD)
        await asyncio.sleep(0.2)
        table.answers[POD] = grpc.StatusCode.UNAVAILABLE
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}), stale=True)
        table.answers[POD] = meshed(API, ttl_ms=0)  # answered, not to be cached
        assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({API}))
        table.answers[POD] = grpc.StatusCode.UNAVAILABLE
        # The answer that was not to be cached also ended the stale one's pinning.
        assert isinstance(await lookups.lookup(*POD), discovery.Unanswered)


async def test_a_reply_that_does_not_decode_is_no_answer() -> None:
    """A server (over the same mTLS) whose Lookup sends bytes that are not a LookupReply."""
    mesh = Mesh()
    cert, key = pki.new_server_certificate(mesh.issuer, ["localhost"], datetime.timedelta(hours=1))
    credentials = grpc.ssl_server_credentials(
        [(pki.key_to_pem(key), pki.to_pem(cert, mesh.issuer.certificate))],
        root_certificates=mesh.anchors,
        require_client_auth=True,
    )

    async def garbage(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"\xff\xff\xff"

    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(garbage)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("meshward.policy.v1.Policy", {"Lookup": handler}),)
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        async with client(port, mesh) as lookups:
            answer = await lookups.lookup(*POD)
    finally:
        await server.stop(0)
    assert answer == discovery.Unanswered("the policy server's reply does not decode")


async def test_after_close_nothing_is_asked() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB)}
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        await lookups.close()
        answer = await lookups.lookup(*POD)
    assert answer == discovery.Unanswered("destination discovery is closed")
    assert table.calls == []


async def test_lookups_are_answered_again_soon_after_the_server_returns() -> None:
    """After an outage the channel reconnects within its reconnect backoff, not gRPC's default
    (1 s growing by 1.6 times: a connection attempt 4-6 s into the outage, well over a second
    after the server here is back)."""
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=0)}
    port = kubetest.free_port()
    async with client(port, mesh, retry_after=0, reconnect=RECONNECT) as lookups:
        async with serving(mesh, table, port):
            assert await lookups.lookup(*POD) == discovery.Meshed(frozenset({WEB}))
        loop = asyncio.get_running_loop()
        away_until = loop.time() + 3.0
        while loop.time() < away_until:  # connections keep coming during the outage
            started = loop.time()
            assert isinstance(await lookups.lookup(*POD), discovery.Unanswered)
            assert loop.time() - started < 0.5  # the channel is down: no wait for the deadline
            await asyncio.sleep(0.05)
        async with serving(mesh, table, port):
            back = loop.time()
            while not isinstance(await lookups.lookup(*POD), discovery.Meshed):
                await asyncio.sleep(0.02)
            recovered = loop.time() - back
    assert recovered < 1.0, f"answered again {recovered:.2f} s after the server returned"


async def test_a_server_of_another_mesh_is_not_believed() -> None:
    """An impostor answering 'plain' for a meshed pod would have the proxy send in clear."""
    ours, theirs, table = Mesh(), Mesh(), Table()
    table.answers = {POD: plain()}
    async with serving(theirs, table) as port, client(port, ours) as lookups:
        answer = await lookups.lookup(*POD)
    assert isinstance(answer, discovery.Unanswered)
    assert table.calls == []


async def test_without_a_certificate_nothing_is_asked() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: plain()}
    async with serving(mesh, table) as port:
        lookups = discovery.Discovery(
            f"127.0.0.1:{port}", "localhost", lambda: None, lambda: mesh.anchors, trust_domain=TD
        )
        try:
            answer = await lookups.lookup(*POD)
        finally:
            await lookups.close()
    assert answer == discovery.Unanswered("the proxy holds no workload certificate yet")
    assert table.calls == []


async def test_a_renewed_certificate_is_used_for_the_next_call() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=0)}
    held = [workload_credentials(mesh, "web")]
    async with serving(mesh, table) as port:
        lookups = discovery.Discovery(
            f"127.0.0.1:{port}",
            "localhost",
            lambda: held[0],
            lambda: mesh.anchors,
            trust_domain=TD,
        )
        try:
            await lookups.lookup(*POD)
            held[0] = workload_credentials(mesh, "api")
            await lookups.lookup(*POD)
        finally:
            await lookups.close()
    assert [call[2] for call in table.calls] == [WEB, API]


@pytest.mark.parametrize(
    ("reply", "says"),
    [
        (meshed(), "says the destination is meshed but names no identity"),
        (
            meshed("web.apps.serviceaccount.identity.meshward.cluster.local"),
            "is not a workload's SPIFFE ID: expected spiffe://",
        ),
        (
            meshed(WEB, "spiffe://cluster.local/ns/Apps/sa/web"),
            "its namespace is not a DNS-1123 label",
        ),
        (
            meshed("spiffe://cluster.local/ns/apps/sa/web/extra"),
            "is not a workload's SPIFFE ID: expected spiffe://",
        ),
        # Another trust domain: the outbound side would refuse such a peer anyway; pinning to
        # it could only be a mistake or a lie, so the reply as a whole is not believed.
        (
            meshed(WEB, "spiffe://other.example/ns/apps/sa/web"),
            "is of trust domain 'other.example', not 'cluster.local'",
        ),
    ],
)
async def test_a_malformed_reply_is_no_answer(reply: policy_pb2.LookupReply, says: str) -> None:
    with pytest.raises(errors.InvalidLookupReply, match=re.escape(says)):
        discovery.answer_of(reply, TD)
    mesh, table = Mesh(), Table()
    table.answers = {POD: reply}
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        answer = await lookups.lookup(*POD)
        assert isinstance(answer, discovery.Unanswered) and says in answer.reason
        assert answer.reason.startswith("the policy server names") or "no identity" in says
        assert lookups.size == 0


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"trust_domain": "Cluster.Local"}, "trust domain 'Cluster.Local' is not a lowercase"),
        ({"trust_domain": TD, "retry_after": -1.0}, "0 s or more"),
        ({"trust_domain": TD, "timeout": 0.0}, "a positive timeout"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], says: str) -> None:
    with pytest.raises(errors.ConfigError, match=re.escape(says)):
        discovery.Discovery("127.0.0.1:1", "localhost", lambda: None, lambda: b"", **options)


def test_a_plain_answer_ignores_identities_and_ttl_is_in_seconds() -> None:
    reply = policy_pb2.LookupReply(meshed=False, identities=[WEB], ttl_ms=1500)
    assert discovery.answer_of(reply, TD) == (discovery.Plain(), 1.5)
    assert discovery.answer_of(meshed(WEB, ttl_ms=90_000), TD) == (
        discovery.Meshed(frozenset({WEB})),
        discovery.MAX_TTL,
    )


# -- what transparent mode does with the answer ----------------------------------------------


def at(host: str, port: int) -> original_dst.Destination:
    return original_dst.Destination(host=host, port=port)


def test_the_plan_for_each_answer() -> None:
    pod = at(*POD)
    pinned = transparent.plan(pod, True, discovery.Meshed(frozenset({WEB})))
    assert pinned == transparent.Plan(outbound.Route(*POD, frozenset({WEB})), "meshed")
    assert transparent.plan(pod, True, discovery.Plain()) == transparent.Plan(None, "plain")
    stale = transparent.plan(pod, True, discovery.Meshed(frozenset({WEB}), stale=True))
    assert stale == transparent.Plan(outbound.Route(*POD, frozenset({WEB})), "stale")
    fallback = transparent.plan(pod, True, discovery.Unanswered("UNAVAILABLE"))
    assert fallback == transparent.Plan(outbound.Route(*POD, None), "fallback")
    # Without discovery (a policy file): today's behaviour, mTLS to any mesh identity.
    assert transparent.plan(pod, True, None) == transparent.Plan(outbound.Route(*POD, None), None)
    # Outside the mesh networks nothing is asked, and the connection passes through.
    assert transparent.plan(at("8.8.8.8", 53), False, None) == transparent.Plan(None, None)


async def test_transparent_mode_asks_for_mesh_destinations_only_and_counts() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB), UNMESHED: plain(), SERVICE: grpc.StatusCode.UNAVAILABLE}
    async with serving(mesh, table) as port, client(port, mesh) as lookups:
        outbound_side = outbound.Outbound(client_context=lambda: None)
        side = transparent.Transparent(
            inbound_side=inbound.Inbound(
                policy=lambda: None, server_context=lambda _: None, pod=None, labels={}
            ),
            outbound_side=outbound_side,
            discovery=lookups,
        )
        chosen = [
            await side.choose(at(*destination))
            for destination in (POD, POD, UNMESHED, SERVICE, ("93.184.216.34", 443))
        ]
    assert [c.route.identities if c.route else "plaintext" for c in chosen] == [
        frozenset({WEB}),
        frozenset({WEB}),
        "plaintext",
        None,
        "plaintext",
    ]
    assert [call[:2] for call in table.calls] == [POD, UNMESHED, SERVICE]  # not the public one
    c = side.counters
    assert (c.meshed, c.discovered_plain, c.discovery_fallback, c.passed_through) == (3, 1, 1, 1)
    m = outbound_side.metrics
    found = {r: sample(m, "outbound_discovery_total", result=r) for r in ("meshed", "plain")}
    assert found == {"meshed": 2, "plain": 1}
    assert sample(m, "outbound_discovery_total", result="fallback") == 1


async def test_transparent_mode_keeps_pinning_while_the_server_is_away() -> None:
    mesh, table = Mesh(), Table()
    table.answers = {POD: meshed(WEB, ttl_ms=100), UNMESHED: plain(ttl_ms=100)}
    port = kubetest.free_port()
    async with client(port, mesh) as lookups:
        outbound_side = outbound.Outbound(client_context=lambda: None)
        side = transparent.Transparent(
            inbound_side=inbound.Inbound(
                policy=lambda: None, server_context=lambda _: None, pod=None, labels={}
            ),
            outbound_side=outbound_side,
            discovery=lookups,
        )
        async with serving(mesh, table, port):
            before = [await side.choose(at(*destination)) for destination in (POD, UNMESHED)]
        await asyncio.sleep(0.2)  # both answers expired, the server gone
        after = [await side.choose(at(*destination)) for destination in (POD, UNMESHED)]
    assert [c.route.identities if c.route else "plaintext" for c in before] == [
        frozenset({WEB}),
        "plaintext",
    ]
    # Still pinned to web; the plain destination is not sent in clear on an expired word.
    assert [c.route.identities if c.route else "plaintext" for c in after] == [
        frozenset({WEB}),
        None,
    ]
    assert [c.discovered for c in after] == ["stale", "fallback"]
    c = side.counters
    assert (c.meshed, c.discovery_stale, c.discovery_fallback, c.discovered_plain) == (3, 1, 1, 1)
    m = outbound_side.metrics
    found = {
        r: sample(m, "outbound_discovery_total", result=r)
        for r in ("meshed", "plain", "stale", "fallback")
    }
    assert found == {"meshed": 1, "plain": 1, "stale": 1, "fallback": 1}
