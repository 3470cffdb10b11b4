"""A retransmitted SYN (BPF_PROG_TEST_RUN): a SYN of a flow that conntrack holds open, allowed
by this build in this epoch and reported within ZT_FLOW_EVENT_NS, is the same connection
attempt again. It is allowed and counted as before, and it is no new flow: the flow log gets
one event per connection, not one per retransmission. A SYN that opens a connection again is
still reported: after the flow closed (FIN), after its report aged past the window (a reused
tuple), on a tuple that no SYN opened, after a change of rule; and a change that revokes the
flow drops its retransmissions."""
import pytest
from scapy.layers.inet import IP, TCP

from control.compiler import compile_policy
from dataplane.events import EventReader
from dataplane.reasons import Reason, Verdict

from tests.app_policy import ANN4, APP4, IDS, POLICY, reverse
from tests.c_defines import define
from tests.programs import XDP_PASS
from tests.programs import run_on_one_cpu as run

SYN = IP(src=ANN4, dst=APP4) / TCP(sport=43000, dport=22, flags="S")    # ssh-dev allows it
ACK = IP(src=ANN4, dst=APP4) / TCP(sport=43000, dport=22, flags="A")


@pytest.fixture
def loaded(program):
    program.load(compile_policy(POLICY, IDS, program.layout))
    program.clear_flows()
    with EventReader(program) as reader:
        while reader.poll(0):
            pass
        yield program, reader


def ssh_events(reader) -> list:
    return [e for e in reader.poll(50) if e.sport == 43000]


def entry(program):
    table = program.bpf["zt_ct"]
    (key,) = [k for k in table.keys() if k.sport == 43000]
    return table, key


def test_a_retransmitted_syn_is_not_reported_again(loaded):
    program, reader = loaded
    counted = program.rule_counters()
    first = run(program, SYN)
    again = [run(program, SYN) for _ in range(3)]
    for got in (first, *again):
        assert (got.retval, got.verdict, got.reason, got.rule) == (XDP_PASS, Verdict.ALLOW, Reason.RULE, first.rule)
    assert len(ssh_events(reader)) == 1
    before = counted.get(first.rule, (0, 0))[0]
    assert program.rule_counters()[first.rule][0] - before == 4     # counted by its rule, every one
    (flow,) = [f for f in program.flows() if f["sport"] == 43000]
    assert flow["packets"] == 4


def test_a_syn_that_opens_the_tuple_again_is_reported(loaded):
    program, reader = loaded
    assert run(program, SYN).retval == XDP_PASS
    assert len(ssh_events(reader)) == 1
    # the server closed the connection (a FIN through the connector side): a SYN is a new one
    fin = reverse(ACK)
    fin[TCP].flags = "FA"
    assert run(program, fin, reply=True).reason == Reason.REPLY
    assert run(program, SYN).retval == XDP_PASS and len(ssh_events(reader)) == 1
    assert run(program, SYN).retval == XDP_PASS and ssh_events(reader) == []
    # its report older than the window: a reused tuple, reported again (once)
    table, key = entry(program)
    value = table[key]
    value.event_ns -= define("ZT_FLOW_EVENT_NS") + 1
    table[key] = value
    assert [run(program, SYN).retval for _ in range(2)] == [XDP_PASS] * 2
    assert len(ssh_events(reader)) == 1


def test_a_syn_on_a_flow_that_no_syn_opened_is_reported(loaded):
    program, reader = loaded
    assert run(program, ACK).retval == XDP_PASS     # (tracked from its ACK: an entry that outlived a restart)
    assert ssh_events(reader) == []
    assert [run(program, SYN).retval for _ in range(2)] == [XDP_PASS] * 2
    assert len(ssh_events(reader)) == 1


def test_after_a_change_a_retransmitted_syn_is_decided_again(loaded):
    program, reader = loaded
    assert run(program, SYN).retval == XDP_PASS
    ssh_events(reader)
    # the same rule under a new epoch (another device changed): decided again, not a new flow
    program.next_epoch()
    assert run(program, SYN).retval == XDP_PASS
    assert ssh_events(reader) == []
    # another rule decides it now: reported
    widened = type(POLICY)("block", (POLICY.rules[0].__class__("all-tcp", 1, "allow",
                                                                protocols=frozenset({"tcp"})),
                                     *POLICY.rules))
    program.load(compile_policy(widened, IDS, program.layout))
    program.next_epoch()
    got = run(program, SYN)
    assert got.retval == XDP_PASS and [e.rule for e in ssh_events(reader)] == [got.rule]
    # revoked: its retransmissions drop
    revoked = type(POLICY)("block", tuple(r for r in POLICY.rules if r.name != "ssh-dev"))
    program.load(compile_policy(revoked, IDS, program.layout))
    program.next_epoch()
    got = run(program, SYN)
    assert (got.verdict, got.reason) == (Verdict.BLOCK, Reason.DEFAULT)
