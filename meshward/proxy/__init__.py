"""The sidecar proxy (issue 4): workload identity, mTLS both ways, inbound authorization.

Built so far (identity tested against the real identity service, the rest on loopback):

    settings    configuration from MESHWARD_PROXY_* variables, every problem named at once
    renewal     when to renew a certificate, and when to retry after a failure (pure)
    identity    the key (key.p8, 0600) and a certificate for it, checked and kept fresh
    tls         TLS 1.3 contexts from that certificate, and the verified peer's SPIFFE ID
    forward     bytes both ways between two connections: backpressure, half-close, cleanup
    detect      TLS, HTTP/1, HTTP/2 or opaque, from the first bytes (pure)
    inbound     per-connection: mTLS mode, TLS termination, client identity, decision, splice
    outbound    plaintext from the app, mTLS to the peer, the peer's identity checked
    policy_source  the compiled document from a file: reloaded, last valid kept, none = deny

Not yet: per-request HTTP decisions (403, gRPC 7), the streaming policy API, closing live
connections a new policy no longer allows, the admin server and ``meshward proxy``.
"""
