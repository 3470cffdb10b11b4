"""The DNS slow path on a real NFQUEUE, in namespaces of its own (no lab, no lock needed):
device - gateway (the slow path reads the queue there) - resolver.

    zt-t-qd 10.98.0.2 --ztt-d-- zt-t-qg (chain ztdns-ztt-d, queue 5302) --ztt-r-- zt-t-qr 10.99.0.53

The slow path's learn callback is the test's own, so a test can hold it (as a swap holding
the learned lock does) and see what passes meanwhile.
"""
from __future__ import annotations

import ipaddress
import socket
import subprocess
import threading
import time

import dns.message
import dns.rrset
import pytest

from control.dns.settings import DnsConfig
from control.dns.slowpath import SlowPath
from tests.lab_traffic import inside, ns_socket

DEV_NS, GW_NS, RES_NS = "zt-t-qd", "zt-t-qg", "zt-t-qr"
DEV, RES, QUEUE = "10.98.0.2", "10.99.0.53", 5302


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def path():
    """The three namespaces, routed through the gateway's; removed after."""
    try:
        for ns in (DEV_NS, GW_NS, RES_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            _ip("netns", "add", ns)
        for ns, here, addr, net in ((DEV_NS, "ztt-d", DEV, "10.98.0"), (RES_NS, "ztt-r", RES, "10.99.0")):
            _ip("-n", GW_NS, "link", "add", here, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", GW_NS, "addr", "add", f"{net}.1/24", "dev", here)
            _ip("-n", GW_NS, "link", "set", here, "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "route", "add", "default", "via", f"{net}.1")
        subprocess.run(["nsenter", f"--net=/run/netns/{GW_NS}", "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        yield
    finally:
        for ns in (DEV_NS, GW_NS, RES_NS):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class HeldLearner:
    """The gateway's learn, held until released (as Kernel.learn waits on the learned lock
    while a swap attaches a build)."""

    def __init__(self):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.calls: list = []

    def __call__(self, taught, asker):
        self.calls.append(list(taught))
        self.entered.set()
        self.gate.wait(20)
        return len(taught)


def started(learn, **dns) -> SlowPath:
    cfg = DnsConfig(resolvers=(ipaddress.ip_address(RES),), queue=QUEUE, **dns)
    sp = SlowPath(cfg, "ztt-d", learn, str)
    with inside(GW_NS):
        sp.start()
    return sp


def answer_to(query: bytes, address: str = "10.99.0.10") -> bytes:
    q = dns.message.from_wire(query)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", address))
    return r.to_wire()


def received(sock: socket.socket, quiet: float) -> int:
    """How many datagrams SOCK gets until none comes for QUIET seconds."""
    n = 0
    sock.settimeout(quiet)
    try:
        while True:
            sock.recvfrom(4096)
            n += 1
    except socket.timeout:
        return n


def test_a_full_queue_lets_answers_pass_unlearned(path):
    """The reader is held on its first answer (learning waits); the queue (16) fills; the
    answers over it pass to the device at once, unlearned (fail-open), and none is lost."""
    learn = HeldLearner()
    sp = started(learn, queue_length=16)
    try:
        client = ns_socket(DEV_NS, socket.SOCK_DGRAM, timeout=3)
        server = ns_socket(RES_NS, socket.SOCK_DGRAM, timeout=3)
        server.bind((RES, 53))
        query = dns.message.make_query("app.corp.example", "A").to_wire()
        client.sendto(query, (RES, 53))
        _, peer = server.recvfrom(4096)
        reply, burst = answer_to(query), 60
        server.sendto(reply, peer)
        assert learn.entered.wait(5), "the first answer never reached the slow path"
        for _ in range(burst):
            server.sendto(reply, peer)
        passed_while_held = received(client, 1.0)
        learn.gate.set()
        released_after = received(client, 1.0)
        assert passed_while_held >= burst - 16 - 2, f"only {passed_while_held} of {burst} passed a full queue"
        assert passed_while_held + released_after == burst + 1, "answers were lost"
        assert len(learn.calls) == 1                  # the rest passed unqueued, or were replays
        assert sp.counters.queued <= 1 + 16
        server.close()
        client.close()
    finally:
        learn.gate.set()
        with inside(GW_NS):
            sp.stop()


def test_fail_open_is_refused_loudly_on_a_socket_not_bound_to_the_queue(path):
    from netfilterqueue import NetfilterQueue

    from control.dns.failopen import set_fail_open
    from control.errors import KernelError
    with inside(GW_NS):
        mine, other = NetfilterQueue(), NetfilterQueue()
        mine.bind(QUEUE, lambda pkt: pkt.accept())
        other.bind(QUEUE + 1, lambda pkt: pkt.accept())
    try:
        set_fail_open(mine.get_fd(), QUEUE)
        with pytest.raises(KernelError, match="refused fail-open"):
            set_fail_open(other.get_fd(), QUEUE)          # the kernel: only the bound socket may
    finally:
        mine.unbind()
        other.unbind()


def test_a_large_answer_over_tcp_teaches_before_its_last_segment_is_released(path):
    """A TCP answer of 200 A records (about 3.3 kB: three segments on the veths' 1500-byte
    MTU) teaches them all, with the segment that completes it: by the time the device has read
    the whole answer, it was learned."""
    import struct

    calls = []

    def learn(taught, asker):
        calls.append((list(taught), asker))
        return len(taught)

    sp = started(learn)
    listener = ns_socket(RES_NS, socket.SOCK_STREAM, timeout=5)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((RES, 53))
    listener.listen(1)

    def serve():
        conn, _ = listener.accept()
        with conn:
            n = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
            q = dns.message.from_wire(conn.recv(n, socket.MSG_WAITALL))
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text_list(q.question[0].name, 300, "IN", "A",
                                                     [f"10.99.{1 + i // 250}.{i % 250 + 1}" for i in range(200)]))
            wire = r.to_wire()
            conn.sendall(struct.pack("!H", len(wire)) + wire)
            conn.recv(1)                          # until the device closes

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        client = ns_socket(DEV_NS, socket.SOCK_STREAM, timeout=5)
        client.connect((RES, 53))
        query = dns.message.make_query("big.corp.example", "A").to_wire()
        client.sendall(struct.pack("!H", len(query)) + query)
        got = b""
        while len(got) < 2 or len(got) < 2 + struct.unpack_from("!H", got)[0]:
            more = client.recv(65536)
            assert more, "the resolver closed before its whole answer"
            got += more
        n, got = struct.unpack_from("!H", got)[0], got[2:]
        assert n > 3000 and len(got) == n
        assert len(calls) == 1, f"the answer taught {len(calls)} times before the device had it whole"
        taught, asker = calls[0]
        assert len(taught) == 200 and asker == DEV and all(name == "big.corp.example" for name, _, _ in taught)
        assert len(dns.message.from_wire(got).answer[0]) == 200
        client.close()
        server.join(5)
    finally:
        listener.close()
        with inside(GW_NS):
            sp.stop()


def test_a_chain_that_cannot_be_removed_is_logged_and_the_next_start_replaces_it(caplog):
    """Gateway stop cannot remove the chain (here: a rule of someone else's still jumps to it):
    an error says so, naming iptables' words; once it can be, the next start's install replaces
    the leftover whole (the old resolver's rules gone, one jump)."""
    import logging

    from control.dns import netfilter
    from control.errors import KernelError
    ns, chain = "zt-t-qc", netfilter.chain_name("zt0")
    mangle = lambda *a: subprocess.run(["nsenter", f"--net=/run/netns/{ns}", "iptables-legacy", "-w", "5", "-t",
                                        "mangle", *a], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    _ip("netns", "add", ns)
    try:
        with inside(ns):
            netfilter.install("zt0", (ipaddress.ip_address("10.99.0.9"),), QUEUE)
            assert mangle("-A", "OUTPUT", "-j", chain).returncode == 0
            with caplog.at_level(logging.ERROR, logger="ztgate.dns"):
                assert netfilter.remove("zt0")
            assert netfilter.present("zt0")
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and chain in errors[0] and "-X" in errors[0], errors
            with pytest.raises(KernelError, match=chain):
                netfilter.install("zt0", (ipaddress.ip_address(RES),), QUEUE)    # refused loudly, not doubled
            assert mangle("-D", "OUTPUT", "-j", chain).returncode == 0
            netfilter.install("zt0", (ipaddress.ip_address(RES),), QUEUE)
        rules = mangle("-S").stdout
        assert rules.count(f"-j {chain}") == 1 and "10.99.0.9" not in rules and rules.count(RES) == 4, rules
        caplog.clear()
        with inside(ns):
            assert netfilter.remove("zt0") and not netfilter.present("zt0")
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
