"""Certify throughput and latency with 32 concurrent clients, TokenReview included, against a
fresh local control plane; and the raw signing rate without TokenReview.

Each client has its own ServiceAccount, token and connection, and reuses one CSR (the service
signs anew each time, and client-side key generation would only measure the client). Two loads:

  - closed loop: each client sends its next Certify as soon as the last is answered. This finds
    the most the service signs per second; its latency is queueing by construction (Little's
    law: 32 clients at R/s wait 32/R s on average);
  - fixed rate, open loop: 500 Certify/s spread over the 32 clients on a schedule fixed before the
    run, each latency timed from the request's scheduled send, so a stall shows in the tail
    instead of slowing the sender (no coordinated omission). This is the latency at the load the
    target names.

Prints per-run figures and medians over runs. Targets on these 2-core machines: >= 500
certificates/s, with p99 < 50 ms.

    .venv/bin/python bench/bench_identity.py [--runs 3] [--seconds 10] [--clients 32] [--rate 500]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client, config

from meshward import devcluster
from meshward.identity import pki
from meshward.identity._proto import identity_pb2, identity_pb2_grpc
from tests import test_identity_service as its

NS = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load(
    svc: its.IdentityService, clients: list[tuple[str, str, bytes]], seconds: float
) -> tuple[int, list[float], int]:
    """Each client on a connection of its own, as each proxy has."""
    anchors = (svc.trust / "ca-bundle.crt").read_bytes()
    latencies: list[float] = []
    failures = 0
    deadline = time.perf_counter() + seconds

    async def one(identity: str, token: str, csr: bytes) -> None:
        nonlocal failures
        request = identity_pb2.CertifyRequest(
            identity=identity, token=token.encode(), certificate_signing_request=csr
        )
        async with grpc.aio.secure_channel(
            f"localhost:{svc.port}", grpc.ssl_channel_credentials(root_certificates=anchors)
        ) as channel:
            stub = identity_pb2_grpc.IdentityStub(channel)
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    await stub.Certify(request, timeout=10)
                except grpc.aio.AioRpcError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(one(*c) for c in clients))
    return len(latencies), latencies, failures


async def fixed_rate(
    svc: its.IdentityService, clients: list[tuple[str, str, bytes]], rate: float, seconds: float
) -> tuple[list[float], int, float]:
    """``rate`` Certify/s, client i sending at its own staggered slots; latencies from the slot.

    Returns the latencies, the failures, and the worst lag of a send behind its slot (this
    generator's own share of the latencies).
    """
    anchors = (svc.trust / "ca-bundle.crt").read_bytes()
    latencies: list[float] = []
    failures = 0
    worst_lag = 0.0
    interval = len(clients) / rate
    channels = [
        grpc.aio.secure_channel(
            f"localhost:{svc.port}", grpc.ssl_channel_credentials(root_certificates=anchors)
        )
        for _ in clients
    ]
    try:
        for channel in channels:
            await channel.channel_ready()
        start = time.perf_counter() + 0.1
        pending: set[asyncio.Task[None]] = set()

        async def send(stub: identity_pb2_grpc.IdentityStub, request: Any, slot: float) -> None:
            nonlocal failures
            try:
                await stub.Certify(request, timeout=10)
            except grpc.aio.AioRpcError:
                failures += 1
                return
            latencies.append(time.perf_counter() - slot)

        async def client_loop(index: int, channel: grpc.aio.Channel) -> None:
            nonlocal worst_lag
            identity, token, csr = clients[index]
            request = identity_pb2.CertifyRequest(
                identity=identity, token=token.encode(), certificate_signing_request=csr
            )
            stub = identity_pb2_grpc.IdentityStub(channel)
            slot = start + index * interval / len(clients)
            while slot < start + seconds:
                delay = slot - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                worst_lag = max(worst_lag, time.perf_counter() - slot)
                task = asyncio.create_task(send(stub, request, slot))
                pending.add(task)
                task.add_done_callback(pending.discard)
                slot += interval

        await asyncio.gather(*(client_loop(i, c) for i, c in enumerate(channels)))
        await asyncio.gather(*pending)
    finally:
        for channel in channels:
            await channel.close()
    return latencies, failures, worst_lag


def raw_signing_rate(trust: pathlib.Path, seconds: float = 3.0) -> float:
    issuer = pki.Issuer.from_pem((trust / "tls.crt").read_bytes(), (trust / "tls.key").read_bytes())
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    identity = pki.Identity(NS, "web", "cluster.local")
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        pki.sign_leaf(issuer, public, identity, lifetime=datetime.timedelta(hours=24))
        count += 1
    return count / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rate", type=float, default=500.0, help="fixed-rate load, Certify/s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshward-bench-identity-") as tmp:
        d = pathlib.Path(tmp)
        cluster = devcluster.up(d / "cp", controller_manager=False)
        svc: its.IdentityService | None = None
        try:
            api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NS)))
            clients = []
            for i in range(args.clients):
                sa = f"client-{i}"
                csr, _ = its.make_csr()
                clients.append((its.name(sa, NS), its.token_for(core, NS, sa), csr))
            trust = its.init_trust(d / "trust")
            svc = its.IdentityService(cluster.kubeconfig, trust, d / "identity.log", verbose=False)
            svc.start()
            rates, p50s, p99s = [], [], []
            for run in range(args.runs):
                count, lat, failures = asyncio.run(load(svc, clients, args.seconds))
                rates.append(count / args.seconds)
                p50s.append(percentile(lat, 0.5) * 1000)
                p99s.append(percentile(lat, 0.99) * 1000)
                print(
                    f"run {run + 1}: {rates[-1]:.0f} certificates/s  p50 {p50s[-1]:.1f} ms  "
                    f"p99 {p99s[-1]:.1f} ms  failures {failures}"
                    + ("  (FAILED CALLS: not comparable)" if failures else "")
                )
            fixed_p50s, fixed_p99s = [], []
            for run in range(args.runs):
                lat, failures, lag = asyncio.run(fixed_rate(svc, clients, args.rate, args.seconds))
                fixed_p50s.append(percentile(lat, 0.5) * 1000)
                fixed_p99s.append(percentile(lat, 0.99) * 1000)
                print(
                    f"fixed rate run {run + 1}: {len(lat) / args.seconds:.0f} certificates/s "
                    f"answered  p50 {fixed_p50s[-1]:.1f} ms  p99 {fixed_p99s[-1]:.1f} ms  "
                    f"failures {failures}  worst send lag {lag * 1000:.1f} ms"
                    + ("  (FAILED CALLS: not comparable)" if failures else "")
                )
            raw = [raw_signing_rate(trust) for _ in range(args.runs)]
            rate, p99 = statistics.median(rates), statistics.median(p99s)
            fixed_p99 = statistics.median(fixed_p99s)
            print(
                f"Certify with TokenReview, {args.clients} clients, median of {args.runs} runs:\n"
                f"  closed loop: {rate:.0f}/s (target >= 500{'' if rate >= 500 else ', MISSED'}), "
                f"p50 {statistics.median(p50s):.1f} ms, p99 {p99:.1f} ms (queueing: "
                f"{args.clients} clients / {rate:.0f} per s = {args.clients / rate * 1000:.0f} ms "
                "mean)\n"
                f"  fixed {args.rate:.0f}/s: p50 {statistics.median(fixed_p50s):.1f} ms, "
                f"p99 {fixed_p99:.1f} ms (target < 50{'' if fixed_p99 < 50 else ', MISSED'})"
            )
            print(
                f"raw signing (pki.sign_leaf, one thread), median of {args.runs}: "
                f"{statistics.median(raw):.0f}/s"
            )
        finally:
            if svc is not None:
                svc.stop()
            devcluster.down(d / "cp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
