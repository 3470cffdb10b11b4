"""Rule changes without a whole compile (control/incremental.py): hypothesis draws a policy and
a sequence of rule changes (add, remove, enable, disable, move); each is staged incrementally
into the bank not in force and flipped, as control/kernel.py does (a change it cannot take
falls back to a whole compile, as there). After each change the kernel equals the reference
on packets aimed at the touched rule's edges and on others, and a program loaded fresh with a
whole compile gives the same verdicts on every probe. Under traffic, 400 incremental changes
decide every packet by the policy of the build that decided it."""
import threading
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import compile_policy
from control.incremental import Incremental, NotIncremental
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.program import Program
from tests.kernel.test_banks import changes, load_fresh
from tests.kernel.test_differential import identities, packets, policies
from tests.kernel.test_attach import (ALLOWED, BLOCKED, IDS, POLICY, ns, pin_dir, receivers,  # noqa: F401
                                      start_flows, udp_to_gw, veth_pair)
from tests.programs import TEST_LAYOUT

COUNTS = {"incremental": 0, "whole": 0}
WHY: list = []          # the reasons of the fallbacks


@pytest.fixture(scope="module")
def program():
    with Program(TEST_LAYOUT) as program:
        yield program


@pytest.fixture(scope="module")
def fresh():
    with Program(TEST_LAYOUT) as program:
        yield program


def begin(tables, policy, ids, program):
    try:
        return Incremental(tables, policy, ids, program)
    except NotIncremental:
        return None


def change(program, inc, policy, ids, number):
    """POLICY into PROGRAM as control/kernel.py puts it: incrementally, else a whole compile.
    Returns the tables in force and the state for the next change."""
    if inc is not None:
        try:
            staged = inc.stage(policy, ids, [])
        except NotIncremental as e:
            WHY.append(str(e))
            inc = None
        else:
            old = program.bank
            program.flip(number)
            inc.applied(staged, policy, old)
            COUNTS["incremental"] += 1
            return staged.tables, inc
    COUNTS["whole"] += 1
    tables = compile_policy(policy, ids, program.layout)
    program.stage(tables)
    program.flip(number)
    return tables, begin(tables, policy, ids, program)


@st.composite
def sequences(draw):
    """test_banks' sequences, longer: two runs of changes, the second from the first's policy
    (freed ids and rows are given again)."""
    ids = draw(identities())
    policy = draw(policies(ids))
    steps = draw(changes(ids, policy))
    steps += draw(changes(ids, steps[-1][2])) if steps else []
    probes = []
    for _, rule, after in steps:
        touched = replace(after, rules=(rule,))            # packets aimed at the touched rule's edges
        probes.append(draw(st.lists(packets(ids, touched), min_size=6, max_size=10))
                      + draw(st.lists(packets(ids, after), min_size=6, max_size=10)))
    return ids, policy, steps, probes


def without_hostnames(policy):
    return replace(policy, rules=tuple(replace(r, dst_hostnames=None) for r in policy.rules))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(sequences(), st.booleans())
def test_incremental_changes_equal_the_reference_and_a_whole_compile(program, fresh, case, plain):
    ids, policy, steps, probes = case
    if plain:   # hostnames take the whole compile: most examples go without, to change in place
        policy = without_hostnames(policy)
        steps = [(kind, replace(rule, dst_hostnames=None), without_hostnames(after)) for kind, rule, after in steps]
    tables = compile_policy(policy, ids, program.layout)
    program.load(tables)
    inc = begin(tables, policy, ids, program)
    for number, ((kind, rule, after), pkts) in enumerate(zip(steps, probes), program.build + 1):
        tables, inc = change(program, inc, after, ids, number)
        got = kernel_verdicts(program, tables, pkts)
        assert got == reference_verdicts(after, ids, pkts), f"after {kind} {rule}"
        whole = compile_policy(after, ids, fresh.layout)
        load_fresh(fresh, whole)
        assert kernel_verdicts(fresh, whole, pkts) == got, f"after {kind} {rule}"


def test_most_changes_were_incremental(program, fresh):
    """The property above was about incremental changes, not fallbacks (its counts; run alone,
    this test runs the property first)."""
    if not sum(COUNTS.values()):
        test_incremental_changes_equal_the_reference_and_a_whole_compile(program, fresh)
    assert COUNTS["incremental"] > COUNTS["whole"], COUNTS


def test_hundreds_of_changes_stay_incremental_and_right(program, fresh):
    """The bench's changes (add, disable, enable, move, remove of rules naming one user each, on
    one destination), 300 of them on the test layout's 64 rule ids: freed ids and rows are given
    again, so none falls back; after each the kernel equals the reference and a whole compile."""
    import ipaddress

    from control.model import TCP, UDP, Packet, Principal, Rule
    from tests.app_policy import IDS, POLICY   # (not test_attach's)

    users = [u.key for u in IDS.users]
    dsts = [ipaddress.ip_address(a) for a in ("10.99.99.1", "10.99.99.2", "10.20.0.10", "fd20::10")]
    probes = [Packet(a, dst, proto, 40000, port) for d in IDS.devices for a in d.addresses for dst in dsts
              if dst.version == a.version for proto in (TCP, UDP) for port in (22, 443, 8080, 5353)]
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    inc = Incremental(tables, POLICY, IDS, program)
    policy, number, before = POLICY, program.build, dict(COUNTS)
    for step in range(300):
        i, kind = step // 5, ("add", "disable", "enable", "move", "remove")[step % 5]
        name = f"bench-{i}"
        if kind == "add":
            new = Rule(name, 1000 + i, "block" if i % 2 else "allow", principals=(Principal("user", users[i % 2]),),
                       protocols=frozenset({"tcp"}), dst_cidrs=(ipaddress.ip_network("10.99.99.1/32"),),
                       dst_ports=((443, 443),))
            rules = policy.rules + (new,)
        elif kind == "remove":
            rules = tuple(r for r in policy.rules if r.name != name)
        else:
            rules = tuple((replace(r, enabled=kind == "enable") if kind != "move" else replace(r, precedence=500 + i))
                          if r.name == name else r for r in policy.rules)
        policy = replace(policy, rules=rules)
        number += 1
        tables, inc = change(program, inc, policy, IDS, number)
        got = kernel_verdicts(program, tables, probes)
        assert got == reference_verdicts(policy, IDS, probes), f"after {kind} {name}"
        if step % 25 == 0:
            whole = compile_policy(policy, IDS, fresh.layout)
            load_fresh(fresh, whole)
            assert kernel_verdicts(fresh, whole, probes) == got
    assert COUNTS["whole"] == before["whole"], WHY


def test_hundreds_of_incremental_changes_under_traffic_decide_every_packet_by_one_policy(ns, pin_dir):  # noqa: F811
    """test_banks' 400 flips, each an incremental change between two policies (the whole rule
    list swapped: removed, added, moved) while the peer sends from many flows. Every event
    says which build decided: its verdict and rule must be what the reference says under that
    build's policy."""
    from control.model import Policy, Rule
    from control.packets import parse_raw
    from control.reference import decide
    from dataplane.attach import attach
    from dataplane.events import EventReader

    two = Policy("block", (Rule("filler", 1, "block", protocols=frozenset({"udp"}), dst_ports=((5003, 5003),)),
                           Rule("b-only", 2, "allow", protocols=frozenset({"udp"}), dst_ports=((BLOCKED, BLOCKED),))))
    policies = {0: POLICY, 1: replace(POLICY, rules=POLICY.rules + (replace(two.rules[0], precedence=999),)), 2: two}
    gw_if, _ = veth_pair(ns)
    receivers(ns, "gw")
    eth = replace(TEST_LAYOUT, ethernet=True)
    stop = threading.Event()
    events, names, of_build = [], {}, {}
    program = Program(eth, build=1, pin_dir=pin_dir)
    try:
        tables = compile_policy(POLICY, IDS, eth)
        program.load(tables)
        names[1], of_build[1] = tables.rule_names, POLICY
        inc = Incremental(tables, POLICY, IDS, program)
        with EventReader.pinned(pin_dir) as reader:
            thread = start_flows(ns, (ALLOWED, BLOCKED), stop)
            with ns.inside("gw"):
                attach(program, gw_if)
                for number in range(2, 402):
                    policy = policies[number % 3]
                    staged = inc.stage(policy, IDS, [])
                    old = program.bank
                    program.flip(number)
                    inc.applied(staged, policy, old)
                    program.next_epoch()
                    names[number], of_build[number] = staged.tables.rule_names, policy
                    events.extend(reader.poll(0))
                    time.sleep(0.002)
            stop.set()
            thread.join()
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                events.extend(reader.poll(50))
    finally:
        stop.set()
        program.close()
    expected = {(n, port): decide(p, IDS, parse_raw(udp_to_gw(port))) for n, p in of_build.items()
                for port in (ALLOWED, BLOCKED)}
    ours = [e for e in events if e.dport in (ALLOWED, BLOCKED) and e.build in of_build]
    mixed = [(e.build, e.dport, e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             for e in ours
             if (e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             != (expected[(e.build, e.dport)].verdict, expected[(e.build, e.dport)].rule)]
    assert mixed == [], mixed[:5]
    by_policy = {k: sum(1 for e in ours if of_build[e.build] is p) for k, p in policies.items()}
    assert min(by_policy.values()) > 100, by_policy      # every policy decided many packets


def test_through_the_kernel_a_new_principal_and_device_changes_between(program, tmp_path):
    """Through Kernel (attached to nothing), as the gateway stages: a rule naming a user no rule
    named before (a new who-token: the user's devices leave the identity class they shared),
    then a device added for that user in place (Kernel.stage_devices), then rule changes
    again: each change incremental, and the kernel equals the reference from every device."""
    import ipaddress

    from control.config import Config
    from control.kernel import Build, Kernel
    from control.model import TCP, UDP, Device, Identities, Packet, Principal, Rule, User
    from tests.app_policy import IDS as APP_IDS, POLICY

    # carl shares bob's identity class (no groups, no rule names either) until a rule names bob
    IDS = Identities(APP_IDS.users + (User("carl@example.com", ()),),
                     APP_IDS.devices + (Device("carl-pc", "carl@example.com", ipaddress.IPv4Address("100.96.0.5")),))
    kernel = Kernel(Config(bpf_pin_dir=tmp_path))
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    kernel.build = Build(1, program, tables, 0.0, 0.0, program.bank)
    kernel._begin_changes(kernel.build, POLICY, IDS)
    dsts = [ipaddress.ip_address(a) for a in ("10.20.0.10", "fd20::10", "10.99.0.1")]

    def check(policy, ids):
        probes = [Packet(a, dst, proto, 40000, port) for d in ids.devices for a in d.addresses for dst in dsts
                  if dst.version == a.version for proto in (TCP, UDP) for port in (22, 443, 8080)]
        assert kernel_verdicts(program, kernel.build.tables, probes) == reference_verdicts(policy, ids, probes)

    bob = Rule("bob-https", 15, "allow", principals=(Principal("user", "bob@example.com"),),
               protocols=frozenset({"tcp"}), dst_ports=((443, 443),))
    ann = Rule("ann-block", 5, "block", principals=(Principal("user", "ann@example.com"),),
               dst_cidrs=(ipaddress.ip_network("10.99.0.0/16"),))
    pair = [ipaddress.IPv4Address("100.96.0.5"), ipaddress.IPv4Address("100.96.0.3")]
    assert len({ident for _, ident, _ in program.sources_of(pair)}) == 1
    policy = POLICY
    for number, rules in enumerate([POLICY.rules + (bob,), POLICY.rules + (bob, ann)], start=2):
        policy = replace(POLICY, rules=rules)
        kernel.stage_swap(IDS, policy, number).apply()
        assert kernel.inc is not None and kernel.build.tables.basis is None    # no compile
        check(policy, IDS)
    assert len({ident for _, ident, _ in program.sources_of(pair)}) == 2   # bob's left the class it shared
    tablet = Device("bob-tablet", "bob@example.com", ipaddress.IPv4Address("100.96.0.9"),
                    ipaddress.IPv6Address("fd00:5a::9"))
    ids = Identities(IDS.users, IDS.devices + (tablet,))
    kernel.stage_devices(ids, policy, [tablet]).apply()
    check(policy, ids)
    for number, rules in enumerate([tuple(replace(r, enabled=False) if r.name == "bob-https" else r
                                          for r in policy.rules),
                                    tuple(r for r in policy.rules if r.name != "ann-block"),
                                    POLICY.rules + (replace(bob, precedence=1),)], start=4):
        policy = replace(POLICY, rules=rules)
        kernel.stage_swap(ids, policy, number).apply()
        assert kernel.inc is not None and kernel.build.tables.basis is None
        check(policy, ids)
