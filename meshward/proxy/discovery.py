"""Destination discovery: before the outbound side carries a connection into the mesh networks,
it asks the policy service whether the destination is meshed and who must answer there.

An address in the pod or service ranges is not necessarily a meshed proxy: an unmeshed pod, the
API server or a Service of unmeshed endpoints sit there too and speak plaintext only; and a
meshed destination should be held to the identities that serve it, not to any certificate the
trust anchors vouch for. The policy service knows both (``Lookup`` in
``meshward/policyserver/_proto/policy.proto``); the answer is one of:

- :class:`Meshed`: carry the connection over mTLS, the peer must prove one of ``identities``;
- :class:`Plain`: nothing meshed answers there, pass the connection through in plaintext;
- :class:`Unanswered`: no usable answer (the server unreachable, UNAVAILABLE until it has
  listed the cluster, the deadline passed, a malformed reply or one naming an identity of
  another trust domain, no workload certificate yet).
  The proxy never guesses plaintext: it carries the connection over mTLS to any mesh identity,
  as without discovery, so that nothing leaves in clear on a guess (a destination that is in
  fact unmeshed then fails to connect). The fallback is logged at most once per
  :data:`LOG_INTERVAL` seconds, with how many happened since.

Answers are cached per (address, port) for the time-to-live the server gives, at most
:data:`MAX_TTL` seconds, and for at most :data:`MAX_ENTRIES` destinations (the oldest answer is
dropped first). Concurrent connections to one destination wait for one call; each call has
:data:`CALL_TIMEOUT` seconds.

When the server does not answer:

- a destination it said was meshed at most :data:`STALE_FOR` seconds ago (past that answer's
  expiry) stays pinned to the identities it named then (``Meshed(..., stale=True)``): an outage
  of the policy service must not widen who may answer for a meshed destination;
- a destination it said was plain is *not* passed in plaintext on the old word once it expired
  (that would fail open): it gets the mTLS fallback like one never answered for;
- the failure is remembered for :data:`RETRY_AFTER` seconds for that destination, so that during
  a partition only one connection per destination and interval waits for the deadline, the
  others get the fallback at once.

The channel (:class:`meshward.proxy.policy_channel.Channel`) authenticates as the policy
stream does: the workload certificate as client certificate, the server verified against the
trust bundle in force, replaced when either changes. Calls fail fast while it is down, and it
reconnects with a backoff of at most :data:`~meshward.proxy.policy_channel.RECONNECT_MAX`
seconds, so lookups are answered again within seconds of the server's return.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable

import grpc

from meshward import errors
from meshward.identity import pki
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import policy_channel

logger = logging.getLogger(__name__)

CALL_TIMEOUT = 1.0
"""Seconds a lookup may take; the application's connection waits that long at most."""
MAX_TTL = 30.0
"""Seconds an answer is acted on at most, whatever the server allows."""
MAX_ENTRIES = 10_000
LOG_INTERVAL = 10.0
"""Seconds between warnings about lookups that went unanswered."""
STALE_FOR = 300.0
"""Seconds past its expiry a meshed answer still pins its destination while the server does
not answer. Who serves a destination changes rarely and the answer is the only pin: without
it, a policy-service outage (a rollout, a partition) would let any mesh identity answer for
every meshed destination after :data:`MAX_TTL` seconds. Bounded, so that a destination whose
workloads did change since is not held to identities long gone (it falls back to any mesh
identity, and connects, after five minutes)."""
RETRY_AFTER = 1.0
"""Seconds a failed lookup is remembered per destination: within them, connections to it get
the fallback at once instead of each waiting up to :data:`CALL_TIMEOUT` for a server that is
away."""


@dataclasses.dataclass(frozen=True)
class Meshed:
    """Carry the connection over mTLS; the peer must prove one of ``identities``."""

    identities: frozenset[str]
    stale: bool = False
    """The server did not answer now: these are the identities of an expired answer (at most
    :data:`STALE_FOR` seconds past its expiry)."""


@dataclasses.dataclass(frozen=True)
class Plain:
    """Nothing meshed answers there: pass the connection through in plaintext."""


@dataclasses.dataclass(frozen=True)
class Unanswered:
    """No usable answer, for ``reason``: carry the connection over mTLS to any mesh identity."""

    reason: str


Answer = Meshed | Plain | Unanswered


def answer_of(
    reply: policy_pb2.LookupReply, trust_domain: str, max_ttl: float = MAX_TTL
) -> tuple[Meshed | Plain, float]:
    """What ``reply`` says, and for how many seconds it may be acted on (at most ``max_ttl``).

    Raises :class:`~meshward.errors.InvalidLookupReply` for a meshed destination without
    identities or with an identity that is not a workload's SPIFFE ID in ``trust_domain`` (the
    proxy's own: its outbound side accepts no peer of another, so such a name could only be a
    mistake or a lie).
    """
    ttl = min(reply.ttl_ms / 1000, max_ttl)
    if not reply.meshed:
        return Plain(), ttl
    if not reply.identities:
        raise errors.InvalidLookupReply(
            "the policy server says the destination is meshed but names no identity that must "
            "answer there"
        )
    found: set[str] = set()
    for text in reply.identities:
        try:
            found.add(pki.Identity.from_spiffe_id(text, trust_domain).spiffe_id)
        except errors.InvalidIdentity as exc:
            raise errors.InvalidLookupReply(
                f"the policy server names an identity the proxy can not pin: {exc}"
            ) from None
    return Meshed(frozenset(found)), ttl


@dataclasses.dataclass
class Counters:
    """What the lookups did, for tests and logs."""

    lookups: int = 0
    cached: int = 0
    """Answered from the cache."""
    shared: int = 0
    """Waited for a call another connection to the same destination had made."""
    calls: int = 0
    """Lookup calls made to the server."""
    unanswered: int = 0
    """Lookups without a fresh answer, from a failed call or a remembered failure."""
    remembered: int = 0
    """Of those, answered from a failure remembered for :data:`RETRY_AFTER`: no call made."""
    stale: int = 0
    """Of those, pinned to the identities of an expired meshed answer."""
    evicted: int = 0
    """Answers or failures dropped to keep the cache within its bound."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    answer: Meshed | Plain
    expires: float
    """In the event loop's clock."""


@dataclasses.dataclass(frozen=True)
class _Failure:
    reason: str
    until: float
    """In the event loop's clock: no call for the destination before then."""


Key = tuple[str, int]


class Discovery:
    """The proxy's client of ``Lookup``, with the cache, call sharing and fallback of the
    module docstring; one per proxy, shared by all its outbound connections."""

    def __init__(
        self,
        address: str,
        server_name: str,
        credentials: policy_channel.Credentials,
        anchors: Callable[[], bytes],
        *,
        trust_domain: str,
        timeout: float = CALL_TIMEOUT,
        max_ttl: float = MAX_TTL,
        max_entries: int = MAX_ENTRIES,
        log_interval: float = LOG_INTERVAL,
        stale_for: float = STALE_FOR,
        retry_after: float = RETRY_AFTER,
        reconnect: tuple[float, float] = (
            policy_channel.RECONNECT_INITIAL,
            policy_channel.RECONNECT_MAX,
        ),
    ) -> None:
        """Ask the policy service at ``address`` ("host:port"), whose certificate names
        ``server_name``. ``credentials`` gives the workload's key and chain (None while it has
        none: every lookup goes unanswered then), ``anchors`` the trust bundle in force (PEM).
        A reply naming an identity outside ``trust_domain`` (the proxy's) counts as no answer.
        ``reconnect`` is the channel's reconnect backoff (first and longest, in seconds)."""
        if max_entries < 1 or timeout <= 0 or min(max_ttl, stale_for, retry_after) < 0:
            raise errors.ConfigError(
                f"discovery needs at least one cache entry, a positive timeout, and a "
                f"time-to-live, stale time and retry interval of 0 s or more, not "
                f"{max_entries}, {timeout} s, {max_ttl} s, {stale_for} s and {retry_after} s"
            )
        try:
            pki.Identity("default", "default", trust_domain)  # checks the trust domain
        except errors.InvalidIdentity:
            raise errors.ConfigError(
                f"discovery's trust domain {trust_domain!r} is not a lowercase DNS name: pass "
                "the mesh's trust domain, e.g. 'cluster.local'"
            ) from None
        # Calls fail fast (no wait_for_ready): while the channel is down a lookup gets its
        # fallback at once instead of waiting out the deadline, and the short reconnect
        # backoff has the channel up again soon after the server is (measured: waiting for
        # ready costs the deadline per lookup during an outage and gains about a second at most
        # after it).
        self._channel = policy_channel.Channel(
            address, server_name, policy_channel.reconnect_options(*reconnect)
        )
        self._trust_domain = trust_domain
        self.address = address
        self._credentials = credentials
        self._anchors = anchors
        self._timeout = timeout
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._log_interval = log_interval
        self._stale_for = stale_for
        self._retry_after = retry_after
        self._cache: dict[Key, _Entry] = {}
        """In insertion order: the first is the oldest. Expired meshed answers stay until
        :data:`STALE_FOR` past their expiry, for when the server does not answer."""
        self._failures: dict[Key, _Failure] = {}
        """Failed lookups remembered for :data:`RETRY_AFTER`, in insertion order too."""
        self._pending: dict[Key, asyncio.Task[Answer]] = {}
        self._logged_at = float("-inf")
        self._not_logged = 0
        self._failing = False
        self._closed = False
        self.counters = Counters()

    @property
    def size(self) -> int:
        """How many answers the cache holds (expired ones included until they are asked for)."""
        return len(self._cache)

    async def lookup(self, address: str, port: int) -> Answer:
        """How a connection to ``address`` (an IP literal) and ``port`` should go."""
        key = (address, port)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.counters.lookups += 1
        entry = self._cache.get(key)
        if entry is not None and now < entry.expires:
            self.counters.cached += 1
            return entry.answer
        failure = self._failures.get(key)
        if failure is not None:
            if now < failure.until:
                self.counters.unanswered += 1
                self.counters.remembered += 1
                self._not_logged += 1  # in the next warning's count
                return self._fallback(key, failure.reason, now)
            del self._failures[key]
        pending = self._pending.get(key)
        if pending is None:
            pending = loop.create_task(self._ask(key), name=f"discovery {address}:{port}")
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._settled, key))
        else:
            self.counters.shared += 1
        # Shielded: a connection that goes away does not cancel the others' answer.
        return await asyncio.shield(pending)

    async def close(self) -> None:
        """Cancel the calls in flight and close the channel; later lookups go unanswered
        (without a call, which would open another channel)."""
        self._closed = True
        pending = list(self._pending.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._channel.close()

    def _settled(self, key: Key, task: asyncio.Task[Answer]) -> None:
        if self._pending.get(key) is task:
            del self._pending[key]

    async def _ask(self, key: Key) -> Answer:
        address, port = key
        if self._closed:
            return self._unanswered(key, "destination discovery is closed", False)
        credentials = self._credentials()
        if credentials is None:
            # Nothing was waited for: no failure to remember.
            return self._unanswered(key, "the proxy holds no workload certificate yet", False)
        tls = policy_channel.ChannelTls(
            anchors=self._anchors(), key=credentials[0], chain=credentials[1]
        )
        self.counters.calls += 1
        try:
            stub = policy_pb2_grpc.PolicyStub(self._channel.get(tls))  # type: ignore[no-untyped-call]
            reply: policy_pb2.LookupReply | None = await stub.Lookup(
                policy_pb2.LookupRequest(address=address, port=port), timeout=self._timeout
            )
            if reply is None:  # what grpc.aio returns for a reply that does not decode
                raise errors.InvalidLookupReply("the policy server's reply does not decode")
            answer, ttl = answer_of(reply, self._trust_domain, self._max_ttl)
        # AioRpcError is every way the call itself fails: the server unreachable or refusing
        # the TLS handshake (UNAVAILABLE), the deadline (DEADLINE_EXCEEDED), a retired channel
        # closed under the call (CANCELLED), or a status the server chose. InvalidLookupReply
        # is a reply that can not be acted on. Anything else is a bug: it propagates, and
        # transparent mode logs it and closes the application's connection (refused, never
        # sent in clear on a guess).
        except grpc.aio.AioRpcError as exc:
            return self._unanswered(key, f"{exc.code().name}: {exc.details()}")
        except errors.InvalidLookupReply as exc:
            return self._unanswered(key, str(exc))
        if self._failing:
            logger.info("the policy service at %s answers destination lookups again", self.address)
            self._failing = False
        self._cache.pop(key, None)
        if ttl > 0:
            self._cache[key] = _Entry(answer, asyncio.get_running_loop().time() + ttl)
            self._evict(self._cache)
        return answer

    def _evict(self, held: dict[Key, _Entry] | dict[Key, _Failure]) -> None:
        """Drop the oldest of ``held`` beyond :data:`MAX_ENTRIES`."""
        while len(held) > self._max_entries:
            del held[next(iter(held))]
            self.counters.evicted += 1

    def _fallback(self, key: Key, reason: str, now: float) -> Meshed | Unanswered:
        """What a connection to ``key`` gets when the server did not answer: the identities of
        a meshed answer at most :data:`STALE_FOR` past its expiry, else :class:`Unanswered`.
        An expired plain answer is never reused: plaintext on an old word would fail open."""
        entry = self._cache.get(key)
        if entry is not None and now >= entry.expires:
            if isinstance(entry.answer, Meshed) and now < entry.expires + self._stale_for:
                self.counters.stale += 1
                return Meshed(entry.answer.identities, stale=True)
            del self._cache[key]
        return Unanswered(reason)

    def _unanswered(self, key: Key, reason: str, remember: bool = True) -> Meshed | Unanswered:
        self.counters.unanswered += 1
        self._failing = True
        now = asyncio.get_running_loop().time()
        if remember and self._retry_after > 0:
            self._failures.pop(key, None)
            self._failures[key] = _Failure(reason, now + self._retry_after)
            self._evict(self._failures)
        answer = self._fallback(key, reason, now)
        if now - self._logged_at >= self._log_interval:
            since = (
                f" ({self._not_logged} more unanswered since the last warning)"
                if self._not_logged
                else ""
            )
            doing = (
                "keeping it to the identities last named for it"
                if isinstance(answer, Meshed)
                else "carrying it over mTLS to any mesh identity"
            )
            logger.warning(
                "the policy service at %s did not say whether %s is meshed (%s): %s%s",
                self.address,
                _shown(key),
                reason,
                doing,
                since,
            )
            self._logged_at = now
            self._not_logged = 0
        else:
            self._not_logged += 1
        return answer


def _shown(key: Key) -> str:
    address, port = key
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
