"""The policy API as users write it: pydantic models of the policy.meshward.io/v1alpha1 kinds.

These mirror the CRD schemas in ``crds/`` field for field (a test keeps them in step). The
operator parses custom resources into these models, compiles them with
:mod:`meshward.policy.compile`, and never reads raw dictionaries past that point.

Semantics follow Linkerd's policy resources (Server, ServerAuthorization, AuthorizationPolicy,
MeshTLSAuthentication, NetworkAuthentication) and Istio's PeerAuthentication. What the schema can
not say (mutually exclusive fields, ``except`` inside its ``cidr``) is checked by the model
validators here, which the admission webhook and the operator both call.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated, Any, Literal

import pydantic
from pydantic import alias_generators

GROUP = "policy.meshward.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
PORT_NAME = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
IDENTITY = r"^(\*|(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*|spiffe://[a-z0-9._-]+(/[A-Za-z0-9._*-]+)*)$"

_DNS_LABEL_RE = re.compile(DNS_LABEL)


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
    )

    def dump(self) -> dict[str, Any]:
        """The resource as Kubernetes stores it: camelCase keys, unset fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class DefaultPolicy(enum.StrEnum):
    """What happens to traffic that no Server covers (or that no authorization matches)."""

    ALL_UNAUTHENTICATED = "all-unauthenticated"
    ALL_AUTHENTICATED = "all-authenticated"
    CLUSTER_UNAUTHENTICATED = "cluster-unauthenticated"
    CLUSTER_AUTHENTICATED = "cluster-authenticated"
    DENY = "deny"
    AUDIT = "audit"


class ProxyProtocol(enum.StrEnum):
    UNKNOWN = "unknown"
    HTTP1 = "HTTP/1"
    HTTP2 = "HTTP/2"
    GRPC = "gRPC"
    OPAQUE = "opaque"
    TLS = "TLS"


class MTLSMode(enum.StrEnum):
    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


# -- shared pieces ---------------------------------------------------------------------------


class LabelSelectorRequirement(_Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @pydantic.model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(
                f"matchExpressions key {self.key!r}: operator {self.operator} needs values"
            )
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(
                f"matchExpressions key {self.key!r}: operator {self.operator} takes no values"
            )
        return self


class LabelSelector(_Model):
    """A Kubernetes label selector; an empty selector selects everything."""

    match_labels: dict[str, str] = pydantic.Field(default_factory=dict)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.match_labels.items():
            if labels.get(k) != v:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


def _network(value: str, field: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ValueError(f"{field} {value!r} is not a CIDR such as 10.0.0.0/8 or fd00::/8") from exc


class Network(_Model):
    """A CIDR and the sub-ranges carved out of it; every ``except`` must lie inside ``cidr``."""

    cidr: str
    except_: tuple[str, ...] = pydantic.Field(default=(), alias="except")

    @pydantic.model_validator(mode="after")
    def _except_inside(self) -> Network:
        net = _network(self.cidr, "cidr")
        for ex in self.except_:
            sub = _network(ex, "except")
            if sub.version != net.version or not sub.subnet_of(net):  # type: ignore[arg-type]
                raise ValueError(f"except {ex!r} does not lie inside cidr {self.cidr!r}")
        return self


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class Status(_Model):
    observed_generation: int | None = None
    conditions: tuple[Condition, ...] = ()


class Meta(_Model):
    """The parts of ``metadata`` that policy depends on."""

    name: str
    namespace: str = ""
    generation: int | None = None
    creation_timestamp: str | None = None
    uid: str | None = None
    labels: dict[str, str] = pydantic.Field(default_factory=dict)
    annotations: dict[str, str] = pydantic.Field(default_factory=dict)


class _Resource(_Model):
    api_version: str = API_VERSION
    metadata: Meta
    status: Status | None = None

    @property
    def name(self) -> str:
        return self.metadata.name


# -- Server ----------------------------------------------------------------------------------


class ServerSpec(_Model):
    pod_selector: LabelSelector
    # strict: in lax mode pydantic turns `port: true` into port 1, where the CRD schema refuses a
    # boolean. (It also refuses 80.0, which the API server would store as 80; harmless.)
    port: (
        Annotated[int, pydantic.Field(ge=1, le=65535, strict=True)]
        | Annotated[str, pydantic.Field(pattern=PORT_NAME, max_length=15)]
    )
    proxy_protocol: ProxyProtocol = ProxyProtocol.UNKNOWN
    access_policy: DefaultPolicy = DefaultPolicy.DENY

    @pydantic.field_validator("port")
    @classmethod
    def _port_name_has_a_letter(cls, port: int | str) -> int | str:
        if isinstance(port, str) and not any(c.isalpha() for c in port):
            raise ValueError(
                f"port name {port!r} has no letter, so no container port can carry it; "
                "write the number without quotes, or use the container port's name"
            )
        return port


class Server(_Resource):
    """A port on a set of pods; traffic to it is decided by its authorizations only."""

    kind: Literal["Server"] = "Server"
    spec: ServerSpec


# -- ServerAuthorization ---------------------------------------------------------------------


class ServerRef(_Model):
    name: str | None = None
    selector: LabelSelector | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> ServerRef:
        if (self.name is None) == (self.selector is None):
            raise ValueError("set exactly one of name or selector")
        return self


class ServiceAccountRef(_Model):
    name: Annotated[str, pydantic.Field(pattern=DNS_SUBDOMAIN)]
    namespace: Annotated[str, pydantic.Field(pattern=DNS_LABEL)] | None = None


class MeshTLS(_Model):
    unauthenticated_tls: pydantic.StrictBool | None = pydantic.Field(
        default=None, alias="unauthenticatedTLS"
    )
    identities: tuple[Annotated[str, pydantic.Field(pattern=IDENTITY)], ...] | None = None
    service_accounts: tuple[ServiceAccountRef, ...] | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> MeshTLS:
        chosen = [
            n
            for n, v in (
                ("unauthenticatedTLS", self.unauthenticated_tls),
                ("identities", self.identities),
                ("serviceAccounts", self.service_accounts),
            )
            if v
        ]
        if len(chosen) != 1:
            raise ValueError(
                "set exactly one of unauthenticatedTLS, identities or "
                f"serviceAccounts (found: {', '.join(chosen) or 'none'})"
            )
        return self


class Client(_Model):
    unauthenticated: pydantic.StrictBool | None = None
    networks: tuple[Network, ...] | None = None
    mesh_tls: MeshTLS | None = pydantic.Field(default=None, alias="meshTLS")

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> Client:
        if bool(self.unauthenticated) == (self.mesh_tls is not None):
            raise ValueError("set exactly one of meshTLS or unauthenticated: true")
        return self


class ServerAuthorizationSpec(_Model):
    server: ServerRef
    client: Client


class ServerAuthorization(_Resource):
    kind: Literal["ServerAuthorization"] = "ServerAuthorization"
    spec: ServerAuthorizationSpec


# -- AuthorizationPolicy and its authentications ---------------------------------------------


class TargetRef(_Model):
    group: str | None = None
    kind: Literal["Server", "Namespace"]
    name: Annotated[str, pydantic.Field(pattern=DNS_SUBDOMAIN)]


class AuthenticationRef(_Model):
    group: str | None = None
    kind: Literal["MeshTLSAuthentication", "NetworkAuthentication", "ServiceAccount"]
    name: Annotated[str, pydantic.Field(pattern=DNS_SUBDOMAIN)]
    namespace: Annotated[str, pydantic.Field(pattern=DNS_LABEL)] | None = None


class AuthorizationPolicySpec(_Model):
    target_ref: TargetRef
    required_authentication_refs: Annotated[
        tuple[AuthenticationRef, ...], pydantic.Field(min_length=1)
    ]
    """At least one: an empty list would allow every client, so it is refused."""


class AuthorizationPolicy(_Resource):
    """Allows traffic to its target when every required authentication matches."""

    kind: Literal["AuthorizationPolicy"] = "AuthorizationPolicy"
    spec: AuthorizationPolicySpec


class IdentityRef(_Model):
    group: str | None = None
    kind: Literal["ServiceAccount", "Namespace"]
    name: Annotated[
        str,
        pydantic.Field(
            pattern=r"^(\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)$"
        ),
    ]
    namespace: Annotated[str, pydantic.Field(pattern=DNS_LABEL)] | None = None


class MeshTLSAuthenticationSpec(_Model):
    identities: tuple[Annotated[str, pydantic.Field(pattern=IDENTITY)], ...] | None = None
    identity_refs: tuple[IdentityRef, ...] | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> MeshTLSAuthenticationSpec:
        if bool(self.identities) == bool(self.identity_refs):
            raise ValueError("set exactly one of identities or identityRefs, and list at least one")
        return self


class MeshTLSAuthentication(_Resource):
    kind: Literal["MeshTLSAuthentication"] = "MeshTLSAuthentication"
    spec: MeshTLSAuthenticationSpec


class NetworkAuthenticationSpec(_Model):
    networks: Annotated[tuple[Network, ...], pydantic.Field(min_length=1)]


class NetworkAuthentication(_Resource):
    kind: Literal["NetworkAuthentication"] = "NetworkAuthentication"
    spec: NetworkAuthenticationSpec


# -- PeerAuthentication ----------------------------------------------------------------------


class MTLS(_Model):
    mode: MTLSMode = MTLSMode.UNSET


class WorkloadSelector(_Model):
    match_labels: dict[str, str] = pydantic.Field(default_factory=dict)


class PeerAuthenticationSpec(_Model):
    selector: WorkloadSelector | None = None
    mtls: MTLS = MTLS()
    port_level_mtls: dict[str, MTLS] = pydantic.Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _ports_need_selector(self) -> PeerAuthenticationSpec:
        if self.port_level_mtls and not (self.selector and self.selector.match_labels):
            raise ValueError("portLevelMtls needs a selector with matchLabels (as in Istio)")
        for port in self.port_level_mtls:
            if not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"portLevelMtls key {port!r} is not a port number 1-65535")
        return self


class PeerAuthentication(_Resource):
    """Whether inbound traffic must be mTLS: STRICT, PERMISSIVE (either), DISABLE or UNSET."""

    kind: Literal["PeerAuthentication"] = "PeerAuthentication"
    spec: PeerAuthenticationSpec


PolicyResource = (
    Server
    | ServerAuthorization
    | AuthorizationPolicy
    | MeshTLSAuthentication
    | NetworkAuthentication
    | PeerAuthentication
)

KINDS: dict[str, type[_Resource]] = {
    "Server": Server,
    "ServerAuthorization": ServerAuthorization,
    "AuthorizationPolicy": AuthorizationPolicy,
    "MeshTLSAuthentication": MeshTLSAuthentication,
    "NetworkAuthentication": NetworkAuthentication,
    "PeerAuthentication": PeerAuthentication,
}

PLURALS: dict[str, str] = {
    "Server": "servers",
    "ServerAuthorization": "serverauthorizations",
    "AuthorizationPolicy": "authorizationpolicies",
    "MeshTLSAuthentication": "meshtlsauthentications",
    "NetworkAuthentication": "networkauthentications",
    "PeerAuthentication": "peerauthentications",
}


def is_dns_label(value: str) -> bool:
    return len(value) <= 63 and bool(_DNS_LABEL_RE.match(value))


def parse(body: dict[str, Any]) -> _Resource:
    """Parse a stored custom resource of any policy kind.

    Raises :class:`meshward.errors.InvalidResource` with every problem spelled out by field.
    """
    from meshward import errors

    kind = body.get("kind")
    model = KINDS.get(str(kind))
    if model is None:
        raise errors.InvalidResource(f"kind {kind!r} is not a {GROUP} kind ({', '.join(KINDS)})")
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as exc:
        raise errors.InvalidResource(describe(exc)) from exc


def describe(exc: pydantic.ValidationError) -> str:
    """One readable sentence per problem: ``spec.client.meshTLS: set exactly one of ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged")))
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
