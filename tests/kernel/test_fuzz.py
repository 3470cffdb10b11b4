"""Hostile bytes through the real program (BPF_PROG_TEST_RUN): scapy's mutations of valid
packets, random bytes, and every truncation of valid headers. The kernel must give exactly
the reference's verdict, rule and reason (so never a more permissive one), on the first
packet of a flow and on a repeat (which conntrack's established path may decide)."""
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption
from scapy.layers.inet6 import (ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop,
                                IPv6ExtHdrRouting)
from scapy.packet import fuzz

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Principal, Rule, User
from control.probe import kernel_verdicts
from control.reference import decide

S4, S6, B4, D4, D6 = "100.96.0.2", "fd00:5a::2", "100.96.0.3", "10.20.0.10", "fd20::10"
IDS = Identities((User("a@example.com", ("dev",)), User("b@example.com", ())),
                 (Device("a", "a@example.com", ipaddress.IPv4Address(S4), ipaddress.IPv6Address(S6)),
                  Device("b", "b@example.com", ipaddress.IPv4Address(B4))))
POLICY = Policy("block", (
    Rule("no-telnet", 5, "block", protocols=frozenset({"tcp"}), dst_ports=((23, 23),)),
    Rule("dev-ssh", 10, "allow", principals=(Principal("group", "dev"),), protocols=frozenset({"tcp"}),
         dst_ports=((22, 22),)),
    Rule("dns", 20, "allow", protocols=frozenset({"udp"}), dst_ports=((53, 53),), src_ports=((1024, 65535),)),
    Rule("ping", 30, "allow", protocols=frozenset({"icmp"})),
))
VALID = [
    IP(src=S4, dst=D4) / TCP(sport=40000, dport=22, flags="S"),
    IP(src=B4, dst=D4) / TCP(sport=40000, dport=22, flags="A"),
    IP(src=S4, dst=D4, options=[IPOption(b"\x94\x04\x00\x00")]) / UDP(sport=5000, dport=53),
    IP(src=S4, dst=D4) / ICMP(type=8, id=3),
    IPv6(src=S6, dst=D6) / TCP(sport=40000, dport=22, flags="S"),
    IPv6(src=S6, dst=D6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / UDP(sport=5000, dport=53),
    IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=0, m=1) / TCP(sport=40000, dport=23),
    # extension headers in the fragmentable part: a first fragment, and a later one after them
    IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=0, m=1, nh=60) / IPv6ExtHdrDestOpt(nh=6)
    / TCP(sport=40000, dport=22, flags="S"),
    IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=0, m=1, nh=43) / IPv6ExtHdrRouting(nh=60)
    / IPv6ExtHdrDestOpt(nh=17) / UDP(sport=5000, dport=53),
    IPv6(src=S6, dst=D6) / IPv6ExtHdrFragment(offset=3, m=0, nh=60) / TCP(sport=40000, dport=23),
    IPv6(src=S6, dst=D6) / ICMPv6EchoRequest(id=3),
]


@pytest.fixture(scope="module")
def loaded(program):
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    return program, tables


def check(loaded, data: bytes) -> None:
    program, tables = loaded
    want = decide(POLICY, IDS, data).as_json()
    first, again = kernel_verdicts(program, tables, [data, data])
    assert first == want, data.hex()
    assert again == want, data.hex()


@pytest.mark.parametrize("pkt", VALID, ids=lambda p: p.summary())
def test_every_truncation_of_a_valid_packet(loaded, pkt):
    data = bytes(pkt)
    for n in range(len(data) + 1):
        check(loaded, data[:n])


FAST = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.sampled_from(range(len(VALID))), st.integers(0, 2**32 - 1))
def test_scapy_mutations_of_valid_packets(loaded, which, seed):
    import random
    random.seed(seed)                    # scapy's fuzz() draws from the random module
    data = bytes(fuzz(VALID[which].copy()))
    check(loaded, data)


@FAST
@given(st.sampled_from(range(len(VALID))), st.lists(st.tuples(st.integers(0, 127), st.integers(0, 255)),
                                                     min_size=1, max_size=6))
def test_byte_flips_of_valid_packets(loaded, which, flips):
    data = bytearray(bytes(VALID[which]))
    for at, value in flips:
        if at < len(data):
            data[at] = value
    check(loaded, bytes(data))


@FAST
@given(st.binary(min_size=0, max_size=128), st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x00]))
def test_random_bytes(loaded, tail, first):
    check(loaded, bytes([first]) + tail)
