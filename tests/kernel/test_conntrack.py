"""Conntrack on the ingress program (BPF_PROG_TEST_RUN): the established path decides a tracked
flow's later packets with one lookup, exactly as the policy would; a change (the epoch moves)
sends them back to the policy; TCP closes on FIN/RST; a killed flow drops both ways."""
import ctypes
import functools
import ipaddress
import operator
import struct
import time
from dataclasses import replace

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

from control.compiler import compile_policy
from control.packets import parse_raw
from control.reference import decide
from dataplane.mirrors import CT_CLOSING, CT_KILLED, KILL_BITS
from dataplane.reasons import Reason, Verdict

from tests.app_policy import ANN4, ANN6, APP4, APP6, BOB4, IDS, POLICY, reverse
from tests.c_defines import define
from tests.programs import TEST_LAYOUT, XDP_DROP, XDP_PASS, pinned_program
from tests.programs import run_on_one_cpu as run

CLOSING = 1    # seconds after a FIN or RST: short, so that a test can watch it


@pytest.fixture(scope="module")
def program():
    with pinned_program("ct", replace(TEST_LAYOUT, ct_tcp_closing_seconds=CLOSING)) as prog:
        yield prog


@pytest.fixture
def loaded(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    return program


FLOWS = [
    IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="A"),      # ssh-dev
    IP(src=BOB4, dst=APP4) / TCP(sport=41001, dport=8080, flags="PA"),   # web
    IP(src=ANN4, dst=APP4) / UDP(sport=41002, dport=5353),               # dns
    IPv6(src=ANN6, dst=APP6) / UDP(sport=41003, dport=5353),             # dns, IPv6
    IP(src=ANN4, dst=APP4) / ICMP(type=8, id=9),                         # icmp (an echo)
    IPv6(src=ANN6, dst=APP6) / ICMPv6EchoRequest(id=9),
    IP(src="100.96.0.3", dst=APP4) / TCP(sport=41004, dport=22, flags="A"),   # bob: blocked
]


@pytest.mark.parametrize("pkt", FLOWS, ids=lambda p: p.summary())
def test_the_established_path_decides_as_the_policy_does(loaded, pkt):
    want = decide(POLICY, IDS, parse_raw(bytes(pkt)))
    hits = loaded.conntrack_hits()
    first, second, third = (run(loaded, pkt) for _ in range(3))
    tables_rule = dict(enumerate(compile_policy(POLICY, IDS, loaded.layout).rule_names, start=1))
    for got in (first, second, third):
        assert (got.verdict.label, got.reason.label, tables_rule.get(got.rule)) == (want.verdict, want.reason,
                                                                                    want.rule)
    taken = loaded.conntrack_hits() - hits
    # the first packet is decided by the policy; an allowed flow's next ones by conntrack
    assert taken == (2 if want.verdict == "allow" else 0)


def test_a_change_sends_established_flows_back_to_the_policy(loaded):
    ssh = FLOWS[0]
    for _ in range(3):                       # (the third from the flow cache's slot)
        assert run(loaded, ssh).retval == XDP_PASS
    hits = loaded.conntrack_hits()
    revoked = type(POLICY)("block", tuple(r for r in POLICY.rules if r.name != "ssh-dev"))
    loaded.load(compile_policy(revoked, IDS, loaded.layout))
    loaded.next_epoch()
    got = run(loaded, ssh)                   # the open flow's next packet: decided again, dropped
    assert (got.verdict, got.reason) == (Verdict.BLOCK, Reason.DEFAULT)
    assert loaded.conntrack_hits() == hits
    assert run(loaded, reverse(ssh), reply=True).reason == Reason.REVOKED


def test_a_fin_or_rst_closes_a_tcp_flow_soon(loaded):
    for flags in ("FA", "R"):
        sport = 42000 + len(flags)
        data = IP(src=ANN4, dst=APP4) / TCP(sport=sport, dport=22, flags="A")
        end = IP(src=ANN4, dst=APP4) / TCP(sport=sport, dport=22, flags=flags)
        assert run(loaded, data).retval == XDP_PASS and run(loaded, end).retval == XDP_PASS
        (flow,) = [f for f in loaded.flows() if f["sport"] == sport]
        assert flow["state"] == CT_CLOSING
        assert run(loaded, reverse(data), reply=True).reason == Reason.REPLY   # the last ACKs pass
    time.sleep(CLOSING + 0.2)
    for flags in ("FA", "R"):
        data = IP(src=ANN4, dst=APP4) / TCP(sport=42000 + len(flags), dport=22, flags="A")
        assert run(loaded, reverse(data), reply=True).reason == Reason.NOT_REPLY
    # a SYN on the tuple opens a new connection
    syn = IP(src=ANN4, dst=APP4) / TCP(sport=42002, dport=22, flags="S")
    assert run(loaded, syn).retval == XDP_PASS
    assert [f["state"] for f in loaded.flows() if f["sport"] == 42002] == [0]


def test_a_killed_flow_drops_both_ways_until_a_new_connection(loaded):
    ssh = FLOWS[0]
    for _ in range(3):                       # (the third from the flow cache's slot)
        assert run(loaded, ssh).retval == XDP_PASS
    assert loaded.kill_flow(4, 6, ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4), 41000, 22)
    assert not loaded.kill_flow(4, 6, ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4), 41000, 23)
    got = run(loaded, ssh)
    assert (got.retval, got.reason, got.device) == (XDP_DROP, Reason.KILLED, 1)
    assert run(loaded, reverse(ssh), reply=True).reason == Reason.KILLED
    syn = IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="S")
    assert run(loaded, syn).retval == XDP_PASS                  # the policy allows a new one
    assert run(loaded, ssh).retval == XDP_PASS
    (flow,) = [f for f in loaded.flows() if f["sport"] == 41000]
    assert flow["state"] != CT_KILLED


def test_only_a_syn_reopens_a_killed_flow(loaded):
    """A packet that reaches the policy while its flow is killed (a kill racing the packet; here,
    deterministically, a SYN-ACK, which skips the established path as every SYN does) is
    decided by the policy but does not bring the flow back: its next packet is still killed."""
    ssh = FLOWS[0]
    assert run(loaded, ssh).retval == XDP_PASS
    assert loaded.kill_flow(4, 6, ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4), 41000, 22)
    synack = IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="SA")
    want = decide(POLICY, IDS, parse_raw(bytes(synack)))
    got = run(loaded, synack)
    assert (got.verdict.label, got.reason.label) == (want.verdict, want.reason)
    assert run(loaded, ssh).reason == Reason.KILLED
    assert run(loaded, IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="S")).retval == XDP_PASS
    assert run(loaded, ssh).retval == XDP_PASS


def test_several_flows_end_at_once(loaded):
    """`flows kill --device` and `--user`: every flow given is killed (two of them between the
    same two ends), one that is not tracked is not counted, and the others live on."""
    ann, app = ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4)
    ssh, web, dns = FLOWS[0], FLOWS[1], FLOWS[2]
    ssh2 = IP(src=ANN4, dst=APP4) / TCP(sport=41010, dport=22, flags="A")
    for pkt in (ssh, ssh2, web, dns):
        assert run(loaded, pkt).retval == XDP_PASS
    gone = [(4, 6, ann, app, 41000, 22), (4, 6, ann, app, 41010, 22), (4, 17, ann, app, 41002, 5353),
            (4, 17, ann, app, 49999, 5353)]
    assert loaded.kill_flows(gone) == 3
    for pkt in (ssh, ssh2, dns):
        assert run(loaded, pkt).reason == Reason.KILLED
    assert run(loaded, web).retval == XDP_PASS
    assert loaded.kill_flows([]) == 0


def test_a_kill_decides_no_other_flow_again(loaded):
    """A kill reaches every CPU's flow cache by the epoch's low bits (ZT_KILL_BITS), which the
    flow cache compares and nothing else does: another flow's datagram whose first fragment
    passed before the kill still completes, and its replies still pass as replies."""
    assert define("ZT_KILL_BITS") == KILL_BITS
    ssh = FLOWS[0]
    assert run(loaded, ssh).retval == XDP_PASS
    first, *rest = fragment(IP(src=ANN4, dst=APP4, id=77) / UDP(sport=41002, dport=5353) / (b"x" * 3000),
                            fragsize=1000)
    assert run(loaded, first).retval == XDP_PASS
    epoch = loaded.epoch
    assert loaded.kill_flow(4, 6, ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4), 41000, 22)
    assert loaded.epoch == epoch + 1
    assert run(loaded, ssh).reason == Reason.KILLED                     # through the cache's check
    assert all(run(loaded, p).reason == Reason.FRAGMENT_FOLLOWS for p in rest)
    assert run(loaded, reverse(IP(src=ANN4, dst=APP4) / UDP(sport=41002, dport=5353)), reply=True).reason == Reason.REPLY
    # A change of policy still moves the epoch past every kill: the fragments' datagram is over.
    loaded.next_epoch()
    assert loaded.epoch >> KILL_BITS == (epoch >> KILL_BITS) + 1 and loaded.epoch % (1 << KILL_BITS) == 0
    assert run(loaded, rest[0]).verdict == Verdict.FRAGMENT


def test_a_killed_flow_s_fragmented_datagrams_end_with_it(loaded):
    """Later fragments carry no ports: they follow their datagram, not the flow. A kill forgets
    the datagrams between the flow's two ends in its protocol, either way, so a datagram whose
    first fragment passed before the kill does not complete after it."""
    dns = IP(src=ANN4, dst=APP4) / UDP(sport=41002, dport=5353)
    first, *rest = fragment(IP(src=ANN4, dst=APP4, id=99) / UDP(sport=41002, dport=5353) / (b"x" * 3000),
                            fragsize=1000)
    assert run(loaded, first).retval == XDP_PASS
    back, *back_rest = fragment(IP(src=APP4, dst=ANN4, id=98) / UDP(sport=5353, dport=41002) / (b"y" * 3000),
                                fragsize=1000)
    assert run(loaded, back, reply=True).reason == Reason.REPLY
    assert loaded.kill_flow(4, 17, ipaddress.ip_address(ANN4), ipaddress.ip_address(APP4), 41002, 5353)
    assert run(loaded, dns).reason == Reason.KILLED
    assert all(run(loaded, p).verdict == Verdict.FRAGMENT for p in rest)
    assert all(run(loaded, p, reply=True).verdict == Verdict.FRAGMENT for p in back_rest)


def test_flows_count_packets_and_bytes_both_ways(loaded):
    dns = FLOWS[2]
    for _ in range(3):
        assert run(loaded, dns).retval == XDP_PASS
    for _ in range(2):
        assert run(loaded, reverse(dns), reply=True).retval == XDP_PASS
    (flow,) = loaded.flows()
    assert (flow["packets"], flow["bytes"]) == (3, 3 * len(bytes(dns)))
    assert (flow["reply_packets"], flow["reply_bytes"]) == (2, 2 * len(bytes(reverse(dns))))
    assert flow["device"] == 1 and flow["src"] == ipaddress.ip_address(ANN4) and flow["dport"] == 5353
    assert flow["created_ns"] <= flow["seen_ns"]


def test_a_full_table_never_lets_a_packet_through_undecided():
    """Eight entries for 64 flows: every packet is still decided by the policy (as the
    reference decides it); the flows evicted lose their way back, the rest keep it."""
    from dataplane.program import Program

    with Program(replace(TEST_LAYOUT, ct_entries=8)) as small:
        tables = compile_policy(POLICY, IDS, small.layout)
        small.load(tables)
        flows = [IP(src=ANN4 if i % 2 else BOB4, dst=APP4) / TCP(sport=43000 + i, dport=22, flags="S")
                 for i in range(64)]
        for pkt in flows:
            want = decide(POLICY, IDS, parse_raw(bytes(pkt)))
            got = run(small, pkt)
            assert (got.verdict.label, got.reason.label) == (want.verdict, want.reason)
        assert len(small.flows()) <= 8
        allowed = [p for p in flows if p[IP].src == ANN4]
        back = [run(small, reverse(p), reply=True).reason for p in allowed]
        assert back[0] == Reason.NOT_REPLY and back[-1] == Reason.REPLY
        assert back.count(Reason.REPLY) <= 8


def fcache_index(src: str, dst: str, sport: int, dport: int, proto: int, bits: int) -> int:
    """ebpf/ztgate.c fcache_index() of an IPv4 flow (x86: words little-endian)."""
    words = lambda a: struct.unpack("<4I", ipaddress.ip_address(a).packed.ljust(16, b"\0"))   # noqa: E731
    h = (functools.reduce(operator.xor, words(src)) * 0x9E3779B1) & 0xFFFFFFFF
    h ^= functools.reduce(operator.xor, words(dst)) ^ (dport << 16 | sport) ^ (proto << 8 | 4)   # (family 4)
    return ((h * 0x85EBCA6B) & 0xFFFFFFFF) >> (32 - bits)


def raw_packets(program, sport: int) -> int:
    """What zt_ct itself holds of a flow's packets (without the flow cache's pending counts)."""
    return sum(v.packets for k, v in program.bpf["zt_ct"].items() if k.sport == sport)


def test_the_flow_cache_decides_as_conntrack_and_loses_no_count(loaded):
    """Two flows that share a slot of the flow cache, interleaved: every packet decided as the
    policy decides, every packet counted, and the slot did serve packets (zt_ct's own count
    lags behind the total while they wait in the slot)."""
    bits = define("ZT_FCACHE_BITS")
    slot = fcache_index(ANN4, APP4, 41100, 5353, 17, bits)
    other = next(p for p in range(41101, 60000) if fcache_index(ANN4, APP4, p, 5353, 17, bits) == slot)
    a, b = (IP(src=ANN4, dst=APP4) / UDP(sport=port, dport=5353) / b"x" for port in (41100, other))
    want = decide(POLICY, IDS, parse_raw(bytes(a)))
    assert want.verdict == "allow"
    order = [a, a, a, a, b, b, b, a, b, a, b, b, b, b, a, a, a]   # (ends with two in the slot)
    for pkt in order:
        got = run(loaded, pkt)
        assert (got.verdict.label, got.reason.label) == (want.verdict, want.reason)
    counts = {f["sport"]: (f["packets"], f["bytes"]) for f in loaded.flows()}
    for pkt in (a, b):
        n = sum(1 for x in order if x is pkt)
        assert counts[pkt[UDP].sport] == (n, n * len(bytes(pkt)))
    assert raw_packets(loaded, 41100) + raw_packets(loaded, other) < len(order)
    # (and they did share it: it holds the last flow's two packets)
    assert any(s.key.sport == 41100 and s.packets == 2 for s in loaded.bpf["zt_fcache"][ctypes.c_uint32(slot)])

