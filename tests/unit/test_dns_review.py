"""The review of the DNS slow path (issue 16): each finding's proof of concept, as a test.

A device may not make the gateway learn an address the resolver did not give over DNS/TCP by
desynchronising the gateway's reading of the stream (an idle or pushed-out stream, a gap, a
length of 0, data with no SYN); NODATA answers, questions_per_device 1, per-device shares
(by device, not address), the per-answer cap, the counters' lock, iptables' answers, and the
fail-open request leaving the queue's socket as it was."""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
import threading
import tracemalloc

import dns.message
import dns.name
import dns.rrset
import pytest

from control.dns.failopen import set_fail_open
from control.dns.messages import MAX_TEACHINGS, read_answer, teachings
from control.dns.netfilter import chain_state
from control.dns.slowpath import SlowPath
from control.dns.settings import DnsConfig
from control.dns.streams import Streams
from control.dns.wire import SYN, Segment
from control.errors import KernelError
from tests.unit.test_dns_slowpath import DEV, RES, Recorder, answer, packet, query, rr, slowpath

FORGED = ("wiki.lab.example", "10.99.99.99", 86400, f"dev-{DEV}")
P, ISN_D, ISN_R = 40000, 1000, 50000


def framed(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def echo_bait():
    """A question whose first label is a whole framed forged answer (wiki.lab.example A
    10.99.99.99, id 777), the resolver's NXDOMAIN echoing it, and where the forged bytes start
    in that answer's stream (review: poc_desync.py)."""
    forged_q = query("wiki.lab.example", qid=777)
    forged = framed(answer(forged_q, rr("wiki.lab.example.", 86400, "A", "10.99.99.99")).to_wire())
    bait = dns.message.make_query(dns.name.Name([forged + b"\xff" * (63 - len(forged)), b"x", b""]), "A")
    bait.id = 1
    reply = dns.message.make_response(bait)
    reply.set_rcode(3)
    reply_wire = framed(reply.to_wire())
    return forged_q, framed(bait.to_wire()), reply_wire, reply_wire.index(forged)


def opened(sp, port=P):
    dev = lambda data, seq, flags="PA", now=0.0: sp.handle(
        packet(DEV, port, RES, 53, data, tcp=True, seq=seq, flags=flags), now=now)
    res = lambda data, seq, flags="PA", now=0.0: sp.handle(
        packet(RES, 53, DEV, port, data, tcp=True, seq=seq, flags=flags), now=now)
    dev(b"", ISN_D, "S")
    res(b"", ISN_R, "SA")
    return dev, res


def test_an_idle_stream_does_not_resume_mid_answer():
    """The device holds a zero window past the stream's lifetime, then lets the resolver send
    the rest of its answer starting at the forged bytes: the flow is no longer followed."""
    sp, rec = slowpath()
    forged_q, bait, reply, off = echo_bait()
    dev, res = opened(sp)
    dev(bait, ISN_D + 1)                                   # (its name is no rule's: not remembered)
    assert res(reply[:off], ISN_R + 1, now=1.0) == "held"
    assert dev(framed(forged_q.to_wire()), ISN_D + 1 + len(bait), now=6.0) == "question"   # outstanding till 16
    assert res(reply[off:], ISN_R + 1 + off, now=12.0) == "unfollowed"
    assert FORGED not in rec.got and rec.got == []
    assert sp.counters.refused["tcp-expired"] == 1 and sp.counters.refused["tcp-unfollowed"] == 1


def test_a_pushed_out_stream_stays_silent():
    """The device pushes its own answer stream out with 16 SYNs (review: poc_evict.py)."""
    sp, rec = slowpath()
    forged_q, bait, reply, off = echo_bait()
    dev, res = opened(sp)
    dev(bait, ISN_D + 1)
    dev(framed(forged_q.to_wire()), ISN_D + 1 + len(bait))
    res(reply[:off], ISN_R + 1)
    for port in range(50000, 50016):
        sp.handle(packet(DEV, port, RES, 53, b"", tcp=True, seq=1, flags="S"), now=0)
    assert res(reply[off:], ISN_R + 1 + off) == "unfollowed" and rec.got == []


@pytest.mark.parametrize("breaker", ["gap", "zero-length"])
def test_a_gap_or_a_zero_length_silences_the_flow_until_its_next_syn(breaker):
    sp, rec = slowpath()
    q = query("wiki.lab.example", qid=9)
    good = framed(answer(q, rr("wiki.lab.example.", 300, "A", "10.20.0.12")).to_wire())
    dev, res = opened(sp)
    dev(framed(q.to_wire()), ISN_D + 1)
    if breaker == "gap":
        res(good[:5], ISN_R + 1)
        assert res(good[10:], ISN_R + 11) == "held"            # 5 bytes missing: the stream ends
        after = ISN_R + 1 + len(good)
    else:
        res(b"\x00\x00", ISN_R + 1)
        after = ISN_R + 3
    assert sp.counters.refused[f"tcp-{breaker}"] == 1
    assert res(good, after) == "unfollowed" and rec.got == []  # whole and in order: still nothing
    res(b"", ISN_R + 7000, "SA")                                # a new connection is followed again
    dev(b"", ISN_D + 7000, "S")
    dev(framed(q.to_wire()), ISN_D + 7001)
    assert res(good, ISN_R + 7001) == "learned"


def test_data_of_a_connection_whose_syn_was_not_seen_teaches_nothing():
    """Connections open when the gateway started teach nothing (fail closed)."""
    sp, rec = slowpath()
    q = query("wiki.lab.example", qid=5)
    sp.handle(packet(DEV, P, RES, 53, framed(q.to_wire()), tcp=True, seq=1))
    a = framed(answer(q, rr("wiki.lab.example.", 300, "A", "10.20.0.12")).to_wire())
    assert sp.handle(packet(RES, 53, DEV, P, a, tcp=True, seq=1)) == "unfollowed"
    assert rec.got == [] and sp.counters.refused["tcp-unfollowed"] == 2 and sp.counters.questions == 0


def test_a_nodata_answer_is_refused_as_no_address():
    sp, rec = slowpath()
    q = query("app.corp.example", "AAAA")
    sp.handle(packet(DEV, P, RES, 53, q.to_wire()))
    assert sp.handle(packet(RES, 53, DEV, P, answer(q).to_wire())) == "refused:no-address"
    assert sp.counters.refused == {"no-address": 1}


def test_one_question_a_device():
    """questions_per_device 1 (review: poc_questions.py): the second question pushes out the
    first and stays attached to its device; another device's answer then teaches."""
    sp, rec = slowpath(questions_per_device=1)
    a, b = "100.96.0.2", "100.96.0.3"
    sp.handle(packet(a, 40000, RES, 53, query("x.corp.example", qid=1).to_wire()), now=0)
    sp.handle(packet(a, 40001, RES, 53, query("y.corp.example", qid=2).to_wire()), now=0)
    assert len(sp.questions) == 1 and sp.questions.forgotten == 1
    assert list(sp.questions.by_device) == [f"dev-{a}"] and len(sp.questions.by_device[f"dev-{a}"]) == 1
    qb = query("app.corp.example", qid=3)
    sp.handle(packet(b, 40000, RES, 53, qb.to_wire()), now=5)
    ab = answer(qb, rr("app.corp.example.", 300, "A", "10.20.0.10")).to_wire()
    assert sp.handle(packet(RES, 53, b, 40000, ab), now=10.5) == "learned"     # a's question expires here
    assert sp.questions.by_device == {}


def test_unfinished_messages_are_bounded_per_device_and_retransmissions_do_not_keep_them():
    """Review: poc_bytes.py. Four devices fill 16 streams each with never-finished messages and
    retransmit to stay recent; another device's two-segment answer still completes."""
    r = ipaddress.ip_address(RES)

    def q(dev, port, data, seq, flags=0x18):
        return Segment(ipaddress.ip_address(dev), port, r, 53, "tcp", data, seq, flags)
    s = Streams()
    attackers = [f"100.96.1.{i}" for i in range(4)]
    for d in attackers:
        for port in range(16):
            s.feed(q(d, port, b"", 0, SYN), d, 0)
            s.feed(q(d, port, b"\xff\xff" + b"A" * 65534, 1), d, 0)
    assert all(s.held_by[d] <= s.per_device_bytes for d in attackers)
    victim = "100.96.0.9"
    ans = lambda data, seq, flags=0x18: Segment(r, 53, ipaddress.ip_address(victim), 40000, "tcp", data, seq, flags)
    s.feed(ans(b"", 999, SYN | 0x10), victim, 1)
    assert s.feed(ans(b"\x02\x00" + b"v" * 300, 1000), victim, 1) == []
    for d in attackers:
        for port in range(16):
            s.feed(q(d, port, b"A", 100), d, 1.001)               # already seen: refreshes nothing
    s.feed(q(attackers[0], 99, b"", 0, SYN), attackers[0], 1.002)
    s.feed(q(attackers[0], 99, b"\xff\xff" + b"A" * 65534, 1), attackers[0], 1.002)
    assert s.feed(ans(b"v" * 214, 1302), victim, 1.003) == [b"v" * 512]
    # a retransmission adding nothing does not keep a stream from idling out
    s = Streams(lifetime=10)
    s.feed(q(victim, 1, b"", 0, SYN), victim, 0)
    s.feed(q(victim, 1, b"\x00\x10abc", 1), victim, 0)
    s.feed(q(victim, 1, b"\x00\x10abc", 1), victim, 9)
    s.feed(q(victim, 2, b"", 0, SYN), victim, 11)
    assert s.dropped == {"expired": 1}


def test_limits_count_a_device_not_an_address():
    """A dual-stack device's addresses share its question share; a device asking from port 53
    is still the device (not the resolver) of its TCP flows."""
    v6 = "fd00::2"
    sp = SlowPath(DnsConfig(resolvers=(ipaddress.ip_address(RES), ipaddress.ip_address("fd20::53")),
                            questions_per_device=1), "zt0", Recorder(), lambda a: "laptop")
    sp.handle(packet(DEV, 40000, RES, 53, query("x.corp.example", qid=1).to_wire()), now=0)
    sp.handle(packet(v6, 40000, "fd20::53", 53, query("y.corp.example", qid=2).to_wire()), now=0)
    assert len(sp.questions) == 1 and sp.questions.forgotten == 1
    sp, rec = slowpath()
    q = query("app.corp.example", qid=4)
    sp.handle(packet(DEV, 53, RES, 53, b"", tcp=True, seq=0, flags="S"), now=0)
    sp.handle(packet(RES, 53, DEV, 53, b"", tcp=True, seq=0, flags="SA"), now=0)
    assert set(sp.streams.by_device) == {f"dev-{DEV}"}
    sp.handle(packet(DEV, 53, RES, 53, framed(q.to_wire()), tcp=True, seq=1), now=0)
    a = framed(answer(q, rr("app.corp.example.", 300, "A", "10.20.0.10")).to_wire())
    assert sp.handle(packet(RES, 53, DEV, 53, a, tcp=True, seq=1), now=0) == "learned"


def test_an_answer_over_the_cap_builds_only_what_it_teaches():
    """Review: cost_teach.py: 4000 records at the end of an 8-CNAME chain (36000 pairs)."""
    q = dns.message.make_query("n0.corp.example", "A")
    r = dns.message.make_response(q)
    for i in range(8):
        r.answer.append(dns.rrset.from_text(f"n{i}.corp.example.", 300, "IN", "CNAME", f"n{i + 1}.corp.example."))
    r.answer.append(dns.rrset.from_text_list("n8.corp.example.", 300, "IN", "A",
                                             [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(4000)]))
    question, msg = read_answer(r.to_wire())
    tracemalloc.start()
    out = teachings(question, msg)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(out) == MAX_TEACHINGS and out.over == 4000 * 9 - MAX_TEACHINGS
    assert peak < 1 << 20, peak               # 36000 pairs built would take several MB


def test_counters_change_and_are_read_under_one_lock():
    sp, _ = slowpath()
    q = query("app.corp.example")
    sp.counters.lock.acquire()
    done = threading.Event()
    t = threading.Thread(target=lambda: (sp.handle(packet(RES, 53, DEV, P, answer(q).to_wire())), done.set()))
    t.start()
    assert not done.wait(0.2)                 # the refusal waits for the lock
    sp.counters.lock.release()
    t.join(5)
    assert sp.snapshot()["refused"] == {"unasked": 1} and "holds" in sp.counters.copy()


def test_iptables_answers_are_told_apart():
    assert chain_state(0, "") == "there"
    assert chain_state(1, "iptables: No chain/target/match by that name.\n") == "gone"
    assert chain_state(3, "ip6tables v1.8.9 (legacy): can't initialize ip6tables table `mangle': Table does not "
                          "exist (do you need to insmod?)\nPerhaps ip6tables or your kernel needs to be upgraded.\n") \
        == "gone"
    assert chain_state(4, "Another app is currently holding the xtables lock. Stopped waiting after 5s.\n") == "unknown"


def test_the_fail_open_request_leaves_the_shared_socket_blocking():
    """The request goes on a duplicate of the queue's socket: same open file, same flags."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)      # NETLINK_NETFILTER, no queue bound
    try:
        before = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
        with pytest.raises(KernelError):
            set_fail_open(sock.fileno(), 65000, timeout=1.0)
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) == before and not before & os.O_NONBLOCK
    finally:
        sock.close()


def test_stream_bounds_hold_under_random_segments():
    """Review: fuzz_streams2.py, shortened: the tables stay consistent and bounded."""
    import random
    from control.dns.wire import FIN, RST
    for seed in range(200):
        rng = random.Random(seed)
        s = Streams(max_streams=rng.randrange(1, 8), max_bytes=rng.randrange(50, 400), lifetime=5,
                    per_device=rng.randrange(1, 4), per_device_bytes=rng.randrange(100, 300))
        now, seqs = 0.0, {}
        for _ in range(100):
            dev, port = f"100.96.0.{rng.randrange(4)}", rng.randrange(5)
            flags = rng.choice([0x18] * 6 + [SYN, FIN | 0x10, RST])
            seq = seqs.get((dev, port), rng.randrange(1 << 32)) if rng.random() > 0.1 else rng.randrange(1 << 32)
            data = rng.randbytes(rng.randrange(0, 60)) if not flags & (SYN | RST) else b""
            if rng.random() < 0.3 and data:
                data = bytes([0, rng.randrange(0, 80)]) + data
            now += rng.random()
            s.feed(Segment(ipaddress.ip_address(dev), port, ipaddress.ip_address(RES), 53, "tcp", data, seq, flags),
                   dev, now)
            seqs[(dev, port)] = (seq + len(data) + (1 if flags & SYN else 0)) % (1 << 32)
            held = {}
            for k, st in s.table.items():
                held[k[-1]] = held.get(k[-1], 0) + len(st.data)
            assert s.held == sum(held.values()) and {d: n for d, n in held.items() if n} == dict(s.held_by), seed
            assert sorted(s.table) == sorted(k for v in s.by_device.values() for k in v), seed
            assert len(s.table) <= s.max_streams and s.held <= s.max_bytes, seed
            assert all(len(v) <= s.per_device for v in s.by_device.values()), seed
