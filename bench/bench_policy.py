"""Benchmark policy compilation and decisions; prints medians over several runs.

    .venv/bin/python bench/bench_policy.py [--runs N] [--namespaces N] [--decisions N]

Compile: N namespaces x 10 Servers x 10 authorizations per Server (5 ServerAuthorizations and
5 AuthorizationPolicies), with 10 pods, authentications and PeerAuthentications per namespace.
Inputs are parsed once up front; only ``compile_namespace`` is timed (sealing included).

``--runs`` (default 5) sets how many times each part runs; a figure over its target is marked
``MISSED``.

Decide: a mix of destinations and clients that reaches every branch (rule allow, accessPolicy
deny, probe, default policy, STRICT refusal, labels-only destination). Latency is the per-call
distribution measured with ``perf_counter_ns`` around each call (the timer's own cost, printed,
is included); throughput is a tight loop without per-call timers.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshward.policy import resources, workload
from meshward.policy.compile import NamespaceState, Settings, compile_namespace
from meshward.policy.decision import (
    Client,
    Destination,
    Policy,
    Request,
    decide,
)

SERVERS = 10
AUTHZ_PER_SERVER = 10
TD = "cluster.local"


def _meta(name: str, ns: str, created: int = 0, **labels: str) -> dict[str, object]:
    return {
        "name": name,
        "namespace": ns,
        "creationTimestamp": f"2024-01-01T00:{created // 60 % 60:02d}:{created % 60:02d}Z",
        "labels": labels,
    }


def namespace_state(i: int) -> NamespaceState:
    """One namespace of the benchmark; varied enough to reach every compile path."""
    ns = f"ns-{i:04d}"
    pods = [
        workload.Pod(
            name=f"svc-{s}-0",
            labels={"app": f"svc-{s}", "tier": "web" if s % 2 else "db"},
            annotations=({workload.DEFAULT_POLICY_ANNOTATION: "deny"} if s == 3 else {}),
            ports={"http": 8080, "admin": 9090},
            probes=(workload.HTTPProbe(8081, "/healthz"), workload.HTTPProbe(8081, "/ready")),
        )
        for s in range(SERVERS)
    ]
    servers, sas, aps = [], [], []
    for s in range(SERVERS):
        srv = f"svc-{s}-http"
        servers.append(
            resources.Server.model_validate(
                {
                    "metadata": _meta(srv, ns, s, tier="web" if s % 2 else "db"),
                    "spec": {
                        "podSelector": {"matchLabels": {"app": f"svc-{s}"}},
                        "port": "http" if s % 2 else 8080,
                        "proxyProtocol": "HTTP/1",
                    },
                }
            )
        )
        for a in range(AUTHZ_PER_SERVER // 2):
            client: dict[str, object]
            if a == 0:
                client = {"unauthenticated": True}
            elif a == 1:
                any_in_ns = f"*.{ns}.serviceaccount.identity.meshward.{TD}"
                client = {"meshTLS": {"identities": [any_in_ns]}}
            elif a == 2:
                client = {"meshTLS": {"serviceAccounts": [{"name": f"client-{s}"}]}}
            elif a == 3:
                client = {
                    "meshTLS": {"identities": [f"spiffe://{TD}/ns/{ns}/sa/client-{s}"]},
                    "networks": [{"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}],
                }
            else:
                client = {"meshTLS": {"unauthenticatedTLS": True}}
            sas.append(
                resources.ServerAuthorization.model_validate(
                    {
                        "metadata": _meta(f"{srv}-sa-{a}", ns),
                        "spec": {"server": {"name": srv}, "client": client},
                    }
                )
            )
            refs: list[dict[str, str]] = [{"kind": "MeshTLSAuthentication", "name": f"mtls-{a}"}]
            if a % 2:
                refs.append({"kind": "NetworkAuthentication", "name": "cluster"})
            if a == 4:
                refs = [{"kind": "ServiceAccount", "name": f"client-{s}"}]
            aps.append(
                resources.AuthorizationPolicy.model_validate(
                    {
                        "metadata": _meta(f"{srv}-ap-{a}", ns),
                        "spec": {
                            "targetRef": {"kind": "Server", "name": srv},
                            "requiredAuthenticationRefs": refs,
                        },
                    }
                )
            )
    mtls = [
        resources.MeshTLSAuthentication.model_validate(
            {
                "metadata": _meta(f"mtls-{a}", ns),
                "spec": (
                    {"identities": [f"client-{a}.{ns}.serviceaccount.identity.meshward.{TD}"]}
                    if a % 2
                    else {"identityRefs": [{"kind": "ServiceAccount", "name": f"client-{a}"}]}
                ),
            }
        )
        for a in range(AUTHZ_PER_SERVER // 2)
    ]
    nets = [
        resources.NetworkAuthentication.model_validate(
            {
                "metadata": _meta("cluster", ns),
                "spec": {"networks": [{"cidr": "10.0.0.0/8"}, {"cidr": "192.168.0.0/16"}]},
            }
        )
    ]
    peers = [
        resources.PeerAuthentication.model_validate(
            {"metadata": _meta("default", ns), "spec": {"mtls": {"mode": "PERMISSIVE"}}}
        ),
        resources.PeerAuthentication.model_validate(
            {
                "metadata": _meta("db-strict", ns, 5),
                "spec": {
                    "selector": {"matchLabels": {"tier": "db"}},
                    "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8081": {"mode": "PERMISSIVE"}},
                },
            }
        ),
    ]
    return NamespaceState(
        namespace=ns,
        annotations={workload.DEFAULT_POLICY_ANNOTATION: "cluster-authenticated"} if i % 3 else {},
        pods=pods,
        servers=servers,
        server_authorizations=sas,
        authorization_policies=aps,
        mesh_tls_authentications=mtls,
        network_authentications=nets,
        peer_authentications=peers,
    )


def bench_compile(states: list[NamespaceState], settings: Settings, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        for st in states:
            compile_namespace(st, settings)
        times.append(time.perf_counter() - start)
    return times


Case = tuple[Destination, Client, Request | None]


def decision_cases(ns: str, count: int, rng: random.Random) -> list[Case]:
    """A mix of kinds, from a pool of clients so caches see realistic reuse."""
    ips = [
        f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(1500)
    ]
    ips += [f"203.0.113.{k}" for k in range(1, 255)]
    identities = [f"spiffe://{TD}/ns/{ns}/sa/client-{k}" for k in range(10)]
    identities += [f"client-{k}.other.serviceaccount.identity.meshward.{TD}" for k in range(10)]
    cases: list[Case] = []
    for _ in range(count):
        s = rng.randrange(SERVERS)
        pod = f"svc-{s}-0"
        kind = rng.randrange(8)
        ip = rng.choice(ips)
        ident = rng.choice(identities)
        if kind == 0:  # covered port, mTLS client: a rule decides
            cases.append((Destination(8080, pod=pod), Client(ident, ip, True), None))
        elif kind == 1:  # covered port, plaintext: accessPolicy or unauthenticated SA
            cases.append((Destination(8080, pod=pod), Client(None, ip), Request("GET", "/")))
        elif kind == 2:  # probe path
            cases.append((Destination(8081, pod=pod), Client(None, ip), Request("GET", "/healthz")))
        elif kind == 3:  # probe port, wrong path: default policy
            cases.append((Destination(8081, pod=pod), Client(None, ip), Request("POST", "/x")))
        elif kind == 4:  # uncovered port: default policy with identity
            cases.append((Destination(9090, pod=pod), Client(ident, ip, True), None))
        elif kind == 5:  # labels only (no pod known); odd Servers name their port: unresolvable
            labels = {"app": f"svc-{s}", "tier": "web" if s % 2 else "db"}
            cases.append((Destination(8080, labels=labels), Client(ident, ip, True), None))
        elif kind == 6:  # TLS without identity
            cases.append((Destination(8080, pod=pod), Client(None, ip, True), None))
        else:  # unknown pod
            cases.append((Destination(7000, pod="gone"), Client(None, ip), None))
    return cases


def bench_decide(policy: Policy, cases: list[Case]) -> tuple[float, float, float, float]:
    """(p50 ns, p99 ns, max ns, decisions/s) for one pass over the cases."""
    clock = time.perf_counter_ns
    samples = [0] * len(cases)
    gc.disable()
    try:
        for k, (dest, client, request) in enumerate(cases):
            t0 = clock()
            decide(policy, dest, client, request)
            samples[k] = clock() - t0
        start = time.perf_counter()
        for dest, client, request in cases:
            decide(policy, dest, client, request)
        elapsed = time.perf_counter() - start
    finally:
        gc.enable()
    samples.sort()
    n = len(samples)
    return samples[n // 2], samples[min(n - 1, n * 99 // 100)], samples[-1], n / elapsed


def timer_overhead() -> int:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(100_000):
        t0 = clock()
        samples.append(clock() - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of runs")
    return value


def _target(value: float, limit: float, text: str) -> str:
    """``target < ...``, flagged when the measured value misses it."""
    return f"target {text}" if value < limit else f"MISSED target {text}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=_positive, default=5, help="default 5")
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--decisions", type=int, default=200_000)
    args = parser.parse_args()
    runs: int = args.runs
    settings = Settings()

    t = time.perf_counter()
    states = [namespace_state(i) for i in range(args.namespaces)]
    build = time.perf_counter() - t
    per_ns = SERVERS * AUTHZ_PER_SERVER
    print(
        f"input: {args.namespaces} namespaces x {SERVERS} Servers x {AUTHZ_PER_SERVER} "
        f"authorizations ({args.namespaces * per_ns:,} authorizations, "
        f"{args.namespaces * SERVERS:,} pods), parsed in {build:.1f} s (not timed below)"
    )
    compile_times = bench_compile(states, settings, runs)

    rng = random.Random(7)
    ns_states = [states[0], states[1]]  # default all-unauthenticated and cluster-authenticated
    decide_runs = []
    for r in range(runs):
        st = ns_states[r % len(ns_states)]
        policy = Policy(compile_namespace(st, settings).document)
        cases = decision_cases(st.namespace, args.decisions, rng)
        decide_runs.append(bench_decide(policy, cases))
    overhead = timer_overhead()

    med = statistics.median
    compile_s = med(compile_times)
    p99_us = med(r[1] for r in decide_runs) / 1e3
    runs_text = ", ".join(f"{x:.2f}" for x in compile_times)
    timer = f"{args.decisions:,} decisions per run, timer overhead {overhead} ns included"
    rows = [
        (
            "compile, total",
            f"{compile_s:.2f} s",
            f"{_target(compile_s, 5.0, '< 5 s')}; runs: {runs_text}",
        ),
        ("compile, per namespace", f"{compile_s / args.namespaces * 1e3:.2f} ms", ""),
        ("decide p50", f"{med(r[0] for r in decide_runs) / 1e3:.2f} us", timer),
        ("decide p99", f"{p99_us:.2f} us", _target(p99_us, 10.0, "< 10 us")),
        ("decide max", f"{med(r[2] for r in decide_runs) / 1e3:.1f} us", "median of run maxima"),
        ("decisions/s", f"{med(r[3] for r in decide_runs):,.0f}", "tight loop, one thread"),
    ]
    print(f"medians over {runs} run{'s' if runs != 1 else ''} (python {sys.version.split()[0]})")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
