"""Policy changes in place (ebpf/maps.h zt_bank): a new build is written into the bank not in
force, only where it differs, and put in force by one store. Hypothesis draws a policy and a
sequence of rule changes; after each change the kernel equals the reference on packets aimed
at the touched rules' edges and on others, and the bank written in place holds exactly what a
freshly built program would (so it gives the same verdicts on every probe). Under traffic,
400 flips between two policies decide every packet by one of them."""
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.compiler import compile_policy
from control.model import Policy
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.attach import attach
from dataplane.errors import TablesDoNotFit
from dataplane.events import EventReader
from dataplane.program import POLICY_MAPS, Program
from tests.kernel.test_attach import (ALLOWED, BLOCKED, IDS, POLICY, ns, pin_dir, receivers,  # noqa: F401
                                      start_flows, udp_to_gw, veth_pair)
from tests.kernel.test_differential import identities, packets, policies
from tests.programs import TEST_LAYOUT

# the banked arrays (zt_learned is a hash, and zt_learned_filter holds both banks per slot:
# tests/kernel/test_hostnames.py, tests/kernel/test_learned_filter.py)
ARRAYS = [name for name in POLICY_MAPS
          if name not in ("zt_bank", "zt_src_hash", "zt_rule_stats", "zt_learned", "zt_learned_filter")]


@pytest.fixture(scope="module")
def program():
    """This module's own program (its build numbers and bank move: the session's must not)."""
    with Program(TEST_LAYOUT) as program:
        yield program


@pytest.fixture(scope="module")
def fresh():
    """A second program: each check empties it (as a new program's maps are) and loads it whole."""
    with Program(TEST_LAYOUT) as program:
        yield program


@st.composite
def changes(draw, ids, policy):
    """A sequence of rule changes as the CLI makes them: add, remove, enable, disable, move."""
    out, rules = [], list(policy.rules)
    for step in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["add", "remove", "enable", "disable", "move"] if rules else ["add"]))
        if kind == "add":
            new = draw(policies(ids)).rules
            if not new:
                continue
            rule = replace(new[0], name=f"n{step}")
            rules.append(rule)
        else:
            i = draw(st.integers(0, len(rules) - 1))
            rule = rules[i]
            if kind == "remove":
                del rules[i]
            elif kind == "move":
                rules[i] = rule = replace(rule, precedence=draw(st.integers(1, 100_000)))
            else:
                rules[i] = rule = replace(rule, enabled=kind == "enable")
        out.append((kind, rule, replace(policy, rules=tuple(rules))))
    return out


@st.composite
def sequences(draw):
    ids = draw(identities())
    policy = draw(policies(ids))
    steps = draw(changes(ids, policy))
    probes = []
    for _, rule, after in steps:
        touched = replace(after, rules=(rule,))            # packets aimed at the touched rule's edges
        probes.append(draw(st.lists(packets(ids, touched), min_size=6, max_size=10))
                      + draw(st.lists(packets(ids, after), min_size=6, max_size=10)))
    return ids, policy, steps, probes


def load_fresh(program, tables):
    """What a newly built program holds: empty maps, then the tables."""
    for name in ARRAYS:
        program.policy_tables.array(name)[:] = 0
    program.bpf["zt_src_hash"].clear()
    program.policy_tables._hashed, program.policy_tables._pooled = [{}, {}], [{}, {}]
    program.load(tables)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                 HealthCheck.function_scoped_fixture])
@given(sequences())
def test_changes_in_place_equal_the_reference_and_a_fresh_build(program, fresh, case):
    ids, policy, steps, probes = case
    program.load(compile_policy(policy, ids, program.layout))
    for number, ((kind, rule, after), pkts) in enumerate(zip(steps, probes), program.build + 1):
        tables = compile_policy(after, ids, program.layout)
        bank = 1 - program.bank
        program.stage(tables)
        program.flip(number)
        assert (program.bank, program.build) == (bank, number)
        got = kernel_verdicts(program, tables, pkts)
        assert got == reference_verdicts(after, ids, pkts), f"after {kind} {rule}"
        load_fresh(fresh, tables)
        for name in ARRAYS:
            assert np.array_equal(program.policy_tables.in_bank(name), fresh.policy_tables.in_bank(name)), \
                f"{name} after {kind} {rule}"
        assert program.policy_tables._hashed[bank] == fresh.policy_tables._hashed[fresh.bank]
        assert kernel_verdicts(fresh, tables, pkts) == got


def test_only_entries_that_differ_are_written(program):
    """Staging tables into a bank that holds them already writes nothing."""
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    program.stage(tables)
    assert program.stage(tables) == 0
    program.flip(program.build + 1)
    assert program.stage(tables) == 0            # the bank that load() filled


def test_tables_that_outgrow_the_program_are_refused(program):
    """A change that needs more than the program holds is not written: the caller builds a
    bigger program (control/kernel.py falls back to a full build and logs it)."""
    from control.model import Rule

    many = Policy("block", tuple(Rule(f"r{i}", i + 1, "allow", dst_ports=((i + 1, i + 1),))
                                 for i in range(TEST_LAYOUT.max_rules + 1)))
    with pytest.raises(TablesDoNotFit):
        program.stage(compile_policy(many, IDS, program.layout))


def test_hundreds_of_flips_under_traffic_decide_every_packet_by_one_policy(ns, pin_dir):  # noqa: F811
    """test_attach's 400 swaps, in place: one program on the interface, its banks flipped 400
    times between two policies while the peer sends from many flows. Every event says which build decided: its verdict and rule must be what the
    reference says under that build's policy."""
    from control.model import Rule
    from control.packets import parse_raw
    from control.reference import decide

    policies = {
        1: POLICY,
        2: Policy("block", (Rule("filler", 1, "block", protocols=frozenset({"udp"}), dst_ports=((5003, 5003),)),
                            Rule("b-only", 2, "allow", protocols=frozenset({"udp"}), dst_ports=((BLOCKED, BLOCKED),)))),
    }
    gw_if, _ = veth_pair(ns)
    receivers(ns, "gw")
    eth = replace(TEST_LAYOUT, ethernet=True)
    tables = {n: compile_policy(p, IDS, eth) for n, p in policies.items()}
    names = {n: t.rule_names for n, t in tables.items()}
    expected = {(n, port): decide(p, IDS, parse_raw(udp_to_gw(port))) for n, p in policies.items()
                for port in (ALLOWED, BLOCKED)}
    stop = threading.Event()
    events = []
    program = Program(eth, build=1, pin_dir=pin_dir)
    try:
        program.load(tables[1])
        with EventReader.pinned(pin_dir) as reader:
            # (no test runs alongside, unlike test_attach's: a run reads its decision back from
            # the CPU's last one, which the peer's packets on that CPU may have replaced)
            threads = [start_flows(ns, (ALLOWED, BLOCKED), stop)]
            with ns.inside("gw"):
                attach(program, gw_if)
                for flip in range(400):
                    number = 2 - flip % 2
                    program.stage(tables[number])
                    program.flip(number)
                    program.next_epoch()
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
        program.close()
    ours = [e for e in events if e.dport in (ALLOWED, BLOCKED) and e.build in policies]
    mixed = [(e.build, e.dport, e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             for e in ours
             if (e.verdict.label, names[e.build][e.rule - 1] if e.rule else None)
             != (expected[(e.build, e.dport)].verdict, expected[(e.build, e.dport)].rule)]
    assert mixed == [], mixed[:5]
    by_build = {n: sum(1 for e in ours if e.build == n) for n in policies}
    assert min(by_build.values()) > 200, by_build      # both builds decided many packets


def test_a_flip_revokes_open_flows_at_their_next_reply(program):
    """test_return_path's revocation, in place: after the flip and the epoch's move, the
    connector side decides an open flow again by the bank in force."""
    from scapy.layers.inet import IP, TCP

    from dataplane.reasons import Reason, Verdict
    from tests.app_policy import ANN4, APP4, BOB4, IDS as APP_IDS, POLICY as APP_POLICY, reverse
    from tests.programs import XDP_DROP, XDP_PASS

    def run(pkt, reply=False):
        with program.on_one_cpu() as cpu:
            return program.run(bytes(pkt), cpu=cpu, reply=reply)

    program.load(compile_policy(APP_POLICY, APP_IDS, program.layout))
    program.clear_flows()
    ssh = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A")
    web = IP(src=BOB4, dst=APP4) / TCP(sport=40001, dport=8080, flags="A")
    for fwd in (ssh, web):
        assert run(fwd).retval == XDP_PASS and run(reverse(fwd), reply=True).retval == XDP_PASS
    revoked = replace(APP_POLICY, rules=tuple(r for r in APP_POLICY.rules if r.name != "ssh-dev"))
    program.stage(compile_policy(revoked, APP_IDS, program.layout))
    program.flip(program.build + 1)
    program.next_epoch()
    got = run(reverse(ssh), reply=True)
    assert (got.retval, got.verdict, got.reason, got.device) == (XDP_DROP, Verdict.BLOCK, Reason.REVOKED, 1)
    assert run(ssh).verdict == Verdict.BLOCK
    assert (run(reverse(web), reply=True).reason, run(reverse(web), reply=True).reason) == (Reason.REPLY, Reason.REPLY)
