"""The policy server's Prometheus metrics, in a registry of their own (several services may
share a process, as they do in tests)."""

from __future__ import annotations

import prometheus_client


class Metrics:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry()
        self.watchers = prometheus_client.Gauge(
            "policy_watchers", "Watch streams open now", registry=self.registry
        )
        self.updates_sent = prometheus_client.Counter(
            "policy_updates_sent", "Documents sent to proxies", registry=self.registry
        )
        self.watches_refused = prometheus_client.Counter(
            "policy_watches_refused",
            "Watch calls refused, by gRPC status code name",
            ["code"],
            registry=self.registry,
        )
        self.documents = prometheus_client.Gauge(
            "policy_documents", "Namespaces with a valid document to serve", registry=self.registry
        )
        self.documents_refused = prometheus_client.Counter(
            "policy_documents_refused",
            "ConfigMap documents refused (unparsable, bad hash, wrong namespace)",
            registry=self.registry,
        )
        self.source_errors = prometheus_client.Counter(
            "policy_source_errors",
            "Failed lists and watches of the meshward-policy ConfigMaps",
            registry=self.registry,
        )
        self.proxies_reporting = prometheus_client.Gauge(
            "policy_proxies_reporting",
            "Pods whose trust-state report is held (heard from within the expiry), by namespace",
            ["namespace"],
            registry=self.registry,
        )
        self.reports_received = prometheus_client.Counter(
            "policy_reports_received",
            "Report calls, by result: ok, or the gRPC status code name of the refusal",
            ["result"],
            registry=self.registry,
        )
        self.report_writes = prometheus_client.Counter(
            "policy_report_writes",
            "Writes of the meshward-proxies-<namespace> ConfigMaps, by result (ok, failed)",
            ["result"],
            registry=self.registry,
        )
        self.lookups = prometheus_client.Counter(
            "policy_lookups",
            "Lookup calls, by result: meshed, plain, or the gRPC status code name of the refusal",
            ["result"],
            registry=self.registry,
        )
        self.destinations = prometheus_client.Gauge(
            "policy_destinations",
            "Objects held to answer lookups, by kind: meshed pods, Services with cluster IPs, "
            "EndpointSlices of Services",
            ["kind"],
            registry=self.registry,
        )
        self.destination_source_errors = prometheus_client.Counter(
            "policy_destination_source_errors",
            "Failed lists and watches of the pods, services and endpointslices, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.task_failures = prometheus_client.Counter(
            "policy_task_failures",
            "Background tasks (ConfigMap and destination watches, reloads, publishing, "
            "readiness) that ended with an unexpected error and were restarted, by task",
            ["task"],
            registry=self.registry,
        )
        self.ready = prometheus_client.Gauge(
            "policy_ready",
            "1 while the server reports ready: everything listed, destination lookups not stale",
            registry=self.registry,
        )
