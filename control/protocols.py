"""IP protocol numbers and the names ztgate gives them: the one place on the control side.

A policy names tcp, udp and icmp; icmp means ICMP on IPv4 and ICMPv6 on IPv6.
"""
from __future__ import annotations

from typing import Optional

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
PROTOCOL_NAMES = ("tcp", "udp", "icmp")      # what a rule's protocols may hold
PORTED = (TCP, UDP)                          # the protocols whose packets carry ports

_NAMES = {TCP: "tcp", UDP: "udp", ICMP: "icmp", ICMPV6: "icmp"}


def name_of(number: int) -> str:
    """tcp, udp, icmp (either version), or the number as text."""
    return _NAMES.get(number, str(number))


def number_of(name: str, version: int) -> Optional[int]:
    """The protocol number of tcp, udp or icmp in an IPv4 or IPv6 packet; None for another name."""
    return {"tcp": TCP, "udp": UDP, "icmp": ICMPV6 if version == 6 else ICMP}.get(name)
