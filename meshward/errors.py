"""Every error meshward raises on purpose, in one hierarchy.

    MeshwardError
    ├── ControlPlaneError      the local control plane could not be provisioned or run
    ├── PolicyError            a policy resource is invalid or does not resolve
    │   └── InvalidResource    a resource fails validation (what, and how to fix it)
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


class ConfigError(MeshwardError):
    """A setting is missing or malformed; the message names the setting."""
