"""The policy server (issue 5): each proxy follows its namespace's compiled policy over a
streaming gRPC API, authenticated by its mesh certificate and scoped to its own namespace. It
also collects what trust state each proxy holds (issue 6) and publishes it for the operator, and
tells proxies which destinations are meshed and who must answer there (``Lookup``).

    documents   the latest valid document per namespace, handed to watchers newest-only
    watching    following one kind of object: list, watch, resume, re-list on 410, backoff
    configmaps  the meshward-policy ConfigMaps of every namespace, into the documents
    destinations  meshed pod and Service addresses from pods, Services, EndpointSlices (Lookup),
                and whether that picture is still fresh
    reports     the latest trust-state report of each proxy, checked, expired when stale
    publisher   those reports as meshward-proxies-<namespace> ConfigMaps in its own namespace
    server      the Policy service over mutual TLS, health, admin endpoint, reloads, and the
                supervision of its background tasks
    metrics     what it counts (watchers, updates sent, refusals, reports)
    commands    ``meshward policy serve``

The proxy's side is :mod:`meshward.proxy.policy_stream` and :mod:`meshward.proxy.report`; the
API is ``_proto/policy.proto``; the published format is :mod:`meshward.proxyreports`.
"""
