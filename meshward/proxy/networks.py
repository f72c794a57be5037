"""The mesh networks: the address ranges whose outbound destinations transparent mode carries
over mTLS (or asks destination discovery about), and the parser of their setting.

A module of its own, importing nothing of the proxy's: the settings need it when their class
is defined, and the modules of the data plane (which import the settings through the identity
module) need it too, so it has to sit below both.
"""

from __future__ import annotations

import ipaddress

from meshward import errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_MESH_NETWORKS = "10.0.0.0/8,100.64.0.0/10,172.16.0.0/12,192.168.0.0/16,fd00::/8"
"""The private ranges clusters take pod and service addresses from."""


def parse_mesh_networks(text: str, what: str = "the mesh networks") -> tuple[Network, ...]:
    """CIDRs separated by commas, e.g. ``10.0.0.0/8,fd00::/8``; blank: the defaults.

    Raises :class:`~meshward.errors.ConfigError` naming ``what`` and the entry at fault.
    """
    if not text.strip():
        text = DEFAULT_MESH_NETWORKS
    found: list[Network] = []
    for raw in text.split(","):
        entry = raw.strip()
        try:
            found.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise errors.ConfigError(
                f"{what} has {entry!r}, which is not a network ({exc}): give CIDRs separated by "
                f"commas, e.g. {DEFAULT_MESH_NETWORKS}"
            ) from None
    return tuple(found)
