"""zt_learned_filter's three states for a slot and bank (ebpf/maps.h): no address, one address
(answered from the slot's copy, no hash probe), more than one (the hash probe), and the moves
between them as addresses are learned, change names and are forgotten, in both banks: after
each step the kernel equals the reference on addresses that share a slot, and a forgotten
address leaves its slot empty."""
import ipaddress
from dataclasses import replace

import pytest

from control.compiler import compile_policy
from control.probe import kernel_verdicts, reference_verdicts
from dataplane.learned import filter_slot
from dataplane.mirrors import LEARNED_MANY

from tests.kernel.test_hostnames import IDS, POLICY, SRC
from control.model import TCP, Packet
from tests.programs import TEST_LAYOUT

GIT, DB = "git.corp.example", "x.db.corp.example"


def same_slot(n: int) -> list:
    """N addresses of 10.0.0.0/8 that fall in one filter slot."""
    by_slot: dict = {}
    for i in range(1, 1 << 24, 251):
        a = ipaddress.ip_address(0x0A000000 + i)
        got = by_slot.setdefault(filter_slot(a), [])
        got.append(a)
        if len(got) == n:
            return got
    raise AssertionError("no slot holds enough addresses")


@pytest.fixture(scope="module")
def program():
    from dataplane.program import Program

    with Program(replace(TEST_LAYOUT, name_words=1).with_headroom()) as prog:
        yield prog


def refs(program, addr, bank: int) -> int:
    word = int(program.learned.counts[filter_slot(addr)])
    return word >> 32 if bank else word & 0xFFFFFFFF


def test_one_many_and_none_in_both_banks(program):
    """Each step is staged into the bank not in force and flipped: the banks take turns, and
    the other bank's ref (the step before) stays as it was beside it."""
    a, b, c = same_slot(3)
    pkts = [Packet(SRC, dst, TCP, 40000, port) for dst in (a, b, c) for port in (22, 80)]
    steps = [{a: {GIT}}, {a: {GIT}, b: {DB}}, {a: {GIT}, b: {DB}, c: {GIT}}, {b: {DB}}, {b: {GIT}},
             {b: {GIT, DB}}, {}, {c: {DB}}, {}, {}]
    program.load(compile_policy(POLICY, IDS, program.layout))
    for learned in steps:
        learned = {k: frozenset(v) for k, v in learned.items()}
        tables = compile_policy(POLICY, IDS, program.layout, learned)
        program.stage(tables)
        program.flip(program.build + 1)
        got = kernel_verdicts(program, tables, pkts, learned=learned)
        assert got == reference_verdicts(POLICY, IDS, pkts, learned), learned
        ref = refs(program, a, program.bank)
        assert ref in ((0,) if not learned else (1, 2) if len(learned) == 1 else (LEARNED_MANY,)), learned
    assert not program.learned.counts.any()
