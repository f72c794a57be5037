"""What policy needs to know about a Pod and its Namespace, read from their API objects.

Pods matter to policy for four things: their labels (selectors), their named container ports
(a Server may name a port), the HTTP probe paths on their containers (authorized under a
restrictive default, as Linkerd 2.12+ does) and the ``config.meshward.io/default-inbound-policy``
annotation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

DEFAULT_POLICY_ANNOTATION = "config.meshward.io/default-inbound-policy"


@dataclasses.dataclass(frozen=True)
class HTTPProbe:
    """An HTTP GET that the kubelet sends to ``port`` at exactly ``path``."""

    port: int
    path: str


@dataclasses.dataclass(frozen=True)
class Pod:
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    ports: Mapping[str, int]
    """Named container ports: name -> number."""
    probes: tuple[HTTPProbe, ...]
    host_network: bool = False

    @classmethod
    def from_api(cls, body: Mapping[str, Any]) -> Pod:
        """Read a Pod as the API server returns it (a dict); tolerant of missing fields."""
        meta = body.get("metadata") or {}
        spec = body.get("spec") or {}
        containers = list(spec.get("containers") or [])
        ports: dict[str, int] = {}
        for c in containers:
            for p in c.get("ports") or []:
                named = p.get("name") and isinstance(p.get("containerPort"), int)
                if named and (p.get("protocol") or "TCP") == "TCP":
                    ports.setdefault(p["name"], p["containerPort"])
        probes: list[HTTPProbe] = []
        for c in containers:
            for key in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = ((c.get(key) or {}).get("httpGet")) or None
                if not get:
                    continue
                port = get.get("port")
                if isinstance(port, str):
                    port = int(port) if port.isdigit() else ports.get(port)
                if not isinstance(port, int):
                    continue
                probe = HTTPProbe(port=port, path=str(get.get("path") or "/"))
                if probe not in probes:
                    probes.append(probe)
        return cls(
            name=str(meta.get("name", "")),
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            ports=ports,
            probes=tuple(probes),
            host_network=bool(spec.get("hostNetwork")),
        )
