"""The learned-names table and hostname patterns (control/learned.py)."""
import ipaddress

import pytest

from control.learned import Learned, Patterns, hostname_problem, matches, normalize

A, B, C = (ipaddress.ip_address(x) for x in ("10.20.0.10", "10.20.0.11", "fd20::5"))


@pytest.mark.parametrize("text", ["git.corp.example", "*.db.corp.example", "a", "x-1.y", "A.B", "a" * 63 + ".b",
                                  "git.corp.example.", "*.db.corp.example.", "a-.corp.example", "-a.b"])
def test_valid_hostnames(text):
    assert hostname_problem(text) == ""


@pytest.mark.parametrize("text, says", [
    ("git.corp.example..", "empty label"), (".", "empty label"), ("*", "every name"), ("a.*.b", "leftmost label"), ("*x.b", "leftmost label"),
    ("a..b", "empty label"), ("a_b.c", "letters, digits and hyphens"), ("a" * 64 + ".b", "1-63"),
    (".".join(["a" * 63] * 4) + ".bc", "at most 253"), ("*.*.b", "leftmost label"),
])
def test_refused_hostnames(text, says):
    assert says in hostname_problem(text)


def test_matching():
    assert matches("git.corp.example", "git.corp.example")
    assert matches("*.db.corp.example", "a.db.corp.example")
    assert matches("*.db.corp.example", "x.y.db.corp.example")
    assert not matches("*.db.corp.example", "db.corp.example")
    assert not matches("*.db.corp.example", "adb.corp.example")
    assert normalize("GIT.Corp.Example.") == "git.corp.example"
    p = Patterns([("git.corp.example",), ("*.db.corp.example", "git.corp.example"), ("*.example",)])
    assert p.tokens("git.corp.example") == 0b1110
    assert p.tokens("a.db.corp.example") == 0b1100
    assert p.tokens("db.corp.example") == 0b1000
    assert p.tokens("example") == 0
    assert p.bits(["git.corp.example", "nothing"]) == 0b1110


def test_learn_clamps_and_expires():
    t = Learned(min_ttl=60, max_ttl=3600, clock=lambda: 1000.0)
    assert t.learn("Git.Corp.Example.", A, 5, asker="alice-laptop")
    assert t.learn("git.corp.example", B, 10 ** 9)
    assert [(e.name, e.address, e.expires, e.asker) for e in t.entries()] == [
        ("git.corp.example", A, 1060.0, "alice-laptop"), ("git.corp.example", B, 4600.0, None)]
    assert t.next_expiry() == 1060.0
    assert t.expire(1059.9) == []
    assert [e.address for e in t.expire(1060.0)] == [A]
    assert t.names_of(A) == frozenset() and t.names_of(B) == {"git.corp.example"}
    assert t.next_expiry() == 4600.0 and len(t) == 1


def test_learning_again_keeps_the_later_expiry():
    t = Learned(min_ttl=0, clock=lambda: 0.0)
    t.learn("a.b", A, 100)
    t.learn("a.b", A, 10)
    assert t.entries()[0].expires == 100
    t.learn("a.b", A, 200, now=50)
    assert t.expire(150) == [] and t.next_expiry() == 250


def test_bounds_refuse_and_count():
    t = Learned(max_per_name=2, max_total=3, clock=lambda: 0.0)
    assert t.learn("a.b", A, 60) and t.learn("a.b", B, 60)
    assert not t.learn("a.b", C, 60)
    assert t.learn("a.b", A, 90)                     # one already held: renewed, not refused
    assert t.learn("c.d", C, 60)
    assert not t.learn("e.f", A, 60)
    assert t.refused == {"per_name": 1, "total": 1}
    assert t.by_address() == {A: {"a.b"}, B: {"a.b"}, C: {"c.d"}}


def test_forget():
    t = Learned(clock=lambda: 0.0)
    t.learn("a.b", A, 60)
    t.learn("c.d", A, 60)
    assert [e.name for e in t.forget("a.b")] == ["a.b"]
    assert t.names_of(A) == {"c.d"} and t.next_expiry() == 60
    t.forget()
    assert len(t) == 0 and t.next_expiry() is None


def test_the_gateway_expires_on_its_own_timer(tmp_path):
    """Gateway.dns_learned schedules the table's next expiry; the timer takes the entry out
    (through a real Kernel with no build attached: only the table changes)."""
    import time
    from types import SimpleNamespace

    from control.config import Config
    from control.gateway.hostnames import HostnameOps
    from control.kernel import Kernel

    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    kernel.learned = Learned(min_ttl=0)
    gateway = SimpleNamespace(kernel=kernel, _expiry_timer=None, _expiry_at=None,
                              _expiry_lock=HostnameOps._expiry_lock)
    for name in ("dns_expire", "_schedule_expiry"):
        setattr(gateway, name, getattr(HostnameOps, name).__get__(gateway))
    assert HostnameOps.dns_learned(gateway, [("a.b", A, 0.3, "d"), ("c.d", B, 5, "d")]) == 2
    assert [e["name"] for e in HostnameOps.dns_entries(gateway)] == ["a.b", "c.d"]
    deadline = time.monotonic() + 5
    while len(kernel.learned) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e.name for e in kernel.learned_entries()] == ["c.d"]
    assert gateway._expiry_at == kernel.next_expiry()        # the next one is scheduled
    gateway._expiry_timer.cancel()


def test_repeated_renewals_keep_the_expiry_heap_bounded():
    """Each renewal that moves an expiry later pushes a heap item; the stale ones must not pile
    up (200k items for 2 names was seen before the heap was rebuilt)."""
    t = Learned(min_ttl=60, clock=lambda: 0.0)
    for i in range(20000):
        t.learn("a.b", A, 60, now=float(i))
        t.learn("c.d", B, 60, now=float(i))
        assert len(t._heap) <= 2 * len(t) + 64
    assert t.next_expiry() == 19999 + 60
    assert t.expire(19999 + 59.9) == [] and len(t) == 2
    assert {e.name for e in t.expire(19999 + 60)} == {"a.b", "c.d"} and t.next_expiry() is None


def test_one_device_cannot_fill_the_table():
    """max_per_device bounds the pairs one asker brought in (still learned); others still learn,
    renewals are not new pairs, and an expired pair gives its room back."""
    t = Learned(max_per_device=2, max_total=100, clock=lambda: 0.0)
    assert t.learn("a.b", A, 60, asker="greedy") and t.learn("c.d", A, 60, asker="greedy")
    assert not t.learn("e.f", A, 60, asker="greedy")
    assert t.learn("a.b", A, 120, asker="greedy")            # a renewal: no new pair
    assert t.learn("e.f", A, 60, asker="other") and t.learn("a.b", B, 90, asker="other")
    assert t.learn("g.h", C, 60)                              # no asker: the other bounds only
    assert t.refused == {"per_device": 1} and t.per_device == {"greedy": 2, "other": 2}
    assert {e.name for e in t.expire(60)} == {"c.d", "e.f", "g.h"}
    assert t.per_device == {"greedy": 1, "other": 1}
    assert t.learn("e.f", A, 60, asker="greedy", now=60)
    t.forget()
    assert t.per_device == {} and len(t) == 0
