"""Every error meshward raises on purpose, in one hierarchy.

    MeshwardError
    ├── ControlPlaneError      the local control plane could not be provisioned or run
    ├── ClusterUnreachable     the Kubernetes API server did not answer
    ├── PolicyError            policy is invalid, missing or unreadable
    │   ├── InvalidResource    a resource fails validation (what, and how to fix it)
    │   ├── PolicyNotFound     a namespace has no compiled policy document
    │   └── PodNotFound        a pod named in a question does not exist
    └── ConfigError            a setting is missing or malformed

Messages are written for the person who has to act on them: what is wrong, then what to do.
"""

from __future__ import annotations


class MeshwardError(Exception):
    """Base of every deliberate meshward failure."""


class ControlPlaneError(MeshwardError):
    """The local control plane could not be provisioned, started or stopped.

    ``step`` names what was being done, so the one-line message says where it broke.
    """

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


class PolicyError(MeshwardError):
    """A policy resource can not be used as written."""


class InvalidResource(PolicyError):
    """A resource fails validation; the message names the field and the fix."""


class PolicyNotFound(PolicyError):
    """A namespace has no compiled policy document (no operator, or no such namespace)."""


class PodNotFound(PolicyError):
    """A pod named in a question does not exist."""


class ClusterUnreachable(MeshwardError):
    """The Kubernetes API server did not answer; the message says which address failed."""


class ConfigError(MeshwardError):
    """A setting is missing or malformed; the message names the setting."""
