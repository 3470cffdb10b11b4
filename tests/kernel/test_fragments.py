"""Fragments (BPF_PROG_TEST_RUN, both sides): a datagram's first fragment is decided by its
ports; later fragments follow an allowed first, in order or not yet seen (dropped), and never
one that would overwrite the transport header the first carried. IPv4 and IPv6."""

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, PadN, fragment6

from control.compiler import compile_policy
from control.packets import parse_raw
from control.reference import decide
from dataplane.reasons import Reason, Verdict

from tests.app_policy import ANN4, ANN6, APP4, APP6, IDS, POLICY
from tests.programs import TEST_LAYOUT, XDP_PASS, pinned_program
from tests.programs import run_on_one_cpu as run


@pytest.fixture(scope="module")
def program():
    with pinned_program("frag", TEST_LAYOUT) as prog:
        yield prog


@pytest.fixture
def loaded(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    return program


def v4_parts(src, dst, l4, ident, size=3000):
    return fragment(IP(src=src, dst=dst, id=ident) / l4 / (b"x" * size), fragsize=1000)


def v6_parts(src, dst, l4, ident, size=3000):
    return fragment6(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / l4 / (b"x" * size), 1280)


PARTS = {"ipv4": lambda l4, ident, src=ANN4: v4_parts(src, APP4, l4, ident),
         "ipv6": lambda l4, ident, src=ANN6: v6_parts(src, APP6, l4, ident)}


@pytest.mark.parametrize("family", PARTS)
def test_an_allowed_datagram_passes_whole(loaded, family):
    parts = PARTS[family](UDP(sport=44000, dport=5353), 777)
    assert len(parts) >= 3
    first = run(loaded, parts[0])
    assert first.verdict.label == decide(POLICY, IDS, parse_raw(bytes(parts[0]))).verdict == "allow"
    for later in parts[1:]:
        got = run(loaded, later)
        assert (got.retval, got.reason) == (XDP_PASS, Reason.FRAGMENT_FOLLOWS)
    # the same id from another source, or another id: no first was seen
    other = PARTS[family](UDP(sport=44000, dport=5353), 778)
    assert run(loaded, other[1]).verdict == Verdict.FRAGMENT


@pytest.mark.parametrize("family", PARTS)
def test_a_blocked_or_unseen_first_leaves_its_fragments_dropped(loaded, family):
    parts = PARTS[family](UDP(sport=44001, dport=53), 901)             # udp 53: default block
    assert run(loaded, parts[0]).verdict == Verdict.BLOCK
    assert all(run(loaded, p).verdict == Verdict.FRAGMENT for p in parts[1:])
    # out of order: the later fragments before the first are dropped; after it, they follow
    parts = PARTS[family](UDP(sport=44002, dport=5353), 902)
    assert run(loaded, parts[2]).verdict == Verdict.FRAGMENT
    assert run(loaded, parts[0]).verdict == Verdict.ALLOW
    assert run(loaded, parts[2]).reason == Reason.FRAGMENT_FOLLOWS


def test_a_later_fragment_may_not_overwrite_the_header(loaded):
    first = IP(src=ANN4, dst=APP4, id=55, flags="MF") / TCP(sport=44003, dport=22, flags="S") / (b"x" * 64)
    assert run(loaded, first).verdict == Verdict.ALLOW
    for offset, want in ((1, Reason.FRAGMENT_OVERLAP), (2, Reason.FRAGMENT_OVERLAP), (3, Reason.FRAGMENT_FOLLOWS)):
        # offset 1 would rewrite bytes 8-15 (the TCP flags), 2 bytes 16-19; 3 starts after the header
        later = IP(src=ANN4, dst=APP4, id=55, frag=offset, proto=6) / (b"\x00" * 32)
        assert run(loaded, later).reason == want, offset


def test_a_change_stops_the_rest_of_a_datagram(loaded):
    parts = PARTS["ipv4"](UDP(sport=44004, dport=5353), 66)
    assert run(loaded, parts[0]).verdict == Verdict.ALLOW
    loaded.next_epoch()
    assert run(loaded, parts[1]).verdict == Verdict.FRAGMENT


@pytest.mark.parametrize("family", PARTS)
def test_a_fragmented_reply_passes_whole_and_only_then(loaded, family):
    src, dst = (ANN4, APP4) if family == "ipv4" else (ANN6, APP6)
    make = v4_parts if family == "ipv4" else v6_parts
    assert run(loaded, (IP if family == "ipv4" else IPv6)(src=src, dst=dst) / UDP(sport=44005, dport=5353)).retval \
        == XDP_PASS
    answer = make(dst, src, UDP(sport=5353, dport=44005), 4242)
    stranger = make(dst, src, UDP(sport=5353, dport=44999), 4243)
    assert run(loaded, stranger[0], reply=True).reason == Reason.NOT_REPLY
    assert run(loaded, stranger[1], reply=True).verdict == Verdict.FRAGMENT
    assert run(loaded, answer[0], reply=True).reason == Reason.REPLY
    assert all(run(loaded, p, reply=True).reason == Reason.FRAGMENT_FOLLOWS for p in answer[1:])


def v6_first_with_options(ident, dport=22, sport=44010, opts=24):
    """A first fragment whose fragmentable part starts with OPTS bytes of Destination Options
    (RFC 8200: headers after the Fragment header are fragmented with the payload), then a TCP SYN."""
    return (IPv6(src=ANN6, dst=APP6) / IPv6ExtHdrFragment(nh=60, offset=0, m=1, id=ident)
            / IPv6ExtHdrDestOpt(nh=6, options=[PadN(optdata=b"\0" * (opts - 4))])
            / TCP(sport=sport, dport=dport, flags="S") / (b"x" * 4))


def v6_later(ident, offset, nh, payload, more=False):
    return IPv6(src=ANN6, dst=APP6) / IPv6ExtHdrFragment(nh=nh, offset=offset, m=int(more), id=ident) / payload


def test_ipv6_offsets_count_the_headers_after_the_fragment_header(loaded):
    """Issue 13, finding 1. Offsets count from the start of the fragmentable part, which holds
    the Destination Options: with 24 bytes of them, the TCP header lies at bytes 24-43. A
    later fragment at offset 24 would rewrite it (the ports, the flags) after the decision,
    whatever next header it claims; one after it follows."""
    first = v6_first_with_options(4040)
    assert len(bytes(first[IPv6ExtHdrFragment].payload)) == 48
    assert run(loaded, first).verdict == Verdict.ALLOW
    telnet = bytes(TCP(sport=44010, dport=23, flags="S"))
    assert run(loaded, v6_later(4040, 3, 6, telnet)).verdict == Verdict.FRAGMENT      # claims TCP
    assert run(loaded, v6_later(4040, 3, 60, telnet)).reason == Reason.FRAGMENT_OVERLAP
    assert run(loaded, v6_later(4040, 5, 60, b"x" * 16)).reason == Reason.FRAGMENT_OVERLAP
    assert run(loaded, v6_later(4040, 6, 60, b"x" * 16)).reason == Reason.FRAGMENT_FOLLOWS
    # the datagram's next header is the first fragment's: a later one that names another
    # protocol is no part of it
    assert run(loaded, v6_later(4040, 6, 6, b"x" * 16)).verdict == Verdict.FRAGMENT
    assert run(loaded, v6_later(4040, 6, 17, b"x" * 16)).verdict == Verdict.FRAGMENT


def test_a_kill_forgets_ipv6_datagrams_whose_first_header_is_an_option(loaded):
    """The datagram's key names its first header after the Fragment header (here 60): the kill
    finds it by the protocol its first fragment was decided on."""
    import ipaddress
    assert run(loaded, v6_first_with_options(4141, sport=44011)).verdict == Verdict.ALLOW
    assert loaded.kill_flow(6, 6, ipaddress.ip_address(ANN6), ipaddress.ip_address(APP6), 44011, 22)
    assert run(loaded, v6_later(4141, 6, 60, b"x" * 16)).verdict == Verdict.FRAGMENT
