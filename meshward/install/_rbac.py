"""Who may do what: the RBAC rules of each control-plane ServiceAccount.

Every rule is derived from an API call the component's code makes (or kopf makes for the
operator) and carries the reason, which ``meshward install`` prints above the role. No wildcard
verb, resource or group, and nothing a component does not call:

- the identity service creates TokenReviews, and nothing else (its start-up
  SelfSubjectAccessReview is open to every authenticated user);
- the policy server lists and watches the meshward-policy ConfigMaps, and pods, Services
  and EndpointSlices to answer the proxies' destination lookups (never reads a Secret, never
  writes outside its own namespace);
- the operator reads what it compiles and writes the policy documents, trust bundles, status
  conditions and its own webhook configuration; Secrets only in the control-plane namespace.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshward.identity import commands, trustdomain
from meshward.policy import compiled, resources

OPERATOR, IDENTITY, POLICY = "meshward-operator", "meshward-identity", "meshward-policy"
"""The ServiceAccounts (and Deployments) of the control plane. The identity service's and the
policy server's names are part of their mesh identities, which proxies verify."""
ADMISSION = "admissionregistration.k8s.io"
WEBHOOK_KINDS = ("validatingwebhookconfigurations", "mutatingwebhookconfigurations")


@dataclasses.dataclass(frozen=True)
class Rule:
    """``verbs`` on ``resources`` of API ``group`` (core: ""), limited to ``names`` if any."""

    group: str
    resources: tuple[str, ...]
    verbs: tuple[str, ...]
    why: str
    names: tuple[str, ...] = ()

    def manifest(self) -> dict[str, Any]:
        rule: dict[str, Any] = {
            "apiGroups": [self.group],
            "resources": list(self.resources),
            "verbs": list(self.verbs),
        }
        if self.names:
            rule["resourceNames"] = list(self.names)
        return rule

    def describe(self) -> str:
        where = f"{self.group}/" if self.group else ""
        names = f" named {', '.join(self.names)}" if self.names else ""
        return f"{', '.join(self.verbs)} {where}{', '.join(self.resources)}{names}: {self.why}"


@dataclasses.dataclass(frozen=True)
class Grants:
    """One ServiceAccount's rules: cluster-wide, and in the control-plane namespace only."""

    service_account: str
    cluster: tuple[Rule, ...]
    namespaced: tuple[Rule, ...] = ()


def identity() -> Grants:
    return Grants(
        IDENTITY,
        cluster=(
            Rule(
                "authentication.k8s.io",
                ("tokenreviews",),
                ("create",),
                "asks the API server whose ServiceAccount a proxy's token is (TokenReview) "
                "before it signs a certificate",
            ),
        ),
    )


def policy() -> Grants:
    return Grants(
        POLICY,
        cluster=(
            Rule(
                "",
                ("configmaps",),
                ("list", "watch"),
                "follows the compiled policy (the meshward-policy ConfigMap) of every "
                "namespace, selecting it by name (which RBAC authorizes as that name)",
                names=(compiled.CONFIGMAP_NAME,),
            ),
            Rule(
                "",
                ("pods",),
                ("list", "watch"),
                "answers the proxies' destination lookups: which pod IPs are injected, running "
                "pods, under which ServiceAccount, and which inbound ports their proxy-init "
                "leaves alone",
            ),
            Rule(
                "",
                ("services",),
                ("list", "watch"),
                "answers destination lookups for Service cluster IPs: which IPs and ports each "
                "Service has",
            ),
            Rule(
                "discovery.k8s.io",
                ("endpointslices",),
                ("list", "watch"),
                "answers destination lookups for Service cluster IPs: which ready pods, on "
                "which target port, are behind each Service port",
            ),
        ),
        namespaced=(
            Rule(
                "",
                ("configmaps",),
                ("get", "create", "update", "delete"),
                "publishes what proxies report of their trust state (meshward-proxies-<ns>) "
                "for the operator's anchor rotation; only in the control-plane namespace",
            ),
        ),
    )


def operator(webhook_name: str) -> Grants:
    """The operator's rules; ``webhook_name`` is the one webhook configuration it may change."""
    policy_kinds = tuple(resources.PLURALS[kind] for kind in resources.KINDS)
    return Grants(
        OPERATOR,
        cluster=(
            Rule(
                "",
                ("namespaces",),
                ("get", "list", "watch"),
                "a namespace's annotations set its default policy and ask for injection: read "
                "when it is compiled and when the injector decides, listed to rebuild them all "
                "and to publish the trust bundle, watched for changes",
            ),
            Rule(
                "",
                ("pods",),
                ("list", "watch"),
                "pods' labels, named ports and probes feed the compiled policy",
            ),
            Rule(
                "",
                ("configmaps",),
                ("list", "watch", "create"),
                "watches the compiled policy (meshward-policy) and the trust bundle "
                f"({commands.TRUST_ROOTS}) to restore one edited or deleted by hand, creates "
                "them in each namespace it manages (Kubernetes can not limit create to a name), "
                "and lists the proxies' reports during an anchor rotation",
            ),
            Rule(
                "",
                ("configmaps",),
                ("get", "update"),
                "reads back and rewrites only those two ConfigMaps",
                names=(compiled.CONFIGMAP_NAME, commands.TRUST_ROOTS),
            ),
            Rule(
                "",
                ("events",),
                ("create",),
                "reports handler failures (kopf) and expiring trust material on the object "
                "concerned",
            ),
            Rule(
                resources.GROUP,
                policy_kinds,
                ("list", "watch"),
                "the policy resources it compiles",
            ),
            Rule(
                resources.GROUP,
                tuple(f"{plural}/status" for plural in policy_kinds),
                ("patch",),
                "writes their Accepted and ResolvedRefs conditions",
            ),
            Rule(
                trustdomain.GROUP,
                (trustdomain.PLURAL,),
                ("list", "watch"),
                "the TrustDomain whose anchor and issuer it keeps",
            ),
            Rule(
                trustdomain.GROUP,
                (trustdomain.PLURAL,),
                ("create",),
                "creates the install's TrustDomain when none exists (an install can not apply "
                "it in the run that creates its CRD)",
            ),
            Rule(
                trustdomain.GROUP,
                (f"{trustdomain.PLURAL}/status",),
                ("patch",),
                "reports the anchor's and issuer's expiry and rotation in the TrustDomain",
            ),
            Rule(
                ADMISSION,
                WEBHOOK_KINDS,
                ("create",),
                "kopf creates its webhook configurations when absent; it tries create first, "
                "so it needs the verb even though install renders them, and Kubernetes can not "
                "limit create to a name",
            ),
            Rule(
                ADMISSION,
                WEBHOOK_KINDS,
                ("patch",),
                "kopf writes its webhooks and their CA bundle, and the operator the injector's "
                "namespaceSelector, into its own configurations only",
                names=(webhook_name,),
            ),
            Rule(
                ADMISSION,
                ("mutatingwebhookconfigurations",),
                ("list", "watch"),
                "watches its injector configuration to put back the namespaceSelector and "
                "timeout kopf does not set (kopf watches the kind, not one name)",
            ),
            Rule(
                "apiextensions.k8s.io",
                ("customresourcedefinitions",),
                ("list", "watch"),
                "kopf notices meshward's CRDs being created or upgraded while it runs (without "
                "it, kopf warns at every start)",
            ),
        ),
        namespaced=(
            Rule(
                "",
                ("secrets",),
                ("get",),
                "reads the trust anchor and issuer it keeps, and any Secret a TrustDomain "
                "references in this namespace",
            ),
            Rule(
                "",
                ("secrets",),
                ("create",),
                "creates the anchor and issuer Secrets (Kubernetes can not limit create to a name)",
            ),
            Rule(
                "",
                ("secrets",),
                ("update",),
                "rewrites the issuer when it rotates it, and the anchor when it makes a new "
                "one or an anchor rotation ends",
                names=(
                    commands.ANCHOR_SECRET,
                    commands.ISSUER_SECRET,
                    trustdomain.NEXT_ANCHOR_SECRET,
                ),
            ),
            Rule(
                "",
                ("secrets",),
                ("delete",),
                "removes the anchor being rotated in once it has become the anchor",
                names=(trustdomain.NEXT_ANCHOR_SECRET,),
            ),
        ),
    )
