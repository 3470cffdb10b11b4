"""Sessions in the kernel (BPF_PROG_TEST_RUN): a device whose session is over has its source
entries written in place with ZT_IDENT_EXPIRED (what the gateway's session clock writes), and
its packets drop as session-expired both ways, naming the device, with the reference agreeing;
a renewal writes the entries back and the device's traffic passes at once."""
import time
from dataclasses import replace

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from control.compiler import compile_policy
from control.model import Identities
from control.reference import decide
from dataplane.mirrors import IDENT_EXPIRED
from dataplane.reasons import Reason, Verdict

from tests.app_policy import ANN4, ANN6, APP4, APP6, IDS, POLICY, reverse
from tests.programs import XDP_DROP, XDP_PASS, pinned_program, run_on_one_cpu

ANN = 1          # ann-laptop's device id (the first device)


def with_session(ids: Identities, expires: float) -> Identities:
    return replace(ids, devices=tuple(replace(d, session_expires=expires) if d.name == "ann-laptop" else d
                                      for d in ids.devices))


@pytest.fixture(scope="module")
def program():
    with pinned_program("sessions") as prog:
        yield prog


def test_an_expired_device_drops_both_ways_and_a_renewal_restores(program):
    live = with_session(IDS, time.time() + 3600)
    tables = compile_policy(POLICY, live, program.layout)
    program.load(tables)
    program.clear_flows()
    ssh = IP(src=ANN4, dst=APP4) / TCP(sport=40000, dport=22, flags="A")
    dns6 = IPv6(src=ANN6, dst=APP6) / UDP(sport=40007, dport=5353)
    for fwd in (ssh, dns6):
        assert run_on_one_cpu(program, fwd).retval == XDP_PASS
        assert run_on_one_cpu(program, reverse(fwd), reply=True).retval == XDP_PASS
    # The session ends: its entries in place, then the epoch (Kernel.stage_devices' apply)
    over = with_session(IDS, time.time() - 1)
    ann = over.devices[0]
    entries = tables.sources.entries(over, [ann])
    assert {(ident, device) for _, ident, device in entries} == {(IDENT_EXPIRED, ANN)}
    program.set_sources(entries)
    program.next_epoch()
    # the connector side first: no packet of the device needed to end its flows
    for fwd in (ssh, dns6):
        got = run_on_one_cpu(program, reverse(fwd), reply=True)
        assert (got.retval, got.verdict, got.reason, got.device) == (
            XDP_DROP, Verdict.BLOCK, Reason.SESSION_EXPIRED, ANN), fwd.summary()
        # its flow is gone, and a later reply is still named for the session
        assert run_on_one_cpu(program, reverse(fwd), reply=True).reason == Reason.SESSION_EXPIRED
    for fwd in (ssh, dns6, IP(src=ANN4, dst=APP4) / TCP(sport=40001, dport=22, flags="S")):
        got = run_on_one_cpu(program, fwd)
        assert (got.retval, got.verdict, got.reason, got.device) == (
            XDP_DROP, Verdict.BLOCK, Reason.SESSION_EXPIRED, ANN), fwd.summary()
        assert decide(POLICY, over, bytes(fwd)).reason == "session-expired"
    assert program.reason_counters()[Reason.SESSION_EXPIRED][0] >= 7
    # Renewal: the entries back as they were, the epoch; the next connection passes both ways.
    renewed = with_session(IDS, time.time() + 3600)
    program.set_sources(tables.sources.entries(renewed, [renewed.devices[0]]))
    program.next_epoch()
    syn = IP(src=ANN4, dst=APP4) / TCP(sport=40002, dport=22, flags="S")
    got = run_on_one_cpu(program, syn)
    assert (got.retval, got.reason) == (XDP_PASS, Reason.RULE)
    assert decide(POLICY, renewed, bytes(syn)).reason == "rule"
    synack = IP(src=APP4, dst=ANN4) / TCP(sport=22, dport=40002, flags="SA")
    assert run_on_one_cpu(program, synack, reply=True).retval == XDP_PASS


def test_a_full_build_writes_sessions_already_over_as_expired(program):
    """What a gateway's start (or any whole build) does with a session that ended meanwhile;
    a deprovisioned user's devices, hand-made or not, are expired too."""
    over = with_session(IDS, time.time() - 1)
    program.load(compile_policy(POLICY, over, program.layout))
    program.clear_flows()
    got = run_on_one_cpu(program, IP(src=ANN4, dst=APP4) / TCP(sport=40003, dport=22, flags="S"))
    assert (got.retval, got.reason, got.device) == (XDP_DROP, Reason.SESSION_EXPIRED, ANN)
    gone = replace(IDS, users=tuple(replace(u, active=False) if u.key == "ann@example.com" else u for u in IDS.users))
    program.load(compile_policy(POLICY, gone, program.layout))
    got = run_on_one_cpu(program, IPv6(src=ANN6, dst=APP6) / UDP(sport=40004, dport=5353))
    assert (got.retval, got.reason, got.device) == (XDP_DROP, Reason.SESSION_EXPIRED, ANN)
    assert decide(POLICY, gone, bytes(IPv6(src=ANN6, dst=APP6) / UDP(sport=40004, dport=5353))).reason == \
        "session-expired"
