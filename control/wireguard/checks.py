"""Input checks: interface names, ports, lists of addresses and networks (InputError says what is wrong)."""
from __future__ import annotations

import ipaddress
import re
from typing import Iterable

from ..errors import InputError
from .state import Interface, Network


# What wg-quick accepts as an interface name (and the kernel's IFNAMSIZ - 1 = 15).
IFNAME = re.compile(r"[a-zA-Z0-9_=+.-]{1,15}\Z")


def check_name(name) -> str:
    if not isinstance(name, str) or not IFNAME.match(name) or name in (".", ".."):
        raise InputError(f"bad WireGuard interface name {name!r}: 1 to 15 of a-z A-Z 0-9 _ = + . -")
    return name


def check_port(port, lowest: int = 1) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not lowest <= port <= 65535:
        raise InputError(f"bad WireGuard listen port {port!r}: an integer from {lowest} to 65535")
    return port


def networks(values: Iterable, what: str) -> list[Network]:
    """Addresses or networks -> networks; a bare address becomes /32 or /128."""
    if isinstance(values, (str, bytes)):
        raise InputError(f"{what} must be a list of addresses or networks, not one string")
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(str(v), strict=True))
        except ValueError as e:
            raise InputError(f"bad {what} entry {v!r}: {e}") from None
    return out


def interfaces(values: Iterable, what: str) -> list[Interface]:
    if isinstance(values, (str, bytes)):
        raise InputError(f"{what} must be a list of addresses with prefix lengths, not one string")
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_interface(str(v)))
        except ValueError as e:
            raise InputError(f"bad {what} entry {v!r}: {e}") from None
    return out
