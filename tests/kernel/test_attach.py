"""The program on real interfaces, in throwaway network namespaces: a TUN device (what
wireguard-go gives the gateway: generic XDP, frames from the IP header) fed through its file
descriptor, and a veth pair (native XDP, Ethernet frames) fed by a UDP socket on the peer's
side. Packets are seen dropped, delivered and reported; a second build replaces the first
while packets flow; an attachment made by a process that has exited stays and enforces."""
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from scapy.layers.inet import IP, UDP

from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Rule, User
from dataplane.attach import attach, attached, detach
from dataplane.errors import KernelError
from dataplane.events import EventReader
from dataplane.libbpf import obj_get, prog_id, unpin_all
from dataplane.program import Program
from dataplane.reasons import Reason, Verdict
from tests.netns import Namespaces, wait_until

from tests.programs import TEST_LAYOUT

GW, PEER = "100.96.0.1", "100.96.0.2"           # the gateway's address, a device's tunnel address
ALLOWED, BLOCKED = 5001, 5002
IDS = Identities((User("ann@example.com", ()),),
                 (Device("ann-laptop", "ann@example.com", ipaddress.IPv4Address(PEER)),))
POLICY = Policy("block", (Rule("app", 1, "allow", protocols=frozenset({"udp"}), dst_ports=((ALLOWED, ALLOWED),)),))
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


@pytest.fixture
def pin_dir():
    path = Path(f"/sys/fs/bpf/zt-test-{secrets.token_hex(4)}")
    yield path
    unpin_all(path)


@pytest.fixture
def ns():
    with Namespaces("ztat") as namespaces:
        yield namespaces


def build(layout, number, pin_dir) -> Program:
    program = Program(layout, build=number, pin_dir=pin_dir)
    program.load(compile_policy(POLICY, IDS, program.layout))
    return program


def tun_device(ns: Namespaces, where: str):
    """A TUN device inside `where` with the gateway's address, up; returns (name, fd). What is
    written to the fd is what the device receives (as from wireguard-go)."""
    name = ns.ifname("tun")
    with ns.inside(where):
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=name)[0]
            ipr.addr("add", index=index, address=GW, prefixlen=12)
            ipr.link("set", index=index, state="up")
    return name, fd


def udp_to_gw(dport: int, payload: bytes = b"ztgate") -> bytes:
    return bytes(IP(src=PEER, dst=GW) / UDP(sport=4000, dport=dport) / payload)


def receivers(ns: Namespaces, where: str) -> dict:
    out = {}
    for port in (ALLOWED, BLOCKED):
        s = ns.socket(where, timeout=0.3)
        s.bind((GW, port))
        out[port] = s
    return out


def received(sock: socket.socket) -> list[bytes]:
    got = []
    sock.settimeout(0.3)
    while True:
        try:
            got.append(sock.recv(2048))
        except (socket.timeout, BlockingIOError):
            return got
        sock.settimeout(0.05)


def test_tun_device_generic_mode(ns, pin_dir):
    ns.add("gw")
    name, fd = tun_device(ns, "gw")
    try:
        rx = receivers(ns, "gw")
        with build(TEST_LAYOUT, 1, pin_dir) as program, EventReader(program) as reader:
            with ns.inside("gw"):
                assert attached(name) is None
                with pytest.raises(KernelError, match="native"):
                    attach(program, name, "native")       # TUN devices have no native XDP
                assert attached(name) is None
                assert attach(program, name) == "generic"
                assert attached(name) == (program.id, "generic")
            for port in (ALLOWED, BLOCKED, ALLOWED):
                os.write(fd, udp_to_gw(port, f"to {port}".encode()))
            assert received(rx[ALLOWED]) == [b"to 5001", b"to 5001"]
            assert received(rx[BLOCKED]) == []
            events = reader.poll(200)
            # the allowed flow once, the blocked packet once: as they went
            assert [(e.dport, e.verdict, e.build) for e in events] == \
                [(ALLOWED, Verdict.ALLOW, 1), (BLOCKED, Verdict.BLOCK, 1)]
            assert all(e.src == ipaddress.IPv4Address(PEER) and e.length == 35 for e in events)
            assert program.reason_counters()[Reason.DEFAULT][0] == 1

            with ns.inside("gw"):
                detach(name)
                assert attached(name) is None
                detach(name)                                   # nothing there: nothing to do
            os.write(fd, udp_to_gw(BLOCKED, b"unpoliced"))
            assert received(rx[BLOCKED]) == [b"unpoliced"]
            assert reader.poll(100) == []
    finally:
        os.close(fd)


def veth_pair(ns: Namespaces):
    """gw <-> peer over a veth pair, IPv6 off (no neighbour discovery noise), static
    neighbours (no ARP): every packet the peer sends reaches the gateway's interface."""
    ns.add("gw")
    ns.add("peer")
    for where in ("gw", "peer"):
        ns.run(where, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
    gw_if, peer_if = ns.veth("gw", "peer", f"{GW}/12", f"{PEER}/12")
    macs = {}
    for where, ifname in (("gw", gw_if), ("peer", peer_if)):
        with ns.inside(where), IPRoute() as ipr:
            macs[where] = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_ADDRESS")
    for where, ifname, ip, other in (("gw", gw_if, PEER, "peer"), ("peer", peer_if, GW, "gw")):
        with ns.inside(where), IPRoute() as ipr:
            ipr.neigh("add", dst=ip, lladdr=macs[other], ifindex=ipr.link_lookup(ifname=ifname)[0], state=0x80)
    return gw_if, peer_if


def link_drops(ns: Namespaces, where: str, ifname: str) -> int:
    with ns.inside(where), IPRoute() as ipr:
        stats = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0].get_attr("IFLA_STATS64")
        return stats["rx_dropped"] + stats["tx_dropped"]


def test_veth_native_mode_and_a_replacement_without_a_gap(ns, pin_dir):
    """Build 1 enforces; build 2 replaces it while the peer sends as fast as it can. Every
    packet is decided by one build or the other: the blocked port receives nothing, and the
    shared counters account for every packet sent."""
    gw_if, peer_if = veth_pair(ns)
    rx = receivers(ns, "gw")
    eth = replace(TEST_LAYOUT, ethernet=True)
    with build(eth, 1, pin_dir) as first, build(eth, 2, pin_dir) as second, EventReader.pinned(pin_dir) as reader:
        with ns.inside("gw"):
            assert attach(first, gw_if) == "native"
            assert attached(gw_if) == (first.id, "native")
        before = first.reason_counters()
        sender = ns.socket("peer")
        sender.bind((PEER, 4000))
        sent = {ALLOWED: 0, BLOCKED: 0}
        stop = threading.Event()

        def send():
            while not stop.is_set():
                for port in (ALLOWED, BLOCKED):
                    sender.sendto(b"x", (GW, port))
                    sent[port] += 1

        def read_for(seconds):
            # Read as the peer sends: a ring buffer left full would lose the later build's events.
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                events.extend(reader.poll(50))

        events = []
        thread = threading.Thread(target=send)
        thread.start()
        try:
            read_for(0.3)
            with ns.inside("gw"):
                assert attach(second, gw_if) == "native"       # replaces, in one netlink call
                assert attached(gw_if) == (second.id, "native")
            read_for(0.3)
        finally:
            stop.set()
            thread.join()
        read_for(0.1)
        after = second.reason_counters()
        decided = {ALLOWED: after[Reason.RULE][0] - before[Reason.RULE][0],
                   BLOCKED: after[Reason.DEFAULT][0] - before[Reason.DEFAULT][0]}
        drops = link_drops(ns, "gw", gw_if) + link_drops(ns, "peer", peer_if)
        assert sent[BLOCKED] > 1000
        assert received(rx[BLOCKED]) == []
        # Packets the veth itself dropped (its queue full) never met a program.
        assert sent[ALLOWED] + sent[BLOCKED] - drops == decided[ALLOWED] + decided[BLOCKED]
        assert drops < sent[BLOCKED] // 10
        assert len(received(rx[ALLOWED])) > 0
        assert {e.build for e in events if e.verdict == Verdict.BLOCK and e.dport == BLOCKED} == {1, 2}
        with ns.inside("gw"):
            with pytest.raises(KernelError, match="one step"):
                attach(first, gw_if, "generic")                 # a mode change cannot be one step
            assert attached(gw_if) == (second.id, "native")
            detach(gw_if)
            assert attached(gw_if) is None


CHILD = """
import ipaddress, sys
from control.compiler import compile_policy
from control.model import Device, Identities, Policy, Rule, User
from dataplane.attach import attach
from dataplane.program import Program
from tests.programs import TEST_LAYOUT
ids = Identities((User("ann@example.com", ()),), (Device("ann-laptop", "ann@example.com", ipaddress.IPv4Address("{peer}")),))
policy = Policy("block", (Rule("app", 1, "allow", protocols=frozenset({{"udp"}}), dst_ports=(({allowed}, {allowed}),)),))
program = Program(TEST_LAYOUT, build=7, pin_dir="{pin_dir}")
program.load(compile_policy(policy, ids, program.layout))
print(attach(program, "{ifname}"), program.id)
program.pin("{pin_dir}/gw")
"""


def test_an_attachment_outlives_the_process_that_made_it(ns, pin_dir):
    ns.add("gw")
    name, fd = tun_device(ns, "gw")
    try:
        rx = receivers(ns, "gw")
        code = CHILD.format(peer=PEER, allowed=ALLOWED, pin_dir=pin_dir, ifname=name)
        out = ns.python("gw", code, timeout=120).stdout.split()
        mode, child_prog = out[-2], int(out[-1])
        assert mode == "generic"
        with ns.inside("gw"):
            assert attached(name) == (child_prog, "generic")      # the child has exited
        pinned = obj_get(pin_dir / "gw" / "prog")
        try:
            assert prog_id(pinned) == child_prog
        finally:
            os.close(pinned)
        with EventReader.pinned(pin_dir) as reader:
            for port in (BLOCKED, ALLOWED):
                os.write(fd, udp_to_gw(port))
            assert received(rx[BLOCKED]) == []
            assert received(rx[ALLOWED]) == [b"ztgate"]
            events = wait_until(lambda: reader.poll(100), what="events from the child's program")
            assert [(e.build, e.dport, e.verdict) for e in events] == \
                [(7, BLOCKED, Verdict.BLOCK), (7, ALLOWED, Verdict.ALLOW)]
        with ns.inside("gw"):
            detach(name)
            assert attached(name) is None
    finally:
        os.close(fd)


def test_hundreds_of_swaps_under_traffic_decide_every_packet_by_one_policy(ns, pin_dir):
    """Two builds of different policies are swapped on the interface 400 times while the peer
    sends from many flows and other threads test-run both builds. Every event says which build
    decided: its verdict and rule must be what the reference says under that build's policy.
    A packet decided half by one build's tables and half by the other's would show here."""
    from control.reference import decide
    from control.packets import parse_raw

    port_b = BLOCKED
    policies = {
        1: POLICY,
        2: Policy("block", (Rule("filler", 1, "block", protocols=frozenset({"udp"}), dst_ports=((5003, 5003),)),
                            Rule("b-only", 2, "allow", protocols=frozenset({"udp"}), dst_ports=((port_b, port_b),)))),
    }
    gw_if, _ = veth_pair(ns)
    receivers(ns, "gw")
    eth = replace(TEST_LAYOUT, ethernet=True)
    programs = {}
    for number, policy in policies.items():
        programs[number] = Program(eth, build=number, pin_dir=pin_dir)
        programs[number].load(compile_policy(policy, IDS, programs[number].layout))
    names = {n: compile_policy(p, IDS, eth).rule_names for n, p in policies.items()}
    expected = {(n, port): decide(p, IDS, parse_raw(udp_to_gw(port))) for n, p in policies.items()
                for port in (ALLOWED, port_b)}
    stop = threading.Event()
    wrong_runs = []
    events = []
    try:
        with EventReader.pinned(pin_dir) as reader:
            def test_runs(number):
                program = programs[number]
                while not stop.is_set():
                    for port in (ALLOWED, port_b):
                        r = program.run(udp_to_gw(port), cpu=None)
                        want = 2 if expected[(number, port)].verdict == "allow" else 1
                        if r.retval != want:
                            wrong_runs.append((number, port, r.retval))
                    time.sleep(0.001)     # (the GIL: the swapping thread must get its turns)

            threads = [start_flows(ns, (ALLOWED, port_b), stop)]
            threads += [threading.Thread(target=test_runs, args=(n,)) for n in (1, 2)]
            for t in threads[1:]:
                t.start()
            with ns.inside("gw"):
                for flip in range(400):
                    attach(programs[1 + flip % 2], gw_if)
                    events.extend(reader.poll(0))
                    time.sleep(0.002)
            stop.set()
            for t in threads:
                t.join()
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                events.extend(reader.poll(50))
    finally:
        stop.set()
        for p in programs.values():
            p.close()
    assert not wrong_runs, wrong_runs[:5]
    ours = [e for e in events if e.dport in (ALLOWED, port_b) and e.build in policies]
    mixed = [(e.build, e.dport, e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             for e in ours
             if (e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             != (expected[(e.build, e.dport)].verdict, expected[(e.build, e.dport)].rule)]
    assert mixed == [], mixed[:5]
    by_build = {n: sum(1 for e in ours if e.build == n) for n in policies}
    assert min(by_build.values()) > 200, by_build      # both builds decided many packets


def start_flows(ns, ports, stop: threading.Event) -> threading.Thread:
    """32 UDP flows from the peer to the gateway (16 source ports x the two PORTS), a packet of
    each every 2 ms until STOP is set: the thread sending them, started."""
    senders = []
    for i in range(16):
        s = ns.socket("peer")
        s.bind((PEER, 4100 + i))
        senders.append(s)

    def send():
        while not stop.is_set():
            for s in senders:
                for port in ports:
                    s.sendto(b"x", (GW, port))
            time.sleep(0.002)
    thread = threading.Thread(target=send)
    thread.start()
    return thread
