"""The sidecar proxy: workload identity, mTLS both ways, inbound authorization.

``meshward proxy`` (or ``python -m meshward.proxy``) runs it; :mod:`~meshward.proxy.run` wires
the parts, in the order data meets them:

    settings    configuration from MESHWARD_PROXY_* variables, every problem named at once
    renewal     when to renew a certificate, and when to retry after a failure (pure)
    identity    the key (key.p8, 0600) and a certificate for it, checked and kept fresh
    tls         TLS 1.3 contexts from that certificate, and the verified peer's SPIFFE ID
    forward     bytes both ways between two connections: backpressure, half-close, cleanup;
                an allowed connection's transports are handed to protocols that copy in the
                event loop's callbacks (no coroutine step per chunk)
    detect      TLS, HTTP/1, HTTP/2 or opaque, from the first bytes (pure)
    http        HTTP/1 requests and responses framed for per-request decisions; 403/400 (pure)
    grpc_deny   a refused HTTP/2 connection answered: gRPC status 7 or 403, GOAWAY (pure)
    inbound     mTLS mode, TLS termination, client identity, the protocol (declared or
                detected), then one decision per connection (splice, or refuse as the protocol
                understands) or per HTTP/1 request where routes matter; live connections
                re-decided on a policy update; a connection limit
    outbound    plaintext from the app, mTLS to the peer, the peer's identity checked
    metrics     Linkerd-named counters: authorization by server, rule and client; bytes
    policy_source  the compiled document from a file: reloaded, last valid kept, none = deny
    policy_channel  the mTLS gRPC channel to the policy service, renewed with the certificate
    policy_stream  the same from the policy service's Watch stream, over that channel
    report      the trust state held (bundle, leaf issuer), reported to the policy service
    discovery   whether a destination is meshed and who must answer (Lookup), cached
    admin       /live, /ready, /metrics, /identity, /shutdown (loopback only)
    interception  the iptables rules that steer a pod's TCP through its proxy (pure)
    proxy_init  ``meshward proxy-init``: those rules installed, idempotently
    original_dst  where a redirected connection was going (SO_ORIGINAL_DST)
    listener    a listening socket and its accept loop (both modes)
    networks    the mesh networks: where outbound connections may be meshed (pure)
    transparent accept loops for redirected connections, both directions; outbound, what
                discovery says: mTLS pinned, plaintext, or mTLS to any mesh identity
    run         settings in, every part started and wired, everything stopped; the
                process runs on uvloop (compiled transports and TLS)

Two modes: local (explicit LISTEN=APP port maps on loopback, for runs without pods) and
transparent (no local entries: the pod's traffic arrives through the interception rules).
Not built: per-request decisions on HTTP/2 (decided per connection, failing closed where a
route would matter). Without the policy service (a policy file) there is no discovery: in
transparent mode an outbound peer in the mesh networks must prove some mesh identity, not one
known in advance.
"""
