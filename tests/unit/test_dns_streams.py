"""DNS over TCP across segments (control/dns/streams.py), and through the slow path: a message
split over segments teaches when the last one arrives, before it is released; retransmissions,
gaps, FIN/RST, bounds and expiry."""
from __future__ import annotations

import ipaddress
import struct

from control.dns.slowpath import SlowPath
from control.dns.settings import DnsConfig
from control.dns.streams import Streams
from control.dns.wire import read_segment
from tests.unit.test_dns_slowpath import DEV, RES, Recorder, answer, packet, query, rr

ISN = 0xFFFFFF00              # sequence numbers wrap inside the answer


def framed(wire: bytes) -> bytes:
    return struct.pack("!H", len(wire)) + wire


def seg(data: bytes, seq: int, flags: str = "PA", src=RES, sport=53, dst=DEV, dport=40000):
    return read_segment(packet(src, sport, dst, dport, data, tcp=True, seq=seq % (1 << 32), flags=flags))


def big_answer(q, n: int = 200) -> bytes:
    r = answer(q)
    import dns.rrset
    r.answer.append(dns.rrset.from_text_list(q.question[0].name, 300, "IN", "A",
                                             [f"10.22.{i // 250}.{i % 250 + 1}" for i in range(n)]))
    return r.to_wire()


def test_a_message_in_pieces_comes_out_whole_with_its_last_piece():
    s, wire = Streams(), framed(b"x" * 3000)
    s.feed(seg(b"", ISN - 1, "S"), DEV, 0)
    assert s.feed(seg(wire[:1], ISN), DEV, 0) == []                     # half the length prefix
    assert s.feed(seg(wire[1:1400], ISN + 1), DEV, 0) == []
    assert s.feed(seg(wire[1:1400], ISN + 1), DEV, 0) == []              # a retransmission: nothing new
    assert s.held == 1400
    assert s.feed(seg(wire[1000:], ISN + 1000), DEV, 0) == [b"x" * 3000]   # overlaps; completes it
    assert s.held == 0
    two = framed(b"a" * 5) + framed(b"b" * 7)
    assert s.feed(seg(two + framed(b"c" * 9)[:4], ISN + len(wire)), DEV, 0) == [b"a" * 5, b"b" * 7]
    assert s.held == 4


def test_a_gap_fin_rst_bounds_and_idleness_end_an_unfinished_message():
    s = Streams(max_streams=2, max_bytes=100, lifetime=10)
    s.feed(seg(b"", 999, "S"), DEV, 0)                                  # (streams start at their SYN)
    s.feed(seg(framed(b"y" * 50)[:20], 1000), DEV, 0)
    assert s.feed(seg(framed(b"y" * 50)[30:], 1030), DEV, 0) == [] and s.dropped == {"gap": 1}   # 10 bytes missing
    s.feed(seg(b"", 4999, "S", sport=54), DEV, 0)
    s.feed(seg(framed(b"z" * 50)[:20], 5000, "FPA", sport=54), DEV, 0)
    s.feed(seg(b"", 5999, "S", sport=55), DEV, 0)
    s.feed(seg(framed(b"z" * 50)[:20], 6000, sport=55), DEV, 0)
    s.feed(seg(b"", 0, "R", sport=55), DEV, 0)
    assert s.dropped == {"gap": 1, "closed": 2}
    for port in range(100, 103):                                   # a third flow pushes out the oldest
        s.feed(seg(b"", -1, "S", sport=port), DEV, 1)
        s.feed(seg(b"\x00\x50" + b"q" * 10, 0, sport=port), DEV, 1)
    assert len(s) == 2 and s.dropped["evicted"] >= 1
    s.feed(seg(b"", -1, "S", sport=200), DEV, 2)
    s.feed(seg(b"\x00\x50" + b"q" * 90, 0, sport=200), DEV, 2)          # over max_bytes with the others
    assert s.held <= 100
    s.feed(seg(b"", -1, "S", sport=300), DEV, 20)
    s.feed(seg(b"\x00\x50", 0, sport=300), DEV, 20)                     # the rest idled out
    assert s.dropped["expired"] >= 1 and len(s) == 1


def test_a_device_with_many_connections_pushes_out_only_its_own():
    s = Streams(per_device=4)
    s.feed(seg(b"", -1, "SA", dst="100.96.0.9"), "100.96.0.9", 0)
    s.feed(seg(b"\x00\x50" + b"o" * 10, 0, dst="100.96.0.9"), "100.96.0.9", 0)     # another device's unfinished answer
    for port in range(1000, 1100):
        s.feed(seg(b"", -1, "SA", dport=port), DEV, 1)
        s.feed(seg(b"\x00\x50" + b"q" * 10, 0, dport=port), DEV, 1)
    assert len(s) == 5 and s.dropped == {"evicted": 96}
    rest = b"o" * 70
    assert s.feed(seg(rest, 12, dst="100.96.0.9"), "100.96.0.9", 2) == [b"o" * 80]


def slowpath():
    rec = Recorder()
    return SlowPath(DnsConfig(resolvers=(ipaddress.ip_address(RES),)), "zt0", rec, lambda a: f"dev-{a}"), rec


def test_a_large_tcp_answer_in_segments_teaches_with_its_last_segment():
    sp, rec = slowpath()
    q = query("big.corp.example", qid=11)
    sp.handle(packet(DEV, 40000, RES, 53, b"", tcp=True, seq=7, flags="S"))
    sp.handle(packet(DEV, 40000, RES, 53, framed(q.to_wire()), tcp=True, seq=8))
    wire = framed(big_answer(q))
    assert len(wire) > 3000
    sp.handle(packet(RES, 53, DEV, 40000, b"", tcp=True, seq=ISN - 1, flags="SA"))
    said = [sp.handle(packet(RES, 53, DEV, 40000, wire[at:at + 1400], tcp=True, seq=(ISN + at) % (1 << 32)))
            for at in range(0, len(wire), 1400)]
    assert said[:-1] == ["held"] * (len(said) - 1) and said[-1] == "learned"
    assert len(rec.got) == 200 and sp.counters.queued == 1 and sp.counters.learned == 1


def test_a_question_in_pieces_is_remembered():
    sp, rec = slowpath()
    q = query("app.corp.example", qid=12)
    qw = framed(q.to_wire())
    sp.handle(packet(DEV, 40001, RES, 53, b"", tcp=True, seq=99, flags="S"))
    sp.handle(packet(RES, 53, DEV, 40001, b"", tcp=True, seq=0, flags="SA"))
    assert sp.handle(packet(DEV, 40001, RES, 53, qw[:1], tcp=True, seq=100)) == "no-message"
    assert sp.handle(packet(DEV, 40001, RES, 53, qw[1:], tcp=True, seq=101)) == "question"
    a = framed(answer(q, rr("app.corp.example.", 300, "A", "10.20.0.10")).to_wire())
    assert sp.handle(packet(RES, 53, DEV, 40001, a, tcp=True, seq=1)) == "learned"


def test_one_connection_a_device():
    s = Streams(per_device=1)
    for port in (1000, 1001, 1002):
        s.feed(seg(b"", -1, "SA", dport=port), DEV, 0)
        s.feed(seg(b"\x00\x50" + b"q" * 10, 0, dport=port), DEV, 0)
    assert len(s) == 1 and s.by_device[DEV] and s.dropped == {"evicted": 2}
    s.feed(seg(b"", 0, "R", dport=1002), DEV, 0)
    assert len(s) == 0 and s.by_device == {} and s.held == 0
