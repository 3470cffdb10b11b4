"""The DNS slow path's reading of questions and answers (control/dns), on crafted packets:
what each kind of answer teaches, and that hostile ones teach nothing and raise nothing."""
from __future__ import annotations

import ipaddress
import random
import struct

import dns.flags
import dns.message
import dns.rrset
from dns.rdtypes.IN.A import A
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from control.config import parse_config
from control.dns.messages import Question, Refused, read_answer, read_question, teachings
from control.dns.questions import Questions
from control.dns.settings import DnsConfig
from control.dns.slowpath import SlowPath
from control.errors import InputError

DEV, RES = "100.96.0.2", "10.20.0.53"


def query(name: str, qtype: str = "A", qid: int = 4242) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    q.id = qid
    return q


def answer(q: dns.message.Message, *records: tuple, flags: int = 0) -> dns.message.Message:
    r = dns.message.make_response(q)
    for name, ttl, rtype, value in records:
        r.answer.append(dns.rrset.from_text(name, ttl, "IN", rtype, value))
    r.flags |= flags
    return r


def rr(name: str, ttl: int, rtype: str, value: str) -> tuple:
    return (name, ttl, rtype, value)


def learned_from(q, r):
    question, msg = read_answer(r.to_wire())
    assert question == read_question(q.to_wire())
    return sorted((t.name, str(t.address), t.ttl) for t in teachings(question, msg))


def test_a_and_aaaa():
    q = query("App.Corp.Example.")
    assert learned_from(q, answer(q, rr("app.corp.example.", 30, "A", "10.20.0.10"))) == [
        ("app.corp.example", "10.20.0.10", 30)]
    q6 = query("app.corp.example", "AAAA")
    assert learned_from(q6, answer(q6, rr("app.corp.example.", 30, "AAAA", "fd20::10"))) == [
        ("app.corp.example", "fd20::10", 30)]


def test_cname_chain_teaches_every_name_of_it_and_nothing_off_it():
    q = query("git.corp.example")
    r = answer(q, rr("git.corp.example.", 300, "CNAME", "web.corp.example."),
               rr("web.corp.example.", 300, "CNAME", "lb.corp.example."),
               rr("lb.corp.example.", 20, "A", "10.20.0.10"),
               rr("evil.corp.example.", 20, "A", "10.20.0.11"))          # off the chain
    assert learned_from(q, r) == [("git.corp.example", "10.20.0.10", 20), ("lb.corp.example", "10.20.0.10", 20),
                                  ("web.corp.example", "10.20.0.10", 20)]


def test_cname_loop_and_overlong_chain_are_refused():
    q = query("a.corp.example")
    loop = answer(q, rr("a.corp.example.", 9, "CNAME", "b.corp.example."), rr("b.corp.example.", 9, "CNAME", "a.corp.example."))
    with pytest.raises(Refused, match="cname-loop"):
        learned_from(q, loop)
    chain = [rr(f"n{i}.corp.example." if i else "a.corp.example.", 9, "CNAME", f"n{i + 1}.corp.example.")
             for i in range(12)]
    with pytest.raises(Refused, match="cname-chain-too-long"):
        learned_from(q, answer(q, *chain, rr("n12.corp.example.", 9, "A", "10.20.0.10")))


def test_wildcard_answer_teaches_the_asked_name_never_the_star():
    q = query("x1.db.corp.example")
    assert learned_from(q, answer(q, rr("x1.db.corp.example.", 60, "A", "10.20.0.12"))) == [
        ("x1.db.corp.example", "10.20.0.12", 60)]
    with pytest.raises(Refused, match="bad-name"):
        read_question(query("*.db.corp.example").to_wire())


def test_wrong_type_class_truncated_and_errors_teach_nothing():
    q = query("app.corp.example")
    assert learned_from(q, answer(q, rr("app.corp.example.", 30, "AAAA", "fd20::10"))) == []   # asked A
    ch = query("app.corp.example")
    ch.question[0].rdclass = dns.rdataclass.CH
    with pytest.raises(Refused, match="wrong-class"):
        read_question(ch.to_wire())
    off_class = answer(q)
    hs = dns.rrset.RRset(dns.name.from_text("app.corp.example."), dns.rdataclass.HS, dns.rdatatype.A)
    hs.add(A(dns.rdataclass.HS, dns.rdatatype.A, "10.20.0.10"), 30)
    off_class.answer.append(hs)
    assert learned_from(q, off_class) == []
    with pytest.raises(Refused, match="truncated"):
        read_answer(answer(q, rr("app.corp.example.", 30, "A", "10.20.0.10"), flags=dns.flags.TC).to_wire())
    nx = answer(q)
    nx.set_rcode(dns.rcode.NXDOMAIN)
    with pytest.raises(Refused, match="error-rcode"):
        read_answer(nx.to_wire())
    with pytest.raises(Refused, match="not-an-answer"):
        read_answer(q.to_wire())


def test_hostile_wire_is_refused():
    good = answer(query("app.corp.example"), rr("app.corp.example.", 30, "A", "10.20.0.10")).to_wire()
    header = good[:12]
    loop = header[:4] + struct.pack("!HHHH", 1, 0, 0, 0) + b"\xc0\x0c" + b"\x00\x01\x00\x01"   # name points at itself
    huge = header[:4] + struct.pack("!HHHH", 1, 65535, 65535, 65535) + good[12:]
    for wire in (loop, huge, good + b"junk", good[:-3], b"", b"\x00" * 11):
        with pytest.raises(Refused, match="malformed"):
            read_answer(wire)
    rng = random.Random(16)
    for _ in range(3000):          # random bytes and bit flips: refused or read, never another exception
        wire = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            wire[rng.randrange(len(wire))] = rng.randrange(256)
        for w in (bytes(wire), rng.randbytes(rng.randint(0, 80))):
            try:
                question, msg = read_answer(w)
                teachings(question, msg)
            except Refused:
                pass


def test_questions_match_device_resolver_transport_id_and_name():
    table = Questions(limit=2, lifetime=10)
    q = Question(7, "app.corp.example", 1)
    key = Questions.key(DEV, 40000, RES, "udp", 7)
    table.asked(key, q, now=0)
    assert not table.answered(Questions.key(DEV, 40001, RES, "udp", 7), q, now=1)      # other port
    assert not table.answered(key, Question(7, "other.corp.example", 1), now=1)        # other name
    assert table.answered(key, q, now=1)
    assert not table.answered(key, q, now=1)                                           # answered once
    table.asked(key, q, now=0)
    assert not table.answered(key, q, now=11)                                          # too late
    for i in range(3):
        table.asked(Questions.key(DEV, i, RES, "udp", 7), q, now=20)
    assert len(table) == 2 and table.forgotten == 1


def packet(src, sport, dst, dport, payload: bytes, tcp: bool = False, seq: int = 0, flags: str = "PA") -> bytes:
    ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
    l4 = TCP(sport=sport, dport=dport, flags=flags, seq=seq) if tcp else UDP(sport=sport, dport=dport)
    return bytes(ip / l4 / payload)


class Recorder:
    """What the slow path hands the gateway to learn."""
    def __init__(self):
        self.got = []

    def __call__(self, taught, asker):
        self.got += [(name, str(address), ttl, asker) for name, address, ttl in taught]


def slowpath(**dns) -> tuple[SlowPath, Recorder]:
    rec = Recorder()
    cfg = DnsConfig(resolvers=(ipaddress.ip_address(RES),), **dns)
    return SlowPath(cfg, "zt0", rec, lambda addr: f"dev-{addr}"), rec


def test_an_answer_teaches_only_the_device_that_asked_with_the_ttl_clamped():
    sp, rec = slowpath(min_ttl=60, max_ttl=3600)
    q = query("app.corp.example")
    a = answer(q, rr("app.corp.example.", 5, "A", "10.20.0.10")).to_wire()
    assert sp.handle(packet(RES, 53, DEV, 40000, a)) == "refused:unasked"          # nobody asked yet
    assert sp.handle(packet(DEV, 40000, RES, 53, q.to_wire())) == "question"
    assert sp.handle(packet("10.20.0.99", 53, DEV, 40000, a)) == "other"            # not a resolver
    assert sp.handle(packet(RES, 53, "100.96.0.3", 40000, a)) == "refused:unasked"  # another device
    assert sp.handle(packet(RES, 53, DEV, 40000, a)) == "learned"
    assert rec.got == [("app.corp.example", "10.20.0.10", 60, f"dev-{DEV}")]
    assert sp.handle(packet(RES, 53, DEV, 40000, a)) == "refused:unasked"          # a replay
    assert sp.counters.queued == 4 and sp.counters.learned == 1 and sp.counters.refused["unasked"] == 3


def test_tcp_whole_messages_teach_and_split_ones_teach_when_completed():
    """Issue 16: a message split over segments teaches with the segment that completes it (here
    a retransmission of the whole, of which only the new bytes count); until then it is held."""
    sp, rec = slowpath()
    q = query("app.corp.example", qid=9)
    qw = q.to_wire()
    aw = answer(q, rr("app.corp.example.", 300, "A", "10.20.0.10")).to_wire()
    sp.handle(packet(DEV, 40000, RES, 53, b"", tcp=True, seq=(1 << 32) - 1, flags="S"))    # streams start at SYNs
    sp.handle(packet(RES, 53, DEV, 40000, b"", tcp=True, seq=(1 << 32) - 1, flags="SA"))
    sp.handle(packet(DEV, 40000, RES, 53, struct.pack("!H", len(qw)) + qw, tcp=True))
    framed = struct.pack("!H", len(aw)) + aw
    assert sp.handle(packet(RES, 53, DEV, 40000, framed[:10], tcp=True)) == "held"
    assert sp.handle(packet(RES, 53, DEV, 40000, framed, tcp=True)) == "learned"
    assert rec.got == [("app.corp.example", "10.20.0.10", 300, f"dev-{DEV}")]
    assert sp.handle(packet(RES, 53, DEV, 40000, b"", tcp=True)) == "no-message"


def test_garbage_packets_never_raise():
    sp, rec = slowpath()
    rng = random.Random(5)
    for _ in range(2000):
        body = rng.randbytes(rng.randint(0, 120))
        for raw in (packet(RES, 53, DEV, 40000, body), rng.randbytes(rng.randint(0, 80))):
            sp.handle(raw)
    assert rec.got == []


def test_dns_config():
    cfg = parse_config({"dns": {"resolvers": ["10.20.0.53", "fd20::53"], "min_ttl": 5}})
    assert [str(r) for r in cfg.dns.resolvers] == ["10.20.0.53", "fd20::53"] and cfg.dns.min_ttl == 5
    assert parse_config({}).dns == DnsConfig() and not DnsConfig().enabled
    for bad in ({"resolvers": "10.20.0.53"}, {"resolvers": ["nope"]}, {"resolvers": ["127.0.0.1"]},
                {"min_ttl": 100, "max_ttl": 10}, {"queue": -1}, {"bogus": 1}, {"queue_length": True}):
        with pytest.raises(InputError, match="dns"):
            parse_config({"dns": bad})


def test_a_learner_may_say_why_nothing_was_kept():
    """The gateway's learn raises Refused("unnamed") when no rule names the answer's names:
    counted as that, not as a bound or an error."""
    def unnamed(taught, asker):
        raise Refused("unnamed")
    sp = SlowPath(DnsConfig(resolvers=(ipaddress.ip_address(RES),)), "zt0", unnamed, str)
    q = query("app.corp.example")
    sp.handle(packet(DEV, 40000, RES, 53, q.to_wire()))
    assert sp.handle(packet(RES, 53, DEV, 40000, answer(q, rr("app.corp.example.", 5, "A", "10.20.0.10")).to_wire())) \
        == "refused:unnamed"
    assert sp.counters.refused == {"unnamed": 1} and sp.counters.learned == 0


def test_dns_limits_per_device():
    cfg = parse_config({"dns": {"resolvers": ["10.20.0.53"], "max_per_device": 10, "questions_per_device": 5}})
    assert (cfg.dns.max_per_device, cfg.dns.questions_per_device) == (10, 5)
    assert (DnsConfig().max_per_device, DnsConfig().questions_per_device) == (1024, 256)
    for bad in ({"max_per_device": 0}, {"questions_per_device": 20000}):
        with pytest.raises(InputError, match="dns"):
            parse_config({"dns": bad})


def test_one_device_asking_fast_leaves_the_others_questions_alone():
    """A device's questions beyond its share push out only its own oldest ones."""
    table = Questions(limit=16384, lifetime=10, per_device=256)
    q = Question(7, "app.corp.example", 1)
    others = [Questions.key(f"100.96.0.{i}", 40000, RES, "udp", 7) for i in range(3, 6)]
    for key in others:
        table.asked(key, q, now=0)
    for i in range(20000):          # ~1.7k/s for 10 s (the questions' lifetime): one device
        table.asked(Questions.key(DEV, 1024 + i % 60000, RES, "udp", i & 0xFFFF), q, now=i / 2000)
    assert len(table) == 256 + 3 and table.forgotten == 20000 - 256
    assert all(table.answered(key, q, now=9.9) for key in others)
    assert table.answered(Questions.key(DEV, 1024 + 19999, RES, "udp", 19999), q, now=9.9)
    assert not table.answered(Questions.key(DEV, 1024, RES, "udp", 0), q, now=9.9)


def test_an_answer_over_the_cap_teaches_up_to_it():
    """300 A records: the first 256 pairs teach, the other 44 are counted, not learned."""
    from control.dns.messages import MAX_TEACHINGS
    sp, rec = slowpath()
    q = query("big.corp.example")
    many = [rr("big.corp.example.", 300, "A", f"10.21.{i // 250}.{i % 250 + 1}") for i in range(300)]
    r = answer(q)
    r.answer.append(dns.rrset.from_text_list("big.corp.example.", 300, "IN", "A", [m[3] for m in many]))
    sp.handle(packet(DEV, 40000, RES, 53, q.to_wire()))
    assert sp.handle(packet(RES, 53, DEV, 40000, r.to_wire())) == "learned"
    assert len(rec.got) == MAX_TEACHINGS == 256 and sp.counters.pairs_over_cap == 44
    assert len({a for _, a, _, _ in rec.got}) == 256


def test_every_name_a_rule_may_hold_can_be_learned():
    """Validation and learning agree (spec/POLICY.md: labels of letters, digits and hyphens):
    a label with a hyphen first or last is a rule's name, so an answer for it teaches."""
    from control.dns.messages import name_text
    from control.learned import hostname_problem
    for name in ("a-.corp.example", "-a.corp.example", "x--y.corp.example"):
        assert hostname_problem(name) == "" and name_text(dns.name.from_text(name)) == name
        q = query(name)
        assert learned_from(q, answer(q, rr(name + ".", 30, "A", "10.20.0.10"))) == [(name, "10.20.0.10", 30)]
    for name in ("_ldap.corp.example", "a b.corp.example"):
        assert hostname_problem(name) and name_text(dns.name.from_text(name)) is None


def test_metrics_count_the_pairs_not_learned(tmp_path):
    from types import SimpleNamespace

    from control.config import Config
    from control.kernel import Kernel
    from control.learned import Learned
    from control.metrics import dns_metrics

    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    kernel.learned = Learned(max_per_device=1)
    kernel.learn([("a.b", "10.0.0.1", 60, "d"), ("a.b", "10.0.0.2", 60, "d")])
    sp, _ = slowpath()
    sp.counters.pairs_over_cap = 3
    gw = SimpleNamespace(slowpath=sp, kernel=kernel, config=SimpleNamespace(dns=sp.dns))
    pairs = next(m for m in dns_metrics(gw) if m.name == "ztgate_dns_pairs_refused")
    assert {s.labels["bound"]: s.value for s in pairs.samples} == {"per_device": 1, "per_answer": 3}
