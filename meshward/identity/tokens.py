"""Who sent this token? The TokenReview API answers; nothing else in meshward decides it.

A proxy's projected ServiceAccount token is minted for the audience ``identity.meshward.io``, so
a token stolen from another system (minted for another audience) does not work here, and a token
for this audience is useless to anything else. The token itself is never logged or kept.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import aiohttp
from kubernetes_asyncio import client

from meshward import errors
from meshward.identity import serving
from meshward.policy import resources

AUDIENCE = "identity.meshward.io"
USER_PREFIX = "system:serviceaccount:"
REVIEW_TIMEOUT = 5.0
RBAC_HINT = (
    "bind its ServiceAccount to a ClusterRole with the rule "
    "{apiGroups: [authentication.k8s.io], resources: [tokenreviews], verbs: [create]}"
)


@dataclasses.dataclass(frozen=True)
class ServiceAccount:
    """The ServiceAccount a token authenticates."""

    namespace: str
    name: str


def parse_username(username: str) -> ServiceAccount:
    """``system:serviceaccount:<ns>:<sa>`` -> ServiceAccount; TokenRejected for anything else."""
    if not username.startswith(USER_PREFIX):
        raise errors.TokenRejected(
            f"the token authenticates {username!r}, not a ServiceAccount: use the pod's "
            f"projected ServiceAccount token for audience {AUDIENCE}"
        )
    parts = username[len(USER_PREFIX) :].split(":")
    if len(parts) != 2 or not all(resources.is_dns_label(p) for p in parts):
        raise errors.TokenRejected(
            f"the token's user {username!r} does not name a namespace and ServiceAccount "
            "that are DNS-1123 labels"
        )
    return ServiceAccount(namespace=parts[0], name=parts[1])


class Reviewer:
    """Asks the API server who a token belongs to (TokenReview, authentication.k8s.io/v1)."""

    def __init__(self, api: client.ApiClient, audience: str = AUDIENCE) -> None:
        # Any: called with _preload_content=False it returns the raw aiohttp response.
        self._auth: Any = client.AuthenticationV1Api(api)
        self._api = api
        self._host = api.configuration.host
        self.audience = audience

    async def review(self, token: str) -> ServiceAccount:
        """The ServiceAccount ``token`` authenticates for our audience.

        Raises TokenRejected (unauthenticated, wrong audience, expired, deleted account) or
        ClusterUnreachable (the API server did not answer, or failed).
        """
        if not token:
            raise errors.TokenRejected("no token: send the pod's projected ServiceAccount token")
        # Plain JSON both ways: the client's model (de)serialisation cost more CPU per Certify
        # than signing the certificate (measured with cProfile under load).
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self.audience]},
        }
        try:
            response = await self._auth.create_token_review(
                body, _preload_content=False, _request_timeout=REVIEW_TIMEOUT
            )
            try:
                payload = await response.read()
            finally:
                response.release()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise errors.ClusterUnreachable(
                f"the API server at {self._host} did not answer the TokenReview: "
                f"{type(exc).__name__} {exc}"
            ) from exc
        if response.status == 403:
            raise errors.ClusterUnreachable(
                f"the API server at {self._host} forbids this service to create TokenReviews: "
                f"{RBAC_HINT}"
            )
        if not 200 <= response.status <= 299:
            raise errors.ClusterUnreachable(
                f"TokenReview failed at {self._host}: HTTP {response.status} {response.reason}"
            )
        try:
            review = json.loads(payload)
        except ValueError as exc:
            raise errors.ClusterUnreachable(
                f"the API server at {self._host} sent an unreadable TokenReview"
            ) from exc
        status = review.get("status") if isinstance(review, dict) else None
        if not isinstance(status, dict):
            raise errors.ClusterUnreachable(
                f"the API server at {self._host} sent a TokenReview without a status"
            )
        if not status.get("authenticated"):
            reason = status.get("error") or "not authenticated"
            raise errors.TokenRejected(
                f"the API server rejected the token ({reason}); mint a fresh projected "
                f"ServiceAccount token for audience {self.audience}"
            )
        if self.audience not in (status.get("audiences") or []):
            raise errors.TokenRejected(f"the token is not valid for audience {self.audience}")
        user = status.get("user")
        return parse_username(str(user.get("username", "")) if isinstance(user, dict) else "")

    async def check_permission(self) -> None:
        """Refuse to start without RBAC to create TokenReviews, and say what to grant."""
        wanted = [
            serving.Access(group="authentication.k8s.io", resource="tokenreviews", verb="create")
        ]
        if await serving.missing_access(self._api, wanted):
            raise errors.ConfigError(
                f"the identity service may not create TokenReviews: {RBAC_HINT}"
            )
