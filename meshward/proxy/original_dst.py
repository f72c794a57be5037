"""Where a redirected TCP connection was going before iptables sent it to the proxy.

A REDIRECT rule rewrites the destination of a connection's packets, so the accepted socket's
own address is the proxy's; the original one is kept in the connection tracking entry, and
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` reads it (``IP6T_SO_ORIGINAL_DST`` on ``SOL_IPV6`` for
IPv6). That answer comes back as a ``sockaddr_in`` (or ``sockaddr_in6``), parsed here.

A connection that was not redirected has nothing to forward to: with no tracking entry the
kernel says so, and with an entry but no rewrite the "original" destination is the socket's own
address. Both raise :class:`~meshward.errors.NotRedirected`, so a listener can refuse a client
that dialled the proxy's port directly instead of forwarding it back to itself.

IPv4 connections are read on IPv4 sockets and IPv6 ones on IPv6 sockets: the kernel answers
neither for an IPv4 client of a dual-stack IPv6 listener, so transparent listeners are bound per
family.
"""

from __future__ import annotations

import dataclasses
import errno
import socket
import struct

from meshward.errors import NotRedirected

SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv4.h>."""
IP6T_SO_ORIGINAL_DST = 80
"""From <linux/netfilter_ipv6/ip6_tables.h>."""
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


@dataclasses.dataclass(frozen=True)
class Destination:
    """An IP address (IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def original_destination(sock: socket.socket) -> Destination:
    """The destination ``sock``'s client dialled before a redirect rule sent it here.

    Raises :class:`~meshward.errors.NotRedirected` when no rule redirected it, and
    :class:`OSError` when the socket can not be asked (closed, say).
    """
    if sock.family == socket.AF_INET:
        level, option, size = socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN
    elif sock.family == socket.AF_INET6:
        level, option, size = socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6
    else:
        raise NotRedirected(f"a {sock.family.name} socket has no original destination")
    try:
        raw = sock.getsockopt(level, option, size)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise NotRedirected(
                f"the connection from {_peer(sock)} was not redirected (no connection tracking "
                "entry): it dialled the proxy's port directly"
            ) from exc
        if exc.errno == errno.ENOPROTOOPT:
            raise NotRedirected(
                "connection tracking is not active in this network namespace: no redirect rule "
                "is installed (run meshward proxy-init first)"
            ) from exc
        raise
    found = _parse(raw, sock.family)
    local = sock.getsockname()
    if (found.host, found.port) == (local[0], local[1]):
        raise NotRedirected(
            f"the connection from {_peer(sock)} was not redirected: it dialled the proxy's own "
            f"address {found}"
        )
    return found


def _parse(raw: bytes, family: socket.AddressFamily) -> Destination:
    """A ``sockaddr_in``: family (host order), port (network order), address; a
    ``sockaddr_in6``: family, port, flow info, address, scope id."""
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET:
        return Destination(socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
    return Destination(socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)


def _peer(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "a client that is gone"
    return str(Destination(str(peer[0]), int(peer[1])))
