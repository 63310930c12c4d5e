"""Delivery targets: refuse URLs whose host is or resolves to a non-public address (SSRF)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

import httpx

from webpurse.settlement.webhooks.errors import TargetNotAllowedError

Resolver = Callable[[str, int], list[str]]
"""``(host, port) -> addresses``: how a webhook host is resolved (injected in tests)."""

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_allowed(address: str) -> bool:
    """Whether settlement may send a webhook to ``address`` (an IP literal).

    Only globally routable unicast addresses: loopback, private (RFC 1918, ULA), link-local
    (169.254.0.0/16 holds cloud metadata services), carrier-grade NAT, unspecified, reserved,
    documentation and multicast addresses are refused, also when wrapped in IPv6
    (IPv4-mapped, 6to4, NAT64). An unparsable address is refused.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    return ip.is_global and not ip.is_multicast


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (an IP literal resolves to itself); OSError if none."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _host_and_port(url: str) -> tuple[str, int]:
    parsed = httpx.URL(url)
    return parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80)


def check_target(url: str, resolver: Resolver = resolve_host) -> list[str]:
    """The addresses ``url``'s host resolves to, all of them public.

    Raises :class:`TargetNotAllowedError` if any is not (a name that resolves to a public
    and a private address is refused: the client could pick either), and ``OSError`` if the
    name does not resolve.
    """
    host, port = _host_and_port(url)
    addresses = resolver(host, port)
    if not addresses:
        raise OSError(f"{host} resolves to no address")
    refused = [address for address in addresses if not address_allowed(address)]
    if refused:
        raise TargetNotAllowedError(
            f"{host} resolves to {refused[0]}, which is not a public address"
            if refused[0] != host
            else f"{host} is not a public address"
        )
    return addresses
