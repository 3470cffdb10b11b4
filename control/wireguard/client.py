"""A client's WireGuard configuration, as wg-quick and the WireGuard apps read it."""
from __future__ import annotations

import re
from typing import Optional

from ..errors import InputError
from .checks import interfaces, networks
from .keys import check_public_key, decode_key


def client_config(private_key: Optional[str], addresses: list, gateway_public_key: str, endpoint: str,
                  routes: list, keepalive: int = 25, dns: tuple = ()) -> str:
    """A client's WireGuard configuration (wg-quick and the WireGuard apps read it):
    its own addresses, the gateway as its one peer at ENDPOINT ("host:port", an IPv6 address
    in brackets), and ROUTES (the networks reached through the gateway) as AllowedIPs; DNS:
    the private resolvers the device should ask (the gateway learns hostnames from their answers).
    Without a private key (a device that made its own: IDENTITY.md) no PrivateKey line."""
    if private_key is not None:
        decode_key(private_key, "private key")
    check_public_key(gateway_public_key)
    addrs = interfaces(addresses, "client addresses")
    nets = networks(routes, "routes")
    host, sep, port = endpoint.rpartition(":") if isinstance(endpoint, str) else ("", "", "")
    if (not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535
            or re.search(r"\s", endpoint) or (":" in host and not (host.startswith("[") and host.endswith("]")))):
        raise InputError(f"bad endpoint {endpoint!r}: host:port, with an IPv6 address in brackets "
                         "([2001:db8::1]:51820)")
    if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 <= keepalive <= 65535:
        raise InputError(f"bad keepalive {keepalive!r}: seconds from 0 (off) to 65535")
    lines = ["[Interface]"] + ([f"PrivateKey = {private_key}"] if private_key is not None else []) + [
             f"Address = {', '.join(str(a) for a in addrs)}",
             *([f"DNS = {', '.join(str(r) for r in dns)}"] if dns else []),
             "",
             "[Peer]",
             f"PublicKey = {gateway_public_key}",
             f"Endpoint = {endpoint}",
             f"AllowedIPs = {', '.join(str(n) for n in nets)}"]
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"
