"""The policy server (issue 5): each proxy follows its namespace's compiled policy over a
streaming gRPC API, authenticated by its mesh certificate and scoped to its own namespace.

    documents   the latest valid document per namespace, handed to watchers newest-only
    configmaps  the meshward-policy ConfigMaps of every namespace: list, watch, re-list
    server      the Policy service over mutual TLS, health, admin endpoint, reloads
    metrics     what it counts (watchers, updates sent, refusals)
    commands    ``meshward policy serve``

The proxy's side is :mod:`meshward.proxy.policy_stream`; the API is ``_proto/policy.proto``.
"""
