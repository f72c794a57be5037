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
  listed the cluster, the deadline passed, a malformed reply, no workload certificate yet).
  The proxy never guesses plaintext: it carries the connection over mTLS to any mesh identity,
  as without discovery, so that nothing leaves in clear on a guess (a destination that is in
  fact unmeshed then fails to connect). The fallback is logged at most once per
  :data:`LOG_INTERVAL` seconds, with how many happened since.

Answers are cached per (address, port) for the time-to-live the server gives, at most
:data:`MAX_TTL` seconds, and for at most :data:`MAX_ENTRIES` destinations (the oldest answer is
dropped first). Concurrent connections to one destination wait for one call; each call has
:data:`CALL_TIMEOUT` seconds. No answer is not cached: the next connection asks again.

The channel is the policy stream's (:class:`meshward.proxy.policy_stream.Channel`): the
workload certificate as client certificate, the server verified against the trust bundle in
force, replaced when either changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from collections.abc import Callable

import grpc

from meshward import errors
from meshward.identity import pki
from meshward.policyserver._proto import policy_pb2, policy_pb2_grpc
from meshward.proxy import policy_stream

logger = logging.getLogger(__name__)

CALL_TIMEOUT = 1.0
"""Seconds a lookup may take; the application's connection waits that long at most."""
MAX_TTL = 30.0
"""Seconds an answer is acted on at most, whatever the server allows."""
MAX_ENTRIES = 10_000
LOG_INTERVAL = 10.0
"""Seconds between warnings about lookups that went unanswered."""

_SPIFFE_ID = re.compile(r"spiffe://([^/]+)/ns/([^/]+)/sa/([^/]+)")
_SHOWN = 100


@dataclasses.dataclass(frozen=True)
class Meshed:
    """Carry the connection over mTLS; the peer must prove one of ``identities``."""

    identities: frozenset[str]


@dataclasses.dataclass(frozen=True)
class Plain:
    """Nothing meshed answers there: pass the connection through in plaintext."""


@dataclasses.dataclass(frozen=True)
class Unanswered:
    """No usable answer, for ``reason``: carry the connection over mTLS to any mesh identity."""

    reason: str


Answer = Meshed | Plain | Unanswered


def answer_of(
    reply: policy_pb2.LookupReply, max_ttl: float = MAX_TTL
) -> tuple[Meshed | Plain, float]:
    """What ``reply`` says, and for how many seconds it may be acted on (at most ``max_ttl``).

    Raises :class:`~meshward.errors.InvalidLookupReply` for a meshed destination without
    identities or with an identity that is not a workload's SPIFFE ID.
    """
    ttl = min(reply.ttl_ms / 1000, max_ttl)
    if not reply.meshed:
        return Plain(), ttl
    if not reply.identities:
        raise errors.InvalidLookupReply(
            "the policy server says the destination is meshed but names no identity that must "
            "answer there"
        )
    return Meshed(frozenset(_workload_id(text) for text in reply.identities)), ttl


def _workload_id(text: str) -> str:
    match = _SPIFFE_ID.fullmatch(text)
    try:
        if match is None:
            raise errors.InvalidIdentity("it is not spiffe://<trust domain>/ns/<ns>/sa/<sa>")
        trust_domain, namespace, service_account = match.groups()
        return pki.Identity(namespace, service_account, trust_domain).spiffe_id
    except errors.InvalidIdentity as exc:
        raise errors.InvalidLookupReply(
            f"the policy server names {text[:_SHOWN]!r} as an identity: {exc}"
        ) from None


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
    evicted: int = 0
    """Answers dropped, still valid, to keep the cache within its bound."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    answer: Meshed | Plain
    expires: float
    """In the event loop's clock."""


Key = tuple[str, int]


class Discovery:
    """The proxy's client of ``Lookup``, with the cache, call sharing and fallback of the
    module docstring; one per proxy, shared by all its outbound connections."""

    def __init__(
        self,
        address: str,
        server_name: str,
        credentials: policy_stream.Credentials,
        anchors: Callable[[], bytes],
        *,
        timeout: float = CALL_TIMEOUT,
        max_ttl: float = MAX_TTL,
        max_entries: int = MAX_ENTRIES,
        log_interval: float = LOG_INTERVAL,
    ) -> None:
        """Ask the policy service at ``address`` ("host:port"), whose certificate names
        ``server_name``. ``credentials`` gives the workload's key and chain (None while it has
        none: every lookup goes unanswered then), ``anchors`` the trust bundle in force (PEM)."""
        if max_entries < 1 or max_ttl < 0 or timeout <= 0:
            raise errors.ConfigError(
                f"discovery needs at least one cache entry, a time-to-live of 0 s or more and "
                f"a positive timeout, not {max_entries}, {max_ttl} s and {timeout} s"
            )
        self._channel = policy_stream.Channel(address, server_name)
        self.address = address
        self._credentials = credentials
        self._anchors = anchors
        self._timeout = timeout
        self._max_ttl = max_ttl
        self._max_entries = max_entries
        self._log_interval = log_interval
        self._cache: dict[Key, _Entry] = {}
        """In insertion order: the first is the oldest."""
        self._pending: dict[Key, asyncio.Task[Answer]] = {}
        self._logged_at = float("-inf")
        self._not_logged = 0
        self._failing = False
        self.counters = Counters()

    @property
    def size(self) -> int:
        """How many answers the cache holds (expired ones included until they are asked for)."""
        return len(self._cache)

    async def lookup(self, address: str, port: int) -> Answer:
        """How a connection to ``address`` (an IP literal) and ``port`` should go."""
        key = (address, port)
        loop = asyncio.get_running_loop()
        self.counters.lookups += 1
        entry = self._cache.get(key)
        if entry is not None:
            if loop.time() < entry.expires:
                self.counters.cached += 1
                return entry.answer
            del self._cache[key]
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
        """Cancel the calls in flight and close the channel."""
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
        credentials = self._credentials()
        if credentials is None:
            return self._unanswered(key, "the proxy holds no workload certificate yet")
        tls = policy_stream.ChannelTls(
            anchors=self._anchors(), key=credentials[0], chain=credentials[1]
        )
        self.counters.calls += 1
        try:
            stub = policy_pb2_grpc.PolicyStub(self._channel.get(tls))  # type: ignore[no-untyped-call]
            reply = await stub.Lookup(
                policy_pb2.LookupRequest(address=address, port=port), timeout=self._timeout
            )
            answer, ttl = answer_of(reply, self._max_ttl)
        except grpc.aio.AioRpcError as exc:
            return self._unanswered(key, f"{exc.code().name}: {exc.details()}")
        except errors.InvalidLookupReply as exc:
            return self._unanswered(key, str(exc))
        except Exception as exc:  # noqa: BLE001 - whatever failed, the answer is no answer
            return self._unanswered(key, f"{type(exc).__name__}: {exc}")
        if self._failing:
            logger.info("the policy service at %s answers destination lookups again", self.address)
            self._failing = False
        if ttl > 0:
            self._store(key, answer, asyncio.get_running_loop().time() + ttl)
        return answer

    def _store(self, key: Key, answer: Meshed | Plain, expires: float) -> None:
        self._cache.pop(key, None)
        self._cache[key] = _Entry(answer, expires)
        while len(self._cache) > self._max_entries:
            del self._cache[next(iter(self._cache))]
            self.counters.evicted += 1

    def _unanswered(self, key: Key, reason: str) -> Unanswered:
        self.counters.unanswered += 1
        self._failing = True
        now = asyncio.get_running_loop().time()
        if now - self._logged_at >= self._log_interval:
            since = (
                f" ({self._not_logged} more unanswered since the last warning)"
                if self._not_logged
                else ""
            )
            logger.warning(
                "the policy service at %s did not say whether %s is meshed (%s): carrying it "
                "over mTLS to any mesh identity%s",
                self.address,
                _shown(key),
                reason,
                since,
            )
            self._logged_at = now
            self._not_logged = 0
        else:
            self._not_logged += 1
        return Unanswered(reason)


def _shown(key: Key) -> str:
    address, port = key
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
