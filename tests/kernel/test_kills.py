"""Kills that outlast their flow's zt_ct entry (zt_killed, ebpf/kills.h), on BPF_PROG_TEST_RUN.
A killed flow whose entry is evicted (other flows churn the LRU, or the entry is deleted as an
eviction would) or timed out does not come back on a packet without SYN, either way; a SYN
the policy allows opens the tuple again; a kill ends when kill_hold() says; a kill that does
not fit zt_killed is refused whole. (test_conntrack.py has the kill while its entry lives.)"""
import ctypes
import ipaddress
import time
from dataclasses import replace

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

from control.compiler import compile_policy
from dataplane.errors import KernelError
from dataplane.mirrors import CT_KILLED, KILL_ENTRIES
from dataplane.reasons import Reason

from tests.app_policy import ANN4, ANN6, APP4, APP6, IDS, POLICY, reverse
from tests.programs import TEST_LAYOUT, XDP_DROP, XDP_PASS, pinned_program
from tests.programs import run_on_one_cpu as run

CT_ENTRIES = 1024     # a conntrack small enough for a test to churn
HOLD = 2              # seconds: every timeout of the `short` program, and so its kills' hold

SSH = IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="A")
# (a flow's packet from the device, and a reply to it from the private side)
CASES = [
    (SSH, reverse(SSH)),
    (IP(src=ANN4, dst=APP4) / UDP(sport=41002, dport=5353), IP(src=APP4, dst=ANN4) / UDP(sport=5353, dport=41002)),
    (IPv6(src=ANN6, dst=APP6) / UDP(sport=41003, dport=5353),
     IPv6(src=APP6, dst=ANN6) / UDP(sport=5353, dport=41003)),
    (IP(src=ANN4, dst=APP4) / ICMP(type=8, id=9), IP(src=APP4, dst=ANN4) / ICMP(type=0, id=9)),
    (IPv6(src=ANN6, dst=APP6) / ICMPv6EchoRequest(id=9), IPv6(src=APP6, dst=ANN6) / ICMPv6EchoReply(id=9)),
]


def _load(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    return program


@pytest.fixture(scope="module")
def program():
    with pinned_program("kills", replace(TEST_LAYOUT, ct_entries=CT_ENTRIES)) as prog:
        yield prog


@pytest.fixture(scope="module")
def short_program():
    timeouts = dict(ct_tcp_seconds=HOLD, ct_udp_seconds=HOLD, ct_icmp_seconds=HOLD, ct_tcp_closing_seconds=1)
    with pinned_program("kills-short", replace(TEST_LAYOUT, **timeouts)) as prog:
        yield prog


@pytest.fixture
def loaded(program):
    return _load(program)


@pytest.fixture
def short(short_program):
    return _load(short_program)


def flow_of(pkt) -> tuple:
    """(family, proto, src, dst, sport, dport) of a device's packet, as flows() names its flow."""
    l3 = pkt[IP] if IP in pkt else pkt[IPv6]
    family, proto = (4, l3.proto) if IP in pkt else (6, l3.nh)
    l4 = l3.payload
    sport, dport = (l4.id, 0) if proto in (1, 58) else (l4.sport, l4.dport)
    return family, proto, ipaddress.ip_address(l3.src), ipaddress.ip_address(l3.dst), sport, dport


def tracked(program, pkt) -> list:
    family, proto, src, dst, sport, dport = flow_of(pkt)
    return [f for f in program.flows()
            if (f["family"], f["proto"], f["src"], f["dst"], f["sport"], f["dport"]) == flow_of(pkt)]


def kill(program, pkt) -> bool:
    return program.kill_flow(*flow_of(pkt))


def evict(program, pkt) -> None:
    """Remove the flow's zt_ct entry, as the LRU does when the table is full."""
    family, proto, src, dst, sport, dport = flow_of(pkt)
    table = program.bpf["zt_ct"]
    key = table.Key()
    ctypes.memmove(key.src, src.packed, len(src.packed))
    ctypes.memmove(key.dst, dst.packed, len(dst.packed))
    key.sport, key.dport, key.family, key.proto = sport, dport, family, proto
    del table[key]


@pytest.mark.parametrize("pkt, back", CASES, ids=lambda p: p.summary())
def test_a_killed_flow_whose_entry_is_evicted_stays_killed_both_ways(loaded, pkt, back):
    first = run(loaded, pkt)
    assert first.retval == XDP_PASS
    assert kill(loaded, pkt)
    evict(loaded, pkt)
    got = run(loaded, pkt)
    assert (got.retval, got.reason, got.device) == (XDP_DROP, Reason.KILLED, first.device)
    got = run(loaded, back, reply=True)
    assert (got.retval, got.reason) == (XDP_DROP, Reason.NOT_REPLY)   # no entry: no way back
    assert tracked(loaded, pkt) == []                       # nothing brought the flow back


def test_a_killed_flow_stays_killed_when_other_flows_churn_conntrack(loaded):
    """A device opening allowed flows until the LRU has evicted the killed one. Each sends two
    packets, as flows in use do (the LRU keeps an entry looked up again over one that never
    was); all on one CPU (the LRU recycles a CPU's own lists first, the kill's among them)."""
    with loaded.on_one_cpu() as cpu:
        assert loaded.run(bytes(SSH), cpu=cpu).retval == XDP_PASS
        assert kill(loaded, SSH)
        for sport in range(50000, 50000 + 3 * CT_ENTRIES):
            churn = bytes(IP(src=ANN4, dst=APP4) / TCP(sport=sport, dport=22, flags="A"))
            assert [loaded.run(churn, cpu=cpu).retval for _ in range(2)] == [XDP_PASS] * 2
    assert tracked(loaded, SSH) == []                       # evicted
    assert run(loaded, SSH).reason == Reason.KILLED
    assert run(loaded, reverse(SSH), reply=True).reason == Reason.NOT_REPLY
    assert tracked(loaded, SSH) == []


def test_only_a_syn_opens_the_tuple_again_after_eviction(loaded):
    """A SYN-ACK from the device (it skips the established path, as every SYN does) is decided
    by the policy but does not bring the evicted killed flow back; a SYN opens a new one."""
    assert run(loaded, SSH).retval == XDP_PASS
    assert kill(loaded, SSH)
    evict(loaded, SSH)
    synack = IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="SA")
    assert run(loaded, synack).retval == XDP_PASS           # the policy allows it, as in flight
    assert run(loaded, SSH).reason == Reason.KILLED
    assert run(loaded, reverse(SSH), reply=True).reason == Reason.NOT_REPLY
    assert run(loaded, IP(src=ANN4, dst=APP4) / TCP(sport=41000, dport=22, flags="S")).retval == XDP_PASS
    assert run(loaded, SSH).retval == XDP_PASS
    assert run(loaded, reverse(SSH), reply=True).reason == Reason.REPLY
    assert [f["state"] for f in tracked(loaded, SSH)] == [0]
    evict(loaded, SSH)                                      # the kill ended with the SYN
    assert run(loaded, SSH).retval == XDP_PASS


@pytest.mark.parametrize("pkt, back", CASES[:2], ids=lambda p: p.summary())
def test_a_kill_outlives_its_entry_s_timeout_and_ends_when_told(short, pkt, back):
    """The entry times out HOLD after the flow's last packet; the kill holds HOLD after the kill
    (kill_hold: the protocol's conntrack timeout), then the policy decides the tuple again."""
    assert short.kill_hold(flow_of(pkt)[1]) == HOLD
    assert run(short, pkt).retval == XDP_PASS
    last = time.monotonic()
    time.sleep(0.8)
    killed_at = time.monotonic()
    assert kill(short, pkt)
    time.sleep(max(0.0, last + HOLD + 0.3 - time.monotonic()))     # the entry has timed out
    assert time.monotonic() < killed_at + HOLD - 0.2, "the host was too slow for this test's timing"
    assert run(short, pkt).reason == Reason.KILLED
    assert run(short, back, reply=True).reason == Reason.NOT_REPLY
    time.sleep(max(0.0, killed_at + HOLD + 0.3 - time.monotonic()))   # the kill has ended
    assert run(short, pkt).retval == XDP_PASS
    assert run(short, back, reply=True).reason == Reason.REPLY
    assert [f["state"] for f in tracked(short, pkt)] != [CT_KILLED]


def test_a_device_s_flows_forgotten_take_their_kills_with_them(loaded):
    """forget_flows (a device removed or disabled: its address may go to another device): its
    kills go too, so the address's next owner does not inherit them."""
    assert run(loaded, SSH).retval == XDP_PASS
    assert kill(loaded, SSH)
    assert loaded.forget_flows([ipaddress.ip_address(ANN4)]) == 1
    assert list(loaded.bpf["zt_killed"].items_lookup_batch()) == []
    assert run(loaded, SSH).retval == XDP_PASS               # decided by the policy


def _fill_kills(program, until_ns: int) -> None:
    """zt_killed full of other tuples' kills, each holding until until_ns."""
    kills = program.bpf["zt_killed"]
    keys = (kills.Key * KILL_ENTRIES)()
    values = (kills.Leaf * KILL_ENTRIES)()
    for i in range(KILL_ENTRIES):
        keys[i].family, keys[i].proto, keys[i].sport, keys[i].dport = 4, 17, i % 65536, 9
        keys[i].src[0], keys[i].dst[0] = 192, 198
        values[i].until_ns = until_ns
    kills.items_update_batch(keys, values)


def test_a_kill_that_does_not_fit_is_refused_whole(loaded):
    assert loaded.bpf["zt_killed"].max_entries == KILL_ENTRIES
    assert run(loaded, SSH).retval == XDP_PASS
    _fill_kills(loaded, time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 3600 * 10**9)
    with pytest.raises(KernelError, match="do not fit"):
        kill(loaded, SSH)
    assert run(loaded, SSH).retval == XDP_PASS              # nothing of it was done
    assert [f["state"] for f in tracked(loaded, SSH)] == [0]
    _fill_kills(loaded, 1)                                  # all expired: swept at the next kill
    assert kill(loaded, SSH)
    assert run(loaded, SSH).reason == Reason.KILLED
    assert len(list(loaded.bpf["zt_killed"].items_lookup_batch())) == 1


def test_flows_kill_help_says_how_long_a_kill_holds_and_how_many_fit():
    from control.cli.parser import build_parser
    from dataplane.layout import Layout

    parser = build_parser()
    flows = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "flows")[1]
    text = " ".join(flows._subparsers._group_actions[0].choices["kill"].format_help().split())
    d = Layout()
    for words in (f"TCP {d.ct_tcp_seconds} s", f"UDP {d.ct_udp_seconds} s", f"ICMP {d.ct_icmp_seconds} s",
                  f"up to {KILL_ENTRIES} kills"):
        assert words in text
