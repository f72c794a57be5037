"""A real Kubernetes control plane on loopback, for development and tests.

    up(directory)      -> Cluster   start etcd + kube-apiserver (+ controller-manager)
    load(directory)    -> Cluster?  what runs there
    down(directory)    -> bool      stop it and remove its state

Binaries come from ``KUBEBUILDER_ASSETS``, the per-user cache, or a one-time build from Debian's
package registry (see :mod:`meshward.devcluster._build`).
"""

from meshward.devcluster._build import Binaries, ensure, locate
from meshward.devcluster._cluster import Cluster, default_directory, down, load, up

__all__ = ["Binaries", "Cluster", "default_directory", "down", "ensure", "load", "locate", "up"]
