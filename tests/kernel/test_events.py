"""Flow events, counters, in-place writes and pins of the real program (BPF_PROG_TEST_RUN).

Events are compared with the reference evaluator's decision and the packet's own fields; the
limiter and the ring buffer are pushed past their limits; builds that share a pin directory
share the ring buffer, the per-CPU state and the flow cache."""
import ctypes
import ipaddress
import os
import secrets
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Dot1Q, Ether

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Principal, Rule, User
from control.packets import parse_raw
from control.reference import decide
from dataplane.errors import KernelError
from dataplane.events import EventReader
from dataplane.libbpf import map_info, obj_get, prog_id, unpin_all
from dataplane.program import POLICY_MAPS, SHARED_MAPS, Program
from dataplane.reasons import Reason, Verdict
from tests.c_defines import define
from tests.packet_cases import UNREADABLE
from tests.programs import TEST_LAYOUT, XDP_DROP, XDP_PASS

BUILD = 4242

IDS = Identities(
    (User("ann@example.com", ("dev",)), User("bob@example.com", ())),
    (Device("ann-laptop", "ann@example.com", ipaddress.IPv4Address("100.96.0.2"), ipaddress.IPv6Address("fd00:5a::2")),
     Device("bob-phone", "bob@example.com", ipaddress.IPv4Address("100.96.0.3")),
     # outside the pool: the source hash holds it
     Device("ann-server", "ann@example.com", ipaddress.IPv4Address("10.99.0.1"), ipaddress.IPv6Address("fd99::1"))))
POLICY = Policy("block", (
    Rule("ssh-dev", 10, "allow", principals=(Principal("group", "dev"),), protocols=frozenset({"tcp"}),
         dst_ports=((22, 22),)),
    Rule("no-dns", 20, "block", protocols=frozenset({"udp"}), dst_ports=((53, 53),)),
    Rule("udp", 30, "allow", protocols=frozenset({"udp"})),
    Rule("icmp", 40, "allow", protocols=frozenset({"icmp"})),
))
ALLOW_ALL = Policy("block", (Rule("everything", 1, "allow"),))
ANN4, ANN6, BOB4, SRV4 = "100.96.0.2", "fd00:5a::2", "100.96.0.3", "10.99.0.1"
D4, D6 = "10.20.0.10", "fd20::10"


def drain(reader: EventReader) -> list:
    out = []
    while True:
        got = reader.poll(0)
        if not got:
            return out
        out += got


def run_all(program, packets, raw_frame=False):
    """Run each packet once on one CPU; return the XDP actions."""
    with program.on_one_cpu() as cpu:
        return [program.run(bytes(p), cpu=cpu, raw_frame=raw_frame).retval for p in packets]


@pytest.fixture
def loaded(program):
    """The session's tunnel build with POLICY, fresh per-CPU state, and a drained reader."""
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    with EventReader(program) as reader:
        drain(reader)
        yield program, tables, reader


# ---------------------------------------------------------------------------------------------
# what an event says


READABLE_CASES = [
    IP(src=ANN4, dst=D4) / TCP(sport=40000, dport=22, flags="S"),      # allow ssh-dev
    IP(src=BOB4, dst=D4) / TCP(sport=40001, dport=22, flags="S"),      # default block (not in dev)
    IPv6(src=ANN6, dst=D6) / TCP(sport=40002, dport=22, flags="S"),    # allow, IPv6
    IP(src=ANN4, dst=D4) / UDP(sport=40003, dport=53),                 # block no-dns
    IP(src=ANN4, dst=D4) / UDP(sport=40004, dport=5000),               # allow udp: a new flow
    IP(src=SRV4, dst=D4) / UDP(sport=40005, dport=5000),               # allow, source from the hash
    IPv6(src=ANN6, dst=D6) / ICMPv6EchoRequest(),                      # allow icmp
    IP(src=ANN4, dst=D4, proto=47) / (b"\0" * 8),                      # other protocol: default block
    IP(src="100.96.0.99", dst=D4) / UDP(sport=40006, dport=5000),      # unknown source
    IPv6(src="fd99::77", dst=D6) / UDP(sport=40007, dport=5000),       # unknown source, IPv6, hash miss
]


def test_each_event_carries_the_decision_and_the_packet(loaded):
    program, tables, reader = loaded
    device_ids = tables.sources.device_ids
    cases = [bytes(p) for p in READABLE_CASES] + [bytes(data) for _, data, _ in UNREADABLE]
    for data in cases:
        before = time.monotonic_ns()
        run_all(program, [data])
        after = time.monotonic_ns()
        events = reader.poll(100)
        assert len(events) == 1, data.hex()
        e = events[0]
        want = decide(POLICY, IDS, data).as_json()
        got_rule = tables.rule_names[e.rule - 1] if e.rule else None
        assert (e.verdict.label, got_rule, e.reason.label) == (want["verdict"], want["rule"], want["reason"])
        assert e.build == 0          # the session program is built without a build number
        assert before <= e.time_ns <= after
        assert e.length == max(len(data), 14)     # test runs pad to an Ethernet header's length
        if want["verdict"] in ("malformed", "fragment"):
            assert (e.device, e.ident, e.rule, e.sport, e.dport) == (0, 0, 0, 0, 0)
            continue
        pkt = parse_raw(data)
        assert (e.family, e.src, e.dst, e.proto) == (pkt.src.version, pkt.src, pkt.dst, pkt.proto)
        assert (e.sport, e.dport) == (pkt.sport or 0, pkt.dport or 0)
        owner = next((d for d in IDS.devices if pkt.src in d.addresses), None)
        assert e.device == (device_ids[owner.name] if owner else 0)
        if owner:
            base = program.layout.pool4_base if pkt.src.version == 4 else program.layout.pool6_base
            offset = int(pkt.src) - base
            pool = tables.pool4 if pkt.src.version == 4 else tables.pool6
            entry = pool.get(offset) or tables.src_hash[(pkt.src.version, pkt.src.packed.rjust(16, b"\0"))]
            assert e.ident == entry[0] and e.ident > 0
        else:
            assert e.ident == 0


class RawReader(EventReader):
    """Keeps each record's bytes as well: the layout ebpf/maps.h documents, checked byte by byte."""

    def _sample(self, ctx, data, size):
        self.raw.append(ctypes.string_at(data, size))
        return super()._sample(ctx, data, size)


def test_the_record_layout(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    with RawReader(program) as reader:
        drain(reader)
        reader.raw = []
        run_all(program, [IP(src=BOB4, dst=D4) / UDP(sport=0x1234, dport=53),
                          IPv6(src=ANN6, dst=D6) / UDP(sport=0x1234, dport=53)])
        v4, v6 = reader.poll(100)
    r4, r6 = reader.raw
    assert len(r4) == len(r6) == 72
    # IPv4 addresses in the first four bytes of their 16, the rest zero: not v4-mapped
    assert r4[32:48] == ipaddress.IPv4Address(BOB4).packed + bytes(12)
    assert r4[48:64] == ipaddress.IPv4Address(D4).packed + bytes(12)
    assert r6[32:48] == ipaddress.IPv6Address(ANN6).packed
    assert r4[28:32] == bytes.fromhex("3412 3500")       # ports in host (little-endian) order
    assert (r4[64], r4[65], r4[66], r4[67]) == (4, 17, Verdict.BLOCK, Reason.RULE)
    assert int.from_bytes(r4[20:24], "little") == 2 == v4.rule    # rule no-dns
    assert (r6[64], v6.family) == (6, 6)
    assert r4[68] == 0 == v4.name and r4[69:72] == bytes(3)    # no learned name decided; the pad zero


# ---------------------------------------------------------------------------------------------
# which allowed packets are new flows


def tcp_v4(flags, **ip):
    return IP(src=ANN4, dst=D4, **ip) / TCP(sport=41000, dport=22, flags=flags)


def tcp_v6_ext(flags):
    """A TCP segment behind two IPv6 extension headers: the flags are found after the walk."""
    return IPv6(src=ANN6, dst=D6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(sport=41001, dport=22,
                                                                                    flags=flags)


@pytest.mark.parametrize("packet, emits", [
    (tcp_v4("S"), True),
    (tcp_v4("A"), False),
    (tcp_v4("SA"), False),            # the answer to a SYN is not a new flow
    (tcp_v4("PA"), False),
    (tcp_v4("F"), False),
    (tcp_v4("R"), False),
    (tcp_v4("S", options=[b"\x01" * 4]), True),     # IPv4 options: the TCP header starts later
    (tcp_v4("A", options=[b"\x01" * 4]), False),
    (IPv6(src=ANN6, dst=D6) / TCP(sport=41002, dport=22, flags="S"), True),
    (tcp_v6_ext("S"), True),
    (tcp_v6_ext("A"), False),
], ids=["syn", "ack", "syn-ack", "psh-ack", "fin", "rst", "v4-options-syn", "v4-options-ack", "v6-syn",
        "v6-ext-syn", "v6-ext-ack"])
def test_an_allowed_tcp_packet_is_reported_only_when_it_opens_a_flow(loaded, packet, emits):
    program, _, reader = loaded
    assert run_all(program, [packet] * 3) == [XDP_PASS] * 3
    events = reader.poll(50)
    # a SYN is reported once (its retransmissions are no new flow: test_retransmitted_syn.py); nothing else that is allowed
    assert len(events) == (1 if emits else 0)
    assert all(e.verdict == Verdict.ALLOW and e.rule == 1 for e in events)


def test_tcp_flags_are_found_behind_vlan_tags(eth_program):
    tables = compile_policy(POLICY, IDS, eth_program.layout)
    eth_program.load(tables)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    with EventReader(eth_program) as reader:
        drain(reader)
        for flags, emits in (("S", 1), ("A", 0)):
            for frame in (eth / tcp_v4(flags), eth / Dot1Q(vlan=7) / tcp_v4(flags),
                          eth / Dot1Q(vlan=7) / Dot1Q(vlan=8) / tcp_v6_ext(flags)):
                eth_program.clear_flows()   # (each frame's SYN a new flow, not a retransmission)
                assert run_all(eth_program, [frame], raw_frame=True) == [XDP_PASS]
                assert len(reader.poll(50)) == emits, (flags, frame.summary())


def test_an_allowed_udp_or_icmp_flow_is_reported_once_per_window(loaded):
    program, _, reader = loaded
    flow = IP(src=ANN4, dst=D4) / UDP(sport=42000, dport=5000)
    other_port = IP(src=ANN4, dst=D4) / UDP(sport=42001, dport=5000)
    ping = IP(src=ANN4, dst=D4) / ICMP()
    assert run_all(program, [flow, flow, other_port, flow, ping, ping, other_port]) == [XDP_PASS] * 7
    events = reader.poll(50)
    assert [(e.proto, e.sport) for e in events] == [(17, 42000), (17, 42001), (1, 0)]

    # Age the first flow's entry past ZT_FLOW_EVENT_NS: its next packet is reported again, once.
    window = define("ZT_FLOW_EVENT_NS")
    flows = program.bpf["zt_ct"]
    (key,) = [k for k in flows.keys() if k.proto == 17 and k.sport == 42000]
    entry = flows[key]
    entry.event_ns -= window + 1
    flows[key] = entry
    program.bpf["zt_fcache"].clear()   # (its slot holds the flow until its next look at zt_ct)
    assert run_all(program, [flow, flow, other_port]) == [XDP_PASS] * 3
    assert [(e.proto, e.sport) for e in reader.poll(50)] == [(17, 42000)]
    assert program.occupancy()["conntrack"][0] == 3


def test_dropped_packets_are_always_reported(loaded):
    program, _, reader = loaded
    dns = IP(src=ANN4, dst=D4) / UDP(sport=43000, dport=53)
    assert run_all(program, [dns] * 5) == [XDP_DROP] * 5
    events = reader.poll(50)
    assert len(events) == 5 and {(e.verdict, e.rule) for e in events} == {(Verdict.BLOCK, 2)}


# ---------------------------------------------------------------------------------------------
# limits: the kernel never waits for the reader


def test_a_flood_is_rate_limited_counted_and_still_decided(loaded):
    program, _, reader = loaded
    burst, rate = define("ZT_EVENT_BURST"), define("ZT_EVENT_RATE")
    flood = bytes(IP(src="100.96.0.99", dst=D4) / UDP(sport=44000, dport=5000))
    n = 100_000
    before = program.reason_counters()[Reason.UNKNOWN_SOURCE][0]
    with program.on_one_cpu() as cpu:
        started = time.monotonic()
        result = program.run(flood, repeat=n, cpu=cpu)
        wall = time.monotonic() - started
    assert result.retval == XDP_DROP and result.verdict == Verdict.UNKNOWN
    assert program.reason_counters()[Reason.UNKNOWN_SOURCE][0] - before == n
    counts = program.event_counters()
    assert counts["sent"] + counts["rate_limited"] + counts["ring_full"] == n
    # one CPU: at most a burst, plus what the rate allows over the run (the coarse clock moves
    # in ticks: one more tick's worth of slack)
    assert burst <= counts["sent"] <= burst + rate * (wall + 0.02)
    assert program.events_lost() == counts["rate_limited"] + counts["ring_full"] >= n - counts["sent"]
    events = drain(reader)
    assert len(events) == counts["sent"]
    assert all(e.verdict == Verdict.UNKNOWN and e.sport == 44000 for e in events)


def test_a_full_ring_buffer_is_counted_and_never_waited_for(loaded):
    program, _, reader = loaded
    ring_bytes = program.occupancy()["event_ring_bytes"][1]
    flood = bytes(IP(src="100.96.0.99", dst=D4) / UDP(sport=45000, dport=5000))
    total = 0
    deadline = time.monotonic() + 20
    with program.on_one_cpu() as cpu:
        while program.event_counters()["ring_full"] == 0:
            assert time.monotonic() < deadline, "the ring buffer never filled"
            assert program.run(flood, repeat=20_000, cpu=cpu).retval == XDP_DROP
            total += 20_000
    counts = program.event_counters()
    assert counts["sent"] + counts["rate_limited"] + counts["ring_full"] == total
    pending = program.occupancy()["event_ring_bytes"][0]
    assert ring_bytes - 2 * 80 < pending <= ring_bytes      # full, to within a record (80 bytes each)
    assert len(drain(reader)) == counts["sent"]
    assert program.occupancy()["event_ring_bytes"][0] == 0
    # once read, the ring takes events again (the limiter allows them after a pause)
    time.sleep(0.05)
    run_all(program, [flood])
    assert len(reader.poll(50)) == 1


def test_poll_returns_within_its_timeout(loaded):
    _, _, reader = loaded
    started = time.monotonic()
    assert reader.poll(150) == []
    assert 0.14 < time.monotonic() - started < 0.5


# ---------------------------------------------------------------------------------------------
# counters and in-place writes


def test_counters_by_rule_and_by_reason(loaded):
    program, tables, _ = loaded
    ssh = bytes(IP(src=ANN4, dst=D4) / TCP(sport=46000, dport=22, flags="A"))
    dns = bytes(IP(src=ANN4, dst=D4) / UDP(sport=46001, dport=53))
    other = bytes(IP(src=BOB4, dst=D4) / TCP(sport=46002, dport=80, flags="A"))
    run_all(program, [ssh] * 3 + [dns] * 2 + [other] + [b"\x45"])
    assert program.rule_counters() == {1: (3, 3 * len(ssh)), 2: (2, 2 * len(dns)), 0: (1, len(other))}
    reasons = program.reason_counters()
    assert reasons[Reason.RULE] == (5, 3 * len(ssh) + 2 * len(dns))
    assert reasons[Reason.DEFAULT] == (1, len(other))
    assert reasons[Reason.IPV4_SHORT] == (1, 14)
    assert set(reasons) == set(Reason)
    assert tables.rule_names[:2] == ["ssh-dev", "no-dns"]


def test_occupancy(loaded):
    program, tables, reader = loaded
    occ = program.occupancy()
    assert occ["pool4"] == (len(tables.pool4), 1 << 20) and occ["pool6"] == (len(tables.pool6), 1 << 20)
    assert occ["src_hash"] == (len(tables.src_hash), program.layout.max_src_hash)
    assert occ["conntrack"] == (0, define("ZT_CT_ENTRIES"))
    assert occ["event_ring_bytes"] == (0, 1 << 20)
    run_all(program, [IP(src=ANN4, dst=D4) / UDP(sport=47000 + i, dport=5000) for i in range(4)])
    occ = program.occupancy()
    assert occ["conntrack"][0] == 4
    assert occ["event_ring_bytes"][0] == 4 * 80      # 72-byte events, 8-byte record headers
    assert len(drain(reader)) == 4


@pytest.mark.parametrize("address", ["100.96.0.50", "fd00:5a::50", "10.99.0.77", "fd99::5"],
                         ids=["pool4", "pool6", "hash4", "hash6"])
def test_set_sources_changes_decisions_in_place(loaded, address):
    program, tables, _ = loaded
    addr = ipaddress.ip_address(address)
    dst = D4 if addr.version == 4 else D6
    ip = IP if addr.version == 4 else IPv6
    ssh = bytes(ip(src=address, dst=dst) / TCP(sport=48000, dport=22, flags="S"))
    ann = tables.pool4[int(ipaddress.ip_address(ANN4)) - program.layout.pool4_base][0]
    bob = tables.pool4[int(ipaddress.ip_address(BOB4)) - program.layout.pool4_base][0]
    assert ann != bob

    def once():
        with program.on_one_cpu() as cpu:
            r = program.run(ssh, cpu=cpu)
        return r.verdict, r.rule, r.device

    assert program.sources_of([addr]) == [(addr, 0, 0)]
    assert once() == (Verdict.UNKNOWN, 0, 0)
    program.set_sources([(addr, ann, 77)])
    assert program.sources_of([addr]) == [(addr, ann, 77)]
    assert once() == (Verdict.ALLOW, 1, 77)
    program.set_sources([(addr, bob, 78)])                  # moved to another class
    assert once() == (Verdict.BLOCK, 0, 78)
    program.set_sources([(addr, 0, 0)])                     # removed
    assert program.sources_of([addr]) == [(addr, 0, 0)]
    assert once() == (Verdict.UNKNOWN, 0, 0)
    program.set_sources([(addr, 0, 0)])                     # removing what is not there: nothing
    with pytest.raises(ValueError):
        program.set_sources([(addr, program.layout.max_idents, 1)])


def test_set_idents_writes_new_classes(loaded):
    program, tables, _ = loaded
    free = len(tables.idents)                 # ids 1..free-1 are the compiled classes
    ann = tables.pool4[int(ipaddress.ip_address(ANN4)) - program.layout.pool4_base][0]
    ann_bits = tables.sources.ident_row(ann)  # one word; the build holds two: padded with zeros
    addr = ipaddress.ip_address("100.96.0.60")
    ssh = bytes(IP(src=str(addr), dst=D4) / TCP(sport=49000, dport=22, flags="S"))

    def verdict():
        with program.on_one_cpu() as cpu:
            return program.run(ssh, cpu=cpu).verdict

    # a class with no who-bits, then one with ann's (group dev): the source moves to it
    program.set_idents(free, np.stack([ann_bits * 0, ann_bits]))
    program.set_sources([(addr, free, 5)])
    assert verdict() == Verdict.BLOCK
    program.set_sources([(addr, free + 1, 5)])
    assert verdict() == Verdict.ALLOW
    # a row rewritten in place
    program.set_idents(free + 1, [[0, 0]])
    assert verdict() == Verdict.BLOCK
    for first, rows in ((0, [ann_bits]), (program.layout.max_idents, [ann_bits]),
                        (free, [[0] * (program.layout.who_words + 1)])):
        with pytest.raises(ValueError):
            program.set_idents(first, rows)


# ---------------------------------------------------------------------------------------------
# builds that share a pin directory


@pytest.fixture
def pin_dir():
    """A fresh directory on bpffs, removed with everything in it afterwards (also on failure)."""
    path = Path(f"/sys/fs/bpf/zt-test-{secrets.token_hex(4)}")
    yield path
    unpin_all(path)
    assert not path.exists()


def _pinned_map_id(path) -> int:
    fd = obj_get(path)
    try:
        return map_info(fd).id
    finally:
        os.close(fd)


def test_builds_sharing_a_pin_dir_share_events_state_and_flows(pin_dir):
    dns = bytes(IP(src=ANN4, dst=D4) / UDP(sport=50000, dport=53))
    flow = bytes(IP(src=ANN4, dst=D4) / UDP(sport=50001, dport=5000))
    with ExitStack() as stack:
        first = stack.enter_context(Program(TEST_LAYOUT, build=1, pin_dir=pin_dir))
        assert sorted(os.listdir(pin_dir)) == sorted(SHARED_MAPS)
        first.load(compile_policy(POLICY, IDS, first.layout))
        assert run_all(first, [dns, flow, flow]) == [XDP_DROP, XDP_PASS, XDP_PASS]

        # The next build, as a policy swap makes it: the same maps, which its load() keeps.
        second = stack.enter_context(Program(TEST_LAYOUT, build=2, pin_dir=pin_dir))
        second.load(compile_policy(POLICY, IDS, second.layout))
        for name in SHARED_MAPS:
            assert map_info(second.bpf[name].get_fd()).id == _pinned_map_id(pin_dir / name)
        assert second.reason_counters()[Reason.RULE] == (3, len(dns) + 2 * len(flow))
        first.close()
        with EventReader(second) as reader:
            assert [(e.build, e.verdict, e.sport) for e in reader.poll(100)] == \
                [(1, Verdict.BLOCK, 50000), (1, Verdict.ALLOW, 50001)]
            # build 2 reports the flow again, once: another build decided it
            assert run_all(second, [flow, flow]) == [XDP_PASS, XDP_PASS]
            assert [(e.build, e.sport) for e in reader.poll(100)] == [(2, 50001)]
            assert run_all(second, [dns]) == [XDP_DROP]
    # No program left: the pins alone keep the maps, as a restarted controller finds them.
    with EventReader.pinned(pin_dir) as reader:
        assert [(e.build, e.sport) for e in reader.poll(100)] == [(2, 50000)]


def test_pin_replaces_the_build_in_force(program, eth_program, pin_dir):
    """Two programs (the session's tunnel and Ethernet builds) pinned in turn at one place."""
    for p in (program, eth_program):
        p.pin(pin_dir)
        assert sorted(os.listdir(pin_dir)) == ["prog", "prog_reply", "tables"]    # no staging left behind
        fd = obj_get(pin_dir / "prog")
        try:
            assert prog_id(fd) == p.id
        finally:
            os.close(fd)
        assert sorted(os.listdir(pin_dir / "tables")) == sorted(POLICY_MAPS)
        for name in POLICY_MAPS:
            assert _pinned_map_id(pin_dir / "tables" / name) == map_info(p.bpf[name].get_fd()).id
    unpin_all(pin_dir)
    assert not pin_dir.exists()
    assert program.id and eth_program.id          # unpinning leaves the programs alone


def test_a_pinned_map_of_another_shape_is_refused(pin_dir):
    from bcc import BPF

    # What another program might have left there: a flow cache of other sizes.
    pin_dir.mkdir()
    BPF(text=f'BPF_TABLE_PINNED("lru_hash", u32, u64, zt_ct, 16, "{pin_dir}/zt_ct");').cleanup()
    assert (pin_dir / "zt_ct").exists()
    with pytest.raises(KernelError, match="zt_ct"):
        Program(TEST_LAYOUT, pin_dir=pin_dir)


def test_unpin_all_refuses_what_is_not_on_bpffs(tmp_path):
    (tmp_path / "keep").write_text("x")
    with pytest.raises(KernelError):
        unpin_all(tmp_path)
    assert (tmp_path / "keep").exists()


def test_a_dry_run_decides_but_leaves_no_trace(loaded):
    """`ztgate trace` runs packets through the live program: the verdict comes back, but no
    counter moves, no event is written and no conntrack entry opens a way back."""
    program, _, reader = loaded
    cases = [IP(src=ANN4, dst=D4) / UDP(sport=41000, dport=5000),              # allow: would track
             IP(src=BOB4, dst=D4) / TCP(sport=41001, dport=22, flags="S"),     # default block
             IP(src="100.96.0.99", dst=D4) / UDP(sport=41002, dport=5000)]     # unknown source
    before = (program.rule_counters(), program.reason_counters(), program.event_counters())
    with program.on_one_cpu() as cpu:
        for pkt in cases:
            dry = program.run(bytes(pkt), cpu=cpu, dry=True)
            want = decide(POLICY, IDS, parse_raw(bytes(pkt)))
            assert dry.verdict.label == want.verdict
            assert (program.rule_counters(), program.reason_counters(), program.event_counters()) == before
            assert program.run(bytes(pkt), cpu=cpu, dry=True, reply=True).verdict == Verdict.BLOCK
    assert drain(reader) == [] and len(list(program.bpf["zt_ct"].keys())) == 0
    # the same packets for real: counted, reported, tracked
    assert run_all(program, cases) == [XDP_PASS, XDP_DROP, XDP_DROP]
    assert len(drain(reader)) == 3 and len(list(program.bpf["zt_ct"].keys())) == 1
    assert program.rule_counters() != before[0]
