"""Every error meshward raises on purpose, in one hierarchy.

    MeshwardError
    ├── ControlPlaneError      the local control plane could not be provisioned or run
    ├── ClusterUnreachable     the Kubernetes API server did not answer
    ├── PolicyError            policy is invalid, missing or unreadable
    │   ├── InvalidResource    a resource fails validation (what, and how to fix it)
    │   ├── PolicyNotFound     a namespace has no compiled policy document
    │   ├── PodNotFound        a pod named in a question does not exist
    │   ├── PolicyAccessDenied a certificate does not entitle its holder to the policy it asked for
    │   ├── InvalidLookupReply the policy server's answer to a destination lookup is unusable
    │   └── InvalidLookup      a destination lookup names no IP address, or no port
    ├── IdentityError          a certificate can not be issued or trusted
    │   ├── InvalidCSR         the CSR is malformed, oversized, badly signed or has a weak key
    │   ├── InvalidIdentity    the requested identity is not a well-formed mesh identity
    │   ├── TokenRejected      the ServiceAccount token did not authenticate
    │   ├── IdentityMismatch   the token authenticates another ServiceAccount
    │   ├── IssuerError        the issuer is missing, expired or does not chain to an anchor
    │   ├── UntrustedChain     a certificate chain does not verify against the anchors
    │   └── InvalidTrustBundle a trust bundle (or the renewal request beside it) is unusable
    ├── InterceptionError      transparent interception could not be installed or used
    │   └── NotRedirected      a connection reached the proxy without being redirected to it
    ├── InjectionError         a pod or manifest can not be injected with the proxy as written
    ├── ReportError            a proxy's report of its trust state can not be taken
    │   ├── InvalidProxyReport a report, or a published list of them, is malformed
    │   ├── ReportAccessDenied a certificate does not entitle its holder to report for a namespace
    │   └── TooManyProxies     a namespace already has as many pods reporting as the server keeps
    └── ConfigError            a setting is missing or malformed

Messages are written for the person who has to act on them: what is wrong, then what to do.
"""

from __future__ import annotations


class MeshwardError(Exception):
    """Base of every deliberate meshward failure."""


class ControlPlaneError(MeshwardError):
    """The local control plane could not be provisioned, started or stopped.

    ``step`` names what was being done, so the one-line message says where it broke.
    """

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class PolicyError(MeshwardError):
    """A policy resource can not be used as written."""


class InvalidResource(PolicyError):
    """A resource fails validation; the message names the field and the fix."""


class PolicyNotFound(PolicyError):
    """A namespace has no compiled policy document (no operator, or no such namespace)."""


class PodNotFound(PolicyError):
    """A pod named in a question does not exist."""


class PolicyAccessDenied(PolicyError):
    """A proxy asked for policy its certificate does not entitle it to: another namespace's, or
    any from a certificate of another trust domain."""


class InvalidLookupReply(PolicyError):
    """The policy server's answer to a destination lookup can not be acted on (a meshed
    destination without identities, an identity that is not a workload SPIFFE ID); the proxy
    treats it as no answer at all."""


class InvalidLookup(PolicyError):
    """A proxy asked whether a destination is meshed with an address that is not an IP literal
    or a port outside 1..65535; the policy server answers INVALID_ARGUMENT."""


class ClusterUnreachable(MeshwardError):
    """The Kubernetes API server did not answer; the message says which address failed."""


class IdentityError(MeshwardError):
    """A certificate can not be issued or trusted."""


class InvalidCSR(IdentityError):
    """The CSR is malformed, oversized, badly signed, or carries a key we do not accept."""


class InvalidIdentity(IdentityError):
    """The requested identity is not ``<sa>.<ns>.serviceaccount.identity.meshward.<td>``."""


class TokenRejected(IdentityError):
    """The ServiceAccount token did not authenticate (wrong audience, expired, deleted SA)."""


class IdentityMismatch(IdentityError):
    """The token authenticates a different ServiceAccount than the identity requested."""


class IssuerError(IdentityError):
    """The issuer is missing, expired, or does not chain to a trust anchor."""


class UntrustedChain(IdentityError):
    """A certificate chain does not verify against the trust anchors."""


class InvalidTrustBundle(IdentityError):
    """A trust bundle can not anchor mesh identities (unreadable, empty, a non-CA certificate,
    every anchor expired), or the ``renew-leaves-before`` time beside it is malformed."""


class InterceptionError(MeshwardError):
    """The iptables rules that steer a pod's traffic through its proxy could not be installed;
    the message names the rule, why it failed and what to do."""


class NotRedirected(InterceptionError):
    """A connection reached a transparent listener directly, not through a redirect rule, so it
    has no original destination to forward to."""


class InjectionError(MeshwardError):
    """A pod or manifest can not be injected as written: a bad ``meshward.io/inject`` value, a
    port or UID that collides with the proxy, or a manifest that does not parse."""


class ReportError(MeshwardError):
    """A proxy's report of the trust state it holds (issue 6: anchor rotation) can not be
    taken or read."""


class InvalidProxyReport(ReportError):
    """A report names a malformed pod, fingerprint, time or version, or a published list of
    reports (a ``meshward-proxies-<namespace>`` ConfigMap value) does not parse."""


class ReportAccessDenied(ReportError):
    """A proxy reported for a namespace its certificate does not name."""


class TooManyProxies(ReportError):
    """A namespace already has as many pods reporting as the policy server keeps: a new pod's
    report is refused so that one namespace can not grow the server (or its ConfigMap) without
    bound."""


class ConfigError(MeshwardError):
    """A setting is missing or malformed; the message names the setting."""
