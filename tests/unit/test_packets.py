"""POLICY.md "Packets that cannot be decided by their fields": control.packets.parse_raw."""
import ipaddress

import pytest

from control.model import Packet
from control.errors import InputError
from control.packets import Unreadable, build_raw, packet_from_fields, parse_raw

from tests.packet_cases import READABLE, S4, S6, D4, D6, UNREADABLE, V6_TCP, chain, put16


def reason(data: bytes) -> str:
    with pytest.raises(Unreadable) as info:
        parse_raw(bytes(data))
    return info.value.reason.label


@pytest.mark.parametrize("data, label", [c[1:] for c in UNREADABLE], ids=[c[0] for c in UNREADABLE])
def test_unreadable(data, label):
    assert reason(data) == label


@pytest.mark.parametrize("label, verdict", [("ipv4-fragment", "fragment"), ("ipv6-fragment", "fragment"),
                                            ("ipv4-short", "malformed"), ("tcp-short", "malformed")])
def test_unreadable_verdict(label, verdict):
    case = next(c for c in UNREADABLE if c[2] == label)
    with pytest.raises(Unreadable) as info:
        parse_raw(bytes(case[1]))
    assert info.value.verdict == verdict


@pytest.mark.parametrize("data, expected", [c[1:] for c in READABLE], ids=[c[0] for c in READABLE])
def test_readable(data, expected):
    assert parse_raw(bytes(data)) == expected


@pytest.mark.parametrize("kind", [0, 43, 60, 51, 44])
@pytest.mark.parametrize("length", [0, 1, 2, 5])
def test_extension_header_length_formula(kind, length):
    """Ports are read right only if the walk skipped exactly the spec's size for this header."""
    data = chain([(kind, length)])
    size = 8 if kind == 44 else (length + 2) * 4 if kind == 51 else (length + 1) * 8
    assert len(data) == 40 + size + 20
    assert parse_raw(data) == V6_TCP
    # One byte short of the header (payload length ends inside it): it does not fit.
    assert reason(put16(bytearray(data), 4, size - 1)) == "ipv6-ext-truncated"


# A packet by fields, built as bytes, reads back as the same packet.
ROUND_TRIP = [
    (S4, D4, 6, 40000, 22), (S4, D4, 6, 0, 65535), (S4, D4, 17, 5353, 53), (S4, D4, 1, None, None),
    (S4, D4, 58, None, None), (S4, D4, 47, None, None), (S4, D4, 0, None, None), (S4, D4, 255, None, None),
    (S6, D6, 6, 40000, 22), (S6, D6, 17, 1, 65535), (S6, D6, 58, None, None), (S6, D6, 1, None, None),
    (S6, D6, 47, None, None), (S6, D6, 59, None, None), (S6, D6, 255, None, None),
]
@pytest.mark.parametrize("src, dst, proto, sport, dport", ROUND_TRIP)
def test_round_trip(src, dst, proto, sport, dport):
    pkt = Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, sport, dport)
    assert parse_raw(build_raw(pkt)) == pkt


@pytest.mark.parametrize("proto", [0, 43, 44, 51, 60])
def test_ipv6_extension_header_numbers_need_raw_bytes(proto):
    """By fields, such a packet has no one reading (the bytes would be walked as a header):
    refused with a pointer to raw bytes, so that explain and the kernel never disagree."""
    with pytest.raises(InputError, match="raw"):
        packet_from_fields({"src": S6, "dst": D6, "proto": proto})
    assert packet_from_fields({"src": "100.96.0.2", "dst": "10.0.0.1", "proto": proto}).proto == proto


def test_a_fragment_s_place_in_its_datagram():
    """IPv6 offsets count from the end of the Fragment header, so the extension headers after it
    are part of what a later fragment may not overwrite; the datagram is known by the next header
    its Fragment header names."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment
    from control.packets import fragment_of
    from control.reference import later_fragment
    from dataplane.reasons import Reason
    first = fragment_of(bytes(IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(nh=60, m=1, id=9) / IPv6ExtHdrDestOpt(nh=6)
                              / TCP(dport=22)))
    assert (first.offset, first.more, first.headers_end, first.datagram[-1]) == (0, True, 8 + 20, 60)

    def later(offset, nh):
        return fragment_of(bytes(IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(nh=nh, offset=offset, id=9) / bytes(8)))
    assert later_fragment(first, True, later(3, 60)) == Reason.FRAGMENT_OVERLAP
    assert later_fragment(first, True, later(4, 60)) == Reason.FRAGMENT_FOLLOWS
    assert later_fragment(first, True, later(4, 6)) is None              # names another protocol
    assert later_fragment(first, False, later(4, 60)) is None            # its first was not allowed
    v4 = fragment_of(bytes(IP(src=S4, dst=D4, flags="MF", id=3) / TCP(dport=22)))
    assert (v4.headers_end, v4.datagram[-1]) == (20, 6)
    assert fragment_of(bytes(IP(src=S4, dst=D4) / TCP(dport=22))) is None
