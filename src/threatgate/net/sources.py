"""Source allow-lists: whether a peer may talk to a listening port, decided from its address alone.

Sans-IO: the accepting edge asks :meth:`SourceList.allows` with the peer's address as the socket
reports it, before reading a byte, and closes the connection on False.  An IPv4 client of a
dual-stack socket shows up as ``::ffff:192.0.2.7``: it is judged as the IPv4 address it is, so one
list written in IPv4 serves both kinds of socket.  A scoped IPv6 address (``fe80::1%eth0``) is
judged without its zone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SourceList:
    """The networks allowed on one port.  An empty list allows nobody (the config refuses writing one)."""

    __slots__ = ("_v4", "_v6", "networks")

    def __init__(self, networks: Iterable[Network]) -> None:
        self.networks = tuple(networks)
        self._v4 = tuple(n for n in self.networks if n.version == 4)
        self._v6 = tuple(n for n in self.networks if n.version == 6)

    def __repr__(self) -> str:
        return f"SourceList({', '.join(map(str, self.networks))})"

    def allows(self, host: str) -> bool:
        """Whether a peer at ``host`` (the first item of ``getpeername()``) may connect; unparsable: no."""
        address = peer_address(host)
        if address is None:
            return False
        if address.version == 4:
            return any(address in net for net in self._v4)
        return any(address in net for net in self._v6)


def peer_address(host: str) -> Address | None:
    """The address a peer is judged by: an IPv4-mapped IPv6 address as IPv4, a zone dropped; None if not an IP."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
