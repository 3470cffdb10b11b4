"""A queued packet's IP and UDP/TCP headers, and the DNS bytes it carries.

Only what the gateway's own rules queue arrives here (UDP or TCP, port 53 on one side), so
this reads just enough: IPv4 with options, IPv6 without extension headers (a DNS packet with
them is released unread), UDP, and TCP with its data offset. Anything that does not add up
is None: the packet is released and teaches nothing.
"""
from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

UDP, TCP = 17, 6
FIN, SYN, RST = 0x01, 0x02, 0x04


@dataclass(frozen=True)
class Segment:
    src: ipaddress._BaseAddress
    sport: int
    dst: ipaddress._BaseAddress
    dport: int
    transport: str            # "udp" or "tcp"
    payload: bytes            # the UDP payload, or the TCP segment's data
    seq: int = 0              # TCP: the sequence number of the segment's first byte (or of its SYN)
    flags: int = 0            # TCP: the header's flags (FIN, SYN, RST below)


def read_segment(data: bytes) -> Optional[Segment]:
    if len(data) < 20:
        return None
    version = data[0] >> 4
    if version == 4:
        ihl = (data[0] & 0x0F) * 4
        total = struct.unpack_from("!H", data, 2)[0]
        if ihl < 20 or total < ihl or total > len(data) or struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
            return None           # bad lengths, or a fragment (more-fragments or an offset)
        proto, src, dst = data[9], ipaddress.IPv4Address(data[12:16]), ipaddress.IPv4Address(data[16:20])
        l4, end = ihl, total
    elif version == 6 and len(data) >= 40:
        end = 40 + struct.unpack_from("!H", data, 4)[0]
        if end > len(data):
            return None
        proto, src, dst = data[6], ipaddress.IPv6Address(data[8:24]), ipaddress.IPv6Address(data[24:40])
        l4 = 40
    else:
        return None
    if proto == UDP and end - l4 >= 8:
        sport, dport, length = struct.unpack_from("!HHH", data, l4)
        if length < 8 or l4 + length > end:
            return None
        return Segment(src, sport, dst, dport, "udp", bytes(data[l4 + 8:l4 + length]))
    if proto == TCP and end - l4 >= 20:
        sport, dport, seq = struct.unpack_from("!HHI", data, l4)
        offset = (data[l4 + 12] >> 4) * 4
        if offset < 20 or l4 + offset > end:
            return None
        return Segment(src, sport, dst, dport, "tcp", bytes(data[l4 + offset:end]), seq, data[l4 + 13])
    return None


def dns_messages(seg: Segment) -> list[bytes]:
    """The DNS message a UDP datagram carries (none if empty). TCP's are read by streams.py,
    which follows the byte stream across segments."""
    return [seg.payload] if seg.payload else []
