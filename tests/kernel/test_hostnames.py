"""Hostnames in the kernel (spec/POLICY.md, Hostnames): with learned names, the kernel's verdict,
rule, reason and the name that decided equal the reference's; learning writes the build in
force in place and changes only the learned name's verdicts; expiry takes them away and moves
the epoch."""
import ipaddress
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import compile_policy
from control.config import Config
from control.kernel import Build, Kernel
from control.packets import build_raw
from control.model import TCP, Device, Identities, Packet, Policy, Rule, User
from control.probe import kernel_verdicts, reference_verdicts

from tests.kernel.test_differential import identities, policies, probes
from tests.programs import TEST_LAYOUT

NAMES = ["git.corp.example", "a.db.corp.example", "b.a.db.corp.example", "db.corp.example", "wiki.corp.example",
         "other.example"]
PATTERNS = ["git.corp.example", "*.db.corp.example", "db.corp.example", "*.corp.example", "wiki.corp.example",
            "nothing.example", "*.example"]


@pytest.fixture(scope="module")
def program():
    """A build with the name lookup compiled in (a policy without hostnames has none)."""
    from dataplane.program import Program

    with Program(replace(TEST_LAYOUT, name_words=1).with_headroom()) as prog:
        yield prog


@st.composite
def with_hostnames(draw, policy: Policy) -> Policy:
    """Some rules name destinations by hostname too (some only by hostname)."""
    rules = []
    for r in policy.rules:
        if draw(st.booleans()):
            names = tuple(draw(st.lists(st.sampled_from(PATTERNS), min_size=draw(st.sampled_from([0, 1, 1, 1])),
                                        max_size=3)))
            r = replace(r, dst_hostnames=names, dst_cidrs=r.dst_cidrs if draw(st.booleans()) else None)
        rules.append(r)
    return replace(policy, rules=tuple(rules))


@st.composite
def cases(draw):
    ids = draw(identities())
    policy = draw(with_hostnames(draw(policies(ids))))
    pkts = draw(st.lists(probes(ids, policy), min_size=20, max_size=40))
    dsts = sorted({p.dst for p in pkts if isinstance(p, Packet)}, key=lambda a: (a.version, a))
    learned_at = [a for a in dsts if draw(st.integers(0, 3))]
    learned = {a: frozenset(draw(st.sets(st.sampled_from(NAMES), min_size=1, max_size=3))) for a in learned_at}
    return policy, ids, pkts, learned


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_kernel_equals_reference_with_learned_names(program, case):
    policy, ids, pkts, learned = case
    tables = compile_policy(policy, ids, program.layout, learned)
    program.load(tables)
    got = kernel_verdicts(program, tables, pkts, learned=learned)
    want = reference_verdicts(policy, ids, pkts, learned)
    for pkt, g, w in zip(pkts, got, want):
        assert g == w, f"packet {pkt}, learned {learned.get(getattr(pkt, 'dst', None))}: kernel {g}, reference {w}"


SRC = ipaddress.ip_address("100.96.0.2")
IDS = Identities((User("a@example.com", ()),), (Device("a", "a@example.com", SRC),))
GIT, DB, OTHER = (ipaddress.ip_address(a) for a in ("10.30.0.1", "10.30.0.2", "10.30.0.3"))
POLICY = Policy("block", (
    Rule("no-db", 10, "block", dst_hostnames=("*.db.corp.example",)),
    Rule("git", 20, "allow", dst_hostnames=("git.corp.example",), dst_ports=((22, 22),)),
    Rule("lan", 30, "allow", dst_cidrs=(ipaddress.ip_network("10.30.0.0/16"),)),
))
PKTS = [Packet(SRC, dst, TCP, 40000, port) for dst in (GIT, DB, OTHER) for port in (22, 80)]


def test_learning_in_place_changes_only_that_name(program, tmp_path):
    """Through Kernel.learn / expire on a loaded build (attached to nothing): no compile, the
    same tables; only packets to the learned address change verdict, as the reference says;
    expiry restores them and moves the epoch, as does learning a name of a block rule."""
    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    kernel.build = Build(1, program, tables, 0.0, 0.0)
    before = kernel_verdicts(program, tables, PKTS)
    assert before == reference_verdicts(POLICY, IDS, PKTS)

    epoch = program.epoch
    assert kernel.learn([("Git.Corp.Example.", GIT, 300, "a")], now=1000.0) == 1
    assert program.epoch == epoch                      # an allow rule's name: nothing to revoke
    learned = {GIT: frozenset({"git.corp.example"})}
    after = kernel_verdicts(program, tables, PKTS, learned=learned)
    assert after == reference_verdicts(POLICY, IDS, PKTS, learned)
    assert after[0] == {"verdict": "allow", "rule": "git", "reason": "rule", "hostname": "git.corp.example"}
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [0]    # only GIT:22
    assert kernel.build.tables is tables
    r, rule = kernel.trace(bytes(build_raw(PKTS[0])))            # what `ztgate trace` shows
    assert (rule, kernel.hostname(r.name, GIT)) == ("git", "git.corp.example")

    assert kernel.learn([("x.db.corp.example", DB, 5, "a")], now=1000.0) == 1
    assert program.epoch > epoch                        # a block rule's name may revoke an allow
    learned[DB] = frozenset({"x.db.corp.example"})
    assert kernel_verdicts(program, tables, PKTS, learned=learned) == reference_verdicts(POLICY, IDS, PKTS, learned)

    epoch = program.epoch
    assert [e.address for e in kernel.expire(now=1000.0 + 60)] == [DB]   # TTL 5 s, floored at 60 s
    assert program.epoch > epoch
    del learned[DB]
    assert kernel_verdicts(program, tables, PKTS, learned=learned) == after
    assert [e.address for e in kernel.expire(now=1000.0 + 300)] == [GIT]
    assert kernel_verdicts(program, tables, PKTS) == before
    assert program.learned.count() == 0 and not program.learned.counts.any()   # the filter in front too


def test_a_new_build_takes_what_was_learned(program, tmp_path):
    """A policy change compiles the learned table in; what is learned while it compiles is
    written into it before it is attached (Kernel._catch_up_learned)."""
    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    kernel.learn([("git.corp.example", GIT, 300, None)])
    tables = compile_policy(POLICY, IDS, program.layout, kernel.learned.by_address())
    program.load(tables)
    kernel.learn([("a.db.corp.example", DB, 300, None)])        # after the compile, before the attach
    kernel._catch_up_learned(Build(2, program, tables, 0.0, 0.0))
    learned = kernel.learned.by_address()
    assert kernel_verdicts(program, tables, PKTS, learned=learned) == reference_verdicts(POLICY, IDS, PKTS, learned)
    assert program.learned.get(DB) and program.learned.get(GIT)


def test_a_change_in_place_carries_learned_names_into_the_other_bank(program, tmp_path):
    """A rule change written into the program's other bank (control/kernel.py's in-place path)
    takes the learned addresses with the NEW policy's name tokens, and what is learned between
    the compile and the flip; the bank it leaves still holds the old policy's bits meanwhile."""
    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    kernel.build = Build(1, program, tables, 0.0, 0.0, program.bank)
    kernel.learn([("git.corp.example", GIT, 300, "a")], now=1000.0)
    # the same rules in another order: other name tokens, so other bits for the same names
    moved = replace(POLICY, rules=(replace(POLICY.rules[1], precedence=5),) + POLICY.rules[:1] + POLICY.rules[2:])
    new_tables = compile_policy(moved, IDS, program.layout, kernel.learned.by_address())
    assert new_tables.names.bits({"git.corp.example"}) != tables.names.bits({"git.corp.example"})
    staged = kernel._stage_in_place(new_tables, 2, [], 0.0)
    kernel.learn([("a.db.corp.example", DB, 300, "a")], now=1000.0)    # after the compile, before the flip
    learned = kernel.learned.by_address()
    assert kernel_verdicts(program, tables, PKTS, learned=learned) == reference_verdicts(POLICY, IDS, PKTS, learned)
    staged.apply()
    assert kernel.build.bank == program.bank and kernel.build.tables is new_tables
    assert kernel_verdicts(program, new_tables, PKTS, learned=learned) == reference_verdicts(moved, IDS, PKTS, learned)
    kernel.forget()
    assert kernel_verdicts(program, new_tables, PKTS) == reference_verdicts(moved, IDS, PKTS)


def test_a_flow_event_carries_the_name_token_that_decided(program, tmp_path):
    """The event of a packet a rule by hostname allowed carries the deciding candidate's name
    token (struct zt_event.name), as the trace does; the flow log names the hostname with it,
    read with the event's build's tokens (Kernel.names), whatever build is in force since.
    Packets that no name decided carry 0."""
    from dataplane.events import EventReader

    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    build = Build(program.build, program, tables, 0.0, 0.0, program.bank)
    kernel.build, kernel.names[build.number] = build, build
    kernel.learn([("git.corp.example", GIT, 300, "a")])
    by_name, by_cidr = Packet(SRC, GIT, TCP, 40000, 22), Packet(SRC, GIT, TCP, 40001, 80)
    with EventReader(program) as reader:
        while reader.poll(0):
            pass                                         # what earlier tests left
        with program.on_one_cpu() as cpu:
            r = program.run(bytes(build_raw(by_name)), cpu=cpu, dry=True)    # what `ztgate trace` reads
            for pkt in (by_name, by_cidr):
                program.run(bytes(build_raw(pkt)), cpu=cpu)
        events = reader.poll(100)
    assert [(e.dport, kernel.rule_name(e.build, e.rule), e.verdict.label) for e in events] == [
        (22, "git", "allow"), (80, "lan", "allow")]
    named, unnamed = events
    assert named.name == r.name != 0 and tables.names.tokens("git.corp.example") >> named.name & 1
    assert unnamed.name == 0
    assert kernel.hostname(named.name, named.dst, named.build) == "git.corp.example"
    assert kernel.hostname(unnamed.name, unnamed.dst, unnamed.build) is None

    # another build in force, whose tokens name nothing: the event's build still tells the name
    plain = compile_policy(replace(POLICY, rules=POLICY.rules[2:]), IDS, program.layout)
    kernel.build = kernel.names[build.number + 1] = Build(build.number + 1, program, plain, 0.0, 0.0, program.bank)
    assert kernel.hostname(named.name, named.dst) is None
    assert kernel.hostname(named.name, named.dst, named.build) == "git.corp.example"
    assert kernel.hostname(named.name, named.dst, build.number + 2) is None        # a build not kept


def test_names_no_rule_names_are_not_learned(program, tmp_path):
    """With a build in force, Kernel.learn keeps only names its rules name (exactly or by a
    wildcard): the others would decide nothing and take room (refused "unnamed")."""
    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    kernel.build = Build(1, program, tables, 0.0, 0.0, program.bank)
    assert kernel.named("GIT.corp.example.") and kernel.named("x.db.corp.example") and not kernel.named("db.corp.example")
    assert kernel.learn([("git.corp.example", GIT, 300, "a"), ("cdn.other.example", OTHER, 300, "a"),
                         ("x.db.corp.example", DB, 300, "a")]) == 2
    assert {e.name for e in kernel.learned_entries()} == {"git.corp.example", "x.db.corp.example"}
    assert kernel.learned.refused == {"unnamed": 1} and not program.learned.get(OTHER)
    kernel.forget()
