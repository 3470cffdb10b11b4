"""Packets from the IP header on that POLICY.md's reading rules decide: shared by the unit tests
of control.packets.parse_raw and the kernel tests of the XDP parser."""
import ipaddress
import struct

from scapy.layers.inet import IP, TCP, UDP, IPOption
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrRouting
from scapy.packet import Raw

from control.model import Packet

S4, D4, S6, D6 = "100.96.0.2", "10.20.0.10", "fd00:5a::2", "fd20::10"
SYN = TCP(sport=40000, dport=22, flags="S")
V4_TCP = Packet(ipaddress.ip_address(S4), ipaddress.ip_address(D4), 6, 40000, 22)
V6_TCP = Packet(ipaddress.ip_address(S6), ipaddress.ip_address(D6), 6, 40000, 22)


def v4(l4=SYN, **ip) -> bytearray:
    return bytearray(bytes(IP(src=S4, dst=D4, **ip) / l4))


def v6(payload=SYN, **ip) -> bytearray:
    return bytearray(bytes(IPv6(src=S6, dst=D6, **ip) / payload))


def put16(data: bytearray, offset: int, value: int) -> bytes:
    struct.pack_into("!H", data, offset, value)
    return bytes(data)


def ext(kind: int, nh: int, length: int = 0, frag_offset: int = 0) -> bytes:
    """An IPv6 extension header of `kind` whose length byte is `length`, sized by the spec's formula."""
    if kind == 44:
        return bytes([nh, length]) + struct.pack("!HI", frag_offset << 3, 7)
    size = (length + 2) * 4 if kind == 51 else (length + 1) * 8
    return bytes([nh, length]) + b"\xee" * (size - 2)   # 0xee: not a protocol the walk would accept


def chain(kinds, last=6, l4=bytes(SYN)) -> bytes:
    """IPv6 fixed header, extension headers of the given kinds (with their length byte), then l4."""
    kinds = list(kinds)
    nhs = [k for k, _ in kinds[1:]] + [last]
    body = b"".join(ext(k, nh, ln) for (k, ln), nh in zip(kinds, nhs)) + l4
    return bytes(IPv6(src=S6, dst=D6, nh=kinds[0][0] if kinds else last) / Raw(body))


def tcp_dataofs(offset: int) -> bytes:
    raw = bytearray(bytes(SYN))
    raw[12] = offset << 4
    return bytes(raw)


# (id, bytes, exact reason label)
UNREADABLE = [
    ("empty", b"", "bad-version"),
    ("version-5", bytes([0x55]) + bytes(v4())[1:], "bad-version"),
    ("version-0", bytes(40), "bad-version"),
    ("ipv4-19-bytes", bytes(v4())[:19], "ipv4-short"),
    ("ipv4-ihl-4", bytes([0x44]) + bytes(v4())[1:], "ipv4-bad-ihl"),
    ("ipv4-ihl-0", bytes([0x40]) + bytes(v4())[1:], "ipv4-bad-ihl"),
    ("ipv4-total-19", put16(v4(), 2, 19), "ipv4-bad-length"),
    ("ipv4-total-below-options", put16(v4(options=[IPOption(b"\x01" * 4)]), 2, 20), "ipv4-bad-length"),
    ("ipv4-total-above-received", put16(v4(), 2, len(v4()) + 1), "ipv4-truncated"),
    ("ipv4-non-first-fragment", v4(frag=1), "ipv4-fragment"),
    ("ipv4-non-first-fragment-mf", v4(frag=4096, flags="MF"), "ipv4-fragment"),
    ("ipv4-fragment-offset-max", v4(frag=8191), "ipv4-fragment"),
    ("ipv4-fragment-without-tcp-header", v4(Raw(b"\x00" * 4), frag=3, proto=6), "ipv4-fragment"),
    ("ipv6-39-bytes", bytes(v6())[:39], "ipv6-short"),
    ("ipv6-payload-0", put16(v6(), 4, 0), "ipv6-bad-length"),
    ("ipv6-payload-above-received", put16(v6(), 4, len(SYN) + 1), "ipv6-truncated"),
    ("ipv6-40-bytes-payload-1", put16(bytearray(bytes(v6())[:40]), 4, 1), "ipv6-truncated"),
    ("ipv6-non-first-fragment", v6(IPv6ExtHdrFragment(offset=1, nh=6) / SYN), "ipv6-fragment"),
    ("ipv6-non-first-fragment-hand", v6(Raw(ext(44, 6, frag_offset=100) + bytes(SYN)), nh=44), "ipv6-fragment"),
    ("ipv6-fragment-after-ext", v6(Raw(ext(0, 44) + ext(44, 6, frag_offset=1) + bytes(SYN)), nh=0), "ipv6-fragment"),
    # Extension headers after the Fragment header are its fragmentable part: a later fragment
    # names the first of them, and nothing after its Fragment header is read.
    ("ipv6-later-fragment-naming-options", v6(Raw(ext(44, 60, frag_offset=3) + ext(60, 6) + bytes(SYN)), nh=44),
     "ipv6-fragment"),
    ("ipv6-later-fragment-after-options", v6(Raw(ext(60, 44) + ext(44, 43, frag_offset=1) + b"\x00" * 16), nh=60),
     "ipv6-fragment"),
    ("ipv6-first-fragment-options-cut", v6(IPv6ExtHdrFragment(offset=0, m=1, nh=60) / Raw(ext(60, 6, length=2)[:16])),
     "ipv6-ext-truncated"),
    ("ipv6-first-fragment-options-then-tcp-short",
     v6(IPv6ExtHdrFragment(offset=0, m=1, nh=60) / IPv6ExtHdrDestOpt(nh=6) / Raw(bytes(SYN)[:12])), "tcp-short"),
    ("ipv6-first-fragment-8-headers-then-a-ninth",
     v6(Raw(ext(44, 60) + b"".join(ext(60, 60) for _ in range(7)) + ext(60, 6) + bytes(SYN)), nh=44),
     "ipv6-ext-too-many"),
    ("ipv6-9-extension-headers", chain([(60, 0)] * 9), "ipv6-ext-too-many"),
    ("ipv6-9th-is-fragment", chain([(60, 0)] * 8 + [(44, 0)]), "ipv6-ext-too-many"),
    ("ipv6-ext-longer-than-payload", v6(Raw(ext(0, 6, length=1)[:8]), nh=0), "ipv6-ext-truncated"),
    ("ipv6-auth-longer-than-payload", put16(bytearray(chain([(51, 1)], l4=b"")), 4, 11), "ipv6-ext-truncated"),
    ("ipv6-fragment-header-7-bytes", put16(bytearray(chain([(44, 0)], l4=b"")), 4, 7), "ipv6-ext-truncated"),
    ("ipv6-ext-1-byte", bytes(IPv6(src=S6, dst=D6, nh=43) / Raw(b"\x06")), "ipv6-ext-truncated"),
    ("ipv6-ext-in-padding", put16(bytearray(chain([(60, 0)], l4=bytes(8))), 4, 4), "ipv6-ext-truncated"),
    ("tcp-19-bytes", v4(Raw(bytes(SYN)[:19]), proto=6), "tcp-short"),
    ("tcp-0-bytes", v4(Raw(b""), proto=6), "tcp-short"),
    ("tcp-19-bytes-v6", v6(Raw(bytes(SYN)[:19]), nh=6), "tcp-short"),
    ("tcp-dataofs-4", v4(Raw(tcp_dataofs(4)), proto=6), "tcp-bad-offset"),
    ("tcp-dataofs-0-v6", v6(Raw(tcp_dataofs(0)), nh=6), "tcp-bad-offset"),
    ("tcp-dataofs-6-no-options", v4(Raw(tcp_dataofs(6)), proto=6), "tcp-truncated"),
    ("tcp-dataofs-15-v6", v6(Raw(tcp_dataofs(15) + bytes(39)), nh=6), "tcp-truncated"),
    ("udp-7-bytes", v4(Raw(bytes(UDP())[:7]), proto=17), "udp-short"),
    ("udp-7-bytes-v6", v6(Raw(bytes(UDP())[:7]), nh=17), "udp-short"),
    ("udp-after-fragment-header", v6(IPv6ExtHdrFragment(offset=0, m=1, nh=17) / Raw(b"\x00" * 4)), "udp-short"),
    # Bytes in the buffer but past the IP length are padding: a header lying there is not present.
    ("tcp-in-ipv4-padding", put16(v4(), 2, 20), "tcp-short"),
    ("tcp-half-in-ipv4-padding", put16(v4(), 2, 30), "tcp-short"),
    ("tcp-in-ipv6-padding", put16(v6(), 4, 10), "tcp-short"),
    ("tcp-options-in-padding", put16(v4(Raw(tcp_dataofs(6) + bytes(4)), proto=6), 2, 40), "tcp-truncated"),
    ("udp-in-ipv4-padding", put16(v4(UDP()), 2, 27), "udp-short"),
    ("udp-in-ipv6-padding", put16(v6(UDP()), 4, 7), "udp-short"),
]


# (id, bytes, the packet they are read as)
READABLE = [
    ("ipv4-tcp", v4(), V4_TCP),
    ("ipv4-options-skipped", v4(options=[IPOption(b"\x01" * 8)]), V4_TCP),
    ("ipv4-max-options", v4(options=[IPOption(b"\x01" * 40)]), V4_TCP),
    ("ipv4-trailing-padding", bytes(v4()) + b"\xff" * 13, V4_TCP),
    ("ipv4-first-fragment", v4(flags="MF"), V4_TCP),
    ("ipv4-first-fragment-df", v4(flags="DF"), V4_TCP),
    ("ipv4-icmp-no-payload", v4(Raw(b""), proto=1), Packet(V4_TCP.src, V4_TCP.dst, 1)),
    ("ipv4-udp-8-bytes", v4(UDP(sport=53, dport=5353)), Packet(V4_TCP.src, V4_TCP.dst, 17, 53, 5353)),
    ("ipv6-tcp", v6(), V6_TCP),
    ("ipv6-trailing-padding", bytes(v6()) + b"\xff" * 7, V6_TCP),
    ("ipv6-first-fragment", v6(IPv6ExtHdrFragment(offset=0, m=1, nh=6) / SYN), V6_TCP),
    ("ipv6-first-fragment-then-options",
     v6(IPv6ExtHdrFragment(offset=0, m=1, nh=60) / IPv6ExtHdrDestOpt(nh=6) / SYN), V6_TCP),
    ("ipv6-first-fragment-then-routing-and-options",
     v6(IPv6ExtHdrFragment(offset=0, m=1, nh=43) / IPv6ExtHdrRouting(nh=60) / IPv6ExtHdrDestOpt(nh=6) / SYN), V6_TCP),
    ("ipv6-options-first-fragment-options", v6(Raw(ext(60, 44) + ext(44, 60) + ext(60, 6, length=3) + bytes(SYN)), nh=60),
     V6_TCP),
    ("ipv6-no-next-header", v6(Raw(b"\x00" * 8), nh=59), Packet(V6_TCP.src, V6_TCP.dst, 59)),
    ("ipv6-ext-then-no-next-header", chain([(0, 0)], last=59, l4=b""), Packet(V6_TCP.src, V6_TCP.dst, 59)),
    ("ipv6-8-extension-headers", chain([(0, 0), (43, 1), (60, 2), (51, 1), (44, 3), (60, 0), (43, 0), (51, 4)]), V6_TCP),
    ("ipv6-8-then-icmpv6", chain([(60, 0)] * 8, last=58, l4=bytes(8)), Packet(V6_TCP.src, V6_TCP.dst, 58)),
    ("ipv6-tcp-options", v6(TCP(sport=40000, dport=22, options=[("MSS", 1400)])), V6_TCP),
]


