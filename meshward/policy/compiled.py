"""The compiled policy document: one per namespace, the only thing proxies and tools read.

The operator writes it to the ConfigMap ``meshward-policy``, key ``policy.json``. It is rebuilt
from the whole namespace on every change, so it is self-contained: every selector, rule and
network a decision needs is in it, already resolved (no references left to follow).

Contract:
- ``schemaVersion`` names the layout; readers refuse a version they do not know.
- ``hash`` is ``sha256:<hex>`` of the canonical JSON of every other field, so equal policy gives an
  equal hash (no timestamps inside) and a reader can tell a truncated or edited document.
- A rule allows a client when the client meets every group in ``identities`` (one pattern of the
  group matching), every group in ``networks`` (source IP inside one network of the group, outside
  its ``except``), ``tls`` if set, and ``http`` if set. Empty ``identities`` means no identity is
  needed; empty ``networks`` means any source.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

import pydantic
from pydantic import alias_generators

from meshward import errors
from meshward.policy import resources

SCHEMA_VERSION = "policy.meshward.io/compiled/v1"
CONFIGMAP_NAME = "meshward-policy"
CONFIGMAP_KEY = "policy.json"


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        frozen=True,
        extra="forbid",
    )


class Network(_Model):
    cidr: str
    except_: tuple[str, ...] = pydantic.Field(default=(), alias="except")


class HTTPMatch(_Model):
    method: str
    path: str


class Rule(_Model):
    """One way in: an authorization, a probe path, or a default policy turned into a rule."""

    kind: str
    """ServerAuthorization, AuthorizationPolicy, probe or default."""
    name: str
    identities: tuple[tuple[str, ...], ...] = ()
    networks: tuple[tuple[Network, ...], ...] = ()
    tls: bool = False
    http: HTTPMatch | None = None


class Server(_Model):
    name: str
    pod_selector: resources.LabelSelector
    port: int | str
    proxy_protocol: resources.ProxyProtocol
    access_policy: resources.DefaultPolicy
    rules: tuple[Rule, ...]


class Pod(_Model):
    labels: dict[str, str]
    default_policy: resources.DefaultPolicy | None = None
    """From the pod annotation, when it has a valid one."""
    ports: dict[str, int] = pydantic.Field(default_factory=dict)
    probes: tuple[HTTPMatchOnPort, ...] = ()


class HTTPMatchOnPort(_Model):
    port: int
    path: str


class PeerAuthentication(_Model):
    name: str
    namespace: str
    selector: dict[str, str] | None
    """None for a namespace-wide (or, from the root namespace, mesh-wide) policy."""
    mode: resources.MTLSMode
    port_level_mtls: dict[str, resources.MTLSMode] = pydantic.Field(default_factory=dict)


class PolicyDocument(_Model):
    schema_version: Annotated[
        str, pydantic.Field(pattern=r"^policy\.meshward\.io/compiled/v1$")
    ] = SCHEMA_VERSION
    namespace: str
    hash: str = ""
    trust_domain: str
    cluster_networks: tuple[str, ...]
    default_policy: resources.DefaultPolicy
    """The namespace's effective default (cluster setting, then namespace annotation)."""
    servers: tuple[Server, ...] = ()
    pods: dict[str, Pod] = pydantic.Field(default_factory=dict)
    mesh_peer_authentication: PeerAuthentication | None = None
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    """This namespace's: the namespace-wide one (no selector) and workload ones, oldest first."""

    def content_hash(self) -> str:
        body = self.model_dump(by_alias=True, mode="json", exclude={"hash"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()

    def sealed(self) -> PolicyDocument:
        """This document with its ``hash`` filled in."""
        return self.model_copy(update={"hash": self.content_hash()})

    def to_json(self) -> str:
        """Compact canonical JSON (sorted keys): a ConfigMap holds at most 1 MiB."""
        body = self.sealed().model_dump(by_alias=True, mode="json")
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> PolicyDocument:
        """Parse and check a document; raises PolicyError on a foreign version or a bad hash."""
        try:
            raw: Any = json.loads(text)
        except ValueError as exc:
            raise errors.PolicyError(f"compiled policy is not JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("schemaVersion") != SCHEMA_VERSION:
            found = raw.get("schemaVersion") if isinstance(raw, dict) else None
            raise errors.PolicyError(
                f"compiled policy has schemaVersion {found!r}; this meshward reads "
                f"{SCHEMA_VERSION!r}: upgrade the reader or the operator so they agree"
            )
        try:
            doc = cls.model_validate(raw)
        except pydantic.ValidationError as exc:
            raise errors.PolicyError(
                f"compiled policy is malformed: {resources.describe(exc)}"
            ) from exc
        if doc.hash != doc.content_hash():
            raise errors.PolicyError(
                "compiled policy hash does not match its content (edited or truncated?)"
            )
        return doc


Pod.model_rebuild()
