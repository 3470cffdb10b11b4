"""Review findings on incremental rule changes (control/incremental.py) and adoption
(dataplane/pinned.py), each reproduced through the real kernel against the reference."""
import ipaddress
from dataclasses import replace

import pytest

from control.compiler import compile_policy
from control.incremental import Incremental
from control.model import ICMP, TCP, UDP, Packet, Principal, Rule
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.program import Program
from tests.app_policy import IDS, POLICY
from tests.programs import TEST_LAYOUT

DSTS = [ipaddress.ip_address(a) for a in ("10.20.0.10", "10.99.99.1", "fd20::10")]


def probes(ids=IDS, dsts=DSTS, ports=(22, 443, 8080, 5353)):
    return [Packet(a, dst, proto, 40000, port) for d in ids.devices for a in d.addresses for dst in dsts
            if dst.version == a.version for proto in (TCP, UDP) for port in ports] + \
           [Packet(a, dst, ICMP, 0, 0) for d in ids.devices for a in d.addresses for dst in dsts
            if dst.version == a.version]


def staged(program, inc, policy, ids, number):
    """POLICY staged incrementally and flipped, as control/kernel.py does: the tables in force."""
    change = inc.stage(policy, ids, [])
    old = program.bank
    program.flip(number)
    inc.applied(change, policy, old)
    return change.tables


@pytest.fixture(scope="module")
def named_program():
    """A program built for a policy with hostnames (name_words 1): each bank holds every service
    list twice, and a destination learned for no name walks the second copy."""
    with Program(replace(TEST_LAYOUT, name_words=1)) as program:
        yield program


def test_a_change_in_a_program_built_for_hostnames_writes_the_lists_without_names_too(named_program):
    """The policy in force has no hostnames (the rule that had them went by a whole build into the
    same program, or the pinned program was adopted): rule changes are incremental, and every
    packet (its destination learned for no name) walks the lists without names."""
    program = named_program
    tables = compile_policy(POLICY, IDS, program.layout)
    program.load(tables)
    inc = Incremental(tables, POLICY, IDS, program)
    pkts = probes()
    assert kernel_verdicts(program, tables, pkts) == reference_verdicts(POLICY, IDS, pkts)
    block = Rule("block-web", 5, "block", principals=(Principal("user", "bob@example.com"),),
                 protocols=frozenset({"tcp"}), dst_ports=((8080, 8080),))
    policy = POLICY
    for number, rules in enumerate([POLICY.rules + (block,), POLICY.rules, POLICY.rules + (replace(block, precedence=50),)],
                                   start=program.build + 1):
        policy = replace(POLICY, rules=rules)
        tables = staged(program, inc, policy, IDS, number)
        assert kernel_verdicts(program, tables, pkts) == reference_verdicts(policy, IDS, pkts), rules[-1].name
