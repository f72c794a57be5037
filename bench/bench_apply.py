"""Apply-to-ConfigMap latency: how long after the API server accepts a policy change does the
namespace's compiled document reflect it?

Starts its own local control plane and operator, then, per run, changes a ServerAuthorization 200
times (one change at a time) and timestamps each change's arrival in the ``meshward-policy``
ConfigMap with a watch. Prints p50/p99 per run and the medians over runs.

    .venv/bin/python bench/bench_apply.py [--runs 3] [--applies 200]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import uuid

import urllib3

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from kubernetes import client, config, watch

from meshward import devcluster
from meshward.policy import compiled
from tests import kubetest


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def authorization(ns: str, i: int) -> dict[str, object]:
    return {
        "apiVersion": "policy.meshward.io/v1alpha1",
        "kind": "ServerAuthorization",
        "metadata": {"name": "bench", "namespace": ns},
        "spec": {
            "server": {"name": "web"},
            "client": {
                "meshTLS": {
                    "identities": [f"sa-{i}.{ns}.serviceaccount.identity.meshward.cluster.local"]
                }
            },
        },
    }


def one_run(api: client.ApiClient, applies: int) -> list[float]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    custom.create_namespaced_custom_object(
        "policy.meshward.io",
        "v1alpha1",
        ns,
        "servers",
        {
            "apiVersion": "policy.meshward.io/v1alpha1",
            "kind": "Server",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "port": 8080},
        },
    )
    custom.create_namespaced_custom_object(
        "policy.meshward.io", "v1alpha1", ns, "serverauthorizations", authorization(ns, -1)
    )
    kubetest.wait_document(core, ns, lambda d: "sa--1." in d.to_json(), timeout=60)

    seen: dict[int, float] = {}
    arrived = threading.Condition()
    stop = threading.Event()

    def watcher() -> None:
        """Timestamp each document version; ends at the first event after ``stop`` is set."""
        w = watch.Watch()
        try:
            for event in w.stream(
                core.list_namespaced_config_map,
                ns,
                field_selector=f"metadata.name={compiled.CONFIGMAP_NAME}",
                timeout_seconds=600,
            ):
                now = time.perf_counter()
                text = (event["object"].data or {}).get(compiled.CONFIGMAP_KEY, "")
                marker = text.split('"sa-', 1)[1].split(".", 1)[0] if '"sa-' in text else None
                if marker is not None and marker.lstrip("-").isdigit():
                    with arrived:
                        seen.setdefault(int(marker), now)
                        arrived.notify_all()
                if stop.is_set():
                    w.stop()
        except urllib3.exceptions.ProtocolError:
            if not stop.is_set():
                raise

    thread = threading.Thread(target=watcher, daemon=True)
    thread.start()
    time.sleep(0.5)
    latencies = []
    for i in range(applies):
        body = authorization(ns, i)
        custom.patch_namespaced_custom_object(
            "policy.meshward.io",
            "v1alpha1",
            ns,
            "serverauthorizations",
            "bench",
            {"spec": body["spec"]},
        )
        accepted = time.perf_counter()
        with arrived:
            if not arrived.wait_for(lambda i=i: i in seen, timeout=10):
                raise SystemExit(f"change {i} never reached the ConfigMap")
        latencies.append(seen[i] - accepted)
    stop.set()
    core.delete_namespace(ns)  # deleting the ConfigMap is the watcher's last event
    thread.join(timeout=30)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--applies", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshward-bench-") as tmp:
        directory = pathlib.Path(tmp)
        cluster = devcluster.up(directory / "cp")
        op = kubetest.Operator(
            cluster.kubeconfig, directory / "operator.log", env={"MESHWARD_WEBHOOK_PORT": "0"}
        )
        try:
            kubetest.Kubectl(cluster.kubeconfig).run("apply", "-f", str(kubetest.ROOT / "crds"))
            kubetest.Kubectl(cluster.kubeconfig).run(
                "wait", "--for=condition=established", "-f", str(kubetest.ROOT / "crds")
            )
            op.start()
            api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
            p50s, p99s = [], []
            for run in range(args.runs):
                try:
                    lat = one_run(api, args.applies)
                except AssertionError:
                    print(op.log_tail(), file=sys.stderr)
                    raise
                p50s.append(percentile(lat, 0.5) * 1000)
                p99s.append(percentile(lat, 0.99) * 1000)
                print(
                    f"run {run + 1}: {args.applies} applies  p50 {p50s[-1]:.1f} ms  "
                    f"p99 {p99s[-1]:.1f} ms  max {max(lat) * 1000:.1f} ms"
                )
            print(
                f"apply-to-ConfigMap latency, median of {args.runs} runs: "
                f"p50 {statistics.median(p50s):.1f} ms  p99 {statistics.median(p99s):.1f} ms "
                f"(target p99 < 1000 ms)"
            )
        finally:
            op.stop()
            devcluster.down(directory / "cp")
    return 0


if __name__ == "__main__":
    sys.exit(main())
